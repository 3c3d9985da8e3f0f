//! Generated protocol code for Zebu, and the small conventions every Zebu
//! program shares.
//!
//! - [`replica`]: the replica's data-path stream and control calls.
//! - [`engine`]: the engine's control calls.
//! - [`agent`]: the node agent (process supervision) and node registry.
//! - [`csi`]: the Container Storage Interface the CSI driver serves.
//! - [`size`]: parsing of human-readable sizes.

pub mod size;

/// `zebu.replica.v1`: the replica API.
#[allow(missing_docs, clippy::all)]
pub mod replica {
    tonic::include_proto!("zebu.replica.v1");
}

/// `zebu.engine.v1`: the engine control API.
#[allow(missing_docs, clippy::all)]
pub mod engine {
    tonic::include_proto!("zebu.engine.v1");
}

/// `zebu.agent.v1`: the node agent's API and the controller's node registry.
#[allow(missing_docs, clippy::all)]
pub mod agent {
    tonic::include_proto!("zebu.agent.v1");
}

/// `csi.v1`: the Container Storage Interface (spec v1.12) that Kubernetes
/// uses to talk to the Zebu CSI driver.
#[allow(missing_docs, clippy::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Largest gRPC message any Zebu endpoint sends or accepts (a batch of
/// requests or one 32 MiB I/O with headroom).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
