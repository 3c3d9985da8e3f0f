//! The agent's errors, and the gRPC status each one becomes.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::MAX_SOCKET_PATH;

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field is unusable (bad id, size 0, bad address...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The disk is not one of the node's disks.
    #[error("disk {disk:?} is not a disk of this node; use one of: {}", valid.join(", "))]
    UnknownDisk {
        /// As requested.
        disk: String,
        /// The configured disks.
        valid: Vec<String>,
    },
    /// The id is taken by something else.
    #[error("{0}")]
    AlreadyExists(String),
    /// The engine's NBD socket path would not fit in `sun_path`.
    #[error(
        "NBD socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} a Unix socket \
         allows: use a shorter state directory or volume id"
    )]
    SocketPathTooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A binary was not found.
    #[error(
        "cannot find the {name} binary next to this executable or on $PATH (searched {searched}): \
         install it or configure its path"
    )]
    BinaryNotFound {
        /// The binary's file name.
        name: String,
        /// Directories searched.
        searched: String,
    },
    /// The configuration is unusable.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// Spawning a process failed.
    #[error("cannot start {what} ({program}): {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// The binary.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The process exited before reporting ready.
    #[error("{what} {status} before it was ready; last lines of {}:\n{tail}", log.display())]
    Exited {
        /// Which process.
        what: String,
        /// `exited with status N` / `killed by signal N`.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of what this run logged.
        tail: String,
    },
    /// The process did not report ready in time (it was killed).
    #[error("{what} was not ready after {timeout:?} and was killed; last lines of {}:\n{tail}", log.display())]
    NotReady {
        /// Which process.
        what: String,
        /// How long it had.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
        /// The end of what this run logged.
        tail: String,
    },
    /// A start was abandoned because the process is being stopped.
    #[error("start of {0} abandoned: it is being stopped")]
    Cancelled(String),
    /// The agent was shut down.
    #[error("the node agent is shutting down")]
    ShuttingDown,
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A record file is not valid JSON of the expected shape.
    #[error("process record {}: {source}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A bug or an unexpected runtime failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            AgentError::InvalidArgument(_)
            | AgentError::UnknownDisk { .. }
            | AgentError::SocketPathTooLong { .. } => Code::InvalidArgument,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::BinaryNotFound { .. } | AgentError::Config(_) => Code::FailedPrecondition,
            AgentError::Exited { .. } | AgentError::NotReady { .. } | AgentError::ShuttingDown => {
                Code::Unavailable
            }
            AgentError::Cancelled(_) => Code::Aborted,
            AgentError::Spawn { .. }
            | AgentError::Io { .. }
            | AgentError::Record { .. }
            | AgentError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
