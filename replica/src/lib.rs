//! Zebu replica: a layered, checksummed sparse block store on io_uring,
//! served over gRPC.
//!
//! - [`store`]: the layer chain and every operation on it.
//! - [`layer`]: one layer's files and index; [`extent`]: the index;
//!   [`crcmap`]: the CRC file mapped into memory (its `unsafe` is the
//!   mapping's lifetime and the file's write-back); [`writeback`]: when a
//!   write starts its CRC pages' write-back ahead of the FLUSH.
//! - [`io`]: the I/O backends, taking [`op`]s; [`uring`]: the io_uring
//!   ring; [`buf`]: aligned buffers and the registered arena (with `uring`,
//!   all other `unsafe`).
//! - [`meta`]: the metadata record in sled; [`order`]: overlapping writes
//!   applied in the order they arrived; [`session`]: which data stream may
//!   still change data (every `Open` supersedes the streams before it).
//! - [`status`]: the gRPC status of a store error, for every handler.
//! - [`server`]: the gRPC service (its messages decoded and encoded by
//!   [`zebu_proto::wire`]); [`pull`]: writing a layer during a sync,
//!   from the engine's stream or pulled from a peer replica.

pub mod buf;
pub mod crcmap;
pub mod extent;
pub mod io;
pub mod layer;
pub mod meta;
pub mod op;
pub mod order;
pub mod pull;
pub mod server;
pub mod session;
pub mod status;
pub mod store;
pub mod uring;
pub mod writeback;
