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
    /// A file of the store could not be opened or synced.
    #[error("{doing} of the metadata store at {path}: {source}")]
    File {
        /// What was being done.
        doing: &'static str,
        /// Where the store lives.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
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
    /// The data-stream session the last `Open` started (see
    /// [`crate::session`]); 0 before the first.
    #[serde(default)]
    pub session: u64,
    /// Every layer's CRC file is written in full on disk (no holes, no
    /// unwritten extents: see [`crate::crcmap`]). False for a replica made
    /// before that rule until it rewrote them at its next start.
    #[serde(default)]
    pub crc_files_written: bool,
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
    /// sled's one data file (`<path>/db`), for fsync: sled's own flush
    /// only starts and waits for the writes (`sync_file_range`), which
    /// neither asks the disk to persist its cache nor commits a change of
    /// the file's size.
    file: std::fs::File,
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
            // No background flusher: `save` makes every record durable
            // itself, and sled's flusher would otherwise fsync the database
            // twice a second even when nothing changed. On ext4 every fsync
            // sends the disk a cache flush, so each idle replica would keep
            // stalling the node's other I/O.
            match sled::Config::new()
                .path(path)
                .cache_capacity(1 << 20)
                .flush_every_ms(None)
                .open()
            {
                Ok(db) => return Self::with_file(db, path),
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

    /// Opens sled's data file for fsync, and makes the store's directory
    /// entries (created on first open) durable.
    fn with_file(db: sled::Db, path: &Path) -> Result<Self, MetaError> {
        let err = |doing| {
            move |source| MetaError::File {
                doing,
                path: path.to_owned(),
                source,
            }
        };
        let file = std::fs::File::open(path.join("db")).map_err(err("opening the data file"))?;
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(err("syncing the directory"))?;
        Ok(SledMeta {
            db,
            file,
            path: path.to_owned(),
        })
    }

    fn write(&self, meta: &Meta) -> Result<(), MetaError> {
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
        self.write(meta)?;
        // fsync, not fdatasync: the record may name a layer whose files were
        // just created, and a full fsync commits the filesystem's running
        // journal transaction (sled's write changed the file's times), which
        // on ext4 and XFS also holds those files' creation. This is what
        // sled's own flusher did.
        self.file.sync_all().map_err(|source| MetaError::File {
            doing: "syncing the data file",
            path: self.path.clone(),
            source,
        })
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
            session: 7,
            crc_files_written: true,
        };
        store.save(&meta).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), meta);
        // A record written before replicas recorded their scrubs: never scrubbed.
        let mut old = serde_json::to_value(&meta).unwrap();
        old.as_object_mut().unwrap().remove("last_clean_scrub_unix");
        old.as_object_mut().unwrap().remove("crc_files_written");
        store
            .db
            .insert(KEY, serde_json::to_vec(&old).unwrap())
            .unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.last_clean_scrub_unix, 0);
        // ... nor rewrote its CRC files in full.
        assert!(!loaded.crc_files_written);
        store.db.insert(KEY, b"{not json".to_vec()).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
    }

    /// With sled's background flusher off, nothing cleans its log in the
    /// background: a record rewritten over and over, most times without a
    /// sync, must still not grow the store without bound.
    #[test]
    fn a_record_saved_many_times_keeps_the_store_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let store = SledMeta::open(&path).unwrap();
        let mut meta = Meta {
            format: FORMAT,
            id: "r1".into(),
            size: 1 << 30,
            block_size: 4096,
            chain: (0..8)
                .map(|id| LayerMeta {
                    id,
                    name: format!("snapshot-{id}"),
                    user_created: true,
                    created_unix: 1_700_000_000,
                })
                .collect(),
            epoch: 1,
            revision: 0,
            clean: false,
            ejected: vec![],
            next_layer_id: 8,
            syncing: false,
            merging: None,
            attached: true,
            last_clean_scrub_unix: 0,
            session: 0,
            crc_files_written: true,
        };
        let record = serde_json::to_vec(&meta).unwrap().len();
        assert!(record > 800, "{record}");
        // Over 16 MiB written in all.
        for revision in 1..=20_000 {
            meta.revision = revision;
            if revision % 1000 == 0 {
                store.save(&meta).unwrap();
            } else {
                store.write(&meta).unwrap();
            }
        }
        let used = std::fs::metadata(path.join("db")).unwrap().len();
        assert!(used < 6 << 20, "the store grew to {used} bytes");
        // The last record, unsynced or not, is what a restart reads.
        meta.revision += 1;
        store.write(&meta).unwrap();
        drop(store);
        let store = SledMeta::open(&path).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), meta);
    }
}
