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
use std::net::Ipv4Addr;
use std::process::Stdio;

use nftables::schema::Nftables;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::render::{
    Action, Destination, MAP_SERVICE_PORTS, ProxyPort, SET_INSTANCE, SET_NO_ENDPOINTS,
    SET_PROXY_PORTS, TABLE,
};
use crate::model::Protocol;

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
    /// Reads our table; `None` when there is none.
    fn read(&mut self) -> impl Future<Output = Result<Option<KernelTable>, RulesError>> + Send;
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

    async fn read(&mut self) -> Result<Option<KernelTable>, RulesError> {
        match Self::run(&["-j", "list", "table", "ip", TABLE], None).await {
            Ok(out) => KernelTable::parse(&out).map(Some),
            // nft says "No such file or directory" for a missing table.
            Err(RulesError::Rejected { stderr }) if stderr.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What our table in the kernel holds: enough to check it against what we
/// applied (drift), and to adopt the proxy ports of an earlier instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Every chain, with its number of rules.
    pub chains: BTreeMap<String, usize>,
    /// The address the DNAT rule of `nat-prerouting` translates to.
    pub proxy_address: Option<Ipv4Addr>,
    /// `service-ports`: destination → proxy port.
    pub service_ports: BTreeMap<Destination, u16>,
    /// `no-endpoints`.
    pub no_endpoints: BTreeSet<Destination>,
    /// `proxy-ports`.
    pub proxy_ports: BTreeSet<ProxyPort>,
    /// The id in `instance`, and its comment.
    pub instance: Option<u32>,
    pub note: Option<String>,
}

impl KernelTable {
    /// Parses `nft -j list table ip kube-uproxy`.
    pub fn parse(json: &str) -> Result<KernelTable, RulesError> {
        let v: Value = serde_json::from_str(json).map_err(|e| RulesError::Parse(e.to_string()))?;
        let objects = v["nftables"]
            .as_array()
            .ok_or_else(|| RulesError::Parse("no \"nftables\" array".into()))?;
        let mut t = KernelTable::default();
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
        if name == SET_INSTANCE {
            self.note = s["comment"].as_str().map(str::to_string);
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
            MAP_SERVICE_PORTS => {
                let (d, p) = parse_map_element(e)?;
                self.service_ports.insert(d, p);
            }
            SET_NO_ENDPOINTS => {
                self.no_endpoints.insert(parse_dest(elem_key(e))?);
            }
            SET_PROXY_PORTS => {
                self.proxy_ports.insert(parse_proxy_port(elem_key(e))?);
            }
            SET_INSTANCE => self.instance = elem_key(e).as_u64().map(|n| n as u32),
            _ => {}
        }
        Ok(())
    }

    /// Removes one element of set `name`; false if it was not there.
    pub fn remove_element(&mut self, name: &str, e: &Value) -> Result<bool, RulesError> {
        Ok(match name {
            MAP_SERVICE_PORTS => {
                let (d, p) = parse_map_element(e)?;
                self.service_ports.get(&d) == Some(&p) && self.service_ports.remove(&d).is_some()
            }
            SET_NO_ENDPOINTS => self.no_endpoints.remove(&parse_dest(elem_key(e))?),
            SET_PROXY_PORTS => self.proxy_ports.remove(&parse_proxy_port(elem_key(e))?),
            _ => false,
        })
    }

    /// The elements as the rule layer keeps them.
    pub fn elements(&self) -> BTreeMap<Destination, Action> {
        let mut all: BTreeMap<Destination, Action> = self
            .service_ports
            .iter()
            .map(|(d, p)| (*d, Action::Redirect(*p)))
            .collect();
        all.extend(self.no_endpoints.iter().map(|d| (*d, Action::Reject)));
        all
    }
}

/// An element may come wrapped: `{"elem": {"val": …, "comment": …}}`.
fn elem_key(e: &Value) -> &Value {
    match e.get("elem") {
        Some(inner) => &inner["val"],
        None => e,
    }
}

fn parse_map_element(e: &Value) -> Result<(Destination, u16), RulesError> {
    let pair = e
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| RulesError::Parse(format!("map element {e} is not [key, value]")))?;
    let port = pair[1]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| RulesError::Parse(format!("map value {} is not a port", pair[1])))?;
    Ok((parse_dest(elem_key(&pair[0]))?, port))
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

/// `{"concat": ["10.96.0.10", "tcp", 80]}`
pub(crate) fn parse_dest(e: &Value) -> Result<Destination, RulesError> {
    let parts = concat(e)?;
    let [ip, proto, port] = parts.as_slice() else {
        return Err(RulesError::Parse(format!(
            "destination {e} has not 3 parts"
        )));
    };
    Ok(Destination {
        ip: ip
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RulesError::Parse(format!("{ip} is not an IPv4 address")))?,
        protocol: parse_protocol(proto)?,
        port: parse_port(port)?,
    })
}

/// `{"concat": ["tcp", 20000]}`
fn parse_proxy_port(e: &Value) -> Result<ProxyPort, RulesError> {
    let parts = concat(e)?;
    let [proto, port] = parts.as_slice() else {
        return Err(RulesError::Parse(format!("proxy port {e} has not 2 parts")));
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
      {"set": {"family": "ip", "name": "instance", "table": "kube-uproxy", "type": "mark", "handle": 6, "comment": "net.ipv4.tcp_migrate_req=0", "elem": [4660]}},
      {"chain": {"family": "ip", "table": "kube-uproxy", "name": "nat-prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"rule": {"family": "ip", "table": "kube-uproxy", "chain": "nat-prerouting", "handle": 7, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}}, {"dnat": {"addr": "169.254.42.1", "port": {"map": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@service-ports"}}}}]}}
    ]}"#;

    #[test]
    fn reads_what_nft_lists() {
        let t = KernelTable::parse(LISTING).unwrap();
        let d = |ip: &str| Destination {
            ip: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert_eq!(t.service_ports.get(&d("10.96.0.10")), Some(&20080));
        assert!(t.no_endpoints.contains(&d("10.96.0.11")));
        assert!(t.proxy_ports.contains(&ProxyPort {
            protocol: Protocol::Tcp,
            port: 20080
        }));
        assert_eq!(t.instance, Some(4660));
        assert_eq!(t.note.as_deref(), Some("net.ipv4.tcp_migrate_req=0"));
        assert_eq!(t.chains.get("nat-prerouting"), Some(&1));
        assert_eq!(t.proxy_address, Some(Ipv4Addr::new(169, 254, 42, 1)));
        assert_eq!(t.elements().len(), 2);
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
            assert!(KernelTable::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
