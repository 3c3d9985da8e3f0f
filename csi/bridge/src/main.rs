//! `zebu-nbd-fuse`: serves an NBD export as one file on a private FUSE
//! mount, and grows that file on `SIGUSR1` when the export grew (see
//! `zebu_csi::attach::bridge`). Used by `zebu_csi::attach` with
//! `Backend::Bridge` in place of `nbdfuse`.
//!
//! ```text
//! zebu-nbd-fuse --uri nbd+unix:///vol?socket=/run/e.sock --file /mnt/dir/disk \
//!               [--pidfile PATH] [--connections N]
//! ```
//!
//! Stays in the foreground until the mount goes away (`fusermount3 -u DIR`,
//! `umount DIR`, or SIGTERM/SIGINT, which unmount). Prints nothing on stdout;
//! errors and warnings go to stderr (`RUST_LOG` tunes the level). The pid file
//! is written once the mount is live, like `nbdfuse -P`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use zebu_nbd_fuse::{self as bridge, BridgeOptions};

/// Serve an NBD export as a resizable file on a FUSE mount.
#[derive(Debug, Parser)]
#[command(name = "zebu-nbd-fuse", version)]
struct Args {
    /// The export: nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME.
    #[arg(long)]
    uri: String,
    /// MOUNTDIR/NAME: the mount point (an existing directory) and the file name.
    #[arg(long)]
    file: PathBuf,
    /// Write the process id here once the mount is live.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// NBD connections to use when the server allows several.
    #[arg(long, default_value_t = bridge::DEFAULT_CONNECTIONS)]
    connections: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    zebu_proto::init_logging("warn,fuser::session=error");
    match bridge::run(BridgeOptions {
        uri: args.uri,
        file: args.file,
        pidfile: args.pidfile,
        connections: args.connections,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zebu-nbd-fuse: {e}");
            ExitCode::FAILURE
        }
    }
}
