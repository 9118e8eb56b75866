//! End-to-end tests of NodePort Services.
//!
//! - NodePort over TCP and UDP on every node address and 127.0.0.1, without
//!   a socket on the node port; `--nodeport-addresses` (CIDRs or `primary`:
//!   the Node object's primary IP, the default route's interface until the
//!   Node is known) narrows it, and follows the Node's address.
//! - `externalTrafficPolicy: Local` sends UDP node-port flows to the
//!   node's own endpoints only.
//! - Hairpin: a backend reaches its own Service, through its ClusterIP and
//!   its node port.
//!
//! The release binary runs in the node namespace of a [`Lab`] with real
//! nftables rules and real sockets; clients run in the client, backend and
//! node namespaces, never in the root one. Backends run the TCP whoami
//! server and a UDP whoami ([`udp_whoami`]: `"<name> <source it saw>
//! <datagram>"`) on 8080 ([`UdpBed`]). The helpers shared with
//! tests/e2e_udp.rs and tests/e2e_external_addresses.rs are in
//! tests/lab/src/e2e/udp.rs. These tests need root and `nft`; without root
//! they print `SKIP ...` (or fail, if `CI` is set).
//!
//! [`Lab`]: uproxy_lab::Lab
//! [`udp_whoami`]: uproxy_lab::peers::udp_whoami

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use uproxy_lab::e2e::udp::{
    ANSWER_WAIT, NODE_PORT_TCP, NODE_PORT_UDP, UdpBed, ask_connected, assert_tcp_not_proxied,
    assert_udp_not_proxied, ep, first_answer, listed_ports, tcp_greeting, udp_client, wait_tcp_udp,
};
use uproxy_lab::e2e::{
    BACKEND_PORT, READY_TIMEOUT, SVC_PORT, VIP_A, VIP_B, backend_name, close, hold, manifests,
    poll, write_by_rename,
};
use uproxy_lab::manifests::{
    EndpointManifest, PortManifest, ServiceManifest, ServiceType, node_with_addresses_yaml,
};
use uproxy_lab::{self as lab, NODE_BRIDGE_ADDR, NODE_CLIENT_ADDR};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// The proxy's node name (`--hostname-override`), and its Node object's.
const NODE: &str = "node-1";

/// A NodePort Service: 80/TCP on node port 30080, 80/UDP on 30081.
fn node_port_svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_type(ServiceType::NodePort)
        .with_port(
            PortManifest::tcp(SVC_PORT, BACKEND_PORT)
                .named("tcp")
                .with_node_port(NODE_PORT_TCP),
        )
        .with_port(
            PortManifest::udp(SVC_PORT, BACKEND_PORT)
                .named("udp")
                .with_node_port(NODE_PORT_UDP),
        )
        .with_endpoints(endpoints)
}

// ---------------------------------------------------------------------------
// NodePort.

#[test]
fn node_ports_serve_tcp_and_udp_on_every_node_address_without_a_socket_on_the_port() {
    if !lab::require_root_and_nft(
        "node_ports_serve_tcp_and_udp_on_every_node_address_without_a_socket_on_the_port",
    ) {
        return;
    }
    let bed = UdpBed::new("nodeport", 2);
    let (mut proxy, _) =
        bed.start_proxy(&manifests(&[node_port_svc("np", VIP_B, vec![ep(0)])]), &[]);
    wait_tcp_udp(&mut proxy, bed.node(), VIP_B);

    let pod = bed.backend(1).clone();
    for (ns, node_addr, what) in [
        (
            bed.client(),
            NODE_CLIENT_ADDR,
            "client -> node eth0 address",
        ),
        (
            bed.client(),
            NODE_BRIDGE_ADDR,
            "client -> node br0 address (the node's other address)",
        ),
        (bed.node(), LOCALHOST, "node -> 127.0.0.1"),
        (bed.node(), NODE_BRIDGE_ADDR, "node -> its br0 address"),
        (bed.node(), NODE_CLIENT_ADDR, "node -> its eth0 address"),
        (&pod, NODE_BRIDGE_ADDR, "pod -> node br0 address"),
    ] {
        let tcp = SocketAddr::from((node_addr, NODE_PORT_TCP));
        assert_eq!(
            tcp_greeting(ns, tcp, what),
            backend_name(0),
            "{what}: TCP {tcp}"
        );
        let udp = SocketAddr::from((node_addr, NODE_PORT_UDP));
        let a = first_answer(ns, udp, what);
        assert_eq!(a.name, backend_name(0), "{what}: UDP {udp}");
        assert_eq!(
            a.from, udp,
            "{what}: the UDP answer came from another address"
        );
        let connected = udp_client(ns);
        connected.connect(udp).expect("connect");
        ask_connected(&connected, ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("{what}: connected UDP socket to {udp}: {e}"));
    }
    // The ClusterIP of a NodePort Service works as ever.
    assert_eq!(
        tcp_greeting(
            bed.client(),
            SocketAddr::from((VIP_B, SVC_PORT)),
            "ClusterIP"
        ),
        backend_name(0)
    );

    // Nothing is bound to the node ports: nothing to conflict with, nothing
    // reachable around the rules.
    let sockets = listed_ports(bed.node(), "-Hltnu");
    let on_node_ports: Vec<_> = sockets
        .iter()
        .filter(|(_, p)| [NODE_PORT_TCP, NODE_PORT_UDP].contains(p))
        .collect();
    assert!(
        on_node_ports.is_empty(),
        "sockets on the node ports: {on_node_ports:?}"
    );
    proxy.assert_running("end");
}

#[test]
fn nodeport_addresses_limit_node_ports_to_the_given_cidrs() {
    if !lab::require_root_and_nft("nodeport_addresses_limit_node_ports_to_the_given_cidrs") {
        return;
    }
    let bed = UdpBed::new("nodeport-cidr", 2);
    let (mut proxy, _) = bed.start_proxy(
        &manifests(&[node_port_svc("np", VIP_B, vec![ep(0)])]),
        &["--nodeport-addresses", "10.200.0.0/24"],
    );
    wait_tcp_udp(&mut proxy, bed.node(), VIP_B);

    // In the range: the node's eth0 address.
    let tcp = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_TCP));
    assert_eq!(
        tcp_greeting(bed.client(), tcp, "client -> 10.200.0.1 (in range)"),
        backend_name(0)
    );
    let udp = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_UDP));
    let a = first_answer(bed.client(), udp, "client -> 10.200.0.1 (in range)");
    assert_eq!((a.name.as_str(), a.from), (backend_name(0).as_str(), udp));

    // Out of the range: br0's address and 127.0.0.1.
    let pod = bed.backend(1).clone();
    for (ns, node_addr, what) in [
        (&pod, NODE_BRIDGE_ADDR, "pod -> 10.200.1.1 (out of range)"),
        (bed.node(), LOCALHOST, "node -> 127.0.0.1 (out of range)"),
    ] {
        assert_tcp_not_proxied(ns, SocketAddr::from((node_addr, NODE_PORT_TCP)), what);
        assert_udp_not_proxied(ns, SocketAddr::from((node_addr, NODE_PORT_UDP)), what);
    }
    // The ClusterIP is not affected by the flag.
    assert_eq!(
        tcp_greeting(
            &pod,
            SocketAddr::from((VIP_B, SVC_PORT)),
            "pod -> ClusterIP"
        ),
        backend_name(0)
    );
    proxy.assert_running("end");
}

#[test]
fn nodeport_addresses_primary_means_the_addresses_of_the_default_route_interface() {
    if !lab::require_root_and_nft(
        "nodeport_addresses_primary_means_the_addresses_of_the_default_route_interface",
    ) {
        return;
    }
    let bed = UdpBed::new("nodeport-primary", 2);
    // A real node's routing: the default route through eth0 (10.200.0.1).
    bed.lab.route_node_by_default().expect("node default route");
    let (mut proxy, _) = bed.start_proxy(
        &manifests(&[node_port_svc("np", VIP_B, vec![ep(0)])]),
        &["--nodeport-addresses", "primary"],
    );
    wait_tcp_udp(&mut proxy, bed.node(), VIP_B);
    let tcp = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_TCP));
    assert_eq!(
        tcp_greeting(bed.client(), tcp, "client -> 10.200.0.1 (primary)"),
        backend_name(0)
    );
    let udp = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_UDP));
    let a = first_answer(bed.client(), udp, "client -> 10.200.0.1 (primary)");
    assert_eq!((a.name.as_str(), a.from), (backend_name(0).as_str(), udp));
    let pod = bed.backend(1).clone();
    for (ns, node_addr, what) in [
        (
            &pod,
            NODE_BRIDGE_ADDR,
            "pod -> 10.200.1.1 (br0, not primary)",
        ),
        (bed.node(), LOCALHOST, "node -> 127.0.0.1 (not primary)"),
    ] {
        assert_tcp_not_proxied(ns, SocketAddr::from((node_addr, NODE_PORT_TCP)), what);
        assert_udp_not_proxied(ns, SocketAddr::from((node_addr, NODE_PORT_UDP)), what);
    }
}

/// `primary` with the Node object known (kube-proxy's meaning): node ports
/// are caught on the Node's first `InternalIP`, here the bridge address
/// 10.200.1.1, and not on eth0's 10.200.0.1, which holds the default
/// route (the stand-in until the Node is known); when the Node's address
/// changes, the rules follow it.
#[test]
fn nodeport_addresses_primary_is_the_node_objects_internal_ip_and_follows_it() {
    if !lab::require_root_and_nft(
        "nodeport_addresses_primary_is_the_node_objects_internal_ip_and_follows_it",
    ) {
        return;
    }
    let bed = UdpBed::new("nodeport-node-ip", 2);
    bed.lab.route_node_by_default().expect("node default route");
    let svc = manifests(&[node_port_svc("np", VIP_B, vec![ep(0)])]);
    let with_node = |internal_ip: &str| {
        svc.clone()
            + "---\n"
            + &node_with_addresses_yaml(
                NODE,
                &[
                    ("InternalIP", internal_ip),
                    ("ExternalIP", "203.0.113.7"),
                    ("Hostname", NODE),
                ],
                &[],
            )
    };
    let (mut proxy, path) = bed.start_proxy(
        &with_node(&NODE_BRIDGE_ADDR.to_string()),
        &[
            "--hostname-override",
            NODE,
            "--nodeport-addresses",
            "primary",
        ],
    );
    wait_tcp_udp(&mut proxy, bed.node(), VIP_B);
    let pod = bed.backend(1).clone();
    let on_bridge = SocketAddr::from((NODE_BRIDGE_ADDR, NODE_PORT_TCP));
    let on_uplink = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_TCP));
    assert_eq!(
        tcp_greeting(&pod, on_bridge, "pod -> 10.200.1.1 (the Node's InternalIP)"),
        backend_name(0)
    );
    assert_tcp_not_proxied(
        bed.client(),
        on_uplink,
        "client -> 10.200.0.1 (default route, not the Node's address)",
    );
    assert_tcp_not_proxied(
        bed.node(),
        SocketAddr::from((LOCALHOST, NODE_PORT_TCP)),
        "node -> 127.0.0.1",
    );

    // The Node's InternalIP becomes eth0's: the node port moves with it.
    write_by_rename(&path, &with_node(&NODE_CLIENT_ADDR.to_string()));
    assert_eq!(
        tcp_greeting(
            bed.client(),
            on_uplink,
            "client -> 10.200.0.1 (the Node's new InternalIP)"
        ),
        backend_name(0)
    );
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        match hold(&pod, on_bridge) {
            Ok((s, name)) => {
                close(s);
                Err(format!("{on_bridge} still proxied (answered by {name})"))
            }
            Err(_) => Ok(()),
        }
    })
    .unwrap_or_else(|e| panic!("the node port stayed on the Node's old address: {e}"));
    proxy.assert_running("end");
    assert!(
        !proxy.stderr().contains("differs from what was applied"),
        "the drift check found the table other than written"
    );
}

#[test]
fn external_traffic_policy_local_sends_udp_node_port_flows_to_local_endpoints_only() {
    if !lab::require_root_and_nft(
        "external_traffic_policy_local_sends_udp_node_port_flows_to_local_endpoints_only",
    ) {
        return;
    }
    // The ClusterIP and the node port arrive at the proxy address alike:
    // only a listener of its own tells the node port's flows apart.
    let bed = UdpBed::new("etp-udp", 2);
    let remote = EndpointManifest {
        node_name: Some("node-2".to_string()),
        ..ep(1)
    };
    let svc =
        node_port_svc("np", VIP_B, vec![ep(0), remote]).with_traffic_policies("Cluster", "Local");
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &["--hostname-override", "node-1"]);
    wait_tcp_udp(&mut proxy, bed.node(), VIP_B);
    let names = |to: SocketAddr| -> BTreeSet<String> {
        (0..8)
            .map(|i| first_answer(bed.client(), to, &format!("flow {i} to {to}")).name)
            .collect()
    };
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT_UDP));
    assert_eq!(
        names(node_port),
        BTreeSet::from([backend_name(0)]),
        "UDP node port flows under externalTrafficPolicy=Local: the endpoint on node-1 only"
    );
    assert_eq!(
        names(SocketAddr::from((VIP_B, SVC_PORT))),
        BTreeSet::from([backend_name(0), backend_name(1)]),
        "UDP ClusterIP flows: every endpoint"
    );
    proxy.assert_running("end");
}

// ---------------------------------------------------------------------------
// Hairpin.

#[test]
fn a_backend_reaches_its_own_service_when_chosen_as_the_endpoint() {
    if !lab::require_root_and_nft("a_backend_reaches_its_own_service_when_chosen_as_the_endpoint") {
        return;
    }
    let bed = UdpBed::new("hairpin", 1);
    let (mut proxy, _) =
        bed.start_proxy(&manifests(&[node_port_svc("web", VIP_A, vec![ep(0)])]), &[]);
    wait_tcp_udp(&mut proxy, bed.node(), VIP_A);
    let me = bed.backend(0).clone();
    for (addr, what) in [
        (VIP_A, "backend0 -> its own ClusterIP"),
        (NODE_BRIDGE_ADDR, "backend0 -> its own node port"),
    ] {
        let (tcp_port, udp_port) = if addr == VIP_A {
            (SVC_PORT, SVC_PORT)
        } else {
            (NODE_PORT_TCP, NODE_PORT_UDP)
        };
        for i in 0..3 {
            assert_eq!(
                tcp_greeting(&me, SocketAddr::from((addr, tcp_port)), what),
                backend_name(0),
                "{what}: TCP connection {i}"
            );
        }
        let udp = SocketAddr::from((addr, udp_port));
        let a = first_answer(&me, udp, what);
        assert_eq!(a.name, backend_name(0), "{what}: UDP");
        assert_eq!(
            a.from, udp,
            "{what}: the UDP answer came from another address"
        );
        let connected = udp_client(&me);
        connected.connect(udp).expect("connect");
        for i in 0..3 {
            let b = ask_connected(&connected, ANSWER_WAIT)
                .unwrap_or_else(|e| panic!("{what}: UDP datagram {i}: {e}"));
            assert_eq!(b.name, backend_name(0), "{what}: UDP datagram {i}");
        }
    }
}
