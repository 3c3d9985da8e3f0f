//! The volume's I/O: frontend requests split into whole-block replica
//! requests (read-modify-write for partial blocks), fed to the machine and
//! awaited; the block device the frontends serve.

use super::*;

impl Volume {
    /// Submits one whole-block request and waits for its completion.
    pub(super) async fn submit(
        &self,
        kind: IoKind,
        offset: u64,
        len: u32,
        payload: Bytes,
    ) -> Result<Bytes, DeviceError> {
        zebu_proto::awake::touch();
        let _gate = self.gate.read().await;
        let start = Instant::now();
        let rx = {
            let mut inner = self.lock();
            let (tx, rx) = oneshot::channel();
            let crc = if kind == IoKind::Write {
                crc32fast::hash(&payload)
            } else {
                0
            };
            let Inner { sm, out, .. } = &mut *inner;
            let s = sm.submit(kind, out);
            inner.pending.insert(
                s.io.0,
                Pending {
                    kind,
                    offset,
                    len,
                    payload,
                    crc,
                    revision: s.revision.unwrap_or(0),
                    data: None,
                    done: Some(tx),
                },
            );
            self.execute(&mut inner);
            rx
        };
        let result = rx
            .await
            .map_err(|_| DeviceError::Io("the engine dropped the request".into()))?;
        match kind {
            IoKind::Read => self.stats.reads.record(start.elapsed()),
            IoKind::Write => self.stats.writes.record(start.elapsed()),
            IoKind::Flush => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            IoKind::Unmap => {
                self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        result.map_err(|e| DeviceError::Io(e.to_string()))
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let size = self.size.load(Ordering::Acquire);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DeviceError::OutOfRange { offset, len });
        }
        Ok(())
    }

    pub(super) async fn read_blocks(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        if len <= MAX_REQUEST {
            return self
                .submit(IoKind::Read, offset, len as u32, Bytes::new())
                .await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = MAX_REQUEST.min(offset + len - pos);
            out.extend_from_slice(
                &self
                    .submit(IoKind::Read, pos, n as u32, Bytes::new())
                    .await?,
            );
            pos += n;
        }
        Ok(out.freeze())
    }

    /// Writes bytes at any alignment: whole blocks directly, partial blocks
    /// by read-modify-write of the blocks they touch.
    pub(super) async fn write_any(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        let bs = BLOCK_SIZE as u64;
        let len = data.len() as u64;
        if offset.is_multiple_of(bs) && len.is_multiple_of(bs) {
            self.submit(IoKind::Write, offset, len as u32, data).await?;
            return Ok(());
        }
        let _rmw = self.rmw.lock().await;
        let first = offset / bs * bs;
        let end = (offset + len).div_ceil(bs) * bs;
        let old = self.read_blocks(first, end - first).await?;
        let mut merged = BytesMut::from(&old[..]);
        let at = (offset - first) as usize;
        merged[at..at + data.len()].copy_from_slice(&data);
        self.submit(IoKind::Write, first, (end - first) as u32, merged.freeze())
            .await?;
        Ok(())
    }

    pub(super) async fn unmap_blocks(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let mut pos = offset;
        while pos < offset + len {
            let n = MAX_REQUEST.min(offset + len - pos);
            self.submit(IoKind::Unmap, pos, n as u32, Bytes::new())
                .await?;
            pos += n;
        }
        Ok(())
    }

    pub(super) async fn flush_all(&self) -> Result<(), DeviceError> {
        self.submit(IoKind::Flush, 0, 0, Bytes::new())
            .await
            .map(|_| ())
    }

    /// Waits for in-flight I/O, flushes every replica and detaches from
    /// them cleanly, so the next engine needs no resync.
    pub async fn shutdown(&self) -> Result<(), DeviceError> {
        self.flush_all().await?;
        let _quiet = self.gate.write().await;
        for (rid, c) in self.live_members() {
            let (epoch, session) = (self.epoch, self.member_session(rid));
            if let Err(e) = c
                .call_long("closing", |mut cl| async move {
                    cl.close(pb::CloseRequest { epoch, session }).await
                })
                .await
            {
                tracing::warn!(error = %e, "could not close a replica cleanly; the next engine will resync it");
            }
        }
        Ok(())
    }
}

/// The volume as a block device for frontends.
#[derive(Clone)]
pub struct Device(pub Arc<Volume>);

impl BlockDevice for Device {
    fn size(&self) -> u64 {
        self.0.size.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        BLOCK_SIZE
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        let v = &self.0;
        v.check_range(offset, len as u64)?;
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs * bs;
        let end = (offset + len as u64).div_ceil(bs) * bs;
        let data = v.read_blocks(first, end - first).await?;
        if first == offset && end - first == len as u64 {
            Ok(data)
        } else {
            let at = (offset - first) as usize;
            Ok(data.slice(at..at + len as usize))
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let v = &self.0;
        v.check_range(offset, data.len() as u64)?;
        v.write_any(offset, data).await?;
        if fua {
            v.flush_all().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush_all().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        let v = &self.0;
        v.check_range(offset, len as u64)?;
        // Trim is advisory: only the whole blocks inside the range.
        let bs = BLOCK_SIZE as u64;
        let first = offset.div_ceil(bs) * bs;
        let end = (offset + len as u64) / bs * bs;
        if end > first {
            v.unmap_blocks(first, end - first).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        let v = &self.0;
        let len = len as u64;
        v.check_range(offset, len)?;
        let bs = BLOCK_SIZE as u64;
        let first = offset.div_ceil(bs) * bs;
        let end = (offset + len) / bs * bs;
        if end > first {
            // Unmapped blocks read back as zeros (the replica guarantees it).
            v.unmap_blocks(first, end - first).await?;
            if offset < first {
                v.write_any(offset, Bytes::from(vec![0; (first - offset) as usize]))
                    .await?;
            }
            if end < offset + len {
                v.write_any(end, Bytes::from(vec![0; (offset + len - end) as usize]))
                    .await?;
            }
        } else {
            v.write_any(offset, Bytes::from(vec![0; len as usize]))
                .await?;
        }
        if fua {
            v.flush_all().await?;
        }
        Ok(())
    }

    fn multi_conn_safe(&self) -> bool {
        // A flush fans out to every replica and covers every write that
        // completed before it, whichever connection sent it.
        true
    }

    fn client_connected(&self) {
        self.0.nbd_clients.fetch_add(1, Ordering::AcqRel);
    }

    fn client_disconnected(&self) {
        self.0.nbd_clients.fetch_sub(1, Ordering::AcqRel);
    }
}
