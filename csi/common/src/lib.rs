//! What the driver, the node agent, the `zebu` CLI and the FUSE bridge
//! share: bearer tokens on the agent's API ([`auth`]), gRPC endpoints served and dialled the same way ([`grpc`]), records
//! written atomically and durably ([`durable`]), `/proc` parsing
//! ([`procfs`]), a cgroup outside the plugin's container for data-path
//! processes ([`cgroup`]), waiting for a child's ready line ([`supervise`]) and the names the driver's services and the CLI agree on
//! ([`context`]).

pub mod auth;
pub mod cgroup;
pub mod context;
pub mod durable;
pub mod grpc;
pub mod procfs;
pub mod supervise;
