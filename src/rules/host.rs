//! What the interception needs on the node besides the table: the proxy
//! address, and the sysctl that lets a handover lose no connection. Both
//! are installed at start and removed by `--cleanup` only (a restart keeps
//! them, like the rules).
//!
//! - **The proxy address.** Service traffic is DNATed to it and every
//!   listener binds it. When it is not an address of the node already, it
//!   is added to `lo` as a /32 with the label [`ADDRESS_LABEL`], which is
//!   how `--cleanup` later recognises it as ours.
//! - **`net.ipv4.tcp_migrate_req=1`** (Linux 5.14+): when the old instance
//!   closes a listener, connections queued on it move to the new instance's
//!   listener in the same `SO_REUSEPORT` group instead of being reset. The
//!   value found before is kept in the table's `instance` comment (the
//!   note), so the last `--cleanup` restores it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use tracing::{info, warn};

/// The label of the address we add to `lo` (at most 15 characters, and it
/// must start with the interface name).
pub const ADDRESS_LABEL: &str = "lo:kube-uproxy";
const MIGRATE_SYSCTL: &str = "net.ipv4.tcp_migrate_req";
const MIGRATE_PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Setting up or removing the node-side pieces failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    Exec(io::Error),
    #[error("cannot use {address} as the proxy address: {source}")]
    Address {
        address: Ipv4Addr,
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

/// Whether `address` is an address of this node (a bind succeeds).
fn is_local(address: Ipv4Addr) -> Result<bool, HostError> {
    match TcpListener::bind(SocketAddr::from((address, 0))) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Ok(false),
        Err(source) => Err(HostError::Address { address, source }),
    }
}

/// The value a note records for the sysctl, if any.
fn noted_migrate_value(note: &str) -> Option<&str> {
    note.split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == MIGRATE_SYSCTL)
        .map(|(_, v)| v)
}

/// Makes `address` usable and turns connection migration on. `earlier_note`
/// is the note of the table an earlier instance left: its record of the
/// sysctl's original value is carried forward. Returns the note to keep.
pub fn prepare(address: Ipv4Addr, earlier_note: Option<&str>) -> Result<String, HostError> {
    if !is_local(address)? {
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
        None => match std::fs::read_to_string(MIGRATE_PATH) {
            Ok(v) => v.trim().to_string(),
            Err(_) => "absent".to_string(),
        },
    };
    if original != "absent" {
        if let Err(e) = std::fs::write(MIGRATE_PATH, "1") {
            warn!(error = %e, "cannot set {MIGRATE_SYSCTL}=1; a handover may reset queued connections");
        }
    } else {
        warn!(
            "{MIGRATE_SYSCTL} does not exist (Linux before 5.14); a handover may reset queued connections"
        );
    }
    Ok(format!("{MIGRATE_SYSCTL}={original}"))
}

/// The IPv4 addresses of the interface that holds the default route
/// (`--nodeport-addresses primary`).
pub fn primary_addresses() -> Result<Vec<Ipv4Addr>, HostError> {
    let routes: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "-4", "route", "show", "default"])?)
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
        serde_json::from_str(&ip(&["-j", "-4", "addr", "show", "dev", &dev])?)
            .map_err(|e| HostError::Parse(e.to_string()))?;
    Ok(addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

/// Removes the addresses we added to `lo` and restores the sysctl from
/// `note` (the table's note, if the table was still there).
pub fn cleanup(note: Option<&str>) -> Result<(), HostError> {
    let listing = ip(&["-j", "addr", "show", "dev", "lo"])?;
    for cidr in labelled_addresses(&listing)? {
        ip(&["addr", "del", &cidr, "dev", "lo"])?;
        info!(address = %cidr, "proxy address removed from lo");
    }
    if let Some(v) = note.and_then(noted_migrate_value)
        && v != "absent"
    {
        match std::fs::write(MIGRATE_PATH, v) {
            Ok(()) => info!("{MIGRATE_SYSCTL} restored to {v}"),
            Err(e) => warn!(error = %e, "cannot restore {MIGRATE_SYSCTL}={v}"),
        }
    }
    Ok(())
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
    fn notes_carry_the_original_value() {
        assert_eq!(noted_migrate_value("net.ipv4.tcp_migrate_req=0"), Some("0"));
        assert_eq!(
            noted_migrate_value("other=1; net.ipv4.tcp_migrate_req=absent"),
            Some("absent")
        );
        assert_eq!(noted_migrate_value(""), None);
    }
}
