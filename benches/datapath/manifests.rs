//! Services and EndpointSlices as `kubectl get svc,endpointslices -o yaml`
//! prints them (trimmed of status noise), for `kube-uproxy --manifests`.

use std::fmt::Write;
use std::net::Ipv4Addr;

/// One Service port: name, Service port, target (backend) port.
pub struct Port {
    pub name: &'static str,
    pub port: u16,
    pub target: u16,
}

/// A Service with one EndpointSlice.
pub struct Svc<'a> {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ports: &'a [Port],
    pub endpoints: &'a [Ipv4Addr],
    /// Bumped by the caller on every rewrite.
    pub generation: u64,
}

fn uid(name: &str, kind: u32) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
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

/// Appends the Service and its EndpointSlice as two list items.
pub fn push(out: &mut String, s: &Svc<'_>) {
    let rv = 1000 + s.generation;
    let _ = write!(
        out,
        "- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: \"2025-01-01T00:00:00Z\"
    labels:
      app: {name}
    name: {name}
    namespace: default
    resourceVersion: \"{rv}\"
    uid: {uid}
  spec:
    clusterIP: {ip}
    clusterIPs:
    - {ip}
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
",
        name = s.name,
        ip = s.ip,
        uid = uid(&s.name, 1),
    );
    for p in s.ports {
        let _ = write!(
            out,
            "    - name: {}\n      port: {}\n      protocol: TCP\n      targetPort: {}\n",
            p.name, p.port, p.target
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
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
",
        name = s.name
    );
    for (i, ip) in s.endpoints.iter().enumerate() {
        let _ = write!(
            out,
            "  - addresses:
    - {ip}
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-1
    targetRef:
      kind: Pod
      name: {name}-{i}
      namespace: default
      uid: {puid}
",
            name = s.name,
            puid = uid(&format!("{}-{i}", s.name), 3),
        );
    }
    let _ = write!(
        out,
        "  kind: EndpointSlice
  metadata:
    generateName: {name}-
    generation: {gen}
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: {name}
    name: {name}-x7k2p
    namespace: default
    resourceVersion: \"{rv}\"
    uid: {uid}
  ports:
",
        name = s.name,
        gen = s.generation + 1,
        uid = uid(&s.name, 2),
    );
    for p in s.ports {
        let _ = write!(
            out,
            "  - name: {}\n    port: {}\n    protocol: TCP\n",
            p.name, p.target
        );
    }
}

/// A `kind: List` holding these Services and their slices.
pub fn list(services: &[Svc<'_>]) -> String {
    let mut out = String::with_capacity(services.len() * 1600 + 64);
    out.push_str("apiVersion: v1\nitems:\n");
    for s in services {
        push(&mut out, s);
    }
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}
