//! End to end: a block that rots on one replica's disk (changed behind the
//! replica's back) is never returned to the client. The replica finds it
//! does not match its stored CRC; the engine ejects that replica and answers
//! the read from a healthy one; re-adding the replica resyncs that one
//! block. With no other replica to read from, the read fails with EIO.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use zebu_proto::replica as pb;

/// The head layer's data file of a replica that has no snapshots.
fn head_data_file(replica_dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(replica_dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(files.len(), 1, "expected only the head layer: {files:?}");
    files[0].clone()
}

/// Flips bytes inside block `b` of `file` and syncs them, bypassing the
/// replica (which reads with O_DIRECT, so it sees them).
fn corrupt_block(file: &Path, b: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut bytes = [0u8; 64];
    f.read_exact_at(&mut bytes, b * BS + 512).unwrap();
    for x in &mut bytes {
        *x = !*x;
    }
    f.write_all_at(&bytes, b * BS + 512).unwrap();
    f.sync_all().unwrap();
}

/// `n` replicas of `size` and an engine for volume `name`, with `mib` MiB
/// of random data written (and flushed) from offset 0. Bind `_tmp` when
/// destructuring: the directory is removed when it is dropped.
struct Setup {
    _tmp: tempfile::TempDir,
    tmp: PathBuf,
    replicas: Vec<Replica>,
    addrs: Vec<String>,
    engine: Engine,
    data: Vec<u8>,
}

fn setup(n: usize, size: &str, name: &str, mib: u64) -> Setup {
    require_tool("nbdcopy", "libnbd-bin");
    let tmp_dir = tempdir();
    let tmp = tmp_dir.path().to_owned();
    let replicas = start_replicas(&tmp, n, size);
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let engine = Engine::start(&tmp, name, size, &addr_refs);
    let data = pattern(rand_u64(), (mib * MIB) as usize);
    let src = tmp.join("data.img");
    write_file(&src, &data);
    nbd_write_file(&engine.uri(), &src);
    engine.wait_healthy(n);
    Setup {
        _tmp: tmp_dir,
        tmp,
        replicas,
        addrs,
        engine,
        data,
    }
}

#[test]
fn a_block_rotten_on_one_replica_is_read_from_another_then_resynced() {
    let _serial = serial();
    let Setup {
        _tmp: _keep,
        tmp,
        replicas,
        addrs,
        mut engine,
        data,
        ..
    } = setup(3, "64M", "rotvol", 8);
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let uri = engine.uri();

    let victim = &replicas[1];
    let b = 700u64;
    let want = &data[(b * BS) as usize..((b + 1) * BS) as usize];
    corrupt_block(&head_data_file(&victim.dir), b);

    // Reads go to the least loaded replica, ties taken in turn: within a
    // few reads of the block one goes to the victim, which refuses it.
    let mut conn = NbdConn::connect(&engine.socket, "rotvol");
    let mut reads = 0;
    loop {
        let got = conn
            .read(b * BS, BS as u32)
            .unwrap_or_else(|e| panic!("read {reads} of the block failed with NBD error {e}"));
        assert_same("the rotten block as the client reads it", &got, want);
        reads += 1;
        let st = engine.status();
        if replica_entry(&st, &victim.addr).is_some_and(|r| r["mode"] == "ERR") {
            assert_eq!(st["state"], "degraded", "{st}");
            break;
        }
        assert!(
            reads < 12,
            "{reads} reads of the block and the victim was never ejected: {st}"
        );
    }
    let log = victim.log_tail();
    assert!(
        log.contains("a read found corrupt data on disk") && log.contains("block 700"),
        "the victim's log does not report the corrupt block:\n{log}"
    );
    let elog = engine.log_tail();
    assert!(
        elog.contains("does not match its stored checksum"),
        "the engine's log does not say why the replica failed:\n{elog}"
    );
    drop(conn);
    assert_same(
        "the volume read back after the ejection",
        &nbd_read_all(&uri, &tmp)[..data.len()],
        &data,
    );

    // Back in (same process, same address): the block's CRC entry was
    // invalidated when it was found, so the resync copies it, and only it.
    engine
        .ctl_timeout(&["replica", "add", &victim.addr, "--wait"], LONG)
        .expect_ok();
    let st = engine.wait_healthy(3);
    let e = replica_entry(&st, &victim.addr).expect("victim listed");
    assert_eq!(e["rebuild"]["state"], "done", "{st}");
    assert_eq!(
        e["rebuild"]["blocks_copied"].as_u64(),
        Some(1),
        "the resync should copy the rotten block alone: {st}"
    );
    engine.stop();
    // Each replica read directly: every block passes its CRC check again.
    let all = assert_replicas_identical(&addr_refs);
    assert_same("replica data", &all[..data.len()], &data);
}

#[test]
fn a_rotten_block_on_the_only_replica_fails_with_eio() {
    let _serial = serial();
    let Setup {
        _tmp: _keep,
        replicas,
        mut engine,
        data,
        ..
    } = setup(1, "16M", "onevol", 2);
    corrupt_block(&head_data_file(&replicas[0].dir), 3);

    let mut conn = NbdConn::connect(&engine.socket, "onevol");
    for _ in 0..2 {
        assert_eq!(
            conn.read(3 * BS, BS as u32).map(|_| ()),
            Err(5),
            "the rotten block must fail with EIO, every time"
        );
        // A larger read that covers it fails too; its neighbours read fine.
        assert_eq!(conn.read(0, 64 * 1024).map(|_| ()), Err(5));
        let ok = conn
            .read(4 * BS, 8 * BS as u32)
            .expect("the next blocks read fine");
        assert_same(
            "blocks 4-11",
            &ok,
            &data[(4 * BS) as usize..(12 * BS) as usize],
        );
    }
    let st = engine.status();
    let e = replica_entry(&st, &replicas[0].addr).expect("listed");
    assert_eq!(e["mode"], "RW", "the last replica is never ejected: {st}");
    drop(conn);
    engine.stop();
}

/// Blocks that rot where nobody reads them are found by a scrub; with
/// `--repair` each replica holding some is resynced from one that holds
/// none, even when two replicas rotted (in different blocks).
#[test]
fn scrub_finds_rot_in_cold_data_and_repair_resyncs_it() {
    let _serial = serial();
    let Setup {
        _tmp: _keep,
        replicas,
        addrs,
        mut engine,
        data,
        ..
    } = setup(3, "64M", "scrubvol", 8);
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let blocks = 8 * MIB / BS;

    // Runs `ctl ARGS`, expecting it to succeed or fail; its JSON report.
    let scrub = |args: &[&str], ok: bool| -> (Run, Vec<serde_json::Value>) {
        let r = engine.ctl_timeout(args, LONG);
        let r = if ok { r.expect_ok() } else { r.expect_fail() };
        let v: Vec<serde_json::Value> = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("scrub output is not JSON ({e}): {}", r.stdout));
        (r, v)
    };
    let of = |v: &[serde_json::Value], addr: &str| -> serde_json::Value {
        v.iter()
            .find(|x| x["address"] == addr)
            .unwrap_or_else(|| panic!("no report for {addr}: {v:?}"))
            .clone()
    };
    let (_, v) = scrub(&["scrub"], true);
    for a in &addrs {
        let x = of(&v, a);
        assert_eq!(x["blocks_checked"], blocks, "{x}");
        assert_eq!(x["corrupt_blocks"], 0, "{x}");
    }

    corrupt_block(&head_data_file(&replicas[0].dir), 100);
    corrupt_block(&head_data_file(&replicas[0].dir), 1500);
    corrupt_block(&head_data_file(&replicas[1].dir), 200);
    // Corrupt blocks left fail the command.
    let (r, v) = scrub(&["scrub"], false);
    assert!(
        r.stderr.contains("corrupt blocks") && r.stderr.contains("--repair"),
        "{}",
        r.stderr
    );
    let x0 = of(&v, &addrs[0]);
    assert_eq!(x0["corrupt_blocks"], 2, "{x0}");
    assert_eq!(x0["corrupt"], serde_json::json!(["head:100", "head:1500"]));
    assert_eq!(
        of(&v, &addrs[1])["corrupt"],
        serde_json::json!(["head:200"])
    );
    assert_eq!(of(&v, &addrs[2])["corrupt_blocks"], 0);
    engine.wait_healthy(3); // a scrub alone ejects nobody

    let (_, v) = scrub(&["scrub", "--repair"], true);
    assert_eq!(of(&v, &addrs[0])["repaired"], true);
    assert_eq!(of(&v, &addrs[1])["repaired"], true);
    assert_eq!(of(&v, &addrs[2])["repaired"], false);
    let st = engine.wait_healthy(3);
    for (a, n) in [(&addrs[0], 2), (&addrs[1], 1)] {
        let e = replica_entry(&st, a).expect("listed");
        assert_eq!(e["rebuild"]["blocks_copied"], n, "{st}");
    }
    let (_, v) = scrub(&["scrub"], true);
    assert!(v.iter().all(|x| x["corrupt_blocks"] == 0), "{v:?}");
    engine.stop();
    let all = assert_replicas_identical(&addr_refs);
    assert_same("replica data", &all[..data.len()], &data);
}

/// Each replica's `last_clean_scrub_unix`, read from the replica itself.
fn last_scrubs(addrs: &[String]) -> Vec<i64> {
    block_on(async {
        let mut out = Vec::new();
        for a in addrs {
            let info = replica_client(a)
                .await
                .info(pb::InfoRequest {})
                .await
                .unwrap_or_else(|e| panic!("info of {a}: {e}"))
                .into_inner();
            out.push(info.last_clean_scrub_unix);
        }
        out
    })
}

/// With a schedule, the engine scrubs on its own: rot nobody reads is found
/// and the replica holding it resynced without anyone asking. The replicas
/// record when they were scrubbed, and an engine started later counts its
/// schedule from that, not from its own start.
#[test]
fn a_scheduled_scrub_repairs_rot_on_its_own_and_counts_from_the_replicas() {
    let _serial = serial();
    let Setup {
        _tmp: _keep,
        tmp,
        replicas,
        addrs,
        mut engine,
        data,
    } = setup(3, "64M", "schedvol", 8);
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    assert_eq!(last_scrubs(&addrs), [0, 0, 0], "nothing scrubbed yet");
    let st = engine.status();
    assert_eq!(
        st["scrub"]["interval_seconds"], 0,
        "no schedule by default: {st}"
    );
    assert_eq!(st["scrub"]["next_unix"], 0, "{st}");
    engine.stop();

    let mut engine = Engine::start_with(
        &tmp,
        "schedvol",
        "64M",
        &addr_refs,
        &["--scrub-interval", "1s", "--scrub-rate", "0"],
    );
    corrupt_block(&head_data_file(&replicas[2].dir), 300);
    let st = engine.wait_status("a scheduled scrub repaired a replica", |s| {
        s["scrub"]["replicas_repaired"].as_u64() >= Some(1)
    });
    let runs = st["scrub"]["runs"].as_u64().unwrap();
    // The next run finds nothing left.
    let st = engine.wait_status("a later scheduled scrub finished", |s| {
        s["scrub"]["runs"].as_u64() > Some(runs)
    });
    let last = st["scrub"]["last"].as_array().unwrap().clone();
    assert_eq!(last.len(), 3, "{st}");
    for r in &last {
        assert_eq!(r["corrupt_blocks"], 0, "{st}");
        assert_eq!(r["error"], "", "{st}");
    }
    assert_eq!(
        st["scrub"]["replicas_repaired"], 1,
        "only the rotten one: {st}"
    );
    let st = engine.wait_healthy(3);
    let e = replica_entry(&st, &addrs[2]).expect("listed");
    assert_eq!(
        e["rebuild"]["blocks_copied"], 1,
        "the rotten block alone: {st}"
    );
    let log = engine.log_tail();
    assert!(
        log.contains("scrub found corrupt blocks") && log.contains("scheduled scrub finished"),
        "{log}"
    );
    let table = engine.ctl_ok(&["status"]).stdout;
    assert!(table.contains("scrub: every 1s, no rate limit"), "{table}");
    engine.stop();

    // Every replica recorded its last complete scrub; a new engine on a
    // daily schedule is due a day after the least recent of them. (Read
    // once the new engine has opened the replicas: a scrub of the old
    // engine's epoch can no longer complete then.)
    let mut engine = Engine::start_with(
        &tmp,
        "schedvol",
        "64M",
        &addr_refs,
        &["--scrub-interval", "1d"],
    );
    let st = engine.wait_status("the schedule planned", |s| {
        s["scrub"]["next_unix"].as_i64() > Some(0)
    });
    let scrubbed = last_scrubs(&addrs);
    assert!(scrubbed.iter().all(|&t| t > 0), "{scrubbed:?}");
    let oldest = scrubbed.iter().min().copied().unwrap();
    assert_eq!(st["scrub"]["next_unix"], oldest + 86_400, "{st}");
    assert_eq!(st["scrub"]["interval_seconds"], 86_400, "{st}");
    assert_eq!(
        st["scrub"]["max_bytes_per_sec"],
        64 << 20,
        "the default rate: {st}"
    );
    assert_eq!(st["scrub"]["runs"], 0, "{st}");
    let table = engine.ctl_ok(&["status"]).stdout;
    assert!(
        table.contains("scrub: every 24h, 64 MiB/s per replica, next in ")
            && table.contains("none since the engine started"),
        "{table}"
    );
    // A rate too slow to finish is refused with a hint.
    let r = engine.ctl(&["scrub", "--rate", "10"]).expect_fail();
    assert!(r.stderr.contains("at least 1M"), "{}", r.stderr);
    // One scrub at a time: a second is refused while the first (8 MiB per
    // replica at 1 MiB/s: at least 8 s) runs, and says why.
    let first = Bg::spawn(
        Command::new(engine_bin())
            .args(["ctl", "--engine", &engine.control])
            .args(["scrub", "--rate", "1M"]),
    );
    engine.wait_status("a scrub running", |s| s["scrub"]["running"] == true);
    let r = engine.ctl(&["scrub"]).expect_fail();
    assert!(r.stderr.contains("already running"), "{}", r.stderr);
    let done = first.wait(LONG).expect_ok();
    assert!(
        done.stdout.contains("\"corrupt_blocks\":0"),
        "{}",
        done.stdout
    );
    engine.stop();
    let all = assert_replicas_identical(&addr_refs);
    assert_same("replica data", &all[..data.len()], &data);
}
