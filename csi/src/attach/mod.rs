//! Node-side volume plumbing: turning a Zebu NBD export into a block device,
//! putting a filesystem on it and mounting it (the work behind CSI
//! `NodeStageVolume`, `NodeUnstageVolume`, `NodePublishVolume`,
//! `NodeUnpublishVolume`, `NodeExpandVolume` and `NodeGetVolumeStats`).
//!
//! # How a volume becomes a block device
//!
//! `zebu-engine` exports a volume as NBD on a unix socket
//! (`nbd+unix:///NAME?socket=PATH`). Kernels without the `nbd` driver (the
//! usual case in managed/containerised nodes) cannot attach it directly, so
//! [`attach`] starts Zebu's FUSE bridge `zebu-nbd-fuse` ([`Backend::Bridge`],
//! module [`bridge`]) to expose the export as a regular file on a private
//! FUSE mount, and a loop device over that file:
//!
//! ```text
//! filesystem ─ /dev/loopN ─ STATE_DIR/fuse/disk (FUSE) ─ zebu-nbd-fuse ─ NBD socket ─ zebu-engine
//! ```
//!
//! The bridge can grow the file while it is in use: [`refresh_size`] then
//! grows the loop device online. libnbd's `nbdfuse` ([`Backend::Nbdfuse`],
//! through [`attach_with`]) serves the same layout without online growth;
//! [`detach`] does not care which one runs.
//!
//! The code is split by concern: `fuse` (the FUSE server process),
//! `loopdev`, `filesystem` (make if blank, grow), `mount` (mountinfo,
//! mount, bind, unmount), `stats`, `command` (running the node's tools);
//! this file holds the attach/detach life cycle and its state record.
//!
//! Everything [`attach`] creates is recorded in `STATE_DIR/attach.json`, so
//! [`detach`] works after the node plugin restarts. The state directory is
//! owned by the caller (one per volume, e.g. `/var/lib/zebu/volumes/<id>`);
//! this module only creates files inside it:
//!
//! | path                  | what                                         |
//! |-----------------------|----------------------------------------------|
//! | `attach.json`         | [`Attached`] record                          |
//! | `fuse/`               | FUSE mount point (mode 0700)                 |
//! | `fuse/disk`           | the export as a file (backing the loop)      |
//! | `nbdfuse.pid`         | written by the FUSE server once it serves    |
//! | `nbdfuse.log`         | the FUSE server's stdout/stderr              |
//!
//! The kernel `nbd` driver path ([`Backend::KernelNbd`], `nbd-client`) is
//! detected ([`Backend::detect`]) but not implemented yet.
//!
//! # Limits (read before relying on this)
//!
//! * **Online expansion needs [`Backend::Bridge`]** (what [`attach`] uses):
//!   nbdfuse asks the server for the export size once, when it connects, so
//!   with it a grown export becomes visible only after unstage + stage.
//! * The FUSE server process (nbdfuse or zebu-nbd-fuse) must outlive the node plugin process. It is started
//!   in its own process group, so a plugin crash or restart (same container)
//!   does not kill it; a container restart that kills every process in the
//!   container does, and the volume's I/O then fails until it is re-staged.
//! * A read-only [`bind_block`] is a read-only *mount*; Linux does not stop
//!   writes through a device node on a read-only mount, so it is advisory.
//! * Callers serialise operations per volume (one state directory is not
//!   locked against concurrent `attach`/`detach`).
//! * All functions need `CAP_SYS_ADMIN` (mount, loop devices, FUSE).
//! * Online ext4 growth also needs `CAP_SYS_RESOURCE` (the kernel checks it
//!   in `EXT4_IOC_RESIZE_FS`); without it grow offline (`mount_path` = `None`).

mod command;
mod filesystem;
mod fuse;
mod loopdev;
mod mount;
mod mountinfo;
mod stats;

use command::*;
pub use filesystem::*;
use fuse::*;
use loopdev::*;
pub use mount::*;
pub use stats::*;

pub use mountinfo::MountEntry;

use std::ffi::{OsStr, OsString};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{Signal, kill};
use nix::sys::statvfs::FsFlags;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Filesystem types [`ensure_filesystem`] can create.
pub const SUPPORTED_FILESYSTEMS: &[&str] = &["ext4", "xfs"];

/// Default timeout for quick external commands (losetup, blkid, nbdinfo, ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout for `mkfs.*`, `resize2fs`, `xfs_growfs`, which scale with size.
pub const LONG_COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long [`attach`] waits for nbdfuse to serve the export file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`detach`] waits for the kernel to release a loop device and for
/// nbdfuse to exit after its mount is gone.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why [`expand_filesystem`] cannot see a grown export on an nbdfuse-backed
/// device; part of [`AttachError::DeviceTooSmall`].
pub const NBDFUSE_GROW_HINT: &str = "nbdfuse reads the export size only when it connects, so a \
grown volume becomes visible after it is unstaged and staged again (detach + attach); \
online growth is not possible with nbdfuse";

const STATE_FILE: &str = "attach.json";
const FUSE_DIR: &str = "fuse";
const FUSE_FILE: &str = "disk";
const PID_FILE: &str = "nbdfuse.pid";
const LOG_FILE: &str = "nbdfuse.log";
const STATE_VERSION: u32 = 1;

/// Every error this module returns. `context` says what was being done
/// (which volume, which path).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// An external command could not be started (not installed?).
    #[error("{context}: cannot run `{command}`: {source}")]
    Spawn {
        /// What was being done.
        context: String,
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// An external command did not finish in time; it was killed.
    #[error("{context}: `{command}` did not finish within {timeout:?} (killed)")]
    Timeout {
        /// What was being done.
        context: String,
        /// The command line.
        command: String,
        /// The limit that was exceeded.
        timeout: Duration,
    },
    /// An external command exited unsuccessfully.
    #[error("{context}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// What was being done.
        context: String,
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// Its stderr (or stdout when stderr was empty), trimmed.
        stderr: String,
    },
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A system call (mount, umount, statvfs, kill) failed.
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The state file exists but cannot be read or written as JSON.
    #[error("{context}: state file {}: {source}", path.display())]
    StateFile {
        /// What was being done.
        context: String,
        /// The state file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem type this module does not create or grow.
    #[error("{context}: unsupported filesystem type {fstype:?} (supported: ext4, xfs)")]
    UnsupportedFilesystem {
        /// What was being done.
        context: String,
        /// The requested or found type.
        fstype: String,
    },
    /// The device already holds data other than the requested filesystem.
    #[error("{context}: {} already contains {found}, not {requested}; refusing to reformat", device.display())]
    WrongFilesystem {
        /// What was being done.
        context: String,
        /// The device.
        device: PathBuf,
        /// What `blkid` found (`ext4`, `partition table dos`, ...).
        found: String,
        /// What the caller asked for.
        requested: String,
    },
    /// Something did not become ready (or go away) in time.
    #[error("{context}: timed out after {timeout:?} waiting for {what}")]
    NotReady {
        /// What was being done.
        context: String,
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// [`Backend::KernelNbd`] was requested.
    #[error(
        "{context}: attaching through the kernel nbd driver (nbd-client) is not supported yet; use the nbdfuse backend"
    )]
    KernelNbdNotSupported {
        /// What was being done.
        context: String,
    },
    /// The block device is smaller than the caller requires.
    #[error("{context}: {} is {actual} bytes but {required} bytes are required; {hint}", device.display())]
    DeviceTooSmall {
        /// What was being done.
        context: String,
        /// The device.
        device: PathBuf,
        /// Its size.
        actual: u64,
        /// The requested size.
        required: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// A precondition does not hold (busy device, conflicting mount, bad
    /// argument, attached to another export...).
    #[error("{context}: {message}")]
    Precondition {
        /// What was being done.
        context: String,
        /// What is wrong.
        message: String,
    },
}

/// Result type of this module.
pub type Result<T, E = AttachError> = std::result::Result<T, E>;

fn io_err(context: &str) -> impl FnOnce(io::Error) -> AttachError + '_ {
    move |source| AttachError::Io {
        context: context.to_owned(),
        source,
    }
}

fn sys_err(context: &str) -> impl FnOnce(Errno) -> AttachError + '_ {
    move |source| AttachError::Sys {
        context: context.to_owned(),
        source,
    }
}

fn precondition(context: &str, message: impl Into<String>) -> AttachError {
    AttachError::Precondition {
        context: context.to_owned(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Attach / detach.

/// How an NBD export is turned into a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// `nbdfuse` + loop device; needs only FUSE and loop support. The device
    /// cannot grow while attached.
    Nbdfuse,
    /// Zebu's own FUSE bridge, `zebu-nbd-fuse` ([`bridge`]), + loop device;
    /// needs only FUSE and loop support (no libnbd), and grows online
    /// ([`refresh_size`]).
    Bridge,
    /// The kernel `nbd` driver via `nbd-client`. Not supported yet.
    KernelNbd,
}

impl Backend {
    /// The backend this node would prefer: [`Backend::KernelNbd`] when the
    /// `nbd` module is loaded (`/sys/module/nbd` exists), else
    /// [`Backend::Nbdfuse`]. [`attach`] does not use it (it always uses the
    /// bridge, which works on both kinds of node) because the kernel path is
    /// not implemented.
    pub fn detect() -> Backend {
        if Path::new("/sys/module/nbd").exists() {
            Backend::KernelNbd
        } else {
            Backend::Nbdfuse
        }
    }
}

/// What [`attach`] created; also the content of `STATE_DIR/attach.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// The export this device shows.
    pub nbd_uri: String,
    /// The block device (`/dev/loopN`).
    pub device: PathBuf,
    /// The nbdfuse mount point (`STATE_DIR/fuse`).
    pub fuse_dir: PathBuf,
    /// The file nbdfuse serves and the loop device reads (`STATE_DIR/fuse/disk`).
    pub backing_file: PathBuf,
    /// The FUSE server's process id (nbdfuse or zebu-nbd-fuse).
    pub nbdfuse_pid: i32,
    /// Device size in bytes (the export size when the FUSE server connected,
    /// or at the last [`refresh_size`]).
    pub size_bytes: u64,
    /// Which FUSE server serves the backing file.
    pub backend: Backend,
}

/// On-disk record. Written once nbdfuse is started (no device yet) and again
/// when the loop device exists, so a crash in between can be cleaned up.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateRecord {
    version: u32,
    nbd_uri: String,
    fuse_dir: PathBuf,
    backing_file: PathBuf,
    nbdfuse_pid: Option<i32>,
    device: Option<PathBuf>,
    size_bytes: u64,
    /// Absent in records written before the bridge existed: nbdfuse.
    #[serde(default = "default_record_backend")]
    backend: Backend,
}

fn default_record_backend() -> Backend {
    Backend::Nbdfuse
}

struct Layout {
    state_file: PathBuf,
    fuse_dir: PathBuf,
    backing: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Layout {
    fn new(state_dir: &Path) -> Layout {
        let fuse_dir = state_dir.join(FUSE_DIR);
        Layout {
            state_file: state_dir.join(STATE_FILE),
            backing: fuse_dir.join(FUSE_FILE),
            fuse_dir,
            pidfile: state_dir.join(PID_FILE),
            log: state_dir.join(LOG_FILE),
        }
    }
}

fn read_state(layout: &Layout, context: &str) -> Result<Option<StateRecord>> {
    let bytes = match std::fs::read(&layout.state_file) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(context)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| AttachError::StateFile {
            context: context.to_owned(),
            path: layout.state_file.clone(),
            source,
        })
}

/// Writes the record atomically and durably ([`zebu_common::durable`]): detach
/// reads it after a restart.
fn write_state(layout: &Layout, rec: &StateRecord, context: &str) -> Result<()> {
    let json = serde_json::to_vec_pretty(rec).map_err(|source| AttachError::StateFile {
        context: context.to_owned(),
        path: layout.state_file.clone(),
        source,
    })?;
    let ctx = format!("{context}: writing {}", layout.state_file.display());
    zebu_common::durable::write(&layout.state_file, &json, 0o600).map_err(io_err(&ctx))
}

/// Attaches `nbd_uri` with [`Backend::Bridge`] (Zebu's own FUSE bridge:
/// faster than nbdfuse here and able to grow while mounted); see
/// [`attach_with`].
pub async fn attach(nbd_uri: &str, state_dir: &Path) -> Result<Attached> {
    attach_with(Backend::Bridge, nbd_uri, state_dir).await
}

/// Makes the NBD export `nbd_uri` available as a block device.
/// [`Backend::Nbdfuse`] takes any URI libnbd accepts, [`Backend::Bridge`]
/// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST[:PORT]/NAME`.
///
/// Idempotent: when `state_dir` records a still-working attachment of the
/// same URI, that is returned unchanged (whatever its backend); a stale
/// record (node reboot, dead FUSE server, detached loop) is cleaned up and
/// the export attached afresh. A working attachment of a *different* URI is
/// an error (detach it first).
///
/// Steps: query the export size (`nbdinfo --size`, or the bridge's own NBD
/// client), start the FUSE server in its own process group —
/// `nbdfuse -P STATE_DIR/nbdfuse.pid STATE_DIR/fuse/disk URI`, or
/// `zebu-nbd-fuse --uri URI --file STATE_DIR/fuse/disk --pidfile STATE_DIR/nbdfuse.pid`
/// (found next to the running executable, or in its parent directory when
/// that is cargo's `deps/`, else on `PATH`) — wait (polling, bounded by
/// [`READY_TIMEOUT`]) until the pid file is written and `fuse/disk` has the
/// export's size, then `losetup --find --show --direct-io=off fuse/disk`
/// (`--direct-io=on` for the bridge, which serves the file with direct I/O).
/// On failure everything already created is torn down again.
pub async fn attach_with(backend: Backend, nbd_uri: &str, state_dir: &Path) -> Result<Attached> {
    let ctx = format!("attaching {nbd_uri} (state dir {})", state_dir.display());
    let program = match backend {
        Backend::KernelNbd => return Err(AttachError::KernelNbdNotSupported { context: ctx }),
        Backend::Nbdfuse => PathBuf::from("nbdfuse"),
        Backend::Bridge => bridge_binary(&ctx)?,
    };
    if !nbd_uri.starts_with("nbd") || !nbd_uri.contains("://") {
        return Err(precondition(
            &ctx,
            "not an NBD URI (expected nbd+unix:///NAME?socket=PATH)",
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err(&ctx))?;
    let layout = Layout::new(state_dir);

    // A record from an earlier attach (maybe before a plugin restart)?
    match read_state(&layout, &ctx) {
        Ok(Some(rec)) => match check_attached(&layout, &rec).await {
            Ok(att) if att.nbd_uri == nbd_uri => {
                info!(device = %att.device.display(), "already attached");
                return Ok(att);
            }
            Ok(att) => {
                return Err(precondition(
                    &ctx,
                    format!(
                        "state dir already holds a working attachment of {} on {}; detach it first",
                        att.nbd_uri,
                        att.device.display()
                    ),
                ));
            }
            Err(why) => warn!(context = %ctx, "stale attachment ({why}); cleaning up"),
        },
        Ok(None) => {}
        Err(e) => warn!(context = %ctx, "unreadable state ({e}); cleaning up"),
    }
    cleanup(&layout, &ctx).await?;

    let expected = match backend {
        Backend::Bridge => bridge_export_size(nbd_uri, &ctx).await?,
        _ => export_size(nbd_uri).await?,
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&layout.fuse_dir)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(io_err(&ctx))?;

    let mut att = match start_server(&layout, backend, &program, nbd_uri, expected, &ctx).await {
        Ok(att) => att,
        Err(e) => {
            if let Err(ce) = cleanup(&layout, &ctx).await {
                warn!("cleanup after failed attach: {ce}");
            }
            return Err(e);
        }
    };
    match losetup(&layout.backing, backend == Backend::Bridge, &ctx).await {
        Ok(device) => att.device = device,
        Err(e) => {
            if let Err(ce) = cleanup(&layout, &ctx).await {
                warn!("cleanup after failed attach: {ce}");
            }
            return Err(e);
        }
    }
    let rec = StateRecord {
        version: STATE_VERSION,
        nbd_uri: att.nbd_uri.clone(),
        fuse_dir: att.fuse_dir.clone(),
        backing_file: att.backing_file.clone(),
        nbdfuse_pid: Some(att.nbdfuse_pid),
        device: Some(att.device.clone()),
        size_bytes: att.size_bytes,
        backend,
    };
    if let Err(e) = write_state(&layout, &rec, &ctx) {
        if let Err(ce) = cleanup(&layout, &ctx).await {
            warn!("cleanup after failed attach: {ce}");
        }
        return Err(e);
    }
    info!(device = %att.device.display(), size = att.size_bytes, "attached {nbd_uri}");
    Ok(att)
}

/// The export size in bytes, from `nbdinfo --size URI`.
pub async fn export_size(nbd_uri: &str) -> Result<u64> {
    let ctx = format!("querying the size of {nbd_uri}");
    let out = run(&ctx, "nbdinfo", ["--size", nbd_uri], COMMAND_TIMEOUT).await?;
    out.trim().parse().map_err(|_| {
        precondition(
            &ctx,
            format!("nbdinfo printed {:?}, not a size", out.trim()),
        )
    })
}

/// Makes an attached device show the export's current size (after the
/// engine grew the volume) and returns the device size in bytes.
///
/// [`Backend::Bridge`]: asks the export's size over a new NBD connection,
/// sends `SIGUSR1` to `zebu-nbd-fuse` (which reconnects and serves the new
/// size, see [`bridge`]), waits (polling, bounded by [`READY_TIMEOUT`])
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
        Backend::Bridge => {}
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
    match kill(Pid::from_raw(att.nbdfuse_pid), Signal::SIGUSR1) {
        Ok(()) => {}
        Err(e) => {
            return Err(sys_err(&format!(
                "{ctx}: signalling {BRIDGE_BINARY} (pid {})",
                att.nbdfuse_pid
            ))(e));
        }
    }
    // Each stat goes to the bridge once its cached attributes are
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

/// Checks that a recorded attachment still works: the loop device still
/// reads our FUSE file, the FUSE mount is there and answers, and nbdfuse
/// runs. Returns the reason when not.
async fn check_attached(layout: &Layout, rec: &StateRecord) -> Result<Attached, String> {
    if rec.backing_file != layout.backing || rec.fuse_dir != layout.fuse_dir {
        return Err("state dir moved".into());
    }
    let device = rec.device.clone().ok_or("no loop device recorded")?;
    if loop_backing(&device).as_deref() != Some(layout.backing.as_path()) {
        return Err(format!(
            "{} no longer reads {}",
            device.display(),
            layout.backing.display()
        ));
    }
    let pid = rec.nbdfuse_pid.ok_or("no nbdfuse pid recorded")?;
    if !is_our_server(pid, &layout.backing) {
        return Err(format!("the FUSE server (pid {pid}) is gone"));
    }
    let mounts = read_mountinfo().map_err(|e| e.to_string())?;
    if !mounts
        .iter()
        .any(|m| m.mount_point == layout.fuse_dir && m.fstype.starts_with("fuse"))
    {
        return Err(format!("{} is not a FUSE mount", layout.fuse_dir.display()));
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, tokio::fs::metadata(&layout.backing)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("{}: {e}", layout.backing.display())),
        Err(_) => return Err(format!("{} does not answer", layout.backing.display())),
    }
    Ok(Attached {
        nbd_uri: rec.nbd_uri.clone(),
        device,
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: pid,
        size_bytes: rec.size_bytes,
        backend: rec.backend,
    })
}

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

async fn cleanup(layout: &Layout, ctx: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (f, d) =
            parse_mount_options(&s(&["noatime,discard", "nodev", "errors=remount-ro"]), "t")
                .unwrap();
        assert_eq!(f, MsFlags::MS_NOATIME | MsFlags::MS_NODEV);
        assert_eq!(d, "discard,errors=remount-ro");
        let (f, d) = parse_mount_options(&s(&["ro", "rw", "defaults"]), "t").unwrap();
        assert_eq!(f, MsFlags::empty());
        assert_eq!(d, "");
        assert!(parse_mount_options(&s(&["bind"]), "t").is_err());
        assert!(parse_mount_options(&s(&["noatime,remount"]), "t").is_err());
    }

    #[test]
    fn errors_carry_context_and_stderr() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(run(
                "doing X",
                "sh",
                ["-c", "echo oops >&2; exit 3"],
                COMMAND_TIMEOUT,
            ))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("doing X") && msg.contains("oops") && msg.contains('3'),
            "{msg}"
        );
        let e = rt
            .block_on(run("doing Y", "sleep", ["30"], Duration::from_millis(100)))
            .unwrap_err();
        assert!(matches!(e, AttachError::Timeout { .. }), "{e}");
        let e = rt
            .block_on(run("doing Z", "/nonexistent/tool", ["x"], COMMAND_TIMEOUT))
            .unwrap_err();
        assert!(matches!(e, AttachError::Spawn { .. }), "{e}");
    }

    #[test]
    fn unsupported_fstype_is_refused_before_touching_the_device() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(ensure_filesystem(Path::new("/nonexistent"), "btrfs"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("btrfs") && msg.contains("ext4, xfs"), "{msg}");
    }

    #[test]
    fn bridge_binary_is_found_next_to_the_executable_or_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let deps = bin.join("deps");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&deps).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        let exe = bin.join("zebu-csi");
        // Nothing installed: not found, and the error names the binary.
        assert_eq!(
            find_bridge_binary(Some(&exe), Some(elsewhere.as_os_str())),
            None
        );
        let ctx = "attaching x";
        let e = bridge_binary(ctx).map(|_| ()).map_err(|e| e.to_string());
        if let Err(msg) = e {
            assert!(msg.contains(BRIDGE_BINARY) && msg.contains("PATH"), "{msg}");
        }
        // Not executable: ignored.
        let on_path = elsewhere.join(BRIDGE_BINARY);
        std::fs::write(&on_path, b"").unwrap();
        assert_eq!(
            find_bridge_binary(Some(&exe), Some(elsewhere.as_os_str())),
            None
        );
        std::fs::set_permissions(&on_path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_bridge_binary(Some(&exe), Some(elsewhere.as_os_str())),
            Some(on_path.clone())
        );
        // Next to the executable wins over PATH; cargo's deps/ looks one up.
        let next_to = bin.join(BRIDGE_BINARY);
        std::fs::write(&next_to, b"").unwrap();
        std::fs::set_permissions(&next_to, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_bridge_binary(Some(&exe), Some(elsewhere.as_os_str())),
            Some(next_to.clone())
        );
        assert_eq!(
            find_bridge_binary(Some(&deps.join("attach-1234")), None),
            Some(next_to)
        );
    }

    #[test]
    fn records_without_a_backend_are_nbdfuse() {
        let json = r#"{"version":1,"nbd_uri":"nbd+unix:///?socket=/s","fuse_dir":"/d/fuse",
            "backing_file":"/d/fuse/disk","nbdfuse_pid":7,"device":null,"size_bytes":5}"#;
        let rec: StateRecord = serde_json::from_str(json).unwrap();
        assert_eq!(rec.backend, Backend::Nbdfuse);
        let rec = StateRecord {
            backend: Backend::Bridge,
            ..rec
        };
        let back: StateRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.backend, Backend::Bridge);
    }

    #[test]
    fn kernel_nbd_backend_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = rt
            .block_on(attach_with(
                Backend::KernelNbd,
                "nbd+unix:///x?socket=/s",
                dir.path(),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
    }
}
