//! Copying layers from a healthy replica to one that must catch up.
//!
//! Both replicas list the CRC of every block a layer holds (in block order);
//! a merge of the two lists gives the blocks to copy (missing or different on
//! the target) and the blocks to deallocate (held by the target only). Only
//! those move: a replica that was away briefly resyncs just what changed.
//! The target pulls them straight from the source replica (`PullLayer`), so
//! rebuild data does not pass through the engine; the engine follows the
//! target's progress messages.
//!
//! Invariant: a layer is only written on a target that was prepared with
//! `PrepareSync` (the replica enforces it), and the target is not trusted for
//! reads until `FinishSync` succeeded and the engine promoted it.

use std::sync::Mutex;
use std::time::Instant;

use futures::StreamExt;

use zebu_proto::replica as pb;

use crate::control::{ClientError, Control};

/// Errors of a layer sync.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// A replica call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A stream broke midway.
    #[error("{what} on replica {addr}: {}", status.message())]
    Stream {
        /// What was being done.
        what: String,
        /// The replica.
        addr: String,
        /// The error.
        status: tonic::Status,
    },
}

/// Progress of one rebuild, shared with status readers.
#[derive(Debug, Default)]
pub struct Progress {
    inner: Mutex<ProgressState>,
}

/// A snapshot of [`Progress`].
#[derive(Clone, Debug, Default)]
pub struct ProgressState {
    /// running, done or failed.
    pub state: String,
    /// Bytes copied so far.
    pub bytes_done: u64,
    /// Bytes to copy in all.
    pub bytes_total: u64,
    /// Blocks copied.
    pub blocks_copied: u64,
    /// Blocks deallocated on the target.
    pub blocks_punched: u64,
    /// Why it failed.
    pub error: String,
    /// When it started.
    pub started: Option<Instant>,
    /// When the plan was made (copying starts).
    pub planned: Option<Instant>,
    /// When the copy ended (finishing starts).
    pub copied: Option<Instant>,
    /// When it ended.
    pub finished: Option<Instant>,
}

impl ProgressState {
    /// Seconds spent planning, copying and finishing so far.
    pub fn phase_seconds(&self) -> [f64; 3] {
        let now = Instant::now();
        let end = self.finished.unwrap_or(now);
        let span = |a: Option<Instant>, b: Option<Instant>| match a {
            Some(a) => b
                .unwrap_or(end)
                .min(end)
                .saturating_duration_since(a)
                .as_secs_f64(),
            None => 0.0,
        };
        [
            span(self.started, self.planned),
            span(self.planned, self.copied),
            span(self.copied, self.finished),
        ]
    }

    /// Average copy rate so far.
    pub fn rate_bytes_per_sec(&self) -> f64 {
        let Some(start) = self.started else {
            return 0.0;
        };
        let secs = self
            .finished
            .unwrap_or_else(Instant::now)
            .duration_since(start)
            .as_secs_f64();
        if secs > 0.0 {
            self.bytes_done as f64 / secs
        } else {
            0.0
        }
    }
}

impl Progress {
    /// A rebuild that is starting now.
    pub fn started() -> Self {
        Progress {
            inner: Mutex::new(ProgressState {
                state: "running".into(),
                started: Some(Instant::now()),
                ..Default::default()
            }),
        }
    }

    /// Marks the end of planning.
    pub fn planned(&self) {
        self.update(|p| p.planned = Some(Instant::now()));
    }

    /// Marks the end of copying.
    pub fn copied(&self) {
        self.update(|p| p.copied = Some(Instant::now()));
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The current state.
    pub fn get(&self) -> ProgressState {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks the end.
    pub fn finish(&self, result: &Result<(), String>) {
        self.update(|p| {
            p.finished = Some(Instant::now());
            match result {
                Ok(()) => p.state = "done".into(),
                Err(e) => {
                    p.state = "failed".into();
                    p.error = e.clone();
                }
            }
        });
    }
}

async fn block_crcs(c: &Control, layer: &str) -> Result<Vec<(u64, u32)>, RebuildError> {
    let layer_owned = layer.to_owned();
    let mut stream = c
        .call("listing block CRCs", |mut cl| async move {
            cl.block_crcs(pb::BlockCrcsRequest { layer: layer_owned })
                .await
        })
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|status| RebuildError::Stream {
            what: format!("listing block CRCs of layer {layer:?}"),
            addr: c.addr.clone(),
            status,
        })?;
        out.extend(chunk.blocks.into_iter().zip(chunk.crcs));
    }
    Ok(out)
}

/// The plan for one layer: byte extents to copy and to deallocate.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LayerPlan {
    /// `(offset, length)` ranges to copy.
    pub copy: Vec<(u64, u64)>,
    /// `(offset, length)` ranges to deallocate on the target.
    pub punch: Vec<(u64, u64)>,
    /// Blocks to copy.
    pub copy_blocks: u64,
    /// Blocks to deallocate.
    pub punch_blocks: u64,
}

fn push_run(runs: &mut Vec<(u64, u64)>, block: u64, bs: u64) {
    match runs.last_mut() {
        Some((off, len)) if *off + *len == block * bs && *len < (1 << 20) => *len += bs,
        _ => runs.push((block * bs, bs)),
    }
}

/// Merges two sorted CRC lists into a [`LayerPlan`].
pub fn plan(src: &[(u64, u32)], dst: &[(u64, u32)], bs: u64) -> LayerPlan {
    let mut p = LayerPlan::default();
    let (mut i, mut j) = (0, 0);
    while i < src.len() || j < dst.len() {
        match (src.get(i), dst.get(j)) {
            (Some(&(sb, sc)), Some(&(db, dc))) if sb == db => {
                if sc != dc {
                    push_run(&mut p.copy, sb, bs);
                    p.copy_blocks += 1;
                }
                i += 1;
                j += 1;
            }
            (Some(&(sb, _)), Some(&(db, _))) if sb < db => {
                push_run(&mut p.copy, sb, bs);
                p.copy_blocks += 1;
                i += 1;
            }
            (Some(&(sb, _)), None) => {
                push_run(&mut p.copy, sb, bs);
                p.copy_blocks += 1;
                i += 1;
            }
            (_, Some(&(db, _))) => {
                push_run(&mut p.punch, db, bs);
                p.punch_blocks += 1;
                j += 1;
            }
            (None, None) => break,
        }
    }
    p
}

/// Makes layers `layers` (names; "" is the head) of `dst` equal to those of
/// `src`. The target must have been prepared with `PrepareSync`.
pub async fn sync_layers(
    src: &Control,
    dst: &Control,
    layers: &[String],
    epoch: u64,
    session: u64,
    block_size: u64,
    progress: &Progress,
) -> Result<(), RebuildError> {
    // Plan every layer first so the total is known before copying.
    let mut plans = Vec::with_capacity(layers.len());
    for layer in layers {
        let (s, d) = (block_crcs(src, layer).await?, block_crcs(dst, layer).await?);
        let p = plan(&s, &d, block_size);
        progress.update(|st| st.bytes_total += p.copy_blocks * block_size);
        plans.push((layer.clone(), p, d.is_empty()));
    }
    progress.planned();
    for (layer, p, dst_empty) in plans {
        if p.copy.is_empty() && p.punch.is_empty() {
            continue;
        }
        let extents = |runs: &[(u64, u64)]| -> Vec<pb::Extent> {
            runs.iter()
                .map(|&(offset, length)| pb::Extent { offset, length })
                .collect()
        };
        // A target that holds nothing of this layer gets all of it.
        let whole = dst_empty && !p.copy.is_empty();
        let request = pb::PullLayerRequest {
            source: src.addr.clone(),
            layer: layer.clone(),
            copy: if whole { vec![] } else { extents(&p.copy) },
            punch: extents(&p.punch),
            epoch,
            whole,
            session,
        };
        let what = format!("pulling layer {layer:?} from {}", src.addr);
        let mut stream = dst
            .call_long(&what, |mut c| async move { c.pull_layer(request).await })
            .await?;
        let mut last = pb::PullProgress::default();
        while let Some(m) = stream.next().await {
            let m = m.map_err(|status| RebuildError::Stream {
                what: what.clone(),
                addr: dst.addr.clone(),
                status,
            })?;
            progress.update(|st| st.bytes_done += m.bytes_written - last.bytes_written);
            last = m;
            zebu_proto::crash::point("engine.rebuild.pulling");
        }
        progress.update(|st| {
            st.blocks_copied += last.blocks_written;
            st.blocks_punched += last.blocks_punched;
        });
    }
    progress.copied();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_copies_differences_and_punches_extras() {
        let src = [(0, 1), (1, 2), (2, 3), (10, 9)];
        let dst = [(1, 2), (2, 4), (5, 5), (6, 6)];
        let p = plan(&src, &dst, 4096);
        assert_eq!(p.copy, vec![(0, 4096), (2 * 4096, 4096), (10 * 4096, 4096)]);
        assert_eq!(p.punch, vec![(5 * 4096, 2 * 4096)]);
        assert_eq!((p.copy_blocks, p.punch_blocks), (3, 2));
        assert_eq!(plan(&src, &src, 4096), LayerPlan::default());
    }

    #[test]
    fn runs_are_capped_at_one_mib() {
        let src: Vec<(u64, u32)> = (0..600).map(|b| (b, 0)).collect();
        let p = plan(&src, &[], 4096);
        assert_eq!(
            p.copy,
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 88 * 4096)]
        );
    }
}
