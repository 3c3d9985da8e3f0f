//! Shared harness of the engine's end-to-end tests: starts real `zebu-replica`
//! and `zebu-engine` processes on 127.0.0.1 (port 0, parsed from their ready
//! lines), runs external tools (nbdcopy, nbdinfo, qemu-img, fio, nbdfuse,
//! losetup, mkfs.ext4, mount) with timeouts, and talks to replicas directly
//! over gRPC to check what they hold.
//!
//! Cleanup: every process started here is owned by a guard that SIGKILLs
//! and reaps it (its whole process group, for tools) when dropped, also
//! while unwinding from a failed assertion. Mounts, loop devices and FUSE
//! mounts have guards of their own; declare them after the engine so they
//! drop first (locals drop in reverse order).

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;

mod netns;
mod proxy;
#[allow(unused_imports)]
pub use netns::{Lab, Way, in_netns};
#[allow(unused_imports)]
pub use proxy::{FaultProxy, Toward};

pub const BS: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// Generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Timeout of one short external command (ctl, nbdinfo, qemu-img info...).
pub const SHORT: Duration = Duration::from_secs(60);
/// Timeout of one data-moving external command (nbdcopy, fio...).
pub const LONG: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Serialisation of the heavy tests of one test binary.

static HEAVY: Mutex<()> = Mutex::new(());

/// Tests of one binary run in parallel by default; these are heavy (several
/// processes, fio, hundreds of MiB) on a 2-core machine, so each takes this
/// lock for its whole run.
pub fn serial() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Binaries and tools.

/// Where `ZEBU_TEST_BIN_DIR` points, if set: the binaries to test instead
/// of this build's (to run a new test against an older build).
fn bin_override(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("ZEBU_TEST_BIN_DIR")?;
    let p = Path::new(&dir).join(name);
    assert!(
        p.is_file(),
        "ZEBU_TEST_BIN_DIR has no {name}: {}",
        p.display()
    );
    Some(p)
}

pub fn engine_bin() -> PathBuf {
    bin_override("zebu-engine").unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_zebu-engine")))
}

/// `target/debug/zebu-replica`, next to the test executable's `deps/`.
pub fn replica_bin() -> PathBuf {
    if let Some(p) = bin_override("zebu-replica") {
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test executable has no grandparent dir")
        .join("zebu-replica");
    assert!(
        p.is_file(),
        "{} is missing: build it with cargo build -p zebu-replica",
        p.display()
    );
    p
}

/// Fails (never skips) when an external tool is missing, naming the Debian
/// package that provides it.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed: apt-get install {package}"
    );
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("zebu-e2e-")
        .tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("create a temp dir under $TMPDIR (default /var/tmp)")
}

// ---------------------------------------------------------------------------
// Running external commands with a timeout.

/// Result of a finished command.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics with the output unless the command succeeded.
    pub fn expect_ok(self) -> Run {
        assert!(
            self.ok(),
            "{} failed ({}):\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the command failed with a message on stderr.
    pub fn expect_fail(self) -> Run {
        assert!(
            !self.ok(),
            "{} should have failed but exited 0:\nstdout: {}\nstderr: {}",
            self.what,
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "{} failed ({}) without a message on stderr (stdout: {})",
            self.what,
            self.status,
            self.stdout
        );
        self
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Waits for a killed child, but gives up after 10 s (a process stuck in
/// uninterruptible sleep cannot be reaped; better leak it than hang).
pub fn reap(child: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "process {} did not exit after SIGKILL; leaving it",
        child.id()
    );
}

fn kill_group(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// A running background command (in its own process group); SIGKILLs and
/// reaps the group when dropped.
pub struct Bg {
    child: Option<Child>,
    what: String,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Option<std::thread::JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    })
}

impl Bg {
    pub fn spawn(cmd: &mut Command) -> Bg {
        let what = describe(cmd);
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Bg {
            child: Some(child),
            what,
            out,
            err,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Waits for the command to end; SIGKILLs it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Run {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if start.elapsed() > timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let timed_out = status.is_none();
        if timed_out {
            kill_group(child.id(), nix::sys::signal::Signal::SIGKILL);
        }
        let status = match status {
            Some(s) => s,
            None => {
                reap(child);
                child.try_wait().ok().flatten().unwrap_or_default()
            }
        };
        self.child = None;
        // After a timeout, a process that could not be killed may still hold
        // the pipes: give the readers a moment, never hang on them.
        let collect = |h: Option<std::thread::JoinHandle<String>>| {
            let h = h?;
            let start = Instant::now();
            while timed_out && !h.is_finished() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            (!timed_out || h.is_finished()).then(|| h.join().unwrap_or_default())
        };
        let stdout = collect(self.out.take()).unwrap_or_default();
        let stderr = collect(self.err.take()).unwrap_or_default();
        assert!(
            !timed_out,
            "`{}` did not finish within {timeout:?} and was killed\nstdout: {stdout}\nstderr: {stderr}",
            self.what
        );
        Run {
            status,
            stdout,
            stderr,
            what: self.what.clone(),
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only while the leader is not reaped is its pgid surely ours.
            if matches!(c.try_wait(), Ok(None)) {
                kill_group(c.id(), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = c.kill();
            reap(&mut c);
        }
    }
}

/// Runs a command to completion with a timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Run {
    Bg::spawn(cmd).wait(timeout)
}

pub fn cmd<S: AsRef<OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Cleanup helper: runs a command with a timeout, never panics.
pub fn run_quiet(cmd: &mut Command, timeout: Duration) -> bool {
    let what = describe(cmd);
    let Ok(mut child) = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("cleanup: cannot start `{what}`");
        return false;
    };
    let err = drain(child.stderr.take());
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                let e = err
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                if !st.success() {
                    eprintln!("cleanup: `{what}` failed ({st}): {}", e.trim());
                }
                return st.success();
            }
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                kill_group(child.id(), nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                reap(&mut child);
                eprintln!("cleanup: `{what}` timed out");
                return false;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Long-running servers whose first stdout line says they are ready.

/// A server process with stderr captured in a log file; killed when dropped
/// (and its log tail printed when the test is failing).
struct Server {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd`, waits (up to `DEADLINE`) for its first stdout line.
    fn start(mut cmd: Command, name: &str, log: PathBuf) -> (Server, String) {
        let what = describe(&cmd);
        let logf = File::create(&log).expect("create log file");
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut first = true;
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if first {
                            let _ = tx.send(line);
                            first = false;
                        }
                    }
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            name: name.to_owned(),
            log,
        };
        let start = Instant::now();
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = server.child.as_mut().unwrap().try_wait() {
                        panic!(
                            "`{what}` exited ({st}) before it was ready; stderr:\n{}",
                            server.log_tail()
                        );
                    }
                    if start.elapsed() > DEADLINE {
                        panic!(
                            "`{what}` printed no ready line within {DEADLINE:?}; stderr:\n{}",
                            server.log_tail()
                        );
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let c = server.child.as_mut().unwrap();
                    let _ = c.kill();
                    reap(c);
                    let st = c.try_wait().ok().flatten();
                    panic!(
                        "`{what}` closed stdout ({st:?}) without a ready line; stderr:\n{}",
                        server.log_tail()
                    );
                }
            }
        };
        (server, line.trim_end().to_owned())
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(60);
        lines[from..].join("\n")
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("process already stopped").id() as i32)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            reap(&mut c);
        }
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL + panic after that).
    fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("process already stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                reap(&mut c);
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            reap(&mut c);
            if std::thread::panicking() {
                eprintln!(
                    "----- {} stderr (tail, {}) -----\n{}\n-----",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Replicas.

/// A running `zebu-replica`.
pub struct Replica {
    server: Server,
    pub addr: String,
    pub id: String,
    pub dir: PathBuf,
}

impl Replica {
    /// Starts a replica on `dir` (created with `size` when given).
    pub fn start(dir: &Path, size: Option<&str>) -> Replica {
        Self::start_in(None, "127.0.0.1", dir, size)
    }

    /// Starts a replica listening on `ip` (port 0), in network namespace
    /// `netns` when given.
    pub fn start_in(netns: Option<&str>, ip: &str, dir: &Path, size: Option<&str>) -> Replica {
        let mut c = in_netns(netns, &replica_bin());
        c.arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("{ip}:0")]);
        if let Some(s) = size {
            c.args(["--size", s]);
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let log = dir.with_file_name(format!("{name}-{}.log", rand_u64() % 1_000_000));
        let (server, line) = Server::start(c, &format!("replica {name}"), log);
        // zebu-replica serving DIR on 127.0.0.1:PORT (id UUID, size N bytes, ...)
        let addr = line
            .rsplit_once(" on ")
            .and_then(|(_, s)| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected replica line: {line:?}"))
            .to_owned();
        let id = line
            .split("(id ")
            .nth(1)
            .and_then(|s| s.split([',', ')', ' ']).next())
            .unwrap_or_else(|| panic!("no id in replica line: {line:?}"))
            .to_owned();
        Replica {
            server,
            addr,
            id,
            dir: dir.to_owned(),
        }
    }

    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// Sends a signal (e.g. SIGSTOP to make the replica hang).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.server.pid(), sig).unwrap();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.server.terminate(DEADLINE)
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

/// Starts `n` fresh replicas of `size` in `tmp/r0..`.
pub fn start_replicas(tmp: &Path, n: usize, size: &str) -> Vec<Replica> {
    (0..n)
        .map(|i| Replica::start(&tmp.join(format!("r{i}")), Some(size)))
        .collect()
}

// ---------------------------------------------------------------------------
// The engine.

/// A running `zebu-engine`.
pub struct Engine {
    server: Server,
    pub volume: String,
    pub socket: PathBuf,
    pub control: String,
    pub epoch: u64,
    /// `HOST:PORT` of the TCP NBD listener, when one was asked for
    /// (`extra` = `["--nbd", "tcp:127.0.0.1:0"]`).
    pub tcp: Option<String>,
    pub ready_line: String,
    /// The network namespace it runs in (its `ctl` commands run there too).
    pub netns: Option<String>,
}

impl Engine {
    /// Starts an engine serving `volume` of `size` on `replicas`, NBD on a
    /// unix socket in `tmp`.
    pub fn start(tmp: &Path, volume: &str, size: &str, replicas: &[&str]) -> Engine {
        Self::start_with(tmp, volume, size, replicas, &[])
    }

    pub fn start_with(
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        extra: &[&str],
    ) -> Engine {
        Self::start_in(None, "127.0.0.1", tmp, volume, size, replicas, extra)
    }

    /// [`Engine::start_with`] in network namespace `netns`, its control API
    /// on `ip`.
    pub fn start_in(
        netns: Option<&str>,
        ip: &str,
        tmp: &Path,
        volume: &str,
        size: &str,
        replicas: &[&str],
        extra: &[&str],
    ) -> Engine {
        let n = rand_u64() % 1_000_000;
        let socket = tmp.join(format!("nbd-{n}.sock"));
        let mut c = in_netns(netns, &engine_bin());
        c.args(["--volume", volume, "--size", size]);
        for r in replicas {
            c.args(["--replica", r]);
        }
        c.arg("--nbd")
            .arg(format!("unix:{}", socket.display()))
            .args(["--listen", &format!("{ip}:0")])
            .args(extra);
        let log = tmp.join(format!("engine-{n}.log"));
        let (server, line) = Server::start(c, "zebu-engine", log);
        // zebu-engine volume NAME ready: nbd unix:PATH[, tcp:..]; control HOST:PORT; epoch N
        let parse = || -> Option<(String, u64, Option<String>)> {
            let rest = line.strip_prefix(&format!("zebu-engine volume {volume} ready: nbd "))?;
            let control = rest
                .split("; control ")
                .nth(1)?
                .split(';')
                .next()?
                .trim()
                .to_owned();
            let epoch = rest.split("; epoch ").nth(1)?.trim().parse().ok()?;
            if !rest.contains(&format!("unix:{}", socket.display())) {
                return None;
            }
            let nbd = rest.split(';').next()?;
            let tcp = nbd
                .split(", ")
                .find_map(|p| p.trim().strip_prefix("tcp:"))
                .map(str::to_owned);
            Some((control, epoch, tcp))
        };
        let (control, epoch, tcp) =
            parse().unwrap_or_else(|| panic!("unexpected engine ready line: {line:?}"));
        Engine {
            server,
            volume: volume.to_owned(),
            socket,
            control,
            epoch,
            tcp,
            ready_line: line,
            netns: netns.map(str::to_owned),
        }
    }

    /// `nbd+unix:///VOLUME?socket=PATH`
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume,
            self.socket.display()
        )
    }

    /// `nbd://HOST:PORT/VOLUME` of the TCP listener.
    pub fn tcp_uri(&self) -> String {
        let tcp = self.tcp.as_ref().expect("engine has no TCP NBD listener");
        format!("nbd://{tcp}/{}", self.volume)
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        self.server.pid()
    }

    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// SIGTERM and wait; asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        let st = self.server.terminate(DEADLINE);
        assert!(
            st.success(),
            "engine exited with {st} after SIGTERM; stderr:\n{}",
            self.log_tail()
        );
    }

    /// Runs `zebu-engine ctl --engine CONTROL ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_timeout(args, SHORT)
    }

    pub fn ctl_timeout(&self, args: &[&str], timeout: Duration) -> Run {
        let mut c = in_netns(self.netns.as_deref(), &engine_bin());
        c.args(["ctl", "--engine", &self.control]).args(args);
        run(&mut c, timeout)
    }

    /// Runs a ctl command that must succeed (engine stderr in the panic).
    pub fn ctl_ok(&self, args: &[&str]) -> Run {
        let r = self.ctl(args);
        assert!(
            r.ok(),
            "{} failed ({}):\nstdout: {}\nstderr: {}\nengine stderr:\n{}",
            r.what,
            r.status,
            r.stdout,
            r.stderr,
            self.log_tail()
        );
        r
    }

    /// `status -o json`, parsed.
    pub fn status(&self) -> Value {
        let r = self.ctl_ok(&["status", "-o", "json"]);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", r.stdout))
    }

    /// Polls `status` until `pred` holds; panics with the last status after
    /// `DEADLINE`.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "engine status never became {what} within {DEADLINE:?}; last status:\n{}\nengine stderr:\n{}",
                    serde_json::to_string_pretty(&s).unwrap(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for state healthy with `n` replicas, all RW.
    pub fn wait_healthy(&self, n: usize) -> Value {
        self.wait_status(&format!("healthy with {n} RW replicas"), |s| {
            s["state"] == "healthy"
                && s["replicas"]
                    .as_array()
                    .is_some_and(|r| r.len() == n && r.iter().all(|x| x["mode"] == "RW"))
        })
    }
}

/// Runs `zebu-engine ctl --engine ADDR ARGS...` with a timeout.
pub fn ctl(addr: &str, args: &[&str], timeout: Duration) -> Run {
    let mut c = Command::new(engine_bin());
    c.args(["ctl", "--engine", addr]).args(args);
    run(&mut c, timeout)
}

/// The status entry of the replica at `addr`.
pub fn replica_entry<'a>(status: &'a Value, addr: &str) -> Option<&'a Value> {
    status["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["address"] == addr)
}

pub fn io_counter(status: &Value, name: &str) -> u64 {
    status["io"][name].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Data.

static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn rand_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    splitmix(t ^ (std::process::id() as u64) << 32 ^ n.wrapping_mul(0x9E37_79B9))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Deterministic pseudo-random bytes (incompressible, no zero blocks).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = splitmix(seed) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `data` to a new file.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Asserts `a == b` without dumping megabytes: reports the first differing
/// 4 KiB block and how many differ.
pub fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if a == b {
        return;
    }
    let diff: Vec<usize> = a
        .chunks(BS as usize)
        .zip(b.chunks(BS as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    panic!(
        "{what}: {} of {} blocks differ, first at block {} (offset {})",
        diff.len(),
        a.len().div_ceil(BS as usize),
        diff[0],
        diff[0] as u64 * BS
    );
}

pub fn all_zero(d: &[u8]) -> bool {
    d.iter().all(|&b| b == 0)
}

// ---------------------------------------------------------------------------
// NBD tools.

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

// ---------------------------------------------------------------------------
// fio.

/// A fio job against an NBD URI.
pub struct Fio {
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    pub offset: u64,
    pub size: u64,
    /// Write-rate cap (IOPS), so a fault can be injected mid-run.
    pub rate_iops: Option<u32>,
    pub verify: bool,
}

impl Fio {
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

    pub fn spawn(&self, uri: &str, dir: &Path) -> (Bg, PathBuf) {
        let (mut c, out) = self.command(uri, dir);
        (Bg::spawn(&mut c), out)
    }

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

// ---------------------------------------------------------------------------
// Direct replica access over gRPC.

/// Runs async gRPC work to completion, bounded by `LONG`.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { tokio::time::timeout(LONG, f).await })
        .unwrap_or_else(|_| panic!("gRPC work with a replica took more than {LONG:?}"))
}

pub async fn replica_client(addr: &str) -> ReplicaClient<Channel> {
    let ch = tokio::time::timeout(
        Duration::from_secs(30),
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to replica {addr} timed out"))
    .unwrap_or_else(|e| panic!("connecting to replica {addr}: {e}"));
    ReplicaClient::new(ch)
        .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
}

/// One raw data stream to a replica.
pub struct RawIo {
    tx: mpsc::Sender<pb::IoBatch>,
    rx: tonic::Streaming<pb::IoReplyBatch>,
    next_id: u64,
    pub epoch: u64,
}

impl RawIo {
    /// Opens a data stream of the replica's current session (that of its
    /// last `Open`).
    pub async fn open(client: &mut ReplicaClient<Channel>, epoch: u64) -> RawIo {
        let session = client
            .info(pb::InfoRequest {})
            .await
            .expect("Info")
            .into_inner()
            .session;
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            zebu_proto::wire::SESSION_HEADER,
            session
                .to_string()
                .parse()
                .expect("a number is a header value"),
        );
        let resp = client.io(request).await.expect("open Io stream");
        RawIo {
            tx,
            rx: resp.into_inner(),
            next_id: 1,
            epoch,
        }
    }

    /// Sends the requests as one batch; responses in request order.
    pub async fn batch(&mut self, mut reqs: Vec<pb::IoRequest>) -> Vec<pb::IoResponse> {
        let mut ids = Vec::new();
        for r in &mut reqs {
            r.id = self.next_id;
            self.next_id += 1;
            r.epoch = self.epoch;
            ids.push(r.id);
        }
        self.tx
            .send(pb::IoBatch { requests: reqs })
            .await
            .expect("Io stream closed");
        let mut got: HashMap<u64, pb::IoResponse> = HashMap::new();
        while got.len() < ids.len() {
            let b = tokio::time::timeout(Duration::from_secs(60), self.rx.next())
                .await
                .expect("replica did not answer within 60 s")
                .expect("Io stream ended")
                .expect("Io stream error");
            for r in b.responses {
                got.insert(r.id, r);
            }
        }
        ids.iter().map(|id| got.remove(id).unwrap()).collect()
    }

    pub async fn one(&mut self, r: pb::IoRequest) -> pb::IoResponse {
        self.batch(vec![r]).await.remove(0)
    }
}

pub fn read_req(offset: u64, length: u64) -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Read as i32,
        offset,
        length: length as u32,
        ..Default::default()
    }
}

pub fn write_req(offset: u64, data: Vec<u8>) -> pb::IoRequest {
    pb::IoRequest {
        op: pb::Op::Write as i32,
        offset,
        length: data.len() as u32,
        crc32: crc32fast::hash(&data),
        payload: Bytes::from(data),
        revision: u64::MAX / 2,
        ..Default::default()
    }
}

pub fn io_status(r: &pb::IoResponse) -> pb::IoStatus {
    pb::IoStatus::try_from(r.status).unwrap_or(pb::IoStatus::IoError)
}

/// Takes over a replica (Open with its epoch + 1, so only after the engine
/// stopped) and reads its whole volume.
pub async fn read_replica_volume(addr: &str) -> Vec<u8> {
    let mut c = replica_client(addr).await;
    let info = c.info(pb::InfoRequest {}).await.expect("Info").into_inner();
    let epoch = info.epoch + 1;
    c.open(pb::OpenRequest { epoch })
        .await
        .unwrap_or_else(|e| panic!("Open({epoch}) on {addr}: {e}"));
    let mut io = RawIo::open(&mut c, epoch).await;
    let size = info.size;
    let mut data = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let reqs: Vec<_> = (0..8)
            .map(|i| off + i * MIB)
            .filter(|&o| o < size)
            .map(|o| read_req(o, MIB.min(size - o)))
            .collect();
        let n = reqs.len() as u64;
        for (i, r) in io.batch(reqs).await.into_iter().enumerate() {
            assert_eq!(
                io_status(&r),
                pb::IoStatus::IoOk,
                "reading replica {addr} at {}: {}",
                off + i as u64 * MIB,
                r.message
            );
            assert_eq!(r.crc32, crc32fast::hash(&r.payload), "read CRC from {addr}");
            data.extend_from_slice(&r.payload);
        }
        off += n * MIB;
    }
    data
}

/// Reads every replica's volume (engine stopped) and asserts they are all
/// equal; returns the common content.
pub fn assert_replicas_identical(addrs: &[&str]) -> Vec<u8> {
    let mut first: Option<Vec<u8>> = None;
    for a in addrs {
        let d = block_on(read_replica_volume(a));
        match &first {
            None => first = Some(d),
            Some(f) => assert_same(&format!("replica {a} vs replica {}", addrs[0]), &d, f),
        }
    }
    first.expect("no replicas")
}

// ---------------------------------------------------------------------------
// A minimal NBD client that just holds a connection open.

/// Connects to a unix NBD socket and completes the fixed-newstyle handshake
/// (NBD_OPT_GO on `export`); the connection stays open until dropped.
pub struct NbdConn {
    sock: std::os::unix::net::UnixStream,
    pub size: u64,
}

impl NbdConn {
    pub fn connect(socket: &Path, export: &str) -> NbdConn {
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hdr = [0u8; 18];
        s.read_exact(&mut hdr).expect("NBD greeting");
        assert_eq!(&hdr[..8], &zebu_nbd::NBD_MAGIC.to_be_bytes());
        assert_eq!(
            &hdr[8..16],
            zebu_nbd::IHAVEOPT.to_be_bytes(),
            "server is not newstyle"
        );
        s.write_all(&(zebu_nbd::FLAG_C_FIXED_NEWSTYLE | zebu_nbd::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&zebu_nbd::IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&zebu_nbd::OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut size = 0;
        loop {
            let mut rep = [0u8; 20];
            s.read_exact(&mut rep).expect("NBD option reply");
            let typ = u32::from_be_bytes(rep[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0; len];
            s.read_exact(&mut body).unwrap();
            match typ {
                zebu_nbd::REP_ACK => break,
                // NBD_REP_INFO carrying NBD_INFO_EXPORT (0)
                zebu_nbd::REP_INFO
                    if len >= 10 && body[0..2] == zebu_nbd::INFO_EXPORT.to_be_bytes() =>
                {
                    size = u64::from_be_bytes(body[2..10].try_into().unwrap());
                }
                t if t & zebu_nbd::REP_FLAG_ERROR != 0 => panic!(
                    "NBD_OPT_GO refused (reply {t:#x}): {}",
                    String::from_utf8_lossy(&body)
                ),
                _ => {}
            }
        }
        NbdConn { sock: s, size }
    }

    /// NBD_CMD_READ of `len` bytes at `offset` (simple reply): the data, or
    /// the error the server answered with (an errno value).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.command(zebu_nbd::CMD_READ, offset, len, &[])?;
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data).expect("NBD read payload");
        Ok(data)
    }
}

impl NbdConn {
    /// Sends one request (`typ` = NBD_CMD_*) and waits for its simple
    /// reply: Ok, or the error the server answered with (an errno value).
    fn command(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Result<(), u32> {
        let cookie = rand_u64();
        let header = zebu_nbd::RequestHeader {
            flags: 0,
            kind: typ,
            cookie,
            offset,
            len,
        };
        let mut req = header.encode().to_vec();
        req.extend_from_slice(payload);
        self.sock.write_all(&req).expect("send NBD request");
        let mut rep = [0u8; zebu_nbd::SIMPLE_REPLY_LEN];
        self.sock.read_exact(&mut rep).expect("NBD reply");
        let reply = zebu_nbd::SimpleReply::parse(&rep).expect("simple reply magic");
        assert_eq!(reply.cookie, cookie, "reply cookie");
        match reply.error {
            0 => Ok(()),
            error => Err(error),
        }
    }

    /// NBD_CMD_WRITE of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.command(zebu_nbd::CMD_WRITE, offset, data.len() as u32, data)
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> Result<(), u32> {
        self.command(zebu_nbd::CMD_FLUSH, 0, 0, &[])
    }
}

impl Drop for NbdConn {
    fn drop(&mut self) {
        let disc = zebu_nbd::RequestHeader {
            flags: 0,
            kind: zebu_nbd::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let req = disc.encode();
        let _ = self.sock.write_all(&req);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// nbdfuse, loop devices, mounts: guards, dropped in reverse order.

/// `nbdfuse MOUNTDIR/nbd --unix SOCKET` in the background; unmounts
/// (fusermount3 -u, then lazily) and kills nbdfuse when dropped.
pub struct FuseExport {
    bg: Option<Bg>,
    pub dir: PathBuf,
    pub file: PathBuf,
}

impl FuseExport {
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
    pub dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let r = run(
            Command::new("losetup")
                .args(["--find", "--show", "--direct-io=off"])
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
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn at(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").arg(dev).arg(dir), SHORT).expect_ok();
        Mount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    /// Unmounts now; asserts success.
    pub fn umount(mut self) {
        // On failure the guard is dropped still "mounted" and retries.
        run(Command::new("umount").arg(&self.dir), LONG).expect_ok();
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
