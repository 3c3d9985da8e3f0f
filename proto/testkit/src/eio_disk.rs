//! A disk that fails with EIO on demand, for the fault matrix: a FUSE file
//! served by the test process, a loop device over it, ext4 on the loop
//! device, mounted on a directory that holds a replica's `--dir`. Being a
//! small filesystem of its own, it can also be filled ([`EioDisk::fill`]),
//! and lose power ([`Faults::cut_power`], [`EioDisk::power_cycle`]): every
//! write since the disk's last cache flush is undone, as a disk with a
//! volatile write cache may do.
//!
//! ```text
//! replica ─ ext4 (DIR) ─ /dev/loopN ─ FUSE file (this module, a thread of the test) ─ backing file
//!                                                      ▲
//!                                        Faults: fail reads / fail writes
//! ```
//!
//! # Invariants
//!
//! * While writes fail ([`Faults::fail_writes`]), every WRITE and FSYNC the
//!   kernel sends answers EIO and leaves the backing file unchanged; while
//!   reads fail ([`Faults::fail_reads`]), every READ answers EIO. A request
//!   is judged by the switches when it arrives; nothing is failed later.
//! * The FUSE file is opened `FOPEN_DIRECT_IO`: the kernel keeps no page
//!   cache of it, so every request of the loop device reaches this server
//!   and sees the switches as they are now.
//! * [`EioDisk`] undoes its setup when dropped, also while a test unwinds:
//!   the switches are cleared (so ext4 can write its last metadata), ext4 is
//!   unmounted, the loop device detached, the FUSE file unmounted and its
//!   thread joined. A step that fails is undone lazily; the thread is then
//!   left running rather than joined, never hanging the test.
//! * The FUSE handlers never panic on what the kernel sends: an inode,
//!   offset or length they cannot serve is answered with an error.
//! * A cache flush of the disk is an FSYNC of the FUSE file (the loop
//!   device turns every flush, and the flush that emulates FUA, into one).
//!   Every write served since the last one is recorded with what it
//!   overwrote, so that [`EioDisk::power_cycle`] can undo exactly the
//!   writes a power cut may lose: all of them (the worst case).
//!
//! # What reaches the replica, and when
//!
//! The replica opens its layer data files `O_DIRECT`, so ext4 sends their
//! reads and writes straight to the loop device: a failing disk fails the
//! very read or write that hit it, the replica answers that request with
//! an I/O error (`writing 4096 bytes at …: Input/output error (os error
//! 5)`; the replica itself logs nothing) and the engine ejects it. No page
//! cache above this module holds those blocks, so nothing needs dropping.
//! What is buffered — the CRC files (stored through a shared mapping), the
//! metadata record (sled) and ext4's own metadata — meets the fault only
//! when it is written back: on the replica's FLUSH (its `fdatasync` fails)
//! or when ext4 commits its journal. A journal commit that fails aborts the
//! journal and leaves ext4 read-only until it is unmounted and checked
//! ([`EioDisk::remount`]), so ext4 is mounted with `commit=3600`: only an
//! fsync commits, never a timer firing while a test fails the disk for a
//! moment. Reads of ext4 metadata in the loop device's buffer cache do not
//! reach this module.
//!
//! Needs root (the FUSE mount uses mount(2), `losetup`, `mount`), `/dev/fuse`
//! and e2fsprogs. If the test process is killed outright the stack stays
//! mounted: `umount DIR`, `losetup -d`, `umount` the FUSE directory.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::LONG;
use crate::block::{LoopDev, Mount};
use crate::command::run;

/// The one file the FUSE filesystem serves.
pub const FILE_NAME: &str = "disk";

const INO_ROOT: INodeNo = INodeNo(1);
const INO_FILE: INodeNo = INodeNo(2);
const ATTR_TTL: Duration = Duration::from_secs(1);

/// The switches a test flips while the disk is in use, and what they did.
#[derive(Debug, Default)]
pub struct Faults {
    reads: AtomicBool,
    writes: AtomicBool,
    refused_reads: AtomicU64,
    refused_writes: AtomicU64,
    /// Writes served since the last cache flush, oldest first, each with
    /// the bytes it overwrote. Held while a write is served, so that
    /// overlapping writes are recorded in the order they landed.
    unflushed: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Faults {
    /// From now on, reads fail with EIO (`true`) or are served (`false`).
    pub fn fail_reads(&self, fail: bool) {
        self.reads.store(fail, Ordering::SeqCst);
    }

    /// From now on, writes and cache flushes fail with EIO (`true`) or are
    /// served (`false`).
    pub fn fail_writes(&self, fail: bool) {
        self.writes.store(fail, Ordering::SeqCst);
    }

    /// The power goes: from now on nothing reaches the disk (writes and
    /// flushes fail with EIO) until [`EioDisk::power_cycle`] undoes what
    /// was not flushed and powers it on again.
    pub fn cut_power(&self) {
        self.fail_writes(true);
    }

    /// Serves everything again.
    pub fn heal(&self) {
        self.fail_reads(false);
        self.fail_writes(false);
    }

    /// Reads answered with EIO so far.
    pub fn refused_reads(&self) -> u64 {
        self.refused_reads.load(Ordering::SeqCst)
    }

    /// Writes and flushes answered with EIO so far.
    pub fn refused_writes(&self) -> u64 {
        self.refused_writes.load(Ordering::SeqCst)
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Vec<u8>)>> {
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a read arriving now fails (and counts it).
    fn refuse_read(&self) -> bool {
        let refuse = self.reads.load(Ordering::SeqCst);
        if refuse {
            self.refused_reads.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }

    /// Whether a write or flush arriving now fails (and counts it).
    fn refuse_write(&self) -> bool {
        let refuse = self.writes.load(Ordering::SeqCst);
        if refuse {
            self.refused_writes.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }
}

/// The FUSE filesystem: a root directory holding [`FILE_NAME`], whose
/// content is `backing`.
struct EioFs {
    backing: File,
    size: u64,
    faults: Arc<Faults>,
    started: SystemTime,
}

impl EioFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let file = ino == INO_FILE;
        FileAttr {
            ino,
            size: if file { self.size } else { 0 },
            blocks: if file { self.size.div_ceil(512) } else { 0 },
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if file {
                FileType::RegularFile
            } else {
                FileType::Directory
            },
            perm: if file { 0o600 } else { 0o700 },
            nlink: if file { 1 } else { 2 },
            // Root's, like the mount (no `default_permissions`: the kernel
            // does not check them; the session admits its owner only).
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The length of a request of `len` bytes at `offset` that lies inside
    /// the file, or `None` when it starts beyond the end.
    fn clamp(&self, offset: u64, len: u64) -> Option<u64> {
        (offset <= self.size).then(|| len.min(self.size - offset))
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for EioFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INO_ROOT && name == FILE_NAME {
            reply.entry(&ATTR_TTL, &self.attr(INO_FILE), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INO_ROOT | INO_FILE => reply.attr(&ATTR_TTL, &self.attr(ino)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != INO_FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Only the file is ever opened (`open`), so `ino` is the file's.
        if self.faults.refuse_read() {
            reply.error(Errno::EIO);
            return;
        }
        let Some(len) = self.clamp(offset, u64::from(size)) else {
            reply.data(&[]);
            return;
        };
        // `len` ≤ `size`, a u32: it fits a usize.
        let mut buf = vec![0u8; len as usize];
        match self.backing.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Only the file is ever opened (`open`), so `ino` is the file's.
        let Ok(written) = u32::try_from(data.len()) else {
            reply.error(Errno::EINVAL);
            return;
        };
        // The disk does not grow.
        if self.clamp(offset, data.len() as u64) != Some(data.len() as u64) {
            reply.error(Errno::ENOSPC);
            return;
        }
        if self.faults.refuse_write() {
            reply.error(Errno::EIO);
            return;
        }
        let mut unflushed = self.faults.unflushed();
        let mut old = vec![0u8; data.len()];
        if let Err(e) = self.backing.read_exact_at(&mut old, offset) {
            reply.error(errno(&e));
            return;
        }
        match self.backing.write_all_at(data, offset) {
            Ok(()) => {
                unflushed.push((offset, old));
                reply.written(written)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.faults.refuse_write() {
            reply.error(Errno::EIO);
            return;
        }
        let mut unflushed = self.faults.unflushed();
        match self.backing.sync_data() {
            Ok(()) => {
                // What reached the disk before this flush is durable.
                unflushed.clear();
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of the file: nothing is buffered here.
        reply.ok();
    }
}

/// The FUSE file, served by a thread of this process; unmounted (and the
/// thread joined) when dropped.
struct FuseFile {
    session: Option<BackgroundSession>,
    dir: PathBuf,
}

impl FuseFile {
    /// Mounts the filesystem on `dir` (created first) with `backing` (a
    /// sparse file of `size` bytes, created) as the content of [`FILE_NAME`].
    fn mount(dir: &Path, backing: &Path, size: u64, faults: Arc<Faults>) -> FuseFile {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("creating the FUSE directory {}: {e}", dir.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(backing)
            .unwrap_or_else(|e| panic!("creating the backing file {}: {e}", backing.display()));
        file.set_len(size)
            .unwrap_or_else(|e| panic!("sizing the backing file {}: {e}", backing.display()));
        let fs = EioFs {
            backing: file,
            size,
            faults,
            started: SystemTime::now(),
        };
        // Named in /proc/mounts; served to its owner (root) only.
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("zebu-eio-disk".into())];
        let session = fuser::spawn_mount(fs, dir, &config).unwrap_or_else(|e| {
            panic!(
                "mounting the EIO disk's FUSE file on {} (needs root and /dev/fuse): {e}",
                dir.display()
            )
        });
        FuseFile {
            session: Some(session),
            dir: dir.to_owned(),
        }
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Unmounted, the kernel ends the session and the thread returns.
        if let Err(e) = session.umount_and_join() {
            // Still in use (a loop device left behind): detached lazily and
            // served until the last user lets go; the thread is not joined.
            eprintln!(
                "cleanup: unmounting the EIO disk's FUSE file on {}: {e}; unmounting lazily",
                self.dir.display()
            );
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The whole stack: FUSE file → loop device → ext4 mounted on [`Self::dir`].
/// Fields drop in order: ext4, then the loop device, then the FUSE file.
pub struct EioDisk {
    mount: Option<Mount>,
    loopdev: Option<LoopDev>,
    fuse: Option<FuseFile>,
    faults: Arc<Faults>,
    /// The file holding the disk's content.
    backing: PathBuf,
    /// Where ext4 is mounted: put the replica's `--dir` below it.
    pub dir: PathBuf,
}

impl EioDisk {
    /// Builds the stack under `root` (`root/fuse/disk` backed by
    /// `root/disk.img` of `size` bytes; ext4 mounted on `root/ext4`) with
    /// every request served. Panics, naming the step, when a step fails
    /// (what was set up before is undone).
    pub fn create(root: &Path, size: u64) -> EioDisk {
        let faults = Arc::new(Faults::default());
        let mut disk = EioDisk {
            mount: None,
            loopdev: None,
            fuse: None,
            faults: Arc::clone(&faults),
            backing: root.join("disk.img"),
            dir: root.join("ext4"),
        };
        let fuse_dir = root.join("fuse");
        disk.fuse = Some(FuseFile::mount(&fuse_dir, &disk.backing, size, faults));
        let loopdev = LoopDev::attach(&fuse_dir.join(FILE_NAME));
        // 4 KiB blocks (mke2fs would pick 1 KiB for a small disk); every
        // inode table and the journal written now, not by a background
        // thread while a test fails the disk.
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .args(["-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"])
                .arg(&loopdev.dev),
            LONG,
        )
        .expect_ok();
        disk.mount = Some(mount_ext4(&loopdev, &disk.dir));
        disk.loopdev = Some(loopdev);
        disk
    }

    /// The switches of this disk.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Heals the disk, unmounts ext4, checks it (`e2fsck -f -y`: replays
    /// its journal and repairs what an aborted journal left) and mounts it
    /// again: what a restart after a disk fault sees, with no page cache of
    /// the files above the disk left. Returns e2fsck's output. Nothing may
    /// hold a file below [`Self::dir`] open. Panics when a step fails or
    /// e2fsck leaves errors uncorrected (exit status above 1).
    pub fn remount(&mut self) -> String {
        self.faults.heal();
        self.cycle(false)
    }

    /// After [`Faults::cut_power`]: unmounts ext4 (what it writes then is
    /// lost), undoes every write since the disk's last cache flush, powers
    /// the disk on, drops the loop device's cached blocks, checks ext4 and
    /// mounts it again: what a machine sees when it boots after a power
    /// cut. Returns e2fsck's output and the bytes undone. Nothing may hold a
    /// file below [`Self::dir`] open. Panics as [`Self::remount`] does.
    pub fn power_cycle(&mut self) -> (String, u64) {
        if let Some(mount) = self.mount.take() {
            mount.umount();
        }
        let undone = self.undo_unflushed();
        self.faults.heal();
        (self.cycle(true), undone)
    }

    /// Restores what every unflushed write overwrote, newest first.
    fn undo_unflushed(&self) -> u64 {
        let backing = File::options()
            .write(true)
            .open(&self.backing)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.backing.display()));
        let mut unflushed = self.faults.unflushed();
        let mut undone = 0;
        for (offset, old) in unflushed.drain(..).rev() {
            backing
                .write_all_at(&old, offset)
                .unwrap_or_else(|e| panic!("undoing a write at {offset}: {e}"));
            undone += old.len() as u64;
        }
        undone
    }

    /// Unmounts ext4 if mounted, drops the loop device's cached blocks when
    /// `drop_cache`, checks ext4 and mounts it again.
    fn cycle(&mut self, drop_cache: bool) -> String {
        if let Some(mount) = self.mount.take() {
            mount.umount();
        }
        let loopdev = self.loopdev.as_ref().expect("the loop device is attached");
        if drop_cache {
            run(
                Command::new("blockdev")
                    .arg("--flushbufs")
                    .arg(&loopdev.dev),
                LONG,
            )
            .expect_ok();
        }
        let fsck = run(
            Command::new("e2fsck").args(["-f", "-y"]).arg(&loopdev.dev),
            LONG,
        );
        // 0: no errors; 1: errors corrected.
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "{} left errors ({}):\nstdout: {}\nstderr: {}",
            fsck.what,
            fsck.status,
            fsck.stdout,
            fsck.stderr
        );
        self.mount = Some(mount_ext4(loopdev, &self.dir));
        format!("{}{}", fsck.stdout, fsck.stderr)
    }
}

/// The file [`EioDisk::fill`] creates, in [`EioDisk::dir`].
pub const BALLAST: &str = "ballast";

impl EioDisk {
    /// Fills ext4: [`BALLAST`] takes every free block (the root reserve
    /// too: replicas run as root), so the next write that needs a new block
    /// fails with ENOSPC while blocks already allocated can be rewritten.
    /// Returns the bytes it took. Panics when the file cannot be made.
    pub fn fill(&self) -> u64 {
        use nix::fcntl::{FallocateFlags, fallocate};
        let path = self.dir.join(BALLAST);
        let file =
            File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let mut len: i64 = 0;
        // Large steps, then single blocks: what is left after the last
        // large step that fit.
        for step in [1i64 << 20, 4096] {
            loop {
                match fallocate(&file, FallocateFlags::empty(), len, step) {
                    Ok(()) => len += step,
                    Err(nix::errno::Errno::ENOSPC) => break,
                    Err(e) => panic!("filling {}: {e}", path.display()),
                }
            }
        }
        file.sync_all()
            .unwrap_or_else(|e| panic!("syncing {}: {e}", path.display()));
        len as u64
    }

    /// Frees what [`Self::fill`] took.
    pub fn unfill(&self) {
        let path = self.dir.join(BALLAST);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
    }
}

/// Mounts the ext4 on `loopdev` on `dir`. No journal commit on a timer:
/// only an fsync commits, so a test that fails the disk for a moment does
/// not abort the journal.
fn mount_ext4(loopdev: &LoopDev, dir: &Path) -> Mount {
    Mount::with_options(Path::new(&loopdev.dev), dir, "commit=3600")
}

impl Drop for EioDisk {
    fn drop(&mut self) {
        self.faults.heal();
        drop(self.mount.take());
        drop(self.loopdev.take());
        drop(self.fuse.take());
    }
}
