//! Prometheus metrics: the process's registry, and kube-proxy's own names
//! where one exists.
//!
//! Two audiences read these. Dashboards and alerts written for kube-proxy
//! find its metric names (`kubeproxy_sync_proxy_rules_*`,
//! `kubeproxy_network_programming_duration_seconds`, …) with the same
//! meaning and labels: those families are here, fed by the reconciler.
//! What only a userspace proxy can tell (connections accepted, failed,
//! bytes relayed, connect latency) is under `kubeuproxy_*`, per Service
//! port: those counters live beside the data path that counts into them
//! ([`crate::proxy::metrics`]), and this registry only renders them,
//! through the collector it registers ([`Metrics::service_ports`]). The
//! dependency goes one way: the registry knows the data path's counters,
//! the data path never the registry. The same for the API client's
//! `rest_client_*` families ([`crate::client_metrics`]), which the source's
//! client records into.
//!
//! The process's own (`process_*`, Prometheus' standard names, read from
//! /proc/self at each scrape) and `kubernetes_build_info` are here because
//! kube-proxy's dashboards and alerts read them: without them a dashboard
//! written for kube-proxy shows nothing for CPU, memory or restarts.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::client_metrics::ApiClientMetrics;
use crate::model::ServicePortName;
use crate::proxy::metrics::PortSeries;

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// kube-proxy's label for the IP family of its sync metrics. kube-proxy
/// runs one proxier per family; here one sync writes the `ip` and `ip6`
/// tables together, so its metrics carry the primary family's label.
const IP_FAMILY: &str = "IPv4";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

/// kube-proxy's `kubernetes_build_info` labels (those that mean something
/// for a Rust binary).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KubernetesBuildLabels {
    git_version: String,
    git_commit: String,
    major: String,
    minor: String,
    platform: String,
    compiler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    git_commit: String,
}

/// The commit the binary was built from, when the build said
/// (`KUBE_UPROXY_GIT_COMMIT`, set by deploy/Dockerfile's `GIT_COMMIT`).
pub const GIT_COMMIT: &str = match option_env!("KUBE_UPROXY_GIT_COMMIT") {
    Some(c) if !c.is_empty() => c,
    _ => "unknown",
};

/// `linux/amd64`, `linux/arm64`: Go's names, as kube-proxy's `platform`.
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    traffic_policy: &'static str,
}

/// A Service port, as the labels of a series about it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServicePortLabels {
    namespace: String,
    service: String,
    port_name: String,
    protocol: String,
}

impl From<&ServicePortName> for ServicePortLabels {
    fn from(n: &ServicePortName) -> Self {
        ServicePortLabels {
            namespace: n.service.namespace.to_string(),
            service: n.service.name.to_string(),
            port_name: n.port.clone(),
            protocol: n.protocol.to_string(),
        }
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
    /// `rest_client_*`, recorded by the API client.
    api_client: ApiClientMetrics,
    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`, by
    /// `traffic_policy` (`internal`, `external`).
    no_local_endpoints: Family<PolicyLabels, Gauge>,
    /// `kubeuproxy_sync_proxy_rules_refused_service_ports`: 1 for each
    /// Service port nft refused and that is left out of the rules.
    refused: Family<ServicePortLabels, Gauge>,
    /// The Service ports with a series in `refused`.
    refused_now: std::sync::Mutex<Vec<ServicePortLabels>>,
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
            ports: Arc::new(PortSeries::new(per_endpoint)),
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
            api_client: ApiClientMetrics::default(),
            no_local_endpoints: no_local_endpoints.clone(),
            refused: Family::default(),
            refused_now: std::sync::Mutex::new(Vec::new()),
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
            tail.register_collector(Box::new(ProcessCollector));
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
            "kubeuproxy_sync_proxy_rules_refused_service_ports",
            "Service ports whose rules nft refuses, each left out of the rules (1 per Service port; absent: none); every other Service port is programmed",
            m.refused.clone(),
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

        // The API client's, under client-go's names.
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, partitioned by status code, method, and host",
            m.api_client.requests.clone(),
        );
        registry.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds (until the response's head). Broken down by verb, and host",
            m.api_client.duration.clone(),
        );
        // What was built: kube-proxy's name and labels, and our own.
        let kubernetes_build = Family::<KubernetesBuildLabels, Gauge>::default();
        let version = env!("CARGO_PKG_VERSION");
        kubernetes_build
            .get_or_create(&KubernetesBuildLabels {
                git_version: format!("v{version}"),
                git_commit: GIT_COMMIT.to_string(),
                major: env!("CARGO_PKG_VERSION_MAJOR").to_string(),
                minor: env!("CARGO_PKG_VERSION_MINOR").to_string(),
                platform: platform(),
                compiler: "rustc".to_string(),
            })
            .set(1);
        registry.register(
            "kubernetes_build_info",
            "A metric with a constant '1' value labeled by major, minor, git version, git commit, compiler and platform from which kube-uproxy was built",
            kubernetes_build,
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: version.to_string(),
                git_commit: GIT_COMMIT.to_string(),
            })
            .set(1);
        registry.register(
            "kubeuproxy_build_info",
            "A metric with a constant '1' value labeled by the version and git commit of kube-uproxy",
            build,
        );

        // The userspace proxy's own, per Service port.
        registry.register_collector(Box::new(Arc::clone(&m.ports)));
        Metrics { registry, ..m }
    }

    /// The Service ports' series, for the listeners: each takes its port's
    /// handle from there (the data path never holds the whole registry).
    pub fn service_ports(&self) -> Arc<PortSeries> {
        Arc::clone(&self.ports)
    }

    /// The API client's families, for the layer on the client
    /// ([`crate::client_metrics::ApiClientLayer`]).
    pub fn api_client(&self) -> ApiClientMetrics {
        self.api_client.clone()
    }

    /// Open connections of a Service port now, if it has a listener.
    pub fn active_connections(&self, name: &ServicePortName) -> Option<i64> {
        self.ports.active_connections(name)
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

    /// The Service ports nft refuses now (left out of the rules): one
    /// series each, and none for those no longer refused.
    pub fn refused<'a>(&self, now: impl Iterator<Item = &'a ServicePortName>) {
        let now: Vec<ServicePortLabels> = now.map(ServicePortLabels::from).collect();
        let mut was = self.refused_now.lock().unwrap_or_else(|e| e.into_inner());
        if *was == now {
            return;
        }
        for gone in was.iter().filter(|l| !now.contains(l)) {
            self.refused.remove(gone);
        }
        for l in &now {
            self.refused.get_or_create(l).set(1);
        }
        *was = now;
    }

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

    /// The drift check found the kernel's table changed behind our back.
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

/// The process's CPU time, memory and start time, read from /proc/self at
/// each scrape, under the names of Prometheus' process collector (which
/// kube-proxy, as every Go binary, exports).
#[derive(Debug)]
struct ProcessCollector;

/// The kernel reports CPU times in USER_HZ ticks, which Linux fixes at 100
/// for user space on every architecture (as Prometheus' procfs assumes).
const USER_HZ: f64 = 100.0;

/// What /proc/self tells about the process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStat {
    cpu_seconds: f64,
    start_time_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
}

impl ProcessStat {
    /// From /proc/self/stat (`utime`, `stime`, `starttime`), /proc/stat
    /// (`btime`) and /proc/self/status (`VmRSS`, `VmSize`); `None` where a
    /// file cannot be read or parsed.
    fn read() -> Option<ProcessStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        ProcessStat::parse(&stat, &boot, &status)
    }

    fn parse(stat: &str, boot: &str, status: &str) -> Option<ProcessStat> {
        // After the command name (in parentheses, which may hold spaces):
        // field 3 (state) onwards.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let btime: f64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let kib = |key: &str| -> Option<u64> {
            let v = status.lines().find_map(|l| l.strip_prefix(key))?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        };
        Some(ProcessStat {
            cpu_seconds: (field(14)? + field(15)?) / USER_HZ,
            start_time_seconds: btime + field(22)? / USER_HZ,
            resident_bytes: kib("VmRSS:")? * 1024,
            virtual_bytes: kib("VmSize:")? * 1024,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Nothing rather than zeros when /proc cannot be read.
        let Some(p) = ProcessStat::read() else {
            return Ok(());
        };
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(p.cpu_seconds).encode(m)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectKey, Protocol};

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

    /// What kube-proxy's dashboards and alerts read besides the
    /// `kubeproxy_*` families: the process (CPU, memory, start time,
    /// descriptors), the build, and the API client.
    #[test]
    fn process_build_and_api_client_families_are_rendered_with_their_types() {
        let m = Metrics::new(false);
        m.api_client()
            .record("GET", "10.0.0.1:6443", "200", Duration::from_millis(3));
        let text = m.render();
        for (family, kind) in [
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_start_time_seconds", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("rest_client_requests_total", "counter"),
            ("rest_client_request_duration_seconds", "histogram"),
            ("kubernetes_build_info", "gauge"),
            ("kubeuproxy_build_info", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family} {kind}: {text}"
            );
        }
        let value = |series: &str| -> f64 {
            sample(&text, series)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{series}: {text}"))
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 24.0 * 3600.0,
            "{started} vs {now}"
        );
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert_eq!(
            value("rest_client_requests_total{code=\"200\",method=\"GET\",host=\"10.0.0.1:6443\"}"),
            1.0
        );
        assert_eq!(
            value(
                "rest_client_request_duration_seconds_bucket{verb=\"GET\",host=\"10.0.0.1:6443\",le=\"0.005\"}"
            ),
            1.0,
        );
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "kubeuproxy_build_info{{version=\"{version}\",git_commit=\"{GIT_COMMIT}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("git_version=\"v{version}\"")),
            "{text}"
        );
    }

    #[test]
    fn proc_self_stat_is_read_in_user_hz_and_kib() {
        // A command name with spaces and a parenthesis, as the kernel
        // writes it.
        let stat = "4242 (kube (u)proxy) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 123400 99999999 2000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let status = "Name:\tkube-uproxy\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            ProcessStat::parse(stat, boot, status),
            Some(ProcessStat {
                cpu_seconds: 3.0,
                start_time_seconds: 1_700_001_234.0,
                resident_bytes: 10 * 1024 * 1024,
                virtual_bytes: 200 * 1024 * 1024,
            })
        );
        assert_eq!(ProcessStat::parse("garbage", boot, status), None);
    }

    /// The per-port families of the data path's collector come after the
    /// registry's own and before its sub-registries (drift repairs and
    /// file descriptors, then the `ip_family` ones), where they were when
    /// registered as families.
    #[test]
    fn service_port_series_render_between_kube_proxy_and_process_families() {
        let m = Metrics::new(false);
        let web = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let handle = m.service_ports().service_port(&web);
        handle.accepted();
        assert_eq!(m.active_connections(&web), Some(0));
        let text = m.render();
        let at = |name: &str| text.find(name).unwrap_or_else(|| panic!("{name}: {text}"));
        assert!(
            at("kubeproxy_sync_proxy_rules_endpoint_changes_pending")
                < at("kubeuproxy_connections_accepted_total")
        );
        assert!(at("kubeuproxy_session_affinity_clients") < at("kubeuproxy_rules_drift_repairs"));
        assert!(at("kubeuproxy_rules_drift_repairs") < at("process_open_fds"));
        assert!(at("process_max_fds") < at("kubeproxy_sync_proxy_rules_duration_seconds"));
        assert_eq!(
            sample(
                &text,
                "kubeuproxy_connections_accepted_total{namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\"}"
            ),
            Some("1"),
            "{text}"
        );
    }
}
