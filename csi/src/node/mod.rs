//! The CSI Node service: staging, publishing, statistics and expansion of
//! Zebu volumes on the node where they are used. One file per RPC family,
//! each an `impl NodeService` block: `stage`, `publish`, `stats`, `expand`;
//! this file holds validation, the per-volume records and the service.
//!
//! # How a volume reaches a pod
//!
//! ControllerPublishVolume starts the volume's engine on this node and
//! returns a `publish_context` naming its NBD socket
//! ([`PUBLISH_NBD_URI`](zebu_common::context::PUBLISH_NBD_URI)), its control
//! address ([`PUBLISH_ENGINE`](zebu_common::context::PUBLISH_ENGINE)) and the
//! file it serves the volume as ([`PUBLISH_FILE`](zebu_common::context::PUBLISH_FILE)). Then:
//!
//! * **NodeStageVolume** attaches the volume as a block device
//!   ([`attach::attach`]: a loop device over the engine's file; the FUSE
//!   bridge when the engine serves none). Mount access: makes the
//!   filesystem if the device is blank (never reformats) and mounts it at
//!   the staging path. Block access: nothing more.
//! * **NodePublishVolume** bind-mounts the staging mount onto the target
//!   directory, or (block access) the device node onto the target file.
//! * **NodeUnpublishVolume** / **NodeUnstageVolume** undo that.
//! * **NodeGetVolumeStats** reports usage and a volume condition from the
//!   engine's `Status` (faulted or unreachable → abnormal).
//! * **NodeExpandVolume** grows the filesystem; see "Expansion" below.
//!
//! # State
//!
//! Each staged volume has a directory `STATE_DIR/node/<volume id>/` holding
//! the node record (`volume.json`: staging path, access type, filesystem,
//! NBD URI, engine address and file, device, publish targets) and the attach state.
//! Nothing is kept only in memory, so a restarted plugin carries on.
//!
//! # Invariants
//!
//! * One operation per volume at a time: every mutating call claims the
//!   volume id in an [`InFlight`] set first; a concurrent call for the same
//!   volume gets `ABORTED`. NodeGetVolumeStats only reads and claims nothing.
//! * The record is written before the volume is attached, so every
//!   attachment has a record and NodeUnstageVolume can always clean up.
//! * Nothing is ever removed recursively: publish targets are removed with
//!   `rmdir`/`unlink` after they were unmounted, so a failed unmount can
//!   never delete volume data.
//! * A volume is never detached while one of its publish targets is still
//!   mounted (NodeUnstageVolume answers `FAILED_PRECONDITION`).
//!
//! # Expansion
//!
//! Volumes are attached through Zebu's FUSE bridge, whose file (and so the
//! loop device over it) grows in place when the export grows
//! ([`attach::refresh_size`]). NodeExpandVolume therefore:
//!
//! * when the volume is **published** (a pod uses it): grows the device,
//!   then the filesystem online ([`attach::expand_filesystem`]); where the
//!   device cannot grow (an attachment made with nbdfuse) and is smaller
//!   than `required_bytes`, it answers `FAILED_PRECONDITION` saying the
//!   volume must be unstaged and staged again (it does not pretend). Online
//!   ext4 growth also needs `CAP_SYS_RESOURCE`.
//! * when the volume is **staged but not published** (the kubelet's offline
//!   expansion, between NodeStage and NodePublish): unmounts the staging
//!   mount, re-attaches the export (picking up its new size), grows the
//!   filesystem (ext4 offline, xfs mounted) and mounts it again.
//!
//! Block volumes have no filesystem: expansion is only the re-attach.

mod expand;
mod publish;
mod record;
mod stage;
mod stats;

pub use crate::inflight::{InFlight, OpGuard};

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};
use zebu_proto::csi;
use zebu_proto::csi::node_service_capability::rpc::Type as RpcType;
use zebu_proto::csi::volume_capability::access_mode::Mode;
use zebu_proto::csi::volume_capability::{AccessType, MountVolume};

use crate::attach::{self, AttachError, VolumeStats};
use record::{Access, RecordError, Records, Target, VolumeRecord};
use zebu_common::context::{PUBLISH_ENGINE, PUBLISH_FILE, PUBLISH_NBD_URI};

/// How long NodeGetVolumeStats waits for the engine's `Status`.
pub const ENGINE_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The default filesystem when the capability names none.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// Configuration of the node service.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, as the controller knows it (NodeGetInfo).
    pub node_id: String,
    /// Most volumes this node can use at once; 0 = no limit.
    pub max_volumes: u64,
    /// Where per-volume state lives (`STATE_DIR/node/...`); must survive
    /// plugin restarts.
    pub state_dir: PathBuf,
}

/// The CSI Node service. See the module docs.
#[derive(Debug)]
pub struct NodeService {
    cfg: NodeConfig,
    records: Records,
    ops: InFlight,
}

impl NodeService {
    /// A node service keeping its state under `cfg.state_dir`.
    pub fn new(cfg: NodeConfig) -> NodeService {
        NodeService {
            records: Records::new(&cfg.state_dir),
            cfg,
            ops: InFlight::new(),
        }
    }

    /// The set of volumes with an operation in progress.
    pub fn in_flight(&self) -> &InFlight {
        &self.ops
    }
}

// ---------------------------------------------------------------------------
// Argument checking.

/// What a volume capability asks for.
#[derive(Debug, Clone)]
struct Capability {
    access: Access,
    /// The access mode allows only reading.
    read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one publish target at a time.
    single_writer: bool,
}

fn require<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

fn require_abs_path(value: &str, field: &str) -> Result<PathBuf, Status> {
    let p = Path::new(require(value, field)?);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} must be an absolute path, got {value:?}"
        )));
    }
    Ok(p.to_owned())
}

fn parse_capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_mode is required"))?;
    let mode = Mode::try_from(mode.mode).map_err(|_| {
        Status::invalid_argument(format!(
            "volume_capability.access_mode {} is not a known mode",
            mode.mode
        ))
    })?;
    if mode == Mode::Unknown {
        return Err(Status::invalid_argument(
            "volume_capability.access_mode is UNKNOWN",
        ));
    }
    let read_only = matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly);
    let access = match &cap.access_type {
        None => {
            return Err(Status::invalid_argument(
                "volume_capability.access_type is required (mount or block)",
            ));
        }
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if mode == Mode::MultiNodeMultiWriter {
                return Err(Status::invalid_argument(
                    "a mounted ext4/xfs filesystem cannot have writers on several nodes \
                     (MULTI_NODE_MULTI_WRITER); use block access",
                ));
            }
            parse_mount(m)?
        }
    };
    Ok(Capability {
        access,
        read_only,
        single_writer: mode == Mode::SingleNodeSingleWriter,
    })
}

fn parse_mount(m: &MountVolume) -> Result<Access, Status> {
    let fs_type = if m.fs_type.is_empty() {
        DEFAULT_FS_TYPE
    } else {
        m.fs_type.as_str()
    };
    if !attach::SUPPORTED_FILESYSTEMS.contains(&fs_type) {
        return Err(Status::invalid_argument(format!(
            "filesystem type {fs_type:?} is not supported (supported: {})",
            attach::SUPPORTED_FILESYSTEMS.join(", ")
        )));
    }
    if !m.volume_mount_group.is_empty() {
        return Err(Status::invalid_argument(
            "volume_mount_group is not supported by this driver",
        ));
    }
    Ok(Access::Mount {
        fs_type: fs_type.to_owned(),
        mount_flags: m.mount_flags.clone(),
    })
}

/// The NBD URI from `publish_context`, checked.
fn nbd_uri(
    ctx: &std::collections::HashMap<String, String>,
    volume_id: &str,
) -> Result<String, Status> {
    let uri = ctx.get(PUBLISH_NBD_URI).map(String::as_str).unwrap_or("");
    if uri.is_empty() {
        return Err(Status::failed_precondition(format!(
            "publish_context has no {PUBLISH_NBD_URI}: ControllerPublishVolume must run \
             for volume {volume_id} on this node first"
        )));
    }
    if !uri.starts_with("nbd+unix://") || !uri.contains("socket=") {
        return Err(Status::invalid_argument(format!(
            "publish_context {PUBLISH_NBD_URI} = {uri:?} is not an nbd+unix:///?socket=PATH URI \
             (ControllerPublishVolume must run first and provide it)"
        )));
    }
    Ok(uri.to_owned())
}

/// The engine's file from `publish_context`, if it names one: an absolute
/// path.
fn engine_file(
    ctx: &std::collections::HashMap<String, String>,
) -> Result<Option<std::path::PathBuf>, Status> {
    match ctx.get(PUBLISH_FILE).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(f) if f.starts_with('/') => Ok(Some(f.into())),
        Some(f) => Err(Status::invalid_argument(format!(
            "publish_context {PUBLISH_FILE} = {f:?} is not an absolute path"
        ))),
    }
}

fn engine_addr(ctx: &std::collections::HashMap<String, String>) -> Result<Option<String>, Status> {
    match ctx.get(PUBLISH_ENGINE).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(a) => zebu_common::grpc::Addr::parse(a)
            .map(|_| Some(a.to_owned()))
            .map_err(|e| {
                Status::invalid_argument(format!("publish_context {PUBLISH_ENGINE}: {e}"))
            }),
    }
}

// ---------------------------------------------------------------------------
// Error mapping.

fn attach_status(e: AttachError) -> Status {
    let msg = e.to_string();
    match e {
        AttachError::UnsupportedFilesystem { .. } => Status::invalid_argument(msg),
        AttachError::WrongFilesystem { .. }
        | AttachError::DeviceTooSmall { .. }
        | AttachError::Precondition { .. } => Status::failed_precondition(msg),
        AttachError::Timeout { .. } => Status::deadline_exceeded(msg),
        AttachError::NotReady { .. } => Status::unavailable(msg),
        AttachError::KernelNbdNotSupported { .. } => Status::unimplemented(msg),
        AttachError::Spawn { .. }
        | AttachError::Command { .. }
        | AttachError::Io { .. }
        | AttachError::Sys { .. }
        | AttachError::StateFile { .. }
        | AttachError::Cgroup { .. } => Status::internal(msg),
    }
}

fn record_status(e: RecordError) -> Status {
    match e {
        RecordError::IdTooLong(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Logs the outcome of an RPC once, where it is handled.
fn logged<T>(rpc: &str, volume_id: &str, r: Result<T, Status>) -> Result<Response<T>, Status> {
    match r {
        Ok(v) => Ok(Response::new(v)),
        Err(s) => {
            match s.code() {
                tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::Aborted
                | tonic::Code::AlreadyExists => {
                    info!(rpc, volume_id, code = ?s.code(), "{}", s.message())
                }
                _ => warn!(rpc, volume_id, code = ?s.code(), "{}", s.message()),
            }
            Err(s)
        }
    }
}

// ---------------------------------------------------------------------------
// Operations.

impl NodeService {
    fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>, Status> {
        self.records.load(volume_id).map_err(record_status)
    }

    fn store(&self, rec: &VolumeRecord) -> Result<(), Status> {
        self.records.store(rec).map_err(record_status)
    }

    fn dir(&self, volume_id: &str) -> Result<PathBuf, Status> {
        self.records.dir(volume_id).map_err(record_status)
    }

    fn staged(&self, volume_id: &str) -> Result<VolumeRecord, Status> {
        self.load(volume_id)?.ok_or_else(|| {
            Status::not_found(format!("volume {volume_id} is not staged on this node"))
        })
    }
}

fn mount_flags(a: &Access) -> &[String] {
    match a {
        Access::Mount { mount_flags, .. } => mount_flags,
        Access::Block => &[],
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn usage(unit: csi::volume_usage::Unit, total: u64, used: u64, available: u64) -> csi::VolumeUsage {
    csi::VolumeUsage {
        available: clamp(available),
        total: clamp(total),
        used: clamp(used),
        unit: unit as i32,
    }
}

async fn device_size(device: &Path) -> Result<u64, Status> {
    match attach::volume_stats(device).await.map_err(attach_status)? {
        VolumeStats::Block { total_bytes } => Ok(total_bytes),
        VolumeStats::Filesystem(_) => Err(Status::internal(format!(
            "{} is not a block device",
            device.display()
        ))),
    }
}

/// Removes an unmounted publish target: `rmdir` a directory, `unlink` a
/// file; absent is fine. Never recursive.
#[allow(clippy::result_large_err)]
fn remove_target(target: &Path) -> Result<(), Status> {
    let md = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Status::internal(format!("{}: {e}", target.display()))),
    };
    let r = if md.is_dir() {
        std::fs::remove_dir(target)
    } else {
        std::fs::remove_file(target)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            Err(Status::failed_precondition(format!(
                "target {} is not a mount point and is not empty; not removing it",
                target.display()
            )))
        }
        Err(e) => Err(Status::internal(format!(
            "removing target {}: {e}",
            target.display()
        ))),
    }
}

/// Asks the engine at `addr` for the volume state.
async fn engine_condition(addr: &str) -> csi::VolumeCondition {
    let status = tokio::time::timeout(ENGINE_STATUS_TIMEOUT, async {
        let ch = zebu_common::grpc::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        zebu_proto::engine::engine_client::EngineClient::new(ch)
            .status(zebu_proto::engine::StatusRequest {})
            .await
            .map(Response::into_inner)
            .map_err(|s| format!("Status call failed: {}", s.message()))
    })
    .await;
    let st = match status {
        Err(_) => {
            return csi::VolumeCondition {
                abnormal: true,
                message: format!(
                    "the volume's engine at {addr} did not answer within {ENGINE_STATUS_TIMEOUT:?}"
                ),
            };
        }
        Ok(Err(e)) => {
            return csi::VolumeCondition {
                abnormal: true,
                message: format!("cannot reach the volume's engine at {addr}: {e}"),
            };
        }
        Ok(Ok(st)) => st,
    };
    condition_of(&st)
}

/// The CSI condition for an engine's status: faulted → abnormal; degraded
/// and rebuilding serve I/O, so they are normal with a message saying so.
fn condition_of(st: &zebu_proto::engine::VolumeStatus) -> csi::VolumeCondition {
    let rw = st.replicas.iter().filter(|r| r.mode == "RW").count();
    let n = st.replicas.len();
    let (abnormal, message) = match st.state.as_str() {
        "healthy" => (false, format!("healthy: {rw} of {n} replicas in sync")),
        "degraded" => (
            false,
            format!("degraded: {rw} of {n} replicas in sync; I/O continues, redundancy is reduced"),
        ),
        "rebuilding" => (
            false,
            format!("rebuilding: {rw} of {n} replicas in sync; a replica is catching up"),
        ),
        "faulted" => (
            true,
            format!("faulted: no usable replica ({rw} of {n} in sync); I/O fails"),
        ),
        other => (false, format!("engine reports unknown state {other:?}")),
    };
    csi::VolumeCondition { abnormal, message }
}

// ---------------------------------------------------------------------------
// The gRPC service.

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self
            .stage(req)
            .await
            .map(|()| csi::NodeStageVolumeResponse {});
        logged("NodeStageVolume", &id, r)
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self
            .unstage(req)
            .await
            .map(|()| csi::NodeUnstageVolumeResponse {});
        logged("NodeUnstageVolume", &id, r)
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self
            .publish(req)
            .await
            .map(|()| csi::NodePublishVolumeResponse {});
        logged("NodePublishVolume", &id, r)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self
            .unpublish(req)
            .await
            .map(|()| csi::NodeUnpublishVolumeResponse {});
        logged("NodeUnpublishVolume", &id, r)
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self.stats(req).await;
        logged("NodeGetVolumeStats", &id, r)
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let r = self.expand(req).await;
        logged("NodeExpandVolume", &id, r)
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::VolumeCondition,
            RpcType::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: clamp(self.cfg.max_volumes),
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, BlockVolume};

    fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn capabilities_are_checked() {
        let c = parse_capability(Some(&mount_cap("", Mode::SingleNodeWriter))).unwrap();
        assert_eq!(
            c.access,
            Access::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec![]
            }
        );
        assert!(!c.read_only);
        let c = parse_capability(Some(&mount_cap("xfs", Mode::MultiNodeReaderOnly))).unwrap();
        assert!(c.read_only);
        let e = parse_capability(Some(&mount_cap("btrfs", Mode::SingleNodeWriter))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("btrfs"), "{}", e.message());
        let e = parse_capability(Some(&mount_cap("ext4", Mode::MultiNodeMultiWriter))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = parse_capability(None).unwrap_err();
        assert!(e.message().contains("volume_capability"), "{}", e.message());
        let block = csi::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        assert_eq!(
            parse_capability(Some(&block)).unwrap().access,
            Access::Block
        );
        let no_mode = csi::VolumeCapability {
            access_mode: None,
            ..block.clone()
        };
        assert_eq!(
            parse_capability(Some(&no_mode)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let no_type = csi::VolumeCapability {
            access_type: None,
            ..block
        };
        assert_eq!(
            parse_capability(Some(&no_type)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn publish_context_must_name_an_nbd_socket() {
        let mut ctx = std::collections::HashMap::new();
        let e = nbd_uri(&ctx, "v").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("ControllerPublishVolume"),
            "{}",
            e.message()
        );
        ctx.insert(PUBLISH_NBD_URI.to_owned(), "/dev/mock".to_owned());
        let e = nbd_uri(&ctx, "v").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("ControllerPublishVolume"),
            "{}",
            e.message()
        );
        ctx.insert(
            PUBLISH_NBD_URI.to_owned(),
            "nbd+unix:///?socket=/run/e.sock".to_owned(),
        );
        assert_eq!(
            nbd_uri(&ctx, "v").unwrap(),
            "nbd+unix:///?socket=/run/e.sock"
        );
        assert_eq!(engine_addr(&ctx).unwrap(), None);
        ctx.insert(PUBLISH_ENGINE.to_owned(), "nope".to_owned());
        assert_eq!(
            engine_addr(&ctx).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        ctx.insert(PUBLISH_ENGINE.to_owned(), "127.0.0.1:7000".to_owned());
        assert_eq!(
            engine_addr(&ctx).unwrap().as_deref(),
            Some("127.0.0.1:7000")
        );
    }

    #[test]
    fn engine_states_map_to_conditions() {
        use zebu_proto::engine::{ReplicaStatus, VolumeStatus};
        let st = |state: &str, modes: &[&str]| VolumeStatus {
            state: state.into(),
            replicas: modes
                .iter()
                .map(|m| ReplicaStatus {
                    mode: (*m).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let c = condition_of(&st("healthy", &["RW", "RW", "RW"]));
        assert!(!c.abnormal && c.message.contains("3 of 3"), "{c:?}");
        let c = condition_of(&st("degraded", &["RW", "ERR", "RW"]));
        assert!(!c.abnormal && c.message.contains("degraded") && c.message.contains("2 of 3"));
        let c = condition_of(&st("rebuilding", &["RW", "WO"]));
        assert!(!c.abnormal && c.message.contains("rebuilding"), "{c:?}");
        let c = condition_of(&st("faulted", &["ERR"]));
        assert!(c.abnormal && c.message.contains("faulted"), "{c:?}");
    }

    #[tokio::test]
    async fn a_second_operation_on_a_volume_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let svc = NodeService::new(NodeConfig {
            node_id: "n1".into(),
            max_volumes: 0,
            state_dir: dir.path().to_owned(),
        });
        let held = svc.in_flight().begin("vol-a").unwrap();
        let e = svc
            .unstage(csi::NodeUnstageVolumeRequest {
                volume_id: "vol-a".into(),
                staging_target_path: "/tmp/x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.message().contains("vol-a"), "{}", e.message());
        drop(held);
        // Not staged → idempotent OK once the guard is released.
        svc.unstage(csi::NodeUnstageVolumeRequest {
            volume_id: "vol-a".into(),
            staging_target_path: "/tmp/x".into(),
        })
        .await
        .unwrap();
    }
}
