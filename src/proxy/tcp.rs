//! TCP: one accept loop per Service port, one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::DataPathConfig;
use super::accept::AcceptBackoff;
use super::balancer::Balancer;
use super::connect::{ConnectError, connect_with_failover};
use super::listeners::Connections;
use super::relay::{relay, reset};
use crate::model::ServicePortName;

/// How long a retired listener keeps accepting after its rules are gone: a
/// SYN translated to its port just before the rule change completes its
/// handshake on this listener, and would be reset if the listener closed
/// at once.
pub const RETIRE_LINGER: Duration = Duration::from_millis(500);

/// How an accept loop is told to end.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The Service port went away: accept for [`RETIRE_LINGER`] more, then close.
    pub retire: CancellationToken,
    /// Shutdown: close now (queued connections move to the next instance's
    /// listener in the `SO_REUSEPORT` group, with `tcp_migrate_req`).
    pub now: CancellationToken,
}

/// Starts accepting on `listener` until `stop` says so. Connections
/// already accepted are not affected by `stop`: they run to their natural
/// end, or until `connections` cuts them.
pub fn spawn(
    service: Arc<ServicePortName>,
    listener: std::net::TcpListener,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    stop: Stop,
) -> io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    // Inherited by every accepted socket: the client side of each flow.
    config.tcp.apply_to_listener(&listener)?;
    let listener = TcpListener::from_std(listener)?;
    let port = listener.local_addr()?.port();
    let span = debug_span!("listener", service = %service, proxy_port = port);
    Ok(tokio::spawn(
        accept_loop(listener, service, balancer, config, connections, stop).instrument(span),
    ))
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    stop: Stop,
) {
    let mut backoff = AcceptBackoff::default();
    let mut close_at: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.now.cancelled() => return,
            _ = stop.retire.cancelled(), if close_at.is_none() => {
                close_at = Some(tokio::time::Instant::now() + RETIRE_LINGER);
                continue;
            }
            _ = tokio::time::sleep_until(close_at.unwrap_or_else(tokio::time::Instant::now)), if close_at.is_some() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff.succeeded();
                let Some(admission) = connections.admit() else {
                    // Over --max-connections (logged by the limit): refused
                    // with a reset, as a port without endpoints.
                    reset(&client);
                    continue;
                };
                // debug level: at the default level the span costs nothing
                // per connection; warnings carry service and client themselves.
                let span = debug_span!("conn", client = %peer);
                let flow = handle_connection(
                    client,
                    peer,
                    Arc::clone(&service),
                    Arc::clone(&balancer),
                    Arc::clone(&config),
                    connections.cut_token().clone(),
                );
                // The admission counts against the cap for the life of the
                // flow. (`map`, not an async block: that would hold the
                // flow's future twice, rust-lang/rust#62958.)
                connections
                    .tracker()
                    .spawn(flow.map(move |()| drop(admission)).instrument(span));
            }
            Err(e) => {
                if let Some(pause) = backoff.failed(&e) {
                    tokio::select! {
                        _ = stop.now.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// Picks an endpoint, connects (failing over to the next endpoint on
/// refusal or timeout), then relays until both directions are done.
async fn handle_connection(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    cut: CancellationToken,
) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        r = connect_with_failover(&balancer, &config.connect_timeouts, &service, peer, TcpStream::connect) => r,
        _ = cut.cancelled() => {
            reset(&client);
            return;
        }
    };
    let (lease, upstream) = match connected {
        Ok(c) => c,
        Err(ConnectError::NoEndpoints) => {
            debug!("no endpoints; resetting client");
            reset(&client);
            return;
        }
        // Logged (rate-limited) where they happen.
        Err(ConnectError::AllFailed { .. } | ConnectError::Local(_)) => {
            reset(&client);
            return;
        }
    };
    let endpoint = lease.addr();
    let _ = upstream.set_nodelay(true);
    let result = relay(config.relay, &config.tcp, client, upstream, &cut).await;
    // Least-connections stops counting the connection before it is logged
    // as closed: whoever reads the log never sees the counter lag behind.
    drop(lease);
    match result {
        Ok(t) => debug!(
            %endpoint,
            sent = t.client_to_upstream,
            received = t.upstream_to_client,
            "connection closed"
        ),
        Err(e) => debug!(%endpoint, error = %e, "connection aborted"),
    }
}
