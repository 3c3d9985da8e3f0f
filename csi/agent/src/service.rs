//! The `zebu.agent.v1.Agent` gRPC service: a thin layer over [`Agent`]'s
//! methods, mapping [`super::AgentError`] to status codes.

use tonic::{Request, Response, Status};
use zebu_proto::agent as pb;

use super::Agent;

/// The tonic implementation of the `Agent` service (see [`Agent::service`]).
#[derive(Clone, Debug)]
pub struct AgentService {
    agent: Agent,
}

impl AgentService {
    /// Serves `agent`.
    pub fn new(agent: Agent) -> AgentService {
        AgentService { agent }
    }
}

/// Maps an agent error to a status, logging the failures that are the
/// node's (a bad request is the caller's to report).
fn status(rpc: &str, e: super::AgentError) -> Status {
    let s = Status::from(e);
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists => {
            tracing::debug!(rpc, error = %s.message(), "request refused")
        }
        _ => tracing::warn!(rpc, code = ?s.code(), error = %s.message(), "request failed"),
    }
    s
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn get_node(
        &self,
        _req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        self.agent
            .node_info()
            .await
            .map(Response::new)
            .map_err(|e| status("GetNode", e))
    }

    async fn create_replica(
        &self,
        req: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::ReplicaProcess>, Status> {
        self.agent
            .create_replica(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status("CreateReplica", e))
    }

    async fn delete_replica(
        &self,
        req: Request<pb::DeleteReplicaRequest>,
    ) -> Result<Response<pb::DeleteReplicaResponse>, Status> {
        self.agent
            .delete_replica(req.into_inner())
            .await
            .map(|()| Response::new(pb::DeleteReplicaResponse {}))
            .map_err(|e| status("DeleteReplica", e))
    }

    async fn list_replicas(
        &self,
        _req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.agent
            .list_replicas()
            .await
            .map(Response::new)
            .map_err(|e| status("ListReplicas", e))
    }

    async fn start_engine(
        &self,
        req: Request<pb::StartEngineRequest>,
    ) -> Result<Response<pb::EngineProcess>, Status> {
        self.agent
            .start_engine(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status("StartEngine", e))
    }

    async fn stop_engine(
        &self,
        req: Request<pb::StopEngineRequest>,
    ) -> Result<Response<pb::StopEngineResponse>, Status> {
        self.agent
            .stop_engine(req.into_inner())
            .await
            .map(|()| Response::new(pb::StopEngineResponse {}))
            .map_err(|e| status("StopEngine", e))
    }

    async fn list_engines(
        &self,
        _req: Request<pb::ListEnginesRequest>,
    ) -> Result<Response<pb::ListEnginesResponse>, Status> {
        self.agent
            .list_engines()
            .await
            .map(Response::new)
            .map_err(|e| status("ListEngines", e))
    }
}
