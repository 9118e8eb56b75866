//! The `/debug/services` report: what the proxy does with every Service
//! port that has a listener, built on request (never on the hot path nor on
//! every sync) from a view of the reconciler's state that `reconcile.rs`
//! hands in. Nothing here changes what is reconciled.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::admin::status::{EndpointReport, PortReport};
use crate::metrics::Metrics;
use crate::model::{Algorithm, ClusterState, ListenerKey, ServicePortSpec, TrafficScope};
use crate::proxy::balancer::Balancer;
use crate::rules::{Action, Key, Nft, RuleTable};

/// One listener as the report sees it.
pub(super) struct PortView<'a> {
    pub key: &'a ListenerKey,
    /// `active`, or `closing` (its Service port is gone; it lingers).
    pub state: &'static str,
    pub proxy_port: u16,
    pub balancer: &'a Balancer,
    /// The keys the listener claims (a closing one has released them).
    pub destinations: &'a [Key],
}

/// What every port's report reads besides its own listener.
pub(super) struct Context<'a, N: Nft> {
    pub state: &'a ClusterState,
    pub rules: &'a RuleTable<N>,
    pub metrics: &'a Metrics,
    pub default_algorithm: Algorithm,
}

/// The report of one listener: addresses, proxy port, rule, endpoints with
/// their conditions and open connections.
pub(super) fn port_report<N: Nft>(cx: &Context<'_, N>, port: PortView<'_>) -> PortReport {
    let (name, family) = (&port.key.port, port.key.family);
    // The spec as the model has it now (a closing listener's Service
    // port may be gone from it: then no addresses and no endpoints).
    let spec = cx
        .state
        .service_ports(&name.service, cx.default_algorithm)
        .into_iter()
        .find(|s| s.name == *name);
    let set = port.balancer.endpoints();
    let open: HashMap<SocketAddr, usize> = set.iter().map(|e| (e.addr, e.active())).collect();
    // What this listener's first key gets (a closing listener
    // released its keys: it has none left to show).
    let rule = match port.destinations.first().map(|d| cx.rules.desired(d)) {
        None => "none",
        Some(_) if port.state != "active" => "removed",
        Some(_) if cx.rules.refused().contains_key(name) => "refused by nft (see the log)",
        Some(Some(Action::Redirect(p))) if p == port.proxy_port => "redirect",
        Some(Some(Action::Redirect(_))) => "held by another Service port",
        Some(Some(Action::Reject)) => "reject",
        Some(Some(Action::Drop)) => "drop (no local endpoint)",
        Some(Some(Action::Member)) => "member",
        Some(None) => "none",
    };
    let rule_applied = port.destinations.iter().all(|d| cx.rules.is_applied(d));
    PortReport {
        namespace: name.service.namespace.to_string(),
        service: name.service.name.to_string(),
        port_name: name.port.clone(),
        protocol: name.protocol.to_string(),
        ip_family: family.to_string(),
        cluster_ips: spec
            .iter()
            .flat_map(|s| ServicePortSpec::of_family(&s.cluster_ips, family))
            .map(|ip| ip.to_string())
            .collect(),
        port: spec.as_ref().map_or(0, |s| s.port),
        proxy_port: port.proxy_port,
        algorithm: port.balancer.algorithm().to_string(),
        mode: port.balancer.mode().to_string(),
        state: match port.key.scope {
            TrafficScope::Internal => port.state.to_string(),
            TrafficScope::External => format!("{} (external traffic)", port.state),
            TrafficScope::LocalPods => {
                format!("{} (external traffic from local pods)", port.state)
            }
        },
        rule: rule.to_string(),
        rule_applied,
        open_connections: cx.metrics.active_connections(name).unwrap_or(0),
        endpoints: spec
            .iter()
            .flat_map(|s| s.endpoints_of(family))
            .map(|e| EndpointReport {
                address: e.addr.to_string(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                node_name: e.node_name.clone(),
                usable: set.contains(e.addr),
                open_connections: open.get(&e.addr).copied().unwrap_or(0),
            })
            .collect(),
    }
}
