//! The one place that turns desired-state changes into listener, balancer
//! and rule changes.
//!
//! Updates from the source are applied to a [`ClusterState`]; all updates
//! already queued are taken together, then one sync runs: for every Service
//! that changed, its ports are compared with what runs now. New ports get a
//! listener and a balancer, changed ports get new endpoints (an atomic
//! pointer swap, no kernel call), removed ports lose their rules and then
//! their listener. All rule changes of a sync go to the kernel in one nft
//! transaction.
//!
//! Order matters in three places:
//! - Nothing is synced until the source has delivered its complete initial
//!   Services *and* EndpointSlices, so a restart never flaps a Service
//!   through "no endpoints".
//! - A listener closes, and its port is given back, only after a sync that
//!   removed its rules *succeeded*: while the kernel may still send traffic
//!   to a port, the port keeps its listener and is handed to nobody else.
//! - At start, Service ports whose destinations an earlier instance's table
//!   mapped to a proxy port get that port back (`adopted`), so that a
//!   restart or a handover changes no rule of an unchanged Service.
//!
//! Every `sync_period` the kernel's table is compared with what was applied
//! and written again if it drifted (a flush, a firewall reload).
//!
//! The reconciler reaches the kernel only through the [`Nft`] and
//! [`Listeners`] seams, so all of this is unit-tested without root.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::model::{
    Algorithm, ClusterState, IpFamily, ListenerKey, ObjectKey, Protocol, ServicePortName,
    ServicePortSpec,
};
use crate::proxy::balancer::Balancer;
use crate::proxy::listeners::{ListenError, Listener, Listeners};
use crate::rules::{Action, Destination, Key, Nft, ProxyPort, RuleTable, SyncKind, Verified};
use crate::source::Update;

mod observe;
pub use observe::Telemetry;

/// How long to wait before retrying a failed rule sync or listener.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A sync that changed at least this many Services gives freed memory back
/// to the kernel afterwards (see [`crate::memory`]).
const RELEASE_AFTER: usize = 1000;

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// Used by Services without the `kube-uproxy.io/lb-algorithm` annotation.
    pub default_algorithm: Algorithm,
    /// How often the kernel's table is checked against what was applied
    /// (kube-proxy's `--sync-period`).
    pub sync_period: Duration,
}

/// A Service port, in one family, that has a listener.
struct ActivePort {
    spec: ServicePortSpec,
    listener: Listener,
    balancer: Arc<Balancer>,
    /// The keys this port claims in the rules.
    destinations: BTreeSet<Key>,
}

/// Owns the running state: listeners, balancers and the rule table.
pub struct Reconciler<N: Nft, L: Listeners> {
    config: ReconcilerConfig,
    state: ClusterState,
    listeners: L,
    /// Ordered by Service first, so one Service's listeners are a range.
    active: BTreeMap<ListenerKey, ActivePort>,
    rules: RuleTable<N>,
    /// Ports whose rules are gone from what we want, waiting for a sync that
    /// succeeds before their listeners close.
    closing: Vec<(ListenerKey, ActivePort)>,
    /// Proxy ports an earlier instance's table gave each destination; used
    /// for the first listener of each Service port, then dropped.
    adopted: HashMap<Key, u16>,
    /// Services whose last reconcile could not finish (e.g. no free port).
    retry: BTreeSet<ObjectKey>,
    /// Services to reconcile at the next sync besides the dirty ones.
    pending_keys: BTreeSet<ObjectKey>,
    /// Services told to the log as having a ClusterIP of a family this
    /// node does not serve (IPv6 disabled): said once per Service, again
    /// after it is gone and back.
    family_off_logged: BTreeSet<ObjectKey>,
    services_synced: bool,
    slices_synced: bool,
    /// Set after the first sync of rules succeeded.
    first_sync_done: bool,
    /// Metrics, health and status reports (`with_telemetry`).
    observer: observe::Observer,
}

impl<N: Nft, L: Listeners> Reconciler<N, L> {
    /// `adopted`: destination → proxy port, from the table an earlier
    /// instance left (empty when there was none).
    pub fn new(
        config: ReconcilerConfig,
        rules: RuleTable<N>,
        listeners: L,
        adopted: HashMap<Key, u16>,
    ) -> Self {
        Reconciler {
            config,
            state: ClusterState::new(),
            listeners,
            active: BTreeMap::new(),
            rules,
            closing: Vec::new(),
            adopted,
            retry: BTreeSet::new(),
            pending_keys: BTreeSet::new(),
            family_off_logged: BTreeSet::new(),
            services_synced: false,
            slices_synced: false,
            first_sync_done: false,
            observer: observe::Observer::default(),
        }
    }

    fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Services(all) => {
                self.services_synced = true;
                self.state.replace_services(all);
            }
            Update::Slices(all) => {
                self.slices_synced = true;
                self.state.replace_slices(all);
            }
            Update::ServiceApplied(s) => self.state.apply_service(s),
            Update::ServiceDeleted(k) => self.state.delete_service(&k),
            Update::SliceApplied(s) => self.state.apply_slice(s),
            Update::SliceDeleted(k) => self.state.delete_slice(&k),
        }
    }

    fn needs_retry(&self) -> bool {
        self.rules.has_pending() || !self.retry.is_empty() || !self.closing.is_empty()
    }

    /// Runs until `cancel` fires or the source closes its channel; then
    /// stops every listener (open connections go on; draining them is the
    /// caller's job). The rules stay in the kernel.
    pub async fn run(mut self, mut updates: Receiver<Update>, cancel: CancellationToken) {
        // Deadlines, not a fresh sleep per pass: under a steady stream of
        // updates a retry or a check must still come due.
        let mut retry_at: Option<Instant> = None;
        let mut verify_at = Instant::now() + self.config.sync_period;
        let mut reports = self.observer.reports.take();
        loop {
            let need_retry = self.synced() && self.needs_retry();
            if !need_retry {
                retry_at = None;
            } else if retry_at.is_none() {
                retry_at = Some(Instant::now() + RETRY_AFTER);
            }
            let retry_deadline = retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                reply = observe::next_report(&mut reports) => {
                    self.answer_report(reply);
                    continue;
                }
                u = updates.recv() => match u {
                    Some(u) => self.receive(u),
                    None => {
                        warn!("source stopped sending updates");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(retry_deadline), if need_retry => {
                    retry_at = None;
                    let mut again = std::mem::take(&mut self.retry);
                    self.pending_keys.append(&mut again);
                }
                _ = tokio::time::sleep_until(verify_at), if self.first_sync_done => {
                    verify_at = Instant::now() + self.config.sync_period;
                    self.verify().await;
                }
            }
            // Take everything already queued: one sync for a burst.
            while let Ok(u) = updates.try_recv() {
                self.receive(u);
            }
            if self.synced() {
                self.sync().await;
            }
        }
        self.stop_listeners();
    }

    /// Stops every listener (shutdown).
    fn stop_listeners(&mut self) {
        for (name, port) in std::mem::take(&mut self.active) {
            self.listeners.close_now(&name, port.listener);
        }
        for (name, port) in std::mem::take(&mut self.closing) {
            self.listeners.close_now(&name, port.listener);
        }
    }

    /// Compares the kernel's table with what was applied; a drifted table
    /// is written again by the next sync.
    pub async fn verify(&mut self) {
        let verified = self.rules.verify().await;
        if matches!(verified, Ok(Verified::Drifted(_))) {
            self.observe_drift();
        }
        match verified {
            Ok(Verified::Drifted(problems)) => warn!(
                problems = %problems.join("; "),
                "the kernel's table differs from what was applied; writing it again"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read the rules back to check them"),
        }
    }

    /// Brings listeners, balancers and rules in line with the state.
    pub async fn sync(&mut self) {
        let started = std::time::Instant::now();
        let mut dirty = self.state.take_dirty();
        dirty.append(&mut self.pending_keys);
        for key in &dirty {
            self.reconcile_service(key);
        }
        let reconciled = started.elapsed();
        let worked = !dirty.is_empty() || self.rules.has_pending();
        let mut full = None;
        let ok = if self.rules.has_pending() {
            match self.rules.sync().await {
                Ok((SyncKind::Unchanged, _)) => true,
                Ok((kind, took)) => {
                    full = match kind {
                        SyncKind::Full { .. } => Some(true),
                        SyncKind::Delta { .. } => Some(false),
                        SyncKind::Unchanged | SyncKind::Superseded => None,
                    };
                    info!(
                        ?kind,
                        services = self.state.service_count(),
                        service_ports = self.active.len(),
                        changed_services = dirty.len(),
                        reconcile_ms = reconciled.as_secs_f64() * 1e3,
                        nft_ms = took.as_secs_f64() * 1e3,
                        "rules synced"
                    );
                    if matches!(kind, SyncKind::Full { .. }) || dirty.len() >= RELEASE_AFTER {
                        // After a burst (a start, a relist): what parsing
                        // and the transaction freed goes back to the kernel.
                        crate::memory::release_free();
                    }
                    true
                }
                Err(e) => {
                    error!(error = %e, "rule sync failed; listeners stay until it succeeds; retrying");
                    self.observe_sync_failed();
                    false
                }
            }
        } else {
            true
        };
        if !ok {
            return;
        }
        self.observe_synced(started, worked, full);
        if !self.first_sync_done {
            self.first_sync_done = true;
            self.adopted.clear();
            self.listeners.adoption_done();
        }
        // Only now that no rule points at them do listeners go away.
        for (key, port) in std::mem::take(&mut self.closing) {
            let proxy_port = ProxyPort {
                protocol: key.port.protocol,
                port: port.listener.port,
            };
            self.listeners.close(&key, port.listener);
            // Dropped from the guard set at the next sync (or kept if the
            // port is handed out again before then).
            self.rules.set_proxy_port(key.family, proxy_port, false);
        }
    }

    /// Reconciles one Service's ports: one listener per port and per
    /// family of the Service's ClusterIPs that this node serves.
    fn reconcile_service(&mut self, key: &ObjectKey) {
        let desired = self.state.service_ports(key, self.config.default_algorithm);
        let served = self.rules.layout().families();
        let mut wanted: Vec<(ServicePortSpec, IpFamily)> = Vec::new();
        let mut off: BTreeSet<IpFamily> = BTreeSet::new();
        for spec in desired {
            for family in spec.families() {
                if served.contains(&family) {
                    wanted.push((spec.clone(), family));
                } else {
                    off.insert(family);
                }
            }
        }
        if off.is_empty() {
            self.family_off_logged.remove(key);
        } else if self.family_off_logged.insert(key.clone()) {
            let families: Vec<String> = off.iter().map(|f| f.to_string()).collect();
            warn!(service = %key, families = %families.join(","), "the Service has ClusterIPs of a family this node has disabled; not served in that family");
        }
        let wanted_keys: BTreeSet<ListenerKey> = wanted
            .iter()
            .map(|(spec, family)| spec.listener_key(*family))
            .collect();
        let gone: Vec<ListenerKey> = self
            .active
            .range(service_range(key))
            .take_while(|(k, _)| k.port.service == *key)
            .map(|(k, _)| k.clone())
            .filter(|k| !wanted_keys.contains(k))
            .collect();
        for lkey in gone {
            if let Some(port) = self.active.remove(&lkey) {
                for d in &port.destinations {
                    self.rules.release(*d, &lkey.port);
                }
                info!(service_port = %lkey.port, family = %lkey.family, proxy_port = port.listener.port, "service port removed");
                self.closing.push((lkey, port));
            }
        }
        for (spec, family) in wanted {
            if let Err(true) = self.reconcile_port(spec, family) {
                self.retry.insert(key.clone());
            }
        }
    }

    /// Creates or updates one port's listener of `family`. `Err(true)` asks
    /// for a retry later.
    fn reconcile_port(&mut self, spec: ServicePortSpec, family: IpFamily) -> Result<(), bool> {
        let usable = spec.usable_endpoints_of(family);
        let destinations = destinations(&spec, family);
        let lkey = spec.listener_key(family);
        if !self.active.contains_key(&lkey) {
            let port = self.start_listener(&lkey, &spec, &destinations)?;
            self.active.insert(lkey.clone(), port);
        }
        let Some(port) = self.active.get_mut(&lkey) else {
            return Err(true);
        };
        if port.spec.endpoints != spec.endpoints
            || port.balancer.algorithm() != spec.algorithm
            || port.balancer.session_affinity() != spec.session_affinity
        {
            debug!(service_port = %spec.name, %family, endpoints = usable.len(), algorithm = %spec.algorithm, session_affinity = %spec.session_affinity, "endpoints updated");
        }
        port.balancer
            .update(&usable, spec.algorithm, spec.session_affinity);

        let action = if usable.is_empty() {
            Action::Reject
        } else {
            Action::Redirect(port.listener.port)
        };
        for old in port.destinations.difference(&destinations) {
            self.rules.release(*old, &spec.name);
        }
        for d in &destinations {
            let a = match d {
                Key::Service(_) | Key::NodePort(..) => action,
                Key::Guarded(_) | Key::Allow(..) => Action::Member,
            };
            self.rules.claim(*d, &spec.name, a);
        }
        port.destinations = destinations;
        port.spec = spec;
        Ok(())
    }

    fn start_listener(
        &mut self,
        lkey: &ListenerKey,
        spec: &ServicePortSpec,
        destinations: &BTreeSet<Key>,
    ) -> Result<ActivePort, bool> {
        let adopt = destinations.iter().find_map(|d| self.adopted.remove(d));
        let balancer = Arc::new(Balancer::new(spec.algorithm));
        let listener = match self.listeners.open(lkey, Arc::clone(&balancer), adopt) {
            Ok(l) => l,
            Err(ListenError::Unsupported(protocol)) => {
                debug!(service_port = %spec.name, %protocol, "only TCP is proxied so far; port not proxied");
                return Err(false);
            }
            Err(e) => {
                error!(service_port = %spec.name, family = %lkey.family, error = %e, "cannot open a listener; retrying");
                return Err(true);
            }
        };
        self.rules.set_proxy_port(
            lkey.family,
            ProxyPort {
                protocol: spec.name.protocol,
                port: listener.port,
            },
            true,
        );
        let cluster_ips: Vec<IpAddr> =
            ServicePortSpec::of_family(&spec.cluster_ips, lkey.family).collect();
        info!(
            service_port = %spec.name,
            family = %lkey.family,
            proxy_port = listener.port,
            adopted = adopt == Some(listener.port),
            cluster_ips = ?cluster_ips,
            port = spec.port,
            algorithm = %spec.algorithm,
            "service port added"
        );
        Ok(ActivePort {
            spec: spec.clone(),
            listener,
            balancer,
            destinations: BTreeSet::new(),
        })
    }
}

/// Every key the kernel should catch for this port in `family`: its
/// ClusterIPs, externalIPs and load-balancer IPs of that family on the
/// Service port, its node port on the node's addresses of that family, and
/// the source ranges of that family for its load-balancer IPs (as
/// kube-proxy filters them: ranges of the other family are ignored, and a
/// family left without any lets every source in).
pub(crate) fn destinations(spec: &ServicePortSpec, family: IpFamily) -> BTreeSet<Key> {
    let of = |ips: &[IpAddr]| -> Vec<Destination> {
        ServicePortSpec::of_family(ips, family)
            .map(|ip| Destination {
                ip,
                protocol: spec.name.protocol,
                port: spec.port,
            })
            .collect()
    };
    let mut keys: BTreeSet<Key> = of(&spec.cluster_ips)
        .into_iter()
        .chain(of(&spec.external_ips))
        .chain(of(&spec.lb_ips))
        .map(Key::Service)
        .collect();
    if let Some(port) = spec.node_port {
        keys.insert(Key::NodePort(
            family,
            ProxyPort {
                protocol: spec.name.protocol,
                port,
            },
        ));
    }
    let ranges: Vec<ipnet::IpNet> = spec
        .lb_source_ranges
        .iter()
        .filter(|n| IpFamily::of(n.addr()) == family)
        .copied()
        .collect();
    if !ranges.is_empty() {
        for d in of(&spec.lb_ips) {
            keys.insert(Key::Guarded(d));
            for net in &ranges {
                keys.insert(Key::Allow(d, *net));
            }
        }
    }
    keys
}

/// From the first possible listener of one Service onwards, in the
/// `active` map's order (callers stop when the Service changes).
fn service_range(key: &ObjectKey) -> (Bound<ListenerKey>, Bound<ListenerKey>) {
    let lo = ListenerKey {
        port: ServicePortName {
            service: key.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
    };
    (Bound::Included(lo), Bound::Unbounded)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{PortSpec, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort};
    use crate::rules::fake::FakeNft;
    use crate::rules::{Instance, Layout};

    /// Listeners without sockets: ports from a counter (or the adopted one),
    /// and a record of what was opened and closed.
    #[derive(Clone, Default)]
    struct FakeListeners {
        log: Arc<Mutex<ListenerLog>>,
    }

    #[derive(Default)]
    struct ListenerLog {
        next: u16,
        open: BTreeMap<u16, ListenerKey>,
        closed: Vec<u16>,
        adopted: Vec<u16>,
        adoption_done: bool,
    }

    impl FakeListeners {
        fn log(&self) -> std::sync::MutexGuard<'_, ListenerLog> {
            self.log.lock().unwrap()
        }
    }

    impl Listeners for FakeListeners {
        fn open(
            &mut self,
            key: &ListenerKey,
            _balancer: Arc<Balancer>,
            adopt: Option<u16>,
        ) -> Result<Listener, ListenError> {
            let mut log = self.log();
            let port = match adopt {
                Some(p) => {
                    log.adopted.push(p);
                    p
                }
                None => {
                    log.next += 1;
                    30000 + log.next
                }
            };
            log.open.insert(port, key.clone());
            Ok(Listener::detached(port))
        }

        fn close(&mut self, _key: &ListenerKey, listener: Listener) {
            let mut log = self.log();
            log.open.remove(&listener.port);
            log.closed.push(listener.port);
        }

        fn adoption_done(&mut self) {
            self.log().adoption_done = true;
        }
    }

    fn service(name: &str, ip: &str) -> ServiceInfo {
        ServiceInfo {
            key: ObjectKey::new("default", name),
            cluster_ips: vec![ip.parse().unwrap()],
            ports: vec![PortSpec {
                port: 80,
                ..PortSpec::default()
            }],
            ..ServiceInfo::default()
        }
    }

    fn slice(service: &str, ip: &str) -> SliceInfo {
        SliceInfo {
            key: ObjectKey::new("default", format!("{service}-abc")),
            service: ObjectKey::new("default", service),
            ports: vec![SlicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![SliceEndpoint {
                address: ip.parse().unwrap(),
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            }],
        }
    }

    fn dest(ip: &str) -> Key {
        Key::Service(Destination {
            ip: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        })
    }

    fn reconciler(
        fake: &FakeNft,
        listeners: &FakeListeners,
        adopted: HashMap<Key, u16>,
    ) -> Reconciler<FakeNft, FakeListeners> {
        reconciler_v6(fake, listeners, adopted, false)
    }

    /// With `ipv6`: the node serves IPv6 too (an ip6 table).
    fn reconciler_v6(
        fake: &FakeNft,
        listeners: &FakeListeners,
        adopted: HashMap<Key, u16>,
        ipv6: bool,
    ) -> Reconciler<FakeNft, FakeListeners> {
        let layout = Layout {
            proxy_address: "169.254.42.1".parse().unwrap(),
            proxy_address_v6: ipv6.then(|| "fd6b:7570:7278::1".parse().unwrap()),
            nodeport_addresses: None,
            instance: Instance {
                id: 9,
                note: String::new(),
            },
        };
        Reconciler::new(
            ReconcilerConfig {
                default_algorithm: Algorithm::RoundRobin,
                sync_period: Duration::from_secs(30),
            },
            RuleTable::new(fake.clone(), layout),
            listeners.clone(),
            adopted,
        )
    }

    /// Feeds a complete list of Services and slices, then syncs.
    async fn load(
        r: &mut Reconciler<FakeNft, FakeListeners>,
        svcs: Vec<ServiceInfo>,
        slices: Vec<SliceInfo>,
    ) {
        r.apply(Update::Services(svcs));
        r.apply(Update::Slices(slices));
        r.sync().await;
    }

    fn kernel_port(fake: &FakeNft, ip: &str) -> Option<u16> {
        match fake.table()?.elements.get(&dest(ip)) {
            Some(Action::Redirect(p)) => Some(*p),
            _ => None,
        }
    }

    /// The value of an unlabelled (or `ip_family`-only) series.
    fn metric(r: &Reconciler<FakeNft, FakeListeners>, series: &str) -> f64 {
        let text = r.observer.metrics.render();
        text.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let name = name.strip_suffix("{ip_family=\"IPv4\"}").unwrap_or(name);
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[tokio::test]
    async fn pending_changes_and_sync_kinds_are_counted_as_kube_proxy_does() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        let pending = |r: &Reconciler<FakeNft, FakeListeners>| {
            (
                metric(r, "kubeproxy_sync_proxy_rules_service_changes_pending"),
                metric(r, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            )
        };
        assert_eq!(
            metric(
                &r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
            ),
            0.0
        );
        r.receive(Update::Services(vec![
            service("a", "10.96.0.10"),
            service("b", "10.96.0.11"),
        ]));
        r.receive(Update::Slices(vec![slice("a", "10.1.0.1")]));
        assert_eq!(pending(&r), (2.0, 1.0));
        assert!(
            metric(
                &r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
            ) > 1.0e9
        );
        r.sync().await;
        assert_eq!(pending(&r), (0.0, 0.0));
        // The first sync writes the table whole; an endpoint change after
        // it sends one element.
        assert_eq!(
            metric(&r, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            metric(
                &r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            ),
            0.0
        );
        r.receive(Update::Slices(vec![
            slice("a", "10.1.0.1"),
            slice("b", "10.1.0.2"),
        ]));
        assert_eq!(pending(&r), (0.0, 1.0));
        r.sync().await;
        assert_eq!(pending(&r), (0.0, 0.0));
        assert_eq!(
            metric(&r, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            metric(
                &r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            ),
            1.0
        );
        assert_eq!(
            metric(&r, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            2.0
        );
    }

    #[tokio::test]
    async fn a_service_renamed_in_one_sync_keeps_its_cluster_ip_rule() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        // Each name takes the ClusterIP from the previous one in one sync:
        // "a-new" sorts before "b-old", so its claim comes before the old
        // one's release; "z-next" sorts after, so the release comes first.
        for name in ["b-old", "a-new", "z-next"] {
            load(
                &mut r,
                vec![service(name, "10.96.0.10")],
                vec![slice(name, "10.1.0.1")],
            )
            .await;
            let port = kernel_port(&fake, "10.96.0.10").expect("the ClusterIP lost its rule");
            let holder = listeners
                .log()
                .open
                .get(&port)
                .map(|n| n.port.service.name.clone());
            assert_eq!(holder.as_deref(), Some(name));
        }
    }

    #[tokio::test]
    async fn a_failed_sync_keeps_listeners_until_one_succeeds() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        load(
            &mut r,
            vec![service("web", "10.96.0.10")],
            vec![slice("web", "10.1.0.1")],
        )
        .await;
        let port = kernel_port(&fake, "10.96.0.10").unwrap();

        fake.fail_next(2, "Error: simulated");
        load(&mut r, vec![], vec![]).await;
        // The kernel still sends 10.96.0.10 to `port`: its listener stays.
        assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(port));
        assert!(listeners.log().open.contains_key(&port));
        assert!(listeners.log().closed.is_empty());
        assert!(r.needs_retry());

        r.sync().await;
        assert_eq!(kernel_port(&fake, "10.96.0.10"), None);
        assert_eq!(listeners.log().closed, [port]);
        // The closed port leaves the guard set at the sync after that.
        r.sync().await;
        assert!(!r.needs_retry());
        assert!(fake.table().unwrap().proxy_ports.is_empty());
    }

    #[tokio::test]
    async fn a_flushed_table_is_written_again_at_the_next_check() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        load(
            &mut r,
            vec![service("web", "10.96.0.10")],
            vec![slice("web", "10.1.0.1")],
        )
        .await;
        let port = kernel_port(&fake, "10.96.0.10").unwrap();
        fake.flush();
        r.verify().await;
        r.sync().await;
        assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(port));
        // Nothing else moved: the listener is the same one.
        assert!(listeners.log().closed.is_empty());
    }

    #[tokio::test]
    async fn an_earlier_instances_ports_are_taken_back_and_its_leftovers_removed() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        // The earlier instance's table: web on 31234, and a Service that is
        // gone since, on 31235.
        let mut earlier = reconciler(&fake, &FakeListeners::default(), HashMap::new());
        earlier.rules.claim(
            dest("10.96.0.10"),
            &ServicePortName {
                service: ObjectKey::new("default", "web"),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            Action::Redirect(31234),
        );
        earlier.rules.claim(
            dest("10.96.0.99"),
            &ServicePortName {
                service: ObjectKey::new("default", "gone"),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            Action::Redirect(31235),
        );
        earlier.rules.sync().await.unwrap();
        let adopted: HashMap<Key, u16> = fake.table().unwrap().redirects().collect();

        let mut r = reconciler(&fake, &listeners, adopted);
        load(
            &mut r,
            vec![service("web", "10.96.0.10")],
            vec![slice("web", "10.1.0.1")],
        )
        .await;
        assert_eq!(listeners.log().adopted, [31234]);
        assert!(listeners.log().adoption_done);
        assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(31234));
        assert_eq!(kernel_port(&fake, "10.96.0.99"), None);
        assert_eq!(fake.table().unwrap().instance, Some(9));
    }

    fn dual_stack(name: &str, node_port: Option<u16>) -> ServiceInfo {
        let mut s = service(name, "10.96.0.10");
        s.cluster_ips.push("fd00:96::10".parse().unwrap());
        s.ports[0].node_port = node_port;
        s
    }

    fn slice_of(service: &str, slice: &str, ip: &str, ready: bool) -> SliceInfo {
        let mut s = self::slice(service, ip);
        s.key.name = slice.into();
        s.endpoints[0].ready = ready;
        s.endpoints[0].serving = ready;
        s
    }

    fn action_of(fake: &FakeNft, key: &Key) -> Option<Action> {
        fake.table_of(key.family())?.elements.get(key).copied()
    }

    fn node_port(family: IpFamily) -> Key {
        Key::NodePort(
            family,
            ProxyPort {
                protocol: Protocol::Tcp,
                port: 30080,
            },
        )
    }

    #[tokio::test]
    async fn a_dual_stack_service_has_a_listener_per_family_each_with_its_own_endpoints() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler_v6(&fake, &listeners, HashMap::new(), true);
        // A ready IPv4 endpoint; the IPv6 one is not ready.
        let slices = |v6_ready| {
            vec![
                slice_of("web", "web-v4", "10.1.0.1", true),
                slice_of("web", "web-v6", "fd00:1::1", v6_ready),
            ]
        };
        load(&mut r, vec![dual_stack("web", Some(30080))], slices(false)).await;
        let open: Vec<ListenerKey> = listeners.log().open.values().cloned().collect();
        assert_eq!(
            open.iter().map(|k| k.family).collect::<Vec<_>>(),
            [IpFamily::V4, IpFamily::V6]
        );
        let p4 = kernel_port(&fake, "10.96.0.10").expect("the IPv4 ClusterIP is redirected");
        assert_eq!(listeners.log().open[&p4].family, IpFamily::V4);
        // No usable IPv6 endpoint: the IPv6 side refuses, whatever IPv4 has.
        assert_eq!(action_of(&fake, &dest("fd00:96::10")), Some(Action::Reject));
        assert_eq!(
            action_of(&fake, &node_port(IpFamily::V4)),
            Some(Action::Redirect(p4))
        );
        assert_eq!(
            action_of(&fake, &node_port(IpFamily::V6)),
            Some(Action::Reject)
        );

        load(&mut r, vec![dual_stack("web", Some(30080))], slices(true)).await;
        let Some(Action::Redirect(p6)) = action_of(&fake, &dest("fd00:96::10")) else {
            panic!("the IPv6 ClusterIP is not redirected");
        };
        assert_ne!(p4, p6);
        assert_eq!(listeners.log().open[&p6].family, IpFamily::V6);
        assert_eq!(
            action_of(&fake, &node_port(IpFamily::V6)),
            Some(Action::Redirect(p6))
        );
        let guarded = |f| fake.table_of(f).unwrap().proxy_ports;
        assert!(guarded(IpFamily::V4).iter().any(|p| p.port == p4));
        assert!(guarded(IpFamily::V6).iter().any(|p| p.port == p6));
        assert!(!guarded(IpFamily::V6).iter().any(|p| p.port == p4));
        let report = r.report();
        assert_eq!(report.service_ports.len(), 2);
        assert_eq!(report.service_ports[1].ip_family, "IPv6");
        assert_eq!(report.service_ports[1].cluster_ips, ["fd00:96::10"]);
        assert_eq!(report.service_ports[1].endpoints.len(), 1);

        // The Service drops its IPv6 ClusterIP: the IPv6 listener goes,
        // the IPv4 one and its rules stay as they were.
        let mut single = dual_stack("web", Some(30080));
        single.cluster_ips.truncate(1);
        load(&mut r, vec![single], slices(true)).await;
        assert_eq!(listeners.log().closed, [p6]);
        assert_eq!(kernel_port(&fake, "10.96.0.10"), Some(p4));
        assert_eq!(action_of(&fake, &dest("fd00:96::10")), None);
        assert_eq!(action_of(&fake, &node_port(IpFamily::V6)), None);
    }

    #[tokio::test]
    async fn without_ipv6_the_ipv4_side_is_served_and_ipv6_only_services_are_not() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler_v6(&fake, &listeners, HashMap::new(), false);
        let mut v6_only = service("six", "fd00:96::11");
        v6_only.ports[0].node_port = Some(30081);
        load(
            &mut r,
            vec![dual_stack("web", Some(30080)), v6_only],
            vec![
                slice_of("web", "web-v4", "10.1.0.1", true),
                slice_of("web", "web-v6", "fd00:1::1", true),
                slice_of("six", "six-v6", "fd00:1::2", true),
            ],
        )
        .await;
        let open: Vec<ListenerKey> = listeners.log().open.values().cloned().collect();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].family, IpFamily::V4);
        assert!(kernel_port(&fake, "10.96.0.10").is_some());
        assert!(fake.table_of(IpFamily::V6).is_none());
        // Nothing to retry, and each Service is logged once.
        assert!(!r.needs_retry());
        assert_eq!(r.family_off_logged.len(), 2);
    }

    #[tokio::test]
    async fn an_earlier_instances_ipv6_ports_are_taken_back() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut earlier = reconciler_v6(&fake, &FakeListeners::default(), HashMap::new(), true);
        let web = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        earlier
            .rules
            .claim(dest("10.96.0.10"), &web, Action::Redirect(31234));
        earlier
            .rules
            .claim(dest("fd00:96::10"), &web, Action::Redirect(31236));
        earlier.rules.sync().await.unwrap();
        let adopted: HashMap<Key, u16> = [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .flat_map(|f| fake.table_of(f).unwrap().redirects().collect::<Vec<_>>())
            .collect();

        let mut r = reconciler_v6(&fake, &listeners, adopted, true);
        load(
            &mut r,
            vec![dual_stack("web", None)],
            vec![
                slice_of("web", "web-v4", "10.1.0.1", true),
                slice_of("web", "web-v6", "fd00:1::1", true),
            ],
        )
        .await;
        assert_eq!(listeners.log().adopted, [31234, 31236]);
        assert_eq!(
            action_of(&fake, &dest("fd00:96::10")),
            Some(Action::Redirect(31236))
        );
        assert_eq!(listeners.log().open[&31236].family, IpFamily::V6);
    }

    #[test]
    fn source_ranges_apply_per_family_as_kube_proxy_filters_them() {
        let mut svc = dual_stack("web", None);
        svc.lb_ips = vec!["10.200.8.8".parse().unwrap(), "fd00:8::8".parse().unwrap()];
        svc.lb_source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        let mut st = ClusterState::new();
        st.apply_service(svc);
        let spec = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        let v4 = destinations(&spec, IpFamily::V4);
        let v6 = destinations(&spec, IpFamily::V6);
        assert!(v4.iter().any(|k| matches!(k, Key::Guarded(_))));
        assert!(v4.iter().all(|k| k.family() == IpFamily::V4));
        assert!(v6.iter().all(|k| k.family() == IpFamily::V6));
        // Only IPv4 ranges: the IPv6 LB IP is open to every source.
        assert!(
            !v6.iter()
                .any(|k| matches!(k, Key::Guarded(_) | Key::Allow(..)))
        );
        assert!(v6.contains(&Key::Service(Destination {
            ip: "fd00:8::8".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        })));
    }
}
