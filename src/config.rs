//! Command-line flags, following kube-proxy's names where one exists.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::model::Algorithm;
use crate::proxy::ports::PortRange;
use crate::proxy::relay::RelayMode;

/// A userspace L4 proxy for Kubernetes Services: nftables redirects
/// ClusterIP traffic to local listeners, and every connection is relayed to
/// a ready endpoint over a second connection.
#[derive(Debug, Clone, Parser)]
#[command(name = "kube-uproxy", version, about, long_about = None)]
pub struct Args {
    /// Read Services and EndpointSlices from this YAML/JSON file or directory
    /// (as `kubectl get svc,endpointslices -A -o yaml` prints them) instead of
    /// the Kubernetes API. Changes are picked up while running.
    #[arg(long, value_name = "PATH", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig to reach the API with. Without it (and without
    /// --manifests): in-cluster config, then KUBECONFIG, then ~/.kube/config.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Local ports for the listeners: BEGIN-END, PORT or BEGIN+OFFSET.
    /// Without it the kernel picks free ports.
    #[arg(long, value_name = "RANGE")]
    pub proxy_port_range: Option<PortRange>,

    /// Node-local address every listener binds; Service traffic is DNATed
    /// to it. When the node does not have it, the proxy adds it to `lo` (a
    /// link-local /32 by default) and `--cleanup` removes it. A node's own
    /// address works too.
    #[arg(long, value_name = "IPv4", default_value = "169.254.42.1", value_parser = parse_bind_address)]
    pub bind_address: Ipv4Addr,

    /// How often the kernel's rules are checked against what was applied,
    /// and rewritten if they drifted (a flush, a firewall reload).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,

    /// On SIGTERM: how long open connections may take to finish before the
    /// rest are reset. The rules stay in place; a second signal ends at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Balancing for Services without the `kube-uproxy.io/lb-algorithm`
    /// annotation: round-robin or least-connections.
    #[arg(long, value_name = "ALGORITHM", default_value = "round-robin")]
    pub lb_algorithm: Algorithm,

    /// How TCP payload is moved: splice (zero-copy) or copy (user space).
    #[arg(long, value_enum, default_value = "splice")]
    pub tcp_relay: RelayMode,

    /// Changes to --manifests are seen at once through inotify; in addition
    /// every file is stat-ed this often, in case an event was missed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub manifests_rescan_interval: Duration,

    /// Remove everything the proxy installed (the nftables table, the
    /// address on lo, the sysctl it changed) and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// A unicast IPv4 address that DNAT can target from every hook: not the
/// wildcard (DNAT needs one address), not loopback (the kernel drops
/// packets from other interfaces translated to 127.0.0.0/8 unless
/// `route_localnet` is set, which kube-proxy learned is unsafe).
fn parse_bind_address(s: &str) -> Result<Ipv4Addr, String> {
    let a: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(format!(
            "{a} cannot be the proxy address: give a unicast address that is not loopback (default 169.254.42.1)"
        ));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kube_proxy_style_flags() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--manifests",
            "x.yaml",
            "--proxy-port-range",
            "20000-20100",
            "--lb-algorithm",
            "least-connections",
            "-vv",
        ])
        .unwrap();
        assert_eq!(
            a.proxy_port_range,
            Some(PortRange {
                begin: 20000,
                end: 20100
            })
        );
        assert_eq!(a.lb_algorithm, Algorithm::LeastConnections);
        assert_eq!(a.verbose, 2);
        assert_eq!(a.tcp_relay, RelayMode::Splice);
        assert_eq!(a.bind_address, Ipv4Addr::new(169, 254, 42, 1));
        assert_eq!(a.sync_period, Duration::from_secs(30));
        assert_eq!(a.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn rejects_bad_values_and_conflicts() {
        for bad in [
            vec!["kube-uproxy", "--proxy-port-range", "9-1"],
            vec!["kube-uproxy", "--lb-algorithm", "random"],
            vec!["kube-uproxy", "--manifests", "a", "--kubeconfig", "b"],
            vec!["kube-uproxy", "--bind-address", "0.0.0.0"],
            vec!["kube-uproxy", "--bind-address", "127.0.0.1"],
            vec!["kube-uproxy", "--sync-period", "soon"],
        ] {
            assert!(
                Args::try_parse_from(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
