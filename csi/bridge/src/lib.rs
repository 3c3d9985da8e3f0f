//! `zebu-nbd-fuse`: a FUSE ↔ NBD bridge that serves one NBD export as one
//! regular file and can grow that file while it is in use — what `nbdfuse`
//! cannot do (it reads the export size once, at connect).
//!
//! ```text
//! /dev/loopN ─ MOUNTDIR/NAME (FUSE, this module) ─ NbdPool (N connections) ─ NBD server
//! ```
//!
//! [`run`] mounts a private FUSE filesystem on `MOUNTDIR` holding one file,
//! `NAME` (mode 0600, 0400 for a read-only export), whose size is the export
//! size and whose content is the export: reads and writes at an offset are
//! NBD READ/WRITE at that offset, `fsync`/`flush` are NBD FLUSH,
//! `fallocate(PUNCH_HOLE|KEEP_SIZE)` and `fallocate(ZERO_RANGE)` are NBD
//! WRITE_ZEROES (which may deallocate but always reads back as zeros; TRIM
//! would leave the content unspecified, which PUNCH_HOLE does not allow).
//!
//! # Control: SIGUSR1 = re-read the export size
//!
//! On `SIGUSR1` the bridge opens a fresh set of NBD connections (a new
//! connection sees the export's current size), and if the export grew it
//! switches to them, serves the new size and invalidates the kernel's cached
//! attributes of the file (`FUSE_NOTIFY_INVAL_INODE`). The next `stat` of the
//! file shows the new size; then `losetup -c /dev/loopN` makes a loop device
//! over the file pick it up (see `attach::refresh_size`). If the export got
//! *smaller* the bridge keeps serving the old size and logs an error: a file
//! never shrinks under data in use. Requests already running finish on the
//! old connections, which are closed once the last of them completes.
//!
//! `SIGTERM`/`SIGINT` unmount the filesystem (lazily if it is busy, e.g. a
//! loop device still holds the file: it is then served until released) and
//! [`run`] returns when the kernel has closed the FUSE connection.
//!
//! # Invariants
//!
//! * The pid file is written (atomically: temp file + rename) only after the
//!   mount exists and the kernel's FUSE INIT has been answered, so a reader
//!   that sees the pid can use the file.
//! * Signal handlers are installed before the mount, so a `SIGUSR1` sent as
//!   soon as the pid file appears never kills the process.
//! * The served size and the connections serving it change together (one
//!   `Arc<NbdPool>` swapped under a lock): a request checked against the new
//!   size is always sent on connections that know the new size (servers such
//!   as nbdkit range-check against the size they announced at connect).
//! * The size never decreases while the bridge runs.
//! * The FUSE session thread never waits for an NBD reply: it validates a
//!   request, writes it to a connection's socket (a WRITE's payload straight
//!   from the session's buffer, never copied) and returns; the connection's
//!   reader task replies to the kernel when NBD answers, with no hop to
//!   another task. The socket write is the only wait (the server's
//!   back-pressure). Every request gets exactly one reply (fuser replies
//!   `EIO` from a dropped reply object).
//! * A request holds the pool it was sent on until its reply is in, so a
//!   pool replaced by a resize closes its connections only after that.
//! * The filesystem itself (one file, its attributes, the checks every
//!   request passes, direct I/O) is `zebu_fuse_file`'s, which the engine
//!   uses to serve its own volume too; this crate is its NBD backend.

pub mod nbd_client;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, error, info, warn};
use zebu_fuse_file::{Errno, FileError, ReplyData, ReplyEmpty, ReplyWrite, SizeNotifier};

use self::nbd_client::{Done, MAX_REQUEST, NbdError, NbdPool, NbdUri};

/// Default number of NBD connections (used when the server allows several).
pub const DEFAULT_CONNECTIONS: usize = 4;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// The export: `nbd+unix:///NAME?socket=PATH` or `nbd://HOST[:PORT]/NAME`.
    pub uri: String,
    /// `MOUNTDIR/NAME`: the FUSE mount point (an existing directory) and the
    /// name of the one file served in it.
    pub file: PathBuf,
    /// Written with the process id once the mount is live.
    pub pidfile: Option<PathBuf>,
    /// Number of NBD connections (≥ 1; more than one only if the server
    /// advertises `CAN_MULTI_CONN`).
    pub connections: usize,
}

/// Every error of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// An argument is unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Talking to the NBD server failed.
    #[error("NBD: {0}")]
    Nbd(#[from] NbdError),
    /// Mounting the file failed.
    #[error("{0}")]
    File(#[from] FileError),
    /// Setting up the runtime, signals, the pid file, or the mount failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BridgeError {
    let context = context.into();
    move |source| BridgeError::Io { context, source }
}

/// The export as the file's backend; also what the signal task resizes.
struct NbdBackend {
    /// The connections in use.
    pool: RwLock<Arc<NbdPool>>,
    /// The served file size: the size `pool` announced, stored after the
    /// pool was swapped in (so a request checked against it is sent on a
    /// pool that knows it), read without the lock on every request.
    size: AtomicU64,
    /// The export's read-only flag at connect.
    read_only: bool,
    uri: NbdUri,
    connections: usize,
    rt: tokio::runtime::Handle,
}

impl NbdBackend {
    fn pool(&self) -> Arc<NbdPool> {
        // A poisoned lock only means a panic elsewhere; the Arc is still valid.
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the export size over new connections; switches to them if
    /// the export grew. Returns the size now served.
    async fn resize(&self, notifier: &SizeNotifier) -> Result<u64, NbdError> {
        let old = self.pool();
        let old_size = old.info().size;
        let new = NbdPool::connect(&self.uri, self.connections).await?;
        let new_size = new.info().size;
        if new_size < old_size {
            error!(
                old_size,
                new_size,
                "the export shrank; refusing to shrink the file under data in use, \
                 still serving {old_size} bytes"
            );
            return Ok(old_size);
        }
        if new_size == old_size {
            info!(size = old_size, "export size unchanged");
            return Ok(old_size);
        }
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        self.size.store(new_size, Ordering::Release);
        notifier.size_changed();
        info!(old_size, new_size, "export grew; serving the new size");
        Ok(new_size)
    }
}

/// `done` as a request's [`Done`], holding `pool` until it runs: a pool
/// closes its connections when dropped (see its `Drop`), and one replaced
/// by a resize must stay open until the replies of its requests are in.
fn holding(
    pool: &Arc<NbdPool>,
    done: impl FnOnce(Result<Bytes, NbdError>) + Send + 'static,
) -> Done {
    let pool = Arc::clone(pool);
    Box::new(move |r| {
        done(r);
        drop(pool);
    })
}

fn errno(e: &NbdError) -> Errno {
    Errno::from_i32(e.errno())
}

// Every request arrives checked against `size()`, stored only once the
// pool that announced it was in use; the pool a request is then sent on is
// that one or a newer, larger one (the size never decreases), so the server
// never sees a request outside the size it announced on that connection.
impl zebu_fuse_file::Backend for NbdBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u64, reply: ReplyData) {
        let pool = self.pool();
        let file_size = pool.info().size;
        let done = move |r: Result<Bytes, NbdError>| match r {
            Ok(data) => reply.data(&data),
            Err(e) => {
                warn!(offset, len, "read: {e}");
                reply.error(errno(&e));
            }
        };
        match u32::try_from(len) {
            // One NBD request (every read the kernel sends): on the wire
            // before this returns; the connection's reader task replies.
            Ok(one) if one <= MAX_REQUEST => {
                self.rt
                    .block_on(pool.submit_read(offset, one, file_size, holding(&pool, done)))
            }
            _ => {
                self.rt
                    .spawn(async move { done(pool.read(offset, len, file_size).await) });
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8], reply: ReplyWrite) {
        let pool = self.pool();
        let file_size = pool.info().size;
        let len = data.len();
        // The caller checked that the length fits in a u32.
        let written = len as u32;
        let done = move |r: Result<(), NbdError>| match r {
            Ok(()) => reply.written(written),
            Err(e) => {
                warn!(offset, len, "write: {e}");
                reply.error(errno(&e));
            }
        };
        if written <= MAX_REQUEST {
            // One NBD request (every write the kernel sends): written to the
            // socket from the session loop's buffer before this returns, so
            // the payload is never copied; the reader task replies.
            self.rt.block_on(pool.submit_write(
                offset,
                data,
                file_size,
                holding(&pool, move |r| done(r.map(drop))),
            ));
        } else {
            // The buffer belongs to the session loop: copy it once.
            let data = data.to_vec();
            self.rt
                .spawn(async move { done(pool.write(offset, &data, file_size).await) });
        }
    }

    fn flush(&self, reply: ReplyEmpty) {
        let pool = self.pool();
        self.rt
            .block_on(pool.submit_flush(holding(&pool, move |r| match r {
                Ok(_) => reply.ok(),
                Err(e) => {
                    warn!("flush: {e}");
                    reply.error(errno(&e));
                }
            })));
    }

    fn write_zeroes(&self, offset: u64, len: u64, reply: ReplyEmpty) {
        let pool = self.pool();
        let file_size = pool.info().size;
        self.rt.spawn(async move {
            match pool.write_zeroes(offset, len, file_size).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    debug!(offset, len, "fallocate: {e}");
                    reply.error(errno(&e));
                }
            }
        });
    }
}

fn write_pidfile(path: &std::path::Path) -> Result<(), BridgeError> {
    let ctx = format!("writing the pid file {}", path.display());
    let pid = format!("{}\n", std::process::id());
    zebu_common::durable::write(path, pid.as_bytes(), 0o644).map_err(io_err(&ctx))
}

/// Serves the export `opts.uri` as the file `opts.file` until the filesystem
/// is unmounted (by `fusermount3 -u`/`umount`, or by SIGTERM/SIGINT). Blocks;
/// see the module docs for the SIGUSR1 resize protocol.
pub fn run(opts: BridgeOptions) -> Result<(), BridgeError> {
    let uri: NbdUri = opts.uri.parse()?;
    if opts.connections == 0 {
        return Err(BridgeError::InvalidArgument(
            "--connections must be at least 1".into(),
        ));
    }
    zebu_fuse_file::split_file(&opts.file)
        .map_err(|e| BridgeError::InvalidArgument(format!("--file {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("zebu-nbd-fuse")
        .enable_all()
        .build()
        .map_err(io_err("starting the tokio runtime"))?;

    // Signals first: SIGUSR1's default action would kill us.
    let (mut usr1, mut term, mut int) = rt
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, io::Error>((
                signal(SignalKind::user_defined1())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(io_err("installing signal handlers"))?;

    let pool = rt.block_on(NbdPool::connect(&uri, opts.connections))?;
    info!(
        uri = %opts.uri,
        size = pool.info().size,
        connections = pool.connections(),
        "connected"
    );
    let backend = Arc::new(NbdBackend {
        size: AtomicU64::new(pool.info().size),
        read_only: pool.info().read_only(),
        pool: RwLock::new(Arc::new(pool)),
        uri,
        connections: opts.connections,
        rt: rt.handle().clone(),
    });
    let mut mounted = zebu_fuse_file::mount(Arc::clone(&backend), &opts.file, "zebu-nbd-fuse")?;
    let notifier = mounted.notifier();
    let mut unmounter = mounted.unmounter();
    let dir = mounted.dir().to_owned();

    let ctl_backend = Arc::clone(&backend);
    let control = rt.spawn(async move {
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    match ctl_backend.resize(&notifier).await {
                        Ok(size) => debug!(size, "resize request handled"),
                        Err(e) => error!("resize: cannot re-read the export size: {e}"),
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        info!("termination signal; unmounting {}", dir.display());
        let _ = tokio::task::spawn_blocking(move || unmounter.unmount()).await;
    });

    if let Some(p) = &opts.pidfile
        && let Err(e) = write_pidfile(p)
    {
        control.abort();
        mounted.unmount();
        return Err(e);
    }

    let served = mounted.run();
    control.abort();
    let pool = backend.pool();
    rt.block_on(pool.disconnect());
    drop(pool);
    rt.shutdown_timeout(Duration::from_secs(5));
    match served {
        Ok(()) => {
            info!("unmounted; exiting");
            Ok(())
        }
        Err(e) => Err(io_err("serving FUSE requests")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_uri_file_and_connection_count_are_refused_before_mounting() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |uri: &str, file: PathBuf, connections| BridgeOptions {
            uri: uri.into(),
            file,
            pidfile: None,
            connections,
        };
        let e = run(opts("http://x", dir.path().join("disk"), 1)).unwrap_err();
        assert!(
            matches!(e, BridgeError::Nbd(NbdError::InvalidUri { .. })),
            "{e}"
        );
        let sock = "nbd+unix:///?socket=/nonexistent/sock";
        let e = run(opts(sock, dir.path().join("disk"), 0)).unwrap_err();
        assert!(matches!(e, BridgeError::InvalidArgument(_)), "{e}");
        let e = run(opts(sock, dir.path().join("missing/disk"), 1)).unwrap_err();
        assert!(matches!(e, BridgeError::InvalidArgument(_)), "{e}");
        assert!(
            e.to_string().contains("mount directory does not exist"),
            "{e}"
        );
        let e = run(opts(sock, dir.path().join("disk"), 1)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sock"), "{e}");
    }
}
