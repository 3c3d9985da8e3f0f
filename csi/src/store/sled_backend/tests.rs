//! Sled-specific tests; what every backend must do is the conformance
//! suite in `csi/tests/store_conformance/`.

use super::*;
use crate::store::{
    AccessType, Attachment, ContentSource, DiskRecord, ReplicaRecord, ReplicaState, Store,
    VolumeStatus,
};

fn volume(id: &str, name: &str) -> VolumeRecord {
    VolumeRecord {
        name: name.to_owned(),
        id: id.to_owned(),
        size_bytes: 1 << 30,
        num_replicas: 3,
        fs_type: Some("ext4".to_owned()),
        access_type: AccessType::Mount,
        content_source: ContentSource::Snapshot("snap-1".to_owned()),
        replicas: vec![ReplicaRecord {
            id: "r-1".to_owned(),
            node: "node-a".to_owned(),
            disk: "/var/lib/zebu/disk0".to_owned(),
            dir: "/var/lib/zebu/disk0/r-1".to_owned(),
            address: "127.0.0.11:7001".to_owned(),
            state: ReplicaState::Ready,
        }],
        attachment: Some(Attachment {
            node: "node-b".to_owned(),
            engine_address: "127.0.0.12:7100".to_owned(),
            nbd_socket: "/run/zebu/vol.sock".to_owned(),
            file: "/run/zebu/vol.sock.file/disk".to_owned(),
            epoch: 7,
            readonly: false,
        }),
        created_unix: 1_700_000_000,
        status: VolumeStatus::Ready,
        claim: None,
    }
}

fn snapshot(id: &str) -> SnapshotRecord {
    SnapshotRecord {
        id: id.to_owned(),
        name: format!("snapshot-for-{id}"),
        source_volume: "vol-1".to_owned(),
        size_bytes: 1 << 30,
        created_unix: 1_700_000_100,
        ready: true,
    }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        node_id: id.to_owned(),
        address: "10.0.0.1:7000".to_owned(),
        disks: vec![DiskRecord {
            path: "/var/lib/zebu/disk0".to_owned(),
            capacity_bytes: 100 << 30,
            free_bytes: 40 << 30,
        }],
        last_heartbeat_unix: 1_700_000_200,
    }
}

#[test]
fn second_open_of_the_same_directory_is_a_backend_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SledStore::open(dir.path()).unwrap();
    match SledStore::open(dir.path()) {
        Err(StoreError::Backend(msg)) => {
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}")
        }
        Err(other) => panic!("expected Backend, got {other:?}"),
        Ok(_) => panic!("opened a locked store twice"),
    }
}

#[test]
fn corrupt_value_is_reported_with_its_key() {
    let s = SledStore::temporary().unwrap();
    s.put_volume(&volume("vol-a", "pvc-a"), None).unwrap();
    s.volumes.insert("vol-b", &b"{not json"[..]).unwrap();

    let err = s.get_volume("vol-b").unwrap_err();
    match &err {
        StoreError::Corrupt { key, reason } => {
            assert_eq!(key, "volumes/vol-b");
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains("\"volumes/vol-b\""), "{err}");
    // Listing refuses rather than silently skipping it.
    assert!(matches!(
        s.list_volumes(),
        Err(StoreError::Corrupt { ref key, .. }) if key == "volumes/vol-b"
    ));
    // Writes guarded by a version cannot read one either.
    assert!(matches!(
        s.put_volume(&volume("vol-b", "pvc-b"), None),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.delete_volume("vol-b", Some(1)),
        Err(StoreError::Corrupt { .. })
    ));
    // The healthy record is untouched, and an unconditional delete clears
    // the bad one.
    assert!(s.get_volume("vol-a").unwrap().is_some());
    s.delete_volume("vol-b", None).unwrap();
    assert_eq!(s.list_volumes().unwrap().len(), 1);
}

#[test]
fn record_filed_under_the_wrong_key_is_corrupt() {
    let s = SledStore::temporary().unwrap();
    s.put_snapshot(&snapshot("snap-1"), None).unwrap();
    let raw = s.snapshots.get("snap-1").unwrap().unwrap();
    s.snapshots.insert("snap-2", raw).unwrap();
    assert!(matches!(
        s.get_snapshot("snap-2"),
        Err(StoreError::Corrupt { ref key, ref reason })
            if key == "snapshots/snap-2" && reason.contains("snap-1")
    ));
}

#[test]
fn well_formed_json_of_the_wrong_shape_is_corrupt() {
    let s = SledStore::temporary().unwrap();
    s.nodes
        .insert("n", &br#"{"version": 4, "record": {"node_id": "n"}}"#[..])
        .unwrap();
    assert!(matches!(
        s.get_node("n"),
        Err(StoreError::Corrupt { ref key, .. }) if key == "nodes/n"
    ));
    // The version is still readable, so a versioned overwrite repairs it.
    s.put_node(&node("n"), Some(4)).unwrap();
    assert_eq!(s.get_node("n").unwrap().unwrap().value, node("n"));
}

#[test]
fn stored_json_shape_is_pinned() {
    // The CR backend and older binaries read this shape: change it only with
    // a migration.
    let s = SledStore::temporary().unwrap();
    let mut v = volume("vol-1", "pvc-1");
    v.replicas.clear();
    v.attachment = None;
    let version = s.put_volume(&v, None).unwrap();
    let raw = s.volumes.get("vol-1").unwrap().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": version,
            "record": {
                "name": "pvc-1",
                "id": "vol-1",
                "size_bytes": 1u64 << 30,
                "num_replicas": 3,
                "fs_type": "ext4",
                "access_type": "mount",
                "content_source": {"kind": "snapshot", "id": "snap-1"},
                "replicas": [],
                "attachment": null,
                "created_unix": 1_700_000_000,
                "status": "ready",
            }
        })
    );
    let none = serde_json::to_value(ContentSource::None).unwrap();
    assert_eq!(none, serde_json::json!({"kind": "none"}));
}
