//! The controller's background loop: make processes match the store.
//!
//! Every pass, for each ready volume that no CSI operation holds:
//! - replica addresses are refreshed from the agents (a replica restarted by
//!   its agent listens on a new port);
//! - for an attached volume, the engine address is refreshed (the agent
//!   restarts a crashed engine) and every replica the engine does not have
//!   in sync is handed back to it with `AddReplica`: the engine recognises a
//!   returning replica by its id and copies only what changed (delta
//!   resync);
//! - a replica that is lost for longer than the replacement delay is
//!   replaced by a new one on another node (or disk), which the engine
//!   rebuilds in full; the old one is deleted when its agent answers.
//!   When is a replica lost? If its node renews a Lease ([`crate::node_lease`]),
//!   from the moment that Lease expired, or from when its agent answered
//!   that the replica does not run; a node whose Lease is fresh but whose
//!   agent does not answer is alive (partitioned from this controller, not
//!   lost), and its replicas wait. A node without a Lease is lost from the
//!   first pass its agent did not answer.
//!
//! Replacement happens only while the volume is attached: the engine is
//! what rebuilds a replica, and a detached volume loses nothing by waiting.
//!
//! Invariant: the loop never makes a CSI call fail: it skips volumes with a
//! CSI operation in flight and holds only the volume's lock while it works;
//! a CSI call that arrives meanwhile waits for the pass on that volume to
//! finish (bounded by the agent and engine call deadlines).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Status;
use zebu_proto::agent as apb;
use zebu_proto::engine as epb;

use super::agents::{AGENT_CALL, engine, with_deadline};
use super::events::VolumeEvent;
use super::{Controller, placement};
use crate::node_lease::NodeState;
use crate::store::{ReplicaRecord, ReplicaState, VolumeRecord, VolumeStatus};

/// What the loop remembers between passes (the leader's alone: a follower
/// forgets it).
#[derive(Default)]
pub struct Memory {
    /// Since when each replica (by id) has been lost.
    down_since: HashMap<String, Instant>,
    /// Per volume, when the last scrub whose findings were reported
    /// finished (engine time, Unix seconds).
    scrub_reported: HashMap<String, i64>,
}

/// Runs passes every `interval` until the task is dropped.
pub async fn run(ctl: Controller, interval: Duration) {
    let mut memory = Memory::default();
    loop {
        tokio::time::sleep(interval).await;
        if !ctl.is_leader() {
            // A follower forgets what it saw: the leader owns these clocks.
            memory = Memory::default();
            if let Some(l) = ctl.node_leases() {
                l.forget();
            }
            continue;
        }
        if let Some(l) = ctl.node_leases()
            && let Err(e) = l.refresh().await
        {
            tracing::warn!(error = %e, "cannot list the nodes' leases; judging nodes by their agents");
        }
        if let Err(e) = pass(&ctl, &mut memory).await {
            tracing::warn!(error = %e.message(), "reconcile pass failed");
        }
    }
}

/// One pass over every volume.
pub async fn pass(ctl: &Controller, memory: &mut Memory) -> Result<(), Status> {
    collect_orphans(ctl).await?;
    let vols = ctl.store().list_volumes().map_err(super::store_status)?;
    for v in vols {
        let v = v.value;
        if v.status != VolumeStatus::Ready {
            continue;
        }
        let Some(_g) = ctl.try_claim_for_reconcile(&v.id) else {
            continue;
        };
        if let Err(e) = volume(ctl, &v, memory).await {
            tracing::warn!(volume = %v.id, error = %e.message(), "reconciling the volume failed");
        }
    }
    Ok(())
}

/// Deletes replica processes no volume record names: replicas replaced
/// while their node was down, or left by a create that was rolled back.
/// Safe because every replica is recorded in its volume before it is
/// created, and the agents are listed before the records are read.
async fn collect_orphans(ctl: &Controller) -> Result<(), Status> {
    let nodes = ctl.store().list_nodes().map_err(super::store_status)?;
    let mut held = Vec::new();
    for n in &nodes {
        if let Ok(list) = ctl.agents().list_replicas(&n.value.node_id).await {
            held.push((n.value.node_id.clone(), list));
        }
    }
    let vols = ctl.store().list_volumes().map_err(super::store_status)?;
    for (node, list) in held {
        for p in list {
            let known = vols
                .iter()
                .any(|v| v.value.replicas.iter().any(|r| r.id == p.replica_id));
            if known {
                continue;
            }
            tracing::info!(node = %node, replica = %p.replica_id, volume = %p.volume_id, "deleting an orphaned replica");
            if let Ok(mut agent) = ctl.agents().client(&node).await
                && let Err(e) = agent
                    .delete_replica(with_deadline(
                        apb::DeleteReplicaRequest {
                            replica_id: p.replica_id.clone(),
                        },
                        AGENT_CALL,
                    ))
                    .await
            {
                tracing::warn!(replica = %p.replica_id, error = %e.message(), "deleting an orphaned replica failed");
            }
        }
    }
    Ok(())
}

async fn volume(ctl: &Controller, v: &VolumeRecord, memory: &mut Memory) -> Result<(), Status> {
    let mut v = ctl.fresh_addresses(v).await?;
    let Some(att) = v.attachment.clone() else {
        return Ok(());
    };
    // The engine may have been restarted by its agent on a new port.
    if let Ok(mut agent) = ctl.agents().client(&att.node).await
        && let Ok(list) = agent
            .list_engines(with_deadline(
                apb::ListEnginesRequest {},
                Duration::from_secs(10),
            ))
            .await
        && let Some(e) = list
            .into_inner()
            .engines
            .into_iter()
            .find(|e| e.volume_id == v.id && e.running)
        && e.control_address != att.engine_address
        && !e.control_address.is_empty()
    {
        let addr = e.control_address.clone();
        v = ctl.update_volume(&v.id, |rec| {
            if let Some(a) = rec.attachment.as_mut() {
                a.engine_address = addr.clone();
                a.epoch = e.epoch;
            }
        })?;
    }
    let Some(att) = v.attachment.clone() else {
        return Ok(());
    };
    let mut eng = engine(&att.engine_address).await?;
    let st = eng
        .status(with_deadline(
            epb::StatusRequest {},
            Duration::from_secs(10),
        ))
        .await?
        .into_inner();
    report_scrub(ctl, &v.id, st.scrub.as_ref(), &mut memory.scrub_reported);
    let down_since = &mut memory.down_since;
    let running: HashMap<String, Presence> = {
        let mut m = HashMap::new();
        for r in &v.replicas {
            let node = ctl.node_state(&r.node);
            let p = if let NodeState::Lost(at) = node {
                // No call to a node known to be gone (it would only time out).
                Presence::NodeLost(at)
            } else {
                match ctl.agents().list_replicas(&r.node).await {
                    Ok(list) if list.iter().any(|p| p.replica_id == r.id && p.running) => {
                        Presence::Running
                    }
                    Ok(_) => Presence::Stopped,
                    Err(_) if node == NodeState::Alive => Presence::Partitioned,
                    Err(_) => Presence::AgentSilent,
                }
            };
            m.insert(r.id.clone(), p);
        }
        m
    };
    for r in v.replicas.clone() {
        let in_engine = st
            .replicas
            .iter()
            .find(|e| e.address == r.address)
            .map(|e| e.mode.as_str());
        let presence = running.get(&r.id).copied().unwrap_or(Presence::AgentSilent);
        match (in_engine, presence == Presence::Running) {
            (Some("RW") | Some("WO"), _) => {
                down_since.remove(&r.id);
                let state = if in_engine == Some("WO") {
                    ReplicaState::Rebuilding
                } else {
                    ReplicaState::Ready
                };
                if r.state != state {
                    let rec = ctl.update_volume(&v.id, |rec| {
                        if let Some(x) = rec.replicas.iter_mut().find(|x| x.id == r.id) {
                            x.state = state;
                        }
                    })?;
                    if state == ReplicaState::Ready && r.state != ReplicaState::Pending {
                        let ready = rec
                            .replicas
                            .iter()
                            .filter(|x| x.state == ReplicaState::Ready)
                            .count();
                        ctl.event(
                            &v.id,
                            VolumeEvent::Rebuilt,
                            format!(
                                "replica {} on node {} is in sync and serves again; {ready} of {} replicas ready",
                                r.id, r.node, rec.num_replicas
                            ),
                        );
                    }
                }
            }
            (_, true) => {
                // Running but not in sync with the engine (it stopped and was
                // restarted, or the engine ejected it): the volume is degraded
                // until the resync that re-adding starts is done.
                down_since.remove(&r.id);
                if matches!(r.state, ReplicaState::Ready) {
                    ctl.update_volume(&v.id, |rec| {
                        if let Some(x) = rec.replicas.iter_mut().find(|x| x.id == r.id) {
                            x.state = ReplicaState::Rebuilding;
                        }
                    })?;
                    ctl.event(
                        &v.id,
                        VolumeEvent::ReplicaLost,
                        format!(
                            "replica {} on node {} is out of sync with the engine (it stopped \
                             or was ejected): the volume is degraded until it is resynced",
                            r.id, r.node
                        ),
                    );
                }
                tracing::info!(volume = %v.id, replica = %r.id, address = %r.address, "re-adding replica to its engine");
                eng.add_replica(with_deadline(
                    epb::AddReplicaRequest {
                        address: r.address.clone(),
                        wait: false,
                    },
                    AGENT_CALL,
                ))
                .await
                .map_err(|e| {
                    Status::new(
                        e.code(),
                        format!("re-adding replica {}: {}", r.id, e.message()),
                    )
                })?;
            }
            (_, false) => {
                if r.state != ReplicaState::Failed {
                    ctl.update_volume(&v.id, |rec| {
                        if let Some(x) = rec.replicas.iter_mut().find(|x| x.id == r.id) {
                            x.state = ReplicaState::Failed;
                        }
                    })?;
                    ctl.event(
                        &v.id,
                        VolumeEvent::ReplicaLost,
                        format!(
                            "replica {} on node {} {}: the volume is degraded; \
                             it is replaced elsewhere unless it is back within {:?}",
                            r.id,
                            r.node,
                            presence.describe(),
                            ctl.config().replacement_delay
                        ),
                    );
                }
                let since = match presence {
                    Presence::NodeLost(at) => {
                        down_since.insert(r.id.clone(), at);
                        at
                    }
                    Presence::Partitioned => {
                        // Alive by its Lease: nothing is lost yet.
                        down_since.remove(&r.id);
                        continue;
                    }
                    _ => *down_since.entry(r.id.clone()).or_insert_with(Instant::now),
                };
                if since.elapsed() >= ctl.config().replacement_delay {
                    replace(ctl, &v, &r, presence, &mut eng).await?;
                    down_since.remove(&r.id);
                    // One replacement per pass keeps the volume's I/O bearable.
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Tells of corrupt blocks the engine's last scrub found, once per scrub.
fn report_scrub(
    ctl: &Controller,
    volume: &str,
    scrub: Option<&epb::ScrubStatus>,
    reported: &mut HashMap<String, i64>,
) {
    let Some(s) = scrub else { return };
    if s.last_finished_unix == 0 || reported.get(volume) == Some(&s.last_finished_unix) {
        return;
    }
    reported.insert(volume.to_owned(), s.last_finished_unix);
    let found: Vec<String> = s
        .last
        .iter()
        .filter(|r| r.corrupt_blocks > 0)
        .map(|r| {
            format!(
                "replica {} has {} corrupt block(s){}",
                r.id,
                r.corrupt_blocks,
                if r.repaired {
                    ", resynced from a clean replica"
                } else {
                    ", not repaired (zebu replica scrub VOLUME --repair)"
                }
            )
        })
        .collect();
    if !found.is_empty() {
        ctl.event(
            volume,
            VolumeEvent::ScrubFoundCorruption,
            format!(
                "a scrub found data that does not match its checksums: {}",
                found.join("; ")
            ),
        );
    }
}

/// Where a replica's process stands, as far as this pass can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    /// Its agent says it runs.
    Running,
    /// Its agent answers and says it does not run.
    Stopped,
    /// Its node's Lease expired at this instant.
    NodeLost(Instant),
    /// Its agent does not answer, but its node renews its Lease.
    Partitioned,
    /// Its agent does not answer and no Lease says anything.
    AgentSilent,
}

impl Presence {
    /// Why the replica is out of service, for people.
    fn describe(self) -> String {
        match self {
            Presence::Running => "runs".into(),
            Presence::Stopped => "is not running".into(),
            Presence::NodeLost(at) => format!(
                "is lost with its node (the node's lease expired {}s ago)",
                at.elapsed().as_secs()
            ),
            Presence::Partitioned => {
                "is out of reach (its node's agent does not answer this controller, \
                 but the node renews its lease)"
                    .into()
            }
            Presence::AgentSilent => "does not answer".into(),
        }
    }
}

/// Replaces the lost replica `old` of attached volume `v` by a new one.
async fn replace(
    ctl: &Controller,
    v: &VolumeRecord,
    old: &ReplicaRecord,
    why: Presence,
    eng: &mut zebu_proto::engine::engine_client::EngineClient<tonic::transport::Channel>,
) -> Result<(), Status> {
    let disks = ctl.disk_space()?;
    let others: Vec<(String, String)> = v
        .replicas
        .iter()
        .filter(|r| r.id != old.id)
        .map(|r| (r.node.clone(), r.disk.clone()))
        .collect();
    let spot = placement::place(
        &disks,
        &placement::Request {
            count: 1,
            size_bytes: v.size_bytes,
            existing: others,
            exclude_nodes: vec![old.node.clone()],
            over_provisioning_percent: ctl.config().over_provisioning_percent,
            allow_same_disk: ctl.config().allow_same_disk,
        },
    )
    .or_else(|_| {
        // No other node has room: the old node's other disks (or, if the
        // old node is simply down, nothing) will do.
        placement::place(
            &disks,
            &placement::Request {
                count: 1,
                size_bytes: v.size_bytes,
                existing: v
                    .replicas
                    .iter()
                    .map(|r| (r.node.clone(), r.disk.clone()))
                    .collect(),
                over_provisioning_percent: ctl.config().over_provisioning_percent,
                allow_same_disk: false,
                ..Default::default()
            },
        )
    })
    .map_err(|e| Status::resource_exhausted(format!("replacing replica {}: {e}", old.id)))?;
    let Some((node, disk)) = spot.into_iter().next() else {
        return Ok(());
    };
    let new = ReplicaRecord {
        id: format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        node: node.clone(),
        disk: disk.clone(),
        dir: String::new(),
        address: String::new(),
        state: ReplicaState::Pending,
    };
    ctl.event(
        &v.id,
        VolumeEvent::ReplicaReplaced,
        format!(
            "replica {} on node {} {} for longer than {:?}; replaced by {} on node {node}, \
             rebuilding from the healthy replicas",
            old.id,
            old.node,
            why.describe(),
            ctl.config().replacement_delay,
            new.id
        ),
    );
    // Record the new replica before creating it, so a crash here leaves a
    // record the next pass can finish rather than an orphan process.
    let rec = ctl.update_volume(&v.id, |rec| {
        rec.replicas.retain(|r| r.id != old.id);
        rec.replicas.push(new.clone());
    })?;
    let rec = ctl.create_replicas(&rec).await?;
    let addr = rec
        .replicas
        .iter()
        .find(|r| r.id == new.id)
        .map(|r| r.address.clone())
        .unwrap_or_default();
    // It holds nothing yet: rebuilding until the engine has it in sync
    // (a later pass sees it read-write and says it is rebuilt).
    ctl.update_volume(&v.id, |rec| {
        if let Some(x) = rec.replicas.iter_mut().find(|x| x.id == new.id) {
            x.state = ReplicaState::Rebuilding;
        }
    })?;
    eng.add_replica(with_deadline(
        epb::AddReplicaRequest {
            address: addr,
            wait: false,
        },
        AGENT_CALL,
    ))
    .await?;
    // The old replica's data is useless now; remove it if its node answers.
    if let Ok(mut agent) = ctl.agents().client(&old.node).await {
        let _ = agent
            .delete_replica(with_deadline(
                apb::DeleteReplicaRequest {
                    replica_id: old.id.clone(),
                },
                Duration::from_secs(30),
            ))
            .await;
    }
    Ok(())
}
