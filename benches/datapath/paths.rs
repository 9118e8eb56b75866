//! The data paths under test, each installed alone in the node namespace
//! and torn down (rules flushed, processes stopped) after its turn.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use uproxy_lab::e2e::http::{metric_sum, scrape};
use uproxy_lab::{Lab, Netns, NsChild, backend_addr};

use crate::clients;
use crate::manifests::{self, Port, Svc};
use crate::servers::{ECHO_PORT, SINK_PORT, SIZED_PORT, UDP_ECHO_PORT, WHO_PORT, backend_name};
use crate::sys;

/// The benchmark Service's ClusterIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Its TCP ports (Service port → backend port).
pub const PORTS: [Port; 4] = [
    Port::tcp("echo", 80, ECHO_PORT),
    Port::tcp("sink", 81, SINK_PORT),
    Port::tcp("who", 82, WHO_PORT),
    Port::tcp("sized", 83, SIZED_PORT),
];
/// Its UDP port: a DNS-like Service port to the backends' UDP echo.
pub const UDP_PORT: Port = Port::udp("dns", 53, UDP_ECHO_PORT);

/// Every port of the benchmark Service.
fn all_ports() -> impl Iterator<Item = Port> {
    PORTS.into_iter().chain([UDP_PORT])
}
/// The lab's pod CIDR as kube-proxy's `--cluster-cidr` (client and backends
/// count as pods: no masquerade, as for pod-to-Service traffic).
const CLUSTER_CIDR: &str = "10.200.0.0/16";
/// Ports of the peer proxies' listeners (Service port + this).
const PEER_PORT_BASE: u16 = 21000;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    Direct,
    Iptables,
    Nftables,
    UproxySplice,
    UproxyCopy,
    Nginx,
    Haproxy,
    /// HAProxy with `option splice-auto`: its own zero-copy relay.
    HaproxySplice,
    /// Another kube-uproxy binary (`--baseline-bin`), splice relay.
    UproxyBaseline,
    /// kube-uproxy splice with preserve-client-ip on (issue 23): the
    /// upstream connections come from the client's own address
    /// (`IP_TRANSPARENT`, the connmark and the policy route). The
    /// `UproxySplice` path is the same with it off.
    UproxyTransparent,
}

pub const ALL: [PathKind; 8] = [
    PathKind::Direct,
    PathKind::Iptables,
    PathKind::Nftables,
    PathKind::UproxySplice,
    PathKind::UproxyCopy,
    PathKind::Nginx,
    PathKind::Haproxy,
    PathKind::HaproxySplice,
];

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Iptables => "iptables",
            PathKind::Nftables => "nftables",
            PathKind::UproxySplice => "kube-uproxy splice",
            PathKind::UproxyCopy => "kube-uproxy copy",
            PathKind::Nginx => "nginx stream",
            PathKind::Haproxy => "haproxy tcp",
            PathKind::HaproxySplice => "haproxy splice",
            PathKind::UproxyBaseline => "kube-uproxy baseline",
            PathKind::UproxyTransparent => "kube-uproxy transparent",
        }
    }

    pub fn parse(s: &str) -> Option<PathKind> {
        let s = s.to_ascii_lowercase().replace(['_', ' '], "-");
        Some(match s.as_str() {
            "direct" => PathKind::Direct,
            "iptables" => PathKind::Iptables,
            "nftables" => PathKind::Nftables,
            "splice" | "kube-uproxy" | "kube-uproxy-splice" | "uproxy-splice" => {
                PathKind::UproxySplice
            }
            "copy" | "kube-uproxy-copy" | "uproxy-copy" => PathKind::UproxyCopy,
            "nginx" | "nginx-stream" => PathKind::Nginx,
            "haproxy" | "haproxy-tcp" => PathKind::Haproxy,
            "haproxy-splice" | "haproxy-splice-auto" => PathKind::HaproxySplice,
            "baseline" | "kube-uproxy-baseline" => PathKind::UproxyBaseline,
            "transparent" | "kube-uproxy-transparent" | "uproxy-transparent" => {
                PathKind::UproxyTransparent
            }
            _ => return None,
        })
    }

    /// Core paths must produce numbers; peers are optional. (The
    /// transparent path runs only when asked for, and then must too.)
    pub fn core(self) -> bool {
        !matches!(
            self,
            PathKind::Nginx
                | PathKind::Haproxy
                | PathKind::HaproxySplice
                | PathKind::UproxyBaseline
        )
    }

    /// Whether a user-space process carries the traffic.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            PathKind::UproxySplice
                | PathKind::UproxyCopy
                | PathKind::UproxyBaseline
                | PathKind::UproxyTransparent
                | PathKind::Nginx
                | PathKind::Haproxy
                | PathKind::HaproxySplice
        )
    }

    /// Whether the path carries the benchmark Service's UDP port (nginx
    /// relays UDP, HAProxy does not; preserve-client-ip is TCP only, so
    /// the transparent path's UDP would be the splice path's again).
    pub fn carries_udp(self) -> bool {
        matches!(
            self,
            PathKind::Direct
                | PathKind::Iptables
                | PathKind::Nftables
                | PathKind::UproxySplice
                | PathKind::UproxyCopy
                | PathKind::UproxyBaseline
                | PathKind::Nginx
        )
    }

    /// Why this path cannot run here, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        let need = |p: &str| (!sys::have(p)).then(|| format!("`{p}` not installed"));
        match self {
            PathKind::Iptables => need("iptables-restore"),
            PathKind::Nginx => need("nginx").or_else(|| {
                (!Path::new(NGINX_STREAM_MODULE).exists())
                    .then(|| "nginx stream module not installed (libnginx-mod-stream)".into())
            }),
            PathKind::Haproxy | PathKind::HaproxySplice => need("haproxy"),
            _ => None,
        }
    }
}

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Where the client connects for each protocol.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub who: SocketAddr,
    pub sized: SocketAddr,
    /// The UDP echo (only on paths that [`PathKind::carries_udp`]).
    pub udp: SocketAddr,
}

impl Targets {
    fn vip() -> Targets {
        Targets {
            echo: SocketAddr::from((VIP, 80)),
            sink: SocketAddr::from((VIP, 81)),
            who: SocketAddr::from((VIP, 82)),
            sized: SocketAddr::from((VIP, 83)),
            udp: SocketAddr::from((VIP, UDP_PORT.port)),
        }
    }
}

/// An installed path.
pub struct Active {
    pub kind: PathKind,
    pub targets: Targets,
    pub child: Option<NsChild>,
    pub log: Option<PathBuf>,
}

impl Active {
    /// The benchmark Service's ClusterIP targets (for processes started
    /// outside [`install`]).
    pub fn dummy_targets() -> Targets {
        Targets::vip()
    }

    /// The proxy's main pid (nginx: the master).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(NsChild::id)
    }

    pub fn cpu_ticks(&self) -> Option<u64> {
        self.pid().map(sys::tree_cpu_ticks)
    }

    pub fn log_tail(&self) -> String {
        let Some(p) = &self.log else {
            return String::new();
        };
        let s = fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the proxy process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(format!(
                "{} exited ({status}); log:\n{}",
                self.kind.name(),
                self.log_tail()
            ));
        }
        Ok(())
    }
}

/// Shared settings for installing paths.
pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub bin: PathBuf,
    /// `--baseline-bin`: the binary of the "kube-uproxy baseline" path.
    pub baseline_bin: Option<PathBuf>,
    pub workdir: PathBuf,
    /// `--pin-proxies`: the CPU list every proxy process runs on
    /// (`taskset -c`); `None`: the scheduler places them.
    pub proxy_cpus: Option<String>,
}

impl Ctx<'_> {
    fn endpoints(&self) -> Vec<Ipv4Addr> {
        (0..self.lab.backends().len()).map(backend_addr).collect()
    }

    fn nft_file(&self, name: &str, text: &str) -> Result<(), String> {
        let path = self.workdir.join(name);
        fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.lab
            .node()
            .output("nft", [OsStr::new("-f"), path.as_os_str()])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Removes every rule in the node namespace (all paths' tables).
    pub fn flush_rules(&self) {
        let _ = self.lab.node().output("nft", ["flush", "ruleset"]);
    }
}

/// Installs `kind`, and waits until the Service answers through it.
pub fn install(ctx: &Ctx<'_>, kind: PathKind) -> Result<Active, String> {
    ctx.flush_rules();
    let mut active = match kind {
        PathKind::Direct => Active {
            kind,
            targets: Targets {
                echo: SocketAddr::from((backend_addr(0), ECHO_PORT)),
                sink: SocketAddr::from((backend_addr(0), SINK_PORT)),
                who: SocketAddr::from((backend_addr(0), WHO_PORT)),
                sized: SocketAddr::from((backend_addr(0), SIZED_PORT)),
                udp: SocketAddr::from((backend_addr(0), UDP_ECHO_PORT)),
            },
            child: None,
            log: None,
        },
        PathKind::Iptables => {
            let rules = iptables_rules(&ctx.endpoints());
            let path = ctx.workdir.join("iptables.rules");
            fs::write(&path, rules).map_err(|e| e.to_string())?;
            let mut cmd = ctx.lab.node().command("iptables-restore");
            cmd.arg("-w")
                .stdin(File::open(&path).map_err(|e| e.to_string())?)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let out = cmd.output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "iptables-restore: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Active {
                kind,
                targets: Targets::vip(),
                child: None,
                log: None,
            }
        }
        PathKind::Nftables => {
            ctx.nft_file("kube-proxy.nft", &nftables_rules(&ctx.endpoints()))?;
            Active {
                kind,
                targets: Targets::vip(),
                child: None,
                log: None,
            }
        }
        PathKind::UproxySplice
        | PathKind::UproxyCopy
        | PathKind::UproxyBaseline
        | PathKind::UproxyTransparent => {
            let (mode, bin, dirname) = match kind {
                PathKind::UproxyCopy => ("copy", &ctx.bin, "uproxy-copy"),
                PathKind::UproxyBaseline => (
                    "splice",
                    ctx.baseline_bin
                        .as_ref()
                        .ok_or("the baseline path needs --baseline-bin")?,
                    "uproxy-baseline",
                ),
                PathKind::UproxyTransparent => ("splice", &ctx.bin, "uproxy-transparent"),
                _ => ("splice", &ctx.bin, "uproxy-splice"),
            };
            let dir = ctx.workdir.join(dirname);
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let manifests = dir.join("manifests.yaml");
            let eps = ctx.endpoints();
            let ports: Vec<Port> = all_ports().collect();
            let svc = Svc {
                name: "bench".into(),
                ip: VIP,
                ports: &ports,
                endpoints: &eps,
                generation: 0,
            };
            let transparent = kind == PathKind::UproxyTransparent;
            let text = if transparent {
                manifests::list_preserving_client_ip(&svc, TRANSPARENT_NODE)
            } else {
                manifests::list(&[svc])
            };
            fs::write(&manifests, text).map_err(|e| e.to_string())?;
            let log = dir.join("kube-uproxy.log");
            let mut args = vec![
                OsStr::new("--manifests"),
                manifests.as_os_str(),
                OsStr::new("--proxy-port-range"),
                OsStr::new("20000-20999"),
                OsStr::new("--tcp-relay"),
                OsStr::new(mode),
            ];
            if transparent {
                args.extend([
                    OsStr::new("--hostname-override"),
                    OsStr::new(TRANSPARENT_NODE),
                ]);
            }
            let child = spawn_logged(ctx, bin, &args, &log)?;
            let mut a = Active {
                kind,
                targets: Targets::vip(),
                child: Some(child),
                log: Some(log),
            };
            wait_uproxy_map(ctx, &mut a, VIP, &all_ports().collect::<Vec<_>>())?;
            a
        }
        PathKind::Nginx => {
            let dir = ctx.workdir.join("nginx");
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let conf = dir.join("nginx.conf");
            fs::write(&conf, nginx_conf(&dir, &ctx.endpoints())).map_err(|e| e.to_string())?;
            ctx.nft_file("redirect.nft", &redirect_rules())?;
            let log = dir.join("error.log");
            let child = spawn_logged(
                ctx,
                Path::new("nginx"),
                &[
                    OsStr::new("-c"),
                    conf.as_os_str(),
                    OsStr::new("-p"),
                    dir.as_os_str(),
                    OsStr::new("-e"),
                    log.as_os_str(),
                ],
                &dir.join("stderr.log"),
            )?;
            Active {
                kind,
                targets: Targets::vip(),
                child: Some(child),
                log: Some(log),
            }
        }
        PathKind::Haproxy | PathKind::HaproxySplice => {
            let splice = kind == PathKind::HaproxySplice;
            let dir = ctx
                .workdir
                .join(if splice { "haproxy-splice" } else { "haproxy" });
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let conf = dir.join("haproxy.cfg");
            fs::write(&conf, haproxy_conf(&ctx.endpoints(), splice)).map_err(|e| e.to_string())?;
            ctx.nft_file("redirect.nft", &redirect_rules())?;
            let log = dir.join("haproxy.log");
            let child = spawn_logged(
                ctx,
                Path::new("haproxy"),
                &[OsStr::new("-db"), OsStr::new("-f"), conf.as_os_str()],
                &log,
            )?;
            Active {
                kind,
                targets: Targets::vip(),
                child: Some(child),
                log: Some(log),
            }
        }
    };
    wait_answers(ctx, &mut active)?;
    if kind == PathKind::UproxyTransparent {
        confirm_transparent(ctx, &mut active)?;
    }
    Ok(active)
}

/// The node the transparent path's proxy runs as (`--hostname-override`)
/// and its endpoints are on (`nodeName`).
const TRANSPARENT_NODE: &str = "bench-node";

/// The proxy's preserve-client-ip counters, process-wide since its start
/// (so per round: each round starts the proxy afresh).
#[derive(Clone, Copy, Debug)]
struct Transparent {
    /// `kubeuproxy_client_ip_preserved_total`: upstream connections opened
    /// from the client's own address.
    preserved: f64,
    /// `kubeuproxy_preserve_client_ip_fallbacks_total`: those that came
    /// from the node's address instead.
    fallbacks: f64,
}

/// Reads [`Transparent`] from the proxy's `/metrics` in the node.
fn transparent_counts(ctx: &Ctx<'_>) -> Result<Transparent, String> {
    let samples = scrape(ctx.lab.node())?;
    let get = |name: &str| metric_sum(&samples, name, &[]).0;
    Ok(Transparent {
        preserved: get("kubeuproxy_client_ip_preserved_total"),
        fallbacks: get("kubeuproxy_preserve_client_ip_fallbacks_total"),
    })
}

/// After a round of the transparent path: how many connections came from
/// the client's address (`Ok`, a note for the round's line), or an error
/// for the report when any fell back to the node's address (the round's
/// figures then mix the two). `Ok(None)` for every other path.
pub fn transparent_audit(ctx: &Ctx<'_>, a: &Active) -> Result<Option<String>, String> {
    if a.kind != PathKind::UproxyTransparent {
        return Ok(None);
    }
    let c = transparent_counts(ctx).map_err(|e| format!("preserve-client-ip counters: {e}"))?;
    if c.fallbacks > 0.0 {
        return Err(format!(
            "{} of {} upstream connections fell back to the node's address \
             (kubeuproxy_preserve_client_ip_fallbacks_total; the proxy's log says why, \
             e.g. a client port the node listens on)",
            c.fallbacks,
            c.preserved + c.fallbacks
        ));
    }
    Ok(Some(format!(
        "{} upstream connections from the client's address, none fell back",
        c.preserved
    )))
}

/// Confirms, before the transparent path is measured, that its upstream
/// connections really come from the client's own address: the echo
/// backend sees the client's address and port as its peer, and the proxy
/// counted the connection as preserved, none as a fallback. A path that
/// silently fell back would otherwise be measured as "transparent" while
/// doing what the splice path does.
fn confirm_transparent(ctx: &Ctx<'_>, a: &mut Active) -> Result<(), String> {
    let target = a.targets.echo;
    let fail = |what: String| format!("{}: {what}; log:\n{}", a.kind.name(), a.log_tail());
    let mut s = ctx
        .lab
        .client()
        .tcp_connect(target, READY_TIMEOUT)
        .map_err(|e| fail(format!("connect {target}: {e}")))?;
    let mut echoed = [0u8; 1];
    s.set_read_timeout(Some(READY_TIMEOUT))
        .and_then(|()| s.write_all(b"x"))
        .and_then(|()| s.read_exact(&mut echoed))
        .map_err(|e| fail(format!("echo through {target}: {e}")))?;
    let client = s
        .local_addr()
        .map_err(|e| fail(format!("local address: {e}")))?;
    // The connection is held open while the backends are asked.
    let peers: Vec<SocketAddr> = ctx
        .lab
        .backends()
        .iter()
        .flat_map(|ns| established_peers(ns, ECHO_PORT))
        .collect();
    let counts = transparent_counts(ctx).map_err(|e| fail(format!("/metrics: {e}")))?;
    drop(s);
    if !peers.contains(&client) {
        return Err(fail(format!(
            "the echo backends' peers are {peers:?}, not the client's {client}: \
             the upstream connection did not come from the client's address"
        )));
    }
    if counts.preserved < 1.0 || counts.fallbacks > 0.0 {
        return Err(fail(format!(
            "the proxy counted {} connections preserved and {} fallbacks",
            counts.preserved, counts.fallbacks
        )));
    }
    Ok(())
}

/// The peer addresses of the established TCP connections on local port
/// `port` in `ns` (`ss`; none if it cannot be run).
fn established_peers(ns: &Netns, port: u16) -> Vec<SocketAddr> {
    let Ok(out) = ns.output("ss", ["-Htn", "state", "established"]) else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // Recv-Q Send-Q Local:Port Peer:Port (no state column).
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local: SocketAddr = cols.get(2)?.parse().ok()?;
            let peer: SocketAddr = cols.get(3)?.parse().ok()?;
            (local.port() == port).then_some(peer)
        })
        .collect()
}

/// Stops the path's process (SIGTERM, then SIGKILL) and flushes the rules.
pub fn remove(ctx: &Ctx<'_>, mut active: Active) {
    if let Some(mut c) = active.child.take() {
        let _ = c.terminate(Duration::from_secs(5));
    }
    ctx.flush_rules();
}

/// Starts a proxy process in the node namespace, pinned to `--pin-proxies`
/// if given (`taskset` execs the program: the pid is the proxy's).
fn spawn_logged(
    ctx: &Ctx<'_>,
    program: &Path,
    args: &[&OsStr],
    log: &Path,
) -> Result<NsChild, String> {
    let f = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = match &ctx.proxy_cpus {
        Some(cpus) => {
            let mut c = ctx.lab.node().command("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => ctx.lab.node().command(program),
    };
    cmd.args(args).stdin(Stdio::null()).stdout(f2).stderr(f);
    ctx.lab.node().spawn(cmd).map_err(|e| e.to_string())
}

/// Waits until `ip . protocol . port` is in kube-uproxy's map for every
/// port.
pub fn wait_uproxy_map(
    ctx: &Ctx<'_>,
    a: &mut Active,
    ip: Ipv4Addr,
    ports: &[Port],
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        a.check_alive()?;
        if let Ok(keys) = ctx
            .lab
            .node()
            .nft_keys("map", "ip", "kube-uproxy", "service-ports")
        {
            let all = ports.iter().all(|p| {
                keys.iter().any(|k| {
                    k.len() == 3
                        && k[0] == serde_json::json!(ip.to_string())
                        && k[1] == serde_json::json!(p.protocol.nft_name())
                        && k[2] == serde_json::json!(p.port)
                })
            });
            if all {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "kube-uproxy did not program {ip} ports {:?} in {READY_TIMEOUT:?}; log:\n{}",
                ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol))
                    .collect::<Vec<_>>(),
                a.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the whoami port greets through the path.
fn wait_answers(ctx: &Ctx<'_>, a: &mut Active) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let target = a.targets.who;
    let names: Vec<String> = (0..ctx.lab.backends().len()).map(backend_name).collect();
    let mut last;
    loop {
        a.check_alive()?;
        match ctx
            .lab
            .client()
            .run(move || clients::who(target, Duration::from_millis(500)))
        {
            Ok(Ok(g)) if names.contains(&g) => return Ok(()),
            Ok(Ok(g)) => last = format!("unexpected greeting {g:?}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} never answered on {target}: {last}; log:\n{}",
                a.kind.name(),
                a.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A short stable hash, as kube-proxy names its chains.
fn chain_hash(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| ALPHA[((h >> (i * 4)) & 31) as usize] as char)
        .collect()
}

/// kube-proxy's iptables mode for the benchmark Service (as
/// pkg/proxy/iptables writes it, for one node, no NodePorts).
pub fn iptables_rules(endpoints: &[Ipv4Addr]) -> String {
    let mut filter = String::from(
        "*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
",
    );
    // nfacct may be missing from the kernel; kube-proxy falls back to a
    // plain DROP then, and so do we.
    if !Path::new("/proc/net/netfilter/nfnetlink_acct").exists() {
        filter = filter.replace(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", "");
    }
    let mut nat = String::from(
        "*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let mut body = String::new();
    let _ = writeln!(
        body,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    for p in all_ports() {
        let proto = p.protocol.nft_name();
        let svc = format!("default/bench:{}", p.name);
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{svc}{proto}")));
        let _ = writeln!(nat, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            body,
            "-A KUBE-SERVICES -d {VIP}/32 -p {proto} -m comment --comment \"{svc} cluster IP\" -m {proto} --dport {} -j {svc_chain}",
            p.port
        );
        let _ = writeln!(
            body,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {VIP}/32 -p {proto} -m comment --comment \"{svc} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
            p.port
        );
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{svc}{ep}:{}", p.target))
            );
            let _ = writeln!(nat, ":{sep} - [0:0]");
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    body,
                    "-A {svc_chain} -m comment --comment \"{svc} -> {ep}:{t}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / remaining as f64,
                    t = p.target
                );
            } else {
                let _ = writeln!(
                    body,
                    "-A {svc_chain} -m comment --comment \"{svc} -> {ep}:{t}\" -j {sep}",
                    t = p.target
                );
            }
            let _ = writeln!(
                body,
                "-A {sep} -s {ep}/32 -m comment --comment \"{svc}\" -j KUBE-MARK-MASQ
-A {sep} -p {proto} -m comment --comment \"{svc}\" -m {proto} -j DNAT --to-destination {ep}:{t}",
                t = p.target
            );
        }
    }
    let _ = writeln!(
        body,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    format!("{filter}{nat}{body}COMMIT\n")
}

/// kube-proxy's nftables mode for the benchmark Service (the shape of
/// pkg/proxy/nftables: verdict map → service chain → `numgen` → endpoint
/// chain → dnat).
pub fn nftables_rules(endpoints: &[Ipv4Addr]) -> String {
    let mut svc_elems = Vec::new();
    let mut chains = String::new();
    for p in all_ports() {
        let proto = p.protocol.nft_name();
        let svc = format!("default/bench/{proto}/{}", p.name);
        let svc_chain = format!("service-{}-{svc}", &chain_hash(&svc)[..8]);
        svc_elems.push(format!("{VIP} . {proto} . {} : goto {svc_chain}", p.port));
        let mut vmap = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{}-{svc}__{ep}/{}",
                &chain_hash(&format!("{svc}{ep}"))[..8],
                p.target
            );
            vmap.push(format!("{i} : goto {ep_chain}"));
            let _ = write!(
                chains,
                "  chain {ep_chain} {{
    ip saddr {ep} jump mark-for-masquerade
    meta l4proto {proto} dnat to {ep}:{}
  }}
",
                p.target
            );
        }
        let _ = write!(
            chains,
            "  chain {svc_chain} {{
    ip daddr {VIP} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade
    numgen random mod {} vmap {{ {} }}
  }}
",
            p.port,
            endpoints.len(),
            vmap.join(", ")
        );
    }
    format!(
        "table ip kube-proxy {{
  comment \"rules for kube-proxy\"
  set cluster-ips {{
    type ipv4_addr
    elements = {{ {VIP} }}
  }}
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {elems} }}
  }}
  map no-endpoint-services {{
    type ipv4_addr . inet_proto . inet_service : verdict
  }}
  chain filter-prerouting {{
    type filter hook prerouting priority -110; policy accept;
    ct state new jump firewall-check
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state new jump service-endpoints-check
    ct state new jump cluster-ips-check
  }}
  chain filter-output {{
    type filter hook output priority -110; policy accept;
    ct state new jump service-endpoints-check
    ct state new jump firewall-check
  }}
  chain firewall-check {{
  }}
  chain service-endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain cluster-ips-check {{
    ip daddr @cluster-ips reject
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain masquerading {{
    meta mark & 0x00004000 == 0x00000000 return
    meta mark set meta mark ^ 0x00004000
    masquerade fully-random
  }}
  chain mark-for-masquerade {{
    meta mark set meta mark | 0x00004000
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports
  }}
  chain nodeports {{
  }}
{chains}}}
",
        elems = svc_elems.join(", ")
    )
}

/// The redirect the peer proxies sit behind: the same data-map shape as
/// kube-uproxy's own table (ClusterIP . proto . port → local port).
fn redirect_rules() -> String {
    let mut elems: Vec<String> = PORTS
        .iter()
        .map(|p| format!("{VIP} . tcp . {} : {}", p.port, PEER_PORT_BASE + p.port))
        .collect();
    // nginx relays UDP too (HAProxy does not: nothing listens there).
    elems.push(format!(
        "{VIP} . udp . {} : {}",
        UDP_PORT.port,
        PEER_PORT_BASE + UDP_PORT.port
    ));
    format!(
        "table ip bench-redirect {{
  map service-ports {{
    type ipv4_addr . inet_proto . inet_service : inet_service
    elements = {{ {} }}
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    meta l4proto {{ tcp, udp }} redirect to ip daddr . meta l4proto . th dport map @service-ports
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    meta l4proto {{ tcp, udp }} redirect to ip daddr . meta l4proto . th dport map @service-ports
  }}
}}
",
        elems.join(", ")
    )
}

fn nginx_conf(dir: &Path, endpoints: &[Ipv4Addr]) -> String {
    let mut stream = String::new();
    // UDP: a session per client address and port, as kube-uproxy's flows
    // (no `proxy_responses`: a request/response flow keeps its upstream
    // socket); `reuseport` keeps a client's datagrams on one worker.
    let tcp = PORTS.iter().map(|p| (p, "", "proxy_half_close on;"));
    let udp = [(&UDP_PORT, " udp reuseport", "proxy_timeout 30s;")];
    for (p, listen, option) in tcp.chain(udp) {
        let _ = writeln!(stream, "  upstream {} {{", p.name);
        for ep in endpoints {
            let _ = writeln!(stream, "    server {ep}:{};", p.target);
        }
        let _ = writeln!(
            stream,
            "  }}\n  server {{\n    listen {}{listen};\n    proxy_pass {};\n    {option}\n  }}",
            PEER_PORT_BASE + p.port,
            p.name
        );
    }
    format!(
        "load_module {NGINX_STREAM_MODULE};
user root;
worker_processes auto;
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {pid};
error_log {err} warn;
events {{
  worker_connections {conns};
}}
stream {{
{stream}}}
",
        pid = dir.join("nginx.pid").display(),
        nofile = sys::nofile_limit(),
        conns = sys::nofile_limit() / 2,
        err = dir.join("error.log").display(),
    )
}

/// HAProxy in tcp mode; with `splice`, `option splice-auto` (HAProxy
/// splices when it sees a flow is large, as kube-uproxy's hybrid does).
fn haproxy_conf(endpoints: &[Ipv4Addr], splice: bool) -> String {
    // Each proxied connection holds two sockets; with splicing, each pipe
    // two fds more (HAProxy reserves them at start and refuses to run if
    // the open-file limit is short): 1024 pipes is plenty for the flows
    // that splice at once here.
    let pipes: u64 = if splice { 1024 } else { 0 };
    let mut out = format!(
        "global
  maxconn {maxconn}
{maxpipes}
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
{splice}
",
        maxconn = sys::nofile_limit().saturating_sub(100 + 2 * pipes) / 2,
        maxpipes = if splice {
            format!("  maxpipes {pipes}\n")
        } else {
            String::new()
        },
        splice = if splice { "  option splice-auto\n" } else { "" },
    );
    for p in &PORTS {
        let _ = writeln!(
            out,
            "frontend fe_{n}\n  bind :{port}\n  default_backend be_{n}\n\nbackend be_{n}\n  balance roundrobin",
            n = p.name,
            port = PEER_PORT_BASE + p.port
        );
        for (i, ep) in endpoints.iter().enumerate() {
            let _ = writeln!(out, "  server s{i} {ep}:{}", p.target);
        }
        out.push('\n');
    }
    out
}
