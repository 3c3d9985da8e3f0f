//! The node registry: node agents announce themselves to the controller.
//!
//! Each agent calls `Heartbeat` at start and then periodically with its
//! address and disks; the controller records a [`NodeRecord`] per node. The
//! registry is served next to CSI on the controller's Unix socket (and called
//! in-process in standalone mode), so joining a controller needs nothing but
//! its socket path.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zebu_proto::agent as apb;

use crate::controller::store_status;
use crate::store::{DiskRecord, NodeRecord, Store, StoreError};

/// The Registry service.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
}

impl Registry {
    /// A registry writing to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Registry { store }
    }

    /// Records (creates or refreshes) the node described by `info`.
    pub fn record(&self, info: &apb::NodeInfo) -> Result<(), Status> {
        if info.node_id.is_empty() || info.agent_address.is_empty() {
            return Err(Status::invalid_argument(
                "a heartbeat needs node_id and agent_address",
            ));
        }
        let rec = NodeRecord {
            node_id: info.node_id.clone(),
            address: info.agent_address.clone(),
            disks: info
                .disks
                .iter()
                .map(|d| DiskRecord {
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    free_bytes: d.available_bytes,
                })
                .collect(),
            last_heartbeat_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        for _ in 0..8 {
            let cur = self.store.get_node(&rec.node_id).map_err(store_status)?;
            match self.store.put_node(&rec, cur.map(|c| c.version)) {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_status(e)),
            }
        }
        Err(Status::aborted(format!(
            "node {} was updated concurrently; the next heartbeat retries",
            rec.node_id
        )))
    }
}

#[tonic::async_trait]
impl apb::registry_server::Registry for Registry {
    async fn heartbeat(
        &self,
        r: Request<apb::NodeInfo>,
    ) -> Result<Response<apb::HeartbeatResponse>, Status> {
        self.record(&r.into_inner())?;
        Ok(Response::new(apb::HeartbeatResponse {}))
    }
}
