//! Network-namespace lab for the end-to-end tests and the benchmark harness.
//!
//! A [`Lab`] builds this topology out of fresh network namespaces (needs root):
//!
//! ```text
//!  client ns                 node ns                          backend<i> ns
//!  eth0 10.200.0.2/24 ─veth─ eth0 10.200.0.1/24
//!                            br0  10.200.1.1/24 ─┬─ veth<i> ─ eth0 10.200.1.(10+i)/24
//!                                                └─ ...
//! ```
//!
//! The client and the backends route everything through the node, the node
//! forwards (`ip_forward=1`) and routes the ClusterIP range [`CLUSTER_IP_CIDR`]
//! onto `br0`, so that both forwarded packets and the node's own connects to a
//! ClusterIP pass the nftables nat hooks (prerouting / output) where
//! kube-uproxy redirects them. Every namespace has `lo` up.
//!
//! [`Lab::add_ipv6`] gives the same topology IPv6 addresses beside the IPv4
//! ones (`fd00:200::/64` on the client link, `fd00:200:1::/64` on the
//! bridge, the IPv6 ClusterIP range [`CLUSTER_IP_CIDR_V6`] onto `br0`).
//!
//! Veths are created directly between namespaces, so no interface name ever
//! exists in the root namespace and labs can run in parallel. Namespace names
//! are `ku-<pid>-<counter>-<tag>-<role>`; [`reap_stale`] (also called by
//! [`Lab::new`]) removes namespaces left behind by processes that no longer
//! exist. Dropping a [`Lab`] kills the processes left in its namespaces and
//! deletes them.
//!
//! Code runs inside a namespace in two ways: [`Netns::run`] runs a closure on
//! a fresh thread that entered the namespace (sockets created there stay in
//! that namespace for their whole life, whichever thread or runtime uses them
//! afterwards), and [`Netns::command`] / [`Netns::spawn`] run programs through
//! `ip netns exec`.
//!
//! The servers in [`peers`] (whoami, sha256, echo) run on tokio and are
//! started on listeners created with [`Netns::tcp_listener`].
//!
//! On top of that, for the product's integration tests (compiled once
//! here, not into every test binary): [`e2e`], the harness that runs the
//! `kube-uproxy` binary in a lab's node namespace and waits for its rules;
//! [`apiserver`], an in-process fake kube-apiserver for the Kubernetes
//! source; and [`manifests`], the writer of the files the proxy reads.

pub mod apiserver;
pub mod e2e;
pub mod manifests;
pub mod peers;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Address of the client namespace.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Address of the node on the client link (the client's default gateway).
pub const NODE_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Address of the node on the backend bridge (the backends' default gateway).
pub const NODE_BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The Service (ClusterIP) range routed by the node onto its bridge.
pub const CLUSTER_IP_CIDR: &str = "10.96.0.0/12";
/// IPv6 address of the client namespace ([`Lab::add_ipv6`]).
pub const CLIENT_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
/// IPv6 address of the node on the client link.
pub const NODE_CLIENT_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// IPv6 address of the node on the backend bridge.
pub const NODE_BRIDGE_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1);
/// The IPv6 Service (ClusterIP) range routed by the node onto its bridge.
pub const CLUSTER_IP_CIDR_V6: &str = "fd00:96::/112";

/// IPv6 address of backend `i` (`fd00:200:1::<10+i>`, hexadecimal).
///
/// # Panics
/// If `i >= MAX_BACKENDS`.
pub fn backend_addr_v6(i: usize) -> Ipv6Addr {
    assert!(i < MAX_BACKENDS, "backend index {i} out of range");
    Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 10 + i as u16)
}

/// Largest number of backends a lab can have (10.200.1.10 ..= 10.200.1.254).
pub const MAX_BACKENDS: usize = 245;

/// Directory where `ip netns` keeps the namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";
/// Prefix of every namespace name created here.
const NAME_PREFIX: &str = "ku-";
/// Longest tag kept in a namespace name.
const MAX_TAG_LEN: usize = 24;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Address of backend `i` (`10.200.1.(10+i)`).
///
/// # Panics
/// If `i >= MAX_BACKENDS`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    assert!(i < MAX_BACKENDS, "backend index {i} out of range");
    // i < 245, so 10 + i <= 254 fits in a u8.
    Ipv4Addr::new(10, 200, 1, 10 + i as u8)
}

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command ran but did not succeed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// `setns(2)` into a namespace failed.
    #[error("entering network namespace {name}: {source}")]
    Setns {
        /// The namespace.
        name: String,
        /// The error from the kernel.
        #[source]
        source: nix::Error,
    },
    /// Sending a signal failed.
    #[error("sending {signal} to pid {pid}: {source}")]
    Signal {
        /// The signal.
        signal: Signal,
        /// The target.
        pid: u32,
        /// The error from the kernel.
        #[source]
        source: nix::Error,
    },
    /// A parameter was out of range.
    #[error("invalid lab parameter: {0}")]
    Invalid(String),
    /// A program printed something that could not be understood.
    #[error("unexpected output from `{command}`: {detail}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
}

impl LabError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The strings of a JSON array (none if `v` is not an array; entries
/// that are not strings left out).
pub fn json_strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Returns true if this process can build labs (root, `ip` and `nft` found).
///
/// Otherwise: if the environment variable `CI` is set, panics with the reason
/// (root tests must fail in CI, never skip silently); else prints
/// `SKIP <test_name>: <reason>` to stderr and returns false.
pub fn require_root_and_nft(test_name: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root (network namespaces need CAP_SYS_ADMIN)")
    } else if !program_runs("ip", &["-V"]) {
        Some("`ip` (iproute2) not found")
    } else if !program_runs("nft", &["--version"]) {
        Some("`nft` (nftables) not found")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test_name}: {reason}; CI is set, so this test must run, not skip");
            }
            // Written to the real stderr, not through eprintln!, so that the
            // test harness does not swallow it for a passing test.
            use std::io::Write as _;
            let _ = writeln!(io::stderr(), "SKIP {test_name}: {reason}");
            false
        }
    }
}

fn program_runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Turns a free-form tag into `[a-z0-9-]`, at most [`MAX_TAG_LEN`] chars.
fn sanitize_tag(tag: &str) -> String {
    let mut out: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(MAX_TAG_LEN)
        .collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("lab");
    }
    out
}

/// Name prefix of one lab: `ku-<pid>-<counter>-<tag>`.
fn lab_prefix(pid: u32, counter: u32, tag: &str) -> String {
    format!("{NAME_PREFIX}{pid}-{counter}-{}", sanitize_tag(tag))
}

/// The pid encoded in a lab namespace name, if the name is one of ours.
fn owner_pid(ns_name: &str) -> Option<u32> {
    let rest = ns_name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse::<u32>().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?;
    Some(pid)
}

/// Runs `ip ARGS`, failing with its stderr if it does not succeed.
fn ip(args: &[&str]) -> Result<(), LabError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_checked(cmd).map(|_| ())
}

/// Runs a command to completion with stdin closed and checks its status.
fn run_checked(mut cmd: Command) -> Result<Output, LabError> {
    let line = command_line(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::io(format!("running `{line}`"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

/// Pids of the processes whose network namespace is `name`.
fn netns_pids(name: &str) -> Vec<i32> {
    let out = Command::new("ip")
        .args(["netns", "pids", name])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect(),
        _ => Vec::new(),
    }
}

/// SIGKILLs every process in namespace `name` (never this process) and waits,
/// bounded, for them to disappear. Errors are ignored.
fn kill_netns_processes(name: &str) {
    let me = std::process::id() as i32;
    let pids: Vec<i32> = netns_pids(name).into_iter().filter(|&p| p != me).collect();
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !netns_pids(name).iter().all(|&p| p == me) {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kills what is left in namespace `name` and deletes it; errors are ignored,
/// deletion is retried a few times.
fn destroy_netns(name: &str) {
    kill_netns_processes(name);
    for _ in 0..5 {
        let ok = Command::new("ip")
            .args(["netns", "del", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok || !Path::new(NETNS_RUN_DIR).join(name).exists() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Deletes lab namespaces (`ku-<pid>-...`) whose creating process no longer
/// exists, e.g. after a test binary was killed. Returns the names removed.
pub fn reap_stale() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        destroy_netns(&name);
        removed.push(name);
    }
    removed
}

/// Namespaces created so far; dropping it destroys them (newest first).
#[derive(Debug, Default)]
struct OwnedNamespaces {
    names: Vec<String>,
}

impl OwnedNamespaces {
    fn create(&mut self, name: String) -> Result<Netns, LabError> {
        ip(&["netns", "add", &name])?;
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(Netns { name })
    }
}

impl Drop for OwnedNamespaces {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            destroy_netns(name);
        }
    }
}

/// A client, a node and `n` backends in their own network namespaces.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    client: Netns,
    node: Netns,
    backends: Vec<Netns>,
    // Declared last: dropped after everything else, deletes the namespaces.
    owned: OwnedNamespaces,
}

impl Lab {
    /// Builds the topology described in the [module docs](self).
    ///
    /// `tag` is only used to make the namespace names readable. On error the
    /// namespaces created so far are deleted.
    pub fn new(tag: &str, n_backends: usize) -> Result<Lab, LabError> {
        if n_backends > MAX_BACKENDS {
            return Err(LabError::Invalid(format!(
                "{n_backends} backends requested, at most {MAX_BACKENDS}"
            )));
        }
        reap_stale();
        let counter = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = lab_prefix(std::process::id(), counter, tag);
        let mut owned = OwnedNamespaces::default();

        let client = owned.create(format!("{prefix}-client"))?;
        let node = owned.create(format!("{prefix}-node"))?;
        let mut backends = Vec::with_capacity(n_backends);
        for i in 0..n_backends {
            backends.push(owned.create(format!("{prefix}-b{i}"))?);
        }

        let (c, n) = (client.name(), node.name());
        // client <-> node
        ip(&[
            "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])?;
        ip(&["-n", c, "addr", "add", "10.200.0.2/24", "dev", "eth0"])?;
        ip(&["-n", c, "link", "set", "eth0", "up"])?;
        ip(&["-n", n, "addr", "add", "10.200.0.1/24", "dev", "eth0"])?;
        ip(&["-n", n, "link", "set", "eth0", "up"])?;
        ip(&["-n", c, "route", "add", "default", "via", "10.200.0.1"])?;

        // node bridge
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", n, "addr", "add", "10.200.1.1/24", "dev", "br0"])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;

        // backends
        for (i, b) in backends.iter().enumerate() {
            let b = b.name();
            let port = format!("veth{i}");
            let addr = format!("{}/24", backend_addr(i));
            ip(&[
                "-n", b, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", n,
            ])?;
            ip(&["-n", n, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", n, "link", "set", &port, "up"])?;
            ip(&["-n", b, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", b, "link", "set", "eth0", "up"])?;
            ip(&["-n", b, "route", "add", "default", "via", "10.200.1.1"])?;
        }

        // node: forwarding, and the ClusterIP range routed onto the bridge so
        // that forwarded and locally generated packets to a ClusterIP have a
        // route (the nat hooks then redirect them to the proxy).
        let mut fwd = node.command("sh");
        fwd.args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        run_checked(fwd)?;
        ip(&["-n", n, "route", "add", CLUSTER_IP_CIDR, "dev", "br0"])?;

        Ok(Lab {
            prefix,
            client,
            node,
            backends,
            owned,
        })
    }

    /// Adds IPv6 beside IPv4: an address on every link (without duplicate
    /// address detection, so they are usable at once), default routes
    /// through the node, IPv6 forwarding on the node and the IPv6
    /// ClusterIP range [`CLUSTER_IP_CIDR_V6`] routed onto its bridge.
    pub fn add_ipv6(&self) -> Result<(), LabError> {
        let (c, n) = (self.client.name(), self.node.name());
        let addr = |ns: &str, a: String, dev: &str| {
            ip(&["-n", ns, "-6", "addr", "add", &a, "dev", dev, "nodad"])
        };
        addr(c, format!("{CLIENT_ADDR_V6}/64"), "eth0")?;
        addr(n, format!("{NODE_CLIENT_ADDR_V6}/64"), "eth0")?;
        addr(n, format!("{NODE_BRIDGE_ADDR_V6}/64"), "br0")?;
        let gw = NODE_CLIENT_ADDR_V6.to_string();
        ip(&["-n", c, "-6", "route", "add", "default", "via", &gw])?;
        for (i, b) in self.backends.iter().enumerate() {
            addr(b.name(), format!("{}/64", backend_addr_v6(i)), "eth0")?;
            let gw = NODE_BRIDGE_ADDR_V6.to_string();
            ip(&["-n", b.name(), "-6", "route", "add", "default", "via", &gw])?;
        }
        let mut fwd = self.node.command("sh");
        fwd.args(["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"]);
        run_checked(fwd)?;
        ip(&[
            "-n",
            n,
            "-6",
            "route",
            "add",
            CLUSTER_IP_CIDR_V6,
            "dev",
            "br0",
        ])
    }

    /// The common prefix of this lab's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The client namespace (10.200.0.2).
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The node namespace, where the proxy runs (10.200.0.1, 10.200.1.1).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// Backend namespace `i` (10.200.1.(10+i)), if it exists.
    pub fn backend(&self, i: usize) -> Option<&Netns> {
        self.backends.get(i)
    }

    /// All backend namespaces, in index order.
    pub fn backends(&self) -> &[Netns] {
        &self.backends
    }

    /// Adds a pod the way Calico and Cilium wire one: the pod has `addr`/32
    /// and a default route via 169.254.1.1 on link; the node side of its
    /// veth (`cali<n>`) has **no IPv4 address**, answers ARP by proxy ARP,
    /// and routes `addr`/32 to it. Returns the pod's namespace.
    pub fn add_routed_pod(&mut self, tag: &str, addr: Ipv4Addr) -> Result<Netns, LabError> {
        let n_pods = self
            .owned
            .names
            .iter()
            .filter(|n| {
                n.strip_prefix(self.prefix.as_str())
                    .is_some_and(|rest| rest.starts_with("-pod"))
            })
            .count();
        let pod =
            self.owned
                .create(format!("{}-pod{n_pods}-{}", self.prefix, sanitize_tag(tag)))?;
        let (p, n) = (pod.name(), self.node.name());
        let host_side = format!("cali{n_pods}");
        ip(&[
            "-n", n, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", p,
        ])?;
        ip(&["-n", p, "addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ip(&["-n", p, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            p,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            p,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        ip(&["-n", n, "link", "set", &host_side, "up"])?;
        let mut arp = self.node.command("sh");
        arp.args([
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv4/conf/{host_side}/proxy_arp"),
        ]);
        run_checked(arp)?;
        ip(&[
            "-n",
            n,
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &host_side,
        ])?;
        Ok(pod)
    }

    /// Gives the node the routing of a real one: a default route through
    /// its uplink (the client link, the client playing the upstream router)
    /// instead of a route for the ClusterIP range. ClusterIP traffic that no
    /// rule catches then leaves by the default route, as on a real node.
    pub fn route_node_by_default(&self) -> Result<(), LabError> {
        let n = self.node.name();
        ip(&["-n", n, "route", "del", CLUSTER_IP_CIDR])?;
        ip(&["-n", n, "route", "add", "default", "via", "10.200.0.2"])
    }

    /// Names of every namespace of this lab.
    pub fn namespace_names(&self) -> Vec<String> {
        self.owned.names.clone()
    }
}

/// A network namespace, by name. Cheap to clone; it does not own the
/// namespace (the [`Lab`] does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// Moves the calling thread into the network namespace behind `file`.
fn enter_netns(file: &File, name: &str) -> Result<(), LabError> {
    nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Setns {
        name: name.to_string(),
        source,
    })
}

impl Netns {
    /// The namespace name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle file, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `f` on a fresh thread that first entered this namespace, and
    /// returns its result. Sockets created by `f` belong to this namespace.
    /// A panic in `f` is propagated to the caller.
    pub fn run<F, T>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        let file = File::open(&path)
            .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
        let name = self.name.as_str();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(scope, move || {
                    enter_netns(&file, name)?;
                    Ok(f())
                })
                .map_err(|e| LabError::io("spawning a namespace thread", e))?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A command that runs `program` in this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program ARGS` in this namespace to completion (stdin closed) and
    /// returns its output; a non-zero exit is an error carrying its stderr.
    pub fn output<I, S>(&self, program: &str, args: I) -> Result<Output, LabError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_checked(cmd)
    }

    /// Starts a long-lived child; it is killed when the returned handle is
    /// dropped. `cmd` should come from [`Netns::command`] (so that it runs in
    /// this namespace) and is spawned as configured (stdio etc.).
    pub fn spawn(&self, mut cmd: Command) -> Result<NsChild, LabError> {
        let label = command_line(&cmd);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(format!("spawning `{label}`"), e))?;
        Ok(NsChild {
            child,
            label,
            status: None,
        })
    }

    /// A TCP listener on `addr` in this namespace (SO_REUSEADDR, blocking).
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<TcpListener, LabError> {
        self.run(move || TcpListener::bind(addr))?
            .map_err(|e| LabError::io(format!("binding {addr} in {}", self.name), e))
    }

    /// A blocking TCP connection from this namespace to `addr`.
    ///
    /// Errors of the lab itself (namespace gone) come back as
    /// [`io::ErrorKind::Other`]; connect errors keep their kind
    /// (e.g. [`io::ErrorKind::ConnectionRefused`]).
    ///
    /// A connect interrupted by a signal (`EINTR`: `connect_timeout` polls,
    /// and poll is never restarted) is tried again within `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(move || {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted && !left.is_zero() => {}
                    other => return other,
                }
            }
        })
        .map_err(io::Error::other)?
    }

    /// An unconnected tokio TCP socket created in this namespace (IPv4), for
    /// async clients: `lab.client().tcp_socket_v4()?.connect(addr).await`.
    pub fn tcp_socket_v4(&self) -> Result<tokio::net::TcpSocket, LabError> {
        self.run(tokio::net::TcpSocket::new_v4)?
            .map_err(|e| LabError::io(format!("creating a TCP socket in {}", self.name), e))
    }

    /// A UDP socket bound to `addr` in this namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> Result<UdpSocket, LabError> {
        self.run(move || UdpSocket::bind(addr))?
            .map_err(|e| LabError::io(format!("binding UDP {addr} in {}", self.name), e))
    }

    /// Keys of an nftables set or map in this namespace, each as the list of
    /// its (concatenated) components as nft prints them in JSON, e.g.
    /// `["10.96.0.10", "tcp", 80]`. `kind` is `"set"` or `"map"`.
    pub fn nft_keys(
        &self,
        kind: &str,
        family: &str,
        table: &str,
        name: &str,
    ) -> Result<Vec<Vec<serde_json::Value>>, LabError> {
        let out = self.output("nft", ["-j", "list", kind, family, table, name])?;
        let command = format!("nft -j list {kind} {family} {table} {name}");
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| LabError::Parse {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        nft_keys_from_json(&json, kind).ok_or(LabError::Parse {
            command,
            detail: format!("no {kind} object in the output"),
        })
    }
}

/// Extracts element keys from `nft -j list set|map` output. Returns `None` if
/// the output holds no set/map object.
fn nft_keys_from_json(json: &serde_json::Value, kind: &str) -> Option<Vec<Vec<serde_json::Value>>> {
    use serde_json::Value;
    fn key_parts(key: &Value) -> Vec<Value> {
        match key {
            // {"elem": {"val": KEY, "timeout": ..}} when elements carry options
            Value::Object(o) if o.contains_key("elem") => o
                .get("elem")
                .and_then(|e| e.get("val"))
                .map(key_parts)
                .unwrap_or_default(),
            Value::Object(o) if o.contains_key("concat") => match o.get("concat") {
                Some(Value::Array(parts)) => parts.clone(),
                _ => Vec::new(),
            },
            other => vec![other.clone()],
        }
    }
    let objects = json.get("nftables")?.as_array()?;
    let object = objects.iter().find_map(|o| o.get(kind))?;
    let elems = match object.get("elem") {
        Some(Value::Array(elems)) => elems.as_slice(),
        _ => &[],
    };
    Some(
        elems
            .iter()
            .map(|e| match (kind, e) {
                // map elements are [key, value]
                ("map", Value::Array(kv)) if kv.len() == 2 => key_parts(&kv[0]),
                _ => key_parts(e),
            })
            .collect(),
    )
}

/// A child process started with [`Netns::spawn`]; SIGKILLed and reaped on
/// drop unless it already exited.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    label: String,
    status: Option<ExitStatus>,
}

impl NsChild {
    /// The child's pid (with `ip netns exec`, the program's own pid).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The exit status, if it has exited (does not block).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LabError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| LabError::io(format!("waiting for `{}`", self.label), e))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the child, unless it already exited and was reaped.
    pub fn signal(&mut self, signal: Signal) -> Result<(), LabError> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id();
        let raw = i32::try_from(pid)
            .map_err(|_| LabError::Invalid(format!("pid {pid} does not fit in pid_t")))?;
        nix::sys::signal::kill(Pid::from_raw(raw), signal).map_err(|source| LabError::Signal {
            signal,
            pid,
            source,
        })
    }

    /// SIGTERM, then wait up to `grace`; SIGKILL if it is still running.
    /// Returns the exit status and whether the grace period was enough.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool), LabError> {
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok((status, true));
        }
        self.signal(Signal::SIGKILL)?;
        match self.wait_timeout(Duration::from_secs(5))? {
            Some(status) => Ok((status, false)),
            None => Err(LabError::Invalid(format!(
                "`{}` survived SIGKILL for 5 s",
                self.label
            ))),
        }
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.wait_timeout(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sanitized() {
        assert_eq!(sanitize_tag("Round Robin!"), "round-robin");
        assert_eq!(sanitize_tag("---"), "lab");
        assert_eq!(sanitize_tag(""), "lab");
        assert_eq!(sanitize_tag(&"x".repeat(100)).len(), MAX_TAG_LEN);
    }

    #[test]
    fn prefix_encodes_the_owner_pid() {
        let p = lab_prefix(4242, 7, "least conn");
        assert_eq!(p, "ku-4242-7-least-conn");
        assert_eq!(owner_pid(&format!("{p}-node")), Some(4242));
        assert_eq!(owner_pid("ku-abc-1-x-node"), None);
        assert_eq!(owner_pid("ku-12-x"), None);
        assert_eq!(owner_pid("other-12-1-x-node"), None);
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(backend_addr(0), Ipv4Addr::new(10, 200, 1, 10));
        assert_eq!(
            backend_addr(MAX_BACKENDS - 1),
            Ipv4Addr::new(10, 200, 1, 254)
        );
    }

    #[test]
    fn nft_map_and_set_keys_are_parsed() {
        let map: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip",
            "name": "service-ports", "table": "kube-uproxy", "type": ["ipv4_addr", "inet_proto",
            "inet_service"], "handle": 1, "map": "inet_service",
            "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, 20080]]}}]}"#,
        )
        .expect("valid json");
        let keys = nft_keys_from_json(&map, "map").expect("map present");
        assert_eq!(
            keys,
            vec![vec![
                serde_json::json!("10.96.0.10"),
                serde_json::json!("tcp"),
                serde_json::json!(80)
            ]]
        );

        let set: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "no-endpoints",
            "elem": [{"concat": ["10.96.0.12", "tcp", 80]},
                     {"elem": {"val": {"concat": ["10.96.0.13", "udp", 53]}, "timeout": 5}}]}}]}"#,
        )
        .expect("valid json");
        let keys = nft_keys_from_json(&set, "set").expect("set present");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1][0], serde_json::json!("10.96.0.13"));

        let empty: serde_json::Value =
            serde_json::from_str(r#"{"nftables": [{"set": {"name": "s"}}]}"#).expect("json");
        assert_eq!(nft_keys_from_json(&empty, "set"), Some(vec![]));
        assert_eq!(nft_keys_from_json(&empty, "map"), None);
    }

    /// Root tests: topology, namespace threads, children, cleanup.
    mod root {
        use super::*;
        use std::io::{Read, Write};

        fn read_greeting(s: &mut TcpStream) -> String {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while buf.len() < 256 {
                let read = loop {
                    match s.read(&mut byte) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                match read.expect("read greeting") {
                    0 => break,
                    _ if byte[0] == b'\n' => break,
                    _ => buf.push(byte[0]),
                }
            }
            String::from_utf8(buf).expect("utf8")
        }

        #[test]
        fn lab_routes_client_node_backends_and_cleans_up() {
            if !require_root_and_nft("lab::root::lab_routes_client_node_backends_and_cleans_up") {
                return;
            }
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let names;
            {
                let lab = Lab::new("unit topo", 2).expect("lab");
                names = lab.namespace_names();
                assert_eq!(names.len(), 4);
                for n in &names {
                    assert!(Path::new(NETNS_RUN_DIR).join(n).exists(), "{n} missing");
                }
                let _servers: Vec<_> = (0..2)
                    .map(|i| {
                        let l = lab.backends()[i]
                            .tcp_listener("0.0.0.0:8080".parse().expect("addr"))
                            .expect("listener");
                        let _g = rt.enter();
                        peers::whoami(l, &format!("backend{i}")).expect("whoami")
                    })
                    .collect();
                // client -> backend via the node, and node -> backend
                for (ns, who) in [(lab.client(), "client"), (lab.node(), "node")] {
                    for i in 0..2 {
                        let addr = SocketAddr::from((backend_addr(i), 8080));
                        let mut s = ns
                            .tcp_connect(addr, Duration::from_secs(5))
                            .unwrap_or_else(|e| panic!("{who} -> {addr}: {e}"));
                        assert_eq!(read_greeting(&mut s), format!("backend{i}"));
                        // whoami echoes after the greeting
                        s.write_all(b"ping\n").expect("write");
                        assert_eq!(read_greeting(&mut s), "ping");
                    }
                }
                // the backend sees the client's real address (no NAT in the lab)
                let l = lab.backends()[0]
                    .tcp_listener("0.0.0.0:9000".parse().expect("addr"))
                    .expect("listener");
                let _c = lab
                    .client()
                    .tcp_connect(
                        SocketAddr::from((backend_addr(0), 9000)),
                        Duration::from_secs(5),
                    )
                    .expect("connect");
                let (_s, peer) = l.accept().expect("accept");
                assert_eq!(peer.ip(), CLIENT_ADDR);
                let fwd = lab
                    .node()
                    .output("cat", ["/proc/sys/net/ipv4/ip_forward"])
                    .expect("cat");
                assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
            }
            for n in &names {
                assert!(
                    !Path::new(NETNS_RUN_DIR).join(n).exists(),
                    "{n} left behind"
                );
            }
        }

        #[test]
        fn cluster_ip_redirect_works_from_client_and_node() {
            if !require_root_and_nft("lab::root::cluster_ip_redirect_works_from_client_and_node") {
                return;
            }
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let lab = Lab::new("unit redirect", 0).expect("lab");
            let rules = "table ip t {
  map svc { type ipv4_addr . inet_proto . inet_service : inet_service; elements = { 10.96.0.10 . tcp . 80 : 20080 }; }
  chain pre {
    type nat hook prerouting priority dstnat;
    meta l4proto { tcp, udp } redirect to ip daddr . meta l4proto . th dport map @svc
  }
  chain out {
    type nat hook output priority -100;
    meta l4proto { tcp, udp } redirect to ip daddr . meta l4proto . th dport map @svc
  }
}
";
            let path = std::env::temp_dir().join(format!("{}-rules.nft", lab.prefix()));
            std::fs::write(&path, rules).expect("write rules");
            let res = lab
                .node()
                .output("nft", [OsStr::new("-f"), path.as_os_str()]);
            let _ = std::fs::remove_file(&path);
            res.expect("nft -f");
            let l = lab
                .node()
                .tcp_listener("0.0.0.0:20080".parse().expect("addr"))
                .expect("listener");
            let server = {
                let _g = rt.enter();
                peers::whoami(l, "proxy").expect("whoami")
            };
            let vip = SocketAddr::from(([10, 96, 0, 10], 80));
            for ns in [lab.client(), lab.node()] {
                let mut s = ns
                    .tcp_connect(vip, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("{} -> {vip}: {e}", ns.name()));
                assert_eq!(read_greeting(&mut s), "proxy");
            }
            assert_eq!(server.accepted(), 2);
            let keys = lab.node().nft_keys("map", "ip", "t", "svc").expect("keys");
            assert_eq!(keys.len(), 1);
            assert_eq!(keys[0][0], serde_json::json!("10.96.0.10"));
        }

        #[test]
        fn children_and_leftover_processes_are_killed() {
            if !require_root_and_nft("lab::root::children_and_leftover_processes_are_killed") {
                return;
            }
            let lab = Lab::new("unit procs", 1).expect("lab");
            let mut cmd = lab.node().command("sleep");
            cmd.arg("30").stdout(Stdio::null()).stderr(Stdio::null());
            let mut child = lab.node().spawn(cmd).expect("spawn");
            let pid = child.id();
            assert_eq!(child.try_wait().expect("try_wait"), None);
            let (status, graceful) = child.terminate(Duration::from_secs(5)).expect("terminate");
            assert!(graceful);
            assert!(!status.success());
            drop(child);
            assert!(!Path::new(&format!("/proc/{pid}")).exists());

            // a process not owned by any handle is killed when the lab drops
            let mut cmd = lab.backends()[0].command("sleep");
            cmd.arg("30").stdout(Stdio::null()).stderr(Stdio::null());
            let orphan = cmd.spawn().expect("spawn");
            let orphan_pid = orphan.id();
            std::mem::forget(orphan);
            let names = lab.namespace_names();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !netns_pids(&names[2]).contains(&(orphan_pid as i32)) {
                assert!(
                    Instant::now() < deadline,
                    "sleep never showed up in the namespace"
                );
                thread::sleep(Duration::from_millis(10));
            }
            drop(lab);
            // killed (a zombie until reaped: check its state, then reap it)
            let stat =
                std::fs::read_to_string(format!("/proc/{orphan_pid}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty() || stat.contains(") Z"),
                "still running: {stat}"
            );
            let _ = nix::sys::wait::waitpid(Pid::from_raw(orphan_pid as i32), None);
            for n in &names {
                assert!(
                    !Path::new(NETNS_RUN_DIR).join(n).exists(),
                    "{n} left behind"
                );
            }
        }

        #[test]
        fn run_enters_the_namespace_and_propagates_panics() {
            if !require_root_and_nft("lab::root::run_enters_the_namespace_and_propagates_panics") {
                return;
            }
            let lab = Lab::new("unit run", 0).expect("lab");
            let root_ns = std::fs::read_link("/proc/thread-self/ns/net").expect("readlink");
            let inside = lab
                .node()
                .run(|| std::fs::read_link("/proc/thread-self/ns/net"))
                .expect("run")
                .expect("readlink");
            assert_ne!(root_ns, inside);
            // borrowing from the caller works, results come back
            let v = [1, 2, 3];
            assert_eq!(lab.client().run(|| v.iter().sum::<i32>()).expect("run"), 6);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = lab.client().run(|| panic!("boom"));
            }));
            assert!(r.is_err());
        }
    }
}
