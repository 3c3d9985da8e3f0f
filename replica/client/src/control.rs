//! The control half of a replica connection: a gRPC client with a time
//! limit on every call and errors that name the replica and what was being
//! done.
//!
//! Invariant: every call is bounded — by the connection's timeout, or by
//! [`LONG_CALL_TIMEOUT`] for calls whose work grows with the data — so a
//! caller never waits forever on a replica that stopped answering.

use std::time::Duration;

use tonic::transport::Channel;

use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;

/// Limit for control calls whose work grows with the data (merge, sync).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Errors of replica connections.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not usable.
    #[error("invalid replica address {addr:?}: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The replica could not be reached.
    #[error("cannot reach replica {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// What failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call failed.
    #[error("replica {addr}: {what}: {status}")]
    Call {
        /// The address.
        addr: String,
        /// What was being done.
        what: String,
        /// The replica's answer.
        status: tonic::Status,
    },
    /// A call did not answer in time.
    #[error("replica {addr}: {what}: no answer within {timeout:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// What was being done.
        what: String,
        /// The limit.
        timeout: Duration,
    },
}

/// A control connection to one replica.
#[derive(Clone, Debug)]
pub struct Control {
    /// `HOST:PORT`.
    pub addr: String,
    /// The gRPC client.
    pub client: ReplicaClient<Channel>,
    /// Limit for each control call.
    pub timeout: Duration,
}

impl Control {
    /// Connects to `addr` (`HOST:PORT`).
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Control, ClientError> {
        let endpoint =
            zebu_proto::replica_endpoint(addr, timeout).map_err(|reason| ClientError::Address {
                addr: addr.into(),
                reason,
            })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.into(),
                source,
            })?;
        let client = ReplicaClient::new(channel)
            .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES);
        Ok(Control {
            addr: addr.into(),
            client,
            timeout,
        })
    }

    /// Runs a unary call with the control timeout and turns failures into
    /// [`ClientError`]s naming the replica and `what`.
    pub async fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(ReplicaClient<Channel>) -> F,
    ) -> Result<T, ClientError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(self.timeout, what, f).await
    }

    /// [`Self::call`] for operations whose duration grows with the data
    /// (merging a snapshot, syncing every layer): bounded by
    /// [`LONG_CALL_TIMEOUT`] instead of the I/O timeout, so a large volume
    /// does not get a healthy replica ejected.
    pub async fn call_long<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(ReplicaClient<Channel>) -> F,
    ) -> Result<T, ClientError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(LONG_CALL_TIMEOUT.max(self.timeout), what, f)
            .await
    }

    /// [`Self::call`] bounded by `timeout` (at least the I/O timeout).
    pub async fn call_within<T, F>(
        &self,
        timeout: Duration,
        what: &str,
        f: impl FnOnce(ReplicaClient<Channel>) -> F,
    ) -> Result<T, ClientError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, f(self.client.clone())).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(ClientError::Call {
                addr: self.addr.clone(),
                what: what.into(),
                status,
            }),
            Err(_) => Err(ClientError::Timeout {
                addr: self.addr.clone(),
                what: what.into(),
                timeout,
            }),
        }
    }

    /// The replica's state.
    pub async fn info(&self) -> Result<pb::ReplicaInfo, ClientError> {
        self.call("reading replica info", |mut c| async move {
            c.info(pb::InfoRequest {}).await
        })
        .await
    }
}
