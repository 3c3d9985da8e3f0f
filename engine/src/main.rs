//! `zebu-engine`: serves one replicated volume over NBD, and `zebu-engine
//! ctl` talks to a running engine's control API.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use zebu_engine::control::{EngineService, scrub_json, status_json, status_table};
use zebu_engine::frontend::file::FileFrontend;
use zebu_engine::frontend::nbd;
use zebu_engine::volume::{Device, Volume, VolumeOptions};
use zebu_proto::engine as epb;
use zebu_proto::engine::engine_client::EngineClient;

/// Serve a replicated Zebu volume over NBD, or control a running engine.
#[derive(Parser, Debug)]
#[command(
    name = "zebu-engine",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Durations are a number and a unit, several may be joined: 500ms, 8s, 2m, 1h30m, 7d."
)]
struct Cli {
    #[command(flatten)]
    serve: Option<ServeArgs>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Volume name (also the NBD export name).
    #[arg(long)]
    volume: String,
    /// Volume size (bytes or 512M, 10G, ...). Replicas that hold less are
    /// grown to it; when one holds more (an expansion that did not
    /// finish), the volume takes that size.
    #[arg(long, value_parser = zebu_proto::size::parse)]
    size: u64,
    /// Replica address HOST:PORT (repeat for each replica).
    #[arg(long = "replica", required = true)]
    replicas: Vec<String>,
    /// NBD listen address: unix:PATH or tcp:HOST:PORT (repeatable).
    #[arg(long = "nbd", required = true)]
    nbd: Vec<String>,
    /// Also serve the volume as the file MOUNTDIR/NAME on a private FUSE
    /// mount over MOUNTDIR (an existing directory), for a loop device: the
    /// node's block device with no other process on the path.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Control API listen address HOST:PORT (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// A replica that does not answer within this time is ejected (e.g. 8s, 500ms).
    #[arg(long, default_value = "8s", value_parser = zebu_proto::duration::parse)]
    io_timeout: Duration,
    /// Threads for the engine's own work. With 1 everything runs on one
    /// thread, which costs the least CPU per I/O on a host whose few cores
    /// the engine shares with replicas; more let one volume use more cores.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Scrub the volume on its own at this interval (e.g. 7d, 168h, 30m):
    /// every RW replica reads its data back and checks it against its
    /// stored CRCs, and a replica found corrupt is resynced from a healthy
    /// one. Counted from each replica's last clean scrub, across engine
    /// restarts. 0 or off: no scheduled scrubs.
    #[arg(long, default_value = "off", value_parser = zebu_proto::duration::parse_interval)]
    scrub_interval: std::option::Option<Duration>,
    /// Read rate limit of a scheduled scrub, per replica, per second
    /// (e.g. 64M); 0 is no limit.
    #[arg(long, default_value = "64M", value_parser = zebu_proto::size::parse_rate)]
    scrub_rate: u64,
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a running engine.
    Ctl {
        /// The engine's control address HOST:PORT.
        #[arg(long)]
        engine: String,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// Volume state, replicas, rebuild progress, I/O latencies.
    Status {
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Replica membership.
    Replica {
        #[command(subcommand)]
        op: ReplicaOp,
    },
    /// Snapshots.
    Snapshot {
        #[command(subcommand)]
        op: SnapshotOp,
    },
    /// Revert the volume to a snapshot (no NBD client may be connected).
    Revert {
        /// Snapshot name.
        name: String,
    },
    /// Grow the volume.
    Expand {
        /// New size (bytes or 512M, 10G, ...).
        #[arg(value_parser = zebu_proto::size::parse)]
        size: u64,
    },
    /// Read every block of every replica and check it against its stored
    /// CRC; prints what each replica holds (JSON) and fails if corrupt
    /// blocks remain.
    Scrub {
        /// Take each replica found with corrupt blocks out and add it back:
        /// a resync rewrites those blocks from a healthy replica.
        #[arg(long)]
        repair: bool,
        /// Read no faster than this per replica, per second (e.g. 64M);
        /// 0 is no limit.
        #[arg(long, default_value = "0", value_parser = zebu_proto::size::parse_rate)]
        rate: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ReplicaOp {
    /// Add a replica; it is rebuilt from a healthy one.
    Add {
        /// Replica address HOST:PORT.
        address: String,
        /// Wait until the rebuild finished (exit non-zero if it failed).
        #[arg(long)]
        wait: bool,
    },
    /// Remove a replica by address or id.
    Remove {
        /// Address or replica id.
        replica: String,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotOp {
    /// Take a crash-consistent snapshot.
    Create {
        /// Snapshot name.
        name: String,
    },
    /// List snapshots.
    List {
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Delete a snapshot.
    Delete {
        /// Snapshot name.
        name: String,
    },
}

fn main() -> std::process::ExitCode {
    zebu_proto::init_logging("info");
    if !zebu_proto::keep_freed_buffers() {
        tracing::warn!("could not tune the allocator; large I/O will be slower");
    }
    let cli = Cli::parse();
    // One runtime thread by default, as in the replica: an engine's work per
    // request is short, and a second worker mostly costs waking it and
    // switching to it (benches/README.md, "Engine runtime threads", has the
    // measurements). `--worker-threads` gives one volume more cores.
    let threads = cli.serve.as_ref().map_or(1, |s| s.worker_threads);
    let rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n))
                .thread_name("zebu-engine-rt");
            b
        }
    }
    .enable_all()
    .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zebu-engine: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match (cli.serve, cli.command) {
            (_, Some(Command::Ctl { engine, op })) => ctl(&engine, op).await,
            (Some(args), None) => serve(args).await,
            (None, None) => {
                bail!("nothing to do: give the serve flags (see --help) or a subcommand")
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zebu-engine: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    zebu_proto::awake::start(args.keep_cpus_awake)
        .map_err(anyhow::Error::msg)
        .context("--keep-cpus-awake")?;
    if let Some(file) = &args.file {
        zebu_fuse_file::split_file(file).context("--file")?;
    }
    let mut listeners = Vec::new();
    for addr in &args.nbd {
        listeners.push(
            nbd::bind(addr)
                .await
                .with_context(|| format!("binding the NBD listener {addr}"))?,
        );
    }
    let control = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the control listener {}", args.listen))?;
    let control_addr = control.local_addr()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

    let volume = Volume::start(VolumeOptions {
        name: args.volume.clone(),
        size: args.size,
        replicas: args.replicas.clone(),
        io_timeout: args.io_timeout,
        scrub: zebu_engine::volume::scrub::Policy {
            interval: args.scrub_interval,
            max_bytes_per_sec: args.scrub_rate,
        },
    })
    .await
    .context("starting the volume")?;
    let schedule = tokio::spawn(zebu_engine::volume::scrub::run(
        Arc::downgrade(&volume),
        volume.scrub_policy(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let device = Arc::new(Device(volume.clone()));
    let mut servers = tokio::task::JoinSet::new();
    let mut shown = Vec::new();
    for listener in listeners {
        shown.push(
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
        );
        let mut stop = stop_rx.clone();
        let (dev, name) = (device.clone(), args.volume.clone());
        servers.spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            nbd::serve(listener, name, dev, shutdown).await
        });
    }
    let mut stop = stop_rx.clone();
    let grpc = tonic::transport::Server::builder()
        .add_service(zebu_proto::engine::engine_server::EngineServer::new(
            EngineService::new(volume.clone()),
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(control).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        );
    let grpc = tokio::spawn(grpc);
    let file = match &args.file {
        Some(path) => Some(
            FileFrontend::start(
                device.clone(),
                path,
                tokio::runtime::Handle::current(),
                volume.size_changes(),
            )
            .with_context(|| format!("serving the volume as {}", path.display()))?,
        ),
        None => None,
    };

    let line = zebu_proto::ready::EngineReady {
        volume: args.volume.clone(),
        nbd: shown,
        control: control_addr.to_string(),
        epoch: volume.epoch(),
    }
    .to_string();
    tracing::info!("{line}");
    println!("{line}");

    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(r) = servers.join_next() => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "an NBD server stopped");
            }
        }
    }
    tracing::info!("stopping: draining NBD clients and flushing every replica");
    // A scheduled scrub stops where it is; the next engine starts it again.
    schedule.abort();
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    if let Some(file) = file {
        file.stop().await;
    }
    volume
        .shutdown()
        .await
        .context("flushing the replicas on shutdown")?;
    grpc.abort();
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn connect(engine: &str) -> anyhow::Result<EngineClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{engine}"))
        .with_context(|| format!("invalid engine address {engine:?}: expected HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the engine at {engine}; is it running?"))?;
    Ok(EngineClient::new(channel))
}

fn grpc_err(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("{what}: {}", s.message())
}

async fn ctl(engine: &str, op: CtlOp) -> anyhow::Result<()> {
    let mut c = connect(engine).await?;
    match op {
        CtlOp::Status { output } => {
            let s = c
                .status(epb::StatusRequest {})
                .await
                .map_err(grpc_err("reading the status"))?
                .into_inner();
            print_status(&s, &output)?;
        }
        CtlOp::Replica {
            op: ReplicaOp::Add { address, wait },
        } => {
            let s = c
                .add_replica(epb::AddReplicaRequest {
                    address: address.clone(),
                    wait,
                })
                .await
                .map_err(grpc_err("adding the replica"))?
                .into_inner();
            if wait {
                println!("{}", status_json(&s));
            } else {
                println!("replica {address} added; rebuilding (see `status`)");
            }
        }
        CtlOp::Replica {
            op: ReplicaOp::Remove { replica },
        } => {
            c.remove_replica(epb::RemoveReplicaRequest {
                replica: replica.clone(),
            })
            .await
            .map_err(grpc_err("removing the replica"))?;
            println!("replica {replica} removed");
        }
        CtlOp::Snapshot {
            op: SnapshotOp::Create { name },
        } => {
            c.create_snapshot(epb::CreateSnapshotRequest { name: name.clone() })
                .await
                .map_err(grpc_err("creating the snapshot"))?;
            println!("snapshot {name} created");
        }
        CtlOp::Snapshot {
            op: SnapshotOp::List { output },
        } => {
            let list = c
                .list_snapshots(epb::ListSnapshotsRequest {})
                .await
                .map_err(grpc_err("listing snapshots"))?
                .into_inner()
                .snapshots;
            if output == "json" {
                let v: Vec<_> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({"name": s.name, "created_unix": s.created_unix, "user_created": s.user_created})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<32} {:<12} CREATED", "NAME", "KIND");
                for s in list {
                    let kind = if s.user_created { "user" } else { "system" };
                    println!("{:<32} {:<12} {}", s.name, kind, s.created_unix);
                }
            }
        }
        CtlOp::Snapshot {
            op: SnapshotOp::Delete { name },
        } => {
            c.delete_snapshot(epb::DeleteSnapshotRequest { name: name.clone() })
                .await
                .map_err(grpc_err("deleting the snapshot"))?;
            println!("snapshot {name} deleted");
        }
        CtlOp::Revert { name } => {
            c.revert(epb::RevertRequest { name: name.clone() })
                .await
                .map_err(grpc_err("reverting"))?;
            println!("volume reverted to {name}");
        }
        CtlOp::Expand { size } => {
            c.expand(epb::ExpandRequest { size })
                .await
                .map_err(grpc_err("expanding"))?;
            println!("volume expanded to {size} bytes");
        }
        CtlOp::Scrub { repair, rate } => {
            let replicas = c
                .scrub(epb::ScrubRequest {
                    repair,
                    max_bytes_per_sec: rate,
                })
                .await
                .map_err(grpc_err("scrubbing"))?
                .into_inner()
                .replicas;
            let v: Vec<_> = replicas.iter().map(scrub_json).collect();
            println!("{}", serde_json::Value::Array(v));
            let problems: Vec<String> = replicas
                .iter()
                .filter(|r| r.unresolved())
                .map(|r| {
                    if r.error.is_empty() {
                        format!(
                            "replica {} holds {} corrupt blocks (run `scrub --repair` to resync them)",
                            r.address, r.corrupt_blocks
                        )
                    } else {
                        format!("replica {}: {}", r.address, r.error)
                    }
                })
                .collect();
            if !problems.is_empty() {
                bail!("{}", problems.join("; "));
            }
        }
    }
    Ok(())
}

fn print_status(s: &epb::VolumeStatus, output: &str) -> anyhow::Result<()> {
    match output {
        "json" => println!("{}", status_json(s)),
        "table" => print!("{}", status_table(s)),
        other => bail!("unknown output format {other:?}: use table or json"),
    }
    Ok(())
}
