//! `zebu replica list`: replica modes and rebuild progress from the volume's
//! engine while it is attached, else where the replicas live.

use zebu_proto::engine::StatusRequest;

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
