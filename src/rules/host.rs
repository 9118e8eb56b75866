//! What the interception needs on the node besides the table: the proxy
//! address, and the sysctl that lets a handover lose no connection. Both
//! are installed at start and removed by `--cleanup` only (a restart keeps
//! them, like the rules).
//!
//! - **The proxy address.** Service traffic is DNATed to it and every
//!   listener binds it. When it is not an address of the node already, it
//!   is added to `lo` as a /32 with the label [`ADDRESS_LABEL`], which is
//!   how `--cleanup` later recognises it as ours.
//! - **The IPv6 proxy address**, the same for IPv6 Services, when the node
//!   has IPv6 ([`ipv6_disabled`]): added to `lo` as a /128 with the flags
//!   `nodad noprefixroute`. IPv6 addresses carry no label, so `--cleanup`
//!   recognises ours by address (`--proxy-address-ipv6`) and those flags
//!   together, a combination nobody configures on `lo` by hand.
//! - **`net.ipv4.tcp_migrate_req=1`** (Linux 5.14+): when the old instance
//!   closes a listener, connections queued on it move to the new instance's
//!   listener in the same `SO_REUSEPORT` group instead of being reset. The
//!   value found before is kept in the table's `instance` comment (the
//!   note), so the last `--cleanup` restores it.
//! - **The policy route of preserve-client-ip**: `ip rule add fwmark
//!   M/(U|M) lookup T pref 100` and `ip route replace local default dev lo
//!   table T` (both families; `--preserve-client-ip-mark` M,
//!   `--upstream-mark` U, `--preserve-client-ip-table` T). A connection the proxy opens from a
//!   client's own address gets replies addressed to that client; the
//!   table's mark rules give them M, and this route delivers them locally,
//!   to the proxy's socket, instead of forwarding them to the client (the
//!   pattern of Envoy's original-src filter and HAProxy's `usesrc
//!   clientip`). The mask takes U in because the proxy's transparent
//!   sockets carry U|M themselves: their own packets must still be routed
//!   to the endpoint. Only replies to those sockets carry M without U:
//!   nothing else on the node is routed differently.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use tracing::{info, warn};

use super::render::Layout;
use crate::model::IpFamily;

/// The label of the address we add to `lo` (at most 15 characters, and it
/// must start with the interface name).
pub const ADDRESS_LABEL: &str = "lo:kube-uproxy";
const MIGRATE_SYSCTL: &str = "net.ipv4.tcp_migrate_req";
/// Under `--proc-sys-dir` (`/proc/sys`; in a container, where `/proc/sys`
/// is read-only, a writable mount of the host's `/proc/sys/net/ipv4`).
const MIGRATE_PATH: &str = "net/ipv4/tcp_migrate_req";

/// The Linux capabilities the proxy uses, with what for: the DaemonSet in
/// deploy/ grants exactly these (a test compares them). Name, bit number
/// (linux/capability.h), why.
///
/// Nothing else is needed: listeners and the health and metrics servers
/// use ports above 1024; the open-file limit is raised to its hard limit
/// only (raising the hard limit would need `SYS_RESOURCE`); the sysctl is
/// written by uid 0 through a writable mount, not by remounting `/proc`.
pub const REQUIRED_CAPABILITIES: &[(&str, u32, &str)] = &[(
    "NET_ADMIN",
    12,
    "nft (the table), `ip addr add` (the proxy address on lo), `ip rule` and `ip route` (the \
     policy route of preserve-client-ip), writing net.ipv4.tcp_migrate_req, SO_MARK on the \
     connections to endpoints (--upstream-mark), IP_TRANSPARENT on those opened from a \
     client's address",
)];

/// The capabilities of [`REQUIRED_CAPABILITIES`] this process lacks
/// (read from the effective set in /proc/self/status); empty when that
/// cannot be read.
pub fn missing_capabilities() -> Vec<&'static str> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    else {
        return Vec::new();
    };
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(_, bit, _)| eff & (1u64 << bit) == 0)
        .map(|(name, ..)| *name)
        .collect()
}

/// Setting up or removing the node-side pieces failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    Exec(io::Error),
    #[error("cannot use {address} as the proxy address: {source}")]
    Address {
        address: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read what `ip -j addr show dev lo` printed: {0}")]
    Parse(String),
}

fn ip(args: &[&str]) -> Result<String, HostError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(HostError::Exec)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether `address` is an address of this node, as the kernel's address
/// list (`getifaddrs`, netlink underneath) says.
///
/// Not decided by `bind()`: with `net.ipv4.ip_nonlocal_bind=1` or
/// `net.ipv6.ip_nonlocal_bind=1` (keepalived, kube-vip and HAProxy nodes)
/// a bind to any address succeeds, so the proxy address would never be
/// added and every Service would time out while `/healthz` said 200.
fn is_local(address: IpAddr) -> Result<bool, HostError> {
    let listed = node_addresses().map_err(|source| HostError::Address { address, source })?;
    Ok(listed.contains(&address))
}

/// Where the health check node ports listen, by kube-proxy's rule: with
/// `--nodeport-addresses` (`layout`'s, the Node's primary IPs for
/// `primary` once the Node is known), the node's addresses within it, per
/// family (a family without a CIDR of its own: all its addresses); without
/// it, `None`: every address.
pub fn health_check_addresses(layout: &Layout) -> Result<Option<Vec<IpAddr>>, io::Error> {
    if layout.nodeport_addresses.is_none() {
        return Ok(None);
    }
    let within = node_addresses()?
        .into_iter()
        .filter(|a| {
            layout
                .nodeport_addresses_of(IpFamily::of(*a))
                .is_none_or(|nets| nets.iter().any(|n| n.contains(a)))
        })
        .collect();
    Ok(Some(within))
}

/// Every address of this node's interfaces, both families, as the kernel
/// lists them (`getifaddrs`).
pub fn node_addresses() -> Result<Vec<IpAddr>, io::Error> {
    Ok(nix::ifaddrs::getifaddrs()
        .map_err(io::Error::from)?
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

use super::alive::noted;

/// The value a note records for the sysctl, if any.
fn noted_migrate_value(note: &str) -> Option<String> {
    noted(note, MIGRATE_SYSCTL)
}

/// Why this node cannot serve IPv6 Services, if it cannot: the kernel has
/// no IPv6 (`/proc/sys/net/ipv6` absent: booted with `ipv6.disable=1`), or
/// it is switched off (`disable_ipv6=1` for all interfaces or for `lo`,
/// where the proxy address goes). Read from the process's own network
/// namespace (`/proc/sys/net`, readable in a container of the host
/// network), not from `--proc-sys-dir`, which may hold only `net/ipv4`.
pub fn ipv6_disabled() -> Option<String> {
    let dir = Path::new("/proc/sys/net/ipv6");
    if !dir.exists() {
        return Some("the kernel has no IPv6 (/proc/sys/net/ipv6 is absent)".into());
    }
    for iface in ["all", "lo"] {
        let path = dir.join("conf").join(iface).join("disable_ipv6");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            return Some(format!("{} is 1", path.display()));
        }
    }
    None
}

/// Makes `address` (and `address_v6`, when IPv6 is served) usable and
/// turns connection migration on. `earlier_note` is the note of the table
/// an earlier instance left: its record of the sysctl's original value is
/// carried forward. Returns the note to keep. `proc_sys`:
/// `--proc-sys-dir`, where the sysctl files are.
pub fn prepare(
    address: Ipv4Addr,
    address_v6: Option<Ipv6Addr>,
    earlier_note: Option<&str>,
    proc_sys: &Path,
) -> Result<String, HostError> {
    let migrate_path = proc_sys.join(MIGRATE_PATH);
    if let Some(v6) = address_v6
        && !is_local(IpAddr::V6(v6))?
    {
        // nodad: usable at once (no duplicate address detection on lo
        // anyway); noprefixroute: the local route is all it needs. Both
        // also mark it as ours for --cleanup.
        let cidr = format!("{v6}/128");
        ip(&[
            "-6",
            "addr",
            "add",
            &cidr,
            "dev",
            "lo",
            "nodad",
            "noprefixroute",
        ])?;
        info!(address = %v6, "IPv6 proxy address added to lo");
    }
    if !is_local(IpAddr::V4(address))? {
        ip(&[
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
            "label",
            ADDRESS_LABEL,
        ])?;
        info!(%address, "proxy address added to lo");
    }
    let original = match earlier_note.and_then(noted_migrate_value) {
        Some(v) => v.to_string(),
        None => match std::fs::read_to_string(&migrate_path) {
            Ok(v) => v.trim().to_string(),
            Err(_) => "absent".to_string(),
        },
    };
    let note = format!("{MIGRATE_SYSCTL}={original}");
    if original != "absent" {
        if let Err(e) = std::fs::write(&migrate_path, "1") {
            warn!(error = %e, path = %migrate_path.display(), "cannot set {MIGRATE_SYSCTL}=1; a handover may reset queued connections");
        }
    } else {
        warn!(
            "{MIGRATE_SYSCTL} does not exist (Linux before 5.14); a handover may reset queued connections"
        );
    }
    Ok(note)
}

/// The addresses of the interfaces that hold the default routes
/// (`--nodeport-addresses primary`): the IPv4 ones of the IPv4 default
/// route's interface, and the global IPv6 ones of the IPv6 default route's
/// (none when there is no IPv6 default route).
pub fn primary_addresses() -> Result<Vec<IpAddr>, HostError> {
    let mut out = primary_addresses_of("-4")?;
    if ipv6_disabled().is_none() {
        out.extend(primary_addresses_of("-6")?);
    }
    Ok(out)
}

fn primary_addresses_of(family: &str) -> Result<Vec<IpAddr>, HostError> {
    let routes: serde_json::Value =
        serde_json::from_str(&ip(&["-j", family, "route", "show", "default"])?)
            .map_err(|e| HostError::Parse(e.to_string()))?;
    let Some(dev) = routes
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r["dev"].as_str())
        .map(str::to_string)
    else {
        return Ok(Vec::new());
    };
    let addrs: serde_json::Value =
        serde_json::from_str(&ip(&["-j", family, "addr", "show", "dev", &dev])?)
            .map_err(|e| HostError::Parse(e.to_string()))?;
    Ok(addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
        // A link-local IPv6 address needs a zone: not a node-port address.
        .filter(|a| a["scope"] != "link")
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

/// Removes the addresses we added to `lo` (the labelled IPv4 ones, and
/// `address_v6` if it is there as we add it) and restores the sysctl from
/// `note` (the table's note, if the table was still there).
pub fn cleanup(note: Option<&str>, address_v6: Ipv6Addr, proc_sys: &Path) -> Result<(), HostError> {
    let listing = ip(&["-j", "addr", "show", "dev", "lo"])?;
    let mut ours = labelled_addresses(&listing)?;
    ours.extend(our_ipv6_address(&listing, address_v6)?);
    for cidr in ours {
        ip(&["addr", "del", &cidr, "dev", "lo"])?;
        info!(address = %cidr, "proxy address removed from lo");
    }
    if let Some(v) = note.and_then(noted_migrate_value)
        && v != "absent"
    {
        match std::fs::write(proc_sys.join(MIGRATE_PATH), &v) {
            Ok(()) => info!("{MIGRATE_SYSCTL} restored to {v}"),
            Err(e) => warn!(error = %e, "cannot restore {MIGRATE_SYSCTL}={v}"),
        }
    }
    Ok(())
}

/// The priority of the preserve-client-ip rule: early, so that a CNI's
/// rules that route a pod's address through a table of its own (AWS VPC
/// CNI: `to <pod IP> lookup main` at 512) do not send the endpoint's reply
/// to a client pod of this node before it reaches the proxy.
pub const PRESERVE_RULE_PRIORITY: u32 = 100;

/// The family switch of `ip` and the default route of each family.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

/// Installs the policy route of preserve-client-ip (see the module doc):
/// for IPv4, and for IPv6 when `ipv6`. Idempotent: a rule already there
/// (a restart) is not added twice, the route is replaced.
pub fn prepare_preserve_route(
    mark: u32,
    upstream_mark: u32,
    table: u32,
    ipv6: bool,
) -> Result<(), HostError> {
    let mask = mark | upstream_mark;
    let (fwmark, table_s) = (format!("{mark:#x}/{mask:#x}"), table.to_string());
    for &(family, default) in FAMILIES.iter().take(if ipv6 { 2 } else { 1 }) {
        ip(&[
            family, "route", "replace", "local", default, "dev", "lo", "table", &table_s,
        ])?;
        if our_rules(family, mark, mask, table)? == 0 {
            let pref = PRESERVE_RULE_PRIORITY.to_string();
            ip(&[
                family, "rule", "add", "fwmark", &fwmark, "lookup", &table_s, "pref", &pref,
            ])?;
        }
    }
    info!(
        mark = format!("{mark:#x}"),
        table, "policy route of preserve-client-ip in place"
    );
    Ok(())
}

/// Removes the policy route of preserve-client-ip, both families (an
/// error of the IPv6 one is ignored when the node has no IPv6).
pub fn cleanup_preserve_route(mark: u32, upstream_mark: u32, table: u32) -> Result<(), HostError> {
    let mask = mark | upstream_mark;
    let (fwmark, table_s) = (format!("{mark:#x}/{mask:#x}"), table.to_string());
    for (family, _) in FAMILIES {
        let r = (|| {
            // Bounded: each round deletes one of ours.
            for _ in 0..16 {
                if our_rules(family, mark, mask, table)? == 0 {
                    break;
                }
                ip(&[family, "rule", "del", "fwmark", &fwmark, "lookup", &table_s])?;
            }
            match ip(&[family, "route", "flush", "table", &table_s]) {
                // A table never filled (no instance with preserve-client-ip
                // ran here): nothing to remove.
                Err(HostError::Command { stderr, .. }) if table_missing(&stderr) => Ok(()),
                r => r.map(drop),
            }
        })();
        match r {
            Ok(()) => info!(family, table, "policy route of preserve-client-ip removed"),
            Err(e) if family == "-6" && ipv6_disabled().is_some() => {
                info!(error = %e, "no IPv6 policy route removed (IPv6 is disabled)")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `ip route flush table N`'s complaint says table N does not
/// exist ("FIB table does not exist"): the kernel makes a table when
/// the first route goes in.
fn table_missing(stderr: &str) -> bool {
    stderr.contains("table does not exist")
}

/// How many rules `ip <family> rule` lists that send packets whose mark
/// is `mark` under `mask` to `table`.
fn our_rules(family: &str, mark: u32, mask: u32, table: u32) -> Result<usize, HostError> {
    let listing = ip(&["-j", family, "rule", "show"])?;
    count_our_rules(&listing, mark, mask, table)
}

fn count_our_rules(json: &str, mark: u32, mask: u32, table: u32) -> Result<usize, HostError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| HostError::Parse(e.to_string()))?;
    let hex = |s: &serde_json::Value| {
        s.as_str()
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    };
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["table"].as_str() == Some(table.to_string().as_str())
                && hex(&r["fwmark"]) == Some(mark)
                && r.get("fwmask").map_or(Some(u32::MAX), hex) == Some(mask)
        })
        .count())
}

/// `address`/128 if `ip -j addr show` output lists it with the flags the
/// proxy adds it with (`nodad`, `noprefixroute`).
fn our_ipv6_address(json: &str, address: Ipv6Addr) -> Result<Option<String>, HostError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| HostError::Parse(e.to_string()))?;
    let want = address.to_string();
    let found = v
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
        .any(|a| {
            a["family"] == "inet6"
                && a["local"].as_str() == Some(want.as_str())
                && a["prefixlen"] == 128
                && a["nodad"] == true
                && a["noprefixroute"] == true
        });
    Ok(found.then(|| format!("{address}/128")))
}

/// The `addr/prefix` of every address labelled [`ADDRESS_LABEL`] in
/// `ip -j addr show` output.
fn labelled_addresses(json: &str) -> Result<Vec<String>, HostError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| HostError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["label"] == ADDRESS_LABEL
                && let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64())
            {
                out.push(format!("{local}/{len}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_our_addresses() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[
            {"family":"inet","local":"127.0.0.1","prefixlen":8,"label":"lo"},
            {"family":"inet","local":"169.254.42.1","prefixlen":32,"label":"lo:kube-uproxy"},
            {"family":"inet6","local":"::1","prefixlen":128}]}]"#;
        assert_eq!(labelled_addresses(json).unwrap(), ["169.254.42.1/32"]);
        assert!(labelled_addresses("not json").is_err());
    }

    #[test]
    fn finds_our_ipv6_address_by_address_and_flags() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[
            {"family":"inet6","local":"fd00::5","prefixlen":128,"nodad":true},
            {"family":"inet6","local":"fd6b:7570:7278::1","prefixlen":128,"nodad":true,"noprefixroute":true},
            {"family":"inet6","local":"::1","prefixlen":128}]}]"#;
        let ours: Ipv6Addr = "fd6b:7570:7278::1".parse().unwrap();
        assert_eq!(
            our_ipv6_address(json, ours).unwrap().as_deref(),
            Some("fd6b:7570:7278::1/128")
        );
        // The same address configured by hand (no such flags) is not ours.
        let by_hand = json.replace(r#","noprefixroute":true"#, "");
        assert_eq!(our_ipv6_address(&by_hand, ours).unwrap(), None);
        assert_eq!(
            our_ipv6_address(json, "fd00::5".parse().unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn the_address_list_decides_what_is_local() {
        // Loopback is listed; a documentation address (TEST-NET-3) is not,
        // even where a bind to it would succeed (ip_nonlocal_bind=1).
        assert!(is_local(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap());
        assert!(!is_local(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77))).unwrap());
    }

    #[test]
    fn finds_only_our_policy_rules() {
        let json = r#"[{"priority":0,"src":"all","table":"local"},
            {"priority":100,"src":"all","fwmark":"0x1000","fwmask":"0x3000","table":"4242"},
            {"priority":100,"src":"all","fwmark":"0x1000","table":"4242"},
            {"priority":9,"src":"all","fwmark":"0x200","fwmask":"0xf00","table":"2004"},
            {"priority":32766,"src":"all","table":"main"}]"#;
        assert_eq!(count_our_rules(json, 0x1000, 0x3000, 4242).unwrap(), 1);
        assert_eq!(count_our_rules(json, 0x1000, 0x3000, 4243).unwrap(), 0);
        // Another mask is another rule (Cilium's 0x200/0xf00 is not 0x200/0x200).
        assert_eq!(count_our_rules(json, 0x200, 0x200, 2004).unwrap(), 0);
        assert!(count_our_rules("nope", 1, 1, 1).is_err());
    }

    #[test]
    fn notes_carry_the_original_value() {
        assert_eq!(
            noted_migrate_value("net.ipv4.tcp_migrate_req=0").as_deref(),
            Some("0")
        );
        assert_eq!(
            noted_migrate_value("other=1; net.ipv4.tcp_migrate_req=absent").as_deref(),
            Some("absent")
        );
        assert_eq!(noted_migrate_value(""), None);
    }
}
