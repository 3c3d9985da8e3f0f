//! The node agent: owns the node's disks, creates and deletes replica
//! directories, runs and supervises `zebu-replica` and `zebu-engine`
//! processes, and serves the `zebu.agent.v1.Agent` gRPC API
//! (`proto/proto/agent.proto`, whose comments are the contract).
//!
//! # Layout
//!
//! | path                                        | what                                   |
//! |---------------------------------------------|----------------------------------------|
//! | `<disk>/replicas/<volume_id>/<replica_id>/` | a replica directory                    |
//! | `<state_dir>/processes/<kind>-<key>.json`   | one record per process (`record.rs`)    |
//! | `<state_dir>/logs/<kind>-<key>.log`         | stdout + stderr of every run, appended |
//! | `<state_dir>/engines/<volume_id>.sock`      | an engine's NBD socket (under `/run/zebu-agent/<hash>/` when that path is too long for a socket) |
//!
//! `<kind>` is `replica` (key: replica id) or `engine` (key: volume id).
//! A log larger than 32 MiB is renamed to `<name>.log.old` when its process
//! starts again; a deleted replica's log is removed, an engine's log is kept
//! (the volume's next engine appends to it).
//!
//! # Invariants
//!
//! - **Ids** (volume, replica) are 1–200 characters of `[A-Za-z0-9._-]`,
//!   never `.` nor containing `..`: they become path components, file names
//!   and arguments. Records read back from disk are validated the same way.
//! - **One operation per key at a time**: create/delete of a replica id,
//!   start/stop of a volume's engine hold a per-key async lock, so two
//!   concurrent `CreateReplica`s never spawn two processes.
//! - **Record before process**: a record reaches the disk before its process
//!   is spawned, and the pid is recorded before waiting for the ready line;
//!   so after an agent crash every process it started is known.
//! - **Children outlive the agent**: they run in their own process group,
//!   write to log files (never pipes to the agent), and
//!   [`Agent::shutdown`] (or dropping the last [`Agent`] handle) leaves them
//!   running. The next [`Agent::start`] on the same state directory adopts
//!   every recorded process that still runs its recorded command line
//!   (`/proc/<pid>/cmdline`, a guard against pid reuse) and restarts the
//!   others — replicas always, engines too (a volume was attached). A
//!   process whose start was interrupted by the crash (pid recorded, never
//!   reported ready) is stopped and restarted.
//! - **Supervision** (see `supervise.rs`): an unexpected exit is recorded in
//!   `last_exit` and restarted with backoff (200 ms doubling to 10 s, reset
//!   after a run over 30 s), counting `restarts`. A restarted replica keeps
//!   its directory but gets a new port: [`Agent::list_replicas`] shows the
//!   new address. An engine restarts with the same arguments. Intentional
//!   stops (delete, stop, [`Agent::stop_all`]) never restart.
//! - **Intentional removal is durable**: delete/stop first persists
//!   `removing` in the record; a restarted agent finishes such a removal
//!   instead of restarting the process.
//! - A replica's first run gets `--size`; once it reported ready its
//!   directory holds the replica and restarts omit `--size` (an engine may
//!   have expanded it; the size shown is the one of the last ready line).
//!
//! # Choices beyond the API contract
//!
//! - `CreateReplica` for an existing replica that is not running (crash
//!   looping, waiting for a restart) restarts it at once and reports the
//!   start's error. `StartEngine` for a volume whose engine is not running
//!   takes the request's arguments (size, replicas, I/O timeout) and starts
//!   at once: that is how a controller replaces stale replica addresses. A
//!   running engine is returned as is, whatever the request says.
//! - A child has 5 minutes to report ready (crash recovery is proportional
//!   to the data); a SIGTERM'ed child has 30 s before SIGKILL.
//! - `max_volumes` is reported, not enforced (the CO schedules by it).
//! - After [`Agent::shutdown`] or [`Agent::stop_all`] every call fails with
//!   UNAVAILABLE.

mod config;
mod engines;
mod error;
mod process;
mod record;
mod replicas;
mod service;
mod supervise;

pub use config::{AgentConfig, DEFAULT_MAX_VOLUMES, find_binary};
use config::{MAX_SOCKET_PATH, engine_file, engine_socket};
pub use error::AgentError;
pub use service::AgentService;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use zebu_proto::agent as pb;
use zebu_proto::agent::agent_server::AgentServer;

use record::{Key, Kind, Proc, Record, Spec, validate_id};
use supervise::{Cmd, Initial};

/// What supervisors and operations share: the configuration and its paths.
#[derive(Debug)]
pub(crate) struct Ctx {
    cfg: AgentConfig,
    processes_dir: PathBuf,
    logs_dir: PathBuf,
    engines_dir: PathBuf,
    /// The configured disks as strings, in configuration order.
    disks: Vec<String>,
}

impl Ctx {
    /// The binary (as a string: it is compared with `/proc/<pid>/cmdline`).
    fn program(&self, kind: Kind) -> Result<String, AgentError> {
        let p = match kind {
            Kind::Replica => &self.cfg.replica_bin,
            Kind::Engine => &self.cfg.engine_bin,
        };
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| AgentError::Config(format!("binary path {p:?} is not UTF-8")))
    }
}

struct Supervisor {
    cmd: watch::Sender<Cmd>,
    task: JoinHandle<()>,
}

struct Entry {
    proc: Arc<Proc>,
    /// `None` only while an operation holding the key's lock starts or stops it.
    sup: Option<Supervisor>,
}

struct Inner {
    ctx: Arc<Ctx>,
    entries: Mutex<HashMap<Key, Entry>>,
    op_locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    closed: AtomicBool,
    advertise: Mutex<String>,
}

/// The node agent. Cheap to clone (one shared state). Dropping the last
/// handle is like [`Agent::shutdown`] without waiting: processes keep running.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node_id", &self.inner.ctx.cfg.node_id)
            .field("state_dir", &self.inner.ctx.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { context, source }
}

fn create_dir(path: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(path).map_err(io_err(format!("creating {}", path.display())))
}

/// Removes a directory tree; absent is fine.
async fn remove_tree(path: PathBuf) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AgentError::Io {
            context: format!("removing {}", path.display()),
            source,
        }),
    })
    .await
    .map_err(|e| AgentError::Internal(format!("removal task failed: {e}")))?
}

fn remove_file_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

/// Removes a stopped engine's file directory. An engine that was killed
/// leaves its FUSE mount there, dead: it is detached first. Failures are
/// logged; the next engine of the volume detaches a dead mount itself.
fn remove_mount_dir(dir: &Path) {
    zebu_fuse_file::detach_if_dead(dir);
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %dir.display(), error = %e, "cannot remove"),
    }
}

impl Agent {
    /// Creates the state directory and the disks if missing, loads the
    /// process records, adopts the processes still running and restarts the
    /// others (in the background), and finishes interrupted removals.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        for (what, bin) in [
            ("replica_bin", &cfg.replica_bin),
            ("engine_bin", &cfg.engine_bin),
        ] {
            if !bin.is_file() {
                return Err(AgentError::Config(format!(
                    "{what} {} is not a file",
                    bin.display()
                )));
            }
        }
        if cfg.listen_host.is_empty() {
            return Err(AgentError::Config("listen_host is empty".into()));
        }
        let mut disks = Vec::new();
        for d in &cfg.disks {
            let s = d
                .to_str()
                .ok_or_else(|| AgentError::Config(format!("disk path {d:?} is not UTF-8")))?;
            create_dir(&d.join("replicas"))?;
            disks.push(s.to_owned());
        }
        if disks.is_empty() {
            warn!("the node agent has no disks: it can run engines but not hold replicas");
        }
        let ctx = Arc::new(Ctx {
            processes_dir: cfg.state_dir.join("processes"),
            logs_dir: cfg.state_dir.join("logs"),
            engines_dir: cfg.state_dir.join("engines"),
            disks,
            cfg,
        });
        for d in [&ctx.processes_dir, &ctx.logs_dir, &ctx.engines_dir] {
            create_dir(d)?;
        }
        let agent = Agent {
            inner: Arc::new(Inner {
                advertise: Mutex::new(ctx.cfg.advertise_address.clone()),
                ctx,
                entries: Mutex::new(HashMap::new()),
                op_locks: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        };
        agent.recover().await?;
        Ok(agent)
    }

    /// Loads every record and adopts, restarts or removes its process.
    async fn recover(&self) -> Result<(), AgentError> {
        let ctx = self.inner.ctx.clone();
        let dir = &ctx.processes_dir;
        let read_dir =
            std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
        let mut records = Vec::new();
        for ent in read_dir {
            let ent = ent.map_err(io_err(format!("listing {}", dir.display())))?;
            let path = ent.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {}
                Some("tmp") => {
                    // An interrupted write: the previous version is intact.
                    remove_file_quietly(&path);
                    continue;
                }
                _ => continue,
            }
            match record::read(&path) {
                Ok(rec) => records.push(rec),
                Err(e) => error!(error = %e, "ignoring an unreadable process record"),
            }
        }
        records.sort_by_key(|r| r.spec.key());
        let (mut adopted, mut restarting, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for rec in records {
            let key = rec.spec.key();
            let what = rec.spec.what();
            let alive = rec
                .pid
                .is_some_and(|pid| process::is_ours(pid, &rec.program, &rec.args));
            let proc = Arc::new(Proc::new(rec, false, &ctx.processes_dir, &ctx.logs_dir));
            let snap = proc.snapshot();
            if alive && (snap.rec.removing || snap.rec.address.is_empty()) {
                // Being removed, or its start was interrupted: stop it.
                let pid = snap.rec.pid.unwrap_or(0);
                let how = process::stop_adopted(
                    pid,
                    &snap.rec.program,
                    &snap.rec.args,
                    process::STOP_GRACE,
                )
                .await;
                info!(%what, pid, %how, "stopped a process left by the previous agent");
            }
            if snap.rec.removing {
                match self.finish_removal(&proc).await {
                    Ok(()) => removed.push(what),
                    Err(e) => {
                        // Kept (not running) so that a retried delete/stop
                        // finishes it; the agent still starts.
                        error!(%what, error = %e, "cannot finish an interrupted removal");
                        proc.update(|s| {
                            s.rec.pid = None;
                            s.rec.address.clear();
                        });
                        lock(&self.inner.entries).insert(key, Entry { proc, sup: None });
                    }
                }
                continue;
            }
            let initial = if alive && !snap.rec.address.is_empty() {
                proc.update(|s| s.running = true);
                adopted.push(format!(
                    "{what} (pid {}, {})",
                    snap.rec.pid.unwrap_or(0),
                    snap.rec.address
                ));
                Initial::Adopted(snap.rec.pid.unwrap_or(0))
            } else {
                if snap.rec.pid.is_some() {
                    proc.update(|s| {
                        s.rec.pid = None;
                        s.rec.address.clear();
                        s.rec.last_exit = "exited while the agent was not running".into();
                    });
                    proc.persist().await?;
                }
                restarting.push(what);
                Initial::Restart(Duration::ZERO)
            };
            lock(&self.inner.entries).insert(key.clone(), Entry { proc, sup: None });
            self.spawn_supervisor(&key, initial);
        }
        info!(
            node = %ctx.cfg.node_id,
            state_dir = %ctx.cfg.state_dir.display(),
            adopted = ?adopted,
            restarting = ?restarting,
            removed = ?removed,
            "node agent started"
        );
        Ok(())
    }

    /// Removes what a deleted replica or stopped engine leaves: the replica
    /// directory or the NBD socket, the log (replicas), the record.
    async fn finish_removal(&self, proc: &Arc<Proc>) -> Result<(), AgentError> {
        let snap = proc.snapshot();
        match &snap.rec.spec {
            Spec::Replica { dir, .. } => {
                let dir = PathBuf::from(dir);
                remove_tree(dir.clone()).await?;
                // The volume's directory, if this was its last replica here.
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
                remove_file_quietly(&proc.log);
            }
            Spec::Engine {
                nbd_socket, file, ..
            } => {
                remove_file_quietly(Path::new(nbd_socket));
                if let Some(dir) = Path::new(file).parent().filter(|_| !file.is_empty()) {
                    remove_mount_dir(dir);
                }
            }
        }
        record::remove(&proc.file)
    }

    /// The tonic service serving this agent.
    pub fn service(&self) -> AgentServer<AgentService> {
        AgentServer::new(AgentService::new(self.clone()))
    }

    /// The gRPC service, refusing every call without `token` when one is
    /// given (see `zebu_common::auth`).
    pub fn service_requiring(
        &self,
        token: Option<zebu_common::auth::Token>,
    ) -> tonic::service::interceptor::InterceptedService<
        AgentServer<AgentService>,
        zebu_common::auth::Require,
    > {
        tonic::service::interceptor::InterceptedService::new(
            self.service(),
            zebu_common::auth::Require(token),
        )
    }

    /// Sets the address `GetNode` reports (once the caller bound its server).
    pub fn set_advertise_address(&self, address: impl Into<String>) {
        *lock(&self.inner.advertise) = address.into();
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.ctx.cfg
    }

    fn check_open(&self) -> Result<(), AgentError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            Err(AgentError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    async fn lock_key(&self, key: &Key) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.inner.op_locks)
            .entry(key.clone())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    fn proc(&self, key: &Key) -> Option<Arc<Proc>> {
        lock(&self.inner.entries).get(key).map(|e| e.proc.clone())
    }

    fn spawn_supervisor(&self, key: &Key, initial: Initial) {
        let mut entries = lock(&self.inner.entries);
        let Some(entry) = entries.get_mut(key) else {
            return;
        };
        let (tx, rx) = watch::channel(Cmd::Run);
        let task = tokio::spawn(supervise::supervise(
            self.inner.ctx.clone(),
            entry.proc.clone(),
            initial,
            rx,
        ));
        entry.sup = Some(Supervisor { cmd: tx, task });
    }

    /// Sends `cmd` to the key's supervisor and waits for it to end.
    async fn end_supervisor(&self, key: &Key, cmd: Cmd) {
        let sup = lock(&self.inner.entries)
            .get_mut(key)
            .and_then(|e| e.sup.take());
        if let Some(sup) = sup {
            let _ = sup.cmd.send(cmd);
            if let Err(e) = sup.task.await {
                error!(key = ?key, error = %e, "supervisor task failed");
            }
        }
    }

    /// Starts a known process that is not running now (ending its
    /// supervisor first, which may be waiting to restart it). On failure the
    /// supervisor goes on retrying with backoff.
    async fn start_known(&self, key: &Key, proc: &Arc<Proc>) -> Result<(), AgentError> {
        self.end_supervisor(key, Cmd::Stop).await;
        match supervise::start(&self.inner.ctx, proc, false, std::future::pending()).await {
            Ok(child) => {
                self.spawn_supervisor(key, Initial::Child(child));
                Ok(())
            }
            Err(e) => {
                self.spawn_supervisor(key, Initial::Restart(supervise::BACKOFF_START));
                Err(e)
            }
        }
    }

    /// Records and starts a new process; forgets it again if it fails.
    async fn start_new(&self, rec: Record) -> Result<Arc<Proc>, AgentError> {
        let ctx = &self.inner.ctx;
        let key = rec.spec.key();
        let proc = Arc::new(Proc::new(rec, false, &ctx.processes_dir, &ctx.logs_dir));
        proc.persist().await?;
        lock(&self.inner.entries).insert(
            key.clone(),
            Entry {
                proc: proc.clone(),
                sup: None,
            },
        );
        match supervise::start(ctx, &proc, false, std::future::pending()).await {
            Ok(child) => {
                self.spawn_supervisor(&key, Initial::Child(child));
                Ok(proc)
            }
            Err(e) => {
                lock(&self.inner.entries).remove(&key);
                if let Err(re) = record::remove(&proc.file) {
                    error!(error = %re, "cannot remove the record of a failed start");
                }
                Err(e)
            }
        }
    }

    fn procs(&self, kind: Kind) -> Vec<Arc<Proc>> {
        let entries = lock(&self.inner.entries);
        let mut v: Vec<_> = entries
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(k, e)| (k.clone(), e.proc.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// `GetNode`: the node's identity, disks and capacity.
    pub async fn node_info(&self) -> Result<pb::NodeInfo, AgentError> {
        self.check_open()?;
        let ctx = self.inner.ctx.clone();
        let mut allocated: HashMap<String, u64> = HashMap::new();
        for p in self.procs(Kind::Replica) {
            let s = p.snapshot();
            if let Spec::Replica {
                disk, size_bytes, ..
            } = &s.rec.spec
                && !s.rec.removing
            {
                let a = allocated.entry(disk.clone()).or_default();
                *a = a.saturating_add(*size_bytes);
            }
        }
        let mut disks = Vec::new();
        for d in &ctx.disks {
            let path = PathBuf::from(d);
            let st = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path))
                .await
                .map_err(|e| AgentError::Internal(format!("statvfs task failed: {e}")))?
                .map_err(|e| AgentError::Io {
                    context: format!("statvfs {d}"),
                    source: e.into(),
                })?;
            // The field types differ between platforms.
            #[allow(clippy::unnecessary_cast)]
            let frag = st.fragment_size() as u64;
            #[allow(clippy::unnecessary_cast)]
            let (blocks, avail) = (st.blocks() as u64, st.blocks_available() as u64);
            disks.push(pb::Disk {
                path: d.clone(),
                capacity_bytes: blocks.saturating_mul(frag),
                available_bytes: avail.saturating_mul(frag),
                allocated_bytes: allocated.get(d).copied().unwrap_or(0),
            });
        }
        Ok(pb::NodeInfo {
            node_id: ctx.cfg.node_id.clone(),
            agent_address: lock(&self.inner.advertise).clone(),
            disks,
            max_volumes: ctx.cfg.max_volumes,
        })
    }

    /// Stops supervising and returns, leaving every process running so
    /// attached volumes keep serving; the next [`Agent::start`] on the same
    /// state directory adopts them. Later calls fail with UNAVAILABLE.
    pub async fn shutdown(&self) {
        let n = self.end_all(Cmd::Detach).await;
        info!(
            processes = n,
            "node agent stopped supervising; processes left running"
        );
    }

    /// Stops every process (SIGTERM, SIGKILL after a grace period) and waits
    /// for them: for tests and demo teardown. Records are kept (without a
    /// pid): the next [`Agent::start`] restarts them. Later calls fail with
    /// UNAVAILABLE.
    pub async fn stop_all(&self) {
        let n = self.end_all(Cmd::Stop).await;
        info!(processes = n, "node agent stopped every process");
    }

    /// Closes the agent and ends every supervisor with `cmd`, concurrently.
    async fn end_all(&self, cmd: Cmd) -> usize {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Wait for operations in progress (they hold their key's lock), then
        // take every supervisor: operations that come later see `closed`.
        let mut keys: std::collections::BTreeSet<Key> =
            lock(&self.inner.op_locks).keys().cloned().collect();
        keys.extend(lock(&self.inner.entries).keys().cloned());
        let mut guards = Vec::new();
        for k in keys {
            guards.push(self.lock_key(&k).await);
        }
        let sups: Vec<Supervisor> = lock(&self.inner.entries)
            .values_mut()
            .filter_map(|e| e.sup.take())
            .collect();
        let n = sups.len();
        for s in &sups {
            let _ = s.cmd.send(cmd);
        }
        for s in sups {
            if let Err(e) = s.task.await {
                error!(error = %e, "supervisor task failed");
            }
        }
        n
    }
}

/// A record whose removal failed half-way cannot be used again until a
/// retried delete/stop finished it.
fn refuse_removing(rec: &Record) -> Result<(), AgentError> {
    if rec.removing {
        return Err(AgentError::AlreadyExists(format!(
            "{} is being removed and its removal did not finish: retry the delete or stop first",
            rec.spec.what()
        )));
    }
    Ok(())
}

fn info_of<T>(info: Option<T>) -> Result<T, AgentError> {
    info.ok_or_else(|| AgentError::Internal("record of the wrong kind".into()))
}
