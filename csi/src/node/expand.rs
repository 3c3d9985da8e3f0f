//! NodeExpandVolume: grow the device, then the filesystem, online when
//! the volume is published and offline otherwise.

use super::*;

impl NodeService {
    pub(super) async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, Status> {
        let id = require(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(require(&req.volume_path, "volume_path")?);
        let (required, limit) = match req.capacity_range {
            None => (0, 0),
            Some(r) => {
                let (Ok(req_b), Ok(lim)) = (
                    u64::try_from(r.required_bytes),
                    u64::try_from(r.limit_bytes),
                ) else {
                    return Err(Status::invalid_argument(
                        "capacity_range bytes must not be negative",
                    ));
                };
                (req_b, lim)
            }
        };
        if limit > 0 && required > limit {
            return Err(Status::invalid_argument(format!(
                "capacity_range.required_bytes {required} exceeds limit_bytes {limit}"
            )));
        }
        let _op = self.ops.begin(id)?;
        let mut rec = self.staged(id)?;
        if path != rec.staging_path && !rec.targets.contains_key(&path) {
            return Err(Status::not_found(format!(
                "volume {id} is neither staged nor published at {}",
                path.display()
            )));
        }
        if let Some(cap) = &req.volume_capability {
            let cap = parse_capability(Some(cap))?;
            if matches!(cap.access, Access::Block) != matches!(rec.access, Access::Block) {
                return Err(Status::invalid_argument(format!(
                    "volume {id} is staged as {}, the request says {}",
                    rec.access.describe(),
                    cap.access.describe()
                )));
            }
        }
        let required = (required > 0).then_some(required);
        let published = self.mounted_targets(&mut rec).await?;
        let size = if published.is_empty() {
            self.expand_unpublished(&mut rec, required).await?
        } else {
            self.expand_published(&rec, required, &published).await?
        };
        info!(volume_id = id, size, "expanded");
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: clamp(size),
        })
    }

    /// Online: the device grows in place (the bridge), then the filesystem.
    pub(super) async fn expand_published(
        &self,
        rec: &VolumeRecord,
        required: Option<u64>,
        published: &[PathBuf],
    ) -> Result<u64, Status> {
        let id = &rec.volume_id;
        let device = rec.device.clone().ok_or_else(|| {
            Status::failed_precondition(format!("volume {id} is not attached; stage it again"))
        })?;
        let too_small = |actual: u64, required: u64| {
            Status::failed_precondition(format!(
                "volume {id} is published at {} and its device {} is {actual} bytes, \
                 less than the {required} bytes requested: {}. Expansion finishes when \
                 the volume is next staged (e.g. after the pod restarts)",
                published
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                device.display(),
                attach::NBDFUSE_GROW_HINT
            ))
        };
        // Let the device see the export's current size (the bridge grows
        // in place; an nbdfuse attachment reports DeviceTooSmall instead).
        let dir = self.dir(id)?;
        match attach::refresh_size(&dir).await {
            Ok(_) => {}
            Err(AttachError::DeviceTooSmall {
                actual, required, ..
            }) => return Err(too_small(actual, required)),
            Err(e) => return Err(attach_status(e)),
        }
        match &rec.access {
            Access::Block => {
                let size = device_size(&device).await?;
                match required {
                    Some(r) if size < r => Err(too_small(size, r)),
                    _ => Ok(size),
                }
            }
            Access::Mount { .. } => {
                match attach::expand_filesystem(&device, Some(&rec.staging_path), required).await {
                    Ok(size) => Ok(size),
                    Err(AttachError::DeviceTooSmall {
                        actual, required, ..
                    }) => Err(too_small(actual, required)),
                    Err(e) => Err(attach_status(e)),
                }
            }
        }
    }

    /// Nobody uses the volume: re-attach to see the export's current size,
    /// grow the filesystem (ext4 offline, xfs mounted), mount it again.
    pub(super) async fn expand_unpublished(
        &self,
        rec: &mut VolumeRecord,
        required: Option<u64>,
    ) -> Result<u64, Status> {
        let id = rec.volume_id.clone();
        let dir = self.dir(&id)?;
        let old = rec.device.clone();
        let reattach = match (&old, required) {
            (Some(d), Some(r)) => device_size(d).await? < r,
            _ => true,
        };
        if let Access::Mount { .. } = rec.access {
            attach::unmount(&rec.staging_path)
                .await
                .map_err(attach_status)?;
        }
        let r = self.regrow(rec, &dir, reattach, required).await;
        // Whatever happened, put the staging mount back if we can.
        if r.is_err()
            && let Err(e) = self.do_stage(rec).await
        {
            warn!(volume_id = %id, "restoring the staging mount after a failed expansion: {}", e.message());
        }
        r
    }

    pub(super) async fn regrow(
        &self,
        rec: &mut VolumeRecord,
        dir: &Path,
        reattach: bool,
        required: Option<u64>,
    ) -> Result<u64, Status> {
        let id = rec.volume_id.clone();
        let device = if reattach {
            attach::detach(dir).await.map_err(attach_status)?;
            let att = attach::attach(&rec.nbd_uri, rec.engine_file.as_deref(), dir)
                .await
                .map_err(attach_status)?;
            rec.device = Some(att.device.clone());
            self.store(rec)?;
            att.device
        } else {
            rec.device.clone().ok_or_else(|| {
                Status::failed_precondition(format!("volume {id} is not attached"))
            })?
        };
        let too_small = |actual: u64, required: u64| {
            Status::failed_precondition(format!(
                "volume {id}: the export is {actual} bytes, less than the {required} bytes \
                 requested; ControllerExpandVolume must grow the volume first"
            ))
        };
        let map = |e: AttachError| match e {
            AttachError::DeviceTooSmall {
                actual, required, ..
            } => too_small(actual, required),
            e => attach_status(e),
        };
        let size = match rec.access.clone() {
            Access::Block => {
                let size = device_size(&device).await?;
                match required {
                    Some(r) if size < r => return Err(too_small(size, r)),
                    _ => size,
                }
            }
            Access::Mount {
                fs_type,
                mount_flags,
            } => {
                let mount = || {
                    attach::mount(
                        &device,
                        &rec.staging_path,
                        &fs_type,
                        rec.read_only,
                        &mount_flags,
                    )
                };
                if fs_type == "xfs" {
                    mount().await.map_err(attach_status)?;
                    attach::expand_filesystem(&device, Some(&rec.staging_path), required)
                        .await
                        .map_err(map)?
                } else {
                    let size = attach::expand_filesystem(&device, None, required)
                        .await
                        .map_err(map)?;
                    mount().await.map_err(attach_status)?;
                    size
                }
            }
        };
        Ok(size)
    }
}
