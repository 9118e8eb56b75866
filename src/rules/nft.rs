//! Talking to the kernel's ruleset: the [`Nft`] seam, the real `nft`
//! command behind it, and [`KernelTable`], what our table holds as read back
//! from the kernel.
//!
//! The `nftables` crate builds the batches, but its runner lets nft's
//! standard error go to ours, so an error reaches the log without the
//! context of the sync that caused it. [`NftCommand`] runs `nft` itself and
//! returns nft's own words in [`RulesError::Rejected`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::process::Stdio;

use nftables::schema::Nftables;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use ipnet::IpNet;

use super::render::{
    Action, Destination, Key, MAP_NODE_PORTS, MAP_POD_NODE_PORTS, MAP_POD_SERVICE_PORTS,
    MAP_SERVICE_PORTS, ProxyPort, SET_INSTANCE, SET_LB_ALLOWED, SET_LB_GUARDED,
    SET_NO_ENDPOINT_NODEPORTS, SET_NO_ENDPOINTS, SET_NO_LOCAL_ENDPOINT_NODEPORTS,
    SET_NO_LOCAL_ENDPOINTS, SET_NODEPORT_ADDRESSES, SET_PROXY_PORTS, TABLE,
};
use crate::model::{IpFamily, Protocol};

/// `nft` refused a batch, could not be run, or printed what we cannot read.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("nft failed: {stderr}")]
    Rejected { stderr: String },
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Exec(String),
    #[error("cannot read the table nft listed: {0}")]
    Parse(String),
}

/// The kernel's ruleset as the rule layer needs it: apply a batch in one
/// transaction, read our table back. A trait so that the reconciler and the
/// rule layer are unit-tested without nft.
pub trait Nft: Send {
    /// Applies `batch` as one transaction.
    fn apply(
        &mut self,
        batch: &Nftables<'_>,
    ) -> impl Future<Output = Result<(), RulesError>> + Send;
    /// Asks whether `batch` would be applied, without applying it (`nft
    /// --check`: the kernel validates the transaction, then aborts it).
    /// Used to find which Service a refused batch is refused for, without
    /// the table going through the subsets tried on the way.
    fn check(
        &mut self,
        batch: &Nftables<'_>,
    ) -> impl Future<Output = Result<(), RulesError>> + Send;
    /// Reads our table of `family`; `None` when there is none.
    fn read(
        &mut self,
        family: IpFamily,
    ) -> impl Future<Output = Result<Option<KernelTable>, RulesError>> + Send;
}

/// The real thing: runs the `nft` program found on `PATH`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NftCommand;

impl NftCommand {
    async fn run(args: &[&str], stdin: Option<Vec<u8>>) -> Result<String, RulesError> {
        let mut cmd = tokio::process::Command::new("nft");
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| RulesError::Exec(e.to_string()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(&input)
                .await
                .map_err(|e| RulesError::Exec(format!("writing to nft: {e}")))?;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| RulesError::Exec(e.to_string()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(RulesError::Rejected {
                stderr: if stderr.is_empty() {
                    format!("nft exited with {}", out.status)
                } else {
                    stderr
                },
            })
        }
    }
}

impl Nft for NftCommand {
    async fn apply(&mut self, batch: &Nftables<'_>) -> Result<(), RulesError> {
        let json = serde_json::to_vec(batch).map_err(|e| RulesError::Exec(e.to_string()))?;
        Self::run(&["-j", "-f", "-"], Some(json)).await.map(|_| ())
    }

    async fn check(&mut self, batch: &Nftables<'_>) -> Result<(), RulesError> {
        let json = serde_json::to_vec(batch).map_err(|e| RulesError::Exec(e.to_string()))?;
        Self::run(&["-c", "-j", "-f", "-"], Some(json))
            .await
            .map(|_| ())
    }

    async fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, RulesError> {
        let nf = match family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        match Self::run(&["-j", "list", "table", nf, TABLE], None).await {
            Ok(out) => KernelTable::parse(&out, family).map(Some),
            // nft says "No such file or directory" for a missing table.
            Err(RulesError::Rejected { stderr }) if stderr.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What our table in the kernel holds: enough to check it against what we
/// applied (drift), and to adopt the proxy ports of an earlier instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTable {
    /// The table's family (`ip` or `ip6`): node-port keys are of it.
    pub family: IpFamily,
    /// Every chain, with its number of rules.
    pub chains: BTreeMap<String, usize>,
    /// The address the DNAT rules of `nat-prerouting` translate to.
    pub proxy_address: Option<IpAddr>,
    /// The elements of every set and map that [`Key`]s live in.
    pub elements: BTreeMap<Key, Action>,
    /// `proxy-ports`.
    pub proxy_ports: BTreeSet<ProxyPort>,
    /// `nodeport-addresses`, if the table has that set.
    pub nodeport_addresses: Option<Vec<IpNet>>,
    /// The id in `instance`, and its comment.
    pub instance: Option<u32>,
    pub note: Option<String>,
}

impl KernelTable {
    /// An empty table of `family`.
    pub fn new(family: IpFamily) -> Self {
        KernelTable {
            family,
            chains: BTreeMap::new(),
            proxy_address: None,
            elements: BTreeMap::new(),
            proxy_ports: BTreeSet::new(),
            nodeport_addresses: None,
            instance: None,
            note: None,
        }
    }

    /// Parses `nft -j list table ip kube-uproxy` (or `ip6`, for `family`).
    pub fn parse(json: &str, family: IpFamily) -> Result<KernelTable, RulesError> {
        let v: Value = serde_json::from_str(json).map_err(|e| RulesError::Parse(e.to_string()))?;
        let objects = v["nftables"]
            .as_array()
            .ok_or_else(|| RulesError::Parse("no \"nftables\" array".into()))?;
        let mut t = KernelTable::new(family);
        for o in objects {
            if let Some(m) = o.get("map") {
                t.add_set_object(m)?;
            } else if let Some(s) = o.get("set") {
                t.add_set_object(s)?;
            } else if let Some(c) = o.get("chain") {
                let name = c["name"].as_str().unwrap_or_default().to_string();
                t.chains.entry(name).or_insert(0);
            } else if let Some(r) = o.get("rule") {
                t.add_rule(r);
            }
        }
        Ok(t)
    }

    /// Records a map or set object (listing or batch form), with its
    /// elements.
    pub fn add_set_object(&mut self, s: &Value) -> Result<(), RulesError> {
        let name = s["name"].as_str().unwrap_or_default();
        if name == SET_NODEPORT_ADDRESSES {
            self.nodeport_addresses.get_or_insert_with(Vec::new);
        }
        if let Some(elems) = s["elem"].as_array() {
            for e in elems {
                self.add_element(name, e)?;
            }
        }
        Ok(())
    }

    /// Records a rule: counts it, and takes the proxy address from the DNAT.
    pub fn add_rule(&mut self, r: &Value) {
        let chain = r["chain"].as_str().unwrap_or_default().to_string();
        *self.chains.entry(chain.clone()).or_insert(0) += 1;
        if chain == "nat-prerouting"
            && let Some(exprs) = r["expr"].as_array()
        {
            for e in exprs {
                if let Some(addr) = e["dnat"]["addr"].as_str() {
                    self.proxy_address = addr.parse().ok();
                }
            }
        }
    }

    /// Adds one element of set `name` (as nft prints it).
    pub fn add_element(&mut self, name: &str, e: &Value) -> Result<(), RulesError> {
        match name {
            SET_PROXY_PORTS => {
                self.proxy_ports.insert(parse_port_key(elem_key(e))?);
            }
            SET_INSTANCE => {
                self.instance = elem_key(e).as_u64().map(|n| n as u32);
                self.note = e["elem"]["comment"].as_str().map(str::to_string);
            }
            SET_NODEPORT_ADDRESSES => self
                .nodeport_addresses
                .get_or_insert_with(Vec::new)
                .push(parse_net(elem_key(e))?),
            _ => {
                if let Some((k, a)) = parse_element(self.family, name, e)? {
                    self.elements.insert(k, a);
                }
            }
        }
        Ok(())
    }

    /// Removes one element of set `name`; false if it was not there.
    pub fn remove_element(&mut self, name: &str, e: &Value) -> Result<bool, RulesError> {
        Ok(match name {
            SET_PROXY_PORTS => self.proxy_ports.remove(&parse_port_key(elem_key(e))?),
            _ => match parse_element(self.family, name, e)? {
                Some((k, a)) => {
                    self.elements.get(&k) == Some(&a) && self.elements.remove(&k).is_some()
                }
                None => false,
            },
        })
    }

    /// The proxy port each key was sent to (for adoption).
    pub fn redirects(&self) -> impl Iterator<Item = (Key, u16)> + '_ {
        self.elements.iter().filter_map(|(k, a)| match a {
            Action::Redirect(p) => Some((*k, *p)),
            _ => None,
        })
    }
}

/// An element may come wrapped: `{"elem": {"val": …, "comment": …}}`.
fn elem_key(e: &Value) -> &Value {
    match e.get("elem") {
        Some(inner) => &inner["val"],
        None => e,
    }
}

/// One element of one of the [`Key`] sets and maps of the table of
/// `family`; `None` for a set that holds no keys.
pub(crate) fn parse_element(
    family: IpFamily,
    set: &str,
    e: &Value,
) -> Result<Option<(Key, Action)>, RulesError> {
    let map_value = |e: &Value| -> Result<(Value, u16), RulesError> {
        let pair = e
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| RulesError::Parse(format!("map element {e} is not [key, value]")))?;
        Ok((elem_key(&pair[0]).clone(), parse_port(&pair[1])?))
    };
    Ok(Some(match set {
        MAP_SERVICE_PORTS => {
            let (k, p) = map_value(e)?;
            (Key::Service(parse_dest(&k)?), Action::Redirect(p))
        }
        SET_NO_ENDPOINTS => (Key::Service(parse_dest(elem_key(e))?), Action::Reject),
        MAP_POD_SERVICE_PORTS => {
            let (k, p) = map_value(e)?;
            (Key::PodService(parse_dest(&k)?), Action::Redirect(p))
        }
        MAP_POD_NODE_PORTS => {
            let (k, p) = map_value(e)?;
            (
                Key::PodNodePort(family, parse_port_key(&k)?),
                Action::Redirect(p),
            )
        }
        MAP_NODE_PORTS => {
            let (k, p) = map_value(e)?;
            (
                Key::NodePort(family, parse_port_key(&k)?),
                Action::Redirect(p),
            )
        }
        SET_NO_ENDPOINT_NODEPORTS => (
            Key::NodePort(family, parse_port_key(elem_key(e))?),
            Action::Reject,
        ),
        SET_NO_LOCAL_ENDPOINTS => (Key::Service(parse_dest(elem_key(e))?), Action::Drop),
        SET_NO_LOCAL_ENDPOINT_NODEPORTS => (
            Key::NodePort(family, parse_port_key(elem_key(e))?),
            Action::Drop,
        ),
        SET_LB_GUARDED => (Key::Guarded(parse_dest(elem_key(e))?), Action::Member),
        SET_LB_ALLOWED => {
            let parts = concat(elem_key(e))?;
            let [ip, proto, port, source] = parts.as_slice() else {
                return Err(RulesError::Parse(format!(
                    "allowed source {e} has not 4 parts"
                )));
            };
            let d = dest_of(ip, proto, port)?;
            (Key::Allow(d, parse_net(source)?), Action::Member)
        }
        _ => return Ok(None),
    }))
}

fn concat(e: &Value) -> Result<&Vec<Value>, RulesError> {
    e["concat"]
        .as_array()
        .ok_or_else(|| RulesError::Parse(format!("element {e} is not a concatenation")))
}

fn parse_protocol(v: &Value) -> Result<Protocol, RulesError> {
    match v.as_str() {
        Some("tcp") => Ok(Protocol::Tcp),
        Some("udp") => Ok(Protocol::Udp),
        Some("sctp") => Ok(Protocol::Sctp),
        _ => Err(RulesError::Parse(format!("unknown protocol {v}"))),
    }
}

fn parse_port(v: &Value) -> Result<u16, RulesError> {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| RulesError::Parse(format!("{v} is not a port")))
}

fn parse_ip(v: &Value) -> Result<IpAddr, RulesError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RulesError::Parse(format!("{v} is not an IP address")))
}

/// `"10.0.0.1"` (a /32) or `{"prefix": {"addr": "10.0.0.0", "len": 8}}`.
fn parse_net(v: &Value) -> Result<IpNet, RulesError> {
    if let Some(p) = v.get("prefix") {
        let len = p["len"]
            .as_u64()
            .and_then(|l| u8::try_from(l).ok())
            .ok_or_else(|| RulesError::Parse(format!("bad prefix {v}")))?;
        return IpNet::new(parse_ip(&p["addr"])?, len)
            .map_err(|e| RulesError::Parse(format!("bad prefix {v}: {e}")));
    }
    Ok(IpNet::from(parse_ip(v)?))
}

fn dest_of(ip: &Value, proto: &Value, port: &Value) -> Result<Destination, RulesError> {
    Ok(Destination {
        ip: parse_ip(ip)?,
        protocol: parse_protocol(proto)?,
        port: parse_port(port)?,
    })
}

/// `{"concat": ["10.96.0.10", "tcp", 80]}`
pub(crate) fn parse_dest(e: &Value) -> Result<Destination, RulesError> {
    let parts = concat(e)?;
    let [ip, proto, port] = parts.as_slice() else {
        return Err(RulesError::Parse(format!(
            "destination {e} has not 3 parts"
        )));
    };
    dest_of(ip, proto, port)
}

/// `{"concat": ["tcp", 20000]}`
fn parse_port_key(e: &Value) -> Result<ProxyPort, RulesError> {
    let parts = concat(e)?;
    let [proto, port] = parts.as_slice() else {
        return Err(RulesError::Parse(format!("port {e} has not 2 parts")));
    };
    Ok(ProxyPort {
        protocol: parse_protocol(proto)?,
        port: parse_port(port)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nft 1.0.6 printed for a table of this shape (trimmed to one
    /// element of each kind).
    const LISTING: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "kube-uproxy", "handle": 1}},
      {"map": {"family": "ip", "name": "service-ports", "table": "kube-uproxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 3, "map": "inet_service", "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, 20080]]}},
      {"set": {"family": "ip", "name": "no-endpoints", "table": "kube-uproxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4, "elem": [{"concat": ["10.96.0.11", "tcp", 80]}]}},
      {"set": {"family": "ip", "name": "proxy-ports", "table": "kube-uproxy", "type": ["inet_proto", "inet_service"], "handle": 5, "elem": [{"concat": ["tcp", 20080]}]}},
      {"map": {"family": "ip", "name": "node-ports", "table": "kube-uproxy", "type": ["inet_proto", "inet_service"], "handle": 8, "map": "inet_service", "elem": [[{"concat": ["tcp", 30080]}, 20001]]}},
      {"set": {"family": "ip", "name": "lb-allowed", "table": "kube-uproxy", "type": ["ipv4_addr", "inet_proto", "inet_service", "ipv4_addr"], "handle": 3, "flags": ["interval"], "elem": [{"concat": ["10.200.8.8", "tcp", 80, "10.200.0.2"]}, {"concat": ["10.200.8.8", "tcp", 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]}]}},
      {"set": {"family": "ip", "name": "nodeport-addresses", "table": "kube-uproxy", "type": "ipv4_addr", "handle": 6, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.200.0.0", "len": 24}}]}},
      {"set": {"family": "ip", "name": "instance", "table": "kube-uproxy", "type": "mark", "handle": 6, "elem": [{"elem": {"val": 4660, "comment": "net.ipv4.tcp_migrate_req=0"}}]}},
      {"chain": {"family": "ip", "table": "kube-uproxy", "name": "nat-prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"rule": {"family": "ip", "table": "kube-uproxy", "chain": "nat-prerouting", "handle": 7, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"dnat": {"addr": "169.254.42.1", "port": {"map": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@service-ports"}}}}]}}
    ]}"#;

    #[test]
    fn reads_what_nft_lists() {
        let t = KernelTable::parse(LISTING, IpFamily::V4).unwrap();
        let d = |ip: &str| Destination {
            ip: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert_eq!(
            t.elements.get(&Key::Service(d("10.96.0.10"))),
            Some(&Action::Redirect(20080))
        );
        assert_eq!(
            t.elements.get(&Key::Service(d("10.96.0.11"))),
            Some(&Action::Reject)
        );
        assert_eq!(
            t.elements.get(&Key::NodePort(
                IpFamily::V4,
                ProxyPort {
                    protocol: Protocol::Tcp,
                    port: 30080
                }
            )),
            Some(&Action::Redirect(20001))
        );
        let lb = Destination {
            ip: "10.200.8.8".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert!(
            t.elements
                .contains_key(&Key::Allow(lb, "10.200.0.2/32".parse().unwrap()))
        );
        assert!(
            t.elements
                .contains_key(&Key::Allow(lb, "10.0.0.0/8".parse().unwrap()))
        );
        assert_eq!(
            t.nodeport_addresses,
            Some(vec!["10.200.0.0/24".parse().unwrap()])
        );
        assert!(t.proxy_ports.contains(&ProxyPort {
            protocol: Protocol::Tcp,
            port: 20080
        }));
        assert_eq!(t.instance, Some(4660));
        assert_eq!(t.note.as_deref(), Some("net.ipv4.tcp_migrate_req=0"));
        assert_eq!(t.chains.get("nat-prerouting"), Some(&1));
        assert_eq!(t.proxy_address, Some("169.254.42.1".parse().unwrap()));
        assert_eq!(t.elements.len(), 5);
        assert_eq!(t.redirects().count(), 2);
    }

    #[test]
    fn bad_listings_are_errors_not_panics() {
        for bad in [
            "",
            "{}",
            r#"{"nftables": [{"map": {"name": "service-ports", "elem": [[{"concat": ["x", "tcp", 80]}, 1]]}}]}"#,
            r#"{"nftables": [{"map": {"name": "service-ports", "elem": [[{"concat": ["10.0.0.1", "tcp", 80]}, 70000]]}}]}"#,
            r#"{"nftables": [{"set": {"name": "proxy-ports", "elem": [{"concat": ["gre", 1]}]}}]}"#,
        ] {
            assert!(
                KernelTable::parse(bad, IpFamily::V4).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn reads_an_ip6_table() {
        let listing = r#"{"nftables": [
          {"table": {"family": "ip6", "name": "kube-uproxy", "handle": 2}},
          {"map": {"family": "ip6", "name": "service-ports", "table": "kube-uproxy", "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 3, "map": "inet_service", "elem": [[{"concat": ["fd00:96::10", "udp", 53]}, 20001]]}},
          {"map": {"family": "ip6", "name": "node-ports", "table": "kube-uproxy", "type": ["inet_proto", "inet_service"], "handle": 8, "map": "inet_service", "elem": [[{"concat": ["tcp", 30080]}, 20002]]}},
          {"set": {"family": "ip6", "name": "lb-allowed", "table": "kube-uproxy", "type": ["ipv6_addr", "inet_proto", "inet_service", "ipv6_addr"], "handle": 3, "flags": ["interval"], "elem": [{"concat": ["fd00:8::8", "tcp", 80, {"prefix": {"addr": "fd00:200::", "len": 64}}]}]}},
          {"set": {"family": "ip6", "name": "nodeport-addresses", "table": "kube-uproxy", "type": "ipv6_addr", "handle": 6, "flags": ["interval"], "elem": [{"prefix": {"addr": "fd00:200::", "len": 64}}]}},
          {"chain": {"family": "ip6", "table": "kube-uproxy", "name": "nat-prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
          {"rule": {"family": "ip6", "table": "kube-uproxy", "chain": "nat-prerouting", "handle": 7, "expr": [{"dnat": {"addr": "fd6b:7570:7278::1", "port": {"map": {"key": {"concat": [{"payload": {"protocol": "ip6", "field": "daddr"}}, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@service-ports"}}}}]}}
        ]}"#;
        let t = KernelTable::parse(listing, IpFamily::V6).unwrap();
        assert_eq!(t.family, IpFamily::V6);
        assert_eq!(t.proxy_address, Some("fd6b:7570:7278::1".parse().unwrap()));
        let d = Destination {
            ip: "fd00:96::10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert_eq!(
            t.elements.get(&Key::Service(d)),
            Some(&Action::Redirect(20001))
        );
        let np = Key::NodePort(
            IpFamily::V6,
            ProxyPort {
                protocol: Protocol::Tcp,
                port: 30080,
            },
        );
        assert_eq!(t.elements.get(&np), Some(&Action::Redirect(20002)));
        assert_eq!(np.family(), IpFamily::V6);
        let lb = Destination {
            ip: "fd00:8::8".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert!(
            t.elements
                .contains_key(&Key::Allow(lb, "fd00:200::/64".parse().unwrap()))
        );
        assert_eq!(
            t.nodeport_addresses,
            Some(vec!["fd00:200::/64".parse().unwrap()])
        );
    }
}
