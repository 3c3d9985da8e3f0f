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
//! * Files are opened `FOPEN_DIRECT_IO` (+ parallel direct writes): no page
//!   cache in the FUSE layer; whatever caches sits above (the loop device).

pub mod nbd_client;

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, WriteFlags,
};
use tracing::{debug, error, info, warn};

use bytes::Bytes;

use self::nbd_client::{Done, MAX_REQUEST, NbdError, NbdPool, NbdUri};

/// Default number of NBD connections (used when the server allows several).
pub const DEFAULT_CONNECTIONS: usize = 4;

/// How long cached attributes of the file and directory stay valid in the
/// kernel. Resizes also invalidate them explicitly; this bounds staleness if
/// that notification is lost.
const ATTR_TTL: Duration = Duration::from_secs(1);

const INO_ROOT: INodeNo = INodeNo(1);
const INO_FILE: INodeNo = INodeNo(2);

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

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

/// State shared by the FUSE handlers and the signal task.
struct Shared {
    /// The connections in use; `pool.info().size` is the served file size.
    pool: RwLock<Arc<NbdPool>>,
    uri: NbdUri,
    connections: usize,
    rt: tokio::runtime::Handle,
    name: OsString,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Shared {
    fn pool(&self) -> Arc<NbdPool> {
        // A poisoned lock only means a panic elsewhere; the Arc is still valid.
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn file_attr(&self, pool: &NbdPool) -> FileAttr {
        let size = pool.info().size;
        FileAttr {
            ino: INO_FILE,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if pool.info().read_only() {
                0o400
            } else {
                0o600
            },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INO_ROOT,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o700,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Re-reads the export size over new connections; switches to them if
    /// the export grew. Returns the size now served.
    async fn resize(&self, notifier: &fuser::Notifier) -> Result<u64, NbdError> {
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
        // Attributes only (offset < 0): there is no page cache to drop.
        match notifier.inval_inode(INO_FILE, -1, 0) {
            Ok(()) => {}
            // The kernel has not looked the file up yet: nothing cached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                warn!("invalidating cached attributes: {e} (they expire within {ATTR_TTL:?})")
            }
        }
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

struct BridgeFs {
    shared: Arc<Shared>,
}

impl Filesystem for BridgeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let the kernel send direct I/O of one caller as concurrent requests.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            debug!("kernel lacks FUSE_ASYNC_DIO");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INO_ROOT && name == self.shared.name {
            let pool = self.shared.pool();
            reply.entry(
                &ATTR_TTL,
                &self.shared.file_attr(&pool),
                fuser::Generation(0),
            );
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INO_ROOT => reply.attr(&ATTR_TTL, &self.shared.dir_attr()),
            INO_FILE => reply.attr(&ATTR_TTL, &self.shared.file_attr(&self.shared.pool())),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Mode, owner and times are fixed; a size change is refused (the size
        // is the export's), setting the current size is a no-op.
        match ino {
            INO_ROOT => reply.attr(&ATTR_TTL, &self.shared.dir_attr()),
            INO_FILE => {
                let pool = self.shared.pool();
                match size {
                    Some(s) if s != pool.info().size => reply.error(Errno::EPERM),
                    _ => reply.attr(&ATTR_TTL, &self.shared.file_attr(&pool)),
                }
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INO_ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (INO_ROOT, FileType::Directory, OsStr::new(".")),
            (INO_ROOT, FileType::Directory, OsStr::new("..")),
            (
                INO_FILE,
                FileType::RegularFile,
                self.shared.name.as_os_str(),
            ),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INO_FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && self.shared.pool().info().read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != INO_FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let pool = self.shared.pool();
        let file_size = pool.info().size;
        // Short read at the end of the file (direct I/O: the caller sees it).
        let len = u64::from(size).min(file_size.saturating_sub(offset));
        if len == 0 {
            reply.data(&[]);
            return;
        }
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
            Ok(one) if one <= MAX_REQUEST => self.shared.rt.block_on(pool.submit_read(
                offset,
                one,
                file_size,
                holding(&pool, done),
            )),
            _ => {
                self.shared
                    .rt
                    .spawn(async move { done(pool.read(offset, len, file_size).await) });
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != INO_FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let pool = self.shared.pool();
        let file_size = pool.info().size;
        if pool.info().read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let Ok(written) = u32::try_from(data.len()) else {
            reply.error(Errno::EINVAL);
            return;
        };
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= file_size => {}
            // The file cannot grow by writing past its end.
            _ => {
                reply.error(Errno::ENOSPC);
                return;
            }
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        let len = data.len();
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
            self.shared.rt.block_on(pool.submit_write(
                offset,
                data,
                file_size,
                holding(&pool, move |r| done(r.map(drop))),
            ));
        } else {
            // The buffer belongs to the session loop: copy it once.
            let data = data.to_vec();
            self.shared
                .rt
                .spawn(async move { done(pool.write(offset, &data, file_size).await) });
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes (and no warning per lookup of security.*).
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.shared.pool().info().size / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != INO_FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let pool = self.shared.pool();
        let file_size = pool.info().size;
        let Some(end) = offset.checked_add(length) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        if end > file_size && !keep_size {
            // Would grow the file.
            reply.error(Errno::ENOSPC);
            return;
        }
        let end = end.min(file_size);
        let len = end.saturating_sub(offset);
        let zero = match mode & !FALLOC_FL_KEEP_SIZE {
            // Preallocation: the export is all there already.
            0 => false,
            FALLOC_FL_PUNCH_HOLE if keep_size => true,
            FALLOC_FL_ZERO_RANGE => true,
            _ => {
                reply.error(Errno::EOPNOTSUPP);
                return;
            }
        };
        if !zero || len == 0 {
            reply.ok();
            return;
        }
        self.shared.rt.spawn(async move {
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

impl BridgeFs {
    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        if ino != INO_FILE {
            reply.ok();
            return;
        }
        let pool = self.shared.pool();
        self.shared
            .rt
            .block_on(pool.submit_flush(holding(&pool, move |r| match r {
                Ok(_) => reply.ok(),
                Err(e) => {
                    warn!("flush: {e}");
                    reply.error(errno(&e));
                }
            })));
    }
}

/// Splits `MOUNTDIR/NAME`.
fn split_file(file: &Path) -> Result<(PathBuf, OsString), BridgeError> {
    let bad = |why: &str| BridgeError::InvalidArgument(format!("--file {}: {why}", file.display()));
    let name = file
        .file_name()
        .ok_or_else(|| bad("no file name (expected MOUNTDIR/NAME)"))?;
    if name == "." || name == ".." {
        return Err(bad("the file name cannot be . or .."));
    }
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(bad("the mount directory does not exist"));
    }
    Ok((dir, name.to_owned()))
}

fn write_pidfile(path: &Path) -> Result<(), BridgeError> {
    let ctx = format!("writing the pid file {}", path.display());
    let pid = format!("{}\n", std::process::id());
    zebu_common::durable::write(path, pid.as_bytes(), 0o644).map_err(io_err(&ctx))
}

/// Unmounts `dir`; lazily when it is busy (a loop device holds the file: the
/// bridge then keeps serving until the last user lets go).
fn unmount(unmounter: &mut fuser::SessionUnmounter, dir: &Path) {
    match unmounter.unmount() {
        Ok(()) => info!("unmounted {}", dir.display()),
        Err(e) => {
            warn!("unmounting {}: {e}; unmounting lazily", dir.display());
            if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
                error!("lazy unmount of {}: {e}", dir.display());
            }
        }
    }
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
    let (dir, name) = split_file(&opts.file)?;
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
    // /proc/self belongs to the effective uid and gid.
    let (uid, gid) = std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .map_err(io_err("reading /proc/self"))?;
    let shared = Arc::new(Shared {
        pool: RwLock::new(Arc::new(pool)),
        uri,
        connections: opts.connections,
        rt: rt.handle().clone(),
        name,
        uid,
        gid,
        started: SystemTime::now(),
    });

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("zebu-nbd-fuse".into()),
        MountOption::Subtype("zebu-nbd-fuse".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(1);
    let fs = BridgeFs {
        shared: Arc::clone(&shared),
    };
    let mut session = fuser::Session::new(fs, &dir, &config)
        .map_err(io_err(format!("mounting FUSE on {}", dir.display())))?;
    let notifier = session.notifier();
    let mut unmounter = session.unmount_callable();
    info!(file = %opts.file.display(), "mounted");

    let ctl_shared = Arc::clone(&shared);
    let ctl_dir = dir.clone();
    let control = rt.spawn(async move {
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    match ctl_shared.resize(&notifier).await {
                        Ok(size) => debug!(size, "resize request handled"),
                        Err(e) => error!("resize: cannot re-read the export size: {e}"),
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        info!("termination signal; unmounting {}", ctl_dir.display());
        let d = ctl_dir.clone();
        let _ = tokio::task::spawn_blocking(move || unmount(&mut unmounter, &d)).await;
    });

    if let Some(p) = &opts.pidfile
        && let Err(e) = write_pidfile(p)
    {
        control.abort();
        if let Err(ue) = session.unmount() {
            warn!("unmounting after a failed start: {ue}");
        }
        return Err(e);
    }

    let served = session.run();
    control.abort();
    let pool = shared.pool();
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
    fn file_argument_is_split_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (d, n) = split_file(&dir.path().join("disk")).unwrap();
        assert_eq!(d, dir.path());
        assert_eq!(n, "disk");
        assert!(split_file(&dir.path().join("missing/disk")).is_err());
        assert!(split_file(Path::new("/")).is_err());
    }

    #[test]
    fn bad_uri_and_connection_count_are_refused_before_mounting() {
        let dir = tempfile::tempdir().unwrap();
        let e = run(BridgeOptions {
            uri: "http://x".into(),
            file: dir.path().join("disk"),
            pidfile: None,
            connections: 1,
        })
        .unwrap_err();
        assert!(
            matches!(e, BridgeError::Nbd(NbdError::InvalidUri { .. })),
            "{e}"
        );
        let e = run(BridgeOptions {
            uri: "nbd+unix:///?socket=/nonexistent/sock".into(),
            file: dir.path().join("disk"),
            pidfile: None,
            connections: 0,
        })
        .unwrap_err();
        assert!(matches!(e, BridgeError::InvalidArgument(_)), "{e}");
        let e = run(BridgeOptions {
            uri: "nbd+unix:///?socket=/nonexistent/sock".into(),
            file: dir.path().join("disk"),
            pidfile: None,
            connections: 1,
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sock"), "{e}");
    }
}
