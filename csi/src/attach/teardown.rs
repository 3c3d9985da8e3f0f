//! Detaching: tearing down what [`attach`] created (loop devices, the FUSE
//! mount and server, the state files), from the record and the fixed
//! layout alone, so it also cleans up after a crash or a failed attach.

use super::*;

/// Undoes [`attach`] using only what is in `state_dir` (the JSON record,
/// plus the fixed layout, so a half-finished attach is cleaned up too):
/// `losetup -d` every loop device reading `fuse/disk` and wait until the
/// kernel has released it, `fusermount3 -u fuse` (falling back to a lazy
/// unmount), wait for nbdfuse to exit (SIGTERM/SIGKILL it, verified by its
/// command line, only if it lingers), remove the files.
///
/// Callers unmount filesystems first: a loop device still mounted (or bound
/// onto a publish target) is an error, nothing is torn down. Idempotent:
/// nothing attached → `Ok`.
pub async fn detach(state_dir: &Path) -> Result<()> {
    let ctx = format!("detaching (state dir {})", state_dir.display());
    if !state_dir.exists() {
        return Ok(());
    }
    cleanup(&Layout::new(state_dir), &ctx).await
}

pub(super) async fn cleanup(layout: &Layout, ctx: &str) -> Result<()> {
    let rec = match read_state(layout, ctx) {
        Ok(r) => r,
        Err(e) => {
            warn!("{e}; cleaning up by layout only");
            None
        }
    };

    // 1. Loop devices reading our FUSE file.
    let mut loops = loops_backed_by(&layout.backing);
    if let Some(dev) = rec.as_ref().and_then(|r| r.device.clone())
        && !loops.contains(&dev)
        && loop_backing(&dev).as_deref() == Some(layout.backing.as_path())
    {
        loops.push(dev);
    }
    let mounts = read_mountinfo_ctx(ctx)?;
    for dev in &loops {
        if let Some(mp) = mount_using_device(&mounts, dev) {
            return Err(precondition(
                ctx,
                format!(
                    "{} is still mounted at {}; unmount it first",
                    dev.display(),
                    mp.display()
                ),
            ));
        }
    }
    for dev in &loops {
        let out = run_output(
            ctx,
            "losetup",
            [OsStr::new("-d"), dev.as_os_str()],
            COMMAND_TIMEOUT,
        )
        .await?;
        let still = || loop_backing(dev).as_deref() == Some(layout.backing.as_path());
        if !out.status.success() && still() {
            return Err(command_failed(
                ctx,
                "losetup",
                &["-d".into(), dev.clone().into()],
                &out,
            ));
        }
        // `losetup -d` on an open device only sets autoclear; the kernel
        // drops the backing file at the last close. FUSE stays busy until then.
        if !wait_until(RELEASE_TIMEOUT, || !still()).await {
            return Err(AttachError::NotReady {
                context: ctx.to_owned(),
                what: format!(
                    "{} to release {} (still open?)",
                    dev.display(),
                    layout.backing.display()
                ),
                timeout: RELEASE_TIMEOUT,
            });
        }
        info!(device = %dev.display(), "loop device detached");
    }

    // 2. The FUSE mount.
    let fuse_mounted = |mounts: &[MountEntry]| {
        mounts
            .iter()
            .any(|m| m.mount_point == layout.fuse_dir && m.fstype.starts_with("fuse"))
    };
    if fuse_mounted(&read_mountinfo_ctx(ctx)?) {
        let out = run_output(
            ctx,
            "fusermount3",
            [OsStr::new("-u"), layout.fuse_dir.as_os_str()],
            COMMAND_TIMEOUT,
        )
        .await?;
        if !out.status.success() {
            let e = command_failed(
                ctx,
                "fusermount3",
                &["-u".into(), layout.fuse_dir.clone().into()],
                &out,
            );
            warn!("{e}; unmounting lazily");
            let dir = layout.fuse_dir.clone();
            let c = format!("{ctx}: lazy unmount of {} after: {e}", dir.display());
            blocking(ctx, move || {
                nix::mount::umount2(&dir, MntFlags::MNT_DETACH).map_err(sys_err(&c))
            })
            .await?;
        }
    }

    // 3. nbdfuse: exits by itself once unmounted.
    let mut pids: Vec<i32> = rec
        .as_ref()
        .and_then(|r| r.nbdfuse_pid)
        .into_iter()
        .collect();
    if let Some(p) = std::fs::read_to_string(&layout.pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        && !pids.contains(&p)
    {
        pids.push(p);
    }
    for pid in pids {
        stop_nbdfuse(pid, &layout.backing, ctx).await?;
    }

    // 4. Files.
    for f in [&layout.state_file, &layout.pidfile, &layout.log] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(ctx)(e)),
        }
    }
    match std::fs::remove_dir(&layout.fuse_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("{ctx}: removing {}: {e}", layout.fuse_dir.display()),
    }
    Ok(())
}
