//! What the agent remembers about each process, on disk and in memory.
//!
//! One JSON file per process under `<state_dir>/processes/`, named
//! `<kind>-<key>.json` (keys are validated ids, so names are safe). A file is
//! replaced atomically: written to `<name>.tmp`, fsync'ed, renamed over the
//! old one, and the directory fsync'ed. Files are written in the order their
//! in-memory versions were made (see [`Proc::persist`]), so a slow write can
//! never overwrite a newer one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use zebu_proto::agent as pb;

use super::AgentError;

/// Version of the record file format.
pub(crate) const FORMAT: u32 = 1;

/// Longest accepted volume or replica id.
pub(crate) const MAX_ID_LEN: usize = 200;

/// Which binary a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// `zebu-replica`, keyed by replica id.
    Replica,
    /// `zebu-engine`, keyed by volume id.
    Engine,
}

impl Kind {
    /// Lower-case name used in file names and messages.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Replica => "replica",
            Kind::Engine => "engine",
        }
    }
}

/// A process's identity in the agent: replica id or volume id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) kind: Kind,
    pub(crate) id: String,
}

impl Key {
    /// File stem of the record and log: `<kind>-<id>`.
    pub(crate) fn stem(&self) -> String {
        format!("{}-{}", self.kind.as_str(), self.id)
    }
}

/// What the process is: everything needed to (re)build its command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Spec {
    /// A replica directory served by `zebu-replica`.
    Replica {
        volume_id: String,
        replica_id: String,
        /// The configured disk, as configured.
        disk: String,
        /// `<disk>/replicas/<volume_id>/<replica_id>`.
        dir: String,
        /// Logical size; updated from the ready line (an engine may expand it).
        size_bytes: u64,
        /// True once a run reported ready: the directory holds a replica, so
        /// restarts omit `--size` (its size may have grown since).
        created: bool,
    },
    /// A volume's `zebu-engine`.
    Engine {
        volume_id: String,
        size_bytes: u64,
        replica_addresses: Vec<String>,
        /// `--io-timeout`, empty for the engine's default.
        io_timeout: String,
        nbd_socket: String,
        /// `--scrub-interval`, empty for the engine's default.
        #[serde(default)]
        scrub_interval: String,
        /// `--scrub-rate`, empty for the engine's default.
        #[serde(default)]
        scrub_rate: String,
        /// `--file`: the engine serves the volume as this file too (on a
        /// FUSE mount over its directory); empty in records from before.
        #[serde(default)]
        file: String,
    },
}

impl Spec {
    /// The record's key.
    pub(crate) fn key(&self) -> Key {
        match self {
            Spec::Replica { replica_id, .. } => Key {
                kind: Kind::Replica,
                id: replica_id.clone(),
            },
            Spec::Engine { volume_id, .. } => Key {
                kind: Kind::Engine,
                id: volume_id.clone(),
            },
        }
    }

    /// Human name for messages: `replica R of volume V` / `engine of volume V`.
    pub(crate) fn what(&self) -> String {
        match self {
            Spec::Replica {
                volume_id,
                replica_id,
                ..
            } => format!("replica {replica_id} of volume {volume_id}"),
            Spec::Engine { volume_id, .. } => format!("engine of volume {volume_id}"),
        }
    }

    /// The arguments of the next run (`listen_host` is where it binds, port 0).
    pub(crate) fn args(&self, listen_host: &str) -> Vec<String> {
        let listen = if listen_host.contains(':') && !listen_host.starts_with('[') {
            format!("[{listen_host}]:0")
        } else {
            format!("{listen_host}:0")
        };
        match self {
            Spec::Replica {
                dir,
                size_bytes,
                created,
                ..
            } => {
                let mut a = vec!["--dir".into(), dir.clone(), "--listen".into(), listen];
                if !created {
                    a.push("--size".into());
                    a.push(size_bytes.to_string());
                }
                a
            }
            Spec::Engine {
                volume_id,
                size_bytes,
                replica_addresses,
                io_timeout,
                nbd_socket,
                scrub_interval,
                scrub_rate,
                file,
            } => {
                let mut a = vec![
                    "--volume".into(),
                    volume_id.clone(),
                    "--size".into(),
                    size_bytes.to_string(),
                ];
                for r in replica_addresses {
                    a.push("--replica".into());
                    a.push(r.clone());
                }
                a.push("--nbd".into());
                a.push(format!("unix:{nbd_socket}"));
                a.push("--listen".into());
                a.push(listen);
                for (flag, v) in [
                    ("--io-timeout", io_timeout),
                    ("--scrub-interval", scrub_interval),
                    ("--scrub-rate", scrub_rate),
                    ("--file", file),
                ] {
                    if !v.is_empty() {
                        a.push(flag.into());
                        a.push(v.clone());
                    }
                }
                a
            }
        }
    }
}

/// The persisted record of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// [`FORMAT`].
    pub(crate) format: u32,
    pub(crate) spec: Spec,
    /// Program (argv\[0\]) of the current or last run; with `args`, what
    /// `/proc/<pid>/cmdline` must show for `pid` to still be ours.
    pub(crate) program: String,
    /// Arguments of the current or last run.
    pub(crate) args: Vec<String>,
    /// Pid of the current run; `None` while nothing runs.
    pub(crate) pid: Option<u32>,
    /// Replica gRPC or engine control `host:port` of the current run; empty
    /// until it reported ready.
    pub(crate) address: String,
    /// Engine epoch of the current run (0 for replicas).
    pub(crate) epoch: u64,
    /// Restarts after unexpected exits.
    pub(crate) restarts: u32,
    /// How the last run ended (or why the last start failed); empty if none did.
    pub(crate) last_exit: String,
    /// Set before an intentional stop (DeleteReplica / StopEngine): such a
    /// record is never restarted, and a restarted agent finishes the removal.
    pub(crate) removing: bool,
}

impl Record {
    /// A fresh record: nothing started yet.
    pub(crate) fn new(spec: Spec) -> Record {
        Record {
            format: FORMAT,
            spec,
            program: String::new(),
            args: Vec::new(),
            pid: None,
            address: String::new(),
            epoch: 0,
            restarts: 0,
            last_exit: String::new(),
            removing: false,
        }
    }
}

/// Checks a volume or replica id: non-empty, at most [`MAX_ID_LEN`] bytes of
/// `[A-Za-z0-9._-]`, not `.` and without `..` (ids become path components).
pub(crate) fn validate_id(field: &str, id: &str) -> Result<(), AgentError> {
    let bad = |why: &str| {
        Err(AgentError::InvalidArgument(format!(
            "{field} {id:?} {why}: use 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -, \
             not \".\" and without \"..\""
        )))
    };
    if id.is_empty() {
        return bad("is empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("is too long");
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!("contains {c:?}"));
    }
    if id == "." || id.contains("..") {
        return bad("is a path traversal");
    }
    Ok(())
}

/// Writes `rec` to `path` atomically and durably ([`zebu_common::durable`]).
pub(crate) fn write(path: &Path, rec: &Record) -> Result<(), AgentError> {
    let mut json = serde_json::to_vec_pretty(rec).map_err(|source| AgentError::Record {
        path: path.to_owned(),
        source,
    })?;
    json.push(b'\n');
    zebu_common::durable::write(path, &json, 0o600).map_err(|source| AgentError::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// Removes the record at `path` (absent is fine) and syncs the directory.
pub(crate) fn remove(path: &Path) -> Result<(), AgentError> {
    zebu_common::durable::remove(path)
        .map(|_| ())
        .map_err(|source| AgentError::Io {
            context: format!("removing {}", path.display()),
            source,
        })
}

/// Reads one record file.
pub(crate) fn read(path: &Path) -> Result<Record, AgentError> {
    let bytes = std::fs::read(path).map_err(|source| AgentError::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let rec: Record = serde_json::from_slice(&bytes).map_err(|source| AgentError::Record {
        path: path.to_owned(),
        source,
    })?;
    if rec.format != FORMAT {
        return Err(AgentError::InvalidArgument(format!(
            "{}: record format {} is not the supported {FORMAT}",
            path.display(),
            rec.format
        )));
    }
    // The file name is not trusted: ids become paths and arguments.
    match &rec.spec {
        Spec::Replica {
            volume_id,
            replica_id,
            ..
        } => {
            validate_id("volume_id", volume_id)?;
            validate_id("replica_id", replica_id)?;
        }
        Spec::Engine { volume_id, .. } => validate_id("volume_id", volume_id)?,
    }
    Ok(rec)
}

/// A process the agent knows: its record plus what only lives in memory.
#[derive(Clone, Debug)]
pub(crate) struct ProcState {
    pub(crate) rec: Record,
    /// True while a run is up and was ready (or was adopted).
    pub(crate) running: bool,
    /// Bumped on every change to persist; orders file writes.
    version: u64,
}

/// One known process: shared by the agent's table and its supervisor task.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) key: Key,
    /// The record file.
    pub(crate) file: PathBuf,
    /// The append-only stdout + stderr log of every run.
    pub(crate) log: PathBuf,
    state: Mutex<ProcState>,
    /// Version last written to `file`.
    written: Mutex<u64>,
}

impl Proc {
    /// A process known by `rec`, recorded in `processes_dir`, logging to `logs_dir`.
    pub(crate) fn new(rec: Record, running: bool, processes_dir: &Path, logs_dir: &Path) -> Proc {
        let key = rec.spec.key();
        let stem = key.stem();
        Proc {
            file: processes_dir.join(format!("{stem}.json")),
            log: logs_dir.join(format!("{stem}.log")),
            key,
            state: Mutex::new(ProcState {
                rec,
                running,
                version: 1,
            }),
            written: Mutex::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current state.
    pub(crate) fn snapshot(&self) -> ProcState {
        self.lock().clone()
    }

    /// Changes the state (the caller persists afterwards).
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut ProcState) -> R) -> R {
        let mut s = self.lock();
        s.version += 1;
        f(&mut s)
    }

    /// Writes the current state to the record file. Concurrent calls are
    /// ordered: a write never replaces a newer version.
    pub(crate) async fn persist(self: &Arc<Self>) -> Result<(), AgentError> {
        let (version, rec) = {
            let s = self.lock();
            (s.version, s.rec.clone())
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut written = me.written.lock().unwrap_or_else(PoisonError::into_inner);
            if *written >= version {
                return Ok(());
            }
            write(&me.file, &rec)?;
            *written = version;
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Internal(format!("record writer task failed: {e}")))?
    }

    /// The replica as the API shows it (`None` for an engine).
    pub(crate) fn replica_info(&self) -> Option<pb::ReplicaProcess> {
        let s = self.lock();
        match &s.rec.spec {
            Spec::Replica {
                volume_id,
                replica_id,
                disk,
                dir,
                size_bytes,
                ..
            } => Some(pb::ReplicaProcess {
                volume_id: volume_id.clone(),
                replica_id: replica_id.clone(),
                disk: disk.clone(),
                dir: dir.clone(),
                address: if s.running {
                    s.rec.address.clone()
                } else {
                    String::new()
                },
                running: s.running,
                pid: if s.running { s.rec.pid.unwrap_or(0) } else { 0 },
                restarts: s.rec.restarts,
                size_bytes: *size_bytes,
                last_exit: s.rec.last_exit.clone(),
            }),
            Spec::Engine { .. } => None,
        }
    }

    /// The engine as the API shows it (`None` for a replica).
    pub(crate) fn engine_info(&self) -> Option<pb::EngineProcess> {
        let s = self.lock();
        match &s.rec.spec {
            Spec::Engine {
                volume_id,
                size_bytes,
                replica_addresses,
                nbd_socket,
                file,
                ..
            } => Some(pb::EngineProcess {
                volume_id: volume_id.clone(),
                nbd_socket: nbd_socket.clone(),
                file: file.clone(),
                control_address: if s.running {
                    s.rec.address.clone()
                } else {
                    String::new()
                },
                epoch: s.rec.epoch,
                running: s.running,
                pid: if s.running { s.rec.pid.unwrap_or(0) } else { 0 },
                restarts: s.rec.restarts,
                replica_addresses: replica_addresses.clone(),
                size_bytes: *size_bytes,
                last_exit: s.rec.last_exit.clone(),
            }),
            Spec::Replica { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_spec(created: bool) -> Spec {
        Spec::Replica {
            volume_id: "vol-1".into(),
            replica_id: "r.1_a".into(),
            disk: "/d1".into(),
            dir: "/d1/replicas/vol-1/r.1_a".into(),
            size_bytes: 1 << 30,
            created,
        }
    }

    #[test]
    fn ids_are_validated() {
        for ok in ["a", "vol-1", "pvc-0b1c.2_3", "A.b", &"x".repeat(MAX_ID_LEN)] {
            validate_id("id", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            "../x",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let e = validate_id("replica_id", bad).expect_err(bad);
            assert!(matches!(e, AgentError::InvalidArgument(_)), "{bad}: {e}");
            assert!(e.to_string().contains("replica_id"), "{e}");
        }
    }

    #[test]
    fn replica_args_omit_size_once_created() {
        let a = replica_spec(false).args("127.0.0.1");
        assert_eq!(
            a,
            [
                "--dir",
                "/d1/replicas/vol-1/r.1_a",
                "--listen",
                "127.0.0.1:0",
                "--size",
                "1073741824"
            ]
        );
        let a = replica_spec(true).args("::1");
        assert_eq!(
            a,
            ["--dir", "/d1/replicas/vol-1/r.1_a", "--listen", "[::1]:0"]
        );
    }

    #[test]
    fn engine_args() {
        let spec = Spec::Engine {
            volume_id: "v".into(),
            size_bytes: 4096,
            replica_addresses: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            io_timeout: "3s".into(),
            nbd_socket: "/s/v.sock".into(),
            scrub_interval: "7d".into(),
            scrub_rate: String::new(),
            file: "/s/v.file/disk".into(),
        };
        assert_eq!(
            spec.args("127.0.0.1"),
            [
                "--volume",
                "v",
                "--size",
                "4096",
                "--replica",
                "127.0.0.1:1",
                "--replica",
                "127.0.0.1:2",
                "--nbd",
                "unix:/s/v.sock",
                "--listen",
                "127.0.0.1:0",
                "--io-timeout",
                "3s",
                "--scrub-interval",
                "7d",
                "--file",
                "/s/v.file/disk"
            ]
        );
    }

    #[test]
    fn record_round_trip_and_ordered_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Record::new(replica_spec(true));
        rec.pid = Some(42);
        rec.address = "127.0.0.1:5000".into();
        rec.restarts = 3;
        rec.last_exit = "killed by signal 9".into();
        let path = dir.path().join("replica-r.1_a.json");
        write(&path, &rec).unwrap();
        assert_eq!(read(&path).unwrap(), rec);
        assert!(!dir.path().join("replica-r.1_a.json.tmp").exists());

        // Through Proc: the file follows the in-memory state.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let proc = Arc::new(Proc::new(rec.clone(), true, dir.path(), dir.path()));
        assert_eq!(proc.file, path);
        assert_eq!(proc.log, dir.path().join("replica-r.1_a.log"));
        proc.update(|s| s.rec.restarts = 4);
        rt.block_on(proc.persist()).unwrap();
        assert_eq!(read(&path).unwrap().restarts, 4);

        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn unsafe_records_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let mut rec = Record::new(replica_spec(true));
        if let Spec::Replica { replica_id, .. } = &mut rec.spec {
            *replica_id = "../../etc".into();
        }
        write(&path, &rec).unwrap();
        assert!(read(&path).is_err());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(read(&path), Err(AgentError::Record { .. })));
    }
}
