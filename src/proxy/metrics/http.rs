//! The counters of a Service port in request mode. Allocated at its first
//! request, so that the thousands of ports balanced per connection carry
//! one empty pointer for them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{ConnectHistogram, PortLabels, RELAXED, SeriesLabels, ServicePortMetrics};

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
    const ALL: [RetryReason; 2] = [RetryReason::ConnectFailed, RetryReason::NotSent];

    fn as_str(self) -> &'static str {
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

pub(super) mod help {
    pub const REQUESTS: &str = "HTTP requests served in request mode, by response class (code) and, for gRPC, grpc-status.";
    pub const DURATION: &str =
        "Time from a request's arrival to the endpoint's response headers (request mode).";
    pub const RETRIES: &str = "Requests sent again to another endpoint, by reason; only requests that cannot have reached the first.";
    pub const IN_FLIGHT: &str = "HTTP requests being served now (request mode).";
    pub const UPSTREAM: &str =
        "Connections open from the request-mode pool to each endpoint (HTTP/1.1 or h2).";
}

/// Writes the request-mode families of the ports that have served one.
pub(super) fn encode(
    encoder: &mut DescriptorEncoder,
    ports: &[std::sync::Arc<ServicePortMetrics>],
) -> Result<(), std::fmt::Error> {
    let http: Vec<(&PortLabels, &HttpMetrics)> = ports
        .iter()
        .filter_map(|p| p.http.get().map(|h| (&p.labels, h)))
        .collect();
    if http.is_empty() {
        return Ok(());
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_requests",
            help::REQUESTS,
            None,
            MetricType::Counter,
        )?;
        for (labels, h) in &http {
            let requests = h.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for ((class, grpc), n) in requests {
                let grpc = grpc.map(|g| g.to_string());
                let series = SeriesLabels {
                    port: labels,
                    extra: Some(("code", class)),
                };
                let with_grpc = GrpcLabels {
                    inner: series,
                    grpc: grpc.as_deref(),
                };
                ConstCounter::new(n).encode(family.encode_family(&with_grpc)?)?;
            }
        }
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_request_duration_seconds",
            help::DURATION,
            None,
            MetricType::Histogram,
        )?;
        for (labels, h) in &http {
            let (sum, count, buckets) = h.duration.snapshot();
            family
                .encode_family(&SeriesLabels {
                    port: labels,
                    extra: None,
                })?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_retries",
            help::RETRIES,
            None,
            MetricType::Counter,
        )?;
        for (labels, h) in &http {
            for r in RetryReason::ALL {
                ConstCounter::new(h.retries[r.index()].load(RELAXED)).encode(
                    family.encode_family(&SeriesLabels {
                        port: labels,
                        extra: Some(("reason", r.as_str())),
                    })?,
                )?;
            }
        }
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_requests_in_flight",
            help::IN_FLIGHT,
            None,
            MetricType::Gauge,
        )?;
        for (labels, h) in &http {
            ConstGauge::new(h.in_flight.load(RELAXED)).encode(family.encode_family(
                &SeriesLabels {
                    port: labels,
                    extra: None,
                },
            )?)?;
        }
    }
    let upstream: Vec<(&PortLabels, String, i64)> = http
        .iter()
        .flat_map(|(labels, h)| {
            h.upstream
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(ep, n)| (*labels, ep.to_string(), *n))
                .collect::<Vec<_>>()
        })
        .collect();
    if !upstream.is_empty() {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_upstream_connections",
            help::UPSTREAM,
            None,
            MetricType::Gauge,
        )?;
        for (labels, ep, n) in &upstream {
            ConstGauge::new(*n).encode(family.encode_family(&SeriesLabels {
                port: labels,
                extra: Some(("endpoint", ep.as_str())),
            })?)?;
        }
    }
    Ok(())
}

/// A request series' labels: the port's, `code`, and `grpc_status` for
/// gRPC requests.
struct GrpcLabels<'a> {
    inner: SeriesLabels<'a>,
    grpc: Option<&'a str>,
}

impl prometheus_client::encoding::EncodeLabelSet for GrpcLabels<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.inner.encode(encoder)?;
        match self.grpc {
            Some(g) => [("grpc_status", g)].encode(encoder),
            None => Ok(()),
        }
    }
}
