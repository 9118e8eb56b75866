use super::*;
// The Service and slice builders of the reconciler's tests.
use crate::model::{Algorithm, ClusterState, ObjectKey, Protocol, ServiceInfo, SliceInfo};
use crate::reconcile::tests::{dual_stack, service, slice_on, with_node_port};

/// The plan of the first port of `svc` in IPv4 on `node-a`, with `slice`.
fn plan_of(svc: ServiceInfo, slice: SliceInfo) -> PortPlan {
    plan_with(svc, slice, false)
}

/// The same, with local-traffic detection on or off.
fn plan_with(svc: ServiceInfo, slice: SliceInfo, local_traffic: bool) -> PortPlan {
    let mut st = ClusterState::new();
    let key = svc.key.clone();
    st.apply_service(svc);
    st.apply_slice(slice);
    let spec = st.service_ports(&key, Algorithm::RoundRobin).remove(0);
    let node = NodeTopology {
        name: "node-a".into(),
        zone: None,
    };
    plan_port(&spec, &node, IpFamily::V4, local_traffic)
}

fn dest(ip: &str) -> Key {
    Key::Service(Destination {
        ip: ip.parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    })
}

fn node_port_v4(port: u16) -> Key {
    Key::NodePort(
        IpFamily::V4,
        ProxyPort {
            protocol: Protocol::Tcp,
            port,
        },
    )
}

#[test]
fn source_ranges_apply_per_family_as_kube_proxy_filters_them() {
    let mut svc = dual_stack("web", None);
    svc.lb_ips = vec!["10.200.8.8".parse().unwrap(), "fd00:8::8".parse().unwrap()];
    svc.lb_source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let mut st = ClusterState::new();
    st.apply_service(svc);
    let spec = st
        .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
        .remove(0);
    let v4 = destinations(&spec, IpFamily::V4);
    let v6 = destinations(&spec, IpFamily::V6);
    assert!(v4.iter().any(|k| matches!(k, Key::Guarded(_))));
    assert!(v4.iter().all(|k| k.family() == IpFamily::V4));
    assert!(v6.iter().all(|k| k.family() == IpFamily::V6));
    // Only IPv4 ranges: the IPv6 LB IP is open to every source.
    assert!(
        !v6.iter()
            .any(|k| matches!(k, Key::Guarded(_) | Key::Allow(..)))
    );
    assert!(v6.contains(&Key::Service(Destination {
        ip: "fd00:8::8".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    })));
}

#[test]
fn internal_local_plans_drop_without_local_endpoints_and_reject_without_any() {
    let mut svc = service("web", "10.96.0.10");
    svc.internal_local = true;
    // Only a remote endpoint: dropped, and counted as such.
    let p = plan_of(
        svc.clone(),
        slice_on("web", &[("10.1.0.2", "node-b", true)]),
    );
    assert_eq!(p.listeners.len(), 1);
    assert_eq!(
        p.listeners[0].destinations[&dest("10.96.0.10")],
        Verdict::Drop
    );
    assert!(p.listeners[0].endpoints.is_empty());
    assert!(p.no_local_internal);
    // A local endpoint: served by it alone.
    let p = plan_of(
        svc.clone(),
        slice_on(
            "web",
            &[("10.1.0.2", "node-b", true), ("10.1.0.1", "node-a", true)],
        ),
    );
    assert_eq!(
        p.listeners[0].destinations[&dest("10.96.0.10")],
        Verdict::Serve
    );
    assert_eq!(
        p.listeners[0].endpoints,
        ["10.1.0.1:8080".parse::<SocketAddr>().unwrap()]
    );
    assert!(!p.no_local_internal);
    assert_eq!(p.local_ready, 1);
    // No usable endpoint anywhere: refused, as without the policy.
    let p = plan_of(svc, slice_on("web", &[]));
    assert_eq!(
        p.listeners[0].destinations[&dest("10.96.0.10")],
        Verdict::Reject
    );
    assert!(!p.no_local_internal);
}

#[test]
fn differing_traffic_policies_plan_a_second_listener_for_external_traffic() {
    let mut svc = service("web", "10.96.0.10");
    svc.ports[0].node_port = Some(30080);
    svc.external_local = true;
    let p = plan_of(
        svc.clone(),
        slice_on("web", &[("10.1.0.2", "node-b", true)]),
    );
    let [internal, external] = &p.listeners[..] else {
        panic!("two listeners: {:?}", p.listeners);
    };
    assert_eq!(internal.key.scope, TrafficScope::Internal);
    assert_eq!(
        internal.destinations,
        BTreeMap::from([(dest("10.96.0.10"), Verdict::Serve)])
    );
    assert_eq!(external.key.scope, TrafficScope::External);
    assert_eq!(
        external.destinations,
        BTreeMap::from([(node_port_v4(30080), Verdict::Drop)])
    );
    assert!(p.no_local_external);
    assert_eq!(p.local_ready, 0);
    // The same policies: one listener catches both.
    svc.external_local = false;
    let p = plan_of(svc, slice_on("web", &[("10.1.0.2", "node-b", true)]));
    assert_eq!(p.listeners.len(), 1);
    assert_eq!(
        p.listeners[0].destinations,
        BTreeMap::from([
            (dest("10.96.0.10"), Verdict::Serve),
            (node_port_v4(30080), Verdict::Serve),
        ])
    );
    assert!(!p.no_local_external);
}

#[test]
fn guards_are_members_whatever_the_verdict_and_other_keys_carry_it() {
    let d = Destination {
        ip: "10.200.8.8".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    };
    let net = "10.0.0.0/8".parse().unwrap();
    for v in [Verdict::Serve, Verdict::Reject, Verdict::Drop] {
        assert_eq!(action(&Key::Guarded(d), v, 31000), Action::Member);
        assert_eq!(action(&Key::Allow(d, net), v, 31000), Action::Member);
    }
    assert_eq!(
        action(&Key::Service(d), Verdict::Serve, 31000),
        Action::Redirect(31000)
    );
    assert_eq!(
        action(&Key::Service(d), Verdict::Reject, 31000),
        Action::Reject
    );
    assert_eq!(
        action(&node_port_v4(30080), Verdict::Drop, 31000),
        Action::Drop
    );
}

/// kube-proxy's local-traffic rule: a pod of this node calling an
/// `externalTrafficPolicy: Local` Service's external destinations or node
/// port goes to the cluster-wide endpoints; only with a detector.
#[test]
fn pods_reach_external_destinations_of_a_local_policy_through_cluster_endpoints() {
    let mut svc = service("web", "10.96.0.10");
    svc.ports[0].node_port = Some(30080);
    svc.lb_ips = vec!["10.200.8.8".parse().unwrap()];
    svc.external_local = true;
    let remote = || slice_on("web", &[("10.1.0.2", "node-b", true)]);
    let pod_lb = Key::PodService(Destination {
        ip: "10.200.8.8".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    });
    let pod_node_port = Key::PodNodePort(
        IpFamily::V4,
        ProxyPort {
            protocol: Protocol::Tcp,
            port: 30080,
        },
    );
    // internalTrafficPolicy: Cluster: the ClusterIP's listener takes them.
    let p = plan_with(svc.clone(), remote(), true);
    let [internal, external] = &p.listeners[..] else {
        panic!("two listeners: {:?}", p.listeners);
    };
    assert_eq!(
        internal.destinations,
        BTreeMap::from([
            (dest("10.96.0.10"), Verdict::Serve),
            (pod_lb, Verdict::Serve),
            (pod_node_port, Verdict::Serve),
        ])
    );
    // External clients: still dropped (no local endpoint).
    assert_eq!(external.destinations[&dest("10.200.8.8")], Verdict::Drop);
    assert_eq!(external.destinations[&node_port_v4(30080)], Verdict::Drop);
    assert!(p.no_local_external);
    // Without a detector, pods are external clients: no twins.
    let p = plan_with(svc.clone(), remote(), false);
    assert!(
        p.listeners
            .iter()
            .flat_map(|l| l.destinations.keys())
            .all(|k| !matches!(k, Key::PodService(_) | Key::PodNodePort(..)))
    );
    // No usable endpoint anywhere: no twins, the external keys refuse.
    let p = plan_with(svc.clone(), slice_on("web", &[]), true);
    assert_eq!(p.listeners.len(), 2);
    assert!(!p.listeners[0].destinations.contains_key(&pod_lb));
    assert_eq!(
        p.listeners[1].destinations[&dest("10.200.8.8")],
        Verdict::Reject
    );
    // Both policies Local: a third listener, with the cluster's endpoints.
    svc.internal_local = true;
    let p = plan_with(svc.clone(), remote(), true);
    let [local, pods] = &p.listeners[..] else {
        panic!("two listeners: {:?}", p.listeners);
    };
    assert_eq!(local.key.scope, TrafficScope::Internal);
    assert!(local.endpoints.is_empty());
    assert_eq!(pods.key.scope, TrafficScope::LocalPods);
    assert_eq!(
        pods.endpoints,
        ["10.1.0.2:8080".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        pods.destinations,
        BTreeMap::from([(pod_lb, Verdict::Serve), (pod_node_port, Verdict::Serve)])
    );
    // A policy of Cluster for external traffic needs nothing of the kind.
    svc.internal_local = false;
    svc.external_local = false;
    let p = plan_with(svc, remote(), true);
    assert_eq!(p.listeners.len(), 1);
    assert!(!p.listeners[0].destinations.contains_key(&pod_lb));
}

#[test]
fn client_ips_are_preserved_for_local_endpoints_of_local_policies_or_by_annotation() {
    let eps = [("10.1.0.2", "node-a", true), ("10.1.0.3", "node-b", true)];
    let local = "10.1.0.2:8080".parse::<SocketAddr>().unwrap();
    let transparent = |svc: ServiceInfo| -> Vec<(TrafficScope, Vec<SocketAddr>)> {
        plan_of(svc, slice_on("web", &eps))
            .listeners
            .into_iter()
            .map(|l| (l.key.scope, l.transparent))
            .collect()
    };
    let mut svc = with_node_port(service("web", "10.96.0.10"));
    // Cluster policies: the endpoints see the proxy, as before.
    assert_eq!(transparent(svc.clone()), [(TrafficScope::Internal, vec![])]);
    // externalTrafficPolicy: Local: its listener (external traffic only)
    // connects from the client's address; ClusterIP traffic does not.
    svc.external_local = true;
    assert_eq!(
        transparent(svc.clone()),
        [
            (TrafficScope::Internal, vec![]),
            (TrafficScope::External, vec![local])
        ]
    );
    // Forced off.
    svc.preserve_client_ip = Some(false);
    assert_eq!(
        transparent(svc.clone()),
        [
            (TrafficScope::Internal, vec![]),
            (TrafficScope::External, vec![])
        ]
    );
    // internalTrafficPolicy: Local too: one listener, preserved.
    svc.preserve_client_ip = None;
    svc.internal_local = true;
    assert_eq!(
        transparent(svc.clone()),
        [(TrafficScope::Internal, vec![local])]
    );
    // Forced on for a Cluster Service: only the endpoint on this node is
    // reached from the client's address (a remote one could not route the
    // reply back here).
    svc.internal_local = false;
    svc.external_local = false;
    svc.preserve_client_ip = Some(true);
    assert_eq!(transparent(svc), [(TrafficScope::Internal, vec![local])]);
}
