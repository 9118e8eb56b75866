//! End-to-end tests of `--config` (issue 22, item 2): the file a kubeadm
//! cluster already has, kube-proxy's `KubeProxyConfiguration` as kubeadm
//! renders it (tests/fixtures/kubeadm-kube-proxy-config.conf), is taken by
//! the release binary, which then serves; a flag on the command line still
//! wins over it; a misspelt field of kube-uproxy's own group still stops
//! the binary with the field's name.
//!
//! The first needs root and `nft`: without them it prints `SKIP …` (fails
//! if `CI` is set). The last runs the binary as any user: it exits while
//! reading its flags, before touching the network.

use std::net::SocketAddr;
use std::time::Duration;

use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, http_get,
    poll, vip, wait_nft_key, who_or_panic,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, Netns, backend_addr};

/// kubeadm's `config.conf` (ConfigMap `kube-system/kube-proxy`).
const KUBEADM: &str = include_str!("fixtures/kubeadm-kube-proxy-config.conf");

/// Polls `GET path` on `addr` from `ns` until it answers 200; the body.
fn wait_200(proxy: &mut ProxyProcess, ns: &Netns, addr: SocketAddr, path: &str) -> String {
    let mut body = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        proxy.assert_running("waiting for an HTTP answer");
        match http_get(ns, addr, path)? {
            (200, b) => {
                body = b;
                Ok(())
            }
            (status, b) => Err(format!("{status}: {b}")),
        }
    })
    .unwrap_or_else(|e| panic!("GET {path} on {addr} from {}: {e}", ns.name()));
    body
}

#[test]
fn kubeadms_kube_proxy_config_is_accepted_and_the_proxy_serves() {
    if !lab::require_root_and_nft("kubeadms_kube_proxy_config_is_accepted_and_the_proxy_serves") {
        return;
    }
    let bed = Testbed::new("config", "kubeadm", &[Backend::Whoami]);
    // kubeadm's file with the two edits operators make most: metrics for
    // Prometheus on every address, and the health port spelt out; and one
    // field with no meaning here (IPVS's scheduler).
    let conf = KUBEADM
        .replace(
            "metricsBindAddress: \"\"",
            "metricsBindAddress: 0.0.0.0:10249",
        )
        .replace(
            "healthzBindAddress: \"\"",
            "healthzBindAddress: 0.0.0.0:10256",
        )
        .replace("  scheduler: \"\"", "  scheduler: rr");
    let conf_path = bed.dir.join("config.conf");
    std::fs::write(&conf_path, &conf).expect("writing config.conf");
    let manifests = bed.manifests_file();
    std::fs::write(
        &manifests,
        e2e::manifests(&[ServiceManifest::new("web", VIP_A)
            .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
            .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))])]),
    )
    .expect("writing the manifests");
    // `--manifests` on the command line wins over the file's kubeconfig
    // (/var/lib/kube-proxy/kubeconfig.conf, not on this machine), and
    // `--healthz-bind-address` over its healthzBindAddress.
    let conf_arg = conf_path.to_string_lossy().into_owned();
    let mut proxy = bed.run_proxy(
        "kube-uproxy",
        &manifests,
        &[
            "--config",
            &conf_arg,
            "--healthz-bind-address",
            "0.0.0.0:10266",
        ],
        &[],
    );
    proxy.show_on_failure("config.conf", &conf_path);
    wait_nft_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_A,
        true,
        "the Service programmed",
    );
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_A), "the ClusterIP from a pod"),
        "backend0"
    );
    // The file's metricsBindAddress: reachable from off the node.
    let metrics = wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, 10249)),
        "/metrics",
    );
    assert!(metrics.contains("kubeproxy_"), "{metrics}");
    // The flag, not the file, says where /healthz is.
    wait_200(
        &mut proxy,
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, 10266)),
        "/healthz",
    );
    let on_file_port = http_get(
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, 10256)),
        "/healthz",
    );
    assert!(
        on_file_port.is_err(),
        "the file's healthz port answers although the flag moved it: {on_file_port:?}"
    );
    // Once at start, what has no effect here and why.
    let log = proxy.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("kube-proxy fields without effect here"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("`ipvs.scheduler`"), "{}", lines[0]);
    // kubeadm's clusterCIDR is kube-proxy's local-traffic detection here.
    assert!(
        log.contains("10.244.0.0/16") && log.contains("goes to their cluster-wide endpoints"),
        "{log}"
    );
    proxy.assert_running("after the checks");
}

#[test]
fn an_unknown_field_of_kube_uproxys_own_group_stops_the_binary_naming_it() {
    let dir =
        std::env::temp_dir().join(format!("kube-uproxy-config-unknown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "apiVersion: kube-uproxy.io/v1alpha1\nkind: KubeUproxyConfiguration\nsyncPeriodd: 1m\n",
    )
    .expect("writing the file");
    let out = std::process::Command::new(e2e::bin())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("running kube-uproxy");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown field `syncPeriodd`"), "{err}");
}
