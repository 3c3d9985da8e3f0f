//! Command-line arguments (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Default driver endpoint (the standalone driver's socket).
pub const DEFAULT_ENDPOINT: &str = "unix:///run/zebu/csi.sock";
/// Default directory of the CLI's own state (attachments, staging paths).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/zebu/cli";

/// `zebu`: manage Zebu volumes through the Zebu CSI driver.
#[derive(Parser, Debug)]
#[command(
    name = "zebu",
    version,
    about = "Manage Zebu replicated volumes through the Zebu CSI driver",
    long_about = "Manage Zebu replicated volumes: create, list, inspect, snapshot, \
                  attach and detach them, and watch replicas and rebuilds. zebu talks \
                  to the driver over its CSI socket, the way Kubernetes does."
)]
pub struct Cli {
    /// CSI endpoint of the Zebu driver: unix:///path/to/socket or HOST:PORT.
    #[arg(long, global = true, env = "ZEBU_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Directory where `zebu volume attach` records attachments and stages volumes.
    #[arg(long, global = true, env = "ZEBU_CLI_STATE", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Longest wait for one reply from the driver (e.g. 90s, 5m).
    #[arg(long, global = true, default_value = "5m", value_parser = zebu_proto::duration::parse)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create, list, inspect, resize, attach and detach volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Replica state and rebuild progress of a volume.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Driver health: plugin info, readiness, volume count.
    Status(OutputArgs),
}

/// `zebu volume ...`
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume and print its id.
    Create(CreateArgs),
    /// List volumes.
    List(OutputArgs),
    /// Show one volume and its snapshots.
    Get {
        /// Volume id.
        id: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a volume.
    Delete {
        /// Volume id.
        id: String,
    },
    /// Grow a volume (and its filesystem when it is attached through this CLI).
    Expand {
        /// Volume id.
        id: String,
        /// New size, e.g. 20G.
        #[arg(value_parser = parse_volume_size)]
        size: u64,
    },
    /// Attach a volume on this host: mount its filesystem on a directory, or
    /// expose it as a block device file.
    Attach(AttachArgs),
    /// Detach a volume attached with `zebu volume attach`.
    Detach {
        /// Volume id.
        id: String,
    },
}

/// Filesystems a volume can be formatted with.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (the driver's default).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// The name CSI carries (`ext4`, `xfs`).
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// `zebu volume create`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").args(["from_snapshot", "clone_of"]).multiple(false)))]
pub struct CreateArgs {
    /// Volume name (the idempotency key: creating the same name twice returns
    /// the same volume).
    pub name: String,
    /// Size, e.g. 512M, 10G.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    /// Number of replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub replicas: u32,
    /// Filesystem made when the volume is first attached (default: the driver's, ext4).
    #[arg(long, value_enum, conflicts_with = "block")]
    pub fstype: Option<FsType>,
    /// Raw block volume (no filesystem).
    #[arg(long)]
    pub block: bool,
    /// Create from this snapshot id.
    #[arg(long, value_name = "SNAP_ID")]
    pub from_snapshot: Option<String>,
    /// Create as a copy of this volume id.
    #[arg(long, value_name = "VOLUME_ID")]
    pub clone_of: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `zebu volume attach`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").args(["mount", "block"]).required(true).multiple(false)))]
pub struct AttachArgs {
    /// Volume id.
    pub id: String,
    /// Mount the volume's filesystem on this directory.
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
    /// Expose the raw volume as a block device at this file path.
    #[arg(long, value_name = "FILE")]
    pub block: Option<PathBuf>,
    /// Filesystem to make if the volume is blank (default: the volume's, else the driver's).
    #[arg(long, value_enum, conflicts_with = "block")]
    pub fstype: Option<FsType>,
    /// Attach read-only.
    #[arg(long)]
    pub read_only: bool,
}

/// `zebu snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a volume and print the snapshot id.
    Create {
        /// Snapshot name (the idempotency key).
        name: String,
        /// Id of the volume to snapshot.
        #[arg(long, value_name = "ID")]
        volume: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List snapshots.
    List {
        /// Only snapshots of this volume.
        #[arg(long, value_name = "ID")]
        volume: Option<String>,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a snapshot.
    Delete {
        /// Snapshot id.
        id: String,
    },
}

/// `zebu replica ...`
#[derive(Subcommand, Debug)]
pub enum ReplicaCmd {
    /// Replicas of a volume: mode, address, rebuild progress, errors.
    List {
        /// Volume id.
        volume: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Read every block of every replica of an attached volume and check it
    /// against its stored CRC; fails while corrupt blocks remain.
    Scrub {
        /// Volume id.
        volume: String,
        /// Resync each replica found with corrupt blocks from a clean one.
        #[arg(long)]
        repair: bool,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Output format of read commands.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

/// The `-o/--output` option.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Parses a volume size (`512M`, `10G`): positive and representable in CSI's
/// signed 64-bit byte counts.
pub fn parse_volume_size(s: &str) -> Result<u64, String> {
    let n = zebu_proto::size::parse(s)?;
    if n == 0 {
        return Err(format!("invalid size {s:?}: must be greater than zero"));
    }
    if n > i64::MAX as u64 {
        return Err(format!("invalid size {s:?}: too large"));
    }
    Ok(n)
}
