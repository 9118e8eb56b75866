//! One round of every data-path measurement on an installed path, and the
//! idle-connection memory measurement.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uproxy_lab::{Lab, LabError, Netns};

use crate::clients::{self, Amount, Close};
use crate::paths::Active;
use crate::servers::Backends;
use crate::sys;

/// Runs `f` on a client-namespace thread pinned to the client CPU.
pub fn on_client<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    ns.run(|| {
        sys::pin_current_thread(sys::CLIENT_CPU);
        f()
    })
}

/// Connections of the fd probe in [`idle_memory`].
const PROBE: usize = 200;
/// Keep-alive connections of the medium-response phase.
pub const MEDIUM_CONNS: usize = 4;
/// How long the medium phase's connections stay idle before the proxy's
/// fds are counted: well past the relay's bulk-phase quiet time (100 ms).
const MEDIUM_IDLE: Duration = Duration::from_millis(500);

/// Durations and sizes of one round.
#[derive(Clone, Debug)]
pub struct Plan {
    pub secs: f64,
    pub rate: f64,
    pub conn_threads: usize,
    pub hashed_bytes: u64,
    pub phases: Phases,
}

/// Which measurements a round runs (`--phases`).
#[derive(Clone, Copy, Debug)]
pub struct Phases {
    pub rr: bool,
    pub rate: bool,
    /// Connection per request, the client closing with RST.
    pub connect: bool,
    /// The same, the client closing with FIN (TIME_WAIT on the way).
    pub connect_fin: bool,
    /// Medium responses on keep-alive connections, then their idle cost.
    pub medium: bool,
    pub bulk: bool,
    /// UDP request/response: one flow, fixed rate, many clients.
    pub udp: bool,
    /// The HTTP phases (their own lab and paths: `http.rs`).
    pub http: crate::http::HttpPhases,
}

impl Phases {
    pub fn all() -> Phases {
        Phases {
            rr: true,
            rate: true,
            connect: true,
            connect_fin: true,
            medium: true,
            bulk: true,
            udp: true,
            http: crate::http::HttpPhases {
                http1: true,
                h2c: true,
                fairness: true,
                slow: true,
            },
        }
    }

    /// Whether any phase of the L4 paths runs.
    pub fn any_l4(&self) -> bool {
        self.rr
            || self.rate
            || self.connect
            || self.connect_fin
            || self.medium
            || self.bulk
            || self.udp
    }

    pub fn parse(list: &str) -> Result<Phases, String> {
        let mut p = Phases {
            rr: false,
            rate: false,
            connect: false,
            connect_fin: false,
            medium: false,
            bulk: false,
            udp: false,
            http: crate::http::HttpPhases::default(),
        };
        for name in list.split(',') {
            match name {
                "rr" => p.rr = true,
                "rate" => p.rate = true,
                "connect" => p.connect = true,
                "connect-fin" => p.connect_fin = true,
                "medium" => p.medium = true,
                "bulk" => p.bulk = true,
                "udp" => p.udp = true,
                "http1" => p.http.http1 = true,
                "h2c" => p.http.h2c = true,
                "fairness" => p.http.fairness = true,
                "slow" => p.http.slow = true,
                "http" => {
                    p.http = crate::http::HttpPhases {
                        http1: true,
                        h2c: true,
                        fairness: true,
                        slow: true,
                    }
                }
                other => {
                    return Err(format!(
                        "--phases: unknown phase {other:?} (rr, rate, connect, connect-fin, medium, bulk, udp, \
                         http1, h2c, fairness, slow, http)"
                    ));
                }
            }
        }
        Ok(p)
    }
}

/// Requests sent and not answered in a UDP phase.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Loss {
    pub sent: u64,
    /// No answer within the timeout.
    pub lost: u64,
    /// Failed otherwise (an ICMP error, a send error).
    pub errors: u64,
}

impl Loss {
    pub fn add(&mut self, o: Loss) {
        self.sent += o.sent;
        self.lost += o.lost;
        self.errors += o.errors;
    }
}

/// What one UDP phase produced in one round.
#[derive(Default)]
pub struct UdpRound {
    pub hist: Option<Histogram<u64>>,
    pub rate: Option<f64>,
    /// The many-clients phase: each client's first request.
    pub new_flow: Option<Histogram<u64>>,
    pub loss: Loss,
}

/// What one path produced in one round.
#[derive(Default)]
pub struct Round {
    /// UDP: one flow as fast as it goes, at the fixed rate, many clients.
    pub udp_rr: UdpRound,
    pub udp_fixed: UdpRound,
    pub udp_many: UdpRound,
    pub ping: Option<Histogram<u64>>,
    pub ping_rate: Option<f64>,
    pub fixed: Option<Histogram<u64>>,
    pub fixed_rate_achieved: Option<f64>,
    pub conn: Option<Histogram<u64>>,
    pub conn_rate: Option<f64>,
    pub conn_fin: Option<Histogram<u64>>,
    pub conn_fin_rate: Option<f64>,
    pub medium: Option<Histogram<u64>>,
    pub medium_rate: Option<f64>,
    pub medium_gbps: Option<f64>,
    /// The proxy's fds per medium-phase connection once they were idle.
    pub medium_idle_fds: Option<f64>,
    pub one_way_gbps: Option<f64>,
    pub both_ways_gbps: Option<f64>,
    /// CPU seconds per GB moved, of the proxy process (one-way + both-ways).
    pub proxy_cpu_s_per_gb: Option<f64>,
    /// Busy CPU seconds of the whole machine per GB moved.
    pub machine_cpu_s_per_gb: Option<f64>,
    pub integrity_checks: u32,
    pub corrupted: Vec<String>,
    pub errors: Vec<String>,
}

fn dur(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

/// Runs every data-path measurement once against `a`.
pub fn round(lab: &Lab, a: &mut Active, plan: &Plan) -> Round {
    let mut r = Round::default();
    let t = a.targets;
    let client = lab.client();
    let d = dur(plan.secs);

    // In order: request/response on one connection, the same at a fixed
    // rate, connection per request, then bulk (hashed, then timed).
    if plan.phases.rr {
        ping(&mut r, client, t.echo, d);
    }
    if plan.phases.rate {
        fixed(&mut r, client, t.echo, d, plan.rate);
    }
    if plan.phases.udp && a.kind.carries_udp() {
        udp(&mut r, client, t.udp, d, plan.rate);
    }
    if plan.phases.connect {
        connect(&mut r, client, t.echo, d, plan.conn_threads, Close::Rst);
    }
    if plan.phases.connect_fin {
        connect(&mut r, client, t.echo, d, plan.conn_threads, Close::Fin);
    }
    if plan.phases.medium {
        medium(&mut r, a, client, d);
    }
    if let Err(e) = a.check_alive() {
        r.errors.push(e);
        return r;
    }
    if plan.phases.bulk {
        bulk(&mut r, a, client, plan);
        if let Err(e) = a.check_alive() {
            r.errors.push(e);
        }
    }
    r
}

/// Request/response on a persistent connection, one in flight.
fn ping(r: &mut Round, client: &Netns, echo: std::net::SocketAddr, d: Duration) {
    match on_client(client, || clients::ping_pong(echo, d)) {
        Ok(Ok(l)) if !l.hist.is_empty() => {
            r.ping_rate = Some(l.rate());
            r.ping = Some(l.hist);
        }
        Ok(Ok(_)) => r.errors.push("ping-pong: no samples".into()),
        Ok(Err(e)) => r.errors.push(format!("ping-pong: {e}")),
        Err(e) => r.errors.push(format!("ping-pong: {e}")),
    }
}

/// The same at a fixed rate below saturation.
fn fixed(r: &mut Round, client: &Netns, echo: std::net::SocketAddr, d: Duration, rate: f64) {
    match on_client(client, || clients::fixed_rate(echo, d, rate)) {
        Ok(Ok(l)) if !l.hist.is_empty() => {
            r.fixed_rate_achieved = Some(l.rate());
            r.fixed = Some(l.hist);
        }
        Ok(Ok(_)) => r.errors.push("fixed-rate: no samples".into()),
        Ok(Err(e)) => r.errors.push(format!("fixed-rate: {e}")),
        Err(e) => r.errors.push(format!("fixed-rate: {e}")),
    }
}

/// UDP request/response: one flow as fast as it goes, one flow at the
/// fixed rate, then [`clients::UDP_CLIENTS`] flows taking turns.
fn udp(r: &mut Round, client: &Netns, target: std::net::SocketAddr, d: Duration, rate: f64) {
    type Phase<'a> = (
        &'a str,
        Box<dyn FnOnce() -> std::io::Result<clients::UdpLatency> + Send>,
    );
    let phases: [(Phase<'_>, &mut UdpRound); 3] = [
        (
            (
                "UDP request/response",
                Box::new(move || clients::udp_ping(target, d)),
            ),
            &mut r.udp_rr,
        ),
        (
            (
                "UDP fixed rate",
                Box::new(move || clients::udp_fixed_rate(target, d, rate)),
            ),
            &mut r.udp_fixed,
        ),
        (
            (
                "UDP many clients",
                Box::new(move || clients::udp_many(target, d, clients::UDP_CLIENTS)),
            ),
            &mut r.udp_many,
        ),
    ];
    for ((what, f), out) in phases {
        match on_client(client, f) {
            Ok(Ok(l)) => {
                out.loss = Loss {
                    sent: l.sent,
                    lost: l.lost,
                    errors: l.errors,
                };
                if l.errors > 0 {
                    r.errors.push(format!(
                        "{what}: {} failed requests (first: {})",
                        l.errors,
                        l.first_error.as_deref().unwrap_or("?")
                    ));
                }
                if l.hist.is_empty() {
                    r.errors
                        .push(format!("{what}: no answer ({} lost)", l.lost));
                    continue;
                }
                out.rate = Some(l.rate());
                out.hist = Some(l.hist);
                out.new_flow = l.new_flow.filter(|h| !h.is_empty());
            }
            Ok(Err(e)) => r.errors.push(format!("{what}: {e}")),
            Err(e) => r.errors.push(format!("{what}: {e}")),
        }
    }
}

/// Connection per request: latency, then rate at saturation; the client
/// closes as `close` says.
fn connect(
    r: &mut Round,
    client: &Netns,
    echo: std::net::SocketAddr,
    d: Duration,
    threads: usize,
    close: Close,
) {
    let what = match close {
        Close::Rst => "connect",
        Close::Fin => "connect (FIN close)",
    };
    let (hist, rate) = match close {
        Close::Rst => (&mut r.conn, &mut r.conn_rate),
        Close::Fin => (&mut r.conn_fin, &mut r.conn_fin_rate),
    };
    match on_client(client, || clients::connect_latency(echo, d, close)) {
        Ok(l) if !l.hist.is_empty() => {
            if l.errors > 0 {
                r.errors.push(format!(
                    "{what} latency: {}",
                    failures(l.errors, l.first_error)
                ));
            }
            *hist = Some(l.hist);
        }
        Ok(l) => r.errors.push(format!(
            "{what} latency: no samples, {}",
            failures(l.errors, l.first_error)
        )),
        Err(e) => r.errors.push(format!("{what} latency: {e}")),
    }
    match on_client(client, || clients::connect_rate(echo, d, threads, close)) {
        Ok(c) if c.ok > 0 => {
            if c.errors > 0 {
                r.errors.push(format!(
                    "{what} rate: {}",
                    failures(c.errors, c.first_error)
                ));
            }
            *rate = Some(c.per_sec);
        }
        Ok(c) => r.errors.push(format!(
            "{what} rate: no connection, {}",
            failures(c.errors, c.first_error)
        )),
        Err(e) => r.errors.push(format!("{what} rate: {e}")),
    }
}

/// Medium responses (16 KiB–1 MiB) on [`MEDIUM_CONNS`] keep-alive
/// connections; then, with the connections idle, the proxy's fds per
/// connection (its sockets, and any pipe a bulk direction kept).
fn medium(r: &mut Round, a: &Active, client: &Netns, d: Duration) {
    let target = a.targets.sized;
    let pid = a.pid();
    // The last flows of the phase before may still be closing.
    let before = pid.map(settled_fds);
    let m = match on_client(client, || clients::medium(target, d, MEDIUM_CONNS)) {
        Ok(Ok(m)) if !m.latency.hist.is_empty() => m,
        Ok(Ok(_)) => return r.errors.push("medium: no samples".into()),
        Ok(Err(e)) => return r.errors.push(format!("medium: {e}")),
        Err(e) => return r.errors.push(format!("medium: {e}")),
    };
    r.medium_rate = Some(m.latency.rate());
    r.medium_gbps = Some(m.bytes as f64 * 8.0 / 1e9 / m.latency.elapsed.as_secs_f64().max(1e-9));
    r.medium = Some(m.latency.hist);
    std::thread::sleep(MEDIUM_IDLE);
    if let (Some(pid), Some(before)) = (pid, before) {
        let idle = sys::tree_fds(pid);
        r.medium_idle_fds = Some(idle.saturating_sub(before) as f64 / m.conns.len() as f64);
    }
    drop(m.conns);
}

/// The proxy's fd count once it has not changed for 200 ms (at most 3 s).
fn settled_fds(pid: u32) -> u64 {
    let end = Instant::now() + Duration::from_secs(3);
    let mut last = sys::tree_fds(pid);
    let mut since = Instant::now();
    while Instant::now() < end && since.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(20));
        let now = sys::tree_fds(pid);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// "N failed connections (first: …)" of a connect measurement.
fn failures(errors: u64, first: Option<String>) -> String {
    format!(
        "{errors} failed connections (first: {})",
        first.as_deref().unwrap_or("none recorded")
    )
}

/// Hashed transfers (integrity), then timed ones with CPU accounting.
fn bulk(r: &mut Round, a: &Active, client: &Netns, plan: &Plan) {
    let t = a.targets;
    let d = dur(plan.secs);
    for (what, f) in [
        ("one-way", clients::bulk_one_way as fn(_, _) -> _),
        ("both-ways", clients::bulk_both_ways),
    ] {
        let target = if what == "one-way" { t.sink } else { t.echo };
        match on_client(client, || f(target, Amount::Bytes(plan.hashed_bytes))) {
            Ok(Ok(b)) => {
                r.integrity_checks += 1;
                if !b.intact {
                    r.corrupted.push(format!("{what} hashed: {}", b.detail));
                }
            }
            Ok(Err(e)) => r.errors.push(format!("{what} hashed transfer: {e}")),
            Err(e) => r.errors.push(format!("{what} hashed transfer: {e}")),
        }
    }

    // 5. throughput, with CPU accounting around both transfers
    let tck = sys::clk_tck();
    let proxy0 = a.cpu_ticks();
    let machine0 = sys::machine_busy_ticks();
    let mut bytes = 0u64;
    for (what, f) in [
        ("one-way", clients::bulk_one_way as fn(_, _) -> _),
        ("both-ways", clients::bulk_both_ways),
    ] {
        let target = if what == "one-way" { t.sink } else { t.echo };
        match on_client(client, || f(target, Amount::For(d))) {
            Ok(Ok(b)) => {
                r.integrity_checks += 1;
                if !b.intact {
                    r.corrupted.push(format!("{what} counted: {}", b.detail));
                    continue;
                }
                bytes += b.bytes;
                if what == "one-way" {
                    r.one_way_gbps = Some(b.gbit_per_s());
                } else {
                    r.both_ways_gbps = Some(b.gbit_per_s());
                }
            }
            Ok(Err(e)) => r.errors.push(format!("{what} transfer: {e}")),
            Err(e) => r.errors.push(format!("{what} transfer: {e}")),
        }
    }
    let gb = bytes as f64 / 1e9;
    if gb > 0.0 {
        let machine1 = sys::machine_busy_ticks();
        r.machine_cpu_s_per_gb = Some(machine1.saturating_sub(machine0) as f64 / tck / gb);
        if let (Some(p0), Some(p1)) = (proxy0, a.cpu_ticks()) {
            r.proxy_cpu_s_per_gb = Some(p1.saturating_sub(p0) as f64 / tck / gb);
        }
    }
}

/// The proxy's memory with `n` idle proxied connections.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Memory {
    /// The proxy's file descriptors per idle connection (probe).
    pub fds_per_connection: usize,
    /// Connections asked for; more than `connections` when the open-file
    /// limit did not allow them all.
    pub requested: usize,
    pub idle_rss_kib: u64,
    pub idle_anon_kib: u64,
    pub connections: usize,
    pub loaded_rss_kib: u64,
    pub loaded_anon_kib: u64,
    pub fds: u64,
    /// (loaded - idle) RSS / connections.
    pub per_connection_bytes: f64,
    /// The same for anonymous memory only (heap, stacks).
    pub per_connection_anon_bytes: f64,
}

/// Opens up to `requested` connections (one request/response each) through
/// `a`, waits until the backends hold them all, and measures the proxy's
/// RSS.
///
/// RLIMIT_NOFILE is inherited and, without CAP_SYS_RESOURCE, its hard value
/// cannot be raised; so the number of connections is capped to what fits:
/// this process holds a client and a server socket per connection, and the
/// proxy's fds per connection are measured first with a probe of
/// [`PROBE`] connections.
pub fn idle_memory(
    lab: &Lab,
    a: &mut Active,
    backends: &Backends,
    requested: usize,
) -> Result<Memory, String> {
    use std::sync::atomic::Ordering;
    let pid = a.pid().ok_or("no proxy process")?;
    let target = a.targets.echo;
    let open = || backends.counters.echo_open.load(Ordering::SeqCst);
    let wait_open = |want: u64| {
        let end = Instant::now() + Duration::from_secs(30);
        while open() != want && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let open_from_client = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        lab.client()
            .run(|| {
                sys::pin_current_thread(sys::CLIENT_CPU);
                clients::open_idle(target, n, deadline)
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("opening {n} connections: {e}"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let open_before = open();
    let base_fds = sys::tree_fds(pid);
    // Probe: the proxy's fds per idle connection.
    let probe = open_from_client(PROBE)?;
    wait_open(open_before + PROBE as u64);
    std::thread::sleep(Duration::from_millis(100));
    let per_conn_fds = sys::tree_fds(pid)
        .saturating_sub(base_fds)
        .div_ceil(PROBE as u64)
        .max(2) as usize;
    drop(probe);
    wait_open(open_before);
    std::thread::sleep(Duration::from_millis(300));
    let lim = sys::nofile_limit() as usize;
    let cap = (lim.saturating_sub(400) / 2)
        .min(lim.saturating_sub(base_fds as usize + 200) / per_conn_fds);
    let n = requested.min(cap).max(1);

    let idle_rss = sys::tree_rss_kib(pid);
    let idle_anon = sys::tree_anon_kib(pid);
    let conns = open_from_client(n)?;
    wait_open(open_before + n as u64);
    std::thread::sleep(Duration::from_millis(500));
    let loaded_rss = sys::tree_rss_kib(pid);
    let loaded_anon = sys::tree_anon_kib(pid);
    let fds = sys::tree_fds(pid);
    a.check_alive()?;
    drop(conns);
    let d = |hi: u64, lo: u64| (hi as f64 - lo as f64) * 1024.0 / n as f64;
    Ok(Memory {
        requested,
        fds_per_connection: per_conn_fds,
        idle_rss_kib: idle_rss,
        idle_anon_kib: idle_anon,
        connections: n,
        loaded_rss_kib: loaded_rss,
        loaded_anon_kib: loaded_anon,
        fds,
        per_connection_bytes: d(loaded_rss, idle_rss),
        per_connection_anon_bytes: d(loaded_anon, idle_anon),
    })
}
