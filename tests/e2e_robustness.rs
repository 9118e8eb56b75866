//! End-to-end robustness of the `kube-uproxy` binary: what happens around
//! the happy path. Each test builds its own namespace lab (see
//! tests/lab/src/e2e.rs) and runs the release binary with `--manifests`.
//!
//! - a table left by an earlier run is replaced at start;
//! - a refused or unreachable endpoint is skipped: the connection lands on
//!   the next endpoint;
//! - no socket or pipe is leaked whatever way connections end, bulk ones
//!   included (fd and pipe counts back to their baselines, no CLOSE-WAIT
//!   on the node);
//! - invalid objects and unparsable files are skipped, the rest keeps working;
//! - proxy ports cannot be reached directly, only through the redirect;
//! - a flood of idle connections on the side doors (a health-check node
//!   port, /healthz) is capped and timed out: fds bounded, Services served.
//!
//! Need root and `nft`: without them they print `SKIP …` (fail if `CI` is set).

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, VIP_A, VIP_B,
    VIP_C, close, connect, hold, http_get, poll, read_line, vip, wait_nft_key, who_or_panic,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, list_yaml};
use uproxy_lab::{self as lab, Netns, backend_addr};

const MAP: &str = "service-ports";

fn service(name: &str, ip: Ipv4Addr, endpoints: Vec<Ipv4Addr>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints.into_iter().map(EndpointManifest::ready).collect())
}

/// A testbed with the proxy running on `yaml`.
struct Run {
    proxy: ProxyProcess,
    manifests: PathBuf,
    bed: Testbed,
}

impl Run {
    fn start(tag: &str, backends: &[Backend], yaml: &str) -> Run {
        let bed = Testbed::new("robust", tag, backends);
        let manifests = bed.manifests_file();
        fs::write(&manifests, yaml).expect("writing the manifests file");
        Run::start_on(bed, manifests)
    }

    fn start_on(bed: Testbed, manifests: PathBuf) -> Run {
        Run::start_on_with(bed, manifests, &[])
    }

    /// Like [`Run::start`], with more flags for the proxy.
    fn start_with(tag: &str, backends: &[Backend], yaml: &str, flags: &[&str]) -> Run {
        let bed = Testbed::new("robust", tag, backends);
        let manifests = bed.manifests_file();
        fs::write(&manifests, yaml).expect("writing the manifests file");
        Run::start_on_with(bed, manifests, flags)
    }

    fn start_on_with(bed: Testbed, manifests: PathBuf, flags: &[&str]) -> Run {
        let proxy = bed.run_proxy("kube-uproxy", &manifests, flags, &[]);
        Run {
            proxy,
            manifests,
            bed,
        }
    }

    fn wait_in_map(&mut self, ip: Ipv4Addr, present: bool, why: &str) {
        wait_nft_key(
            &mut self.proxy,
            self.bed.node(),
            "map",
            MAP,
            ip,
            present,
            why,
        );
    }

    fn pid(&self) -> u32 {
        self.proxy.child.id()
    }
}

/// The proxy port the map sends `ip:80/tcp` to.
fn proxy_port_of(node: &Netns, ip: Ipv4Addr) -> u16 {
    e2e::proxy_port_of(node, ip).unwrap_or_else(|| panic!("{ip}:80 not in the map"))
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("reading the proxy's fd directory")
}

/// The proxy's fds that are pipes (both ends count).
fn open_pipes(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the proxy's fd directory")
        .flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")))
        .count()
}

/// A payload that differs from connection to connection.
fn payload(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

#[test]
fn a_table_left_by_an_earlier_run_is_replaced_at_start() {
    if !lab::require_root_and_nft("a_table_left_by_an_earlier_run_is_replaced_at_start") {
        return;
    }
    let bed = Testbed::new("robust", "stale", &[Backend::Whoami]);
    // What a killed earlier run could have left: a stale element pointing
    // at a port nobody listens on, and a chain we no longer have.
    let stale = "table ip kube-uproxy {\n\
        map service-ports { type ipv4_addr . inet_proto . inet_service : inet_service; \
        elements = { 10.96.9.9 . tcp . 80 : 1, 10.96.0.10 . tcp . 80 : 2 } }\n\
        chain leftover { type filter hook input priority 0; tcp dport 9 drop; }\n}\n";
    let stale_file = bed.dir.join("stale.nft");
    fs::write(&stale_file, stale).expect("writing the stale ruleset");
    bed.node()
        .output("nft", ["-f", stale_file.to_str().expect("utf-8 path")])
        .expect("loading the stale table");

    let manifests = bed.manifests_file();
    fs::write(
        &manifests,
        list_yaml(&[service("web", VIP_A, vec![backend_addr(0)])]),
    )
    .expect("writing manifests");
    let mut run = Run::start_on(bed, manifests);
    run.wait_in_map(VIP_A, true, "the proxy programs its Service");
    run.wait_in_map(
        Ipv4Addr::new(10, 96, 9, 9),
        false,
        "the stale element is gone",
    );
    assert_ne!(
        proxy_port_of(run.bed.node(), VIP_A),
        2,
        "the stale proxy port survived"
    );
    // `output` fails on a non-zero exit: listing a chain that is gone.
    let chain = run
        .bed
        .node()
        .output("nft", ["list", "chain", "ip", "kube-uproxy", "leftover"]);
    assert!(chain.is_err(), "the stale chain survived: {chain:?}");
    assert_eq!(
        who_or_panic(run.bed.client(), vip(VIP_A), "after the replacement"),
        "backend0"
    );
}

#[test]
fn refused_and_unreachable_endpoints_fail_over_to_the_next() {
    if !lab::require_root_and_nft("refused_and_unreachable_endpoints_fail_over_to_the_next") {
        return;
    }
    // backend0 has no server (refuses); 10.200.1.200 is no host at all
    // (the connect times out); backend1 answers.
    let unreachable = Ipv4Addr::new(10, 200, 1, 200);
    let mut run = Run::start(
        "failover",
        &[Backend::Whoami, Backend::Whoami],
        &list_yaml(&[service(
            "web",
            VIP_A,
            vec![backend_addr(0), unreachable, backend_addr(1)],
        )]),
    );
    drop(run.bed.servers.remove(0));
    run.wait_in_map(VIP_A, true, "the Service is programmed");
    for i in 0..6 {
        let who = who_or_panic(run.bed.client(), vip(VIP_A), &format!("connection {i}"));
        assert_eq!(who, "backend1", "connection {i} did not fail over");
    }
    let log = run.proxy.stderr();
    assert!(
        log.contains("connect to endpoint failed") && log.contains("10.200.1.10:8080"),
        "no log line for the refused endpoint"
    );
    assert!(
        log.contains("connect to endpoint timed out") && log.contains("10.200.1.200:8080"),
        "no log line for the unreachable endpoint"
    );
}

#[test]
fn no_socket_is_leaked_however_connections_end() {
    if !lab::require_root_and_nft("no_socket_is_leaked_however_connections_end") {
        return;
    }
    let mut run = Run::start(
        "leaks",
        &[Backend::Whoami, Backend::Sha256],
        &list_yaml(&[
            service("who", VIP_A, vec![backend_addr(0)]),
            service("sum", VIP_B, vec![backend_addr(1)]),
        ]),
    );
    run.wait_in_map(VIP_A, true, "who is programmed");
    run.wait_in_map(VIP_B, true, "sum is programmed");
    let client = run.bed.client();
    let pid = run.pid();
    // Warm up (runtime threads), then take the baseline.
    who_or_panic(client, vip(VIP_A), "warm-up");
    std::thread::sleep(Duration::from_millis(300));
    let baseline = open_fds(pid);
    let baseline_pipes = open_pipes(pid);
    // Bulk transfers splice through pipes: the most seen at once.
    let mut most_pipes = 0;

    for i in 0..40 {
        // 1. The client closes after the greeting (the proxy sees EOF
        //    first from the client side).
        let mut s = connect(client, vip(VIP_A)).expect("connect who");
        read_line(&mut s).expect("greeting");
        drop(s);
        // 2. The client resets the connection (SO_LINGER 0).
        let s = connect(client, vip(VIP_A)).expect("connect who");
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
        // 3. Half-close: the client sends, shuts down its write side, the
        //    server answers and closes first.
        let mut s = connect(client, vip(VIP_B)).expect("connect sum");
        s.write_all(format!("payload {i}").as_bytes())
            .expect("send");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("digest");
        assert_eq!(answer.trim().len(), 64, "sha256 answer {answer:?}");
        // 4. The client half-closes without sending anything and then
        //    goes away without reading.
        let s = connect(client, vip(VIP_A)).expect("connect who");
        s.shutdown(Shutdown::Write).expect("half-close");
        drop(s);
        // 5. A bulk upload (the client's direction splices), checked by
        //    its digest.
        let upload = payload(2 * 1024 * 1024 + i, i);
        let mut s = connect(client, vip(VIP_B)).expect("connect sum");
        s.write_all(&upload).expect("upload");
        most_pipes = most_pipes.max(open_pipes(pid));
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("digest");
        assert_eq!(
            answer.trim(),
            uproxy_lab::peers::hex(&Sha256::digest(&upload)),
            "upload {i} corrupted"
        );
        // 6. Bulk both ways (echo), then a clean close.
        let mut s = connect(client, vip(VIP_A)).expect("connect who");
        read_line(&mut s).expect("greeting");
        let sent = payload(1024 * 1024, i);
        let mut back = vec![0u8; sent.len()];
        let mut reader = s.try_clone().expect("clone");
        std::thread::scope(|scope| {
            let r = scope.spawn(|| reader.read_exact(&mut back));
            s.write_all(&sent).expect("bulk send");
            most_pipes = most_pipes.max(open_pipes(pid));
            r.join().expect("reader").expect("echo read");
        });
        assert!(back == sent, "echo {i} corrupted");
        close(s);
        // 7. The client resets in the middle of a bulk echo.
        let mut s = connect(client, vip(VIP_A)).expect("connect who");
        read_line(&mut s).expect("greeting");
        s.write_all(&sent[..512 * 1024]).expect("bulk send");
        let mut some = vec![0u8; 64 * 1024];
        s.read_exact(&mut some).expect("part of the echo");
        most_pipes = most_pipes.max(open_pipes(pid));
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
    }
    assert!(
        most_pipes > baseline_pipes,
        "the bulk transfers never made the proxy create a pipe: the test misses the splice path"
    );

    let node = run.bed.node();
    let settled = poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let now = open_fds(pid);
        let pipes = open_pipes(pid);
        let close_wait = node
            .output("ss", ["-Htn", "state", "close-wait"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| e.to_string());
        // Sockets back to the baseline. Pipes may stay, idle in the
        // process's pool (--splice-pipes-max) for the next bulk phase:
        // these connections run one at a time, two directions each, so
        // the pool needs a few pipes (two fds each); 8 pipes is ample,
        // and a pipe leaked per connection would be hundreds.
        let sockets_now = now.saturating_sub(pipes);
        let sockets_before = baseline.saturating_sub(baseline_pipes);
        if sockets_now <= sockets_before && pipes <= baseline_pipes + 2 * 8 && close_wait.is_empty()
        {
            Ok(())
        } else {
            Err(format!(
                "proxy fds {now} (baseline {baseline}), pipe fds {pipes} (baseline \
                 {baseline_pipes}, at most {most_pipes} during the run); CLOSE-WAIT: {close_wait:?}"
            ))
        }
    });
    if let Err(last) = settled {
        panic!("sockets or pipes leaked after 280 connections: {last}");
    }
}

/// Makes `ns` drop every packet in and out, as a host that vanished
/// (power cut, network partition): no FIN, no RST.
fn vanish(ns: &Netns, dir: &std::path::Path) {
    let rules = "table inet vanish {\n\
        chain in { type filter hook input priority -400; policy drop; }\n\
        chain out { type filter hook output priority -400; policy drop; }\n}\n";
    let file = dir.join(format!("vanish-{}.nft", ns.name()));
    fs::write(&file, rules).expect("writing the drop rules");
    ns.output("nft", ["-f", file.to_str().expect("utf-8 path")])
        .expect("loading the drop rules");
}

/// Waits (at most `within`) for `s` to be closed or reset by the proxy.
fn assert_released(s: &mut std::net::TcpStream, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    let mut b = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        match s.read(&mut b) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            // A signal cut the wait short (a read with a timeout is never
            // restarted): wait for the rest.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !left.is_zero() => {}
            Ok(n) => panic!("{what}: read {n} unexpected bytes"),
            Err(e) => panic!("{what}: still connected after {within:?} ({e})"),
        }
    }
}

#[test]
fn a_connection_whose_peer_vanished_without_a_fin_is_released() {
    if !lab::require_root_and_nft("a_connection_whose_peer_vanished_without_a_fin_is_released") {
        return;
    }
    // Keepalive after 1 s idle, every 1 s, 2 probes: a silent peer is
    // found within about 3 s; TCP_USER_TIMEOUT (derived: 3 s) finds one
    // while data is in flight, where keepalive does not probe.
    let mut run = Run::start_with(
        "vanish",
        &[Backend::Whoami, Backend::Whoami],
        &list_yaml(&[
            service("one", VIP_A, vec![backend_addr(0)]),
            service("two", VIP_B, vec![backend_addr(1)]),
        ]),
        &[
            "--tcp-keepalive-time",
            "1s",
            "--tcp-keepalive-interval",
            "1s",
            "--tcp-keepalive-count",
            "2",
        ],
    );
    run.wait_in_map(VIP_A, true, "one is programmed");
    run.wait_in_map(VIP_B, true, "two is programmed");
    let client = run.bed.client();
    let within = Duration::from_secs(12);

    // The endpoint vanishes under an idle connection and a busy one.
    let (mut idle, name) = hold(client, vip(VIP_A)).expect("idle connection");
    assert_eq!(name, "backend0");
    let (mut busy, _) = hold(client, vip(VIP_A)).expect("busy connection");
    vanish(&run.bed.lab.backends()[0], &run.bed.dir);
    busy.write_all(b"anyone there?\n").expect("send");
    assert_released(&mut idle, within, "idle connection to a vanished endpoint");
    assert_released(&mut busy, within, "busy connection to a vanished endpoint");

    // The client vanishes: the proxy must let go of the endpoint's side.
    let (held, name) = hold(client, vip(VIP_B)).expect("connection to two");
    assert_eq!(name, "backend1");
    assert!(run.bed.servers[1].wait_open(1, READY_TIMEOUT));
    vanish(client, &run.bed.dir);
    assert!(
        run.bed.servers[1].wait_open(0, within),
        "the endpoint still holds the connection of a client that vanished {within:?} ago"
    );
    drop(held);
    run.proxy.assert_running("the end");
}

#[test]
fn the_open_file_limit_is_raised_and_said_and_max_connections_caps_flows() {
    if !lab::require_root_and_nft(
        "the_open_file_limit_is_raised_and_said_and_max_connections_caps_flows",
    ) {
        return;
    }
    // Started with a soft open-file limit of 1024 under whatever hard limit
    // this machine has: the proxy must take the hard limit and say so.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let bed = Testbed::new("robust", "limits", &[Backend::Whoami]);
    let manifests = bed.manifests_file();
    fs::write(
        &manifests,
        list_yaml(&[service("web", VIP_A, vec![backend_addr(0)])]),
    )
    .expect("writing manifests");
    let nofile = format!("--nofile=1024:{hard}");
    let proxy = ProxyProcess::start_under(
        bed.node(),
        &bed.dir,
        "kube-uproxy",
        &["prlimit", &nofile],
        "--manifests",
        &manifests,
        &["--max-connections", "2"],
        &[],
    );
    let mut run = Run {
        proxy,
        manifests,
        bed,
    };
    run.wait_in_map(VIP_A, true, "the Service is programmed");
    let limits = fs::read_to_string(format!("/proc/{}/limits", run.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .to_string();
    assert!(
        line.split_whitespace().nth(3) == Some(&hard.to_string()),
        "the soft limit was not raised to {hard}: {line}"
    );
    let log = run.proxy.stderr();
    assert!(
        log.lines().any(|l| l.contains("open-file limit")
            && l.contains("1024")
            && l.contains(&hard.to_string())),
        "no log line saying the open-file limit went from 1024 to {hard}"
    );
    // Two flows are held; the third is refused with a reset.
    let client = run.bed.client();
    let held: Vec<_> = (0..2)
        .map(|i| hold(client, vip(VIP_A)).unwrap_or_else(|e| panic!("flow {i}: {e}")))
        .collect();
    match hold(client, vip(VIP_A)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the 3rd flow failed with {e}, want a reset"),
        Ok((_, who)) => panic!("a 3rd flow was served ({who}) over --max-connections 2"),
    }
    drop(held);
    let seen = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        let log = run.proxy.stderr();
        if log.contains("--max-connections") {
            Ok(())
        } else {
            Err("no log line about --max-connections".into())
        }
    });
    seen.unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn invalid_objects_and_broken_files_are_skipped_and_the_rest_works() {
    if !lab::require_root_and_nft("invalid_objects_and_broken_files_are_skipped_and_the_rest_works")
    {
        return;
    }
    let good = service("good", VIP_A, vec![backend_addr(0)]);
    let mut yaml = list_yaml(std::slice::from_ref(&good));
    // Appended as separate documents: a Service with port 0 and a Service
    // whose ClusterIP is not an address.
    yaml.push_str(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: bad-port, namespace: default}\n\
         spec: {clusterIP: 10.96.0.11, ports: [{port: 0}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: bad-ip, namespace: default}\n\
         spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
    );
    let mut run = Run::start("invalid", &[Backend::Whoami], &yaml);
    run.wait_in_map(VIP_A, true, "the valid Service is programmed");
    let log = run.proxy.stderr();
    for (object, field) in [
        ("default/bad-port", "spec.ports[0].port"),
        ("default/bad-ip", "spec.clusterIP"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(object) && l.contains(field) && l.contains("invalid object")),
            "no log line naming {object} and {field}"
        );
    }
    assert_eq!(
        who_or_panic(run.bed.client(), vip(VIP_A), "valid Service"),
        "backend0"
    );
    let mapped = e2e::nft_tcp_ips(run.bed.node(), "map", MAP).expect("listing the map");
    assert!(
        !mapped.contains(&VIP_B),
        "the invalid Service was programmed"
    );

    // A broken save: the file's last good content stays in force.
    fs::write(&run.manifests, "items: [ {{{ not yaml").expect("breaking the file");
    let seen = poll(READY_TIMEOUT, Duration::from_millis(50), || {
        if run
            .proxy
            .stderr()
            .contains("keeping the file's last good content")
        {
            Ok(())
        } else {
            Err("no log line about the broken file".into())
        }
    });
    seen.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        who_or_panic(run.bed.client(), vip(VIP_A), "after the broken save"),
        "backend0"
    );
    // And the next good save is applied.
    fs::write(
        &run.manifests,
        list_yaml(&[good, service("more", VIP_C, vec![backend_addr(0)])]),
    )
    .expect("fixing the file");
    run.wait_in_map(VIP_C, true, "the fixed file is applied");
    run.proxy.assert_running("the end");
}

#[test]
fn proxy_ports_are_reachable_only_through_the_redirect() {
    if !lab::require_root_and_nft("proxy_ports_are_reachable_only_through_the_redirect") {
        return;
    }
    let mut run = Run::start(
        "guard",
        &[Backend::Whoami],
        &list_yaml(&[service("web", VIP_A, vec![backend_addr(0)])]),
    );
    run.wait_in_map(VIP_A, true, "the Service is programmed");
    let port = proxy_port_of(run.bed.node(), VIP_A);
    // Through the redirect: from the client and from the node.
    assert_eq!(
        who_or_panic(run.bed.client(), vip(VIP_A), "client"),
        "backend0"
    );
    assert_eq!(who_or_panic(run.bed.node(), vip(VIP_A), "node"), "backend0");
    // Directly: dropped by the guard (the proxy address) or nothing
    // listening (the node's other addresses), so the connect fails.
    let proxy_address = Ipv4Addr::new(169, 254, 42, 1);
    let direct = [
        (run.bed.client(), SocketAddr::from((proxy_address, port))),
        (run.bed.node(), SocketAddr::from((proxy_address, port))),
        (
            run.bed.client(),
            SocketAddr::from((lab::NODE_CLIENT_ADDR, port)),
        ),
        (
            run.bed.node(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ),
    ];
    for (ns, addr) in direct {
        let r = ns.tcp_connect(addr, Duration::from_millis(700));
        assert!(
            r.is_err(),
            "{addr} reached the proxy port directly from {}",
            ns.name()
        );
    }
}

/// Issue 19, "flood on the side doors": idle connections to the
/// health-check node port and to /healthz (anyone who reaches the node may
/// open them) are capped and timed out, so the proxy's fds stay bounded
/// and every Service connection made meanwhile succeeds; /healthz answers a
/// fresh request once the idle ones have timed out.
#[test]
fn a_flood_of_idle_connections_on_the_side_doors_costs_the_data_path_nothing() {
    const NAME: &str = "a_flood_of_idle_connections_on_the_side_doors_costs_the_data_path_nothing";
    if !lab::require_root_and_nft(NAME) {
        return;
    }
    const FLOOD: usize = 2000;
    const HEALTH_CHECK_PORT: u16 = 32000;
    // This process holds 2 × FLOOD client sockets.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let want = (4 * FLOOD as u64 + 1024).min(hard);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("raising RLIMIT_NOFILE");
    }
    assert!(
        want >= 2 * FLOOD as u64 + 512,
        "hard fd limit {hard} too low"
    );

    let yaml = list_yaml(&[ServiceManifest::new("web", VIP_A)
        .with_type(uproxy_lab::manifests::ServiceType::NodePort)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(30080))
        .with_traffic_policies("Cluster", "Local")
        .with_health_check_node_port(HEALTH_CHECK_PORT)
        .with_endpoints(vec![
            EndpointManifest::ready(backend_addr(0)).on_node("node-1"),
        ])]);
    let mut run = Run::start_with(
        "doors",
        &[Backend::Whoami],
        &yaml,
        &["--hostname-override", "node-1"],
    );
    run.wait_in_map(VIP_A, true, "web programmed");
    let health_check = SocketAddr::from((lab::NODE_CLIENT_ADDR, HEALTH_CHECK_PORT));
    let healthz = SocketAddr::from((lab::NODE_CLIENT_ADDR, 10256));
    let client = run.bed.client();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        match (
            http_get(client, health_check, "/").map(|(s, _)| s),
            http_get(client, healthz, "/healthz").map(|(s, _)| s),
        ) {
            (Ok(200), Ok(200)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("health check port and /healthz never both 200: {e}"));
    who_or_panic(client, vip(VIP_A), "before the flood");
    let pid = run.pid();
    let baseline = open_fds(pid);

    // The flood: FLOOD idle connections to each side door, opened from one
    // thread of the client namespace and held; Service connections made
    // meanwhile from another.
    let flood_done = std::sync::atomic::AtomicBool::new(false);
    let (held, service_results, max_fds) = std::thread::scope(|scope| {
        let flooder = scope.spawn(|| {
            let held = client
                .run(|| {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    let mut held = Vec::new();
                    for i in 0..2 * FLOOD {
                        if Instant::now() > deadline {
                            break;
                        }
                        let to = if i % 2 == 0 { health_check } else { healthz };
                        if let Ok(s) =
                            std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500))
                        {
                            held.push(s);
                        }
                    }
                    held
                })
                .expect("flooding from the client namespace");
            flood_done.store(true, std::sync::atomic::Ordering::SeqCst);
            held
        });
        let (mut results, mut max_fds) = (Vec::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while (!flood_done.load(std::sync::atomic::Ordering::SeqCst) || results.len() < 50)
            && Instant::now() < deadline
        {
            results.push(e2e::who(client, vip(VIP_A)).map_err(|e| e.to_string()));
            max_fds = max_fds.max(open_fds(pid));
        }
        let held = flooder.join().expect("the flooding thread");
        max_fds = max_fds.max(open_fds(pid));
        (held, results, max_fds)
    });
    run.proxy.assert_running("after the flood");
    eprintln!(
        "flood: {} idle side-door connections held, {} Service connections, proxy fds {baseline} -> at most {max_fds}",
        held.len(),
        service_results.len()
    );
    let failed: Vec<_> = service_results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} Service connections failed during the flood: {:?}",
        failed.len(),
        service_results.len(),
        &failed[..failed.len().min(5)]
    );
    // 64 per server (two servers here), a few in flight: far below the
    // 2 × FLOOD the flood asked for.
    assert!(
        max_fds <= baseline + 2 * 64 + 64,
        "the proxy's fds went from {baseline} to {max_fds} under {} idle side-door connections",
        held.len()
    );
    // Once the idle ones have timed out, /healthz answers a fresh request
    // while the flood's sockets are still held open by the client.
    poll(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || match http_get(client, healthz, "/healthz").map(|(s, _)| s) {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("/healthz never answered after the flood: {e}"));
    assert_eq!(
        http_get(client, health_check, "/").map(|(s, _)| s).ok(),
        Some(200),
        "the health check port answers after the flood"
    );
    who_or_panic(client, vip(VIP_A), "after the flood");
    poll(Duration::from_secs(15), Duration::from_millis(250), || {
        let n = open_fds(pid);
        (n <= baseline + 16)
            .then_some(())
            .ok_or_else(|| format!("{n} fds, {baseline} before"))
    })
    .unwrap_or_else(|e| panic!("the idle connections were never closed: {e}"));
    drop(held);
}
