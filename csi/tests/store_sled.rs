//! The state store's conformance suite against the sled backend.

mod store_conformance;

use std::path::PathBuf;
use std::sync::Mutex;

use store_conformance::Harness;
use zebu_csi::store::{SledStore, Store};

/// Stores in fresh directories under one temp dir.
struct Sled {
    root: tempfile::TempDir,
    current: Mutex<(u32, PathBuf)>,
}

impl Sled {
    fn new() -> Sled {
        Sled {
            root: zebu_testkit::tempdir(),
            current: Mutex::new((0, PathBuf::new())),
        }
    }
}

impl Harness for Sled {
    fn fresh(&self) -> Box<dyn Store> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.0 += 1;
        cur.1 = self.root.path().join(format!("store-{}", cur.0));
        Box::new(SledStore::open(&cur.1).expect("open a fresh sled store"))
    }

    fn reopen(&self) -> Box<dyn Store> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        Box::new(SledStore::open(&cur.1).expect("reopen the sled store"))
    }
}

conformance_tests!(Sled::new(), 48, ());
