//! Refreshing an attached device's size after the export grew: the
//! bridge is told to reconnect (`SIGUSR1`; the engine's own file shows the
//! new size by itself) and the loop device re-reads the file
//! ([`refresh_size`]).

use super::*;

/// Makes an attached device show the export's current size (after the
/// engine grew the volume) and returns the device size in bytes.
///
/// [`Backend::Engine`]: as below, without the signal (the engine drops the
/// kernel's cached size of its file when it grows).
///
/// [`Backend::Bridge`]: asks the export's size over a new NBD connection,
/// sends `SIGUSR1` to `zebu-nbd-fuse` (which reconnects and serves the new
/// size, see [`zebu_nbd_fuse`]), waits (polling, bounded by [`READY_TIMEOUT`])
/// until `fuse/disk` shows at least that size, runs `losetup -c DEVICE` so
/// the loop device re-reads it, and records the new size. Works while the
/// device is mounted and in use; growing the filesystem is a separate step
/// ([`expand_filesystem`]).
///
/// [`Backend::Nbdfuse`]: the device cannot grow while attached; if the
/// export is larger than the device this is [`AttachError::DeviceTooSmall`]
/// (with [`NBDFUSE_GROW_HINT`]), else the device size is returned.
///
/// Errors when nothing (working) is attached, or when the export is now
/// *smaller* than the device: a device never shrinks under data in use.
pub async fn refresh_size(state_dir: &Path) -> Result<u64> {
    let ctx = format!(
        "refreshing the device size (state dir {})",
        state_dir.display()
    );
    let layout = Layout::new(state_dir);
    let mut rec =
        read_state(&layout, &ctx)?.ok_or_else(|| precondition(&ctx, "nothing is attached"))?;
    let att = check_attached(&layout, &rec)
        .await
        .map_err(|why| precondition(&ctx, format!("the attachment is not working: {why}")))?;
    let export = bridge_export_size(&att.nbd_uri, &ctx).await?;
    let device_size = block_device_size(&att.device, &ctx).await?;
    match rec.backend {
        Backend::KernelNbd => return Err(AttachError::KernelNbdNotSupported { context: ctx }),
        Backend::Nbdfuse => {
            if export > device_size {
                return Err(AttachError::DeviceTooSmall {
                    context: ctx,
                    device: att.device,
                    actual: device_size,
                    required: export,
                    hint: NBDFUSE_GROW_HINT,
                });
            }
            return Ok(device_size);
        }
        Backend::Bridge | Backend::Engine => {}
    }
    if export < rec.size_bytes {
        return Err(precondition(
            &ctx,
            format!(
                "the export shrank from {} to {export} bytes; the device keeps its size \
                 (shrinking under data in use is refused)",
                rec.size_bytes
            ),
        ));
    }
    // The engine shows its new size by itself; the bridge reconnects to see it.
    if let Some(pid) = att.nbdfuse_pid.filter(|_| rec.backend == Backend::Bridge)
        && let Err(e) = kill(Pid::from_raw(pid), Signal::SIGUSR1)
    {
        return Err(sys_err(&format!(
            "{ctx}: signalling {BRIDGE_BINARY} (pid {pid})"
        ))(e));
    }
    // Each stat goes to the FUSE server once its cached attributes are
    // invalidated (right after it switched) or expired (1 s).
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    let file_size = loop {
        let shown = match tokio::fs::metadata(&layout.backing).await {
            Ok(m) => m.len(),
            Err(e) => return Err(io_err(&ctx)(e)),
        };
        if shown >= export {
            break shown;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(AttachError::NotReady {
                context: ctx,
                what: format!(
                    "{} to show {export} bytes (it shows {shown}; see {})",
                    layout.backing.display(),
                    layout.log.display()
                ),
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    };
    run(
        &ctx,
        "losetup",
        [OsStr::new("-c"), att.device.as_os_str()],
        COMMAND_TIMEOUT,
    )
    .await?;
    let size = block_device_size(&att.device, &ctx).await?;
    // The loop device counts whole 512-byte sectors.
    if size < file_size & !511 {
        return Err(precondition(
            &ctx,
            format!(
                "{} shows {size} bytes after `losetup -c`, expected {file_size}",
                att.device.display()
            ),
        ));
    }
    rec.size_bytes = file_size;
    write_state(&layout, &rec, &ctx)?;
    info!(device = %att.device.display(), old = device_size, new = size, "device size refreshed");
    Ok(size)
}
