//! The benchmark's Services, written by the library's kubectl-style
//! manifest writer (`uproxy_lab::manifests`), which the end-to-end
//! tests use too.

use std::net::Ipv4Addr;

use uproxy_lab::manifests::{EndpointManifest, PortManifest, Protocol, ServiceManifest, list_yaml};

/// One Service port: name, protocol, Service port, target (backend) port.
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub name: &'static str,
    pub protocol: Protocol,
    pub port: u16,
    pub target: u16,
}

impl Port {
    pub const fn tcp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: Protocol::Tcp,
            port,
            target,
        }
    }

    pub const fn udp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: Protocol::Udp,
            port,
            target,
        }
    }

    /// The port as the manifest writer takes it.
    pub fn manifest(&self) -> PortManifest {
        match self.protocol {
            Protocol::Udp => PortManifest::udp(self.port, self.target),
            _ => PortManifest::tcp(self.port, self.target),
        }
        .named(self.name)
    }
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

impl Svc<'_> {
    fn manifest(&self) -> ServiceManifest {
        let mut m = self
            .ports
            .iter()
            .fold(ServiceManifest::new(self.name.clone(), self.ip), |m, p| {
                m.with_port(p.manifest())
            });
        m = m.with_endpoints(
            self.endpoints
                .iter()
                .map(|ip| EndpointManifest::ready(*ip))
                .collect(),
        );
        m.resource_version = 1000 + self.generation;
        m
    }
}

/// A `kind: List` with every Service followed by its EndpointSlice.
pub fn list(services: &[Svc<'_>]) -> String {
    list_yaml(&services.iter().map(Svc::manifest).collect::<Vec<_>>())
}

/// The annotation that forces preserve-client-ip on or off (issue 23).
const PRESERVE_CLIENT_IP: &str = "kube-uproxy.io/preserve-client-ip";

/// [`list`] of one Service with preserve-client-ip forced on and every
/// endpoint on `node`: the proxy, run as that node (`--hostname-override`),
/// opens its connections to them from the client's own address. The
/// annotation, not `internalTrafficPolicy: Local`: the traffic policies
/// stay the other paths', so that where the upstream connections come
/// from is the only difference.
pub fn list_preserving_client_ip(svc: &Svc<'_>, node: &str) -> String {
    let mut m = svc.manifest().with_annotation(PRESERVE_CLIENT_IP, "true");
    for ep in m.endpoints.iter_mut().flatten() {
        ep.node_name = Some(node.to_string());
    }
    list_yaml(&[m])
}

/// Ready endpoints at these addresses.
pub fn ready(endpoints: &[Ipv4Addr]) -> Vec<EndpointManifest> {
    endpoints
        .iter()
        .map(|ip| EndpointManifest::ready(*ip))
        .collect()
}
