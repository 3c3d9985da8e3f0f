//! NodeStageVolume and NodeUnstageVolume: attach the engine's export as a
//! block device, make a filesystem if blank, mount it; and the way back.

use super::*;

impl NodeService {
    pub(super) async fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<(), Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let staging = require_abs_path(&req.staging_target_path, "staging_target_path")?;
        let mut cap = parse_capability(req.volume_capability.as_ref())?;
        // No filesystem named by the capability: the one the volume was
        // created for (StorageClass parameter), else the default.
        if let (Some(AccessType::Mount(m)), Access::Mount { fs_type, .. }) = (
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            &mut cap.access,
        ) && m.fs_type.is_empty()
            && let Some(fs) = req.volume_context.get(zebu_common::context::VOLUME_FSTYPE)
        {
            if !attach::SUPPORTED_FILESYSTEMS.contains(&fs.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "volume_context names filesystem {fs:?}, which is not supported (supported: {})",
                    attach::SUPPORTED_FILESYSTEMS.join(", ")
                )));
            }
            *fs_type = fs.clone();
        }
        let uri = nbd_uri(&req.publish_context, id)?;
        let engine = engine_addr(&req.publish_context)?;
        let engine_file = engine_file(&req.publish_context)?;
        let _op = self.ops.begin(id)?;

        let (mut rec, fresh) = match self.load(id)? {
            Some(rec) => {
                if rec.staging_path != staging {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} is already staged at {}; unstage it there first",
                        rec.staging_path.display()
                    )));
                }
                if rec.access != cap.access || rec.read_only != cap.read_only {
                    return Err(Status::already_exists(format!(
                        "volume {id} is already staged at {} as {}{} (mount flags {:?}), \
                         incompatible with the requested {}{}",
                        staging.display(),
                        rec.access.describe(),
                        if rec.read_only { ", read-only" } else { "" },
                        mount_flags(&rec.access),
                        cap.access.describe(),
                        if cap.read_only { ", read-only" } else { "" },
                    )));
                }
                if rec.nbd_uri != uri {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} is staged from {} but publish_context names {uri}; \
                         unstage it first",
                        rec.nbd_uri
                    )));
                }
                let mut rec = rec;
                if rec.engine != engine || rec.engine_file != engine_file {
                    rec.engine = engine;
                    rec.engine_file = engine_file;
                    self.store(&rec)?;
                }
                (rec, false)
            }
            None => {
                let rec = VolumeRecord::new(
                    id,
                    &staging,
                    cap.access,
                    cap.read_only,
                    &uri,
                    engine,
                    engine_file,
                );
                self.store(&rec)?;
                (rec, true)
            }
        };
        match self.do_stage(&mut rec).await {
            Ok(()) => {
                info!(volume_id = id, staging = %staging.display(), "staged");
                Ok(())
            }
            Err(e) => {
                if fresh {
                    self.roll_back_stage(&rec).await;
                }
                Err(e)
            }
        }
    }

    /// Attaches and (mount access) makes the filesystem and mounts it.
    /// Idempotent: every step checks what is already there.
    pub(super) async fn do_stage(&self, rec: &mut VolumeRecord) -> Result<(), Status> {
        let dir = self.dir(&rec.volume_id)?;
        let att = attach::attach(&rec.nbd_uri, rec.engine_file.as_deref(), &dir)
            .await
            .map_err(attach_status)?;
        if rec.device.as_ref() != Some(&att.device) {
            rec.device = Some(att.device.clone());
            self.store(rec)?;
        }
        zebu_proto::crash::point("csi.node-stage.attached");
        if let Access::Mount {
            fs_type,
            mount_flags,
        } = &rec.access
        {
            let outcome = attach::ensure_filesystem(&att.device, fs_type)
                .await
                .map_err(attach_status)?;
            info!(volume_id = %rec.volume_id, ?outcome, "filesystem checked");
            // A volume expanded while detached: grow its ext4 before
            // mounting (offline resize needs no extra capability; a
            // filesystem that already fills the device is left alone).
            if outcome == attach::FsOutcome::Existing
                && fs_type != "xfs"
                && !rec.read_only
                && !attach::is_mounted(&rec.staging_path)
                    .await
                    .map_err(attach_status)?
            {
                attach::expand_filesystem(&att.device, None, None)
                    .await
                    .map_err(attach_status)?;
            }
            attach::mount(
                &att.device,
                &rec.staging_path,
                fs_type,
                rec.read_only,
                mount_flags,
            )
            .await
            .map_err(attach_status)?;
            if fs_type == "xfs" && !rec.read_only {
                // xfs grows only while mounted; a no-op when it fills the device.
                attach::expand_filesystem(&att.device, Some(&rec.staging_path), None)
                    .await
                    .map_err(attach_status)?;
            }
        }
        Ok(())
    }

    /// Undoes a failed first stage (best effort; logged).
    pub(super) async fn roll_back_stage(&self, rec: &VolumeRecord) {
        let id = &rec.volume_id;
        if matches!(rec.access, Access::Mount { .. })
            && let Err(e) = attach::unmount(&rec.staging_path).await
        {
            warn!(volume_id = %id, "rolling back a failed stage: {e}");
            return;
        }
        let Ok(dir) = self.dir(id) else { return };
        if let Err(e) = attach::detach(&dir).await {
            warn!(volume_id = %id, "rolling back a failed stage: {e}");
            return;
        }
        if let Err(e) = self.records.remove(id) {
            warn!(volume_id = %id, "rolling back a failed stage: {e}");
        }
    }

    pub(super) async fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<(), Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let staging = require_abs_path(&req.staging_target_path, "staging_target_path")?;
        let _op = self.ops.begin(id)?;
        let dir = self.dir(id)?;
        let Some(mut rec) = self.load(id)? else {
            // Not staged. A half-made attachment without a record cannot
            // come from us, but detach is harmless when there is none.
            attach::detach(&dir).await.map_err(attach_status)?;
            self.records.remove(id).map_err(record_status)?;
            return Ok(());
        };
        if rec.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged at {}, not at {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let published = self.mounted_targets(&mut rec).await?;
        if let Some(t) = published.first() {
            return Err(Status::failed_precondition(format!(
                "volume {id} is still published at {}; NodeUnpublishVolume must run first",
                t.display()
            )));
        }
        if matches!(rec.access, Access::Mount { .. }) {
            attach::unmount(&staging).await.map_err(attach_status)?;
        }
        attach::detach(&dir).await.map_err(attach_status)?;
        self.records.remove(id).map_err(record_status)?;
        info!(volume_id = id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    /// The recorded publish targets that are still mounted; forgets (and
    /// stores) the others.
    pub(super) async fn mounted_targets(
        &self,
        rec: &mut VolumeRecord,
    ) -> Result<Vec<PathBuf>, Status> {
        let mut mounted = Vec::new();
        let mut gone = Vec::new();
        for t in rec.targets.keys() {
            if attach::is_mounted(t).await.map_err(attach_status)? {
                mounted.push(t.clone());
            } else {
                gone.push(t.clone());
            }
        }
        if !gone.is_empty() {
            for t in &gone {
                rec.targets.remove(t);
            }
            self.store(rec)?;
        }
        Ok(mounted)
    }
}
