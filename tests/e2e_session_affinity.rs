//! End-to-end tests of `sessionAffinity: ClientIP` (issue 10 item 5), in
//! the spirit of the upstream conformance tests "should have session
//! affinity work for service with type clusterIP / NodePort", "… timeout
//! work …" and "should be able to switch session affinity".
//!
//! The client namespace gets extra addresses (10.200.0.3 and up) so that
//! several client IPs talk to one Service; each connection (or UDP socket)
//! is bound to one of them. Backends are the whoami servers (TCP greeting,
//! UDP answer naming the backend) of tests/lab/src/e2e.rs. Needs root and
//! `nft`, like every e2e test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use uproxy_lab::e2e::{
    BACKEND_PORT, Backend, CONNECT_TIMEOUT, IO_TIMEOUT, ProxyProcess, READY_TIMEOUT, SVC_PORT,
    Testbed, VIP_A, VIP_B, backend_name, close, manifests, poll, read_line, vip, wait_nft_key,
    write_by_rename,
};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, ServiceType};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, Netns, backend_addr, peers};

/// The `n`-th client IP (0: the client namespace's own 10.200.0.2).
fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 2 + n)
}

/// Gives the client namespace the client IPs 1..n (0 exists already).
fn add_client_ips(client: &Netns, n: u8) {
    for i in 1..n {
        client
            .output(
                "ip",
                [
                    "addr",
                    "add",
                    &format!("{}/24", client_ip(i)),
                    "dev",
                    "eth0",
                ],
            )
            .unwrap_or_else(|e| panic!("adding client IP {}: {e}", client_ip(i)));
    }
}

fn ep(i: usize) -> EndpointManifest {
    EndpointManifest::ready(backend_addr(i))
}

/// Service `name`, TCP 80 → 8080, with `endpoints`; `affinity`: the
/// `timeoutSeconds` of `sessionAffinity: ClientIP`, or none.
fn tcp_svc(name: &str, ip: Ipv4Addr, eps: &[usize], affinity: Option<i32>) -> ServiceManifest {
    let s = ServiceManifest::new(name, ip)
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(eps.iter().map(|i| ep(*i)).collect());
    match affinity {
        Some(t) => s.with_client_ip_affinity(t),
        None => s,
    }
}

struct Env {
    proxy: ProxyProcess,
    manifests: PathBuf,
    bed: Testbed,
}

impl Env {
    /// A lab with `backends` whoami backends, `clients` client IPs, and the
    /// proxy running on `services`.
    fn start(tag: &str, backends: usize, clients: u8, services: &[ServiceManifest]) -> Env {
        let bed = Testbed::new("affinity", tag, &vec![Backend::Whoami; backends]);
        add_client_ips(bed.client(), clients);
        let (proxy, path) = bed.start_proxy(&manifests(services), &[]);
        Env {
            proxy,
            manifests: path,
            bed,
        }
    }

    fn rewrite(&self, services: &[ServiceManifest]) {
        write_by_rename(&self.manifests, &manifests(services));
    }

    fn wait_mapped(&mut self, ip: Ipv4Addr) {
        let node = self.bed.node().clone();
        wait_nft_key(
            &mut self.proxy,
            &node,
            "map",
            "service-ports",
            ip,
            true,
            "waiting for the Service's rule",
        );
    }

    /// The backend a new TCP connection from client IP `n` to `to` reaches.
    fn who(&self, n: u8, to: SocketAddr) -> io::Result<String> {
        let src = client_ip(n);
        let mut s = self
            .bed
            .client()
            .run(move || -> io::Result<TcpStream> {
                let sock =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                sock.bind(&SocketAddr::from((src, 0)).into())?;
                sock.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
                Ok(sock.into())
            })
            .map_err(io::Error::other)??;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let name = read_line(&mut s)?;
        close(s);
        Ok(name)
    }

    fn who_or_panic(&self, n: u8, to: SocketAddr, what: &str) -> String {
        self.who(n, to)
            .unwrap_or_else(|e| panic!("{what}: client {} to {to}: {e}", client_ip(n)))
    }

    /// The backends `count` new connections from client IP `n` reach.
    fn backends_seen(&self, n: u8, to: SocketAddr, count: usize, what: &str) -> Vec<String> {
        (0..count)
            .map(|i| self.who_or_panic(n, to, &format!("{what}, connection {i}")))
            .collect()
    }

    /// Asserts that `count` new connections from client IP `n` all reach
    /// one backend, and returns it.
    fn sticks(&self, n: u8, to: SocketAddr, count: usize, what: &str) -> String {
        let seen = self.backends_seen(n, to, count, what);
        let distinct: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{what}: client {} reached several backends: {seen:?}",
            client_ip(n)
        );
        seen[0].clone()
    }

    /// Waits until new connections from client IP `n` spread over more
    /// than one backend (affinity off, or the change applied).
    fn wait_spread(&mut self, n: u8, to: SocketAddr, what: &str) {
        let mut last = Vec::new();
        let waited = poll(READY_TIMEOUT, Duration::from_millis(100), || {
            last = self.backends_seen(n, to, 6, what);
            let distinct: BTreeSet<&String> = last.iter().collect();
            if distinct.len() > 1 {
                Ok(())
            } else {
                Err(format!("{last:?}"))
            }
        });
        if let Err(e) = waited {
            self.proxy.assert_running(what);
            panic!("{what}: client {} still on one backend: {e}", client_ip(n));
        }
    }

    /// `kubeuproxy_session_affinity_clients` of Service `name`'s port, as
    /// scraped from the metrics address in the node namespace.
    fn affinity_clients(&self, name: &str, protocol: &str) -> Option<f64> {
        let body = self
            .bed
            .node()
            .run(|| -> io::Result<String> {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 10249));
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .ok()?
            .ok()?;
        let labels = format!("service=\"{name}\",port_name=\"\",protocol=\"{protocol}\"");
        body.lines()
            .find(|l| l.starts_with("kubeuproxy_session_affinity_clients{") && l.contains(&labels))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
    }

    fn wait_affinity_clients(&mut self, name: &str, protocol: &str, want: f64, what: &str) {
        let mut last = None;
        let waited = poll(READY_TIMEOUT, Duration::from_millis(200), || {
            last = self.affinity_clients(name, protocol);
            if last == Some(want) {
                Ok(())
            } else {
                Err(format!("{last:?}"))
            }
        });
        if let Err(e) = waited {
            self.proxy.assert_running(what);
            panic!("{what}: kubeuproxy_session_affinity_clients of {name} never {want}; last {e}");
        }
    }
}

// ---------------------------------------------------------------------------

#[test]
fn session_affinity_keeps_each_client_ip_on_one_endpoint_for_cluster_ip_and_node_port_and_can_be_switched()
 {
    if !lab::require_root_and_nft("session_affinity_keeps_each_client_ip_on_one_endpoint") {
        return;
    }
    const NODE_PORT: u16 = 30080;
    let svc = |affinity| {
        ServiceManifest {
            ports: vec![PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(NODE_PORT)],
            ..tcp_svc("sticky", VIP_A, &[0, 1, 2], affinity)
        }
        .with_type(ServiceType::NodePort)
    };
    let mut env = Env::start("sticky", 3, 5, &[svc(Some(10800))]);
    env.wait_mapped(VIP_A);

    // Five client IPs, 20 connections each to the ClusterIP: each stays on
    // one backend; round-robin spreads the clients themselves.
    let homes: BTreeMap<u8, String> = (0..5)
        .map(|n| (n, env.sticks(n, vip(VIP_A), 20, "ClusterIP")))
        .collect();
    let used: BTreeSet<&String> = homes.values().collect();
    assert!(used.len() >= 2, "every client on one backend: {homes:?}");

    // The node port reaches the same listener: the same backend per client.
    let node_port = SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT));
    for n in 0..2 {
        let mut seen = String::new();
        poll(READY_TIMEOUT, Duration::from_millis(100), || {
            seen = env.who(n, node_port).map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("node port never answered: {e}"));
        assert_eq!(seen, homes[&n], "client {n} through the node port");
        assert_eq!(env.sticks(n, node_port, 20, "NodePort"), homes[&n]);
    }

    // Affinity switched off in the manifests: new connections spread.
    env.rewrite(&[svc(None)]);
    env.wait_spread(0, vip(VIP_A), "after sessionAffinity: None");
    let seen: BTreeSet<String> = env
        .backends_seen(1, vip(VIP_A), 9, "affinity off")
        .into_iter()
        .collect();
    assert_eq!(seen.len(), 3, "round-robin over three backends: {seen:?}");

    // And on again: each client sticks again (wherever it lands now).
    env.rewrite(&[svc(Some(10800))]);
    let mut home = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(200), || {
        let seen = env.backends_seen(0, vip(VIP_A), 6, "affinity back on");
        let distinct: BTreeSet<&String> = seen.iter().collect();
        if distinct.len() == 1 {
            home = seen[0].clone();
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("affinity switched on again never took effect: {e}"));
    assert_eq!(env.sticks(0, vip(VIP_A), 20, "affinity on again"), home);
}

#[test]
fn session_affinity_times_out_after_timeout_seconds_without_a_new_connection() {
    if !lab::require_root_and_nft("session_affinity_times_out_after_timeout_seconds") {
        return;
    }
    // timeoutSeconds: 2, round-robin over two backends: a client whose
    // entry expired is balanced again, to the other backend.
    let mut env = Env::start("expiry", 2, 1, &[tcp_svc("brief", VIP_A, &[0, 1], Some(2))]);
    env.wait_mapped(VIP_A);
    let home = env.sticks(0, vip(VIP_A), 5, "first connections");
    env.wait_affinity_clients("brief", "TCP", 1.0, "one client remembered");
    // Refreshed by each new connection: one a second for 5 s (longer than
    // the timeout in all) keeps the client where it is.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            env.who_or_panic(0, vip(VIP_A), "refreshing"),
            home,
            "the entry expired although the client came back within 2 s"
        );
    }
    // 2 s without a new connection: forgotten (and swept: the gauge drops).
    std::thread::sleep(Duration::from_millis(2500));
    let moved = env.who_or_panic(0, vip(VIP_A), "after the timeout");
    assert_ne!(
        moved, home,
        "the client was not balanced again after the timeout"
    );
    assert_eq!(env.sticks(0, vip(VIP_A), 10, "after the timeout"), moved);
    std::thread::sleep(Duration::from_millis(2500));
    env.wait_affinity_clients("brief", "TCP", 0.0, "the expired client swept out");
}

#[test]
fn session_affinity_an_endpoint_that_leaves_releases_its_clients() {
    if !lab::require_root_and_nft("session_affinity_an_endpoint_that_leaves_releases_its_clients") {
        return;
    }
    let all = [0, 1, 2];
    let mut env = Env::start("leave", 3, 3, &[tcp_svc("web", VIP_A, &all, Some(10800))]);
    env.wait_mapped(VIP_A);
    let homes: Vec<String> = (0..3)
        .map(|n| env.sticks(n, vip(VIP_A), 10, "before"))
        .collect();
    // Client 0's backend leaves the slice.
    let gone = (0..3)
        .find(|i| backend_name(*i) == homes[0])
        .expect("a known backend");
    let rest: Vec<usize> = all.iter().copied().filter(|i| *i != gone).collect();
    env.rewrite(&[tcp_svc("web", VIP_A, &rest, Some(10800))]);
    let mut moved = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        moved = env.who(0, vip(VIP_A)).map_err(|e| e.to_string())?;
        if moved == homes[0] {
            Err("still on the removed backend".into())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("client 0 never left the removed backend: {e}"));
    assert_eq!(env.sticks(0, vip(VIP_A), 20, "moved"), moved);
    // Clients of the backends that stayed were not disturbed.
    for n in 1..3 {
        if homes[usize::from(n)] != homes[0] {
            assert_eq!(
                env.sticks(n, vip(VIP_A), 10, "unaffected"),
                homes[usize::from(n)]
            );
        }
    }
    // The backend comes back: client 0 stays where it moved.
    env.rewrite(&[tcp_svc("web", VIP_A, &all, Some(10800))]);
    env.wait_affinity_clients("web", "TCP", 3.0, "three clients remembered");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(env.who_or_panic(0, vip(VIP_A), "backend back"), moved);
    }
}

#[test]
fn session_affinity_holds_for_udp_flows_of_one_client_ip() {
    if !lab::require_root_and_nft("session_affinity_holds_for_udp_flows_of_one_client_ip") {
        return;
    }
    let udp = |name: &str, ip, affinity: Option<i32>| {
        let s = ServiceManifest::new(name, ip)
            .with_port(PortManifest::udp(SVC_PORT, BACKEND_PORT))
            .with_endpoints((0..3).map(ep).collect());
        match affinity {
            Some(t) => s.with_client_ip_affinity(t),
            None => s,
        }
    };
    let mut env = Env::start(
        "udp",
        3,
        3,
        &[udp("dns", VIP_A, Some(10800)), udp("plain", VIP_B, None)],
    );
    let _udp_servers: Vec<_> = (0..3)
        .map(|i| {
            let socket = env.bed.lab.backends()[i]
                .udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                .expect("backend UDP socket");
            let _guard = env.bed.runtime().enter();
            peers::udp_whoami(socket, &backend_name(i)).expect("UDP whoami")
        })
        .collect();
    // Each fresh socket is a new flow (a new source port).
    let ask = |n: u8, to: SocketAddr| -> io::Result<String> {
        let socket: UdpSocket = env
            .bed
            .client()
            .udp_socket(SocketAddr::from((client_ip(n), 0)))
            .map_err(io::Error::other)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        socket.send_to(b"who", to)?;
        let mut buf = [0u8; 512];
        let (len, _) = socket.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        Ok(text.split(' ').next().unwrap_or_default().to_string())
    };
    for ip in [VIP_A, VIP_B] {
        poll(READY_TIMEOUT, Duration::from_millis(100), || {
            env.proxy.assert_running("waiting for the UDP Services");
            ask(0, vip(ip)).map(|_| ()).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{ip}: no UDP answer: {e}"));
    }
    let flows = |n: u8, to| -> BTreeSet<String> {
        (0..12)
            .map(|i| ask(n, vip(to)).unwrap_or_else(|e| panic!("client {n}, flow {i}: {e}")))
            .collect()
    };
    let mut homes = BTreeSet::new();
    for n in 0..3 {
        let seen = flows(n, VIP_A);
        assert_eq!(seen.len(), 1, "client {n}'s flows spread: {seen:?}");
        homes.extend(seen);
    }
    assert!(homes.len() >= 2, "every client on one backend: {homes:?}");
    // The same without affinity spreads: the test would see it.
    assert_eq!(flows(0, VIP_B).len(), 3, "round-robin without affinity");
    env.wait_affinity_clients("dns", "UDP", 3.0, "three UDP clients remembered");
}
