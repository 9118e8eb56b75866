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

use crate::health::ServiceHealthServers;
use crate::model::{
    Algorithm, ClusterState, IpFamily, ListenerKey, NodeTopology, ObjectKey, Protocol,
    ServicePortName, ServicePortSpec, TrafficScope,
};
use crate::proxy::balancer::Balancer;
use crate::proxy::listeners::{ListenError, Listener, Listeners};
use crate::rules::{Action, Destination, Key, Nft, ProxyPort, RuleTable, SyncKind, Verified};
use crate::source::Update;

mod observe;
pub use observe::Telemetry;

/// How long to wait before retrying a failed rule sync or listener.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// Used by Services without the `kube-uproxy.io/lb-algorithm` annotation.
    pub default_algorithm: Algorithm,
    /// How often the kernel's table is checked against what was applied
    /// (kube-proxy's `--sync-period`).
    pub sync_period: Duration,
    /// This node: its name (`--hostname-override`) and zone. The zone
    /// given here (`--node-zone`) wins over the Node object's label.
    pub node: NodeTopology,
}

/// A listener of a Service port, in one family (see [`ListenerKey`]).
///
/// The Service port's spec is not kept here: the model has it (status
/// reports read it there), and the balancer holds the endpoints.
struct ActivePort {
    listener: Listener,
    balancer: Arc<Balancer>,
    /// The keys this listener claims in the rules.
    /// Sorted (a `BTreeSet` of a few keys allocates a node for eleven).
    destinations: Vec<Key>,
}

#[cfg(test)]
impl ActivePort {
    /// The endpoints its balancer holds.
    fn endpoints(&self) -> Vec<std::net::SocketAddr> {
        self.balancer.endpoints().addrs().collect()
    }
}

/// What happens to new flows of one kind of traffic of a Service port
/// (kube-proxy's verdicts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Relayed to the listener.
    Serve,
    /// No usable endpoint anywhere: refused.
    Reject,
    /// Usable endpoints exist, but none on this node for a `Local` policy:
    /// dropped.
    Drop,
}

/// One listener a Service port needs, with its endpoints and keys.
#[derive(Debug, PartialEq, Eq)]
struct ListenerPlan {
    key: ListenerKey,
    endpoints: Vec<std::net::SocketAddr>,
    destinations: BTreeMap<Key, Verdict>,
}

/// What one Service port needs: one listener, or two when its external
/// traffic goes to other endpoints than its ClusterIP traffic (the two
/// traffic policies differ), plus what the health check and the
/// no-local-endpoints metric need.
#[derive(Debug)]
struct PortPlan {
    listeners: Vec<ListenerPlan>,
    /// Ready endpoints on this node (the health check node port's count).
    local_ready: usize,
    /// ClusterIP traffic is dropped: `internalTrafficPolicy: Local`
    /// without local endpoints.
    no_local_internal: bool,
    /// External traffic is dropped: `externalTrafficPolicy: Local` without
    /// local endpoints.
    no_local_external: bool,
}

/// Plans the listeners of one Service port in `family` on `node` (pure).
fn plan_port(spec: &ServicePortSpec, node: &NodeTopology, family: IpFamily) -> PortPlan {
    let sel = spec.select(family, node);
    let verdict = |set: &[std::net::SocketAddr]| {
        if !sel.has_any {
            Verdict::Reject
        } else if set.is_empty() {
            Verdict::Drop
        } else {
            Verdict::Serve
        }
    };
    let internal = sel.internal(spec).to_vec();
    let external = sel.external(spec).to_vec();
    let (internal_verdict, external_verdict) = (verdict(&internal), verdict(&external));
    let all = destinations(spec, family);
    let (cluster_keys, external_keys): (Vec<Key>, Vec<Key>) = all
        .into_iter()
        .partition(|k| matches!(k, Key::Service(d) if spec.cluster_ips.contains(&d.ip)));
    let accessible = spec.externally_accessible();
    let separate = accessible && spec.internal_local != spec.external_local;
    let member_or = |k: &Key, v: Verdict| match k {
        Key::Guarded(_) | Key::Allow(..) => Verdict::Serve,
        _ => v,
    };
    let mut internal_plan = ListenerPlan {
        key: ListenerKey {
            port: spec.name.clone(),
            family,
            scope: TrafficScope::Internal,
        },
        endpoints: internal,
        destinations: cluster_keys
            .iter()
            .map(|k| (*k, internal_verdict))
            .collect(),
    };
    let mut listeners = Vec::with_capacity(2);
    if separate {
        listeners.push(internal_plan);
        listeners.push(ListenerPlan {
            key: ListenerKey {
                port: spec.name.clone(),
                family,
                scope: TrafficScope::External,
            },
            endpoints: external,
            destinations: external_keys
                .iter()
                .map(|k| (*k, member_or(k, external_verdict)))
                .collect(),
        });
    } else {
        internal_plan.destinations.extend(
            external_keys
                .iter()
                .map(|k| (*k, member_or(k, external_verdict))),
        );
        listeners.push(internal_plan);
    }
    PortPlan {
        listeners,
        local_ready: sel.local_ready,
        no_local_internal: spec.internal_local && internal_verdict == Verdict::Drop,
        no_local_external: accessible && spec.external_local && external_verdict == Verdict::Drop,
    }
}

/// Owns the running state: listeners, balancers and the rule table.
pub struct Reconciler<N: Nft, L: Listeners> {
    config: ReconcilerConfig,
    state: ClusterState,
    listeners: L,
    /// Ordered by Service first, so one Service's listeners are a range.
    active: BTreeMap<ListenerKey, ActivePort>,
    rules: RuleTable<N>,
    /// Listeners whose rules are gone from what we want, waiting for a sync
    /// that succeeds before they close.
    closing: Vec<(ListenerKey, ActivePort)>,
    /// This node's name and zone as used now.
    node: NodeTopology,
    /// Whether `/healthz` may call the node eligible (from the Node object).
    node_eligible: bool,
    /// Service ports whose ClusterIP (resp. external) traffic is dropped for
    /// want of a local endpoint: kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`.
    no_local_internal: BTreeSet<ServicePortName>,
    no_local_external: BTreeSet<ServicePortName>,
    /// Services with `externalTrafficPolicy: Local` and a
    /// `healthCheckNodePort`: the port, and their ready local endpoints
    /// summed over their ports (as kube-proxy counts them).
    health_checks: BTreeMap<ObjectKey, (u16, usize)>,
    /// Serves `health_checks` (absent in unit tests).
    health_servers: Option<Arc<ServiceHealthServers>>,
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
            node: config.node.clone(),
            node_eligible: true,
            no_local_internal: BTreeSet::new(),
            no_local_external: BTreeSet::new(),
            health_checks: BTreeMap::new(),
            health_servers: None,
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
            Update::Nodes(all) => {
                // Not listed: not seen (yet), which counts as eligible.
                let mine = all.into_iter().find(|n| *n.key.name == *self.node.name);
                let eligible = mine.as_ref().is_none_or(|n| n.eligible);
                self.apply_node(mine.and_then(|n| n.zone), eligible);
            }
            Update::NodeApplied(n) if *n.key.name == *self.node.name => {
                self.apply_node(n.zone, n.eligible)
            }
            Update::NodeApplied(_) => {}
            // Deleted: as kube-proxy, a node going away is not eligible.
            Update::NodeDeleted(k) if *k.name == *self.node.name => self.apply_node(None, false),
            Update::NodeDeleted(_) => {}
        }
    }

    /// What this node's Node object says now: its zone label, and whether
    /// it may get traffic.
    fn apply_node(&mut self, zone: Option<String>, eligible: bool) {
        if eligible != self.node_eligible {
            info!(node = %self.node.name, eligible, "node eligibility changed");
            self.node_eligible = eligible;
            self.observe_node_eligible(eligible);
        }
        if self.config.node.zone.is_some() {
            return;
        }
        if zone != self.node.zone {
            info!(node = %self.node.name, zone = ?zone, "node zone changed; topology hints are applied again");
            self.node.zone = zone;
            let all = self.state.all_service_keys();
            self.pending_keys.extend(all);
        }
    }

    /// Serves the health check node ports from now on.
    pub fn with_service_health(mut self, servers: Arc<ServiceHealthServers>) -> Self {
        self.health_servers = Some(servers);
        self
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
        for (key, port) in std::mem::take(&mut self.active) {
            self.listeners.close_now(&key, port.listener);
        }
        for (key, port) in std::mem::take(&mut self.closing) {
            self.listeners.close_now(&key, port.listener);
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
        let mut plans: Vec<(ServicePortSpec, PortPlan)> = Vec::new();
        let mut off: BTreeSet<IpFamily> = BTreeSet::new();
        for spec in desired {
            for family in spec.families() {
                if served.contains(&family) {
                    let plan = plan_port(&spec, &self.node, family);
                    plans.push((spec.clone(), plan));
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
        let wanted: BTreeSet<&ListenerKey> = plans
            .iter()
            .flat_map(|(_, p)| p.listeners.iter().map(|l| &l.key))
            .collect();
        let gone: Vec<ListenerKey> = self
            .active
            .range(service_range(key))
            .take_while(|(n, _)| n.port.service == *key)
            .map(|(n, _)| n.clone())
            .filter(|n| !wanted.contains(n))
            .collect();
        for name in gone {
            if let Some(port) = self.active.remove(&name) {
                for d in &port.destinations {
                    self.rules.release(*d, &name.port);
                }
                info!(listener = %name, proxy_port = port.listener.port, "service port removed");
                self.closing.push((name, port));
            }
        }
        self.no_local_internal.retain(|n| n.service != *key);
        self.no_local_external.retain(|n| n.service != *key);
        let mut local_ready = 0;
        for (spec, plan) in plans {
            local_ready += plan.local_ready;
            if plan.no_local_internal {
                self.no_local_internal.insert(spec.name.clone());
            }
            if plan.no_local_external {
                self.no_local_external.insert(spec.name.clone());
            }
            for listener in plan.listeners {
                if let Err(true) = self.reconcile_listener(&spec, listener) {
                    self.retry.insert(key.clone());
                }
            }
        }
        let health_check = self.state.service(key).and_then(|s| {
            s.health_check_node_port
                .filter(|_| s.external_local)
                .map(|p| (p, local_ready))
        });
        let changed = match health_check {
            Some(hc) => self.health_checks.insert(key.clone(), hc) != Some(hc),
            None => self.health_checks.remove(key).is_some(),
        };
        if changed && let Some(servers) = &self.health_servers {
            servers.set(key, health_check);
        }
    }

    /// Creates or updates one listener. `Err(true)` asks for a retry later.
    fn reconcile_listener(
        &mut self,
        spec: &ServicePortSpec,
        plan: ListenerPlan,
    ) -> Result<(), bool> {
        // Sorted: the plan's keys come from a BTreeMap.
        let destinations: Vec<Key> = plan.destinations.keys().copied().collect();
        if !self.active.contains_key(&plan.key) {
            let port = self.start_listener(&plan.key, spec, &destinations)?;
            self.active.insert(plan.key.clone(), port);
        }
        let Some(port) = self.active.get_mut(&plan.key) else {
            return Err(true);
        };
        let same_endpoints = port
            .balancer
            .endpoints()
            .addrs()
            .eq(plan.endpoints.iter().copied());
        if !same_endpoints
            || port.balancer.algorithm() != spec.algorithm
            || port.balancer.session_affinity() != spec.session_affinity
        {
            debug!(listener = %plan.key, endpoints = plan.endpoints.len(), algorithm = %spec.algorithm, session_affinity = %spec.session_affinity, "endpoints updated");
            port.balancer
                .update(&plan.endpoints, spec.algorithm, spec.session_affinity);
        }

        for old in port
            .destinations
            .iter()
            .filter(|k| destinations.binary_search(k).is_err())
        {
            self.rules.release(*old, &plan.key.port);
        }
        for (d, verdict) in &plan.destinations {
            let a = match (d, verdict) {
                (Key::Guarded(_) | Key::Allow(..), _) => Action::Member,
                (_, Verdict::Serve) => Action::Redirect(port.listener.port),
                (_, Verdict::Reject) => Action::Reject,
                (_, Verdict::Drop) => Action::Drop,
            };
            self.rules.claim(*d, &plan.key.port, a);
        }
        port.destinations = destinations;
        Ok(())
    }

    fn start_listener(
        &mut self,
        key: &ListenerKey,
        spec: &ServicePortSpec,
        destinations: &[Key],
    ) -> Result<ActivePort, bool> {
        let adopt = destinations.iter().find_map(|d| self.adopted.remove(d));
        let balancer = Arc::new(Balancer::new(spec.algorithm));
        let listener = match self.listeners.open(key, Arc::clone(&balancer), adopt) {
            Ok(l) => l,
            Err(ListenError::Unsupported(protocol)) => {
                debug!(listener = %key, %protocol, "only TCP and UDP are proxied; port not proxied");
                return Err(false);
            }
            Err(e) => {
                error!(listener = %key, error = %e, "cannot open a listener; retrying");
                return Err(true);
            }
        };
        self.rules.set_proxy_port(
            key.family,
            ProxyPort {
                protocol: spec.name.protocol,
                port: listener.port,
            },
            true,
        );
        let cluster_ips: Vec<IpAddr> =
            ServicePortSpec::of_family(&spec.cluster_ips, key.family).collect();
        info!(
            listener = %key,
            proxy_port = listener.port,
            adopted = adopt == Some(listener.port),
            cluster_ips = ?cluster_ips,
            port = spec.port,
            algorithm = %spec.algorithm,
            "service port added"
        );
        Ok(ActivePort {
            listener,
            balancer,
            destinations: Vec::new(),
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
        scope: TrafficScope::Internal,
    };
    (Bound::Included(lo), Bound::Unbounded)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{NodeInfo, PortSpec, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort};

    impl<N: Nft, L: Listeners> Reconciler<N, L> {
        fn observer_health_eligible(&self) -> bool {
            self.observer.health_check().node_eligible
        }
    }
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
                zone_hints: Vec::new(),
                node_hints: Vec::new(),
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
                node: NodeTopology {
                    name: "node-a".into(),
                    zone: None,
                },
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
        r.apply(Update::Services(svcs.into_iter().map(Arc::new).collect()));
        r.apply(Update::Slices(slices.into_iter().map(Arc::new).collect()));
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
            Arc::new(service("a", "10.96.0.10")),
            Arc::new(service("b", "10.96.0.11")),
        ]));
        r.receive(Update::Slices(vec![Arc::new(slice("a", "10.1.0.1"))]));
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
            Arc::new(slice("a", "10.1.0.1")),
            Arc::new(slice("b", "10.1.0.2")),
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

    fn slice_on(service: &str, endpoints: &[(&str, &str, bool)]) -> SliceInfo {
        let mut s = slice(service, "10.1.0.1");
        s.endpoints = endpoints
            .iter()
            .map(|(ip, node, ready)| SliceEndpoint {
                address: ip.parse().unwrap(),
                ready: *ready,
                serving: true,
                terminating: !*ready,
                node_name: Some(node.to_string()),
                zone_hints: Vec::new(),
                node_hints: Vec::new(),
            })
            .collect();
        s
    }

    fn node_port_v4(port: u16) -> Key {
        Key::NodePort(
            IpFamily::V4,
            ProxyPort {
                protocol: Protocol::Tcp,
                port,
            },
        )
    }

    fn with_node_port(mut s: ServiceInfo) -> ServiceInfo {
        s.ports[0].node_port = Some(30080);
        s
    }

    fn kernel(fake: &FakeNft, key: &Key) -> Option<Action> {
        fake.table()?.elements.get(key).copied()
    }

    #[tokio::test]
    async fn internal_local_without_local_endpoints_drops_and_without_any_rejects() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        let mut svc = service("web", "10.96.0.10");
        svc.internal_local = true;
        load(
            &mut r,
            vec![svc.clone()],
            vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
        )
        .await;
        assert_eq!(kernel(&fake, &dest("10.96.0.10")), Some(Action::Drop));
        assert_eq!(r.no_local_internal.len(), 1);
        // A local endpoint: served by it alone.
        load(
            &mut r,
            vec![svc.clone()],
            vec![slice_on(
                "web",
                &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", true)],
            )],
        )
        .await;
        assert!(matches!(
            kernel(&fake, &dest("10.96.0.10")),
            Some(Action::Redirect(_))
        ));
        assert!(r.no_local_internal.is_empty());
        // No usable endpoint anywhere: refused, as without the policy.
        load(&mut r, vec![svc], vec![slice_on("web", &[])]).await;
        assert_eq!(kernel(&fake, &dest("10.96.0.10")), Some(Action::Reject));
    }

    #[tokio::test]
    async fn external_local_gets_a_listener_of_its_own_with_local_endpoints() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        let mut svc = with_node_port(service("web", "10.96.0.10"));
        svc.external_local = true;
        svc.health_check_node_port = Some(32000);
        load(
            &mut r,
            vec![svc.clone()],
            vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
        )
        .await;
        // ClusterIP traffic goes to the remote endpoint; the node port is
        // dropped (no local endpoint).
        assert!(matches!(
            kernel(&fake, &dest("10.96.0.10")),
            Some(Action::Redirect(_))
        ));
        assert_eq!(kernel(&fake, &node_port_v4(30080)), Some(Action::Drop));
        assert_eq!(r.no_local_external.len(), 1);
        assert_eq!(
            r.health_checks.get(&ObjectKey::new("default", "web")),
            Some(&(32000, 0))
        );
        assert_eq!(listeners.log().open.len(), 2);

        load(
            &mut r,
            vec![svc.clone()],
            vec![slice_on(
                "web",
                &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", true)],
            )],
        )
        .await;
        let (Some(Action::Redirect(cluster)), Some(Action::Redirect(external))) = (
            kernel(&fake, &dest("10.96.0.10")),
            kernel(&fake, &node_port_v4(30080)),
        ) else {
            panic!("both redirected: {:?}", fake.table());
        };
        assert_ne!(cluster, external, "external traffic has its own listener");
        let ext = r
            .active
            .values()
            .find(|p| p.listener.port == external)
            .unwrap();
        assert_eq!(ext.endpoints(), ["10.1.0.1:8080".parse().unwrap()]);
        assert_eq!(
            r.health_checks.get(&ObjectKey::new("default", "web")),
            Some(&(32000, 1))
        );

        // Back to Cluster: one listener again, the other closes after the
        // sync that moved the node port.
        svc.external_local = false;
        load(
            &mut r,
            vec![svc],
            vec![slice_on("web", &[("10.1.0.2", "node-b", true)])],
        )
        .await;
        assert_eq!(
            kernel(&fake, &node_port_v4(30080)),
            Some(Action::Redirect(cluster))
        );
        assert_eq!(listeners.log().closed, [external]);
        assert!(r.health_checks.is_empty());
        assert!(r.no_local_external.is_empty());
    }

    #[tokio::test]
    async fn the_local_set_falls_back_to_terminating_local_endpoints() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        let mut svc = service("web", "10.96.0.10");
        svc.internal_local = true;
        load(
            &mut r,
            vec![svc],
            vec![slice_on(
                "web",
                &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", false)],
            )],
        )
        .await;
        let port = r.active.values().next().unwrap();
        assert_eq!(port.endpoints(), ["10.1.0.1:8080".parse().unwrap()]);
    }

    #[tokio::test]
    async fn a_node_object_sets_the_zone_and_eligibility() {
        let (fake, listeners) = (FakeNft::default(), FakeListeners::default());
        let mut r = reconciler(&fake, &listeners, HashMap::new());
        // A list without this node's object: not seen, eligible.
        r.receive(Update::Nodes(vec![]));
        assert!(r.node_eligible);
        let mut s = slice_on(
            "web",
            &[("10.1.0.1", "node-a", true), ("10.1.0.2", "node-b", true)],
        );
        s.endpoints[0].zone_hints = vec!["z1".into()];
        s.endpoints[1].zone_hints = vec!["z2".into()];
        load(&mut r, vec![service("web", "10.96.0.10")], vec![s]).await;
        assert_eq!(r.active.values().next().unwrap().endpoints().len(), 2);
        r.receive(Update::Nodes(vec![NodeInfo {
            key: ObjectKey::new("", "node-a"),
            zone: Some("z2".into()),
            eligible: false,
        }]));
        r.sync().await;
        assert_eq!(
            r.active.values().next().unwrap().endpoints(),
            ["10.1.0.2:8080".parse().unwrap()]
        );
        assert!(!r.node_eligible);
        assert!(!r.observer_health_eligible());
        // Another node's object changes nothing.
        r.receive(Update::NodeApplied(NodeInfo {
            key: ObjectKey::new("", "node-b"),
            zone: Some("z1".into()),
            eligible: true,
        }));
        r.sync().await;
        assert!(!r.node_eligible);
        // Eligible again, then deleted: not eligible.
        r.receive(Update::NodeApplied(NodeInfo {
            key: ObjectKey::new("", "node-a"),
            zone: Some("z2".into()),
            eligible: true,
        }));
        assert!(r.node_eligible);
        r.receive(Update::NodeDeleted(ObjectKey::new("", "node-a")));
        assert!(!r.node_eligible);
    }
}
