//! Every proxied connection of the process, as one set: admission under
//! `--max-connections`, and the drain at shutdown (wait for them, then cut
//! the ones still open).
//!
//! Kept apart from the listeners so that the imports run one way: the
//! accept loops ([`super::tcp`]) admit into this set, the listener registry
//! ([`super::listeners`]) starts the accept loops and hands each one the
//! set, and both depend on this file rather than on each other.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::limit::{Admission, ConnectionLimit};

/// Every proxied connection of the process: shutdown waits for them, then
/// cuts the ones still open.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    /// One task per connection.
    tracker: TaskTracker,
    /// Fired when the grace period is over: every relay resets both sides.
    cut: CancellationToken,
    /// `--max-connections`.
    limit: ConnectionLimit,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the grace period ran out, and reset.
    pub cut: usize,
}

impl Connections {
    pub fn new() -> Self {
        Self::default()
    }

    /// With at most `max` connections open at once (`None`: no cap).
    pub fn with_limit(max: Option<usize>) -> Self {
        Connections {
            limit: ConnectionLimit::new(max),
            ..Self::default()
        }
    }

    /// Admits one more connection, or `None` when the cap is reached (the
    /// caller refuses it).
    pub(crate) fn admit(&self) -> Option<Admission> {
        self.limit.admit()
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn cut_token(&self) -> &CancellationToken {
        &self.cut
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Lets open connections finish for up to `grace`, then resets the
    /// rest. The listeners must be closed first (no new connections).
    /// `hurry` ends the wait early (a second signal).
    pub async fn drain(&self, grace: Duration, hurry: CancellationToken) -> Drained {
        self.tracker.close();
        let finished = tokio::select! {
            _ = self.tracker.wait() => true,
            _ = tokio::time::sleep(grace) => false,
            _ = hurry.cancelled() => false,
        };
        if finished {
            return Drained { cut: 0 };
        }
        let cut = self.tracker.len();
        self.cut.cancel();
        // Each relay resets its sockets and returns at once; bounded anyway.
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                left = self.tracker.len(),
                "connections did not end after the cut"
            );
        }
        Drained { cut }
    }

    /// Cuts every connection now.
    pub fn cut_all(&self) {
        self.cut.cancel();
    }
}
