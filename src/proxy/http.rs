//! Request mode: each HTTP request (HTTP/1.1 or h2c, gRPC included) of a
//! client connection picks its own endpoint, so one kept-alive connection
//! or one gRPC channel is spread over every endpoint, which no
//! connection-level balancing can do.
//!
//! ```text
//!  client ──TCP──▶ listener ─▶ detect (peek) ──not HTTP──▶ L4 relay (tcp.rs)
//!                                  │ HTTP/1.1 or h2 preface
//!                                  ▼
//!                     hyper server connection (this file)
//!                                  │ each request
//!                                  ▼
//!        forward.rs: balancer.pick ─▶ pool.rs checkout ─▶ send ─▶ body.rs
//!                      ▲  retry elsewhere only if never sent      (streamed)
//!                      └──────────────────────────────────────┘
//! ```
//!
//! A port is in request mode by its `appProtocol` or the Service's
//! `kube-uproxy.io/balance` annotation ([`crate::model::PortMode`]), read
//! from the balancer at each accepted connection; `--request-balancing
//! false` turns it off for the node. The endpoint selection (traffic
//! policies, terminating fallback, topology, session affinity) is the
//! port's balancer, the same as for connections.

mod body;
mod detect;
mod forward;
mod pool;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

pub use detect::{Detected, detect};

use super::DataPathConfig;
use super::balancer::Balancer;
use super::metrics::ServicePortMetrics;
use crate::model::ServicePortName;

/// Request mode's settings (shared by every port).
#[derive(Clone, Copy, Debug)]
pub struct HttpConfig {
    /// `--request-balancing`: false serves every port per connection.
    pub enabled: bool,
    /// How long a new connection may stay silent before it is taken for a
    /// server-speaks-first protocol and relayed as bytes
    /// (`--http-detect-timeout`).
    pub detect_timeout: Duration,
    /// Idle HTTP/1.1 connections to endpoints are closed after this
    /// (`--http-upstream-idle-timeout`).
    pub upstream_idle_timeout: Duration,
    /// A client must send a request's headers within this; also how long
    /// an idle kept-alive HTTP/1.1 client connection is kept.
    pub header_read_timeout: Duration,
    /// Most bytes of a request's headers (HTTP/1.1 buffer, h2 header list).
    pub max_header_bytes: usize,
    /// Most concurrent streams on one h2 client connection.
    pub max_concurrent_streams: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            detect_timeout: Duration::from_secs(1),
            upstream_idle_timeout: Duration::from_secs(4),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

/// What the connections of one request-mode listener share: above all,
/// the pool of connections to the endpoints.
pub struct HttpPort {
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    metrics: Arc<ServicePortMetrics>,
    pool: Arc<pool::Pool>,
    /// `--max-connections`' cut (shutdown grace over): tunnels end too.
    cut: CancellationToken,
    /// Upgraded connections (tunnels), drained at shutdown like
    /// connections.
    tunnels: TaskTracker,
}

impl HttpPort {
    pub fn new(
        service: Arc<ServicePortName>,
        balancer: Arc<Balancer>,
        config: Arc<DataPathConfig>,
        metrics: Arc<ServicePortMetrics>,
        cut: CancellationToken,
        tunnels: TaskTracker,
    ) -> Self {
        let pool = Arc::new(pool::Pool::new(
            config.http.upstream_idle_timeout,
            config.upstream_mark,
            Arc::clone(&metrics),
        ));
        HttpPort {
            service,
            balancer,
            config,
            metrics,
            pool,
            cut,
            tunnels,
        }
    }
}

impl HttpPort {
    pub fn service(&self) -> &Arc<ServicePortName> {
        &self.service
    }
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }
    pub fn config(&self) -> &Arc<DataPathConfig> {
        &self.config
    }
    pub fn metrics(&self) -> &Arc<ServicePortMetrics> {
        &self.metrics
    }
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}

/// Serves the requests of one client connection that [`detect`] found
/// to speak `detected` (HTTP/1.1 or h2), until the client closes it. When
/// `stop` fires (SIGTERM) the client is told to go (GOAWAY, or
/// `Connection: close` on its next response) and the requests in flight
/// finish; `cut` ends everything at once.
pub async fn serve(
    port: Arc<HttpPort>,
    client: TcpStream,
    peer: SocketAddr,
    detected: Detected,
    stop: CancellationToken,
    cut: CancellationToken,
) {
    let config = port.config.http;
    let service = service_fn(move |req| {
        let port = Arc::clone(&port);
        async move { Ok::<_, Infallible>(forward::handle(port, peer.ip(), req).await) }
    });
    let io = TokioIo::new(client);
    // The same for both protocols; a macro because their connection
    // types share method names, not a trait.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
                _ = cut.cancelled() => return,
            };
            let result = match result {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = cut.cancelled() => return,
                    }
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "client connection ended");
            }
        }};
    }
    match detected {
        Detected::Http2 => drive!(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(config.max_concurrent_streams)
                .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
                .serve_connection(io, service)
        ),
        _ => drive!(
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .max_buf_size(config.max_header_bytes.max(8192))
                .serve_connection(io, service)
                .with_upgrades()
        ),
    }
}
