//! `zebu volume create | list | get | delete | expand`.

use anyhow::{Context, bail};
use zebu_proto::csi::{ControllerGetVolumeRequest, DeleteVolumeRequest};

use super::args::{CreateArgs, Format};
use super::caps::{NodeCaps, node_caps};
use super::driver::Driver;
use super::emit;
use super::error::{Call, RpcError, Subject};
use super::paging::collect_pages;
use super::render::{
    SnapshotView, VolumeView, csi_bytes, format_size, volume_details, volumes_table,
};
use super::request;
use super::snapshot::list_snapshots;
use super::state::StateDir;

/// The size the driver reports, or the size asked for if it reports none.
fn reported_or(capacity: i64, asked: u64) -> u64 {
    match csi_bytes(capacity) {
        0 => asked,
        n => n,
    }
}

fn vol(op: &'static str, id: &str) -> Call {
    Call::new(op, Subject::Volume(id.to_owned()))
}

/// `zebu volume create`: CreateVolume, then print the volume id (or the
/// volume as JSON).
pub async fn create(d: &Driver, a: &CreateArgs) -> anyhow::Result<()> {
    let mut call = vol("CreateVolume", &a.name);
    if let Some(s) = &a.from_snapshot {
        call = call.not_found_means(Subject::Snapshot(s.clone()));
    } else if let Some(v) = &a.clone_of {
        call = call.not_found_means(Subject::Volume(v.clone()));
    }
    let req = request::create_volume(a);
    let r = d
        .call(call, d.controller.clone().create_volume(req))
        .await?;
    let v = r.volume.with_context(|| {
        format!(
            "the driver created volume {} but returned no volume",
            a.name
        )
    })?;
    let view = VolumeView::new(&v, &[], None);
    emit(a.output.format, &view, || format!("{}\n", view.id));
    Ok(())
}

/// Every volume, following the pages.
pub async fn list_volumes(d: &Driver) -> anyhow::Result<Vec<VolumeView>> {
    collect_pages(|token| async move {
        let r = d
            .call(
                Call::new("ListVolumes", Subject::Driver),
                d.controller
                    .clone()
                    .list_volumes(request::list_volumes(token)),
            )
            .await?;
        let page = r
            .entries
            .into_iter()
            .filter_map(|e| {
                let v = e.volume?;
                let (nodes, cond) = match e.status {
                    Some(s) => (s.published_node_ids, s.volume_condition),
                    None => (Vec::new(), None),
                };
                Some(VolumeView::new(&v, &nodes, cond.as_ref()))
            })
            .collect();
        Ok::<_, anyhow::Error>((page, r.next_token))
    })
    .await
}

/// `zebu volume list`.
pub async fn list(d: &Driver, format: Format) -> anyhow::Result<()> {
    let vols = list_volumes(d).await?;
    emit(format, &vols, || {
        if vols.is_empty() {
            "No volumes.\n".to_owned()
        } else {
            volumes_table(&vols)
        }
    });
    Ok(())
}

/// ControllerGetVolume as a view.
pub async fn get_volume(d: &Driver, id: &str) -> anyhow::Result<VolumeView> {
    let r = d
        .call(
            vol("ControllerGetVolume", id),
            d.controller
                .clone()
                .controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: id.to_owned(),
                }),
        )
        .await?;
    let v = r
        .volume
        .with_context(|| format!("the driver returned no volume for {id}"))?;
    let (nodes, cond) = match r.status {
        Some(s) => (s.published_node_ids, s.volume_condition),
        None => (Vec::new(), None),
    };
    Ok(VolumeView::new(&v, &nodes, cond.as_ref()))
}

#[derive(serde::Serialize)]
struct VolumeWithSnapshots<'a> {
    #[serde(flatten)]
    volume: &'a VolumeView,
    snapshots: &'a [SnapshotView],
}

/// `zebu volume get`: the volume and its snapshots.
pub async fn get(d: &Driver, id: &str, format: Format) -> anyhow::Result<()> {
    let v = get_volume(d, id).await?;
    let snaps = match list_snapshots(d, Some(id)).await {
        Ok(s) => s,
        // A driver without snapshots still shows the volume.
        Err(e)
            if e.downcast_ref::<RpcError>()
                .is_some_and(|r| r.code() == tonic::Code::Unimplemented) =>
        {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let view = VolumeWithSnapshots {
        volume: &v,
        snapshots: &snaps,
    };
    emit(format, &view, || volume_details(&v, &snaps));
    Ok(())
}

/// `zebu volume delete`: refused while attached through this CLI.
pub async fn delete(d: &Driver, state: &StateDir, id: &str) -> anyhow::Result<()> {
    if let Some(att) = state
        .load(id)
        .with_context(|| format!("cannot read the attachment record of volume {id}"))?
    {
        bail!(
            "volume {id} is attached at {} through this CLI: run `zebu volume detach {id}` first",
            att.target.display()
        );
    }
    d.call(
        vol("DeleteVolume", id),
        d.controller.clone().delete_volume(DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        }),
    )
    .await?;
    println!("deleted volume {id}");
    Ok(())
}

/// `zebu volume expand`: ControllerExpandVolume, then NodeExpandVolume if the
/// driver asks for it and the volume is attached through this CLI.
pub async fn expand(d: &Driver, state: &StateDir, id: &str, size: u64) -> anyhow::Result<()> {
    let att = state
        .load(id)
        .with_context(|| format!("cannot read the attachment record of volume {id}"))?
        .filter(|a| a.complete);
    let r = d
        .call(
            vol("ControllerExpandVolume", id),
            d.controller
                .clone()
                .controller_expand_volume(request::controller_expand(id, size, att.as_ref())),
        )
        .await?;
    println!(
        "volume {id} expanded to {}",
        format_size(reported_or(r.capacity_bytes, size))
    );
    if !r.node_expansion_required {
        return Ok(());
    }
    let Some(att) = att else {
        eprintln!(
            "note: the filesystem of volume {id} grows when the volume is next staged \
             (`zebu volume attach {id} --mount DIR`, or the kubelet's NodeStage); if it is \
             attached elsewhere, whoever attached it (kubelet) grows it with NodeExpandVolume."
        );
        return Ok(());
    };
    let caps: NodeCaps = node_caps(d).await?;
    if !caps.expand {
        eprintln!(
            "note: the driver asks for node expansion but its Node service does not offer \
             EXPAND_VOLUME; detach and attach volume {id} again to see the new size"
        );
        return Ok(());
    }
    let n = d
        .call(
            vol("NodeExpandVolume", id),
            d.node
                .clone()
                .node_expand_volume(request::node_expand(&att, size)),
        )
        .await
        .with_context(|| {
            format!(
                "the volume grew, but growing it on this node at {} failed",
                att.target.display()
            )
        })?;
    println!(
        "grew volume {id} on this node at {} to {}",
        att.target.display(),
        format_size(reported_or(n.capacity_bytes, size))
    );
    Ok(())
}
