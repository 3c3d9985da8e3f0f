//! The driver connection: the three CSI services over one channel, every
//! call bounded by the timeout and failures mapped to [`RpcError`].

use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Response, Status};
use zebu_proto::MAX_MESSAGE_BYTES;
use zebu_proto::csi::controller_client::ControllerClient;
use zebu_proto::csi::identity_client::IdentityClient;
use zebu_proto::csi::node_client::NodeClient;
use zebu_proto::engine::engine_client::EngineClient;

use super::error::{Call, RpcError, Subject, connect_message};

/// A connection to the Zebu driver.
#[derive(Clone)]
pub struct Driver {
    endpoint: String,
    timeout: Duration,
    /// Identity service.
    pub identity: IdentityClient<Channel>,
    /// Controller service.
    pub controller: ControllerClient<Channel>,
    /// Node service.
    pub node: NodeClient<Channel>,
}

impl Driver {
    /// Dials the driver at `endpoint`.
    pub async fn connect(endpoint: &str, timeout: Duration) -> anyhow::Result<Driver> {
        let channel = dial(endpoint, &Subject::Driver, timeout).await?;
        Ok(Driver {
            endpoint: endpoint.to_owned(),
            timeout,
            identity: IdentityClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            controller: ControllerClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            node: NodeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// The endpoint dialled.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs one RPC, bounded by the timeout, and maps its failure.
    pub async fn call<T>(
        &self,
        call: Call,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, RpcError> {
        bounded(&self.endpoint, self.timeout, call, fut).await
    }

    /// Dials a volume's engine control API at `addr` (`host:port`).
    pub async fn engine(&self, addr: &str) -> anyhow::Result<EngineClient<Channel>> {
        let channel = dial(addr, &Subject::Engine(addr.to_owned()), self.timeout).await?;
        Ok(EngineClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Runs one engine RPC, bounded by the timeout.
    pub async fn engine_call<T>(
        &self,
        addr: &str,
        op: &'static str,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, RpcError> {
        let call = Call::new(op, Subject::Engine(addr.to_owned()));
        bounded(addr, self.timeout, call, fut).await
    }
}

async fn dial(endpoint: &str, what: &Subject, timeout: Duration) -> anyhow::Result<Channel> {
    match tokio::time::timeout(timeout, zebu_common::grpc::connect(endpoint)).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(anyhow::anyhow!(connect_message(endpoint, what, &e))),
        Err(_) => Err(anyhow::anyhow!(
            "cannot reach {what} at {endpoint}: no answer within {}s",
            timeout.as_secs()
        )),
    }
}

async fn bounded<T>(
    endpoint: &str,
    timeout: Duration,
    call: Call,
    fut: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, RpcError> {
    let status = match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => return Ok(r.into_inner()),
        Ok(Err(s)) => s,
        Err(_) => Status::deadline_exceeded(format!("no reply within {}s", timeout.as_secs())),
    };
    Err(RpcError {
        endpoint: endpoint.to_owned(),
        call,
        status,
    })
}
