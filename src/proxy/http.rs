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
mod forwarded;
mod h2_upstream;
mod local;
mod pool;
mod port;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::origin::original_destination;
use crate::model::ForwardedHeaders;

pub use detect::{Detected, detect};
pub use port::HttpPort;

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
    // Built once per connection: the client and the address it connected
    // to do not change from one request to the next.
    let mode = port.balancer.forwarded_headers();
    let forwarding = (mode != ForwardedHeaders::Off)
        .then(|| forwarded::Forwarding::new(mode, peer, original_destination(&client)))
        .flatten()
        .map(Arc::new);
    let service = service_fn(move |req| {
        let port = Arc::clone(&port);
        let forwarding = forwarding.clone();
        async move {
            Ok::<_, Infallible>(forward::handle(port, peer.ip(), forwarding.as_deref(), req).await)
        }
    });
    let io = TokioIo::new(client);
    // The same for both protocols; a macro because their connection
    // types share method names, not a trait (`|c| …`: how to ask the
    // connection to finish gracefully).
    macro_rules! drive {
        ($conn:expr, |$c:ident| $shutdown:expr) => {{
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
                    let $c = conn.as_mut();
                    $shutdown;
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
        Detected::Http2 => {
            // The streams run in this task, not a task each (local.rs).
            let executor = local::ConnExecutor::default();
            let conn = http2::Builder::new(executor.clone())
                .timer(TokioTimer::new())
                .max_concurrent_streams(config.max_concurrent_streams)
                .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
                .serve_connection(io, service);
            drive!(
                local::WithStreams::new(conn, &executor),
                |c| if let Some(conn) = c.get_mut().conn() {
                    conn.graceful_shutdown()
                }
            )
        }
        _ => drive!(
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .max_buf_size(config.max_header_bytes.max(8192))
                .serve_connection(io, service)
                .with_upgrades(),
            |c| c.graceful_shutdown()
        ),
    }
}
