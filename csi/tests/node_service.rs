//! Integration tests of the CSI Node service (`zebu_csi::node`), served over
//! a Unix socket and called with the generated CSI client, against a real
//! NBD server (`nbdkit memory` / `nbdkit file` in place of an engine),
//! nbdfuse, loop devices and ext4/xfs mounts.
//!
//! Need root, /dev/fuse and the tools named in `require_tools` (they fail,
//! never skip, when something is missing). Tests that mount run one at a
//! time ([`serial`]). Guards are declared nbdkit → server → [`Cleanup`], so
//! a panicking test unmounts and detaches first, then stops the server and
//! nbdkit, then removes the temp dir.
//!
//! The engine address in `publish_context` points at a closed port: the
//! volume condition must then report the engine unreachable. No test
//! depends on timing: waits are polls bounded by a deadline.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Code;
use tonic::transport::Channel;
use zebu_common::context::{PUBLISH_ENGINE, PUBLISH_NBD_URI};
use zebu_csi::node::{NodeConfig, NodeService};
use zebu_proto::csi::node_client::NodeClient;
use zebu_proto::csi::node_server::NodeServer;
use zebu_proto::csi::volume_capability::access_mode::Mode;
use zebu_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use zebu_proto::csi::{self, VolumeCapability};

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers and guards.

use zebu_testkit::{NbdKit, require_tool, serial, tempdir};

fn require_tools() {
    assert!(
        std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0),
        "these tests need root (mount, loop devices, FUSE)"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    for (tool, package) in [
        ("nbdkit", "nbdkit"),
        ("nbdfuse", "libnbd-bin"),
        ("nbdinfo", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "util-linux"),
        ("blkid", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
    ] {
        require_tool(tool, package);
    }
}

/// The node service on a Unix socket, with a runtime and a client.
struct Node {
    rt: tokio::runtime::Runtime,
    client: NodeClient<Channel>,
    state_dir: PathBuf,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let state_dir = dir.join("state");
        let sock = dir.join("csi.sock");
        let svc = NodeService::new(NodeConfig {
            node_id: "node-1".into(),
            max_volumes: 16,
            state_dir: state_dir.clone(),
        });
        let incoming = {
            let _g = rt.enter();
            zebu_common::grpc::bind_unix(&sock).expect("bind the CSI socket")
        };
        let server = rt.spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(NodeServer::new(svc))
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("node server: {e}");
            }
        });
        let endpoint = format!("unix://{}", sock.display());
        let ch = rt
            .block_on(zebu_common::grpc::connect(&endpoint))
            .expect("connect to the node service");
        Node {
            rt,
            client: NodeClient::new(ch),
            state_dir,
            server: Some(server),
        }
    }

    fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.rt.block_on(c.node_stage_volume(req)).map(|_| ())
    }

    fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
            }))
            .map(|_| ())
    }

    fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.rt.block_on(c.node_publish_volume(req)).map(|_| ())
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: path_str(target),
            }))
            .map(|_| ())
    }

    fn stats(
        &self,
        id: &str,
        path: &str,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.into(),
                staging_target_path: String::new(),
            }))
            .map(|r| r.into_inner())
    }

    fn expand(
        &self,
        id: &str,
        path: &Path,
        required: u64,
    ) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: path_str(path),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: required as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .map(|r| r.into_inner())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// Unmounts every mount under the temp dir (targets, staging, stray FUSE
/// mounts) and detaches every volume the service attached, when dropped.
struct Cleanup {
    dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        use nix::mount::{MntFlags, umount2};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Publish targets and staging mounts (not FUSE: detach handles it).
        let mounts = zebu_csi::attach::read_mountinfo().unwrap_or_default();
        for m in mounts.iter().rev() {
            if m.mount_point.starts_with(&self.dir)
                && !m.fstype.starts_with("fuse")
                && let Err(e) = umount2(&m.mount_point, MntFlags::empty())
            {
                eprintln!("cleanup: umount {}: {e}; lazily", m.mount_point.display());
                let _ = umount2(&m.mount_point, MntFlags::MNT_DETACH);
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.state_dir.join("node")) {
            for entry in rd.flatten() {
                let p = entry.path();
                if let Err(e) = rt.block_on(zebu_csi::attach::detach(&p)) {
                    eprintln!("cleanup: detach {}: {e}", p.display());
                }
            }
        }
    }
}

/// Everything a test needs; fields drop in declaration order: cleanup,
/// server, nbdkit, temp dir.
struct Env {
    _cleanup: Cleanup,
    node: Node,
    nbd: NbdKit,
    dir: tempfile::TempDir,
    engine: String,
}

impl Env {
    fn new(plugin_args: impl FnOnce(&Path) -> Vec<String>) -> Env {
        require_tools();
        let dir = tempdir();
        let args = plugin_args(dir.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nbd = NbdKit::start(dir.path(), &args);
        Env::with(dir, nbd)
    }

    fn with(dir: tempfile::TempDir, nbd: NbdKit) -> Env {
        let node = Node::start(dir.path());
        Env {
            _cleanup: Cleanup {
                dir: dir.path().to_owned(),
                state_dir: node.state_dir.clone(),
            },
            node,
            nbd,
            engine: closed_port(),
            dir,
        }
    }

    fn memory(size: u64) -> Env {
        require_tools();
        let dir = tempdir();
        let nbd = NbdKit::memory(dir.path(), size);
        Env::with(dir, nbd)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn publish_context(&self) -> HashMap<String, String> {
        HashMap::from([
            (PUBLISH_NBD_URI.to_owned(), self.nbd.uri.clone()),
            (PUBLISH_ENGINE.to_owned(), self.engine.clone()),
        ])
    }

    fn stage_req(
        &self,
        id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            publish_context: self.publish_context(),
            staging_target_path: path_str(staging),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    fn publish_req(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            publish_context: self.publish_context(),
            staging_target_path: path_str(staging),
            target_path: path_str(target),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }
    }
}

/// A TCP address nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr.to_string()
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn ext4() -> VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}

fn mount_source(path: &Path) -> Option<PathBuf> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(zebu_csi::attach::mount_entry(path))
        .expect("mountinfo")
        .map(|m| m.source)
}

fn blkid_type(device: &Path) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .expect("blkid");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn assert_erofs(path: &Path) {
    let err = std::fs::write(path, b"nope").expect_err("write on a read-only publish succeeded");
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "expected EROFS, got {err}"
    );
}

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: csi::volume_usage::Unit) -> csi::VolumeUsage {
    *r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {r:?}"))
}

fn no_loop_reads(dir: &Path) {
    let out = Command::new("losetup")
        .args(["-l", "-n", "-O", "BACK-FILE"])
        .output()
        .expect("losetup -l");
    let listing = String::from_utf8_lossy(&out.stdout);
    let d = dir.to_string_lossy();
    assert!(
        !listing.lines().any(|l| l.trim().starts_with(d.as_ref())),
        "a loop device still reads a file under {d}:\n{listing}"
    );
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn ext4_stage_publish_read_only_stats_unstage_and_restage_keeps_data() {
    let _s = serial();
    let env = Env::memory(256 * MIB);
    let n = &env.node;
    let (id, staging) = ("vol-ext4", env.path("staging"));
    let (t1, t2) = (env.path("pods/a/target"), env.path("pods/b/target"));
    std::fs::create_dir_all(&staging).unwrap();

    n.stage(env.stage_req(id, &staging, ext4())).expect("stage");
    let device = mount_source(&staging).expect("staging path is mounted");
    assert!(
        device.to_string_lossy().starts_with("/dev/loop"),
        "{device:?}"
    );
    assert_eq!(blkid_type(&device), "ext4", "mkfs did not happen");
    // Idempotent.
    n.stage(env.stage_req(id, &staging, ext4()))
        .expect("stage again");
    assert_eq!(mount_source(&staging).as_ref(), Some(&device));
    // Same volume elsewhere, or incompatibly: refused.
    assert_code(
        n.stage(env.stage_req(id, &env.path("other"), ext4())),
        Code::FailedPrecondition,
        "already staged",
    );
    assert_code(
        n.stage(env.stage_req(id, &staging, mount_cap("xfs", Mode::SingleNodeWriter))),
        Code::AlreadyExists,
        "incompatible",
    );

    // Publish read-write, write through the target.
    n.publish(env.publish_req(id, &staging, &t1, ext4(), false))
        .expect("publish rw");
    n.publish(env.publish_req(id, &staging, &t1, ext4(), false))
        .expect("publish rw again");
    write_synced(&t1.join("hello.txt"), b"hello zebu");
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"hello zebu"
    );
    // Same target read-only: incompatible.
    assert_code(
        n.publish(env.publish_req(id, &staging, &t1, ext4(), true)),
        Code::AlreadyExists,
        "already published",
    );

    // Second target, read-only (readonly flag), and a third by access mode.
    n.publish(env.publish_req(id, &staging, &t2, ext4(), true))
        .expect("publish ro");
    assert_eq!(std::fs::read(t2.join("hello.txt")).unwrap(), b"hello zebu");
    assert_erofs(&t2.join("nope.txt"));
    let t3 = env.path("pods/c/target");
    n.publish(env.publish_req(
        id,
        &staging,
        &t3,
        mount_cap("ext4", Mode::SingleNodeReaderOnly),
        false,
    ))
    .expect("publish reader-only mode");
    assert_erofs(&t3.join("nope.txt"));
    n.unpublish(id, &t3).expect("unpublish t3");

    // Stats.
    let st = n.stats(id, &path_str(&t1)).expect("stats");
    let bytes = usage(&st, csi::volume_usage::Unit::Bytes);
    let inodes = usage(&st, csi::volume_usage::Unit::Inodes);
    assert!(
        bytes.total > 200 * MIB as i64 && bytes.used > 0 && bytes.available > 0,
        "{bytes:?}"
    );
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    let cond = st.volume_condition.expect("volume condition");
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("cannot reach") && cond.message.contains(&env.engine),
        "{cond:?}"
    );
    n.stats(id, &path_str(&staging))
        .expect("stats on the staging path");
    assert_code(n.stats(id, "some/path"), Code::NotFound, "some/path");
    assert_code(
        n.stats(id, &path_str(&env.path("elsewhere"))),
        Code::NotFound,
        "neither staged nor published",
    );
    assert_code(
        n.stats("vol-unknown", &path_str(&t1)),
        Code::NotFound,
        "not staged",
    );

    // Cannot unstage while published.
    assert_code(
        n.unstage(id, &staging),
        Code::FailedPrecondition,
        "still published",
    );

    n.unpublish(id, &t1).expect("unpublish t1");
    n.unpublish(id, &t2).expect("unpublish t2");
    assert!(!t1.exists() && !t2.exists(), "targets not removed");
    n.unpublish(id, &t1).expect("unpublish again (idempotent)");

    n.unstage(id, &staging).expect("unstage");
    assert_eq!(mount_source(&staging), None, "staging still mounted");
    assert!(staging.is_dir(), "the CO's staging dir must stay");
    no_loop_reads(env.dir.path());
    assert!(
        !env.node.state_dir.join("node").join(id).exists(),
        "volume state left"
    );
    n.unstage(id, &staging).expect("unstage again (idempotent)");

    // Restage: same data, no reformat.
    n.stage(env.stage_req(id, &staging, ext4()))
        .expect("restage");
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"hello zebu"
    );
    n.unstage(id, &staging).expect("unstage");
    no_loop_reads(env.dir.path());
}

#[test]
fn block_volume_is_published_as_a_device_of_the_export_size() {
    let _s = serial();
    let env = Env::memory(192 * MIB);
    let n = &env.node;
    let (id, staging, target) = ("vol-block", env.path("staging"), env.path("pods/a/dev"));
    std::fs::create_dir_all(&staging).unwrap();

    n.stage(env.stage_req(id, &staging, block_cap()))
        .expect("stage block");
    n.stage(env.stage_req(id, &staging, block_cap()))
        .expect("stage block again");
    assert_eq!(mount_source(&staging), None, "block staging mounts nothing");
    assert_code(
        n.stage(env.stage_req(id, &staging, ext4())),
        Code::AlreadyExists,
        "incompatible",
    );
    assert_code(
        n.publish(env.publish_req(id, &staging, &target, ext4(), false)),
        Code::FailedPrecondition,
        "raw block device",
    );
    n.publish(env.publish_req(id, &staging, &target, block_cap(), false))
        .expect("publish block");
    n.publish(env.publish_req(id, &staging, &target, block_cap(), false))
        .expect("publish block again");

    let md = std::fs::metadata(&target).unwrap();
    assert!(
        md.file_type().is_block_device(),
        "target is not a block device"
    );
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 192 * MIB);
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0; 4096];
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xa5));
    drop(f);

    let st = n.stats(id, &path_str(&target)).expect("stats");
    assert_eq!(st.usage.len(), 1, "{st:?}");
    assert_eq!(
        usage(&st, csi::volume_usage::Unit::Bytes).total,
        (192 * MIB) as i64
    );
    assert!(st.volume_condition.is_some_and(|c| c.abnormal));

    n.unpublish(id, &target).expect("unpublish");
    assert!(!target.exists(), "target file not removed");
    n.unstage(id, &staging).expect("unstage");
    no_loop_reads(env.dir.path());
}

#[test]
fn xfs_round_trip_keeps_data() {
    let _s = serial();
    let env = Env::memory(512 * MIB);
    let n = &env.node;
    let (id, staging, target) = ("vol-xfs", env.path("staging"), env.path("pods/a/t"));
    let xfs = || mount_cap("xfs", Mode::SingleNodeWriter);

    n.stage(env.stage_req(id, &staging, xfs()))
        .expect("stage xfs");
    let device = mount_source(&staging).expect("mounted");
    assert_eq!(blkid_type(&device), "xfs");
    n.publish(env.publish_req(id, &staging, &target, xfs(), false))
        .expect("publish");
    write_synced(&target.join("data"), b"xfs data");
    n.unpublish(id, &target).expect("unpublish");
    n.unstage(id, &staging).expect("unstage");
    n.stage(env.stage_req(id, &staging, xfs()))
        .expect("restage");
    assert_eq!(std::fs::read(staging.join("data")).unwrap(), b"xfs data");
    // The device holds xfs: staging it as ext4 (after unstaging) is refused,
    // never reformatted.
    n.unstage(id, &staging).expect("unstage");
    assert_code(
        n.stage(env.stage_req(id, &staging, ext4())),
        Code::FailedPrecondition,
        "refusing to reformat",
    );
    assert!(
        !env.node.state_dir.join("node").join(id).exists(),
        "a failed first stage must roll back"
    );
    no_loop_reads(env.dir.path());
}

/// Expansion: while published the nbdfuse device cannot grow, and the
/// service says so; once unpublished it re-attaches and grows ext4 offline.
#[test]
fn expand_is_refused_while_published_and_done_by_reattaching_when_not() {
    let _s = serial();
    let env = Env::new(|dir| {
        let img = dir.join("export.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(128 * MIB)
            .unwrap();
        vec!["file".into(), path_str(&img)]
    });
    let n = &env.node;
    let img = env.path("export.img");
    let (id, staging, target) = ("vol-grow", env.path("staging"), env.path("pods/a/t"));

    n.stage(env.stage_req(id, &staging, ext4())).expect("stage");
    n.publish(env.publish_req(id, &staging, &target, ext4(), false))
        .expect("publish");
    write_synced(&target.join("keep"), b"keep me");

    // The "controller" grows the export.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(192 * MIB)
        .unwrap();
    // Published: the device grows in place (the bridge over nbdkit's export); ext4 then
    // grows online where the plugin has CAP_SYS_RESOURCE, and is refused
    // with that reason where it has not (this machine's root).
    let cap_sys_resource = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0);
    let online = n.expand(id, &target, 192 * MIB);
    if cap_sys_resource {
        assert_eq!(
            online.expect("online ext4 expansion").capacity_bytes,
            (192 * MIB) as i64
        );
    } else {
        assert_code(online, Code::FailedPrecondition, "CAP_SYS_RESOURCE");
    }
    assert_code(
        n.expand(id, &env.path("elsewhere"), 192 * MIB),
        Code::NotFound,
        "neither staged nor published",
    );

    n.unpublish(id, &target).expect("unpublish");
    // More than the export has: the controller must expand first.
    assert_code(
        n.expand(id, &staging, 256 * MIB),
        Code::FailedPrecondition,
        "ControllerExpandVolume",
    );
    assert!(
        mount_source(&staging).is_some(),
        "staging mount not restored"
    );
    let r = n
        .expand(id, &staging, 192 * MIB)
        .expect("expand unpublished");
    assert_eq!(r.capacity_bytes, (192 * MIB) as i64);
    let st = n.stats(id, &path_str(&staging)).expect("stats");
    let total = usage(&st, csi::volume_usage::Unit::Bytes).total;
    assert!(total > 160 * MIB as i64, "filesystem not grown: {total}");
    assert_eq!(std::fs::read(staging.join("keep")).unwrap(), b"keep me");
    // Idempotent.
    n.expand(id, &staging, 192 * MIB).expect("expand again");

    n.publish(env.publish_req(id, &staging, &target, ext4(), false))
        .expect("publish after expansion");
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"keep me");
    n.unpublish(id, &target).expect("unpublish");
    n.unstage(id, &staging).expect("unstage");
    no_loop_reads(env.dir.path());
}

#[test]
fn argument_errors_and_info() {
    let _s = serial();
    let env = Env::memory(64 * MIB);
    let n = &env.node;
    let staging = env.path("staging");
    let target = env.path("target");
    let mut c = n.client.clone();

    // NodeStageVolume.
    let good = env.stage_req("v1", &staging, ext4());
    let mut r = good.clone();
    r.volume_id.clear();
    assert_code(n.stage(r), Code::InvalidArgument, "volume_id");
    let mut r = good.clone();
    r.staging_target_path.clear();
    assert_code(n.stage(r), Code::InvalidArgument, "staging_target_path");
    let mut r = good.clone();
    r.volume_capability = None;
    r.publish_context = HashMap::from([("device".into(), "/dev/mock".into())]);
    assert_code(n.stage(r), Code::InvalidArgument, "volume_capability");
    let mut r = good.clone();
    r.publish_context.clear();
    assert_code(
        n.stage(r),
        Code::FailedPrecondition,
        "ControllerPublishVolume",
    );
    let mut r = good.clone();
    r.publish_context
        .insert(PUBLISH_NBD_URI.into(), "/dev/mock".into());
    assert_code(n.stage(r), Code::InvalidArgument, "ControllerPublishVolume");
    assert_code(
        n.stage(env.stage_req("v1", &staging, mount_cap("btrfs", Mode::SingleNodeWriter))),
        Code::InvalidArgument,
        "btrfs",
    );
    assert!(!env.node.state_dir.join("node/v1").exists());

    // NodePublishVolume.
    let good = env.publish_req("v1", &staging, &target, ext4(), false);
    let mut r = good.clone();
    r.volume_id.clear();
    assert_code(n.publish(r), Code::InvalidArgument, "volume_id");
    let mut r = good.clone();
    r.target_path.clear();
    assert_code(n.publish(r), Code::InvalidArgument, "target_path");
    let mut r = good.clone();
    r.volume_capability = None;
    assert_code(n.publish(r), Code::InvalidArgument, "volume_capability");
    assert_code(n.publish(good), Code::FailedPrecondition, "not staged");
    assert!(!target.exists());

    // NodeUnpublishVolume / NodeUnstageVolume.
    assert_code(n.unpublish("", &target), Code::InvalidArgument, "volume_id");
    assert_code(
        n.unpublish("v1", Path::new("")),
        Code::InvalidArgument,
        "target_path",
    );
    assert_code(n.unstage("", &staging), Code::InvalidArgument, "volume_id");
    assert_code(
        n.unstage("v1", Path::new("")),
        Code::InvalidArgument,
        "staging_target_path",
    );
    n.unpublish("v1", &target)
        .expect("unpublish of nothing is OK");
    n.unstage("v1", &staging).expect("unstage of nothing is OK");

    // NodeGetVolumeStats.
    assert_code(n.stats("", "some/path"), Code::InvalidArgument, "volume_id");
    assert_code(n.stats("v1", ""), Code::InvalidArgument, "volume_path");
    assert_code(n.stats("v1", "some/path"), Code::NotFound, "not staged");

    // NodeExpandVolume.
    assert_code(n.expand("", &target, 0), Code::InvalidArgument, "volume_id");
    assert_code(
        n.expand("v1", Path::new(""), 0),
        Code::InvalidArgument,
        "volume_path",
    );
    assert_code(
        n.expand("v1", Path::new("some/path"), 0),
        Code::NotFound,
        "not staged",
    );

    // NodeGetInfo / NodeGetCapabilities.
    let info =
        n.rt.block_on(c.node_get_info(csi::NodeGetInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(info.max_volumes_per_node, 16);
    let caps =
        n.rt.block_on(c.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    use csi::node_service_capability::rpc::Type;
    let mut got: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("capability without type"),
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            Type::StageUnstageVolume as i32,
            Type::GetVolumeStats as i32,
            Type::ExpandVolume as i32,
            Type::VolumeCondition as i32,
            Type::SingleNodeMultiWriter as i32,
        ]
    );
}
