//! What the reconciler tells the outside world: kube-proxy's sync metrics
//! and the health state behind `/healthz` (the `/debug/services` report is
//! built in `report.rs`).
//!
//! Kept apart from the reconciling itself: nothing here changes what is
//! reconciled, and nothing here reads the reconciler. `reconcile.rs` calls
//! in at the moments that matter (Services changed by an update, a sync
//! that failed or succeeded, the Node's eligibility, drift found) with
//! what the [`Observer`] needs to know.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::admin::status::ServicesReport;
use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::model::ObjectKey;

/// Where the reconciler reports to (given by `Reconciler::with_telemetry`).
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    /// Requests for a `/debug/services` report.
    pub reports: mpsc::Receiver<oneshot::Sender<ServicesReport>>,
}

/// The reconciler's side of the telemetry.
pub(super) struct Observer {
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<ProxyHealth>,
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

impl From<Telemetry> for Observer {
    fn from(telemetry: Telemetry) -> Self {
        Observer {
            metrics: telemetry.metrics,
            health: telemetry.health,
            reports: Some(telemetry.reports),
            queued: HashMap::new(),
            pending_services: HashSet::new(),
            pending_endpoints: HashSet::new(),
        }
    }
}

impl Observer {
    /// One update changed the Services `changed` (`endpoints`: it was an
    /// update of EndpointSlices): counts them (kube-proxy's service /
    /// endpoint change counters) and notes when each first had a change
    /// waiting (health, programming latency).
    pub(super) fn changes(&mut self, changed: &BTreeSet<ObjectKey>, endpoints: bool) {
        let n = changed.len() as u64;
        if n == 0 {
            return;
        }
        if endpoints {
            self.metrics.endpoint_changes(n);
            self.pending_endpoints.extend(changed.iter().cloned());
        } else {
            self.metrics.service_changes(n);
            self.pending_services.extend(changed.iter().cloned());
        }
        self.metrics
            .changes_pending(self.pending_services.len(), self.pending_endpoints.len());
        self.metrics.queued_now();
        let now = Instant::now();
        for key in changed {
            self.queued.entry(key.clone()).or_insert(now);
        }
        self.health.queued();
    }

    /// nft refused a sync.
    pub(super) fn sync_failed(&self) {
        self.metrics.sync_failed();
        self.health.rules_failed();
    }

    /// A sync succeeded: every change received so far is applied.
    /// `worked`: it had something to reconcile or send to the kernel;
    /// `full`: the table was written whole (`Some(true)`) or only changed
    /// elements were sent (`Some(false)`); `no_local`: the Service ports
    /// without a local endpoint for internal and for external traffic.
    pub(super) fn synced(
        &mut self,
        started: std::time::Instant,
        worked: bool,
        full: Option<bool>,
        no_local: (usize, usize),
    ) {
        let m = &self.metrics;
        let took = started.elapsed();
        if worked {
            m.sync_duration(took);
        }
        if let Some(full) = full {
            m.sync_kind_duration(full, took);
        }
        self.pending_services.clear();
        self.pending_endpoints.clear();
        m.changes_pending(0, 0);
        m.synced_now();
        let now = Instant::now();
        for (_, at) in self.queued.drain() {
            m.network_programmed(now.saturating_duration_since(at));
        }
        self.health.updated();
        m.no_local_endpoints(no_local.0, no_local.1);
    }

    /// Another instance writes the rules (`Some`), or this one does.
    pub(super) fn superseded(&self, writer: Option<crate::rules::Writer>) {
        self.health.superseded(
            writer.map(|w| Box::new(move || w.alive()) as crate::health::proxy::WriterProbe),
        );
    }

    /// The Node object says whether `/healthz` may call the node eligible.
    pub(super) fn node_eligible(&self, eligible: bool) {
        self.health.set_node_eligible(eligible);
    }

    /// The drift check found the kernel's table changed.
    pub(super) fn drift(&self) {
        self.metrics.drift_repaired();
    }

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
