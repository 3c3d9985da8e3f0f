//! `zebu-replica`: serves one replica directory over gRPC.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use zebu_replica::io::EngineKind;
use zebu_replica::server::ReplicaService;
use zebu_replica::store::{OpenOptions, Store};

/// Serve one Zebu replica: a layered, checksummed block store.
#[derive(Parser, Debug)]
#[command(name = "zebu-replica", version)]
struct Args {
    /// Replica directory (created when missing).
    #[arg(long)]
    dir: PathBuf,
    /// gRPC listen address, HOST:PORT (port 0 picks a free port; the serving line shows it).
    #[arg(long)]
    listen: String,
    /// Volume size (bytes or 512M, 10G, ...): required to create, must match an existing replica.
    #[arg(long, value_parser = zebu_proto::size::parse)]
    size: Option<u64>,
    /// Block size in bytes for a new replica.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// I/O backend; uring falls back to threads with a warning when unavailable.
    #[arg(long, value_enum, default_value_t = EngineKind::Uring)]
    io_engine: EngineKind,
    /// While this process has I/O, and for this long after its last
    /// request (up to 8 times as long after a long stretch of I/O), hold
    /// the node's CPUs out of idle states (a CPU latency
    /// request of 0 us on /dev/cpu_dma_latency): each step of an I/O wakes
    /// the next, and a CPU woken from a halt or a deep C-state adds its
    /// exit latency to every step. Idle CPUs poll meanwhile. off: never.
    /// Default: $ZEBU_KEEP_CPUS_AWAKE, else 2ms.
    #[arg(long, value_parser = zebu_proto::awake::parse_linger)]
    keep_cpus_awake: Option<zebu_proto::awake::Linger>,
}

// One runtime thread: the replica's work per request is short (decode, CRC,
// push the I/O to the io_uring ring, which this thread drives, encode the
// reply), and on a host shared
// with other replicas and the engine a second worker mostly costs thread
// wake-ups (work stealing) and context switches per request.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    zebu_proto::init_logging("info");
    if !zebu_proto::keep_freed_buffers() {
        tracing::warn!("could not tune the allocator; large I/O will be slower");
    }
    let args = Args::parse();
    zebu_proto::awake::start(args.keep_cpus_awake)
        .map_err(anyhow::Error::msg)
        .context("--keep-cpus-awake")?;
    let opts = OpenOptions {
        dir: args.dir.clone(),
        size: args.size,
        block_size: args.block_size,
        io_engine: args.io_engine,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(opts))
        .await?
        .with_context(|| format!("opening the replica in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Signal handlers go in before the serving line announces readiness.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let status = store.status().await;
    let line = zebu_proto::ready::ReplicaReady {
        dir: args.dir.display().to_string(),
        address: addr.to_string(),
        id: status.id.to_string(),
        size_bytes: status.size,
        block_size: status.block_size,
        io_engine: status.io_engine.to_string(),
        clean: status.clean,
    }
    .to_string();
    tracing::info!("{line}");
    println!("{line}");

    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: flushing and marking the replica clean");
    };
    // tcp_nodelay on the builder does not apply to a caller-supplied
    // listener: set it on the incoming stream, or Nagle delays small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(zebu_proto::MAX_FRAME_BYTES))
        .add_service(ReplicaService::new(store.clone()).into_server())
        .serve_with_incoming(incoming);
    // Not a graceful gRPC shutdown: an engine keeps its stream open for as
    // long as it lives, so waiting for clients would never end. The store
    // itself refuses new I/O and drains what is in flight.
    tokio::select! {
        r = server => r.context("serving gRPC")?,
        _ = shutdown => {}
    }
    store.shutdown().await.context("flushing on shutdown")?;
    tracing::info!("stopped cleanly");
    Ok(())
}
