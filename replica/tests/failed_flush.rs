//! A cache flush of the replica's disk that fails, end to end: a real
//! `zebu-replica` on a disk that fails writes on demand ([`EioDisk`]).
//!
//! Linux reports a failed writeback once and marks the pages clean, so an
//! fdatasync retried after the disk healed returns 0 without the data on
//! disk. So once a FLUSH failed the replica must refuse every request, a
//! retried FLUSH included, and `Open` too, until restarted; a SIGTERM must
//! not record a clean stop, so that the next start recomputes the CRCs
//! from what the disk really holds. After that restart every block flushed
//! before the fault reads back as written, and no block reads back as
//! wrong data without an error.

mod common;
use common::*;

use std::collections::BTreeMap;

use zebu_proto::replica as pb;
use zebu_testkit::{EioDisk, MIB, block_on, pattern, serial, tempdir};

/// Blocks of the replica (8 MiB).
const BLOCKS: u64 = 2048;
const ENGINE: &str = "uring";
/// What the replica says once a cache flush failed.
const RESTART: &str = "restart the replica";

/// Block `b`'s content in write `round`.
fn content(round: u64, b: u64) -> Vec<u8> {
    pattern(round * BLOCKS + b, BS as usize)
}

/// Asserts that `resp` failed with an I/O error that says to restart.
fn assert_refused_until_restart(what: &str, resp: &pb::IoResponse) {
    assert_eq!(
        status(resp),
        pb::IoStatus::IoError,
        "{what} after a failed cache flush: {}",
        resp.message
    );
    assert!(
        resp.message.contains(RESTART),
        "{what} after a failed cache flush does not say to restart: {}",
        resp.message
    );
}

/// The scenario; with `allocate_after_flush`, the writes after the last good
/// flush include a block never written before, whose allocation only an
/// ext4 journal commit makes durable.
fn a_failed_flush_is_final_until_a_restart(allocate_after_flush: bool) {
    let _serial = serial();
    let tmp = tempdir();
    // Declared first, dropped last: after the replica that uses it.
    let mut disk = EioDisk::create(&tmp.path().join("eio"), 64 * MIB);
    let dir = disk.dir.join("r");
    // The log outside the failing disk.
    let log = tmp.path().join("r.log");
    let r = Replica::start_logged(&dir, Some("8M"), ENGINE, &log);

    // Blocks flushed before the fault, with their content.
    let mut flushed = BTreeMap::new();
    // Blocks written after the last good flush: (before, after) content.
    let mut unflushed: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    block_on(async {
        let mut c = r.client().await;
        c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
        let mut io = Io::open(&mut c, 1).await;

        // Written and flushed: blocks, then an overwrite and new blocks.
        write_blocks(
            &mut io,
            &mut flushed,
            &[0, 1, 2, 3, 4, 5, 6, 7, 100, 101],
            |b| content(0, b),
        )
        .await;
        io.flush().await;
        write_blocks(&mut io, &mut flushed, &[2, 200, 201], |b| content(1, b)).await;
        io.flush().await;

        // Written, not flushed: overwrites of allocated blocks (their new
        // data reaches the disk by O_DIRECT, their CRC entries only by the
        // next flush), and with `allocate_after_flush` a new block.
        let mut more = vec![3, 101];
        if allocate_after_flush {
            more.push(300);
        }
        let mut after = BTreeMap::new();
        write_blocks(&mut io, &mut after, &more, |b| content(2, b)).await;
        for (b, new) in after {
            let old = flushed.get(&b).cloned().unwrap_or(vec![0; BS as usize]);
            unflushed.insert(b, (old, new));
        }

        disk.faults().fail_writes(true);
        let resp = io.one(flush_req()).await;
        assert_eq!(
            status(&resp),
            pb::IoStatus::IoError,
            "FLUSH while the disk fails writes: {}",
            resp.message
        );
        let refused = disk.faults().refused_writes();
        assert!(refused > 0, "the disk refused nothing: {}", resp.message);
        eprintln!(
            "failed FLUSH: {:?}; the disk refused {refused} writes or flushes",
            resp.message
        );

        disk.faults().heal();
        // The retried fdatasync would succeed without the data on disk.
        let resp = io.one(flush_req()).await;
        assert_refused_until_restart("a FLUSH retried on the healed disk", &resp);
        let resp = io.one(read_req(0, BS)).await;
        assert_refused_until_restart("a read", &resp);
        let resp = io.one(write_req(5 * BS, content(3, 5))).await;
        assert_refused_until_restart("a write", &resp);
        let err = c.open(pb::OpenRequest { epoch: 2 }).await.unwrap_err();
        assert!(
            err.message().contains(RESTART),
            "Open with epoch 2: {err:?}"
        );
        eprintln!("Open with epoch 2: {:?} {}", err.code(), err.message());
    });

    let exit = r.terminate();
    assert!(
        !exit.success(),
        "SIGTERM after a failed cache flush must not end like a clean stop; it exited {exit}"
    );
    eprintln!("the replica exited {exit} on SIGTERM");

    // Nothing of the files is cached any more: the next start sees the disk.
    let fsck = disk.remount();
    eprintln!("remounted the healed disk; e2fsck said:\n{}", fsck.trim());
    // What each variant is about: the failed flush aborted ext4's journal
    // (left for e2fsck to recover) iff it had an allocation to commit.
    assert_eq!(
        fsck.contains("recovering journal"),
        allocate_after_flush,
        "whether the failed flush aborted ext4's journal; e2fsck said:\n{fsck}"
    );
    let r = Replica::start_logged(&dir, None, ENGINE, &log);
    assert!(
        !r.clean,
        "the ready line after a failed cache flush and SIGTERM claims a clean stop"
    );
    let tail = r.server.log_tail();
    assert!(
        tail.contains("recomputed CRCs after an unclean stop"),
        "the restarted replica did not recompute its CRCs:\n{tail}"
    );

    block_on(async {
        let mut c = r.client().await;
        let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert!(!info.clean, "Info claims a clean stop");
        c.open(pb::OpenRequest { epoch: 2 }).await.unwrap();
        let mut io = Io::open(&mut c, 2).await;
        // Every block: flushed ones as written; unflushed ones as before,
        // as after, or refused as corrupt; the others as zeros.
        let zeros = vec![0; BS as usize];
        for first in (0..BLOCKS).step_by(64) {
            let reqs = (first..first + 64).map(|b| read_req(b * BS, BS)).collect();
            for (b, resp) in (first..).zip(io.batch(reqs).await) {
                let ok = status(&resp) == pb::IoStatus::IoOk;
                if let Some((old, new)) = unflushed.get(&b) {
                    let seen = if ok && resp.payload == new {
                        "its new data"
                    } else if ok && resp.payload == old {
                        "its old data"
                    } else if !ok && resp.message.contains("corrupt") {
                        "a checksum error"
                    } else {
                        panic!(
                            "block {b}, written after the last good flush, read back {:?} \
                             {:?} ({} bytes): neither its old nor its new data",
                            status(&resp),
                            resp.message,
                            resp.payload.len()
                        )
                    };
                    eprintln!("block {b}, written after the last good flush, read back {seen}");
                    continue;
                }
                assert!(ok, "block {b}: {:?} {}", status(&resp), resp.message);
                let want = flushed.get(&b).unwrap_or(&zeros);
                assert!(
                    resp.payload == want,
                    "block {b} read back wrong data without an error (flushed before the fault: {})",
                    flushed.contains_key(&b)
                );
            }
        }
        // The replica serves again.
        let mut again = BTreeMap::new();
        write_blocks(&mut io, &mut again, &[5, 400], |b| content(4, b)).await;
        io.flush().await;
    });
    assert!(r.terminate().success(), "a clean stop after the restart");
}

/// Overwrites after the last good flush: the failed flush fails the
/// writeback of their CRC entries and the disk's cache flush, and commits
/// no journal, so ext4 stays writable and a retried fdatasync would
/// succeed. The replica refuses everything until restarted.
#[test]
fn after_a_failed_flush_the_replica_refuses_everything_until_restarted() {
    a_failed_flush_is_final_until_a_restart(false);
}

/// As above with a new block after the last good flush: the failed flush
/// also fails ext4's journal commit, which aborts the journal (ext4 goes
/// read-only); e2fsck recovers it before the restart, and the new block's
/// allocation may be lost.
#[test]
fn after_a_failed_flush_and_journal_commit_the_replica_refuses_everything_until_restarted() {
    a_failed_flush_is_final_until_a_restart(true);
}
