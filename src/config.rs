//! Command-line flags, following kube-proxy's names where one exists.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::model::Algorithm;
use crate::proxy::ports::PortRange;
use crate::proxy::relay::{RelayConfig, RelayMode};
use crate::proxy::tcp_options::{Keepalive, TcpOptions};

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

    /// TCP keepalive on both sockets of every flow: how long a connection
    /// may be idle before the first probe (whole seconds). 0 turns
    /// keepalive off. With the defaults a peer that vanished without a FIN
    /// is found within 90 s of silence.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_keepalive_time)]
    pub tcp_keepalive_time: Duration,

    /// Time between two keepalive probes (whole seconds).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_keepalive_interval)]
    pub tcp_keepalive_interval: Duration,

    /// Unanswered keepalive probes after which a connection is dropped.
    #[arg(long, value_name = "N", default_value = "3", value_parser = clap::value_parser!(u32).range(1..=127))]
    pub tcp_keepalive_count: u32,

    /// TCP_USER_TIMEOUT of the connections to endpoints: data left
    /// unacknowledged this long drops the connection (a vanished endpoint
    /// is found while data is in flight, where keepalive does not probe).
    /// Default: keepalive time + interval x count; 0: the kernel's
    /// retransmission limit (about 15 minutes).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub tcp_user_timeout: Option<Duration>,

    /// A flow that moves no byte either way for this long is reset. 0 (the
    /// default) keeps idle flows for as long as both peers are alive.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// Most proxied connections open at once; new ones beyond it are
    /// refused with a reset (and one log line per 10 s while the cap
    /// holds). 0: no cap (the open-file limit is the cap then: each
    /// connection holds 2 fds, 2 more per direction in a bulk phase).
    #[arg(long, value_name = "N", default_value = "0")]
    pub max_connections: usize,

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

impl Args {
    /// Keepalive and user timeout, as the flags say.
    pub fn tcp_options(&self) -> TcpOptions {
        let keepalive = (!self.tcp_keepalive_time.is_zero()).then_some(Keepalive {
            time: self.tcp_keepalive_time,
            interval: self.tcp_keepalive_interval,
            count: self.tcp_keepalive_count,
        });
        let user_timeout = match self.tcp_user_timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => keepalive.map(|k| k.time + k.interval * k.count),
        };
        TcpOptions {
            keepalive,
            user_timeout,
        }
    }

    /// How flows are relayed.
    pub fn relay(&self) -> RelayConfig {
        RelayConfig {
            mode: self.tcp_relay,
            idle_timeout: (!self.tcp_idle_timeout.is_zero()).then_some(self.tcp_idle_timeout),
        }
    }
}

/// The kernel takes keepalive times in whole seconds, up to 32767.
fn keepalive_seconds(s: &str, zero_ok: bool) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() && zero_ok {
        return Ok(d);
    }
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > 32767 {
        return Err(format!("{s:?}: want whole seconds from 1s to 32767s"));
    }
    Ok(d)
}

fn parse_keepalive_time(s: &str) -> Result<Duration, String> {
    keepalive_seconds(s, true)
}

fn parse_keepalive_interval(s: &str) -> Result<Duration, String> {
    keepalive_seconds(s, false)
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
        // Dead peers are found by default; idle flows are kept.
        let k = a.tcp_options().keepalive.expect("keepalive on by default");
        assert_eq!(
            (k.time, k.interval, k.count),
            (Duration::from_secs(60), Duration::from_secs(10), 3)
        );
        assert_eq!(a.tcp_options().user_timeout, Some(Duration::from_secs(90)));
        assert_eq!(a.relay().idle_timeout, None);
    }

    #[test]
    fn timeouts_can_be_tuned_or_turned_off() {
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--tcp-keepalive-time",
            "0",
            "--tcp-idle-timeout",
            "5m",
        ])
        .unwrap();
        assert_eq!(a.tcp_options(), TcpOptions::default());
        assert_eq!(a.relay().idle_timeout, Some(Duration::from_secs(300)));
        let a = Args::try_parse_from([
            "kube-uproxy",
            "--tcp-keepalive-time",
            "2s",
            "--tcp-keepalive-interval",
            "1s",
            "--tcp-keepalive-count",
            "2",
        ])
        .unwrap();
        assert_eq!(a.tcp_options().user_timeout, Some(Duration::from_secs(4)));
        let a = Args::try_parse_from(["kube-uproxy", "--tcp-user-timeout", "0"]).unwrap();
        assert_eq!(a.tcp_options().user_timeout, None);
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
            vec!["kube-uproxy", "--tcp-keepalive-time", "500ms"],
            vec!["kube-uproxy", "--tcp-keepalive-interval", "0"],
            vec!["kube-uproxy", "--tcp-keepalive-count", "0"],
            vec!["kube-uproxy", "--tcp-keepalive-time", "10h"],
        ] {
            assert!(
                Args::try_parse_from(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
