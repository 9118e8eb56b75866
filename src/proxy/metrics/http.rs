//! The counters of a Service port in request mode. Allocated at its first
//! request, so that the thousands of ports balanced per connection carry
//! one empty pointer for them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use std::sync::atomic::Ordering;

use super::histogram::ConnectHistogram;

const RELAXED: Ordering = Ordering::Relaxed;

/// Why a request was sent again, to another endpoint (only ever when it
/// cannot have reached the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection to the endpoint could not be opened.
    ConnectFailed,
    /// A kept-alive connection was found closed before a byte of the
    /// request was written, or the endpoint refused the stream (h2
    /// `REFUSED_STREAM`, a stream above a GOAWAY's last id).
    NotSent,
}

impl RetryReason {
    pub const ALL: [RetryReason; 2] = [RetryReason::ConnectFailed, RetryReason::NotSent];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectFailed => "connect_failed",
            RetryReason::NotSent => "not_sent",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a request ended, for `kubeuproxy_http_requests_total`: the class of
/// the response status (`1xx` … `5xx`), and for gRPC requests the
/// `grpc-status` (from the trailers, or from the headers of a
/// trailers-only answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Outcome {
    /// The HTTP status; 0 when no response reached the client (the client
    /// left, or the endpoint's answer broke off).
    pub status: u16,
    /// `grpc-status` of a gRPC request; `None` otherwise, or when the
    /// answer carried none.
    pub grpc_status: Option<u8>,
}

impl Outcome {
    fn class(self) -> &'static str {
        match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        }
    }
}

/// The request-mode counters of one Service port.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Requests ended, by outcome (few distinct values per port).
    requests: Mutex<BTreeMap<(&'static str, Option<u8>), u64>>,
    /// Arrival of a request to the endpoint's response headers.
    duration: ConnectHistogram,
    /// Indexed by [`RetryReason`].
    retries: [AtomicU64; 2],
    /// Requests being served now.
    in_flight: AtomicI64,
    /// Connections open to each endpoint from this port's pool.
    upstream: Mutex<BTreeMap<SocketAddr, i64>>,
}

impl HttpMetrics {
    /// A request arrived; [`HttpMetrics::ended`] counts it out.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, RELAXED);
    }

    /// A request counted in by [`HttpMetrics::started`] ended so.
    pub fn ended(&self, outcome: Outcome) {
        self.in_flight.fetch_sub(1, RELAXED);
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((outcome.class(), outcome.grpc_status)).or_default() += 1;
    }

    /// The endpoint's response headers came this long after the request.
    pub fn answered(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    pub fn retry(&self, reason: RetryReason) {
        self.retries[reason.index()].fetch_add(1, RELAXED);
    }

    /// A pooled connection to `endpoint` opened (+1) or closed (-1).
    pub fn upstream(&self, endpoint: SocketAddr, delta: i64) {
        let mut u = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        let n = u.entry(endpoint).or_default();
        *n += delta;
        if *n <= 0 {
            u.remove(&endpoint);
        }
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(RELAXED)
    }
}

/// What a scrape reads of one port's request-mode counters.
impl HttpMetrics {
    /// Requests ended, by (response class, `grpc-status`), sorted.
    pub fn requests(&self) -> Vec<((&'static str, Option<u8>), u64)> {
        let r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().map(|(k, n)| (*k, *n)).collect()
    }

    pub fn duration(&self) -> &ConnectHistogram {
        &self.duration
    }

    pub fn retries(&self, reason: RetryReason) -> u64 {
        self.retries[reason.index()].load(RELAXED)
    }

    /// Open pooled connections per endpoint, sorted.
    pub fn upstream_connections(&self) -> Vec<(SocketAddr, i64)> {
        let u = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        u.iter().map(|(ep, n)| (*ep, *n)).collect()
    }
}
