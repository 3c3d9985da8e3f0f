//! Property test: random sequences of store operations, compared after
//! every step with an in-memory model of the volume and its snapshots.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use zebu_replica::io::EngineKind;
use zebu_replica::store::{OpenOptions, Store};

const BS: u64 = 4096;
const EPOCH: u64 = 1;

#[derive(Clone, Debug)]
enum Step {
    Write { block: u64, count: u64, seed: u8 },
    Unmap { block: u64, count: u64 },
    Snapshot,
    Delete(usize),
    Revert(usize),
    Expand(u64),
    Flush,
    Restart,
    Read { block: u64, count: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..128, 1u64..24, 1u8..=255).prop_map(|(block, count, seed)| Step::Write { block, count, seed }),
        2 => (0u64..128, 1u64..24).prop_map(|(block, count)| Step::Unmap { block, count }),
        2 => Just(Step::Snapshot),
        1 => (0usize..8).prop_map(Step::Delete),
        1 => (0usize..8).prop_map(Step::Revert),
        1 => (1u64..16).prop_map(Step::Expand),
        1 => Just(Step::Flush),
        1 => Just(Step::Restart),
        3 => (0u64..128, 1u64..24).prop_map(|(block, count)| Step::Read { block, count }),
    ]
}

/// Reads every present block of every layer (snapshots and the head)
/// through `read_layer`, which checks each block against its stored CRC: the
/// CRC files agree with the data after writes, merges, expands and restarts.
async fn check_stored_crcs(store: &Arc<Store>) -> Result<(), TestCaseError> {
    let mut names: Vec<String> = store
        .snapshots()
        .await
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.push(String::new());
    for name in names {
        let mut rx = store.read_layer(&name, vec![]).await.expect("read_layer");
        while let Some(chunk) = rx.recv().await {
            let (offset, data, crc) = match chunk {
                Ok(c) => c,
                Err(e) => return Err(TestCaseError::fail(format!("layer {name:?}: {e}"))),
            };
            prop_assert_eq!(
                crc,
                crc32fast::hash(&data),
                "layer {:?} at {}",
                name,
                offset
            );
        }
    }
    Ok(())
}

/// The model: one fill byte per block (0 = zeros).
struct Model {
    blocks: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
}

fn block_data(fill: u8) -> Vec<u8> {
    vec![fill; BS as usize]
}

fn open(dir: &std::path::Path, size: Option<u64>, engine: EngineKind) -> Arc<Store> {
    let s = Store::open(OpenOptions {
        dir: dir.to_owned(),
        size,
        block_size: BS as u32,
        io_engine: engine,
    })
    .expect("open store");
    Arc::new(s)
}

async fn check_range(
    store: &Store,
    model: &Model,
    block: u64,
    count: u64,
) -> Result<(), TestCaseError> {
    let nblocks = model.blocks.len() as u64;
    let block = block.min(nblocks - 1);
    let count = count.min(nblocks - block);
    let got = store
        .read(block * BS, count * BS, EPOCH)
        .await
        .expect("read");
    for i in 0..count {
        let b = (block + i) as usize;
        let chunk = &got[(i * BS) as usize..((i + 1) * BS) as usize];
        prop_assert!(
            chunk.iter().all(|&x| x == model.blocks[b]),
            "block {} should be filled with {:#x}, starts with {:?}",
            b,
            model.blocks[b],
            &chunk[..4]
        );
    }
    Ok(())
}

async fn run(steps: Vec<Step>, engine: EngineKind) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let mut store = open(&dir, Some(128 * BS), engine);
    store.open_epoch(EPOCH).await.unwrap();
    let mut model = Model {
        blocks: vec![0; 128],
        snapshots: vec![],
    };
    let mut snap_no = 0;
    for s in steps {
        let nblocks = model.blocks.len() as u64;
        match s {
            Step::Write { block, count, seed } => {
                let block = block.min(nblocks - 1);
                let count = count.min(nblocks - block);
                let mut data = Vec::with_capacity((count * BS) as usize);
                for i in 0..count {
                    let fill = seed.wrapping_add(i as u8).max(1);
                    data.extend(block_data(fill));
                    model.blocks[(block + i) as usize] = fill;
                }
                let crc = crc32fast::hash(&data);
                store
                    .write(block * BS, Bytes::from(data), crc, EPOCH, 1)
                    .await
                    .unwrap();
            }
            Step::Unmap { block, count } => {
                let block = block.min(nblocks - 1);
                let count = count.min(nblocks - block);
                store.unmap(block * BS, count * BS, EPOCH).await.unwrap();
                for i in 0..count {
                    model.blocks[(block + i) as usize] = 0;
                }
            }
            Step::Snapshot => {
                let name = format!("s{snap_no}");
                // Every other one is a system snapshot (as a rebuild makes):
                // deleting one right below the head folds the head down.
                let user_created = snap_no % 2 == 0;
                snap_no += 1;
                store
                    .snapshot(&name, user_created, EPOCH, store.session())
                    .await
                    .unwrap();
                model.snapshots.push((name, model.blocks.clone()));
            }
            Step::Delete(i) => {
                if !model.snapshots.is_empty() {
                    let (name, _) = model.snapshots.remove(i % model.snapshots.len());
                    store
                        .delete_snapshot(&name, EPOCH, store.session())
                        .await
                        .unwrap();
                }
            }
            Step::Revert(i) => {
                if !model.snapshots.is_empty() {
                    let i = i % model.snapshots.len();
                    let (name, blocks) = model.snapshots[i].clone();
                    store.revert(&name, EPOCH, store.session()).await.unwrap();
                    model.snapshots.truncate(i + 1);
                    // The volume keeps its current size; blocks past the
                    // snapshot's size read as zeros.
                    let len = model.blocks.len();
                    model.blocks = blocks;
                    model.blocks.resize(len, 0);
                }
            }
            Step::Expand(extra) => {
                let size = (nblocks + extra) * BS;
                store.expand(size, EPOCH, store.session()).await.unwrap();
                model.blocks.resize((nblocks + extra) as usize, 0);
            }
            Step::Flush => store.flush(EPOCH).await.unwrap(),
            Step::Restart => {
                store.shutdown().await.unwrap();
                drop(store);
                store = open(&dir, None, engine);
                prop_assert!(store.status().await.clean);
            }
            Step::Read { block, count } => {
                check_range(&store, &model, block, count).await?;
                check_stored_crcs(&store).await?;
            }
        }
        // Snapshot names, oldest first, must match the model.
        let names: Vec<String> = store
            .snapshots()
            .await
            .into_iter()
            .map(|l| l.name)
            .collect();
        let want: Vec<String> = model.snapshots.iter().map(|(n, _)| n.clone()).collect();
        prop_assert_eq!(names, want);
    }
    let n = model.blocks.len() as u64;
    check_range(&store, &model, 0, n).await?;
    // After a restart the index is rebuilt from the files: still identical.
    store.shutdown().await.unwrap();
    drop(store);
    let store = open(&dir, None, engine);
    check_range(&store, &model, 0, n).await?;
    check_stored_crcs(&store).await?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..40), uring in any::<bool>()) {
        let engine = if uring { EngineKind::Uring } else { EngineKind::Threads };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(steps, engine))?;
    }
}

/// A system snapshot taken before an expand, deleted while the head is the
/// smaller layer, takes the head's blocks, including those past its own
/// (older, smaller) size: its CRC file grows to hold their entries.
#[test]
fn folding_an_expanded_head_into_an_older_snapshot_keeps_its_crcs() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Some(16 * BS), EngineKind::Uring);
        store.open_epoch(EPOCH).await.unwrap();
        let write = |block: u64, fill: u8| {
            let data = Bytes::from(block_data(fill));
            let crc = crc32fast::hash(&data);
            let store = store.clone();
            async move { store.write(block * BS, data, crc, EPOCH, 1).await.unwrap() }
        };
        write(0, 1).await;
        write(1, 2).await;
        store
            .snapshot("sys", false, EPOCH, store.session())
            .await
            .unwrap();
        store.expand(64 * BS, EPOCH, store.session()).await.unwrap();
        write(40, 3).await;
        store
            .delete_snapshot("sys", EPOCH, store.session())
            .await
            .unwrap();
        assert!(store.snapshots().await.is_empty(), "the snapshot is gone");
        check_stored_crcs(&store).await.unwrap();
        write(63, 4).await;
        store.shutdown().await.unwrap();
        drop(store);
        let store = open(dir.path(), None, EngineKind::Uring);
        check_stored_crcs(&store).await.unwrap();
        let got = store.read(40 * BS, BS, EPOCH).await.unwrap();
        assert!(got.iter().all(|&b| b == 3));
    });
}
