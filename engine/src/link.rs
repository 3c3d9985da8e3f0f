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
//! Each data stream runs on a TCP connection of its own, opened with
//! `SO_LINGER` 0, and dropping its [`DataLink`] cuts that connection: the
//! socket is shut down and its last close resets it, discarding whatever
//! the kernel still held queued for the replica. An ejected replica's
//! stream therefore cannot deliver requests after the engine gave up on
//! them, even when the link heals later (the replica refuses them anyway:
//! each stream names the session its `Open` started, and a later `Open`
//! supersedes it).
//!
//! Invariant: when the stream ends or breaks, the callback's `broken` is
//! called exactly once, after the last reply was delivered, unless the
//! engine dropped the [`DataLink`] first (it no longer wants to hear).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::batch::BatchBody;
use zebu_replica_client::{ClientError, Control};

use zebu_proto::replica as pb;
use zebu_proto::wire;

/// Receives what a data stream delivers.
pub trait ReplyHandler: Send + Sync + 'static {
    /// A batch of replies arrived.
    fn replies(&self, responses: Vec<pb::IoResponse>);
    /// The stream ended or broke; no more replies will come.
    fn broken(&self, why: String);
}

/// The socket of a data connection, kept to cut the connection at will.
#[derive(Clone, Default)]
struct Severable(Arc<Mutex<Option<std::net::TcpStream>>>);

impl Severable {
    /// Shuts the connection's socket down in both directions (the HTTP/2
    /// connection on it ends at once) and drops this handle to it; with
    /// `SO_LINGER` 0, the socket's last close then resets the connection
    /// and discards what was still queued.
    fn sever(&self) {
        let socket = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Opens a connection of its own to `control`'s replica for one data
/// stream: a channel over a single TCP connection (`SO_LINGER` 0, no
/// Nagle) and the handle that cuts it.
async fn data_channel(control: &Control) -> Result<(Channel, Severable), ClientError> {
    let endpoint =
        zebu_proto::replica_endpoint(&control.addr, control.timeout).map_err(|reason| {
            ClientError::Address {
                addr: control.addr.clone(),
                reason,
            }
        })?;
    let socket = Severable::default();
    let (addr, slot) = (control.addr.clone(), socket.clone());
    let connector = tower::service_fn(move |_: http::Uri| {
        let (addr, slot) = (addr.clone(), slot.clone());
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            stream.set_zero_linger()?;
            let handle = stream.as_fd().try_clone_to_owned()?;
            *slot.0.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::net::TcpStream::from(handle));
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect {
            addr: control.addr.clone(),
            source,
        })?;
    Ok((channel, socket))
}

/// Starts the `Io` call of `session` with `body` as its request stream, as
/// tonic's generated client would, and returns its reply batches, decoded
/// from the response frames in place ([`wire::decode_reply_batch`]); the
/// stream ends with the call's status when that is not OK.
async fn open_stream(
    channel: Channel,
    session: u64,
    body: BatchBody,
) -> Result<impl Stream<Item = Result<Vec<pb::IoResponse>, tonic::Status>> + use<>, tonic::Status> {
    const WHAT: &str = "the data stream";
    let response = zebu_proto::start_call(
        channel,
        wire::IO_PATH,
        &[(wire::SESSION_HEADER, session.to_string())],
        tonic::body::Body::new(body),
        WHAT,
    )
    .await?;
    Ok(wire::messages(response.into_body(), WHAT, true)
        .map(|m| m.and_then(|m| wire::decode_reply_batch(m).map_err(|e| wire::status(WHAT, e)))))
}

/// The sending half of a data stream. Dropping it cuts the stream's
/// connection (see the module docs).
pub struct DataLink {
    tx: mpsc::UnboundedSender<pb::IoRequest>,
    /// Requests sent and not answered.
    in_flight: Arc<AtomicU64>,
    /// Milliseconds since `start` when the stream last made progress.
    progress_ms: Arc<AtomicU64>,
    start: Instant,
    /// The stream's connection.
    socket: Severable,
    /// The task that receives the replies.
    receiver: tokio::task::AbortHandle,
}

impl Drop for DataLink {
    fn drop(&mut self) {
        self.receiver.abort();
        self.socket.sever();
    }
}

impl DataLink {
    /// Opens the data stream of `session` (what the replica's `Open`
    /// returned) on a connection of its own to `control`'s replica; replies
    /// go to `handler`.
    pub async fn open<H: ReplyHandler>(
        control: &Control,
        session: u64,
        handler: Arc<H>,
    ) -> Result<DataLink, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel::<pb::IoRequest>();
        let connected = async {
            let (channel, socket) = data_channel(control).await?;
            let call = open_stream(channel, session, BatchBody::new(rx));
            let stream = call.await.map_err(|status| {
                socket.sever();
                ClientError::Call {
                    addr: control.addr.clone(),
                    what: "opening the data stream".into(),
                    status,
                }
            })?;
            Ok::<_, ClientError>((stream, socket))
        };
        let (inbound, socket) = match tokio::time::timeout(control.timeout, connected).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ClientError::Timeout {
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
        let receiver = tokio::spawn(async move {
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
        })
        .abort_handle();
        Ok(DataLink {
            tx,
            in_flight,
            progress_ms,
            start,
            socket,
            receiver,
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
