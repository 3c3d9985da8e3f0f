//! The custom resources that hold the control plane's state in a cluster
//! (`--store kubernetes`): group `zebu.csi.dev`, version `v1alpha1`, all
//! cluster-scoped and named by the record's key.
//!
//! - [`ZebuVolume`] (`zv`): one per volume, named by its volume id.
//! - [`ZebuSnapshot`] (`zs`): one per snapshot, named by its snapshot id.
//! - [`ZebuNode`] (`zn`): one per storage node, named by its node id.
//!
//! Invariant: `spec` is the store's record, whole: what Zebu decided
//! (size, placement, attachment, lifecycle). `status` is derived from it
//! for people and `kubectl` (condition, replicas, attached node, epoch) and
//! written after each `spec` write; Zebu never reads it back. A `spec`
//! converts to its record and back without loss.
//!
//! `zebu-csi crds` prints the definitions generated from these types; the
//! copy under `deploy/kubernetes/crds/` must equal that output (CI checks).

// Each `printcolumn(...)` of the derive repeats `type_ = "string"`, which
// clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::{
    AccessType, Attachment, ClaimRef, ContentSource, DiskRecord, NodeRecord, ReplicaRecord,
    ReplicaState, SnapshotRecord, VolumeRecord, VolumeStatus,
};

/// The API group of every Zebu resource.
pub const GROUP: &str = "zebu.csi.dev";
/// The finalizer a [`ZebuVolume`] carries while it owns replicas: the API
/// server keeps the object until Zebu, having deleted them, removes it.
pub const REPLICAS_FINALIZER: &str = "zebu.csi.dev/replicas";

/// A Zebu volume: what was asked for and where its replicas are.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "zebu.csi.dev",
    version = "v1alpha1",
    kind = "ZebuVolume",
    plural = "zebuvolumes",
    shortname = "zv",
    status = "ZebuVolumeStatus",
    doc = "A Zebu volume: its size, replicas and where they are.",
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Condition", type_ = "string", json_path = ".status.condition"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.attachedNode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ZebuVolumeSpec {
    /// The name the CO asked for (CreateVolume's idempotency key).
    pub volume_name: String,
    /// Logical size, for people (`1Gi`); `sizeBytes` is authoritative.
    pub size: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Number of replicas wanted.
    pub replicas: u32,
    /// Filesystem of a mount volume, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// `mount` or `block`.
    pub access_type: VolumeAccess,
    /// The snapshot or volume its first data came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<SourceRef>,
    /// Where each replica was placed.
    #[serde(default)]
    pub placement: Vec<ReplicaPlacement>,
    /// The node its engine runs on, while attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentSpec>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// `creating`, `ready` or `deleting`.
    pub phase: VolumePhase,
    /// The PersistentVolumeClaim it was provisioned for, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimSpec>,
}

/// A PersistentVolumeClaim, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimSpec {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// How a volume is consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VolumeAccess {
    /// A filesystem mounted into the workload.
    Mount,
    /// A raw block device.
    Block,
}

/// Where a volume's first data came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// `snapshot` or `volume`.
    pub kind: SourceKind,
    /// Its id.
    pub id: String,
}

/// The kind of a [`SourceRef`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceKind {
    /// Restored from a snapshot.
    Snapshot,
    /// Cloned from a volume.
    Volume,
}

/// Where one replica was placed, and its control-plane state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    /// Replica id, stable for the replica's life.
    pub id: String,
    /// The node holding it.
    pub node: String,
    /// The disk (path on the node) it lives on.
    pub disk: String,
    /// Its directory on that disk.
    pub dir: String,
    /// gRPC address of its process (`host:port`).
    pub address: String,
    /// `pending`, `ready`, `rebuilding` or `failed`.
    pub state: ReplicaPhase,
}

/// Control-plane state of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReplicaPhase {
    /// Placed; not created yet.
    Pending,
    /// Created and serving.
    Ready,
    /// Being rebuilt from a healthy replica.
    Rebuilding,
    /// Lost or ejected; to be replaced.
    Failed,
}

/// Where a volume is attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentSpec {
    /// The node its engine runs on.
    pub node: String,
    /// gRPC address of the engine's control API.
    pub engine_address: String,
    /// The engine's NBD Unix socket on that node.
    pub nbd_socket: String,
    /// The file the engine serves the volume as on that node, for a loop
    /// device; empty when it serves none.
    #[serde(default)]
    pub file: String,
    /// The engine's epoch (fences older engines).
    pub epoch: u64,
    /// Published read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// Lifecycle of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VolumePhase {
    /// Replicas are being placed and created.
    Creating,
    /// Every replica exists; it can be attached.
    Ready,
    /// Being torn down.
    Deleting,
}

/// What a volume looks like, derived from its spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZebuVolumeStatus {
    /// `creating`, `healthy`, `degraded`, `rebuilding`, `faulted` or `deleting`.
    pub condition: String,
    /// One line for people on why the condition is what it is.
    pub message: String,
    /// Replicas serving reads and writes, out of those wanted.
    pub ready_replicas: u32,
    /// Each replica: node, disk, address and mode.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// The node the volume is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_node: Option<String>,
    /// The engine's control address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_address: Option<String>,
    /// The engine's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// One replica as shown in a volume's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Replica id.
    pub id: String,
    /// Its node.
    pub node: String,
    /// Its disk.
    pub disk: String,
    /// Its address.
    pub address: String,
    /// `pending`, `ready`, `rebuilding` or `failed`.
    pub mode: ReplicaPhase,
}

/// A snapshot of a Zebu volume.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "zebu.csi.dev",
    version = "v1alpha1",
    kind = "ZebuSnapshot",
    plural = "zebusnapshots",
    shortname = "zs",
    status = "ZebuSnapshotStatus",
    doc = "A snapshot of a Zebu volume.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.sourceVolume"),
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.readyToUse"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ZebuSnapshotSpec {
    /// The name the CO asked for (CreateSnapshot's idempotency key).
    pub snapshot_name: String,
    /// Id of the volume it was cut from.
    pub source_volume: String,
    /// Size of the source when cut, for people.
    pub size: String,
    /// Size of the source when cut, in bytes.
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// Whether it can be restored from.
    pub ready: bool,
}

/// What a snapshot looks like, derived from its spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZebuSnapshotStatus {
    /// Whether it can be restored from.
    pub ready_to_use: bool,
}

/// A storage node: where its agent listens and the disks it offers.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "zebu.csi.dev",
    version = "v1alpha1",
    kind = "ZebuNode",
    plural = "zebunodes",
    shortname = "zn",
    status = "ZebuNodeStatus",
    doc = "A Zebu storage node: its agent's address and its disks.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Disks", type_ = "integer", json_path = ".status.diskCount"),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ZebuNodeSpec {
    /// gRPC address of the node agent.
    pub address: String,
    /// The disks it offers.
    #[serde(default)]
    pub disks: Vec<NodeDisk>,
    /// Last recorded heartbeat, seconds since the Unix epoch.
    pub last_heartbeat_unix: i64,
}

/// A disk of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDisk {
    /// Mount path on the node.
    pub path: String,
    /// Total bytes.
    pub capacity_bytes: u64,
    /// Free bytes when last recorded.
    pub free_bytes: u64,
}

/// What a node looks like, derived from its spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZebuNodeStatus {
    /// Number of disks.
    pub disk_count: u32,
    /// Their total capacity, for people.
    pub capacity: String,
}

/// Every custom resource definition, as one multi-document YAML stream
/// (what `zebu-csi crds` prints).
pub fn definitions_yaml() -> Result<String, String> {
    let mut out = String::new();
    for crd in [ZebuVolume::crd(), ZebuSnapshot::crd(), ZebuNode::crd()] {
        let doc = serde_saphyr::to_string(&crd).map_err(|e| format!("rendering a CRD: {e}"))?;
        out.push_str("---\n");
        out.push_str(&doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// `bytes` as a Kubernetes quantity a person reads: the largest binary
/// unit that divides it (`1Gi`, `1536Mi`), else bytes.
pub fn quantity(bytes: u64) -> String {
    for (unit, shift) in [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

// ---------------------------------------------------------------------------
// Records ↔ specs.

impl From<&VolumeRecord> for ZebuVolumeSpec {
    fn from(r: &VolumeRecord) -> Self {
        ZebuVolumeSpec {
            volume_name: r.name.clone(),
            size: quantity(r.size_bytes),
            size_bytes: r.size_bytes,
            replicas: r.num_replicas,
            fs_type: r.fs_type.clone(),
            access_type: match r.access_type {
                AccessType::Mount => VolumeAccess::Mount,
                AccessType::Block => VolumeAccess::Block,
            },
            content_source: match &r.content_source {
                ContentSource::None => None,
                ContentSource::Snapshot(id) => Some(SourceRef {
                    kind: SourceKind::Snapshot,
                    id: id.clone(),
                }),
                ContentSource::Volume(id) => Some(SourceRef {
                    kind: SourceKind::Volume,
                    id: id.clone(),
                }),
            },
            placement: r
                .replicas
                .iter()
                .map(|p| ReplicaPlacement {
                    id: p.id.clone(),
                    node: p.node.clone(),
                    disk: p.disk.clone(),
                    dir: p.dir.clone(),
                    address: p.address.clone(),
                    state: phase_of(p.state),
                })
                .collect(),
            attachment: r.attachment.as_ref().map(|a| AttachmentSpec {
                node: a.node.clone(),
                engine_address: a.engine_address.clone(),
                nbd_socket: a.nbd_socket.clone(),
                file: a.file.clone(),
                epoch: a.epoch,
                readonly: a.readonly,
            }),
            created_unix: r.created_unix,
            phase: match r.status {
                VolumeStatus::Creating => VolumePhase::Creating,
                VolumeStatus::Ready => VolumePhase::Ready,
                VolumeStatus::Deleting => VolumePhase::Deleting,
            },
            claim: r.claim.as_ref().map(|c| ClaimSpec {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            }),
        }
    }
}

fn phase_of(s: ReplicaState) -> ReplicaPhase {
    match s {
        ReplicaState::Pending => ReplicaPhase::Pending,
        ReplicaState::Ready => ReplicaPhase::Ready,
        ReplicaState::Rebuilding => ReplicaPhase::Rebuilding,
        ReplicaState::Failed => ReplicaPhase::Failed,
    }
}

impl ZebuVolumeSpec {
    /// The record this spec holds, keyed by `id` (the object's name).
    pub fn to_record(&self, id: &str) -> VolumeRecord {
        VolumeRecord {
            name: self.volume_name.clone(),
            id: id.to_owned(),
            size_bytes: self.size_bytes,
            num_replicas: self.replicas,
            fs_type: self.fs_type.clone(),
            access_type: match self.access_type {
                VolumeAccess::Mount => AccessType::Mount,
                VolumeAccess::Block => AccessType::Block,
            },
            content_source: match &self.content_source {
                None => ContentSource::None,
                Some(SourceRef {
                    kind: SourceKind::Snapshot,
                    id,
                }) => ContentSource::Snapshot(id.clone()),
                Some(SourceRef {
                    kind: SourceKind::Volume,
                    id,
                }) => ContentSource::Volume(id.clone()),
            },
            replicas: self
                .placement
                .iter()
                .map(|p| ReplicaRecord {
                    id: p.id.clone(),
                    node: p.node.clone(),
                    disk: p.disk.clone(),
                    dir: p.dir.clone(),
                    address: p.address.clone(),
                    state: match p.state {
                        ReplicaPhase::Pending => ReplicaState::Pending,
                        ReplicaPhase::Ready => ReplicaState::Ready,
                        ReplicaPhase::Rebuilding => ReplicaState::Rebuilding,
                        ReplicaPhase::Failed => ReplicaState::Failed,
                    },
                })
                .collect(),
            attachment: self.attachment.as_ref().map(|a| Attachment {
                node: a.node.clone(),
                engine_address: a.engine_address.clone(),
                nbd_socket: a.nbd_socket.clone(),
                file: a.file.clone(),
                epoch: a.epoch,
                readonly: a.readonly,
            }),
            created_unix: self.created_unix,
            status: match self.phase {
                VolumePhase::Creating => VolumeStatus::Creating,
                VolumePhase::Ready => VolumeStatus::Ready,
                VolumePhase::Deleting => VolumeStatus::Deleting,
            },
            claim: self.claim.as_ref().map(|c| ClaimRef {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            }),
        }
    }

    /// The status people see for this spec.
    pub fn derived_status(&self) -> ZebuVolumeStatus {
        let ready = self
            .placement
            .iter()
            .filter(|p| p.state == ReplicaPhase::Ready)
            .count() as u32;
        let rebuilding = self
            .placement
            .iter()
            .any(|p| p.state == ReplicaPhase::Rebuilding);
        let (condition, message) = match self.phase {
            VolumePhase::Creating => ("creating", "replicas are being placed and created".into()),
            VolumePhase::Deleting => ("deleting", "replicas are being deleted".into()),
            VolumePhase::Ready if ready == 0 => (
                "faulted",
                "no replica is ready: the volume cannot serve".to_owned(),
            ),
            VolumePhase::Ready if rebuilding => (
                "rebuilding",
                format!(
                    "{ready} of {} replicas ready, rebuilding the rest",
                    self.replicas
                ),
            ),
            VolumePhase::Ready if ready < self.replicas => (
                "degraded",
                format!("{ready} of {} replicas ready", self.replicas),
            ),
            VolumePhase::Ready => (
                "healthy",
                format!("{ready} of {} replicas ready", self.replicas),
            ),
        };
        ZebuVolumeStatus {
            condition: condition.to_owned(),
            message,
            ready_replicas: ready,
            replicas: self
                .placement
                .iter()
                .map(|p| ReplicaStatus {
                    id: p.id.clone(),
                    node: p.node.clone(),
                    disk: p.disk.clone(),
                    address: p.address.clone(),
                    mode: p.state,
                })
                .collect(),
            attached_node: self.attachment.as_ref().map(|a| a.node.clone()),
            engine_address: self.attachment.as_ref().map(|a| a.engine_address.clone()),
            epoch: self.attachment.as_ref().map(|a| a.epoch),
        }
    }
}

impl From<&SnapshotRecord> for ZebuSnapshotSpec {
    fn from(r: &SnapshotRecord) -> Self {
        ZebuSnapshotSpec {
            snapshot_name: r.name.clone(),
            source_volume: r.source_volume.clone(),
            size: quantity(r.size_bytes),
            size_bytes: r.size_bytes,
            created_unix: r.created_unix,
            ready: r.ready,
        }
    }
}

impl ZebuSnapshotSpec {
    /// The record this spec holds, keyed by `id`.
    pub fn to_record(&self, id: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.to_owned(),
            name: self.snapshot_name.clone(),
            source_volume: self.source_volume.clone(),
            size_bytes: self.size_bytes,
            created_unix: self.created_unix,
            ready: self.ready,
        }
    }

    /// The status people see for this spec.
    pub fn derived_status(&self) -> ZebuSnapshotStatus {
        ZebuSnapshotStatus {
            ready_to_use: self.ready,
        }
    }
}

impl From<&NodeRecord> for ZebuNodeSpec {
    fn from(r: &NodeRecord) -> Self {
        ZebuNodeSpec {
            address: r.address.clone(),
            disks: r
                .disks
                .iter()
                .map(|d| NodeDisk {
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    free_bytes: d.free_bytes,
                })
                .collect(),
            last_heartbeat_unix: r.last_heartbeat_unix,
        }
    }
}

impl ZebuNodeSpec {
    /// The record this spec holds, keyed by `id`.
    pub fn to_record(&self, id: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.to_owned(),
            address: self.address.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskRecord {
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    free_bytes: d.free_bytes,
                })
                .collect(),
            last_heartbeat_unix: self.last_heartbeat_unix,
        }
    }

    /// The status people see for this spec.
    pub fn derived_status(&self) -> ZebuNodeStatus {
        ZebuNodeStatus {
            disk_count: self.disks.len() as u32,
            capacity: quantity(self.disks.iter().map(|d| d.capacity_bytes).sum()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> VolumeRecord {
        VolumeRecord {
            name: "pvc-1".into(),
            id: "zv-1".into(),
            size_bytes: 1 << 30,
            num_replicas: 3,
            fs_type: Some("ext4".into()),
            access_type: AccessType::Mount,
            content_source: ContentSource::Snapshot("zs-9".into()),
            replicas: ["a", "b", "c"]
                .iter()
                .zip([
                    ReplicaState::Ready,
                    ReplicaState::Rebuilding,
                    ReplicaState::Failed,
                ])
                .map(|(n, state)| ReplicaRecord {
                    id: format!("r-{n}"),
                    node: format!("node-{n}"),
                    disk: "/d".into(),
                    dir: format!("/d/replicas/zv-1/r-{n}"),
                    address: "127.0.0.1:1".into(),
                    state,
                })
                .collect(),
            attachment: Some(Attachment {
                node: "node-a".into(),
                engine_address: "127.0.0.1:2".into(),
                nbd_socket: "/run/e.sock".into(),
                file: String::new(),
                epoch: 4,
                readonly: false,
            }),
            created_unix: 1_700_000_000,
            status: VolumeStatus::Ready,
            claim: Some(ClaimRef {
                namespace: "db".into(),
                name: "data-db-0".into(),
            }),
        }
    }

    #[test]
    fn records_round_trip_through_specs() {
        let v = volume();
        assert_eq!(ZebuVolumeSpec::from(&v).to_record(&v.id), v);
        let mut block = v.clone();
        block.access_type = AccessType::Block;
        block.fs_type = None;
        block.content_source = ContentSource::None;
        block.attachment = None;
        assert_eq!(ZebuVolumeSpec::from(&block).to_record(&v.id), block);
        let s = SnapshotRecord {
            id: "zs-1".into(),
            name: "snap".into(),
            source_volume: "zv-1".into(),
            size_bytes: 5 << 20,
            created_unix: 7,
            ready: true,
        };
        assert_eq!(ZebuSnapshotSpec::from(&s).to_record(&s.id), s);
        let n = NodeRecord {
            node_id: "node-a".into(),
            address: "10.0.0.1:9".into(),
            disks: vec![DiskRecord {
                path: "/d".into(),
                capacity_bytes: 10,
                free_bytes: 3,
            }],
            last_heartbeat_unix: 8,
        };
        assert_eq!(ZebuNodeSpec::from(&n).to_record(&n.node_id), n);
    }

    #[test]
    fn the_condition_follows_the_replicas() {
        let mut v = volume();
        let cond = |v: &VolumeRecord| ZebuVolumeSpec::from(v).derived_status().condition;
        assert_eq!(cond(&v), "rebuilding");
        v.replicas[1].state = ReplicaState::Ready;
        assert_eq!(cond(&v), "degraded");
        v.replicas[2].state = ReplicaState::Ready;
        assert_eq!(cond(&v), "healthy");
        for r in &mut v.replicas {
            r.state = ReplicaState::Failed;
        }
        assert_eq!(cond(&v), "faulted");
        v.status = VolumeStatus::Creating;
        assert_eq!(cond(&v), "creating");
        let st = ZebuVolumeSpec::from(&volume()).derived_status();
        assert_eq!(
            (st.ready_replicas, st.attached_node.as_deref(), st.epoch),
            (1, Some("node-a"), Some(4))
        );
    }

    #[test]
    fn quantities_read_like_kubectl() {
        assert_eq!(quantity(1 << 30), "1Gi");
        assert_eq!(quantity(1536 << 20), "1536Mi");
        assert_eq!(quantity(4096), "4Ki");
        assert_eq!(quantity(1000), "1000");
        assert_eq!(quantity(0), "0");
    }

    #[test]
    fn definitions_name_the_group_columns_and_status() {
        let yaml = definitions_yaml().unwrap();
        assert_eq!(yaml.matches("kind: CustomResourceDefinition").count(), 3);
        for needle in [
            "name: zebuvolumes.zebu.csi.dev",
            "name: zebusnapshots.zebu.csi.dev",
            "name: zebunodes.zebu.csi.dev",
            "scope: Cluster",
            "status: {}",
            "jsonPath: .status.condition",
        ] {
            assert!(yaml.contains(needle), "{needle} missing from:\n{yaml}");
        }
        assert_eq!(GROUP, ZebuVolume::crd().spec.group);
    }
}
