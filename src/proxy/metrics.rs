//! The data path's own counters, per Service port, and the collector that
//! renders them: what only a userspace proxy can tell (connections
//! accepted, failed, bytes relayed, connect latency), under `kubeuproxy_*`,
//! labelled by Service port: `namespace`, `service`, `port_name`,
//! `protocol` — a bounded set, never per client or connection.
//! Per-endpoint series exist only with `--metrics-per-endpoint`.
//!
//! They live beside what counts into them, not in the process's registry
//! (`crate::metrics`): listeners take their Service port's
//! [`ServicePortMetrics`] from a [`PortSeries`], and the registry only
//! registers that [`PortSeries`] as a collector. So the data path never
//! depends on the registry; the registry depends on this module.
//!
//! The data path never looks a metric up by label: each listener gets its
//! Service port's [`ServicePortMetrics`], one allocation of plain atomics
//! (the counters, the gauges, the connect-duration buckets) and of the
//! port's label values, resolved once when the listener opens; a
//! connection only touches those atomics. The per-port series are not
//! registered one by one: [`PortSeries`], a [`Collector`], walks the
//! Service ports held by listeners at each scrape, sorted by namespace,
//! service, port name and protocol, and writes their fifteen series from
//! the atomics. This is for memory: registered in `Family` maps, each
//! series was its own `Arc` (the histogram a locked `Vec`) keyed by the
//! port's labels in a map per family, several times the bytes and
//! allocations per Service port (the figures are in docs/performance.md).
//! A Service port's series go away when its last listener closes, so the
//! series follow the Services that exist (connections still open keep
//! counting into a `ServicePortMetrics` nobody renders).

mod histogram;
pub mod http;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::conntrack::CONNTRACK;
use super::relay::{RelayedBytes, SPLICE_PIPES, Way};
use crate::model::{Protocol, ServicePortName};
#[cfg(test)]
use histogram::CONNECT_BOUNDS;
use histogram::ConnectHistogram;

/// Relaxed everywhere: each atomic is a counter of its own, and a scrape
/// needs no order between them.
const RELAXED: Ordering = Ordering::Relaxed;

/// Connections to endpoints opened from the client's own address (see
/// [`ServicePortMetrics::client_ip`]).
static CLIENT_IP_PRESERVED: AtomicU64 = AtomicU64::new(0);
/// Those that fell back to the proxy address.
static CLIENT_IP_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Labels of every per-Service-port series: `namespace`, `service`,
/// `port_name` (empty for a single unnamed port) and `protocol`. The three
/// names are one string, cut at two offsets.
#[derive(Debug)]
struct PortLabels {
    names: Box<str>,
    namespace_end: u32,
    service_end: u32,
    protocol: Protocol,
}

impl PortLabels {
    fn of(name: &ServicePortName) -> Self {
        let namespace = &name.service.namespace;
        let service = &name.service.name;
        let mut names = String::with_capacity(namespace.len() + service.len() + name.port.len());
        names.push_str(namespace);
        names.push_str(service);
        names.push_str(&name.port);
        // Kubernetes names are at most 253 bytes; a length beyond u32
        // would only cut the labels wrong, never panic (see `part`).
        let offset = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        PortLabels {
            names: names.into_boxed_str(),
            namespace_end: offset(namespace.len()),
            service_end: offset(namespace.len() + service.len()),
            protocol: name.protocol,
        }
    }

    fn part(&self, from: u32, to: Option<u32>) -> &str {
        let from = from as usize;
        match to {
            Some(to) => self.names.get(from..to as usize),
            None => self.names.get(from..),
        }
        .unwrap_or_default()
    }

    /// Namespace, service, port name, protocol: the sort order of the
    /// series, and the identity of the Service port.
    fn parts(&self) -> (&str, &str, &str, Protocol) {
        (
            self.part(0, Some(self.namespace_end)),
            self.part(self.namespace_end, Some(self.service_end)),
            self.part(self.service_end, None),
            self.protocol,
        )
    }
}

/// A series' labels: the Service port's, then one more (`reason`,
/// `direction`, `endpoint`) for the families that have one.
struct SeriesLabels<'a> {
    port: &'a PortLabels,
    extra: Option<(&'static str, &'a str)>,
}

impl EncodeLabelSet for SeriesLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (namespace, service, port_name, protocol) = self.port.parts();
        [
            ("namespace", namespace),
            ("service", service),
            ("port_name", port_name),
            ("protocol", protocol.as_str()),
        ]
        .encode(encoder)?;
        match self.extra {
            Some(label) => [label].encode(encoder),
            None => Ok(()),
        }
    }
}

/// Why a client connection was reset without reaching an endpoint: the
/// reason of the last connect attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// The endpoint set was empty. The kernel refuses most of these
    /// (`no-endpoints` set); the proxy resets those that arrive while that
    /// rule change is being applied.
    NoEndpoints,
    /// The endpoint answered with a reset (nothing listens).
    ConnectRefused,
    /// No answer within the attempt's timeout.
    ConnectTimeout,
    /// No route, or no neighbour answered (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// A failure on this node: out of file descriptors, ports, memory, …
    LocalError,
    /// Refused at accept: `--max-connections` proxied connections were
    /// open already.
    MaxConnections,
}

impl FailReason {
    pub const ALL: [FailReason; 6] = [
        FailReason::NoEndpoints,
        FailReason::ConnectRefused,
        FailReason::ConnectTimeout,
        FailReason::Unreachable,
        FailReason::LocalError,
        FailReason::MaxConnections,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::NoEndpoints => "no_endpoints",
            FailReason::ConnectRefused => "connect_refused",
            FailReason::ConnectTimeout => "connect_timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::LocalError => "local_error",
            FailReason::MaxConnections => "max_connections",
        }
    }

    /// The reason a connect error stands for.
    pub fn of(e: &io::Error) -> FailReason {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FailReason::ConnectRefused,
            io::ErrorKind::TimedOut => FailReason::ConnectTimeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                FailReason::Unreachable
            }
            _ => FailReason::LocalError,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a new UDP client's datagram was dropped without a flow: which cap
/// was reached, so that an operator knows which flag to raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpRefusal {
    /// The Service port's table (`--udp-max-flows`) is full of flows in
    /// use.
    MaxFlows = 0,
    /// The process's budget (`--udp-max-flows-total`) is spent, and this
    /// Service port has no idle flow to give up.
    MaxFlowsTotal = 1,
}

impl UdpRefusal {
    pub const ALL: [UdpRefusal; 2] = [UdpRefusal::MaxFlows, UdpRefusal::MaxFlowsTotal];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UdpRefusal::MaxFlows => "max_flows",
            UdpRefusal::MaxFlowsTotal => "max_flows_total",
        }
    }
}

/// What identifies a Service port in [`PortSeries`]: a listener's
/// [`ServicePortName`] finds the [`ServicePortMetrics`] holding the same
/// labels, without a copy of the name as the key.
trait PortKey {
    /// Namespace, service, port name, protocol.
    fn parts(&self) -> (&str, &str, &str, Protocol);
}

impl PortKey for ServicePortName {
    fn parts(&self) -> (&str, &str, &str, Protocol) {
        (
            &self.service.namespace,
            &self.service.name,
            &self.port,
            self.protocol,
        )
    }
}

impl PortKey for ServicePortMetrics {
    fn parts(&self) -> (&str, &str, &str, Protocol) {
        self.labels.parts()
    }
}

impl PartialEq for dyn PortKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn PortKey + '_ {}

impl PartialOrd for dyn PortKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn PortKey + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

/// A Service port held by at least one listener, ordered by its labels.
#[derive(Debug)]
struct Held(Arc<ServicePortMetrics>);

impl<'a> Borrow<dyn PortKey + 'a> for Held {
    fn borrow(&self) -> &(dyn PortKey + 'a) {
        &*self.0
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0.labels.parts() == other.0.labels.parts()
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.labels.parts().cmp(&other.0.labels.parts())
    }
}

/// The Service ports held by listeners, and how many listeners hold each
/// (a closing listener and a new one of the same Service port can
/// overlap): where a listener gets its port's [`ServicePortMetrics`], and
/// the collector of the `kubeuproxy_*` per-port families that the
/// process's registry renders.
#[derive(Debug)]
pub struct PortSeries {
    /// `--metrics-per-endpoint`: series labelled by endpoint as well.
    per_endpoint: bool,
    held: Mutex<BTreeMap<Held, usize>>,
}

impl PortSeries {
    /// No Service port held yet. `per_endpoint`: `--metrics-per-endpoint`.
    pub fn new(per_endpoint: bool) -> Self {
        PortSeries {
            per_endpoint,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, BTreeMap<Held, usize>> {
        // Only short, non-panicking sections hold it.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metrics of one Service port, for its listener. Call
    /// [`PortSeries::release_service_port`] when the listener closes.
    pub fn service_port(&self, name: &ServicePortName) -> Arc<ServicePortMetrics> {
        let mut held = self.held();
        let key = name as &dyn PortKey;
        if let Some((port, _)) = held.get_key_value(key) {
            let port = Arc::clone(&port.0);
            if let Some(listeners) = held.get_mut(key) {
                *listeners += 1;
            }
            return port;
        }
        let port = Arc::new(ServicePortMetrics::new(
            PortLabels::of(name),
            self.per_endpoint,
        ));
        held.insert(Held(Arc::clone(&port)), 1);
        port
    }

    /// A listener of `name` closed: when it was the last one, the port's
    /// series are no longer rendered (connections still open keep
    /// counting into a [`ServicePortMetrics`] nobody renders).
    pub fn release_service_port(&self, name: &ServicePortName) {
        let mut held = self.held();
        let Some(listeners) = held.get_mut(name as &dyn PortKey) else {
            return;
        };
        *listeners = listeners.saturating_sub(1);
        if *listeners == 0 {
            held.remove(name as &dyn PortKey);
        }
    }

    /// Open connections of a Service port now, if it has a listener.
    pub fn active_connections(&self, name: &ServicePortName) -> Option<i64> {
        self.held()
            .get_key_value(name as &dyn PortKey)
            .map(|(port, _)| port.0.active())
    }

    /// The Prometheus text of these series alone, as the process's
    /// registry renders them (unit tests of the data path, which do not
    /// depend on the registry).
    #[cfg(test)]
    pub(crate) fn render(self: &Arc<Self>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing into a String");
        out
    }
}

/// Help texts of the per-Service-port families. The registry appends a
/// full stop to those of the metrics registered with it; a collector
/// writes its own as they are.
mod help {
    pub const PIPES_IN_USE: &str = "Splice pipes held by bulk relay directions now (process-wide; at most --splice-pipes-max).";
    pub const PIPES_MAX: &str = "The cap on splice pipes open at once (--splice-pipes-max).";
    pub const PIPE_FALLBACKS: &str = "Times a bulk relay direction got no splice pipe (the cap was reached, or the kernel refused one) and copied instead.";
    pub const CONNTRACK_FLUSHED: &str = "Conntrack entries deleted because they still sent UDP clients to a retired listener's proxy port.";
    pub const CONNTRACK_FLUSH_ERRORS: &str = "Flushes of a retired UDP listener's conntrack entries that failed (a dump or a deletion the kernel refused).";
    pub const ACCEPTED: &str = "Client connections accepted by a Service port's listener.";
    pub const ACTIVE: &str = "Client connections open now (connecting or relaying).";
    pub const FAILED: &str =
        "Client connections reset without reaching an endpoint, by the reason of the last attempt.";
    pub const BYTES: &str = "Bytes relayed, by direction (to_endpoint, to_client), counted as they move (at least once a second while a connection carries traffic), whichever way the connection ends.";
    pub const CONNECT_DURATION: &str =
        "Time to establish the connection to the endpoint (successful attempts).";
    pub const RETRIES: &str =
        "Connect attempts after the first one of a connection (failover to another endpoint).";
    pub const CLIENT_IP_PRESERVED: &str = "Connections and UDP flows to endpoints on this node opened from the client's own address (preserve-client-ip).";
    pub const CLIENT_IP_FALLBACKS: &str = "Connections and UDP flows that should have come from the client's address and came from the node's address instead (the address was taken on the node, or refused).";
    pub const UDP_ACTIVE: &str = "UDP flows (client address and port) open now.";
    pub const UDP_EXPIRED: &str = "UDP flows closed after their idle timeout.";
    pub const UDP_REFUSED: &str = "Datagrams of new UDP clients dropped without a flow, by the cap that was reached (max_flows: the Service port's table; max_flows_total: the process's budget).";
    pub const AFFINITY_CLIENTS: &str = "Client IPs remembered for sessionAffinity: ClientIP (refreshed at each sweep, at least every 10 s).";
    pub const ENDPOINT_CONNECTIONS: &str =
        "Connections established to each endpoint (--metrics-per-endpoint).";
    pub const ENDPOINT_FAILURES: &str =
        "Failed connect attempts to each endpoint (--metrics-per-endpoint).";
}

/// One sample of a per-port family: its value as a counter or a gauge.
enum Sample {
    Counter(u64),
    Gauge(i64),
}

fn counter(a: &AtomicU64) -> Sample {
    Sample::Counter(a.load(RELAXED))
}

fn gauge(a: &AtomicI64) -> Sample {
    Sample::Gauge(a.load(RELAXED))
}

/// Writes one family: its descriptor, then a sample per Service port, or
/// per Service port and extra label value (`series` gives them).
fn encode_family<'p>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (SeriesLabels<'p>, Sample)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        // As the registry does for an empty family: no descriptor either.
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, sample) in series {
        let encoder = family.encode_family(&labels)?;
        match sample {
            Sample::Counter(v) => ConstCounter::new(v).encode(encoder)?,
            Sample::Gauge(v) => ConstGauge::new(v).encode(encoder)?,
        }
    }
    Ok(())
}

impl Collector for PortSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A snapshot, so that listeners opening and closing do not wait for
        // the scrape; a port released meanwhile is rendered one last time.
        let ports: Vec<Arc<ServicePortMetrics>> =
            self.held().keys().map(|h| Arc::clone(&h.0)).collect();
        let e = &mut encoder;
        // The process's splice pipes (relay/pipe.rs): not per Service port.
        for (name, help, sample) in [
            (
                "kubeuproxy_splice_pipes_in_use",
                help::PIPES_IN_USE,
                Sample::Gauge(i64::try_from(SPLICE_PIPES.in_use()).unwrap_or(i64::MAX)),
            ),
            (
                "kubeuproxy_splice_pipes_max",
                help::PIPES_MAX,
                Sample::Gauge(i64::try_from(SPLICE_PIPES.max()).unwrap_or(i64::MAX)),
            ),
            (
                "kubeuproxy_splice_pipe_fallbacks",
                help::PIPE_FALLBACKS,
                Sample::Counter(SPLICE_PIPES.fallbacks()),
            ),
            // The conntrack flushes of retired UDP listeners (conntrack.rs).
            (
                "kubeuproxy_conntrack_flushed",
                help::CONNTRACK_FLUSHED,
                Sample::Counter(CONNTRACK.flushed()),
            ),
            (
                "kubeuproxy_conntrack_flush_errors",
                help::CONNTRACK_FLUSH_ERRORS,
                Sample::Counter(CONNTRACK.errors()),
            ),
            // preserve-client-ip (connect.rs): not per Service port.
            (
                "kubeuproxy_client_ip_preserved",
                help::CLIENT_IP_PRESERVED,
                Sample::Counter(CLIENT_IP_PRESERVED.load(RELAXED)),
            ),
            (
                "kubeuproxy_preserve_client_ip_fallbacks",
                help::CLIENT_IP_FALLBACKS,
                Sample::Counter(CLIENT_IP_FALLBACKS.load(RELAXED)),
            ),
        ] {
            let metric_type = match sample {
                Sample::Counter(_) => MetricType::Counter,
                Sample::Gauge(_) => MetricType::Gauge,
            };
            let metric = e.encode_descriptor(name, help, None, metric_type)?;
            match sample {
                Sample::Counter(v) => ConstCounter::new(v).encode(metric)?,
                Sample::Gauge(v) => ConstGauge::new(v).encode(metric)?,
            }
        }
        let per_port = |value: fn(&ServicePortMetrics) -> Sample| {
            ports.iter().map(move |p| {
                (
                    SeriesLabels {
                        port: &p.labels,
                        extra: None,
                    },
                    value(p),
                )
            })
        };

        encode_family(
            e,
            "kubeuproxy_connections_accepted",
            help::ACCEPTED,
            MetricType::Counter,
            per_port(|p| counter(&p.accepted)),
        )?;
        encode_family(
            e,
            "kubeuproxy_connections_active",
            help::ACTIVE,
            MetricType::Gauge,
            per_port(|p| gauge(&p.active)),
        )?;
        encode_family(
            e,
            "kubeuproxy_connections_failed",
            help::FAILED,
            MetricType::Counter,
            ports.iter().flat_map(|p| {
                FailReason::ALL.iter().map(move |r| {
                    (
                        SeriesLabels {
                            port: &p.labels,
                            extra: Some(("reason", r.as_str())),
                        },
                        counter(&p.failed[r.index()]),
                    )
                })
            }),
        )?;
        encode_family(
            e,
            "kubeuproxy_relayed_bytes",
            help::BYTES,
            MetricType::Counter,
            ports.iter().flat_map(|p| {
                [
                    ("to_endpoint", Way::ToEndpoint),
                    ("to_client", Way::ToClient),
                ]
                .map(|(direction, way)| {
                    (
                        SeriesLabels {
                            port: &p.labels,
                            extra: Some(("direction", direction)),
                        },
                        Sample::Counter(p.bytes.get(way)),
                    )
                })
            }),
        )?;
        if !ports.is_empty() {
            let mut family = e.encode_descriptor(
                "kubeuproxy_endpoint_connect_duration_seconds",
                help::CONNECT_DURATION,
                None,
                MetricType::Histogram,
            )?;
            for p in &ports {
                let (sum, count, buckets) = p.connect_duration.snapshot();
                family
                    .encode_family(&SeriesLabels {
                        port: &p.labels,
                        extra: None,
                    })?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        encode_family(
            e,
            "kubeuproxy_connect_retries",
            help::RETRIES,
            MetricType::Counter,
            per_port(|p| counter(&p.retries)),
        )?;
        encode_family(
            e,
            "kubeuproxy_udp_flows_active",
            help::UDP_ACTIVE,
            MetricType::Gauge,
            per_port(|p| gauge(&p.udp_active)),
        )?;
        encode_family(
            e,
            "kubeuproxy_udp_flows_expired",
            help::UDP_EXPIRED,
            MetricType::Counter,
            per_port(|p| counter(&p.udp_expired)),
        )?;
        encode_family(
            e,
            "kubeuproxy_udp_flows_refused",
            help::UDP_REFUSED,
            MetricType::Counter,
            ports.iter().flat_map(|p| {
                UdpRefusal::ALL.iter().map(move |r| {
                    (
                        SeriesLabels {
                            port: &p.labels,
                            extra: Some(("reason", r.as_str())),
                        },
                        counter(&p.udp_refused[*r as usize]),
                    )
                })
            }),
        )?;
        encode_family(
            e,
            "kubeuproxy_session_affinity_clients",
            help::AFFINITY_CLIENTS,
            MetricType::Gauge,
            per_port(|p| gauge(&p.affinity_clients)),
        )?;

        encode_http(e, &ports)?;

        if self.per_endpoint {
            // (port, endpoint as text, connections, failures), sorted.
            let endpoints: Vec<(&PortLabels, String, EndpointCounts)> = ports
                .iter()
                .flat_map(|p| {
                    p.endpoint_counts()
                        .into_iter()
                        .map(|(ep, counts)| (&p.labels, ep.to_string(), counts))
                })
                .collect();
            // A series exists once its endpoint had one of its events, as
            // when a family created it at the first increment.
            let family = |pick: fn(&EndpointCounts) -> u64| {
                endpoints
                    .iter()
                    .filter(move |(_, _, c)| pick(c) > 0)
                    .map(move |(port, ep, c)| {
                        (
                            SeriesLabels {
                                port,
                                extra: Some(("endpoint", ep.as_str())),
                            },
                            Sample::Counter(pick(c)),
                        )
                    })
            };
            encode_family(
                e,
                "kubeuproxy_endpoint_connections",
                help::ENDPOINT_CONNECTIONS,
                MetricType::Counter,
                family(|c| c.connections),
            )?;
            encode_family(
                e,
                "kubeuproxy_endpoint_connect_failures",
                help::ENDPOINT_FAILURES,
                MetricType::Counter,
                family(|c| c.failures),
            )?;
        }
        Ok(())
    }
}

/// With `--metrics-per-endpoint`: what one endpoint of a Service port saw.
#[derive(Clone, Copy, Debug, Default)]
struct EndpointCounts {
    connections: u64,
    failures: u64,
}

/// The metrics of one Service port, shared by its listeners and resolved
/// once when one opens: the data path only touches these atomics, never a
/// label map — except for the per-endpoint counts, looked up per
/// connection, and only with `--metrics-per-endpoint`.
pub struct ServicePortMetrics {
    labels: PortLabels,
    accepted: AtomicU64,
    active: AtomicI64,
    /// Indexed by [`FailReason`].
    failed: [AtomicU64; 6],
    /// Relayed bytes, counted into by each flow as bytes move (the relay
    /// owns the type: it counts, this module renders).
    bytes: RelayedBytes,
    connect_duration: ConnectHistogram,
    retries: AtomicU64,
    udp_active: AtomicI64,
    udp_expired: AtomicU64,
    /// Indexed by [`UdpRefusal`].
    udp_refused: [AtomicU64; 2],
    affinity_clients: AtomicI64,
    /// Request mode's counters, from the port's first request on (a
    /// pointer's room before: most ports are never in request mode).
    http: once_cell::race::OnceBox<http::HttpMetrics>,
    /// With `--metrics-per-endpoint`: the endpoints seen and their counts
    /// (a pointer's room without it).
    per_endpoint: Option<Box<Mutex<BTreeMap<SocketAddr, EndpointCounts>>>>,
}

impl std::fmt::Debug for ServicePortMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePortMetrics")
            .field("labels", &self.labels.parts())
            .finish_non_exhaustive()
    }
}

impl ServicePortMetrics {
    fn new(labels: PortLabels, per_endpoint: bool) -> Self {
        ServicePortMetrics {
            labels,
            accepted: AtomicU64::new(0),
            active: AtomicI64::new(0),
            failed: Default::default(),
            bytes: RelayedBytes::default(),
            connect_duration: ConnectHistogram::default(),
            retries: AtomicU64::new(0),
            udp_active: AtomicI64::new(0),
            udp_expired: AtomicU64::new(0),
            udp_refused: Default::default(),
            affinity_clients: AtomicI64::new(0),
            http: once_cell::race::OnceBox::new(),
            per_endpoint: per_endpoint.then(|| Box::new(Mutex::new(BTreeMap::new()))),
        }
    }

    fn per_endpoint(&self, endpoint: SocketAddr, count: impl FnOnce(&mut EndpointCounts)) {
        if let Some(endpoints) = &self.per_endpoint {
            let mut endpoints = endpoints.lock().unwrap_or_else(|e| e.into_inner());
            count(endpoints.entry(endpoint).or_default());
        }
    }

    /// The per-endpoint counts, sorted by endpoint (none without
    /// `--metrics-per-endpoint`).
    fn endpoint_counts(&self) -> Vec<(SocketAddr, EndpointCounts)> {
        match &self.per_endpoint {
            Some(endpoints) => endpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(ep, c)| (*ep, *c))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Request mode's counters of this port (allocated on first use).
    pub fn http(&self) -> &http::HttpMetrics {
        self.http.get_or_init(Box::default)
    }

    /// The listener accepted a connection.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, RELAXED);
    }

    /// A connection is open until the guard drops.
    pub fn open(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, RELAXED);
        ActiveGuard(&self.active)
    }

    /// The connection to `endpoint` was established in `took`.
    pub fn connected(&self, endpoint: SocketAddr, took: Duration) {
        self.connect_duration.observe(took.as_secs_f64());
        self.per_endpoint(endpoint, |c| c.connections = c.connections.wrapping_add(1));
    }

    /// A connect attempt to `endpoint` failed (another may follow).
    pub fn attempt_failed(&self, endpoint: SocketAddr) {
        self.per_endpoint(endpoint, |c| c.failures = c.failures.wrapping_add(1));
    }

    /// Another attempt, on another endpoint, follows a failed one.
    pub fn retry(&self) {
        self.retries.fetch_add(1, RELAXED);
    }

    /// A connection or UDP flow to an endpoint came from the client's own
    /// address (`preserved`), or from the node's because the client's could not
    /// be taken. Counted for the process, not per Service port: the
    /// causes of a fallback (a capability, ports taken on the node) are
    /// the node's, and 16 bytes more per Service port is 160 kB at
    /// 10 000 of them.
    pub fn client_ip(&self, preserved: bool) {
        if preserved {
            CLIENT_IP_PRESERVED.fetch_add(1, RELAXED);
        } else {
            CLIENT_IP_FALLBACKS.fetch_add(1, RELAXED);
        }
    }

    /// The client was reset without reaching an endpoint.
    pub fn failed(&self, reason: FailReason) {
        self.failed[reason.index()].fetch_add(1, RELAXED);
    }

    /// The relayed-bytes counters a flow of this port counts into while
    /// it moves bytes (see `relay::relay`).
    pub fn relayed_bytes(&self) -> &RelayedBytes {
        &self.bytes
    }

    /// UDP (hook for the UDP data path): a flow for a new client address
    /// opened; the guard counts it as active until dropped.
    pub fn udp_flow_opened(&self) -> ActiveGuard<'_> {
        self.udp_active.fetch_add(1, RELAXED);
        ActiveGuard(&self.udp_active)
    }

    /// UDP: a flow closed because it was idle for its timeout (drop its
    /// [`ActiveGuard`] too).
    pub fn udp_flow_expired(&self) {
        self.udp_expired.fetch_add(1, RELAXED);
    }

    /// UDP: `n` flows closed for being idle for the timeout.
    pub fn udp_flows_expired(&self, n: usize) {
        self.udp_expired.fetch_add(n as u64, RELAXED);
    }

    /// UDP: a new client's datagram was dropped without a flow.
    pub fn udp_flow_refused(&self, reason: UdpRefusal) {
        self.udp_refused[reason as usize].fetch_add(1, RELAXED);
    }

    /// Connections open now.
    pub fn active(&self) -> i64 {
        self.active.load(RELAXED)
    }
}

/// One listener's view of its Service port's series. A Service port can
/// have two listeners (one per family, or one per traffic policy) sharing
/// one series: each reports its own flow table's and affinity table's size,
/// and the gauge is their sum. A listener adds the change since its last
/// report (a store would overwrite the other listener's part), and takes
/// its part back when it goes.
#[derive(Debug)]
pub struct ListenerMetrics {
    port: Arc<ServicePortMetrics>,
    udp_flows: AtomicI64,
    affinity_clients: AtomicI64,
}

impl ListenerMetrics {
    pub fn new(port: Arc<ServicePortMetrics>) -> Self {
        ListenerMetrics {
            port,
            udp_flows: AtomicI64::new(0),
            affinity_clients: AtomicI64::new(0),
        }
    }

    /// UDP: this listener's flow table now holds `n` flows.
    pub fn udp_flows(&self, n: usize) {
        share(&self.port.udp_active, &self.udp_flows, n);
    }

    /// Session affinity: this listener's balancer remembers `n` client IPs.
    pub fn affinity_clients(&self, n: usize) {
        share(&self.port.affinity_clients, &self.affinity_clients, n);
    }
}

/// Sets this listener's part (`mine`) of `gauge` to `n`.
fn share(gauge: &AtomicI64, mine: &AtomicI64, n: usize) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let before = mine.swap(n, RELAXED);
    gauge.fetch_add(n.wrapping_sub(before), RELAXED);
}

impl std::ops::Deref for ListenerMetrics {
    type Target = ServicePortMetrics;
    fn deref(&self) -> &ServicePortMetrics {
        &self.port
    }
}

impl Drop for ListenerMetrics {
    fn drop(&mut self) {
        self.udp_flows(0);
        self.affinity_clients(0);
    }
}

/// Decrements an "open now" gauge when dropped, whichever way the
/// connection or flow ends.
#[must_use = "the gauge goes down when the guard drops"]
pub struct ActiveGuard<'a>(&'a AtomicI64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, RELAXED);
    }
}

#[cfg(test)]
mod tests;

// Request mode's families (ports that served a request).

mod http_help {
    pub const REQUESTS: &str = "HTTP requests served in request mode, by response class (code) and, for gRPC, grpc-status.";
    pub const DURATION: &str =
        "Time from a request's arrival to the endpoint's response headers (request mode).";
    pub const RETRIES: &str = "Requests sent again to another endpoint, by reason; only requests that cannot have reached the first.";
    pub const IN_FLIGHT: &str = "HTTP requests being served now (request mode).";
    pub const UPSTREAM: &str =
        "Connections open from the request-mode pool to each endpoint (HTTP/1.1 or h2).";
}

/// Writes the request-mode families of the ports that have served one.
fn encode_http(
    encoder: &mut DescriptorEncoder,
    ports: &[std::sync::Arc<ServicePortMetrics>],
) -> Result<(), std::fmt::Error> {
    let http: Vec<(&PortLabels, &http::HttpMetrics)> = ports
        .iter()
        .filter_map(|p| p.http.get().map(|h| (&p.labels, h)))
        .collect();
    if http.is_empty() {
        return Ok(());
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_requests",
            http_help::REQUESTS,
            None,
            MetricType::Counter,
        )?;
        for (labels, h) in &http {
            for ((class, grpc), n) in h.requests() {
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
            http_help::DURATION,
            None,
            MetricType::Histogram,
        )?;
        for (labels, h) in &http {
            let (sum, count, buckets) = h.duration().snapshot();
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
            http_help::RETRIES,
            None,
            MetricType::Counter,
        )?;
        for (labels, h) in &http {
            for r in http::RetryReason::ALL {
                ConstCounter::new(h.retries(r)).encode(family.encode_family(&SeriesLabels {
                    port: labels,
                    extra: Some(("reason", r.as_str())),
                })?)?;
            }
        }
    }
    {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_requests_in_flight",
            http_help::IN_FLIGHT,
            None,
            MetricType::Gauge,
        )?;
        for (labels, h) in &http {
            ConstGauge::new(h.in_flight()).encode(family.encode_family(&SeriesLabels {
                port: labels,
                extra: None,
            })?)?;
        }
    }
    let upstream: Vec<(&PortLabels, String, i64)> = http
        .iter()
        .flat_map(|(labels, h)| {
            h.upstream_connections()
                .into_iter()
                .map(|(ep, n)| (*labels, ep.to_string(), n))
                .collect::<Vec<_>>()
        })
        .collect();
    if !upstream.is_empty() {
        let mut family = encoder.encode_descriptor(
            "kubeuproxy_http_upstream_connections",
            http_help::UPSTREAM,
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
