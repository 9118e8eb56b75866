//! End-to-end TCP tests of the `kube-uproxy` binary (docs/CONTRACT.md).
//!
//! Each test builds its own network-namespace [`Lab`] (client → node →
//! backends), starts whoami / sha256 servers in the backend namespaces, runs
//! the real binary in the node namespace with `--manifests <file>` and connects
//! from the client (or node) namespace to a ClusterIP. Readiness is detected by
//! polling the nft map/set named in the contract inside the node namespace.
//! Everything is bounded in time; on failure the proxy's stderr is printed.
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set). Set `KU_E2E_SHOW_LOGS=1` (with `--nocapture`) to see
//! the proxy's stderr of passing tests too.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kube_uproxy::lab::peers::{self, PeerHandle};
use kube_uproxy::lab::{self, Lab, Netns, NsChild, backend_addr};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_kube-uproxy");
const PORT_RANGE: &str = "20000-20999";
const SVC_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Bound for "the proxy programmed the rules" / "the change was picked up".
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

static ENV_COUNTER: AtomicU32 = AtomicU32::new(0);
static RESOURCE_VERSION: AtomicU64 = AtomicU64::new(1000);

fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, SVC_PORT))
}

fn backend_name(i: usize) -> String {
    format!("backend{i}")
}

// ---------------------------------------------------------------------------
// Manifests, as `kubectl get svc,endpointslices -o yaml` prints them.

#[derive(Clone, Debug)]
struct Ep {
    ip: Ipv4Addr,
    pod: String,
    ready: bool,
}

fn ep(i: usize) -> Ep {
    Ep {
        ip: backend_addr(i),
        pod: format!("web-{i}"),
        ready: true,
    }
}

#[derive(Clone, Debug)]
struct Svc {
    name: &'static str,
    ip: Ipv4Addr,
    /// `None`: an unnamed port (EndpointSlice port `name: ""`).
    port_name: Option<&'static str>,
    algorithm: Option<&'static str>,
    /// `None`: no EndpointSlice at all; `Some(empty)`: `endpoints: null`.
    endpoints: Option<Vec<Ep>>,
}

fn svc(name: &'static str, ip: Ipv4Addr, endpoints: Vec<Ep>) -> Svc {
    Svc {
        name,
        ip,
        port_name: None,
        algorithm: None,
        endpoints: Some(endpoints),
    }
}

fn uid(name: &str, kind: u32) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        kind,
        h & 0xfff,
        (h >> 12) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

fn next_rv() -> u64 {
    RESOURCE_VERSION.fetch_add(1, Ordering::Relaxed)
}

fn service_yaml(s: &Svc) -> String {
    let annotations = match s.algorithm {
        Some(a) => format!("    annotations:\n      kube-uproxy.io/lb-algorithm: {a}\n"),
        None => String::new(),
    };
    let port_name = match s.port_name {
        Some(n) => format!("    - name: {n}\n      port: {SVC_PORT}\n"),
        None => format!("    - port: {SVC_PORT}\n"),
    };
    format!(
        "- apiVersion: v1
  kind: Service
  metadata:
{annotations}    creationTimestamp: \"2025-01-01T00:00:00Z\"
    labels:
      app: {name}
    name: {name}
    namespace: default
    resourceVersion: \"{rv}\"
    uid: {uid}
  spec:
    clusterIP: {ip}
    clusterIPs:
    - {ip}
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
{port_name}      protocol: TCP
      targetPort: {BACKEND_PORT}
    selector:
      app: {name}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {{}}
",
        name = s.name,
        ip = s.ip,
        rv = next_rv(),
        uid = uid(s.name, 1),
    )
}

fn slice_yaml(s: &Svc, endpoints: &[Ep]) -> String {
    let mut eps = String::new();
    if endpoints.is_empty() {
        eps.push_str("  endpoints: null\n");
    } else {
        eps.push_str("  endpoints:\n");
        for e in endpoints {
            eps.push_str(&format!(
                "  - addresses:
    - {ip}
    conditions:
      ready: {ready}
      serving: {ready}
      terminating: false
    nodeName: node-1
    targetRef:
      kind: Pod
      name: {pod}
      namespace: default
      uid: {puid}
",
                ip = e.ip,
                ready = e.ready,
                pod = e.pod,
                puid = uid(&e.pod, 3),
            ));
        }
    }
    let port_name = s.port_name.unwrap_or("\"\"");
    format!(
        "- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
{eps}  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: \"2025-01-01T00:00:00Z\"
    creationTimestamp: \"2025-01-01T00:00:00Z\"
    generateName: {name}-
    generation: 1
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: {name}
    name: {name}-x7k2p
    namespace: default
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: {name}
      uid: {svc_uid}
    resourceVersion: \"{rv}\"
    uid: {uid}
  ports:
  - name: {port_name}
    port: {BACKEND_PORT}
    protocol: TCP
",
        name = s.name,
        svc_uid = uid(s.name, 1),
        rv = next_rv(),
        uid = uid(s.name, 2),
    )
}

/// A `kind: List` with each Service followed by its EndpointSlice.
fn manifests(services: &[Svc]) -> String {
    let mut out = String::from("apiVersion: v1\nitems:\n");
    for s in services {
        out.push_str(&service_yaml(s));
        if let Some(eps) = &s.endpoints {
            out.push_str(&slice_yaml(s, eps));
        }
    }
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}

// ---------------------------------------------------------------------------
// The proxy process.

struct Proxy {
    child: NsChild,
    dir: PathBuf,
    manifests: PathBuf,
    stderr: PathBuf,
}

impl Proxy {
    fn start(node: &Netns, dir: &Path, yaml: &str) -> Proxy {
        let manifests = dir.join("manifests.yaml");
        fs::write(&manifests, yaml).expect("writing the manifests file");
        let stderr = dir.join("kube-uproxy.stderr");
        let log = File::create(&stderr).expect("creating the proxy log file");
        let log2 = log.try_clone().expect("cloning the log file handle");
        let mut cmd = node.command(BIN);
        cmd.arg("--manifests")
            .arg(&manifests)
            .args(["--proxy-port-range", PORT_RANGE, "-v"])
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log);
        let child = node
            .spawn(cmd)
            .expect("spawning kube-uproxy in the node namespace");
        Proxy {
            child,
            dir: dir.to_path_buf(),
            manifests,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_else(|e| format!("<cannot read: {e}>"))
    }

    /// Panics (with the exit status) if the proxy is no longer running.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait on the proxy") {
            panic!("kube-uproxy exited ({status}) during: {what}");
        }
    }

    /// Rewrites the manifests file in place (truncate + write), like `kubectl get -o yaml > f`.
    fn write_in_place(&self, yaml: &str) {
        let mut f = File::create(&self.manifests).expect("truncating the manifests file");
        f.write_all(yaml.as_bytes())
            .expect("writing the manifests file");
        f.sync_all().expect("syncing the manifests file");
    }

    /// Replaces the manifests file atomically (write a temp file, rename over).
    fn write_by_rename(&self, yaml: &str) {
        let tmp = self.dir.join(".manifests.yaml.tmp");
        fs::write(&tmp, yaml).expect("writing the temporary manifests file");
        fs::rename(&tmp, &self.manifests).expect("renaming over the manifests file");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("KU_E2E_SHOW_LOGS").is_some() {
            eprintln!(
                "===== kube-uproxy stderr ({}) =====\n{}\n===== end of kube-uproxy stderr =====",
                self.stderr.display(),
                self.stderr()
            );
            eprintln!(
                "===== manifests ({}) =====\n{}",
                self.manifests.display(),
                fs::read_to_string(&self.manifests).unwrap_or_default()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// One test environment: lab + backend servers + proxy.

struct Env {
    // Fields drop in this order: proxy, servers, runtime, lab (namespaces).
    proxy: Option<Proxy>,
    servers: Vec<PeerHandle>,
    _rt: tokio::runtime::Runtime,
    lab: Lab,
    dir: PathBuf,
}

enum Backend {
    Whoami,
    Sha256,
}

impl Env {
    fn new(tag: &str, backends: &[Backend]) -> Env {
        let lab = Lab::new(tag, backends.len()).expect("building the namespace lab");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut servers = Vec::new();
        for (i, kind) in backends.iter().enumerate() {
            let listener = lab.backends()[i]
                .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                .expect("backend listener");
            let _guard = rt.enter();
            let server = match kind {
                Backend::Whoami => peers::whoami(listener, &backend_name(i)),
                Backend::Sha256 => peers::sha256(listener),
            };
            servers.push(server.expect("starting a backend server"));
        }
        let dir = std::env::temp_dir().join(format!(
            "kube-uproxy-e2e-{}-{}-{tag}",
            std::process::id(),
            ENV_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("creating the test directory");
        Env {
            proxy: None,
            servers,
            _rt: rt,
            lab,
            dir,
        }
    }

    fn start_proxy(&mut self, yaml: &str) {
        self.proxy = Some(Proxy::start(self.lab.node(), &self.dir, yaml));
    }

    fn proxy(&mut self) -> &mut Proxy {
        self.proxy.as_mut().expect("proxy started")
    }

    fn client(&self) -> &Netns {
        self.lab.client()
    }

    /// Waits until `ip . tcp . 80` is an element of the contract's set/map
    /// (`kind` "map" service-ports or "set" no-endpoints) in the node ns.
    fn wait_nft_key(&mut self, kind: &str, name: &str, ip: Ipv4Addr, present: bool, why: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.proxy().assert_running(why);
            let last = match self.lab.node().nft_keys(kind, "ip", "kube-uproxy", name) {
                Ok(keys) => {
                    let found = keys.iter().any(|k| is_tcp_key(k, ip, SVC_PORT));
                    if found == present {
                        return;
                    }
                    format!("{kind} {name} keys: {keys:?}")
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                panic!(
                    "{why}: {ip} tcp {SVC_PORT} {} in nft {kind} `{name}` after {:?}; last: {last}",
                    if present {
                        "never appeared"
                    } else {
                        "still present"
                    },
                    READY_TIMEOUT
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_service(&mut self, ip: Ipv4Addr, why: &str) {
        self.wait_nft_key("map", "service-ports", ip, true, why);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            drop(proxy);
        }
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn is_tcp_key(key: &[serde_json::Value], ip: Ipv4Addr, port: u16) -> bool {
    let ip_ok = key.first().and_then(|v| v.as_str()) == Some(ip.to_string().as_str());
    let proto_ok = key
        .iter()
        .any(|v| v.as_str() == Some("tcp") || v.as_u64() == Some(6));
    let port_ok = key.last().and_then(|v| v.as_u64()) == Some(u64::from(port));
    ip_ok && proto_ok && port_ok
}

// ---------------------------------------------------------------------------
// Client helpers (blocking std sockets created in a namespace).

fn connect(ns: &Netns, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.tcp_connect(addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads one `\n`-terminated line (at most 256 bytes), without over-reading.
fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 256 {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Opens a connection and reads the whoami greeting; keeps it open.
fn hold(ns: &Netns, addr: SocketAddr) -> io::Result<(TcpStream, String)> {
    let mut s = connect(ns, addr)?;
    let name = read_line(&mut s)?;
    Ok((s, name))
}

/// Closes a whoami connection cleanly: half-close, then read to EOF.
fn close(mut s: TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Which backend answers a new connection (closed afterwards).
fn who(ns: &Netns, addr: SocketAddr) -> io::Result<String> {
    let (s, name) = hold(ns, addr)?;
    close(s);
    Ok(name)
}

fn who_or_panic(ns: &Netns, addr: SocketAddr, what: &str) -> String {
    who(ns, addr).unwrap_or_else(|e| panic!("{what}: connection to {addr} from {}: {e}", ns.name()))
}

/// Round trip on a held whoami connection.
fn assert_echo(s: &mut TcpStream, msg: &str, what: &str) {
    s.write_all(format!("{msg}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let back = read_line(s).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(back, msg, "{what}: echo mismatch");
}

/// splitmix64: deterministic test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn wait_exit(child: &mut NsChild, timeout: Duration) -> Option<ExitStatus> {
    child
        .wait_timeout(timeout)
        .expect("waiting for kube-uproxy")
}

fn nft_table_exists(node: &Netns) -> bool {
    node.output("nft", ["list", "table", "ip", "kube-uproxy"])
        .is_ok()
}

// ---------------------------------------------------------------------------
// 1. round-robin

#[test]
fn round_robin_alternates_between_two_backends() {
    if !lab::require_root_and_nft("round_robin_alternates_between_two_backends") {
        return;
    }
    let mut env = Env::new("rr", &[Backend::Whoami, Backend::Whoami]);
    let mut s = svc("web", VIP_A, vec![ep(0), ep(1)]);
    s.algorithm = Some("round-robin");
    env.start_proxy(&manifests(&[s]));
    env.wait_service(VIP_A, "waiting for the service to be programmed");

    let seq: Vec<String> = (0..20)
        .map(|i| who_or_panic(env.client(), vip(VIP_A), &format!("connection {i}")))
        .collect();
    let on = |b: usize| seq.iter().filter(|n| **n == backend_name(b)).count();
    assert_eq!(
        (on(0), on(1)),
        (10, 10),
        "20 sequential connections with round-robin over 2 endpoints must split 10/10; got {seq:?}"
    );
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "round-robin over 2 endpoints must alternate: {seq:?}"
    );
    assert_eq!(
        (env.servers[0].accepted(), env.servers[1].accepted()),
        (10, 10),
        "backend-side accept counts"
    );
}

// ---------------------------------------------------------------------------
// 2. least-connections

#[test]
fn least_connections_prefers_the_less_loaded_backend() {
    if !lab::require_root_and_nft("least_connections_prefers_the_less_loaded_backend") {
        return;
    }
    let mut env = Env::new("lc", &[Backend::Whoami, Backend::Whoami]);
    let mut s = svc("web", VIP_A, vec![ep(0), ep(1)]);
    s.algorithm = Some("least-connections");
    env.start_proxy(&manifests(&[s]));
    env.wait_service(VIP_A, "waiting for the service to be programmed");

    // Four held connections: with least-connections (and with round-robin)
    // they split 2/2 (c1 -> X, c2 -> Y, c3/c4 one each).
    let mut held: Vec<(TcpStream, String)> = (0..4)
        .map(|i| {
            hold(env.client(), vip(VIP_A)).unwrap_or_else(|e| panic!("held connection {i}: {e}"))
        })
        .collect();
    let names: Vec<String> = held.iter().map(|(_, n)| n.clone()).collect();
    let x = names[0].clone();
    let y = names[1].clone();
    assert_ne!(
        x, y,
        "the 2nd connection must go to the other (idle) backend: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == x).count(),
        2,
        "4 held connections must split 2/2: {names:?}"
    );

    // Close every connection on Y: X keeps 2 open, Y has 0.
    let yi: usize = y
        .trim_start_matches("backend")
        .parse()
        .expect("backend index");
    let (to_close, kept): (Vec<_>, Vec<_>) = held.drain(..).partition(|(_, n)| *n == y);
    for (s, _) in to_close {
        close(s);
    }
    assert!(
        env.servers[yi].wait_open(0, IO_TIMEOUT),
        "{y} still has {} open connections after the client closed them",
        env.servers[yi].open()
    );
    // The proxy notices the end of a flow just after the backend closes.
    thread::sleep(Duration::from_millis(300));

    // Round-robin would now pick X (5th connection = same as the 1st);
    // least-connections must pick Y (0 open) and again Y (1 open vs 2).
    let (c5, n5) = hold(env.client(), vip(VIP_A)).expect("5th connection");
    assert_eq!(
        n5, y,
        "least-connections: {x} has 2 open flows, {y} has 0, the new connection must go to {y} (round-robin would pick {x})"
    );
    let (c6, n6) = hold(env.client(), vip(VIP_A)).expect("6th connection");
    assert_eq!(
        n6, y,
        "least-connections: {x} has 2 open flows, {y} has 1, the new connection must go to {y}"
    );
    // The held connections on X still work.
    for (mut s, n) in kept {
        assert_eq!(n, x);
        assert_echo(&mut s, "still-alive", "held connection on X");
        close(s);
    }
    close(c5);
    close(c6);
}

// ---------------------------------------------------------------------------
// 3. endpoint becomes not ready

#[test]
fn not_ready_endpoint_gets_no_new_connections_but_keeps_open_ones() {
    if !lab::require_root_and_nft("not_ready_endpoint_gets_no_new_connections_but_keeps_open_ones")
    {
        return;
    }
    let mut env = Env::new("notready", &[Backend::Whoami, Backend::Whoami]);
    // round-robin, so that before the change new connections alternate.
    let mut s = svc("web", VIP_A, vec![ep(0), ep(1)]);
    s.algorithm = Some("round-robin");
    env.start_proxy(&manifests(std::slice::from_ref(&s)));
    env.wait_service(VIP_A, "waiting for the service to be programmed");

    // Hold one connection that landed on backend1.
    let mut held = None;
    for i in 0..4 {
        let (c, name) =
            hold(env.client(), vip(VIP_A)).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        if name == backend_name(1) {
            held = Some(c);
            break;
        }
        close(c);
    }
    let mut held = held.expect("no connection reached backend1 in 4 tries (round-robin over 2)");

    // backend1 turns not ready (ready: false, serving: false).
    let mut eps = vec![ep(0), ep(1)];
    eps[1].ready = false;
    s.endpoints = Some(eps);
    env.proxy().write_by_rename(&manifests(&[s]));

    // Wait until the change is applied: with round-robin over 2 ready
    // endpoints two consecutive connections never hit the same backend, so 6
    // in a row on backend0 means backend1 was removed.
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut streak = 0;
    let mut seen = Vec::new();
    while streak < 6 {
        env.proxy()
            .assert_running("waiting for the not-ready change");
        assert!(
            Instant::now() < deadline && seen.len() < 2000,
            "backend1 marked not ready but new connections still reach it after {READY_TIMEOUT:?}; last backends: {:?}",
            &seen[seen.len().saturating_sub(12)..]
        );
        let n = who(env.client(), vip(VIP_A))
            .unwrap_or_else(|e| panic!("connection while backend0 is still ready failed: {e}"));
        streak = if n == backend_name(0) { streak + 1 } else { 0 };
        seen.push(n);
    }
    let before = env.servers[1].accepted();
    let seq: Vec<String> = (0..10)
        .map(|i| {
            who_or_panic(
                env.client(),
                vip(VIP_A),
                &format!("after not-ready, connection {i}"),
            )
        })
        .collect();
    assert!(
        seq.iter().all(|n| *n == backend_name(0)),
        "new connections must only go to the ready backend0: {seq:?}"
    );
    assert_eq!(
        env.servers[1].accepted(),
        before,
        "backend1 accepted new connections"
    );

    // The connection opened before the change still works both ways.
    assert_echo(
        &mut held,
        "still-open",
        "connection to backend1 opened before it became not ready",
    );
    assert_eq!(env.servers[1].open(), 1, "backend1 open connections");
    close(held);
}

// ---------------------------------------------------------------------------
// 4. no endpoints -> refused

#[test]
fn service_without_endpoints_refuses_connections() {
    if !lab::require_root_and_nft("service_without_endpoints_refuses_connections") {
        return;
    }
    let mut env = Env::new("noep", &[]);
    // A: an EndpointSlice with `endpoints: null`; B: no EndpointSlice at all.
    let a = svc("empty", VIP_A, vec![]);
    let mut b = svc("sliceless", VIP_B, vec![]);
    b.endpoints = None;
    env.start_proxy(&manifests(&[a, b]));
    env.wait_nft_key(
        "set",
        "no-endpoints",
        VIP_A,
        true,
        "service with an empty EndpointSlice (endpoints: null) not in the no-endpoints set",
    );
    env.wait_nft_key(
        "set",
        "no-endpoints",
        VIP_B,
        true,
        "service without any EndpointSlice not in the no-endpoints set",
    );

    for (ns, who) in [
        (env.lab.client().clone(), "client"),
        (env.lab.node().clone(), "node"),
    ] {
        for ip in [VIP_A, VIP_B] {
            match connect(&ns, vip(ip)) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => panic!(
                    "{who} -> {ip}:{SVC_PORT} without endpoints: expected ECONNREFUSED, got {e} ({:?})",
                    e.kind()
                ),
                Ok(mut s) => {
                    let mut buf = [0u8; 1];
                    let r = s.read(&mut buf);
                    panic!(
                        "{who} -> {ip}:{SVC_PORT} without endpoints: connect succeeded \
                         (accept-then-close instead of reject); read afterwards: {r:?}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 5. 50 MB upload with half-close

#[test]
fn upload_50mb_with_half_close_is_intact() {
    if !lab::require_root_and_nft("upload_50mb_with_half_close_is_intact") {
        return;
    }
    let mut env = Env::new("sha", &[Backend::Sha256]);
    env.start_proxy(&manifests(&[svc("sha", VIP_A, vec![ep(0)])]));
    env.wait_service(VIP_A, "waiting for the service to be programmed");

    const TOTAL: usize = 50 * 1024 * 1024;
    let mut s = connect(env.client(), vip(VIP_A)).expect("connecting to the sha256 service");
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("write timeout");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut rng = SplitMix64(0x6b75_6265_7570_7278);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < TOTAL {
        let n = buf.len().min(TOTAL - sent);
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        s.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("upload failed after {sent} bytes: {e}"));
        sent += n;
    }
    s.shutdown(Shutdown::Write)
        .expect("half-close (shutdown write)");
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .unwrap_or_else(|e| panic!("reading the digest after half-close: {e} (got {reply:?})"));
    let expected = format!("{}\n", peers::hex(&hasher.finalize()));
    eprintln!(
        "50 MiB upload + digest through the proxy: {:?}",
        started.elapsed()
    );
    assert_eq!(
        reply, expected,
        "digest from the backend (after our half-close) differs from the digest of the {TOTAL} bytes sent"
    );
    assert_eq!(env.servers[0].accepted(), 1, "backend connections");
}

// ---------------------------------------------------------------------------
// 6. the node itself reaches the ClusterIP (nft output hook)

#[test]
fn node_reaches_cluster_ip() {
    if !lab::require_root_and_nft("node_reaches_cluster_ip") {
        return;
    }
    let mut env = Env::new("node", &[Backend::Whoami]);
    env.start_proxy(&manifests(&[svc("web", VIP_A, vec![ep(0)])]));
    env.wait_service(VIP_A, "waiting for the service to be programmed");

    let node = env.lab.node().clone();
    let (mut s, name) = hold(&node, vip(VIP_A))
        .unwrap_or_else(|e| panic!("node -> {VIP_A}:{SVC_PORT} (output hook): {e}"));
    assert_eq!(name, backend_name(0));
    assert_echo(
        &mut s,
        "from-the-node",
        "node connection through the ClusterIP",
    );
    close(s);
}

// ---------------------------------------------------------------------------
// 7. manifests edits are picked up while running

#[test]
fn manifest_edits_are_picked_up() {
    if !lab::require_root_and_nft("manifest_edits_are_picked_up") {
        return;
    }
    let mut env = Env::new("edit", &[Backend::Whoami, Backend::Whoami]);
    let a0 = svc("web", VIP_A, vec![ep(0)]);
    env.start_proxy(&manifests(std::slice::from_ref(&a0)));
    env.wait_service(VIP_A, "waiting for the service to be programmed");
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "initial service"),
        backend_name(0)
    );

    // Edit 1, in place: a new Service (named port) appears.
    let mut b = svc("api", VIP_B, vec![ep(1)]);
    b.port_name = Some("http");
    env.proxy()
        .write_in_place(&manifests(&[a0.clone(), b.clone()]));
    env.wait_service(
        VIP_B,
        "a Service added by an in-place edit of the manifests file",
    );
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_B), "added service"),
        backend_name(1)
    );
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "unchanged service"),
        backend_name(0)
    );

    // Edit 2, by rename: the first Service's endpoints move to backend1.
    let a1 = svc("web", VIP_A, vec![ep(1)]);
    env.proxy().write_by_rename(&manifests(&[a1.clone(), b]));
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = Vec::new();
    loop {
        env.proxy()
            .assert_running("waiting for the endpoint change");
        match who(env.client(), vip(VIP_A)) {
            Ok(n) if n == backend_name(1) => break,
            other => last.push(format!("{other:?}")),
        }
        assert!(
            Instant::now() < deadline && last.len() < 2000,
            "endpoints of {VIP_A} changed to backend1 by renaming a new file over the manifests, \
             but connections still do not reach it after {READY_TIMEOUT:?}; last: {:?}",
            &last[last.len().saturating_sub(5)..]
        );
        thread::sleep(Duration::from_millis(50));
    }
    for i in 0..5 {
        assert_eq!(
            who_or_panic(env.client(), vip(VIP_A), "after the endpoint change"),
            backend_name(1),
            "connection {i} after the endpoint change"
        );
    }

    // Edit 3, in place: the added Service is removed again.
    env.proxy().write_in_place(&manifests(&[a1]));
    env.wait_nft_key(
        "map",
        "service-ports",
        VIP_B,
        false,
        "a Service removed from the manifests file",
    );
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "remaining service"),
        backend_name(1)
    );
}

// ---------------------------------------------------------------------------
// 8. SIGTERM and --cleanup remove the nft table

#[test]
fn sigterm_and_cleanup_remove_the_table() {
    if !lab::require_root_and_nft("sigterm_and_cleanup_remove_the_table") {
        return;
    }
    let mut env = Env::new("term", &[Backend::Whoami]);
    env.start_proxy(&manifests(&[svc("web", VIP_A, vec![ep(0)])]));
    env.wait_service(VIP_A, "waiting for the service to be programmed");
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "before SIGTERM"),
        backend_name(0)
    );

    let proxy = env.proxy();
    proxy
        .child
        .signal(Signal::SIGTERM)
        .expect("sending SIGTERM");
    let status = wait_exit(&mut proxy.child, Duration::from_secs(15))
        .expect("kube-uproxy did not exit within 15 s of SIGTERM");
    assert!(
        status.success(),
        "exit status after SIGTERM: {status} (contract: 0)"
    );
    assert!(
        !nft_table_exists(env.lab.node()),
        "table ip kube-uproxy still exists after SIGTERM: {}",
        env.lab
            .node()
            .output("nft", ["list", "table", "ip", "kube-uproxy"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    );

    // --cleanup removes a table left behind (e.g. by a crash).
    let rules = "table ip kube-uproxy {
  map service-ports {
    type ipv4_addr . inet_proto . inet_service : inet_service
    elements = { 10.96.0.10 . tcp . 80 : 20000 }
  }
  set no-endpoints {
    type ipv4_addr . inet_proto . inet_service
  }
  chain nat-output {
    type nat hook output priority -100;
    meta l4proto { tcp, udp } redirect to ip daddr . meta l4proto . th dport map @service-ports
  }
}
";
    let rules_path = env.dir.join("leftover.nft");
    fs::write(&rules_path, rules).expect("writing the leftover rules");
    env.lab
        .node()
        .output("nft", [std::ffi::OsStr::new("-f"), rules_path.as_os_str()])
        .expect("creating a leftover kube-uproxy table");
    assert!(nft_table_exists(env.lab.node()));

    for round in ["with a leftover table", "with nothing to clean"] {
        let log_path = env.dir.join("cleanup.stderr");
        let log = File::create(&log_path).expect("cleanup log");
        let mut cmd = env.lab.node().command(BIN);
        cmd.arg("--cleanup")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let mut child = env
            .lab
            .node()
            .spawn(cmd)
            .expect("spawning kube-uproxy --cleanup");
        let status = wait_exit(&mut child, Duration::from_secs(15));
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let status =
            status.unwrap_or_else(|| panic!("--cleanup {round}: still running after 15 s\n{log}"));
        assert!(
            status.success(),
            "--cleanup {round}: exit status {status}\n{log}"
        );
        assert!(
            !nft_table_exists(env.lab.node()),
            "--cleanup {round}: table ip kube-uproxy still exists\n{log}"
        );
    }
}
