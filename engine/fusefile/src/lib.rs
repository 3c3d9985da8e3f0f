//! One block device served as one regular file on a private FUSE mount: the
//! file a loop device is set up over, so a node without an `nbd` or `ublk`
//! driver still gets a block device.
//!
//! ```text
//! /dev/loopN ─ MOUNTDIR/NAME (FUSE, this crate) ─ Backend (the engine's volume, or an NBD export)
//! ```
//!
//! [`mount`] mounts a filesystem on `MOUNTDIR` holding one file, `NAME`
//! (mode 0600, 0400 when the backend is read-only), whose size is the
//! backend's and whose content is the backend's: reads and writes at an
//! offset are the backend's reads and writes there, `fsync`/`flush` are its
//! flush, `fallocate(PUNCH_HOLE|KEEP_SIZE)` and `fallocate(ZERO_RANGE)` are
//! its write-zeroes (never a discard: the range must read back as zeros).
//! [`Mounted::run`] serves it until the filesystem is unmounted.
//!
//! Two backends use it: the engine serves its own volume this way (no other
//! process or socket on the path of a request), and `zebu-nbd-fuse` serves
//! any NBD export.
//!
//! # Invariants
//!
//! * Every request the backend sees is checked here first: inside the size
//!   the backend reported when it arrived, not empty, and a write or zeroing
//!   only when the backend is writable. A file never grows by writing past
//!   its end (`ENOSPC`), and its size is never set (`EPERM`).
//! * The backend's size never decreases while mounted (the backend keeps
//!   that promise); after it grows, [`SizeNotifier::size_changed`] drops the
//!   kernel's cached attributes so the next `stat` sees the new size.
//! * Every request gets exactly one reply: a backend takes the `fuser`
//!   reply object and answers it when the I/O is done (`fuser` answers
//!   `EIO` for a reply object dropped unanswered).
//! * The file is opened `FOPEN_DIRECT_IO` + `FOPEN_PARALLEL_DIRECT_WRITES`,
//!   and `FUSE_ASYNC_DIO` is asked for: no page cache in the FUSE layer, and
//!   concurrent direct I/O from the loop device reaches the backend as
//!   concurrent requests, up to [`MAX_BACKGROUND`] at once.
//! * One session thread reads the kernel's requests; a backend must not
//!   block it on I/O (it starts the I/O and replies from wherever the I/O
//!   completes).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyDirectory,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL, WriteFlags,
};
pub use fuser::{Errno, ReplyData, ReplyEmpty, ReplyWrite};
use tracing::{debug, error, info, warn};

/// How long cached attributes of the file and directory stay valid in the
/// kernel. A resize also invalidates them explicitly; this bounds staleness
/// if that notification is lost.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// Most requests the kernel keeps outstanding at the backend for
/// asynchronous direct I/O (FUSE's "background" requests, which is what a
/// loop device with direct I/O sends); beyond it, the submitter sleeps until
/// one is answered. At fuser's default, 16, a loop device at QD32 reached
/// the backend 16 requests at a time and its worker was put to sleep and
/// woken again for every reply. Measured through ext4 on the engine's file
/// (4 KiB random writes, QD32, 3 replicas, alternating pairs): 128 wrote
/// 37% more and cost 27% less CPU per write over Zebu's processes. 128 is a
/// loop device's queue depth, so the loop device never waits for the file;
/// the engine takes up to 256 requests from one NBD connection, too.
pub const MAX_BACKGROUND: u16 = 128;

const INO_ROOT: INodeNo = INodeNo(1);
const INO_FILE: INodeNo = INodeNo(2);

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// What the file serves. Every call gets a request already checked against
/// [`Backend::size`] (see the module's invariants) and must answer `reply`
/// exactly once, without blocking the calling (session) thread on I/O.
pub trait Backend: Send + Sync + 'static {
    /// The size in bytes now. Never decreases.
    fn size(&self) -> u64;
    /// True when the backend takes no writes.
    fn read_only(&self) -> bool;
    /// Reads `len` (> 0) bytes at `offset`; `reply.data` gets exactly `len`.
    fn read(&self, offset: u64, len: u64, reply: ReplyData);
    /// Writes `data` (not empty) at `offset`. `data` is the session's buffer:
    /// send it or copy it before returning.
    fn write(&self, offset: u64, data: &[u8], reply: ReplyWrite);
    /// Makes every write that was answered before this call durable.
    fn flush(&self, reply: ReplyEmpty);
    /// Makes `len` (> 0) bytes at `offset` read back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, reply: ReplyEmpty);
    /// The file was opened (a loop device set up over it, a tool reading it).
    fn opened(&self) {}
    /// An open of the file was released.
    fn released(&self) {}
}

/// Every error of [`mount`].
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The `MOUNTDIR/NAME` argument is unusable.
    #[error("{path}: {why}")]
    InvalidPath {
        /// The argument.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Mounting failed.
    #[error("mounting FUSE on {dir}: {source}")]
    Mount {
        /// The mount point.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading our own uid and gid failed.
    #[error("reading /proc/self: {0}")]
    Identity(#[source] io::Error),
    /// Starting the thread that serves the mount failed.
    #[error("starting to serve the file: {0}")]
    Serve(#[source] io::Error),
}

/// Splits `MOUNTDIR/NAME` and checks that `MOUNTDIR` exists. A dead FUSE
/// mount on `MOUNTDIR` (its server was killed: every access fails with
/// `ENOTCONN`) is detached first, so a restarted server mounts again.
pub fn split_file(file: &Path) -> Result<(PathBuf, OsString), FileError> {
    let bad = |why| FileError::InvalidPath {
        path: file.to_owned(),
        why,
    };
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
    detach_if_dead(&dir);
    if !dir.is_dir() {
        return Err(bad("the mount directory does not exist"));
    }
    Ok((dir, name.to_owned()))
}

/// Detaches a dead FUSE mount on `dir` (its server was killed: every
/// access fails with `ENOTCONN`); anything else is left alone. `statfs`
/// always asks the server (a `stat` may be answered from cached
/// attributes), so a dead connection shows at once. Failures are logged.
pub fn detach_if_dead(dir: &Path) {
    if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(dir) {
        warn!("{}: a dead FUSE mount; detaching it", dir.display());
        if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            warn!("detaching the dead mount on {}: {e}", dir.display());
        }
    }
}

/// A mounted file, not served yet: [`Mounted::run`] serves it.
pub struct Mounted<B: Backend> {
    session: fuser::Session<FileFs<B>>,
    dir: PathBuf,
}

/// Drops the kernel's cached attributes of the file after its backend grew.
pub struct SizeNotifier(fuser::Notifier);

impl SizeNotifier {
    /// The backend's size changed: the next `stat` of the file asks again.
    pub fn size_changed(&self) {
        // Attributes only (offset < 0): there is no page cache to drop.
        match self.0.inval_inode(INO_FILE, -1, 0) {
            Ok(()) => {}
            // The kernel has not looked the file up yet: nothing cached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                warn!("invalidating cached attributes: {e} (they expire within {ATTR_TTL:?})")
            }
        }
    }
}

/// Unmounts a [`Mounted`] from another thread.
pub struct Unmounter {
    inner: fuser::SessionUnmounter,
    dir: PathBuf,
}

impl Unmounter {
    /// Unmounts; lazily when the file is busy (a loop device holds it: the
    /// file is then served until the last user lets go, and
    /// [`Mounted::run`] returns after that).
    pub fn unmount(&mut self) {
        match self.inner.unmount() {
            Ok(()) => info!("unmounted {}", self.dir.display()),
            Err(e) => {
                warn!("unmounting {}: {e}; unmounting lazily", self.dir.display());
                if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
                    error!("lazy unmount of {}: {e}", self.dir.display());
                }
            }
        }
    }
}

impl<B: Backend> Mounted<B> {
    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What tells the kernel the size changed.
    pub fn notifier(&self) -> SizeNotifier {
        SizeNotifier(self.session.notifier())
    }

    /// What unmounts it from elsewhere.
    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter {
            inner: self.session.unmount_callable(),
            dir: self.dir.clone(),
        }
    }

    /// Serves requests on this thread until the filesystem is unmounted.
    pub fn run(self) -> io::Result<()> {
        self.session.run()
    }

    /// Unmounts without serving (a start that failed after the mount).
    pub fn unmount(mut self) {
        if let Err(e) = self.session.unmount() {
            warn!("unmounting {}: {e}", self.dir.display());
        }
    }
}

/// Mounts a filesystem on `file`'s directory serving `backend` as `file`,
/// named `fsname` in the mount table. The kernel's INIT is answered by the
/// time this returns, so the file can be used once [`Mounted::run`] runs.
pub fn mount<B: Backend>(
    backend: Arc<B>,
    file: &Path,
    fsname: &str,
) -> Result<Mounted<B>, FileError> {
    let (dir, name) = split_file(file)?;
    // /proc/self belongs to the effective uid and gid.
    let (uid, gid) = std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .map_err(FileError::Identity)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname.into()),
        MountOption::Subtype(fsname.into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(1);
    let fs = FileFs {
        backend,
        name,
        uid,
        gid,
        started: SystemTime::now(),
    };
    let session = fuser::Session::new(fs, &dir, &config).map_err(|source| FileError::Mount {
        dir: dir.clone(),
        source,
    })?;
    info!(file = %file.display(), "mounted");
    Ok(Mounted { session, dir })
}

struct FileFs<B> {
    backend: Arc<B>,
    name: OsString,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl<B: Backend> FileFs<B> {
    fn attr(&self, ino: INodeNo, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self) -> FileAttr {
        let perm = if self.backend.read_only() {
            0o400
        } else {
            0o600
        };
        self.attr(
            INO_FILE,
            FileType::RegularFile,
            self.backend.size(),
            perm,
            1,
        )
    }

    fn dir_attr(&self) -> FileAttr {
        self.attr(INO_ROOT, FileType::Directory, 0, 0o700, 2)
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        if ino == INO_FILE {
            self.backend.flush(reply);
        } else {
            reply.ok();
        }
    }
}

impl<B: Backend> Filesystem for FileFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let the kernel send direct I/O of one caller as concurrent requests.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            debug!("kernel lacks FUSE_ASYNC_DIO");
        }
        // Let that many reach the backend at once (see MAX_BACKGROUND).
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            debug!(
                nearest,
                "the kernel config refused {MAX_BACKGROUND} background requests"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INO_ROOT && name == self.name {
            reply.entry(&ATTR_TTL, &self.file_attr(), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INO_ROOT => reply.attr(&ATTR_TTL, &self.dir_attr()),
            INO_FILE => reply.attr(&ATTR_TTL, &self.file_attr()),
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
        // is the backend's), setting the current size is a no-op.
        match ino {
            INO_ROOT => reply.attr(&ATTR_TTL, &self.dir_attr()),
            INO_FILE => {
                let attr = self.file_attr();
                match size {
                    Some(s) if s != attr.size => reply.error(Errno::EPERM),
                    _ => reply.attr(&ATTR_TTL, &attr),
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
            (INO_FILE, FileType::RegularFile, self.name.as_os_str()),
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
        if flags.acc_mode() != OpenAccMode::O_RDONLY && self.backend.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        self.backend.opened();
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == INO_FILE {
            self.backend.released();
        }
        reply.ok();
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
        // Short read at the end of the file (direct I/O: the caller sees it).
        let len = u64::from(size).min(self.backend.size().saturating_sub(offset));
        if len == 0 {
            reply.data(&[]);
            return;
        }
        self.backend.read(offset, len, reply);
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
        if self.backend.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        if u32::try_from(data.len()).is_err() {
            reply.error(Errno::EINVAL);
            return;
        }
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= self.backend.size() => {}
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
        self.backend.write(offset, data, reply);
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
        let blocks = self.backend.size() / 4096;
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
        match fallocate_range(mode, offset, length, self.backend.size()) {
            Err(e) => reply.error(e),
            Ok(None) => reply.ok(),
            Ok(Some(_)) if self.backend.read_only() => reply.error(Errno::EROFS),
            Ok(Some((offset, len))) => self.backend.write_zeroes(offset, len, reply),
        }
    }
}

/// What `fallocate(mode, offset, length)` on a file of `size` bytes asks of
/// the backend: nothing (`None`: preallocation, or an empty range), zeros
/// over a range, or an error.
fn fallocate_range(
    mode: i32,
    offset: u64,
    length: u64,
    size: u64,
) -> Result<Option<(u64, u64)>, Errno> {
    let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
    let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
    if end > size && !keep_size {
        // Would grow the file.
        return Err(Errno::ENOSPC);
    }
    let len = end.min(size).saturating_sub(offset);
    let zero = match mode & !FALLOC_FL_KEEP_SIZE {
        // Preallocation: the device is all there already.
        0 => false,
        FALLOC_FL_PUNCH_HOLE if keep_size => true,
        FALLOC_FL_ZERO_RANGE => true,
        _ => return Err(Errno::EOPNOTSUPP),
    };
    Ok((zero && len > 0).then_some((offset, len)))
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
        let e = split_file(&dir.path().join("missing/disk")).unwrap_err();
        assert!(
            e.to_string().contains("mount directory does not exist"),
            "{e}"
        );
        assert!(split_file(Path::new("/")).is_err());
        assert!(split_file(&dir.path().join("..")).is_err());
    }

    #[test]
    fn fallocate_modes_map_to_zeroing_or_nothing() {
        let size = 1 << 20;
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        assert_eq!(fallocate_range(0, 0, 4096, size), Ok(None));
        assert_eq!(
            fallocate_range(punch, 4096, 8192, size),
            Ok(Some((4096, 8192)))
        );
        assert_eq!(
            fallocate_range(FALLOC_FL_ZERO_RANGE, 0, 512, size),
            Ok(Some((0, 512)))
        );
        // Past the end with KEEP_SIZE: clipped to the file.
        assert_eq!(
            fallocate_range(punch, size - 4096, 1 << 30, size),
            Ok(Some((size - 4096, 4096)))
        );
        // Growing the file, punching without KEEP_SIZE, unknown modes.
        assert_eq!(fallocate_range(0, size, 1, size), Err(Errno::ENOSPC));
        assert_eq!(
            fallocate_range(FALLOC_FL_PUNCH_HOLE, 0, 1, size),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(fallocate_range(0x20, 0, 1, size), Err(Errno::EOPNOTSUPP));
        assert_eq!(fallocate_range(0, u64::MAX, 2, size), Err(Errno::EINVAL));
        // Empty after clipping.
        assert_eq!(fallocate_range(punch, size, 4096, size), Ok(None));
    }
}
