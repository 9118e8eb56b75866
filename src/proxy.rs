//! The data path: listeners, endpoint selection and byte relaying.
//!
//! Each Service port owns one listener on a proxy port (see [`ports`]); its
//! accept loop ([`tcp`], backing off on repeated errors: `accept.rs`) admits
//! each connection under `--max-connections` ([`limit`]) and gives it a task
//! that picks an endpoint ([`balancer`]), connects to it (`connect.rs`:
//! failover on endpoint errors, none on local ones) and relays both
//! directions ([`relay`]; bulk phases in `splice.rs` through `pipe.rs`).
//! Dead peers are found by the socket options of [`tcp_options`]. Repeating
//! warnings go through `log_limit.rs`; the few raw system calls live in
//! `sys.rs`. The control plane only talks to this module through
//! [`listeners::Listeners`] (open, close) and
//! [`balancer::Balancer::update`]; shutdown drains through
//! [`connections::Connections`].

mod accept;
pub mod balancer;
mod connect;
pub mod connections;
pub mod limit;
pub mod listeners;
mod log_limit;
mod pipe;
pub mod ports;
pub mod relay;
mod splice;
mod sys;
pub mod tcp;
pub mod tcp_options;
#[cfg(test)]
mod test_support;
pub mod udp;

use std::time::Duration;

use relay::RelayConfig;
use tcp_options::TcpOptions;
use tokio_util::sync::CancellationToken;
use udp::UdpConfig;

/// How long a retired listener keeps serving after its rules are gone: a
/// SYN or datagram translated to its port just before the rule change still
/// arrives there, and would be refused if the socket closed at once.
pub const RETIRE_LINGER: Duration = Duration::from_millis(500);

/// How a listener's task is told to end.
#[derive(Debug, Clone)]
pub struct Stop {
    /// The Service port went away: serve for a short linger more (a SYN or
    /// datagram translated just before the rule change still arrives),
    /// then close. A child of `now`: shutdown fires it too, so a serving
    /// loop waits on this one token alone.
    pub retire: CancellationToken,
    /// Shutdown: close now (queued connections move to the next instance's
    /// listener in the `SO_REUSEPORT` group, with `tcp_migrate_req`).
    /// Shared by every listener of a [`listeners::SocketListeners`]: one
    /// token for the process, not one per Service port.
    pub now: CancellationToken,
}

impl Stop {
    /// A listener's stop under the process's `shutdown` token.
    pub fn under(shutdown: &CancellationToken) -> Self {
        Stop {
            retire: shutdown.child_token(),
            now: shutdown.clone(),
        }
    }
}

impl Default for Stop {
    /// A stop of its own (tests, and listeners outside a registry).
    fn default() -> Self {
        Stop::under(&CancellationToken::new())
    }
}

/// A listener task's optional timer (a sweep, a linger), boxed: a task
/// that has nothing to time carries a pointer, not a `Sleep`, in its
/// future (there is one task per Service port).
pub(crate) type Timer = std::pin::Pin<Box<tokio::time::Sleep>>;

pub(crate) fn timer(after: Duration) -> Timer {
    Box::pin(tokio::time::sleep(after))
}

/// Waits for `t` to fire; forever if there is none.
pub(crate) async fn fire(t: &mut Option<Timer>) {
    match t {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Settings shared by every connection.
#[derive(Debug, Clone)]
pub struct DataPathConfig {
    /// How bytes are moved between the two connections, and when an idle
    /// flow is dropped.
    pub relay: RelayConfig,
    /// Keepalive and user timeout: how dead peers are found.
    pub tcp: TcpOptions,
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
            relay: RelayConfig::default(),
            tcp: TcpOptions::default(),
            connect_timeouts: [250, 500, 1000, 2000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            udp: UdpConfig::default(),
        }
    }
}
