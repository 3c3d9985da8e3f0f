//! Runs the CSI conformance suite `csi-sanity` (kubernetes-csi/csi-test)
//! against `zebu-csi standalone` with real replicas, engines, nbdfuse
//! devices and mounts, on the embedded store and on the custom resources of
//! a real API server (the test cluster). Every test it runs must pass; the
//! skipped ones are listed in README.md with why.
//!
//! `csi-sanity` is found at `$CSI_SANITY`, on `$PATH` or in `~/go/bin`;
//! `.ci/run` installs the pinned version with `go install`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn csi_sanity() -> PathBuf {
    if let Some(p) = std::env::var_os("CSI_SANITY") {
        return PathBuf::from(p);
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join("go/bin")));
    for d in candidates {
        if d.join("csi-sanity").is_file() {
            return d.join("csi-sanity");
        }
    }
    panic!(
        "csi-sanity is not installed: go install \
         github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0 (what .ci/run does)"
    );
}

#[test]
fn csi_sanity_passes_against_the_standalone_driver() {
    let _serial = serial();
    sanity_against_standalone(&[]);
}

/// On the custom-resource store. (Standalone, not a controller and a node
/// apart: csi-sanity reads the plugin's capabilities from the node
/// endpoint's Identity, which rightly does not offer the Controller
/// service, and then skips ControllerPublishVolume. A controller and nodes
/// apart on this store are exercised by `leader_failover.rs`.)
#[test]
fn csi_sanity_passes_with_the_kubernetes_store() {
    let _serial = serial();
    let cluster = zebu_testkit::kube::cluster();
    clear_kube_store(&cluster.kubeconfig);
    let kubeconfig = cluster.kubeconfig.to_str().expect("UTF-8 kubeconfig path");
    sanity_against_standalone(&["--store", "kubernetes", "--kubeconfig", kubeconfig]);
    // Everything it created was deleted from the API too.
    let left = zebu_testkit::run(
        &mut cluster.kubectl(&["get", "zebuvolumes,zebusnapshots", "-o", "name"]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
    assert_eq!(left.stdout.trim(), "", "csi-sanity left objects behind");
}

fn sanity_against_standalone(extra: &[&str]) {
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let driver = Driver::standalone(&root, "sanity-node", 3, extra);
    run_sanity(
        &driver.endpoint,
        &driver.endpoint,
        &root,
        &root.join("standalone.log"),
    );
}

/// Runs csi-sanity with the node service at `node_ep` and the controller at
/// `controller_ep`; asserts success, printing `log` when it fails.
fn run_sanity(node_ep: &str, controller_ep: &str, root: &std::path::Path, log: &std::path::Path) {
    let sanity = csi_sanity();
    let junit = root.join("junit.xml");
    let out = Command::new(&sanity)
        .arg(format!("--csi.endpoint={node_ep}"))
        .arg(format!("--csi.controllerendpoint={controller_ep}"))
        .arg(format!(
            "--csi.stagingdir={}",
            root.join("staging").display()
        ))
        .arg(format!("--csi.mountdir={}", root.join("mount").display()))
        .arg("--csi.testvolumesize=67108864")
        .arg("--csi.testvolumeexpandsize=134217728")
        .arg(format!("--csi.junitfile={}", junit.display()))
        .arg("--ginkgo.v")
        .arg("--ginkgo.timeout=40m")
        .output()
        .expect("run csi-sanity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The summary lines ("Ran N of M Specs", "SUCCESS!/FAIL!") for the log.
    for l in stdout.lines().filter(|l| {
        l.contains("Ran ") || l.contains("Passed") || l.contains("[FAIL]") || l.contains("SUCCESS")
    }) {
        println!("{l}");
    }
    // What csi-sanity skipped (README.md says why for each).
    let junit_xml = std::fs::read_to_string(&junit).unwrap_or_default();
    for case in junit_xml.split("<testcase ").skip(1) {
        let attr = |name: &str| {
            case.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
        };
        if matches!(attr("status"), "skipped" | "pending") {
            println!(
                "{}: {}",
                attr("status"),
                attr("name").replace("&#39;", "'").replace("&amp;", "&")
            );
        }
    }
    assert!(
        out.status.success(),
        "csi-sanity failed ({}):\n{stdout}\n{stderr}\ndriver log:\n{}",
        out.status,
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert!(
        stdout.contains("SUCCESS!"),
        "csi-sanity did not report success:\n{stdout}"
    );
}
