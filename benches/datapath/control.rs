//! Control-plane measurements of kube-uproxy (manifests source), with N
//! Services of mixed types (see [`scale_service`]: ClusterIP TCP, ClusterIP
//! TCP+UDP, NodePort, externalIPs, LoadBalancer with source ranges; two
//! endpoints each):
//! - cold start: process start → the "rules synced" log line of the first
//!   sync with every Service port, checked against the nft map's size;
//! - the table's rules and elements (`nft -j list table`): the rules stay
//!   the same at every scale, the elements grow with the Services;
//! - RSS with that many Services;
//! - an EndpointSlice change → the first new connection that reaches the new
//!   endpoint, from the file write and from the proxy's "manifests changed"
//!   log line (its watch event);
//! - one Service added → the first connection through it, same two clocks,
//!   and the duration of the sync that applied it (its log line).
//!
//! The proxy watches the manifests directory (inotify, its default); files
//! are replaced by rename, as `kubectl get -o yaml > tmp && mv tmp f` would.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uproxy_lab::backend_addr;
use uproxy_lab::manifests::{ServiceManifest, ServiceType, list_yaml};

use crate::clients;
use crate::manifests::{self, Port, Svc};
use crate::paths::{Active, Ctx, PathKind};
use crate::servers::{UDP_ECHO_PORT, WHO_PORT, backend_name};
use crate::sys;

const WHO: [Port; 1] = [Port::tcp("who", 80, WHO_PORT)];
/// A DNS-like Service: the same port over UDP and TCP.
const DNS: [Port; 2] = [
    Port::udp("dns", 53, UDP_ECHO_PORT),
    Port::tcp("dns-tcp", 53, WHO_PORT),
];
/// A LoadBalancer's ports.
const LB: [Port; 2] = [
    Port::tcp("who", 80, WHO_PORT),
    Port::udp("dns", 53, UDP_ECHO_PORT),
];
/// The source ranges of the LoadBalancer Services.
const LB_SOURCE_RANGES: [&str; 2] = ["10.200.0.0/16", "192.0.2.0/24"];
/// The Service whose EndpointSlice is rewritten.
const EP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Ranges of the scale Services and of the added ones; refused by the node
/// (TCP reset) until redirected, so a failed attempt costs microseconds,
/// not a timeout.
const SCALE_NET: &str = "10.100.0.0/14";
const ADDED_NET: &str = "10.110.0.0/16";

fn scale_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        100 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// The `j`-th address of a /16-sized range starting at `base`.
fn range_ip(base: [u8; 2], j: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        base[0],
        base[1],
        ((j / 250) % 250) as u8,
        (j % 250 + 1) as u8,
    )
}

/// The `i`-th Service of the scale set, and how many Service ports it
/// has. Five kinds in turn:
/// 0. ClusterIP, 80/TCP;
/// 1. ClusterIP, 53/UDP and 53/TCP (DNS-like);
/// 2. NodePort, 80/TCP with a node port (30000 + i/5, within the default
///    node-port range up to 13 840 Services);
/// 3. ClusterIP with one externalIP (198.18.0.0/15), 80/TCP;
/// 4. LoadBalancer with an ingress IP (198.20.0.0/16) and two
///    `loadBalancerSourceRanges`, 80/TCP and 53/UDP (no node ports:
///    `allocateLoadBalancerNodePorts: false` in spirit; the node-port keys
///    are covered by kind 2).
pub fn scale_service(i: usize, endpoints: &[Ipv4Addr]) -> (ServiceManifest, usize) {
    let j = i / 5;
    let base = ServiceManifest::new(format!("scale-{i}"), scale_ip(i));
    let with =
        |m: ServiceManifest, ports: &[Port]| ports.iter().fold(m, |m, p| m.with_port(p.manifest()));
    let (m, n) = match i % 5 {
        0 => (with(base, &WHO), 1),
        1 => (with(base, &DNS), 2),
        2 => (
            base.with_type(ServiceType::NodePort)
                .with_port(WHO[0].manifest().with_node_port(30000 + (j % 2768) as u16)),
            1,
        ),
        3 => (
            with(base, &WHO).with_external_ips([range_ip([198, 18 + (j / 62_500) as u8], j)]),
            1,
        ),
        _ => (
            with(base.with_type(ServiceType::LoadBalancer), &LB)
                .with_lb_ingress(range_ip([198, 20], j), None)
                .with_source_ranges(LB_SOURCE_RANGES),
            2,
        ),
    };
    (m.with_endpoints(manifests::ready(endpoints)), n)
}

fn added_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 110, (k / 250) as u8, (k % 250 + 1) as u8)
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub scales: Vec<usize>,
    pub ep_trials: usize,
    pub add_trials: usize,
    /// `--baseline-bin`: measured too, right after this build at each
    /// scale (before and after in one run).
    pub baseline: Option<PathBuf>,
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Ms {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Ms {
    pub fn of(mut v: Vec<f64>) -> Option<Ms> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Ms {
            n: v.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: v[v.len() - 1],
        })
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Change {
    /// The sync that applied the change: reconcile + nft transaction, from
    /// its "rules synced" log line (a change that needs no rule update,
    /// such as endpoints replaced by others, logs none).
    pub sync_ms: Option<Ms>,
    /// File replaced → first connection using the change.
    pub from_write: Option<Ms>,
    /// "manifests changed" log line (the watch event) → first connection.
    pub from_event: Option<Ms>,
    pub failures: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Scale {
    pub services: usize,
    /// Service ports of those Services (kinds with two ports count two).
    pub service_ports: usize,
    /// Process start → "rules synced" with every Service port, seconds.
    pub cold_start_s: Option<f64>,
    /// The sync's own duration (`took_ms` of the log line).
    pub sync_took_ms: Option<f64>,
    /// Elements of the `service-ports` map.
    pub nft_elements: usize,
    /// Rules in the table (every chain), as `nft -j list table` shows.
    pub nft_rules: usize,
    /// Elements of each set and map of the table.
    pub nft_sets: BTreeMap<String, usize>,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub endpoint_change: Change,
    pub service_add: Option<Change>,
    pub error: Option<String>,
}

fn write_by_rename(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(name))
}

fn log_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn read_from(p: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(p)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(&format!("{key}="))?;
    line[i + key.len() + 1..].split_whitespace().next()
}

/// The wall-clock time of the first "manifests changed" line after `offset`.
fn event_time(log: &Path, offset: u64) -> Option<f64> {
    read_from(log, offset)
        .lines()
        .find(|l| l.contains("manifests changed"))
        .and_then(sys::parse_log_time)
}

/// reconcile + nft time of every "rules synced" line after `offset`.
fn sync_times(log: &Path, offset: u64) -> Vec<f64> {
    read_from(log, offset)
        .lines()
        .filter(|l| l.contains("rules synced"))
        .filter_map(|line| {
            let num = |k| field(line, k).and_then(|v| v.parse::<f64>().ok());
            match (num("reconcile_ms"), num("nft_ms")) {
                (None, None) => num("took_ms"),
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            }
        })
        .collect()
}

/// Rules of the table, and the elements of each of its sets and maps.
fn table_counts(ctx: &Ctx<'_>) -> Result<(usize, BTreeMap<String, usize>), String> {
    let out = ctx
        .lab
        .node()
        .output("nft", ["-j", "list", "table", "ip", "kube-uproxy"])
        .map_err(|e| e.to_string())?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j list table: {e}"))?;
    let objects = json
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or("nft -j list table: no nftables array")?;
    let mut rules = 0;
    let mut sets = BTreeMap::new();
    for o in objects {
        if o.get("rule").is_some() {
            rules += 1;
        }
        if let Some(set) = o.get("set").or_else(|| o.get("map")) {
            let name = set.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            let n = set
                .get("elem")
                .and_then(|e| e.as_array())
                .map_or(0, Vec::len);
            sets.insert(name.to_string(), n);
        }
    }
    Ok((rules, sets))
}

/// Tries connections to `addr` until the greeting is `want` (or any
/// greeting when `want` is None); returns the wall-clock time of success.
fn first_connection(
    ctx: &Ctx<'_>,
    addr: SocketAddr,
    want: Option<String>,
    limit: Duration,
) -> Option<f64> {
    ctx.lab
        .client()
        .run(move || {
            sys::pin_current_thread(sys::CLIENT_CPU);
            let end = Instant::now() + limit;
            let mut attempts = 0u32;
            while Instant::now() < end && attempts < 200_000 {
                attempts += 1;
                if let Ok(g) = clients::who(addr, Duration::from_millis(50))
                    && want.as_ref().is_none_or(|w| *w == g)
                {
                    return Some(sys::now_epoch());
                }
                // Leave the proxy some CPU to apply the change (2 cores).
                std::thread::sleep(Duration::from_micros(200));
            }
            None
        })
        .ok()
        .flatten()
}

fn ep_yaml(k: usize) -> String {
    let eps = [backend_addr(k % 2)];
    let mut s = manifests::list(&[Svc {
        name: "ep-test".into(),
        ip: EP_VIP,
        ports: &WHO,
        endpoints: &eps,
        generation: k as u64,
    }]);
    // Consecutive versions differ in length too, whatever the mtime
    // granularity of the file system.
    s.push_str(&format!("# version {k} {}\n", "x".repeat(k % 5)));
    s
}

/// What [`run`] measured: this build at every scale, and the baseline
/// binary (if any) at the same scales, interleaved with it.
#[derive(Default)]
pub struct Runs {
    pub current: Vec<Scale>,
    pub baseline: Vec<Scale>,
}

/// Runs the control-plane measurements at every scale of `plan`: this
/// build, then the baseline, at one scale before the next.
pub fn run(ctx: &Ctx<'_>, plan: &Plan) -> Runs {
    let mut out = Runs::default();
    for &n in &plan.scales {
        let bins =
            std::iter::once((&ctx.bin, false)).chain(plan.baseline.as_ref().map(|b| (b, true)));
        for (bin, is_baseline) in bins {
            let mut s = Scale {
                services: n,
                ..Scale::default()
            };
            if let Err(e) = one_scale(ctx, bin, plan, n, &mut s) {
                let which = if is_baseline { " (baseline)" } else { "" };
                eprintln!("control plane at {n} Services{which}: {e}");
                s.error = Some(e);
            }
            if is_baseline {
                out.baseline.push(s);
            } else {
                out.current.push(s);
            }
            ctx.flush_rules();
        }
    }
    out
}

/// Connections to a ClusterIP of the scale ranges that kube-uproxy has not
/// redirected (yet) are refused at once by the node (a forwarded packet;
/// redirected ones go to INPUT and never see this chain).
fn install_refuse(ctx: &Ctx<'_>) -> Result<(), String> {
    let rules = format!(
        "table ip bench-unprogrammed {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip daddr {{ {SCALE_NET}, {ADDED_NET} }} meta l4proto tcp reject with tcp reset
  }}
}}
"
    );
    let path = ctx.workdir.join("unprogrammed.nft");
    fs::write(&path, rules).map_err(|e| e.to_string())?;
    ctx.lab
        .node()
        .output("nft", [OsStr::new("-f"), path.as_os_str()])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn one_scale(
    ctx: &Ctx<'_>,
    bin: &Path,
    plan: &Plan,
    n: usize,
    s: &mut Scale,
) -> Result<(), String> {
    ctx.flush_rules();
    install_refuse(ctx)?;
    let dir: PathBuf = ctx.workdir.join(format!("control-{n}"));
    let _ = fs::remove_dir_all(&dir);
    let mdir = dir.join("manifests");
    fs::create_dir_all(&mdir).map_err(|e| e.to_string())?;
    // The big file: n Services of mixed types, two endpoints each.
    let eps = [backend_addr(0), backend_addr(1)];
    let mut scale_ports = 0;
    let svcs: Vec<ServiceManifest> = (0..n)
        .map(|i| {
            let (m, ports) = scale_service(i, &eps);
            scale_ports += ports;
            m
        })
        .collect();
    if n > 0 {
        fs::write(mdir.join("scale.yaml"), list_yaml(&svcs)).map_err(|e| e.to_string())?;
    }
    drop(svcs);
    let ep0 = [backend_addr(0)];
    let mut version = 0usize;
    write_by_rename(&mdir, "ep.yaml", &ep_yaml(version)).map_err(|e| e.to_string())?;
    let total_ports = scale_ports + 1;
    s.service_ports = total_ports;

    let log = dir.join("kube-uproxy.log");
    let f = fs::File::create(&log).map_err(|e| e.to_string())?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = ctx.lab.node().command(bin);
    cmd.arg("--manifests")
        .arg(&mdir)
        .args(["--proxy-port-range", "20000-45000"])
        .stdin(std::process::Stdio::null())
        .stdout(f2)
        .stderr(f);
    let started = Instant::now();
    let child = ctx.lab.node().spawn(cmd).map_err(|e| e.to_string())?;
    let mut a = Active {
        kind: PathKind::UproxySplice,
        targets: crate::paths::Active::dummy_targets(),
        child: Some(child),
        log: Some(log.clone()),
    };

    // Cold start: wait for the sync that holds every port.
    let limit = Duration::from_secs(180);
    loop {
        a.check_alive()?;
        let text = read_from(&log, 0);
        if let Some(line) = text.lines().find(|l| {
            l.contains("rules synced")
                && field(l, "service_ports")
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|v| v >= total_ports)
        }) {
            s.cold_start_s = Some(started.elapsed().as_secs_f64());
            let num = |k| field(line, k).and_then(|v| v.parse::<f64>().ok());
            s.sync_took_ms = num("took_ms").or_else(|| {
                // newer log format: the reconcile and the nft transaction
                match (num("reconcile_ms"), num("nft_ms")) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
                }
            });
            break;
        }
        if started.elapsed() > limit {
            return Err(format!(
                "no complete rule sync in {limit:?}; log:\n{}",
                a.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    s.nft_elements = ctx
        .lab
        .node()
        .nft_keys("map", "ip", "kube-uproxy", "service-ports")
        .map(|k| k.len())
        .unwrap_or(0);
    let (rules, sets) = table_counts(ctx)?;
    s.nft_rules = rules;
    s.nft_sets = sets;
    std::thread::sleep(Duration::from_secs(1));
    if let Some(pid) = a.pid() {
        s.rss_kib = sys::tree_rss_kib(pid);
        s.anon_kib = sys::tree_anon_kib(pid);
    }

    // The first endpoint must answer before changes are timed.
    let ep_addr = SocketAddr::from((EP_VIP, 80));
    if first_connection(ctx, ep_addr, Some(backend_name(0)), Duration::from_secs(10)).is_none() {
        return Err(format!("ep-test never answered; log:\n{}", a.log_tail()));
    }

    // EndpointSlice changes: b0 → b1 → b0 …
    let mut from_write = Vec::new();
    let mut from_event = Vec::new();
    for _ in 0..plan.ep_trials {
        version += 1;
        let want = backend_name(version % 2);
        let offset = log_len(&log);
        let yaml = ep_yaml(version);
        let t_write = sys::now_epoch();
        write_by_rename(&mdir, "ep.yaml", &yaml).map_err(|e| e.to_string())?;
        match first_connection(ctx, ep_addr, Some(want), Duration::from_secs(5)) {
            Some(t_ok) => {
                from_write.push((t_ok - t_write) * 1e3);
                if let Some(t_ev) = event_time(&log, offset) {
                    from_event.push((t_ok - t_ev) * 1e3);
                }
            }
            None => s.endpoint_change.failures += 1,
        }
        a.check_alive()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    s.endpoint_change.from_write = Ms::of(from_write);
    s.endpoint_change.from_event = Ms::of(from_event);

    // One more Service at a time.
    {
        let mut change = Change::default();
        let (mut fw, mut fe) = (Vec::new(), Vec::new());
        // Each addition is one sync; their log lines are read at the end
        // (a line can follow the first connection that used its change).
        let adds_from = log_len(&log);
        for k in 0..plan.add_trials {
            let ip = added_ip(k);
            let name = format!("added-{k}");
            let yaml = manifests::list(&[Svc {
                name: name.clone(),
                ip,
                ports: &WHO,
                endpoints: &ep0,
                generation: 0,
            }]);
            let offset = log_len(&log);
            let t_write = sys::now_epoch();
            write_by_rename(&mdir, &format!("{name}.yaml"), &yaml).map_err(|e| e.to_string())?;
            match first_connection(
                ctx,
                SocketAddr::from((ip, 80)),
                None,
                Duration::from_secs(10),
            ) {
                Some(t_ok) => {
                    fw.push((t_ok - t_write) * 1e3);
                    if let Some(t_ev) = event_time(&log, offset) {
                        fe.push((t_ok - t_ev) * 1e3);
                    }
                }
                None => change.failures += 1,
            }
            a.check_alive()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        change.from_write = Ms::of(fw);
        change.from_event = Ms::of(fe);
        std::thread::sleep(Duration::from_millis(200));
        change.sync_ms = Ms::of(sync_times(&log, adds_from));
        s.service_add = Some(change);
    }
    if let Some(mut c) = a.child.take() {
        let _ = c.terminate(Duration::from_secs(10));
    }
    let _ = node_cleanup(ctx);
    Ok(())
}

fn node_cleanup(ctx: &Ctx<'_>) -> Result<(), String> {
    ctx.lab
        .node()
        .output("nft", [OsStr::new("flush"), OsStr::new("ruleset")])
        .map(|_| ())
        .map_err(|e| e.to_string())
}
