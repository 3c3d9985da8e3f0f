//! End to end: fio's NBD engine with crc32c verification against a real
//! engine over 3 replicas, random 4k and sequential 1M writes at queue
//! depths 1 and 32.

mod common;

use common::*;

#[test]
fn fio_verify_randwrite_and_write_qd1_qd32() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "256M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "fiovol", "256M", &addrs);
    let uri = engine.uri();

    // Each job on its own region of the volume.
    let jobs = [
        Fio {
            rw: "randwrite",
            bs: "4k",
            iodepth: 1,
            offset: 0,
            size: 16 * MIB,
            rate_iops: None,
            verify: true,
        },
        Fio {
            rw: "randwrite",
            bs: "4k",
            iodepth: 32,
            offset: 32 * MIB,
            size: 32 * MIB,
            rate_iops: None,
            verify: true,
        },
        Fio {
            rw: "write",
            bs: "1M",
            iodepth: 1,
            offset: 64 * MIB,
            size: 32 * MIB,
            rate_iops: None,
            verify: true,
        },
        Fio {
            rw: "write",
            bs: "1M",
            iodepth: 32,
            offset: 128 * MIB,
            size: 64 * MIB,
            rate_iops: None,
            verify: true,
        },
    ];
    for job in &jobs {
        let v = job.run_ok(&uri, tmp.path());
        let j = &v["jobs"][0];
        eprintln!(
            "fio {} bs={} iodepth={}: write {} IOPS, verify read {} IOPS",
            job.rw, job.bs, job.iodepth, j["write"]["iops"], j["read"]["iops"]
        );
    }
    let st = engine.status();
    assert_eq!(st["state"], "healthy", "{st}");
    assert!(
        io_counter(&st, "writes") >= (16 + 32) * MIB / BS,
        "io.writes too low: {st}"
    );

    engine.stop();
    let data = assert_replicas_identical(&addrs);
    // What was never written reads back as zeros.
    assert!(all_zero(&data[(16 * MIB) as usize..(32 * MIB) as usize]));
    assert!(all_zero(&data[(96 * MIB) as usize..(128 * MIB) as usize]));
    assert!(all_zero(&data[(192 * MIB) as usize..]));
    // What fio wrote is not.
    assert!(!all_zero(&data[(64 * MIB) as usize..(65 * MIB) as usize]));
}

/// The names of the threads of process `pid`.
fn thread_names(pid: nix::unistd::Pid) -> Vec<String> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).expect("listing the engine's threads");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim().to_owned())
        .collect()
}

/// `--worker-threads 2`: the engine runs on a two-worker runtime, and
/// verified writes at depth land on every replica as with the default
/// single thread.
#[test]
fn an_engine_with_two_worker_threads_keeps_every_replica_identical() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "128M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start_with(
        tmp.path(),
        "mtvol",
        "128M",
        &addrs,
        &["--worker-threads", "2"],
    );
    // The workers of a multi-threaded runtime (and its blocking pool, which
    // the engine does not use) carry the runtime's name.
    let names = thread_names(engine.pid());
    assert!(
        names.iter().filter(|n| *n == "zebu-engine-rt").count() >= 2,
        "threads: {names:?}"
    );
    let uri = engine.uri();
    for job in [
        Fio {
            rw: "randwrite",
            bs: "4k",
            iodepth: 32,
            offset: 0,
            size: 32 * MIB,
            rate_iops: None,
            verify: true,
        },
        Fio {
            rw: "write",
            bs: "1M",
            iodepth: 8,
            offset: 64 * MIB,
            size: 32 * MIB,
            rate_iops: None,
            verify: true,
        },
    ] {
        job.run_ok(&uri, tmp.path());
    }
    let st = engine.status();
    assert_eq!(st["state"], "healthy", "{st}");
    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert!(all_zero(&data[(32 * MIB) as usize..(64 * MIB) as usize]));
    assert!(!all_zero(&data[(64 * MIB) as usize..(65 * MIB) as usize]));

    // The default engine runs on its main thread alone; beside it there may
    // only be the releaser of its CPU latency request (`zebu_proto::awake`),
    // which does no I/O.
    let default = Engine::start(tmp.path(), "mtvol", "128M", &addrs);
    let names = thread_names(default.pid());
    let others: Vec<&String> = names.iter().filter(|n| *n != "zebu-awake").collect();
    assert_eq!(others, ["zebu-engine"], "threads: {names:?}");
}

/// 32 MiB writes (the largest NBD request) at depth 8, verified: every
/// replica stays healthy and identical. Up to 256 MiB may be in flight, more
/// than one gRPC message may carry; whether a burst that large ever lands in
/// one batch depends on timing, so the batch limit itself is tested in
/// `zebu_engine::batch` (`batches_keep_order_and_stay_within_the_message_limit`).
#[test]
fn largest_requests_at_depth_stay_on_every_replica() {
    let _serial = serial();
    require_tool("fio", "fio");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "512M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "bigvol", "512M", &addrs);
    let job = Fio {
        rw: "write",
        bs: "32M",
        iodepth: 8,
        offset: 0,
        size: 512 * MIB,
        rate_iops: None,
        verify: true,
    };
    job.run_ok(&engine.uri(), tmp.path());
    let st = engine.status();
    assert_eq!(st["state"], "healthy", "{st}");
    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert!(!all_zero(&data[(480 * MIB) as usize..]));
}
