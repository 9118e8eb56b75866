//! End-to-end TCP tests of the `kube-uproxy` binary (flags in README.md, nftables layout in docs/rules.md).
//!
//! Each test builds its own network-namespace [`Lab`] (client → node →
//! backends), starts whoami / sha256 servers in the backend namespaces, runs
//! the real binary in the node namespace with `--manifests <file>` and connects
//! from the client (or node) namespace to a ClusterIP. Readiness is detected by
//! polling the nft map/set named in the contract inside the node namespace.
//! Everything is bounded in time; on failure the proxy's stderr is printed.
//! The harness shared with tests/kube_source.rs is in tests/lab/src/e2e.rs.
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set). Set `KU_E2E_SHOW_LOGS=1` (with `--nocapture`) to see
//! the proxy's stderr of passing tests too.
//!
//! [`Lab`]: uproxy_lab::Lab

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kube_uproxy::source::convert::ANNOTATION_LB_ALGORITHM;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, IO_TIMEOUT, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A,
    VIP_B, assert_echo, backend_name, bin, close, connect, hold, manifests, vip, who, who_or_panic,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, NsChild, backend_addr, peers};

// ---------------------------------------------------------------------------
// Manifests, as `kubectl get svc,endpointslices -o yaml` prints them
// (written by uproxy_lab::manifests).

/// The endpoint of backend `i` (Pod `web-<i>` on node-1), ready.
fn ep(i: usize) -> EndpointManifest {
    EndpointManifest {
        node_name: Some("node-1".to_string()),
        pod: Some(format!("web-{i}")),
        ..EndpointManifest::ready(backend_addr(i))
    }
}

/// Service `name` with one unnamed TCP port 80 → 8080 and a slice holding
/// `endpoints` (`vec![]`: `endpoints: null`).
fn svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints)
}

// ---------------------------------------------------------------------------
// The proxy process, reading a manifests file.

struct Proxy {
    process: ProxyProcess,
    dir: PathBuf,
    manifests: PathBuf,
}

impl Proxy {
    fn start(bed: &Testbed, yaml: &str) -> Proxy {
        let (process, manifests) = bed.start_proxy(yaml, &[]);
        Proxy {
            process,
            dir: bed.dir.clone(),
            manifests,
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

impl Deref for Proxy {
    type Target = ProxyProcess;
    fn deref(&self) -> &ProxyProcess {
        &self.process
    }
}

impl DerefMut for Proxy {
    fn deref_mut(&mut self) -> &mut ProxyProcess {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------
// One test environment: lab + backend servers (the [`Testbed`], which `Env`
// derefs to) + proxy.

struct Env {
    // Fields drop in this order: proxy, then the testbed (servers, runtime,
    // lab).
    proxy: Option<Proxy>,
    bed: Testbed,
}

impl Env {
    fn new(tag: &str, backends: &[Backend]) -> Env {
        Env {
            proxy: None,
            bed: Testbed::new("e2e", tag, backends),
        }
    }

    fn start_proxy(&mut self, yaml: &str) {
        self.proxy = Some(Proxy::start(&self.bed, yaml));
    }

    fn start_proxy_with(&mut self, yaml: &str, extra: &[&str]) {
        let (process, manifests) = self.bed.start_proxy(yaml, extra);
        self.proxy = Some(Proxy {
            process,
            dir: self.bed.dir.clone(),
            manifests,
        });
    }

    fn proxy(&mut self) -> &mut Proxy {
        self.proxy.as_mut().expect("proxy started")
    }

    /// Waits until `ip . tcp . 80` is an element of the contract's set/map
    /// (`kind` "map" service-ports or "set" no-endpoints) in the node ns.
    fn wait_nft_key(&mut self, kind: &str, name: &str, ip: Ipv4Addr, present: bool, why: &str) {
        let proxy = self.proxy.as_mut().expect("proxy started");
        e2e::wait_nft_key(proxy, self.bed.node(), kind, name, ip, present, why);
    }

    fn wait_service(&mut self, ip: Ipv4Addr, why: &str) {
        self.wait_nft_key("map", "service-ports", ip, true, why);
    }
}

impl Deref for Env {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.bed
    }
}

// ---------------------------------------------------------------------------
// Helpers of these tests only.

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
    s.annotations
        .insert(ANNOTATION_LB_ALGORITHM.into(), "round-robin".into());
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

/// `--data-path-threads 3`: three listening sockets share the Service
/// port's proxy port (one per thread, SO_REUSEPORT), and connections the
/// kernel spreads over them all reach the endpoints, still in
/// round-robin order (one balancer for the port).
#[test]
fn every_data_path_thread_listens_on_the_proxy_port() {
    if !lab::require_root_and_nft("every_data_path_thread_listens_on_the_proxy_port") {
        return;
    }
    let mut env = Env::new("dpt", &[Backend::Whoami, Backend::Whoami]);
    env.start_proxy_with(
        &manifests(&[svc("web", VIP_A, vec![ep(0), ep(1)])]),
        &["--data-path-threads", "3"],
    );
    env.wait_service(VIP_A, "waiting for the service to be programmed");
    let port = e2e::proxy_port_of(env.node(), VIP_A).expect("the Service's proxy port");
    let out = env
        .node()
        .output("ss", ["-Hltn", &format!("sport = :{port}")])
        .expect("ss in the node namespace");
    let listening = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        listening,
        3,
        "one listening socket per data-path thread on proxy port {port}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let seq: Vec<String> = (0..40)
        .map(|i| who_or_panic(env.client(), vip(VIP_A), &format!("connection {i}")))
        .collect();
    let on = |b: usize| seq.iter().filter(|n| **n == backend_name(b)).count();
    assert_eq!((on(0), on(1)), (20, 20), "{seq:?}");
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
    s.annotations
        .insert(ANNOTATION_LB_ALGORITHM.into(), "least-connections".into());
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
    // The proxy notices the end of a flow just after the backend closes:
    // wait for its own word that both flows to Y ended (it logs that at
    // -v once the flow no longer counts for least-connections).
    let y_endpoint = format!("{}:{BACKEND_PORT}", backend_addr(yi));
    let ended = e2e::poll(IO_TIMEOUT, Duration::from_millis(10), || {
        let n = env
            .proxy()
            .stderr()
            .lines()
            .filter(|l| {
                l.contains(&y_endpoint)
                    && (l.contains("connection closed") || l.contains("connection aborted"))
            })
            .count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} of the 2 flows to {y} logged as ended"))
        }
    });
    ended.unwrap_or_else(|e| panic!("{e}"));

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
    s.annotations
        .insert(ANNOTATION_LB_ALGORITHM.into(), "round-robin".into());
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
    eps[1].serving = false;
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
    b.ports[0].name = "http".into();
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
// 8. SIGTERM leaves the rules for the next instance; --cleanup removes them

#[test]
fn sigterm_keeps_the_table_and_cleanup_removes_it() {
    if !lab::require_root_and_nft("sigterm_keeps_the_table_and_cleanup_removes_it") {
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
        nft_table_exists(env.lab.node()),
        "table ip kube-uproxy removed on SIGTERM: the next instance would start with no rules"
    );

    // --cleanup removes a table left behind, also one of an older layout
    // (the `redirect` of earlier versions).
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
    // In place of this version's table (its chains' priorities differ, and
    // nft does not change a chain's priority in place).
    env.lab
        .node()
        .output("nft", ["delete", "table", "ip", "kube-uproxy"])
        .expect("deleting the table to replace it by an older one");
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
        let mut cmd = env.lab.node().command(bin());
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

// ---------------------------------------------------------------------------
// The README's first command: the shipped example, started as a user starts
// it (no --proxy-port-range, no -v).

#[test]
fn the_shipped_example_answers_on_its_cluster_ip_with_ports_from_the_ephemeral_range() {
    if !lab::require_root_and_nft(
        "the_shipped_example_answers_on_its_cluster_ip_with_ports_from_the_ephemeral_range",
    ) {
        return;
    }
    let bed = Testbed::new("e2e", "example", &[]);
    // The example's endpoints are 127.0.0.1:8080 and 127.0.0.2:8080: the
    // node's own loopback, where a dev box runs its "pods".
    let listener = bed
        .node()
        .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
        .expect("the example's backend listener");
    let _server = {
        let _g = bed.runtime().enter();
        peers::whoami(listener, "hello").expect("starting the example's backend")
    };
    // An ephemeral range of this namespace's own: the proxy must take its
    // ports from it when no --proxy-port-range is given.
    let set = bed
        .node()
        .output(
            "sysctl",
            ["-qw", "net.ipv4.ip_local_port_range=41000 41999"],
        )
        .expect("setting the node's ephemeral port range");
    assert!(set.status.success(), "sysctl: {set:?}");

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/hello.yaml");
    let example = example.to_str().expect("a UTF-8 path");
    let mut proxy = ProxyProcess::start_plain(
        bed.node(),
        &bed.dir,
        "kube-uproxy",
        &["--manifests", example],
    );
    let hello = Ipv4Addr::new(10, 96, 0, 80);
    e2e::wait_nft_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        hello,
        true,
        "the example's Service programmed",
    );
    let port = e2e::proxy_port_of(bed.node(), hello).expect("the example's proxy port");
    assert!(
        (41000..=41999).contains(&port),
        "proxy port {port} is outside the node's ephemeral range 41000-41999"
    );
    for (ns, from) in [(bed.client(), "a client"), (bed.node(), "the node")] {
        for i in 0..4 {
            let name = who(ns, vip(hello))
                .unwrap_or_else(|e| panic!("{from} -> {hello}:80, connection {i}: {e}"));
            assert_eq!(name, "hello", "{from} -> {hello}:80, connection {i}");
        }
    }
    proxy.assert_running("after serving the example");
}
