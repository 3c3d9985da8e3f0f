//! Scrub: every block of every layer read back and checked against its
//! stored CRC, at a capped rate; corrupt blocks are confirmed with I/O
//! quiesced, listed, and their CRC entries invalidated.

use super::*;

/// Chunks of [`COPY_STEP_BLOCKS`] a scrub reads at once.
const SCRUB_DEPTH: usize = 4;
/// Corrupt blocks a [`ScrubReport`] lists (all are counted).
const SCRUB_LIST_MAX: usize = 1000;

/// What [`Store::scrub`] found.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    /// Blocks read and checked, over every layer.
    pub blocks_checked: u64,
    /// Blocks that did not match their stored CRC.
    pub corrupt_blocks: u64,
    /// The first of them (at most 1000): layer name ("" is the head), block.
    pub corrupt: Vec<(String, u64)>,
}

/// How long a scrub that has read `done` bytes in `elapsed` must pause to
/// average no more than `rate` bytes per second; `None` when it need not
/// (or `rate` is 0, no limit).
fn pace(done: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

impl Store {
    /// Reads every present block of every layer and checks it against the
    /// layer's stored CRC (see [`ScrubReport`]). A mismatch is read again
    /// with the chain held exclusively, as for a normal read, and a block
    /// that still does not match has its CRC entry invalidated
    /// ([`Self::invalidate_crc`]). I/O goes on meanwhile; the control mutex
    /// is held for one group of [`SCRUB_DEPTH`] chunks at a time, so a
    /// snapshot or merge waits for one group, not for the whole scrub, and
    /// a layer merged away meanwhile is not read further. Refused (also
    /// midway) while a sync into this replica runs.
    ///
    /// With `max_bytes_per_sec` above 0 the scrub pauses between groups,
    /// outside every lock, so that it reads no faster than that on average;
    /// 0 reads as fast as the disk allows. A scrub that reaches its end and
    /// finds nothing corrupt records the time in the metadata
    /// ([`ReplicaStatus::last_clean_scrub_unix`]), which is what a scrub
    /// schedule counts from: a replica left corrupt stays due.
    pub async fn scrub(&self, epoch: u64, max_bytes_per_sec: u64) -> Result<ScrubReport> {
        self.check_epoch(epoch)?;
        let started = Instant::now();
        let layers: Vec<(String, Arc<Layer>)> = {
            let chain = self.chain.read().await;
            chain
                .entries
                .iter()
                .map(|e| (e.meta.name.clone(), e.layer.clone()))
                .collect()
        };
        let bs = self.block_size as u64;
        let mut report = ScrubReport::default();
        for (name, layer) in &layers {
            let chunks = present_chunks(layer, [(0, u64::MAX)]);
            for group in chunks.chunks(SCRUB_DEPTH) {
                // A newer engine has taken over: this scrub is not its.
                self.check_epoch(epoch)?;
                {
                    let _c = self.control.lock().await;
                    {
                        let chain = self.chain.read().await;
                        if chain.syncing {
                            return Err(StoreError::FailedPrecondition(
                                "a rebuild into this replica is in progress; scrub it once it \
                                 has finished"
                                    .into(),
                            ));
                        }
                        if !chain.entries.iter().any(|e| Arc::ptr_eq(&e.layer, layer)) {
                            break; // merged into its child, which is scrubbed too
                        }
                    }
                    let reads = group.iter().map(|&(b, n)| async move {
                        let buf = self.read_blocks(layer, b, n, "to scrub them").await?;
                        Ok::<_, StoreError>((b, buf))
                    });
                    for (b, buf) in futures::future::try_join_all(reads).await? {
                        report.blocks_checked += buf.len() as u64 / bs;
                        // Every mismatch of the chunk, each checked again.
                        let mut from = b;
                        while let Err(m) = layer.check_crcs(
                            from,
                            &buf.as_slice()[((from - b) * bs) as usize..],
                            bs as usize,
                        ) {
                            self.confirm_corrupt(name, layer, m.block, &mut report)
                                .await?;
                            from = m.block + 1;
                        }
                    }
                }
                if let Some(ahead) = pace(
                    report.blocks_checked * bs,
                    max_bytes_per_sec,
                    started.elapsed(),
                ) {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        if report.corrupt_blocks > 0 {
            let first: Vec<String> = report
                .corrupt
                .iter()
                .take(8)
                .map(|(l, b)| format!("{} block {b}", layer_label(l)))
                .collect();
            tracing::error!(
                corrupt = report.corrupt_blocks,
                checked = report.blocks_checked,
                first = %first.join(", "),
                "a scrub found corrupt data on disk; a resync rewrites it from a healthy replica"
            );
        }
        // Recorded only for the current epoch's scrub; the record is made
        // in memory right after the check, with no await between, so an
        // engine that opens the replica later sees it.
        self.check_epoch(epoch)?;
        if report.corrupt_blocks == 0 {
            let finished = now_unix();
            self.update_meta(|m| m.last_clean_scrub_unix = finished)
                .await?;
        }
        Ok(report)
    }

    /// Reads block `block` of `layer` again with the chain held exclusively
    /// (no write in flight) and, if the layer still holds it (an unmap may
    /// have deallocated it since it was listed) and it still does not match
    /// its entry, invalidates the entry and counts the block.
    pub(super) async fn confirm_corrupt(
        &self,
        name: &str,
        layer: &Arc<Layer>,
        block: u64,
        report: &mut ScrubReport,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let _excl = self.chain.write().await;
        if !layer.index().contains(block) {
            return Ok(());
        }
        let buf = self
            .read_blocks(layer, block, 1, "to check it again")
            .await?;
        if let Err(StoreError::Corrupt { actual, .. }) =
            verify_stored_crcs(layer, name, block, buf.as_slice(), bs)
        {
            self.invalidate_crc(layer, block, actual);
            report.corrupt_blocks += 1;
            if report.corrupt.len() < SCRUB_LIST_MAX {
                report.corrupt.push((name.to_owned(), block));
            }
        }
        Ok(())
    }
}
