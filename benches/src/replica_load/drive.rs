//! The closed loop over one `Io` stream: keeps the queue depth of
//! requests outstanding, batches follow-up requests, checks every reply,
//! times the ones completed before the deadline, and flushes at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_proto::replica::{IoBatch, IoReplyBatch, IoRequest, IoStatus, Op};

use crate::workload::Session;

/// Longest wait for any reply before the run is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Payload bytes above which the requests ready together are split over
/// several `IoBatch` messages (well under `MAX_MESSAGE_BYTES`).
const MAX_BATCH_PAYLOAD: usize = 16 << 20;

/// What the driver remembers about a request in flight.
struct Pending {
    queued: Instant,
    op: i32,
    offset: u64,
    length: u32,
}

/// The outcome of one closed-loop stream.
pub(crate) struct Drive {
    /// Latencies of the requests completed before the deadline, in ns.
    pub(crate) latencies_ns: Vec<u64>,
    /// Requests completed before the deadline.
    pub(crate) counted: u64,
    /// Requests completed in all (including the drained ones).
    pub(crate) completed: u64,
    /// Whether any write was issued.
    pub(crate) wrote: bool,
    /// Time the closing flush took, when one was sent.
    pub(crate) flush: Option<Duration>,
}

fn op_name(op: i32) -> &'static str {
    Op::try_from(op).map_or("unknown op", |o| o.as_str_name())
}

fn status_name(status: i32) -> String {
    IoStatus::try_from(status).map_or_else(
        |_| format!("unknown status {status}"),
        |s| s.as_str_name().to_string(),
    )
}

/// Sends `reqs` as few `IoBatch` messages as the payload cap allows.
async fn send_requests(tx: &mpsc::Sender<IoBatch>, reqs: Vec<IoRequest>) -> anyhow::Result<()> {
    let total: usize = reqs.iter().map(|r| r.payload.len()).sum();
    if total <= MAX_BATCH_PAYLOAD {
        return send(tx, reqs).await;
    }
    let mut batch = Vec::new();
    let mut bytes = 0;
    for r in reqs {
        if !batch.is_empty() && bytes + r.payload.len() > MAX_BATCH_PAYLOAD {
            send(tx, std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
        bytes += r.payload.len();
        batch.push(r);
    }
    send(tx, batch).await
}

async fn send(tx: &mpsc::Sender<IoBatch>, requests: Vec<IoRequest>) -> anyhow::Result<()> {
    tx.send(IoBatch { requests })
        .await
        .map_err(|_| anyhow!("the data stream closed while sending requests"))
}

/// Waits for the next reply batch, turning every way it can fail into an error.
async fn next_reply(
    replies: &mut tonic::Streaming<IoReplyBatch>,
    outstanding: usize,
) -> anyhow::Result<IoReplyBatch> {
    match tokio::time::timeout(STALL_TIMEOUT, replies.next()).await {
        Err(_) => bail!(
            "stalled: no reply from the replica for {} s with {outstanding} requests outstanding",
            STALL_TIMEOUT.as_secs()
        ),
        Ok(None) => {
            bail!("the replica closed the data stream with {outstanding} requests outstanding")
        }
        Ok(Some(Err(status))) => bail!(
            "the data stream failed: {} ({:?})",
            status.message(),
            status.code()
        ),
        Ok(Some(Ok(batch))) => Ok(batch),
    }
}

/// Checks one reply against its request; returns nothing on success.
fn check_reply(resp: &zebu_proto::replica::IoResponse, p: &Pending) -> anyhow::Result<()> {
    if resp.status != IoStatus::IoOk as i32 {
        bail!(
            "the replica failed {} of {} bytes at offset {} (request {}): {}: {}",
            op_name(p.op),
            p.length,
            p.offset,
            resp.id,
            status_name(resp.status),
            resp.message
        );
    }
    if p.op == Op::Read as i32 {
        if resp.payload.len() != p.length as usize {
            bail!(
                "read of {} bytes at offset {} returned {} bytes",
                p.length,
                p.offset,
                resp.payload.len()
            );
        }
        let crc = crc32fast::hash(&resp.payload);
        if crc != resp.crc32 {
            bail!(
                "read of {} bytes at offset {}: payload crc32 {crc:#010x} does not match the reply's {:#010x}",
                p.length,
                p.offset,
                resp.crc32
            );
        }
    }
    Ok(())
}

/// Runs one closed loop on a fresh `Io` stream: keeps `qd` requests in
/// flight, taking new ones from `source` until it returns `None` or
/// `deadline` passes, then drains, flushes if anything was written, and
/// closes the stream.
pub(crate) async fn drive(
    client: &mut ReplicaClient<Channel>,
    session: &mut Session,
    qd: usize,
    deadline: Instant,
    mut source: impl FnMut(&mut Session) -> Option<IoRequest>,
) -> anyhow::Result<Drive> {
    let (tx, rx) = mpsc::channel::<IoBatch>(64);
    let mut pending: HashMap<u64, Pending> = HashMap::with_capacity(qd * 2);
    let mut out = Drive {
        latencies_ns: Vec::with_capacity(1 << 20),
        counted: 0,
        completed: 0,
        wrote: false,
        flush: None,
    };
    let mut exhausted = false;

    let mut issue = |session: &mut Session,
                     pending: &mut HashMap<u64, Pending>,
                     out: &mut Drive,
                     reqs: &mut Vec<IoRequest>,
                     now: Instant| {
        match source(session) {
            Some(r) => {
                out.wrote |= r.op == Op::Write as i32;
                pending.insert(
                    r.id,
                    Pending {
                        queued: now,
                        op: r.op,
                        offset: r.offset,
                        length: r.length,
                    },
                );
                reqs.push(r);
                true
            }
            None => false,
        }
    };

    let mut first = Vec::with_capacity(qd);
    let now = Instant::now();
    for _ in 0..qd {
        if !issue(session, &mut pending, &mut out, &mut first, now) {
            exhausted = true;
            break;
        }
    }
    if first.is_empty() {
        return Ok(out);
    }
    send_requests(&tx, first).await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        zebu_proto::wire::SESSION_HEADER,
        session.stream_session.to_string().parse()?,
    );
    let mut replies = client
        .io(request)
        .await
        .map_err(|s| anyhow!("opening the data stream: {} ({:?})", s.message(), s.code()))?
        .into_inner();

    while !pending.is_empty() {
        let mut batch = next_reply(&mut replies, pending.len()).await?;
        let mut next = Vec::new();
        loop {
            let now = Instant::now();
            let in_time = now < deadline;
            for resp in &batch.responses {
                let p = pending
                    .remove(&resp.id)
                    .ok_or_else(|| anyhow!("reply for unknown request id {}", resp.id))?;
                check_reply(resp, &p)?;
                out.completed += 1;
                if in_time {
                    out.counted += 1;
                    out.latencies_ns
                        .push(now.duration_since(p.queued).as_nanos() as u64);
                    if !exhausted && !issue(session, &mut pending, &mut out, &mut next, now) {
                        exhausted = true;
                    }
                }
            }
            // Replies that are already here are handled together, and their
            // follow-up requests go out in the same batch.
            match replies.next().now_or_never() {
                Some(Some(Ok(b))) => batch = b,
                Some(Some(Err(status))) => bail!(
                    "the data stream failed: {} ({:?})",
                    status.message(),
                    status.code()
                ),
                Some(None) if !pending.is_empty() => bail!(
                    "the replica closed the data stream with {} requests outstanding",
                    pending.len()
                ),
                _ => break,
            }
        }
        if !next.is_empty() {
            send_requests(&tx, next).await?;
        }
    }

    if out.wrote {
        let started = Instant::now();
        let flush = session.request(Op::Flush, 0, 0, None);
        let p = Pending {
            queued: started,
            op: flush.op,
            offset: 0,
            length: 0,
        };
        let id = flush.id;
        send_requests(&tx, vec![flush]).await?;
        let batch = next_reply(&mut replies, 1).await?;
        match batch.responses.as_slice() {
            [resp] if resp.id == id => check_reply(resp, &p)?,
            _ => bail!(
                "unexpected reply to the closing flush: {} responses",
                batch.responses.len()
            ),
        }
        out.flush = Some(started.elapsed());
    }

    // Close our side and let the replica finish the stream.
    drop(tx);
    match tokio::time::timeout(STALL_TIMEOUT, replies.next()).await {
        Ok(None) => {}
        Ok(Some(Ok(b))) => bail!(
            "unexpected reply batch of {} responses after the run",
            b.responses.len()
        ),
        Ok(Some(Err(status))) => bail!(
            "the data stream failed at close: {} ({:?})",
            status.message(),
            status.code()
        ),
        Err(_) => bail!(
            "the replica did not close the data stream within {} s",
            STALL_TIMEOUT.as_secs()
        ),
    }
    Ok(out)
}
