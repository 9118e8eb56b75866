//! kube-proxy's rules on a node kube-uproxy took over
//! (`--cleanup-kube-proxy`).
//!
//! kube-proxy leaves its rules in place when it stops, on purpose (a
//! restart must not leave the node without Service rules), and its own
//! `kube-proxy --cleanup` is a binary the nodes usually do not have. So
//! kube-uproxy removes them itself, once its own table is in the kernel:
//! its nat chains run before kube-proxy's (render.rs, `PRIO_NAT`), so from
//! its first sync on no new connection reaches kube-proxy's rules, and
//! removing them changes nothing for the node's traffic. Connections
//! kube-proxy's rules translated before keep their conntrack entries and
//! go on after the rules are gone.
//!
//! What goes, for each of kube-proxy's modes, is what its own cleanup
//! removes:
//!
//! - nftables mode: the tables `ip kube-proxy` and `ip6 kube-proxy`;
//! - iptables mode, for iptables-nft and iptables-legacy, IPv4 and IPv6
//!   (whichever tools are installed): its chains in `nat`, `filter` and
//!   `mangle` ([`is_kube_proxy_chain`]) and every rule elsewhere that jumps
//!   to one. Chains it shares with the kubelet (`KUBE-FIREWALL` in
//!   `filter`, `KUBE-MARK-DROP`, `KUBE-MARK-MASQ`, `KUBE-KUBELET-CANARY`,
//!   `KUBE-IPTABLES-HINT`) stay, as `kube-proxy --cleanup` leaves them;
//! - IPVS mode: its iptables chains (above), the `kube-ipvs0` dummy
//!   interface, the IPVS virtual services on its addresses and the `KUBE-*`
//!   ipsets (with `ipvsadm` and `ipset` when installed; otherwise the
//!   report says what to run: the virtual services are inert once their
//!   addresses are no longer local).
//!
//! Every step reads before it removes, so a node without kube-proxy's rules
//! gets no change, and running it twice is the same as once.

use std::io;
use std::io::Write;
use std::process::{Command, Stdio};

/// One step of the cleanup failed; the others still ran.
#[derive(Debug, thiserror::Error)]
pub enum KubeProxyCleanupError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Exec {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// What was removed, one line each ("nftables table ip kube-proxy").
    pub removed: Vec<String>,
    /// What was left and why, and what to run for it.
    pub notes: Vec<String>,
    /// Steps that failed.
    pub errors: Vec<KubeProxyCleanupError>,
}

impl Report {
    /// Nothing of kube-proxy's was found (and nothing failed).
    pub fn nothing_found(&self) -> bool {
        self.removed.is_empty() && self.errors.is_empty()
    }
}

/// The name of kube-proxy's IPVS dummy interface.
pub const IPVS_INTERFACE: &str = "kube-ipvs0";

/// The iptables tools tried, each with its restore companion and a label.
const IPTABLES: [(&str, &str, &str); 4] = [
    ("iptables-nft-save", "iptables-nft-restore", "iptables-nft"),
    (
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
        "ip6tables-nft",
    ),
    (
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "iptables-legacy",
    ),
    (
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
        "ip6tables-legacy",
    ),
];

/// Removes kube-proxy's rules from this node (blocking: a few short
/// commands). Never fails as a whole: each step's error is in the report
/// and the next step runs.
pub fn cleanup() -> Report {
    let mut report = Report::default();
    nftables_mode(&mut report);
    let mut tools = 0;
    for (save, restore, label) in IPTABLES {
        if iptables_mode(save, restore, label, &mut report).is_ok() {
            tools += 1;
        }
    }
    if tools == 0 {
        report.notes.push(
            "no iptables tools (iptables-nft-save, iptables-legacy-save) found: kube-proxy's \
             iptables and IPVS mode chains were not looked for; `kube-proxy --cleanup` or the \
             iptables package removes them"
                .into(),
        );
    }
    ipvs_mode(&mut report);
    report
}

/// A program that is not installed.
struct Missing;

/// Runs `program args` (with `stdin`); `Err(None)` when it is not installed.
fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Option<KubeProxyCleanupError>> {
    let command = || {
        format!("{program} {}", args.join(" "))
            .trim_end()
            .to_string()
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(None),
        Err(source) => {
            return Err(Some(KubeProxyCleanupError::Exec {
                command: command(),
                source,
            }));
        }
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| {
            Some(KubeProxyCleanupError::Exec {
                command: command(),
                source,
            })
        })?;
    }
    let out = child.wait_with_output().map_err(|source| {
        Some(KubeProxyCleanupError::Exec {
            command: command(),
            source,
        })
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(Some(KubeProxyCleanupError::Command {
            command: command(),
            stderr: if stderr.is_empty() {
                format!("exited with {}", out.status)
            } else {
                stderr
            },
        }))
    }
}

/// nftables mode: `ip kube-proxy` and `ip6 kube-proxy` go, in one
/// transaction.
fn nftables_mode(report: &mut Report) {
    let listed = match run("nft", &["list", "tables"], None) {
        Ok(l) => l,
        Err(Some(e)) => return report.errors.push(e),
        Err(None) => {
            return report
                .notes
                .push("nft not found: kube-proxy's nftables tables were not looked for".into());
        }
    };
    let tables = kube_proxy_tables(&listed);
    if tables.is_empty() {
        return;
    }
    let script: String = tables
        .iter()
        .map(|t| format!("delete table {t}\n"))
        .collect();
    match run("nft", &["-f", "-"], Some(&script)) {
        Ok(_) => report
            .removed
            .extend(tables.iter().map(|t| format!("nftables table {t}"))),
        Err(Some(e)) => report.errors.push(e),
        Err(None) => {}
    }
}

/// The `ip kube-proxy` / `ip6 kube-proxy` tables in `nft list tables`
/// output, as `family name`.
fn kube_proxy_tables(listed: &str) -> Vec<String> {
    listed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .filter(|t| matches!(*t, "ip kube-proxy" | "ip6 kube-proxy"))
        .map(str::to_string)
        .collect()
}

/// iptables (and IPVS) mode, with one of the iptables tools: reads every
/// table with `save`, removes kube-proxy's chains and the jumps to them in
/// one `restore --noflush`.
fn iptables_mode(
    save: &str,
    restore: &str,
    label: &str,
    report: &mut Report,
) -> Result<(), Missing> {
    let saved = match run(save, &[], None) {
        Ok(s) => s,
        Err(None) => return Err(Missing),
        Err(Some(e)) => {
            report.errors.push(e);
            return Ok(());
        }
    };
    let Some(plan) = removal_plan(&saved) else {
        return Ok(());
    };
    match run(restore, &["--noflush"], Some(&plan.script)) {
        Ok(_) => report
            .removed
            .extend(plan.summary.into_iter().map(|s| format!("{label} {s}"))),
        // The save tool is there but not its restore companion.
        Err(None) => report.notes.push(format!(
            "{label}: kube-proxy's chains found but `{restore}` is not installed"
        )),
        Err(Some(e)) => report.errors.push(e),
    }
    Ok(())
}

/// Whether `chain` of iptables table `table` is kube-proxy's own (any of
/// its modes), as its `--cleanup` sees it. Chains it shares with the
/// kubelet are not.
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    const NAT: [&str; 7] = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-PROXY-CANARY",
        // IPVS mode.
        "KUBE-LOAD-BALANCER",
        "KUBE-NODE-PORT",
        "KUBE-LOOP-BACK",
    ];
    const NAT_PREFIXES: [&str; 6] = [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
        "KUBE-XLB-",
    ];
    const FILTER: [&str; 10] = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
        // IPVS mode.
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
        "KUBE-NODE-PORT",
    ];
    match table {
        // KUBE-FIREWALL of `nat` is IPVS mode's (the LB source ranges);
        // the kubelet's is in `filter`.
        "nat" => {
            NAT.contains(&chain)
                || chain == "KUBE-FIREWALL"
                || NAT_PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        "filter" => FILTER.contains(&chain),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// What to feed `iptables-restore --noflush`, and what it removes in words.
#[derive(Debug, PartialEq, Eq)]
struct RemovalPlan {
    script: String,
    summary: Vec<String>,
}

/// From `iptables-save` output: per table, kube-proxy's chains flushed
/// (`:CHAIN - [0:0]` flushes an existing chain under `--noflush`), every
/// other chain's rule that jumps to one deleted (`-D` with the rule as
/// saved), then the chains deleted. `None` when there is nothing of
/// kube-proxy's.
fn removal_plan(saved: &str) -> Option<RemovalPlan> {
    struct Table<'a> {
        name: &'a str,
        chains: Vec<&'a str>,
        jumps: Vec<&'a str>,
    }
    let mut tables: Vec<Table> = Vec::new();
    for line in saved.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name,
                chains: Vec::new(),
                jumps: Vec::new(),
            });
            continue;
        }
        let Some(t) = tables.last_mut() else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(t.name, chain) {
                t.chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let Some(chain) = words.next() else { continue };
            let target = rule
                .split_whitespace()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1);
            if !is_kube_proxy_chain(t.name, chain)
                && target.is_some_and(|target| is_kube_proxy_chain(t.name, target))
            {
                t.jumps.push(rule);
            }
        }
    }
    let mut script = String::new();
    let mut summary = Vec::new();
    for t in tables
        .iter()
        .filter(|t| !t.chains.is_empty() || !t.jumps.is_empty())
    {
        script.push_str(&format!("*{}\n", t.name));
        for c in &t.chains {
            script.push_str(&format!(":{c} - [0:0]\n"));
        }
        for j in &t.jumps {
            script.push_str(&format!("-D {j}\n"));
        }
        for c in &t.chains {
            script.push_str(&format!("-X {c}\n"));
        }
        script.push_str("COMMIT\n");
        summary.push(format!(
            "table {}: {} chains ({}) and {} jumps into them",
            t.name,
            t.chains.len(),
            shorten(&t.chains),
            t.jumps.len()
        ));
    }
    (!script.is_empty()).then_some(RemovalPlan { script, summary })
}

/// The first few names, and how many more.
fn shorten(names: &[&str]) -> String {
    const SHOWN: usize = 4;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … {} more", names.len() - SHOWN));
    }
    s
}

/// IPVS mode: the `kube-ipvs0` dummy interface, the virtual services on its
/// addresses, the `KUBE-*` ipsets.
fn ipvs_mode(report: &mut Report) {
    let addresses = match run("ip", &["-j", "addr", "show", "dev", IPVS_INTERFACE], None) {
        Ok(json) => interface_addresses(&json),
        // No such device (or no `ip`): not IPVS mode.
        Err(_) => return,
    };
    match run("ip", &["link", "del", IPVS_INTERFACE], None) {
        Ok(_) => report.removed.push(format!(
            "interface {IPVS_INTERFACE} ({} Service addresses)",
            addresses.len()
        )),
        Err(Some(e)) => report.errors.push(e),
        Err(None) => {}
    }
    match run("ipvsadm", &["-S", "-n"], None) {
        Ok(saved) => {
            let services = ipvs_services_on(&saved, &addresses);
            let mut removed = 0;
            for (proto, service) in &services {
                match run("ipvsadm", &["-D", proto, service], None) {
                    Ok(_) => removed += 1,
                    Err(Some(e)) => report.errors.push(e),
                    Err(None) => {}
                }
            }
            if removed > 0 {
                report
                    .removed
                    .push(format!("{removed} IPVS virtual services on its addresses"));
            }
            report.notes.push(
                "IPVS virtual services of node ports (on the node's own addresses) are left: \
                 `ipvsadm -C` removes them, with every other IPVS service of the node"
                    .into(),
            );
        }
        Err(None) => report.notes.push(format!(
            "ipvsadm is not installed: kube-proxy's IPVS virtual services are left (inert now \
             that {IPVS_INTERFACE} is gone); `ipvsadm -C` removes them"
        )),
        Err(Some(e)) => report.errors.push(e),
    }
    match run("ipset", &["list", "-n"], None) {
        Ok(listed) => {
            let sets: Vec<&str> = listed
                .lines()
                .map(str::trim)
                .filter(|s| s.starts_with("KUBE-"))
                .collect();
            let mut destroyed = Vec::new();
            for set in sets {
                match run("ipset", &["destroy", set], None) {
                    Ok(_) => destroyed.push(set),
                    Err(Some(e)) => report.errors.push(e),
                    Err(None) => {}
                }
            }
            if !destroyed.is_empty() {
                report.removed.push(format!(
                    "{} ipsets ({})",
                    destroyed.len(),
                    shorten(&destroyed)
                ));
            }
        }
        Err(None) => report.notes.push(
            "ipset is not installed: kube-proxy's KUBE-* ipsets are left (`ipset destroy` \
             each; unused once its iptables chains are gone)"
                .into(),
        ),
        Err(Some(e)) => report.errors.push(e),
    }
}

/// The addresses (without prefix length) in `ip -j addr show dev X` output.
fn interface_addresses(json: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

/// The virtual services of `ipvsadm -S -n` output whose address is one of
/// `addresses`, as (`-t`/`-u`/`-f`... option, `address:port`).
fn ipvs_services_on(saved: &str, addresses: &[String]) -> Vec<(String, String)> {
    saved
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "-A").then_some(())?;
            let (proto, service) = (w.next()?, w.next()?);
            let (addr, _port) = service.rsplit_once(':')?;
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            addresses
                .iter()
                .any(|a| a == addr)
                .then(|| (proto.to_string(), service.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iptables-save` of a node with kube-proxy in iptables mode, the
    /// kubelet's chains and Docker's.
    const SAVED: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Dec  6 08:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -o docker0 -j DOCKER
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-2DEPOAXAEIOKJ2CU - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SEP-2DEPOAXAEIOKJ2CU -p tcp -m tcp -j DNAT --to-destination 10.200.1.10:8080
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-2DEPOAXAEIOKJ2CU
COMMIT
"#;

    #[test]
    fn kube_proxys_chains_and_the_jumps_into_them_go_and_the_kubelets_stay() {
        let plan = removal_plan(SAVED).expect("kube-proxy's chains are found");
        let expected = r#"*mangle
:KUBE-PROXY-CANARY - [0:0]
-X KUBE-PROXY-CANARY
COMMIT
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-D INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-X KUBE-EXTERNAL-SERVICES
-X KUBE-FORWARD
-X KUBE-NODEPORTS
-X KUBE-PROXY-FIREWALL
-X KUBE-SERVICES
COMMIT
*nat
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-2DEPOAXAEIOKJ2CU - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-X KUBE-POSTROUTING
-X KUBE-SEP-2DEPOAXAEIOKJ2CU
-X KUBE-SERVICES
-X KUBE-SVC-NPX46M4PTMTKRN6Y
COMMIT
"#;
        assert_eq!(plan.script, expected);
        assert_eq!(plan.summary.len(), 3, "{:?}", plan.summary);
        assert!(
            plan.summary[2].starts_with("table nat: 4 chains"),
            "{:?}",
            plan.summary
        );
    }

    #[test]
    fn a_node_without_kube_proxys_chains_gets_no_change() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
                     -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\nCOMMIT\n\
                     *filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(removal_plan(saved), None);
        assert_eq!(removal_plan(""), None);
    }

    #[test]
    fn ipvs_and_filter_names_are_told_apart_by_table() {
        assert!(is_kube_proxy_chain("nat", "KUBE-FIREWALL"));
        assert!(!is_kube_proxy_chain("filter", "KUBE-FIREWALL"));
        assert!(is_kube_proxy_chain("nat", "KUBE-EXT-ABCDEF"));
        assert!(!is_kube_proxy_chain("nat", "KUBE-MARK-MASQ"));
        assert!(!is_kube_proxy_chain("raw", "KUBE-SERVICES"));
    }

    #[test]
    fn only_kube_proxys_tables_are_named() {
        let listed = "table ip kube-uproxy\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable inet kube-proxy\ntable ip nat\n";
        assert_eq!(
            kube_proxy_tables(listed),
            ["ip kube-proxy", "ip6 kube-proxy"]
        );
    }

    #[test]
    fn the_ipvs_services_on_kube_ipvs0s_addresses_are_found() {
        let saved = "-A -t 10.96.0.1:443 -s rr\n-a -t 10.96.0.1:443 -r 10.0.0.5:6443 -m -w 1\n\
                     -A -u 10.96.0.10:53 -s rr\n-A -t 192.168.1.5:30080 -s rr\n\
                     -A -t [fd00::1]:443 -s rr\n";
        let on = ipvs_services_on(
            saved,
            &["10.96.0.1".into(), "10.96.0.10".into(), "fd00::1".into()],
        );
        assert_eq!(
            on,
            [
                ("-t".to_string(), "10.96.0.1:443".to_string()),
                ("-u".to_string(), "10.96.0.10:53".to_string()),
                ("-t".to_string(), "[fd00::1]:443".to_string()),
            ]
        );
        let json = r#"[{"ifname":"kube-ipvs0","addr_info":[{"family":"inet","local":"10.96.0.1","prefixlen":32}]}]"#;
        assert_eq!(interface_addresses(json), ["10.96.0.1"]);
    }
}
