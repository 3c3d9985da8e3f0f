//! Long-running processes whose first stdout line says they are ready.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use crate::DEADLINE;
use crate::command::{describe, reap};

/// A server process with stderr captured in a log file; killed when dropped
/// (and its log tail printed when the test is failing).
pub struct Server {
    child: Option<Child>,
    name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd`, waits (up to `DEADLINE`) for its first stdout line.
    pub fn start(mut cmd: Command, name: &str, log: PathBuf) -> (Server, String) {
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

    /// The last 60 lines of its log.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(60);
        lines[from..].join("\n")
    }

    /// Its pid (panics once stopped).
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("process already stopped").id() as i32)
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
