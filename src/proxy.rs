//! The data path: listeners, endpoint selection and byte relaying.
//!
//! Each Service port owns one listener on a proxy port (see [`ports`]); its
//! accept loop ([`tcp`], backing off on repeated errors: `accept.rs`) admits
//! each connection under `--max-connections` ([`limit`]) and gives it a task
//! that picks an endpoint ([`balancer`]), connects to it (`connect.rs`:
//! failover on endpoint errors, none on local ones) and relays both
//! directions ([`relay`]; bulk phases in `relay/splice.rs` through
//! `relay/pipe.rs`). Each listener counts into its Service port's series
//! ([`metrics`]), which the process's registry renders. Dead peers are
//! found by the socket options of [`tcp_options`]. Repeating warnings go
//! through `log_limit.rs`; the few raw system calls live in `sys.rs`. A
//! listener's task is told to end through [`Stop`] (`stop.rs`); a retired
//! UDP listener's conntrack entries are flushed by [`conntrack`]. The
//! control plane only talks to this module through
//! [`listeners::Listeners`] (open, close) and
//! [`balancer::Balancer::update`]; shutdown drains through
//! [`connections::Connections`].

mod accept;
pub mod balancer;
mod connect;
pub use connect::{TIMER_FLOOR, timer_floor};
pub mod connections;
pub mod conntrack;
pub mod http;
pub mod limit;
pub mod listeners;
mod log_limit;
pub mod metrics;
mod origin;
pub mod ports;
pub mod relay;
mod stop;
mod sys;
pub mod tcp;
pub mod tcp_options;
#[cfg(test)]
mod test_support;
pub mod threads;
pub mod udp;

use std::sync::Arc;
use std::time::Duration;

use relay::RelayConfig;
pub use stop::{RETIRE_LINGER, Stop};
use tcp_options::TcpOptions;
use udp::UdpConfig;

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
    /// `SO_MARK` of the connections to endpoints (`--upstream-mark`): the
    /// NAT output chain passes them untranslated, so the proxy never
    /// connects to itself. 0: unmarked (tests without `CAP_NET_ADMIN`).
    pub upstream_mark: u32,
    /// The mark (`SO_MARK`, besides `upstream_mark`) of the connections to
    /// this node's endpoints opened from the client's own address
    /// (`--preserve-client-ip-mark`): the endpoint's replies are routed
    /// back to the proxy by it. 0: client addresses are never preserved.
    pub preserve_client_ip_mark: u32,
    /// Request mode (ports balanced per HTTP request).
    pub http: HttpConfig,
    /// Where request mode's client connections are served
    /// (`--http-threads`): each accepted HTTP connection is handed to one
    /// of these threads for good. `None`: where it was accepted.
    pub http_threads: Option<Arc<threads::DataPathThreads>>,
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
            upstream_mark: 0,
            preserve_client_ip_mark: 0,
            http: HttpConfig::default(),
            http_threads: None,
        }
    }
}

/// Request mode's settings (shared by every port).
#[derive(Clone, Copy, Debug)]
pub struct HttpConfig {
    /// How long a new connection may stay silent before it is taken for a
    /// server-speaks-first protocol and relayed as bytes
    /// (`--http-detect-timeout`).
    pub detect_timeout: Duration,
    /// Idle HTTP/1.1 connections to endpoints are closed after this
    /// (`--http-upstream-idle-timeout`).
    pub upstream_idle_timeout: Duration,
    /// A client must send a request's headers within this; also how long
    /// an idle kept-alive HTTP/1.1 client connection is kept.
    pub header_read_timeout: Duration,
    /// Most bytes of a request's headers (HTTP/1.1 buffer, h2 header list).
    pub max_header_bytes: usize,
    /// Most concurrent streams on one h2 client connection.
    pub max_concurrent_streams: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            detect_timeout: Duration::from_secs(1),
            upstream_idle_timeout: Duration::from_secs(4),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
        }
    }
}
