//! The replica store: a chain of layers with a writable head.
//!
//! Reads resolve every block to the newest layer that holds it (blocks no
//! layer holds read as zeros). Writes go to the head. A snapshot freezes the
//! head under a name and starts a new, empty head. Deleting a snapshot merges
//! its blocks into its child (only blocks the child does not hold) and drops
//! it. Reverting drops every layer above a snapshot.
//!
//! Locking: the chain sits behind an async `RwLock`. Every I/O holds it shared
//! for its whole duration; operations that change the chain (snapshot,
//! revert, expand, prepare-sync, and each chunk of a merge into the head) take
//! it exclusively, which waits for in-flight I/O to finish. Control operations
//! are serialized by a separate mutex so a long merge never holds the chain
//! lock for longer than one chunk.
//!
//! The code is split by concern, each file an `impl Store` block: `open`
//! (open, recover, shut down), `fencing` (epochs, `Open`/`Close`, sessions),
//! `status`, `data` (read, write, unmap, flush), `snapshot` (snapshot,
//! delete/merge, revert, expand), `sync` (what resyncs and rebuilds call)
//! and `scrub`; this file holds the chain, the errors and the metadata record.
//!
//! Invariant: a write is acknowledged only after its data and CRC entries
//! were written and its blocks are in the head's index; a flush returns only
//! after every layer written before it started is fdatasync'ed.
//!
//! Invariant: a read returns only blocks that match the CRC their layer
//! stored for them ([`Store::read_verified`]); overlapping writes and unmaps
//! run in the order of their tickets ([`crate::order`]), so a block's data
//! and CRC entry always come from the same write.
//!
//! Invariant: an unmapped block of the head reads as zeros even when an older
//! layer holds it (the head then stores explicit zeros instead of a hole),
//! and while a sync is in progress (older layers not yet trustworthy) unmap
//! always stores zeros.
//!
//! Invariant (fencing): every data and mutating control operation carries the
//! epoch of the engine that sends it; a lower epoch than the one persisted by
//! [`Store::open_epoch`] is rejected, so a replaced engine cannot change data.
//! Within one epoch, every `Open` also starts a new data-stream session
//! ([`crate::session`]), so the streams of an earlier attachment of the same
//! engine cannot either.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{RwLock, mpsc};

use crate::buf::AlignedBuf;
use crate::io::{Completion, EngineKind, IoEngine, Op};
use crate::layer::{Layer, block_crcs, block_crcs_and_total};
use crate::meta::{FORMAT, LayerMeta, MergeMeta, Meta, MetaError, MetaStore, SledMeta};
use crate::order::{Ticket, WriteOrder};
use crate::session::{SessionGuard, Sessions, Superseded};
use crate::writeback::WriteBackAhead;

mod data;
mod fencing;
mod open;
mod scrub;
mod snapshot;
mod status;
mod sync;

pub use data::Placement;
pub use fencing::StreamGuard;
pub use open::OpenOptions;
pub use scrub::ScrubReport;
pub use status::{LayerStatus, ReplicaStatus};

/// Largest single I/O the store accepts.
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Blocks moved per step of a merge or layer read.
const COPY_STEP_BLOCKS: u64 = 256;
/// Bytes of one `ReadLayer` stream being read at once; the number of reads
/// in flight is this over the largest chunk, within `READ_LAYER_DEPTH`.
const READ_LAYER_BYTES: u64 = 16 << 20;
/// Fewest and most reads of one `ReadLayer` stream in flight.
const READ_LAYER_DEPTH: (u64, u64) = (4, 64);

/// Errors of store operations; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request beyond the end of the volume.
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A block read from disk does not match its stored checksum.
    #[error(
        "block {block} of {} does not match its stored checksum (stored {stored:#010x}, read {actual:#010x}): the data on this replica's disk is corrupt; the volume's other replicas hold good copies, and rebuilding this replica rewrites the block",
        layer_label(layer)
    )]
    Corrupt {
        /// Layer name ("" is the head).
        layer: String,
        /// Block number.
        block: u64,
        /// CRC in the layer's CRC file.
        stored: u32,
        /// CRC of the data read.
        actual: u32,
    },
    /// The payload does not match its checksum; nothing was written.
    #[error(
        "payload crc32 {actual:#010x} does not match the request's {expected:#010x}; nothing was written"
    )]
    CrcMismatch {
        /// CRC the request carried.
        expected: u32,
        /// CRC of the payload received.
        actual: u32,
    },
    /// The request's epoch is older than the replica's.
    #[error(
        "stale epoch {got}: this replica was opened with epoch {current} by a newer engine; this engine has been fenced off"
    )]
    StaleEpoch {
        /// Epoch carried by the request.
        got: u64,
        /// The replica's epoch.
        current: u64,
    },
    /// The request's data stream belongs to a superseded session.
    #[error(transparent)]
    StaleSession(#[from] Superseded),
    /// The request's epoch was never opened.
    #[error(
        "epoch {got} was not opened on this replica (current epoch {current}); call Open first"
    )]
    NotOpen {
        /// Epoch carried by the request.
        got: u64,
        /// The replica's epoch.
        current: u64,
    },
    /// The filesystem under the replica is full.
    #[error("no space left on the replica's disk while {0}; existing data is intact")]
    NoSpace(String),
    /// No layer of that name.
    #[error("{0}")]
    NotFound(String),
    /// A layer of that name exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The replica is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A metadata store error.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The present blocks of `layer` inside the block ranges `ranges`, as
/// chunks `(first block, count)` of at most [`COPY_STEP_BLOCKS`].
fn present_chunks(layer: &Layer, ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    ranges
        .into_iter()
        .flat_map(|(from, to)| layer.index().runs(from, to))
        .flat_map(|(s, e)| {
            (s..e)
                .step_by(COPY_STEP_BLOCKS as usize)
                .map(move |b| (b, COPY_STEP_BLOCKS.min(e - b)))
        })
        .collect()
}

/// How [`StoreError::Corrupt`] names a layer ("" is the head).
fn layer_label(name: &str) -> String {
    if name.is_empty() {
        "the head layer".to_owned()
    } else {
        format!("layer {name:?}")
    }
}

/// Checks the blocks of `data` (starting at block `first` of `layer`,
/// named `name`) against the layer's stored CRCs ([`Layer::check_crcs`]);
/// returns the crc32 of all of `data`.
fn verify_stored_crcs(layer: &Layer, name: &str, first: u64, data: &[u8], bs: u64) -> Result<u32> {
    layer
        .check_crcs(first, data, bs as usize)
        .map_err(|m| StoreError::Corrupt {
            layer: name.to_owned(),
            block: m.block,
            stored: m.stored,
            actual: m.actual,
        })
}

/// [`io_err`] with the context built only on failure (for the data path,
/// where formatting a string per request would cost more than the request).
fn io_err_with(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| io_err(context())(source)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace(context)
        } else {
            StoreError::Io { context, source }
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    meta: LayerMeta,
    layer: Arc<Layer>,
}

#[derive(Debug)]
struct Chain {
    /// Oldest first; the last entry is the head.
    entries: Vec<Entry>,
    size: u64,
    syncing: bool,
    sync_head: bool,
}

impl Chain {
    fn head(&self) -> &Arc<Layer> {
        &self.entries[self.entries.len() - 1].layer
    }

    fn frozen(&self) -> &[Entry] {
        &self.entries[..self.entries.len() - 1]
    }

    fn find_frozen(&self, name: &str) -> Option<usize> {
        self.frozen().iter().position(|e| e.meta.name == name)
    }

    /// A layer by name; "" is the head.
    fn layer(&self, name: &str) -> Result<&Arc<Layer>> {
        if name.is_empty() {
            return Ok(self.head());
        }
        self.find_frozen(name)
            .map(|i| &self.entries[i].layer)
            .ok_or_else(|| {
                StoreError::NotFound(format!("no snapshot named {name:?} on this replica"))
            })
    }

    /// Splits `[first, end)` into runs served by a layer (`Some(i)`) or zeros.
    fn resolve(
        &self,
        level: usize,
        first: u64,
        end: u64,
        out: &mut Vec<(Option<usize>, u64, u64)>,
    ) {
        let runs = self.entries[level].layer.index().runs(first, end);
        let mut pos = first;
        for (s, e) in runs {
            if pos < s {
                self.resolve_below(level, pos, s, out);
            }
            out.push((Some(level), s, e));
            pos = e;
        }
        if pos < end {
            self.resolve_below(level, pos, end, out);
        }
    }

    fn resolve_below(
        &self,
        level: usize,
        first: u64,
        end: u64,
        out: &mut Vec<(Option<usize>, u64, u64)>,
    ) {
        if level == 0 {
            out.push((None, first, end));
        } else {
            self.resolve(level - 1, first, end, out);
        }
    }
}

/// The replica's storage.
pub struct Store {
    dir: PathBuf,
    block_size: u32,
    io: IoEngine,
    meta_store: Arc<dyn MetaStore>,
    meta: Mutex<Meta>,
    chain: RwLock<Chain>,
    control: tokio::sync::Mutex<()>,
    flush_lock: tokio::sync::Mutex<()>,
    dirty: Mutex<HashMap<u64, Arc<Layer>>>,
    epoch: AtomicU64,
    revision: AtomicU64,
    was_clean: bool,
    streams: AtomicUsize,
    closed: std::sync::atomic::AtomicBool,
    /// A cache flush of the disk failed (see [`Store::sync_layers`]): until
    /// a restart, which recomputes every CRC, the replica serves nothing.
    sync_failed: std::sync::atomic::AtomicBool,
    write_order: Arc<WriteOrder>,
    sessions: Sessions,
    /// When a write starts its CRC pages' write-back ahead of the FLUSH.
    ahead: WriteBackAhead,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks a snapshot name given by a client.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(format!(
            "invalid snapshot name {name:?}: use 1-128 characters from A-Z a-z 0-9 - _ ."
        )))
    }
}

impl Store {
    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the metadata record and saves it durably (on a
    /// blocking thread: sled's flush is synchronous).
    async fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<()> {
        let snapshot = {
            let mut m = self.meta();
            // Every save carries the revision of the writes completed so far.
            m.revision = m.revision.max(self.revision.load(Ordering::Acquire));
            f(&mut m);
            m.clone()
        };
        let store = self.meta_store.clone();
        tokio::task::spawn_blocking(move || store.save(&snapshot))
            .await
            .map_err(|e| StoreError::Io {
                context: "saving metadata".into(),
                source: io::Error::other(e.to_string()),
            })??;
        Ok(())
    }
}

fn layer_status(e: &Entry) -> LayerStatus {
    LayerStatus {
        name: e.meta.name.clone(),
        head: false,
        allocated_bytes: e.layer.allocated_bytes(),
        present_blocks: e.layer.index().present(),
        user_created: e.meta.user_created,
        created_unix: e.meta.created_unix,
    }
}
