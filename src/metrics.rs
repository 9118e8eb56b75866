//! Prometheus metrics: kube-proxy's own names where one exists, and the
//! proxy's per-Service-port counters.
//!
//! Two audiences read these. Dashboards and alerts written for kube-proxy
//! find its metric names (`kubeproxy_sync_proxy_rules_*`,
//! `kubeproxy_network_programming_duration_seconds`, …) with the same
//! meaning and labels; what only a userspace proxy can tell (connections
//! accepted, failed, bytes relayed, connect latency) is under
//! `kubeuproxy_*`, labelled by Service port: `namespace`, `service`,
//! `port_name`, `protocol` — a bounded set, never per client or connection.
//! Per-endpoint series exist only with `--metrics-per-endpoint`.
//!
//! The data path never looks a metric up by label: each listener gets its
//! Service port's [`ServicePortMetrics`], one allocation of plain atomics
//! (the counters, the gauges, the connect-duration buckets) and of the
//! port's label values, resolved once when the listener opens; a
//! connection only touches those atomics. The `kubeuproxy_*` per-port
//! series are not registered one by one: a [`Collector`] walks the Service
//! ports held by listeners at each scrape, sorted by namespace, service,
//! port name and protocol, and writes their fifteen series from the
//! atomics. This is for memory: registered in `Family` maps, each series
//! was its own `Arc` (the histogram a locked `Vec`) keyed by the port's
//! labels in a map per family, 2 340 bytes in 23 allocations per Service
//! port (23 MB at 10 000, counted by an allocator around 10 000
//! [`Metrics::service_port`] calls); now 370 bytes in about 2: the `Arc`
//! of atomics (312 bytes), the label string, and a share of a node of the
//! B-tree of held ports. A Service port's series go away when its last
//! listener closes, so the series follow the Services that exist
//! (connections still open keep counting into a `ServicePortMetrics`
//! nobody renders).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{Protocol, ServicePortName};
use crate::proxy::relay::Transferred;

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// kube-proxy's label for the IP family of its sync metrics. kube-proxy
/// runs one proxier per family; here one sync writes the `ip` and `ip6`
/// tables together, so its metrics carry the primary family's label.
const IP_FAMILY: &str = "IPv4";

/// Relaxed everywhere: each atomic is a counter of its own, and a scrape
/// needs no order between them.
const RELAXED: Ordering = Ordering::Relaxed;

/// Finite buckets of the endpoint connect latency.
const CONNECT_BUCKETS: usize = 16;

/// Their upper bounds: 100 µs to about 3.3 s (the longest connect timeout
/// is 2 s), `0.0001 * 2^i` — what `exponential_buckets(0.0001, 2.0, 16)`
/// gives. An observation counts in the first bucket whose bound is at
/// least its value, or in `+Inf` after them.
const CONNECT_BOUNDS: [f64; CONNECT_BUCKETS] = {
    let mut bounds = [0.0; CONNECT_BUCKETS];
    let mut i = 0;
    while i < CONNECT_BUCKETS {
        bounds[i] = 0.0001 * (1u32 << i) as f64;
        i += 1;
    }
    bounds
};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    traffic_policy: &'static str,
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

/// Every metric of the process, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// `--metrics-per-endpoint`: series labelled by endpoint as well.
    per_endpoint: bool,
    /// The Service ports held by listeners, which the registry's collector
    /// renders.
    ports: Arc<PortSeries>,

    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    sync_last_timestamp: Gauge<f64, AtomicU64>,
    sync_last_queued_timestamp: Gauge<f64, AtomicU64>,
    service_changes_pending: Gauge,
    endpoint_changes_pending: Gauge,
    network_programming: Histogram,
    service_changes: Counter,
    endpoint_changes: Counter,
    sync_failures: Counter,
    drift_repairs: Counter,
    healthz: Family<CodeLabels, Counter>,
    livez: Family<CodeLabels, Counter>,
    open_fds: Gauge,
    max_fds: Gauge,
    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`, by
    /// `traffic_policy` (`internal`, `external`).
    no_local_endpoints: Family<PolicyLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("per_endpoint", &self.per_endpoint)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(false)
    }
}

impl Metrics {
    /// Registers every family. `per_endpoint`: `--metrics-per-endpoint`.
    pub fn new(per_endpoint: bool) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let sync_full_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let sync_partial_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let sync_last_timestamp = Gauge::<f64, AtomicU64>::default();
        // kube-proxy's buckets: 0.25 s, 0.5 s, 1..59 s, 60..115 s, 2..5 min.
        let network_programming = Histogram::new(
            [0.25, 0.5]
                .into_iter()
                .chain((1..=59).map(f64::from))
                .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
                .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i))),
        );
        let no_local_endpoints = Family::<PolicyLabels, Gauge>::default();
        for policy in ["internal", "external"] {
            // Both series exist from the start, at 0.
            no_local_endpoints.get_or_create_owned(&PolicyLabels {
                traffic_policy: policy,
            });
        }
        let m = Metrics {
            registry: Registry::default(),
            per_endpoint,
            ports: Arc::new(PortSeries {
                per_endpoint,
                held: Mutex::new(BTreeMap::new()),
            }),
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            sync_last_timestamp,
            sync_last_queued_timestamp: Gauge::default(),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            network_programming,
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            sync_failures: Counter::default(),
            drift_repairs: Counter::default(),
            healthz: Family::default(),
            livez: Family::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            no_local_endpoints: no_local_endpoints.clone(),
        };

        // The registry writes its own metrics, then its collectors' (the
        // per-Service-port series), then its sub-registries'. These three
        // are in a sub-registry without labels so that they still follow
        // the per-port families, as when those were registered.
        {
            let tail = registry.sub_registry_with_labels(std::iter::empty());
            tail.register(
                "kubeuproxy_rules_drift_repairs",
                "Times the kernel's table was found to differ from what was applied (a flush, a firewall reload) and was written again",
                m.drift_repairs.clone(),
            );
            tail.register(
                "process_open_fds",
                "Number of open file descriptors",
                m.open_fds.clone(),
            );
            tail.register(
                "process_max_fds",
                "Maximum number of open file descriptors (RLIMIT_NOFILE soft limit)",
                m.max_fds.clone(),
            );
        }

        // kube-proxy's names, meanings and labels.
        {
            let family = registry.sub_registry_with_label(("ip_family".into(), IP_FAMILY.into()));
            family.register(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds: one sync that had work to do (reconcile and nft transaction)",
                m.sync_duration.clone(),
            );
            family.register(
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs: the table written whole (start, after drift)",
                m.sync_full_duration.clone(),
            );
            family.register(
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs: only changed elements sent",
                m.sync_partial_duration.clone(),
            );
            family.register(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.sync_last_timestamp.clone(),
            );
            family.register(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued (a change received)",
                m.sync_last_queued_timestamp.clone(),
            );
            family.register(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds: from the reconciler receiving a change to the sync that applied it",
                m.network_programming.clone(),
            );
            family.register(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                m.sync_failures.clone(),
            );
            family.register(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of Service ports with a Local traffic policy and no local endpoints (their traffic of that kind is dropped)",
                no_local_endpoints,
            );
        }
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes (Services whose endpoints changed)",
            m.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes (Services changed since the last successful sync)",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes (Services whose endpoints changed since the last successful sync)",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );

        // The userspace proxy's own, per Service port.
        registry.register_collector(Box::new(Arc::clone(&m.ports)));
        Metrics { registry, ..m }
    }

    /// The metrics of one Service port, for its listener. Call
    /// [`Metrics::release_service_port`] when the listener closes.
    pub fn service_port(&self, name: &ServicePortName) -> Arc<ServicePortMetrics> {
        let mut held = self.ports.held();
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
        let mut held = self.ports.held();
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
        self.ports
            .held()
            .get_key_value(name as &dyn PortKey)
            .map(|(port, _)| port.0.active())
    }

    /// A sync that had something to do took `took`.
    pub fn sync_duration(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
    }

    /// A sync that wrote the table whole (`full`) or sent only changed
    /// elements took `took`.
    pub fn sync_kind_duration(&self, full: bool, took: Duration) {
        let h = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        h.observe(took.as_secs_f64());
    }

    /// A change was received: a sync is queued as of now.
    pub fn queued_now(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.sync_last_queued_timestamp.set(now.as_secs_f64());
    }

    /// Services with changes received and not yet applied: `services`
    /// changed as Services, `endpoints` in their endpoints.
    pub fn changes_pending(&self, services: usize, endpoints: usize) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.service_changes_pending.set(n(services));
        self.endpoint_changes_pending.set(n(endpoints));
    }

    /// The rules are in sync with the desired state as of now.
    pub fn synced_now(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.sync_last_timestamp.set(now.as_secs_f64());
    }

    /// A change received `latency` ago is now applied.
    pub fn network_programmed(&self, latency: Duration) {
        self.network_programming.observe(latency.as_secs_f64());
    }

    pub fn service_changes(&self, n: u64) {
        self.service_changes.inc_by(n);
    }

    pub fn endpoint_changes(&self, n: u64) {
        self.endpoint_changes.inc_by(n);
    }

    /// nft refused a sync.
    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    /// The drift check found the kernel's table changed behind our back.
    /// How many Service ports drop their ClusterIP (`internal`) and their
    /// external traffic for want of a local endpoint, now.
    pub fn no_local_endpoints(&self, internal: usize, external: usize) {
        for (policy, n) in [("internal", internal), ("external", external)] {
            self.no_local_endpoints
                .get_or_create(&PolicyLabels {
                    traffic_policy: policy,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    /// A `/healthz` (`livez = false`) or `/livez` answer with this status.
    pub fn health_answered(&self, livez: bool, code: u16) {
        let code = if code == 200 { "200" } else { "503" };
        let family = if livez { &self.livez } else { &self.healthz };
        family.get_or_create(&CodeLabels { code }).inc();
    }

    /// The Prometheus text exposition of every metric, with the process's
    /// file descriptors counted now.
    pub fn render(&self) -> String {
        if let Some(open) = open_fds() {
            self.open_fds.set(open);
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Open file descriptors of this process (entries of /proc/self/fd, less
/// the one the listing itself holds).
fn open_fds() -> Option<i64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    i64::try_from(n.saturating_sub(1)).ok()
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
/// overlap). The registry's collector of the `kubeuproxy_*` per-port
/// families.
#[derive(Debug)]
struct PortSeries {
    per_endpoint: bool,
    held: Mutex<BTreeMap<Held, usize>>,
}

impl PortSeries {
    fn held(&self) -> MutexGuard<'_, BTreeMap<Held, usize>> {
        // Only short, non-panicking sections hold it.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Help texts of the per-Service-port families. The registry appends a
/// full stop to those of the metrics registered with it; a collector
/// writes its own as they are.
mod help {
    pub const ACCEPTED: &str = "Client connections accepted by a Service port's listener.";
    pub const ACTIVE: &str = "Client connections open now (connecting or relaying).";
    pub const FAILED: &str =
        "Client connections reset without reaching an endpoint, by the reason of the last attempt.";
    pub const BYTES: &str = "Bytes relayed, by direction (to_endpoint, to_client), counted when a connection ends without error.";
    pub const CONNECT_DURATION: &str =
        "Time to establish the connection to the endpoint (successful attempts).";
    pub const RETRIES: &str =
        "Connect attempts after the first one of a connection (failover to another endpoint).";
    pub const UDP_ACTIVE: &str = "UDP flows (client address and port) open now.";
    pub const UDP_EXPIRED: &str = "UDP flows closed after their idle timeout.";
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
                [("to_endpoint", &p.to_endpoint), ("to_client", &p.to_client)].map(
                    |(direction, bytes)| {
                        (
                            SeriesLabels {
                                port: &p.labels,
                                extra: Some(("direction", direction)),
                            },
                            counter(bytes),
                        )
                    },
                )
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
            "kubeuproxy_session_affinity_clients",
            help::AFFINITY_CLIENTS,
            MetricType::Gauge,
            per_port(|p| gauge(&p.affinity_clients)),
        )?;

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

/// The connect latency of a Service port: a count per bucket of
/// [`CONNECT_BOUNDS`] and one for `+Inf` (not cumulative: the encoder adds
/// them up), and the sum of the observed seconds as `f64` bits. The
/// count is the sum of the buckets.
#[derive(Debug, Default)]
struct ConnectHistogram {
    buckets: [AtomicU64; CONNECT_BUCKETS + 1],
    sum: AtomicU64,
}

impl ConnectHistogram {
    fn observe(&self, seconds: f64) {
        // The first bound at least `seconds`; past the last one, +Inf.
        let i = CONNECT_BOUNDS.partition_point(|bound| *bound < seconds);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, RELAXED);
        }
        // The closure always answers, so the update cannot fail.
        let _ = self.sum.fetch_update(RELAXED, RELAXED, |bits| {
            Some((f64::from_bits(bits) + seconds).to_bits())
        });
    }

    /// Sum, count and the buckets as `(upper bound, count)`.
    fn snapshot(&self) -> (f64, u64, [(f64, u64); CONNECT_BUCKETS + 1]) {
        let mut buckets = [(f64::INFINITY, 0); CONNECT_BUCKETS + 1];
        let mut count = 0u64;
        for (i, (bound, n)) in buckets.iter_mut().enumerate() {
            if let Some(b) = CONNECT_BOUNDS.get(i) {
                *bound = *b;
            }
            *n = self.buckets[i].load(RELAXED);
            count = count.wrapping_add(*n);
        }
        (f64::from_bits(self.sum.load(RELAXED)), count, buckets)
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
    to_endpoint: AtomicU64,
    to_client: AtomicU64,
    connect_duration: ConnectHistogram,
    retries: AtomicU64,
    udp_active: AtomicI64,
    udp_expired: AtomicU64,
    affinity_clients: AtomicI64,
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
            to_endpoint: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            connect_duration: ConnectHistogram::default(),
            retries: AtomicU64::new(0),
            udp_active: AtomicI64::new(0),
            udp_expired: AtomicU64::new(0),
            affinity_clients: AtomicI64::new(0),
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

    /// The client was reset without reaching an endpoint.
    pub fn failed(&self, reason: FailReason) {
        self.failed[reason.index()].fetch_add(1, RELAXED);
    }

    /// A relay ended without error, having moved these bytes.
    pub fn relayed(&self, t: &Transferred) {
        self.to_endpoint.fetch_add(t.client_to_upstream, RELAXED);
        self.to_client.fetch_add(t.upstream_to_client, RELAXED);
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

    /// UDP: the flow table now holds `n` flows.
    pub fn udp_flows(&self, n: usize) {
        self.udp_active
            .store(i64::try_from(n).unwrap_or(i64::MAX), RELAXED);
    }

    /// UDP: `n` flows closed for being idle for the timeout.
    pub fn udp_flows_expired(&self, n: usize) {
        self.udp_expired.fetch_add(n as u64, RELAXED);
    }

    /// Session affinity: the port's balancer remembers `n` client IPs.
    pub fn affinity_clients(&self, n: usize) {
        self.affinity_clients
            .store(i64::try_from(n).unwrap_or(i64::MAX), RELAXED);
    }

    /// Connections open now.
    pub fn active(&self) -> i64 {
        self.active.load(RELAXED)
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
mod tests {
    use super::*;
    use crate::model::{ObjectKey, Protocol};

    fn name(svc: &str) -> ServicePortName {
        ServicePortName {
            service: ObjectKey::new("default", svc),
            port: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .map(|l| l[series.len() + 1..].trim())
    }

    #[test]
    fn kube_proxy_names_are_rendered_with_their_labels() {
        let m = Metrics::new(false);
        m.sync_failed();
        m.service_changes(3);
        m.synced_now();
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}"
            ),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some("3")
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            Some("0")
        );
        assert!(text.contains(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 0"
        ), "{text}");
        assert!(text.contains("# TYPE kubeproxy_network_programming_duration_seconds histogram"));
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
        assert!(sample(&text, "process_open_fds").is_some());
        assert!(!text.contains("kubeuproxy_endpoint_connections"));
    }

    #[test]
    fn service_port_series_follow_their_listeners() {
        let m = Metrics::new(true);
        let web = name("web");
        let a = m.service_port(&web);
        let b = m.service_port(&web);
        a.accepted();
        b.accepted();
        a.failed(FailReason::ConnectRefused);
        let ep: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        a.connected(ep, Duration::from_millis(1));
        {
            let _open = a.open();
            assert_eq!(m.active_connections(&web), Some(1));
        }
        assert_eq!(m.active_connections(&web), Some(0));
        let labels = "namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"";
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                &format!("kubeuproxy_connections_accepted_total{{{labels}}}")
            ),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "kubeuproxy_connections_failed_total{{{labels},reason=\"connect_refused\"}}"
                )
            ),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "kubeuproxy_endpoint_connections_total{{{labels},endpoint=\"10.0.0.1:8080\"}}"
                )
            ),
            Some("1")
        );
        // One of two listeners closes: the series stay; the last one: gone.
        m.release_service_port(&web);
        assert!(m.render().contains("service=\"web\""));
        m.release_service_port(&web);
        assert!(!m.render().contains("service=\"web\""), "{}", m.render());
        assert_eq!(m.active_connections(&web), None);
    }

    #[test]
    fn connect_errors_map_to_reasons() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(
            FailReason::of(&e(io::ErrorKind::ConnectionRefused)),
            FailReason::ConnectRefused
        );
        assert_eq!(
            FailReason::of(&e(io::ErrorKind::TimedOut)),
            FailReason::ConnectTimeout
        );
        assert_eq!(
            FailReason::of(&io::Error::from_raw_os_error(
                nix::errno::Errno::EHOSTUNREACH as i32
            )),
            FailReason::Unreachable
        );
        assert_eq!(
            FailReason::of(&io::Error::from_raw_os_error(
                nix::errno::Errno::EMFILE as i32
            )),
            FailReason::LocalError
        );
    }

    #[test]
    fn connect_buckets_are_the_exponential_ones() {
        let expected: Vec<f64> = exponential_buckets(0.0001, 2.0, 16).collect();
        assert_eq!(CONNECT_BOUNDS.to_vec(), expected);
    }

    /// The cumulative `_bucket` samples of a port's connect histogram, by
    /// `le`, then `_sum` and `_count`.
    fn histogram(text: &str, labels: &str) -> (Vec<(String, u64)>, f64, u64) {
        let name = "kubeuproxy_endpoint_connect_duration_seconds";
        let prefix = format!("{name}_bucket{{{labels},le=\"");
        let buckets = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| {
                let (le, value) = rest.split_once("\"} ").unwrap();
                (le.to_string(), value.parse().unwrap())
            })
            .collect();
        let sum = sample(text, &format!("{name}_sum{{{labels}}}"))
            .unwrap()
            .parse()
            .unwrap();
        let count = sample(text, &format!("{name}_count{{{labels}}}"))
            .unwrap()
            .parse()
            .unwrap();
        (buckets, sum, count)
    }

    #[test]
    fn connect_durations_render_as_a_cumulative_histogram() {
        let m = Metrics::new(false);
        let ep: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        // On the first bound (inclusive), and past the last one.
        let web = m.service_port(&name("web"));
        web.connected(ep, Duration::from_micros(100));
        web.connected(ep, Duration::from_secs(5));
        // 1 ms (le 0.0016) and 0.5 s (le 0.8192).
        let api = m.service_port(&name("api"));
        api.connected(ep, Duration::from_millis(1));
        api.connected(ep, Duration::from_millis(500));
        let text = m.render();
        let les: Vec<String> = exponential_buckets(0.0001, 2.0, 16)
            .map(|b| {
                let mut s = format!("{b}");
                if !s.contains('.') {
                    s.push_str(".0");
                }
                s
            })
            .chain(["+Inf".to_string()])
            .collect();
        assert_eq!(les[0], "0.0001");
        assert_eq!(les[4], "0.0016");
        assert_eq!(les[13], "0.8192");
        assert_eq!(les[15], "3.2768");

        let port = |svc| {
            format!("namespace=\"default\",service=\"{svc}\",port_name=\"http\",protocol=\"TCP\"")
        };
        let (buckets, sum, count) = histogram(&text, &port("web"));
        let expected: Vec<(String, u64)> = les
            .iter()
            .enumerate()
            .map(|(i, le)| (le.clone(), if i < 16 { 1 } else { 2 }))
            .collect();
        assert_eq!(buckets, expected, "{text}");
        assert_eq!(count, 2);
        assert!((sum - 5.0001).abs() < 1e-9, "{sum}");

        let (buckets, sum, count) = histogram(&text, &port("api"));
        let expected: Vec<(String, u64)> = les
            .iter()
            .enumerate()
            .map(|(i, le)| {
                let n = match i {
                    0..4 => 0,
                    4..13 => 1,
                    _ => 2,
                };
                (le.clone(), n)
            })
            .collect();
        assert_eq!(buckets, expected, "{text}");
        assert_eq!(count, 2);
        assert!((sum - 0.501).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn a_fresh_port_renders_every_failure_reason_at_zero() {
        let m = Metrics::new(false);
        let _web = m.service_port(&name("web"));
        let text = m.render();
        let labels = "namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"";
        for reason in FailReason::ALL {
            assert_eq!(
                sample(
                    &text,
                    &format!(
                        "kubeuproxy_connections_failed_total{{{labels},reason=\"{}\"}}",
                        reason.as_str()
                    )
                ),
                Some("0"),
                "{reason:?}: {text}"
            );
        }
        assert_eq!(
            text.matches("kubeuproxy_connections_failed_total{").count(),
            6
        );
        // And the rest of the port's series, at zero too.
        for series in [
            "kubeuproxy_connections_accepted_total",
            "kubeuproxy_connections_active",
            "kubeuproxy_connect_retries_total",
            "kubeuproxy_udp_flows_active",
            "kubeuproxy_udp_flows_expired_total",
            "kubeuproxy_session_affinity_clients",
            "kubeuproxy_endpoint_connect_duration_seconds_count",
        ] {
            assert_eq!(
                sample(&text, &format!("{series}{{{labels}}}")),
                Some("0"),
                "{series}"
            );
        }
        assert_eq!(
            sample(
                &text,
                &format!("kubeuproxy_endpoint_connect_duration_seconds_sum{{{labels}}}")
            ),
            Some("0.0")
        );
    }

    #[test]
    fn service_ports_render_sorted_and_without_a_family_when_there_is_none() {
        let m = Metrics::new(true);
        assert!(!m.render().contains("kubeuproxy_connections"));
        let udp = ServicePortName {
            protocol: Protocol::Udp,
            ..name("b")
        };
        for n in [name("c"), udp.clone(), name("a"), name("b")] {
            let _ = m.service_port(&n);
        }
        let text = m.render();
        let order: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kubeuproxy_connections_accepted_total{"))
            .map(|l| &l[l.find("service=").unwrap()..l.find(" ").unwrap()])
            .collect();
        assert_eq!(
            order,
            [
                "service=\"a\",port_name=\"http\",protocol=\"TCP\"}",
                "service=\"b\",port_name=\"http\",protocol=\"TCP\"}",
                "service=\"b\",port_name=\"http\",protocol=\"UDP\"}",
                "service=\"c\",port_name=\"http\",protocol=\"TCP\"}",
            ]
        );
        // No endpoint seen yet: no per-endpoint family.
        assert!(!text.contains("kubeuproxy_endpoint_connections"), "{text}");
        assert_eq!(m.active_connections(&udp), Some(0));
        // A failure only: a series in the failures family alone.
        let b = m.service_port(&udp);
        b.attempt_failed("[fd00::1]:53".parse().unwrap());
        let text = m.render();
        assert!(!text.contains("kubeuproxy_endpoint_connections"), "{text}");
        assert!(
            text.contains(
                "kubeuproxy_endpoint_connect_failures_total{namespace=\"default\",service=\"b\",port_name=\"http\",protocol=\"UDP\",endpoint=\"[fd00::1]:53\"} 1"
            ),
            "{text}"
        );
    }

    /// The memory this module is about: one Service port's atomics and
    /// label offsets (the `Arc` adds 16 bytes, the label string its
    /// length).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_service_port_stays_small() {
        assert!(
            std::mem::size_of::<ServicePortMetrics>() <= 296,
            "{}",
            std::mem::size_of::<ServicePortMetrics>()
        );
    }
}
