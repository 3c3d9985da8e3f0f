//! `zebu-csi`: the Zebu CSI driver.
//!
//! - `controller`: CSI Identity + Controller and the node registry on a Unix
//!   socket; state in sled under `--state`.
//! - `node`: CSI Identity + Node on a Unix socket and the node agent (which
//!   runs replica and engine processes) on `--agent-listen`; joins the
//!   controller at `--controller`.
//! - `standalone`: both in one process, for one host without Kubernetes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use zebu_agent::{Agent, AgentConfig};
use zebu_common::auth::Token;
use zebu_common::grpc;
use zebu_csi::controller::events::KubeEvents;
use zebu_csi::controller::forward::Forwarding;
use zebu_csi::controller::{ClusterParts, Controller, ControllerConfig, reconcile};
use zebu_csi::identity::{IdentityService, Readiness};
use zebu_csi::leader::{ElectionConfig, Leadership};
use zebu_csi::node::{NodeConfig, NodeService};
use zebu_csi::node_lease::{self, NodeLeases};
use zebu_csi::registry::Registry;
use zebu_csi::store::{KubeStore, SledStore, Store};
use zebu_proto::agent::registry_client::RegistryClient;
use zebu_proto::agent::registry_server::RegistryServer;
use zebu_proto::csi::controller_server::ControllerServer;
use zebu_proto::csi::identity_server::IdentityServer;
use zebu_proto::csi::node_server::NodeServer;

#[derive(Parser)]
#[command(
    name = "zebu-csi",
    version,
    about = "Zebu CSI driver: replicated block volumes",
    after_help = "Durations are a number and a unit, several may be joined: 500ms, 8s, 2m, 1h30m, 7d."
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// CSI controller (Identity + Controller) and node registry.
    Controller(ControllerArgs),
    /// CSI node plugin (Identity + Node) with the node agent.
    Node(NodeArgs),
    /// Controller and node in one process, for one host without Kubernetes.
    Standalone(StandaloneArgs),
    /// Print the custom resource definitions of the cluster store (YAML,
    /// for kubectl apply -f -).
    Crds,
    /// Create the Secret holding the node agents' bearer token (a new random
    /// token) unless it exists; the install runs this as a Job.
    AgentToken(AgentTokenArgs),
}

#[derive(Args)]
struct AgentTokenArgs {
    /// Name of the Secret (the token is its key `token`).
    #[arg(long, default_value = "zebu-agent-token")]
    secret: String,
    /// Namespace of the Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "zebu-system")]
    namespace: String,
    /// Kubeconfig; without it, the in-cluster service account, $KUBECONFIG
    /// or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

/// Where the controller keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// An embedded store in the state directory (one host).
    Sled,
    /// Custom resources in the Kubernetes API (zebu-csi crds installs their definitions).
    Kubernetes,
}

#[derive(Args, Clone)]
struct StoreOpts {
    /// Where the controller keeps volumes, snapshots and nodes.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// Kubeconfig for --store kubernetes; without it, the in-cluster
    /// service account, $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// With --store kubernetes: the driver's namespace, where its Leases
    /// live (the controllers' election, the nodes' heartbeats).
    #[arg(long, env = "POD_NAMESPACE", default_value = "zebu-system")]
    namespace: String,
}

#[derive(Args)]
struct Common {
    /// CSI endpoint to serve, unix:///path/to/csi.sock.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/zebu/csi.sock"
    )]
    endpoint: String,
    /// State directory (sled store, agent process records, logs).
    #[arg(long, default_value = "/var/lib/zebu")]
    state: PathBuf,
    /// File holding the bearer token of the node agents' API: a node's agent
    /// refuses calls without it, a controller presents it. Required by
    /// controllers on --store kubernetes (mount it from a Secret).
    #[arg(long, env = "ZEBU_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// Serve the gRPC health protocol (grpc.health.v1, what a kubelet
    /// `grpc` probe asks) on HOST:PORT: SERVING once the driver is ready
    /// (and, for a node registering with the kubelet, registered).
    #[arg(long)]
    health_listen: Option<String>,
}

impl Common {
    /// The agent token, if a file names one.
    fn agent_token(&self) -> Result<Option<Token>> {
        self.agent_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()
            .map_err(anyhow::Error::from)
    }
}

#[derive(Args, Clone)]
struct ControllerOpts {
    /// Replicas per volume when the StorageClass does not say.
    #[arg(long, default_value_t = 3)]
    default_replicas: u32,
    /// Schedulable space in percent of a disk's capacity (replicas are thin).
    #[arg(long, default_value_t = 200)]
    over_provisioning: u64,
    /// Allow two replicas of one volume on the same disk when nothing else fits.
    #[arg(long)]
    allow_same_disk: bool,
    /// How long a replica may be unreachable before it is replaced elsewhere.
    #[arg(long, default_value = "60s", value_parser = zebu_proto::duration::parse)]
    replica_replacement_delay: Duration,
    /// Engine I/O timeout (e.g. 8s) after which a silent replica is ejected
    /// (empty: the engine's default).
    #[arg(long, default_value = "", value_parser = check_duration)]
    io_timeout: String,
    /// How often each attached volume is scrubbed: every replica reads its
    /// data back and checks it against its stored CRCs, and a replica found
    /// corrupt is resynced from a healthy one (e.g. 7d, 24h; off for never).
    /// Counted from each replica's last clean scrub, across attachments.
    #[arg(long, default_value = "7d", value_parser = check_interval)]
    scrub_interval: String,
    /// Read rate limit of a scheduled scrub, per replica, per second.
    #[arg(long, default_value = "64M", value_parser = check_rate)]
    scrub_rate: String,
    /// How often the controller reconciles processes with its records.
    #[arg(long, default_value = "2s", value_parser = zebu_proto::duration::parse)]
    reconcile_interval: Duration,
}

#[derive(Args, Clone)]
struct NodeOpts {
    /// This node's id (as reported by NodeGetInfo).
    #[arg(long)]
    node_id: Option<String>,
    /// Directory for replica data; repeat for several disks. Default: three
    /// directories under `<state>/disks` (so the default three replicas of a
    /// volume can be placed on one host; they share its physical disk).
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Address of the node agent's gRPC server (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    agent_listen: String,
    /// Most volumes attached to this node at once.
    #[arg(long, default_value_t = 64)]
    max_volumes: u64,
    /// With --store kubernetes: how long this node's heartbeat Lease lasts
    /// without renewal (renewed four times per duration); a controller
    /// counts the node lost, and its replicas' replacement delay, from its
    /// expiry.
    #[arg(long, default_value = "40s", value_parser = zebu_proto::duration::parse)]
    node_lease_duration: Duration,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    store: StoreOpts,
    /// This controller's identity in the election (default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// With --store kubernetes: serve the Controller service on HOST:PORT
    /// (bearer token required) so that followers relay their calls here
    /// while this controller leads, instead of answering UNAVAILABLE.
    #[arg(long)]
    forward_listen: Option<String>,
    /// The address followers dial for --forward-listen (default: the
    /// listening address; in a pod, $(POD_IP):PORT).
    #[arg(long)]
    forward_advertise: Option<String>,
    #[command(flatten)]
    opts: ControllerOpts,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    node: NodeOpts,
    /// Where the node registers: with --store kubernetes it writes its
    /// ZebuNode itself (and needs --agent-token-file); with sled (the
    /// default) it heartbeats to every --controller.
    #[command(flatten)]
    store: StoreOpts,
    /// A controller's CSI endpoint (its node registry), unix:///path; repeat
    /// it for every controller of an election, so whichever leads knows the
    /// node.
    #[arg(long)]
    controller: Vec<String>,
    /// Register with the kubelet through its plugin registry directory
    /// (usually /var/lib/kubelet/plugins_registry), as node-driver-registrar
    /// would.
    #[arg(long)]
    kubelet_registry: Option<PathBuf>,
    /// The CSI socket's path as the kubelet's host sees it (default: the
    /// --endpoint path; differs when this runs in a container).
    #[arg(long)]
    kubelet_csi_path: Option<PathBuf>,
    /// Move the processes that serve attached volumes (replicas, engines,
    /// FUSE bridges) into this cgroup (a path relative to each hierarchy's
    /// root, e.g. zebu), so that they outlive this process's container and
    /// the next node plugin adopts them. For a node plugin in a Pod: needs
    /// the host's cgroup filesystem at --cgroup-root and `hostPID: true`.
    #[arg(long)]
    data_path_cgroup: Option<String>,
    /// Where the host's cgroup hierarchies are mounted (for
    /// --data-path-cgroup).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
}

#[derive(Args)]
struct StandaloneArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    store: StoreOpts,
    #[command(flatten)]
    node: NodeOpts,
    #[command(flatten)]
    opts: ControllerOpts,
}

/// A duration the engine accepts (or empty), kept as written (for its
/// command line).
fn check_duration(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    zebu_proto::duration::parse(s).map(|_| s.trim().to_owned())
}

/// An interval the engine accepts, kept as written (for its command line).
fn check_interval(s: &str) -> Result<String, String> {
    zebu_proto::duration::parse_interval(s).map(|_| s.trim().to_owned())
}

/// A rate limit the engine accepts, kept as written (for its command line).
fn check_rate(s: &str) -> Result<String, String> {
    zebu_proto::size::parse_rate(s).map(|_| s.trim().to_owned())
}

fn unix_path(endpoint: &str) -> Result<PathBuf> {
    match grpc::Addr::parse(endpoint)? {
        grpc::Addr::Unix(p) => Ok(p),
        grpc::Addr::Tcp(_) => {
            bail!("--endpoint must be a Unix socket (unix:///path), got {endpoint:?}")
        }
    }
}

fn controller_config(o: &ControllerOpts, agent_token: Option<Token>) -> Result<ControllerConfig> {
    if o.default_replicas == 0 || o.default_replicas > zebu_csi::controller::MAX_REPLICAS {
        bail!(
            "--default-replicas must be from 1 to {}",
            zebu_csi::controller::MAX_REPLICAS
        );
    }
    Ok(ControllerConfig {
        default_replicas: o.default_replicas,
        over_provisioning_percent: o.over_provisioning.max(1),
        allow_same_disk: o.allow_same_disk,
        replacement_delay: o.replica_replacement_delay,
        io_timeout: o.io_timeout.clone(),
        scrub_interval: o.scrub_interval.clone(),
        scrub_rate: o.scrub_rate.clone(),
        agent_token,
    })
}

fn open_store(state: &std::path::Path, opts: &StoreOpts) -> Result<Arc<dyn Store>> {
    if opts.store == StoreKind::Kubernetes {
        let store = KubeStore::connect(opts.kubeconfig.as_deref())
            .context("opening the state store in the Kubernetes API")?;
        return Ok(Arc::new(store));
    }
    if opts.kubeconfig.is_some() {
        bail!("--kubeconfig is for --store kubernetes");
    }
    std::fs::create_dir_all(state)
        .with_context(|| format!("creating state directory {}", state.display()))?;
    let store = SledStore::open(&state.join("store"))
        .with_context(|| format!("opening the state store in {}", state.display()))?;
    Ok(Arc::new(store))
}

/// Starts the node agent: binds its listener, then starts supervising.
async fn start_agent(
    state: &std::path::Path,
    node: &NodeOpts,
) -> Result<(Agent, TcpListener, String)> {
    let node_id = match &node.node_id {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name for --node-id")?
            .trim()
            .to_owned(),
    };
    let disks = if node.disks.is_empty() {
        (1..=3)
            .map(|i| state.join("disks").join(i.to_string()))
            .collect()
    } else {
        node.disks.clone()
    };
    let listener = TcpListener::bind(&node.agent_listen)
        .await
        .with_context(|| format!("binding the node agent to {}", node.agent_listen))?;
    let addr = listener.local_addr()?.to_string();
    let mut cfg = AgentConfig::new(node_id.clone(), disks, state.join("agent"))
        .context("configuring the node agent")?;
    cfg.max_volumes = node.max_volumes;
    cfg.advertise_address = addr.clone();
    // Replicas and engines bind the agent's host, so a controller that can
    // reach the agent can reach them.
    cfg.listen_host = listener.local_addr()?.ip().to_string();
    let agent = Agent::start(cfg).await.context("starting the node agent")?;
    Ok((agent, listener, node_id))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run(cli: Cli) -> Result<()> {
    let readiness = Readiness::default();
    match cli.mode {
        Mode::Controller(a) => {
            let sock = unix_path(&a.common.endpoint)?;
            let token = a.common.agent_token()?;
            if token.is_none() && a.store.store == StoreKind::Kubernetes {
                bail!(
                    "a controller in a cluster needs --agent-token-file: the node agents' API \
                     (which creates processes and deletes data) must not be open to anyone who \
                     can reach a node"
                );
            }
            let store = open_store(&a.common.state, &a.store)?;
            let forward = match (&a.forward_listen, a.store.store) {
                (Some(_), StoreKind::Sled) => {
                    bail!(
                        "--forward-listen is for --store kubernetes (there is no election on sled)"
                    )
                }
                (Some(addr), StoreKind::Kubernetes) => {
                    let l = TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding --forward-listen {addr}"))?;
                    let local = l.local_addr()?;
                    let advertise = match &a.forward_advertise {
                        Some(x) => x.clone(),
                        None if local.ip().is_unspecified() => bail!(
                            "--forward-listen {addr} listens on every address: say which one \
                             followers dial with --forward-advertise (e.g. $(POD_IP):{})",
                            local.port()
                        ),
                        None => local.to_string(),
                    };
                    Some((l, advertise))
                }
                (None, _) => None,
            };
            let parts = match a.store.store {
                StoreKind::Sled => ClusterParts::default(),
                StoreKind::Kubernetes => {
                    elect(&a, forward.as_ref().map(|(_, adv)| adv.clone())).await?
                }
            };
            let ctl =
                Controller::in_cluster(store.clone(), controller_config(&a.opts, token)?, parts);
            let reconciler = tokio::spawn(reconcile::run(ctl.clone(), a.opts.reconcile_interval));
            let forward_server = forward.map(|(listener, _)| {
                tokio::spawn(
                    Server::builder()
                        .add_service(ControllerServer::with_interceptor(
                            ctl.clone(),
                            zebu_common::auth::Require(ctl.config().agent_token.clone()),
                        ))
                        .serve_with_incoming(TcpListenerStream::new(listener)),
                )
            });
            let incoming =
                grpc::bind_unix(&sock).with_context(|| format!("binding {}", sock.display()))?;
            readiness.set_ready();
            let _health = serve_health(&a.common, readiness.clone(), None).await?;
            println!("zebu-csi controller ready: csi unix://{}", sock.display());
            let token = ctl.config().agent_token.clone();
            Server::builder()
                .add_service(IdentityServer::new(IdentityService::new(readiness)))
                .add_service(Forwarding::new(
                    ControllerServer::new(ctl.clone()),
                    ctl,
                    token,
                ))
                .add_service(RegistryServer::new(Registry::new(store)))
                .serve_with_incoming_shutdown(incoming, shutdown_signal())
                .await
                .context("serving CSI")?;
            reconciler.abort();
            if let Some(f) = forward_server {
                f.abort();
            }
        }
        Mode::Node(a) => {
            let sock = unix_path(&a.common.endpoint)?;
            if let Some(name) = &a.data_path_cgroup {
                if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "..") {
                    bail!("--data-path-cgroup {name:?}: give a relative cgroup path such as zebu");
                }
                zebu_common::cgroup::init(&a.cgroup_root, name)
                    .context("setting up --data-path-cgroup")?;
            }
            let token = a.common.agent_token()?;
            match a.store.store {
                StoreKind::Sled if a.controller.is_empty() => {
                    bail!(
                        "a node needs --controller (its controller's socket), or --store kubernetes"
                    )
                }
                StoreKind::Kubernetes if token.is_none() => bail!(
                    "a node in a cluster needs --agent-token-file: its agent's API (which \
                     creates processes and deletes data) must not be open to anyone who can \
                     reach the node"
                ),
                _ => {}
            }
            let (agent, listener, node_id) = start_agent(&a.common.state, &a.node).await?;
            let agent_addr = listener.local_addr()?.to_string();
            let agent_server = tokio::spawn(
                Server::builder()
                    .add_service(agent.service_requiring(token.clone()))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            let node = NodeService::new(NodeConfig {
                node_id: node_id.clone(),
                max_volumes: a.node.max_volumes,
                state_dir: a.common.state.join("node"),
            });
            let controllers = a.controller.clone();
            // Registration: straight into the cluster's store (and a Lease
            // renewed as heartbeat), or through the controllers' registries.
            let (registry, lease) = match a.store.store {
                StoreKind::Kubernetes => (
                    Some(Registry::new(open_store(&a.common.state, &a.store)?)),
                    Some(renew_node_lease(&a.store, &node_id, &a.node).await?),
                ),
                StoreKind::Sled => (None, None),
            };
            let (hb_agent, hb_ready) = (agent.clone(), readiness.clone());
            let heartbeat = tokio::spawn(async move {
                loop {
                    if let Some(registry) = &registry {
                        match hb_agent.node_info().await {
                            Ok(info) => match registry.record(&info) {
                                Ok(()) => hb_ready.set_ready(),
                                Err(s) => {
                                    tracing::warn!(error = %s.message(), "recording this node failed")
                                }
                            },
                            Err(e) => tracing::warn!(error = %e, "reading the node's disks failed"),
                        }
                    }
                    for controller in &controllers {
                        match heartbeat(controller, &hb_agent).await {
                            Ok(()) => hb_ready.set_ready(),
                            Err(e) => tracing::warn!(
                                controller = %controller,
                                error = %format!("{e:#}"),
                                "heartbeat to a controller failed"
                            ),
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
            let incoming =
                grpc::bind_unix(&sock).with_context(|| format!("binding {}", sock.display()))?;
            let registration = match &a.kubelet_registry {
                Some(dir) => Some(Arc::new(zebu_csi::kubelet::serve(
                    dir,
                    a.kubelet_csi_path.clone().unwrap_or_else(|| sock.clone()),
                )?)),
                None => None,
            };
            let health = serve_health(&a.common, readiness.clone(), registration.clone()).await?;
            println!(
                "zebu-csi node {node_id} ready: csi unix://{}; agent {agent_addr}{}",
                sock.display(),
                health
                    .as_ref()
                    .map(|h| format!("; health {}", h.addr))
                    .unwrap_or_default()
            );
            Server::builder()
                .add_service(IdentityServer::new(IdentityService::new(readiness)))
                .add_service(NodeServer::new(node))
                .serve_with_incoming_shutdown(incoming, shutdown_signal())
                .await
                .context("serving CSI")?;
            heartbeat.abort();
            if let Some(l) = lease {
                l.abort();
            }
            drop(registration);
            drop(health);
            agent_server.abort();
            agent.shutdown().await;
        }
        Mode::AgentToken(a) => {
            let client = zebu_csi::store::kube_client(a.kubeconfig.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let outcome = zebu_csi::agent_secret::ensure(client, &a.namespace, &a.secret).await?;
            let what = match outcome {
                zebu_csi::agent_secret::Outcome::Created => "created with a new token",
                zebu_csi::agent_secret::Outcome::Existing => "exists; left as it is",
            };
            println!("Secret {}/{} {what}", a.namespace, a.secret);
        }
        Mode::Crds => {
            let yaml = zebu_csi::store::crd::definitions_yaml().map_err(anyhow::Error::msg)?;
            print!("{yaml}");
        }
        Mode::Standalone(a) => {
            let sock = unix_path(&a.common.endpoint)?;
            let token = a.common.agent_token()?;
            let store = open_store(&a.common.state, &a.store)?;
            let (agent, listener, node_id) = start_agent(&a.common.state, &a.node).await?;
            let agent_addr = listener.local_addr()?.to_string();
            let agent_server = tokio::spawn(
                Server::builder()
                    .add_service(agent.service_requiring(token.clone()))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
            let registry = Registry::new(store.clone());
            registry
                .record(
                    &agent
                        .node_info()
                        .await
                        .context("reading the node's disks")?,
                )
                .map_err(|s| anyhow::anyhow!("registering the local node: {}", s.message()))?;
            let (hb_agent, hb_registry) = (agent.clone(), registry.clone());
            let heartbeat = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    match hb_agent.node_info().await {
                        Ok(info) => {
                            if let Err(s) = hb_registry.record(&info) {
                                tracing::warn!(error = %s.message(), "recording the local node failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "reading the node's disks failed"),
                    }
                }
            });
            let (parts, lease) = match a.store.store {
                StoreKind::Sled => (ClusterParts::default(), None),
                StoreKind::Kubernetes => {
                    let client = zebu_csi::store::kube_client(a.store.kubeconfig.as_deref())
                        .await
                        .context("connecting to the Kubernetes API for events and leases")?;
                    let parts = ClusterParts {
                        leadership: None,
                        events: Some(Arc::new(KubeEvents::new(client.clone(), &node_id))),
                        node_leases: Some(NodeLeases::new(client, &a.store.namespace)),
                    };
                    (
                        parts,
                        Some(renew_node_lease(&a.store, &node_id, &a.node).await?),
                    )
                }
            };
            let ctl =
                Controller::in_cluster(store.clone(), controller_config(&a.opts, token)?, parts);
            let reconciler = tokio::spawn(reconcile::run(ctl.clone(), a.opts.reconcile_interval));
            let node = NodeService::new(NodeConfig {
                node_id: node_id.clone(),
                max_volumes: a.node.max_volumes,
                state_dir: a.common.state.join("node"),
            });
            let incoming =
                grpc::bind_unix(&sock).with_context(|| format!("binding {}", sock.display()))?;
            readiness.set_ready();
            let _health = serve_health(&a.common, readiness.clone(), None).await?;
            println!(
                "zebu-csi standalone ready: csi unix://{}; node {node_id}; agent {agent_addr}",
                sock.display()
            );
            Server::builder()
                .add_service(IdentityServer::new(IdentityService::new(readiness)))
                .add_service(ControllerServer::new(ctl))
                .add_service(NodeServer::new(node))
                .add_service(RegistryServer::new(registry))
                .serve_with_incoming_shutdown(incoming, shutdown_signal())
                .await
                .context("serving CSI")?;
            reconciler.abort();
            heartbeat.abort();
            if let Some(l) = lease {
                l.abort();
            }
            agent_server.abort();
            agent.shutdown().await;
        }
    }
    Ok(())
}

/// Starts campaigning for the controllers' Lease; returns the candidate,
/// where its volume events go and its view of the nodes' Leases.
async fn elect(a: &ControllerArgs, address: Option<String>) -> Result<ClusterParts> {
    let client = zebu_csi::store::kube_client(a.store.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API for leader election")?;
    let identity = match &a.leader_election_identity {
        Some(i) => i.clone(),
        None => format!(
            "{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim(),
            std::process::id()
        ),
    };
    let mut cfg = ElectionConfig::new(&a.store.namespace, LEASE_NAME, &identity);
    cfg.address = address;
    tracing::info!(identity = %identity, namespace = %cfg.namespace, lease = LEASE_NAME, "campaigning for the controller lease");
    Ok(ClusterParts {
        leadership: Some(Leadership::start(client.clone(), cfg)),
        events: Some(Arc::new(KubeEvents::new(client.clone(), &identity))),
        node_leases: Some(NodeLeases::new(client, &a.store.namespace)),
    })
}

/// Starts renewing `node_id`'s heartbeat Lease; the first renewal must
/// succeed (a node that cannot renew would be judged lost).
async fn renew_node_lease(
    store: &StoreOpts,
    node_id: &str,
    node: &NodeOpts,
) -> Result<tokio::task::JoinHandle<()>> {
    let client = zebu_csi::store::kube_client(store.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API for the node's lease")?;
    node_lease::renew_once(&client, &store.namespace, node_id, node.node_lease_duration)
        .await
        .with_context(|| {
            format!(
                "writing this node's Lease {} in namespace {} (does the namespace exist, and \
                 may this service account write Leases there?)",
                node_lease::lease_name(node_id),
                store.namespace
            )
        })?;
    Ok(tokio::spawn(node_lease::renew(
        client,
        store.namespace.clone(),
        node_id.to_owned(),
        node.node_lease_duration,
    )))
}

/// Serves grpc.health.v1 on `--health-listen`, if given: SERVING while
/// `readiness` is up and, when registering with the kubelet, the kubelet
/// took the plugin. Dropping the handle stops it.
async fn serve_health(
    common: &Common,
    readiness: Readiness,
    registration: Option<Arc<zebu_csi::kubelet::Registered>>,
) -> Result<Option<Health>> {
    let Some(addr) = &common.health_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health endpoint to {addr}"))?;
    let addr = listener.local_addr()?;
    let (reporter, service) = tonic_health::server::health_reporter();
    let watcher = tokio::spawn(async move {
        let mut last = None;
        loop {
            let up = readiness.is_ready() && registration.as_ref().is_none_or(|r| r.registered());
            if last != Some(up) {
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                last = Some(up);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let server = tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(Some(Health {
        addr,
        tasks: vec![watcher.abort_handle(), server.abort_handle()],
    }))
}

/// A running health endpoint; dropping it stops it.
struct Health {
    addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Health {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The Lease controllers elect their leader on.
const LEASE_NAME: &str = "zebu-csi-controller";

async fn heartbeat(controller: &str, agent: &Agent) -> Result<()> {
    let ch = grpc::connect(controller).await?;
    let info = agent
        .node_info()
        .await
        .context("reading the node's disks")?;
    RegistryClient::new(ch)
        .heartbeat(info)
        .await
        .map_err(|s| anyhow::anyhow!("the controller refused the heartbeat: {}", s.message()))?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    zebu_proto::init_logging("info");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zebu-csi: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("zebu-csi: {e:#}");
        std::process::exit(1);
    }
}
