//! Mounts: reading mountinfo, mounting a staged filesystem, bind mounts
//! for publish (directories and block-device files), unmounting.

use super::*;

// ---------------------------------------------------------------------------
// Mounts.

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(mountinfo::parse(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

pub(super) fn read_mountinfo_ctx(ctx: &str) -> Result<Vec<MountEntry>> {
    read_mountinfo().map_err(io_err(ctx))
}

/// The absolute path as mountinfo would show it, resolving symlinks in the
/// parent only (the target itself may be an unresponsive mount: never stat
/// it). `None` when the parent does not exist.
pub(super) fn mountinfo_path(target: &Path) -> io::Result<Option<PathBuf>> {
    let abs = if target.is_absolute() {
        target.to_owned()
    } else {
        std::env::current_dir()?.join(target)
    };
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(Some(abs)); // "/"
    };
    match parent.canonicalize() {
        Ok(p) => Ok(Some(p.join(name))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The topmost mount at `target`, if any.
pub async fn mount_entry(target: &Path) -> Result<Option<MountEntry>> {
    let ctx = format!("checking whether {} is mounted", target.display());
    let Some(path) = mountinfo_path(target).map_err(io_err(&ctx))? else {
        return Ok(None);
    };
    Ok(read_mountinfo_ctx(&ctx)?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// Whether something is mounted at `target` (per `/proc/self/mountinfo`,
/// octal escapes decoded).
pub async fn is_mounted(target: &Path) -> Result<bool> {
    Ok(mount_entry(target).await?.is_some())
}

/// Splits CSI `mount_flags` (each may itself be a comma list) into `MsFlags`
/// and the filesystem-specific data string. Operations that change what
/// kind of mount this is (bind, remount, move...) are refused.
pub(super) fn parse_mount_options(options: &[String], ctx: &str) -> Result<(MsFlags, String)> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
        match opt {
            "" | "defaults" => {}
            "ro" => flags.insert(MsFlags::MS_RDONLY),
            "rw" => flags.remove(MsFlags::MS_RDONLY),
            "nosuid" => flags.insert(MsFlags::MS_NOSUID),
            "suid" => flags.remove(MsFlags::MS_NOSUID),
            "nodev" => flags.insert(MsFlags::MS_NODEV),
            "dev" => flags.remove(MsFlags::MS_NODEV),
            "noexec" => flags.insert(MsFlags::MS_NOEXEC),
            "exec" => flags.remove(MsFlags::MS_NOEXEC),
            "sync" => flags.insert(MsFlags::MS_SYNCHRONOUS),
            "async" => flags.remove(MsFlags::MS_SYNCHRONOUS),
            "dirsync" => flags.insert(MsFlags::MS_DIRSYNC),
            "noatime" => flags.insert(MsFlags::MS_NOATIME),
            "atime" => flags.remove(MsFlags::MS_NOATIME),
            "nodiratime" => flags.insert(MsFlags::MS_NODIRATIME),
            "diratime" => flags.remove(MsFlags::MS_NODIRATIME),
            "relatime" => flags.insert(MsFlags::MS_RELATIME),
            "norelatime" => flags.remove(MsFlags::MS_RELATIME),
            "strictatime" => flags.insert(MsFlags::MS_STRICTATIME),
            "nostrictatime" => flags.remove(MsFlags::MS_STRICTATIME),
            "lazytime" => flags.insert(MsFlags::MS_LAZYTIME),
            "nolazytime" => flags.remove(MsFlags::MS_LAZYTIME),
            "silent" => flags.insert(MsFlags::MS_SILENT),
            "loud" => flags.remove(MsFlags::MS_SILENT),
            "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "slave" | "rslave"
            | "private" | "rprivate" | "unbindable" | "runbindable" => {
                return Err(precondition(
                    ctx,
                    format!("mount option {opt:?} is not allowed"),
                ));
            }
            other => data.push(other),
        }
    }
    Ok((flags, data.join(",")))
}

pub(super) fn create_dir_target(target: &Path, ctx: &str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(target)
        .map_err(io_err(ctx))
}

/// Mounts the filesystem on `device` at `target` (created as a directory if
/// missing). `mount_flags` are CSI mount flags (`noatime`, `discard`,
/// `nouuid`, ...): generic ones become `MS_*` flags, the rest goes to the
/// filesystem as data. `read_only` adds `MS_RDONLY`.
///
/// Idempotent: if `target` already has this device mounted with the same
/// read-only-ness, `Ok`; mounted from something else, or rw vs ro, → error.
pub async fn mount(
    device: &Path,
    target: &Path,
    fstype: &str,
    read_only: bool,
    mount_flags: &[String],
) -> Result<()> {
    let ctx = format!(
        "mounting {} ({fstype}) at {}",
        device.display(),
        target.display()
    );
    let (mut flags, data) = parse_mount_options(mount_flags, &ctx)?;
    if read_only {
        flags.insert(MsFlags::MS_RDONLY);
    }
    let want_ro = flags.contains(MsFlags::MS_RDONLY);
    let rdev = std::fs::metadata(device).map_err(io_err(&ctx))?;
    if !rdev.file_type().is_block_device() {
        return Err(precondition(&ctx, "not a block device"));
    }
    let rdev = rdev.rdev();
    if let Some(m) = mount_entry(target).await? {
        let same = (u64::from(m.major), u64::from(m.minor))
            == (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        return check_existing(&ctx, &m, same, want_ro);
    }
    create_dir_target(target, &ctx)?;
    let (device, target, fstype) = (device.to_owned(), target.to_owned(), fstype.to_owned());
    let c = ctx.clone();
    blocking(&ctx, move || {
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(&device), &target, Some(fstype.as_str()), flags, data)
            .map_err(sys_err(&c))
    })
    .await?;
    info!(context = %ctx, "mounted");
    Ok(())
}

pub(super) fn check_existing(ctx: &str, m: &MountEntry, same: bool, want_ro: bool) -> Result<()> {
    if !same {
        return Err(precondition(
            ctx,
            format!("target already has {} mounted", m.source.display()),
        ));
    }
    if m.is_read_only() != want_ro {
        return Err(precondition(
            ctx,
            format!(
                "already mounted {}, requested {}",
                if m.is_read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if want_ro { "read-only" } else { "read-write" }
            ),
        ));
    }
    debug!(context = %ctx, "already mounted");
    Ok(())
}

/// Bind-mounts directory `src` at `target` (created if missing). Read-only
/// needs a second step: the kernel ignores `MS_RDONLY` on the initial bind,
/// so the bind is remounted with `MS_BIND|MS_REMOUNT|MS_RDONLY` (keeping the
/// nosuid/nodev/noexec/atime flags it inherited, which unprivileged mount
/// namespaces require). Idempotent like [`mount`].
pub async fn bind_mount(src: &Path, target: &Path, read_only: bool) -> Result<()> {
    let ctx = format!("bind-mounting {} at {}", src.display(), target.display());
    let s = std::fs::metadata(src).map_err(io_err(&ctx))?;
    if let Some(m) = mount_entry(target).await? {
        let t = std::fs::metadata(target).map_err(io_err(&ctx))?;
        return check_existing(
            &ctx,
            &m,
            (s.dev(), s.ino()) == (t.dev(), t.ino()),
            read_only,
        );
    }
    create_dir_target(target, &ctx)?;
    bind(src, target, read_only, &ctx).await
}

/// Bind-mounts the device node `device` onto the file `target_file`
/// (created, with its parent directories, if missing): the publish step of a
/// raw block volume. Idempotent like [`mount`].
///
/// `read_only` makes the bind mount read-only, but Linux checks the mount's
/// read-only flag only for regular files and directories: opening the
/// device node through it for writing still works. Real read-only block
/// access needs a read-only device (not provided here).
pub async fn bind_block(device: &Path, target_file: &Path, read_only: bool) -> Result<()> {
    let ctx = format!(
        "bind-mounting block device {} at {}",
        device.display(),
        target_file.display()
    );
    let d = std::fs::metadata(device).map_err(io_err(&ctx))?;
    if !d.file_type().is_block_device() {
        return Err(precondition(&ctx, "not a block device"));
    }
    if let Some(m) = mount_entry(target_file).await? {
        let same = std::fs::metadata(target_file)
            .is_ok_and(|t| t.file_type().is_block_device() && t.rdev() == d.rdev());
        return check_existing(&ctx, &m, same, read_only);
    }
    if let Some(parent) = target_file.parent() {
        create_dir_target(parent, &ctx)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o660)
        .open(target_file)
        .map_err(io_err(&ctx))?;
    bind(device, target_file, read_only, &ctx).await
}

pub(super) async fn bind(src: &Path, target: &Path, read_only: bool, ctx: &str) -> Result<()> {
    let (src, target) = (src.to_owned(), target.to_owned());
    let c = ctx.to_owned();
    blocking(ctx, move || {
        nix::mount::mount(
            Some(&src),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err(&c))?;
        if !read_only {
            return Ok(());
        }
        let remount = || -> Result<()> {
            let ctx = format!("{c}: remounting read-only");
            let inherited = nix::sys::statvfs::statvfs(&target)
                .map_err(sys_err(&ctx))?
                .flags();
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            for (st, ms) in [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            ] {
                if inherited.contains(st) {
                    flags.insert(ms);
                }
            }
            nix::mount::mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
                .map_err(sys_err(&ctx))
        };
        if let Err(e) = remount() {
            // Never leave a writable bind behind a failed read-only request.
            if let Err(ue) = nix::mount::umount2(&target, MntFlags::empty()) {
                warn!("{c}: undoing the bind mount: {ue}");
            }
            return Err(e);
        }
        Ok(())
    })
    .await?;
    info!(context = %ctx, read_only, "bind-mounted");
    Ok(())
}

/// How long [`unmount`] retries a busy (`EBUSY`) mount before giving up.
pub const UNMOUNT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Unmounts `target` (every mount stacked on it). Idempotent: a missing or
/// unmounted target is `Ok`. Never lazy: a busy filesystem is retried for up
/// to [`UNMOUNT_BUSY_TIMEOUT`] (a multi-threaded process that forks holds
/// copies of its open files until the child execs, which makes EBUSY
/// transient), then is an error. The target itself is left in place (CSI
/// callers remove it).
pub async fn unmount(target: &Path) -> Result<()> {
    let ctx = format!("unmounting {}", target.display());
    let deadline = Instant::now() + UNMOUNT_BUSY_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    let mut unmounted = 0;
    while unmounted < 16 {
        if !is_mounted(target).await? {
            return Ok(());
        }
        let t = target.to_owned();
        let r = blocking(&ctx, move || Ok(nix::mount::umount2(&t, MntFlags::empty()))).await?;
        match r {
            // EINVAL/ENOENT: raced with another unmount.
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {
                info!(context = %ctx, "unmounted");
                unmounted += 1;
            }
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                debug!(context = %ctx, "busy; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(sys_err(&ctx)(e)),
        }
    }
    Err(precondition(&ctx, "still mounted after 16 unmounts"))
}

/// A mount point using `device`: mounted from it, or a bind of its device
/// node (publish target of a block volume).
pub(super) fn mount_using_device(mounts: &[MountEntry], device: &Path) -> Option<PathBuf> {
    let rdev = std::fs::metadata(device).ok().map(|m| m.rdev());
    let name = device.file_name();
    mounts.iter().rev().find_map(|m| {
        if m.source == device {
            return Some(m.mount_point.clone());
        }
        if name.is_some() && m.root.file_name() == name && m.root.parent() == Some(Path::new("/")) {
            // Only stat mount points that look like a bound device node.
            let same = std::fs::metadata(&m.mount_point)
                .ok()
                .is_some_and(|md| md.file_type().is_block_device() && Some(md.rdev()) == rdev);
            if same {
                return Some(m.mount_point.clone());
            }
        }
        None
    })
}
