//! Client of a replica's control API, shared by the engine (membership,
//! rebuild, snapshots, scrub) and the CSI controller (restoring and cloning
//! snapshots into new volumes).
//!
//! - [`control`]: one connection, bounded calls, errors that name the replica.
//! - [`sync`]: making layers of one replica equal to another's, moving only the
//!   blocks whose CRCs differ.
//!
//! The data stream (`Io`) is not here: only the engine writes, and its link
//! (`zebu_engine::link`) owns that stream.

pub mod control;
pub mod sync;

pub use control::{ClientError, Control, LONG_CALL_TIMEOUT};
