//! The test cluster: a real Kubernetes control plane brought up by
//! `deploy/kubernetes/e2e/cluster.sh` (idempotent: a cluster already up is
//! reused; the binaries are built on first use and cached outside the
//! clone), with Zebu's custom resource definitions applied from
//! `deploy/kubernetes/crds` by `kubectl apply -k`, as a user would.
//!
//! `.ci/run` takes the cluster down at the end; a developer's stays up for
//! the next run (`cluster.sh down` removes it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::command::run;

/// What tests need to reach the cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// The admin kubeconfig (cluster-admin), usable from the host.
    pub kubeconfig: PathBuf,
    /// The `kubectl` built at the cluster's version.
    pub kubectl: PathBuf,
}

impl Cluster {
    /// Applies `deploy/kubernetes/crds` (`kubectl apply -k`) and waits until the
    /// API serves every definition.
    pub fn install_definitions(&self) {
        let crds = repo_root().join("deploy/kubernetes/crds");
        let crds = crds.to_str().expect("UTF-8 repository path");
        run(&mut self.kubectl(&["apply", "-k", crds]), crate::SHORT).expect_ok();
        run(
            &mut self.kubectl(&[
                "wait",
                "--for=condition=established",
                "--timeout=60s",
                "crd/zebuvolumes.zebu.csi.dev",
                "crd/zebusnapshots.zebu.csi.dev",
                "crd/zebunodes.zebu.csi.dev",
            ]),
            crate::SHORT,
        )
        .expect_ok();
    }

    /// `kubectl --kubeconfig ADMIN ARGS...`, ready to run.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }
}

/// The repository's root (this crate is `proto/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// The test cluster, up and with Zebu's CRDs established; brought up once
/// per test process.
pub fn cluster() -> Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(bring_up).clone()
}

/// The test cluster with a node: containerd and a kubelet (node `node1`,
/// root `/var/lib/kubelet`) beside the control plane.
pub fn cluster_with_node() -> Cluster {
    static NODE: OnceLock<()> = OnceLock::new();
    let c = cluster();
    NODE.get_or_init(|| {
        run(
            Command::new("bash").arg(script()).arg("node-up"),
            Duration::from_secs(3600),
        )
        .expect_ok();
    });
    c
}

/// The kubelet's root directory on the test node.
pub const KUBELET_DIR: &str = "/var/lib/kubelet";

/// The test node's name.
pub const NODE_NAME: &str = "node1";

fn script() -> PathBuf {
    repo_root().join("deploy/kubernetes/e2e/cluster.sh")
}

fn bring_up() -> Cluster {
    let script = script();
    // A cold build of the Kubernetes binaries takes minutes on 2 cores.
    run(
        Command::new("bash").arg(&script).arg("up"),
        Duration::from_secs(3600),
    )
    .expect_ok();
    let env = run(Command::new("bash").arg(&script).arg("env"), crate::SHORT).expect_ok();
    let var = |name: &str| -> PathBuf {
        env.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| PathBuf::from(v.trim().trim_matches(|c| c == '"' || c == '\'')))
            .unwrap_or_else(|| panic!("cluster.sh env did not export {name}:\n{}", env.stdout))
    };
    let cluster = Cluster {
        kubeconfig: var("KUBECONFIG"),
        kubectl: var("ZEBU_K8S_BIN").join("kubectl"),
    };
    cluster.install_definitions();
    cluster
}
