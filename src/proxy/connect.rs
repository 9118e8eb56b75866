//! Connecting a client's flow to an endpoint: pick one, connect with a
//! timeout, fail over to another endpoint on refusal or timeout.
//!
//! The connect call itself is a parameter, so that the failover rules are
//! tested without sockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::warn;

use super::balancer::{Balancer, Lease};
use crate::model::ServicePortName;

/// Why a flow got no upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The Service port has no endpoints (the rules reject such traffic;
    /// this is the window while that change is applied).
    #[error("no endpoints")]
    NoEndpoints,
    /// Every attempt failed.
    #[error("no endpoint accepted the connection ({attempts} attempts)")]
    AllFailed { attempts: usize },
}

/// Picks an endpoint from `balancer` and connects to it with `connect`,
/// one attempt per entry of `timeouts`, each on another endpoint while
/// there is one. The lease counts the connection for least-connections
/// until it is dropped.
pub async fn connect_with_failover<S, C, F>(
    balancer: &Balancer,
    timeouts: &[Duration],
    service: &ServicePortName,
    client: SocketAddr,
    mut connect: C,
) -> Result<(Lease, S), ConnectError>
where
    C: FnMut(SocketAddr) -> F,
    F: Future<Output = io::Result<S>>,
{
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(timeouts.len());
    for (attempt, timeout) in timeouts.iter().enumerate() {
        let Some(lease) = balancer.pick(&tried) else {
            return Err(ConnectError::NoEndpoints);
        };
        let endpoint = lease.addr();
        match tokio::time::timeout(*timeout, connect(endpoint)).await {
            Ok(Ok(upstream)) => return Ok((lease, upstream)),
            Ok(Err(e)) => warn!(
                %service,
                %client,
                %endpoint,
                attempt = attempt + 1,
                error = %e,
                "connect to endpoint failed"
            ),
            Err(_) => warn!(
                %service,
                %client,
                %endpoint,
                attempt = attempt + 1,
                timeout_ms = timeout.as_millis() as u64,
                "connect to endpoint timed out"
            ),
        }
        tried.push(endpoint);
    }
    Err(ConnectError::AllFailed {
        attempts: tried.len(),
    })
}
