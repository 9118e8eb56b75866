//! Health, as kube-proxy's `healthcheck/` serves it: the proxy's own verdict
//! ([`proxy`]: `/healthz`, `/livez`) and the health check node ports of
//! `externalTrafficPolicy: Local` Services ([`service`]).

pub mod proxy;
pub mod service;

pub use proxy::{ProxyHealth, Verdict, health_json};
pub use service::ServiceHealthServers;
