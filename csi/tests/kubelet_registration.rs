//! The node plugin registers itself with a real kubelet (no
//! node-driver-registrar): the kubelet finds its socket in the plugin
//! registry, calls NodeGetInfo and lists the driver in the node's CSINode;
//! the plugin's gRPC health endpoint says SERVING once registered; a plugin
//! that stops is deregistered.

mod common;

use std::time::Duration;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use zebu_testkit::kube::{Cluster, KUBELET_DIR, NODE_NAME};
use zebu_testkit::{SHORT, run};

/// The nodeID the CSINode lists for Zebu's driver ("" if none).
fn csinode_driver(cluster: &Cluster) -> String {
    let r = run(
        &mut cluster.kubectl(&[
            "get",
            "csinode",
            NODE_NAME,
            "-o",
            "jsonpath={.spec.drivers[?(@.name==\"zebu.csi.dev\")].nodeID}",
            "--ignore-not-found",
        ]),
        SHORT,
    );
    if r.status.success() {
        r.stdout.trim().to_owned()
    } else {
        String::new()
    }
}

#[test]
fn the_node_plugin_registers_with_the_kubelet_and_reports_health() {
    let _serial = serial();
    require_data_path_bins();
    let cluster = zebu_testkit::kube::cluster_with_node();
    clear_kube_store(&cluster.kubeconfig);
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    // The CSI socket where the kubelet expects drivers' sockets.
    let plugin_dir = std::path::Path::new(KUBELET_DIR).join("plugins/zebu.csi.dev");
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    let csi = plugin_dir.join("csi.sock");
    let (endpoint, registry) = (
        format!("unix://{}", csi.display()),
        format!("{KUBELET_DIR}/plugins_registry"),
    );
    assert_eq!(
        csinode_driver(&cluster),
        "",
        "a driver left registered by an earlier run"
    );
    let flags = cluster_flags(&root, &cluster.kubeconfig, "default");
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend([
        "--endpoint",
        &endpoint,
        "--kubelet-registry",
        &registry,
        "--health-listen",
        "127.0.0.1:0",
    ]);
    let mut node = Driver::node_joining(&root, NODE_NAME, &[], 1, &flags);
    let health = node
        .ready
        .split("; health ")
        .nth(1)
        .expect("the ready line names the health endpoint")
        .trim()
        .to_owned();

    // The kubelet registers the plugin and asks it for its node id.
    poll(
        "the CSINode to list zebu.csi.dev",
        Duration::from_secs(60),
        || csinode_driver(&cluster) == NODE_NAME,
    );
    let status = zebu_testkit::runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
            .expect("health address")
            .connect()
            .await
            .expect("connect to the health endpoint");
        let mut h = HealthClient::new(channel);
        // Registration is reported to the plugin right after the CSINode write.
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("Check")
                .into_inner()
                .status;
            if s == ServingStatus::Serving as i32 || std::time::Instant::now() > end {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(status, ServingStatus::Serving as i32);

    // A plugin that stops removes its registration socket; the kubelet
    // drops the driver from the node.
    node.stop();
    assert!(
        !std::path::Path::new(&registry)
            .join("zebu.csi.dev-reg.sock")
            .exists(),
        "the registration socket outlived the plugin"
    );
    poll(
        "the CSINode to drop zebu.csi.dev",
        Duration::from_secs(60),
        || csinode_driver(&cluster).is_empty(),
    );
    let _ = std::fs::remove_file(&csi);
}
