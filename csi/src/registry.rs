//! The node registry: node agents announce themselves to the controller.
//!
//! Each agent calls `Heartbeat` at start and then periodically with its
//! address and disks; the controller records a [`NodeRecord`] per node. The
//! registry is served next to CSI on the controller's Unix socket (and called
//! in-process in standalone mode), so joining a controller needs nothing but
//! its socket path.
//!
//! A heartbeat that changes nothing but the informational fields (the time
//! of the heartbeat, the disks' free bytes) is written at most once a
//! minute ([`REFRESH_SECS`]): every write is fsynced, a cache flush of the
//! controller's disk, and in standalone mode that disk also holds replicas.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zebu_proto::agent as apb;

use crate::controller::store_status;
use crate::store::{DiskRecord, NodeRecord, Store, StoreError};

/// How old a node's record may grow before a heartbeat that changes only its
/// informational fields rewrites it.
pub const REFRESH_SECS: i64 = 60;

/// Whether `new` must replace `stored`: the agent's address or its disks
/// (paths, capacities) changed, or the record is [`REFRESH_SECS`] old (or
/// from the future: the clock went back).
fn needs_write(stored: &NodeRecord, new: &NodeRecord) -> bool {
    let age = new.last_heartbeat_unix - stored.last_heartbeat_unix;
    stored.address != new.address
        || stored.disks.len() != new.disks.len()
        || stored
            .disks
            .iter()
            .zip(&new.disks)
            .any(|(a, b)| a.path != b.path || a.capacity_bytes != b.capacity_bytes)
        || !(0..REFRESH_SECS).contains(&age)
}

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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.record_at(info, now)
    }

    /// [`Registry::record`] at `now_unix`.
    fn record_at(&self, info: &apb::NodeInfo, now_unix: i64) -> Result<(), Status> {
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
            last_heartbeat_unix: now_unix,
        };
        for _ in 0..8 {
            let cur = self.store.get_node(&rec.node_id).map_err(store_status)?;
            if cur.as_ref().is_some_and(|c| !needs_write(&c.value, &rec)) {
                return Ok(());
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn info(address: &str, capacity: u64, available: u64) -> apb::NodeInfo {
        apb::NodeInfo {
            node_id: "n1".into(),
            agent_address: address.into(),
            disks: vec![apb::Disk {
                path: "/disk".into(),
                capacity_bytes: capacity,
                available_bytes: available,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A steady heartbeat rewrites the record once a minute, not every
    /// time; a changed address or disk is written at once.
    #[test]
    fn heartbeats_that_change_nothing_are_written_once_a_minute() {
        let store: Arc<dyn Store> = Arc::new(SledStore::temporary().unwrap());
        let reg = Registry::new(store.clone());
        let version = || store.get_node("n1").unwrap().unwrap().version;
        reg.record_at(&info("a:1", 100, 50), 1000).unwrap();
        let v1 = version();
        // Free space and time move, nothing else: not written.
        reg.record_at(&info("a:1", 100, 40), 1005).unwrap();
        reg.record_at(&info("a:1", 100, 30), 1000 + REFRESH_SECS - 1)
            .unwrap();
        assert_eq!(version(), v1);
        // A minute on, it is.
        reg.record_at(&info("a:1", 100, 30), 1000 + REFRESH_SECS)
            .unwrap();
        let v2 = version();
        assert_ne!(v2, v1);
        let rec = store.get_node("n1").unwrap().unwrap().value;
        assert_eq!(rec.disks[0].free_bytes, 30);
        assert_eq!(rec.last_heartbeat_unix, 1000 + REFRESH_SECS);
        // A new address or a grown disk: written at once.
        reg.record_at(&info("a:2", 100, 30), 1061).unwrap();
        let v3 = version();
        assert_ne!(v3, v2);
        assert_eq!(store.get_node("n1").unwrap().unwrap().value.address, "a:2");
        reg.record_at(&info("a:2", 200, 30), 1062).unwrap();
        assert_ne!(version(), v3);
        // A clock that went back rewrites too.
        let v4 = version();
        reg.record_at(&info("a:2", 200, 30), 900).unwrap();
        assert_ne!(version(), v4);
    }
}
