//! Guards for what tests set up in the kernel: `nbdfuse` exports, loop
//! devices, mounts. Each undoes its setup when dropped (lazily as a last
//! resort), never panicking while a test unwinds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::command::{Bg, run, run_quiet};
use crate::{DEADLINE, LONG, SHORT};

/// `nbdfuse MOUNTDIR/nbd --unix SOCKET` in the background; unmounts
/// (fusermount3 -u, then lazily) and kills nbdfuse when dropped.
pub struct FuseExport {
    bg: Option<Bg>,
    /// The mount directory.
    pub dir: PathBuf,
    /// The file that serves the export.
    pub file: PathBuf,
}

impl FuseExport {
    /// Starts nbdfuse on `socket` with its file in `dir`; waits until it is mounted.
    pub fn start(dir: &Path, socket: &Path) -> FuseExport {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("nbd");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut c = Command::new("nbdfuse");
        c.arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg("--unix")
            .arg(socket);
        let mut fe = FuseExport {
            bg: Some(Bg::spawn(&mut c)),
            dir: dir.to_owned(),
            file,
        };
        let start = Instant::now();
        loop {
            if std::fs::metadata(&pidfile)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
            {
                break;
            }
            if !fe.bg.as_mut().unwrap().running() {
                let r = fe.bg.take().unwrap().wait(SHORT);
                panic!(
                    "nbdfuse exited before it was ready: {} {}",
                    r.stdout, r.stderr
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "nbdfuse not ready within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fe
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if !run_quiet(Command::new("fusermount3").arg("-u").arg(&self.dir), SHORT) {
            run_quiet(Command::new("fusermount3").arg("-uz").arg(&self.dir), SHORT);
        }
        if let Some(mut bg) = self.bg.take() {
            // nbdfuse exits by itself once unmounted.
            let start = Instant::now();
            while bg.running() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(bg);
        }
    }
}

/// A loop device over a file; `losetup -d` when dropped.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub dev: String,
}

impl LoopDev {
    /// `losetup --find --show FILE` (buffered I/O).
    pub fn attach(file: &Path) -> LoopDev {
        Self::attach_with(file, "--direct-io=off")
    }

    /// `losetup --find --show --direct-io=on FILE`, as the driver attaches
    /// a file served with direct I/O.
    pub fn attach_direct(file: &Path) -> LoopDev {
        Self::attach_with(file, "--direct-io=on")
    }

    fn attach_with(file: &Path, direct_io: &str) -> LoopDev {
        let r = run(
            Command::new("losetup")
                .args(["--find", "--show", direct_io])
                .arg(file),
            SHORT,
        )
        .expect_ok();
        let dev = r.stdout.trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        run_quiet(Command::new("losetup").arg("-d").arg(&self.dev), SHORT);
    }
}

/// A mounted filesystem; unmounted (lazily as a last resort) when dropped.
pub struct Mount {
    /// The mount point.
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount DEV DIR` (DIR created first).
    pub fn at(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").arg(dev).arg(dir), SHORT).expect_ok();
        Mount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    /// `mount -o OPTIONS SOURCE DIR` (DIR created first), e.g. `loop` to
    /// mount a filesystem image.
    pub fn with_options(source: &Path, dir: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(
            Command::new("mount")
                .args(["-o", options])
                .arg(source)
                .arg(dir),
            SHORT,
        )
        .expect_ok();
        Mount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    /// Unmounts now; asserts success.
    pub fn umount(mut self) {
        // A process killed a moment ago may still hold files below (the
        // kernel closes an io_uring's files after the process is reaped):
        // retried while the target is busy. On failure the guard is
        // dropped still "mounted" and retries.
        let start = std::time::Instant::now();
        loop {
            let r = run(Command::new("umount").arg(&self.dir), LONG);
            if r.ok() {
                break;
            }
            if !r.stderr.contains("busy") || start.elapsed() > LONG {
                r.expect_ok();
                unreachable!("expect_ok panics on a failed run");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted && !run_quiet(Command::new("umount").arg(&self.dir), SHORT) {
            run_quiet(Command::new("umount").arg("-l").arg(&self.dir), SHORT);
        }
    }
}

/// Mount points under `path` (itself included), deepest first.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let needle = path.display().to_string();
    let mut m: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&needle))
        .collect();
    m.sort_by_key(|b| std::cmp::Reverse(b.len()));
    m
}

/// Lazily unmounts every mount under `path`, deepest first: what a test
/// leaves when it kills the processes serving them (a killed FUSE server's
/// mount stays behind, dead).
pub fn unmount_all_under(path: &Path) {
    for m in mounts_under(path) {
        run_quiet(Command::new("umount").args(["-l", &m]), SHORT);
    }
}
