//! The io_uring ring and the aligned buffers O_DIRECT needs.
//!
//! Architecture invariant: this module and [`crate::crcmap`] (the CRC
//! file's memory mapping) are the only ones of the replica that contain
//! `unsafe` code. Every `unsafe` block carries a `SAFETY:` comment.
//!
//! The ring is driven from the tokio runtime itself, with no thread of its
//! own: [`Ring::submit`] pushes submission-queue entries under a mutex and
//! wakes the ring's *reaper* task, which submits everything pushed since it
//! last ran with one `io_uring_enter` and hands each completion back on its
//! request's oneshot channel. The kernel signals completions on an eventfd
//! registered with the ring, which the reaper waits on through the runtime's
//! reactor (epoll). On the replica's single-threaded runtime a write thus
//! costs no thread hop at all: the requests of one gRPC batch are pushed in
//! one scheduler tick and submitted together on the next.
//!
//! Invariant: the buffer and the file of every submitted entry are owned by
//! the in-flight table until the kernel posts the entry's completion; nothing
//! the kernel may still read or write is freed or moved before that. Dropping
//! the ring with entries in flight blocks until the kernel has completed them
//! (this only happens when the runtime shuts down under running I/O).

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::io::{Completion, Op, Request};

/// Alignment of every [`AlignedBuf`]: what O_DIRECT needs on any device.
pub const ALIGN: usize = 4096;

/// A buffer aligned to [`ALIGN`] bytes: zero-filled by [`AlignedBuf::zeroed`],
/// a copy of the source by [`AlignedBuf::copy_from`], to be filled by a read
/// with [`AlignedBuf::for_read`]. It lives in a slot of
/// the registered [`Arena`] while one of its size is free, else on the heap.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    home: Home,
}

/// Where an [`AlignedBuf`]'s memory comes from, and so where it goes back.
enum Home {
    Heap(Layout),
    Slot {
        arena: &'static Arena,
        class: u8,
        index: u32,
    },
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
        let mut buf = Self::for_read(len);
        if buf.in_arena() {
            buf.as_mut_slice().fill(0);
        }
        buf
    }

    /// A buffer of `len` bytes for a read to fill: an arena slot as it is,
    /// not cleared (a 1 MiB read no longer pays a 1 MiB `memset` first), or
    /// else a zeroed heap buffer.
    ///
    /// A slot's old bytes never reach a caller: both backends fail a read
    /// that does not fill its whole buffer (a short read is an error) and
    /// drop that buffer. Every byte of the arena is initialised (its mapping
    /// starts zeroed), so handing a slot to the kernel or to `read_exact_at`
    /// exposes no uninitialised memory.
    pub fn for_read(len: usize) -> Self {
        match Arena::get().and_then(|a| a.take(len)) {
            Some(buf) => buf,
            None => Self::heap(len, true),
        }
    }

    /// A buffer of `len` bytes on the heap, zero-filled or not.
    fn heap(len: usize, zeroed: bool) -> Self {
        let layout = Self::layout_for(len);
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe {
            if zeroed {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            home: Home::Heap(layout),
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        Self::copy_from_chunks([data], data.len())
    }

    /// A buffer holding the concatenation of `chunks`, which must add up to
    /// exactly `len` bytes (checked: a shortfall panics rather than expose
    /// uninitialised memory). Not zero-filled first: every byte the buffer
    /// exposes is written by the copy.
    pub fn copy_from_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, len: usize) -> Self {
        // Owned from here, so the memory is given back if a check panics.
        let buf = Arena::get()
            .and_then(|a| a.take(len))
            .unwrap_or_else(|| Self::heap(len, false));
        let mut at = 0;
        for c in chunks {
            assert!(
                c.len() <= len - at,
                "chunks longer than the {len} bytes announced"
            );
            // SAFETY: `at + c.len() <= len`, within the allocation or slot;
            // both are exclusively ours, so they cannot overlap the chunk.
            unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), buf.ptr.as_ptr().add(at), c.len()) };
            at += c.len();
        }
        assert_eq!(at, len, "chunks shorter than the {len} bytes announced");
        buf
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

    /// True when the buffer is a slot of the arena, so a ring that
    /// registered the arena can use it without pinning its pages per request.
    pub fn in_arena(&self) -> bool {
        matches!(self.home, Home::Slot { .. })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation or arena slot of at least
        // `len` initialised bytes (zeroed or copied into) that is ours for
        // as long as self lives.
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
        match self.home {
            // SAFETY: ptr was returned by alloc or alloc_zeroed with exactly
            // this layout and is freed only here, once.
            Home::Heap(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            Home::Slot {
                arena,
                class,
                index,
            } => arena.give_back(class, index),
        }
    }
}

/// Size classes of the arena's slots: (slot size, number of slots). A
/// buffer takes a slot of the smallest class that fits it and has one free;
/// larger buffers, and any while their class is exhausted, live on the heap.
/// 4 KiB covers small random writes at any depth the engine sends, 1 MiB the
/// usual largest request of a filesystem or a sequential writer.
const CLASSES: [(usize, usize); 3] = [(4 << 10, 1024), (64 << 10, 128), (1 << 20, 20)];

/// The process's registered buffer arena: one mapping, carved into
/// fixed-size slots, registered with every [`Ring`] as buffer 0.
///
/// Without it, the kernel pins and unpins the pages of every O_DIRECT
/// request's buffer (`get_user_pages` and its release: 5% of the replica's
/// CPU at 1 MiB writes). A registered buffer's pages are pinned once, when
/// it is registered, and `READ_FIXED`/`WRITE_FIXED` entries use them as
/// they are. The arena is one mapping advised onto huge pages (see
/// [`map_huge`]), so each slot is physically contiguous.
///
/// Invariant: the arena is never freed (it lives in a `static`), so no
/// registration can outlive its memory. A slot is in its class's free list
/// or owned by exactly one `AlignedBuf`, which gives it back when dropped;
/// the ring keeps the `AlignedBuf` of every entry in flight, so a slot is
/// not reused while the kernel may still read or write it.
struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// (slot size, number of slots) per class: [`CLASSES`] but in tests.
    classes: [(usize, usize); CLASSES.len()],
    /// Free slot indices, one list per class.
    free: [Mutex<Vec<u32>>; CLASSES.len()],
    /// Offset of each class's first slot from `base`.
    starts: [usize; CLASSES.len()],
}

// SAFETY: the arena's memory is only reached through slots, each owned by
// one AlignedBuf at a time (see the invariant above); the free lists are
// behind mutexes.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

static ARENA: std::sync::OnceLock<Option<Arena>> = std::sync::OnceLock::new();

impl Arena {
    /// The arena, once the first ring has set it up.
    fn get() -> Option<&'static Arena> {
        ARENA.get().and_then(Option::as_ref)
    }

    /// The arena, set up on first use; None when its memory cannot be had.
    fn get_or_init() -> Option<&'static Arena> {
        ARENA.get_or_init(|| Arena::new(CLASSES)).as_ref()
    }

    /// A new arena with `classes[i].1` slots of `classes[i].0` bytes; None
    /// when its memory cannot be had.
    fn new(classes: [(usize, usize); CLASSES.len()]) -> Option<Arena> {
        let mut starts = [0; CLASSES.len()];
        let mut len = 0;
        for (start, (size, count)) in starts.iter_mut().zip(classes) {
            *start = len;
            len += size * count;
        }
        let base = map_huge(len.max(ALIGN).next_multiple_of(ALIGN))?;
        Some(Arena {
            base,
            len,
            classes,
            free: classes.map(|(_, count)| Mutex::new((0..count as u32).rev().collect())),
            starts,
        })
    }

    /// The iovec that registers the whole arena.
    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    /// An uninitialised slot for `len` bytes (to be filled by the caller
    /// before it is read), or None when no class fits one free.
    fn take(&'static self, len: usize) -> Option<AlignedBuf> {
        let class = self.classes.iter().position(|&(size, _)| len <= size)?;
        for c in class..self.classes.len() {
            let got = self.free[c].lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(index) = got {
                let offset = self.starts[c] + index as usize * self.classes[c].0;
                // SAFETY: `offset` plus the slot size is within the arena's
                // `len` bytes (the starts were summed from the classes).
                let ptr = unsafe { self.base.add(offset) };
                return Some(AlignedBuf {
                    ptr,
                    len,
                    home: Home::Slot {
                        arena: self,
                        class: c as u8,
                        index,
                    },
                });
            }
        }
        None
    }

    /// Logs how much of the arena the kernel backs with huge pages: all of
    /// it normally; otherwise a 1 MiB disk request from the rest may be
    /// split in two, which an operator can fix (THP `madvise` or `always`).
    fn report_huge_pages(&self) {
        let (mib, total) = (1 << 20, self.len);
        let huge = smaps_field(self.base.as_ptr() as usize, total, "AnonHugePages:")
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kib| (kib << 10).min(total));
        match huge {
            Some(huge) if huge == total => {
                tracing::info!("buffer arena: {} MiB, all on huge pages", total / mib)
            }
            Some(huge) => tracing::warn!(
                "buffer arena: only {} of {} MiB on huge pages (transparent huge pages \
                 disabled, or memory fragmented); 1 MiB disk requests from the rest \
                 may be split in two on a virtio disk. Set \
                 /sys/kernel/mm/transparent_hugepage/enabled to madvise or always",
                huge / mib,
                total / mib
            ),
            None => tracing::info!(
                "buffer arena: {} MiB; /proc/self/smaps does not say whether it is on huge pages",
                total / mib
            ),
        }
    }

    fn give_back(&self, class: u8, index: u32) {
        self.free[class as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
    }
}

/// The value after `field` (such as `AnonHugePages:`) in /proc/self/smaps
/// for the mapping that holds `[base, base + len)` (it may have merged with
/// a neighbour); None when smaps cannot be read or has no such mapping.
fn smaps_field(base: usize, len: usize, field: &str) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = lo <= base && base + len <= hi;
        } else if inside && let Some(v) = line.strip_prefix(field) {
            return Some(v.trim().to_owned());
        }
    }
    None
}

/// Size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB
/// base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed anonymous mapping of `len` bytes (a multiple of [`ALIGN`]) at a
/// [`HUGE_PAGE`]-aligned address, advised to be backed by transparent huge
/// pages; None when the kernel refuses the mapping. Never unmapped.
///
/// Why: a buffer of 4 KiB pages is as many scatter-gather segments as pages
/// unless the pages happen to be physically adjacent, and a device takes a
/// bounded number of segments per request (254 on virtio-blk): a 1 MiB
/// O_DIRECT request from such a buffer reaches the disk as two. Inside a huge
/// page a slot is physically contiguous, one segment, so each 1 MiB read or
/// write is one disk request (measured here: a 1 MiB copy at depth 16 took
/// half the disk time with huge-page buffers). Where huge pages cannot be
/// had (THP disabled, memory fragmented) the mapping is ordinary pages and
/// everything works as before.
fn map_huge(len: usize) -> Option<NonNull<u8>> {
    let span = len.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's
    // choosing; it aliases nothing.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
    let tail = span - head - len;
    // SAFETY: `head + len + tail == span`, so both trims and the advised
    // range lie inside the mapping just made, whose first `head` and last
    // `tail` bytes nothing else refers to. A failed trim or advice leaves
    // unused address space or ordinary pages: harmless, so not checked.
    unsafe {
        let base = raw.cast::<u8>().add(head);
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap(base.add(len).cast(), tail);
        }
        libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE);
        NonNull::new(base)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Submission-queue depth of the ring.
const RING_ENTRIES: u32 = 512;
/// Most requests in flight in the kernel at once; more wait in a backlog.
/// At most the completion queue's size (twice `RING_ENTRIES`), so the
/// completion queue cannot overflow.
const MAX_IN_FLIGHT: usize = 1024;

/// Handle to the ring. Dropping it lets the reaper finish the requests in
/// flight and stop.
pub struct Ring {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the reaper: new entries to submit, or the handle was dropped.
    kick: Notify,
}

struct State {
    ring: IoUring,
    /// Requests the kernel owns, by token (`user_data`).
    table: Vec<Option<InFlight>>,
    /// Tokens of the table's empty slots.
    free: Vec<usize>,
    /// Entries pushed to the submission queue but not yet submitted.
    unsubmitted: usize,
    /// Requests waiting for an in-flight slot.
    backlog: VecDeque<Request>,
    /// The handle was dropped: stop once nothing is in flight.
    closed: bool,
    /// The reaper is gone (its runtime shut down): new requests fail.
    stopped: bool,
    /// The arena is registered with this ring as buffer 0.
    registered: bool,
    /// Entries submitted as `READ_FIXED`/`WRITE_FIXED` so far.
    fixed: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way that matters more than losing the ring: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ring {
    /// Sets up a ring and spawns its reaper on the current tokio runtime.
    /// Fails where io_uring is unavailable (typically EPERM under a seccomp
    /// profile, or ENOSYS) and when called outside a runtime.
    pub fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the io_uring backend must be started inside a tokio runtime")
        })?;
        let ring: IoUring<squeue::Entry> = IoUring::builder().build(RING_ENTRIES)?;
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io::Error::from)?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let registered = match Arena::get_or_init() {
            // SAFETY: the arena is never freed (it is a static), so the
            // registered memory outlives the ring.
            Some(arena) => match unsafe { ring.submitter().register_buffers(&[arena.iovec()]) } {
                Ok(()) => {
                    // Registering pinned the arena, so its pages exist now.
                    static REPORTED: std::sync::Once = std::sync::Once::new();
                    REPORTED.call_once(|| arena.report_huge_pages());
                    true
                }
                Err(e) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(error = %e, "cannot register io_uring buffers \
                            (RLIMIT_MEMLOCK too low without CAP_IPC_LOCK?); every request \
                            pins its pages, which costs CPU")
                    });
                    false
                }
            },
            None => false,
        };
        let efd = {
            let _enter = runtime.enter();
            // SAFETY: the EventFd owns its descriptor and always returns that
            // same descriptor from as_raw_fd; the AsyncFd takes ownership of
            // it, so it stays open for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }?
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ring,
                table: Vec::new(),
                free: Vec::new(),
                unsubmitted: 0,
                backlog: VecDeque::new(),
                closed: false,
                stopped: false,
                registered,
                fixed: 0,
            }),
            kick: Notify::new(),
        });
        runtime.spawn(reap(shared.clone(), efd));
        Ok(Ring { shared })
    }

    /// Queues requests; their results arrive on their oneshot channels. The
    /// entries are submitted when the reaper next runs, together with every
    /// other request queued before then.
    pub fn submit(&self, reqs: impl IntoIterator<Item = Request>) {
        let mut st = self.shared.lock();
        for req in reqs {
            if st.stopped {
                let _ = req
                    .done
                    .send(Err(io::Error::other("the io_uring reaper has stopped")));
            } else if st.in_flight() < MAX_IN_FLIGHT {
                st.push(req);
            } else {
                st.backlog.push_back(req);
            }
        }
        drop(st);
        self.shared.kick.notify_one();
    }

    /// True when the ring could register the buffer arena, so copies into
    /// [`AlignedBuf`]s are written without pinning their pages per request.
    pub fn registered_buffers(&self) -> bool {
        self.shared.lock().registered
    }

    /// How many requests were submitted as fixed-buffer entries so far.
    pub fn fixed_submitted(&self) -> u64 {
        self.shared.lock().fixed
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.kick.notify_one();
    }
}

/// The reaper task: submits what was pushed, delivers completions, and
/// sleeps until the eventfd or a kick wakes it.
async fn reap(shared: Arc<Shared>, efd: AsyncFd<EventFd>) {
    loop {
        {
            let mut st = shared.lock();
            st.pump();
            if st.closed && st.in_flight() == 0 && st.backlog.is_empty() {
                return;
            }
        }
        tokio::select! {
            _ = shared.kick.notified() => {}
            ready = efd.readable() => match ready {
                // Reset the eventfd's counter; the read that finds it at zero
                // (EAGAIN) clears the readiness, so the next wait sleeps.
                Ok(mut guard) => {
                    let _: Result<io::Result<()>, _> = guard.try_io(|fd| loop {
                        fd.get_ref().read().map_err(io::Error::from)?;
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "waiting for io_uring completions failed; \
                        the ring stops taking requests");
                    let mut st = shared.lock();
                    st.stopped = true;
                    st.fail_backlog("the io_uring reaper has stopped");
                    return;
                }
            },
        }
    }
}

impl State {
    /// Requests the kernel owns: the table's occupied slots.
    fn in_flight(&self) -> usize {
        self.table.len() - self.free.len()
    }

    /// Answers every request still waiting for a slot with an error.
    fn fail_backlog(&mut self, why: &str) {
        for req in self.backlog.drain(..) {
            let _ = req.done.send(Err(io::Error::other(why.to_owned())));
        }
    }

    /// Pushes one request's entry; submits inline when the queue is full.
    fn push(&mut self, mut req: Request) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.table.push(None);
            self.table.len() - 1
        });
        let fixed = self.registered && req.op.buf().is_some_and(AlignedBuf::in_arena);
        self.fixed += u64::from(fixed);
        let (entry, expected) = entry_for(&mut req, idx as u64, fixed);
        self.table[idx] = Some(InFlight { req, expected });
        // SAFETY: the entry points at the buffer and fd owned by table[idx],
        // which stays in place until the completion for this token is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.submit_pushed();
        }
        self.unsubmitted += 1;
    }

    /// Hands every pushed entry to the kernel.
    fn submit_pushed(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // EAGAIN/EBUSY: the kernel is short of resources; the entries
            // stay queued and the next pump tries again.
            Err(e) => tracing::warn!(error = %e, "io_uring submit failed; will retry"),
        }
    }

    /// Delivers every posted completion; returns how many there were.
    fn reap_completions(&mut self) -> usize {
        let State {
            ring, table, free, ..
        } = self;
        let mut n = 0;
        for cqe in ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(flight) = table.get_mut(idx).and_then(Option::take) {
                free.push(idx);
                n += 1;
                finish(flight, cqe.result());
            }
        }
        n
    }

    /// Submits, reaps, and moves backlog into freed slots until nothing moves.
    fn pump(&mut self) {
        loop {
            self.submit_pushed();
            let reaped = self.reap_completions();
            let mut moved = false;
            while self.in_flight() < MAX_IN_FLIGHT {
                let Some(req) = self.backlog.pop_front() else {
                    break;
                };
                self.push(req);
                moved = true;
            }
            if reaped == 0 && !moved {
                return;
            }
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The kernel may still read or write the buffers of entries in
        // flight: wait for their completions before the table is freed.
        while self.in_flight() > 0 {
            self.submit_pushed();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, in_flight = self.in_flight(),
                        "waiting for io_uring completions at shutdown failed; leaking their buffers");
                    std::mem::forget(std::mem::take(&mut self.table));
                    self.free.clear();
                    return;
                }
            }
            self.reap_completions();
        }
        self.fail_backlog("the io_uring ring was shut down");
    }
}

struct InFlight {
    req: Request,
    expected: usize,
}

/// The entry for a request; `fixed` when its buffer is an arena slot and
/// the arena is registered with the ring (as buffer 0).
fn entry_for(req: &mut Request, token: u64, fixed: bool) -> (squeue::Entry, usize) {
    match &mut req.op {
        Op::Read { file, offset, buf } => {
            let len = buf.len();
            let (fd, ptr) = (types::Fd(file.as_raw_fd()), buf.as_mut_slice().as_mut_ptr());
            let e = if fixed {
                opcode::ReadFixed::new(fd, ptr, len as u32, 0)
                    .offset(*offset)
                    .build()
            } else {
                opcode::Read::new(fd, ptr, len as u32)
                    .offset(*offset)
                    .build()
            };
            (e.user_data(token), len)
        }
        Op::Write { file, offset, buf } => {
            let (fd, data) = (types::Fd(file.as_raw_fd()), buf.as_slice());
            let e = if fixed {
                opcode::WriteFixed::new(fd, data.as_ptr(), data.len() as u32, 0)
                    .offset(*offset)
                    .build()
            } else {
                opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
                    .offset(*offset)
                    .build()
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked_arena(classes: [(usize, usize); CLASSES.len()]) -> &'static Arena {
        Box::leak(Box::new(Arena::new(classes).expect("arena memory")))
    }

    fn class_of(b: &AlignedBuf) -> Option<u8> {
        match b.home {
            Home::Slot { class, .. } => Some(class),
            Home::Heap(_) => None,
        }
    }

    #[test]
    fn a_buffer_takes_the_smallest_free_class_that_fits_and_gives_its_slot_back() {
        let a = leaked_arena([(4096, 2), (8192, 1), (16384, 0)]);
        let small = a.take(100).unwrap();
        let full = a.take(4096).unwrap();
        assert_eq!((class_of(&small), class_of(&full)), (Some(0), Some(0)));
        // Class 0 is exhausted: the next small buffer takes a larger slot.
        let spill = a.take(10).unwrap();
        assert_eq!(class_of(&spill), Some(1));
        assert!(a.take(1).is_none(), "every slot is taken");
        assert!(
            a.take(16384).is_none(),
            "the only class that fits has no slots"
        );
        assert!(a.take(16385).is_none(), "no class fits");
        let mut ptrs: Vec<usize> = [&small, &full, &spill]
            .iter()
            .map(|b| b.as_slice().as_ptr() as usize)
            .collect();
        for p in &ptrs {
            assert_eq!(p % ALIGN, 0);
            let base = a.base.as_ptr() as usize;
            assert!(
                *p >= base && *p + 4096 <= base + a.len,
                "slot inside the arena"
            );
        }
        ptrs.sort();
        ptrs.dedup();
        assert_eq!(ptrs.len(), 3, "slots are distinct");
        let given_back = full.as_slice().as_ptr();
        drop(full);
        let again = a.take(4096).unwrap();
        assert_eq!(again.as_slice().as_ptr(), given_back);
        assert_eq!((again.len(), class_of(&again)), (4096, Some(0)));
    }

    #[test]
    fn the_arena_starts_on_a_huge_page_and_is_advised_to_use_huge_pages() {
        let a = leaked_arena(CLASSES);
        let base = a.base.as_ptr() as usize;
        assert_eq!(base % HUGE_PAGE, 0, "arena at {base:#x}");
        // Every slot of every class lies inside one huge page, so it is
        // physically contiguous when the arena got huge pages.
        for (c, &(size, count)) in CLASSES.iter().enumerate() {
            let first = a.starts[c];
            assert_eq!(
                first % size,
                0,
                "class {c} starts on a multiple of its size"
            );
            assert!(
                HUGE_PAGE.is_multiple_of(size),
                "class {c}'s slots do not straddle huge pages"
            );
            assert!(first + size * count <= a.len);
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("transparent huge pages are off here: nothing more to check");
            return;
        }
        // The mapping holding the arena (it may have merged with a
        // neighbour) is eligible for huge pages: the advice was taken.
        let eligible = smaps_field(base, a.len, "THPeligible:");
        assert_eq!(
            eligible.as_deref(),
            Some("1"),
            "the arena's mapping in /proc/self/smaps"
        );
    }

    #[test]
    fn copies_and_zeroed_buffers_in_reused_slots_hold_exactly_their_bytes() {
        Arena::get_or_init().expect("arena memory");
        let dirty: Vec<AlignedBuf> = (0..64)
            .map(|i| AlignedBuf::copy_from(&[i as u8 + 1; 4096]))
            .collect();
        assert!(dirty.iter().any(AlignedBuf::in_arena));
        for (i, b) in dirty.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
        }
        drop(dirty);
        let zeroed: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::zeroed(4096)).collect();
        assert!(zeroed.iter().any(AlignedBuf::in_arena));
        assert!(zeroed.iter().all(|b| b.as_slice().iter().all(|&x| x == 0)));
        // Too large for any slot: on the heap, same contract.
        let big = AlignedBuf::copy_from(&vec![9u8; (1 << 20) + 1]);
        assert!(!big.in_arena());
        assert!(big.as_slice().iter().all(|&x| x == 9));
    }
}
