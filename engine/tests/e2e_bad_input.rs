//! End to end: bad input to `zebu-engine` and `zebu-engine ctl` fails with a
//! non-zero exit and a message, and leaves a running engine unharmed.

mod common;

use common::*;
use std::process::Command;

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

fn mentions_any(msg: &str, words: &[&str]) -> bool {
    let m = msg.to_lowercase();
    words.iter().any(|w| m.contains(w))
}

#[test]
fn ctl_against_nothing_fails() {
    let addr = format!("127.0.0.1:{}", closed_port());
    let r = ctl(&addr, &["status", "-o", "json"], SHORT).expect_fail();
    eprintln!("ctl status against a closed port: {}", r.stderr.trim());
    assert!(
        r.stderr.contains(&addr) || mentions_any(&r.stderr, &["connect", "refused", "unreachable"]),
        "unclear message: {}",
        r.stderr
    );
}

#[test]
fn engine_refuses_bad_command_lines() {
    let tmp = tempdir();
    let sock = tmp.path().join("nbd.sock");
    let nbd = format!("unix:{}", sock.display());
    // No replica at all.
    let r = run(
        Command::new(engine_bin()).args([
            "--volume",
            "v",
            "--size",
            "64M",
            "--nbd",
            &nbd,
            "--listen",
            "127.0.0.1:0",
        ]),
        SHORT,
    )
    .expect_fail();
    eprintln!("no --replica: {}", r.stderr.trim());
    assert!(
        mentions_any(&r.stderr, &["replica"]),
        "unclear message: {}",
        r.stderr
    );

    // Bad values of the other flags (they need a replica to get that far; a
    // real one). Each case: the flag, its bad value, what the message names.
    let rep = Replica::start(&tmp.path().join("r0"), Some("64M"));
    let cases = [
        ("--nbd", "bogus:/tmp/x.sock", "nbd"),
        ("--nbd", "unix:", "nbd"),
        ("--nbd", "tcp:nohostport", "nbd"),
        ("--worker-threads", "0", "--worker-threads"),
        ("--worker-threads", "many", "--worker-threads"),
        ("--worker-threads", "100000", "--worker-threads"),
        ("--scrub-interval", "soon", "7d"),
        ("--scrub-interval", "0h", "invalid interval"),
        ("--scrub-rate", "100K", "use at least 1m"),
        ("--scrub-rate", "fast", "--scrub-rate"),
        ("--keep-cpus-awake", "soon", "--keep-cpus-awake"),
        (
            "--file",
            "/nonexistent-zebu-dir/disk",
            "mount directory does not exist",
        ),
        ("--file", "/", "no file name"),
    ];
    for (flag, bad, named) in cases {
        // The case's flag replaces the good --nbd, or comes after it.
        let (nbd_arg, extra) = match flag {
            "--nbd" => (bad, vec![]),
            _ => (nbd.as_str(), vec![flag, bad]),
        };
        let mut c = Command::new(engine_bin());
        c.args(["--volume", "v", "--size", "64M", "--replica", &rep.addr])
            .args(["--nbd", nbd_arg, "--listen", "127.0.0.1:0"])
            .args(extra);
        let r = run(&mut c, SHORT).expect_fail();
        eprintln!("{flag} {bad}: {}", r.stderr.trim());
        assert!(
            mentions_any(&r.stderr, &[named]),
            "unclear message for {flag} {bad}: {}",
            r.stderr
        );
    }
}

#[test]
fn ctl_bad_requests_fail_and_engine_keeps_serving() {
    let _serial = serial();
    require_tool("nbdinfo", "libnbd-bin");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 2, "64M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "badvol", "64M", &addrs);
    let before = engine.wait_healthy(2);

    // Unreachable replica.
    let unreachable = format!("127.0.0.1:{}", closed_port());
    let r = engine
        .ctl_timeout(&["replica", "add", &unreachable, "--wait"], LONG)
        .expect_fail();
    eprintln!("replica add {unreachable}: {}", r.stderr.trim());
    assert!(
        r.stderr.contains(&unreachable)
            || mentions_any(&r.stderr, &["connect", "unreachable", "refused"]),
        "unclear message: {}",
        r.stderr
    );
    // Unknown snapshot.
    let r = engine.ctl(&["revert", "nope"]).expect_fail();
    eprintln!("revert nope: {}", r.stderr.trim());
    assert!(
        mentions_any(&r.stderr, &["nope", "not found", "no such", "unknown"]),
        "unclear message: {}",
        r.stderr
    );
    engine.ctl(&["snapshot", "delete", "nope"]).expect_fail();
    // Shrinking.
    let r = engine.ctl(&["expand", "32M"]).expect_fail();
    eprintln!("expand 32M: {}", r.stderr.trim());
    engine.ctl(&["expand", "12Q"]).expect_fail();
    // Removing a replica that is not there.
    engine
        .ctl(&["replica", "remove", &unreachable])
        .expect_fail();
    // Unknown command.
    engine.ctl(&["frobnicate"]).expect_fail();

    // Nothing changed.
    let st = engine.wait_healthy(2);
    assert_eq!(st["size"], before["size"], "{st}");
    assert_eq!(st["size"].as_u64(), Some(64 * MIB), "{st}");
    assert_eq!(
        nbdinfo(&engine.uri())["export-size"].as_u64(),
        Some(64 * MIB)
    );

    // A valid expand works and new connections see the new size.
    engine.ctl_ok(&["expand", "96M"]);
    let st = engine.status();
    assert_eq!(st["size"].as_u64(), Some(96 * MIB), "{st}");
    assert_eq!(
        nbdinfo(&engine.uri())["export-size"].as_u64(),
        Some(96 * MIB)
    );

    engine.stop();
    let data = assert_replicas_identical(&addrs);
    assert_eq!(data.len() as u64, 96 * MIB);
}

/// A rebuild that fails midway (the new replica's filesystem is too small
/// for the data) is reported by `replica add --wait`: non-zero exit, a
/// message naming the replica and the cause. The failed replica is ejected
/// and the volume keeps serving its data from the others.
#[test]
fn failed_rebuild_is_reported_and_the_volume_keeps_serving() {
    let _serial = serial();
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("losetup", "util-linux");
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 2, "64M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "smallfs", "64M", &addrs);
    engine.wait_healthy(2);
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let src = tmp.path().join("data.img");
    std::fs::write(&src, &data).unwrap();
    nbd_write_file(&engine.uri(), &src);

    // A 16 MiB filesystem for the new replica: the 64 MiB copy cannot fit.
    let img = tmp.path().join("small.img");
    run(
        Command::new("truncate").args(["-s", "16M"]).arg(&img),
        SHORT,
    )
    .expect_ok();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img), LONG).expect_ok();
    let dev = LoopDev::attach(&img);
    let mnt = Mount::at(&dev.dev, &tmp.path().join("small"));
    let mut small = Replica::start(&mnt.dir.join("r"), Some("64M"));

    let r = engine
        .ctl_timeout(&["replica", "add", &small.addr, "--wait"], LONG)
        .expect_fail();
    eprintln!("replica add onto a full filesystem: {}", r.stderr.trim());
    assert!(r.stderr.contains(&small.addr), "{}", r.stderr);
    assert!(
        mentions_any(&r.stderr, &["rebuild"]) && mentions_any(&r.stderr, &["space"]),
        "unclear message: {}",
        r.stderr
    );
    let st = engine.status();
    let failed = st["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == small.addr.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["rebuild"]["state"], "failed", "{st}");
    assert_ne!(failed["mode"], "RW", "{st}");
    assert_eq!(st["state"], "degraded", "{st}");
    // Every byte still reads back from the two healthy replicas.
    assert!(nbd_read_all(&engine.uri(), tmp.path()) == data);

    engine.stop();
    small.terminate();
    drop(mnt);
    drop(dev);
}
