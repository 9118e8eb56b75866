//! The proxy's health, with kube-proxy's rules and JSON (`/healthz`,
//! `/livez`).
//!
//! kube-proxy's rule: unhealthy once an update has been queued for longer
//! than the health timeout (2 × `--sync-period`) without being applied.
//! kube-uproxy adds two conditions that kube-proxy does not have:
//! - unhealthy until the first sync of rules succeeded. kube-proxy reports
//!   healthy while it starts; here readiness gates the DaemonSet's rolling
//!   update (`maxSurge: 1`), and the old instance must not be stopped
//!   before the new one has its listeners and rules (docs/rules.md).
//! - unhealthy while the last attempt to install rules failed, rather than
//!   only after the timeout: the node's Service traffic is then served by
//!   stale rules, which an operator wants to see at once.
//!
//! - unhealthy while another instance has taken the rules over and is gone
//!   (killed, crashed) and this one has not taken them back yet: nobody
//!   writes the node's rules then. Superseded by an instance that runs is
//!   healthy: that is a handover in progress (docs/rules.md).
//!
//! `/healthz` also requires the node to be eligible (its Node object not
//! being deleted, no `ToBeDeletedByClusterAutoscaler` taint); `/livez`
//! ignores that. Eligible until the Node object says otherwise (as
//! kube-proxy: a proxy that never sees its Node stays eligible).

use std::sync::Mutex;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::{Duration, Instant, SystemTime};

/// A health answer as kube-proxy gives it: JSON `body`, 200 when `ok`,
/// else 503.
pub fn health_json(ok: bool, body: String) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// What the reconciler reports, and when.
#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// The last successful sync (`None`: none yet).
    last_updated: Option<(Instant, SystemTime)>,
    /// The oldest update received since the last successful sync.
    oldest_queued: Option<Instant>,
    /// The last attempt to install rules failed.
    rules_failing: bool,
    /// The Node object says the node is being deleted or drained by the
    /// cluster autoscaler.
    node_ineligible: bool,
}

/// One answer of the health endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    /// Why not, in words (logged and shown by `kube-uproxy status`).
    pub reason: Option<&'static str>,
    /// kube-proxy reports the current time as `lastUpdated` while healthy
    /// (its older releases' meaning: "the sync loop is alive"); otherwise
    /// the time of the last successful sync.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    pub node_eligible: bool,
}

/// Asked at each check: whether the instance that writes the rules instead
/// of this one still runs.
pub type WriterProbe = Box<dyn Fn() -> bool + Send + Sync>;

/// Shared between the reconciler (writer) and the health server (reader).
pub struct ProxyHealth {
    /// 2 × `--sync-period`, as kube-proxy.
    timeout: Duration,
    state: Mutex<State>,
    /// Set while another instance writes the rules.
    writer: Mutex<Option<WriterProbe>>,
}

impl std::fmt::Debug for ProxyHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHealth")
            .field("timeout", &self.timeout)
            .field("state", &*self.state())
            .finish_non_exhaustive()
    }
}

impl ProxyHealth {
    /// `sync_period`: `--sync-period`; the health timeout is twice that.
    pub fn new(sync_period: Duration) -> Self {
        ProxyHealth {
            timeout: sync_period.saturating_mul(2),
            state: Mutex::new(State::default()),
            writer: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only short, non-panicking sections hold it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reconciler received an update that needs applying.
    pub fn queued(&self) {
        self.queued_at(Instant::now());
    }

    fn queued_at(&self, now: Instant) {
        let mut s = self.state();
        s.oldest_queued.get_or_insert(now);
    }

    /// A sync succeeded: everything received so far is applied.
    pub fn updated(&self) {
        self.updated_at(Instant::now(), SystemTime::now());
    }

    fn updated_at(&self, now: Instant, wall: SystemTime) {
        let mut s = self.state();
        s.oldest_queued = None;
        s.rules_failing = false;
        s.last_updated = Some((now, wall));
    }

    /// Whether a sync of rules has succeeded since start: this instance's
    /// table is in the kernel (`--cleanup-kube-proxy` waits for it).
    pub fn rules_installed(&self) -> bool {
        self.state().last_updated.is_some()
    }

    /// Whether the Node object allows traffic to this node.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_ineligible = !eligible;
    }

    /// Another instance writes the rules (`Some`: asks whether it still
    /// runs), or this one does again (`None`).
    pub fn superseded(&self, writer: Option<WriterProbe>) {
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = writer;
    }

    /// Superseded by an instance that no longer runs.
    fn writer_gone(&self) -> bool {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer.as_ref().is_some_and(|alive| !alive())
    }

    /// Installing rules failed; healthy again at the next successful sync.
    pub fn rules_failed(&self) {
        self.state().rules_failing = true;
    }

    /// `/healthz` (`livez = false`) or `/livez` as of now.
    pub fn check(&self, livez: bool) -> Verdict {
        self.check_at(livez, Instant::now(), SystemTime::now())
    }

    fn check_at(&self, livez: bool, now: Instant, wall: SystemTime) -> Verdict {
        let s = *self.state();
        let node_eligible = !s.node_ineligible;
        let reason = if s.last_updated.is_none() {
            Some("the first sync of rules has not happened yet")
        } else if s.rules_failing {
            Some("the last attempt to install rules failed")
        } else if self.writer_gone() {
            Some(
                "the instance that took the rules over is gone and this one has not taken them back yet",
            )
        } else if s
            .oldest_queued
            .is_some_and(|q| now.saturating_duration_since(q) >= self.timeout)
        {
            Some("an update has waited longer than 2 x --sync-period to be applied")
        } else if !livez && !node_eligible {
            Some("the node is not eligible")
        } else {
            None
        };
        let healthy = reason.is_none();
        Verdict {
            healthy,
            reason,
            last_updated: if healthy {
                Some(wall)
            } else {
                s.last_updated.map(|(_, w)| w)
            },
            current_time: wall,
            node_eligible,
        }
    }
}

impl Verdict {
    /// The HTTP status: 200 when healthy, else 503.
    pub fn status(&self) -> u16 {
        if self.healthy { 200 } else { 503 }
    }

    /// kube-proxy's body: `lastUpdated`, `currentTime`, and for `/healthz`
    /// `nodeEligible`; plus `healthy` (and `reason` when unhealthy).
    /// Times are RFC 3339 in UTC; a proxy that never synced reports Go's
    /// zero time, as kube-proxy does.
    pub fn to_json(&self, livez: bool) -> String {
        let time = |t: Option<SystemTime>| match t {
            Some(t) => humantime::format_rfc3339_nanos(t).to_string(),
            None => "0001-01-01T00:00:00Z".to_string(),
        };
        let mut v = serde_json::json!({
            "lastUpdated": time(self.last_updated),
            "currentTime": time(Some(self.current_time)),
        });
        if !livez {
            v["nodeEligible"] = self.node_eligible.into();
        }
        v["healthy"] = self.healthy.into();
        if let Some(r) = self.reason {
            v["reason"] = r.into();
        }
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_the_first_sync() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let v = h.check_at(false, t0, w0);
        assert!(!v.healthy);
        assert_eq!(v.status(), 503);
        assert_eq!(v.last_updated, None);
        let json: serde_json::Value = serde_json::from_str(&v.to_json(false)).unwrap();
        assert_eq!(json["lastUpdated"], "0001-01-01T00:00:00Z");
        assert_eq!(json["healthy"], false);
        assert_eq!(json["nodeEligible"], true);
        assert!(!h.check_at(true, t0, w0).healthy);

        h.updated_at(t0, w0);
        let v = h.check_at(false, t0 + Duration::from_secs(1), w0);
        assert!(v.healthy, "{v:?}");
        assert_eq!(v.status(), 200);
    }

    #[test]
    fn an_ineligible_node_fails_healthz_but_not_livez() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        h.updated_at(t0, w0);
        h.set_node_eligible(false);
        let v = h.check_at(false, t0, w0);
        assert!(!v.healthy);
        assert!(!v.node_eligible);
        assert_eq!(v.reason, Some("the node is not eligible"));
        let json: serde_json::Value = serde_json::from_str(&v.to_json(false)).unwrap();
        assert_eq!(json["nodeEligible"], false);
        assert!(
            h.check_at(true, t0, w0).healthy,
            "/livez ignores eligibility"
        );
        h.set_node_eligible(true);
        assert!(h.check_at(false, t0, w0).healthy);
    }

    #[test]
    fn a_queued_update_older_than_twice_the_sync_period_is_unhealthy() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        h.updated_at(t0, w0);
        h.queued_at(t0 + Duration::from_secs(10));
        // A later update does not move the oldest one.
        h.queued_at(t0 + Duration::from_secs(50));
        assert!(h.check_at(false, t0 + Duration::from_secs(69), w0).healthy);
        let v = h.check_at(true, t0 + Duration::from_secs(70), w0);
        assert!(!v.healthy);
        assert!(v.reason.unwrap().contains("2 x --sync-period"));
        // Unhealthy: lastUpdated is the last sync, not now.
        let later = w0 + Duration::from_secs(70);
        assert_eq!(
            h.check_at(false, t0 + Duration::from_secs(70), later)
                .last_updated,
            Some(w0)
        );
        h.updated_at(t0 + Duration::from_secs(71), later);
        assert!(
            h.check_at(false, t0 + Duration::from_secs(72), later)
                .healthy
        );
    }

    #[test]
    fn superseded_is_healthy_while_the_writer_runs_and_not_after() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let h = ProxyHealth::new(Duration::from_secs(30));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        h.updated_at(t0, w0);
        let runs = Arc::new(AtomicBool::new(true));
        let probe = Arc::clone(&runs);
        h.superseded(Some(Box::new(move || probe.load(Ordering::Relaxed))));
        assert!(h.check_at(false, t0, w0).healthy, "a handover in progress");
        runs.store(false, Ordering::Relaxed);
        let v = h.check_at(false, t0, w0);
        assert!(!v.healthy);
        assert!(v.reason.unwrap().contains("is gone"), "{v:?}");
        assert!(!h.check_at(true, t0, w0).healthy, "/livez too");
        h.superseded(None);
        assert!(h.check_at(false, t0, w0).healthy, "taken back");
    }

    #[test]
    fn a_failed_sync_is_unhealthy_until_one_succeeds() {
        let h = ProxyHealth::new(Duration::from_secs(30));
        let (t0, w0) = (Instant::now(), SystemTime::now());
        h.updated_at(t0, w0);
        h.rules_failed();
        let v = h.check_at(false, t0, w0);
        assert!(!v.healthy);
        let json: serde_json::Value = serde_json::from_str(&v.to_json(true)).unwrap();
        assert!(json.get("nodeEligible").is_none(), "{json}");
        assert!(json["reason"].as_str().unwrap().contains("install rules"));
        h.updated_at(t0, w0);
        assert!(h.check_at(false, t0, w0).healthy);
    }
}
