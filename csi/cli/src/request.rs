//! Building CSI requests from command-line arguments (pure functions, so
//! they are tested field by field).

use std::collections::HashMap;
use std::path::Path;

use zebu_proto::csi::volume_capability::access_mode::Mode;
use zebu_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use zebu_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use zebu_proto::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest,
    ListSnapshotsRequest, ListVolumesRequest, NodeExpandVolumeRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
    VolumeContentSource,
};

use super::args::CreateArgs;
use super::state::{Access, Attachment};
use zebu_common::context::{PARAM_FSTYPE, PARAM_REPLICAS};

/// Entries asked for per page of ListVolumes / ListSnapshots.
pub const PAGE_SIZE: i32 = 256;

/// A capability for one writer on one node, mounted with `fs_type` (empty:
/// the driver's default) or as a raw block device.
pub fn capability(access: &Access) -> VolumeCapability {
    let access_type = match access {
        Access::Mount { fs_type } => AccessType::Mount(MountVolume {
            fs_type: fs_type.clone(),
            ..Default::default()
        }),
        Access::Block => AccessType::Block(BlockVolume {}),
    };
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(access_type),
    }
}

/// Bytes as CSI carries them (signed; sizes are validated at parse time).
fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// CreateVolume for `zebu volume create`.
pub fn create_volume(a: &CreateArgs) -> CreateVolumeRequest {
    let mut parameters = HashMap::new();
    parameters.insert(PARAM_REPLICAS.to_owned(), a.replicas.to_string());
    let fs_type = a.fstype.map(|f| f.as_str().to_owned()).unwrap_or_default();
    if !fs_type.is_empty() {
        parameters.insert(PARAM_FSTYPE.to_owned(), fs_type.clone());
    }
    let access = if a.block {
        Access::Block
    } else {
        Access::Mount { fs_type }
    };
    let source = match (&a.from_snapshot, &a.clone_of) {
        (Some(s), _) => Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: s.clone(),
        })),
        (None, Some(v)) => Some(SourceType::Volume(VolumeSource {
            volume_id: v.clone(),
        })),
        (None, None) => None,
    };
    CreateVolumeRequest {
        name: a.name.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes(a.size),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(&access)],
        parameters,
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    }
}

/// ListVolumes, one page from `token`.
pub fn list_volumes(token: String) -> ListVolumesRequest {
    ListVolumesRequest {
        max_entries: PAGE_SIZE,
        starting_token: token,
    }
}

/// ListSnapshots, one page from `token`, of one volume or of all.
pub fn list_snapshots(volume: Option<&str>, token: String) -> ListSnapshotsRequest {
    ListSnapshotsRequest {
        max_entries: PAGE_SIZE,
        starting_token: token,
        source_volume_id: volume.unwrap_or_default().to_owned(),
        ..Default::default()
    }
}

/// CreateSnapshot of `volume` named `name`.
pub fn create_snapshot(name: &str, volume: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: volume.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

/// ControllerExpandVolume to `size` bytes; the capability is passed when the
/// volume is attached through this CLI.
pub fn controller_expand(
    id: &str,
    size: u64,
    att: Option<&Attachment>,
) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes(size),
            limit_bytes: 0,
        }),
        volume_capability: att.map(|a| capability(&a.access)),
        ..Default::default()
    }
}

/// NodeExpandVolume for an attachment.
pub fn node_expand(att: &Attachment, size: u64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: att.volume_id.clone(),
        volume_path: path(&att.target),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes(size),
            limit_bytes: 0,
        }),
        staging_target_path: att.staging.as_deref().map(path).unwrap_or_default(),
        volume_capability: Some(capability(&att.access)),
        ..Default::default()
    }
}

/// ControllerPublishVolume for an attachment.
pub fn controller_publish(att: &Attachment) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: att.volume_id.clone(),
        node_id: att.node_id.clone(),
        volume_capability: Some(capability(&att.access)),
        readonly: att.read_only,
        volume_context: att.volume_context.clone().into_iter().collect(),
        ..Default::default()
    }
}

/// ControllerUnpublishVolume for an attachment.
pub fn controller_unpublish(att: &Attachment) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: att.volume_id.clone(),
        node_id: att.node_id.clone(),
        ..Default::default()
    }
}

/// NodeStageVolume for an attachment (which has a staging path).
pub fn node_stage(att: &Attachment) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: att.volume_id.clone(),
        publish_context: att.publish_context.clone().into_iter().collect(),
        staging_target_path: att.staging.as_deref().map(path).unwrap_or_default(),
        volume_capability: Some(capability(&att.access)),
        volume_context: att.volume_context.clone().into_iter().collect(),
        ..Default::default()
    }
}

/// NodeUnstageVolume for an attachment.
pub fn node_unstage(att: &Attachment) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: att.volume_id.clone(),
        staging_target_path: att.staging.as_deref().map(path).unwrap_or_default(),
    }
}

/// NodePublishVolume for an attachment.
pub fn node_publish(att: &Attachment) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: att.volume_id.clone(),
        publish_context: att.publish_context.clone().into_iter().collect(),
        staging_target_path: att.staging.as_deref().map(path).unwrap_or_default(),
        target_path: path(&att.target),
        volume_capability: Some(capability(&att.access)),
        readonly: att.read_only,
        volume_context: att.volume_context.clone().into_iter().collect(),
        ..Default::default()
    }
}

/// NodeUnpublishVolume for an attachment.
pub fn node_unpublish(att: &Attachment) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: att.volume_id.clone(),
        target_path: path(&att.target),
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command, VolumeCmd};
    use clap::Parser;

    fn create(argv: &[&str]) -> CreateVolumeRequest {
        let mut full = vec!["zebu", "volume", "create"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Volume(VolumeCmd::Create(a)) => create_volume(&a),
            other => panic!("{other:?}"),
        }
    }

    fn mount_cap(fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })),
        }
    }

    #[test]
    fn create_volume_defaults() {
        let r = create(&["data", "--size", "1G"]);
        assert_eq!(
            r,
            CreateVolumeRequest {
                name: "data".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 30,
                    limit_bytes: 0
                }),
                volume_capabilities: vec![mount_cap("")],
                parameters: HashMap::from([("numberOfReplicas".into(), "3".into())]),
                ..Default::default()
            }
        );
    }

    #[test]
    fn create_volume_with_fstype_and_replicas() {
        let r = create(&[
            "data",
            "--size",
            "512M",
            "--replicas",
            "2",
            "--fstype",
            "xfs",
        ]);
        assert_eq!(r.capacity_range.unwrap().required_bytes, 512 << 20);
        assert_eq!(r.volume_capabilities, vec![mount_cap("xfs")]);
        assert_eq!(
            r.parameters,
            HashMap::from([
                ("numberOfReplicas".into(), "2".into()),
                ("csi.storage.k8s.io/fstype".into(), "xfs".into()),
            ])
        );
        assert_eq!(r.volume_content_source, None);
    }

    #[test]
    fn create_block_volume_from_snapshot() {
        let r = create(&[
            "raw",
            "--size",
            "10G",
            "--block",
            "--from-snapshot",
            "snap-1",
        ]);
        assert_eq!(
            r.volume_capabilities,
            vec![VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32
                }),
                access_type: Some(AccessType::Block(BlockVolume {})),
            }]
        );
        assert!(!r.parameters.contains_key(PARAM_FSTYPE));
        assert_eq!(
            r.volume_content_source,
            Some(VolumeContentSource {
                r#type: Some(SourceType::Snapshot(SnapshotSource {
                    snapshot_id: "snap-1".into()
                }))
            })
        );
    }

    #[test]
    fn create_clone() {
        let r = create(&["copy", "--size", "1G", "--clone-of", "vol-7"]);
        assert_eq!(
            r.volume_content_source,
            Some(VolumeContentSource {
                r#type: Some(SourceType::Volume(VolumeSource {
                    volume_id: "vol-7".into()
                }))
            })
        );
    }

    fn attachment(access: Access, staged: bool) -> Attachment {
        Attachment {
            volume_id: "vol-1".into(),
            node_id: "node-a".into(),
            access,
            target: "/mnt/data".into(),
            staging: staged.then(|| "/var/lib/zebu/cli/staging/vol-1".into()),
            read_only: true,
            controller_published: true,
            publish_context: [(
                "zebu.csi.dev/nbd-uri".to_owned(),
                "nbd+unix:///?socket=/x".to_owned(),
            )]
            .into(),
            volume_context: [("zebu.csi.dev/replicas".to_owned(), "3".to_owned())].into(),
            complete: false,
        }
    }

    #[test]
    fn attach_requests_carry_paths_and_contexts() {
        let att = attachment(
            Access::Mount {
                fs_type: "ext4".into(),
            },
            true,
        );
        let p = controller_publish(&att);
        assert_eq!(p.volume_id, "vol-1");
        assert_eq!(p.node_id, "node-a");
        assert!(p.readonly);
        assert_eq!(p.volume_capability, Some(mount_cap("ext4")));
        let s = node_stage(&att);
        assert_eq!(s.staging_target_path, "/var/lib/zebu/cli/staging/vol-1");
        assert_eq!(
            s.publish_context["zebu.csi.dev/nbd-uri"],
            "nbd+unix:///?socket=/x"
        );
        assert_eq!(s.volume_context["zebu.csi.dev/replicas"], "3");
        let n = node_publish(&att);
        assert_eq!(n.target_path, "/mnt/data");
        assert_eq!(n.staging_target_path, "/var/lib/zebu/cli/staging/vol-1");
        assert!(n.readonly);
        assert_eq!(node_unpublish(&att).target_path, "/mnt/data");
        assert_eq!(
            node_unstage(&att).staging_target_path,
            "/var/lib/zebu/cli/staging/vol-1"
        );
        assert_eq!(controller_unpublish(&att).node_id, "node-a");
        let e = node_expand(&att, 2 << 30);
        assert_eq!(e.volume_path, "/mnt/data");
        assert_eq!(e.capacity_range.unwrap().required_bytes, 2 << 30);
    }

    #[test]
    fn unstaged_block_attachment_has_no_staging_path() {
        let att = attachment(Access::Block, false);
        let n = node_publish(&att);
        assert_eq!(n.staging_target_path, "");
        assert!(matches!(
            n.volume_capability.unwrap().access_type,
            Some(AccessType::Block(_))
        ));
    }

    #[test]
    fn list_requests_page() {
        let r = list_volumes("t1".into());
        assert_eq!(r.starting_token, "t1");
        assert_eq!(r.max_entries, PAGE_SIZE);
        let r = list_snapshots(Some("vol-1"), String::new());
        assert_eq!(r.source_volume_id, "vol-1");
        assert_eq!(list_snapshots(None, String::new()).source_volume_id, "");
        let r = create_snapshot("s1", "vol-1");
        assert_eq!(
            (r.name.as_str(), r.source_volume_id.as_str()),
            ("s1", "vol-1")
        );
        let r = controller_expand("vol-1", 3 << 30, None);
        assert_eq!(r.capacity_range.unwrap().required_bytes, 3 << 30);
        assert_eq!(r.volume_capability, None);
    }
}
