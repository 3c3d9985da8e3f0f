//! [`Store`](super::Store) on an embedded sled database.
//!
//! One tree per kind (`volumes`, `snapshots`, `nodes`), keyed by the record's
//! id. Each value is the JSON envelope `{"version": N, "record": {...}}`.
//! Version checks and the write they guard are one sled `compare_and_swap`,
//! so two writers racing on the same object cannot both win. Versions come
//! from sled's `generate_id`, which is unique and monotonic across restarts.
//! Every write is durable before it returns: sled's flush writes it out,
//! then an fsync of sled's data file makes the disk persist it (sled's own
//! flush only waits for the writes, `sync_file_range`). sled's background
//! flusher is off: it fsyncs twice a second even when nothing changed, and
//! on ext4 each fsync is a cache flush of the whole disk.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    Kind, NodeRecord, Record, Result, SnapshotRecord, StoreError, Versioned, VolumeRecord,
};

/// [`Store`](super::Store) on sled. Cheap to share: wrap it in an `Arc`.
pub struct SledStore {
    db: sled::Db,
    volumes: sled::Tree,
    snapshots: sled::Tree,
    nodes: sled::Tree,
    /// sled's data file (`<dir>/db`), for fsync; none for a temporary store.
    file: Option<std::fs::File>,
    /// Where the database lives, for error messages.
    location: String,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, R> {
    version: u64,
    record: &'a R,
}

#[derive(Deserialize)]
struct EnvelopeIn<R> {
    version: u64,
    record: R,
}

/// sled reports a held lock as an I/O error of kind `Other` whose message
/// names the lock (the `WouldBlock` from the OS is only in its text).
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u64,
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`. Only one process may
    /// have it open at a time.
    pub fn open(path: &Path) -> Result<Self> {
        let location = path.display().to_string();
        // sled's background flusher holds the directory lock for a moment
        // after the last handle of a store in this process is dropped; a
        // reopen in that window is refused with WouldBlock. Wait it out
        // (bounded); another process holding the store still fails.
        let mut attempts = 0;
        let db = loop {
            // No background flusher (see the module docs).
            match sled::Config::new().path(path).flush_every_ms(None).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(backend(&location, "open", e)),
            }
        };
        let file = std::fs::File::open(path.join("db"))
            .map_err(|e| backend(&location, "opening the data file", e))?;
        // The files sled created on a first open must stay found.
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| backend(&location, "syncing the directory", e))?;
        Self::from_db(db, Some(file), location)
    }

    /// A store in a temporary location, removed when dropped (for tests and
    /// experiments).
    pub fn temporary() -> Result<Self> {
        let location = "<temporary>".to_owned();
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .map_err(|e| backend(&location, "open", e))?;
        Self::from_db(db, None, location)
    }

    fn from_db(db: sled::Db, file: Option<std::fs::File>, location: String) -> Result<Self> {
        let tree = |kind: Kind| {
            db.open_tree(kind.collection())
                .map_err(|e| backend(&location, "open tree", e))
        };
        Ok(SledStore {
            volumes: tree(Kind::Volume)?,
            snapshots: tree(Kind::Snapshot)?,
            nodes: tree(Kind::Node)?,
            db,
            file,
            location,
        })
    }

    fn tree(&self, kind: Kind) -> &sled::Tree {
        match kind {
            Kind::Volume => &self.volumes,
            Kind::Snapshot => &self.snapshots,
            Kind::Node => &self.nodes,
        }
    }

    fn err(&self, op: &str, e: sled::Error) -> StoreError {
        backend(&self.location, op, e)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(|e| self.err("flush", e))?;
        if let Some(file) = &self.file {
            file.sync_data()
                .map_err(|e| backend(&self.location, "syncing the data file", e))?;
        }
        Ok(())
    }

    fn get<R: Record>(&self, key: &str) -> Result<Option<Versioned<R>>> {
        check_key(R::KIND, key)?;
        let raw = self
            .tree(R::KIND)
            .get(key)
            .map_err(|e| self.err("read", e))?;
        raw.map(|raw| decode::<R>(key, &raw)).transpose()
    }

    fn put<R: Record>(&self, rec: &R, expected: Option<u64>) -> Result<u64> {
        let key = rec.key();
        check_key(R::KIND, key)?;
        let tree = self.tree(R::KIND);
        let current = tree.get(key).map_err(|e| self.err("read", e))?;
        let actual = current
            .as_ref()
            .map(|raw| decode_version(R::KIND, key, raw))
            .transpose()?;
        if actual != expected {
            return Err(StoreError::conflict(R::KIND, key, expected, actual));
        }
        let version = self
            .db
            .generate_id()
            .map_err(|e| self.err("generate version", e))?
            + 1;
        let value = serde_json::to_vec(&EnvelopeOut {
            version,
            record: rec,
        })
        .map_err(|e| StoreError::Invalid(format!("cannot encode {} {key:?}: {e}", R::KIND)))?;
        let swapped = tree
            .compare_and_swap(key, current.as_ref(), Some(value))
            .map_err(|e| self.err("write", e))?;
        if let Err(lost) = swapped {
            // Someone wrote between our read and our swap.
            let actual = lost
                .current
                .as_ref()
                .map(|raw| decode_version(R::KIND, key, raw))
                .transpose()?;
            return Err(StoreError::conflict(R::KIND, key, expected, actual));
        }
        self.flush()?;
        tracing::debug!(kind = %R::KIND, key, version, "stored");
        Ok(version)
    }

    fn delete<R: Record>(&self, key: &str, expected: Option<u64>) -> Result<()> {
        check_key(R::KIND, key)?;
        let tree = self.tree(R::KIND);
        let not_found = || StoreError::NotFound {
            kind: R::KIND,
            key: key.to_owned(),
        };
        match expected {
            None => {
                // Unconditional: also the way to clear a corrupt entry.
                tree.remove(key)
                    .map_err(|e| self.err("delete", e))?
                    .ok_or_else(not_found)?;
            }
            Some(expected_v) => {
                let current = tree
                    .get(key)
                    .map_err(|e| self.err("read", e))?
                    .ok_or_else(not_found)?;
                let actual = decode_version(R::KIND, key, &current)?;
                if actual != expected_v {
                    return Err(StoreError::conflict(R::KIND, key, expected, Some(actual)));
                }
                let swapped = tree
                    .compare_and_swap(key, Some(&current), None::<sled::IVec>)
                    .map_err(|e| self.err("delete", e))?;
                if let Err(lost) = swapped {
                    let actual = lost
                        .current
                        .as_ref()
                        .map(|raw| decode_version(R::KIND, key, raw))
                        .transpose()?;
                    return Err(StoreError::conflict(R::KIND, key, expected, actual));
                }
            }
        }
        self.flush()?;
        tracing::debug!(kind = %R::KIND, key, "deleted");
        Ok(())
    }

    fn list<R: Record>(&self) -> Result<Vec<Versioned<R>>> {
        self.tree(R::KIND)
            .iter()
            .map(|entry| {
                let (k, raw) = entry.map_err(|e| self.err("list", e))?;
                let key = String::from_utf8_lossy(&k);
                decode::<R>(&key, &raw)
            })
            .collect()
    }
}

fn backend(location: &str, op: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("sled database at {location}: {op}: {e}"))
}

fn check_key(kind: Kind, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid(format!("{kind} key is empty")));
    }
    Ok(())
}

fn corrupt(kind: Kind, key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: format!("{}/{key}", kind.collection()),
        reason: reason.into(),
    }
}

fn decode<R: Record>(key: &str, raw: &[u8]) -> Result<Versioned<R>> {
    let env: EnvelopeIn<R> = serde_json::from_slice(raw)
        .map_err(|e| corrupt(R::KIND, key, format!("undecodable JSON: {e}")))?;
    if env.record.key() != key {
        return Err(corrupt(
            R::KIND,
            key,
            format!("the record inside says its id is {:?}", env.record.key()),
        ));
    }
    Ok(Versioned {
        version: env.version,
        value: env.record,
    })
}

fn decode_version(kind: Kind, key: &str, raw: &[u8]) -> Result<u64> {
    let v: VersionOnly = serde_json::from_slice(raw)
        .map_err(|e| corrupt(kind, key, format!("no readable version: {e}")))?;
    Ok(v.version)
}

super::store_by_kind!(SledStore);

#[cfg(test)]
mod tests;
