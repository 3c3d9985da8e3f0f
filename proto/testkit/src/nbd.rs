//! libnbd's tools and fio against NBD URIs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::command::{Bg, Run, run};
use crate::data::rand_u64;
use crate::{DEADLINE, LONG, SHORT};

/// `nbdcopy --flush FILE URI` (without --flush nbdcopy does not flush).
pub fn nbd_write_file(uri: &str, file: &Path) {
    run(
        Command::new("nbdcopy").arg("--flush").arg(file).arg(uri),
        LONG,
    )
    .expect_ok();
}

/// `nbdcopy URI FILE`, returns the file's bytes.
pub fn nbd_read_all(uri: &str, tmp: &Path) -> Vec<u8> {
    let out = tmp.join(format!("readback-{}.img", rand_u64()));
    run(Command::new("nbdcopy").arg(uri).arg(&out), LONG).expect_ok();
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

/// `nbdinfo --json URI` → the first export.
pub fn nbdinfo(uri: &str) -> Value {
    let r = run(Command::new("nbdinfo").args(["--json", uri]), SHORT).expect_ok();
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo output is not JSON ({e}): {}", r.stdout));
    v["exports"][0].clone()
}

/// A fio job against an NBD URI.
pub struct Fio {
    /// fio `--rw`.
    pub rw: &'static str,
    /// fio `--bs`.
    pub bs: &'static str,
    /// fio `--iodepth`.
    pub iodepth: u32,
    /// Where the job starts, in bytes.
    pub offset: u64,
    /// How many bytes it writes.
    pub size: u64,
    /// Write-rate cap (IOPS), so a fault can be injected mid-run.
    pub rate_iops: Option<u32>,
    /// Verify what was written (crc32c), failing on the first mismatch.
    pub verify: bool,
}

impl Fio {
    /// The fio command line and the path of its JSON output.
    pub fn command(&self, uri: &str, dir: &Path) -> (Command, PathBuf) {
        let out = dir.join(format!("fio-{}.json", rand_u64()));
        let mut c = Command::new("fio");
        c.current_dir(dir)
            .arg(format!("--name=zebu-{}-{}", self.rw, self.iodepth))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .arg(format!("--rw={}", self.rw))
            .arg(format!("--bs={}", self.bs))
            .arg(format!("--iodepth={}", self.iodepth))
            .arg(format!("--offset={}", self.offset))
            .arg(format!("--size={}", self.size))
            .arg("--verify_state_save=0")
            .arg("--output-format=json")
            .arg(format!("--output={}", out.display()));
        if self.verify {
            c.args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]);
        }
        if let Some(r) = self.rate_iops {
            c.arg(format!("--rate_iops={r}"));
        }
        (c, out)
    }

    /// Runs to completion; asserts exit 0, no job error, all bytes written
    /// (and read back when verifying).
    pub fn run_ok(&self, uri: &str, dir: &Path) -> Value {
        let (mut c, out) = self.command(uri, dir);
        let r = run(&mut c, LONG);
        self.check(r, &out)
    }

    /// Starts the job in the background.
    pub fn spawn(&self, uri: &str, dir: &Path) -> (Bg, PathBuf) {
        let (mut c, out) = self.command(uri, dir);
        (Bg::spawn(&mut c), out)
    }

    /// Asserts a run of the job succeeded in full; returns its JSON report.
    pub fn check(&self, r: Run, out: &Path) -> Value {
        let json = std::fs::read_to_string(out).unwrap_or_default();
        assert!(
            r.ok(),
            "{} failed ({}):\nstderr: {}\nstdout: {}\njson: {json}",
            r.what,
            r.status,
            r.stderr,
            r.stdout
        );
        assert!(
            !r.stderr.to_lowercase().contains("verify"),
            "fio reported verify problems: {}",
            r.stderr
        );
        let v: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("fio JSON unreadable ({e}): {json}"));
        for job in v["jobs"].as_array().expect("fio jobs") {
            assert_eq!(job["error"], 0, "fio job error: {job}");
            assert_eq!(
                job["write"]["io_bytes"].as_u64(),
                Some(self.size),
                "fio wrote less than asked: {job}"
            );
            if self.verify {
                assert_eq!(
                    job["read"]["io_bytes"].as_u64(),
                    Some(self.size),
                    "fio verified less than it wrote: {job}"
                );
            }
        }
        v
    }
}

/// An `nbdkit PLUGIN ARGS` export on a Unix socket (an NBD server that is
/// not Zebu's, to test clients against); SIGTERM and reap when dropped.
pub struct NbdKit {
    /// The nbdkit process.
    pub child: Child,
    /// `nbd+unix:///vol?socket=PATH`.
    pub uri: String,
    /// The exported file ([`NbdKit::file`] only).
    pub file: PathBuf,
}

impl NbdKit {
    /// Starts nbdkit with `plugin_args`, its socket and pid file in `dir`;
    /// returns once it accepts connections.
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
        crate::poll("nbdkit to accept connections", DEADLINE, || {
            if let Ok(Some(status)) = kit.child.try_wait() {
                panic!("nbdkit exited: {status}");
            }
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
        });
        kit
    }

    /// Serves `size` bytes of memory.
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
