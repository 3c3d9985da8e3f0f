//! Convergence after failures: a node that disappears has its replica
//! replaced elsewhere and rebuilt; a driver that is killed and restarted
//! finds its volumes still serving, adopts their processes and carries on.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use zebu_proto::csi as pb;

async fn get(ep: &str, volume: &str) -> pb::ControllerGetVolumeResponse {
    controller(ep)
        .await
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: volume.into(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner()
}

fn placement_nodes(v: &pb::Volume) -> Vec<String> {
    let mut n: Vec<String> = v
        .volume_context
        .get(zebu_common::context::VOLUME_REPLICA_PLACEMENT)
        .map(|p| {
            p.split(',')
                .filter_map(|x| x.split(':').next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

#[test]
fn a_replica_on_a_lost_node_is_replaced_elsewhere_and_rebuilt() {
    let _serial = serial();
    lost_node(&["--replica-replacement-delay", "1s"], None);
}

/// The nodes' heartbeat Leases in the Kubernetes variant.
const LEASE_NAMESPACE: &str = "default";
const LEASE_SECS: u64 = 6;
const REPLACEMENT_SECS: u64 = 4;

/// The same on the Kubernetes store, with every node registering itself and
/// renewing its Lease: the node is lost when its Lease expires, its replica
/// is replaced no earlier than the replacement delay after that, the
/// `ZebuVolume` says degraded then healthy, and Events say what happened.
#[test]
fn on_the_kubernetes_store_a_lost_node_shows_in_status_and_events() {
    let _serial = serial();
    let cluster = zebu_testkit::kube::cluster();
    clear_kube_store(&cluster.kubeconfig);
    lost_node(&[], Some(&cluster));
}

/// The PersistentVolumeClaim the Kubernetes variant's volume is for.
const CLAIM: &str = "lost-node-data";

/// Creates the claim (it stays Pending: no provisioner serves its class).
fn make_claim(cluster: &zebu_testkit::kube::Cluster) {
    let _ = zebu_testkit::run(
        &mut cluster.kubectl(&[
            "delete",
            "pvc",
            "-n",
            LEASE_NAMESPACE,
            CLAIM,
            "--ignore-not-found",
        ]),
        zebu_testkit::SHORT,
    );
    let manifest = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {CLAIM}\n  namespace: {LEASE_NAMESPACE}\n\
         spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: zebu-test-unserved\n\
         \x20 resources:\n    requests:\n      storage: 128Mi\n"
    );
    let path = std::env::temp_dir().join(format!("zebu-claim-{}.yaml", std::process::id()));
    std::fs::write(&path, manifest).expect("write the claim");
    zebu_testkit::run(
        &mut cluster.kubectl(&["apply", "-f", path.to_str().expect("UTF-8 path")]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
    let _ = std::fs::remove_file(path);
}

/// `renewTime` of `node`'s Lease, as a timestamp.
fn lease_renewed(cluster: &zebu_testkit::kube::Cluster, node: &str) -> Timestamp {
    let r = zebu_testkit::run(
        &mut cluster.kubectl(&[
            "get",
            "lease",
            "-n",
            LEASE_NAMESPACE,
            &zebu_csi::node_lease::lease_name(node),
            "-o",
            "jsonpath={.spec.renewTime}",
        ]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
    r.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("renewTime {:?}: {e}", r.stdout))
}

/// `kubectl get zebuvolume ID` field at `path`.
fn zv_field(cluster: &zebu_testkit::kube::Cluster, id: &str, path: &str) -> String {
    let r = zebu_testkit::run(
        &mut cluster.kubectl(&["get", "zebuvolume", id, "-o", &format!("jsonpath={path}")]),
        zebu_testkit::SHORT,
    );
    r.stdout.trim().to_owned()
}

/// An Event as the tests look at it.
struct Ev {
    reason: String,
    time: Option<Timestamp>,
    note: String,
}

/// The Events, in every namespace, that match the field `selector`.
fn events(cluster: &zebu_testkit::kube::Cluster, selector: &str) -> Vec<Ev> {
    let r = zebu_testkit::run(
        &mut cluster.kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            selector,
            "-o",
            "json",
        ]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
    let list: serde_json::Value = serde_json::from_str(&r.stdout).expect("kubectl's JSON");
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_owned();
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| Ev {
                    reason: text(e, "reason"),
                    time: text(e, "eventTime").parse().ok(),
                    note: text(e, "message"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The reasons of the Events about volume `id`.
fn event_reasons(cluster: &zebu_testkit::kube::Cluster, id: &str) -> Vec<String> {
    reasons(&events(cluster, &format!("involvedObject.name={id}")))
}

/// The reasons of the Events about the claim.
fn event_reasons_on_claim(cluster: &zebu_testkit::kube::Cluster) -> Vec<String> {
    reasons(&events(
        cluster,
        &format!("involvedObject.kind=PersistentVolumeClaim,involvedObject.name={CLAIM}"),
    ))
}

fn reasons(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.reason.clone()).collect()
}

/// When the `reason` Event about volume `id` was recorded, and its note.
fn event_of(cluster: &zebu_testkit::kube::Cluster, id: &str, reason: &str) -> (Timestamp, String) {
    let evs = events(
        cluster,
        &format!("involvedObject.name={id},reason={reason}"),
    );
    let e = evs
        .first()
        .unwrap_or_else(|| panic!("no {reason} Event about {id}"));
    (e.time.expect("the Event's eventTime"), e.note.clone())
}

fn lost_node(extra: &[&str], kube: Option<&zebu_testkit::kube::Cluster>) {
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = rt();
    // On Kubernetes every process gets the agents' token and the cluster's
    // store; the nodes register themselves and renew their Leases.
    let (lease, delay) = (format!("{LEASE_SECS}s"), format!("{REPLACEMENT_SECS}s"));
    let cluster_flags = match kube {
        Some(c) => cluster_flags(&root, &c.kubeconfig, LEASE_NAMESPACE),
        None => vec![],
    };
    let mut cluster_flags: Vec<&str> = cluster_flags.iter().map(String::as_str).collect();
    if kube.is_some() {
        cluster_flags.extend(["--node-lease-duration", lease.as_str()]);
    }
    let mut standalone_flags = cluster_flags.clone();
    standalone_flags.extend(extra);
    if kube.is_some() {
        standalone_flags.extend(["--replica-replacement-delay", delay.as_str()]);
    }
    let standalone = Driver::standalone(&root, "node-1", 1, &standalone_flags);
    let ep = standalone.endpoint.clone();
    let mut others: Vec<Driver> = ["node-2", "node-3", "node-4"]
        .iter()
        .map(|n| match kube {
            Some(_) => Driver::node_joining(&root, n, &[], 1, &cluster_flags),
            None => Driver::node(&root, n, &ep),
        })
        .collect();

    rt.block_on(async {
        // Wait for all four nodes, then create a 3-replica volume.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let caps = controller(&ep)
                .await
                .get_capacity(pb::GetCapacityRequest {
                    parameters: HashMap::from([("numberOfReplicas".into(), "4".into())]),
                    ..Default::default()
                })
                .await
                .expect("GetCapacity")
                .into_inner();
            if caps.maximum_volume_size.unwrap_or(0) > 0 {
                break;
            }
            assert!(Instant::now() < end, "the node plugins did not register");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // On Kubernetes the volume is provisioned for a claim, as the
        // external-provisioner does with --extra-create-metadata.
        let claim_params: Vec<(&str, &str)> = match kube {
            Some(c) => {
                make_claim(c);
                vec![
                    ("csi.storage.k8s.io/pvc/name", CLAIM),
                    ("csi.storage.k8s.io/pvc/namespace", LEASE_NAMESPACE),
                ]
            }
            None => vec![],
        };
        let vol = create(&ep, "lost-node", 3, &claim_params).await;
        let v = vol.volume_id.clone();
        let before = placement_nodes(&vol);
        assert_eq!(before.len(), 3);
        let a = attach(&ep, &standalone, &v, &root).await;
        let target_path = a.target.clone();
        write_file(&target_path.join("a"), &pattern(1, 3 << 20));

        // Lose a node that holds a replica (not node-1, where the engine runs).
        let victim_name = before
            .iter()
            .find(|n| *n != "node-1")
            .expect("a replica off node-1")
            .clone();
        let idx = others
            .iter()
            .position(|d| d.node_id == victim_name)
            .expect("victim driver");
        let victim_dir = root.join(&victim_name);
        others[idx].kill();
        for pid in pids_mentioning(&victim_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // The victim's last renewal, now that it renews no more.
        let renewed = kube.map(|c| lease_renewed(c, &victim_name));
        // Writes go on with two replicas.
        write_file(&target_path.join("b"), &pattern(2, 2 << 20));
        if let Some(c) = kube {
            poll(
                "the ZebuVolume to say degraded",
                Duration::from_secs(120),
                || zv_field(c, &v, "{.status.condition}") == "degraded",
            );
        }

        // After the replacement delay the controller places a new replica on
        // the spare node and the engine rebuilds it.
        let end = Instant::now() + Duration::from_secs(180);
        let after = loop {
            let r = get(&ep, &v).await;
            let c = r
                .status
                .as_ref()
                .and_then(|s| s.volume_condition.clone())
                .expect("condition");
            let nodes = placement_nodes(r.volume.as_ref().expect("volume"));
            if !c.abnormal && !nodes.contains(&victim_name) && nodes.len() == 3 {
                println!("after the replacement: {} on {nodes:?}", c.message);
                break nodes;
            }
            assert!(
                Instant::now() < end,
                "no replacement: {} on {nodes:?}",
                c.message
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let spare: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
        assert_eq!(spare.len(), 1, "one new node: {before:?} -> {after:?}");
        assert_eq!(
            std::fs::read(target_path.join("a")).expect("read a"),
            pattern(1, 3 << 20)
        );
        assert_eq!(
            std::fs::read(target_path.join("b")).expect("read b"),
            pattern(2, 2 << 20)
        );
        if let Some(c) = kube {
            poll(
                "the ZebuVolume to say healthy",
                Duration::from_secs(120),
                || zv_field(c, &v, "{.status.condition}") == "healthy",
            );
            let nodes = zv_field(c, &v, "{.status.replicas[*].node}");
            assert!(!nodes.contains(victim_name.as_str()), "{nodes}");
            poll(
                "the events of the loss, replacement and rebuild",
                Duration::from_secs(60),
                || {
                    let reasons = event_reasons(c, &v);
                    ["ReplicaLost", "ReplicaReplaced", "Rebuilt"]
                        .iter()
                        .all(|r| reasons.iter().any(|x| x == r))
                },
            );
            // Replaced no earlier than the Lease's expiry plus the delay,
            // and the Event says why.
            let renewed = renewed.expect("renewTime read");
            let (replaced, note) = event_of(c, &v, "ReplicaReplaced");
            let earliest = renewed
                .checked_add(Duration::from_secs(LEASE_SECS + REPLACEMENT_SECS))
                .expect("timestamp");
            println!("lease renewed {renewed}, replaced {replaced}: {note}");
            assert!(
                replaced >= earliest,
                "replaced at {replaced}, before the lease's expiry plus the delay ({earliest})"
            );
            assert!(note.contains("lease expired"), "{note}");
            // The claim's user sees the same story on the claim.
            let on_claim = event_reasons_on_claim(c);
            for r in ["ReplicaLost", "ReplicaReplaced", "Rebuilt"] {
                assert!(
                    on_claim.iter().any(|x| x == r),
                    "{r} not on the claim: {on_claim:?}"
                );
            }

            // A block rots on a replica's disk (the filesystem frozen so it
            // cannot rewrite it): a scrub finds it and an Event says so.
            let engine = zv_field(c, &v, "{.status.engineAddress}");
            let live = after
                .iter()
                .find(|n| *n != "node-1")
                .expect("a replica off node-1");
            let frozen = Frozen::new(target_path.to_str().expect("UTF-8 path"));
            let rotten = corrupt_first_data_block(&root.join(live));
            let mut eng = zebu_proto::engine::engine_client::EngineClient::connect(format!(
                "http://{engine}"
            ))
            .await
            .expect("connect to the engine");
            let found = eng
                .scrub(zebu_proto::engine::ScrubRequest {
                    repair: false,
                    max_bytes_per_sec: 0,
                })
                .await
                .expect("Scrub")
                .into_inner();
            drop(frozen);
            let corrupt: u64 = found.replicas.iter().map(|r| r.corrupt_blocks).sum();
            assert_eq!(corrupt, 1, "{found:?} ({})", rotten.display());
            poll(
                "a ScrubFoundCorruption event on the volume and its claim",
                Duration::from_secs(60),
                || {
                    event_reasons(c, &v)
                        .iter()
                        .any(|r| r == "ScrubFoundCorruption")
                        && event_reasons_on_claim(c)
                            .iter()
                            .any(|r| r == "ScrubFoundCorruption")
                },
            );
        }
        detach_and_delete(&ep, &a).await;
    });
    // Nothing of the volume is left on the live nodes.
    let live: Vec<i32> = pids_mentioning(&root)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("zebu-replica"))
                .unwrap_or(false)
        })
        .collect();
    assert!(live.is_empty(), "replica processes left: {live:?}");
    drop(others);
}

#[test]
fn a_killed_driver_restarts_adopts_its_processes_and_volumes_keep_serving() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = rt();
    let mut first = Driver::standalone(&root, "solo", 3, &[]);
    let ep = first.endpoint.clone();
    let (v, a, ctx) = rt.block_on(async {
        let vol = create(&ep, "survivor", 3, &[]).await;
        let a = attach(&ep, &first, &vol.volume_id, &root).await;
        write_file(&a.target.join("before"), &pattern(3, 1 << 20));
        let ctx = a.publish_context.clone();
        (vol.volume_id, a, ctx)
    });
    let engines_before = pids_mentioning(&root);

    // The whole driver dies; the volume keeps serving its mount.
    first.kill();
    write_file(&a.target.join("while-down"), &pattern(4, 1 << 20));

    let second = Driver::standalone(&root, "solo", 3, &[]);
    rt.block_on(async {
        let r = get(&ep, &v).await;
        let c = r
            .status
            .and_then(|s| s.volume_condition)
            .expect("condition");
        assert!(!c.abnormal, "{}", c.message);
        // Publishing again is idempotent and names the same engine.
        let again = controller(&ep)
            .await
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: v.clone(),
                node_id: "solo".into(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("ControllerPublishVolume after the restart")
            .into_inner()
            .publish_context;
        assert_eq!(again, ctx);
    });
    // The replica and engine processes are the same ones (adopted, not restarted).
    let mut after = pids_mentioning(&root);
    after.retain(|p| *p != second.child.id() as i32);
    for p in engines_before
        .iter()
        .filter(|p| **p != first.child.id() as i32)
    {
        assert!(
            after.contains(p),
            "process {p} was not adopted: before {engines_before:?}, after {after:?}"
        );
    }
    assert_eq!(
        std::fs::read(a.target.join("before")).expect("read"),
        pattern(3, 1 << 20)
    );
    assert_eq!(
        std::fs::read(a.target.join("while-down")).expect("read"),
        pattern(4, 1 << 20)
    );
    // The restarted driver serves the same socket; the node record it
    // persisted lets it unstage what the first process staged.
    assert_eq!(a.node_endpoint, second.endpoint);
    rt.block_on(detach_and_delete(&ep, &a));
    let left: Vec<i32> = pids_mentioning(&root)
        .into_iter()
        .filter(|p| *p != second.child.id() as i32)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        mounts_under(&root).is_empty(),
        "mounts left: {:?}",
        mounts_under(&root)
    );
}
