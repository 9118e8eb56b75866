//! Connecting a client's flow to an endpoint: pick one, connect with a
//! timeout, fail over to another endpoint on refusal or timeout.
//!
//! A connect that fails for a *local* reason (out of file descriptors,
//! buffers, memory or local ports) says nothing about the endpoint: every
//! other endpoint would fail the same way. Such a flow is not moved from
//! endpoint to endpoint, no endpoint is blamed, and the client is reset at
//! once. Failures are logged at most once per interval per endpoint (and
//! per Service port for the clients reset), with the count held back: a
//! dead endpoint at 10 000 connections/s must not write 10 000 lines a
//! second from the data path's workers.
//!
//! The connect call itself is a parameter, so that these rules are tested
//! without sockets.
//!
//! A connection to an endpoint on this node may come from the client's own
//! address and port ([`connect_from_client`]: `IP_TRANSPARENT`, bound
//! before the connect, marked so that the endpoint's replies are routed
//! back to this socket, docs/rules.md), so that the endpoint sees its real
//! client as it would behind kube-proxy. When that address cannot be taken
//! the connection comes from the node's own address instead, as any
//! other: never refused for it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::warn;

use super::balancer::{Balancer, Lease};
use super::log_limit::{LOG_INTERVAL, LogLimit};
use crate::model::ServicePortName;

/// Why a flow got no upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The Service port has no endpoints (the rules reject such traffic;
    /// this is the window while that change is applied).
    #[error("no endpoints")]
    NoEndpoints,
    /// Every attempt failed.
    #[error("no endpoint accepted the connection ({attempts} attempts)")]
    AllFailed { attempts: usize },
    /// This process or node is out of a resource a connect needs.
    #[error("out of local resources: {0}")]
    Local(#[source] io::Error),
}

/// Errors of a connect that come from this node, not from the endpoint.
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM | Errno::EADDRNOTAVAIL)
    )
}

/// Rate limit of the local-error lines (process-wide: the cause is too).
static LOCAL_LOG: LogLimit = LogLimit::new(LOG_INTERVAL);

/// How far ahead the runtime's timer wheel always holds a deadline (see
/// [`timer_floor`]); below the shortest default connect timeout (250 ms).
pub const TIMER_FLOOR: Duration = Duration::from_millis(100);

/// Keeps a deadline at most [`TIMER_FLOOR`] ahead in the runtime's timer
/// wheel, for the life of the process.
///
/// Tokio wakes its I/O driver (an eventfd write, then one more
/// `epoll_wait`) whenever a new timer is earlier than the wake-up the
/// driver parked for. With an empty wheel that is every connect timeout:
/// a system call pair and often a hop to another worker per connection
/// (issue 21's ledger). With this deadline in place a connect timeout is
/// never the earliest one, so arming it costs no system call. The price:
/// the driver wakes ten times a second, idle or not.
pub async fn timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

/// Picks an endpoint from `balancer` and connects to it with `connect`,
/// one attempt per entry of `timeouts`, each on another endpoint while
/// there is one. The lease counts the connection for least-connections
/// until it is dropped. Under session affinity the client's IP is
/// remembered with the endpoint that was tried last.
pub async fn connect_with_failover<S, C, F>(
    balancer: &Balancer,
    timeouts: &[Duration],
    service: &ServicePortName,
    client: SocketAddr,
    mut connect: C,
) -> Result<(Lease, S), ConnectError>
where
    C: FnMut(SocketAddr) -> F,
    F: Future<Output = io::Result<S>>,
{
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(timeouts.len());
    for (attempt, timeout) in timeouts.iter().enumerate() {
        let Some(lease) = balancer.pick(client.ip(), &tried) else {
            return Err(ConnectError::NoEndpoints);
        };
        let endpoint = lease.addr();
        match tokio::time::timeout(*timeout, connect(endpoint)).await {
            Ok(Ok(upstream)) => return Ok((lease, upstream)),
            Ok(Err(e)) if is_local(&e) => {
                if let Some(held_back) = LOCAL_LOG.check() {
                    warn!(
                        %service,
                        %client,
                        error = %e,
                        held_back,
                        "cannot connect to endpoints: out of local resources \
                         (file descriptors, buffers, memory or local ports); resetting clients"
                    );
                }
                return Err(ConnectError::Local(e));
            }
            Ok(Err(e)) => {
                if let Some(held_back) = lease.connect_log().check() {
                    warn!(
                        %service,
                        %client,
                        %endpoint,
                        attempt = attempt + 1,
                        error = %e,
                        held_back,
                        "connect to endpoint failed"
                    );
                }
            }
            Err(_) => {
                if let Some(held_back) = lease.connect_log().check() {
                    warn!(
                        %service,
                        %client,
                        %endpoint,
                        attempt = attempt + 1,
                        timeout_ms = timeout.as_millis() as u64,
                        held_back,
                        "connect to endpoint timed out"
                    );
                }
            }
        }
        tried.push(endpoint);
    }
    if let Some(held_back) = balancer.failover_log().check() {
        warn!(
            %service,
            %client,
            attempts = tried.len(),
            held_back,
            "no endpoint accepted the connection; resetting client"
        );
    }
    Err(ConnectError::AllFailed {
        attempts: tried.len(),
    })
}

/// A connection to `endpoint` from a socket marked `mark` (`SO_MARK`; 0:
/// none). The NAT output chain passes marked packets untranslated, so the
/// kernel translates a flow once, as with kube-proxy: an endpoint whose
/// address and port are a Service destination (an externalIP equal to a
/// node address, a hostNetwork backend on that port) is reached instead
/// of this proxy's own listener, which would connect to itself again and
/// again until the file descriptors run out.
///
/// Whether the connect succeeded is read from the readiness epoll reports
/// with the socket's first write edge, not asked with
/// `getsockopt(SO_ERROR)` as tokio's `TcpSocket::connect` does: a socket
/// is never writable while its SYN is out, and a connect that failed
/// (refused, unreachable, timed out) or a connection reset at once
/// reports an error and a hang-up with that edge. One system call less
/// per connection (issue 21's ledger); the error itself is read only
/// when there is one.
pub(super) async fn connect_marked(endpoint: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(endpoint),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    match socket.connect(&endpoint.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection closed as it opened",
            )
        }));
    }
    Ok(stream)
}

/// Where a connection to an endpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The client's own address and port.
    Client,
    /// The node's own address, as any other connection to an endpoint:
    /// the client's could not be taken.
    FellBack,
}

/// Rate limit of the fallback lines (process-wide: the cause, a missing
/// capability or a port taken on the node, usually is too).
static FALLBACK_LOG: LogLimit = LogLimit::new(LOG_INTERVAL);

/// Whether a connection from `client` to `endpoint` can come from the
/// client's own address at all: the same family, not a loopback client
/// (its address means this node, and a packet from 127.0.0.1 may not leave
/// it), and not the endpoint itself (a pod reaching its own Service: it
/// would receive a packet from its own address and drop it as a martian;
/// kube-proxy masquerades that hairpin too).
pub(super) fn can_come_from_client(client: SocketAddr, endpoint: SocketAddr) -> bool {
    client.is_ipv4() == endpoint.is_ipv4()
        && !client.ip().is_loopback()
        && client.ip() != endpoint.ip()
}

/// A connection to `endpoint` from `client`'s own address and port, marked
/// `mark | preserve_mark`: the upstream mark lets it pass the NAT output
/// chain untranslated (as [`connect_marked`]), the preserve mark is saved
/// into the connection's conntrack mark, restored on the endpoint's
/// replies, and routes them to this socket (the policy route of
/// `rules::host`) instead of toward the client.
///
/// When the client's address cannot be taken — the bind is refused (its
/// port is in use on this node, `IP_TRANSPARENT` needs `CAP_NET_ADMIN`), or
/// the connect finds that four-tuple taken (a `TIME_WAIT` of an earlier
/// connection from the same client port) — the connection comes from the
/// node's own address ([`Source::FellBack`]), as every other connection
/// to an endpoint: the client is never refused for
/// it. Any other error is the endpoint's, and fails over as usual.
pub(super) async fn connect_from_client(
    endpoint: SocketAddr,
    client: SocketAddr,
    mark: u32,
    preserve_mark: u32,
) -> io::Result<(TcpStream, Source)> {
    let refused = match transparent_socket(client, mark | preserve_mark) {
        Ok(socket) => match socket.connect(endpoint).await {
            Ok(stream) => return Ok((stream, Source::Client)),
            Err(e) if is_address_clash(&e) => e,
            Err(e) => return Err(e),
        },
        Err(e) => e,
    };
    log_fallback(client, endpoint, &refused);
    connect_marked(endpoint, mark)
        .await
        .map(|s| (s, Source::FellBack))
}

/// Logs (rate-limited, process-wide) that a connection or UDP flow from
/// `client` to `endpoint` comes from the node's address, and why.
pub(super) fn log_fallback(client: SocketAddr, endpoint: SocketAddr, error: &io::Error) {
    if let Some(held_back) = FALLBACK_LOG.check() {
        warn!(
            %client,
            %endpoint,
            %error,
            held_back,
            "cannot connect from the client's address; connecting from the node's address \
             (kubeuproxy_preserve_client_ip_fallbacks_total)"
        );
    }
}

/// The socket of [`connect_from_client`], bound to `client`.
/// `SO_REUSEADDR`: a `TIME_WAIT` left by an earlier connection from that
/// client port does not refuse the bind (the connect checks the whole
/// four-tuple).
fn transparent_socket(client: SocketAddr, mark: u32) -> io::Result<tokio::net::TcpSocket> {
    let socket = if client.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    bind_transparent(socket2::SockRef::from(&socket), client, mark)?;
    Ok(socket)
}

/// Binds `sock` (TCP or UDP) to `client`, an address of another host:
/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` allow it, `SO_MARK` `mark`, and
/// `SO_REUSEADDR` (each caller says why it needs it).
pub(super) fn bind_transparent(
    sock: socket2::SockRef<'_>,
    client: SocketAddr,
    mark: u32,
) -> io::Result<()> {
    if client.is_ipv4() {
        sock.set_ip_transparent_v4(true)?;
    } else {
        sock.set_ip_transparent_v6(true)?;
    }
    sock.set_mark(mark)?;
    sock.set_reuse_address(true)?;
    sock.bind(&client.into())
}

/// A connect error that says the client's address is taken here, not that
/// the endpoint is unreachable.
fn is_address_clash(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EADDRINUSE | Errno::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, ObjectKey, Protocol, SessionAffinity};
    use crate::proxy::test_support::capture_logs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn service() -> ServicePortName {
        ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn balancer(n: u8) -> Balancer {
        let b = Balancer::new(Algorithm::RoundRobin);
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        b.update(&addrs, Algorithm::RoundRobin, SessionAffinity::None);
        b
    }

    fn timeouts() -> Vec<Duration> {
        [250, 500, 1000, 2000]
            .into_iter()
            .map(Duration::from_millis)
            .collect()
    }

    fn client() -> SocketAddr {
        SocketAddr::from(([10, 200, 0, 2], 40000))
    }

    /// Success and failure are told apart without `SO_ERROR`, on both
    /// families: a listening endpoint gives a connection that carries
    /// bytes, a closed port gives `ConnectionRefused`, not a stream.
    #[tokio::test]
    async fn a_connect_is_told_refused_or_open_from_its_readiness() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let listener = tokio::net::TcpListener::bind(host).await.unwrap();
            let open = listener.local_addr().unwrap();
            let mut up = connect_marked(open, 0)
                .await
                .expect("connect to a listener");
            let (mut server, _) = listener.accept().await.unwrap();
            up.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");

            let closed = {
                let l = std::net::TcpListener::bind(host).unwrap();
                l.local_addr().unwrap()
            };
            match connect_marked(closed, 0).await {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{closed}: {e}"),
                Ok(_) => panic!("{closed}: a closed port gave a connection"),
            }
        }
    }

    #[tokio::test]
    async fn a_local_connect_error_does_not_fail_over_or_blame_the_endpoint() {
        // The proxy is out of file descriptors: every endpoint would fail
        // the same way. The client must not be moved from endpoint to
        // endpoint as if they were bad, and no endpoint is named at fault.
        let (logs, _guard) = capture_logs();
        let b = balancer(2);
        let calls = AtomicUsize::new(0);
        let r = connect_with_failover(&b, &timeouts(), &service(), client(), |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err::<(), _>(io::Error::from_raw_os_error(
                nix::libc::EMFILE,
            )))
        })
        .await;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "a local error failed over"
        );
        assert!(r.is_err());
        assert_eq!(
            logs.count("connect to endpoint failed"),
            0,
            "a local error was logged against an endpoint:\n{}",
            logs.text()
        );
        for errno in [
            nix::libc::ENFILE,
            nix::libc::ENOBUFS,
            nix::libc::EADDRNOTAVAIL,
        ] {
            calls.store(0, Ordering::Relaxed);
            let r = connect_with_failover(&b, &timeouts(), &service(), client(), |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Err::<(), _>(io::Error::from_raw_os_error(errno)))
            })
            .await;
            assert!(r.is_err());
            assert_eq!(
                calls.load(Ordering::Relaxed),
                1,
                "errno {errno} failed over"
            );
        }
    }

    #[test]
    fn loopback_hairpin_and_mixed_family_clients_are_never_transparent() {
        let ep = SocketAddr::from(([10, 0, 0, 1], 80));
        assert!(can_come_from_client(client(), ep));
        assert!(!can_come_from_client(
            SocketAddr::from(([127, 0, 0, 1], 40000)),
            ep
        ));
        assert!(!can_come_from_client(
            SocketAddr::from(([10, 0, 0, 1], 40000)),
            ep
        ));
        assert!(!can_come_from_client(
            "[fd00::2]:40000".parse().unwrap(),
            ep
        ));
    }

    /// The client's port is held on this node (a socket bound to that
    /// address and port): the connection comes from the proxy's address
    /// instead, and is not refused. Needs CAP_NET_ADMIN (root) for
    /// IP_TRANSPARENT and SO_MARK; the unit tests run as root in CI.
    #[tokio::test]
    async fn a_client_address_taken_on_the_node_falls_back_to_the_nodes_address() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: IP_TRANSPARENT and SO_MARK need root");
            return;
        }
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = server.local_addr().unwrap();
        // The "client": 127.0.0.2 (routed to lo, so the reply comes back
        // without a policy route) on a port held by another socket.
        let holder = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let client = holder.local_addr().unwrap();
        let (stream, source) = connect_from_client(endpoint, client, 0x2000, 0x1000)
            .await
            .expect("the connection is never refused for its source");
        assert_eq!(source, Source::FellBack);
        assert_ne!(stream.local_addr().unwrap(), client);
        let (_, seen) = server.accept().unwrap();
        assert_eq!(seen, stream.local_addr().unwrap());
        // A free port of that address: the connection comes from it.
        drop(holder);
        let (stream, source) = connect_from_client(endpoint, client, 0x2000, 0x1000)
            .await
            .unwrap();
        assert_eq!(source, Source::Client);
        let (_, seen) = server.accept().unwrap();
        assert_eq!(seen, client);
        assert_eq!(stream.local_addr().unwrap(), client);
    }

    #[tokio::test]
    async fn connect_failures_are_logged_once_per_interval_per_endpoint() {
        // A dead endpoint (refused) and a busy Service: 1000 connections,
        // 4 attempts each. The log gets one line for the endpoint and one
        // for the clients reset, not 5000.
        let (logs, _guard) = capture_logs();
        let b = balancer(1);
        for _ in 0..1000 {
            let r = connect_with_failover(&b, &timeouts(), &service(), client(), |_| {
                std::future::ready(Err::<(), _>(io::Error::from(
                    io::ErrorKind::ConnectionRefused,
                )))
            })
            .await;
            assert!(matches!(r, Err(ConnectError::AllFailed { attempts: 4 })));
        }
        let lines = logs.count("connect to endpoint failed");
        assert_eq!(lines, 1, "{lines} lines for one dead endpoint");
        let resets = logs.count("no endpoint accepted the connection");
        assert_eq!(resets, 1, "{resets} lines for the clients reset");
    }
}
