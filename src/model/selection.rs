//! Which endpoints new connections of a Service port may go to, by
//! Kubernetes' rules as kube-proxy applies them (`CategorizeEndpoints` in
//! its `pkg/proxy/topology.go`):
//!
//! - **Conditions** (KEP-1669): ready endpoints; when none is ready,
//!   serving and terminating ones. The cluster-wide set and the node-local
//!   set each get this fallback on their own.
//! - **Topology**: when every ready endpoint carries node hints and one is
//!   hinted for this node, the cluster-wide set is the endpoints hinted for
//!   this node (`PreferSameNode`); otherwise, when every ready endpoint
//!   carries zone hints and one is hinted for this node's zone, those of
//!   the zone (`PreferSameZone`, `PreferClose`, `topology-mode: Auto`).
//!   Missing hints, or none for this node or zone, mean every endpoint.
//!   The EndpointSlice controller writes the hints; the proxy follows
//!   them, never `trafficDistribution` itself, as kube-proxy does.
//! - **Traffic policies**: `internalTrafficPolicy: Local` sends ClusterIP
//!   traffic to the node-local set, `externalTrafficPolicy: Local` sends
//!   NodePort, externalIP and load-balancer traffic there. Topology never
//!   applies to the node-local set.
//!
//! Pure: unit-tested below, rule by rule.

use std::net::SocketAddr;

use super::{Endpoint, IpFamily, NodeTopology, ServicePortSpec};

/// The topology rule that narrowed the cluster-wide set, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    PreferSameNode,
    PreferSameZone,
}

/// Where each kind of traffic of one Service port (one address family) may
/// go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// For traffic under the `Cluster` policies, topology applied.
    pub cluster: Vec<SocketAddr>,
    /// This node's endpoints, for traffic under a `Local` policy.
    pub local: Vec<SocketAddr>,
    /// Whether the port has a usable endpoint anywhere in the cluster:
    /// without one its traffic is refused; with one but none for a `Local`
    /// policy, that traffic is dropped (kube-proxy's verdicts).
    pub has_any: bool,
    /// The topology rule applied to `cluster`.
    pub topology: Option<TopologyMode>,
    /// Endpoints on this node that are ready (what the health check node
    /// port counts, as kube-proxy does).
    pub local_ready: usize,
}

impl Selection {
    /// The endpoints for ClusterIP traffic.
    pub fn internal(&self, spec: &ServicePortSpec) -> &[SocketAddr] {
        if spec.internal_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    /// The endpoints for NodePort, externalIP and load-balancer traffic.
    pub fn external(&self, spec: &ServicePortSpec) -> &[SocketAddr] {
        if spec.external_local {
            &self.local
        } else {
            &self.cluster
        }
    }
}

impl ServicePortSpec {
    /// Whether traffic can reach the port other than by its ClusterIP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }

    /// The endpoints of one address family for each kind of traffic, seen
    /// from `node`.
    pub fn select(&self, family: IpFamily, node: &NodeTopology) -> Selection {
        let endpoints: Vec<&Endpoint> = self.endpoints_of(family).collect();
        let topology = topology_mode(&endpoints, node);
        let fits = |e: &Endpoint| match topology {
            None => true,
            Some(TopologyMode::PreferSameNode) => e.node_hints.contains(&node.name),
            Some(TopologyMode::PreferSameZone) => {
                node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z))
            }
        };
        let cluster = with_fallback(&endpoints, |e| fits(e), |_| true);
        let local = with_fallback(
            &endpoints,
            |e| e.is_local(&node.name),
            |e| e.is_local(&node.name),
        );
        let has_any = endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating));
        let local_ready = endpoints
            .iter()
            .filter(|e| e.ready && e.is_local(&node.name))
            .count();
        Selection {
            cluster,
            local,
            has_any,
            topology,
            local_ready,
        }
    }
}

/// Ready endpoints that pass `ready_filter`; if there are none, serving
/// and terminating ones that pass `fallback_filter`.
fn with_fallback(
    endpoints: &[&Endpoint],
    ready_filter: impl Fn(&Endpoint) -> bool,
    fallback_filter: impl Fn(&Endpoint) -> bool,
) -> Vec<SocketAddr> {
    let ready: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.ready && ready_filter(e))
        .map(|e| e.addr)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating && fallback_filter(e))
        .map(|e| e.addr)
        .collect()
}

/// kube-proxy's choice of topology from the hints of the ready endpoints.
fn topology_mode(endpoints: &[&Endpoint], node: &NodeTopology) -> Option<TopologyMode> {
    let ready: Vec<&&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return None;
    }
    let all_node_hints = ready.iter().all(|e| !e.node_hints.is_empty());
    if all_node_hints
        && !node.name.is_empty()
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Some(TopologyMode::PreferSameNode);
    }
    let all_zone_hints = ready.iter().all(|e| !e.zone_hints.is_empty());
    if all_zone_hints
        && let Some(zone) = &node.zone
        && ready.iter().any(|e| e.zone_hints.contains(zone))
    {
        return Some(TopologyMode::PreferSameZone);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, ObjectKey, PortMode, Protocol, ServicePortName};

    /// An endpoint: `10.0.0.<n>:80` on `node`, in the given state.
    fn ep(n: u8, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, n], 80)),
            ready,
            serving,
            terminating,
            node_name: (!node.is_empty()).then(|| node.to_string()),
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn ready(n: u8, node: &str) -> Endpoint {
        ep(n, node, true, true, false)
    }

    fn terminating(n: u8, node: &str) -> Endpoint {
        ep(n, node, false, true, true)
    }

    fn zoned(mut e: Endpoint, zones: &[&str]) -> Endpoint {
        e.zone_hints = zones.iter().map(|z| z.to_string()).collect();
        e
    }

    fn for_nodes(mut e: Endpoint, nodes: &[&str]) -> Endpoint {
        e.node_hints = nodes.iter().map(|z| z.to_string()).collect();
        e
    }

    fn spec(endpoints: Vec<Endpoint>) -> ServicePortSpec {
        ServicePortSpec {
            name: ServicePortName {
                service: ObjectKey::new("default", "web"),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            port: 80,
            algorithm: Algorithm::RoundRobin,
            mode: PortMode::Connection,
            proxy_protocol: None,
            forwarded_headers: crate::model::ForwardedHeaders::Off,
            node_port: Some(30080),
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            lb_source_ranges: Vec::new(),
            session_affinity: crate::model::SessionAffinity::None,
            internal_local: false,
            external_local: false,
            preserve_client_ip: None,
            endpoints,
        }
    }

    fn node_a() -> NodeTopology {
        NodeTopology {
            name: "node-a".into(),
            zone: Some("zone-1".into()),
        }
    }

    fn hosts(list: &[SocketAddr]) -> Vec<u8> {
        list.iter()
            .map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    fn select(s: &ServicePortSpec) -> Selection {
        s.select(IpFamily::V4, &node_a())
    }

    #[test]
    fn ready_endpoints_are_used_and_not_ready_ones_are_not() {
        let s = spec(vec![
            ready(1, "node-a"),
            ep(2, "node-b", false, false, false),
            terminating(3, "node-b"),
        ]);
        let sel = select(&s);
        assert_eq!(hosts(&sel.cluster), [1]);
        assert_eq!(hosts(&sel.local), [1]);
        assert!(sel.has_any);
        assert_eq!(sel.local_ready, 1);
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_are_used() {
        let s = spec(vec![
            terminating(1, "node-b"),
            ep(2, "node-b", false, false, true),
            ep(3, "node-b", false, false, false),
        ]);
        let sel = select(&s);
        assert_eq!(hosts(&sel.cluster), [1]);
        assert!(sel.local.is_empty());
        assert!(sel.has_any, "a serving terminating endpoint counts");
        assert_eq!(sel.local_ready, 0);
    }

    #[test]
    fn the_local_set_falls_back_on_its_own() {
        // Ready endpoints elsewhere, only a terminating one here: the
        // cluster set keeps the ready ones, the local set falls back to the
        // terminating local one (KEP-1669).
        let s = spec(vec![
            ready(1, "node-b"),
            terminating(2, "node-a"),
            ep(3, "node-a", false, false, true),
        ]);
        let sel = select(&s);
        assert_eq!(hosts(&sel.cluster), [1]);
        assert_eq!(hosts(&sel.local), [2]);
        // And the other way round: a ready local endpoint keeps the local
        // set off the terminating ones.
        let s = spec(vec![ready(1, "node-a"), terminating(2, "node-a")]);
        assert_eq!(hosts(&select(&s).local), [1]);
    }

    #[test]
    fn no_usable_endpoint_anywhere_is_told_apart_from_none_here() {
        let sel = select(&spec(vec![ep(1, "node-a", false, false, false)]));
        assert!(!sel.has_any);
        let sel = select(&spec(vec![ready(1, "node-b")]));
        assert!(sel.has_any);
        assert!(sel.local.is_empty());
        let sel = select(&spec(vec![]));
        assert!(!sel.has_any);
    }

    #[test]
    fn traffic_policies_pick_the_set() {
        let mut s = spec(vec![ready(1, "node-a"), ready(2, "node-b")]);
        let sel = select(&s);
        assert_eq!(hosts(sel.internal(&s)), [1, 2]);
        assert_eq!(hosts(sel.external(&s)), [1, 2]);
        s.internal_local = true;
        assert_eq!(hosts(sel.internal(&s)), [1]);
        assert_eq!(hosts(sel.external(&s)), [1, 2]);
        s.internal_local = false;
        s.external_local = true;
        assert_eq!(hosts(sel.internal(&s)), [1, 2]);
        assert_eq!(hosts(sel.external(&s)), [1]);
    }

    #[test]
    fn an_endpoint_without_node_name_is_never_local() {
        let s = spec(vec![ready(1, "")]);
        let sel = s.select(IpFamily::V4, &NodeTopology::default());
        assert!(sel.local.is_empty(), "an empty node name matches nothing");
    }

    #[test]
    fn zone_hints_keep_traffic_in_the_zone() {
        let s = spec(vec![
            zoned(ready(1, "node-a"), &["zone-1"]),
            zoned(ready(2, "node-c"), &["zone-1"]),
            zoned(ready(3, "node-b"), &["zone-2"]),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, Some(TopologyMode::PreferSameZone));
        assert_eq!(hosts(&sel.cluster), [1, 2]);
    }

    #[test]
    fn zone_hints_are_ignored_when_one_is_missing_or_none_is_for_this_zone() {
        // One ready endpoint without hints: hints ignored.
        let s = spec(vec![
            zoned(ready(1, "node-a"), &["zone-1"]),
            ready(2, "node-b"),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, None);
        assert_eq!(hosts(&sel.cluster), [1, 2]);
        // Hints, but none for this node's zone: everything (a zone is never
        // left without endpoints).
        let s = spec(vec![
            zoned(ready(1, "node-b"), &["zone-2"]),
            zoned(ready(2, "node-c"), &["zone-3"]),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, None);
        assert_eq!(hosts(&sel.cluster), [1, 2]);
        // This node's zone unknown: hints ignored.
        let s = spec(vec![
            zoned(ready(1, "node-b"), &["zone-1"]),
            zoned(ready(2, "node-c"), &["zone-2"]),
        ]);
        let sel = s.select(
            IpFamily::V4,
            &NodeTopology {
                name: "node-a".into(),
                zone: None,
            },
        );
        assert_eq!(hosts(&sel.cluster), [1, 2]);
        // A not-ready endpoint without hints does not count.
        let s = spec(vec![
            zoned(ready(1, "node-a"), &["zone-1"]),
            zoned(ready(2, "node-b"), &["zone-2"]),
            ep(3, "node-b", false, false, false),
        ]);
        assert_eq!(hosts(&select(&s).cluster), [1]);
    }

    #[test]
    fn without_ready_endpoints_the_fallback_ignores_topology() {
        let s = spec(vec![
            zoned(terminating(1, "node-a"), &["zone-1"]),
            zoned(terminating(2, "node-b"), &["zone-2"]),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, None);
        assert_eq!(hosts(&sel.cluster), [1, 2]);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let s = spec(vec![
            for_nodes(zoned(ready(1, "node-a"), &["zone-1"]), &["node-a"]),
            for_nodes(zoned(ready(2, "node-c"), &["zone-1"]), &["node-c"]),
            for_nodes(zoned(ready(3, "node-b"), &["zone-2"]), &["node-b"]),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, Some(TopologyMode::PreferSameNode));
        assert_eq!(hosts(&sel.cluster), [1]);
        // No endpoint hinted for this node: the zone hints apply.
        let s = spec(vec![
            for_nodes(zoned(ready(2, "node-c"), &["zone-1"]), &["node-c"]),
            for_nodes(zoned(ready(3, "node-b"), &["zone-2"]), &["node-b"]),
        ]);
        let sel = select(&s);
        assert_eq!(sel.topology, Some(TopologyMode::PreferSameZone));
        assert_eq!(hosts(&sel.cluster), [2]);
    }

    #[test]
    fn topology_does_not_narrow_the_local_set() {
        let mut s = spec(vec![
            zoned(ready(1, "node-a"), &["zone-2"]),
            zoned(ready(2, "node-b"), &["zone-1"]),
        ]);
        s.external_local = true;
        let sel = select(&s);
        assert_eq!(hosts(&sel.cluster), [2]);
        assert_eq!(hosts(sel.external(&s)), [1]);
    }
}
