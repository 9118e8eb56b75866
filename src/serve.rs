//! How the node's side-door HTTP servers run — `/healthz`, `/metrics` and
//! the Service health-check node ports: bound with `SO_REUSEPORT` (a new
//! instance binds beside the old one during a handover), retried while the
//! address cannot be bound (Service traffic matters more than its
//! observability, so a busy port never stops the proxy), served until
//! cancelled.
//!
//! These servers share the process's fd table with the data path, and
//! anyone who reaches a health-check node port may connect to it. So each
//! is bounded (issue 19): a connection that has not sent a complete request
//! head within [`HEADER_READ_TIMEOUT`] of waiting for one (a new connection,
//! or a kept-alive one between requests) is closed, as is one that moves no
//! byte either way for [`IDLE_TIMEOUT`] (a client that does not read its
//! answer); at most [`MAX_CONNECTIONS_PER_SERVER`] are open per server,
//! and the health-check node ports together hold at most
//! [`MAX_HEALTH_CHECK_CONNECTIONS`]. Both caps are also kept below a small
//! fraction of the open-file limit, so a flood never costs the data path
//! its fds. A connection beyond a cap is closed as soon as it is accepted.
//!
//! A server asked for the IPv4 wildcard (`0.0.0.0`, `/healthz`'s default
//! and the health check node ports) listens on both families, as
//! kube-proxy's Go listener does: one IPv6 wildcard socket with
//! `IPV6_V6ONLY` off, so an IPv6 load balancer's checks are answered too.
//! On a kernel without IPv6 it falls back to the IPv4 socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Pause between attempts to bind a server's address.
pub const BIND_RETRY: Duration = Duration::from_secs(5);
/// From the moment a connection waits for a request (its first, or the
/// next one on a kept-alive connection) until the request's head is
/// complete. Closes idle and slowloris connections alike; a probe or a
/// scrape sends its head in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No byte either way for this long closes a connection in any state (a
/// client that stops reading a large `/metrics` answer, a stalled body).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections one server holds at once: far more than a kubelet,
/// a Prometheus and a few load balancers need.
pub const MAX_CONNECTIONS_PER_SERVER: usize = 64;
/// Most connections all health-check node ports hold together: one per
/// Service with `externalTrafficPolicy: Local`, all reachable from outside.
pub const MAX_HEALTH_CHECK_CONNECTIONS: usize = 256;
/// Each cap is kept at or below the open-file limit divided by this, so
/// that the side doors together never hold more than a small part of it.
const FD_LIMIT_SHARE: u64 = 32;

/// `want`, lowered to 1/[`FD_LIMIT_SHARE`] of the open-file soft limit
/// (read now: the proxy raises it at start), and at least 4.
pub fn fd_bounded(want: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let share = usize::try_from(soft / FD_LIMIT_SHARE).unwrap_or(usize::MAX);
            want.min(share).max(4)
        }
        Err(_) => want,
    }
}

/// A cap of side-door connections, shared by the servers given a clone.
#[derive(Clone, Debug)]
pub struct ConnectionCap(Arc<Semaphore>);

impl ConnectionCap {
    /// At most `max` (lowered by [`fd_bounded`]) connections at once.
    pub fn new(max: usize) -> Self {
        ConnectionCap(Arc::new(Semaphore::new(fd_bounded(max))))
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.0).try_acquire_owned().ok()
    }
}

/// A server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot serve on the Unix socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A listening TCP socket on `addr` with `SO_REUSEPORT` (see the module
/// doc) and `SO_REUSEADDR`; for `0.0.0.0`, on both families (see the
/// module doc).
pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        let both = SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port()));
        match bind_one(both, false) {
            Ok(l) => return Ok(l),
            // No IPv6 in this kernel (booted with ipv6.disable=1).
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    bind_one(addr, true)
}

/// One listening socket on `addr`; `v6_only` for an IPv6 one.
fn bind_one(addr: SocketAddr, v6_only: bool) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(v6_only)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Serves `router` on `addr` until `cancel`; binding is retried every
/// [`BIND_RETRY`] while it fails. `what` names the server in the logs.
pub fn spawn_tcp(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_tcp_within(what, addr, router, cancel, None)
}

/// Like [`spawn_tcp`], the server's connections also counting against
/// `shared` (the health-check node ports' common cap).
pub fn spawn_tcp_within(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
    shared: Option<ConnectionCap>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut warned = false;
        let listener = loop {
            match bind_reuseport(addr) {
                Ok(l) => break l,
                Err(e) => {
                    if !warned {
                        error!(server = what, %addr, error = %e, "cannot serve; retrying every 5 s");
                        warned = true;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(BIND_RETRY) => {}
                    }
                }
            }
        };
        info!(server = what, %addr, "serving");
        serve_bounded(what, listener, router, cancel, shared).await;
    })
}

/// Serves `router` on a Unix socket at `path` (a file left there by an
/// earlier run is replaced). Fails at once: the socket was asked for.
pub fn spawn_unix(
    what: &'static str,
    path: &Path,
    router: Router,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    info!(server = what, socket = %path.display(), "serving");
    let path = path.to_path_buf();
    Ok(tokio::spawn(async move {
        serve_bounded(what, listener, router, cancel, None).await;
        let _ = std::fs::remove_file(&path);
    }))
}

/// Accepts until `cancel`, serving each connection within the limits of
/// the module doc; a connection beyond a cap is closed at once.
async fn serve_bounded<L>(
    what: &'static str,
    mut listener: L,
    router: Router,
    cancel: CancellationToken,
    shared: Option<ConnectionCap>,
) where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let own = ConnectionCap::new(MAX_CONNECTIONS_PER_SERVER);
    let warned = AtomicBool::new(false);
    loop {
        // `Listener::accept` retries accept errors itself (EMFILE included).
        let (io, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let permits = match (own.take(), shared.as_ref().map(ConnectionCap::take)) {
            (Some(a), None) => (a, None),
            (Some(a), Some(Some(b))) => (a, Some(b)),
            _ => {
                if !warned.swap(true, Ordering::Relaxed) {
                    warn!(
                        server = what,
                        "connection cap reached; connections beyond it are closed at once"
                    );
                } else {
                    debug!(server = what, "connection beyond the cap closed");
                }
                drop(io);
                continue;
            }
        };
        let router = router.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            serve_connection(io, router, cancel).await;
            drop(permits);
        });
    }
}

/// One connection: HTTP/1 with [`HEADER_READ_TIMEOUT`], closed after
/// [`IDLE_TIMEOUT`] without a byte either way, shut down gracefully
/// (the answer in progress finishes) on `cancel`.
async fn serve_connection<I>(io: I, router: Router, cancel: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = Watched {
        inner: io,
        started,
        last: Arc::clone(&last),
    };
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut shutting_down = false;
    loop {
        let quiet_since = started + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = tokio::time::Instant::from_std(quiet_since + IDLE_TIMEOUT);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "side-door connection ended");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let quiet = started.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= IDLE_TIMEOUT {
                    debug!("side-door connection idle; closed");
                    return;
                }
            }
            _ = cancel.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A connection's stream that notes when a byte last moved (milliseconds
/// since `started`), for the idle timeout.
struct Watched<I> {
    inner: I,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<I> Watched<I> {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
