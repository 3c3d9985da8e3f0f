//! Shared pieces of the `attach` tests (nbdfuse and the FUSE bridge):
//! an `nbdkit` export, attachment / mount / loop-device guards that clean up
//! when dropped, and small file helpers. Every wait is a poll bounded by
//! [`DEADLINE`].

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zebu_csi::attach::{self, Attached, Backend, VolumeStats};

/// Bound of every poll.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn poll(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nbdkit file FILE --unix SOCK --foreground`; killed when dropped.
pub struct NbdKit {
    pub child: Child,
    pub uri: String,
    pub file: PathBuf,
}

impl NbdKit {
    pub fn start(dir: &Path, plugin_args: &[&str]) -> NbdKit {
        let sock = dir.join("nbdkit.sock");
        let pidfile = dir.join("nbdkit.pid");
        let child = Command::new("nbdkit")
            .args(plugin_args)
            .arg("--unix")
            .arg(&sock)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--foreground")
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let mut kit = NbdKit {
            child,
            uri: format!("nbd+unix:///vol?socket={}", sock.display()),
            file: PathBuf::new(),
        };
        // nbdkit writes its pid file once it accepts connections.
        poll("nbdkit to accept connections", || {
            if let Ok(Some(status)) = kit.child.try_wait() {
                panic!("nbdkit exited: {status}");
            }
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
        });
        kit
    }

    pub fn memory(dir: &Path, size: u64) -> NbdKit {
        NbdKit::start(dir, &["memory", &size.to_string()])
    }

    /// Serves a sparse file of `size` bytes.
    pub fn file(dir: &Path, size: u64) -> NbdKit {
        let file = dir.join("export.img");
        let f = std::fs::File::create(&file).expect("create the export file");
        f.set_len(size).expect("size the export file");
        let path = file.to_str().expect("UTF-8 temp path").to_owned();
        let mut kit = NbdKit::start(dir, &["file", &path]);
        kit.uri = kit.uri.replacen("nbd+unix:///vol?", "nbd+unix:///?", 1);
        kit.file = file;
        kit
    }

    /// Grows (or shrinks) the export file; new NBD connections see it.
    pub fn resize(&self, size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.file)
            .and_then(|f| f.set_len(size))
            .expect("resize the export file");
    }
}

impl Drop for NbdKit {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
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
