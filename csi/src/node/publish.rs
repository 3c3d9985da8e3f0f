//! NodePublishVolume and NodeUnpublishVolume: bind mounts of a staged
//! volume (a directory, or a device file for block volumes).

use super::*;

impl NodeService {
    pub(super) async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let target = require_abs_path(&req.target_path, "target_path")?;
        let cap = parse_capability(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: this driver stages volumes \
                 (STAGE_UNSTAGE_VOLUME), NodeStageVolume must run first",
            ));
        }
        let staging = require_abs_path(&req.staging_target_path, "staging_target_path")?;
        let _op = self.ops.begin(id)?;
        let mut rec = self.load(id)?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {id} is not staged on this node; NodeStageVolume must run first"
            ))
        })?;
        if rec.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged at {}, not at {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let Some(device) = rec.device.clone() else {
            return Err(Status::failed_precondition(format!(
                "staging volume {id} did not finish; NodeStageVolume must succeed first"
            )));
        };
        let compatible = match (&rec.access, &cap.access) {
            (Access::Block, Access::Block) => true,
            (Access::Mount { fs_type: a, .. }, Access::Mount { fs_type: b, .. }) => a == b,
            _ => false,
        };
        if !compatible {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged as {}; it cannot be published as {}",
                rec.access.describe(),
                cap.access.describe()
            )));
        }
        let read_only = req.readonly || cap.read_only || rec.read_only;

        if attach::is_mounted(&target).await.map_err(attach_status)? {
            // Already published here? The bind functions check it is the
            // same volume with the same read-only-ness.
            let r = match rec.access {
                Access::Mount { .. } => attach::bind_mount(&staging, &target, read_only).await,
                Access::Block => attach::bind_block(&device, &target, read_only).await,
            };
            return match r {
                Ok(()) => {
                    if rec.targets.get(&target).map(|t| t.read_only) != Some(read_only) {
                        rec.targets.insert(target, Target { read_only });
                        self.store(&rec)?;
                    }
                    Ok(())
                }
                Err(AttachError::Precondition { message, .. }) => {
                    Err(Status::already_exists(format!(
                        "{} is already published, incompatibly with this request \
                         (volume {id}, {}): {message}",
                        target.display(),
                        if read_only { "read-only" } else { "read-write" }
                    )))
                }
                Err(e) => Err(attach_status(e)),
            };
        }

        if cap.single_writer
            && let Some(other) = rec.targets.keys().find(|t| **t != target)
        {
            return Err(Status::failed_precondition(format!(
                "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already \
                 published at {}; unpublish it there first",
                other.display()
            )));
        }

        if let Access::Mount { .. } = rec.access
            && !attach::is_mounted(&staging).await.map_err(attach_status)?
        {
            return Err(Status::failed_precondition(format!(
                "volume {id}: the staging path {} is not mounted any more; \
                 NodeStageVolume must run again",
                staging.display()
            )));
        }
        // Record the target first: a crash after the bind still leaves it
        // known to NodeUnstageVolume's "still published" check.
        rec.targets.insert(target.clone(), Target { read_only });
        self.store(&rec)?;
        let r = match rec.access {
            Access::Mount { .. } => attach::bind_mount(&staging, &target, read_only).await,
            Access::Block => attach::bind_block(&device, &target, read_only).await,
        };
        if let Err(e) = r {
            if !attach::is_mounted(&target).await.unwrap_or(true) {
                rec.targets.remove(&target);
                if let Err(se) = self.store(&rec) {
                    warn!(volume_id = id, "forgetting a failed publish target: {se}");
                }
            }
            return Err(attach_status(e));
        }
        info!(volume_id = id, target = %target.display(), read_only, "published");
        Ok(())
    }

    pub(super) async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<(), Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let target = require_abs_path(&req.target_path, "target_path")?;
        let _op = self.ops.begin(id)?;
        attach::unmount(&target).await.map_err(attach_status)?;
        remove_target(&target)?;
        if let Some(mut rec) = self.load(id)?
            && rec.targets.remove(&target).is_some()
        {
            self.store(&rec)?;
        }
        info!(volume_id = id, target = %target.display(), "unpublished");
        Ok(())
    }
}
