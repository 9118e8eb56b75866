//! TCP: one accept loop per Service port, one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::DataPathConfig;
use super::accept::AcceptBackoff;
use super::balancer::{Balancer, Lease};
use super::connect::{
    ConnectError, Source, can_come_from_client, connect_from_client, connect_marked,
    connect_with_failover,
};
use super::connections::Connections;
use super::http::{self, HttpPort};
use super::metrics::{FailReason, ListenerMetrics, ServicePortMetrics};
use super::origin::{Header, original_destination};
use super::relay::{relay, reset};
use super::stop::{RETIRE_LINGER, Stop, Timer, fire, timer};
use crate::model::{ProxyProtocol, ServicePortName, SessionAffinity};

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
    spawn_one(
        service,
        listener,
        balancer,
        config,
        connections,
        stop,
        metrics,
        true,
    )
}

/// [`spawn`] for one of several listeners sharing a Service port's
/// balancer (the same proxy port on each data-path thread: threads.rs):
/// only the one with `sweeps` keeps the shared affinity table swept and
/// its size reported.
#[allow(clippy::too_many_arguments)]
pub fn spawn_one(
    service: Arc<ServicePortName>,
    listener: std::net::TcpListener,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    stop: Stop,
    metrics: Arc<ServicePortMetrics>,
    sweeps: bool,
) -> io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    // Inherited by every accepted socket: the client side of each flow.
    config.tcp.apply_to_listener(&listener)?;
    let listener = TcpListener::from_std(listener)?;
    let port = listener.local_addr()?.port();
    let span = debug_span!("listener", service = %service, proxy_port = port);
    let port = Box::new(Port {
        service,
        balancer,
        config,
        connections,
        share: ListenerMetrics::new(Arc::clone(&metrics)),
        metrics,
        http: OnceLock::new(),
        shutdown: stop.now.clone(),
        sweeps,
    });
    Ok(tokio::spawn(
        accept_loop(listener, port, stop).instrument(span),
    ))
}

/// What an accept loop hands each connection it accepts (one allocation
/// per listener, so the loop's future stays small: there is one per
/// Service port, and 10 000 of them).
struct Port {
    service: Arc<ServicePortName>,
    balancer: Arc<Balancer>,
    config: Arc<DataPathConfig>,
    connections: Connections,
    metrics: Arc<ServicePortMetrics>,
    /// This listener's part of the port's shared gauges (affinity).
    share: ListenerMetrics,
    /// Request mode's pools and settings, made at the first connection
    /// served in request mode: one per `--http-threads` thread (a pool
    /// is used by one thread only), else one.
    http: OnceLock<Box<[Arc<HttpPort>]>>,
    /// The process is stopping: request-mode clients are asked to leave.
    shutdown: CancellationToken,
    /// This listener sweeps the balancer's affinity table (one listener
    /// of those sharing a balancer does).
    sweeps: bool,
}

impl Port {
    /// Request mode's state for thread `i` of `--http-threads` (0 without
    /// them).
    fn http(&self, i: usize) -> Arc<HttpPort> {
        let all = self.http.get_or_init(|| {
            let n = self
                .config
                .http_threads
                .as_ref()
                .map_or(1, |t| t.handles().len());
            (0..n)
                .map(|_| {
                    Arc::new(HttpPort::new(
                        Arc::clone(&self.service),
                        Arc::clone(&self.balancer),
                        Arc::clone(&self.config),
                        Arc::clone(&self.metrics),
                        self.connections.cut_token().clone(),
                        self.connections.tracker().clone(),
                    ))
                })
                .collect()
        });
        Arc::clone(&all[i % all.len()])
    }
}

/// The `--http-threads` thread the next request-mode connection goes to
/// (round-robin over every port's connections).
static NEXT_HTTP_THREAD: AtomicUsize = AtomicUsize::new(0);

async fn accept_loop(listener: TcpListener, port: Box<Port>, stop: Stop) {
    let mut backoff = AcceptBackoff::default();
    // Session affinity's sweep: expired clients go even when no new
    // connection comes (a pick sweeps too, when one is due). A timer only
    // on a port with affinity that has accepted a connection since the
    // table was last found empty (the connection's task remembers its
    // client a moment after the accept, so the first sweep comes one
    // interval later); boxed, so that a port without affinity does not
    // carry one in its future.
    let mut sweep: Option<Timer> = None;
    // Serving: until the Service port is retired (or the process stops:
    // `retire` is a child of `now`).
    loop {
        let accepted = tokio::select! {
            _ = stop.retire.cancelled() => break,
            _ = fire(&mut sweep) => {
                sweep = sweep_affinity(&port);
                continue;
            }
            r = accept(&listener) => r,
        };
        if let Some(pause) = on_accepted(&port, accepted, &mut backoff) {
            // Boxed: the timer of this rare path is not carried in the
            // future of every accept loop.
            tokio::select! {
                _ = stop.retire.cancelled() => break,
                _ = timer(pause) => {}
            }
        }
        if port.sweeps
            && sweep.is_none()
            && port.balancer.session_affinity() != SessionAffinity::None
        {
            sweep = Some(timer(port.balancer.affinity_reap_interval()));
        }
    }
    if stop.now.is_cancelled() {
        return;
    }
    // Retired: serve a short linger more (SYNs translated just before the
    // rule change still arrive), then close; shutdown closes at once.
    let mut linger = timer(RETIRE_LINGER);
    loop {
        let accepted = tokio::select! {
            _ = stop.now.cancelled() => return,
            _ = &mut linger => return,
            r = accept(&listener) => r,
        };
        if let Some(pause) = on_accepted(&port, accepted, &mut backoff) {
            tokio::select! {
                _ = stop.now.cancelled() => return,
                _ = timer(pause) => {}
            }
        }
    }
}

/// The next connection. (`poll_accept`: `TcpListener::accept`'s future is
/// 184 bytes, carried by every idle accept loop; this one is a reference.)
fn accept(
    listener: &TcpListener,
) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + '_ {
    std::future::poll_fn(|cx| listener.poll_accept(cx))
}

/// Reaps the port's affinity table and reports its size; the next sweep's
/// timer while clients remain.
fn sweep_affinity(port: &Port) -> Option<Timer> {
    let clients = port.balancer.reap_affinity();
    port.share.affinity_clients(clients);
    (clients > 0).then(|| timer(port.balancer.affinity_reap_interval()))
}

/// Starts the connection just accepted; after an accept error, the pause
/// to make before the next accept, if any.
fn on_accepted(
    port: &Port,
    accepted: io::Result<(TcpStream, SocketAddr)>,
    backoff: &mut AcceptBackoff,
) -> Option<std::time::Duration> {
    let (client, peer) = match accepted {
        Ok(c) => c,
        Err(e) => return backoff.failed(&e),
    };
    backoff.succeeded();
    port.metrics.accepted();
    let Some(admission) = port.connections.admit() else {
        // Over --max-connections (logged by the limit): refused with a
        // reset, as a port without endpoints.
        port.metrics.failed(FailReason::MaxConnections);
        reset(&client);
        return None;
    };
    // debug level: at the default level the span costs nothing per
    // connection; warnings carry service and client themselves.
    let span = debug_span!("conn", client = %peer);
    // (`--request-balancing=false` reaches here as every port's mode.)
    if port.balancer.mode().per_request() {
        let Some(threads) = port.config.http_threads.as_ref() else {
            let flow = handle_request_mode(port.http(0), client, peer, port.shutdown.clone());
            port.connections
                .tracker()
                .spawn(flow.map(move |()| drop(admission)).instrument(span));
            return None;
        };
        // Handed to an HTTP thread for good: the socket leaves this
        // runtime's poller for that thread's.
        let i = NEXT_HTTP_THREAD.fetch_add(1, Ordering::Relaxed) % threads.handles().len();
        let client = match client.into_std() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "cannot hand the connection to an HTTP thread");
                port.metrics.failed(FailReason::LocalError);
                return None;
            }
        };
        let (http, shutdown) = (port.http(i), port.shutdown.clone());
        let flow = async move {
            match TcpStream::from_std(client) {
                Ok(client) => handle_request_mode(http, client, peer, shutdown).await,
                Err(e) => debug!(error = %e, "cannot take the connection on an HTTP thread"),
            }
        };
        threads.handles()[i].spawn(
            port.connections
                .tracker()
                .track_future(flow.map(move |()| drop(admission)).instrument(span)),
        );
        return None;
    }
    let flow = handle_connection(
        client,
        peer,
        Arc::clone(&port.service),
        Arc::clone(&port.balancer),
        Arc::clone(&port.config),
        port.connections.cut_token().clone(),
        Arc::clone(&port.metrics),
    );
    // The admission counts against the cap for the life of the flow.
    // (`map`, not an async block: that would hold the flow's future twice,
    // rust-lang/rust#62958.)
    port.connections
        .tracker()
        .spawn(flow.map(move |()| drop(admission)).instrument(span));
    None
}

/// A connection to a port in request mode: served as HTTP if its first
/// bytes say so, else relayed as bytes like any other (nothing is lost:
/// detection only peeks).
async fn handle_request_mode(
    http: Arc<HttpPort>,
    client: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let metrics = Arc::clone(http.metrics());
    let open = metrics.open();
    let config = Arc::clone(http.config());
    let cut = http.cut().clone();
    let detected = tokio::select! {
        d = http::detect(&client, config.http.detect_timeout) => d,
        _ = cut.cancelled() => return,
    };
    match detected {
        Ok(d @ (http::Detected::Http1 | http::Detected::Http2)) => {
            http::serve(http, client, peer, d, shutdown, cut).await;
        }
        Ok(http::Detected::Other) | Err(_) => {
            debug!("not HTTP; relaying as bytes");
            // handle_connection counts it open itself.
            drop(open);
            handle_connection(
                client,
                peer,
                Arc::clone(http.service()),
                Arc::clone(http.balancer()),
                config,
                cut,
                metrics.clone(),
            )
            .await;
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
    // Each attempt is timed and counted here; the failover itself (and its
    // rate-limited logging) is connect_with_failover's.
    let mut attempts = 0u32;
    // Written only when an attempt fails (a Mutex because the connection
    // task may move between threads).
    let last_error = std::sync::Mutex::new(FailReason::ConnectTimeout);
    let mark = config.upstream_mark;
    let preserve_mark = config.preserve_client_ip_mark;
    let connect = |endpoint: SocketAddr| {
        attempts += 1;
        if attempts > 1 {
            metrics.retry();
        }
        // From the client's own address: an endpoint on this node of a
        // port that preserves client IPs (the reconciler's choice).
        let from_client = preserve_mark != 0
            && balancer.is_transparent(endpoint)
            && can_come_from_client(peer, endpoint);
        let metrics = Arc::clone(&metrics);
        let last_error = &last_error;
        async move {
            let started = std::time::Instant::now();
            let r = if from_client {
                connect_from_client(endpoint, peer, mark, preserve_mark)
                    .await
                    .map(|(s, source)| {
                        metrics.client_ip(source == Source::Client);
                        s
                    })
            } else {
                connect_marked(endpoint, mark).await
            };
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
    let (lease, mut upstream) = match connected {
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
    if let Some(version) = balancer.proxy_protocol() {
        let sent = tokio::select! {
            r = send_proxy_header(version, &client, peer, &mut upstream) => r,
            _ = cut.cancelled() => Err(io::Error::other("cut")),
        };
        if let Err(e) = sent {
            debug!(%endpoint, error = %e, "cannot send the PROXY protocol header; resetting both");
            reset(&client);
            reset(&upstream);
            return;
        }
    }
    finish(config, client, upstream, lease, &cut, &metrics).await;
}

/// Writes the PROXY protocol header of the connection `client` (from
/// `peer`) on `upstream`, before any byte of the client's: the endpoint
/// reads it first. A separate segment from the client's first bytes
/// (holding it back for them would stall protocols where the server
/// speaks first).
async fn send_proxy_header(
    version: ProxyProtocol,
    client: &TcpStream,
    peer: SocketAddr,
    upstream: &mut TcpStream,
) -> io::Result<()> {
    let destination = original_destination(client)
        .ok_or_else(|| io::Error::other("the client's socket has no local address"))?;
    let header = Header::new(version, peer, destination);
    upstream.write_all(header.as_bytes()).await
}

/// Relays a connected flow until both directions are done.
async fn finish(
    config: Arc<DataPathConfig>,
    client: TcpStream,
    upstream: TcpStream,
    lease: Lease,
    cut: &CancellationToken,
    metrics: &ServicePortMetrics,
) {
    let endpoint = lease.addr();
    // The bytes count into the port's counters as they move, whichever
    // way the flow ends (relay/count.rs).
    let result = relay(
        config.relay,
        &config.tcp,
        client,
        upstream,
        cut,
        metrics.relayed_bytes(),
    )
    .await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, ObjectKey, Protocol, SessionAffinity};
    use crate::proxy::metrics::PortSeries;

    /// One accept loop per Service port: at 10 000 ports every byte of its
    /// future is 10 kB of RSS. (It was 1 008 bytes with `accept()`, two
    /// tokens and the timers inline.)
    #[tokio::test]
    async fn an_idle_accept_loop_future_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let name = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let metrics = crate::proxy::metrics::PortSeries::new(false).service_port(&name);
        let port = Box::new(Port {
            service: Arc::new(name),
            balancer: Arc::new(Balancer::new(Algorithm::RoundRobin)),
            config: Arc::new(DataPathConfig::default()),
            connections: Connections::new(),
            share: ListenerMetrics::new(Arc::clone(&metrics)),
            metrics,
            http: OnceLock::new(),
            shutdown: CancellationToken::new(),
            sweeps: true,
        });
        let future = accept_loop(listener, port, Stop::default());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 400, "the accept loop's future is {size} bytes");
    }

    fn affinity_gauge(m: &Arc<PortSeries>) -> Option<f64> {
        m.render()
            .lines()
            .find(|l| l.starts_with("kubeuproxy_session_affinity_clients{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Polls `f` every 50 ms for up to `limit`.
    async fn eventually(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if f() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        f()
    }

    /// One connection to an otherwise idle port with session affinity: its
    /// client shows in the gauge, and goes (table and gauge) once the
    /// timeout has passed, with no other connection to trigger a sweep.
    #[tokio::test]
    async fn one_client_of_an_idle_affinity_port_is_counted_then_swept_out() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((s, _)) = backend.accept() {
                let _ = held_tx.send(s);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let m = Arc::new(PortSeries::new(false));
        let balancer = Arc::new(Balancer::new(Algorithm::RoundRobin));
        let timeout = std::time::Duration::from_secs(4);
        balancer.update(
            &[backend_addr],
            Algorithm::RoundRobin,
            SessionAffinity::ClientIp { timeout },
        );
        let port = Box::new(Port {
            service: Arc::new(name.clone()),
            balancer: Arc::clone(&balancer),
            config: Arc::new(DataPathConfig::default()),
            connections: Connections::new(),
            share: ListenerMetrics::new(m.service_port(&name)),
            metrics: m.service_port(&name),
            http: OnceLock::new(),
            shutdown: CancellationToken::new(),
            sweeps: true,
        });
        let stop = Stop::default();
        let task = tokio::spawn(accept_loop(listener, port, stop.clone()));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _held = held_rx.recv_timeout(std::time::Duration::from_secs(5));
        assert!(
            eventually(std::time::Duration::from_millis(3500), || {
                affinity_gauge(&m) == Some(1.0)
            })
            .await,
            "the remembered client never showed in the gauge: {:?} (balancer: {})",
            affinity_gauge(&m),
            balancer.affinity_clients()
        );
        assert!(
            eventually(timeout * 2, || {
                balancer.affinity_clients() == 0 && affinity_gauge(&m) == Some(0.0)
            })
            .await,
            "the expired client was not swept out: gauge {:?}, balancer {}",
            affinity_gauge(&m),
            balancer.affinity_clients()
        );
        stop.now.cancel();
        task.await.unwrap();
    }
}
