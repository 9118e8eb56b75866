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

    /// Which node addresses NodePort traffic is caught on: comma-separated
    /// CIDRs, or `primary` (the addresses of the interface holding the
    /// default route). Unset: every address of the node, 127.0.0.1
    /// included (iptables mode's default).
    #[arg(long, value_name = "CIDRS|primary", value_parser = parse_nodeport_addresses)]
    pub nodeport_addresses: Option<NodePortAddresses>,

    /// How long a UDP flow (one client address) keeps its upstream socket
    /// without a datagram in either direction. The legacy proxier's 250 ms
    /// broke DNS over slow links (kubernetes#14939).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub udp_timeout: Duration,

    /// Most UDP flows held at once, per Service port. When full, the flows
    /// idle longest make room; a flow in use is never pushed out.
    #[arg(long, value_name = "N", default_value = "16384")]
    pub udp_max_flows: usize,

    /// Remove everything the proxy installed (the nftables table, the
    /// address on lo, the sysctl it changed) and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `--nodeport-addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's addresses within these ranges.
    Cidrs(Vec<ipnet::IpNet>),
    /// The addresses of the interface holding the default route.
    Primary,
}

fn parse_nodeport_addresses(s: &str) -> Result<NodePortAddresses, String> {
    if s.trim() == "primary" {
        return Ok(NodePortAddresses::Primary);
    }
    let mut nets = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        nets.push(
            part.parse::<ipnet::IpNet>()
                .map_err(|_| {
                    format!("{part:?} is not a CIDR (want CIDRs separated by commas, or `primary`)")
                })?
                .trunc(),
        );
    }
    if nets.is_empty() {
        return Err("give CIDRs separated by commas, or `primary`".into());
    }
    Ok(NodePortAddresses::Cidrs(nets))
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
        assert_eq!(a.udp_timeout, Duration::from_secs(30));
        assert_eq!(a.nodeport_addresses, None);
        let b = Args::try_parse_from([
            "kube-uproxy",
            "--nodeport-addresses",
            "10.0.0.1/8, 192.168.1.0/24",
        ])
        .unwrap();
        assert_eq!(
            b.nodeport_addresses,
            Some(NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap()
            ]))
        );
        let c = Args::try_parse_from(["kube-uproxy", "--nodeport-addresses", "primary"]).unwrap();
        assert_eq!(c.nodeport_addresses, Some(NodePortAddresses::Primary));
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
            vec!["kube-uproxy", "--nodeport-addresses", "10.0.0.0/33"],
            vec!["kube-uproxy", "--nodeport-addresses", ""],
            vec!["kube-uproxy", "--udp-max-flows", "-1"],
        ] {
            assert!(
                Args::try_parse_from(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
