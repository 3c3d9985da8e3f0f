//! External commands with a timeout, each in its own process group, killed
//! (the whole group) and reaped by a guard.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Result of a finished command.
pub struct Run {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// The command line, for messages.
    pub what: String,
}

impl Run {
    /// Exited 0?
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

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
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

/// Sends `sig` to process group `pid`; a group already gone is fine.
pub fn kill_group(pid: u32, sig: nix::sys::signal::Signal) {
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
    /// Starts `cmd` in a process group of its own, capturing its output.
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

    /// The process id (and process group id).
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

/// `Command` of `program` with `args`.
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
