//! A small asynchronous NBD client: fixed newstyle handshake with
//! `NBD_OPT_GO`, then `READ`, `WRITE`, `FLUSH`, `TRIM` and `WRITE_ZEROES`
//! with simple replies, pipelined on each connection and spread over a pool
//! of connections.
//!
//! Written against Zebu's engine (`engine/src/frontend/nbd.rs`) and nbdkit;
//! it follows <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//!
//! # Invariants
//!
//! * Structured replies are never negotiated, so every reply is a 16-byte
//!   simple reply, followed by exactly `length` bytes for a successful READ.
//!   The client knows that length because it remembers every request it sent
//!   under its handle until the reply arrives.
//! * A request is registered in the connection's pending table *before* it
//!   is written, so the reply can never arrive for an unknown handle unless
//!   the server misbehaves; a reply with an unknown handle, a bad magic or a
//!   truncated payload kills the connection.
//! * A dead connection fails every pending request and every later request
//!   with [`NbdError::Disconnected`]; it is never reused (no reconnection).
//! * Dropping an [`NbdPool`] closes its connections (after the last request
//!   using it finished, since requests hold the pool).
//! * Requests are written whole (header then payload) under the connection's
//!   write lock, so requests of concurrent callers never interleave.
//! * Nothing here panics on data from the network: every length and value is
//!   checked, and payloads larger than [`MAX_REQUEST`] are split.
//! * Several connections are used only when the server advertises
//!   `NBD_FLAG_CAN_MULTI_CONN`; then a FLUSH on any one connection covers
//!   writes completed on all of them, which is what [`NbdPool::flush`] relies on.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use zebu_nbd::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBD_MAGIC,
    OPT_ABORT, OPT_GO, OPTION_REPLY_MAGIC, REP_ACK, REP_FLAG_ERROR, REP_INFO, RequestHeader,
    SIMPLE_REPLY_LEN, SimpleReply,
};
pub use zebu_nbd::{
    TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
};

/// Largest payload (or TRIM/WRITE_ZEROES length) sent in one request; longer
/// operations are split. Zebu's engine accepts 32 MiB, nbdkit 64 MiB.
pub const MAX_REQUEST: u32 = 16 * 1024 * 1024;
/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Every error of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The URI is not `nbd+unix:///NAME?socket=PATH` or `nbd://HOST[:PORT]/NAME`.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting to the server failed.
    #[error("connecting to {address}: {source}")]
    Connect {
        /// The socket path or host:port.
        address: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The server broke the protocol (or is not an NBD server).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused the export during the handshake.
    #[error("the server refused export {export:?}: {reply} {message}")]
    Refused {
        /// The requested export name.
        export: String,
        /// The NBD_REP_ERR_* reply, as text.
        reply: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error (an errno value).
    #[error("the server returned error {errno} ({})", nix::errno::Errno::from_raw(*errno as i32).desc())]
    Server {
        /// The NBD error value (same numbering as Linux errno).
        errno: u32,
    },
    /// The connection is gone; the request was not (or may not have been) executed.
    #[error("the NBD connection is closed ({0})")]
    Disconnected(String),
    /// The request is not possible on this export (out of range, read-only,
    /// unsupported command).
    #[error("{0}")]
    Unsupported(String),
}

impl NbdError {
    /// The errno to report to a caller (FUSE) for this error.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Server { errno } => match i32::try_from(*errno) {
                Ok(e) if e > 0 => e,
                _ => libc::EIO,
            },
            NbdError::Unsupported(_) => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

/// Result type of this module.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

/// Where an export is: parsed from an NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The socket.
    pub address: NbdAddress,
    /// The export name (`""`: the server's default export).
    pub export: String,
}

/// The transport of an [`NbdUri`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// Host name or address (without brackets for IPv6).
        host: String,
        /// Port.
        port: u16,
    },
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::str::FromStr for NbdUri {
    type Err = NbdError;

    /// Parses `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`
    /// (percent-escapes decoded). TLS schemes (`nbds…`) are refused.
    fn from_str(uri: &str) -> Result<NbdUri> {
        let bad = |reason: &str| NbdError::InvalidUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-escape in export"))?;
        let params: Vec<(&str, &str)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix URIs have no host"));
                }
                let socket = params
                    .iter()
                    .find(|(k, _)| *k == "socket")
                    .map(|(_, v)| *v)
                    .ok_or_else(|| bad("missing ?socket=PATH"))?;
                let socket =
                    percent_decode(socket).ok_or_else(|| bad("bad percent-escape in socket"))?;
                if socket.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(NbdUri {
                    address: NbdAddress::Unix(PathBuf::from(socket)),
                    export,
                })
            }
            "nbd" => {
                let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                    let (h, p) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                    (h, p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("missing host"));
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Ok(NbdUri {
                    address: NbdAddress::Tcp {
                        host: host.to_owned(),
                        port,
                    },
                    export,
                })
            }
            _ => Err(bad("unsupported scheme (expected nbd+unix or nbd)")),
        }
    }
}

/// What the handshake told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }

    /// Whether FLUSH may be sent.
    pub fn can_flush(&self) -> bool {
        self.has(TFLAG_SEND_FLUSH)
    }

    /// Whether TRIM may be sent.
    pub fn can_trim(&self) -> bool {
        self.has(TFLAG_SEND_TRIM)
    }

    /// Whether WRITE_ZEROES may be sent.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TFLAG_SEND_WRITE_ZEROES)
    }

    /// Whether several connections may be used.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TFLAG_CAN_MULTI_CONN)
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

async fn open_socket(address: &NbdAddress) -> Result<(BoxRead, BoxWrite)> {
    let connect_err = |source| NbdError::Connect {
        address: address.to_string(),
        source,
    };
    match address {
        NbdAddress::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_err)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        NbdAddress::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_err)?;
            // Small requests must not wait for Nagle.
            s.set_nodelay(true).map_err(connect_err)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { context, source }
}

fn rep_name(rep: u32) -> String {
    match rep {
        0x8000_0001 => "NBD_REP_ERR_UNSUP".into(),
        0x8000_0002 => "NBD_REP_ERR_POLICY".into(),
        0x8000_0003 => "NBD_REP_ERR_INVALID".into(),
        0x8000_0004 => "NBD_REP_ERR_PLATFORM".into(),
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD".into(),
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN".into(),
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN".into(),
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG".into(),
        other => format!("reply {other:#x}"),
    }
}

/// Fixed newstyle handshake ending with `NBD_OPT_GO`.
async fn handshake(r: &mut BoxRead, w: &mut BoxWrite, export: &str) -> Result<ExportInfo> {
    let magic = r
        .read_u64()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    let opt_magic = r
        .read_u64()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    if magic != NBD_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad greeting magic {magic:#x} (not an NBD server?)"
        )));
    }
    if opt_magic != IHAVEOPT {
        return Err(NbdError::Protocol(
            "the server does not speak the newstyle protocol".into(),
        ));
    }
    let hflags = r
        .read_u16()
        .await
        .map_err(io_err("reading the NBD greeting"))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not support fixed newstyle negotiation".into(),
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len())
        .ok()
        .filter(|&l| l <= 4096)
        .ok_or_else(|| NbdError::Protocol("export name longer than 4096 bytes".into()))?;
    let mut msg = BytesMut::with_capacity(32 + name.len());
    msg.put_u32(cflags);
    msg.put_u64(IHAVEOPT);
    msg.put_u32(OPT_GO);
    msg.put_u32(4 + name_len + 2);
    msg.put_u32(name_len);
    msg.put_slice(name);
    msg.put_u16(0); // no information requests
    w.write_all(&msg)
        .await
        .map_err(io_err("sending NBD_OPT_GO"))?;
    w.flush().await.map_err(io_err("sending NBD_OPT_GO"))?;

    let mut info = None;
    loop {
        let ctx = "reading the reply to NBD_OPT_GO";
        let magic = r.read_u64().await.map_err(io_err(ctx))?;
        let opt = r.read_u32().await.map_err(io_err(ctx))?;
        let rep = r.read_u32().await.map_err(io_err(ctx))?;
        let len = r.read_u32().await.map_err(io_err(ctx))?;
        if magic != OPTION_REPLY_MAGIC || opt != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "bad option reply (magic {magic:#x}, option {opt})"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!(
                "option reply of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await.map_err(io_err(ctx))?;
        match rep {
            REP_ACK => break,
            REP_INFO => {
                if data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    if data.len() != 12 {
                        return Err(NbdError::Protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            data.len()
                        )));
                    }
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&data[2..10]);
                    info = Some(ExportInfo {
                        size: u64::from_be_bytes(size),
                        flags: u16::from_be_bytes([data[10], data[11]]),
                    });
                }
                // Other information (block size, name, description) is not needed.
            }
            rep if rep & REP_FLAG_ERROR != 0 => {
                // Tell the server we give up; best effort.
                let mut abort = BytesMut::with_capacity(16);
                abort.put_u64(IHAVEOPT);
                abort.put_u32(OPT_ABORT);
                abort.put_u32(0);
                let _ = w.write_all(&abort).await;
                return Err(NbdError::Refused {
                    export: export.to_owned(),
                    reply: rep_name(rep),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            other => debug!("ignoring option reply {other:#x} to NBD_OPT_GO"),
        }
    }
    info.ok_or_else(|| {
        NbdError::Protocol("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT".into())
    })
}

/// Connects to `uri`, runs the handshake, disconnects, and returns what the
/// server said about the export (its current size).
pub async fn probe(uri: &NbdUri) -> Result<ExportInfo> {
    let (mut r, mut w) = open_socket(&uri.address).await?;
    let info = handshake(&mut r, &mut w, &uri.export).await?;
    let mut disc = BytesMut::with_capacity(28);
    put_header(&mut disc, 0, CMD_DISC, 0, 0, 0);
    // Best effort: the server closes its side either way.
    let _ = w.write_all(&disc).await;
    let _ = w.shutdown().await;
    Ok(info)
}

fn put_header(buf: &mut BytesMut, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
    let header = RequestHeader {
        flags,
        kind: cmd,
        cookie: handle,
        offset,
        len,
    };
    buf.put_slice(&header.encode());
}

struct Pending {
    /// Payload length of a READ; 0 for every other command.
    read_len: u32,
    tx: oneshot::Sender<Result<Bytes>>,
}

/// One transmission-phase connection: requests are pipelined, replies are
/// matched by handle in a reader task.
struct Connection {
    /// `None` once the pool let go of the connection (closed for writing).
    writer: tokio::sync::Mutex<Option<BoxWrite>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_handle: AtomicU64,
    /// Set once (first failure); after that every request fails.
    dead: AtomicBool,
    /// The pool closed the connection on purpose (its end is not a failure).
    closing: AtomicBool,
    why_dead: Mutex<String>,
}

impl Connection {
    async fn open(uri: &NbdUri) -> Result<(Arc<Connection>, ExportInfo)> {
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
            let _ = p.tx.send(Err(NbdError::Disconnected(why.to_owned())));
        }
    }

    fn disconnected(&self) -> NbdError {
        NbdError::Disconnected(
            self.why_dead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn in_flight(&self) -> usize {
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
                    let _ = p.tx.send(Err(NbdError::Disconnected(e.to_string())));
                    return Err(io_err("reading NBD read data")(e));
                }
                Ok(buf.freeze())
            } else {
                Ok(Bytes::new())
            };
            // The caller may have gone away (cancelled); nothing to do then.
            let _ = p.tx.send(result);
        }
    }

    async fn request(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Bytes> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(self.disconnected());
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == CMD_READ { len } else { 0 };
        self.lock_pending().insert(handle, Pending { read_len, tx });
        // Checked again after registering: kill() may have drained the map
        // between the first check and the insert.
        if self.dead.load(Ordering::SeqCst) {
            self.lock_pending().remove(&handle);
            return Err(self.disconnected());
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
            // The stream may be desynchronized: the connection is done.
            self.kill(&format!("sending a request: {e}"));
            return Err(self.disconnected());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.disconnected()),
        }
    }
}

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
    /// request can be running: each holds a reference to the pool.
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
    fn parses_unix_and_tcp_uris() {
        let u: NbdUri = "nbd+unix:///vol?socket=/run/zebu/e.sock".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/zebu/e.sock".into()));
        assert_eq!(u.export, "vol");
        let u: NbdUri = "nbd+unix://?socket=/a%20b".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/a b".into()));
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://localhost:10810/my%2Fdisk".parse().unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "localhost".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "my/disk");
        let u: NbdUri = "nbd://[::1]".parse().unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        for bad in [
            "nbd+unix:///x",
            "nbds://h/x",
            "/tmp/sock",
            "nbd://:1/x",
            "nbd://h:99999/",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///%zz?socket=/s",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad}");
        }
    }

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

    #[test]
    fn server_errors_map_to_errno() {
        assert_eq!(NbdError::Server { errno: 28 }.errno(), libc::ENOSPC);
        assert_eq!(NbdError::Server { errno: 0 }.errno(), libc::EIO);
        assert_eq!(NbdError::Disconnected("x".into()).errno(), libc::EIO);
    }
}
