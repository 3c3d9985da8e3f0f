//! Volume statistics for `NodeGetVolumeStats`.

use super::*;

// ---------------------------------------------------------------------------
// Stats.

/// Filesystem usage, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Size of the filesystem in bytes (`f_blocks * f_frsize`).
    pub total_bytes: u64,
    /// Bytes in use (`(f_blocks - f_bfree) * f_frsize`).
    pub used_bytes: u64,
    /// Bytes available to unprivileged users (`f_bavail * f_frsize`).
    pub available_bytes: u64,
    /// Total inodes (`f_files`).
    pub total_inodes: u64,
    /// Inodes in use (`f_files - f_ffree`).
    pub used_inodes: u64,
    /// Free inodes (`f_ffree`).
    pub free_inodes: u64,
}

/// What [`volume_stats`] found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStats {
    /// A mounted filesystem.
    Filesystem(FsStats),
    /// A block device (or a file with a device node bound onto it): only its
    /// size is known.
    Block {
        /// Device size in bytes.
        total_bytes: u64,
    },
}

/// Usage of the volume at `path`: a mounted filesystem's statvfs numbers,
/// or the size of a block-volume target.
pub async fn volume_stats(path: &Path) -> Result<VolumeStats> {
    let ctx = format!("volume stats of {}", path.display());
    let md = tokio::fs::metadata(path).await.map_err(io_err(&ctx))?;
    if md.file_type().is_block_device() {
        let total_bytes = block_device_size(path, &ctx).await?;
        return Ok(VolumeStats::Block { total_bytes });
    }
    let p = path.to_owned();
    let c = ctx.clone();
    let st = blocking(&ctx, move || {
        nix::sys::statvfs::statvfs(&p).map_err(sys_err(&c))
    })
    .await?;
    Ok(VolumeStats::Filesystem(fs_stats_from(&st)))
}

// The statvfs fields are u64 on 64-bit targets but c_ulong/u32 on some
// 32-bit ones: the conversions are only useless on the former.
#[allow(clippy::useless_conversion)]
pub(super) fn fs_stats_from(st: &nix::sys::statvfs::Statvfs) -> FsStats {
    let frsize = u64::from(st.fragment_size());
    let (blocks, bfree, bavail) = (
        u64::from(st.blocks()),
        u64::from(st.blocks_free()),
        u64::from(st.blocks_available()),
    );
    let (files, ffree) = (u64::from(st.files()), u64::from(st.files_free()));
    FsStats {
        total_bytes: blocks.saturating_mul(frsize),
        used_bytes: blocks.saturating_sub(bfree).saturating_mul(frsize),
        available_bytes: bavail.saturating_mul(frsize),
        total_inodes: files,
        used_inodes: files.saturating_sub(ffree),
        free_inodes: ffree,
    }
}
