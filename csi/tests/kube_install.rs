//! Zebu installed on a real cluster the way users install it: images built
//! without a container engine (deploy/kubernetes/images/build.sh) and
//! imported into the node's containerd, `kubectl apply -k` of the e2e
//! overlay (deploy/kubernetes plus the snapshot controller, told the API
//! server's address), the controller and node plugin running as Pods. Then
//! what users do, each step checked with kubectl and data checksums:
//! StatefulSet volumes that outlive their Pods, VolumeSnapshots restored
//! and claims cloned, online expansion, a raw block volume, faults (a
//! replica killed, the node plugin's Pod deleted, the leading controller's
//! Pod deleted while provisioning), and a removal that leaves nothing.
//!
//! The steps share one install and run in order in one test: each
//! needs what the one before left.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use zebu_testkit::kube::{Cluster, KUBELET_DIR, NODE_NAME, repo_root};
use zebu_testkit::{LONG, SHORT, run};

/// Where the node plugin keeps its data (the DaemonSet's hostPath).
const DATA_DIR: &str = "/var/lib/zebu";
/// The node plugin's state (attachments, agent records) on the host.
const PLUGIN_DIR: &str = "/var/lib/kubelet/plugins/zebu.csi.dev";
/// Marks `DATA_DIR` as made by this test (and removable by cluster.sh down).
const DATA_MARKER: &str = ".zebu-e2e";
/// Where a `DATA_DIR` that was there before waits (cluster.sh down knows).
const DATA_ASIDE: &str = "/var/lib/zebu.before-e2e";
/// The test Pods' image (cluster.sh node-up imports it).
const BUSYBOX: &str = "localhost/busybox:1.35";
/// Pods, claims and snapshots get this long to become what is asked.
const WAIT: &str = "--timeout=300s";

struct K {
    c: Cluster,
}

impl K {
    /// `kubectl ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        run(&mut self.c.kubectl(args), LONG).expect_ok().stdout
    }

    /// `kubectl ARGS` as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
    }

    /// `sh -c SCRIPT` in Pod `pod` (namespace default); its stdout.
    fn exec(&self, pod: &str, script: &str) -> String {
        self.ok(&["exec", pod, "--", "sh", "-c", script])
    }

    /// Applies example `name` of deploy/kubernetes/examples with the test
    /// image in place of the public busybox one (nothing else changed).
    fn apply_example(&self, name: &str, dir: &Path) {
        let src = repo_root().join("deploy/kubernetes/examples").join(name);
        let text = std::fs::read_to_string(&src).expect("read the example");
        assert!(text.contains("image: busybox:1.36") || !text.contains("image:"));
        let text = text.replace("image: busybox:1.36", &format!("image: {BUSYBOX}"));
        self.apply_yaml(dir, name, &text);
    }

    /// How often Pod `pod`'s container restarted.
    fn restarts(&self, pod: &str) -> u64 {
        let n = self.ok(&[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ]);
        n.trim().parse().expect("restartCount")
    }

    /// Lines of the StatefulSet Pod `pod`'s log file (one a second).
    fn log_lines(&self, pod: &str) -> u64 {
        let n = self.exec(pod, "wc -l < /data/log");
        n.trim().parse().expect("line count")
    }

    /// Pod `pod`'s uid ("" if there is none).
    fn uid(&self, pod: &str) -> String {
        let r = run(
            &mut self
                .c
                .kubectl(&["get", "pod", pod, "-o", "jsonpath={.metadata.uid}"]),
            SHORT,
        );
        if r.ok() { r.stdout } else { String::new() }
    }

    /// Waits until Pod `pod` exists again with another uid than `old`, and
    /// is Ready.
    fn wait_recreated(&self, pod: &str, old: &str) {
        poll(
            &format!("{pod} to be recreated"),
            Duration::from_secs(300),
            || {
                let now = self.uid(pod);
                !now.is_empty() && now != old
            },
        );
        self.wait_pod_ready(pod);
    }

    /// The controller Pod leading Zebu (the holder of its Lease).
    fn leader(&self) -> String {
        self.ok(&[
            "-n",
            "zebu-system",
            "get",
            "lease",
            "zebu-csi-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    }

    /// Writes `yaml` to `dir/name` and applies it.
    fn apply_yaml(&self, dir: &Path, name: &str, yaml: &str) {
        let file = dir.join(name);
        std::fs::write(&file, yaml).expect("write a manifest");
        self.ok(&["apply", "-f", file.to_str().expect("UTF-8")]);
    }

    /// Waits until `what` (`daemonset/NAME`, ...) in namespace `ns` has
    /// rolled out.
    fn rollout(&self, ns: &str, what: &str) {
        self.ok(&["-n", ns, "rollout", "status", what, WAIT]);
    }

    fn wait_pod_ready(&self, pod: &str) {
        self.ok(&["wait", "--for=condition=Ready", &format!("pod/{pod}"), WAIT]);
    }

    /// The Zebu volume id behind claim `pvc`.
    fn volume_of(&self, pvc: &str) -> String {
        let pv = self.ok(&["get", "pvc", pvc, "-o", "jsonpath={.spec.volumeName}"]);
        assert!(!pv.is_empty(), "claim {pvc} is not bound");
        self.ok(&["get", "pv", &pv, "-o", "jsonpath={.spec.csi.volumeHandle}"])
    }

    /// `(condition, ready replicas)` of ZebuVolume `id`.
    fn volume_health(&self, id: &str) -> (String, u64) {
        let v = self.json(&["get", "zebuvolume", id]);
        (
            v["status"]["condition"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            v["status"]["readyReplicas"].as_u64().unwrap_or(0),
        )
    }

    fn wait_healthy(&self, pvc: &str) {
        let id = self.volume_of(pvc);
        poll(
            &format!("volume {id} of {pvc} healthy with 3 replicas"),
            Duration::from_secs(300),
            || self.volume_health(&id) == ("healthy".to_owned(), 3),
        );
    }

    /// The reasons of the Events about claim `pvc`.
    fn claim_event_reasons(&self, pvc: &str) -> Vec<String> {
        let v = self.json(&[
            "get",
            "events.events.k8s.io",
            "--field-selector",
            &format!("regarding.kind=PersistentVolumeClaim,regarding.name={pvc}"),
        ]);
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Lines of `log` that are complete (a crash-consistent copy may end in a
/// partial line).
fn complete_lines(log: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = log.split('\n').collect();
    lines.pop(); // after the last '\n': empty, or a partial line
    lines
}

#[test]
fn installed_with_kubectl_zebu_serves_statefulsets_snapshots_expansion_and_faults() {
    let _serial = serial();
    require_data_path_bins();
    // What a failed earlier run left (Pods on volumes, an install) is torn
    // down with the whole cluster; cluster_with_node() brings up a new one.
    if Path::new(DATA_DIR).join(DATA_MARKER).exists() {
        assert!(cluster_down(), "cluster.sh down failed");
    }
    let c = zebu_testkit::kube::cluster_with_node();
    clear_kube_store(&c.kubeconfig);
    let k = K { c: c.clone() };
    let _down = DownOnFailure(k.c.clone());
    let tmp = tempdir();
    let dir = tmp.path().to_owned();

    install(&k, &dir);
    let sums = statefulset(&k, &dir);
    snapshot_restore_and_clone(&k, &dir, &sums);
    expansion(&k, &dir);
    raw_block(&k, &dir);
    replica_killed_while_writing(&k);
    node_plugin_pod_deleted(&k);
    leader_deleted_while_provisioning(&k, &dir);
    removal(&k);
}

/// `cluster.sh down`; whether it succeeded (its output goes to stderr).
fn cluster_down() -> bool {
    let r = run(
        Command::new("bash")
            .arg(repo_root().join("deploy/kubernetes/e2e/cluster.sh"))
            .arg("down"),
        LONG,
    );
    eprintln!("cluster.sh down: {}{}", r.stdout, r.stderr);
    r.ok()
}

/// On failure: shows the driver's logs, then takes the cluster down (with
/// every Pod, volume process, mount and loop device), so the tests after
/// this one start on a clean cluster.
struct DownOnFailure(Cluster);

impl Drop for DownOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for sel in [
            "app.kubernetes.io/name=zebu-controller",
            "app.kubernetes.io/name=zebu-node",
        ] {
            let logs = run(
                &mut self.0.kubectl(&[
                    "-n",
                    "zebu-system",
                    "logs",
                    "-l",
                    sel,
                    "--all-containers",
                    "--prefix",
                    "--tail=60",
                ]),
                SHORT,
            );
            eprintln!("--- logs of {sel}:\n{}{}", logs.stdout, logs.stderr);
        }
        // Not a second panic while unwinding (that would abort).
        cluster_down();
    }
}

/// Images, import, apply; every Pod Ready, the driver on the CSINode.
fn install(k: &K, dir: &Path) {
    // The node's data directory is the DaemonSet's hostPath, the standalone
    // driver's default state too (README's first command leaves one). A
    // directory this test did not make is set aside, untouched, and put
    // back at the end (by removal(), or by cluster.sh down after a failure).
    let data = Path::new(DATA_DIR);
    if data.exists() && !data.join(DATA_MARKER).exists() {
        let users = pids_with(&[DATA_DIR]);
        assert!(
            users.is_empty(),
            "processes {users:?} use {DATA_DIR}: stop them to run the e2e"
        );
        let aside = Path::new(DATA_ASIDE);
        assert!(
            !aside.exists(),
            "{DATA_ASIDE} exists: put it back as {DATA_DIR} or remove it"
        );
        std::fs::rename(data, aside).expect("set the data dir aside");
    }
    std::fs::create_dir_all(data).expect("data dir");
    std::fs::write(data.join(DATA_MARKER), "").expect("marker");

    let images = dir.join("images");
    let bins = zebu_testkit::bin("zebu-csi");
    let bins = bins.parent().expect("bin dir").to_str().expect("UTF-8");
    let build = repo_root().join("deploy/kubernetes/images/build.sh");
    run(
        Command::new("bash")
            .arg(&build)
            .args(["--bin-dir", bins, "--out"])
            .arg(&images),
        Duration::from_secs(3600),
    )
    .expect_ok();
    let mut tars: Vec<PathBuf> = std::fs::read_dir(&images)
        .expect("images")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    tars.sort();
    assert_eq!(
        tars.len(),
        6,
        "zebu, four sidecars, snapshot-controller: {tars:?}"
    );
    run(
        Command::new("bash")
            .arg(repo_root().join("deploy/kubernetes/e2e/cluster.sh"))
            .arg("import")
            .args(&tars),
        LONG,
    )
    .expect_ok();

    // The kustomization names the images the build makes.
    let kust =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/base/kustomization.yaml"))
            .expect("base kustomization");
    let listed = run(
        Command::new("bash")
            .arg(repo_root().join("deploy/kubernetes/images/build-sidecars.sh"))
            .arg("--list"),
        SHORT,
    )
    .expect_ok()
    .stdout;
    for line in listed
        .lines()
        .filter(|l| !l.starts_with("snapshot-controller"))
    {
        let (name, tag) = line.split_once(' ').expect("NAME TAG");
        assert!(
            kust.contains(&format!("newName: localhost/{name}\n    newTag: {tag}")),
            "base/kustomization.yaml does not pin {name} {tag}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(kust.contains(&format!("newName: localhost/zebu\n    newTag: {version}")));

    // The VolumeSnapshot CRDs (external-snapshotter's, built beside the
    // sidecars), then the install.
    for f in [
        "volumesnapshotclasses",
        "volumesnapshotcontents",
        "volumesnapshots",
    ] {
        let p = images.join(format!("snapshot.storage.k8s.io_{f}.yaml"));
        k.ok(&["apply", "-f", p.to_str().expect("UTF-8")]);
    }
    k.ok(&[
        "wait",
        "--for=condition=established",
        "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
        WAIT,
    ]);
    let overlay = repo_root().join("deploy/kubernetes/e2e/overlay");
    k.ok(&["apply", "-k", overlay.to_str().expect("UTF-8")]);
    k.ok(&[
        "-n",
        "zebu-system",
        "wait",
        "--for=condition=complete",
        "job/zebu-agent-token",
        WAIT,
    ]);
    k.rollout("zebu-system", "daemonset/zebu-node");
    k.rollout("zebu-system", "deployment/zebu-controller");
    k.rollout("kube-system", "deployment/snapshot-controller");
    let ready = k.ok(&[
        "-n",
        "zebu-system",
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.containerStatuses[*].ready}{\"\\n\"}{end}",
    ]);
    let running: Vec<&str> = ready
        .lines()
        .filter(|l| !l.starts_with("zebu-agent-token"))
        .collect();
    assert_eq!(
        running.len(),
        3,
        "two controllers and one node plugin: {ready}"
    );
    for l in &running {
        assert!(!l.contains("false"), "a container is not ready: {ready}");
    }
    poll(
        "the CSINode to list zebu.csi.dev",
        Duration::from_secs(120),
        || {
            k.ok(&[
                "get",
                "csinode",
                NODE_NAME,
                "-o",
                "jsonpath={.spec.drivers[?(@.name==\"zebu.csi.dev\")].nodeID}",
            ]) == NODE_NAME
        },
    );
    let node = k.json(&["get", "zebunode", NODE_NAME]);
    assert!(
        node["spec"]["disks"]
            .as_array()
            .is_some_and(|d| d.len() == 3),
        "{node}"
    );
}

/// A 2-Pod StatefulSet: files survive their Pods; both volumes healthy.
/// Returns each Pod's file checksum.
fn statefulset(k: &K, dir: &Path) -> Vec<String> {
    k.apply_example("statefulset.yaml", dir);
    k.rollout("default", "statefulset/zebu-demo");
    let mut sums = Vec::new();
    for pod in ["zebu-demo-0", "zebu-demo-1"] {
        let check = k.exec(pod, "sha256sum -c /data/hello.sha256");
        assert!(check.contains("OK"), "{pod}: {check}");
        sums.push(k.exec(pod, "sha256sum /data/hello"));
    }
    assert_ne!(sums[0], sums[1], "each Pod has its own volume");
    let uid = k.uid("zebu-demo-0");
    k.ok(&["delete", "pod", "zebu-demo-0", "--wait=true"]);
    k.wait_recreated("zebu-demo-0", &uid);
    assert_eq!(
        k.exec("zebu-demo-0", "sha256sum /data/hello"),
        sums[0],
        "byte for byte"
    );
    for pvc in ["data-zebu-demo-0", "data-zebu-demo-1"] {
        k.wait_healthy(pvc);
    }
    let table = k.ok(&["get", "zebuvolumes"]);
    assert_eq!(
        table.lines().filter(|l| l.contains("healthy")).count(),
        2,
        "{table}"
    );
    sums
}

/// A snapshot taken while the Pod writes, restored; a clone.
fn snapshot_restore_and_clone(k: &K, dir: &Path, sums: &[String]) {
    k.apply_example("snapshot.yaml", dir);
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.readyToUse}=true",
        "volumesnapshot/data-zebu-demo-0-snap",
        WAIT,
    ]);
    k.apply_example("restore.yaml", dir);
    k.apply_example("clone.yaml", dir);
    for pod in ["zebu-restored", "zebu-clone"] {
        k.wait_pod_ready(pod);
        // The file written before, byte for byte.
        assert_eq!(k.exec(pod, "sha256sum /data/hello"), sums[0], "{pod}");
        // The log as it was at the snapshot (or clone): every complete line
        // is the source's line at the same place, and the source went on.
        let copy = k.exec(pod, "cat /data/log");
        let source = k.exec("zebu-demo-0", "cat /data/log");
        let (copy, source) = (complete_lines(&copy), complete_lines(&source));
        assert!(!copy.is_empty(), "{pod}: the copy has the log");
        assert!(
            source.len() > copy.len() && source[..copy.len()] == copy[..],
            "{pod}: its log is not a prefix of the source's ({} vs {} lines)",
            copy.len(),
            source.len()
        );
    }
}

/// 1Gi → 2Gi while the Pod runs. xfs grows online, always; ext4 grows
/// online only with CAP_SYS_RESOURCE, which this machine's bounding set
/// lacks: there the node answers FAILED_PRECONDITION, the claim waits for
/// its Pod to restart, and the restarted Pod's filesystem has grown.
fn expansion(k: &K, dir: &Path) {
    let df = |pod: &str| -> u64 {
        let out = k.exec(pod, "df -k /data | tail -1");
        out.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("df size")
    };
    let grow = |pvc: &str| {
        k.ok(&[
            "patch",
            "pvc",
            pvc,
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
        ]);
    };

    // xfs, online.
    let yaml = format!(
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: zebu-xfs}}\n\
         provisioner: zebu.csi.dev\nparameters: {{numberOfReplicas: \"3\", csi.storage.k8s.io/fstype: xfs}}\n\
         allowVolumeExpansion: true\nvolumeBindingMode: WaitForFirstConsumer\n---\n\
         apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: zebu-xfs}}\nspec:\n  \
         accessModes: [ReadWriteOnce]\n  storageClassName: zebu-xfs\n  resources: {{requests: {{storage: 1Gi}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: zebu-xfs}}\nspec:\n  terminationGracePeriodSeconds: 5\n  \
         containers:\n    - name: app\n      image: {BUSYBOX}\n      command: [sh, -c, \"sleep 1000000\"]\n      \
         volumeMounts: [{{name: data, mountPath: /data}}]\n  \
         volumes: [{{name: data, persistentVolumeClaim: {{claimName: zebu-xfs}}}}]\n"
    );
    k.apply_yaml(dir, "xfs.yaml", &yaml);
    k.wait_pod_ready("zebu-xfs");
    let (before, first) = (df("zebu-xfs"), k.uid("zebu-xfs"));
    grow("zebu-xfs");
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.capacity.storage}=2Gi",
        "pvc/zebu-xfs",
        WAIT,
    ]);
    poll("xfs in the Pod to grow", Duration::from_secs(300), || {
        df("zebu-xfs") > before * 3 / 2
    });
    assert_eq!(k.uid("zebu-xfs"), first, "the Pod was not restarted");
    k.exec(
        "zebu-xfs",
        "dd if=/dev/urandom of=/data/big bs=1M count=8 && sync",
    );

    // ext4.
    let pod = "zebu-demo-1";
    let (before, first) = (df(pod), k.uid(pod));
    grow("data-zebu-demo-1");
    if has_cap_sys_resource() {
        k.ok(&[
            "wait",
            "--for=jsonpath={.status.capacity.storage}=2Gi",
            "pvc/data-zebu-demo-1",
            WAIT,
        ]);
        poll("ext4 in the Pod to grow", Duration::from_secs(300), || {
            df(pod) > before * 3 / 2
        });
        assert_eq!(k.uid(pod), first, "the Pod was not restarted");
    } else {
        poll(
            "the node to refuse an online ext4 resize",
            Duration::from_secs(300),
            || {
                k.ok(&[
                    "get",
                    "pvc",
                    "data-zebu-demo-1",
                    "-o",
                    "jsonpath={.status.conditions}",
                ])
                .contains("online ext4 resize needs CAP_SYS_RESOURCE")
            },
        );
        k.ok(&["delete", "pod", pod, "--wait=true"]);
        k.wait_recreated(pod, &first);
        k.ok(&[
            "wait",
            "--for=jsonpath={.status.capacity.storage}=2Gi",
            "pvc/data-zebu-demo-1",
            WAIT,
        ]);
        assert!(df(pod) > before * 3 / 2, "ext4 grew when the Pod restarted");
    }
    k.exec(pod, "dd if=/dev/urandom of=/data/big bs=1M count=8 && sync");
    let check = k.exec(pod, "sha256sum -c /data/hello.sha256");
    assert!(check.contains("OK"), "{check}");
}

/// Whether this machine lets a process hold CAP_SYS_RESOURCE (bit 24 of
/// the capability bounding set).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|bits| bits & (1 << 24) != 0)
}

/// A volumeMode Block claim: written through the device, read back by a
/// new Pod (a fresh attachment).
fn raw_block(k: &K, dir: &Path) {
    k.apply_example("raw-block.yaml", dir);
    k.wait_pod_ready("zebu-raw");
    let written = k.exec(
        "zebu-raw",
        "head -c 4194304 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/zebu bs=1048576 seek=3 conv=fsync 2>/dev/null && sha256sum < /tmp/p",
    );
    k.ok(&["delete", "pod", "zebu-raw", "--wait=true"]);
    k.apply_example("raw-block.yaml", dir);
    k.wait_pod_ready("zebu-raw");
    let read = k.exec(
        "zebu-raw",
        "dd if=/dev/zebu bs=1048576 skip=3 count=4 2>/dev/null | sha256sum",
    );
    assert_eq!(read, written);
}

/// SIGKILL one replica of a volume whose Pod writes: writes go on, the
/// replica comes back through a rebuild, the claim gets Events.
fn replica_killed_while_writing(k: &K) {
    let pvc = "data-zebu-demo-0";
    let id = k.volume_of(pvc);
    let replicas = pids_with(&["zebu-replica", &id]);
    assert_eq!(replicas.len(), 3, "three replica processes of {id}");
    let before = k.log_lines("zebu-demo-0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(replicas[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL a replica");
    poll("the Pod to keep writing", Duration::from_secs(120), || {
        k.log_lines("zebu-demo-0") > before + 3
    });
    poll(
        "ReplicaLost and Rebuilt Events on the claim",
        Duration::from_secs(300),
        || {
            let r = k.claim_event_reasons(pvc);
            r.iter().any(|x| x == "ReplicaLost") && r.iter().any(|x| x == "Rebuilt")
        },
    );
    k.wait_healthy(pvc);
    assert_eq!(k.restarts("zebu-demo-0"), 0);
}

/// Deleting the node plugin's Pod interrupts no mounted volume: the same
/// engine keeps serving, and the new plugin adopts it.
fn node_plugin_pod_deleted(k: &K) {
    let id = k.volume_of("data-zebu-demo-0");
    let engines = pids_with(&["zebu-engine", &id]);
    assert_eq!(engines.len(), 1, "one engine of {id}");
    let old = k.ok(&[
        "-n",
        "zebu-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=zebu-node",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    k.ok(&["-n", "zebu-system", "delete", "pod", &old, "--wait=true"]);
    let before = k.log_lines("zebu-demo-0");
    k.rollout("zebu-system", "daemonset/zebu-node");
    poll("the Pod to keep writing", Duration::from_secs(120), || {
        k.log_lines("zebu-demo-0") > before + 3
    });
    assert_eq!(
        pids_with(&["zebu-engine", &id]),
        engines,
        "the engine was not replaced"
    );
    // Still writable. That the new plugin knows the attachment is shown by
    // the steps after this one: leader_deleted_while_provisioning() attaches
    // a new volume through it, and removal() detaches this one through it
    // and finds no mount or loop device left.
    k.exec(
        "zebu-demo-0",
        "echo after-plugin-restart > /data/marker && sync",
    );
    assert_eq!(k.restarts("zebu-demo-0"), 0);
    k.wait_healthy("data-zebu-demo-0");
}

/// The leading controller's Pod deleted right after a claim is made: the
/// other controller takes over and provisioning completes.
fn leader_deleted_while_provisioning(k: &K, dir: &Path) {
    let leader = k.leader();
    assert!(leader.starts_with("zebu-controller-"), "leader {leader:?}");
    let yaml = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: zebu-failover}}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: zebu\n  resources: {{requests: {{storage: 256Mi}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: zebu-failover}}\nspec:\n  terminationGracePeriodSeconds: 5\n  containers:\n    - name: app\n      image: {BUSYBOX}\n      command: [sh, -c, \"echo ok > /data/ok && sync && sleep 1000000\"]\n      volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes: [{{name: data, persistentVolumeClaim: {{claimName: zebu-failover}}}}]\n"
    );
    k.apply_yaml(dir, "failover.yaml", &yaml);
    k.ok(&[
        "-n",
        "zebu-system",
        "delete",
        "pod",
        &leader,
        "--wait=false",
    ]);
    k.wait_pod_ready("zebu-failover");
    assert_eq!(k.exec("zebu-failover", "cat /data/ok").trim(), "ok");
    poll("a new leader", Duration::from_secs(120), || {
        let now = k.leader();
        !now.is_empty() && now != leader
    });
    k.rollout("zebu-system", "deployment/zebu-controller");
    // The replacement Pod's sidecars started beside a follower whose leader
    // had just died: none of them failed its start-up checks.
    let restarts = k.ok(&[
        "-n",
        "zebu-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=zebu-controller",
        "-o",
        "jsonpath={range .items[*].status.containerStatuses[*]}{.name}={.restartCount} {end}",
    ]);
    assert!(
        restarts.split_whitespace().all(|c| c.ends_with("=0")),
        "controller containers restarted: {restarts}"
    );
}

/// Everything deleted: no PV, ZebuVolume, replica directory, engine,
/// mount or loop device remains; then the driver is uninstalled.
fn removal(k: &K) {
    for what in [
        "pod/zebu-failover",
        "pod/zebu-restored",
        "pod/zebu-clone",
        "pod/zebu-raw",
        "pod/zebu-xfs",
        "statefulset/zebu-demo",
    ] {
        k.ok(&["delete", what, "--wait=true", WAIT]);
    }
    k.ok(&["delete", "volumesnapshot", "--all", "--wait=true", WAIT]);
    k.ok(&["delete", "pvc", "--all", "--wait=true", WAIT]);
    k.ok(&["delete", "storageclass", "zebu-xfs"]);
    poll(
        "every PersistentVolume to go",
        Duration::from_secs(300),
        || k.ok(&["get", "pv", "-o", "name"]).trim().is_empty(),
    );
    poll(
        "every ZebuVolume and ZebuSnapshot to go",
        Duration::from_secs(300),
        || {
            k.ok(&["get", "zebuvolumes,zebusnapshots", "-o", "name"])
                .trim()
                .is_empty()
        },
    );
    poll(
        "every engine and replica process to exit",
        Duration::from_secs(120),
        || {
            pids_with(&["zebu-engine", "--volume"]).is_empty()
                && pids_with(&["zebu-replica", DATA_DIR]).is_empty()
        },
    );
    let disks = Path::new(DATA_DIR).join("disks");
    for d in std::fs::read_dir(&disks).expect("disks").flatten() {
        let replicas = d.path().join("replicas");
        let left: Vec<_> = std::fs::read_dir(&replicas)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "replica directories left: {left:?}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let csi = format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/zebu.csi.dev");
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&csi) || l.contains(DATA_DIR) || l.contains(PLUGIN_DIR))
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:#?}");
    let loops = run(
        Command::new("losetup").args(["-nO", "NAME,BACK-FILE"]),
        SHORT,
    )
    .expect_ok()
    .stdout;
    assert!(!loops.contains(PLUGIN_DIR), "loop devices left:\n{loops}");

    let overlay = repo_root().join("deploy/kubernetes/e2e/overlay");
    k.ok(&[
        "delete",
        "-k",
        overlay.to_str().expect("UTF-8"),
        "--wait=true",
        WAIT,
    ]);
    poll(
        "the CSINode to drop zebu.csi.dev",
        Duration::from_secs(120),
        || {
            !k.ok(&[
                "get",
                "csinode",
                NODE_NAME,
                "-o",
                "jsonpath={.spec.drivers[*].name}",
            ])
            .contains("zebu.csi.dev")
        },
    );
    std::fs::remove_dir_all(DATA_DIR).expect("remove the data dir");
    if Path::new(DATA_ASIDE).exists() {
        std::fs::rename(DATA_ASIDE, DATA_DIR).expect("put the data dir back");
    }
}
