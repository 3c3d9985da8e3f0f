//! The io_uring ring (the buffers it reads into and writes from are
//! [`crate::buf`]'s).
//!
//! Architecture invariant: this module, [`crate::buf`] and [`crate::crcmap`]
//! are the only ones of the replica that contain `unsafe` code. Every
//! `unsafe` block carries a `SAFETY:` comment.
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

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::buf::{AlignedBuf, Arena};
use crate::op::{Completion, Op, Request};

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
    /// Requests taken into the ring so far.
    taken: u64,
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
                taken: 0,
                fixed: 0,
            }),
            kick: Notify::new(),
        });
        runtime.spawn(reap(shared.clone(), efd));
        Ok(Ring { shared })
    }

    /// Whether no request is in the kernel or waiting for a slot.
    pub fn idle(&self) -> bool {
        let st = self.shared.lock();
        st.in_flight() == 0 && st.backlog.is_empty()
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

    /// How many requests the ring has taken so far.
    pub fn taken(&self) -> u64 {
        self.shared.lock().taken
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
                // Reset the eventfd's counter, then clear the readiness this
                // wake-up reported, so the next wait sleeps: a completion
                // posted after the read signals the eventfd again and is a
                // new readiness, which `clear_ready` leaves set. One read
                // per wake-up; reading on until EAGAIN cost a second.
                Ok(mut guard) => {
                    if let Err(e) = guard.get_inner().read() {
                        // EAGAIN: a wake-up whose count an earlier read took.
                        tracing::trace!(error = %e, "reading the io_uring eventfd");
                    }
                    guard.clear_ready();
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
        self.taken += 1;
        self.fixed += u64::from(fixed);
        let (entry, linked, expected) = entries_for(&mut req, idx as u64, fixed);
        let pair;
        let entries: &[squeue::Entry] = match linked {
            None => std::slice::from_ref(&entry),
            Some(second) => {
                pair = [entry, second];
                &pair
            }
        };
        self.table[idx] = Some(InFlight {
            req,
            expected,
            pending: entries.len() as u8,
            result: 0,
        });
        // All or none, so a linked pair is never split by a submission.
        // SAFETY: the entries point at the buffers and fds owned by
        // table[idx], which stays in place until every completion for this
        // token is reaped.
        while unsafe { self.ring.submission().push_multiple(entries) }.is_err() {
            self.submit_pushed();
        }
        self.unsubmitted += entries.len();
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
            let Some(flight) = table.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            // A linked pair keeps the first failure it sees.
            if flight.result >= 0 {
                flight.result = cqe.result();
            }
            flight.pending = flight.pending.saturating_sub(1);
            if flight.pending == 0
                && let Some(flight) = table[idx].take()
            {
                free.push(idx);
                n += 1;
                finish(flight);
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
    /// Completions still to come (the slot is freed only after the last):
    /// 2 for a linked pair, whose entries share the token, else 1.
    pending: u8,
    /// The result: the entry's, or a linked pair's first failure (else
    /// its last entry's).
    result: i32,
}

/// The entries for a request — one, or two linked ones with the same
/// token — and the bytes it must transfer; `fixed` when its
/// buffer is an arena slot and the arena is registered with the ring (as
/// buffer 0).
fn entries_for(
    req: &mut Request,
    token: u64,
    fixed: bool,
) -> (squeue::Entry, Option<squeue::Entry>, usize) {
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
            (e.user_data(token), None, len)
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
            (e.user_data(token), None, data.len())
        }
        Op::Fsync { file } => {
            let e = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            (e.user_data(token), None, 0)
        }
        Op::WriteBackThenSync { pages, data } => {
            // Length 0: from the offset to the end of the file.
            let write_back = opcode::SyncFileRange::new(types::Fd(pages.as_raw_fd()), 0)
                .offset(0)
                .flags(
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
                .build()
                // A hard link: the fdatasync starts when the write-back
                // ends, failed or not.
                .flags(squeue::Flags::IO_HARDLINK)
                .user_data(token);
            let sync = opcode::Fsync::new(types::Fd(data.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            (write_back, Some(sync.user_data(token)), 0)
        }
    }
}

fn finish(flight: InFlight) {
    let InFlight {
        req,
        expected,
        result: res,
        ..
    } = flight;
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
            Op::Fsync { .. } | Op::WriteBackThenSync { .. } => Completion::Fsync,
        })
    };
    let _ = req.done.send(result);
}
