//! Services and their EndpointSlices as YAML, the way `kubectl get
//! svc,endpointslices -o yaml` prints them: input for `kube-uproxy
//! --manifests` in the end-to-end tests and the benchmarks.
//!
//! A [`ServiceManifest`] describes one Service (ClusterIP by default;
//! NodePort or LoadBalancer with [`ServiceManifest::with_type`], with
//! externalIPs, load-balancer ingress and source ranges) and, optionally, the
//! one EndpointSlice the EndpointSlice controller would make for it;
//! [`list_yaml`] prints several of them as one `kind: List`, each Service
//! followed by its slice. Everything kubectl would print and the proxy does
//! not read (uids, timestamps, owner references, `status`) is filled in with
//! fixed or derived values, so the same input always gives the same text.
//!
//! ```
//! use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, list_yaml};
//! use std::net::Ipv4Addr;
//!
//! let web = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
//!     .with_port(PortManifest::tcp(80, 8080))
//!     .with_endpoints(vec![EndpointManifest::ready(Ipv4Addr::new(10, 200, 1, 10))]);
//! let yaml = list_yaml(&[web]);
//! assert!(yaml.starts_with("apiVersion: v1\nitems:\n"));
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

/// A Service port's protocol, as the manifests spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The name nft uses in a set key (`tcp`, `udp`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// `creationTimestamp` (and the slice's last-change-trigger-time) of every object.
const TIMESTAMP: &str = "2025-01-01T00:00:00Z";

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    /// A DNS alias: no ClusterIP is proxied (its `clusterIP` is still
    /// printed, which the proxy must ignore).
    ExternalName,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        })
    }
}

/// `status.loadBalancer.ingress[].ipMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpMode {
    /// Traffic to the IP reaches the node with the IP as its destination:
    /// the proxy intercepts it.
    Vip,
    /// The load balancer proxies to the node itself: not intercepted.
    Proxy,
}

impl fmt::Display for IpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpMode::Vip => "VIP",
            IpMode::Proxy => "Proxy",
        })
    }
}

/// One entry of `status.loadBalancer.ingress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbIngress {
    pub ip: IpAddr,
    /// `None`: no `ipMode` field (clusters before 1.29 print none).
    pub ip_mode: Option<IpMode>,
}

/// One Service, and the EndpointSlice that goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceManifest {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIP` (and the only element of `spec.clusterIPs`); its
    /// family is the Service's and the slice's `addressType`.
    pub cluster_ip: IpAddr,
    /// `spec.ports` and, with their target ports, the slice's `ports`.
    pub ports: Vec<PortManifest>,
    /// `metadata.annotations` of the Service.
    pub annotations: BTreeMap<String, String>,
    /// `metadata.labels` of the Service (the slice only carries the two
    /// labels the EndpointSlice controller sets).
    pub labels: BTreeMap<String, String>,
    /// `None`: no EndpointSlice at all; `Some(empty)`: a slice with
    /// `endpoints: null`. Addresses must be of the `cluster_ip`'s family.
    pub endpoints: Option<Vec<EndpointManifest>>,
    /// `metadata.resourceVersion` of the Service; its slice has the next one.
    pub resource_version: u64,
    /// `spec.type`. NodePort and LoadBalancer also print
    /// `externalTrafficPolicy: Cluster`, LoadBalancer
    /// `allocateLoadBalancerNodePorts: true`, as the API server defaults them.
    pub service_type: ServiceType,
    /// `spec.externalIPs` (omitted when empty).
    pub external_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (CIDRs; omitted when empty).
    pub load_balancer_source_ranges: Vec<String>,
    /// `status.loadBalancer.ingress` (`loadBalancer: {}` when empty).
    pub lb_ingress: Vec<LbIngress>,
    /// `Some(t)`: `sessionAffinity: ClientIP` with
    /// `sessionAffinityConfig.clientIP.timeoutSeconds: t`; `None`:
    /// `sessionAffinity: None`.
    pub client_ip_affinity: Option<i32>,
    /// `spec.internalTrafficPolicy` (`Cluster` when `None`).
    pub internal_traffic_policy: Option<String>,
    /// `spec.externalTrafficPolicy` (`Cluster` when `None`, printed for
    /// NodePort and LoadBalancer Services).
    pub external_traffic_policy: Option<String>,
    /// `spec.healthCheckNodePort` (omitted when `None`).
    pub health_check_node_port: Option<u16>,
    /// `spec.trafficDistribution` (omitted when `None`).
    pub traffic_distribution: Option<String>,
    /// At most this many endpoints per EndpointSlice (the controller's
    /// default is 100); `None`: one slice.
    pub slice_size: Option<usize>,
}

/// One Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortManifest {
    /// Empty for an unnamed port (no `name` in the Service, `name: ""` in
    /// the slice).
    pub name: String,
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// `targetPort` of the Service, the port of the slice.
    pub target_port: u16,
    /// `nodePort` of the Service port (omitted when `None`).
    pub node_port: Option<u16>,
    /// `appProtocol` of the Service port and of the slice's port (omitted
    /// when `None`): what the port speaks (`http`, `grpc`,
    /// `kubernetes.io/h2c`, ...), which chooses per-request balancing.
    pub app_protocol: Option<String>,
}

/// One endpoint of the slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointManifest {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// The Pod behind the endpoint (`targetRef`, in the Service's
    /// namespace); `None`: no `targetRef`.
    pub pod: Option<String>,
    /// `zone` of the endpoint (omitted when `None`).
    pub zone: Option<String>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

impl ServiceManifest {
    /// A Service in namespace `default` labelled (and selecting) `app:
    /// <name>`, without ports or annotations, with an EndpointSlice without
    /// endpoints, at resourceVersion 1.
    pub fn new(name: impl Into<String>, cluster_ip: impl Into<IpAddr>) -> Self {
        let name = name.into();
        ServiceManifest {
            namespace: "default".to_string(),
            labels: BTreeMap::from([("app".to_string(), name.clone())]),
            name,
            cluster_ip: cluster_ip.into(),
            ports: Vec::new(),
            annotations: BTreeMap::new(),
            endpoints: Some(Vec::new()),
            resource_version: 1,
            service_type: ServiceType::ClusterIP,
            external_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            lb_ingress: Vec::new(),
            client_ip_affinity: None,
            internal_traffic_policy: None,
            external_traffic_policy: None,
            health_check_node_port: None,
            traffic_distribution: None,
            slice_size: None,
        }
    }

    /// Sets `spec.internalTrafficPolicy` and `spec.externalTrafficPolicy`
    /// (`Cluster` or `Local`).
    pub fn with_traffic_policies(mut self, internal: &str, external: &str) -> Self {
        self.internal_traffic_policy = Some(internal.to_string());
        self.external_traffic_policy = Some(external.to_string());
        self
    }

    /// Sets `spec.healthCheckNodePort`.
    pub fn with_health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    /// Sets `spec.trafficDistribution` (e.g. `PreferSameZone`).
    pub fn with_traffic_distribution(mut self, value: &str) -> Self {
        self.traffic_distribution = Some(value.to_string());
        self
    }

    /// Splits the endpoints over EndpointSlices of at most `n` each.
    pub fn with_slice_size(mut self, n: usize) -> Self {
        self.slice_size = Some(n.max(1));
        self
    }

    /// Sets `spec.type`.
    pub fn with_type(mut self, service_type: ServiceType) -> Self {
        self.service_type = service_type;
        self
    }

    /// Sets `spec.externalIPs`.
    pub fn with_external_ips<I, A>(mut self, ips: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<IpAddr>,
    {
        self.external_ips = ips.into_iter().map(Into::into).collect();
        self
    }

    /// Adds an entry to `status.loadBalancer.ingress`.
    pub fn with_lb_ingress(mut self, ip: impl Into<IpAddr>, ip_mode: Option<IpMode>) -> Self {
        self.lb_ingress.push(LbIngress {
            ip: ip.into(),
            ip_mode,
        });
        self
    }

    /// Sets `spec.loadBalancerSourceRanges` (CIDRs such as `10.0.0.0/8`).
    pub fn with_source_ranges<I, S>(mut self, ranges: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.load_balancer_source_ranges = ranges.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `sessionAffinity: ClientIP` with this `timeoutSeconds`.
    pub fn with_client_ip_affinity(mut self, timeout_seconds: i32) -> Self {
        self.client_ip_affinity = Some(timeout_seconds);
        self
    }

    /// Adds a port.
    pub fn with_port(mut self, port: PortManifest) -> Self {
        self.ports.push(port);
        self
    }

    /// Sets an annotation.
    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Sets a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Gives the Service a slice with these endpoints.
    pub fn with_endpoints(mut self, endpoints: Vec<EndpointManifest>) -> Self {
        self.endpoints = Some(endpoints);
        self
    }

    /// Appends the Service, then its EndpointSlice (if any), as items of a
    /// YAML list at the indentation of [`list_yaml`].
    pub fn push_items(&self, out: &mut String) {
        self.push_service(out);
        match (&self.endpoints, self.slice_size) {
            (Some(endpoints), Some(n)) if endpoints.len() > n => {
                for (i, chunk) in endpoints.chunks(n).enumerate() {
                    self.push_slice(out, chunk, i);
                }
            }
            (Some(endpoints), _) => self.push_slice(out, endpoints, 0),
            (None, _) => {}
        }
    }

    fn push_service(&self, out: &mut String) {
        let name = scalar(&self.name);
        let ip = ip_scalar(self.cluster_ip);
        out.push_str("- apiVersion: v1\n  kind: Service\n  metadata:\n");
        push_map(out, "    ", "annotations", &self.annotations);
        let _ = writeln!(out, "    creationTimestamp: \"{TIMESTAMP}\"");
        push_map(out, "    ", "labels", &self.labels);
        let _ = writeln!(
            out,
            "    name: {name}
    namespace: {namespace}
    resourceVersion: \"{rv}\"
    uid: {uid}
  spec:",
            namespace = scalar(&self.namespace),
            rv = self.resource_version,
            uid = uid(&self.namespace, &self.name, 1),
        );
        // The keys of `spec` in kubectl's (alphabetical) order.
        let external = matches!(
            self.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        );
        if self.service_type == ServiceType::LoadBalancer {
            out.push_str("    allocateLoadBalancerNodePorts: true\n");
        }
        let _ = writeln!(out, "    clusterIP: {ip}\n    clusterIPs:\n    - {ip}");
        push_list(
            out,
            "    ",
            "externalIPs",
            self.external_ips.iter().map(|a| ip_scalar(*a)),
        );
        if external || self.external_traffic_policy.is_some() {
            let _ = writeln!(
                out,
                "    externalTrafficPolicy: {}",
                self.external_traffic_policy.as_deref().unwrap_or("Cluster")
            );
        }
        if let Some(port) = self.health_check_node_port {
            let _ = writeln!(out, "    healthCheckNodePort: {port}");
        }
        let _ = writeln!(
            out,
            "    internalTrafficPolicy: {internal}
    ipFamilies:
    - {family}
    ipFamilyPolicy: SingleStack",
            family = family(self.cluster_ip),
            internal = self.internal_traffic_policy.as_deref().unwrap_or("Cluster"),
        );
        push_list(
            out,
            "    ",
            "loadBalancerSourceRanges",
            self.load_balancer_source_ranges
                .iter()
                .map(|r| cidr_scalar(r)),
        );
        if !self.ports.is_empty() {
            out.push_str("    ports:\n");
        }
        for p in &self.ports {
            let mut first = "- ";
            if let Some(app_protocol) = &p.app_protocol {
                let _ = writeln!(out, "    - appProtocol: {}", scalar(app_protocol));
                first = "  ";
            }
            if !p.name.is_empty() {
                let _ = writeln!(out, "    {first}name: {}", scalar(&p.name));
                first = "  ";
            }
            if let Some(node_port) = p.node_port {
                let _ = writeln!(out, "    {first}nodePort: {node_port}");
                first = "  ";
            }
            let _ = write!(
                out,
                "    {first}port: {}\n      protocol: {}\n      targetPort: {}\n",
                p.port, p.protocol, p.target_port
            );
        }
        let _ = write!(out, "    selector:\n      app: {name}\n");
        match self.client_ip_affinity {
            None => out.push_str("    sessionAffinity: None\n"),
            Some(t) => {
                let _ = write!(
                    out,
                    "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: {t}\n"
                );
            }
        }
        if let Some(d) = &self.traffic_distribution {
            let _ = writeln!(out, "    trafficDistribution: {}", scalar(d));
        }
        if self.service_type == ServiceType::ExternalName {
            out.push_str("    externalName: example.com\n");
        }
        let _ = write!(
            out,
            "    type: {service_type}\n  status:\n",
            service_type = self.service_type,
        );
        if self.lb_ingress.is_empty() {
            out.push_str("    loadBalancer: {}\n");
        } else {
            out.push_str("    loadBalancer:\n      ingress:\n");
            for i in &self.lb_ingress {
                let _ = writeln!(out, "      - ip: {}", ip_scalar(i.ip));
                if let Some(mode) = i.ip_mode {
                    let _ = writeln!(out, "        ipMode: {mode}");
                }
            }
        }
    }

    /// The `index`th EndpointSlice of the Service, with these endpoints.
    fn push_slice(&self, out: &mut String, endpoints: &[EndpointManifest], index: usize) {
        let namespace = scalar(&self.namespace);
        let _ = writeln!(
            out,
            "- addressType: {}\n  apiVersion: discovery.k8s.io/v1",
            family(self.cluster_ip)
        );
        if endpoints.is_empty() {
            out.push_str("  endpoints: null\n");
        } else {
            out.push_str("  endpoints:\n");
        }
        for e in endpoints {
            let _ = write!(
                out,
                "  - addresses:
    - {ip}
    conditions:
      ready: {ready}
      serving: {serving}
      terminating: {terminating}
",
                ip = ip_scalar(e.ip),
                ready = e.ready,
                serving = e.serving,
                terminating = e.terminating,
            );
            if !e.zone_hints.is_empty() || !e.node_hints.is_empty() {
                out.push_str("    hints:\n");
                for (key, names) in [("forNodes", &e.node_hints), ("forZones", &e.zone_hints)] {
                    if !names.is_empty() {
                        let _ = writeln!(out, "      {key}:");
                        for n in names {
                            let _ = writeln!(out, "      - name: {}", scalar(n));
                        }
                    }
                }
            }
            if let Some(node) = &e.node_name {
                let _ = writeln!(out, "    nodeName: {}", scalar(node));
            }
            if let Some(pod) = &e.pod {
                let _ = write!(
                    out,
                    "    targetRef:\n      kind: Pod\n      name: {}\n      namespace: {namespace}\n      uid: {}\n",
                    scalar(pod),
                    uid(&self.namespace, pod, 3),
                );
            }
            if let Some(zone) = &e.zone {
                let _ = writeln!(out, "    zone: {}", scalar(zone));
            }
        }
        let _ = write!(
            out,
            "  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: \"{TIMESTAMP}\"
    creationTimestamp: \"{TIMESTAMP}\"
    generateName: {generate_name}
    generation: 1
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: {name}
    name: {slice}
    namespace: {namespace}
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: {name}
      uid: {svc_uid}
    resourceVersion: \"{rv}\"
    uid: {uid}
",
            generate_name = scalar(&format!("{}-", self.name)),
            name = scalar(&self.name),
            slice = scalar(&match index {
                0 => slice_name(&self.name),
                i => format!("{}-{i}", slice_name(&self.name)),
            }),
            svc_uid = uid(&self.namespace, &self.name, 1),
            rv = self.resource_version + 1,
            uid = uid(&self.namespace, &self.name, 2),
        );
        if self.ports.is_empty() {
            out.push_str("  ports: null\n");
        } else {
            out.push_str("  ports:\n");
        }
        for p in &self.ports {
            let mut first = "- ";
            if let Some(app_protocol) = &p.app_protocol {
                let _ = writeln!(out, "  - appProtocol: {}", scalar(app_protocol));
                first = "  ";
            }
            let _ = write!(
                out,
                "  {first}name: {}\n    port: {}\n    protocol: {}\n",
                scalar(&p.name),
                p.target_port,
                p.protocol
            );
        }
    }
}

impl PortManifest {
    /// An unnamed TCP port `port` → `target_port`.
    pub fn tcp(port: u16, target_port: u16) -> Self {
        PortManifest {
            name: String::new(),
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
            app_protocol: None,
        }
    }

    /// An unnamed UDP port `port` → `target_port`.
    pub fn udp(port: u16, target_port: u16) -> Self {
        PortManifest {
            protocol: Protocol::Udp,
            ..PortManifest::tcp(port, target_port)
        }
    }

    /// The same port with a `nodePort`.
    pub fn with_node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    /// The same port with an `appProtocol` (e.g. `http`, `grpc`).
    pub fn with_app_protocol(mut self, app_protocol: impl Into<String>) -> Self {
        self.app_protocol = Some(app_protocol.into());
        self
    }

    /// The same port with a name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl EndpointManifest {
    /// A ready (and serving, not terminating) endpoint, without node or Pod.
    pub fn ready(ip: impl Into<IpAddr>) -> Self {
        EndpointManifest {
            ip: ip.into(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            pod: None,
            zone: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    /// The same endpoint on node `node`.
    pub fn on_node(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_string());
        self
    }

    /// The same endpoint, serving and terminating, not ready (a Pod being
    /// deleted).
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }

    /// The same endpoint in `zone`, hinted for the zones `hints`.
    pub fn in_zone(mut self, zone: &str, hints: &[&str]) -> Self {
        self.zone = Some(zone.to_string());
        self.zone_hints = hints.iter().map(|h| h.to_string()).collect();
        self
    }
}

/// A Node object named `name`, with the zone label when given and the
/// cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint when
/// `to_be_deleted`: one YAML document, to append to a manifests stream
/// after `---`.
pub fn node_yaml(name: &str, zone: Option<&str>, to_be_deleted: bool) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  labels:\n    kubernetes.io/hostname: {name}\n",
        name = scalar(name)
    );
    if let Some(zone) = zone {
        let _ = writeln!(out, "    topology.kubernetes.io/zone: {}", scalar(zone));
    }
    let _ = writeln!(out, "  name: {}", scalar(name));
    if to_be_deleted {
        out.push_str(
            "spec:\n  taints:\n  - effect: NoSchedule\n    key: ToBeDeletedByClusterAutoscaler\n    value: \"1700000000\"\n",
        );
    }
    out
}

/// A Node object named `name` as the API server shows it, with
/// `status.addresses` (`(type, address)`: `InternalIP`, `ExternalIP`,
/// `Hostname`, in this order) and `spec.podCIDR` / `spec.podCIDRs` (the
/// first range in both, as the API server keeps them): one YAML document,
/// to append to a manifests stream after `---`.
pub fn node_with_addresses_yaml(
    name: &str,
    addresses: &[(&str, &str)],
    pod_cidrs: &[&str],
) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  labels:\n    kubernetes.io/hostname: {name}\n  name: {name}\n",
        name = scalar(name)
    );
    if let Some(first) = pod_cidrs.first() {
        let _ = writeln!(out, "spec:\n  podCIDR: {}", cidr_scalar(first));
        push_list(
            &mut out,
            "  ",
            "podCIDRs",
            pod_cidrs.iter().map(|c| cidr_scalar(c)),
        );
    }
    if !addresses.is_empty() {
        out.push_str("status:\n  addresses:\n");
        for (ty, address) in addresses {
            let _ = writeln!(
                out,
                "  - address: {}\n    type: {}",
                scalar(address),
                scalar(ty)
            );
        }
    }
    out
}

/// The name of the EndpointSlice of Service `service`: `<service>-x7k2p`.
pub fn slice_name(service: &str) -> String {
    format!("{service}-x7k2p")
}

/// A `kind: List` holding these Services, each followed by its EndpointSlice.
pub fn list_yaml(services: &[ServiceManifest]) -> String {
    let mut out = String::with_capacity(64 + services.len() * 2048);
    out.push_str(if services.is_empty() {
        "apiVersion: v1\nitems: []\n"
    } else {
        "apiVersion: v1\nitems:\n"
    });
    for s in services {
        s.push_items(&mut out);
    }
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell them.
fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// An IP address as a YAML scalar (IPv6 quoted: it may start with `:`).
fn ip_scalar(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"{v6}\""),
    }
}

/// A CIDR as a YAML scalar: plain, as kubectl prints it (`10.0.0.0/8`,
/// `fd00::/8`), unless it could be read as something else.
fn cidr_scalar(s: &str) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && !s.starts_with(':')
        && s.contains('/')
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'));
    if plain { Cow::Borrowed(s) } else { scalar(s) }
}

/// `key:` and one `- item` line per item at `indent`; nothing when there
/// are no items.
fn push_list<I, S>(out: &mut String, indent: &str, key: &str, items: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut items = items.into_iter().peekable();
    if items.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "{indent}{key}:");
    for item in items {
        let _ = writeln!(out, "{indent}- {}", item.as_ref());
    }
}

/// `key:` and its entries (sorted, as kubectl prints them) at `indent`;
/// nothing when `map` is empty.
fn push_map(out: &mut String, indent: &str, key: &str, map: &BTreeMap<String, String>) {
    if map.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}{key}:");
    for (k, v) in map {
        let _ = writeln!(out, "{indent}  {}: {}", scalar(k), scalar(v));
    }
}

/// `s` as a YAML string scalar: plain when it cannot be read as anything but
/// a string (starts with a letter, only letters, digits and `-._/`, not a
/// YAML keyword), double-quoted (JSON escapes, which YAML shares) otherwise.
fn scalar(s: &str) -> Cow<'_, str> {
    const KEYWORDS: &[&str] = &["true", "false", "yes", "no", "on", "off", "y", "n", "null"];
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'))
        && !KEYWORDS.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(serde_json::Value::from(s).to_string())
    }
}

/// A stable, uid-shaped id of object `namespace/name` of kind `kind`.
fn uid(namespace: &str, name: &str, kind: u32) -> String {
    let h = namespace
        .bytes()
        .chain([b'/'])
        .chain(name.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        kind,
        h & 0xfff,
        (h >> 12) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::Path;

    use super::*;
    use kube_uproxy::model::Protocol as ModelProtocol;
    use kube_uproxy::model::{
        Algorithm, ObjectKey, PortSpec, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort,
    };
    use kube_uproxy::source::convert::ANNOTATION_LB_ALGORITHM;
    use kube_uproxy::source::manifests::{Parsed, parse};

    fn parse_list(services: &[ServiceManifest]) -> Parsed {
        let yaml = list_yaml(services);
        parse(&yaml, Path::new("list.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn endpoint(ip: Ipv4Addr, ready: bool) -> EndpointManifest {
        EndpointManifest {
            ready,
            serving: ready,
            node_name: Some("node-1".into()),
            pod: Some(format!("web-{ip}")),
            ..EndpointManifest::ready(ip)
        }
    }

    #[test]
    fn policies_hints_split_slices_and_nodes_parse_into_the_model() {
        let eps: Vec<EndpointManifest> = (0..5u8)
            .map(|i| {
                EndpointManifest::ready(Ipv4Addr::new(10, 200, 1, 10 + i))
                    .on_node("node-1")
                    .in_zone("z1", &["z1"])
            })
            .collect();
        let web = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .with_type(ServiceType::LoadBalancer)
            .with_port(PortManifest::tcp(80, 8080).with_node_port(30080))
            .with_traffic_policies("Local", "Local")
            .with_health_check_node_port(32000)
            .with_traffic_distribution("PreferSameZone")
            .with_slice_size(2)
            .with_endpoints(eps);
        let yaml = list_yaml(&[web]) + "---\n" + &node_yaml("node-1", Some("z1"), true);
        let p = parse(&yaml, Path::new("list.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let svc = &p.services[0];
        assert!(svc.internal_local && svc.external_local);
        assert_eq!(svc.health_check_node_port, Some(32000));
        assert_eq!(p.slices.len(), 3, "5 endpoints in slices of 2");
        assert!(p.slices.iter().all(|s| &*s.service.name == "web"));
        let e = &p.slices[0].endpoints[0];
        assert_eq!(e.zone_hints, ["z1"]);
        assert_eq!(e.node_name.as_deref(), Some("node-1"));
        assert_eq!(p.nodes.len(), 1);
        assert_eq!(p.nodes[0].zone.as_deref(), Some("z1"));
        assert!(!p.nodes[0].eligible);
    }

    #[test]
    fn services_and_slices_parse_into_the_model() {
        let web = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080))
            .with_annotation(ANNOTATION_LB_ALGORITHM, "least-connections")
            .with_endpoints(vec![
                endpoint(Ipv4Addr::new(10, 200, 1, 10), true),
                endpoint(Ipv4Addr::new(10, 200, 1, 11), false),
                EndpointManifest {
                    terminating: true,
                    ready: false,
                    ..EndpointManifest::ready(Ipv4Addr::new(10, 200, 1, 12))
                },
            ]);
        let mut api = ServiceManifest::new("api", Ipv4Addr::new(10, 96, 0, 11))
            .with_port(PortManifest::tcp(80, 8080).named("http"))
            .with_port(PortManifest {
                protocol: Protocol::Udp,
                ..PortManifest::tcp(53, 5353).named("dns")
            })
            .with_endpoints(vec![EndpointManifest::ready(Ipv4Addr::new(10, 200, 1, 13))]);
        api.namespace = "shop".into();
        api.resource_version = 77;
        let p = parse_list(&[web, api]);

        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let tcp = |name: &str, port| PortSpec {
            name: name.into(),
            protocol: ModelProtocol::Tcp,
            port,
            node_port: None,
            app_protocol: None,
        };
        let services: Vec<ServiceInfo> = p.services.iter().map(|s| (**s).clone()).collect();
        assert_eq!(
            services,
            vec![
                ServiceInfo {
                    key: ObjectKey::new("default", "web"),
                    cluster_ips: vec![ip("10.96.0.10")],
                    ports: vec![tcp("", 80)],
                    algorithm: Some(Algorithm::LeastConnections),
                    ..ServiceInfo::default()
                },
                ServiceInfo {
                    key: ObjectKey::new("shop", "api"),
                    cluster_ips: vec![ip("10.96.0.11")],
                    ports: vec![
                        tcp("http", 80),
                        PortSpec {
                            name: "dns".into(),
                            protocol: ModelProtocol::Udp,
                            port: 53,
                            node_port: None,
                            app_protocol: None,
                        },
                    ],
                    algorithm: None,
                    ..ServiceInfo::default()
                },
            ]
        );
        let ep = |addr: &str, ready, serving, terminating, node: Option<&str>| SliceEndpoint {
            address: ip(addr),
            ready,
            serving,
            terminating,
            node_name: node.map(str::to_string),
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        };
        let slices: Vec<SliceInfo> = p.slices.iter().map(|s| (**s).clone()).collect();
        assert_eq!(
            slices,
            vec![
                SliceInfo {
                    key: ObjectKey::new("default", "web-x7k2p"),
                    service: ObjectKey::new("default", "web"),
                    ports: vec![SlicePort {
                        name: String::new(),
                        protocol: ModelProtocol::Tcp,
                        port: 8080,
                    }],
                    endpoints: vec![
                        ep("10.200.1.10", true, true, false, Some("node-1")),
                        ep("10.200.1.11", false, false, false, Some("node-1")),
                        ep("10.200.1.12", false, true, true, None),
                    ],
                },
                SliceInfo {
                    key: ObjectKey::new("shop", "api-x7k2p"),
                    service: ObjectKey::new("shop", "api"),
                    ports: vec![
                        SlicePort {
                            name: "http".into(),
                            protocol: ModelProtocol::Tcp,
                            port: 8080,
                        },
                        SlicePort {
                            name: "dns".into(),
                            protocol: ModelProtocol::Udp,
                            port: 5353,
                        },
                    ],
                    endpoints: vec![ep("10.200.1.13", true, true, false, None)],
                },
            ]
        );
    }

    #[test]
    fn no_slice_and_empty_slice() {
        let empty = ServiceManifest::new("empty", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080));
        let mut sliceless = ServiceManifest::new("sliceless", Ipv4Addr::new(10, 96, 0, 11))
            .with_port(PortManifest::tcp(80, 8080));
        sliceless.endpoints = None;
        let yaml = list_yaml(&[empty.clone(), sliceless.clone()]);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 1, "{yaml}");
        assert!(yaml.contains("  endpoints: null\n"), "{yaml}");
        let p = parse_list(&[empty, sliceless]);
        assert_eq!(p.services.len(), 2);
        assert_eq!(p.slices.len(), 1);
        assert_eq!(p.slices[0].service, ObjectKey::new("default", "empty"));
        assert!(p.slices[0].endpoints.is_empty());
    }

    #[test]
    fn ipv6_services_parse() {
        let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
        let s = ServiceManifest::new("six", v6("fd00:96::10"))
            .with_port(PortManifest::tcp(80, 8080))
            .with_endpoints(vec![EndpointManifest::ready(v6("::1"))]);
        let p = parse_list(&[s]);
        assert_eq!(p.services[0].cluster_ips, vec![v6("fd00:96::10")]);
        assert_eq!(p.slices[0].endpoints[0].address, v6("::1"));
    }

    #[test]
    fn client_ip_affinity_prints_and_parses() {
        let s = ServiceManifest::new("sticky", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080))
            .with_client_ip_affinity(2);
        let yaml = list_yaml(std::slice::from_ref(&s));
        assert!(
            yaml.contains(
                "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: 2\n    type: ClusterIP\n"
            ),
            "{yaml}"
        );
        let p = parse_list(&[s]);
        assert_eq!(
            p.services[0].session_affinity,
            kube_uproxy::model::SessionAffinity::ClientIp {
                timeout: std::time::Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn labels_and_annotations_reach_the_parser_as_strings() {
        let odd = [
            "true", "NO", "123", "1e5", "0x1f", "", "a: b", "#x", "~", "- x", "\"q\"", "tab\t",
        ];
        let mut s = ServiceManifest::new("odd", Ipv4Addr::new(10, 96, 0, 12))
            .with_port(PortManifest::tcp(80, 8080));
        for (i, v) in odd.iter().enumerate() {
            s = s.with_annotation(format!("example.com/a{i}"), *v);
        }
        let yaml = list_yaml(std::slice::from_ref(&s));
        let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        let annotations = &doc["items"][0]["metadata"]["annotations"];
        for (i, v) in odd.iter().enumerate() {
            assert_eq!(
                annotations[format!("example.com/a{i}")],
                serde_json::json!(v),
                "{yaml}"
            );
        }
        assert_eq!(parse_list(std::slice::from_ref(&s)).services.len(), 1);

        // A label handing the Service to another proxy: the parser sees it.
        let foreign = s.with_label("service.kubernetes.io/service-proxy-name", "other");
        assert!(parse_list(&[foreign]).services.is_empty());
    }

    #[test]
    fn the_output_is_a_kubectl_list() {
        let s = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080));
        let yaml = list_yaml(std::slice::from_ref(&s));
        assert!(yaml.starts_with("apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n"));
        assert!(yaml.ends_with("kind: List\nmetadata:\n  resourceVersion: \"\"\n"));
        assert!(yaml.contains("    resourceVersion: \"1\"\n"), "{yaml}");
        assert!(yaml.contains("    resourceVersion: \"2\"\n"), "{yaml}");
        assert_eq!(yaml, list_yaml(&[s]), "the same input, the same text");
        assert_eq!(
            list_yaml(&[]),
            "apiVersion: v1\nitems: []\nkind: List\nmetadata:\n  resourceVersion: \"\"\n"
        );
        assert_eq!(parse_list(&[]), Parsed::default());
    }

    /// `appProtocol` is printed where kubectl prints it, in the Service's
    /// port and the slice's, under the API's field name; the parser takes it.
    #[test]
    fn app_protocol_prints_as_kubectl() {
        let s = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080).with_app_protocol("grpc"))
            .with_port(
                PortManifest::tcp(81, 8081)
                    .named("web")
                    .with_app_protocol("kubernetes.io/h2c"),
            )
            .with_endpoints(vec![EndpointManifest::ready(Ipv4Addr::new(10, 200, 1, 10))]);
        let yaml = list_yaml(std::slice::from_ref(&s));
        assert!(
            yaml.contains(
                "    ports:\n    - appProtocol: grpc\n      port: 80\n      protocol: TCP\n      targetPort: 8080\n    - appProtocol: kubernetes.io/h2c\n      name: web\n      port: 81\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.contains("  ports:\n  - appProtocol: grpc\n    name: \"\"\n    port: 8080\n"),
            "{yaml}"
        );
        let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        let svc: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(doc["items"][0].clone()).unwrap();
        let ports = svc.spec.expect("spec").ports.expect("ports");
        assert_eq!(ports[0].app_protocol.as_deref(), Some("grpc"));
        assert_eq!(ports[1].app_protocol.as_deref(), Some("kubernetes.io/h2c"));
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(doc["items"][1].clone()).unwrap();
        let slice_ports = slice.ports.expect("slice ports");
        assert_eq!(
            slice_ports[1].app_protocol.as_deref(),
            Some("kubernetes.io/h2c")
        );
        assert_eq!(parse_list(&[s]).services.len(), 1);
    }

    /// A LoadBalancer Service with every field issue 9 reads: the text is
    /// what kubectl prints, the typed API object has the values, and the
    /// proxy's parser takes it.
    #[test]
    fn node_ports_external_ips_and_load_balancers_print_as_kubectl() {
        let s = ServiceManifest::new("dns", Ipv4Addr::new(10, 96, 0, 53))
            .with_type(ServiceType::LoadBalancer)
            .with_port(
                PortManifest::udp(53, 5353)
                    .named("dns")
                    .with_node_port(30053),
            )
            .with_port(
                PortManifest::tcp(53, 5353)
                    .named("dns-tcp")
                    .with_node_port(30054),
            )
            .with_external_ips([Ipv4Addr::new(10, 200, 9, 9)])
            .with_source_ranges(["10.200.0.0/24", "fd00::/8"])
            .with_lb_ingress(Ipv4Addr::new(10, 200, 8, 8), Some(IpMode::Vip))
            .with_lb_ingress(Ipv4Addr::new(10, 200, 7, 7), Some(IpMode::Proxy))
            .with_lb_ingress(Ipv4Addr::new(10, 200, 6, 6), None);
        let yaml = list_yaml(std::slice::from_ref(&s));
        let spec_and_status = "  spec:
    allocateLoadBalancerNodePorts: true
    clusterIP: 10.96.0.53
    clusterIPs:
    - 10.96.0.53
    externalIPs:
    - 10.200.9.9
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    loadBalancerSourceRanges:
    - 10.200.0.0/24
    - fd00::/8
    ports:
    - name: dns
      nodePort: 30053
      port: 53
      protocol: UDP
      targetPort: 5353
    - name: dns-tcp
      nodePort: 30054
      port: 53
      protocol: TCP
      targetPort: 5353
    selector:
      app: dns
    sessionAffinity: None
    type: LoadBalancer
  status:
    loadBalancer:
      ingress:
      - ip: 10.200.8.8
        ipMode: VIP
      - ip: 10.200.7.7
        ipMode: Proxy
      - ip: 10.200.6.6
- addressType: IPv4
";
        assert!(yaml.contains(spec_and_status), "{yaml}");

        // The field names are the API's: the typed object has every value.
        let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        let svc: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(doc["items"][0].clone()).unwrap();
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_ips, Some(vec!["10.200.9.9".to_string()]));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["10.200.0.0/24".to_string(), "fd00::/8".to_string()])
        );
        let ports = spec.ports.expect("ports");
        let summary: Vec<_> = ports
            .iter()
            .map(|p| (p.protocol.as_deref(), p.port, p.node_port))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("UDP"), 53, Some(30053)),
                (Some("TCP"), 53, Some(30054))
            ]
        );
        let ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .expect("ingress");
        let ingress: Vec<_> = ingress
            .iter()
            .map(|i| (i.ip.as_deref(), i.ip_mode.as_deref()))
            .collect();
        assert_eq!(
            ingress,
            vec![
                (Some("10.200.8.8"), Some("VIP")),
                (Some("10.200.7.7"), Some("Proxy")),
                (Some("10.200.6.6"), None)
            ]
        );

        // The proxy reads it: both protocols on port 53 with their node
        // ports, the external IP, the ingress IPs but the Proxy-mode one,
        // the source ranges.
        let p = parse_list(&[s]);
        assert_eq!(p.services.len(), 1, "{yaml}");
        let svc = &p.services[0];
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|port| (port.protocol, port.port, port.node_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                (ModelProtocol::Udp, 53, Some(30053)),
                (ModelProtocol::Tcp, 53, Some(30054))
            ]
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(svc.external_ips, vec![ip("10.200.9.9")]);
        assert_eq!(svc.lb_ips, vec![ip("10.200.8.8"), ip("10.200.6.6")]);
        let ranges: Vec<String> = svc.lb_source_ranges.iter().map(|r| r.to_string()).collect();
        assert_eq!(ranges, vec!["10.200.0.0/24", "fd00::/8"]);
    }

    /// The new fields have defaults that print nothing new: a Service built
    /// as before is the same ClusterIP Service; a NodePort Service with an
    /// unnamed port starts its list item with `nodePort`, and without a load
    /// balancer has `loadBalancer: {}` and no `allocateLoadBalancerNodePorts`.
    #[test]
    fn new_fields_default_to_a_plain_cluster_ip_service() {
        let plain = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .with_port(PortManifest::tcp(80, 8080));
        assert_eq!(plain.service_type, ServiceType::ClusterIP);
        assert_eq!(PortManifest::tcp(80, 8080).node_port, None);
        assert_eq!(PortManifest::udp(53, 53).protocol, Protocol::Udp);
        let yaml = list_yaml(std::slice::from_ref(&plain));
        for absent in [
            "nodePort",
            "externalIPs",
            "externalTrafficPolicy",
            "loadBalancerSourceRanges",
            "allocateLoadBalancerNodePorts",
            "ingress",
        ] {
            assert!(!yaml.contains(absent), "{absent} in {yaml}");
        }
        assert!(yaml.contains("    type: ClusterIP\n  status:\n    loadBalancer: {}\n"));

        let np = ServiceManifest::new("np", Ipv4Addr::new(10, 96, 0, 11))
            .with_type(ServiceType::NodePort)
            .with_port(PortManifest::udp(80, 8080).with_node_port(30081));
        let yaml = list_yaml(std::slice::from_ref(&np));
        assert!(
            yaml.contains(
                "    - nodePort: 30081\n      port: 80\n      protocol: UDP\n      targetPort: 8080\n"
            ),
            "{yaml}"
        );
        assert!(yaml.contains("    externalTrafficPolicy: Cluster\n"));
        assert!(!yaml.contains("allocateLoadBalancerNodePorts"));
        assert!(yaml.contains("    type: NodePort\n  status:\n    loadBalancer: {}\n"));
        let p = parse_list(&[np]);
        let node_ports: Vec<_> = p.services[0].ports.iter().map(|p| p.node_port).collect();
        assert_eq!(node_ports, vec![Some(30081)]);
    }
}
