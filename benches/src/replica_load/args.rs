//! Command-line arguments of `replica-load`.

use clap::{Parser, ValueEnum};

/// Closed-loop gRPC load generator for one zebu-replica.
#[derive(Parser, Debug)]
#[command(name = "replica-load", version)]
pub(crate) struct Args {
    /// Replica gRPC address, HOST:PORT (or a full http:// URI).
    #[arg(long)]
    pub(crate) replica: String,
    /// Operation mix: write, read, or mixed (50% reads, 50% writes).
    #[arg(long, value_enum, default_value_t = Mode::Write)]
    pub(crate) op: Mode,
    /// Request size (bytes or 4K, 1M, ...): a multiple of the replica's block size.
    #[arg(long, default_value = "4096", value_parser = zebu_proto::size::parse)]
    pub(crate) bs: u64,
    /// Requests kept outstanding.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) qd: u32,
    /// Duration of each run in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    /// Number of runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// Region the random offsets fall in, from offset 0 (clipped to the replica size).
    #[arg(long, default_value = "1G", value_parser = zebu_proto::size::parse)]
    pub(crate) span: u64,
    /// Write the whole span once (sequentially, 1 MiB writes) before the runs.
    #[arg(long)]
    pub(crate) prefill: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Which operations a run issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Only writes.
    Write,
    /// Only reads.
    Read,
    /// Reads and writes with equal probability.
    Mixed,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Read => "read",
            Mode::Mixed => "mixed",
        }
    }
}
