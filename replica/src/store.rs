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

use crate::io::{Completion, EngineKind, IoEngine, Op};
use crate::layer::{Layer, block_crcs, block_crcs_and_total};
use crate::meta::{FORMAT, LayerMeta, MergeMeta, Meta, MetaError, MetaStore, SledMeta};
use crate::order::{Ticket, WriteOrder};
use crate::session::{SessionGuard, Sessions, Superseded};
use crate::uring::AlignedBuf;

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

    /// Writes `payload` at `offset` into the head.
    pub async fn write(
        &self,
        offset: u64,
        payload: Bytes,
        crc: u32,
        epoch: u64,
        revision: u64,
    ) -> Result<()> {
        let ticket = self.ticket(offset, payload.len() as u64);
        self.write_aligned(
            ticket,
            offset,
            AlignedBuf::copy_from(&payload),
            crc,
            epoch,
            revision,
        )
        .await
    }

    /// A place in the order of writes and unmaps for the bytes `[offset,
    /// offset + len)` (see [`crate::order`]): the data stream takes one for
    /// each request as it arrives, so overlapping requests apply in the
    /// order they were sent.
    pub fn ticket(&self, offset: u64, len: u64) -> Ticket {
        self.write_order.ticket(offset, len)
    }

    /// [`Self::write`] of a payload already in an aligned buffer (the data
    /// stream copies it there straight from the received frames), once every
    /// earlier overlapping `ticket` is done.
    pub async fn write_aligned(
        &self,
        ticket: Ticket,
        offset: u64,
        payload: AlignedBuf,
        crc: u32,
        epoch: u64,
        revision: u64,
    ) -> Result<()> {
        self.check_epoch(epoch)?;
        let (crcs, actual) = block_crcs_and_total(payload.as_slice(), self.block_size as usize);
        if actual != crc {
            return Err(StoreError::CrcMismatch {
                expected: crc,
                actual,
            });
        }
        ticket.ready().await;
        let chain = self.chain.read().await;
        self.check_range(&chain, offset, payload.len() as u64)?;
        let head = chain.head().clone();
        self.write_blocks_with_crcs(&head, offset, payload, crcs)
            .await?;
        self.revision.fetch_max(revision, Ordering::AcqRel);
        Ok(())
    }

    /// Writes whole blocks into `layer` (data, then CRCs, then the index).
    async fn write_layer_blocks(&self, layer: &Arc<Layer>, offset: u64, data: &[u8]) -> Result<()> {
        let crcs = block_crcs(data, self.block_size as usize);
        self.write_blocks_with_crcs(layer, offset, AlignedBuf::copy_from(data), crcs)
            .await
    }

    /// [`Self::write_layer_blocks`] with the CRC-file bytes of `data` already
    /// computed. The data write goes to the I/O backend; while it runs, the
    /// CRC entries are stored into the layer's mapped CRC file (see `layer`'s
    /// docs for why not through io_uring). Both have finished before the
    /// index is updated, so the durability invariant is unchanged.
    async fn write_blocks_with_crcs(
        &self,
        layer: &Arc<Layer>,
        offset: u64,
        data: AlignedBuf,
        crcs: Vec<u8>,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let first = offset / bs;
        let len = data.len() as u64;
        let context = || format!("writing {len} bytes at {offset}");
        let pending = self.io.submit([Op::Write {
            file: layer.data.clone(),
            offset,
            buf: data,
        }]);
        let crc_written = layer.store_crcs(first, &crcs);
        // Wait for the data write even when the CRC write failed.
        IoEngine::wait(pending)
            .await
            .map_err(io_err_with(context))?;
        crc_written.map_err(io_err_with(context))?;
        layer.index_mut().insert(first, len / bs);
        self.mark_dirty(layer);
        Ok(())
    }

    /// Reads `len` bytes at `offset` through the chain.
    pub async fn read(&self, offset: u64, len: u64, epoch: u64) -> Result<Bytes> {
        self.read_verified(offset, len, epoch)
            .await
            .map(|(data, _)| data)
    }

    /// [`Self::read`], also returning the crc32 of the data (for the reply).
    ///
    /// Every block read from disk is checked against the CRC its layer
    /// stored when it was written; blocks no layer holds read as zeros
    /// without disk I/O. A read that overlaps a write of the same block may
    /// see the new data beside the old CRC (or a mix of old and new data),
    /// so a mismatch is not believed at once: the read is done again with
    /// the chain held exclusively, when no write is in flight. If the block
    /// still does not match, this disk corrupted it: the read fails with
    /// [`StoreError::Corrupt`] and the block's CRC entry is invalidated
    /// ([`Self::invalidate_crc`]).
    pub async fn read_verified(&self, offset: u64, len: u64, epoch: u64) -> Result<(Bytes, u32)> {
        self.check_epoch(epoch)?;
        {
            let chain = self.chain.read().await;
            self.check_range(&chain, offset, len)?;
            match self.read_chain(&chain, offset, len).await {
                Err(StoreError::Corrupt { .. }) => {}
                done => return done,
            }
        }
        let chain = self.chain.write().await;
        match self.read_chain(&chain, offset, len).await {
            Err(e @ StoreError::Corrupt { .. }) => {
                if let StoreError::Corrupt {
                    layer,
                    block,
                    actual,
                    ..
                } = &e
                    && let Some(entry) = chain.entries.iter().find(|x| x.meta.name == *layer)
                {
                    self.invalidate_crc(&entry.layer, *block, *actual);
                }
                tracing::error!(error = %e, offset, len, "a read found corrupt data on disk");
                Err(e)
            }
            done => {
                if done.is_ok() {
                    tracing::debug!(
                        offset,
                        len,
                        "a checksum mismatch went away once no write was in flight"
                    );
                }
                done
            }
        }
    }

    /// The reads of [`Self::read_verified`] under a chain guard.
    async fn read_chain(&self, chain: &Chain, offset: u64, len: u64) -> Result<(Bytes, u32)> {
        let bs = self.block_size as u64;
        let (first, end) = (offset / bs, (offset + len) / bs);
        let mut runs = Vec::new();
        chain.resolve(chain.entries.len() - 1, first, end, &mut runs);
        let no_buffer = || StoreError::Io {
            context: "reading".into(),
            source: io::Error::other("backend returned no buffer"),
        };
        if let [(Some(level), _, _)] = runs[..] {
            let entry = &chain.entries[level];
            let buf = self
                .read_blocks_with(&entry.layer, first, end - first, || {
                    format!("reading {len} bytes at {offset}")
                })
                .await?;
            let crc =
                verify_stored_crcs(&entry.layer, &entry.meta.name, first, buf.as_slice(), bs)?;
            return Ok((buf.into_bytes(), crc));
        }
        let mut out = vec![0u8; len as usize];
        let mut placed = Vec::new();
        let ops: Vec<Op> = runs
            .iter()
            .filter_map(|&(level, s, e)| {
                let level = level?;
                placed.push((level, s));
                Some(Op::Read {
                    file: chain.entries[level].layer.data.clone(),
                    offset: s * bs,
                    buf: AlignedBuf::for_read(((e - s) * bs) as usize),
                })
            })
            .collect();
        if !ops.is_empty() {
            let done = self
                .io
                .run(ops)
                .await
                .map_err(io_err_with(|| format!("reading {len} bytes at {offset}")))?;
            for (c, (level, s)) in done.into_iter().zip(placed) {
                let Completion::Read(buf) = c else {
                    return Err(no_buffer());
                };
                let entry = &chain.entries[level];
                verify_stored_crcs(&entry.layer, &entry.meta.name, s, buf.as_slice(), bs)?;
                let at = ((s - first) * bs) as usize;
                out[at..at + buf.len()].copy_from_slice(buf.as_slice());
            }
        }
        let crc = crc32fast::hash(&out);
        Ok((Bytes::from(out), crc))
    }

    /// Records that block `block` of `layer` holds data that does not match
    /// its CRC entry: the entry becomes the complement of the CRC of the data
    /// found. That data can never match it, so the block keeps failing reads
    /// instead of being served, and it differs from the entry the volume's
    /// healthy replicas hold, so the next resync of this replica (a CRC diff)
    /// copies the block. Durable with the layer's next flush.
    fn invalidate_crc(&self, layer: &Arc<Layer>, block: u64, actual: u32) {
        if let Err(e) = layer.store_crcs(block, &(!actual).to_le_bytes()) {
            tracing::warn!(error = %e, block, "could not invalidate a corrupt block's CRC entry");
        }
        self.mark_dirty(layer);
    }

    /// Deallocates `[offset, offset + len)`: it reads back as zeros.
    pub async fn unmap(&self, offset: u64, len: u64, epoch: u64) -> Result<()> {
        let ticket = self.ticket(offset, len);
        self.unmap_in_order(ticket, offset, len, epoch).await
    }

    /// [`Self::unmap`] once every earlier overlapping `ticket` is done.
    pub async fn unmap_in_order(
        &self,
        ticket: Ticket,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<()> {
        self.check_epoch(epoch)?;
        ticket.ready().await;
        let chain = self.chain.read().await;
        self.check_range(&chain, offset, len)?;
        let bs = self.block_size as u64;
        let (first, end) = (offset / bs, (offset + len) / bs);
        let head = chain.head().clone();
        // Blocks an older layer holds must be covered by explicit zeros.
        let mut zero_runs: Vec<(u64, u64)> = if chain.syncing {
            vec![(first, end)]
        } else {
            let mut all: Vec<(u64, u64)> = chain
                .frozen()
                .iter()
                .flat_map(|e| e.layer.index().runs(first, end))
                .collect();
            all.sort_unstable();
            all
        };
        merge_runs(&mut zero_runs);
        head.punch(offset, len).map_err(io_err_with(|| {
            format!("deallocating {len} bytes at {offset}")
        }))?;
        head.index_mut().remove(first, end - first);
        for (s, e) in zero_runs {
            let mut b = s;
            while b < e {
                let n = COPY_STEP_BLOCKS.min(e - b);
                let zeros = vec![0u8; (n * bs) as usize];
                self.write_layer_blocks(&head, b * bs, &zeros).await?;
                b += n;
            }
        }
        self.mark_dirty(&head);
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn flush(&self, epoch: u64) -> Result<()> {
        self.check_epoch(epoch)?;
        self.flush_all(false).await
    }

    async fn flush_all(&self, every_layer: bool) -> Result<()> {
        // Serialized: a flush that finds nothing dirty must still wait for
        // the fsyncs of a flush already running.
        let _f = self.flush_lock.lock().await;
        let layers: Vec<Arc<Layer>> = if every_layer {
            self.chain
                .read()
                .await
                .entries
                .iter()
                .map(|e| e.layer.clone())
                .collect()
        } else {
            let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            d.drain().map(|(_, l)| l).collect()
        };
        self.sync_layers(&layers).await?;
        // The revision only ranks replicas at crash recovery, and one
        // recorded too low is harmless (the replica is resynced from a
        // fresher one, which holds every flushed write too): so it is
        // written without a second cache flush of the disk per FLUSH.
        // The next durable save (at the latest, the clean close) carries it.
        let rev = self.revision.load(Ordering::Acquire);
        if rev > self.meta().revision {
            self.update_meta_with(|m| m.revision = m.revision.max(rev), false)
                .await?;
        }
        Ok(())
    }

    /// fdatasyncs the data and CRC files of `layers`; on failure they stay
    /// dirty so the next flush tries again.
    async fn sync_layers(&self, layers: &[Arc<Layer>]) -> Result<()> {
        let ops = layers.iter().flat_map(|l| {
            [
                Op::Fsync {
                    file: l.data.clone(),
                },
                Op::Fsync {
                    file: l.crc.clone(),
                },
            ]
        });
        if let Err(e) = self.io.run(ops).await {
            for l in layers {
                self.mark_dirty(l);
            }
            return Err(io_err("syncing layer files")(e));
        }
        Ok(())
    }

    /// Freezes the head as snapshot `name` and starts a new head.
    pub async fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        epoch: u64,
    ) -> Result<ReplicaStatus> {
        validate_name(name)?;
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        {
            let mut chain = self.chain.write().await;
            if chain.find_frozen(name).is_some() {
                return Err(StoreError::AlreadyExists(format!(
                    "a snapshot named {name:?} already exists on this replica"
                )));
            }
            let head = chain.head().clone();
            self.io
                .run([
                    Op::Fsync {
                        file: head.data.clone(),
                    },
                    Op::Fsync {
                        file: head.crc.clone(),
                    },
                ])
                .await
                .map_err(io_err("syncing the head before freezing it"))?;
            let id = self.meta().next_layer_id;
            let layer = Layer::create(&self.dir, id, chain.size, self.block_size)
                .map_err(io_err("creating a new head layer"))?;
            let new_head = LayerMeta {
                id,
                name: String::new(),
                user_created: false,
                created_unix: now_unix(),
            };
            let frozen = LayerMeta {
                name: name.to_owned(),
                user_created,
                created_unix: now_unix(),
                ..chain.entries[chain.entries.len() - 1].meta.clone()
            };
            let (f2, h2) = (frozen.clone(), new_head.clone());
            let saved = self
                .update_meta(move |m| {
                    m.next_layer_id = id + 1;
                    if let Some(last) = m.chain.last_mut() {
                        *last = f2;
                    }
                    m.chain.push(h2);
                })
                .await;
            if let Err(e) = saved {
                Layer::remove_files(&self.dir, id);
                return Err(e);
            }
            let last = chain.entries.len() - 1;
            chain.entries[last].meta = frozen;
            chain.entries.push(Entry {
                meta: new_head,
                layer: Arc::new(layer),
            });
        }
        Ok(self.status().await)
    }

    /// Frozen layers, oldest first.
    pub async fn snapshots(&self) -> Vec<LayerStatus> {
        let chain = self.chain.read().await;
        chain.frozen().iter().map(layer_status).collect()
    }

    /// Deletes snapshot `name`, merging its blocks into its child. I/O keeps
    /// flowing; when the child is the head, each chunk briefly holds the
    /// chain exclusively.
    pub async fn delete_snapshot(&self, name: &str, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        let (from, into, into_is_head, user_created) = {
            let chain = self.chain.read().await;
            if chain.syncing {
                return Err(StoreError::FailedPrecondition(
                    "a rebuild into this replica is in progress; delete snapshots after it finishes".into(),
                ));
            }
            let i = chain.find_frozen(name).ok_or_else(|| {
                StoreError::NotFound(format!("no snapshot named {name:?} on this replica"))
            })?;
            (
                chain.entries[i].layer.clone(),
                chain.entries[i + 1].layer.clone(),
                i + 1 == chain.entries.len() - 1,
                chain.entries[i].meta.user_created,
            )
        };
        if into_is_head && !user_created && into.index().present() <= from.index().present() {
            return self.fold_head_down(name, from, into).await;
        }
        let merge = MergeMeta {
            from: from.id,
            into: into.id,
        };
        self.update_meta(|m| m.merging = Some(merge)).await?;
        let runs = from.index().runs(0, u64::MAX);
        for (s, e) in runs {
            let mut b = s;
            while b < e {
                let n = COPY_STEP_BLOCKS.min(e - b);
                let _excl = if into_is_head {
                    Some(self.chain.write().await)
                } else {
                    None
                };
                // Copy only what the child does not hold: the child's blocks are newer.
                let held = into.index().runs(b, b + n);
                for (gs, ge) in gaps(b, b + n, &held) {
                    self.copy_blocks(&from, name, &into, gs, ge - gs, || {
                        format!("reading snapshot {name:?} to merge it")
                    })
                    .await?;
                }
                b += n;
            }
        }
        self.sync_layer(&into, "syncing the merged layer").await?;
        {
            let mut chain = self.chain.write().await;
            let from_id = from.id;
            self.update_meta(|m| {
                m.chain.retain(|l| l.id != from_id);
                m.merging = None;
            })
            .await?;
            chain.entries.retain(|e| e.layer.id != from_id);
        }
        self.forget_dirty(from.id);
        Layer::remove_files(&self.dir, from.id);
        Ok(self.status().await)
    }

    /// Copies blocks `[first, first + count)` of layer `from` (named
    /// `from_name`) into layer `into` (data and CRC entries). Each block is
    /// checked against `from`'s stored CRC first, so a merge never turns
    /// corrupt data into data with a valid CRC: a mismatch fails the copy
    /// with [`StoreError::Corrupt`] and invalidates the entry. Callers hold
    /// `from` still (a frozen layer, or the chain held exclusively).
    async fn copy_blocks(
        &self,
        from: &Arc<Layer>,
        from_name: &str,
        into: &Arc<Layer>,
        first: u64,
        count: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let buf = self.read_blocks_with(from, first, count, what).await?;
        if let Err(e) = verify_stored_crcs(from, from_name, first, buf.as_slice(), bs) {
            if let StoreError::Corrupt { block, actual, .. } = e {
                self.invalidate_crc(from, block, actual);
            }
            return Err(e);
        }
        // The stored entries are the data's CRCs: they were just checked.
        let crcs: Vec<u8> = from
            .read_crcs(first, count)
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        self.write_blocks_with_crcs(into, first * bs, buf, crcs)
            .await
    }

    /// fsyncs a layer's data and CRC files.
    async fn sync_layer(&self, layer: &Arc<Layer>, what: &'static str) -> Result<()> {
        self.io
            .run([
                Op::Fsync {
                    file: layer.data.clone(),
                },
                Op::Fsync {
                    file: layer.crc.clone(),
                },
            ])
            .await
            .map_err(io_err(what))?;
        Ok(())
    }

    /// Deletes the system snapshot `snap` (named `name`) right below the
    /// head by copying the head's blocks down into it and making it the head:
    /// the head is the smaller layer (e.g. the writes made during a rebuild),
    /// so this moves little, where merging the snapshot up into the head
    /// would move everything written before it. I/O waits for the whole
    /// copy (it holds the chain exclusively).
    ///
    /// Only for system snapshots: if the replica stops midway, the snapshot
    /// layer stays in the chain holding some of the head's newer blocks
    /// (reads are unaffected: the head still holds them too), which a user
    /// snapshot must never do. `merging` records the layer written into so
    /// an unclean restart recomputes its CRCs.
    async fn fold_head_down(
        &self,
        name: &str,
        snap: Arc<Layer>,
        head: Arc<Layer>,
    ) -> Result<ReplicaStatus> {
        self.update_meta(|m| {
            m.merging = Some(MergeMeta {
                from: head.id,
                into: snap.id,
            })
        })
        .await?;
        {
            let mut chain = self.chain.write().await;
            let runs = head.index().runs(0, u64::MAX);
            for (s, e) in runs {
                let mut b = s;
                while b < e {
                    let n = COPY_STEP_BLOCKS.min(e - b);
                    self.copy_blocks(&head, "", &snap, b, n, || {
                        format!("reading the head to fold snapshot {name:?} into it")
                    })
                    .await?;
                    b += n;
                }
            }
            self.sync_layer(&snap, "syncing the folded layer").await?;
            let (snap_id, head_id) = (snap.id, head.id);
            self.update_meta(|m| {
                m.chain.retain(|l| l.id != head_id);
                if let Some(l) = m.chain.iter_mut().find(|l| l.id == snap_id) {
                    l.name.clear();
                }
                m.merging = None;
            })
            .await?;
            chain.entries.retain(|e| e.layer.id != head_id);
            if let Some(e) = chain.entries.iter_mut().find(|e| e.layer.id == snap_id) {
                e.meta.name.clear();
            }
        }
        self.forget_dirty(head.id);
        Layer::remove_files(&self.dir, head.id);
        Ok(self.status().await)
    }

    fn forget_dirty(&self, id: u64) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Drops every layer above snapshot `name` and starts an empty head on
    /// it. Refused while data streams are open.
    pub async fn revert(&self, name: &str, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        let open = self.streams.load(Ordering::Acquire);
        if open > 0 {
            return Err(StoreError::FailedPrecondition(format!(
                "revert needs the replica closed for I/O, but {open} data stream(s) are open; detach the volume first"
            )));
        }
        {
            let mut chain = self.chain.write().await;
            let i = chain.find_frozen(name).ok_or_else(|| {
                StoreError::NotFound(format!("no snapshot named {name:?} on this replica"))
            })?;
            let id = self.meta().next_layer_id;
            let layer = Layer::create(&self.dir, id, chain.size, self.block_size)
                .map_err(io_err("creating a new head layer"))?;
            let head = LayerMeta {
                id,
                name: String::new(),
                user_created: false,
                created_unix: now_unix(),
            };
            let keep = i + 1;
            let h2 = head.clone();
            self.update_meta(move |m| {
                m.chain.truncate(keep);
                m.chain.push(h2);
                m.next_layer_id = id + 1;
            })
            .await?;
            let dropped: Vec<Entry> = chain.entries.drain(keep..).collect();
            chain.entries.push(Entry {
                meta: head,
                layer: Arc::new(layer),
            });
            for e in dropped {
                self.forget_dirty(e.layer.id);
                Layer::remove_files(&self.dir, e.layer.id);
            }
        }
        Ok(self.status().await)
    }

    /// Grows the volume to `size` bytes.
    pub async fn expand(&self, size: u64, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        {
            let mut chain = self.chain.write().await;
            let bs = self.block_size as u64;
            if size < chain.size {
                return Err(StoreError::InvalidArgument(format!(
                    "cannot shrink the volume from {} to {size} bytes; only growing is supported",
                    chain.size
                )));
            }
            if !size.is_multiple_of(bs) {
                return Err(StoreError::InvalidArgument(format!(
                    "new size {size} must be a multiple of the block size {bs}"
                )));
            }
            if size > chain.size {
                let head = chain.head().clone();
                head.grow_crcs(size / bs)
                    .map_err(io_err("growing the head layer's CRC file"))?;
                head.data
                    .set_len(size)
                    .map_err(io_err("growing the head layer file"))?;
                for e in &chain.entries {
                    e.layer.index_mut().grow(size / bs);
                }
                self.update_meta(|m| m.size = size).await?;
                chain.size = size;
            }
        }
        Ok(self.status().await)
    }

    /// Replaces the recorded set of ejected peers.
    pub async fn set_ejected(&self, ejected: Vec<String>, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.update_meta(|m| m.ejected = ejected).await?;
        drop(_c);
        Ok(self.status().await)
    }

    /// Reshapes the frozen chain to exactly `names` (oldest first) before a
    /// rebuild writes into it: layers of those names are kept, missing ones
    /// are created empty, others are dropped. With `include_head` the head
    /// may be written too (crash-recovery resync, no engine serving).
    pub async fn prepare_sync(
        &self,
        names: &[String],
        include_head: bool,
        epoch: u64,
    ) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        for n in names {
            validate_name(n)?;
        }
        let _c = self.control.lock().await;
        {
            let mut chain = self.chain.write().await;
            let head = chain.entries[chain.entries.len() - 1].clone();
            let mut next_id = self.meta().next_layer_id;
            let mut entries = Vec::with_capacity(names.len() + 1);
            let mut created = Vec::new();
            for n in names {
                if let Some(i) = chain.find_frozen(n) {
                    entries.push(chain.entries[i].clone());
                } else {
                    let layer = Layer::create(&self.dir, next_id, chain.size, self.block_size)
                        .map_err(io_err(format!("creating layer {n:?} for a rebuild")))?;
                    created.push(next_id);
                    entries.push(Entry {
                        meta: LayerMeta {
                            id: next_id,
                            name: n.clone(),
                            user_created: false,
                            created_unix: now_unix(),
                        },
                        layer: Arc::new(layer),
                    });
                    next_id += 1;
                }
            }
            entries.push(head);
            let dropped: Vec<u64> = chain
                .entries
                .iter()
                .map(|e| e.layer.id)
                .filter(|id| !entries.iter().any(|k| k.layer.id == *id))
                .collect();
            let new_chain: Vec<LayerMeta> = entries.iter().map(|e| e.meta.clone()).collect();
            let saved = self
                .update_meta(|m| {
                    m.chain = new_chain;
                    m.next_layer_id = next_id;
                    m.syncing = true;
                })
                .await;
            if let Err(e) = saved {
                for id in created {
                    Layer::remove_files(&self.dir, id);
                }
                return Err(e);
            }
            chain.entries = entries;
            chain.syncing = true;
            chain.sync_head = include_head;
            for id in dropped {
                self.forget_dirty(id);
                Layer::remove_files(&self.dir, id);
            }
        }
        Ok(self.status().await)
    }

    /// Ends a sync: every layer is synced and the replica trusts its chain.
    pub async fn finish_sync(&self, epoch: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.flush_all(true).await?;
        {
            let mut chain = self.chain.write().await;
            self.update_meta(|m| m.syncing = false).await?;
            chain.syncing = false;
            chain.sync_head = false;
        }
        Ok(self.status().await)
    }

    async fn sync_target(
        &self,
        name: &str,
        epoch: u64,
    ) -> Result<(tokio::sync::RwLockReadGuard<'_, Chain>, Arc<Layer>)> {
        self.check_epoch(epoch)?;
        let chain = self.chain.read().await;
        if !chain.syncing {
            return Err(StoreError::FailedPrecondition(
                "this replica is not being synced: call PrepareSync before writing layers".into(),
            ));
        }
        if name.is_empty() && !chain.sync_head {
            return Err(StoreError::FailedPrecondition(
                "the head can only be written by a sync prepared with include_head".into(),
            ));
        }
        let layer = chain.layer(name)?.clone();
        Ok((chain, layer))
    }

    /// Writes blocks into layer `name` during a sync.
    pub async fn layer_write(
        &self,
        name: &str,
        offset: u64,
        data: AlignedBuf,
        crc: u32,
        epoch: u64,
    ) -> Result<()> {
        let (crcs, actual) = block_crcs_and_total(data.as_slice(), self.block_size as usize);
        if actual != crc {
            return Err(StoreError::CrcMismatch {
                expected: crc,
                actual,
            });
        }
        let (chain, layer) = self.sync_target(name, epoch).await?;
        self.check_range(&chain, offset, data.len() as u64)?;
        self.write_blocks_with_crcs(&layer, offset, data, crcs)
            .await
    }

    /// Deallocates `[offset, offset + len)` of layer `name` during a sync.
    pub async fn layer_punch(&self, name: &str, offset: u64, len: u64, epoch: u64) -> Result<()> {
        let (chain, layer) = self.sync_target(name, epoch).await?;
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || offset.checked_add(len).is_none_or(|e| e > chain.size)
        {
            return Err(StoreError::InvalidArgument(format!(
                "punch {offset}+{len} must be block-aligned and inside the volume"
            )));
        }
        layer.punch(offset, len).map_err(io_err(format!(
            "deallocating {len} bytes at {offset} in layer {name:?}"
        )))?;
        layer.index_mut().remove(offset / bs, len / bs);
        self.mark_dirty(&layer);
        Ok(())
    }

    /// Streams `(blocks, crcs)` chunks for every present block of layer `name`.
    pub async fn block_crcs(
        &self,
        name: &str,
    ) -> Result<mpsc::Receiver<Result<(Vec<u64>, Vec<u32>)>>> {
        let layer = self.chain.read().await.layer(name)?.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            const CHUNK: usize = 16384;
            let runs = layer.index().runs(0, u64::MAX);
            let (mut blocks, mut crcs) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
            for (s, e) in runs {
                let mut b = s;
                while b < e {
                    let n = (CHUNK - blocks.len()).min((e - b) as usize) as u64;
                    crcs.extend(layer.read_crcs(b, n));
                    blocks.extend(b..b + n);
                    b += n;
                    if blocks.len() == CHUNK {
                        let out = (std::mem::take(&mut blocks), std::mem::take(&mut crcs));
                        if tx.blocking_send(Ok(out)).is_err() {
                            return;
                        }
                    }
                }
            }
            if !blocks.is_empty() {
                let _ = tx.blocking_send(Ok((blocks, crcs)));
            }
        });
        Ok(rx)
    }

    /// Reads every present block of every layer and checks it against the
    /// layer's stored CRC (see [`ScrubReport`]). A mismatch is read again
    /// with the chain held exclusively, as for a normal read, and a block
    /// that still does not match has its CRC entry invalidated
    /// ([`Self::invalidate_crc`]). I/O goes on meanwhile; the control mutex
    /// is held for one group of [`SCRUB_DEPTH`] chunks at a time, so a
    /// snapshot or merge waits for one group, not for the whole scrub, and
    /// a layer merged away meanwhile is not read further. Refused (also
    /// midway) while a sync into this replica runs.
    ///
    /// With `max_bytes_per_sec` above 0 the scrub pauses between groups,
    /// outside every lock, so that it reads no faster than that on average;
    /// 0 reads as fast as the disk allows. A scrub that reaches its end and
    /// finds nothing corrupt records the time in the metadata
    /// ([`ReplicaStatus::last_clean_scrub_unix`]), which is what a scrub
    /// schedule counts from: a replica left corrupt stays due.
    pub async fn scrub(&self, epoch: u64, max_bytes_per_sec: u64) -> Result<ScrubReport> {
        self.check_epoch(epoch)?;
        let started = Instant::now();
        let layers: Vec<(String, Arc<Layer>)> = {
            let chain = self.chain.read().await;
            chain
                .entries
                .iter()
                .map(|e| (e.meta.name.clone(), e.layer.clone()))
                .collect()
        };
        let bs = self.block_size as u64;
        let mut report = ScrubReport::default();
        for (name, layer) in &layers {
            let chunks = present_chunks(layer, [(0, u64::MAX)]);
            for group in chunks.chunks(SCRUB_DEPTH) {
                // A newer engine has taken over: this scrub is not its.
                self.check_epoch(epoch)?;
                {
                    let _c = self.control.lock().await;
                    {
                        let chain = self.chain.read().await;
                        if chain.syncing {
                            return Err(StoreError::FailedPrecondition(
                                "a rebuild into this replica is in progress; scrub it once it \
                                 has finished"
                                    .into(),
                            ));
                        }
                        if !chain.entries.iter().any(|e| Arc::ptr_eq(&e.layer, layer)) {
                            break; // merged into its child, which is scrubbed too
                        }
                    }
                    let reads = group.iter().map(|&(b, n)| async move {
                        let buf = self.read_blocks(layer, b, n, "to scrub them").await?;
                        Ok::<_, StoreError>((b, buf))
                    });
                    for (b, buf) in futures::future::try_join_all(reads).await? {
                        report.blocks_checked += buf.len() as u64 / bs;
                        // Every mismatch of the chunk, each checked again.
                        let mut from = b;
                        while let Err(m) = layer.check_crcs(
                            from,
                            &buf.as_slice()[((from - b) * bs) as usize..],
                            bs as usize,
                        ) {
                            self.confirm_corrupt(name, layer, m.block, &mut report)
                                .await?;
                            from = m.block + 1;
                        }
                    }
                }
                if let Some(ahead) = pace(
                    report.blocks_checked * bs,
                    max_bytes_per_sec,
                    started.elapsed(),
                ) {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        if report.corrupt_blocks > 0 {
            let first: Vec<String> = report
                .corrupt
                .iter()
                .take(8)
                .map(|(l, b)| format!("{} block {b}", layer_label(l)))
                .collect();
            tracing::error!(
                corrupt = report.corrupt_blocks,
                checked = report.blocks_checked,
                first = %first.join(", "),
                "a scrub found corrupt data on disk; a resync rewrites it from a healthy replica"
            );
        }
        // Recorded only for the current epoch's scrub; the record is made
        // in memory right after the check, with no await between, so an
        // engine that opens the replica later sees it.
        self.check_epoch(epoch)?;
        if report.corrupt_blocks == 0 {
            let finished = now_unix();
            self.update_meta(|m| m.last_clean_scrub_unix = finished)
                .await?;
        }
        Ok(report)
    }

    /// Reads block `block` of `layer` again with the chain held exclusively
    /// (no write in flight) and, if the layer still holds it (an unmap may
    /// have deallocated it since it was listed) and it still does not match
    /// its entry, invalidates the entry and counts the block.
    async fn confirm_corrupt(
        &self,
        name: &str,
        layer: &Arc<Layer>,
        block: u64,
        report: &mut ScrubReport,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let _excl = self.chain.write().await;
        if !layer.index().contains(block) {
            return Ok(());
        }
        let buf = self
            .read_blocks(layer, block, 1, "to check it again")
            .await?;
        if let Err(StoreError::Corrupt { actual, .. }) =
            verify_stored_crcs(layer, name, block, buf.as_slice(), bs)
        {
            self.invalidate_crc(layer, block, actual);
            report.corrupt_blocks += 1;
            if report.corrupt.len() < SCRUB_LIST_MAX {
                report.corrupt.push((name.to_owned(), block));
            }
        }
        Ok(())
    }

    /// Reads blocks `[first, first + count)` of `layer`'s data file; an
    /// error says what was read and `why`.
    async fn read_blocks(
        &self,
        layer: &Layer,
        first: u64,
        count: u64,
        why: &str,
    ) -> Result<AlignedBuf> {
        self.read_blocks_with(layer, first, count, || {
            format!("reading {count} blocks at block {first} {why}")
        })
        .await
    }

    /// [`Self::read_blocks`] with the error's whole context built by `what`.
    async fn read_blocks_with(
        &self,
        layer: &Layer,
        first: u64,
        count: u64,
        what: impl FnOnce() -> String,
    ) -> Result<AlignedBuf> {
        let bs = self.block_size as u64;
        let done = self
            .io
            .run([Op::Read {
                file: layer.data.clone(),
                offset: first * bs,
                buf: AlignedBuf::for_read((count * bs) as usize),
            }])
            .await
            .map_err(io_err_with(what))?;
        match done.into_iter().next() {
            Some(Completion::Read(buf)) => Ok(buf),
            _ => Err(StoreError::Io {
                context: "reading blocks".into(),
                source: io::Error::other("backend returned no buffer"),
            }),
        }
    }

    /// Streams `(offset, data, crc32 of data)` for the present blocks of layer `name` inside
    /// `extents` (byte ranges; empty means the whole layer). Every block is
    /// checked against its stored CRC, so a rebuild never copies data this
    /// disk corrupted: the stream ends with [`StoreError::Corrupt`] instead.
    /// The layer must not be written meanwhile (rebuilds read frozen layers,
    /// or the head while the engine is not serving).
    pub async fn read_layer(
        self: &Arc<Self>,
        name: &str,
        extents: Vec<(u64, u64)>,
    ) -> Result<mpsc::Receiver<Result<(u64, Bytes, u32)>>> {
        let layer = self.chain.read().await.layer(name)?.clone();
        let name = name.to_owned();
        let bs = self.block_size as u64;
        let ranges: Vec<(u64, u64)> = if extents.is_empty() {
            vec![(0, u64::MAX)]
        } else {
            extents
                .iter()
                .map(|&(o, l)| (o / bs, o.saturating_add(l).div_ceil(bs)))
                .collect()
        };
        // Chunks of at most COPY_STEP_BLOCKS within the present runs, read
        // several at a time (many when they are small: a delta resync's
        // scattered blocks) and sent in order.
        let chunks = present_chunks(&layer, ranges);
        let largest = chunks.iter().map(|&(_, n)| n * bs).max().unwrap_or(bs);
        let depth = (READ_LAYER_BYTES / largest).clamp(READ_LAYER_DEPTH.0, READ_LAYER_DEPTH.1);
        let (tx, rx) = mpsc::channel(8);
        let store = self.clone();
        tokio::spawn(async move {
            let reads = futures::stream::iter(chunks)
                .map(|(b, n)| {
                    let (store, layer, name) = (store.clone(), layer.clone(), name.clone());
                    async move {
                        let buf = store.read_blocks(&layer, b, n, "for a rebuild").await?;
                        let crc = verify_stored_crcs(&layer, &name, b, buf.as_slice(), bs)?;
                        Ok((b * bs, buf.into_bytes(), crc))
                    }
                })
                .buffered(depth as usize);
            let mut reads = std::pin::pin!(reads);
            while let Some(item) = reads.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(rx)
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
