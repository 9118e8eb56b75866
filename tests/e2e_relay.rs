//! End-to-end tests of the relay as an operator sees it (issue 19, items
//! 10 and 11): `kubeuproxy_relayed_bytes_total` counts the bytes of a
//! connection while it is still open and of one that ends with a reset;
//! the splice pipes stay under `--splice-pipes-max`.
//!
//! The release binary runs in the node namespace of a [`Testbed`]; the
//! client connects from the client namespace to a ClusterIP; `/metrics` is
//! scraped inside the node namespace (127.0.0.1:10249 there).
//!
//! These tests need root and `nft`; without them they print `SKIP ...` (or
//! fail, if `CI` is set).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, ProxyProcess, SVC_PORT, Testbed, VIP_A, VIP_B, connect, http_get,
    manifests, poll, read_line, vip, wait_nft_key,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest};
use uproxy_lab::{self as lab, Netns, backend_addr, peers};

const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// A Service on `ip` whose one endpoint is backend 0 (a whoami server:
/// greets with `backend0\n`, then echoes).
fn svc(name: &str, ip: Ipv4Addr) -> ServiceManifest {
    ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![EndpointManifest::ready(backend_addr(0))])
}

/// Starts the proxy on `services` and waits until each ClusterIP is
/// mapped and `/metrics` answers.
fn proxy_for(bed: &Testbed, services: &[(&str, Ipv4Addr)], extra: &[&str]) -> ProxyProcess {
    let list: Vec<ServiceManifest> = services.iter().map(|(n, ip)| svc(n, *ip)).collect();
    let (mut p, _) = bed.start_proxy(&manifests(&list), extra);
    for (name, ip) in services {
        wait_nft_key(
            &mut p,
            bed.node(),
            "map",
            "service-ports",
            *ip,
            true,
            &format!("{name} programmed"),
        );
    }
    poll(Duration::from_secs(20), Duration::from_millis(50), || {
        p.assert_running("waiting for /metrics");
        http_get(bed.node(), METRICS, "/metrics").map(|_| ())
    })
    .expect("/metrics never answered");
    p
}

/// `kubeuproxy_relayed_bytes_total` of Service `service` (default
/// namespace, unnamed TCP port): (to_endpoint, to_client); 0 for a series
/// not there yet.
fn relayed(node: &Netns, service: &str) -> Result<(u64, u64), String> {
    let (status, body) = http_get(node, METRICS, "/metrics")?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let value = |direction: &str| {
        body.lines()
            .filter(|l| l.starts_with("kubeuproxy_relayed_bytes_total{"))
            .filter(|l| {
                l.contains(&format!("service=\"{service}\""))
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok((value("to_endpoint"), value("to_client")))
}

/// Polls (for at most 5 s) until `service`'s counters are `want`.
fn wait_relayed(node: &Netns, service: &str, want: (u64, u64), what: &str) {
    let mut last = Ok((0, 0));
    let reached = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        last = relayed(node, service);
        match &last {
            Ok(got) if *got == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    if let Err(e) = reached {
        panic!(
            "{what}: kubeuproxy_relayed_bytes_total of {service} (to_endpoint, to_client) \
             never became {want:?} within 5 s; last: {e}"
        );
    }
}

/// `len` bytes of a pattern that does not repeat at short periods.
fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Sends `payload` on the connection and reads its echo back (from
/// another thread, so that neither side's buffers fill up).
fn echo_round_trip(s: &mut TcpStream, payload: &[u8]) {
    let mut reader = s.try_clone().expect("clone the client socket");
    let len = payload.len();
    let back = thread::spawn(move || {
        let mut got = vec![0u8; len];
        reader.read_exact(&mut got).map(|()| got)
    });
    s.write_all(payload).expect("sending the payload");
    let got = back
        .join()
        .expect("reader thread")
        .expect("reading the echo");
    assert!(got == payload, "the echo differs from what was sent");
}

#[test]
fn relayed_bytes_show_while_a_long_connection_is_still_open() {
    if !lab::require_root_and_nft("relayed_bytes_show_while_a_long_connection_is_still_open") {
        return;
    }
    let bed = Testbed::new("relay", "open-bytes", &[Backend::Whoami]);
    let _p = proxy_for(&bed, &[("web", VIP_A)], &[]);
    let mut s = connect(bed.client(), vip(VIP_A)).expect("connect to web");
    let greeting = read_line(&mut s).expect("greeting");
    // Bulk (spliced) both ways, then, after a quiet second and more, one
    // small message each way: the connection stays open throughout.
    let bulk = data(3 * 1024 * 1024 + 11);
    echo_round_trip(&mut s, &bulk);
    thread::sleep(Duration::from_millis(1300));
    echo_round_trip(&mut s, b"ping\n");
    let sent = bulk.len() as u64 + 5;
    let want = (sent, greeting.len() as u64 + 1 + sent);
    wait_relayed(bed.node(), "web", want, "an open connection");
    // Still open, still working.
    echo_round_trip(&mut s, b"still here\n");
}

#[test]
fn relayed_bytes_of_a_connection_that_ends_with_a_reset_are_counted() {
    if !lab::require_root_and_nft(
        "relayed_bytes_of_a_connection_that_ends_with_a_reset_are_counted",
    ) {
        return;
    }
    let bed = Testbed::new("relay", "reset-bytes", &[Backend::Whoami]);
    let _p = proxy_for(&bed, &[("web", VIP_B)], &[]);
    let mut s = connect(bed.client(), vip(VIP_B)).expect("connect to web");
    let greeting = read_line(&mut s).expect("greeting");
    let bulk = data(2 * 1024 * 1024 + 3);
    echo_round_trip(&mut s, &bulk);
    echo_round_trip(&mut s, b"bye\n");
    // The client aborts: the proxy's relay ends with an error.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(s);
    let sent = bulk.len() as u64 + 4;
    let want = (sent, greeting.len() as u64 + 1 + sent);
    wait_relayed(bed.node(), "web", want, "a reset connection");
}

/// Pipe fds the process `pid` holds now.
fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The value of the unlabelled series `name` in `/metrics`.
fn metric(node: &Netns, name: &str) -> Option<f64> {
    let (_, body) = http_get(node, METRICS, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn with_splice_pipes_max_2_concurrent_bulk_uploads_arrive_intact_and_hold_at_most_2_pipes() {
    if !lab::require_root_and_nft(
        "with_splice_pipes_max_2_concurrent_bulk_uploads_arrive_intact_and_hold_at_most_2_pipes",
    ) {
        return;
    }
    const CAP: usize = 2;
    const FLOWS: usize = 6;
    let bed = Testbed::new("relay", "pipe-cap", &[Backend::Sha256]);
    let mut p = proxy_for(&bed, &[("sink", VIP_A)], &["--splice-pipes-max", "2"]);
    let pid = p.child.id();
    let before = pipe_fds(pid);
    assert_eq!(
        metric(bed.node(), "kubeuproxy_splice_pipes_max"),
        Some(CAP as f64)
    );
    // Six uploads at once, each of its own bytes, each hashed by the
    // backend (sha256 peer) and compared with the client's own hash.
    let clients: Vec<_> = (0..FLOWS)
        .map(|i| {
            let mut s = connect(bed.client(), vip(VIP_A)).expect("connect to sink");
            thread::spawn(move || {
                let payload: Vec<u8> = data(24 * 1024 * 1024 + i)
                    .into_iter()
                    .map(|b| b ^ (i as u8).wrapping_mul(37))
                    .collect();
                s.write_all(&payload).expect("upload");
                s.shutdown(Shutdown::Write).expect("half-close");
                let mut reply = String::new();
                s.read_to_string(&mut reply).expect("the backend's hash");
                assert_eq!(
                    reply.trim(),
                    peers::hex(&Sha256::digest(&payload)),
                    "upload {i} arrived altered"
                );
            })
        })
        .collect();
    // Meanwhile: the proxy's pipe fds, sampled (bounded in time).
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clients.iter().all(|c| c.is_finished()) && Instant::now() < deadline {
        most = most.max(pipe_fds(pid).saturating_sub(before));
        thread::sleep(Duration::from_millis(2));
    }
    for c in clients {
        c.join().expect("an upload failed");
    }
    p.assert_running("the uploads");
    // Two fds per pipe.
    assert!(
        most <= 2 * CAP,
        "the proxy held {most} pipe fds (cap {CAP} pipes)"
    );
    assert!(most > 0, "no upload was spliced");
    let fallbacks = metric(bed.node(), "kubeuproxy_splice_pipe_fallbacks_total").unwrap_or(0.0);
    assert!(
        fallbacks > 0.0,
        "no bulk direction had to copy: {fallbacks}"
    );
    poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || match metric(bed.node(), "kubeuproxy_splice_pipes_in_use") {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .expect("pipes still in use after every upload ended");
}
