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
//! The data path never looks a metric up by label: each listener gets a
//! [`ServicePortMetrics`] (an `Arc` of the handles of its label set,
//! resolved once when the listener opens), and a connection only touches
//! atomics. Label sets of a Service port go away when its last listener
//! closes, so the series follow the Services that exist.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::ServicePortName;
use crate::proxy::relay::Transferred;

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// kube-proxy's label for the IP family of its sync metrics. kube-proxy
/// runs one proxier per family; here one sync writes the `ip` and `ip6`
/// tables together, so its metrics carry the primary family's label.
const IP_FAMILY: &str = "IPv4";

/// Labels of every per-Service-port series: `namespace`, `service`,
/// `port_name` (empty for a single unnamed port) and `protocol`.
///
/// One allocation shared by the port's fifteen series (each family keys
/// its series by a clone): at 10 000 Service ports, four `String`s per
/// series were 3-4 KiB per port.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PortLabels(Arc<PortLabelValues>);

#[derive(Debug, Hash, PartialEq, Eq)]
struct PortLabelValues {
    namespace: String,
    service: String,
    port_name: String,
    protocol: &'static str,
}

impl PortLabels {
    pub fn of(name: &ServicePortName) -> Self {
        PortLabels(Arc::new(PortLabelValues {
            namespace: name.service.namespace.clone(),
            service: name.service.name.clone(),
            port_name: name.port.clone(),
            protocol: name.protocol.as_str(),
        }))
    }
}

impl EncodeLabelSet for PortLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let v = &*self.0;
        [
            ("namespace", v.namespace.as_str()),
            ("service", v.service.as_str()),
            ("port_name", v.port_name.as_str()),
            ("protocol", v.protocol),
        ]
        .encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    #[prometheus(flatten)]
    port: PortLabels,
    /// `ip:port` of the endpoint.
    endpoint: String,
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

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Endpoint connect latency: 100 µs to about 3.3 s (the longest connect
/// timeout is 2 s).
fn connect_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The per-Service-port families (shared by every [`ServicePortMetrics`]).
#[derive(Clone)]
struct PortFamilies {
    accepted: Family<PortLabels, Counter>,
    active: Family<PortLabels, Gauge>,
    failed: Family<FailedLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    connect_duration: HistogramFamily<PortLabels>,
    retries: Family<PortLabels, Counter>,
    udp_active: Family<PortLabels, Gauge>,
    udp_expired: Family<PortLabels, Counter>,
    affinity_clients: Family<PortLabels, Gauge>,
    endpoint_connections: Family<EndpointLabels, Counter>,
    endpoint_failures: Family<EndpointLabels, Counter>,
}

/// Every metric of the process, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// `--metrics-per-endpoint`: series labelled by endpoint as well.
    per_endpoint: bool,
    ports: PortFamilies,
    /// Listeners holding each Service port's label set: the set is removed
    /// when the last one closes (a closing listener and a new one of the
    /// same Service port can overlap).
    holders: Mutex<HashMap<ServicePortName, (usize, Arc<ServicePortMetrics>)>>,

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
        let ports = PortFamilies {
            accepted: Family::default(),
            active: Family::default(),
            failed: Family::default(),
            bytes: Family::default(),
            connect_duration: Family::new_with_constructor(connect_histogram),
            retries: Family::default(),
            udp_active: Family::default(),
            udp_expired: Family::default(),
            affinity_clients: Family::default(),
            endpoint_connections: Family::default(),
            endpoint_failures: Family::default(),
        };
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
            ports,
            holders: Mutex::new(HashMap::new()),
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

        // The userspace proxy's own.
        let p = &m.ports;
        registry.register(
            "kubeuproxy_connections_accepted",
            "Client connections accepted by a Service port's listener",
            p.accepted.clone(),
        );
        registry.register(
            "kubeuproxy_connections_active",
            "Client connections open now (connecting or relaying)",
            p.active.clone(),
        );
        registry.register(
            "kubeuproxy_connections_failed",
            "Client connections reset without reaching an endpoint, by the reason of the last attempt",
            p.failed.clone(),
        );
        registry.register(
            "kubeuproxy_relayed_bytes",
            "Bytes relayed, by direction (to_endpoint, to_client), counted when a connection ends without error",
            p.bytes.clone(),
        );
        registry.register(
            "kubeuproxy_endpoint_connect_duration_seconds",
            "Time to establish the connection to the endpoint (successful attempts)",
            p.connect_duration.clone(),
        );
        registry.register(
            "kubeuproxy_connect_retries",
            "Connect attempts after the first one of a connection (failover to another endpoint)",
            p.retries.clone(),
        );
        registry.register(
            "kubeuproxy_udp_flows_active",
            "UDP flows (client address and port) open now",
            p.udp_active.clone(),
        );
        registry.register(
            "kubeuproxy_udp_flows_expired",
            "UDP flows closed after their idle timeout",
            p.udp_expired.clone(),
        );
        registry.register(
            "kubeuproxy_session_affinity_clients",
            "Client IPs remembered for sessionAffinity: ClientIP (refreshed at each sweep, at least every 10 s)",
            p.affinity_clients.clone(),
        );
        if per_endpoint {
            registry.register(
                "kubeuproxy_endpoint_connections",
                "Connections established to each endpoint (--metrics-per-endpoint)",
                p.endpoint_connections.clone(),
            );
            registry.register(
                "kubeuproxy_endpoint_connect_failures",
                "Failed connect attempts to each endpoint (--metrics-per-endpoint)",
                p.endpoint_failures.clone(),
            );
        }
        registry.register(
            "kubeuproxy_rules_drift_repairs",
            "Times the kernel's table was found to differ from what was applied (a flush, a firewall reload) and was written again",
            m.drift_repairs.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            m.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors (RLIMIT_NOFILE soft limit)",
            m.max_fds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The handles of one Service port's series, for its listener. Call
    /// [`Metrics::release_service_port`] when the listener closes.
    pub fn service_port(&self, name: &ServicePortName) -> Arc<ServicePortMetrics> {
        let mut holders = self.holders();
        let entry = holders.entry(name.clone()).or_insert_with(|| {
            (
                0,
                Arc::new(ServicePortMetrics::resolve(
                    &self.ports,
                    PortLabels::of(name),
                    self.per_endpoint,
                )),
            )
        });
        entry.0 += 1;
        Arc::clone(&entry.1)
    }

    /// A listener of `name` closed: when it was the last one, the port's
    /// series are removed (connections still open keep counting into
    /// handles nobody renders).
    pub fn release_service_port(&self, name: &ServicePortName) {
        let mut holders = self.holders();
        let Some(entry) = holders.get_mut(name) else {
            return;
        };
        entry.0 = entry.0.saturating_sub(1);
        if entry.0 > 0 {
            return;
        }
        if let Some((_, port)) = holders.remove(name) {
            port.remove_series(&self.ports);
        }
    }

    /// Open connections of a Service port now, if it has a listener.
    pub fn active_connections(&self, name: &ServicePortName) -> Option<i64> {
        self.holders().get(name).map(|(_, p)| p.active.get())
    }

    fn holders(
        &self,
    ) -> MutexGuard<'_, HashMap<ServicePortName, (usize, Arc<ServicePortMetrics>)>> {
        // Only short, non-panicking sections hold it.
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
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

/// The series of one Service port, resolved once for its listener: the
/// data path only touches these handles (atomics), never a label map —
/// except for the per-endpoint series, looked up per connection, and only
/// with `--metrics-per-endpoint`.
pub struct ServicePortMetrics {
    labels: PortLabels,
    accepted: Counter,
    active: Gauge,
    /// Indexed by [`FailReason`].
    failed: [Counter; 6],
    to_endpoint: Counter,
    to_client: Counter,
    connect_duration: Histogram,
    retries: Counter,
    udp_active: Gauge,
    udp_expired: Counter,
    affinity_clients: Gauge,
    /// With `--metrics-per-endpoint`: the families, and the endpoints seen
    /// (their series are removed with the Service port's).
    per_endpoint: Option<PerEndpoint>,
}

struct PerEndpoint {
    connections: Family<EndpointLabels, Counter>,
    failures: Family<EndpointLabels, Counter>,
    seen: Mutex<HashSet<SocketAddr>>,
}

impl std::fmt::Debug for ServicePortMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePortMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl ServicePortMetrics {
    fn resolve(f: &PortFamilies, labels: PortLabels, per_endpoint: bool) -> Self {
        let failed = FailReason::ALL.map(|r| {
            f.failed.get_or_create_owned(&FailedLabels {
                port: labels.clone(),
                reason: r.as_str(),
            })
        });
        let bytes = |direction| {
            f.bytes.get_or_create_owned(&BytesLabels {
                port: labels.clone(),
                direction,
            })
        };
        ServicePortMetrics {
            accepted: f.accepted.get_or_create_owned(&labels),
            active: f.active.get_or_create_owned(&labels),
            failed,
            to_endpoint: bytes("to_endpoint"),
            to_client: bytes("to_client"),
            connect_duration: f.connect_duration.get_or_create_owned(&labels),
            retries: f.retries.get_or_create_owned(&labels),
            udp_active: f.udp_active.get_or_create_owned(&labels),
            udp_expired: f.udp_expired.get_or_create_owned(&labels),
            affinity_clients: f.affinity_clients.get_or_create_owned(&labels),
            per_endpoint: per_endpoint.then(|| PerEndpoint {
                connections: f.endpoint_connections.clone(),
                failures: f.endpoint_failures.clone(),
                seen: Mutex::new(HashSet::new()),
            }),
            labels,
        }
    }

    fn remove_series(&self, f: &PortFamilies) {
        let l = &self.labels;
        f.accepted.remove(l);
        f.active.remove(l);
        for r in FailReason::ALL {
            f.failed.remove(&FailedLabels {
                port: l.clone(),
                reason: r.as_str(),
            });
        }
        for direction in ["to_endpoint", "to_client"] {
            f.bytes.remove(&BytesLabels {
                port: l.clone(),
                direction,
            });
        }
        f.connect_duration.remove(l);
        f.retries.remove(l);
        f.udp_active.remove(l);
        f.udp_expired.remove(l);
        f.affinity_clients.remove(l);
        if let Some(pe) = &self.per_endpoint {
            let seen = std::mem::take(&mut *pe.seen.lock().unwrap_or_else(|e| e.into_inner()));
            for ep in seen {
                let key = self.endpoint_labels(ep);
                pe.connections.remove(&key);
                pe.failures.remove(&key);
            }
        }
    }

    fn endpoint_labels(&self, endpoint: SocketAddr) -> EndpointLabels {
        EndpointLabels {
            port: self.labels.clone(),
            endpoint: endpoint.to_string(),
        }
    }

    fn per_endpoint(
        &self,
        endpoint: SocketAddr,
        pick: impl Fn(&PerEndpoint) -> &Family<EndpointLabels, Counter>,
    ) {
        if let Some(pe) = &self.per_endpoint {
            pe.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(endpoint);
            pick(pe)
                .get_or_create(&self.endpoint_labels(endpoint))
                .inc();
        }
    }

    /// The listener accepted a connection.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// A connection is open until the guard drops.
    pub fn open(&self) -> ActiveGuard<'_> {
        self.active.inc();
        ActiveGuard(&self.active)
    }

    /// The connection to `endpoint` was established in `took`.
    pub fn connected(&self, endpoint: SocketAddr, took: Duration) {
        self.connect_duration.observe(took.as_secs_f64());
        self.per_endpoint(endpoint, |pe| &pe.connections);
    }

    /// A connect attempt to `endpoint` failed (another may follow).
    pub fn attempt_failed(&self, endpoint: SocketAddr) {
        self.per_endpoint(endpoint, |pe| &pe.failures);
    }

    /// Another attempt, on another endpoint, follows a failed one.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// The client was reset without reaching an endpoint.
    pub fn failed(&self, reason: FailReason) {
        self.failed[reason.index()].inc();
    }

    /// A relay ended without error, having moved these bytes.
    pub fn relayed(&self, t: &Transferred) {
        self.to_endpoint.inc_by(t.client_to_upstream);
        self.to_client.inc_by(t.upstream_to_client);
    }

    /// UDP (hook for the UDP data path): a flow for a new client address
    /// opened; the guard counts it as active until dropped.
    pub fn udp_flow_opened(&self) -> ActiveGuard<'_> {
        self.udp_active.inc();
        ActiveGuard(&self.udp_active)
    }

    /// UDP: a flow closed because it was idle for its timeout (drop its
    /// [`ActiveGuard`] too).
    pub fn udp_flow_expired(&self) {
        self.udp_expired.inc();
    }

    /// UDP: the flow table now holds `n` flows.
    pub fn udp_flows(&self, n: usize) {
        self.udp_active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// UDP: `n` flows closed for being idle for the timeout.
    pub fn udp_flows_expired(&self, n: usize) {
        self.udp_expired.inc_by(n as u64);
    }

    /// Session affinity: the port's balancer remembers `n` client IPs.
    pub fn affinity_clients(&self, n: usize) {
        self.affinity_clients
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Connections open now.
    pub fn active(&self) -> i64 {
        self.active.get()
    }
}

/// Decrements an "open now" gauge when dropped, whichever way the
/// connection or flow ends.
#[must_use = "the gauge goes down when the guard drops"]
pub struct ActiveGuard<'a>(&'a Gauge);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
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
}
