//! The replica's gRPC service.
//!
//! The data path is one bidirectional stream per client: each inbound batch
//! is split into requests that run concurrently (a `FuturesUnordered` per
//! stream, no task per request); completed responses are gathered into reply
//! batches in completion order.
//!
//! Invariant: a failed request gets an error response on the stream and
//! never ends the stream or the process; only a broken transport does.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use zebu_proto::replica as pb;
use zebu_proto::replica::replica_server::Replica;

use crate::pull;
use crate::store::{LayerStatus, ReplicaStatus, Store, StoreError};

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

    /// The tonic server wrapper with Zebu's message limits.
    pub fn into_server(self) -> pb::replica_server::ReplicaServer<Self> {
        pb::replica_server::ReplicaServer::new(self)
            .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
    }
}

/// The gRPC status for a store error.
pub fn status_of(e: &StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::InvalidArgument(_) | StoreError::CrcMismatch { .. } => {
            Status::invalid_argument(msg)
        }
        StoreError::OutOfRange { .. } => Status::out_of_range(msg),
        StoreError::StaleEpoch { .. }
        | StoreError::NotOpen { .. }
        | StoreError::FailedPrecondition(_) => Status::failed_precondition(msg),
        StoreError::NoSpace(_) => Status::resource_exhausted(msg),
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Corrupt { .. } => Status::data_loss(msg),
        StoreError::AlreadyExists(_) => Status::already_exists(msg),
        StoreError::Io { .. } | StoreError::Meta(_) => Status::internal(msg),
    }
}

fn io_status_of(e: &StoreError) -> pb::IoStatus {
    match e {
        StoreError::InvalidArgument(_) => pb::IoStatus::IoInvalidArgument,
        StoreError::OutOfRange { .. } => pb::IoStatus::IoOutOfRange,
        StoreError::CrcMismatch { .. } => pb::IoStatus::IoCrcMismatch,
        StoreError::StaleEpoch { .. } => pb::IoStatus::IoStaleEpoch,
        StoreError::NotOpen { .. } => pb::IoStatus::IoNotOpen,
        StoreError::NoSpace(_) => pb::IoStatus::IoNoSpace,
        _ => pb::IoStatus::IoError,
    }
}

async fn handle(store: Arc<Store>, r: pb::IoRequest) -> pb::IoResponse {
    let op = pb::Op::try_from(r.op);
    let result = match op {
        Ok(pb::Op::Read) => store
            .read(r.offset, r.length as u64, r.epoch)
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
                store
                    .write(r.offset, r.payload, r.crc32, r.epoch, r.revision)
                    .await
                    .map(|_| None)
            }
        }
        Ok(pb::Op::Unmap) => store
            .unmap(r.offset, r.length as u64, r.epoch)
            .await
            .map(|_| None),
        Ok(pb::Op::Flush) => store.flush(r.epoch).await.map(|_| None),
        Err(_) => Err(StoreError::InvalidArgument(format!(
            "unknown operation {}",
            r.op
        ))),
    };
    match result {
        Ok(payload) => {
            let payload = payload.unwrap_or_default();
            pb::IoResponse {
                id: r.id,
                status: pb::IoStatus::IoOk as i32,
                message: String::new(),
                crc32: if payload.is_empty() {
                    0
                } else {
                    crc32fast::hash(&payload)
                },
                payload,
            }
        }
        Err(e) => {
            tracing::debug!(id = r.id, offset = r.offset, error = %e, "I/O request failed");
            pb::IoResponse {
                id: r.id,
                status: io_status_of(&e) as i32,
                message: e.to_string(),
                payload: Bytes::new(),
                crc32: 0,
            }
        }
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        let guard = store.stream_guard();
        tokio::spawn(async move {
            let _guard = guard;
            let mut in_flight = FuturesUnordered::new();
            let mut inbound_open = true;
            loop {
                tokio::select! {
                    msg = inbound.message(), if inbound_open && in_flight.len() < MAX_IN_FLIGHT => {
                        match msg {
                            Ok(Some(batch)) => {
                                for r in batch.requests {
                                    in_flight.push(handle(store.clone(), r));
                                }
                            }
                            Ok(None) => inbound_open = false,
                            Err(status) => {
                                tracing::debug!(%status, "data stream closed by the transport");
                                inbound_open = false;
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
                            break;
                        }
                    }
                    else => break,
                }
                if !inbound_open && in_flight.is_empty() {
                    break;
                }
            }
        });
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
        reply(self.store.close(request.into_inner().epoch).await)
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
        reply(self.store.snapshot(&r.name, r.user_created, r.epoch).await)
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
        reply(self.store.delete_snapshot(&r.name, r.epoch).await)
    }

    async fn revert(
        &self,
        request: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.revert(&r.name, r.epoch).await)
    }

    async fn expand(
        &self,
        request: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.expand(r.size, r.epoch).await)
    }

    async fn set_ejected(
        &self,
        request: Request<pb::SetEjectedRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = request.into_inner();
        reply(self.store.set_ejected(r.ejected, r.epoch).await)
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
        let r = request.into_inner();
        let extents = r.extents.iter().map(|e| (e.offset, e.length)).collect();
        let rx = self
            .store
            .read_layer(&r.layer, extents)
            .await
            .map_err(|e| status_of(&e))?;
        let stream = ReceiverStream::new(rx).map(|r| {
            r.map(|(offset, data, crc32)| pb::LayerData {
                layer: String::new(),
                offset,
                crc32,
                data,
                punch_length: 0,
                epoch: 0,
            })
            .map_err(|e| status_of(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_layer(
        &self,
        request: Request<Streaming<pb::LayerData>>,
    ) -> Result<Response<pb::WriteLayerResponse>, Status> {
        let totals = pull::apply(&self.store, None, request.into_inner(), |_| ()).await?;
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
                .prepare_sync(&r.layers, r.include_head, r.epoch)
                .await,
        )
    }

    async fn finish_sync(
        &self,
        request: Request<pb::FinishSyncRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        reply(self.store.finish_sync(request.into_inner().epoch).await)
    }
}
