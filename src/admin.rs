//! The HTTP servers an operator and the kubelet talk to, with kube-proxy's
//! addresses and paths:
//!
//! - `--healthz-bind-address` (0.0.0.0:10256): `/healthz`, `/livez`
//!   ([`crate::health`]); optionally the same on a Unix socket
//!   (`--healthz-socket`) for probes that must reach *this* process.
//! - `--metrics-bind-address` (127.0.0.1:10249): `/metrics` (Prometheus
//!   text), `/proxyMode` (`userspace`), `/debug/services` (JSON, read by
//!   `kube-uproxy status`).
//!
//! Both TCP servers bind with `SO_REUSEPORT`: during a handover the new
//! instance binds beside the old one (as its listeners do) instead of
//! failing, and the node never has a moment without a health server. A
//! server that cannot bind is retried every few seconds (kube-proxy does
//! the same) rather than stopping the proxy: Service traffic matters more
//! than its observability.

pub mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

use self::status::ServicesReport;
use crate::health::{ProxyHealth, health_json};
use crate::metrics::{self, Metrics};

/// What `/proxyMode` answers. kube-proxy answers its mode's name
/// (`iptables`, `ipvs`, `nftables`, `kernelspace`); the legacy userspace
/// mode that kube-uproxy replaces answered `userspace`, and tools that
/// branch on the mode know that name.
pub const PROXY_MODE: &str = "userspace";

/// How long `/debug/services` waits for the reconciler (busy in a long
/// nft transaction, for instance) before answering 503.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Asks the reconciler for a report: it answers on the oneshot.
pub type ReportRequests = mpsc::Sender<oneshot::Sender<ServicesReport>>;

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub health: Arc<ProxyHealth>,
    pub metrics: Arc<Metrics>,
    pub reports: ReportRequests,
}

/// `/healthz` and `/livez`.
pub fn healthz_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

/// `/metrics`, `/proxyMode`, `/debug/services`.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/debug/services", get(services))
        .with_state(state)
}

fn health_answer(s: &AdminState, livez: bool) -> Response {
    let v = s.health.check(livez);
    s.metrics.health_answered(livez, v.status());
    health_json(v.healthy, v.to_json(livez))
}

async fn healthz(State(s): State<AdminState>) -> Response {
    health_answer(&s, false)
}

async fn livez(State(s): State<AdminState>) -> Response {
    health_answer(&s, true)
}

async fn render_metrics(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

async fn proxy_mode() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PROXY_MODE,
    )
        .into_response()
}

async fn services(State(s): State<AdminState>) -> Response {
    let unavailable = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{why}\n"),
        )
            .into_response()
    };
    let (tx, rx) = oneshot::channel();
    if s.reports.send(tx).await.is_err() {
        return unavailable("the reconciler has stopped");
    }
    match tokio::time::timeout(REPORT_TIMEOUT, rx).await {
        Ok(Ok(report)) => match serde_json::to_string_pretty(&report) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => unavailable(&format!("cannot encode the report: {e}")),
        },
        Ok(Err(_)) => unavailable("the reconciler has stopped"),
        Err(_) => unavailable("the reconciler did not answer within 5 s"),
    }
}

#[cfg(test)]
mod tests {
    use super::status;
    use super::*;
    use crate::serve::{bind_reuseport, spawn_tcp, spawn_unix};
    use tokio_util::sync::CancellationToken;

    fn state() -> (AdminState, mpsc::Receiver<oneshot::Sender<ServicesReport>>) {
        let (tx, rx) = mpsc::channel(4);
        (
            AdminState {
                health: Arc::new(ProxyHealth::new(Duration::from_secs(30))),
                metrics: Arc::new(Metrics::new(false)),
                reports: tx,
            },
            rx,
        )
    }

    /// Serves both routers on loopback ports and GETs from them.
    #[tokio::test]
    async fn endpoints_answer_with_kube_proxys_shapes() {
        let (s, mut reports) = state();
        let cancel = CancellationToken::new();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let health_addr = probe.local_addr().unwrap();
        drop(probe);
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics_addr = probe.local_addr().unwrap();
        drop(probe);
        spawn_tcp(
            "healthz",
            health_addr,
            healthz_router(s.clone()),
            cancel.clone(),
        );
        spawn_tcp(
            "metrics",
            metrics_addr,
            metrics_router(s.clone()),
            cancel.clone(),
        );
        tokio::spawn(async move {
            while let Some(reply) = reports.recv().await {
                let _ = reply.send(ServicesReport {
                    proxy_address: "169.254.42.1".into(),
                    ..ServicesReport::default()
                });
            }
        });
        let get = |addr, path: &'static str| async move {
            for _ in 0..100 {
                if let Ok(r) = status::get_tcp(addr, path).await {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no answer from {addr}{path}");
        };

        let r = get(health_addr, "/healthz").await;
        assert_eq!(r.status, 503, "{r:?}");
        s.health.updated();
        let r = get(health_addr, "/healthz").await;
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        for k in ["lastUpdated", "currentTime", "nodeEligible", "healthy"] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        let r = get(health_addr, "/livez").await;
        assert_eq!(r.status, 200);
        assert!(r.body.contains("\"healthy\":true"), "{r:?}");

        let r = get(metrics_addr, "/proxyMode").await;
        assert_eq!((r.status, r.body.as_str()), (200, "userspace"));
        let r = get(metrics_addr, "/metrics").await;
        assert!(
            r.body
                .contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1"),
            "{}",
            r.body
        );
        assert!(
            r.body
                .contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1")
        );
        let (report, _) = status::fetch_report(metrics_addr).await.unwrap();
        assert_eq!(report.proxy_address, "169.254.42.1");
        assert_eq!(get(metrics_addr, "/nothing").await.status, 404);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_second_server_binds_beside_the_first() {
        let (s, _reports) = state();
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind_reuseport(addr);
        assert!(b.is_ok(), "{b:?}");
        drop(s);
    }

    #[tokio::test]
    async fn the_unix_socket_serves_health() {
        let (s, _reports) = state();
        let dir = std::env::temp_dir().join(format!("ku-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("healthz.sock");
        std::fs::write(&sock, "stale").unwrap();
        let cancel = CancellationToken::new();
        spawn_unix("healthz", &sock, healthz_router(s.clone()), cancel.clone()).unwrap();
        let r = status::get_unix(&sock, "/livez").await.unwrap();
        assert_eq!(r.status, 503);
        s.health.updated();
        assert_eq!(
            status::get_unix(&sock, "/healthz").await.unwrap().status,
            200
        );
        cancel.cancel();
        let _ = std::fs::remove_dir_all(dir);
    }
}
