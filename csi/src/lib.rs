//! Zebu CSI driver, node agent and `zebu` CLI.
//!
//! - [`store`]: the control plane's state store (volumes, snapshots, nodes).
//! - [`attach`]: the node side — attach an NBD export as a block device
//!   (Zebu's FUSE bridge + loop), make a filesystem only if blank, mount / bind /
//!   unmount, grow, volume statistics.
//! - [`context`]: the driver name and the keys of CSI context maps.
//! - [`durable`]: small files replaced atomically and durably (every
//!   record the driver, agent, CLI and bridge keep on disk).
//! - [`grpc`]: serving and dialling gRPC over Unix sockets and TCP.
//! - [`controller`]: the CSI Controller service, replica placement, the
//!   reconcile loop.
//! - [`identity`]: the CSI Identity service.
//! - [`inflight`]: one operation per volume at a time (ABORTED otherwise).
//! - [`node`]: the CSI Node service (stage, publish, stats, expand).
//! - [`procfs`]: whether a recorded pid is still the process we started.
//! - [`registry`]: where node agents announce themselves to the controller.
//! - [`cli`]: the `zebu` command line (volumes, snapshots, attach/detach,
//!   replica status) over the driver's CSI socket.
//! - [`agent`]: the node agent — replica directories on the node's disks,
//!   supervised `zebu-replica` / `zebu-engine` processes, the `Agent` gRPC API.

pub mod agent;
pub mod attach;
pub mod cli;
pub mod context;
pub mod controller;
pub mod durable;
pub mod grpc;
pub mod identity;
pub mod inflight;
pub mod node;
pub mod procfs;
pub mod registry;
pub mod store;
