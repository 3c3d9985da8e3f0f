//! The state store's conformance suite: what every backend of
//! `zebu_csi::store::Store` must do (versions, conflicts, lists, restarts),
//! run against the sled backend (`store_sled.rs`) and the custom-resource
//! backend on a real API server (`store_kube.rs`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use zebu_csi::store::{
    AccessType, Attachment, ContentSource, DiskRecord, Kind, NodeRecord, ReplicaRecord,
    ReplicaState, Result, SnapshotRecord, Store, StoreError, Versioned, VolumeRecord, VolumeStatus,
};

/// A backend under test.
pub trait Harness {
    /// An empty store.
    fn fresh(&self) -> Box<dyn Store>;
    /// A new handle on the store [`Harness::fresh`] last made, as after a
    /// restart (the previous handle is dropped first).
    fn reopen(&self) -> Box<dyn Store>;
}

/// Runs every conformance test against `h`, `cases` model sequences.
pub fn run_all(h: &dyn Harness, cases: u32) {
    crud_round_trips_every_kind(h);
    kinds_are_separate_namespaces(h);
    create_of_existing_object_conflicts(h);
    two_writers_from_the_same_read_one_conflicts(h);
    update_or_delete_of_missing_object(h);
    version_of_a_deleted_object_does_not_match_its_successor(h);
    concurrent_read_modify_write_loses_no_update(h);
    lists_are_sorted_by_key_and_stable(h);
    volume_by_name_finds_the_right_one(h);
    empty_keys_are_refused(h);
    reopened_store_has_everything(h);
    behaves_like_a_versioned_map(h, cases);
}

pub fn volume(id: &str, name: &str) -> VolumeRecord {
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

pub fn snapshot(id: &str) -> SnapshotRecord {
    SnapshotRecord {
        id: id.to_owned(),
        name: format!("snapshot-for-{id}"),
        source_volume: "vol-1".to_owned(),
        size_bytes: 1 << 30,
        created_unix: 1_700_000_100,
        ready: true,
    }
}

pub fn node(id: &str) -> NodeRecord {
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

/// Conformance: crud round trips every kind.
pub fn crud_round_trips_every_kind(h: &dyn Harness) {
    let s = h.fresh();

    assert_eq!(s.get_volume("vol-1").unwrap(), None);
    let v1 = s.put_volume(&volume("vol-1", "pvc-1"), None).unwrap();
    let got = s.get_volume("vol-1").unwrap().unwrap();
    assert_eq!(got.version, v1);
    assert_eq!(got.value, volume("vol-1", "pvc-1"));
    let mut changed = got.value.clone();
    changed.status = VolumeStatus::Deleting;
    changed.attachment = None;
    let v2 = s.put_volume(&changed, Some(v1)).unwrap();
    assert_ne!(v1, v2);
    assert_eq!(
        s.get_volume("vol-1").unwrap(),
        Some(Versioned {
            version: v2,
            value: changed
        })
    );
    s.delete_volume("vol-1", Some(v2)).unwrap();
    assert_eq!(s.get_volume("vol-1").unwrap(), None);

    let sv = s.put_snapshot(&snapshot("snap-1"), None).unwrap();
    assert_eq!(
        s.get_snapshot("snap-1").unwrap().unwrap(),
        Versioned {
            version: sv,
            value: snapshot("snap-1")
        }
    );
    assert_eq!(s.list_snapshots().unwrap().len(), 1);
    s.delete_snapshot("snap-1", None).unwrap();
    assert!(s.list_snapshots().unwrap().is_empty());

    let nv = s.put_node(&node("node-a"), None).unwrap();
    assert_eq!(s.get_node("node-a").unwrap().unwrap().version, nv);
    assert_eq!(s.list_nodes().unwrap()[0].value, node("node-a"));
    s.delete_node("node-a", Some(nv)).unwrap();
    assert_eq!(s.get_node("node-a").unwrap(), None);
}

/// Conformance: kinds are separate namespaces.
pub fn kinds_are_separate_namespaces(h: &dyn Harness) {
    let s = h.fresh();
    s.put_volume(&volume("same", "pvc"), None).unwrap();
    s.put_snapshot(&snapshot("same"), None).unwrap();
    s.put_node(&node("same"), None).unwrap();
    s.delete_snapshot("same", None).unwrap();
    assert!(s.get_volume("same").unwrap().is_some());
    assert!(s.get_node("same").unwrap().is_some());
}

/// Conformance: create of existing object conflicts.
pub fn create_of_existing_object_conflicts(h: &dyn Harness) {
    let s = h.fresh();
    let v = s.put_node(&node("n"), None).unwrap();
    let err = s.put_node(&node("n"), None).unwrap_err();
    match err {
        StoreError::Conflict {
            kind,
            key,
            expected,
            actual,
        } => {
            assert_eq!(kind, Kind::Node);
            assert_eq!(key, "n");
            assert_eq!(expected, None);
            assert_eq!(actual, Some(v));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
}

/// Conformance: two writers from the same read one conflicts.
pub fn two_writers_from_the_same_read_one_conflicts(h: &dyn Harness) {
    let s = h.fresh();
    s.put_volume(&volume("vol-1", "pvc-1"), None).unwrap();

    // Both read the same version...
    let a = s.get_volume("vol-1").unwrap().unwrap();
    let b = s.get_volume("vol-1").unwrap().unwrap();
    // ...A writes first and wins...
    let mut a_rec = a.value.clone();
    a_rec.num_replicas = 2;
    let a_new = s.put_volume(&a_rec, Some(a.version)).unwrap();
    // ...B's write is refused and changes nothing.
    let mut b_rec = b.value.clone();
    b_rec.num_replicas = 5;
    let err = s.put_volume(&b_rec, Some(b.version)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict { expected: Some(e), actual: Some(act), .. }
                if e == b.version && act == a_new
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("re-read it and retry"), "{err}");
    let now = s.get_volume("vol-1").unwrap().unwrap();
    assert_eq!(now.version, a_new);
    assert_eq!(now.value.num_replicas, 2);
    // A stale delete is refused too.
    assert!(matches!(
        s.delete_volume("vol-1", Some(b.version)),
        Err(StoreError::Conflict { .. })
    ));
    assert!(s.get_volume("vol-1").unwrap().is_some());
}

/// Conformance: update or delete of missing object.
pub fn update_or_delete_of_missing_object(h: &dyn Harness) {
    let s = h.fresh();
    assert!(matches!(
        s.put_snapshot(&snapshot("gone"), Some(3)),
        Err(StoreError::Conflict {
            expected: Some(3),
            actual: None,
            ..
        })
    ));
    let err = s.delete_snapshot("gone", None).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { kind: Kind::Snapshot, ref key } if key == "gone"));
    assert_eq!(err.to_string(), "snapshot \"gone\" does not exist");
    assert!(matches!(
        s.delete_snapshot("gone", Some(1)),
        Err(StoreError::NotFound { .. })
    ));
}

/// Conformance: version of a deleted object does not match its successor.
pub fn version_of_a_deleted_object_does_not_match_its_successor(h: &dyn Harness) {
    let s = h.fresh();
    let old = s.put_node(&node("n"), None).unwrap();
    s.delete_node("n", None).unwrap();
    let new = s.put_node(&node("n"), None).unwrap();
    assert_ne!(old, new);
    assert!(matches!(
        s.put_node(&node("n"), Some(old)),
        Err(StoreError::Conflict { .. })
    ));
}

/// Conformance: concurrent read modify write loses no update.
pub fn concurrent_read_modify_write_loses_no_update(h: &dyn Harness) {
    let s: Arc<dyn Store> = Arc::from(h.fresh());
    let mut n = node("n");
    n.last_heartbeat_unix = 0;
    s.put_node(&n, None).unwrap();
    const THREADS: i64 = 8;
    const EACH: i64 = 25;
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut conflicts = 0u32;
                for _ in 0..EACH {
                    loop {
                        let cur = s.get_node("n").unwrap().unwrap();
                        let mut rec = cur.value;
                        rec.last_heartbeat_unix += 1;
                        match s.put_node(&rec, Some(cur.version)) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        s.get_node("n").unwrap().unwrap().value.last_heartbeat_unix,
        THREADS * EACH
    );
}

/// Conformance: lists are sorted by key and stable.
pub fn lists_are_sorted_by_key_and_stable(h: &dyn Harness) {
    let s = h.fresh();
    for id in ["vol-c", "vol-a", "vol-e", "vol-b", "vol-d"] {
        s.put_volume(&volume(id, &format!("pvc-{id}")), None)
            .unwrap();
    }
    let ids = |s: &dyn Store| -> Vec<String> {
        s.list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.value.id)
            .collect()
    };
    let first = ids(&*s);
    assert_eq!(first, ["vol-a", "vol-b", "vol-c", "vol-d", "vol-e"]);
    // Updating records does not reorder them.
    let c = s.get_volume("vol-c").unwrap().unwrap();
    s.put_volume(&c.value, Some(c.version)).unwrap();
    assert_eq!(ids(&*s), first);
}

/// Conformance: volume by name finds the right one.
pub fn volume_by_name_finds_the_right_one(h: &dyn Harness) {
    let s = h.fresh();
    s.put_volume(&volume("vol-1", "pvc-one"), None).unwrap();
    let v2 = s.put_volume(&volume("vol-2", "pvc-two"), None).unwrap();
    let found = s.volume_by_name("pvc-two").unwrap().unwrap();
    assert_eq!(found.version, v2);
    assert_eq!(found.value.id, "vol-2");
    assert_eq!(s.volume_by_name("pvc-three").unwrap(), None);
}

/// Conformance: empty keys are refused.
pub fn empty_keys_are_refused(h: &dyn Harness) {
    let s = h.fresh();
    assert!(matches!(s.get_volume(""), Err(StoreError::Invalid(_))));
    assert!(matches!(
        s.put_node(&node(""), None),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.delete_snapshot("", None),
        Err(StoreError::Invalid(_))
    ));
}

/// Conformance: a new handle on the store (a restart) has everything.
pub fn reopened_store_has_everything(h: &dyn Harness) {
    let (vv, sv, nv);
    {
        let s = h.fresh();
        vv = s.put_volume(&volume("vol-1", "pvc-1"), None).unwrap();
        sv = s.put_snapshot(&snapshot("snap-1"), None).unwrap();
        nv = s.put_node(&node("node-a"), None).unwrap();
        s.put_node(&node("node-b"), None).unwrap();
        s.delete_node("node-b", None).unwrap();
    }
    let s = h.reopen();
    assert_eq!(
        s.get_volume("vol-1").unwrap(),
        Some(Versioned {
            version: vv,
            value: volume("vol-1", "pvc-1")
        })
    );
    assert_eq!(
        s.list_snapshots().unwrap(),
        vec![Versioned {
            version: sv,
            value: snapshot("snap-1")
        }]
    );
    assert_eq!(
        s.list_nodes().unwrap(),
        vec![Versioned {
            version: nv,
            value: node("node-a")
        }]
    );
    // Versions stay unique across restarts.
    let after = s.put_node(&node("node-b"), None).unwrap();
    assert!(![vv, sv, nv].contains(&after));
}

// --- model-based property test ------------------------------------------

/// What a write expects to find.
#[derive(Clone, Debug)]
enum Expect {
    /// `None`: create, or for deletes "any version".
    Absent,
    /// Whatever the model says is current (always right).
    Current,
    /// A version that is certainly not the current one.
    Wrong(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        kind: Kind,
        key: u8,
        payload: u32,
        expect: Expect,
    },
    Delete {
        kind: Kind,
        key: u8,
        expect: Expect,
    },
    Get {
        kind: Kind,
        key: u8,
    },
    List {
        kind: Kind,
    },
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Volume), Just(Kind::Snapshot), Just(Kind::Node)]
}

fn expect_strategy() -> impl Strategy<Value = Expect> {
    prop_oneof![
        Just(Expect::Absent),
        Just(Expect::Current),
        (0u64..3).prop_map(Expect::Wrong),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (kind_strategy(), 0u8..4, any::<u32>(), expect_strategy()).prop_map(
            |(kind, key, payload, expect)| Op::Put { kind, key, payload, expect }
        ),
        2 => (kind_strategy(), 0u8..4, expect_strategy())
            .prop_map(|(kind, key, expect)| Op::Delete { kind, key, expect }),
        2 => (kind_strategy(), 0u8..4).prop_map(|(kind, key)| Op::Get { kind, key }),
        1 => kind_strategy().prop_map(|kind| Op::List { kind }),
    ]
}

fn key_name(key: u8) -> String {
    format!("k{key}")
}

/// Put a record of `kind` whose only varying field is `payload`.
fn put(s: &dyn Store, kind: Kind, key: &str, payload: u32, expected: Option<u64>) -> Result<u64> {
    match kind {
        Kind::Volume => {
            let mut r = volume(key, "pvc");
            r.size_bytes = payload.into();
            s.put_volume(&r, expected)
        }
        Kind::Snapshot => {
            let mut r = snapshot(key);
            r.size_bytes = payload.into();
            s.put_snapshot(&r, expected)
        }
        Kind::Node => {
            let mut r = node(key);
            r.last_heartbeat_unix = payload.into();
            s.put_node(&r, expected)
        }
    }
}

fn delete(s: &dyn Store, kind: Kind, key: &str, expected: Option<u64>) -> Result<()> {
    match kind {
        Kind::Volume => s.delete_volume(key, expected),
        Kind::Snapshot => s.delete_snapshot(key, expected),
        Kind::Node => s.delete_node(key, expected),
    }
}

/// Every record of `kind` as (key, version, payload), in list order.
fn list(s: &dyn Store, kind: Kind) -> Vec<(String, u64, u32)> {
    fn p(x: impl TryInto<u32>) -> u32 {
        x.try_into().ok().expect("payload fits u32")
    }
    match kind {
        Kind::Volume => s
            .list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| (v.value.id, v.version, p(v.value.size_bytes)))
            .collect(),
        Kind::Snapshot => s
            .list_snapshots()
            .unwrap()
            .into_iter()
            .map(|v| (v.value.id, v.version, p(v.value.size_bytes)))
            .collect(),
        Kind::Node => s
            .list_nodes()
            .unwrap()
            .into_iter()
            .map(|v| (v.value.node_id, v.version, p(v.value.last_heartbeat_unix)))
            .collect(),
    }
}

fn get(s: &dyn Store, kind: Kind, key: &str) -> Option<(u64, u32)> {
    list(s, kind)
        .into_iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, v, p)| (v, p))
        .inspect(|&(v, _)| {
            // And the point read agrees with the listing.
            let direct = match kind {
                Kind::Volume => s.get_volume(key).unwrap().map(|r| r.version),
                Kind::Snapshot => s.get_snapshot(key).unwrap().map(|r| r.version),
                Kind::Node => s.get_node(key).unwrap().map(|r| r.version),
            };
            assert_eq!(direct, Some(v));
        })
}

type Model = BTreeMap<(Kind, String), (u64, u32)>;

fn model_list(model: &Model, kind: Kind) -> Vec<(String, u64, u32)> {
    model
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .map(|((_, key), &(v, p))| (key.clone(), v, p))
        .collect()
}

/// Conformance: random sequences of operations behave like a versioned
/// map (the model), and survive a reopen; `cases` sequences.
pub fn behaves_like_a_versioned_map(h: &dyn Harness, cases: u32) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(op_strategy(), 1..40), |ops| {
        let s = h.fresh();
        let mut model = Model::new();
        let mut issued = HashSet::new();
        let resolve = |expect: &Expect, current: Option<u64>| match expect {
            Expect::Absent => None,
            Expect::Current => current,
            Expect::Wrong(n) => Some(current.unwrap_or(0) + 1 + n),
        };

        for op in &ops {
            match op {
                Op::Put {
                    kind,
                    key,
                    payload,
                    expect,
                } => {
                    let key = key_name(*key);
                    let current = model.get(&(*kind, key.clone())).map(|e| e.0);
                    let expected = resolve(expect, current);
                    match put(&*s, *kind, &key, *payload, expected) {
                        Ok(v) => {
                            prop_assert_eq!(expected, current);
                            prop_assert!(issued.insert(v), "version {} issued twice", v);
                            model.insert((*kind, key), (v, *payload));
                        }
                        Err(StoreError::Conflict {
                            expected: e,
                            actual,
                            ..
                        }) => {
                            prop_assert_ne!(expected, current);
                            prop_assert_eq!(e, expected);
                            prop_assert_eq!(actual, current);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {}", other),
                    }
                }
                Op::Delete { kind, key, expect } => {
                    let key = key_name(*key);
                    let current = model.get(&(*kind, key.clone())).map(|e| e.0);
                    let expected = resolve(expect, current);
                    match delete(&*s, *kind, &key, expected) {
                        Ok(()) => {
                            prop_assert!(current.is_some());
                            prop_assert!(expected.is_none() || expected == current);
                            model.remove(&(*kind, key));
                        }
                        Err(StoreError::NotFound { .. }) => prop_assert!(current.is_none()),
                        Err(StoreError::Conflict { actual, .. }) => {
                            prop_assert!(current.is_some());
                            prop_assert!(expected.is_some() && expected != current);
                            prop_assert_eq!(actual, current);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {}", other),
                    }
                }
                Op::Get { kind, key } => {
                    let key = key_name(*key);
                    prop_assert_eq!(get(&*s, *kind, &key), model.get(&(*kind, key)).copied());
                }
                Op::List { kind } => {
                    prop_assert_eq!(list(&*s, *kind), model_list(&model, *kind));
                }
            }
        }

        // Everything survives a restart.
        drop(s);
        let s = h.reopen();
        for kind in Kind::ALL {
            prop_assert_eq!(list(&*s, kind), model_list(&model, kind));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// One `#[test]` per conformance test, against the harness `$h` (an
/// expression), with `$cases` model sequences, each holding `$guard` (an
/// expression evaluated first, kept for the test's length).
#[macro_export]
macro_rules! conformance_tests {
    ($h:expr, $cases:expr, $guard:expr) => {
        conformance_tests!(@each $h, $guard;
            crud_round_trips_every_kind,
            kinds_are_separate_namespaces,
            create_of_existing_object_conflicts,
            two_writers_from_the_same_read_one_conflicts,
            update_or_delete_of_missing_object,
            version_of_a_deleted_object_does_not_match_its_successor,
            concurrent_read_modify_write_loses_no_update,
            lists_are_sorted_by_key_and_stable,
            volume_by_name_finds_the_right_one,
            empty_keys_are_refused,
            reopened_store_has_everything
        );
        #[test]
        fn behaves_like_a_versioned_map() {
            let _guard = $guard;
            store_conformance::behaves_like_a_versioned_map(&$h, $cases);
        }
    };
    (@each $h:expr, $guard:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let _guard = $guard;
                store_conformance::$name(&$h);
            }
        )*
    };
}
