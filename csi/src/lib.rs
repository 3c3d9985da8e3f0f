//! Zebu CSI driver, node agent and `zebu` CLI — being built.
//!
//! What exists so far are the pieces the driver is made of:
//!
//! - [`store`]: the control plane's state store (volumes, snapshots, nodes).
//! - [`attach`]: the node side — attach an NBD export as a block device
//!   (`nbdfuse` + loop), make a filesystem only if blank, mount / bind /
//!   unmount, grow, volume statistics.

pub mod attach;
pub mod store;
