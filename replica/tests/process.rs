//! Integration tests that start the real `zebu-replica` binary on loopback
//! and talk to it over gRPC, for both I/O backends.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_testkit::{Mount, SHORT, bin, pattern, run, tempdir};

mod common;
use common::*;

async fn flushed_data_survives_sigkill(engine: &str) {
    let tmp = tempdir();
    let dir = tmp.path().join("r");
    let r = Replica::start(&dir, Some("64M"), engine);
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    let mut io = Io::open(&mut c, 1).await;
    // 300 writes of 1-8 blocks at scattered offsets, in batches of 30.
    let mut written: HashMap<u64, Vec<u8>> = HashMap::new();
    for b in 0..10u64 {
        let mut reqs = Vec::new();
        for i in 0..30u64 {
            let n = 1 + (b * 30 + i) % 8;
            let block = ((b * 30 + i) * 7919) % (16384 - 8);
            let data = pattern(b * 1000 + i, (n * BS) as usize);
            for k in 0..n {
                written.insert(
                    block + k,
                    data[(k * BS) as usize..((k + 1) * BS) as usize].to_vec(),
                );
            }
            reqs.push(write_req(block * BS, data));
        }
        // Overlapping writes within one batch have no defined order: skip them.
        for resp in io.batch(reqs).await {
            assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);
        }
    }
    io.flush().await;
    // Re-read everything from the running replica to know the final content
    // (overlapping writes of one batch have no defined order).
    let mut expect: HashMap<u64, Bytes> = HashMap::new();
    for &block in written.keys() {
        let resp = io.one(read_req(block * BS, BS)).await;
        assert_eq!(status(&resp), pb::IoStatus::IoOk);
        assert_eq!(resp.crc32, crc32fast::hash(&resp.payload));
        expect.insert(block, resp.payload);
    }
    drop(io);
    r.kill9();

    let r = Replica::start(&dir, None, engine);
    let mut c = r.client().await;
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(
        !info.clean,
        "a SIGKILLed replica must report an unclean stop"
    );
    assert_eq!(info.size, 64 << 20);
    c.open(pb::OpenRequest { epoch: 2 }).await.unwrap();
    let mut io = Io::open(&mut c, 2).await;
    for (block, data) in &expect {
        let resp = io.one(read_req(block * BS, BS)).await;
        assert_eq!(status(&resp), pb::IoStatus::IoOk);
        assert_eq!(
            &resp.payload, data,
            "block {block} differs after SIGKILL + restart"
        );
    }
    // Unwritten blocks read as zeros.
    let resp = io.one(read_req(16383 * BS, BS)).await;
    assert!(resp.payload.iter().all(|&b| b == 0));
    drop(io);
    // A clean detach is recorded; a stale epoch cannot detach.
    let err = c
        .close(pb::CloseRequest {
            epoch: 1,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let info = c
        .close(pb::CloseRequest {
            epoch: 2,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.attached);
    // A clean stop is recorded as such.
    assert!(r.terminate().success());
    let r = Replica::start(&dir, Some("64M"), engine);
    let mut c = r.client().await;
    assert!(c.info(pb::InfoRequest {}).await.unwrap().into_inner().clean);
}

#[tokio::test]
async fn flushed_data_survives_sigkill_uring() {
    flushed_data_survives_sigkill("uring").await;
}

#[tokio::test]
async fn flushed_data_survives_sigkill_threads() {
    flushed_data_survives_sigkill("threads").await;
}

async fn bad_requests_are_rejected(engine: &str) {
    let tmp = tempdir();
    let r = Replica::start(&tmp.path().join("r"), Some("8M"), engine);
    let mut c = r.client().await;
    // I/O before Open is refused.
    let mut io = Io::open(&mut c, 1).await;
    let resp = io.one(write_req(0, vec![1; BS as usize])).await;
    assert_eq!(status(&resp), pb::IoStatus::IoNotOpen, "{}", resp.message);
    c.open(pb::OpenRequest { epoch: 5 }).await.unwrap();
    let mut io = Io::open(&mut c, 5).await;
    io.one(write_req(0, vec![7; BS as usize])).await;

    // Wrong CRC: rejected, nothing written.
    let mut bad = write_req(0, vec![9; BS as usize]);
    bad.crc32 ^= 1;
    let resp = io.one(bad).await;
    assert_eq!(status(&resp), pb::IoStatus::IoCrcMismatch);
    assert!(
        resp.message.contains("nothing was written"),
        "{}",
        resp.message
    );
    let resp = io.one(read_req(0, BS)).await;
    assert!(
        resp.payload.iter().all(|&b| b == 7),
        "a rejected write changed data"
    );

    // Misaligned, out of range, length mismatch, unknown op.
    let resp = io.one(write_req(100, vec![1; BS as usize])).await;
    assert_eq!(status(&resp), pb::IoStatus::IoInvalidArgument);
    assert!(
        resp.message.contains("multiples of the block size"),
        "{}",
        resp.message
    );
    let resp = io.one(read_req(8 << 20, BS)).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOutOfRange);
    let mut short = write_req(0, vec![1; BS as usize]);
    short.length = 2 * BS as u32;
    assert_eq!(
        status(&io.one(short).await),
        pb::IoStatus::IoInvalidArgument
    );
    let resp = io
        .one(pb::IoRequest {
            op: 42,
            ..Default::default()
        })
        .await;
    assert_eq!(status(&resp), pb::IoStatus::IoInvalidArgument);

    // A stale epoch is fenced off, for I/O and for Open.
    let mut stale = write_req(0, vec![3; BS as usize]);
    stale.epoch = 4;
    let resp = io.one(stale).await;
    assert_eq!(status(&resp), pb::IoStatus::IoStaleEpoch);
    assert!(resp.message.contains("fenced"), "{}", resp.message);
    let err = c.open(pb::OpenRequest { epoch: 4 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // Newer engine takes over: the old epoch's writes fail from now on
    // (its stream was superseded by the new Open).
    c.open(pb::OpenRequest { epoch: 6 }).await.unwrap();
    io.expect_refused(write_req(0, vec![3; BS as usize])).await;
    let mut io6 = Io::open(&mut c, 6).await;
    let resp = io6.one(read_req(0, BS)).await;
    assert!(resp.payload.iter().all(|&b| b == 7));

    // A control call of a superseded session (its caller has re-opened the
    // replica since; a late call of an ejected engine link) is refused,
    // whatever it asks, and changes nothing.
    let current = session_of(&mut c).await;
    let late = current - 1;
    let size_before = c.info(pb::InfoRequest {}).await.unwrap().into_inner().size;
    let refused = [
        c.create_snapshot(pb::CreateSnapshotRequest {
            name: "late".into(),
            epoch: 6,
            user_created: true,
            session: late,
        })
        .await
        .map(|_| ()),
        c.set_ejected(pb::SetEjectedRequest {
            ejected: vec!["someone".into()],
            epoch: 6,
            session: late,
        })
        .await
        .map(|_| ()),
        c.expand(pb::ExpandRequest {
            size: 1 << 30,
            epoch: 6,
            session: late,
        })
        .await
        .map(|_| ()),
        c.close(pb::CloseRequest {
            epoch: 6,
            session: late,
        })
        .await
        .map(|_| ()),
    ];
    for r in refused {
        let err = r.expect_err("a superseded session's control call was applied");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("session"), "{}", err.message());
    }
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(info.ejected.is_empty(), "{:?}", info.ejected);
    assert_eq!(info.size, size_before);
    assert!(
        info.chain.iter().all(|l| l.name != "late"),
        "{:?}",
        info.chain
    );

    // Control-plane errors.
    let err = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            name: "nope".into(),
            epoch: 6,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .expand(pb::ExpandRequest {
            size: 4 << 20,
            epoch: 6,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("shrink"), "{}", err.message());
    let err = c
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "bad name!".into(),
            epoch: 6,
            user_created: true,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    c.create_snapshot(pb::CreateSnapshotRequest {
        name: "s1".into(),
        epoch: 6,
        user_created: true,
        session: session_of(&mut c.clone()).await,
    })
    .await
    .unwrap();
    let err = c
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "s1".into(),
            epoch: 6,
            user_created: true,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    // Revert while a data stream is open is refused.
    let err = c
        .revert(pb::RevertRequest {
            name: "s1".into(),
            epoch: 6,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // The replica still serves after all of that.
    let resp = io6.one(read_req(0, BS)).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk);
}

#[tokio::test]
async fn bad_requests_are_rejected_uring() {
    bad_requests_are_rejected("uring").await;
}

#[tokio::test]
async fn bad_requests_are_rejected_threads() {
    bad_requests_are_rejected("threads").await;
}

fn run_replica_expect_failure(args: &[&str]) -> String {
    let out = Command::new(bin("zebu-replica"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "zebu-replica {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_directories_and_flags_fail_clearly() {
    let tmp = tempdir();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("important.txt"), b"keep me").unwrap();
    let err = run_replica_expect_failure(&[
        "--dir",
        other.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "8M",
    ]);
    assert!(err.contains("holds no replica"), "{err}");
    assert_eq!(
        std::fs::read(other.join("important.txt")).unwrap(),
        b"keep me"
    );

    let fresh = tmp.path().join("fresh");
    let err =
        run_replica_expect_failure(&["--dir", fresh.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(err.contains("--size is required"), "{err}");
    let err = run_replica_expect_failure(&[
        "--dir",
        fresh.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "12Q",
    ]);
    assert!(err.contains("unknown unit"), "{err}");
    let err = run_replica_expect_failure(&[
        "--dir",
        fresh.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "1000",
    ]);
    assert!(err.contains("multiple of the block size"), "{err}");

    // Size mismatch with an existing replica.
    let dir = tmp.path().join("r");
    drop(Replica::start(&dir, Some("8M"), "threads"));
    let err = run_replica_expect_failure(&[
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "16M",
    ]);
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn corrupt_metadata_is_refused() {
    let tmp = tempdir();
    let dir = tmp.path().join("r");
    let r = Replica::start(&dir, Some("8M"), "threads");
    assert!(r.terminate().success());
    // Overwrite the metadata record through sled itself with garbage.
    {
        let db = sled::open(dir.join("meta")).unwrap();
        db.insert(b"replica", b"\x00garbage".to_vec()).unwrap();
        db.flush().unwrap();
    }
    let err =
        run_replica_expect_failure(&["--dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(err.contains("corrupt"), "{err}");
    // A layer file gone missing is reported, not papered over.
    let dir2 = tmp.path().join("r2");
    let r = Replica::start(&dir2, Some("8M"), "threads");
    assert!(r.terminate().success());
    std::fs::remove_file(dir2.join("layers/0.img")).unwrap();
    let err =
        run_replica_expect_failure(&["--dir", dir2.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(err.contains("damaged"), "{err}");
}

/// Takes system snapshot "base" (epoch 1): the head freezes into it.
async fn freeze_base(c: &mut ReplicaClient<Channel>) {
    c.create_snapshot(pb::CreateSnapshotRequest {
        name: "base".into(),
        epoch: 1,
        user_created: false,
        session: session_of(&mut c.clone()).await,
    })
    .await
    .unwrap();
}

/// Two 16 MiB replicas under `dir`, opened with epoch 1, and their clients.
async fn open_pair(
    dir: &Path,
) -> (
    Replica,
    Replica,
    ReplicaClient<Channel>,
    ReplicaClient<Channel>,
) {
    let a = Replica::start(&dir.join("a"), Some("16M"), "uring");
    let b = Replica::start(&dir.join("b"), Some("16M"), "uring");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    cb.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    (a, b, ca, cb)
}

/// Layer copy between two replicas, as a rebuild does it: CRC listing,
/// streaming read of a frozen layer, streaming write into the target.
#[tokio::test]
async fn layers_copy_between_replicas() {
    let tmp = tempdir();
    let (_a, _b, mut ca, mut cb) = open_pair(tmp.path()).await;
    let mut io = Io::open(&mut ca, 1).await;
    for i in 0..64u64 {
        io.one(write_req(i * 5 * BS, pattern(i, BS as usize))).await;
    }
    freeze_base(&mut ca).await;
    // b has stale data in a block a does not hold: the sync must punch it.
    let mut iob = Io::open(&mut cb, 1).await;
    iob.one(write_req(3 * BS, vec![0xEE; BS as usize])).await;
    drop(iob);

    let session = session_of(&mut cb).await;
    cb.prepare_sync(pb::PrepareSyncRequest {
        session,
        layers: vec!["base".into()],
        epoch: 1,
        include_head: true,
    })
    .await
    .unwrap();
    // Head of b: punch everything a's head does not hold (a's head is empty).
    let punch = pb::LayerData {
        layer: String::new(),
        offset: 0,
        punch_length: 16 << 20,
        epoch: 1,
        session,
        ..Default::default()
    };
    cb.write_layer(tokio_stream::iter(vec![punch]))
        .await
        .unwrap();
    let src = ca
        .read_layer(pb::ReadLayerRequest {
            layer: "base".into(),
            extents: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let stream = src.map(move |m| {
        let mut m = m.unwrap();
        m.layer = "base".into();
        m.epoch = 1;
        m.session = session;
        m
    });
    let counts = cb.write_layer(stream).await.unwrap().into_inner();
    assert_eq!(counts.blocks_written, 64);
    let session = session_of(&mut cb).await;
    cb.finish_sync(pb::FinishSyncRequest { epoch: 1, session })
        .await
        .unwrap();

    let (ka, kb) = (
        all_crcs(ca.clone(), "base").await,
        all_crcs(cb.clone(), "base").await,
    );
    assert_eq!(ka.len(), 64);
    assert_eq!(ka, kb);
    let mut iob = Io::open(&mut cb, 1).await;
    assert_same_data(&mut io, &mut iob, 16 << 20).await;
    // Writing a layer when no sync was prepared is refused.
    let stray = pb::LayerData {
        layer: "base".into(),
        offset: 0,
        data: Bytes::from(vec![0; 4096]),
        crc32: crc32fast::hash(&[0u8; 4096]),
        epoch: 1,
        session,
        ..Default::default()
    };
    let err = cb
        .write_layer(tokio_stream::iter(vec![stray]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

async fn all_crcs(mut c: ReplicaClient<Channel>, layer: &str) -> Vec<(u64, u32)> {
    let mut s = c
        .block_crcs(pb::BlockCrcsRequest {
            layer: layer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        all.extend(chunk.blocks.into_iter().zip(chunk.crcs));
    }
    all
}

/// Whole-volume reads of two replicas agree.
async fn assert_same_data(a: &mut Io, b: &mut Io, size: u64) {
    for off in (0..size).step_by(1 << 20) {
        let x = a.one(read_req(off, 1 << 20)).await;
        let y = b.one(read_req(off, 1 << 20)).await;
        assert_eq!(x.payload, y.payload, "data differs at {off}");
    }
}

/// Runs a pull to the end: the last progress message, or the error.
async fn pull(
    c: &mut ReplicaClient<Channel>,
    r: pb::PullLayerRequest,
) -> Result<pb::PullProgress, tonic::Status> {
    let mut s = c.pull_layer(r).await?.into_inner();
    let mut last = None;
    while let Some(m) = s.next().await {
        last = Some(m?);
    }
    Ok(last.expect("a pull ends with its totals"))
}

/// The rebuild's copy as the engine drives it: the target pulls the planned
/// extents straight from the source replica (whole layer, chosen extents,
/// punches), and refuses pulls it was not prepared for or cannot do.
#[tokio::test]
async fn a_replica_pulls_layers_from_a_peer() {
    let tmp = tempdir();
    let (a, _b, mut ca, mut cb) = open_pair(tmp.path()).await;
    let mut io = Io::open(&mut ca, 1).await;
    // 3 MiB of contiguous data (more than one read chunk) and scattered blocks.
    io.one(write_req(0, pattern(7, 3 << 20))).await;
    for i in 0..40u64 {
        io.one(write_req((4 << 20) + i * 3 * BS, pattern(i, BS as usize)))
            .await;
    }
    freeze_base(&mut ca).await;
    // Head of a: two blocks; b's head holds a stale block a's does not.
    io.one(write_req(9 * BS, pattern(99, 2 * BS as usize)))
        .await;
    let mut iob = Io::open(&mut cb, 1).await;
    iob.one(write_req(12 << 20, vec![0xEE; BS as usize])).await;
    drop(iob);

    let session = session_of(&mut cb).await;
    let req = |layer: &str, copy: Vec<(u64, u64)>, punch: Vec<(u64, u64)>, whole| {
        let ext = |v: Vec<(u64, u64)>| {
            v.into_iter()
                .map(|(offset, length)| pb::Extent { offset, length })
                .collect()
        };
        pb::PullLayerRequest {
            source: a.addr.clone(),
            layer: layer.into(),
            copy: ext(copy),
            punch: ext(punch),
            epoch: 1,
            whole,
            session,
        }
    };
    // Not prepared for a sync yet: refused before anything is written.
    let err = pull(&mut cb, req("base", vec![], vec![], true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    let session = session_of(&mut cb).await;
    cb.prepare_sync(pb::PrepareSyncRequest {
        session,
        layers: vec!["base".into()],
        epoch: 1,
        include_head: true,
    })
    .await
    .unwrap();
    let done = pull(&mut cb, req("base", vec![], vec![], true))
        .await
        .unwrap();
    assert_eq!(done.blocks_written, 768 + 40);
    assert_eq!(done.bytes_written, (768 + 40) * BS);
    assert_eq!(
        all_crcs(ca.clone(), "base").await,
        all_crcs(cb.clone(), "base").await
    );
    // The head: the two blocks by extent, the stale block punched.
    let done = pull(
        &mut cb,
        req("", vec![(8 * BS, 4 * BS)], vec![(12 << 20, BS)], false),
    )
    .await
    .unwrap();
    assert_eq!((done.blocks_written, done.blocks_punched), (2, 1));
    assert_eq!(
        all_crcs(ca.clone(), "").await,
        all_crcs(cb.clone(), "").await
    );
    // Nothing to copy and nothing to punch is a no-op, not the whole layer.
    let done = pull(&mut cb, req("base", vec![], vec![], false))
        .await
        .unwrap();
    assert_eq!(done, pb::PullProgress::default());

    // Bad requests name what is wrong.
    let err = pull(&mut cb, req("base", vec![(0, BS)], vec![], true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = pull(&mut cb, req("base", vec![(0, 0)], vec![], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = pull(&mut cb, req("nope", vec![(0, BS)], vec![], false))
        .await
        .unwrap_err();
    assert!(err.message().contains("nope"), "{err:?}");
    let mut bad_source = req("base", vec![(0, BS)], vec![], false);
    bad_source.source = "127.0.0.1:1".into();
    let err = pull(&mut cb, bad_source).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("127.0.0.1:1"), "{err:?}");

    let session = session_of(&mut cb).await;
    cb.finish_sync(pb::FinishSyncRequest { epoch: 1, session })
        .await
        .unwrap();
    let mut iob = Io::open(&mut cb, 1).await;
    assert_same_data(&mut io, &mut iob, 16 << 20).await;
}

/// A 24 MiB ext4 filesystem on a loop device under `dir`, unmounted when
/// the guard drops.
fn small_fs(dir: &Path) -> (PathBuf, Mount) {
    let img = dir.join("fs.img");
    let mnt = dir.join("mnt");
    run(
        Command::new("truncate").args(["-s", "24M"]).arg(&img),
        SHORT,
    )
    .expect_ok();
    // Inode tables and journal written now, not by a background thread
    // after mounting, so the filesystem does no I/O of its own once mounted.
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&img),
        SHORT,
    )
    .expect_ok();
    let mount = Mount::with_options(&img, &mnt, "loop");
    (mnt, mount)
}

/// Writes `path` until the filesystem holding it is full, down to the last
/// block.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for size in [1 << 20, 4096] {
        let chunk = vec![0x5a; size];
        loop {
            match f.write_all(&chunk).and_then(|()| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
}

/// The CRC file's space is allocated before it is mapped, so a full disk is
/// an error, never a crash: a snapshot (a new layer) is refused with
/// RESOURCE_EXHAUSTED; a replica whose CRC file is sparse (as older versions
/// left it) restarts on the full disk, serves reads, answers writes with
/// NO_SPACE, and takes them again once there is room.
#[tokio::test]
async fn a_full_disk_refuses_new_layers_and_a_sparse_crc_file_still_opens() {
    let tmp = tempdir();
    let (mnt, _mount) = small_fs(tmp.path());
    let dir = mnt.join("r");
    let log = tmp.path().join("r.log");
    // 12 GiB (sparse): its CRC files take 12 MiB each, half the filesystem,
    // so whether they fit below is never a close call.
    let r = Replica::start_logged(&dir, Some("12G"), "uring", &log);
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    let mut io = Io::open(&mut c, 1).await;
    let data = pattern(7, 1 << 20);
    assert_eq!(
        status(&io.one(write_req(0, data.clone())).await),
        pb::IoStatus::IoOk
    );
    fill(&mnt.join("filler-1"));
    let err = c
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "s1".into(),
            epoch: 1,
            user_created: true,
            session: session_of(&mut c.clone()).await,
        })
        .await
        .expect_err("no room for the new layer's files");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let files = std::fs::read_dir(dir.join("layers")).unwrap().count();
    assert_eq!(files, 2, "the refused layer's files are removed at once");
    // A clean stop needs room to record itself.
    std::fs::remove_file(mnt.join("filler-1")).unwrap();
    drop(io);
    assert!(r.terminate().success());

    // Make the head's CRC file sparse past the page holding the written
    // blocks' entries (punching those would lose them: reads would then
    // fail as corrupt), then fill what that freed.
    let crc = std::fs::read_dir(dir.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "crc"))
        .expect("a CRC file");
    let f = std::fs::OpenOptions::new().write(true).open(&crc).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4096,
        len - 4096,
    )
    .unwrap();
    drop(f);
    let blocks = std::fs::metadata(&crc).unwrap().blocks();
    assert!(
        blocks <= 8,
        "sparse but for its first page: {blocks} sectors"
    );
    // Full but for 2 MiB: room for the metadata store to open, not for the
    // 12 MiB of CRC entries.
    std::fs::write(mnt.join("spacer"), vec![1u8; 2 << 20]).unwrap();
    fill(&mnt.join("filler-2"));
    std::fs::remove_file(mnt.join("spacer")).unwrap();

    let r = Replica::start_logged(&dir, None, "uring", &log);
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 2 }).await.unwrap();
    let mut io = Io::open(&mut c, 2).await;
    let resp = io.one(read_req(0, 1 << 20)).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk);
    assert_eq!(&resp.payload[..], &data[..]);
    let resp = io.one(write_req(1 << 20, pattern(8, 4096))).await;
    assert_eq!(status(&resp), pb::IoStatus::IoNoSpace, "{}", resp.message);
    c.info(pb::InfoRequest {}).await.expect("still serving");

    std::fs::remove_file(mnt.join("filler-2")).unwrap();
    let resp = io.one(write_req(1 << 20, pattern(8, 4096))).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);
    assert!(
        std::fs::metadata(&crc).unwrap().blocks() > 8,
        "allocated again"
    );
}

/// ENOSPC on a small filesystem: the write fails with a clear status, the
/// replica keeps serving, earlier data reads back intact.
#[tokio::test]
async fn full_disk_returns_no_space_and_keeps_serving() {
    let tmp = tempdir();
    let (mnt, _mount) = small_fs(tmp.path());

    let r = Replica::start_logged(
        &mnt.join("r"),
        Some("64M"),
        "uring",
        &tmp.path().join("r.log"),
    );
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    let mut io = Io::open(&mut c, 1).await;
    let first = pattern(1, 1 << 20);
    assert_eq!(
        status(&io.one(write_req(0, first.clone())).await),
        pb::IoStatus::IoOk
    );
    let mut no_space = None;
    for i in 1..64u64 {
        let resp = io.one(write_req(i << 20, pattern(i + 1, 1 << 20))).await;
        match status(&resp) {
            pb::IoStatus::IoOk => continue,
            s => {
                no_space = Some((s, resp.message));
                break;
            }
        }
    }
    let (s, msg) = no_space.expect("a 24 MiB filesystem cannot hold 64 MiB");
    assert_eq!(s, pb::IoStatus::IoNoSpace, "{msg}");
    assert!(msg.contains("no space left"), "{msg}");
    // Still serving: earlier data reads back, info answers.
    let resp = io.one(read_req(0, 1 << 20)).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk);
    assert_eq!(&resp.payload[..], &first[..]);
    c.info(pb::InfoRequest {}).await.unwrap();
}

/// Cache flushes the block device under `mnt` has completed (the 16th field
/// of its `stat`).
fn disk_flushes(mnt: &Path) -> u64 {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(mnt)
        .output()
        .expect("run findmnt");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = Path::new(&dev).file_name().expect("a device path");
    let stat = std::fs::read_to_string(Path::new("/sys/block").join(name).join("stat"))
        .unwrap_or_else(|e| panic!("reading the stat of {dev}: {e}"));
    let field = stat.split_whitespace().nth(15).expect("a flush count");
    field.parse().unwrap()
}

/// A replica that has nothing to do sends its disk no cache flushes. Each
/// one makes the disk write back its whole cache and stalls every other
/// request meanwhile (a flush of a virtual disk can take a host fsync, many
/// milliseconds), so a node with many idle replicas would slow down the
/// busy ones. sled's own flusher used to do just that, twice a second per
/// replica; the metadata is flushed when it is written instead.
#[tokio::test]
async fn an_idle_replica_sends_its_disk_no_cache_flushes() {
    let tmp = tempdir();
    let (mnt, _mount) = small_fs(tmp.path());
    let r = Replica::start_logged(
        &mnt.join("r"),
        Some("16M"),
        "uring",
        &tmp.path().join("r.log"),
    );
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    let mut io = Io::open(&mut c, 1).await;
    let resp = io.one(write_req(0, pattern(3, BS as usize))).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);
    // The count sees this replica's flushes: a FLUSH request sends one.
    let before = disk_flushes(&mnt);
    io.flush().await;
    assert!(disk_flushes(&mnt) > before, "a FLUSH reached the disk");
    // Commit whatever the filesystem still holds (timestamps), so that
    // nothing but the replica could flush from here on.
    run(Command::new("sync").arg("-f").arg(&mnt), SHORT).expect_ok();
    let idle_from = disk_flushes(&mnt);
    // Attached, with its data stream open, and idle for 3 s: sled's old
    // flusher would have flushed 6 times.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let flushed = disk_flushes(&mnt) - idle_from;
    assert_eq!(
        flushed, 0,
        "an idle replica sent its disk {flushed} cache flushes in 3 s"
    );
    // And it still serves.
    let resp = io.one(read_req(0, BS)).await;
    assert_eq!(&resp.payload[..], &pattern(3, BS as usize)[..]);
}

/// A block that rotted on the source's disk is never copied: reading the
/// layer for a rebuild checks every block against its stored CRC, and the
/// pull fails with DATA_LOSS naming the block.
#[tokio::test]
async fn a_corrupt_source_block_stops_the_copy() {
    let tmp = tempdir();
    let (a, _b, mut ca, mut cb) = open_pair(tmp.path()).await;
    let mut io = Io::open(&mut ca, 1).await;
    io.one(write_req(0, pattern(3, 1 << 20))).await;
    freeze_base(&mut ca).await;
    // The frozen layer is the data file holding data (the new head is empty).
    let layers = tmp.path().join("a").join("layers");
    let frozen = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.blocks()).unwrap_or(0))
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&frozen)
        .unwrap();
    f.write_all_at(&[0x5a; 16], 37 * BS + 100).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let mut s = ca
        .read_layer(pb::ReadLayerRequest {
            layer: "base".into(),
            extents: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut err = None;
    while let Some(m) = s.next().await {
        if let Err(e) = m {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("reading a corrupt layer must fail");
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(err.message().contains("block 37"), "{err:?}");

    let session = session_of(&mut cb).await;
    cb.prepare_sync(pb::PrepareSyncRequest {
        session,
        layers: vec!["base".into()],
        epoch: 1,
        include_head: false,
    })
    .await
    .unwrap();
    let err = pull(
        &mut cb,
        pb::PullLayerRequest {
            source: a.addr.clone(),
            layer: "base".into(),
            epoch: 1,
            whole: true,
            session,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("corrupt") && err.message().contains(&a.addr),
        "{err:?}"
    );
}

/// Sends `body` as the whole request stream of a call to `method` (with
/// `grpc-encoding: encoding` when given) and returns the call's final status.
async fn raw_call(
    channel: Channel,
    method: &str,
    body: Vec<u8>,
    encoding: Option<&str>,
) -> tonic::Status {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/zebu.replica.v1.Replica/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // The replica was never opened: session 0 is current.
        .header(zebu_proto::wire::SESSION_HEADER, "0");
    if let Some(e) = encoding {
        req = req.header("grpc-encoding", e);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        )))
        .unwrap();
    let resp = tower::ServiceExt::oneshot(channel, req).await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(resp.headers()) {
        return status; // answered with trailers only
    }
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status trailer")
}

/// One bad call: (what, request stream bytes, grpc-encoding, expected code,
/// part of the expected message).
type BadCall = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    tonic::Code,
    &'static str,
);

/// Makes each call of `cases` to `method` of a fresh replica, checks the
/// status each gets, and that the replica still serves afterwards.
async fn expect_statuses(method: &str, cases: Vec<BadCall>) {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::start(dir.path(), Some("16M"), "uring");
    let channel = Channel::from_shared(format!("http://{}", r.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (what, body, encoding, code, message) in cases {
        let status = raw_call(channel.clone(), method, body, encoding).await;
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {status:?}");
    }
    let info = r
        .client()
        .await
        .info(pb::InfoRequest {})
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(info.size, 16 << 20);
}

/// The data stream is decoded below tonic's codec: malformed, truncated or
/// compressed input ends the stream with a status that says what is wrong,
/// and the replica goes on serving.
#[tokio::test]
async fn a_malformed_data_stream_gets_a_status_that_says_why() {
    let cases: Vec<BadCall> = vec![
        (
            "a payload longer than its message",
            vec![0, 0, 0, 0, 5, 0x0a, 3, 0x2a, 9, 1],
            None,
            tonic::Code::InvalidArgument,
            "runs past the end of its message",
        ),
        (
            "a compressed message",
            vec![1, 0, 0, 0, 0],
            None,
            tonic::Code::InvalidArgument,
            "compressed messages are not supported",
        ),
        (
            "a stream ending inside a message",
            vec![0, 0, 0, 0, 10, 0x0a, 0],
            None,
            tonic::Code::InvalidArgument,
            "ended inside a message",
        ),
        (
            "a compressed stream",
            vec![],
            Some("gzip"),
            tonic::Code::Unimplemented,
            "send them uncompressed",
        ),
    ];
    expect_statuses("Io", cases).await;
}

/// `ReadLayer` is served below tonic's codec too: a call without a usable
/// request, or compressed, or for a layer the replica does not have, gets a
/// status that says why, and the replica goes on serving.
#[tokio::test]
async fn a_bad_read_layer_call_gets_a_status_that_says_why() {
    let request = |layer: &str| {
        let m = pb::ReadLayerRequest {
            layer: layer.into(),
            extents: vec![],
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend((m.len() as u32).to_be_bytes());
        body.extend(m);
        body
    };
    let cases: Vec<BadCall> = vec![
        (
            "no request message",
            vec![],
            None,
            tonic::Code::InvalidArgument,
            "ended without its request message",
        ),
        (
            "a request that is not a ReadLayerRequest",
            vec![0, 0, 0, 0, 2, 0x0a, 9],
            None,
            tonic::Code::InvalidArgument,
            "decoding the ReadLayer request",
        ),
        (
            "a compressed call",
            request(""),
            Some("gzip"),
            tonic::Code::Unimplemented,
            "send them uncompressed",
        ),
        (
            "a layer the replica does not have",
            request("no-such-layer"),
            None,
            tonic::Code::NotFound,
            "no-such-layer",
        ),
        (
            "the head, which holds nothing yet",
            request(""),
            None,
            tonic::Code::Ok,
            "",
        ),
    ];
    expect_statuses("ReadLayer", cases).await;
}

/// Without CAP_IPC_LOCK and with an 8 MiB RLIMIT_MEMLOCK (the usual default
/// for an unprivileged process), the io_uring backend cannot register its
/// 32 MiB buffer arena: the replica says so once and serves every request size through
/// plain entries, with the same data as with the arena.
#[tokio::test]
async fn a_replica_that_cannot_lock_memory_warns_and_serves_all_sizes() {
    let tmp = tempdir();
    let dir = tmp.path().join("r");
    let log_path = tmp.path().join("stderr");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--memlock=8388608:8388608", "setpriv"])
        .args(["--inh-caps=-ipc_lock", "--ambient-caps=-ipc_lock"])
        .args(["--bounding-set=-ipc_lock"])
        .arg(bin("zebu-replica"));
    let r = Replica::start_with(cmd, &dir, Some("64M"), "uring", &log_path);
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 1 }).await.unwrap();
    let mut io = Io::open(&mut c, 1).await;
    // One request per arena size class and one too large for any slot.
    let sizes = [4096usize, 64 << 10, 1 << 20, 4 << 20];
    let mut writes = Vec::new();
    let mut offset = 0u64;
    for (i, len) in sizes.iter().enumerate() {
        writes.push((offset, pattern(i as u64 + 1, *len)));
        offset += *len as u64;
    }
    let reqs = writes
        .iter()
        .map(|(o, d)| write_req(*o, d.clone()))
        .collect();
    for resp in io.batch(reqs).await {
        assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);
    }
    io.flush().await;
    for (o, d) in &writes {
        let resp = io.one(read_req(*o, d.len() as u64)).await;
        assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);
        assert!(resp.payload == d[..], "{} bytes at {o} differ", d.len());
    }
    drop(io);
    drop(c);
    assert!(r.terminate().success());
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(
        text.matches("cannot register io_uring buffers").count(),
        1,
        "expected one warning about the arena, got: {text}"
    );
    // The same replica, started with the arena registered, reads the same data.
    let r = Replica::start(&dir, None, "uring");
    let mut c = r.client().await;
    c.open(pb::OpenRequest { epoch: 2 }).await.unwrap();
    let mut io = Io::open(&mut c, 2).await;
    for (o, d) in &writes {
        let resp = io.one(read_req(*o, d.len() as u64)).await;
        assert!(
            resp.payload == d[..],
            "{} bytes at {o} differ after restart",
            d.len()
        );
    }
}

/// The replica says at start whether its buffer arena got huge pages. With
/// transparent huge pages refused to the process (`PR_SET_THP_DISABLE`, as
/// THP `never` would), it warns that 1 MiB disk requests may be split, and
/// says how to fix it; otherwise (THP `madvise` or `always`) it says how
/// much of the arena is on huge pages (normally all of it).
#[test]
fn a_replica_says_whether_its_buffer_arena_is_on_huge_pages() {
    use std::os::unix::process::CommandExt;
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let tmp = tempdir();
    for refuse in [true, false] {
        let dir = tmp.path().join(format!("r-{refuse}"));
        let log_path = tmp.path().join(format!("stderr-{refuse}"));
        let mut cmd = Command::new(bin("zebu-replica"));
        if refuse {
            // SAFETY: prctl is async-signal-safe and touches only this
            // child's own flags, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let r = Replica::start_with(cmd, &dir, Some("16M"), "uring", &log_path);
        assert!(r.terminate().success());
        let text = std::fs::read_to_string(&log_path).unwrap();
        if refuse {
            assert!(
                text.contains("only 0 of 32 MiB on huge pages")
                    && text.contains("transparent_hugepage/enabled"),
                "{text}"
            );
        } else if thp.contains("[madvise]") || thp.contains("[always]") {
            // All of it, unless memory is too fragmented for the kernel to
            // find huge pages right now: then the warning says how much.
            assert!(
                text.contains("buffer arena: 32 MiB, all on huge pages")
                    || text.contains(" of 32 MiB on huge pages"),
                "{text}"
            );
        } else {
            eprintln!("transparent huge pages are off here: only the warning is checked");
        }
    }
}

/// An engine that ejected a replica and added it back opens it again with
/// the same epoch; the data stream of its earlier attachment must never
/// write again, whether it is still open (a request the network delivers
/// late) or opened anew naming the old session.
#[tokio::test]
async fn a_superseded_session_never_writes() {
    let tmp = tempdir();
    let r = Replica::start(&tmp.path().join("r"), Some("8M"), "uring");
    let mut c = r.client().await;
    let first = c
        .open(pb::OpenRequest { epoch: 3 })
        .await
        .unwrap()
        .into_inner();
    assert!(first.session > 0, "Open returns the session it started");
    let mut old = Io::open(&mut c, 3).await;
    let resp = old.one(write_req(0, vec![1; BS as usize])).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);

    // The same engine opens the replica again (re-added after an ejection).
    let second = c
        .open(pb::OpenRequest { epoch: 3 })
        .await
        .unwrap()
        .into_inner();
    assert!(second.session > first.session, "{first:?} then {second:?}");
    old.expect_refused(write_req(0, vec![2; BS as usize])).await;
    let mut late = Io::open_session(&mut c, 3, first.session).await;
    late.expect_refused(write_req(0, vec![3; BS as usize]))
        .await;
    // The sync calls of the earlier attachment are refused too: a late
    // PrepareSync must not reshape a replica another sync is filling.
    let err = c
        .prepare_sync(pb::PrepareSyncRequest {
            layers: vec![],
            epoch: 3,
            include_head: true,
            session: first.session,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("superseded"), "{err:?}");
    let err = c
        .finish_sync(pb::FinishSyncRequest {
            epoch: 3,
            session: first.session,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("superseded"), "{err:?}");

    let mut current = Io::open(&mut c, 3).await;
    let resp = current.one(read_req(0, BS)).await;
    assert!(
        resp.payload.iter().all(|&b| b == 1),
        "a superseded stream changed data"
    );
    let resp = current.one(write_req(0, vec![4; BS as usize])).await;
    assert_eq!(status(&resp), pb::IoStatus::IoOk, "{}", resp.message);

    // The session survives a restart: numbers never repeat.
    drop((old, late, current));
    let dir = tmp.path().join("r");
    drop(r);
    let r = Replica::start(&dir, None, "uring");
    let mut c = r.client().await;
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.session, second.session, "the session is persisted");
    let third = c
        .open(pb::OpenRequest { epoch: 3 })
        .await
        .unwrap()
        .into_inner();
    assert!(third.session > second.session, "{second:?} then {third:?}");
}
