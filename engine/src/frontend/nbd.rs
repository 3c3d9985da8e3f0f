//! NBD (Network Block Device) server exporting one [`BlockDevice`].
//!
//! Implements the server side of the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) on
//! tokio, over unix or TCP sockets. This file runs connections within their
//! limits; `listen` binds and accepts, `handshake` negotiates an export,
//! `transmission` serves requests; the wire format is `zebu_nbd`'s.
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

mod handshake;
mod listen;
#[cfg(test)]
mod tests;
mod transmission;

use handshake::*;
use listen::*;
pub use listen::{ListenAddr, Listener, bind};
use transmission::*;

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
