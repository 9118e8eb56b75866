//! How the node's side-door HTTP servers run — `/healthz`, `/metrics` and
//! the Service health-check node ports: bound with `SO_REUSEPORT` (a new
//! instance binds beside the old one during a handover), retried while the
//! address cannot be bound (Service traffic matters more than its
//! observability, so a busy port never stops the proxy), served until
//! cancelled.
//!
//! A server asked for the IPv4 wildcard (`0.0.0.0`, `/healthz`'s default
//! and the health check node ports) listens on both families, as
//! kube-proxy's Go listener does: one IPv6 wildcard socket with
//! `IPV6_V6ONLY` off, so an IPv6 load balancer's checks are answered too.
//! On a kernel without IPv6 it falls back to the IPv4 socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Pause between attempts to bind a server's address.
pub const BIND_RETRY: Duration = Duration::from_secs(5);

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
        let serve = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(server = what, %addr, error = %e, "server stopped");
        }
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
        let serve = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(server = what, socket = %path.display(), error = %e, "server stopped");
        }
        let _ = std::fs::remove_file(&path);
    }))
}
