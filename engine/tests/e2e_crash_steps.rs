//! End to end, crashes at every step of the control operations: the engine
//! killed halfway through a snapshot, a snapshot deletion, an expansion, a
//! revert and a rebuild (after the first replica did its part, or after
//! the first 32 MiB of a rebuild arrived), and a replica killed halfway
//! through merging a deleted snapshot into its child. Each process dies
//! at a crash point (`zebu_proto::crash`: it SIGKILLs itself at exactly
//! that step, no race with the operation).
//!
//! After each: a new engine (or the restarted replica) brings every replica
//! back into service, everything acknowledged and flushed reads back, the
//! operation retried as a user or the CSI driver would succeeds (or reports
//! it was already done) and does what it says, and every replica read
//! alone holds the same image, size and snapshots.

mod common;

use common::*;
use zebu_proto::replica as pb;

const SIZE: &str = "16M";
const SIZE_BYTES: u64 = 16 * MIB;

fn addrs_of(replicas: &[Replica]) -> Vec<&str> {
    replicas.iter().map(|r| r.addr.as_str()).collect()
}

/// Writes `data` at offset 0 on a connection of its own, then flushes.
fn write_flushed(engine: &Engine, at: u64, data: &[u8]) {
    let mut nbd = NbdConn::connect(&engine.socket, &engine.volume);
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        nbd.write(at + i as u64 * MIB, chunk)
            .unwrap_or_else(|e| panic!("write at {}: errno {e}", at + i as u64 * MIB));
    }
    nbd.flush().expect("flush");
}

/// The whole volume, read through the engine.
fn read_volume(engine: &Engine) -> Vec<u8> {
    let mut nbd = NbdConn::connect(&engine.socket, &engine.volume);
    let mut out = Vec::with_capacity(nbd.size as usize);
    let mut at = 0;
    while at < nbd.size {
        let n = MIB.min(nbd.size - at);
        let got = nbd
            .read(at, n as u32)
            .unwrap_or_else(|e| panic!("read at {at}: errno {e}"));
        out.extend_from_slice(&got);
        at += n;
    }
    out
}

/// A replica's size and the names of its snapshots, oldest first.
fn shape(addr: &str) -> (u64, Vec<String>) {
    let info = block_on(async {
        let mut c = replica_client(addr).await;
        c.info(pb::InfoRequest {}).await.expect("Info").into_inner()
    });
    let n = info.chain.len().saturating_sub(1);
    let snaps = info.chain[..n].iter().map(|l| l.name.clone()).collect();
    (info.size, snaps)
}

/// With the engine stopped: every replica has size `size` and snapshots
/// `snaps`, and read alone holds `image`.
fn assert_converged(addrs: &[&str], size: u64, snaps: &[&str], image: &[u8]) {
    for a in addrs {
        let (got_size, got_snaps) = shape(a);
        assert_eq!(
            (
                got_size,
                got_snaps.iter().map(String::as_str).collect::<Vec<_>>()
            ),
            (size, snaps.to_vec()),
            "size and snapshots of replica {a}"
        );
    }
    let common = assert_replicas_identical(addrs);
    assert_same("every replica", &common, image);
}

/// A new engine on `addrs`, serving once every replica is back in service.
fn restart(tmp: &std::path::Path, volume: &str, size: &str, addrs: &[&str]) -> Engine {
    let engine = Engine::start(tmp, volume, size, addrs);
    engine.wait_healthy(addrs.len());
    engine
}

/// A retried operation: done now, or reported as done before.
fn assert_retried(r: Run, already: &str) {
    assert!(
        r.ok() || r.stderr.contains(already),
        "the retried `{}` failed ({}):\nstdout: {}\nstderr: {}",
        r.what,
        r.status,
        r.stdout,
        r.stderr
    );
}

/// Killed after the first replica froze its head as `s1`. The new engine
/// makes the replicas agree; `snapshot create s1` retried succeeds or says
/// it exists, and a revert to it returns what was written before it.
#[test]
fn an_engine_killed_midway_through_a_snapshot_leaves_replicas_that_converge() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, SIZE);
    let addrs = addrs_of(&replicas);
    let point = "engine.snapshot.partial";
    let mut a = Engine::start_crashing_at(tmp.path(), "crsnap", SIZE, &addrs, point);
    a.wait_healthy(3);
    let before = pattern(rand_u64(), SIZE_BYTES as usize);
    write_flushed(&a, 0, &before);
    a.ctl_timeout(&["snapshot", "create", "s1"], LONG)
        .expect_fail();
    a.wait_crashed_at(point);

    let mut b = restart(tmp.path(), "crsnap", SIZE, &addrs);
    assert_same("after the crash", &read_volume(&b), &before);
    assert_retried(
        b.ctl_timeout(&["snapshot", "create", "s1"], LONG),
        "already exists",
    );
    write_flushed(&b, 0, &pattern(rand_u64(), SIZE_BYTES as usize));
    b.ctl_timeout(&["revert", "s1"], LONG).expect_ok();
    assert_same("reverted to s1", &read_volume(&b), &before);
    b.stop();
    assert_converged(&addrs, SIZE_BYTES, &["s1"], &before);
}

/// Killed after the first replica merged snapshot `s1` away. The new
/// engine makes the replicas agree and serves the latest data; `snapshot
/// delete s1` retried succeeds or says there is no such snapshot, and no
/// replica keeps it.
#[test]
fn an_engine_killed_midway_through_a_snapshot_deletion_leaves_replicas_that_converge() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, SIZE);
    let addrs = addrs_of(&replicas);
    let point = "engine.snapshot-delete.partial";
    let mut a = Engine::start_crashing_at(tmp.path(), "crdel", SIZE, &addrs, point);
    a.wait_healthy(3);
    write_flushed(&a, 0, &pattern(rand_u64(), SIZE_BYTES as usize));
    a.ctl_timeout(&["snapshot", "create", "s1"], LONG)
        .expect_ok();
    // Half the volume rewritten after the snapshot.
    let mut latest = read_volume(&a);
    let half = pattern(rand_u64(), (SIZE_BYTES / 2) as usize);
    write_flushed(&a, SIZE_BYTES / 4, &half);
    latest[(SIZE_BYTES / 4) as usize..(3 * SIZE_BYTES / 4) as usize].copy_from_slice(&half);
    a.ctl_timeout(&["snapshot", "delete", "s1"], LONG)
        .expect_fail();
    a.wait_crashed_at(point);

    let mut b = restart(tmp.path(), "crdel", SIZE, &addrs);
    assert_same("after the crash", &read_volume(&b), &latest);
    assert_retried(
        b.ctl_timeout(&["snapshot", "delete", "s1"], LONG),
        "no snapshot named",
    );
    assert_same("after the retried deletion", &read_volume(&b), &latest);
    b.stop();
    assert_converged(&addrs, SIZE_BYTES, &[], &latest);
}

/// Killed after the first replica grew from 16 MiB to 32 MiB. The new
/// engine is started as the control plane would, with the size it
/// recorded (the old one: the expansion never returned); the replicas
/// agree; `expand 32M` retried succeeds and the new half holds what is
/// written there.
#[test]
fn an_engine_killed_midway_through_an_expansion_leaves_replicas_that_converge() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, SIZE);
    let addrs = addrs_of(&replicas);
    let point = "engine.expand.partial";
    let mut a = Engine::start_crashing_at(tmp.path(), "crgrow", SIZE, &addrs, point);
    a.wait_healthy(3);
    let mut image = pattern(rand_u64(), SIZE_BYTES as usize);
    write_flushed(&a, 0, &image);
    a.ctl_timeout(&["expand", "32M"], LONG).expect_fail();
    a.wait_crashed_at(point);

    let mut b = restart(tmp.path(), "crgrow", SIZE, &addrs);
    let after = read_volume(&b);
    assert_same("after the crash", &after[..SIZE_BYTES as usize], &image);
    b.ctl_timeout(&["expand", "32M"], LONG).expect_ok();
    let grown = pattern(rand_u64(), SIZE_BYTES as usize);
    write_flushed(&b, SIZE_BYTES, &grown);
    image.extend_from_slice(&grown);
    assert_same("after the retried expansion", &read_volume(&b), &image);
    b.stop();
    assert_converged(&addrs, 2 * SIZE_BYTES, &[], &image);
}

/// Killed after the first replica reverted to `s1`. A new engine makes the
/// replicas agree (on the reverted image or the one before: the revert
/// never returned); `revert s1` retried succeeds and the volume holds what
/// `s1` holds.
#[test]
fn an_engine_killed_midway_through_a_revert_leaves_replicas_that_converge() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, SIZE);
    let addrs = addrs_of(&replicas);
    let point = "engine.revert.partial";
    let mut a = Engine::start_crashing_at(tmp.path(), "crrev", SIZE, &addrs, point);
    a.wait_healthy(3);
    let snap = pattern(rand_u64(), SIZE_BYTES as usize);
    write_flushed(&a, 0, &snap);
    a.ctl_timeout(&["snapshot", "create", "s1"], LONG)
        .expect_ok();
    write_flushed(&a, 0, &pattern(rand_u64(), SIZE_BYTES as usize));
    a.ctl_timeout(&["revert", "s1"], LONG).expect_fail();
    a.wait_crashed_at(point);

    let mut b = restart(tmp.path(), "crrev", SIZE, &addrs);
    let served = read_volume(&b);
    b.stop();
    assert_converged(&addrs, SIZE_BYTES, &["s1"], &served);

    let mut c = restart(tmp.path(), "crrev", SIZE, &addrs);
    c.ctl_timeout(&["revert", "s1"], LONG).expect_ok();
    assert_same("reverted to s1", &read_volume(&c), &snap);
    c.stop();
    assert_converged(&addrs, SIZE_BYTES, &["s1"], &snap);
}

/// Killed while a third replica was being rebuilt, once 32 MiB of the
/// 64 MiB had arrived. The new engine is given all three replicas (the
/// control plane recorded the third when it added it) and must not trust
/// the half-built one: it rebuilds it, and everything reads back.
#[test]
fn an_engine_killed_midway_through_a_rebuild_never_trusts_the_half_built_replica() {
    let _serial = serial();
    let tmp = tempdir();
    let size = "96M";
    let mut replicas = start_replicas(tmp.path(), 2, size);
    let point = "engine.rebuild.pulling";
    let mut a = {
        let addrs = addrs_of(&replicas);
        Engine::start_crashing_at(tmp.path(), "crbuild", size, &addrs, point)
    };
    a.wait_healthy(2);
    let mut image = pattern(rand_u64(), (64 * MIB) as usize);
    write_flushed(&a, 0, &image);
    image.resize((96 * MIB) as usize, 0);
    replicas.push(Replica::start(&tmp.path().join("r2"), Some(size)));
    a.ctl_timeout(&["replica", "add", &replicas[2].addr, "--wait"], LONG)
        .expect_fail();
    a.wait_crashed_at(point);
    let (_, snaps) = shape(&replicas[2].addr);
    eprintln!("the half-built replica's snapshots: {snaps:?}");

    let addrs = addrs_of(&replicas);
    let mut b = restart(tmp.path(), "crbuild", size, &addrs);
    assert_same("after the crash", &read_volume(&b), &image);
    b.stop();
    assert_converged(&addrs, 96 * MIB, &[], &image);
}

/// Replica 0 killed halfway through merging snapshot `s1` (4 MiB, merged
/// 1 MiB at a time) into its child. The engine ejects it and finishes the
/// deletion on the two others. Restarted on its directory, replica 0 is
/// added back and resynced; it keeps no `s1`; everything reads back.
#[test]
fn a_replica_killed_midway_through_a_merge_is_resynced_after_restart() {
    let _serial = serial();
    let tmp = tempdir();
    let point = "replica.merge.copying";
    let mut replicas = vec![
        Replica::start_crashing_at(&tmp.path().join("r0"), Some(SIZE), point),
        Replica::start(&tmp.path().join("r1"), Some(SIZE)),
        Replica::start(&tmp.path().join("r2"), Some(SIZE)),
    ];
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut engine = Engine::start(tmp.path(), "crmerge", SIZE, &refs);
    engine.wait_healthy(3);
    let mut image = pattern(rand_u64(), (4 * MIB) as usize);
    write_flushed(&engine, 0, &image);
    image.resize(SIZE_BYTES as usize, 0);
    engine
        .ctl_timeout(&["snapshot", "create", "s1"], LONG)
        .expect_ok();
    let later = pattern(rand_u64(), MIB as usize);
    write_flushed(&engine, 2 * MIB, &later);
    image[(2 * MIB) as usize..(3 * MIB) as usize].copy_from_slice(&later);
    engine
        .ctl_timeout(&["snapshot", "delete", "s1"], LONG)
        .expect_ok();
    replicas[0].wait_crashed_at(point);
    engine.wait_status("degraded with replica 0 ejected", |s| {
        s["state"] == "degraded" && replica_entry(s, &addrs[0]).is_some_and(|r| r["mode"] == "ERR")
    });

    replicas[0] = Replica::start(&tmp.path().join("r0"), None);
    let back = replicas[0].addr.clone();
    engine
        .ctl_timeout(&["replica", "add", &back, "--wait"], LONG)
        .expect_ok();
    engine.wait_healthy(3);
    assert_same("after the resync", &read_volume(&engine), &image);
    engine.stop();
    let addrs = addrs_of(&replicas);
    assert_converged(&addrs, SIZE_BYTES, &[], &image);
}
