//! Replicas on this node's disks: create (directory, record, process),
//! delete (process, record, data), list.

use super::*;

impl Agent {
    pub(super) fn resolve_disk(&self, disk: &str) -> Result<String, AgentError> {
        let ctx = &self.inner.ctx;
        ctx.disks
            .iter()
            .find(|d| !disk.is_empty() && Path::new(d.as_str()) == Path::new(disk))
            .cloned()
            .ok_or_else(|| AgentError::UnknownDisk {
                disk: disk.to_owned(),
                valid: ctx.disks.clone(),
            })
    }

    /// `CreateReplica`: creates the replica directory on the disk and starts
    /// a supervised `zebu-replica` on it. Idempotent by replica id (same
    /// volume and disk: returned, started first if it is not running).
    pub async fn create_replica(
        &self,
        req: pb::CreateReplicaRequest,
    ) -> Result<pb::ReplicaProcess, AgentError> {
        self.check_open()?;
        validate_id("volume_id", &req.volume_id)?;
        validate_id("replica_id", &req.replica_id)?;
        if req.size_bytes == 0 {
            return Err(AgentError::InvalidArgument(
                "size_bytes is 0: give the replica's size".into(),
            ));
        }
        let disk = self.resolve_disk(&req.disk)?;
        let key = Key {
            kind: Kind::Replica,
            id: req.replica_id.clone(),
        };
        let _op = self.lock_key(&key).await;
        self.check_open()?;
        if let Some(proc) = self.proc(&key) {
            let snap = proc.snapshot();
            refuse_removing(&snap.rec)?;
            if let Spec::Replica {
                volume_id,
                disk: have_disk,
                ..
            } = &snap.rec.spec
                && (volume_id != &req.volume_id || have_disk != &disk)
            {
                return Err(AgentError::AlreadyExists(format!(
                    "replica {} already exists for volume {volume_id} on disk {have_disk}; \
                     it cannot also be created for volume {} on disk {disk}",
                    req.replica_id, req.volume_id
                )));
            }
            if !snap.running {
                info!(what = %snap.rec.spec.what(), "not running: starting it now");
                self.start_known(&key, &proc).await?;
            }
            return info_of(proc.replica_info());
        }
        let dir = Path::new(&disk)
            .join("replicas")
            .join(&req.volume_id)
            .join(&req.replica_id);
        let dir_str = dir
            .to_str()
            .ok_or_else(|| AgentError::Internal(format!("{dir:?} is not UTF-8")))?
            .to_owned();
        let existed = dir.exists();
        if let Some(parent) = dir.parent() {
            create_dir(parent)?;
        }
        let rec = Record::new(Spec::Replica {
            volume_id: req.volume_id.clone(),
            replica_id: req.replica_id.clone(),
            disk,
            dir: dir_str,
            size_bytes: req.size_bytes,
            created: false,
        });
        match self.start_new(rec).await {
            Ok(proc) => {
                let info = info_of(proc.replica_info())?;
                info!(
                    replica = %info.replica_id,
                    volume = %info.volume_id,
                    dir = %info.dir,
                    address = %info.address,
                    pid = info.pid,
                    "replica created"
                );
                Ok(info)
            }
            Err(e) => {
                // Only remove what this call created: an existing directory
                // may hold data (e.g. its size did not match).
                if !existed {
                    if let Err(re) = remove_tree(dir.clone()).await {
                        warn!(error = %re, "cannot remove the directory of a failed replica");
                    }
                    if let Some(parent) = dir.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
                Err(e)
            }
        }
    }

    /// `DeleteReplica`: stops the replica's process (SIGTERM, SIGKILL after a
    /// grace period) and removes its directory. Unknown replicas are fine.
    pub async fn delete_replica(&self, req: pb::DeleteReplicaRequest) -> Result<(), AgentError> {
        self.check_open()?;
        validate_id("replica_id", &req.replica_id)?;
        let key = Key {
            kind: Kind::Replica,
            id: req.replica_id.clone(),
        };
        let _op = self.lock_key(&key).await;
        self.check_open()?;
        self.remove(&key).await
    }

    /// Stops a process for good and removes what it leaves (see
    /// [`Agent::finish_removal`]).
    pub(super) async fn remove(&self, key: &Key) -> Result<(), AgentError> {
        let Some(proc) = self.proc(key) else {
            return Ok(());
        };
        proc.update(|s| s.rec.removing = true);
        proc.persist().await?;
        self.end_supervisor(key, Cmd::Stop).await;
        self.finish_removal(&proc).await?;
        lock(&self.inner.entries).remove(key);
        info!(what = %proc.snapshot().rec.spec.what(), "removed");
        Ok(())
    }

    /// `ListReplicas`: every replica, ordered by id.
    pub async fn list_replicas(&self) -> Result<pb::ListReplicasResponse, AgentError> {
        self.check_open()?;
        Ok(pb::ListReplicasResponse {
            replicas: self
                .procs(Kind::Replica)
                .iter()
                .filter_map(|p| p.replica_info())
                .collect(),
        })
    }
}
