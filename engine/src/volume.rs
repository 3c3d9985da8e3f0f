//! The replicated volume: the async layer around the [`Replicator`].
//!
//! A [`Volume`] owns one [`Control`] connection and one [`DataLink`] per
//! replica, the table of frontend requests in flight, and the state machine.
//! Every event (a frontend request, a batch of replies, a broken stream, a
//! stalled replica, an ejection recorded) takes the volume's mutex, feeds the
//! machine, and executes the actions it returns before releasing the mutex;
//! nothing in there awaits. Recording an ejection is the only action that
//! needs network round trips: it runs on a task and reports back.
//!
//! A gate (an async `RwLock`) separates I/O from operations that need the
//! volume quiet: every frontend request holds it shared, snapshot, revert,
//! expand and replica admission take it exclusively (which drains I/O).
//!
//! Architecture invariant: requests sent to replicas are always whole
//! blocks; partial-block writes are read-modify-write cycles done here,
//! serialized among themselves.
//!
//! Invariant: a replica is only promoted to RW after a sync made each of its
//! layers equal to a healthy replica's; until then it receives every write
//! but serves no read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{RwLock, oneshot};

use zebu_proto::engine as epb;
use zebu_proto::replica as pb;

use crate::frontend::{BlockDevice, DeviceError};
use crate::link::{Control, DataLink, LinkError, ReplyHandler};
use crate::rebuild::{self, Progress, RebuildError};
use crate::replication::{Action, IoId, IoKind, Mode, ReplicaId, ReplicationError, Replicator};
use crate::stats::IoStats;

/// Block size of every Zebu volume.
pub const BLOCK_SIZE: u32 = 4096;
/// Largest request sent to a replica.
const MAX_REQUEST: u64 = 32 << 20;

/// Errors of volume operations.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A replica call failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A rebuild or resync failed.
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The volume is not in a state that allows it.
    #[error("{0}")]
    Precondition(String),
    /// No such replica or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// The replication machine refused.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

struct Pending {
    kind: IoKind,
    offset: u64,
    len: u32,
    payload: Bytes,
    crc: u32,
    revision: u64,
    data: Option<Bytes>,
    done: Option<oneshot::Sender<Result<Bytes, ReplicationError>>>,
}

struct Member {
    control: Control,
    /// Replica UUID (from its metadata).
    uuid: String,
    /// The data-stream session the replica's `Open` started for this
    /// engine's attachment of it; its data streams name it.
    session: u64,
    link: Option<(u64, DataLink)>,
    rebuild: Option<Arc<Progress>>,
}

struct Inner {
    sm: Replicator,
    pending: HashMap<u64, Pending>,
    members: HashMap<ReplicaId, Member>,
    out: Vec<Action>,
    next_link_gen: u64,
    /// Ids of replicas ejected and not rebuilt since, including ones pruned
    /// from the member list: what every replica records as ejected.
    ejected: std::collections::BTreeSet<String>,
    /// Ids of replicas the last scrub found holding corrupt blocks, until
    /// they are resynced: a rebuild reads from them only if no other RW
    /// replica is left.
    corrupt: std::collections::BTreeSet<String>,
}

/// Options of a volume.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// Volume name (NBD export name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Replica addresses.
    pub replicas: Vec<String>,
    /// Limit for a replica to answer.
    pub io_timeout: Duration,
    /// Scheduled scrubs.
    pub scrub: crate::scrub::Policy,
}

/// One replicated volume.
pub struct Volume {
    name: String,
    size: AtomicU64,
    epoch: u64,
    io_timeout: Duration,
    inner: Mutex<Inner>,
    gate: RwLock<()>,
    rmw: tokio::sync::Mutex<()>,
    control_lock: tokio::sync::Mutex<()>,
    /// Held by the running scrub: one at a time.
    scrub_lock: tokio::sync::Mutex<()>,
    scrub_policy: crate::scrub::Policy,
    scrub_record: Mutex<crate::scrub::Record>,
    stats: IoStats,
    nbd_clients: AtomicU32,
    me: Weak<Volume>,
}

struct LinkHandler {
    volume: Weak<Volume>,
    replica: ReplicaId,
    generation: u64,
}

impl ReplyHandler for LinkHandler {
    fn replies(&self, responses: Vec<pb::IoResponse>) {
        if let Some(v) = self.volume.upgrade() {
            v.on_replies(self.replica, responses);
        }
    }

    fn broken(&self, why: String) {
        if let Some(v) = self.volume.upgrade() {
            v.on_broken(self.replica, self.generation, why);
        }
    }
}

/// Runs its closure when dropped.
struct Cleanup<F: FnMut()>(F);

impl<F: FnMut()> Drop for Cleanup<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn frozen_names(info: &pb::ReplicaInfo) -> Vec<String> {
    info.chain
        .iter()
        .filter(|l| !l.head)
        .map(|l| l.name.clone())
        .collect()
}

impl Volume {
    /// Connects to the replicas, takes a new epoch, recovers from an unclean
    /// stop (resyncing every replica from the freshest one), and returns a
    /// volume ready for I/O.
    pub async fn start(opts: VolumeOptions) -> Result<Arc<Volume>, VolumeError> {
        if opts.replicas.is_empty() {
            return Err(VolumeError::Invalid(
                "at least one --replica is required".into(),
            ));
        }
        if opts.size == 0 || !opts.size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(VolumeError::Invalid(format!(
                "volume size {} must be a non-zero multiple of {BLOCK_SIZE}",
                opts.size
            )));
        }
        let mut reachable: Vec<(Control, pb::ReplicaInfo)> = Vec::new();
        for addr in &opts.replicas {
            match Control::connect(addr, opts.io_timeout).await {
                Ok(c) => match c.info().await {
                    Ok(info) => reachable.push((c, info)),
                    Err(e) => {
                        tracing::warn!(replica = %addr, error = %e, "replica left out: no info")
                    }
                },
                Err(e) => {
                    tracing::warn!(replica = %addr, error = %e, "replica left out: unreachable")
                }
            }
        }
        if reachable.is_empty() {
            return Err(VolumeError::Precondition(format!(
                "none of the replicas {:?} is reachable; start them first",
                opts.replicas
            )));
        }
        for (c, info) in &reachable {
            if info.size > opts.size {
                return Err(VolumeError::Invalid(format!(
                    "replica {} holds {} bytes, more than --size {}: pass the volume's real size",
                    c.addr, info.size, opts.size
                )));
            }
        }
        let epoch = reachable.iter().map(|(_, i)| i.epoch).max().unwrap_or(0) + 1;
        let mut opened = Vec::new();
        for (c, _) in reachable {
            let info = c
                .call("opening with a new epoch", |mut cl| async move {
                    cl.open(pb::OpenRequest { epoch }).await
                })
                .await;
            match info {
                Ok(mut info) => {
                    if info.size < opts.size {
                        let size = opts.size;
                        info = c
                            .call("growing to the volume size", |mut cl| async move {
                                cl.expand(pb::ExpandRequest { size, epoch }).await
                            })
                            .await?;
                    }
                    opened.push((c, info));
                }
                Err(e) => tracing::warn!(error = %e, "replica left out: Open failed"),
            }
        }
        if opened.is_empty() {
            return Err(VolumeError::Precondition(
                "no replica accepted the new epoch".into(),
            ));
        }

        // Crash recovery: the freshest replica that nobody ejected and that
        // was not in the middle of a rebuild is the source of truth.
        let ejected: Vec<String> = opened.iter().flat_map(|(_, i)| i.ejected.clone()).collect();
        let trusted = |i: &pb::ReplicaInfo| !i.syncing && !ejected.contains(&i.id);
        let source = opened
            .iter()
            .enumerate()
            .filter(|(_, (_, i))| trusted(i))
            .max_by_key(|(_, (_, i))| i.revision)
            .or_else(|| {
                opened
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, (_, i))| i.revision)
            })
            .map(|(k, _)| k)
            .unwrap_or(0);
        let (src, src_info) = opened[source].clone();
        let names = frozen_names(&src_info);
        let mut members = Vec::new();
        for (k, (c, info)) in opened.into_iter().enumerate() {
            if k == source {
                members.push((c, info));
                continue;
            }
            // A replica still attached to a previous engine may hold writes
            // the others lack (the engine stopped without closing).
            let in_sync = info.clean
                && src_info.clean
                && !info.attached
                && !src_info.attached
                && info.revision == src_info.revision
                && frozen_names(&info) == names
                && trusted(&info);
            if !in_sync {
                tracing::info!(replica = %c.addr, source = %src.addr, "resyncing replica from the freshest one before serving");
                let progress = Progress::started();
                match resync(&src, &c, &names, true, epoch, &progress).await {
                    Ok(()) => {
                        let p = progress.get();
                        tracing::info!(replica = %c.addr, blocks_copied = p.blocks_copied, blocks_punched = p.blocks_punched, "resync done");
                    }
                    Err(e) => {
                        tracing::warn!(replica = %c.addr, error = %e, "replica left out: resync failed");
                        continue;
                    }
                }
            }
            members.push((c, info));
        }
        let volume = Arc::new_cyclic(|me| Volume {
            name: opts.name.clone(),
            size: AtomicU64::new(opts.size),
            epoch,
            io_timeout: opts.io_timeout,
            inner: Mutex::new(Inner {
                sm: Replicator::new(epoch, src_info.revision),
                pending: HashMap::new(),
                members: HashMap::new(),
                out: Vec::with_capacity(64),
                next_link_gen: 1,
                ejected: Default::default(),
                corrupt: Default::default(),
            }),
            gate: RwLock::new(()),
            rmw: tokio::sync::Mutex::new(()),
            control_lock: tokio::sync::Mutex::new(()),
            scrub_lock: tokio::sync::Mutex::new(()),
            scrub_policy: opts.scrub,
            scrub_record: Mutex::new(Default::default()),
            stats: IoStats::default(),
            nbd_clients: AtomicU32::new(0),
            me: me.clone(),
        });
        for (c, info) in members {
            let rid = volume.admit(c, info.id.clone(), info.session).await?;
            let mut inner = volume.lock();
            let Inner { sm, out, .. } = &mut *inner;
            sm.set_rw(rid, out)?;
            volume.execute(&mut inner);
        }
        volume.record_ejected().await;
        volume.spawn_watchdog();
        Ok(volume)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The epoch this engine took.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds a replica to the machine (write-only) and opens its data stream
    /// of `session` (what the replica's `Open` returned).
    async fn admit(
        &self,
        control: Control,
        uuid: String,
        session: u64,
    ) -> Result<ReplicaId, VolumeError> {
        let (rid, generation) = {
            let mut inner = self.lock();
            let Inner { sm, out, .. } = &mut *inner;
            let rid = sm.add_replica(out)?;
            let generation = inner.next_link_gen;
            inner.next_link_gen += 1;
            inner.members.insert(
                rid,
                Member {
                    control: control.clone(),
                    uuid,
                    session,
                    link: None,
                    rebuild: None,
                },
            );
            self.execute(&mut inner);
            (rid, generation)
        };
        let handler = Arc::new(LinkHandler {
            volume: self.me.clone(),
            replica: rid,
            generation,
        });
        match DataLink::open(&control, session, handler).await {
            Ok(link) => {
                let mut inner = self.lock();
                if let Some(m) = inner.members.get_mut(&rid) {
                    m.link = Some((generation, link));
                }
                Ok(rid)
            }
            Err(e) => {
                let mut inner = self.lock();
                let Inner { sm, out, .. } = &mut *inner;
                let _ = sm.remove_replica(rid, out);
                inner.members.remove(&rid);
                self.execute(&mut inner);
                Err(e.into())
            }
        }
    }

    /// Executes the actions the machine queued, and those they cause.
    fn execute(&self, inner: &mut Inner) {
        let mut failed: Vec<ReplicaId> = Vec::new();
        loop {
            if inner.out.is_empty() {
                if failed.is_empty() {
                    break;
                }
                for r in failed.drain(..) {
                    let Inner { sm, out, .. } = &mut *inner;
                    let _ = sm.replica_failed(r, out);
                }
                continue;
            }
            let mut actions = std::mem::take(&mut inner.out);
            for a in actions.drain(..) {
                match a {
                    Action::Send { io, replica } => {
                        let Some(p) = inner.pending.get(&io.0) else {
                            continue;
                        };
                        let req = pb::IoRequest {
                            id: io.0,
                            op: match p.kind {
                                IoKind::Read => pb::Op::Read,
                                IoKind::Write => pb::Op::Write,
                                IoKind::Unmap => pb::Op::Unmap,
                                IoKind::Flush => pb::Op::Flush,
                            } as i32,
                            offset: p.offset,
                            length: p.len,
                            payload: p.payload.clone(),
                            crc32: p.crc,
                            revision: p.revision,
                            epoch: self.epoch,
                        };
                        let sent = inner
                            .members
                            .get(&replica)
                            .and_then(|m| m.link.as_ref())
                            .is_some_and(|(_, l)| l.send(req));
                        if !sent {
                            failed.push(replica);
                        }
                    }
                    Action::Complete { io, result } => {
                        if let Some(mut p) = inner.pending.remove(&io.0)
                            && let Some(done) = p.done.take()
                        {
                            let _ = done.send(result.map(|()| p.data.take().unwrap_or_default()));
                        }
                    }
                    Action::RecordEjection { token, ejected, on } => {
                        for r in &ejected {
                            if let Some(m) = inner.members.get(r) {
                                inner.ejected.insert(m.uuid.clone());
                            }
                        }
                        let uuids: Vec<String> = inner.ejected.iter().cloned().collect();
                        let targets: Vec<(ReplicaId, Control)> = on
                            .iter()
                            .filter_map(|r| inner.members.get(r).map(|m| (*r, m.control.clone())))
                            .collect();
                        let missing: Vec<ReplicaId> = on
                            .iter()
                            .filter(|r| !inner.members.contains_key(r))
                            .copied()
                            .collect();
                        let me = self.me.clone();
                        let epoch = self.epoch;
                        tokio::spawn(async move {
                            let mut failed_on = missing;
                            for (rid, c) in targets {
                                let ej = uuids.clone();
                                let r = c
                                    .call("recording an ejection", |mut cl| async move {
                                        cl.set_ejected(pb::SetEjectedRequest { ejected: ej, epoch })
                                            .await
                                    })
                                    .await;
                                if let Err(e) = r {
                                    tracing::warn!(error = %e, "could not record an ejection");
                                    failed_on.push(rid);
                                }
                            }
                            if let Some(v) = me.upgrade() {
                                let mut inner = v.lock();
                                let Inner { sm, out, .. } = &mut *inner;
                                let _ = sm.ejection_recorded(token, &failed_on, out);
                                v.execute(&mut inner);
                            }
                        });
                    }
                    Action::ModeChanged { replica, mode } => {
                        if let Some(m) = inner.members.get_mut(&replica) {
                            tracing::info!(replica = %m.control.addr, ?mode, "replica mode changed");
                            if mode == Mode::Err {
                                m.link = None;
                            }
                        }
                    }
                }
            }
            // Give the (now empty) buffer back to keep its capacity.
            if inner.out.is_empty() {
                inner.out = actions;
            } else {
                let more = std::mem::take(&mut inner.out);
                inner.out = actions;
                inner.out.extend(more);
            }
        }
    }

    fn on_replies(&self, replica: ReplicaId, responses: Vec<pb::IoResponse>) {
        let mut inner = self.lock();
        for r in responses {
            let Some(p) = inner.pending.get_mut(&r.id) else {
                continue;
            };
            let mut ok = r.status == pb::IoStatus::IoOk as i32;
            if ok && p.kind == IoKind::Read {
                if r.payload.len() != p.len as usize || crc32fast::hash(&r.payload) != r.crc32 {
                    tracing::warn!(
                        id = r.id,
                        "read reply failed its checksum; treating the replica as failed"
                    );
                    ok = false;
                } else {
                    p.data = Some(r.payload);
                }
            }
            if !ok && !r.message.is_empty() {
                let addr = inner.members.get(&replica).map(|m| m.control.addr.clone());
                tracing::warn!(replica = ?addr, id = r.id, error = %r.message, "replica failed an I/O");
            }
            let Inner { sm, out, .. } = &mut *inner;
            sm.reply(IoId(r.id), replica, ok, out);
            self.execute(&mut inner);
        }
    }

    fn on_broken(&self, replica: ReplicaId, generation: u64, why: String) {
        let mut inner = self.lock();
        let current = inner
            .members
            .get(&replica)
            .and_then(|m| m.link.as_ref())
            .is_some_and(|(g, _)| *g == generation);
        if !current {
            return;
        }
        if let Some(m) = inner.members.get_mut(&replica) {
            tracing::warn!(replica = %m.control.addr, %why, "replica data stream lost");
            m.link = None;
        }
        let Inner { sm, out, .. } = &mut *inner;
        let _ = sm.replica_failed(replica, out);
        self.execute(&mut inner);
    }

    fn spawn_watchdog(&self) {
        let me = self.me.clone();
        let limit = self.io_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(v) = me.upgrade() else { return };
                let mut inner = v.lock();
                let stalled: Vec<ReplicaId> = inner
                    .members
                    .iter()
                    .filter(|(_, m)| m.link.as_ref().is_some_and(|(_, l)| l.stalled(limit)))
                    .map(|(r, _)| *r)
                    .collect();
                for r in stalled {
                    if let Some(m) = inner.members.get_mut(&r) {
                        tracing::warn!(replica = %m.control.addr, timeout = ?limit, "replica did not answer in time");
                        m.link = None;
                    }
                    let Inner { sm, out, .. } = &mut *inner;
                    let _ = sm.replica_failed(r, out);
                    v.execute(&mut inner);
                }
            }
        });
    }

    /// Submits one whole-block request and waits for its completion.
    async fn submit(
        &self,
        kind: IoKind,
        offset: u64,
        len: u32,
        payload: Bytes,
    ) -> Result<Bytes, DeviceError> {
        let _gate = self.gate.read().await;
        let start = Instant::now();
        let rx = {
            let mut inner = self.lock();
            let (tx, rx) = oneshot::channel();
            let crc = if kind == IoKind::Write {
                crc32fast::hash(&payload)
            } else {
                0
            };
            let Inner { sm, out, .. } = &mut *inner;
            let s = sm.submit(kind, out);
            inner.pending.insert(
                s.io.0,
                Pending {
                    kind,
                    offset,
                    len,
                    payload,
                    crc,
                    revision: s.revision.unwrap_or(0),
                    data: None,
                    done: Some(tx),
                },
            );
            self.execute(&mut inner);
            rx
        };
        let result = rx
            .await
            .map_err(|_| DeviceError::Io("the engine dropped the request".into()))?;
        match kind {
            IoKind::Read => self.stats.reads.record(start.elapsed()),
            IoKind::Write => self.stats.writes.record(start.elapsed()),
            IoKind::Flush => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            IoKind::Unmap => {
                self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        result.map_err(|e| DeviceError::Io(e.to_string()))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let size = self.size.load(Ordering::Acquire);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DeviceError::OutOfRange { offset, len });
        }
        Ok(())
    }

    async fn read_blocks(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        if len <= MAX_REQUEST {
            return self
                .submit(IoKind::Read, offset, len as u32, Bytes::new())
                .await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = MAX_REQUEST.min(offset + len - pos);
            out.extend_from_slice(
                &self
                    .submit(IoKind::Read, pos, n as u32, Bytes::new())
                    .await?,
            );
            pos += n;
        }
        Ok(out.freeze())
    }

    /// Writes bytes at any alignment: whole blocks directly, partial blocks
    /// by read-modify-write of the blocks they touch.
    async fn write_any(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        let bs = BLOCK_SIZE as u64;
        let len = data.len() as u64;
        if offset.is_multiple_of(bs) && len.is_multiple_of(bs) {
            self.submit(IoKind::Write, offset, len as u32, data).await?;
            return Ok(());
        }
        let _rmw = self.rmw.lock().await;
        let first = offset / bs * bs;
        let end = (offset + len).div_ceil(bs) * bs;
        let old = self.read_blocks(first, end - first).await?;
        let mut merged = BytesMut::from(&old[..]);
        let at = (offset - first) as usize;
        merged[at..at + data.len()].copy_from_slice(&data);
        self.submit(IoKind::Write, first, (end - first) as u32, merged.freeze())
            .await?;
        Ok(())
    }

    async fn unmap_blocks(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let mut pos = offset;
        while pos < offset + len {
            let n = MAX_REQUEST.min(offset + len - pos);
            self.submit(IoKind::Unmap, pos, n as u32, Bytes::new())
                .await?;
            pos += n;
        }
        Ok(())
    }

    async fn flush_all(&self) -> Result<(), DeviceError> {
        self.submit(IoKind::Flush, 0, 0, Bytes::new())
            .await
            .map(|_| ())
    }

    /// Waits for in-flight I/O, flushes every replica and detaches from
    /// them cleanly, so the next engine needs no resync.
    pub async fn shutdown(&self) -> Result<(), DeviceError> {
        self.flush_all().await?;
        let _quiet = self.gate.write().await;
        for (_, c) in self.live_members() {
            let epoch = self.epoch;
            if let Err(e) = c
                .call_long("closing", |mut cl| async move {
                    cl.close(pb::CloseRequest { epoch }).await
                })
                .await
            {
                tracing::warn!(error = %e, "could not close a replica cleanly; the next engine will resync it");
            }
        }
        Ok(())
    }

    /// The replicas that are not ejected, for control calls.
    fn live_members(&self) -> Vec<(ReplicaId, Control)> {
        let inner = self.lock();
        inner
            .sm
            .modes()
            .filter(|(_, m)| *m != Mode::Err)
            .filter_map(|(r, _)| inner.members.get(&r).map(|m| (r, m.control.clone())))
            .collect()
    }

    /// An RW replica to read from, one not known to hold corrupt blocks if
    /// there is one.
    fn rw_member(&self) -> Option<Control> {
        let inner = self.lock();
        let rw: Vec<&Member> = inner
            .sm
            .modes()
            .filter(|(_, m)| *m == Mode::Rw)
            .filter_map(|(r, _)| inner.members.get(&r))
            .collect();
        rw.iter()
            .find(|m| !inner.corrupt.contains(&m.uuid))
            .or(rw.first())
            .map(|m| m.control.clone())
    }

    /// Ejects a replica that failed a control operation (unless it is the
    /// last healthy one, in which case the error is returned).
    fn fail_member(&self, rid: ReplicaId, err: &LinkError) -> Result<(), VolumeError> {
        let mut inner = self.lock();
        let last = inner.sm.mode(rid) == Some(Mode::Rw) && inner.sm.rw_count() == 1;
        if last {
            return Err(VolumeError::Precondition(format!(
                "the last healthy replica failed: {err}"
            )));
        }
        tracing::warn!(error = %err, "ejecting a replica that failed a control operation");
        if let Some(m) = inner.members.get_mut(&rid) {
            m.link = None;
        }
        let Inner { sm, out, .. } = &mut *inner;
        let _ = sm.replica_failed(rid, out);
        self.execute(&mut inner);
        Ok(())
    }

    async fn snapshot_all(&self, name: &str, user_created: bool) -> Result<(), VolumeError> {
        let mut any_ok = false;
        for (rid, c) in self.live_members() {
            let n = name.to_owned();
            let epoch = self.epoch;
            let r = c
                .call("creating a snapshot", |mut cl| async move {
                    cl.create_snapshot(pb::CreateSnapshotRequest {
                        name: n,
                        epoch,
                        user_created,
                    })
                    .await
                })
                .await;
            match r {
                Ok(_) => any_ok = true,
                Err(LinkError::Call { status, .. })
                    if status.code() == tonic::Code::AlreadyExists =>
                {
                    return Err(VolumeError::Precondition(format!(
                        "a snapshot named {name:?} already exists"
                    )));
                }
                Err(LinkError::Call { status, .. })
                    if status.code() == tonic::Code::InvalidArgument =>
                {
                    return Err(VolumeError::Invalid(status.message().to_owned()));
                }
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        if any_ok {
            Ok(())
        } else {
            Err(VolumeError::Precondition(
                "no replica took the snapshot".into(),
            ))
        }
    }

    /// Crash-consistent snapshot: drain I/O, snapshot every replica under
    /// one name, resume.
    pub async fn create_snapshot(&self, name: &str) -> Result<epb::Snapshot, VolumeError> {
        let _c = self.control_lock.lock().await;
        {
            let _quiet = self.gate.write().await;
            self.snapshot_all(name, true).await?;
        }
        Ok(epb::Snapshot {
            name: name.to_owned(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            user_created: true,
        })
    }

    /// The snapshots of a healthy replica, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<epb::Snapshot>, VolumeError> {
        let c = self
            .rw_member()
            .ok_or_else(|| VolumeError::Precondition("no healthy replica".into()))?;
        let list = c
            .call("listing snapshots", |mut cl| async move {
                cl.list_snapshots(pb::ListSnapshotsRequest {}).await
            })
            .await?;
        Ok(list
            .snapshots
            .into_iter()
            .map(|l| epb::Snapshot {
                name: l.name,
                created_unix: l.created_unix,
                user_created: l.user_created,
            })
            .collect())
    }

    /// Refuses operations that would disturb a rebuild in progress.
    fn check_no_rebuild(&self, what: &str) -> Result<(), VolumeError> {
        let inner = self.lock();
        let running = inner.members.values().find(|m| {
            m.rebuild
                .as_ref()
                .is_some_and(|p| p.get().state == "running")
        });
        match running {
            Some(m) => Err(VolumeError::Precondition(format!(
                "cannot {what} while replica {} is rebuilding; retry when `status` shows it RW",
                m.control.addr
            ))),
            None => Ok(()),
        }
    }

    /// Deletes a snapshot on every replica (merging it into its child).
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        self.check_no_rebuild("delete a snapshot")?;
        let mut found = false;
        for (rid, c) in self.live_members() {
            let (n, epoch) = (name.to_owned(), self.epoch);
            let r = c
                .call_long("deleting a snapshot", |mut cl| async move {
                    cl.delete_snapshot(pb::DeleteSnapshotRequest { name: n, epoch })
                        .await
                })
                .await;
            match r {
                Ok(_) => found = true,
                Err(LinkError::Call { status, .. }) if status.code() == tonic::Code::NotFound => {}
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        if found {
            Ok(())
        } else {
            Err(VolumeError::NotFound(format!("no snapshot named {name:?}")))
        }
    }

    /// Reverts every replica to snapshot `name`. Refused while NBD clients
    /// are connected.
    pub async fn revert(&self, name: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        self.check_no_rebuild("revert")?;
        let clients = self.nbd_clients.load(Ordering::Acquire);
        if clients > 0 {
            return Err(VolumeError::Precondition(format!(
                "revert needs the volume detached: {clients} NBD client(s) are connected; disconnect them first"
            )));
        }
        let _quiet = self.gate.write().await;
        let members = self.live_members();
        // The snapshot must exist on a healthy replica before anything changes.
        let snaps = self.list_snapshots().await?;
        if !snaps.iter().any(|s| s.name == name) {
            return Err(VolumeError::NotFound(format!("no snapshot named {name:?}")));
        }
        // Replicas refuse to revert with a data stream open: close ours.
        {
            let mut inner = self.lock();
            for (rid, _) in &members {
                if let Some(m) = inner.members.get_mut(rid) {
                    m.link = None;
                }
            }
        }
        for (rid, c) in &members {
            let mut attempt = 0;
            loop {
                let (n, epoch) = (name.to_owned(), self.epoch);
                let r = c
                    .call("reverting", |mut cl| async move {
                        cl.revert(pb::RevertRequest { name: n, epoch }).await
                    })
                    .await;
                match r {
                    Ok(_) => break,
                    // The replica may not have seen our stream close yet.
                    Err(LinkError::Call { status, .. })
                        if status.code() == tonic::Code::FailedPrecondition && attempt < 100 =>
                    {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        self.fail_member(*rid, &e)?;
                        break;
                    }
                }
            }
        }
        // Reopen the data streams.
        for (rid, c) in members {
            let generation = {
                let mut inner = self.lock();
                let g = inner.next_link_gen;
                inner.next_link_gen += 1;
                g
            };
            let session = {
                let inner = self.lock();
                if inner.sm.mode(rid) == Some(Mode::Err) {
                    continue;
                }
                inner.members.get(&rid).map_or(0, |m| m.session)
            };
            let handler = Arc::new(LinkHandler {
                volume: self.me.clone(),
                replica: rid,
                generation,
            });
            match DataLink::open(&c, session, handler).await {
                Ok(link) => {
                    if let Some(m) = self.lock().members.get_mut(&rid) {
                        m.link = Some((generation, link));
                    }
                }
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        Ok(())
    }

    /// Grows the volume on every replica.
    pub async fn expand(&self, size: u64) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        let current = self.size.load(Ordering::Acquire);
        if size < current {
            return Err(VolumeError::Invalid(format!(
                "cannot shrink the volume from {current} to {size} bytes; only growing is supported"
            )));
        }
        if !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(VolumeError::Invalid(format!(
                "new size {size} must be a multiple of {BLOCK_SIZE}"
            )));
        }
        if size == current {
            return Ok(());
        }
        let _quiet = self.gate.write().await;
        for (rid, c) in self.live_members() {
            let epoch = self.epoch;
            let r = c
                .call("expanding", |mut cl| async move {
                    cl.expand(pb::ExpandRequest { size, epoch }).await
                })
                .await;
            if let Err(e) = r {
                self.fail_member(rid, &e)?;
            }
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Adds the replica at `addr`: it joins write-only, a system snapshot
    /// freezes the data it must catch up on, and a background task copies
    /// what differs from a healthy replica, then promotes it. The returned
    /// task ends with the rebuild (its error, if it failed); dropping it does
    /// not stop the rebuild.
    pub async fn add_replica(&self, addr: &str) -> Result<RebuildTask, VolumeError> {
        let _c = self.control_lock.lock().await;
        let control = Control::connect(addr, self.io_timeout).await?;
        let info = control.info().await?;
        let size = self.size.load(Ordering::Acquire);
        if info.size > size {
            return Err(VolumeError::Invalid(format!(
                "replica {addr} holds {} bytes, more than the volume's {size}",
                info.size
            )));
        }
        if info.epoch > self.epoch {
            return Err(VolumeError::Precondition(format!(
                "replica {addr} was opened by a newer engine (epoch {} > {}); this engine is stale",
                info.epoch, self.epoch
            )));
        }
        // A returning replica replaces its ejected slot.
        {
            let mut inner = self.lock();
            let old: Vec<(ReplicaId, Mode)> = inner
                .members
                .iter()
                .filter(|(_, m)| m.uuid == info.id)
                .map(|(r, _)| (*r, inner.sm.mode(*r).unwrap_or(Mode::Err)))
                .collect();
            for (rid, mode) in old {
                if mode != Mode::Err {
                    return Err(VolumeError::Precondition(format!(
                        "replica {addr} (id {}) is already a {mode:?} member of this volume",
                        info.id
                    )));
                }
                let Inner { sm, out, .. } = &mut *inner;
                let _ = sm.remove_replica(rid, out);
                inner.members.remove(&rid);
                self.execute(&mut inner);
            }
        }
        let epoch = self.epoch;
        let opened = control
            .call("opening with the engine's epoch", |mut cl| async move {
                cl.open(pb::OpenRequest { epoch }).await
            })
            .await?;
        if info.size < size {
            control
                .call("growing to the volume size", |mut cl| async move {
                    cl.expand(pb::ExpandRequest { size, epoch }).await
                })
                .await?;
        }
        let snap = format!(
            "rebuild-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let rid = {
            let _quiet = self.gate.write().await;
            let rid = self
                .admit(control.clone(), info.id.clone(), opened.session)
                .await?;
            if let Err(e) = self.snapshot_all(&snap, false).await {
                let mut inner = self.lock();
                let Inner { sm, out, .. } = &mut *inner;
                let _ = sm.remove_replica(rid, out);
                inner.members.remove(&rid);
                self.execute(&mut inner);
                return Err(e);
            }
            rid
        };
        let progress = Arc::new(Progress::started());
        if let Some(m) = self.lock().members.get_mut(&rid) {
            m.rebuild = Some(progress.clone());
        }
        let Some(me) = self.me.upgrade() else {
            return Err(VolumeError::Precondition(
                "the volume is shutting down".into(),
            ));
        };
        Ok(tokio::spawn(async move {
            let result = me.rebuild(rid, &control, &snap, &progress).await;
            let summary = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            progress.finish(&summary);
            match result {
                Ok(()) => {
                    let p = progress.get();
                    let [plan_s, copy_s, finish_s] = p.phase_seconds();
                    tracing::info!(replica = %control.addr, blocks_copied = p.blocks_copied, bytes = p.bytes_done, plan_s, copy_s, finish_s, "rebuild done; replica is RW");
                }
                Err(e) => {
                    tracing::warn!(replica = %control.addr, error = %e, "rebuild failed; ejecting the replica");
                    let mut inner = me.lock();
                    if let Some(m) = inner.members.get_mut(&rid) {
                        m.link = None;
                    }
                    let Inner { sm, out, .. } = &mut *inner;
                    let _ = sm.replica_failed(rid, out);
                    me.execute(&mut inner);
                }
            }
            summary
        }))
    }

    async fn rebuild(
        &self,
        rid: ReplicaId,
        dst: &Control,
        snap: &str,
        progress: &Progress,
    ) -> Result<(), VolumeError> {
        let src = self.rw_member().ok_or_else(|| {
            VolumeError::Precondition("no healthy replica to rebuild from".into())
        })?;
        let names = frozen_names(&src.info().await?);
        resync(&src, dst, &names, false, self.epoch, progress).await?;
        {
            let mut inner = self.lock();
            let Inner {
                sm,
                out,
                members,
                ejected,
                ..
            } = &mut *inner;
            sm.set_rw(rid, out)?;
            // The replicas this one replaces leave the member list; their ids
            // stay recorded as ejected so crash recovery never trusts them.
            let replaced: Vec<ReplicaId> = sm
                .modes()
                .filter(|(_, m)| *m == Mode::Err)
                .map(|(r, _)| r)
                .collect();
            for r in replaced {
                let _ = sm.remove_replica(r, out);
                if let Some(m) = members.remove(&r) {
                    ejected.insert(m.uuid);
                }
            }
            if let Some(m) = members.get(&rid) {
                ejected.remove(&m.uuid);
            }
            self.execute(&mut inner);
        }
        self.record_ejected().await;
        // The system snapshot has served its purpose: fold it back.
        for (_, c) in self.live_members() {
            let (n, epoch) = (snap.to_owned(), self.epoch);
            if let Err(e) = c
                .call_long("deleting the rebuild snapshot", |mut cl| async move {
                    cl.delete_snapshot(pb::DeleteSnapshotRequest { name: n, epoch })
                        .await
                })
                .await
            {
                tracing::warn!(error = %e, "could not delete the rebuild snapshot");
            }
        }
        Ok(())
    }

    /// Writes the current set of ejected replica ids to every live replica.
    async fn record_ejected(&self) {
        let ejected: Vec<String> = self.lock().ejected.iter().cloned().collect();
        for (_, c) in self.live_members() {
            let (ej, epoch) = (ejected.clone(), self.epoch);
            if let Err(e) = c
                .call("recording ejected replicas", |mut cl| async move {
                    cl.set_ejected(pb::SetEjectedRequest { ejected: ej, epoch })
                        .await
                })
                .await
            {
                tracing::warn!(error = %e, "could not record the ejected set");
            }
        }
    }

    /// Removes a replica (by address or id) from the volume.
    pub async fn remove_replica(&self, which: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        let mut inner = self.lock();
        let rid = inner
            .members
            .iter()
            .find(|(_, m)| m.control.addr == which || m.uuid == which)
            .map(|(r, _)| *r)
            .ok_or_else(|| VolumeError::NotFound(format!("no replica {which:?} in this volume")))?;
        let Inner { sm, out, .. } = &mut *inner;
        sm.remove_replica(rid, out)?;
        inner.members.remove(&rid);
        self.execute(&mut inner);
        Ok(())
    }

    /// Checks every block of every RW replica against its stored CRC (each
    /// replica's `Scrub`, all at once). With `repair`, each replica found
    /// with corrupt blocks is then, one at a time, removed and added back:
    /// the resync copies the blocks whose CRCs differ from a healthy
    /// replica's, and the replica's corrupt blocks were given CRC entries
    /// that differ. A replica that cannot be repaired (the last RW one, or
    /// a rebuild that fails) says why in its report. Each replica reads no
    /// faster than `max_bytes_per_sec` (0: no limit). Scrubs run one at a
    /// time; a second waits for the first (see [`Volume::try_scrub`]).
    pub async fn scrub(&self, repair: bool, max_bytes_per_sec: u64) -> Vec<epb::ReplicaScrub> {
        let one = self.scrub_lock.lock().await;
        self.scrub_holding(one, repair, max_bytes_per_sec).await
    }

    /// [`Volume::scrub`], or `None` at once if a scrub is already running.
    pub async fn try_scrub(
        &self,
        repair: bool,
        max_bytes_per_sec: u64,
    ) -> Option<Vec<epb::ReplicaScrub>> {
        let one = self.scrub_lock.try_lock().ok()?;
        Some(self.scrub_holding(one, repair, max_bytes_per_sec).await)
    }

    /// A scrub, holding the scrub lock.
    async fn scrub_holding(
        &self,
        _one: tokio::sync::MutexGuard<'_, ()>,
        repair: bool,
        max_bytes_per_sec: u64,
    ) -> Vec<epb::ReplicaScrub> {
        self.with_scrub_record(|r| r.running = true);
        // Also when the caller goes away mid-scrub (this future dropped).
        let _running = Cleanup(|| self.with_scrub_record(|r| r.running = false));
        let reports = self.scrub_once(repair, max_bytes_per_sec).await;
        self.with_scrub_record(|r| {
            r.runs += 1;
            r.replicas_repaired += reports.iter().filter(|x| x.repaired).count() as u64;
            r.last_finished_unix = crate::scrub::now_unix();
            r.last = reports.clone();
        });
        reports
    }

    fn with_scrub_record<T>(&self, f: impl FnOnce(&mut crate::scrub::Record) -> T) -> T {
        f(&mut self.scrub_record.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The scrub schedule the volume was started with.
    pub fn scrub_policy(&self) -> crate::scrub::Policy {
        self.scrub_policy
    }

    /// Records when the next scheduled scrub starts (0: none planned).
    pub fn set_next_scrub(&self, unix: i64) {
        self.with_scrub_record(|r| r.next_unix = unix);
    }

    /// What the RW replicas say of themselves (those that answer).
    pub async fn rw_replica_infos(&self) -> Vec<pb::ReplicaInfo> {
        let controls: Vec<Control> = {
            let inner = self.lock();
            inner
                .members
                .iter()
                .filter(|(r, _)| inner.sm.mode(**r) == Some(Mode::Rw))
                .map(|(_, m)| m.control.clone())
                .collect()
        };
        let infos = futures::future::join_all(controls.iter().map(|c| c.info())).await;
        infos.into_iter().filter_map(Result::ok).collect()
    }

    async fn scrub_once(&self, repair: bool, max_bytes_per_sec: u64) -> Vec<epb::ReplicaScrub> {
        let targets: Vec<(String, Control)> = {
            let inner = self.lock();
            inner
                .members
                .iter()
                .filter(|(r, _)| inner.sm.mode(**r) == Some(Mode::Rw))
                .map(|(_, m)| (m.uuid.clone(), m.control.clone()))
                .collect()
        };
        let epoch = self.epoch;
        let scrubs = targets.iter().map(|(id, c)| async move {
            // Without a rate limit the long-call bound alone applies. A
            // replica that cannot say what it stores fails the scrub call too.
            let stored = if max_bytes_per_sec == 0 {
                0
            } else {
                c.info().await.map_or(0, |i| crate::scrub::stored_bytes(&i))
            };
            let deadline = crate::scrub::replica_deadline(stored, max_bytes_per_sec);
            let r = c
                .call_within(deadline, "scrubbing", |mut cl| async move {
                    cl.scrub(pb::ScrubRequest {
                        epoch,
                        max_bytes_per_sec,
                    })
                    .await
                })
                .await;
            let mut report = epb::ReplicaScrub {
                address: c.addr.clone(),
                id: id.clone(),
                ..Default::default()
            };
            match r {
                Ok(s) => {
                    report.blocks_checked = s.blocks_checked;
                    report.corrupt_blocks = s.corrupt_blocks;
                    report.corrupt = s
                        .corrupt
                        .iter()
                        .map(|b| {
                            let layer = if b.layer.is_empty() { "head" } else { &b.layer };
                            format!("{layer}:{}", b.block)
                        })
                        .collect();
                }
                Err(e) => report.error = e.to_string(),
            }
            report
        });
        let mut reports = futures::future::join_all(scrubs).await;
        {
            let mut inner = self.lock();
            for r in &reports {
                if r.corrupt_blocks > 0 {
                    tracing::warn!(
                        replica = %r.address,
                        corrupt = r.corrupt_blocks,
                        repair,
                        "scrub found corrupt blocks"
                    );
                    inner.corrupt.insert(r.id.clone());
                } else if r.error.is_empty() {
                    inner.corrupt.remove(&r.id);
                }
            }
        }
        if repair {
            for r in reports.iter_mut().filter(|r| r.corrupt_blocks > 0) {
                match self.resync(&r.address).await {
                    Ok(()) => {
                        r.repaired = true;
                        self.lock().corrupt.remove(&r.id);
                    }
                    Err(why) => r.error = format!("repair failed: {why}"),
                }
            }
        }
        reports
    }

    /// Takes the replica at `addr` out and adds it back, waiting for its
    /// rebuild.
    async fn resync(&self, addr: &str) -> Result<(), String> {
        self.remove_replica(addr).await.map_err(|e| e.to_string())?;
        let task = self.add_replica(addr).await.map_err(|e| e.to_string())?;
        match task.await {
            Ok(done) => done,
            Err(e) => Err(format!("the rebuild did not finish: {e}")),
        }
    }

    /// The volume's state for the control API.
    pub fn status(&self) -> epb::VolumeStatus {
        let inner = self.lock();
        let mut replicas = Vec::new();
        let (mut rw, mut wo, mut err) = (0, 0, 0);
        for s in inner.sm.status() {
            let Some(m) = inner.members.get(&s.id) else {
                continue;
            };
            match s.mode {
                Mode::Rw => rw += 1,
                Mode::Wo => wo += 1,
                Mode::Err => err += 1,
            }
            replicas.push(epb::ReplicaStatus {
                address: m.control.addr.clone(),
                id: m.uuid.clone(),
                mode: match s.mode {
                    Mode::Rw => "RW",
                    Mode::Wo => "WO",
                    Mode::Err => "ERR",
                }
                .into(),
                rebuild: m.rebuild.as_ref().map(|p| {
                    let p = p.get();
                    let phases = p.phase_seconds();
                    epb::RebuildProgress {
                        rate_bytes_per_sec: p.rate_bytes_per_sec(),
                        state: p.state,
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                        blocks_copied: p.blocks_copied,
                        blocks_punched: p.blocks_punched,
                        plan_seconds: phases[0],
                        copy_seconds: phases[1],
                        finish_seconds: phases[2],
                        error: p.error,
                    }
                }),
                in_flight: s.in_flight as u64,
                errors: s.errors,
            });
        }
        let state = if rw == 0 {
            "faulted"
        } else if wo > 0 {
            "rebuilding"
        } else if err > 0 {
            "degraded"
        } else {
            "healthy"
        };
        let st = &self.stats;
        epb::VolumeStatus {
            volume: self.name.clone(),
            size: self.size.load(Ordering::Acquire),
            state: state.into(),
            epoch: self.epoch,
            revision: inner.sm.revision(),
            replicas,
            io: Some(epb::IoStats {
                reads: st.reads.count(),
                writes: st.writes.count(),
                flushes: st.flushes.load(Ordering::Relaxed),
                unmaps: st.unmaps.load(Ordering::Relaxed),
                read_p50_us: st.reads.quantile(0.5),
                read_p99_us: st.reads.quantile(0.99),
                write_p50_us: st.writes.quantile(0.5),
                write_p99_us: st.writes.quantile(0.99),
            }),
            nbd_clients: self.nbd_clients.load(Ordering::Acquire),
            scrub: Some(self.with_scrub_record(|r| r.status(&self.scrub_policy))),
        }
    }
}

/// Makes `dst` equal to `src`: reshape its chain, copy what differs in every
/// frozen layer (and the head with `include_head`), and finish the sync.
async fn resync(
    src: &Control,
    dst: &Control,
    names: &[String],
    include_head: bool,
    epoch: u64,
    progress: &Progress,
) -> Result<(), VolumeError> {
    let layers = names.to_vec();
    dst.call_long("preparing a sync", |mut c| async move {
        c.prepare_sync(pb::PrepareSyncRequest {
            layers,
            epoch,
            include_head,
        })
        .await
    })
    .await?;
    let mut all = names.to_vec();
    if include_head {
        all.push(String::new());
    }
    rebuild::sync_layers(src, dst, &all, epoch, BLOCK_SIZE as u64, progress).await?;
    dst.call_long("finishing a sync", |mut c| async move {
        c.finish_sync(pb::FinishSyncRequest { epoch }).await
    })
    .await?;
    Ok(())
}

/// A running rebuild: ends with `Err(why)` when it failed.
pub type RebuildTask = tokio::task::JoinHandle<Result<(), String>>;

/// The volume as a block device for frontends.
#[derive(Clone)]
pub struct Device(pub Arc<Volume>);

impl BlockDevice for Device {
    fn size(&self) -> u64 {
        self.0.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let v = &self.0;
        v.check_range(offset, len as u64)?;
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs * bs;
        let end = (offset + len as u64).div_ceil(bs) * bs;
        let data = v.read_blocks(first, end - first).await?;
        if first == offset && end - first == len as u64 {
            Ok(data)
        } else {
            let at = (offset - first) as usize;
            Ok(data.slice(at..at + len as usize))
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let v = &self.0;
        v.check_range(offset, data.len() as u64)?;
        v.write_any(offset, data).await?;
        if fua {
            v.flush_all().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush_all().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        let v = &self.0;
        v.check_range(offset, len as u64)?;
        // Trim is advisory: only the whole blocks inside the range.
        let bs = BLOCK_SIZE as u64;
        let first = offset.div_ceil(bs) * bs;
        let end = (offset + len as u64) / bs * bs;
        if end > first {
            v.unmap_blocks(first, end - first).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        let v = &self.0;
        let len = len as u64;
        v.check_range(offset, len)?;
        let bs = BLOCK_SIZE as u64;
        let first = offset.div_ceil(bs) * bs;
        let end = (offset + len) / bs * bs;
        if end > first {
            // Unmapped blocks read back as zeros (the replica guarantees it).
            v.unmap_blocks(first, end - first).await?;
            if offset < first {
                v.write_any(offset, Bytes::from(vec![0; (first - offset) as usize]))
                    .await?;
            }
            if end < offset + len {
                v.write_any(end, Bytes::from(vec![0; (offset + len - end) as usize]))
                    .await?;
            }
        } else {
            v.write_any(offset, Bytes::from(vec![0; len as usize]))
                .await?;
        }
        if fua {
            v.flush_all().await?;
        }
        Ok(())
    }

    fn multi_conn_safe(&self) -> bool {
        // A flush fans out to every replica and covers every write that
        // completed before it, whichever connection sent it.
        true
    }

    fn client_connected(&self) {
        self.0.nbd_clients.fetch_add(1, Ordering::AcqRel);
    }

    fn client_disconnected(&self) {
        self.0.nbd_clients.fetch_sub(1, Ordering::AcqRel);
    }
}
