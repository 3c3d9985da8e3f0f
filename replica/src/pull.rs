//! Writing a layer during a sync: from a `WriteLayer` stream the engine sends,
//! or pulled straight from a peer replica (`PullLayer`), so rebuild data does
//! not pass through the engine.
//!
//! A pull connects to the source replica, opens its `ReadLayer` stream for
//! the planned extents and writes every chunk into the local layer through
//! the same checked path as `WriteLayer`: the layer must have been prepared
//! with `PrepareSync` under the caller's epoch, and each chunk's CRC is
//! verified before its data is written.
//!
//! The `ReadLayer` call is made below tonic's codec: its response frames are
//! split into messages and decoded in place ([`zebu_proto::wire`]), and each
//! chunk's data is copied once, from the frames into its aligned buffer.
//!
//! Invariant: a chunk whose CRC does not match its data is never written; it
//! ends the copy with an error, and the engine does not promote the replica.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::Channel;

use zebu_proto::replica as pb;

use crate::buf::AlignedBuf;
use crate::status::status_of;
use crate::store::Store;
use zebu_proto::wire;

/// Most chunk writes of one copy in flight at once.
const MAX_WRITES_IN_FLIGHT: usize = 64;
/// A progress message is sent at least every this many bytes.
const PROGRESS_EVERY_BYTES: u64 = 32 << 20;
/// Limit for connecting to the source replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a copy has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Data bytes written.
    pub bytes_written: u64,
    /// Blocks written.
    pub blocks_written: u64,
    /// Blocks deallocated.
    pub blocks_punched: u64,
}

impl Totals {
    fn progress(&self) -> pb::PullProgress {
        pb::PullProgress {
            bytes_written: self.bytes_written,
            blocks_written: self.blocks_written,
            blocks_punched: self.blocks_punched,
        }
    }
}

/// Applies a stream of [`wire::LayerData`] (writes and punches) to a layer,
/// up to [`MAX_WRITES_IN_FLIGHT`] at a time. The layer, epoch and session are
/// `target`, or else those of the first message. `progress` is called after
/// each completed chunk with the running totals.
pub async fn apply<S>(
    store: &Arc<Store>,
    mut target: Option<(String, u64, u64)>,
    inbound: S,
    mut progress: impl FnMut(&Totals),
) -> Result<Totals, Status>
where
    S: Stream<Item = Result<wire::LayerData, Status>>,
{
    let mut inbound = std::pin::pin!(inbound);
    let mut totals = Totals::default();
    let mut in_flight = FuturesUnordered::new();
    let bs = store.block_size() as u64;
    let mut more = true;
    while more || !in_flight.is_empty() {
        tokio::select! {
            msg = inbound.next(), if more && in_flight.len() < MAX_WRITES_IN_FLIGHT => {
                let Some(m) = msg.transpose()? else {
                    more = false;
                    continue;
                };
                let (layer, epoch, session) = target
                    .get_or_insert_with(|| (m.layer.clone(), m.epoch, m.session))
                    .clone();
                let store = store.clone();
                in_flight.push(async move {
                    if m.punch_length > 0 {
                        store
                            .layer_punch(&layer, m.offset, m.punch_length, epoch, session)
                            .await
                            .map(|_| (0, 0, m.punch_length / bs))
                    } else {
                        let data = AlignedBuf::copy_from_chunks(
                            m.data.chunks().map(|c| &c[..]),
                            m.data.len(),
                        );
                        let n = data.len() as u64;
                        store
                            .layer_write(&layer, m.offset, data, m.crc32, epoch, session)
                            .await
                            .map(|_| (n, n / bs, 0))
                    }
                });
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (bytes, written, punched) = done.map_err(|e| status_of(&e))?;
                totals.bytes_written += bytes;
                totals.blocks_written += written;
                totals.blocks_punched += punched;
                progress(&totals);
            }
        }
    }
    Ok(totals)
}

/// Connects to the replica at `addr` (`HOST:PORT`) to read from it.
async fn connect(addr: &str) -> Result<Channel, Status> {
    let endpoint = zebu_proto::replica_endpoint(addr, CONNECT_TIMEOUT).map_err(|why| {
        Status::invalid_argument(format!("source replica address {addr:?}: {why}"))
    })?;
    endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the source replica {addr}: {e}")))
}

/// Calls `ReadLayer` on `channel`: the chunks it streams, decoded from the
/// response frames in place, then the call's status from its trailers.
async fn read_layer(
    channel: Channel,
    r: &pb::ReadLayerRequest,
) -> Result<impl Stream<Item = Result<wire::LayerData, Status>> + use<>, Status> {
    const WHAT: &str = "the layer data";
    let len = r.encoded_len();
    let prefix = wire::message_prefix(len)
        .map_err(|_| Status::invalid_argument("a ReadLayer request of over 4 GiB"))?;
    let mut message = BytesMut::with_capacity(5 + len);
    message.put_slice(&prefix);
    r.encode(&mut message)
        .map_err(|e| Status::internal(format!("encoding the ReadLayer request: {e}")))?;
    let body = tonic::body::Body::new(http_body_util::Full::new(message.freeze()));
    let response = zebu_proto::start_call(
        channel,
        wire::READ_LAYER_PATH,
        &[],
        body,
        "the ReadLayer stream",
    )
    .await?;
    Ok(wire::messages(response.into_body(), WHAT, true)
        .map(|m| m.and_then(|m| wire::decode_layer_data(m).map_err(|e| wire::status(WHAT, e)))))
}

/// Checks a pull request before anything is done.
fn validate(r: &pb::PullLayerRequest) -> Result<(), Status> {
    if r.whole && !r.copy.is_empty() {
        return Err(Status::invalid_argument(
            "a pull of the whole layer takes no copy extents",
        ));
    }
    if r.copy.iter().chain(&r.punch).any(|e| e.length == 0) {
        return Err(Status::invalid_argument("an extent of length 0"));
    }
    Ok(())
}

/// Runs a pull: the punches, then the copy from the source, through one
/// [`apply`]. Progress goes to `tx` (at least every
/// [`PROGRESS_EVERY_BYTES`]); the copy stops when `tx`'s receiver is gone.
pub async fn run(
    store: Arc<Store>,
    r: pb::PullLayerRequest,
    tx: mpsc::Sender<Result<pb::PullProgress, Status>>,
) -> Result<Totals, Status> {
    validate(&r)?;
    let punches = r.punch.iter().map(|e| {
        Ok(wire::LayerData {
            offset: e.offset,
            punch_length: e.length,
            ..Default::default()
        })
    });
    let chunks = if r.whole || !r.copy.is_empty() {
        let source = connect(&r.source).await?;
        let request = pb::ReadLayerRequest {
            layer: r.layer.clone(),
            extents: r.copy.clone(),
        };
        let chunks = read_layer(source, &request)
            .await
            .map_err(|s| source_error(&r.layer, &r.source, s))?;
        let (src, layer, caller) = (r.source.clone(), r.layer.clone(), tx.clone());
        Some(chunks.map(move |m| {
            if caller.is_closed() {
                return Err(Status::cancelled("the caller of the pull went away"));
            }
            m.map_err(|s| source_error(&layer, &src, s))
        }))
    } else {
        None
    };
    let inbound = futures::stream::iter(punches).chain(futures::stream::iter(chunks).flatten());
    let mut reported = 0;
    apply(
        &store,
        Some((r.layer.clone(), r.epoch, r.session)),
        inbound,
        |t| {
            if t.bytes_written - reported >= PROGRESS_EVERY_BYTES {
                reported = t.bytes_written;
                // A full channel only delays this report to the next one.
                let _ = tx.try_send(Ok(t.progress()));
            }
        },
    )
    .await
}

fn source_error(layer: &str, source: &str, s: Status) -> Status {
    Status::new(
        s.code(),
        format!("reading layer {layer:?} from {source}: {}", s.message()),
    )
}

/// The progress stream of a pull: runs it in a task and ends with the totals
/// or the error.
pub fn spawn(
    store: Arc<Store>,
    r: pb::PullLayerRequest,
) -> mpsc::Receiver<Result<pb::PullProgress, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // The caller logs a failure where it handles it.
        let last = run(store, r, tx.clone()).await.map(|t| t.progress());
        let _ = tx.send(last).await;
    });
    rx
}
