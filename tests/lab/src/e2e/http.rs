//! Peers and clients of the per-request balancing tests (tests/e2e_http.rs):
//! real third-party programs run in the lab's namespaces.
//!
//! - Python peers in `tests/lab/py/`: `grpc_peer.py` (a grpcio server per
//!   backend, and grpcio clients that each use ONE channel, i.e. one HTTP/2
//!   connection) and `http_peer.py` (a keep-alive HTTP/1.1 backend that
//!   names itself in every answer, hashes uploads and answers WebSocket
//!   upgrades with a raw tunnel). They run under the interpreter of the root
//!   namespace's `python3` (resolved once, so that pyenv shims and `PATH`
//!   inside `ip netns exec` do not matter); grpcio comes from PyPI
//!   (`.ci/run`).
//! - [`run_bounded`]: any program (curl, socat, a Python client) run to
//!   completion in a namespace, killed after a timeout, its output kept in
//!   the test's directory.
//! - [`debug_services`] / [`wait_port_applied`] / [`wait_endpoints`]:
//!   `/debug/services` of the proxy, read in the node namespace, to know
//!   when a Service port's rule is in the kernel and which endpoints a port
//!   has (a removed endpoint is gone from it once the proxy applied the
//!   change).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{ProxyProcess, READY_TIMEOUT, http_get, poll};
use crate::{Netns, NsChild, backend_addr};

/// The admin (metrics) server of the proxy, in the node namespace.
pub const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// Bound for a peer server to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The interpreter `python3` is in the root namespace (`sys.executable`).
///
/// # Panics
/// If `python3` cannot be run.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .expect("running python3 (the gRPC and HTTP peers are Python scripts)");
        assert!(out.status.success(), "python3 -c failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// `tests/lab/py/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Takes the environment variables of HTTP proxies away from `cmd`: curl
/// and grpcio follow them, and no proxy of the test machine may be in the
/// way of the lab's addresses.
fn without_proxies(cmd: &mut std::process::Command) {
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "GRPC_PROXY",
        "grpc_proxy",
    ] {
        cmd.env_remove(var);
    }
}

/// What a program run by [`run_bounded`] left.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Ran {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `program args` in `ns` with stdin from `stdin` (or none), its
/// stdout and stderr in `<dir>/<label>-<n>.{stdout,stderr}`; killed after
/// `timeout`. Errors say what ran and what it printed.
pub fn run_bounded(
    ns: &Netns,
    dir: &Path,
    label: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&Path>,
    timeout: Duration,
) -> Result<Ran, String> {
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("{label}-{n}.stdout"));
    let err_path = dir.join(format!("{label}-{n}.stderr"));
    let out = File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let err = File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let mut cmd = ns.command(program);
    cmd.args(args).stdout(out).stderr(err);
    without_proxies(&mut cmd);
    match stdin {
        Some(path) => {
            let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            cmd.stdin(f);
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    let line = format!("{program} {}", args.join(" "));
    let mut child = ns.spawn(cmd).map_err(|e| format!("`{line}`: {e}"))?;
    let status = child
        .wait_timeout(timeout)
        .map_err(|e| format!("`{line}`: {e}"))?;
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        drop(child);
        return Err(format!(
            "`{line}` in {} still running after {timeout:?}; stderr: {stderr}",
            ns.name()
        ));
    };
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    Ok(Ran {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run_bounded`], and the program must exit 0.
pub fn run_ok(
    ns: &Netns,
    dir: &Path,
    label: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&Path>,
    timeout: Duration,
) -> Result<Ran, String> {
    let ran = run_bounded(ns, dir, label, program, args, stdin, timeout)?;
    if ran.status.success() {
        Ok(ran)
    } else {
        Err(format!(
            "`{program} {}` in {} exited {}; stdout: {}; stderr: {}",
            args.join(" "),
            ns.name(),
            ran.status,
            ran.stdout_text(),
            ran.stderr
        ))
    }
}

/// Starts `python3 <script> args` in `ns` (output in `<dir>/<label>.log`)
/// and waits until a connection from `probe` to `addr` succeeds.
///
/// # Panics
/// If it exits or does not listen within 20 s (with its output).
pub fn start_py_server(
    ns: &Netns,
    probe: &Netns,
    dir: &Path,
    label: &str,
    script_name: &str,
    args: &[&str],
    addr: SocketAddr,
) -> NsChild {
    let log_path = dir.join(format!("{label}.log"));
    let log = File::create(&log_path).expect("creating a peer log file");
    let log2 = log.try_clone().expect("cloning the log file handle");
    let mut cmd = ns.command(python());
    cmd.arg("-u")
        .arg(script(script_name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    without_proxies(&mut cmd);
    let mut child = ns.spawn(cmd).expect("spawning a Python peer");
    let started = poll(SERVER_START_TIMEOUT, Duration::from_millis(50), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status})"));
        }
        probe
            .tcp_connect(addr, Duration::from_secs(1))
            .map(drop)
            .map_err(|e| format!("connect {addr}: {e}"))
    });
    if let Err(last) = started {
        panic!(
            "{label} ({script_name} {}) in {} did not start: {last}; output:\n{}",
            args.join(" "),
            ns.name(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    child
}

/// `grpc_peer.py serve` in backend namespace `backend` (named `name`,
/// listening on `port`), probed from `probe` (the node).
pub fn grpc_server(
    backend: &Netns,
    probe: &Netns,
    dir: &Path,
    i: usize,
    port: u16,
    extra: &[&str],
) -> NsChild {
    let name = super::backend_name(i);
    let port_s = port.to_string();
    let mut args = vec!["serve", "--name", &name, "--port", &port_s];
    args.extend_from_slice(extra);
    start_py_server(
        backend,
        probe,
        dir,
        &format!("grpc-{name}"),
        "grpc_peer.py",
        &args,
        SocketAddr::from((backend_addr(i), port)),
    )
}

/// `http_peer.py` in backend namespace `backend` (named `backend<i>`,
/// listening on `port`, answering `delay_ms` later).
pub fn http_server(
    backend: &Netns,
    probe: &Netns,
    dir: &Path,
    i: usize,
    port: u16,
    delay_ms: u32,
) -> NsChild {
    let name = super::backend_name(i);
    let port_s = port.to_string();
    let delay = delay_ms.to_string();
    start_py_server(
        backend,
        probe,
        dir,
        &format!("http-{name}"),
        "http_peer.py",
        &["--name", &name, "--port", &port_s, "--delay-ms", &delay],
        SocketAddr::from((backend_addr(i), port)),
    )
}

/// Runs a `grpc_peer.py` client command in `ns` and parses the one JSON
/// object it prints.
pub fn grpc_client(
    ns: &Netns,
    dir: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<Value, String> {
    let script = script("grpc_peer.py");
    let script = script.to_string_lossy();
    let mut full = vec!["-u", &*script];
    full.extend_from_slice(args);
    let ran = run_ok(ns, dir, "grpc-client", python(), &full, None, timeout)?;
    let text = ran.stdout_text();
    serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "grpc client {args:?} printed no JSON ({e}): {text:?}; stderr: {}",
            ran.stderr
        )
    })
}

/// `/debug/services` of the proxy (read in `node`).
pub fn debug_services(node: &Netns) -> Result<Value, String> {
    let (status, body) = http_get(node, ADMIN, "/debug/services")?;
    if status != 200 {
        return Err(format!("/debug/services: {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("/debug/services: {e}: {body}"))
}

/// The reports of Service `service`'s ports in `/debug/services`.
pub fn port_reports(report: &Value, service: &str) -> Vec<Value> {
    report["servicePorts"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter(|p| p["service"].as_str() == Some(service))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every Service of `services` has a port whose rule is in the
/// kernel (`ruleApplied`), while `proxy` keeps running.
///
/// # Panics
/// After [`READY_TIMEOUT`], with the last report.
pub fn wait_port_applied(proxy: &mut ProxyProcess, node: &Netns, services: &[&str]) {
    let waited = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("waiting for the Service ports");
        let report = debug_services(node)?;
        for s in services {
            let ports = port_reports(&report, s);
            if ports.is_empty() || !ports.iter().all(|p| p["ruleApplied"] == Value::Bool(true)) {
                return Err(format!("Service {s} not applied yet: {report}"));
            }
        }
        Ok(())
    });
    if let Err(last) = waited {
        panic!("the proxy never applied {services:?} within {READY_TIMEOUT:?}; last: {last}");
    }
}

/// The addresses (`ip:port`) of the usable endpoints of Service `service`.
pub fn usable_endpoints(report: &Value, service: &str) -> Vec<String> {
    let mut out = Vec::new();
    for p in port_reports(report, service) {
        for e in p["endpoints"].as_array().into_iter().flatten() {
            if e["usable"] == Value::Bool(true)
                && let Some(a) = e["address"].as_str()
            {
                out.push(a.to_string());
            }
        }
    }
    out.sort();
    out
}

/// Waits until the usable endpoints of Service `service` are exactly
/// `expected` (`ip:port`, any order), while `proxy` keeps running.
///
/// # Panics
/// After [`READY_TIMEOUT`], with the last report.
pub fn wait_endpoints(proxy: &mut ProxyProcess, node: &Netns, service: &str, expected: &[String]) {
    let mut expected = expected.to_vec();
    expected.sort();
    let waited = poll(READY_TIMEOUT, Duration::from_millis(20), || {
        proxy.assert_running("waiting for an endpoint change");
        let report = debug_services(node)?;
        let now = usable_endpoints(&report, service);
        if now == expected {
            Ok(())
        } else {
            Err(format!("usable endpoints of {service}: {now:?}"))
        }
    });
    if let Err(last) = waited {
        panic!(
            "the proxy never had endpoints {expected:?} for {service} within {READY_TIMEOUT:?}; last: {last}"
        );
    }
}

/// `/metrics` of the proxy (read in `node`): every sample as (name with
/// labels, as printed; value).
pub fn scrape(node: &Netns) -> Result<Vec<(String, f64)>, String> {
    let (status, body) = http_get(node, ADMIN, "/metrics")?;
    if status != 200 {
        return Err(format!("/metrics: {status} {body}"));
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// The sum of the samples named `name` whose labels include every `k="v"`
/// of `labels` (0 when there is none), and how many there were.
pub fn metric_sum(samples: &[(String, f64)], name: &str, labels: &[(&str, &str)]) -> (f64, usize) {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, l) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .fold((0.0, 0), |(sum, n), (_, v)| (sum + v, n + 1))
}

/// nginx in `ns` on `addr` with `listen … proxy_protocol` (versions 1 and
/// 2 both accepted), answering every request with what it parsed from the
/// PROXY protocol header, one line:
/// `<client addr> <client port> <server addr> <server port>`. A
/// connection without a valid header is closed by nginx (its error log
/// says why: `<dir>/<label>.error.log`). One process (`master_process
/// off`), so that dropping the child stops it; probed from `probe`.
///
/// # Panics
/// If nginx exits or does not listen within 20 s (with its error log).
pub fn nginx_proxy_protocol(
    ns: &Netns,
    probe: &Netns,
    dir: &Path,
    label: &str,
    addr: SocketAddr,
) -> NsChild {
    let root = dir.join(label);
    std::fs::create_dir_all(&root).expect("creating nginx's directory");
    let error_log = dir.join(format!("{label}.error.log"));
    let listen = match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let r = root.display();
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {r}/nginx.pid;\n\
         error_log {e} info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {r}/body;\n\
           proxy_temp_path {r}/proxy;\n\
           fastcgi_temp_path {r}/fastcgi;\n\
           uwsgi_temp_path {r}/uwsgi;\n\
           scgi_temp_path {r}/scgi;\n\
           server {{\n\
             listen {listen} proxy_protocol;\n\
             location / {{\n\
               default_type text/plain;\n\
               return 200 \"$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port\\n\";\n\
             }}\n\
           }}\n\
         }}\n",
        e = error_log.display(),
    );
    let conf_path = root.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("writing nginx.conf");
    let log = File::create(dir.join(format!("{label}.out"))).expect("creating nginx's output file");
    let log2 = log.try_clone().expect("cloning the log file handle");
    let mut cmd = ns.command("nginx");
    cmd.arg("-p")
        .arg(&root)
        .arg("-e")
        .arg(&error_log)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let mut child = ns.spawn(cmd).expect("spawning nginx");
    let started = poll(SERVER_START_TIMEOUT, Duration::from_millis(50), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status})"));
        }
        probe
            .tcp_connect(addr, Duration::from_secs(1))
            .map(drop)
            .map_err(|e| format!("connect {addr}: {e}"))
    });
    if let Err(last) = started {
        panic!(
            "nginx {label} in {} did not start: {last}; error log:\n{}\noutput:\n{}",
            ns.name(),
            std::fs::read_to_string(&error_log).unwrap_or_default(),
            std::fs::read_to_string(dir.join(format!("{label}.out"))).unwrap_or_default()
        );
    }
    child
}
