//! The control plane's state store: what the CSI controller knows about
//! volumes, snapshots and nodes.
//!
//! Three kinds of record live here ([`VolumeRecord`], [`SnapshotRecord`],
//! [`NodeRecord`]). The [`Store`] trait deals in whole objects: get, put,
//! delete and list per kind, each object carrying a [`Versioned::version`]
//! for optimistic concurrency. That is the shape of a Kubernetes custom
//! resource (whole-object read/replace, `resourceVersion`): [`SledStore`] is
//! the embedded backend (standalone mode), [`KubeStore`] keeps each record as
//! a custom resource of [`crd`] in a cluster.
//!
//! # Versions and optimistic concurrency
//!
//! Every successful write gives the object a new version, unique within the
//! store, and returns it. Callers treat versions as opaque tokens: compare
//! them for equality, never order or do arithmetic on them. A write names the
//! version it expects to replace:
//!
//! - `None`: the object must not exist (create);
//! - `Some(v)`: the object must exist at exactly version `v` (update).
//!
//! Anything else fails with [`StoreError::Conflict`] and changes nothing; the
//! caller re-reads, re-applies its change and retries. Deletes take the same
//! kind of expectation, except that `None` there means "whatever version".
//! Because versions are unique within the store (not counters per object), a
//! writer holding the version of an object that was deleted and re-created
//! gets a conflict rather than silently overwriting the new object.
//!
//! # Durability
//!
//! A write returns only after it is durable.
//!
//! # Ordering
//!
//! `list_*` return records sorted by key (volume id, snapshot id, node id) in
//! byte order, so repeated listings are stable.

/// Implements [`Store`] for a backend with generic `get`, `put`, `delete`
/// and `list` over every [`Record`] type: one method per kind and operation.
macro_rules! store_by_kind {
    ($backend:ty) => {
        impl $crate::store::Store for $backend {
            fn get_volume(&self, id: &str) -> Result<Option<Versioned<VolumeRecord>>> {
                self.get(id)
            }
            fn put_volume(&self, rec: &VolumeRecord, expected_version: Option<u64>) -> Result<u64> {
                self.put(rec, expected_version)
            }
            fn delete_volume(&self, id: &str, expected_version: Option<u64>) -> Result<()> {
                self.delete::<VolumeRecord>(id, expected_version)
            }
            fn list_volumes(&self) -> Result<Vec<Versioned<VolumeRecord>>> {
                self.list()
            }
            fn get_snapshot(&self, id: &str) -> Result<Option<Versioned<SnapshotRecord>>> {
                self.get(id)
            }
            fn put_snapshot(
                &self,
                rec: &SnapshotRecord,
                expected_version: Option<u64>,
            ) -> Result<u64> {
                self.put(rec, expected_version)
            }
            fn delete_snapshot(&self, id: &str, expected_version: Option<u64>) -> Result<()> {
                self.delete::<SnapshotRecord>(id, expected_version)
            }
            fn list_snapshots(&self) -> Result<Vec<Versioned<SnapshotRecord>>> {
                self.list()
            }
            fn get_node(&self, node_id: &str) -> Result<Option<Versioned<NodeRecord>>> {
                self.get(node_id)
            }
            fn put_node(&self, rec: &NodeRecord, expected_version: Option<u64>) -> Result<u64> {
                self.put(rec, expected_version)
            }
            fn delete_node(&self, node_id: &str, expected_version: Option<u64>) -> Result<()> {
                self.delete::<NodeRecord>(node_id, expected_version)
            }
            fn list_nodes(&self) -> Result<Vec<Versioned<NodeRecord>>> {
                self.list()
            }
        }
    };
}
use store_by_kind;

pub mod crd;
mod kube_backend;
mod sled_backend;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use kube_backend::{KubeStore, kube_client};
pub use sled_backend::SledStore;

/// Result of a store operation.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object changed (or appeared, or went away) since the caller read
    /// it; nothing was written.
    #[error(
        "{kind} {key:?} was changed concurrently: expected {}, found {}; \
         re-read it and retry",
        describe_version(*.expected),
        describe_version(*.actual)
    )]
    Conflict {
        /// Kind of the object.
        kind: Kind,
        /// Its key.
        key: String,
        /// The version the caller expected (`None`: must not exist).
        expected: Option<u64>,
        /// The version found (`None`: it does not exist).
        actual: Option<u64>,
    },
    /// The object does not exist.
    #[error("{kind} {key:?} does not exist")]
    NotFound {
        /// Kind of the object.
        kind: Kind,
        /// Its key.
        key: String,
    },
    /// A stored value cannot be decoded.
    #[error(
        "state store entry {key:?} is corrupt ({reason}); fix or delete that entry \
         (it was left untouched)"
    )]
    Corrupt {
        /// Where the value lives, as `<kind>/<key>` (e.g. `volumes/pvc-1`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request itself is unusable (e.g. an empty key); nothing was done.
    #[error("invalid state store request: {0}")]
    Invalid(String),
    /// The backend failed (I/O, lock, API server, ...).
    #[error("state store backend failed: {0}")]
    Backend(String),
}

impl StoreError {
    /// A [`StoreError::Conflict`] on `kind` `key`.
    pub fn conflict(kind: Kind, key: &str, expected: Option<u64>, actual: Option<u64>) -> Self {
        StoreError::Conflict {
            kind,
            key: key.to_owned(),
            expected,
            actual,
        }
    }
}

fn describe_version(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("version {v}"),
        None => "no object".to_owned(),
    }
}

/// The kinds of object the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// [`VolumeRecord`], keyed by volume id.
    Volume,
    /// [`SnapshotRecord`], keyed by snapshot id.
    Snapshot,
    /// [`NodeRecord`], keyed by node id.
    Node,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Volume, Kind::Snapshot, Kind::Node];

    /// Collection name (sled tree name, later the CR plural): `volumes`,
    /// `snapshots`, `nodes`.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Node => "nodes",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Node => "node",
        })
    }
}

/// A record with the version it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// Opaque version token; pass it back as the expected version of a write.
    pub version: u64,
    /// The record.
    pub value: T,
}

/// A record type the store can hold.
pub trait Record: Serialize + serde::de::DeserializeOwned + Clone + fmt::Debug {
    /// Its kind.
    const KIND: Kind;
    /// Its key (id), unique within the kind.
    fn key(&self) -> &str;
}

/// How a volume is consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessType {
    /// A filesystem mounted into the workload.
    Mount,
    /// A raw block device.
    Block,
}

/// Where a volume's initial data came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ContentSource {
    /// Empty volume.
    None,
    /// Restored from the snapshot with this id.
    Snapshot(String),
    /// Cloned from the volume with this id.
    Volume(String),
}

/// Lifecycle state of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeStatus {
    /// Accepted; replicas are being placed and created.
    Creating,
    /// Every replica exists; the volume can be attached.
    Ready,
    /// Being torn down; must not be attached again.
    Deleting,
}

/// Control-plane state of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Placed on a node; the replica has not been created yet.
    Pending,
    /// Created and serving.
    Ready,
    /// Being rebuilt from a healthy replica.
    Rebuilding,
    /// Lost or ejected; to be replaced.
    Failed,
}

/// One replica of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Replica id (a UUID), stable for the replica's life.
    pub id: String,
    /// Node id of the node that holds it.
    pub node: String,
    /// Path of the disk (as in [`DiskRecord::path`]) it lives on.
    pub disk: String,
    /// Its directory on that disk.
    pub dir: String,
    /// gRPC address of the replica process (`host:port`).
    pub address: String,
    /// Control-plane state.
    pub state: ReplicaState,
}

/// Where a volume is attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Node id of the node the engine runs on.
    pub node: String,
    /// gRPC address of the engine's control API.
    pub engine_address: String,
    /// Path of the engine's NBD Unix socket on that node.
    pub nbd_socket: String,
    /// The file the engine serves the volume as on that node (for a loop
    /// device); empty when it serves none (engines started before).
    #[serde(default)]
    pub file: String,
    /// Epoch the engine was started with (fences older engines).
    pub epoch: u64,
    /// Published read-only (ControllerPublishVolume's `readonly`).
    #[serde(default)]
    pub readonly: bool,
}

/// A volume, keyed by [`VolumeRecord::id`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name the CO asked for (CreateVolume's idempotency key).
    pub name: String,
    /// Volume id handed to the CO.
    pub id: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Number of replicas wanted.
    pub num_replicas: u32,
    /// Filesystem type for mount volumes; `None` for block volumes or when
    /// unspecified.
    pub fs_type: Option<String>,
    /// How the volume is consumed.
    pub access_type: AccessType,
    /// Where its initial data came from.
    pub content_source: ContentSource,
    /// Its replicas.
    pub replicas: Vec<ReplicaRecord>,
    /// Where it is attached, if anywhere.
    pub attachment: Option<Attachment>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// Lifecycle state.
    pub status: VolumeStatus,
    /// The PersistentVolumeClaim it was provisioned for, when the
    /// provisioner said (`--extra-create-metadata`): events go there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimRef>,
}

/// A PersistentVolumeClaim, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl Record for VolumeRecord {
    const KIND: Kind = Kind::Volume;
    fn key(&self) -> &str {
        &self.id
    }
}

/// A snapshot, keyed by [`SnapshotRecord::id`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Snapshot id handed to the CO.
    pub id: String,
    /// Name the CO asked for (CreateSnapshot's idempotency key).
    pub name: String,
    /// Id of the volume it was cut from.
    pub source_volume: String,
    /// Size of the source volume when cut, in bytes.
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: i64,
    /// Whether it can be used to create volumes.
    pub ready: bool,
}

impl Record for SnapshotRecord {
    const KIND: Kind = Kind::Snapshot;
    fn key(&self) -> &str {
        &self.id
    }
}

/// A disk a node offers for replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Mount path of the disk on the node.
    pub path: String,
    /// Total bytes.
    pub capacity_bytes: u64,
    /// Free space of the disk's filesystem as the agent last recorded it
    /// (informational: placement uses capacities and the volumes' sizes;
    /// a steady node's record is rewritten once a minute, see `registry`).
    pub free_bytes: u64,
}

/// A storage node, keyed by [`NodeRecord::node_id`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (as returned by NodeGetInfo).
    pub node_id: String,
    /// gRPC address of the node agent.
    pub address: String,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
    /// Last recorded heartbeat, seconds since the Unix epoch: heartbeats
    /// that change nothing else are recorded once a minute.
    pub last_heartbeat_unix: i64,
}

impl Record for NodeRecord {
    const KIND: Kind = Kind::Node;
    fn key(&self) -> &str {
        &self.node_id
    }
}

/// The control plane's state store. See the [module docs](self) for the
/// version, durability and ordering contract every backend keeps.
pub trait Store: Send + Sync {
    /// The volume with this id, if any.
    fn get_volume(&self, id: &str) -> Result<Option<Versioned<VolumeRecord>>>;
    /// Creates (`expected_version: None`) or replaces (`Some(v)`) the volume
    /// keyed by `rec.id`; returns its new version.
    fn put_volume(&self, rec: &VolumeRecord, expected_version: Option<u64>) -> Result<u64>;
    /// Deletes the volume; `expected_version: None` deletes whatever is there.
    /// [`StoreError::NotFound`] if it does not exist.
    fn delete_volume(&self, id: &str, expected_version: Option<u64>) -> Result<()>;
    /// Every volume, by id.
    fn list_volumes(&self) -> Result<Vec<Versioned<VolumeRecord>>>;
    /// The volume with this [`VolumeRecord::name`], if any. The store does
    /// not enforce unique names: callers that need them (CreateVolume) should
    /// derive the id from the name, so that a second create conflicts.
    fn volume_by_name(&self, name: &str) -> Result<Option<Versioned<VolumeRecord>>> {
        Ok(self
            .list_volumes()?
            .into_iter()
            .find(|v| v.value.name == name))
    }

    /// The snapshot with this id, if any.
    fn get_snapshot(&self, id: &str) -> Result<Option<Versioned<SnapshotRecord>>>;
    /// Like [`Store::put_volume`], for snapshots.
    fn put_snapshot(&self, rec: &SnapshotRecord, expected_version: Option<u64>) -> Result<u64>;
    /// Like [`Store::delete_volume`], for snapshots.
    fn delete_snapshot(&self, id: &str, expected_version: Option<u64>) -> Result<()>;
    /// Every snapshot, by id.
    fn list_snapshots(&self) -> Result<Vec<Versioned<SnapshotRecord>>>;

    /// The node with this id, if any.
    fn get_node(&self, node_id: &str) -> Result<Option<Versioned<NodeRecord>>>;
    /// Like [`Store::put_volume`], for nodes.
    fn put_node(&self, rec: &NodeRecord, expected_version: Option<u64>) -> Result<u64>;
    /// Like [`Store::delete_volume`], for nodes.
    fn delete_node(&self, node_id: &str, expected_version: Option<u64>) -> Result<()>;
    /// Every node, by id.
    fn list_nodes(&self) -> Result<Vec<Versioned<NodeRecord>>>;
}
