//! End-to-end tests of issue 10 (Service semantics as kube-proxy honours
//! them), named in the spirit of the upstream conformance tests. The
//! release binary runs in the node namespace of a lab with real nftables
//! rules; the proxy is `--hostname-override node-1`, so an EndpointSlice
//! endpoint with `nodeName: node-1` is "on this node" and one on `node-2`
//! is elsewhere (in the lab both are backend namespaces behind the node).
//!
//! - internalTrafficPolicy=Local with and without local endpoints (dropped,
//!   not refused; refused when there are none at all);
//! - externalTrafficPolicy=Local: node port traffic to local endpoints
//!   only, ClusterIP traffic to all, the health check node port's answers
//!   as endpoints come and go, kube-proxy's metric;
//! - serving+terminating fallback for the cluster set and the local set,
//!   each on its own;
//! - a Service with 250 endpoints over three slices uses every one;
//! - zone hints with endpoints in two zones, the zone read from the Node
//!   object and followed when it changes; `/healthz` and the Node's
//!   `ToBeDeletedByClusterAutoscaler` taint;
//! - type changes, ports added and removed, the ClusterIP changed and the
//!   skip labels added and removed while a connection stays open.
//!
//! Clients run in the client and node namespaces, never the root one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    assert_echo, backend_name, bin, close, hold, http_get, manifests, poll, read_line, vip,
    wait_http_refused, wait_nft_key, write_by_rename,
};
use uproxy_lab::manifests::{
    EndpointManifest, PortManifest, ServiceManifest, ServiceType, node_yaml,
};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, Netns, backend_addr};

/// The proxy's node name.
const NODE: &str = "node-1";
/// Another node of the cluster.
const OTHER_NODE: &str = "node-2";
const NODE_PORT: u16 = 30080;
const HEALTH_CHECK_PORT: u16 = 32000;
/// How many connections a test makes to see where traffic goes.
const TRIES: usize = 12;

/// Backend `i`'s endpoint, ready, on `node`.
fn ep(i: usize, node: &str) -> EndpointManifest {
    EndpointManifest::ready(backend_addr(i)).on_node(node)
}

/// Service `name`: TCP 80 → 8080, node port 30080 when `node_port`.
fn svc(name: &str, ip: Ipv4Addr, node_port: bool, eps: Vec<EndpointManifest>) -> ServiceManifest {
    let port = PortManifest::tcp(SVC_PORT, BACKEND_PORT).named("http");
    if node_port {
        ServiceManifest::new(name, ip)
            .with_type(ServiceType::NodePort)
            .with_port(port.with_node_port(NODE_PORT))
            .with_endpoints(eps)
    } else {
        ServiceManifest::new(name, ip)
            .with_port(port)
            .with_endpoints(eps)
    }
}

/// A lab, its backends, and the proxy reading `<dir>/manifests.yaml`.
struct Bed {
    proxy: Option<ProxyProcess>,
    bed: Testbed,
    file: PathBuf,
}

impl Bed {
    fn new(tag: &str, backends: usize) -> Bed {
        let bed = Testbed::new("semantics", tag, &vec![Backend::Whoami; backends]);
        let file = bed.manifests_file();
        Bed {
            proxy: None,
            bed,
            file,
        }
    }

    fn start(&mut self, yaml: &str, extra: &[&str]) {
        fs::write(&self.file, yaml).expect("writing the manifests");
        let mut args = vec!["--hostname-override", NODE];
        args.extend_from_slice(extra);
        self.proxy = Some(self.bed.run_proxy("kube-uproxy", &self.file, &args, &[]));
    }

    fn write(&self, yaml: &str) {
        write_by_rename(&self.file, yaml);
    }

    fn proxy(&mut self) -> &mut ProxyProcess {
        self.proxy.as_mut().expect("proxy started")
    }

    fn client(&self) -> &Netns {
        self.bed.client()
    }

    fn node(&self) -> &Netns {
        self.bed.node()
    }

    /// Waits until `ip . tcp . 80` is in the nft `kind` `name`.
    fn wait_key(&mut self, kind: &str, name: &str, ip: Ipv4Addr, why: &str) {
        let node = self.bed.node().clone();
        wait_nft_key(self.proxy(), &node, kind, name, ip, true, why);
    }

    /// Waits until `tcp . port` is in the node-port set or map `name`.
    fn wait_port_key(&mut self, kind: &str, name: &str, port: u16, why: &str) {
        let node = self.bed.node().clone();
        let proxy = self.proxy();
        poll(READY_TIMEOUT, Duration::from_millis(50), || {
            proxy.assert_running(why);
            let keys = node
                .nft_keys(kind, "ip", "kube-uproxy", name)
                .map_err(|e| e.to_string())?;
            let found = keys
                .iter()
                .any(|k| k.last().and_then(Value::as_u64) == Some(u64::from(port)));
            found
                .then_some(())
                .ok_or_else(|| format!("{name}: {keys:?}"))
        })
        .unwrap_or_else(|e| panic!("{why}: node port {port} never in {name}: {e}"));
    }
}

/// What a new connection to `addr` from `ns` meets: the backend's name,
/// `refused` or `timeout` (dropped).
fn outcome(ns: &Netns, addr: SocketAddr) -> String {
    match ns.tcp_connect(addr, Duration::from_millis(1500)) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            match read_line(&mut s) {
                Ok(name) => {
                    close(s);
                    name
                }
                Err(e) => format!("read error: {e}"),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused".into(),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            "timeout".into()
        }
        Err(e) => format!("error: {e}"),
    }
}

/// Which answers `TRIES` new connections got, with their counts.
fn spread(ns: &Netns, addr: SocketAddr) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..TRIES {
        *seen.entry(outcome(ns, addr)).or_insert(0) += 1;
    }
    seen
}

/// The set of answers of `spread`.
fn answers(ns: &Netns, addr: SocketAddr) -> BTreeSet<String> {
    spread(ns, addr).into_keys().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Polls until new connections to `addr` meet exactly `want` (a set of
/// answers), or panics saying `why`.
fn wait_answers(ns: &Netns, addr: SocketAddr, want: &BTreeSet<String>, why: &str) {
    poll(READY_TIMEOUT, Duration::from_millis(200), || {
        let got = answers(ns, addr);
        (got == *want)
            .then_some(())
            .ok_or_else(|| format!("got {got:?}"))
    })
    .unwrap_or_else(|e| panic!("{why}: want {want:?} from {addr}: {e}"));
}

/// Polls the health check node port until it answers `status` with
/// `localEndpoints` = `local`; returns the JSON.
fn wait_health_check(ns: &Netns, status: u16, local: u64, why: &str) -> Value {
    let addr = SocketAddr::from((NODE_CLIENT_ADDR, HEALTH_CHECK_PORT));
    let mut last = Value::Null;
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let (code, body) = http_get(ns, addr, "/")?;
        last = serde_json::from_str(&body).map_err(|e| format!("{e}: {body:?}"))?;
        (code == status && last["localEndpoints"] == local)
            .then_some(())
            .ok_or_else(|| format!("{code} {body}"))
    })
    .unwrap_or_else(|e| panic!("{why}: health check never {status}/{local}: {e}"));
    last
}

/// The value of the sample `series` (name with labels) in `/metrics`.
fn metric(node: &Netns, series: &str) -> Option<String> {
    let (_, body) = http_get(node, SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics").ok()?;
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

fn no_local_metric(policy: &str) -> String {
    format!(
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"IPv4\",traffic_policy=\"{policy}\"}}"
    )
}

fn b(i: usize) -> String {
    backend_name(i)
}

// ---------------------------------------------------------------------------
// Traffic policies.

#[test]
fn internal_traffic_policy_local_uses_local_endpoints_and_drops_without_them() {
    if !lab::require_root_and_nft(
        "internal_traffic_policy_local_uses_local_endpoints_and_drops_without_them",
    ) {
        return;
    }
    let mut bed = Bed::new("itp-local", 2);
    let local = |eps| svc("web", VIP_A, false, eps).with_traffic_policies("Local", "Cluster");
    bed.start(
        &manifests(&[local(vec![ep(0, NODE), ep(1, OTHER_NODE)])]),
        &[],
    );
    bed.wait_key("map", "service-ports", VIP_A, "the ClusterIP is served");
    let to = vip(VIP_A);
    assert_eq!(
        answers(bed.client(), to),
        set(&[&b(0)]),
        "internalTrafficPolicy=Local: only the endpoint on this node"
    );
    // The same Service without the policy reaches both.
    bed.write(&manifests(&[svc(
        "web",
        VIP_A,
        false,
        vec![ep(0, NODE), ep(1, OTHER_NODE)],
    )]));
    wait_answers(bed.client(), to, &set(&[&b(0), &b(1)]), "policy Cluster");

    // No endpoint on this node: dropped (kube-proxy), not refused.
    bed.write(&manifests(&[local(vec![
        ep(0, OTHER_NODE),
        ep(1, OTHER_NODE),
    ])]));
    bed.wait_key(
        "set",
        "no-local-endpoints",
        VIP_A,
        "no local endpoint: the ClusterIP is dropped",
    );
    assert_eq!(answers(bed.client(), to), set(&["timeout"]));
    assert_eq!(
        metric(bed.node(), &no_local_metric("internal")).as_deref(),
        Some("1")
    );
    // No endpoint anywhere: refused, as without the policy.
    bed.write(&manifests(&[local(vec![])]));
    bed.wait_key("set", "no-endpoints", VIP_A, "no endpoint at all");
    assert_eq!(answers(bed.client(), to), set(&["refused"]));
    assert_eq!(
        metric(bed.node(), &no_local_metric("internal")).as_deref(),
        Some("0")
    );
}

#[test]
fn external_traffic_policy_local_and_the_health_check_node_port() {
    if !lab::require_root_and_nft("external_traffic_policy_local_and_the_health_check_node_port") {
        return;
    }
    let mut bed = Bed::new("etp-local", 2);
    let local = |eps| {
        svc("web", VIP_A, true, eps)
            .with_traffic_policies("Cluster", "Local")
            .with_health_check_node_port(HEALTH_CHECK_PORT)
    };
    bed.start(
        &manifests(&[local(vec![ep(0, NODE), ep(1, OTHER_NODE)])]),
        &[],
    );
    bed.wait_port_key("map", "node-ports", NODE_PORT, "the node port is served");
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    assert_eq!(
        answers(bed.client(), node_port),
        set(&[&b(0)]),
        "externalTrafficPolicy=Local: the node port reaches the local endpoint only"
    );
    assert_eq!(
        answers(bed.client(), vip(VIP_A)),
        set(&[&b(0), &b(1)]),
        "the ClusterIP still reaches every endpoint"
    );
    let json = wait_health_check(bed.client(), 200, 1, "one local endpoint");
    assert_eq!(json["service"]["namespace"], "default");
    assert_eq!(json["service"]["name"], "web");
    assert_eq!(json["serviceProxyHealthy"], true);

    // Two local endpoints: counted.
    bed.write(&manifests(&[local(vec![ep(0, NODE), ep(1, NODE)])]));
    wait_health_check(bed.client(), 200, 2, "two local endpoints");
    wait_answers(bed.client(), node_port, &set(&[&b(0), &b(1)]), "both local");

    // The local endpoints leave: the node port drops, the health check
    // says 503 with 0, the ClusterIP goes on.
    bed.write(&manifests(&[local(vec![
        ep(0, OTHER_NODE),
        ep(1, OTHER_NODE),
    ])]));
    bed.wait_port_key(
        "set",
        "no-local-endpoint-nodeports",
        NODE_PORT,
        "no local endpoint",
    );
    wait_health_check(bed.client(), 503, 0, "no local endpoint");
    assert_eq!(answers(bed.client(), node_port), set(&["timeout"]));
    assert_eq!(answers(bed.client(), vip(VIP_A)), set(&[&b(0), &b(1)]));
    assert_eq!(
        metric(bed.node(), &no_local_metric("external")).as_deref(),
        Some("1")
    );

    // Policy Cluster: the node port reaches every endpoint, the health
    // check port closes.
    bed.write(&manifests(&[svc(
        "web",
        VIP_A,
        true,
        vec![ep(0, OTHER_NODE), ep(1, OTHER_NODE)],
    )]));
    wait_answers(
        bed.client(),
        node_port,
        &set(&[&b(0), &b(1)]),
        "policy Cluster",
    );
    wait_http_refused(
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, HEALTH_CHECK_PORT)),
    )
    .unwrap_or_else(|e| panic!("the health check port stays open under policy Cluster: {e}"));
}

#[test]
fn terminating_endpoints_serve_the_cluster_and_the_local_set_each_on_its_own() {
    if !lab::require_root_and_nft(
        "terminating_endpoints_serve_the_cluster_and_the_local_set_each_on_its_own",
    ) {
        return;
    }
    let mut bed = Bed::new("terminating", 3);
    // backend0: terminating on this node; backend1: ready elsewhere;
    // backend2: terminating elsewhere.
    let eps = || {
        vec![
            ep(0, NODE).terminating(),
            ep(1, OTHER_NODE),
            ep(2, OTHER_NODE).terminating(),
        ]
    };
    let policy_svc = svc("web", VIP_A, true, eps()).with_traffic_policies("Cluster", "Local");
    bed.start(&manifests(&[policy_svc]), &[]);
    bed.wait_port_key("map", "node-ports", NODE_PORT, "served");
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    // The cluster set has a ready endpoint: terminating ones are not used.
    assert_eq!(answers(bed.client(), vip(VIP_A)), set(&[&b(1)]));
    // The local set has none ready: it falls back to the local serving,
    // terminating endpoint (KEP-1669), whatever the cluster set has.
    assert_eq!(answers(bed.client(), node_port), set(&[&b(0)]));

    // Nothing ready anywhere: the cluster set falls back too.
    bed.write(&manifests(&[svc(
        "web",
        VIP_A,
        false,
        vec![
            ep(0, NODE).terminating(),
            EndpointManifest {
                ready: false,
                serving: false,
                ..ep(1, OTHER_NODE)
            },
            ep(2, OTHER_NODE).terminating(),
        ],
    )]));
    wait_answers(
        bed.client(),
        vip(VIP_A),
        &set(&[&b(0), &b(2)]),
        "serving terminating endpoints when none is ready",
    );
}

// ---------------------------------------------------------------------------
// Many slices.

#[test]
fn a_service_with_250_endpoints_over_three_slices_uses_every_one() {
    if !lab::require_root_and_nft("a_service_with_250_endpoints_over_three_slices_uses_every_one") {
        return;
    }
    const N: usize = 250;
    let mut bed = Bed::new("many-slices", 2);
    // 125 addresses answered by each backend: 10.201.<i>.0/24 is local to
    // backend i (any address of it), and the node routes it there.
    for i in 0..2 {
        let net = format!("10.201.{i}.0/24");
        bed.bed.lab.backends()[i]
            .output("ip", ["route", "add", "local", &net, "dev", "lo"])
            .expect("ip route add local");
        let via = backend_addr(i).to_string();
        bed.node()
            .output("ip", ["route", "add", &net, "via", &via])
            .expect("ip route add");
    }
    let addr = |k: usize| Ipv4Addr::new(10, 201, (k % 2) as u8, (k / 2 + 1) as u8);
    let eps: Vec<EndpointManifest> = (0..N)
        .map(|k| EndpointManifest::ready(addr(k)).on_node(OTHER_NODE))
        .collect();
    let many = svc("many", VIP_A, false, eps).with_slice_size(100);
    let yaml = manifests(&[many]);
    assert_eq!(yaml.matches("kind: EndpointSlice").count(), 3);
    bed.start(&yaml, &[]);
    bed.wait_key("map", "service-ports", VIP_A, "served");
    // 250 connections held open at once, round-robin: one on each
    // endpoint, which the proxy's report shows.
    let mut held = Vec::new();
    for k in 0..N {
        let (s, name) =
            hold(bed.client(), vip(VIP_A)).unwrap_or_else(|e| panic!("connection {k} of {N}: {e}"));
        assert!(name == b(0) || name == b(1), "{name}");
        held.push(s);
    }
    let out = bed
        .node()
        .output(bin(), ["status", "--json"])
        .expect("kube-uproxy status");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let port = &report["servicePorts"][0];
    let endpoints = port["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), N, "every endpoint of the three slices");
    let busy: Vec<u64> = endpoints
        .iter()
        .map(|e| e["openConnections"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        busy.iter().all(|n| *n == 1),
        "one connection on each endpoint: {busy:?}"
    );
    for s in held {
        close(s);
    }
}

// ---------------------------------------------------------------------------
// Topology and the Node object.

#[test]
fn zone_hints_keep_traffic_in_the_zone_of_the_node_object() {
    if !lab::require_root_and_nft("zone_hints_keep_traffic_in_the_zone_of_the_node_object") {
        return;
    }
    let mut bed = Bed::new("zones", 2);
    let zoned = |hinted: bool| {
        let (e0, e1) = (ep(0, NODE), ep(1, OTHER_NODE));
        let (e0, e1) = if hinted {
            (
                e0.in_zone("zone-a", &["zone-a"]),
                e1.in_zone("zone-b", &["zone-b"]),
            )
        } else {
            (e0.in_zone("zone-a", &["zone-a"]), e1.in_zone("zone-b", &[]))
        };
        svc("web", VIP_A, false, vec![e0, e1]).with_traffic_distribution("PreferSameZone")
    };
    let with_node = |zone: &str, hinted: bool| {
        manifests(&[zoned(hinted)]) + "---\n" + &node_yaml(NODE, Some(zone), false)
    };
    bed.start(&with_node("zone-b", true), &[]);
    bed.wait_key("map", "service-ports", VIP_A, "served");
    wait_answers(
        bed.client(),
        vip(VIP_A),
        &set(&[&b(1)]),
        "the node is in zone-b: only the endpoint hinted for zone-b",
    );
    // The Node moves to zone-a (its label changes): followed.
    bed.write(&with_node("zone-a", true));
    wait_answers(bed.client(), vip(VIP_A), &set(&[&b(0)]), "zone-a");
    // One endpoint without hints: hints are ignored, every endpoint used.
    bed.write(&with_node("zone-a", false));
    wait_answers(
        bed.client(),
        vip(VIP_A),
        &set(&[&b(0), &b(1)]),
        "a ready endpoint without hints",
    );
}

#[test]
fn healthz_says_the_node_is_not_eligible_when_the_autoscaler_deletes_it() {
    if !lab::require_root_and_nft(
        "healthz_says_the_node_is_not_eligible_when_the_autoscaler_deletes_it",
    ) {
        return;
    }
    let mut bed = Bed::new("eligible", 1);
    let svcs = manifests(&[svc("web", VIP_A, false, vec![ep(0, NODE)])]);
    let with_node = |tainted: bool| svcs.clone() + "---\n" + &node_yaml(NODE, None, tainted);
    bed.start(&with_node(false), &[]);
    bed.wait_key("map", "service-ports", VIP_A, "served");
    let healthz = SocketAddr::from(([127, 0, 0, 1], 10256));
    let check = |path: &str| http_get(bed.node(), healthz, path);
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        match check("/healthz") {
            Ok((200, body)) if body.contains("\"nodeEligible\":true") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("/healthz before the taint: {e}"));
    bed.write(&with_node(true));
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        match check("/healthz") {
            Ok((503, body)) if body.contains("\"nodeEligible\":false") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("/healthz with ToBeDeletedByClusterAutoscaler: {e}"));
    let (code, _) = check("/livez").expect("/livez");
    assert_eq!(code, 200, "/livez ignores node eligibility");
    assert_eq!(
        outcome(bed.client(), vip(VIP_A)),
        b(0),
        "the Service is still served"
    );
}

// ---------------------------------------------------------------------------
// What changes at run time.

#[test]
fn type_changes_ports_and_skip_labels_are_followed_without_disturbing_open_connections() {
    if !lab::require_root_and_nft(
        "type_changes_ports_and_skip_labels_are_followed_without_disturbing_open_connections",
    ) {
        return;
    }
    let mut bed = Bed::new("changes", 1);
    let eps = || vec![ep(0, NODE)];
    let base = || svc("web", VIP_A, false, eps());
    // A bystander whose open connection must survive every change of web.
    let other = || svc("other", VIP_B, false, eps());
    bed.start(&manifests(&[base(), other()]), &[]);
    bed.wait_key("map", "service-ports", VIP_A, "web");
    bed.wait_key("map", "service-ports", VIP_B, "other");
    let (mut web_conn, _) = hold(bed.client(), vip(VIP_A)).expect("web connection");
    let (mut other_conn, _) = hold(bed.client(), vip(VIP_B)).expect("other connection");
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    let check_open =
        |web: &mut std::net::TcpStream, other: &mut std::net::TcpStream, when: &str| {
            assert_echo(web, "web", &format!("web's open connection after {when}"));
            assert_echo(
                other,
                "other",
                &format!("the other Service's connection after {when}"),
            );
        };

    // ClusterIP -> NodePort: the node port answers.
    bed.write(&manifests(&[svc("web", VIP_A, true, eps()), other()]));
    wait_answers(bed.client(), node_port, &set(&[&b(0)]), "NodePort");
    check_open(&mut web_conn, &mut other_conn, "ClusterIP -> NodePort");

    // NodePort -> LoadBalancer (same node port): still served.
    bed.write(&manifests(&[
        svc("web", VIP_A, true, eps()).with_type(ServiceType::LoadBalancer),
        other(),
    ]));
    thread_pause();
    assert_eq!(outcome(bed.client(), node_port), b(0));
    check_open(&mut web_conn, &mut other_conn, "NodePort -> LoadBalancer");

    // Back to ClusterIP: the node port is no longer caught (nothing
    // listens on it: refused by the node itself).
    bed.write(&manifests(&[base(), other()]));
    wait_answers(
        bed.client(),
        node_port,
        &set(&["refused"]),
        "ClusterIP again",
    );
    assert_eq!(outcome(bed.client(), vip(VIP_A)), b(0));
    check_open(&mut web_conn, &mut other_conn, "LoadBalancer -> ClusterIP");

    // A port added, then removed.
    let two_ports =
        || base().with_port(PortManifest::tcp(SVC_PORT + 1, BACKEND_PORT).named("extra"));
    bed.write(&manifests(&[two_ports(), other()]));
    let extra = SocketAddr::from((VIP_A, SVC_PORT + 1));
    wait_answers(bed.client(), extra, &set(&[&b(0)]), "port 81 added");
    let (mut extra_conn, _) = hold(bed.client(), extra).expect("port 81 connection");
    bed.write(&manifests(&[base(), other()]));
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let keys = bed
            .node()
            .nft_keys("map", "ip", "kube-uproxy", "service-ports")
            .map_err(|e| e.to_string())?;
        let has81 = keys
            .iter()
            .any(|k| k.last().and_then(Value::as_u64) == Some(u64::from(SVC_PORT + 1)));
        (!has81).then_some(()).ok_or_else(|| format!("{keys:?}"))
    })
    .unwrap_or_else(|e| panic!("port 81 still caught after its removal: {e}"));
    assert_echo(&mut extra_conn, "81", "a connection of the removed port");
    check_open(&mut web_conn, &mut other_conn, "port 81 added and removed");

    // ExternalName: web is no longer proxied; back to ClusterIP: it is.
    bed.write(&manifests(&[
        base().with_type(ServiceType::ExternalName),
        other(),
    ]));
    wait_nft_key(
        bed.proxy.as_mut().expect("proxy"),
        bed.bed.node(),
        "map",
        "service-ports",
        VIP_A,
        false,
        "ExternalName",
    );
    bed.write(&manifests(&[base(), other()]));
    wait_answers(
        bed.client(),
        vip(VIP_A),
        &set(&[&b(0)]),
        "ClusterIP after ExternalName",
    );
    check_open(&mut web_conn, &mut other_conn, "ExternalName and back");

    // The skip labels: added, the Service goes; removed, it comes back.
    for label in [
        "service.kubernetes.io/service-proxy-name",
        "service.kubernetes.io/headless",
    ] {
        bed.write(&manifests(&[base().with_label(label, "x"), other()]));
        wait_nft_key(
            bed.proxy.as_mut().expect("proxy"),
            bed.bed.node(),
            "map",
            "service-ports",
            VIP_A,
            false,
            label,
        );
        bed.write(&manifests(&[base(), other()]));
        wait_answers(bed.client(), vip(VIP_A), &set(&[&b(0)]), label);
        check_open(&mut web_conn, &mut other_conn, label);
    }

    // The ClusterIP changes: served on the new one, not the old one.
    bed.write(&manifests(&[
        svc("web", Ipv4Addr::new(10, 96, 0, 99), false, eps()),
        other(),
    ]));
    wait_answers(
        bed.client(),
        vip(Ipv4Addr::new(10, 96, 0, 99)),
        &set(&[&b(0)]),
        "new ClusterIP",
    );
    wait_nft_key(
        bed.proxy.as_mut().expect("proxy"),
        bed.bed.node(),
        "map",
        "service-ports",
        VIP_A,
        false,
        "old ClusterIP",
    );
    check_open(&mut web_conn, &mut other_conn, "a new ClusterIP");
    close(web_conn);
    close(other_conn);
    close(extra_conn);
}

/// Lets a change that cannot be told from the outside reach the proxy.
fn thread_pause() {
    std::thread::sleep(Duration::from_millis(500));
}
