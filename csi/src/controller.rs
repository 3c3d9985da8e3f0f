//! CSI Controller service: volumes, snapshots, attachment, expansion.
//!
//! The controller owns the state store; node agents own processes. A volume
//! is a [`VolumeRecord`] plus its replica processes on the nodes the
//! scheduler ([`placement`]) chose. Attaching it (ControllerPublishVolume)
//! starts its engine on the workload's node; the node plugin then connects
//! to the engine's NBD socket named in `publish_context`.
//!
//! Snapshots are crash-consistent layers cut by the engine on every replica
//! at once. A detached volume gets a short-lived engine for the operation,
//! so snapshot, delete-snapshot and clone work the same whether or not the
//! volume is attached.
//!
//! Invariants:
//! - One operation per volume (and per volume name, per snapshot name) at a
//!   time; a second one gets ABORTED ([`InFlight`]).
//! - The store is written before any process is started for a record and
//!   after every step, so a controller that dies mid-operation resumes from
//!   the record when the CO retries (every agent call is idempotent).
//! - A deleted volume whose snapshots still exist keeps its replicas (its
//!   record turns [`VolumeStatus::Deleting`] and disappears from every CSI
//!   answer); the data goes with the last snapshot.

pub mod agents;
pub mod copy;
pub mod events;
pub mod forward;
pub mod placement;
pub mod reconcile;
mod rpc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Status;
use zebu_proto::agent as apb;
use zebu_proto::csi as pb;
use zebu_proto::csi::controller_service_capability::rpc::Type as Cap;
use zebu_proto::csi::volume_capability::access_mode::Mode;
use zebu_proto::csi::volume_content_source as vcs;
use zebu_proto::engine as epb;

use crate::inflight::InFlight;
use crate::store::{
    AccessType, Attachment, ContentSource, ReplicaRecord, ReplicaState, SnapshotRecord, Store,
    StoreError, VolumeRecord, VolumeStatus,
};
use agents::{AGENT_CALL, Agents, with_deadline};
use zebu_common::context::*;

/// Block size of every Zebu volume; sizes are rounded up to it.
pub const BLOCK: u64 = 4096;
/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Most replicas a volume may have.
pub const MAX_REPLICAS: u32 = 7;

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Replicas of a volume whose parameters do not say.
    pub default_replicas: u32,
    /// Schedulable space in percent of a disk's capacity (thin replicas).
    pub over_provisioning_percent: u64,
    /// Allow two replicas of a volume on one disk when nothing else fits.
    pub allow_same_disk: bool,
    /// How long a replica may be gone before it is replaced elsewhere.
    pub replacement_delay: Duration,
    /// Engine `--io-timeout` (empty: the engine's default).
    pub io_timeout: String,
    /// Engine `--scrub-interval` (empty: the engine's default, off).
    pub scrub_interval: String,
    /// Engine `--scrub-rate` (empty: the engine's default).
    pub scrub_rate: String,
    /// The token node agents require (`zebu_common::auth`); `None`: agents
    /// are called without one.
    pub agent_token: Option<zebu_common::auth::Token>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            default_replicas: 3,
            over_provisioning_percent: 200,
            allow_same_disk: false,
            replacement_delay: Duration::from_secs(60),
            io_timeout: String::new(),
            scrub_interval: String::new(),
            agent_token: None,
            scrub_rate: String::new(),
        }
    }
}

/// The Controller service (cheap to clone).
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cfg: ControllerConfig,
    ops: InFlight,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    agents: Agents,
    /// The lease this controller campaigns for; `None`: it always leads
    /// (one controller, as in standalone mode).
    leadership: Option<crate::leader::Leadership>,
    /// Where volume events go (`None`: only the log).
    events: Option<Arc<dyn events::EventSink>>,
    /// The nodes' Leases (`None`: nodes are judged by their agents alone).
    node_leases: Option<crate::node_lease::NodeLeases>,
}

/// What a controller in a cluster has besides its store: the election it
/// takes part in, where its events go, the nodes' Leases.
#[derive(Default)]
pub struct ClusterParts {
    /// The lease this controller campaigns for (`None`: it always leads).
    pub leadership: Option<crate::leader::Leadership>,
    /// Where volume events go (`None`: only the log).
    pub events: Option<Arc<dyn events::EventSink>>,
    /// The nodes' Leases (`None`: nodes are judged by their agents alone).
    pub node_leases: Option<crate::node_lease::NodeLeases>,
}

/// A CSI operation's hold on a key: its in-flight entry (a second CSI call
/// gets ABORTED) and the key's lock (the reconcile loop's pass on the
/// volume, if one runs, finishes first; it never makes a CSI call fail).
pub(crate) struct Claim {
    _op: crate::inflight::OpGuard,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

/// Maps a store error to the status a CSI caller should see.
pub(crate) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Corrupt { .. } | StoreError::Backend(_) => Status::internal(e.to_string()),
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn require(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(())
}

/// What a set of volume capabilities asks for.
#[derive(Debug, PartialEq, Eq)]
struct Wanted {
    block: bool,
    fs_type: Option<String>,
}

/// Checks capabilities: access type set; single-node access modes only;
/// fs type ext4 or xfs. `Err` carries the reason a person can act on.
fn check_capabilities(caps: &[pb::VolumeCapability]) -> Result<Wanted, String> {
    use pb::volume_capability::AccessType as At;
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    let mut w = Wanted {
        block: false,
        fs_type: None,
    };
    for c in caps {
        let mode = c
            .access_mode
            .as_ref()
            .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
            .ok_or("every volume capability needs an access_mode")?;
        match mode {
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter => {}
            Mode::Unknown => return Err("access mode UNKNOWN is not a valid access mode".into()),
            other => {
                return Err(format!(
                    "access mode {} is not supported: a Zebu volume is attached to one node at a \
                     time (use SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER or \
                     SINGLE_NODE_READER_ONLY)",
                    other.as_str_name()
                ));
            }
        }
        match &c.access_type {
            None => {
                return Err("every volume capability needs an access_type (mount or block)".into());
            }
            Some(At::Block(_)) => w.block = true,
            Some(At::Mount(m)) => {
                if !m.fs_type.is_empty() {
                    check_fs(&m.fs_type)?;
                    w.fs_type = Some(m.fs_type.clone());
                }
            }
        }
    }
    Ok(w)
}

fn check_fs(fs: &str) -> Result<(), String> {
    match fs {
        "ext4" | "xfs" => Ok(()),
        other => Err(format!(
            "filesystem type {other:?} is not supported: use ext4 or xfs"
        )),
    }
}

/// Rounds a capacity range to a volume size.
fn size_for(range: Option<&pb::CapacityRange>) -> Result<u64, Status> {
    let Some(r) = range else {
        return Ok(DEFAULT_SIZE);
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::out_of_range(
            "capacity range bytes must not be negative",
        ));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if req == 0 && lim == 0 {
        return Ok(DEFAULT_SIZE);
    }
    if lim != 0 && req > lim {
        return Err(invalid(format!(
            "capacity range is empty: required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let want = if req == 0 { lim.min(DEFAULT_SIZE) } else { req };
    let size = want.div_ceil(BLOCK) * BLOCK;
    if lim != 0 && size > lim {
        return Err(Status::out_of_range(format!(
            "no size that is a multiple of {BLOCK} bytes fits between {req} and {lim} bytes"
        )));
    }
    Ok(size)
}

fn fits_range(size: u64, range: Option<&pb::CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    (r.required_bytes <= 0 || size >= r.required_bytes as u64)
        && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
}

fn content_source_pb(c: &ContentSource) -> Option<pb::VolumeContentSource> {
    let t = match c {
        ContentSource::None => return None,
        ContentSource::Snapshot(id) => vcs::Type::Snapshot(vcs::SnapshotSource {
            snapshot_id: id.clone(),
        }),
        ContentSource::Volume(id) => vcs::Type::Volume(vcs::VolumeSource {
            volume_id: id.clone(),
        }),
    };
    Some(pb::VolumeContentSource { r#type: Some(t) })
}

fn volume_pb(v: &VolumeRecord) -> pb::Volume {
    let mut ctx = HashMap::new();
    ctx.insert(VOLUME_REPLICAS.to_owned(), v.num_replicas.to_string());
    ctx.insert(
        VOLUME_REPLICA_PLACEMENT.to_owned(),
        v.replicas
            .iter()
            .map(|r| format!("{}:{}", r.node, r.address))
            .collect::<Vec<_>>()
            .join(","),
    );
    if let Some(fs) = &v.fs_type {
        ctx.insert(VOLUME_FSTYPE.to_owned(), fs.clone());
    }
    if let Some(a) = &v.attachment {
        ctx.insert(VOLUME_ENGINE.to_owned(), a.engine_address.clone());
        ctx.insert(VOLUME_ATTACHED_NODE.to_owned(), a.node.clone());
    }
    pb::Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.id.clone(),
        volume_context: ctx,
        content_source: content_source_pb(&v.content_source),
        accessible_topology: vec![],
    }
}

fn snapshot_pb(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix,
            nanos: 0,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

/// Paging token of list calls: `zebu1:<last key returned>`.
const TOKEN_PREFIX: &str = "zebu1:";

fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    max_entries: i32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    if max_entries < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    let after = if token.is_empty() {
        None
    } else {
        Some(token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            Status::aborted(format!(
                "starting_token {token:?} was not issued by this driver; list again from the start"
            ))
        })?)
    };
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.is_none_or(|a| key(i) > a))
        .collect();
    let mut next = String::new();
    if max_entries > 0 && rest.len() > max_entries as usize {
        rest.truncate(max_entries as usize);
        if let Some(last) = rest.last() {
            next = format!("{TOKEN_PREFIX}{}", key(last));
        }
    }
    Ok((rest, next))
}

impl Controller {
    /// A controller over `store` that always leads.
    pub fn new(store: Arc<dyn Store>, cfg: ControllerConfig) -> Self {
        Self::in_cluster(store, cfg, ClusterParts::default())
    }

    /// A controller over `store` that leads only while `parts.leadership`
    /// says so: it then reconciles and serves mutating calls; otherwise
    /// those answer UNAVAILABLE and the reconcile loop idles. Volume events
    /// go to `parts.events` too; nodes are judged lost by their Leases.
    pub fn in_cluster(store: Arc<dyn Store>, cfg: ControllerConfig, parts: ClusterParts) -> Self {
        let ClusterParts {
            leadership,
            events,
            node_leases,
        } = parts;
        Controller {
            inner: Arc::new(Inner {
                agents: Agents::new(store.clone(), cfg.agent_token.clone()),
                store,
                cfg,
                ops: InFlight::default(),
                locks: std::sync::Mutex::new(HashMap::new()),
                leadership,
                events,
                node_leases,
            }),
        }
    }

    /// What the nodes' Leases say about `node`.
    pub(crate) fn node_state(&self, node: &str) -> crate::node_lease::NodeState {
        self.inner
            .node_leases
            .as_ref()
            .map_or(crate::node_lease::NodeState::Unknown, |l| l.state(node))
    }

    pub(crate) fn node_leases(&self) -> Option<&crate::node_lease::NodeLeases> {
        self.inner.node_leases.as_ref()
    }

    /// Tells the event sink, if any, that `event` happened to `volume`.
    pub(crate) fn event(&self, volume: &str, event: events::VolumeEvent, note: String) {
        tracing::info!(volume = %volume, event = ?event, "{note}");
        if let Some(sink) = &self.inner.events {
            sink.volume_event(volume, event, note);
        }
    }

    /// The leader's forwarding address while this controller follows one
    /// that published it (see [`forward`]).
    pub fn leader_address(&self) -> Option<String> {
        let l = self.inner.leadership.as_ref()?;
        let st = l.state();
        (!st.leading && !st.address.is_empty()).then_some(st.address)
    }

    /// Whether this controller leads now.
    pub fn is_leader(&self) -> bool {
        self.inner.leadership.as_ref().is_none_or(|l| l.is_leader())
    }

    /// UNAVAILABLE, naming the leader, unless this controller leads.
    fn require_leader(&self) -> Result<(), Status> {
        match &self.inner.leadership {
            Some(l) if !l.is_leader() => {
                let holder = l.state().holder;
                Err(Status::unavailable(if holder.is_empty() {
                    "no controller leads yet (leader election in progress); retry".to_owned()
                } else {
                    format!("this controller does not lead; {holder} does; retry")
                }))
            }
            _ => Ok(()),
        }
    }

    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    fn lock_of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Forget locks nobody holds, so the map does not grow with every
        // volume ever seen.
        locks.retain(|_, l| Arc::strong_count(l) > 1 || l.try_lock().is_err());
        locks.entry(key.to_owned()).or_default().clone()
    }

    /// Claims `key` for a CSI operation: UNAVAILABLE unless this controller
    /// leads, ABORTED if another operation holds it. Every mutating call
    /// claims first.
    pub(crate) async fn claim(&self, key: &str, what: &str) -> Result<Claim, Status> {
        self.require_leader()?;
        let op = self.inner.ops.begin_named(key, what)?;
        let lock = self.lock_of(key).lock_owned().await;
        Ok(Claim {
            _op: op,
            _lock: lock,
        })
    }

    /// For the reconcile loop: the volume's lock if no CSI operation holds
    /// or waits for it.
    pub(crate) fn try_claim_for_reconcile(
        &self,
        key: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if self.inner.ops.contains(key) {
            return None;
        }
        self.lock_of(key).try_lock_owned().ok()
    }

    /// The visible (not deleted) volume `id`, or NOT_FOUND.
    fn volume(&self, id: &str) -> Result<crate::store::Versioned<VolumeRecord>, Status> {
        match self.store().get_volume(id).map_err(store_status)? {
            Some(v) if v.value.status != VolumeStatus::Deleting => Ok(v),
            _ => Err(Status::not_found(format!("volume {id} does not exist"))),
        }
    }

    /// Applies `f` to volume `id` and stores it, retrying on conflicts.
    fn update_volume(
        &self,
        id: &str,
        f: impl Fn(&mut VolumeRecord),
    ) -> Result<VolumeRecord, Status> {
        for _ in 0..16 {
            let cur = self
                .store()
                .get_volume(id)
                .map_err(store_status)?
                .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
            let mut v = cur.value;
            f(&mut v);
            match self.store().put_volume(&v, Some(cur.version)) {
                Ok(_) => return Ok(v),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_status(e)),
            }
        }
        Err(Status::aborted(format!(
            "volume {id} kept changing concurrently; retry"
        )))
    }

    /// Schedulable space of every disk: agents' capacities, allocations
    /// from the volume records.
    fn disk_space(&self) -> Result<Vec<placement::DiskSpace>, Status> {
        let nodes = self.store().list_nodes().map_err(store_status)?;
        let vols = self.store().list_volumes().map_err(store_status)?;
        let mut out = Vec::new();
        for n in nodes {
            if let crate::node_lease::NodeState::Lost(_) = self.node_state(&n.value.node_id) {
                // Nothing new goes to a node that stopped renewing its Lease.
                continue;
            }
            for d in &n.value.disks {
                let allocated = vols
                    .iter()
                    .flat_map(|v| {
                        v.value
                            .replicas
                            .iter()
                            .filter(|r| r.node == n.value.node_id && r.disk == d.path)
                            .map(move |_| v.value.size_bytes)
                    })
                    .sum();
                out.push(placement::DiskSpace {
                    node: n.value.node_id.clone(),
                    disk: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    allocated_bytes: allocated,
                });
            }
        }
        Ok(out)
    }

    /// Creates (idempotently) every replica process of `v` and records
    /// their addresses.
    async fn create_replicas(&self, v: &VolumeRecord) -> Result<VolumeRecord, Status> {
        let mut v = v.clone();
        for i in 0..v.replicas.len() {
            let r = v.replicas[i].clone();
            let mut agent = self.inner.agents.client(&r.node).await?;
            let p = agent
                .create_replica(with_deadline(
                    apb::CreateReplicaRequest {
                        volume_id: v.id.clone(),
                        replica_id: r.id.clone(),
                        disk: r.disk.clone(),
                        size_bytes: v.size_bytes,
                    },
                    AGENT_CALL,
                ))
                .await
                .map_err(|e| {
                    Status::new(
                        e.code(),
                        format!(
                            "creating replica {} on node {}: {}",
                            r.id,
                            r.node,
                            e.message()
                        ),
                    )
                })?
                .into_inner();
            let (id, addr, dir) = (r.id.clone(), p.address.clone(), p.dir.clone());
            v = self.update_volume(&v.id, |rec| {
                if let Some(x) = rec.replicas.iter_mut().find(|x| x.id == id) {
                    x.address = addr.clone();
                    x.dir = dir.clone();
                    x.state = ReplicaState::Ready;
                }
            })?;
            zebu_proto::crash::point("csi.create-volume.partial");
        }
        Ok(v)
    }

    /// Addresses of `v`'s replicas, refreshed from the agents.
    async fn fresh_addresses(&self, v: &VolumeRecord) -> Result<VolumeRecord, Status> {
        let mut copy = v.clone();
        if self.inner.agents.refresh_replicas(&mut copy).await {
            let fresh = copy.replicas.clone();
            return self.update_volume(&v.id, |rec| {
                for r in rec.replicas.iter_mut() {
                    if let Some(f) = fresh.iter().find(|f| f.id == r.id) {
                        r.address = f.address.clone();
                        r.state = f.state;
                    }
                }
            });
        }
        Ok(copy)
    }

    /// Starts (idempotently) the engine of `v` on `node` through its agent,
    /// with `v`'s current replica addresses.
    pub(crate) async fn start_engine(
        &self,
        agent: &mut agents::AgentConn,
        node: &str,
        v: &VolumeRecord,
    ) -> Result<apb::EngineProcess, Status> {
        let req = apb::StartEngineRequest {
            volume_id: v.id.clone(),
            size_bytes: v.size_bytes,
            replica_addresses: v.replicas.iter().map(|r| r.address.clone()).collect(),
            io_timeout: self.inner.cfg.io_timeout.clone(),
            scrub_interval: self.inner.cfg.scrub_interval.clone(),
            scrub_rate: self.inner.cfg.scrub_rate.clone(),
        };
        agent
            .start_engine(with_deadline(req, AGENT_CALL))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!("starting the engine of {} on {node}: {}", v.id, e.message()),
                )
            })
    }

    /// Runs `f` against the volume's engine: the attached one, or one
    /// started for the occasion on a node holding a replica (and stopped
    /// afterwards). The caller holds the volume's operation guard.
    async fn with_engine<T, F, Fut>(&self, v: &VolumeRecord, f: F) -> Result<T, Status>
    where
        F: FnOnce(
            zebu_proto::engine::engine_client::EngineClient<tonic::transport::Channel>,
        ) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if let Some(a) = &v.attachment {
            let e = agents::engine(&a.engine_address).await?;
            return f(e).await;
        }
        let v = self.fresh_addresses(v).await?;
        let node = v
            .replicas
            .first()
            .map(|r| r.node.clone())
            .ok_or_else(|| Status::internal(format!("volume {} has no replicas", v.id)))?;
        let mut agent = self.inner.agents.client(&node).await?;
        let e = self.start_engine(&mut agent, &node, &v).await?;
        let result = match agents::engine(&e.control_address).await {
            Ok(c) => f(c).await,
            Err(err) => Err(err),
        };
        let stop = agent
            .stop_engine(with_deadline(
                apb::StopEngineRequest {
                    volume_id: v.id.clone(),
                },
                AGENT_CALL,
            ))
            .await;
        if let Err(e) = stop {
            tracing::warn!(volume = %v.id, error = %e, "stopping the temporary engine failed");
        }
        result
    }

    /// Deletes every replica of `v` and its record.
    async fn destroy(&self, v: &VolumeRecord) -> Result<(), Status> {
        for r in &v.replicas {
            let mut agent = self.inner.agents.client(&r.node).await?;
            agent
                .delete_replica(with_deadline(
                    apb::DeleteReplicaRequest {
                        replica_id: r.id.clone(),
                    },
                    AGENT_CALL,
                ))
                .await
                .map_err(|e| {
                    Status::new(
                        e.code(),
                        format!(
                            "deleting replica {} on node {}: {}",
                            r.id,
                            r.node,
                            e.message()
                        ),
                    )
                })?;
            zebu_proto::crash::point("csi.delete-volume.partial");
        }
        match self.store().delete_volume(&v.id, None) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_status(e)),
        }
    }

    /// Fills a new volume from its content source.
    async fn fill_content(&self, v: &VolumeRecord) -> Result<(), Status> {
        let (src_vol, layer, temp) = match &v.content_source {
            ContentSource::None => return Ok(()),
            ContentSource::Snapshot(s) => {
                let snap = self
                    .store()
                    .get_snapshot(s)
                    .map_err(store_status)?
                    .ok_or_else(|| Status::not_found(format!("snapshot {s} does not exist")))?;
                (snap.value.source_volume, s.clone(), false)
            }
            ContentSource::Volume(src) => (src.clone(), format!("clone-{}", v.id), true),
        };
        let src = self
            .store()
            .get_volume(&src_vol)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("source volume {src_vol} does not exist")))?
            .value;
        let _g = if temp {
            Some(self.claim(&src.id, &format!("volume {}", src.id)).await?)
        } else {
            None
        };
        if temp {
            let name = layer.clone();
            self.with_engine(&src, |mut e| async move {
                match e.create_snapshot(epb::CreateSnapshotRequest { name }).await {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
                    Err(s) => Err(s),
                }
            })
            .await?;
        }
        let src = self.fresh_addresses(&src).await?;
        let sources: Vec<String> = src.replicas.iter().map(|r| r.address.clone()).collect();
        let targets: Vec<String> = v.replicas.iter().map(|r| r.address.clone()).collect();
        let copied = async {
            let (c, layers, bs) = copy::find_source(&sources, &layer)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            copy::fill(&c, &layers, bs, &targets)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))
        }
        .await;
        if temp {
            let name = layer.clone();
            let cleanup = self
                .with_engine(&src, |mut e| async move {
                    e.delete_snapshot(epb::DeleteSnapshotRequest { name })
                        .await?;
                    Ok(())
                })
                .await;
            if let Err(e) = cleanup {
                tracing::warn!(volume = %src.id, error = %e, "removing the clone snapshot failed");
            }
        }
        copied
    }

    /// Condition of a volume as CSI reports it: `(abnormal, message)`.
    async fn condition(&self, v: &VolumeRecord) -> (bool, String) {
        if let Some(a) = &v.attachment {
            let st = match agents::engine(&a.engine_address).await {
                Ok(mut e) => {
                    e.status(with_deadline(
                        epb::StatusRequest {},
                        Duration::from_secs(10),
                    ))
                    .await
                }
                Err(s) => Err(s),
            };
            return match st {
                Ok(s) => {
                    let s = s.into_inner();
                    let rw = s.replicas.iter().filter(|r| r.mode == "RW").count();
                    let msg = format!(
                        "{}: {rw} of {} replicas in sync (engine on {})",
                        s.state, v.num_replicas, a.node
                    );
                    (s.state != "healthy", msg)
                }
                Err(e) => (
                    true,
                    format!("faulted: engine unreachable: {}", e.message()),
                ),
            };
        }
        let mut down = Vec::new();
        for r in &v.replicas {
            match self.inner.agents.list_replicas(&r.node).await {
                Ok(list) if list.iter().any(|p| p.replica_id == r.id && p.running) => {}
                Ok(_) => down.push(format!("replica {} on {} is not running", r.id, r.node)),
                Err(e) => down.push(format!("node {} unreachable ({})", r.node, e.message())),
            }
        }
        if down.is_empty() {
            (
                false,
                format!("healthy: {} replicas, detached", v.replicas.len()),
            )
        } else {
            (true, format!("degraded: {}", down.join("; ")))
        }
    }

    /// Volumes the background reconciler looks after.
    pub(crate) fn agents(&self) -> &Agents {
        &self.inner.agents
    }

    /// The settings it runs with.
    pub fn config(&self) -> &ControllerConfig {
        &self.inner.cfg
    }
}
