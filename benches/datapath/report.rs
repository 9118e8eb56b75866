//! Aggregation across rounds, the tables (stdout and docs), the targets of
//! issue 3, JSON, and docs/performance.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clients::new_hist;
use crate::control::Scale;
use crate::measure::{Loss, Memory, Round, UdpRound};
use crate::paths::PathKind;
use crate::sys::Machine;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Lat {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Lat {
    pub fn of(h: &Histogram<u64>) -> Option<Lat> {
        if h.is_empty() {
            return None;
        }
        let q = |p| h.value_at_quantile(p) as f64 / 1e3;
        Some(Lat {
            samples: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: h.max() as f64 / 1e3,
        })
    }

    pub fn points(&self) -> [f64; 5] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        ]
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// Smallest and largest of the rounds' values.
fn spread(v: &[f64]) -> Option<(f64, f64)> {
    if v.len() < 2 {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

/// A median with the spread of the rounds beside it: `6944 (6800–7100)`.
fn ms(median: Option<f64>, rounds: &[f64], prec: usize) -> String {
    match (f(median, prec), spread(rounds)) {
        (m, Some((lo, hi))) if m != "–" => format!("{m} ({lo:.prec$}–{hi:.prec$})"),
        (m, _) => m,
    }
}

/// The p50 of a histogram, in µs.
fn p50_us(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(0.5) as f64 / 1e3)
}

/// One UDP phase of one path over the rounds.
#[derive(Debug, Serialize)]
pub struct UdpSummary {
    pub lat: Option<Lat>,
    /// Median over rounds; every round's value follows.
    pub rate: Option<f64>,
    pub rates: Vec<f64>,
    pub p50s: Vec<f64>,
    /// Many clients: each client's first request (a new flow).
    pub new_flow: Option<Lat>,
    pub loss: Loss,
}

/// Collects one UDP phase over the rounds.
struct UdpAcc {
    hist: Histogram<u64>,
    new_flow: Histogram<u64>,
    rates: Vec<f64>,
    p50s: Vec<f64>,
    loss: Loss,
}

impl UdpAcc {
    fn new() -> UdpAcc {
        UdpAcc {
            hist: new_hist(),
            new_flow: new_hist(),
            rates: vec![],
            p50s: vec![],
            loss: Loss::default(),
        }
    }

    fn add(&mut self, r: &UdpRound) {
        if let Some(h) = &r.hist {
            let _ = self.hist.add(h);
            self.p50s.extend(p50_us(h));
        }
        if let Some(h) = &r.new_flow {
            let _ = self.new_flow.add(h);
        }
        self.rates.extend(r.rate);
        self.loss.add(r.loss);
    }

    fn summary(&self) -> Option<UdpSummary> {
        (self.loss.sent > 0).then(|| UdpSummary {
            lat: Lat::of(&self.hist),
            rate: median(&self.rates),
            rates: self.rates.clone(),
            p50s: self.p50s.clone(),
            new_flow: Lat::of(&self.new_flow),
            loss: self.loss,
        })
    }
}

/// Everything measured for one path.
#[derive(Debug, Serialize)]
pub struct PathSummary {
    /// UDP request/response: one flow, fixed rate, many clients (`None`:
    /// not run on this path).
    pub udp_rr: Option<UdpSummary>,
    pub udp_fixed: Option<UdpSummary>,
    pub udp_many: Option<UdpSummary>,
    pub name: String,
    pub core: bool,
    pub skipped: Option<String>,
    pub rounds: usize,
    pub ping: Option<Lat>,
    /// Median over rounds; every round's value follows.
    pub ping_rate: Option<f64>,
    pub ping_rates: Vec<f64>,
    /// Each round's p50 (µs), for the spread beside the merged p50.
    pub ping_p50s: Vec<f64>,
    pub fixed: Option<Lat>,
    pub fixed_rate: Option<f64>,
    pub fixed_rates: Vec<f64>,
    pub fixed_p50s: Vec<f64>,
    pub conn: Option<Lat>,
    pub conn_rate: Option<f64>,
    pub conn_rates: Vec<f64>,
    pub conn_p50s: Vec<f64>,
    pub conn_fin: Option<Lat>,
    pub conn_fin_rate: Option<f64>,
    pub conn_fin_rates: Vec<f64>,
    pub conn_fin_p50s: Vec<f64>,
    pub medium: Option<Lat>,
    pub medium_rate: Option<f64>,
    pub medium_rates: Vec<f64>,
    pub medium_p50s: Vec<f64>,
    pub medium_gbps: Option<f64>,
    pub medium_gbps_all: Vec<f64>,
    /// The proxy's fds per idle connection after the medium phase.
    pub medium_idle_fds: Option<f64>,
    pub medium_idle_fds_all: Vec<f64>,
    pub one_way_gbps: Option<f64>,
    pub one_way_all: Vec<f64>,
    pub both_ways_gbps: Option<f64>,
    pub both_ways_all: Vec<f64>,
    pub proxy_cpu_s_per_gb: Option<f64>,
    pub proxy_cpu_all: Vec<f64>,
    pub machine_cpu_s_per_gb: Option<f64>,
    pub machine_cpu_all: Vec<f64>,
    pub integrity_checks: u32,
    pub corrupted: Vec<String>,
    pub errors: Vec<String>,
    pub memory: Option<Memory>,
    pub memory_error: Option<String>,
}

/// Collects rounds of one path.
pub struct Acc {
    kind: PathKind,
    /// UDP: one flow, fixed rate, many clients.
    udp: [UdpAcc; 3],
    skipped: Option<String>,
    rounds: usize,
    ping: Histogram<u64>,
    fixed: Histogram<u64>,
    conn: Histogram<u64>,
    conn_fin: Histogram<u64>,
    medium: Histogram<u64>,
    ping_rates: Vec<f64>,
    fixed_rates: Vec<f64>,
    conn_rates: Vec<f64>,
    conn_fin_rates: Vec<f64>,
    medium_rates: Vec<f64>,
    medium_gbps: Vec<f64>,
    medium_idle_fds: Vec<f64>,
    ping_p50s: Vec<f64>,
    fixed_p50s: Vec<f64>,
    conn_p50s: Vec<f64>,
    conn_fin_p50s: Vec<f64>,
    medium_p50s: Vec<f64>,
    one_way: Vec<f64>,
    both: Vec<f64>,
    proxy_cpu: Vec<f64>,
    machine_cpu: Vec<f64>,
    integrity_checks: u32,
    corrupted: Vec<String>,
    errors: Vec<String>,
    pub memory: Option<Memory>,
    pub memory_error: Option<String>,
}

impl Acc {
    pub fn new(kind: PathKind) -> Acc {
        Acc {
            kind,
            udp: [UdpAcc::new(), UdpAcc::new(), UdpAcc::new()],
            skipped: None,
            rounds: 0,
            ping: new_hist(),
            fixed: new_hist(),
            conn: new_hist(),
            conn_fin: new_hist(),
            medium: new_hist(),
            ping_rates: vec![],
            fixed_rates: vec![],
            conn_rates: vec![],
            conn_fin_rates: vec![],
            medium_rates: vec![],
            medium_gbps: vec![],
            medium_idle_fds: vec![],
            ping_p50s: vec![],
            fixed_p50s: vec![],
            conn_p50s: vec![],
            conn_fin_p50s: vec![],
            medium_p50s: vec![],
            one_way: vec![],
            both: vec![],
            proxy_cpu: vec![],
            machine_cpu: vec![],
            integrity_checks: 0,
            corrupted: vec![],
            errors: vec![],
            memory: None,
            memory_error: None,
        }
    }

    pub fn skip(&mut self, why: String) {
        self.skipped = Some(why);
    }

    pub fn error(&mut self, e: String) {
        self.errors.push(e);
    }

    pub fn add(&mut self, r: Round) {
        self.rounds += 1;
        for (acc, u) in self
            .udp
            .iter_mut()
            .zip([&r.udp_rr, &r.udp_fixed, &r.udp_many])
        {
            acc.add(u);
        }
        for (h, all, p50s) in [
            (&r.ping, &mut self.ping, &mut self.ping_p50s),
            (&r.fixed, &mut self.fixed, &mut self.fixed_p50s),
            (&r.conn, &mut self.conn, &mut self.conn_p50s),
            (&r.conn_fin, &mut self.conn_fin, &mut self.conn_fin_p50s),
            (&r.medium, &mut self.medium, &mut self.medium_p50s),
        ] {
            if let Some(h) = h {
                let _ = all.add(h);
                p50s.extend(p50_us(h));
            }
        }
        self.ping_rates.extend(r.ping_rate);
        self.fixed_rates.extend(r.fixed_rate_achieved);
        self.conn_rates.extend(r.conn_rate);
        self.conn_fin_rates.extend(r.conn_fin_rate);
        self.medium_rates.extend(r.medium_rate);
        self.medium_gbps.extend(r.medium_gbps);
        self.medium_idle_fds.extend(r.medium_idle_fds);
        self.one_way.extend(r.one_way_gbps);
        self.both.extend(r.both_ways_gbps);
        self.proxy_cpu.extend(r.proxy_cpu_s_per_gb);
        self.machine_cpu.extend(r.machine_cpu_s_per_gb);
        self.integrity_checks += r.integrity_checks;
        self.corrupted.extend(r.corrupted);
        self.errors.extend(r.errors);
    }

    pub fn summary(&self) -> PathSummary {
        PathSummary {
            udp_rr: self.udp[0].summary(),
            udp_fixed: self.udp[1].summary(),
            udp_many: self.udp[2].summary(),
            name: self.kind.name().into(),
            core: self.kind.core(),
            skipped: self.skipped.clone(),
            rounds: self.rounds,
            ping: Lat::of(&self.ping),
            ping_rate: median(&self.ping_rates),
            ping_rates: self.ping_rates.clone(),
            ping_p50s: self.ping_p50s.clone(),
            fixed: Lat::of(&self.fixed),
            fixed_rate: median(&self.fixed_rates),
            fixed_rates: self.fixed_rates.clone(),
            fixed_p50s: self.fixed_p50s.clone(),
            conn: Lat::of(&self.conn),
            conn_rate: median(&self.conn_rates),
            conn_rates: self.conn_rates.clone(),
            conn_p50s: self.conn_p50s.clone(),
            conn_fin: Lat::of(&self.conn_fin),
            conn_fin_rate: median(&self.conn_fin_rates),
            conn_fin_rates: self.conn_fin_rates.clone(),
            conn_fin_p50s: self.conn_fin_p50s.clone(),
            medium: Lat::of(&self.medium),
            medium_rate: median(&self.medium_rates),
            medium_rates: self.medium_rates.clone(),
            medium_p50s: self.medium_p50s.clone(),
            medium_gbps: median(&self.medium_gbps),
            medium_gbps_all: self.medium_gbps.clone(),
            medium_idle_fds: median(&self.medium_idle_fds),
            medium_idle_fds_all: self.medium_idle_fds.clone(),
            one_way_gbps: median(&self.one_way),
            one_way_all: self.one_way.clone(),
            both_ways_gbps: median(&self.both),
            both_ways_all: self.both.clone(),
            proxy_cpu_s_per_gb: median(&self.proxy_cpu),
            proxy_cpu_all: self.proxy_cpu.clone(),
            machine_cpu_s_per_gb: median(&self.machine_cpu),
            machine_cpu_all: self.machine_cpu.clone(),
            integrity_checks: self.integrity_checks,
            corrupted: self.corrupted.clone(),
            errors: self.errors.clone(),
            memory: self.memory.clone(),
            memory_error: self.memory_error.clone(),
        }
    }
}

impl PathSummary {
    /// Why this path has no usable numbers, if so (skips excluded).
    /// The figures of the phases that ran that this path did not produce.
    pub fn missing(&self, phases: &crate::measure::Phases) -> Vec<&'static str> {
        if self.skipped.is_some() {
            return vec![];
        }
        let mut m = vec![];
        let carries_udp = PathKind::parse(&self.name).is_some_and(PathKind::carries_udp);
        if phases.udp && carries_udp {
            for (what, u) in [
                ("UDP request/response", &self.udp_rr),
                ("UDP fixed rate", &self.udp_fixed),
                ("UDP many clients", &self.udp_many),
            ] {
                if u.as_ref().and_then(|u| u.lat.as_ref()).is_none() {
                    m.push(what);
                }
            }
        }
        if phases.rr && self.ping.is_none() {
            m.push("persistent request/response");
        }
        if phases.rate && self.fixed.is_none() {
            m.push("fixed-rate request/response");
        }
        if phases.connect && self.conn.is_none() {
            m.push("connect latency");
        }
        if phases.connect && self.conn_rate.is_none() {
            m.push("connections/s");
        }
        if phases.connect_fin && (self.conn_fin.is_none() || self.conn_fin_rate.is_none()) {
            m.push("connect with FIN close");
        }
        if phases.medium && self.medium_rate.is_none() {
            m.push("medium responses");
        }
        if phases.bulk && self.one_way_gbps.is_none() {
            m.push("one-way throughput");
        }
        if phases.bulk && self.both_ways_gbps.is_none() {
            m.push("both-ways throughput");
        }
        if phases.bulk && self.integrity_checks == 0 {
            m.push("integrity checks");
        }
        m
    }
}

/// One figure the issue sets, and whether it was met.
#[derive(Debug, Serialize)]
pub struct Target {
    pub figure: String,
    pub target: String,
    pub measured: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub mode: String,
    pub machine: Machine,
    pub versions: BTreeMap<String, String>,
    pub settings: BTreeMap<String, String>,
    pub paths: Vec<PathSummary>,
    pub control: Vec<Scale>,
    /// `--baseline-bin`'s control-plane runs, interleaved with `control`.
    pub control_baseline: Vec<Scale>,
    pub targets: Vec<Target>,
    /// The HTTP phases (`None`: not run).
    pub http: Option<crate::http::HttpReport>,
    pub runtime_s: f64,
}

impl Report {
    pub fn path(&self, kind: PathKind) -> Option<&PathSummary> {
        self.paths
            .iter()
            .find(|p| p.name == kind.name() && p.skipped.is_none())
    }
}

fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn delta(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.1}", a - b),
        _ => "–".into(),
    }
}

/// The higher of the load averages at the start and end of the run, when
/// it exceeds the machine's CPUs.
fn busy_load(rep: &Report) -> Option<f64> {
    let text = rep.settings.get("load average (1 min) at start / end")?;
    let load = text
        .split('/')
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .fold(0.0, f64::max);
    (load > rep.machine.cores.max(1) as f64).then_some(load)
}

/// Computes the targets of issue 3 from the results.
pub fn targets(rep: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let s = rep.path(PathKind::UproxySplice);
    let direct = rep.path(PathKind::Direct);
    let ipt = rep.path(PathKind::Iptables);
    let get = |p: Option<&PathSummary>, g: fn(&PathSummary) -> Option<f64>| p.and_then(g);
    let mut push = |figure: &str, target: &str, measured: String, met: Option<bool>| {
        t.push(Target {
            figure: figure.into(),
            target: target.into(),
            measured,
            met,
        })
    };
    // 1. persistent request rate
    let (a, b) = (get(s, |p| p.ping_rate), get(direct, |p| p.ping_rate));
    let r = a.zip(b).map(|(a, b)| a / b);
    push(
        "persistent-connection request rate vs direct",
        "≥ 0.70 × direct",
        format!("{} × ({} vs {} req/s)", f(r, 2), f(a, 0), f(b, 0)),
        r.map(|r| r >= 0.70),
    );
    // 2, 3. added latency over iptables
    for (name, lim, q) in [
        ("added p50 latency over iptables", 20.0, 0usize),
        ("added p99 latency over iptables", 50.0, 2usize),
    ] {
        let a = s.and_then(|p| p.ping.as_ref()).map(|l| l.points()[q]);
        let b = ipt.and_then(|p| p.ping.as_ref()).map(|l| l.points()[q]);
        let d = a.zip(b).map(|(a, b)| a - b);
        push(
            name,
            &format!("≤ {lim} µs"),
            format!("{} µs ({} vs {} µs)", delta(a, b), f(a, 1), f(b, 1)),
            d.map(|d| d <= lim),
        );
    }
    // 4. bulk
    let (a, b) = (get(s, |p| p.one_way_gbps), get(direct, |p| p.one_way_gbps));
    let r = a.zip(b).map(|(a, b)| a / b);
    let (a2, b2) = (
        get(s, |p| p.both_ways_gbps),
        get(direct, |p| p.both_ways_gbps),
    );
    push(
        "bulk throughput vs direct (splice)",
        "≥ 0.80 × direct",
        format!(
            "one way {} × ({} vs {} Gbit/s); both ways {} ×",
            f(r, 2),
            f(a, 2),
            f(b, 2),
            ratio(a2, b2)
        ),
        r.map(|r| r >= 0.80),
    );
    // 5. conn/s
    let (a, b) = (get(s, |p| p.conn_rate), get(ipt, |p| p.conn_rate));
    let r = a.zip(b).map(|(a, b)| a / b);
    push(
        "connections per second vs iptables",
        "≥ 0.60 × iptables",
        format!("{} × ({} vs {} conn/s)", f(r, 2), f(a, 0), f(b, 0)),
        r.map(|r| r >= 0.60),
    );
    // 6. ahead of the peers
    for peer in [PathKind::Nginx, PathKind::Haproxy, PathKind::HaproxySplice] {
        let Some(p) = rep.path(peer) else {
            push(
                &format!("ahead of {} on every figure", peer.name()),
                "better on every figure",
                "peer not measured (not installed or not selected)".into(),
                None,
            );
            continue;
        };
        let Some(s) = s else {
            push(
                &format!("ahead of {} on every figure", peer.name()),
                "better on every figure",
                "kube-uproxy splice not measured".into(),
                None,
            );
            continue;
        };
        type G = fn(&PathSummary) -> Option<f64>;
        let figures: [(&str, G, bool); 11] = [
            ("req/s", |p| p.ping_rate, true),
            ("rr p50", |p| p.ping.as_ref().map(|l| l.p50_us), false),
            ("rr p99", |p| p.ping.as_ref().map(|l| l.p99_us), false),
            (
                "fixed-rate p99",
                |p| p.fixed.as_ref().map(|l| l.p99_us),
                false,
            ),
            ("connect p50", |p| p.conn.as_ref().map(|l| l.p50_us), false),
            ("connect p99", |p| p.conn.as_ref().map(|l| l.p99_us), false),
            ("conn/s", |p| p.conn_rate, true),
            ("one-way Gbit/s", |p| p.one_way_gbps, true),
            ("both-ways Gbit/s", |p| p.both_ways_gbps, true),
            ("proxy CPU s/GB", |p| p.proxy_cpu_s_per_gb, false),
            (
                "memory/idle conn",
                |p| p.memory.as_ref().map(|m| m.per_connection_bytes),
                false,
            ),
        ];
        let mut lost = Vec::new();
        let mut won = 0;
        for (name, g, higher_better) in figures {
            if let (Some(a), Some(b)) = (g(s), g(p)) {
                let better = if higher_better { a > b } else { a < b };
                if better {
                    won += 1;
                } else {
                    lost.push(format!("{name} {a:.1} vs {b:.1}"));
                }
            }
        }
        let measured = if won == 0 && lost.is_empty() {
            "no figure measured on both".to_string()
        } else if lost.is_empty() {
            format!("ahead on all {won} figures")
        } else {
            format!("ahead on {won}; behind on: {}", lost.join(", "))
        };
        push(
            &format!("ahead of {} on every figure", peer.name()),
            "better on every figure",
            measured,
            (won > 0 || !lost.is_empty()).then_some(lost.is_empty()),
        );
    }
    // 7. memory per idle connection
    let m = s.and_then(|p| p.memory.as_ref());
    push(
        "user-space memory per idle proxied connection",
        "≤ 16 KiB",
        m.map(|m| {
            format!(
                "{:.1} KiB RSS ({:.1} KiB anon) over {} connections",
                m.per_connection_bytes / 1024.0,
                m.per_connection_anon_bytes / 1024.0,
                m.connections
            )
        })
        .unwrap_or_else(|| "not measured".into()),
        m.map(|m| m.per_connection_bytes <= 16.0 * 1024.0),
    );
    // 8. cold start at 10 000
    let c10 = rep.control.iter().find(|c| c.services == 10_000);
    push(
        "10 000 Services programmed from a cold start",
        "≤ 2 s",
        c10.and_then(|c| c.cold_start_s)
            .map(|v| {
                format!(
                    "{v:.2} s ({} map elements)",
                    c10.map_or(0, |c| c.nft_elements)
                )
            })
            .unwrap_or_else(|| "not measured (full mode only)".into()),
        c10.and_then(|c| c.cold_start_s).map(|v| v <= 2.0),
    );
    // 8b. proxy memory per Service (issue 8), between the smallest and
    // the largest scale
    let lo = rep
        .control
        .iter()
        .filter(|c| c.rss_kib > 0)
        .min_by_key(|c| c.services);
    let hi = rep
        .control
        .iter()
        .filter(|c| c.rss_kib > 0)
        .max_by_key(|c| c.services);
    let per = match (lo, hi) {
        (Some(lo), Some(hi)) if hi.services > lo.services => Some((
            (hi.rss_kib as f64 - lo.rss_kib as f64) / (hi.services - lo.services) as f64,
            lo.services,
            hi.services,
        )),
        _ => None,
    };
    push(
        "proxy RSS per Service (two endpoints, mixed types; issue 8)",
        "< 8 KiB",
        per.map(|(k, lo, hi)| format!("{k:.2} KiB (RSS at {hi} vs {lo} Services)"))
            .unwrap_or_else(|| "not measured".into()),
        per.map(|(k, _, _)| k < 8.0),
    );
    // 9. EndpointSlice change, worst p99 over the scales measured
    let worst = rep
        .control
        .iter()
        .filter_map(|c| {
            c.endpoint_change
                .from_event
                .as_ref()
                .map(|m| (c.services, m.p99))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    push(
        "EndpointSlice change used by the next connection (from the watch event)",
        "≤ 10 ms p99",
        worst
            .map(|(n, p99)| format!("p99 {p99:.1} ms (worst scale: {n} Services)"))
            .unwrap_or_else(|| "not measured".into()),
        worst.map(|(_, p)| p <= 10.0),
    );
    // 10. one Service added at the largest scale
    let add = rep
        .control
        .iter()
        .filter(|c| c.service_add.is_some())
        .max_by_key(|c| c.services);
    let add_ms = add.and_then(|c| c.service_add.as_ref()?.from_event.clone());
    let at10k = add.is_some_and(|c| c.services >= 10_000);
    push(
        "one Service added at 10 000 (from the watch event, p50)",
        "≤ 20 ms",
        match (&add_ms, add) {
            (Some(m), Some(c)) => format!(
                "p50 {:.1} ms, max {:.1} ms (at {} Services)",
                m.p50, m.max, c.services
            ),
            _ => "not measured".into(),
        },
        add_ms.filter(|_| at10k).map(|m| m.p50 <= 20.0),
    );
    // The data-path comparisons (1-6) need CPUs that the lab has to
    // itself: on a machine busier than its CPUs, the pinned client and
    // servers wait behind other work and the ratios measure the scheduler.
    if let Some(load) = busy_load(rep) {
        let data_path = [
            "persistent-connection",
            "added p",
            "bulk throughput",
            "connections per second",
            "ahead of",
        ];
        for x in t
            .iter_mut()
            .filter(|x| x.met.is_some() && data_path.iter().any(|p| x.figure.starts_with(p)))
        {
            x.met = None;
            x.measured.push_str(&format!(
                " — not judged: load average {load:.1} on {} CPUs",
                rep.machine.cores
            ));
        }
    }
    t
}

/// The result tables in Markdown (also printed to stdout).
pub fn tables(rep: &Report) -> String {
    let mut o = String::new();
    let direct = rep.path(PathKind::Direct);
    let ipt = rep.path(PathKind::Iptables);
    let skipped: Vec<&PathSummary> = rep.paths.iter().filter(|p| p.skipped.is_some()).collect();
    let live: Vec<&PathSummary> = rep.paths.iter().filter(|p| p.skipped.is_none()).collect();

    let _ = writeln!(
        o,
        "Rates are the median of the rounds, latency percentiles come from the rounds' merged \
         histograms; in parentheses the smallest and largest round (for p50: of the rounds' own p50).\n"
    );
    // A table only for the measurements this run made.
    let any = |g: fn(&PathSummary) -> bool| live.iter().any(|p| g(p));
    if any(|p| p.ping.is_some()) {
        let _ = writeln!(
            o,
            "#### Request/response on a persistent connection (32 B, one in flight)\n\n\
         | path | req/s | × direct | × iptables | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | p50 − iptables | p99 − iptables |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &live {
            let l = p.ping.as_ref();
            let g = |q: usize| l.map(|l| l.points()[q]);
            let ip = |q: usize| ipt.and_then(|i| i.ping.as_ref()).map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(p.ping_rate, &p.ping_rates, 0),
                ratio(p.ping_rate, direct.and_then(|d| d.ping_rate)),
                ratio(p.ping_rate, ipt.and_then(|d| d.ping_rate)),
                ms(g(0), &p.ping_p50s, 1),
                f(g(1), 1),
                f(g(2), 1),
                f(g(3), 1),
                f(g(4), 0),
                delta(g(0), ip(0)),
                delta(g(2), ip(2)),
            );
        }
    }
    let rate = rep.settings.get("fixed_rate").cloned().unwrap_or_default();
    if any(|p| p.fixed.is_some()) {
        let _ = writeln!(
            o,
            "\n#### Request/response at a fixed rate ({rate} req/s, below saturation; coordinated-omission corrected)\n\n\
         | path | achieved req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for p in &live {
            let g = |q: usize| p.fixed.as_ref().map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(p.fixed_rate, &p.fixed_rates, 0),
                ms(g(0), &p.fixed_p50s, 1),
                f(g(1), 1),
                f(g(2), 1),
                f(g(3), 1),
                f(g(4), 0)
            );
        }
    }
    udp_tables(&mut o, &live, &rate);
    let threads = rep
        .settings
        .get("conn_threads")
        .cloned()
        .unwrap_or_default();
    type Conn = fn(&PathSummary) -> (Option<&Lat>, Option<f64>, &[f64], &[f64]);
    let connects: [(&str, Conn); 2] = [
        ("RST close (SO_LINGER 0: no TIME_WAIT anywhere)", |p| {
            (p.conn.as_ref(), p.conn_rate, &p.conn_rates, &p.conn_p50s)
        }),
        (
            "FIN close (the client's socket and a proxy's upstream socket go through TIME_WAIT)",
            |p| {
                (
                    p.conn_fin.as_ref(),
                    p.conn_fin_rate,
                    &p.conn_fin_rates,
                    &p.conn_fin_p50s,
                )
            },
        ),
    ];
    for (close, get) in connects {
        if live
            .iter()
            .all(|p| get(p).1.is_none() && get(p).0.is_none())
        {
            continue;
        }
        let _ = writeln!(
            o,
            "\n#### Connection per request (connect() → first response byte; {close})\n\n\
             | path | conn/s ({threads} threads) | × direct | × iptables | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &live {
            let (lat, rate, rates, p50s) = get(p);
            let g = |q: usize| lat.map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(rate, rates, 0),
                ratio(rate, direct.and_then(|d| get(d).1)),
                ratio(rate, ipt.and_then(|d| get(d).1)),
                ms(g(0), p50s, 1),
                f(g(1), 1),
                f(g(2), 1),
                f(g(3), 1),
                f(g(4), 0)
            );
        }
    }
    if live.iter().any(|p| p.medium.is_some()) {
        let conns = rep
            .settings
            .get("medium connections")
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "\n#### Medium responses on keep-alive connections (16 KiB–1 MiB, {conns} connections, one request in flight each)\n\n\
             The last column: the proxy's file descriptors per connection once the connections have been idle for 0.5 s \
             (2 = its two sockets; a pipe kept by a bulk direction adds 2).\n\n\
             | path | responses/s | Gbit/s | p50 µs | p99 µs | max µs | proxy fds per idle connection after |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        for p in &live {
            let g = |q: usize| p.medium.as_ref().map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(p.medium_rate, &p.medium_rates, 0),
                ms(p.medium_gbps, &p.medium_gbps_all, 2),
                ms(g(0), &p.medium_p50s, 1),
                f(g(2), 1),
                f(g(4), 0),
                if p.medium_idle_fds.is_some() {
                    ms(p.medium_idle_fds, &p.medium_idle_fds_all, 1)
                } else if p.medium.is_some() {
                    "(kernel)".into()
                } else {
                    "–".into()
                },
            );
        }
    }
    if any(|p| p.one_way_gbps.is_some() || p.both_ways_gbps.is_some() || p.integrity_checks > 0) {
        let _ = writeln!(
            o,
            "\n#### Bulk throughput (one TCP connection) and CPU per GB\n\n\
         | path | one way Gbit/s | × direct | × iptables | both ways Gbit/s | × direct | × iptables | proxy CPU s/GB | machine CPU s/GB | integrity checks |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for p in &live {
            let integrity = if p.corrupted.is_empty() {
                format!("{} ok", p.integrity_checks)
            } else {
                format!("{} CORRUPTED of {}", p.corrupted.len(), p.integrity_checks)
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(p.one_way_gbps, &p.one_way_all, 2),
                ratio(p.one_way_gbps, direct.and_then(|d| d.one_way_gbps)),
                ratio(p.one_way_gbps, ipt.and_then(|d| d.one_way_gbps)),
                ms(p.both_ways_gbps, &p.both_ways_all, 2),
                ratio(p.both_ways_gbps, direct.and_then(|d| d.both_ways_gbps)),
                ratio(p.both_ways_gbps, ipt.and_then(|d| d.both_ways_gbps)),
                if p.name == PathKind::Direct.name()
                    || p.name == PathKind::Iptables.name()
                    || p.name == PathKind::Nftables.name()
                {
                    "(kernel)".into()
                } else {
                    ms(p.proxy_cpu_s_per_gb, &p.proxy_cpu_all, 3)
                },
                ms(p.machine_cpu_s_per_gb, &p.machine_cpu_all, 3),
                integrity
            );
        }
    }
    let mem: Vec<&&PathSummary> = live
        .iter()
        .filter(|p| p.memory.is_some() || p.memory_error.is_some())
        .collect();
    if !mem.is_empty() {
        let _ = writeln!(
            o,
            "\n#### Proxy memory with idle connections (each did one request/response)\n\n\
             | path | RSS idle KiB | connections | RSS loaded KiB | RSS / connection | anon / connection | fds | fds / connection |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in mem {
            match (&p.memory, &p.memory_error) {
                (Some(m), _) => {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {:.2} KiB | {:.2} KiB | {} | {} |",
                        p.name,
                        m.idle_rss_kib,
                        if m.requested > m.connections {
                            format!("{} (of {} asked; fd limit)", m.connections, m.requested)
                        } else {
                            m.connections.to_string()
                        },
                        m.loaded_rss_kib,
                        m.per_connection_bytes / 1024.0,
                        m.per_connection_anon_bytes / 1024.0,
                        m.fds,
                        m.fds_per_connection
                    );
                }
                (None, Some(e)) => {
                    let _ = writeln!(
                        o,
                        "| {} | failed: {} | | | | | | |",
                        p.name,
                        e.replace('\n', " ")
                    );
                }
                _ => {}
            }
        }
    }
    if !rep.control.is_empty() {
        control_tables(&mut o, rep);
    }
    if !skipped.is_empty() {
        let _ = writeln!(o);
        for p in skipped {
            let _ = writeln!(
                o,
                "- **{}**: skipped ({})",
                p.name,
                p.skipped.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        o,
        "\n#### Targets (issue 3), kube-uproxy with `--tcp-relay splice`\n\n| figure | target | measured | |\n|---|---|---|---|"
    );
    for t in &rep.targets {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            t.figure,
            t.target,
            t.measured,
            match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None if t.measured.contains("not judged") => "not judged",
                None => "not measured",
            }
        );
    }
    if let Some(h) = &rep.http {
        o.push_str(&crate::http::tables(h));
    }
    let problems: Vec<String> = live
        .iter()
        .flat_map(|p| {
            p.errors
                .iter()
                .chain(p.corrupted.iter())
                .map(move |e| format!("- {}: {}", p.name, e.replace('\n', " ")))
        })
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(o, "\n#### Errors during the run\n");
        for p in problems.iter().take(40) {
            let _ = writeln!(o, "{p}");
        }
    }
    o
}

/// The control-plane tables: start, memory and the table's size per scale;
/// then the time of one change per scale.
fn control_tables(o: &mut String, rep: &Report) {
    use crate::control::Ms;
    let with_baseline = !rep.control_baseline.is_empty();
    let _ = writeln!(
        o,
        "\n#### Control plane (kube-uproxy, --manifests directory: {})\n\n\
         N Services of mixed types, in turn: ClusterIP 80/TCP; ClusterIP 53/UDP + 53/TCP; NodePort 80/TCP; \
         ClusterIP with an externalIP, 80/TCP; LoadBalancer IP with two loadBalancerSourceRanges, 80/TCP + 53/UDP; \
         two endpoints each (plus the one-endpoint Service whose EndpointSlice is rewritten). \
         Rules and elements: `nft -j list table ip kube-uproxy` after the cold start. \
         RSS per Service: (RSS − RSS at the smallest scale) / (Services − smallest scale's Services), \
         per build.{}\n\n\
         |{} Services | Service ports | cold start → rules synced | that sync took | nft rules | set and map elements | service-ports / node-ports / lb-guarded / lb-allowed | RSS KiB | RSS per Service |\n\
         |{}---:|---:|---:|---:|---:|---:|---|---:|---:|",
        rep.settings
            .get("manifests_watch")
            .cloned()
            .unwrap_or_default(),
        if with_baseline {
            " Rows \"baseline\": the `--baseline-bin` binary, run right after this build at each scale."
        } else {
            ""
        },
        if with_baseline { " build |" } else { "" },
        if with_baseline { "---|" } else { "" },
    );
    // (is the baseline, its label, its scales)
    let builds: [(bool, &str, &[Scale]); 2] = [
        (false, "this build", &rep.control),
        (true, "baseline", &rep.control_baseline),
    ];
    // Interleaved as they ran: each scale, this build then the baseline.
    let mut rows: Vec<(bool, &str, &Scale, Option<&Scale>)> = Vec::new();
    for (is_baseline, label, scales) in builds {
        let base = scales
            .iter()
            .filter(|c| c.rss_kib > 0)
            .min_by_key(|c| c.services);
        rows.extend(scales.iter().map(|c| (is_baseline, label, c, base)));
    }
    rows.sort_by_key(|(is_baseline, _, c, _)| (c.services, *is_baseline));
    for (_, label, c, base) in rows {
        let per_service = match base {
            Some(b) if c.services > b.services && c.rss_kib > 0 => format!(
                "{:.2} KiB",
                (c.rss_kib as f64 - b.rss_kib as f64) / (c.services - b.services) as f64
            ),
            _ => "–".into(),
        };
        let set = |n: &str| c.nft_sets.get(n).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "|{} {} | {} | {} | {} ms | {} | {} | {} / {} / {} / {} | {} | {} |",
            if with_baseline {
                format!(" {label} |")
            } else {
                String::new()
            },
            c.services,
            c.service_ports,
            c.cold_start_s
                .map(|v| format!("{v:.3} s"))
                .unwrap_or_else(|| c
                    .error
                    .clone()
                    .map(|_| "failed".into())
                    .unwrap_or("–".into())),
            f(c.sync_took_ms, 1),
            c.nft_rules,
            c.nft_sets.values().sum::<usize>(),
            set("service-ports"),
            set("node-ports"),
            set("lb-guarded"),
            set("lb-allowed"),
            c.rss_kib,
            per_service,
        );
    }
    let _ = writeln!(
        o,
        "\n#### Control plane: one change at each scale\n\n\
         EndpointSlice change: the rewritten Service's endpoint is replaced by another, then back (no rule update: \
         the balancer's set changes in user space). Service added: one more ClusterIP Service in a file of its own \
         (elements added to the table). Times to the first new connection that uses the change.\n\n\
         | Services | EndpointSlice change → next connection: from event p50 / p99 / max ms | from file write p50 / p99 ms | \
         Service added: from event p50 / max ms | from write p50 / max ms | its sync (reconcile + nft) p50 / max ms |\n\
         |---:|---|---|---|---|---|"
    );
    for c in &rep.control {
        let e = &c.endpoint_change;
        let ms3 = |m: &Option<Ms>| {
            m.as_ref()
                .map(|m| format!("{:.2} / {:.2} / {:.2} (n={})", m.p50, m.p99, m.max, m.n))
                .unwrap_or_else(|| "–".into())
        };
        let ms2 = |m: &Option<Ms>| {
            m.as_ref()
                .map(|m| format!("{:.2} / {:.2}", m.p50, m.p99))
                .unwrap_or_else(|| "–".into())
        };
        let add = c.service_add.as_ref();
        let addm = |m: Option<&Ms>| {
            m.map(|m| format!("{:.2} / {:.2} (n={})", m.p50, m.max, m.n))
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            o,
            "| {} | {}{} | {} | {} | {} | {} |",
            c.services,
            ms3(&e.from_event),
            if e.failures > 0 {
                format!(" ({} failed)", e.failures)
            } else {
                String::new()
            },
            ms2(&e.from_write),
            addm(add.and_then(|a| a.from_event.as_ref())),
            addm(add.and_then(|a| a.from_write.as_ref())),
            addm(add.and_then(|a| a.sync_ms.as_ref())),
        );
    }
}

/// "lost / sent" of a UDP phase (and other failures, if any).
fn loss(l: &Loss) -> String {
    let mut s = format!("{} / {}", l.lost, l.sent);
    if l.errors > 0 {
        let _ = write!(s, " ({} failed)", l.errors);
    }
    s
}

/// The UDP tables: one flow, fixed rate, many clients.
fn udp_tables(o: &mut String, live: &[&PathSummary], rate: &str) {
    type G = fn(&PathSummary) -> Option<&UdpSummary>;
    let rr: G = |p| p.udp_rr.as_ref();
    let with =
        |g: G| -> Vec<&PathSummary> { live.iter().copied().filter(|p| g(p).is_some()).collect() };
    let rows = with(rr);
    let timeout = crate::clients::UDP_TIMEOUT.as_millis();
    let msg = crate::clients::UDP_MSG;
    let direct = rows
        .iter()
        .find(|p| p.name == PathKind::Direct.name())
        .and_then(|p| rr(p)?.rate);
    let ipt = rows
        .iter()
        .find(|p| p.name == PathKind::Iptables.name())
        .and_then(|p| rr(p)?.rate);
    if !rows.is_empty() {
        let _ = writeln!(
            o,
            "\n#### UDP request/response through the ClusterIP ({msg} B datagrams, one flow, one in flight)\n\n\
             A request not answered within {timeout} ms counts as lost (not as a latency).\n\n\
             | path | req/s | × direct | × iptables | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | lost / sent |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &rows {
            let Some(u) = rr(p) else { continue };
            let g = |q: usize| u.lat.as_ref().map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(u.rate, &u.rates, 0),
                ratio(u.rate, direct),
                ratio(u.rate, ipt),
                ms(g(0), &u.p50s, 1),
                f(g(1), 1),
                f(g(2), 1),
                f(g(3), 1),
                f(g(4), 0),
                loss(&u.loss),
            );
        }
    }
    let fixed: G = |p| p.udp_fixed.as_ref();
    let rows = with(fixed);
    if !rows.is_empty() {
        let _ = writeln!(
            o,
            "\n#### UDP request/response at a fixed rate ({rate} req/s, one flow; coordinated-omission corrected)\n\n\
             | path | achieved req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | lost / sent |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &rows {
            let Some(u) = fixed(p) else { continue };
            let g = |q: usize| u.lat.as_ref().map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(u.rate, &u.rates, 0),
                ms(g(0), &u.p50s, 1),
                f(g(1), 1),
                f(g(2), 1),
                f(g(3), 1),
                f(g(4), 0),
                loss(&u.loss),
            );
        }
    }
    let many: G = |p| p.udp_many.as_ref();
    let rows = with(many);
    if !rows.is_empty() {
        let _ = writeln!(
            o,
            "\n#### UDP with {n} clients ({n} source ports taking turns, one request in flight in all)\n\n\
             Each client's first request creates its flow (a conntrack entry; in kube-uproxy also a flow-table \
             entry and an upstream socket): \"new flow\" columns. Then every request finds its flow.\n\n\
             | path | req/s | p50 µs | p99 µs | max µs | new flow p50 µs | new flow p99 µs | new flow max µs | lost / sent |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|",
            n = crate::clients::UDP_CLIENTS
        );
        for p in &rows {
            let Some(u) = many(p) else { continue };
            let g = |q: usize| u.lat.as_ref().map(|l| l.points()[q]);
            let nf = |q: usize| u.new_flow.as_ref().map(|l| l.points()[q]);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ms(u.rate, &u.rates, 0),
                ms(g(0), &u.p50s, 1),
                f(g(2), 1),
                f(g(4), 0),
                f(nf(0), 1),
                f(nf(2), 1),
                f(nf(4), 0),
                loss(&u.loss),
            );
        }
    }
}

const BEGIN: &str = "<!-- BEGIN datapath bench results (generated by `cargo bench --bench datapath`; edit outside these markers) -->";
const END: &str = "<!-- END datapath bench results -->";

/// Writes the generated block into docs/performance.md, keeping whatever is
/// outside the markers.
pub fn write_docs(
    path: &Path,
    rep: &Report,
    tables_md: &str,
    figures: &[(String, String)],
) -> std::io::Result<()> {
    let mut g = String::new();
    let _ = writeln!(g, "{BEGIN}\n");
    let _ = writeln!(g, "### Latest run: {}\n", rep.date);
    let _ = writeln!(
        g,
        "Command (as root, from the repository root):\n\n```\n{}\n```\n",
        rep.command
    );
    let _ = writeln!(
        g,
        "Machine: {} ({} cores, {:.1} GiB), {}, kernel {}. Mode: {}, took {:.0} s.\n",
        rep.machine.cpu,
        rep.machine.cores,
        rep.machine.memory_gib,
        rep.machine.os,
        rep.machine.kernel,
        rep.mode,
        rep.runtime_s
    );
    let _ = writeln!(g, "| component | version |\n|---|---|");
    for (k, v) in &rep.versions {
        let _ = writeln!(g, "| {k} | {v} |");
    }
    let _ = writeln!(g, "\n| setting | value |\n|---|---|");
    for (k, v) in &rep.settings {
        let _ = writeln!(g, "| {k} | {v} |");
    }
    let _ = writeln!(g, "\n{tables_md}");
    for (title, file) in figures {
        let _ = writeln!(g, "![{title}]({file})\n");
    }
    let _ = writeln!(g, "{END}");

    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], g, &old[e + END.len()..]),
        _ if old.trim().is_empty() => format!("# Performance\n\n{g}"),
        _ => format!("{}\n\n{g}", old.trim_end()),
    };
    std::fs::write(path, new)
}
