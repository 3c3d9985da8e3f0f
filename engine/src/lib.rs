//! Zebu engine: the per-volume replication core and its NBD frontend.
//!
//! - [`replication`]: the sans-IO state machine (modes, in-flight table,
//!   revisions, ejection rules).
//! - [`volume`]: the async layer around it: replica links, the block device
//!   the frontend serves, snapshots, expansion, replica admission, scrubs
//!   (by hand and on schedule).
//! - [`link`]: control connection and data stream to one replica;
//!   [`batch`]: the stream's requests framed as gRPC messages without
//!   copying large payloads.
//! - [`rebuild`]: CRC-diff layer copy between replicas (rebuild, resync).
//! - [`frontend`]: the NBD server, and the volume as a file on a FUSE mount
//!   (for a loop device).
//! - [`control`]: the control gRPC service and status rendering.
//! - [`stats`]: I/O counters and latency percentiles.

pub mod batch;
pub mod control;
pub mod frontend;
pub mod link;
pub mod replication;
pub mod stats;
pub mod volume;
