//! End to end: replica failures under load, replacement with a fresh
//! replica (full rebuild), and the return of a killed replica on its old
//! directory (resync of the changed blocks only).

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Polls `status` until the engine counted at least `n` writes, while fio is
/// still running (the fault must be injected mid-run).
fn wait_for_writes(engine: &Engine, fio: &mut Bg, n: u64) {
    let start = Instant::now();
    loop {
        let st = engine.status();
        if io_counter(&st, "writes") >= n {
            break;
        }
        assert!(
            fio.running(),
            "fio ended before {n} writes were counted; status: {st}"
        );
        assert!(start.elapsed() < DEADLINE, "no progress: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fio.running(),
        "fio already finished: the fault would not be injected mid-run"
    );
}

/// SIGKILL a replica under a verifying fio: no I/O error, status degraded
/// with that replica ERR. Replace it with a fresh replica while another
/// verifying fio runs: rebuild, healthy, all RW; replicas identical after
/// the engine stopped.
#[test]
fn replica_killed_under_load_then_replaced() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let mut replicas = start_replicas(tmp.path(), 3, "128M");
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut engine = Engine::start(tmp.path(), "ftvol", "128M", &addr_refs);
    let uri = engine.uri();
    engine.wait_healthy(3);

    // 64 MiB of 4k random writes at iodepth 16, rate-capped so that it is
    // surely still running when the replica dies.
    let job = Fio {
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        offset: 0,
        size: 64 * MIB,
        rate_iops: Some(4000),
        verify: true,
    };
    let (mut fio, out) = job.spawn(&uri, tmp.path());
    wait_for_writes(&engine, &mut fio, 2000);
    let victim = replicas[1].addr.clone();
    let victim_id = replicas[1].id.clone();
    replicas[1].kill9();
    let st = engine.wait_status("degraded with the killed replica ERR", |s| {
        s["state"] == "degraded" && replica_entry(s, &victim).is_some_and(|r| r["mode"] == "ERR")
    });
    // The two others are still serving.
    for a in [&addrs[0], &addrs[2]] {
        assert_eq!(replica_entry(&st, a).unwrap()["mode"], "RW", "{st}");
    }
    job.check(fio.wait(LONG), &out);
    let st = engine.status();
    assert_eq!(st["state"], "degraded", "{st}");

    // Replace the dead replica with a fresh one while fio verifies again.
    engine.ctl_ok(&["replica", "remove", &victim_id]);
    engine.wait_status("without the removed replica", |s| {
        replica_entry(s, &victim).is_none()
            && s["replicas"].as_array().is_some_and(|r| r.len() == 2)
    });
    let fresh = Replica::start(&tmp.path().join("fresh"), Some("128M"));
    let job2 = Fio {
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        offset: 64 * MIB,
        size: 32 * MIB,
        rate_iops: Some(4000),
        verify: true,
    };
    let writes_before = io_counter(&engine.status(), "writes");
    let (mut fio2, out2) = job2.spawn(&uri, tmp.path());
    // The rebuild starts while fio is writing.
    wait_for_writes(&engine, &mut fio2, writes_before + 200);
    engine
        .ctl_timeout(&["replica", "add", &fresh.addr, "--wait"], LONG)
        .expect_ok();
    job2.check(fio2.wait(LONG), &out2);
    let st = engine.wait_healthy(3);
    let e = replica_entry(&st, &fresh.addr).expect("new replica listed");
    assert_eq!(e["id"], fresh.id.as_str(), "{st}");
    eprintln!("rebuild of the fresh replica: {}", e["rebuild"]);
    assert_eq!(e["rebuild"]["state"], "done", "{st}");
    assert_eq!(
        e["rebuild"]["bytes_done"], e["rebuild"]["bytes_total"],
        "a finished rebuild did not cover everything: {st}"
    );
    assert!(
        e["rebuild"]["blocks_copied"].as_u64().unwrap_or(0) > 0,
        "a rebuild of a volume with data copied nothing: {st}"
    );
    assert!(e["rebuild"]["error"].is_null(), "{st}");

    engine.stop();
    let data = assert_replicas_identical(&[&addrs[0], &addrs[2], &fresh.addr]);
    assert!(!all_zero(&data[..(96 * MIB) as usize]));
    assert!(all_zero(&data[(96 * MIB) as usize..]));
}

/// A killed replica restarted on its old directory (new port) takes its old
/// slot back and resyncs only what changed meanwhile.
#[test]
fn returning_replica_resyncs_only_changed_blocks() {
    let _serial = serial();
    require_tool("fio", "fio");
    require_tool("nbdcopy", "libnbd-bin");
    let tmp = tempdir();
    let size = 256 * MIB;
    let volume_blocks = size / BS;
    let mut replicas = start_replicas(tmp.path(), 3, "256M");
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut engine = Engine::start(tmp.path(), "rsvol", "256M", &addr_refs);
    let uri = engine.uri();

    // Fill a quarter of the volume while everyone is up.
    let base = pattern(rand_u64(), (64 * MIB) as usize);
    let src = tmp.path().join("base.img");
    write_file(&src, &base);
    nbd_write_file(&uri, &src);
    engine.wait_healthy(3);

    let victim = replicas[2].addr.clone();
    let victim_id = replicas[2].id.clone();
    let victim_dir = replicas[2].dir.clone();
    replicas[2].kill9();
    // Writes after the kill make the engine notice (the stream broke).
    let job = Fio {
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        offset: 16 * MIB,
        size: size / 100 / BS * BS,
        rate_iops: None,
        verify: true,
    };
    job.run_ok(&uri, tmp.path());
    engine.wait_status("degraded with the killed replica ERR", |s| {
        s["state"] == "degraded" && replica_entry(s, &victim).is_some_and(|r| r["mode"] == "ERR")
    });

    // Back on its old directory, on a new port.
    let back = Replica::start(&victim_dir, None);
    assert_eq!(back.id, victim_id, "restarted replica changed its id");
    engine
        .ctl_timeout(&["replica", "add", &back.addr, "--wait"], LONG)
        .expect_ok();
    let st = engine.wait_healthy(3);
    let e = replica_entry(&st, &back.addr).expect("returned replica listed at its new address");
    assert_eq!(e["id"], victim_id.as_str(), "{st}");
    assert!(
        replica_entry(&st, &victim).is_none(),
        "old address still listed: the replica did not take its old slot: {st}"
    );
    assert_eq!(e["rebuild"]["state"], "done", "{st}");
    let copied = e["rebuild"]["blocks_copied"]
        .as_u64()
        .expect("blocks_copied");
    eprintln!(
        "resync copied {copied} blocks of {volume_blocks} (fio wrote {} blocks)",
        job.size / BS
    );
    assert!(
        copied > 0,
        "resync copied nothing although data changed: {st}"
    );
    assert!(
        copied < volume_blocks / 10,
        "resync copied {copied} blocks: not an incremental resync ({volume_blocks} blocks in the volume): {st}"
    );

    engine.stop();
    let data = assert_replicas_identical(&[&addrs[0], &addrs[1], &back.addr]);
    // Outside fio's range the base image is intact.
    assert_same(
        "base image before fio's range",
        &data[..(16 * MIB) as usize],
        &base[..(16 * MIB) as usize],
    );
    let end = (16 * MIB + job.size) as usize;
    assert_same(
        "base image after fio's range",
        &data[end..(64 * MIB) as usize],
        &base[end..],
    );
}

/// A replica that hangs (SIGSTOP) instead of dying is ejected after
/// `--io-timeout`; fio, verifying, sees no error.
#[test]
fn hung_replica_is_ejected_after_io_timeout() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "64M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start_with(
        tmp.path(),
        "hangvol",
        "64M",
        &addrs,
        &["--io-timeout", "2s"],
    );
    let uri = engine.uri();
    let job = Fio {
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        offset: 0,
        size: 32 * MIB,
        rate_iops: Some(4000),
        verify: true,
    };
    let (mut fio, out) = job.spawn(&uri, tmp.path());
    wait_for_writes(&engine, &mut fio, 1000);
    replicas[0].signal(nix::sys::signal::Signal::SIGSTOP);
    job.check(fio.wait(LONG), &out);
    let st = engine.wait_status("degraded with the hung replica ERR", |s| {
        s["state"] == "degraded"
            && replica_entry(s, &replicas[0].addr).is_some_and(|r| r["mode"] == "ERR")
    });
    assert!(
        io_counter(&st, "write_p99_us") < 60_000_000,
        "a write waited more than a minute: {st}"
    );
    engine.stop();
    assert_replicas_identical(&addrs[1..]);
    // `replicas` drop: the stopped replica is SIGKILLed like the others.
}
