//! A layer's CRC file mapped into memory.
//!
//! The CRC file holds the crc32 of block `b` as 4 little-endian bytes at
//! byte `b * 4`. Writing an entry with `pwrite` costs a system call and a
//! trip through the filesystem's buffered-write path (page lookup, journal
//! handle, timestamp update) for 4 bytes, once per replicated write; with
//! the file mapped `MAP_SHARED`, storing an entry is a memory store into the
//! same page-cache page, and the kernel writes the dirty pages back on its
//! own or when the replica flushes. Reads with `pread` and the mapping see
//! the same page cache, so they agree at all times.
//!
//! # Written in full: one cache flush per FLUSH
//!
//! The mapped range is *written* on disk, not only allocated: bytes the
//! file gains are written as zeros (and synced once) when it is mapped, so
//! no block of it is a hole or an unwritten extent. Writing a dirty page
//! back then changes no filesystem metadata, and a replica's FLUSH can
//! write the CRC pages back without a cache flush of the disk
//! (`sync_file_range`) before it `fdatasync`s the data file, whose cache
//! flush makes both durable: one cache flush instead of two, and no journal
//! commit for the CRC file's timestamps (measured here: 2.5–4.5 ms per
//! FLUSH with two `fdatasync`s, 0.2–0.5 ms with one). A file whose old
//! bytes may not be written (a layer from before this rule, until the
//! replica rewrites it; or a full disk) says so ([`CrcMap::written`]) and
//! is `fdatasync`'ed as before.
//!
//! # One page per folio: a FLUSH writes back what changed
//!
//! The page cache may hold a file in large folios (ext4 does, since Linux
//! 6.x), and a store into a folio dirties all of it: with the zeros above
//! cached in folios of up to a megabyte, every FLUSH wrote back a megabyte
//! of CRCs per layer for one 4 KiB write (measured: 1,052,672 bytes, and
//! flushes about twice as slow). So the file's cached pages are dropped
//! before it is mapped and the mapping is `MADV_RANDOM`: its faults read
//! one page into a folio of one page, and a FLUSH writes back 4 KiB per
//! CRC page stored into since the last (`replica/tests/power_loss.rs`).
//!
//! Invariants:
//! - Entries are stored only while the file's first `entries * 4` bytes are
//!   allocated on disk, so storing into a page never needs the filesystem
//!   to find space: a full disk is reported as an error (when the layer is
//!   created or grown, or by the store), never as a `SIGBUS` in the middle
//!   of a write. Opening an existing layer on a full disk maps it anyway
//!   ([`Space::TryReserve`]), so the replica still starts and serves reads;
//!   each store then retries the allocation first (`fallocate`), and the
//!   map is not [`CrcMap::written`].
//! - [`CrcMap::written`] is true only when every mapped byte is written on
//!   disk and that is durable (the file was synced after the zeros).
//! - Entries are accessed as [`AtomicU32`]: a rebuild may read entries on
//!   another thread while the runtime thread stores them.
//! - All `unsafe` of this module is the mapping's lifetime (the pointer is
//!   valid for `entries` entries from [`CrcMap::map`] until drop) and one
//!   system call nix does not wrap (`sync_file_range`).

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};

/// Whether a full disk may stop [`CrcMap::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// The entries' space must be allocated (a new or growing layer).
    Reserve,
    /// Map even when the space cannot be allocated now (opening an
    /// existing layer); stores allocate it first.
    TryReserve,
}

/// A shared, writable mapping of the first `entries` entries of a CRC file.
#[derive(Debug)]
pub struct CrcMap {
    /// Start of the mapping; dangling (and never dereferenced) when
    /// `entries` is 0.
    ptr: NonNull<AtomicU32>,
    entries: usize,
    /// The mapped range is allocated on disk (or the filesystem cannot
    /// preallocate at all).
    reserved: AtomicBool,
    /// Every mapped byte is written on disk, durably (see the module docs).
    written: bool,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics;
// the pointer is valid on any thread for the map's whole life.
unsafe impl Send for CrcMap {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for CrcMap {}

impl CrcMap {
    /// Extends `file` to hold at least `entries` entries (it is never
    /// shortened), writing the bytes it gains as zeros, and maps them.
    /// `old_written` says the file's existing bytes are all written on disk
    /// (true for a new, empty file); the map is [`CrcMap::written`] when
    /// they are and the new ones could be written. On a full disk this
    /// fails with `ENOSPC` under [`Space::Reserve`]; under
    /// [`Space::TryReserve`] it maps them unreserved.
    pub fn map(file: &File, entries: u64, space: Space, old_written: bool) -> io::Result<CrcMap> {
        let bytes = entries
            .checked_mul(4)
            .filter(|b| usize::try_from(*b).is_ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a CRC map of {entries} entries does not fit in memory"),
                )
            })?;
        let Some(len) = NonZeroUsize::new(bytes as usize) else {
            return Ok(CrcMap {
                ptr: NonNull::dangling(),
                entries: 0,
                reserved: AtomicBool::new(true),
                written: true,
            });
        };
        let mut written = old_written;
        let old_len = file.metadata()?.len();
        if old_len < bytes {
            match write_zeros(file, old_len, bytes) {
                Ok(()) => {}
                Err(e) if space == Space::TryReserve && e.raw_os_error() == Some(libc::ENOSPC) => {
                    written = false;
                    file.set_len(bytes)?;
                }
                Err(e) => return Err(e),
            }
        }
        let reserved = match reserve(file, bytes) {
            Ok(()) => true,
            Err(e) if space == Space::TryReserve && e.raw_os_error() == Some(libc::ENOSPC) => {
                written = false;
                tracing::warn!(
                    bytes,
                    "no space to allocate the CRC file; serving it anyway: writes fail with \
                     ENOSPC until there is room"
                );
                false
            }
            Err(e) => return Err(e),
        };
        // The zeros above went through the buffered write path, which caches
        // them in large folios (up to megabytes); a store into such a folio
        // dirties all of it, and a FLUSH would write all of it back.
        // Dropping the (clean, synced) cached pages before mapping lets the
        // mapping's faults read the file back one page at a time.
        drop_cached_pages(file);
        // SAFETY: a new mapping chosen by the kernel (no address hint), so it
        // overlaps nothing of ours; `file` is open read-write, as PROT_WRITE
        // with MAP_SHARED requires. The mapping stays valid after `file` is
        // closed and lives until `drop` unmaps it. Its first `bytes` bytes
        // are backed by the file (extended above), so no access within
        // `entries` entries faults for lack of backing.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mapping the CRC file: {e}"),
            )
        })?;
        // No readahead on faults: each fault reads one page into a folio of
        // one page, so a store dirties 4 KiB and a FLUSH writes back only
        // the pages stored into since the last one.
        // SAFETY: `ptr` and `len` are exactly the mapping just made; the
        // advice changes how its faults read the file, not its contents or
        // its validity.
        if let Err(e) = unsafe { madvise(ptr, len.get(), MmapAdvise::MADV_RANDOM) } {
            tracing::warn!(error = %e, "madvise(MADV_RANDOM) on a CRC map failed; its flushes may write back more than they must");
        }
        Ok(CrcMap {
            // Page-aligned, hence aligned for AtomicU32.
            ptr: ptr.cast(),
            entries: entries as usize,
            reserved: AtomicBool::new(reserved),
            written,
        })
    }

    /// Every mapped byte is written on disk, durably: writing dirty pages
    /// back (`sync_file_range`) before a cache flush of the disk makes the
    /// stored entries durable, with no `fdatasync` of this file.
    pub fn written(&self) -> bool {
        self.written
    }

    /// Number of entries mapped.
    pub fn entries(&self) -> u64 {
        self.entries as u64
    }

    fn slots(&self) -> &[AtomicU32] {
        if self.entries == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to a live mapping of `entries * 4` bytes
        // (see `map`), page-aligned, that only this map unmaps (in drop,
        // which cannot run while `&self` is borrowed). AtomicU32 has the
        // size and alignment of u32 and allows shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.entries) }
    }

    /// Stores CRC-file bytes (4 little-endian bytes per block, as
    /// `layer::block_crcs` makes them) for the blocks from `first` on.
    /// `file` is the mapped file: when [`Self::map`] could not allocate the
    /// mapped range, it is allocated first. Fails, storing nothing, if the
    /// entries run past the mapped ones or the disk is still full (`ENOSPC`).
    pub fn store(&self, file: &File, first: u64, crc_bytes: &[u8]) -> io::Result<()> {
        if !self.reserved.load(Ordering::Acquire) {
            reserve(file, self.entries as u64 * 4)?;
            self.reserved.store(true, Ordering::Release);
        }
        let n = crc_bytes.len() / 4;
        let slots = self.slots();
        let range = usize::try_from(first)
            .ok()
            .and_then(|f| Some(f..f.checked_add(n)?))
            .filter(|r| r.end <= slots.len())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "CRC entries {first}..+{n} are past the {} entries of the layer",
                        slots.len()
                    ),
                )
            })?;
        for (slot, c) in slots[range].iter().zip(crc_bytes.chunks_exact(4)) {
            slot.store(
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// The CRCs of blocks `[first, first + count)`; entries past the mapped
    /// ones read as 0, like never-written entries.
    pub fn load(&self, first: u64, count: u64) -> Vec<u32> {
        (0..count)
            .map(|i| first.checked_add(i).map_or(0, |b| self.get(b)))
            .collect()
    }

    /// The CRC of block `block`; 0 past the mapped entries.
    pub fn get(&self, block: u64) -> u32 {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.slots().get(b))
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

/// Writes zeros over `[from, to)` of `file` (extending it), then syncs it:
/// the blocks are allocated and written, and that is durable. `ENOSPC`
/// keeps its errno.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(to - from) as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

/// Rewrites every byte of `file` in place with what it holds (so no block
/// stays a hole or an unwritten extent), then syncs it. For CRC files made
/// before they were written in full; the content is unchanged.
pub fn write_in_place(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

/// Starts writing `file`'s dirty pages back and returns without waiting
/// (`sync_file_range` with `WRITE` only): nothing is made durable, no
/// metadata is written and the disk's cache is not flushed. A later wait on
/// the file ([`write_back`], or `fdatasync`) waits for these writes and
/// reports one that failed: the kernel keeps a write-back error for the
/// next wait on each open file.
///
/// Called on the runtime thread: it only queues the pages' writes to the
/// disk. Through io_uring it would go to a worker thread, a thread wake-up
/// per call (measured on the commit-like load it serves: about 7% more CPU
/// per write and FLUSH, for no faster FLUSH).
pub fn start_write_back(file: &File) -> io::Result<()> {
    sync_file_range(file, libc::SYNC_FILE_RANGE_WRITE)
}

/// Writes `file`'s dirty pages back and waits for them, and for any
/// write-back already running (`sync_file_range` with `WAIT_BEFORE | WRITE
/// | WAIT_AFTER`): no metadata, no cache flush of the disk. What the
/// thread-run FLUSH does before it fdatasyncs the data file; io_uring's
/// `SyncFileRange` entry does the same.
pub fn write_back(file: &File) -> io::Result<()> {
    sync_file_range(
        file,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

/// `sync_file_range` over the whole file, which nix does not wrap.
fn sync_file_range(file: &File, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Offset 0, length 0: the whole file.
    // SAFETY: a system call on an fd that `file` keeps open; it touches no
    // memory of this process.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to drop `file`'s clean cached pages that nothing maps
/// (advice: a failure only costs larger write-backs, so it is logged).
fn drop_cached_pages(file: &File) {
    if let Err(e) = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::warn!(error = %e, "dropping a CRC file's cached pages failed; its flushes may write back more than they must");
    }
}

/// Allocates the first `bytes` bytes of `file` on disk. Filesystems that
/// cannot preallocate are let through with a warning: there a full disk
/// stops the replica (`SIGBUS`) instead of failing the write.
fn reserve(file: &File, bytes: u64) -> io::Result<()> {
    match fallocate(
        file.as_fd(),
        FallocateFlags::empty(),
        0,
        bytes as libc::off_t,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            tracing::warn!(
                "the filesystem cannot preallocate the CRC file; a full disk will stop the replica \
                 (SIGBUS) instead of failing the write"
            );
            Ok(())
        }
        // The errno is kept (not wrapped in a message) so that callers can
        // tell a full disk from other failures; they add the context.
        Err(e) => Err(io::Error::from(e)),
    }
}

impl Drop for CrcMap {
    fn drop(&mut self) {
        if self.entries == 0 {
            return;
        }
        // SAFETY: `ptr` and `entries * 4` are exactly the mapping made in
        // `map`, not unmapped before; no borrow of it outlives `&mut self`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.entries * 4) } {
            tracing::error!(error = %e, "unmapping a CRC file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::MetadataExt;

    fn crc_file(dir: &tempfile::TempDir) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("0.crc"))
            .unwrap()
    }

    #[test]
    fn stored_entries_are_in_the_file_and_file_writes_are_in_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let f = crc_file(&dir);
        let m = CrcMap::map(&f, 5000, Space::Reserve, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 20_000);
        assert!(
            f.metadata().unwrap().blocks() * 512 >= 20_000,
            "the mapped range is allocated on disk"
        );
        m.store(&f, 4095, &[1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        let mut raw = [0u8; 8];
        f.read_exact_at(&mut raw, 4095 * 4).unwrap();
        assert_eq!(raw, [1, 0, 0, 0, 2, 0, 0, 0]);
        f.write_all_at(&7u32.to_le_bytes(), 10 * 4).unwrap();
        assert_eq!(m.load(9, 3), vec![0, 7, 0]);
        assert_eq!(m.load(4095, 2), vec![1, 2]);
        drop(m);
        f.sync_data().unwrap();
        let again = CrcMap::map(&f, 5000, Space::Reserve, true).unwrap();
        assert_eq!(again.load(4095, 2), vec![1, 2], "entries survive a remap");
    }

    #[test]
    fn a_map_is_written_in_full_only_when_its_old_bytes_were() {
        let dir = tempfile::tempdir().unwrap();
        let f = crc_file(&dir);
        assert!(
            CrcMap::map(&f, 4096, Space::Reserve, true)
                .unwrap()
                .written()
        );
        // Grown: the new bytes are written as zeros; the old ones are as
        // the caller says.
        let grown = CrcMap::map(&f, 8192, Space::Reserve, false).unwrap();
        assert!(!grown.written());
        assert_eq!(f.metadata().unwrap().len(), 8192 * 4);
        assert_eq!(grown.load(8000, 1), vec![0]);
        write_in_place(&f).unwrap();
        assert!(
            CrcMap::map(&f, 8192, Space::TryReserve, true)
                .unwrap()
                .written()
        );
    }

    #[test]
    fn entries_past_the_map_read_as_zero_and_cannot_be_stored() {
        let dir = tempfile::tempdir().unwrap();
        let f = crc_file(&dir);
        let m = CrcMap::map(&f, 8, Space::Reserve, true).unwrap();
        m.store(&f, 6, &[9, 0, 0, 0, 8, 0, 0, 0]).unwrap();
        assert_eq!(m.load(6, 4), vec![9, 8, 0, 0]);
        let e = m.store(&f, 7, &[1, 0, 0, 0, 1, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("past the 8 entries"), "{e}");
        assert_eq!(m.load(7, 1), vec![8], "a refused store stores nothing");
        assert_eq!(m.load(u64::MAX - 1, 2), vec![0, 0]);
    }

    #[test]
    fn a_longer_file_is_kept_and_an_empty_map_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = crc_file(&dir);
        f.write_all_at(&[5; 64], 0).unwrap();
        let m = CrcMap::map(&f, 4, Space::Reserve, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 64, "never shortened");
        assert_eq!(m.load(0, 1), vec![0x0505_0505]);
        let empty = CrcMap::map(&f, 0, Space::Reserve, true).unwrap();
        assert_eq!(empty.entries(), 0);
        assert_eq!(empty.load(0, 2), vec![0, 0]);
        assert!(empty.store(&f, 0, &[1, 0, 0, 0]).is_err());
    }
}
