//! End-to-end tests of what an operator sees (issue 11): `/metrics` after
//! real traffic, `/healthz` and `/livez` through the proxy's life (before
//! the first sync, after it, while nft refuses rules), and
//! `kube-uproxy status` / `probe` against a running proxy.
//!
//! The release binary runs in the node namespace of a [`Testbed`]; its
//! health and metrics servers bind there (0.0.0.0:10256, 127.0.0.1:10249
//! of that namespace), and every scrape is made from inside it.
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set).

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    VIP_C, bin, connect, hold, manifests, poll, proxy_port_of, read_line, vip, wait_nft_key,
    write_by_rename,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr};

const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
const HEALTHZ: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);

fn svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints)
}

fn ready(i: usize) -> EndpointManifest {
    EndpointManifest::ready(backend_addr(i))
}

// ---------------------------------------------------------------------------
// HTTP from inside the node namespace.

/// `GET path` from `addr` inside `ns`: (status, body).
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let path = path.to_string();
    ns.run(move || -> Result<(u16, String), String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not HTTP: {text:?}"))?;
        assert!(
            !head.to_ascii_lowercase().contains("chunked"),
            "the admin server sends whole bodies: {head}"
        );
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_string()))
    })
    .map_err(|e| e.to_string())?
}

/// Waits until `addr` answers `path` in the node namespace.
fn wait_http(p: &mut ProxyProcess, ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut last = None;
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        p.assert_running("waiting for the admin server");
        match http_get(ns, addr, path) {
            Ok(r) => {
                last = Some(r);
                Ok(())
            }
            Err(e) => Err(e),
        }
    })
    .unwrap_or_else(|e| panic!("{addr}{path} never answered: {e}"));
    last.unwrap_or_default()
}

/// Waits until `path` on the health server answers `status`.
fn wait_health(p: &mut ProxyProcess, ns: &Netns, path: &str, status: u16, why: &str) -> Value {
    let mut body = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        p.assert_running(why);
        match http_get(ns, HEALTHZ, path) {
            Ok((s, b)) if s == status => {
                body = b;
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{why}: {path} never answered {status}; last: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{why}: {path}: {e}: {body}"))
}

/// The scraped metrics: series (name with labels, as printed) → value.
struct Scrape(Vec<(String, f64)>);

impl Scrape {
    fn take(ns: &Netns) -> Scrape {
        let (status, body) = http_get(ns, METRICS, "/metrics").expect("scraping /metrics");
        assert_eq!(status, 200, "{body}");
        Scrape(
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The value of the series named `name` whose labels include every
    /// `k="v"` of `labels`; panics if there is not exactly one.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .0
            .iter()
            .filter(|(series, _)| {
                let (n, l) = series.split_once('{').unwrap_or((series, ""));
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .collect();
        match found.as_slice() {
            [v] => *v,
            _ => panic!(
                "{} series {name}{labels:?} in:\n{}",
                found.len(),
                self.0
                    .iter()
                    .map(|(s, v)| format!("{s} {v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
}

fn port_labels(service: &str) -> Vec<(&str, &str)> {
    vec![
        ("namespace", "default"),
        ("service", service),
        ("port_name", ""),
        ("protocol", "TCP"),
    ]
}

fn with<'a>(
    mut base: Vec<(&'a str, &'a str)>,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    base.extend_from_slice(extra);
    base
}

// ---------------------------------------------------------------------------

#[test]
fn metrics_count_real_traffic() {
    if !lab::require_root_and_nft("metrics_count_real_traffic") {
        return;
    }
    let bed = Testbed::new("ops", "metrics", &[Backend::Whoami, Backend::Whoami]);
    let path = bed.manifests_file();
    // web: two endpoints; refused: an endpoint where nothing listens;
    // empty: no endpoint (refused by the kernel, not by the proxy).
    let refused_ep = EndpointManifest::ready(backend_addr(0));
    let refused = ServiceManifest::new("refused", VIP_B)
        .with_port(PortManifest::tcp(SVC_PORT, 9))
        .with_endpoints(vec![refused_ep]);
    let services = vec![
        svc("web", VIP_A, vec![ready(0), ready(1)]),
        refused.clone(),
        svc("empty", VIP_C, vec![]),
    ];
    fs::write(&path, manifests(&services)).expect("manifests");
    let mut p = bed.run_proxy("kube-uproxy", &path, &["--metrics-per-endpoint"], &[]);
    wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_A,
        true,
        "web programmed",
    );
    wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_B,
        true,
        "refused programmed",
    );
    wait_nft_key(
        &mut p,
        bed.node(),
        "set",
        "no-endpoints",
        VIP_C,
        true,
        "empty programmed",
    );
    wait_http(&mut p, bed.node(), METRICS, "/metrics");
    let before = Scrape::take(bed.node());
    let web = port_labels("web");
    for (series, labels) in [
        ("kubeuproxy_connections_accepted_total", web.clone()),
        ("kubeuproxy_connections_active", web.clone()),
        ("kubeuproxy_connect_retries_total", web.clone()),
    ] {
        assert_eq!(before.get(series, &labels), 0.0, "{series} before traffic");
    }
    assert!(before.get("kubeproxy_sync_proxy_rules_service_changes_total", &[]) >= 3.0);
    assert!(before.get("kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]) >= 2.0);
    assert!(
        before.get(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            &[("ip_family", "IPv4")]
        ) > 1.0e9
    );
    assert!(before.get("kubeproxy_network_programming_duration_seconds_count", &[]) >= 3.0);
    assert!(before.get("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]) >= 1.0);
    // The first sync wrote the table whole; nothing is pending any more.
    assert!(
        before.get(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            &[]
        ) >= 1.0
    );
    for kind in ["service", "endpoint"] {
        assert_eq!(
            before.get(
                &format!("kubeproxy_sync_proxy_rules_{kind}_changes_pending"),
                &[]
            ),
            0.0,
            "{kind} changes pending after the sync"
        );
    }
    let queued_before = before.get(
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        &[("ip_family", "IPv4")],
    );
    assert!(queued_before > 1.0e9, "{queued_before}");
    assert_eq!(
        before.get(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            &[]
        ),
        0.0
    );
    assert_eq!(
        before.get(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("traffic_policy", "internal")]
        ),
        0.0
    );
    assert!(before.get("process_open_fds", &[]) > 0.0);
    assert!(before.get("process_max_fds", &[]) >= before.get("process_open_fds", &[]));

    // Five connections to web, each sending two lines and reading the
    // greeting and both echoes, then closing cleanly.
    let mut sent = 0u64;
    let mut received = 0u64;
    for i in 0..5 {
        let mut s = connect(bed.client(), vip(VIP_A)).expect("connect to web");
        let greeting = read_line(&mut s).expect("greeting");
        received += greeting.len() as u64 + 1;
        for line in [format!("hello {i}"), "x".repeat(100 + i)] {
            s.write_all(format!("{line}\n").as_bytes()).expect("write");
            sent += line.len() as u64 + 1;
            let back = read_line(&mut s).expect("echo");
            assert_eq!(back, line);
            received += back.len() as u64 + 1;
        }
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("EOF from the backend");
        assert!(rest.is_empty());
    }
    // One connection to `refused`: four attempts on its one endpoint, each
    // refused, then the client is reset.
    match hold(bed.client(), vip(VIP_B)) {
        Ok((_, line)) => panic!("refused answered {line:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{e}"
        ),
    }
    // The relays end just after the client sees EOF: wait for them.
    let mut after = Scrape::take(bed.node());
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        after = Scrape::take(bed.node());
        let open = after.get("kubeuproxy_connections_active", &web)
            + after.get("kubeuproxy_connections_active", &port_labels("refused"));
        let failed = after.get(
            "kubeuproxy_connections_failed_total",
            &with(port_labels("refused"), &[("reason", "connect_refused")]),
        );
        if open == 0.0 && failed == 1.0 {
            Ok(())
        } else {
            Err(format!("{open} open, {failed} failed"))
        }
    })
    .expect("every connection ended");

    assert_eq!(
        after.get("kubeuproxy_connections_accepted_total", &web),
        5.0
    );
    assert_eq!(
        after.get(
            "kubeuproxy_relayed_bytes_total",
            &with(web.clone(), &[("direction", "to_endpoint")])
        ),
        sent as f64
    );
    assert_eq!(
        after.get(
            "kubeuproxy_relayed_bytes_total",
            &with(web.clone(), &[("direction", "to_client")])
        ),
        received as f64
    );
    assert_eq!(
        after.get("kubeuproxy_endpoint_connect_duration_seconds_count", &web),
        5.0
    );
    assert_eq!(after.get("kubeuproxy_connect_retries_total", &web), 0.0);
    for reason in [
        "no_endpoints",
        "connect_refused",
        "connect_timeout",
        "unreachable",
        "local_error",
    ] {
        assert_eq!(
            after.get(
                "kubeuproxy_connections_failed_total",
                &with(web.clone(), &[("reason", reason)])
            ),
            0.0,
            "web failed {reason}"
        );
    }
    // Round-robin over two endpoints: 5 connections split 3 + 2.
    let per_endpoint: Vec<f64> = (0..2)
        .map(|i| {
            let ep = format!("{}:{BACKEND_PORT}", backend_addr(i));
            after.get(
                "kubeuproxy_endpoint_connections_total",
                &with(web.clone(), &[("endpoint", ep.as_str())]),
            )
        })
        .collect();
    assert_eq!(per_endpoint.iter().sum::<f64>(), 5.0, "{per_endpoint:?}");
    assert!(per_endpoint.iter().all(|n| *n >= 2.0), "{per_endpoint:?}");

    let refused_labels = port_labels("refused");
    assert_eq!(
        after.get("kubeuproxy_connections_accepted_total", &refused_labels),
        1.0
    );
    assert_eq!(
        after.get("kubeuproxy_connect_retries_total", &refused_labels),
        3.0
    );
    let ep9 = format!("{}:9", backend_addr(0));
    assert_eq!(
        after.get(
            "kubeuproxy_endpoint_connect_failures_total",
            &with(refused_labels.clone(), &[("endpoint", ep9.as_str())])
        ),
        4.0
    );
    // The Service without endpoints: refused by the kernel, never accepted.
    assert!(connect(bed.client(), vip(VIP_C)).is_err());
    let now = Scrape::take(bed.node());
    assert_eq!(
        now.get(
            "kubeuproxy_connections_accepted_total",
            &port_labels("empty")
        ),
        0.0
    );

    // An endpoint change: one more endpoint change, no Service change.
    let services = vec![
        svc("web", VIP_A, vec![ready(0), ready(1)]),
        refused,
        svc("empty", VIP_C, vec![ready(1)]),
    ];
    write_by_rename(&path, &manifests(&services));
    wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_C,
        true,
        "empty got an endpoint",
    );
    // The kernel holds the key as soon as nft commits; the sync's metrics
    // are recorded once `nft` has returned, a moment later.
    let mut changed = Scrape::take(bed.node());
    let programmed = "kubeproxy_network_programming_duration_seconds_count";
    let start = Instant::now();
    while changed.get(programmed, &[]) == after.get(programmed, &[])
        && start.elapsed() < Duration::from_secs(10)
    {
        thread::sleep(Duration::from_millis(50));
        changed = Scrape::take(bed.node());
    }
    let delta = |name: &str| changed.get(name, &[]) - after.get(name, &[]);
    assert_eq!(
        delta("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
        1.0
    );
    assert_eq!(
        delta("kubeproxy_sync_proxy_rules_service_changes_total"),
        0.0
    );
    assert_eq!(
        delta("kubeproxy_network_programming_duration_seconds_count"),
        1.0
    );
    // Applied by a partial sync (one element), queued after the first
    // scrape, nothing left pending.
    assert_eq!(
        delta("kubeproxy_sync_partial_proxy_rules_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        delta("kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
        0.0
    );
    assert!(
        changed.get(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            &[("ip_family", "IPv4")]
        ) > queued_before
    );
    assert_eq!(
        changed.get("kubeproxy_sync_proxy_rules_endpoint_changes_pending", &[]),
        0.0
    );

    let (status, mode) = http_get(bed.node(), METRICS, "/proxyMode").expect("/proxyMode");
    assert_eq!((status, mode.as_str()), (200, "userspace"));
    // UDP flows are registered for every Service port (UDP comes later).
    assert_eq!(changed.get("kubeuproxy_udp_flows_active", &web), 0.0);
    assert_eq!(changed.get("kubeuproxy_udp_flows_expired_total", &web), 0.0);
}

/// A FIFO as the manifests file: the first load blocks until the test
/// writes it, so the proxy runs, with its health server up, before any
/// sync.
fn fifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

#[test]
fn healthz_is_503_before_the_first_sync_and_while_rules_cannot_be_installed() {
    if !lab::require_root_and_nft(
        "healthz_is_503_before_the_first_sync_and_while_rules_cannot_be_installed",
    ) {
        return;
    }
    let bed = Testbed::new("ops", "healthz", &[Backend::Whoami]);
    let yaml = manifests(&[svc("web", VIP_A, vec![ready(0)])]);

    // 1. Before the first sync: the source has not delivered anything.
    let pipe = bed.dir.join("slow.yaml");
    fifo(&pipe);
    // Not `start`: it would show the manifests on failure, and reading a
    // FIFO nobody writes blocks.
    let mut p = ProxyProcess::start_with(
        bed.node(),
        &bed.dir,
        "kube-uproxy",
        "--manifests",
        &pipe,
        &[],
        &[],
    );
    let (status, body) = wait_http(&mut p, bed.node(), HEALTHZ, "/healthz");
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("healthz JSON");
    assert_eq!(v["healthy"], false);
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
    assert!(
        v["currentTime"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    assert!(
        v["reason"].as_str().unwrap_or("").contains("first sync"),
        "{v}"
    );
    let (status, body) = http_get(bed.node(), HEALTHZ, "/livez").expect("/livez");
    assert_eq!(status, 503, "{body}");
    // It stays so while nothing is synced.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        http_get(bed.node(), HEALTHZ, "/healthz").map(|r| r.0),
        Ok(503)
    );
    // The source delivers: the first sync, then 200.
    let writer = {
        let (pipe, yaml) = (pipe.clone(), yaml.clone());
        thread::spawn(move || fs::write(pipe, yaml))
    };
    let v = wait_health(&mut p, bed.node(), "/healthz", 200, "after the first sync");
    writer.join().expect("writer").expect("writing the FIFO");
    assert_eq!(v["healthy"], true);
    for k in ["lastUpdated", "currentTime", "nodeEligible"] {
        assert!(v.get(k).is_some(), "{k}: {v}");
    }
    let v = wait_health(
        &mut p,
        bed.node(),
        "/livez",
        200,
        "livez after the first sync",
    );
    assert!(v.get("nodeEligible").is_none(), "{v}");
    drop(p);

    // 2. nft refuses: no first sync while it does; 200 once it accepts;
    // 503 again while a later change cannot be installed.
    let path = bed.manifests_file();
    fs::write(&path, &yaml).expect("manifests");
    let bin = e2e::failing_nft(&bed.dir);
    let search = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    fs::write(bed.dir.join("fail"), "").expect("fail switch on");
    let mut p = bed.run_proxy("kube-uproxy", &path, &[], &[("PATH", &search)]);
    let deadline = Instant::now() + Duration::from_millis(1500);
    let (status, _) = wait_http(&mut p, bed.node(), HEALTHZ, "/healthz");
    assert_eq!(status, 503);
    while Instant::now() < deadline {
        assert_eq!(
            http_get(bed.node(), HEALTHZ, "/healthz").map(|r| r.0),
            Ok(503)
        );
        thread::sleep(Duration::from_millis(100));
    }
    fs::remove_file(bed.dir.join("fail")).expect("fail switch off");
    wait_health(&mut p, bed.node(), "/healthz", 200, "nft accepts");

    fs::write(bed.dir.join("fail"), "").expect("fail switch on");
    write_by_rename(
        &path,
        &manifests(&[
            svc("web", VIP_A, vec![ready(0)]),
            svc("more", VIP_B, vec![ready(0)]),
        ]),
    );
    let v = wait_health(&mut p, bed.node(), "/healthz", 503, "nft refuses a change");
    assert!(
        v["reason"].as_str().unwrap_or("").contains("install rules"),
        "{v}"
    );
    // kube-proxy reports the last successful sync while unhealthy.
    assert_ne!(v["lastUpdated"], "0001-01-01T00:00:00Z");
    assert_eq!(
        http_get(bed.node(), HEALTHZ, "/livez").map(|r| r.0),
        Ok(503)
    );
    // The old rules still serve the old Service meanwhile.
    assert_eq!(
        e2e::who_or_panic(bed.client(), vip(VIP_A), "web while nft refuses"),
        e2e::backend_name(0)
    );
    let failures = Scrape::take(bed.node()).get(
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        &[],
    );
    assert!(failures >= 1.0, "{failures}");
    fs::remove_file(bed.dir.join("fail")).expect("fail switch off");
    wait_health(&mut p, bed.node(), "/healthz", 200, "nft accepts again");
    wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_B,
        true,
        "more programmed",
    );
}

/// A directory holding an `nft` that waits while `<dir>/hang` exists (at
/// most 60 s, so that nothing outlives a failed test for long), then runs
/// the real one: a sync that takes as long as the test wants.
fn hanging_nft(dir: &Path) -> std::path::PathBuf {
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nft not found");
    let bin = dir.join("hang-bin");
    fs::create_dir_all(&bin).expect("hang-bin");
    let script = format!(
        "#!/bin/sh\ni=0\nwhile [ -e '{}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\nexec {real} \"$@\"\n",
        dir.join("hang").display()
    );
    let nft = bin.join("nft");
    fs::write(&nft, script).expect("writing the hanging nft");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&nft, fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

#[test]
fn healthz_is_503_when_an_update_waits_more_than_twice_the_sync_period() {
    if !lab::require_root_and_nft(
        "healthz_is_503_when_an_update_waits_more_than_twice_the_sync_period",
    ) {
        return;
    }
    // kube-proxy's rule, alone: nft neither fails nor succeeds, it just
    // takes longer than 2 x --sync-period (1 s here) to apply a change.
    let bed = Testbed::new("ops", "stale", &[Backend::Whoami]);
    let path = bed.manifests_file();
    fs::write(&path, manifests(&[svc("web", VIP_A, vec![ready(0)])])).expect("manifests");
    let bin = hanging_nft(&bed.dir);
    let search = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut p = bed.run_proxy(
        "kube-uproxy",
        &path,
        &["--sync-period", "1s"],
        &[("PATH", &search)],
    );
    wait_health(&mut p, bed.node(), "/healthz", 200, "after the first sync");
    /// Lets nft go on when dropped, even if the test fails first.
    struct Hang(std::path::PathBuf);
    impl Drop for Hang {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let hang = Hang(bed.dir.join("hang"));
    fs::write(&hang.0, "").expect("hang switch on");
    write_by_rename(
        &path,
        &manifests(&[
            svc("web", VIP_A, vec![ready(0)]),
            svc("more", VIP_B, vec![ready(0)]),
        ]),
    );
    let v = wait_health(
        &mut p,
        bed.node(),
        "/healthz",
        503,
        "an update stuck in nft",
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("2 x --sync-period"),
        "503 for another reason: {v}"
    );
    assert_eq!(
        Scrape::take(bed.node()).get("kubeproxy_sync_proxy_rules_service_changes_pending", &[]),
        1.0,
        "Service changes pending while the update is stuck"
    );
    drop(hang);
    wait_health(&mut p, bed.node(), "/healthz", 200, "the update applied");
    wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_B,
        true,
        "more programmed",
    );
    assert_eq!(
        Scrape::take(bed.node()).get("kubeproxy_sync_proxy_rules_service_changes_pending", &[]),
        0.0
    );
}

#[test]
fn status_and_probe_talk_to_a_running_proxy() {
    if !lab::require_root_and_nft("status_and_probe_talk_to_a_running_proxy") {
        return;
    }
    let bed = Testbed::new("ops", "status", &[Backend::Whoami, Backend::Whoami]);
    let path = bed.manifests_file();
    let mut not_ready = EndpointManifest::ready(backend_addr(1));
    not_ready.ready = false;
    not_ready.serving = false;
    fs::write(
        &path,
        manifests(&[
            svc("web", VIP_A, vec![ready(0), not_ready]),
            svc("empty", VIP_B, vec![]),
        ]),
    )
    .expect("manifests");
    let socket = bed.dir.join("healthz.sock");
    let socket_arg = format!("--healthz-socket={}", socket.display());
    let mut p = bed.run_proxy(
        "kube-uproxy",
        &path,
        &[&socket_arg, "--lb-algorithm", "least-connections"],
        &[],
    );
    let port = {
        let mut port = None;
        poll(READY_TIMEOUT, Duration::from_millis(50), || {
            p.assert_running("web programmed");
            port = proxy_port_of(bed.node(), VIP_A);
            port.map(|_| ()).ok_or_else(|| "not yet".to_string())
        })
        .expect("web programmed");
        port.unwrap_or_default()
    };
    wait_nft_key(
        &mut p,
        bed.node(),
        "set",
        "no-endpoints",
        VIP_B,
        true,
        "empty programmed",
    );
    wait_health(&mut p, bed.node(), "/healthz", 200, "synced");
    // Two connections held open through web.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| hold(bed.client(), vip(VIP_A)).expect("hold").0)
        .collect();

    let run = |args: &[&str]| {
        let out = bed
            .node()
            .command(bin())
            .args(args)
            .output()
            .expect("running kube-uproxy in the node namespace");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut table = String::new();
    poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let (code, out, err) = run(&["status"]);
        table = out;
        if code == Some(0) && table.contains("2 open") {
            Ok(())
        } else {
            Err(format!("exit {code:?}: {table}{err}"))
        }
    })
    .expect("status shows the open connections");
    eprintln!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("healthy") && lines[0].contains("2 service ports"),
        "{table}"
    );
    assert!(lines[0].contains("proxy address 169.254.42.1"), "{table}");
    let web = lines
        .iter()
        .position(|l| l.starts_with("default/web/TCP"))
        .unwrap_or_else(|| panic!("no web line: {table}"));
    for cell in [
        "10.96.0.10:80",
        &port.to_string(),
        "least-connections",
        "redirect",
        "1/2 usable",
    ] {
        assert!(
            lines[web].contains(cell),
            "{cell:?} not in {:?}",
            lines[web]
        );
    }
    let ep0 = format!("{}:{BACKEND_PORT}", backend_addr(0));
    let ep1 = format!("{}:{BACKEND_PORT}", backend_addr(1));
    let under: Vec<&str> = lines[web + 1..=web + 2].to_vec();
    assert!(
        under
            .iter()
            .any(|l| l.contains(&ep0) && l.contains("ready") && l.contains("2 open")),
        "{table}"
    );
    assert!(
        under
            .iter()
            .any(|l| l.contains(&ep1) && l.contains("not ready")),
        "{table}"
    );
    let empty = lines
        .iter()
        .find(|l| l.starts_with("default/empty/TCP"))
        .unwrap_or_else(|| panic!("no empty line: {table}"));
    assert!(
        empty.contains("reject") && empty.contains("0/0 usable"),
        "{empty}"
    );

    let (code, json, err) = run(&["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&json).expect("status --json");
    let web = v["servicePorts"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["service"] == "web"))
        .expect("web in the JSON");
    assert_eq!(web["proxyPort"], u64::from(port));
    assert_eq!(web["openConnections"], 2);
    assert_eq!(web["ruleApplied"], true);

    // probe: over the pod's own socket, and over TCP.
    let (code, out, err) = run(&["probe", &socket_arg]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("\"healthy\":true"), "{out}");
    let (code, _, err) = run(&["probe", "--livez"]);
    assert_eq!(code, Some(0), "{err}");
    // Nothing serves there: status and probe fail with a message.
    let (code, _, err) = run(&["status", "--metrics-bind-address", "127.0.0.1:1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, _) = run(&["probe", "--healthz-bind-address", "127.0.0.1:1"]);
    assert_eq!(code, Some(1));
    for s in held {
        e2e::close(s);
    }
}
