//! How an agent is set up: its configuration, where it finds the
//! `zebu-replica` and `zebu-engine` binaries, and where engines' NBD
//! sockets go.

use std::path::{Path, PathBuf};

use super::AgentError;

/// Most volumes a node attaches at once when not configured otherwise.
pub const DEFAULT_MAX_VOLUMES: u64 = 64;

/// Longest Unix socket path (`sun_path` is 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Where sockets go when `<state_dir>/engines/` is too deep for a Unix
/// socket path: one directory per state dir, named by a hash of it.
const SHORT_SOCKET_ROOT: &str = "/run/zebu-agent";

/// The NBD socket path of `volume_id`'s engine: `engines_dir/<id>.sock`, or,
/// when that is longer than a Unix socket path may be (a deep state
/// directory), `/run/zebu-agent/<hash of engines_dir>/<id>.sock`. The choice
/// depends only on its inputs, so it is the same after an agent restart.
pub(crate) fn engine_socket(engines_dir: &Path, volume_id: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let direct = engines_dir.join(format!("{volume_id}.sock"));
    if direct.as_os_str().len() <= MAX_SOCKET_PATH {
        return direct;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engines_dir.hash(&mut h);
    Path::new(SHORT_SOCKET_ROOT)
        .join(format!("{:016x}", h.finish()))
        .join(format!("{volume_id}.sock"))
}

/// The file `volume_id`'s engine serves the volume as, for a loop device:
/// `disk` in a directory of its own beside the engine's NBD socket (the
/// engine mounts FUSE over that directory).
pub(crate) fn engine_file(socket: &Path) -> PathBuf {
    let mut dir = socket.as_os_str().to_owned();
    dir.push(".file");
    PathBuf::from(dir).join("disk")
}

/// How the agent is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The node's name (Kubernetes node name or host name).
    pub node_id: String,
    /// Directories replica directories are created in (created if missing).
    pub disks: Vec<PathBuf>,
    /// Where records, logs and NBD sockets live (created if missing).
    pub state_dir: PathBuf,
    /// The `zebu-replica` binary.
    pub replica_bin: PathBuf,
    /// The `zebu-engine` binary.
    pub engine_bin: PathBuf,
    /// Host replicas and engines bind (port 0), e.g. `127.0.0.1`; engines on
    /// other nodes dial replicas there, so use a routable address in a cluster.
    pub listen_host: String,
    /// Reported as the node's `max_volumes`.
    pub max_volumes: u64,
    /// The agent's own gRPC `host:port` as reported by `GetNode`; filled in
    /// by the caller once it has bound its server (see also
    /// [`Agent::set_advertise_address`]).
    pub advertise_address: String,
}

impl AgentConfig {
    /// A configuration with the binaries found by [`find_binary`],
    /// `listen_host` 127.0.0.1, [`DEFAULT_MAX_VOLUMES`] and no advertised
    /// address yet.
    pub fn new(
        node_id: impl Into<String>,
        disks: Vec<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Result<AgentConfig, AgentError> {
        Ok(AgentConfig {
            node_id: node_id.into(),
            disks,
            state_dir: state_dir.into(),
            replica_bin: find_binary("zebu-replica")?,
            engine_bin: find_binary("zebu-engine")?,
            listen_host: "127.0.0.1".to_owned(),
            max_volumes: DEFAULT_MAX_VOLUMES,
            advertise_address: String::new(),
        })
    }
}

/// Finds the binary `name`: next to the running executable first (binaries
/// of one build or package are installed together), else on `$PATH`.
pub fn find_binary(name: &str) -> Result<PathBuf, AgentError> {
    let mut searched = Vec::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in exe_dir.into_iter().chain(path_dirs) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(dir.display().to_string());
    }
    Err(AgentError::BinaryNotFound {
        name: name.to_owned(),
        searched: searched.join(":"),
    })
}

#[cfg(test)]
mod socket_path_tests {
    use super::*;

    #[test]
    fn engine_sockets_fit_in_a_unix_socket_path() {
        let short = Path::new("/var/lib/zebu/agent/engines");
        assert_eq!(
            engine_socket(short, "zv-1"),
            Path::new("/var/lib/zebu/agent/engines/zv-1.sock")
        );
        let deep = PathBuf::from(format!("/var/tmp/{}/state/agent/engines", "d".repeat(60)));
        let id = "zv-14db32ecca8944bb9046d8c2a4aa64ff";
        let p = engine_socket(&deep, id);
        assert!(p.starts_with(SHORT_SOCKET_ROOT), "{}", p.display());
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{}", p.display());
        // Stable (an agent restart finds the same socket) and distinct per
        // state directory.
        assert_eq!(p, engine_socket(&deep, id));
        let other = PathBuf::from(format!("/var/tmp/{}/state/agent/engines", "e".repeat(60)));
        assert_ne!(p, engine_socket(&other, id));
    }
}
