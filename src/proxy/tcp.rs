//! TCP: one accept loop per Service port, one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::accept::AcceptBackoff;
use super::balancer::Balancer;
use super::connect::{ConnectError, connect_with_failover};
use super::listeners::Connections;
use super::relay::{relay, reset};
use super::{DataPathConfig, RETIRE_LINGER, Stop};
use crate::metrics::{FailReason, ServicePortMetrics};
use crate::model::ServicePortName;

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
    metrics: Arc<ServicePortMetrics>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    // Inherited by every accepted socket: the client side of each flow.
    config.tcp.apply_to_listener(&listener)?;
    let listener = TcpListener::from_std(listener)?;
    let port = listener.local_addr()?.port();
    let span = debug_span!("listener", service = %service, proxy_port = port);
    Ok(tokio::spawn(
        accept_loop(
            listener,
            service,
            balancer,
            config,
            connections,
            stop,
            metrics,
        )
        .instrument(span),
    ))
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    stop: Stop,
    metrics: Arc<ServicePortMetrics>,
) {
    let mut backoff = AcceptBackoff::default();
    let mut close_at: Option<tokio::time::Instant> = None;
    // Session affinity's sweep: expired clients go even when no new
    // connection comes (a pick sweeps too, when one is due).
    // (One timer, reset, not one per accepted connection.)
    let sweep = tokio::time::sleep(balancer.affinity_reap_interval());
    tokio::pin!(sweep);
    loop {
        let accepted = tokio::select! {
            _ = stop.now.cancelled() => return,
            _ = &mut sweep => {
                metrics.affinity_clients(balancer.reap_affinity());
                sweep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + balancer.affinity_reap_interval());
                continue;
            }
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
                metrics.accepted();
                let Some(admission) = connections.admit() else {
                    // Over --max-connections (logged by the limit): refused
                    // with a reset, as a port without endpoints.
                    metrics.failed(FailReason::MaxConnections);
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
                    Arc::clone(&metrics),
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
    metrics: Arc<ServicePortMetrics>,
) {
    let _open = metrics.open();
    let _ = client.set_nodelay(true);
    // Each attempt is timed and counted here; the failover itself (and its
    // rate-limited logging) is connect_with_failover's.
    let mut attempts = 0u32;
    // Written only when an attempt fails (a Mutex because the connection
    // task may move between threads).
    let last_error = std::sync::Mutex::new(FailReason::ConnectTimeout);
    let connect = |endpoint: SocketAddr| {
        attempts += 1;
        if attempts > 1 {
            metrics.retry();
        }
        let metrics = Arc::clone(&metrics);
        let last_error = &last_error;
        async move {
            let started = std::time::Instant::now();
            let r = TcpStream::connect(endpoint).await;
            match &r {
                Ok(_) => metrics.connected(endpoint, started.elapsed()),
                Err(e) => {
                    if let Ok(mut last) = last_error.lock() {
                        *last = FailReason::of(e);
                    }
                    metrics.attempt_failed(endpoint);
                }
            }
            r
        }
    };
    let connected = tokio::select! {
        r = connect_with_failover(&balancer, &config.connect_timeouts, &service, peer, connect) => r,
        _ = cut.cancelled() => {
            reset(&client);
            return;
        }
    };
    let (lease, upstream) = match connected {
        Ok(c) => c,
        Err(ConnectError::NoEndpoints) => {
            debug!("no endpoints; resetting client");
            metrics.failed(FailReason::NoEndpoints);
            reset(&client);
            return;
        }
        // Logged (rate-limited) where they happen.
        Err(ConnectError::Local(_)) => {
            metrics.failed(FailReason::LocalError);
            reset(&client);
            return;
        }
        Err(ConnectError::AllFailed { .. }) => {
            let reason = last_error
                .lock()
                .map(|r| *r)
                .unwrap_or(FailReason::ConnectTimeout);
            metrics.failed(reason);
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
        Ok(t) => {
            metrics.relayed(&t);
            debug!(
                %endpoint,
                sent = t.client_to_upstream,
                received = t.upstream_to_client,
                "connection closed"
            )
        }
        Err(e) => debug!(%endpoint, error = %e, "connection aborted"),
    }
}
