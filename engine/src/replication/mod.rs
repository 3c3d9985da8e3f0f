//! Sans-IO replication state machine.
//!
//! [`Replicator`] decides, for one volume, which replica every frontend I/O goes
//! to, when it completes and with what result, and when a replica is ejected.
//! It does no I/O at all: no sockets, timers, clocks or async. The async layer
//! (which owns one gRPC stream per replica, the request payloads and the timers)
//! feeds it *events* (method calls) and executes the [`Action`]s it appends to a
//! caller-supplied `Vec<Action>`, in order.
//!
//! # Replica modes
//!
//! * [`Mode::Rw`]: healthy; receives every write/unmap/flush and serves reads.
//! * [`Mode::Wo`]: rebuilding; receives every write/unmap/flush, serves no reads.
//!   [`Replicator::add_replica`] creates replicas in this mode and
//!   [`Replicator::set_rw`] promotes them once rebuilt.
//! * [`Mode::Err`]: ejected; receives nothing. Terminal until the replica is
//!   removed with [`Replicator::remove_replica`] (a replacement is added under a
//!   fresh [`ReplicaId`]).
//!
//! # Rules
//!
//! * Write, unmap and flush fan out at submission to every RW and WO replica
//!   (the *targets*). Write and unmap take the next revision. If no RW replica
//!   exists, the I/O fails at once with [`ReplicationError::NoHealthyReplica`].
//! * A read goes to one RW replica, the least loaded one (ties broken
//!   round-robin). If that replica fails or is ejected or removed, the read is
//!   retried on an RW replica it has not tried yet; if none is left it fails.
//! * A replica *fails* when it answers an I/O with an error, when the async
//!   layer reports it broken ([`Replicator::replica_failed`]), or when recording
//!   an ejection on it fails. A failed replica is ejected (mode ERR) and the
//!   machine asks for the ejection to be recorded durably on every surviving RW
//!   and WO replica ([`Action::RecordEjection`]).
//! * The last RW replica is never ejected: if it fails, the I/Os that failed on
//!   it fail (with [`ReplicationError::LastHealthyReplicaFailed`] or
//!   [`ReplicationError::EjectionNotRecorded`]) and it stays RW. WO replicas can
//!   always be ejected.
//!
//! # Invariants
//!
//! * Invariant: no fan-out I/O (write, unmap, flush) completes OK until each of
//!   its targets has acked it, or has been ejected *and* that ejection has been
//!   durably recorded, or has been removed with [`Replicator::remove_replica`].
//! * Invariant: the number of RW replicas never drops to zero through ejection,
//!   and [`Replicator::remove_replica`] refuses to remove the last RW replica.
//!   (It can be zero only before the first [`Replicator::set_rw`].)
//! * Invariant: reads are only sent to RW replicas, and never twice to the same
//!   replica for one read.
//! * Invariant: every I/O returned by [`Replicator::submit`] gets exactly one
//!   [`Action::Complete`]; no [`Action::Send`] for an I/O follows its completion.
//! * Invariant: replies from ejected or removed replicas, duplicate replies and
//!   replies for unknown or already completed I/Os change nothing.
//! * Invariant: every [`Action::RecordEjection`] carries the *full* set of
//!   currently ejected replicas (recording is idempotent and cumulative) and
//!   targets every RW and WO replica.
//! * Invariant: revisions strictly increase; each dispatched write or unmap
//!   takes exactly one.
//! * Liveness: once every [`Action::Send`] has been answered (by
//!   [`Replicator::reply`] or [`Replicator::replica_failed`]) and every
//!   [`Action::RecordEjection`] has been reported back with
//!   [`Replicator::ejection_recorded`], [`Replicator::in_flight`] is zero.
//!
//! # Driving the machine (the async layer's recipe)
//!
//! 1. At start: `Replicator::new(epoch, revision)`, then for each replica that
//!    is known to be in sync `add_replica` + `set_rw`; for the others
//!    `add_replica` and start a rebuild.
//! 2. Frontend request: `let s = r.submit(kind, &mut out)`; store the request
//!    (offset, length, payload) keyed by `s.io`, stamp `s.revision` (writes and
//!    unmaps) and the epoch on it, then execute `out`.
//! 3. Executing actions, in order:
//!    * [`Action::Send`]: send the stored request `io` to `replica`, using
//!      `io.0` as the wire request id. A read may be sent several times (to
//!      different replicas) if an earlier target fails.
//!    * [`Action::Complete`]: answer the frontend and drop the stored request.
//!      For a read completing OK, the data is the payload of the reply that was
//!      being processed (see below).
//!    * [`Action::RecordEjection`]: call `SetEjected(ejected)` on every replica
//!      in `on`, then report with `ejection_recorded(token, failed_on)`, where
//!      `failed_on` lists the replicas of `on` on which it failed or timed out.
//!      Always report, even if everything failed.
//!    * [`Action::ModeChanged`]: update status/metrics; on [`Mode::Err`] the
//!      stream to that replica may be torn down (anything it still says is
//!      ignored).
//! 4. Wire reply: `reply(IoId(id), replica, ok, &mut out)`, `ok` being false for
//!    any error status or a read payload whose CRC does not match. **Read
//!    payload contract:** an OK read completes only inside the `reply` call of
//!    the OK reply from its current target, so keep that reply's payload while
//!    executing the actions of that call and hand it to the frontend on the
//!    `Complete { io, result: Ok(()) }` for that read; if the call emits no such
//!    completion (it returned `false`, or the read is still in flight) drop it.
//! 5. A stream breaks or a request times out: `replica_failed(replica, &mut out)`.
//!    Requests still queued to it need no reply afterwards.
//! 6. Drain / quiesce: stop submitting and wait until `in_flight() == 0`.
//!
//! Writes submitted before [`Replicator::add_replica`] are not sent to the new
//! replica: the rebuild must cover them (e.g. copy only after they completed).
//! Likewise, a replica added after a `RecordEjection` was issued does not get
//! that record; the rebuild is expected to copy the ejected set.
//!
//! # Cost
//!
//! Submission, replies and completions are O(number of replicas) with no heap
//! allocation once the in-flight table and the caller's action buffer reached
//! their working size (in-flight I/Os live in a generation-checked slab; targets
//! are bitmasks). Failures, recordings and membership changes scan the
//! in-flight table and may allocate. At most [`MAX_REPLICAS`] replicas
//! (including ejected ones not yet removed) exist at a time.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

/// Maximum number of replicas (in any mode) that can exist at the same time.
pub const MAX_REPLICAS: usize = 64;

/// Identifies one replica of the volume; assigned by
/// [`Replicator::add_replica`] and never reused by the same [`Replicator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId(pub u32);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Identifies one submitted frontend I/O. Opaque: the async layer uses the
/// inner value as the wire request id and rebuilds the `IoId` from a reply's
/// id. Ids of completed I/Os are not reused for a long time (the slab slot
/// generation is part of the id), so stale replies are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoId(pub u64);

impl IoId {
    fn new(generation: u32, index: usize) -> Self {
        IoId((u64::from(generation) << 32) | (index as u64 & 0xffff_ffff))
    }

    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Display for IoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io#{:x}", self.0)
    }
}

/// Identifies one [`Action::RecordEjection`]; handed back in
/// [`Replicator::ejection_recorded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EjectionToken(pub u64);

impl fmt::Display for EjectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ejection#{}", self.0)
    }
}

/// Mode of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Healthy: receives every write/unmap/flush and serves reads.
    #[serde(rename = "RW")]
    Rw,
    /// Rebuilding: receives every write/unmap/flush but serves no reads.
    #[serde(rename = "WO")]
    Wo,
    /// Ejected: receives nothing.
    #[serde(rename = "ERR")]
    Err,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Rw => "RW",
            Mode::Wo => "WO",
            Mode::Err => "ERR",
        })
    }
}

/// Kind of a frontend I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Read from one RW replica.
    Read,
    /// Write to every RW and WO replica; takes a revision.
    Write,
    /// Deallocate on every RW and WO replica; takes a revision.
    Unmap,
    /// Make completed writes durable on every RW and WO replica.
    Flush,
}

impl IoKind {
    /// True for the kinds sent to every RW and WO replica (all but reads).
    pub fn is_fan_out(self) -> bool {
        !matches!(self, IoKind::Read)
    }

    /// True for the kinds that take a revision (write and unmap).
    pub fn takes_revision(self) -> bool {
        matches!(self, IoKind::Write | IoKind::Unmap)
    }
}

/// Errors of the replication machine: failed I/O completions (all of which the
/// frontend reports as EIO) and refused membership or control calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// No RW replica could serve the I/O.
    #[error(
        "no healthy (RW) replica is available to serve the I/O; add a replica and promote it \
         with set_rw once rebuilt, or check why the replicas were ejected"
    )]
    NoHealthyReplica,
    /// The I/O failed on the last RW replica, which is kept RW rather than
    /// ejected.
    #[error(
        "I/O failed on replica {replica}, the last healthy (RW) replica, which is kept instead of \
         being ejected; check that replica's process, disk and connectivity"
    )]
    LastHealthyReplicaFailed {
        /// The last RW replica.
        replica: ReplicaId,
    },
    /// The I/O waited for an ejection to be recorded, and recording it failed
    /// on the last RW replica, so the ejection is not durable.
    #[error(
        "the ejection of a failed replica could not be recorded on replica {replica}, the last \
         healthy (RW) replica; the I/O cannot be acknowledged safely. Fix that replica and retry \
         the recording (retry_ejection_recording)"
    )]
    EjectionNotRecorded {
        /// The last RW replica on which recording failed.
        replica: ReplicaId,
    },
    /// The replica id is not (or no longer) part of the replica set.
    #[error("replica {0} is not part of this volume's replica set (never added, or removed)")]
    UnknownReplica(ReplicaId),
    /// Refused to remove the last RW replica.
    #[error(
        "refusing to remove replica {0}: it is the last healthy (RW) replica; promote another \
         replica with set_rw first"
    )]
    LastHealthyReplica(ReplicaId),
    /// Only a WO (rebuilding) replica can be promoted to RW.
    #[error(
        "replica {replica} is {mode}; only a WO (rebuilding) replica can be promoted to RW \
         (an ejected replica must be removed and re-added)"
    )]
    NotRebuilding {
        /// The replica.
        replica: ReplicaId,
        /// Its current mode.
        mode: Mode,
    },
    /// The replica set is full.
    #[error(
        "cannot add a replica: {MAX_REPLICAS} replicas (ejected ones included) already exist \
         or replica ids are exhausted; remove ejected replicas first"
    )]
    TooManyReplicas,
    /// The token was not issued, or was already reported.
    #[error("{0} is unknown or was already reported; report each RecordEjection exactly once")]
    UnknownEjectionToken(EjectionToken),
}

/// What the async layer must do; appended by every event method to the
/// caller's buffer and meant to be executed in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the stored request `io` to `replica`.
    Send {
        /// The I/O.
        io: IoId,
        /// The replica to send it to.
        replica: ReplicaId,
    },
    /// Durably record, on every replica of `on`, that the replicas of `ejected`
    /// are ejected (`SetEjected`), then call [`Replicator::ejection_recorded`].
    RecordEjection {
        /// Token to hand back.
        token: EjectionToken,
        /// Every currently ejected replica (the full set, not a delta).
        ejected: Vec<ReplicaId>,
        /// Every RW and WO replica.
        on: Vec<ReplicaId>,
    },
    /// Complete the frontend I/O `io`. A read's data is the payload of the OK
    /// reply being processed when this is emitted.
    Complete {
        /// The I/O.
        io: IoId,
        /// Its outcome; any error is reported to the frontend as EIO.
        result: Result<(), ReplicationError>,
    },
    /// A replica changed mode (also emitted for changes the caller requested,
    /// so status can be maintained in one place).
    ModeChanged {
        /// The replica.
        replica: ReplicaId,
        /// Its new mode.
        mode: Mode,
    },
}

/// Result of [`Replicator::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// Id of the new I/O.
    pub io: IoId,
    /// Revision to stamp on the request: `Some` for a dispatched write or
    /// unmap, `None` for reads, flushes and I/Os that failed at submission.
    pub revision: Option<u64>,
}

/// Status of one replica, for reporting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The replica.
    pub id: ReplicaId,
    /// Its mode.
    pub mode: Mode,
    /// Requests sent to it and still awaited (always 0 when ejected).
    pub in_flight: u32,
    /// Requests sent to it.
    pub sent: u64,
    /// OK replies accepted from it.
    pub acked: u64,
    /// Failures: error replies plus failure reports.
    pub errors: u64,
    /// For an ejected replica: whether its ejection is durably recorded.
    /// Always false for RW and WO replicas.
    pub ejection_durable: bool,
}

#[derive(Debug)]
struct Replica {
    id: ReplicaId,
    mode: Mode,
    ejection_durable: bool,
    in_flight: u32,
    sent: u64,
    acked: u64,
    errors: u64,
}

/// What an in-flight I/O still waits for.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// Write/unmap/flush. Bit `s` of `waiting` is set while the I/O waits for
    /// the replica in slot `s`: for its ack while that replica is RW/WO, for its
    /// ejection to become durable once it is ERR.
    FanOut { waiting: u64 },
    /// Read currently sent to slot `target`; `tried` holds every slot it was
    /// sent to (including `target`).
    Read { target: u8, tried: u64 },
}

#[derive(Debug)]
struct SlabSlot {
    generation: u32,
    entry: Option<Pending>,
}

/// In-flight I/Os, indexed by the low half of [`IoId`].
#[derive(Debug, Default)]
struct Slab {
    slots: Vec<SlabSlot>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, entry: Pending) -> (usize, IoId) {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(SlabSlot {
                    generation: 0,
                    entry: None,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[index];
        slot.entry = Some(entry);
        self.len += 1;
        (index, IoId::new(slot.generation, index))
    }

    fn index_of(&self, io: IoId) -> Option<usize> {
        let index = io.index();
        let slot = self.slots.get(index)?;
        (slot.generation == io.generation() && slot.entry.is_some()).then_some(index)
    }

    fn get(&self, index: usize) -> Option<Pending> {
        self.slots.get(index).and_then(|s| s.entry)
    }

    fn set(&mut self, index: usize, pending: Pending) {
        if let Some(slot) = self.slots.get_mut(index)
            && slot.entry.is_some()
        {
            slot.entry = Some(pending);
        }
    }

    fn remove(&mut self, index: usize) -> Option<(IoId, Pending)> {
        let slot = self.slots.get_mut(index)?;
        let entry = slot.entry.take()?;
        let io = IoId::new(slot.generation, index);
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        self.len -= 1;
        Some((io, entry))
    }
}

/// Iterates over the indices of the set bits of `mask`, lowest first.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let s = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(s)
    })
}

/// The sans-IO replication state machine of one volume; see the
/// [module documentation](self) for its rules, invariants and how to drive it.
#[derive(Debug)]
pub struct Replicator {
    epoch: u64,
    revision: u64,
    next_replica_id: u32,
    /// Replica slots; bit `s` of the masks below refers to `replicas[s]`.
    replicas: Vec<Option<Replica>>,
    rw_mask: u64,
    wo_mask: u64,
    rr_cursor: usize,
    ios: Slab,
    next_token: u64,
    /// Outstanding recordings: token -> the ejected set it records.
    recordings: HashMap<u64, Vec<ReplicaId>>,
    /// Set when a replica was ejected during the current event; a
    /// `RecordEjection` is emitted at the end of the event.
    record_needed: bool,
}

impl Replicator {
    /// Creates a machine with no replicas for a volume opened at `epoch`, whose
    /// replicas are at `revision` (the next write or unmap takes
    /// `revision + 1`).
    pub fn new(epoch: u64, revision: u64) -> Self {
        Replicator {
            epoch,
            revision,
            next_replica_id: 0,
            replicas: Vec::new(),
            rw_mask: 0,
            wo_mask: 0,
            rr_cursor: 0,
            ios: Slab::default(),
            next_token: 0,
            recordings: HashMap::new(),
            record_needed: false,
        }
    }

    /// The volume's epoch, as given to [`Replicator::new`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last revision handed out (or the initial one).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of submitted I/Os not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ios.len
    }

    /// Number of [`Action::RecordEjection`]s not yet reported back.
    pub fn pending_recordings(&self) -> usize {
        self.recordings.len()
    }

    /// Number of RW replicas.
    pub fn rw_count(&self) -> usize {
        self.rw_mask.count_ones() as usize
    }

    /// Mode of `replica`, or `None` if it is not part of the set.
    pub fn mode(&self, replica: ReplicaId) -> Option<Mode> {
        self.slot_of(replica)
            .and_then(|s| self.rep(s))
            .map(|r| r.mode)
    }

    /// Every replica of the set with its mode, in slot order.
    pub fn modes(&self) -> impl Iterator<Item = (ReplicaId, Mode)> + '_ {
        self.replicas.iter().flatten().map(|r| (r.id, r.mode))
    }

    /// Status of every replica of the set, in slot order.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .flatten()
            .map(|r| ReplicaStatus {
                id: r.id,
                mode: r.mode,
                in_flight: r.in_flight,
                sent: r.sent,
                acked: r.acked,
                errors: r.errors,
                ejection_durable: r.mode == Mode::Err && r.ejection_durable,
            })
            .collect()
    }

    // ---- membership -------------------------------------------------------

    /// Adds a new replica in WO mode: it receives every write, unmap and flush
    /// submitted from now on, and no reads. Emits [`Action::ModeChanged`].
    pub fn add_replica(&mut self, out: &mut Vec<Action>) -> Result<ReplicaId, ReplicationError> {
        let slot = match self.replicas.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.replicas.len() < MAX_REPLICAS => {
                self.replicas.push(None);
                self.replicas.len() - 1
            }
            None => return Err(ReplicationError::TooManyReplicas),
        };
        let id = ReplicaId(self.next_replica_id);
        self.next_replica_id = self
            .next_replica_id
            .checked_add(1)
            .ok_or(ReplicationError::TooManyReplicas)?;
        self.replicas[slot] = Some(Replica {
            id,
            mode: Mode::Wo,
            ejection_durable: false,
            in_flight: 0,
            sent: 0,
            acked: 0,
            errors: 0,
        });
        self.wo_mask |= 1 << slot;
        out.push(Action::ModeChanged {
            replica: id,
            mode: Mode::Wo,
        });
        tracing::info!(replica = %id, "replica added (WO)");
        Ok(id)
    }

    /// Promotes a rebuilt WO replica to RW (it then serves reads). A no-op for
    /// an RW replica; refused for an ejected one. Emits [`Action::ModeChanged`].
    pub fn set_rw(
        &mut self,
        replica: ReplicaId,
        out: &mut Vec<Action>,
    ) -> Result<(), ReplicationError> {
        let slot = self
            .slot_of(replica)
            .ok_or(ReplicationError::UnknownReplica(replica))?;
        match self.rep(slot).map(|r| r.mode) {
            Some(Mode::Wo) => {
                self.set_mode(slot, Mode::Rw, out);
                tracing::info!(%replica, "replica promoted to RW");
                Ok(())
            }
            Some(Mode::Rw) => Ok(()),
            Some(mode) => Err(ReplicationError::NotRebuilding { replica, mode }),
            None => Err(ReplicationError::UnknownReplica(replica)),
        }
    }

    /// Removes a replica from the set. In-flight I/Os stop waiting for it (even
    /// for the durable recording of its ejection: the caller must already have
    /// removed it from the volume's durable membership) and may complete; reads
    /// sent to it are retried elsewhere. Refuses to remove the last RW replica.
    pub fn remove_replica(
        &mut self,
        replica: ReplicaId,
        out: &mut Vec<Action>,
    ) -> Result<(), ReplicationError> {
        let slot = self
            .slot_of(replica)
            .ok_or(ReplicationError::UnknownReplica(replica))?;
        let bit = 1u64 << slot;
        if self.rw_mask == bit {
            return Err(ReplicationError::LastHealthyReplica(replica));
        }
        self.replicas[slot] = None;
        self.rw_mask &= !bit;
        self.wo_mask &= !bit;
        tracing::info!(%replica, "replica removed");
        for index in 0..self.ios.slots.len() {
            match self.ios.get(index) {
                Some(Pending::FanOut { waiting }) if waiting & bit != 0 => {
                    let waiting = waiting & !bit;
                    self.ios.set(index, Pending::FanOut { waiting });
                    if waiting == 0 {
                        self.finish(index, Ok(()), out);
                    }
                }
                Some(Pending::Read { target, .. }) if usize::from(target) == slot => {
                    self.redispatch_read(index, out);
                }
                _ => {}
            }
        }
        self.flush_recording(out);
        Ok(())
    }

    // ---- I/O --------------------------------------------------------------

    /// Submits a frontend I/O. Appends the [`Action::Send`]s to execute, or an
    /// immediate failing [`Action::Complete`] if no RW replica exists. The
    /// caller must store the request under the returned id before executing
    /// the actions.
    pub fn submit(&mut self, kind: IoKind, out: &mut Vec<Action>) -> Submitted {
        if self.rw_mask == 0 {
            // Allocate and release an id so the failure has a unique IoId.
            let (index, _) = self.ios.insert(Pending::FanOut { waiting: 0 });
            let io = self.finish(index, Err(ReplicationError::NoHealthyReplica), out);
            return Submitted {
                io: io.unwrap_or(IoId(u64::MAX)),
                revision: None,
            };
        }
        if kind.is_fan_out() {
            let targets = self.rw_mask | self.wo_mask;
            let (_, io) = self.ios.insert(Pending::FanOut { waiting: targets });
            for s in bits(targets) {
                if let Some(r) = self.rep_mut(s) {
                    r.in_flight += 1;
                    r.sent += 1;
                    out.push(Action::Send { io, replica: r.id });
                }
            }
            let revision = if kind.takes_revision() {
                self.revision += 1;
                Some(self.revision)
            } else {
                None
            };
            Submitted { io, revision }
        } else {
            let (index, io) = self.ios.insert(Pending::Read {
                target: 0,
                tried: 0,
            });
            self.redispatch_read(index, out);
            Submitted { io, revision: None }
        }
    }

    /// Reports the reply of `replica` to the request `io` (`ok` false for any
    /// error, including a bad read CRC). Returns whether the reply was taken
    /// into account; replies from ejected or removed replicas, for unknown or
    /// completed I/Os, or duplicates are ignored (`false`, no action).
    ///
    /// An error reply fails the replica (see the module documentation); for a
    /// read, an OK reply completes the read within this call.
    pub fn reply(&mut self, io: IoId, replica: ReplicaId, ok: bool, out: &mut Vec<Action>) -> bool {
        let Some(slot) = self.slot_of(replica) else {
            tracing::trace!(%io, %replica, "reply from unknown replica ignored");
            return false;
        };
        let bit = 1u64 << slot;
        if self.live_mask() & bit == 0 {
            tracing::trace!(%io, %replica, "late reply from ejected replica ignored");
            return false;
        }
        let Some(index) = self.ios.index_of(io) else {
            tracing::trace!(%io, %replica, "reply for unknown or completed I/O ignored");
            return false;
        };
        match self.ios.get(index) {
            Some(Pending::FanOut { waiting }) if waiting & bit != 0 => {
                if ok {
                    if let Some(r) = self.rep_mut(slot) {
                        r.in_flight = r.in_flight.saturating_sub(1);
                        r.acked += 1;
                    }
                    let waiting = waiting & !bit;
                    self.ios.set(index, Pending::FanOut { waiting });
                    if waiting == 0 {
                        self.finish(index, Ok(()), out);
                    }
                } else {
                    self.io_failed_on(index, slot, out);
                }
            }
            Some(Pending::Read { target, .. }) if usize::from(target) == slot => {
                if ok {
                    if let Some(r) = self.rep_mut(slot) {
                        r.acked += 1;
                    }
                    self.finish(index, Ok(()), out);
                } else {
                    self.io_failed_on(index, slot, out);
                }
            }
            _ => {
                tracing::trace!(%io, %replica, "duplicate or unexpected reply ignored");
                return false;
            }
        }
        self.flush_recording(out);
        true
    }

    /// Reports that `replica` failed as a whole (stream broken, request timed
    /// out). It is ejected, or, if it is the last RW replica, every I/O waiting
    /// for it fails and it stays RW. A no-op for an already ejected replica.
    pub fn replica_failed(
        &mut self,
        replica: ReplicaId,
        out: &mut Vec<Action>,
    ) -> Result<(), ReplicationError> {
        let slot = self
            .slot_of(replica)
            .ok_or(ReplicationError::UnknownReplica(replica))?;
        if self.live_mask() & (1 << slot) != 0 {
            self.fail_replica(slot, out);
            self.flush_recording(out);
        }
        Ok(())
    }

    /// Reports the outcome of the [`Action::RecordEjection`] `token`:
    /// `failed_on` lists the replicas of its `on` on which recording failed.
    /// Those replicas fail in turn (which may eject them and emit a new
    /// recording). If recording failed on the last RW replica, the ejection is
    /// not durable and the I/Os waiting for it fail with
    /// [`ReplicationError::EjectionNotRecorded`]; otherwise they may complete.
    pub fn ejection_recorded(
        &mut self,
        token: EjectionToken,
        failed_on: &[ReplicaId],
        out: &mut Vec<Action>,
    ) -> Result<(), ReplicationError> {
        let ejected = self
            .recordings
            .remove(&token.0)
            .ok_or(ReplicationError::UnknownEjectionToken(token))?;
        let mut blocker = None;
        for &f in failed_on {
            let Some(slot) = self.slot_of(f) else {
                continue;
            };
            if self.live_mask() & (1 << slot) == 0 {
                continue;
            }
            tracing::warn!(replica = %f, %token, "recording an ejection failed");
            if !self.fail_replica(slot, out) {
                blocker = Some(f);
            }
        }
        let mut mask = 0u64;
        for &id in &ejected {
            if let Some(slot) = self.slot_of(id)
                && let Some(r) = self.rep(slot)
                && r.mode == Mode::Err
                && !r.ejection_durable
            {
                mask |= 1 << slot;
            }
        }
        match blocker {
            None => {
                tracing::info!(%token, ?ejected, "ejection recorded");
                self.mark_durable(mask, out);
            }
            Some(replica) => {
                tracing::error!(%token, ?ejected, %replica,
                    "ejection not recorded on the last RW replica");
                for index in 0..self.ios.slots.len() {
                    if let Some(Pending::FanOut { waiting }) = self.ios.get(index)
                        && waiting & mask != 0
                    {
                        self.finish(
                            index,
                            Err(ReplicationError::EjectionNotRecorded { replica }),
                            out,
                        );
                    }
                }
            }
        }
        self.flush_recording(out);
        Ok(())
    }

    /// Emits a new [`Action::RecordEjection`] if some ejection is not durably
    /// recorded and no recording is outstanding (e.g. after recording failed on
    /// the last RW replica and that replica recovered). Returns its token.
    pub fn retry_ejection_recording(&mut self, out: &mut Vec<Action>) -> Option<EjectionToken> {
        if !self.recordings.is_empty() {
            return None;
        }
        let undurable = self
            .replicas
            .iter()
            .flatten()
            .any(|r| r.mode == Mode::Err && !r.ejection_durable);
        if !undurable {
            return None;
        }
        self.record_needed = true;
        self.flush_recording(out)
    }

    // ---- internals --------------------------------------------------------

    fn slot_of(&self, id: ReplicaId) -> Option<usize> {
        self.replicas
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.id == id))
    }

    fn rep(&self, slot: usize) -> Option<&Replica> {
        self.replicas.get(slot).and_then(Option::as_ref)
    }

    fn rep_mut(&mut self, slot: usize) -> Option<&mut Replica> {
        self.replicas.get_mut(slot).and_then(Option::as_mut)
    }

    fn live_mask(&self) -> u64 {
        self.rw_mask | self.wo_mask
    }

    fn set_mode(&mut self, slot: usize, mode: Mode, out: &mut Vec<Action>) {
        let bit = 1u64 << slot;
        let Some(r) = self.rep_mut(slot) else {
            return;
        };
        r.mode = mode;
        let id = r.id;
        self.rw_mask &= !bit;
        self.wo_mask &= !bit;
        match mode {
            Mode::Rw => self.rw_mask |= bit,
            Mode::Wo => self.wo_mask |= bit,
            Mode::Err => {}
        }
        out.push(Action::ModeChanged { replica: id, mode });
    }

    /// Whether the live replica in `slot` may be ejected (last-RW rule).
    fn ejectable(&self, slot: usize) -> bool {
        let bit = 1u64 << slot;
        self.wo_mask & bit != 0 || (self.rw_mask & bit != 0 && self.rw_mask != bit)
    }

    /// The I/O at `index` failed on the live replica in `slot`.
    fn io_failed_on(&mut self, index: usize, slot: usize, out: &mut Vec<Action>) {
        let Some(r) = self.rep_mut(slot) else {
            return;
        };
        r.errors += 1;
        let replica = r.id;
        if self.ejectable(slot) {
            // A fan-out I/O keeps its bit and now waits for the ejection to
            // become durable; a read is retried elsewhere by `eject`.
            self.eject(slot, out);
        } else {
            tracing::error!(%replica, "I/O failed on the last RW replica");
            self.finish(
                index,
                Err(ReplicationError::LastHealthyReplicaFailed { replica }),
                out,
            );
        }
    }

    /// The live replica in `slot` failed as a whole. Returns true if it was
    /// ejected, false if it is the last RW replica (its pending I/Os failed).
    fn fail_replica(&mut self, slot: usize, out: &mut Vec<Action>) -> bool {
        let Some(r) = self.rep_mut(slot) else {
            return true;
        };
        r.errors += 1;
        let replica = r.id;
        if self.ejectable(slot) {
            self.eject(slot, out);
            return true;
        }
        tracing::error!(%replica, "last RW replica failed; failing its pending I/O");
        let bit = 1u64 << slot;
        let err = Err(ReplicationError::LastHealthyReplicaFailed { replica });
        for index in 0..self.ios.slots.len() {
            let pending_here = match self.ios.get(index) {
                Some(Pending::FanOut { waiting }) => waiting & bit != 0,
                Some(Pending::Read { target, .. }) => usize::from(target) == slot,
                None => false,
            };
            if pending_here {
                self.finish(index, err, out);
            }
        }
        false
    }

    /// Ejects the (ejectable) live replica in `slot`.
    fn eject(&mut self, slot: usize, out: &mut Vec<Action>) {
        if let Some(r) = self.rep_mut(slot) {
            tracing::warn!(replica = %r.id, mode = %r.mode, "ejecting replica");
            r.in_flight = 0;
            r.ejection_durable = false;
        }
        self.set_mode(slot, Mode::Err, out);
        self.record_needed = true;
        for index in 0..self.ios.slots.len() {
            if let Some(Pending::Read { target, .. }) = self.ios.get(index)
                && usize::from(target) == slot
            {
                self.redispatch_read(index, out);
            }
        }
    }

    /// Sends the read at `index` to an RW replica it has not tried, or fails it.
    fn redispatch_read(&mut self, index: usize, out: &mut Vec<Action>) {
        let Some(Pending::Read { tried, .. }) = self.ios.get(index) else {
            return;
        };
        let Some(slot) = self.pick_read_target(tried) else {
            self.finish(index, Err(ReplicationError::NoHealthyReplica), out);
            return;
        };
        let bit = 1u64 << slot;
        self.ios.set(
            index,
            Pending::Read {
                target: slot as u8,
                tried: tried | bit,
            },
        );
        let io = IoId::new(self.ios.slots[index].generation, index);
        if let Some(r) = self.rep_mut(slot) {
            r.in_flight += 1;
            r.sent += 1;
            out.push(Action::Send { io, replica: r.id });
        }
    }

    /// Least loaded RW replica not in `exclude`, ties broken round-robin.
    fn pick_read_target(&mut self, exclude: u64) -> Option<usize> {
        let candidates = self.rw_mask & !exclude;
        if candidates == 0 {
            return None;
        }
        let n = self.replicas.len();
        let mut best: Option<(usize, u32)> = None;
        for k in 0..n {
            let s = (self.rr_cursor + k) % n;
            if candidates & (1 << s) == 0 {
                continue;
            }
            let load = self.rep(s).map_or(u32::MAX, |r| r.in_flight);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((s, load));
            }
        }
        let (slot, _) = best?;
        self.rr_cursor = (slot + 1) % n;
        Some(slot)
    }

    /// Marks the ejections of the slots in `mask` durable and releases the
    /// fan-out I/Os that waited only for them.
    fn mark_durable(&mut self, mask: u64, out: &mut Vec<Action>) {
        if mask == 0 {
            return;
        }
        for s in bits(mask) {
            if let Some(r) = self.rep_mut(s) {
                r.ejection_durable = true;
            }
        }
        for index in 0..self.ios.slots.len() {
            if let Some(Pending::FanOut { waiting }) = self.ios.get(index)
                && waiting & mask != 0
            {
                let waiting = waiting & !mask;
                self.ios.set(index, Pending::FanOut { waiting });
                if waiting == 0 {
                    self.finish(index, Ok(()), out);
                }
            }
        }
    }

    /// Emits the `RecordEjection` owed by the current event, if any.
    fn flush_recording(&mut self, out: &mut Vec<Action>) -> Option<EjectionToken> {
        if !std::mem::take(&mut self.record_needed) {
            return None;
        }
        let mut ejected = Vec::new();
        let mut on = Vec::new();
        let mut undurable = 0u64;
        for (s, r) in self.replicas.iter().enumerate() {
            let Some(r) = r else { continue };
            if r.mode == Mode::Err {
                ejected.push(r.id);
                if !r.ejection_durable {
                    undurable |= 1 << s;
                }
            } else {
                on.push(r.id);
            }
        }
        if on.is_empty() {
            // No survivor to record on: vacuously durable (no RW replica, so no
            // I/O can be waiting anyway).
            self.mark_durable(undurable, out);
            return None;
        }
        let token = EjectionToken(self.next_token);
        self.next_token += 1;
        self.recordings.insert(token.0, ejected.clone());
        out.push(Action::RecordEjection { token, ejected, on });
        Some(token)
    }

    /// Completes the I/O at `index`; returns its id.
    fn finish(
        &mut self,
        index: usize,
        result: Result<(), ReplicationError>,
        out: &mut Vec<Action>,
    ) -> Option<IoId> {
        let (io, pending) = self.ios.remove(index)?;
        let live = self.live_mask();
        let still_sent = match pending {
            Pending::FanOut { waiting } => waiting & live,
            Pending::Read { target, .. } => (1u64 << target) & live,
        };
        for s in bits(still_sent) {
            if let Some(r) = self.rep_mut(s) {
                r.in_flight = r.in_flight.saturating_sub(1);
            }
        }
        out.push(Action::Complete { io, result });
        Some(io)
    }

    /// Cross-checks the internal bookkeeping (tests only).
    #[cfg(test)]
    pub(crate) fn check_consistency(&self) -> Result<(), String> {
        let mut rw = 0u64;
        let mut wo = 0u64;
        let mut undurable = 0u64;
        for (s, r) in self.replicas.iter().enumerate() {
            let Some(r) = r else { continue };
            match r.mode {
                Mode::Rw => rw |= 1 << s,
                Mode::Wo => wo |= 1 << s,
                Mode::Err if !r.ejection_durable => undurable |= 1 << s,
                Mode::Err => {}
            }
        }
        if rw != self.rw_mask || wo != self.wo_mask {
            return Err(format!(
                "masks {:b}/{:b} != modes {rw:b}/{wo:b}",
                self.rw_mask, self.wo_mask
            ));
        }
        if self.record_needed {
            return Err("record_needed left set after an event".into());
        }
        let mut counts = vec![0u32; self.replicas.len()];
        let mut len = 0;
        for slot in &self.ios.slots {
            let Some(p) = slot.entry else { continue };
            len += 1;
            match p {
                Pending::FanOut { waiting } => {
                    if waiting == 0 {
                        return Err("fan-out I/O waiting for nothing".into());
                    }
                    if waiting & !(rw | wo | undurable) != 0 {
                        return Err(format!("fan-out waits on dead slots: {waiting:b}"));
                    }
                    for s in bits(waiting & (rw | wo)) {
                        counts[s] += 1;
                    }
                }
                Pending::Read { target, tried } => {
                    let bit = 1u64 << target;
                    if rw & bit == 0 || tried & bit == 0 {
                        return Err(format!("read sent to non-RW slot {target}"));
                    }
                    counts[usize::from(target)] += 1;
                }
            }
        }
        if len != self.ios.len {
            return Err(format!("slab len {} != {len}", self.ios.len));
        }
        for (s, r) in self.replicas.iter().enumerate() {
            if let Some(r) = r
                && r.in_flight != counts[s]
            {
                return Err(format!(
                    "{} in_flight {} != computed {}",
                    r.id, r.in_flight, counts[s]
                ));
            }
        }
        Ok(())
    }
}
