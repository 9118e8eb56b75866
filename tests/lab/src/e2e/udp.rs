//! TCP and UDP end-to-end helpers over [`Testbed`]: backends that answer
//! whoami over both protocols on [`BACKEND_PORT`], UDP clients that match
//! each answer to the datagram that asked for it, waits for nft keys of
//! any protocol, and assertions that an address is (not) proxied.
//!
//! Shared by tests/e2e_udp.rs, tests/e2e_nodeport.rs and
//! tests/e2e_external_addresses.rs. Clients run in the lab's namespaces,
//! never in the root one.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, assert_echo,
    backend_name, close, hold, poll,
};
use crate::manifests::EndpointManifest;
use crate::peers::{self, MAX_UDP_PAYLOAD, PeerHandle};
use crate::{Netns, backend_addr};

/// How long a UDP client waits for one answer before calling it lost.
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Bound for a TCP connect that must time out (dropped) or succeed.
pub const TCP_WAIT: Duration = Duration::from_secs(2);
/// The node port of the TCP port of the tests' NodePort Services.
pub const NODE_PORT_TCP: u16 = 30080;
/// The node port of their UDP port.
pub const NODE_PORT_UDP: u16 = 30081;

// ---------------------------------------------------------------------------
// Manifests.

/// The endpoint of backend `i`: Pod `web-<i>` on node-1, ready.
pub fn ep(i: usize) -> EndpointManifest {
    EndpointManifest {
        node_name: Some("node-1".to_string()),
        pod: Some(format!("web-{i}")),
        ..EndpointManifest::ready(backend_addr(i))
    }
}

// ---------------------------------------------------------------------------
// The lab: TCP and UDP whoami on 8080 in every backend.

/// A [`Testbed`] whose backends run the TCP whoami and a UDP whoami
/// ([`peers::udp_whoami`]: `"<name> <source it saw> <datagram>"`), both on
/// [`BACKEND_PORT`].
pub struct UdpBed {
    /// The UDP whoami of each backend; `None` once stopped.
    pub udp: Vec<Option<PeerHandle>>,
    bed: Testbed,
}

impl UdpBed {
    /// `n_backends` backends; the directory is tagged `udp-<tag>`.
    pub fn new(tag: &str, n_backends: usize) -> UdpBed {
        let bed = Testbed::new("udp", tag, &vec![Backend::Whoami; n_backends]);
        let udp = (0..n_backends)
            .map(|i| {
                let socket = bed.lab.backends()[i]
                    .udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                    .expect("backend UDP socket");
                let _guard = bed.runtime().enter();
                Some(peers::udp_whoami(socket, &backend_name(i)).expect("UDP whoami"))
            })
            .collect();
        UdpBed { udp, bed }
    }

    /// The namespace of backend `i`.
    pub fn backend(&self, i: usize) -> &Netns {
        &self.bed.lab.backends()[i]
    }

    /// Stops backend `i`'s UDP server and waits until its port is closed
    /// (datagrams to it then get ICMP port unreachable).
    pub fn stop_udp(&mut self, i: usize) {
        drop(self.udp[i].take());
        let ns = self.backend(i).clone();
        poll(Duration::from_secs(5), Duration::from_millis(20), || {
            let bound = udp_ports_bound(&ns);
            if bound.contains(&BACKEND_PORT) {
                Err(format!("UDP ports still bound in backend {i}: {bound:?}"))
            } else {
                Ok(())
            }
        })
        .unwrap_or_else(|e| panic!("stopping the UDP server of backend {i}: {e}"));
    }
}

impl Deref for UdpBed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.bed
    }
}

impl DerefMut for UdpBed {
    fn deref_mut(&mut self) -> &mut Testbed {
        &mut self.bed
    }
}

/// Local ports of the sockets `ss -Hlnu` / `-Hltnu` lists in `ns`.
pub fn listed_ports(ns: &Netns, flags: &str) -> Vec<(String, u16)> {
    let out = ns
        .output("ss", [flags])
        .unwrap_or_else(|e| panic!("ss {flags} in {}: {e}", ns.name()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Netid State Recv-Q Send-Q Local:Port Peer:Port
            let local = fields.get(4)?;
            let port = local.rsplit(':').next()?.parse().ok()?;
            Some((line.to_string(), port))
        })
        .collect()
}

fn udp_ports_bound(ns: &Netns) -> Vec<u16> {
    listed_ports(ns, "-Hlnu")
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}
// ---------------------------------------------------------------------------
// Waiting for the rules.

/// Whether an nft key (as [`Netns::nft_keys`] gives it) is `ip . proto . port`.
pub fn key_is(key: &[Value], ip: Ipv4Addr, proto: &str, port: u16) -> bool {
    let number = if proto == "tcp" { 6 } else { 17 };
    key.len() == 3
        && key[0].as_str() == Some(ip.to_string().as_str())
        && (key[1].as_str() == Some(proto) || key[1].as_u64() == Some(number))
        && key[2].as_u64() == Some(u64::from(port))
}

/// Waits until `ip . proto . port` is in the contract's map `service-ports`
/// (or set `no-endpoints`, `kind` `"set"`), while the proxy runs.
pub fn wait_key(
    proxy: &mut ProxyProcess,
    node: &Netns,
    kind: &str,
    name: &str,
    ip: Ipv4Addr,
    proto: &str,
    port: u16,
) {
    let why = format!("{ip} {proto} {port} in {kind} {name}");
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running(&why);
        let keys = node
            .nft_keys(kind, "ip", "kube-uproxy", name)
            .map_err(|e| e.to_string())?;
        if keys.iter().any(|k| key_is(k, ip, proto, port)) {
            Ok(())
        } else {
            Err(format!("keys: {keys:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("waiting for {why}: {e}"));
}

/// Waits until both `ip . tcp . 80` and `ip . udp . 80` are mapped.
pub fn wait_tcp_udp(proxy: &mut ProxyProcess, node: &Netns, ip: Ipv4Addr) {
    wait_key(proxy, node, "map", "service-ports", ip, "tcp", SVC_PORT);
    wait_key(proxy, node, "map", "service-ports", ip, "udp", SVC_PORT);
}
// ---------------------------------------------------------------------------
// UDP clients (sockets created in a namespace, used from any thread).

/// An unconnected UDP socket on an ephemeral port of `ns`.
pub fn udp_client(ns: &Netns) -> UdpSocket {
    ns.udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap_or_else(|e| panic!("UDP socket in {}: {e}", ns.name()))
}

/// A UDP whoami answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Which backend answered.
    pub name: String,
    /// The source address the backend saw (the proxy's upstream socket).
    pub seen: SocketAddr,
    /// Where the answer came from, as the client saw it.
    pub from: SocketAddr,
}

static TAG: AtomicU64 = AtomicU64::new(1);

fn parse_answer(datagram: &[u8], from: SocketAddr, tag: &str) -> Option<Answer> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut parts = text.splitn(3, ' ');
    let name = parts.next()?.to_string();
    let seen = parts.next()?.parse().ok()?;
    (parts.next()? == tag).then_some(Answer { name, seen, from })
}

/// Sends a fresh tag to `to` and waits up to `wait` for the whoami answer
/// carrying it (older answers are skipped). `TimedOut` if none came; other
/// errors (e.g. `ConnectionRefused`) as the socket reported them.
pub fn ask(socket: &UdpSocket, to: SocketAddr, wait: Duration) -> io::Result<Answer> {
    let tag = format!("q{}", TAG.fetch_add(1, Ordering::Relaxed));
    socket.send_to(tag.as_bytes(), to)?;
    receive_answer(socket, &tag, wait, |s, buf| s.recv_from(buf))
}

/// Like [`ask`] on a connected socket (which only accepts datagrams from
/// the address it is connected to).
pub fn ask_connected(socket: &UdpSocket, wait: Duration) -> io::Result<Answer> {
    let tag = format!("q{}", TAG.fetch_add(1, Ordering::Relaxed));
    socket.send(tag.as_bytes())?;
    let peer = socket.peer_addr()?;
    receive_answer(socket, &tag, wait, |s, buf| s.recv(buf).map(|n| (n, peer)))
}

fn receive_answer(
    socket: &UdpSocket,
    tag: &str,
    wait: Duration,
    recv: impl Fn(&UdpSocket, &mut [u8]) -> io::Result<(usize, SocketAddr)>,
) -> io::Result<Answer> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer to {tag} within {wait:?}"),
            ));
        }
        socket.set_read_timeout(Some(left))?;
        match recv(socket, &mut buf) {
            Ok((n, from)) => {
                if let Some(answer) = parse_answer(&buf[..n], from, tag) {
                    return Ok(answer);
                }
            }
            // A timeout, or a signal: with SO_RCVTIMEO set, recv is never
            // restarted (EINTR whenever a child of another test exits).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks from a fresh socket in `ns` until answered (the rules for a new
/// kind of address may land a moment after the ClusterIP's); panics after
/// [`READY_TIMEOUT`].
pub fn first_answer(ns: &Netns, to: SocketAddr, what: &str) -> Answer {
    let socket = udp_client(ns);
    let mut answer = None;
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let a = ask(&socket, to, Duration::from_millis(400)).map_err(|e| e.to_string())?;
        answer = Some(a);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: no answer from {to} within {READY_TIMEOUT:?}: {e}"));
    answer.expect("set on success")
}

/// A whoami greeting over TCP from `ns` to `to`, retried until it works
/// (bounded like [`first_answer`]); checks the echo too.
pub fn tcp_greeting(ns: &Netns, to: SocketAddr, what: &str) -> String {
    let mut name = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let (mut s, n) = hold(ns, to).map_err(|e| format!("{e} ({:?})", e.kind()))?;
        assert_echo(&mut s, "ping", what);
        close(s);
        name = n;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: TCP to {to} never answered: {e}"));
    name
}

/// Asserts that a TCP connect from `ns` to `to` times out (the SYN is
/// dropped): not refused, not answered.
pub fn assert_tcp_dropped(ns: &Netns, to: SocketAddr, what: &str) {
    let t0 = Instant::now();
    match ns.tcp_connect(to, TCP_WAIT) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Err(e) => panic!(
            "{what}: connect to {to} failed after {:?} with {e} ({:?}) instead of timing out (dropped)",
            t0.elapsed(),
            e.kind()
        ),
        Ok(_) => panic!("{what}: connect to {to} succeeded; it should have been dropped"),
    }
}

/// Asserts that a TCP connect from `ns` to `to` does not reach anything.
pub fn assert_tcp_not_proxied(ns: &Netns, to: SocketAddr, what: &str) {
    if let Ok((s, name)) = hold(ns, to) {
        close(s);
        panic!("{what}: TCP to {to} was proxied (answered by {name:?})");
    }
}

/// Asserts that no whoami answers a datagram from `ns` to `to`.
pub fn assert_udp_not_proxied(ns: &Netns, to: SocketAddr, what: &str) {
    let socket = udp_client(ns);
    for _ in 0..2 {
        match ask(&socket, to, ANSWER_WAIT) {
            Ok(a) => panic!("{what}: UDP to {to} was proxied: {a:?}"),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            // ICMP port unreachable from the node: not proxied either.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("{what}: UDP to {to}: unexpected error {e}"),
        }
    }
}
