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
//! The code is split by concern, each file an `impl Store` block: `data`
//! (read, write, unmap, flush), `snapshot` (snapshot, delete/merge, revert,
//! expand), `sync` (what resyncs and rebuilds call) and `scrub`; this file
//! holds the types, opening, metadata, fencing and status.
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

mod data;
mod scrub;
mod snapshot;
mod sync;

/// Largest single I/O the store accepts.
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Blocks moved per step of a merge or layer read.
const COPY_STEP_BLOCKS: u64 = 256;
/// Chunks of [`COPY_STEP_BLOCKS`] a scrub reads at once.
const SCRUB_DEPTH: usize = 4;
/// Corrupt blocks a [`ScrubReport`] lists (all are counted).
const SCRUB_LIST_MAX: usize = 1000;
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

/// What [`Store::scrub`] found.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    /// Blocks read and checked, over every layer.
    pub blocks_checked: u64,
    /// Blocks that did not match their stored CRC.
    pub corrupt_blocks: u64,
    /// The first of them (at most 1000): layer name ("" is the head), block.
    pub corrupt: Vec<(String, u64)>,
}

/// Summary of a layer for [`ReplicaStatus`].
#[derive(Clone, Debug)]
pub struct LayerStatus {
    /// Snapshot name, "" for the head.
    pub name: String,
    /// The writable head.
    pub head: bool,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Blocks held.
    pub present_blocks: u64,
    /// Created by a user.
    pub user_created: bool,
    /// Creation time (Unix seconds).
    pub created_unix: i64,
}

/// A snapshot of the replica's state.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    /// Replica id.
    pub id: String,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Oldest first; the last is the head.
    pub chain: Vec<LayerStatus>,
    /// Current epoch.
    pub epoch: u64,
    /// Highest revision of a completed write.
    pub revision: u64,
    /// The previous run stopped cleanly.
    pub clean: bool,
    /// Ejected peer ids.
    pub ejected: Vec<String>,
    /// I/O backend.
    pub io_engine: EngineKind,
    /// A sync into this replica is in progress.
    pub syncing: bool,
    /// Heap bytes of all extent indexes.
    pub extent_index_bytes: u64,
    /// An engine opened the replica and has not closed it cleanly.
    pub attached: bool,
    /// When the last complete scrub that found nothing corrupt finished
    /// (Unix seconds), 0 if none has.
    pub last_clean_scrub_unix: i64,
    /// The data-stream session the last `Open` started.
    pub session: u64,
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
    write_order: Arc<WriteOrder>,
    sessions: Sessions,
}

/// Parameters to open or create a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Replica directory.
    pub dir: PathBuf,
    /// Size; required to create, must match when given for an existing replica.
    pub size: Option<u64>,
    /// Block size for a new replica.
    pub block_size: u32,
    /// I/O backend.
    pub io_engine: EngineKind,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How long a scrub that has read `done` bytes in `elapsed` must pause to
/// average no more than `rate` bytes per second; `None` when it need not
/// (or `rate` is 0, no limit).
fn pace(done: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
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
    /// Opens the replica in `opts.dir`, creating it when the directory is
    /// missing or empty.
    pub fn open(opts: OpenOptions) -> Result<Store> {
        let dir = opts.dir.clone();
        let bs = opts.block_size;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(StoreError::InvalidArgument(format!(
                "block size {bs} is invalid: use a power of two from 512 to 65536"
            )));
        }
        let meta_path = dir.join("meta");
        let exists = meta_path.exists();
        if !exists {
            if let Ok(mut rd) = std::fs::read_dir(&dir)
                && rd.next().is_some()
            {
                return Err(StoreError::FailedPrecondition(format!(
                    "{} is not empty and holds no replica (no meta/ directory); \
                     refusing to use it. Point --dir at an empty or new directory",
                    dir.display()
                )));
            }
            if opts.size.is_none() {
                return Err(StoreError::InvalidArgument(format!(
                    "{} holds no replica yet: --size is required to create one",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(dir.join("layers"))
            .map_err(io_err(format!("creating {}", dir.join("layers").display())))?;
        let meta_store: Arc<dyn MetaStore> = Arc::new(SledMeta::open(&meta_path)?);
        let io = IoEngine::start(opts.io_engine).map_err(io_err("starting the I/O backend"))?;

        let (mut meta, entries) = match meta_store.load()? {
            None => {
                let size = opts.size.unwrap_or(0);
                if size == 0 || !size.is_multiple_of(bs as u64) {
                    return Err(StoreError::InvalidArgument(format!(
                        "size {size} is invalid: it must be a non-zero multiple of the block size {bs}"
                    )));
                }
                let head =
                    Layer::create(&dir, 0, size, bs).map_err(io_err("creating the head layer"))?;
                let lm = LayerMeta {
                    id: 0,
                    name: String::new(),
                    user_created: false,
                    created_unix: now_unix(),
                };
                let meta = Meta {
                    format: FORMAT,
                    id: uuid::Uuid::new_v4().to_string(),
                    size,
                    block_size: bs,
                    chain: vec![lm.clone()],
                    epoch: 0,
                    revision: 0,
                    clean: true,
                    ejected: vec![],
                    next_layer_id: 1,
                    syncing: false,
                    merging: None,
                    attached: false,
                    last_clean_scrub_unix: 0,
                    session: 0,
                };
                meta_store.save(&meta)?;
                (
                    meta,
                    vec![Entry {
                        meta: lm,
                        layer: Arc::new(head),
                    }],
                )
            }
            Some(meta) => {
                if let Some(size) = opts.size
                    && size != meta.size
                {
                    return Err(StoreError::InvalidArgument(format!(
                        "{} holds a replica of {} bytes; --size {size} does not match (omit --size or pass {})",
                        dir.display(),
                        meta.size,
                        meta.size
                    )));
                }
                let mut entries = Vec::with_capacity(meta.chain.len());
                for lm in &meta.chain {
                    let layer =
                        Layer::open(&dir, lm.id, meta.size, meta.block_size).map_err(|e| {
                            StoreError::FailedPrecondition(format!(
                                "replica in {} is damaged: {e}",
                                dir.display()
                            ))
                        })?;
                    entries.push(Entry {
                        meta: lm.clone(),
                        layer: Arc::new(layer),
                    });
                }
                (meta, entries)
            }
        };
        remove_orphans(&dir, &meta);

        let was_clean = meta.clean;
        if !was_clean {
            // Writes that were not flushed may have reached the data file and
            // not the CRC file (or the reverse): recompute what may be stale.
            let mut suspects = vec![entries[entries.len() - 1].layer.clone()];
            if let Some(m) = &meta.merging
                && let Some(e) = entries.iter().find(|e| e.meta.id == m.into)
            {
                suspects.push(e.layer.clone());
            }
            for layer in suspects {
                let n = layer
                    .recompute_crcs(meta.block_size)
                    .map_err(io_err("recomputing CRCs after an unclean stop"))?;
                tracing::info!(
                    layer = layer.id,
                    blocks = n,
                    "recomputed CRCs after an unclean stop"
                );
            }
        }
        meta.clean = false;
        meta_store.save(&meta)?;

        let chain = Chain {
            entries,
            size: meta.size,
            syncing: meta.syncing,
            sync_head: false,
        };
        Ok(Store {
            dir,
            block_size: meta.block_size,
            io,
            meta_store,
            epoch: AtomicU64::new(meta.epoch),
            revision: AtomicU64::new(meta.revision),
            sessions: Sessions::new(meta.session),
            meta: Mutex::new(meta),
            chain: RwLock::new(chain),
            control: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            dirty: Mutex::new(HashMap::new()),
            was_clean,
            streams: AtomicUsize::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            write_order: Arc::default(),
        })
    }

    /// The block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The I/O backend in use.
    pub fn io_engine(&self) -> EngineKind {
        self.io.kind()
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the metadata record and saves it durably (on a
    /// blocking thread: sled's flush is synchronous).
    async fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<()> {
        self.update_meta_with(f, true).await
    }

    /// [`Store::update_meta`], or with `durable` false,
    /// [`MetaStore::save_unsynced`].
    async fn update_meta_with(&self, f: impl FnOnce(&mut Meta), durable: bool) -> Result<()> {
        let snapshot = {
            let mut m = self.meta();
            f(&mut m);
            m.clone()
        };
        let store = self.meta_store.clone();
        tokio::task::spawn_blocking(move || {
            if durable {
                store.save(&snapshot)
            } else {
                store.save_unsynced(&snapshot)
            }
        })
        .await
        .map_err(|e| StoreError::Io {
            context: "saving metadata".into(),
            source: io::Error::other(e.to_string()),
        })??;
        Ok(())
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::FailedPrecondition(
                "the replica is shutting down; reconnect when it is back".into(),
            ));
        }
        let current = self.epoch.load(Ordering::Acquire);
        if epoch < current {
            Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            })
        } else if epoch > current || current == 0 {
            Err(StoreError::NotOpen {
                got: epoch,
                current,
            })
        } else {
            Ok(())
        }
    }

    fn check_range(&self, chain: &Chain, offset: u64, len: u64) -> Result<()> {
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(StoreError::InvalidArgument(format!(
                "offset {offset} and length {len} must be multiples of the block size {bs}"
            )));
        }
        if len == 0 || len > MAX_IO_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "length {len} must be between {bs} and {MAX_IO_BYTES} bytes"
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > chain.size) {
            return Err(StoreError::OutOfRange {
                offset,
                len,
                size: chain.size,
            });
        }
        Ok(())
    }

    /// Takes `epoch` (persisted before returning) and starts a new
    /// data-stream session: once this returns, no request of an older
    /// session's stream is executing or will be applied. Lower epochs are
    /// refused.
    pub async fn open_epoch(&self, epoch: u64) -> Result<ReplicaStatus> {
        let _c = self.control.lock().await;
        let current = self.epoch.load(Ordering::Acquire);
        if epoch == 0 {
            return Err(StoreError::InvalidArgument(
                "epoch must be at least 1".into(),
            ));
        }
        if epoch < current {
            return Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            });
        }
        let session = self.meta().session.max(self.sessions.current()) + 1;
        self.sessions.supersede(session).await;
        self.update_meta(|m| {
            m.epoch = epoch;
            m.attached = true;
            m.session = session;
        })
        .await?;
        self.epoch.store(epoch, Ordering::Release);
        drop(_c);
        Ok(self.status().await)
    }

    /// Clean detach of the engine holding `epoch`: flushes every layer and
    /// records that no write of that engine is outstanding.
    pub async fn close(&self, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.flush_all(true).await?;
        self.update_meta(|m| m.attached = false).await?;
        drop(_c);
        Ok(self.status().await)
    }

    /// Admits one data-stream request of `session` and `epoch` (see
    /// [`crate::session`]): hold the guard until the request is done. A
    /// stale or unopened epoch is refused as such first.
    pub fn enter_session(&self, session: u64, epoch: u64) -> Result<SessionGuard<'_>> {
        self.check_epoch(epoch)?;
        Ok(self.sessions.enter(session)?)
    }

    /// Sees every change of the current session (a stream ends itself once
    /// a later `Open` superseded it).
    pub fn watch_session(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sessions.watch()
    }

    /// Registers an open data stream; revert is refused while any is open.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    fn mark_dirty(&self, layer: &Arc<Layer>) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        d.entry(layer.id).or_insert_with(|| layer.clone());
    }

    /// Replaces the recorded set of ejected peers.
    pub async fn set_ejected(&self, ejected: Vec<String>, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.update_meta(|m| m.ejected = ejected).await?;
        drop(_c);
        Ok(self.status().await)
    }

    /// The replica's state.
    pub async fn status(&self) -> ReplicaStatus {
        let chain = self.chain.read().await;
        let meta = self.meta().clone();
        let entries = &chain.entries;
        ReplicaStatus {
            id: meta.id,
            size: chain.size,
            block_size: self.block_size,
            chain: entries
                .iter()
                .enumerate()
                .map(|(i, e)| LayerStatus {
                    head: i == entries.len() - 1,
                    ..layer_status(e)
                })
                .collect(),
            epoch: self.epoch.load(Ordering::Acquire),
            revision: self.revision.load(Ordering::Acquire),
            clean: self.was_clean,
            ejected: meta.ejected,
            io_engine: self.io.kind(),
            syncing: chain.syncing,
            extent_index_bytes: entries
                .iter()
                .map(|e| e.layer.index().memory_bytes() as u64)
                .sum(),
            attached: meta.attached,
            last_clean_scrub_unix: meta.last_clean_scrub_unix,
            session: meta.session,
        }
    }

    /// Stops accepting I/O, waits for the I/O in flight, flushes every
    /// layer and marks the replica cleanly stopped. Clients need not have
    /// disconnected: whatever they send afterwards is refused.
    pub async fn shutdown(&self) -> Result<()> {
        let _c = self.control.lock().await;
        self.closed.store(true, Ordering::Release);
        // The exclusive lock waits for every I/O that passed the check.
        let chain = self.chain.write().await;
        let layers: Vec<Arc<Layer>> = chain.entries.iter().map(|e| e.layer.clone()).collect();
        self.sync_layers(&layers).await?;
        let rev = self.revision.load(Ordering::Acquire);
        self.update_meta(|m| {
            m.clean = true;
            m.revision = m.revision.max(rev);
        })
        .await?;
        drop(chain);
        Ok(())
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Counts an open data stream while alive.
pub struct StreamGuard(Arc<Store>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
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

/// Sorts-merged, overlapping or touching runs collapse into one.
fn merge_runs(runs: &mut Vec<(u64, u64)>) {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for &(s, e) in runs.iter() {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *runs = out;
}

/// The parts of `[from, to)` not covered by the sorted runs `held`.
fn gaps(from: u64, to: u64, held: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = from;
    for &(s, e) in held {
        if pos < s {
            out.push((pos, s));
        }
        pos = pos.max(e);
    }
    if pos < to {
        out.push((pos, to));
    }
    out
}

fn remove_orphans(dir: &Path, meta: &Meta) {
    let Ok(rd) = std::fs::read_dir(dir.join("layers")) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
        if let Some(id) = id
            && !meta.chain.iter().any(|l| l.id == id)
        {
            tracing::info!(file = %name, "removing a layer file no chain refers to (left by an interrupted operation)");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
