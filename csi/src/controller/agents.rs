//! Reaching node agents and engines from the controller.
//!
//! Node records in the store give each agent's address; channels are cached
//! per address (tonic reconnects them by itself). Calls carry a deadline so
//! a dead node costs a bounded wait, never a hung CSI call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zebu_common::auth::{Present, Token};
use zebu_proto::agent as apb;
use zebu_proto::agent::agent_client::AgentClient;
use zebu_proto::engine::engine_client::EngineClient;

use crate::store::{ReplicaState, Store, VolumeRecord};
use zebu_common::grpc;

/// Deadline of one agent call (starting a process included).
pub const AGENT_CALL: Duration = Duration::from_secs(120);

/// Deadline of a quick query (listing, status).
pub const SHORT_CALL: Duration = Duration::from_secs(10);

/// A client of one node agent, presenting the controller's token.
pub type AgentConn = AgentClient<InterceptedService<Channel, Present>>;

/// Agent clients by node id.
pub struct Agents {
    store: Arc<dyn Store>,
    channels: Mutex<HashMap<String, Channel>>,
    token: Present,
}

impl Agents {
    /// A pool resolving node ids through `store`, presenting `token` (when
    /// given) on every call.
    pub fn new(store: Arc<dyn Store>, token: Option<Token>) -> Self {
        Agents {
            store,
            channels: Mutex::new(HashMap::new()),
            token: Present(token),
        }
    }

    /// A client for the agent of `node`.
    pub async fn client(&self, node: &str) -> Result<AgentConn, Status> {
        let rec = self
            .store
            .get_node(node)
            .map_err(super::store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "node {node:?} is not known to the controller: its node plugin has not registered"
                ))
            })?;
        let addr = rec.value.address;
        let cached = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .cloned();
        let ch = match cached {
            Some(ch) => ch,
            None => {
                let ch = tokio::time::timeout(Duration::from_secs(10), grpc::connect(&addr))
                    .await
                    .map_err(|_| {
                        Status::unavailable(format!(
                            "node agent of {node} at {addr} did not answer within 10 s"
                        ))
                    })?
                    .map_err(|e| {
                        Status::unavailable(format!("node agent of {node} is unreachable: {e}"))
                    })?;
                self.channels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(addr, ch.clone());
                ch
            }
        };
        Ok(AgentClient::with_interceptor(ch, self.token.clone())
            .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES))
    }

    /// Every replica process the agent of `node` holds.
    pub async fn list_replicas(&self, node: &str) -> Result<Vec<apb::ReplicaProcess>, Status> {
        let mut c = self.client(node).await?;
        let call = c.list_replicas(with_deadline(apb::ListReplicasRequest {}, SHORT_CALL));
        match tokio::time::timeout(SHORT_CALL, call).await {
            Ok(r) => Ok(r?.into_inner().replicas),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node agent of {node} did not list its replicas within {SHORT_CALL:?}"
            ))),
        }
    }

    /// Brings `rec`'s replica addresses up to date with what the agents
    /// report (replicas restarted by their agent listen on a new port).
    /// Returns whether anything changed. Unreachable nodes are left as they
    /// were.
    pub async fn refresh_replicas(&self, rec: &mut VolumeRecord) -> bool {
        let mut changed = false;
        let nodes: Vec<String> = {
            let mut n: Vec<String> = rec.replicas.iter().map(|r| r.node.clone()).collect();
            n.sort();
            n.dedup();
            n
        };
        for node in nodes {
            let Ok(list) = self.list_replicas(&node).await else {
                continue;
            };
            for r in rec.replicas.iter_mut().filter(|r| r.node == node) {
                match list.iter().find(|p| p.replica_id == r.id) {
                    Some(p) if p.running && !p.address.is_empty() => {
                        if r.address != p.address {
                            r.address = p.address.clone();
                            changed = true;
                        }
                        if r.state == ReplicaState::Pending {
                            r.state = ReplicaState::Ready;
                            changed = true;
                        }
                    }
                    _ => {}
                }
            }
        }
        changed
    }
}

/// Dials an engine's control API.
pub async fn engine(addr: &str) -> Result<EngineClient<Channel>, Status> {
    let ch = tokio::time::timeout(Duration::from_secs(10), grpc::connect(addr))
        .await
        .map_err(|_| Status::unavailable(format!("engine at {addr} did not answer within 10 s")))?
        .map_err(|e| Status::unavailable(format!("engine is unreachable: {e}")))?;
    Ok(EngineClient::new(ch))
}

/// Adds a deadline to a request.
pub fn with_deadline<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}
