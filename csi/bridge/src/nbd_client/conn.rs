//! One transmission-phase connection: requests are pipelined under its
//! write lock and registered by handle, a reader task matches the replies
//! to them; the first failure kills the connection for good.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tracing::{debug, warn};
use zebu_nbd::{CMD_READ, SIMPLE_REPLY_LEN, SimpleReply};

use super::handshake::{BoxWrite, ExportInfo, handshake, open_socket};
use super::uri::NbdUri;
use super::{NbdError, Result, io_err, put_header};

/// What receives a request's result: called exactly once, with the reply
/// (on the connection's reader task) or with the failure that ended the
/// request (on whichever thread saw it).
pub type Done = Box<dyn FnOnce(Result<Bytes>) + Send>;

struct Pending {
    /// Payload length of a READ; 0 for every other command.
    read_len: u32,
    done: Done,
}

/// One transmission-phase connection: requests are pipelined, replies are
/// matched by handle in a reader task.
pub(super) struct Connection {
    /// `None` once the pool let go of the connection (closed for writing).
    pub(super) writer: tokio::sync::Mutex<Option<BoxWrite>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_handle: AtomicU64,
    /// Set once (first failure); after that every request fails.
    pub(super) dead: AtomicBool,
    /// The pool closed the connection on purpose (its end is not a failure).
    pub(super) closing: AtomicBool,
    why_dead: Mutex<String>,
}

impl Connection {
    pub(super) async fn open(uri: &NbdUri) -> Result<(Arc<Connection>, ExportInfo)> {
        let (mut r, mut w) = open_socket(&uri.address).await?;
        let info = handshake(&mut r, &mut w, &uri.export).await?;
        let conn = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(Some(w)),
            pending: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            why_dead: Mutex::new(String::new()),
        });
        let c = Arc::clone(&conn);
        tokio::spawn(async move {
            let why = match c
                .read_replies(BufReader::with_capacity(256 * 1024, r))
                .await
            {
                Ok(()) => "closed by the server".to_owned(),
                Err(e) => e.to_string(),
            };
            c.kill(&why);
        });
        Ok((conn, info))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        // A poisoned lock only means a panic elsewhere; the map is still valid.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails everything pending.
    fn kill(&self, why: &str) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            if self.closing.load(Ordering::SeqCst) {
                debug!("NBD connection closed: {why}");
            } else {
                warn!("NBD connection lost: {why}");
            }
            *self.why_dead.lock().unwrap_or_else(|e| e.into_inner()) = why.to_owned();
        }
        let drained: Vec<Pending> = self.lock_pending().drain().map(|(_, p)| p).collect();
        for p in drained {
            (p.done)(Err(NbdError::Disconnected(why.to_owned())));
        }
    }

    pub(super) fn disconnected(&self) -> NbdError {
        NbdError::Disconnected(
            self.why_dead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    pub(super) fn in_flight(&self) -> usize {
        self.lock_pending().len()
    }

    async fn read_replies<R: AsyncRead + Unpin>(&self, mut r: R) -> Result<()> {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        loop {
            match r.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(io_err("reading an NBD reply")(e)),
            }
            let SimpleReply {
                error,
                cookie: handle,
            } = SimpleReply::parse(&hdr)
                .map_err(|magic| NbdError::Protocol(format!("bad reply magic {magic:#x}")))?;
            let Some(p) = self.lock_pending().remove(&handle) else {
                return Err(NbdError::Protocol(format!(
                    "reply for unknown handle {handle}"
                )));
            };
            let result = if error != 0 {
                Err(NbdError::Server { errno: error })
            } else if p.read_len > 0 {
                let mut buf = BytesMut::zeroed(p.read_len as usize);
                if let Err(e) = r.read_exact(&mut buf).await {
                    (p.done)(Err(NbdError::Disconnected(e.to_string())));
                    return Err(io_err("reading NBD read data")(e));
                }
                Ok(buf.freeze())
            } else {
                Ok(Bytes::new())
            };
            (p.done)(result);
        }
    }

    /// Sends one request and waits for its reply.
    pub(super) async fn request(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Bytes> {
        let (tx, rx) = oneshot::channel();
        self.send(
            cmd,
            offset,
            len,
            payload,
            Box::new(move |r| {
                // The caller may have gone away (cancelled); nothing to do then.
                let _ = tx.send(r);
            }),
        )
        .await;
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.disconnected()),
        }
    }

    /// Sends one request and returns once it is written to the socket;
    /// `done` receives its result (see [`Done`]). Nothing is borrowed past
    /// the return, so `payload` may be a buffer the caller reuses.
    pub(super) async fn send(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        done: Done,
    ) {
        if self.dead.load(Ordering::SeqCst) {
            return done(Err(self.disconnected()));
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let read_len = if cmd == CMD_READ { len } else { 0 };
        self.lock_pending()
            .insert(handle, Pending { read_len, done });
        // Checked again after registering: kill() may have drained the map
        // between the first check and the insert.
        if self.dead.load(Ordering::SeqCst) {
            if let Some(p) = self.lock_pending().remove(&handle) {
                (p.done)(Err(self.disconnected()));
            }
            return;
        }
        let mut hdr = BytesMut::with_capacity(28);
        put_header(&mut hdr, 0, cmd, handle, offset, len);
        let sent = {
            let mut guard = self.writer.lock().await;
            async {
                let w = guard
                    .as_mut()
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
                w.write_all(&hdr).await?;
                if let Some(p) = payload {
                    w.write_all(p).await?;
                }
                w.flush().await
            }
            .await
        };
        if let Err(e) = sent {
            // The stream may be desynchronized: the connection is done (and
            // every pending request, this one included, fails).
            self.kill(&format!("sending a request: {e}"));
        }
    }
}
