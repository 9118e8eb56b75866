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
    /// request was written, or an h2 endpoint did not process the stream
    /// of a request without a body (`REFUSED_STREAM`, above its GOAWAY's
    /// last stream).
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

/// The response classes, in the order of [`HttpMetrics`]' counters.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// gRPC status codes 0 ..= 16, then "other", then "not gRPC".
const GRPC_SLOTS: usize = 19;

impl Outcome {
    fn class_index(self) -> usize {
        match self.status {
            100..=599 => usize::from(self.status / 100) - 1,
            _ => 5,
        }
    }

    fn grpc_index(self) -> usize {
        match self.grpc_status {
            Some(g) if g <= 16 => usize::from(g),
            Some(_) => 17,
            None => 18,
        }
    }
}

/// The `grpc_status` label of a counter slot; `None`: not gRPC.
fn grpc_label(slot: usize) -> Option<u8> {
    match slot {
        0..=16 => u8::try_from(slot).ok(),
        17 => Some(u8::MAX),
        _ => None,
    }
}

/// The request-mode counters of one Service port.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Requests ended, by response class and gRPC status: plain
    /// atomics, so that requests on many threads never wait for one
    /// another (the port's few hundred bytes exist only in request mode).
    requests: [[AtomicU64; GRPC_SLOTS]; 6],
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
        self.requests[outcome.class_index()][outcome.grpc_index()].fetch_add(1, RELAXED);
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
    /// Requests ended, by (response class, `grpc-status`; 255: a status
    /// above 16), the outcomes seen at least once.
    pub fn requests(&self) -> Vec<((&'static str, Option<u8>), u64)> {
        let mut out = Vec::new();
        for (class, row) in CLASSES.iter().zip(&self.requests) {
            for (slot, n) in row.iter().enumerate() {
                let n = n.load(RELAXED);
                if n > 0 {
                    out.push(((*class, grpc_label(slot)), n));
                }
            }
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_class_and_grpc_status() {
        let m = HttpMetrics::default();
        let ended = |status, grpc_status| {
            m.started();
            m.ended(Outcome {
                status,
                grpc_status,
            });
        };
        ended(200, None);
        ended(204, None);
        ended(503, None);
        ended(200, Some(14));
        ended(200, Some(0));
        ended(0, None);
        ended(200, Some(99));
        assert_eq!(
            m.requests(),
            vec![
                (("2xx", Some(0)), 1),
                (("2xx", Some(14)), 1),
                (("2xx", Some(255)), 1),
                (("2xx", None), 2),
                (("5xx", None), 1),
                (("none", None), 1),
            ]
        );
        assert_eq!(m.in_flight(), 0);
    }
}
