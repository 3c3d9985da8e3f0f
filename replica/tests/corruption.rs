//! Data corrupted on the replica's disk behind its back (bit rot, a stray
//! write): reads check every block against its layer's stored CRC, so the
//! corruption is reported instead of served, and a merge refuses to carry
//! it into another layer. Overlapping reads and writes, whose data and CRC
//! entries are momentarily out of step, are never taken for corruption.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use zebu_replica::io::EngineKind;
use zebu_replica::store::{OpenOptions, Store, StoreError};

const BS: u64 = 4096;
const EPOCH: u64 = 1;

use zebu_testkit::runtime;

/// Opens (with `blocks`: creates) the store in `dir`.
async fn open(dir: &Path, blocks: Option<u64>) -> Arc<Store> {
    let store = Store::open(OpenOptions {
        dir: dir.to_owned(),
        size: blocks.map(|b| b * BS),
        block_size: BS as u32,
        io_engine: EngineKind::Uring,
    })
    .expect("open store");
    store.open_epoch(EPOCH).await.expect("open epoch");
    Arc::new(store)
}

/// A block of `fill` bytes with a distinct first byte per block.
fn block(fill: u8, b: u64) -> Bytes {
    let mut v = vec![fill; BS as usize];
    v[0] = b as u8;
    Bytes::from(v)
}

async fn write(store: &Store, b: u64, data: Bytes) {
    let crc = crc32fast::hash(&data);
    store
        .write(b * BS, data, crc, EPOCH, 1)
        .await
        .expect("write");
}

/// The layer data file that holds `expect` at block `b`.
fn data_file_holding(dir: &Path, b: u64, expect: &[u8]) -> PathBuf {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir.join("layers")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "img") {
            let mut got = vec![0u8; BS as usize];
            let f = std::fs::File::open(&p).unwrap();
            if f.read_exact_at(&mut got, b * BS).is_ok() && got == expect {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "layer files holding block {b}: {found:?}");
    found.remove(0)
}

/// Overwrites 16 bytes in the middle of block `b` of `file`, as a disk that
/// rots would, bypassing the replica.
fn rot(file: &Path, b: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(&[0xA5; 16], b * BS + 1000).unwrap();
    f.sync_all().unwrap();
}

fn expect_corrupt(r: Result<Bytes, StoreError>, block: u64, layer: &str) -> u32 {
    match r {
        Err(StoreError::Corrupt {
            block: got,
            layer: l,
            actual,
            ..
        }) => {
            assert_eq!(got, block, "corrupt block reported");
            assert_eq!(l, layer, "layer reported");
            actual
        }
        other => panic!("expected a corrupt block {block}, got {other:?}"),
    }
}

/// The stored CRC entry of block `b` in layer `name` ("" = head).
async fn stored_crc(store: &Arc<Store>, name: &str, b: u64) -> u32 {
    let mut rx = store.block_crcs(name).await.unwrap();
    while let Some(chunk) = rx.recv().await {
        let (blocks, crcs) = chunk.unwrap();
        if let Some(i) = blocks.iter().position(|&x| x == b) {
            return crcs[i];
        }
    }
    panic!("block {b} is not present in layer {name:?}");
}

#[test]
fn a_rotten_block_fails_its_reads_until_rewritten() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(64)).await;
        for b in 0..8 {
            write(&store, b, block(7, b)).await;
        }
        store.flush(EPOCH).await.unwrap();
        let good = crc32fast::hash(&block(7, 3));
        rot(&data_file_holding(dir.path(), 3, &block(7, 3)), 3);

        // The block alone, and inside a larger read: both refuse.
        let actual = expect_corrupt(store.read(3 * BS, BS, EPOCH).await, 3, "");
        assert_ne!(actual, good);
        expect_corrupt(store.read(0, 8 * BS, EPOCH).await, 3, "");
        let msg = store.read(3 * BS, BS, EPOCH).await.unwrap_err().to_string();
        assert!(
            msg.contains("block 3 of the head layer") && msg.contains("corrupt"),
            "{msg}"
        );
        // Its neighbours are fine.
        assert_eq!(store.read(2 * BS, BS, EPOCH).await.unwrap(), block(7, 2));
        assert_eq!(
            store.read(4 * BS, 4 * BS, EPOCH).await.unwrap().len(),
            4 * BS as usize
        );
        // The entry now differs from the good CRC (a resync copies the block)
        // and from the rotten data's (reads keep failing).
        let entry = stored_crc(&store, "", 3).await;
        assert_eq!(entry, !actual);
        assert_ne!(entry, good);
        expect_corrupt(store.read(3 * BS, BS, EPOCH).await, 3, "");
        // Still marked after a clean restart.
        store.flush(EPOCH).await.unwrap();
        store.shutdown().await.unwrap();
        drop(store);
        let store = open(dir.path(), None).await;
        expect_corrupt(store.read(3 * BS, BS, EPOCH).await, 3, "");
        // A write of the block heals it.
        write(&store, 3, block(9, 3)).await;
        assert_eq!(
            store
                .read(0, 8 * BS, EPOCH)
                .await
                .unwrap()
                .slice(3 * BS as usize..4 * BS as usize),
            block(9, 3)
        );
        assert_eq!(
            stored_crc(&store, "", 3).await,
            crc32fast::hash(&block(9, 3))
        );
    });
}

#[test]
fn corruption_in_a_snapshot_fails_reads_through_it_and_its_merge() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(64)).await;
        for b in 0..8 {
            write(&store, b, block(1, b)).await;
        }
        store
            .snapshot("before", true, EPOCH, store.session())
            .await
            .unwrap();
        // The head holds blocks 0-1 only; 2-7 are read from the snapshot.
        for b in 0..2 {
            write(&store, b, block(2, b)).await;
        }
        store.flush(EPOCH).await.unwrap();
        rot(&data_file_holding(dir.path(), 5, &block(1, 5)), 5);

        expect_corrupt(store.read(0, 8 * BS, EPOCH).await, 5, "before");
        let head_part = store.read(0, 2 * BS, EPOCH).await.unwrap();
        assert_eq!(head_part.slice(..BS as usize), block(2, 0));
        // Merging the snapshot into the head would give the rotten block a
        // valid CRC there: refused, and the snapshot stays.
        match store
            .delete_snapshot("before", EPOCH, store.session())
            .await
        {
            Err(StoreError::Corrupt {
                block: 5, layer, ..
            }) => assert_eq!(layer, "before"),
            other => panic!("the merge of a corrupt snapshot should fail: {other:?}"),
        }
        let kept = store.snapshots().await;
        assert!(kept.len() == 1 && kept[0].name == "before", "{kept:?}");
        expect_corrupt(store.read(5 * BS, BS, EPOCH).await, 5, "before");
        assert_eq!(store.read(6 * BS, BS, EPOCH).await.unwrap(), block(1, 6));
    });
}

/// Reads and overwrites of the same blocks at once: a read may meet a block
/// whose data and CRC entry are momentarily out of step; it must neither
/// fail nor invalidate anything, and returns one of the written versions.
#[test]
fn overlapping_reads_and_writes_are_not_taken_for_corruption() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(64)).await;
        const BLOCKS: u64 = 4;
        for b in 0..BLOCKS {
            write(&store, b, block(0, b)).await;
        }
        let versions: Vec<Bytes> = (0..BLOCKS)
            .flat_map(|b| (0..=3u8).map(move |v| block(v, b)))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..4u8 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..400u64 {
                    let b = (i + w as u64) % BLOCKS;
                    write(&store, b, block(w, b)).await;
                }
            });
        }
        for r in 0..4u64 {
            let (store, versions) = (store.clone(), versions.clone());
            tasks.spawn(async move {
                for i in 0..400u64 {
                    let b = (i + r) % BLOCKS;
                    let got = store
                        .read(b * BS, BS, EPOCH)
                        .await
                        .unwrap_or_else(|e| panic!("read of block {b} during writes: {e}"));
                    assert!(
                        versions.contains(&got),
                        "block {b} read as none of its versions"
                    );
                }
            });
        }
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
        for b in 0..BLOCKS {
            let data = store.read(b * BS, BS, EPOCH).await.unwrap();
            assert_eq!(
                stored_crc(&store, "", b).await,
                crc32fast::hash(&data),
                "block {b}"
            );
        }
    });
}

#[test]
fn a_scrub_finds_every_rotten_block_of_every_layer() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(64)).await;
        for b in 0..16 {
            write(&store, b, block(1, b)).await;
        }
        store
            .snapshot("s1", true, EPOCH, store.session())
            .await
            .unwrap();
        for b in 0..4 {
            write(&store, b, block(2, b)).await;
        }
        store.flush(EPOCH).await.unwrap();
        let clean = store.scrub(EPOCH, 0).await.unwrap();
        assert_eq!((clean.blocks_checked, clean.corrupt_blocks), (20, 0));

        let snap_file = data_file_holding(dir.path(), 10, &block(1, 10));
        rot(&snap_file, 10);
        rot(&snap_file, 12);
        rot(&data_file_holding(dir.path(), 2, &block(2, 2)), 2);
        for round in 0..2 {
            // Found again the second time: their entries stay invalid.
            let r = store.scrub(EPOCH, 0).await.unwrap();
            assert_eq!(r.blocks_checked, 20, "round {round}");
            assert_eq!(r.corrupt_blocks, 3, "round {round}: {r:?}");
            let mut found = r.corrupt.clone();
            found.sort();
            assert_eq!(
                found,
                [
                    ("".to_owned(), 2),
                    ("s1".to_owned(), 10),
                    ("s1".to_owned(), 12)
                ],
                "round {round}"
            );
        }
        // Reads agree with the scrub.
        expect_corrupt(store.read(10 * BS, BS, EPOCH).await, 10, "s1");
        assert_eq!(store.read(11 * BS, BS, EPOCH).await.unwrap(), block(1, 11));
    });
}

/// A scrub while blocks are overwritten and unmapped, and snapshots are
/// taken and deleted, reports nothing: neither a block whose data and CRC
/// entry are momentarily out of step nor one unmapped after it was listed
/// is corrupt.
#[test]
fn a_scrub_during_writes_unmaps_and_merges_finds_nothing() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(2048)).await;
        for b in (0..2048).step_by(256) {
            let data = Bytes::from(vec![3u8; 256 * BS as usize]);
            let crc = crc32fast::hash(&data);
            store.write(b * BS, data, crc, EPOCH, 1).await.unwrap();
        }
        let busy = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300u64 {
                    let b = (i * 37) % 2048;
                    if i % 5 == 0 {
                        store.unmap(b * BS, 4 * BS, EPOCH).await.unwrap();
                    } else {
                        write(&store, b, block(i as u8, b)).await;
                    }
                    if i % 100 == 50 {
                        store
                            .snapshot("mid", true, EPOCH, store.session())
                            .await
                            .unwrap();
                        store
                            .delete_snapshot("mid", EPOCH, store.session())
                            .await
                            .unwrap();
                    }
                }
            })
        };
        let mut scrubs = 0;
        while !busy.is_finished() || scrubs < 2 {
            let r = store.scrub(EPOCH, 0).await.unwrap();
            assert_eq!(r.corrupt_blocks, 0, "scrub {scrubs}: {r:?}");
            scrubs += 1;
        }
        busy.await.unwrap();
    });
}

/// A scrub with a rate limit pauses between its reads to keep to it; one
/// that completes and finds nothing corrupt records when it finished,
/// durably.
#[test]
fn a_paced_scrub_keeps_to_its_rate_and_records_when_it_finished() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(1024)).await;
        for b in 0..512 {
            write(&store, b, block(3, b)).await;
        }
        store.flush(EPOCH).await.unwrap();
        assert_eq!(
            store.status().await.last_clean_scrub_unix,
            0,
            "never scrubbed"
        );
        // A scrub that finds rot is not a clean one: nothing recorded.
        rot(&data_file_holding(dir.path(), 5, &block(3, 5)), 5);
        let r = store.scrub(EPOCH, 0).await.unwrap();
        assert_eq!(r.corrupt_blocks, 1, "{r:?}");
        assert_eq!(store.status().await.last_clean_scrub_unix, 0, "still due");
        write(&store, 5, block(3, 5)).await;
        store.flush(EPOCH).await.unwrap();

        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        // 2 MiB at 4 MiB/s: at least half a second, however fast the disk.
        let started = std::time::Instant::now();
        let r = store.scrub(EPOCH, 4 << 20).await.unwrap();
        let took = started.elapsed();
        assert_eq!((r.blocks_checked, r.corrupt_blocks), (512, 0));
        assert!(
            took >= std::time::Duration::from_millis(490),
            "2 MiB scrubbed in {took:?} at a limit of 4 MiB/s"
        );
        let last = store.status().await.last_clean_scrub_unix;
        assert!(last >= before, "last scrub {last}, started at {before}");

        store.shutdown().await.unwrap();
        drop(store);
        let store = open(dir.path(), None).await;
        assert_eq!(
            store.status().await.last_clean_scrub_unix,
            last,
            "kept over a restart"
        );
    });
}
