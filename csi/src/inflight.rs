//! One operation per volume at a time.
//!
//! CSI requires a plugin to cope with a CO that retries or sends a second
//! call for a volume while the first one still runs; the answer for the
//! second call is `ABORTED` ("an operation is in progress; retry"). The
//! [`InFlight`] set implements that: [`InFlight::begin`] claims a key
//! (normally a volume id) and returns a guard; the key is released when the
//! guard is dropped, on every path including errors and cancelled requests
//! (tonic drops the handler future when the client goes away).
//!
//! Invariant: a key is in the set exactly while one [`OpGuard`] for it is
//! alive. The set never blocks: claiming is a try-lock, not a wait.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// A set of keys (volume ids) with an operation in progress. Cheap to clone:
/// clones share the set.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Proof that an operation on a key is in progress; releases the key when
/// dropped.
#[derive(Debug)]
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct OpGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// An empty set.
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// Claims `key`; `None` when an operation on it is already in progress.
    pub fn try_begin(&self, key: &str) -> Option<OpGuard> {
        // A panic while the lock is held cannot leave the set inconsistent
        // (insert/remove are single calls), so a poisoned lock is usable.
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.insert(key.to_owned()) {
            return None;
        }
        Some(OpGuard {
            keys: Arc::clone(&self.keys),
            key: key.to_owned(),
        })
    }

    /// Claims the volume `volume_id` for an operation, or returns the
    /// `ABORTED` status CSI prescribes when another operation on it runs.
    #[allow(clippy::result_large_err)] // tonic::Status is what handlers return.
    pub fn begin(&self, volume_id: &str) -> Result<OpGuard, tonic::Status> {
        self.try_begin(volume_id).ok_or_else(|| {
            tonic::Status::aborted(format!(
                "an operation on volume {volume_id} is in progress; retry"
            ))
        })
    }

    /// Like [`InFlight::begin`] for any key; the ABORTED message names
    /// `what` (e.g. `volume "data-0"`).
    #[allow(clippy::result_large_err)] // tonic::Status is what handlers return.
    pub fn begin_named(&self, key: &str, what: &str) -> Result<OpGuard, tonic::Status> {
        self.try_begin(key).ok_or_else(|| {
            tonic::Status::aborted(format!(
                "an operation on {what} is already in progress; retry when it has finished"
            ))
        })
    }

    /// Whether an operation on `key` is in progress.
    pub fn contains(&self, key: &str) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }
}

impl OpGuard {
    /// The claimed key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_guard_drops() {
        let ops = InFlight::new();
        let g = ops.begin("vol-1").expect("first claim");
        assert_eq!(g.key(), "vol-1");
        assert!(ops.contains("vol-1"));

        let e = ops.begin("vol-1").expect_err("second claim must fail");
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(
            e.message().contains("vol-1") && e.message().contains("retry"),
            "{}",
            e.message()
        );
        // A clone shares the set.
        assert!(ops.clone().try_begin("vol-1").is_none());
        // Other keys are independent.
        let other = ops.begin("vol-2").expect("other volume");

        drop(g);
        assert!(!ops.contains("vol-1"));
        let again = ops.begin("vol-1").expect("claim after release");
        drop((again, other));
        assert!(!ops.contains("vol-1") && !ops.contains("vol-2"));
    }

    #[test]
    fn guard_is_released_when_a_task_holding_it_panics() {
        let ops = InFlight::new();
        let o = ops.clone();
        let r = std::thread::spawn(move || {
            let _g = o.begin("v").expect("claim");
            panic!("operation failed");
        })
        .join();
        assert!(r.is_err());
        assert!(!ops.contains("v"));
        assert!(ops.try_begin("v").is_some());
    }
}
