//! The vocabulary of block I/O that both backends ([`crate::io`]'s thread
//! pool and [`crate::uring`]'s ring) execute: an operation on a file, its
//! completion, and the request that carries one to a backend.

use std::fs::File;
use std::io;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::buf::AlignedBuf;

/// One I/O operation on a file.
pub enum Op {
    /// Fill `buf` from `offset`.
    Read {
        /// File to read.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Destination; its length is the read length.
        buf: AlignedBuf,
    },
    /// Write `buf` at `offset`.
    Write {
        /// File to write.
        file: Arc<File>,
        /// Byte offset.
        offset: u64,
        /// Payload, aligned for O_DIRECT.
        buf: AlignedBuf,
    },
    /// fdatasync the file.
    Fsync {
        /// File to sync.
        file: Arc<File>,
    },
    /// Write `pages`'s dirty pages back and wait for them
    /// (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`: no
    /// metadata, no cache flush of the disk), then fdatasync `data`, whose
    /// cache flush of the same disk makes both durable (for `pages` written
    /// on disk before: see `crcmap`). The fdatasync runs even when the
    /// write-back failed; the result is the first failure. io_uring runs the
    /// two as one linked chain, with no trip back to the replica between.
    WriteBackThenSync {
        /// File whose dirty pages are written back (a CRC file).
        pages: Arc<File>,
        /// File to fdatasync (the data file on the same disk).
        data: Arc<File>,
    },
}

impl Op {
    /// The operation's buffer, if it has one.
    pub fn buf(&self) -> Option<&AlignedBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Fsync { .. } | Op::WriteBackThenSync { .. } => None,
        }
    }
}

/// Result of a completed [`Op`].
#[derive(Debug)]
pub enum Completion {
    /// The filled read buffer.
    Read(AlignedBuf),
    /// A write completed in full.
    Write,
    /// The file's data is durable (for [`Op::WriteBackThenSync`]: both
    /// files').
    Fsync,
}

/// An operation and where to send its result.
pub struct Request {
    /// The operation.
    pub op: Op,
    /// Receives the result.
    pub done: oneshot::Sender<io::Result<Completion>>,
}
