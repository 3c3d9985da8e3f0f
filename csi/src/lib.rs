//! Zebu CSI driver, node agent and `zebu` CLI.
//!
//! - [`store`]: the control plane's state store (volumes, snapshots, nodes).
//! - [`attach`]: the node side — attach an NBD export as a block device
//!   (`nbdfuse` + loop), make a filesystem only if blank, mount / bind /
//!   unmount, grow, volume statistics.
//! - [`context`]: the driver name and the keys of CSI context maps.
//! - [`grpc`]: serving and dialling gRPC over Unix sockets and TCP.
//! - [`agent`]: the node agent — replica directories on the node's disks,
//!   supervised `zebu-replica` / `zebu-engine` processes, the `Agent` gRPC API.

pub mod agent;
pub mod attach;
pub mod context;
pub mod grpc;
pub mod store;
