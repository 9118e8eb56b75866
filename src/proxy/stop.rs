//! How a listener's task is told to end (retire with a linger, or stop
//! now at shutdown), and the boxed timer its loop waits on.
//!
//! In a file of its own so that the imports run one way: the accept loops
//! ([`super::tcp`], [`super::udp`]) and the listener registry use it; the
//! module root, which builds [`super::DataPathConfig`] from the UDP
//! settings, only re-exports it. Kept in the root, it made udp and the root
//! import each other.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
    /// Shared by every listener of a [`super::listeners::SocketListeners`]: one
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
