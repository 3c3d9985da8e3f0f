//! Filesystems on an attached device: made only if the device is blank,
//! grown online (or offline) after an expansion.

use super::*;

// ---------------------------------------------------------------------------
// Filesystems.

/// What [`ensure_filesystem`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOutcome {
    /// The device was empty and has been formatted.
    Formatted,
    /// The requested filesystem was already there; nothing was written.
    Existing,
}

/// Makes sure `device` holds a `fstype` filesystem (`"ext4"` or `"xfs"`).
///
/// `blkid -p -o export DEVICE` (low-level probe, no cache) decides: no
/// signature at all → `mkfs.ext4 -q -F` / `mkfs.xfs -q`; the requested
/// filesystem → nothing to do; anything else (another filesystem, a
/// partition table, LUKS, ambiguous signatures) → error. It never
/// reformats.
pub async fn ensure_filesystem(device: &Path, fstype: &str) -> Result<FsOutcome> {
    let ctx = format!("ensuring a {fstype} filesystem on {}", device.display());
    if !SUPPORTED_FILESYSTEMS.contains(&fstype) {
        return Err(AttachError::UnsupportedFilesystem {
            context: ctx,
            fstype: fstype.to_owned(),
        });
    }
    match probe(device, &ctx).await? {
        Probe::Empty => {}
        Probe::Filesystem(found) if found == fstype => {
            debug!("{} already has {fstype}", device.display());
            return Ok(FsOutcome::Existing);
        }
        Probe::Filesystem(found) => {
            return Err(AttachError::WrongFilesystem {
                context: ctx,
                device: device.to_owned(),
                found,
                requested: fstype.to_owned(),
            });
        }
        Probe::Other(found) => {
            return Err(AttachError::WrongFilesystem {
                context: ctx,
                device: device.to_owned(),
                found,
                requested: fstype.to_owned(),
            });
        }
    }
    let (program, args): (&str, Vec<&OsStr>) = match fstype {
        "ext4" => (
            "mkfs.ext4",
            vec![OsStr::new("-q"), OsStr::new("-F"), device.as_os_str()],
        ),
        _ => ("mkfs.xfs", vec![OsStr::new("-q"), device.as_os_str()]),
    };
    run(&ctx, program, args, LONG_COMMAND_TIMEOUT).await?;
    info!(device = %device.display(), fstype, "formatted");
    Ok(FsOutcome::Formatted)
}

pub(super) enum Probe {
    Empty,
    Filesystem(String),
    Other(String),
}

pub(super) async fn probe(device: &Path, ctx: &str) -> Result<Probe> {
    let args = [
        OsStr::new("-p"),
        OsStr::new("-o"),
        OsStr::new("export"),
        device.as_os_str(),
    ];
    let out = run_output(ctx, "blkid", args, COMMAND_TIMEOUT).await?;
    match out.status.code() {
        Some(0) => {}
        // 2: nothing found.
        Some(2) => return Ok(Probe::Empty),
        _ => {
            let args: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
            return Err(command_failed(ctx, "blkid", &args, &out));
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    if let Some(t) = get("TYPE") {
        return Ok(if get("USAGE").is_none_or(|u| u == "filesystem") {
            Probe::Filesystem(t)
        } else {
            Probe::Other(t)
        });
    }
    if let Some(pt) = get("PTTYPE") {
        return Ok(Probe::Other(format!("a {pt} partition table")));
    }
    Ok(Probe::Other(format!(
        "unrecognised data ({})",
        text.trim().replace('\n', " ")
    )))
}

/// Less than this much unused room at the end of a device is no reason to
/// resize (ext4 sizes are whole blocks of up to 64 KiB).
pub(super) const EXT_SLACK: u64 = 64 * 1024;

/// Size of the ext2/3/4 filesystem on `device` from its superblock
/// (`dumpe2fs -h`: block count × block size).
pub(super) async fn ext_fs_bytes(device: &Path, ctx: &str) -> Result<u64> {
    let out = run(
        ctx,
        "dumpe2fs",
        [OsStr::new("-h"), device.as_os_str()],
        COMMAND_TIMEOUT,
    )
    .await?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(n), Some(b)) => Ok(n * b),
        _ => Err(precondition(
            ctx,
            "dumpe2fs -h printed no block count and block size for the filesystem",
        )),
    }
}

/// Grows the filesystem on `device` to the device size and returns the
/// device size in bytes.
///
/// First `losetup -c` makes a loop device re-read its backing file size.
/// That is all a loop device can do: with nbdfuse the backing file keeps the
/// size the export had when nbdfuse connected, so an export grown while
/// staged stays invisible until the volume is detached and attached again
/// (see [`NBDFUSE_GROW_HINT`]). When `required_bytes` is given and the device
/// is still smaller, this fails with [`AttachError::DeviceTooSmall`] instead
/// of pretending success.
///
/// Then, with `mount_path` = where `device` is mounted (online):
/// `resize2fs DEVICE` (ext2/3/4; the kernel requires `CAP_SYS_RESOURCE`,
/// checked up front) or `xfs_growfs -d MOUNT` (xfs). With `mount_path` =
/// `None` (device not mounted, e.g. right after a re-attach in NodeStage):
/// ext2/3/4 are grown offline with `e2fsck -f -p` + `resize2fs`; xfs can only
/// grow while mounted, so that is an error. Growing a filesystem that already
/// fills the device is a no-op.
pub async fn expand_filesystem(
    device: &Path,
    mount_path: Option<&Path>,
    required_bytes: Option<u64>,
) -> Result<u64> {
    let ctx = match mount_path {
        Some(m) => format!(
            "expanding the filesystem on {} mounted at {}",
            device.display(),
            m.display()
        ),
        None => format!(
            "expanding the (unmounted) filesystem on {}",
            device.display()
        ),
    };
    if is_loop_device(device) {
        run(
            &ctx,
            "losetup",
            [OsStr::new("-c"), device.as_os_str()],
            COMMAND_TIMEOUT,
        )
        .await?;
    }
    let size = block_device_size(device, &ctx).await?;
    if let Some(required) = required_bytes
        && size < required
    {
        return Err(AttachError::DeviceTooSmall {
            context: ctx,
            device: device.to_owned(),
            actual: size,
            required,
            hint: NBDFUSE_GROW_HINT,
        });
    }
    let rdev = std::fs::metadata(device).map_err(io_err(&ctx))?.rdev();
    let Some(mount_path) = mount_path else {
        return expand_offline(device, size, &ctx).await;
    };
    let entry = mount_entry(mount_path)
        .await?
        .ok_or_else(|| precondition(&ctx, "the mount path is not mounted"))?;
    if (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
        != (u64::from(entry.major), u64::from(entry.minor))
    {
        return Err(precondition(
            &ctx,
            format!(
                "the mount path is mounted from {}, not from this device",
                entry.source.display()
            ),
        ));
    }
    match entry.fstype.as_str() {
        "ext4" | "ext3" | "ext2" => {
            if ext_fs_bytes(device, &ctx).await? + EXT_SLACK >= size {
                // Already spans the device (e.g. it was made after the
                // volume grew): nothing to resize.
                return Ok(size);
            }
            if !has_effective_capability(CAP_SYS_RESOURCE) {
                return Err(precondition(
                    &ctx,
                    "online ext4 resize needs CAP_SYS_RESOURCE, which this process lacks \
                     (grant it, or unmount and expand offline)",
                ));
            }
            run(
                &ctx,
                "resize2fs",
                [device.as_os_str()],
                LONG_COMMAND_TIMEOUT,
            )
            .await?;
        }
        "xfs" => {
            run(
                &ctx,
                "xfs_growfs",
                [OsStr::new("-d"), mount_path.as_os_str()],
                LONG_COMMAND_TIMEOUT,
            )
            .await?;
        }
        other => {
            return Err(AttachError::UnsupportedFilesystem {
                context: ctx,
                fstype: other.to_owned(),
            });
        }
    }
    info!(device = %device.display(), size, "filesystem expanded online");
    Ok(size)
}

pub(super) async fn expand_offline(device: &Path, size: u64, ctx: &str) -> Result<u64> {
    if let Some(mp) = mount_using_device(&read_mountinfo_ctx(ctx)?, device) {
        return Err(precondition(
            ctx,
            format!(
                "the device is mounted at {}; pass that mount path",
                mp.display()
            ),
        ));
    }
    match probe(device, ctx).await? {
        Probe::Filesystem(t) if matches!(t.as_str(), "ext4" | "ext3" | "ext2") => {
            if ext_fs_bytes(device, ctx).await? + EXT_SLACK >= size {
                return Ok(size);
            }
            // resize2fs refuses an unmounted filesystem that was not checked
            // since it was last mounted. -p: fix only what is safe to fix.
            let args = [OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()];
            let out = run_output(ctx, "e2fsck", args, LONG_COMMAND_TIMEOUT).await?;
            // 0: clean, 1: errors corrected; anything else needs a human.
            if !matches!(out.status.code(), Some(0) | Some(1)) {
                let args: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
                return Err(command_failed(ctx, "e2fsck", &args, &out));
            }
            run(ctx, "resize2fs", [device.as_os_str()], LONG_COMMAND_TIMEOUT).await?;
        }
        Probe::Filesystem(t) if t == "xfs" => {
            return Err(precondition(
                ctx,
                "xfs can only be grown while mounted; pass the mount path",
            ));
        }
        Probe::Empty => return Err(precondition(ctx, "the device holds no filesystem")),
        Probe::Filesystem(t) | Probe::Other(t) => {
            return Err(AttachError::UnsupportedFilesystem {
                context: ctx.to_owned(),
                fstype: t,
            });
        }
    }
    info!(device = %device.display(), size, "filesystem expanded offline");
    Ok(size)
}

/// `CAP_SYS_RESOURCE` (capability bit 24), needed by `EXT4_IOC_RESIZE_FS`.
pub(super) const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the effective capability set (`CapEff` in /proc/self/status)
/// holds capability number `cap`. Unknown → assume yes and let the command
/// report the failure.
pub(super) fn has_effective_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_none_or(|mask| mask & (1u64 << cap) != 0)
}
