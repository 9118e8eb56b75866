//! End-to-end tests of local-traffic detection (issue 22, item 3):
//! kube-proxy's `--detect-local-mode` (ClusterCIDR, NodeCIDR with the Node
//! object's `spec.podCIDRs`, InterfaceNamePrefix) and `--cluster-cidr`.
//!
//! A pod of the node calls an `externalTrafficPolicy: Local` Service's
//! load-balancer IP and node port on a node where the Service has no
//! endpoint (cert-manager's HTTP-01 self-check through its own ingress is
//! the classic case). kube-proxy treats that traffic as if it had gone out
//! to the load balancer and come back: it goes to the cluster-wide
//! endpoints. An external client still only gets local endpoints, here
//! none: it is dropped.
//!
//! The release binary runs in the node namespace of a lab with real
//! nftables rules (`--hostname-override node-1`); the only endpoint is a
//! backend namespace that the slice puts on `node-2`. The pod is wired as
//! Calico wires one ([`uproxy_lab::Lab::add_routed_pod`]: a /32 behind an
//! address-less `cali<n>` veth). Clients run in the pod and client
//! namespaces, never in the root one. These tests need root and `nft`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use uproxy_lab::e2e::udp::{assert_tcp_dropped, tcp_greeting};
use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, backend_name, http_get,
    manifests, poll, write_by_rename,
};
use uproxy_lab::manifests::{
    EndpointManifest, IpMode, PortManifest, ServiceManifest, ServiceType, node_with_addresses_yaml,
};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, backend_addr};

const NODE: &str = "node-1";
const OTHER_NODE: &str = "node-2";
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 8, 8);
const NODE_PORT: u16 = 30080;
/// The cluster's pod range, and a pod of this node in it.
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// This node's pod range in its Node object (NodeCIDR), holding POD_ADDR.
const NODE_POD_CIDR: &str = "10.244.0.0/24";

/// A LoadBalancer Service on LB_IP with node port 30080, its policies, and
/// one endpoint, on the other node.
fn lb_service(internal: &str, external: &str) -> ServiceManifest {
    ServiceManifest::new("ingress", VIP_A)
        .with_type(ServiceType::LoadBalancer)
        .with_port(
            PortManifest::tcp(SVC_PORT, BACKEND_PORT)
                .named("http")
                .with_node_port(NODE_PORT),
        )
        .with_lb_ingress(LB_IP, Some(IpMode::Vip))
        .with_traffic_policies(internal, external)
        .with_endpoints(vec![
            EndpointManifest::ready(backend_addr(0)).on_node(OTHER_NODE),
        ])
}

/// Starts the proxy with `flags` on the Service (and `node`, a Node
/// object's YAML document, when given) and a pod of the node, then checks
/// what the pod and an external client get.
fn pods_reach_remote_endpoints(tag: &str, internal: &str, flags: &[&str], node: Option<&str>) {
    let mut bed = Testbed::new("local-traffic", tag, &[Backend::Whoami]);
    // A real node's routing (the proxy ARP of the pod's link needs a
    // route to the pod's gateway address): the default route through the
    // uplink.
    bed.lab.route_node_by_default().expect("node default route");
    let pod = bed
        .lab
        .add_routed_pod("pod", POD_ADDR)
        .expect("adding a pod to the node");
    // A drift check every second: the table with the pods' rules and maps
    // must read back as written.
    let mut args = vec!["--hostname-override", NODE, "--sync-period", "1s"];
    args.extend_from_slice(flags);
    let mut yaml = manifests(&[lb_service(internal, "Local")]);
    if let Some(node) = node {
        yaml = yaml + "---\n" + node;
    }
    let (mut proxy, _) = bed.start_proxy(&yaml, &args);
    let node = bed.node().clone();
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("the proxy starts");
        let keys = node
            .nft_keys("map", "ip", "kube-uproxy", "pod-service-ports")
            .map_err(|e| e.to_string())?;
        (!keys.is_empty())
            .then_some(())
            .ok_or_else(|| "pod-service-ports is empty".to_string())
    })
    .unwrap_or_else(|e| panic!("the pods' LB IP key never appeared: {e}"));

    let lb = SocketAddr::from((LB_IP, SVC_PORT));
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    for _ in 0..5 {
        assert_eq!(
            tcp_greeting(
                &pod,
                lb,
                "pod -> LB IP of an externalTrafficPolicy: Local Service"
            ),
            backend_name(0),
            "a pod of the node reaches the remote endpoint through the LB IP"
        );
        assert_eq!(
            tcp_greeting(&pod, node_port, "pod -> node port"),
            backend_name(0),
            "a pod of the node reaches the remote endpoint through the node port"
        );
    }
    // External clients: only local endpoints, and there are none.
    assert_tcp_dropped(bed.client(), lb, "external client -> LB IP");
    assert_tcp_dropped(bed.client(), node_port, "external client -> node port");
    proxy.assert_running("after the clients");
    assert!(
        !proxy.stderr().contains("differs from what was applied"),
        "the drift check found the table other than written"
    );
}

#[test]
fn pods_reach_an_external_policy_local_service_through_its_lb_ip_and_node_port() {
    if !lab::require_root_and_nft(
        "pods_reach_an_external_policy_local_service_through_its_lb_ip_and_node_port",
    ) {
        return;
    }
    // kube-proxy's default mode with --cluster-cidr: ClusterCIDR.
    pods_reach_remote_endpoints("cidr", "Cluster", &["--cluster-cidr", CLUSTER_CIDR], None);
}

#[test]
fn pods_found_by_interface_prefix_reach_a_service_with_both_policies_local() {
    if !lab::require_root_and_nft(
        "pods_found_by_interface_prefix_reach_a_service_with_both_policies_local",
    ) {
        return;
    }
    // Both policies Local: the pods' traffic gets a listener of its own
    // with the cluster-wide endpoints.
    pods_reach_remote_endpoints(
        "prefix",
        "Local",
        &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "cali",
        ],
        None,
    );
}

#[test]
fn pods_found_by_the_node_objects_pod_cidr_reach_remote_endpoints() {
    if !lab::require_root_and_nft("pods_found_by_the_node_objects_pod_cidr_reach_remote_endpoints")
    {
        return;
    }
    // NodeCIDR: this node's pods are the Node object's spec.podCIDRs (the
    // pod's 10.244.0.5 is in the first); --cluster-cidr, which would take
    // the whole cluster's range, plays no part in this mode.
    let node = node_with_addresses_yaml(
        NODE,
        &[("InternalIP", "10.200.0.1")],
        &[NODE_POD_CIDR, "fd00:244::/64"],
    );
    pods_reach_remote_endpoints(
        "nodecidr",
        "Cluster",
        &[
            "--detect-local-mode",
            "NodeCIDR",
            "--cluster-cidr",
            "10.99.0.0/16",
        ],
        Some(&node),
    );
}

/// NodeCIDR before the Node has a pod range: as kube-proxy, nothing is
/// programmed (so no pod is taken for an external client), the wait is
/// logged and /healthz answers 503; once the Node has one, the rules are
/// written and the pod reaches the remote endpoint.
#[test]
fn node_cidr_writes_no_rule_until_the_node_has_a_pod_range() {
    if !lab::require_root_and_nft("node_cidr_writes_no_rule_until_the_node_has_a_pod_range") {
        return;
    }
    let mut bed = Testbed::new("local-traffic", "nodewait", &[Backend::Whoami]);
    bed.lab.route_node_by_default().expect("node default route");
    let pod = bed
        .lab
        .add_routed_pod("pod", POD_ADDR)
        .expect("adding a pod to the node");
    let svc = manifests(&[lb_service("Cluster", "Local")]);
    // The Node first without a pod range (not yet allocated).
    let without = node_with_addresses_yaml(NODE, &[("InternalIP", "10.200.0.1")], &[]);
    let (mut proxy, path) = bed.start_proxy(
        &(svc.clone() + "---\n" + &without),
        &[
            "--hostname-override",
            NODE,
            "--detect-local-mode",
            "NodeCIDR",
        ],
    );
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("the proxy waits for the Node's podCIDRs");
        proxy
            .stderr()
            .contains("waiting for this node's Node object and its spec.podCIDRs")
            .then_some(())
            .ok_or_else(|| "the wait is not logged".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let node = bed.node().clone();
    assert!(
        node.nft_keys("map", "ip", "kube-uproxy", "service-ports")
            .is_err(),
        "a table was written before the Node had a pod range"
    );
    let healthz = SocketAddr::from((Ipv4Addr::LOCALHOST, 10256));
    match http_get(&node, healthz, "/healthz") {
        Ok((503, _)) => {}
        other => panic!("/healthz while waiting: {other:?}"),
    }

    write_by_rename(
        &path,
        &(svc
            + "---\n"
            + &node_with_addresses_yaml(NODE, &[("InternalIP", "10.200.0.1")], &[NODE_POD_CIDR])),
    );
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("the proxy starts");
        let keys = node
            .nft_keys("map", "ip", "kube-uproxy", "pod-service-ports")
            .map_err(|e| e.to_string())?;
        (!keys.is_empty())
            .then_some(())
            .ok_or_else(|| "pod-service-ports is empty".to_string())
    })
    .unwrap_or_else(|e| panic!("the pods' LB IP key never appeared: {e}"));
    assert_eq!(
        tcp_greeting(&pod, SocketAddr::from((LB_IP, SVC_PORT)), "pod -> LB IP"),
        backend_name(0)
    );
    assert_tcp_dropped(
        bed.client(),
        SocketAddr::from((LB_IP, SVC_PORT)),
        "external client -> LB IP",
    );
    proxy.assert_running("end");
}
