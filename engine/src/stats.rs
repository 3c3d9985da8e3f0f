//! I/O counters and latency percentiles, cheap enough for every request.
//!
//! Latencies go into a log-linear histogram (4 sub-buckets per power of two,
//! so a percentile is within 25% of the true value) of relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB: usize = 4;
const BUCKETS: usize = 64 * SUB;

/// A latency histogram in microseconds.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (log - 2)) & (SUB as u64 - 1)) as usize;
    (log * SUB + sub).min(BUCKETS - 1)
}

fn bucket_floor(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let (log, sub) = (b / SUB, b % SUB);
    (1u64 << log) + ((sub as u64) << (log - 2))
}

impl Histogram {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        self.counts[bucket(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in microseconds (lower bound of its bucket).
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= want {
                return bucket_floor(b);
            }
        }
        bucket_floor(BUCKETS - 1)
    }
}

/// Counters of one volume.
#[derive(Default)]
pub struct IoStats {
    /// Read latencies.
    pub reads: Histogram,
    /// Write latencies.
    pub writes: Histogram,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Unmaps completed.
    pub unmaps: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((375..=500).contains(&p50), "p50 {p50}");
        assert!((740..=990).contains(&p99), "p99 {p99}");
        assert_eq!(h.count(), 1000);
        for us in [0u64, 1, 3, 4, 5, 7, 8, 100, 1 << 40] {
            assert!(bucket_floor(bucket(us)) <= us, "{us}");
        }
    }
}
