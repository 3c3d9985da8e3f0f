//! What the driver offers, of what the CLI uses: the Node service's and the
//! Controller service's capabilities.

use zebu_proto::csi::controller_service_capability::rpc::Type as CtrlRpc;
use zebu_proto::csi::node_service_capability::rpc::Type as NodeRpc;
use zebu_proto::csi::{
    ControllerGetCapabilitiesRequest, NodeGetCapabilitiesRequest, controller_service_capability,
    node_service_capability,
};

use super::driver::Driver;
use super::error::{Call, Subject};

/// What the Node service offers, of what the CLI uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCaps {
    /// STAGE_UNSTAGE_VOLUME: NodeStageVolume is called before NodePublishVolume.
    pub stage: bool,
    /// EXPAND_VOLUME: NodeExpandVolume grows the volume on the node.
    pub expand: bool,
}

/// NodeGetCapabilities.
pub async fn node_caps(d: &Driver) -> anyhow::Result<NodeCaps> {
    let r = d
        .call(
            Call::new("NodeGetCapabilities", Subject::Driver),
            d.node
                .clone()
                .node_get_capabilities(NodeGetCapabilitiesRequest {}),
        )
        .await?;
    let mut caps = NodeCaps::default();
    for c in r.capabilities {
        if let Some(node_service_capability::Type::Rpc(rpc)) = c.r#type {
            match NodeRpc::try_from(rpc.r#type) {
                Ok(NodeRpc::StageUnstageVolume) => caps.stage = true,
                Ok(NodeRpc::ExpandVolume) => caps.expand = true,
                _ => {}
            }
        }
    }
    Ok(caps)
}

/// Whether the Controller service does ControllerPublishVolume
/// (PUBLISH_UNPUBLISH_VOLUME).
pub async fn controller_publishes(d: &Driver) -> anyhow::Result<bool> {
    let r = d
        .call(
            Call::new("ControllerGetCapabilities", Subject::Driver),
            d.controller
                .clone()
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {}),
        )
        .await?;
    Ok(r.capabilities.iter().any(|c| {
        matches!(
            c.r#type,
            Some(controller_service_capability::Type::Rpc(rpc))
                if rpc.r#type == CtrlRpc::PublishUnpublishVolume as i32
        )
    }))
}
