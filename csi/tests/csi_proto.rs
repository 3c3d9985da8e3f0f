//! Pins the CSI v1 wire format: field numbers, wire types, enum values and
//! gRPC names must match the published spec or Kubernetes cannot talk to the
//! driver. The byte strings below are written out by hand from the spec's
//! field numbers, not produced by the code under test.

use std::collections::HashMap;

use prost::Message;
use zebu_proto::csi::{
    CapacityRange, ControllerServiceCapability, CreateVolumeRequest, NodePublishVolumeRequest,
    NodeServiceCapability, NodeStageVolumeRequest, PluginCapability, Volume, VolumeCapability,
    VolumeContentSource, controller_server, controller_service_capability, identity_server,
    node_server, node_service_capability, plugin_capability,
    volume_capability::{self, AccessMode, MountVolume, access_mode::Mode},
    volume_content_source,
};

fn mount_capability(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// `CreateVolumeRequest`: name=1, capacity_range=2, volume_capabilities=3.
#[test]
fn create_volume_request_bytes() {
    let req = CreateVolumeRequest {
        name: "pvc-1".to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability("ext4", Mode::SingleNodeWriter)],
        ..Default::default()
    };
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x0a, 5, b'p', b'v', b'c', b'-', b'1',          // 1: name, length-delimited
        0x12, 6,                                        // 2: capacity_range
            0x08, 0x80, 0x80, 0x80, 0x80, 0x04,         //   1: required_bytes = 2^30 (varint)
        0x1a, 12,                                       // 3: volume_capabilities[0]
            0x12, 6,                                    //   2: mount (oneof access_type)
                0x0a, 4, b'e', b'x', b't', b'4',        //     1: fs_type
            0x1a, 2,                                    //   3: access_mode
                0x08, 0x01,                             //     1: mode = SINGLE_NODE_WRITER
    ];
    assert_eq!(req.encode_to_vec(), want);
    assert_eq!(CreateVolumeRequest::decode(want).unwrap(), req);
}

/// `CreateVolumeRequest`: parameters=4, secrets=5, volume_content_source=6,
/// mutable_parameters=8; maps are repeated {key=1, value=2} entries.
#[test]
fn create_volume_request_maps_and_source() {
    let one = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
    let req = CreateVolumeRequest {
        parameters: one("r", "3"),
        secrets: one("k", "s"),
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: "s".to_owned(),
                },
            )),
        }),
        mutable_parameters: one("iops", "100"),
        ..Default::default()
    };
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x22, 6, 0x0a, 1, b'r', 0x12, 1, b'3',          // 4: parameters
        0x2a, 6, 0x0a, 1, b'k', 0x12, 1, b's',          // 5: secrets
        0x32, 5, 0x0a, 3, 0x0a, 1, b's',                // 6: source { 1: snapshot { 1: id } }
        0x42, 11, 0x0a, 4, b'i', b'o', b'p', b's',      // 8: mutable_parameters
                  0x12, 3, b'1', b'0', b'0',
    ];
    assert_eq!(req.encode_to_vec(), want);
    assert_eq!(CreateVolumeRequest::decode(want).unwrap(), req);
}

/// `Volume`: capacity_bytes=1, volume_id=2, content_source=4.
#[test]
fn volume_bytes() {
    let vol = Volume {
        capacity_bytes: 300,
        volume_id: "v".to_owned(),
        content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(
                volume_content_source::VolumeSource {
                    volume_id: "w".to_owned(),
                },
            )),
        }),
        ..Default::default()
    };
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x08, 0xac, 0x02,                               // 1: capacity_bytes = 300
        0x12, 1, b'v',                                  // 2: volume_id
        0x22, 5, 0x12, 3, 0x0a, 1, b'w',                // 4: source { 2: volume { 1: id } }
    ];
    assert_eq!(vol.encode_to_vec(), want);
}

/// `NodeStageVolumeRequest`: volume_id=1, publish_context=2,
/// staging_target_path=3, volume_capability=4, volume_context=6.
#[test]
fn node_stage_volume_request_bytes() {
    let req = NodeStageVolumeRequest {
        volume_id: "vol-1".to_owned(),
        publish_context: HashMap::from([("e".to_owned(), "x".to_owned())]),
        staging_target_path: "/stage".to_owned(),
        volume_capability: Some(mount_capability("xfs", Mode::SingleNodeWriter)),
        secrets: HashMap::new(),
        volume_context: HashMap::from([("c".to_owned(), "y".to_owned())]),
    };
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x0a, 5, b'v', b'o', b'l', b'-', b'1',          // 1: volume_id
        0x12, 6, 0x0a, 1, b'e', 0x12, 1, b'x',          // 2: publish_context
        0x1a, 6, b'/', b's', b't', b'a', b'g', b'e',    // 3: staging_target_path
        0x22, 11,                                       // 4: volume_capability
            0x12, 5, 0x0a, 3, b'x', b'f', b's',         //   2: mount { 1: fs_type }
            0x1a, 2, 0x08, 0x01,                        //   3: access_mode
        0x32, 6, 0x0a, 1, b'c', 0x12, 1, b'y',          // 6: volume_context
    ];
    assert_eq!(req.encode_to_vec(), want);
    assert_eq!(NodeStageVolumeRequest::decode(want).unwrap(), req);
}

/// Decodes what a CO would send for NodePublishVolume with a block volume:
/// target_path=4, volume_capability=5 (block=1), readonly=6, secrets=7.
#[test]
fn node_publish_volume_request_decodes() {
    #[rustfmt::skip]
    let wire: &[u8] = &[
        0x0a, 1, b'v',                                  // 1: volume_id
        0x1a, 2, b'/', b's',                            // 3: staging_target_path
        0x22, 2, b'/', b't',                            // 4: target_path
        0x2a, 6, 0x0a, 0, 0x1a, 2, 0x08, 0x05,          // 5: { 1: block {}, 3: { mode: 5 } }
        0x30, 0x01,                                     // 6: readonly = true
        0x3a, 6, 0x0a, 1, b'k', 0x12, 1, b's',          // 7: secrets
    ];
    let req = NodePublishVolumeRequest::decode(wire).unwrap();
    assert_eq!(req.volume_id, "v");
    assert_eq!(req.staging_target_path, "/s");
    assert_eq!(req.target_path, "/t");
    assert!(req.readonly);
    assert_eq!(req.secrets.get("k").map(String::as_str), Some("s"));
    let cap = req.volume_capability.unwrap();
    assert!(matches!(
        cap.access_type,
        Some(volume_capability::AccessType::Block(_))
    ));
    assert_eq!(cap.access_mode.unwrap().mode(), Mode::MultiNodeMultiWriter);
}

#[test]
fn enum_values_match_the_spec() {
    assert_eq!(Mode::SingleNodeWriter as i32, 1);
    assert_eq!(Mode::MultiNodeMultiWriter as i32, 5);
    assert_eq!(Mode::SingleNodeSingleWriter as i32, 6);
    assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
    use controller_service_capability::rpc::Type as C;
    assert_eq!(C::CreateDeleteVolume as i32, 1);
    assert_eq!(C::PublishUnpublishVolume as i32, 2);
    assert_eq!(C::CreateDeleteSnapshot as i32, 5);
    assert_eq!(C::CloneVolume as i32, 7);
    assert_eq!(C::ExpandVolume as i32, 9);
    assert_eq!(C::ModifyVolume as i32, 14);
    assert_eq!(C::GetSnapshot as i32, 15);
    assert_eq!(C::ModifyVolume.as_str_name(), "MODIFY_VOLUME");
    use node_service_capability::rpc::Type as N;
    assert_eq!(N::StageUnstageVolume as i32, 1);
    assert_eq!(N::GetVolumeStats as i32, 2);
    assert_eq!(N::ExpandVolume as i32, 3);
    assert_eq!(N::VolumeMountGroup as i32, 6);
    use plugin_capability::service::Type as P;
    assert_eq!(P::ControllerService as i32, 1);
    assert_eq!(P::VolumeAccessibilityConstraints as i32, 2);
    assert_eq!(P::GroupControllerService as i32, 3);
    // Capability oneofs: rpc / service are field 1.
    let cap = ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: C::CreateDeleteVolume as i32,
            },
        )),
    };
    assert_eq!(cap.encode_to_vec(), [0x0a, 2, 0x08, 0x01]);
    let node_cap = NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: N::StageUnstageVolume as i32,
            },
        )),
    };
    assert_eq!(node_cap.encode_to_vec(), [0x0a, 2, 0x08, 0x01]);
    let plugin_cap = PluginCapability {
        r#type: Some(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32,
            },
        )),
    };
    assert_eq!(plugin_cap.encode_to_vec(), [0x12, 2, 0x08, 0x01]);
}

#[test]
fn grpc_service_names_match_the_spec() {
    assert_eq!(identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(controller_server::SERVICE_NAME, "csi.v1.Controller");
    assert_eq!(node_server::SERVICE_NAME, "csi.v1.Node");
}
