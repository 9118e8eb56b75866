//! End-to-end test of issue 19, item 1: no input from the API can fail
//! the node's transaction.
//!
//! Services that are valid in the API but hostile to a naive rule writer
//! (overlapping `loadBalancerSourceRanges`, the same externalIP on two
//! Services, an externalIP equal to another Service's ClusterIP,
//! `0.0.0.0/0`, IPv6 ranges on an IPv4-only Service, overlapping
//! `--nodeport-addresses`) are present from the proxy's first sync, beside
//! a Service whose rules the kernel refuses outright (an `nft` wrapper
//! refuses any batch naming its ClusterIP). A fresh node must still
//! program every other Service, say 200 on `/healthz`, and name each
//! refused Service port in the log and in
//! `kubeuproxy_sync_proxy_rules_refused_service_ports`.
//!
//! The release binary runs in the node namespace of a [`Testbed`]; every
//! client runs in the lab's namespaces, never in the root one. Needs root
//! and `nft`; without them it prints `SKIP ...` (or fails, if `CI` is set).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B, VIP_C, VIP_D,
    backend_name, http_get, manifests, poll, vip, who,
};
use uproxy_lab::manifests::{EndpointManifest, IpMode, PortManifest, ServiceManifest, ServiceType};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, backend_addr};

const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
const HEALTHZ: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);
/// The ClusterIP whose rules the wrapped `nft` refuses.
const REFUSED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 66);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 8, 8);
const LB_OPEN_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 8, 9);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 9);
const NODE_PORT: u16 = 30080;

fn tcp_svc(name: &str, ip: Ipv4Addr) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))])
}

fn lb_svc(name: &str, ip: Ipv4Addr, node_port: u16, ingress: Ipv4Addr) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_type(ServiceType::LoadBalancer)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(node_port))
        .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))])
        .with_lb_ingress(ingress, Some(IpMode::Vip))
}

/// A directory holding an `nft` that refuses every batch read from stdin
/// that names `ip`, and otherwise runs the real one (checks included).
fn nft_refusing(dir: &Path, ip: Ipv4Addr) -> PathBuf {
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nft not found");
    let bin = dir.join("refusing-bin");
    fs::create_dir_all(&bin).expect("refusing-bin");
    let script = format!(
        r#"#!/bin/sh
case " $* " in
*" -f - "*)
  input=$(cat)
  case "$input" in
  *'"{ip}"'*) echo 'Error: Could not process rule: simulated refusal of {ip}' >&2; exit 1;;
  esac
  printf '%s' "$input" | {real} "$@"
  exit $?;;
esac
exec {real} "$@"
"#
    );
    let nft = bin.join("nft");
    fs::write(&nft, script).expect("writing the wrapped nft");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&nft, fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

#[test]
fn one_bad_object_leaves_every_other_service_on_a_fresh_node_working() {
    if !lab::require_root_and_nft(
        "one_bad_object_leaves_every_other_service_on_a_fresh_node_working",
    ) {
        return;
    }
    let bed = Testbed::new("bad", "bad-objects", &[Backend::Whoami]);
    let services = [
        // The normal Service: ClusterIP and node port.
        ServiceManifest::new("web", VIP_A)
            .with_type(ServiceType::NodePort)
            .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(NODE_PORT))
            .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))]),
        // Overlapping source ranges (the client, 10.200.0.2, is inside).
        lb_svc("overlap", VIP_B, 30090, LB_IP).with_source_ranges(["10.0.0.0/8", "10.77.0.0/16"]),
        // Another Service on the same LB destination with a range inside.
        lb_svc("overlap-too", VIP_C, 30091, LB_IP).with_source_ranges(["10.200.0.0/24"]),
        // Everyone, and an IPv6 range on an IPv4-only Service.
        lb_svc("open", VIP_D, 30092, LB_OPEN_IP).with_source_ranges([
            "0.0.0.0/0",
            "fd00::/8",
            "0.0.0.0/1",
        ]),
        // The same externalIP on two Services.
        tcp_svc("dup-1", Ipv4Addr::new(10, 96, 0, 20)).with_external_ips([EXTERNAL_IP]),
        tcp_svc("dup-2", Ipv4Addr::new(10, 96, 0, 21)).with_external_ips([EXTERNAL_IP]),
        // An externalIP equal to another Service's ClusterIP.
        tcp_svc("shadow", Ipv4Addr::new(10, 96, 0, 22)).with_external_ips([VIP_A]),
        // One whose rules the kernel refuses outright.
        tcp_svc("kernel-refuses", REFUSED_IP),
    ];
    let path = bed.manifests_file();
    fs::write(&path, manifests(&services)).expect("manifests");
    let search = format!(
        "{}:{}",
        nft_refusing(&bed.dir, REFUSED_IP).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut p = bed.run_proxy(
        "kube-uproxy",
        &path,
        // Overlapping --nodeport-addresses (the node's 10.200.0.1 and
        // 10.200.1.1 are in them).
        // A short sync period: the drift check reads the table back
        // (aggregated ranges included) within the test.
        &[
            "--nodeport-addresses",
            "10.200.0.0/16,10.200.0.0/24,10.200.1.1/32",
            "--sync-period",
            "1s",
        ],
        &[("PATH", &search)],
    );

    // /healthz says 200: the node writes rules.
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        p.assert_running("waiting for /healthz");
        match http_get(bed.node(), HEALTHZ, "/healthz") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("/healthz never said 200: {e}"));

    // The normal Service answers through its ClusterIP and its node port,
    // the overlapping-ranges one through its LB IP, and so do the others.
    let client = bed.client();
    for (to, what) in [
        (vip(VIP_A), "web's ClusterIP"),
        (
            SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT)),
            "web's node port",
        ),
        (vip(LB_IP), "overlap's LB IP (client inside its ranges)"),
        (vip(LB_OPEN_IP), "open's LB IP (0.0.0.0/0)"),
        (vip(EXTERNAL_IP), "the externalIP of dup-1 and dup-2"),
        (vip(Ipv4Addr::new(10, 96, 0, 22)), "shadow's ClusterIP"),
    ] {
        poll(READY_TIMEOUT, Duration::from_millis(100), || {
            p.assert_running(what);
            who(client, to).map_err(|e| e.to_string()).and_then(|n| {
                (n == backend_name(0))
                    .then_some(())
                    .ok_or_else(|| format!("answered by {n}"))
            })
        })
        .unwrap_or_else(|e| panic!("{what} ({to}) does not answer: {e}"));
    }

    // What was written is what the kernel holds: two drift checks find
    // nothing to repair.
    std::thread::sleep(Duration::from_millis(2500));
    p.assert_running("the drift checks");

    // The refused Service port is named in the log and in the metric, and
    // it is the only one.
    let log = p.stderr();
    assert!(
        !log.contains("differs from what was applied"),
        "the table drifted from what was applied:\n{log}"
    );
    let named = |line: &&str| line.contains("nft refuses this Service port's rules");
    let lines: Vec<&str> = log.lines().filter(named).collect();
    assert_eq!(lines.len(), 1, "refusals logged: {lines:#?}");
    assert!(lines[0].contains("kernel-refuses"), "{}", lines[0]);
    assert!(lines[0].contains("simulated refusal"), "{}", lines[0]);
    assert!(!log.contains("rule sync failed"), "a sync failed:\n{log}");
    let (status, metrics) = http_get(bed.node(), METRICS, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kubeuproxy_sync_proxy_rules_refused_service_ports{"))
        .collect();
    assert_eq!(series.len(), 1, "{series:#?}");
    assert!(
        series[0].contains("service=\"kernel-refuses\"") && series[0].ends_with(" 1"),
        "{}",
        series[0]
    );
    // And its ClusterIP is not in the kernel's table.
    let keys = bed
        .node()
        .nft_keys("map", "ip", "kube-uproxy", "service-ports")
        .expect("service-ports");
    assert!(
        !format!("{keys:?}").contains(&REFUSED_IP.to_string()),
        "{keys:?}"
    );
}
