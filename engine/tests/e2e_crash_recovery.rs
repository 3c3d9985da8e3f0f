//! End to end: the engine is SIGKILLed in the middle of writes; a new engine
//! on the same replicas serves the flushed data, the replicas agree, and the
//! old engine's epoch is fenced off.

mod common;

use common::*;
use std::time::{Duration, Instant};
use zebu_proto::replica as pb;

#[test]
fn engine_crash_recovery_and_fencing() {
    let _serial = serial();
    require_tool("fio", "fio");
    require_tool("nbdcopy", "libnbd-bin");
    let tmp = tempdir();
    let size = 128 * MIB;
    let replicas = start_replicas(tmp.path(), 3, "128M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();

    let mut old = Engine::start(tmp.path(), "crvol", "128M", &addrs);
    let old_epoch = old.epoch;
    // 32 MiB at the start of the volume, flushed (nbdcopy flushes at the end).
    let flushed = pattern(rand_u64(), (32 * MIB) as usize);
    let src = tmp.path().join("flushed.img");
    write_file(&src, &flushed);
    nbd_write_file(&old.uri(), &src);

    // Another write stream on the second half; the engine dies under it.
    let job = Fio {
        rw: "randwrite",
        bs: "4k",
        iodepth: 16,
        offset: 64 * MIB,
        size: 64 * MIB,
        rate_iops: Some(4000),
        verify: false,
    };
    let before = io_counter(&old.status(), "writes");
    let (mut fio, _out) = job.spawn(&old.uri(), tmp.path());
    let start = Instant::now();
    loop {
        let st = old.status();
        if io_counter(&st, "writes") >= before + 1000 {
            break;
        }
        assert!(fio.running(), "fio ended early; status: {st}");
        assert!(start.elapsed() < DEADLINE, "no write progress: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fio.running(), "fio finished before the engine was killed");
    old.kill9();
    // fio usually sees the connection die and fails; its nbd engine does not
    // always notice a dead server, which is fio's behaviour, not the
    // engine's: then stop it and go on with what this test is about.
    let deadline = Instant::now() + SHORT;
    while fio.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if fio.running() {
        eprintln!("fio did not notice its server died; stopping it");
        drop(fio);
    } else {
        let r = fio.wait(SHORT);
        assert!(!r.ok(), "fio succeeded although its engine was SIGKILLed");
    }

    // A new engine on the same replicas.
    let mut new = Engine::start(tmp.path(), "crvol", "128M", &addrs);
    assert!(
        new.epoch > old_epoch,
        "new engine epoch {} not above the old one {old_epoch}",
        new.epoch
    );
    let st = new.wait_healthy(3);
    assert_eq!(st["epoch"].as_u64(), Some(new.epoch), "{st}");
    let data = nbd_read_all(&new.uri(), tmp.path());
    assert_eq!(data.len() as u64, size);
    assert_same(
        "flushed data after the crash",
        &data[..flushed.len()],
        &flushed,
    );
    assert!(
        all_zero(&data[(32 * MIB) as usize..(64 * MIB) as usize]),
        "never-written range is not zero"
    );

    // The old engine's epoch is fenced off on every replica.
    for a in &addrs {
        let resp = block_on(async {
            let mut c = replica_client(a).await;
            let mut io = RawIo::open(&mut c, old_epoch).await;
            io.one(write_req(0, vec![0xAB; BS as usize])).await
        });
        assert_eq!(
            io_status(&resp),
            pb::IoStatus::IoStaleEpoch,
            "replica {a} accepted a write of the old epoch {old_epoch}: {}",
            resp.message
        );
    }
    // ...and nothing of that write landed.
    let again = nbd_read_all(&new.uri(), tmp.path());
    assert_same("data after the fenced write", &again, &data);
    drop(again);

    new.stop();
    let on_replicas = assert_replicas_identical(&addrs);
    assert_same(
        "replicas vs what the new engine served",
        &on_replicas,
        &data,
    );
}
