//! End-to-end tests of per-request balancing (issue 20) with real
//! third-party clients and servers: grpcio (PyPI) clients and servers,
//! Debian's curl, nghttp (nghttp2-client) and socat, and a keep-alive
//! HTTP/1.1 backend in Python.
//!
//! Each test builds a [`Testbed`] (client → node → three backends, each in
//! its own network namespace), starts the peers of `tests/lab/py/` in the
//! backend namespaces, runs the release binary in the node namespace on a
//! manifests file whose Service ports carry `appProtocol`, and runs the
//! clients in the client namespace against a ClusterIP. Readiness and
//! endpoint changes are read from the proxy's `/debug/services`.
//!
//! What a user would notice is asserted: which backend answered each
//! request (the peers name themselves), status codes, gRPC status codes and
//! details, bytes and hashes; never timings. Every harness is first checked
//! against a backend directly (no proxy in the way), so that a failure
//! through the ClusterIP is the proxy's.
//!
//! These tests need root, `nft`, `python3` with grpcio, `curl`, `nghttp`
//! and `socat`;
//! without root they print `SKIP ...` (or fail, if `CI` is set). Set
//! `KU_E2E_SHOW_LOGS=1` (with `--nocapture`) to see the proxy's stderr of
//! passing tests too.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use kube_uproxy::source::convert::ANNOTATION_LB_ALGORITHM;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uproxy_lab::e2e::http::{
    grpc_client, grpc_server, http_server, metric_sum, run_bounded, scrape, wait_endpoints,
    wait_port_applied,
};
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, SVC_PORT, Testbed, VIP_A, VIP_B, backend_name,
    connect, manifests, read_line, vip, write_by_rename,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, NsChild, backend_addr, peers};

/// The Service annotation that forces request or connection balancing
/// for all its ports (issue 20).
const ANNOTATION_BALANCE: &str = "kube-uproxy.io/balance";
/// A second backend port, for a second peer in the same backend namespace.
const SECOND_PORT: u16 = 8081;
/// Bound for one client program.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Manifests.

fn ep(i: usize) -> EndpointManifest {
    EndpointManifest {
        node_name: Some("node-1".to_string()),
        pod: Some(format!("web-{i}")),
        ..EndpointManifest::ready(backend_addr(i))
    }
}

/// Service `name` on `ip`, one port 80 → `target` with `app_protocol`
/// (`None`: no appProtocol), endpoints the backends `backends`.
fn svc(
    name: &str,
    ip: Ipv4Addr,
    target: u16,
    app_protocol: Option<&str>,
    backends: &[usize],
) -> ServiceManifest {
    let mut port = PortManifest::tcp(SVC_PORT, target).named("web");
    if let Some(a) = app_protocol {
        port = port.with_app_protocol(a);
    }
    ServiceManifest::new(name, ip)
        .with_port(port)
        .with_endpoints(backends.iter().map(|&i| ep(i)).collect())
}

// ---------------------------------------------------------------------------
// One test's world: the testbed, its peers, the proxy.

struct World {
    // Drop order: proxy, peers, then the testbed (servers, runtime, lab).
    proxy: ProxyProcess,
    manifests: PathBuf,
    _peers: Vec<NsChild>,
    bed: Testbed,
}

impl World {
    /// Starts the peers (`start(bed)`), then the proxy on `services`, and
    /// waits until each Service's port is in the kernel.
    fn new(
        tag: &str,
        backends: &[Backend],
        services: &[ServiceManifest],
        extra: &[&str],
        start: impl FnOnce(&Testbed) -> Vec<NsChild>,
    ) -> World {
        let bed = Testbed::new("http", tag, backends);
        let peers = start(&bed);
        let (mut proxy, manifests_path) = bed.start_proxy(&manifests(services), extra);
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        wait_port_applied(&mut proxy, bed.node(), &names);
        World {
            proxy,
            manifests: manifests_path,
            _peers: peers,
            bed,
        }
    }

    /// Three backends with HTTP/1.1 peers on [`BACKEND_PORT`], then the
    /// proxy on `services`.
    fn http(tag: &str, services: &[ServiceManifest], extra: &[&str]) -> World {
        World::new(
            tag,
            &[Backend::None, Backend::None, Backend::None],
            services,
            extra,
            |bed| http_servers(bed, &[0, 1, 2], BACKEND_PORT, &[]),
        )
    }

    fn client(&self) -> &Netns {
        self.bed.client()
    }

    fn dir(&self) -> &Path {
        &self.bed.dir
    }
}

/// grpcio servers on `port` in the backends `live`.
fn grpc_servers(bed: &Testbed, live: &[usize], port: u16, extra: &[&str]) -> Vec<NsChild> {
    live.iter()
        .map(|&i| grpc_server(&bed.lab.backends()[i], bed.node(), &bed.dir, i, port, extra))
        .collect()
}

/// HTTP/1.1 peers on `port` in the backends `live`, the ones in `slow`
/// answering 50 ms late.
fn http_servers(bed: &Testbed, live: &[usize], port: u16, slow: &[usize]) -> Vec<NsChild> {
    live.iter()
        .map(|&i| {
            let delay = if slow.contains(&i) { 50 } else { 0 };
            http_server(&bed.lab.backends()[i], bed.node(), &bed.dir, i, port, delay)
        })
        .collect()
}

/// Collects the failed expectations of one test, to report them all.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} expectation(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// 30 GETs by one curl on one keep-alive connection to `addr`, checked
/// to be spread 10 ± 1 over the three backends (request mode,
/// round-robin); `how` says what the port is, for the message.
fn expect_30_spread(checks: &mut Checks, client: &Netns, dir: &Path, addr: SocketAddr, how: &str) {
    let t = curl_gets(client, dir, addr, 30);
    let (ok, failed) = curl_counts(&t);
    checks.expect(
        failed.is_empty() && spread_ok(&ok, &[0, 1, 2], 10, 1),
        || {
            format!(
                "30 GETs on one keep-alive connection to {addr} ({how}): per backend {ok:?}, \
                 failed {failed:?}; expected 10 ± 1 each"
            )
        },
    );
}

/// 30 GETs by one curl on one keep-alive connection to `addr`, checked
/// to all reach one backend (the connection balanced once, as L4).
fn expect_30_on_one(checks: &mut Checks, client: &Netns, dir: &Path, addr: SocketAddr, how: &str) {
    let t = curl_gets(client, dir, addr, 30);
    let (ok, failed) = curl_counts(&t);
    checks.expect(
        failed.is_empty() && ok.len() == 1 && ok.values().sum::<u64>() == 30,
        || {
            format!(
                "30 GETs on one connection to {addr} ({how}): per backend {ok:?}, failed \
                 {failed:?}; expected all 30 on one backend"
            )
        },
    );
}

/// Requests per backend, from JSON `{"backend0": n, ...}`.
fn json_counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn count_of(counts: &BTreeMap<String, u64>, i: usize) -> u64 {
    counts.get(&backend_name(i)).copied().unwrap_or(0)
}

/// Whether backends `backends` each got `want ± slack` and nobody else
/// got anything.
fn spread_ok(counts: &BTreeMap<String, u64>, backends: &[usize], want: u64, slack: u64) -> bool {
    let total: u64 = counts.values().sum();
    let ours: u64 = backends.iter().map(|&i| count_of(counts, i)).sum();
    total == ours
        && backends
            .iter()
            .all(|&i| count_of(counts, i).abs_diff(want) <= slack)
}

/// `len` bytes of a fixed pseudo-random sequence (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// curl.

/// One transfer of a curl run: the body, the connections it opened, the
/// status (`000`: no answer).
#[derive(Debug)]
struct Transfer {
    body: String,
    connects: u32,
    code: String,
}

const MARK: &str = "@@transfer@@";

/// `curl -s <args>` in `ns`, each transfer followed by a write-out with its
/// `num_connects` and `http_code`; the transfers in order.
fn curl(ns: &Netns, dir: &Path, args: &[String]) -> Result<Vec<Transfer>, String> {
    let write_out = format!("\n{MARK} %{{num_connects}} %{{http_code}}\n");
    let mut full: Vec<&str> = vec!["-s", "--max-time", "60", "-w", &write_out];
    for a in args {
        if a == "--next" {
            full.extend_from_slice(&["--next", "-s", "--max-time", "60", "-w", &write_out]);
        } else {
            full.push(a);
        }
    }
    let ran = run_bounded(ns, dir, "curl", "curl", &full, None, CLIENT_TIMEOUT)?;
    let text = ran.stdout_text();
    let mut transfers = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(MARK) {
        let body = rest[..at].trim().to_string();
        let after = &rest[at + MARK.len()..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let mut fields = after[..line_end].split_whitespace();
        let connects = fields.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let code = fields.next().unwrap_or("?").to_string();
        transfers.push(Transfer {
            body,
            connects,
            code,
        });
        rest = &after[line_end..];
    }
    if transfers.is_empty() {
        return Err(format!(
            "curl {full:?} printed no transfer ({}): {text:?}; stderr: {}",
            ran.status, ran.stderr
        ));
    }
    Ok(transfers)
}

/// `n` GETs of `http://<addr>/r<k>` by one curl (one keep-alive
/// connection, if the server keeps it).
fn curl_gets(ns: &Netns, dir: &Path, addr: SocketAddr, n: usize) -> Vec<Transfer> {
    let url = format!("http://{addr}/r[1-{n}]");
    curl(ns, dir, &[url]).unwrap_or_else(|e| panic!("curl {n} GETs on {addr}: {e}"))
}

/// Backend → answers (200s), and the other answers by status.
fn curl_counts(transfers: &[Transfer]) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut ok = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for t in transfers {
        if t.code == "200" {
            *ok.entry(t.body.clone()).or_insert(0) += 1;
        } else {
            *failed.entry(t.code.clone()).or_insert(0) += 1;
        }
    }
    (ok, failed)
}

fn connects(transfers: &[Transfer]) -> u32 {
    transfers.iter().map(|t| t.connects).sum()
}

// ---------------------------------------------------------------------------
// 1. gRPC with grpcio.

/// One grpcio channel (one HTTP/2 connection) through a Service port with
/// `appProtocol: grpc` and three endpoints: 300 unary calls spread 100 ± 5
/// per backend with round-robin; an error status with its details reaches
/// the client; a server stream of 5 000 messages arrives complete and in
/// order.
#[test]
fn grpc_calls_on_one_channel_are_balanced_per_call() {
    if !lab::require_root_and_nft("grpc_calls_on_one_channel_are_balanced_per_call") {
        return;
    }
    let w = World::new(
        "grpc-spread",
        &[Backend::None, Backend::None, Backend::None],
        &[svc(
            "lab-grpc",
            VIP_A,
            BACKEND_PORT,
            Some("grpc"),
            &[0, 1, 2],
        )],
        &[],
        |bed| grpc_servers(bed, &[0, 1, 2], BACKEND_PORT, &[]),
    );
    let (client, dir) = (w.client(), w.dir());

    // The harness, straight to backend0: one channel, one backend.
    let direct = SocketAddr::from((backend_addr(0), BACKEND_PORT)).to_string();
    let d = grpc_client(
        client,
        dir,
        &["who", "--target", &direct, "--calls", "5"],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, direct");
    assert_eq!(
        json_counts(&d["counts"]),
        BTreeMap::from([(backend_name(0), 5)]),
        "direct: {d}"
    );

    let target = vip(VIP_A).to_string();
    let mut checks = Checks::default();

    let r = grpc_client(
        client,
        dir,
        &["who", "--target", &target, "--calls", "300"],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, 300 calls");
    let counts = json_counts(&r["counts"]);
    let errors = json_counts(&r["errors"]);
    checks.expect(errors.is_empty(), || {
        format!(
            "300 calls on one channel: failures by status {errors:?} (first: {})",
            r["first_error"]
        )
    });
    checks.expect(spread_ok(&counts, &[0, 1, 2], 100, 5), || {
        format!(
            "300 unary calls on ONE grpcio channel to {target} (appProtocol: grpc, round-robin, \
             three endpoints): calls per backend {counts:?}; expected 100 ± 5 each"
        )
    });

    let f = grpc_client(client, dir, &["fail", "--target", &target], CLIENT_TIMEOUT)
        .expect("grpc client, Fail");
    checks.expect(
        f["code"] == "INVALID_ARGUMENT" && f["details"] == "bad thing",
        || {
            format!(
                "Fail through {target}: the client got {f}; expected INVALID_ARGUMENT \"bad thing\""
            )
        },
    );

    let s = grpc_client(
        client,
        dir,
        &["count", "--target", &target, "--n", "5000"],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, Count");
    checks.expect(
        s["received"] == 5000 && s["in_order"] == true && s["code"] == "OK",
        || format!("a stream of 5000 messages through {target}: {s}"),
    );
    checks.finish();
}

/// Endpoints that send GOAWAY on every connection once it is 300 ms old
/// (gRPC's `max_connection_age`, as operators set it): the proxy opens
/// new connections to them and no call fails, over 300 calls paced over
/// about two seconds, still spread evenly.
#[test]
fn grpc_endpoints_going_away_cost_no_call() {
    if !lab::require_root_and_nft("grpc_endpoints_going_away_cost_no_call") {
        return;
    }
    let w = World::new(
        "grpc-goaway",
        &[Backend::None, Backend::None, Backend::None],
        &[svc(
            "lab-goaway",
            VIP_A,
            BACKEND_PORT,
            Some("grpc"),
            &[0, 1, 2],
        )],
        &[],
        |bed| grpc_servers(bed, &[0, 1, 2], BACKEND_PORT, &["--max-age-ms", "300"]),
    );
    let target = vip(VIP_A).to_string();
    let r = grpc_client(
        w.client(),
        w.dir(),
        &[
            "peers",
            "--target",
            &target,
            "--calls",
            "300",
            "--pace-ms",
            "6",
        ],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, 300 paced calls");
    let counts = json_counts(&r["counts"]);
    let errors = json_counts(&r["errors"]);
    let mut checks = Checks::default();
    checks.expect(errors.is_empty(), || {
        format!(
            "endpoints sending GOAWAY every 300 ms: failures by status {errors:?} (first: {})",
            r["first_error"]
        )
    });
    checks.expect(spread_ok(&counts, &[0, 1, 2], 100, 5), || {
        format!("calls per backend {counts:?}; expected 100 ± 5 each")
    });
    // Each endpoint saw more than one connection from the proxy: the
    // GOAWAYs happened and were followed by new connections.
    let connections = r["connections"].as_u64().unwrap_or(0);
    checks.expect(connections >= 6, || {
        format!(
            "the calls came over {connections} connection(s) from the proxy; expected at least \
             two per endpoint after their GOAWAYs"
        )
    });
    checks.finish();
}

/// Slow calls in flight on one channel when an endpoint leaves the
/// EndpointSlice complete OK; afterwards no call goes to it and none fails.
#[test]
fn grpc_calls_in_flight_survive_an_endpoint_leaving() {
    if !lab::require_root_and_nft("grpc_calls_in_flight_survive_an_endpoint_leaving") {
        return;
    }
    let running = std::env::temp_dir().join(format!(
        "kube-uproxy-http-running-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = fs::remove_dir_all(&running);
    fs::create_dir_all(&running).expect("creating the running-calls directory");
    let running_s = running.to_string_lossy().into_owned();
    let service =
        |backends: &[usize]| svc("lab-drain", VIP_A, BACKEND_PORT, Some("grpc"), backends);
    let mut w = World::new(
        "grpc-drain",
        &[Backend::None, Backend::None, Backend::None],
        &[service(&[0, 1, 2])],
        &[],
        |bed| {
            grpc_servers(
                bed,
                &[0, 1, 2],
                BACKEND_PORT,
                &["--running-dir", &running_s],
            )
        },
    );
    let target = vip(VIP_A).to_string();
    let ready = w.dir().join("drain.ready");
    let go = w.dir().join("drain.go");
    let (ready_s, go_s) = (
        ready.to_string_lossy().into_owned(),
        go.to_string_lossy().into_owned(),
    );
    let client_ns = w.client().clone();
    let dir = w.dir().to_path_buf();
    let args: Vec<String> = [
        "drain",
        "--target",
        &target,
        "--slow",
        "12",
        "--slow-ms",
        "3000",
        "--after",
        "150",
        "--ready",
        &ready_s,
        "--go",
        &go_s,
        "--running-dir",
        &running_s,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let client = thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        grpc_client(&client_ns, &dir, &args, CLIENT_TIMEOUT)
    });

    // The 12 slow calls are running in the servers: backend0 leaves.
    let waited = e2e::poll(Duration::from_secs(15), Duration::from_millis(10), || {
        if ready.exists() {
            Ok(())
        } else {
            Err("no ready file".into())
        }
    });
    let in_servers = fs::read_dir(&running).map(|d| d.count()).unwrap_or(0);
    write_by_rename(&w.manifests, &manifests(&[service(&[1, 2])]));
    let expected: Vec<String> = [1, 2]
        .iter()
        .map(|&i| SocketAddr::from((backend_addr(i), BACKEND_PORT)).to_string())
        .collect();
    wait_endpoints(&mut w.proxy, w.bed.node(), "lab-drain", &expected);
    fs::write(&go, "go\n").expect("writing the go file");
    let r = client.join();
    let _ = fs::remove_dir_all(&running);
    let r = r.expect("the client thread").expect("grpc drain client");
    assert!(
        waited.is_ok(),
        "the client never had its slow calls running: {r}"
    );

    let mut checks = Checks::default();
    let slow = json_counts(&r["slow"]["counts"]);
    let slow_errors = json_counts(&r["slow"]["errors"]);
    checks.expect(slow_errors.is_empty() && slow.values().sum::<u64>() == 12, || {
        format!(
            "12 slow calls in flight while backend0 left: answered {slow:?}, failed {slow_errors:?} \
             (first: {})",
            r["slow"]["first_error"]
        )
    });
    checks.expect(count_of(&slow, 0) >= 1 && in_servers >= 12, || {
        format!(
            "the 12 slow calls on one channel went {slow:?} ({in_servers} seen running): none was \
             in flight on backend0 when it left (one channel, one backend per call expected)"
        )
    });
    let after = json_counts(&r["after"]["counts"]);
    let after_errors = json_counts(&r["after"]["errors"]);
    checks.expect(after_errors.is_empty(), || {
        format!(
            "150 calls after backend0 left: failures {after_errors:?} (first: {})",
            r["after"]["first_error"]
        )
    });
    checks.expect(spread_ok(&after, &[1, 2], 75, 5), || {
        format!(
            "150 calls on the same channel after backend0 left the EndpointSlice: per backend \
             {after:?}; expected backend1 and backend2 75 ± 5 each, backend0 none"
        )
    });
    // Its calls done, the proxy's pooled h2 connection to backend0 closes
    // (GOAWAY, then FIN): the endpoint is not held open by a connection
    // nobody will use again.
    let open = no_connection_within(&w, 0, Duration::from_secs(10));
    checks.expect(open.is_ok(), || {
        format!(
            "10 s after its last call, backend0 (gone from the EndpointSlice) still has \
             connections from the proxy: {}",
            open.as_ref().err().map_or("", String::as_str)
        )
    });
    checks.finish();
}

/// Waits up to `timeout` for backend `i` to have no established TCP
/// connection on [`BACKEND_PORT`]; else what `ss` still lists.
fn no_connection_within(w: &World, i: usize, timeout: Duration) -> Result<(), String> {
    let ns = w.bed.lab.backend(i).expect("the backend's namespace");
    e2e::poll(timeout, Duration::from_millis(100), || {
        let out = ns
            .output(
                "ss",
                [
                    "-Htn",
                    "state",
                    "established",
                    &format!("sport = :{BACKEND_PORT}"),
                ],
            )
            .map_err(|e| e.to_string())?;
        let lines = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if lines.is_empty() { Ok(()) } else { Err(lines) }
    })
}

/// An endpoint that leaves while the proxy holds pooled h2 connections to
/// it (one per HTTP thread that served a call) has them closed at once,
/// not at the next request on each thread's pool: no request follows
/// here.
#[test]
fn pooled_connections_to_an_endpoint_that_left_close_without_another_request() {
    if !lab::require_root_and_nft(
        "pooled_connections_to_an_endpoint_that_left_close_without_another_request",
    ) {
        return;
    }
    let service =
        |backends: &[usize]| svc("lab-prune", VIP_A, BACKEND_PORT, Some("grpc"), backends);
    let mut w = World::new(
        "grpc-prune",
        &[Backend::None, Backend::None, Backend::None],
        &[service(&[0, 1, 2])],
        &[],
        |bed| grpc_servers(bed, &[0, 1, 2], BACKEND_PORT, &[]),
    );
    let target = vip(VIP_A).to_string();
    let r = grpc_client(
        w.client(),
        w.dir(),
        &["who", "--target", &target, "--calls", "30"],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, 30 calls");
    let counts = json_counts(&r["counts"]);
    assert!(
        count_of(&counts, 0) > 0,
        "30 calls, none on backend0: {counts:?}"
    );
    assert!(
        no_connection_within(&w, 0, Duration::from_millis(200)).is_err(),
        "the proxy keeps no connection to backend0 after its calls: nothing to close"
    );
    write_by_rename(&w.manifests, &manifests(&[service(&[1, 2])]));
    let expected: Vec<String> = [1, 2]
        .iter()
        .map(|&i| SocketAddr::from((backend_addr(i), BACKEND_PORT)).to_string())
        .collect();
    wait_endpoints(&mut w.proxy, w.bed.node(), "lab-prune", &expected);
    let open = no_connection_within(&w, 0, Duration::from_secs(10));
    assert!(
        open.is_ok(),
        "10 s after backend0 left the EndpointSlice, with no request since, it still has \
         connections from the proxy: {}",
        open.as_ref().err().map_or("", String::as_str)
    );
}

// ---------------------------------------------------------------------------
// 2. HTTP/1.1 with curl.

/// 30 URLs on one keep-alive curl connection to an `appProtocol: http`
/// port spread 10 ± 1 per backend; a port without appProtocol still sends
/// a connection's requests to one endpoint.
#[test]
fn curl_keepalive_requests_are_balanced_per_request() {
    if !lab::require_root_and_nft("curl_keepalive_requests_are_balanced_per_request") {
        return;
    }
    let w = World::http(
        "curl-spread",
        &[
            svc("lab-http", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2]),
            svc("lab-l4", VIP_B, BACKEND_PORT, None, &[0, 1, 2]),
        ],
        &[],
    );
    let (client, dir) = (w.client(), w.dir());

    // The harness: straight to backend0, 3 URLs on one connection.
    let direct = curl_gets(
        client,
        dir,
        SocketAddr::from((backend_addr(0), BACKEND_PORT)),
        3,
    );
    let (ok, failed) = curl_counts(&direct);
    assert_eq!(
        ok,
        BTreeMap::from([(backend_name(0), 3)]),
        "direct: {direct:?} {failed:?}"
    );
    assert_eq!(
        connects(&direct),
        1,
        "curl reuses its connection: {direct:?}"
    );

    let mut checks = Checks::default();
    let t = curl_gets(client, dir, vip(VIP_A), 30);
    let (ok, failed) = curl_counts(&t);
    checks.expect(connects(&t) == 1, || {
        format!(
            "curl opened {} connections for 30 URLs to {} (keep-alive lost)",
            connects(&t),
            vip(VIP_A)
        )
    });
    checks.expect(
        failed.is_empty() && spread_ok(&ok, &[0, 1, 2], 10, 1),
        || {
            format!(
                "30 GETs on one keep-alive connection to {} (appProtocol: http, round-robin): \
             per backend {ok:?}, failed {failed:?}; expected 10 ± 1 each",
                vip(VIP_A)
            )
        },
    );

    // Seen by operators: the 30 requests, by response class, and their
    // durations; nothing for the port without appProtocol.
    let samples = scrape(w.bed.node()).expect("scraping /metrics");
    let requests = metric_sum(
        &samples,
        "kubeuproxy_http_requests_total",
        &[("service", "lab-http"), ("code", "2xx")],
    );
    let durations = metric_sum(
        &samples,
        "kubeuproxy_http_request_duration_seconds_count",
        &[("service", "lab-http")],
    );
    checks.expect(requests.0 == 30.0 && durations.0 == 30.0, || {
        format!(
            "/metrics after 30 GETs on lab-http: kubeuproxy_http_requests_total{{code=\"2xx\"}} \
             {} ({} series), kubeuproxy_http_request_duration_seconds_count {} ({} series); \
             expected 30 each",
            requests.0, requests.1, durations.0, durations.1
        )
    });
    // The pool: one kept-alive connection to each endpoint carried its ten
    // requests, and stays open for the next ones.
    let upstream = metric_sum(
        &samples,
        "kubeuproxy_http_upstream_connections",
        &[("service", "lab-http")],
    );
    checks.expect(upstream == (3.0, 3), || {
        format!(
            "/metrics after 30 GETs on lab-http: kubeuproxy_http_upstream_connections sums to {} over {} endpoints; expected one pooled connection to each of the 3",
            upstream.0, upstream.1
        )
    });

    expect_30_on_one(&mut checks, client, dir, vip(VIP_B), "no appProtocol: L4");
    let samples = scrape(w.bed.node()).expect("scraping /metrics");
    let l4 = metric_sum(
        &samples,
        "kubeuproxy_http_requests_total",
        &[("service", "lab-l4")],
    );
    checks.expect(l4.1 == 0, || {
        format!("/metrics counts HTTP requests of lab-l4 (no appProtocol, L4): {l4:?}")
    });
    checks.finish();
}

/// nghttp (nghttp2-client) speaking HTTP/2 with prior knowledge (the h2c
/// preface) to an `appProtocol: http` port whose endpoints speak
/// HTTP/1.1: 30 concurrent requests on its one connection are all answered
/// and spread 10 ± 1. (Not curl: Debian 12's curl 7.88 fails the second
/// request on a reused prior-knowledge connection with "Error in the HTTP2
/// framing layer", even through nginx.)
#[test]
fn h2c_prior_knowledge_on_an_http_port_is_balanced() {
    if !lab::require_root_and_nft("h2c_prior_knowledge_on_an_http_port_is_balanced") {
        return;
    }
    let w = World::http(
        "h2c",
        &[svc(
            "lab-http",
            VIP_A,
            BACKEND_PORT,
            Some("http"),
            &[0, 1, 2],
        )],
        &[],
    );
    let (client, dir) = (w.client(), w.dir());
    let url = format!("http://{}/r", vip(VIP_A));
    // The bodies, one "backend<i>" line per answer, in completion order.
    let ran = run_bounded(
        client,
        dir,
        "nghttp",
        "nghttp",
        &["-m", "30", &url],
        None,
        CLIENT_TIMEOUT,
    )
    .expect("nghttp");
    let text = ran.stdout_text();
    let mut ok: BTreeMap<String, u64> = BTreeMap::new();
    let mut other = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("backend") {
            *ok.entry(line.to_string()).or_insert(0) += 1;
        } else {
            other.push(line);
        }
    }
    let mut checks = Checks::default();
    checks.expect(
        ran.status.success() && other.is_empty() && ok.values().sum::<u64>() == 30,
        || {
            format!(
                "nghttp -m 30 {url} (h2c prior knowledge, appProtocol: http): exit {}, answers \
                 {ok:?}, other output {other:?}, stderr {:?}; expected 30 answers",
                ran.status, ran.stderr
            )
        },
    );
    checks.expect(spread_ok(&ok, &[0, 1, 2], 10, 1), || {
        format!(
            "30 requests on one h2c connection to {} (appProtocol: http, round-robin): per \
             backend {ok:?}; expected 10 ± 1 each",
            vip(VIP_A)
        )
    });
    checks.finish();
}

/// `--http-threads 0`: request mode served on the main runtime (not
/// handed to HTTP threads) balances the same way.
#[test]
fn without_http_threads_keepalive_requests_are_balanced_per_request() {
    if !lab::require_root_and_nft(
        "without_http_threads_keepalive_requests_are_balanced_per_request",
    ) {
        return;
    }
    let w = World::http(
        "no-http-threads",
        &[svc(
            "lab-http",
            VIP_A,
            BACKEND_PORT,
            Some("http"),
            &[0, 1, 2],
        )],
        &["--http-threads", "0"],
    );
    let mut checks = Checks::default();
    expect_30_spread(
        &mut checks,
        w.client(),
        w.dir(),
        vip(VIP_A),
        "appProtocol: http, --http-threads 0",
    );
    checks.finish();
}

/// The Service annotation `kube-uproxy.io/balance` forces the mode for all
/// its ports: `request` balances a port without appProtocol per request
/// (HTTP/1.1 toward the endpoints), `connection` keeps an `http` port's
/// connections whole.
#[test]
fn balance_annotation_opts_ports_in_and_out() {
    if !lab::require_root_and_nft("balance_annotation_opts_ports_in_and_out") {
        return;
    }
    let w = World::http(
        "balance-annotation",
        &[
            svc("lab-opt-in", VIP_A, BACKEND_PORT, None, &[0, 1, 2])
                .with_annotation(ANNOTATION_BALANCE, "request"),
            svc("lab-opt-out", VIP_B, BACKEND_PORT, Some("http"), &[0, 1, 2])
                .with_annotation(ANNOTATION_BALANCE, "connection"),
        ],
        &[],
    );
    let (client, dir) = (w.client(), w.dir());
    let mut checks = Checks::default();
    expect_30_spread(
        &mut checks,
        client,
        dir,
        vip(VIP_A),
        &format!("no appProtocol, {ANNOTATION_BALANCE}: request"),
    );
    expect_30_on_one(
        &mut checks,
        client,
        dir,
        vip(VIP_B),
        &format!("appProtocol: http, {ANNOTATION_BALANCE}: connection"),
    );
    checks.finish();
}

/// `--request-balancing=false` turns request mode off for the node: an
/// `appProtocol: http` port keeps each connection on one endpoint.
#[test]
fn request_balancing_flag_off_keeps_connections_whole() {
    if !lab::require_root_and_nft("request_balancing_flag_off_keeps_connections_whole") {
        return;
    }
    let w = World::http(
        "balance-off",
        &[svc(
            "lab-http",
            VIP_A,
            BACKEND_PORT,
            Some("http"),
            &[0, 1, 2],
        )],
        &["--request-balancing=false"],
    );
    let (client, dir) = (w.client(), w.dir());
    let mut checks = Checks::default();
    expect_30_on_one(
        &mut checks,
        client,
        dir,
        vip(VIP_A),
        "appProtocol: http, --request-balancing=false",
    );
    checks.finish();
}

/// `sessionAffinity: ClientIP` on an `appProtocol: http` port: every
/// request of the client goes to its endpoint, over one keep-alive
/// connection and over several.
#[test]
fn client_ip_affinity_keeps_every_request_on_one_endpoint() {
    if !lab::require_root_and_nft("client_ip_affinity_keeps_every_request_on_one_endpoint") {
        return;
    }
    let w = World::http(
        "affinity",
        &[
            svc("lab-sticky", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2])
                .with_client_ip_affinity(300),
        ],
        &[],
    );
    let (client, dir) = (w.client(), w.dir());
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed_all: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..3 {
        let t = curl_gets(client, dir, vip(VIP_A), 10);
        let (ok, failed) = curl_counts(&t);
        for (k, v) in ok {
            *all.entry(k).or_insert(0) += v;
        }
        for (k, v) in failed {
            *failed_all.entry(k).or_insert(0) += v;
        }
    }
    assert!(
        failed_all.is_empty() && all.len() == 1 && all.values().sum::<u64>() == 30,
        "3 curl connections of 10 GETs each from one client to {} (appProtocol: http, \
         sessionAffinity: ClientIP): per backend {all:?}, failed {failed_all:?}; expected all 30 \
         on one backend",
        vip(VIP_A)
    );
}

/// 20 MB uploads, chunked and with Content-Length, on one keep-alive
/// connection to an `appProtocol: http` port: each arrives intact (the
/// backend's SHA-256 is the file's), and they are spread over the backends.
#[test]
fn curl_uploads_arrive_intact_and_are_balanced() {
    if !lab::require_root_and_nft("curl_uploads_arrive_intact_and_are_balanced") {
        return;
    }
    let w = World::http(
        "curl-upload",
        &[svc(
            "lab-upload",
            VIP_A,
            BACKEND_PORT,
            Some("http"),
            &[0, 1, 2],
        )],
        &[],
    );
    let (client, dir) = (w.client(), w.dir());
    let data = pseudo_random(20 * 1024 * 1024, 20);
    let want = peers::hex(&Sha256::digest(&data));
    let file = dir.join("upload.bin");
    fs::write(&file, &data).expect("writing the upload file");
    let upload = format!("@{}", file.display());
    let file_s = file.to_string_lossy().into_owned();

    // Three chunked POSTs, then three PUTs with Content-Length (curl -T,
    // with its `Expect: 100-continue`), in one curl run.
    let uploads = |addr: SocketAddr| -> Vec<String> {
        let url = format!("http://{addr}/sha256");
        let mut args: Vec<String> = Vec::new();
        for k in 0..6 {
            if k > 0 {
                args.push("--next".into());
            }
            if k < 3 {
                for a in ["-H", "Transfer-Encoding: chunked", "--data-binary", &upload] {
                    args.push(a.into());
                }
            } else {
                args.push("-T".into());
                args.push(file_s.clone());
            }
            args.push(url.clone());
        }
        args
    };

    // The harness: straight to backend1.
    let direct = curl(
        client,
        dir,
        &uploads(SocketAddr::from((backend_addr(1), BACKEND_PORT))),
    )
    .expect("curl uploads, direct");
    let expect_direct = format!("{want} {}", backend_name(1));
    assert!(
        direct.len() == 6
            && direct
                .iter()
                .all(|t| t.code == "200" && t.body == expect_direct),
        "direct uploads: {direct:?}; expected {expect_direct}"
    );

    let t = curl(client, dir, &uploads(vip(VIP_A))).expect("curl uploads through the Service");
    let mut checks = Checks::default();
    let mut per_backend = BTreeMap::new();
    for (k, tr) in t.iter().enumerate() {
        let kind = if k < 3 { "chunked" } else { "Content-Length" };
        let (digest, backend) = tr.body.split_once(' ').unwrap_or((tr.body.as_str(), "?"));
        checks.expect(tr.code == "200" && digest == want, || {
            format!(
                "20 MB upload #{k} ({kind}) through {}: status {}, the backend's SHA-256 {digest} \
                 (the file's is {want})",
                vip(VIP_A),
                tr.code
            )
        });
        *per_backend.entry(backend.to_string()).or_insert(0u64) += 1;
    }
    checks.expect(t.len() == 6, || {
        format!("6 uploads, {} answers: {t:?}", t.len())
    });
    checks.expect(spread_ok(&per_backend, &[0, 1, 2], 2, 1), || {
        format!(
            "6 uploads on one keep-alive connection to {} (appProtocol: http, round-robin): per \
             backend {per_backend:?}; expected 2 ± 1 each",
            vip(VIP_A)
        )
    });
    checks.finish();
}

/// A WebSocket-style upgrade: `GET` with `Connection: Upgrade`, `Upgrade:
/// websocket`, the backend's 101, then `len` bytes tunnelled both ways.
/// Returns the backend that answered.
fn upgrade_and_tunnel(ns: &Netns, addr: SocketAddr, len: usize) -> Result<String, String> {
    let mut s = connect(ns, addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: lab\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .map_err(|e| format!("writing the upgrade request: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(format!(
                "no end of the answer's head: {:?}",
                String::from_utf8_lossy(&head)
            ));
        }
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "EOF before the end of the answer's head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(_) => head.push(byte[0]),
            // A signal to the test process (a read with a timeout is never
            // restarted): read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "reading the answer: {e} after {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("the answer to the upgrade was not 101: {head:?}"));
    }
    let greeting = read_line(&mut s).map_err(|e| format!("reading the tunnel's greeting: {e}"))?;
    let backend = greeting
        .strip_prefix("tunnel ")
        .ok_or_else(|| format!("not the tunnel's greeting: {greeting:?}"))?
        .to_string();
    let data = pseudo_random(len, len as u64);
    // Written while read back, `len` bytes each way; then closed by the
    // client (a WebSocket client does not half-close: no proxy needs to
    // carry a half-close through the tunnel for this).
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let write = thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; len];
    let mut got = 0;
    let read = loop {
        if got == len {
            break Ok(());
        }
        match s.read(&mut back[got..]) {
            Ok(0) => break Err("EOF".to_string()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    let written = write
        .join()
        .map_err(|_| "the writer panicked".to_string())?;
    written.map_err(|e| format!("writing into the tunnel: {e}"))?;
    read.map_err(|e| format!("reading from the tunnel after {got} of {len} bytes: {e}"))?;
    if back != data {
        return Err(format!(
            "the tunnel gave back {len} bytes, different from those sent"
        ));
    }
    e2e::close(s);
    Ok(backend)
}

/// A WebSocket-style Upgrade on an `appProtocol: http` port and on a
/// `kubernetes.io/ws` port: answered 101 by the backend, then 1 MiB
/// tunnelled both ways, intact.
#[test]
fn websocket_upgrade_is_answered_101_and_tunnelled() {
    if !lab::require_root_and_nft("websocket_upgrade_is_answered_101_and_tunnelled") {
        return;
    }
    let w = World::http(
        "upgrade",
        &[
            svc("lab-http", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2]),
            svc(
                "lab-ws",
                VIP_B,
                BACKEND_PORT,
                Some("kubernetes.io/ws"),
                &[0, 1, 2],
            ),
        ],
        &[],
    );
    let client = w.client();
    let direct = upgrade_and_tunnel(
        client,
        SocketAddr::from((backend_addr(2), BACKEND_PORT)),
        1 << 20,
    )
    .expect("the upgrade, straight to backend2");
    assert_eq!(direct, backend_name(2));

    let mut checks = Checks::default();
    for (ip, label) in [
        (VIP_A, "appProtocol: http"),
        (VIP_B, "appProtocol: kubernetes.io/ws"),
    ] {
        for k in 0..3 {
            let r = upgrade_and_tunnel(client, vip(ip), 1 << 20);
            checks.expect(r.is_ok(), || {
                format!(
                    "upgrade #{k} through {} ({label}): {}",
                    vip(ip),
                    r.unwrap_err()
                )
            });
        }
    }
    checks.finish();
}

// ---------------------------------------------------------------------------
// 3. Failing and slow endpoints.

/// One endpoint of three refuses connections (no server on its port): 60
/// HTTP/1.1 requests on one curl connection and 60 gRPC calls on one
/// channel all succeed, spread over the two that answer.
#[test]
fn a_refusing_endpoint_fails_no_request() {
    if !lab::require_root_and_nft("a_refusing_endpoint_fails_no_request") {
        return;
    }
    let w = World::new(
        "refusing",
        &[Backend::None, Backend::None, Backend::None],
        &[
            svc("lab-http", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2]),
            svc("lab-grpc", VIP_B, SECOND_PORT, Some("grpc"), &[0, 1, 2]),
        ],
        &[],
        |bed| {
            let mut p = http_servers(bed, &[0, 1], BACKEND_PORT, &[]);
            p.extend(grpc_servers(bed, &[0, 1], SECOND_PORT, &[]));
            p
        },
    );
    let (client, dir) = (w.client(), w.dir());

    // The harness: backend2 refuses, backend0 answers.
    let refused = curl_gets(
        client,
        dir,
        SocketAddr::from((backend_addr(2), BACKEND_PORT)),
        1,
    );
    assert_eq!(refused[0].code, "000", "backend2 must refuse: {refused:?}");
    let d = curl_gets(
        client,
        dir,
        SocketAddr::from((backend_addr(0), BACKEND_PORT)),
        1,
    );
    assert_eq!(d[0].body, backend_name(0), "direct: {d:?}");

    let mut checks = Checks::default();
    let t = curl_gets(client, dir, vip(VIP_A), 60);
    let (ok, failed) = curl_counts(&t);
    checks.expect(failed.is_empty() && ok.values().sum::<u64>() == 60, || {
        format!(
            "60 GETs on one connection to {} with backend2 refusing: answered {ok:?}, failed by \
             status {failed:?}",
            vip(VIP_A)
        )
    });
    checks.expect(count_of(&ok, 0) >= 15 && count_of(&ok, 1) >= 15, || {
        format!(
            "60 GETs on one keep-alive connection to {} (appProtocol: http): per backend {ok:?}; \
             expected both answering backends to get at least 15",
            vip(VIP_A)
        )
    });

    let target = vip(VIP_B).to_string();
    let r = grpc_client(
        client,
        dir,
        &["who", "--target", &target, "--calls", "60"],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, 60 calls");
    let counts = json_counts(&r["counts"]);
    let errors = json_counts(&r["errors"]);
    checks.expect(errors.is_empty() && counts.values().sum::<u64>() == 60, || {
        format!(
            "60 gRPC calls on one channel to {target} with backend2 refusing: answered {counts:?}, \
             failed {errors:?} (first: {})",
            r["first_error"]
        )
    });
    checks.expect(count_of(&counts, 0) >= 15 && count_of(&counts, 1) >= 15, || {
        format!(
            "60 gRPC calls on one channel to {target} (appProtocol: grpc): per backend {counts:?}; \
             expected both answering backends to get at least 15"
        )
    });
    // The refused connects were retried on another endpoint, and counted.
    let samples = scrape(w.bed.node()).expect("scraping /metrics");
    let retries = metric_sum(&samples, "kubeuproxy_http_retries_total", &[]);
    checks.expect(retries.0 >= 1.0, || {
        format!(
            "/metrics: kubeuproxy_http_retries_total {retries:?} after requests to a refusing \
             endpoint"
        )
    });
    checks.finish();
}

/// 200 GETs from 4 concurrent curl clients (50 each on its own keep-alive
/// connection) to `addr`: answers per backend, failures by status.
fn concurrent_gets(
    ns: &Netns,
    dir: &Path,
    addr: SocketAddr,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let runs: Vec<Vec<Transfer>> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| curl_gets(ns, dir, addr, 50)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a curl thread"))
            .collect()
    });
    let all: Vec<Transfer> = runs.into_iter().flatten().collect();
    curl_counts(&all)
}

/// backend2 answers 50 ms late: with `peak-ewma` it gets under 15 % of 200
/// requests from 4 concurrent clients; with round-robin about a third.
#[test]
fn a_slow_endpoint_gets_a_small_share_with_peak_ewma() {
    if !lab::require_root_and_nft("a_slow_endpoint_gets_a_small_share_with_peak_ewma") {
        return;
    }
    let w = World::new(
        "slow",
        &[Backend::None, Backend::None, Backend::None],
        &[
            svc("lab-ewma", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2])
                .with_annotation(ANNOTATION_LB_ALGORITHM, "peak-ewma"),
            svc("lab-rr", VIP_B, BACKEND_PORT, Some("http"), &[0, 1, 2])
                .with_annotation(ANNOTATION_LB_ALGORITHM, "round-robin"),
        ],
        &[],
        |bed| http_servers(bed, &[0, 1, 2], BACKEND_PORT, &[2]),
    );
    let (client, dir) = (w.client(), w.dir());
    let d = curl_gets(
        client,
        dir,
        SocketAddr::from((backend_addr(2), BACKEND_PORT)),
        1,
    );
    assert_eq!(
        d[0].body,
        backend_name(2),
        "direct to the slow backend: {d:?}"
    );

    let mut checks = Checks::default();
    let (ok, failed) = concurrent_gets(client, dir, vip(VIP_A));
    let total: u64 = ok.values().sum();
    checks.expect(failed.is_empty() && total == 200, || {
        format!("peak-ewma: 200 GETs answered {ok:?}, failed by status {failed:?}")
    });
    checks.expect(count_of(&ok, 2) * 100 < 15 * 200, || {
        format!(
            "peak-ewma ({}, backend2 50 ms slower): per backend {ok:?}; expected backend2 under \
             15 % of 200",
            vip(VIP_A)
        )
    });

    let (ok, failed) = concurrent_gets(client, dir, vip(VIP_B));
    checks.expect(
        failed.is_empty() && spread_ok(&ok, &[0, 1, 2], 67, 8),
        || {
            format!(
                "round-robin ({}, backend2 50 ms slower), 200 GETs from 4 keep-alive clients: per \
             backend {ok:?}, failed {failed:?}; expected about a third each (67 ± 8)",
                vip(VIP_B)
            )
        },
    );
    checks.finish();
}

// ---------------------------------------------------------------------------
// 4. Not HTTP after all.

/// On `appProtocol: http` ports: a client that sends bytes that are not
/// HTTP (socat, 1 MiB of binary) gets them echoed intact, and a
/// server-speaks-first protocol (the backend greets first, the client
/// waits silently) works, greeting and echo intact.
#[test]
fn non_http_clients_and_server_first_protocols_pass_on_http_ports() {
    if !lab::require_root_and_nft("non_http_clients_and_server_first_protocols_pass_on_http_ports")
    {
        return;
    }
    // Whoami on 8080 greets first; echo peers on 8081.
    let mut echo_peers = Vec::new();
    let w = World::new(
        "not-http",
        &[Backend::Whoami, Backend::Whoami, Backend::Whoami],
        &[
            svc("lab-banner", VIP_A, BACKEND_PORT, Some("http"), &[0, 1, 2]),
            svc("lab-bytes", VIP_B, SECOND_PORT, Some("http"), &[0, 1, 2]),
        ],
        &[],
        |bed| {
            for b in bed.lab.backends() {
                let l = b
                    .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, SECOND_PORT)))
                    .expect("echo listener");
                let _g = bed.runtime().enter();
                echo_peers.push(peers::echo(l).expect("echo peer"));
            }
            Vec::new()
        },
    );
    let (client, dir) = (w.client(), w.dir());
    let data = pseudo_random(1 << 20, 4);
    let input = dir.join("bytes.in");
    fs::write(&input, &data).expect("writing the socat input");
    let socat = |addr: SocketAddr| -> Result<Vec<u8>, String> {
        let target = format!("TCP:{addr}");
        let ran = run_bounded(
            client,
            dir,
            "socat",
            "socat",
            &["-t", "10", "-T", "15", "-", &target],
            Some(&input),
            CLIENT_TIMEOUT,
        )?;
        if !ran.status.success() {
            return Err(format!("socat exited {}: {}", ran.status, ran.stderr));
        }
        Ok(ran.stdout)
    };
    let direct = socat(SocketAddr::from((backend_addr(0), SECOND_PORT))).expect("socat, direct");
    assert!(
        direct == data,
        "direct echo: {} bytes back of {}",
        direct.len(),
        data.len()
    );

    let mut checks = Checks::default();
    for k in 0..3 {
        match socat(vip(VIP_B)) {
            Ok(back) => checks.expect(back == data, || {
                format!(
                    "socat #{k}: 1 MiB of non-HTTP bytes to {} (appProtocol: http) came back as \
                     {} bytes, {}",
                    vip(VIP_B),
                    back.len(),
                    if data.starts_with(&back) {
                        "a prefix"
                    } else {
                        "different"
                    }
                )
            }),
            Err(e) => checks.expect(false, || format!("socat #{k} to {}: {e}", vip(VIP_B))),
        }
    }

    // Server speaks first: the client says nothing until the greeting.
    for k in 0..3 {
        let r = (|| -> Result<String, String> {
            let mut s = connect(client, vip(VIP_A)).map_err(|e| format!("connect: {e}"))?;
            let greeting =
                read_line(&mut s).map_err(|e| format!("waiting for the greeting: {e}"))?;
            s.write_all(b"after the banner\n")
                .map_err(|e| format!("write: {e}"))?;
            let echo = read_line(&mut s).map_err(|e| format!("reading the echo: {e}"))?;
            if echo != "after the banner" {
                return Err(format!("echo {echo:?}"));
            }
            e2e::close(s);
            Ok(greeting)
        })();
        match r {
            Ok(g) => checks.expect(g.starts_with("backend"), || format!("greeting #{k}: {g:?}")),
            Err(e) => checks.expect(false, || {
                format!(
                    "server-first protocol #{k} through {} (appProtocol: http), client silent: {e}",
                    vip(VIP_A)
                )
            }),
        }
    }
    checks.finish();
}

// ---------------------------------------------------------------------------
// 5. No endpoints.

/// A Service without endpoints: curl gets 503 on its `http` port; grpcio
/// gets UNAVAILABLE (14) with a message naming the Service on its `grpc`
/// port.
#[test]
fn no_endpoints_answer_503_and_grpc_unavailable() {
    if !lab::require_root_and_nft("no_endpoints_answer_503_and_grpc_unavailable") {
        return;
    }
    let w = World::new(
        "no-endpoints",
        &[Backend::None],
        &[
            svc("lab-empty-http", VIP_A, BACKEND_PORT, Some("http"), &[]),
            svc("lab-empty-grpc", VIP_B, BACKEND_PORT, Some("grpc"), &[]),
        ],
        &[],
        |_| Vec::new(),
    );
    let (client, dir) = (w.client(), w.dir());
    let mut checks = Checks::default();

    let t = curl_gets(client, dir, vip(VIP_A), 1);
    checks.expect(t.len() == 1 && t[0].code == "503" && !t[0].body.is_empty(), || {
        format!(
            "GET {} (appProtocol: http, no endpoints): status {} body {:?}; expected 503 with a \
             short body",
            vip(VIP_A),
            t[0].code,
            t[0].body
        )
    });

    let target = vip(VIP_B).to_string();
    let r = grpc_client(
        client,
        dir,
        &["unavailable", "--target", &target],
        CLIENT_TIMEOUT,
    )
    .expect("grpc client, no endpoints");
    let details = r["details"].as_str().unwrap_or("");
    checks.expect(
        r["code_value"] == 14 && details.contains("lab-empty-grpc"),
        || {
            format!(
                "a gRPC call to {target} (appProtocol: grpc, no endpoints): status {} ({}) details \
             {details:?}; expected UNAVAILABLE (14) naming the Service lab-empty-grpc",
                r["code"], r["code_value"]
            )
        },
    );
    checks.finish();
}
