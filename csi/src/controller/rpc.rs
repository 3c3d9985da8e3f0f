//! The CSI Controller RPCs: request validation, idempotency and the
//! mapping of records to CSI messages. The work itself is in the parent
//! module.

use std::collections::HashMap;

use tonic::{Request, Response, Status};
use zebu_proto::agent as apb;
use zebu_proto::csi as pb;
use zebu_proto::csi::controller_server::Controller as CsiController;
use zebu_proto::engine as epb;

use super::*;
use crate::store::ClaimRef;

fn cap(t: Cap) -> pb::ControllerServiceCapability {
    pb::ControllerServiceCapability {
        r#type: Some(pb::controller_service_capability::Type::Rpc(
            pb::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// Parsed CreateVolume parameters.
struct Params {
    replicas: u32,
    fs_type: Option<String>,
    /// The claim the external-provisioner names (`--extra-create-metadata`).
    claim: Option<ClaimRef>,
}

/// Parameters the external-provisioner adds with `--extra-create-metadata`.
const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";

fn parse_params(p: &HashMap<String, String>, default_replicas: u32) -> Result<Params, Status> {
    let mut out = Params {
        replicas: default_replicas,
        fs_type: None,
        claim: None,
    };
    for (k, v) in p {
        match k.as_str() {
            PARAM_REPLICAS => {
                out.replicas = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_REPLICAS).contains(n))
                    .ok_or_else(|| {
                        invalid(format!(
                            "parameter {PARAM_REPLICAS}={v:?} must be a whole number from 1 to {MAX_REPLICAS}"
                        ))
                    })?;
            }
            PARAM_FSTYPE => {
                if !v.is_empty() {
                    check_fs(v).map_err(invalid)?;
                    out.fs_type = Some(v.clone());
                }
            }
            // Metadata the external-provisioner adds (pvc name, namespace...).
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?}: Zebu understands {PARAM_REPLICAS} and {PARAM_FSTYPE}"
                )));
            }
        }
    }
    if let (Some(name), Some(namespace)) = (p.get(PARAM_PVC_NAME), p.get(PARAM_PVC_NAMESPACE))
        && !name.is_empty()
        && !namespace.is_empty()
    {
        out.claim = Some(ClaimRef {
            namespace: namespace.clone(),
            name: name.clone(),
        });
    }
    Ok(out)
}

fn source_of(s: Option<&pb::VolumeContentSource>) -> Result<ContentSource, Status> {
    match s.and_then(|s| s.r#type.as_ref()) {
        None => Ok(ContentSource::None),
        Some(vcs::Type::Snapshot(s)) => {
            require(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?;
            Ok(ContentSource::Snapshot(s.snapshot_id.clone()))
        }
        Some(vcs::Type::Volume(v)) => {
            require(&v.volume_id, "volume_content_source.volume.volume_id")?;
            Ok(ContentSource::Volume(v.volume_id.clone()))
        }
    }
}

#[tonic::async_trait]
impl CsiController for Controller {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.name, "name")?;
        let wanted = check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        let params = parse_params(&r.parameters, self.inner.cfg.default_replicas)?;
        let fs_type = match (wanted.fs_type, params.fs_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(format!(
                    "the mount capability asks for {a} but parameter {PARAM_FSTYPE} says {b}"
                )));
            }
            (a, b) => a.or(b),
        };
        let mut size = size_for(r.capacity_range.as_ref())?;
        let source = source_of(r.volume_content_source.as_ref())?;
        let _name_guard = self
            .claim(&format!("name/{}", r.name), &format!("volume {:?}", r.name))
            .await?;

        // The source must exist; a restore is at least as large as its source.
        let min_size = match &source {
            ContentSource::None => 0,
            ContentSource::Snapshot(s) => {
                let snap = self
                    .store()
                    .get_snapshot(s)
                    .map_err(store_status)?
                    .ok_or_else(|| Status::not_found(format!("snapshot {s} does not exist")))?;
                if !snap.value.ready {
                    return Err(Status::unavailable(format!(
                        "snapshot {s} is not ready yet"
                    )));
                }
                snap.value.size_bytes
            }
            ContentSource::Volume(v) => self.volume(v)?.value.size_bytes,
        };
        if size < min_size {
            if r.capacity_range
                .as_ref()
                .is_none_or(|c| c.required_bytes == 0)
            {
                size = min_size;
            } else {
                return Err(Status::out_of_range(format!(
                    "the volume must be at least as large as its source ({min_size} bytes); asked for {size}"
                )));
            }
        }
        if !fits_range(size, r.capacity_range.as_ref()) {
            return Err(Status::out_of_range(format!(
                "the source needs {size} bytes, more than limit_bytes allows"
            )));
        }

        let existing = self
            .store()
            .list_volumes()
            .map_err(store_status)?
            .into_iter()
            .find(|v| v.value.name == r.name && v.value.status != VolumeStatus::Deleting);
        let rec = match existing {
            Some(v) => {
                let v = v.value;
                if !fits_range(v.size_bytes, r.capacity_range.as_ref())
                    || v.num_replicas != params.replicas
                    || v.content_source != source
                    || (fs_type.is_some() && v.fs_type != fs_type)
                {
                    return Err(Status::already_exists(format!(
                        "volume {:?} already exists ({}) with a different size, replica count, \
                         filesystem or content source",
                        r.name, v.id
                    )));
                }
                if v.status == VolumeStatus::Ready {
                    return Ok(Response::new(pb::CreateVolumeResponse {
                        volume: Some(volume_pb(&v)),
                    }));
                }
                v
            }
            None => {
                let id = format!("zv-{}", uuid::Uuid::new_v4().simple());
                let disks = self.disk_space()?;
                let spots = placement::place(
                    &disks,
                    &placement::Request {
                        count: params.replicas as usize,
                        size_bytes: size,
                        over_provisioning_percent: self.inner.cfg.over_provisioning_percent,
                        allow_same_disk: self.inner.cfg.allow_same_disk,
                        ..Default::default()
                    },
                )
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
                let rec = VolumeRecord {
                    name: r.name.clone(),
                    id,
                    size_bytes: size,
                    num_replicas: params.replicas,
                    fs_type,
                    access_type: if wanted.block {
                        AccessType::Block
                    } else {
                        AccessType::Mount
                    },
                    content_source: source,
                    replicas: spots
                        .into_iter()
                        .map(|(node, disk)| ReplicaRecord {
                            id: format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                            node,
                            disk,
                            dir: String::new(),
                            address: String::new(),
                            state: ReplicaState::Pending,
                        })
                        .collect(),
                    attachment: None,
                    created_unix: now_unix(),
                    status: VolumeStatus::Creating,
                    claim: params.claim,
                };
                self.store().put_volume(&rec, None).map_err(store_status)?;
                rec
            }
        };
        let _g = self.claim(&rec.id, &format!("volume {}", rec.id)).await?;
        let rec = self.create_replicas(&rec).await?;
        self.fill_content(&rec).await?;
        let rec = self.update_volume(&rec.id, |v| v.status = VolumeStatus::Ready)?;
        tracing::info!(volume = %rec.id, name = %rec.name, size = rec.size_bytes, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(volume_pb(&rec)),
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        let _g = self
            .claim(&r.volume_id, &format!("volume {}", r.volume_id))
            .await?;
        let Some(v) = self
            .store()
            .get_volume(&r.volume_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let v = v.value;
        if let Some(a) = &v.attachment {
            return Err(Status::failed_precondition(format!(
                "volume {} is still attached to node {}: unpublish it first",
                v.id, a.node
            )));
        }
        let has_snapshots = self
            .store()
            .list_snapshots()
            .map_err(store_status)?
            .iter()
            .any(|s| s.value.source_volume == v.id);
        if has_snapshots {
            // Keep the data the snapshots live in; hide the volume.
            self.update_volume(&v.id, |rec| rec.status = VolumeStatus::Deleting)?;
            tracing::info!(volume = %v.id, "volume deleted; replicas kept for its snapshots");
        } else {
            self.destroy(&v).await?;
            tracing::info!(volume = %v.id, "volume deleted");
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.node_id, "node_id")?;
        let capability = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        check_capabilities(std::slice::from_ref(capability)).map_err(invalid)?;
        let _g = self
            .claim(&r.volume_id, &format!("volume {}", r.volume_id))
            .await?;
        let v = self.volume(&r.volume_id)?.value;
        if self
            .store()
            .get_node(&r.node_id)
            .map_err(store_status)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "node {} is not known: its node plugin has not registered with the controller",
                r.node_id
            )));
        }
        let context = |a: &Attachment| {
            let mut c = HashMap::from([
                (
                    PUBLISH_NBD_URI.to_owned(),
                    format!("nbd+unix:///?socket={}", a.nbd_socket),
                ),
                (PUBLISH_ENGINE.to_owned(), a.engine_address.clone()),
            ]);
            if !a.file.is_empty() {
                c.insert(PUBLISH_FILE.to_owned(), a.file.clone());
            }
            c
        };
        if let Some(a) = &v.attachment {
            if a.node == r.node_id && a.readonly != r.readonly {
                return Err(Status::already_exists(format!(
                    "volume {} is already published to node {} {}; unpublish it before \
                     publishing it {}",
                    v.id,
                    a.node,
                    if a.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    if r.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    },
                )));
            }
            if a.node == r.node_id {
                return Ok(Response::new(pb::ControllerPublishVolumeResponse {
                    publish_context: context(a),
                }));
            }
            return Err(Status::failed_precondition(format!(
                "volume {} is attached to node {}; a Zebu volume is attached to one node at a time",
                v.id, a.node
            )));
        }
        if v.status != VolumeStatus::Ready {
            return Err(Status::unavailable(format!(
                "volume {} is still being created; retry",
                v.id
            )));
        }
        let v = self.fresh_addresses(&v).await?;
        let mut agent = self.inner.agents.client(&r.node_id).await?;
        let e = self.start_engine(&mut agent, &r.node_id, &v).await?;
        zebu_proto::crash::point("csi.publish.engine-started");
        let att = Attachment {
            node: r.node_id.clone(),
            engine_address: e.control_address,
            nbd_socket: e.nbd_socket,
            file: e.file,
            epoch: e.epoch,
            readonly: r.readonly,
        };
        let ctx = context(&att);
        self.update_volume(&v.id, |rec| rec.attachment = Some(att.clone()))?;
        tracing::info!(volume = %v.id, node = %r.node_id, "volume attached");
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context: ctx,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        let _g = self
            .claim(&r.volume_id, &format!("volume {}", r.volume_id))
            .await?;
        let v = match self.volume(&r.volume_id) {
            Ok(v) => v.value,
            // Nothing can be attached: the unpublish has nothing left to do.
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
            }
            Err(s) => return Err(s),
        };
        let Some(a) = v.attachment.clone() else {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        };
        if !r.node_id.is_empty() && r.node_id != a.node {
            return Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        }
        let mut agent = self.inner.agents.client(&a.node).await?;
        agent
            .stop_engine(with_deadline(
                apb::StopEngineRequest {
                    volume_id: v.id.clone(),
                },
                AGENT_CALL,
            ))
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!(
                        "stopping the engine of {} on {}: {}",
                        v.id,
                        a.node,
                        e.message()
                    ),
                )
            })?;
        self.update_volume(&v.id, |rec| rec.attachment = None)?;
        tracing::info!(volume = %v.id, node = %a.node, "volume detached");
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let v = self.volume(&r.volume_id)?.value;
        let verdict = check_capabilities(&r.volume_capabilities).and_then(|w| {
            match (&w.fs_type, &v.fs_type) {
                (Some(a), Some(b)) if a != b => {
                    Err(format!("volume {} was created for {b}, not {a}", v.id))
                }
                _ => Ok(()),
            }
        });
        let resp = match verdict {
            Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(m) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: m,
            },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        let all: Vec<VolumeRecord> = self
            .store()
            .list_volumes()
            .map_err(store_status)?
            .into_iter()
            .map(|v| v.value)
            .filter(|v| v.status != VolumeStatus::Deleting)
            .collect();
        let (vols, next_token) = page(all, |v| &v.id, r.max_entries, &r.starting_token)?;
        let mut entries = Vec::with_capacity(vols.len());
        for v in vols {
            let (abnormal, message) = self.condition(&v).await;
            entries.push(pb::list_volumes_response::Entry {
                volume: Some(volume_pb(&v)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: v.attachment.iter().map(|a| a.node.clone()).collect(),
                    volume_condition: Some(pb::VolumeCondition { abnormal, message }),
                }),
            });
        }
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        r: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = r.into_inner();
        if !r.volume_capabilities.is_empty() {
            check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        }
        let params = parse_params(&r.parameters, self.inner.cfg.default_replicas)?;
        let disks = self.disk_space()?;
        let op = self.inner.cfg.over_provisioning_percent;
        let total: u64 = disks.iter().map(|d| d.schedulable(op)).sum();
        // The largest volume that can be placed: binary search on placement.
        let fits = |size: u64| {
            placement::place(
                &disks,
                &placement::Request {
                    count: params.replicas as usize,
                    size_bytes: size,
                    over_provisioning_percent: op,
                    allow_same_disk: self.inner.cfg.allow_same_disk,
                    ..Default::default()
                },
            )
            .is_ok()
        };
        let (mut lo, mut hi) = (
            0u64,
            disks.iter().map(|d| d.schedulable(op)).max().unwrap_or(0) / BLOCK,
        );
        if !fits(BLOCK) {
            hi = 0;
        }
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid * BLOCK) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: (total / params.replicas.max(1) as u64).min(i64::MAX as u64) as i64,
            maximum_volume_size: Some((lo * BLOCK).min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(BLOCK as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::CloneVolume,
            Cap::PublishReadonly,
            Cap::ExpandVolume,
            Cap::ListVolumesPublishedNodes,
            Cap::VolumeCondition,
            Cap::GetVolume,
            Cap::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(cap)
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = r.into_inner();
        require(&r.name, "name")?;
        require(&r.source_volume_id, "source_volume_id")?;
        let _ng = self
            .claim(
                &format!("snapshot/{}", r.name),
                &format!("snapshot {:?}", r.name),
            )
            .await?;
        if let Some(s) = self
            .store()
            .list_snapshots()
            .map_err(store_status)?
            .into_iter()
            .find(|s| s.value.name == r.name)
        {
            if s.value.source_volume != r.source_volume_id {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} already exists for volume {}, not {}",
                    r.name, s.value.source_volume, r.source_volume_id
                )));
            }
            return Ok(Response::new(pb::CreateSnapshotResponse {
                snapshot: Some(snapshot_pb(&s.value)),
            }));
        }
        let _g = self
            .claim(
                &r.source_volume_id,
                &format!("volume {}", r.source_volume_id),
            )
            .await?;
        let v = self.volume(&r.source_volume_id)?.value;
        let rec = SnapshotRecord {
            id: format!("zs-{}", uuid::Uuid::new_v4().simple()),
            name: r.name.clone(),
            source_volume: v.id.clone(),
            size_bytes: v.size_bytes,
            created_unix: now_unix(),
            ready: true,
        };
        let name = rec.id.clone();
        self.with_engine(&v, |mut e| async move {
            e.create_snapshot(epb::CreateSnapshotRequest { name })
                .await
                .map(|_| ())
        })
        .await
        .map_err(|e| {
            Status::new(
                e.code(),
                format!("snapshotting volume {}: {}", v.id, e.message()),
            )
        })?;
        self.store()
            .put_snapshot(&rec, None)
            .map_err(store_status)?;
        tracing::info!(snapshot = %rec.id, volume = %v.id, "snapshot created");
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(snapshot_pb(&rec)),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        require(&r.snapshot_id, "snapshot_id")?;
        let Some(s) = self
            .store()
            .get_snapshot(&r.snapshot_id)
            .map_err(store_status)?
        else {
            return Ok(Response::new(pb::DeleteSnapshotResponse {}));
        };
        let s = s.value;
        let _g = self
            .claim(
                &s.source_volume,
                &format!("volume {} (source of the snapshot)", s.source_volume),
            )
            .await?;
        if let Some(v) = self
            .store()
            .get_volume(&s.source_volume)
            .map_err(store_status)?
        {
            let v = v.value;
            let others = self
                .store()
                .list_snapshots()
                .map_err(store_status)?
                .iter()
                .any(|o| o.value.source_volume == v.id && o.value.id != s.id);
            if v.status == VolumeStatus::Deleting && !others {
                self.destroy(&v).await?;
            } else {
                let name = s.id.clone();
                self.with_engine(&v, |mut e| async move {
                    match e.delete_snapshot(epb::DeleteSnapshotRequest { name }).await {
                        Ok(_) => Ok(()),
                        Err(st) if st.code() == tonic::Code::NotFound => Ok(()),
                        Err(st) => Err(st),
                    }
                })
                .await?;
            }
        }
        match self.store().delete_snapshot(&s.id, None) {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(store_status(e)),
        }
        tracing::info!(snapshot = %s.id, "snapshot deleted");
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let all: Vec<SnapshotRecord> = self
            .store()
            .list_snapshots()
            .map_err(store_status)?
            .into_iter()
            .map(|s| s.value)
            .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.source_volume == r.source_volume_id)
            .collect();
        let (snaps, next_token) = page(all, |s| &s.id, r.max_entries, &r.starting_token)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            entries: snaps
                .iter()
                .map(|s| pb::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_pb(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        _r: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "GetSnapshot (alpha) is not supported; use ListSnapshots with snapshot_id",
        ))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        let _g = self
            .claim(&r.volume_id, &format!("volume {}", r.volume_id))
            .await?;
        let v = self.volume(&r.volume_id)?.value;
        let size = size_for(Some(range))?;
        let node_expansion_required = v.access_type == AccessType::Mount;
        if size <= v.size_bytes {
            return Ok(Response::new(pb::ControllerExpandVolumeResponse {
                capacity_bytes: v.size_bytes as i64,
                node_expansion_required,
            }));
        }
        if let Some(a) = &v.attachment {
            let mut e = agents::engine(&a.engine_address).await?;
            e.expand(epb::ExpandRequest { size }).await.map_err(|e| {
                Status::new(
                    e.code(),
                    format!("expanding volume {}: {}", v.id, e.message()),
                )
            })?;
        }
        // A detached volume grows when its next engine starts (it grows
        // every replica to the recorded size).
        self.update_volume(&v.id, |rec| rec.size_bytes = size)?;
        tracing::info!(volume = %v.id, size, "volume expanded");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        r: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        require(&r.volume_id, "volume_id")?;
        let v = self.volume(&r.volume_id)?.value;
        let (abnormal, message) = self.condition(&v).await;
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(volume_pb(&v)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.attachment.iter().map(|a| a.node.clone()).collect(),
                volume_condition: Some(pb::VolumeCondition { abnormal, message }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _r: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not supported: Zebu volumes have no mutable parameters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_and_respect_limits() {
        let r = |req, lim| pb::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&r(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&r(4097, 0))).unwrap(), 8192);
        assert_eq!(size_for(Some(&r(0, 8192))).unwrap(), 8192);
        assert_eq!(
            size_for(Some(&r(4097, 5000))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&r(10, 5))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
    }

    #[test]
    fn paging_walks_every_item_once() {
        let items: Vec<String> = (0..7).map(|i| format!("v{i}")).collect();
        let mut token = String::new();
        let mut seen = vec![];
        loop {
            let (p, next) = page(items.clone(), |s| s, 3, &token).unwrap();
            seen.extend(p);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
        assert_eq!(page(items.clone(), |s| s, 0, "").unwrap().0.len(), 7);
        assert_eq!(
            page(items.clone(), |s| s, 0, "bogus").unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(items, |s| s, -1, "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn parameters_are_checked() {
        let p = |kv: &[(&str, &str)]| {
            parse_params(
                &kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                3,
            )
        };
        assert_eq!(p(&[]).unwrap().replicas, 3);
        assert_eq!(p(&[("numberOfReplicas", "2")]).unwrap().replicas, 2);
        assert!(p(&[("numberOfReplicas", "0")]).is_err());
        assert!(p(&[("numberOfReplicas", "x")]).is_err());
        assert!(p(&[("csi.storage.k8s.io/fstype", "btrfs")]).is_err());
        assert!(p(&[("csi.storage.k8s.io/pvc/name", "data-0")]).is_ok());
        let claim = p(&[
            ("csi.storage.k8s.io/pvc/name", "data-0"),
            ("csi.storage.k8s.io/pvc/namespace", "db"),
        ])
        .unwrap()
        .claim;
        assert_eq!(
            claim,
            Some(ClaimRef {
                namespace: "db".into(),
                name: "data-0".into()
            })
        );
        let e = p(&[("replicaz", "3")]).err().unwrap();
        assert!(e.message().contains("numberOfReplicas"), "{}", e.message());
    }

    #[test]
    fn capabilities_are_checked() {
        use pb::volume_capability::{AccessMode, AccessType as At, BlockVolume, MountVolume};
        let c = |mode: Mode, at: Option<At>| pb::VolumeCapability {
            access_type: at,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let mount = |fs: &str| {
            Some(At::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            }))
        };
        assert!(check_capabilities(&[c(Mode::SingleNodeWriter, mount("ext4"))]).is_ok());
        assert!(
            check_capabilities(&[c(Mode::SingleNodeWriter, Some(At::Block(BlockVolume {})))])
                .unwrap()
                .block
        );
        assert!(check_capabilities(&[c(Mode::MultiNodeMultiWriter, mount(""))]).is_err());
        assert!(check_capabilities(&[c(Mode::SingleNodeWriter, mount("btrfs"))]).is_err());
        assert!(check_capabilities(&[c(Mode::SingleNodeWriter, None)]).is_err());
        assert!(check_capabilities(&[]).is_err());
    }
}
