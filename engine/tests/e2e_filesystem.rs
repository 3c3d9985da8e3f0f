//! End to end: an ext4 filesystem on the engine's export, through
//! nbdfuse (export as a file) and a loop device.
//!
//! Cleanup order on success and on panic alike: the guards are locals
//! declared replicas → engine → nbdfuse → loop device → mount, so they drop
//! mount → loop device → nbdfuse → engine → replicas (each guard unmounts /
//! detaches with a timeout, lazily as a last resort).

mod common;

use common::*;
use std::io::Write;
use std::process::Command;

#[test]
fn ext4_on_nbdfuse_loop_survives_remount() {
    let _serial = serial();
    require_tool("nbdfuse", "libnbd-bin");
    require_tool("fusermount3", "fuse3");
    require_tool("losetup", "util-linux");
    require_tool("mount", "mount");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("e2fsck", "e2fsprogs");
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (modprobe fuse)"
    );
    let tmp = tempdir();
    let replicas = start_replicas(tmp.path(), 3, "256M");
    let addrs: Vec<&str> = replicas.iter().map(|r| r.addr.as_str()).collect();
    let mut engine = Engine::start(tmp.path(), "fsvol", "256M", &addrs);

    let files: Vec<(String, Vec<u8>)> = [
        1usize,
        4096,
        100_000,
        MIB as usize,
        3 * MIB as usize + 17,
        8 * MIB as usize,
    ]
    .iter()
    .enumerate()
    .map(|(i, &n)| (format!("file{i}.bin"), pattern(rand_u64(), n)))
    .collect();
    let mnt_dir = tmp.path().join("mnt");

    // Round 1: nbdfuse + loop device, mkfs, write files, unmount, detach.
    {
        let fuse = FuseExport::start(&tmp.path().join("fuse"), &engine.socket);
        let len = std::fs::metadata(&fuse.file).unwrap().len();
        assert_eq!(len, 256 * MIB, "nbdfuse file size");
        let lo = LoopDev::attach(&fuse.file);
        run(Command::new("mkfs.ext4").args(["-q", &lo.dev]), LONG).expect_ok();
        let m = Mount::at(&lo.dev, &mnt_dir);
        std::fs::create_dir(m.dir.join("sub")).unwrap();
        for (name, data) in &files {
            let mut f = std::fs::File::create(m.dir.join("sub").join(name)).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        }
        std::fs::File::open(m.dir.join("sub"))
            .unwrap()
            .sync_all()
            .unwrap();
        m.umount();
        // lo, then fuse, are dropped here (detached, unmounted).
    }
    // Round 2: a fresh nbdfuse connection and loop device (no page cache
    // shared with round 1): fsck, mount, files intact.
    {
        let fuse = FuseExport::start(&tmp.path().join("fuse2"), &engine.socket);
        let lo = LoopDev::attach(&fuse.file);
        run(Command::new("e2fsck").args(["-fn", &lo.dev]), LONG).expect_ok();
        let m = Mount::at(&lo.dev, &mnt_dir);
        for (name, data) in &files {
            let got = std::fs::read(m.dir.join("sub").join(name)).unwrap();
            assert_eq!(got.len(), data.len(), "{name}: length after remount");
            assert_eq!(
                crc32fast::hash(&got),
                crc32fast::hash(data),
                "{name}: checksum after remount"
            );
            assert_same(name, &got, data);
        }
        m.umount();
    }
    let st = engine.status();
    assert_eq!(st["state"], "healthy", "{st}");
    engine.stop();
    assert_replicas_identical(&addrs);
}
