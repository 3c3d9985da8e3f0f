//! `zebu status`: is the driver up, and what is it.

use anyhow::bail;
use tonic::Code;
use zebu_proto::csi::{GetPluginInfoRequest, NodeGetInfoRequest, ProbeRequest};

use super::args::Format;
use super::driver::Driver;
use super::emit;
use super::error::{Call, Subject};
use super::render::StatusView;
use super::volume::list_volumes;
use zebu_common::context::DRIVER_NAME;

/// `zebu status`: GetPluginInfo, Probe, NodeGetInfo (if served) and the
/// volume count. Fails (after printing) if the driver is not ready.
pub async fn status(d: &Driver, format: Format) -> anyhow::Result<()> {
    let info = d
        .call(
            Call::new("GetPluginInfo", Subject::Driver),
            d.identity.clone().get_plugin_info(GetPluginInfoRequest {}),
        )
        .await?;
    if info.name != DRIVER_NAME {
        bail!(
            "the driver at {} is {:?}, not Zebu ({DRIVER_NAME}): check --endpoint",
            d.endpoint(),
            info.name
        );
    }
    let probe = d
        .call(
            Call::new("Probe", Subject::Driver),
            d.identity.clone().probe(ProbeRequest {}),
        )
        .await?;
    // An unset `ready` means ready (CSI spec).
    let ready = probe.ready.unwrap_or(true);
    let node_id = match d
        .call(
            Call::new("NodeGetInfo", Subject::Driver),
            d.node.clone().node_get_info(NodeGetInfoRequest {}),
        )
        .await
    {
        Ok(n) => Some(n.node_id),
        // A controller-only endpoint.
        Err(e) if e.code() == Code::Unimplemented => None,
        Err(e) => return Err(e.into()),
    };
    let volumes = if ready {
        Some(list_volumes(d).await?.len())
    } else {
        None
    };
    let view = StatusView {
        endpoint: d.endpoint().to_owned(),
        driver: info.name,
        version: info.vendor_version,
        ready,
        node_id,
        volumes,
    };
    emit(format, &view, || view.text());
    if !ready {
        bail!(
            "the driver at {} is up but not ready yet: retry in a moment, and check its log if it stays so",
            d.endpoint()
        );
    }
    Ok(())
}
