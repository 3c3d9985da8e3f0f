//! End to end: an engine keeps the node's CPUs awake while its volume has
//! I/O (`--keep-cpus-awake`, `zebu_proto::awake`), seen where the kernel
//! shows it: reading `/dev/cpu_dma_latency` gives the CPU latency every
//! process's requests add up to (the lowest), 2,000,000,000 µs when nobody
//! asks for anything.
//!
//! The replicas run with `ZEBU_KEEP_CPUS_AWAKE=off` (set for this test
//! binary's children, one test), so the engine's request is the only one of
//! this test.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const DEVICE: &str = "/dev/cpu_dma_latency";
const NO_CONSTRAINT: i32 = 2_000_000_000;

/// The kernel's current CPU latency limit.
fn limit() -> i32 {
    let b = std::fs::read(DEVICE).unwrap_or_else(|e| panic!("reading {DEVICE}: {e}"));
    i32::from_ne_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Waits (up to a minute) for the limit to be `want`; `why` says what
/// should have made it so.
fn wait_limit(want: i32, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = limit();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{DEVICE} reads {got}, expected {want}: {why}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` has the QoS device open.
fn holds_device(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l == Path::new(DEVICE))
}

/// An engine that has done I/O holds the limit at 0 for its linger and lets
/// it go after; one stopped lets it go at once (its request dies with its
/// file descriptor), and an engine told `off` never opens the device.
#[test]
fn an_engine_holds_the_cpus_awake_while_its_volume_has_io() {
    let _serial = serial();
    require_tool("nbdcopy", "libnbd-bin");
    assert!(Path::new(DEVICE).exists(), "this kernel has no {DEVICE}");
    // SAFETY: the only test of this binary sets it before starting any
    // process or thread of its own.
    unsafe { std::env::set_var("ZEBU_KEEP_CPUS_AWAKE", "off") };
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "64M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let src = tmp.path().join("src.img");
    write_file(&src, &pattern(rand_u64(), 4 * MIB as usize));

    wait_limit(NO_CONSTRAINT, "another process holds a CPU latency request");
    let mut engine = Engine::start_with(
        tmp.path(),
        "awake",
        "64M",
        &addrs,
        &["--keep-cpus-awake", "1h"],
    );
    assert!(
        holds_device(engine.pid().as_raw()),
        "the engine opened {DEVICE}"
    );
    nbd_write_file(&engine.uri(), &src);
    assert_eq!(limit(), 0, "held after I/O, for an hour");
    engine.stop();
    wait_limit(NO_CONSTRAINT, "the engine stopped");

    let mut engine = Engine::start_with(
        tmp.path(),
        "awake",
        "64M",
        &addrs,
        &["--keep-cpus-awake", "50ms"],
    );
    nbd_write_file(&engine.uri(), &src);
    wait_limit(NO_CONSTRAINT, "50 ms without I/O: the engine releases it");
    assert!(
        holds_device(engine.pid().as_raw()),
        "still open for the next I/O"
    );
    nbd_write_file(&engine.uri(), &src);
    let back = nbd_read_all(&engine.uri(), tmp.path());
    assert_same(
        "the volume's first 4 MiB",
        &back[..4 * MIB as usize],
        &std::fs::read(&src).unwrap(),
    );
    engine.stop();

    let mut engine = Engine::start_with(tmp.path(), "awake", "64M", &addrs, &[]);
    assert!(
        !holds_device(engine.pid().as_raw()),
        "ZEBU_KEEP_CPUS_AWAKE=off: never opened"
    );
    nbd_write_file(&engine.uri(), &src);
    assert_eq!(limit(), NO_CONSTRAINT, "off: nothing asked during I/O");
    // The variable set is no serving flag given to `ctl`.
    engine.ctl_ok(&["status"]);
    engine.stop();

    let r = run(
        Command::new(engine_bin())
            .env("ZEBU_KEEP_CPUS_AWAKE", "soon")
            .args(["--volume", "awake", "--size", "64M", "--replica", addrs[0]])
            .args(["--nbd", "tcp:127.0.0.1:0", "--listen", "127.0.0.1:0"]),
        SHORT,
    )
    .expect_fail();
    assert!(
        r.stderr
            .contains("ZEBU_KEEP_CPUS_AWAKE: invalid interval \"soon\""),
        "unclear message: {}",
        r.stderr
    );
}
