//! The backends of the benchmark Service, run on tokio in the backend
//! namespaces (one set per backend):
//!
//! - echo (8080): echoes until EOF, then half-closes; request/response and
//!   both-ways bulk.
//! - sink (8081): the first byte picks the mode, `C` (count) or `H` (count
//!   and SHA-256); reads until EOF, answers `"<count> <hex or ->\n"` and
//!   closes; one-way bulk.
//! - whoami (8082): `uproxy_lab::peers::whoami`, greets with the
//!   backend's name; readiness and endpoint-change checks.
//! - sized (8083): reads an 8-byte big-endian length, answers that many
//!   bytes, again until EOF; medium responses on keep-alive connections.
//! - UDP echo (8053/udp): `uproxy_lab::peers::udp_echo`, sends every
//!   datagram back to its source; the UDP request/response phases.
//!
//! The HTTP phases' backends ([`start_http`], in their own lab of three
//! backends) answer every request with `200`, a small body and an
//! `x-backend` header naming the backend, over HTTP/1.1 or h2c (prior
//! knowledge, detected from the preface, as hyper-util's `auto` server
//! does):
//!
//! - http (8090): at once.
//! - http-slow (8091): the same, but backend [`SLOW_BACKEND`] waits
//!   [`SLOW_DELAY`] before answering (the slow-endpoint phase).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use uproxy_lab::peers::{self, PeerHandle};
use uproxy_lab::{Lab, LabError};

pub const ECHO_PORT: u16 = 8080;
pub const SINK_PORT: u16 = 8081;
pub const WHO_PORT: u16 = 8082;
pub const SIZED_PORT: u16 = 8083;
pub const UDP_ECHO_PORT: u16 = 8053;
/// The HTTP backends' port (h1 and h2c).
pub const HTTP_PORT: u16 = 8090;
/// The same with one slow backend.
pub const HTTP_SLOW_PORT: u16 = 8091;
/// The backend that is slow on [`HTTP_SLOW_PORT`].
pub const SLOW_BACKEND: usize = 2;
/// Its added service time.
pub const SLOW_DELAY: Duration = Duration::from_millis(50);
/// The response header that names the backend.
pub const BACKEND_HEADER: &str = "x-backend";
/// The largest answer the sized server gives.
pub const SIZED_MAX: usize = 4 << 20;

/// Counters shared by the echo servers of all backends.
#[derive(Default, Debug)]
pub struct Counters {
    pub echo_open: AtomicU64,
    pub echo_accepted: AtomicU64,
}

struct OpenGuard(Arc<Counters>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.echo_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every backend's servers; dropping it stops them.
pub struct Backends {
    pub counters: Arc<Counters>,
    cancel: CancellationToken,
    /// whoami and UDP echo.
    _peers: Vec<PeerHandle>,
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn backend_name(i: usize) -> String {
    format!("b{i}")
}

/// Starts echo, sink, whoami, sized and UDP echo on every backend of `lab`.
pub fn start(lab: &Lab, rt: &tokio::runtime::Runtime) -> Result<Backends, LabError> {
    let counters = Arc::new(Counters::default());
    let cancel = CancellationToken::new();
    let mut who = Vec::new();
    for (i, ns) in lab.backends().iter().enumerate() {
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let echo_l = ns.tcp_listener(any(ECHO_PORT))?;
        let sink_l = ns.tcp_listener(any(SINK_PORT))?;
        let who_l = ns.tcp_listener(any(WHO_PORT))?;
        let sized_l = ns.tcp_listener(any(SIZED_PORT))?;
        let udp = ns.udp_socket(any(UDP_ECHO_PORT))?;
        let _g = rt.enter();
        for (l, kind) in [
            (echo_l, Kind::Echo),
            (sink_l, Kind::Sink),
            (sized_l, Kind::Sized),
        ] {
            l.set_nonblocking(true).map_err(|e| io_err("listener", e))?;
            let l = TcpListener::from_std(l).map_err(|e| io_err("listener", e))?;
            rt.spawn(accept_loop(l, kind, counters.clone(), cancel.clone()));
        }
        who.push(peers::whoami(who_l, &backend_name(i)).map_err(|e| io_err("whoami", e))?);
        who.push(peers::udp_echo(udp).map_err(|e| io_err("UDP echo", e))?);
    }
    Ok(Backends {
        counters,
        cancel,
        _peers: who,
    })
}

fn io_err(what: &str, e: std::io::Error) -> LabError {
    LabError::Invalid(format!("{what}: {e}"))
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Sink,
    Sized,
}

async fn accept_loop(l: TcpListener, kind: Kind, c: Arc<Counters>, cancel: CancellationToken) {
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => r,
        };
        match r {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                let cancel = cancel.clone();
                match kind {
                    Kind::Echo => {
                        c.echo_open.fetch_add(1, Ordering::SeqCst);
                        c.echo_accepted.fetch_add(1, Ordering::SeqCst);
                        let guard = OpenGuard(c.clone());
                        tokio::spawn(async move {
                            let _guard = guard;
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = echo(s) => {}
                            }
                        });
                    }
                    Kind::Sink => {
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = sink(s) => {}
                            }
                        });
                    }
                    Kind::Sized => {
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = sized(s) => {}
                            }
                        });
                    }
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    peers::echo_stream(&mut s).await
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    let (count, digest) = peers::drain(&mut s, mode[0] == b'H').await?;
    let hex = digest.unwrap_or_else(|| "-".into());
    s.write_all(format!("{count} {hex}\n").as_bytes()).await?;
    s.shutdown().await
}

/// Answers each 8-byte big-endian length with that many bytes (at most
/// [`SIZED_MAX`]) of the clients' pattern, until EOF.
async fn sized(mut s: TcpStream) -> std::io::Result<()> {
    let body = crate::clients::pattern();
    let mut len = [0u8; 8];
    loop {
        match s.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return s.shutdown().await,
            Err(e) => return Err(e),
        }
        let mut left = (u64::from_be_bytes(len) as usize).min(SIZED_MAX);
        while left > 0 {
            let n = left.min(body.len());
            s.write_all(&body[..n]).await?;
            left -= n;
        }
    }
}

/// The HTTP backends of every backend namespace; dropping it stops them.
pub struct HttpBackends {
    cancel: CancellationToken,
}

impl Drop for HttpBackends {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The body every HTTP backend answers with: its name and a newline.
pub fn http_body(name: &str) -> String {
    format!("{name}\n")
}

/// Starts the HTTP servers ([`HTTP_PORT`], [`HTTP_SLOW_PORT`]) on every
/// backend of `lab`.
pub fn start_http(lab: &Lab, rt: &tokio::runtime::Runtime) -> Result<HttpBackends, LabError> {
    let cancel = CancellationToken::new();
    for (i, ns) in lab.backends().iter().enumerate() {
        for (port, slow) in [(HTTP_PORT, false), (HTTP_SLOW_PORT, i == SLOW_BACKEND)] {
            let l = ns.tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            let _g = rt.enter();
            l.set_nonblocking(true)
                .map_err(|e| io_err("HTTP listener", e))?;
            let l = TcpListener::from_std(l).map_err(|e| io_err("HTTP listener", e))?;
            let delay = slow.then_some(SLOW_DELAY);
            rt.spawn(http_accept_loop(l, backend_name(i), delay, cancel.clone()));
        }
    }
    Ok(HttpBackends { cancel })
}

async fn http_accept_loop(
    l: TcpListener,
    name: String,
    delay: Option<Duration>,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let name: Arc<str> = name.into();
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => r,
        };
        let Ok((s, _)) = r else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        let name = name.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| http_answer(req, name.clone(), delay));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // More streams per connection than the h2c phase asks for.
            builder.http2().max_concurrent_streams(1000);
            let conn = builder.serve_connection(TokioIo::new(s), svc);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

async fn http_answer(
    req: hyper::Request<hyper::body::Incoming>,
    name: Arc<str>,
    delay: Option<Duration>,
) -> Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    // Read the request body (none in the phases; a proxy might still send
    // an empty DATA frame) so the stream ends cleanly.
    let _ = req.into_body().collect().await;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(
        http_body(&name),
    )));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
        resp.headers_mut().insert(BACKEND_HEADER, v);
    }
    Ok(resp)
}
