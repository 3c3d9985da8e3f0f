//! The attachment record: the state directory's layout, `attach.json`
//! read and written durably, and the check that a recorded attachment
//! still works.

use super::*;

const STATE_FILE: &str = "attach.json";
const FUSE_DIR: &str = "fuse";
const FUSE_FILE: &str = "disk";
const PID_FILE: &str = "nbdfuse.pid";
const LOG_FILE: &str = "nbdfuse.log";
pub(super) const STATE_VERSION: u32 = 1;

/// On-disk record. Written once nbdfuse is started (no device yet) and again
/// when the loop device exists, so a crash in between can be cleaned up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StateRecord {
    pub(super) version: u32,
    pub(super) nbd_uri: String,
    pub(super) fuse_dir: PathBuf,
    pub(super) backing_file: PathBuf,
    pub(super) nbdfuse_pid: Option<i32>,
    pub(super) device: Option<PathBuf>,
    pub(super) size_bytes: u64,
    /// Absent in records written before the bridge existed: nbdfuse.
    #[serde(default = "default_record_backend")]
    pub(super) backend: Backend,
}

fn default_record_backend() -> Backend {
    Backend::Nbdfuse
}

pub(super) struct Layout {
    pub(super) state_file: PathBuf,
    pub(super) fuse_dir: PathBuf,
    pub(super) backing: PathBuf,
    pub(super) pidfile: PathBuf,
    pub(super) log: PathBuf,
}

impl Layout {
    pub(super) fn new(state_dir: &Path) -> Layout {
        let fuse_dir = state_dir.join(FUSE_DIR);
        Layout {
            state_file: state_dir.join(STATE_FILE),
            backing: fuse_dir.join(FUSE_FILE),
            fuse_dir,
            pidfile: state_dir.join(PID_FILE),
            log: state_dir.join(LOG_FILE),
        }
    }
}

pub(super) fn read_state(layout: &Layout, context: &str) -> Result<Option<StateRecord>> {
    let bytes = match std::fs::read(&layout.state_file) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(context)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| AttachError::StateFile {
            context: context.to_owned(),
            path: layout.state_file.clone(),
            source,
        })
}

/// Writes the record atomically and durably ([`zebu_common::durable`]): detach
/// reads it after a restart.
pub(super) fn write_state(layout: &Layout, rec: &StateRecord, context: &str) -> Result<()> {
    let json = serde_json::to_vec_pretty(rec).map_err(|source| AttachError::StateFile {
        context: context.to_owned(),
        path: layout.state_file.clone(),
        source,
    })?;
    let ctx = format!("{context}: writing {}", layout.state_file.display());
    zebu_common::durable::write(&layout.state_file, &json, 0o600).map_err(io_err(&ctx))
}

/// Checks that a recorded attachment still works: the loop device still
/// reads our FUSE file, the FUSE mount is there and answers, and nbdfuse
/// runs. Returns the reason when not.
pub(super) async fn check_attached(layout: &Layout, rec: &StateRecord) -> Result<Attached, String> {
    if rec.backing_file != layout.backing || rec.fuse_dir != layout.fuse_dir {
        return Err("state dir moved".into());
    }
    let device = rec.device.clone().ok_or("no loop device recorded")?;
    if loop_backing(&device).as_deref() != Some(layout.backing.as_path()) {
        return Err(format!(
            "{} no longer reads {}",
            device.display(),
            layout.backing.display()
        ));
    }
    // The engine serves its file itself: no server of ours to check.
    let pid = match rec.backend {
        Backend::Engine => None,
        _ => {
            let pid = rec.nbdfuse_pid.ok_or("no nbdfuse pid recorded")?;
            if !is_our_server(pid, &layout.backing) {
                return Err(format!("the FUSE server (pid {pid}) is gone"));
            }
            Some(pid)
        }
    };
    let mounts = read_mountinfo().map_err(|e| e.to_string())?;
    if !mounts
        .iter()
        .any(|m| m.mount_point == layout.fuse_dir && m.fstype.starts_with("fuse"))
    {
        return Err(format!("{} is not a FUSE mount", layout.fuse_dir.display()));
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, tokio::fs::metadata(&layout.backing)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("{}: {e}", layout.backing.display())),
        Err(_) => return Err(format!("{} does not answer", layout.backing.display())),
    }
    Ok(Attached {
        nbd_uri: rec.nbd_uri.clone(),
        device,
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: pid,
        size_bytes: rec.size_bytes,
        backend: rec.backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_a_backend_are_nbdfuse() {
        let json = r#"{"version":1,"nbd_uri":"nbd+unix:///?socket=/s","fuse_dir":"/d/fuse",
            "backing_file":"/d/fuse/disk","nbdfuse_pid":7,"device":null,"size_bytes":5}"#;
        let rec: StateRecord = serde_json::from_str(json).unwrap();
        assert_eq!(rec.backend, Backend::Nbdfuse);
        let rec = StateRecord {
            backend: Backend::Bridge,
            ..rec
        };
        let back: StateRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.backend, Backend::Bridge);
    }
}
