//! The HTTP phases' clients. As in `clients.rs`, each function runs on a
//! thread that already entered the client namespace, every loop is bounded
//! by a deadline or a count and every socket has I/O timeouts.
//!
//! - HTTP/1.1: a small blocking client (keep-alive, one request in flight
//!   per connection, never pipelined) that checks each answer: status
//!   200, and a body naming the backend the `x-backend` header names.
//! - h2c: hyper's HTTP/2 client (prior knowledge) on one connection with
//!   many concurrent streams, each checked the same way; or `h2load`
//!   (nghttp2-client) when installed, for the h2c phase's figures.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::clients::{connect, new_hist};
use crate::servers::{BACKEND_HEADER, http_body};

const IO_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A response header larger than this is a broken response.
const MAX_HEAD: usize = 64 * 1024;
/// A phase gives up after this many failed requests.
const MAX_ERRORS: u64 = 1000;

/// When a load stops.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// After this long.
    For(Duration),
    /// After this many requests per connection (HTTP/1.1) or in all
    /// (h2c); bounded by [`IO_TIMEOUT`] per request.
    Count(u64),
}

/// What an HTTP load measured.
pub struct HttpLoad {
    /// Latency of each answered request, ns.
    pub hist: Histogram<u64>,
    pub answered: u64,
    pub elapsed: Duration,
    /// Requests that failed (I/O, protocol, timeout).
    pub errors: u64,
    pub first_error: Option<String>,
    /// Answers that arrived wrong (status not 200, or a body that does not
    /// name the backend the header names).
    pub broken: u64,
    pub first_broken: Option<String>,
    /// Answered requests per backend name (empty from `h2load`).
    pub per_backend: BTreeMap<String, u64>,
}

impl HttpLoad {
    fn new() -> HttpLoad {
        HttpLoad {
            hist: new_hist(),
            answered: 0,
            elapsed: Duration::ZERO,
            errors: 0,
            first_error: None,
            broken: 0,
            first_broken: None,
            per_backend: BTreeMap::new(),
        }
    }

    /// Requests answered per second.
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, r: Result<String, Failure>, took: Duration) {
        match r {
            Ok(name) => {
                self.answered += 1;
                self.hist.saturating_record(took.as_nanos() as u64);
                *self.per_backend.entry(name).or_default() += 1;
            }
            Err(Failure::Broken(e)) => {
                self.broken += 1;
                self.first_broken.get_or_insert(e);
            }
            Err(Failure::Io(e)) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, o: HttpLoad) {
        let _ = self.hist.add(&o.hist);
        self.answered += o.answered;
        self.errors += o.errors;
        self.broken += o.broken;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        if self.first_broken.is_none() {
            self.first_broken = o.first_broken;
        }
        for (k, v) in o.per_backend {
            *self.per_backend.entry(k).or_default() += v;
        }
    }

    fn gave_up(&self) -> bool {
        self.errors + self.broken > MAX_ERRORS
    }
}

/// Why a request has no answer.
enum Failure {
    /// The request failed (connection, timeout, protocol).
    Io(String),
    /// An answer arrived, but not the one the backends give.
    Broken(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e.to_string())
    }
}

/// Checks an answer: 200, a backend name in the header, the body naming
/// the same backend. Returns the name.
fn check_answer(status: u16, header: Option<&str>, body: &[u8]) -> Result<String, Failure> {
    let Some(name) = header else {
        return Err(Failure::Broken(format!(
            "status {status}, no {BACKEND_HEADER} header, body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        )));
    };
    if status != 200 || body != http_body(name).as_bytes() {
        return Err(Failure::Broken(format!(
            "status {status} from {name:?}, body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        )));
    }
    Ok(name.to_string())
}

/// One HTTP/1.1 keep-alive connection.
pub struct H1Conn {
    addr: SocketAddr,
    s: Option<TcpStream>,
    buf: Vec<u8>,
}

impl H1Conn {
    /// Connects now (a failure is the caller's error).
    pub fn open(addr: SocketAddr) -> io::Result<H1Conn> {
        let s = connect(addr, CONNECT_TIMEOUT)?;
        Ok(H1Conn {
            addr,
            s: Some(s),
            buf: Vec::with_capacity(4096),
        })
    }

    /// `GET /` and its checked answer; reconnects first if the last answer
    /// closed the connection or the last request failed.
    fn get(&mut self) -> Result<String, Failure> {
        let r = self.try_get();
        if r.is_err() {
            self.s = None;
        }
        r
    }

    fn try_get(&mut self) -> Result<String, Failure> {
        if self.s.is_none() {
            self.s = Some(connect(self.addr, CONNECT_TIMEOUT)?);
            self.buf.clear();
        }
        let s = self.s.as_mut().ok_or(Failure::Io("not connected".into()))?;
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: bench.default\r\nUser-Agent: datapath-bench\r\n\r\n",
        )?;
        // The head.
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Failure::Broken("response head too large".into()));
            }
            read_more(s, &mut self.buf)?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Failure::Broken(format!("bad status line in {head:?}")))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        let mut backend = None;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ if k == BACKEND_HEADER => backend = Some(v.to_string()),
                _ => {}
            }
        }
        self.buf.drain(..head_end);
        let body = if chunked {
            read_chunked(s, &mut self.buf)?
        } else if let Some(n) = length {
            while self.buf.len() < n {
                read_more(s, &mut self.buf)?;
            }
            self.buf.drain(..n).collect()
        } else {
            // Until the server closes.
            close = true;
            loop {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b)?;
                if n == 0 {
                    break;
                }
                self.buf.extend_from_slice(&b[..n]);
                if self.buf.len() > MAX_HEAD {
                    return Err(Failure::Broken("unbounded body".into()));
                }
            }
            std::mem::take(&mut self.buf)
        };
        if close {
            self.s = None;
        }
        check_answer(status, backend.as_deref(), &body)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    let mut b = [0u8; 4096];
    let n = s.read(&mut b)?;
    if n == 0 {
        return Err(Failure::Io(
            "connection closed before the answer's end".into(),
        ));
    }
    buf.extend_from_slice(&b[..n]);
    Ok(())
}

/// A chunked body (trailers skipped).
fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(p) = find(buf, b"\r\n") {
                break p;
            }
            if buf.len() > MAX_HEAD {
                return Err(Failure::Broken("bad chunk size line".into()));
            }
            read_more(s, buf)?;
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| Failure::Broken(format!("bad chunk size {line:?}")))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                if buf.starts_with(b"\r\n") {
                    buf.drain(..2);
                    return Ok(body);
                }
                if let Some(p) = find(buf, b"\r\n\r\n") {
                    buf.drain(..p + 4);
                    return Ok(body);
                }
                if buf.len() > MAX_HEAD {
                    return Err(Failure::Broken("trailers too large".into()));
                }
                read_more(s, buf)?;
            }
        }
        if size > MAX_HEAD {
            return Err(Failure::Broken(format!("chunk of {size} B")));
        }
        while buf.len() < size + 2 {
            read_more(s, buf)?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// HTTP/1.1 keep-alive `GET`s on `conns` connections, one thread each,
/// one request in flight per connection. With [`Stop::For`], each
/// connection first warms up (up to 20 requests, at most 200 ms: a
/// connection to a slow backend must not hold the others up), then all
/// start together. A failed request counts, and the connection is opened
/// again.
pub fn h1_load(addr: SocketAddr, stop: Stop, conns: usize) -> io::Result<HttpLoad> {
    let mut opened: Vec<H1Conn> = (0..conns)
        .map(|_| H1Conn::open(addr))
        .collect::<io::Result<_>>()?;
    let barrier = std::sync::Barrier::new(opened.len());
    let results: Vec<HttpLoad> = std::thread::scope(|scope| {
        let handles: Vec<_> = opened
            .iter_mut()
            .map(|c| {
                let barrier = &barrier;
                scope.spawn(move || {
                    if matches!(stop, Stop::For(_)) {
                        let t = Instant::now();
                        for _ in 0..20 {
                            if t.elapsed() > Duration::from_millis(200) {
                                break;
                            }
                            let _ = c.get();
                        }
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let mut out = HttpLoad::new();
                    let mut n = 0u64;
                    loop {
                        let done = match stop {
                            Stop::For(d) => start.elapsed() >= d,
                            Stop::Count(k) => n >= k,
                        };
                        if done || out.gave_up() {
                            break;
                        }
                        n += 1;
                        let t = Instant::now();
                        let r = c.get();
                        out.record(r, t.elapsed());
                    }
                    out.elapsed = start.elapsed();
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let mut l = HttpLoad::new();
                    l.record(
                        Err(Failure::Io("client thread panicked".into())),
                        Duration::ZERO,
                    );
                    l
                })
            })
            .collect()
    });
    let mut all = HttpLoad::new();
    for r in results {
        all.elapsed = all.elapsed.max(r.elapsed);
        all.merge(r);
    }
    Ok(all)
}

/// Opens `n` HTTP/1.1 connections, each answering one request, and keeps
/// them (idle, keep-alive).
pub fn h1_open_idle(addr: SocketAddr, n: usize, deadline: Instant) -> io::Result<Vec<H1Conn>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("opened only {} HTTP connections in time", v.len()),
            ));
        }
        let mut c = H1Conn::open(addr)?;
        match c.get() {
            Ok(_) => {}
            Err(Failure::Io(e) | Failure::Broken(e)) => return Err(io::Error::other(e)),
        }
        v.push(c);
    }
    Ok(v)
}

/// `GET /` on one h2c connection (prior knowledge) with `streams`
/// requests in flight at once, each stream a task that sends its next
/// request as soon as its answer is in.
pub fn h2_load(addr: SocketAddr, stop: Stop, streams: usize) -> io::Result<HttpLoad> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(h2_load_async(addr, stop, streams.max(1)))
}

async fn h2_load_async(addr: SocketAddr, stop: Stop, streams: usize) -> io::Result<HttpLoad> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "h2c connect timed out"))??;
    tcp.set_nodelay(true)?;
    let (send, conn) = tokio::time::timeout(
        IO_TIMEOUT,
        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .handshake::<_, http_body_util::Empty<hyper::body::Bytes>>(TokioIo::new(tcp)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "h2c handshake timed out"))?
    .map_err(|e| io::Error::other(format!("h2c handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let uri = format!("http://{addr}/");
    if matches!(stop, Stop::For(_)) {
        let mut s = send.clone();
        for _ in 0..20 {
            let _ = h2_get(&mut s, &uri).await;
        }
    }
    let start = Instant::now();
    let left = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(match stop {
        Stop::Count(n) => n,
        Stop::For(_) => u64::MAX,
    }));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut s = send.clone();
        let uri = uri.clone();
        let left = left.clone();
        tasks.spawn(async move {
            let mut out = HttpLoad::new();
            loop {
                if let Stop::For(d) = stop
                    && start.elapsed() >= d
                {
                    break;
                }
                if out.gave_up()
                    || left
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |n| n.checked_sub(1),
                        )
                        .is_err()
                {
                    break;
                }
                let t = Instant::now();
                let r = h2_get(&mut s, &uri).await;
                out.record(r, t.elapsed());
            }
            out
        });
    }
    let mut all = HttpLoad::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(l) => all.merge(l),
            Err(e) => all.record(
                Err(Failure::Io(format!("stream task: {e}"))),
                Duration::ZERO,
            ),
        }
    }
    all.elapsed = start.elapsed();
    drop(send);
    conn.abort();
    Ok(all)
}

async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
    uri: &str,
) -> Result<String, Failure> {
    use http_body_util::BodyExt;
    let io = |e: String| Failure::Io(e);
    let fut = async {
        send.ready().await.map_err(|e| io(format!("h2c: {e}")))?;
        let req = hyper::Request::get(uri)
            .body(http_body_util::Empty::new())
            .map_err(|e| io(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| io(format!("h2c request: {e}")))?;
        let status = resp.status().as_u16();
        let backend = resp
            .headers()
            .get(BACKEND_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| io(format!("h2c body: {e}")))?
            .to_bytes();
        check_answer(status, backend.as_deref(), &body)
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(io("h2c request timed out".into())))
}

/// Runs `h2load` (nghttp2-client): one connection, `streams` concurrent
/// streams, for `dur`; reads its per-request log (`--log-file`) for the
/// percentiles, which its summary lacks. Runs in the calling thread's
/// network namespace and CPU set.
pub fn h2load(addr: SocketAddr, dur: Duration, streams: usize, log: &Path) -> io::Result<HttpLoad> {
    let _ = std::fs::remove_file(log);
    let ms = dur.as_millis().max(100);
    let out = Command::new("h2load")
        .args(["-c", "1", "-t", "1", "-m", &streams.to_string()])
        .arg(format!("-D{ms}ms"))
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{addr}/"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "h2load exited ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = std::fs::read_to_string(log)
        .map_err(|e| io::Error::other(format!("h2load log {}: {e}", log.display())))?;
    let mut l = parse_h2load_log(&text);
    // "finished in 500.12ms, 12345.00 req/s, …"
    l.elapsed = stdout
        .lines()
        .find_map(|line| line.strip_prefix("finished in "))
        .and_then(|rest| rest.split(',').next())
        .and_then(parse_h2load_duration)
        .unwrap_or(dur);
    if l.answered == 0 && l.errors == 0 && l.broken == 0 {
        return Err(io::Error::other(format!(
            "h2load logged no request: {}",
            stdout.trim()
        )));
    }
    Ok(l)
}

/// The per-request log: start (µs since the epoch), status (-1: the
/// stream failed), µs to the end of the answer.
fn parse_h2load_log(text: &str) -> HttpLoad {
    let mut l = HttpLoad::new();
    for line in text.lines() {
        let mut cols = line.split('\t');
        let (Some(_), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let (Ok(status), Ok(us)) = (status.trim().parse::<i32>(), us.trim().parse::<u64>()) else {
            continue;
        };
        match status {
            200 => {
                l.answered += 1;
                l.hist.saturating_record(us.saturating_mul(1000));
            }
            -1 => {
                l.errors += 1;
                l.first_error
                    .get_or_insert("h2load: a stream failed".into());
            }
            s => {
                l.broken += 1;
                l.first_broken.get_or_insert(format!("h2load: status {s}"));
            }
        }
    }
    l
}

/// `500.12ms`, `1.00s`, `12us` as h2load prints them.
fn parse_h2load_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v * scale))
}
