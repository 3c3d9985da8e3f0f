//! `zebu snapshot create | list | delete`.

use anyhow::Context;
use zebu_proto::csi::DeleteSnapshotRequest;

use super::args::Format;
use super::driver::Driver;
use super::emit;
use super::error::{Call, Subject};
use super::paging::collect_pages;
use super::render::{SnapshotView, snapshots_table};
use super::request;

/// `zebu snapshot create`: CreateSnapshot, then print the snapshot id (or
/// the snapshot as JSON).
pub async fn create(d: &Driver, name: &str, volume: &str, format: Format) -> anyhow::Result<()> {
    let call = Call::new("CreateSnapshot", Subject::Snapshot(name.to_owned()))
        .not_found_means(Subject::Volume(volume.to_owned()));
    let r = d
        .call(
            call,
            d.controller
                .clone()
                .create_snapshot(request::create_snapshot(name, volume)),
        )
        .await?;
    let s = r
        .snapshot
        .with_context(|| format!("the driver created snapshot {name} but returned no snapshot"))?;
    let view = SnapshotView::new(&s);
    emit(format, &view, || format!("{}\n", view.id));
    Ok(())
}

/// Every snapshot (of `volume`, or all), following the pages.
pub async fn list_snapshots(d: &Driver, volume: Option<&str>) -> anyhow::Result<Vec<SnapshotView>> {
    let subject = match volume {
        Some(v) => Subject::Volume(v.to_owned()),
        None => Subject::Driver,
    };
    collect_pages(|token| {
        let call = Call::new("ListSnapshots", subject.clone());
        async move {
            let r = d
                .call(
                    call,
                    d.controller
                        .clone()
                        .list_snapshots(request::list_snapshots(volume, token)),
                )
                .await?;
            let page = r
                .entries
                .iter()
                .filter_map(|e| e.snapshot.as_ref().map(SnapshotView::new))
                .collect();
            Ok::<_, anyhow::Error>((page, r.next_token))
        }
    })
    .await
}

/// `zebu snapshot list`.
pub async fn list(d: &Driver, volume: Option<&str>, format: Format) -> anyhow::Result<()> {
    let snaps = list_snapshots(d, volume).await?;
    emit(format, &snaps, || {
        if snaps.is_empty() {
            "No snapshots.\n".to_owned()
        } else {
            snapshots_table(&snaps)
        }
    });
    Ok(())
}

/// `zebu snapshot delete`.
pub async fn delete(d: &Driver, id: &str) -> anyhow::Result<()> {
    d.call(
        Call::new("DeleteSnapshot", Subject::Snapshot(id.to_owned())),
        d.controller.clone().delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.to_owned(),
            ..Default::default()
        }),
    )
    .await?;
    println!("deleted snapshot {id}");
    Ok(())
}
