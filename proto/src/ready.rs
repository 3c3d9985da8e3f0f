//! Ready lines: the one line `zebu-replica` and `zebu-engine` print on
//! stdout once they serve, and that whoever started them (the node agent,
//! the tests, the benchmarks) waits for and reads their addresses from.
//!
//! Invariant: a binary prints its ready line only after every listener it
//! names is bound and its signal handlers are installed, and prints it
//! through [`std::fmt::Display`] of the types here; every reader parses it
//! with their `parse`, so the format has one definition.

use std::fmt;

/// `zebu-replica serving DIR on ADDR (id UUID, size N bytes, block size N,
/// io engine KIND, previous stop clean|unclean)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaReady {
    /// The replica directory.
    pub dir: String,
    /// gRPC `HOST:PORT`.
    pub address: String,
    /// The replica's id.
    pub id: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// The I/O backend in use (`uring` or `threads`).
    pub io_engine: String,
    /// Whether the previous run stopped cleanly.
    pub clean: bool,
}

impl fmt::Display for ReplicaReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "zebu-replica serving {} on {} (id {}, size {} bytes, block size {}, io engine {}, previous stop {})",
            self.dir,
            self.address,
            self.id,
            self.size_bytes,
            self.block_size,
            self.io_engine,
            if self.clean { "clean" } else { "unclean" },
        )
    }
}

impl ReplicaReady {
    /// Parses a replica's ready line; `None` for any other line.
    pub fn parse(line: &str) -> Option<ReplicaReady> {
        let rest = line.trim_end().strip_prefix("zebu-replica serving ")?;
        // DIR may contain anything; ADDR and the details never hold " (id ".
        let (head, details) = rest.rsplit_once(" (id ")?;
        let (dir, address) = head.rsplit_once(" on ")?;
        if address.is_empty() || address.contains(' ') {
            return None;
        }
        let details = details.strip_suffix(')')?;
        let (id, details) = details.split_once(", size ")?;
        let (size, details) = details.split_once(" bytes, block size ")?;
        let (block_size, details) = details.split_once(", io engine ")?;
        let (io_engine, stop) = details.split_once(", previous stop ")?;
        Some(ReplicaReady {
            dir: dir.to_owned(),
            address: address.to_owned(),
            id: id.to_owned(),
            size_bytes: size.parse().ok()?,
            block_size: block_size.parse().ok()?,
            io_engine: io_engine.to_owned(),
            clean: match stop {
                "clean" => true,
                "unclean" => false,
                _ => return None,
            },
        })
    }
}

/// `zebu-engine volume NAME ready: nbd LISTENER[, LISTENER]; control ADDR;
/// epoch N`, each listener `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineReady {
    /// The volume served.
    pub volume: String,
    /// The NBD listeners, as `unix:PATH` or `tcp:HOST:PORT`.
    pub nbd: Vec<String>,
    /// The control API's `HOST:PORT`.
    pub control: String,
    /// The epoch this run took.
    pub epoch: u64,
}

impl fmt::Display for EngineReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "zebu-engine volume {} ready: nbd {}; control {}; epoch {}",
            self.volume,
            self.nbd.join(", "),
            self.control,
            self.epoch
        )
    }
}

impl EngineReady {
    /// Parses an engine's ready line; `None` for any other line.
    pub fn parse(line: &str) -> Option<EngineReady> {
        let rest = line.trim_end().strip_prefix("zebu-engine volume ")?;
        let (head, epoch) = rest.rsplit_once("; epoch ")?;
        let (head, control) = head.rsplit_once("; control ")?;
        let (volume, nbd) = head.split_once(" ready: nbd ")?;
        if control.is_empty() || control.contains(' ') {
            return None;
        }
        Some(EngineReady {
            volume: volume.to_owned(),
            nbd: nbd.split(", ").map(str::to_owned).collect(),
            control: control.to_owned(),
            epoch: epoch.parse().ok()?,
        })
    }

    /// The path of the Unix NBD listener, if there is one.
    pub fn unix_socket(&self) -> Option<&str> {
        self.nbd.iter().find_map(|l| l.strip_prefix("unix:"))
    }

    /// `HOST:PORT` of the TCP NBD listener, if there is one.
    pub fn tcp(&self) -> Option<&str> {
        self.nbd.iter().find_map(|l| l.strip_prefix("tcp:"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_line_round_trips() {
        let r = ReplicaReady {
            dir: "/var/lib/zebu/d 1/on (id x".into(),
            address: "127.0.0.1:4000".into(),
            id: "5abeba00-2592-48f9-85d2-0f1be81805dd".into(),
            size_bytes: 134217728,
            block_size: 4096,
            io_engine: "uring".into(),
            clean: false,
        };
        let line = r.to_string();
        assert_eq!(ReplicaReady::parse(&line), Some(r.clone()));
        assert_eq!(ReplicaReady::parse(&format!("{line}\n")), Some(r));
        assert_eq!(
            ReplicaReady::parse(
                "zebu-replica serving /d on 1.2.3.4:5 (id u, size 7 bytes, block size 512, io engine threads, previous stop clean)"
            )
            .map(|r| (r.address, r.size_bytes, r.clean)),
            Some(("1.2.3.4:5".into(), 7, true))
        );
    }

    #[test]
    fn engine_line_round_trips() {
        let e = EngineReady {
            volume: "pvc-1".into(),
            nbd: vec![
                "unix:/run/zebu/engines/pvc-1.sock".into(),
                "tcp:127.0.0.1:10809".into(),
            ],
            control: "127.0.0.1:9000".into(),
            epoch: 7,
        };
        let line = e.to_string();
        assert_eq!(EngineReady::parse(&line), Some(e.clone()));
        assert_eq!(e.unix_socket(), Some("/run/zebu/engines/pvc-1.sock"));
        assert_eq!(e.tcp(), Some("127.0.0.1:10809"));
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        for other in [
            "",
            "INFO zebu_replica: zebu-replica serving /d on 1.2.3.4:5 (id u, size 7 bytes)",
            "zebu-replica serving /d on 1.2.3.4:5 (id u, size x bytes, block size 512, io engine uring, previous stop clean)",
            "zebu-replica serving /d on  (id u, size 7 bytes, block size 512, io engine uring, previous stop clean)",
            "zebu-replica serving /d on a:1 (id u, size 7 bytes, block size 512, io engine uring, previous stop maybe)",
            "zebu-engine volume v ready: nbd unix:/s; control 127.0.0.1:1; epoch x",
            "zebu-engine volume v ready: nbd unix:/s; control ; epoch 1",
            "zebu-engine volume v: nbd unix:/s; control a:1; epoch 1",
        ] {
            assert_eq!(ReplicaReady::parse(other), None, "{other}");
            assert_eq!(EngineReady::parse(other), None, "{other}");
        }
    }
}
