//! The replica set: admission of a new or returning replica (write-only,
//! then rebuilt from a healthy one and promoted), removal, ejection after a
//! failed control call, and the record of ejected replicas every member keeps.

use super::*;

impl Volume {
    /// The replicas that are not ejected, for control calls.
    /// The session member `rid`'s `Open` started (0 if it is gone): every
    /// control call to it names it, so a late call of an older attachment
    /// of the same replica is refused.
    pub(super) fn member_session(&self, rid: ReplicaId) -> u64 {
        self.lock().members.get(&rid).map_or(0, |m| m.session)
    }

    pub(super) fn live_members(&self) -> Vec<(ReplicaId, Control)> {
        let inner = self.lock();
        inner
            .sm
            .modes()
            .filter(|(_, m)| *m != Mode::Err)
            .filter_map(|(r, _)| inner.members.get(&r).map(|m| (r, m.control.clone())))
            .collect()
    }

    /// An RW replica to read from, one not known to hold corrupt blocks if
    /// there is one.
    pub(super) fn rw_member(&self) -> Option<Control> {
        let inner = self.lock();
        let rw: Vec<&Member> = inner
            .sm
            .modes()
            .filter(|(_, m)| *m == Mode::Rw)
            .filter_map(|(r, _)| inner.members.get(&r))
            .collect();
        rw.iter()
            .find(|m| !inner.corrupt.contains(&m.uuid))
            .or(rw.first())
            .map(|m| m.control.clone())
    }

    /// Ejects a replica that failed a control operation (unless it is the
    /// last healthy one, in which case the error is returned).
    pub(super) fn fail_member(&self, rid: ReplicaId, err: &ClientError) -> Result<(), VolumeError> {
        let mut inner = self.lock();
        let last = inner.sm.mode(rid) == Some(Mode::Rw) && inner.sm.rw_count() == 1;
        if last {
            return Err(VolumeError::Precondition(format!(
                "the last healthy replica failed: {err}"
            )));
        }
        tracing::warn!(error = %err, "ejecting a replica that failed a control operation");
        self.fail_replica(&mut inner, rid);
        Ok(())
    }

    /// Adds the replica at `addr`: it joins write-only, a system snapshot
    /// freezes the data it must catch up on, and a background task copies
    /// what differs from a healthy replica, then promotes it. The returned
    /// task ends with the rebuild (its error, if it failed); dropping it does
    /// not stop the rebuild.
    pub async fn add_replica(&self, addr: &str) -> Result<RebuildTask, VolumeError> {
        let _c = self.control_lock.lock().await;
        let control = Control::connect(addr, self.io_timeout).await?;
        let info = control.info().await?;
        let size = self.size.load(Ordering::Acquire);
        if info.size > size {
            return Err(VolumeError::Invalid(format!(
                "replica {addr} holds {} bytes, more than the volume's {size}",
                info.size
            )));
        }
        if info.epoch > self.epoch {
            return Err(VolumeError::Precondition(format!(
                "replica {addr} was opened by a newer engine (epoch {} > {}); this engine is stale",
                info.epoch, self.epoch
            )));
        }
        // A returning replica replaces its ejected slot.
        {
            let mut inner = self.lock();
            let old: Vec<(ReplicaId, Mode)> = inner
                .members
                .iter()
                .filter(|(_, m)| m.uuid == info.id)
                .map(|(r, _)| (*r, inner.sm.mode(*r).unwrap_or(Mode::Err)))
                .collect();
            for (rid, mode) in old {
                if mode != Mode::Err {
                    return Err(VolumeError::Precondition(format!(
                        "replica {addr} (id {}) is already a {mode:?} member of this volume",
                        info.id
                    )));
                }
                self.drop_member(&mut inner, rid);
            }
        }
        let epoch = self.epoch;
        let opened = control
            .call("opening with the engine's epoch", |mut cl| async move {
                cl.open(pb::OpenRequest { epoch }).await
            })
            .await?;
        if info.size < size {
            let session = opened.session;
            control
                .call("growing to the volume size", |mut cl| async move {
                    cl.expand(pb::ExpandRequest {
                        size,
                        epoch,
                        session,
                    })
                    .await
                })
                .await?;
        }
        let snap = format!(
            "rebuild-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let rid = {
            let _quiet = self.gate.write().await;
            let rid = self
                .admit(control.clone(), info.id.clone(), opened.session)
                .await?;
            if let Err(e) = self.snapshot_all(&snap, false).await {
                let mut inner = self.lock();
                self.drop_member(&mut inner, rid);
                return Err(e);
            }
            rid
        };
        let progress = Arc::new(Progress::started());
        if let Some(m) = self.lock().members.get_mut(&rid) {
            m.rebuild = Some(progress.clone());
        }
        let Some(me) = self.me.upgrade() else {
            return Err(VolumeError::Precondition(
                "the volume is shutting down".into(),
            ));
        };
        Ok(tokio::spawn(async move {
            let result = me.rebuild(rid, &control, &snap, &progress).await;
            let summary = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            progress.finish(&summary);
            match result {
                Ok(()) => {
                    let p = progress.get();
                    let [plan_s, copy_s, finish_s] = p.phase_seconds();
                    tracing::info!(replica = %control.addr, blocks_copied = p.blocks_copied, bytes = p.bytes_done, plan_s, copy_s, finish_s, "rebuild done; replica is RW");
                }
                Err(e) => {
                    tracing::warn!(replica = %control.addr, error = %e, "rebuild failed; ejecting the replica");
                    me.fail_replica(&mut me.lock(), rid);
                }
            }
            summary
        }))
    }

    pub(super) async fn rebuild(
        &self,
        rid: ReplicaId,
        dst: &Control,
        snap: &str,
        progress: &Progress,
    ) -> Result<(), VolumeError> {
        let src = self.rw_member().ok_or_else(|| {
            VolumeError::Precondition("no healthy replica to rebuild from".into())
        })?;
        let names = frozen_names(&src.info().await?);
        let session = self.lock().members.get(&rid).map_or(0, |m| m.session);
        resync(&src, dst, &names, false, self.epoch, session, progress).await?;
        {
            let mut inner = self.lock();
            self.feed(&mut inner, |sm, out| sm.set_rw(rid, out))?;
            // The replicas this one replaces leave the member list; their ids
            // stay recorded as ejected so crash recovery never trusts them.
            let replaced: Vec<ReplicaId> = inner
                .sm
                .modes()
                .filter(|(_, m)| *m == Mode::Err)
                .map(|(r, _)| r)
                .collect();
            for r in replaced {
                if let Some(uuid) = inner.members.get(&r).map(|m| m.uuid.clone()) {
                    inner.ejected.insert(uuid);
                }
                self.drop_member(&mut inner, r);
            }
            if let Some(uuid) = inner.members.get(&rid).map(|m| m.uuid.clone()) {
                inner.ejected.remove(&uuid);
            }
        }
        self.record_ejected().await;
        // The system snapshot has served its purpose.
        self.fold_system_snapshot(snap).await;
        Ok(())
    }

    /// Deletes system snapshot `snap` (a rebuild's) on every live replica,
    /// folding it back into the head. A replica that fails keeps it (its
    /// next engine folds it); the volume is unaffected either way.
    pub(super) async fn fold_system_snapshot(&self, snap: &str) {
        for (rid, c) in self.live_members() {
            let (n, epoch, session) = (snap.to_owned(), self.epoch, self.member_session(rid));
            if let Err(e) = c
                .call_long("deleting the rebuild snapshot", |mut cl| async move {
                    cl.delete_snapshot(pb::DeleteSnapshotRequest {
                        name: n,
                        epoch,
                        session,
                    })
                    .await
                })
                .await
            {
                tracing::warn!(error = %e, "could not delete the rebuild snapshot");
            }
        }
    }

    /// Writes the current set of ejected replica ids to every live replica.
    pub(super) async fn record_ejected(&self) {
        let ejected: Vec<String> = self.lock().ejected.iter().cloned().collect();
        for (rid, c) in self.live_members() {
            let (ej, epoch, session) = (ejected.clone(), self.epoch, self.member_session(rid));
            if let Err(e) = c
                .call("recording ejected replicas", |mut cl| async move {
                    cl.set_ejected(pb::SetEjectedRequest {
                        ejected: ej,
                        epoch,
                        session,
                    })
                    .await
                })
                .await
            {
                tracing::warn!(error = %e, "could not record the ejected set");
            }
        }
    }

    /// Removes a replica (by address or id) from the volume.
    pub async fn remove_replica(&self, which: &str) -> Result<(), VolumeError> {
        let _c = self.control_lock.lock().await;
        let mut inner = self.lock();
        let rid = inner
            .members
            .iter()
            .find(|(_, m)| m.control.addr == which || m.uuid == which)
            .map(|(r, _)| *r)
            .ok_or_else(|| VolumeError::NotFound(format!("no replica {which:?} in this volume")))?;
        self.feed(&mut inner, |sm, out| sm.remove_replica(rid, out))?;
        inner.members.remove(&rid);
        Ok(())
    }

    /// Takes the replica at `addr` out and adds it back, waiting for its
    /// rebuild.
    pub(super) async fn resync(&self, addr: &str) -> Result<(), String> {
        self.remove_replica(addr).await.map_err(|e| e.to_string())?;
        let task = self.add_replica(addr).await.map_err(|e| e.to_string())?;
        match task.await {
            Ok(done) => done,
            Err(e) => Err(format!("the rebuild did not finish: {e}")),
        }
    }
}

/// Makes `dst` equal to `src`: reshape its chain, copy what differs in every
/// frozen layer (and the head with `include_head`), and finish the sync.
pub(super) async fn resync(
    src: &Control,
    dst: &Control,
    names: &[String],
    include_head: bool,
    epoch: u64,
    session: u64,
    progress: &Progress,
) -> Result<(), VolumeError> {
    let layers = names.to_vec();
    dst.call_long("preparing a sync", |mut c| async move {
        c.prepare_sync(pb::PrepareSyncRequest {
            layers,
            epoch,
            include_head,
            session,
        })
        .await
    })
    .await?;
    let mut all = names.to_vec();
    if include_head {
        all.push(String::new());
    }
    sync::sync_layers(src, dst, &all, epoch, session, BLOCK_SIZE as u64, progress).await?;
    dst.call_long("finishing a sync", |mut c| async move {
        c.finish_sync(pb::FinishSyncRequest { epoch, session })
            .await
    })
    .await?;
    Ok(())
}
