//! The pool of connections to one export that callers use: requests are
//! split into [`MAX_REQUEST`] pieces and spread over the least busy live
//! connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tracing::debug;
use zebu_nbd::{CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};

use super::conn::{Connection, Done};
use super::handshake::ExportInfo;
use super::uri::NbdUri;
use super::{MAX_REQUEST, NbdError, Result, put_header};

/// A pool of connections to one export. Cheap to share (`Arc`); every method
/// may be called concurrently.
pub struct NbdPool {
    conns: Vec<Arc<Connection>>,
    next: AtomicUsize,
    info: ExportInfo,
}

impl std::fmt::Debug for NbdPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdPool")
            .field("connections", &self.conns.len())
            .field("info", &self.info)
            .finish()
    }
}

impl NbdPool {
    /// Opens up to `connections` connections (at least one; more only if the
    /// server advertises `CAN_MULTI_CONN`).
    pub async fn connect(uri: &NbdUri, connections: usize) -> Result<NbdPool> {
        let (first, info) = Connection::open(uri).await?;
        let mut conns = vec![first];
        let want = if info.can_multi_conn() {
            connections.max(1)
        } else {
            1
        };
        while conns.len() < want {
            let (c, i) = Connection::open(uri).await?;
            if i.size != info.size || i.flags != info.flags {
                return Err(NbdError::Protocol(format!(
                    "connections disagree on the export: {info:?} vs {i:?}"
                )));
            }
            conns.push(c);
        }
        debug!(connections = conns.len(), ?info, "NBD pool connected");
        Ok(NbdPool {
            conns,
            next: AtomicUsize::new(0),
            info,
        })
    }

    /// The export as seen at connect time.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A live connection, the least busy of two candidates (round-robin start).
    fn pick(&self) -> Result<&Connection> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(&Connection, usize)> = None;
        for i in 0..n {
            let c = &self.conns[(start + i) % n];
            if c.dead.load(Ordering::SeqCst) {
                continue;
            }
            let load = c.in_flight();
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((c, load));
            }
            if load == 0 {
                break;
            }
        }
        match best {
            Some((c, _)) => Ok(c),
            None => Err(self.conns[start % n].disconnected()),
        }
    }

    fn check_range(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(NbdError::Unsupported(format!(
                "range {offset}+{len} is beyond the export size {size}"
            ))),
        }
    }

    /// Reads `len` bytes at `offset` (split into [`MAX_REQUEST`] pieces, sent
    /// concurrently). `size` is the caller's idea of the export size, used
    /// only for the range check.
    pub async fn read(&self, offset: u64, len: u64, size: u64) -> Result<Bytes> {
        self.check_range(offset, len, size)?;
        if len <= u64::from(MAX_REQUEST) {
            let len = len as u32;
            if len == 0 {
                return Ok(Bytes::new());
            }
            return self.pick()?.request(CMD_READ, offset, len, None).await;
        }
        let pieces = split(offset, len);
        let parts = futures::future::try_join_all(
            pieces
                .iter()
                .map(|&(o, l)| async move { self.pick()?.request(CMD_READ, o, l, None).await }),
        )
        .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], size: u64) -> Result<()> {
        if self.info.read_only() {
            return Err(NbdError::Server {
                errno: libc::EROFS as u32,
            });
        }
        self.check_range(offset, data.len() as u64, size)?;
        let pieces = split(offset, data.len() as u64);
        futures::future::try_join_all(pieces.iter().map(|&(o, l)| {
            let start = (o - offset) as usize;
            let chunk = &data[start..start + l as usize];
            async move {
                self.pick()?
                    .request(CMD_WRITE, o, l, Some(chunk))
                    .await
                    .map(|_| ())
            }
        }))
        .await?;
        Ok(())
    }

    /// Makes every completed write durable (`NBD_CMD_FLUSH`); a no-op when
    /// the server does not support flush (it then has no volatile cache).
    pub async fn flush(&self) -> Result<()> {
        if !self.info.can_flush() {
            return Ok(());
        }
        self.pick()?
            .request(CMD_FLUSH, 0, 0, None)
            .await
            .map(|_| ())
    }

    /// [`Self::read`] of at most [`MAX_REQUEST`] bytes without waiting for
    /// the reply: returns once the request is on the wire (or failed), and
    /// `done` receives the data (on the connection's reader task).
    pub async fn submit_read(&self, offset: u64, len: u32, size: u64, done: Done) {
        if let Err(e) = self.check_one(offset, len, size) {
            return done(Err(e));
        }
        match self.pick() {
            Ok(c) => c.send(CMD_READ, offset, len, None, done).await,
            Err(e) => done(Err(e)),
        }
    }

    /// [`Self::write`] of at most [`MAX_REQUEST`] bytes without waiting for
    /// the reply: `data` is written to the socket before this returns, so
    /// it is never copied; `done` receives the result.
    pub async fn submit_write(&self, offset: u64, data: &[u8], size: u64, done: Done) {
        if self.info.read_only() {
            return done(Err(NbdError::Server {
                errno: libc::EROFS as u32,
            }));
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return done(Err(NbdError::Unsupported(format!(
                "a write of {} bytes is more than one request carries",
                data.len()
            ))));
        };
        if let Err(e) = self.check_one(offset, len, size) {
            return done(Err(e));
        }
        match self.pick() {
            Ok(c) => c.send(CMD_WRITE, offset, len, Some(data), done).await,
            Err(e) => done(Err(e)),
        }
    }

    /// [`Self::flush`] without waiting for the reply; `done` receives the
    /// result.
    pub async fn submit_flush(&self, done: Done) {
        if !self.info.can_flush() {
            return done(Ok(Bytes::new()));
        }
        match self.pick() {
            Ok(c) => c.send(CMD_FLUSH, 0, 0, None, done).await,
            Err(e) => done(Err(e)),
        }
    }

    /// The range check of a request sent as one piece.
    fn check_one(&self, offset: u64, len: u32, size: u64) -> Result<()> {
        if len > MAX_REQUEST {
            return Err(NbdError::Unsupported(format!(
                "{len} bytes are more than one request of at most {MAX_REQUEST} carries"
            )));
        }
        self.check_range(offset, u64::from(len), size)
    }

    /// Zeroes `len` bytes at `offset`, letting the server deallocate them
    /// (`NBD_CMD_WRITE_ZEROES` without `NO_HOLE`): reads return zeros after.
    pub async fn write_zeroes(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        if !self.info.can_write_zeroes() || self.info.read_only() {
            return Err(NbdError::Unsupported(
                "the export does not support NBD_CMD_WRITE_ZEROES".into(),
            ));
        }
        self.ranged(CMD_WRITE_ZEROES, offset, len, size).await
    }

    /// Discards `len` bytes at `offset` (`NBD_CMD_TRIM`): the content becomes
    /// unspecified.
    pub async fn trim(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        if !self.info.can_trim() || self.info.read_only() {
            return Err(NbdError::Unsupported(
                "the export does not support NBD_CMD_TRIM".into(),
            ));
        }
        self.ranged(CMD_TRIM, offset, len, size).await
    }

    async fn ranged(&self, cmd: u16, offset: u64, len: u64, size: u64) -> Result<()> {
        self.check_range(offset, len, size)?;
        let pieces = split(offset, len);
        futures::future::try_join_all(
            pieces
                .iter()
                .map(|&(o, l)| async move { self.pick()?.request(cmd, o, l, None).await }),
        )
        .await?;
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` on every live connection (best effort).
    pub async fn disconnect(&self) {
        for c in &self.conns {
            c.closing.store(true, Ordering::SeqCst);
            if c.dead.load(Ordering::SeqCst) {
                continue;
            }
            let mut hdr = BytesMut::with_capacity(28);
            put_header(&mut hdr, 0, CMD_DISC, 0, 0, 0);
            let mut guard = c.writer.lock().await;
            if let Some(w) = guard.as_mut() {
                let _ = w.write_all(&hdr).await;
                let _ = w.flush().await;
                let _ = w.shutdown().await;
            }
        }
    }
}

impl Drop for NbdPool {
    /// Closes every connection for writing: the server sees end-of-file and
    /// closes its side, which ends the reply reader task (it holds the
    /// connection, so without this the connection would live forever). No
    /// request can be running: each holds a reference to the pool (the
    /// `submit_*` callers' [`Done`] holds one until the reply).
    fn drop(&mut self) {
        for c in &self.conns {
            c.closing.store(true, Ordering::SeqCst);
            if let Ok(mut w) = c.writer.try_lock() {
                w.take();
            }
        }
    }
}

/// Splits `offset..offset+len` into pieces of at most [`MAX_REQUEST`] bytes.
fn split(offset: u64, len: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut o = offset;
    let end = offset.saturating_add(len);
    while o < end {
        let l = (end - o).min(u64::from(MAX_REQUEST));
        out.push((o, l as u32));
        o += l;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_in_bounded_pieces() {
        assert!(split(5, 0).is_empty());
        let m = u64::from(MAX_REQUEST);
        let p = split(7, 2 * m + 3);
        assert_eq!(
            p,
            vec![(7, MAX_REQUEST), (7 + m, MAX_REQUEST), (7 + 2 * m, 3)]
        );
    }
}
