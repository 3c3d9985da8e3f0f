//! Frontends that export the volume as a block device.
//!
//! A frontend speaks a block protocol to clients (NBD, see [`nbd`]; a file on
//! a FUSE mount for a loop device, see [`file`]) and forwards every I/O to a
//! [`BlockDevice`]. Frontends know nothing about
//! replication: the engine plugs its replicated volume in by implementing
//! [`BlockDevice`].
//!
//! # API
//!
//! ```text
//! pub trait BlockDevice: Send + Sync + 'static {
//!     fn size(&self) -> u64;
//!     fn block_size(&self) -> u32;
//!     fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;
//!     fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
//!     fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
//!     fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;
//!     fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
//!     fn multi_conn_safe(&self) -> bool;
//! }
//! pub enum DeviceError { Io(String), NoSpace, Invalid(String), OutOfRange { offset, len },
//!                        ReadOnly, Unsupported(String), ShuttingDown }
//! ```
//!
//! The NBD server entry points live in [`nbd`]: [`nbd::bind`] /
//! [`nbd::Listener::bind`] for `unix:PATH` and `tcp:HOST:PORT` addresses and
//! [`nbd::serve`] to run the server until a shutdown future resolves.
//!
//! # Contract between a frontend and its device
//!
//! * Requests are byte-granular: `offset` and `len` need not be multiples of
//!   [`BlockDevice::block_size`], which is only a hint advertised to clients.
//! * Frontends validate every request against the size they advertised to the
//!   client (read once per handshake), so a device only sees in-range requests
//!   unless it shrank meanwhile; it should still return
//!   [`DeviceError::OutOfRange`] rather than misbehave in that case.
//! * Calls may be concurrent: several connections, and many pipelined requests
//!   per connection. No ordering is imposed between requests that are in flight
//!   at the same time (as for any block device, the client orders dependent
//!   I/O by waiting for completions).
//! * A successful [`BlockDevice::flush`] makes durable every write whose future
//!   resolved `Ok` before the flush was issued. With `fua = true`, a write must
//!   be durable when its future resolves.
//! * The futures returned by the device are polled by the connection's task
//!   (no task is spawned per request), so they should not block the thread;
//!   CPU-heavy or blocking work belongs on another task. They are normally
//!   driven to completion even if the client disconnects; they are dropped
//!   early only when the task running the server is itself aborted or the
//!   runtime shuts down.

use std::future::Future;

use bytes::Bytes;

pub mod file;
pub mod nbd;

/// What a frontend serves: a block device of fixed size.
///
/// The size is re-read at each client handshake, so growth is seen by clients
/// when they reconnect.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size of the device in bytes.
    fn size(&self) -> u64;

    /// Preferred/minimum I/O granularity advertised to clients (4096 for Zebu).
    ///
    /// The device must still accept any byte-aligned request. Frontends may
    /// round values that their protocol cannot express (e.g. NBD requires a
    /// power of two of at least 512).
    fn block_size(&self) -> u32;

    /// Reads `len` bytes at `offset`. The returned buffer must be exactly
    /// `len` bytes long (a frontend reports a short buffer as an I/O error).
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;

    /// Writes `data` at `offset`. With `fua` (force unit access) the data must
    /// be durable when the future resolves.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Hints that `len` bytes at `offset` are no longer needed. The contents
    /// of the range are unspecified afterwards (until overwritten).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Writes `len` zero bytes at `offset`, durably if `fua` is set.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// True when a flush on one connection covers writes completed on every
    /// connection (allows NBD_FLAG_CAN_MULTI_CONN).
    fn multi_conn_safe(&self) -> bool;

    /// A client connected (called before its handshake).
    fn client_connected(&self) {}

    /// A client's connection ended, however it ended.
    fn client_disconnected(&self) {}
}

/// Why a [`BlockDevice`] operation failed.
///
/// Frontends translate these into protocol error codes (for NBD: `Io` →
/// `EIO`, `NoSpace` → `ENOSPC`, `Invalid` → `EINVAL`, `OutOfRange` → `EINVAL`
/// for reads/trims and `ENOSPC` for writes, `ReadOnly` → `EPERM`,
/// `Unsupported` → `ENOTSUP`, `ShuttingDown` → `ESHUTDOWN`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The I/O failed; the string says what was being done.
    #[error("I/O error: {0}")]
    Io(String),
    /// The backing store is out of space (or quota).
    #[error("no space left on device")]
    NoSpace,
    /// The request is malformed for this device.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The byte range `offset..offset + len` is not inside the device.
    #[error("range {offset}+{len} is outside the device")]
    OutOfRange {
        /// First byte of the rejected range.
        offset: u64,
        /// Length of the rejected range in bytes.
        len: u64,
    },
    /// The device does not accept writes.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    Unsupported(String),
    /// The device is shutting down and accepts no more I/O.
    #[error("device is shutting down")]
    ShuttingDown,
}

impl From<std::io::Error> for DeviceError {
    /// Maps out-of-space conditions (`ENOSPC`, `EDQUOT`, `EFBIG`) to
    /// [`DeviceError::NoSpace`], `EROFS` to [`DeviceError::ReadOnly`] and
    /// everything else to [`DeviceError::Io`].
    fn from(err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => DeviceError::NoSpace,
            Some(libc::EROFS) => DeviceError::ReadOnly,
            _ => DeviceError::Io(err.to_string()),
        }
    }
}
