//! Counting a flow's bytes into its Service port's counters while they
//! move, not when the flow ends: a connection that lives for hours (a
//! database session, a stream) shows its traffic as it happens, and one
//! that ends with a reset or a timeout still counts what it carried.
//!
//! The port's counters are shared by every flow of the port (and scraped),
//! so a flow does not add to them per message: each direction keeps a
//! [`Tally`] of its own, added to on every read, and flushed into the
//! port's counter once it holds [`FLUSH_BYTES`], once [`FLUSH_EVERY`] has
//! passed since its last flush (checked on the next read), when the
//! direction enters or leaves a bulk phase, and when it is dropped —
//! whichever way the direction ends (EOF, error, a cut, an aborted bulk
//! task). A small message costs an addition and a clock read; only bulk
//! traffic and the first message after a quiet second touch the shared
//! counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A tally this large is flushed at once: bulk traffic shows within a
/// fraction of a second, at one shared-counter update per MiB.
pub const FLUSH_BYTES: u64 = 1024 * 1024;
/// A tally older than this is flushed on the next read: a trickle of
/// small messages shows within about a second of moving.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Which way bytes move, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Read from the client, written to the endpoint.
    ToEndpoint = 0,
    /// Read from the endpoint, written to the client.
    ToClient = 1,
}

/// The relayed-bytes counters of one Service port (the data path's
/// `kubeuproxy_relayed_bytes_total`), shared by its flows, which add to
/// them through their [`Tally`]s. One allocation per way, so that a tally
/// holds its counter alone (8 bytes, not a pointer and a way).
#[derive(Debug, Default)]
pub struct RelayedBytes {
    by_way: [Arc<AtomicU64>; 2],
}

impl RelayedBytes {
    /// Bytes counted so far in `way`.
    pub fn get(&self, way: Way) -> u64 {
        self.by_way[way as usize].load(Ordering::Relaxed)
    }
}

/// Milliseconds since the first call, wrapping after 49 days: a tally's
/// clock in 4 bytes rather than an `Instant`'s 16 (every open flow's
/// future holds two tallies).
fn now_ms() -> u32 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u32
}

/// One direction's bytes not yet added to the port's counter. 16 bytes:
/// every open flow's future holds two.
#[derive(Debug)]
pub(super) struct Tally {
    /// The port's counter of this direction's way.
    sink: Arc<AtomicU64>,
    /// Below [`FLUSH_BYTES`] plus one read or splice (at most a pipe's
    /// size) between flushes.
    pending: u32,
    /// [`now_ms`] of the last flush; compared with wrapping arithmetic.
    flushed_ms: u32,
}

impl Tally {
    pub(super) fn new(bytes: &RelayedBytes, way: Way) -> Self {
        Tally {
            sink: Arc::clone(&bytes.by_way[way as usize]),
            pending: 0,
            flushed_ms: now_ms(),
        }
    }

    /// A tally of the same counter, for a bulk phase's own task.
    pub(super) fn sibling(&self) -> Self {
        Tally {
            sink: Arc::clone(&self.sink),
            pending: 0,
            flushed_ms: now_ms(),
        }
    }

    fn add_to_sink(&self, n: u64) {
        self.sink.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes moved; flushed if the tally is big or old enough.
    pub(super) fn add(&mut self, n: usize) {
        let Some(pending) = u32::try_from(n)
            .ok()
            .and_then(|n| self.pending.checked_add(n))
        else {
            // Never with the reads and splices of a relay (at most a
            // pipe's size each); counted at once rather than lost.
            self.flush();
            self.add_to_sink(n as u64);
            return;
        };
        self.pending = pending;
        if u64::from(self.pending) >= FLUSH_BYTES
            || now_ms().wrapping_sub(self.flushed_ms) >= FLUSH_EVERY.as_millis() as u32
        {
            self.flush();
        }
    }

    /// Adds what the tally holds to the port's counter.
    pub(super) fn flush(&mut self) {
        if self.pending > 0 {
            self.add_to_sink(u64::from(self.pending));
            self.pending = 0;
        }
        self.flushed_ms = now_ms();
    }
}

impl Drop for Tally {
    /// However the direction ends (EOF, an error, a cut, an aborted
    /// task), what it moved is counted.
    fn drop(&mut self) {
        if self.pending > 0 {
            self.add_to_sink(u64::from(self.pending));
        }
    }
}
