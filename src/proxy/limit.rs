//! Limits of the process: how many proxied connections may be open
//! (`--max-connections`), and the open-file limit they need.
//!
//! Every proxied connection holds two sockets, and two more fds per
//! direction while it is in a bulk phase; past the open-file limit, accept
//! and connect fail with EMFILE for every Service at once. The cap refuses
//! new connections with a reset before that point (one log line per
//! interval while it holds), and the open-file limit is raised to the hard
//! limit at start (the legacy proxier raised it to 64 000).

use std::sync::Arc;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use super::log_limit::LogLimit;

/// Caps the open proxied connections (cheap to clone: every accept loop
/// holds one).
#[derive(Debug, Clone, Default)]
pub struct ConnectionLimit {
    /// One permit per connection that may still open; `None`: no cap.
    permits: Option<Arc<Semaphore>>,
    /// The cap, for the log.
    max: usize,
    /// One "cap reached" line per interval, process-wide.
    refused_log: Arc<LogLimit>,
}

/// One admitted connection; it counts against the cap until dropped.
#[derive(Debug)]
pub struct Admission {
    /// Gives the permit back when dropped (`None`: no cap).
    _permit: Option<OwnedSemaphorePermit>,
}

impl ConnectionLimit {
    /// At most `max` connections open at once; `None`: no cap.
    pub fn new(max: Option<usize>) -> Self {
        ConnectionLimit {
            permits: max.map(|m| Arc::new(Semaphore::new(m.min(Semaphore::MAX_PERMITS)))),
            max: max.unwrap_or(0),
            refused_log: Arc::default(),
        }
    }

    /// Admits one more connection, or `None` (and a log line per interval)
    /// when the cap is reached.
    pub fn admit(&self) -> Option<Admission> {
        let Some(permits) = &self.permits else {
            return Some(Admission { _permit: None });
        };
        match Arc::clone(permits).try_acquire_owned() {
            Ok(p) => Some(Admission { _permit: Some(p) }),
            Err(_) => {
                if let Some(held_back) = self.refused_log.check() {
                    warn!(
                        max = self.max,
                        refused_since_last_line = held_back + 1,
                        "--max-connections reached; new connections are refused with a reset"
                    );
                }
                None
            }
        }
    }
}

/// What [`raise_open_file_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit at start.
    pub was: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit (the most an unprivileged process may set; root may
    /// go beyond it, but the hard limit is what the operator chose).
    pub hard: u64,
}

/// The share of the open-file limit the UDP flows of all Service ports may
/// take by default: a quarter leaves three quarters to TCP connections (two
/// fds each, two more per direction in a bulk phase), the admin servers
/// and the process itself.
pub const UDP_SHARE_OF_OPEN_FILES: u64 = 4;

/// Without `--udp-max-flows-total` and an open-file limit to take a share
/// of: the default per-port cap, as if there were one UDP Service port.
const UDP_BUDGET_FALLBACK: usize = 16384;

/// The process's UDP flow budget: `flag` if given, else a quarter of the
/// open-file limit (`open_files`, after [`raise_open_file_limit`]).
pub fn udp_flow_budget(flag: Option<usize>, open_files: Option<u64>) -> usize {
    match (flag, open_files) {
        (Some(n), _) => n.max(1),
        (None, Some(limit)) => {
            usize::try_from(limit / UDP_SHARE_OF_OPEN_FILES).map_or(usize::MAX, |n| n.max(1))
        }
        (None, None) => UDP_BUDGET_FALLBACK,
    }
}

/// Raises the soft open-file limit to the hard limit.
pub fn raise_open_file_limit() -> nix::Result<OpenFileLimit> {
    let (was, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if was < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFileLimit { was, now, hard })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::model::{Algorithm, ObjectKey, Protocol, ServicePortName};
    use crate::proxy::DataPathConfig;
    use crate::proxy::balancer::Balancer;
    use crate::proxy::connections::Connections;
    use crate::proxy::tcp;
    use crate::proxy::test_support::capture_logs;

    /// An echo server on loopback (stops when the handle drops).
    fn echo_server() -> uproxy_lab::peers::PeerHandle {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        uproxy_lab::peers::echo(l).unwrap()
    }

    /// A connection through the proxy that echoed once, or the error.
    async fn echoed(proxy: SocketAddr) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect(proxy).await?;
        s.write_all(b"hi").await?;
        let mut b = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await {
            Ok(r) => r.map(|_| s),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    #[test]
    fn the_udp_flow_budget_is_the_flag_else_a_quarter_of_the_open_file_limit() {
        use crate::proxy::limit::udp_flow_budget;
        assert_eq!(udp_flow_budget(Some(300), Some(1024)), 300);
        assert_eq!(udp_flow_budget(None, Some(1024)), 256);
        assert_eq!(udp_flow_budget(None, Some(1_048_576)), 262_144);
        assert_eq!(udp_flow_budget(None, Some(2)), 1);
        assert_eq!(udp_flow_budget(None, None), 16384);
    }

    #[test]
    fn the_open_file_limit_goes_up_to_the_hard_limit() {
        use crate::proxy::limit::raise_open_file_limit;
        use crate::proxy::test_support::{isolated, test_name};
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if !isolated(&test_name(
            module_path!(),
            "the_open_file_limit_goes_up_to_the_hard_limit",
        )) {
            return;
        }
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = 256.min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let got = raise_open_file_limit().unwrap();
        assert_eq!((got.was, got.now, got.hard), (low, hard, hard));
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    #[tokio::test]
    async fn connections_over_max_connections_are_refused_with_a_reset() {
        let (logs, _guard) = capture_logs();
        let echo = echo_server();
        let backend = echo.local_addr();
        let balancer = Balancer::new(Algorithm::RoundRobin);
        balancer.update(
            &[backend],
            Algorithm::RoundRobin,
            crate::model::SessionAffinity::None,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = listener.local_addr().unwrap();
        let stop = crate::proxy::Stop::default();
        let service = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let registry = std::sync::Arc::new(crate::proxy::metrics::PortSeries::new(false));
        let metrics = registry.service_port(&service);
        let _accepting = tcp::spawn(
            std::sync::Arc::new(service),
            listener,
            std::sync::Arc::new(balancer),
            std::sync::Arc::new(DataPathConfig::default()),
            Connections::with_limit(Some(2)),
            stop.clone(),
            metrics,
        )
        .unwrap();
        let first = echoed(proxy).await.expect("1st connection");
        let _second = echoed(proxy).await.expect("2nd connection");
        for i in 3..6 {
            match echoed(proxy).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connection {i} over the cap: {e}, want a reset"),
                Ok(_) => panic!("connection {i} was served over --max-connections 2"),
            }
        }
        assert_eq!(
            logs.count("--max-connections"),
            1,
            "want one line while the cap holds:\n{}",
            logs.text()
        );
        // Counted as failed connections of the port, reason max_connections.
        let text = registry.render();
        let series = "kubeuproxy_connections_failed_total{namespace=\"default\",service=\"web\",port_name=\"http\",protocol=\"TCP\",reason=\"max_connections\"} 3";
        assert!(
            text.lines().any(|l| l == series),
            "no `{series}` in:\n{text}"
        );
        // One ends: a new one is served again (as soon as the proxy has
        // seen the end; bounded).
        drop(first);
        let mut served = false;
        for _ in 0..100 {
            if echoed(proxy).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "no connection served after one of the two ended");
        stop.now.cancel();
    }
}
