//! Snapshots (freeze the head, start a new one), deletion (merge a layer
//! into its child), revert and expand.

use super::*;

impl Store {
    /// Freezes the head as snapshot `name` and starts a new head.
    pub async fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        epoch: u64,
        session: u64,
    ) -> Result<ReplicaStatus> {
        validate_name(name)?;
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        {
            let mut chain = self.chain.write().await;
            if chain.find_frozen(name).is_some() {
                return Err(StoreError::AlreadyExists(format!(
                    "a snapshot named {name:?} already exists on this replica"
                )));
            }
            let head = chain.head().clone();
            self.sync_layers(std::slice::from_ref(&head)).await?;
            let id = self.meta().next_layer_id;
            let layer = Layer::create(&self.dir, id, chain.size, self.block_size)
                .map_err(io_err("creating a new head layer"))?;
            let new_head = LayerMeta {
                id,
                name: String::new(),
                user_created: false,
                created_unix: now_unix(),
            };
            let frozen = LayerMeta {
                name: name.to_owned(),
                user_created,
                created_unix: now_unix(),
                ..chain.entries[chain.entries.len() - 1].meta.clone()
            };
            let (f2, h2) = (frozen.clone(), new_head.clone());
            let saved = self
                .update_meta(move |m| {
                    m.next_layer_id = id + 1;
                    if let Some(last) = m.chain.last_mut() {
                        *last = f2;
                    }
                    m.chain.push(h2);
                })
                .await;
            if let Err(e) = saved {
                Layer::remove_files(&self.dir, id);
                return Err(e);
            }
            let last = chain.entries.len() - 1;
            chain.entries[last].meta = frozen;
            chain.entries.push(Entry {
                meta: new_head,
                layer: Arc::new(layer),
            });
        }
        Ok(self.status().await)
    }

    /// Frozen layers, oldest first.
    pub async fn snapshots(&self) -> Vec<LayerStatus> {
        let chain = self.chain.read().await;
        chain.frozen().iter().map(layer_status).collect()
    }

    /// Deletes snapshot `name`, merging its blocks into its child. I/O keeps
    /// flowing; when the child is the head, each chunk briefly holds the
    /// chain exclusively.
    pub async fn delete_snapshot(
        &self,
        name: &str,
        epoch: u64,
        session: u64,
    ) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        let (from, into, into_is_head, user_created) = {
            let chain = self.chain.read().await;
            if chain.syncing {
                return Err(StoreError::FailedPrecondition(
                    "a rebuild into this replica is in progress; delete snapshots after it finishes".into(),
                ));
            }
            let i = chain.find_frozen(name).ok_or_else(|| {
                StoreError::NotFound(format!("no snapshot named {name:?} on this replica"))
            })?;
            (
                chain.entries[i].layer.clone(),
                chain.entries[i + 1].layer.clone(),
                i + 1 == chain.entries.len() - 1,
                chain.entries[i].meta.user_created,
            )
        };
        if into_is_head && !user_created && into.index().present() <= from.index().present() {
            return self.fold_head_down(name, from, into).await;
        }
        let merge = MergeMeta {
            from: from.id,
            into: into.id,
        };
        self.update_meta(|m| m.merging = Some(merge)).await?;
        let runs = from.index().runs(0, u64::MAX);
        for (s, e) in runs {
            let mut b = s;
            while b < e {
                let n = COPY_STEP_BLOCKS.min(e - b);
                let _excl = if into_is_head {
                    Some(self.chain.write().await)
                } else {
                    None
                };
                // Copy only what the child does not hold: the child's blocks are newer.
                let held = into.index().runs(b, b + n);
                for (gs, ge) in gaps(b, b + n, &held) {
                    self.copy_blocks(&from, name, &into, gs, ge - gs, || {
                        format!("reading snapshot {name:?} to merge it")
                    })
                    .await?;
                }
                b += n;
                zebu_proto::crash::point("replica.merge.copying");
            }
        }
        self.sync_layers(std::slice::from_ref(&into)).await?;
        {
            let mut chain = self.chain.write().await;
            let from_id = from.id;
            self.update_meta(|m| {
                m.chain.retain(|l| l.id != from_id);
                m.merging = None;
            })
            .await?;
            chain.entries.retain(|e| e.layer.id != from_id);
        }
        self.forget_dirty(from.id);
        Layer::remove_files(&self.dir, from.id);
        Ok(self.status().await)
    }

    /// Copies blocks `[first, first + count)` of layer `from` (named
    /// `from_name`) into layer `into` (data and CRC entries). Each block is
    /// checked against `from`'s stored CRC first, so a merge never turns
    /// corrupt data into data with a valid CRC: a mismatch fails the copy
    /// with [`StoreError::Corrupt`] and invalidates the entry. Callers hold
    /// `from` still (a frozen layer, or the chain held exclusively).
    pub(super) async fn copy_blocks(
        &self,
        from: &Arc<Layer>,
        from_name: &str,
        into: &Arc<Layer>,
        first: u64,
        count: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let buf = self.read_blocks_with(from, first, count, what).await?;
        if let Err(e) = verify_stored_crcs(from, from_name, first, buf.as_slice(), bs) {
            if let StoreError::Corrupt { block, actual, .. } = e {
                self.invalidate_crc(from, block, actual);
            }
            return Err(e);
        }
        // The stored entries are the data's CRCs: they were just checked.
        let crcs: Vec<u8> = from
            .read_crcs(first, count)
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        self.write_blocks_with_crcs(into, first * bs, buf, crcs, Placement::Queued)
            .await
    }

    /// Deletes the system snapshot `snap` (named `name`) right below the
    /// head by copying the head's blocks down into it and making it the head:
    /// the head is the smaller layer (e.g. the writes made during a rebuild),
    /// so this moves little, where merging the snapshot up into the head
    /// would move everything written before it. I/O waits for the whole
    /// copy (it holds the chain exclusively).
    ///
    /// Only for system snapshots: if the replica stops midway, the snapshot
    /// layer stays in the chain holding some of the head's newer blocks
    /// (reads are unaffected: the head still holds them too), which a user
    /// snapshot must never do. `merging` records the layer written into so
    /// an unclean restart recomputes its CRCs.
    pub(super) async fn fold_head_down(
        &self,
        name: &str,
        snap: Arc<Layer>,
        head: Arc<Layer>,
    ) -> Result<ReplicaStatus> {
        self.update_meta(|m| {
            m.merging = Some(MergeMeta {
                from: head.id,
                into: snap.id,
            })
        })
        .await?;
        {
            let mut chain = self.chain.write().await;
            let runs = head.index().runs(0, u64::MAX);
            for (s, e) in runs {
                let mut b = s;
                while b < e {
                    let n = COPY_STEP_BLOCKS.min(e - b);
                    self.copy_blocks(&head, "", &snap, b, n, || {
                        format!("reading the head to fold snapshot {name:?} into it")
                    })
                    .await?;
                    b += n;
                }
            }
            self.sync_layers(std::slice::from_ref(&snap)).await?;
            let (snap_id, head_id) = (snap.id, head.id);
            self.update_meta(|m| {
                m.chain.retain(|l| l.id != head_id);
                if let Some(l) = m.chain.iter_mut().find(|l| l.id == snap_id) {
                    l.name.clear();
                }
                m.merging = None;
            })
            .await?;
            chain.entries.retain(|e| e.layer.id != head_id);
            if let Some(e) = chain.entries.iter_mut().find(|e| e.layer.id == snap_id) {
                e.meta.name.clear();
            }
        }
        self.forget_dirty(head.id);
        Layer::remove_files(&self.dir, head.id);
        Ok(self.status().await)
    }

    pub(super) fn forget_dirty(&self, id: u64) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Drops every layer above snapshot `name` and starts an empty head on
    /// it. Refused while data streams are open.
    pub async fn revert(&self, name: &str, epoch: u64, session: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        let open = self.streams.load(Ordering::Acquire);
        if open > 0 {
            return Err(StoreError::FailedPrecondition(format!(
                "revert needs the replica closed for I/O, but {open} data stream(s) are open; detach the volume first"
            )));
        }
        {
            let mut chain = self.chain.write().await;
            let i = chain.find_frozen(name).ok_or_else(|| {
                StoreError::NotFound(format!("no snapshot named {name:?} on this replica"))
            })?;
            let id = self.meta().next_layer_id;
            let layer = Layer::create(&self.dir, id, chain.size, self.block_size)
                .map_err(io_err("creating a new head layer"))?;
            let head = LayerMeta {
                id,
                name: String::new(),
                user_created: false,
                created_unix: now_unix(),
            };
            let keep = i + 1;
            let h2 = head.clone();
            self.update_meta(move |m| {
                m.chain.truncate(keep);
                m.chain.push(h2);
                m.next_layer_id = id + 1;
            })
            .await?;
            let dropped: Vec<Entry> = chain.entries.drain(keep..).collect();
            chain.entries.push(Entry {
                meta: head,
                layer: Arc::new(layer),
            });
            for e in dropped {
                self.forget_dirty(e.layer.id);
                Layer::remove_files(&self.dir, e.layer.id);
            }
        }
        Ok(self.status().await)
    }

    /// Grows the volume to `size` bytes.
    pub async fn expand(&self, size: u64, epoch: u64, session: u64) -> Result<ReplicaStatus> {
        self.check_epoch(epoch)?;
        let _c = self.control.lock().await;
        self.check_session(session)?;
        {
            let mut chain = self.chain.write().await;
            let bs = self.block_size as u64;
            if size < chain.size {
                return Err(StoreError::InvalidArgument(format!(
                    "cannot shrink the volume from {} to {size} bytes; only growing is supported",
                    chain.size
                )));
            }
            if !size.is_multiple_of(bs) {
                return Err(StoreError::InvalidArgument(format!(
                    "new size {size} must be a multiple of the block size {bs}"
                )));
            }
            if size > chain.size {
                let head = chain.head().clone();
                head.grow_crcs(size / bs)
                    .map_err(io_err("growing the head layer's CRC file"))?;
                head.data
                    .set_len(size)
                    .map_err(io_err("growing the head layer file"))?;
                for e in &chain.entries {
                    e.layer.index_mut().grow(size / bs);
                }
                self.update_meta(|m| m.size = size).await?;
                chain.size = size;
            }
        }
        Ok(self.status().await)
    }
}

/// The parts of `[from, to)` not covered by the sorted runs `held`.
fn gaps(from: u64, to: u64, held: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = from;
    for &(s, e) in held {
        if pos < s {
            out.push((pos, s));
        }
        pos = pos.max(e);
    }
    if pos < to {
        out.push((pos, to));
    }
    out
}
