//! The volume as one file on a private FUSE mount (`zebu_fuse_file`), for a
//! loop device to sit on: the node's block device with no other process and
//! no socket between the kernel and the engine.
//!
//! ```text
//! /dev/loopN ─ MOUNTDIR/NAME (FUSE session thread) ─ BlockDevice (engine runtime) ─ replicas
//! ```
//!
//! # Invariants
//!
//! * The FUSE session thread never waits for I/O: it checks a request
//!   (`zebu_fuse_file` does), copies a write's payload once into a
//!   [`Bytes`], queues it for the engine's runtime and reads the next one.
//!   One task on the runtime drains the queue and drives every queued
//!   request's device future (as an NBD connection's task does), replying
//!   to the kernel when the device answers. The queue wakes that task only
//!   when it waits, so requests the kernel sends together reach the device
//!   together (one wake-up, one batch per replica link), not one task and
//!   one wake-up each.
//! * An open of the file counts as a client of the device (as an NBD
//!   connection does) until it is released, so a revert is refused while a
//!   loop device holds the file.
//! * After the device grew, the kernel's cached size is dropped (the file
//!   shows the new size at the next `stat`); the device never shrinks.
//! * Errors map to what a file user understands: the device's I/O error is
//!   `EIO`, out of space `ENOSPC`, read-only `EROFS`, shutting down
//!   `ESHUTDOWN`.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tracing::warn;
use zebu_fuse_file::{Errno, FileError, ReplyData, ReplyEmpty, ReplyWrite};

use super::{BlockDevice, DeviceError};

/// The largest write-zeroes the device is asked for at once (a multiple of
/// any block size, below `u32::MAX`).
const MAX_ZEROES: u64 = 1 << 30;

/// A request on its way from the session thread to the runtime.
enum Op {
    Read {
        offset: u64,
        len: u32,
        reply: ReplyData,
    },
    Write {
        offset: u64,
        data: Bytes,
        reply: ReplyWrite,
    },
    Flush {
        reply: ReplyEmpty,
    },
    Zeroes {
        offset: u64,
        len: u64,
        reply: ReplyEmpty,
    },
}

struct DeviceFile<D> {
    device: Arc<D>,
    queue: mpsc::UnboundedSender<Op>,
}

impl<D> DeviceFile<D> {
    fn queue(&self, op: Op) {
        // The runtime is gone only while the engine exits.
        if let Err(mpsc::error::SendError(op)) = self.queue.send(op) {
            match op {
                Op::Read { reply, .. } => reply.error(Errno::ESHUTDOWN),
                Op::Write { reply, .. } => reply.error(Errno::ESHUTDOWN),
                Op::Flush { reply } | Op::Zeroes { reply, .. } => reply.error(Errno::ESHUTDOWN),
            }
        }
    }
}

/// Drives every queued request on `device` until the session ends (its
/// sender dropped) and the last request is answered.
async fn serve<D: BlockDevice>(device: Arc<D>, mut queue: mpsc::UnboundedReceiver<Op>) {
    let mut running = FuturesUnordered::new();
    let mut arrived = Vec::with_capacity(64);
    loop {
        tokio::select! {
            biased;
            n = queue.recv_many(&mut arrived, 256) => {
                if n == 0 {
                    break;
                }
                running.extend(arrived.drain(..).map(|op| execute(device.as_ref(), op)));
            }
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

async fn execute<D: BlockDevice>(device: &D, op: Op) {
    match op {
        Op::Read { offset, len, reply } => match device.read(offset, len).await {
            Ok(data) if data.len() == len as usize => reply.data(&data),
            Ok(data) => {
                warn!(
                    offset,
                    len,
                    got = data.len(),
                    "read: short buffer from the device"
                );
                reply.error(Errno::EIO);
            }
            Err(e) => {
                warn!(offset, len, "read: {e}");
                reply.error(errno(&e, false));
            }
        },
        Op::Write {
            offset,
            data,
            reply,
        } => {
            let len = data.len();
            match device.write(offset, data, false).await {
                // `zebu_fuse_file` passes only writes whose length fits a u32.
                Ok(()) => reply.written(len as u32),
                Err(e) => {
                    warn!(offset, len, "write: {e}");
                    reply.error(errno(&e, true));
                }
            }
        }
        Op::Flush { reply } => match device.flush().await {
            Ok(()) => reply.ok(),
            Err(e) => {
                warn!("flush: {e}");
                reply.error(errno(&e, true));
            }
        },
        Op::Zeroes { offset, len, reply } => {
            let end = offset + len;
            let mut at = offset;
            while at < end {
                let n = MAX_ZEROES.min(end - at);
                if let Err(e) = device.write_zeroes(at, n as u32, false).await {
                    warn!(offset = at, len = n, "zeroing: {e}");
                    reply.error(errno(&e, true));
                    return;
                }
                at += n;
            }
            reply.ok();
        }
    }
}

fn errno(e: &DeviceError, writing: bool) -> Errno {
    match e {
        DeviceError::Io(_) => Errno::EIO,
        DeviceError::NoSpace => Errno::ENOSPC,
        DeviceError::Invalid(_) => Errno::EINVAL,
        DeviceError::OutOfRange { .. } if writing => Errno::ENOSPC,
        DeviceError::OutOfRange { .. } => Errno::EINVAL,
        DeviceError::ReadOnly => Errno::EROFS,
        DeviceError::Unsupported(_) => Errno::EOPNOTSUPP,
        DeviceError::ShuttingDown => Errno::ESHUTDOWN,
    }
}

impl<D: BlockDevice> zebu_fuse_file::Backend for DeviceFile<D> {
    fn size(&self) -> u64 {
        self.device.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, len: u64, reply: ReplyData) {
        // The kernel asks for at most `max_read` (a u32) bytes at once.
        match u32::try_from(len) {
            Ok(len) => self.queue(Op::Read { offset, len, reply }),
            Err(_) => reply.error(Errno::EINVAL),
        }
    }

    fn write(&self, offset: u64, data: &[u8], reply: ReplyWrite) {
        // The session's buffer is reused for the next request: copy it once.
        let data = Bytes::copy_from_slice(data);
        self.queue(Op::Write {
            offset,
            data,
            reply,
        });
    }

    fn flush(&self, reply: ReplyEmpty) {
        self.queue(Op::Flush { reply });
    }

    fn write_zeroes(&self, offset: u64, len: u64, reply: ReplyEmpty) {
        self.queue(Op::Zeroes { offset, len, reply });
    }

    fn opened(&self) {
        self.device.client_connected();
    }

    fn released(&self) {
        self.device.client_disconnected();
    }
}

/// The volume served as a file: [`FileFrontend::stop`] unmounts it.
pub struct FileFrontend {
    unmounter: zebu_fuse_file::Unmounter,
    sizes: tokio::task::JoinHandle<()>,
}

impl FileFrontend {
    /// Mounts `file`'s directory and serves `device` as `file` from a thread
    /// of its own, its I/O running on `rt`; `sizes` says when the device
    /// grew. The file is usable when this returns.
    pub fn start<D: BlockDevice>(
        device: Arc<D>,
        file: &Path,
        rt: Handle,
        mut sizes: watch::Receiver<u64>,
    ) -> Result<FileFrontend, FileError> {
        let (queue, requests) = mpsc::unbounded_channel();
        let backend = Arc::new(DeviceFile {
            device: Arc::clone(&device),
            queue,
        });
        let mut mounted = zebu_fuse_file::mount(backend, file, "zebu-engine")?;
        let notifier = mounted.notifier();
        let unmounter = mounted.unmounter();
        let shown = file.display().to_string();
        std::thread::Builder::new()
            .name("zebu-engine-fuse".into())
            .spawn(move || {
                if let Err(e) = mounted.run() {
                    tracing::error!(file = %shown, "serving the file stopped: {e}");
                }
            })
            .map_err(FileError::Serve)?;
        rt.spawn(serve(device, requests));
        let sizes = rt.spawn(async move {
            sizes.mark_unchanged();
            while sizes.changed().await.is_ok() {
                notifier.size_changed();
            }
        });
        Ok(FileFrontend { unmounter, sizes })
    }

    /// Unmounts the file (lazily while a loop device still holds it: the
    /// engine then answers its I/O until it exits).
    pub async fn stop(mut self) {
        self.sizes.abort();
        let _ = tokio::task::spawn_blocking(move || self.unmounter.unmount()).await;
    }
}
