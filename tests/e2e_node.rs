//! End-to-end tests of what the node around the proxy may look like
//! (issue 19, items 3–5): node settings and addresses that must not take
//! the node's Services down. Each test builds its own namespace lab (see
//! tests/lab/src/e2e.rs) and runs the release binary with `--manifests`.
//!
//! - A node with `ip_nonlocal_bind=1` (IPv4 and IPv6: keepalived, kube-vip,
//!   HAProxy nodes) still gets the proxy addresses on `lo`, and a
//!   ClusterIP Service answers.
//!
//! Need root and `nft`: without them they print `SKIP …` (fail if `CI` is set).

use std::net::Ipv4Addr;

use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, SVC_PORT, Testbed, VIP_A, vip, wait_nft_key, who_or_panic,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr};

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
