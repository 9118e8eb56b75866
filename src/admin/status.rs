//! `/debug/services` and `kube-uproxy status`: what the proxy does with
//! every Service port, for an operator.
//!
//! The reconciler builds a [`ServicesReport`] on request (it owns the
//! listeners, balancers and rules; nothing is copied on the hot path or on
//! every sync); the admin server sends it as JSON; `kube-uproxy status`
//! fetches that JSON with a plain HTTP/1.1 GET and prints it as a table.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Everything `/debug/services` says.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicesReport {
    /// The address Service traffic is DNATed to (`--proxy-address`).
    pub proxy_address: String,
    /// `/healthz`'s verdict, and why not when unhealthy.
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    /// Whether the source has delivered its first complete list.
    pub source_synced: bool,
    pub service_ports: Vec<PortReport>,
}

/// One Service port.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortReport {
    pub namespace: String,
    pub service: String,
    /// The port's name (empty for a single unnamed port).
    pub port_name: String,
    pub protocol: String,
    /// `IPv4` or `IPv6`: a dual-stack Service port has one listener, and
    /// one report, per family.
    #[serde(default)]
    pub ip_family: String,
    /// Its ClusterIPs of that family.
    pub cluster_ips: Vec<String>,
    /// The Service port number.
    pub port: u16,
    /// The local port its listener accepts on.
    pub proxy_port: u16,
    pub algorithm: String,
    /// `connection` (each connection balanced, relayed as bytes) or
    /// `request (HTTP/1.1)` / `request (h2c)` (each HTTP request
    /// balanced).
    #[serde(default)]
    pub mode: String,
    /// `active`, or `closing` (removed; its listener closes once the
    /// rules no longer point at it).
    pub state: String,
    /// What the kernel is asked to do with its ClusterIP traffic:
    /// `redirect` (to the listener), `reject` (no usable endpoint),
    /// `held by another Service port` (two claim one ClusterIP:port),
    /// `none` (nothing to catch).
    pub rule: String,
    /// Whether the kernel holds that rule (false while a sync is pending
    /// or failing).
    pub rule_applied: bool,
    /// Client connections open now (connecting or relaying).
    pub open_connections: i64,
    pub endpoints: Vec<EndpointReport>,
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    /// `ip:port`.
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Whether new connections may go there (ready; or, when none is,
    /// serving and terminating).
    pub usable: bool,
    /// Connections open to it through this proxy; on a port in request
    /// mode, the requests in flight to it.
    pub open_connections: usize,
}

impl PortReport {
    /// `namespace/service[:port]/PROTOCOL`, as the logs name a Service port.
    pub fn name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}/{}", self.namespace, self.service, self.protocol)
        } else {
            format!(
                "{}/{}:{}/{}",
                self.namespace, self.service, self.port_name, self.protocol
            )
        }
    }
}

impl EndpointReport {
    fn conditions(&self) -> String {
        let mut c = vec![if self.ready { "ready" } else { "not ready" }];
        if self.serving && !self.ready {
            c.push("serving");
        }
        if self.terminating {
            c.push("terminating");
        }
        if !self.usable {
            c.push("unused");
        }
        c.join(", ")
    }
}

/// The report as a table an operator reads at a glance: one line per
/// Service port, its endpoints indented under it.
pub fn render_table(r: &ServicesReport) -> String {
    let mut out = String::new();
    let usable: usize = r
        .service_ports
        .iter()
        .map(|p| p.endpoints.iter().filter(|e| e.usable).count())
        .sum();
    let _ = writeln!(
        out,
        "kube-uproxy: {}; proxy address {}; {} service ports, {} usable endpoints{}",
        if r.healthy { "healthy" } else { "UNHEALTHY" },
        r.proxy_address,
        r.service_ports.len(),
        usable,
        r.unhealthy_reason
            .as_deref()
            .map(|w| format!(" ({w})"))
            .unwrap_or_default(),
    );
    if !r.source_synced {
        let _ = writeln!(
            out,
            "waiting for the first complete list of Services and EndpointSlices"
        );
    }
    if r.service_ports.is_empty() {
        return out;
    }
    let mut rows: Vec<[String; 7]> = vec![[
        "SERVICE PORT".into(),
        "CLUSTER-IP:PORT".into(),
        "PROXY".into(),
        "ALGORITHM".into(),
        "RULE".into(),
        "CONNS".into(),
        "ENDPOINTS".into(),
    ]];
    let mut endpoint_lines: Vec<Vec<String>> = vec![Vec::new()];
    for p in &r.service_ports {
        let ips = if p.cluster_ips.is_empty() {
            format!("-:{}", p.port)
        } else {
            p.cluster_ips
                .iter()
                .map(|ip| {
                    if ip.contains(':') {
                        format!("[{ip}]:{}", p.port)
                    } else {
                        format!("{ip}:{}", p.port)
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut rule = p.rule.clone();
        if !p.rule_applied {
            rule.push_str(" (pending)");
        }
        if p.state != "active" {
            rule.push_str(&format!(", {}", p.state));
        }
        let usable = p.endpoints.iter().filter(|e| e.usable).count();
        rows.push([
            p.name(),
            ips,
            p.proxy_port.to_string(),
            if p.mode.is_empty() || p.mode == "connection" {
                p.algorithm.clone()
            } else {
                format!("{} per {}", p.algorithm, p.mode)
            },
            rule,
            p.open_connections.to_string(),
            format!("{usable}/{} usable", p.endpoints.len()),
        ]);
        endpoint_lines.push(
            p.endpoints
                .iter()
                .map(|e| {
                    let node = e
                        .node_name
                        .as_deref()
                        .map(|n| format!(" on {n}"))
                        .unwrap_or_default();
                    format!(
                        "{:<24} {:<28} {} open{node}",
                        e.address,
                        e.conditions(),
                        e.open_connections
                    )
                })
                .collect(),
        );
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (row, eps) in rows.iter().zip(&endpoint_lines) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        for e in eps {
            let _ = writeln!(out, "    {e}");
        }
    }
    out
}

/// Fetching from a running proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {target}: {source} (is kube-uproxy running, with this address?)")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{target} did not answer within 5 s")]
    Timeout { target: String },
    #[error("{target} answered something that is not HTTP")]
    NotHttp { target: String },
    #[error("{target} answered HTTP {status}: {body}")]
    Status {
        target: String,
        status: u16,
        body: String,
    },
    #[error("cannot read the report from {target}: {source}")]
    Json {
        target: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How long a fetch may take in all.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The address to connect to for a server bound to `bound`: a wildcard
/// bind is reached on loopback.
pub fn connect_address(bound: SocketAddr) -> SocketAddr {
    let mut a = bound;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// An HTTP response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` over `stream` (HTTP/1.1, `Connection: close`), within
/// [`FETCH_TIMEOUT`]. `target` names the peer in errors.
pub async fn get<S>(mut stream: S, path: &str, target: &str) -> Result<Response, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |source| FetchError::Io {
        target: target.to_string(),
        source,
    };
    let exchange = async {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: kube-uproxy\r\nUser-Agent: kube-uproxy\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        // Bounded: a report of 10 000 Service ports is a few MB.
        (&mut stream)
            .take(64 << 20)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        parse_response(&raw).ok_or_else(|| FetchError::NotHttp {
            target: target.to_string(),
        })
    };
    match tokio::time::timeout(FETCH_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout {
            target: target.to_string(),
        }),
    }
}

/// `GET path` from `addr` over TCP.
pub async fn get_tcp(addr: SocketAddr, path: &str) -> Result<Response, FetchError> {
    let target = format!("http://{addr}{path}");
    let stream = tokio::time::timeout(FETCH_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| FetchError::Timeout {
            target: target.clone(),
        })?
        .map_err(|source| FetchError::Connect {
            target: target.clone(),
            source,
        })?;
    get(stream, path, &target).await
}

/// `GET path` over the Unix socket at `socket`.
pub async fn get_unix(socket: &std::path::Path, path: &str) -> Result<Response, FetchError> {
    let target = format!("unix:{}{path}", socket.display());
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| FetchError::Connect {
            target: target.clone(),
            source,
        })?;
    get(stream, path, &target).await
}

/// Fetches `/debug/services` from the metrics server at `addr`.
pub async fn fetch_report(addr: SocketAddr) -> Result<(ServicesReport, String), FetchError> {
    let target = format!("http://{addr}/debug/services");
    let r = get_tcp(addr, "/debug/services").await?;
    if r.status != 200 {
        return Err(FetchError::Status {
            target,
            status: r.status,
            body: r.body,
        });
    }
    let report = serde_json::from_str(&r.body).map_err(|source| FetchError::Json {
        target: target.clone(),
        source,
    })?;
    Ok((report, r.body))
}

/// Status line, headers and body of a complete HTTP/1.x response; a
/// chunked body is decoded.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ServicesReport {
        ServicesReport {
            proxy_address: "169.254.42.1".into(),
            healthy: true,
            unhealthy_reason: None,
            source_synced: true,
            service_ports: vec![
                PortReport {
                    namespace: "default".into(),
                    service: "web".into(),
                    port_name: "http".into(),
                    protocol: "TCP".into(),
                    ip_family: "IPv4".into(),
                    cluster_ips: vec!["10.96.0.10".into()],
                    port: 80,
                    proxy_port: 20000,
                    algorithm: "least-connections".into(),
                    mode: "request (h2c)".into(),
                    state: "active".into(),
                    rule: "redirect".into(),
                    rule_applied: true,
                    open_connections: 3,
                    endpoints: vec![
                        EndpointReport {
                            address: "10.1.0.7:8080".into(),
                            ready: true,
                            serving: true,
                            terminating: false,
                            node_name: Some("node-a".into()),
                            usable: true,
                            open_connections: 3,
                        },
                        EndpointReport {
                            address: "10.1.0.9:8080".into(),
                            ready: false,
                            serving: true,
                            terminating: true,
                            node_name: None,
                            usable: false,
                            open_connections: 0,
                        },
                    ],
                },
                PortReport {
                    namespace: "kube-system".into(),
                    service: "empty".into(),
                    protocol: "TCP".into(),
                    cluster_ips: vec!["10.96.0.11".into()],
                    port: 53,
                    proxy_port: 20001,
                    algorithm: "round-robin".into(),
                    state: "active".into(),
                    rule: "reject".into(),
                    rule_applied: false,
                    ..PortReport::default()
                },
            ],
        }
    }

    #[test]
    fn the_table_shows_each_port_and_its_endpoints() {
        let t = render_table(&report());
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("healthy") && lines[0].contains("2 service ports"),
            "{t}"
        );
        assert!(lines[0].contains("1 usable endpoints"), "{t}");
        assert!(lines[1].starts_with("SERVICE PORT"), "{t}");
        assert!(lines[2].starts_with("default/web:http/TCP"), "{t}");
        for cell in [
            "10.96.0.10:80",
            "20000",
            "least-connections per request (h2c)",
            "redirect",
            "1/2 usable",
        ] {
            assert!(lines[2].contains(cell), "{cell}: {t}");
        }
        assert!(
            lines[3].contains("10.1.0.7:8080") && lines[3].contains("3 open on node-a"),
            "{t}"
        );
        assert!(
            lines[4].contains("not ready, serving, terminating, unused"),
            "{t}"
        );
        assert!(lines[5].starts_with("kube-system/empty/TCP"), "{t}");
        assert!(lines[5].contains("reject (pending)"), "{t}");
        // Columns line up.
        let col = lines[1].find("PROXY").unwrap();
        assert_eq!(&lines[2][col..col + 5], "20000");
    }

    #[test]
    fn the_report_round_trips_through_json() {
        let r = report();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"servicePorts\""), "{text}");
        assert!(text.contains("\"openConnections\":3"), "{text}");
        assert_eq!(serde_json::from_str::<ServicesReport>(&text).unwrap(), r);
    }

    #[test]
    fn responses_are_parsed_plain_and_chunked() {
        let plain = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno";
        assert_eq!(
            parse_response(plain),
            Some(Response {
                status: 503,
                body: "no".into()
            })
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, "abcde");
        assert_eq!(parse_response(b"SSH-2.0\r\n\r\n"), None);
        assert_eq!(
            connect_address("0.0.0.0:10249".parse().unwrap()),
            "127.0.0.1:10249".parse().unwrap()
        );
    }
}
