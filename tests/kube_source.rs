//! End-to-end tests of the Kubernetes source: the real `kube-uproxy` binary,
//! started with `--kubeconfig`, against the fake API server of
//! tests/lab/src/apiserver.rs.
//!
//! The proxy runs in the node namespace of a [`Lab`] (through `ip netns
//! exec`), so it cannot reach the test process's 127.0.0.1. The API server's
//! listener is therefore created inside the node namespace (a socket keeps
//! the namespace it was made in) and served from the test's tokio runtime;
//! the kubeconfig points at `http://127.0.0.1:PORT`, which is the node's own
//! loopback as the proxy sees it.
//!
//! What is checked is what a user would notice: which backends new
//! connections reach, whether a ClusterIP has a redirect (the nft map
//! `service-ports` of docs/rules.md), whether rules of untouched Services
//! ever disappear, and whether open connections survive disturbances of the
//! watch (a dropped connection to the API server, a `410 Gone`).
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set). Every wait is bounded; on failure the proxy's
//! stderr and the API server's request counters are printed. The harness
//! shared with tests/e2e_tcp.rs is in tests/lab/src/e2e.rs.

use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uproxy_lab::apiserver::FakeApiServer;
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    VIP_C, VIP_D, assert_echo, backend_name, close, connect, hold, vip, who, who_or_panic,
};
use uproxy_lab::manifests::slice_name;
use uproxy_lab::{self as lab, Netns, backend_addr};

/// Bound for the watchers to come back after a disturbance: kube-rs backs
/// off (0.8 s, then doubling, with jitter) between failed attempts.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(40);
/// Pause between two samples of the nft map while a disturbance goes on.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// The proxy watches three kinds (Services, EndpointSlices, and its own
/// Node).
const WATCHERS: usize = 3;

const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

// ---------------------------------------------------------------------------
// API objects, shaped like what kube-apiserver and the EndpointSlice
// controller store.

/// A ClusterIP Service with one unnamed TCP port 80 → 8080.
fn service(name: &str, ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": name},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"port": SVC_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}],
        },
        "status": {"loadBalancer": {}},
    })
}

/// `service(name, ip)` carrying the label that hands it to another proxy.
fn foreign_service(name: &str, ip: Ipv4Addr) -> Value {
    let mut s = service(name, ip);
    s["metadata"]["labels"][LABEL_SERVICE_PROXY_NAME] = json!("some-other-proxy");
    s
}

/// The EndpointSlice of `service`: one endpoint per `(backend index, ready)`.
fn slice(service: &str, endpoints: &[(usize, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(i, ready)| {
            json!({
                "addresses": [backend_addr(i).to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "node-1",
                "targetRef": {"kind": "Pod", "name": format!("{service}-{i}"), "namespace": "default"},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(service),
            "namespace": "default",
            "generateName": format!("{service}-"),
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "port": BACKEND_PORT, "protocol": "TCP"}],
    })
}

// ---------------------------------------------------------------------------
// nftables state in the node namespace.

/// `ClusterIP → proxy port` of the TCP/80 elements of the contract's map
/// `ip kube-uproxy service-ports`.
fn service_ports(node: &Netns) -> Result<Vec<(Ipv4Addr, u16)>, String> {
    let out = node
        .output(
            "nft",
            ["-j", "list", "map", "ip", "kube-uproxy", "service-ports"],
        )
        .map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("nft -j output is not JSON: {e}"))?;
    let map = json
        .get("nftables")
        .and_then(Value::as_array)
        .and_then(|objects| objects.iter().find_map(|o| o.get("map")))
        .ok_or_else(|| format!("no map object in {json}"))?;
    let elems = match map.get("elem") {
        Some(Value::Array(elems)) => elems.as_slice(),
        _ => &[],
    };
    let as_port = |v: &Value| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|p| u16::try_from(p).ok())
    };
    let mut found = Vec::new();
    for elem in elems {
        let bad = || format!("unexpected map element {elem}");
        let kv = elem.as_array().filter(|kv| kv.len() == 2).ok_or_else(bad)?;
        // {"elem": {"val": KEY, ...}} when an element carries options.
        let key = kv[0]
            .get("elem")
            .and_then(|e| e.get("val"))
            .unwrap_or(&kv[0]);
        let parts = key
            .get("concat")
            .and_then(Value::as_array)
            .filter(|p| p.len() == 3)
            .ok_or_else(bad)?;
        let ip: Ipv4Addr = parts[0]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let tcp = parts[1].as_str() == Some("tcp") || parts[1].as_u64() == Some(6);
        let port = as_port(&parts[2]).ok_or_else(bad)?;
        let proxy_port = as_port(&kv[1]).ok_or_else(bad)?;
        if tcp && port == SVC_PORT {
            found.push((ip, proxy_port));
        }
    }
    Ok(found)
}

/// ClusterIPs of the TCP/80 elements of the set `ip kube-uproxy no-endpoints`.
fn no_endpoints(node: &Netns) -> Result<Vec<Ipv4Addr>, String> {
    e2e::nft_tcp_ips(node, "set", "no-endpoints")
}

// ---------------------------------------------------------------------------
// One test environment: lab, backends, fake API server, proxy.

struct Env {
    // Fields drop in this order: proxy, API server, then the testbed
    // (backends, runtime, lab).
    proxy: Option<ProxyProcess>,
    api: FakeApiServer,
    bed: Testbed,
}

impl Env {
    /// A lab with `n_backends` whoami backends (`backend<i>` on port 8080)
    /// and a fake API server listening on 127.0.0.1 of the node namespace.
    fn new(tag: &str, n_backends: usize) -> Env {
        let bed = Testbed::new("kube", tag, &vec![Backend::Whoami; n_backends]);
        let api_listener = bed
            .node()
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("entering the node namespace")
            .expect("binding the API server's listener on the node's 127.0.0.1");
        let api = {
            let _guard = bed.runtime().enter();
            FakeApiServer::start_on(api_listener)
        };
        Env {
            proxy: None,
            api,
            bed,
        }
    }

    /// Starts `kube-uproxy --kubeconfig …` in the node namespace.
    fn start_proxy(&mut self) {
        self.start_proxy_with(&[]);
    }

    /// Starts `kube-uproxy --kubeconfig … <extra>` in the node namespace.
    fn start_proxy_with(&mut self, extra: &[&str]) {
        let kubeconfig = self.bed.dir.join("kubeconfig");
        self.api
            .write_kubeconfig(&kubeconfig)
            .expect("writing the kubeconfig");
        self.proxy = Some(ProxyProcess::start_with(
            self.bed.node(),
            &self.bed.dir,
            "kube-uproxy",
            "--kubeconfig",
            &kubeconfig,
            extra,
            &[],
        ));
    }

    /// Panics (with the exit status) if the proxy is no longer running.
    fn assert_running(&mut self, what: &str) {
        let proxy = self.proxy.as_mut().expect("proxy started");
        proxy.assert_running(what);
    }

    /// Polls `cond` every 20 ms until it holds; panics after `timeout` with
    /// `why` and the last `detail`.
    /// Cuts every watch and keeps them down: returns once all watchers
    /// are trying to re-watch and the double is holding those requests.
    fn cut_watches(&mut self) {
        self.api.pause_watches();
        self.api.drop_watches();
        self.wait_until(
            "every watcher trying to re-watch after drop_watches",
            RECOVER_TIMEOUT,
            |env| {
                let (open, held) = (env.api.open_watches(), env.api.held_watches());
                if open == 0 && held == WATCHERS {
                    Ok(())
                } else {
                    Err(format!("{open} open watches, {held} held re-watches"))
                }
            },
        );
    }

    fn wait_until(
        &mut self,
        why: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Env) -> Result<(), String>,
    ) {
        let waited = e2e::poll(timeout, Duration::from_millis(20), || {
            self.assert_running(why);
            cond(self)
        });
        if let Err(detail) = waited {
            panic!("{why}: not the case after {timeout:?}; last: {detail}");
        }
    }

    /// Waits until `ip` tcp/80 is (or is not) an element of `service-ports`.
    fn wait_redirect(&mut self, ip: Ipv4Addr, present: bool, why: &str) {
        self.wait_until(why, READY_TIMEOUT, |env| {
            let ports = service_ports(env.node())?;
            if ports.iter().any(|(k, _)| *k == ip) == present {
                Ok(())
            } else {
                Err(format!(
                    "{ip} tcp {SVC_PORT} {} in map service-ports: {ports:?}",
                    if present { "absent" } else { "present" }
                ))
            }
        });
    }

    /// Waits until `ip` tcp/80 is (or is not) an element of `no-endpoints`.
    fn wait_rejected(&mut self, ip: Ipv4Addr, present: bool, why: &str) {
        self.wait_until(why, READY_TIMEOUT, |env| {
            let ips = no_endpoints(env.node())?;
            if ips.contains(&ip) == present {
                Ok(())
            } else {
                Err(format!(
                    "{ip} tcp {SVC_PORT} {} in set no-endpoints: {ips:?}",
                    if present { "absent" } else { "present" }
                ))
            }
        });
    }

    /// The proxy port `ip` tcp/80 is redirected to right now.
    fn proxy_port(&self, ip: Ipv4Addr) -> u16 {
        let ports = service_ports(self.node()).expect("listing map service-ports");
        ports
            .iter()
            .find(|(k, _)| *k == ip)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("{ip} tcp {SVC_PORT} not in map service-ports: {ports:?}"))
    }

    /// Waits until every watcher has an open watch on the API server.
    fn wait_watching(&mut self, why: &str, timeout: Duration) {
        self.wait_until(why, timeout, |env| {
            let open = env.api.open_watches();
            if open == WATCHERS {
                Ok(())
            } else {
                Err(format!("{open} open watches, expected {WATCHERS}"))
            }
        });
    }

    /// Waits until new connections to `ip` only reach `backend<expected>`
    /// (6 in a row: with round-robin over two endpoints two consecutive
    /// connections never land on the same one), then checks 10 more.
    fn wait_only_backend(&mut self, ip: Ipv4Addr, expected: usize, why: &str) {
        let want = backend_name(expected);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut streak = 0;
        let mut seen: Vec<String> = Vec::new();
        while streak < 6 {
            self.assert_running(why);
            assert!(
                Instant::now() < deadline && seen.len() < 2000,
                "{why}: new connections to {ip} still do not all reach {want} after {READY_TIMEOUT:?}; last: {:?}",
                &seen[seen.len().saturating_sub(12)..]
            );
            let got = match who(self.client(), vip(ip)) {
                Ok(name) => name,
                Err(e) => format!("error: {e}"),
            };
            streak = if got == want { streak + 1 } else { 0 };
            seen.push(got);
        }
        let seq: Vec<String> = (0..10)
            .map(|i| who_or_panic(self.client(), vip(ip), &format!("{why}, connection {i}")))
            .collect();
        assert!(
            seq.iter().all(|n| *n == want),
            "{why}: new connections to {ip} must only reach {want}: {seq:?}"
        );
    }
}

impl Deref for Env {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.bed
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "fake API server: {} list requests, {} watch requests, {} open / {} held watches, resourceVersion {}",
                self.api.list_requests(),
                self.api.watch_requests(),
                self.api.open_watches(),
                self.api.held_watches(),
                self.api.resource_version()
            );
        }
        // Kill the proxy (which prints its stderr after a failure) before
        // the API server and the namespaces go away.
        self.proxy = None;
    }
}

// ---------------------------------------------------------------------------
// Sampling the rules while something happens.

/// Sets the flag when dropped, also when the closure it guards panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `episode` while another thread lists `service-ports` in the node
/// namespace every [`SAMPLE_INTERVAL`] (at most for 3 minutes), and returns
/// the samples, in order.
fn sample_rules_during(
    node: &Netns,
    episode: impl FnOnce(),
) -> Vec<Result<Vec<(Ipv4Addr, u16)>, String>> {
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut samples = Vec::new();
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                samples.push(service_ports(node));
                thread::sleep(SAMPLE_INTERVAL);
            }
            // One more after the episode ended.
            samples.push(service_ports(node));
            samples
        });
        {
            let _stop = StopOnDrop(&stop);
            episode();
        }
        sampler.join().expect("the sampler thread panicked")
    })
}

/// Asserts that every sample redirects each of `expected` to the same proxy
/// port as before the episode.
fn assert_always_redirected(
    samples: &[Result<Vec<(Ipv4Addr, u16)>, String>],
    expected: &[(Ipv4Addr, u16)],
    what: &str,
) {
    assert!(
        samples.len() >= 10,
        "{what}: only {} samples of the rules were taken",
        samples.len()
    );
    let bad: Vec<(usize, String)> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Err(e) => Some((i, format!("listing failed: {e}"))),
            Ok(ports) => {
                let missing: Vec<_> = expected.iter().filter(|e| !ports.contains(e)).collect();
                (!missing.is_empty())
                    .then(|| format!("missing {missing:?}; map service-ports: {ports:?}"))
                    .map(|m| (i, m))
            }
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: the redirects of unchanged Services (ClusterIP, proxy port) {expected:?} must be \
         in map service-ports in every sample; {} of {} samples differ, first ones: {:?}",
        bad.len(),
        samples.len(),
        &bad[..bad.len().min(5)]
    );
}

// ---------------------------------------------------------------------------
// Client helpers of these tests only.

/// A connection from the client through `ip`, held open, that must land on
/// `backend<i>`; one round trip is made on it.
fn hold_on(env: &Env, ip: Ipv4Addr, i: usize) -> TcpStream {
    let (mut s, name) = hold(env.client(), vip(ip))
        .unwrap_or_else(|e| panic!("opening the long-lived connection to {ip}: {e}"));
    assert_eq!(name, backend_name(i), "long-lived connection to {ip}");
    assert_echo(&mut s, "before", "long-lived connection, before");
    s
}

// ---------------------------------------------------------------------------
// 1. Changes made while the proxy runs are followed.

#[test]
fn services_and_slices_are_followed_while_running() {
    if !lab::require_root_and_nft("services_and_slices_are_followed_while_running") {
        return;
    }
    let mut env = Env::new("kube-follow", 3);
    env.api.apply(service("web", VIP_A));
    env.api.apply(slice("web", &[(0, true), (1, true)]));
    env.start_proxy();
    env.wait_redirect(VIP_A, true, "Service web (from the API) programmed");

    // Both ready endpoints get new connections.
    let seq: Vec<String> = (0..6)
        .map(|i| who_or_panic(env.client(), vip(VIP_A), &format!("web, connection {i}")))
        .collect();
    for i in [0, 1] {
        assert!(
            seq.contains(&backend_name(i)),
            "6 connections to web (endpoints backend0, backend1) never reached backend{i}: {seq:?}"
        );
    }
    assert!(
        !seq.contains(&backend_name(2)),
        "backend2 is not an endpoint of web: {seq:?}"
    );

    // The EndpointSlice changes: backend0 is no longer ready.
    env.api.apply(slice("web", &[(0, false), (1, true)]));
    env.wait_only_backend(VIP_A, 1, "backend0 marked not ready in web's EndpointSlice");
    let before = env.servers[0].accepted();
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "web after the change"),
        backend_name(1)
    );
    assert_eq!(
        env.servers[0].accepted(),
        before,
        "backend0 (not ready) accepted new connections"
    );

    // A Service handed to another proxy (service-proxy-name label), with a
    // slice of its own: created before `api`, so once `api` is programmed
    // the proxy has seen everything about it.
    env.api.apply(foreign_service("other", VIP_C));
    env.api.apply(slice("other", &[(2, true)]));

    // A second Service: first without endpoints (rejected), then with a
    // slice (redirected).
    env.api.apply(service("api", VIP_B));
    env.wait_rejected(
        VIP_B,
        true,
        "Service api created without an EndpointSlice: rejected",
    );
    match connect(env.client(), vip(VIP_B)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("api without endpoints: expected ECONNREFUSED, got {other:?}"),
    }
    env.api.apply(slice("api", &[(2, true)]));
    env.wait_redirect(VIP_B, true, "EndpointSlice of api created");
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_B), "api"),
        backend_name(2)
    );
    env.wait_rejected(VIP_B, false, "api has an endpoint now");

    let ports = service_ports(env.node()).expect("listing map service-ports");
    assert!(
        ports.iter().all(|(ip, _)| *ip != VIP_C),
        "Service other carries {LABEL_SERVICE_PROXY_NAME}, so it must not be proxied: {ports:?}"
    );
    let rejected = no_endpoints(env.node()).expect("listing set no-endpoints");
    assert!(
        !rejected.contains(&VIP_C),
        "Service other carries {LABEL_SERVICE_PROXY_NAME}, so it must not be rejected either: {rejected:?}"
    );

    // The label is removed: the Service becomes ours.
    env.api.apply(service("other", VIP_C));
    env.wait_redirect(
        VIP_C,
        true,
        "the service-proxy-name label removed from Service other",
    );
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_C), "other, now unlabelled"),
        backend_name(2)
    );

    // A Service is deleted (its slice is garbage-collected afterwards).
    env.api
        .delete("Service", "default", "api")
        .expect("api exists");
    env.wait_redirect(VIP_B, false, "Service api deleted");
    env.api
        .delete("EndpointSlice", "default", &slice_name("api"))
        .expect("api's slice exists");
    env.wait_rejected(VIP_B, false, "Service api deleted");
    // Nothing else moved.
    env.wait_redirect(VIP_C, true, "Service other untouched");
    env.wait_only_backend(VIP_A, 1, "web untouched by the other changes");
}

// ---------------------------------------------------------------------------
// 2. A dropped watch: changes made meanwhile are applied afterwards, nothing
//    else moves.

#[test]
fn dropped_watch_catches_up_and_disturbs_nothing() {
    if !lab::require_root_and_nft("dropped_watch_catches_up_and_disturbs_nothing") {
        return;
    }
    let mut env = Env::new("kube-drop", 3);
    // keep: never touched; web: its endpoint moves; old: deleted; new: added.
    env.api.apply(service("keep", VIP_A));
    env.api.apply(slice("keep", &[(0, true)]));
    env.api.apply(service("web", VIP_B));
    env.api.apply(slice("web", &[(1, true)]));
    env.api.apply(service("old", VIP_D));
    env.api.apply(slice("old", &[(1, true)]));
    env.start_proxy();
    for (ip, name) in [(VIP_A, "keep"), (VIP_B, "web"), (VIP_D, "old")] {
        env.wait_redirect(ip, true, &format!("Service {name} programmed"));
    }
    let mut held = hold_on(&env, VIP_A, 0);
    let unchanged = [
        (VIP_A, env.proxy_port(VIP_A)),
        (VIP_B, env.proxy_port(VIP_B)),
    ];
    env.wait_watching(
        "the proxy watching Services and EndpointSlices",
        READY_TIMEOUT,
    );
    let lists_before = env.api.list_requests();
    let watches_before = env.api.watch_requests();

    let node = env.node().clone();
    let samples = sample_rules_during(&node, || {
        // Cut every watch and keep them down while the changes are made.
        env.cut_watches();
        env.api.apply(slice("web", &[(2, true)]));
        env.api.apply(service("new", VIP_C));
        env.api.apply(slice("new", &[(1, true)]));
        env.api
            .delete("Service", "default", "old")
            .expect("old exists");
        env.api
            .delete("EndpointSlice", "default", &slice_name("old"))
            .expect("old's slice exists");
        // Give the proxy time to act on anything it wrongly made of the cut.
        thread::sleep(Duration::from_millis(500));
        env.api.resume_watches();
        env.wait_watching("every watch re-opened", RECOVER_TIMEOUT);

        env.wait_redirect(VIP_C, true, "Service new, created while the watch was down");
        env.wait_redirect(
            VIP_D,
            false,
            "Service old, deleted while the watch was down",
        );
        env.wait_only_backend(
            VIP_B,
            2,
            "web's endpoint moved to backend2 while the watch was down",
        );
        assert_eq!(
            who_or_panic(env.client(), vip(VIP_C), "new"),
            backend_name(1)
        );
    });
    assert_always_redirected(&samples, &unchanged, "during the dropped watch");
    eprintln!(
        "dropped watch: {} samples of the rules, {} watch and {} list requests during the episode",
        samples.len(),
        env.api.watch_requests() - watches_before,
        env.api.list_requests() - lists_before
    );

    // The connection opened before the cut still works both ways, and new
    // connections to the unchanged Service still reach its endpoint.
    assert_echo(
        &mut held,
        "after",
        "long-lived connection, after the dropped watch",
    );
    assert_eq!(env.servers[0].open(), 1, "backend0 open connections");
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "keep, after the dropped watch"),
        backend_name(0)
    );
    close(held);
}

// ---------------------------------------------------------------------------
// 3. 410 Gone: the proxy relists; deletions made meanwhile disappear,
//    nothing else moves.

#[test]
fn gone_410_relists_and_disturbs_nothing() {
    if !lab::require_root_and_nft("gone_410_relists_and_disturbs_nothing") {
        return;
    }
    let mut env = Env::new("kube-gone", 2);
    env.api.apply(service("keep", VIP_A));
    env.api.apply(slice("keep", &[(0, true)]));
    env.api.apply(service("gone", VIP_B));
    env.api.apply(slice("gone", &[(1, true)]));
    env.start_proxy();
    env.wait_redirect(VIP_A, true, "Service keep programmed");
    env.wait_redirect(VIP_B, true, "Service gone programmed");
    let mut held = hold_on(&env, VIP_A, 0);
    let unchanged = [(VIP_A, env.proxy_port(VIP_A))];
    env.wait_watching(
        "the proxy watching Services and EndpointSlices",
        READY_TIMEOUT,
    );
    let lists_before = env.api.list_requests();

    let node = env.node().clone();
    let samples = sample_rules_during(&node, || {
        // Cut the watches; while they are down, delete a Service and expire
        // every version the proxy has seen: its re-watches get 410 Gone.
        env.cut_watches();
        env.api
            .delete("Service", "default", "gone")
            .expect("gone exists");
        env.api
            .delete("EndpointSlice", "default", &slice_name("gone"))
            .expect("gone's slice exists");
        env.api.compact();
        env.api.resume_watches();

        env.wait_until(
            "every watcher relisting after 410 Gone",
            RECOVER_TIMEOUT,
            |env| {
                let lists = env.api.list_requests() - lists_before;
                if lists >= WATCHERS as u64 {
                    Ok(())
                } else {
                    Err(format!("{lists} list requests since the compaction"))
                }
            },
        );
        env.wait_redirect(
            VIP_B,
            false,
            "Service gone, deleted while the watch was down",
        );
        env.wait_rejected(
            VIP_B,
            false,
            "Service gone, deleted while the watch was down",
        );

        // Watching again after the relist: a new Service is picked up live.
        env.wait_watching("every watch re-opened after the relist", RECOVER_TIMEOUT);
        env.api.apply(service("new", VIP_C));
        env.api.apply(slice("new", &[(1, true)]));
        env.wait_redirect(VIP_C, true, "Service new, created after the relist");
        assert_eq!(
            who_or_panic(env.client(), vip(VIP_C), "new"),
            backend_name(1)
        );
    });
    assert_always_redirected(&samples, &unchanged, "during the 410 Gone and relist");
    eprintln!(
        "410 Gone: {} samples of the rules, {} list requests during the episode",
        samples.len(),
        env.api.list_requests() - lists_before
    );

    assert_echo(
        &mut held,
        "after",
        "long-lived connection, after the relist",
    );
    assert_eq!(env.servers[0].open(), 1, "backend0 open connections");
    assert_eq!(
        who_or_panic(env.client(), vip(VIP_A), "keep, after the relist"),
        backend_name(0)
    );
    close(held);
}

// ---------------------------------------------------------------------------
// 4. The proxy's own Node object.

/// Node `name`, with the cluster autoscaler's taint when `to_be_deleted`.
fn node_object(name: &str, to_be_deleted: bool) -> Value {
    let mut n = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {}
    });
    if to_be_deleted {
        n["spec"]["taints"] = json!([
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
        ]);
    }
    n
}

/// `GET /healthz` on the node's own 127.0.0.1:10256: status and body.
fn healthz(node: &Netns) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10256));
    let mut s = node
        .tcp_connect(addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status: {text:?}"))?;
    Ok((code, text))
}

#[test]
fn the_nodes_autoscaler_taint_from_the_api_makes_healthz_not_eligible() {
    if !lab::require_root_and_nft(
        "the_nodes_autoscaler_taint_from_the_api_makes_healthz_not_eligible",
    ) {
        return;
    }
    let mut env = Env::new("kube-node", 1);
    env.api.apply(service("web", VIP_A));
    env.api.apply(slice("web", &[(0, true)]));
    env.api.apply(node_object("node-1", false));
    // Another node's taint must not count.
    env.api.apply(node_object("node-2", true));
    env.start_proxy_with(&["--hostname-override", "node-1"]);
    env.wait_redirect(VIP_A, true, "web programmed");
    env.wait_until(
        "/healthz 200 and eligible",
        READY_TIMEOUT,
        |env| match healthz(env.node())? {
            (200, body) if body.contains("\"nodeEligible\":true") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    env.api.apply(node_object("node-1", true));
    env.wait_until(
        "/healthz 503 once node-1 carries ToBeDeletedByClusterAutoscaler",
        READY_TIMEOUT,
        |env| match healthz(env.node())? {
            (503, body) if body.contains("\"nodeEligible\":false") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        who_or_panic(
            env.client(),
            vip(VIP_A),
            "web while the node is not eligible"
        ),
        backend_name(0)
    );
}

// ---------------------------------------------------------------------------
// 5. What kube-proxy's dashboards read besides its own families.

/// `GET /metrics` on the node's own 127.0.0.1:10249: the body.
fn scrape(node: &Netns) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10249));
    let mut s = node
        .tcp_connect(addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("not a 200: {text:?}")),
    }
}

/// The value of the series printed exactly as `series` (name and labels).
fn value_of(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// kube-proxy's dashboards (kubernetes-mixin) read client-go's API client
/// metrics and the process's: the proxy's requests to the (fake) API
/// server are counted by code and timed, under the server's host:port,
/// and the process's CPU, memory and start time are there.
#[test]
fn the_api_clients_requests_and_the_process_are_on_metrics() {
    if !lab::require_root_and_nft("the_api_clients_requests_and_the_process_are_on_metrics") {
        return;
    }
    let mut env = Env::new("kube-metrics", 1);
    env.api.apply(service("web", VIP_A));
    env.api.apply(slice("web", &[(0, true)]));
    env.start_proxy();
    env.wait_redirect(VIP_A, true, "web programmed");
    env.wait_watching("every watcher watching", READY_TIMEOUT);
    let host = env.api.addr().to_string();
    let (lists, watches) = (env.api.list_requests(), env.api.watch_requests());
    let mut body = String::new();
    env.wait_until(
        "the API client's requests on /metrics",
        READY_TIMEOUT,
        |env| {
            body = scrape(env.node())?;
            let ok = format!(
                "rest_client_requests_total{{code=\"200\",method=\"GET\",host=\"{host}\"}}"
            );
            let timed = format!(
                "rest_client_request_duration_seconds_count{{verb=\"GET\",host=\"{host}\"}}"
            );
            // At least the three watchers' lists (their watches too, once
            // the double has answered their heads).
            match (value_of(&body, &ok), value_of(&body, &timed)) {
                (Some(n), Some(t)) if n >= 3.0 && t >= n => Ok(()),
                other => Err(format!(
                    "{other:?} ({lists} lists, {watches} watches served)"
                )),
            }
        },
    );
    for family in [
        "# TYPE rest_client_requests_total counter",
        "# TYPE rest_client_request_duration_seconds histogram",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_virtual_memory_bytes gauge",
        "# TYPE process_start_time_seconds gauge",
        "# TYPE kubernetes_build_info gauge",
    ] {
        assert!(body.contains(family), "{family}: {body}");
    }
    let rss = value_of(&body, "process_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 1e6, "resident memory {rss}");
    let started = value_of(&body, "process_start_time_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "started {started}, now {now}"
    );
}
