//! Connections from the engine to one replica: a gRPC channel for control
//! calls and one long-lived bidirectional data stream.
//!
//! Requests handed to a [`DataLink`] are queued without blocking; the
//! request body of the stream ([`crate::batch::BatchBody`]) gathers whatever
//! is queued into one `IoBatch` message when the HTTP/2 connection polls it,
//! so a burst of requests costs one HTTP/2 message and no task sits between
//! the caller and the connection. The stream is opened on the channel
//! directly (not through the generated client) so that the body can hand
//! large payloads to the connection without copying them. Replies are
//! decoded from the response frames in place (`zebu_proto::wire`: a read
//! payload stays a slice of the frame that carried it) and handed to a
//! callback in the order the replica completes them.
//!
//! Invariant: when the stream ends or breaks, the callback's `broken` is
//! called exactly once, after the last reply was delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::batch::BatchBody;

use zebu_proto::replica as pb;
use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_proto::wire;

/// Limit for control calls whose work grows with the data (merge, sync).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Errors of replica connections.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
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
    /// Its channel, for the data stream.
    channel: Channel,
    /// Limit for each control call.
    pub timeout: Duration,
}

impl Control {
    /// Connects to `addr` (`HOST:PORT`).
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Control, LinkError> {
        let endpoint =
            zebu_proto::replica_endpoint(addr, timeout).map_err(|reason| LinkError::Address {
                addr: addr.into(),
                reason,
            })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| LinkError::Connect {
                addr: addr.into(),
                source,
            })?;
        let client = ReplicaClient::new(channel.clone())
            .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES);
        Ok(Control {
            addr: addr.into(),
            client,
            channel,
            timeout,
        })
    }

    /// Runs a unary call with the control timeout and turns failures into
    /// [`LinkError`]s naming the replica and `what`.
    pub async fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(ReplicaClient<Channel>) -> F,
    ) -> Result<T, LinkError>
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
    ) -> Result<T, LinkError>
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
    ) -> Result<T, LinkError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, f(self.client.clone())).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(LinkError::Call {
                addr: self.addr.clone(),
                what: what.into(),
                status,
            }),
            Err(_) => Err(LinkError::Timeout {
                addr: self.addr.clone(),
                what: what.into(),
                timeout,
            }),
        }
    }

    /// The replica's state.
    pub async fn info(&self) -> Result<pb::ReplicaInfo, LinkError> {
        self.call("reading replica info", |mut c| async move {
            c.info(pb::InfoRequest {}).await
        })
        .await
    }
}

/// Receives what a data stream delivers.
pub trait ReplyHandler: Send + Sync + 'static {
    /// A batch of replies arrived.
    fn replies(&self, responses: Vec<pb::IoResponse>);
    /// The stream ended or broke; no more replies will come.
    fn broken(&self, why: String);
}

/// Starts the `Io` call with `body` as its request stream, as tonic's
/// generated client would, and returns its reply batches, decoded from the
/// response frames in place ([`wire::decode_reply_batch`]); the stream ends
/// with the call's status when that is not OK.
async fn open_stream(
    channel: Channel,
    body: BatchBody,
) -> Result<impl Stream<Item = Result<Vec<pb::IoResponse>, tonic::Status>> + use<>, tonic::Status> {
    const WHAT: &str = "the data stream";
    let response =
        zebu_proto::start_call(channel, wire::IO_PATH, tonic::body::Body::new(body), WHAT).await?;
    Ok(wire::messages(response.into_body(), WHAT, true)
        .map(|m| m.and_then(|m| wire::decode_reply_batch(m).map_err(|e| wire::status(WHAT, e)))))
}

/// The sending half of a data stream.
pub struct DataLink {
    tx: mpsc::UnboundedSender<pb::IoRequest>,
    /// Requests sent and not answered.
    in_flight: Arc<AtomicU64>,
    /// Milliseconds since `start` when the stream last made progress.
    progress_ms: Arc<AtomicU64>,
    start: Instant,
}

impl DataLink {
    /// Opens the data stream on `control`'s channel; replies go to `handler`.
    pub async fn open<H: ReplyHandler>(
        control: &Control,
        handler: Arc<H>,
    ) -> Result<DataLink, LinkError> {
        let (tx, rx) = mpsc::unbounded_channel::<pb::IoRequest>();
        let call = open_stream(control.channel.clone(), BatchBody::new(rx));
        let inbound = match tokio::time::timeout(control.timeout, call).await {
            Ok(Ok(inbound)) => inbound,
            Ok(Err(status)) => {
                return Err(LinkError::Call {
                    addr: control.addr.clone(),
                    what: "opening the data stream".into(),
                    status,
                });
            }
            Err(_) => {
                return Err(LinkError::Timeout {
                    addr: control.addr.clone(),
                    what: "opening the data stream".into(),
                    timeout: control.timeout,
                });
            }
        };
        let in_flight = Arc::new(AtomicU64::new(0));
        let progress_ms = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        // Receiver: hand replies over; report the end once.
        let (fl, pr) = (in_flight.clone(), progress_ms.clone());
        tokio::spawn(async move {
            let mut inbound = std::pin::pin!(inbound);
            let why = loop {
                match inbound.next().await {
                    Some(Ok(responses)) => {
                        fl.fetch_sub(responses.len() as u64, Ordering::AcqRel);
                        pr.store(start.elapsed().as_millis() as u64, Ordering::Release);
                        handler.replies(responses);
                    }
                    None => break "the replica closed the data stream".to_string(),
                    Some(Err(status)) => break format!("data stream failed: {status}"),
                }
            };
            handler.broken(why);
        });
        Ok(DataLink {
            tx,
            in_flight,
            progress_ms,
            start,
        })
    }

    /// Queues one request; false when the stream is gone.
    pub fn send(&self, req: pb::IoRequest) -> bool {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.progress_ms
                .store(self.start.elapsed().as_millis() as u64, Ordering::Release);
        }
        self.tx.send(req).is_ok()
    }

    /// True when requests are outstanding and nothing came back for `limit`.
    pub fn stalled(&self, limit: Duration) -> bool {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return false;
        }
        let last = self.progress_ms.load(Ordering::Acquire);
        let now = self.start.elapsed().as_millis() as u64;
        now.saturating_sub(last) > limit.as_millis() as u64
    }

    /// Requests outstanding.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }
}
