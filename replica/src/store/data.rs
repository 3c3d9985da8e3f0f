//! Reads, writes, unmaps and flushes: the data path of the store.

use super::*;

/// Where a write's data I/O runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Through the I/O backend, concurrently with the other requests.
    Queued,
    /// On the calling thread, blocking it until the disk has the data, when
    /// the I/O backend has nothing else in flight; queued otherwise
    /// ([`IoEngine::run_here_if_idle`]). The data stream places a commit's
    /// write here when the engine has nothing else outstanding and the
    /// replica is at rest: through io_uring, the completion of a direct
    /// write on ext4 wakes a kernel worker, which wakes the runtime
    /// (interrupting its `epoll_wait`) to post the completion, which an
    /// eventfd then reports; a blocking `pwrite` is woken by the disk
    /// itself. Only commits: a write arriving while the thread blocks waits
    /// for that write, so concurrent writers without flushes would settle
    /// into one write at a time (measured: QD2 random writes 10% slower).
    HereIfIdle,
}

impl Store {
    pub(super) fn check_range(&self, chain: &Chain, offset: u64, len: u64) -> Result<()> {
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(StoreError::InvalidArgument(format!(
                "offset {offset} and length {len} must be multiples of the block size {bs}"
            )));
        }
        if len == 0 || len > MAX_IO_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "length {len} must be between {bs} and {MAX_IO_BYTES} bytes"
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > chain.size) {
            return Err(StoreError::OutOfRange {
                offset,
                len,
                size: chain.size,
            });
        }
        Ok(())
    }

    pub(super) fn mark_dirty(&self, layer: &Arc<Layer>) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        d.entry(layer.id).or_insert_with(|| layer.clone());
    }

    /// Writes `payload` at `offset` into the head.
    pub async fn write(
        &self,
        offset: u64,
        payload: Bytes,
        crc: u32,
        epoch: u64,
        revision: u64,
    ) -> Result<()> {
        let ticket = self.ticket(offset, payload.len() as u64);
        self.write_aligned(
            ticket,
            offset,
            AlignedBuf::copy_from(&payload),
            crc,
            epoch,
            revision,
            Placement::Queued,
        )
        .await
    }

    /// A place in the order of writes and unmaps for the bytes `[offset,
    /// offset + len)` (see [`crate::order`]): the data stream takes one for
    /// each request as it arrives, so overlapping requests apply in the
    /// order they were sent.
    pub fn ticket(&self, offset: u64, len: u64) -> Ticket {
        self.write_order.ticket(offset, len)
    }

    /// [`Self::write`] of a payload already in an aligned buffer (the data
    /// stream copies it there straight from the received frames), once every
    /// earlier overlapping `ticket` is done, its data I/O run as `placement`
    /// says.
    #[allow(clippy::too_many_arguments)] // a write's fields, one each
    pub async fn write_aligned(
        &self,
        ticket: Ticket,
        offset: u64,
        payload: AlignedBuf,
        crc: u32,
        epoch: u64,
        revision: u64,
        placement: Placement,
    ) -> Result<()> {
        self.check_epoch(epoch)?;
        let (crcs, actual) = block_crcs_and_total(payload.as_slice(), self.block_size as usize);
        if actual != crc {
            return Err(StoreError::CrcMismatch {
                expected: crc,
                actual,
            });
        }
        ticket.ready().await;
        let chain = self.chain.read().await;
        self.check_range(&chain, offset, payload.len() as u64)?;
        let head = chain.head().clone();
        self.write_blocks_with_crcs(&head, offset, payload, crcs, placement)
            .await?;
        self.revision.fetch_max(revision, Ordering::AcqRel);
        self.write_back_ahead(&head);
        Ok(())
    }

    /// Whether the writes arriving now look like a database's commits (a
    /// few writes, then a FLUSH, again and again; [`WriteBackAhead`]).
    pub fn writing_commits(&self) -> bool {
        self.ahead.in_commits()
    }

    /// Starts writing `layer`'s CRC pages back when the write that just
    /// completed looks like a commit ([`crate::writeback`]). Nothing waits
    /// for it, and a failure needs no handling here: the next FLUSH waits
    /// for these writes and reports one that failed, and pages whose
    /// write-back did not start are still dirty for the FLUSH to write.
    fn write_back_ahead(&self, layer: &Layer) {
        if self.ahead.wrote()
            && let Err(e) = layer.start_crc_write_back()
        {
            tracing::debug!(error = %e, "starting a CRC file's write-back failed; the FLUSH writes it");
        }
    }

    /// Writes whole blocks into `layer` (data, then CRCs, then the index).
    pub(super) async fn write_layer_blocks(
        &self,
        layer: &Arc<Layer>,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let crcs = block_crcs(data, self.block_size as usize);
        self.write_blocks_with_crcs(
            layer,
            offset,
            AlignedBuf::copy_from(data),
            crcs,
            Placement::Queued,
        )
        .await
    }

    /// [`Self::write_layer_blocks`] with the CRC-file bytes of `data` already
    /// computed. The data write goes to the I/O backend; while it runs, the
    /// CRC entries are stored into the layer's mapped CRC file (see `layer`'s
    /// docs for why not through io_uring). Both have finished before the
    /// index is updated, so the durability invariant is unchanged.
    pub(super) async fn write_blocks_with_crcs(
        &self,
        layer: &Arc<Layer>,
        offset: u64,
        data: AlignedBuf,
        crcs: Vec<u8>,
        placement: Placement,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let first = offset / bs;
        let len = data.len() as u64;
        let context = || format!("writing {len} bytes at {offset}");
        let op = Op::Write {
            file: layer.data.clone(),
            offset,
            buf: data,
        };
        let queued = match placement {
            Placement::HereIfIdle => self
                .io
                .run_here_if_idle(vec![op])
                .map_err(|ops| self.io.submit(ops)),
            Placement::Queued => Err(self.io.submit([op])),
        };
        let crc_written = layer.store_crcs(first, &crcs);
        // Wait for the data write even when the CRC write failed.
        let done = match queued {
            Ok(done) => done.map(drop),
            Err(pending) => IoEngine::wait(pending).await.map(drop),
        };
        if let Err(e) = done {
            // The blocks on disk are now old, new or torn, while their CRC
            // entries already describe the new data: an entry that matched
            // the new data would let a resync (which compares entries)
            // skip the block, keeping whatever the disk holds. Entries
            // that match nothing make reads fail over and resyncs copy.
            let invalid: Vec<u8> = crcs.iter().map(|b| !b).collect();
            if let Err(e) = layer.store_crcs(first, &invalid) {
                tracing::warn!(error = %e, block = first, "could not invalidate the CRC entries of a failed write");
            }
            self.mark_dirty(layer);
            return Err(io_err_with(context)(e));
        }
        crc_written.map_err(io_err_with(context))?;
        layer.index_mut().insert(first, len / bs);
        self.mark_dirty(layer);
        Ok(())
    }

    /// Reads `len` bytes at `offset` through the chain.
    pub async fn read(&self, offset: u64, len: u64, epoch: u64) -> Result<Bytes> {
        self.read_verified(offset, len, epoch)
            .await
            .map(|(data, _)| data)
    }

    /// [`Self::read`], also returning the crc32 of the data (for the reply).
    ///
    /// Every block read from disk is checked against the CRC its layer
    /// stored when it was written; blocks no layer holds read as zeros
    /// without disk I/O. A read that overlaps a write of the same block may
    /// see the new data beside the old CRC (or a mix of old and new data),
    /// so a mismatch is not believed at once: the read is done again with
    /// the chain held exclusively, when no write is in flight. If the block
    /// still does not match, this disk corrupted it: the read fails with
    /// [`StoreError::Corrupt`] and the block's CRC entry is invalidated
    /// ([`Self::invalidate_crc`]).
    pub async fn read_verified(&self, offset: u64, len: u64, epoch: u64) -> Result<(Bytes, u32)> {
        self.check_epoch(epoch)?;
        {
            let chain = self.chain.read().await;
            self.check_range(&chain, offset, len)?;
            match self.read_chain(&chain, offset, len).await {
                Err(StoreError::Corrupt { .. }) => {}
                done => return done,
            }
        }
        let chain = self.chain.write().await;
        match self.read_chain(&chain, offset, len).await {
            Err(e @ StoreError::Corrupt { .. }) => {
                if let StoreError::Corrupt {
                    layer,
                    block,
                    actual,
                    ..
                } = &e
                    && let Some(entry) = chain.entries.iter().find(|x| x.meta.name == *layer)
                {
                    self.invalidate_crc(&entry.layer, *block, *actual);
                }
                tracing::error!(error = %e, offset, len, "a read found corrupt data on disk");
                Err(e)
            }
            done => {
                if done.is_ok() {
                    tracing::debug!(
                        offset,
                        len,
                        "a checksum mismatch went away once no write was in flight"
                    );
                }
                done
            }
        }
    }

    /// The reads of [`Self::read_verified`] under a chain guard.
    pub(super) async fn read_chain(
        &self,
        chain: &Chain,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, u32)> {
        let bs = self.block_size as u64;
        let (first, end) = (offset / bs, (offset + len) / bs);
        let mut runs = Vec::new();
        chain.resolve(chain.entries.len() - 1, first, end, &mut runs);
        let no_buffer = || StoreError::Io {
            context: "reading".into(),
            source: io::Error::other("backend returned no buffer"),
        };
        if let [(Some(level), _, _)] = runs[..] {
            let entry = &chain.entries[level];
            let buf = self
                .read_blocks_with(&entry.layer, first, end - first, || {
                    format!("reading {len} bytes at {offset}")
                })
                .await?;
            let crc =
                verify_stored_crcs(&entry.layer, &entry.meta.name, first, buf.as_slice(), bs)?;
            return Ok((buf.into_bytes(), crc));
        }
        let mut out = vec![0u8; len as usize];
        let mut placed = Vec::new();
        let ops: Vec<Op> = runs
            .iter()
            .filter_map(|&(level, s, e)| {
                let level = level?;
                placed.push((level, s));
                Some(Op::Read {
                    file: chain.entries[level].layer.data.clone(),
                    offset: s * bs,
                    buf: AlignedBuf::for_read(((e - s) * bs) as usize),
                })
            })
            .collect();
        if !ops.is_empty() {
            let done = self
                .io
                .run(ops)
                .await
                .map_err(io_err_with(|| format!("reading {len} bytes at {offset}")))?;
            for (c, (level, s)) in done.into_iter().zip(placed) {
                let Completion::Read(buf) = c else {
                    return Err(no_buffer());
                };
                let entry = &chain.entries[level];
                verify_stored_crcs(&entry.layer, &entry.meta.name, s, buf.as_slice(), bs)?;
                let at = ((s - first) * bs) as usize;
                out[at..at + buf.len()].copy_from_slice(buf.as_slice());
            }
        }
        let crc = crc32fast::hash(&out);
        Ok((Bytes::from(out), crc))
    }

    /// Records that block `block` of `layer` holds data that does not match
    /// its CRC entry: the entry becomes the complement of the CRC of the data
    /// found. That data can never match it, so the block keeps failing reads
    /// instead of being served, and it differs from the entry the volume's
    /// healthy replicas hold, so the next resync of this replica (a CRC diff)
    /// copies the block. Durable with the layer's next flush.
    pub(super) fn invalidate_crc(&self, layer: &Arc<Layer>, block: u64, actual: u32) {
        if let Err(e) = layer.store_crcs(block, &(!actual).to_le_bytes()) {
            tracing::warn!(error = %e, block, "could not invalidate a corrupt block's CRC entry");
        }
        self.mark_dirty(layer);
    }

    /// Deallocates `[offset, offset + len)`: it reads back as zeros.
    pub async fn unmap(&self, offset: u64, len: u64, epoch: u64) -> Result<()> {
        let ticket = self.ticket(offset, len);
        self.unmap_in_order(ticket, offset, len, epoch).await
    }

    /// [`Self::unmap`] once every earlier overlapping `ticket` is done.
    pub async fn unmap_in_order(
        &self,
        ticket: Ticket,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<()> {
        self.check_epoch(epoch)?;
        ticket.ready().await;
        let chain = self.chain.read().await;
        self.check_range(&chain, offset, len)?;
        let bs = self.block_size as u64;
        let (first, end) = (offset / bs, (offset + len) / bs);
        let head = chain.head().clone();
        // Blocks an older layer holds must be covered by explicit zeros.
        let mut zero_runs: Vec<(u64, u64)> = if chain.syncing {
            vec![(first, end)]
        } else {
            let mut all: Vec<(u64, u64)> = chain
                .frozen()
                .iter()
                .flat_map(|e| e.layer.index().runs(first, end))
                .collect();
            all.sort_unstable();
            all
        };
        merge_runs(&mut zero_runs);
        head.punch(offset, len).map_err(io_err_with(|| {
            format!("deallocating {len} bytes at {offset}")
        }))?;
        head.index_mut().remove(first, end - first);
        for (s, e) in zero_runs {
            let mut b = s;
            while b < e {
                let n = COPY_STEP_BLOCKS.min(e - b);
                let zeros = vec![0u8; (n * bs) as usize];
                self.write_layer_blocks(&head, b * bs, &zeros).await?;
                b += n;
            }
        }
        self.mark_dirty(&head);
        Ok(())
    }

    /// Makes every completed write durable.
    pub async fn flush(&self, epoch: u64) -> Result<()> {
        self.check_epoch(epoch)?;
        self.ahead.flushed();
        self.flush_all(false).await
    }

    pub(super) async fn flush_all(&self, every_layer: bool) -> Result<()> {
        // Serialized: a flush that finds nothing dirty must still wait for
        // the fsyncs of a flush already running.
        let _f = self.flush_lock.lock().await;
        let layers: Vec<Arc<Layer>> = if every_layer {
            self.chain
                .read()
                .await
                .entries
                .iter()
                .map(|e| e.layer.clone())
                .collect()
        } else {
            let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            d.drain().map(|(_, l)| l).collect()
        };
        // The revision is not saved here: it only ranks replicas at crash
        // recovery, a live replica reports it from memory, and one recorded
        // too low is harmless (the replica is resynced from a fresher one,
        // which holds every flushed write too). Every metadata save carries
        // it (`update_meta`), at the latest the clean close. Saving it
        // at every FLUSH cost a thread hop and a write of sled's log before
        // the FLUSH could return.
        self.sync_layers(&layers).await
    }

    /// Makes every write to `layers` acknowledged so far durable, with one
    /// cache flush of the disk per layer: the dirty pages of its CRC file
    /// are written back (no cache flush; `sync_file_range`), then its data
    /// file is `fdatasync`ed, whose cache flush covers the CRC pages too —
    /// one linked chain in io_uring ([`Op::WriteBackThenSync`]), or, when
    /// no other I/O is in flight, both on this thread, which then waits for
    /// the disk instead of a worker thread
    /// ([`IoEngine::run_here_if_idle`]). That holds for CRC files written
    /// in full on disk (see [`crate::crcmap`]); any other CRC file is
    /// `fdatasync`ed as well.
    ///
    /// A failure is final for this process: the kernel reports a failed
    /// writeback once and marks the pages clean, so a second fdatasync
    /// would succeed without the data (or the CRCs) being on disk. The
    /// replica refuses every request from then on ([`Self::check_sync`])
    /// and never marks a clean stop; restarted, it recomputes its CRCs
    /// from the disk and the engine resyncs it.
    pub(super) async fn sync_layers(&self, layers: &[Arc<Layer>]) -> Result<()> {
        let ops = layers.iter().flat_map(|l| {
            let (crc, data) = (l.crc.clone(), l.data.clone());
            let (op, then) = if l.crc_written() {
                (Op::WriteBackThenSync { pages: crc, data }, None)
            } else {
                (Op::Fsync { file: crc }, Some(Op::Fsync { file: data }))
            };
            std::iter::once(op).chain(then)
        });
        // Every op runs even when another fails: the replica is then
        // poisoned anyway, and each fdatasync still commits (or aborts) the
        // filesystem's journal, as a restart will find it. At rest, on this
        // thread (no worker thread to wake: `IoEngine::run_here_if_idle`).
        let done = match self.io.run_here_if_idle(ops.collect()) {
            Ok(done) => done,
            Err(ops) => self.io.run(ops).await,
        };
        if let Err(e) = done {
            self.sync_failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "a cache flush of the replica's disk failed: refusing all I/O until restarted");
            return Err(io_err("syncing layer files")(e));
        }
        Ok(())
    }

    /// Fails once a cache flush failed ([`Self::sync_layers`]).
    pub(super) fn check_sync(&self) -> Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::Io {
                context: "a cache flush of this replica's disk failed earlier, so writes since \
                          the last good flush may not be on disk; restart the replica (it \
                          recomputes its checksums) and resync it"
                    .into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }

    /// Reads blocks `[first, first + count)` of `layer`'s data file; an
    /// error says what was read and `why`.
    pub(super) async fn read_blocks(
        &self,
        layer: &Layer,
        first: u64,
        count: u64,
        why: &str,
    ) -> Result<AlignedBuf> {
        self.read_blocks_with(layer, first, count, || {
            format!("reading {count} blocks at block {first} {why}")
        })
        .await
    }

    /// [`Self::read_blocks`] with the error's whole context built by `what`.
    pub(super) async fn read_blocks_with(
        &self,
        layer: &Layer,
        first: u64,
        count: u64,
        what: impl FnOnce() -> String,
    ) -> Result<AlignedBuf> {
        let bs = self.block_size as u64;
        let done = self
            .io
            .run([Op::Read {
                file: layer.data.clone(),
                offset: first * bs,
                buf: AlignedBuf::for_read((count * bs) as usize),
            }])
            .await
            .map_err(io_err_with(what))?;
        match done.into_iter().next() {
            Some(Completion::Read(buf)) => Ok(buf),
            _ => Err(StoreError::Io {
                context: "reading blocks".into(),
                source: io::Error::other("backend returned no buffer"),
            }),
        }
    }
}

/// Sorts-merged, overlapping or touching runs collapse into one.
fn merge_runs(runs: &mut Vec<(u64, u64)>) {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for &(s, e) in runs.iter() {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *runs = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::EngineKind;

    const BS: usize = 4096;

    fn payload(seed: u8) -> (AlignedBuf, u32) {
        let data = vec![seed; BS];
        (AlignedBuf::copy_from(&data), crc32fast::hash(&data))
    }

    /// A write placed `HereIfIdle` runs on the calling thread when the ring
    /// is at rest and is queued into it when the ring has a request in
    /// flight; either way it lands, as does a `Queued` one.
    #[tokio::test]
    async fn lone_writes_run_here_only_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(OpenOptions {
            dir: dir.path().to_owned(),
            size: Some(1 << 20),
            block_size: BS as u32,
            io_engine: EngineKind::Uring,
        })
        .unwrap();
        store.open_epoch(1).await.unwrap();
        let IoEngine::Uring(ring) = &store.io else {
            panic!("io_uring is unavailable here");
        };
        let write = |block: u64, seed: u8, placement| {
            let (buf, crc) = payload(seed);
            let offset = block * BS as u64;
            let ticket = store.ticket(offset, BS as u64);
            store.write_aligned(ticket, offset, buf, crc, 1, 1, placement)
        };
        let before = ring.taken();
        write(0, 1, Placement::HereIfIdle).await.unwrap();
        assert_eq!(ring.taken(), before, "at rest: not through the ring");
        write(1, 2, Placement::Queued).await.unwrap();
        assert_eq!(ring.taken(), before + 1);

        // A read of an empty pipe stays in the ring until the pipe is written.
        let (r, w) = nix::unistd::pipe().unwrap();
        let pending = store.io.submit([Op::Read {
            file: Arc::new(std::fs::File::from(r)),
            offset: 0,
            buf: AlignedBuf::for_read(BS),
        }]);
        write(2, 3, Placement::HereIfIdle).await.unwrap();
        assert_eq!(ring.taken(), before + 3, "busy: queued behind the read");
        std::io::Write::write_all(&mut std::fs::File::from(w), &[0; BS]).unwrap();
        IoEngine::wait(pending).await.unwrap();

        for (block, seed) in [(0u64, 1u8), (1, 2), (2, 3)] {
            let got = store.read(block * BS as u64, BS as u64, 1).await.unwrap();
            assert_eq!(&got[..], &[seed; BS][..], "block {block}");
        }
    }
}
