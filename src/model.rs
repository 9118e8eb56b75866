//! The desired state, as plain data: Services, their ports and endpoints.
//!
//! Sources ([`crate::source`]) turn Kubernetes objects into these types and
//! feed them to a [`ClusterState`]; the reconciler asks the state which
//! Services changed and what each of their ports should look like now.
//! Nothing here does I/O, so all of it is unit-tested without root.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::vecmap::VecMap;

mod selection;
pub use selection::{Selection, TopologyMode};

/// The L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nftables uses for the protocol (`inet_proto`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl Protocol {
    /// The name Kubernetes uses: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (want TCP, UDP or SCTP)"
            )),
        }
    }
}

/// How a Service port spreads new connections over its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Each new connection goes to the next endpoint in turn.
    #[default]
    RoundRobin,
    /// Each new connection goes to the endpoint with the fewest open
    /// connections through this proxy; ties rotate. On a port in request
    /// mode: the fewest requests in flight.
    LeastConnections,
    /// Power of two choices over each endpoint's peak-EWMA response time
    /// times its requests (or connections) in flight, as Linkerd and
    /// Finagle balance: a slow endpoint gets a small share.
    PeakEwma,
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" | "rr" => Ok(Algorithm::RoundRobin),
            "least-connections" | "lc" => Ok(Algorithm::LeastConnections),
            "peak-ewma" | "ewma" => Ok(Algorithm::PeakEwma),
            other => Err(format!(
                "unknown algorithm {other:?} (want round-robin, least-connections or peak-ewma)"
            )),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::RoundRobin => "round-robin",
            Algorithm::LeastConnections => "least-connections",
            Algorithm::PeakEwma => "peak-ewma",
        })
    }
}

/// How a Service port's TCP connections are balanced: once per
/// connection (the L4 relay, as kube-proxy), or once per HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PortMode {
    /// Each connection picks an endpoint; bytes are relayed (L4).
    #[default]
    Connection,
    /// Each request picks an endpoint; HTTP/1.1 toward endpoints (upgrades
    /// become tunnels). Clients may speak HTTP/1.1 or h2c.
    Http1,
    /// Each request picks an endpoint; HTTP/2 without TLS (prior
    /// knowledge) toward endpoints: gRPC. Clients may speak either.
    Http2,
}

/// The Service annotation `kube-uproxy.io/balance`: per request or per
/// connection for all its ports, whatever their `appProtocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BalanceOverride {
    Request,
    Connection,
}

impl FromStr for BalanceOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "request" => Ok(BalanceOverride::Request),
            "connection" => Ok(BalanceOverride::Connection),
            other => Err(format!(
                "unknown balancing {other:?} (want request or connection)"
            )),
        }
    }
}

impl PortMode {
    /// The mode of a port from its `appProtocol` (compared
    /// case-insensitively) and the Service's override. Only TCP ports are
    /// balanced per request.
    ///
    /// | `appProtocol` | mode |
    /// |---|---|
    /// | `http`, `kubernetes.io/ws` | HTTP/1.1 |
    /// | `kubernetes.io/h2c`, `h2c`, `http2`, `grpc`, `grpc-web` | HTTP/2 |
    /// | anything else, or none | per connection |
    ///
    /// `request` on a port whose `appProtocol` names no HTTP flavour means
    /// HTTP/1.1; `connection` always means per connection.
    pub fn of(
        protocol: Protocol,
        app_protocol: Option<&str>,
        over: Option<BalanceOverride>,
    ) -> Self {
        if protocol != Protocol::Tcp || over == Some(BalanceOverride::Connection) {
            return PortMode::Connection;
        }
        let by_name = app_protocol
            .map(str::to_ascii_lowercase)
            .and_then(|a| match a.as_str() {
                "http" | "kubernetes.io/ws" => Some(PortMode::Http1),
                "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" | "grpc-web" => {
                    Some(PortMode::Http2)
                }
                _ => None,
            });
        match (by_name, over) {
            (Some(m), _) => m,
            (None, Some(BalanceOverride::Request)) => PortMode::Http1,
            (None, _) => PortMode::Connection,
        }
    }

    /// Whether requests, not connections, are balanced.
    pub fn per_request(self) -> bool {
        self != PortMode::Connection
    }
}

impl fmt::Display for PortMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortMode::Connection => "connection",
            PortMode::Http1 => "request (HTTP/1.1)",
            PortMode::Http2 => "request (h2c)",
        })
    }
}

/// The Service annotation `kube-uproxy.io/proxy-protocol`: a PROXY
/// protocol header (HAProxy's `send-proxy`) written first on every
/// connection to an endpoint, so that an endpoint that accepts it (an
/// ingress controller, HAProxy, nginx, Envoy) learns the client's address
/// and port, and the Service address the client connected to, which the
/// relay's second connection otherwise hides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The human-readable line (`PROXY TCP4 …\r\n`).
    V1,
    /// The binary header.
    V2,
}

impl FromStr for ProxyProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            other => Err(format!(
                "unknown PROXY protocol version {other:?} (want v1 or v2)"
            )),
        }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

/// The Service annotation `kube-uproxy.io/forwarded-headers`: on ports in
/// request mode, `X-Forwarded-For` and `Forwarded` (RFC 7239) carry the
/// client's address to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ForwardedHeaders {
    /// Requests pass with the headers the client sent (kube-proxy's
    /// behaviour: the proxy adds nothing).
    #[default]
    Off,
    /// `true`: the proxy's headers replace any the client sent. A client
    /// can write anything in them; an endpoint that trusts this hop must
    /// not trust what came before it.
    Replace,
    /// `append`: the client's headers are trusted (it is itself a proxy,
    /// such as a load balancer in front of the node) and the client's
    /// address is appended to their chain.
    Append,
}

impl FromStr for ForwardedHeaders {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "replace" => Ok(ForwardedHeaders::Replace),
            "append" => Ok(ForwardedHeaders::Append),
            "false" => Ok(ForwardedHeaders::Off),
            other => Err(format!(
                "unknown value {other:?} (want true, append or false)"
            )),
        }
    }
}

impl fmt::Display for ForwardedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardedHeaders::Off => "off",
            ForwardedHeaders::Replace => "replace",
            ForwardedHeaders::Append => "append",
        })
    }
}

/// `spec.sessionAffinity` of a Service, with its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    /// Every new connection is balanced on its own.
    #[default]
    None,
    /// `ClientIP`: a new connection (a new UDP flow) from a client IP goes
    /// to the endpoint the client's previous one went to, if that was
    /// less than `timeout` ago (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    ClientIp { timeout: Duration },
}

impl SessionAffinity {
    /// The API server's default `timeoutSeconds` (3 hours).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10800);
    /// The largest `timeoutSeconds` the API server accepts (1 day).
    pub const MAX_TIMEOUT_SECONDS: i32 = 86400;
}

impl fmt::Display for SessionAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionAffinity::None => f.write_str("None"),
            SessionAffinity::ClientIp { timeout } => write!(f, "ClientIP({}s)", timeout.as_secs()),
        }
    }
}

/// Identifies a Kubernetes object: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Identifies one port of one Service: the unit that owns a listener.
///
/// The port *number* is deliberately not part of the identity: when a
/// Service's port number changes, its listener (and its open connections)
/// stay, and only the redirect rule changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub service: ObjectKey,
    /// The port's `name` (empty for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.service, self.protocol)
        } else {
            write!(f, "{}:{}/{}", self.service, self.port, self.protocol)
        }
    }
}

/// Identifies one listener: a Service port, in one address family, for
/// one kind of traffic.
///
/// A dual-stack Service port has a listener on each family's proxy
/// address, each sending its clients to endpoints of its own family only.
/// A port whose two traffic policies differ (typically
/// `externalTrafficPolicy: Local` with `internalTrafficPolicy: Cluster`)
/// has a second listener per family: NodePort, externalIP and
/// load-balancer keys point to it, and its balancer holds the endpoints of
/// the external policy. (One listener cannot tell ClusterIP traffic from
/// NodePort traffic for UDP: both arrive DNATed to the same address.)
/// Ordered by Service port first, so one Service's listeners are a range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub port: ServicePortName,
    /// The family of the ClusterIPs (and proxy address) this listener serves.
    pub family: IpFamily,
    pub scope: TrafficScope,
}

/// Which traffic a listener serves; see [`ListenerKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficScope {
    /// ClusterIP traffic, and external traffic too when both traffic
    /// policies pick the same endpoints.
    Internal,
    /// NodePort, externalIP and load-balancer traffic of a Service whose
    /// `externalTrafficPolicy` differs from its `internalTrafficPolicy`.
    External,
    /// The same traffic from this node's pods (`--detect-local-mode`)
    /// when both policies are `Local`: the cluster-wide endpoints, as
    /// kube-proxy sends it (with `internalTrafficPolicy: Cluster` the
    /// `Internal` listener takes it).
    LocalPods,
}

impl fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            TrafficScope::Internal => write!(f, "{} {}", self.port, self.family),
            TrafficScope::External => {
                write!(f, "{} {} (external traffic)", self.port, self.family)
            }
            TrafficScope::LocalPods => {
                write!(
                    f,
                    "{} {} (external traffic from local pods)",
                    self.port, self.family
                )
            }
        }
    }
}

/// What the proxy knows of the node it runs on (`--hostname-override`,
/// the Node's `topology.kubernetes.io/zone` label or `--node-zone`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeTopology {
    /// Compared with EndpointSlice `nodeName` and `hints.forNodes`.
    pub name: String,
    /// Compared with `hints.forZones`; `None` when unknown.
    pub zone: Option<String>,
}

/// A Node object, reduced to what the proxy needs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// `metadata.name` (namespace empty: Nodes have none).
    pub key: ObjectKey,
    /// The label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// Not being deleted and without the `ToBeDeletedByClusterAutoscaler`
    /// taint: kube-proxy's "eligible" for `/healthz`.
    pub eligible: bool,
    /// `status.addresses` of type `InternalIP`, in their order: with
    /// the `ExternalIP`s, where `--nodeport-addresses primary` finds the
    /// node's primary IPs ([`NodeInfo::primary_ips`]).
    pub internal_ips: Vec<IpAddr>,
    /// `status.addresses` of type `ExternalIP`, in their order.
    pub external_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (else `spec.podCIDR`): the pods of this node, which
    /// `--detect-local-mode NodeCIDR` tells apart by source address.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    /// The node's primary IP of each family it has one of, primary family
    /// first: kube-proxy's `utilnode.GetNodeHostIPs` (the first
    /// `InternalIP`, else the first `ExternalIP`; then the first address of
    /// the other family in the same order). Empty when the Node lists none.
    pub fn primary_ips(&self) -> Vec<IpAddr> {
        let mut all = self.internal_ips.iter().chain(&self.external_ips);
        let Some(first) = all.next() else {
            return Vec::new();
        };
        let other = all.find(|ip| ip.is_ipv4() != first.is_ipv4());
        std::iter::once(*first).chain(other.copied()).collect()
    }
}

/// One port of a Service, as declared in `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `nodePort`, for Services of type NodePort and LoadBalancer.
    pub node_port: Option<u16>,
    /// `appProtocol`, as written: decides [`PortMode`].
    pub app_protocol: Option<String>,
}

/// A Service, reduced to what the proxy needs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    pub key: ObjectKey,
    /// `spec.clusterIPs` (or `spec.clusterIP`), parsed.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// From the annotation `kube-uproxy.io/lb-algorithm`; `None` = global default.
    pub algorithm: Option<Algorithm>,
    /// From the annotation `kube-uproxy.io/balance`; `None`: by each
    /// port's `appProtocol`.
    pub balance: Option<BalanceOverride>,
    /// From the annotation `kube-uproxy.io/proxy-protocol`; `None`: no
    /// header (as kube-proxy).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// From the annotation `kube-uproxy.io/forwarded-headers`.
    pub forwarded_headers: ForwardedHeaders,
    /// `spec.externalIPs`: caught like the ClusterIP.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode:
    /// Proxy` (the load balancer proxies to node ports itself).
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`: who may use the `lb_ips` (empty:
    /// everyone).
    pub lb_source_ranges: Vec<IpNet>,
    /// `spec.sessionAffinity` and its timeout, for every port.
    pub session_affinity: SessionAffinity,
    /// `spec.internalTrafficPolicy: Local`: ClusterIP traffic only to
    /// endpoints on this node.
    pub internal_local: bool,
    /// `spec.externalTrafficPolicy: Local` on a Service reachable from
    /// outside (NodePort, LoadBalancer, or externalIPs): external traffic
    /// only to endpoints on this node.
    pub external_local: bool,
    /// `spec.healthCheckNodePort`, served when `external_local`.
    pub health_check_node_port: Option<u16>,
    /// From the annotation `kube-uproxy.io/preserve-client-ip`: `Some`
    /// forces connections to this node's endpoints to come from the
    /// client's own address (or never to); `None`: the `Local` traffic
    /// policies decide ([`ServicePortSpec::preserve_client_ip`]).
    pub preserve_client_ip: Option<bool>,
}

/// One endpoint of an EndpointSlice, with its conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    /// `conditions.ready`; unset counts as ready.
    pub ready: bool,
    /// `conditions.serving`; unset takes the value of `ready`.
    pub serving: bool,
    /// `conditions.terminating`; unset counts as false.
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice, reduced to what the proxy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// The slice's own namespace/name.
    pub key: ObjectKey,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: ObjectKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of one Service port: where a connection can be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones[].name` of the slice endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name` of the slice endpoint.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// Whether the endpoint runs on the node named `node`.
    pub fn is_local(&self, node: &str) -> bool {
        !node.is_empty() && self.node_name.as_deref() == Some(node)
    }
}

/// An IP address family. A Service's ClusterIP of one family is served only
/// by endpoints of that family: a dual-stack Service has one set of
/// EndpointSlices per family, and sending IPv4 clients' connections to IPv6
/// endpoints (or the reverse) is not what the Service asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of an address. An IPv4-mapped IPv6 address counts as IPv6
    /// (the sources refuse such endpoints, see `source::convert`).
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// What one Service port should look like: the reconciler's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    pub name: ServicePortName,
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub algorithm: Algorithm,
    /// Per connection or per request ([`PortMode::of`]).
    pub mode: PortMode,
    /// The PROXY protocol header sent first on each connection to an
    /// endpoint (TCP ports only; a port with one is balanced per
    /// connection: see [`ServicePortSpec::mode_of`]).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `X-Forwarded-For` and `Forwarded` on requests (request mode only).
    pub forwarded_headers: ForwardedHeaders,
    /// The port on every node address, if the Service has one.
    pub node_port: Option<u16>,
    /// Addresses caught like the ClusterIP on `port`.
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    /// Sources allowed to the `lb_ips` (empty: all).
    pub lb_source_ranges: Vec<IpNet>,
    /// The Service's `sessionAffinity`: applied by the port's balancer to
    /// new connections, whatever address they were sent to.
    pub session_affinity: SessionAffinity,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (and the Service is reachable from
    /// outside).
    pub external_local: bool,
    /// The annotation `kube-uproxy.io/preserve-client-ip`, if set: whether
    /// connections to this node's endpoints come from the client's own
    /// address. `None`: on for the traffic a `Local` policy sends (there
    /// every endpoint is local, so kube-proxy's promise of the client's
    /// address can be kept), off for the rest.
    pub preserve_client_ip: Option<bool>,
    /// Every endpoint the slices list for this port, whatever its state and
    /// family, each address once, sorted by address (so IPv4 ones come
    /// first). Comparing two of these tells whether anything changed.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePortSpec {
    /// The mode of `port` of `svc`: [`PortMode::of`], except that a
    /// Service asking for the PROXY protocol is balanced per connection.
    /// The header describes one client's connection; in request mode one
    /// pooled connection to an endpoint carries the requests of many
    /// clients, and an endpoint that expects the header (it refuses
    /// connections without one) could not be served at all by a pool
    /// without it. The PROXY protocol is what the Service's endpoints
    /// need to work; request mode is an optimisation: the first wins.
    pub fn mode_of(svc: &ServiceInfo, port: &PortSpec) -> PortMode {
        if svc.proxy_protocol.is_some() {
            return PortMode::Connection;
        }
        PortMode::of(port.protocol, port.app_protocol.as_deref(), svc.balance)
    }

    /// The port's endpoints of one address family, whatever their state.
    pub fn endpoints_of(&self, family: IpFamily) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .iter()
            .filter(move |e| IpFamily::of(e.addr.ip()) == family)
    }

    /// The families this port is served in: those of its ClusterIPs
    /// (`spec.clusterIPs`, whose families are `spec.ipFamilies`), in that
    /// order, each once. kube-proxy serves a Service in a family only when
    /// it has a ClusterIP of that family; externalIPs and load-balancer IPs
    /// of another family are ignored, as it ignores them.
    pub fn families(&self) -> Vec<IpFamily> {
        let mut out = Vec::new();
        for f in self.cluster_ips.iter().map(|ip| IpFamily::of(*ip)) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// The addresses of one family among `ips`.
    pub fn of_family(ips: &[IpAddr], family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
        ips.iter()
            .copied()
            .filter(move |ip| IpFamily::of(*ip) == family)
    }
}

/// Everything the sources have told us, indexed for the reconciler, plus the
/// set of Services that changed since the reconciler last looked.
#[derive(Debug, Default)]
pub struct ClusterState {
    services: HashMap<ObjectKey, Arc<ServiceInfo>>,
    /// Slices grouped by the Service they belong to, then by slice name.
    slices: HashMap<ObjectKey, VecMap<Arc<str>, Arc<SliceInfo>>>,
    /// Which Service each slice belongs to, so a slice that moves or goes
    /// away marks the right Service dirty.
    slice_owner: HashMap<ObjectKey, ObjectKey>,
    dirty: BTreeSet<ObjectKey>,
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Adds or replaces a Service; marks it dirty only if it changed.
    pub fn apply_service(&mut self, svc: impl Into<Arc<ServiceInfo>>) {
        let svc = svc.into();
        if self.services.get(&svc.key) != Some(&svc) {
            self.dirty.insert(svc.key.clone());
            self.services.insert(svc.key.clone(), svc);
        }
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// Replaces every Service at once (initial list, relist, manifests
    /// reload): Services not in `all` are deleted, unchanged ones stay clean.
    pub fn replace_services(&mut self, all: Vec<Arc<ServiceInfo>>) {
        let keep: BTreeSet<ObjectKey> = all.iter().map(|s| s.key.clone()).collect();
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.delete_service(&k);
        }
        for s in all {
            self.apply_service(s);
        }
    }

    /// Adds or replaces an EndpointSlice; marks its Service dirty if it changed.
    pub fn apply_slice(&mut self, slice: impl Into<Arc<SliceInfo>>) {
        let slice = slice.into();
        if let Some(old_owner) = self.slice_owner.get(&slice.key).cloned()
            && old_owner != slice.service
        {
            self.delete_slice(&slice.key);
        }
        let group = self.slices.entry(slice.service.clone()).or_default();
        if group.get(&slice.key.name) != Some(&slice) {
            self.dirty.insert(slice.service.clone());
            self.slice_owner
                .insert(slice.key.clone(), slice.service.clone());
            group.insert(slice.key.name.clone(), slice);
        }
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        let Some(owner) = self.slice_owner.remove(key) else {
            return;
        };
        if let Some(group) = self.slices.get_mut(&owner) {
            group.remove(&key.name);
            if group.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Replaces every EndpointSlice at once.
    pub fn replace_slices(&mut self, all: Vec<Arc<SliceInfo>>) {
        let keep: BTreeSet<ObjectKey> = all.iter().map(|s| s.key.clone()).collect();
        let gone: Vec<ObjectKey> = self
            .slice_owner
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.delete_slice(&k);
        }
        for s in all {
            self.apply_slice(s);
        }
    }

    /// The Services that changed since the last call (and forgets them).
    pub fn take_dirty(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Every Service key currently known (for a full resync).
    pub fn all_service_keys(&self) -> BTreeSet<ObjectKey> {
        self.services.keys().cloned().collect()
    }

    /// A Service as the source gave it.
    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceInfo> {
        self.services.get(key).map(|v| &**v)
    }

    /// The desired ports of one Service (empty if the Service is gone).
    pub fn service_ports(&self, key: &ObjectKey, default: Algorithm) -> Vec<ServicePortSpec> {
        let Some(svc) = self.services.get(key) else {
            return Vec::new();
        };
        let slices = self.slices.get(key);
        svc.ports
            .iter()
            .map(|p| ServicePortSpec {
                name: ServicePortName {
                    service: key.clone(),
                    port: p.name.clone(),
                    protocol: p.protocol,
                },
                cluster_ips: svc.cluster_ips.clone(),
                port: p.port,
                algorithm: svc.algorithm.unwrap_or(default),
                mode: ServicePortSpec::mode_of(svc, p),
                proxy_protocol: svc.proxy_protocol.filter(|_| p.protocol == Protocol::Tcp),
                forwarded_headers: svc.forwarded_headers,
                node_port: p.node_port,
                external_ips: svc.external_ips.clone(),
                lb_ips: svc.lb_ips.clone(),
                lb_source_ranges: svc.lb_source_ranges.clone(),
                session_affinity: svc.session_affinity,
                internal_local: svc.internal_local,
                external_local: svc.external_local,
                preserve_client_ip: svc.preserve_client_ip,
                endpoints: slices
                    .map(|s| endpoints_for_port(s.values().map(|s| &**s), p))
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// Collects the endpoints of a Service port from its slices: every slice
/// port with the same name and protocol contributes `address:port` for each
/// endpoint.
///
/// An address listed in several slices (an endpoint moving from one slice
/// to another is briefly in both) is kept once: the copy in the best state
/// wins whole, conditions and node name together, because mixing the
/// conditions of two copies describes an endpoint that exists in neither.
/// Ready beats serving, serving beats neither; on a tie the first copy in
/// slice-name order stays. A hash index keeps this linear in the number of
/// endpoints (slices of large Services hold thousands each).
fn endpoints_for_port<'a>(
    slices: impl Iterator<Item = &'a SliceInfo>,
    port: &PortSpec,
) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut index: HashMap<SocketAddr, usize> = HashMap::new();
    for slice in slices {
        for sp in slice
            .ports
            .iter()
            .filter(|sp| sp.name == port.name && sp.protocol == port.protocol)
        {
            for ep in &slice.endpoints {
                let candidate = Endpoint {
                    addr: SocketAddr::new(ep.address, sp.port),
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    node_name: ep.node_name.clone(),
                    zone_hints: ep.zone_hints.clone(),
                    node_hints: ep.node_hints.clone(),
                };
                match index.get(&candidate.addr) {
                    Some(&i) => {
                        if rank(&candidate) > rank(&out[i]) {
                            out[i] = candidate;
                        }
                    }
                    None => {
                        index.insert(candidate.addr, out.len());
                        out.push(candidate);
                    }
                }
            }
        }
    }
    out.sort_unstable_by_key(|e| e.addr);
    out
}

/// Which copy of a duplicated endpoint is kept: the higher rank.
fn rank(e: &Endpoint) -> u8 {
    match (e.ready, e.serving) {
        (true, _) => 2,
        (false, true) => 1,
        (false, false) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ports: &[(&str, u16)]) -> ServiceInfo {
        ServiceInfo {
            key: ObjectKey::new("default", name),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: ports
                .iter()
                .map(|(n, p)| PortSpec {
                    name: n.to_string(),
                    protocol: Protocol::Tcp,
                    port: *p,
                    node_port: None,
                    app_protocol: None,
                })
                .collect(),
            ..ServiceInfo::default()
        }
    }

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            address: ip.parse().unwrap(),
            ready,
            serving,
            terminating,
            node_name: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    fn slice(name: &str, service: &str, port: (&str, u16), eps: Vec<SliceEndpoint>) -> SliceInfo {
        SliceInfo {
            key: ObjectKey::new("default", name),
            service: ObjectKey::new("default", service),
            ports: vec![SlicePort {
                name: port.0.to_string(),
                protocol: Protocol::Tcp,
                port: port.1,
            }],
            endpoints: eps,
        }
    }

    #[test]
    fn endpoints_are_joined_by_port_name_and_protocol() {
        let mut st = ClusterState::new();
        st.apply_service(svc("web", &[("http", 80), ("metrics", 9090)]));
        st.apply_slice(slice(
            "web-a",
            "web",
            ("http", 8080),
            vec![ep("10.0.0.1", true, true, false)],
        ));
        st.apply_slice(slice(
            "web-b",
            "web",
            ("metrics", 9100),
            vec![ep("10.0.0.2", true, true, false)],
        ));
        let ports = st.service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin);
        assert_eq!(ports.len(), 2);
        assert_eq!(
            ports[0]
                .select(IpFamily::V4, &NodeTopology::default())
                .cluster,
            vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            ports[1]
                .select(IpFamily::V4, &NodeTopology::default())
                .cluster,
            vec!["10.0.0.2:9100".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn not_ready_endpoints_are_not_used_unless_only_terminating_remain() {
        let spec = |eps: Vec<SliceEndpoint>| {
            let mut st = ClusterState::new();
            st.apply_service(svc("web", &[("", 80)]));
            st.apply_slice(slice("web-a", "web", ("", 8080), eps));
            st.service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
                .remove(0)
        };
        let s = spec(vec![
            ep("10.0.0.1", true, true, false),
            ep("10.0.0.2", false, false, false),
        ]);
        assert_eq!(
            s.select(IpFamily::V4, &NodeTopology::default())
                .cluster
                .len(),
            1
        );
        // No ready endpoint: fall back to serving + terminating ones.
        let s = spec(vec![
            ep("10.0.0.1", false, true, true),
            ep("10.0.0.2", false, false, true),
            ep("10.0.0.3", false, false, false),
        ]);
        assert_eq!(
            s.select(IpFamily::V4, &NodeTopology::default()).cluster,
            vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        let s = spec(vec![ep("10.0.0.2", false, false, false)]);
        assert!(
            s.select(IpFamily::V4, &NodeTopology::default())
                .cluster
                .is_empty()
        );
    }

    #[test]
    fn dirty_tracking_marks_only_changed_services() {
        let mut st = ClusterState::new();
        st.replace_services(vec![
            svc("a", &[("", 80)]).into(),
            svc("b", &[("", 80)]).into(),
        ]);
        assert_eq!(st.take_dirty().len(), 2);
        // Same content again: nothing is dirty.
        st.replace_services(vec![
            svc("a", &[("", 80)]).into(),
            svc("b", &[("", 80)]).into(),
        ]);
        assert!(st.take_dirty().is_empty());
        // b changes, a is removed.
        st.replace_services(vec![svc("b", &[("", 81)]).into()]);
        let d = st.take_dirty();
        assert_eq!(
            d.into_iter()
                .map(|k| k.name.to_string())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        // A slice change dirties its Service; a slice moving to another
        // Service dirties both.
        st.apply_slice(slice("s1", "b", ("", 8080), vec![]));
        assert_eq!(st.take_dirty().len(), 1);
        st.apply_slice(slice("s1", "c", ("", 8080), vec![]));
        let d: Vec<String> = st
            .take_dirty()
            .into_iter()
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(d, vec!["b", "c"]);
        st.replace_slices(vec![]);
        let d: Vec<String> = st
            .take_dirty()
            .into_iter()
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(d, vec!["c"]);
    }

    fn slice_with(name: &str, eps: Vec<SliceEndpoint>) -> SliceInfo {
        slice(name, "web", ("", 8080), eps)
    }

    fn dual_stack_web() -> ServiceInfo {
        ServiceInfo {
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            ..svc("web", &[("", 80)])
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn ipv4_cluster_ip_is_served_only_by_ipv4_endpoints() {
        // A dual-stack Service has one slice per address type.
        let mut st = ClusterState::new();
        st.apply_service(dual_stack_web());
        st.apply_slice(slice_with("web-v6", vec![ep("fd00::1", true, true, false)]));
        st.apply_slice(slice_with(
            "web-v4",
            vec![ep("10.0.0.1", true, true, false)],
        ));
        let s = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        assert_eq!(
            s.select(IpFamily::V4, &NodeTopology::default()).cluster,
            addrs(&["10.0.0.1:8080"])
        );
    }

    #[test]
    fn each_family_has_its_own_endpoints_and_fallback() {
        let mut st = ClusterState::new();
        st.apply_service(dual_stack_web());
        st.apply_slice(slice_with(
            "web-v4",
            vec![
                ep("10.0.0.1", true, true, false),
                ep("10.0.0.2", false, true, true),
            ],
        ));
        // No ready IPv6 endpoint: the IPv6 side falls back to its serving
        // and terminating one, whatever the IPv4 side has.
        st.apply_slice(slice_with(
            "web-v6",
            vec![
                ep("fd00::1", false, true, true),
                ep("fd00::2", false, false, false),
            ],
        ));
        let s = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        assert_eq!(
            s.select(IpFamily::V4, &NodeTopology::default()).cluster,
            addrs(&["10.0.0.1:8080"])
        );
        assert_eq!(
            s.select(IpFamily::V6, &NodeTopology::default()).cluster,
            addrs(&["[fd00::1]:8080"])
        );
        assert_eq!(s.endpoints_of(IpFamily::V6).count(), 2);
        assert_eq!(s.endpoints.len(), 4);
        assert!(s.endpoints.is_sorted_by_key(|e| e.addr));
        assert_eq!(
            s.cluster_ips
                .iter()
                .map(|ip| IpFamily::of(*ip))
                .collect::<Vec<_>>(),
            vec![IpFamily::V4, IpFamily::V6]
        );
    }

    #[test]
    fn duplicate_endpoints_keep_the_whole_ready_copy() {
        // An endpoint moving between slices is briefly listed in both: the
        // ready copy is the current one, node name included.
        let mut st = ClusterState::new();
        st.apply_service(svc("web", &[("", 80)]));
        let mut old = ep("10.0.0.1", false, false, true);
        old.node_name = Some("old-node".into());
        let mut new = ep("10.0.0.1", true, true, false);
        new.node_name = Some("new-node".into());
        st.apply_slice(slice_with("a", vec![old]));
        st.apply_slice(slice_with("b", vec![new]));
        let s = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        assert_eq!(s.endpoints.len(), 1);
        let e = &s.endpoints[0];
        assert!(e.ready && e.serving && !e.terminating);
        assert_eq!(e.node_name.as_deref(), Some("new-node"));
    }

    #[test]
    fn endpoints_listed_in_several_slices_merge_in_linear_time() {
        // 2 x 100 000 copies: comparing each endpoint with every one kept
        // so far takes many seconds; a hash index takes milliseconds.
        const N: u32 = 100_000;
        let copies = |ready: bool| -> Vec<SliceEndpoint> {
            (0..N)
                .map(|i| SliceEndpoint {
                    address: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                    ready,
                    serving: ready,
                    terminating: false,
                    node_name: None,
                    zone_hints: Vec::new(),
                    node_hints: Vec::new(),
                })
                .collect()
        };
        let mut st = ClusterState::new();
        st.apply_service(svc("web", &[("", 80)]));
        st.apply_slice(slice_with("a", copies(false)));
        st.apply_slice(slice_with("b", copies(true)));
        let started = std::time::Instant::now();
        let s = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        let took = started.elapsed();
        assert_eq!(s.endpoints.len(), N as usize);
        assert!(s.endpoints.iter().all(|e| e.ready));
        assert!(
            took < std::time::Duration::from_secs(2),
            "merging took {took:?}"
        );
    }

    #[test]
    fn duplicate_addresses_across_slices_merge() {
        let mut st = ClusterState::new();
        st.apply_service(svc("web", &[("", 80)]));
        st.apply_slice(slice(
            "a",
            "web",
            ("", 8080),
            vec![ep("10.0.0.1", false, false, false)],
        ));
        st.apply_slice(slice(
            "b",
            "web",
            ("", 8080),
            vec![ep("10.0.0.1", true, true, false)],
        ));
        let s = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        assert_eq!(s.endpoints.len(), 1);
        assert!(s.endpoints[0].ready);
    }

    #[test]
    fn a_port_is_served_in_the_families_of_its_cluster_ips() {
        let mut st = ClusterState::new();
        let mut six = svc("six", &[("", 80)]);
        six.cluster_ips = vec!["fd00:96::10".parse().unwrap()];
        six.external_ips = vec!["10.200.8.8".parse().unwrap(), "fd00:8::8".parse().unwrap()];
        st.apply_service(six);
        st.apply_service(dual_stack_web());
        let six = st
            .service_ports(&ObjectKey::new("default", "six"), Algorithm::RoundRobin)
            .remove(0);
        // An IPv4 externalIP does not make an IPv6-only Service IPv4.
        assert_eq!(six.families(), [IpFamily::V6]);
        assert_eq!(
            ServicePortSpec::of_family(&six.external_ips, IpFamily::V6).collect::<Vec<_>>(),
            ["fd00:8::8".parse::<IpAddr>().unwrap()]
        );
        let web = st
            .service_ports(&ObjectKey::new("default", "web"), Algorithm::RoundRobin)
            .remove(0);
        assert_eq!(web.families(), [IpFamily::V4, IpFamily::V6]);
        let key = |family| ListenerKey {
            port: web.name.clone(),
            family,
            scope: TrafficScope::Internal,
        };
        let k6 = key(IpFamily::V6);
        assert!(key(IpFamily::V4) < k6);
        assert_eq!(k6.to_string(), "default/web/TCP IPv6");
    }
}
