//! NBD (Network Block Device) server exporting one [`BlockDevice`].
//!
//! Implements the server side of the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) on
//! tokio, over unix or TCP sockets.
//!
//! # Public API
//!
//! ```text
//! pub const MAX_PAYLOAD: u32;            // 32 MiB, largest READ/WRITE accepted
//! pub const MAX_IN_FLIGHT: u32;          // 256 requests per connection
//! pub const MAX_IN_FLIGHT_BYTES: u32;    // 128 MiB of payload per connection
//! pub enum ListenAddr { Unix(PathBuf), Tcp { host: String, port: u16 } }   // FromStr + Display
//! pub enum Listener { Unix(UnixListener), Tcp(TcpListener) }              // From<UnixListener/TcpListener>
//! impl Listener {
//!     pub async fn bind(addr: &ListenAddr) -> Result<Listener, NbdError>;
//!     pub fn local_addr(&self) -> Result<ListenAddr, NbdError>;
//! }
//! pub async fn bind(addr: &str) -> Result<Listener, NbdError>;            // "unix:PATH" | "tcp:HOST:PORT"
//! pub async fn serve<D: BlockDevice>(listener: Listener, export_name: String, device: Arc<D>,
//!                                    shutdown: impl Future) -> Result<(), NbdError>;
//! pub enum NbdError { InvalidAddress, Bind, Accept, Io, Protocol, UnknownExport, Internal }
//! ```
//!
//! # Protocol subset
//!
//! * Handshake: fixed newstyle only; a client that does not set
//!   `NBD_FLAG_C_FIXED_NEWSTYLE` (or sets unknown flags) is disconnected.
//!   `NBD_FLAG_NO_ZEROES` is offered.
//! * Options: `NBD_OPT_GO` and `NBD_OPT_INFO` (reply `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE` — minimum 1, preferred = the device block size,
//!   maximum [`MAX_PAYLOAD`] — plus `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION`
//!   when requested), `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`.
//!   Everything else (including `NBD_OPT_STRUCTURED_REPLY` and TLS) gets
//!   `NBD_REP_ERR_UNSUP` and negotiation continues. The export is reachable
//!   under its name and under the empty (default) name; any other name gets
//!   `NBD_REP_ERR_UNKNOWN` (or a disconnect for `NBD_OPT_EXPORT_NAME`, which
//!   cannot report errors).
//! * Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES`, and `CAN_MULTI_CONN` iff
//!   [`BlockDevice::multi_conn_safe`].
//! * Commands: `READ`, `WRITE` (FUA), `FLUSH`, `TRIM` (FUA → trim then flush),
//!   `WRITE_ZEROES` (FUA; `NO_HOLE` accepted, zeroes are always written through
//!   [`BlockDevice::write_zeroes`]), `DISC`. Only simple replies are used.
//!   Unknown commands or flags → `EINVAL`; READ/WRITE longer than
//!   [`MAX_PAYLOAD`] → `EOVERFLOW`; out-of-range READ/TRIM → `EINVAL`;
//!   out-of-range WRITE/WRITE_ZEROES → `ENOSPC`. Zero-length requests succeed
//!   without touching the device.
//!
//! # Connection structure
//!
//! Each connection runs in one task holding three cooperating futures (no task
//! is spawned per request):
//!
//! * the *reader* reads a 28-byte header into a fixed buffer, validates it,
//!   reads a WRITE payload straight into a `BytesMut` (frozen to `Bytes`, no
//!   copy) and hands the request to the executor;
//! * the *executor* drives the device futures of all in-flight requests in a
//!   `FuturesUnordered`, so requests are processed concurrently and replies
//!   go out in completion order;
//! * the *writer* serializes replies into a `BufWriter` (header and read data
//!   as one vectored write) and flushes once per batch of ready replies.
//!
//! # Invariants
//!
//! * A reply is written for every request that was fully read (header plus
//!   payload), except after the connection is torn down (a reply write
//!   failed); device operations already started still run to completion, and
//!   their replies are dropped.
//! * The request stream never desynchronizes: the `length` payload bytes of a
//!   WRITE are always consumed, even when the request is rejected.
//! * Per connection, at most [`MAX_IN_FLIGHT`] requests and
//!   [`MAX_IN_FLIGHT_BYTES`] bytes of READ/WRITE payload are outstanding
//!   between reading a request header and writing its reply (each request
//!   costs at least `MAX_IN_FLIGHT_BYTES / MAX_IN_FLIGHT`).
//! * A malformed stream (bad magic, truncated header or payload) stops the
//!   reader: in-flight requests finish, their replies are sent, and the
//!   connection is closed. Nothing in the server panics on network input.
//! * Shutdown: stop accepting, stop reading new requests, let in-flight
//!   requests finish and their replies be written, close every connection;
//!   [`serve`] returns once all connection tasks have ended.
//! * Each connection is logged once when opened and once when closed (with the
//!   reason); device errors are logged where they are turned into NBD errors.

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tracing::{Instrument, debug, info, warn};

use super::{BlockDevice, DeviceError};
use zebu_nbd::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, NBD_MAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    OPTION_REPLY_MAGIC, Plan, REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REP_INFO, REP_SERVER, REQUEST_HEADER_LEN, RequestHeader, TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

/// Largest READ or WRITE payload accepted (advertised as the maximum block
/// size). Larger requests get `EOVERFLOW`.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Maximum number of requests in flight per connection.
pub const MAX_IN_FLIGHT: u32 = 256;

/// Maximum READ/WRITE payload bytes in flight per connection.
pub const MAX_IN_FLIGHT_BYTES: u32 = 128 * 1024 * 1024;

/// Longest option payload read during the handshake; longer ones are skipped
/// and answered with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Capacity of the per-connection read buffer.
const READ_BUFFER: usize = 128 * 1024;
/// Capacity of the per-connection write buffer.
const WRITE_BUFFER: usize = 128 * 1024;
/// Pause after a transient `accept` failure (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Preferred block size advertised when the device reports an unusable one.
const FALLBACK_BLOCK_SIZE: u32 = 4096;
/// Answer to `NBD_INFO_DESCRIPTION`.
const DESCRIPTION: &str = "Zebu replicated volume";

/// Errors of the NBD frontend.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A listen address string is not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("invalid listen address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Binding the listening socket failed.
    #[error("binding NBD listener on {addr}: {source}")]
    Bind {
        /// The address being bound.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The listening socket failed permanently.
    #[error("accepting NBD connections: {0}")]
    Accept(#[source] io::Error),
    /// Socket I/O failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The client broke the protocol in a way that cannot be answered.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    #[error("client requested unknown export {0:?}")]
    UnknownExport(String),
    /// A server invariant was broken (a bug, never caused by the client).
    #[error("internal NBD server error: {0}")]
    Internal(&'static str),
}

impl NbdError {
    /// True for errors that just mean the peer went away.
    fn is_disconnect(&self) -> bool {
        matches!(
            self,
            NbdError::Io { source, .. } if matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        )
    }
}

/// Builds a `map_err` adapter that attaches `context` to an I/O error.
fn io_error(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { context, source }
}

// ---------------------------------------------------------------------------
// Addresses and listeners.

/// Where to listen: parsed from `unix:PATH` or `tcp:HOST:PORT`
/// (`tcp:[::1]:10809` for IPv6 literals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or IP literal, without brackets) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port (0 picks a free port).
        port: u16,
    },
}

impl FromStr for ListenAddr {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, NbdError> {
        let invalid = |reason| NbdError::InvalidAddress {
            addr: s.to_owned(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("empty socket path (expected unix:PATH)"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| invalid("missing port (expected tcp:HOST:PORT)"))?;
            let host = match host.strip_prefix('[') {
                Some(inner) => inner
                    .strip_suffix(']')
                    .ok_or_else(|| invalid("unbalanced '[' in host"))?,
                None => host,
            };
            if host.is_empty() {
                return Err(invalid("empty host (expected tcp:HOST:PORT)"));
            }
            let port = port
                .parse()
                .map_err(|_| invalid("port is not a number between 0 and 65535"))?;
            Ok(ListenAddr::Tcp {
                host: host.to_owned(),
                port,
            })
        } else {
            Err(invalid("expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ListenAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A bound listening socket the server accepts connections on.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket listener.
    Unix(UnixListener),
    /// A TCP listener.
    Tcp(TcpListener),
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Listener::Unix(listener)
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Listener::Tcp(listener)
    }
}

/// A freshly accepted connection.
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Binds `addr`. For a unix socket, a stale socket file left by a previous
    /// run (nobody accepting on it) is replaced; a live one is an error.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, NbdError> {
        let bound = match addr {
            ListenAddr::Unix(path) => bind_unix(path).await.map(Listener::Unix),
            ListenAddr::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
                .await
                .map(Listener::Tcp),
        };
        bound.map_err(|source| NbdError::Bind {
            addr: addr.to_string(),
            source,
        })
    }

    /// The address actually bound (useful with TCP port 0).
    pub fn local_addr(&self) -> Result<ListenAddr, NbdError> {
        match self {
            Listener::Unix(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(io_error("reading the unix listener address"))?;
                addr.as_pathname()
                    .map(|path| ListenAddr::Unix(path.to_owned()))
                    .ok_or(NbdError::Internal("unix listener is not bound to a path"))
            }
            Listener::Tcp(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(io_error("reading the TCP listener address"))?;
                Ok(ListenAddr::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                })
            }
        }
    }

    /// Accepts one connection and describes the peer for logs.
    async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
                    Some(pid) => format!("unix:pid={pid}"),
                    None => "unix".to_owned(),
                };
                Ok((Accepted::Unix(stream), peer))
            }
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                if let Err(err) = stream.set_nodelay(true) {
                    debug!(%peer, error = %err, "setting TCP_NODELAY failed");
                }
                Ok((Accepted::Tcp(stream), peer.to_string()))
            }
        }
    }
}

/// Binds a unix socket, replacing a stale socket file nobody listens on.
async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
            if !is_socket || UnixStream::connect(path).await.is_ok() {
                return Err(err);
            }
            debug!(path = %path.display(), "replacing stale NBD unix socket");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// Parses `addr` (`unix:PATH` or `tcp:HOST:PORT`) and binds it.
pub async fn bind(addr: &str) -> Result<Listener, NbdError> {
    Listener::bind(&addr.parse()?).await
}

/// True for `accept` errors that mean the listening socket itself is unusable.
fn is_fatal_accept_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

// ---------------------------------------------------------------------------
// Server.

/// Per-connection flow-control limits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Maximum requests in flight.
    max_in_flight: u32,
    /// Budget of payload bytes in flight.
    budget_bytes: u32,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_in_flight: MAX_IN_FLIGHT,
        budget_bytes: MAX_IN_FLIGHT_BYTES,
    };

    /// Budget units charged for a request carrying `payload` bytes: at least
    /// an equal share of the budget, so the request count is bounded too.
    fn cost(&self, payload: u32) -> u32 {
        let min = (self.budget_bytes / self.max_in_flight.max(1)).max(1);
        payload.max(min).min(self.budget_bytes.max(1))
    }
}

/// Serves `device` under `export_name` on `listener` until `shutdown`
/// resolves.
///
/// On shutdown the server stops accepting, stops reading new requests, lets
/// in-flight requests finish (their replies are sent), closes every
/// connection, and returns once all connection tasks have ended. Transient
/// `accept` errors are logged and retried; an error that makes the listener
/// unusable stops the server the same way and is returned.
pub async fn serve<D: BlockDevice>(
    listener: Listener,
    export_name: String,
    device: Arc<D>,
    shutdown: impl Future,
) -> Result<(), NbdError> {
    serve_with_limits(listener, export_name, device, shutdown, Limits::DEFAULT).await
}

async fn serve_with_limits<D: BlockDevice>(
    listener: Listener,
    export_name: String,
    device: Arc<D>,
    shutdown: impl Future,
    limits: Limits,
) -> Result<(), NbdError> {
    let export_name: Arc<str> = Arc::from(export_name);
    match listener.local_addr() {
        Ok(addr) => info!(%addr, export = %export_name, "NBD server listening"),
        Err(err) => info!(export = %export_name, error = %err, "NBD server listening"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut shutdown = pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                log_join(joined);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let span = tracing::info_span!("nbd_conn", id = next_id, peer = %peer);
                    let device = Arc::clone(&device);
                    let name = Arc::clone(&export_name);
                    let stop = stop_rx.clone();
                    match stream {
                        Accepted::Unix(stream) => {
                            let (reader, writer) = stream.into_split();
                            connections.spawn(
                                run_connection(device, name, reader, writer, stop, limits)
                                    .instrument(span),
                            );
                        }
                        Accepted::Tcp(stream) => {
                            let (reader, writer) = stream.into_split();
                            connections.spawn(
                                run_connection(device, name, reader, writer, stop, limits)
                                    .instrument(span),
                            );
                        }
                    }
                }
                Err(err) if is_fatal_accept_error(&err) => break Err(NbdError::Accept(err)),
                Err(err) => {
                    warn!(error = %err, "accepting an NBD connection failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    };
    drop(listener);
    if !connections.is_empty() {
        info!(
            connections = connections.len(),
            "NBD server stopping; draining connections"
        );
    }
    stop_tx.send_replace(true);
    while let Some(joined) = connections.join_next().await {
        log_join(joined);
    }
    match &result {
        Ok(()) => info!("NBD server stopped"),
        Err(err) => warn!(error = %err, "NBD server stopped"),
    }
    result
}

/// Tells the device a client left, however its connection ended.
struct ClientGuard<D: BlockDevice>(Arc<D>);

impl<D: BlockDevice> Drop for ClientGuard<D> {
    fn drop(&mut self) {
        self.0.client_disconnected();
    }
}

/// Logs a connection task that panicked or was cancelled.
fn log_join(joined: Result<(), JoinError>) {
    if let Err(err) = joined {
        warn!(error = %err, "NBD connection task failed");
    }
}

/// Runs one connection and logs how it ended.
async fn run_connection<D, R, W>(
    device: Arc<D>,
    export_name: Arc<str>,
    reader: R,
    writer: W,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
) where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    device.client_connected();
    let _client = ClientGuard(Arc::clone(&device));
    info!("NBD connection opened");
    match serve_connection(&*device, &export_name, reader, writer, shutdown, limits).await {
        Ok(summary) => info!(
            requests = summary.requests,
            reason = summary.end.as_str(),
            "NBD connection closed"
        ),
        Err(err) if err.is_disconnect() => info!(error = %err, "NBD connection lost"),
        Err(err) => warn!(error = %err, "NBD connection terminated"),
    }
}

/// Why a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// Writing a reply failed (the error is reported separately).
    WriterFailed,
    /// The client sent `NBD_OPT_ABORT` during the handshake.
    Aborted,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Disconnect => "client disconnect",
            End::Eof => "client closed the connection",
            End::Shutdown => "server shutdown",
            End::WriterFailed => "reply write failed",
            End::Aborted => "handshake aborted by client",
        }
    }
}

/// Outcome of a connection that ended cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    /// Requests read in the transmission phase.
    requests: u64,
    /// Why it ended.
    end: End,
}

/// Resolves once the server asks connections to stop. Never resolves if the
/// sender is gone without asking (nothing can ask any more).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves one client: handshake, then transmission until the client leaves,
/// the stream breaks or the server shuts down.
async fn serve_connection<D, R, W>(
    device: &D,
    export_name: &str,
    reader: R,
    writer: W,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> Result<Summary, NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let negotiated = tokio::select! {
        biased;
        () = shutdown_requested(&mut shutdown) => None,
        result = handshake(device, export_name, &mut reader, &mut writer) => Some(result?),
    };
    let export = match negotiated {
        None => {
            return Ok(Summary {
                requests: 0,
                end: End::Shutdown,
            });
        }
        Some(Handshake::Aborted) => {
            // The client may already be gone; closing is best effort.
            let _ = writer.shutdown().await;
            return Ok(Summary {
                requests: 0,
                end: End::Aborted,
            });
        }
        Some(Handshake::Transmission(export)) => export,
    };
    debug!(
        size = export.size,
        flags = format_args!("{:#x}", export.flags),
        "NBD handshake complete"
    );
    transmission(device, &export, reader, writer, shutdown, limits).await
}

// ---------------------------------------------------------------------------
// Handshake.

/// What the client is given access to, fixed at handshake time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Export {
    /// Size advertised to the client; requests are validated against it.
    size: u64,
    /// Transmission flags.
    flags: u16,
    /// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
    preferred_block: u32,
}

impl Export {
    /// Reads the device's current size and capabilities.
    fn describe<D: BlockDevice>(device: &D) -> Export {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES;
        if device.multi_conn_safe() {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        // NBD wants a power of two; clients expect at least 512.
        let block = device.block_size();
        let preferred_block = if block.is_power_of_two() && block <= MAX_PAYLOAD {
            block.max(512)
        } else {
            warn!(
                block_size = block,
                "device block size is not a usable power of two; advertising 4096"
            );
            FALLBACK_BLOCK_SIZE
        };
        Export {
            size: device.size(),
            flags,
            preferred_block,
        }
    }
}

/// Result of option haggling.
enum Handshake {
    /// Enter the transmission phase with this export.
    Transmission(Export),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// True if `requested` names our export (the empty name is the default).
fn export_matches(requested: &[u8], export_name: &str) -> bool {
    requested.is_empty() || requested == export_name.as_bytes()
}

/// Buffers one fixed-newstyle option reply.
async fn option_reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::Internal("option reply longer than 4 GiB"))?;
    let mut header = [0u8; 20];
    let mut out = &mut header[..];
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len);
    writer
        .write_all(&header)
        .await
        .map_err(io_error("sending an option reply"))?;
    writer
        .write_all(data)
        .await
        .map_err(io_error("sending an option reply"))
}

/// Sends the `NBD_REP_INFO` replies for `NBD_OPT_INFO` / `NBD_OPT_GO`.
async fn send_export_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    export_name: &str,
    export: &Export,
    requested: &[u16],
) -> Result<(), NbdError> {
    let mut info = Vec::with_capacity(12);
    info.put_u16(INFO_EXPORT);
    info.put_u64(export.size);
    info.put_u16(export.flags);
    option_reply(writer, option, REP_INFO, &info).await?;

    if requested.contains(&INFO_NAME) {
        let mut info = Vec::with_capacity(2 + export_name.len());
        info.put_u16(INFO_NAME);
        info.put_slice(export_name.as_bytes());
        option_reply(writer, option, REP_INFO, &info).await?;
    }
    if requested.contains(&INFO_DESCRIPTION) {
        let mut info = Vec::with_capacity(2 + DESCRIPTION.len());
        info.put_u16(INFO_DESCRIPTION);
        info.put_slice(DESCRIPTION.as_bytes());
        option_reply(writer, option, REP_INFO, &info).await?;
    }
    // Always sent: any byte alignment works, so it only carries hints and the
    // payload cap.
    let mut info = Vec::with_capacity(14);
    info.put_u16(INFO_BLOCK_SIZE);
    info.put_u32(1);
    info.put_u32(export.preferred_block);
    info.put_u32(MAX_PAYLOAD);
    option_reply(writer, option, REP_INFO, &info).await
}

/// Runs the fixed-newstyle handshake up to the transmission phase.
async fn handshake<D, R, W>(
    device: &D,
    export_name: &str,
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
) -> Result<Handshake, NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    let mut out = &mut greeting[..];
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    writer
        .write_all(&greeting)
        .await
        .map_err(io_error("sending the NBD greeting"))?;
    writer
        .flush()
        .await
        .map_err(io_error("sending the NBD greeting"))?;

    let client_flags = reader
        .read_u32()
        .await
        .map_err(io_error("reading client flags"))?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "client does not support fixed newstyle negotiation".to_owned(),
        ));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0u8; 16];
        reader
            .read_exact(&mut header)
            .await
            .map_err(io_error("reading an option header"))?;
        let mut fields = &header[..];
        let magic = fields.get_u64();
        let option = fields.get_u32();
        let len = fields.get_u32();
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "bad option magic {magic:#018x}"
            )));
        }
        debug!(option, len, "NBD option");
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // This option cannot be answered with an error.
                return Err(NbdError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with a {len}-byte name"
                )));
            }
            discard(reader, len, "skipping oversized option data").await?;
            option_reply(writer, option, REP_ERR_TOO_BIG, b"option data too long").await?;
            writer
                .flush()
                .await
                .map_err(io_error("sending an option reply"))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader
            .read_exact(&mut data)
            .await
            .map_err(io_error("reading option data"))?;

        let done = match option {
            OPT_EXPORT_NAME => {
                if !export_matches(&data, export_name) {
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                let export = Export::describe(device);
                let mut reply = Vec::with_capacity(10 + 124);
                reply.put_u64(export.size);
                reply.put_u16(export.flags);
                if !no_zeroes {
                    reply.put_bytes(0, 124);
                }
                writer
                    .write_all(&reply)
                    .await
                    .map_err(io_error("sending the export description"))?;
                Some(Handshake::Transmission(export))
            }
            OPT_ABORT => {
                // The client may close without waiting for the ACK.
                if option_reply(writer, option, REP_ACK, &[]).await.is_ok() {
                    let _ = writer.flush().await;
                }
                return Ok(Handshake::Aborted);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut server = Vec::with_capacity(4 + export_name.len());
                    server.put_u32(u32::try_from(export_name.len()).unwrap_or(u32::MAX));
                    server.put_slice(export_name.as_bytes());
                    option_reply(writer, option, REP_SERVER, &server).await?;
                    option_reply(writer, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                }
                None
            }
            OPT_INFO | OPT_GO => match zebu_nbd::parse_info_request(&data) {
                None => {
                    option_reply(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        b"malformed NBD_OPT_INFO/NBD_OPT_GO request",
                    )
                    .await?;
                    None
                }
                Some(request) if !export_matches(request.name, export_name) => {
                    let message = format!(
                        "unknown export {:?}; this server exports {export_name:?}",
                        String::from_utf8_lossy(request.name)
                    );
                    option_reply(writer, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                    None
                }
                Some(request) => {
                    let export = Export::describe(device);
                    send_export_info(writer, option, export_name, &export, &request.infos).await?;
                    option_reply(writer, option, REP_ACK, &[]).await?;
                    (option == OPT_GO).then_some(Handshake::Transmission(export))
                }
            },
            OPT_STRUCTURED_REPLY => {
                let message = b"structured replies are not supported";
                option_reply(writer, option, REP_ERR_UNSUP, message).await?;
                None
            }
            OPT_STARTTLS => {
                option_reply(writer, option, REP_ERR_UNSUP, b"TLS is not supported").await?;
                None
            }
            _ => {
                option_reply(writer, option, REP_ERR_UNSUP, b"option not supported").await?;
                None
            }
        };
        writer
            .flush()
            .await
            .map_err(io_error("sending an option reply"))?;
        if let Some(done) = done {
            return Ok(done);
        }
    }
}

/// Consumes and drops exactly `len` bytes.
async fn discard<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    len: u32,
    context: &'static str,
) -> Result<(), NbdError> {
    if len == 0 {
        return Ok(());
    }
    let mut limited = reader.take(u64::from(len));
    let skipped = tokio::io::copy_buf(&mut limited, &mut tokio::io::sink())
        .await
        .map_err(io_error(context))?;
    if skipped < u64::from(len) {
        return Err(NbdError::Io {
            context,
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Transmission.

/// A validated request, ready for the device.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Answer with this error without touching the device.
    Fail(u32),
}

/// A request travelling from the reader to the executor.
struct Job {
    cookie: u64,
    op: Op,
    /// Flow-control budget, released once the reply has been written.
    permit: OwnedSemaphorePermit,
}

/// A reply travelling from the executor to the writer.
struct Reply {
    cookie: u64,
    /// NBD error value (0 = success).
    error: u32,
    /// Read data (successful reads only).
    data: Option<Bytes>,
    /// Released when the reply has been written (or dropped).
    _permit: OwnedSemaphorePermit,
}

/// What the reader got from the stream.
enum Next {
    Job(Job),
    Disconnect,
    Eof,
}

/// Runs the transmission phase: reader, executor and writer side by side in
/// the current task.
async fn transmission<D, R, W>(
    device: &D,
    export: &Export,
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> Result<Summary, NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let budget = Arc::new(Semaphore::new(limits.budget_bytes.max(1) as usize));
    let (job_tx, job_rx) = mpsc::channel(limits.max_in_flight.max(1) as usize);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let writer_failed = Notify::new();
    let (read_result, (), write_result) = tokio::join!(
        read_requests(
            &mut reader,
            export,
            job_tx,
            &budget,
            limits,
            shutdown,
            &writer_failed
        ),
        execute_requests(device, job_rx, reply_tx),
        write_replies(writer, reply_rx, &writer_failed),
    );
    let summary = read_result?;
    write_result?;
    Ok(summary)
}

/// Reads requests and hands them to the executor until the client leaves,
/// the stream breaks, the writer fails or the server shuts down.
async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    export: &Export,
    jobs: mpsc::Sender<Job>,
    budget: &Arc<Semaphore>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    writer_failed: &Notify,
) -> Result<Summary, NbdError> {
    let mut requests = 0;
    let end = loop {
        // A request abandoned half-read here is never answered, which is
        // fine: the connection is going away.
        let next = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break End::Shutdown,
            () = writer_failed.notified() => break End::WriterFailed,
            next = read_request(reader, export, budget, limits) => next?,
        };
        match next {
            Next::Job(job) => {
                requests += 1;
                // The channel has room for every budgeted request, and the
                // executor only stops once this sender is gone.
                if jobs.send(job).await.is_err() {
                    return Err(NbdError::Internal("request executor stopped early"));
                }
            }
            Next::Disconnect => break End::Disconnect,
            Next::Eof => break End::Eof,
        }
    };
    Ok(Summary { requests, end })
}

/// Reads one request (header and payload) and validates it.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    export: &Export,
    budget: &Arc<Semaphore>,
    limits: Limits,
) -> Result<Next, NbdError> {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    if !read_header(reader, &mut raw).await? {
        return Ok(Next::Eof);
    }
    let header = RequestHeader::parse(&raw)
        .map_err(|magic| NbdError::Protocol(format!("bad request magic {magic:#010x}")))?;
    let plan = zebu_nbd::plan_request(&header, export.size, MAX_PAYLOAD);
    let payload = match plan {
        Plan::Disconnect => return Ok(Next::Disconnect),
        Plan::Read { len, .. } | Plan::Write { len, .. } => len,
        _ => 0,
    };
    let permit = Arc::clone(budget)
        .acquire_many_owned(limits.cost(payload))
        .await
        .map_err(|_| NbdError::Internal("request budget semaphore closed"))?;
    let op = match plan {
        Plan::Read { offset, len } => Op::Read { offset, len },
        Plan::Write { offset, len, fua } => Op::Write {
            offset,
            data: read_payload(reader, len).await?,
            fua,
        },
        Plan::Flush => Op::Flush,
        Plan::Trim { offset, len, fua } => Op::Trim { offset, len, fua },
        Plan::WriteZeroes { offset, len, fua } => Op::WriteZeroes { offset, len, fua },
        Plan::Reject { errno, reason } => {
            debug!(
                cookie = header.cookie,
                command = header.kind,
                flags = header.flags,
                offset = header.offset,
                len = header.len,
                errno,
                reason,
                "rejecting NBD request"
            );
            discard(
                reader,
                header.payload_len(),
                "skipping the payload of a rejected write",
            )
            .await?;
            Op::Fail(errno)
        }
        Plan::Disconnect => return Ok(Next::Disconnect),
    };
    Ok(Next::Job(Job {
        cookie: header.cookie,
        op,
        permit,
    }))
}

/// Reads a request header; `Ok(false)` on a clean end of stream before it.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8; REQUEST_HEADER_LEN],
) -> Result<bool, NbdError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader
            .read(&mut buf[filled..])
            .await
            .map_err(io_error("reading a request header"))?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(NbdError::Io {
                context: "reading a request header",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        filled += n;
    }
    Ok(true)
}

/// Reads exactly `len` payload bytes into one buffer, without zero-filling
/// or copying it.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> Result<Bytes, NbdError> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        let n = limited
            .read_buf(&mut buf)
            .await
            .map_err(io_error("reading a write payload"))?;
        if n == 0 {
            return Err(NbdError::Io {
                context: "reading a write payload",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
    Ok(buf.freeze())
}

/// Drives all in-flight requests concurrently and forwards their replies to
/// the writer as they complete. Ends when the reader has stopped and every
/// request it handed over has completed.
async fn execute_requests<D: BlockDevice>(
    device: &D,
    mut jobs: mpsc::Receiver<Job>,
    replies: mpsc::UnboundedSender<Reply>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut reader_open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if reader_open => match job {
                Some(job) => in_flight.push(execute(device, job)),
                None => reader_open = false,
            },
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                // The writer keeps receiving until this sender is dropped.
                let _ = replies.send(reply);
            }
            else => break,
        }
    }
}

/// Logs a failed device operation and maps it to an NBD error value.
fn device_failed(
    err: &DeviceError,
    operation: &'static str,
    offset: u64,
    len: u64,
    writing: bool,
) -> u32 {
    let errno = device_errno(err, writing);
    warn!(operation, offset, len, errno, error = %err, "NBD request failed");
    errno
}

/// Runs one request against the device.
async fn execute<D: BlockDevice>(device: &D, job: Job) -> Reply {
    let Job { cookie, op, permit } = job;
    let outcome: Result<Option<Bytes>, u32> = match op {
        Op::Fail(errno) => Err(errno),
        Op::Read { len: 0, .. } => Ok(None),
        Op::Read { offset, len } => match device.read(offset, len).await {
            Ok(data) if data.len() == len as usize => Ok(Some(data)),
            Ok(data) => {
                warn!(
                    offset,
                    len,
                    returned = data.len(),
                    "device returned a read of the wrong length"
                );
                Err(zebu_nbd::EIO)
            }
            Err(err) => Err(device_failed(&err, "read", offset, len.into(), false)),
        },
        Op::Write { data, .. } if data.is_empty() => Ok(None),
        Op::Write { offset, data, fua } => {
            let len = data.len() as u64;
            match device.write(offset, data, fua).await {
                Ok(()) => Ok(None),
                Err(err) => Err(device_failed(&err, "write", offset, len, true)),
            }
        }
        Op::Flush => match device.flush().await {
            Ok(()) => Ok(None),
            Err(err) => Err(device_failed(&err, "flush", 0, 0, true)),
        },
        Op::Trim { len: 0, .. } => Ok(None),
        Op::Trim { offset, len, fua } => match device.trim(offset, len).await {
            Ok(()) if fua => match device.flush().await {
                Ok(()) => Ok(None),
                Err(err) => Err(device_failed(
                    &err,
                    "flush after trim",
                    offset,
                    len.into(),
                    true,
                )),
            },
            Ok(()) => Ok(None),
            // Trim is advisory: a device that cannot discard simply keeps the data.
            Err(DeviceError::Unsupported(_)) => Ok(None),
            Err(err) => Err(device_failed(&err, "trim", offset, len.into(), false)),
        },
        Op::WriteZeroes { len: 0, .. } => Ok(None),
        Op::WriteZeroes { offset, len, fua } => match device.write_zeroes(offset, len, fua).await {
            Ok(()) => Ok(None),
            Err(err) => Err(device_failed(
                &err,
                "write zeroes",
                offset,
                len.into(),
                true,
            )),
        },
    };
    let (error, data) = match outcome {
        Ok(data) => (0, data),
        Err(errno) => (errno, None),
    };
    Reply {
        cookie,
        error,
        data,
        _permit: permit,
    }
}

/// Writes replies in the order they complete, flushing once per batch of
/// ready replies. After a write error, keeps draining (and dropping) replies
/// so in-flight requests can finish, then reports the error.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: BufWriter<W>,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    writer_failed: &Notify,
) -> Result<(), NbdError> {
    let mut failure = None;
    while let Some(reply) = replies.recv().await {
        if failure.is_some() {
            continue;
        }
        let mut result = write_reply(&mut writer, reply).await;
        while result.is_ok() {
            match replies.try_recv() {
                Ok(reply) => result = write_reply(&mut writer, reply).await,
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = writer.flush().await;
        }
        if let Err(source) = result {
            writer_failed.notify_one();
            failure = Some(NbdError::Io {
                context: "writing replies",
                source,
            });
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    // Every reply is out; close our side. The client may already be gone.
    if let Err(err) = writer.shutdown().await {
        debug!(error = %err, "closing the NBD connection");
    }
    Ok(())
}

/// Buffers one simple reply; read data goes out in the same vectored write as
/// its header.
async fn write_reply<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    reply: Reply,
) -> io::Result<()> {
    let header = zebu_nbd::simple_reply_header(reply.error, reply.cookie);
    match reply.data {
        Some(data) if !data.is_empty() => {
            let mut buf = Buf::chain(&header[..], data);
            writer.write_all_buf(&mut buf).await
        }
        _ => writer.write_all(&header).await,
    }
}

/// Maps a device error to an NBD error value. `writing` selects `zebu_nbd::ENOSPC`
/// rather than `zebu_nbd::EINVAL` for out-of-range errors, as the spec recommends.
fn device_errno(err: &DeviceError, writing: bool) -> u32 {
    match err {
        DeviceError::Io(_) => zebu_nbd::EIO,
        DeviceError::NoSpace => zebu_nbd::ENOSPC,
        DeviceError::Invalid(_) => zebu_nbd::EINVAL,
        DeviceError::OutOfRange { .. } if writing => zebu_nbd::ENOSPC,
        DeviceError::OutOfRange { .. } => zebu_nbd::EINVAL,
        DeviceError::ReadOnly => zebu_nbd::EPERM,
        DeviceError::Unsupported(_) => zebu_nbd::ENOTSUP,
        DeviceError::ShuttingDown => zebu_nbd::ESHUTDOWN,
    }
}
