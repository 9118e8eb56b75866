//! Data-path benchmark of kube-uproxy against kube-proxy's iptables and
//! nftables modes, the pod IP itself, and peer user-space proxies.
//!
//! Run as root from the repository root:
//!
//! ```text
//! cargo bench --bench datapath                # full run; updates docs/performance.md and docs/*.png
//! cargo bench --bench datapath -- --short     # CI: a few seconds per path; fails on missing numbers or corruption
//! cargo bench --bench datapath -- --help
//! ```
//!
//! It builds a network-namespace lab (`uproxy_lab`: client ns → node ns
//! → 2 backend ns), starts echo / sink / whoami servers in the backends, and
//! for each data path in turn installs only that path in the node namespace,
//! measures from the client namespace, and tears it down again, in
//! interleaved rounds (A B C … A B C …, the order rotated every round).
//! The HTTP phases (issue 20's per-request balancing: `http.rs`) do the
//! same in a lab of their own with three backends running an h1/h2c
//! server.
//! See docs/performance.md for what each figure means.

#[path = "datapath/clients.rs"]
mod clients;
#[path = "datapath/control.rs"]
mod control;
#[path = "datapath/http.rs"]
mod http;
#[path = "datapath/http_clients.rs"]
mod http_clients;
#[path = "datapath/manifests.rs"]
mod manifests;
#[path = "datapath/measure.rs"]
mod measure;
#[path = "datapath/paths.rs"]
mod paths;
#[path = "datapath/plots.rs"]
mod plots;
#[path = "datapath/report.rs"]
mod report;
#[path = "datapath/servers.rs"]
mod servers;
#[path = "datapath/sys.rs"]
mod sys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use uproxy_lab::Lab;

use paths::{Ctx, PathKind};
use report::{Acc, Report};

const BIN: &str = env!("CARGO_BIN_EXE_kube-uproxy");
const TARGET_TMP: &str = env!("CARGO_TARGET_TMPDIR");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

const USAGE: &str = "\
cargo bench --bench datapath -- [OPTIONS]   (as root)

  --short            CI mode: 1 round, ~0.5 s per measurement, 1 000 idle
                     connections, control plane at 10 and 1 000 Services;
                     exits non-zero if a core path produced no numbers or
                     data arrived corrupted. Does not touch docs/ unless
                     --docs is given.
  --rounds N         interleaved rounds (full: 3)
  --secs S           seconds per measurement (full: 3)
  --paths a,b,...    subset of: direct iptables nftables splice copy nginx
                     haproxy haproxy-splice (the default set), and
                     transparent (kube-uproxy splice with
                     preserve-client-ip on: upstream connections from the
                     client's own address; TCP phases only; not in the
                     default set); for the HTTP phases: direct,
                     splice or copy (kube-uproxy request mode and L4),
                     baseline (--baseline-bin's request mode), haproxy
                     (mode http), nginx (http), nghttpx (with either
                     peer, when installed)
  --idle-conns N     idle connections for the memory figure (full: 10000)
  --scales a,b,...   Service counts for the control plane (full: 10,1000,10000;
                     mixed types: ClusterIP, TCP+UDP, NodePort, externalIPs,
                     LoadBalancer with source ranges)
  --phases a,b,...   data-path phases to run (default all): rr (persistent
                     request/response), rate (fixed rate), connect
                     (connection per request, the client closing with RST:
                     latency and rate), connect-fin (the same closing with
                     FIN: TIME_WAIT and port reuse on the way), medium
                     (16 KiB-1 MiB responses on keep-alive connections,
                     then the proxy's fds per idle connection), bulk
                     (hashed and timed transfers), udp (64 B datagrams
                     through the ClusterIP: one flow, fixed rate, 1 000
                     client ports; direct, iptables, nftables and
                     kube-uproxy only); the HTTP phases (in a lab of
                     their own with three backends; `http` selects all
                     four): http1 (HTTP/1.1 keep-alive, several
                     connections: req/s, p50/p99, proxy CPU per request,
                     then memory per idle HTTP connection), h2c (one
                     connection, 100 concurrent streams; h2load when
                     installed), fairness (requests per endpoint from one
                     client connection, h1 and h2c), slow (one endpoint of
                     three 50 ms slower: p99 per balancing algorithm);
                     for profiling one phase
  --baseline-bin PATH
                     also measure another kube-uproxy binary (e.g. a build of
                     an earlier commit) as the path \"kube-uproxy baseline\"
                     (splice relay), interleaved with the others: before and
                     after in one run
  --no-h2load        the h2c phase with hyper's h2 client even when h2load
                     is installed
  --no-control       skip the control-plane measurements
  --no-memory        skip the idle-connection memory measurements
  --json PATH        also write the results as JSON
  --docs             write docs/performance.md and docs/datapath-*.png
                     (default in full mode)
  --no-docs          do not write docs/ (figures go to target/tmp/datapath-figures)
  --congestion-control NAME
                     TCP congestion control in the lab namespaces (default:
                     inherited from the machine, see the report)
  --keep             keep the work directory (logs, configs, manifests)
  --no-pin           do not pin the client threads to CPU 0 and the backend
                     servers to CPU 1
  --pin-proxies CPUS also pin every proxy process (kube-uproxy, nginx,
                     haproxy) to this CPU list (taskset -c CPUS, e.g. 1 or
                     0-1), as the clients and servers are pinned; default:
                     the scheduler places the proxies
";

struct Opts {
    short: bool,
    rounds: usize,
    secs: f64,
    paths: Vec<PathKind>,
    phases: measure::Phases,
    idle_conns: usize,
    scales: Vec<usize>,
    control: bool,
    memory: bool,
    json: Option<PathBuf>,
    docs: bool,
    pin: bool,
    keep: bool,
    cc: Option<String>,
    baseline_bin: Option<PathBuf>,
    pin_proxies: Option<String>,
    no_h2load: bool,
    args: Vec<String>,
}

fn parse_args() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let short = args.iter().any(|a| a == "--short");
    let mut o = Opts {
        short,
        rounds: if short { 1 } else { 3 },
        secs: if short { 0.5 } else { 3.0 },
        paths: paths::ALL.to_vec(),
        phases: measure::Phases::all(),
        idle_conns: if short { 1000 } else { 10_000 },
        scales: if short {
            vec![10, 1000]
        } else {
            vec![10, 1000, 10_000]
        },
        control: true,
        memory: true,
        json: None,
        docs: !short,
        pin: true,
        keep: false,
        cc: None,
        baseline_bin: None,
        pin_proxies: None,
        no_h2load: false,
        args: args.clone(),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--short" => {}
            "--rounds" => {
                o.rounds = val("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--secs" => o.secs = val("--secs")?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--idle-conns" => {
                o.idle_conns = val("--idle-conns")?
                    .parse()
                    .map_err(|e| format!("--idle-conns: {e}"))?
            }
            "--paths" => {
                o.paths = val("--paths")?
                    .split(',')
                    .map(|p| PathKind::parse(p).ok_or(format!("unknown path {p:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--phases" => o.phases = measure::Phases::parse(&val("--phases")?)?,
            "--scales" => {
                o.scales = val("--scales")?
                    .split(',')
                    .map(|p| p.parse().map_err(|e| format!("--scales {p:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--no-control" => o.control = false,
            "--no-h2load" => o.no_h2load = true,
            "--no-memory" => o.memory = false,
            "--json" => o.json = Some(PathBuf::from(val("--json")?)),
            "--docs" => o.docs = true,
            "--no-docs" => o.docs = false,
            "--no-pin" => o.pin = false,
            "--keep" => o.keep = true,
            "--congestion-control" => o.cc = Some(val("--congestion-control")?),
            "--baseline-bin" => o.baseline_bin = Some(PathBuf::from(val("--baseline-bin")?)),
            "--pin-proxies" => {
                let cpus = val("--pin-proxies")?;
                if cpus.is_empty()
                    || !cpus
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
                {
                    return Err(format!(
                        "--pin-proxies {cpus:?}: want a CPU list such as 1 or 0-1"
                    ));
                }
                o.pin_proxies = Some(cpus);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.rounds == 0 || o.secs <= 0.0 || o.rounds > 50 || o.secs > 60.0 {
        return Err("--rounds must be 1..=50 and --secs in (0, 60]".into());
    }
    o.idle_conns = o.idle_conns.clamp(1, 50_000);
    match &o.baseline_bin {
        Some(bin) if !bin.is_file() => {
            return Err(format!("--baseline-bin {}: no such file", bin.display()));
        }
        Some(_) if !o.paths.contains(&PathKind::UproxyBaseline) => {
            o.paths.push(PathKind::UproxyBaseline)
        }
        None if o.paths.contains(&PathKind::UproxyBaseline) => {
            return Err("the baseline path needs --baseline-bin PATH".into());
        }
        _ => {}
    }
    Ok(o)
}

fn sysctls(lab: &Lab, cc: Option<&str>) {
    if let Some(cc) = cc {
        for ns in [lab.client(), lab.node()]
            .into_iter()
            .chain(lab.backends().iter())
        {
            let _ = ns.output(
                "sysctl",
                ["-q", "-w", &format!("net.ipv4.tcp_congestion_control={cc}")],
            );
        }
    }
    let common = [
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
        "net.core.somaxconn=65535",
        "net.ipv4.tcp_max_syn_backlog=65535",
    ];
    let node_only = [
        // Failed attempts to a not-yet-programmed ClusterIP get their ICMP
        // error at once (control-plane timing), not after rate limiting.
        "net.ipv4.icmp_ratelimit=0",
        "net.ipv4.icmp_msgs_per_sec=1000000",
        // A UDP flow's conntrack entry must not outlive its path: the next
        // path's clients take source ports from the same range (1 000 at a
        // time), and an entry the last path's NAT left would send their
        // datagrams where that path's proxy listened (refused) or straight
        // to a backend. Every UDP phase's flows send far more often.
        "net.netfilter.nf_conntrack_udp_timeout=2",
        "net.netfilter.nf_conntrack_udp_timeout_stream=2",
    ];
    for ns in [lab.client(), lab.node()]
        .into_iter()
        .chain(lab.backends().iter())
    {
        for s in common {
            let _ = ns.output("sysctl", ["-q", "-w", s]);
        }
    }
    // The node's own outgoing connections (proxy → backend) must not take
    // the proxies' listening ports (20000-45999) as their local ports.
    for s in node_only
        .iter()
        .chain(["net.ipv4.ip_local_port_range=46000 65535"].iter())
    {
        let _ = lab.node().output("sysctl", ["-q", "-w", s]);
    }
}

/// The HTTP phases: their lab (client → node → three backends with the
/// HTTP servers), their paths in interleaved rounds, then the lab's
/// removal.
fn run_http(
    opts: &Opts,
    rt: &tokio::runtime::Runtime,
    workdir: &Path,
) -> Result<http::HttpReport, String> {
    let lab = Lab::new("bench-http", http::HTTP_BACKENDS)
        .map_err(|e| format!("building the HTTP lab: {e}"))?;
    sysctls(&lab, opts.cc.as_deref());
    let _servers =
        servers::start_http(&lab, rt).map_err(|e| format!("HTTP backend servers: {e}"))?;
    let plan = http::Plan {
        rounds: opts.rounds,
        secs: opts.secs,
        phases: opts.phases.http,
        idle_conns: opts.memory.then_some(opts.idle_conns.min(HTTP_IDLE_MAX)),
        paths: http::ALL
            .into_iter()
            .filter(|p| p.selected_by(&opts.paths))
            .collect(),
        workdir: workdir.to_path_buf(),
        bin: PathBuf::from(BIN),
        baseline_bin: opts.baseline_bin.clone(),
        proxy_cpus: opts.pin_proxies.clone(),
        h2load: !opts.no_h2load && sys::have("h2load"),
    };
    Ok(http::run(&lab, &plan))
}

/// The most idle HTTP connections for the memory figure: each holds a
/// client socket here and, through the L4 path, a backend connection.
const HTTP_IDLE_MAX: usize = 5000;

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

fn date_utc() -> String {
    sys::tool_version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default()
}

fn versions() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut put = |k: &str, val: Option<String>| {
        v.insert(k.to_string(), val.unwrap_or_else(|| "not installed".into()));
    };
    put("kube-uproxy", sys::tool_version(BIN, &["--version"]));
    put(
        "git commit",
        sys::tool_version(
            "git",
            &["-C", MANIFEST_DIR, "describe", "--always", "--dirty"],
        ),
    );
    put("rustc", sys::tool_version("rustc", &["--version"]));
    put("nft", sys::tool_version("nft", &["--version"]));
    put("iptables", sys::tool_version("iptables", &["--version"]));
    put("nginx", sys::tool_version("nginx", &["-v"]));
    put("haproxy", sys::tool_version("haproxy", &["-v"]));
    v
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprint!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("datapath bench: must run as root (network namespaces, nftables)");
        return ExitCode::FAILURE;
    }
    for tool in ["ip", "nft", "sysctl"] {
        if !sys::have(tool) {
            eprintln!("datapath bench: `{tool}` not found");
            return ExitCode::FAILURE;
        }
    }
    match run(&opts) {
        Ok(ok) if ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("datapath bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Opts) -> Result<bool, String> {
    let started = Instant::now();
    let load_start = loadavg();
    let nofile = sys::raise_nofile();
    eprintln!("datapath bench: open-file limit {nofile}");
    let workdir = Path::new(TARGET_TMP).join(format!("datapath-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;

    sys::set_pinning(opts.pin);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| sys::pin_current_thread(sys::BACKEND_CPU))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let lab = Lab::new("bench", 2).map_err(|e| format!("building the lab: {e}"))?;
    sysctls(&lab, opts.cc.as_deref());
    let backends = servers::start(&lab, &rt).map_err(|e| format!("backend servers: {e}"))?;
    let ctx = Ctx {
        lab: &lab,
        bin: PathBuf::from(BIN),
        baseline_bin: opts.baseline_bin.clone(),
        workdir: workdir.clone(),
        proxy_cpus: opts.pin_proxies.clone(),
    };
    if opts.pin_proxies.is_some() && !sys::have("taskset") {
        return Err("--pin-proxies needs `taskset` (util-linux)".into());
    }

    let mut accs: BTreeMap<PathKind, Acc> = opts.paths.iter().map(|k| (*k, Acc::new(*k))).collect();
    let mut runnable: Vec<PathKind> = Vec::new();
    for k in &opts.paths {
        match k.unavailable() {
            Some(why) if !k.core() => {
                eprintln!("  {}: skipped ({why})", k.name());
                if let Some(a) = accs.get_mut(k) {
                    a.skip(why);
                }
            }
            Some(why) => {
                eprintln!("  {}: cannot run: {why}", k.name());
                if let Some(a) = accs.get_mut(k) {
                    a.error(why);
                }
            }
            None => runnable.push(*k),
        }
    }

    let plan = measure::Plan {
        secs: opts.secs,
        rate: 2000.0,
        conn_threads: 4,
        hashed_bytes: if opts.short { 32 << 20 } else { 256 << 20 },
        phases: opts.phases,
    };

    // Interleaved rounds (none when only HTTP phases were asked for).
    let l4_rounds = if opts.phases.any_l4() { opts.rounds } else { 0 };
    for round in 0..l4_rounds {
        let mut order = runnable.clone();
        if !order.is_empty() {
            let shift = round % order.len();
            order.rotate_left(shift);
        }
        for k in order {
            let t = Instant::now();
            eprint!("round {}/{} {:<20} ", round + 1, opts.rounds, k.name());
            let acc = accs.get_mut(&k).expect("acc");
            match paths::install(&ctx, k) {
                Ok(mut a) => {
                    let mut r = measure::round(&lab, &mut a, &plan);
                    let note = match paths::transparent_audit(&ctx, &a) {
                        Ok(note) => note.map(|n| format!("\n    {n}")).unwrap_or_default(),
                        Err(e) => {
                            r.errors.push(e);
                            String::new()
                        }
                    };
                    eprintln!(
                        "udp {:>7} req/s  rr {:>7} req/s  p50 {:>6} µs  conn {:>6}/s  fin {:>6}/s  medium {:>6}/s {:>4} fds  1-way {:>6} Gbit/s  2-way {:>6} Gbit/s  ({:.1} s){note}{}",
                        r.udp_rr.rate.map_or("-".into(), |v| format!("{v:.0}")),
                        r.ping_rate.map_or("-".into(), |v| format!("{v:.0}")),
                        r.ping.as_ref().map_or("-".into(), |h| format!(
                            "{:.1}",
                            h.value_at_quantile(0.5) as f64 / 1e3
                        )),
                        r.conn_rate.map_or("-".into(), |v| format!("{v:.0}")),
                        r.conn_fin_rate.map_or("-".into(), |v| format!("{v:.0}")),
                        r.medium_rate.map_or("-".into(), |v| format!("{v:.0}")),
                        r.medium_idle_fds.map_or("-".into(), |v| format!("{v:.1}")),
                        r.one_way_gbps.map_or("-".into(), |v| format!("{v:.2}")),
                        r.both_ways_gbps.map_or("-".into(), |v| format!("{v:.2}")),
                        t.elapsed().as_secs_f64(),
                        if r.errors.is_empty() && r.corrupted.is_empty() {
                            String::new()
                        } else {
                            format!("\n    problems: {:?} {:?}", r.errors, r.corrupted)
                        }
                    );
                    acc.add(r);
                    paths::remove(&ctx, a);
                }
                Err(e) => {
                    eprintln!("install failed: {e}");
                    acc.error(format!("install: {e}"));
                    ctx.flush_rules();
                }
            }
        }
    }

    // Memory with idle connections (proxies only).
    if opts.memory && opts.phases.any_l4() {
        // HAProxy with splice-auto holds idle connections as HAProxy tcp
        // does (pipes only while splicing); once is enough.
        for k in runnable
            .iter()
            .filter(|k| k.has_process() && **k != PathKind::HaproxySplice)
        {
            eprint!("memory {:<20} ", k.name());
            let acc = accs.get_mut(k).expect("acc");
            match paths::install(&ctx, *k) {
                Ok(mut a) => {
                    match measure::idle_memory(&lab, &mut a, &backends, opts.idle_conns) {
                        Ok(m) => {
                            eprintln!(
                                "idle {} KiB, {} conns {} KiB → {:.2} KiB/conn",
                                m.idle_rss_kib,
                                m.connections,
                                m.loaded_rss_kib,
                                m.per_connection_bytes / 1024.0
                            );
                            acc.memory = Some(m);
                        }
                        Err(e) => {
                            eprintln!("failed: {e}");
                            acc.memory_error = Some(e);
                        }
                    }
                    paths::remove(&ctx, a);
                }
                Err(e) => {
                    eprintln!("install failed: {e}");
                    acc.memory_error = Some(format!("install: {e}"));
                }
            }
            // Let the closed connections drain before the next path.
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // The HTTP phases, in a lab of their own (three backends).
    let http = if opts.phases.http.any() {
        Some(run_http(opts, &rt, &workdir)?)
    } else {
        None
    };

    // Control plane.
    let control = if opts.control {
        eprintln!("control plane at {:?} Services", opts.scales);
        control::run(
            &ctx,
            &control::Plan {
                scales: opts.scales.clone(),
                ep_trials: if opts.short { 5 } else { 40 },
                add_trials: if opts.short { 3 } else { 15 },
                baseline: opts.baseline_bin.clone(),
            },
        )
    } else {
        control::Runs::default()
    };

    drop(backends);
    drop(lab);

    let mut settings = BTreeMap::new();
    settings.insert("rounds".into(), opts.rounds.to_string());
    settings.insert(
        "load average (1 min) at start / end".into(),
        format!("{load_start} / {}", loadavg()),
    );
    settings.insert("open-file limit (RLIMIT_NOFILE)".into(), nofile.to_string());
    settings.insert(
        "TCP congestion control".into(),
        opts.cc.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                .map(|s| format!("{} (machine default)", s.trim()))
                .unwrap_or_default()
        }),
    );
    settings.insert("seconds per measurement".into(), opts.secs.to_string());
    settings.insert("fixed_rate".into(), format!("{}", plan.rate));
    settings.insert("conn_threads".into(), plan.conn_threads.to_string());
    settings.insert(
        "hashed transfer per path and round".into(),
        format!("{} MiB each way", plan.hashed_bytes >> 20),
    );
    settings.insert("idle connections".into(), opts.idle_conns.to_string());
    settings.insert(
        "manifests_watch".into(),
        "inotify on the directory (the binary's default), files replaced by rename".into(),
    );
    settings.insert("backends".into(), "2 (round-robin / random)".into());
    settings.insert("message size".into(), format!("{} B", clients::MSG));
    settings.insert(
        "UDP".into(),
        format!(
            "{} B datagrams, {} ms timeout per request (then counted lost), {} client ports in the many-clients phase",
            clients::UDP_MSG,
            clients::UDP_TIMEOUT.as_millis(),
            clients::UDP_CLIENTS
        ),
    );
    settings.insert(
        "medium connections".into(),
        measure::MEDIUM_CONNS.to_string(),
    );
    settings.insert(
        "CPU pinning".into(),
        match (opts.pin, &opts.pin_proxies) {
            (true, None) => format!(
                "client threads on CPU {}, backend servers on CPU {}, proxies and softirqs unpinned",
                sys::CLIENT_CPU,
                sys::BACKEND_CPU
            ),
            (true, Some(cpus)) => format!(
                "client threads on CPU {}, backend servers on CPU {}, proxies on CPU {cpus} (taskset), softirqs unpinned",
                sys::CLIENT_CPU,
                sys::BACKEND_CPU
            ),
            (false, None) => "none".into(),
            (false, Some(cpus)) => format!("proxies on CPU {cpus} (taskset), nothing else"),
        },
    );

    let command = {
        let mut c = String::from("cargo bench --bench datapath");
        if !opts.args.is_empty() {
            c.push_str(" -- ");
            c.push_str(&opts.args.join(" "));
        }
        c
    };
    let mut rep = Report {
        date: date_utc(),
        command,
        mode: if opts.short {
            "short".into()
        } else {
            "full".into()
        },
        machine: sys::machine(),
        versions: versions(),
        settings,
        paths: accs.values().map(Acc::summary).collect(),
        control: control.current,
        control_baseline: control.baseline,
        targets: vec![],
        http,
        runtime_s: 0.0,
    };
    rep.targets = report::targets(&rep);

    // Verdict (short mode's purpose, and every mode's duty).
    let mut failures = Vec::new();
    for p in &rep.paths {
        if !p.corrupted.is_empty() {
            failures.push(format!("{}: data corrupted: {:?}", p.name, p.corrupted));
        }
        if p.core {
            let missing = p.missing(&opts.phases);
            if !missing.is_empty() {
                failures.push(format!("{}: no numbers for {}", p.name, missing.join(", ")));
            }
            if opts.memory
                && opts.phases.any_l4()
                && (p.name == PathKind::UproxySplice.name()
                    || p.name == PathKind::UproxyCopy.name())
                && p.memory.is_none()
                && opts.paths.iter().any(|k| k.name() == p.name)
            {
                failures.push(format!(
                    "{}: no memory figure ({})",
                    p.name,
                    p.memory_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    if let Some(h) = &rep.http {
        failures.extend(h.failures(&opts.phases.http, opts.memory));
    }
    for c in &rep.control {
        if c.cold_start_s.is_none() || c.endpoint_change.from_write.is_none() {
            failures.push(format!(
                "control plane at {} Services: no numbers ({})",
                c.services,
                c.error.as_deref().unwrap_or("see log")
            ));
        }
    }
    rep.runtime_s = started.elapsed().as_secs_f64();

    let md = report::tables(&rep);
    println!("\n{md}");

    // Figures.
    let fig_dir = if opts.docs {
        Path::new(MANIFEST_DIR).join("docs")
    } else {
        Path::new(TARGET_TMP).join("datapath-figures")
    };
    let mut figures = Vec::new();
    if plots::init_font() {
        let _ = std::fs::create_dir_all(&fig_dir);
        for (title, file, f) in [
            (
                "Latency percentiles per data path",
                "datapath-latency.png",
                plots::latency as fn(&Report, &Path) -> Result<(), Box<dyn std::error::Error>>,
            ),
            (
                "Throughput per data path",
                "datapath-throughput.png",
                plots::throughput,
            ),
        ] {
            let p = fig_dir.join(file);
            match f(&rep, &p) {
                Ok(()) => {
                    eprintln!("figure: {}", p.display());
                    figures.push((title.to_string(), file.to_string()));
                }
                Err(e) => eprintln!("figure {file} failed: {e}"),
            }
        }
    } else {
        eprintln!("no TrueType font found (apt-get install fonts-dejavu-core); figures skipped");
    }
    if let Some(j) = &opts.json {
        let text = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
        std::fs::write(j, text).map_err(|e| format!("{}: {e}", j.display()))?;
        eprintln!("json: {}", j.display());
    }
    if opts.docs {
        let doc = Path::new(MANIFEST_DIR).join("docs/performance.md");
        report::write_docs(&doc, &rep, &md, &figures)
            .map_err(|e| format!("{}: {e}", doc.display()))?;
        eprintln!("docs: {}", doc.display());
    }
    if failures.is_empty() {
        if opts.keep {
            eprintln!("work directory kept: {}", workdir.display());
        } else {
            let _ = std::fs::remove_dir_all(&workdir);
        }
        eprintln!(
            "datapath bench: every path produced numbers, all transfers intact ({:.0} s)",
            rep.runtime_s
        );
        Ok(true)
    } else {
        for f in &failures {
            eprintln!("FAIL {f}");
        }
        eprintln!("(logs kept in {})", workdir.display());
        Ok(false)
    }
}
