//! Block I/O backends: io_uring (default) and a pread/pwrite thread pool.
//!
//! Both take the same [`Op`]s and answer on a oneshot channel, so the store
//! does not know which one runs. The thread pool exists for hosts where
//! io_uring cannot be set up (seccomp profiles answer EPERM, old kernels
//! ENOSYS); [`IoEngine::start`] falls back to it with a warning.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

pub use crate::op::{Completion, Op, Request};
use crate::uring::Ring;

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring, driven from the tokio runtime.
    Uring,
    /// pread/pwrite on a small thread pool.
    Threads,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Threads => "threads",
        })
    }
}

/// A running I/O backend.
pub enum IoEngine {
    /// io_uring.
    Uring(Ring),
    /// Thread pool.
    Threads(Pool),
}

impl IoEngine {
    /// Starts the requested backend; io_uring falls back to threads with a
    /// warning when the kernel or a seccomp profile refuses it.
    pub fn start(kind: EngineKind) -> io::Result<Self> {
        match kind {
            EngineKind::Uring => match Ring::new() {
                Ok(r) => Ok(IoEngine::Uring(r)),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring is unavailable (seccomp profile, old kernel, or a \
                         tiny RLIMIT_MEMLOCK?); \
                         falling back to the pread/pwrite thread pool, which is slower"
                    );
                    Ok(IoEngine::Threads(Pool::new(THREADS)?))
                }
            },
            EngineKind::Threads => Ok(IoEngine::Threads(Pool::new(THREADS)?)),
        }
    }

    /// The backend actually running.
    pub fn kind(&self) -> EngineKind {
        match self {
            IoEngine::Uring(_) => EngineKind::Uring,
            IoEngine::Threads(_) => EngineKind::Threads,
        }
    }

    /// Queues a batch of operations and returns their result receivers in order.
    pub fn submit(
        &self,
        ops: impl IntoIterator<Item = Op>,
    ) -> Vec<oneshot::Receiver<io::Result<Completion>>> {
        let mut rxs = Vec::new();
        let reqs: Vec<Request> = ops
            .into_iter()
            .map(|op| {
                let (done, rx) = oneshot::channel();
                rxs.push(rx);
                Request { op, done }
            })
            .collect();
        match self {
            IoEngine::Uring(r) => r.submit(reqs),
            IoEngine::Threads(p) => p.submit(reqs),
        }
        rxs
    }

    /// Runs a batch on the calling thread, blocking it, when the io_uring
    /// ring has nothing in flight; otherwise, and always with the thread
    /// pool, runs nothing and hands the batch back.
    ///
    /// For operations that io_uring cannot complete without a kernel worker
    /// thread: a sync or a write-back wakes an io-wq worker, and a direct
    /// write to a file on ext4 a completion worker, which then wakes the
    /// runtime. A replica at rest (a commit's FLUSH after its write)
    /// blocks for the cache flush instead: measured, 4% more commits per
    /// second and 14% less CPU per commit; a lone write, see
    /// [`crate::store::Placement`]. With other I/O in flight the ring runs
    /// them, so the runtime keeps serving while a FLUSH waits. Every
    /// operation runs even when another fails; the first error wins.
    pub fn run_here_if_idle(&self, ops: Vec<Op>) -> Result<io::Result<Vec<Completion>>, Vec<Op>> {
        match self {
            IoEngine::Uring(r) if r.idle() => {}
            _ => return Err(ops),
        }
        let mut out = Vec::new();
        let mut first_err = None;
        for op in ops {
            match run_blocking(op) {
                Ok(c) => out.push(c),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Ok(match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        })
    }

    /// Runs a batch and waits for every result; the first error wins, but
    /// only after every operation of the batch has finished.
    pub async fn run(&self, ops: impl IntoIterator<Item = Op>) -> io::Result<Vec<Completion>> {
        Self::wait(self.submit(ops)).await
    }

    /// Waits for every result of a [`Self::submit`]; the first error wins,
    /// but only after every operation has finished.
    pub async fn wait(
        rxs: Vec<oneshot::Receiver<io::Result<Completion>>>,
    ) -> io::Result<Vec<Completion>> {
        let mut out = Vec::with_capacity(rxs.len());
        let mut first_err = None;
        for rx in rxs {
            match rx.await {
                Ok(Ok(c)) => out.push(c),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(io::Error::other("I/O backend dropped a request"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Enough threads for a queue depth of 32 without queueing behind each other.
const THREADS: usize = 16;

/// pread/pwrite thread pool.
pub struct Pool {
    tx: Option<mpsc::Sender<Request>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn new(n: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("zebu-io-{i}"))
                    .spawn(move || {
                        loop {
                            let req = match rx.lock() {
                                Ok(guard) => match guard.recv() {
                                    Ok(r) => r,
                                    Err(_) => return,
                                },
                                Err(_) => return,
                            };
                            let Request { op, done } = req;
                            let _ = done.send(run_blocking(op));
                        }
                    })?,
            );
        }
        Ok(Pool {
            tx: Some(tx),
            threads,
        })
    }

    fn submit(&self, reqs: Vec<Request>) {
        let Some(tx) = &self.tx else { return };
        for req in reqs {
            if let Err(mpsc::SendError(req)) = tx.send(req) {
                let _ = req
                    .done
                    .send(Err(io::Error::other("the I/O threads have stopped")));
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_blocking(op: Op) -> io::Result<Completion> {
    match op {
        Op::Read {
            file,
            offset,
            mut buf,
        } => {
            file.read_exact_at(buf.as_mut_slice(), offset)?;
            Ok(Completion::Read(buf))
        }
        Op::Write { file, offset, buf } => {
            let data = buf.as_slice();
            let mut done = 0;
            while done < data.len() {
                match file.write_at(&data[done..], offset + done as u64) {
                    Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Completion::Write)
        }
        Op::Fsync { file } => {
            file.sync_data()?;
            Ok(Completion::Fsync)
        }
        Op::WriteBackThenSync { pages, data } => {
            let pages = crate::crcmap::write_back(&pages);
            data.sync_data()?;
            pages?;
            Ok(Completion::Fsync)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;
    use std::fs::File;
    use std::os::unix::fs::OpenOptionsExt;

    /// Reads blocks 0..n of `file` and checks that block i is filled with fill(i).
    async fn assert_blocks(io: &IoEngine, file: &Arc<File>, n: u64, fill: impl Fn(u64) -> u8) {
        let reads = (0..n).map(|i| Op::Read {
            file: file.clone(),
            offset: i * 4096,
            buf: AlignedBuf::for_read(4096),
        });
        let done = io.run(reads).await.unwrap();
        assert_eq!(done.len() as u64, n);
        for (i, c) in (0..n).zip(done) {
            let Completion::Read(b) = c else {
                panic!("expected a read")
            };
            assert!(b.as_slice().iter().all(|&x| x == fill(i)), "block {i}");
        }
    }

    /// A temp dir holding file `f` of `len` bytes, opened with O_DIRECT.
    fn direct_file(len: u64) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(len).unwrap();
        (dir, Arc::new(file))
    }

    async fn roundtrip(kind: EngineKind) {
        let (_dir, file) = direct_file(1 << 20);
        let io = IoEngine::start(kind).unwrap();
        assert_eq!(io.kind(), kind, "backend fell back");
        roundtrip_on(&io, &file).await;
    }

    /// Writes, syncs and reads back 64 blocks of `file` (1 MiB).
    async fn roundtrip_on(io: &IoEngine, file: &Arc<File>) {
        let mut ops = Vec::new();
        for i in 0..64u64 {
            let data = vec![i as u8; 4096];
            ops.push(Op::Write {
                file: file.clone(),
                offset: i * 4096,
                buf: AlignedBuf::copy_from(&data),
            });
        }
        io.run(ops).await.unwrap();
        io.run([Op::Fsync { file: file.clone() }]).await.unwrap();
        // Slots freed dirty are taken first by the reads, which must return
        // only the file's bytes.
        drop(
            (0..64)
                .map(|_| AlignedBuf::copy_from(&[0xAB; 4096]))
                .collect::<Vec<_>>(),
        );
        assert_blocks(io, file, 64, |i| i as u8).await;
        // Reading past the end of the file is a short read, reported as an error.
        let err = io
            .run([Op::Read {
                file: file.clone(),
                offset: 1 << 20,
                buf: AlignedBuf::for_read(4096),
            }])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Tests that hold more buffers at once than the arena has slots take
    /// this exclusively, so a test that needs slots does not find the arena
    /// momentarily exhausted (which is correct behaviour, but not its case).
    static ARENA_GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

    /// Buffers in arena slots go to the kernel as fixed-buffer entries (no
    /// page pinning per request); larger ones as plain entries. Both land.
    #[tokio::test]
    async fn uring_writes_and_reads_arena_slots_as_fixed_buffers() {
        let _gate = ARENA_GATE.read().await;
        let (_dir, file) = direct_file(8 << 20);
        let io = IoEngine::start(EngineKind::Uring).unwrap();
        let IoEngine::Uring(ring) = &io else {
            panic!("backend fell back")
        };
        if !ring.registered_buffers() {
            // Registration needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK; root has the former.
            use std::os::unix::fs::MetadataExt;
            let euid = std::fs::metadata("/proc/self").unwrap().uid();
            assert_ne!(euid, 0, "root could not register the arena");
            eprintln!("the arena is not registered here: only the plain path is checked");
        }
        // One buffer of each class and one too large for any slot, end to end.
        let sizes = [4096usize, 64 << 10, 1 << 20, 2 << 20];
        let offsets: Vec<u64> = sizes
            .iter()
            .scan(0u64, |at, len| {
                let here = *at;
                *at += *len as u64;
                Some(here)
            })
            .collect();
        let in_arena = |ops: &[Op]| {
            ops.iter()
                .filter(|op| op.buf().is_some_and(AlignedBuf::in_arena))
                .count() as u64
        };
        let writes: Vec<Op> = (0..sizes.len())
            .map(|i| Op::Write {
                file: file.clone(),
                offset: offsets[i],
                buf: AlignedBuf::copy_from(&vec![i as u8 + 1; sizes[i]]),
            })
            .collect();
        let registered = in_arena(&writes);
        if ring.registered_buffers() {
            assert_eq!(registered, 3, "one slot per class was free");
        }
        io.run(writes).await.unwrap();
        let reads: Vec<Op> = (0..sizes.len())
            .map(|i| Op::Read {
                file: file.clone(),
                offset: offsets[i],
                buf: AlignedBuf::for_read(sizes[i]),
            })
            .collect();
        let read_registered = in_arena(&reads);
        let done = io.run(reads).await.unwrap();
        for (i, c) in done.into_iter().enumerate() {
            let Completion::Read(b) = c else {
                panic!("expected a read")
            };
            assert_eq!(b.len(), sizes[i]);
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
        }
        let expected = if ring.registered_buffers() {
            registered + read_registered
        } else {
            0
        };
        assert_eq!(ring.fixed_submitted(), expected);
    }

    /// A write-back-then-sync succeeds on files, and when its first step
    /// fails (a pipe has no pages to write back) the second still runs and
    /// the error is reported, once, for the pair; the ring keeps working
    /// (no completion of the pair is left behind to be taken for another
    /// request's).
    async fn write_back_then_sync(kind: EngineKind) {
        let (_dir, data) = direct_file(1 << 20);
        let io = IoEngine::start(kind).unwrap();
        let pages = Arc::new(tempfile::tempfile().unwrap());
        pages.write_all_at(&[7; 8192], 0).unwrap();
        let done = io
            .run([Op::WriteBackThenSync {
                pages: pages.clone(),
                data: data.clone(),
            }])
            .await
            .unwrap();
        assert!(matches!(done[..], [Completion::Fsync]), "{done:?}");
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        let pipe = Arc::new(File::from(pipe));
        for _ in 0..3 {
            io.run([Op::WriteBackThenSync {
                pages: pipe.clone(),
                data: data.clone(),
            }])
            .await
            .unwrap_err();
            roundtrip_on(&io, &data).await;
        }
    }

    /// At rest, the ring lets the caller run syncs itself, failures
    /// included; with a request in the kernel (a read of an empty pipe,
    /// pending until the pipe is written) it hands them back, and so does
    /// the thread pool always.
    #[tokio::test]
    async fn syncs_run_here_only_at_rest() {
        let (_dir, data) = direct_file(1 << 20);
        let pages = Arc::new(tempfile::tempfile().unwrap());
        pages.write_all_at(&[7; 8192], 0).unwrap();
        let sync = || {
            vec![Op::WriteBackThenSync {
                pages: pages.clone(),
                data: data.clone(),
            }]
        };
        let io = IoEngine::start(EngineKind::Uring).unwrap();
        let done = io.run_here_if_idle(sync()).ok().expect("run at rest");
        assert!(matches!(done.unwrap()[..], [Completion::Fsync]));
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        let pipe = Arc::new(File::from(pipe));
        let on_pipe = vec![Op::WriteBackThenSync {
            pages: pipe.clone(),
            data: data.clone(),
        }];
        let failed = io.run_here_if_idle(on_pipe).ok().expect("run at rest");
        assert!(failed.is_err(), "a pipe has no pages to write back");

        let (r, w) = nix::unistd::pipe().unwrap();
        let pending = io.submit([Op::Read {
            file: Arc::new(File::from(r)),
            offset: 0,
            buf: AlignedBuf::for_read(4096),
        }]);
        let back = io.run_here_if_idle(sync()).expect_err("handed back");
        assert_eq!(back.len(), 1);
        std::io::Write::write_all(&mut File::from(w), &[1; 4096]).unwrap();
        IoEngine::wait(pending).await.unwrap();

        let pool = IoEngine::start(EngineKind::Threads).unwrap();
        assert!(
            pool.run_here_if_idle(sync()).is_err(),
            "the pool always runs them"
        );
    }

    #[tokio::test]
    async fn uring_write_back_then_sync() {
        write_back_then_sync(EngineKind::Uring).await;
    }

    #[tokio::test]
    async fn threads_write_back_then_sync() {
        write_back_then_sync(EngineKind::Threads).await;
    }

    #[tokio::test]
    async fn uring_roundtrip() {
        roundtrip(EngineKind::Uring).await;
    }

    #[tokio::test]
    async fn threads_roundtrip() {
        roundtrip(EngineKind::Threads).await;
    }

    /// More requests at once than the submission queue holds (512) and than
    /// may be in flight (1024): the ring submits inline when its queue is
    /// full and keeps the rest in its backlog; every request completes.
    #[tokio::test]
    async fn uring_takes_more_requests_than_it_keeps_in_flight() {
        let _gate = ARENA_GATE.write().await;
        const N: u64 = 3000;
        let (_dir, file) = direct_file(N * 4096);
        let io = IoEngine::start(EngineKind::Uring).unwrap();
        assert_eq!(io.kind(), EngineKind::Uring, "backend fell back");
        let writes = (0..N).map(|i| Op::Write {
            file: file.clone(),
            offset: i * 4096,
            buf: AlignedBuf::copy_from(&[(i % 251) as u8; 4096]),
        });
        assert_eq!(io.run(writes).await.unwrap().len(), N as usize);
        assert_blocks(&io, &file, N, |i| (i % 251) as u8).await;
    }

    /// Dropping the backend with requests queued still completes them: the
    /// reaper finishes what is in flight before the ring goes away.
    #[tokio::test]
    async fn uring_dropped_with_requests_queued_completes_them() {
        let _gate = ARENA_GATE.write().await;
        let (dir, file) = direct_file(2048 * 4096);
        let io = IoEngine::start(EngineKind::Uring).unwrap();
        let rxs = io.submit((0..2048u64).map(|i| Op::Write {
            file: file.clone(),
            offset: i * 4096,
            buf: AlignedBuf::copy_from(&[7u8; 4096]),
        }));
        drop(io);
        assert_eq!(IoEngine::wait(rxs).await.unwrap().len(), 2048);
        // Read back through a buffered handle (O_DIRECT wants aligned buffers).
        let mut back = vec![0u8; 4096];
        std::fs::File::open(dir.path().join("f"))
            .unwrap()
            .read_exact_at(&mut back, 2047 * 4096)
            .unwrap();
        assert!(back.iter().all(|&x| x == 7));
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [0, 1, 4095, 4096, 12345] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % crate::buf::ALIGN, 0);
            assert_eq!(b.len(), len);
            let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let c = AlignedBuf::copy_from(&src);
            assert_eq!(c.as_slice().as_ptr() as usize % crate::buf::ALIGN, 0);
            assert_eq!(c.as_slice(), &src[..]);
        }
    }
}
