//! Rule rendering: desired destinations → nftables JSON batches. Pure.
//!
//! The table holds a fixed set of chains with one rule per job; what
//! changes at run time are only the elements of named sets:
//!
//! ```text
//! table ip kube-uproxy {
//!   map service-ports { type ipv4_addr . inet_proto . inet_service : inet_service }
//!   set no-endpoints  { type ipv4_addr . inet_proto . inet_service }
//!   set proxy-ports   { type inet_proto . inet_service }
//!   set instance      { type mark; comment "…" }   the writer's id (see `Instance`)
//!   chain nat-prerouting { type nat hook prerouting priority dstnat
//!     meta l4proto { tcp, udp } dnat ip to PROXY_ADDRESS : ip daddr . meta l4proto . th dport map @service-ports }
//!   chain nat-output { type nat hook output priority -100; (same rule) }
//!   chain filter-input / filter-forward / filter-output { type filter hook … priority -110
//!     ct state new ip daddr . meta l4proto . th dport @no-endpoints meta l4proto tcp reject with tcp reset
//!     ct state new ip daddr . meta l4proto . th dport @no-endpoints reject
//!     (input only) ct state new ip daddr PROXY_ADDRESS ct status ! dnat meta l4proto . th dport @proxy-ports drop }
//! }
//! ```
//!
//! Service traffic is DNATed to the proxy address (an address on the
//! node, by default one the proxy adds to `lo`) rather than redirected:
//! `redirect` needs an IPv4 address on the incoming interface and drops the
//! packet when there is none, which is the normal shape of Calico's and
//! Cilium's host-side pod veths (docs/rules.md).
//!
//! A packet whose destination is not in `service-ports` is not translated,
//! so the per-packet cost is one hash lookup whatever the number of
//! Services, and a change of one Service is one element added or deleted.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{CT, Expression, Map, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{
    self, Chain, Element, NfListObject, Nftables, Rule, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, NAT, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use crate::model::Protocol;

/// The name of our table (family `ip`).
pub const TABLE: &str = "kube-uproxy";
/// Data map: destination → proxy port.
pub const MAP_SERVICE_PORTS: &str = "service-ports";
/// Set of destinations whose Service has no usable endpoint.
pub const SET_NO_ENDPOINTS: &str = "no-endpoints";
/// Set of the proxy's own listening ports (protocol . port).
pub const SET_PROXY_PORTS: &str = "proxy-ports";
/// One-element set naming the process that last wrote the whole table.
pub const SET_INSTANCE: &str = "instance";

/// The chains of the table, as `(name, type, hook, priority)`, in the order
/// they are created.
pub const CHAINS: [(&str, NfChainType, NfHook, i32); 5] = [
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
        PRIO_DSTNAT,
    ),
    ("nat-output", NfChainType::NAT, NfHook::Output, PRIO_DSTNAT),
];

/// How many rules each chain of [`CHAINS`] holds.
pub fn rules_in_chain(name: &str) -> usize {
    match name {
        // Two rejects (TCP reset, ICMP for the rest) and the port guard.
        "filter-input" => 3,
        "filter-forward" | "filter-output" => 2,
        _ => 1,
    }
}

/// What is fixed for the life of a process: where listeners are, and who
/// wrote the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The node-local address every listener binds and Service traffic is
    /// DNATed to.
    pub proxy_address: Ipv4Addr,
    /// The writer of the table.
    pub instance: Instance,
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

/// Priority of the NAT output chain (nft 1.0.6 does not accept `dstnat`
/// for the output hook by name in every build; -100 is its value).
const PRIO_DSTNAT: i32 = -100;
/// Filter chains run before NAT so a rejected packet is never redirected.
const PRIO_FILTER: i32 = -110;

/// A destination the kernel catches: a Service IP, protocol and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub ip: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// One of the proxy's listening ports: reachable only through a redirect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyPort {
    pub protocol: Protocol,
    pub port: u16,
}

/// What happens to traffic for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Translate to the proxy address and this local proxy port.
    Redirect(u16),
    /// Refuse: the Service port has no usable endpoint.
    Reject,
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    }
}

fn dest_key_type() -> SetTypeValue<'static> {
    SetTypeValue::Concatenated(Cow::Borrowed(&[
        SetType::Ipv4Addr,
        SetType::InetProto,
        SetType::InetService,
    ]))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `ip daddr . meta l4proto . th dport`
fn dest_key_expr() -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        payload("ip", "daddr"),
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        })),
        payload("th", "dport"),
    ]))
}

fn dest_value(d: &Destination) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        Expression::String(d.ip.to_string().into()),
        Expression::String(d.protocol.nft_name().into()),
        Expression::Number(u32::from(d.port)),
    ]))
}

fn proxy_port_value(p: &ProxyPort) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        Expression::String(p.protocol.nft_name().into()),
        Expression::Number(u32::from(p.port)),
    ]))
}

fn map_element(d: &Destination, proxy_port: u16) -> Expression<'static> {
    Expression::List(vec![
        dest_value(d),
        Expression::Number(u32::from(proxy_port)),
    ])
}

fn base_chain(name: &'static str, ty: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(ty),
        hook: Some(hook),
        prio: Some(prio),
        ..Chain::default()
    }
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        ..Rule::default()
    }
}

/// `meta l4proto { tcp, udp } dnat ip to ADDR : <key> map @service-ports`
fn dnat_rule(chain: &'static str, proxy_address: Ipv4Addr) -> Rule<'static> {
    rule(
        chain,
        vec![
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::L4proto,
                })),
                right: Expression::Named(NamedExpression::Set(vec![
                    schema_set_item("tcp"),
                    schema_set_item("udp"),
                ])),
                op: Operator::IN,
            }),
            Statement::DNAT(Some(NAT {
                addr: Some(Expression::String(proxy_address.to_string().into())),
                family: None,
                port: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
                    key: dest_key_expr(),
                    data: Expression::String(format!("@{MAP_SERVICE_PORTS}").into()),
                })))),
                flags: None,
            })),
        ],
    )
}

fn schema_set_item(s: &'static str) -> nftables::expr::SetItem<'static> {
    nftables::expr::SetItem::Element(Expression::String(s.into()))
}

fn ct_state_new() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        right: Expression::String("new".into()),
        op: Operator::IN,
    })
}

/// `ct state new ip daddr ADDR ct status ! dnat meta l4proto . th dport
/// @proxy-ports drop`: the listeners are otherwise reachable by anyone who
/// can reach the proxy address (an L2 neighbour, a process on the node),
/// bypassing the Service rules. Translated flows carry the dnat status and
/// pass.
fn proxy_port_guard_rule(proxy_address: Ipv4Addr) -> Rule<'static> {
    rule(
        "filter-input",
        vec![
            ct_state_new(),
            Statement::Match(Match {
                left: payload("ip", "daddr"),
                right: Expression::String(proxy_address.to_string().into()),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::AND(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "status".into(),
                        family: None,
                        dir: None,
                    })),
                    Expression::String("dnat".into()),
                ))),
                right: Expression::Number(0),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::Concat(vec![
                    Expression::Named(NamedExpression::Meta(Meta {
                        key: MetaKey::L4proto,
                    })),
                    payload("th", "dport"),
                ])),
                right: Expression::String(format!("@{SET_PROXY_PORTS}").into()),
                op: Operator::EQ,
            }),
            Statement::Drop(Some(nftables::stmt::Drop {})),
        ],
    )
}

/// A new flow to a Service port without endpoints is refused: TCP with a
/// reset, which the kernel does not rate-limit (ICMP errors are limited per
/// destination host, so a client retrying fast would see hangs instead of
/// refusals), everything else with ICMP port unreachable.
fn reject_rules(chain: &'static str) -> [Rule<'static>; 2] {
    let lookup = || {
        vec![
            // Only the first packet of a flow is looked up; established
            // traffic (all proxied bytes) skips the set.
            ct_state_new(),
            Statement::Match(Match {
                left: dest_key_expr(),
                right: Expression::String(format!("@{SET_NO_ENDPOINTS}").into()),
                op: Operator::EQ,
            }),
        ]
    };
    let mut tcp = lookup();
    tcp.push(Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        })),
        right: Expression::String("tcp".into()),
        op: Operator::EQ,
    }));
    tcp.push(Statement::Reject(Some(Reject::new(
        Some(RejectType::TCPReset),
        None,
    ))));
    let mut other = lookup();
    other.push(Statement::Reject(Some(Reject::new(None, None))));
    [rule(chain, tcp), rule(chain, other)]
}

/// The whole table with these elements, replacing any table of that name
/// in one transaction (`add`, `delete`, then create: never a moment without
/// rules, and whatever an earlier run left is gone).
pub fn full(
    layout: &Layout,
    elements: &BTreeMap<Destination, Action>,
    proxy_ports: &BTreeSet<ProxyPort>,
) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));

    let redirects: Vec<Expression<'static>> = elements
        .iter()
        .filter_map(|(d, a)| match a {
            Action::Redirect(p) => Some(map_element(d, *p)),
            Action::Reject => None,
        })
        .collect();
    let rejects: Vec<Expression<'static>> = elements
        .iter()
        .filter(|(_, a)| **a == Action::Reject)
        .map(|(d, _)| dest_value(d))
        .collect();

    batch.add(NfListObject::Map(Box::new(schema::Map {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: MAP_SERVICE_PORTS.into(),
        set_type: dest_key_type(),
        map: SetTypeValue::Single(SetType::InetService),
        elem: (!redirects.is_empty()).then(|| redirects.into()),
        comment: Some("ClusterIP . protocol . port -> local proxy port".into()),
        ..schema::Map::default()
    })));
    batch.add(NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: SET_NO_ENDPOINTS.into(),
        set_type: dest_key_type(),
        elem: (!rejects.is_empty()).then(|| rejects.into()),
        comment: Some("Service ports without endpoints: refused".into()),
        ..schema::Set::default()
    })));

    let ports: Vec<Expression<'static>> = proxy_ports.iter().map(proxy_port_value).collect();
    batch.add(NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: SET_PROXY_PORTS.into(),
        set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[
            SetType::InetProto,
            SetType::InetService,
        ])),
        elem: (!ports.is_empty()).then(|| ports.into()),
        comment: Some("the proxy's listeners: reachable only through the DNAT".into()),
        ..schema::Set::default()
    })));
    batch.add(NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: SET_INSTANCE.into(),
        set_type: SetTypeValue::Single(SetType::Mark),
        elem: Some(vec![Expression::Number(layout.instance.id)].into()),
        comment: Some(layout.instance.note.clone().into()),
        ..schema::Set::default()
    })));

    for (name, ty, hook, prio) in CHAINS {
        batch.add(NfListObject::Chain(base_chain(name, ty, hook, prio)));
        match ty {
            NfChainType::Filter => {
                for r in reject_rules(name) {
                    batch.add(NfListObject::Rule(r));
                }
                if name == "filter-input" {
                    batch.add(NfListObject::Rule(proxy_port_guard_rule(
                        layout.proxy_address,
                    )));
                }
            }
            _ => batch.add(NfListObject::Rule(dnat_rule(name, layout.proxy_address))),
        }
    }
    batch.to_nftables()
}

/// One element change: `old` is what the kernel has now, `new` what it
/// should have (`None` = absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub dest: Destination,
    pub old: Option<Action>,
    pub new: Option<Action>,
}

fn element(set: &'static str, elem: Expression<'static>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: set.into(),
        elem: vec![elem].into(),
    })
}

/// The element updates that take the kernel from each change's `old` to its
/// `new`, as one transaction. Deletions come first, so a value change is
/// delete + add. Returns `None` when there is nothing to do.
pub fn delta(changes: &[Change], port_changes: &[(ProxyPort, bool)]) -> Option<Nftables<'static>> {
    let mut batch = Batch::new();
    let mut any = false;
    for (p, _) in port_changes.iter().filter(|(_, add)| !add) {
        batch.delete(element(SET_PROXY_PORTS, proxy_port_value(p)));
        any = true;
    }
    for (p, _) in port_changes.iter().filter(|(_, add)| *add) {
        batch.add(element(SET_PROXY_PORTS, proxy_port_value(p)));
        any = true;
    }
    for c in changes.iter().filter(|c| c.old != c.new) {
        match c.old {
            Some(Action::Redirect(p)) => {
                batch.delete(element(MAP_SERVICE_PORTS, map_element(&c.dest, p)))
            }
            Some(Action::Reject) => batch.delete(element(SET_NO_ENDPOINTS, dest_value(&c.dest))),
            None => continue,
        }
        any = true;
    }
    for c in changes.iter().filter(|c| c.old != c.new) {
        match c.new {
            Some(Action::Redirect(p)) => {
                batch.add(element(MAP_SERVICE_PORTS, map_element(&c.dest, p)))
            }
            Some(Action::Reject) => batch.add(element(SET_NO_ENDPOINTS, dest_value(&c.dest))),
            None => continue,
        }
        any = true;
    }
    any.then(|| batch.to_nftables())
}

/// Deletes the table (for shutdown and `--cleanup`). `add` first makes the
/// delete succeed whether or not the table exists.
pub fn delete_table() -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.to_nftables()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn dest(ip: &str, port: u16) -> Destination {
        Destination {
            ip: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn to_json(n: &Nftables) -> Value {
        serde_json::to_value(n).unwrap()
    }

    #[test]
    fn full_replaces_the_table_and_holds_the_elements() {
        let mut els = BTreeMap::new();
        els.insert(dest("10.96.0.10", 80), Action::Redirect(20000));
        els.insert(dest("10.96.0.11", 443), Action::Reject);
        let ports = BTreeSet::from([ProxyPort {
            protocol: Protocol::Tcp,
            port: 20000,
        }]);
        let layout = Layout {
            proxy_address: "169.254.42.1".parse().unwrap(),
            instance: Instance {
                id: 7,
                note: "a note".into(),
            },
        };
        let v = to_json(&full(&layout, &els, &ports));
        let cmds = v["nftables"].as_array().unwrap();
        // add table, delete table, add table: atomic replacement.
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        assert!(cmds[2]["add"]["table"].is_object());
        let map = cmds.iter().find_map(|c| c["add"].get("map")).unwrap();
        assert_eq!(map["name"], MAP_SERVICE_PORTS);
        assert_eq!(
            map["elem"],
            json!([[{"concat": ["10.96.0.10", "tcp", 80]}, 20000]])
        );
        let sets: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("set")).collect();
        assert_eq!(sets[0]["name"], SET_NO_ENDPOINTS);
        assert_eq!(
            sets[0]["elem"],
            json!([{"concat": ["10.96.0.11", "tcp", 443]}])
        );
        assert_eq!(sets[1]["name"], SET_PROXY_PORTS);
        assert_eq!(sets[1]["elem"], json!([{"concat": ["tcp", 20000]}]));
        assert_eq!(sets[2]["name"], SET_INSTANCE);
        assert_eq!(sets[2]["elem"], json!([7]));
        assert_eq!(sets[2]["comment"], "a note");
        // Every rule of every chain, as rules_in_chain() says.
        for (name, ..) in CHAINS {
            let n = cmds
                .iter()
                .filter_map(|c| c["add"].get("rule"))
                .filter(|r| r["chain"] == name)
                .count();
            assert_eq!(n, rules_in_chain(name), "rules in {name}");
        }
        // Service traffic is translated to the proxy address, not redirected.
        let dnat = cmds
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .find(|r| r["chain"] == "nat-prerouting")
            .unwrap();
        assert_eq!(dnat["expr"][1]["dnat"]["addr"], "169.254.42.1");
        assert_eq!(
            dnat["expr"][1]["dnat"]["port"]["map"]["data"],
            format!("@{MAP_SERVICE_PORTS}")
        );
        // TCP is refused with a reset (not rate-limited), the rest by ICMP.
        let rejects: Vec<&Value> = cmds
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["chain"] == "filter-forward")
            .collect();
        assert_eq!(rejects[0]["expr"][3]["reject"]["type"], "tcp reset");
        assert_eq!(rejects[0]["expr"][2]["match"]["right"], "tcp");
        assert!(rejects[1]["expr"][2]["reject"].is_object());
        let chains: Vec<&str> = cmds
            .iter()
            .filter_map(|c| c["add"].get("chain"))
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            chains,
            [
                "filter-input",
                "filter-forward",
                "filter-output",
                "nat-prerouting",
                "nat-output"
            ]
        );
    }

    #[test]
    fn delta_touches_only_changed_elements_and_deletes_first() {
        let changes = [
            Change {
                dest: dest("10.96.0.10", 80),
                old: Some(Action::Redirect(20000)),
                new: Some(Action::Reject),
            },
            Change {
                dest: dest("10.96.0.12", 80),
                old: None,
                new: Some(Action::Redirect(20001)),
            },
            Change {
                dest: dest("10.96.0.13", 80),
                old: Some(Action::Redirect(20002)),
                new: Some(Action::Redirect(20002)),
            },
        ];
        let v = to_json(&delta(&changes, &[]).unwrap());
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 3, "{v}");
        assert_eq!(cmds[0]["delete"]["element"]["name"], MAP_SERVICE_PORTS);
        assert_eq!(cmds[1]["add"]["element"]["name"], SET_NO_ENDPOINTS);
        assert_eq!(
            cmds[2]["add"]["element"]["elem"],
            json!([[{"concat": ["10.96.0.12", "tcp", 80]}, 20001]])
        );
        assert!(delta(&changes[2..], &[]).is_none());
        let p = ProxyPort {
            protocol: Protocol::Tcp,
            port: 20001,
        };
        let v = to_json(&delta(&[], &[(p, true)]).unwrap());
        assert_eq!(v["nftables"][0]["add"]["element"]["name"], SET_PROXY_PORTS);
    }
}
