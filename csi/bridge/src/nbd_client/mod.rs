//! A small asynchronous NBD client: fixed newstyle handshake with
//! `NBD_OPT_GO`, then `READ`, `WRITE`, `FLUSH`, `TRIM` and `WRITE_ZEROES`
//! with simple replies, pipelined on each connection and spread over a pool
//! of connections.
//!
//! Written against Zebu's engine (`engine/src/frontend/nbd.rs`) and nbdkit;
//! it follows <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//!
//! The code is split by concern: `uri` (parsing NBD URIs), `handshake`
//! (connecting and negotiating the export; [`probe`]), `conn` (one pipelined
//! connection) and `pool` (the [`NbdPool`] callers use).
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

use std::io;

use bytes::{BufMut, BytesMut};
use zebu_nbd::RequestHeader;
pub use zebu_nbd::{
    TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
};

mod conn;
mod handshake;
mod pool;
mod uri;

pub use conn::Done;
pub use handshake::{ExportInfo, probe};
pub use pool::NbdPool;
pub use uri::{NbdAddress, NbdUri};

/// Largest payload (or TRIM/WRITE_ZEROES length) sent in one request; longer
/// operations are split. Zebu's engine accepts 32 MiB, nbdkit 64 MiB.
pub const MAX_REQUEST: u32 = 16 * 1024 * 1024;
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

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { context, source }
}

/// Encodes a request header into `buf`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_map_to_errno() {
        assert_eq!(NbdError::Server { errno: 28 }.errno(), libc::ENOSPC);
        assert_eq!(NbdError::Server { errno: 0 }.errno(), libc::EIO);
        assert_eq!(NbdError::Disconnected("x".into()).errno(), libc::EIO);
    }
}
