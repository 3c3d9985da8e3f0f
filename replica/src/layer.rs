//! One layer of a replica: a sparse data file, its per-block CRC file, and
//! the in-memory index of the blocks it holds.
//!
//! Files: `layers/<id>.img` holds block `b` at byte `b * block_size`;
//! `layers/<id>.crc` holds the crc32 of block `b` as 4 little-endian bytes at
//! `b * 4`. The data file is opened with O_DIRECT where the filesystem allows
//! it; the CRC file is buffered (its entries are 4 bytes) and is synced with
//! the data file on every flush. CRC entries are stored through a shared
//! memory mapping of the CRC file ([`CrcMap`]), not written through io_uring
//! or `pwrite`: ext4 cannot complete a buffered write without blocking, so
//! io_uring would hand every such write to an io-wq worker thread, and a
//! `pwrite` of 4 bytes costs a system call and a filesystem write per block.
//!
//! Invariant: a block is present in the index iff the data file holds data
//! there (SEEK_DATA agrees), so the index can always be rebuilt from the file.
//! The CRC entry of a present block matches its data once the layer was
//! flushed; after an unclean stop the store recomputes the CRCs of the
//! layers that may have been written.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

use crate::buf::AlignedBuf;
use crate::crcmap::{CrcMap, Space};
use crate::extent::ExtentIndex;

/// A layer's files and index.
#[derive(Debug)]
pub struct Layer {
    /// File id.
    pub id: u64,
    /// Data file.
    pub data: Arc<File>,
    /// CRC file (synced on flush; entries go through `crcs`).
    pub crc: Arc<File>,
    /// The CRC file's entries, mapped; replaced when the layer grows.
    crcs: RwLock<CrcMap>,
    index: RwLock<ExtentIndex>,
}

/// A block whose data does not match its stored CRC ([`Layer::check_crcs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Block number.
    pub block: u64,
    /// The CRC in the layer's CRC file.
    pub stored: u32,
    /// The CRC of the data.
    pub actual: u32,
}

/// Paths of a layer's data and CRC files.
pub fn paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    let layers = dir.join("layers");
    (
        layers.join(format!("{id}.img")),
        layers.join(format!("{id}.crc")),
    )
}

fn open_data(path: &Path, create: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(create);
    match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                path = %path.display(),
                "the filesystem does not support O_DIRECT; using buffered I/O (data is still synced on flush)"
            );
            opts.open(path)
        }
        other => other,
    }
}

impl Layer {
    /// Creates the empty files of layer `id`, sized for `size` bytes. On
    /// failure (typically a full disk) the files are removed again, so a
    /// refused snapshot leaves no space taken.
    pub fn create(dir: &Path, id: u64, size: u64, block_size: u32) -> io::Result<Layer> {
        let created = Self::create_files(dir, id, size, block_size);
        if created.is_err() {
            Self::remove_files(dir, id);
        }
        created
    }

    fn create_files(dir: &Path, id: u64, size: u64, block_size: u32) -> io::Result<Layer> {
        let (data_path, crc_path) = paths(dir, id);
        let data = open_data(&data_path, true)?;
        data.set_len(size)?;
        let crc = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&crc_path)?;
        let blocks = size / block_size as u64;
        Ok(Layer {
            id,
            data: Arc::new(data),
            // A new, empty file: nothing old to be unwritten.
            crcs: RwLock::new(CrcMap::map(&crc, blocks, Space::Reserve, true)?),
            crc: Arc::new(crc),
            index: RwLock::new(ExtentIndex::new(blocks)),
        })
    }

    /// Opens layer `id` and rebuilds its index with SEEK_DATA/SEEK_HOLE.
    /// `crc_written`: its CRC file is known to be written in full on disk
    /// (see [`crate::crcmap`]); when it is not, it is rewritten in place
    /// first (unless the disk is full: then it stays not written).
    pub fn open(
        dir: &Path,
        id: u64,
        size: u64,
        block_size: u32,
        crc_written: bool,
    ) -> io::Result<Layer> {
        let (data_path, crc_path) = paths(dir, id);
        let data = open_data(&data_path, false).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening layer file {}: {e}", data_path.display()),
            )
        })?;
        let crc = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&crc_path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("opening CRC file {}: {e}", crc_path.display()),
                )
            })?;
        let bs = block_size as u64;
        let mut index = ExtentIndex::new(size / bs);
        let file_len = data.metadata()?.len();
        let mut pos: i64 = 0;
        while (pos as u64) < file_len {
            let start = match lseek(data.as_fd(), pos, Whence::SeekData) {
                Ok(s) => s,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let end = match lseek(data.as_fd(), start, Whence::SeekHole) {
                Ok(e) => e,
                Err(nix::errno::Errno::ENXIO) => file_len as i64,
                Err(e) => return Err(e.into()),
            };
            let first = start as u64 / bs;
            let last = (end as u64).div_ceil(bs);
            index.insert(first, last - first);
            pos = end;
        }
        let crc_written = crc_written
            || match crate::crcmap::write_in_place(&crc) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    tracing::warn!(path = %crc_path.display(), "no space to rewrite the CRC file in full; it is synced at every flush");
                    false
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("rewriting CRC file {}: {e}", crc_path.display()),
                    ));
                }
            };
        let crcs = CrcMap::map(&crc, size / bs, Space::TryReserve, crc_written).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("mapping CRC file {}: {e}", crc_path.display()),
            )
        })?;
        Ok(Layer {
            id,
            data: Arc::new(data),
            crc: Arc::new(crc),
            crcs: RwLock::new(crcs),
            index: RwLock::new(index),
        })
    }

    /// Deletes the files of layer `id` (missing files are fine).
    pub fn remove_files(dir: &Path, id: u64) {
        let (d, c) = paths(dir, id);
        for p in [d, c] {
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "could not delete a dropped layer file");
            }
        }
    }

    /// Shared access to the index.
    pub fn index(&self) -> RwLockReadGuard<'_, ExtentIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Exclusive access to the index.
    pub fn index_mut(&self) -> RwLockWriteGuard<'_, ExtentIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the data file occupies on disk.
    pub fn allocated_bytes(&self) -> u64 {
        self.data.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Deallocates `[offset, offset + len)` of the data file.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            self.data.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )?;
        Ok(())
    }

    /// CRCs of blocks `[first, first + count)` as stored in the CRC file
    /// (entries never written read as 0).
    pub fn read_crcs(&self, first: u64, count: u64) -> Vec<u32> {
        self.crc_map().load(first, count)
    }

    /// Checks the `block_size` blocks of `data`, starting at block `first`,
    /// against their stored CRCs, without allocating (the read path runs it
    /// on every read): the crc32 of all of `data` (combined from the
    /// blocks' CRCs), or the first block that does not match.
    pub fn check_crcs(&self, first: u64, data: &[u8], block_size: usize) -> Result<u32, Mismatch> {
        let map = self.crc_map();
        let mut total: Option<crc32fast::Hasher> = None;
        for (i, blk) in data.chunks(block_size.max(1)).enumerate() {
            let mut h = crc32fast::Hasher::new();
            h.update(blk);
            let block = first + i as u64;
            let (actual, stored) = (h.clone().finalize(), map.get(block));
            if actual != stored {
                return Err(Mismatch {
                    block,
                    stored,
                    actual,
                });
            }
            match &mut total {
                None => total = Some(h),
                Some(t) => t.combine(&h),
            }
        }
        Ok(total.map_or_else(|| crc32fast::hash(&[]), |t| t.finalize()))
    }

    /// Stores the CRC-file bytes of the blocks from `first` on (see
    /// [`block_crcs`]); they are durable once the CRC file is synced. A layer
    /// whose block space grew after it was mapped (an older layer of an
    /// expanded volume, written by a merge) is mapped anew first.
    pub fn store_crcs(&self, first: u64, crc_bytes: &[u8]) -> io::Result<()> {
        let end = first.saturating_add(crc_bytes.len() as u64 / 4);
        let mut map = self.crc_map();
        if end > map.entries() {
            drop(map);
            self.grow_crcs(self.index().blocks().max(end))?;
            map = self.crc_map();
        }
        map.store(&self.crc, first, crc_bytes)
    }

    /// Extends the CRC file and its mapping to `blocks` entries, for a layer
    /// whose data file grew. Fails (keeping the old mapping) when the disk
    /// has no room for the new entries.
    pub fn grow_crcs(&self, blocks: u64) -> io::Result<()> {
        let mut map = self.crcs.write().unwrap_or_else(|p| p.into_inner());
        if blocks > map.entries() {
            *map = CrcMap::map(&self.crc, blocks, Space::Reserve, map.written())?;
        }
        Ok(())
    }

    /// Its CRC file is written in full on disk: writing its dirty pages
    /// back before a cache flush of the disk makes them durable (see
    /// [`crate::crcmap`]); otherwise it must be `fdatasync`'ed.
    pub fn crc_written(&self) -> bool {
        self.crc_map().written()
    }

    /// Starts writing the CRC file's dirty pages back, without waiting
    /// ([`crate::crcmap::start_write_back`]).
    pub fn start_crc_write_back(&self) -> io::Result<()> {
        crate::crcmap::start_write_back(&self.crc)
    }

    fn crc_map(&self) -> RwLockReadGuard<'_, CrcMap> {
        self.crcs.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes the CRC entries of every present block from the data
    /// (after an unclean stop). Blocking; used at startup only.
    pub fn recompute_crcs(&self, block_size: u32) -> io::Result<u64> {
        let bs = block_size as u64;
        let runs = self.index().runs(0, u64::MAX);
        let mut blocks = 0;
        const STEP: u64 = 256;
        for (s, e) in runs {
            let mut b = s;
            while b < e {
                let n = STEP.min(e - b);
                let mut buf = AlignedBuf::for_read((n * bs) as usize);
                self.data.read_exact_at(buf.as_mut_slice(), b * bs)?;
                let crcs = block_crcs(buf.as_slice(), bs as usize);
                self.store_crcs(b, &crcs)?;
                blocks += n;
                b += n;
            }
        }
        self.crc.sync_data()?;
        Ok(blocks)
    }
}

/// The crc32 of each `block_size` block of `data`, as CRC-file bytes.
pub fn block_crcs(data: &[u8], block_size: usize) -> Vec<u8> {
    block_crcs_and_total(data, block_size).0
}

/// The CRC-file bytes of `data` (as [`block_crcs`]) and the crc32 of the
/// whole of `data`, in one pass over the bytes: the total is combined from
/// the per-block CRCs instead of being computed over the data again.
pub fn block_crcs_and_total(data: &[u8], block_size: usize) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(data.len().div_ceil(block_size.max(1)) * 4);
    let mut total: Option<crc32fast::Hasher> = None;
    for blk in data.chunks(block_size.max(1)) {
        let mut h = crc32fast::Hasher::new();
        h.update(blk);
        out.extend_from_slice(&h.clone().finalize().to_le_bytes());
        match &mut total {
            None => total = Some(h),
            Some(t) => t.combine(&h),
        }
    }
    let total = total.map_or_else(|| crc32fast::hash(&[]), |t| t.finalize());
    (out, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_crcs_match_two_passes() {
        let data: Vec<u8> = (0..5 * 4096 + 100)
            .map(|i| (i * 7 + i / 13) as u8)
            .collect();
        for len in [0, 1, 4096, 8192, 3 * 4096 + 5, data.len()] {
            let d = &data[..len];
            let (crcs, total) = block_crcs_and_total(d, 4096);
            assert_eq!(total, crc32fast::hash(d), "total of {len} bytes");
            let expect: Vec<u8> = d
                .chunks(4096)
                .flat_map(|b| crc32fast::hash(b).to_le_bytes())
                .collect();
            assert_eq!(crcs, expect, "blocks of {len} bytes");
        }
    }
}
