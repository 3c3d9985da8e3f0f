//! The node plugin's own registration with the kubelet, in place of the
//! node-driver-registrar sidecar, and a gRPC health endpoint in place of the
//! livenessprobe sidecar.
//!
//! Registration: the kubelet watches its plugin registry directory
//! (`/var/lib/kubelet/plugins_registry`); a plugin that puts a Unix socket
//! there serving `pluginregistration.Registration` is asked `GetInfo` (its
//! type, name, CSI socket and versions), then told by
//! `NotifyRegistrationStatus` whether it was taken. On success the kubelet
//! calls NodeGetInfo and lists the driver in the node's `CSINode`.
//!
//! The kubelet's registration client sends a malformed `:authority` that
//! tonic refuses; [`authority`] repairs it on the way in.
//!
//! Invariants:
//! - The registration socket exists only while this process serves it: a
//!   stale one (a killed plugin) is replaced on start, and the socket is
//!   removed on shutdown, so the kubelet deregisters a stopped plugin.
//! - The endpoint handed to the kubelet is the CSI socket's path as the
//!   kubelet's host sees it (`--kubelet-csi-path`, for a plugin in a
//!   container whose paths differ).

pub mod authority;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use zebu_common::context::DRIVER_NAME;
use zebu_proto::pluginregistration as pr;

/// The CSI versions this driver speaks, as the kubelet wants them listed.
const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// The registration socket's file name in the registry directory.
pub fn socket_name() -> String {
    format!("{DRIVER_NAME}-reg.sock")
}

/// The Registration service.
#[derive(Clone, Debug)]
pub struct Registration {
    csi_path: PathBuf,
    registered: Arc<AtomicBool>,
}

impl Registration {
    /// Registers the CSI socket at `csi_path` (as the kubelet sees it).
    pub fn new(csi_path: PathBuf) -> Self {
        Registration {
            csi_path,
            registered: Arc::default(),
        }
    }

    /// Whether the kubelet said it took the plugin.
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }
}

#[tonic::async_trait]
impl pr::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _r: Request<pr::InfoRequest>,
    ) -> Result<Response<pr::PluginInfo>, Status> {
        Ok(Response::new(pr::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: DRIVER_NAME.into(),
            endpoint: self.csi_path.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        r: Request<pr::RegistrationStatus>,
    ) -> Result<Response<pr::RegistrationStatusResponse>, Status> {
        let st = r.into_inner();
        self.registered
            .store(st.plugin_registered, Ordering::Release);
        if st.plugin_registered {
            tracing::info!(csi = %self.csi_path.display(), "the kubelet registered the plugin");
        } else {
            tracing::error!(error = %st.error, "the kubelet refused the plugin");
        }
        Ok(Response::new(pr::RegistrationStatusResponse {}))
    }
}

/// A registration socket served until dropped (which removes it).
pub struct Registered {
    path: PathBuf,
    tasks: Vec<tokio::task::AbortHandle>,
    service: Registration,
}

impl Registered {
    /// Whether the kubelet took the plugin.
    pub fn registered(&self) -> bool {
        self.service.registered()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves registration of the CSI socket `csi_path` in the kubelet's
/// plugin registry directory `registry_dir`: connections are accepted on
/// the registration socket and relayed through [`authority`] to a tonic
/// server on in-process pipes.
pub fn serve(registry_dir: &Path, csi_path: PathBuf) -> anyhow::Result<Registered> {
    use anyhow::Context;
    let path = registry_dir.join(socket_name());
    // Creates the directory and replaces a stale socket, as for every socket.
    let mut listener = zebu_common::grpc::bind_unix(&path)
        .with_context(|| format!("binding the registration socket {}", path.display()))?;
    let service = Registration::new(csi_path);
    let (pipes, incoming) = tokio::sync::mpsc::channel::<tokio::io::DuplexStream>(4);
    let server = tokio::spawn({
        let service = service.clone();
        async move {
            let incoming =
                tokio_stream::wrappers::ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(pr::registration_server::RegistrationServer::new(service))
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(error = %e, "the registration server failed");
            }
        }
    });
    let accept = tokio::spawn({
        let path = path.clone();
        async move {
            loop {
                let conn = match listener.next().await {
                    Some(Ok(conn)) => conn,
                    Some(Err(e)) => {
                        tracing::error!(socket = %path.display(), error = %e, "accepting on the registration socket failed");
                        return;
                    }
                    None => return,
                };
                let (outer, inner) = tokio::io::duplex(64 << 10);
                if pipes.send(inner).await.is_err() {
                    return;
                }
                tokio::spawn(async move {
                    if let Err(e) = authority::relay(conn, outer).await {
                        tracing::warn!(error = %e, "a registration connection was closed");
                    }
                });
            }
        }
    });
    Ok(Registered {
        path,
        tasks: vec![server.abort_handle(), accept.abort_handle()],
        service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pr::registration_server::Registration as _;

    #[tokio::test]
    async fn info_names_the_driver_and_its_socket() {
        let r = Registration::new("/var/lib/kubelet/plugins/zebu.csi.dev/csi.sock".into());
        let info = r
            .get_info(Request::new(pr::InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "zebu.csi.dev");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/zebu.csi.dev/csi.sock"
        );
        assert_eq!(info.supported_versions, ["1.0.0"]);
        assert!(!r.registered());
        r.notify_registration_status(Request::new(pr::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        }))
        .await
        .unwrap();
        assert!(r.registered());
    }
}
