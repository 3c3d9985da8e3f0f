//! The StatefulSet flow end to end on real processes: a standalone driver
//! (node-1) joined by two node plugins (node-2, node-3), every call over
//! CSI exactly as the Kubernetes sidecars and kubelet make them.
//!
//! create (3 replicas on 3 nodes) → publish → stage ext4 → publish → write
//! files → snapshot → write more → restore the snapshot into a new volume
//! on another node and compare → kill a replica mid-write (its agent is
//! paused so nothing restarts it: the volume must be degraded, I/O must go
//! on) → resume the agent: the replica is restarted, re-added and rebuilt →
//! expand → tear everything down → nothing left behind.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use zebu_proto::csi as pb;

const MIB: i64 = 1 << 20;

async fn condition(ctl_ep: &str, volume: &str) -> (bool, String) {
    let mut ctl = controller(ctl_ep).await;
    let r = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: volume.into(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner();
    let c = r
        .status
        .and_then(|s| s.volume_condition)
        .expect("volume condition");
    (c.abnormal, c.message)
}

/// Polls the volume condition until `want(message)`.
async fn wait_condition(
    ctl_ep: &str,
    volume: &str,
    what: &str,
    want: impl Fn(bool, &str) -> bool,
) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (abnormal, msg) = condition(ctl_ep, volume).await;
        if want(abnormal, &msg) {
            return msg;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}; last condition: {msg}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn read_dir_files(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

/// The pid of the replica process of `volume` whose directory lies under `dir`.
fn replica_pid(dir: &Path, volume: &str) -> i32 {
    let pids: Vec<i32> = pids_mentioning(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("zebu-replica") && c.contains(volume)
                })
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "expected one replica of {volume} under {}: {pids:?}",
        dir.display()
    );
    pids[0]
}

#[test]
fn statefulset_flow_on_three_nodes() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = rt();

    let mut standalone =
        Driver::standalone(&root, "node-1", 1, &["--replica-replacement-delay", "600s"]);
    let ep = standalone.endpoint.clone();
    let mut n2 = Driver::node(&root, "node-2", &ep);
    let mut n3 = Driver::node(&root, "node-3", &ep);

    rt.block_on(async {
        let mut ctl = controller(&ep).await;
        // Wait until all three nodes registered (heartbeats).
        let vol = {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let r = ctl
                    .create_volume(pb::CreateVolumeRequest {
                        name: "data-0".into(),
                        capacity_range: Some(pb::CapacityRange {
                            required_bytes: 256 * MIB,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![mount_cap()],
                        parameters: HashMap::from([("numberOfReplicas".into(), "3".into())]),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) => break r.into_inner().volume.expect("volume"),
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && std::time::Instant::now() < end =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => panic!("CreateVolume: {s}"),
                }
            }
        };
        let placement = vol
            .volume_context
            .get(zebu_common::context::VOLUME_REPLICA_PLACEMENT)
            .cloned()
            .unwrap_or_default();
        let nodes: std::collections::BTreeSet<&str> = placement
            .split(',')
            .filter_map(|p| p.split(':').next())
            .collect();
        assert_eq!(
            nodes.into_iter().collect::<Vec<_>>(),
            vec!["node-1", "node-2", "node-3"],
            "placement {placement}"
        );
        let v = vol.volume_id.clone();

        // Attach on node-1 and write.
        let a = attach(&ep, &standalone, &v, &root).await;
        for i in 0..4u8 {
            write_file(
                &a.target.join(format!("f{i}")),
                &pattern(i, 300_000 + i as usize * 1000),
            );
        }
        let at_snapshot = read_dir_files(&a.target);
        let snap = ctl
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: v.clone(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert!(snap.ready_to_use);
        write_file(&a.target.join("after"), &pattern(99, 100_000));
        write_file(&a.target.join("f0"), &pattern(77, 5000));

        // Restore into a new volume and read it on node-2.
        let restored = ctl
            .create_volume(pb::CreateVolumeRequest {
                name: "restore-0".into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 256 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_cap()],
                volume_content_source: Some(pb::VolumeContentSource {
                    r#type: Some(pb::volume_content_source::Type::Snapshot(
                        pb::volume_content_source::SnapshotSource {
                            snapshot_id: snap.snapshot_id.clone(),
                        },
                    )),
                }),
                ..Default::default()
            })
            .await
            .expect("CreateVolume from snapshot")
            .into_inner()
            .volume
            .expect("volume");
        assert!(
            restored.content_source.is_some(),
            "content_source must be returned"
        );
        let b = attach(&ep, &n2, &restored.volume_id, &root).await;
        let mut got = read_dir_files(&b.target);
        got.remove("lost+found");
        assert_eq!(
            got.len(),
            at_snapshot.len(),
            "files: {:?}",
            got.keys().collect::<Vec<_>>()
        );
        for (k, data) in &at_snapshot {
            assert!(
                got.get(k) == Some(data),
                "file {k} differs from the snapshot-time copy"
            );
        }
        detach(&ep, &b).await;

        // Kill node-3's replica mid-write with its agent paused.
        let n3_dir = root.join("node-3");
        let victim = replica_pid(&n3_dir, &v);
        let agent3 = Pid::from_raw(n3.child.id() as i32);
        kill(agent3, Signal::SIGSTOP).expect("pause node-3's plugin");
        let target = a.target.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..40u8 {
                write_file(&target.join(format!("during-{i}")), &pattern(i, 64 * 1024));
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill the replica");
        writer.join().expect("writes go on while a replica is down");
        // Another write after the kill, certainly seen by the engine.
        write_file(&a.target.join("after-kill"), &pattern(5, 200_000));
        let msg = wait_condition(&ep, &v, "the volume to be degraded", |ab, m| {
            ab && m.starts_with("degraded")
        })
        .await;
        println!("while the replica is down: {msg}");
        kill(agent3, Signal::SIGCONT).expect("resume node-3's plugin");
        let msg = wait_condition(&ep, &v, "the rebuild to finish", |ab, m| {
            !ab && m.starts_with("healthy")
        })
        .await;
        println!("after the rebuild: {msg}");

        // Expand. ext4 cannot grow while mounted on this machine (online
        // resize needs CAP_SYS_RESOURCE, which its root lacks, and nbdfuse
        // fixes the device size at connect), so this plays the kubelet's
        // offline path: the pod goes away (unpublish), the volume stays
        // staged, the controller grows it, NodeExpandVolume grows the
        // device and the filesystem on the staging path, the pod comes back.
        let mut nd = common::node(&a.node_endpoint).await;
        nd.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: v.clone(),
            target_path: a.target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
        let before = nix::sys::statvfs::statvfs(&a.staging).expect("statvfs");
        let e = ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: v.clone(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 512 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("ControllerExpandVolume")
            .into_inner();
        assert_eq!(e.capacity_bytes, 512 * MIB);
        assert!(e.node_expansion_required);
        let grown = nd
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: v.clone(),
                volume_path: a.staging.display().to_string(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 512 * MIB,
                    limit_bytes: 0,
                }),
                staging_target_path: a.staging.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("NodeExpandVolume")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 512 * MIB);
        let after = nix::sys::statvfs::statvfs(&a.staging).expect("statvfs");
        let size = |s: &nix::sys::statvfs::Statvfs| s.blocks() * s.fragment_size();
        assert!(
            size(&after) > size(&before) + 200 * MIB as u64,
            "filesystem did not grow: {} -> {}",
            size(&before),
            size(&after)
        );
        let publish = ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: v.clone(),
                node_id: a.node_id.clone(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("ControllerPublishVolume (already published: same answer)")
            .into_inner();
        nd.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: v.clone(),
            publish_context: publish.publish_context,
            staging_target_path: a.staging.display().to_string(),
            target_path: a.target.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume after the expansion");
        // Data written before the expansion is intact, and the new room is usable.
        assert_eq!(
            std::fs::read(a.target.join("after-kill")).expect("read"),
            pattern(5, 200_000)
        );
        write_file(&a.target.join("big"), &pattern(3, 300 << 20));

        // Tear down.
        detach(&ep, &a).await;
        ctl.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
        for id in [v.clone(), restored.volume_id.clone()] {
            ctl.delete_volume(pb::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .expect("DeleteVolume");
        }
        let left = ctl
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner();
        assert!(left.entries.is_empty());
    });

    // No replica or engine processes, mounts or loop devices are left.
    let drivers = [
        standalone.child.id() as i32,
        n2.child.id() as i32,
        n3.child.id() as i32,
    ];
    assert_nothing_left(&root, &drivers);
    standalone.stop();
    n2.stop();
    n3.stop();
}
