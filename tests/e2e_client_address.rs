//! End-to-end tests of the client's address told to endpoints (issue 23):
//! the PROXY protocol header toward endpoints (`kube-uproxy.io/proxy-protocol`)
//! read by a real PROXY-protocol server, nginx with `listen …
//! proxy_protocol`, which answers every request with the addresses it
//! parsed from the header; and `X-Forwarded-For` / `Forwarded` on the
//! requests of a port in request mode (`kube-uproxy.io/forwarded-headers`),
//! echoed by the lab's HTTP/1.1 peer (`tests/lab/py/http_peer.py`).
//!
//! The endpoints are remote (their `nodeName` is another node's), in the
//! lab's backend namespaces; the client is another host routed through
//! the node. The release binary runs in the node namespace.
//!
//! These tests need root, `nft`, `nginx` and `python3`; without root they print
//! `SKIP ...` (or fail, if `CI` is set).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use kube_uproxy::source::convert::{ANNOTATION_FORWARDED_HEADERS, ANNOTATION_PROXY_PROTOCOL};
use uproxy_lab::e2e::http::{http_server, nginx_proxy_protocol, wait_port_applied};
use uproxy_lab::e2e::{BACKEND_PORT, Backend, SVC_PORT, Testbed, VIP_A, VIP_B, VIP_C, manifests};
use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, ServiceType};
use uproxy_lab::{self as lab, NODE_CLIENT_ADDR, Netns, backend_addr, backend_addr_v6};

const NODE_PORT: u16 = 30080;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// Connections per Service and address: several, each from its own port.
const CONNECTIONS: usize = 5;

/// An endpoint on another node: a remote endpoint.
fn remote(ip: impl Into<IpAddr>) -> EndpointManifest {
    EndpointManifest::ready(ip).on_node("node-2")
}

/// `GET path` with `extra` request header lines from `ns` to `to` on a
/// fresh connection: the client's own address (as its socket has it) and
/// the whole answer.
fn get(
    ns: &Netns,
    to: SocketAddr,
    path: &str,
    extra: &str,
) -> Result<(SocketAddr, String), String> {
    let mut s = ns
        .tcp_connect(to, Duration::from_secs(3))
        .map_err(|e| format!("connect {to}: {e}"))?;
    let me = s.local_addr().map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: web\r\n{extra}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read (after {text:?}): {e}"))?;
    Ok((me, text))
}

/// `GET /` from `ns` to `to` on a fresh connection: the client's own
/// address and nginx's one-line answer (the addresses it parsed from the
/// PROXY header).
fn ask(ns: &Netns, to: SocketAddr) -> Result<(SocketAddr, String), String> {
    let (me, text) = get(ns, to, "/", "")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .ok_or_else(|| {
            format!(
                "no HTTP answer: {text:?} (nginx closes a connection without a valid PROXY header)"
            )
        })?;
    Ok((me, body))
}

/// What nginx must have parsed: the client's address and port, and the
/// address and port the client connected to.
fn expected(client: SocketAddr, to: SocketAddr) -> String {
    format!(
        "{} {} {} {}",
        client.ip(),
        client.port(),
        to.ip(),
        to.port()
    )
}

fn assert_told(ns: &Netns, to: SocketAddr, what: &str) {
    for i in 0..CONNECTIONS {
        let (me, body) = ask(ns, to).unwrap_or_else(|e| panic!("{what}, connection {i}: {e}"));
        assert_eq!(
            body,
            expected(me, to),
            "{what}, connection {i}: the endpoint parsed another address than the client's"
        );
    }
}

/// A remote nginx behind `proxy-protocol: v1` (on a ClusterIP) and one
/// behind `v2` (on a ClusterIP and a node port): each request's answer is
/// the client's own address and port, and the Service address (the node's
/// address and node port for the node port) it connected to.
#[test]
fn a_remote_nginx_reads_the_clients_address_from_proxy_protocol_v1_and_v2() {
    if !lab::require_root_and_nft(
        "a_remote_nginx_reads_the_clients_address_from_proxy_protocol_v1_and_v2",
    ) {
        return;
    }
    let bed = Testbed::new("client-addr", "pp", &[Backend::None, Backend::None]);
    let mut nginx = Vec::new();
    for i in 0..2 {
        nginx.push(nginx_proxy_protocol(
            &bed.lab.backends()[i],
            bed.node(),
            &bed.dir,
            &format!("nginx{i}"),
            SocketAddr::from((backend_addr(i), BACKEND_PORT)),
        ));
    }
    let v1 = ServiceManifest::new("pp-v1", VIP_A)
        .with_annotation(ANNOTATION_PROXY_PROTOCOL, "v1")
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![remote(backend_addr(0))]);
    let v2 = ServiceManifest::new("pp-v2", VIP_B)
        .with_type(ServiceType::NodePort)
        .with_annotation(ANNOTATION_PROXY_PROTOCOL, "v2")
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT).with_node_port(NODE_PORT))
        .with_endpoints(vec![remote(backend_addr(1))]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[v1, v2]), &["--hostname-override", "node-1"]);
    wait_port_applied(&mut proxy, bed.node(), &["pp-v1", "pp-v2"]);
    assert_told(
        bed.client(),
        SocketAddr::from((VIP_A, SVC_PORT)),
        "v1, ClusterIP",
    );
    assert_told(
        bed.client(),
        SocketAddr::from((VIP_B, SVC_PORT)),
        "v2, ClusterIP",
    );
    assert_told(
        bed.client(),
        SocketAddr::from((NODE_CLIENT_ADDR, NODE_PORT)),
        "v2, node port",
    );
    // From the node itself too (the output hook's translation).
    assert_told(
        bed.node(),
        SocketAddr::from((VIP_B, SVC_PORT)),
        "v2, from the node",
    );
    proxy.assert_running("after the PROXY protocol connections");
}

/// The same over IPv6: `v2` on an IPv6 ClusterIP (TCP over IPv6) and `v1`
/// (a `TCP6` line) on another port of the same Service.
#[test]
fn a_remote_nginx_reads_an_ipv6_clients_address_from_proxy_protocol() {
    if !lab::require_root_and_nft(
        "a_remote_nginx_reads_an_ipv6_clients_address_from_proxy_protocol",
    ) {
        return;
    }
    let bed = Testbed::new("client-addr", "pp6", &[Backend::None, Backend::None]);
    bed.lab.add_ipv6().expect("adding IPv6 to the lab");
    let mut nginx = Vec::new();
    for i in 0..2 {
        nginx.push(nginx_proxy_protocol(
            &bed.lab.backends()[i],
            bed.node(),
            &bed.dir,
            &format!("nginx{i}"),
            SocketAddr::from((backend_addr_v6(i), BACKEND_PORT)),
        ));
    }
    let v2 = ServiceManifest::new("pp6-v2", VIP6)
        .with_annotation(ANNOTATION_PROXY_PROTOCOL, "v2")
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![remote(backend_addr_v6(0))]);
    let v1 = ServiceManifest::new("pp6-v1", Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11))
        .with_annotation(ANNOTATION_PROXY_PROTOCOL, "v1")
        .with_port(PortManifest::tcp(SVC_PORT, BACKEND_PORT))
        .with_endpoints(vec![remote(backend_addr_v6(1))]);
    let (mut proxy, _) = bed.start_proxy(&manifests(&[v2, v1]), &["--hostname-override", "node-1"]);
    wait_port_applied(&mut proxy, bed.node(), &["pp6-v2", "pp6-v1"]);
    assert_told(
        bed.client(),
        SocketAddr::from((VIP6, SVC_PORT)),
        "v2, IPv6 ClusterIP",
    );
    assert_told(
        bed.client(),
        SocketAddr::from((Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11), SVC_PORT)),
        "v1, IPv6 ClusterIP",
    );
    proxy.assert_running("after the IPv6 PROXY protocol connections");
}

/// `GET /headers` from the client namespace with `extra` request header
/// lines: what the HTTP/1.1 peer received of `X-Forwarded-For` and
/// `Forwarded`, one `name: value` line each, sorted (its first line, the
/// backend's name, left out).
fn forwarded_seen(
    ns: &Netns,
    to: SocketAddr,
    extra: &str,
) -> Result<(SocketAddr, Vec<String>), String> {
    let (me, text) = get(ns, to, "/headers", extra)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not 200: {text:?}"));
    }
    // Sorted: which of the two the endpoint lists first does not matter.
    let mut seen: Vec<String> = body.lines().skip(1).map(str::to_string).collect();
    seen.sort();
    Ok((me, seen))
}

/// Request mode with `forwarded-headers`: the endpoint (a remote HTTP/1.1
/// peer) gets `X-Forwarded-For` and `Forwarded` with the client's address;
/// `true` replaces what the client sent, `append` extends its chain, and
/// without the annotation nothing is added (the client's own pass as
/// sent).
#[test]
fn request_mode_tells_an_http_endpoint_the_clients_address_in_forwarded_headers() {
    if !lab::require_root_and_nft(
        "request_mode_tells_an_http_endpoint_the_clients_address_in_forwarded_headers",
    ) {
        return;
    }
    let bed = Testbed::new("client-addr", "fwd", &[Backend::None]);
    let peer = http_server(
        &bed.lab.backends()[0],
        bed.node(),
        &bed.dir,
        0,
        BACKEND_PORT,
        0,
    );
    let port = || {
        PortManifest::tcp(SVC_PORT, BACKEND_PORT)
            .named("web")
            .with_app_protocol("http")
    };
    let replace = ServiceManifest::new("fwd-replace", VIP_A)
        .with_annotation(ANNOTATION_FORWARDED_HEADERS, "true")
        .with_port(port())
        .with_endpoints(vec![remote(backend_addr(0))]);
    let append = ServiceManifest::new("fwd-append", VIP_B)
        .with_annotation(ANNOTATION_FORWARDED_HEADERS, "append")
        .with_port(port())
        .with_endpoints(vec![remote(backend_addr(0))]);
    let plain = ServiceManifest::new("fwd-none", VIP_C)
        .with_port(port())
        .with_endpoints(vec![remote(backend_addr(0))]);
    let (mut proxy, _) = bed.start_proxy(
        &manifests(&[replace, append, plain]),
        &["--hostname-override", "node-1"],
    );
    wait_port_applied(
        &mut proxy,
        bed.node(),
        &["fwd-replace", "fwd-append", "fwd-none"],
    );
    let spoof = "X-Forwarded-For: 192.0.2.66\r\nForwarded: for=192.0.2.66\r\n";
    for i in 0..CONNECTIONS {
        let to = SocketAddr::from((VIP_A, SVC_PORT));
        let (me, seen) = forwarded_seen(bed.client(), to, "")
            .unwrap_or_else(|e| panic!("true, request {i}: {e}"));
        let ip = me.ip();
        assert_eq!(
            seen,
            [
                format!("forwarded: for={ip};by=\"{to}\";proto=http;host=web"),
                format!("x-forwarded-for: {ip}"),
            ],
            "true, request {i}"
        );
        let (_, seen) = forwarded_seen(bed.client(), to, spoof)
            .unwrap_or_else(|e| panic!("true, spoofed, request {i}: {e}"));
        assert_eq!(
            seen,
            [
                format!("forwarded: for={ip};by=\"{to}\";proto=http;host=web"),
                format!("x-forwarded-for: {ip}"),
            ],
            "true: what the client wrote is replaced, request {i}"
        );
        let to = SocketAddr::from((VIP_B, SVC_PORT));
        let (_, seen) = forwarded_seen(bed.client(), to, spoof)
            .unwrap_or_else(|e| panic!("append, request {i}: {e}"));
        assert_eq!(
            seen,
            [
                format!("forwarded: for=192.0.2.66, for={ip};by=\"{to}\";proto=http;host=web"),
                format!("x-forwarded-for: 192.0.2.66, {ip}"),
            ],
            "append: the client's chain is extended, request {i}"
        );
        let to = SocketAddr::from((VIP_C, SVC_PORT));
        let (_, seen) = forwarded_seen(bed.client(), to, "")
            .unwrap_or_else(|e| panic!("none, request {i}: {e}"));
        assert!(
            seen.is_empty(),
            "without the annotation nothing is added: {seen:?}"
        );
        let (_, seen) = forwarded_seen(bed.client(), to, spoof)
            .unwrap_or_else(|e| panic!("none, spoofed, request {i}: {e}"));
        assert_eq!(
            seen,
            ["forwarded: for=192.0.2.66", "x-forwarded-for: 192.0.2.66"],
            "without the annotation the client's headers pass as sent"
        );
    }
    proxy.assert_running("after the forwarded-headers requests");
    drop(peer);
}
