//! [`KubeStore`]: the state store on the custom resources of [`crd`](super::crd),
//! for a driver that runs in a Kubernetes cluster.
//!
//! Each record is the `spec` of one cluster-scoped object named by the
//! record's key; the object's `resourceVersion` is the record's version.
//! The API server takes it from etcd's revision of the write, so it is
//! unique store-wide as the [`Store`](super::Store) contract asks, and a stale one is
//! refused with 409, which becomes [`StoreError::Conflict`]: a write never
//! silently overwrites another.
//!
//! Invariants:
//! - A put writes the `spec` (create, or replace at the expected version),
//!   then the derived `status` at the version that write returned. When the
//!   status write loses a race to a newer write it is dropped (the newer
//!   writer writes its own) and the put returns the spec's version, so the
//!   caller's next write conflicts and re-reads.
//! - A [`ZebuVolume`] that owns replicas carries
//!   [`REPLICAS_FINALIZER`](crate::store::crd::REPLICAS_FINALIZER): deleting it
//!   any other way than through this store (`kubectl delete`) leaves it in
//!   place, marked for deletion, until Zebu has removed its replicas.
//! - The trait is synchronous; the calls run on a small runtime of the
//!   store's own, so they can be made from any thread, inside another
//!   runtime or not, like the sled backend's.

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ClusterResourceScope;
use kube::{Client, Config, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Kind, NodeRecord, Record, Result, SnapshotRecord, StoreError, Versioned, VolumeRecord,
};
use crate::store::crd::{
    REPLICAS_FINALIZER, ZebuNode, ZebuNodeSpec, ZebuSnapshot, ZebuSnapshotSpec, ZebuVolume,
    ZebuVolumeSpec,
};

/// Limit of one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The store on the API server. See the [module docs](self).
pub struct KubeStore {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    /// Where it connects, for messages.
    location: String,
}

impl Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        // Allowed from async code too, unlike dropping a runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A record kept as the spec of a custom resource.
trait Backed: Record + Send + 'static {
    type Cr: Resource<DynamicType = (), Scope = ClusterResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;
    /// The object for this record, status included.
    fn to_cr(&self) -> Self::Cr;
    /// The record in `cr`'s spec, keyed by `name`.
    fn from_cr(name: &str, cr: &Self::Cr) -> Self;
    /// Finalizers the object carries for this record.
    fn finalizers(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Backed for VolumeRecord {
    type Cr = ZebuVolume;
    fn to_cr(&self) -> ZebuVolume {
        let spec = ZebuVolumeSpec::from(self);
        let status = spec.derived_status();
        let mut cr = ZebuVolume::new(&self.id, spec);
        cr.status = Some(status);
        cr
    }
    fn from_cr(name: &str, cr: &ZebuVolume) -> Self {
        cr.spec.to_record(name)
    }
    fn finalizers(&self) -> Vec<String> {
        if self.replicas.is_empty() {
            Vec::new()
        } else {
            vec![REPLICAS_FINALIZER.to_owned()]
        }
    }
}

impl Backed for SnapshotRecord {
    type Cr = ZebuSnapshot;
    fn to_cr(&self) -> ZebuSnapshot {
        let spec = ZebuSnapshotSpec::from(self);
        let status = spec.derived_status();
        let mut cr = ZebuSnapshot::new(&self.id, spec);
        cr.status = Some(status);
        cr
    }
    fn from_cr(name: &str, cr: &ZebuSnapshot) -> Self {
        cr.spec.to_record(name)
    }
}

impl Backed for NodeRecord {
    type Cr = ZebuNode;
    fn to_cr(&self) -> ZebuNode {
        let spec = ZebuNodeSpec::from(self);
        let status = spec.derived_status();
        let mut cr = ZebuNode::new(&self.node_id, spec);
        cr.status = Some(status);
        cr
    }
    fn from_cr(name: &str, cr: &ZebuNode) -> Self {
        cr.spec.to_record(name)
    }
}

/// What an API call's failure means to the store.
enum Failure {
    /// 409: a precondition (version, existence) did not hold.
    Conflict,
    /// 404.
    NotFound,
    /// Anything else, described.
    Other(String),
}

fn classify(e: kube::Error) -> Failure {
    match e {
        kube::Error::Api(s) if s.code == 409 => Failure::Conflict,
        kube::Error::Api(s) if s.code == 404 => Failure::NotFound,
        kube::Error::Api(s) => Failure::Other(format!("{} ({}): {}", s.reason, s.code, s.message)),
        other => Failure::Other(other.to_string()),
    }
}

/// Checks that `key` can name a Kubernetes object (a DNS-1123 subdomain).
fn check_key(kind: Kind, key: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if key.is_empty() {
        return Err(StoreError::Invalid(format!("{kind} key is empty")));
    }
    if key.len() > 253
        || !key.chars().all(ok_char)
        || !alnum(key.chars().next())
        || !alnum(key.chars().last())
    {
        return Err(StoreError::Invalid(format!(
            "{kind} key {key:?} cannot name a Kubernetes object: use at most 253 lowercase \
             letters, digits, '-' and '.', starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

fn version_of<K: Resource>(kind: Kind, cr: &K) -> Result<u64> {
    let name = cr.meta().name.clone().unwrap_or_default();
    let rv = cr.meta().resource_version.as_deref().unwrap_or_default();
    rv.parse().map_err(|_| StoreError::Corrupt {
        key: format!("{}/{name}", kind.collection()),
        reason: format!("resourceVersion {rv:?} is not a number"),
    })
}

impl KubeStore {
    /// Connects with the kubeconfig at `kubeconfig`, or, without one, the
    /// way `kubectl` would (in-cluster service account, `$KUBECONFIG`,
    /// `~/.kube/config`), and checks that the custom resources are
    /// installed.
    pub fn connect(kubeconfig: Option<&Path>) -> Result<KubeStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("zebu-kube-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start the store's runtime: {e}")))?;
        let path = kubeconfig.map(Path::to_owned);
        let location = match &path {
            Some(p) => format!("the cluster of {}", p.display()),
            None => "the cluster (in-cluster or default kubeconfig)".to_owned(),
        };
        let config_path = path.clone();
        let client = run_on(&runtime, "connecting", &location, async move {
            kube_client(config_path.as_deref()).await
        })?;
        let store = KubeStore {
            runtime: Some(runtime),
            client,
            location,
        };
        store.check_definitions()?;
        Ok(store)
    }

    /// Fails with a message saying how to install them when the custom
    /// resources are not installed.
    fn check_definitions(&self) -> Result<()> {
        let c = self.client.clone();
        let location = self.location.clone();
        self.block("checking the custom resources", async move {
            probe::<ZebuVolume>(&c, &location).await?;
            probe::<ZebuSnapshot>(&c, &location).await?;
            probe::<ZebuNode>(&c, &location).await
        })
    }

    /// Runs `f` on the store's runtime and waits for it, bounded by
    /// [`CALL_TIMEOUT`] per call (a few calls at most per operation).
    fn block<T: Send + 'static>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let Some(rt) = &self.runtime else {
            return Err(StoreError::Backend("the store is shut down".into()));
        };
        run_on(rt, what, &self.location, f)
    }

    fn get<R: Backed>(&self, key: &str) -> Result<Option<Versioned<R>>> {
        check_key(R::KIND, key)?;
        let api = Api::<R::Cr>::all(self.client.clone());
        let (key, location) = (key.to_owned(), self.location.clone());
        self.block("reading", async move {
            let cr = call(api.get_opt(&key))
                .await
                .map_err(|e| backend(&location, "reading", R::KIND, &key, e))?;
            cr.map(|cr| {
                Ok(Versioned {
                    version: version_of(R::KIND, &cr)?,
                    value: R::from_cr(&key, &cr),
                })
            })
            .transpose()
        })
    }

    fn put<R: Backed>(&self, rec: &R, expected: Option<u64>) -> Result<u64> {
        let key = rec.key().to_owned();
        check_key(R::KIND, &key)?;
        let mut cr = rec.to_cr();
        cr.meta_mut().finalizers = Some(rec.finalizers());
        cr.meta_mut().resource_version = expected.map(|v| v.to_string());
        let api = Api::<R::Cr>::all(self.client.clone());
        let location = self.location.clone();
        self.block("writing", async move {
            let pp = PostParams::default();
            let written = match expected {
                None => call(api.create(&pp, &cr)).await,
                Some(_) => call(api.replace(&key, &pp, &cr)).await,
            };
            let written = match written {
                Ok(w) => w,
                Err(e) => {
                    return Err(match classify(e) {
                        Failure::Conflict | Failure::NotFound => {
                            let actual = current_version::<R>(&api, &key).await;
                            StoreError::conflict(R::KIND, &key, expected, actual)
                        }
                        Failure::Other(e) => backend_msg(&location, "writing", R::KIND, &key, e),
                    });
                }
            };
            let version = version_of(R::KIND, &written)?;
            // The derived status, at the version just written.
            let mut with_status = cr;
            with_status.meta_mut().resource_version = written.meta().resource_version.clone();
            match call(api.replace_status(&key, &pp, &with_status)).await {
                Ok(w) => version_of(R::KIND, &w),
                Err(e) => match classify(e) {
                    // A newer write won; it writes its own status.
                    Failure::Conflict | Failure::NotFound => Ok(version),
                    Failure::Other(e) => Err(backend_msg(
                        &location,
                        "writing the status of",
                        R::KIND,
                        &key,
                        e,
                    )),
                },
            }
        })
    }

    fn delete<R: Backed>(&self, key: &str, expected: Option<u64>) -> Result<()> {
        check_key(R::KIND, key)?;
        let api = Api::<R::Cr>::all(self.client.clone());
        let (key, location) = (key.to_owned(), self.location.clone());
        self.block("deleting", async move {
            let Some(mut cr) = call(api.get_opt(&key))
                .await
                .map_err(|e| backend(&location, "reading", R::KIND, &key, e))?
            else {
                return Err(StoreError::NotFound { kind: R::KIND, key });
            };
            let mut version = version_of(R::KIND, &cr)?;
            if expected.is_some_and(|v| v != version) {
                return Err(StoreError::conflict(R::KIND, &key, expected, Some(version)));
            }
            // Zebu deletes a record once it has removed what the record
            // owned: lift the finalizer (at the version read), then delete.
            // An object already marked for deletion (`kubectl delete`) goes
            // away as soon as its last finalizer does.
            let marked = cr.meta().deletion_timestamp.is_some();
            if cr.meta().finalizers.as_ref().is_some_and(|f| !f.is_empty()) {
                cr.meta_mut().finalizers = Some(Vec::new());
                match call(api.replace(&key, &PostParams::default(), &cr)).await {
                    Ok(w) => version = version_of(R::KIND, &w)?,
                    Err(e) => {
                        return Err(match classify(e) {
                            Failure::Conflict | Failure::NotFound => {
                                let actual = current_version::<R>(&api, &key).await;
                                StoreError::conflict(R::KIND, &key, Some(version), actual)
                            }
                            Failure::Other(e) => {
                                backend_msg(&location, "deleting", R::KIND, &key, e)
                            }
                        });
                    }
                }
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(version.to_string()),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match call(api.delete(&key, &dp)).await {
                Ok(_) => Ok(()),
                Err(e) => Err(match classify(e) {
                    Failure::NotFound if marked => return Ok(()),
                    Failure::NotFound => StoreError::NotFound {
                        kind: R::KIND,
                        key: key.clone(),
                    },
                    Failure::Conflict => {
                        let actual = current_version::<R>(&api, &key).await;
                        StoreError::conflict(R::KIND, &key, Some(version), actual)
                    }
                    Failure::Other(e) => backend_msg(&location, "deleting", R::KIND, &key, e),
                }),
            }
        })
    }

    fn list<R: Backed>(&self) -> Result<Vec<Versioned<R>>> {
        let api = Api::<R::Cr>::all(self.client.clone());
        let location = self.location.clone();
        self.block("listing", async move {
            let list = call(api.list(&ListParams::default()))
                .await
                .map_err(|e| backend(&location, "listing", R::KIND, "", e))?;
            let mut out = Vec::with_capacity(list.items.len());
            for cr in &list.items {
                let name = cr.meta().name.clone().unwrap_or_default();
                out.push(Versioned {
                    version: version_of(R::KIND, cr)?,
                    value: R::from_cr(&name, cr),
                });
            }
            out.sort_by(|a, b| a.value.key().cmp(b.value.key()));
            Ok(out)
        })
    }
}

/// A client of the API server: with the kubeconfig at `kubeconfig`, or,
/// without one, as `kubectl` would find its configuration (in-cluster
/// service account, `$KUBECONFIG`, `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|e| {
                StoreError::Backend(format!("cannot read kubeconfig {}: {e}", p.display()))
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    StoreError::Backend(format!("kubeconfig {} is unusable: {e}", p.display()))
                })?
        }
        None => Config::infer().await.map_err(|e| {
            StoreError::Backend(format!(
                "no Kubernetes configuration found ({e}); pass --kubeconfig FILE"
            ))
        })?,
    };
    Client::try_from(config)
        .map_err(|e| StoreError::Backend(format!("cannot create the API client: {e}")))
}

/// Runs `f` (`what`, against `location`) on `rt` and waits for it from this
/// thread, whichever runtime (if any) this thread belongs to; a few calls
/// at most, so bounded by four call timeouts.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    location: &str,
    f: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let limit = CALL_TIMEOUT * 4;
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        Err(StoreError::Backend(format!(
            "{what}: {location} did not answer within {limit:?}"
        )))
    })
}

/// Fails with how to install them when the API server has no resource `K`.
/// A caller not allowed to list `K` (a node plugin may use only ZebuNodes)
/// cannot tell, and passes: a call it is not allowed either reports that.
async fn probe<K>(client: &Client, location: &str) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + Debug + DeserializeOwned,
{
    let plural = K::plural(&());
    let listed =
        match call(Api::<K>::all(client.clone()).list(&ListParams::default().limit(1))).await {
            Err(kube::Error::Api(s)) if s.code == 403 => return Ok(()),
            r => r.map_err(classify),
        };
    match listed {
        Ok(_) | Err(Failure::Conflict) => Ok(()),
        Err(Failure::NotFound) => Err(StoreError::Backend(format!(
            "{location} has no {plural}.zebu.csi.dev resource: install Zebu's custom \
             resources first (kubectl apply -k deploy/kubernetes/crds, or zebu-csi crds | \
             kubectl apply -f -)"
        ))),
        Err(Failure::Other(e)) => Err(StoreError::Backend(format!(
            "cannot list {plural} in {location}: {e}"
        ))),
    }
}

/// One API call, bounded by [`CALL_TIMEOUT`].
async fn call<T>(f: impl Future<Output = kube::Result<T>>) -> kube::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("no answer within {CALL_TIMEOUT:?}").into(),
        )),
    }
}

/// The object's version now (`None`: it does not exist, or cannot be read).
async fn current_version<R: Backed>(api: &Api<R::Cr>, key: &str) -> Option<u64> {
    let cr = call(api.get_opt(key)).await.ok().flatten()?;
    version_of(R::KIND, &cr).ok()
}

fn backend(location: &str, op: &str, kind: Kind, key: &str, e: kube::Error) -> StoreError {
    let msg = match classify(e) {
        Failure::Conflict => "conflict".to_owned(),
        Failure::NotFound => "not found".to_owned(),
        Failure::Other(m) => m,
    };
    backend_msg(location, op, kind, key, msg)
}

fn backend_msg(location: &str, op: &str, kind: Kind, key: &str, msg: String) -> StoreError {
    let what = if key.is_empty() {
        kind.collection().to_owned()
    } else {
        format!("{kind} {key:?}")
    };
    StoreError::Backend(format!("{op} {what} in {location}: {msg}"))
}

super::store_by_kind!(KubeStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_name_kubernetes_objects() {
        for ok in ["zv-0123abcd", "node-1", "a", "node.example.com", "r2d2"] {
            assert!(check_key(Kind::Node, ok).is_ok(), "{ok}");
        }
        for bad in ["", "Node1", "-a", "a-", "a_b", "a b", &"a".repeat(254)] {
            let e = check_key(Kind::Node, bad).unwrap_err();
            assert!(matches!(e, StoreError::Invalid(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn volumes_with_replicas_carry_the_finalizer() {
        let mut v = VolumeRecord {
            name: "n".into(),
            id: "zv-1".into(),
            size_bytes: 1,
            num_replicas: 1,
            fs_type: None,
            access_type: super::super::AccessType::Block,
            content_source: super::super::ContentSource::None,
            replicas: vec![],
            attachment: None,
            created_unix: 0,
            status: super::super::VolumeStatus::Ready,
            claim: None,
        };
        assert!(v.finalizers().is_empty());
        v.replicas.push(super::super::ReplicaRecord {
            id: "r".into(),
            node: "n".into(),
            disk: "/d".into(),
            dir: "/d/r".into(),
            address: "a:1".into(),
            state: super::super::ReplicaState::Ready,
        });
        assert_eq!(v.finalizers(), vec![REPLICAS_FINALIZER.to_owned()]);
    }
}
