//! The benchmark's Services, written by the library's kubectl-style
//! manifest writer (`uproxy_lab::manifests`), which the end-to-end
//! tests use too.

use std::net::Ipv4Addr;

use uproxy_lab::manifests::{EndpointManifest, PortManifest, ServiceManifest, list_yaml};

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

impl Svc<'_> {
    fn manifest(&self) -> ServiceManifest {
        let mut m = self
            .ports
            .iter()
            .fold(ServiceManifest::new(self.name.clone(), self.ip), |m, p| {
                m.with_port(PortManifest::tcp(p.port, p.target).named(p.name))
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
