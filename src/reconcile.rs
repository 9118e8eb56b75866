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
//! What each Service port needs (its listeners, their endpoints, what the
//! kernel does with each of its keys) is decided in `reconcile/plan.rs`,
//! which is pure; this file applies the plans and keeps the order above.
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

use crate::admin::status::ServicesReport;
use crate::health::ServiceHealthServers;
use crate::model::{
    Algorithm, ClusterState, IpFamily, ListenerKey, NodeInfo, NodeTopology, ObjectKey, Protocol,
    ServicePortName, ServicePortSpec, TrafficScope,
};
use crate::proxy::balancer::Balancer;
use crate::proxy::listeners::{ListenError, Listener, Listeners};
use crate::rules::render::LocalTraffic;
use crate::rules::{Key, Nft, ProxyPort, RuleTable, SyncKind, Verified};
use crate::source::Update;

mod observe;
mod plan;
mod report;
pub use observe::Telemetry;
use plan::{ListenerPlan, PortPlan, plan_port};

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
    /// `--request-balancing`: false balances every port per connection,
    /// whatever its `appProtocol`.
    pub request_balancing: bool,
    /// `--nodeport-addresses primary`: node ports are caught on the Node
    /// object's primary IPs, and follow them when they change (until the
    /// Node is known, on what the layout was started with).
    pub nodeport_primary: bool,
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

impl ActivePort {
    /// This listener as the status report sees it.
    fn view<'a>(&'a self, key: &'a ListenerKey, state: &'static str) -> report::PortView<'a> {
        report::PortView {
            key,
            state,
            proxy_port: self.listener.port,
            balancer: &self.balancer,
            destinations: &self.destinations,
        }
    }
}

#[cfg(test)]
impl ActivePort {
    /// The endpoints its balancer holds.
    fn endpoints(&self) -> Vec<std::net::SocketAddr> {
        self.balancer.endpoints().addrs().collect()
    }
}

/// How bringing one listener in line with its plan went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListenerOutcome {
    /// The listener runs with the plan's endpoints and claims its keys.
    Ready,
    /// It could not be opened now (e.g. no free proxy port): its Service is
    /// reconciled again after [`RETRY_AFTER`]. Its keys are not claimed
    /// meanwhile.
    RetryLater,
    /// It is never opened: the port's protocol is not proxied (only TCP and
    /// UDP are). Retrying would not help, so the Service is not retried;
    /// its keys are not claimed, so no rule of this proxy catches its
    /// traffic.
    NotProxied,
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
    /// Whether the wait for the Node's pod ranges (NodeCIDR) was logged.
    node_wait_logged: bool,
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
            node_wait_logged: false,
            observer: observe::Observer::default(),
        }
    }

    /// Reports to `telemetry` from now on.
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.observer = telemetry.into();
        self
    }

    /// Answers a `/debug/services` request.
    fn answer_report(&self, reply: tokio::sync::oneshot::Sender<ServicesReport>) {
        // The asker may have given up; nothing to do then.
        let _ = reply.send(self.report());
    }

    /// Every Service port with a listener: addresses, proxy port, rule,
    /// endpoints with their conditions and open connections.
    pub fn report(&self) -> ServicesReport {
        let verdict = self.observer.health.check(false);
        let cx = report::Context {
            state: &self.state,
            rules: &self.rules,
            metrics: &self.observer.metrics,
            default_algorithm: self.config.default_algorithm,
        };
        let service_ports = (self.active.iter().map(|(k, p)| p.view(k, "active")))
            .chain(self.closing.iter().map(|(k, p)| p.view(k, "closing")))
            .map(|v| report::port_report(&cx, v))
            .collect();
        ServicesReport {
            proxy_address: self.rules.layout().proxy_address.to_string(),
            healthy: verdict.healthy,
            unhealthy_reason: verdict.reason.map(str::to_string),
            source_synced: self.synced(),
            service_ports,
        }
    }

    fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }

    /// Applies an update from the source and queues the Services it
    /// changed for the next sync.
    fn receive(&mut self, update: Update) {
        let endpoints = matches!(
            update,
            Update::Slices(_) | Update::SliceApplied(_) | Update::SliceDeleted(_)
        );
        // The state's dirty set tells which Services this update changed;
        // what was dirty before goes where `sync` looks too.
        let mut before = self.state.take_dirty();
        self.pending_keys.append(&mut before);
        self.apply(update);
        let mut changed = self.state.take_dirty();
        self.observer.changes(&changed, endpoints);
        self.pending_keys.append(&mut changed);
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
                if let Some(n) = &mine {
                    self.apply_node_layout(n);
                }
                self.apply_node(mine.and_then(|n| n.zone), eligible);
            }
            Update::NodeApplied(n) if *n.key.name == *self.node.name => {
                self.apply_node_layout(&n);
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
            self.observer.node_eligible(eligible);
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

    /// What the Node object decides of the rules: the node-port addresses
    /// of `--nodeport-addresses primary` and the pod ranges of
    /// `--detect-local-mode NodeCIDR`. A Node that lists none keeps what
    /// was known (kube-proxy keeps what it started with). A change rewrites
    /// the whole table and plans every Service again (a family that gains
    /// local-traffic detection gains the pods' keys).
    fn apply_node_layout(&mut self, node: &NodeInfo) {
        let primary = self.config.nodeport_primary.then(|| node.primary_ips());
        let changed = self.rules.update_layout(|layout| {
            if let Some(ips) = primary.filter(|ips| !ips.is_empty()) {
                // kube-proxy: each family's primary IP, as a /32 or /128,
                // unless loopback (a family without one: all addresses).
                let nets = ips
                    .iter()
                    .filter(|ip| !ip.is_loopback())
                    .map(|ip| ipnet::IpNet::from(*ip))
                    .collect();
                layout.nodeport_addresses = Some(nets);
            }
            if let Some(LocalTraffic::NodePodCidrs(nets)) = &mut layout.local_traffic
                && !node.pod_cidrs.is_empty()
            {
                // One range per family, the first (kube-proxy's detector).
                let mut first: Vec<ipnet::IpNet> = Vec::new();
                for n in &node.pod_cidrs {
                    if !first
                        .iter()
                        .any(|f| f.addr().is_ipv4() == n.addr().is_ipv4())
                    {
                        first.push(*n);
                    }
                }
                *nets = first;
            }
        });
        if changed {
            let layout = self.rules.layout();
            info!(
                node = %self.node.name,
                nodeport_addresses = ?layout.nodeport_addresses,
                local_traffic = ?layout.local_traffic,
                "the Node object changed the rules' node addresses or pod ranges; writing the whole table"
            );
            let all = self.state.all_service_keys();
            self.pending_keys.extend(all);
        }
        // The health check node ports follow the node-port addresses
        // (kube-proxy binds them on the Node's primary IPs too); at each
        // event of the Node, not only when the rules change: a primary IP
        // may come up on an interface after the Node lists it, and a
        // failed listing is tried again.
        if self.config.nodeport_primary
            && let Some(servers) = &self.health_servers
        {
            match crate::rules::host::health_check_addresses(self.rules.layout()) {
                Ok(addresses) => servers.set_addresses(addresses),
                Err(e) => warn!(
                    error = %e,
                    "cannot list the node's addresses; the health check node ports stay where they are"
                ),
            }
        }
    }

    /// Whether the rules can be written: not while `--detect-local-mode
    /// NodeCIDR` waits for the Node's pod ranges, as kube-proxy waits for
    /// them before it programs anything (a pod would otherwise be taken for
    /// an external client).
    fn node_ready(&self) -> bool {
        !matches!(
            &self.rules.layout().local_traffic,
            Some(LocalTraffic::NodePodCidrs(nets)) if nets.is_empty()
        )
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
        self.rules.retry_refused();
        let verified = self.rules.verify().await;
        if matches!(verified, Ok(Verified::Drifted(_))) {
            self.observer.drift();
        }
        match verified {
            Ok(Verified::Drifted(problems)) => warn!(
                problems = %problems.join("; "),
                "the kernel's table differs from what was applied; writing it again"
            ),
            Ok(Verified::TakenBack { writer }) => warn!(
                writer = format_args!("{writer:08x}"),
                "the instance that had taken the rules over is gone; writing the whole table"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read the rules back to check them"),
        }
        self.observer.superseded(self.rules.writer().cloned());
    }

    /// Brings listeners, balancers and rules in line with the state.
    pub async fn sync(&mut self) {
        if !self.node_ready() {
            if !self.node_wait_logged {
                self.node_wait_logged = true;
                warn!(
                    node = %self.node.name,
                    "--detect-local-mode NodeCIDR: waiting for this node's Node object and its spec.podCIDRs before writing any rule (as kube-proxy waits for them); /healthz stays unhealthy meanwhile"
                );
            }
            return;
        }
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
                    self.observer.sync_failed();
                    false
                }
            }
        } else {
            true
        };
        self.observer.superseded(self.rules.writer().cloned());
        if !ok {
            return;
        }
        self.observer.metrics.refused(self.rules.refused().keys());
        self.observer.synced(
            started,
            worked,
            full,
            (self.no_local_internal.len(), self.no_local_external.len()),
        );
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
        let mut desired = self.state.service_ports(key, self.config.default_algorithm);
        if !self.config.request_balancing {
            for d in &mut desired {
                d.mode = crate::model::PortMode::Connection;
            }
        }
        let served = self.rules.layout().families();
        let mut plans: Vec<(ServicePortSpec, PortPlan)> = Vec::new();
        // The health check's local endpoints, per family: see below.
        let mut local_ready: BTreeMap<IpFamily, usize> = BTreeMap::new();
        let mut off: BTreeSet<IpFamily> = BTreeSet::new();
        for spec in desired {
            for family in spec.families() {
                if served.contains(&family) {
                    let local_traffic = self.rules.layout().local_source(family).is_some();
                    let plan = plan_port(&spec, &self.node, family, local_traffic);
                    *local_ready.entry(family).or_default() += plan.local_ready;
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
        // kube-proxy counts per family (one proxier per family): a
        // dual-stack pod is one local endpoint, not one per family. The
        // larger family's count, so that a node with local endpoints in
        // either family says so.
        let local_ready = local_ready.into_values().max().unwrap_or(0);
        for (spec, plan) in plans {
            if plan.no_local_internal {
                self.no_local_internal.insert(spec.name.clone());
            }
            if plan.no_local_external {
                self.no_local_external.insert(spec.name.clone());
            }
            for listener in plan.listeners {
                let outcome = self.reconcile_listener(&spec, listener);
                if outcome == ListenerOutcome::RetryLater {
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

    /// Creates or updates one listener.
    fn reconcile_listener(
        &mut self,
        spec: &ServicePortSpec,
        plan: ListenerPlan,
    ) -> ListenerOutcome {
        // Sorted: the plan's keys come from a BTreeMap.
        let destinations: Vec<Key> = plan.destinations.keys().copied().collect();
        if !self.active.contains_key(&plan.key) {
            match self.start_listener(
                &plan.key,
                spec,
                &destinations,
                &plan.endpoints,
                &plan.transparent,
            ) {
                Ok(port) => {
                    self.active.insert(plan.key.clone(), port);
                }
                Err(outcome) => return outcome,
            }
        }
        let Some(port) = self.active.get_mut(&plan.key) else {
            return ListenerOutcome::RetryLater;
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
        if port.balancer.mode() != spec.mode {
            debug!(listener = %plan.key, mode = %spec.mode, "balancing mode changed");
            port.balancer.set_mode(spec.mode);
        }
        if port.balancer.proxy_protocol() != spec.proxy_protocol {
            debug!(listener = %plan.key, proxy_protocol = ?spec.proxy_protocol, "PROXY protocol changed");
            port.balancer.set_proxy_protocol(spec.proxy_protocol);
        }
        if port.balancer.forwarded_headers() != spec.forwarded_headers {
            debug!(listener = %plan.key, forwarded_headers = %spec.forwarded_headers, "forwarded headers changed");
            port.balancer.set_forwarded_headers(spec.forwarded_headers);
        }
        if *port.balancer.transparent() != plan.transparent {
            debug!(listener = %plan.key, endpoints = ?plan.transparent, "endpoints reached from the client's address changed");
            port.balancer.set_transparent(&plan.transparent);
        }

        for old in port
            .destinations
            .iter()
            .filter(|k| destinations.binary_search(k).is_err())
        {
            self.rules.release(*old, &plan.key.port);
        }
        for (d, verdict) in &plan.destinations {
            let a = plan::action(d, *verdict, port.listener.port);
            self.rules.claim(*d, &plan.key.port, a);
        }
        port.destinations = destinations;
        ListenerOutcome::Ready
    }

    /// Opens the listener of `key`, on the proxy port an earlier instance
    /// gave one of its `destinations` if there is one. Fails with
    /// [`ListenerOutcome::RetryLater`] or [`ListenerOutcome::NotProxied`].
    ///
    /// `endpoints` are published to the balancer *before* the listener is
    /// opened: opening joins the port's `SO_REUSEPORT` group, and on an
    /// adopted port (start, handover) the kernel hands the new socket a
    /// share of the connections at once. Opened with an empty balancer, it
    /// would reset them as "no endpoints" until the update that followed.
    fn start_listener(
        &mut self,
        key: &ListenerKey,
        spec: &ServicePortSpec,
        destinations: &[Key],
        endpoints: &[std::net::SocketAddr],
        transparent: &[std::net::SocketAddr],
    ) -> Result<ActivePort, ListenerOutcome> {
        let adopt = destinations.iter().find_map(|d| self.adopted.remove(d));
        let balancer = Arc::new(Balancer::new(spec.algorithm));
        balancer.update(endpoints, spec.algorithm, spec.session_affinity);
        balancer.set_mode(spec.mode);
        balancer.set_proxy_protocol(spec.proxy_protocol);
        balancer.set_forwarded_headers(spec.forwarded_headers);
        balancer.set_transparent(transparent);
        let listener = match self.listeners.open(key, Arc::clone(&balancer), adopt) {
            Ok(l) => l,
            Err(ListenError::Unsupported(protocol)) => {
                debug!(listener = %key, %protocol, "only TCP and UDP are proxied; port not proxied");
                return Err(ListenerOutcome::NotProxied);
            }
            Err(e) => {
                error!(listener = %key, error = %e, "cannot open a listener; retrying");
                return Err(ListenerOutcome::RetryLater);
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
mod tests;
