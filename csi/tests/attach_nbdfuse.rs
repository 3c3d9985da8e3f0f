//! Integration tests of `zebu_csi::attach` against a real NBD server
//! (`nbdkit memory`/`nbdkit file` on a unix socket), nbdfuse, loop devices
//! and ext4/xfs mounts.
//!
//! Need root, /dev/fuse and the tools named in `require_tools` (they fail,
//! never skip, when something is missing). Guards are declared in the order
//! nbdkit → attachment → mount, so a panicking test drops them as
//! mount → loop device + FUSE (detach) → nbdkit → temp dir.
//!
//! No test depends on timing: every wait is a poll bounded by a deadline.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use zebu_csi::attach::{self, AttachError, Attached, FsOutcome, VolumeStats};

mod attach_env;
use attach_env::*;
use zebu_testkit::tempdir;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers and guards.

fn require_tools() {
    assert!(
        // /proc/self belongs to the effective uid.
        std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0),
        "these tests need root (mount, loop devices, FUSE)"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    for (tool, package) in [
        ("nbdkit", "nbdkit"),
        ("nbdfuse", "libnbd-bin"),
        ("nbdinfo", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "util-linux"),
        ("blkid", "util-linux"),
        ("blockdev", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
    ] {
        zebu_testkit::require_tool(tool, package);
    }
}

fn assert_erofs(path: &Path) {
    let err = std::fs::write(path, b"nope").expect_err("write on a read-only mount succeeded");
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "expected EROFS, got {err}"
    );
}

fn blkid_type(device: &Path) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .expect("blkid");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Nothing of an attachment is left: no loop device on the FUSE file, no
/// FUSE mount, no nbdfuse, no state file.
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
    // nbdfuse exits once unmounted; a zombie (not yet reaped) counts as gone.
    let stat = std::fs::read_to_string(format!(
        "/proc/{}/stat",
        att.nbdfuse_pid.expect("a FUSE server pid")
    ))
    .unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z") | Some("X")) || !stat.contains("nbdfuse"),
        "nbdfuse (pid {}) still running: {stat}",
        att.nbdfuse_pid.expect("a FUSE server pid")
    );
    assert!(
        !state_dir.join("attach.json").exists(),
        "state file left behind"
    );
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn ext4_format_mount_detach_reattach_keeps_data_and_read_only_mount_refuses_writes() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::memory(dir.path(), 256 * MIB);
    let state = dir.path().join("state");
    let mnt = dir.path().join("mnt");

    // Round 1: fresh volume → formatted, written.
    {
        let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
        assert!(a.device().starts_with("/dev"), "{:?}", a.att);
        assert_eq!(a.att.size_bytes, 256 * MIB);
        // Attaching again returns the same, still valid attachment.
        let again = rt()
            .block_on(attach::attach_with(
                attach::Backend::Nbdfuse,
                &nbd.uri,
                &state,
            ))
            .expect("attach again");
        assert_eq!(again, a.att);
        // Another export into the same state dir is refused.
        let other = rt().block_on(attach::attach_with(
            attach::Backend::Nbdfuse,
            "nbd+unix:///x?socket=/nonexistent",
            &state,
        ));
        assert!(
            matches!(other, Err(AttachError::Precondition { .. })),
            "{other:?}"
        );

        let outcome = rt()
            .block_on(attach::ensure_filesystem(a.device(), "ext4"))
            .expect("mkfs");
        assert_eq!(outcome, FsOutcome::Formatted);
        let m = Mounted::fs(a.device(), &mnt, "ext4", false);
        // Idempotent mount; conflicting read-only-ness refused.
        rt().block_on(attach::mount(a.device(), &mnt, "ext4", false, &[]))
            .expect("mount again");
        assert!(
            rt().block_on(attach::mount(a.device(), &mnt, "ext4", true, &[]))
                .is_err()
        );
        write_synced(&mnt.join("hello.txt"), b"zebu was here");

        let s = fs_stats(&mnt);
        assert!(
            s.total_bytes > 200 * MIB && s.total_bytes <= 256 * MIB,
            "{s:?}"
        );
        assert!(s.used_bytes > 0 && s.used_bytes <= s.total_bytes, "{s:?}");
        assert!(s.available_bytes <= s.total_bytes, "{s:?}");
        assert!(
            s.total_inodes > 0 && s.used_inodes >= 12 && s.used_inodes <= s.total_inodes,
            "{s:?}"
        );
        assert_eq!(s.used_inodes + s.free_inodes, s.total_inodes, "{s:?}");

        // The device is busy while mounted: detach refuses, changes nothing.
        let busy = rt().block_on(attach::detach(&state));
        assert!(
            matches!(busy, Err(AttachError::Precondition { .. })),
            "{busy:?}"
        );
        assert!(state.join("attach.json").exists());

        m.unmount();
        assert!(!rt().block_on(attach::is_mounted(&mnt)).unwrap());
        rt().block_on(attach::unmount(&mnt))
            .expect("unmount is idempotent");
        let att = a.att.clone();
        a.detach();
        assert_fully_detached(&state, &att);
    }

    // Round 2: new nbdfuse + loop device on the same export: no reformat.
    let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
    let outcome = rt()
        .block_on(attach::ensure_filesystem(a.device(), "ext4"))
        .expect("ensure");
    assert_eq!(outcome, FsOutcome::Existing);
    let m = Mounted::fs(a.device(), &mnt, "ext4", true);
    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).expect("read back"),
        b"zebu was here"
    );
    assert_erofs(&mnt.join("new.txt"));
    assert_erofs(&mnt.join("hello.txt"));
    m.unmount();
    a.detach();
}

#[test]
fn xfs_format_and_reattach_without_reformat() {
    require_tools();
    let dir = tempdir();
    // mkfs.xfs (xfsprogs >= 5.19) refuses filesystems below 300 MiB.
    let nbd = NbdKit::memory(dir.path(), 512 * MIB);
    let state = dir.path().join("state");
    let mnt = dir.path().join("mnt");
    {
        let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
        assert_eq!(
            rt().block_on(attach::ensure_filesystem(a.device(), "xfs"))
                .expect("mkfs.xfs"),
            FsOutcome::Formatted
        );
        let m = Mounted::fs(a.device(), &mnt, "xfs", false);
        write_synced(&mnt.join("data"), &[7u8; 8192]);
        m.unmount();
        a.detach();
    }
    let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
    assert_eq!(
        rt().block_on(attach::ensure_filesystem(a.device(), "xfs"))
            .expect("ensure"),
        FsOutcome::Existing
    );
    let m = Mounted::fs(a.device(), &mnt, "xfs", true);
    assert_eq!(
        std::fs::read(mnt.join("data")).expect("read"),
        vec![7u8; 8192]
    );
    assert_erofs(&mnt.join("other"));
    m.unmount();
    a.detach();
}

#[test]
fn ensure_filesystem_never_reformats_and_names_supported_types() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::memory(dir.path(), 64 * MIB);
    let a = Attachment::new(
        attach::Backend::Nbdfuse,
        &nbd.uri,
        &dir.path().join("state"),
    );
    rt().block_on(attach::ensure_filesystem(a.device(), "ext4"))
        .expect("mkfs.ext4");

    let err = rt()
        .block_on(attach::ensure_filesystem(a.device(), "xfs"))
        .expect_err("reformatted ext4 as xfs");
    assert!(matches!(err, AttachError::WrongFilesystem { .. }), "{err}");
    assert!(err.to_string().contains("refusing to reformat"), "{err}");
    assert_eq!(blkid_type(a.device()), "ext4", "device was modified");

    let err = rt()
        .block_on(attach::ensure_filesystem(a.device(), "btrfs"))
        .expect_err("btrfs accepted");
    assert!(
        matches!(err, AttachError::UnsupportedFilesystem { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ext4, xfs"), "{err}");
    a.detach();
}

#[test]
fn bind_block_shows_device_size_and_unmounts() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::memory(dir.path(), 96 * MIB);
    let a = Attachment::new(
        attach::Backend::Nbdfuse,
        &nbd.uri,
        &dir.path().join("state"),
    );
    let target = dir.path().join("pods/p1/volumeDevices/vol");
    rt().block_on(attach::bind_block(a.device(), &target, false))
        .expect("bind_block");
    let m = Mounted {
        target: target.clone(),
    };
    // Idempotent.
    rt().block_on(attach::bind_block(a.device(), &target, false))
        .expect("bind_block again");

    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(&target)
        .output()
        .expect("blockdev");
    assert!(
        out.status.success(),
        "blockdev: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (96 * MIB).to_string()
    );
    assert_eq!(
        rt().block_on(attach::volume_stats(&target)).expect("stats"),
        VolumeStats::Block {
            total_bytes: 96 * MIB
        }
    );

    // The bound device node keeps the loop device busy.
    let busy = rt().block_on(attach::detach(&dir.path().join("state")));
    assert!(
        matches!(busy, Err(AttachError::Precondition { .. })),
        "{busy:?}"
    );

    m.unmount();
    assert!(!rt().block_on(attach::is_mounted(&target)).unwrap());
    assert!(
        target.is_file(),
        "the target file stays (the CSI caller removes it)"
    );

    // Read-only variant: mounted read-only (advisory for device nodes).
    let ro_target = dir.path().join("ro-dev");
    rt().block_on(attach::bind_block(a.device(), &ro_target, true))
        .expect("bind_block ro");
    let m = Mounted {
        target: ro_target.clone(),
    };
    let e = rt()
        .block_on(attach::mount_entry(&ro_target))
        .unwrap()
        .expect("mounted");
    assert!(e.is_read_only(), "{e:?}");
    m.unmount();
    a.detach();
}

#[test]
fn bind_mount_read_only_publish() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::memory(dir.path(), 64 * MIB);
    let a = Attachment::new(
        attach::Backend::Nbdfuse,
        &nbd.uri,
        &dir.path().join("state"),
    );
    rt().block_on(attach::ensure_filesystem(a.device(), "ext4"))
        .expect("mkfs");
    let staging = dir.path().join("staging dir"); // a space: \040 in mountinfo
    let stage = Mounted::fs(a.device(), &staging, "ext4", false);
    write_synced(&staging.join("f"), b"x");

    let rw = dir.path().join("pub rw");
    rt().block_on(attach::bind_mount(&staging, &rw, false))
        .expect("bind rw");
    let rw_m = Mounted { target: rw.clone() };
    let ro = dir.path().join("pub ro");
    rt().block_on(attach::bind_mount(&staging, &ro, true))
        .expect("bind ro");
    let ro_m = Mounted { target: ro.clone() };
    rt().block_on(attach::bind_mount(&staging, &ro, true))
        .expect("bind ro again");
    assert!(
        rt().block_on(attach::bind_mount(&staging, &ro, false))
            .is_err()
    );

    assert!(rt().block_on(attach::is_mounted(&rw)).unwrap());
    write_synced(&rw.join("g"), b"y");
    assert_eq!(std::fs::read(ro.join("g")).unwrap(), b"y");
    assert_erofs(&ro.join("h"));

    ro_m.unmount();
    rw_m.unmount();
    stage.unmount();
    a.detach();
}

#[test]
fn detach_works_from_the_state_file_alone_and_is_idempotent() {
    require_tools();
    let dir = tempdir();
    let nbd = NbdKit::memory(dir.path(), 64 * MIB);
    let state = dir.path().join("state");

    // "Plugin run 1": attach on its own runtime, then forget everything.
    let att = {
        let rt1 = rt();
        let att = rt1
            .block_on(attach::attach_with(
                attach::Backend::Nbdfuse,
                &nbd.uri,
                &state,
            ))
            .expect("attach");
        drop(rt1);
        att
    };
    // Guard only in case the asserts below fail.
    let _guard = Attachment {
        state_dir: state.clone(),
        att: att.clone(),
    };

    // "Plugin run 2": attach finds the still valid attachment...
    let again = rt()
        .block_on(attach::attach_with(
            attach::Backend::Nbdfuse,
            &nbd.uri,
            &state,
        ))
        .expect("re-attach");
    assert_eq!(again, att);
    // ...and detach needs nothing but the state dir.
    rt().block_on(attach::detach(&state)).expect("detach");
    assert_fully_detached(&state, &att);
    rt().block_on(attach::detach(&state))
        .expect("second detach");
    rt().block_on(attach::detach(&dir.path().join("never-attached")))
        .expect("detach of nothing");

    // A stale record (loop device gone behind our back, e.g. after a node
    // reboot) is cleaned up and replaced by a working attachment.
    let att = rt()
        .block_on(attach::attach_with(
            attach::Backend::Nbdfuse,
            &nbd.uri,
            &state,
        ))
        .expect("attach");
    let st = Command::new("losetup")
        .arg("-d")
        .arg(&att.device)
        .status()
        .expect("losetup -d");
    assert!(st.success());
    // The kernel finishes a detach asynchronously after losetup returns.
    let sys = Path::new("/sys/block")
        .join(att.device.file_name().unwrap())
        .join("loop/backing_file");
    poll("the loop device to be released", || !sys.exists());
    let fresh = rt()
        .block_on(attach::attach_with(
            attach::Backend::Nbdfuse,
            &nbd.uri,
            &state,
        ))
        .expect("attach over stale state");
    assert_eq!(fresh.size_bytes, 64 * MIB);
    assert_ne!(
        fresh.nbdfuse_pid, att.nbdfuse_pid,
        "stale nbdfuse was reused"
    );
    rt().block_on(attach::detach(&state)).expect("detach");
    assert_fully_detached(&state, &fresh);
}

#[test]
fn attach_to_a_missing_server_fails_cleanly() {
    require_tools();
    let dir = tempdir();
    let state = dir.path().join("state");
    let uri = format!(
        "nbd+unix:///vol?socket={}",
        dir.path().join("nobody.sock").display()
    );
    let err = rt()
        .block_on(attach::attach_with(attach::Backend::Nbdfuse, &uri, &state))
        .expect_err("attached to nothing");
    assert!(err.to_string().contains("nbdinfo"), "{err}");
    assert!(!state.join("attach.json").exists());
}

/// Whether this process may resize a mounted ext4 (CAP_SYS_RESOURCE).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(eff.trim(), 16).unwrap() & (1 << 24) != 0
}

/// Growth on a loop device over a growable regular file: the path
/// `expand_filesystem` takes once the device itself has grown
/// (`losetup -c`, then resize2fs / xfs_growfs). nbdkit's memory plugin cannot
/// be resized live, and nbdfuse could not show it anyway (next test).
/// Online ext4 resize needs CAP_SYS_RESOURCE; without it (some sandboxes)
/// the test checks the clear refusal and grows offline instead.
#[test]
fn expand_grows_ext4_and_xfs_on_a_grown_loop_device() {
    require_tools();
    let dir = tempdir();
    for (fstype, small, big) in [("ext4", 64 * MIB, 160 * MIB), ("xfs", 320 * MIB, 640 * MIB)] {
        let img = dir.path().join(format!("{fstype}.img"));
        std::fs::File::create(&img).unwrap().set_len(small).unwrap();
        let lo = PlainLoop::new(&img);
        rt().block_on(attach::ensure_filesystem(&lo.dev, fstype))
            .expect("mkfs");
        let mnt = dir.path().join(format!("mnt-{fstype}"));
        let mut m = Mounted::fs(&lo.dev, &mnt, fstype, false);
        write_synced(&mnt.join("keep"), b"keep me");
        let before = fs_stats(&mnt).total_bytes;

        // Too small for the request: the caller learns it, nothing changes.
        let err = rt()
            .block_on(attach::expand_filesystem(&lo.dev, Some(&mnt), Some(big)))
            .expect_err("expanded beyond the device");
        assert!(matches!(err, AttachError::DeviceTooSmall { .. }), "{err}");

        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(big)
            .unwrap();
        let online = rt().block_on(attach::expand_filesystem(&lo.dev, Some(&mnt), Some(big)));
        let size = match online {
            Ok(size) => size,
            Err(e) if fstype == "ext4" && !has_cap_sys_resource() => {
                assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}");
                eprintln!("no CAP_SYS_RESOURCE: growing ext4 offline instead");
                m.unmount();
                let size = rt()
                    .block_on(attach::expand_filesystem(&lo.dev, None, Some(big)))
                    .unwrap_or_else(|e| panic!("offline expand: {e}"));
                m = Mounted::fs(&lo.dev, &mnt, fstype, false);
                size
            }
            Err(e) => panic!("expand {fstype}: {e}"),
        };
        assert_eq!(size, big);
        let after = fs_stats(&mnt).total_bytes;
        assert!(
            after > before + (big - small) / 2,
            "{fstype}: {before} -> {after}"
        );
        assert_eq!(std::fs::read(mnt.join("keep")).unwrap(), b"keep me");
        if fstype == "xfs" {
            // Offline growth of xfs is refused clearly.
            let e = rt()
                .block_on(attach::expand_filesystem(&lo.dev, None, None))
                .expect_err("offline expand of a mounted device");
            assert!(e.to_string().contains("mounted at"), "{e}");
            // Again online: nothing to do, still fine.
            rt().block_on(attach::expand_filesystem(&lo.dev, Some(&mnt), None))
                .expect("expand no-op");
        }
        m.unmount();
    }
}

/// With nbdfuse a grown export is invisible until re-attach; after the
/// re-attach (the NodeStage path: device not mounted yet) the filesystem is
/// grown offline, then mounted.
#[test]
fn expand_on_nbdfuse_needs_a_reattach() {
    require_tools();
    let dir = tempdir();
    let img = dir.path().join("export.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    // The file plugin sees a grown file on each new connection.
    let nbd = NbdKit::start(dir.path(), &["file", img.to_str().unwrap()]);
    let state = dir.path().join("state");
    let mnt = dir.path().join("mnt");
    {
        let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
        rt().block_on(attach::ensure_filesystem(a.device(), "ext4"))
            .expect("mkfs");
        let m = Mounted::fs(a.device(), &mnt, "ext4", false);
        write_synced(&mnt.join("keep"), b"keep me");

        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(128 * MIB)
            .unwrap();
        assert_eq!(
            rt().block_on(attach::export_size(&nbd.uri)).unwrap(),
            128 * MIB
        );
        let err = rt()
            .block_on(attach::expand_filesystem(
                a.device(),
                Some(&mnt),
                Some(128 * MIB),
            ))
            .expect_err("nbdfuse showed a grown export online?");
        match &err {
            AttachError::DeviceTooSmall { actual, .. } => assert_eq!(*actual, 64 * MIB),
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("staged again"), "{err}");
        m.unmount();
        a.detach();
    }
    let a = Attachment::new(attach::Backend::Nbdfuse, &nbd.uri, &state);
    assert_eq!(a.att.size_bytes, 128 * MIB);
    let size = rt()
        .block_on(attach::expand_filesystem(a.device(), None, Some(128 * MIB)))
        .expect("expand after re-attach");
    assert_eq!(size, 128 * MIB);
    let m = Mounted::fs(a.device(), &mnt, "ext4", false);
    let after = fs_stats(&mnt).total_bytes;
    assert!(after > 100 * MIB, "filesystem not grown: {after}");
    assert_eq!(std::fs::read(mnt.join("keep")).unwrap(), b"keep me");
    m.unmount();
    a.detach();
}
