//! End-to-end tests of IPv6 and dual-stack Services (issue 10, item 7).
//! The release binary runs in the node namespace of a [`Lab`] that has
//! IPv6 addresses beside its IPv4 ones ([`Lab::add_ipv6`]); clients run in
//! the client (a pod routed through the node, or another host) and node
//! namespaces, never in the root one.
//!
//! - An IPv6 ClusterIP over TCP and UDP, from a pod and from the node,
//!   answered from the Service address.
//! - A dual-stack Service reached over both families from a pod, each
//!   ClusterIP served by its own family's endpoints only; an IPv6 side
//!   left without endpoints refuses while IPv4 goes on.
//! - An IPv6 NodePort from another host, with `--nodeport-addresses`
//!   holding IPv4 and IPv6 CIDRs; not on the IPv4 addresses of a
//!   single-stack IPv6 Service. An IPv6 externalIP; IPv6 LB IPs admitting
//!   their IPv6 source ranges and dropping other sources; the IPv4
//!   externalIP of an IPv6-only Service left alone.
//! - IPv6 refusals (TCP reset every time, ICMPv6 port unreachable for
//!   UDP) and the proxy-port guard on the IPv6 proxy address.
//! - The `ip6` table repaired after it is deleted, its proxy ports taken
//!   back by the next instance, and `--cleanup` removing it and the IPv6
//!   proxy address.
//! - A node with IPv6 disabled serves IPv4 and logs each IPv6 Service
//!   once as not served.
//!
//! These tests need root and `nft`; without root they print `SKIP ...`
//! (or fail, if `CI` is set).
//!
//! [`Lab`]: uproxy_lab::Lab
//! [`Lab::add_ipv6`]: uproxy_lab::Lab::add_ipv6

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use uproxy_lab::e2e::{
    self, BACKEND_PORT, Backend, ProxyProcess, READY_TIMEOUT, SVC_PORT, Testbed, close, hold, poll,
    write_by_rename,
};
use uproxy_lab::peers::{self, PeerHandle};
use uproxy_lab::{self as lab, Netns, backend_addr, backend_addr_v6};

const VIP6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const VIP6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const VIP6_C: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);
const VIP6_D: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x13);
const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x8, 0, 0, 0, 0, 0, 0x8);
const LB_V6_ADMITS: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x8, 0, 0, 0, 0, 0, 0x9);
const LB_V6_DROPS: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x8, 0, 0, 0, 0, 0, 0xa);
const VIP4_A: &str = "10.96.0.10";
const PROXY_V6: &str = "fd6b:7570:7278::1";
const NODE_PORT: u16 = 30080;
const ANSWER_WAIT: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------
// Manifests: Services with any mix of ClusterIP families, one slice per
// family.

#[derive(Clone)]
struct Svc {
    name: &'static str,
    cluster_ips: Vec<IpAddr>,
    /// TCP port 80, and UDP port 80 too when set.
    udp: bool,
    node_port: Option<u16>,
    /// `spec.externalIPs`.
    external_ips: Vec<IpAddr>,
    /// A LoadBalancer ingress IP and the Service's source ranges.
    lb: Option<(IpAddr, Vec<&'static str>)>,
    /// Ready endpoints (both families mixed; each goes to its family's
    /// slice), target port 8080.
    endpoints: Vec<IpAddr>,
}

impl Svc {
    fn new(name: &'static str, cluster_ips: &[IpAddr], endpoints: &[IpAddr]) -> Svc {
        Svc {
            name,
            cluster_ips: cluster_ips.to_vec(),
            udp: false,
            node_port: None,
            external_ips: Vec::new(),
            lb: None,
            endpoints: endpoints.to_vec(),
        }
    }
}

static VERSION: AtomicU64 = AtomicU64::new(100);

fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A `kind: List` of the Services and their slices, as `kubectl get -o
/// yaml` prints dual-stack ones (`clusterIPs`, `ipFamilies`).
fn yaml(svcs: &[Svc]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for s in svcs {
        let rv = VERSION.fetch_add(1, Ordering::Relaxed);
        let ips: Vec<String> = s.cluster_ips.iter().map(|ip| format!("\"{ip}\"")).collect();
        let families: Vec<&str> = s.cluster_ips.iter().map(family_name).collect();
        let kind = if s.lb.is_some() {
            "LoadBalancer"
        } else if s.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let _ = write!(
            out,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: {name}, namespace: default, resourceVersion: \"{rv}\"}}\n  spec:\n    type: {kind}\n    clusterIP: {first}\n    clusterIPs: [{ips}]\n    ipFamilies: [{families}]\n    ipFamilyPolicy: {policy}\n    ports:\n",
            name = s.name,
            first = ips[0],
            ips = ips.join(", "),
            families = families.join(", "),
            policy = if ips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            },
        );
        let node_port = s
            .node_port
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    - {{name: tcp, port: {SVC_PORT}, protocol: TCP, targetPort: {BACKEND_PORT}{node_port}}}"
        );
        if s.udp {
            let _ = writeln!(
                out,
                "    - {{name: udp, port: {SVC_PORT}, protocol: UDP, targetPort: {BACKEND_PORT}}}"
            );
        }
        if !s.external_ips.is_empty() {
            let ips: Vec<String> = s
                .external_ips
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect();
            let _ = writeln!(out, "    externalIPs: [{}]", ips.join(", "));
        }
        if let Some((_, ranges)) = &s.lb {
            let quoted: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
            let _ = writeln!(out, "    loadBalancerSourceRanges: [{}]", quoted.join(", "));
        }
        if let Some((ip, _)) = &s.lb {
            let _ = writeln!(
                out,
                "  status:\n    loadBalancer:\n      ingress:\n      - ip: \"{ip}\""
            );
        }
        for family in ["IPv4", "IPv6"] {
            let eps: Vec<String> = s
                .endpoints
                .iter()
                .filter(|ip| family_name(ip) == family)
                .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
                .collect();
            let _ = write!(
                out,
                "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {name}-{fam}\n    namespace: default\n    resourceVersion: \"{rv}\"\n    labels: {{kubernetes.io/service-name: {name}}}\n  addressType: {family}\n  endpoints:{empty}\n{eps}  ports:\n  - {{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}\n",
                name = s.name,
                fam = family.to_lowercase(),
                empty = if eps.is_empty() { " []" } else { "" },
                eps = eps.concat(),
            );
            if s.udp {
                let _ = writeln!(
                    out,
                    "  - {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}"
                );
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The lab: IPv6 on every link, whoami servers on the backends' IPv6
// addresses (TCP and UDP, named `backend<i>-v6`), the IPv4 whoami of the
// test bed on their IPv4 addresses (`backend<i>`).

struct Bed {
    bed: Testbed,
    _v6_servers: Vec<PeerHandle>,
}

impl std::ops::Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.bed
    }
}

fn v6_name(i: usize) -> String {
    format!("backend{i}-v6")
}

fn ep6(i: usize) -> IpAddr {
    IpAddr::V6(backend_addr_v6(i))
}

fn ep4(i: usize) -> IpAddr {
    IpAddr::V4(backend_addr(i))
}

impl Bed {
    /// `disable_ipv6_on_node`: IPv6 is switched off in the node namespace
    /// before the proxy starts (the other namespaces keep it).
    fn new(tag: &str, n_backends: usize, disable_ipv6_on_node: bool) -> Bed {
        let bed = Testbed::new("ipv6", tag, &vec![Backend::Whoami; n_backends]);
        bed.lab.add_ipv6().expect("adding IPv6 to the lab");
        let mut servers = Vec::new();
        for i in 0..n_backends {
            let ns = &bed.lab.backends()[i];
            let addr = SocketAddr::from((backend_addr_v6(i), BACKEND_PORT));
            let tcp = ns.tcp_listener(addr).expect("IPv6 backend listener");
            let udp = ns.udp_socket(addr).expect("IPv6 backend UDP socket");
            let _guard = bed.runtime().enter();
            servers.push(peers::whoami(tcp, &v6_name(i)).expect("IPv6 whoami"));
            servers.push(peers::udp_whoami(udp, &v6_name(i)).expect("IPv6 UDP whoami"));
        }
        if disable_ipv6_on_node {
            let out = bed
                .node()
                .output(
                    "sh",
                    ["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
                )
                .expect("disabling IPv6 in the node namespace");
            assert!(out.status.success(), "disable_ipv6: {out:?}");
        }
        Bed {
            bed,
            _v6_servers: servers,
        }
    }

    /// Starts the proxy on `svcs` with `extra` flags.
    fn start(&self, name: &str, svcs: &[Svc], extra: &[&str]) -> ProxyProcess {
        let path = self.manifests_file();
        write_by_rename(&path, &yaml(svcs));
        self.run_proxy(name, &path, extra, &[])
    }
}

// ---------------------------------------------------------------------------
// The ip6 table.

/// Keys of set or map `name` of `table ip6 kube-uproxy`, with the proxy
/// port for map elements.
fn ip6_elements(node: &Netns, kind: &str, name: &str) -> Result<Vec<(Vec<Value>, Value)>, String> {
    let out = node
        .output("nft", ["-j", "list", kind, "ip6", "kube-uproxy", name])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let obj = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o.get(kind)))
        .ok_or("no set in the listing")?;
    Ok(obj["elem"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| match e.as_array() {
            Some(kv) if kind == "map" => (
                kv[0]["concat"].as_array().cloned().unwrap_or_default(),
                kv[1].clone(),
            ),
            _ => (
                e["concat"]
                    .as_array()
                    .cloned()
                    .unwrap_or_else(|| vec![e.clone()]),
                Value::Null,
            ),
        })
        .collect())
}

/// The proxy port the ip6 table maps `ip . tcp . 80` to, if any.
fn ip6_proxy_port(node: &Netns, ip: Ipv6Addr) -> Option<u16> {
    ip6_elements(node, "map", "service-ports")
        .ok()?
        .into_iter()
        .find(|(k, _)| {
            k.first().and_then(Value::as_str) == Some(ip.to_string().as_str())
                && k.get(1).and_then(Value::as_str) == Some("tcp")
        })
        .and_then(|(_, p)| p.as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

/// Waits until `ip . tcp . 80` is in the ip6 table's map `service-ports`
/// (`redirected`) or set `no-endpoints`; returns the proxy port (0 for a
/// refusal).
fn wait_ip6(proxy: &mut ProxyProcess, node: &Netns, ip: Ipv6Addr, redirected: bool) -> u16 {
    let mut port = 0;
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        proxy.assert_running("waiting for the ip6 table");
        if redirected {
            port = ip6_proxy_port(node, ip).ok_or("not in service-ports")?;
            return Ok(());
        }
        let keys = ip6_elements(node, "set", "no-endpoints")?;
        keys.iter()
            .any(|(k, _)| k.first().and_then(Value::as_str) == Some(ip.to_string().as_str()))
            .then_some(())
            .ok_or_else(|| format!("not in no-endpoints: {keys:?}"))
    })
    .unwrap_or_else(|e| panic!("{ip} never reached the ip6 table: {e}"));
    port
}

fn ip6_table_exists(node: &Netns) -> bool {
    node.output("nft", ["list", "table", "ip6", "kube-uproxy"])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn lo_addresses(node: &Netns) -> String {
    node.output("ip", ["-o", "addr", "show", "dev", "lo"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Clients.

/// The whoami greeting of a new TCP connection from `ns` to `to`, waiting
/// (bounded) for the rules to be in place.
fn greeting(ns: &Netns, to: SocketAddr, what: &str) -> String {
    let mut name = String::new();
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        let (s, n) = hold(ns, to).map_err(|e| format!("{e} ({:?})", e.kind()))?;
        close(s);
        name = n;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: TCP to {to} from {} never answered: {e}", ns.name()));
    name
}

fn tcp_refused(ns: &Netns, to: SocketAddr) -> Result<(), String> {
    let t0 = Instant::now();
    match ns.tcp_connect(to, Duration::from_secs(2)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        other => Err(format!(
            "TCP to {to} got {:?} after {:?}, not a refusal",
            other.map(|_| "a connection"),
            t0.elapsed()
        )),
    }
}

fn udp_client(ns: &Netns) -> UdpSocket {
    ns.udp_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
        .unwrap_or_else(|e| panic!("UDP socket in {}: {e}", ns.name()))
}

static TAG: AtomicU64 = AtomicU64::new(1);

/// Sends a fresh tag to `to`; the whoami's answer `(name, where it came
/// from)`, or the socket's error.
fn ask(socket: &UdpSocket, to: SocketAddr) -> io::Result<(String, SocketAddr)> {
    let tag = format!("q{}", TAG.fetch_add(1, Ordering::Relaxed));
    socket.send_to(tag.as_bytes(), to)?;
    socket.set_read_timeout(Some(ANSWER_WAIT))?;
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut parts = text.splitn(3, ' ');
                let name = parts.next().unwrap_or_default().to_string();
                if parts.nth(1) == Some(tag.as_str()) {
                    return Ok((name, from));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::ErrorKind::TimedOut.into());
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::ErrorKind::TimedOut.into())
}

// ---------------------------------------------------------------------------

#[test]
fn an_ipv6_cluster_ip_serves_tcp_and_udp_from_a_pod_and_from_the_node() {
    if !lab::require_root_and_nft(
        "an_ipv6_cluster_ip_serves_tcp_and_udp_from_a_pod_and_from_the_node",
    ) {
        return;
    }
    let bed = Bed::new("v6-cip", 2, false);
    let svc = Svc {
        udp: true,
        ..Svc::new("six", &[IpAddr::V6(VIP6_A)], &[ep6(0), ep6(1)])
    };
    let mut proxy = bed.start("kube-uproxy", &[svc], &[]);
    wait_ip6(&mut proxy, bed.node(), VIP6_A, true);
    let to = SocketAddr::from((VIP6_A, SVC_PORT));

    // TCP from a pod, spread over both IPv6 endpoints.
    let mut seen: Vec<String> = (0..4)
        .map(|_| greeting(bed.client(), to, "IPv6 ClusterIP from the pod"))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [v6_name(0), v6_name(1)]);
    // From the node itself.
    let name = greeting(bed.node(), to, "IPv6 ClusterIP from the node");
    assert!(name.ends_with("-v6"), "{name}");

    // UDP: answered by an IPv6 endpoint, from the Service address.
    let socket = udp_client(bed.client());
    let mut answered = None;
    for _ in 0..10 {
        match ask(&socket, to) {
            Ok(a) => {
                answered = Some(a);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!("UDP to {to}: {e}"),
        }
    }
    let (name, from) = answered.unwrap_or_else(|| panic!("UDP to {to}: no answer"));
    assert!(name.ends_with("-v6"), "{name}");
    assert_eq!(from, to, "the answer must come from the Service address");
}

#[test]
fn a_dual_stack_service_is_reached_over_both_families_each_by_its_own_endpoints() {
    if !lab::require_root_and_nft(
        "a_dual_stack_service_is_reached_over_both_families_each_by_its_own_endpoints",
    ) {
        return;
    }
    let bed = Bed::new("v6-dual", 2, false);
    let vip4: IpAddr = VIP4_A.parse().unwrap();
    // IPv4 endpoint: backend 0; IPv6 endpoint: backend 1.
    let svc = Svc::new("web", &[vip4, IpAddr::V6(VIP6_A)], &[ep4(0), ep6(1)]);
    let mut proxy = bed.start("kube-uproxy", std::slice::from_ref(&svc), &[]);
    wait_ip6(&mut proxy, bed.node(), VIP6_A, true);
    let to4 = SocketAddr::new(vip4, SVC_PORT);
    let to6 = SocketAddr::from((VIP6_A, SVC_PORT));
    for _ in 0..6 {
        assert_eq!(greeting(bed.client(), to4, "IPv4 side"), "backend0");
        assert_eq!(greeting(bed.client(), to6, "IPv6 side"), v6_name(1));
    }

    // The IPv6 side loses its endpoint: refused there, IPv4 unaffected.
    let only4 = Svc {
        endpoints: vec![ep4(0)],
        ..svc
    };
    write_by_rename(&bed.manifests_file(), &yaml(&[only4]));
    wait_ip6(&mut proxy, bed.node(), VIP6_A, false);
    for _ in 0..5 {
        tcp_refused(bed.client(), to6).unwrap_or_else(|e| panic!("IPv6 side: {e}"));
        assert_eq!(greeting(bed.client(), to4, "IPv4 side after"), "backend0");
    }
}

#[test]
fn ipv6_node_ports_external_ips_and_lb_ips_are_reached_from_another_host() {
    if !lab::require_root_and_nft(
        "ipv6_node_ports_external_ips_and_lb_ips_are_reached_from_another_host",
    ) {
        return;
    }
    let bed = Bed::new("v6-np", 1, false);
    let svc = Svc {
        node_port: Some(NODE_PORT),
        ..Svc::new("six", &[IpAddr::V6(VIP6_A)], &[ep6(0)])
    };
    // An IPv6 externalIP, and LB IPs whose source ranges admit the client
    // (the IPv6 one) or not (the other family's range is ignored for IPv6).
    let ext = Svc {
        external_ips: vec![IpAddr::V6(EXTERNAL_V6), "10.200.8.8".parse().unwrap()],
        ..Svc::new("ext", &[IpAddr::V6(VIP6_B)], &[ep6(0)])
    };
    let lb_in = Svc {
        node_port: Some(NODE_PORT + 1),
        lb: Some((
            IpAddr::V6(LB_V6_ADMITS),
            vec!["fd00:200::/64", "10.0.0.0/8"],
        )),
        ..Svc::new("lb-in", &[IpAddr::V6(VIP6_C)], &[ep6(0)])
    };
    let lb_out = Svc {
        node_port: Some(NODE_PORT + 2),
        lb: Some((IpAddr::V6(LB_V6_DROPS), vec!["fd00:999::/64"])),
        ..Svc::new("lb-out", &[IpAddr::V6(VIP6_D)], &[ep6(0)])
    };
    let mut proxy = bed.start(
        "kube-uproxy",
        &[svc, ext, lb_in, lb_out],
        &["--nodeport-addresses", "10.200.0.0/24,fd00:200::/64"],
    );
    wait_ip6(&mut proxy, bed.node(), VIP6_A, true);
    wait_ip6(&mut proxy, bed.node(), LB_V6_DROPS, true);
    for (ip, what) in [
        (EXTERNAL_V6, "IPv6 externalIP"),
        (LB_V6_ADMITS, "IPv6 LB IP"),
    ] {
        let to = SocketAddr::from((ip, SVC_PORT));
        assert_eq!(greeting(bed.client(), to, what), v6_name(0));
    }
    let dropped = SocketAddr::from((LB_V6_DROPS, SVC_PORT));
    match bed.client().tcp_connect(dropped, Duration::from_secs(2)) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!(
            "{dropped} from outside its source ranges got {:?}, not dropped",
            other.map(|_| "a connection")
        ),
    }
    // The IPv4 externalIP of an IPv6-only Service is not caught.
    let keys = bed
        .node()
        .nft_keys("map", "ip", "kube-uproxy", "service-ports")
        .expect("ip table");
    assert!(keys.is_empty(), "{keys:?}");
    let on_uplink = SocketAddr::from((lab::NODE_CLIENT_ADDR_V6, NODE_PORT));
    assert_eq!(
        greeting(bed.client(), on_uplink, "IPv6 node port"),
        v6_name(0)
    );
    // Not on the bridge address (outside --nodeport-addresses), and not on
    // an IPv4 address: the Service is IPv6 only.
    for to in [
        SocketAddr::from((lab::NODE_BRIDGE_ADDR_V6, NODE_PORT)),
        SocketAddr::from((lab::NODE_CLIENT_ADDR, NODE_PORT)),
    ] {
        if let Ok((s, name)) = hold(bed.client(), to) {
            close(s);
            panic!("node port on {to} was proxied (answered by {name})");
        }
    }
}

#[test]
fn ipv6_refusals_are_immediate_and_proxy_ports_are_guarded() {
    if !lab::require_root_and_nft("ipv6_refusals_are_immediate_and_proxy_ports_are_guarded") {
        return;
    }
    let bed = Bed::new("v6-refuse", 1, false);
    let empty = Svc {
        udp: true,
        ..Svc::new("empty", &[IpAddr::V6(VIP6_B)], &[])
    };
    let six = Svc::new("six", &[IpAddr::V6(VIP6_A)], &[ep6(0)]);
    let mut proxy = bed.start("kube-uproxy", &[empty, six], &[]);
    wait_ip6(&mut proxy, bed.node(), VIP6_B, false);
    let proxy_port = wait_ip6(&mut proxy, bed.node(), VIP6_A, true);

    // TCP: a reset every time, however fast the client retries.
    let to = SocketAddr::from((VIP6_B, SVC_PORT));
    for i in 0..30 {
        tcp_refused(bed.client(), to).unwrap_or_else(|e| panic!("attempt {i}: {e}"));
    }
    // UDP: ICMPv6 port unreachable, seen by a connected socket.
    let socket = udp_client(bed.client());
    socket.connect(to).expect("connect");
    let mut refused = false;
    for _ in 0..3 {
        match socket.send(b"anyone?").and_then(|_| {
            socket.set_read_timeout(Some(ANSWER_WAIT))?;
            socket.recv(&mut [0u8; 64])
        }) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            other => eprintln!("UDP to {to}: {other:?}"),
        }
    }
    assert!(refused, "UDP to {to} was not refused with ICMPv6");

    // The listener's port on the IPv6 proxy address: only through the DNAT.
    let direct = SocketAddr::new(PROXY_V6.parse().unwrap(), proxy_port);
    match bed.client().tcp_connect(direct, Duration::from_secs(2)) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!(
            "a direct connection to {direct} got {:?}, not dropped",
            other.map(|_| "a connection")
        ),
    }
    // Through the ClusterIP it is fine.
    assert_eq!(
        greeting(
            bed.client(),
            SocketAddr::from((VIP6_A, SVC_PORT)),
            "ClusterIP"
        ),
        v6_name(0)
    );
}

#[test]
fn the_ip6_table_is_repaired_taken_over_by_the_next_instance_and_removed_by_cleanup() {
    if !lab::require_root_and_nft(
        "the_ip6_table_is_repaired_taken_over_by_the_next_instance_and_removed_by_cleanup",
    ) {
        return;
    }
    let bed = Bed::new("v6-life", 1, false);
    let svc = Svc::new("six", &[IpAddr::V6(VIP6_A)], &[ep6(0)]);
    let to = SocketAddr::from((VIP6_A, SVC_PORT));
    let mut proxy = bed.start(
        "kube-uproxy",
        std::slice::from_ref(&svc),
        &["--sync-period", "1s"],
    );
    let port = wait_ip6(&mut proxy, bed.node(), VIP6_A, true);
    assert!(lo_addresses(bed.node()).contains(PROXY_V6));

    // Deleted behind the proxy's back: written again at the next check.
    let out = bed
        .node()
        .output("nft", ["delete", "table", "ip6", "kube-uproxy"])
        .expect("nft delete table");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(wait_ip6(&mut proxy, bed.node(), VIP6_A, true), port);
    assert_eq!(greeting(bed.client(), to, "after the repair"), v6_name(0));
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        proxy
            .stderr()
            .contains("ip6 table is gone")
            .then_some(())
            .ok_or_else(|| "no drift logged".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // A restart: the IPv6 Service port gets its proxy port back.
    let (status, _) = proxy
        .child
        .terminate(Duration::from_secs(10))
        .expect("stop");
    assert!(status.success(), "{status}");
    let mut next = bed.start("kube-uproxy-2", &[svc], &[]);
    poll(READY_TIMEOUT, Duration::from_millis(50), || {
        next.assert_running("restart");
        next.stderr()
            .contains("rules synced")
            .then_some(())
            .ok_or_else(|| "not synced yet".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ip6_proxy_port(bed.node(), VIP6_A), Some(port));
    assert!(
        next.stderr()
            .lines()
            .any(|l| l.contains("IPv6") && l.contains("adopted=true")),
        "the IPv6 listener was not adopted"
    );
    assert_eq!(greeting(bed.client(), to, "after the restart"), v6_name(0));
    let (status, _) = next.child.terminate(Duration::from_secs(10)).expect("stop");
    assert!(status.success(), "{status}");

    // --cleanup removes both tables and both proxy addresses.
    let out = bed
        .node()
        .output(e2e::bin(), ["--cleanup"])
        .expect("kube-uproxy --cleanup");
    assert!(out.status.success(), "{out:?}");
    assert!(
        !ip6_table_exists(bed.node()),
        "the ip6 table is still there"
    );
    let lo = lo_addresses(bed.node());
    assert!(!lo.contains(PROXY_V6), "{lo}");
    assert!(!lo.contains("169.254.42.1"), "{lo}");
}

#[test]
fn a_node_with_ipv6_disabled_serves_ipv4_and_logs_each_ipv6_service_once() {
    if !lab::require_root_and_nft(
        "a_node_with_ipv6_disabled_serves_ipv4_and_logs_each_ipv6_service_once",
    ) {
        return;
    }
    let bed = Bed::new("v6-off", 2, true);
    let vip4: IpAddr = VIP4_A.parse().unwrap();
    let dual = Svc::new("web", &[vip4, IpAddr::V6(VIP6_A)], &[ep4(0), ep6(1)]);
    let six = Svc::new("six", &[IpAddr::V6(VIP6_B)], &[ep6(0)]);
    let mut proxy = bed.start("kube-uproxy", &[dual.clone(), six.clone()], &[]);
    let to4 = SocketAddr::new(vip4, SVC_PORT);
    assert_eq!(greeting(bed.client(), to4, "IPv4 side"), "backend0");
    // An endpoint change makes the Services reconciled again: still one
    // line each.
    let dual2 = Svc {
        endpoints: vec![ep4(1), ep6(1)],
        ..dual
    };
    write_by_rename(&bed.manifests_file(), &yaml(&[dual2, six]));
    poll(READY_TIMEOUT, Duration::from_millis(100), || {
        proxy.assert_running("endpoint change");
        match greeting(bed.client(), to4, "IPv4 side after the change").as_str() {
            "backend1" => Ok(()),
            other => Err(format!("answered by {other}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let log = proxy.stderr();
    assert!(log.contains("IPv6 is disabled on this node"), "{log}");
    for svc in ["default/web", "default/six"] {
        let lines = log
            .lines()
            .filter(|l| l.contains("not served in that family") && l.contains(svc))
            .count();
        assert_eq!(lines, 1, "{svc} logged {lines} times:\n{log}");
    }
    assert!(!ip6_table_exists(bed.node()));
    assert!(!lo_addresses(bed.node()).contains(PROXY_V6));
    proxy.assert_running("end");
}
