//! Unit tests: one or more per rule of the replication machine.

use super::*;

/// A machine with `rw` RW replicas and `wo` WO replicas (added in that order).
fn setup(rw: usize, wo: usize) -> (Replicator, Vec<ReplicaId>) {
    let mut m = Replicator::new(7, 100);
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for i in 0..rw + wo {
        let id = m.add_replica(&mut out).expect("add");
        if i < rw {
            m.set_rw(id, &mut out).expect("set_rw");
        }
        ids.push(id);
    }
    (m, ids)
}

fn sends(out: &[Action]) -> Vec<(IoId, ReplicaId)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send { io, replica } => Some((*io, *replica)),
            _ => None,
        })
        .collect()
}

fn completions(out: &[Action]) -> Vec<(IoId, Result<(), ReplicationError>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Complete { io, result } => Some((*io, *result)),
            _ => None,
        })
        .collect()
}

fn recordings(out: &[Action]) -> Vec<(EjectionToken, Vec<ReplicaId>, Vec<ReplicaId>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::RecordEjection { token, ejected, on } => {
                Some((*token, ejected.clone(), on.clone()))
            }
            _ => None,
        })
        .collect()
}

fn mode_changes(out: &[Action]) -> Vec<(ReplicaId, Mode)> {
    out.iter()
        .filter_map(|a| match a {
            Action::ModeChanged { replica, mode } => Some((*replica, *mode)),
            _ => None,
        })
        .collect()
}

fn check(m: &Replicator) {
    if let Err(e) = m.check_consistency() {
        panic!("inconsistent machine: {e}");
    }
}

/// Submits `kind` and returns its id and the replicas it was sent to.
fn submit(m: &mut Replicator, kind: IoKind) -> (Submitted, Vec<ReplicaId>) {
    let mut out = Vec::new();
    let s = m.submit(kind, &mut out);
    let targets = sends(&out).into_iter().map(|(_, r)| r).collect();
    assert!(
        completions(&out).is_empty(),
        "unexpected completion {out:?}"
    );
    check(m);
    (s, targets)
}

fn reply(m: &mut Replicator, io: IoId, r: ReplicaId, ok: bool) -> Vec<Action> {
    let mut out = Vec::new();
    m.reply(io, r, ok, &mut out);
    check(m);
    out
}

#[test]
fn write_completes_only_after_every_target_acks() {
    let (mut m, ids) = setup(3, 0);
    let (s, targets) = submit(&mut m, IoKind::Write);
    assert_eq!(targets, ids);
    assert_eq!(s.revision, Some(101));
    assert!(reply(&mut m, s.io, ids[0], true).is_empty());
    assert!(reply(&mut m, s.io, ids[2], true).is_empty());
    assert_eq!(m.in_flight(), 1);
    let out = reply(&mut m, s.io, ids[1], true);
    assert_eq!(completions(&out), vec![(s.io, Ok(()))]);
    assert_eq!(m.in_flight(), 0);

    let (s2, _) = submit(&mut m, IoKind::Unmap);
    assert_eq!(s2.revision, Some(102));
    let (s3, _) = submit(&mut m, IoKind::Flush);
    assert_eq!(s3.revision, None);
    let (s4, _) = submit(&mut m, IoKind::Read);
    assert_eq!(s4.revision, None);
    assert_eq!(m.revision(), 102);
    assert_eq!(m.epoch(), 7);
}

#[test]
fn duplicate_ack_is_ignored() {
    let (mut m, ids) = setup(2, 0);
    let (s, _) = submit(&mut m, IoKind::Write);
    let mut out = Vec::new();
    assert!(m.reply(s.io, ids[0], true, &mut out));
    assert!(!m.reply(s.io, ids[0], true, &mut out));
    assert!(out.is_empty());
    check(&m);
    assert_eq!(
        completions(&reply(&mut m, s.io, ids[1], true)),
        vec![(s.io, Ok(()))]
    );
}

#[test]
fn error_reply_ejects_and_completion_waits_for_durable_recording() {
    let (mut m, ids) = setup(3, 0);
    let (s, _) = submit(&mut m, IoKind::Write);
    assert!(reply(&mut m, s.io, ids[0], true).is_empty());
    let out = reply(&mut m, s.io, ids[1], false);
    assert_eq!(mode_changes(&out), vec![(ids[1], Mode::Err)]);
    let recs = recordings(&out);
    assert_eq!(recs.len(), 1);
    let (token, ejected, on) = recs[0].clone();
    assert_eq!(ejected, vec![ids[1]]);
    assert_eq!(on, vec![ids[0], ids[2]]);
    assert!(completions(&out).is_empty());
    // Every remaining target acks: still not complete, the ejection is not durable.
    assert!(completions(&reply(&mut m, s.io, ids[2], true)).is_empty());
    assert_eq!(m.in_flight(), 1);
    assert_eq!(m.pending_recordings(), 1);
    let mut out = Vec::new();
    m.ejection_recorded(token, &[], &mut out)
        .expect("known token");
    check(&m);
    assert_eq!(completions(&out), vec![(s.io, Ok(()))]);
    assert_eq!(m.pending_recordings(), 0);
    let st = m.status();
    assert!(st[1].ejection_durable);
    assert_eq!(st[1].errors, 1);
}

#[test]
fn replica_failed_holds_every_io_sent_to_it_until_recorded() {
    let (mut m, ids) = setup(3, 0);
    let (w1, _) = submit(&mut m, IoKind::Write);
    let (w2, _) = submit(&mut m, IoKind::Flush);
    let mut out = Vec::new();
    m.replica_failed(ids[2], &mut out).expect("known");
    check(&m);
    assert_eq!(mode_changes(&out), vec![(ids[2], Mode::Err)]);
    let (token, ejected, on) = recordings(&out)[0].clone();
    assert_eq!((ejected, on), (vec![ids[2]], vec![ids[0], ids[1]]));
    for io in [w1.io, w2.io] {
        for &r in &ids[..2] {
            assert!(completions(&reply(&mut m, io, r, true)).is_empty());
        }
    }
    // The failed replica's late acks change nothing.
    let mut out = Vec::new();
    assert!(!m.reply(w1.io, ids[2], true, &mut out));
    assert!(out.is_empty());
    m.ejection_recorded(token, &[], &mut out).expect("known");
    let mut done = completions(&out);
    done.sort_by_key(|(io, _)| *io);
    let mut want = vec![(w1.io, Ok(())), (w2.io, Ok(()))];
    want.sort_by_key(|(io, _)| *io);
    assert_eq!(done, want);
    // Failing it again is a no-op.
    let mut out = Vec::new();
    m.replica_failed(ids[2], &mut out).expect("known");
    assert!(out.is_empty());
}

#[test]
fn ejecting_a_replica_that_already_acked_does_not_delay_the_io() {
    let (mut m, ids) = setup(3, 0);
    let (s, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, s.io, ids[0], true);
    reply(&mut m, s.io, ids[1], true);
    let mut out = Vec::new();
    m.replica_failed(ids[0], &mut out).expect("known");
    assert_eq!(recordings(&out).len(), 1);
    assert!(completions(&out).is_empty());
    assert_eq!(
        completions(&reply(&mut m, s.io, ids[2], true)),
        vec![(s.io, Ok(()))]
    );
}

#[test]
fn late_replies_from_ejected_replica_are_ignored() {
    let (mut m, ids) = setup(2, 0);
    let (s, _) = submit(&mut m, IoKind::Write);
    let (s2, _) = submit(&mut m, IoKind::Write);
    let out = reply(&mut m, s.io, ids[1], false);
    assert_eq!(recordings(&out).len(), 1);
    let mut out = Vec::new();
    assert!(!m.reply(s.io, ids[1], true, &mut out));
    assert!(!m.reply(s2.io, ids[1], false, &mut out));
    assert!(!m.reply(s2.io, ids[1], true, &mut out));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(m.mode(ids[1]), Some(Mode::Err));
    assert_eq!(m.mode(ids[0]), Some(Mode::Rw));
    check(&m);
}

#[test]
fn unknown_ids_are_ignored_or_reported() {
    let (mut m, ids) = setup(2, 0);
    let mut out = Vec::new();
    assert!(!m.reply(IoId(12345), ids[0], true, &mut out));
    assert!(!m.reply(IoId(u64::MAX), ids[0], false, &mut out));
    let (s, _) = submit(&mut m, IoKind::Write);
    assert!(!m.reply(s.io, ReplicaId(99), false, &mut out));
    assert!(out.is_empty());
    assert_eq!(
        m.replica_failed(ReplicaId(99), &mut out),
        Err(ReplicationError::UnknownReplica(ReplicaId(99)))
    );
    assert_eq!(
        m.ejection_recorded(EjectionToken(5), &[], &mut out),
        Err(ReplicationError::UnknownEjectionToken(EjectionToken(5)))
    );
    assert_eq!(
        m.set_rw(ReplicaId(99), &mut out),
        Err(ReplicationError::UnknownReplica(ReplicaId(99)))
    );
    assert_eq!(
        m.remove_replica(ReplicaId(99), &mut out),
        Err(ReplicationError::UnknownReplica(ReplicaId(99)))
    );
    assert!(out.is_empty());
    check(&m);
}

#[test]
fn stale_io_id_after_slot_reuse_is_ignored() {
    let (mut m, ids) = setup(1, 0);
    let (s1, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, s1.io, ids[0], true);
    let (s2, _) = submit(&mut m, IoKind::Write);
    assert_ne!(s1.io, s2.io);
    let mut out = Vec::new();
    assert!(!m.reply(s1.io, ids[0], false, &mut out));
    assert!(out.is_empty());
    assert_eq!(m.in_flight(), 1);
    assert_eq!(m.mode(ids[0]), Some(Mode::Rw));
}

#[test]
fn last_rw_is_never_ejected_on_error_reply() {
    let (mut m, ids) = setup(1, 0);
    let (s, _) = submit(&mut m, IoKind::Write);
    let out = reply(&mut m, s.io, ids[0], false);
    assert_eq!(
        completions(&out),
        vec![(
            s.io,
            Err(ReplicationError::LastHealthyReplicaFailed { replica: ids[0] })
        )]
    );
    assert!(recordings(&out).is_empty());
    assert!(mode_changes(&out).is_empty());
    assert_eq!(m.mode(ids[0]), Some(Mode::Rw));
    // It keeps serving.
    let (s2, t) = submit(&mut m, IoKind::Write);
    assert_eq!(t, vec![ids[0]]);
    assert_eq!(
        completions(&reply(&mut m, s2.io, ids[0], true)),
        vec![(s2.io, Ok(()))]
    );
}

#[test]
fn last_rw_after_other_ejections_is_kept() {
    let (mut m, ids) = setup(2, 0);
    let mut out = Vec::new();
    m.replica_failed(ids[0], &mut out).expect("known");
    assert_eq!(m.mode(ids[0]), Some(Mode::Err));
    let mut out = Vec::new();
    m.replica_failed(ids[1], &mut out).expect("known");
    assert!(out.is_empty());
    assert_eq!(m.mode(ids[1]), Some(Mode::Rw));
    assert_eq!(m.rw_count(), 1);
}

#[test]
fn last_rw_failure_fails_all_its_pending_io_and_it_stays_rw() {
    let (mut m, ids) = setup(1, 1);
    let (w, t) = submit(&mut m, IoKind::Write);
    assert_eq!(t, ids);
    let (f, _) = submit(&mut m, IoKind::Flush);
    let (r, rt) = submit(&mut m, IoKind::Read);
    assert_eq!(rt, vec![ids[0]]);
    // The WO replica acks the write; the RW one then breaks.
    reply(&mut m, w.io, ids[1], true);
    let mut out = Vec::new();
    m.replica_failed(ids[0], &mut out).expect("known");
    check(&m);
    let err = Err(ReplicationError::LastHealthyReplicaFailed { replica: ids[0] });
    let mut done = completions(&out);
    done.sort_by_key(|(io, _)| *io);
    let mut want = vec![(w.io, err), (f.io, err), (r.io, err)];
    want.sort_by_key(|(io, _)| *io);
    assert_eq!(done, want);
    assert!(recordings(&out).is_empty());
    assert_eq!(m.mode(ids[0]), Some(Mode::Rw));
    assert_eq!(m.in_flight(), 0);
    // The WO replica's late ack of the failed flush is ignored.
    let mut out = Vec::new();
    assert!(!m.reply(f.io, ids[1], true, &mut out));
    assert!(out.is_empty());
    assert!(m.status().iter().all(|s| s.in_flight == 0));
}

#[test]
fn wo_replica_is_always_ejectable() {
    let (mut m, ids) = setup(1, 1);
    let (w, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, w.io, ids[0], true);
    let out = reply(&mut m, w.io, ids[1], false);
    assert_eq!(mode_changes(&out), vec![(ids[1], Mode::Err)]);
    let (token, ejected, on) = recordings(&out)[0].clone();
    assert_eq!((ejected, on), (vec![ids[1]], vec![ids[0]]));
    assert!(completions(&out).is_empty());
    let mut out = Vec::new();
    m.ejection_recorded(token, &[], &mut out).expect("known");
    assert_eq!(completions(&out), vec![(w.io, Ok(()))]);
}

#[test]
fn wo_replica_gets_writes_but_no_reads() {
    let (mut m, ids) = setup(1, 2);
    for kind in [IoKind::Write, IoKind::Unmap, IoKind::Flush] {
        let (_, t) = submit(&mut m, kind);
        assert_eq!(t, ids);
    }
    for _ in 0..20 {
        let (_, t) = submit(&mut m, IoKind::Read);
        assert_eq!(t, vec![ids[0]]);
    }
}

#[test]
fn reads_are_spread_over_rw_replicas() {
    let (mut m, ids) = setup(3, 0);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (s, t) = submit(&mut m, IoKind::Read);
        assert_eq!(t.len(), 1);
        seen.push((s.io, t[0]));
    }
    for id in &ids {
        assert_eq!(seen.iter().filter(|(_, r)| r == id).count(), 2, "{seen:?}");
    }
    // A completed read frees its replica, which is then the least loaded one,
    // whatever the round-robin position.
    for &(io, r) in seen.iter().rev() {
        if r == ids[1] {
            let out = reply(&mut m, io, r, true);
            assert_eq!(completions(&out), vec![(io, Ok(()))]);
            break;
        }
    }
    let (_, t2) = submit(&mut m, IoKind::Read);
    assert_eq!(t2, vec![ids[1]]);
}

#[test]
fn read_error_ejects_and_retries_on_an_untried_replica() {
    let (mut m, ids) = setup(3, 0);
    let (r, t) = submit(&mut m, IoKind::Read);
    let first = t[0];
    let out = reply(&mut m, r.io, first, false);
    assert_eq!(mode_changes(&out), vec![(first, Mode::Err)]);
    assert_eq!(recordings(&out).len(), 1);
    let retry = sends(&out);
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].0, r.io);
    let second = retry[0].1;
    assert_ne!(second, first);
    assert!(completions(&out).is_empty());
    // A second failure moves it to the third replica.
    let out = reply(&mut m, r.io, second, false);
    let third = sends(&out)[0].1;
    assert!(![first, second].contains(&third));
    assert!(ids.contains(&third));
    // The third is now the last RW: its failure fails the read, not the replica.
    let out = reply(&mut m, r.io, third, false);
    assert_eq!(
        completions(&out),
        vec![(
            r.io,
            Err(ReplicationError::LastHealthyReplicaFailed { replica: third })
        )]
    );
    assert_eq!(m.mode(third), Some(Mode::Rw));
}

#[test]
fn read_succeeds_after_retry_without_waiting_for_recording() {
    let (mut m, _) = setup(2, 0);
    let (r, t) = submit(&mut m, IoKind::Read);
    let out = reply(&mut m, r.io, t[0], false);
    let second = sends(&out)[0].1;
    // The late reply from the ejected first target is ignored.
    let mut out = Vec::new();
    assert!(!m.reply(r.io, t[0], true, &mut out));
    assert!(out.is_empty());
    let out = reply(&mut m, r.io, second, true);
    assert_eq!(completions(&out), vec![(r.io, Ok(()))]);
    assert_eq!(m.pending_recordings(), 1);
}

#[test]
fn read_in_flight_is_retried_when_its_target_is_ejected_by_another_io() {
    let (mut m, ids) = setup(2, 0);
    let (r, t) = submit(&mut m, IoKind::Read);
    let (w, _) = submit(&mut m, IoKind::Write);
    let out = reply(&mut m, w.io, t[0], false);
    let other = if t[0] == ids[0] { ids[1] } else { ids[0] };
    assert_eq!(sends(&out), vec![(r.io, other)]);
    assert_eq!(
        completions(&reply(&mut m, r.io, other, true)),
        vec![(r.io, Ok(()))]
    );
}

#[test]
fn read_reply_from_a_replica_it_was_not_sent_to_is_ignored() {
    let (mut m, ids) = setup(2, 0);
    let (r, t) = submit(&mut m, IoKind::Read);
    let other = if t[0] == ids[0] { ids[1] } else { ids[0] };
    let mut out = Vec::new();
    assert!(!m.reply(r.io, other, true, &mut out));
    assert!(!m.reply(r.io, other, false, &mut out));
    assert!(out.is_empty());
    assert_eq!(m.mode(other), Some(Mode::Rw));
}

#[test]
fn add_then_set_rw() {
    let (mut m, ids) = setup(1, 0);
    let mut out = Vec::new();
    let new = m.add_replica(&mut out).expect("add");
    assert_eq!(mode_changes(&out), vec![(new, Mode::Wo)]);
    assert!(!ids.contains(&new));
    let (_, t) = submit(&mut m, IoKind::Write);
    assert_eq!(t, vec![ids[0], new]);
    let (_, t) = submit(&mut m, IoKind::Read);
    assert_eq!(t, vec![ids[0]]);
    let mut out = Vec::new();
    m.set_rw(new, &mut out).expect("set_rw");
    assert_eq!(mode_changes(&out), vec![(new, Mode::Rw)]);
    assert_eq!(m.rw_count(), 2);
    // Idempotent.
    let mut out = Vec::new();
    m.set_rw(new, &mut out).expect("set_rw");
    assert!(out.is_empty());
    // The read goes to the new, idle replica.
    let (_, t) = submit(&mut m, IoKind::Read);
    assert_eq!(t, vec![new]);
    check(&m);
}

#[test]
fn ejected_replica_cannot_be_promoted() {
    let (mut m, ids) = setup(1, 1);
    let mut out = Vec::new();
    m.replica_failed(ids[1], &mut out).expect("known");
    assert_eq!(
        m.set_rw(ids[1], &mut out),
        Err(ReplicationError::NotRebuilding {
            replica: ids[1],
            mode: Mode::Err
        })
    );
}

#[test]
fn recording_failure_cascades() {
    let (mut m, ids) = setup(3, 0);
    let (w, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, w.io, ids[0], true);
    let out = reply(&mut m, w.io, ids[1], false);
    let (t1, _, on) = recordings(&out)[0].clone();
    assert_eq!(on, vec![ids[0], ids[2]]);
    // Recording fails on ids[2], which still owes its ack for `w`.
    let mut out = Vec::new();
    m.ejection_recorded(t1, &[ids[2]], &mut out).expect("known");
    check(&m);
    assert_eq!(mode_changes(&out), vec![(ids[2], Mode::Err)]);
    let recs = recordings(&out);
    assert_eq!(recs.len(), 1);
    let (t2, ejected, on) = recs[0].clone();
    assert_eq!(ejected, vec![ids[1], ids[2]]);
    assert_eq!(on, vec![ids[0]]);
    // ids[1]'s ejection is durable (on every survivor), ids[2]'s is not yet.
    assert!(completions(&out).is_empty());
    let st = m.status();
    assert!(st[1].ejection_durable && !st[2].ejection_durable);
    let mut out = Vec::new();
    m.ejection_recorded(t2, &[], &mut out).expect("known");
    assert_eq!(completions(&out), vec![(w.io, Ok(()))]);
    assert_eq!(m.rw_count(), 1);
    check(&m);
}

#[test]
fn recording_failure_on_last_rw_fails_waiters_and_can_be_retried() {
    let (mut m, ids) = setup(1, 1);
    let (w, _) = submit(&mut m, IoKind::Write);
    let (r, _) = submit(&mut m, IoKind::Read);
    reply(&mut m, w.io, ids[0], true);
    let out = reply(&mut m, w.io, ids[1], false);
    let (t1, _, on) = recordings(&out)[0].clone();
    assert_eq!(on, vec![ids[0]]);
    let mut out = Vec::new();
    m.ejection_recorded(t1, &[ids[0]], &mut out).expect("known");
    check(&m);
    let mut done = completions(&out);
    done.sort_by_key(|(io, _)| *io);
    let mut want = vec![
        (
            w.io,
            Err(ReplicationError::EjectionNotRecorded { replica: ids[0] }),
        ),
        (
            r.io,
            Err(ReplicationError::LastHealthyReplicaFailed { replica: ids[0] }),
        ),
    ];
    want.sort_by_key(|(io, _)| *io);
    assert_eq!(done, want);
    assert_eq!(m.mode(ids[0]), Some(Mode::Rw));
    assert!(recordings(&out).is_empty());
    assert!(!m.status()[1].ejection_durable);
    // Retrying issues a fresh, cumulative recording.
    let mut out = Vec::new();
    let t2 = m.retry_ejection_recording(&mut out).expect("retry");
    assert_eq!(recordings(&out), vec![(t2, vec![ids[1]], vec![ids[0]])]);
    assert_eq!(
        m.retry_ejection_recording(&mut out),
        None,
        "one outstanding"
    );
    let mut out = Vec::new();
    m.ejection_recorded(t2, &[], &mut out).expect("known");
    assert!(m.status()[1].ejection_durable);
    assert_eq!(
        m.retry_ejection_recording(&mut out),
        None,
        "nothing to record"
    );
    assert_eq!(
        m.ejection_recorded(t2, &[], &mut out),
        Err(ReplicationError::UnknownEjectionToken(t2))
    );
}

#[test]
fn flush_and_unmap_follow_write_semantics() {
    for kind in [IoKind::Flush, IoKind::Unmap] {
        let (mut m, ids) = setup(2, 1);
        let (f, t) = submit(&mut m, kind);
        assert_eq!(t, ids);
        reply(&mut m, f.io, ids[0], true);
        let out = reply(&mut m, f.io, ids[2], false);
        let (token, _, on) = recordings(&out)[0].clone();
        assert_eq!(on, vec![ids[0], ids[1]]);
        assert!(completions(&reply(&mut m, f.io, ids[1], true)).is_empty());
        let mut out = Vec::new();
        m.ejection_recorded(token, &[], &mut out).expect("known");
        assert_eq!(completions(&out), vec![(f.io, Ok(()))]);

        // On the last RW, an error fails it.
        let (mut m, ids) = setup(1, 0);
        let (f, _) = submit(&mut m, kind);
        assert_eq!(
            completions(&reply(&mut m, f.io, ids[0], false)),
            vec![(
                f.io,
                Err(ReplicationError::LastHealthyReplicaFailed { replica: ids[0] })
            )]
        );
    }
}

#[test]
fn no_healthy_replica_fails_at_submission() {
    let mut m = Replicator::new(1, 0);
    for kind in [IoKind::Read, IoKind::Write, IoKind::Unmap, IoKind::Flush] {
        let mut out = Vec::new();
        let s = m.submit(kind, &mut out);
        assert_eq!(s.revision, None);
        assert_eq!(
            out,
            vec![Action::Complete {
                io: s.io,
                result: Err(ReplicationError::NoHealthyReplica)
            }]
        );
    }
    // WO replicas alone do not make a volume writable.
    let mut out = Vec::new();
    let id = m.add_replica(&mut out).expect("add");
    let mut out = Vec::new();
    let s = m.submit(IoKind::Write, &mut out);
    assert_eq!(
        completions(&out),
        vec![(s.io, Err(ReplicationError::NoHealthyReplica))]
    );
    assert_eq!(m.revision(), 0);
    assert_eq!(m.in_flight(), 0);
    // Ejecting the only (WO) replica needs no recording: nobody is left.
    let mut out = Vec::new();
    m.replica_failed(id, &mut out).expect("known");
    assert_eq!(
        out,
        vec![Action::ModeChanged {
            replica: id,
            mode: Mode::Err
        }]
    );
    assert!(m.status()[0].ejection_durable);
    check(&m);
}

#[test]
fn remove_releases_pending_io_and_refuses_last_rw() {
    let (mut m, ids) = setup(2, 1);
    let (w, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, w.io, ids[0], true);
    reply(&mut m, w.io, ids[1], true);
    let mut out = Vec::new();
    m.remove_replica(ids[2], &mut out).expect("remove WO");
    check(&m);
    assert_eq!(completions(&out), vec![(w.io, Ok(()))]);
    assert_eq!(m.mode(ids[2]), None);
    // Late replies from a removed replica are ignored.
    assert!(!m.reply(w.io, ids[2], true, &mut out));

    // A read sent to a removed RW replica is retried elsewhere.
    let (r, t) = submit(&mut m, IoKind::Read);
    let mut out = Vec::new();
    m.remove_replica(t[0], &mut out).expect("not the last RW");
    let survivor = if t[0] == ids[0] { ids[1] } else { ids[0] };
    assert_eq!(sends(&out), vec![(r.io, survivor)]);
    let mut out = Vec::new();
    assert_eq!(
        m.remove_replica(survivor, &mut out),
        Err(ReplicationError::LastHealthyReplica(survivor))
    );
    assert!(out.is_empty());
    assert_eq!(m.modes().collect::<Vec<_>>(), vec![(survivor, Mode::Rw)]);
}

#[test]
fn removing_an_ejected_replica_releases_ios_awaiting_its_recording() {
    let (mut m, ids) = setup(2, 0);
    let (w, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, w.io, ids[0], true);
    let out = reply(&mut m, w.io, ids[1], false);
    let (token, _, _) = recordings(&out)[0].clone();
    let mut out = Vec::new();
    m.remove_replica(ids[1], &mut out).expect("remove ERR");
    assert_eq!(completions(&out), vec![(w.io, Ok(()))]);
    // The outstanding recording can still be reported.
    let mut out = Vec::new();
    m.ejection_recorded(token, &[], &mut out).expect("known");
    assert!(out.is_empty());
    check(&m);
}

#[test]
fn ids_are_not_reused_and_slots_are() {
    let (mut m, ids) = setup(2, 0);
    let mut out = Vec::new();
    m.remove_replica(ids[1], &mut out).expect("remove");
    let new = m.add_replica(&mut out).expect("add");
    assert!(!ids.contains(&new));
    assert_eq!(m.status().len(), 2);
    for _ in 2..MAX_REPLICAS {
        m.add_replica(&mut out).expect("add");
    }
    assert_eq!(
        m.add_replica(&mut out),
        Err(ReplicationError::TooManyReplicas)
    );
    check(&m);
}

#[test]
fn status_counts_ops_and_errors() {
    let (mut m, ids) = setup(2, 0);
    let (w, _) = submit(&mut m, IoKind::Write);
    reply(&mut m, w.io, ids[0], true);
    let st = m.status();
    assert_eq!(st[0].sent, 1);
    assert_eq!(st[0].acked, 1);
    assert_eq!(st[0].in_flight, 0);
    assert_eq!(st[1].in_flight, 1);
    reply(&mut m, w.io, ids[1], false);
    let st = m.status();
    assert_eq!(st[1].mode, Mode::Err);
    assert_eq!(st[1].errors, 1);
    assert_eq!(st[1].in_flight, 0);
    assert!(!st[1].ejection_durable);
}

#[test]
fn error_messages_are_actionable() {
    let msg = ReplicationError::LastHealthyReplica(ReplicaId(3)).to_string();
    assert!(msg.contains("r3") && msg.contains("set_rw"), "{msg}");
    let msg = ReplicationError::NotRebuilding {
        replica: ReplicaId(1),
        mode: Mode::Err,
    }
    .to_string();
    assert!(msg.contains("ERR"), "{msg}");
}
