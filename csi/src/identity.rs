//! CSI Identity service: who the driver is and whether it is ready.
//!
//! Every process (controller, node, standalone) describes the same plugin:
//! CSI's capabilities belong to the plugin as a whole, not to the process
//! answering, so a node plugin also names the Controller service (which its
//! controller serves elsewhere). Which process serves which service is the
//! deployment's business: the CO calls Controller RPCs on the controller's
//! socket and Node RPCs on each node's.
//!
//! `Probe` reports ready only once the process has its state store open and
//! its node agent serving (the [`Readiness`] flag is raised by `main` after
//! both are up), so a sidecar never sends work to a half-started plugin.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::{Request, Response, Status};
use zebu_proto::csi as pb;
use zebu_proto::csi::plugin_capability::{self, service, volume_expansion};

use zebu_common::context::DRIVER_NAME;

/// Shared "everything is up" flag read by `Probe`.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the plugin ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether the plugin is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The Identity service.
#[derive(Clone, Debug)]
pub struct IdentityService {
    readiness: Readiness,
}

impl IdentityService {
    /// Probe answers what `readiness` says.
    pub fn new(readiness: Readiness) -> Self {
        IdentityService { readiness }
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _r: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let capabilities = vec![
            pb::PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            },
            pb::PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: service::Type::ControllerService as i32,
                    },
                )),
            },
        ];
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _r: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.readiness.is_ready()),
        }))
    }
}
