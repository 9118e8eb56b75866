//! How an accept loop reacts to accept errors.
//!
//! An accept error that repeats means the listener or the process is in
//! trouble (out of file descriptors or memory, or a socket that no longer
//! listens); accepting again at once would spin a worker at 100 % CPU and
//! flood the log. So: a one-off error (ECONNABORTED: the client gave up
//! while queued) is retried at once; an exhaustion error, or any error
//! that follows another, pauses the loop, 5 ms doubling to 1 s; a success
//! starts over. The log says so once per interval (see `log_limit.rs`).

use std::io;
use std::time::Duration;

use nix::errno::Errno;
use tracing::{debug, warn};

use super::log_limit::LogLimit;

/// The first pause.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Errors after which accepting again at once would fail again: the
/// process or system is out of file descriptors or memory.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// The pause state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// The next pause.
    pause: Duration,
    /// Errors since the last success.
    in_a_row: u32,
    /// One warning per interval.
    log: LogLimit,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            pause: FIRST_PAUSE,
            in_a_row: 0,
            log: LogLimit::default(),
        }
    }
}

impl AcceptBackoff {
    /// An accept succeeded: the next error starts over.
    pub fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
        self.in_a_row = 0;
    }

    /// An accept failed with `e`: how long to pause before the next one
    /// (`None`: at once). Logs it.
    pub fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.in_a_row == 1 && !is_resource_exhaustion(e) {
            // Concerns one connection only (ECONNABORTED and friends).
            debug!(error = %e, "accept failed");
            return None;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        if let Some(held_back) = self.log.check() {
            warn!(
                error = %e,
                in_a_row = self.in_a_row,
                pause_ms = pause.as_millis() as u64,
                held_back,
                "accept failed; backing off"
            );
        }
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::model::{Algorithm, ObjectKey, Protocol, ServicePortName};
    use crate::proxy::DataPathConfig;
    use crate::proxy::balancer::Balancer;
    use crate::proxy::connections::Connections;
    use crate::proxy::tcp;
    use crate::proxy::test_support::capture_logs;

    use super::*;

    #[test]
    fn one_off_errors_retry_at_once_repeated_ones_pause_longer_and_longer() {
        let aborted = io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let mut b = AcceptBackoff::default();
        assert_eq!(b.failed(&aborted), None);
        assert_eq!(b.failed(&aborted), Some(Duration::from_millis(5)));
        assert_eq!(b.failed(&aborted), Some(Duration::from_millis(10)));
        b.succeeded();
        assert_eq!(b.failed(&emfile), Some(Duration::from_millis(5)));
        for _ in 0..20 {
            b.failed(&emfile);
        }
        assert_eq!(b.failed(&emfile), Some(MAX_PAUSE));
    }

    #[tokio::test]
    async fn a_repeating_accept_error_backs_off() {
        // A listening socket shut down under the loop: every accept fails
        // at once with EINVAL (not an exhaustion errno). The loop must
        // pause between attempts, not spin a worker at 100 % CPU.
        let (logs, _guard) = capture_logs();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&listener)
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        let stop = crate::proxy::Stop::default();
        let service = ServicePortName {
            service: ObjectKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let metrics = crate::proxy::metrics::PortSeries::new(false).service_port(&service);
        let accepting = tcp::spawn(
            Arc::new(service),
            listener,
            Arc::new(Balancer::new(Algorithm::RoundRobin)),
            Arc::new(DataPathConfig::default()),
            Connections::new(),
            stop.clone(),
            metrics,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.now.cancel();
        accepting.await.unwrap();
        let text = logs.text();
        let attempts = text.lines().filter(|l| l.contains("accept failed")).count();
        assert!(attempts > 0, "the accept error never happened:\n{text}");
        assert!(
            attempts <= 20,
            "{attempts} failed accepts logged in 300 ms: the loop does not back off"
        );
    }
}
