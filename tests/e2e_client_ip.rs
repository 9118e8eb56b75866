//! End-to-end tests of preserve-client-ip: connections to endpoints on
//! this node opened from the client's own address and port
//! (`IP_TRANSPARENT`, the connmark rules and the policy route of
//! docs/rules.md), so that the endpoint sees its real client.
//!
//! - `externalTrafficPolicy: Local` on a LoadBalancer Service: through its
//!   node port and its LB IP, the endpoint (a "pod" of the node, on its
//!   bridge) sees the client's address and port, the reply reaches the
//!   client, for many connections from one address (held open together)
//!   and from many addresses. ClusterIP traffic of the same Service
//!   (`internalTrafficPolicy: Cluster`) still comes from the node's address.
//! - The annotation `kube-uproxy.io/preserve-client-ip` forces it on (for
//!   the endpoint on this node only) and off.
//! - A client port already taken on the node: the connection comes from
//!   the node's address instead, is served, and is counted.
//! - `--cleanup` leaves no policy rule, route or table behind.
//! - UDP: the same through a node port and an LB IP of an
//!   `externalTrafficPolicy: Local` Service: each flow's datagrams reach
//!   the endpoint from the client's own address and port (several ports
//!   of one address, held together, and several addresses), its answers
//!   reach the client from the address it sent to (the Service port's
//!   socket still answers, the upstream socket takes the endpoint's
//!   replies only); a client port held on the node falls back to the
//!   node's address, is answered, and is counted.
//! - IPv6, TCP and UDP: through an IPv6 node port and LB IP of an
//!   `externalTrafficPolicy: Local` Service, the endpoint sees the client's
//!   own IPv6 address and port and the reply reaches the client.
//!
//! Backends run [`whoami_peer`]: `"<name> <peer ip:port>"`, then echo.
//! These tests need root and `nft`; without root they print `SKIP ...`
//! (or fail, if `CI` is set).
//!
//! [`whoami_peer`]: uproxy_lab::peers::whoami_peer

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use uproxy_lab::e2e::http::{metric_sum, scrape};
use uproxy_lab::e2e::udp::{ANSWER_WAIT, NODE_PORT_UDP, UdpBed, ask, ep, first_answer, wait_key};
use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, CONNECT_TIMEOUT, IO_TIMEOUT, ProxyProcess, READY_TIMEOUT, SVC_PORT,
    Testbed, VIP_A, VIP_B, backend_name, manifests, poll, read_line, wait_nft_key,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, ServiceType};
use uproxy_lab::peers::{self, PeerHandle};
use uproxy_lab::{
    self as lab, CLIENT_ADDR, CLIENT_ADDR_V6, NODE_BRIDGE_ADDR, NODE_CLIENT_ADDR,
    NODE_CLIENT_ADDR_V6, Netns, backend_addr_v6,
};

const NODE_PORT: u16 = 30080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// What an endpoint sees when the client's address is not kept: the
/// node's own address toward it (the proxy's other connections to
/// endpoints are not bound; the kernel picks the bridge's address).
const NODE_ADDR: IpAddr = IpAddr::V4(NODE_BRIDGE_ADDR);
const TABLE: &str = "4242";
const ANNOTATION: &str = "kube-uproxy.io/preserve-client-ip";

/// A lab with `n` backends running [`peers::whoami_peer`].
fn bed(tag: &str, n: usize) -> (Testbed, Vec<PeerHandle>) {
    let bed = Testbed::new("client-ip", tag, &vec![Backend::None; n]);
    let servers = (0..n)
        .map(|i| {
            let listener = bed.lab.backends()[i]
                .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                .expect("backend listener");
            let _guard = bed.runtime().enter();
            peers::whoami_peer(listener, &backend_name(i)).expect("peer server")
        })
        .collect();
    (bed, servers)
}

/// A LoadBalancer Service on `ip` with node port [`NODE_PORT`] and
/// ingress [`LB_IP`]: backend 0 on this node (`node-1`), backend 1 on
/// `node-2`.
fn lb_svc(name: &str, ip: Ipv4Addr) -> ServiceManifest {
    let remote = EndpointManifest {
        node_name: Some("node-2".to_string()),
        ..ep(1)
    };
    ServiceManifest::new(name, ip)
        .with_type(ServiceType::LoadBalancer)
        .with_port(
            PortManifest::tcp(SVC_PORT, BACKEND_PORT)
                .named("tcp")
                .with_node_port(NODE_PORT),
        )
        .with_lb_ingress(LB_IP, None)
        .with_endpoints(vec![ep(0), remote])
}

/// A connection from `ns` to `to`, from `from` (port 0: any).
fn connect_from(ns: &Netns, from: SocketAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = ns
        .run(move || -> std::io::Result<TcpStream> {
            let domain = socket2::Domain::for_address(from);
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            s.bind(&from.into())?;
            s.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
            Ok(s.into())
        })
        .map_err(std::io::Error::other)??;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// The greeting of a held connection: backend name and the address the
/// backend saw; then one echo round trip (the reply path works both ways).
fn greeting(s: &mut TcpStream, what: &str) -> (String, SocketAddr) {
    let line = read_line(s).unwrap_or_else(|e| panic!("{what}: reading the greeting: {e}"));
    let (name, peer) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("{what}: greeting {line:?}"));
    let peer = peer
        .parse()
        .unwrap_or_else(|e| panic!("{what}: peer in {line:?}: {e}"));
    s.write_all(b"ping\n")
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    assert_eq!(
        read_line(s).unwrap_or_else(|e| panic!("{what}: echo: {e}")),
        "ping",
        "{what}: echo"
    );
    (name.to_string(), peer)
}

fn close(mut s: TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Who answered a fresh connection from `from` to `to`, and the address
/// it saw; the connection is closed.
fn seen(
    ns: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    what: &str,
) -> (String, SocketAddr, SocketAddr) {
    let mut s = connect_from(ns, from, to).unwrap_or_else(|e| panic!("{what}: connect {to}: {e}"));
    let local = s.local_addr().expect("local address");
    let (name, peer) = greeting(&mut s, what);
    close(s);
    (name, peer, local)
}

fn wait_rules(proxy: &mut ProxyProcess, node: &Netns, ip: Ipv4Addr) {
    wait_nft_key(
        proxy,
        node,
        "map",
        "service-ports",
        ip,
        true,
        "Service programmed",
    );
    wait_nft_key(
        proxy,
        node,
        "map",
        "service-ports",
        LB_IP,
        true,
        "LB IP programmed",
    );
}

fn any_port(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

#[test]
fn external_traffic_policy_local_endpoints_see_the_clients_own_address() {
    if !lab::require_root_and_nft(
        "external_traffic_policy_local_endpoints_see_the_clients_own_address",
    ) {
        return;
    }
    let (bed, _servers) = bed("etp", 2);
    // Eight more client addresses on the client link.
    let extra: Vec<Ipv4Addr> = (10..18).map(|i| Ipv4Addr::new(10, 200, 0, i)).collect();
    for a in &extra {
        let out = bed
            .client()
            .output("ip", ["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .expect("ip addr add");
        assert!(out.status.success(), "ip addr add {a}: {out:?}");
    }
    let svc = lb_svc("web", VIP_A).with_traffic_policies("Cluster", "Local");
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_rules(&mut proxy, bed.node(), VIP_A);
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    let lb = SocketAddr::from((LB_IP, SVC_PORT));

    // Many connections from one address, held open together.
    for to in [node_port, lb] {
        let mut held = Vec::new();
        for i in 0..30 {
            let what = format!("connection {i} to {to}");
            let mut s = connect_from(bed.client(), any_port(CLIENT_ADDR), to)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let local = s.local_addr().expect("local address");
            let (name, peer) = greeting(&mut s, &what);
            assert_eq!(name, backend_name(0), "{what}: the local endpoint only");
            assert_eq!(
                peer, local,
                "{what}: the endpoint saw another address than the client's"
            );
            held.push(s);
        }
        for (i, s) in held.iter_mut().enumerate() {
            s.write_all(b"again\n").expect("write on a held connection");
            assert_eq!(read_line(s).expect("echo"), "again", "held connection {i}");
        }
        held.into_iter().for_each(close);
    }
    // From many addresses.
    for a in &extra {
        for to in [node_port, lb] {
            let what = format!("{a} -> {to}");
            let (name, peer, local) = seen(bed.client(), any_port(*a), to, &what);
            assert_eq!(name, backend_name(0), "{what}");
            assert_eq!(peer, local, "{what}: the endpoint saw another address");
        }
    }
    // ClusterIP traffic under internalTrafficPolicy: Cluster: the node's
    // address, as before (the promise kube-proxy keeps is the Local one's).
    for i in 0..6 {
        let what = format!("ClusterIP connection {i}");
        let (_, peer, _) = seen(
            bed.client(),
            any_port(CLIENT_ADDR),
            SocketAddr::from((VIP_A, SVC_PORT)),
            &what,
        );
        assert_eq!(peer.ip(), NODE_ADDR, "{what}");
    }
    let (preserved, fallbacks) = preserve_counts(bed.node()).expect("scraping /metrics");
    assert_eq!(preserved, 2.0 * 30.0 + 2.0 * extra.len() as f64);
    assert_eq!(fallbacks, 0.0);
    proxy.assert_running("end");
}

#[test]
fn the_annotation_forces_preserve_client_ip_on_for_local_endpoints_and_off() {
    if !lab::require_root_and_nft(
        "the_annotation_forces_preserve_client_ip_on_for_local_endpoints_and_off",
    ) {
        return;
    }
    let (bed, _servers) = bed("annotation", 2);
    // Cluster policies, forced on: the endpoint on this node sees the
    // client; the one on node-2 (a reply from there could not come back
    // here) sees the node's address.
    let on = lb_svc("on", VIP_A).with_annotation(ANNOTATION, "true");
    // Local, forced off.
    let off = ServiceManifest::new("off", VIP_B)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).named("tcp"))
        .with_traffic_policies("Local", "Cluster")
        .with_annotation(ANNOTATION, "false")
        .with_endpoints(vec![ep(0)]);
    let (mut proxy, _) =
        bed.start_proxy(&manifests(&[on, off]), &["--hostname-override", "node-1"]);
    wait_rules(&mut proxy, bed.node(), VIP_A);
    wait_nft_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_B,
        true,
        "off programmed",
    );
    let mut names = std::collections::BTreeSet::new();
    for i in 0..8 {
        let what = format!("ClusterIP of `on`, connection {i}");
        let (name, peer, local) = seen(
            bed.client(),
            any_port(CLIENT_ADDR),
            SocketAddr::from((VIP_A, SVC_PORT)),
            &what,
        );
        if name == backend_name(0) {
            assert_eq!(peer, local, "{what}: the endpoint on this node");
        } else {
            assert_eq!(peer.ip(), NODE_ADDR, "{what}: the endpoint on node-2");
        }
        names.insert(name);
    }
    assert_eq!(names.len(), 2, "both endpoints were used: {names:?}");
    for i in 0..4 {
        let what = format!("ClusterIP of `off` (internalTrafficPolicy: Local), connection {i}");
        let (_, peer, _) = seen(
            bed.client(),
            any_port(CLIENT_ADDR),
            SocketAddr::from((VIP_B, SVC_PORT)),
            &what,
        );
        assert_eq!(peer.ip(), NODE_ADDR, "{what}");
    }
    proxy.assert_running("end");
}

#[test]
fn a_client_port_taken_on_the_node_falls_back_to_the_nodes_address_and_is_counted() {
    if !lab::require_root_and_nft(
        "a_client_port_taken_on_the_node_falls_back_to_the_nodes_address_and_is_counted",
    ) {
        return;
    }
    let (bed, _servers) = bed("fallback", 1);
    let svc = lb_svc("web", VIP_A)
        .with_traffic_policies("Cluster", "Local")
        .with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_rules(&mut proxy, bed.node(), VIP_A);
    let taken = SocketAddr::from((CLIENT_ADDR, 41_234));
    // The node holds the client's address and port (a transparent socket
    // bound to it, without SO_REUSEADDR): the proxy cannot take it.
    let _holder = hold_on_node(bed.node(), taken, socket2::Type::STREAM);
    let lb = SocketAddr::from((LB_IP, SVC_PORT));
    let (name, peer, _) = seen(bed.client(), taken, lb, "from the taken port");
    assert_eq!(name, backend_name(0));
    assert_eq!(
        peer.ip(),
        NODE_ADDR,
        "the connection came from the node's address"
    );
    // Another port of the same client: its own address again.
    let (_, peer, local) = seen(bed.client(), any_port(CLIENT_ADDR), lb, "from a free port");
    assert_eq!(peer, local);
    wait_one_fallback_one_preserved(bed.node());
    proxy.assert_running("end");
}

/// `ip <family> rule show` and `ip <family> route show table <TABLE>` in
/// the node.
fn policy_route(node: &Netns, family: &str) -> (String, String) {
    let text = |args: &[&str]| {
        let out = node.output("ip", args).expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (
        text(&[family, "rule", "show"]),
        text(&[family, "route", "show", "table", TABLE]),
    )
}

#[test]
fn cleanup_leaves_no_policy_rule_route_or_mark_rule_behind() {
    if !lab::require_root_and_nft("cleanup_leaves_no_policy_rule_route_or_mark_rule_behind") {
        return;
    }
    let (bed, _servers) = bed("cleanup", 1);
    bed.lab.add_ipv6().expect("IPv6 in the lab");
    let svc = lb_svc("web", VIP_A).with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_rules(&mut proxy, bed.node(), VIP_A);
    for family in ["-4", "-6"] {
        let (rules, routes) = policy_route(bed.node(), family);
        assert!(
            rules.contains(&format!("lookup {TABLE}")) && rules.contains("fwmark 0x1000/0x3000"),
            "{family}: no policy rule while running:\n{rules}"
        );
        assert!(
            routes.contains("local default dev lo"),
            "{family}: no local route:\n{routes}"
        );
    }
    let ruleset = String::from_utf8_lossy(
        &bed.node()
            .output("nft", ["list", "ruleset"])
            .expect("nft")
            .stdout,
    )
    .into_owned();
    assert!(
        ruleset.contains("ct mark set ct mark | 0x00001000"),
        "{ruleset}"
    );
    // A restart keeps one rule, not two.
    proxy
        .child
        .terminate(Duration::from_secs(10))
        .expect("stopping the proxy");
    let (mut proxy, _) = bed.start_proxy(
        &manifests(&[lb_svc("web", VIP_A).with_endpoints(vec![ep(0)])]),
        &["--hostname-override", "node-1"],
    );
    wait_rules(&mut proxy, bed.node(), VIP_A);
    let (rules, _) = policy_route(bed.node(), "-4");
    assert_eq!(
        rules.matches(&format!("lookup {TABLE}")).count(),
        1,
        "{rules}"
    );
    proxy
        .child
        .terminate(Duration::from_secs(10))
        .expect("stopping the proxy");

    let mut cleanup = ProxyProcess::start_plain(bed.node(), &bed.dir, "cleanup", &["--cleanup"]);
    let status = cleanup
        .child
        .wait_timeout(Duration::from_secs(30))
        .expect("waiting for --cleanup")
        .expect("--cleanup did not finish");
    assert!(status.success(), "--cleanup failed:\n{}", cleanup.stderr());
    for family in ["-4", "-6"] {
        let (rules, routes) = policy_route(bed.node(), family);
        assert!(
            !rules.contains(&format!("lookup {TABLE}")),
            "{family}: a rule is left:\n{rules}"
        );
        assert!(
            !rules.contains("0x1000"),
            "{family}: a mark rule is left:\n{rules}"
        );
        assert!(
            routes.trim().is_empty(),
            "{family}: a route is left:\n{routes}"
        );
    }
    let ruleset = String::from_utf8_lossy(
        &bed.node()
            .output("nft", ["list", "ruleset"])
            .expect("nft")
            .stdout,
    )
    .into_owned();
    assert!(
        !ruleset.contains("kube-uproxy") && !ruleset.contains("0x00001000"),
        "{ruleset}"
    );
}

// ---------------------------------------------------------------------------
// UDP.

/// A LoadBalancer Service on `ip` with one UDP port (node port
/// [`NODE_PORT_UDP`], ingress [`LB_IP`]), `externalTrafficPolicy: Local`:
/// backend 0 on this node, backend 1 on `node-2`.
fn udp_lb_svc(name: &str, ip: Ipv4Addr) -> ServiceManifest {
    let remote = EndpointManifest {
        node_name: Some("node-2".to_string()),
        ..ep(1)
    };
    ServiceManifest::new(name, ip)
        .with_type(ServiceType::LoadBalancer)
        .with_port(
            PortManifest::udp(SVC_PORT, BACKEND_PORT)
                .named("udp")
                .with_node_port(NODE_PORT_UDP),
        )
        .with_lb_ingress(LB_IP, None)
        .with_traffic_policies("Cluster", "Local")
        .with_endpoints(vec![ep(0), remote])
}

/// A UDP socket of the client bound to `addr` (port 0: any).
fn udp_from(ns: &Netns, addr: SocketAddr) -> std::net::UdpSocket {
    ns.udp_socket(addr)
        .unwrap_or_else(|e| panic!("UDP socket on {addr}: {e}"))
}

/// Asks from `socket` to `to`: the answer must come from backend 0 (the
/// endpoint on this node), from `to` (the address the client sent to),
/// and the endpoint must have seen `expect_seen`.
fn udp_round(socket: &std::net::UdpSocket, to: SocketAddr, expect_seen: SocketAddr, what: &str) {
    let a = ask(socket, to, ANSWER_WAIT).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(a.name, backend_name(0), "{what}: the local endpoint only");
    assert_eq!(a.from, to, "{what}: the answer came from another address");
    assert_eq!(a.seen, expect_seen, "{what}: what the endpoint saw");
}

fn wait_udp_rules(proxy: &mut ProxyProcess, node: &Netns, ip: Ipv4Addr) {
    wait_key(proxy, node, "map", "service-ports", ip, "udp", SVC_PORT);
    wait_key(proxy, node, "map", "service-ports", LB_IP, "udp", SVC_PORT);
}

#[test]
fn udp_flows_to_local_endpoints_come_from_the_clients_own_address() {
    if !lab::require_root_and_nft("udp_flows_to_local_endpoints_come_from_the_clients_own_address")
    {
        return;
    }
    let bed = UdpBed::new("client-ip", 2);
    let extra: Vec<Ipv4Addr> = (10..14).map(|i| Ipv4Addr::new(10, 200, 0, i)).collect();
    for a in &extra {
        let out = bed
            .client()
            .output("ip", ["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .expect("ip addr add");
        assert!(out.status.success(), "ip addr add {a}: {out:?}");
    }
    let svc = udp_lb_svc("dns", VIP_A);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_udp_rules(&mut proxy, bed.node(), VIP_A);
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_UDP));
    let lb = SocketAddr::from((LB_IP, SVC_PORT));
    let mut flows = 0;
    for to in [node_port, lb] {
        // Served (the node port's rules may land a moment after the map's).
        let first = first_answer(bed.client(), to, &format!("first answer from {to}"));
        flows += 1;
        assert_eq!(first.name, backend_name(0));
        assert_eq!(first.seen.ip(), IpAddr::V4(CLIENT_ADDR), "{first:?}");
        // Several ports of one address, flows open together, two rounds.
        let sockets: Vec<_> = (0..10)
            .map(|_| udp_from(bed.client(), any_port(CLIENT_ADDR)))
            .collect();
        flows += sockets.len();
        for round in 0..2 {
            for (i, s) in sockets.iter().enumerate() {
                let local = s.local_addr().expect("local address");
                udp_round(s, to, local, &format!("round {round}, port {i} -> {to}"));
            }
        }
        // From other addresses.
        for a in &extra {
            let s = udp_from(bed.client(), any_port(*a));
            flows += 1;
            let local = s.local_addr().expect("local address");
            udp_round(&s, to, local, &format!("{a} -> {to}"));
        }
    }
    // ClusterIP traffic under internalTrafficPolicy: Cluster: the node's
    // address, as before.
    let s = udp_from(bed.client(), any_port(CLIENT_ADDR));
    for i in 0..4 {
        let a = ask(&s, SocketAddr::from((VIP_A, SVC_PORT)), ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("ClusterIP datagram {i}: {e}"));
        assert_eq!(a.seen.ip(), NODE_ADDR, "ClusterIP {i}: {a:?}");
    }
    let (preserved, fallbacks) = preserve_counts(bed.node()).expect("scraping /metrics");
    assert_eq!(preserved, flows as f64);
    assert_eq!(fallbacks, 0.0);
    proxy.assert_running("end");
}

#[test]
fn a_udp_client_port_taken_on_the_node_falls_back_to_the_nodes_address_and_is_counted() {
    if !lab::require_root_and_nft(
        "a_udp_client_port_taken_on_the_node_falls_back_to_the_nodes_address_and_is_counted",
    ) {
        return;
    }
    let bed = UdpBed::new("client-ip-fallback", 1);
    let svc = udp_lb_svc("dns", VIP_A).with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_udp_rules(&mut proxy, bed.node(), VIP_A);
    let taken = SocketAddr::from((CLIENT_ADDR, 41_235));
    // The node holds the client's address and port (a transparent UDP
    // socket bound to it, without SO_REUSEADDR): the proxy cannot take it.
    let _holder = hold_on_node(bed.node(), taken, socket2::Type::DGRAM);
    let lb = SocketAddr::from((LB_IP, SVC_PORT));
    let s = udp_from(bed.client(), taken);
    for i in 0..3 {
        let a =
            ask(&s, lb, ANSWER_WAIT).unwrap_or_else(|e| panic!("from the taken port, {i}: {e}"));
        assert_eq!(a.name, backend_name(0));
        assert_eq!(a.from, lb);
        assert_eq!(
            a.seen.ip(),
            NODE_ADDR,
            "datagram {i} came from the node's address"
        );
    }
    // Another port of the same client: its own address again.
    let free = udp_from(bed.client(), any_port(CLIENT_ADDR));
    let local = free.local_addr().expect("local address");
    udp_round(&free, lb, local, "from a free port");
    wait_one_fallback_one_preserved(bed.node());
    proxy.assert_running("end");
}

// ---------------------------------------------------------------------------
// IPv6.

/// An IPv6 ClusterIP, within the lab's IPv6 ClusterIP range.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// An IPv6 load-balancer IP (routed to the node by the client's default
/// route).
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x8, 0, 0, 0, 0, 0, 0x9);

/// Tries `f` until it succeeds, at most [`READY_TIMEOUT`] (the IPv6 rules
/// and the node ports may land a moment after the proxy starts).
fn until_served<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let mut out = None;
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        out = Some(f()?);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: not served within {READY_TIMEOUT:?}: {e}"));
    out.expect("set on success")
}

#[test]
fn ipv6_endpoints_on_this_node_see_the_clients_own_address_over_tcp_and_udp() {
    if !lab::require_root_and_nft(
        "ipv6_endpoints_on_this_node_see_the_clients_own_address_over_tcp_and_udp",
    ) {
        return;
    }
    let bed = Testbed::new("client-ip", "v6", &[Backend::None, Backend::None]);
    bed.lab.add_ipv6().expect("IPv6 in the lab");
    let mut servers = Vec::new();
    for i in 0..2 {
        let ns = &bed.lab.backends()[i];
        let addr = SocketAddr::from((backend_addr_v6(i), BACKEND_PORT));
        let tcp = ns.tcp_listener(addr).expect("IPv6 backend listener");
        let udp = ns.udp_socket(addr).expect("IPv6 backend UDP socket");
        let _guard = bed.runtime().enter();
        servers.push(peers::whoami_peer(tcp, &backend_name(i)).expect("IPv6 whoami"));
        servers.push(peers::udp_whoami(udp, &backend_name(i)).expect("IPv6 UDP whoami"));
    }
    let local = EndpointManifest {
        node_name: Some("node-1".to_string()),
        ..EndpointManifest::ready(backend_addr_v6(0))
    };
    let remote = EndpointManifest {
        node_name: Some("node-2".to_string()),
        ..EndpointManifest::ready(backend_addr_v6(1))
    };
    let svc = ServiceManifest::new("web6", VIP6)
        .with_type(ServiceType::LoadBalancer)
        .with_port(
            PortManifest::tcp(SVC_PORT, BACKEND_PORT)
                .named("tcp")
                .with_node_port(NODE_PORT),
        )
        .with_port(
            PortManifest::udp(SVC_PORT, BACKEND_PORT)
                .named("udp")
                .with_node_port(NODE_PORT_UDP),
        )
        .with_lb_ingress(LB_IP6, None)
        .with_traffic_policies("Cluster", "Local")
        .with_endpoints(vec![local, remote]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    let client_any = SocketAddr::from((CLIENT_ADDR_V6, 0));
    let mut flows = 0;
    for (ip, port) in [
        (IpAddr::V6(NODE_CLIENT_ADDR_V6), NODE_PORT),
        (IpAddr::V6(LB_IP6), SVC_PORT),
    ] {
        let to = SocketAddr::new(ip, port);
        until_served(&format!("TCP {to}"), || {
            let mut s = connect_from(bed.client(), client_any, to).map_err(|e| e.to_string())?;
            let line = read_line(&mut s).map_err(|e| e.to_string())?;
            close(s);
            Ok(line)
        });
        flows += 1;
        for i in 0..8 {
            let what = format!("TCP connection {i} to {to}");
            let (name, peer, local) = seen(bed.client(), client_any, to, &what);
            assert_eq!(name, backend_name(0), "{what}: the local endpoint only");
            assert_eq!(peer, local, "{what}: the endpoint saw another address");
            flows += 1;
        }
    }
    for (ip, port) in [
        (IpAddr::V6(NODE_CLIENT_ADDR_V6), NODE_PORT_UDP),
        (IpAddr::V6(LB_IP6), SVC_PORT),
    ] {
        let to = SocketAddr::new(ip, port);
        let first = udp_from(bed.client(), client_any);
        until_served(&format!("UDP {to}"), || {
            ask(&first, to, Duration::from_millis(400)).map_err(|e| e.to_string())
        });
        flows += 1;
        let sockets: Vec<_> = (0..6).map(|_| udp_from(bed.client(), client_any)).collect();
        flows += sockets.len();
        for round in 0..2 {
            for (i, s) in sockets.iter().enumerate() {
                let local = s.local_addr().expect("local address");
                udp_round(
                    s,
                    to,
                    local,
                    &format!("UDP round {round}, port {i} -> {to}"),
                );
            }
        }
    }
    let (preserved, fallbacks) = preserve_counts(bed.node()).expect("scraping /metrics");
    assert_eq!(fallbacks, 0.0);
    // At least: an attempt of `until_served` may reach the proxy and
    // still fail (the node port's rules landing a moment later).
    assert!(
        preserved >= flows as f64,
        "{flows} flows: {preserved} preserved"
    );
    proxy.assert_running("end");
}

// ---------------------------------------------------------------------------
// The node-wide switch.

#[test]
fn preserve_client_ip_off_gives_the_nodes_address_and_installs_no_policy_route() {
    if !lab::require_root_and_nft(
        "preserve_client_ip_off_gives_the_nodes_address_and_installs_no_policy_route",
    ) {
        return;
    }
    let (bed, _servers) = bed("off", 1);
    let udp = bed.lab.backends()[0]
        .udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
        .expect("backend UDP socket");
    let _udp_server = {
        let _guard = bed.runtime().enter();
        peers::udp_whoami(udp, &backend_name(0)).expect("UDP whoami")
    };
    // Local and annotated "true": on by every Service-level rule.
    let svc = lb_svc("web", VIP_A)
        .with_port(
            PortManifest::udp(SVC_PORT, BACKEND_PORT)
                .named("udp")
                .with_node_port(NODE_PORT_UDP),
        )
        .with_traffic_policies("Local", "Local")
        .with_annotation(ANNOTATION, "true")
        .with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(
        &manifests(&[svc]),
        &[
            "--hostname-override",
            "node-1",
            "--preserve-client-ip",
            "off",
        ],
    );
    wait_rules(&mut proxy, bed.node(), VIP_A);
    wait_udp_rules(&mut proxy, bed.node(), VIP_A);
    let lb = SocketAddr::from((LB_IP, SVC_PORT));
    for i in 0..4 {
        let what = format!("TCP connection {i}");
        let (name, peer, _) = seen(bed.client(), any_port(CLIENT_ADDR), lb, &what);
        assert_eq!(name, backend_name(0), "{what}");
        assert_eq!(peer.ip(), NODE_ADDR, "{what}: the node's address");
    }
    let s = udp_from(bed.client(), any_port(CLIENT_ADDR));
    for i in 0..3 {
        let a = ask(&s, lb, ANSWER_WAIT).unwrap_or_else(|e| panic!("UDP {i}: {e}"));
        assert_eq!(a.from, lb, "UDP {i}");
        assert_eq!(a.seen.ip(), NODE_ADDR, "UDP {i}: the node's address");
    }
    let ip = |args: &[&str]| {
        let out = bed.node().output("ip", args).expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = ip(&["-4", "rule", "show"]);
    assert!(!rules.contains(&format!("lookup {TABLE}")), "{rules}");
    let routes = ip(&["-4", "route", "show", "table", "all"]);
    assert!(!routes.contains(&format!("table {TABLE}")), "{routes}");
    let ruleset = String::from_utf8_lossy(
        &bed.node()
            .output("nft", ["list", "ruleset"])
            .expect("nft")
            .stdout,
    )
    .into_owned();
    assert!(!ruleset.contains("0x00001000"), "{ruleset}");
    let (preserved, fallbacks) = preserve_counts(bed.node()).expect("scraping /metrics");
    assert_eq!(preserved, 0.0);
    assert_eq!(fallbacks, 0.0);
    proxy.assert_running("end");
}

/// A socket of type `ty` on the node bound to `addr`, a client's address
/// and port (transparent, without SO_REUSEADDR), so that the proxy cannot
/// take it; held until dropped.
fn hold_on_node(node: &Netns, addr: SocketAddr, ty: socket2::Type) -> socket2::Socket {
    node.run(move || -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, ty, None)?;
        s.set_ip_transparent_v4(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    })
    .expect("entering the node")
    .expect("holding the client's port on the node")
}

/// The node's `kubeuproxy_client_ip_preserved_total` and
/// `kubeuproxy_preserve_client_ip_fallbacks_total`.
fn preserve_counts(node: &Netns) -> Result<(f64, f64), String> {
    let samples = scrape(node)?;
    let get = |n: &str| metric_sum(&samples, n, &[]).0;
    Ok((
        get("kubeuproxy_client_ip_preserved_total"),
        get("kubeuproxy_preserve_client_ip_fallbacks_total"),
    ))
}

/// Waits until the node counts one connection (or flow) from the client's
/// address and one fallback: the fallback tests' one of each.
fn wait_one_fallback_one_preserved(node: &Netns) {
    let counted = poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let (p, f) = preserve_counts(node)?;
        if (f, p) == (1.0, 1.0) {
            Ok(())
        } else {
            Err(format!("fallbacks {f}, preserved {p}"))
        }
    });
    counted.unwrap_or_else(|e| panic!("the fallback was not counted: {e}"));
}
