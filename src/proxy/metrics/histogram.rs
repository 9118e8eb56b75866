//! The latency histogram of the per-Service-port families (endpoint
//! connects, request mode's requests): fixed exponential buckets of
//! plain atomics, rendered as a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering};

/// Relaxed: each atomic is a counter of its own.
const RELAXED: Ordering = Ordering::Relaxed;

/// Finite buckets of the endpoint connect latency.
pub const CONNECT_BUCKETS: usize = 16;

/// Their upper bounds: 100 µs to about 3.3 s (the longest connect timeout
/// is 2 s), `0.0001 * 2^i` — what `exponential_buckets(0.0001, 2.0, 16)`
/// gives. An observation counts in the first bucket whose bound is at
/// least its value, or in `+Inf` after them.
pub const CONNECT_BOUNDS: [f64; CONNECT_BUCKETS] = {
    let mut bounds = [0.0; CONNECT_BUCKETS];
    let mut i = 0;
    while i < CONNECT_BUCKETS {
        bounds[i] = 0.0001 * (1u32 << i) as f64;
        i += 1;
    }
    bounds
};

/// The connect latency of a Service port: a count per bucket of
/// [`CONNECT_BOUNDS`] and one for `+Inf` (not cumulative: the encoder adds
/// them up), and the sum of the observed seconds as `f64` bits. The
/// count is the sum of the buckets.
#[derive(Debug, Default)]
pub struct ConnectHistogram {
    buckets: [AtomicU64; CONNECT_BUCKETS + 1],
    sum: AtomicU64,
}

impl ConnectHistogram {
    pub fn observe(&self, seconds: f64) {
        // The first bound at least `seconds`; past the last one, +Inf.
        let i = CONNECT_BOUNDS.partition_point(|bound| *bound < seconds);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, RELAXED);
        }
        // The closure always answers, so the update cannot fail.
        let _ = self.sum.fetch_update(RELAXED, RELAXED, |bits| {
            Some((f64::from_bits(bits) + seconds).to_bits())
        });
    }

    /// Sum, count and the buckets as `(upper bound, count)`.
    pub fn snapshot(&self) -> (f64, u64, [(f64, u64); CONNECT_BUCKETS + 1]) {
        let mut buckets = [(f64::INFINITY, 0); CONNECT_BUCKETS + 1];
        let mut count = 0u64;
        for (i, (bound, n)) in buckets.iter_mut().enumerate() {
            if let Some(b) = CONNECT_BOUNDS.get(i) {
                *bound = *b;
            }
            *n = self.buckets[i].load(RELAXED);
            count = count.wrapping_add(*n);
        }
        (f64::from_bits(self.sum.load(RELAXED)), count, buckets)
    }
}
