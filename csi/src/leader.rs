//! Leader election on a `coordination.k8s.io/v1` Lease, so that several
//! controllers may run and exactly one reconciles and serves the mutating
//! CSI calls; the others answer those with UNAVAILABLE (the CSI sidecars
//! retry) until they lead.
//!
//! Invariants:
//! - A candidate becomes leader only through a write that names it holder,
//!   made at the `resourceVersion` it read: of two candidates racing for
//!   the same lease, exactly one write succeeds.
//! - A lease held by another is taken over only after this candidate saw
//!   the same record (`resourceVersion`) unchanged for a whole lease
//!   duration on its own monotonic clock; clocks of other hosts are never
//!   compared.
//! - A leader that could not renew for `renew_deadline` (shorter than the
//!   lease duration) stops leading before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// How a candidate takes part.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity, unique among candidates.
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often a candidate tries to acquire or renew.
    pub retry_period: Duration,
    /// Where followers reach this candidate's Controller service while it
    /// leads (`HOST:PORT`), published on the Lease; `None`: nowhere.
    pub address: Option<String>,
}

/// The Lease annotation naming the leader's forwarding address.
pub const ADDRESS_ANNOTATION: &str = "zebu.csi.dev/controller-address";

impl ElectionConfig {
    /// The defaults of Kubernetes' own controllers (15 s, 10 s, 2 s).
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        ElectionConfig {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            address: None,
        }
    }
}

/// What a candidate knows: whether it leads, and who does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This candidate leads.
    pub leading: bool,
    /// The holder of the lease as last seen (empty: none).
    pub holder: String,
    /// The holder's forwarding address as last seen (empty: none).
    pub address: String,
}

/// A running candidate; dropping it stops campaigning (a leader's lease then
/// expires after its duration).
#[derive(Debug)]
pub struct Leadership {
    state: watch::Receiver<LeaderState>,
    task: tokio::task::AbortHandle,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leadership {
    /// Starts campaigning for the lease with `client`.
    pub fn start(client: kube::Client, cfg: ElectionConfig) -> Leadership {
        let (tx, rx) = watch::channel(LeaderState::default());
        let task = tokio::spawn(campaign(client, cfg, tx)).abort_handle();
        Leadership { state: rx, task }
    }

    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().leading
    }

    /// The state as last seen.
    pub fn state(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// A receiver of every change of state.
    pub fn watch(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }
}

async fn campaign(client: kube::Client, cfg: ElectionConfig, tx: watch::Sender<LeaderState>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    // The record last seen and when (our clock), to judge expiry.
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        let outcome = tokio::time::timeout(
            cfg.retry_period.max(Duration::from_secs(5)),
            try_once(&api, &cfg, &mut observed),
        )
        .await;
        let now = Instant::now();
        let state = match outcome {
            Ok(Ok(state)) => {
                if state.leading {
                    last_renew = Some(now);
                }
                state
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %cfg.name, error = %e, "leader election: cannot reach the lease");
                still_leading(&cfg, &tx, last_renew, now)
            }
            Err(_) => {
                tracing::warn!(lease = %cfg.name, "leader election: the API server did not answer");
                still_leading(&cfg, &tx, last_renew, now)
            }
        };
        tx.send_if_modified(|cur| {
            if *cur == state {
                return false;
            }
            if state.leading != cur.leading {
                if state.leading {
                    tracing::info!(identity = %cfg.identity, "leader election: leading");
                } else {
                    tracing::warn!(identity = %cfg.identity, holder = %state.holder, "leader election: not leading");
                }
            }
            *cur = state.clone();
            true
        });
        tokio::time::sleep(cfg.retry_period).await;
    }
}

/// After a failed attempt: a leader keeps leading until its renew deadline.
fn still_leading(
    cfg: &ElectionConfig,
    tx: &watch::Sender<LeaderState>,
    last_renew: Option<Instant>,
    now: Instant,
) -> LeaderState {
    let mut state = tx.borrow().clone();
    if state.leading && last_renew.is_none_or(|t| now.duration_since(t) >= cfg.renew_deadline) {
        state.leading = false;
    }
    state
}

/// One round: create, renew or take over the lease if this candidate may.
async fn try_once(
    api: &Api<Lease>,
    cfg: &ElectionConfig,
    observed: &mut Option<(String, Instant)>,
) -> kube::Result<LeaderState> {
    let now = Instant::now();
    let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().try_into().unwrap_or(i32::MAX)),
        acquire_time: acquired.or(Some(MicroTime(Timestamp::now()))),
        renew_time: Some(MicroTime(Timestamp::now())),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(current) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                annotations: annotations(cfg),
                ..ObjectMeta::default()
            },
            spec: Some(mine(0, None)),
        };
        return Ok(match api.create(&PostParams::default(), &lease).await {
            Ok(_) => LeaderState {
                leading: true,
                holder: cfg.identity.clone(),
                address: cfg.address.clone().unwrap_or_default(),
            },
            // Another candidate created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => LeaderState::default(),
            Err(e) => return Err(e),
        });
    };
    let rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let address = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADDRESS_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let seen_since = match observed {
        Some((seen_rv, since)) if *seen_rv == rv => *since,
        _ => {
            *observed = Some((rv.clone(), now));
            now
        }
    };
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(cfg.lease_duration);
    let expired = holder.is_empty() || now.duration_since(seen_since) >= duration;
    if holder != cfg.identity && !expired {
        return Ok(LeaderState {
            leading: false,
            holder,
            address,
        });
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != cfg.identity);
    let acquired = if holder == cfg.identity {
        spec.acquire_time.clone()
    } else {
        None
    };
    let mut lease = current;
    lease.spec = Some(mine(transitions, acquired));
    lease.metadata.annotations = annotations(cfg);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(written) => {
            *observed = written
                .metadata
                .resource_version
                .map(|rv| (rv, Instant::now()));
            Ok(LeaderState {
                leading: true,
                holder: cfg.identity.clone(),
                address: cfg.address.clone().unwrap_or_default(),
            })
        }
        // Someone else wrote first (renewed, or took it over).
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(LeaderState {
            leading: false,
            holder,
            address,
        }),
        Err(e) => Err(e),
    }
}

/// The Lease's annotations when `cfg` writes it: its forwarding address.
fn annotations(cfg: &ElectionConfig) -> Option<std::collections::BTreeMap<String, String>> {
    cfg.address
        .as_ref()
        .map(|a| [(ADDRESS_ANNOTATION.to_owned(), a.clone())].into())
}
