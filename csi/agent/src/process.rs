//! Starting, probing and stopping one child process.
//!
//! A child's stdout and stderr both go to its append-only log file (never to
//! a pipe: the child must survive the agent), and it runs in its own process
//! group. Readiness is the binary's ready line on stdout, found by reading
//! the log from the offset it had at spawn. A process that is not our child
//! (adopted after an agent restart) is identified by `/proc/<pid>/cmdline`,
//! which guards against pid reuse.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::Instant;
use zebu_common::supervise::{LineScanner, describe_exit, log_tail, open_log_at};
use zebu_proto::ready::{EngineReady, ReplicaReady};

use super::AgentError;
use super::record::Kind;

/// How long a child may take to print its ready line. Generous: a replica
/// after an unclean stop recomputes the CRCs of its head, and an engine
/// resyncs replicas before serving, both proportional to the data.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a SIGTERM'ed process may take to exit before SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(30);
/// Log files larger than this at spawn are renamed to `<name>.old` first.
const LOG_ROTATE_BYTES: u64 = 32 << 20;
/// How often the log and the child are looked at while waiting to be ready.
const READY_POLL: Duration = Duration::from_millis(50);
/// Bytes of log shown in errors.
const TAIL_BYTES: u64 = 4096;

/// What a ready line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ready {
    /// `zebu-replica serving DIR on ADDR (id UUID, size N bytes, ...)`.
    Replica {
        /// gRPC `host:port`.
        address: String,
        /// Logical size now.
        size_bytes: u64,
    },
    /// `zebu-engine volume NAME ready: nbd ...; control ADDR; epoch N`.
    Engine {
        /// Control `host:port`.
        control: String,
        /// Epoch taken by this run.
        epoch: u64,
    },
}

/// Parses a replica's ready line (`None` for any other line).
pub(crate) fn parse_replica_ready(line: &str) -> Option<Ready> {
    ReplicaReady::parse(line).map(|r| Ready::Replica {
        address: r.address,
        size_bytes: r.size_bytes,
    })
}

/// Parses an engine's ready line (`None` for any other line).
pub(crate) fn parse_engine_ready(line: &str) -> Option<Ready> {
    EngineReady::parse(line).map(|e| Ready::Engine {
        control: e.control,
        epoch: e.epoch,
    })
}

/// Kills (SIGKILL) a child that is dropped before it was handed over, so an
/// abandoned start never leaves an unrecorded process behind.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // Tokio reaps the killed child in the background.
            let _ = c.start_kill();
        }
    }
}

/// A started child that has not reported ready yet.
pub(crate) struct Spawned {
    child: KillOnDrop,
    /// Its pid.
    pub(crate) pid: u32,
    kind: Kind,
    what: String,
    log: PathBuf,
    offset: u64,
}

/// A child that reported ready.
#[derive(Debug)]
pub(crate) struct Launched {
    /// The child, for `wait`.
    pub(crate) child: Child,
    /// Its pid.
    pub(crate) pid: u32,
    /// What it reported.
    pub(crate) ready: Ready,
}

/// Starts `program args` with stdout and stderr appended to `log`, in its own
/// process group. `what` names it in errors.
pub(crate) fn spawn(
    kind: Kind,
    what: &str,
    program: &str,
    args: &[String],
    log: &Path,
) -> Result<Spawned, AgentError> {
    let io = |context: String| move |source| AgentError::Io { context, source };
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = log.as_os_str().to_owned();
        old.push(".old");
        std::fs::rename(log, &old).map_err(io(format!("rotating {}", log.display())))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("opening the log {}", log.display())))?;
    let offset = out
        .metadata()
        .map_err(io(format!("reading the size of {}", log.display())))?
        .len();
    let err = out
        .try_clone()
        .map_err(io(format!("duplicating the log {}", log.display())))?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Terminal and process-group signals aimed at the agent (Ctrl-C)
        // must not reach the children: they outlive the agent.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| AgentError::Spawn {
            what: what.to_owned(),
            program: program.to_owned(),
            source,
        })?;
    let child = KillOnDrop(Some(child));
    let pid = child
        .0
        .as_ref()
        .and_then(|c| c.id())
        .ok_or_else(|| AgentError::Internal(format!("{what}: spawned child has no pid")))?;
    // Out of the plugin's container, when it runs in one (dropping `child`
    // on failure kills it).
    zebu_common::cgroup::place(pid).map_err(|e| AgentError::Internal(format!("{what}: {e}")))?;
    Ok(Spawned {
        child,
        pid,
        kind,
        what: what.to_owned(),
        log: log.to_owned(),
        offset,
    })
}

impl Spawned {
    /// Waits for the ready line. Fails (killing the child) when it exits
    /// first, after `timeout`, or when `cancel` completes
    /// ([`AgentError::Cancelled`]).
    pub(crate) async fn wait_ready(
        mut self,
        timeout: Duration,
        cancel: impl Future<Output = ()>,
    ) -> Result<Launched, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut scanner = LineScanner::default();
        let mut file = open_log_at(&self.log, self.offset).map_err(|source| AgentError::Io {
            context: format!("opening {} at {}", self.log.display(), self.offset),
            source,
        })?;
        let mut cancel = std::pin::pin!(cancel);
        loop {
            let parse = match self.kind {
                Kind::Replica => parse_replica_ready,
                Kind::Engine => parse_engine_ready,
            };
            if let Some(ready) = scanner.scan(&mut file, parse) {
                let child = self.child.0.take().ok_or_else(|| {
                    AgentError::Internal(format!("{}: child handle lost", self.what))
                })?;
                return Ok(Launched {
                    child,
                    pid: self.pid,
                    ready,
                });
            }
            let Some(child) = self.child.0.as_mut() else {
                return Err(AgentError::Internal(format!(
                    "{}: child handle lost",
                    self.what
                )));
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(AgentError::Exited {
                        what: self.what.clone(),
                        status: describe_exit(status),
                        log: self.log.clone(),
                        tail: log_tail(&self.log, self.offset, TAIL_BYTES),
                    });
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(AgentError::Io {
                        context: format!("waiting for {} (pid {})", self.what, self.pid),
                        source,
                    });
                }
            }
            if Instant::now() >= deadline {
                self.kill_and_reap().await;
                return Err(AgentError::NotReady {
                    what: self.what.clone(),
                    timeout,
                    log: self.log.clone(),
                    tail: log_tail(&self.log, self.offset, TAIL_BYTES),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(READY_POLL) => {}
                _ = &mut cancel => {
                    self.kill_and_reap().await;
                    return Err(AgentError::Cancelled(self.what.clone()));
                }
            }
        }
    }

    async fn kill_and_reap(&mut self) {
        if let Some(mut c) = self.child.0.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}

/// True when `pid` is alive (not a zombie) and runs `program args`: a pid
/// recorded by an earlier agent is only ours if both hold.
pub(crate) fn is_ours(pid: u32, program: &str, args: &[String]) -> bool {
    if pid == 0 || program.is_empty() {
        return false;
    }
    let Some(process) = zebu_common::procfs::live(pid) else {
        return false;
    };
    if process.args.is_empty() {
        // Exiting: its memory (and command line) is gone but it is not a
        // zombie yet. Judge by name (comm is at most 15 bytes).
        let name = Path::new(program)
            .file_name()
            .map(|n| n.as_bytes())
            .unwrap_or_default();
        return !process.comm.is_empty() && name.starts_with(process.comm.as_bytes());
    }
    let mut parts = process.args.iter();
    parts.next().is_some_and(|a| a == program.as_bytes())
        && parts
            .map(|a| OsStr::from_bytes(a))
            .eq(args.iter().map(|a| OsStr::new(a.as_str())))
}

/// Sends `sig` to `pid`; a process already gone is fine.
fn signal(pid: u32, sig: Signal) -> Result<(), Errno> {
    let Ok(raw) = i32::try_from(pid) else {
        return Err(Errno::ESRCH);
    };
    match kill(Pid::from_raw(raw), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Stops our child: SIGTERM, then SIGKILL after `grace`. Returns how it ended.
pub(crate) async fn stop_child(child: &mut Child, pid: u32, grace: Duration) -> String {
    if let Err(e) = signal(pid, Signal::SIGTERM) {
        tracing::warn!(pid, error = %e, "cannot send SIGTERM");
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => describe_exit(status),
        Ok(Err(e)) => format!("unknown (waiting failed: {e})"),
        Err(_) => {
            tracing::warn!(pid, ?grace, "did not stop after SIGTERM; sending SIGKILL");
            let _ = child.start_kill();
            match child.wait().await {
                Ok(status) => format!(
                    "{} after not stopping within {grace:?}",
                    describe_exit(status)
                ),
                Err(e) => format!("unknown (waiting failed: {e})"),
            }
        }
    }
}

/// Stops a process that is not our child (adopted): SIGTERM, SIGKILL after
/// `grace`, polling `/proc` (and never signalling a pid that is no longer
/// the recorded command). Returns how it ended, as far as can be told.
pub(crate) async fn stop_adopted(
    pid: u32,
    program: &str,
    args: &[String],
    grace: Duration,
) -> String {
    for (sig, wait) in [
        (Signal::SIGTERM, grace),
        (Signal::SIGKILL, Duration::from_secs(10)),
    ] {
        if !is_ours(pid, program, args) {
            return "stopped".to_owned();
        }
        if let Err(e) = signal(pid, sig) {
            tracing::warn!(pid, error = %e, "cannot send {sig}");
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if !is_ours(pid, program, args) {
                return if sig == Signal::SIGKILL {
                    format!("killed by signal 9 after not stopping within {grace:?}")
                } else {
                    "stopped".to_owned()
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    format!("pid {pid} did not exit after SIGKILL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ready_line() {
        let line = "zebu-replica serving /var/zebu/d 1/replicas/v/r on 127.0.0.1:40123 (id \
                    6b1f2c3e-0000-4000-8000-000000000000, size 1073741824 bytes, block size 4096, \
                    io engine uring, previous stop clean)\n";
        assert_eq!(
            parse_replica_ready(line),
            Some(Ready::Replica {
                address: "127.0.0.1:40123".into(),
                size_bytes: 1 << 30
            })
        );
        // A dir containing " on " does not confuse it.
        let line = "zebu-replica serving /x on y on [::1]:9 (id u, size 7 bytes, block size \
                    4096, io engine threads, previous stop unclean)";
        assert_eq!(
            parse_replica_ready(line),
            Some(Ready::Replica {
                address: "[::1]:9".into(),
                size_bytes: 7
            })
        );
        for other in [
            "",
            "2024-01-01T00:00:00Z INFO zebu_replica: zebu-replica serving /d on 1.2.3.4:5 (id u, size 7 bytes)",
            "zebu-replica serving /d on 1.2.3.4:5",
            "zebu-replica serving /d on 1.2.3.4:5 (id u, size many bytes)",
            "zebu-engine volume v ready: nbd unix:/s; control 127.0.0.1:1; epoch 2",
        ] {
            assert_eq!(parse_replica_ready(other), None, "{other}");
        }
    }

    #[test]
    fn engine_ready_line() {
        let line = "zebu-engine volume pvc-1 ready: nbd unix:/run/zebu/engines/pvc-1.sock, \
                    tcp:127.0.0.1:10809; control 127.0.0.1:41000; epoch 12\n";
        assert_eq!(
            parse_engine_ready(line),
            Some(Ready::Engine {
                control: "127.0.0.1:41000".into(),
                epoch: 12
            })
        );
        for other in [
            "zebu-engine volume v ready: nbd unix:/s; control 127.0.0.1:1; epoch x",
            "zebu-engine volume v starting; control 127.0.0.1:1; epoch 1",
            "zebu-replica serving /d on 1.2.3.4:5 (id u, size 7 bytes, block size 1)",
        ] {
            assert_eq!(parse_engine_ready(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn spawn_wait_and_probe() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(
            &log,
            "zebu-engine volume old ready: nbd unix:/s; control 1.1.1.1:1; epoch 1\n",
        )
        .unwrap();
        // A child that prints a ready line on stdout after noise on stderr,
        // then stays up: the old ready line before the offset is ignored.
        let args: Vec<String> = vec![
            "-c".into(),
            "echo starting >&2; sleep 0.2; echo 'zebu-engine volume v ready: nbd unix:/s; control 127.0.0.1:9; epoch 5'; exec sleep 60".into(),
        ];
        let sp = spawn(Kind::Engine, "test engine", "/bin/sh", &args, &log).unwrap();
        let pid = sp.pid;
        let mut l = sp
            .wait_ready(Duration::from_secs(30), std::future::pending())
            .await
            .unwrap();
        assert_eq!(
            l.ready,
            Ready::Engine {
                control: "127.0.0.1:9".into(),
                epoch: 5
            }
        );
        // After exec the command line is sleep's, not the recorded one. The
        // ready line comes before the exec: wait until the kernel shows the
        // new command line (mid-exec it reads empty, and only the name counts).
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let execed = || {
            zebu_common::procfs::live(pid)
                .is_some_and(|p| p.args.first().is_some_and(|a| a == b"sleep"))
        };
        while !execed() {
            assert!(std::time::Instant::now() < end, "sh never became sleep");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!is_ours(pid, "/bin/sh", &args));
        let sleep_args = ["60".to_owned()];
        assert!(is_ours(pid, "sleep", &sleep_args));
        assert!(!is_ours(pid, "sleep", &["61".to_owned()]));
        assert_eq!(
            stop_child(&mut l.child, pid, Duration::from_secs(10)).await,
            "killed by signal 15"
        );
        assert!(!is_ours(pid, "sleep", &sleep_args));

        // Exiting before ready: an error with the log tail.
        let args: Vec<String> = vec!["-c".into(), "echo 'bad flag' >&2; exit 3".into()];
        let e = spawn(Kind::Replica, "test replica", "/bin/sh", &args, &log)
            .unwrap()
            .wait_ready(Duration::from_secs(30), std::future::pending())
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exited with status 3") && msg.contains("bad flag"),
            "{msg}"
        );
        assert!(
            !msg.contains("starting"),
            "tail must start at this run: {msg}"
        );

        // Cancelled: the child is killed.
        let args: Vec<String> = vec!["-c".into(), "exec sleep 60".into()];
        let sp = spawn(Kind::Replica, "test replica", "/bin/sh", &args, &log).unwrap();
        let pid = sp.pid;
        let e = sp
            .wait_ready(
                Duration::from_secs(30),
                tokio::time::sleep(Duration::from_millis(100)),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Cancelled(_)), "{e}");
        assert!(!is_ours(pid, "sleep", &["60".to_owned()]));

        // Missing binary: a spawn error naming it.
        let e = spawn(
            Kind::Replica,
            "test replica",
            "/nonexistent/zebu-x",
            &[],
            &log,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/zebu-x"), "{e}");
    }
}
