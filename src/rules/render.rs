//! Rule rendering: desired keys → nftables JSON batches. Pure.
//!
//! One table per address family: `ip kube-uproxy` always, `ip6
//! kube-uproxy` beside it when the node has IPv6 (the same layout with
//! `ipv6_addr` keys and the IPv6 proxy address). Both are written in one
//! transaction. Each table holds a fixed set of chains with a fixed set of
//! rules; what changes at run time are only the elements of named sets and
//! maps, one per [`Key`] kind:
//!
//! ```text
//! table ip kube-uproxy {
//!   map service-ports          { ipv4_addr . inet_proto . inet_service : inet_service }  ClusterIP / externalIP / LB IP → proxy port
//!   set no-endpoints           { ipv4_addr . inet_proto . inet_service }                 refused
//!   map node-ports             { inet_proto . inet_service : inet_service }              node port → proxy port
//!   set no-endpoint-nodeports  { inet_proto . inet_service }                             refused
//!   set no-local-endpoints     { ipv4_addr . inet_proto . inet_service }                 dropped (Local policy, no local endpoint)
//!   set no-local-endpoint-nodeports { inet_proto . inet_service }                        dropped (the same, node ports)
//!   set lb-guarded             { ipv4_addr . inet_proto . inet_service }                 LB IPs with source ranges
//!   set lb-allowed             { ipv4_addr . inet_proto . inet_service . ipv4_addr }     (interval) their allowed sources
//!   set proxy-ports            { inet_proto . inet_service }                             the listeners (guarded)
//!   set nodeport-addresses     { ipv4_addr }  (interval; only with --nodeport-addresses)
//!   map pod-service-ports      { ipv4_addr . inet_proto . inet_service : inet_service }  the same, from this node's pods (--detect-local-mode)
//!   map pod-node-ports         { inet_proto . inet_service : inet_service }              the same for node ports
//!   set instance               { mark; comment "…" }                                     the writer (see `Instance`)
//!
//!   chain filter-prerouting { filter prerouting -110: replies to preserve-client-ip connections get their mark back; LB source ranges (drop) }
//!   chain filter-input      { filter input -110: refusals and drops (Service, node port), proxy-port guard }
//!   chain filter-forward    { filter forward -110: refusals and drops (Service) }
//!   chain filter-output     { filter output -110: preserve-client-ip connections' mark saved in conntrack; refusals and drops (Service, node port) }
//!   chain nat-prerouting    { nat prerouting -110: (with local-traffic detection: DNAT pod → Service, pod → node port,) DNAT Service, DNAT node port }
//!   chain nat-output        { nat output -110: the proxy's own upstream packets (marked) pass, then the same }
//! }
//! ```
//!
//! Service traffic is DNATed to the proxy address (an address on the
//! node, by default one the proxy adds to `lo`) rather than redirected:
//! `redirect` needs an IPv4 address on the incoming interface and drops the
//! packet when there is none, which is the normal shape of Calico's and
//! Cilium's host-side pod veths (docs/rules.md).
//!
//! A packet whose key is in no set is not translated, so the per-packet
//! cost is a few hash lookups per new flow whatever the number of
//! Services, and a change of one Service is a few elements added or
//! deleted.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    CT, Elem, Expression, Fib, FibFlag, FibResult, Map, Meta, MetaKey, NamedExpression, Payload,
    PayloadField, Prefix,
};
use nftables::schema::{
    self, Chain, Element, NfListObject, Nftables, Rule, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, NAT, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use crate::model::{IpFamily, Protocol};

/// The name of our tables (families `ip` and `ip6`).
pub const TABLE: &str = "kube-uproxy";
/// Data map: destination → proxy port.
pub const MAP_SERVICE_PORTS: &str = "service-ports";
/// Set of destinations whose Service has no usable endpoint.
pub const SET_NO_ENDPOINTS: &str = "no-endpoints";
/// Data map: protocol . node port → proxy port.
pub const MAP_NODE_PORTS: &str = "node-ports";
/// Set of node ports whose Service has no usable endpoint.
pub const SET_NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Set of destinations dropped: a `Local` traffic policy and no endpoint
/// on this node (while other nodes have some).
pub const SET_NO_LOCAL_ENDPOINTS: &str = "no-local-endpoints";
/// The same for node ports.
pub const SET_NO_LOCAL_ENDPOINT_NODEPORTS: &str = "no-local-endpoint-nodeports";
/// Set of LB destinations that only some sources may use.
pub const SET_LB_GUARDED: &str = "lb-guarded";
/// Set of (LB destination . source range) that may pass.
pub const SET_LB_ALLOWED: &str = "lb-allowed";
/// Set of the proxy's own listening ports (protocol . port).
pub const SET_PROXY_PORTS: &str = "proxy-ports";
/// Set of the node addresses node ports are served on
/// (`--nodeport-addresses`); absent when every address counts.
pub const SET_NODEPORT_ADDRESSES: &str = "nodeport-addresses";
/// One-element set naming the process that last wrote the whole table.
pub const SET_INSTANCE: &str = "instance";
/// Data map: destination → proxy port for traffic from this node's pods
/// (`--detect-local-mode`): an `externalTrafficPolicy: Local` Service's
/// externalIPs and LB IPs, sent to the listener of its cluster-wide
/// endpoints.
pub const MAP_POD_SERVICE_PORTS: &str = "pod-service-ports";
/// The same for node ports.
pub const MAP_POD_NODE_PORTS: &str = "pod-node-ports";

/// Priority of both NAT chains: `dstnat - 10`, ahead of every other DNAT
/// at `dstnat` (-100): kube-proxy's nftables table, iptables' `nat` table
/// (iptables-nft and legacy), Docker's. Nat chains of one hook run in
/// priority order and the first to translate a new flow settles it (later
/// ones are skipped); at equal priority the chain registered last would
/// run first, so a kube-proxy restarted beside this table would take new
/// connections back. With -110 the node's Service traffic goes to this
/// table whenever it is there, whatever was installed before or after
/// (docs/rules.md, "Beside kube-proxy's rules"; docs/operations.md,
/// migration). Written as a number: nft 1.0.6 does not accept `dstnat - 10`
/// for the output hook in every build.
const PRIO_NAT: i32 = -110;
/// Filter chains run before NAT (in prerouting and output) so a refused or
/// dropped packet is never translated.
const PRIO_FILTER: i32 = -110;

/// The chains of the table, as `(name, type, hook, priority)`, in the order
/// they are created.
pub const CHAINS: [(&str, NfChainType, NfHook, i32); 6] = [
    (
        "filter-prerouting",
        NfChainType::Filter,
        NfHook::Prerouting,
        PRIO_FILTER,
    ),
    (
        "filter-input",
        NfChainType::Filter,
        NfHook::Input,
        PRIO_FILTER,
    ),
    (
        "filter-forward",
        NfChainType::Filter,
        NfHook::Forward,
        PRIO_FILTER,
    ),
    (
        "filter-output",
        NfChainType::Filter,
        NfHook::Output,
        PRIO_FILTER,
    ),
    (
        "nat-prerouting",
        NfChainType::NAT,
        NfHook::Prerouting,
        PRIO_NAT,
    ),
    ("nat-output", NfChainType::NAT, NfHook::Output, PRIO_NAT),
];

/// How many rules each chain of [`CHAINS`] holds in the table of
/// `family`.
pub fn rules_in_chain(layout: &Layout, family: IpFamily, name: &str) -> usize {
    match name {
        // With local-traffic detection, the two DNATs of pod traffic first.
        "nat-prerouting" if layout.local_source(family).is_some() => 4,
        // The preserve-client-ip mark restored, the source ranges.
        "filter-prerouting" => 2,
        // Refusals of Service destinations and of node ports (TCP reset,
        // ICMP for the rest), their drops, and the port guard.
        "filter-input" => 7,
        "filter-forward" => 3,
        // The preserve-client-ip mark saved, then the refusals.
        "filter-output" => 7,
        // The proxy's own upstream packets pass, then the two DNATs.
        "nat-output" => 3,
        _ => 2,
    }
}

/// The table's settings: fixed for the life of a process but for what
/// the Node object decides (`--nodeport-addresses primary`, the pod ranges
/// of `--detect-local-mode NodeCIDR`), which [`crate::rules::RuleTable::update_layout`]
/// changes with a full sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The node-local address every IPv4 listener binds and IPv4 Service
    /// traffic is DNATed to.
    pub proxy_address: Ipv4Addr,
    /// The same for IPv6; `None` when the node has IPv6 disabled: then
    /// there is no `ip6` table and IPv6 Services are not served.
    pub proxy_address_v6: Option<Ipv6Addr>,
    /// The node addresses node ports are served on, both families
    /// together; `None`: all of them (127.0.0.1 and ::1 included). A
    /// family with no CIDR in the list, or with its zero CIDR, is served
    /// on all its addresses: kube-proxy's `NewNodePortAddresses`.
    pub nodeport_addresses: Option<Vec<IpNet>>,
    /// The writer of the table.
    pub instance: Instance,
    /// The mark of the proxy's own upstream sockets (`--upstream-mark`,
    /// never 0): the NAT output chain lets such packets pass first.
    pub upstream_mark: u32,
    /// How traffic from this node's pods is told apart
    /// (`--detect-local-mode`); `None`: it is not, and pods are external
    /// clients like any other.
    pub local_traffic: Option<LocalTraffic>,
    /// The mark of the proxy's connections opened from a client's own
    /// address (`--preserve-client-ip-mark`): saved into their conntrack
    /// mark on the way out, restored on the endpoint's replies, which the
    /// policy route of `rules::host` then delivers to the proxy. 0
    /// (`--preserve-client-ip off`): no such connections, no mark rules.
    pub preserve_client_ip_mark: u32,
}

/// kube-proxy's local-traffic detectors (`--detect-local-mode`): which
/// packets come from a pod of this node. Such traffic to an
/// `externalTrafficPolicy: Local` Service's external addresses and node
/// ports is sent to its cluster-wide endpoints, as kube-proxy does: an
/// in-cluster client calling its own ingress's LB IP is served even on a
/// node without a local endpoint (the policy keeps the client's source
/// address for *external* clients, which a pod is not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalTraffic {
    /// Sources within these ranges (`ClusterCIDR`: `--cluster-cidr`; one
    /// per family at most). A family without one has no detection.
    Sources(Vec<IpNet>),
    /// Packets that come in on this interface (`BridgeInterface`).
    Bridge(String),
    /// Packets that come in on an interface whose name begins with this
    /// (`InterfaceNamePrefix`).
    InterfacePrefix(String),
    /// Sources within this node's pod ranges (`NodeCIDR`: the Node
    /// object's `spec.podCIDRs`, one per family at most); empty until the
    /// Node is known, and no rule is written meanwhile (the reconciler
    /// waits, as kube-proxy waits for them), so no pod is taken for an
    /// external client.
    NodePodCidrs(Vec<IpNet>),
}

impl LocalTraffic {
    /// The match that selects local traffic in the table of `family`;
    /// `None` when this detector says nothing about that family.
    fn matches(&self, f: IpFamily) -> Option<Statement<'static>> {
        let iifname = || {
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::Iifname,
            }))
        };
        match self {
            LocalTraffic::Sources(nets) | LocalTraffic::NodePodCidrs(nets) => {
                let net = nets.iter().find(|n| IpFamily::of(n.addr()) == f)?;
                Some(matches(
                    payload(net_proto(f), "saddr"),
                    Operator::EQ,
                    prefix(&net.trunc()),
                ))
            }
            LocalTraffic::Bridge(name) => Some(matches(
                iifname(),
                Operator::EQ,
                Expression::String(name.clone().into()),
            )),
            // nft's wildcard: a trailing `*` matches any suffix.
            LocalTraffic::InterfacePrefix(p) => Some(matches(
                iifname(),
                Operator::EQ,
                Expression::String(format!("{p}*").into()),
            )),
        }
    }
}

impl Layout {
    /// The families that have a table: IPv4, and IPv6 when enabled.
    pub fn families(&self) -> Vec<IpFamily> {
        let mut out = vec![IpFamily::V4];
        if self.proxy_address_v6.is_some() {
            out.push(IpFamily::V6);
        }
        out
    }

    /// The proxy address of `family`, if that family is served.
    pub fn proxy_address_of(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => Some(IpAddr::V4(self.proxy_address)),
            IpFamily::V6 => self.proxy_address_v6.map(IpAddr::V6),
        }
    }

    /// The local-traffic match of `family`'s table, if it has one.
    pub fn local_source(&self, family: IpFamily) -> Option<Statement<'static>> {
        self.local_traffic.as_ref()?.matches(family)
    }

    /// `--nodeport-addresses` for one family's table, aggregated; `None`
    /// when that family's node ports are caught on all its addresses (no
    /// CIDR of the family, or its zero CIDR: kube-proxy's "match all").
    ///
    /// `nodeport-addresses` is an interval set, and nft refuses a set
    /// whose intervals overlap ("conflicting intervals specified"), which
    /// would leave the node without a table: `10.0.0.0/8,10.1.0.0/16` is
    /// a valid flag all the same, so it goes in as `10.0.0.0/8`.
    pub fn nodeport_addresses_of(&self, family: IpFamily) -> Option<Vec<IpNet>> {
        let mine: Vec<IpNet> = self
            .nodeport_addresses
            .as_ref()?
            .iter()
            .filter(|n| IpFamily::of(n.addr()) == family)
            .map(IpNet::trunc)
            .collect();
        if mine.is_empty() || mine.iter().any(|n| n.prefix_len() == 0) {
            return None;
        }
        Some(IpNet::aggregate(&mine))
    }
}

/// The process that wrote the table, kept in the kernel so that a later
/// process can tell whether the table is still its own, and so that
/// `--cleanup` knows what to restore after the last one is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Random per process: two instances of the proxy run side by side
    /// during a rolling update, and only the newest one writes.
    pub id: u32,
    /// Free text kept with the table (the set's comment): the original
    /// values of the sysctls the proxy changed.
    pub note: String,
}

/// A destination the kernel catches: a Service IP (ClusterIP, externalIP,
/// LB IP), protocol and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.ip, self.port),
            self.protocol
        )
    }
}

/// A protocol and a port: one of the proxy's listening ports, or a node
/// port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyPort {
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for ProxyPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// What the kernel matches: the key of one element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// ClusterIP, externalIP or LB IP . protocol . port.
    Service(Destination),
    /// protocol . node port, on the node's addresses of one family.
    NodePort(IpFamily, ProxyPort),
    /// An LB destination that only the [`Key::Allow`]ed sources may use.
    Guarded(Destination),
    /// One allowed source range of a guarded destination (of its family).
    Allow(Destination, IpNet),
    /// An externalIP or LB IP destination, for traffic from this node's
    /// pods (`--detect-local-mode`).
    PodService(Destination),
    /// A node port, for traffic from this node's pods.
    PodNodePort(IpFamily, ProxyPort),
}

impl Key {
    /// The family of the table the key lives in.
    pub fn family(&self) -> IpFamily {
        match self {
            Key::Service(d) | Key::Guarded(d) | Key::Allow(d, _) | Key::PodService(d) => {
                IpFamily::of(d.ip)
            }
            Key::NodePort(f, _) | Key::PodNodePort(f, _) => *f,
        }
    }

    /// The protocol of the traffic the key catches.
    pub fn protocol(&self) -> Protocol {
        match self {
            Key::Service(d) | Key::Guarded(d) | Key::Allow(d, _) | Key::PodService(d) => d.protocol,
            Key::NodePort(_, p) | Key::PodNodePort(_, p) => p.protocol,
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Service(d) => write!(f, "{d}"),
            Key::NodePort(IpFamily::V4, p) => write!(f, "node port {p}"),
            Key::NodePort(fam, p) => write!(f, "{fam} node port {p}"),
            Key::Guarded(d) => write!(f, "{d} (source ranges)"),
            Key::Allow(d, net) => write!(f, "{d} from {net}"),
            Key::PodService(d) => write!(f, "{d} from this node's pods"),
            Key::PodNodePort(IpFamily::V4, p) => write!(f, "node port {p} from this node's pods"),
            Key::PodNodePort(fam, p) => write!(f, "{fam} node port {p} from this node's pods"),
        }
    }
}

/// The elements as the kernel gets them: the allowed source ranges of each
/// guarded destination aggregated.
///
/// `lb-allowed` is an interval set: nft refuses two elements of one
/// destination whose ranges overlap ("File exists"), and refuses it for
/// the whole transaction, so one Service's `["10.0.0.0/8",
/// "10.77.0.0/16"]` (valid in the API), or two Services claiming ranges of
/// one LB destination, would stop every Service's rules. Aggregated,
/// overlapping, duplicate and contained ranges become the fewest prefixes
/// that cover the same sources, which nft always takes.
pub fn normalise(elements: BTreeMap<Key, Action>) -> BTreeMap<Key, Action> {
    let mut out = BTreeMap::new();
    let mut allowed: BTreeMap<Destination, Vec<IpNet>> = BTreeMap::new();
    for (k, a) in elements {
        match k {
            Key::Allow(d, net) => allowed.entry(d).or_default().push(net.trunc()),
            _ => {
                out.insert(k, a);
            }
        }
    }
    for (d, nets) in allowed {
        for net in IpNet::aggregate(&nets) {
            out.insert(Key::Allow(d, net), Action::Member);
        }
    }
    out
}

/// What happens to traffic for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Translate to the proxy address and this local proxy port.
    Redirect(u16),
    /// Refuse: the Service port has no usable endpoint.
    Reject,
    /// Drop: a `Local` traffic policy and no endpoint on this node.
    Drop,
    /// Be in the set (guards and allowed ranges).
    Member,
}

/// The nftables family of a table.
fn nf_family(family: IpFamily) -> NfFamily {
    match family {
        IpFamily::V4 => NfFamily::IP,
        IpFamily::V6 => NfFamily::IP6,
    }
}

/// The payload protocol of the network header (`ip` / `ip6`).
fn net_proto(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// The set type of an address of `family`.
fn addr_type(family: IpFamily) -> SetType {
    match family {
        IpFamily::V4 => SetType::Ipv4Addr,
        IpFamily::V6 => SetType::Ipv6Addr,
    }
}

fn table(family: IpFamily) -> Table<'static> {
    Table {
        family: nf_family(family),
        name: TABLE.into(),
        handle: None,
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn l4proto() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::L4proto,
    }))
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// `ip daddr . meta l4proto . th dport` (`ip6 daddr` for IPv6)
fn dest_key_expr(f: IpFamily) -> Expression<'static> {
    concat(vec![
        payload(net_proto(f), "daddr"),
        l4proto(),
        payload("th", "dport"),
    ])
}

/// `meta l4proto . th dport`
fn port_key_expr() -> Expression<'static> {
    concat(vec![l4proto(), payload("th", "dport")])
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(format!("@{name}").into())
}

fn dest_parts(d: &Destination) -> Vec<Expression<'static>> {
    vec![
        Expression::String(d.ip.to_string().into()),
        Expression::String(d.protocol.nft_name().into()),
        Expression::Number(u32::from(d.port)),
    ]
}

fn port_value(p: &ProxyPort) -> Expression<'static> {
    concat(vec![
        Expression::String(p.protocol.nft_name().into()),
        Expression::Number(u32::from(p.port)),
    ])
}

fn prefix(net: &IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(net.network().to_string().into())),
        len: u32::from(net.prefix_len()),
    }))
}

/// The set an element of `key` with `action` belongs to, and the element.
pub fn element_of(key: &Key, action: Action) -> (&'static str, Expression<'static>) {
    let with_port = |k: Expression<'static>, p: u16| {
        Expression::List(vec![k, Expression::Number(u32::from(p))])
    };
    match (key, action) {
        (Key::Service(d), Action::Redirect(p)) => {
            (MAP_SERVICE_PORTS, with_port(concat(dest_parts(d)), p))
        }
        (Key::Service(d), Action::Drop) => (SET_NO_LOCAL_ENDPOINTS, concat(dest_parts(d))),
        (Key::Service(d), _) => (SET_NO_ENDPOINTS, concat(dest_parts(d))),
        (Key::NodePort(_, n), Action::Redirect(p)) => (MAP_NODE_PORTS, with_port(port_value(n), p)),
        (Key::NodePort(_, n), Action::Drop) => (SET_NO_LOCAL_ENDPOINT_NODEPORTS, port_value(n)),
        (Key::NodePort(_, n), _) => (SET_NO_ENDPOINT_NODEPORTS, port_value(n)),
        (Key::Guarded(d), _) => (SET_LB_GUARDED, concat(dest_parts(d))),
        (Key::Allow(d, net), _) => {
            let mut parts = dest_parts(d);
            parts.push(prefix(net));
            (SET_LB_ALLOWED, concat(parts))
        }
        // Only ever redirected: pod traffic the plan cannot serve keeps
        // the verdict of the key it twins.
        (Key::PodService(d), a) => (
            MAP_POD_SERVICE_PORTS,
            with_port(concat(dest_parts(d)), redirect_port(a)),
        ),
        (Key::PodNodePort(_, n), a) => (
            MAP_POD_NODE_PORTS,
            with_port(port_value(n), redirect_port(a)),
        ),
    }
}

/// The proxy port of a redirect (0 for any other action, which the plan
/// never gives a pod key).
fn redirect_port(a: Action) -> u16 {
    match a {
        Action::Redirect(p) => p,
        _ => 0,
    }
}

fn base_chain(
    f: IpFamily,
    name: &'static str,
    ty: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family: nf_family(f),
        table: TABLE.into(),
        name: name.into(),
        _type: Some(ty),
        hook: Some(hook),
        prio: Some(prio),
        ..Chain::default()
    }
}

fn rule(f: IpFamily, chain: &'static str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: nf_family(f),
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        ..Rule::default()
    }
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn tcp_or_udp() -> Statement<'static> {
    matches(
        l4proto(),
        Operator::IN,
        Expression::Named(NamedExpression::Set(vec![
            nftables::expr::SetItem::Element(Expression::String("tcp".into())),
            nftables::expr::SetItem::Element(Expression::String("udp".into())),
        ])),
    )
}

fn ct_state_new() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        Expression::String("new".into()),
    )
}

/// `fib daddr type local`: the destination is an address of this node.
fn daddr_is_local() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: std::collections::HashSet::from([FibFlag::Daddr]),
        })),
        Operator::EQ,
        Expression::String("local".into()),
    )
}

/// Which node addresses node ports are served on: `fib daddr type local`,
/// never the proxy address, and only `--nodeport-addresses` when given.
fn node_address_matches(f: IpFamily, proxy: IpAddr, layout: &Layout) -> Vec<Statement<'static>> {
    let mut out = vec![
        daddr_is_local(),
        matches(
            payload(net_proto(f), "daddr"),
            Operator::NEQ,
            Expression::String(proxy.to_string().into()),
        ),
    ];
    if layout.nodeport_addresses_of(f).is_some() {
        out.push(matches(
            payload(net_proto(f), "daddr"),
            Operator::EQ,
            set_ref(SET_NODEPORT_ADDRESSES),
        ));
    }
    out
}

/// `meta mark & M == M return`: the proxy's own connections and datagrams
/// to endpoints (`SO_MARK` M) are not translated. Without it, an endpoint
/// whose address and port are themselves a Service destination (an
/// externalIP equal to a node address, with a hostNetwork backend on that
/// port) is DNATed back to the proxy, which connects to itself in a loop
/// until its file descriptors run out for every Service. kube-proxy
/// translates a flow once, too.
fn own_upstream_passes(f: IpFamily, chain: &'static str, mark: u32) -> Rule<'static> {
    rule(
        f,
        chain,
        vec![
            matches(
                Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::AND(
                    Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                    Expression::Number(mark),
                ))),
                Operator::EQ,
                Expression::Number(mark),
            ),
            Statement::Return(Some(nftables::stmt::Return {})),
        ],
    )
}

fn meta_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark }))
}

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "mark".into(),
        family: None,
        dir: None,
    }))
}

/// `left & mark == mark`
fn has_mark(left: Expression<'static>, mark: u32) -> Statement<'static> {
    matches(
        Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::AND(
            left,
            Expression::Number(mark),
        ))),
        Operator::EQ,
        Expression::Number(mark),
    )
}

/// `key set key | mark`: the mark's bits added, the others kept (a CNI's
/// bits in the same mark stay as they were).
fn add_mark(key: Expression<'static>, mark: u32) -> Statement<'static> {
    Statement::Mangle(nftables::stmt::Mangle {
        key: key.clone(),
        value: Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::OR(vec![
            key,
            Expression::Number(mark),
        ]))),
    })
}

/// `meta mark & (U|M) == U|M ct mark set ct mark | M` (filter-output): a
/// connection the proxy opens from a client's own address (socket mark
/// U|M: the upstream mark and the preserve mark) keeps M in its conntrack
/// entry, for [`preserve_mark_restored`].
fn preserve_mark_saved(f: IpFamily, upstream: u32, mark: u32) -> Rule<'static> {
    rule(
        f,
        "filter-output",
        vec![
            has_mark(meta_mark(), upstream | mark),
            add_mark(ct_mark(), mark),
        ],
    )
}

/// `ct mark & M == M meta mark set meta mark | M` (filter-prerouting): the
/// endpoint's replies to such a connection, addressed to the client, get
/// M back before the routing decision, and the policy route (`fwmark
/// M/(U|M) lookup <table>`, `local default dev lo` there) delivers them to
/// the proxy's socket on this node instead of forwarding them to the
/// client. The rule's mask takes U in: the socket's own packets carry U|M
/// and so are routed by the main table, to the endpoint; only the replies
/// carry M without U.
fn preserve_mark_restored(f: IpFamily, mark: u32) -> Rule<'static> {
    rule(
        f,
        "filter-prerouting",
        vec![has_mark(ct_mark(), mark), add_mark(meta_mark(), mark)],
    )
}

/// `… dnat ip to ADDR : <key> map @MAP`
fn dnat(proxy_address: IpAddr, key: Expression<'static>, map: &str) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(Expression::String(proxy_address.to_string().into())),
        family: None,
        port: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
            key,
            data: set_ref(map),
        })))),
        flags: None,
    }))
}

/// The DNAT rules of a nat chain: Service destinations, then node ports.
fn dnat_rules(
    f: IpFamily,
    proxy: IpAddr,
    chain: &'static str,
    layout: &Layout,
) -> [Rule<'static>; 2] {
    let service = vec![
        tcp_or_udp(),
        dnat(proxy, dest_key_expr(f), MAP_SERVICE_PORTS),
    ];
    let mut node = node_address_matches(f, proxy, layout);
    node.push(tcp_or_udp());
    node.push(dnat(proxy, port_key_expr(), MAP_NODE_PORTS));
    [rule(f, chain, service), rule(f, chain, node)]
}

/// With local-traffic detection, the DNAT rules of pod traffic, placed
/// before [`dnat_rules`] in `nat-prerouting`: a pod's packet to a key of
/// `pod-service-ports` / `pod-node-ports` goes to the listener of the
/// Service's cluster-wide endpoints; every other packet (keys not in those
/// maps: the lookup fails and the rule does not match) goes on to the
/// usual rules. The filter chains' drops see these packets already
/// translated to the proxy address, so they never drop them.
fn pod_dnat_rules(f: IpFamily, proxy: IpAddr, layout: &Layout) -> Vec<Rule<'static>> {
    let Some(local) = layout.local_source(f) else {
        return Vec::new();
    };
    let chain = "nat-prerouting";
    let service = vec![
        local.clone(),
        tcp_or_udp(),
        dnat(proxy, dest_key_expr(f), MAP_POD_SERVICE_PORTS),
    ];
    let mut node = node_address_matches(f, proxy, layout);
    node.push(local);
    node.push(tcp_or_udp());
    node.push(dnat(proxy, port_key_expr(), MAP_POD_NODE_PORTS));
    vec![rule(f, chain, service), rule(f, chain, node)]
}

/// A new flow to a Service port without endpoints is refused: TCP with a
/// reset, which the kernel does not rate-limit (ICMP errors are limited per
/// destination host, so a client retrying fast would see hangs instead of
/// refusals), everything else with ICMP (ICMPv6 in the `ip6` table) port
/// unreachable. `lookup` is the match that finds the flow in a set.
fn reject_rules(
    f: IpFamily,
    chain: &'static str,
    lookup: Vec<Statement<'static>>,
) -> [Rule<'static>; 2] {
    let mut tcp = vec![ct_state_new()];
    tcp.extend(lookup.iter().cloned());
    tcp.push(matches(
        l4proto(),
        Operator::EQ,
        Expression::String("tcp".into()),
    ));
    tcp.push(Statement::Reject(Some(Reject::new(
        Some(RejectType::TCPReset),
        None,
    ))));
    let mut other = vec![ct_state_new()];
    other.extend(lookup);
    other.push(Statement::Reject(Some(Reject::new(None, None))));
    [rule(f, chain, tcp), rule(f, chain, other)]
}

/// A new flow for a Service port whose `Local` traffic policy finds no
/// endpoint on this node is dropped, as kube-proxy does (the client
/// retries, perhaps through another node).
fn drop_rule(f: IpFamily, chain: &'static str, lookup: Vec<Statement<'static>>) -> Rule<'static> {
    let mut expr = vec![ct_state_new()];
    expr.extend(lookup);
    expr.push(Statement::Drop(Some(nftables::stmt::Drop {})));
    rule(f, chain, expr)
}

fn service_refusals(f: IpFamily, chain: &'static str) -> Vec<Rule<'static>> {
    let lookup = |set: &'static str| vec![matches(dest_key_expr(f), Operator::EQ, set_ref(set))];
    let mut out = reject_rules(f, chain, lookup(SET_NO_ENDPOINTS)).to_vec();
    out.push(drop_rule(f, chain, lookup(SET_NO_LOCAL_ENDPOINTS)));
    out
}

fn node_port_refusals(
    f: IpFamily,
    proxy: IpAddr,
    chain: &'static str,
    layout: &Layout,
) -> Vec<Rule<'static>> {
    let lookup = |set: &'static str| {
        let mut l = node_address_matches(f, proxy, layout);
        l.push(matches(port_key_expr(), Operator::EQ, set_ref(set)));
        l
    };
    let mut out = reject_rules(f, chain, lookup(SET_NO_ENDPOINT_NODEPORTS)).to_vec();
    out.push(drop_rule(f, chain, lookup(SET_NO_LOCAL_ENDPOINT_NODEPORTS)));
    out
}

/// `ct state new ip daddr . meta l4proto . th dport @lb-guarded ip daddr .
/// meta l4proto . th dport . ip saddr != @lb-allowed drop`: sources outside
/// `loadBalancerSourceRanges` are dropped, as kube-proxy does.
fn source_range_rule(f: IpFamily) -> Rule<'static> {
    rule(
        f,
        "filter-prerouting",
        vec![
            ct_state_new(),
            matches(dest_key_expr(f), Operator::EQ, set_ref(SET_LB_GUARDED)),
            matches(
                concat(vec![
                    payload(net_proto(f), "daddr"),
                    l4proto(),
                    payload("th", "dport"),
                    payload(net_proto(f), "saddr"),
                ]),
                Operator::NEQ,
                set_ref(SET_LB_ALLOWED),
            ),
            Statement::Drop(Some(nftables::stmt::Drop {})),
        ],
    )
}

/// `ct state new ip daddr ADDR ct status ! dnat meta l4proto . th dport
/// @proxy-ports drop`: the listeners are otherwise reachable by anyone who
/// can reach the proxy address (an L2 neighbour, a process on the node),
/// bypassing the Service rules. Translated flows carry the dnat status and
/// pass.
fn proxy_port_guard_rule(f: IpFamily, proxy_address: IpAddr) -> Rule<'static> {
    rule(
        f,
        "filter-input",
        vec![
            ct_state_new(),
            matches(
                payload(net_proto(f), "daddr"),
                Operator::EQ,
                Expression::String(proxy_address.to_string().into()),
            ),
            matches(
                Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::AND(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "status".into(),
                        family: None,
                        dir: None,
                    })),
                    Expression::String("dnat".into()),
                ))),
                Operator::EQ,
                Expression::Number(0),
            ),
            matches(port_key_expr(), Operator::EQ, set_ref(SET_PROXY_PORTS)),
            Statement::Drop(Some(nftables::stmt::Drop {})),
        ],
    )
}

/// A named set or map, with its elements.
fn set_object(
    f: IpFamily,
    name: &'static str,
    set_type: SetTypeValue<'static>,
    map: Option<SetType>,
    interval: bool,
    elems: Vec<Expression<'static>>,
    comment: String,
) -> NfListObject<'static> {
    let elem = (!elems.is_empty()).then(|| elems.into());
    let flags = interval.then(|| std::collections::HashSet::from([SetFlag::Interval]));
    match map {
        Some(value) => NfListObject::Map(Box::new(schema::Map {
            family: nf_family(f),
            table: TABLE.into(),
            name: name.into(),
            set_type,
            map: SetTypeValue::Single(value),
            elem,
            flags,
            comment: Some(comment.into()),
            ..schema::Map::default()
        })),
        None => NfListObject::Set(Box::new(schema::Set {
            family: nf_family(f),
            table: TABLE.into(),
            name: name.into(),
            set_type,
            elem,
            flags,
            comment: Some(comment.into()),
            ..schema::Set::default()
        })),
    }
}

/// `ADDR . inet_proto . inet_service`
fn dest_type(f: IpFamily) -> Vec<SetType> {
    vec![addr_type(f), SetType::InetProto, SetType::InetService]
}
const PORT: &[SetType] = &[SetType::InetProto, SetType::InetService];
/// `ADDR . inet_proto . inet_service . ADDR`
fn dest_source_type(f: IpFamily) -> Vec<SetType> {
    vec![
        addr_type(f),
        SetType::InetProto,
        SetType::InetService,
        addr_type(f),
    ]
}

/// The whole table of every family of `layout` with these elements,
/// replacing any table of that name in one transaction (`add`, `delete`,
/// then create: never a moment without rules, and whatever an earlier run
/// left is gone). Elements and ports of a family without a table are left
/// out.
pub fn full(
    layout: &Layout,
    elements: &BTreeMap<Key, Action>,
    proxy_ports: &BTreeSet<(IpFamily, ProxyPort)>,
) -> Nftables<'static> {
    let mut batch = Batch::new();
    for f in layout.families() {
        full_family(&mut batch, f, layout, elements, proxy_ports);
    }
    batch.to_nftables()
}

/// The commands that replace the table of family `f`.
fn full_family(
    batch: &mut Batch<'static>,
    f: IpFamily,
    layout: &Layout,
    elements: &BTreeMap<Key, Action>,
    proxy_ports: &BTreeSet<(IpFamily, ProxyPort)>,
) {
    let Some(proxy) = layout.proxy_address_of(f) else {
        return;
    };
    batch.add(NfListObject::Table(table(f)));
    batch.delete(NfListObject::Table(table(f)));
    batch.add(NfListObject::Table(table(f)));

    let mut by_set: BTreeMap<&'static str, Vec<Expression<'static>>> = BTreeMap::new();
    for (k, a) in elements.iter().filter(|(k, _)| k.family() == f) {
        let (set, elem) = element_of(k, *a);
        by_set.entry(set).or_default().push(elem);
    }
    let mut take = |name: &str| by_set.remove(name).unwrap_or_default();
    let concat_type = |t: Vec<SetType>| SetTypeValue::Concatenated(Cow::Owned(t));
    for object in [
        set_object(
            f,
            MAP_SERVICE_PORTS,
            concat_type(dest_type(f)),
            Some(SetType::InetService),
            false,
            take(MAP_SERVICE_PORTS),
            "Service IP . protocol . port -> local proxy port".into(),
        ),
        set_object(
            f,
            SET_NO_ENDPOINTS,
            concat_type(dest_type(f)),
            None,
            false,
            take(SET_NO_ENDPOINTS),
            "Service ports without endpoints: refused".into(),
        ),
        set_object(
            f,
            MAP_NODE_PORTS,
            concat_type(PORT.to_vec()),
            Some(SetType::InetService),
            false,
            take(MAP_NODE_PORTS),
            "protocol . node port -> local proxy port".into(),
        ),
        set_object(
            f,
            SET_NO_ENDPOINT_NODEPORTS,
            concat_type(PORT.to_vec()),
            None,
            false,
            take(SET_NO_ENDPOINT_NODEPORTS),
            "node ports without endpoints: refused".into(),
        ),
        set_object(
            f,
            SET_NO_LOCAL_ENDPOINTS,
            concat_type(dest_type(f)),
            None,
            false,
            take(SET_NO_LOCAL_ENDPOINTS),
            "Local traffic policy, no endpoint on this node: dropped".into(),
        ),
        set_object(
            f,
            SET_NO_LOCAL_ENDPOINT_NODEPORTS,
            concat_type(PORT.to_vec()),
            None,
            false,
            take(SET_NO_LOCAL_ENDPOINT_NODEPORTS),
            "node ports of those: dropped".into(),
        ),
        set_object(
            f,
            SET_LB_GUARDED,
            concat_type(dest_type(f)),
            None,
            false,
            take(SET_LB_GUARDED),
            "load-balancer IPs with loadBalancerSourceRanges".into(),
        ),
        set_object(
            f,
            SET_LB_ALLOWED,
            concat_type(dest_source_type(f)),
            None,
            true,
            take(SET_LB_ALLOWED),
            "their allowed sources".into(),
        ),
        set_object(
            f,
            MAP_POD_SERVICE_PORTS,
            concat_type(dest_type(f)),
            Some(SetType::InetService),
            false,
            take(MAP_POD_SERVICE_PORTS),
            "externalIP / LB IP . protocol . port -> proxy port, from this node's pods".into(),
        ),
        set_object(
            f,
            MAP_POD_NODE_PORTS,
            concat_type(PORT.to_vec()),
            Some(SetType::InetService),
            false,
            take(MAP_POD_NODE_PORTS),
            "protocol . node port -> proxy port, from this node's pods".into(),
        ),
        set_object(
            f,
            SET_PROXY_PORTS,
            concat_type(PORT.to_vec()),
            None,
            false,
            proxy_ports
                .iter()
                .filter(|(pf, _)| *pf == f)
                .map(|(_, p)| port_value(p))
                .collect(),
            "the proxy's listeners: reachable only through the DNAT".into(),
        ),
        set_object(
            f,
            SET_INSTANCE,
            SetTypeValue::Single(SetType::Mark),
            None,
            false,
            // The note rides on the element: nft 1.0.6 drops the comment
            // of a set given in JSON, not that of an element.
            vec![Expression::Named(NamedExpression::Elem(Elem {
                val: Box::new(Expression::Number(layout.instance.id)),
                timeout: None,
                expires: None,
                comment: Some(layout.instance.note.clone().into()),
                counter: None,
            }))],
            "the instance that writes this table; its element's comment: the note".into(),
        ),
    ] {
        batch.add(object);
    }
    if let Some(nets) = layout.nodeport_addresses_of(f) {
        batch.add(set_object(
            f,
            SET_NODEPORT_ADDRESSES,
            SetTypeValue::Single(addr_type(f)),
            None,
            true,
            nets.iter().map(prefix).collect(),
            "--nodeport-addresses".into(),
        ));
    }

    for (name, ty, hook, prio) in CHAINS {
        batch.add(NfListObject::Chain(base_chain(f, name, ty, hook, prio)));
        let rules: Vec<Rule<'static>> = match name {
            "filter-prerouting" => {
                let mut r = Vec::new();
                if layout.preserve_client_ip_mark != 0 {
                    r.push(preserve_mark_restored(f, layout.preserve_client_ip_mark));
                }
                r.push(source_range_rule(f));
                r
            }
            "filter-input" => {
                let mut r = service_refusals(f, name);
                r.extend(node_port_refusals(f, proxy, name, layout));
                r.push(proxy_port_guard_rule(f, proxy));
                r
            }
            "filter-forward" => service_refusals(f, name),
            "filter-output" => {
                let mut r = Vec::new();
                if layout.preserve_client_ip_mark != 0 {
                    r.push(preserve_mark_saved(
                        f,
                        layout.upstream_mark,
                        layout.preserve_client_ip_mark,
                    ));
                }
                r.extend(service_refusals(f, name));
                r.extend(node_port_refusals(f, proxy, name, layout));
                r
            }
            "nat-output" => {
                let mut r = vec![own_upstream_passes(f, name, layout.upstream_mark)];
                r.extend(dnat_rules(f, proxy, name, layout));
                r
            }
            _ => {
                let mut r = pod_dnat_rules(f, proxy, layout);
                r.extend(dnat_rules(f, proxy, name, layout));
                r
            }
        };
        for r in rules {
            batch.add(NfListObject::Rule(r));
        }
    }
}

/// One element change: `old` is what the kernel has now, `new` what it
/// should have (`None` = absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Key,
    pub old: Option<Action>,
    pub new: Option<Action>,
}

fn element(f: IpFamily, set: &'static str, elem: Expression<'static>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: nf_family(f),
        table: TABLE.into(),
        name: set.into(),
        elem: vec![elem].into(),
    })
}

/// The element updates that take the kernel from each change's `old` to its
/// `new`, as one transaction. Deletions come first, so a value change is
/// delete + add. Returns `None` when there is nothing to do.
pub fn delta(
    changes: &[Change],
    port_changes: &[((IpFamily, ProxyPort), bool)],
) -> Option<Nftables<'static>> {
    let mut batch = Batch::new();
    let mut any = false;
    for ((f, p), _) in port_changes.iter().filter(|(_, add)| !add) {
        batch.delete(element(*f, SET_PROXY_PORTS, port_value(p)));
        any = true;
    }
    for ((f, p), _) in port_changes.iter().filter(|(_, add)| *add) {
        batch.add(element(*f, SET_PROXY_PORTS, port_value(p)));
        any = true;
    }
    let changed = || changes.iter().filter(|c| c.old != c.new);
    for c in changed() {
        if let Some(old) = c.old {
            let (set, elem) = element_of(&c.key, old);
            batch.delete(element(c.key.family(), set, elem));
            any = true;
        }
    }
    for c in changed() {
        if let Some(new) = c.new {
            let (set, elem) = element_of(&c.key, new);
            batch.add(element(c.key.family(), set, elem));
            any = true;
        }
    }
    any.then(|| batch.to_nftables())
}

/// Deletes the table of `family` (for `--cleanup`). `add` first makes the
/// delete succeed whether or not the table exists.
pub fn delete_table(family: IpFamily) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table(family)));
    batch.delete(NfListObject::Table(table(family)));
    batch.to_nftables()
}

/// The note's key naming the instance whose rules `--cleanup` released
/// while it ran (its marker name, as `alive=` had it).
pub const RELEASED_KEY: &str = "released";

/// `--cleanup` while the writer runs: each family's table replaced by one
/// that holds only the `instance` set, with `instance` as its writer
/// (`note` without `alive=`: "taken to run", so the running instance stands
/// down for good and never writes the rules again; it keeps its
/// listeners, so the connections it holds go on). No chain: the node's
/// Service traffic goes to whatever other rules it has (kube-proxy's, on
/// the way back). One transaction for both families.
pub fn released_table(families: &[IpFamily], instance: &Instance) -> Nftables<'static> {
    let mut batch = Batch::new();
    for f in families {
        batch.add(NfListObject::Table(table(*f)));
        batch.delete(NfListObject::Table(table(*f)));
        batch.add(NfListObject::Table(table(*f)));
        batch.add(set_object(
            *f,
            SET_INSTANCE,
            SetTypeValue::Single(SetType::Mark),
            None,
            false,
            vec![Expression::Named(NamedExpression::Elem(Elem {
                val: Box::new(Expression::Number(instance.id)),
                timeout: None,
                expires: None,
                comment: Some(instance.note.clone().into()),
                counter: None,
            }))],
            "released by --cleanup: no interception; the note names the instance released".into(),
        ));
    }
    batch.to_nftables()
}

#[cfg(test)]
mod tests;
