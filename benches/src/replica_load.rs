//! `replica-load`: a closed-loop load generator for ONE `zebu-replica`,
//! driving its gRPC data stream directly (no engine, no replication).
//!
//! It measures what a single replica sustains over gRPC: requests per second,
//! MiB/s and per-request latency (p50, p99, p99.9 in µs) for random,
//! block-aligned reads and/or writes of a fixed size at a fixed queue depth.
//! The default is the headline figure: 4 KiB writes at queue depth 32.
//!
//! How it drives the replica:
//!
//! * `Info` gives the size, block size, epoch and revision; `Open` then takes
//!   epoch `info.epoch + 1`. **This fences out whoever held the replica
//!   before**: never point it at a replica an engine is using.
//! * Each run opens one `Io` stream and keeps exactly `--qd` requests
//!   outstanding. Every completion immediately triggers a new request; the
//!   new requests made while handling the replies that arrived together go
//!   out together in one `IoBatch`.
//! * Offsets are uniformly random multiples of `--bs` within `--span`
//!   (clipped to the replica size). Write payloads come from a few
//!   pre-generated random buffers with precomputed CRCs, sent as cheap
//!   `Bytes` clones. Read replies are checked against their CRC and length.
//!   `--op mixed` issues reads and writes with equal probability.
//! * Only completions before the deadline count; requests still in flight
//!   then are drained but not counted. Latency runs from queueing the request
//!   to handling its reply. After a run that wrote, one `OP_FLUSH` (not
//!   counted, its time reported) makes the writes durable.
//! * Reads of never-written blocks are served without touching the disk:
//!   use `--prefill` (writes the whole span once before the runs) for
//!   meaningful read figures on a fresh replica.
//! * Any non-OK status aborts with the status name and the replica's message;
//!   no reply for 60 s aborts as a stall.
//!
//! Run it against a replica started for the purpose:
//!
//! ```text
//! cargo build --release -p zebu-replica -p zebu-benches
//! ./target/release/zebu-replica --dir /var/tmp/r --listen 127.0.0.1:7100 --size 2G &
//! ./target/release/replica-load --replica 127.0.0.1:7100 --op write --bs 4096 --qd 32 --seconds 10 --runs 3
//! ./target/release/replica-load --replica 127.0.0.1:7100 --op read --prefill --json
//! ```
//!
//! Each run prints one line, then the median over runs of every figure
//! (taken independently per figure). `--json` prints a single JSON object
//! instead, with the per-run figures and the medians.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_proto::replica::{
    InfoRequest, IoBatch, IoReplyBatch, IoRequest, IoStatus, Op, OpenRequest,
};

/// Longest wait for any reply before the run is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Payload bytes above which the requests ready together are split over
/// several `IoBatch` messages (well under `MAX_MESSAGE_BYTES`).
const MAX_BATCH_PAYLOAD: usize = 16 << 20;
/// Bytes of pre-generated write payload buffers (at most 16 buffers).
const PAYLOAD_POOL_BYTES: usize = 64 << 20;
/// Size of each write while prefilling the span.
const PREFILL_CHUNK: u64 = 1 << 20;
/// Queue depth while prefilling the span.
const PREFILL_QD: usize = 16;

/// Closed-loop gRPC load generator for one zebu-replica.
#[derive(Parser, Debug)]
#[command(name = "replica-load", version)]
struct Args {
    /// Replica gRPC address, HOST:PORT (or a full http:// URI).
    #[arg(long)]
    replica: String,
    /// Operation mix: write, read, or mixed (50% reads, 50% writes).
    #[arg(long, value_enum, default_value_t = Mode::Write)]
    op: Mode,
    /// Request size (bytes or 4K, 1M, ...): a multiple of the replica's block size.
    #[arg(long, default_value = "4096", value_parser = zebu_proto::size::parse)]
    bs: u64,
    /// Requests kept outstanding.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    qd: u32,
    /// Duration of each run in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Number of runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Region the random offsets fall in, from offset 0 (clipped to the replica size).
    #[arg(long, default_value = "1G", value_parser = zebu_proto::size::parse)]
    span: u64,
    /// Write the whole span once (sequentially, 1 MiB writes) before the runs.
    #[arg(long)]
    prefill: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Which operations a run issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Only writes.
    Write,
    /// Only reads.
    Read,
    /// Reads and writes with equal probability.
    Mixed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Read => "read",
            Mode::Mixed => "mixed",
        }
    }
}

/// xorshift64*: fast, good enough for offsets and payload bytes.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias worth caring about.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A reusable write payload with its CRC.
struct Payload {
    data: Bytes,
    crc32: u32,
}

impl Payload {
    fn random(rng: &mut Rng, len: usize) -> Self {
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        let crc32 = crc32fast::hash(&v);
        Payload {
            data: Bytes::from(v),
            crc32,
        }
    }
}

/// Request identity shared by every stream of the session: ids are unique
/// and revisions increase across runs.
struct Session {
    epoch: u64,
    /// The data-stream session the replica's `Open` returned.
    stream_session: u64,
    next_id: u64,
    next_revision: u64,
}

impl Session {
    fn request(
        &mut self,
        op: Op,
        offset: u64,
        length: u32,
        payload: Option<&Payload>,
    ) -> IoRequest {
        let id = self.next_id;
        self.next_id += 1;
        let revision = self.next_revision;
        self.next_revision += 1;
        let (payload, crc32) = match payload {
            Some(p) => (p.data.clone(), p.crc32),
            None => (Bytes::new(), 0),
        };
        IoRequest {
            id,
            op: op as i32,
            offset,
            length,
            payload,
            crc32,
            revision,
            epoch: self.epoch,
        }
    }
}

/// Produces the random requests of the measured runs.
struct Generator {
    mode: Mode,
    bs: u64,
    /// Number of `bs`-sized slots in the span.
    slots: u64,
    rng: Rng,
    payloads: Vec<Payload>,
}

impl Generator {
    fn next(&mut self, session: &mut Session) -> IoRequest {
        let offset = self.rng.below(self.slots) * self.bs;
        let r = self.rng.next();
        let write = match self.mode {
            Mode::Write => true,
            Mode::Read => false,
            Mode::Mixed => r & 1 == 1,
        };
        if write {
            let p = &self.payloads[((r >> 1) % self.payloads.len() as u64) as usize];
            session.request(Op::Write, offset, self.bs as u32, Some(p))
        } else {
            session.request(Op::Read, offset, self.bs as u32, None)
        }
    }
}

/// What the driver remembers about a request in flight.
struct Pending {
    queued: Instant,
    op: i32,
    offset: u64,
    length: u32,
}

/// The outcome of one closed-loop stream.
struct Drive {
    /// Latencies of the requests completed before the deadline, in ns.
    latencies_ns: Vec<u64>,
    /// Requests completed before the deadline.
    counted: u64,
    /// Requests completed in all (including the drained ones).
    completed: u64,
    /// Whether any write was issued.
    wrote: bool,
    /// Time the closing flush took, when one was sent.
    flush: Option<Duration>,
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
async fn drive(
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

/// Figures of one run.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    ops: u64,
    seconds: f64,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    flush_ms: f64,
}

/// The `q`-quantile (0..=1) of sorted values, nearest-rank.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn figures(mut d: Drive, seconds: f64, bs: u64) -> Figures {
    d.latencies_ns.sort_unstable();
    let us = |q| quantile(&d.latencies_ns, q) as f64 / 1000.0;
    let iops = d.counted as f64 / seconds;
    Figures {
        ops: d.counted,
        seconds,
        iops,
        mib_s: iops * bs as f64 / f64::from(1u32 << 20),
        p50_us: us(0.50),
        p99_us: us(0.99),
        p999_us: us(0.999),
        flush_ms: d.flush.map_or(0.0, |f| f.as_secs_f64() * 1000.0),
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f));
    Figures {
        ops: m(|r| r.ops as f64).round() as u64,
        seconds: m(|r| r.seconds),
        iops: m(|r| r.iops),
        mib_s: m(|r| r.mib_s),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        flush_ms: m(|r| r.flush_ms),
    }
}

fn text_line(label: &str, f: &Figures) -> String {
    format!(
        "{label:>7}: {:>9.0} IOPS {:>9.1} MiB/s   p50 {:>8.1} µs   p99 {:>8.1} µs   p99.9 {:>8.1} µs   ({} ops in {:.1} s, flush {:.1} ms)",
        f.iops, f.mib_s, f.p50_us, f.p99_us, f.p999_us, f.ops, f.seconds, f.flush_ms
    )
}

fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_figures(f: &Figures) -> String {
    format!(
        "{{\"ops\":{},\"seconds\":{:.3},\"iops\":{:.1},\"mib_s\":{:.2},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"flush_ms\":{:.2}}}",
        f.ops, f.seconds, f.iops, f.mib_s, f.p50_us, f.p99_us, f.p999_us, f.flush_ms
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Connects, opens the replica with a new epoch, and runs the benchmark.
async fn run(args: Args) -> anyhow::Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number of seconds");
    }
    let uri = if args.replica.contains("://") {
        args.replica.clone()
    } else {
        format!("http://{}", args.replica)
    };
    let channel = Endpoint::from_shared(uri)
        .with_context(|| format!("invalid replica address {:?}", args.replica))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect()
        .await
        .with_context(|| format!("cannot reach the replica at {}", args.replica))?;
    let mut client = ReplicaClient::new(channel)
        .max_decoding_message_size(zebu_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(zebu_proto::MAX_MESSAGE_BYTES);

    let info = client
        .info(InfoRequest {})
        .await
        .map_err(|s| {
            anyhow!(
                "Info on {} failed: {} ({:?})",
                args.replica,
                s.message(),
                s.code()
            )
        })?
        .into_inner();
    let block = u64::from(info.block_size);
    if block == 0 {
        bail!("the replica reports a block size of 0");
    }
    if args.bs == 0 || !args.bs.is_multiple_of(block) {
        bail!(
            "--bs {} is not a positive multiple of the replica's block size {block}",
            args.bs
        );
    }
    if args.bs > u64::from(u32::MAX) || args.bs as usize > zebu_proto::MAX_MESSAGE_BYTES / 2 {
        bail!("--bs {} is too large for one request", args.bs);
    }
    let span = args.span.min(info.size) / args.bs * args.bs;
    if span < args.bs {
        bail!(
            "the span ({} bytes, replica size {}) holds no {}-byte request",
            args.span,
            info.size,
            args.bs
        );
    }
    let epoch = info.epoch + 1;
    let opened = client.open(OpenRequest { epoch }).await.map_err(|s| {
        anyhow!(
            "Open with epoch {epoch} failed: {} ({:?})",
            s.message(),
            s.code()
        )
    })?;
    let mut session = Session {
        epoch,
        stream_session: opened.into_inner().session,
        next_id: 1,
        next_revision: info.revision + 1,
    };
    let mut rng = Rng::seeded();
    let qd = args.qd as usize;

    if !args.json {
        println!(
            "replica {} (id {}, size {}, block size {}, io engine {}): opened epoch {epoch}",
            args.replica,
            info.id,
            mib(info.size),
            info.block_size,
            info.io_engine
        );
    }

    if args.prefill {
        let started = Instant::now();
        let chunk = PREFILL_CHUNK.max(block).min(span) / block * block;
        let full = Payload::random(&mut rng, chunk as usize);
        let mut offset = 0u64;
        let d = drive(
            &mut client,
            &mut session,
            PREFILL_QD,
            Instant::now() + Duration::from_secs(1 << 30),
            |s| {
                if offset >= span {
                    return None;
                }
                let len = chunk.min(span - offset);
                let r = if len == chunk {
                    s.request(Op::Write, offset, len as u32, Some(&full))
                } else {
                    let tail = Payload {
                        data: full.data.slice(..len as usize),
                        crc32: crc32fast::hash(&full.data[..len as usize]),
                    };
                    s.request(Op::Write, offset, len as u32, Some(&tail))
                };
                offset += len;
                Some(r)
            },
        )
        .await
        .context("prefilling the span")?;
        let secs = started.elapsed().as_secs_f64();
        let line = format!(
            "prefilled {} in {} writes in {secs:.1} s ({:.0} MiB/s)",
            mib(span),
            d.completed,
            span as f64 / f64::from(1u32 << 20) / secs
        );
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    let pool = (PAYLOAD_POOL_BYTES / args.bs as usize).clamp(1, 16);
    let mut generator = Generator {
        mode: args.op,
        bs: args.bs,
        slots: span / args.bs,
        payloads: (0..pool)
            .map(|_| Payload::random(&mut rng, args.bs as usize))
            .collect(),
        rng,
    };

    if !args.json {
        println!(
            "{} {} B, QD {qd}, random offsets over {}, {} run(s) of {} s",
            args.op.name(),
            args.bs,
            mib(span),
            args.runs,
            args.seconds
        );
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let mut runs = Vec::with_capacity(args.runs as usize);
    for i in 1..=args.runs {
        let deadline = Instant::now() + duration;
        let d = drive(&mut client, &mut session, qd, deadline, |s| {
            Some(generator.next(s))
        })
        .await
        .with_context(|| format!("run {i}"))?;
        let f = figures(d, args.seconds, args.bs);
        if !args.json {
            println!("{}", text_line(&format!("run {i}"), &f));
        }
        runs.push(f);
    }
    let med = medians(&runs);

    if args.json {
        let per_run: Vec<String> = runs.iter().map(json_figures).collect();
        println!(
            "{{\"replica\":{},\"replica_id\":{},\"io_engine\":{},\"block_size\":{},\"op\":{},\"bs\":{},\"qd\":{qd},\"span\":{span},\"seconds\":{},\"prefill\":{},\"runs\":[{}],\"median\":{}}}",
            json_string(&args.replica),
            json_string(&info.id),
            json_string(&info.io_engine),
            info.block_size,
            json_string(args.op.name()),
            args.bs,
            args.seconds,
            args.prefill,
            per_run.join(","),
            json_figures(&med)
        );
    } else {
        println!("{}", text_line("median", &med));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replica-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
