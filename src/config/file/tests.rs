use std::net::Ipv4Addr;
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::config::{LogFormat, NodePortAddresses};
use crate::model::Algorithm;
use crate::proxy::ports::PortRange;
use crate::proxy::relay::RelayMode;

/// kubeadm's `config.conf` of the `kube-system/kube-proxy` ConfigMap, as
/// `kubeadm init` renders it (every field written, most of them zero).
const KUBEADM: &str = include_str!("../../../tests/fixtures/kubeadm-kube-proxy-config.conf");

/// A file setting every field of kube-uproxy's group (but the two that
/// conflict with one here: `manifests`, `bindAddress`), each to a value
/// other than its default.
const EVERY_FIELD: &str = r#"
apiVersion: kube-uproxy.io/v1alpha1
kind: KubeUproxyConfiguration
proxyAddress: 169.254.99.1
proxyAddressIPv6: fd00:99::1
healthzBindAddress: 127.0.0.1:10266
metricsBindAddress: 0.0.0.0:10259
hostnameOverride: node-a
nodeZone: zone-b
nodePortAddresses: [10.0.0.0/8, 192.168.0.0/16]
portRange: 30000-30999
syncPeriod: 1m0s
clientConnection:
  kubeconfig: /etc/kube/config
logging:
  format: json
  verbosity: 5
shutdownGrace: 5s
manifestsRescanInterval: 500ms
lbAlgorithm: least-connections
tcpRelay: copy
tcpKeepaliveTime: 20s
tcpKeepaliveInterval: 5s
tcpKeepaliveCount: 4
tcpUserTimeout: 33s
tcpIdleTimeout: 1h
maxConnections: 1000
splicePipesMax: 7
udpTimeout: 45s
udpMaxFlows: 99
udpMaxFlowsTotal: 999
metricsPerEndpoint: true
healthzSocket: /run/kube-uproxy/healthz.sock
procSysDir: /host/proc/sys
upstreamMark: "0x4000"
requestBalancing: false
httpDetectTimeout: 2s
httpUpstreamIdleTimeout: 9s
dataPathThreads: 3
httpThreads: 5
conntrackMaxPerCore: 1000
conntrackMin: 2000
conntrackTcpTimeoutEstablished: 2h
conntrackTcpTimeoutCloseWait: 30m
detectLocalMode: InterfaceNamePrefix
clusterCidr: 10.244.0.0/16
podBridgeInterface: cni0
podInterfaceNamePrefix: cali
preserveClientIp: "off"
preserveClientIpMark: "0x100"
preserveClientIpTable: 4243
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ku-config-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `kube-uproxy --config <text> extra…`.
fn with_file(tag: &str, text: &str, extra: &[&str]) -> Result<Args, ArgsError> {
    let d = tmpdir(tag);
    let p = write(&d, "c.yaml", text);
    let mut argv = vec![
        "kube-uproxy".to_string(),
        "--config".into(),
        p.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let r = parse_args(argv);
    let _ = std::fs::remove_dir_all(d);
    r
}

/// The file's settings alone, as the flags they become.
fn file_matches(text: &str) -> ArgMatches {
    let path = Path::new("c.yaml");
    let f = ConfigFile::parse(text, path).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Args::command();
    cmd.build();
    let mut argv = vec![OsString::from("kube-uproxy")];
    argv.extend(f.arguments(path, &cmd, |_| false).unwrap());
    cmd.try_get_matches_from(argv).unwrap()
}

#[test]
fn every_flag_has_a_field_and_every_field_is_a_flag() {
    let cmd = Args::command();
    let fields = own_fields(&cmd);
    let ids: Vec<&str> = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| !NOT_IN_FILE.contains(id))
        .collect();
    for id in &ids {
        assert!(
            fields.values().any(|f| f == id),
            "the flag {id} has no field"
        );
    }
    for (field, id) in &fields {
        assert!(ids.contains(&id.as_str()), "`{field}` names no flag ({id})");
    }
    // Every renamed field names an existing flag or alias; every
    // kube-proxy field that sets a flag names an existing one.
    for (long, field) in FIELD_NAMES {
        assert_eq!(
            fields.get(*field).map(String::as_str),
            cmd.get_arguments()
                .find(|a| a.get_long() == Some(long)
                    || a.get_all_aliases().unwrap_or_default().contains(long))
                .map(|a| a.get_id().as_str()),
            "{long} → {field}"
        );
    }
    for (field, u) in KUBE_PROXY_FIELDS {
        if let KubeProxyUse::Flag(id) = u {
            assert!(ids.contains(id), "kube-proxy's {field} names no flag {id}");
        }
    }
    // And every field of EVERY_FIELD reaches its flag: each flag but the
    // two left out is set by the file, not by its default.
    let m = file_matches(EVERY_FIELD);
    for id in &ids {
        if ["manifests", "bind_address"].contains(id) {
            continue;
        }
        assert_eq!(
            m.value_source(id),
            Some(ValueSource::CommandLine),
            "{id} not set by EVERY_FIELD"
        );
    }
    let m = file_matches("manifests: m.yaml\nbindAddress: 169.254.1.1\n");
    for id in ["manifests", "bind_address"] {
        assert_eq!(m.value_source(id), Some(ValueSource::CommandLine), "{id}");
    }
}

#[test]
fn every_field_of_the_file_reaches_its_setting() {
    let a = with_file("every", EVERY_FIELD, &[]).unwrap();
    assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 99, 1));
    assert_eq!(a.proxy_address_v6.to_string(), "fd00:99::1");
    assert_eq!(
        a.healthz_address(),
        Some("127.0.0.1:10266".parse().unwrap())
    );
    assert_eq!(a.metrics_address(), Some("0.0.0.0:10259".parse().unwrap()));
    assert_eq!(a.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(a.node_zone.as_deref(), Some("zone-b"));
    assert_eq!(
        a.nodeport_addresses,
        Some(NodePortAddresses::Cidrs(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap()
        ]))
    );
    assert_eq!(
        a.proxy_port_range,
        Some(PortRange {
            begin: 30000,
            end: 30999
        })
    );
    assert_eq!(a.sync_period, Duration::from_secs(60));
    assert_eq!(a.kubeconfig.as_deref(), Some(Path::new("/etc/kube/config")));
    assert_eq!(a.log_format, LogFormat::Json);
    assert_eq!(a.verbosity, 5);
    assert_eq!(a.shutdown_grace, Duration::from_secs(5));
    assert_eq!(a.manifests_rescan_interval, Duration::from_millis(500));
    assert_eq!(a.lb_algorithm, Algorithm::LeastConnections);
    assert_eq!(a.tcp_relay, RelayMode::Copy);
    let k = a.tcp_options().keepalive.unwrap();
    assert_eq!(
        (k.time, k.interval, k.count),
        (Duration::from_secs(20), Duration::from_secs(5), 4)
    );
    assert_eq!(a.tcp_user_timeout, Some(Duration::from_secs(33)));
    assert_eq!(a.tcp_idle_timeout, Duration::from_secs(3600));
    assert_eq!(a.max_connections, 1000);
    assert_eq!(a.splice_pipes_max, Some(7));
    assert_eq!(a.udp_timeout, Duration::from_secs(45));
    assert_eq!(a.udp_max_flows, 99);
    assert_eq!(a.udp_max_flows_total, Some(999));
    assert!(a.metrics_per_endpoint);
    assert_eq!(
        a.healthz_socket.as_deref(),
        Some(Path::new("/run/kube-uproxy/healthz.sock"))
    );
    assert_eq!(a.proc_sys_dir, Path::new("/host/proc/sys"));
    assert_eq!(a.upstream_mark, 0x4000);
    assert!(!a.request_balancing);
    assert_eq!(a.http_detect_timeout, Duration::from_secs(2));
    assert_eq!(a.http_upstream_idle_timeout, Duration::from_secs(9));
    assert!(a.ignored_config_fields.is_empty());
    // `manifests` conflicts with the kubeconfig above: its own file; the
    // old names of the proxy addresses are still fields.
    let a = with_file(
        "every2",
        "manifests: /srv/cluster.yaml\nbindAddress: 169.254.5.5\nbindAddressIPv6: fd00:5::5\n",
        &[],
    )
    .unwrap();
    assert_eq!(a.manifests.as_deref(), Some(Path::new("/srv/cluster.yaml")));
    assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 5, 5));
    assert_eq!(a.proxy_address_v6.to_string(), "fd00:5::5");
}

#[test]
fn flags_on_the_command_line_win_over_the_file() {
    let a = with_file(
        "flags",
        EVERY_FIELD,
        &[
            "--sync-period",
            "7s",
            "--bind-address",
            "169.254.42.7",
            "--bind-address-ipv6",
            "fd00:42::7",
            "--lb-algorithm",
            "round-robin",
            "--healthz-bind-address",
            "",
            "--metrics-per-endpoint=false",
            "--v=1",
            // Conflicts with the file's kubeconfig: the command line wins.
            "--manifests",
            "x.yaml",
        ],
    )
    .unwrap();
    assert_eq!(a.sync_period, Duration::from_secs(7));
    assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 42, 7));
    assert_eq!(a.proxy_address_v6.to_string(), "fd00:42::7");
    assert_eq!(a.lb_algorithm, Algorithm::RoundRobin);
    assert_eq!(a.healthz_address(), None);
    assert!(!a.metrics_per_endpoint);
    assert_eq!(a.verbosity, 1);
    assert_eq!(a.manifests.as_deref(), Some(Path::new("x.yaml")));
    assert_eq!(a.kubeconfig, None);
    // Not given on the command line: from the file.
    assert_eq!(a.tcp_relay, RelayMode::Copy);
    // Also over kubeadm's file, and after a subcommand.
    let a = with_file(
        "flags-kp",
        &KUBEADM
            .replace("hostnameOverride: \"\"", "hostnameOverride: from-file")
            .replace(
                "healthzBindAddress: \"\"",
                "healthzBindAddress: 0.0.0.0:10266",
            ),
        &[
            "--hostname-override",
            "from-flag",
            "probe",
            "--healthz-bind-address",
            "127.0.0.1:1",
        ],
    )
    .unwrap();
    assert_eq!(a.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(a.healthz_address(), Some("127.0.0.1:1".parse().unwrap()));
}

#[test]
fn an_unknown_field_of_kube_uproxys_group_is_an_error_naming_it() {
    let path = Path::new("c.yaml");
    let e = ConfigFile::parse("syncPeriod: 30s\nsyncPeriodd: 1m\n", path).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`syncPeriodd`"), "{msg}");
    assert!(msg.starts_with("c.yaml:"), "{msg}");
    let e = ConfigFile::parse(
        "apiVersion: kube-uproxy.io/v1alpha1\nclientConnection:\n  qps: 5\n",
        path,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`clientConnection.qps`"), "{e}");
    // kube-proxy's fields are kube-proxy's group's: not taken here.
    let e = ConfigFile::parse("mode: iptables\n", path).unwrap_err();
    assert!(e.to_string().contains("`mode`"), "{e}");
    // Flags that are not settings have no field.
    for f in ["config: x.yaml\n", "cleanup: true\n"] {
        assert!(ConfigFile::parse(f, path).is_err(), "{f}");
    }
}

#[test]
fn bad_values_name_their_field() {
    let path = Path::new("c.yaml");
    for (text, field) in [
        ("proxyAddress: 0.0.0.0\n", "proxyAddress"),
        ("bindAddress: 127.0.0.1\n", "bindAddress"),
        ("portRange: 9-1\n", "portRange"),
        ("syncPeriod: soon\n", "syncPeriod"),
        ("syncPeriod: 0s\n", "syncPeriod"),
        ("metricsBindAddress: localhost\n", "metricsBindAddress"),
        ("lbAlgorithm: random\n", "lbAlgorithm"),
        ("tcpRelay: zerocopy\n", "tcpRelay"),
        ("splicePipesMax: 0\n", "splicePipesMax"),
        ("splicePipesMax: 4097\n", "splicePipesMax"),
        ("udpMaxFlows: -1\n", "udpMaxFlows"),
        ("metricsPerEndpoint: maybe\n", "metricsPerEndpoint"),
        ("logging:\n  verbosity: loud\n", "logging.verbosity"),
        ("nodePortAddresses: [[10.0.0.0/8]]\n", "nodePortAddresses"),
        ("kind: KubeProxyConfiguration\n", "kind"),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\n",
            "apiVersion",
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  syncPeriod: soon\n",
            "iptables.syncPeriod",
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhealthzBindAddress: here\n",
            "healthzBindAddress",
        ),
    ] {
        let e = ConfigFile::parse(text, path).expect_err(text);
        assert!(e.to_string().contains(&format!("`{field}`")), "{text}: {e}");
    }
}

#[test]
fn the_file_refuses_what_the_flag_refuses_with_the_same_words() {
    // `manifestsRescanInterval: 0s` panicked the timer; `syncPeriod`
    // below a second spun a core on nft.
    let path = Path::new("c.yaml");
    for (bounds, bad, good) in crate::config::tests::DURATIONS {
        let field = field_name(bounds.flag.trim_start_matches("--"));
        for v in *bad {
            let why = bounds.parse(v).expect_err(v);
            let e = ConfigFile::parse(&format!("{field}: {v}\n"), path)
                .expect_err(&format!("{field}: {v} accepted"));
            let msg = e.to_string();
            assert!(
                msg.contains(&field) && msg.contains(&why),
                "{field}: {v}: {msg}"
            );
            let flag = Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                .expect_err(v)
                .to_string();
            assert!(flag.contains(&why), "{}: {v}: {flag}", bounds.flag);
        }
        for v in *good {
            let a = with_file("good", &format!("{field}: {v}\n"), &[])
                .unwrap_or_else(|e| panic!("{field}: {v}: {e}"));
            let want = humantime::parse_duration(v).unwrap();
            let got = match field.as_str() {
                "syncPeriod" => a.sync_period,
                "manifestsRescanInterval" => a.manifests_rescan_interval,
                "shutdownGrace" => a.shutdown_grace,
                "udpTimeout" => a.udp_timeout,
                "tcpIdleTimeout" => a.tcp_idle_timeout,
                "tcpUserTimeout" => a.tcp_user_timeout.unwrap_or_default(),
                "conntrackTcpTimeoutEstablished" => a.conntrack_tcp_timeout_established,
                "conntrackTcpTimeoutCloseWait" => a.conntrack_tcp_timeout_close_wait,
                other => panic!("no check for {other}"),
            };
            assert_eq!(got, want, "{field}: {v}");
        }
    }
}

#[test]
fn empty_values_mean_unset_as_in_kube_proxy() {
    let a = with_file(
        "empty",
        "bindAddress: \"\"\nproxyAddress:\nportRange: \"\"\nhostnameOverride: \"\"\nnodePortAddresses: []\nclientConnection:\n  kubeconfig: \"\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 42, 1));
    assert_eq!(a.proxy_port_range, None);
    assert_eq!(a.hostname_override, None);
    assert_eq!(a.nodeport_addresses, None);
    assert_eq!(a.kubeconfig, None);
    // kube-proxy's unspecified bindAddress is the default too.
    let a = with_file("empty2", "bindAddress: 0.0.0.0\n", &[]).unwrap();
    assert_eq!(a.proxy_address(), Ipv4Addr::new(169, 254, 42, 1));
    // Where the flag gives "" a meaning (off), the field does too.
    let a = with_file("empty3", "healthzBindAddress: \"\"\n", &[]).unwrap();
    assert_eq!(a.healthz_address(), None);
    let path = Path::new("c.yaml");
    assert_eq!(ConfigFile::parse("", path).unwrap(), ConfigFile::default());
    assert_eq!(
        ConfigFile::parse("---\n", path).unwrap(),
        ConfigFile::default()
    );
}

#[test]
fn a_missing_file_and_conflicting_fields_are_errors() {
    let e = parse_args(["kube-uproxy", "--config", "/nonexistent/kube-uproxy.yaml"]).unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/kube-uproxy.yaml"),
        "{e}"
    );
    let e = with_file(
        "conflict",
        "manifests: m.yaml\nclientConnection:\n  kubeconfig: /k\n",
        &[],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`clientConnection.kubeconfig`") && msg.contains("`manifests`"),
        "{msg}"
    );
    let e = with_file(
        "conflict2",
        "proxyAddress: 169.254.1.1\nbindAddress: 169.254.1.2\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("bindAddress"), "{e}");
    let e = with_file(
        "twice",
        "proxyAddressIPv6: fd00::1\nbindAddressIPv6: fd00::2\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("the same setting"), "{e}");
}

#[test]
fn kubeadms_kube_proxy_config_is_accepted_as_rendered() {
    let a = with_file("kubeadm", KUBEADM, &[]).unwrap();
    // Its zero values are kube-proxy's defaults, which are ours.
    let d = Args::parse_from(["kube-uproxy"]);
    assert_eq!(a.healthz_address(), Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(a.metrics_address(), d.metrics_address());
    assert_eq!(a.sync_period, d.sync_period);
    assert_eq!(a.proxy_address(), d.proxy_address());
    assert_eq!(a.proxy_port_range, None);
    assert_eq!(a.hostname_override, None);
    assert_eq!(a.nodeport_addresses, None);
    assert_eq!(a.verbosity, 0);
    assert_eq!(a.log_format, LogFormat::Text);
    // The API is reached as kube-proxy reaches it.
    assert_eq!(
        a.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    // Once in the log: what has a value and no effect, and why. Zeros
    // (and bindAddress 0.0.0.0) are not worth a word.
    let ignored = a.ignored_config_fields.join("; ");
    assert!(a.ignored_config_fields.is_empty(), "{ignored}");
    // clusterCIDR: kube-proxy's local-traffic detection, ClusterCIDR mode.
    assert_eq!(
        a.local_traffic(),
        Ok(Some(crate::rules::render::LocalTraffic::Sources(vec![
            "10.244.0.0/16".parse().unwrap()
        ])))
    );
}

#[test]
fn kube_proxys_fields_with_a_meaning_here_are_honoured() {
    let text = KUBEADM
        .replace(
            "  minSyncPeriod: 0s\n  syncPeriod: 0s\nnodePortAddresses: null",
            "  minSyncPeriod: 0s\n  syncPeriod: 15s\nnodePortAddresses: null",
        )
        .replace("hostnameOverride: \"\"", "hostnameOverride: Node-7")
        .replace(
            "healthzBindAddress: \"\"",
            "healthzBindAddress: 0.0.0.0:10266",
        )
        .replace(
            "metricsBindAddress: \"\"",
            "metricsBindAddress: 0.0.0.0:10249",
        )
        .replace(
            "nodePortAddresses: null",
            "nodePortAddresses:\n- 10.0.0.0/8\n- 192.168.0.0/16",
        )
        .replace("portRange: \"\"", "portRange: 20000-20999")
        .replace(
            "  verbosity: 0",
            "  verbosity: 4\n  format: json\n  vmodule: proxier=5",
        )
        .replace(
            "  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs:",
            "  minSyncPeriod: 1s\n  syncPeriod: 45s\nipvs:",
        )
        .replace("oomScoreAdj: null", "oomScoreAdj: -999")
        .replace(
            "mode: \"\"",
            "mode: iptables\nfeatureGates:\n  SomeGate: true",
        )
        + "someFutureField: 3\n";
    let a = with_file("kp-values", &text, &[]).unwrap();
    assert_eq!(a.hostname_override.as_deref(), Some("Node-7"));
    assert_eq!(a.node_name(), "node-7");
    assert_eq!(a.healthz_address(), Some("0.0.0.0:10266".parse().unwrap()));
    assert_eq!(a.metrics_address(), Some("0.0.0.0:10249".parse().unwrap()));
    assert_eq!(
        a.nodeport_addresses,
        Some(NodePortAddresses::Cidrs(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap()
        ]))
    );
    assert_eq!(
        a.proxy_port_range,
        Some(PortRange {
            begin: 20000,
            end: 20999
        })
    );
    assert_eq!(a.verbosity, 4);
    assert_eq!(a.log_format, LogFormat::Json);
    // mode iptables: iptables.syncPeriod; nftables' is named as ignored.
    assert_eq!(a.sync_period, Duration::from_secs(45));
    let ignored = a.ignored_config_fields.join("; ");
    for f in [
        "`nftables.syncPeriod` (for mode nftables; mode is iptables)",
        "`iptables.minSyncPeriod`",
        "`oomScoreAdj`",
        "`mode`",
        "`featureGates.SomeGate`",
        "`logging.vmodule`",
        "`someFutureField` (unknown to this version",
    ] {
        assert!(ignored.contains(f), "{f} not in: {ignored}");
    }
    // mode nftables: nftables.syncPeriod.
    let a = with_file(
        "kp-nft",
        &text.replace("mode: iptables", "mode: nftables"),
        &[],
    )
    .unwrap();
    assert_eq!(a.sync_period, Duration::from_secs(15));
}

#[test]
fn kube_uproxys_document_beside_kube_proxys_wins() {
    let text = format!(
        "{}\n---\napiVersion: kube-uproxy.io/v1alpha1\nkind: KubeUproxyConfiguration\nhealthzBindAddress: 127.0.0.1:10277\nudpTimeout: 2m\n",
        KUBEADM.replace(
            "healthzBindAddress: \"\"",
            "healthzBindAddress: 0.0.0.0:10266"
        )
    );
    let a = with_file("both", &text, &[]).unwrap();
    assert_eq!(
        a.healthz_address(),
        Some("127.0.0.1:10277".parse().unwrap())
    );
    assert_eq!(a.udp_timeout, Duration::from_secs(120));
    // Its manifests conflict with kube-proxy's kubeconfig: an error, not
    // a silent pick.
    assert!(
        with_file(
            "both2",
            &format!("{KUBEADM}\n---\nmanifests: /m.yaml\n"),
            &[]
        )
        .is_err()
    );
    // Two documents of one group are ambiguous.
    let e = with_file("both3", "udpTimeout: 2m\n---\nudpTimeout: 3m\n", &[]).unwrap_err();
    assert!(e.to_string().contains("two"), "{e}");
}
