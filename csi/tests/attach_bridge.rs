//! Integration tests of `zebu_csi::attach` with `Backend::Bridge`
//! (`zebu-nbd-fuse`, this crate's FUSE ↔ NBD bridge) against a real NBD
//! server: `nbdkit file FILE` on a unix socket, so the export can be grown by
//! growing FILE (a new NBD connection then sees the new size), and FILE can
//! be checked independently of the bridge.
//!
//! Need root, /dev/fuse and the tools named in `require_tools` (they fail,
//! never skip, when something is missing). Guards are declared in the order
//! nbdkit → attachment → mount, so a panicking test drops them as
//! mount → loop device + FUSE (detach) → nbdkit → temp dir.
//!
//! No test depends on timing: every wait is a poll bounded by a deadline.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use zebu_csi::attach::{self, AttachError, Attached, Backend, FsOutcome};

mod attach_env;
use attach_env::*;
use zebu_testkit::tempdir;

const MIB: u64 = 1024 * 1024;
/// The bridge binary under test (the attach code finds it next to the test
/// executable's directory, as next to `zebu-csi`).
fn bridge() -> PathBuf {
    zebu_testkit::bin("zebu-nbd-fuse")
}

// ---------------------------------------------------------------------------
// Helpers and guards.

fn require_tools() {
    assert!(
        // /proc/self belongs to the effective uid.
        std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0),
        "these tests need root (mount, loop devices, FUSE)"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    bridge();
    for (tool, package) in [
        ("nbdkit", "nbdkit"),
        ("nbdfuse", "libnbd-bin"),
        ("nbdinfo", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "util-linux"),
        ("blkid", "util-linux"),
        ("blockdev", "util-linux"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
        ("fio", "fio"),
        ("qemu-img", "qemu-utils"),
    ] {
        zebu_testkit::require_tool(tool, package);
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

fn getsize64(device: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(device)
        .output()
        .expect("blockdev");
    assert!(
        out.status.success(),
        "blockdev: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("blockdev printed a number")
}

/// The process `pid` runs the bridge binary built for this test.
fn assert_runs_bridge(pid: i32) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    let built = bridge().canonicalize().expect("canonicalize");
    assert_eq!(exe, built, "pid {pid} is not {}", built.display());
}

/// Nothing of an attachment is left: no loop device on the FUSE file, no
/// FUSE mount, no bridge process, no state file.
fn assert_fully_detached(state_dir: &Path, att: &Attached) {
    let backing = att.backing_file.as_os_str().to_string_lossy().into_owned();
    let out = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .expect("losetup -l");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(&backing),
        "loop device still attached:\n{listing}"
    );
    assert!(
        !rt()
            .block_on(attach::is_mounted(&att.fuse_dir))
            .expect("is_mounted"),
        "FUSE still mounted at {}",
        att.fuse_dir.display()
    );
    // The bridge exits once unmounted; a zombie (not yet reaped) counts as gone.
    let stat = std::fs::read_to_string(format!(
        "/proc/{}/stat",
        att.nbdfuse_pid.expect("a FUSE server pid")
    ))
    .unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z") | Some("X")) || !stat.contains("zebu-nbd-fuse"),
        "bridge (pid {}) still running: {stat}",
        att.nbdfuse_pid.expect("a FUSE server pid")
    );
    assert!(
        !state_dir.join("attach.json").exists(),
        "state file left behind"
    );
}

// ---------------------------------------------------------------------------
// Tests.

/// The whole life of a volume on the bridge: attach (idempotent), mkfs.xfs,
/// write, grow the export while mounted, `refresh_size` + `xfs_growfs`
/// online, detach; then the export file itself, mounted through a plain
/// loop device (no bridge involved), holds the grown filesystem and the data.
///
/// Sizes: mkfs.xfs (xfsprogs >= 5.19) refuses filesystems below 300 MiB, so
/// the export grows 320 → 960 MiB (a sparse file: cheap).
#[test]
fn xfs_on_bridge_grows_online_and_data_lands_in_the_export() {
    require_tools();
    let dir = tempdir();
    let small = 320 * MIB;
    let big = 960 * MIB;
    let nbd = NbdKit::file(dir.path(), small);
    let state = dir.path().join("state");
    let mnt = dir.path().join("mnt");
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pattern(i, (i as usize + 1) * 300_001)))
        .collect();

    let a = Attachment::new(Backend::Bridge, &nbd.uri, &state);
    assert_eq!(a.att.backend, Backend::Bridge);
    assert_eq!(a.att.size_bytes, small);
    assert_eq!(getsize64(a.device()), small);
    assert_runs_bridge(a.att.nbdfuse_pid.expect("the bridge pid"));
    // Attaching again returns the same, still valid attachment.
    let again = rt()
        .block_on(attach::attach_with(Backend::Bridge, &nbd.uri, &state))
        .expect("attach again");
    assert_eq!(again, a.att);
    // Nothing to refresh yet.
    assert_eq!(
        rt().block_on(attach::refresh_size(&state))
            .expect("refresh_size, same size"),
        small
    );

    assert_eq!(
        rt().block_on(attach::ensure_filesystem(a.device(), "xfs"))
            .expect("mkfs.xfs"),
        FsOutcome::Formatted
    );
    let m = Mounted::fs(a.device(), &mnt, "xfs", false);
    for (name, data) in &files[..4] {
        write_synced(&mnt.join(name), data);
    }
    let before = fs_stats(&mnt);
    assert!(
        before.total_bytes > 250 * MIB && before.total_bytes <= small,
        "{before:?}"
    );
    // Everything the device shows is in the export file: after syncfs, the
    // device (read through the bridge) equals the file nbdkit serves.
    nix::unistd::syncfs(std::fs::File::open(&mnt).expect("open mnt")).expect("syncfs");
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&nbd.file)
        .arg(a.device())
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "export file and device differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Grow the volume while it is mounted and in use.
    nbd.resize(big);
    let size = rt()
        .block_on(attach::refresh_size(&state))
        .unwrap_or_else(|e| panic!("refresh_size: {e}"));
    assert_eq!(size, big);
    assert_eq!(getsize64(a.device()), big);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("attach.json")).expect("state file"))
            .expect("state json");
    assert_eq!(rec["size_bytes"], big, "{rec}");
    assert_eq!(
        rt().block_on(attach::expand_filesystem(a.device(), Some(&mnt), Some(big)))
            .unwrap_or_else(|e| panic!("xfs_growfs: {e}")),
        big
    );
    let after = fs_stats(&mnt);
    // The filesystem grew by as much as the device did.
    let grown = before.total_bytes + (big - small);
    assert!(
        after.total_bytes >= grown && after.total_bytes <= big,
        "before {before:?}, after {after:?}"
    );
    assert!(after.available_bytes > before.total_bytes, "{after:?}");
    for (name, data) in &files[..4] {
        assert_eq!(&read_all(&mnt.join(name)), data, "{name} changed");
    }
    for (name, data) in &files[4..] {
        write_synced(&mnt.join(name), data);
    }
    // Use the new space for real: a file larger than the old filesystem.
    let large = pattern(99, 400 * MIB as usize);
    write_synced(&mnt.join("large"), &large);

    m.unmount();
    let att = a.att.clone();
    a.detach();
    assert_fully_detached(&state, &att);
    drop(nbd);

    // The export file alone holds the grown filesystem and every file.
    let lo = PlainLoop::new(&dir.path().join("export.img"));
    let m = Mounted::fs(&lo.dev, &mnt, "xfs", true);
    let s = fs_stats(&mnt);
    assert!(s.total_bytes >= grown, "{s:?}");
    for (name, data) in &files {
        assert_eq!(
            &read_all(&mnt.join(name)),
            data,
            "{name} in the export file"
        );
    }
    assert!(read_all(&mnt.join("large")) == large, "large file differs");
    m.unmount();
}

/// Concurrent direct I/O through the raw device (fio, io_uring, QD16,
/// verified), and a write larger than FUSE's max_write straight to the
/// bridge's file at an unaligned offset.
#[test]
fn raw_device_concurrent_io_verifies_and_large_unaligned_writes_work() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::file(dir.path(), 64 * MIB);
    let state = dir.path().join("state");
    let a = Attachment::new(Backend::Bridge, &nbd.uri, &state);
    // The loop device runs in direct-I/O mode over the bridge (that is
    // where its concurrency comes from); losetup falls back silently.
    let name = a.device().file_name().expect("device name");
    let dio = std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/dio"))
        .expect("read loop/dio");
    assert_eq!(dio.trim(), "1", "the loop device is not in direct-I/O mode");

    let out = Command::new("fio")
        .args([
            "--name=bridge-verify",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--output-format=terse",
        ])
        .arg(format!("--filename={}", a.device().display()))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 5 MiB + 3 bytes at an odd offset: the kernel splits it into several
    // FUSE writes, each one or more NBD writes.
    let data = pattern(7, 5 * MIB as usize + 3);
    let offset = 20 * MIB + 4097;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a.att.backing_file)
        .expect("open the bridge file");
    assert_eq!(f.metadata().expect("stat").len(), 64 * MIB);
    f.write_all_at(&data, offset).expect("large write");
    f.sync_all().expect("fsync → NBD flush");
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, offset).expect("large read");
    assert!(back == data, "read back differs");
    let mut in_export = vec![0u8; data.len()];
    std::fs::File::open(&nbd.file)
        .expect("open the export file")
        .read_exact_at(&mut in_export, offset)
        .expect("read the export file");
    assert!(in_export == data, "the export file differs");
    // Writing past the end cannot grow the file.
    let err = f
        .write_all_at(b"x", 64 * MIB)
        .expect_err("wrote past the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // A short read at the end.
    let mut tail = vec![0u8; 8192];
    let n = f
        .read_at(&mut tail, 64 * MIB - 100)
        .expect("read at the end");
    assert_eq!(n, 100);
    drop(f);

    let att = a.att.clone();
    a.detach();
    assert_fully_detached(&state, &att);
}

/// Shrinking is refused (by refresh_size, and by the bridge itself on a
/// direct SIGUSR1); nbdfuse attachments report that they cannot grow.
#[test]
fn shrink_is_refused_and_nbdfuse_cannot_refresh() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::file(dir.path(), 64 * MIB);

    // nbdfuse: a grown export is DeviceTooSmall.
    let state = dir.path().join("state-nbdfuse");
    let a = Attachment::new(Backend::Nbdfuse, &nbd.uri, &state);
    assert_eq!(a.att.backend, Backend::Nbdfuse);
    nbd.resize(96 * MIB);
    let e = rt()
        .block_on(attach::refresh_size(&state))
        .expect_err("nbdfuse refreshed");
    assert!(
        matches!(
            e,
            AttachError::DeviceTooSmall {
                actual,
                required,
                ..
            } if actual == 64 * MIB && required == 96 * MIB
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nbdfuse"), "{e}");
    a.detach();

    // Bridge at 96 MiB; the export shrinks to 80 MiB.
    let state = dir.path().join("state-bridge");
    let a = Attachment::new(Backend::Bridge, &nbd.uri, &state);
    assert_eq!(getsize64(a.device()), 96 * MIB);
    nbd.resize(80 * MIB);
    let e = rt()
        .block_on(attach::refresh_size(&state))
        .expect_err("refresh_size shrank the device");
    assert!(e.to_string().contains("shrank"), "{e}");
    assert_eq!(getsize64(a.device()), 96 * MIB);
    // The bridge itself refuses too, and says so in its log.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.att.nbdfuse_pid.expect("the bridge pid")),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    let log = state.join("nbdfuse.log");
    poll("the bridge to log the refused shrink", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("shrank"))
    });
    assert_eq!(
        std::fs::metadata(&a.att.backing_file).expect("stat").len(),
        96 * MIB
    );
    // Growing again past the old size works.
    nbd.resize(128 * MIB);
    assert_eq!(
        rt().block_on(attach::refresh_size(&state))
            .expect("refresh_size"),
        128 * MIB
    );
    assert_eq!(getsize64(a.device()), 128 * MIB);
    a.detach();
}

#[test]
fn unreachable_export_is_a_clear_error_and_leaves_nothing() {
    require_tools();
    let dir = tempdir();
    let state = dir.path().join("state");
    let sock = dir.path().join("no-such.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let e = rt()
        .block_on(attach::attach_with(Backend::Bridge, &uri, &state))
        .expect_err("attached a missing export");
    let msg = e.to_string();
    assert!(
        msg.contains(&sock.display().to_string()) && msg.contains("No such file"),
        "{msg}"
    );
    assert!(!state.join("attach.json").exists());
    assert!(
        !state.join("fuse").exists()
            || !rt()
                .block_on(attach::is_mounted(&state.join("fuse")))
                .unwrap()
    );
    // Nothing attached: refresh_size says so; detach is a no-op.
    let e = rt()
        .block_on(attach::refresh_size(&state))
        .expect_err("refreshed nothing");
    assert!(e.to_string().contains("nothing is attached"), "{e}");
    rt().block_on(attach::detach(&state))
        .expect("detach nothing");
    // Not an NBD URI at all.
    let e = rt()
        .block_on(attach::attach_with(Backend::Bridge, "http://x/y", &state))
        .expect_err("attached http");
    assert!(matches!(e, AttachError::Precondition { .. }), "{e}");
}
