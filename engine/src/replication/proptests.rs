//! Property tests: the machine driven through a simulated network.
//!
//! The harness holds simulated replicas (each storing the revisions it
//! applied), the sends and ejection recordings not yet delivered, and a model
//! of every I/O. Random steps submit I/O, deliver sends in random order (OK or
//! error), fail replicas, deliver (or partially fail) recordings after random
//! delays, and add / promote / remove replicas. Every action is checked as it
//! is executed and global invariants are checked after every step; at the end
//! everything outstanding is delivered and liveness and durability are checked.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    Submit(IoKind),
    Deliver { pick: usize, ok: bool },
    Fail { pick: usize },
    Record { pick: usize, fail: u8 },
    Retry,
    Add,
    SetRw { pick: usize },
    Remove { pick: usize },
}

fn kind() -> impl Strategy<Value = IoKind> {
    prop_oneof![
        2 => Just(IoKind::Read),
        3 => Just(IoKind::Write),
        1 => Just(IoKind::Unmap),
        1 => Just(IoKind::Flush),
    ]
}

/// Steps; `fault` weighs replica failures (relative to 8 for deliveries) and
/// `error` is the probability that a delivered reply is an error.
fn step(fault: u32, error: f64) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => kind().prop_map(Step::Submit),
        8 => (any::<usize>(), prop::bool::weighted(1.0 - error))
            .prop_map(|(pick, ok)| Step::Deliver { pick, ok }),
        fault => any::<usize>().prop_map(|pick| Step::Fail { pick }),
        2 => (any::<usize>(), prop_oneof![4 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(pick, fail)| Step::Record { pick, fail }),
        1 => Just(Step::Retry),
        1 => Just(Step::Add),
        2 => any::<usize>().prop_map(|pick| Step::SetRw { pick }),
        1 => any::<usize>().prop_map(|pick| Step::Remove { pick }),
    ]
}

#[derive(Debug)]
struct IoModel {
    kind: IoKind,
    revision: Option<u64>,
    /// Replicas a fan-out I/O was sent to at submission.
    targets: BTreeSet<ReplicaId>,
    /// Replicas whose OK reply the machine accepted.
    acked: BTreeSet<ReplicaId>,
    /// Replicas a read was sent to, in order.
    read_sent: Vec<ReplicaId>,
    done: Option<Result<(), ReplicationError>>,
}

#[derive(Debug)]
struct Delivered {
    ejected: Vec<ReplicaId>,
    failed_on: Vec<ReplicaId>,
}

struct Sim {
    m: Replicator,
    out: Vec<Action>,
    /// Modes as announced by `ModeChanged` (removed replicas deleted).
    modes: BTreeMap<ReplicaId, Mode>,
    /// Every replica ever added.
    known: Vec<ReplicaId>,
    removed: BTreeSet<ReplicaId>,
    /// Revisions each simulated replica applied.
    stores: BTreeMap<ReplicaId, BTreeSet<u64>>,
    /// Number of I/Os submitted before each replica was added.
    added_at: BTreeMap<ReplicaId, usize>,
    ios: BTreeMap<IoId, IoModel>,
    order: Vec<IoId>,
    sends: Vec<(IoId, ReplicaId)>,
    recordings: Vec<(EjectionToken, Vec<ReplicaId>, Vec<ReplicaId>)>,
    delivered: Vec<Delivered>,
    ever_rw: bool,
    last_revision: u64,
    /// The I/O whose submission is being processed.
    submitting: Option<IoId>,
    /// The (io, replica) whose OK reply is being processed.
    delivering_ok: Option<(IoId, ReplicaId)>,
}

macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(TestCaseError::fail(format!($($arg)*)))
    };
}

impl Sim {
    fn new(rw: usize, wo: usize) -> Result<Self, TestCaseError> {
        let mut sim = Sim {
            m: Replicator::new(3, 1000),
            out: Vec::new(),
            modes: BTreeMap::new(),
            known: Vec::new(),
            removed: BTreeSet::new(),
            stores: BTreeMap::new(),
            added_at: BTreeMap::new(),
            ios: BTreeMap::new(),
            order: Vec::new(),
            sends: Vec::new(),
            recordings: Vec::new(),
            delivered: Vec::new(),
            ever_rw: false,
            last_revision: 1000,
            submitting: None,
            delivering_ok: None,
        };
        for i in 0..rw + wo {
            sim.step(&Step::Add)?;
            if i < rw {
                let id = sim.known[i];
                sim.m
                    .set_rw(id, &mut sim.out)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                sim.process()?;
            }
        }
        Ok(sim)
    }

    fn live(&self) -> Vec<ReplicaId> {
        self.modes
            .iter()
            .filter(|(_, m)| matches!(m, Mode::Rw | Mode::Wo))
            .map(|(id, _)| *id)
            .collect()
    }

    fn rw_count(&self) -> usize {
        self.modes.values().filter(|m| **m == Mode::Rw).count()
    }

    fn is_dead(&self, id: ReplicaId) -> bool {
        self.removed.contains(&id) || self.modes.get(&id) == Some(&Mode::Err)
    }

    /// Invariant (2): the fan-out I/O `io` may complete OK now.
    fn check_fan_out_ok(&self, io: IoId, model: &IoModel) -> Result<(), TestCaseError> {
        for t in &model.targets {
            if model.acked.contains(t) || self.removed.contains(t) {
                continue;
            }
            if self.modes.get(t) != Some(&Mode::Err) {
                fail!("{io} completed OK but live target {t} never acked it: {model:?}");
            }
            let durable = self
                .delivered
                .iter()
                .any(|d| d.ejected.contains(t) && d.failed_on.iter().all(|f| self.is_dead(*f)));
            if !durable {
                fail!(
                    "{io} completed OK but the ejection of target {t} was never recorded: \
                     {model:?}, delivered {:?}",
                    self.delivered
                );
            }
        }
        Ok(())
    }

    /// Executes (and checks) the actions of the last event.
    fn process(&mut self) -> Result<(), TestCaseError> {
        let mut actions = std::mem::take(&mut self.out);
        for a in &actions {
            match a {
                Action::Send { io, replica } => {
                    let mode = self.modes.get(replica).copied();
                    let Some(model) = self.ios.get_mut(io) else {
                        fail!("send of unknown {io}");
                    };
                    if model.done.is_some() {
                        fail!("send of completed {io}");
                    }
                    if model.kind == IoKind::Read {
                        // Invariant (4).
                        if mode != Some(Mode::Rw) {
                            fail!("read {io} sent to {replica} in mode {mode:?}");
                        }
                        if model.read_sent.contains(replica) {
                            fail!("read {io} sent twice to {replica}");
                        }
                        model.read_sent.push(*replica);
                    } else {
                        if !matches!(mode, Some(Mode::Rw | Mode::Wo)) {
                            fail!("{io} sent to {replica} in mode {mode:?}");
                        }
                        if self.submitting != Some(*io) {
                            fail!("fan-out {io} sent after its submission");
                        }
                        if !model.targets.insert(*replica) {
                            fail!("{io} sent twice to {replica}");
                        }
                    }
                    self.sends.push((*io, *replica));
                }
                Action::RecordEjection { token, ejected, on } => {
                    let want_ejected: Vec<_> = self
                        .modes
                        .iter()
                        .filter(|(_, m)| **m == Mode::Err)
                        .map(|(id, _)| *id)
                        .collect();
                    let mut got_ejected = ejected.clone();
                    got_ejected.sort();
                    let mut got_on = on.clone();
                    got_on.sort();
                    prop_assert_eq!(got_ejected, want_ejected, "ejected set of {}", token);
                    prop_assert_eq!(got_on, self.live(), "targets of {}", token);
                    prop_assert!(!on.is_empty());
                    self.recordings.push((*token, ejected.clone(), on.clone()));
                }
                Action::ModeChanged { replica, mode } => {
                    let prev = self.modes.insert(*replica, *mode);
                    let valid = matches!(
                        (prev, mode),
                        (None, Mode::Wo)
                            | (Some(Mode::Wo), Mode::Rw)
                            | (Some(Mode::Rw | Mode::Wo), Mode::Err)
                    );
                    if !valid {
                        fail!("invalid transition of {replica}: {prev:?} -> {mode}");
                    }
                    if prev.is_none() && self.known.contains(replica) {
                        fail!("replica id {replica} reused");
                    }
                    if *mode == Mode::Rw {
                        self.ever_rw = true;
                    }
                }
                Action::Complete { io, result } => {
                    let Some(model) = self.ios.get(io) else {
                        fail!("completion of unknown {io}");
                    };
                    // Invariant (1): at most once (exactly once is checked at the end).
                    if model.done.is_some() {
                        fail!("{io} completed twice: {model:?} then {result:?}");
                    }
                    if result.is_ok() {
                        if model.kind == IoKind::Read {
                            let Some((dio, r)) = self.delivering_ok else {
                                fail!("read {io} completed OK outside of an OK reply");
                            };
                            prop_assert_eq!(dio, *io);
                            prop_assert_eq!(model.read_sent.last(), Some(&r));
                            prop_assert_eq!(self.modes.get(&r), Some(&Mode::Rw));
                        } else {
                            self.check_fan_out_ok(*io, model)?;
                        }
                    }
                    if let Some(model) = self.ios.get_mut(io) {
                        model.done = Some(*result);
                    }
                }
            }
        }
        actions.clear();
        self.out = actions;
        Ok(())
    }

    fn check_global(&self) -> Result<(), TestCaseError> {
        if let Err(e) = self.m.check_consistency() {
            fail!("machine inconsistent: {e}");
        }
        let machine: BTreeMap<_, _> = self.m.modes().collect();
        prop_assert_eq!(
            &machine,
            &self.modes,
            "modes diverge from ModeChanged stream"
        );
        // Invariant (3).
        if self.ever_rw {
            prop_assert!(self.rw_count() >= 1, "no RW replica left: {:?}", self.modes);
        }
        let open = self.ios.values().filter(|m| m.done.is_none()).count();
        prop_assert_eq!(self.m.in_flight(), open);
        prop_assert_eq!(self.m.pending_recordings(), self.recordings.len());
        prop_assert_eq!(self.m.rw_count(), self.rw_count());
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Submit(kind) => {
                let had_rw = self.rw_count() > 0;
                let s = self.m.submit(kind, &mut self.out);
                if self.ios.contains_key(&s.io) {
                    fail!("{} reused", s.io);
                }
                if had_rw && kind.takes_revision() {
                    prop_assert_eq!(s.revision, Some(self.last_revision + 1));
                    self.last_revision += 1;
                } else {
                    prop_assert_eq!(s.revision, None);
                }
                if !had_rw {
                    prop_assert_eq!(
                        &self.out,
                        &vec![Action::Complete {
                            io: s.io,
                            result: Err(ReplicationError::NoHealthyReplica)
                        }]
                    );
                }
                self.ios.insert(
                    s.io,
                    IoModel {
                        kind,
                        revision: s.revision,
                        targets: BTreeSet::new(),
                        acked: BTreeSet::new(),
                        read_sent: Vec::new(),
                        done: None,
                    },
                );
                self.order.push(s.io);
                self.submitting = Some(s.io);
                let r = self.process();
                self.submitting = None;
                r?;
                if let Some(model) = self.ios.get(&s.io)
                    && kind.is_fan_out()
                    && had_rw
                {
                    prop_assert_eq!(
                        model.targets.iter().copied().collect::<Vec<_>>(),
                        self.live(),
                        "fan-out must go to every RW and WO replica"
                    );
                }
            }
            Step::Deliver { pick, ok } => {
                if self.sends.is_empty() {
                    return Ok(());
                }
                let (io, r) = self.sends.swap_remove(pick % self.sends.len());
                let Some(model) = self.ios.get(&io) else {
                    fail!("pending send of unknown {io}");
                };
                if ok && let Some(rev) = model.revision {
                    self.stores.entry(r).or_default().insert(rev);
                }
                self.delivering_ok = ok.then_some((io, r));
                let accepted = self.m.reply(io, r, ok, &mut self.out);
                if accepted {
                    if !matches!(self.modes.get(&r), Some(Mode::Rw | Mode::Wo)) {
                        fail!("reply from dead {r} accepted");
                    }
                    if let Some(model) = self.ios.get_mut(&io) {
                        if model.done.is_some() {
                            fail!("reply for completed {io} accepted");
                        }
                        if ok {
                            model.acked.insert(r);
                        }
                    }
                } else if !self.out.is_empty() {
                    fail!("ignored reply produced actions: {:?}", self.out);
                }
                let res = self.process();
                self.delivering_ok = None;
                res?;
            }
            Step::Fail { pick } => {
                if self.known.is_empty() {
                    return Ok(());
                }
                let id = self.known[pick % self.known.len()];
                let res = self.m.replica_failed(id, &mut self.out);
                if self.removed.contains(&id) {
                    prop_assert_eq!(res, Err(ReplicationError::UnknownReplica(id)));
                } else {
                    prop_assert_eq!(res, Ok(()));
                }
                self.process()?;
            }
            Step::Record { pick, fail } => {
                if self.recordings.is_empty() {
                    return Ok(());
                }
                let (token, ejected, on) =
                    self.recordings.swap_remove(pick % self.recordings.len());
                let failed_on: Vec<_> = on
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| fail & (1 << (i % 8)) != 0)
                    .map(|(_, id)| *id)
                    .collect();
                self.delivered.push(Delivered {
                    ejected,
                    failed_on: failed_on.clone(),
                });
                let res = self.m.ejection_recorded(token, &failed_on, &mut self.out);
                prop_assert_eq!(res, Ok(()));
                self.process()?;
            }
            Step::Retry => {
                self.m.retry_ejection_recording(&mut self.out);
                self.process()?;
            }
            Step::Add => {
                let present = self.known.len() - self.removed.len();
                let res = self.m.add_replica(&mut self.out);
                if present >= MAX_REPLICAS {
                    prop_assert_eq!(res, Err(ReplicationError::TooManyReplicas));
                    return Ok(());
                }
                let Ok(id) = res else {
                    fail!("add_replica failed: {res:?}");
                };
                self.process()?;
                self.known.push(id);
                self.stores.insert(id, BTreeSet::new());
                self.added_at.insert(id, self.order.len());
            }
            Step::SetRw { pick } => {
                let present: Vec<_> = self.modes.keys().copied().collect();
                if present.is_empty() {
                    return Ok(());
                }
                let id = present[pick % present.len()];
                match self.modes.get(&id).copied() {
                    Some(Mode::Wo) => {
                        // Simulated rebuild: possible once every I/O submitted
                        // before the replica was added has completed; copies
                        // the data of an RW replica.
                        let since = self.added_at.get(&id).copied().unwrap_or(0);
                        let ready = self.order[..since]
                            .iter()
                            .all(|io| self.ios.get(io).is_some_and(|m| m.done.is_some()));
                        if !ready {
                            return Ok(());
                        }
                        let source = self
                            .modes
                            .iter()
                            .find(|(_, m)| **m == Mode::Rw)
                            .map(|(id, _)| *id);
                        if let Some(source) = source {
                            let data = self.stores.get(&source).cloned().unwrap_or_default();
                            self.stores.entry(id).or_default().extend(data);
                        }
                        prop_assert_eq!(self.m.set_rw(id, &mut self.out), Ok(()));
                        self.process()?;
                    }
                    Some(Mode::Rw) => {
                        prop_assert_eq!(self.m.set_rw(id, &mut self.out), Ok(()));
                        prop_assert!(self.out.is_empty());
                    }
                    Some(Mode::Err) => {
                        prop_assert_eq!(
                            self.m.set_rw(id, &mut self.out),
                            Err(ReplicationError::NotRebuilding {
                                replica: id,
                                mode: Mode::Err
                            })
                        );
                        prop_assert!(self.out.is_empty());
                    }
                    None => {}
                }
            }
            Step::Remove { pick } => {
                if self.known.is_empty() {
                    return Ok(());
                }
                let id = self.known[pick % self.known.len()];
                let expected = if self.removed.contains(&id) {
                    Err(ReplicationError::UnknownReplica(id))
                } else if self.modes.get(&id) == Some(&Mode::Rw) && self.rw_count() == 1 {
                    Err(ReplicationError::LastHealthyReplica(id))
                } else {
                    Ok(())
                };
                let res = self.m.remove_replica(id, &mut self.out);
                prop_assert_eq!(res, expected);
                if res.is_ok() {
                    self.removed.insert(id);
                    self.modes.remove(&id);
                } else {
                    prop_assert!(self.out.is_empty());
                }
                self.process()?;
            }
        }
        Ok(())
    }

    /// Delivers everything outstanding (successfully), in an order given by
    /// `seed`, then checks liveness and durability.
    fn drain_and_check(&mut self, mut seed: u64) -> Result<(), TestCaseError> {
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for _ in 0..1_000_000 {
            let step = if !self.sends.is_empty() {
                Step::Deliver {
                    pick: next(),
                    ok: true,
                }
            } else if !self.recordings.is_empty() {
                Step::Record {
                    pick: next(),
                    fail: 0,
                }
            } else {
                break;
            };
            self.step(&step)?;
            self.check_global()?;
        }
        prop_assert!(self.sends.is_empty() && self.recordings.is_empty());
        // Invariant (5): liveness.
        prop_assert_eq!(self.m.in_flight(), 0);
        prop_assert_eq!(self.m.pending_recordings(), 0);
        for (io, model) in &self.ios {
            if model.done.is_none() {
                fail!("{io} never completed: {model:?}");
            }
        }
        for s in self.m.status() {
            prop_assert_eq!(s.in_flight, 0, "{} still has I/O in flight", s.id);
        }
        // Invariant (6): every RW replica holds every write completed OK.
        for (id, mode) in &self.modes {
            if *mode != Mode::Rw {
                continue;
            }
            let store = self.stores.get(id).cloned().unwrap_or_default();
            for (io, model) in &self.ios {
                if let (Some(Ok(())), Some(rev)) = (model.done, model.revision)
                    && !store.contains(&rev)
                {
                    fail!("RW replica {id} lacks revision {rev} of {io}, completed OK");
                }
            }
        }
        Ok(())
    }
}

fn run(rw: usize, wo: usize, steps: &[Step], seed: u64) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(rw, wo)?;
    sim.check_global()?;
    for step in steps {
        sim.step(step)?;
        sim.check_global()?;
    }
    sim.drain_and_check(seed)
}

/// `cases` cases unless `PROPTEST_CASES` is set (for longer soak runs).
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    // Keep the source tree clean: no regression files.
    config.failure_persistence = None;
    config
}

proptest! {
    #![proptest_config(config(512))]

    /// Mostly healthy replicas: long runs with occasional faults.
    #[test]
    fn simulated_network_mostly_healthy(
        rw in 1usize..=3,
        wo in 0usize..=1,
        steps in prop::collection::vec(step(1, 0.03), 1..300),
        seed in any::<u64>(),
    ) {
        run(rw, wo, &steps, seed)?;
    }

    /// Frequent failures, error replies and recording failures, including
    /// volumes that start without any RW replica.
    #[test]
    fn simulated_network_faulty(
        rw in 0usize..=4,
        wo in 0usize..=2,
        steps in prop::collection::vec(step(3, 0.2), 1..200),
        seed in any::<u64>(),
    ) {
        run(rw, wo, &steps, seed)?;
    }
}

/// The harness itself must be able to fail: a machine that completes a write
/// without waiting for a durable ejection is caught by invariant (2).
#[test]
fn harness_detects_premature_completion() {
    let mut sim = Sim::new(2, 0).expect("setup");
    sim.step(&Step::Submit(IoKind::Write)).expect("submit");
    let (io, _) = sim.sends[0];
    let ids = sim.known.clone();
    // Ack from the first replica, then pretend the second was ejected and the
    // write completed before any recording was delivered.
    sim.ios.get_mut(&io).expect("model").acked.insert(ids[0]);
    sim.modes.insert(ids[1], Mode::Err);
    sim.out.push(Action::Complete { io, result: Ok(()) });
    assert!(sim.process().is_err());
}
