//! Shared pieces of the `attach` tests (nbdfuse and the FUSE bridge):
//! an `nbdkit` export, attachment / mount / loop-device guards that clean up
//! when dropped, and small file helpers. Every wait is a poll bounded by
//! [`DEADLINE`].

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zebu_csi::attach::{self, Attached, Backend, VolumeStats};

/// Bound of every poll.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub use zebu_testkit::{NbdKit, runtime as rt};

/// [`zebu_testkit::poll`] bounded by [`DEADLINE`].
pub fn poll(what: &str, check: impl FnMut() -> bool) {
    zebu_testkit::poll(what, DEADLINE, check)
}

/// An attachment; `attach::detach` when dropped (best effort).
pub struct Attachment {
    pub state_dir: PathBuf,
    pub att: Attached,
}

impl Attachment {
    pub fn new(backend: Backend, uri: &str, state_dir: &Path) -> Attachment {
        let att = rt()
            .block_on(attach::attach_with(backend, uri, state_dir))
            .unwrap_or_else(|e| panic!("attach: {e}"));
        Attachment {
            state_dir: state_dir.to_owned(),
            att,
        }
    }

    pub fn device(&self) -> &Path {
        &self.att.device
    }

    /// Detaches now and asserts success.
    pub fn detach(self) {
        rt().block_on(attach::detach(&self.state_dir))
            .unwrap_or_else(|e| panic!("detach: {e}"));
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Err(e) = rt().block_on(attach::detach(&self.state_dir)) {
            eprintln!("cleanup: detach {}: {e}", self.state_dir.display());
        }
    }
}

/// Something mounted at `target`; unmounted (lazily as a last resort) when dropped.
pub struct Mounted {
    pub target: PathBuf,
}

impl Mounted {
    pub fn fs(device: &Path, target: &Path, fstype: &str, read_only: bool) -> Mounted {
        rt().block_on(attach::mount(device, target, fstype, read_only, &[]))
            .unwrap_or_else(|e| panic!("mount: {e}"));
        Mounted {
            target: target.to_owned(),
        }
    }

    pub fn unmount(self) {
        rt().block_on(attach::unmount(&self.target))
            .unwrap_or_else(|e| panic!("unmount: {e}"));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        use nix::mount::{MntFlags, umount2};
        while rt()
            .block_on(attach::is_mounted(&self.target))
            .unwrap_or(false)
        {
            if let Err(e) = umount2(&self.target, MntFlags::empty()) {
                eprintln!("cleanup: umount {}: {e}; lazily", self.target.display());
                let _ = umount2(&self.target, MntFlags::MNT_DETACH);
                break;
            }
        }
    }
}

/// A plain loop device over a regular file; `losetup -d` when dropped.
pub struct PlainLoop {
    pub dev: PathBuf,
}

impl PlainLoop {
    pub fn new(file: &Path) -> PlainLoop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        PlainLoop { dev: dev.into() }
    }
}

impl Drop for PlainLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

pub fn write_synced(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

pub fn fs_stats(path: &Path) -> attach::FsStats {
    match rt()
        .block_on(attach::volume_stats(path))
        .expect("volume_stats")
    {
        VolumeStats::Filesystem(s) => s,
        other => panic!("expected filesystem stats, got {other:?}"),
    }
}
