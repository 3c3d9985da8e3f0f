//! The io_uring ring thread and the aligned buffers O_DIRECT needs.
//!
//! Architecture invariant: this is the only module of the replica that
//! contains `unsafe` code. Every `unsafe` block carries a `SAFETY:` comment.
//!
//! One dedicated thread owns the ring. Callers hand it [`Request`]s through a
//! channel; the thread pushes them as submission-queue entries in batches,
//! submits them with one `io_uring_enter`, and sends each result back on the
//! request's oneshot channel. An eventfd read is always armed on the ring so
//! that new requests wake the thread while it waits for completions; the
//! eventfd is only written when the thread has announced it is about to sleep,
//! so a busy ring costs no extra syscalls per request.
//!
//! Invariant: the buffer and the file of every submitted entry are owned by
//! the in-flight table until the kernel posts the entry's completion; nothing
//! the kernel may still read or write is freed or moved before that.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::io::{Completion, Op, Request};

/// Alignment of every [`AlignedBuf`]: what O_DIRECT needs on any device.
pub const ALIGN: usize = 4096;

/// A heap buffer aligned to [`ALIGN`] bytes: zero-filled by [`AlignedBuf::zeroed`],
/// a copy of the source by [`AlignedBuf::copy_from`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Vec<u8>); no
// interior mutability, so moving it to or sharing it with other threads is
// sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; shared references only allow reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout_for(len);
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data` (not zero-filled first: every
    /// byte the buffer exposes is written by the copy).
    pub fn copy_from(data: &[u8]) -> Self {
        let layout = Self::layout_for(data.len());
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds at least data.len() bytes, is freshly
        // allocated so it cannot overlap `data`, and after the copy the first
        // data.len() bytes (all that as_slice exposes) are initialised.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        AlignedBuf {
            ptr,
            len: data.len(),
            layout,
        }
    }

    fn layout_for(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(ALIGN);
        match Layout::from_size_align(size, ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("buffer of {len} bytes is too large to allocate"),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of at least `len` initialised
        // (zeroed) bytes that lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Turns the buffer into `Bytes` without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout
        // and is freed only here, once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Submission-queue depth of the ring.
const RING_ENTRIES: u32 = 512;
/// Most requests in flight in the kernel at once.
const MAX_IN_FLIGHT: usize = 1024;
/// user_data of the eventfd read that wakes the ring thread.
const WAKE_TOKEN: u64 = u64::MAX;

struct Shared {
    sleeping: AtomicBool,
    wake: EventFd,
}

/// Handle to the ring thread; dropping it lets the thread finish the
/// requests in flight and exit.
pub struct Ring {
    tx: Option<mpsc::Sender<Request>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ring {
    /// Sets up a ring and starts its thread. Fails (typically with EPERM or
    /// ENOSYS) where io_uring is unavailable, e.g. under a seccomp profile.
    pub fn new() -> io::Result<Self> {
        let ring: IoUring<squeue::Entry> = IoUring::builder().build(RING_ENTRIES)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            sleeping: AtomicBool::new(false),
            wake,
        });
        let (tx, rx) = mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("zebu-ring".into())
            .spawn(move || ring_loop(ring, rx, thread_shared))?;
        Ok(Ring {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Queues requests; their results arrive on their oneshot channels.
    pub fn submit(&self, reqs: impl IntoIterator<Item = Request>) {
        let Some(tx) = &self.tx else { return };
        for req in reqs {
            if let Err(mpsc::SendError(req)) = tx.send(req) {
                let _ = req
                    .done
                    .send(Err(io::Error::other("the io_uring thread has stopped")));
            }
        }
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.shared.wake.write(1);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.tx.take();
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct InFlight {
    req: Request,
    expected: usize,
}

fn entry_for(req: &mut Request, token: u64) -> (squeue::Entry, usize) {
    match &mut req.op {
        Op::Read { file, offset, buf } => {
            let len = buf.len();
            let e = opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                buf.as_mut_slice().as_mut_ptr(),
                len as u32,
            )
            .offset(*offset)
            .build();
            (e.user_data(token), len)
        }
        Op::Write { file, offset, buf } => {
            let data = buf.as_slice();
            let e = opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                data.as_ptr(),
                data.len() as u32,
            )
            .offset(*offset)
            .build();
            (e.user_data(token), data.len())
        }
        Op::Fsync { file } => {
            let e = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            (e.user_data(token), 0)
        }
    }
}

fn finish(flight: InFlight, res: i32) {
    let InFlight { req, expected } = flight;
    let result = if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else if (res as usize) < expected {
        match req.op {
            // A short write on a regular file means the filesystem ran out of space.
            Op::Write { .. } => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {res} of {expected} bytes"),
            )),
        }
    } else {
        Ok(match req.op {
            Op::Read { buf, .. } => Completion::Read(buf),
            Op::Write { .. } => Completion::Write,
            Op::Fsync { .. } => Completion::Fsync,
        })
    };
    let _ = req.done.send(result);
}

fn ring_loop(ring: IoUring, rx: mpsc::Receiver<Request>, shared: Arc<Shared>) {
    let mut ring = ring;
    // Leaked on purpose: the kernel may hold the eventfd read until the ring
    // itself is torn down, after this function returns.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let wake_fd = shared.wake.as_fd().as_raw_fd();
    let wake_entry = opcode::Read::new(types::Fd(wake_fd), wake_buf.as_mut_ptr(), 8)
        .build()
        .user_data(WAKE_TOKEN);
    let mut table: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut wake_armed = false;
    let mut closed = false;

    loop {
        if !wake_armed {
            // SAFETY: wake_buf is 'static (leaked) and the eventfd outlives the
            // ring (shared is held until this function returns and the ring is
            // torn down at the latest then).
            if unsafe { ring.submission().push(&wake_entry) }.is_ok() {
                wake_armed = true;
            }
        }
        // Move queued requests into the submission queue.
        let mut pending_push = false;
        while in_flight < MAX_IN_FLIGHT {
            match rx.try_recv() {
                Ok(req) => {
                    requeue(&mut ring, &mut table, &mut free, &mut in_flight, req);
                    pending_push = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && in_flight == 0 {
            break;
        }
        let want = if pending_push && in_flight >= MAX_IN_FLIGHT {
            1
        } else if pending_push {
            0
        } else {
            // Announce the sleep, then look once more so a request sent just
            // before the announcement is not missed.
            shared.sleeping.store(true, Ordering::SeqCst);
            if !closed && in_flight < MAX_IN_FLIGHT {
                match rx.try_recv() {
                    Ok(req) => {
                        shared.sleeping.store(false, Ordering::SeqCst);
                        requeue(&mut ring, &mut table, &mut free, &mut in_flight, req);
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => closed = true,
                    Err(mpsc::TryRecvError::Empty) => {}
                }
            }
            if closed && in_flight == 0 {
                break;
            }
            1
        };
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => tracing::error!(error = %e, "io_uring_enter failed"),
        }
        shared.sleeping.store(false, Ordering::SeqCst);
        for cqe in ring.completion() {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            let idx = token as usize;
            if let Some(flight) = table.get_mut(idx).and_then(Option::take) {
                free.push(idx);
                in_flight -= 1;
                finish(flight, cqe.result());
            }
        }
    }
}

fn requeue(
    ring: &mut IoUring,
    table: &mut Vec<Option<InFlight>>,
    free: &mut Vec<usize>,
    in_flight: &mut usize,
    mut req: Request,
) {
    let idx = free.pop().unwrap_or_else(|| {
        table.push(None);
        table.len() - 1
    });
    let (entry, expected) = entry_for(&mut req, idx as u64);
    table[idx] = Some(InFlight { req, expected });
    // SAFETY: the entry points at the buffer and fd owned by table[idx],
    // which stays in place until the completion for this token is reaped.
    while unsafe { ring.submission().push(&entry) }.is_err() {
        if let Err(e) = ring.submit() {
            tracing::error!(error = %e, "io_uring submit failed while the queue was full");
        }
    }
    *in_flight += 1;
}
