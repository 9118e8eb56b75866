//! TCP: one accept loop per Service port, one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use super::balancer::Balancer;
use super::listeners::Connections;
use super::relay::{relay, reset};
use super::{DataPathConfig, RETIRE_LINGER, Stop};
use crate::model::ServicePortName;

/// Longest pause after an accept error caused by resource exhaustion.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

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
    let listener = TcpListener::from_std(listener)?;
    let port = listener.local_addr()?.port();
    let span = debug_span!("listener", service = %service, proxy_port = port);
    Ok(tokio::spawn(
        accept_loop(listener, service, balancer, config, connections, stop).instrument(span),
    ))
}

/// Errors after which accepting again at once would spin: the process or
/// system is out of file descriptors or memory.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// errno values, from nix so no libc dependency is needed here.
mod libc_errno {
    use nix::errno::Errno;
    pub const EMFILE: i32 = Errno::EMFILE as i32;
    pub const ENFILE: i32 = Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = Errno::ENOMEM as i32;
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    stop: Stop,
) {
    let mut backoff = Duration::from_millis(5);
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
                backoff = Duration::from_millis(5);
                // debug level: at the default level the span costs nothing
                // per connection; warnings carry service and client themselves.
                let span = debug_span!("conn", client = %peer);
                connections.tracker().spawn(
                    handle_connection(
                        client,
                        peer,
                        Arc::clone(&service),
                        Arc::clone(&balancer),
                        Arc::clone(&config),
                        connections.cut_token().clone(),
                    )
                    .instrument(span),
                );
            }
            Err(e) if is_resource_exhaustion(&e) => {
                warn!(error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    _ = stop.now.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
            // ECONNABORTED and friends concern one connection only.
            Err(e) => debug!(error = %e, "accept failed"),
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
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(config.connect_timeouts.len());
    for (attempt, timeout) in config.connect_timeouts.iter().enumerate() {
        let Some(lease) = balancer.pick(&tried) else {
            // The rules reject traffic for a port without endpoints; this is
            // the window while that change is being applied.
            debug!("no endpoints; resetting client");
            reset(&client);
            return;
        };
        let endpoint = lease.addr();
        let connected = tokio::select! {
            r = tokio::time::timeout(*timeout, TcpStream::connect(endpoint)) => r,
            _ = cut.cancelled() => {
                reset(&client);
                return;
            }
        };
        match connected {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                match relay(config.relay, client, upstream, &cut).await {
                    Ok(t) => debug!(
                        %endpoint,
                        sent = t.client_to_upstream,
                        received = t.upstream_to_client,
                        "connection closed"
                    ),
                    Err(e) => debug!(%endpoint, error = %e, "connection aborted"),
                }
                return;
            }
            Ok(Err(e)) => warn!(
                %service,
                client = %peer,
                %endpoint,
                attempt = attempt + 1,
                error = %e,
                "connect to endpoint failed"
            ),
            Err(_) => warn!(
                %service,
                client = %peer,
                %endpoint,
                attempt = attempt + 1,
                timeout_ms = timeout.as_millis() as u64,
                "connect to endpoint timed out"
            ),
        }
        tried.push(endpoint);
    }
    warn!(
        attempts = tried.len(),
        "no endpoint accepted the connection; resetting client"
    );
    reset(&client);
}
