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
//!
//! The code is split by concern: `args`, `workload` (what the runs send),
//! `drive` (the closed loop on one stream), `report` (figures, medians,
//! output); this file connects, opens, prefills and runs.

mod args;
mod drive;
mod report;
mod workload;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use tonic::transport::Endpoint;

use zebu_proto::replica::replica_client::ReplicaClient;
use zebu_proto::replica::{InfoRequest, Op, OpenRequest};

use crate::args::Args;
use crate::drive::drive;
use crate::report::{figures, json_figures, json_string, medians, mib, text_line};
use crate::workload::{Generator, Payload, Rng, Session};

/// Bytes of pre-generated write payload buffers (at most 16 buffers).
const PAYLOAD_POOL_BYTES: usize = 64 << 20;
/// Size of each write while prefilling the span.
const PREFILL_CHUNK: u64 = 1 << 20;
/// Queue depth while prefilling the span.
const PREFILL_QD: usize = 16;

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
