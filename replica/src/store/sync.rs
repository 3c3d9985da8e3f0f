//! Resync and rebuild support: reshaping the chain to a source's
//! (`prepare_sync`), writing and punching a layer being synced, the CRC
//! listing and the layer reads a rebuild copies from.

use super::*;

impl Store {
    /// Reshapes the frozen chain to exactly `names` (oldest first) before a
    /// rebuild writes into it: layers of those names are kept, missing ones
    /// are created empty, others are dropped. With `include_head` the head
    /// may be written too (crash-recovery resync, no engine serving).
    pub async fn prepare_sync(
        &self,
        names: &[String],
        include_head: bool,
        epoch: u64,
        session: u64,
    ) -> Result<ReplicaStatus> {
        let _entered = self.enter_session(session, epoch)?;
        for n in names {
            validate_name(n)?;
        }
        let _c = self.control.lock().await;
        {
            let mut chain = self.chain.write().await;
            let head = chain.entries[chain.entries.len() - 1].clone();
            let mut next_id = self.meta().next_layer_id;
            let mut entries = Vec::with_capacity(names.len() + 1);
            let mut created = Vec::new();
            for n in names {
                if let Some(i) = chain.find_frozen(n) {
                    entries.push(chain.entries[i].clone());
                } else {
                    let layer = Layer::create(&self.dir, next_id, chain.size, self.block_size)
                        .map_err(io_err(format!("creating layer {n:?} for a rebuild")))?;
                    created.push(next_id);
                    entries.push(Entry {
                        meta: LayerMeta {
                            id: next_id,
                            name: n.clone(),
                            user_created: false,
                            created_unix: now_unix(),
                        },
                        layer: Arc::new(layer),
                    });
                    next_id += 1;
                }
            }
            entries.push(head);
            let dropped: Vec<u64> = chain
                .entries
                .iter()
                .map(|e| e.layer.id)
                .filter(|id| !entries.iter().any(|k| k.layer.id == *id))
                .collect();
            let new_chain: Vec<LayerMeta> = entries.iter().map(|e| e.meta.clone()).collect();
            let saved = self
                .update_meta(|m| {
                    m.chain = new_chain;
                    m.next_layer_id = next_id;
                    m.syncing = true;
                })
                .await;
            if let Err(e) = saved {
                for id in created {
                    Layer::remove_files(&self.dir, id);
                }
                return Err(e);
            }
            chain.entries = entries;
            chain.syncing = true;
            chain.sync_head = include_head;
            for id in dropped {
                self.forget_dirty(id);
                Layer::remove_files(&self.dir, id);
            }
        }
        Ok(self.status().await)
    }

    /// Ends a sync: every layer is synced and the replica trusts its chain.
    pub async fn finish_sync(&self, epoch: u64, session: u64) -> Result<ReplicaStatus> {
        let _entered = self.enter_session(session, epoch)?;
        let _c = self.control.lock().await;
        self.flush_all(true).await?;
        {
            let mut chain = self.chain.write().await;
            self.update_meta(|m| m.syncing = false).await?;
            chain.syncing = false;
            chain.sync_head = false;
        }
        Ok(self.status().await)
    }

    pub(super) async fn sync_target(
        &self,
        name: &str,
        epoch: u64,
    ) -> Result<(tokio::sync::RwLockReadGuard<'_, Chain>, Arc<Layer>)> {
        self.check_epoch(epoch)?;
        let chain = self.chain.read().await;
        if !chain.syncing {
            return Err(StoreError::FailedPrecondition(
                "this replica is not being synced: call PrepareSync before writing layers".into(),
            ));
        }
        if name.is_empty() && !chain.sync_head {
            return Err(StoreError::FailedPrecondition(
                "the head can only be written by a sync prepared with include_head".into(),
            ));
        }
        let layer = chain.layer(name)?.clone();
        Ok((chain, layer))
    }

    /// Writes blocks into layer `name` during a sync.
    pub async fn layer_write(
        &self,
        name: &str,
        offset: u64,
        data: AlignedBuf,
        crc: u32,
        epoch: u64,
        session: u64,
    ) -> Result<()> {
        let _entered = self.enter_session(session, epoch)?;
        let (crcs, actual) = block_crcs_and_total(data.as_slice(), self.block_size as usize);
        if actual != crc {
            return Err(StoreError::CrcMismatch {
                expected: crc,
                actual,
            });
        }
        let (chain, layer) = self.sync_target(name, epoch).await?;
        self.check_range(&chain, offset, data.len() as u64)?;
        self.write_blocks_with_crcs(&layer, offset, data, crcs, Placement::Queued)
            .await
    }

    /// Deallocates `[offset, offset + len)` of layer `name` during a sync.
    pub async fn layer_punch(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        epoch: u64,
        session: u64,
    ) -> Result<()> {
        let _entered = self.enter_session(session, epoch)?;
        let (chain, layer) = self.sync_target(name, epoch).await?;
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || offset.checked_add(len).is_none_or(|e| e > chain.size)
        {
            return Err(StoreError::InvalidArgument(format!(
                "punch {offset}+{len} must be block-aligned and inside the volume"
            )));
        }
        layer.punch(offset, len).map_err(io_err(format!(
            "deallocating {len} bytes at {offset} in layer {name:?}"
        )))?;
        layer.index_mut().remove(offset / bs, len / bs);
        self.mark_dirty(&layer);
        Ok(())
    }

    /// Streams `(blocks, crcs)` chunks for every present block of layer `name`.
    pub async fn block_crcs(
        &self,
        name: &str,
    ) -> Result<mpsc::Receiver<Result<(Vec<u64>, Vec<u32>)>>> {
        let layer = self.chain.read().await.layer(name)?.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            const CHUNK: usize = 16384;
            let runs = layer.index().runs(0, u64::MAX);
            let (mut blocks, mut crcs) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
            for (s, e) in runs {
                let mut b = s;
                while b < e {
                    let n = (CHUNK - blocks.len()).min((e - b) as usize) as u64;
                    crcs.extend(layer.read_crcs(b, n));
                    blocks.extend(b..b + n);
                    b += n;
                    if blocks.len() == CHUNK {
                        let out = (std::mem::take(&mut blocks), std::mem::take(&mut crcs));
                        if tx.blocking_send(Ok(out)).is_err() {
                            return;
                        }
                    }
                }
            }
            if !blocks.is_empty() {
                let _ = tx.blocking_send(Ok((blocks, crcs)));
            }
        });
        Ok(rx)
    }

    /// Streams `(offset, data, crc32 of data)` for the present blocks of layer `name` inside
    /// `extents` (byte ranges; empty means the whole layer). Every block is
    /// checked against its stored CRC, so a rebuild never copies data this
    /// disk corrupted: the stream ends with [`StoreError::Corrupt`] instead.
    /// The layer must not be written meanwhile (rebuilds read frozen layers,
    /// or the head while the engine is not serving).
    pub async fn read_layer(
        self: &Arc<Self>,
        name: &str,
        extents: Vec<(u64, u64)>,
    ) -> Result<mpsc::Receiver<Result<(u64, Bytes, u32)>>> {
        let layer = self.chain.read().await.layer(name)?.clone();
        let name = name.to_owned();
        let bs = self.block_size as u64;
        let ranges: Vec<(u64, u64)> = if extents.is_empty() {
            vec![(0, u64::MAX)]
        } else {
            extents
                .iter()
                .map(|&(o, l)| (o / bs, o.saturating_add(l).div_ceil(bs)))
                .collect()
        };
        // Chunks of at most COPY_STEP_BLOCKS within the present runs, read
        // several at a time (many when they are small: a delta resync's
        // scattered blocks) and sent in order.
        let chunks = present_chunks(&layer, ranges);
        let largest = chunks.iter().map(|&(_, n)| n * bs).max().unwrap_or(bs);
        let depth = (READ_LAYER_BYTES / largest).clamp(READ_LAYER_DEPTH.0, READ_LAYER_DEPTH.1);
        let (tx, rx) = mpsc::channel(8);
        let store = self.clone();
        tokio::spawn(async move {
            let reads = futures::stream::iter(chunks)
                .map(|(b, n)| {
                    let (store, layer, name) = (store.clone(), layer.clone(), name.clone());
                    async move {
                        let buf = store.read_blocks(&layer, b, n, "for a rebuild").await?;
                        let crc = verify_stored_crcs(&layer, &name, b, buf.as_slice(), bs)?;
                        Ok((b * bs, buf.into_bytes(), crc))
                    }
                })
                .buffered(depth as usize);
            let mut reads = std::pin::pin!(reads);
            while let Some(item) = reads.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
