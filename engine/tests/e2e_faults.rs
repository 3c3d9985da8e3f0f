//! End to end, faults between the engine and its replicas: links that stop
//! delivering in one direction or both (a fault proxy holds the bytes, as a
//! TCP send queue behind a dead link would, and delivers them late), a
//! replica paused past the I/O timeout and resumed, a link that delays
//! everything (a delay line in the proxy), a second engine taking over
//! the replicas of a running one, and the disk under one replica failing
//! reads or writes with EIO or filling up (`zebu_testkit::eio_disk`). After each: every
//! acknowledged and flushed write reads back, nothing unacknowledged is
//! reported written, and every replica read alone holds the same image.

mod common;

use common::*;
use std::time::Duration;

const VOLUME: &str = "latevol";

/// The late write of a partition: replica 1's link goes down while a write
/// to it sits in the connection's send queue. The engine ejects replica 1
/// after its I/O timeout and acknowledges the write from the two others;
/// the client overwrites the block and flushes; replica 1 comes back
/// (`replica add --wait`: a delta resync, then RW). Then the old request
/// arrives on the old connection. Afterwards every read through the engine
/// and every replica read alone return the overwrite.
#[test]
fn a_late_write_on_an_ejected_replicas_old_connection_is_never_applied() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "8M");
    let proxy = FaultProxy::start(&replicas[1].addr);
    let addrs = [
        replicas[0].addr.as_str(),
        proxy.addr.as_str(),
        replicas[2].addr.as_str(),
    ];
    let mut engine = Engine::start_with(tmp.path(), VOLUME, "8M", &addrs, &["--io-timeout", "1s"]);
    engine.wait_healthy(3);
    let mut nbd = NbdConn::connect(&engine.socket, VOLUME);
    let block = BS as usize;
    let (a, b, c) = (pattern(1, block), pattern(2, block), pattern(3, block));

    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    // The link to replica 1 stops delivering: what the engine sends waits.
    assert!(
        proxy.freeze() > 0,
        "the engine has connections to replica 1"
    );
    nbd.write(0, &b)
        .expect("write B is acknowledged by the two replicas left");
    engine.wait_status("degraded with replica 1 ejected", |s| {
        s["state"] == "degraded"
            && replica_entry(s, &proxy.addr).is_some_and(|r| r["mode"] == "ERR")
    });
    nbd.write(0, &c).expect("write C");
    nbd.flush().expect("flush C");
    // The engine cut the connection it gave up on (recorded now, asserted
    // after the data checks so that an engine that does not shows the data
    // loss first).
    let cut = proxy.wait_frozen_closed_by_engine(Duration::from_secs(10));

    // The link heals; replica 1 is added back and resynced.
    engine.ctl_ok(&["replica", "add", &proxy.addr, "--wait"]);
    engine.wait_healthy(3);

    // TCP's next retransmission: the stuck request (write B) arrives.
    let delivered = proxy.release();
    assert!(delivered > 0, "write B was held on the old connection");
    assert!(
        proxy.wait_released_closed_by_replica(DEADLINE),
        "replica 1 never closed the old connection after its last bytes"
    );

    // Reads rotate over the replicas: every one must return C.
    for i in 0..12 {
        let got = nbd.read(0, BS as u32).expect("read block 0");
        assert_same(&format!("read {i} of block 0 through the engine"), &got, &c);
    }
    drop(nbd);
    engine.stop();
    let image =
        assert_replicas_identical(&[&replicas[0].addr, &replicas[1].addr, &replicas[2].addr]);
    assert_same("block 0 of every replica", &image[..block], &c);
    assert!(
        cut,
        "the engine did not close its connection to the ejected replica"
    );
}

/// Starts three replicas, a fault proxy in front of each, and an engine on
/// the proxies with a 1 s I/O timeout.
fn proxied(tmp: &std::path::Path, volume: &str) -> (Vec<Replica>, Vec<FaultProxy>, Engine) {
    let replicas = start_replicas(tmp, 3, "8M");
    let proxies: Vec<FaultProxy> = replicas
        .iter()
        .map(|r| FaultProxy::start(&r.addr))
        .collect();
    let addrs: Vec<&str> = proxies.iter().map(|p| p.addr.as_str()).collect();
    let engine = Engine::start_with(tmp, volume, "8M", &addrs, &["--io-timeout", "1s"]);
    engine.wait_healthy(3);
    (replicas, proxies, engine)
}

fn replica_addrs(replicas: &[Replica]) -> Vec<&str> {
    replicas.iter().map(|r| r.addr.as_str()).collect()
}

/// The replies of one replica stop coming back (a one-way partition,
/// replica → engine): the engine ejects it after the I/O timeout and goes
/// on with the others; after the link heals and the replica is added back,
/// the late replies on the old connection change nothing.
#[test]
fn replies_lost_one_way_eject_the_replica_and_arrive_too_late_to_matter() {
    let _serial = serial();
    let tmp = tempdir();
    let (replicas, proxies, mut engine) = proxied(tmp.path(), "oneway");
    let mut nbd = NbdConn::connect(&engine.socket, "oneway");
    let (a, b) = (pattern(11, BS as usize), pattern(12, BS as usize));
    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    assert!(proxies[2].freeze_toward(Toward::Engine) > 0);
    nbd.write(BS, &b)
        .expect("write B is acknowledged by the two others");
    nbd.flush().expect("flush B");
    engine.wait_status("degraded with replica 2 ejected", |s| {
        replica_entry(s, &proxies[2].addr).is_some_and(|r| r["mode"] == "ERR")
    });
    engine.ctl_ok(&["replica", "add", &proxies[2].addr, "--wait"]);
    engine.wait_healthy(3);
    proxies[2].release();

    for _ in 0..6 {
        assert_same("block 0", &nbd.read(0, BS as u32).expect("read"), &a);
        assert_same("block 1", &nbd.read(BS, BS as u32).expect("read"), &b);
    }
    drop(nbd);
    engine.stop();
    let image = assert_replicas_identical(&replica_addrs(&replicas));
    assert_same(
        "block 1 of every replica",
        &image[BS as usize..2 * BS as usize],
        &b,
    );
}

/// The engine's host loses every replica at once: the write in flight is
/// never acknowledged (the client gets an error), and after the links heal
/// a new engine serves the replicas, all equal, with every write that was
/// acknowledged before the cut.
#[test]
fn an_engine_cut_off_from_every_replica_acknowledges_nothing() {
    let _serial = serial();
    let tmp = tempdir();
    let (replicas, proxies, mut engine) = proxied(tmp.path(), "cutoff");
    let mut nbd = NbdConn::connect(&engine.socket, "cutoff");
    let (a, b) = (pattern(21, BS as usize), pattern(22, BS as usize));
    nbd.write(0, &a).expect("write A");
    nbd.flush().expect("flush A");

    for p in &proxies {
        assert!(p.freeze_toward(Toward::Both) > 0);
    }
    let written = nbd.write(0, &b);
    assert!(
        written.is_err(),
        "a write no replica received was acknowledged; engine log:\n{}",
        engine.log_tail()
    );
    let flushed = nbd.flush();
    assert!(flushed.is_err(), "a flush no replica received succeeded");
    drop(nbd);

    // The links heal; the old engine is gone (as after a node loss).
    engine.kill9();
    for p in &proxies {
        p.release();
    }
    let addrs = replica_addrs(&replicas);
    let mut engine = Engine::start(tmp.path(), "cutoff", "8M", &addrs);
    engine.wait_healthy(3);
    let mut nbd = NbdConn::connect(&engine.socket, "cutoff");
    let got = nbd.read(0, BS as u32).expect("read block 0");
    assert!(
        got == a || got == b,
        "block 0 holds neither the acknowledged write nor the unacknowledged one"
    );
    drop(nbd);
    engine.stop();
    assert_replicas_identical(&addrs);
}

/// A replica paused past the I/O timeout is ejected; resumed, it does not
/// come back into service by itself (it missed writes): it stays ejected
/// until it is added back, and its resync makes it equal to the others.
#[test]
fn a_paused_replica_stays_ejected_after_it_resumes_until_resynced() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "8M");
    let addrs = replica_addrs(&replicas);
    let mut engine =
        Engine::start_with(tmp.path(), "paused", "8M", &addrs, &["--io-timeout", "1s"]);
    engine.wait_healthy(3);
    let mut nbd = NbdConn::connect(&engine.socket, "paused");
    nbd.write(0, &pattern(31, BS as usize)).expect("write");

    replicas[1].signal(nix::sys::signal::Signal::SIGSTOP);
    let missed = pattern(32, BS as usize);
    nbd.write(0, &missed).expect("write while paused");
    engine.wait_status("degraded with replica 1 ejected", |s| {
        replica_entry(s, &replicas[1].addr).is_some_and(|r| r["mode"] == "ERR")
    });
    replicas[1].signal(nix::sys::signal::Signal::SIGCONT);
    // More writes and reads after it resumed: it must take no part.
    let after = pattern(33, BS as usize);
    nbd.write(BS, &after).expect("write after resume");
    nbd.flush().expect("flush");
    for _ in 0..6 {
        assert_same("block 0", &nbd.read(0, BS as u32).expect("read"), &missed);
    }
    let st = engine.status();
    assert_eq!(
        replica_entry(&st, &replicas[1].addr).map(|r| r["mode"].clone()),
        Some("ERR".into()),
        "a resumed replica came back without a resync: {st}"
    );

    engine.ctl_ok(&["replica", "add", &replicas[1].addr, "--wait"]);
    engine.wait_healthy(3);
    drop(nbd);
    engine.stop();
    let image = assert_replicas_identical(&addrs);
    assert_same("block 0 of every replica", &image[..BS as usize], &missed);
    assert_same(
        "block 1 of every replica",
        &image[BS as usize..2 * BS as usize],
        &after,
    );
}

/// Split brain: a second engine starts on the replicas of a running one
/// (a new epoch). The old engine's client gets errors for its writes from
/// then on — never an acknowledgement of a write the new engine will not
/// see — and the new engine serves what was acknowledged before.
#[test]
fn a_fenced_engine_never_acknowledges_a_write() {
    let _serial = serial();
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "8M");
    let addrs = replica_addrs(&replicas);
    let mut old = Engine::start_with(tmp.path(), "split", "8M", &addrs, &["--io-timeout", "1s"]);
    old.wait_healthy(3);
    let mut old_client = NbdConn::connect(&old.socket, "split");
    let a = pattern(41, BS as usize);
    old_client.write(0, &a).expect("write A");
    old_client.flush().expect("flush A");

    let mut new = Engine::start(tmp.path(), "split", "8M", &addrs);
    assert!(new.epoch > old.epoch, "{} then {}", old.epoch, new.epoch);
    new.wait_healthy(3);
    let stale = pattern(42, BS as usize);
    assert!(
        old_client.write(0, &stale).is_err(),
        "the fenced engine acknowledged a write; its log:\n{}",
        old.log_tail()
    );
    assert!(
        old_client.flush().is_err(),
        "the fenced engine acknowledged a flush"
    );
    drop(old_client);
    old.kill9();

    let mut client = NbdConn::connect(&new.socket, "split");
    for _ in 0..6 {
        assert_same("block 0", &client.read(0, BS as u32).expect("read"), &a);
    }
    drop(client);
    new.stop();
    let image = assert_replicas_identical(&addrs);
    assert_same("block 0 of every replica", &image[..BS as usize], &a);
}

/// A link that delays everything (a proxy delay line, both ways): at 30 ms
/// the engine keeps going, slower; at 1.5 s — more than the I/O timeout —
/// the replica is ejected while requests of the old link are still in the
/// line, the writes are acknowledged by the two others, and the replica is
/// added back while those old requests are still on their way; they arrive
/// late and change nothing. Every write reads back and every replica holds
/// the same image.
#[test]
fn a_delayed_link_slows_io_and_a_link_slower_than_the_timeout_ejects_safely() {
    let _serial = serial();
    let tmp = tempdir();
    let (replicas, proxies, mut engine) = proxied(tmp.path(), "delayed");
    let mut nbd = NbdConn::connect(&engine.socket, "delayed");
    let blocks = 32u64;
    let mut expect: Vec<Vec<u8>> = Vec::new();

    // Slow but within the timeout: every write is acknowledged.
    proxies[1].set_delay(Duration::from_millis(30));
    for i in 0..blocks {
        let data = pattern(100 + i, BS as usize);
        nbd.write(i * BS, &data).expect("write through a slow link");
        expect.push(data);
    }
    nbd.flush().expect("flush through a slow link");
    for (i, data) in expect.iter().enumerate() {
        assert_same(
            "a block written through a slow link",
            &nbd.read(i as u64 * BS, BS as u32).expect("read"),
            data,
        );
    }

    // Slower than the I/O timeout: replica 1 is ejected; the writes go on.
    proxies[1].set_delay(Duration::from_millis(1500));
    for i in 0..blocks / 2 {
        let data = pattern(200 + i, BS as usize);
        nbd.write(i * BS, &data)
            .expect("write acknowledged by the two others");
        expect[i as usize] = data;
    }
    nbd.flush().expect("flush acknowledged by the two others");
    engine.wait_status("replica 1 ejected", |s| {
        replica_entry(s, &proxies[1].addr).is_some_and(|r| r["mode"] == "ERR")
    });
    // The link speeds up; the replica comes back while the old link's
    // requests may still be in the delay line.
    proxies[1].set_delay(Duration::ZERO);
    engine.ctl_ok(&["replica", "add", &proxies[1].addr, "--wait"]);
    engine.wait_healthy(3);
    // Every old request has arrived (or died with its connection).
    assert!(
        proxies[1].wait_delivered(Duration::from_secs(30)),
        "the delay line never drained"
    );
    for _ in 0..3 {
        for (i, data) in expect.iter().enumerate() {
            assert_same(
                "a block after the slow replica came back",
                &nbd.read(i as u64 * BS, BS as u32).expect("read"),
                data,
            );
        }
    }
    drop(nbd);
    engine.stop();
    let image = assert_replicas_identical(&replica_addrs(&replicas));
    for (i, data) in expect.iter().enumerate() {
        let at = i * BS as usize;
        assert_same("every replica's block", &image[at..at + BS as usize], data);
    }
}

/// Blocks the checker of the failing-disk tests writes round and round.
const CHECKED_BLOCKS: u64 = 512;

/// How a test makes replica 1's disk fail, shows that the disk (and not
/// something else) made the replica fail, and heals it.
struct DiskFault {
    /// Checked blocks written before the fault (a full round and more, or
    /// fewer when the fault needs blocks never written yet).
    written_before: u64,
    make: fn(&EioDisk),
    /// Panics unless the disk is what failed replica 1; says what it did.
    confirm: fn(&EioDisk, &Engine) -> String,
    heal: fn(&EioDisk),
}

/// Three replicas, replica 1 on a disk that fails on demand ([`EioDisk`]),
/// and an engine serving an 8 MiB volume on them. A checker writes
/// `fault.written_before` writes; between two of its writes the disk
/// fails. Replica 1 must be ejected (`fault.confirm` shows the disk did
/// it) while writes go on, acknowledged by the two others. The disk heals;
/// more writes while replica 1 is added back and resynced; then every
/// acknowledged write reads back through the engine and from every replica
/// read alone, which hold the same image.
fn on_failing_disk(volume: &str, fault: DiskFault) {
    let _serial = serial();
    let tmp = tempdir();
    // Declared first, dropped last: after the processes that use it.
    let disk = EioDisk::create(&tmp.path().join("eio"), 64 * MIB);
    let replicas = vec![
        Replica::start(&tmp.path().join("r0"), Some("8M")),
        Replica::start(&disk.dir.join("r1"), Some("8M")),
        Replica::start(&tmp.path().join("r2"), Some("8M")),
    ];
    let addrs = replica_addrs(&replicas);
    let mut engine = Engine::start(tmp.path(), volume, "8M", &addrs);
    engine.wait_healthy(3);
    let checker = Checker::start(&engine, CHECKED_BLOCKS, rand_u64());
    let mut writes = fault.written_before;
    checker.run_to(writes);
    checker.wait_acked(writes);

    (fault.make)(&disk);
    // Fewer than a round: the block a failed write was meant for is not
    // written again before the resync.
    writes += CHECKED_BLOCKS / 2;
    checker.run_to(writes);
    engine.wait_status("degraded with replica 1 ejected", |s| {
        s["state"] == "degraded" && replica_entry(s, addrs[1]).is_some_and(|r| r["mode"] == "ERR")
    });
    checker.wait_acked(writes);
    eprintln!("{}", (fault.confirm)(&disk, &engine));

    (fault.heal)(&disk);
    checker.run_to(writes + CHECKED_BLOCKS / 4);
    engine
        .ctl_timeout(&["replica", "add", addrs[1], "--wait"], LONG)
        .expect_ok();
    engine.wait_healthy(3);
    let expect = checker.finish();

    let mut nbd = NbdConn::connect(&engine.socket, volume);
    let chunk = 16 * BS;
    for round in 0..3 {
        for at in (0..expect.len() as u64).step_by(chunk as usize) {
            let got = nbd.read(at, chunk as u32).expect("read through the engine");
            let want = &expect[at as usize..(at + chunk) as usize];
            assert_same(
                &format!("round {round} at {at} through the engine"),
                &got,
                want,
            );
        }
    }
    drop(nbd);
    let st = engine.status();
    assert!(
        st["state"] == "healthy",
        "a replica failed while the volume was read back: {st}\nengine stderr:\n{}",
        engine.log_tail()
    );
    engine.stop();
    let image = assert_replicas_identical(&addrs);
    assert_same("every replica", &image[..expect.len()], &expect);
    assert!(
        all_zero(&image[expect.len()..]),
        "blocks never written hold data"
    );
}

/// The disk under replica 1 fails every write and cache flush (EIO). The
/// replica answers the write that hit it with an I/O error, and the engine
/// ejects it and acknowledges the write from the two others; writes go on.
/// The disk heals (the replica process lives on); replica 1 is added back
/// and resynced while writes go on. Every acknowledged and flushed write
/// reads back, and every replica read alone holds the same image.
#[test]
fn a_replica_whose_disk_fails_writes_is_ejected_and_resynced_after_the_disk_heals() {
    on_failing_disk(
        "eiowrite",
        DiskFault {
            written_before: CHECKED_BLOCKS + 8,
            make: |d| d.faults().fail_writes(true),
            confirm: |d, _| refused("writes", d.faults().refused_writes()),
            heal: |d| d.faults().heal(),
        },
    );
}

/// The disk under replica 1 fails every read (EIO). The first read the
/// replica serves fails; the engine ejects it and serves the read from
/// another replica; writes go on. The disk heals; replica 1 is added back
/// and resynced while writes go on. Every acknowledged and flushed write
/// reads back, and every replica read alone holds the same image.
#[test]
fn a_replica_whose_disk_fails_reads_is_ejected_and_resynced_after_the_disk_heals() {
    on_failing_disk(
        "eioread",
        DiskFault {
            written_before: CHECKED_BLOCKS + 8,
            make: |d| d.faults().fail_reads(true),
            confirm: |d, _| refused("reads", d.faults().refused_reads()),
            heal: |d| d.faults().heal(),
        },
    );
}

/// The filesystem under replica 1 fills up (another file takes every free
/// block) while a quarter of the checked blocks were ever written: the
/// first write to a block the replica's data file never held fails with
/// ENOSPC, the replica answers it "no space left", the engine ejects it
/// and acknowledges the write from the two others; writes go on. The file
/// is removed; replica 1 is added back and resynced while writes go on.
/// Every acknowledged and flushed write reads back, and every replica read
/// alone holds the same image.
#[test]
fn a_replica_whose_disk_fills_up_is_ejected_and_resynced_after_space_is_freed() {
    on_failing_disk(
        "fulldisk",
        DiskFault {
            written_before: CHECKED_BLOCKS / 4,
            make: |d| {
                let took = d.fill();
                eprintln!("the ballast took the disk's last {} KiB", took / 1024);
            },
            confirm: |_, engine| {
                let log = engine.log_tail();
                assert!(
                    log.contains("no space left on the replica's disk"),
                    "replica 1 was ejected, but not for a full disk; engine stderr:\n{log}"
                );
                "replica 1 answered \"no space left\"".to_string()
            },
            heal: EioDisk::unfill,
        },
    );
}

/// Panics unless the disk refused some requests.
fn refused(what: &str, n: u64) -> String {
    assert!(
        n > 0,
        "the disk refused no {what}: replica 1 was ejected for another reason"
    );
    format!("the disk answered {n} {what} with EIO")
}
