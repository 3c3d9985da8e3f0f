//! The replica's gRPC service.
//!
//! The data path is one bidirectional stream per client: each inbound batch
//! is split into requests that run concurrently (a `FuturesUnordered` per
//! stream, no task per request); completed responses are gathered into reply
//! batches in completion order.
//!
//! [`ReplicaServer`] serves the `Io` stream itself, below tonic's codec: the
//! request frames are decoded in place by [`zebu_proto::wire`], so a write
//! payload is copied once, from the received frames into its aligned
//! buffer, and a large read payload is sent from the buffer it was read
//! into ([`wire::reply_batch_frames`]). It serves `ReadLayer` (a rebuild's
//! source) below tonic too, so each chunk is sent from its read buffer.
//! Every other method goes to tonic's generated server.
//!
//! Invariant: a failed request gets an error response on the stream and
//! never ends the stream or the process; only a broken transport does, or
//! a later `Open` superseding the stream's session ([`crate::session`]):
//! every request enters the stream's session before it touches the store,
//! and a superseded stream stops reading requests and ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, Stream};
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use zebu_proto::replica as pb;
use zebu_proto::replica::replica_server::Replica;

use crate::buf::AlignedBuf;
use crate::order::Ticket;
use crate::pull;
use crate::session::Superseded;
use crate::status::{io_status_of, status_of};
use crate::store::{LayerStatus, Placement, ReplicaStatus, Store, StoreError};
use zebu_proto::wire;

/// Most requests of one stream executing at once.
const MAX_IN_FLIGHT: usize = 512;
/// Most responses in one reply batch.
const MAX_REPLY_BATCH: usize = 256;

/// The service.
pub struct ReplicaService {
    store: Arc<Store>,
}

impl ReplicaService {
    /// A service over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        ReplicaService { store }
    }

    /// The server to hand to tonic: the `Io` stream served by
    /// [`ReplicaServer`], every other method by tonic's generated server
    /// with Zebu's message limits.
    pub fn into_server(self) -> ReplicaServer {
        let store = self.store.clone();
        ReplicaServer {
            grpc: pb::replica_server::ReplicaServer::new(self)
                .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES),
            store,
        }
    }
}

/// The replica's gRPC server: serves the `Io` stream and `ReadLayer` below
/// tonic's codec (see the module docs) and hands every other call to tonic.
#[derive(Clone)]
pub struct ReplicaServer {
    grpc: pb::replica_server::ReplicaServer<ReplicaService>,
    store: Arc<Store>,
}

impl NamedService for ReplicaServer {
    const NAME: &'static str =
        <pb::replica_server::ReplicaServer<ReplicaService> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for ReplicaServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match req.uri().path() {
            wire::IO_PATH => {
                let store = self.store.clone();
                Box::pin(async move { Ok(serve_io(store, req)) })
            }
            wire::READ_LAYER_PATH => {
                let store = self.store.clone();
                Box::pin(async move { Ok(serve_read_layer(store, req).await) })
            }
            _ => {
                let mut grpc = self.grpc.clone();
                Box::pin(async move { tower::Service::call(&mut grpc, req).await })
            }
        }
    }
}

/// A refusal of `req` if its messages are compressed: the calls served
/// below tonic read them in place.
fn refuse_compressed(req: &http::Request<tonic::body::Body>, what: &str) -> Result<(), Status> {
    let encoding = req
        .headers()
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    if encoding == "identity" {
        return Ok(());
    }
    Err(Status::unimplemented(format!(
        "{what} does not accept {encoding:?}-compressed requests; send them uncompressed"
    )))
}

/// A gRPC response whose body is `messages` (each as its frames, prefix
/// included), then the trailers with the call's status.
fn grpc_response<S>(messages: S) -> http::Response<tonic::body::Body>
where
    S: Stream<Item = Result<Frames, Status>> + Unpin + Send + 'static,
{
    let body = GrpcBody {
        messages,
        queued: Vec::new().into_iter(),
        done: false,
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Serves one `Io` stream: decodes its request frames in place, runs the
/// requests, and answers with the reply batches as gRPC messages.
fn serve_io(
    store: Arc<Store>,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    if let Err(status) = refuse_compressed(&req, "the data stream") {
        return status.into_http();
    }
    let session = match stream_session(req.headers()) {
        Ok(s) => s,
        Err(status) => return status.into_http(),
    };
    let inbound = request_batches(req.into_body());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run_stream(store, session, Box::pin(inbound), tx));
    grpc_response(ReceiverStream::new(rx).map(|batch| {
        wire::reply_batch_frames(&batch?)
            .map_err(|e| Status::internal(format!("encoding a reply batch: {e}")))
    }))
}

/// Serves one `ReadLayer` call: each chunk's message is sent as its fields
/// and then the buffer the chunk was read into
/// ([`wire::layer_data_frames`]), so a rebuild's source does not copy what
/// it sends into an encode buffer (tonic's encoder did, growing the buffer
/// by reallocation: 22% of a rebuild source's samples).
async fn serve_read_layer(
    store: Arc<Store>,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    const WHAT: &str = "the ReadLayer request";
    let chunks = async {
        refuse_compressed(&req, "ReadLayer")?;
        let mut messages = std::pin::pin!(wire::messages(req.into_body(), WHAT, false));
        let message = messages.next().await.ok_or_else(|| {
            Status::invalid_argument("the ReadLayer call ended without its request message")
        })??;
        let r = pb::ReadLayerRequest::decode(message.to_bytes())
            .map_err(|e| Status::invalid_argument(format!("decoding {WHAT}: {e}")))?;
        layer_chunks(&store, &r).await
    };
    match chunks.await {
        Ok(chunks) => grpc_response(chunks.map(|chunk| {
            let (offset, data, crc32) = chunk?;
            let frames = wire::layer_data_frames(offset, crc32, data)
                .map_err(|e| Status::internal(format!("encoding a layer chunk: {e}")))?;
            Ok(frames.into())
        })),
        Err(status) => status.into_http(),
    }
}

/// The chunks `(offset, data, crc32)` a `ReadLayer` call streams.
async fn layer_chunks(
    store: &Arc<Store>,
    r: &pb::ReadLayerRequest,
) -> Result<impl Stream<Item = Result<(u64, Bytes, u32), Status>> + Unpin + Send + use<>, Status> {
    let extents = r.extents.iter().map(|e| (e.offset, e.length)).collect();
    let rx = store
        .read_layer(&r.layer, extents)
        .await
        .map_err(|e| status_of(&e))?;
    Ok(ReceiverStream::new(rx).map(|r| r.map_err(|e| status_of(&e))))
}

/// The data-stream session an `Io` call names in its
/// [`wire::SESSION_HEADER`] header.
fn stream_session(headers: &http::HeaderMap) -> Result<u64, Status> {
    let value = headers.get(wire::SESSION_HEADER).ok_or_else(|| {
        Status::failed_precondition(format!(
            "the data stream must name its session in the {:?} header: call Open and pass \
             the session it returned",
            wire::SESSION_HEADER
        ))
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "the {:?} header must be the session number Open returned, not {value:?}",
                wire::SESSION_HEADER
            ))
        })
}

/// The request batches of an `Io` stream, decoded from its frames as they
/// arrive.
fn request_batches(
    body: tonic::body::Body,
) -> impl Stream<Item = Result<Vec<wire::IoRequest>, Status>> + Send {
    const WHAT: &str = "the data stream";
    wire::messages(body, WHAT, false)
        .map(|m| m.and_then(|m| wire::decode_batch(m).map_err(|e| wire::status(WHAT, e))))
}

/// One gRPC message as the frames to send it in (its prefix first).
type Frames = Vec<Bytes>;

/// A gRPC response body: each message of `messages` as its frames, then
/// the trailers with the call's status: the first error's, or OK once the
/// messages end.
struct GrpcBody<S> {
    messages: S,
    /// The frames of the message being sent that are still to go.
    queued: std::vec::IntoIter<Bytes>,
    done: bool,
}

impl<S> http_body::Body for GrpcBody<S>
where
    S: Stream<Item = Result<Frames, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(frame) = self.queued.next() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(self.messages.poll_next_unpin(cx)) {
                Some(Ok(frames)) => self.queued = frames.into_iter(),
                Some(Err(status)) => return self.finish(status),
                None => return self.finish(Status::ok("")),
            }
        }
    }
}

impl<S> GrpcBody<S> {
    /// The trailers that end the body with `status`.
    fn finish(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            tracing::warn!(error = %e, "a call's status cannot be sent as a trailer");
            let _ = Status::internal("the call failed").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// Runs one request of a data stream of `session`; writes and unmaps come
/// with their ticket (taken when they arrived).
async fn handle(
    store: Arc<Store>,
    session: u64,
    r: wire::IoRequest,
    ticket: Option<Ticket>,
    placement: Placement,
) -> pb::IoResponse {
    let _entered = match store.enter_session(session, r.epoch) {
        Ok(guard) => guard,
        Err(e) => return error_response(&r, &e),
    };
    let op = pb::Op::try_from(r.op);
    let ticket = || ticket.unwrap_or_else(|| store.ticket(r.offset, r.length as u64));
    let result = match op {
        Ok(pb::Op::Read) => store
            .read_verified(r.offset, r.length as u64, r.epoch)
            .await
            .map(Some),
        Ok(pb::Op::Write) => {
            if r.payload.len() != r.length as usize {
                Err(StoreError::InvalidArgument(format!(
                    "write length {} does not match the payload's {} bytes",
                    r.length,
                    r.payload.len()
                )))
            } else {
                let chunks = r.payload.chunks().map(|c| &c[..]);
                let buf = AlignedBuf::copy_from_chunks(chunks, r.payload.len());
                store
                    .write_aligned(
                        ticket(),
                        r.offset,
                        buf,
                        r.crc32,
                        r.epoch,
                        r.revision,
                        placement,
                    )
                    .await
                    .map(|_| None)
            }
        }
        Ok(pb::Op::Unmap) => store
            .unmap_in_order(ticket(), r.offset, r.length as u64, r.epoch)
            .await
            .map(|_| None),
        Ok(pb::Op::Flush) => store.flush(r.epoch).await.map(|_| None),
        Err(_) => Err(StoreError::InvalidArgument(format!(
            "unknown operation {}",
            r.op
        ))),
    };
    match result {
        Ok(read) => {
            // A read's CRC was combined from its blocks' while they were
            // checked against the stored ones; other replies carry none.
            let (payload, crc32) = read.unwrap_or_default();
            pb::IoResponse {
                id: r.id,
                status: pb::IoStatus::IoOk as i32,
                message: String::new(),
                crc32,
                payload,
            }
        }
        Err(e) => error_response(&r, &e),
    }
}

/// The response to a request that failed with `e`.
fn error_response(r: &wire::IoRequest, e: &StoreError) -> pb::IoResponse {
    tracing::debug!(id = r.id, offset = r.offset, error = %e, "I/O request failed");
    pb::IoResponse {
        id: r.id,
        status: io_status_of(e) as i32,
        message: e.to_string(),
        payload: Bytes::new(),
        crc32: 0,
    }
}

/// Runs the requests of one data stream of `session` as they arrive, at
/// most `MAX_IN_FLIGHT` at once, and sends their responses to `tx` in reply
/// batches, in completion order. A stream that cannot be read further ends
/// once the requests already taken have answered; when it failed, its
/// status follows the last reply batch. A stream whose session a later
/// `Open` superseded stops reading and fails the same way (the requests it
/// had taken are refused as they enter the session).
async fn run_stream(
    store: Arc<Store>,
    session: u64,
    mut inbound: Pin<Box<dyn Stream<Item = Result<Vec<wire::IoRequest>, Status>> + Send>>,
    tx: mpsc::Sender<Result<pb::IoReplyBatch, Status>>,
) {
    let _guard = store.stream_guard();
    let mut sessions = store.watch_session();
    if *sessions.borrow() != session {
        // Superseded before it started: end it at once.
        sessions.mark_changed();
    }
    let mut in_flight = FuturesUnordered::new();
    let mut inbound_open = true;
    let mut failed = None;
    loop {
        tokio::select! {
            changed = sessions.changed(), if inbound_open => {
                let current = *sessions.borrow_and_update();
                if changed.is_err() || current != session {
                    let e = StoreError::from(Superseded { got: session, current });
                    tracing::info!(session, current, "a data stream was superseded; ending it");
                    inbound_open = false;
                    failed = Some(status_of(&e));
                }
            }
            msg = inbound.next(), if inbound_open && in_flight.len() < MAX_IN_FLIGHT => {
                match msg {
                    Some(Ok(batch)) => {
                        zebu_proto::awake::touch();
                        let at_rest = batch.len() == 1 && in_flight.is_empty();
                        for r in batch {
                            // A commit's write that is the engine's only
                            // outstanding I/O, arriving at a stream at rest,
                            // may run on this thread (`Placement::HereIfIdle`).
                            let placement = if r.alone && at_rest && store.writing_commits() {
                                Placement::HereIfIdle
                            } else {
                                Placement::Queued
                            };
                            // Writes and unmaps take their place in the
                            // order as they arrive (see `order`).
                            let ticket = matches!(
                                pb::Op::try_from(r.op),
                                Ok(pb::Op::Write | pb::Op::Unmap)
                            )
                            .then(|| store.ticket(r.offset, r.length as u64));
                            in_flight.push(handle(store.clone(), session, r, ticket, placement));
                        }
                    }
                    None => inbound_open = false,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "data stream ended by an error");
                        inbound_open = false;
                        failed = Some(status);
                    }
                }
            }
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                let mut responses = Vec::with_capacity(8);
                responses.push(first);
                while responses.len() < MAX_REPLY_BATCH {
                    match in_flight.next().now_or_never() {
                        Some(Some(r)) => responses.push(r),
                        _ => break,
                    }
                }
                if tx.send(Ok(pb::IoReplyBatch { responses })).await.is_err() {
                    return;
                }
            }
            else => break,
        }
        if !inbound_open && in_flight.is_empty() {
            break;
        }
    }
    if let Some(status) = failed {
        let _ = tx.send(Err(status)).await;
    }
}

fn layer_info(l: &LayerStatus) -> pb::LayerInfo {
    pb::LayerInfo {
        name: l.name.clone(),
        head: l.head,
        allocated_bytes: l.allocated_bytes,
        present_blocks: l.present_blocks,
        user_created: l.user_created,
        created_unix: l.created_unix,
    }
}

/// The protobuf form of a replica status.
pub fn info_of(s: &ReplicaStatus) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        id: s.id.clone(),
        size: s.size,
        block_size: s.block_size,
        chain: s.chain.iter().map(layer_info).collect(),
        epoch: s.epoch,
        revision: s.revision,
        clean: s.clean,
        ejected: s.ejected.clone(),
        io_engine: s.io_engine.to_string(),
        syncing: s.syncing,
        extent_index_bytes: s.extent_index_bytes,
        attached: s.attached,
        last_clean_scrub_unix: s.last_clean_scrub_unix,
        session: s.session,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn reply(r: Result<ReplicaStatus, StoreError>) -> Result<Response<pb::ReplicaInfo>, Status> {
    r.map(|s| Response::new(info_of(&s)))
        .map_err(|e| status_of(&e))
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    type IoStream = ReceiverStream<Result<pb::IoReplyBatch, Status>>;

    async fn io(
        &self,
        request: Request<Streaming<pb::IoBatch>>,
    ) -> Result<Response<Self::IoStream>, Status> {
        let session = stream_session(request.metadata().as_ref())?;
        let inbound = request.into_inner().map(|batch| {
            batch.map(|b| b.requests.into_iter().map(wire::IoRequest::from).collect())
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_stream(
            self.store.clone(),
            session,
            Box::pin(inbound),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn open(
        &self,
        request: Request<pb::OpenRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let epoch = request.into_inner().epoch;
        reply(self.store.open_epoch(epoch).await)
    }

    async fn close(
        &self,
        request: Request<pb::CloseRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.close(r.epoch, r.session).await)
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        Ok(Response::new(info_of(&self.store.status().await)))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(
            self.store
                .snapshot(&r.name, r.user_created, r.epoch, r.session)
                .await,
        )
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let snapshots = self
            .store
            .snapshots()
            .await
            .iter()
            .map(layer_info)
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(
            self.store
                .delete_snapshot(&r.name, r.epoch, r.session)
                .await,
        )
    }

    async fn revert(
        &self,
        request: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.revert(&r.name, r.epoch, r.session).await)
    }

    async fn expand(
        &self,
        request: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.expand(r.size, r.epoch, r.session).await)
    }

    async fn scrub(
        &self,
        request: Request<pb::ScrubRequest>,
    ) -> Result<Response<pb::ScrubResponse>, Status> {
        let r = request.into_inner();
        zebu_proto::size::check_rate(r.max_bytes_per_sec).map_err(Status::invalid_argument)?;
        let report = self
            .store
            .scrub(r.epoch, r.max_bytes_per_sec)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::ScrubResponse {
            blocks_checked: report.blocks_checked,
            corrupt_blocks: report.corrupt_blocks,
            corrupt: report
                .corrupt
                .into_iter()
                .map(|(layer, block)| pb::CorruptBlock { layer, block })
                .collect(),
        }))
    }

    async fn set_ejected(
        &self,
        request: Request<pb::SetEjectedRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.set_ejected(r.ejected, r.epoch, r.session).await)
    }

    type BlockCrcsStream = BoxStream<pb::BlockCrcsChunk>;

    async fn block_crcs(
        &self,
        request: Request<pb::BlockCrcsRequest>,
    ) -> Result<Response<Self::BlockCrcsStream>, Status> {
        let rx = self
            .store
            .block_crcs(&request.into_inner().layer)
            .await
            .map_err(|e| status_of(&e))?;
        let stream = ReceiverStream::new(rx).map(|r| {
            r.map(|(blocks, crcs)| pb::BlockCrcsChunk { blocks, crcs })
                .map_err(|e| status_of(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ReadLayerStream = BoxStream<pb::LayerData>;

    async fn read_layer(
        &self,
        request: Request<pb::ReadLayerRequest>,
    ) -> Result<Response<Self::ReadLayerStream>, Status> {
        let chunks = layer_chunks(&self.store, &request.into_inner()).await?;
        let stream = chunks.map(|r| {
            r.map(|(offset, data, crc32)| pb::LayerData {
                offset,
                crc32,
                data,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_layer(
        &self,
        request: Request<Streaming<pb::LayerData>>,
    ) -> Result<Response<pb::WriteLayerResponse>, Status> {
        let inbound = request.into_inner().map(|m| m.map(wire::LayerData::from));
        let totals = pull::apply(&self.store, None, inbound, |_| ()).await?;
        Ok(Response::new(pb::WriteLayerResponse {
            blocks_written: totals.blocks_written,
            blocks_punched: totals.blocks_punched,
        }))
    }

    type PullLayerStream = BoxStream<pb::PullProgress>;

    async fn pull_layer(
        &self,
        request: Request<pb::PullLayerRequest>,
    ) -> Result<Response<Self::PullLayerStream>, Status> {
        let rx = pull::spawn(self.store.clone(), request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn prepare_sync(
        &self,
        request: Request<pb::PrepareSyncRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(
            self.store
                .prepare_sync(&r.layers, r.include_head, r.epoch, r.session)
                .await,
        )
    }

    async fn finish_sync(
        &self,
        request: Request<pb::FinishSyncRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.finish_sync(r.epoch, r.session).await)
    }
}
