//! Shared pieces of the driver-level tests: starting `zebu-csi` processes
//! on temp dirs, CSI clients, and a cleanup that removes every process,
//! mount and loop device a test created (by path, so it also catches the
//! replica and engine processes the agent deliberately leaves running when
//! it exits).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tonic::transport::Channel;
use zebu_proto::csi as pb;
use zebu_proto::csi::controller_client::ControllerClient;
use zebu_proto::csi::identity_client::IdentityClient;
use zebu_proto::csi::node_client::NodeClient;
use zebu_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};

#[allow(unused_imports)]
pub use zebu_testkit::{mounts_under, poll, require_tool, runtime as rt, serial, tempdir};

/// The node-side tools every attach needs.
pub fn require_node_tools() {
    require_tool("nbdfuse", "libnbd-bin");
    zebu_testkit::require_node_tools();
}

pub fn csi_bin() -> PathBuf {
    zebu_testkit::bin("zebu-csi")
}

pub fn zebu_bin() -> PathBuf {
    zebu_testkit::bin("zebu")
}

/// Checks that the replica and engine binaries sit next to `zebu-csi` (the
/// agent looks for them there).
pub fn require_data_path_bins() {
    zebu_testkit::bin("zebu-replica");
    zebu_testkit::bin("zebu-engine");
}

/// A running `zebu-csi` process.
pub struct Driver {
    pub child: Child,
    pub endpoint: String,
    pub socket: PathBuf,
    /// The ready line it printed.
    pub ready: String,
    pub node_id: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Driver {
    /// Starts `zebu-csi standalone` with `disks` disk dirs under `root`.
    pub fn standalone(root: &Path, node_id: &str, disks: usize, extra: &[&str]) -> Driver {
        Self::standalone_crashing_at(root, node_id, disks, extra, None)
    }

    /// [`Driver::standalone`], killing itself at crash point `crash_at`
    /// (`zebu_proto::crash`) when given; see [`Driver::wait_crashed_at`].
    pub fn standalone_crashing_at(
        root: &Path,
        node_id: &str,
        disks: usize,
        extra: &[&str],
        crash_at: Option<&str>,
    ) -> Driver {
        let socket = root.join("csi.sock");
        let mut args: Vec<String> = vec![
            "standalone".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--state".into(),
            root.join("state").display().to_string(),
            "--node-id".into(),
            node_id.into(),
        ];
        for i in 0..disks {
            args.push("--disk".into());
            args.push(root.join(format!("disk{i}")).display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(csi_bin());
        if let Some(point) = crash_at {
            cmd.env(zebu_proto::crash::ENV, point);
        }
        Driver::spawn_cmd(cmd, &args, socket, node_id, &root.join("standalone.log"))
    }

    /// Starts `zebu-csi node` joining the controller at `controller`.
    pub fn node(root: &Path, node_id: &str, controller: &str) -> Driver {
        Driver::node_joining(root, node_id, &[controller], 1, &[])
    }

    /// Starts `zebu-csi controller NAME` under `root` with `extra` flags.
    pub fn controller(root: &Path, name: &str, extra: &[&str]) -> Driver {
        let dir = root.join(name);
        let socket = dir.join("csi.sock");
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--state".into(),
            dir.join("state").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::fs::create_dir_all(&dir).expect("controller dir");
        Driver::spawn(&args, socket, name, &root.join(format!("{name}.log")))
    }

    /// Starts `zebu-csi node` with `disks` disks and `extra` flags,
    /// heartbeating to every controller of `controllers`.
    pub fn node_joining(
        root: &Path,
        node_id: &str,
        controllers: &[&str],
        disks: usize,
        extra: &[&str],
    ) -> Driver {
        let dir = root.join(node_id);
        // `--endpoint` in `extra` replaces the default socket under `root`.
        let socket = extra
            .iter()
            .position(|a| *a == "--endpoint")
            .and_then(|i| extra.get(i + 1))
            .and_then(|e| e.strip_prefix("unix://"))
            .map_or_else(|| dir.join("csi.sock"), PathBuf::from);
        let extra: Vec<&str> = match extra.iter().position(|a| *a == "--endpoint") {
            Some(i) => [&extra[..i], &extra[(i + 2).min(extra.len())..]].concat(),
            None => extra.to_vec(),
        };
        let mut args: Vec<String> = vec![
            "node".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--state".into(),
            dir.join("state").display().to_string(),
            "--node-id".into(),
            node_id.into(),
        ];
        for i in 0..disks {
            let name = if i == 0 {
                "disk".to_owned()
            } else {
                format!("disk{i}")
            };
            args.push("--disk".into());
            args.push(dir.join(name).display().to_string());
        }
        for c in controllers {
            args.push("--controller".into());
            args.push(c.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Driver::spawn(&args, socket, node_id, &root.join(format!("{node_id}.log")))
    }

    fn spawn(args: &[String], socket: PathBuf, node_id: &str, log: &Path) -> Driver {
        Driver::spawn_cmd(Command::new(csi_bin()), args, socket, node_id, log)
    }

    fn spawn_cmd(
        mut cmd: Command,
        args: &[String],
        socket: PathBuf,
        node_id: &str,
        log: &Path,
    ) -> Driver {
        // Appended: a restarted driver keeps its predecessor's log.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the driver log");
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start zebu-csi");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
        if n == 0 || !line.contains("ready") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "zebu-csi did not become ready: printed {line:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Driver {
            child,
            endpoint: format!("unix://{}", socket.display()),
            socket,
            ready: line.trim().to_owned(),
            node_id: node_id.into(),
            log: log.to_owned(),
        }
    }

    /// Waits (up to a minute) for it to die at the crash point `point` it
    /// was started with; panics, with its log, when it did not.
    pub fn wait_crashed_at(&mut self, point: &str) {
        use std::os::unix::process::ExitStatusExt;
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("waiting for zebu-csi") {
                break st;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "zebu-csi never reached crash point {point}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            status.signal() == Some(libc::SIGKILL)
                && log.contains(&format!("{}={point}:", zebu_proto::crash::ENV)),
            "zebu-csi ended with {status} instead of dying at crash point {point}; log:\n{log}"
        );
    }

    /// SIGTERM and wait (the agent leaves its replicas and engines running).
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn channel(endpoint: &str) -> Channel {
    zebu_common::grpc::connect(endpoint)
        .await
        .unwrap_or_else(|e| panic!("connecting to {endpoint}: {e}"))
}

pub async fn controller(endpoint: &str) -> ControllerClient<Channel> {
    ControllerClient::new(channel(endpoint).await)
}

pub async fn node(endpoint: &str) -> NodeClient<Channel> {
    NodeClient::new(channel(endpoint).await)
}

pub async fn identity(endpoint: &str) -> IdentityClient<Channel> {
    IdentityClient::new(channel(endpoint).await)
}

/// Pids of processes whose command line mentions `path`.
pub fn pids_mentioning(path: &Path) -> Vec<i32> {
    pids_with(&[&path.display().to_string()])
}

/// Pids (sorted; not this process) whose command line contains every one
/// of `words`.
pub fn pids_with(words: &[&str]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if words.iter().all(|w| cmd.contains(w)) {
                out.push(pid);
            }
        }
    }
    out.sort();
    out
}

/// Loop devices backed by files under `path`.
pub fn loops_under(path: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-nO", "NAME,BACK-FILE"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let needle = path.display().to_string();
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (dev, file) = (it.next()?, it.next()?);
            file.starts_with(&needle).then(|| dev.to_owned())
        })
        .collect()
}

/// Removes everything a test left under `root`: loop devices, mounts
/// (deepest first), then processes.
pub fn scrub(root: &Path) {
    // Loop devices first, while their backing files' paths still resolve
    // (a busy one is detached as soon as its last user goes).
    let loops = loops_under(root);
    for d in &loops {
        let _ = Command::new("losetup").args(["-d", d]).status();
    }
    zebu_testkit::unmount_all_under(root);
    for pid in pids_mentioning(root) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Scrubs its directory when dropped (even when the test panicked).
pub struct Scrub(pub PathBuf);

impl Drop for Scrub {
    fn drop(&mut self) {
        scrub(&self.0);
    }
}

// ---------------------------------------------------------------------------
// CSI flows shared by the driver tests.

/// An ext4 single-node-writer mount capability.
pub fn mount_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Attachment of one volume on one node through CSI (the kubelet's calls).
pub struct Attached {
    pub volume: String,
    pub staging: PathBuf,
    pub target: PathBuf,
    pub node_endpoint: String,
    pub node_id: String,
    /// What ControllerPublishVolume answered.
    pub publish_context: std::collections::HashMap<String, String>,
}

pub async fn attach(ctl_ep: &str, node: &Driver, volume: &str, root: &Path) -> Attached {
    let mut ctl = controller(ctl_ep).await;
    let mut nd = self::node(&node.endpoint).await;
    let publish = ctl
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.node_id.clone(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("ControllerPublishVolume")
        .into_inner();
    let staging = root.join(format!("staging-{volume}"));
    let target = root.join(format!("target-{volume}"));
    nd.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: volume.into(),
        publish_context: publish.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    })
    .await
    .expect("NodeStageVolume");
    let a = Attached {
        volume: volume.into(),
        staging,
        target,
        node_endpoint: node.endpoint.clone(),
        node_id: node.node_id.clone(),
        publish_context: publish.publish_context,
    };
    publish_target(&a).await;
    a
}

/// NodePublishVolume of a staged volume to its target path.
pub async fn publish_target(a: &Attached) {
    self::node(&a.node_endpoint)
        .await
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: a.volume.clone(),
            publish_context: a.publish_context.clone(),
            staging_target_path: a.staging.display().to_string(),
            target_path: a.target.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
}

/// Asserts that no process but `drivers` mentions `root`, and that no
/// mount or loop device under it is left.
pub fn assert_nothing_left(root: &Path, drivers: &[i32]) {
    let others: Vec<String> = pids_mentioning(root)
        .into_iter()
        .filter(|p| !drivers.contains(p))
        .map(|p| {
            String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default(),
            )
            .replace('\0', " ")
        })
        .collect();
    assert!(others.is_empty(), "processes left: {others:?}");
    let mounts = mounts_under(root);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let loops = loops_under(root);
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
}

pub async fn detach(ctl_ep: &str, a: &Attached) {
    let mut ctl = controller(ctl_ep).await;
    let mut nd = self::node(&a.node_endpoint).await;
    nd.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: a.volume.clone(),
        target_path: a.target.display().to_string(),
    })
    .await
    .expect("NodeUnpublishVolume");
    nd.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: a.volume.clone(),
        staging_target_path: a.staging.display().to_string(),
    })
    .await
    .expect("NodeUnstageVolume");
    ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: a.volume.clone(),
        node_id: a.node_id.clone(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublishVolume");
}

/// Deletes every volume, snapshot and node of the Kubernetes store at
/// `kubeconfig` (through the store, which lifts the volumes' finalizers).
pub fn clear_kube_store(kubeconfig: &Path) {
    use zebu_csi::store::{KubeStore, Store};
    let s = KubeStore::connect(Some(kubeconfig)).expect("connect to the test cluster");
    for v in s.list_volumes().expect("list volumes") {
        s.delete_volume(&v.value.id, None).expect("delete a volume");
    }
    for v in s.list_snapshots().expect("list snapshots") {
        s.delete_snapshot(&v.value.id, None)
            .expect("delete a snapshot");
    }
    for v in s.list_nodes().expect("list nodes") {
        s.delete_node(&v.value.node_id, None)
            .expect("delete a node");
    }
    // And the nodes' heartbeat Leases.
    zebu_testkit::run(
        &mut zebu_testkit::kube::cluster().kubectl(&[
            "delete",
            "lease",
            "-A",
            "-l",
            zebu_csi::node_lease::NODE_LABEL,
        ]),
        zebu_testkit::SHORT,
    )
    .expect_ok();
}

/// A filesystem frozen with `fsfreeze` (no writes reach its device) until
/// dropped, also when the test fails.
pub struct Frozen(String);

impl Frozen {
    pub fn new(mountpoint: &str) -> Frozen {
        let o = Command::new("fsfreeze")
            .args(["-f", mountpoint])
            .output()
            .expect("run fsfreeze");
        assert!(o.status.success(), "fsfreeze -f {mountpoint}: {o:?}");
        Frozen(mountpoint.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").args(["-u", &self.0]).status();
    }
}

/// The data files of every replica under `root` (each replica directory
/// holds `layers/<id>.img`).
pub fn layer_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            layer_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "img")
            && p.parent().is_some_and(|d| d.ends_with("layers"))
        {
            out.push(p);
        }
    }
}

/// Flips bytes in the first block holding data of the first replica data
/// file found under `root` (the only volume's replicas), behind the
/// replica's back; returns the file.
pub fn corrupt_first_data_block(root: &Path) -> PathBuf {
    let mut files = Vec::new();
    layer_files(root, &mut files);
    files.sort();
    for f in files {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f)
            .expect("open a layer file");
        let Ok(at) = nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekData) else {
            continue; // no data in this layer
        };
        let mut b = [0u8; 32];
        file.read_exact_at(&mut b, at as u64 + 100).expect("read");
        b.iter_mut().for_each(|x| *x = !*x);
        file.write_all_at(&b, at as u64 + 100).expect("write");
        file.sync_all().expect("sync");
        return f;
    }
    panic!("no replica data file with data under {}", root.display());
}

/// Writes the agents' bearer token under `root` and returns the flags every
/// process of a cluster test gets: that token, the Kubernetes store of
/// `kubeconfig`, and `namespace` for the driver's Leases.
pub fn cluster_flags(root: &Path, kubeconfig: &Path, namespace: &str) -> Vec<String> {
    let token = root.join("agent-token");
    std::fs::write(&token, "zebu-test-token-0123456789\n").expect("write the token");
    [
        "--agent-token-file",
        &token.display().to_string(),
        "--store",
        "kubernetes",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--namespace",
        namespace,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// CreateVolume of a 128 MiB mount volume named `name` with `replicas`
/// replicas and the parameters `extra`.
pub fn create_request(
    name: &str,
    replicas: u32,
    extra: &[(&str, &str)],
) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 128 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: [("numberOfReplicas".to_owned(), replicas.to_string())]
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
        ..Default::default()
    }
}

/// Creates the volume of [`create_request`], retrying (up to a minute)
/// while node plugins are still registering.
pub async fn create(ep: &str, name: &str, replicas: u32, extra: &[(&str, &str)]) -> pb::Volume {
    let mut ctl = controller(ep).await;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match ctl
            .create_volume(create_request(name, replicas, extra))
            .await
        {
            Ok(r) => return r.into_inner().volume.expect("volume"),
            Err(s)
                if s.code() == tonic::Code::ResourceExhausted
                    && std::time::Instant::now() < end =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(s) => panic!("CreateVolume: {s}"),
        }
    }
}

/// Unpublishes and unstages `a`, then deletes its volume.
pub async fn detach_and_delete(ep: &str, a: &Attached) {
    detach(ep, a).await;
    controller(ep)
        .await
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: a.volume.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
}
