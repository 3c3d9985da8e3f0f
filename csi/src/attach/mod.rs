//! Node-side volume plumbing: turning a Zebu NBD export into a block device,
//! putting a filesystem on it and mounting it (the work behind CSI
//! `NodeStageVolume`, `NodeUnstageVolume`, `NodePublishVolume`,
//! `NodeUnpublishVolume`, `NodeExpandVolume` and `NodeGetVolumeStats`).
//!
//! # How a volume becomes a block device
//!
//! `zebu-engine` exports a volume as NBD on a unix socket
//! (`nbd+unix:///NAME?socket=PATH`), and, started by the agent, also serves
//! it as a regular file on a FUSE mount of its own (`zebu-engine --file`).
//! Kernels without the `nbd` driver (the usual case in managed or
//! containerised nodes) cannot attach NBD directly, so [`attach`] puts a loop
//! device over that file ([`Backend::Engine`]), bind-mounting its directory
//! at `STATE_DIR/fuse` so every backend has the same layout:
//!
//! ```text
//! filesystem ─ /dev/loopN ─ STATE_DIR/fuse/disk (bind of the engine's FUSE mount) ─ zebu-engine
//! ```
//!
//! No process and no socket sit between the kernel and the engine. When the
//! engine serves no file (`publish_context` names none), [`attach`] starts
//! Zebu's FUSE bridge `zebu-nbd-fuse` ([`Backend::Bridge`], crate
//! [`zebu_nbd_fuse`]), which serves the NBD export as the same file:
//!
//! ```text
//! filesystem ─ /dev/loopN ─ STATE_DIR/fuse/disk (FUSE) ─ zebu-nbd-fuse ─ NBD socket ─ zebu-engine
//! ```
//!
//! Both grow the file while it is in use (the engine by itself, the bridge
//! on `SIGUSR1`): [`refresh_size`] then grows the loop device online.
//! libnbd's `nbdfuse` ([`Backend::Nbdfuse`], through [`attach_with`]) serves
//! the same layout without online growth; [`detach`] does not care which one
//! runs.
//!
//! The code is split by concern: `state` (the state record and layout),
//! `teardown` (detach), `refresh` (online growth of the device), `fuse`
//! (the FUSE server process), `loopdev`, `filesystem` (make if blank,
//! grow), `mount` (mountinfo, mount, bind, unmount), `stats`, `command`
//! (running the node's tools); this file holds the types and attach.
//!
//! Everything [`attach`] creates is recorded in `STATE_DIR/attach.json`, so
//! [`detach`] works after the node plugin restarts. The state directory is
//! owned by the caller (one per volume, e.g. `/var/lib/zebu/volumes/<id>`);
//! this module only creates files inside it:
//!
//! | path                  | what                                         |
//! |-----------------------|----------------------------------------------|
//! | `attach.json`         | [`Attached`] record                          |
//! | `fuse/`               | FUSE mount point (mode 0700), or the bind of the engine's |
//! | `fuse/disk`           | the export as a file (backing the loop)      |
//! | `nbdfuse.pid`         | written by the FUSE server once it serves    |
//! | `nbdfuse.log`         | the FUSE server's stdout/stderr              |
//!
//! The kernel `nbd` driver path ([`Backend::KernelNbd`], `nbd-client`) is
//! detected ([`Backend::detect`]) but not implemented yet.
//!
//! # Limits (read before relying on this)
//!
//! * **Online expansion needs [`Backend::Engine`] or [`Backend::Bridge`]** (what [`attach`] uses):
//!   nbdfuse asks the server for the export size once, when it connects, so
//!   with it a grown export becomes visible only after unstage + stage.
//! * The engine's file lives as long as the engine: an engine that dies
//!   leaves a dead mount, and the volume's I/O fails until it is re-staged
//!   (a re-stage finds the attachment broken and attaches afresh).
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
mod refresh;
mod state;
mod stats;
mod teardown;

use command::*;
pub use filesystem::*;
use fuse::*;
use loopdev::*;
pub use mount::*;
pub use refresh::*;
use state::*;
pub use stats::*;
pub use teardown::*;

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
    /// The FUSE server could not be moved out of the plugin's container.
    #[error("{context}: {source}")]
    Cgroup {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: zebu_common::cgroup::CgroupError,
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
    /// Zebu's own FUSE bridge, `zebu-nbd-fuse` ([`zebu_nbd_fuse`]), + loop device;
    /// needs only FUSE and loop support (no libnbd), and grows online
    /// ([`refresh_size`]).
    Bridge,
    /// The file the engine itself serves the volume as (on a FUSE mount of
    /// its own, `zebu-engine --file`), bind-mounted at `STATE_DIR/fuse`, +
    /// loop device: no process or socket between the kernel and the engine.
    /// Grows online (the engine shows its new size itself).
    Engine,
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
    /// The FUSE server's process id (nbdfuse or zebu-nbd-fuse); `None` with
    /// [`Backend::Engine`] (the engine serves the file).
    pub nbdfuse_pid: Option<i32>,
    /// Device size in bytes (the export size when the FUSE server connected,
    /// or at the last [`refresh_size`]).
    pub size_bytes: u64,
    /// Which FUSE server serves the backing file.
    pub backend: Backend,
}

/// Attaches the volume the engine exports as `nbd_uri`: with
/// [`Backend::Engine`] when the engine serves it as `engine_file` (what
/// `ControllerPublishVolume` says), else with [`Backend::Bridge`] (Zebu's
/// own FUSE bridge: faster than nbdfuse here and able to grow while
/// mounted); see [`attach_with`].
pub async fn attach(
    nbd_uri: &str,
    engine_file: Option<&Path>,
    state_dir: &Path,
) -> Result<Attached> {
    match engine_file {
        Some(file) => attach_from(Backend::Engine, nbd_uri, Some(file), state_dir).await,
        None => attach_with(Backend::Bridge, nbd_uri, state_dir).await,
    }
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
///
/// [`Backend::Engine`] needs the engine's file: use [`attach`].
pub async fn attach_with(backend: Backend, nbd_uri: &str, state_dir: &Path) -> Result<Attached> {
    attach_from(backend, nbd_uri, None, state_dir).await
}

async fn attach_from(
    backend: Backend,
    nbd_uri: &str,
    engine_file: Option<&Path>,
    state_dir: &Path,
) -> Result<Attached> {
    let ctx = format!("attaching {nbd_uri} (state dir {})", state_dir.display());
    // What serves the file: a FUSE server to start, or the engine's file.
    let server = match (backend, engine_file) {
        (Backend::KernelNbd, _) => {
            return Err(AttachError::KernelNbdNotSupported { context: ctx });
        }
        (Backend::Nbdfuse, _) => PathBuf::from("nbdfuse"),
        (Backend::Bridge, _) => bridge_binary(&ctx)?,
        (Backend::Engine, Some(file)) => file.to_owned(),
        (Backend::Engine, None) => {
            return Err(precondition(&ctx, "the engine serves no file to attach"));
        }
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
        Backend::Bridge | Backend::Engine => bridge_export_size(nbd_uri, &ctx).await?,
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

    let started = match backend {
        Backend::Engine => bind_engine_file(&layout, &server, nbd_uri, expected, &ctx).await,
        _ => start_server(&layout, backend, &server, nbd_uri, expected, &ctx).await,
    };
    let mut att = match started {
        Ok(att) => att,
        Err(e) => {
            if let Err(ce) = cleanup(&layout, &ctx).await {
                warn!("cleanup after failed attach: {ce}");
            }
            return Err(e);
        }
    };
    let direct_io = matches!(backend, Backend::Bridge | Backend::Engine);
    match losetup(&layout.backing, direct_io, &ctx).await {
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
        nbdfuse_pid: att.nbdfuse_pid,
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
