//! Test kit of Zebu's integration suites (a dev-dependency only): what every
//! suite that starts real processes and real tools needs, once.
//!
//! - [`bin`]: the binaries under test (this build's, or `ZEBU_TEST_BIN_DIR`'s
//!   to replay a test against an older build); [`require_tool`] fails, never
//!   skips, when a tool is missing.
//! - [`command`]: external commands with timeouts, in their own process group,
//!   killed and reaped by a guard.
//! - [`server`]: long-running processes that announce readiness with a ready
//!   line, killed and reaped by a guard that prints their log tail when the
//!   test fails.
//! - [`block`]: loop devices, mounts and `nbdfuse` exports as guards.
//! - [`eio_disk`]: a disk that fails reads or writes with EIO on demand
//!   (a FUSE file served by the test, under a loop device and ext4).
//! - [`nbd`]: libnbd's tools (`nbdcopy`, `nbdinfo`) and fio on NBD URIs.
//! - [`kube`]: the test cluster (a real Kubernetes control plane) with
//!   Zebu's custom resources installed.
//! - [`data`]: deterministic data patterns and comparisons that report the
//!   first differing block instead of megabytes.
//!
//! Invariant: everything a test starts or sets up here is owned by a guard
//! that undoes it when dropped, also while unwinding from a failed
//! assertion. Declare guards in the order things were set up: locals drop
//! in reverse.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod block;
pub mod command;
pub mod data;
pub mod eio_disk;
pub mod kube;
pub mod nbd;
pub mod server;

pub use block::{FuseExport, LoopDev, Mount, mounts_under, unmount_all_under};
pub use command::{Bg, Run, cmd, reap, run, run_quiet};
pub use data::{all_zero, assert_same, pattern, rand_u64, write_file};
pub use eio_disk::{EioDisk, Faults};
pub use nbd::{Fio, NbdKit, nbd_read_all, nbd_write_file, nbdinfo};
pub use server::Server;

/// Block size of a Zebu volume.
pub const BS: u64 = 4096;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Timeout of one short external command (ctl, nbdinfo, qemu-img info...).
pub const SHORT: Duration = Duration::from_secs(60);
/// Timeout of one data-moving external command (nbdcopy, fio...).
pub const LONG: Duration = Duration::from_secs(600);

static HEAVY: Mutex<()> = Mutex::new(());

/// Tests of one binary run in parallel by default; most of ours are heavy
/// (several processes, fio, hundreds of MiB, mounts) on a 2-core machine, so
/// each takes this lock for its whole run.
pub fn serial() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The binary `name` under test: from `ZEBU_TEST_BIN_DIR` when set (to run
/// a new test against an older build), else this build's, next to the test
/// executable's `deps/` (`cargo test --workspace` builds every binary).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("ZEBU_TEST_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        assert!(
            p.is_file(),
            "ZEBU_TEST_BIN_DIR has no {name}: {}",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test executable has no grandparent dir")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it with cargo build --workspace --bins",
        p.display()
    );
    p
}

/// Fails (never skips) when an external tool is missing, naming the Debian
/// package that provides it.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed: apt-get install {package}"
    );
}

/// The tools every attach on a node needs.
pub fn require_node_tools() {
    require_tool("losetup", "util-linux");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("mkfs.xfs", "xfsprogs");
    require_tool("fusermount3", "fuse3");
}

/// A fresh directory under `$TMPDIR` (default `/var/tmp`), removed when
/// dropped. Its path is short: Unix socket paths under it must stay under
/// 108 bytes.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("zt-")
        .tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("create a temp dir under $TMPDIR (default /var/tmp)")
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub fn poll(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    loop {
        if check() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A multi-threaded tokio runtime (2 workers) for tests that serve or call
/// gRPC.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs async work (gRPC calls) to completion on a runtime of its own,
/// bounded by [`LONG`].
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async { tokio::time::timeout(LONG, f).await })
        .unwrap_or_else(|_| panic!("async work took more than {LONG:?}"))
}
