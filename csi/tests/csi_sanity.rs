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

/// On the custom-resource store.
#[test]
fn csi_sanity_passes_with_the_kubernetes_store() {
    let _serial = serial();
    let cluster = zebu_testkit::kube::cluster();
    clear_kube_store(&cluster.kubeconfig);
    let kubeconfig = cluster.kubeconfig.to_str().expect("UTF-8 kubeconfig path");
    sanity_against_standalone(&[
        "--store",
        "kubernetes",
        "--kubeconfig",
        kubeconfig,
        "--namespace",
        "default",
    ]);
    nothing_left(&cluster);
}

/// As a cluster runs it: `zebu-csi controller --store kubernetes` and a
/// `zebu-csi node --store kubernetes` that registers itself, apart, the
/// agent's API behind its token; the same specs pass as standalone.
#[test]
fn csi_sanity_passes_against_a_controller_and_a_node_apart() {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let cluster = zebu_testkit::kube::cluster();
    clear_kube_store(&cluster.kubeconfig);
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let flags = cluster_flags(&root, &cluster.kubeconfig, "default");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let controller = Driver::controller(&root, "ctl", &flags);
    let node = Driver::node_joining(&root, "sanity-node", &[], 3, &flags);
    // The controller leads (a lease left by an earlier test expires first)
    // and knows the node's disks.
    zebu_testkit::runtime().block_on(async {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let mut c = common::controller(&controller.endpoint).await;
            // A follower answers a mutating call UNAVAILABLE; deleting a
            // volume that does not exist is a no-op for the leader.
            let leads = c
                .delete_volume(zebu_proto::csi::DeleteVolumeRequest {
                    volume_id: "zv-none".into(),
                    ..Default::default()
                })
                .await;
            let capacity = c
                .get_capacity(zebu_proto::csi::GetCapacityRequest::default())
                .await;
            match (leads, capacity) {
                (Ok(_), Ok(c)) if c.get_ref().available_capacity > 0 => break,
                other => assert!(
                    std::time::Instant::now() < end,
                    "the controller did not lead with the node registered: {other:?}"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    });
    let passed = run_sanity(
        &node.endpoint,
        &controller.endpoint,
        &root,
        &[&root.join("ctl.log"), &root.join("sanity-node.log")],
    );
    assert_eq!(
        passed, PASSED,
        "a different number of specs ran than standalone"
    );
    drop(node);
    drop(controller);
    nothing_left(&cluster);
}

/// Every volume and snapshot csi-sanity created was deleted from the API.
fn nothing_left(cluster: &zebu_testkit::kube::Cluster) {
    let left = zebu_testkit::run(
        &mut cluster.kubectl(&["get", "zebuvolumes,zebusnapshots", "-o", "name"]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
    assert_eq!(left.stdout.trim(), "", "csi-sanity left objects behind");
}

/// Specs csi-sanity runs and must pass, in every setup (README.md lists
/// the skipped ones and why).
const PASSED: usize = 77;

fn sanity_against_standalone(extra: &[&str]) {
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let driver = Driver::standalone(&root, "sanity-node", 3, extra);
    let passed = run_sanity(
        &driver.endpoint,
        &driver.endpoint,
        &root,
        &[&root.join("standalone.log")],
    );
    assert_eq!(passed, PASSED, "a different number of specs ran");
}

/// Runs csi-sanity with the node service at `node_ep` and the controller at
/// `controller_ep`; asserts success, printing `logs` when it fails; returns
/// how many specs passed.
fn run_sanity(
    node_ep: &str,
    controller_ep: &str,
    root: &std::path::Path,
    logs: &[&std::path::Path],
) -> usize {
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
        .arg("--ginkgo.no-color")
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
    let driver_logs: String = logs
        .iter()
        .map(|l| {
            format!(
                "--- {}\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            )
        })
        .collect();
    assert!(
        out.status.success(),
        "csi-sanity failed ({}):\n{stdout}\n{stderr}\ndriver logs:\n{driver_logs}",
        out.status,
    );
    assert!(
        stdout.contains("SUCCESS!"),
        "csi-sanity did not report success:\n{stdout}"
    );
    // "Ran 77 of 95 Specs in 62.1 seconds"
    stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no \"Ran N of M Specs\" line:\n{stdout}"))
}
