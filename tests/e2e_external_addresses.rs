//! End-to-end tests of a Service's external addresses.
//!
//! - externalIPs reach the Service over TCP and UDP.
//! - A LoadBalancer ingress IP admits `loadBalancerSourceRanges` and drops
//!   other sources; an `ipMode: Proxy` ingress is left alone.
//! - Without endpoints, externalIPs, LB IPs and node ports refuse like the
//!   ClusterIP.
//!
//! The release binary runs in the node namespace of a [`Lab`] with real
//! nftables rules and real sockets; clients run in the client, backend and
//! node namespaces, never in the root one. Backends run the TCP whoami
//! server and a UDP whoami ([`udp_whoami`]: `"<name> <source it saw>
//! <datagram>"`) on 8080 ([`UdpBed`]). The helpers shared with
//! tests/e2e_udp.rs and tests/e2e_nodeport.rs are in
//! tests/lab/src/e2e/udp.rs. These tests need root and `nft`; without root
//! they print `SKIP ...` (or fail, if `CI` is set).
//!
//! [`Lab`]: uproxy_lab::Lab
//! [`udp_whoami`]: uproxy_lab::peers::udp_whoami

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use uproxy_lab::e2e::udp::{
    ANSWER_WAIT, NODE_PORT_TCP, NODE_PORT_UDP, TCP_WAIT, UdpBed, ask_connected, assert_tcp_dropped,
    assert_tcp_not_proxied, assert_udp_not_proxied, ep, first_answer, tcp_greeting, udp_client,
    wait_key, wait_tcp_udp,
};
use uproxy_lab::e2e::{BACKEND_PORT, SVC_PORT, VIP_C, VIP_D, backend_name, manifests, poll};
use uproxy_lab::manifests::{EndpointManifest, IpMode, PortManifest, ServiceManifest, ServiceType};
use uproxy_lab::peers;
use uproxy_lab::{self as lab, CLIENT_ADDR, NODE_BRIDGE_ADDR, NODE_CLIENT_ADDR, Netns};

const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 9);

const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 8, 8);

const LB_PROXY_MODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 7, 7);

/// Service `name` with port 80 over TCP (named `tcp`) and UDP (named `udp`),
/// both to 8080, and a slice with `endpoints`.
fn tcp_udp_svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).named("tcp"))
        .with_port(PortManifest::udp(SVC_PORT, BACKEND_PORT).named("udp"))
        .with_endpoints(endpoints)
}

/// A LoadBalancer Service (as the API server fills it in: node ports
/// `node_port` for 80/TCP and `node_port + 1` for 80/UDP), without ingress.
fn lb_svc(name: &str, ip: Ipv4Addr, node_port: u16) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_type(ServiceType::LoadBalancer)
        .with_port(
            PortManifest::tcp(SVC_PORT, BACKEND_PORT)
                .named("tcp")
                .with_node_port(node_port),
        )
        .with_port(
            PortManifest::udp(SVC_PORT, BACKEND_PORT)
                .named("udp")
                .with_node_port(node_port + 1),
        )
        .with_endpoints(vec![ep(0)])
}

// ---------------------------------------------------------------------------
// externalIPs.

#[test]
fn external_ips_reach_the_service_over_tcp_and_udp() {
    if !lab::require_root_and_nft("external_ips_reach_the_service_over_tcp_and_udp") {
        return;
    }
    let bed = UdpBed::new("external-ip", 2);
    let svc = tcp_udp_svc("ext", VIP_C, vec![ep(0)]).with_external_ips([EXTERNAL_IP]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &[]);
    wait_tcp_udp(&mut proxy, bed.node(), VIP_C);

    let pod = bed.backend(1).clone();
    let to = SocketAddr::from((EXTERNAL_IP, SVC_PORT));
    for (ns, what) in [(bed.client(), "client"), (&pod, "pod")] {
        assert_eq!(tcp_greeting(ns, to, what), backend_name(0), "{what}: TCP");
        let a = first_answer(ns, to, what);
        assert_eq!(a.name, backend_name(0), "{what}: UDP");
        assert_eq!(
            a.from, to,
            "{what}: the UDP answer came from another address"
        );
    }
    // Another port of the external IP is not the Service's.
    assert_tcp_not_proxied(
        bed.client(),
        SocketAddr::from((EXTERNAL_IP, 81)),
        "client -> externalIP:81",
    );
}

// ---------------------------------------------------------------------------
// Load balancers.

#[test]
fn a_load_balancer_ip_admits_its_source_ranges_and_drops_other_sources() {
    if !lab::require_root_and_nft(
        "a_load_balancer_ip_admits_its_source_ranges_and_drops_other_sources",
    ) {
        return;
    }
    let bed = UdpBed::new("lb-ranges", 2);
    let lb = lb_svc("lb", VIP_D, 30090)
        .with_source_ranges(["10.200.0.0/24"])
        .with_lb_ingress(LB_IP, Some(IpMode::Vip));
    let (mut proxy, _) = bed.start_proxy(&manifests(&[lb]), &[]);
    wait_tcp_udp(&mut proxy, bed.node(), VIP_D);
    let to = SocketAddr::from((LB_IP, SVC_PORT));

    // The client (10.200.0.2) is in 10.200.0.0/24.
    assert_eq!(CLIENT_ADDR.octets()[..3], [10, 200, 0]);
    assert_eq!(
        tcp_greeting(bed.client(), to, "client (allowed) -> LB IP"),
        backend_name(0)
    );
    let a = first_answer(bed.client(), to, "client (allowed) -> LB IP, UDP");
    assert_eq!((a.name.as_str(), a.from), (backend_name(0).as_str(), to));

    // A pod (10.200.1.11) is not: dropped, over TCP and UDP...
    let pod = bed.backend(1).clone();
    assert_tcp_dropped(&pod, to, "pod (outside the ranges) -> LB IP");
    assert_udp_not_proxied(&pod, to, "pod (outside the ranges) -> LB IP");
    // ...while the same pod reaches the Service's ClusterIP and node port
    // (the ranges guard the LB IPs only), and the client still reaches the
    // LB IP.
    assert_eq!(
        tcp_greeting(
            &pod,
            SocketAddr::from((VIP_D, SVC_PORT)),
            "pod -> ClusterIP"
        ),
        backend_name(0)
    );
    assert_eq!(
        tcp_greeting(
            &pod,
            SocketAddr::from((NODE_BRIDGE_ADDR, 30090)),
            "pod -> the LB Service's node port"
        ),
        backend_name(0)
    );
    assert_eq!(
        tcp_greeting(bed.client(), to, "client (allowed) -> LB IP, again"),
        backend_name(0)
    );
}

#[test]
fn a_load_balancer_ingress_in_proxy_mode_is_not_intercepted() {
    if !lab::require_root_and_nft("a_load_balancer_ingress_in_proxy_mode_is_not_intercepted") {
        return;
    }
    let mut bed = UdpBed::new("lb-proxy-mode", 2);
    // The external load balancer that owns the ingress IP (ipMode: Proxy:
    // it proxies to the nodes itself) is a host the node routes to, with
    // its own server on port 80. (The node gets a real node's default
    // route, which the proxy ARP of that host's link needs.)
    bed.lab.route_node_by_default().expect("node default route");
    let lb_ns = bed
        .lab
        .add_routed_pod("lb", LB_PROXY_MODE_IP)
        .expect("the load balancer's namespace");
    let lb_listener = lb_ns
        .tcp_listener(SocketAddr::from((LB_PROXY_MODE_IP, SVC_PORT)))
        .expect("load balancer listener");
    let _lb_server = {
        let _g = bed.runtime().enter();
        peers::whoami(lb_listener, "external-lb").expect("load balancer server")
    };
    let to_lb = SocketAddr::from((LB_PROXY_MODE_IP, SVC_PORT));
    assert_eq!(
        tcp_greeting(bed.client(), to_lb, "the load balancer, before the proxy"),
        "external-lb"
    );

    // Two LoadBalancer Services: one behind a VIP-mode ingress (the
    // control: intercepted), one behind the Proxy-mode ingress.
    let vip_mode = lb_svc("lb-vip", VIP_C, 30090).with_lb_ingress(LB_IP, Some(IpMode::Vip));
    let proxy_mode =
        lb_svc("lb-proxy", VIP_D, 30092).with_lb_ingress(LB_PROXY_MODE_IP, Some(IpMode::Proxy));
    let (mut proxy, _) = bed.start_proxy(&manifests(&[vip_mode, proxy_mode]), &[]);
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_D,
        "tcp",
        SVC_PORT,
    );
    // The Proxy-mode Service works on its ClusterIP, the VIP-mode ingress
    // IP is intercepted...
    assert_eq!(
        tcp_greeting(
            bed.client(),
            SocketAddr::from((VIP_D, SVC_PORT)),
            "ClusterIP"
        ),
        backend_name(0)
    );
    assert_eq!(
        tcp_greeting(
            bed.client(),
            SocketAddr::from((LB_IP, SVC_PORT)),
            "ipMode: VIP ingress"
        ),
        backend_name(0)
    );
    // ...and traffic to the Proxy-mode ingress IP still reaches the load
    // balancer, from outside and from a pod.
    for (ns, what) in [(bed.client(), "client"), (bed.backend(1), "pod")] {
        for i in 0..3 {
            assert_eq!(
                tcp_greeting(ns, to_lb, what),
                "external-lb",
                "{what}: connection {i} to the ipMode: Proxy ingress IP was intercepted"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Without endpoints.

/// Whether TCP to `to` from `ns` is refused at once (not left hanging).
fn tcp_refused(ns: &Netns, to: SocketAddr) -> Result<(), String> {
    let t0 = Instant::now();
    match ns.tcp_connect(to, TCP_WAIT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        other => Err(format!(
            "TCP to {to} got {:?} after {:?}, not a refusal",
            other.map(|_| "a connection"),
            t0.elapsed()
        )),
    }
}

/// Whether a connected UDP socket of `ns` to `to` gets ECONNREFUSED.
fn udp_refused(ns: &Netns, to: SocketAddr) -> Result<(), String> {
    let socket = udp_client(ns);
    socket.connect(to).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    match ask_connected(&socket, ANSWER_WAIT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        other => Err(format!(
            "a connected UDP socket to {to} got {other:?} after {:?}, not ECONNREFUSED",
            t0.elapsed()
        )),
    }
}

#[test]
fn external_ips_load_balancer_ips_and_node_ports_without_endpoints_are_refused() {
    if !lab::require_root_and_nft(
        "external_ips_load_balancer_ips_and_node_ports_without_endpoints_are_refused",
    ) {
        return;
    }
    let bed = UdpBed::new("refuse-external", 0);
    // A real node's routing (a default route): refused traffic to an
    // externalIP or LB IP is on its way to be forwarded, where the
    // filter-forward chain sees it (without any route it dies in routing,
    // before any hook). The lab's client is also the node's default
    // gateway, so that traffic would go back out the link it came in on;
    // the ICMP redirect the kernel then sends the client uses up the ICMP
    // rate-limit budget of that host and the first port-unreachable errors
    // are not sent. Redirects are off here, as a client behind a router
    // would see it.
    bed.lab.route_node_by_default().expect("node default route");
    bed.node()
        .output(
            "sh",
            [
                "-c",
                "echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects; \
                 echo 0 > /proc/sys/net/ipv4/conf/eth0/send_redirects",
            ],
        )
        .expect("turning ICMP redirects off on the node");
    let empty = lb_svc("empty", VIP_D, NODE_PORT_TCP)
        .with_external_ips([EXTERNAL_IP])
        .with_lb_ingress(LB_IP, Some(IpMode::Vip))
        .with_endpoints(vec![]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[empty]), &[]);
    wait_key(
        &mut proxy,
        bed.node(),
        "set",
        "no-endpoints",
        VIP_D,
        "udp",
        SVC_PORT,
    );
    // Like the ClusterIP: refused at once, over TCP and UDP. Every case is
    // tried (each retried a little: the rules for the other addresses may
    // land just after the ClusterIP's), then all failures reported.
    let mut failures = Vec::new();
    for (ip, tcp_port, udp_port, what) in [
        (VIP_D, SVC_PORT, SVC_PORT, "ClusterIP"),
        (EXTERNAL_IP, SVC_PORT, SVC_PORT, "externalIP"),
        (LB_IP, SVC_PORT, SVC_PORT, "LB IP"),
        (NODE_CLIENT_ADDR, NODE_PORT_TCP, NODE_PORT_UDP, "node port"),
    ] {
        let tcp = SocketAddr::from((ip, tcp_port));
        if let Err(e) = poll(Duration::from_secs(3), Duration::from_millis(200), || {
            tcp_refused(bed.client(), tcp)
        }) {
            failures.push(format!("{what}: {e}"));
        }
        let udp = SocketAddr::from((ip, udp_port));
        if let Err(e) = poll(Duration::from_secs(3), Duration::from_millis(200), || {
            udp_refused(bed.client(), udp)
        }) {
            failures.push(format!("{what}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "without endpoints, not refused:\n{}",
        failures.join("\n")
    );
}
