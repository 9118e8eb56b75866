//! What the reconciler tells the outside world: kube-proxy's sync metrics,
//! the health state behind `/healthz`, and the `/debug/services` report.
//!
//! Kept apart from the reconciling itself: nothing here changes what is
//! reconciled. `reconcile.rs` only calls in at the moments that matter
//! (Services changed by an update, a sync that failed or succeeded, the
//! Node's eligibility, drift found, a report asked for).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{ActivePort, Reconciler};
use crate::admin::status::{EndpointReport, PortReport, ServicesReport};
use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::model::{ListenerKey, ObjectKey, ServicePortSpec};
use crate::proxy::listeners::Listeners;
use crate::rules::{Action, Key, Nft};

/// Where the reconciler reports to (given by [`Reconciler::with_telemetry`]).
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    /// Requests for a `/debug/services` report.
    pub reports: mpsc::Receiver<oneshot::Sender<ServicesReport>>,
}

/// The reconciler's side of the telemetry.
pub(super) struct Observer {
    pub(super) metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    /// Taken by `run` (the loop waits on it beside the updates).
    pub(super) reports: Option<mpsc::Receiver<oneshot::Sender<ServicesReport>>>,
    /// When each Service with changes not yet applied received its first
    /// one: the start of its network programming latency.
    queued: HashMap<ObjectKey, Instant>,
    /// Services changed as Services / in their endpoints since the last
    /// successful sync (kube-proxy's `*_changes_pending`).
    pending_services: HashSet<ObjectKey>,
    pending_endpoints: HashSet<ObjectKey>,
}

impl Default for Observer {
    /// Reports to nobody (unit tests, and callers that serve no metrics).
    fn default() -> Self {
        Observer {
            metrics: Arc::new(Metrics::new(false)),
            health: Arc::new(ProxyHealth::new(std::time::Duration::from_secs(30))),
            reports: None,
            queued: HashMap::new(),
            pending_services: HashSet::new(),
            pending_endpoints: HashSet::new(),
        }
    }
}

impl Observer {
    /// The `/healthz` verdict as of now (unit tests).
    #[cfg(test)]
    pub(super) fn health_check(&self) -> crate::health::Verdict {
        self.health.check(false)
    }
}

/// The next report request, or never when there is no channel (or it
/// closed).
pub(super) async fn next_report(
    reports: &mut Option<mpsc::Receiver<oneshot::Sender<ServicesReport>>>,
) -> oneshot::Sender<ServicesReport> {
    if let Some(rx) = reports {
        if let Some(reply) = rx.recv().await {
            return reply;
        }
        *reports = None;
    }
    std::future::pending().await
}

impl<N: Nft, L: Listeners> Reconciler<N, L> {
    /// Reports to `telemetry` from now on.
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.observer = Observer {
            metrics: telemetry.metrics,
            health: telemetry.health,
            reports: Some(telemetry.reports),
            queued: HashMap::new(),
            pending_services: HashSet::new(),
            pending_endpoints: HashSet::new(),
        };
        self
    }

    /// One update changed the Services `changed` (`endpoints`: it was an
    /// update of EndpointSlices): counts them (kube-proxy's service /
    /// endpoint change counters) and notes when each first had a change
    /// waiting (health, programming latency).
    pub(super) fn observe_changes(&mut self, changed: &BTreeSet<ObjectKey>, endpoints: bool) {
        let n = changed.len() as u64;
        if n == 0 {
            return;
        }
        let o = &mut self.observer;
        if endpoints {
            o.metrics.endpoint_changes(n);
            o.pending_endpoints.extend(changed.iter().cloned());
        } else {
            o.metrics.service_changes(n);
            o.pending_services.extend(changed.iter().cloned());
        }
        o.metrics
            .changes_pending(o.pending_services.len(), o.pending_endpoints.len());
        o.metrics.queued_now();
        let now = Instant::now();
        for key in changed {
            self.observer.queued.entry(key.clone()).or_insert(now);
        }
        self.observer.health.queued();
    }

    /// nft refused a sync.
    pub(super) fn observe_sync_failed(&mut self) {
        self.observer.metrics.sync_failed();
        self.observer.health.rules_failed();
    }

    /// A sync succeeded: every change received so far is applied.
    /// `worked`: it had something to reconcile or send to the kernel;
    /// `full`: the table was written whole (`Some(true)`) or only changed
    /// elements were sent (`Some(false)`).
    pub(super) fn observe_synced(
        &mut self,
        started: std::time::Instant,
        worked: bool,
        full: Option<bool>,
    ) {
        let m = &self.observer.metrics;
        let took = started.elapsed();
        if worked {
            m.sync_duration(took);
        }
        if let Some(full) = full {
            m.sync_kind_duration(full, took);
        }
        self.observer.pending_services.clear();
        self.observer.pending_endpoints.clear();
        m.changes_pending(0, 0);
        m.synced_now();
        let now = Instant::now();
        for (_, at) in self.observer.queued.drain() {
            m.network_programmed(now.saturating_duration_since(at));
        }
        self.observer.health.updated();
        m.no_local_endpoints(self.no_local_internal.len(), self.no_local_external.len());
    }

    /// The Node object says whether `/healthz` may call the node eligible.
    pub(super) fn observe_node_eligible(&self, eligible: bool) {
        self.observer.health.set_node_eligible(eligible);
    }

    /// The drift check found the kernel's table changed.
    pub(super) fn observe_drift(&self) {
        self.observer.metrics.drift_repaired();
    }

    /// Answers a `/debug/services` request.
    pub(super) fn answer_report(&self, reply: oneshot::Sender<ServicesReport>) {
        // The asker may have given up; nothing to do then.
        let _ = reply.send(self.report());
    }

    /// Every Service port with a listener: addresses, proxy port, rule,
    /// endpoints with their conditions and open connections.
    pub fn report(&self) -> ServicesReport {
        let verdict = self.observer.health.check(false);
        let applied = self.rules.applied();
        let mut service_ports: Vec<PortReport> = self
            .active
            .iter()
            .map(|(name, port)| self.port_report(name, port, "active", &applied))
            .collect();
        service_ports.extend(
            self.closing
                .iter()
                .map(|(name, port)| self.port_report(name, port, "closing", &applied)),
        );
        ServicesReport {
            proxy_address: self.rules.layout().proxy_address.to_string(),
            healthy: verdict.healthy,
            unhealthy_reason: verdict.reason.map(str::to_string),
            source_synced: self.synced(),
            service_ports,
        }
    }

    fn port_report(
        &self,
        key: &ListenerKey,
        port: &ActivePort,
        state: &str,
        applied: &std::collections::BTreeMap<Key, Action>,
    ) -> PortReport {
        let (name, family) = (&key.port, key.family);
        // The spec as the model has it now (a closing listener's Service
        // port may be gone from it: then no addresses and no endpoints).
        let spec = self
            .state
            .service_ports(&name.service, self.config.default_algorithm)
            .into_iter()
            .find(|s| s.name == *name);
        let set = port.balancer.endpoints();
        let open: HashMap<SocketAddr, usize> = set.iter().map(|e| (e.addr, e.active())).collect();
        // What this listener's first key gets (a closing listener
        // released its keys: it has none left to show).
        let dests: &[Key] = &port.destinations;
        let rule = match dests.first().map(|d| self.rules.desired(d)) {
            None => "none",
            Some(_) if state != "active" => "removed",
            Some(Some(Action::Redirect(p))) if p == port.listener.port => "redirect",
            Some(Some(Action::Redirect(_))) => "held by another Service port",
            Some(Some(Action::Reject)) => "reject",
            Some(Some(Action::Drop)) => "drop (no local endpoint)",
            Some(Some(Action::Member)) => "member",
            Some(None) => "none",
        };
        let rule_applied = dests
            .iter()
            .all(|d| applied.get(d).copied() == self.rules.desired(d));
        PortReport {
            namespace: name.service.namespace.to_string(),
            service: name.service.name.to_string(),
            port_name: name.port.clone(),
            protocol: name.protocol.to_string(),
            ip_family: family.to_string(),
            cluster_ips: spec
                .iter()
                .flat_map(|s| ServicePortSpec::of_family(&s.cluster_ips, family))
                .map(|ip| ip.to_string())
                .collect(),
            port: spec.as_ref().map_or(0, |s| s.port),
            proxy_port: port.listener.port,
            algorithm: port.balancer.algorithm().to_string(),
            state: match key.scope {
                crate::model::TrafficScope::Internal => state.to_string(),
                crate::model::TrafficScope::External => format!("{state} (external traffic)"),
            },
            rule: rule.to_string(),
            rule_applied,
            open_connections: self.observer.metrics.active_connections(name).unwrap_or(0),
            endpoints: spec
                .iter()
                .flat_map(|s| s.endpoints_of(family))
                .map(|e| EndpointReport {
                    address: e.addr.to_string(),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    node_name: e.node_name.clone(),
                    usable: set.contains(e.addr),
                    open_connections: open.get(&e.addr).copied().unwrap_or(0),
                })
                .collect(),
        }
    }
}
