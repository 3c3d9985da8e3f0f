//! Node heartbeats on per-node `coordination.k8s.io/v1` Leases, as the
//! kubelet renews its own in `kube-node-lease`: every node plugin in a
//! cluster renews the Lease `zebu-node-<node id>` in the driver's namespace;
//! the controller judges a node lost when that Lease stops being renewed,
//! and counts the replica-replacement delay from the Lease's expiry.
//!
//! Invariants:
//! - Expiry is judged on the controller's own monotonic clock: a Lease has
//!   expired once the controller has seen the same record (the same
//!   `resourceVersion`) unchanged for the whole duration the record states.
//!   Clocks of other hosts are never compared, so a node with a wrong clock
//!   is never judged lost early.
//! - Observations are only as good as the last listing: when listing fails,
//!   or this controller stops leading, everything is forgotten, and a Lease
//!   must again stay unchanged for a whole duration before it counts as
//!   expired.
//! - A node without a Lease (one that registers through a controller's
//!   registry, or standalone mode on sled) is [`NodeState::Unknown`]: the
//!   reconcile loop then goes by whether the node's agent answers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

/// Prefix of the node Leases' names.
pub const LEASE_PREFIX: &str = "zebu-node-";
/// Label on every node Lease, naming its node.
pub const NODE_LABEL: &str = "zebu.csi.dev/node";
/// How long a node's Lease lasts without renewal (the kubelet's default).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(40);

/// The name of `node`'s Lease.
pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// How often a node renews a Lease of `duration`: four times per duration,
/// as the kubelet does, so that one or two failed renewals do not make the
/// node look lost.
pub fn renew_interval(duration: Duration) -> Duration {
    (duration / 4).max(Duration::from_millis(500))
}

/// Renews `node`'s Lease in `namespace` forever (run it as a task).
/// Failures are logged and retried at the next interval.
pub async fn renew(client: kube::Client, namespace: String, node: String, duration: Duration) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut warned = false;
    loop {
        match tokio::time::timeout(renew_interval(duration), write(&api, &node, duration)).await {
            Ok(Ok(())) => {
                if warned {
                    tracing::info!(node = %node, "node lease renewed again");
                }
                warned = false;
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %node, namespace = %namespace, error = %e, "cannot renew the node's lease");
                warned = true;
            }
            Err(_) => {
                tracing::warn!(node = %node, "renewing the node's lease: the API server did not answer");
                warned = true;
            }
        }
        tokio::time::sleep(renew_interval(duration)).await;
    }
}

/// Creates or renews `node`'s Lease in `namespace` once.
pub async fn renew_once(
    client: &kube::Client,
    namespace: &str,
    node: &str,
    duration: Duration,
) -> kube::Result<()> {
    write(&Api::namespaced(client.clone(), namespace), node, duration).await
}

async fn write(api: &Api<Lease>, node: &str, duration: Duration) -> kube::Result<()> {
    let name = lease_name(node);
    let spec = LeaseSpec {
        holder_identity: Some(node.to_owned()),
        lease_duration_seconds: Some(duration.as_secs().clamp(1, i32::MAX as u64) as i32),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    };
    match api.get_opt(&name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    labels: Some([(NODE_LABEL.to_owned(), node.to_owned())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            // A concurrent create (409): the next round renews it.
            conflict_is_fine(api.create(&PostParams::default(), &lease).await)
        }
        Some(mut lease) => {
            lease.spec = Some(spec);
            conflict_is_fine(api.replace(&name, &PostParams::default(), &lease).await)
        }
    }
}

/// A write that lost a race (409) still leaves a fresh Lease behind.
fn conflict_is_fine(r: kube::Result<Lease>) -> kube::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// What the controller knows about a node from its Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// No Lease (or nothing reliable seen yet): judge by other means.
    Unknown,
    /// The Lease was renewed within its duration.
    Alive,
    /// The Lease expired at this instant (the controller's clock).
    Lost(Instant),
}

#[derive(Debug)]
struct Seen {
    version: String,
    since: Instant,
    duration: Duration,
}

/// The controller's view of the node Leases in one namespace.
pub struct NodeLeases {
    api: Api<Lease>,
    seen: Mutex<HashMap<String, Seen>>,
}

impl NodeLeases {
    /// Watches the node Leases in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        NodeLeases {
            api: Api::namespaced(client, namespace),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Lists the Leases and records which changed since the last listing.
    /// On failure everything is forgotten (see the module's invariants).
    pub async fn refresh(&self) -> kube::Result<()> {
        let listed = self
            .api
            .list(&ListParams::default().labels(NODE_LABEL))
            .await;
        let leases = match listed {
            Ok(l) => l.items,
            Err(e) => {
                self.forget();
                return Err(e);
            }
        };
        let listed = leases.into_iter().filter_map(|lease| {
            let node = lease.metadata.labels.as_ref()?.get(NODE_LABEL)?.clone();
            let version = lease.metadata.resource_version.clone().unwrap_or_default();
            let duration = lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DURATION);
            Some((node, version, duration))
        });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        observe(&mut seen, listed, Instant::now());
        Ok(())
    }

    /// Forgets every observation (a new leader, or the API unreachable).
    pub fn forget(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// What the last listings say about `node`.
    pub fn state(&self, node: &str) -> NodeState {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        judge(seen.get(node), Instant::now())
    }
}

/// Records a listing made at `now` of `(node, resourceVersion, duration)`:
/// a Lease keeps the instant it was first seen at its version; Leases no
/// longer listed are dropped.
fn observe(
    seen: &mut HashMap<String, Seen>,
    listed: impl Iterator<Item = (String, String, Duration)>,
    now: Instant,
) {
    let mut next = HashMap::new();
    for (node, version, duration) in listed {
        let since = match seen.remove(&node) {
            Some(s) if s.version == version => s.since,
            _ => now,
        };
        next.insert(
            node,
            Seen {
                version,
                since,
                duration,
            },
        );
    }
    *seen = next;
}

fn judge(seen: Option<&Seen>, now: Instant) -> NodeState {
    match seen {
        None => NodeState::Unknown,
        Some(s) => {
            let expiry = s.since + s.duration;
            if now >= expiry {
                NodeState::Lost(expiry)
            } else {
                NodeState::Alive
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(version: &str, since: Instant, secs: u64) -> Seen {
        Seen {
            version: version.into(),
            since,
            duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_lease_expires_a_whole_duration_after_it_was_first_seen_unchanged() {
        let t0 = Instant::now();
        let s = seen("7", t0, 40);
        assert_eq!(judge(Some(&s), t0), NodeState::Alive);
        assert_eq!(
            judge(Some(&s), t0 + Duration::from_secs(39)),
            NodeState::Alive
        );
        assert_eq!(
            judge(Some(&s), t0 + Duration::from_secs(41)),
            NodeState::Lost(t0 + Duration::from_secs(40))
        );
        assert_eq!(judge(None, t0), NodeState::Unknown);
    }

    #[test]
    fn a_renewal_restarts_the_clock_and_an_unchanged_lease_keeps_it() {
        let t0 = Instant::now();
        let d = Duration::from_secs(10);
        let mut m = HashMap::new();
        let list = |v: &str| vec![("n1".to_owned(), v.to_owned(), d)].into_iter();
        observe(&mut m, list("1"), t0);
        observe(&mut m, list("1"), t0 + Duration::from_secs(5));
        assert_eq!(m["n1"].since, t0, "unchanged: first sighting counts");
        observe(&mut m, list("2"), t0 + Duration::from_secs(8));
        assert_eq!(m["n1"].since, t0 + Duration::from_secs(8), "renewed");
        assert_eq!(
            judge(m.get("n1"), t0 + Duration::from_secs(12)),
            NodeState::Alive
        );
        observe(&mut m, std::iter::empty(), t0 + Duration::from_secs(20));
        assert_eq!(judge(m.get("n1"), t0), NodeState::Unknown, "deleted");
    }

    #[test]
    fn renewals_come_several_times_per_duration() {
        assert_eq!(
            renew_interval(Duration::from_secs(40)),
            Duration::from_secs(10)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn lease_names_carry_the_node() {
        assert_eq!(lease_name("node-1"), "zebu-node-node-1");
    }
}
