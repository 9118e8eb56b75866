//! End-to-end tests of the interception and of restarts (docs/rules.md):
//! the release binary in network namespaces, real nftables rules, real
//! sockets.
//!
//! - Pods behind an address-less host veth (the Calico / Cilium shape), pods
//!   on an addressed bridge, another host and the node itself all reach a
//!   ClusterIP, on a node whose only route is its default route.
//! - A Service without endpoints refuses every one of 100 quick connects.
//! - A handover (new instance started beside the old, then SIGTERM to the
//!   old) under a steady connection rate: no connection attempt fails or
//!   hangs, and a 100 MB transfer running across it arrives intact.
//! - An aborted rollout (the new instance took over, then SIGKILL): the old
//!   one takes the rules back within 2 × `--sync-period`, and a Service
//!   added afterwards answers through it; its `/healthz` says 200 while
//!   the new one runs and after the takeback.
//! - SIGTERM keeps the rules and drains; connections still open after the
//!   grace period are reset, not closed; a second signal cuts at once; the
//!   next instance takes the same proxy ports back; `--cleanup` removes
//!   everything.
//! - A Service renamed in the manifests keeps its ClusterIP answering.
//! - `nft flush ruleset` is repaired within one `--sync-period`.
//! - A sync that nft refuses keeps the listeners, and recovers.
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    assert_echo, backend_name, bin, close, connect, hold, manifests, poll, proxy_port_of,
    read_line, vip, who_or_panic, write_by_rename,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr, peers};

fn ep(i: usize) -> EndpointManifest {
    EndpointManifest::ready(backend_addr(i))
}

fn svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints)
}

fn wait_port(proxy: &mut ProxyProcess, node: &Netns, ip: Ipv4Addr, why: &str) -> u16 {
    let mut port = None;
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running(why);
        port = proxy_port_of(node, ip);
        port.map(|_| ())
            .ok_or_else(|| format!("{ip} not in service-ports"))
    })
    .unwrap_or_else(|e| panic!("{why}: {e}"));
    port.unwrap_or_default()
}

/// Waits until the proxy's log contains `needle`.
fn wait_log(proxy: &mut ProxyProcess, needle: &str, why: &str) {
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running(why);
        if proxy.stderr().contains(needle) {
            Ok(())
        } else {
            Err(format!("no {needle:?} in the log yet"))
        }
    })
    .unwrap_or_else(|e| panic!("{why}: {e}"));
}

fn table_exists(node: &Netns) -> bool {
    node.output("nft", ["list", "table", "ip", "kube-uproxy"])
        .is_ok()
}

fn lo_has_proxy_address(node: &Netns) -> bool {
    node.output("ip", ["-o", "addr", "show", "dev", "lo"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("169.254.42.1/32"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// A client opening connections at a steady rate.

/// Outcome of a steady stream of connections.
#[derive(Debug, Default)]
struct LoadReport {
    ok: u64,
    /// Connect or read errors, with the first few.
    failed: u64,
    /// Attempts that took longer than the hang bound.
    hung: u64,
    examples: Vec<String>,
}

/// Opens a connection every `interval` from `ns` to `addr`, reads the whoami
/// greeting and closes, until `stop` is set (at most `limit`). An attempt
/// that fails is a failure; one that takes more than a second is a hang.
fn steady_load(
    ns: Netns,
    addr: SocketAddr,
    interval: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<LoadReport> {
    thread::spawn(move || {
        ns.run(move || {
            let mut r = LoadReport::default();
            let started = Instant::now();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                let t0 = Instant::now();
                let attempt =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let line = read_line(&mut s)?;
                        let _ = s.shutdown(Shutdown::Write);
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest);
                        Ok(line)
                    });
                let took = t0.elapsed();
                match attempt {
                    Ok(line) if line.starts_with("backend") && took < Duration::from_secs(1) => {
                        r.ok += 1
                    }
                    Ok(line) => {
                        r.hung += 1;
                        if r.examples.len() < 5 {
                            r.examples.push(format!("{line:?} after {took:?}"));
                        }
                    }
                    Err(e) => {
                        if took >= Duration::from_secs(1) {
                            r.hung += 1;
                        } else {
                            r.failed += 1;
                        }
                        if r.examples.len() < 5 {
                            r.examples
                                .push(format!("{e} ({:?}) after {took:?}", e.kind()));
                        }
                    }
                }
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
            }
            r
        })
        .expect("running the load in the client namespace")
    })
}

// ---------------------------------------------------------------------------

#[test]
fn pods_behind_addressless_veths_and_bridges_and_the_node_reach_a_cluster_ip() {
    if !lab::require_root_and_nft(
        "pods_behind_addressless_veths_and_bridges_and_the_node_reach_a_cluster_ip",
    ) {
        return;
    }
    let mut bed = Testbed::new("intercept", "calico", &[Backend::Whoami, Backend::Whoami]);
    // A real node's routing: the default route through the uplink, no route
    // for the ClusterIP range.
    bed.lab.route_node_by_default().expect("node default route");
    let pod = bed
        .lab
        .add_routed_pod("calico", Ipv4Addr::new(10, 200, 2, 5))
        .expect("adding a Calico-shaped pod");
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc("web", VIP_A, vec![ep(0)])]), &[]);
    wait_port(&mut proxy, bed.node(), VIP_A, "service programmed");

    let bridge_pod = bed.lab.backends()[1].clone();
    for (ns, what) in [
        (
            pod.clone(),
            "pod behind an address-less veth (cali0, proxy ARP)",
        ),
        (bridge_pod, "pod on the addressed bridge"),
        (bed.client().clone(), "host on the uplink"),
        (bed.node().clone(), "the node itself"),
    ] {
        let (mut s, name) =
            hold(&ns, vip(VIP_A)).unwrap_or_else(|e| panic!("{what} -> {VIP_A}:80: {e}"));
        assert_eq!(name, backend_name(0), "{what}");
        assert_echo(&mut s, "hello", what);
        close(s);
    }
    // The address-less veth really has no IPv4 address (else the old
    // `redirect` would have worked too).
    let cali = bed
        .node()
        .output("ip", ["-4", "-o", "addr", "show", "dev", "cali0"])
        .expect("ip addr show cali0");
    assert!(
        cali.stdout.is_empty(),
        "cali0 has an address: {:?}",
        cali.stdout
    );
}

#[test]
fn a_service_without_endpoints_refuses_100_quick_connects() {
    if !lab::require_root_and_nft("a_service_without_endpoints_refuses_100_quick_connects") {
        return;
    }
    let bed = Testbed::new("intercept", "refuse", &[]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc("empty", VIP_A, vec![])]), &[]);
    e2e::wait_nft_key(
        &mut proxy,
        bed.node(),
        "set",
        "no-endpoints",
        VIP_A,
        true,
        "no-endpoints",
    );

    for (ns, who) in [
        (bed.client().clone(), "client"),
        (bed.node().clone(), "node"),
    ] {
        let outcomes = ns
            .run(|| {
                (0..100)
                    .map(|_| {
                        let t0 = Instant::now();
                        let r = TcpStream::connect_timeout(&vip(VIP_A), Duration::from_secs(2));
                        (r.map(|_| ()).map_err(|e| e.kind()), t0.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
            .expect("connecting from the namespace");
        let refused = outcomes
            .iter()
            .filter(|(r, took)| {
                *r == Err(io::ErrorKind::ConnectionRefused) && *took < Duration::from_millis(500)
            })
            .count();
        let other: Vec<_> = outcomes
            .iter()
            .filter(|(r, _)| *r != Err(io::ErrorKind::ConnectionRefused))
            .take(3)
            .collect();
        assert_eq!(
            refused, 100,
            "{who}: of 100 quick connects {refused} were refused at once; others: {other:?}"
        );
    }
}

/// Sends `total` bytes paced over about `duration` to the sha256 service
/// and returns (digest sent, digest the backend computed).
fn paced_transfer(
    ns: Netns,
    addr: SocketAddr,
    total: usize,
    duration: Duration,
) -> thread::JoinHandle<io::Result<(String, String)>> {
    thread::spawn(move || {
        ns.run(move || -> io::Result<(String, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.set_write_timeout(Some(Duration::from_secs(60)))?;
            let chunk = 1024 * 1024;
            let pause = duration / (total / chunk) as u32;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; chunk];
            let mut sent = 0usize;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while sent < total {
                for b in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                let n = chunk.min(total - sent);
                hasher.update(&buf[..n]);
                s.write_all(&buf[..n])?;
                sent += n;
                thread::sleep(pause);
            }
            s.shutdown(Shutdown::Write)?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok((peers::hex(&hasher.finalize()), reply.trim().to_string()))
        })
        .map_err(io::Error::other)?
    })
}

#[test]
fn handover_under_steady_load_loses_no_connection_and_no_byte() {
    if !lab::require_root_and_nft("handover_under_steady_load_loses_no_connection_and_no_byte") {
        return;
    }
    let bed = Testbed::new("intercept", "handover", &[Backend::Whoami, Backend::Sha256]);
    let path = bed.manifests_file();
    fs::write(
        &path,
        manifests(&[
            svc("web", VIP_A, vec![ep(0)]),
            svc("sha", VIP_B, vec![ep(1)]),
        ]),
    )
    .expect("manifests");
    let mut old = bed.run_proxy("old", &path, &["--shutdown-grace", "60s"], &[]);
    let port_a = wait_port(&mut old, bed.node(), VIP_A, "old instance programmed web");
    let port_b = wait_port(&mut old, bed.node(), VIP_B, "old instance programmed sha");

    let stop = Arc::new(AtomicBool::new(false));
    // 2 clients, one connection every 4 ms each: about 500 per second.
    let loads: Vec<_> = (0..2)
        .map(|_| {
            steady_load(
                bed.client().clone(),
                vip(VIP_A),
                Duration::from_millis(4),
                Duration::from_secs(60),
                Arc::clone(&stop),
            )
        })
        .collect();
    let transfer = paced_transfer(
        bed.client().clone(),
        vip(VIP_B),
        100 * 1024 * 1024,
        Duration::from_secs(5),
    );
    thread::sleep(Duration::from_millis(500));

    // The new instance binds the same ports beside the old one...
    let mut new = bed.run_proxy("new", &path, &[], &[]);
    wait_log(&mut new, "rules synced", "new instance synced");
    assert!(
        new.stderr().contains("taking its proxy ports back"),
        "the new instance did not adopt the old table"
    );
    thread::sleep(Duration::from_millis(300));
    // ...and the old one stops accepting and drains.
    old.child
        .signal(Signal::SIGTERM)
        .expect("SIGTERM to the old instance");
    let status = old
        .child
        .wait_timeout(Duration::from_secs(60))
        .expect("waiting for the old instance")
        .expect("the old instance did not exit within its grace period");
    assert!(status.success(), "old instance exit status {status}");
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    new.assert_running("after the handover");

    let (sent, received) = transfer
        .join()
        .expect("transfer thread")
        .expect("the 100 MB transfer across the handover failed");
    assert_eq!(sent, received, "100 MB transfer: digest mismatch");
    let mut total = LoadReport::default();
    for l in loads {
        let r = l.join().expect("load thread");
        total.ok += r.ok;
        total.failed += r.failed;
        total.hung += r.hung;
        total.examples.extend(r.examples);
    }
    eprintln!("handover under load: {total:?}");
    assert!(total.ok > 500, "too few connections made: {total:?}");
    assert_eq!(
        (total.failed, total.hung),
        (0, 0),
        "connections failed or hung across the handover: {total:?}"
    );
    // Unchanged Services saw no rule change: same proxy ports.
    assert_eq!(proxy_port_of(bed.node(), VIP_A), Some(port_a));
    assert_eq!(proxy_port_of(bed.node(), VIP_B), Some(port_b));
    assert!(
        old.stderr()
            .contains("listeners closed; waiting for open connections"),
        "the old instance did not drain"
    );
}

/// GET `path` on the proxy's `--healthz-socket`: the HTTP status.
fn healthz_status(socket: &std::path::Path) -> Result<u16, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    body.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {body:?}"))
}

/// Issue 19: instance A serving, B started beside it and taking the rules
/// over (a rolling update), then B killed with SIGKILL (a crash loop, the
/// OOM killer, an aborted rollout). A is the only instance left: it must
/// write the rules again, or no later change ever reaches the kernel.
#[test]
fn after_an_aborted_rollout_the_old_instance_takes_the_rules_back() {
    if !lab::require_root_and_nft("after_an_aborted_rollout_the_old_instance_takes_the_rules_back")
    {
        return;
    }
    const SYNC_PERIOD: Duration = Duration::from_secs(2);
    let bed = Testbed::new("intercept", "abort", &[Backend::Whoami]);
    let path = bed.manifests_file();
    let dir = path
        .parent()
        .expect("the testbed's directory")
        .to_path_buf();
    fs::write(&path, manifests(&[svc("web", VIP_A, vec![ep(0)])])).expect("manifests");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let flags = |sock: &std::path::Path| {
        vec![
            "--sync-period".to_string(),
            "2s".to_string(),
            "--healthz-socket".to_string(),
            sock.display().to_string(),
        ]
    };
    let (fa, fb) = (flags(&sock_a), flags(&sock_b));
    let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
    let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
    let mut a = bed.run_proxy("a", &path, &fa, &[]);
    wait_port(&mut a, bed.node(), VIP_A, "A programmed web");

    let mut b = bed.run_proxy("b", &path, &fb, &[]);
    wait_log(&mut b, "rules synced", "B synced");
    // A notices at its next check and leaves the rules to B.
    wait_log(&mut a, "leaving them to it", "A saw B take the rules over");
    assert_eq!(
        healthz_status(&sock_a),
        Ok(200),
        "A's /healthz while B runs: a handover in progress is healthy"
    );

    b.child.signal(Signal::SIGKILL).expect("SIGKILL to B");
    b.child
        .wait_timeout(Duration::from_secs(10))
        .expect("waiting for B")
        .expect("B did not die of SIGKILL");
    let killed = Instant::now();
    write_by_rename(
        &path,
        &manifests(&[
            svc("web", VIP_A, vec![ep(0)]),
            svc("late", VIP_B, vec![ep(0)]),
        ]),
    );
    // Bounded: 2 × --sync-period, plus a second for the manifests to be
    // read and the connection to be made.
    let bound = 2 * SYNC_PERIOD + Duration::from_secs(1);
    let answered = poll(bound, Duration::from_millis(100), || {
        a.assert_running("after B was killed");
        match hold(bed.client(), vip(VIP_B)) {
            Ok((s, name)) if name == backend_name(0) => {
                close(s);
                Ok(())
            }
            other => Err(format!("{:?}", other.map(|(_, n)| n))),
        }
    });
    eprintln!("late answered {:?} after B was killed", killed.elapsed());
    answered.unwrap_or_else(|e| {
        panic!("a Service added after B was killed did not answer through A within {bound:?}: {e}")
    });
    assert!(
        a.stderr().contains("taking them back"),
        "A did not log taking the rules back"
    );
    let listing = bed
        .node()
        .output("nft", ["list", "set", "ip", "kube-uproxy", "instance"])
        .expect("nft list set instance");
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(
        listing.contains("alive=@kube-uproxy/instance/"),
        "the table names its writer's marker: {listing}"
    );
    assert_eq!(
        healthz_status(&sock_a),
        Ok(200),
        "A's /healthz after it took the rules back"
    );
    let (s, name) = hold(bed.client(), vip(VIP_A)).expect("web after the takeback");
    assert_eq!(name, backend_name(0));
    close(s);
}

#[test]
fn sigterm_keeps_the_rules_resets_what_outlives_the_grace_and_cleanup_removes_everything() {
    if !lab::require_root_and_nft(
        "sigterm_keeps_the_rules_resets_what_outlives_the_grace_and_cleanup_removes_everything",
    ) {
        return;
    }
    let bed = Testbed::new("intercept", "sigterm", &[Backend::Whoami]);
    let path = bed.manifests_file();
    fs::write(&path, manifests(&[svc("web", VIP_A, vec![ep(0)])])).expect("manifests");
    let migrate_req = |node: &Netns| {
        let out = node
            .output("sysctl", ["-n", "net.ipv4.tcp_migrate_req"])
            .expect("sysctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(migrate_req(bed.node()), "0", "a fresh namespace's default");

    // 1. Grace of 1 s: an idle connection still open after it is reset.
    let mut p = bed.run_proxy("first", &path, &["--shutdown-grace", "1s"], &[]);
    let port = wait_port(&mut p, bed.node(), VIP_A, "programmed");
    assert_eq!(
        migrate_req(bed.node()),
        "1",
        "the handover sysctl while the proxy runs"
    );
    let (mut held, _) = hold(bed.client(), vip(VIP_A)).expect("holding a connection");
    p.child.signal(Signal::SIGTERM).expect("SIGTERM");
    // Draining: the held connection still works...
    thread::sleep(Duration::from_millis(300));
    assert_echo(&mut held, "still-here", "a connection during the drain");
    // ...and a new one is refused at once (no listener), not left hanging.
    match connect(bed.client(), vip(VIP_A)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("a new connection during the drain: {other:?}"),
    }
    let status = p
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("wait")
        .expect("not exited 15 s after SIGTERM with a 1 s grace");
    assert!(status.success(), "exit status {status}");
    let mut b = [0u8; 8];
    match read_past_signals(&mut held, &mut b) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a connection cut after the grace read Ok({n}): FIN instead of RST"),
    }
    assert!(
        table_exists(bed.node()),
        "the rules were removed on SIGTERM"
    );
    assert!(lo_has_proxy_address(bed.node()));
    assert!(
        p.stderr().contains("reset"),
        "no log line about the reset connections"
    );

    // 2. The next instance takes the same proxy port back; a second signal
    // ends the drain at once.
    let mut p = bed.run_proxy("second", &path, &["--shutdown-grace", "60s"], &[]);
    wait_log(&mut p, "rules synced", "second instance synced");
    assert_eq!(
        proxy_port_of(bed.node(), VIP_A),
        Some(port),
        "port not taken back"
    );
    let (mut held, _) = hold(bed.client(), vip(VIP_A)).expect("holding a connection");
    p.child.signal(Signal::SIGTERM).expect("SIGTERM");
    thread::sleep(Duration::from_millis(300));
    assert_echo(&mut held, "draining", "a connection during the drain");
    let t0 = Instant::now();
    p.child.signal(Signal::SIGINT).expect("second signal");
    let status = p
        .child
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("not exited after a second signal");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "second signal took {:?}",
        t0.elapsed()
    );
    assert!(status.success(), "exit status {status}");
    match read_past_signals(&mut held, &mut b) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a connection cut by the second signal read Ok({n})"),
    }

    // 3. --cleanup removes the table and the address, restores the sysctl
    // to what it was before the first instance, and is idempotent.
    for round in ["after a run", "with nothing left"] {
        let out = bed
            .node()
            .output(bin(), ["--cleanup"])
            .unwrap_or_else(|e| panic!("--cleanup {round}: {e}"));
        assert!(out.status.success());
        assert!(!table_exists(bed.node()), "--cleanup {round}: table left");
        assert!(
            !lo_has_proxy_address(bed.node()),
            "--cleanup {round}: 169.254.42.1 left on lo"
        );
        assert_eq!(
            migrate_req(bed.node()),
            "0",
            "--cleanup {round}: net.ipv4.tcp_migrate_req not restored"
        );
    }
}

/// `--cleanup` on a node where kube-uproxy never ran (a rollback script
/// run on every node, or twice): it succeeds and says nothing failed,
/// although no table, address or policy route (preserve-client-ip's
/// routing table was never made) is there to remove.
#[test]
fn cleanup_on_a_node_where_the_proxy_never_ran_succeeds() {
    if !lab::require_root_and_nft("cleanup_on_a_node_where_the_proxy_never_ran_succeeds") {
        return;
    }
    let bed = Testbed::new("intercept", "cleanup-fresh", &[]);
    let out = bed
        .node()
        .output(bin(), ["--cleanup"])
        .expect("running --cleanup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("ERROR"),
        "--cleanup on a fresh node: exit {}, stderr:\n{stderr}",
        out.status
    );
    assert!(!table_exists(bed.node()));
    assert!(!lo_has_proxy_address(bed.node()));
}

#[test]
fn a_service_renamed_in_the_manifests_keeps_its_cluster_ip_answering() {
    if !lab::require_root_and_nft(
        "a_service_renamed_in_the_manifests_keeps_its_cluster_ip_answering",
    ) {
        return;
    }
    let bed = Testbed::new("intercept", "rename", &[Backend::Whoami]);
    let (mut p, path) = bed.start_proxy(&manifests(&[svc("web-b", VIP_A, vec![ep(0)])]), &[]);
    let before = wait_port(&mut p, bed.node(), VIP_A, "programmed");
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(
        bed.client().clone(),
        vip(VIP_A),
        Duration::from_millis(5),
        Duration::from_secs(30),
        Arc::clone(&stop),
    );
    thread::sleep(Duration::from_millis(300));
    // "web-a" sorts before "web-b": the new name is reconciled first.
    write_by_rename(&path, &manifests(&[svc("web-a", VIP_A, vec![ep(0)])]));
    poll(
        READY_TIMEOUT,
        Duration::from_millis(50),
        || match proxy_port_of(bed.node(), VIP_A) {
            Some(port) if port != before => Ok(()),
            other => Err(format!("map holds {other:?}")),
        },
    )
    .expect("the ClusterIP moved to the renamed Service's listener");
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let r = load.join().expect("load");
    assert!(r.ok > 100, "{r:?}");
    assert_eq!((r.failed, r.hung), (0, 0), "across the rename: {r:?}");
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_A), "after the rename"),
        backend_name(0)
    );
}

#[test]
fn a_flushed_ruleset_is_restored_within_a_sync_period() {
    if !lab::require_root_and_nft("a_flushed_ruleset_is_restored_within_a_sync_period") {
        return;
    }
    let bed = Testbed::new("intercept", "flush", &[Backend::Whoami]);
    let (mut p, _) = bed.start_proxy(
        &manifests(&[svc("web", VIP_A, vec![ep(0)])]),
        &["--sync-period", "1s"],
    );
    let port = wait_port(&mut p, bed.node(), VIP_A, "programmed");
    bed.node()
        .output("nft", ["flush", "ruleset"])
        .expect("nft flush ruleset");
    assert!(!table_exists(bed.node()));
    let t0 = Instant::now();
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        p.assert_running("after the flush");
        match hold(bed.client(), vip(VIP_A)) {
            Ok((s, name)) if name == backend_name(0) => {
                close(s);
                Ok(())
            }
            other => Err(format!("{:?}", other.map(|(_, n)| n))),
        }
    })
    .expect("the Service answers again after a flush");
    eprintln!("answering again {:?} after the flush", t0.elapsed());
    assert_eq!(proxy_port_of(bed.node(), VIP_A), Some(port));
    assert!(
        p.stderr().contains("the table is gone"),
        "the repair was not logged with its reason"
    );
}

#[test]
fn a_refused_sync_keeps_the_listeners_and_recovers() {
    if !lab::require_root_and_nft("a_refused_sync_keeps_the_listeners_and_recovers") {
        return;
    }
    let bed = Testbed::new("intercept", "refused", &[Backend::Whoami, Backend::Whoami]);
    let path = bed.manifests_file();
    fs::write(
        &path,
        manifests(&[svc("a", VIP_A, vec![ep(0)]), svc("b", VIP_B, vec![ep(1)])]),
    )
    .expect("manifests");
    let bin = e2e::failing_nft(&bed.dir);
    let search = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut p = bed.run_proxy("kube-uproxy", &path, &[], &[("PATH", &search)]);
    wait_port(&mut p, bed.node(), VIP_A, "a programmed");
    let port_b = wait_port(&mut p, bed.node(), VIP_B, "b programmed");

    fs::write(bed.dir.join("fail"), "").expect("fail switch");
    write_by_rename(&path, &manifests(&[svc("a", VIP_A, vec![ep(0)])]));
    wait_log(&mut p, "simulated refusal", "nft's own words in the log");
    // The kernel still sends b's ClusterIP to its port: the listener stays.
    assert_eq!(proxy_port_of(bed.node(), VIP_B), Some(port_b));
    for _ in 0..3 {
        assert_eq!(
            who_or_panic(bed.client(), vip(VIP_B), "b while sync fails"),
            backend_name(1)
        );
        assert_eq!(
            who_or_panic(bed.client(), vip(VIP_A), "a while sync fails"),
            backend_name(0)
        );
        thread::sleep(Duration::from_millis(300));
    }
    fs::remove_file(bed.dir.join("fail")).expect("fail switch off");
    e2e::wait_nft_key(
        &mut p,
        bed.node(),
        "map",
        "service-ports",
        VIP_B,
        false,
        "b removed after recovery",
    );
    assert_eq!(
        who_or_panic(bed.client(), vip(VIP_A), "a after recovery"),
        backend_name(0)
    );
}

/// `read`, again after a signal to the test process cut it short (a read
/// with a timeout is never restarted).
fn read_past_signals(s: &mut std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
