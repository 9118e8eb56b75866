//! End-to-end tests of what the node around the proxy may look like
//! (issue 19, items 3–5): node settings and addresses that must not take
//! the node's Services down. Each test builds its own namespace lab (see
//! tests/lab/src/e2e.rs) and runs the release binary with `--manifests`.
//!
//! - A node with `ip_nonlocal_bind=1` (IPv4 and IPv6: keepalived, kube-vip,
//!   HAProxy nodes) still gets the proxy addresses on `lo`, and a
//!   ClusterIP Service answers.
//! - The health check node port of an `externalTrafficPolicy: Local`
//!   Service and `/healthz` (default `0.0.0.0:10256`) answer an IPv6 load
//!   balancer as well as an IPv4 one; with `--nodeport-addresses` the
//!   health check node port listens only on the node's addresses within
//!   those CIDRs; with `--nodeport-addresses primary`, on the Node
//!   object's primary IP, and it follows that IP when it changes.
//! - An endpoint whose address and port are themselves a Service
//!   destination (an externalIP equal to a node address, a hostNetwork
//!   backend on that port) is reached once, not looped back into the
//!   proxy: the proxy's fds stay bounded and other Services keep working.
//!
//! Need root and `nft`: without them they print `SKIP …` (fail if `CI` is set).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    VIP_C, http_get, poll, vip, wait_http_refused, wait_nft_key, who, who_or_panic,
    write_by_rename,
};
use uproxy_lab::manifests::{
    EndpointManifest, PortManifest, ServiceManifest, ServiceType, node_with_addresses_yaml,
};
use uproxy_lab::peers;
use uproxy_lab::{
    self as lab, NODE_BRIDGE_ADDR, NODE_BRIDGE_ADDR_V6, NODE_CLIENT_ADDR, NODE_CLIENT_ADDR_V6,
    Netns, backend_addr,
};

fn service(name: &str, ip: Ipv4Addr, endpoints: Vec<Ipv4Addr>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints.into_iter().map(EndpointManifest::ready).collect())
}

/// Runs `sh -c script` in `ns`; panics if it fails.
fn sh(ns: &Netns, script: &str) {
    let out = ns
        .output("sh", ["-c", script])
        .unwrap_or_else(|e| panic!("`{script}` in {}: {e}", ns.name()));
    assert!(
        out.status.success(),
        "`{script}` in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `ip addr show dev lo` prints in `ns`.
fn lo_addresses(ns: &Netns) -> String {
    let out = ns
        .output("ip", ["addr", "show", "dev", "lo"])
        .expect("ip addr show dev lo");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_node_with_ip_nonlocal_bind_gets_the_proxy_address_and_serves() {
    if !lab::require_root_and_nft("a_node_with_ip_nonlocal_bind_gets_the_proxy_address_and_serves")
    {
        return;
    }
    let bed = Testbed::new("node", "nonlocal-bind", &[Backend::Whoami]);
    // What keepalived / kube-vip nodes set: a bind to any address succeeds.
    sh(
        bed.node(),
        "echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind && echo 1 > /proc/sys/net/ipv6/ip_nonlocal_bind",
    );
    let yaml = e2e::manifests(&[service("svc-a", VIP_A, vec![backend_addr(0)])]);
    let (mut proxy, _) = bed.start_proxy(&yaml, &[]);
    wait_nft_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_A,
        true,
        "svc-a programmed",
    );
    let lo = lo_addresses(bed.node());
    assert!(
        lo.contains("169.254.42.1/32"),
        "the IPv4 proxy address is not on lo despite ip_nonlocal_bind=1:\n{lo}"
    );
    assert!(
        lo.contains("fd6b:7570:7278::1/128"),
        "the IPv6 proxy address is not on lo despite ip_nonlocal_bind=1:\n{lo}"
    );
    // From a pod routed through the node and from the node itself.
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_A), "ClusterIP from a pod"),
        "backend0"
    );
    assert_eq!(
        who_or_panic(bed.node(), vip(VIP_A), "ClusterIP from the node"),
        "backend0"
    );
    proxy.assert_running("after the connections");
}

/// Polls `GET path` on `addr` from `ns` until it answers 200; the body.
fn wait_200(proxy: &mut ProxyProcess, ns: &Netns, addr: SocketAddr, path: &str) -> String {
    let mut body = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        proxy.assert_running("waiting for a health answer");
        match http_get(ns, addr, path)? {
            (200, b) => {
                body = b;
                Ok(())
            }
            (status, b) => Err(format!("{status}: {b}")),
        }
    })
    .unwrap_or_else(|e| panic!("GET {path} on {addr} from {}: {e}", ns.name()));
    body
}

const NODE_NAME: &str = "node-1";
const HEALTH_CHECK_PORT: u16 = 32000;

/// An `externalTrafficPolicy: Local` NodePort Service with one endpoint
/// on this node and its health check node port.
fn local_service() -> ServiceManifest {
    ServiceManifest::new("web", VIP_A)
        .with_type(ServiceType::NodePort)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(30080))
        .with_traffic_policies("Cluster", "Local")
        .with_health_check_node_port(HEALTH_CHECK_PORT)
        .with_endpoints(vec![
            EndpointManifest::ready(backend_addr(0)).on_node(NODE_NAME),
        ])
}

#[test]
fn health_checks_and_healthz_answer_ipv6_load_balancers() {
    if !lab::require_root_and_nft("health_checks_and_healthz_answer_ipv6_load_balancers") {
        return;
    }
    let bed = Testbed::new("node", "hc-ipv6", &[Backend::Whoami]);
    bed.lab.add_ipv6().expect("IPv6 in the lab");
    let yaml = e2e::manifests(&[local_service()]);
    // Default --healthz-bind-address (0.0.0.0:10256), as deployed.
    let (mut proxy, _) = bed.start_proxy(&yaml, &["--hostname-override", NODE_NAME]);
    let hc_v4 = SocketAddr::from((NODE_CLIENT_ADDR, HEALTH_CHECK_PORT));
    let hc_v6 = SocketAddr::from((NODE_CLIENT_ADDR_V6, HEALTH_CHECK_PORT));
    let body = wait_200(&mut proxy, bed.client(), hc_v4, "/");
    assert!(body.contains("\"localEndpoints\": 1"), "IPv4: {body}");
    // An IPv6 load balancer's check of the same node.
    let body = wait_200(&mut proxy, bed.client(), hc_v6, "/");
    assert!(body.contains("\"localEndpoints\": 1"), "IPv6: {body}");
    wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR_V6, 10256)),
        "/healthz",
    );
    wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, 10256)),
        "/healthz",
    );
}

#[test]
fn health_checks_listen_only_on_the_nodeport_addresses_when_given() {
    if !lab::require_root_and_nft("health_checks_listen_only_on_the_nodeport_addresses_when_given")
    {
        return;
    }
    let bed = Testbed::new("node", "hc-npa", &[Backend::Whoami]);
    bed.lab.add_ipv6().expect("IPv6 in the lab");
    let yaml = e2e::manifests(&[local_service()]);
    // The client link's addresses only, both families: not the bridge's.
    let (mut proxy, _) = bed.start_proxy(
        &yaml,
        &[
            "--hostname-override",
            NODE_NAME,
            "--nodeport-addresses",
            "10.200.0.0/24,fd00:200::/64",
        ],
    );
    wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, HEALTH_CHECK_PORT)),
        "/",
    );
    wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR_V6, HEALTH_CHECK_PORT)),
        "/",
    );
    for other in [
        IpAddr::from(NODE_BRIDGE_ADDR),
        IpAddr::from(NODE_BRIDGE_ADDR_V6),
    ] {
        let to = SocketAddr::new(other, HEALTH_CHECK_PORT);
        wait_http_refused(bed.client(), to)
            .unwrap_or_else(|e| panic!("{to} is outside --nodeport-addresses: {e}"));
    }
}

/// `--nodeport-addresses primary` with the Node object in the manifests
/// from the start: the health check node port listens on the Node's
/// `InternalIP` (here the bridge address, not the default route's, which
/// stands in only until the Node is known), as the node port rules do
/// and as kube-proxy binds it, and it moves when that address changes.
/// A load balancer that checks the node's address would otherwise find
/// nothing there and take the node out.
#[test]
fn health_checks_with_nodeport_addresses_primary_follow_the_nodes_internal_ip() {
    if !lab::require_root_and_nft(
        "health_checks_with_nodeport_addresses_primary_follow_the_nodes_internal_ip",
    ) {
        return;
    }
    let bed = Testbed::new("node", "hc-primary", &[Backend::Whoami]);
    bed.lab.route_node_by_default().expect("node default route");
    let with_node = |internal_ip: Ipv4Addr| {
        e2e::manifests(&[local_service()])
            + "---\n"
            + &node_with_addresses_yaml(
                NODE_NAME,
                &[
                    ("InternalIP", &internal_ip.to_string()),
                    ("Hostname", NODE_NAME),
                ],
                &[],
            )
    };
    let (mut proxy, path) = bed.start_proxy(
        &with_node(NODE_BRIDGE_ADDR),
        &[
            "--hostname-override",
            NODE_NAME,
            "--nodeport-addresses",
            "primary",
        ],
    );
    let on_bridge = SocketAddr::from((NODE_BRIDGE_ADDR, HEALTH_CHECK_PORT));
    let on_uplink = SocketAddr::from((NODE_CLIENT_ADDR, HEALTH_CHECK_PORT));
    let body = wait_200(&mut proxy, bed.client(), on_bridge, "/");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    wait_http_refused(bed.client(), on_uplink)
        .unwrap_or_else(|e| panic!("{on_uplink}, not the Node's address, answers: {e}"));

    // The Node's InternalIP becomes the default route's address.
    write_by_rename(&path, &with_node(NODE_CLIENT_ADDR));
    wait_200(&mut proxy, bed.client(), on_uplink, "/");
    wait_http_refused(bed.client(), on_bridge)
        .unwrap_or_else(|e| panic!("{on_bridge}, the Node's old InternalIP, answers: {e}"));
    proxy.assert_running("end");
}

/// The proxy's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("reading the proxy's fd directory")
}

#[test]
fn an_endpoint_that_is_itself_a_service_destination_is_reached_not_looped() {
    if !lab::require_root_and_nft(
        "an_endpoint_that_is_itself_a_service_destination_is_reached_not_looped",
    ) {
        return;
    }
    let bed = Testbed::new("node", "self-loop", &[Backend::Whoami]);
    // A hostNetwork backend: a server on the node itself, port 80.
    let listener = bed
        .node()
        .tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, SVC_PORT)))
        .expect("the hostNetwork backend's listener");
    let _hostnet = {
        let _guard = bed.runtime().enter();
        peers::whoami(listener, "hostnet").expect("the hostNetwork backend")
    };
    // Its Service has the node's own address as externalIP, on the port
    // the backend listens on: the endpoint is itself a Service destination.
    let looped = ServiceManifest::new("hostnet", VIP_C)
        .with_external_ips([NODE_CLIENT_ADDR])
        .with_port(PortManifest::tcp(SVC_PORT, SVC_PORT))
        .with_endpoints(vec![EndpointManifest::ready(NODE_CLIENT_ADDR)]);
    let other = service("svc-b", VIP_B, vec![backend_addr(0)]);
    let (mut proxy, _) = bed.start_proxy(&e2e::manifests(&[looped, other]), &[]);
    wait_nft_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        NODE_CLIENT_ADDR,
        true,
        "the externalIP programmed",
    );
    let pid = proxy.child.id();
    let baseline = open_fds(pid);
    let external = SocketAddr::from((NODE_CLIENT_ADDR, SVC_PORT));
    for i in 0..2 {
        // The flow is translated once, to the proxy; the proxy's own
        // connection to the endpoint is not translated again.
        let got = who(bed.client(), external);
        assert_eq!(
            got.as_ref().map(String::as_str).ok(),
            Some("hostnet"),
            "connection {i} to the externalIP: {got:?} (the proxy has {} fds, {baseline} before)",
            open_fds(pid)
        );
    }
    // Through the ClusterIP too.
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_C), "the ClusterIP"),
        "hostnet"
    );
    // No storm of connections to itself: the fds stay near the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(pid);
    assert!(
        fds <= baseline + 16,
        "the proxy holds {fds} fds after 3 connections ({baseline} before)"
    );
    // Every other Service keeps working.
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_B), "another Service"),
        "backend0"
    );
    proxy.assert_running("after the connections");
}
