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
//! Nothing is synced until the source has delivered its complete initial
//! Services *and* EndpointSlices, so a restart never flaps a Service through
//! "no endpoints".

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::model::{
    Algorithm, ClusterState, ObjectKey, Protocol, ServicePortName, ServicePortSpec,
};
use crate::proxy::DataPathConfig;
use crate::proxy::balancer::Balancer;
use crate::proxy::ports::ProxyPortAllocator;
use crate::proxy::tcp;
use crate::rules::{Action, Destination, ProxyPort, RuleTable, SyncKind};
use crate::source::Update;

/// How long to wait before retrying a failed rule sync or listener.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// Used by Services without the `kube-uproxy.io/lb-algorithm` annotation.
    pub default_algorithm: Algorithm,
    pub data_path: Arc<DataPathConfig>,
}

/// A Service port that has a listener.
struct ActivePort {
    spec: ServicePortSpec,
    proxy_port: u16,
    balancer: Arc<Balancer>,
    /// Stops the accept loop (open connections are not affected).
    stop: CancellationToken,
    /// The destinations whose rules point at this port.
    destinations: BTreeSet<Destination>,
}

/// Owns the running state: listeners, balancers and the rule table.
pub struct Reconciler {
    config: ReconcilerConfig,
    state: ClusterState,
    ports: ProxyPortAllocator,
    /// Ordered by Service first, so one Service's ports are a range.
    active: BTreeMap<ServicePortName, ActivePort>,
    rules: RuleTable,
    /// Services whose last reconcile could not finish (e.g. no free port).
    retry: BTreeSet<ObjectKey>,
    /// Services to reconcile at the next sync besides the dirty ones.
    pending_keys: BTreeSet<ObjectKey>,
    services_synced: bool,
    slices_synced: bool,
}

impl Reconciler {
    pub fn new(config: ReconcilerConfig, ports: ProxyPortAllocator) -> Self {
        Reconciler {
            config,
            state: ClusterState::new(),
            ports,
            active: BTreeMap::new(),
            rules: RuleTable::new(),
            retry: BTreeSet::new(),
            pending_keys: BTreeSet::new(),
            services_synced: false,
            slices_synced: false,
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

    /// Runs until `cancel` fires or the source closes its channel; then stops
    /// every listener. Removing the rules is the caller's job.
    pub async fn run(mut self, mut updates: Receiver<Update>, cancel: CancellationToken) {
        // A deadline, not a fresh sleep per pass: under a steady stream of
        // updates a retry must still come due.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let need_retry = self.synced() && (self.rules.has_pending() || !self.retry.is_empty());
            if !need_retry {
                retry_at = None;
            } else if retry_at.is_none() {
                retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
            }
            let retry_deadline = retry_at.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                u = updates.recv() => match u {
                    Some(u) => self.apply(u),
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
            }
            // Take everything already queued: one sync for a burst.
            while let Ok(u) = updates.try_recv() {
                self.apply(u);
            }
            if self.synced() {
                self.sync().await;
            }
        }
        for (_, port) in std::mem::take(&mut self.active) {
            port.stop.cancel();
        }
    }

    /// Brings listeners, balancers and rules in line with the state.
    pub async fn sync(&mut self) {
        let started = std::time::Instant::now();
        let mut dirty = self.state.take_dirty();
        dirty.append(&mut self.pending_keys);
        let mut closing = Vec::new();
        for key in &dirty {
            closing.extend(self.reconcile_service(key));
        }
        let reconciled = started.elapsed();
        if self.rules.has_pending() {
            match self.rules.sync().await {
                Ok((SyncKind::Unchanged, _)) => {}
                Ok((kind, took)) => info!(
                    ?kind,
                    services = self.state.service_count(),
                    service_ports = self.active.len(),
                    changed_services = dirty.len(),
                    reconcile_ms = reconciled.as_secs_f64() * 1e3,
                    nft_ms = took.as_secs_f64() * 1e3,
                    "rules synced"
                ),
                Err(e) => error!(error = %e, "rule sync failed; retrying"),
            }
        }
        // Only now that no rule points at them do listeners go away.
        for (name, port) in closing {
            port.stop.cancel();
            self.ports.release(name.protocol, port.proxy_port);
            // Dropped from the guard set at the next sync (or re-added if
            // the port is handed out again before then).
            self.rules.set_proxy_port(
                ProxyPort {
                    protocol: name.protocol,
                    port: port.proxy_port,
                },
                false,
            );
        }
    }

    /// Reconciles one Service's ports; returns the ports to close after the
    /// rule sync.
    fn reconcile_service(&mut self, key: &ObjectKey) -> Vec<(ServicePortName, ActivePort)> {
        let desired = self.state.service_ports(key, self.config.default_algorithm);
        let wanted: BTreeSet<&ServicePortName> = desired.iter().map(|s| &s.name).collect();
        let gone: Vec<ServicePortName> = self
            .active
            .range(service_range(key))
            .take_while(|(n, _)| n.service == *key)
            .map(|(n, _)| n.clone())
            .filter(|n| !wanted.contains(n))
            .collect();
        let mut closing = Vec::new();
        for name in gone {
            if let Some(port) = self.active.remove(&name) {
                for d in &port.destinations {
                    self.rules.set(*d, None);
                }
                info!(service_port = %name, proxy_port = port.proxy_port, "service port removed");
                closing.push((name, port));
            }
        }
        for spec in desired {
            if let Err(true) = self.reconcile_port(spec) {
                self.retry.insert(key.clone());
            }
        }
        closing
    }

    /// Creates or updates one port. `Err(true)` asks for a retry later.
    fn reconcile_port(&mut self, spec: ServicePortSpec) -> Result<(), bool> {
        if spec.name.protocol != Protocol::Tcp {
            warn!(service_port = %spec.name, "only TCP is proxied so far; port not proxied");
            return Err(false);
        }
        let usable = spec.usable_endpoints();
        if !self.active.contains_key(&spec.name) {
            let port = self.start_listener(&spec)?;
            self.active.insert(spec.name.clone(), port);
        }
        let Some(port) = self.active.get_mut(&spec.name) else {
            return Err(true);
        };
        if port.spec.endpoints != spec.endpoints || port.balancer.algorithm() != spec.algorithm {
            debug!(service_port = %spec.name, endpoints = usable.len(), algorithm = %spec.algorithm, "endpoints updated");
        }
        port.balancer.update(&usable, spec.algorithm);

        let action = if usable.is_empty() {
            Action::Reject
        } else {
            Action::Redirect(port.proxy_port)
        };
        let destinations = destinations(&spec);
        for old in port.destinations.difference(&destinations) {
            self.rules.set(*old, None);
        }
        for d in &destinations {
            self.rules.set(*d, Some(action));
        }
        port.destinations = destinations;
        port.spec = spec;
        Ok(())
    }

    fn start_listener(&mut self, spec: &ServicePortSpec) -> Result<ActivePort, bool> {
        let (socket, proxy_port) = match self.ports.bind(spec.name.protocol) {
            Ok(s) => s,
            Err(e) => {
                error!(service_port = %spec.name, error = %e, "cannot open a listener; retrying");
                return Err(true);
            }
        };
        let balancer = Arc::new(Balancer::new(spec.algorithm));
        let stop = CancellationToken::new();
        let name = Arc::new(spec.name.clone());
        if let Err(e) = tcp::spawn(
            name,
            socket.into(),
            Arc::clone(&balancer),
            Arc::clone(&self.config.data_path),
            stop.clone(),
        ) {
            error!(service_port = %spec.name, error = %e, "cannot start the listener; retrying");
            self.ports.release(spec.name.protocol, proxy_port);
            return Err(true);
        }
        self.rules.set_proxy_port(
            ProxyPort {
                protocol: spec.name.protocol,
                port: proxy_port,
            },
            true,
        );
        info!(
            service_port = %spec.name,
            proxy_port,
            cluster_ips = ?spec.cluster_ips,
            port = spec.port,
            algorithm = %spec.algorithm,
            "service port added"
        );
        Ok(ActivePort {
            spec: spec.clone(),
            proxy_port,
            balancer,
            stop,
            destinations: BTreeSet::new(),
        })
    }
}

/// Every destination the kernel should catch for this port. IPv6 cluster
/// IPs are not redirected yet (the table is IPv4).
fn destinations(spec: &ServicePortSpec) -> BTreeSet<Destination> {
    spec.cluster_ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(Destination {
                ip: *v4,
                protocol: spec.name.protocol,
                port: spec.port,
            }),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// From the first possible port of one Service onwards, in the `active`
/// map's order (callers stop when the Service changes).
fn service_range(key: &ObjectKey) -> (Bound<ServicePortName>, Bound<ServicePortName>) {
    let lo = ServicePortName {
        service: key.clone(),
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    (Bound::Included(lo), Bound::Unbounded)
}
