//! End to end: the engine serving its volume as a file (`--file`, a FUSE
//! mount of its own) under a loop device with direct I/O, as the driver
//! attaches volumes: verified I/O, growth while attached, a filesystem, a
//! clean stop, and a restart after the engine was killed.
//!
//! Guards are locals declared replicas → engine → loop device → mount, so
//! they drop in the reverse order on success and on panic alike.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn require_file_tools() {
    require_tool("fio", "fio");
    require_tool("losetup", "util-linux");
    require_tool("blockdev", "util-linux");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("e2fsck", "e2fsprogs");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

/// How many mounts sit on `dir`.
fn mounts_on(dir: &Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(dir.as_str()))
        .count()
}

/// `n` replicas of `size` and an engine serving `volume` as `file/disk`
/// under `tmp` too; the engine is last so it drops first.
fn start_with_file(
    tmp: &Path,
    volume: &str,
    size: &str,
    n: usize,
) -> (Vec<Replica>, Engine, PathBuf) {
    let replicas = start_replicas(tmp, n, size);
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let dir = tmp.join("file");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("disk");
    let engine = Engine::start_with(
        tmp,
        volume,
        size,
        &addrs,
        &["--file", &file.display().to_string()],
    );
    (replicas, engine, file)
}

fn device_size(dev: &str) -> u64 {
    let r = run(Command::new("blockdev").args(["--getsize64", dev]), SHORT).expect_ok();
    r.stdout.trim().parse().expect("a size")
}

#[test]
fn a_volume_served_as_a_file_verifies_grows_and_carries_ext4() {
    let _serial = serial();
    require_file_tools();
    let tmp = tempdir();
    let (replicas, mut engine, file) = start_with_file(tmp.path(), "filevol", "256M", 3);
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let dir = file.parent().unwrap().to_owned();

    let meta = std::fs::metadata(&file).expect("the engine serves its file");
    assert_eq!(meta.len(), 256 * MIB);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(mounts_on(&dir), 1);

    {
        let lo = LoopDev::attach_direct(&file);
        // Concurrent verified writes through the loop device's direct I/O.
        run(
            Command::new("fio").args([
                "--name=filevol",
                &format!("--filename={}", lo.dev),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--ioengine=libaio",
                "--direct=1",
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
            ]),
            LONG,
        )
        .expect_ok();

        // An open file is a client: a revert under it is refused.
        engine.ctl_ok(&["snapshot", "create", "before"]);
        let r = engine.ctl(&["revert", "before"]).expect_fail();
        assert!(r.stderr.contains("detach"), "{}", r.stderr);

        // Growing shows at once in the file (the kernel's cached size, fresh
        // from this stat, is dropped), then in the loop device.
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 * MIB);
        engine.ctl_ok(&["expand", "512M"]);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 512 * MIB);
        run(Command::new("losetup").args(["-c", &lo.dev]), SHORT).expect_ok();
        assert_eq!(device_size(&lo.dev), 512 * MIB);

        // A filesystem over the whole grown device, files fsync'ed into it.
        run(Command::new("mkfs.ext4").args(["-q", &lo.dev]), LONG).expect_ok();
        let files: Vec<(String, Vec<u8>)> = [1usize, 4096, 100_000, 3 * MIB as usize + 17]
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("f{i}"), pattern(rand_u64(), n)))
            .collect();
        {
            let m = Mount::at(&lo.dev, &tmp.path().join("mnt"));
            for (name, data) in &files {
                let mut f = std::fs::File::create(m.dir.join(name)).unwrap();
                std::io::Write::write_all(&mut f, data).unwrap();
                f.sync_all().unwrap();
            }
        }
        run(Command::new("e2fsck").args(["-fn", &lo.dev]), LONG).expect_ok();
        let m = Mount::at(&lo.dev, &tmp.path().join("mnt"));
        for (name, data) in &files {
            assert!(
                std::fs::read(m.dir.join(name)).unwrap() == *data,
                "{name} differs"
            );
        }
    }

    // Detached: the engine stops cleanly and its mount goes with it.
    engine.stop();
    assert_eq!(mounts_on(&dir), 0);
    let data = assert_replicas_identical(&addrs);
    assert_eq!(data.len() as u64, 512 * MIB);
}

#[test]
fn the_next_engine_replaces_a_killed_engines_dead_mount() {
    let _serial = serial();
    require_file_tools();
    let tmp = tempdir();
    let (replicas, mut first, file) = start_with_file(tmp.path(), "deadvol", "64M", 2);
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let dir = file.parent().unwrap().to_owned();
    let file_arg = file.display().to_string();
    let written = pattern(rand_u64(), 64 * 1024);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&written, 8 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    first.kill9();
    // The mount stays behind, dead (statfs always asks the server; a stat
    // could be answered from attributes cached a moment ago).
    let e = nix::sys::statfs::statfs(&dir).expect_err("a dead mount answers nothing");
    assert_eq!(e, nix::errno::Errno::ENOTCONN, "{e}");

    let mut second =
        Engine::start_with(tmp.path(), "deadvol", "64M", &addrs, &["--file", &file_arg]);
    assert_eq!(mounts_on(&dir), 1, "the dead mount is still there");
    let mut back = vec![0u8; written.len()];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&file).unwrap();
        f.read_exact_at(&mut back, 8 * MIB).unwrap();
    }
    assert!(
        back == written,
        "a flushed write did not survive the engine's kill"
    );
    second.stop();
    assert_eq!(mounts_on(&dir), 0);
}
