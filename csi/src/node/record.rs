//! The node service's per-volume record: what NodeStageVolume did, so that
//! later calls (publish, stats, expand, unstage) and a restarted plugin know
//! where and how a volume is staged.
//!
//! Layout: `STATE_DIR/node/<volume dir>/volume.json`, where `<volume dir>`
//! is the volume id made safe as one path component ([`volume_dir_name`]).
//! The same directory is the `attach` state directory of the volume (its
//! `attach.json`, `fuse/`, nbdfuse pid and log).
//!
//! Invariants:
//! * The record is written (atomically: temp file, fsync, rename) *before*
//!   the volume is attached, so a crash during staging leaves a record that
//!   NodeUnstageVolume uses to clean up; `device` is `None` until the attach
//!   succeeded.
//! * Only the holder of the volume's operation guard (see `ops`) writes it.
//! * `targets` lists the publish targets NodePublishVolume made and
//!   NodeUnpublishVolume has not removed yet.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const RECORD_FILE: &str = "volume.json";
const RECORD_VERSION: u32 = 1;
/// Longest volume directory name (a single path component).
const MAX_DIR_NAME: usize = 255;

/// How a volume is staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A filesystem mounted at the staging path.
    Mount {
        /// `ext4` or `xfs`.
        fs_type: String,
        /// Mount flags given at stage time.
        mount_flags: Vec<String>,
    },
    /// A raw block device; nothing is mounted at the staging path.
    Block,
}

impl Access {
    /// `"mount (ext4)"` / `"block"`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Access::Mount { fs_type, .. } => format!("a {fs_type} filesystem"),
            Access::Block => "a raw block device".to_owned(),
        }
    }
}

/// One publish target of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Whether the target was published read-only.
    pub read_only: bool,
}

/// The content of `volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Format version.
    pub version: u32,
    /// The CSI volume id.
    pub volume_id: String,
    /// Where the volume is staged.
    pub staging_path: PathBuf,
    /// Filesystem or block.
    pub access: Access,
    /// Whether the staging mount is read-only (reader-only access mode).
    pub read_only: bool,
    /// The NBD export the device shows.
    pub nbd_uri: String,
    /// The engine's control address (`host:port`), if the controller gave one.
    pub engine: Option<String>,
    /// The file the engine serves the volume as, if the controller named
    /// one (the device is then a loop device over it, no bridge).
    #[serde(default)]
    pub engine_file: Option<PathBuf>,
    /// The block device, once attached.
    pub device: Option<PathBuf>,
    /// Publish targets.
    pub targets: BTreeMap<PathBuf, Target>,
}

impl VolumeRecord {
    /// A fresh record (not attached yet, no targets).
    pub fn new(
        volume_id: &str,
        staging_path: &Path,
        access: Access,
        read_only: bool,
        nbd_uri: &str,
        engine: Option<String>,
        engine_file: Option<PathBuf>,
    ) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            volume_id: volume_id.to_owned(),
            staging_path: staging_path.to_owned(),
            access,
            read_only,
            nbd_uri: nbd_uri.to_owned(),
            engine,
            engine_file,
            device: None,
            targets: BTreeMap::new(),
        }
    }
}

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The volume id cannot be used as a directory name.
    #[error("volume id {0:?} is too long to be stored on this node")]
    IdTooLong(String),
    /// File system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The record is not valid JSON (or not ours).
    #[error("{}: unreadable volume record: {source}", path.display())]
    Json {
        /// The record file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

/// The volume id as a single, safe path component: ASCII letters, digits,
/// `-` and `_` are kept, `.` too except in first position, every other byte
/// becomes `%XX`. Distinct ids give distinct names.
pub fn volume_dir_name(volume_id: &str) -> Result<String, RecordError> {
    let mut s = String::with_capacity(volume_id.len());
    for (i, b) in volume_id.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.is_empty() || s.len() > MAX_DIR_NAME {
        return Err(RecordError::IdTooLong(volume_id.to_owned()));
    }
    Ok(s)
}

/// Where per-volume directories live.
#[derive(Debug, Clone)]
pub struct Records {
    root: PathBuf,
}

impl Records {
    /// Records under `state_dir/node`.
    pub fn new(state_dir: &Path) -> Records {
        Records {
            root: state_dir.join("node"),
        }
    }

    /// The volume's directory (record and attach state).
    pub fn dir(&self, volume_id: &str) -> Result<PathBuf, RecordError> {
        Ok(self.root.join(volume_dir_name(volume_id)?))
    }

    /// Reads the volume's record; `None` when there is none.
    pub fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>, RecordError> {
        let path = self.dir(volume_id)?.join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        let rec: VolumeRecord =
            serde_json::from_slice(&bytes).map_err(|source| RecordError::Json {
                path: path.clone(),
                source,
            })?;
        if rec.volume_id != volume_id {
            return Err(RecordError::Json {
                path,
                source: <serde_json::Error as serde::de::Error>::custom(format!(
                    "record is for volume {:?}",
                    rec.volume_id
                )),
            });
        }
        Ok(Some(rec))
    }

    /// Writes the record atomically, creating the volume directory (0700).
    pub fn store(&self, rec: &VolumeRecord) -> Result<(), RecordError> {
        let dir = self.dir(&rec.volume_id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| RecordError::Io {
                path: dir.clone(),
                source,
            })?;
        let path = dir.join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(rec).map_err(|source| RecordError::Json {
            path: path.clone(),
            source,
        })?;
        zebu_common::durable::write(&path, &json, 0o600)
            .map_err(|source| RecordError::Io { path, source })
    }

    /// Removes the record and then the volume directory if it is empty
    /// (the caller detached first, which removes the attach files).
    pub fn remove(&self, volume_id: &str) -> Result<(), RecordError> {
        let dir = self.dir(volume_id)?;
        let path = dir.join(RECORD_FILE);
        for path in [zebu_common::durable::temp_path(&path), path] {
            if let Err(source) = zebu_common::durable::remove(&path) {
                return Err(RecordError::Io { path, source });
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Leftovers (e.g. a kept nbdfuse log) are harmless.
            Err(e) => tracing::warn!("removing {}: {e}", dir.display()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_are_single_safe_components() {
        assert_eq!(volume_dir_name("pvc-1234_ab.c").unwrap(), "pvc-1234_ab.c");
        assert_eq!(volume_dir_name("..").unwrap(), "%2E.");
        assert_eq!(volume_dir_name(".").unwrap(), "%2E");
        assert_eq!(volume_dir_name("a/b").unwrap(), "a%2Fb");
        assert_eq!(volume_dir_name("a%2Fb").unwrap(), "a%252Fb");
        assert_eq!(volume_dir_name("é").unwrap(), "%C3%A9");
        assert!(volume_dir_name("").is_err());
        assert!(volume_dir_name(&"x".repeat(256)).is_err());
        assert!(volume_dir_name(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn store_load_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path());
        assert_eq!(records.load("v/1").unwrap(), None);
        let mut rec = VolumeRecord::new(
            "v/1",
            Path::new("/staging"),
            Access::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()],
            },
            false,
            "nbd+unix:///?socket=/s",
            Some("127.0.0.1:1".into()),
            Some("/e/v.sock.file/disk".into()),
        );
        rec.targets.insert("/t1".into(), Target { read_only: true });
        records.store(&rec).unwrap();
        assert_eq!(records.load("v/1").unwrap(), Some(rec.clone()));
        assert!(dir.path().join("node/v%2F1/volume.json").is_file());
        records.remove("v/1").unwrap();
        assert_eq!(records.load("v/1").unwrap(), None);
        assert!(!dir.path().join("node/v%2F1").exists());
        records.remove("v/1").unwrap();
    }

    #[test]
    fn a_record_of_another_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path());
        let rec = VolumeRecord::new(
            "a",
            Path::new("/s"),
            Access::Block,
            false,
            "nbd://x",
            None,
            None,
        );
        records.store(&rec).unwrap();
        std::fs::rename(dir.path().join("node/a"), dir.path().join("node/b")).unwrap();
        assert!(records.load("b").is_err());
    }
}
