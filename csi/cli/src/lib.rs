//! The `zebu` command line: volumes, snapshots, attachments, replicas and
//! driver health, spoken to the Zebu CSI driver over its CSI socket the way
//! Kubernetes' sidecars and kubelet do (plus the engine control API for
//! replica detail).
//!
//! - [`args`]: the command-line grammar (clap).
//! - [`driver`]: the connection, calls bounded by `--timeout`.
//! - [`error`]: gRPC codes and dial failures turned into actionable messages.
//! - [`request`]: CSI requests built from arguments.
//! - [`paging`]: following `next_token` through list calls.
//! - [`render`]: tables, JSON views, sizes and times.
//! - [`state`]: attachment records under `--state-dir`.
//! - [`volume`], [`attachment`], [`snapshot`], [`replica`], [`status`]: the
//!   commands.

pub mod args;
pub mod attachment;
pub mod caps;
pub mod driver;
pub mod error;
pub mod paging;
pub mod render;
pub mod replica;
pub mod request;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod volume;

pub use args::{Cli, Command};

use args::{Format, ReplicaCmd, SnapshotCmd, VolumeCmd};
use driver::Driver;
use state::StateDir;

/// Runs one command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let driver = Driver::connect(&cli.endpoint, cli.timeout).await?;
    let state = StateDir::new(&cli.state_dir);
    match cli.command {
        Command::Volume(cmd) => match cmd {
            VolumeCmd::Create(a) => volume::create(&driver, &a).await,
            VolumeCmd::List(o) => volume::list(&driver, o.format).await,
            VolumeCmd::Get { id, output } => volume::get(&driver, &id, output.format).await,
            VolumeCmd::Delete { id } => volume::delete(&driver, &state, &id).await,
            VolumeCmd::Expand { id, size } => volume::expand(&driver, &state, &id, size).await,
            VolumeCmd::Attach(a) => attachment::attach(&driver, &state, &a).await,
            VolumeCmd::Detach { id } => attachment::detach(&driver, &state, &id).await,
        },
        Command::Snapshot(cmd) => match cmd {
            SnapshotCmd::Create {
                name,
                volume,
                output,
            } => snapshot::create(&driver, &name, &volume, output.format).await,
            SnapshotCmd::List { volume, output } => {
                snapshot::list(&driver, volume.as_deref(), output.format).await
            }
            SnapshotCmd::Delete { id } => snapshot::delete(&driver, &id).await,
        },
        Command::Replica(ReplicaCmd::List { volume, output }) => {
            replica::list(&driver, &volume, output.format).await
        }
        Command::Replica(ReplicaCmd::Scrub {
            volume,
            repair,
            output,
        }) => replica::scrub(&driver, &volume, repair, output.format).await,
        Command::Status(o) => status::status(&driver, o.format).await,
    }
}

/// Prints `text` as is for tables, or `view` as JSON.
pub(crate) fn emit<T: serde::Serialize>(format: Format, view: &T, text: impl FnOnce() -> String) {
    match format {
        Format::Table => print!("{}", text()),
        Format::Json => print!("{}", render::json(view)),
    }
}

#[cfg(test)]
mod tests {
    use super::args::*;
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("zebu").chain(argv.iter().copied()))
    }

    fn err_kind(argv: &[&str]) -> clap::error::ErrorKind {
        parse(argv).expect_err("should be rejected").kind()
    }

    #[test]
    fn global_options() {
        let c = parse(&["status"]).unwrap();
        if std::env::var_os("ZEBU_ENDPOINT").is_none() {
            assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        }
        if std::env::var_os("ZEBU_CLI_STATE").is_none() {
            assert_eq!(c.state_dir, std::path::Path::new(DEFAULT_STATE_DIR));
        }
        assert_eq!(c.timeout, std::time::Duration::from_secs(300));
        let c = parse(&[
            "volume",
            "list",
            "--endpoint",
            "127.0.0.1:9000",
            "-o",
            "json",
            "--state-dir",
            "/tmp/s",
            "--timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(c.endpoint, "127.0.0.1:9000");
        assert_eq!(c.state_dir, std::path::Path::new("/tmp/s"));
        assert_eq!(c.timeout, std::time::Duration::from_secs(120));
        assert!(matches!(
            c.command,
            Command::Volume(VolumeCmd::List(OutputArgs {
                format: Format::Json
            }))
        ));
    }

    #[test]
    fn volume_create() {
        let c = parse(&["volume", "create", "data", "--size", "1G"]).unwrap();
        let Command::Volume(VolumeCmd::Create(a)) = c.command else {
            panic!()
        };
        assert_eq!(a.name, "data");
        assert_eq!(a.size, 1 << 30);
        assert_eq!(a.replicas, 3);
        assert_eq!(a.fstype, None);
        assert!(!a.block);
        assert_eq!(a.output.format, Format::Table);
        let c = parse(&[
            "volume",
            "create",
            "d",
            "--size",
            "512M",
            "--replicas",
            "1",
            "--fstype",
            "xfs",
            "--clone-of",
            "v1",
        ])
        .unwrap();
        let Command::Volume(VolumeCmd::Create(a)) = c.command else {
            panic!()
        };
        assert_eq!(a.replicas, 1);
        assert_eq!(a.fstype, Some(FsType::Xfs));
        assert_eq!(a.clone_of.as_deref(), Some("v1"));
    }

    #[test]
    fn volume_create_rejects_bad_invocations() {
        use clap::error::ErrorKind as K;
        assert_eq!(
            err_kind(&[
                "volume",
                "create",
                "d",
                "--size",
                "1G",
                "--from-snapshot",
                "s",
                "--clone-of",
                "v"
            ]),
            K::ArgumentConflict
        );
        assert_eq!(
            err_kind(&[
                "volume", "create", "d", "--size", "1G", "--block", "--fstype", "ext4"
            ]),
            K::ArgumentConflict
        );
        assert_eq!(
            err_kind(&["volume", "create", "d"]),
            K::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(&["volume", "create", "--size", "1G"]),
            K::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(&["volume", "create", "d", "--size", "1X"]),
            K::ValueValidation
        );
        assert_eq!(
            err_kind(&["volume", "create", "d", "--size", "0"]),
            K::ValueValidation
        );
        assert_eq!(
            err_kind(&["volume", "create", "d", "--size", "9000P"]),
            K::ValueValidation
        );
        assert_eq!(
            err_kind(&["volume", "create", "d", "--size", "1G", "--replicas", "0"]),
            K::ValueValidation
        );
        assert_eq!(
            err_kind(&["volume", "create", "d", "--size", "1G", "--fstype", "btrfs"]),
            K::InvalidValue
        );
        assert_eq!(err_kind(&["volume", "list", "-o", "yaml"]), K::InvalidValue);
        let msg = parse(&["volume", "create", "d", "--size", "12X"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown unit"), "{msg}");
    }

    #[test]
    fn volume_attach() {
        let c = parse(&[
            "volume",
            "attach",
            "v1",
            "--mount",
            "/mnt/v1",
            "--read-only",
        ])
        .unwrap();
        let Command::Volume(VolumeCmd::Attach(a)) = c.command else {
            panic!()
        };
        assert_eq!(a.mount.as_deref(), Some(std::path::Path::new("/mnt/v1")));
        assert!(a.block.is_none() && a.read_only && a.fstype.is_none());
        let c = parse(&["volume", "attach", "v1", "--block", "/dev/zebu-v1"]).unwrap();
        let Command::Volume(VolumeCmd::Attach(a)) = c.command else {
            panic!()
        };
        assert_eq!(
            a.block.as_deref(),
            Some(std::path::Path::new("/dev/zebu-v1"))
        );

        use clap::error::ErrorKind as K;
        assert_eq!(
            err_kind(&["volume", "attach", "v1"]),
            K::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(&["volume", "attach", "v1", "--mount", "/a", "--block", "/b"]),
            K::ArgumentConflict
        );
        assert_eq!(
            err_kind(&["volume", "attach", "v1", "--block", "/b", "--fstype", "xfs"]),
            K::ArgumentConflict
        );
    }

    #[test]
    fn other_commands() {
        let c = parse(&["volume", "expand", "v1", "20G"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Volume(VolumeCmd::Expand { ref id, size }) if id == "v1" && size == 20 << 30
        ));
        assert!(parse(&["volume", "expand", "v1", "big"]).is_err());
        assert!(matches!(
            parse(&["volume", "detach", "v1"]).unwrap().command,
            Command::Volume(VolumeCmd::Detach { .. })
        ));
        assert!(matches!(
            parse(&["volume", "get", "v1", "-o", "json"])
                .unwrap()
                .command,
            Command::Volume(VolumeCmd::Get {
                output: OutputArgs {
                    format: Format::Json
                },
                ..
            })
        ));
        let c = parse(&["snapshot", "create", "s1", "--volume", "v1"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Snapshot(SnapshotCmd::Create { ref name, ref volume, .. })
                if name == "s1" && volume == "v1"
        ));
        assert!(parse(&["snapshot", "create", "s1"]).is_err());
        let c = parse(&["snapshot", "list", "--volume", "v1"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Snapshot(SnapshotCmd::List { volume: Some(ref v), .. }) if v == "v1"
        ));
        assert!(matches!(
            parse(&["snapshot", "list"]).unwrap().command,
            Command::Snapshot(SnapshotCmd::List { volume: None, .. })
        ));
        assert!(matches!(
            parse(&["replica", "list", "v1", "-o", "json"])
                .unwrap()
                .command,
            Command::Replica(ReplicaCmd::List { .. })
        ));
        assert!(matches!(
            parse(&["replica", "scrub", "v1", "--repair"])
                .unwrap()
                .command,
            Command::Replica(ReplicaCmd::Scrub { repair: true, .. })
        ));
        assert!(parse(&["replica", "scrub"]).is_err());
        assert!(parse(&["replica", "list"]).is_err());
        assert!(parse(&["volume", "delete"]).is_err());
        assert!(parse(&["volume", "delete", "v1", "-o", "json"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        assert!(parse(&["status", "--timeout", "0"]).is_err());
        assert!(parse(&["status", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn help_and_version() {
        use clap::error::ErrorKind as K;
        assert_eq!(err_kind(&["--help"]), K::DisplayHelp);
        assert_eq!(err_kind(&["--version"]), K::DisplayVersion);
        assert_eq!(err_kind(&[]), K::DisplayHelpOnMissingArgumentOrSubcommand);
        // The clap definition is consistent.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
