//! One request: an endpoint picked for it, a pooled connection, the
//! request sent and the response streamed back; retried on another
//! endpoint only when the request cannot have reached the first.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use super::super::DataPathConfig;
use super::super::balancer::Lease;
use super::super::metrics::http::{Outcome, RetryReason};
use super::super::relay::relay;
use super::body::{BoxError, Done, ProxyBody, UpstreamBody, grpc_status};
use super::forwarded::Forwarding;
use super::h2_upstream::{self, H2Sent};
use super::pool::{Conn, Proto};
use super::port::HttpPort;
use crate::model::PortMode;

/// Serves one request from `client`.
pub async fn handle(
    port: Arc<HttpPort>,
    client: IpAddr,
    forwarding: Option<&Forwarding>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(f) = forwarding {
        // h2 carries the host in the URI (`:authority`); a refcount, not
        // a copy.
        let authority = req.uri().authority().cloned();
        f.apply(req.headers_mut(), authority.as_ref().map(|a| a.as_str()));
    }
    let started = Instant::now();
    let grpc = is_grpc(req.headers());
    port.metrics.http().started();
    let done = Done {
        metrics: Arc::clone(&port.metrics),
        outcome: Outcome {
            status: 0,
            grpc_status: None,
        },
        grpc,
        lease: None,
        back: None,
        stream: None,
    };
    if is_upgrade(&req) {
        return Box::pin(upgrade(port, client, req, done, started)).await;
    }
    let proto = match port.balancer.mode() {
        PortMode::Http2 => Proto::Http2,
        _ => Proto::Http1,
    };
    let client_version = req.version();
    prepare_request(&mut req, proto);
    // Pools are pruned at each new set (port.rs); again here (a
    // generation compare when nothing changed) for the connection a
    // request that picked an endpoint just before it left opened after
    // that prune.
    let set = port.balancer.endpoints();
    port.pool.prune(&set);
    drop(set);

    let timeouts = &port.config.connect_timeouts;
    let mut tried: Vec<SocketAddr> = Vec::new();
    for timeout in timeouts {
        let Some(lease) = port.balancer.pick(client, &tried) else {
            return unavailable(&port, done, "no endpoints available");
        };
        let endpoint = lease.addr();
        tried.push(endpoint);
        let conn = match port.pool.checkout(endpoint, proto, *timeout).await {
            Ok(c) => c,
            Err(e) => {
                connect_failed(&port, endpoint, &e);
                continue;
            }
        };
        set_authority(&mut req, proto, endpoint);
        match send(conn, req).await {
            Sent::Answered(resp, back, stream) => {
                let took = started.elapsed();
                lease.observe(took);
                port.metrics.http().answered(took);
                return respond(
                    &port,
                    resp,
                    done,
                    lease,
                    back.map(|s| (endpoint, s)),
                    stream,
                    client_version,
                );
            }
            Sent::Unsent(r) => {
                debug!(%endpoint, "request not sent (connection closed, stream refused); trying another endpoint");
                port.metrics.http().retry(RetryReason::NotSent);
                req = r;
            }
            Sent::Failed(e) => {
                debug!(%endpoint, error = %e, "the endpoint's answer failed");
                return error_response(
                    &port,
                    done,
                    StatusCode::BAD_GATEWAY,
                    "the endpoint's answer failed",
                );
            }
        }
    }
    unavailable(&port, done, "no endpoint could be reached")
}

/// An attempt to reach `endpoint` failed before the request left: logged,
/// counted against the endpoint, and counted as the reason of the retry
/// that follows.
fn connect_failed(port: &HttpPort, endpoint: SocketAddr, e: &std::io::Error) {
    debug!(%endpoint, error = %e, "cannot connect to the endpoint; trying another");
    port.metrics.attempt_failed(endpoint);
    port.metrics.http().retry(RetryReason::ConnectFailed);
}

/// How sending one request went.
enum Sent {
    /// The endpoint answered; an HTTP/1.1 connection to put back at the
    /// end of the body, or the h2 stream's count.
    Answered(
        Response<UpstreamBody>,
        Option<hyper::client::conn::http1::SendRequest<Incoming>>,
        Option<super::pool::StreamGuard>,
    ),
    /// The request never left, or the endpoint did not process it: the
    /// connection was closed before a byte of it was written, or (h2, a
    /// request without a body) its stream was refused or above the
    /// endpoint's GOAWAY. Safe to send elsewhere.
    Unsent(Request<Incoming>),
    /// Sent (maybe in part): never sent again.
    Failed(BoxError),
}

async fn send(conn: Conn, req: Request<Incoming>) -> Sent {
    match conn {
        Conn::Http1 { mut send } => {
            // A pooled connection the endpoint closed meanwhile is found
            // here or by `try_send_request`, with the request unsent.
            if send.ready().await.is_err() {
                return Sent::Unsent(req);
            }
            match send.try_send_request(req).await {
                Ok(resp) => Sent::Answered(resp.map(UpstreamBody::Http1), Some(send), None),
                Err(mut e) => match e.take_message() {
                    Some(req) => Sent::Unsent(req),
                    None => Sent::Failed(e.into_error().into()),
                },
            }
        }
        Conn::Http2 { send, stream } => match h2_upstream::send(send, req, &stream).await {
            H2Sent::Answered(resp) => {
                Sent::Answered(resp.map(UpstreamBody::H2), None, Some(stream))
            }
            H2Sent::Unsent(req) => Sent::Unsent(req),
            H2Sent::Failed(e) => Sent::Failed(e),
        },
    }
}

/// The endpoint's response, on its way to the client.
fn respond(
    port: &Arc<HttpPort>,
    mut resp: Response<UpstreamBody>,
    mut done: Done,
    lease: Lease,
    back: Option<(
        SocketAddr,
        hyper::client::conn::http1::SendRequest<Incoming>,
    )>,
    stream: Option<super::pool::StreamGuard>,
    client_version: Version,
) -> Response<ProxyBody> {
    strip_hop_by_hop(resp.headers_mut(), false);
    *resp.version_mut() = client_version;
    done.outcome.status = resp.status().as_u16();
    if done.grpc {
        // A trailers-only answer carries its status in the headers.
        done.outcome.grpc_status = grpc_status(resp.headers());
    }
    done.lease = Some(lease);
    done.back = back.map(|(endpoint, send)| (Arc::clone(&port.pool), endpoint, send));
    done.stream = stream;
    resp.map(|body| ProxyBody::upstream(body, done))
}

/// No endpoint took the request: 503 for HTTP, `UNAVAILABLE` for gRPC.
fn unavailable(port: &HttpPort, done: Done, why: &str) -> Response<ProxyBody> {
    error_response(port, done, StatusCode::SERVICE_UNAVAILABLE, why)
}

/// An answer of the proxy's own, in the form the client understands:
/// for gRPC a trailers-only response with `grpc-status: 14`
/// (UNAVAILABLE) and a message naming the Service port.
fn error_response(
    port: &HttpPort,
    mut done: Done,
    status: StatusCode,
    why: &str,
) -> Response<ProxyBody> {
    let message = format!("kube-uproxy: {why} for service {}", port.service);
    let mut resp = if done.grpc {
        done.outcome = Outcome {
            status: 200,
            grpc_status: Some(14),
        };
        let mut r = Response::new(ProxyBody::full(Bytes::new(), done));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        done.outcome = Outcome {
            status: status.as_u16(),
            grpc_status: None,
        };
        let mut r = Response::new(ProxyBody::full(format!("{message}\n"), done));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert("x-kube-uproxy", HeaderValue::from_static("error"));
    resp
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A gRPC request (`content-type: application/grpc`, `+proto` and the
/// like); gRPC-Web is answered as HTTP.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start();
            v.len() >= 16
                && v[..16].eq_ignore_ascii_case("application/grpc")
                && !v[16..].to_ascii_lowercase().starts_with("-web")
        })
}

/// An HTTP/1.1 request that asks for a protocol upgrade (WebSocket), or a
/// CONNECT: its connection becomes a tunnel.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    if req.version() != Version::HTTP_11 && req.version() != Version::HTTP_10 {
        return false;
    }
    if req.method() == Method::CONNECT {
        return true;
    }
    req.headers().contains_key(header::UPGRADE) && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those the
/// `Connection` header names, and the usual ones. `te: trailers` stays
/// in a request (gRPC needs it at h2 endpoints); any other `te` goes.
fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    // Most messages carry none of them (an h2 message at most a gRPC
    // call's `te: trailers`): one
    // pass over the names, compared by their standard-header tags, instead
    // of a hashed lookup for each name removed below.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if n != header::TE {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    let trailers = request
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The hop-by-hop headers every message loses (besides those its
/// `Connection` header names, and `te` but for `trailers`).
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A header [`strip_hop_by_hop`] may remove or rewrite (`Connection`
/// itself, the usual hop-by-hop headers and `te`); a name the
/// `Connection` header lists is found through `Connection`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || HOP_BY_HOP.contains(name)
}

/// Rewrites a client's request for the endpoint's protocol: hop-by-hop
/// headers out, the version set, `Host` kept as the client sent it (an
/// h2 client's `:authority` becomes `Host` toward HTTP/1.1).
fn prepare_request<B>(req: &mut Request<B>, proto: Proto) {
    strip_hop_by_hop(req.headers_mut(), true);
    match proto {
        Proto::Http1 => {
            if !req.headers().contains_key(header::HOST)
                && let Some(a) = req.uri().authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.version_mut() = Version::HTTP_11;
            // Origin form: the path and query only (an HTTP/1.1 client's
            // request mostly is already; an h2 client's carries its
            // scheme and authority).
            if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(
                    req.uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                );
                if let Ok(u) = Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
        Proto::Http2 => {
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// h2 carries the authority in the URI (`:authority`, `:scheme`): the
/// client's `Host` (or its own `:authority`), else the endpoint's address.
fn set_authority(req: &mut Request<Incoming>, proto: Proto, endpoint: SocketAddr) {
    if proto != Proto::Http2 || req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| endpoint.to_string());
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(u) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = u;
        req.headers_mut().remove(header::HOST);
    }
}

/// An upgrade (WebSocket) or CONNECT: sent on a connection of its own;
/// once the endpoint agrees (101, or 2xx to CONNECT) both connections
/// are handed to the L4 relay (splice) and never pooled.
async fn upgrade(
    port: Arc<HttpPort>,
    client: IpAddr,
    mut req: Request<Incoming>,
    mut done: Done,
    started: Instant,
) -> Response<ProxyBody> {
    let client_side = hyper::upgrade::on(&mut req);
    let connect = req.method() == Method::CONNECT;
    // Hop-by-hop headers go, except the two that ask for the upgrade.
    let upgrade_to = req.headers().get(header::UPGRADE).cloned();
    strip_hop_by_hop(req.headers_mut(), true);
    if let Some(u) = upgrade_to {
        req.headers_mut().insert(header::UPGRADE, u);
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut tried: Vec<SocketAddr> = Vec::new();
    for timeout in &port.config.connect_timeouts {
        let Some(lease) = port.balancer.pick(client, &tried) else {
            return unavailable(&port, done, "no endpoints available");
        };
        let endpoint = lease.addr();
        tried.push(endpoint);
        let stream = match port.pool.dial(endpoint, *timeout).await {
            Ok(s) => s,
            Err(e) => {
                connect_failed(&port, endpoint, &e);
                continue;
            }
        };
        let mut send = match port.pool.start_http1(endpoint, stream, true).await {
            Ok(s) => s,
            Err(_) => continue,
        };
        let mut resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                debug!(%endpoint, error = %e, "the endpoint's answer to an upgrade failed");
                return error_response(
                    &port,
                    done,
                    StatusCode::BAD_GATEWAY,
                    "the endpoint's answer failed",
                );
            }
        };
        let took = started.elapsed();
        lease.observe(took);
        port.metrics.http().answered(took);
        let agreed = if connect {
            resp.status().is_success()
        } else {
            resp.status() == StatusCode::SWITCHING_PROTOCOLS
        };
        done.outcome.status = resp.status().as_u16();
        if !agreed {
            strip_hop_by_hop(resp.headers_mut(), false);
            done.lease = Some(lease);
            return resp.map(|b| ProxyBody::upstream(UpstreamBody::Http1(b), done));
        }
        let endpoint_side = hyper::upgrade::on(&mut resp);
        let config = Arc::clone(&port.config);
        let cut = port.cut.clone();
        let metrics = Arc::clone(&port.metrics);
        port.tunnels.spawn(async move {
            // The lease counts the tunnel against its endpoint while open.
            let _lease = lease;
            let (Ok(c), Ok(e)) = (client_side.await, endpoint_side.await) else {
                return;
            };
            tunnel(c, e, &config, &cut, metrics.relayed_bytes()).await;
        });
        return resp.map(|b| ProxyBody::upstream(UpstreamBody::Http1(b), done));
    }
    unavailable(&port, done, "no endpoint could be reached")
}

/// Joins the two upgraded connections: plain sockets go to the L4 relay
/// (splice) after the bytes each side sent past its headers; anything
/// else (not expected: both are sockets) is copied in user space.
async fn tunnel(
    client: hyper::upgrade::Upgraded,
    endpoint: hyper::upgrade::Upgraded,
    config: &DataPathConfig,
    cut: &tokio_util::sync::CancellationToken,
    bytes: &super::super::relay::RelayedBytes,
) {
    use tokio::io::copy_bidirectional;
    let c = match client.downcast::<TokioIo<TcpStream>>() {
        Ok(c) => c,
        Err(c) => {
            let _ = copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(endpoint)).await;
            return;
        }
    };
    let mut client = c.io.into_inner();
    let e = match endpoint.downcast::<TokioIo<TcpStream>>() {
        Ok(e) => e,
        Err(e) => {
            let mut e = TokioIo::new(e);
            if e.write_all(&c.read_buf).await.is_ok() {
                let _ = copy_bidirectional(&mut client, &mut e).await;
            }
            return;
        }
    };
    let mut upstream = e.io.into_inner();
    if upstream.write_all(&c.read_buf).await.is_err()
        || client.write_all(&e.read_buf).await.is_err()
    {
        return;
    }
    let _ = relay(config.relay, &config.tcp, client, upstream, cut, bytes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::HOST, HeaderValue::from_static("web.default"));
        h.insert("x-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::HOST).unwrap(), "web.default");
        assert_eq!(h.get("x-end").unwrap(), "kept");
        assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for (name, value) in [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            h.insert("x-end", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h, true);
            assert!(h.get(name).is_none(), "{name} kept");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
    }

    #[test]
    fn an_h2_clients_request_goes_to_http1_in_origin_form_with_its_host() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://web.default:8080/a/b?c=d")
            .body(())
            .unwrap();
        prepare_request(&mut req, Proto::Http1);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()[header::HOST], "web.default:8080");
        // Already in origin form: left as it is, Host too.
        let mut req = Request::builder()
            .uri("/x?y")
            .header(header::HOST, "web")
            .body(())
            .unwrap();
        prepare_request(&mut req, Proto::Http1);
        assert_eq!(req.uri(), "/x?y");
        assert_eq!(req.headers()[header::HOST], "web");
    }

    #[test]
    fn grpc_is_told_by_content_type_and_grpc_web_is_not() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        assert!(!is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("a 100% ok\n"), "a 100%25 ok%0A");
    }
}
