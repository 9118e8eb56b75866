//! The measuring clients. Each function runs on a thread that already
//! entered the client namespace (`Netns::run`), uses blocking sockets and
//! times with the client's own monotonic clock. Every loop is bounded by a
//! deadline; every socket has I/O timeouts.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sha2::{Digest, Sha256};
use socket2::{Domain, Socket, Type};

/// Size of a request (and of its echoed response).
pub const MSG: usize = 32;
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A latency histogram in nanoseconds.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("histogram bounds")
}

/// Result of a latency measurement.
pub struct Latency {
    /// At a fixed rate it also holds the samples that the coordinated-
    /// omission correction adds: not a count of requests.
    pub hist: Histogram<u64>,
    /// Requests answered.
    pub answered: u64,
    pub elapsed: Duration,
    pub errors: u64,
    /// The first failure, to say what went wrong.
    pub first_error: Option<String>,
}

impl Latency {
    /// Requests answered per second.
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Result of a bulk transfer.
pub struct Bulk {
    /// Bytes that crossed the proxy (both directions added for both-ways).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Counts (and hashes, when hashed) matched on both ends.
    pub intact: bool,
    pub detail: String,
}

impl Bulk {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The payload written repeatedly by bulk clients: pseudo-random, and of a
/// length that does not divide any buffer or pipe size.
pub fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..(1 << 20) + 7)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

fn set_timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// How a client closes its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// SO_LINGER 0: closing sends RST, nobody keeps TIME_WAIT.
    Rst,
    /// A normal close: FIN; the client's socket and (through a proxy) the
    /// proxy's upstream socket go through TIME_WAIT, and their local ports
    /// stay taken meanwhile, as for a node proxy's real clients.
    Fin,
}

/// Connects with SO_LINGER 0 (closing sends RST: no TIME_WAIT on the
/// client) and TCP_NODELAY.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_closing(addr, timeout, Close::Rst)
}

/// Connects with TCP_NODELAY, closing as `close` says.
pub fn connect_closing(addr: SocketAddr, timeout: Duration, close: Close) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if close == Close::Rst {
        s.set_linger(Some(Duration::ZERO))?;
    }
    s.set_tcp_nodelay(true)?;
    s.connect_timeout(&addr.into(), timeout)?;
    let s: TcpStream = s.into();
    set_timeouts(&s)?;
    Ok(s)
}

fn request() -> [u8; MSG] {
    let mut m = [0u8; MSG];
    for (i, b) in m.iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    m
}

/// One request/response on an echo connection; checks the echoed bytes.
fn round_trip(s: &mut TcpStream, req: &[u8; MSG]) -> io::Result<()> {
    s.write_all(req)?;
    let mut resp = [0u8; MSG];
    s.read_exact(&mut resp)?;
    if &resp != req {
        return Err(io::Error::other("echoed bytes differ"));
    }
    Ok(())
}

/// Request/response on one persistent connection, one in flight, as fast
/// as it goes, for `dur`.
pub fn ping_pong(addr: SocketAddr, dur: Duration) -> io::Result<Latency> {
    let mut s = connect(addr, CONNECT_TIMEOUT)?;
    let req = request();
    for _ in 0..50 {
        round_trip(&mut s, &req)?; // warm-up
    }
    let mut hist = new_hist();
    let start = Instant::now();
    let end = start + dur;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        round_trip(&mut s, &req)?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(Latency {
        answered: hist.len(),
        hist,
        elapsed: start.elapsed(),
        errors: 0,
        first_error: None,
    })
}

/// Request/response on one persistent connection at a fixed rate, one in
/// flight. A response slower than the interval is corrected for
/// coordinated omission (hdrhistogram `record_correct`), so a stall is not
/// hidden.
pub fn fixed_rate(addr: SocketAddr, dur: Duration, rate: f64) -> io::Result<Latency> {
    crate::sys::tight_timers();
    let mut s = connect(addr, CONNECT_TIMEOUT)?;
    let req = request();
    for _ in 0..50 {
        round_trip(&mut s, &req)?;
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut hist = new_hist();
    let start = Instant::now();
    let n = (dur.as_secs_f64() * rate) as u64;
    for i in 0..n {
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        round_trip(&mut s, &req)?;
        // Service time; a response slower than the interval also records
        // the requests it held back (coordinated-omission correction).
        let v = sent.elapsed().as_nanos() as u64;
        let _ = hist.record_correct(v, interval.as_nanos() as u64);
    }
    Ok(Latency {
        answered: n,
        hist,
        elapsed: start.elapsed(),
        errors: 0,
        first_error: None,
    })
}

/// One connection per request: connect(), send a request, wait for the
/// first byte of the response, close (RST or FIN). Returns connect → first
/// byte.
fn one_connection(addr: SocketAddr, req: &[u8; MSG], close: Close) -> io::Result<Duration> {
    let t = Instant::now();
    let mut s = connect_closing(addr, CONNECT_TIMEOUT, close)?;
    s.write_all(req)?;
    let mut b = [0u8; MSG];
    let n = s.read(&mut b)?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no response"));
    }
    let took = t.elapsed();
    if b[..n] != req[..n] {
        return Err(io::Error::other("response differs"));
    }
    Ok(took)
}

/// Sequential connection-per-request latency for `dur`.
pub fn connect_latency(addr: SocketAddr, dur: Duration, close: Close) -> Latency {
    let req = request();
    let mut hist = new_hist();
    let mut errors = 0;
    let mut first_error = None;
    let start = Instant::now();
    while start.elapsed() < dur {
        match one_connection(addr, &req, close) {
            Ok(d) => hist.saturating_record(d.as_nanos() as u64),
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                errors += 1;
                if errors > 1000 {
                    break;
                }
            }
        }
    }
    Latency {
        answered: hist.len(),
        hist,
        elapsed: start.elapsed(),
        errors,
        first_error,
    }
}

/// What [`connect_rate`] measured.
pub struct ConnRate {
    pub per_sec: f64,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Connections per second at saturation: `threads` clients in a loop.
pub fn connect_rate(addr: SocketAddr, dur: Duration, threads: usize, close: Close) -> ConnRate {
    let ok = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let req = request();
                while start.elapsed() < dur {
                    match one_connection(addr, &req, close) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| e.to_string());
                            }
                            if errors.fetch_add(1, Ordering::Relaxed) > 1000 {
                                break;
                            }
                            0
                        }
                    };
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    ConnRate {
        per_sec: n as f64 / elapsed,
        ok: n,
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.into_inner().ok().flatten(),
    }
}

/// What to send: for a time (throughput) or an exact amount (hashed check).
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    For(Duration),
    Bytes(u64),
}

/// Writes the pattern until `amount` is reached; hashes it if asked.
fn write_stream(s: &mut TcpStream, amount: Amount, hasher: &mut Option<Sha256>) -> io::Result<u64> {
    let p = pattern();
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let chunk = match amount {
            Amount::For(d) => {
                if start.elapsed() >= d {
                    break;
                }
                p
            }
            Amount::Bytes(n) => {
                if sent >= n {
                    break;
                }
                &p[..(n - sent).min(p.len() as u64) as usize]
            }
        };
        s.write_all(chunk)?;
        if let Some(h) = hasher.as_mut() {
            h.update(chunk);
        }
        sent += chunk.len() as u64;
    }
    Ok(sent)
}

/// One way: client → sink. Hashed (`Bytes`) or counted (`For`).
pub fn bulk_one_way(sink: SocketAddr, amount: Amount) -> io::Result<Bulk> {
    let hashed = matches!(amount, Amount::Bytes(_));
    let mut s = connect(sink, CONNECT_TIMEOUT)?;
    let start = Instant::now();
    s.write_all(if hashed { b"H" } else { b"C" })?;
    let mut hasher = hashed.then(Sha256::new);
    let sent = write_stream(&mut s, amount, &mut hasher)?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let elapsed = start.elapsed();
    let mut parts = reply.split_whitespace();
    let count: u64 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(u64::MAX);
    let their_hash = parts.next().unwrap_or("").to_string();
    let our_hash = hasher
        .map(|h| uproxy_lab::peers::hex(&h.finalize()))
        .unwrap_or_else(|| "-".into());
    let intact = count == sent && their_hash == our_hash;
    Ok(Bulk {
        bytes: sent,
        elapsed,
        intact,
        detail: format!("sent {sent} B ({our_hash}), sink got {count} B ({their_hash})"),
    })
}

/// Both ways: the client sends to the echo server and reads the echo at the
/// same time. Hashed (`Bytes`) or counted (`For`).
pub fn bulk_both_ways(echo: SocketAddr, amount: Amount) -> io::Result<Bulk> {
    let hashed = matches!(amount, Amount::Bytes(_));
    let mut w = connect(echo, CONNECT_TIMEOUT)?;
    let mut r = w.try_clone()?;
    let start = Instant::now();
    let (sent, sent_hash, got, got_hash) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> io::Result<(u64, String)> {
            let mut h = hashed.then(Sha256::new);
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
                if let Some(h) = h.as_mut() {
                    h.update(&buf[..n]);
                }
            }
            Ok((
                got,
                h.map(|h| uproxy_lab::peers::hex(&h.finalize()))
                    .unwrap_or_default(),
            ))
        });
        let mut h = hashed.then(Sha256::new);
        let sent = write_stream(&mut w, amount, &mut h);
        let _ = w.shutdown(Shutdown::Write);
        let read = reader.join().expect("reader thread");
        let sent = sent?;
        let (got, got_hash) = read?;
        let sent_hash = h
            .map(|h| uproxy_lab::peers::hex(&h.finalize()))
            .unwrap_or_default();
        Ok::<_, io::Error>((sent, sent_hash, got, got_hash))
    })?;
    let elapsed = start.elapsed();
    Ok(Bulk {
        bytes: sent + got,
        elapsed,
        intact: sent == got && sent_hash == got_hash,
        detail: format!("sent {sent} B {sent_hash}, echoed {got} B {got_hash}"),
    })
}

/// Opens `n` connections, each doing one request/response, and keeps them.
pub fn open_idle(addr: SocketAddr, n: usize, deadline: Instant) -> io::Result<Vec<TcpStream>> {
    let req = request();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("opened only {} connections in time", v.len()),
            ));
        }
        let mut s = connect(addr, CONNECT_TIMEOUT)?;
        round_trip(&mut s, &req)?;
        v.push(s);
    }
    Ok(v)
}

/// The response sizes of the medium phase: 16 KiB to 1 MiB, log-uniform
/// (25 sizes, each 2^(1/4) times the one before), asked in turn.
pub fn medium_sizes() -> Vec<usize> {
    (0..=24)
        .map(|k| (16384.0 * 2f64.powf(f64::from(k) / 4.0)).round() as usize)
        .collect()
}

/// What [`medium`] measured.
pub struct Medium {
    pub latency: Latency,
    /// Response bytes received.
    pub bytes: u64,
    /// The keep-alive connections, still open (idle now).
    pub conns: Vec<TcpStream>,
}

/// `conns` keep-alive connections, one thread each, ask the sized server
/// for medium responses ([`medium_sizes`], each thread starting elsewhere
/// in the cycle) for `dur`, one request in flight per connection. The
/// connections are returned open, idle, so that the caller can count what
/// an idle connection costs after medium traffic.
pub fn medium(addr: SocketAddr, dur: Duration, conns: usize) -> io::Result<Medium> {
    let sizes = medium_sizes();
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| connect(addr, CONNECT_TIMEOUT))
        .collect::<io::Result<_>>()?;
    let start = Instant::now();
    let results: Vec<io::Result<(Histogram<u64>, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let sizes = &sizes;
                scope.spawn(move || -> io::Result<(Histogram<u64>, u64)> {
                    let mut s = s;
                    let mut hist = new_hist();
                    let mut buf = vec![0u8; crate::servers::SIZED_MAX];
                    let mut bytes = 0u64;
                    let mut k = i * 7;
                    while start.elapsed() < dur {
                        let len = sizes[k % sizes.len()];
                        k += 1;
                        let t = Instant::now();
                        s.write_all(&(len as u64).to_be_bytes())?;
                        s.read_exact(&mut buf[..len])?;
                        hist.saturating_record(t.elapsed().as_nanos() as u64);
                        bytes += len as u64;
                    }
                    Ok((hist, bytes))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("client thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut hist = new_hist();
    let mut bytes = 0;
    for r in results {
        let (h, b) = r?;
        let _ = hist.add(&h);
        bytes += b;
    }
    Ok(Medium {
        latency: Latency {
            answered: hist.len(),
            hist,
            elapsed,
            errors: 0,
            first_error: None,
        },
        bytes,
        conns: streams,
    })
}

/// Reads a `\n`-terminated greeting (whoami).
pub fn greeting(s: &mut TcpStream) -> io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 64];
    while !out.contains(&b'\n') && out.len() < 256 {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[..n]);
    }
    let line = String::from_utf8_lossy(&out);
    Ok(line.lines().next().unwrap_or("").to_string())
}

/// Connects to a whoami port and returns the greeting.
pub fn who(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut s = connect(addr, timeout)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    greeting(&mut s)
}

/// Size of a UDP request (and of its echo): a small DNS query's size.
pub const UDP_MSG: usize = 64;
/// How long a UDP request waits for its answer before it counts as lost.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(250);
/// Client sockets (flows) of the many-clients UDP phase.
pub const UDP_CLIENTS: usize = 1000;

/// Result of a UDP request/response measurement. Lost requests (no
/// answer within [`UDP_TIMEOUT`]) are counted, not recorded as latencies.
pub struct UdpLatency {
    /// At a fixed rate it also holds the samples that the coordinated-
    /// omission correction adds: not a count of requests.
    pub hist: Histogram<u64>,
    /// Requests answered in the measured loop.
    pub answered: u64,
    /// The first request of each client socket (a new flow everywhere on
    /// the path), when the phase has several.
    pub new_flow: Option<Histogram<u64>>,
    /// Time of the measured loop (the new-flow pass excluded).
    pub elapsed: Duration,
    pub sent: u64,
    pub lost: u64,
    /// Requests that failed otherwise (an ICMP error, a send error).
    pub errors: u64,
    pub first_error: Option<String>,
}

impl UdpLatency {
    fn new() -> UdpLatency {
        UdpLatency {
            hist: new_hist(),
            answered: 0,
            new_flow: None,
            elapsed: Duration::ZERO,
            sent: 0,
            lost: 0,
            errors: 0,
            first_error: None,
        }
    }

    /// Requests answered per second in the measured loop.
    pub fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Counts the outcome of one request; records its latency if answered.
    /// Returns the latency. Gives up (`Err`) after 1000 failures.
    fn count(&mut self, r: io::Result<Option<Duration>>) -> io::Result<Option<Duration>> {
        self.sent += 1;
        match r {
            Ok(Some(d)) => Ok(Some(d)),
            Ok(None) => {
                self.lost += 1;
                Ok(None)
            }
            Err(e) => {
                self.first_error.get_or_insert_with(|| e.to_string());
                self.errors += 1;
                if self.errors > 1000 {
                    return Err(io::Error::other(format!(
                        "more than 1000 failed UDP requests (first: {e})"
                    )));
                }
                Ok(None)
            }
        }
    }
}

/// A UDP socket of the client namespace connected to `addr` (it only
/// receives datagrams from there: through a DNAT or a proxy, conntrack
/// turns the answer's source back into `addr`).
fn udp_client(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    s.connect(addr)?;
    s.set_read_timeout(Some(UDP_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One UDP request: a datagram carrying `seq` and the request pattern;
/// waits for the echo of this `seq` (earlier, late echoes are skipped)
/// for [`UDP_TIMEOUT`]. `Ok(None)`: lost.
fn udp_request(s: &std::net::UdpSocket, seq: u64) -> io::Result<Option<Duration>> {
    let mut req = [0u8; UDP_MSG];
    req[..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in req[8..].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    let t = Instant::now();
    s.send(&req)?;
    let mut resp = [0u8; UDP_MSG + 1];
    let mut stale = false;
    loop {
        let n = match s.recv(&mut resp) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stale {
                    s.set_read_timeout(Some(UDP_TIMEOUT))?;
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let took = t.elapsed();
        if n >= 8 && resp[..8] == req[..8] {
            if stale {
                s.set_read_timeout(Some(UDP_TIMEOUT))?;
            }
            if resp[..n] != req[..] {
                return Err(io::Error::other("echoed datagram differs"));
            }
            return Ok(Some(took));
        }
        // A late answer to an earlier request: wait out the rest.
        let Some(left) = UDP_TIMEOUT.checked_sub(took).filter(|d| !d.is_zero()) else {
            s.set_read_timeout(Some(UDP_TIMEOUT))?;
            return Ok(None);
        };
        s.set_read_timeout(Some(left))?;
        stale = true;
    }
}

/// Up to 50 requests (for at most a second, whatever is lost): the flow
/// exists everywhere on the path afterwards.
fn udp_warm_up(s: &std::net::UdpSocket, seq: &mut u64) {
    let start = Instant::now();
    for _ in 0..50 {
        if start.elapsed() > Duration::from_secs(1) {
            break;
        }
        *seq += 1;
        let _ = udp_request(s, *seq);
    }
}

/// UDP request/response from one client socket (one flow), one in flight,
/// as fast as it goes, for `dur`.
pub fn udp_ping(addr: SocketAddr, dur: Duration) -> io::Result<UdpLatency> {
    let s = udp_client(addr)?;
    let mut out = UdpLatency::new();
    let mut seq = 0u64;
    udp_warm_up(&s, &mut seq);
    let start = Instant::now();
    while start.elapsed() < dur {
        seq += 1;
        if let Some(d) = out.count(udp_request(&s, seq))? {
            out.answered += 1;
            out.hist.saturating_record(d.as_nanos() as u64);
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// The same at a fixed rate, one in flight; an answer slower than the
/// interval is corrected for coordinated omission, as for TCP.
pub fn udp_fixed_rate(addr: SocketAddr, dur: Duration, rate: f64) -> io::Result<UdpLatency> {
    crate::sys::tight_timers();
    let s = udp_client(addr)?;
    let mut out = UdpLatency::new();
    let mut seq = 0u64;
    udp_warm_up(&s, &mut seq);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let n = (dur.as_secs_f64() * rate) as u64;
    // Lost requests each wait out the timeout: a path that loses many
    // falls behind the schedule; it stops at twice the time.
    let limit = dur * 2 + Duration::from_secs(1);
    for i in 0..n {
        if start.elapsed() > limit {
            break;
        }
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        seq += 1;
        if let Some(d) = out.count(udp_request(&s, seq))? {
            out.answered += 1;
            let _ = out
                .hist
                .record_correct(d.as_nanos() as u64, interval.as_nanos() as u64);
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// Many clients: `clients` sockets (each its own source port, so its own
/// flow in conntrack and in a proxy's flow table). First each sends one
/// request (a new flow: recorded apart), then they take turns, one request
/// in flight in all, for `dur`.
pub fn udp_many(addr: SocketAddr, dur: Duration, clients: usize) -> io::Result<UdpLatency> {
    let socks: Vec<std::net::UdpSocket> = (0..clients)
        .map(|_| udp_client(addr))
        .collect::<io::Result<_>>()?;
    let mut out = UdpLatency::new();
    let mut new_flow = new_hist();
    let mut seq = 0u64;
    let limit = Instant::now() + dur + Duration::from_secs(20);
    for s in &socks {
        if Instant::now() > limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the new-flow pass took too long",
            ));
        }
        seq += 1;
        if let Some(d) = out.count(udp_request(s, seq))? {
            new_flow.saturating_record(d.as_nanos() as u64);
        }
    }
    let start = Instant::now();
    'outer: loop {
        for s in &socks {
            if start.elapsed() >= dur {
                break 'outer;
            }
            seq += 1;
            if let Some(d) = out.count(udp_request(s, seq))? {
                out.answered += 1;
                out.hist.saturating_record(d.as_nanos() as u64);
            }
        }
    }
    out.elapsed = start.elapsed();
    out.new_flow = Some(new_flow);
    Ok(out)
}
