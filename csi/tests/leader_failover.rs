//! Two controllers on the Kubernetes store elect a leader on a Lease of the
//! real API server (the test cluster); the follower refuses mutating calls
//! with UNAVAILABLE, or with `--forward-listen` relays them to the leader. The leader is SIGKILLed while volumes are being
//! created: the follower takes over, every CreateVolume (retried as the CSI
//! sidecars retry) succeeds exactly once, no replica is left without its
//! volume, and `kubectl get zebuvolumes` shows them healthy. The node
//! agent's API refuses callers without the controllers' bearer token; the
//! node registers itself in the cluster (its `ZebuNode`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use zebu_csi::store::{KubeStore, Store};
use zebu_proto::csi as pb;
use zebu_testkit::kube::Cluster;
use zebu_testkit::{DEADLINE, SHORT, run};

const MIB: i64 = 1 << 20;
const NAMESPACE: &str = "default";
const LEASE: &str = "zebu-csi-controller";
const VOLUMES: usize = 6;

fn holder(cluster: &Cluster) -> String {
    let r = run(
        &mut cluster.kubectl(&[
            "get",
            "lease",
            LEASE,
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
            "--ignore-not-found",
        ]),
        SHORT,
    )
    .expect_ok();
    r.stdout.trim().to_owned()
}

fn request(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 64 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: HashMap::from([("numberOfReplicas".into(), "2".into())]),
        ..Default::default()
    }
}

/// CreateVolume `name` until it succeeds, against whichever endpoint
/// answers, as a sidecar of each controller would: UNAVAILABLE, ABORTED and
/// a dead socket mean "try again".
async fn create_until_done(endpoints: &[String], name: &str) -> pb::Volume {
    let end = Instant::now() + DEADLINE * 2;
    let mut i = 0;
    let mut last = None;
    loop {
        assert!(
            Instant::now() < end,
            "CreateVolume {name} never succeeded; last answer: {last:?}"
        );
        let ep = &endpoints[i % endpoints.len()];
        i += 1;
        let Ok(ch) = zebu_common::grpc::connect(ep).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut c = pb::controller_client::ControllerClient::new(ch);
        match c.create_volume(request(name)).await {
            Ok(r) => return r.into_inner().volume.expect("a volume"),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::Unknown
                ) =>
            {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => panic!("CreateVolume {name} on {ep}: {s:?}"),
        }
    }
}

/// The test cluster with an empty store and no controller Lease.
fn fresh_cluster() -> Cluster {
    let cluster = zebu_testkit::kube::cluster();
    clear_kube_store(&cluster.kubeconfig);
    run(
        &mut cluster.kubectl(&[
            "delete",
            "lease",
            LEASE,
            "-n",
            NAMESPACE,
            "--ignore-not-found",
        ]),
        SHORT,
    )
    .expect_ok();
    cluster
}

/// Replica directories under the node's disks: (volume id, replica id).
fn replica_dirs(node_dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for disk in std::fs::read_dir(node_dir).into_iter().flatten().flatten() {
        let vols = disk.path().join("replicas");
        for v in std::fs::read_dir(&vols).into_iter().flatten().flatten() {
            for r in std::fs::read_dir(v.path()).into_iter().flatten().flatten() {
                out.push((
                    v.file_name().to_string_lossy().into_owned(),
                    r.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_follower_takes_over_and_every_volume_is_created_once() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let cluster = fresh_cluster();
    let tmp = zebu_testkit::tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = zebu_testkit::runtime();
    // What every process of the cluster is given: the node agent's API is
    // protected, the controllers present the token.
    let cluster_flags = cluster_flags(&root, &cluster.kubeconfig, NAMESPACE);
    let cluster_flags: Vec<&str> = cluster_flags.iter().map(String::as_str).collect();
    let start_controller = |id: &str| {
        let mut flags = cluster_flags.clone();
        flags.extend([
            "--leader-election-identity",
            id,
            "--reconcile-interval",
            "1s",
        ]);
        Driver::controller(&root, id, &flags)
    };
    let mut ctl: BTreeMap<String, Driver> = BTreeMap::new();
    for id in ["ctl-a", "ctl-b"] {
        ctl.insert(id.into(), start_controller(id));
    }
    let endpoints: Vec<String> = ctl.values().map(|d| d.endpoint.clone()).collect();
    // The node registers itself in the cluster (its ZebuNode), not through
    // a controller's socket: whichever controller leads finds it there.
    let node = Driver::node_joining(&root, "node-x", &[], 3, &cluster_flags);
    let agent_addr = node
        .ready
        .rsplit_once("agent ")
        .map(|(_, a)| a.trim().to_owned())
        .expect("the node's ready line names its agent");

    // The agent refuses callers without the token; the controllers (below)
    // hold it and are served.
    for presented in [None, Some("zebu-test-token-0123456789-wrong")] {
        let st = rt.block_on(async {
            let ch = zebu_common::grpc::connect(&agent_addr)
                .await
                .expect("agent channel");
            let token = presented.map(|t| zebu_common::auth::Token::parse(t).expect("token"));
            let mut c = zebu_proto::agent::agent_client::AgentClient::with_interceptor(
                ch,
                zebu_common::auth::Present(token),
            );
            c.list_replicas(zebu_proto::agent::ListReplicasRequest {})
                .await
        });
        let st = st.expect_err("the agent served a caller without the token");
        assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    }

    // One of them leads; the other refuses mutating calls, naming it.
    poll("a leader", DEADLINE, || !holder(&cluster).is_empty());
    let leader = holder(&cluster);
    let follower = ctl
        .keys()
        .find(|k| **k != leader)
        .expect("a follower")
        .clone();
    let refused = rt.block_on(async {
        let mut c = controller(&ctl[&follower].endpoint).await;
        c.create_volume(request("refused")).await
    });
    let st = refused.expect_err("the follower created a volume");
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains(&leader), "{st:?}");

    // Create volumes; kill the leader once two exist.
    let names: Vec<String> = (0..VOLUMES).map(|i| format!("fo-{i}")).collect();
    let creator = {
        let (endpoints, names) = (endpoints.clone(), names.clone());
        std::thread::spawn(move || {
            zebu_testkit::runtime().block_on(async {
                let mut out = Vec::new();
                for n in &names {
                    out.push(create_until_done(&endpoints, n).await);
                }
                out
            })
        })
    };
    let store = KubeStore::connect(Some(&cluster.kubeconfig)).expect("store");
    poll("two volumes", DEADLINE * 2, || {
        store.list_volumes().map(|v| v.len() >= 2).unwrap_or(false)
    });
    ctl.get_mut(&leader).expect("leader").kill();
    let killed = Instant::now();
    poll("the follower to take over", DEADLINE, || {
        holder(&cluster) == follower
    });
    let takeover = killed.elapsed();
    eprintln!("takeover {takeover:?} after SIGKILL of the leader (lease 15 s)");
    assert!(
        takeover < Duration::from_secs(60),
        "the follower took {takeover:?} to take over a 15 s lease"
    );
    let created = creator.join().expect("the creating thread");

    // Each name exactly once, each Ready, each with its replicas.
    let vols = store.list_volumes().expect("list");
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for v in &vols {
        *by_name.entry(v.value.name.clone()).or_default() += 1;
    }
    assert_eq!(
        by_name.keys().cloned().collect::<Vec<_>>(),
        names,
        "volumes in the store: {by_name:?}"
    );
    assert!(by_name.values().all(|&n| n == 1), "duplicates: {by_name:?}");
    for v in &vols {
        assert_eq!(v.value.num_replicas, 2);
        assert!(
            created.iter().any(|c| c.volume_id == v.value.id),
            "{} was not what CreateVolume returned",
            v.value.id
        );
    }
    // No replica without its volume, once the new leader has cleaned up.
    let node_dir = root.join("node-x");
    poll("replica directories to match the records", DEADLINE, || {
        let vols = store.list_volumes().unwrap_or_default();
        let mut want: Vec<(String, String)> = vols
            .iter()
            .flat_map(|v| {
                v.value
                    .replicas
                    .iter()
                    .map(move |r| (v.value.id.clone(), r.id.clone()))
            })
            .collect();
        want.sort();
        replica_dirs(&node_dir) == want
    });
    // And kubectl shows them healthy.
    poll("every ZebuVolume healthy", DEADLINE, || {
        let r = run(
            &mut cluster.kubectl(&[
                "get",
                "zebuvolumes",
                "-o",
                "jsonpath={range .items[*]}{.status.condition}{\"\\n\"}{end}",
            ]),
            SHORT,
        )
        .expect_ok();
        let conds: Vec<&str> = r.stdout.lines().collect();
        conds.len() == VOLUMES && conds.iter().all(|c| *c == "healthy")
    });

    // Clean up through the new leader.
    rt.block_on(async {
        let mut c = controller(&ctl[&follower].endpoint).await;
        for v in &created {
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete");
        }
    });
    assert!(store.list_volumes().expect("list").is_empty());
}

#[test]
fn a_cluster_controller_without_an_agent_token_refuses_to_start() {
    let _serial = serial();
    let cluster = zebu_testkit::kube::cluster();
    let tmp = zebu_testkit::tempdir();
    let kc = cluster.kubeconfig.to_str().expect("UTF-8 path");
    let out = std::process::Command::new(csi_bin())
        .args(["controller", "--store", "kubernetes", "--kubeconfig", kc])
        .arg("--endpoint")
        .arg(format!("unix://{}", tmp.path().join("c.sock").display()))
        .arg("--state")
        .arg(tmp.path())
        .env_remove("ZEBU_AGENT_TOKEN_FILE")
        .output()
        .expect("run zebu-csi");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--agent-token-file"), "{stderr}");
}

/// With `--forward-listen`, a follower relays Controller calls to the
/// leader (at the address the leader published on the Lease) instead of
/// answering UNAVAILABLE, so a CSI sidecar whose own leader sits beside the
/// follower is served. The forwarding endpoint refuses callers without the
/// driver's token.
#[test]
fn a_follower_relays_controller_calls_to_the_leader() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let cluster = fresh_cluster();
    let tmp = zebu_testkit::tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = zebu_testkit::runtime();
    let flags = cluster_flags(&root, &cluster.kubeconfig, NAMESPACE);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ctl: BTreeMap<String, Driver> = BTreeMap::new();
    for id in ["fw-a", "fw-b"] {
        let mut f = flags.clone();
        f.extend([
            "--leader-election-identity",
            id,
            "--forward-listen",
            "127.0.0.1:0",
        ]);
        ctl.insert(id.into(), Driver::controller(&root, id, &f));
    }
    let _node = Driver::node_joining(&root, "node-fw", &[], 2, &flags);
    poll("a leader", DEADLINE, || !holder(&cluster).is_empty());
    let leader = holder(&cluster);
    let follower = ctl
        .keys()
        .find(|k| **k != leader)
        .expect("a follower")
        .clone();
    let address = run(
        &mut cluster.kubectl(&[
            "get",
            "lease",
            LEASE,
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.metadata.annotations.zebu\\.csi\\.dev/controller-address}",
        ]),
        SHORT,
    )
    .expect_ok()
    .stdout
    .trim()
    .to_owned();
    assert!(address.starts_with("127.0.0.1:"), "{address:?}");

    rt.block_on(async {
        // Through the follower's socket, as its pod's sidecars would call.
        let vol =
            create_until_done(std::slice::from_ref(&ctl[&follower].endpoint), "relayed").await;
        let mut c = controller(&ctl[&follower].endpoint).await;
        let listed = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes through the follower")
            .into_inner();
        assert!(
            listed.entries.iter().any(|e| e
                .volume
                .as_ref()
                .is_some_and(|v| v.volume_id == vol.volume_id)),
            "{listed:?}"
        );
        c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume through the follower");

        // The leader's forwarding endpoint wants the token.
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("address")
            .connect()
            .await
            .expect("connect to the forwarding endpoint");
        let st = pb::controller_client::ControllerClient::new(ch)
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect_err("the forwarding endpoint served a caller without the token");
        assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    });

    // A leader that stops answering (frozen here; dead with its address
    // still on the Lease in a cluster) does not stop a follower from
    // answering what every controller answers alike: a sidecar starting
    // beside it checks the capabilities within a second.
    let frozen = nix::unistd::Pid::from_raw(ctl[&leader].child.id() as i32);
    nix::sys::signal::kill(frozen, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let caps = rt.block_on(async {
        let mut c = controller(&ctl[&follower].endpoint).await;
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            c.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest::default()),
        )
        .await
    });
    nix::sys::signal::kill(frozen, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let caps = caps
        .expect("the follower relayed ControllerGetCapabilities to a frozen leader")
        .expect("ControllerGetCapabilities");
    assert!(!caps.into_inner().capabilities.is_empty());

    let store = KubeStore::connect(Some(&cluster.kubeconfig)).expect("store");
    assert!(store.list_volumes().expect("list").is_empty());
}
