//! `zebu replica list`: replica modes and rebuild progress from the volume's
//! engine while it is attached, else where the replicas live. `zebu replica
//! scrub`: the engine's check of every stored block against its CRC.

use anyhow::bail;
use serde::Serialize;
use zebu_proto::engine::{ReplicaScrub, ScrubRequest, StatusRequest};

use super::args::Format;
use super::driver::Driver;
use super::emit;
use super::render::ReplicaReport;
use super::volume::get_volume;

/// `zebu replica list VOLUME`.
pub async fn list(d: &Driver, volume: &str, format: Format) -> anyhow::Result<()> {
    let v = get_volume(d, volume).await?;
    let report = match v.engine.as_deref() {
        None => ReplicaReport::placement_only(
            &v,
            "detached: replica modes and rebuild progress are known only while the volume \
             is attached (its engine runs then); placement:"
                .to_owned(),
        ),
        Some(addr) => {
            let status = match d.engine(addr).await {
                Ok(mut client) => d
                    .engine_call(addr, "Status", client.status(StatusRequest {}))
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match status {
                Ok(st) => ReplicaReport::live(&v, addr, &st),
                Err(e) => ReplicaReport::placement_only(
                    &v,
                    format!("{e:#}; placement as the driver records it:"),
                ),
            }
        }
    };
    emit(format, &report, || report.text());
    Ok(())
}

/// One replica's line of `zebu replica scrub`.
#[derive(Serialize)]
struct ScrubLine<'a> {
    address: &'a str,
    id: &'a str,
    blocks_checked: u64,
    corrupt_blocks: u64,
    /// The first corrupt blocks, `LAYER:BLOCK`.
    corrupt: &'a [String],
    repaired: bool,
    error: &'a str,
}

impl<'a> From<&'a ReplicaScrub> for ScrubLine<'a> {
    fn from(r: &'a ReplicaScrub) -> Self {
        ScrubLine {
            address: &r.address,
            id: &r.id,
            blocks_checked: r.blocks_checked,
            corrupt_blocks: r.corrupt_blocks,
            corrupt: &r.corrupt,
            repaired: r.repaired,
            error: &r.error,
        }
    }
}

/// `zebu replica scrub VOLUME [--repair]`: runs through the volume's engine,
/// so the volume must be attached. Fails while corrupt blocks remain or a
/// replica could not be scrubbed.
pub async fn scrub(d: &Driver, volume: &str, repair: bool, format: Format) -> anyhow::Result<()> {
    let v = get_volume(d, volume).await?;
    let Some(addr) = v.engine.as_deref() else {
        bail!(
            "volume {volume} is detached: a scrub runs through its engine, which runs only while \
             the volume is attached; attach it and scrub again"
        );
    };
    let mut client = d.engine(addr).await?;
    let replicas = d
        .engine_call(
            addr,
            "Scrub",
            client.scrub(ScrubRequest {
                repair,
                max_bytes_per_sec: 0,
            }),
        )
        .await?
        .replicas;
    let lines: Vec<ScrubLine> = replicas.iter().map(ScrubLine::from).collect();
    emit(format, &lines, || {
        let mut t = format!(
            "{:<24} {:<38} {:>10} {:>8} {:<9} {}\n",
            "ADDRESS", "ID", "CHECKED", "CORRUPT", "REPAIRED", "FIRST CORRUPT / ERROR"
        );
        for l in &lines {
            let detail = if l.error.is_empty() {
                l.corrupt
                    .iter()
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                l.error.to_owned()
            };
            t.push_str(&format!(
                "{:<24} {:<38} {:>10} {:>8} {:<9} {}\n",
                l.address,
                l.id,
                l.blocks_checked,
                l.corrupt_blocks,
                if l.repaired { "yes" } else { "-" },
                detail
            ));
        }
        t
    });
    let left: Vec<&str> = replicas
        .iter()
        .filter(|r| r.unresolved())
        .map(|r| r.address.as_str())
        .collect();
    if !left.is_empty() {
        bail!(
            "corrupt blocks remain, or the scrub failed, on replica(s) {}{}",
            left.join(", "),
            if repair {
                ""
            } else {
                " (run again with --repair to resync them from a clean replica)"
            }
        );
    }
    Ok(())
}
