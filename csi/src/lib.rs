//! Zebu CSI driver, node agent and `zebu` CLI.
//!
//! Not built yet: this crate holds the place the CSI issue fills.
//!
//! - [`store`]: the control plane's state store (volumes, snapshots, nodes).

pub mod store;
