//! NodeGetVolumeStats: usage and the volume's condition from its engine.

use super::*;

impl NodeService {
    pub(super) async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(require(&req.volume_path, "volume_path")?);
        let rec = self.staged(id)?;
        let is_staging = path == rec.staging_path;
        if !is_staging && !rec.targets.contains_key(&path) && !same_device(&rec, &path) {
            return Err(Status::not_found(format!(
                "volume {id} is neither staged nor published at {}",
                path.display()
            )));
        }
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} (volume {id}) does not exist",
                path.display()
            )));
        }
        let stats_path = match rec.access {
            Access::Mount { .. } => {
                if !attach::is_mounted(&path).await.map_err(attach_status)? {
                    return Err(Status::not_found(format!(
                        "volume {id} is not mounted at {}",
                        path.display()
                    )));
                }
                path.clone()
            }
            Access::Block if is_staging => rec.device.clone().ok_or_else(|| {
                Status::not_found(format!(
                    "volume {id} has no device (staging did not finish)"
                ))
            })?,
            Access::Block => path.clone(),
        };
        let usage = match attach::volume_stats(&stats_path)
            .await
            .map_err(attach_status)?
        {
            VolumeStats::Filesystem(fs) => vec![
                usage(
                    csi::volume_usage::Unit::Bytes,
                    fs.total_bytes,
                    fs.used_bytes,
                    fs.available_bytes,
                ),
                usage(
                    csi::volume_usage::Unit::Inodes,
                    fs.total_inodes,
                    fs.used_inodes,
                    fs.free_inodes,
                ),
            ],
            VolumeStats::Block { total_bytes } => vec![csi::VolumeUsage {
                total: clamp(total_bytes),
                unit: csi::volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }],
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(self.condition(&rec).await),
        })
    }

    /// The volume's condition: local plumbing first (staging mount, device),
    /// then the engine's own state.
    pub(super) async fn condition(&self, rec: &VolumeRecord) -> csi::VolumeCondition {
        let abnormal = |message: String| csi::VolumeCondition {
            abnormal: true,
            message,
        };
        match &rec.device {
            Some(d) if d.exists() => {}
            Some(d) => return abnormal(format!("block device {} is gone", d.display())),
            None => return abnormal("the volume is not attached (staging did not finish)".into()),
        }
        if matches!(rec.access, Access::Mount { .. })
            && !attach::is_mounted(&rec.staging_path).await.unwrap_or(false)
        {
            return abnormal(format!(
                "the staging mount at {} is gone",
                rec.staging_path.display()
            ));
        }
        let Some(addr) = &rec.engine else {
            return csi::VolumeCondition {
                abnormal: false,
                message: "engine address unknown; replica health not checked".into(),
            };
        };
        engine_condition(addr).await
    }
}

/// Whether `path` is a node of the block device a raw block volume is
/// attached as: the kubelet asks about the device it maps into each Pod
/// (`.../volumeDevices/<pv>/dev/<pod uid>`), not the published target.
fn same_device(rec: &VolumeRecord, path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Access::Block, Some(device)) = (&rec.access, &rec.device) else {
        return false;
    };
    match (std::fs::metadata(path), std::fs::metadata(device)) {
        (Ok(a), Ok(b)) => a.file_type().is_block_device() && a.rdev() == b.rdev(),
        _ => false,
    }
}
