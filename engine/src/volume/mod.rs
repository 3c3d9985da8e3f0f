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
//! The code is split by concern, each file an `impl Volume` block: `io`
//! (frontend requests and the block device), `members` (admission, rebuild,
//! removal, ejection), `snapshot` (snapshot, revert, expand) and `scrub`
//! (by hand and on schedule). Every change of the machine goes through
//! `Volume::feed`.
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
use crate::link::{DataLink, ReplyHandler};
use crate::replication::{Action, IoId, IoKind, Mode, ReplicaId, ReplicationError, Replicator};
use crate::stats::IoStats;
use zebu_replica_client::sync::{self, Progress, RebuildError};
use zebu_replica_client::{ClientError, Control};

mod io;
mod members;
pub mod scrub;
mod snapshot;

pub use io::Device;
use members::resync;

/// Block size of every Zebu volume.
pub const BLOCK_SIZE: u32 = 4096;
/// Largest request sent to a replica.
const MAX_REQUEST: u64 = 32 << 20;

/// Errors of volume operations.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A replica call failed.
    #[error(transparent)]
    Link(#[from] ClientError),
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
    pub scrub: scrub::Policy,
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
    scrub_policy: scrub::Policy,
    scrub_record: Mutex<scrub::Record>,
    stats: IoStats,
    nbd_clients: AtomicU32,
    /// The size after every change (an expansion), for frontends that tell
    /// their clients.
    resized: tokio::sync::watch::Sender<u64>,
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
        // Volumes only grow, and an expansion that a crash interrupted left
        // some replicas at the new size: the volume is as large as its
        // largest replica, and the others grow to it below (finishing the
        // expansion; the caller's retry of it then changes nothing).
        let mut size = opts.size;
        for (c, info) in &reachable {
            if info.size > size {
                tracing::warn!(
                    replica = %c.addr,
                    replica_size = info.size,
                    requested = opts.size,
                    "a replica holds more than --size (an expansion did not finish); serving the larger size and growing the others"
                );
                size = info.size;
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
                    if info.size < size {
                        let session = info.session;
                        info = c
                            .call("growing to the volume size", |mut cl| async move {
                                cl.expand(pb::ExpandRequest {
                                    size,
                                    epoch,
                                    session,
                                })
                                .await
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
                match resync(&src, &c, &names, true, epoch, info.session, &progress).await {
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
            size: AtomicU64::new(size),
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
            resized: tokio::sync::watch::Sender::new(size),
            me: me.clone(),
        });
        for (c, info) in members {
            let rid = volume.admit(c, info.id.clone(), info.session).await?;
            let mut inner = volume.lock();
            volume.feed(&mut inner, |sm, out| sm.set_rw(rid, out))?;
        }
        volume.record_ejected().await;
        // A rebuild that a crash interrupted left its system snapshot on
        // every replica (the resyncs above copied it where it was missing).
        for leftover in src_info.chain.iter().filter(|l| !l.head && !l.user_created) {
            tracing::info!(snapshot = %leftover.name, "folding back the snapshot of an unfinished rebuild");
            volume.fold_system_snapshot(&leftover.name).await;
        }
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

    /// The volume's size, seen changing after each expansion.
    pub fn size_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resized.subscribe()
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
            let rid = self.feed(&mut inner, |sm, out| sm.add_replica(out))?;
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
                self.drop_member(&mut self.lock(), rid);
                Err(e.into())
            }
        }
    }

    /// Feeds one event to the replication machine and executes the actions
    /// it queued, and those they cause; returns the event's result. Every
    /// change of the machine goes through here, under the volume's mutex.
    fn feed<T>(
        &self,
        inner: &mut Inner,
        event: impl FnOnce(&mut Replicator, &mut Vec<Action>) -> T,
    ) -> T {
        let Inner { sm, out, .. } = inner;
        let result = event(sm, out);
        self.execute(inner);
        result
    }

    /// Fails `replica`: its data link is dropped (which cuts its connection)
    /// and the machine ejects it, or keeps it when it is the last healthy
    /// one. A refusal of the machine (an unknown replica) is logged.
    fn fail_replica(&self, inner: &mut Inner, replica: ReplicaId) {
        if let Some(m) = inner.members.get_mut(&replica) {
            m.link = None;
        }
        if let Err(e) = self.feed(inner, |sm, out| sm.replica_failed(replica, out)) {
            tracing::warn!(error = %e, "a failed replica could not be ejected");
        }
    }

    /// Takes `replica` out of the machine and of the member list. A
    /// refusal of the machine (an unknown replica) is logged.
    fn drop_member(&self, inner: &mut Inner, replica: ReplicaId) {
        if let Err(e) = self.feed(inner, |sm, out| sm.remove_replica(replica, out)) {
            tracing::warn!(error = %e, "a replica could not be removed from the machine");
        }
        inner.members.remove(&replica);
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
                    if let Err(e) = sm.replica_failed(r, out) {
                        tracing::warn!(error = %e, "a replica whose stream is gone could not be failed");
                    }
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
                            alone: inner.pending.len() == 1,
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
                        let targets: Vec<(ReplicaId, Control, u64)> = on
                            .iter()
                            .filter_map(|r| {
                                inner
                                    .members
                                    .get(r)
                                    .map(|m| (*r, m.control.clone(), m.session))
                            })
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
                            for (rid, c, session) in targets {
                                let ej = uuids.clone();
                                let r = c
                                    .call("recording an ejection", |mut cl| async move {
                                        cl.set_ejected(pb::SetEjectedRequest {
                                            ejected: ej,
                                            epoch,
                                            session,
                                        })
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
                                let recorded = v.feed(&mut inner, |sm, out| {
                                    sm.ejection_recorded(token, &failed_on, out)
                                });
                                if let Err(e) = recorded {
                                    tracing::warn!(error = %e, "an ejection could not be recorded");
                                }
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
            self.feed(&mut inner, |sm, out| sm.reply(IoId(r.id), replica, ok, out));
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
        if let Some(m) = inner.members.get(&replica) {
            tracing::warn!(replica = %m.control.addr, %why, "replica data stream lost");
        }
        self.fail_replica(&mut inner, replica);
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
                    if let Some(m) = inner.members.get(&r) {
                        tracing::warn!(replica = %m.control.addr, timeout = ?limit, "replica did not answer in time");
                    }
                    v.fail_replica(&mut inner, r);
                }
            }
        });
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

/// A running rebuild: ends with `Err(why)` when it failed.
pub type RebuildTask = tokio::task::JoinHandle<Result<(), String>>;
