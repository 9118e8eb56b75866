//! deploy/ against the binary: the DaemonSet's container args and probe
//! commands go through kube-uproxy's own flag and config-file parsing
//! (with the ConfigMap's file where the DaemonSet mounts it), the paths the
//! settings name are the ones the pod mounts, the capabilities granted are
//! exactly those the code needs, RBAC grants only list/watch on what
//! the proxy reads, and the Grafana dashboard queries only series the
//! proxy serves, of kube-uproxy's pods only. Also what an operator meets
//! on the first day: a rolling update that can surge (no declared ports on
//! the host-network pod), nothing to fill in on a kubeadm cluster (the API
//! server from kubeadm's kube-proxy ConfigMap), the kustomize components
//! (built with `kubectl kustomize` where kubectl is installed), and an
//! image built from the stripped `dist` profile for amd64 and arm64. No
//! root, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube_uproxy::config::file::{self as config_file, ConfigFile};
use kube_uproxy::config::{Args, Command};
use kube_uproxy::metrics::Metrics;
use kube_uproxy::model::{ObjectKey, Protocol, ServicePortName};
use kube_uproxy::rules::host::REQUIRED_CAPABILITIES;
use serde::Deserialize;
use serde_json::{Value, json};
use uproxy_lab::json_strings as strings;

/// The DaemonSet's volume with kubeadm's kubeconfig for kube-proxy.
const KUBE_PROXY_VOLUME: &str = "kube-proxy-kubeconfig";

/// The control plane's address in [`KUBEADM_KUBE_PROXY_CONFIGMAP`] (a
/// documentation address: nothing is sent to it).
const KUBEADM_SERVER: &str = "https://192.0.2.10:6443";

/// `kube-system/kube-proxy` as kubeadm renders it (its addon manifest,
/// `KubeProxyConfigMap19`; `config.conf` abridged: only `kubeconfig.conf`
/// is read here).
const KUBEADM_KUBE_PROXY_CONFIGMAP: &str = r#"
kind: ConfigMap
apiVersion: v1
metadata:
  name: kube-proxy
  namespace: kube-system
  labels:
    app: kube-proxy
data:
  kubeconfig.conf: |-
    apiVersion: v1
    kind: Config
    clusters:
    - cluster:
        certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
        server: https://192.0.2.10:6443
      name: default
    contexts:
    - context:
        cluster: default
        namespace: default
        user: default
      name: default
    current-context: default
    users:
    - name: default
      user:
        tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
  config.conf: |-
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    bindAddress: 0.0.0.0
    clientConnection:
      kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
"#;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// Every YAML document of a deploy/ file, as JSON values.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn one(file: &str, kind: &str) -> Value {
    let docs: Vec<Value> = documents(file)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "{file}: one {kind}");
    docs.into_iter().next().unwrap_or_default()
}

/// The pod: its container, its volumes' mount paths by volume name.
struct Pod {
    spec: Value,
    container: Value,
}

impl Pod {
    fn load() -> Pod {
        let ds = one("daemonset.yaml", "DaemonSet");
        let spec = ds["spec"]["template"]["spec"].clone();
        let containers = spec["containers"].as_array().cloned().unwrap_or_default();
        assert_eq!(containers.len(), 1, "one container");
        Pod {
            container: containers[0].clone(),
            spec,
        }
    }

    /// Where the volume `name` is mounted in the container.
    fn mount_of(&self, name: &str) -> PathBuf {
        self.container["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .and_then(|m| m["mountPath"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no mount of volume {name}"))
    }

    fn volume(&self, name: &str) -> Value {
        self.spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The volume whose mount holds `path`.
    fn volume_holding(&self, path: &Path) -> Value {
        let mounts = self.container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let m = mounts
            .iter()
            .filter(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
            .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
            .unwrap_or_else(|| panic!("{} is on no volume", path.display()));
        self.volume(m["name"].as_str().unwrap_or_default())
    }
}

/// A scratch directory standing for the container's file system: the
/// ConfigMap's files are written where the DaemonSet mounts them.
struct Root(PathBuf);

impl Root {
    fn new(pod: &Pod) -> Root {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("ku-deploy-{}-{n}", std::process::id()));
        let cm = one("configmap.yaml", "ConfigMap");
        let volume = pod.volume("config");
        assert_eq!(
            volume["configMap"]["name"], cm["metadata"]["name"],
            "the config volume is the ConfigMap"
        );
        let dir = root.join(
            pod.mount_of("config")
                .strip_prefix("/")
                .unwrap_or(Path::new("")),
        );
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for (name, text) in cm["data"].as_object().cloned().unwrap_or_default() {
            std::fs::write(dir.join(name), text.as_str().unwrap_or_default()).expect("writing");
        }
        // kubeadm's kube-proxy ConfigMap, its items where the pod mounts them.
        let volume = pod.volume(KUBE_PROXY_VOLUME);
        assert_eq!(volume["configMap"]["name"], "kube-proxy", "{volume}");
        let dir = root.join(
            pod.mount_of(KUBE_PROXY_VOLUME)
                .strip_prefix("/")
                .unwrap_or(Path::new("")),
        );
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let kubeadm: Value =
            serde_norway::from_str(KUBEADM_KUBE_PROXY_CONFIGMAP).expect("kubeadm's");
        for item in volume["configMap"]["items"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = item["key"].as_str().unwrap_or_default();
            let text = kubeadm["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("kubeadm's kube-proxy ConfigMap has no key {key}"));
            std::fs::write(dir.join(item["path"].as_str().unwrap_or(key)), text).expect("writing");
        }
        Root(root)
    }

    /// `argv` with every absolute path under the scratch root, and the
    /// downward-API variable expanded as the kubelet would.
    fn argv(&self, args: &[String]) -> Vec<String> {
        let mut out = vec!["kube-uproxy".to_string()];
        for a in args {
            let a = a.replace("$(NODE_NAME)", "node-a");
            out.push(match a.split_once("=/") {
                Some((flag, path)) if flag.starts_with("--") => {
                    format!("{flag}={}", self.0.join(path).display())
                }
                _ => a,
            });
        }
        out
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse(root: &Root, args: &[String]) -> Args {
    let argv = root.argv(args);
    config_file::parse_args(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

#[test]
fn the_containers_args_and_config_file_parse_and_name_what_the_pod_mounts() {
    let pod = Pod::load();
    let root = Root::new(&pod);
    let args = parse(&root, &strings(&pod.container["args"]));
    // The ConfigMap's file was read (not only the defaults).
    let file = ConfigFile::load(&root.0.join("etc/kube-uproxy/config.yaml")).expect("config.yaml");
    assert_eq!(
        file.value("healthzSocket").map(PathBuf::from),
        args.healthz_socket
    );
    assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(
        args.healthz_address(),
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        args.metrics_address(),
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert!(args.manifests.is_none(), "the API, not a manifests file");
    // The API server from kubeadm's kubeconfig for kube-proxy (see
    // kubeadms_kubeconfig_for_kube_proxy_points_the_proxy_at_the_api_server).
    let kubeconfig = args.kubeconfig.clone().expect("--kubeconfig");
    assert!(kubeconfig.starts_with(&root.0), "{}", kubeconfig.display());

    // The health socket is on the pod's own emptyDir.
    let socket = args.healthz_socket.clone().expect("healthzSocket set");
    assert!(
        pod.volume_holding(&socket).get("emptyDir").is_some(),
        "{}",
        socket.display()
    );
    // The sysctl is written through the hostPath of /proc/sys/net/ipv4.
    let sysctl = args.proc_sys_dir.join("net/ipv4/tcp_migrate_req");
    let v = pod.volume_holding(&sysctl);
    assert_eq!(v["hostPath"]["path"], "/proc/sys/net/ipv4", "{v}");
    assert_eq!(
        pod.mount_of(v["name"].as_str().unwrap_or_default()),
        args.proc_sys_dir.join("net/ipv4")
    );
    // SIGTERM drains for shutdownGrace; the kubelet must wait longer.
    let grace = pod.spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        grace > args.shutdown_grace.as_secs(),
        "{grace}s vs {:?}",
        args.shutdown_grace
    );
    // NODE_NAME from the downward API.
    let env = pod.container["env"].as_array().cloned().unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
}

#[test]
fn the_probes_are_the_binarys_probe_on_the_pods_own_socket() {
    let pod = Pod::load();
    let root = Root::new(&pod);
    let args = parse(&root, &strings(&pod.container["args"]));
    for (probe, livez) in [
        ("startupProbe", true),
        ("readinessProbe", false),
        ("livenessProbe", true),
    ] {
        let command = strings(&pod.container[probe]["exec"]["command"]);
        assert_eq!(
            command.first().map(String::as_str),
            Some("/usr/local/bin/kube-uproxy"),
            "{probe}"
        );
        let p = parse(&root, &command[1..]);
        assert!(
            matches!(p.command, Some(Command::Probe { livez: l }) if l == livez),
            "{probe}: {:?}",
            p.command
        );
        assert_eq!(
            p.healthz_socket, args.healthz_socket,
            "{probe} asks this pod's socket"
        );
    }
}

#[test]
fn the_pod_has_exactly_the_capabilities_the_code_needs() {
    let pod = Pod::load();
    let sc = &pod.container["securityContext"];
    assert_ne!(sc["privileged"], true, "no privileged mode");
    assert_eq!(
        sc["runAsUser"], 0,
        "root: nft and ip inherit the capabilities"
    );
    let add: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let mut needed: BTreeSet<String> = REQUIRED_CAPABILITIES
        .iter()
        .map(|(name, ..)| name.to_string())
        .collect();
    let cleans_kube_proxy = strings(&pod.container["args"])
        .iter()
        .any(|a| a == "--cleanup-kube-proxy");
    if cleans_kube_proxy {
        // iptables-legacy, for kube-proxy's rules on legacy-iptables nodes,
        // opens a raw socket (tests/image_rootfs.rs runs the cleanup with
        // exactly these capabilities).
        needed.insert("NET_RAW".into());
        // And takes the node's lock (the root filesystem is read-only).
        assert_eq!(pod.mount_of("xtables-lock"), Path::new("/run/xtables.lock"));
        let lock = pod.volume("xtables-lock");
        assert_eq!(lock["hostPath"]["path"], "/run/xtables.lock");
        assert_eq!(lock["hostPath"]["type"], "FileOrCreate");
    }
    assert_eq!(add, needed);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    assert_eq!(pod.spec["hostNetwork"], true);
    assert_eq!(pod.spec["priorityClassName"], "system-node-critical");
    let tolerations = pod.spec["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists"
            && t.get("key").is_none()
            && t.get("effect").is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let ds = one("daemonset.yaml", "DaemonSet");
    let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (ru["maxSurge"].as_u64(), ru["maxUnavailable"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "kube-uproxy"
    );
}

#[test]
fn rbac_grants_only_reading_what_the_proxy_reads() {
    let role = one("rbac.yaml", "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().cloned().unwrap_or_default() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert(format!("{group}/{resource} {verb}"));
                }
            }
        }
    }
    // Services and EndpointSlices: list and watch; the proxy's own Node:
    // get, list and watch (kube-proxy's rights).
    let want: BTreeSet<String> = [
        "/services list",
        "/services watch",
        "/nodes get",
        "/nodes list",
        "/nodes watch",
        "discovery.k8s.io/endpointslices list",
        "discovery.k8s.io/endpointslices watch",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(granted, want);
    let binding = one("rbac.yaml", "ClusterRoleBinding");
    let sa = one("rbac.yaml", "ServiceAccount");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        sa["metadata"]["namespace"]
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = one("kustomization.yaml", "Kustomization");
    let listed: BTreeSet<String> = strings(&k["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(deploy(""))
        .expect("deploy/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
}

/// The series the proxy serves on /metrics, as `name → label names`:
/// every family registered (with `--metrics-per-endpoint`), one Service
/// port's series created, one /healthz and one /livez answered (the
/// kubelet's probes), rendered by the same code the server uses.
fn served_series() -> BTreeMap<String, BTreeSet<String>> {
    let metrics = Metrics::new(true);
    let port = ServicePortName {
        service: ObjectKey::new("default", "web"),
        port: "http".into(),
        protocol: Protocol::Tcp,
    };
    let handles = metrics.service_ports().service_port(&port);
    handles.connected("10.1.0.1:80".parse().expect("address"), Duration::ZERO);
    metrics.health_answered(false, 200);
    metrics.health_answered(true, 200);
    let text = metrics.render();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if let Some(body) = line[end..].strip_prefix('{') {
            let body = &body[..body.find('}').unwrap_or(body.len())];
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                labels.insert(pair.split('=').next().unwrap_or("").to_string());
            }
        }
    }
    out
}

/// PromQL identifiers of `expr` that name a series of ours (the
/// `kubeproxy_`, `kubeuproxy_` and `process_` prefixes), each with the
/// label names its `{…}` selector uses.
fn series_in(expr: &str) -> Vec<(String, Vec<String>)> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            // Skip string literals (label values, regexes).
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if !ident(b[i]) || (i > 0 && (ident(b[i - 1]) || b[i - 1] == b'$')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && ident(b[i]) {
            i += 1;
        }
        let name = &expr[start..i];
        if !["kubeproxy_", "kubeuproxy_", "process_"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let mut labels = Vec::new();
        if b.get(i) == Some(&b'{') {
            let close = expr[i..].find('}').map_or(b.len(), |k| i + k);
            for matcher in expr[i + 1..close].split(',') {
                let label = matcher.split(['=', '!']).next().unwrap_or("").trim();
                if !label.is_empty() {
                    labels.push(label.to_string());
                }
            }
            i = close;
        }
        out.push((name.to_string(), labels));
    }
    out
}

/// Every PromQL query of the dashboard: panel targets (rows' nested panels
/// too) and template variables, with where each is.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if v["type"] == "query"
            && let Some(q) = q
        {
            out.push((format!("variable {:?}", v["name"]), q.to_string()));
        }
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_series_the_proxy_serves() {
    let path = deploy("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let served = served_series();
    // Labels Prometheus adds when it scrapes, and the histograms' own.
    let scrape_labels = ["instance", "job", "le"];
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "too few queries found: {queries:?}");
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &queries {
        let series = series_in(expr);
        if series.is_empty() {
            problems.push(format!("{place}: no series of the proxy in {expr:?}"));
        }
        for (name, labels) in series {
            let Some(known) = served.get(&name) else {
                problems.push(format!("{place}: {name} is not served ({expr:?})"));
                continue;
            };
            used.insert(name.clone());
            for l in labels {
                if !known.contains(&l) && !scrape_labels.contains(&l.as_str()) {
                    problems.push(format!("{place}: {name} has no label {l:?}"));
                }
            }
        }
        // `by (…)` groups by labels that some series of the query has.
        let of_query: BTreeSet<&String> = series_in(expr)
            .iter()
            .filter_map(|(n, _)| served.get(n))
            .flatten()
            .collect();
        for clause in expr.split("by (").skip(1) {
            let list = &clause[..clause.find(')').unwrap_or(clause.len())];
            for l in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                if !of_query.contains(&l.to_string()) && !scrape_labels.contains(&l) {
                    problems.push(format!("{place}: groups by {l:?}, a label no series has"));
                }
            }
        }
    }
    // Only kube-uproxy's pods: the instance variable lists a family no
    // other process serves, and every `process_*` query (every exporter has
    // those) is joined with one.
    for (place, expr) in &queries {
        let ours = series_in(expr)
            .iter()
            .any(|(n, _)| n.starts_with("kubeuproxy_") || n.starts_with("kubeproxy_"));
        if !ours {
            problems.push(format!("{place}: not only kube-uproxy's series: {expr:?}"));
        }
    }
    let instance = queries
        .iter()
        .find(|(place, _)| place == "variable String(\"instance\")")
        .map(|(_, q)| q.clone())
        .expect("an instance variable");
    assert!(
        series_in(&instance)
            .iter()
            .all(|(n, _)| n.starts_with("kubeuproxy_")),
        "instance: {instance:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The panels the operations guide promises are there.
    for family in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeuproxy_connections_accepted_total",
        "kubeuproxy_connections_active",
        "kubeuproxy_connections_failed_total",
        "kubeuproxy_relayed_bytes_total",
        "kubeuproxy_endpoint_connect_duration_seconds_bucket",
        "kubeuproxy_udp_flows_active",
        "kubeuproxy_udp_flows_expired_total",
        "process_open_fds",
        "process_max_fds",
        "kubeuproxy_rules_drift_repairs_total",
    ] {
        assert!(used.contains(family), "no panel shows {family}");
    }
}

/// Every YAML file under deploy/ (components too), relative to it.
fn yaml_files() -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("deploy/").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if e.path().is_dir() {
                walk(&e.path(), &rel, out);
            } else if name.ends_with(".yaml") {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(""), "", &mut out);
    out.sort();
    out
}

/// Whether a rolling update's `maxSurge` (a count or a percentage) lets a
/// second pod start beside the old one.
fn surges(max_surge: &Value) -> bool {
    match max_surge {
        Value::Number(n) => n.as_u64() != Some(0),
        Value::String(s) => s.trim_end_matches('%').trim() != "0",
        _ => false,
    }
}

/// kubernetes/kubernetes#106417: on a hostNetwork pod, a declared
/// containerPort is defaulted into a hostPort; the scheduler then never
/// places the surge pod beside the old one (they would claim the same
/// host port), and a `maxSurge` rolling update never proceeds.
#[test]
fn a_host_network_daemonset_that_surges_declares_no_ports() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for file in yaml_files() {
        for ds in documents(&file)
            .into_iter()
            .filter(|d| d["kind"] == "DaemonSet")
        {
            let spec = &ds["spec"]["template"]["spec"];
            let surge = &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"];
            if spec["hostNetwork"] != true || !surges(surge) {
                continue;
            }
            checked += 1;
            for list in ["containers", "initContainers", "ephemeralContainers"] {
                for c in spec[list].as_array().into_iter().flatten() {
                    let ports = c["ports"].as_array().cloned().unwrap_or_default();
                    if !ports.is_empty() {
                        problems.push(format!(
                            "{file}: {} {:?} declares ports {ports:?} (hostNetwork, maxSurge {surge})",
                            list, c["name"]
                        ));
                    }
                }
            }
            // As kubeadm's kube-proxy: Linux nodes only.
            if spec["nodeSelector"]["kubernetes.io/os"] != "linux" {
                problems.push(format!(
                    "{file}: no nodeSelector kubernetes.io/os: linux ({})",
                    spec["nodeSelector"]
                ));
            }
        }
    }
    assert!(
        checked >= 1,
        "no hostNetwork surge DaemonSet found in deploy/"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Words that stand for a value the operator must fill in.
fn placeholder(s: &str) -> Option<String> {
    // ALL-CAPS words joined by hyphens (API-SERVER-HOST, YOUR-REGISTRY).
    for word in s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        let parts: Vec<&str> = word.split('-').collect();
        if parts.len() >= 2
            && parts
                .iter()
                .all(|p| p.len() >= 2 && p.chars().all(|c| c.is_ascii_uppercase()))
        {
            return Some(word.to_string());
        }
    }
    let lower = s.to_ascii_lowercase();
    [
        "changeme",
        "change-me",
        "replace-me",
        "todo",
        "fixme",
        "example.com",
        "registry.example",
        "<",
    ]
    .into_iter()
    .find(|w| lower.contains(w))
    .map(String::from)
}

/// `kubectl apply -k deploy/` needs no hand edit: no value in deploy/ is a
/// placeholder (comments may show examples).
#[test]
fn no_value_in_deploy_is_a_placeholder() {
    fn strings<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
        match v {
            Value::String(s) => out.push((at, s)),
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    strings(v, format!("{at}[{i}]"), out);
                }
            }
            Value::Object(o) => {
                for (k, v) in o {
                    strings(v, format!("{at}.{k}"), out);
                }
            }
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for file in yaml_files() {
        for doc in documents(&file) {
            let mut found = Vec::new();
            strings(&doc, String::new(), &mut found);
            for (at, s) in found {
                // Values that are files of their own (the config file):
                // their lines, without comments.
                for line in s.lines().map(|l| l.split('#').next().unwrap_or("")) {
                    if let Some(p) = placeholder(line) {
                        problems.push(format!("{file}: {at}: {p:?} in {line:?}"));
                    }
                }
            }
        }
    }
    assert_eq!(
        placeholder("API-SERVER-HOST").as_deref(),
        Some("API-SERVER-HOST")
    );
    assert_eq!(placeholder("--hostname-override=$(NODE_NAME)"), None);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// On a kubeadm cluster the proxy reads the API server's address where
/// kube-proxy does: the `kube-proxy` ConfigMap's `kubeconfig.conf`
/// (`server:`), with the pod's own ServiceAccount token and CA, mounted at
/// kube-proxy's path. No address to fill in.
#[test]
fn kubeadms_kubeconfig_for_kube_proxy_points_the_proxy_at_the_api_server() {
    let pod = Pod::load();
    let root = Root::new(&pod);
    let args = parse(&root, &strings(&pod.container["args"]));
    let path = args.kubeconfig.clone().expect("--kubeconfig");
    // The file is on the kube-proxy ConfigMap's volume, as its key, at
    // kube-proxy's own path (its clientConnection.kubeconfig).
    let in_pod = Path::new("/").join(path.strip_prefix(&root.0).expect("under the root"));
    assert_eq!(in_pod, Path::new("/var/lib/kube-proxy/kubeconfig.conf"));
    let volume = pod.volume_holding(&in_pod);
    assert_eq!(volume["name"], KUBE_PROXY_VOLUME);
    let kc = kube::config::Kubeconfig::read_from(&path).expect("kubeadm's kubeconfig.conf");
    let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
    assert_eq!(cluster.server.as_deref(), Some(KUBEADM_SERVER));
    let user = kc.auth_infos[0].auth_info.as_ref().expect("user");
    // The token and CA it names are the ones the kubelet mounts for the
    // pod's ServiceAccount (kube-uproxy's: rbac.yaml).
    assert_eq!(
        user.token_file.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    assert_ne!(pod.spec["automountServiceAccountToken"], false);
    let env = pod.container["env"].as_array().cloned().unwrap_or_default();
    assert!(
        env.iter().all(|e| e["name"] != "KUBERNETES_SERVICE_HOST"),
        "no KUBERNETES_SERVICE_HOST to fill in: {env:?}"
    );
}

/// `kubectl kustomize DIR`'s documents, or `None` without kubectl (a
/// developer's machine; with `CI` set, as in CI, a missing kubectl fails).
fn kustomize(dir: &Path) -> Option<Vec<Value>> {
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
    {
        Ok(out) => out,
        // CI installs kubectl (.ci/run): there a missing one fails.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            return None;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(
        serde_norway::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).expect("kustomize's output"))
            .filter(|v| !v.is_null())
            .collect(),
    )
}

/// An overlay of deploy/ in a scratch directory under target/ (kustomize
/// wants relative paths), with `components` and the generated ConfigMap
/// the apiserver-address component reads.
struct Overlay(PathBuf);

impl Overlay {
    fn new(name: &str, components: &[&str]) -> Overlay {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("deploy-overlay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("overlay dir");
        // From target/tmp/<dir> back to the repository.
        let up = "../../../deploy";
        let mut k = format!("resources:\n  - {up}\ncomponents:\n");
        for c in components {
            k += &format!("  - {up}/components/{c}\n");
        }
        k += "configMapGenerator:\n  - name: kube-uproxy-apiserver\n    namespace: kube-system\n    literals: [host=192.0.2.10, port=6443]\n";
        std::fs::write(dir.join("kustomization.yaml"), k).expect("overlay");
        Overlay(dir)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// The kustomizations build (with kubectl's kustomize, where kubectl is
/// installed): the base as it is applied on a kubeadm cluster, and each
/// component: the API server's address for other installers (in-cluster
/// config with that address instead of kubeadm's kubeconfig).
#[test]
fn the_kustomizations_and_their_components_build() {
    let Some(base) = kustomize(&deploy("")) else {
        eprintln!("SKIP the_kustomizations_and_their_components_build: no kubectl");
        return;
    };
    let ds = kind(&base, "DaemonSet");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(
        strings(&container["args"])
            .contains(&"--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf".into())
    );
    assert!(
        base.iter().all(|d| d["kind"] != "PodMonitor"),
        "the PodMonitor is optional"
    );

    let overlay = Overlay::new("all", &["apiserver-address"]);
    let docs = kustomize(&overlay.0).expect("kubectl");
    let ds = kind(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let args = strings(&container["args"]);
    assert!(
        args.iter().all(|a| !a.starts_with("--kubeconfig")),
        "{args:?}"
    );
    // The binary takes them.
    let pod = Pod::load();
    let root = Root::new(&pod);
    let parsed = parse(&root, &args);
    assert!(parsed.kubeconfig.is_none());
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["host"] == "192.0.2.10")
        .expect("the overlay's ConfigMap");
    for (var, key) in [
        ("KUBERNETES_SERVICE_HOST", "host"),
        ("KUBERNETES_SERVICE_PORT", "port"),
    ] {
        let e = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{var}"));
        let r = &e["valueFrom"]["configMapKeyRef"];
        assert_eq!(
            (&r["name"], &r["key"]),
            (&cm["metadata"]["name"], &json!(key)),
            "{var}"
        );
    }
    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    assert!(
        volumes.iter().all(|v| v["name"] != KUBE_PROXY_VOLUME),
        "{volumes:?}"
    );
    let mounts: Vec<&Value> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    assert!(
        mounts.iter().all(|m| m["name"] != KUBE_PROXY_VOLUME),
        "{mounts:?}"
    );
}

/// The optional PodMonitor (Prometheus Operator): it scrapes kube-uproxy's
/// pods on the port the component binds /metrics to, keeps the per-Service
/// `namespace`/`service` labels (honorLabels), and files the targets under
/// kube-proxy's job, which kube-proxy's alerts and dashboards select.
#[test]
fn the_podmonitor_component_scrapes_where_the_proxy_serves() {
    let overlay = Overlay::new("podmonitor", &["podmonitor"]);
    let Some(docs) = kustomize(&overlay.0) else {
        eprintln!("SKIP the_podmonitor_component_scrapes_where_the_proxy_serves: no kubectl");
        return;
    };
    let ds = kind(&docs, "DaemonSet");
    let args = strings(&ds["spec"]["template"]["spec"]["containers"][0]["args"]);
    // The binary takes the arguments, kubeadm's kubeconfig still among them.
    let pod = Pod::load();
    let root = Root::new(&pod);
    let parsed = parse(&root, &args);
    assert!(parsed.kubeconfig.is_some(), "{args:?}");
    let metrics = parsed.metrics_address().expect("metrics address");
    assert!(metrics.ip().is_unspecified(), "{metrics}");

    let pm = kind(&docs, "PodMonitor");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (k, v) in selector {
        assert_eq!(
            &ds["spec"]["template"]["metadata"]["labels"][k], v,
            "selects the pods"
        );
    }
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        ep["honorLabels"], true,
        "per-Service namespace/service labels"
    );
    assert_eq!(ep["path"], "/metrics");
    let relabel = |target: &str| {
        ep["relabelings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["targetLabel"] == target)
            .unwrap_or_else(|| panic!("no relabeling of {target}"))
            .clone()
    };
    // No declared port to name: the pod's IP and the metrics port.
    assert_eq!(
        relabel("__address__")["sourceLabels"],
        json!(["__meta_kubernetes_pod_ip"])
    );
    assert_eq!(
        relabel("__address__")["replacement"],
        format!("$1:{}", metrics.port())
    );
    assert_eq!(
        relabel("job")["replacement"],
        "kube-proxy",
        "kube-proxy's alerts find it"
    );
}

/// The lines of `[section]` in a TOML file (to the next section), without
/// comments.
fn toml_section(text: &str, section: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| l.trim() != format!("[{section}]"))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The image ships the `dist` profile's binary (release's code without
/// its debug sections), built for the target platform from the builder's
/// (amd64 and arm64), on an empty base with only the files
/// deploy/image-rootfs.sh assembles on the target's Debian 12 (the
/// programs the proxy runs and what they load: tests/image_rootfs.rs runs
/// them from that tree and measures it). Docker cannot run here: this
/// reads the Dockerfile.
#[test]
fn the_image_is_built_from_the_stripped_dist_profile_for_amd64_and_arm64() {
    let cargo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("Cargo.toml");
    let dist = toml_section(&cargo, "profile.dist");
    assert!(
        dist.contains(&r#"inherits = "release""#.to_string()),
        "{dist:?}"
    );
    let strip = dist
        .iter()
        .find_map(|l| l.strip_prefix("strip = "))
        .expect("[profile.dist] strips");
    assert!(
        [r#""debuginfo""#, r#""symbols""#, "true"].contains(&strip),
        "{strip}"
    );
    assert!(
        dist.iter().any(|l| l == "debug = false"),
        "no debug sections to strip: {dist:?}"
    );

    let text = std::fs::read_to_string(deploy("Dockerfile")).expect("deploy/Dockerfile");
    // Instructions, with continuation lines joined and comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let froms: Vec<&str> = joined.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        3,
        "a build stage, the tree's and the runtime: {froms:?}"
    );
    assert!(
        froms[0].contains("--platform=$BUILDPLATFORM") && froms[0].contains(" AS build"),
        "the build runs natively and cross-compiles: {}",
        froms[0]
    );
    // The tree is assembled on the target platform's Debian 12: the
    // release tests/image_rootfs.rs checks the script on.
    assert_eq!(froms[1], "FROM debian:bookworm-slim AS rootfs");
    assert_eq!(froms[2], "FROM scratch", "nothing but the tree");
    let stages: Vec<&str> = joined.split("\nFROM ").collect();
    let (tree_stage, runtime) = (stages[stages.len() - 2], stages[stages.len() - 1]);
    // What deploy/image-rootfs.sh copies from, and runs it.
    let install = tree_stage
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("the tree's stage installs the packages");
    for package in [
        "nftables", "iproute2", "iptables", "ipset", "ipvsadm", "netbase",
    ] {
        assert!(
            install.split_whitespace().any(|w| w == package),
            "{package}: {install}"
        );
    }
    assert!(
        tree_stage.contains("COPY deploy/image-rootfs.sh ")
            && tree_stage.contains("COPY --from=build /kube-uproxy ")
            && tree_stage.contains("image-rootfs.sh /rootfs /kube-uproxy"),
        "the tree's stage runs deploy/image-rootfs.sh on the built binary: {tree_stage}"
    );
    assert!(
        runtime.contains("COPY --from=rootfs /rootfs/ /"),
        "the runtime is the tree: {runtime}"
    );
    // The proxy runs nft and ip by name: the PATH must reach /usr/sbin.
    let path = runtime
        .lines()
        .find_map(|l| l.strip_prefix("ENV PATH="))
        .expect("the runtime sets PATH");
    assert!(path.split(':').any(|d| d == "/usr/sbin"), "{path}");
    assert!(
        runtime.contains(r#"ENTRYPOINT ["/usr/local/bin/kube-uproxy"]"#),
        "{runtime}"
    );
    let build = joined
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("cargo build");
    for part in [
        "--profile dist",
        "--locked",
        "--bin kube-uproxy",
        "--target",
    ] {
        assert!(build.contains(part), "{part}: {build}");
    }
    assert!(
        build.contains("/dist/kube-uproxy"),
        "the dist binary is shipped: {build}"
    );
    for arch in [
        "amd64)",
        "arm64)",
        "aarch64-unknown-linux-gnu",
        "x86_64-unknown-linux-gnu",
    ] {
        assert!(joined.contains(arch), "{arch}");
    }
    assert!(
        joined.contains("KUBE_UPROXY_GIT_COMMIT"),
        "the build info's commit"
    );
}
