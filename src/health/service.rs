//! The health check node ports of Services with `externalTrafficPolicy:
//! Local` (`spec.healthCheckNodePort`), as kube-proxy serves them: an
//! external load balancer asks each node whether to send it traffic.
//!
//! Every path of the port answers kube-proxy's JSON,
//! `{"service":{"namespace","name"},"localEndpoints":N,"serviceProxyHealthy":B}`,
//! with 200 when the node has ready endpoints of the Service (N > 0) and the
//! proxy is healthy (the `/livez` verdict: node eligibility does not count
//! here, as in kube-proxy), 503 otherwise. N is the number of ready local
//! endpoints summed over the Service's ports, counted per family as
//! kube-proxy does (a dual-stack pod counts once, not once per family; of
//! the two families, the larger count).
//!
//! The reconciler says what each Service needs ([`ServiceHealthServers::set`]);
//! a port is bound with `SO_REUSEPORT` (for the handover) and served until
//! the Service no longer needs it. A port that cannot be bound is retried
//! every few seconds. Where, as kube-proxy does: on every address of both
//! families (an IPv6 load balancer checks over IPv6), or, with
//! `--nodeport-addresses`, on the node's addresses within those CIDRs
//! only (found at start; with `primary`, found again when the Node's
//! primary IPs change, [`ServiceHealthServers::set_addresses`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::health::ProxyHealth;
use crate::model::ObjectKey;
use crate::serve;

/// One Service's health check server.
struct Server {
    port: u16,
    /// Read by the handler at each request; written by the reconciler.
    local_endpoints: Arc<AtomicUsize>,
    /// What stops the server on each address it listens on.
    on: Vec<(IpAddr, CancellationToken)>,
}

impl Server {
    fn stop(&self) {
        for (_, stop) in &self.on {
            stop.cancel();
        }
    }
}

/// The health check node ports being served, by Service.
pub struct ServiceHealthServers {
    proxy: Arc<ProxyHealth>,
    /// Stops every server (shutdown).
    cancel: CancellationToken,
    served: Mutex<Served>,
    /// All the ports' connections together (they are reachable from
    /// outside the node, one port per Service): see crate::serve.
    cap: serve::ConnectionCap,
}

/// The servers and where they listen, changed together.
struct Served {
    servers: HashMap<ObjectKey, Server>,
    /// Where each port is bound: the IPv4 wildcard (served on both
    /// families, see [`crate::serve`]), or the node's addresses within
    /// `--nodeport-addresses`.
    addresses: Vec<IpAddr>,
}

/// What a handler needs.
#[derive(Clone)]
struct HandlerState {
    service: ObjectKey,
    local_endpoints: Arc<AtomicUsize>,
    proxy: Arc<ProxyHealth>,
}

impl ServiceHealthServers {
    /// `cancel` stops every server. `addresses`: where to listen, `None`
    /// for every address of both families (no `--nodeport-addresses`).
    pub fn new(
        proxy: Arc<ProxyHealth>,
        cancel: CancellationToken,
        addresses: Option<Vec<IpAddr>>,
    ) -> Arc<Self> {
        Arc::new(ServiceHealthServers {
            proxy,
            cancel,
            served: Mutex::new(Served {
                servers: HashMap::new(),
                addresses: listen_on(addresses),
            }),
            cap: serve::ConnectionCap::new(serve::MAX_HEALTH_CHECK_CONNECTIONS),
        })
    }

    /// Every port moves to `addresses` (as in [`Self::new`]) if they are
    /// not where it listens already: `--nodeport-addresses primary` when
    /// the Node's primary IPs become known or change. Must run inside a
    /// tokio runtime.
    pub fn set_addresses(&self, addresses: Option<Vec<IpAddr>>) {
        let addresses = listen_on(addresses);
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        if served.addresses == addresses {
            return;
        }
        info!(
            ?addresses,
            "health check node ports move to these addresses"
        );
        // Only the addresses that change: a port stays open, without a
        // gap, on an address in both sets.
        for (service, server) in &mut served.servers {
            server.on.retain(|(ip, stop)| {
                let keep = addresses.contains(ip);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for ip in &addresses {
                if !server.on.iter().any(|(on, _)| on == ip) {
                    let stop = self.spawn(service, server.port, &server.local_endpoints, *ip);
                    server.on.push((*ip, stop));
                }
            }
        }
        served.addresses = addresses;
    }

    /// `service` needs a health check on this port with this many local
    /// endpoints (`None`: none any more). Must run inside a tokio runtime.
    pub fn set(&self, service: &ObjectKey, want: Option<(u16, usize)>) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let Served { servers, addresses } = &mut *served;
        match (servers.get(service), want) {
            (Some(s), Some((port, n))) if s.port == port => {
                s.local_endpoints.store(n, Ordering::Relaxed);
                return;
            }
            (None, None) => return,
            _ => {}
        }
        if let Some(old) = servers.remove(service) {
            info!(service = %service, port = old.port, "health check node port closed");
            old.stop();
        }
        let Some((port, n)) = want else {
            return;
        };
        let local_endpoints = Arc::new(AtomicUsize::new(n));
        let on = addresses
            .iter()
            .map(|ip| (*ip, self.spawn(service, port, &local_endpoints, *ip)))
            .collect();
        servers.insert(
            service.clone(),
            Server {
                port,
                local_endpoints,
                on,
            },
        );
    }

    /// Serves `service`'s health check on `ip`:`port`; the token that
    /// stops it.
    fn spawn(
        &self,
        service: &ObjectKey,
        port: u16,
        local_endpoints: &Arc<AtomicUsize>,
        ip: IpAddr,
    ) -> CancellationToken {
        let stop = self.cancel.child_token();
        let state = HandlerState {
            service: service.clone(),
            local_endpoints: Arc::clone(local_endpoints),
            proxy: Arc::clone(&self.proxy),
        };
        let router = Router::new().fallback(answer).with_state(state);
        serve::spawn_tcp_within(
            "health-check-node-port",
            SocketAddr::new(ip, port),
            router,
            stop.clone(),
            Some(self.cap.clone()),
        );
        stop
    }
}

/// Where the ports listen: `addresses` (sorted, once each: compared with
/// the last set), or the IPv4 wildcard for every address of both
/// families.
fn listen_on(addresses: Option<Vec<IpAddr>>) -> Vec<IpAddr> {
    let mut addresses = addresses.unwrap_or_else(|| vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

/// kube-proxy's body for a Service's health check.
pub fn body(service: &ObjectKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {ns},\n\t\t\"name\": {name}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        ns = serde_json::Value::from(&*service.namespace),
        name = serde_json::Value::from(&*service.name),
    )
}

async fn answer(State(s): State<HandlerState>) -> Response {
    let n = s.local_endpoints.load(Ordering::Relaxed);
    let healthy = s.proxy.check(true).healthy;
    super::health_json(n > 0 && healthy, body(&s.service, n, healthy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http1::{self, SendRequest};
    use hyper_util::rt::TokioIo;
    use std::time::Duration;
    use tokio::net::TcpStream;

    const V4_1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const V4_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    /// An HTTP/1.1 connection to `ip:port` (hyper's client), kept open for
    /// more requests; `None` if it cannot be opened.
    async fn connect(ip: IpAddr, port: u16) -> Option<SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect((ip, port)).await.ok()?;
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        Some(send)
    }

    /// One `GET /` on `conn`: the status, or `None` when the server
    /// closed the connection (or said nothing within 2 s).
    async fn get(conn: &mut SendRequest<Empty<Bytes>>) -> Option<u16> {
        let request = hyper::Request::get("/")
            .header(hyper::header::HOST, "lb")
            .body(Empty::new())
            .ok()?;
        tokio::time::timeout(Duration::from_secs(2), async {
            conn.ready().await.ok()?;
            let response = conn.send_request(request).await.ok()?;
            let status = response.status().as_u16();
            // Read to its end: the connection then takes the next request.
            response.into_body().collect().await.ok()?;
            Some(status)
        })
        .await
        .ok()?
    }

    /// Polls for up to 5 s until `ip:port` answers `GET /` (`true`; 503
    /// here: the proxy has not synced) or refuses connections (`false`);
    /// whether it did.
    async fn becomes(ip: IpAddr, port: u16, answers: bool) -> bool {
        for _ in 0..100 {
            let now = match connect(ip, port).await {
                Some(mut c) => get(&mut c).await.is_some(),
                None => false,
            };
            if now == answers {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// `--nodeport-addresses primary`: the ports move to the Node's new
    /// addresses, close on the ones it left, and stay open (their kept
    /// connections too) on the ones it kept.
    #[tokio::test]
    async fn a_port_moves_with_the_addresses_and_stays_where_they_stay() {
        let port = std::net::TcpListener::bind((V4_1, 0))
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(30))),
            CancellationToken::new(),
            Some(vec![V4_1]),
        );
        let web = ObjectKey::new("default", "web");
        servers.set(&web, Some((port, 1)));
        assert!(becomes(V4_1, port, true).await, "127.0.0.1 never answered");

        // A load balancer's kept connection to the address that stays.
        servers.set_addresses(Some(vec![V4_2, V4_1]));
        assert!(becomes(V4_2, port, true).await, "127.0.0.2 never answered");
        let mut kept = connect(V4_2, port).await.expect("connect to 127.0.0.2");
        assert_eq!(get(&mut kept).await, Some(503));

        servers.set_addresses(Some(vec![V4_2]));
        assert!(becomes(V4_1, port, false).await, "127.0.0.1 still answers");
        assert_eq!(
            get(&mut kept).await,
            Some(503),
            "the port on 127.0.0.2 was restarted, closing its connections"
        );
        // The same set in another order changes nothing.
        servers.set_addresses(Some(vec![V4_2, V4_2]));
        assert_eq!(get(&mut kept).await, Some(503));
    }

    #[test]
    fn the_body_is_kube_proxys_json() {
        let b = body(&ObjectKey::new("default", "web"), 2, true);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
    }
}
