//! The engine's control API (gRPC) and the `zebu-engine ctl` client.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use zebu_proto::duration::span;
use zebu_proto::engine as epb;
use zebu_proto::engine::engine_server::Engine;

use crate::volume::{Volume, VolumeError};

/// gRPC status for a volume error.
pub fn status_of(e: &VolumeError) -> Status {
    let msg = e.to_string();
    match e {
        VolumeError::Invalid(_) => Status::invalid_argument(msg),
        VolumeError::NotFound(_) => Status::not_found(msg),
        VolumeError::Precondition(_) | VolumeError::Replication(_) => {
            Status::failed_precondition(msg)
        }
        VolumeError::Link(_) | VolumeError::Rebuild(_) => Status::unavailable(msg),
    }
}

/// The control service of one engine.
pub struct EngineService {
    volume: Arc<Volume>,
}

impl EngineService {
    /// A service over `volume`.
    pub fn new(volume: Arc<Volume>) -> Self {
        EngineService { volume }
    }
}

fn check<T>(r: Result<T, VolumeError>) -> Result<T, Status> {
    r.map_err(|e| status_of(&e))
}

#[tonic::async_trait]
impl Engine for EngineService {
    async fn status(
        &self,
        _r: Request<epb::StatusRequest>,
    ) -> Result<Response<epb::VolumeStatus>, Status> {
        Ok(Response::new(self.volume.status()))
    }

    async fn add_replica(
        &self,
        r: Request<epb::AddReplicaRequest>,
    ) -> Result<Response<epb::VolumeStatus>, Status> {
        let r = r.into_inner();
        let rebuild = check(self.volume.add_replica(&r.address).await)?;
        if r.wait {
            match rebuild.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    return Err(Status::aborted(format!(
                        "rebuild of replica {} failed: {why}",
                        r.address
                    )));
                }
                Err(e) => {
                    return Err(Status::internal(format!(
                        "rebuild of replica {} did not finish: {e}",
                        r.address
                    )));
                }
            }
        }
        Ok(Response::new(self.volume.status()))
    }

    async fn remove_replica(
        &self,
        r: Request<epb::RemoveReplicaRequest>,
    ) -> Result<Response<epb::VolumeStatus>, Status> {
        check(self.volume.remove_replica(&r.into_inner().replica).await)?;
        Ok(Response::new(self.volume.status()))
    }

    async fn create_snapshot(
        &self,
        r: Request<epb::CreateSnapshotRequest>,
    ) -> Result<Response<epb::Snapshot>, Status> {
        Ok(Response::new(check(
            self.volume.create_snapshot(&r.into_inner().name).await,
        )?))
    }

    async fn list_snapshots(
        &self,
        _r: Request<epb::ListSnapshotsRequest>,
    ) -> Result<Response<epb::ListSnapshotsResponse>, Status> {
        let snapshots = check(self.volume.list_snapshots().await)?;
        Ok(Response::new(epb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<epb::DeleteSnapshotRequest>,
    ) -> Result<Response<epb::DeleteSnapshotResponse>, Status> {
        check(self.volume.delete_snapshot(&r.into_inner().name).await)?;
        Ok(Response::new(epb::DeleteSnapshotResponse {}))
    }

    async fn revert(
        &self,
        r: Request<epb::RevertRequest>,
    ) -> Result<Response<epb::VolumeStatus>, Status> {
        check(self.volume.revert(&r.into_inner().name).await)?;
        Ok(Response::new(self.volume.status()))
    }

    async fn expand(
        &self,
        r: Request<epb::ExpandRequest>,
    ) -> Result<Response<epb::VolumeStatus>, Status> {
        check(self.volume.expand(r.into_inner().size).await)?;
        Ok(Response::new(self.volume.status()))
    }

    async fn scrub(
        &self,
        r: Request<epb::ScrubRequest>,
    ) -> Result<Response<epb::ScrubResponse>, Status> {
        let r = r.into_inner();
        zebu_proto::size::check_rate(r.max_bytes_per_sec).map_err(Status::invalid_argument)?;
        // One scrub at a time: say so rather than wait, maybe for hours,
        // behind a scheduled one.
        let Some(replicas) = self.volume.try_scrub(r.repair, r.max_bytes_per_sec).await else {
            return Err(Status::failed_precondition(
                "a scrub of this volume is already running (scheduled, or asked for by another \
                 client); `ctl status` shows when it has finished; try again then",
            ));
        };
        Ok(Response::new(epb::ScrubResponse { replicas }))
    }
}

/// JSON form of a volume status (the `ctl status -o json` schema).
pub fn status_json(s: &epb::VolumeStatus) -> serde_json::Value {
    let io = s.io.unwrap_or_default();
    serde_json::json!({
        "volume": s.volume,
        "size": s.size,
        "state": s.state,
        "epoch": s.epoch,
        "revision": s.revision,
        "nbd_clients": s.nbd_clients,
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "address": r.address,
            "id": r.id,
            "mode": r.mode,
            "in_flight": r.in_flight,
            "errors": r.errors,
            "rebuild": r.rebuild.as_ref().map(|p| serde_json::json!({
                "state": p.state,
                "bytes_done": p.bytes_done,
                "bytes_total": p.bytes_total,
                "blocks_copied": p.blocks_copied,
                "blocks_punched": p.blocks_punched,
                "rate_bytes_per_sec": p.rate_bytes_per_sec,
                "plan_seconds": p.plan_seconds,
                "copy_seconds": p.copy_seconds,
                "finish_seconds": p.finish_seconds,
                "error": if p.error.is_empty() { None } else { Some(p.error.clone()) },
            })),
        })).collect::<Vec<_>>(),
        "io": {
            "reads": io.reads,
            "writes": io.writes,
            "flushes": io.flushes,
            "unmaps": io.unmaps,
            "read_p50_us": io.read_p50_us,
            "read_p99_us": io.read_p99_us,
            "write_p50_us": io.write_p50_us,
            "write_p99_us": io.write_p99_us,
        },
        "scrub": s.scrub.as_ref().map(|c| serde_json::json!({
            "interval_seconds": c.interval_seconds,
            "max_bytes_per_sec": c.max_bytes_per_sec,
            "next_unix": c.next_unix,
            "running": c.running,
            "runs": c.runs,
            "replicas_repaired": c.replicas_repaired,
            "last_finished_unix": c.last_finished_unix,
            "last": c.last.iter().map(scrub_json).collect::<Vec<_>>(),
        })),
    })
}

/// JSON form of one replica's scrub report (`ctl scrub`'s schema).
pub fn scrub_json(r: &epb::ReplicaScrub) -> serde_json::Value {
    serde_json::json!({
        "address": r.address, "id": r.id, "blocks_checked": r.blocks_checked,
        "corrupt_blocks": r.corrupt_blocks, "corrupt": r.corrupt,
        "repaired": r.repaired, "error": r.error,
    })
}

/// One line on the volume's scrubs: schedule, and the last one's outcome.
fn scrub_line(c: &epb::ScrubStatus, now: i64) -> String {
    let schedule = if c.interval_seconds == 0 {
        "not scheduled".to_string()
    } else {
        let rate = match c.max_bytes_per_sec {
            0 => "no rate limit".to_string(),
            r => format!("{} MiB/s per replica", r >> 20),
        };
        let next = match c.next_unix {
            0 => String::new(),
            t if t <= now => ", next now".to_string(),
            t => format!(", next in {}", span(t - now)),
        };
        format!("every {}, {rate}{next}", span(c.interval_seconds as i64))
    };
    let last = if c.running {
        "running now".to_string()
    } else if c.last_finished_unix == 0 {
        "none since the engine started".to_string()
    } else {
        let checked: u64 = c.last.iter().map(|r| r.blocks_checked).sum();
        let corrupt: u64 = c.last.iter().map(|r| r.corrupt_blocks).sum();
        let repaired = c.last.iter().filter(|r| r.repaired).count();
        let failed = c.last.iter().filter(|r| !r.error.is_empty()).count();
        format!(
            "last {} ago: {checked} blocks checked, {corrupt} corrupt, {repaired} replicas \
             repaired, {failed} failed",
            span(now.saturating_sub(c.last_finished_unix))
        )
    };
    format!("scrub: {schedule}; {last}\n")
}

/// Human-readable form of a volume status.
pub fn status_table(s: &epb::VolumeStatus) -> String {
    let mut out = format!(
        "volume {}  size {}  state {}  epoch {}  revision {}  nbd clients {}\n",
        s.volume, s.size, s.state, s.epoch, s.revision, s.nbd_clients
    );
    out.push_str(&format!(
        "{:<24} {:<38} {:<4} {}\n",
        "ADDRESS", "ID", "MODE", "REBUILD"
    ));
    for r in &s.replicas {
        let rebuild = match &r.rebuild {
            None => "-".to_string(),
            Some(p) => format!(
                "{} {}/{} MiB, {} blocks copied, {:.1} MiB/s{}",
                p.state,
                p.bytes_done >> 20,
                p.bytes_total >> 20,
                p.blocks_copied,
                p.rate_bytes_per_sec / (1 << 20) as f64,
                if p.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", p.error)
                }
            ),
        };
        out.push_str(&format!(
            "{:<24} {:<38} {:<4} {}\n",
            r.address, r.id, r.mode, rebuild
        ));
    }
    if let Some(io) = &s.io {
        out.push_str(&format!(
            "io: {} reads (p50 {} us, p99 {} us), {} writes (p50 {} us, p99 {} us), {} flushes, {} unmaps\n",
            io.reads, io.read_p50_us, io.read_p99_us, io.writes, io.write_p50_us, io.write_p99_us, io.flushes, io.unmaps
        ));
    }
    if let Some(c) = &s.scrub {
        out.push_str(&scrub_line(c, crate::volume::scrub::now_unix()));
    }
    out
}
