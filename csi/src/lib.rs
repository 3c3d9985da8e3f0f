//! Zebu CSI driver: the Controller, Node and Identity services, the state
//! store, and attaching volumes on a node. The node agent (`zebu-agent`), the
//! CLI (`zebu-cli`), the FUSE bridge (`zebu-nbd-fuse`) and what they share
//! with the driver (`zebu-common`) are crates of their own beside this one.
//!
//! - [`store`]: the control plane's state store (volumes, snapshots, nodes).
//! - [`agent_secret`]: the Secret holding the node agents' token in a cluster.
//! - [`attach`]: the node side — attach an NBD export as a block device
//!   (Zebu's FUSE bridge + loop), make a filesystem only if blank, mount / bind /
//!   unmount, grow, volume statistics.
//! - [`controller`]: the CSI Controller service, replica placement, the
//!   reconcile loop.
//! - [`identity`]: the CSI Identity service.
//! - [`leader`]: leader election on a Lease among controllers.
//! - [`inflight`]: one operation per volume at a time (ABORTED otherwise).
//! - [`node`]: the CSI Node service (stage, publish, stats, expand).
//! - [`registry`]: where node agents announce themselves to the controller.

pub mod agent_secret;
pub mod attach;
pub mod controller;
pub mod identity;
pub mod inflight;
pub mod kubelet;
pub mod leader;
pub mod node;
pub mod node_lease;
pub mod registry;
pub mod store;
