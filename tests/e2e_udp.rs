//! End-to-end tests of UDP Services.
//!
//! - DNS through a ClusterIP to dnsmasq with dig, over UDP and TCP on the
//!   same port 53 of one Service, including a 2.5 KB answer over UDP.
//! - UDP flows: one upstream source port per client flow, kept while
//!   either side sends (the backend alone too), a new one after
//!   `--udp-timeout` of silence both ways; datagrams of 65507 bytes pass
//!   whole; a Service without endpoints answers ICMP port unreachable.
//! - `--udp-max-flows`: a flood of 10 000 client ports keeps the proxy's fd
//!   count and memory bounded and does not disturb a client in use; a full
//!   table of flows in use drops a newcomer, and lets it in once a flow
//!   falls idle.
//! - `--udp-max-flows-total`: a flood of client ports on four UDP Service
//!   ports, under an open-file limit of 1024, leaves TCP its fds: a TCP
//!   Service keeps answering, and the UDP flows stay within the default
//!   budget (a quarter of the limit).
//! - A flood of one-shot clients (a DNS flood) that fills the table leaves
//!   room for new clients: finished exchanges make room first.
//! - A client moves to another endpoint when its endpoint leaves the slice
//!   or answers ICMP port unreachable.
//! - Replies come from the address the client sent to, on a node with two
//!   addresses.
//! - A client that keeps its source port and keeps sending reaches the new
//!   listener when its Service port's listener is retired (the port
//!   renamed): the conntrack entry that DNATed it to the old proxy port is
//!   flushed.
//!
//! The release binary runs in the node namespace of a [`Lab`] with real
//! nftables rules and real sockets; clients run in the client, backend and
//! node namespaces, never in the root one. Backends run the TCP whoami
//! server and a UDP whoami ([`udp_whoami`]: `"<name> <source it saw>
//! <datagram>"`) on 8080 ([`UdpBed`]). The helpers shared with
//! tests/e2e_nodeport.rs and tests/e2e_external_addresses.rs are in
//! tests/lab/src/e2e/udp.rs. These tests need root and `nft` (and dnsmasq
//! and dig for the DNS test); without root they print `SKIP ...` (or fail,
//! if `CI` is set).
//!
//! [`Lab`]: uproxy_lab::Lab
//! [`udp_whoami`]: uproxy_lab::peers::udp_whoami

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use uproxy_lab::e2e::udp::{
    ANSWER_WAIT, Answer, UdpBed, ask, ask_connected, ep, first_answer, udp_client, wait_key,
};
use uproxy_lab::e2e::{
    BACKEND_PORT, READY_TIMEOUT, SVC_PORT, VIP_A, VIP_B, VIP_C, VIP_D, backend_name, manifests,
    poll, write_by_rename,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::peers::{self, MAX_UDP_PAYLOAD};
use uproxy_lab::{self as lab, NODE_BRIDGE_ADDR, NODE_CLIENT_ADDR, Netns, NsChild, backend_addr};

const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

/// Service `name` with one unnamed UDP port 80 → 8080.
fn udp_svc(name: &str, ip: Ipv4Addr, endpoints: Vec<EndpointManifest>) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::udp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(endpoints)
}

// ---------------------------------------------------------------------------
// DNS with dnsmasq and dig.

/// Starts the proxy on `yaml` with `extra` flags and waits until the
/// kernel maps `VIP_A`'s UDP Service port to its listener.
fn start_serving_vip_a(
    bed: &UdpBed,
    yaml: &str,
    extra: &[&str],
) -> (uproxy_lab::e2e::ProxyProcess, std::path::PathBuf) {
    let (mut proxy, path) = bed.start_proxy(yaml, extra);
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_A,
        "udp",
        SVC_PORT,
    );
    (proxy, path)
}

/// The TXT records of `big.test`: 10 strings of 243 characters, 2.5 KB in all.
fn big_txt_records() -> Vec<String> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..10)
        .map(|i| {
            let body: String = (0..240)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect();
            format!("r{i}-{body}")
        })
        .collect()
}

const SMALL_TXT: &str = "hello-from-dnsmasq";

/// dnsmasq serving `small.test` and `big.test` TXT on `addr`:53 (UDP and
/// TCP) in `ns`, answers of up to 4096 bytes over UDP; killed with the lab.
fn start_dnsmasq(ns: &Netns, addr: Ipv4Addr, log: &Path) -> NsChild {
    let log = fs::File::create(log).expect("dnsmasq log file");
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
        "--bind-interfaces",
        "--port=53",
        "--edns-packet-max=4096",
    ])
    .arg(format!("--listen-address={addr}"))
    .arg(format!("--txt-record=small.test,{SMALL_TXT}"));
    for r in big_txt_records() {
        cmd.arg(format!("--txt-record=big.test,{r}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    ns.spawn(cmd)
        .expect("spawning dnsmasq (package dnsmasq-base)")
}

/// `dig <args> +time=2 +tries=1` in `ns`; its stdout (panics, with both
/// outputs, if dig fails: no answer, or an answer from the wrong address).
fn dig(ns: &Netns, args: &[&str]) -> String {
    let out = ns
        .command("dig")
        .args(args)
        .args(["+time=2", "+tries=1"])
        .stdin(Stdio::null())
        .output()
        .expect("running dig (package dnsutils)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} in {} failed ({}):\n{stdout}\n{}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The flags of a dig answer (`qr aa rd ra`).
fn dig_flags(out: &str) -> Vec<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .map(|f| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The TXT strings of a dig answer, in order.
fn dig_txt(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let (_, rdata) = l.split_once("\tTXT\t")?;
            Some(rdata.trim().trim_matches('"').to_string())
        })
        .collect()
}

/// `;; MSG SIZE  rcvd: N`.
fn dig_size(out: &str) -> usize {
    out.lines()
        .find_map(|l| l.strip_prefix(";; MSG SIZE  rcvd: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no message size in:\n{out}"))
}

#[test]
fn dns_over_udp_and_tcp_on_port_53_of_one_service_with_a_large_udp_answer() {
    if !lab::require_root_and_nft(
        "dns_over_udp_and_tcp_on_port_53_of_one_service_with_a_large_udp_answer",
    ) {
        return;
    }
    let bed = UdpBed::new("dns", 1);
    let dns_ns = bed.backend(0).clone();
    let _dnsmasq = start_dnsmasq(&dns_ns, backend_addr(0), &bed.dir.join("dnsmasq.log"));
    // dnsmasq answers on its own address first (the lab, not the proxy).
    let direct = format!("@{}", backend_addr(0));
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = dns_ns
            .output("dig", [&direct, "small.test", "TXT", "+short", "+time=1"])
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(SMALL_TXT) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "dnsmasq never answered directly: {e}\n{}",
            fs::read_to_string(bed.dir.join("dnsmasq.log")).unwrap_or_default()
        )
    });

    let dns = ServiceManifest::new("dns", DNS_VIP)
        .with_port(PortManifest::udp(53, 53).named("dns"))
        .with_port(PortManifest::tcp(53, 53).named("dns-tcp"))
        .with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[dns]), &[]);
    proxy.show_on_failure("dnsmasq log", &bed.dir.join("dnsmasq.log"));
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        DNS_VIP,
        "udp",
        53,
    );
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        DNS_VIP,
        "tcp",
        53,
    );
    let server = format!("@{DNS_VIP}");
    let client = bed.client();

    // A small answer, over UDP and over TCP on the same port.
    for (transport, flag, shown) in [("UDP", "+notcp", "(UDP)"), ("TCP", "+tcp", "(TCP)")] {
        let out = dig(client, &[&server, "small.test", "TXT", flag]);
        assert!(
            out.contains("status: NOERROR"),
            "small over {transport}:\n{out}"
        );
        assert_eq!(
            dig_txt(&out),
            vec![SMALL_TXT.to_string()],
            "small over {transport}:\n{out}"
        );
        assert!(
            out.contains(&format!(";; SERVER: {DNS_VIP}#53({DNS_VIP}) {shown}")),
            "small over {transport}: answered by another server or transport:\n{out}"
        );
    }

    // 2.5 KB over UDP: whole, not truncated, not retried over TCP.
    let expected = big_txt_records();
    let out = dig(
        client,
        &[
            &server,
            "big.test",
            "TXT",
            "+bufsize=4096",
            "+notcp",
            "+ignore",
        ],
    );
    assert!(
        !dig_flags(&out).iter().any(|f| f == "tc"),
        "the large UDP answer was truncated: {:?}\n{out}",
        dig_flags(&out)
    );
    assert!(out.contains(&format!("({DNS_VIP}) (UDP)")), "{out}");
    let size = dig_size(&out);
    assert!(size > 2000, "the UDP answer has only {size} bytes:\n{out}");
    let mut got = dig_txt(&out);
    got.sort();
    assert_eq!(
        got, expected,
        "TXT records of big.test over UDP ({size} bytes)"
    );

    // The same over TCP.
    let out = dig(client, &[&server, "big.test", "TXT", "+tcp"]);
    let mut got = dig_txt(&out);
    got.sort();
    assert_eq!(got, expected, "TXT records of big.test over TCP:\n{out}");
}

// ---------------------------------------------------------------------------
// UDP flows.

#[test]
fn udp_flows_keep_their_upstream_port_while_active_and_get_a_new_one_after_the_idle_timeout() {
    if !lab::require_root_and_nft(
        "udp_flows_keep_their_upstream_port_while_active_and_get_a_new_one_after_the_idle_timeout",
    ) {
        return;
    }
    let bed = UdpBed::new("idle", 1);
    let (_proxy, _) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0)])]),
        &["--udp-timeout", "1s"],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    let first = first_answer(bed.client(), to, "first datagram");
    assert_eq!(first.name, backend_name(0));
    let socket = udp_client(bed.client());
    let a = ask(&socket, to, ANSWER_WAIT).expect("first datagram of the flow");
    assert_eq!(a.from, to, "the answer came from another address");

    // Active for 3 s (three timeouts), a datagram every 300 ms: one flow,
    // one upstream source address.
    let t0 = Instant::now();
    let mut sent = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(300));
        let b = ask(&socket, to, ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("datagram {sent} of an active flow: {e}"));
        assert_eq!(
            b.seen,
            a.seen,
            "the upstream source changed {:?} into an active flow (a datagram every 300 ms, --udp-timeout 1s)",
            t0.elapsed()
        );
        sent += 1;
    }

    // Idle for 2.5 s: the next datagram opens a new flow.
    thread::sleep(Duration::from_millis(2500));
    let c = ask(&socket, to, ANSWER_WAIT).expect("first datagram after the idle timeout");
    assert_eq!(c.from, to);
    assert_eq!(c.seen.ip(), a.seen.ip());
    assert_ne!(
        c.seen.port(),
        a.seen.port(),
        "after 2.5 s idle (--udp-timeout 1s) the flow still used upstream source {}",
        a.seen
    );
    // ...which is kept in turn.
    thread::sleep(Duration::from_millis(200));
    let d = ask(&socket, to, ANSWER_WAIT).expect("second datagram of the new flow");
    assert_eq!(d.seen, c.seen, "the new flow's upstream source changed");

    // Another client socket is another flow, at the same time.
    let other = udp_client(bed.client());
    let e = ask(&other, to, ANSWER_WAIT).expect("another client");
    assert_ne!(
        e.seen, c.seen,
        "two client sockets shared one upstream flow"
    );
}

#[test]
fn udp_datagrams_up_to_65507_bytes_pass_whole_both_ways() {
    if !lab::require_root_and_nft("udp_datagrams_up_to_65507_bytes_pass_whole_both_ways") {
        return;
    }
    let bed = UdpBed::new("big", 1);
    const ECHO_PORT: u16 = 7;
    let echo_socket = bed
        .backend(0)
        .udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_PORT)))
        .expect("echo socket");
    let _echo = {
        let _g = bed.runtime().enter();
        peers::udp_echo(echo_socket).expect("UDP echo")
    };
    let svc = ServiceManifest::new("echo", VIP_A)
        .with_port(PortManifest::udp(ECHO_PORT, ECHO_PORT))
        .with_endpoints(vec![ep(0)]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[svc]), &[]);
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        VIP_A,
        "udp",
        ECHO_PORT,
    );
    let to = SocketAddr::from((VIP_A, ECHO_PORT));
    let socket = udp_client(bed.client());
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    let mut x = 0x0123_4567_89ab_cdefu64;
    let mut done: Vec<usize> = Vec::new();
    for (round, size) in [1usize, 1472, 1473, 9000, 32768, MAX_UDP_PAYLOAD]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // The first datagram may race the listener (retried, bounded); an
        // echo of an earlier size is a late duplicate of a retry, skipped.
        let attempts = if round == 0 { 50 } else { 3 };
        let mut echoed = None;
        'attempts: for _ in 0..attempts {
            socket.send_to(&data, to).expect("send");
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .expect("timeout");
                match socket.recv_from(&mut buf) {
                    Ok((n, _)) if done.contains(&n) => {}
                    Ok((n, from)) => {
                        echoed = Some((n, from));
                        break 'attempts;
                    }
                    Err(_) => {}
                }
            }
        }
        done.push(size);
        let (n, from) = echoed.unwrap_or_else(|| panic!("a {size}-byte datagram was never echoed"));
        assert_eq!(from, to, "{size} bytes: echoed from another address");
        assert_eq!(n, size, "a {size}-byte datagram came back with {n} bytes");
        assert!(
            buf[..n] == data[..],
            "a {size}-byte datagram came back altered"
        );
    }
}

#[test]
fn a_udp_service_without_endpoints_answers_icmp_port_unreachable() {
    if !lab::require_root_and_nft("a_udp_service_without_endpoints_answers_icmp_port_unreachable") {
        return;
    }
    let bed = UdpBed::new("udp-refuse", 0);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[udp_svc("empty", VIP_A, vec![])]), &[]);
    wait_key(
        &mut proxy,
        bed.node(),
        "set",
        "no-endpoints",
        VIP_A,
        "udp",
        SVC_PORT,
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    // From the node itself the ICMP error comes from the output hook, whose
    // verdict also fails the send with EPERM (as with kube-proxy's REJECT);
    // the error then waits on the socket as one from another host would.
    for (ns, send_may_fail) in [(bed.client(), false), (bed.node(), true)] {
        let socket = udp_client(ns);
        socket.connect(to).expect("connect");
        for round in 0..3 {
            let t0 = Instant::now();
            match socket.send(b"anyone?") {
                Ok(_) => {}
                Err(e) if send_may_fail && e.kind() == io::ErrorKind::PermissionDenied => {}
                Err(e) => panic!("from {}: send {round}: {e}", ns.name()),
            }
            socket
                .set_read_timeout(Some(ANSWER_WAIT))
                .expect("read timeout");
            let mut buf = [0u8; 64];
            // Retried when a signal interrupts it (bounded).
            let mut got = socket.recv(&mut buf);
            for _ in 0..100 {
                match &got {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        got = socket.recv(&mut buf);
                    }
                    _ => break,
                }
            }
            match got {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                other => panic!(
                    "from {}: datagram {round}: a connected UDP socket got {other:?} after {:?}, not ECONNREFUSED",
                    ns.name(),
                    t0.elapsed()
                ),
            }
        }
    }
}

/// The number of open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The resident memory of process `pid`, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What a steady UDP client saw.
#[derive(Debug, Default)]
struct SteadyReport {
    sent: u64,
    answered: u64,
    /// Datagrams not answered within [`ANSWER_WAIT`]...
    lost: u64,
    /// ...the first ten, with their times.
    lost_examples: Vec<String>,
    /// Upstream source addresses the backend saw.
    seen: BTreeSet<SocketAddr>,
    /// Backends and answer sources.
    names: BTreeSet<String>,
    from: BTreeSet<SocketAddr>,
    slowest: Duration,
}

/// Sends a datagram every `interval` from `socket` to `to` and waits for
/// each answer, until `stop` (at most `limit`).
fn steady_udp(
    socket: UdpSocket,
    to: SocketAddr,
    interval: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<SteadyReport> {
    thread::spawn(move || {
        let mut r = SteadyReport::default();
        let started = Instant::now();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
            let t0 = Instant::now();
            r.sent += 1;
            match ask(&socket, to, ANSWER_WAIT) {
                Ok(a) => {
                    r.answered += 1;
                    r.seen.insert(a.seen);
                    r.names.insert(a.name);
                    r.from.insert(a.from);
                    r.slowest = r.slowest.max(t0.elapsed());
                }
                Err(e) => {
                    r.lost += 1;
                    if r.lost_examples.len() < 10 {
                        r.lost_examples
                            .push(format!("at {:?}: {e}", t0.duration_since(started)));
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
}

/// Sends one datagram from each port of `ports` of `ns` to `to`, `batch`
/// sockets at a time with `pause` between batches; each socket is closed
/// after its batch. Returns how many datagrams were sent.
fn flood(
    ns: &Netns,
    to: SocketAddr,
    ports: Range<u16>,
    batch: usize,
    pause: Duration,
) -> thread::JoinHandle<usize> {
    let ns = ns.clone();
    thread::spawn(move || {
        ns.run(move || {
            let mut sent = 0;
            let ports: Vec<u16> = ports.collect();
            for chunk in ports.chunks(batch) {
                let sockets: Vec<UdpSocket> = chunk
                    .iter()
                    .filter_map(|&p| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).ok())
                    .collect();
                for s in &sockets {
                    if s.send_to(b"flood", to).is_ok() {
                        sent += 1;
                    }
                }
                drop(sockets);
                thread::sleep(pause);
            }
            sent
        })
        .expect("flooding from the client namespace")
    })
}

#[test]
fn a_flood_of_10000_client_ports_keeps_fds_bounded_and_a_client_in_use_answered() {
    if !lab::require_root_and_nft(
        "a_flood_of_10000_client_ports_keeps_fds_bounded_and_a_client_in_use_answered",
    ) {
        return;
    }
    const MAX_FLOWS: usize = 1000;
    let bed = UdpBed::new("flood", 1);
    let (mut proxy, _) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0)])]),
        &["--udp-max-flows", "1000"],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "before the flood");
    let pid = proxy.child.id();
    let baseline = fd_count(pid);
    assert!(baseline > 0, "cannot read /proc/{pid}/fd");
    let rss_before = rss_kib(pid);
    let udp_server = bed.udp[0].as_ref().expect("UDP whoami");
    let delivered_before = udp_server.accepted();

    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_udp(
        udp_client(bed.client()),
        to,
        Duration::from_millis(10),
        Duration::from_secs(60),
        Arc::clone(&stop),
    );
    thread::sleep(Duration::from_millis(500));
    // 10 000 client ports (10000..20000, below the ephemeral range), 100
    // every 20 ms: about 2 s.
    let flooder = flood(
        bed.client(),
        to,
        10_000..20_000,
        100,
        Duration::from_millis(20),
    );
    let mut peak = baseline;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !flooder.is_finished() && Instant::now() < deadline {
        peak = peak.max(fd_count(pid));
        thread::sleep(Duration::from_millis(10));
    }
    let flooded = flooder.join().expect("flood thread");
    // A second after the flood, still answered.
    let after = Instant::now() + Duration::from_secs(1);
    while Instant::now() < after {
        peak = peak.max(fd_count(pid));
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let report = steady.join().expect("steady client thread");
    proxy.assert_running("after the flood");
    let rss_after = rss_kib(pid);
    let delivered = udp_server.accepted() - delivered_before - report.answered;
    eprintln!(
        "flood: {flooded} client ports sent, {delivered} of their datagrams reached the backend; \
         fds {baseline} before, {peak} at most; RSS {rss_before} KiB before, {rss_after} KiB after; \
         steady client: {} sent, {} answered, slowest {:?}",
        report.sent, report.answered, report.slowest
    );

    assert_eq!(flooded, 10_000, "the flood itself fell short");
    // The flood filled the flow table (else the bound below proves nothing).
    assert!(
        delivered >= (MAX_FLOWS as u64) * 9 / 10,
        "only {delivered} flood datagrams reached the backend with --udp-max-flows {MAX_FLOWS}"
    );
    assert!(
        peak <= baseline + MAX_FLOWS + MAX_FLOWS / 10,
        "the proxy had {peak} fds open during a flood of 10 000 client ports \
         (baseline {baseline}, --udp-max-flows {MAX_FLOWS})"
    );
    assert!(
        report.sent > 200,
        "the steady client sent too few: {report:?}"
    );
    assert_eq!(
        report.lost, 0,
        "the client in use lost {} of {} answers during the flood: {:?}",
        report.lost, report.sent, report.lost_examples
    );
    assert_eq!(
        report.seen.len(),
        1,
        "the client in use changed upstream flow: {:?}",
        report.seen
    );
    assert_eq!(report.from, BTreeSet::from([to]), "answer sources");
}

#[test]
fn new_clients_are_answered_during_a_flood_of_one_shot_clients_that_fills_the_table() {
    if !lab::require_root_and_nft(
        "new_clients_are_answered_during_a_flood_of_one_shot_clients_that_fills_the_table",
    ) {
        return;
    }
    // The DNS flood: 10 000 one-shot client ports over 3 s with
    // --udp-max-flows 1000, each answered by the backend. The table fills
    // with flows younger than a second; new clients must still get in.
    const NEW_CLIENTS: usize = 10;
    let bed = UdpBed::new("one-shot", 1);
    let (mut proxy, _) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0)])]),
        &["--udp-max-flows", "1000"],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "before the flood");
    let flooder = flood(
        bed.client(),
        to,
        10_000..20_000,
        100,
        Duration::from_millis(30),
    );
    // Into the flood: the table is full by now.
    thread::sleep(Duration::from_millis(600));
    let mut lost = Vec::new();
    for i in 0..NEW_CLIENTS {
        // One query each, from a fresh port, as `dig +tries=1` would.
        let socket = udp_client(bed.client());
        let t0 = Instant::now();
        if let Err(e) = ask(&socket, to, ANSWER_WAIT) {
            lost.push(format!("client {i}: {e}"));
        }
        if let Some(rest) = Duration::from_millis(200).checked_sub(t0.elapsed()) {
            thread::sleep(rest);
        }
    }
    let still_flooding = !flooder.is_finished();
    let flooded = flooder.join().expect("flood thread");
    proxy.assert_running("after the flood");
    eprintln!(
        "one-shot flood: {flooded} client ports; {} of {NEW_CLIENTS} new clients answered (flood still running at the last one: {still_flooding})",
        NEW_CLIENTS - lost.len()
    );
    assert_eq!(flooded, 10_000, "the flood itself fell short");
    assert!(
        lost.is_empty(),
        "new clients not answered during a flood of one-shot clients: {lost:?}"
    );
}

#[test]
fn a_full_flow_table_drops_newcomers_keeps_flows_in_use_and_makes_room_from_idle_ones() {
    if !lab::require_root_and_nft(
        "a_full_flow_table_drops_newcomers_keeps_flows_in_use_and_makes_room_from_idle_ones",
    ) {
        return;
    }
    let bed = UdpBed::new("flow-cap", 1);
    // --udp-timeout stays 30 s: room is made by the cap, not by expiry.
    let (mut proxy, _) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0)])]),
        &["--udp-max-flows", "4"],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    // Four clients fill the table, each answered once before the next
    // starts (the first retried until the rules are in).
    let mut steady = Vec::new();
    for i in 0..4 {
        let socket = udp_client(bed.client());
        poll(READY_TIMEOUT, Duration::from_millis(100), || {
            ask(&socket, to, Duration::from_millis(400))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("client {i} never answered: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = steady_udp(
            socket,
            to,
            Duration::from_millis(100),
            Duration::from_secs(60),
            Arc::clone(&stop),
        );
        steady.push((stop, handle));
    }
    thread::sleep(Duration::from_millis(300));

    // All four in use: a fifth client is dropped...
    let newcomer = udp_client(bed.client());
    for i in 0..5 {
        if let Ok(a) = ask(&newcomer, to, Duration::from_millis(300)) {
            panic!(
                "datagram {i} of a fifth client was answered ({a:?}) while four flows were in use \
                 with --udp-max-flows 4: a flow in use was pushed out"
            );
        }
    }
    // ...until one of the four falls silent: its flow makes room, long
    // before the 30 s idle timeout.
    steady[0].0.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let (tries, _) = ask_until_answered_by(
        &newcomer,
        to,
        &backend_name(0),
        Duration::from_secs(5),
        "a fifth client once one of four flows went idle",
    );
    eprintln!(
        "the newcomer got in {:?} after a flow went idle ({tries} datagrams)",
        t0.elapsed()
    );

    for (i, (stop, handle)) in steady.into_iter().enumerate() {
        stop.store(true, Ordering::Relaxed);
        let r = handle.join().expect("steady client");
        assert_eq!(
            r.lost, 0,
            "client {i} in use lost answers: {:?}",
            r.lost_examples
        );
        assert_eq!(r.seen.len(), 1, "client {i} changed upstream flow: {r:?}");
        assert!(r.sent >= 5, "client {i} sent only {}", r.sent);
    }
    proxy.assert_running("end");
}

#[test]
fn a_udp_flow_is_kept_by_backend_traffic_alone_and_closed_after_silence_both_ways() {
    if !lab::require_root_and_nft(
        "a_udp_flow_is_kept_by_backend_traffic_alone_and_closed_after_silence_both_ways",
    ) {
        return;
    }
    const STREAM_PORT: u16 = 9000;
    let bed = UdpBed::new("udp-stream", 1);
    // The test itself plays the backend: a plain socket on 9000.
    let server = bed
        .backend(0)
        .udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, STREAM_PORT)))
        .expect("backend socket");
    let svc = ServiceManifest::new("stream", VIP_A)
        .with_port(PortManifest::udp(SVC_PORT, STREAM_PORT))
        .with_endpoints(vec![ep(0)]);
    let (_proxy, _) = start_serving_vip_a(&bed, &manifests(&[svc]), &["--udp-timeout", "1s"]);
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    let client = udp_client(bed.client());
    let mut buf = vec![0u8; 2048];
    // The backend learns the flow's upstream address from the client's
    // first datagram (retried until the rules are in).
    let mut upstream = None;
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        client
            .send_to(b"subscribe", to)
            .map_err(|e| e.to_string())?;
        let (n, from) = recv_within(&server, &mut buf, Duration::from_millis(300))
            .map_err(|e| format!("backend: {e}"))?;
        if &buf[..n] == b"subscribe" {
            upstream = Some(from);
            Ok(())
        } else {
            Err(format!(
                "backend got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ))
        }
    })
    .unwrap_or_else(|e| panic!("the backend never heard the client: {e}"));
    let upstream = upstream.expect("set on success");
    // Drain retries of "subscribe" that got through too.
    while recv_within(&server, &mut buf, Duration::from_millis(200)).is_ok() {}

    // 3 s (three timeouts) of backend -> client traffic only, every 300 ms:
    // every datagram reaches the client, from the Service address.
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(300));
        let tick = format!("tick {i}");
        server
            .send_to(tick.as_bytes(), upstream)
            .expect("backend send");
        let (n, from) = recv_within(&client, &mut buf, ANSWER_WAIT).unwrap_or_else(|e| {
            panic!(
                "{tick} from the backend, {:?} into a flow only the backend talks on \
                 (--udp-timeout 1s): {e}",
                t0.elapsed()
            )
        });
        assert_eq!(from, to, "{tick} came from another address");
        assert_eq!(&buf[..n], tick.as_bytes());
        i += 1;
    }
    // The client's next datagram still uses the same flow.
    client.send_to(b"still here", to).expect("send");
    let (n, from) =
        recv_within(&server, &mut buf, ANSWER_WAIT).expect("the client after 3 s of silence");
    assert_eq!(&buf[..n], b"still here");
    assert_eq!(
        from, upstream,
        "the flow kept alive by the backend's datagrams was replaced"
    );

    // Silent both ways for 2.5 s: the flow is closed, so the backend can no
    // longer reach the client through it, and the client's next datagram
    // opens a new one.
    thread::sleep(Duration::from_millis(2500));
    let _ = server.send_to(b"too late", upstream);
    if let Ok((n, _)) = recv_within(&client, &mut buf, ANSWER_WAIT) {
        panic!(
            "after 2.5 s of silence (--udp-timeout 1s) the old flow still carried {:?} to the client",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    client.send_to(b"new flow", to).expect("send");
    let (n, from) = recv_within(&server, &mut buf, ANSWER_WAIT).expect("the client, later");
    assert_eq!(&buf[..n], b"new flow");
    assert_ne!(from, upstream, "the expired flow's upstream was used again");
}

/// One datagram within `wait` (signals do not cut the wait short).
fn recv_within(
    socket: &UdpSocket,
    buf: &mut [u8],
    wait: Duration,
) -> io::Result<(usize, SocketAddr)> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing within {wait:?}"),
            ));
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------
// Endpoints going away.

/// Asks on `socket` every 100 ms until an answer comes from `want`;
/// returns how many datagrams it took. Panics after `limit`.
fn ask_until_answered_by(
    socket: &UdpSocket,
    to: SocketAddr,
    want: &str,
    limit: Duration,
    why: &str,
) -> (usize, Answer) {
    let t0 = Instant::now();
    let mut tries = 0;
    let mut last = Vec::new();
    while t0.elapsed() < limit {
        tries += 1;
        match ask(socket, to, Duration::from_millis(300)) {
            Ok(a) if a.name == want => return (tries, a),
            other => {
                if last.len() >= 5 {
                    last.remove(0);
                }
                last.push(format!("{other:?}"));
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("{why}: no answer from {want} within {limit:?} ({tries} datagrams); last: {last:?}");
}

/// Which backend (0 or 1) answered, and the other one.
fn backend_pair(name: &str) -> (usize, usize) {
    if name == backend_name(0) {
        (0, 1)
    } else if name == backend_name(1) {
        (1, 0)
    } else {
        panic!("answered by {name:?}")
    }
}

#[test]
fn a_udp_client_moves_to_another_endpoint_when_its_endpoint_leaves_the_slice() {
    if !lab::require_root_and_nft(
        "a_udp_client_moves_to_another_endpoint_when_its_endpoint_leaves_the_slice",
    ) {
        return;
    }
    let bed = UdpBed::new("udp-leave", 2);
    let (_proxy, path) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0), ep(1)])]),
        &[],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "before the change");
    let socket = udp_client(bed.client());
    let a = ask(&socket, to, ANSWER_WAIT).expect("first datagram");
    let (mine, other) = backend_pair(&a.name);
    for i in 0..5 {
        let b = ask(&socket, to, ANSWER_WAIT).expect("same flow");
        assert_eq!(
            (b.name.as_str(), b.seen),
            (a.name.as_str(), a.seen),
            "datagram {i} of one client flow went elsewhere"
        );
    }

    write_by_rename(&path, &manifests(&[udp_svc("dns", VIP_A, vec![ep(other)])]));
    let (tries, moved) = ask_until_answered_by(
        &socket,
        to,
        &backend_name(other),
        READY_TIMEOUT,
        "after its endpoint left the slice",
    );
    eprintln!("moved to {} after {tries} datagrams", moved.name);
    assert_eq!(moved.from, to);
    for i in 0..5 {
        let c = ask(&socket, to, ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("datagram {i} after the move: {e}"));
        assert_eq!(
            c.name,
            backend_name(other),
            "datagram {i} after backend{mine} left the slice"
        );
    }
}

#[test]
fn a_udp_client_moves_to_another_endpoint_when_its_endpoint_answers_port_unreachable() {
    if !lab::require_root_and_nft(
        "a_udp_client_moves_to_another_endpoint_when_its_endpoint_answers_port_unreachable",
    ) {
        return;
    }
    let mut bed = UdpBed::new("udp-icmp", 2);
    let (_proxy, _) = start_serving_vip_a(
        &bed,
        &manifests(&[udp_svc("dns", VIP_A, vec![ep(0), ep(1)])]),
        &[],
    );
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "before the stop");
    let socket = udp_client(bed.client());
    let a = ask(&socket, to, ANSWER_WAIT).expect("first datagram");
    let (mine, other) = backend_pair(&a.name);

    // Nothing listens on the endpoint any more: its kernel answers ICMP
    // port unreachable. Both endpoints stay in the slice.
    bed.stop_udp(mine);
    let (tries, moved) = ask_until_answered_by(
        &socket,
        to,
        &backend_name(other),
        Duration::from_secs(10),
        "after its endpoint stopped listening",
    );
    eprintln!("moved to {} after {tries} datagrams", moved.name);
    assert!(
        tries <= 5,
        "{tries} datagrams went unanswered before the client moved off the endpoint that answers port unreachable"
    );
    for i in 0..5 {
        let c = ask(&socket, to, ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("datagram {i} after the move: {e}"));
        assert_eq!(c.name, backend_name(other), "datagram {i} after the move");
    }
}

// ---------------------------------------------------------------------------
// Reply addresses.

#[test]
fn udp_answers_come_from_the_service_address_on_a_node_with_two_addresses() {
    if !lab::require_root_and_nft(
        "udp_answers_come_from_the_service_address_on_a_node_with_two_addresses",
    ) {
        return;
    }
    let bed = UdpBed::new("udp-source", 2);
    let (_proxy, _) =
        start_serving_vip_a(&bed, &manifests(&[udp_svc("dns", VIP_A, vec![ep(0)])]), &[]);
    // The node really has two addresses (three with the proxy address).
    let addrs = bed
        .node()
        .output("ip", ["-4", "-o", "addr", "show"])
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
    for a in [NODE_CLIENT_ADDR, NODE_BRIDGE_ADDR] {
        assert!(addrs.contains(&format!("{a}/")), "{a} missing:\n{addrs}");
    }
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "ready");
    for (ns, what) in [
        (bed.client(), "the client (through eth0)"),
        (bed.backend(1), "a pod on the bridge (through br0)"),
        (bed.node(), "the node itself"),
    ] {
        // Unconnected: the answer's source is the Service address.
        let socket = udp_client(ns);
        let a = ask(&socket, to, ANSWER_WAIT).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.from, to, "{what}: the answer came from another address");
        assert_eq!(a.name, backend_name(0), "{what}");
        // Connected: the kernel drops answers from any other address.
        let connected = udp_client(ns);
        connected.connect(to).expect("connect");
        for i in 0..3 {
            let b = ask_connected(&connected, ANSWER_WAIT).unwrap_or_else(|e| {
                panic!("{what}: connected socket, datagram {i}: {e} (answer from another address?)")
            });
            assert_eq!(b.name, backend_name(0), "{what}");
        }
    }
}

// ---------------------------------------------------------------------------
// The process-wide flow budget.

/// A whoami greeting over TCP from `ns` to `to`, each step bounded by
/// `wait`: the backend's name, or what went wrong.
fn tcp_hello(ns: &Netns, to: SocketAddr, wait: Duration) -> Result<String, String> {
    use std::io::Read as _;
    let mut s = ns
        .tcp_connect(to, wait)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {line:?}")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("greeting: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// The sum of the samples of `name` whose labels contain `label`.
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_udp_flood_on_many_service_ports_cannot_take_the_fds_tcp_needs() {
    if !lab::require_root_and_nft("a_udp_flood_on_many_service_ports_cannot_take_the_fds_tcp_needs")
    {
        return;
    }
    // An open-file limit of 1024 and no --udp-max-flows-total: the default
    // budget is a quarter of it. Each UDP port's own cap (1000) would let
    // four ports take every fd.
    const OPEN_FILES: usize = 1024;
    const BUDGET: usize = OPEN_FILES / 4;
    const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    let udp_vips = [VIP_A, VIP_B, VIP_C, VIP_D];
    let bed = UdpBed::new("budget", 1);
    let mut services: Vec<ServiceManifest> = udp_vips
        .iter()
        .enumerate()
        .map(|(i, ip)| udp_svc(&format!("dns-{i}"), *ip, vec![ep(0)]))
        .collect();
    services.push(
        ServiceManifest::new("web", TCP_VIP)
            .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
            .with_endpoints(vec![ep(0)]),
    );
    let path = bed.manifests_file();
    fs::write(&path, manifests(&services)).expect("writing the manifests");
    let limit = format!("--nofile={OPEN_FILES}:{OPEN_FILES}");
    let mut proxy = uproxy_lab::e2e::ProxyProcess::start_under(
        bed.node(),
        &bed.dir,
        "kube-uproxy",
        &["prlimit", &limit],
        "--manifests",
        &path,
        &["--udp-max-flows", "1000"],
        &[],
    );
    proxy.show_on_failure("manifests", &path);
    for ip in udp_vips {
        wait_key(
            &mut proxy,
            bed.node(),
            "map",
            "service-ports",
            ip,
            "udp",
            SVC_PORT,
        );
    }
    wait_key(
        &mut proxy,
        bed.node(),
        "map",
        "service-ports",
        TCP_VIP,
        "tcp",
        SVC_PORT,
    );
    let tcp_to = SocketAddr::from((TCP_VIP, SVC_PORT));
    for ip in udp_vips {
        first_answer(
            bed.client(),
            SocketAddr::from((ip, SVC_PORT)),
            "before the flood",
        );
    }
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        tcp_hello(bed.client(), tcp_to, Duration::from_secs(2)).map(|_| ())
    })
    .unwrap_or_else(|e| panic!("TCP before the flood: {e}"));
    let pid = proxy.child.id();
    let baseline = fd_count(pid);
    assert!(baseline > 0, "cannot read /proc/{pid}/fd");

    // 10 000 client ports (10000..20000), each sending one datagram to each
    // of the four UDP Services: 40 000 flows wanted, 100 ports every 20 ms.
    let targets: Vec<SocketAddr> = udp_vips
        .iter()
        .map(|ip| SocketAddr::from((*ip, SVC_PORT)))
        .collect();
    let ns = bed.client().clone();
    let flooder = thread::spawn(move || {
        ns.run(move || {
            let mut sent = 0usize;
            let ports: Vec<u16> = (10_000..20_000).collect();
            for chunk in ports.chunks(100) {
                let sockets: Vec<UdpSocket> = chunk
                    .iter()
                    .filter_map(|&p| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).ok())
                    .collect();
                for s in &sockets {
                    for to in &targets {
                        if s.send_to(b"flood", to).is_ok() {
                            sent += 1;
                        }
                    }
                }
                drop(sockets);
                thread::sleep(Duration::from_millis(20));
            }
            sent
        })
        .expect("flooding from the client namespace")
    });
    // TCP keeps being answered during the flood and a second after it.
    let mut tcp_ok = 0usize;
    let mut tcp_failed: Vec<String> = Vec::new();
    let mut peak = baseline;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut flood_ended: Option<Instant> = None;
    while Instant::now() < deadline {
        if flood_ended.is_none() && flooder.is_finished() {
            flood_ended = Some(Instant::now());
        }
        if flood_ended.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        peak = peak.max(fd_count(pid));
        match tcp_hello(bed.client(), tcp_to, Duration::from_secs(2)) {
            Ok(name) if name == backend_name(0) => tcp_ok += 1,
            Ok(other) => tcp_failed.push(format!("answered by {other:?}")),
            Err(e) => tcp_failed.push(e),
        }
        peak = peak.max(fd_count(pid));
        thread::sleep(Duration::from_millis(20));
    }
    let flooded = flooder.join().expect("flood thread");
    proxy.assert_running("after the flood");
    let metrics = uproxy_lab::e2e::http_get(
        bed.node(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 10249)),
        "/metrics",
    )
    .map(|(_, body)| body)
    .unwrap_or_default();
    let refused = metric_sum(
        &metrics,
        "kubeuproxy_udp_flows_refused_total",
        "reason=\"max_flows_total\"",
    );
    let active = metric_sum(&metrics, "kubeuproxy_udp_flows_active", "protocol=\"UDP\"");
    eprintln!(
        "budget flood: {flooded} datagrams; fds {baseline} before, {peak} at most \
         (open-file limit {OPEN_FILES}, budget {BUDGET}); TCP {tcp_ok} answered, {} failed; \
         UDP flows active {active}, refused for the budget {refused}",
        tcp_failed.len()
    );
    assert_eq!(flooded, 40_000, "the flood itself fell short");
    assert!(
        tcp_failed.is_empty(),
        "TCP connections failed during a UDP flood ({tcp_ok} answered): {:?}",
        &tcp_failed[..tcp_failed.len().min(5)]
    );
    assert!(tcp_ok >= 10, "too few TCP connections tried: {tcp_ok}");
    assert!(
        peak <= baseline + BUDGET + 64,
        "the proxy had {peak} fds open during the flood (baseline {baseline}, \
         UDP budget {BUDGET} of {OPEN_FILES})"
    );
    assert!(
        active <= BUDGET as f64,
        "{active} UDP flows open after the flood, budget {BUDGET}"
    );
    assert!(
        refused > 0.0,
        "no datagram counted as refused for the budget: {}",
        metrics
            .lines()
            .filter(|l| l.contains("udp_flows"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// A retired listener's conntrack entries.

/// The default IPv4 proxy address, which the listeners bind.
const PROXY_ADDRESS: &str = "169.254.42.1";

/// The UDP ports bound on the proxy address in `ns` (the proxy's
/// listeners, in the node). `ss -u` alone prints no Netid column, so the
/// local address is looked for by its address.
fn udp_ports(ns: &Netns) -> BTreeSet<u16> {
    let out = ns
        .output("ss", ["-Hlnu"])
        .unwrap_or_else(|e| panic!("ss -Hlnu in {}: {e}", ns.name()));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|field| {
            let (ip, port) = field.rsplit_once(':')?;
            (ip == PROXY_ADDRESS).then(|| port.parse().ok()).flatten()
        })
        .collect()
}

#[test]
fn a_udp_client_that_keeps_its_source_port_reaches_the_new_listener_after_a_retirement() {
    if !lab::require_root_and_nft(
        "a_udp_client_that_keeps_its_source_port_reaches_the_new_listener_after_a_retirement",
    ) {
        return;
    }
    let bed = UdpBed::new("udp-ct", 1);
    // A Service port is named by its name: renaming it retires its
    // listener and opens another on a new proxy port, while the ClusterIP
    // and port the client sends to stay the same.
    let svc = |port_name: &str| {
        ServiceManifest::new("dns", VIP_A)
            .with_port(PortManifest::udp(SVC_PORT, BACKEND_PORT).named(port_name))
            .with_endpoints(vec![ep(0)])
    };
    let (mut proxy, path) = start_serving_vip_a(&bed, &manifests(&[svc("a")]), &[]);
    let to = SocketAddr::from((VIP_A, SVC_PORT));
    first_answer(bed.client(), to, "before the change");
    let old_ports = udp_ports(bed.node());
    // One socket: one source port for the whole test.
    let socket = udp_client(bed.client());
    let source = socket.local_addr().expect("client address");
    let before = ask(&socket, to, ANSWER_WAIT).expect("the client, before the change");
    assert_eq!(before.name, backend_name(0));

    write_by_rename(&path, &manifests(&[svc("b")]));
    // The client keeps sending every 100 ms (renewing its conntrack entry)
    // until the old listener has closed and the new one is bound.
    let mut new_ports = BTreeSet::new();
    let mut sent = 0;
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        proxy.assert_running("after the rename");
        let _ = socket.send_to(b"keep", to);
        sent += 1;
        new_ports = udp_ports(bed.node());
        if !new_ports.is_empty() && new_ports.is_disjoint(&old_ports) {
            Ok(())
        } else {
            Err(format!(
                "UDP ports bound: {new_ports:?}, before: {old_ports:?}"
            ))
        }
    })
    .unwrap_or_else(|e| panic!("the listener was never replaced: {e}"));
    eprintln!(
        "listener moved from {old_ports:?} to {new_ports:?}; {sent} datagrams from {source} meanwhile"
    );

    // Same socket, same source port: answered again within a few seconds
    // (its stale entry would otherwise live as long as it keeps sending).
    let t0 = Instant::now();
    let mut tries = 0;
    let mut last = String::new();
    let mut answered = None;
    while t0.elapsed() < Duration::from_secs(5) && answered.is_none() {
        tries += 1;
        match ask(&socket, to, Duration::from_millis(300)) {
            Ok(a) => answered = Some(a),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    let fresh = first_answer(bed.client(), to, "a fresh client after the change");
    let Some(after) = answered else {
        panic!(
            "the client on {source} got no answer in {tries} tries over {:?} after its \
             listener was retired (last: {last}); a fresh client was answered by {}",
            t0.elapsed(),
            fresh.name
        );
    };
    eprintln!("answered again after {tries} tries ({:?})", t0.elapsed());
    assert_eq!(after.name, backend_name(0));
    assert_eq!(
        after.from, to,
        "the answer must come from the Service address"
    );
    assert_eq!(socket.local_addr().expect("client address"), source);

    let metrics = uproxy_lab::e2e::http_get(
        bed.node(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 10249)),
        "/metrics",
    )
    .map(|(_, body)| body)
    .unwrap_or_default();
    let flushed = metric_sum(&metrics, "kubeuproxy_conntrack_flushed_total", "");
    let errors = metric_sum(&metrics, "kubeuproxy_conntrack_flush_errors_total", "");
    assert!(
        flushed >= 1.0 && errors == 0.0,
        "conntrack flushed {flushed}, errors {errors}:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("conntrack"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
