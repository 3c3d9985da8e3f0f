//! A FLUSH makes acknowledged writes and their CRCs durable, proved by a
//! power cut: a real `zebu-replica` on a disk ([`EioDisk`]) that, when the
//! power goes, loses every write since its last cache flush (the worst a
//! disk with a volatile cache may do), and every process is SIGKILLed.
//!
//! A FLUSH costs one cache flush of the disk: the CRC file's pages are
//! written back without one, then the data file's `fdatasync` flushes the
//! cache (see `replica/src/crcmap.rs`). If that left anything of a flushed
//! write or its CRC entry in the disk's cache, the power cut undoes it and
//! this test sees it: in the files on disk before the replica restarts
//! (which would recompute its CRCs after an unclean stop and hide a lost
//! entry), and in what the restarted replica serves.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use zebu_proto::replica as pb;
use zebu_testkit::{EioDisk, MIB, block_on, pattern, serial, tempdir};

/// Blocks of the replica (32 MiB: a CRC file of 8 pages, most never
/// written by the test).
const BLOCKS: u64 = 8192;
const ENGINE: &str = "uring";

/// Block `b`'s content in write `round`.
fn content(round: u64, b: u64) -> Vec<u8> {
    pattern(round * BLOCKS + b + 7, BS as usize)
}

/// Every block of `path` is allocated and written (no hole, no unwritten
/// extent), as `filefrag -v` reports it: writing a page of it back then
/// changes no filesystem metadata.
fn assert_written_in_full(path: &std::path::Path) {
    let out = zebu_testkit::command::run(
        std::process::Command::new("filefrag").arg("-v").arg(path),
        zebu_testkit::LONG,
    )
    .expect_ok();
    let blocks = std::fs::metadata(path).expect("stat").len().div_ceil(4096);
    // Extent lines: "  0:   0..  15:   43615233..  43615248:   16:   last,eof"
    let covered: u64 = out
        .stdout
        .lines()
        .filter(|l| l.contains(".."))
        .filter_map(|l| l.split(':').nth(3)?.trim().parse::<u64>().ok())
        .sum();
    assert!(
        !out.stdout.contains("unwritten") && covered == blocks,
        "{} is not written in full ({covered} of {blocks} blocks in extents):\n{}",
        path.display(),
        out.stdout
    );
}

#[test]
fn flushed_writes_and_their_crcs_survive_a_power_cut() {
    let _serial = serial();
    let tmp = tempdir();
    // Declared first, dropped last: after the replica that uses it.
    let mut disk = EioDisk::create(&tmp.path().join("disk"), 64 * MIB);
    let dir = disk.dir.join("r");
    let log = tmp.path().join("r.log");
    let r = Replica::start_logged(&dir, Some("32M"), ENGINE, &log);

    // What every flushed block holds; then writes no FLUSH covered.
    let mut flushed = BTreeMap::new();
    let mut unflushed = BTreeMap::new();
    block_on(async {
        let mut c = r.client().await;
        c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
        let mut io = Io::open(&mut c, 1).await;
        // New blocks (allocations), flushed; an overwrite and new blocks,
        // flushed.
        write_blocks(
            &mut io,
            &mut flushed,
            &[0, 1, 2, 3, 4, 5, 6, 7, 100, 101],
            |b| content(0, b),
        )
        .await;
        io.flush().await;
        write_blocks(&mut io, &mut flushed, &[2, 200, 201, 1500], |b| {
            content(1, b)
        })
        .await;
        io.flush().await;
        // Commits: a write or two, a FLUSH. Short intervals, so each write
        // starts its CRC page's write-back ahead of the FLUSH
        // (`replica/src/writeback.rs`), and so do the unflushed writes below.
        for (round, blocks) in [&[400u64][..], &[401, 5], &[2]].into_iter().enumerate() {
            write_blocks(&mut io, &mut flushed, blocks, |b| {
                content(3 + round as u64, b)
            })
            .await;
            io.flush().await;
        }
        // Not flushed: overwrites and a new block.
        write_blocks(&mut io, &mut unflushed, &[3, 101, 300], |b| content(2, b)).await;
    });

    // What makes one cache flush enough for the CRC file too.
    assert_written_in_full(&dir.join("layers/0.crc"));

    // The power goes; the processes die with it.
    disk.faults().cut_power();
    r.kill9();
    let (fsck, undone) = disk.power_cycle();
    eprintln!(
        "power cut: {undone} bytes written since the disk's last cache flush were lost; e2fsck said:\n{}",
        fsck.trim()
    );
    assert!(
        undone >= BS,
        "the writes after the last FLUSH never reached the disk: the test proves nothing"
    );

    // On disk, before the replica can recompute anything: every flushed
    // block and its CRC entry (the head is layer 0: no snapshot was taken).
    let data = std::fs::File::open(dir.join("layers/0.img")).expect("the data file");
    let crcs = std::fs::File::open(dir.join("layers/0.crc")).expect("the CRC file");
    for (b, want) in &flushed {
        let mut got = vec![0u8; BS as usize];
        data.read_exact_at(&mut got, b * BS)
            .expect("read the data file");
        assert!(
            &got == want,
            "block {b}, flushed, lost its data in the power cut"
        );
        let mut entry = [0u8; 4];
        crcs.read_exact_at(&mut entry, b * 4)
            .expect("read the CRC file");
        assert_eq!(
            u32::from_le_bytes(entry),
            crc32fast::hash(want),
            "block {b}, flushed, lost its CRC entry in the power cut"
        );
    }
    drop((data, crcs));

    // Restarted, the replica serves every flushed block as written, and the
    // others as the power cut left them (before the unflushed writes: the
    // disk lost them all).
    let r = Replica::start_logged(&dir, None, ENGINE, &log);
    assert!(
        !r.clean,
        "the ready line after a power cut claims a clean stop"
    );
    block_on(async {
        let mut c = r.client().await;
        c.open(pb::OpenRequest { epoch: 2 }).await.unwrap();
        let mut io = Io::open(&mut c, 2).await;
        let zeros = vec![0u8; BS as usize];
        for first in (0..BLOCKS).step_by(64) {
            let reqs = (first..first + 64).map(|b| read_req(b * BS, BS)).collect();
            for (b, resp) in (first..).zip(io.batch(reqs).await) {
                assert_eq!(
                    status(&resp),
                    pb::IoStatus::IoOk,
                    "block {b}: {}",
                    resp.message
                );
                let want = flushed.get(&b).unwrap_or(&zeros);
                assert!(
                    resp.payload == want,
                    "block {b} read back wrong data (flushed: {}, written after the last flush: {})",
                    flushed.contains_key(&b),
                    unflushed.contains_key(&b)
                );
            }
        }
    });
    assert!(r.terminate().success(), "a clean stop after the restart");
}

/// A FLUSH writes back the CRC pages stored into since the last one, 4 KiB
/// each, not the large folios the kernel may cache a file in: a write of
/// one block dirties one page of the CRC file (1 MiB here), and its FLUSH
/// leaves none dirty or under write-back. Counted by the kernel
/// (`cachestat`), not timed.
///
/// (Not `write_bytes` of `/proc/PID/io`: it counts a direct write each time
/// io_uring issues it, and a write the block layer refused without waiting,
/// as it does when a busy disk has no free request, is issued again: up to
/// 16 KiB were counted for one 4 KiB write and one CRC page.)
#[test]
fn a_flush_writes_back_only_the_crc_pages_written_since_the_last() {
    let _serial = serial();
    let tmp = tempdir();
    let dir = tmp.path().join("r");
    let r = Replica::start(&dir, Some("1G"), ENGINE);
    block_on(async {
        let mut c = r.client().await;
        c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
        let mut io = Io::open(&mut c, 1).await;
        let mut image = BTreeMap::new();
        let crcs = std::fs::File::open(dir.join("layers/0.crc")).expect("the CRC file");
        let pages = |s: &CacheStat| s.dirty + s.writeback;
        let fresh = cachestat(&crcs);
        assert_eq!(pages(&fresh), 0, "a new replica's CRC file: {fresh:?}");
        // Far apart: each in a CRC page of its own, and neither page was
        // touched before.
        for (i, block) in [10u64, 150_000].into_iter().enumerate() {
            write_blocks(&mut io, &mut image, &[block], |b| content(i as u64, b)).await;
            let written = cachestat(&crcs);
            // The first write precedes any FLUSH, so nothing writes its CRC
            // page back ahead of one (`replica/src/writeback.rs`): it is
            // dirty. The second one's may be under write-back or written.
            assert!(
                if i == 0 {
                    written.dirty == 1
                } else {
                    pages(&written) <= 1
                },
                "after writing block {block}, the CRC file's pages: {written:?}; \
                 expected one page dirty (or being written), the one holding its CRC"
            );
            io.flush().await;
            let flushed = cachestat(&crcs);
            assert_eq!(
                pages(&flushed),
                0,
                "after the FLUSH of block {block}, the CRC file's pages: {flushed:?}"
            );
        }
    });
}

/// What the page cache holds of a file: `cachestat(2)` (Linux 6.5) over the
/// whole file.
#[derive(Debug, Default)]
#[repr(C)]
struct CacheStat {
    cache: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

fn cachestat(file: &std::fs::File) -> CacheStat {
    use std::os::fd::AsRawFd;
    // struct cachestat_range: offset and length; length 0 is to the end.
    let range = [0u64, 0u64];
    let mut stat = CacheStat::default();
    const SYS_CACHESTAT: libc::c_long = 451; // the same on every architecture
    // SAFETY: the fd is open for the call; `range` and `stat` are live,
    // properly aligned values of the layouts the kernel reads and fills.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            range.as_ptr(),
            &mut stat as *mut CacheStat,
            0,
        )
    };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    stat
}

/// Under commits (a few writes, then a FLUSH), a write starts its CRC
/// page's write-back as soon as it completes, so the FLUSH that follows
/// finds the page written (`replica/src/writeback.rs`): with no FLUSH
/// sent, the CRC file's page goes clean. Without the head start it stays
/// dirty until the kernel's own write-back takes it (after
/// `vm.dirty_expire_centisecs`, 30 s by default): the test waits half that.
#[test]
fn commit_like_writes_start_their_crc_write_back() {
    let _serial = serial();
    let tmp = tempdir();
    let dir = tmp.path().join("r");
    let r = Replica::start(&dir, Some("64M"), ENGINE);
    block_on(async {
        let mut c = r.client().await;
        c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
        let mut io = Io::open(&mut c, 1).await;
        let mut image = BTreeMap::new();
        // Two commits: the second FLUSH closes an interval of one write.
        for round in 0..2 {
            write_blocks(&mut io, &mut image, &[round], |b| content(round, b)).await;
            io.flush().await;
        }
        let crcs = std::fs::File::open(dir.join("layers/0.crc")).expect("the CRC file");
        assert_eq!(cachestat(&crcs).dirty, 0, "dirty CRC pages after a FLUSH");
        write_blocks(&mut io, &mut image, &[5000], |b| content(2, b)).await;
        let expire: u64 = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
            .expect("vm.dirty_expire_centisecs")
            .trim()
            .parse()
            .expect("a number of centiseconds");
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(expire * 5);
        loop {
            let s = cachestat(&crcs);
            if s.dirty == 0 && s.writeback == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a commit's CRC page is still not written back: {s:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The FLUSH still covers it.
        io.flush().await;
    });
}
