//! Services and their EndpointSlices as YAML, the way `kubectl get
//! svc,endpointslices -o yaml` prints them: input for `kube-uproxy
//! --manifests` in the end-to-end tests and the benchmarks.
//!
//! A [`ServiceManifest`] describes one ClusterIP Service and, optionally, the
//! one EndpointSlice the EndpointSlice controller would make for it;
//! [`list_yaml`] prints several of them as one `kind: List`, each Service
//! followed by its slice. Everything kubectl would print and the proxy does
//! not read (uids, timestamps, owner references, `status`) is filled in with
//! fixed or derived values, so the same input always gives the same text.
//!
//! ```
//! use kube_uproxy::lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, list_yaml};
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
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::Protocol;

/// `creationTimestamp` (and the slice's last-change-trigger-time) of every object.
const TIMESTAMP: &str = "2025-01-01T00:00:00Z";

/// One ClusterIP Service, and the EndpointSlice that goes with it.
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
        }
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
        if let Some(endpoints) = &self.endpoints {
            self.push_slice(out, endpoints);
        }
    }

    fn push_service(&self, out: &mut String) {
        let name = scalar(&self.name);
        let ip = ip_scalar(self.cluster_ip);
        out.push_str("- apiVersion: v1\n  kind: Service\n  metadata:\n");
        push_map(out, "    ", "annotations", &self.annotations);
        let _ = writeln!(out, "    creationTimestamp: \"{TIMESTAMP}\"");
        push_map(out, "    ", "labels", &self.labels);
        let _ = write!(
            out,
            "    name: {name}
    namespace: {namespace}
    resourceVersion: \"{rv}\"
    uid: {uid}
  spec:
    clusterIP: {ip}
    clusterIPs:
    - {ip}
    internalTrafficPolicy: Cluster
    ipFamilies:
    - {family}
    ipFamilyPolicy: SingleStack
",
            namespace = scalar(&self.namespace),
            rv = self.resource_version,
            uid = uid(&self.namespace, &self.name, 1),
            family = family(self.cluster_ip),
        );
        if !self.ports.is_empty() {
            out.push_str("    ports:\n");
        }
        for p in &self.ports {
            let mut first = "- ";
            if !p.name.is_empty() {
                let _ = writeln!(out, "    - name: {}", scalar(&p.name));
                first = "  ";
            }
            let _ = write!(
                out,
                "    {first}port: {}\n      protocol: {}\n      targetPort: {}\n",
                p.port, p.protocol, p.target_port
            );
        }
        let _ = write!(
            out,
            "    selector:
      app: {name}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {{}}
"
        );
    }

    fn push_slice(&self, out: &mut String, endpoints: &[EndpointManifest]) {
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
            slice = scalar(&slice_name(&self.name)),
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
            let _ = write!(
                out,
                "  - name: {}\n    port: {}\n    protocol: {}\n",
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
        }
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
        }
    }
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
    use crate::model::{
        Algorithm, ObjectKey, PortSpec, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort,
    };
    use crate::source::convert::ANNOTATION_LB_ALGORITHM;
    use crate::source::manifests::{Parsed, parse};

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
            protocol: Protocol::Tcp,
            port,
            node_port: None,
        };
        assert_eq!(
            p.services,
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
                            protocol: Protocol::Udp,
                            port: 53,
                            node_port: None,
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
        };
        assert_eq!(
            p.slices,
            vec![
                SliceInfo {
                    key: ObjectKey::new("default", "web-x7k2p"),
                    service: ObjectKey::new("default", "web"),
                    ports: vec![SlicePort {
                        name: String::new(),
                        protocol: Protocol::Tcp,
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
                            protocol: Protocol::Tcp,
                            port: 8080,
                        },
                        SlicePort {
                            name: "dns".into(),
                            protocol: Protocol::Udp,
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
}
