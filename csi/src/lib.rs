//! Zebu CSI driver, node agent and `zebu` CLI.
//!
//! Not built yet: this crate holds the place the CSI issue fills.
