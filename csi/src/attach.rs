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
//! [`attach`] uses `nbdfuse` (libnbd) to expose the export as a regular file
//! on a private FUSE mount, and a loop device over that file:
//!
//! ```text
//! filesystem ─ /dev/loopN ─ STATE_DIR/fuse/disk (FUSE) ─ nbdfuse ─ NBD socket ─ zebu-engine
//! ```
//!
//! The FUSE server is either `nbdfuse` ([`Backend::Nbdfuse`], what [`attach`]
//! uses) or Zebu's own bridge `zebu-nbd-fuse` ([`Backend::Bridge`], module
//! [`bridge`], via [`attach_with`]), which can grow the file while it is in
//! use: [`refresh_size`] then grows the loop device online. Both write the
//! same state-dir layout, so [`detach`] does not care which one runs.
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
//! * **Online expansion needs [`Backend::Bridge`]**: nbdfuse asks the
//!   server for the export size once, when it connects, and serves that size
//!   for its whole life. A grown export becomes visible only through a new
//!   nbdfuse connection, which needs the loop device (and so the filesystem)
//!   to be released first: unstage + stage again, then
//!   [`expand_filesystem`] grows the filesystem. See [`expand_filesystem`].
//!   With the bridge, [`refresh_size`] + [`expand_filesystem`] work online.
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

pub mod bridge;
mod mountinfo;

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
// External commands.

fn command_line(program: &str, args: &[OsString]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args...` with stdin closed, capturing output, killing it
/// after `timeout`. Returns the output whatever the exit status.
async fn run_output<I, S>(
    context: &str,
    program: &str,
    args: I,
    timeout: Duration,
) -> Result<std::process::Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = command_line(program, &args);
    debug!(%command, "running");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the future on timeout kills the child.
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| AttachError::Spawn {
        context: context.to_owned(),
        command: command.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(AttachError::Io {
            context: format!("{context}: waiting for `{command}`"),
            source,
        }),
        Err(_) => Err(AttachError::Timeout {
            context: context.to_owned(),
            command,
            timeout,
        }),
    }
}

/// Like [`run_output`] but a non-zero exit is an error; returns stdout.
async fn run<I, S>(context: &str, program: &str, args: I, timeout: Duration) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run_output(context, program, &args, timeout).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_failed(context, program, &args, &out))
    }
}

fn command_failed(
    context: &str,
    program: &str,
    args: &[OsString],
    out: &std::process::Output,
) -> AttachError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    AttachError::Command {
        context: context.to_owned(),
        command: command_line(program, args),
        status: out.status.to_string(),
        stderr,
    }
}

/// Runs blocking work (syscalls that may wait on I/O) off the async threads.
async fn blocking<T, F>(context: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(AttachError::Io {
            context: context.to_owned(),
            source: io::Error::other(e),
        }),
    }
}

/// Polls `check` (cheap, non-blocking) until it is true or `timeout` passes.
/// Back-off from 5 ms to 100 ms; returns whether it became true.
async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if check() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
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
    /// [`Backend::Nbdfuse`]. [`attach`] does not use it yet (it always uses
    /// nbdfuse, which works on both kinds of node) because the kernel path is
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

/// Writes the record atomically and durably ([`crate::durable`]): detach
/// reads it after a restart.
fn write_state(layout: &Layout, rec: &StateRecord, context: &str) -> Result<()> {
    let json = serde_json::to_vec_pretty(rec).map_err(|source| AttachError::StateFile {
        context: context.to_owned(),
        path: layout.state_file.clone(),
        source,
    })?;
    let ctx = format!("{context}: writing {}", layout.state_file.display());
    crate::durable::write(&layout.state_file, &json, 0o600).map_err(io_err(&ctx))
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

/// Name of the bridge executable ([`Backend::Bridge`]).
pub const BRIDGE_BINARY: &str = "zebu-nbd-fuse";

/// Where [`Backend::Bridge`] finds `zebu-nbd-fuse`: next to `exe` (the
/// running executable), in `exe`'s grandparent directory when `exe` is in
/// cargo's `deps/` (test binaries), else in a directory of `path` (`$PATH`).
fn find_bridge_binary(exe: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        dirs.push(dir.to_owned());
        if dir.file_name() == Some(OsStr::new("deps"))
            && let Some(up) = dir.parent()
        {
            dirs.push(up.to_owned());
        }
    }
    if let Some(path) = path {
        dirs.extend(std::env::split_paths(path));
    }
    dirs.into_iter()
        .map(|d| d.join(BRIDGE_BINARY))
        .find(|p| is_exec(p))
}

fn bridge_binary(ctx: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let path = std::env::var_os("PATH");
    find_bridge_binary(exe.as_deref(), path.as_deref()).ok_or_else(|| {
        precondition(
            ctx,
            format!(
                "the {BRIDGE_BINARY} executable was found neither next to {} nor on PATH; \
                 install it alongside zebu-csi",
                exe.as_deref()
                    .map(|e| e.display().to_string())
                    .unwrap_or_else(|| "the running executable".into())
            ),
        )
    })
}

/// The export size through the bridge's NBD client (no libnbd needed).
async fn bridge_export_size(nbd_uri: &str, ctx: &str) -> Result<u64> {
    let uri: bridge::nbd_client::NbdUri = nbd_uri
        .parse()
        .map_err(|e| precondition(ctx, format!("{e}")))?;
    bridge::nbd_client::probe(&uri)
        .await
        .map(|info| info.size)
        .map_err(|e| precondition(ctx, format!("querying the export size: {e}")))
}

/// Starts the FUSE server (`program`: nbdfuse or zebu-nbd-fuse) and waits
/// until it serves the export; records the pid. Returns an [`Attached`]
/// without a device yet.
async fn start_server(
    layout: &Layout,
    backend: Backend,
    program: &Path,
    nbd_uri: &str,
    expected: u64,
    ctx: &str,
) -> Result<Attached> {
    // A stale pid file would make us think the new nbdfuse is ready.
    match std::fs::remove_file(&layout.pidfile) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(ctx)(e)),
    }
    let log = std::fs::File::create(&layout.log).map_err(io_err(ctx))?;
    let log2 = log.try_clone().map_err(io_err(ctx))?;
    let args: Vec<OsString> = match backend {
        Backend::Bridge => vec![
            "--uri".into(),
            nbd_uri.into(),
            "--file".into(),
            layout.backing.clone().into(),
            "--pidfile".into(),
            layout.pidfile.clone().into(),
        ],
        _ => vec![
            "-P".into(),
            layout.pidfile.clone().into(),
            layout.backing.clone().into(),
            nbd_uri.into(),
        ],
    };
    let command = command_line(&program.to_string_lossy(), &args);
    // nbdfuse 1.14 and zebu-nbd-fuse stay in the foreground; they write the
    // pid file once they serve. Its own process group keeps terminal/group
    // signals aimed at the plugin away from it: it must outlive the plugin
    // (see module docs).
    let mut child = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| AttachError::Spawn {
            context: ctx.to_owned(),
            command: command.clone(),
            source,
        })?;
    let child_pid = child.id().and_then(|p| i32::try_from(p).ok());

    let mut rec = StateRecord {
        version: STATE_VERSION,
        nbd_uri: nbd_uri.to_owned(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: child_pid,
        device: None,
        size_bytes: expected,
        backend,
    };
    let ready = match write_state(layout, &rec, ctx) {
        Ok(()) => wait_nbdfuse_ready(&mut child, layout, expected, &command, ctx).await,
        Err(e) => Err(e),
    };
    let (pid, exited_ok) = match ready {
        Ok(v) => v,
        Err(e) => {
            // Our own child (not a pid read from a file): safe to kill. The
            // caller's cleanup() then removes a FUSE mount it may have made.
            let _ = child.start_kill();
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, child.wait()).await;
            return Err(e);
        }
    };
    if !exited_ok {
        // Reap nbdfuse when it exits (after detach) and log it.
        let uri = nbd_uri.to_owned();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => info!(%uri, %status, "FUSE server exited"),
                Err(e) => warn!(%uri, "waiting for the FUSE server: {e}"),
            }
        });
    }
    rec.nbdfuse_pid = Some(pid);
    write_state(layout, &rec, ctx)?;
    Ok(Attached {
        nbd_uri: nbd_uri.to_owned(),
        device: PathBuf::new(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: pid,
        size_bytes: expected,
        backend,
    })
}

/// Polls until nbdfuse has written its pid file and serves a file of the
/// export's size. Returns the pid from the pid file and whether the started
/// process already exited successfully (a daemonizing nbdfuse).
async fn wait_nbdfuse_ready(
    child: &mut tokio::process::Child,
    layout: &Layout,
    expected: u64,
    command: &str,
    ctx: &str,
) -> Result<(i32, bool)> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    let mut exited_ok = false;
    let mut last_size = None;
    loop {
        if !exited_ok {
            match child.try_wait() {
                Ok(None) => {}
                // Exit 0 with a pid file: a daemonizing nbdfuse; keep polling.
                Ok(Some(status)) if status.success() => exited_ok = true,
                Ok(Some(status)) => {
                    let log = std::fs::read_to_string(&layout.log).unwrap_or_default();
                    return Err(AttachError::Command {
                        context: ctx.to_owned(),
                        command: command.to_owned(),
                        status: status.to_string(),
                        stderr: log.trim().to_owned(),
                    });
                }
                Err(e) => return Err(io_err(ctx)(e)),
            }
        }
        let pid = std::fs::read_to_string(&layout.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            // Ready; the FUSE file is served now (stat goes through FUSE).
            match tokio::fs::metadata(&layout.backing).await {
                Ok(m) if m.len() == expected => return Ok((pid, exited_ok)),
                Ok(m) => last_size = Some(m.len()),
                Err(e) => debug!("stat {}: {e}", layout.backing.display()),
            }
        } else if exited_ok {
            let log = std::fs::read_to_string(&layout.log).unwrap_or_default();
            return Err(precondition(
                ctx,
                format!(
                    "`{command}` exited without writing its pid file: {}",
                    log.trim()
                ),
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            let what = match last_size {
                Some(s) => format!(
                    "{} to be {expected} bytes (the FUSE server shows {s})",
                    layout.backing.display()
                ),
                None => format!("the FUSE server to serve {}", layout.backing.display()),
            };
            return Err(AttachError::NotReady {
                context: ctx.to_owned(),
                what,
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

async fn losetup(backing: &Path, direct_io: bool, ctx: &str) -> Result<PathBuf> {
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

async fn stop_nbdfuse(pid: i32, backing: &Path, ctx: &str) -> Result<()> {
    let gone = || !is_our_server(pid, backing);
    if wait_until(RELEASE_TIMEOUT / 3, gone).await {
        return Ok(());
    }
    for (sig, wait) in [
        (Signal::SIGTERM, RELEASE_TIMEOUT / 3),
        (Signal::SIGKILL, RELEASE_TIMEOUT / 3),
    ] {
        if gone() {
            return Ok(());
        }
        warn!(
            pid,
            "FUSE server still running after unmount; sending {sig}"
        );
        match kill(Pid::from_raw(pid), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(sys_err(&format!("{ctx}: kill {sig} nbdfuse pid {pid}"))(e)),
        }
        if wait_until(wait, gone).await {
            return Ok(());
        }
    }
    Err(AttachError::NotReady {
        context: ctx.to_owned(),
        what: format!("nbdfuse (pid {pid}) to exit"),
        timeout: RELEASE_TIMEOUT,
    })
}

/// True when `pid` is a live (not zombie) nbdfuse or zebu-nbd-fuse serving
/// `backing`; checks the command line so a recycled pid is never mistaken
/// for ours.
fn is_our_server(pid: i32, backing: &Path) -> bool {
    const SERVERS: [&str; 2] = ["nbdfuse", BRIDGE_BINARY];
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ..."; comm may contain spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next();
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if cmdline.is_empty() {
        // An exiting process has released its memory (and so its command
        // line) before it becomes a zombie: still running, judge by name.
        return SERVERS.contains(&comm);
    }
    let mut args = cmdline.split(|&b| b == 0);
    let is_server = args.next().is_some_and(|a0| {
        SERVERS
            .iter()
            .any(|s| Path::new(OsStr::from_bytes(a0)).ends_with(s))
    });
    is_server && args.any(|a| a == backing.as_os_str().as_bytes())
}

/// The file a loop device reads, from sysfs; `None` when not a configured
/// loop device.
fn loop_backing(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?;
    let s = std::fs::read(Path::new("/sys/block").join(name).join("loop/backing_file")).ok()?;
    let s = s.strip_suffix(b"\n").unwrap_or(&s);
    Some(PathBuf::from(OsStr::from_bytes(s)))
}

/// Every loop device whose backing file is `backing` (sysfs scan; does not
/// touch the file itself, so it works when the FUSE server is dead).
fn loops_backed_by(backing: &Path) -> Vec<PathBuf> {
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

/// A mount point using `device`: mounted from it, or a bind of its device
/// node (publish target of a block volume).
fn mount_using_device(mounts: &[MountEntry], device: &Path) -> Option<PathBuf> {
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

enum Probe {
    Empty,
    Filesystem(String),
    Other(String),
}

async fn probe(device: &Path, ctx: &str) -> Result<Probe> {
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
const EXT_SLACK: u64 = 64 * 1024;

/// Size of the ext2/3/4 filesystem on `device` from its superblock
/// (`dumpe2fs -h`: block count × block size).
async fn ext_fs_bytes(device: &Path, ctx: &str) -> Result<u64> {
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

async fn expand_offline(device: &Path, size: u64, ctx: &str) -> Result<u64> {
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
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the effective capability set (`CapEff` in /proc/self/status)
/// holds capability number `cap`. Unknown → assume yes and let the command
/// report the failure.
fn has_effective_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_none_or(|mask| mask & (1u64 << cap) != 0)
}

fn is_loop_device(device: &Path) -> bool {
    device
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(b"loop"))
        && device
            .file_name()
            .is_some_and(|n| Path::new("/sys/block").join(n).join("loop").exists())
}

/// Size of a block device (or of what a bind-mounted device node shows):
/// seeking to the end of a block device yields its size.
async fn block_device_size(device: &Path, ctx: &str) -> Result<u64> {
    let device = device.to_owned();
    let c = format!("{ctx}: size of {}", device.display());
    blocking(ctx, move || {
        let mut f = std::fs::File::open(&device).map_err(io_err(&c))?;
        f.seek(SeekFrom::End(0)).map_err(io_err(&c))
    })
    .await
}

// ---------------------------------------------------------------------------
// Mounts.

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(mountinfo::parse(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

fn read_mountinfo_ctx(ctx: &str) -> Result<Vec<MountEntry>> {
    read_mountinfo().map_err(io_err(ctx))
}

/// The absolute path as mountinfo would show it, resolving symlinks in the
/// parent only (the target itself may be an unresponsive mount: never stat
/// it). `None` when the parent does not exist.
fn mountinfo_path(target: &Path) -> io::Result<Option<PathBuf>> {
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
fn parse_mount_options(options: &[String], ctx: &str) -> Result<(MsFlags, String)> {
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

fn create_dir_target(target: &Path, ctx: &str) -> Result<()> {
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

fn check_existing(ctx: &str, m: &MountEntry, same: bool, want_ro: bool) -> Result<()> {
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

async fn bind(src: &Path, target: &Path, read_only: bool, ctx: &str) -> Result<()> {
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
fn fs_stats_from(st: &nix::sys::statvfs::Statvfs) -> FsStats {
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
