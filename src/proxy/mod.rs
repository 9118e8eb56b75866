//! The data path: listeners, endpoint selection and byte relaying.
//!
//! Each Service port owns one listener on a proxy port (see [`ports`]); every
//! accepted connection gets its own task that picks an endpoint
//! ([`balancer`]), connects to it (retrying other endpoints on failure) and
//! relays both directions ([`relay`]). The control plane only talks to this
//! module through [`listeners::Listeners`] (open, close) and
//! [`balancer::Balancer::update`]; shutdown drains through
//! [`listeners::Connections`].

mod accept;
pub mod balancer;
mod connect;
pub mod listeners;
mod log_limit;
mod pipe;
pub mod ports;
pub mod relay;
mod splice;
mod sys;
pub mod tcp;
#[cfg(test)]
mod test_support;
pub mod udp;

use std::time::Duration;

use relay::RelayMode;
use tokio_util::sync::CancellationToken;
use udp::UdpConfig;

/// How long a retired listener keeps serving after its rules are gone: a
/// SYN or datagram translated to its port just before the rule change still
/// arrives there, and would be refused if the socket closed at once.
pub const RETIRE_LINGER: Duration = Duration::from_millis(500);

/// How a listener's task is told to end.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The Service port went away: serve for a short linger more (a SYN or
    /// datagram translated just before the rule change still arrives),
    /// then close.
    pub retire: CancellationToken,
    /// Shutdown: close now (queued connections move to the next instance's
    /// listener in the `SO_REUSEPORT` group, with `tcp_migrate_req`).
    pub now: CancellationToken,
}

/// Settings shared by every connection.
#[derive(Debug, Clone)]
pub struct DataPathConfig {
    /// How bytes are moved between the two connections.
    pub relay: RelayMode,
    /// One connect attempt per entry, each to another endpoint while there
    /// is one, with this timeout. The legacy proxier's schedule is the
    /// default: 250 ms, 500 ms, 1 s, 2 s.
    pub connect_timeouts: Vec<Duration>,
    /// The UDP flow table's settings.
    pub udp: UdpConfig,
}

impl Default for DataPathConfig {
    fn default() -> Self {
        DataPathConfig {
            relay: RelayMode::Splice,
            connect_timeouts: [250, 500, 1000, 2000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            udp: UdpConfig::default(),
        }
    }
}
