//! One operation per volume at a time.
//!
//! CSI requires a plugin to refuse (with ABORTED) a call for a volume that
//! already has an operation in progress, instead of queueing it: the caller
//! retries with backoff. [`InFlight::begin`] registers a key and returns a
//! guard that releases it when dropped, so a key is held exactly as long as
//! its operation runs, whatever path the operation leaves by.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Keys with an operation in progress.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Holds a key of an [`InFlight`] set until dropped.
#[derive(Debug)]
pub struct Guard {
    set: InFlight,
    key: String,
}

impl InFlight {
    /// Registers `key`; `None` if an operation on it is already running.
    pub fn try_begin(&self, key: &str) -> Option<Guard> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.to_owned()) {
            return None;
        }
        Some(Guard {
            set: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Like [`InFlight::try_begin`], but returns the ABORTED status CSI
    /// asks for, naming `what` (e.g. "volume pvc-1").
    pub fn begin(&self, key: &str, what: &str) -> Result<Guard, tonic::Status> {
        self.try_begin(key).ok_or_else(|| {
            tonic::Status::aborted(format!(
                "an operation on {what} is already in progress; retry when it has finished"
            ))
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_refused_until_the_first_ends() {
        let f = InFlight::default();
        let g = f.begin("v1", "volume v1").unwrap();
        let e = f.begin("v1", "volume v1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.message().contains("volume v1"));
        assert!(f.try_begin("v2").is_some(), "other keys are independent");
        drop(g);
        assert!(f.try_begin("v1").is_some());
    }
}
