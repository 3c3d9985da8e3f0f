//! Operations that need the volume quiet: snapshots (create, list, delete),
//! revert, expand. Each drains I/O through the gate first.

use super::*;

impl Volume {
    pub(super) async fn snapshot_all(
        &self,
        name: &str,
        user_created: bool,
    ) -> Result<(), VolumeError> {
        let mut any_ok = false;
        for (rid, c) in self.live_members() {
            let n = name.to_owned();
            let (epoch, session) = (self.epoch, self.member_session(rid));
            let r = c
                .call("creating a snapshot", |mut cl| async move {
                    cl.create_snapshot(pb::CreateSnapshotRequest {
                        name: n,
                        epoch,
                        user_created,
                        session,
                    })
                    .await
                })
                .await;
            match r {
                Ok(_) => {
                    any_ok = true;
                    zebu_proto::crash::point("engine.snapshot.partial");
                }
                Err(ClientError::Call { status, .. })
                    if status.code() == tonic::Code::AlreadyExists =>
                {
                    return Err(VolumeError::Precondition(format!(
                        "a snapshot named {name:?} already exists"
                    )));
                }
                Err(ClientError::Call { status, .. })
                    if status.code() == tonic::Code::InvalidArgument =>
                {
                    return Err(VolumeError::Invalid(status.message().to_owned()));
                }
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        if any_ok {
            Ok(())
        } else {
            Err(VolumeError::Precondition(
                "no replica took the snapshot".into(),
            ))
        }
    }

    /// Crash-consistent snapshot: drain I/O, snapshot every replica under
    /// one name, resume.
    pub async fn create_snapshot(&self, name: &str) -> Result<epb::Snapshot, VolumeError> {
        let _c = self.control_lock.lock().await;
        {
            let _quiet = self.gate.write().await;
            self.snapshot_all(name, true).await?;
        }
        Ok(epb::Snapshot {
            name: name.to_owned(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            user_created: true,
        })
    }

    /// The snapshots of a healthy replica, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<epb::Snapshot>, VolumeError> {
        let c = self
            .rw_member()
            .ok_or_else(|| VolumeError::Precondition("no healthy replica".into()))?;
        let list = c
            .call("listing snapshots", |mut cl| async move {
                cl.list_snapshots(pb::ListSnapshotsRequest {}).await
            })
            .await?;
        Ok(list
            .snapshots
            .into_iter()
            .map(|l| epb::Snapshot {
                name: l.name,
                created_unix: l.created_unix,
                user_created: l.user_created,
            })
            .collect())
    }

    /// Refuses operations that would disturb a rebuild in progress.
    pub(super) fn check_no_rebuild(&self, what: &str) -> Result<(), VolumeError> {
        let inner = self.lock();
        let running = inner.members.values().find(|m| {
            m.rebuild
                .as_ref()
                .is_some_and(|p| p.get().state == "running")
        });
        match running {
            Some(m) => Err(VolumeError::Precondition(format!(
                "cannot {what} while replica {} is rebuilding; retry when `status` shows it RW",
                m.control.addr
            ))),
            None => Ok(()),
        }
    }

    /// Deletes a snapshot on every replica (merging it into its child).
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        self.check_no_rebuild("delete a snapshot")?;
        let mut found = false;
        for (rid, c) in self.live_members() {
            let (n, epoch, session) = (name.to_owned(), self.epoch, self.member_session(rid));
            let r = c
                .call_long("deleting a snapshot", |mut cl| async move {
                    cl.delete_snapshot(pb::DeleteSnapshotRequest {
                        name: n,
                        epoch,
                        session,
                    })
                    .await
                })
                .await;
            match r {
                Ok(_) => {
                    found = true;
                    zebu_proto::crash::point("engine.snapshot-delete.partial");
                }
                Err(ClientError::Call { status, .. }) if status.code() == tonic::Code::NotFound => {
                }
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        if found {
            Ok(())
        } else {
            Err(VolumeError::NotFound(format!("no snapshot named {name:?}")))
        }
    }

    /// Reverts every replica to snapshot `name`. Refused while clients use
    /// the volume (NBD connections, opens of its file).
    pub async fn revert(&self, name: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        self.check_no_rebuild("revert")?;
        let clients = self.nbd_clients.load(Ordering::Acquire);
        if clients > 0 {
            return Err(VolumeError::Precondition(format!(
                "revert needs the volume detached: {clients} client(s) use it (NBD connections or opens of its file); detach them first"
            )));
        }
        let _quiet = self.gate.write().await;
        let members = self.live_members();
        // The snapshot must exist on a healthy replica before anything changes.
        let snaps = self.list_snapshots().await?;
        if !snaps.iter().any(|s| s.name == name) {
            return Err(VolumeError::NotFound(format!("no snapshot named {name:?}")));
        }
        // Replicas refuse to revert with a data stream open: close ours.
        {
            let mut inner = self.lock();
            for (rid, _) in &members {
                if let Some(m) = inner.members.get_mut(rid) {
                    m.link = None;
                }
            }
        }
        for (rid, c) in &members {
            let mut attempt = 0;
            loop {
                let (n, epoch, session) = (name.to_owned(), self.epoch, self.member_session(*rid));
                let r = c
                    .call("reverting", |mut cl| async move {
                        cl.revert(pb::RevertRequest {
                            name: n,
                            epoch,
                            session,
                        })
                        .await
                    })
                    .await;
                match r {
                    Ok(_) => {
                        zebu_proto::crash::point("engine.revert.partial");
                        break;
                    }
                    // The replica may not have seen our stream close yet.
                    Err(ClientError::Call { status, .. })
                        if status.code() == tonic::Code::FailedPrecondition && attempt < 100 =>
                    {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        self.fail_member(*rid, &e)?;
                        break;
                    }
                }
            }
        }
        // Reopen the data streams.
        for (rid, c) in members {
            let generation = {
                let mut inner = self.lock();
                let g = inner.next_link_gen;
                inner.next_link_gen += 1;
                g
            };
            let session = {
                let inner = self.lock();
                if inner.sm.mode(rid) == Some(Mode::Err) {
                    continue;
                }
                inner.members.get(&rid).map_or(0, |m| m.session)
            };
            let handler = Arc::new(LinkHandler {
                volume: self.me.clone(),
                replica: rid,
                generation,
            });
            match DataLink::open(&c, session, handler).await {
                Ok(link) => {
                    if let Some(m) = self.lock().members.get_mut(&rid) {
                        m.link = Some((generation, link));
                    }
                }
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        Ok(())
    }

    /// Grows the volume on every replica.
    pub async fn expand(&self, size: u64) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        let current = self.size.load(Ordering::Acquire);
        if size < current {
            return Err(VolumeError::Invalid(format!(
                "cannot shrink the volume from {current} to {size} bytes; only growing is supported"
            )));
        }
        if !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(VolumeError::Invalid(format!(
                "new size {size} must be a multiple of {BLOCK_SIZE}"
            )));
        }
        if size == current {
            return Ok(());
        }
        let _quiet = self.gate.write().await;
        for (rid, c) in self.live_members() {
            let (epoch, session) = (self.epoch, self.member_session(rid));
            let r = c
                .call("expanding", |mut cl| async move {
                    cl.expand(pb::ExpandRequest {
                        size,
                        epoch,
                        session,
                    })
                    .await
                })
                .await;
            match r {
                Ok(_) => zebu_proto::crash::point("engine.expand.partial"),
                Err(e) => self.fail_member(rid, &e)?,
            }
        }
        self.size.store(size, Ordering::Release);
        self.resized.send_replace(size);
        Ok(())
    }
}
