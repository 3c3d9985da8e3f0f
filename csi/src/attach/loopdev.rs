//! Loop devices: attaching one over the FUSE file, and finding which
//! devices a file backs (sysfs), their sizes.

use super::*;

pub(super) async fn losetup(backing: &Path, direct_io: bool, ctx: &str) -> Result<PathBuf> {
    // nbdfuse: buffered I/O (--direct-io=off): with direct I/O the loop
    // driver would send O_DIRECT I/O to the FUSE file, and how FUSE handles
    // that depends on the kernel version and on server flags nbdfuse does not
    // set (FOPEN_DIRECT_IO, parallel direct writes); losetup even falls back
    // to buffered mode silently when the kernel refuses. Buffered mode is the
    // predictable, tested setup, at the cost of double caching.
    //
    // zebu-nbd-fuse sets FOPEN_DIRECT_IO + FOPEN_PARALLEL_DIRECT_WRITES and
    // FUSE_ASYNC_DIO, so --direct-io=on is what gives concurrency: the loop
    // driver submits asynchronous direct I/O and FUSE sends the requests
    // concurrently (in buffered mode a loop device runs one request at a
    // time against a direct-I/O FUSE file; measured 2-3x fewer IOPS).
    //
    // Either way flushes reach the NBD server: the loop driver turns
    // REQ_FLUSH into fsync on the file, which FUSE forwards as an NBD flush.
    let dio = if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    };
    let out = run(
        ctx,
        "losetup",
        [
            OsStr::new("--find"),
            OsStr::new("--show"),
            OsStr::new(dio),
            backing.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )
    .await?;
    let dev = out.trim();
    if !dev.starts_with("/dev/loop") {
        return Err(precondition(
            ctx,
            format!("losetup printed {dev:?}, not a loop device"),
        ));
    }
    Ok(PathBuf::from(dev))
}

/// The file a loop device reads, from sysfs; `None` when not a configured
/// loop device.
pub(super) fn loop_backing(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?;
    let s = std::fs::read(Path::new("/sys/block").join(name).join("loop/backing_file")).ok()?;
    let s = s.strip_suffix(b"\n").unwrap_or(&s);
    Some(PathBuf::from(OsStr::from_bytes(s)))
}

/// Every loop device whose backing file is `backing` (sysfs scan; does not
/// touch the file itself, so it works when the FUSE server is dead).
pub(super) fn loops_backed_by(backing: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|dev| {
            loop_backing(dev).is_some_and(|b| {
                b == backing
                    || b.as_os_str().as_bytes().strip_suffix(b" (deleted)")
                        == Some(backing.as_os_str().as_bytes())
            })
        })
        .collect();
    out.sort();
    out
}

pub(super) fn is_loop_device(device: &Path) -> bool {
    device
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(b"loop"))
        && device
            .file_name()
            .is_some_and(|n| Path::new("/sys/block").join(n).join("loop").exists())
}

/// Size of a block device (or of what a bind-mounted device node shows):
/// seeking to the end of a block device yields its size.
pub(super) async fn block_device_size(device: &Path, ctx: &str) -> Result<u64> {
    let device = device.to_owned();
    let c = format!("{ctx}: size of {}", device.display());
    blocking(ctx, move || {
        let mut f = std::fs::File::open(&device).map_err(io_err(&c))?;
        f.seek(SeekFrom::End(0)).map_err(io_err(&c))
    })
    .await
}
