//! Replica metadata: what the layer files alone cannot say.
//!
//! The record ([`Meta`]) is small: the volume's geometry, the layer chain,
//! the epoch, the revision, the clean-shutdown flag, the ejected peers and the
//! state of an unfinished merge or sync. It lives in an embedded key-value
//! store behind the [`MetaStore`] trait (sled today), so another engine could
//! replace sled without touching callers.
//!
//! Invariant: [`MetaStore::save`] returns only after the record is durable.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The store could not be opened or written.
    #[error("metadata store at {path}: {source}")]
    Store {
        /// Where the store lives.
        path: PathBuf,
        /// What sled said.
        #[source]
        source: sled::Error,
    },
    /// Another process holds the store's lock.
    #[error(
        "metadata store at {path} is locked by another process (is another zebu-replica \
         serving this --dir?); stop it first"
    )]
    Locked {
        /// Where the store lives.
        path: PathBuf,
    },
    /// The record is unreadable.
    #[error(
        "replica metadata at {path} is corrupt ({reason}); refusing to start rather than guess. \
         Restore it from a backup or delete the directory to rebuild this replica from a healthy one"
    )]
    Corrupt {
        /// Where the store lives.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One layer of the chain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerMeta {
    /// File id: the layer's files are `layers/<id>.img` and `layers/<id>.crc`.
    pub id: u64,
    /// Snapshot name; empty for the head.
    pub name: String,
    /// Created by a user (not by the system, e.g. for a rebuild).
    pub user_created: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
}

/// An interrupted merge of layer `from` into layer `into`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergeMeta {
    /// Layer being deleted.
    pub from: u64,
    /// Layer receiving its blocks.
    pub into: u64,
}

/// The replica's metadata record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// Record format version.
    pub format: u32,
    /// Replica id (a UUID), stable for the replica's life.
    pub id: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Oldest first; the last entry is the head.
    pub chain: Vec<LayerMeta>,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Highest write revision made durable.
    pub revision: u64,
    /// The process stopped cleanly.
    pub clean: bool,
    /// Peer replica ids the engine ejected.
    pub ejected: Vec<String>,
    /// Next layer file id.
    pub next_layer_id: u64,
    /// A rebuild/resync into this replica has started and not finished.
    pub syncing: bool,
    /// A snapshot deletion (merge) that has not finished.
    pub merging: Option<MergeMeta>,
    /// An engine opened the replica and has not closed it cleanly.
    #[serde(default)]
    pub attached: bool,
    /// When the last scrub that read every block of every layer and found
    /// none corrupt finished, seconds since the Unix epoch; 0 if none has.
    #[serde(default)]
    pub last_clean_scrub_unix: i64,
}

/// Current [`Meta::format`].
pub const FORMAT: u32 = 1;

/// Durable storage of the [`Meta`] record.
pub trait MetaStore: Send + Sync {
    /// The stored record, or `None` for a new store.
    fn load(&self) -> Result<Option<Meta>, MetaError>;
    /// Replaces the record; returns once it is durable.
    fn save(&self, meta: &Meta) -> Result<(), MetaError>;
}

const KEY: &[u8] = b"replica";

/// [`MetaStore`] on sled.
pub struct SledMeta {
    db: sled::Db,
    path: PathBuf,
}

/// How long [`SledMeta::open`] waits for a lock held by this process's
/// previous, just-dropped handle (see there).
const LOCK_WAIT: Duration = Duration::from_secs(3);

impl SledMeta {
    /// Opens (or creates) the store in `path`.
    ///
    /// sled releases its file lock only when its background threads have
    /// let go of the database, a moment after the last handle is dropped;
    /// so a store reopened right after being closed in the same process may
    /// find the lock still held. A held lock is therefore retried for up to
    /// [`LOCK_WAIT`] before it is reported as [`MetaError::Locked`].
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(1 << 20)
                .open()
            {
                Ok(db) => {
                    return Ok(SledMeta {
                        db,
                        path: path.to_owned(),
                    });
                }
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) => {
                    if Instant::now() >= deadline {
                        return Err(MetaError::Locked {
                            path: path.to_owned(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(MetaError::Store {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}

/// sled reports a held lock as an I/O error wrapping EWOULDBLOCK.
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

impl MetaStore for SledMeta {
    fn load(&self) -> Result<Option<Meta>, MetaError> {
        let raw = self.db.get(KEY).map_err(|source| MetaError::Store {
            path: self.path.clone(),
            source,
        })?;
        let Some(raw) = raw else { return Ok(None) };
        let meta: Meta = serde_json::from_slice(&raw).map_err(|e| MetaError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        if meta.format != FORMAT {
            return Err(MetaError::Corrupt {
                path: self.path.clone(),
                reason: format!("unknown format version {}", meta.format),
            });
        }
        if meta.chain.is_empty()
            || meta.block_size == 0
            || !meta.size.is_multiple_of(meta.block_size as u64)
        {
            return Err(MetaError::Corrupt {
                path: self.path.clone(),
                reason: "inconsistent geometry or empty layer chain".into(),
            });
        }
        Ok(Some(meta))
    }

    fn save(&self, meta: &Meta) -> Result<(), MetaError> {
        let raw = serde_json::to_vec(meta).map_err(|e| MetaError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        let err = |source| MetaError::Store {
            path: self.path.clone(),
            source,
        };
        self.db.insert(KEY, raw).map_err(err)?;
        self.db.flush().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_store_is_reported_locked_and_reopens_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let first = SledMeta::open(&path).unwrap();
        match SledMeta::open(&path) {
            Err(e @ MetaError::Locked { .. }) => {
                assert!(e.to_string().contains("locked by another process"), "{e}")
            }
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("a second handle opened a locked store"),
        }
        // Closing and reopening at once, as a restarted store does, works.
        drop(first);
        for _ in 0..20 {
            drop(SledMeta::open(&path).unwrap());
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledMeta::open(&dir.path().join("meta")).unwrap();
        assert!(store.load().unwrap().is_none());
        let meta = Meta {
            format: FORMAT,
            id: "r1".into(),
            size: 1 << 20,
            block_size: 4096,
            chain: vec![LayerMeta {
                id: 0,
                name: String::new(),
                user_created: false,
                created_unix: 0,
            }],
            epoch: 3,
            revision: 9,
            clean: false,
            ejected: vec!["x".into()],
            next_layer_id: 1,
            syncing: false,
            merging: None,
            attached: false,
            last_clean_scrub_unix: 1_700_000_000,
        };
        store.save(&meta).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), meta);
        // A record written before replicas recorded their scrubs: never scrubbed.
        let mut old = serde_json::to_value(&meta).unwrap();
        old.as_object_mut().unwrap().remove("last_clean_scrub_unix");
        store
            .db
            .insert(KEY, serde_json::to_vec(&old).unwrap())
            .unwrap();
        assert_eq!(store.load().unwrap().unwrap().last_clean_scrub_unix, 0);
        store.db.insert(KEY, b"{not json".to_vec()).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
    }
}
