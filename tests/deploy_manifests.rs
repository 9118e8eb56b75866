//! deploy/ against the binary: the DaemonSet's container args and probe
//! commands go through kube-uproxy's own flag and config-file parsing
//! (with the ConfigMap's file where the DaemonSet mounts it), the paths the
//! settings name are the ones the pod mounts, the capabilities granted are
//! exactly those the code needs, RBAC grants only list/watch on what
//! the proxy reads, and the Grafana dashboard queries only series the
//! proxy serves. No root, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube_uproxy::config::file::{self as config_file, ConfigFile};
use kube_uproxy::config::{Args, Command};
use kube_uproxy::metrics::Metrics;
use kube_uproxy::model::{ObjectKey, Protocol, ServicePortName};
use kube_uproxy::rules::host::REQUIRED_CAPABILITIES;
use serde::Deserialize;
use serde_json::Value;

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

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
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
    assert!(
        args.manifests.is_none() && args.kubeconfig.is_none(),
        "in-cluster config"
    );

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
    let needed: BTreeSet<String> = REQUIRED_CAPABILITIES
        .iter()
        .map(|(name, ..)| name.to_string())
        .collect();
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
