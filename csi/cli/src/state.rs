//! The CLI's own state: what `zebu volume attach` did, so `detach` and
//! `expand` need not be told the paths again.
//!
//! ```text
//! STATE_DIR/attachments/<volume>.json   one Attachment record per volume
//! STATE_DIR/staging/<volume>/           NodeStageVolume's staging path
//! ```
//!
//! Volume ids are escaped into file names (`/` and other unsafe bytes become
//! `%XX`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How the volume is presented.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Access {
    /// A mounted filesystem (`fs_type` empty: the driver's default).
    Mount {
        /// Filesystem type.
        fs_type: String,
    },
    /// A raw block device.
    Block,
}

/// One volume attached on this host by the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Volume id.
    pub volume_id: String,
    /// Node id from NodeGetInfo.
    pub node_id: String,
    /// Mount or block.
    pub access: Access,
    /// NodePublishVolume target: the mount directory or the device file.
    pub target: PathBuf,
    /// NodeStageVolume staging path, if the driver stages.
    pub staging: Option<PathBuf>,
    /// Attached read-only.
    pub read_only: bool,
    /// ControllerPublishVolume is part of this attachment (the driver
    /// advertises PUBLISH_UNPUBLISH_VOLUME).
    pub controller_published: bool,
    /// ControllerPublishVolume's reply.
    pub publish_context: BTreeMap<String, String>,
    /// The volume's context, passed to the node calls.
    pub volume_context: BTreeMap<String, String>,
    /// Every attach step succeeded.
    pub complete: bool,
}

/// The CLI state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The staging path of `volume`.
    pub fn staging(&self, volume: &str) -> PathBuf {
        self.root.join("staging").join(escape(volume))
    }

    /// The record file of `volume`.
    pub fn record_path(&self, volume: &str) -> PathBuf {
        self.root
            .join("attachments")
            .join(format!("{}.json", escape(volume)))
    }

    /// Reads the attachment of `volume`, if recorded.
    pub fn load(&self, volume: &str) -> io::Result<Option<Attachment>> {
        let p = self.record_path(volume);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a valid attachment record: {e}", p.display()),
            )
        })
    }

    /// Records `att` (atomically and durably: see [`zebu_common::durable`]).
    pub fn save(&self, att: &Attachment) -> io::Result<()> {
        let p = self.record_path(&att.volume_id);
        let dir = p.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir)?;
        let text = serde_json::to_vec_pretty(att).map_err(io::Error::other)?;
        zebu_common::durable::write(&p, &text, 0o600)
    }

    /// Forgets the attachment of `volume`.
    pub fn remove(&self, volume: &str) -> io::Result<()> {
        zebu_common::durable::remove(&self.record_path(volume)).map(|_| ())
    }
}

/// Escapes a volume id into one path component.
pub fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // "." and ".." are not names.
    if out.chars().all(|c| c == '.') {
        out = out.replace('.', "%2E");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_ids() {
        assert_eq!(escape("pvc-1a2b_c.d"), "pvc-1a2b_c.d");
        assert_eq!(escape("a/b c"), "a%2Fb%20c");
        assert_eq!(escape(".."), "%2E%2E");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path());
        assert_eq!(st.load("v/1").unwrap(), None);
        let att = Attachment {
            volume_id: "v/1".into(),
            node_id: "n".into(),
            access: Access::Mount {
                fs_type: "xfs".into(),
            },
            target: "/mnt/x".into(),
            staging: Some(st.staging("v/1")),
            read_only: false,
            controller_published: true,
            publish_context: BTreeMap::from([("k".into(), "v".into())]),
            volume_context: BTreeMap::new(),
            complete: true,
        };
        st.save(&att).unwrap();
        assert!(st.record_path("v/1").ends_with("attachments/v%2F1.json"));
        assert_eq!(st.load("v/1").unwrap(), Some(att.clone()));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(st.record_path("v/1")).unwrap()).unwrap();
        assert_eq!(json["access"]["type"], "mount");
        assert_eq!(json["target"], "/mnt/x");
        st.remove("v/1").unwrap();
        st.remove("v/1").unwrap();
        assert_eq!(st.load("v/1").unwrap(), None);
    }

    #[test]
    fn corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("attachments")).unwrap();
        std::fs::write(st.record_path("v"), b"{").unwrap();
        let e = st.load("v").unwrap_err();
        assert!(
            e.to_string().contains("not a valid attachment record"),
            "{e}"
        );
    }
}
