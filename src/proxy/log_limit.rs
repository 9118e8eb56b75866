//! At most one log line per interval for events that can repeat at the
//! rate connections arrive: a dead endpoint at 10 000 connections/s must
//! not write 10 000 lines a second from the data path's workers. The line
//! that gets through says how many were held back since the one before.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The interval of the data path's repeating warnings.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one line through per interval, counting the ones held back.
/// Lock-free: two atomics, so it can sit in every endpoint's counters.
#[derive(Debug)]
pub struct LogLimit {
    interval_ms: u64,
    /// When the next line may be written (ms since [`now_ms`]'s epoch).
    next_ms: AtomicU64,
    /// Lines held back since the last one written.
    held_back: AtomicU64,
}

impl LogLimit {
    pub const fn new(interval: Duration) -> Self {
        LogLimit {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(held_back)` when a line may be written now (the count of
    /// lines held back since the last one), `None` when it is held back.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(LOG_INTERVAL)
    }
}

/// Milliseconds since the first call (a process-wide monotonic epoch).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let l = LogLimit::new(Duration::from_secs(10));
        assert_eq!(l.check_at(1_000), Some(0));
        for t in [1_001, 5_000, 10_999] {
            assert_eq!(l.check_at(t), None);
        }
        assert_eq!(l.check_at(11_000), Some(3));
        assert_eq!(l.check_at(11_001), None);
        assert_eq!(l.check_at(60_000), Some(1));
    }
}
