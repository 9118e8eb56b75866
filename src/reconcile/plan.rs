//! The pure half of reconciling: what one Service port needs on this node
//! (its listeners, their endpoints, and what the kernel should do with
//! each of its keys), computed from the model alone.
//!
//! No I/O, no tokio, no listeners and no rule table here: the reconciler
//! applies a [`PortPlan`], this module only says what it is. Kept apart so
//! that "where is a Service port's listener chosen" has one short answer,
//! and so that every rule of kube-proxy's verdicts is tested without a
//! fake kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::model::{IpFamily, ListenerKey, NodeTopology, ServicePortSpec, TrafficScope};
use crate::rules::{Action, Destination, Key, ProxyPort};

/// What happens to new flows of one kind of traffic of a Service port
/// (kube-proxy's verdicts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Relayed to the listener.
    Serve,
    /// No usable endpoint anywhere: refused (in request mode served
    /// instead: the listener answers 503 or gRPC UNAVAILABLE).
    Reject,
    /// Usable endpoints exist, but none on this node for a `Local` policy:
    /// dropped.
    Drop,
}

/// One listener a Service port needs, with its endpoints and keys.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ListenerPlan {
    pub(super) key: ListenerKey,
    pub(super) endpoints: Vec<SocketAddr>,
    pub(super) destinations: BTreeMap<Key, Verdict>,
    /// The endpoints (of `endpoints`) connected to from the client's own
    /// address: those on this node, when the listener preserves client
    /// IPs ([`preserves_client_ip`]). Empty otherwise.
    pub(super) transparent: Vec<SocketAddr>,
}

/// Whether a listener of `scope` connects to this node's endpoints from
/// the client's own address. The annotation decides when set; otherwise
/// the traffic a `Local` policy sends does: every endpoint it reaches is
/// on this node, so kube-proxy's promise (the endpoint sees the client)
/// can be kept, and an operator who chose `Local` chose it for that. A
/// listener serving both kinds (`separate` false) has one policy for
/// both, `internalTrafficPolicy`'s (they are equal, or the port is not
/// reachable from outside).
pub(super) fn preserves_client_ip(
    spec: &ServicePortSpec,
    scope: TrafficScope,
    separate: bool,
) -> bool {
    spec.preserve_client_ip.unwrap_or(match scope {
        TrafficScope::External if separate => spec.external_local,
        _ => spec.internal_local,
    })
}

/// What one Service port needs: one listener, or two when its external
/// traffic goes to other endpoints than its ClusterIP traffic (the two
/// traffic policies differ), plus what the health check and the
/// no-local-endpoints metric need.
#[derive(Debug)]
pub(super) struct PortPlan {
    pub(super) listeners: Vec<ListenerPlan>,
    /// Ready endpoints on this node (the health check node port's count).
    pub(super) local_ready: usize,
    /// ClusterIP traffic is dropped: `internalTrafficPolicy: Local`
    /// without local endpoints.
    pub(super) no_local_internal: bool,
    /// External traffic is dropped: `externalTrafficPolicy: Local` without
    /// local endpoints.
    pub(super) no_local_external: bool,
}

/// Plans the listeners of one Service port in `family` on `node` (pure).
/// `local_traffic`: the table of `family` tells this node's pods apart
/// (`--detect-local-mode`); then an `externalTrafficPolicy: Local` port's
/// external keys get twins ([`Key::PodService`], [`Key::PodNodePort`])
/// that send pods to the cluster-wide endpoints, as kube-proxy does.
pub(super) fn plan_port(
    spec: &ServicePortSpec,
    node: &NodeTopology,
    family: IpFamily,
    local_traffic: bool,
) -> PortPlan {
    let sel = spec.select(family, node);
    let verdict = |set: &[SocketAddr]| {
        if !sel.has_any && spec.mode.per_request() {
            // In request mode the listener answers for the Service: 503,
            // or gRPC UNAVAILABLE naming it, rather than a bare refusal.
            Verdict::Serve
        } else if !sel.has_any {
            Verdict::Reject
        } else if set.is_empty() {
            Verdict::Drop
        } else {
            Verdict::Serve
        }
    };
    let internal = sel.internal(spec).to_vec();
    let external = sel.external(spec).to_vec();
    let (internal_verdict, external_verdict) = (verdict(&internal), verdict(&external));
    let all = destinations(spec, family);
    let (cluster_keys, external_keys): (Vec<Key>, Vec<Key>) = all
        .into_iter()
        .partition(|k| matches!(k, Key::Service(d) if spec.cluster_ips.contains(&d.ip)));
    let accessible = spec.externally_accessible();
    let separate = accessible && spec.internal_local != spec.external_local;
    let member_or = |k: &Key, v: Verdict| match k {
        Key::Guarded(_) | Key::Allow(..) => Verdict::Serve,
        _ => v,
    };
    // This node's endpoints (whatever their state: the listener's own
    // endpoints are the selection's choice).
    let local: BTreeSet<SocketAddr> = spec
        .endpoints_of(family)
        .filter(|e| e.is_local(&node.name))
        .map(|e| e.addr)
        .collect();
    let transparent = |scope: TrafficScope, endpoints: &[SocketAddr]| -> Vec<SocketAddr> {
        if preserves_client_ip(spec, scope, separate) {
            endpoints
                .iter()
                .copied()
                .filter(|e| local.contains(e))
                .collect()
        } else {
            Vec::new()
        }
    };
    let mut internal_plan = ListenerPlan {
        key: ListenerKey {
            port: spec.name.clone(),
            family,
            scope: TrafficScope::Internal,
        },
        transparent: transparent(TrafficScope::Internal, &internal),
        endpoints: internal,
        destinations: cluster_keys
            .iter()
            .map(|k| (*k, internal_verdict))
            .collect(),
    };
    // kube-proxy: traffic from a local pod to an external destination of
    // an `externalTrafficPolicy: Local` Service "is subject to neither
    // form of traffic policy" (it stands for a client that went out to
    // the load balancer and came back): cluster-wide endpoints. Only
    // served twins: when the cluster has no usable endpoint, the external
    // key itself is refused, which is the answer for pods too.
    let pod_keys: Vec<Key> = if local_traffic && accessible && spec.external_local {
        external_keys.iter().filter_map(pod_twin).collect()
    } else {
        Vec::new()
    };
    let mut pod_listener = None;
    if !pod_keys.is_empty() && !spec.internal_local {
        // The ClusterIP's listener already balances over the cluster.
        if internal_verdict == Verdict::Serve {
            internal_plan
                .destinations
                .extend(pod_keys.iter().map(|k| (*k, Verdict::Serve)));
        }
    } else if !pod_keys.is_empty() {
        // Both policies Local: a listener of its own for the pods.
        let cluster = sel.cluster.clone();
        if verdict(&cluster) == Verdict::Serve {
            pod_listener = Some(ListenerPlan {
                key: ListenerKey {
                    port: spec.name.clone(),
                    family,
                    scope: TrafficScope::LocalPods,
                },
                // A pod of this node: local endpoints see its address
                // (both policies are Local, so preserve-client-ip is on
                // unless the annotation says otherwise).
                transparent: transparent(TrafficScope::LocalPods, &cluster),
                endpoints: cluster,
                destinations: pod_keys.iter().map(|k| (*k, Verdict::Serve)).collect(),
            });
        }
    }
    let mut listeners = Vec::with_capacity(3);
    if separate {
        listeners.push(internal_plan);
        listeners.push(ListenerPlan {
            key: ListenerKey {
                port: spec.name.clone(),
                family,
                scope: TrafficScope::External,
            },
            transparent: transparent(TrafficScope::External, &external),
            endpoints: external,
            destinations: external_keys
                .iter()
                .map(|k| (*k, member_or(k, external_verdict)))
                .collect(),
        });
    } else {
        internal_plan.destinations.extend(
            external_keys
                .iter()
                .map(|k| (*k, member_or(k, external_verdict))),
        );
        listeners.push(internal_plan);
    }
    listeners.extend(pod_listener);
    PortPlan {
        listeners,
        local_ready: sel.local_ready,
        no_local_internal: spec.internal_local && internal_verdict == Verdict::Drop,
        no_local_external: accessible && spec.external_local && external_verdict == Verdict::Drop,
    }
}

/// The key of pod traffic to the same external destination or node port.
fn pod_twin(k: &Key) -> Option<Key> {
    match k {
        Key::Service(d) => Some(Key::PodService(*d)),
        Key::NodePort(f, p) => Some(Key::PodNodePort(*f, *p)),
        _ => None,
    }
}

/// Every key the kernel should catch for this port in `family`: its
/// ClusterIPs, externalIPs and load-balancer IPs of that family on the
/// Service port, its node port on the node's addresses of that family, and
/// the source ranges of that family for its load-balancer IPs (as
/// kube-proxy filters them: ranges of the other family are ignored, and a
/// family left without any lets every source in).
pub(super) fn destinations(spec: &ServicePortSpec, family: IpFamily) -> BTreeSet<Key> {
    let of = |ips: &[IpAddr]| -> Vec<Destination> {
        ServicePortSpec::of_family(ips, family)
            .map(|ip| Destination {
                ip,
                protocol: spec.name.protocol,
                port: spec.port,
            })
            .collect()
    };
    let mut keys: BTreeSet<Key> = of(&spec.cluster_ips)
        .into_iter()
        .chain(of(&spec.external_ips))
        .chain(of(&spec.lb_ips))
        .map(Key::Service)
        .collect();
    if let Some(port) = spec.node_port {
        keys.insert(Key::NodePort(
            family,
            ProxyPort {
                protocol: spec.name.protocol,
                port,
            },
        ));
    }
    let ranges: Vec<ipnet::IpNet> = spec
        .lb_source_ranges
        .iter()
        .filter(|n| IpFamily::of(n.addr()) == family)
        .copied()
        .collect();
    if !ranges.is_empty() {
        for d in of(&spec.lb_ips) {
            keys.insert(Key::Guarded(d));
            for net in &ranges {
                keys.insert(Key::Allow(d, *net));
            }
        }
    }
    keys
}

/// What the kernel does with `key`, a key of a listener on `proxy_port`
/// whose traffic got `verdict`. Source-range guards and their allowed
/// ranges are set members whatever the verdict: they filter traffic, the
/// key they guard carries the verdict.
pub(super) fn action(key: &Key, verdict: Verdict, proxy_port: u16) -> Action {
    match (key, verdict) {
        (Key::Guarded(_) | Key::Allow(..), _) => Action::Member,
        // Twins are planned only when served (see `plan_port`).
        (Key::PodService(_) | Key::PodNodePort(..), _) => Action::Redirect(proxy_port),
        (_, Verdict::Serve) => Action::Redirect(proxy_port),
        (_, Verdict::Reject) => Action::Reject,
        (_, Verdict::Drop) => Action::Drop,
    }
}

#[cfg(test)]
mod tests;
