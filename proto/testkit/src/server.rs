//! Long-running processes that print a ready line once they serve, waited
//! for the way the node agent waits for its children
//! (`zebu_common::supervise`): stdout and stderr appended to one log file,
//! scanned line by line from the offset the log had at spawn.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use zebu_common::supervise::{LineScanner, describe_exit, log_tail, open_log_at};

use crate::DEADLINE;
use crate::command::{describe, reap};

/// Bytes of log shown in failures.
const TAIL_BYTES: u64 = 16 << 10;

/// A server process with its output in a log file; killed when dropped
/// (and its log tail printed when the test is failing).
pub struct Server {
    child: Option<Child>,
    name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// The log's length when the process started.
    offset: u64,
}

impl Server {
    /// Starts `cmd` with its output appended to `log` and waits (up to
    /// [`DEADLINE`]) for a line that `ready` accepts; returns the server
    /// and what `ready` made of that line. Panics, with the log's tail,
    /// when the process exits first or the deadline passes.
    pub fn start<T>(
        mut cmd: Command,
        name: &str,
        log: PathBuf,
        ready: impl Fn(&str) -> Option<T>,
    ) -> (Server, T) {
        let what = describe(&cmd);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open the log {}: {e}", log.display()));
        let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone().expect("duplicate the log file");
        let child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let mut server = Server {
            child: Some(child),
            name: name.to_owned(),
            log,
            offset,
        };
        let mut file = open_log_at(&server.log, offset)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", server.log.display()));
        let mut scanner = LineScanner::default();
        let start = Instant::now();
        loop {
            if let Some(r) = scanner.scan(&mut file, &ready) {
                return (server, r);
            }
            let exited = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                if let Some(r) = scanner.scan(&mut file, &ready) {
                    return (server, r);
                }
                panic!(
                    "`{what}` {} before it was ready; its log:\n{}",
                    describe_exit(st),
                    server.log_tail()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "`{what}` printed no ready line within {DEADLINE:?}; its log:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of what it wrote to its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, self.offset, TAIL_BYTES)
    }

    /// Its pid (panics once stopped).
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("process already stopped").id() as i32)
    }

    /// Waits (up to [`DEADLINE`]) for the process to kill itself at crash
    /// point `point` (`zebu_proto::crash`, started with `ZEBU_CRASH_AT`).
    /// Panics, with the log's tail, if it is still running, exited another
    /// way, or died without logging that crash point.
    pub fn wait_crashed_at(&mut self, point: &str) {
        use std::os::unix::process::ExitStatusExt;
        let mut c = self.child.take().expect("process already stopped");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = c.try_wait().expect("waiting for the process") {
                break st;
            }
            if start.elapsed() > DEADLINE {
                let _ = c.kill();
                reap(&mut c);
                panic!(
                    "{} never reached crash point {point} within {DEADLINE:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let tail = self.log_tail();
        assert!(
            status.signal() == Some(libc::SIGKILL)
                && tail.contains(&format!("{}={point}:", zebu_proto::crash::ENV)),
            "{} {} instead of dying at crash point {point}; its log:\n{tail}",
            self.name,
            describe_exit(status)
        );
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            reap(&mut c);
        }
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL + panic after that).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
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
