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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use nix::errno::Errno;
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
pub(super) async fn connect_marked(endpoint: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = if endpoint.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.connect(endpoint).await
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
