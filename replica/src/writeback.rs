//! When to start writing a layer's CRC pages back ahead of a FLUSH.
//!
//! A FLUSH writes the dirty pages of each dirty layer's CRC file back and
//! waits for them before the cache flush of the disk ([`crate::crcmap`]):
//! a device write, then the flush, one after the other. Under a database's
//! commits (a few writes, then a FLUSH, again and again) that write-back is
//! half of what a FLUSH waits for (measured on this project's machine: a
//! FLUSH of one data page took 50 µs with no CRC page to write, 115 µs
//! with one). Started as soon as the write that dirtied the page
//! completes, it runs while the acknowledgement travels back and the FLUSH
//! travels in, and the FLUSH finds the page written.
//!
//! Started early, a page is written once per write instead of once per
//! FLUSH: more device writes for any load that writes much between its
//! flushes. So write-back starts only for *commit-like* writes: those among
//! the first [`AHEAD_WRITES`] since the last FLUSH, when the interval that
//! FLUSH closed held at most [`AHEAD_WRITES`] writes too. A load without
//! flushes (or with long intervals) starts at most [`AHEAD_WRITES`]
//! write-backs per FLUSH and, after one long interval, none until an
//! interval is short again.
//!
//! Invariants:
//! - Nothing here makes anything durable or is needed for it: the FLUSH
//!   still writes back every dirty page and waits for every write-back
//!   started earlier, so its promise is the same whether or not, and
//!   however often, write-back was started ahead.
//! - At most [`AHEAD_WRITES`] write-backs start between two flushes.

use std::sync::atomic::{AtomicU64, Ordering};

/// Writes per FLUSH interval up to which the writes count as commits.
pub const AHEAD_WRITES: u64 = 8;

/// Counts writes between flushes and says when to write CRC pages back
/// ahead of the next FLUSH. Shared by the store's concurrent writes.
#[derive(Debug)]
pub struct WriteBackAhead {
    /// Writes completed since the last FLUSH started.
    since_flush: AtomicU64,
    /// Writes of the interval the last FLUSH closed; `u64::MAX` before the
    /// first FLUSH.
    last_interval: AtomicU64,
}

impl Default for WriteBackAhead {
    fn default() -> Self {
        WriteBackAhead {
            since_flush: AtomicU64::new(0),
            last_interval: AtomicU64::new(u64::MAX),
        }
    }
}

impl WriteBackAhead {
    /// A write completed: whether to start writing its CRC pages back now.
    pub fn wrote(&self) -> bool {
        let n = self.since_flush.fetch_add(1, Ordering::Relaxed) + 1;
        self.commit(n)
    }

    /// Whether the writes are commits now: the next write would start its
    /// write-back ahead ([`Self::wrote`]).
    pub fn in_commits(&self) -> bool {
        self.commit(self.since_flush.load(Ordering::Relaxed) + 1)
    }

    /// Whether the `n`th write since the last FLUSH is a commit's.
    fn commit(&self, n: u64) -> bool {
        n <= AHEAD_WRITES && self.last_interval.load(Ordering::Relaxed) <= AHEAD_WRITES
    }

    /// A FLUSH started: it closes the interval of the writes before it.
    pub fn flushed(&self) {
        let n = self.since_flush.swap(0, Ordering::Relaxed);
        self.last_interval.store(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of `writes` writes start a write-back.
    fn started(w: &WriteBackAhead, writes: u64) -> u64 {
        (0..writes).filter(|_| w.wrote()).count() as u64
    }

    #[test]
    fn nothing_before_the_first_flush() {
        let w = WriteBackAhead::default();
        assert!(!w.in_commits());
        assert_eq!(started(&w, 3), 0);
    }

    #[test]
    fn commits_start_write_back_for_every_write() {
        let w = WriteBackAhead::default();
        w.flushed();
        for writes in [1, 2, 1, AHEAD_WRITES, 1] {
            assert!(w.in_commits());
            assert_eq!(started(&w, writes), writes);
            w.flushed();
        }
        // Flushes with no write between them are commits too.
        w.flushed();
        assert_eq!(started(&w, 1), 1);
    }

    #[test]
    fn a_long_interval_starts_at_most_the_bound() {
        let w = WriteBackAhead::default();
        w.flushed();
        assert_eq!(started(&w, AHEAD_WRITES), AHEAD_WRITES);
        assert!(!w.in_commits());
        assert_eq!(started(&w, 10_000), 0);
    }

    #[test]
    fn after_a_long_interval_none_until_a_short_one() {
        let w = WriteBackAhead::default();
        w.flushed();
        started(&w, AHEAD_WRITES + 1);
        w.flushed();
        // The interval just closed was long: bulk writing, no write-back.
        assert!(!w.in_commits());
        assert_eq!(started(&w, 2), 0);
        w.flushed();
        // That one was short: commits again.
        assert_eq!(started(&w, 2), 2);
    }
}
