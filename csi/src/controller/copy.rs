//! Filling a new volume's replicas from another volume's snapshot (restore
//! and clone).
//!
//! Snapshots are frozen layers of the source's replicas. A new replica gets
//! the source chain up to and including the snapshot layer, with the same
//! layer names, copied with the rebuild machinery (`PrepareSync`, per-layer
//! CRC plans, `ReadLayer` → `WriteLayer`, `FinishSync`), then an empty head.
//! The copy is idempotent: re-running it after a crash copies only what is
//! missing or different.
//!
//! Invariant: every target ends with the same chain and the same contents,
//! opened and closed cleanly at epoch 1, so the volume's first engine finds
//! its replicas identical and resyncs nothing.

use std::time::Duration;

use zebu_proto::replica as rpb;
use zebu_replica_client::Control;
use zebu_replica_client::sync::{Progress, sync_layers};

/// Errors of a copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// No source replica holds the snapshot.
    #[error("no replica of the source volume holds snapshot {0:?} (tried {1})")]
    NoSource(String, String),
    /// Talking to a replica failed.
    #[error("copying to replica {addr} failed while {what}: {detail}")]
    Replica {
        /// Replica address.
        addr: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

const CONNECT: Duration = Duration::from_secs(10);

/// Finds a source replica among `sources` whose chain holds `layer`, and
/// returns it with the chain's layer names up to and including `layer`.
pub async fn find_source(
    sources: &[String],
    layer: &str,
) -> Result<(Control, Vec<String>, u64), CopyError> {
    for addr in sources {
        let Ok(c) = Control::connect(addr, CONNECT).await else {
            continue;
        };
        let Ok(info) = c.info().await else { continue };
        if let Some(pos) = info.chain.iter().position(|l| !l.head && l.name == layer) {
            let names = info.chain[..=pos].iter().map(|l| l.name.clone()).collect();
            return Ok((c, names, info.block_size as u64));
        }
    }
    Err(CopyError::NoSource(layer.to_owned(), sources.join(", ")))
}

/// Makes every replica at `targets` hold `layers` of `src` as its frozen
/// chain, with an empty head.
pub async fn fill(
    src: &Control,
    layers: &[String],
    block_size: u64,
    targets: &[String],
) -> Result<(), CopyError> {
    const EPOCH: u64 = 1;
    for addr in targets {
        let err = |what: &'static str| {
            let addr = addr.clone();
            move |e: zebu_replica_client::ClientError| CopyError::Replica {
                addr,
                what,
                detail: e.to_string(),
            }
        };
        let dst = Control::connect(addr, CONNECT)
            .await
            .map_err(err("connecting"))?;
        let info = dst.info().await.map_err(err("reading its state"))?;
        if info.epoch > EPOCH {
            // Already served by an engine: the copy finished earlier.
            continue;
        }
        let session = dst
            .call("opening", |mut c| async move {
                c.open(rpb::OpenRequest { epoch: EPOCH }).await
            })
            .await
            .map_err(err("opening"))?
            .session;
        let names = layers.to_vec();
        dst.call("preparing the sync", |mut c| async move {
            c.prepare_sync(rpb::PrepareSyncRequest {
                layers: names,
                epoch: EPOCH,
                include_head: false,
                session,
            })
            .await
        })
        .await
        .map_err(err("preparing the sync"))?;
        let progress = Progress::started();
        sync_layers(src, &dst, layers, EPOCH, session, block_size, &progress)
            .await
            .map_err(|e| CopyError::Replica {
                addr: addr.clone(),
                what: "copying layers",
                detail: e.to_string(),
            })?;
        dst.call("finishing the sync", |mut c| async move {
            c.finish_sync(rpb::FinishSyncRequest {
                epoch: EPOCH,
                session,
            })
            .await
        })
        .await
        .map_err(err("finishing the sync"))?;
        dst.call("closing", |mut c| async move {
            c.close(rpb::CloseRequest {
                epoch: EPOCH,
                session,
            })
            .await
        })
        .await
        .map_err(err("closing"))?;
    }
    Ok(())
}
