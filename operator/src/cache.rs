//! Watch caches of every child kind, filled by watch tasks that run beside the controller,
//! and the memory of what the reconciler itself last wrote.
//!
//! Two rules keep reconciles from hanging and from writing twice:
//! - The caches are waited for once, before the controller starts ([`Caches::wait_ready`]),
//!   never inside a reconcile. kube-runtime's `Store::wait_until_ready` wakes only the last
//!   task that polled it (a `DelayedInit` over one `oneshot::Receiver`), so several
//!   reconciles waiting at once would stay pending for ever.
//! - A cache may lag the reconciler's own last write by a few milliseconds. [`Cache::lookup`]
//!   compares the cached resourceVersion with the one our write returned, so a reconcile
//!   that runs in between neither writes again nor mistakes the lag for a deletion.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::names;
use crate::object::TenantObject;

/// How long the reconciler trusts its own write over a cache that has not shown it yet.
/// Past this, an object missing from the cache is treated as missing.
const LAG_TRUST: Duration = Duration::from_secs(30);

/// What the reconciler last wrote (or proved unchanged) for one object.
struct Applied<K> {
    /// Digest of the desired object.
    digest: u64,
    /// resourceVersion the object had after that write or check.
    resource_version: Option<String>,
    /// The server's answer to our write, kept only until the cache shows that version.
    object: Option<Arc<K>>,
    at: Instant,
}

/// What [`Cache::lookup`] knows about an object.
pub enum Lookup<K> {
    /// Matches the desired object as of our last write or check; nothing to do. None when
    /// neither the cache nor our write holds the object yet.
    Current(Option<Arc<K>>),
    /// In the cache, changed since our last write or check (or never checked): compare.
    Cached(Arc<K>),
    /// In the cache exactly as our last write or check left it, but that was for another
    /// desired object: the desired object changed.
    Superseded(Arc<K>),
    /// Neither in the cache nor recently written by us.
    Missing,
}

/// The watch cache of one kind plus the reconciler's memory of its own writes.
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    applied: Mutex<HashMap<ObjectRef<K>, Applied<K>>>,
}

/// resourceVersions are opaque to clients, but every API server backed by etcd hands out
/// increasing integers; where both parse, an older cached version means the cache lags.
pub(crate) fn older(cached: Option<&str>, written: Option<&str>) -> bool {
    match (
        cached.and_then(|v| v.parse::<u64>().ok()),
        written.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(c), Some(w)) => c < w,
        _ => false,
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn new(store: Store<K>) -> Cache<K> {
        Cache {
            store,
            applied: Mutex::default(),
        }
    }

    /// The cached object at `key`.
    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<K>> {
        self.store.get(key)
    }

    /// Every cached object.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.store.state()
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<K>, Applied<K>>> {
        // The map holds no invariant a panicking thread could break half-way.
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides whether the object at `key`, desired with `digest`, needs a comparison.
    pub fn lookup(&self, key: &ObjectRef<K>, digest: u64) -> Lookup<K> {
        let cached = self.store.get(key);
        let mut applied = self.applied();
        let Some(memo) = applied.get_mut(key) else {
            return cached.map_or(Lookup::Missing, Lookup::Cached);
        };
        if memo.digest != digest {
            return match cached {
                Some(obj) if obj.meta().resource_version == memo.resource_version => {
                    Lookup::Superseded(obj)
                }
                Some(obj) => Lookup::Cached(obj),
                None => Lookup::Missing,
            };
        }
        match cached {
            Some(obj) => {
                let version = obj.meta().resource_version.as_deref();
                if version == memo.resource_version.as_deref() {
                    memo.object = None;
                    Lookup::Current(Some(obj))
                } else if older(version, memo.resource_version.as_deref()) {
                    Lookup::Current(memo.object.clone().or(Some(obj)))
                } else {
                    Lookup::Cached(obj)
                }
            }
            // Written by us but not yet seen by the watch. A deletion seen by the watch
            // removes the memo (see `forget`), so this is lag, not a deleted object.
            None if memo.object.is_some() && memo.at.elapsed() < LAG_TRUST => {
                Lookup::Current(memo.object.clone())
            }
            None => Lookup::Missing,
        }
    }

    /// Records that `object` is what applying the desired object with `digest` gives;
    /// `written` when it is the answer to our own write (the cache may not have it yet).
    pub fn remember(&self, key: ObjectRef<K>, digest: u64, object: Arc<K>, written: bool) {
        let memo = Applied {
            digest,
            resource_version: object.meta().resource_version.clone(),
            object: written.then_some(object),
            at: Instant::now(),
        };
        self.applied().insert(key, memo);
    }

    /// Forgets what we wrote for `key` (the watch saw it deleted).
    pub fn forget(&self, key: &ObjectRef<K>) {
        self.applied().remove(key);
    }

    /// Forgets every object in `namespace` (the tenant is gone).
    pub fn forget_namespace(&self, namespace: &str) {
        self.applied()
            .retain(|k, _| k.namespace.as_deref() != Some(namespace) && k.name != namespace);
    }
}

/// The caches of every child kind (and of StorageClasses).
pub struct Caches {
    /// Tenant namespaces.
    pub namespaces: Cache<Namespace>,
    /// NetworkPolicies.
    pub policies: Cache<NetworkPolicy>,
    /// ResourceQuotas.
    pub quotas: Cache<ResourceQuota>,
    /// LimitRanges.
    pub limit_ranges: Cache<LimitRange>,
    /// ServiceAccounts.
    pub service_accounts: Cache<ServiceAccount>,
    /// Secrets (data key, TLS, token public key).
    pub secrets: Cache<Secret>,
    /// ConfigMaps.
    pub config_maps: Cache<ConfigMap>,
    /// PersistentVolumeClaims.
    pub pvcs: Cache<PersistentVolumeClaim>,
    /// Deployments.
    pub deployments: Cache<Deployment>,
    /// Services.
    pub services: Cache<Service>,
    /// Every StorageClass (cluster-scoped, few).
    pub storage_classes: Cache<StorageClass>,
}

/// The writing side of [`Caches`], fed by the watch tasks (or by tests).
pub struct CacheWriters {
    /// Tenant namespaces.
    pub namespaces: Writer<Namespace>,
    /// NetworkPolicies.
    pub policies: Writer<NetworkPolicy>,
    /// ResourceQuotas.
    pub quotas: Writer<ResourceQuota>,
    /// LimitRanges.
    pub limit_ranges: Writer<LimitRange>,
    /// ServiceAccounts.
    pub service_accounts: Writer<ServiceAccount>,
    /// Secrets.
    pub secrets: Writer<Secret>,
    /// ConfigMaps.
    pub config_maps: Writer<ConfigMap>,
    /// PersistentVolumeClaims.
    pub pvcs: Writer<PersistentVolumeClaim>,
    /// Deployments.
    pub deployments: Writer<Deployment>,
    /// Services.
    pub services: Writer<Service>,
    /// StorageClasses.
    pub storage_classes: Writer<StorageClass>,
}

/// Empty caches and their writers.
pub fn caches() -> (Caches, CacheWriters) {
    fn pair<K>() -> (Cache<K>, Writer<K>)
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, writer) = reflector::store();
        (Cache::new(store), writer)
    }
    let (namespaces, w_namespaces) = pair();
    let (policies, w_policies) = pair();
    let (quotas, w_quotas) = pair();
    let (limit_ranges, w_limit_ranges) = pair();
    let (service_accounts, w_service_accounts) = pair();
    let (secrets, w_secrets) = pair();
    let (config_maps, w_config_maps) = pair();
    let (pvcs, w_pvcs) = pair();
    let (deployments, w_deployments) = pair();
    let (services, w_services) = pair();
    let (storage_classes, w_storage_classes) = pair();
    (
        Caches {
            namespaces,
            policies,
            quotas,
            limit_ranges,
            service_accounts,
            secrets,
            config_maps,
            pvcs,
            deployments,
            services,
            storage_classes,
        },
        CacheWriters {
            namespaces: w_namespaces,
            policies: w_policies,
            quotas: w_quotas,
            limit_ranges: w_limit_ranges,
            service_accounts: w_service_accounts,
            secrets: w_secrets,
            config_maps: w_config_maps,
            pvcs: w_pvcs,
            deployments: w_deployments,
            services: w_services,
            storage_classes: w_storage_classes,
        },
    )
}

impl Caches {
    /// Waits until every cache has listed its objects once, logging the laggards every
    /// `report` interval. Called by one task, before the controller starts.
    pub async fn wait_ready(&self, report: Duration) -> Result<()> {
        // One at a time, from this one task: each readiness future then has exactly one
        // waiter, which is all kube's DelayedInit can wake.
        wait_one("namespaces", &self.namespaces, report).await?;
        wait_one("networkpolicies", &self.policies, report).await?;
        wait_one("resourcequotas", &self.quotas, report).await?;
        wait_one("limitranges", &self.limit_ranges, report).await?;
        wait_one("serviceaccounts", &self.service_accounts, report).await?;
        wait_one("secrets", &self.secrets, report).await?;
        wait_one("configmaps", &self.config_maps, report).await?;
        wait_one("persistentvolumeclaims", &self.pvcs, report).await?;
        wait_one("deployments", &self.deployments, report).await?;
        wait_one("services", &self.services, report).await?;
        wait_one("storageclasses", &self.storage_classes, report).await
    }

    /// Forgets our writes in a tenant's namespace (after its deletion).
    pub fn forget_namespace(&self, namespace: &str) {
        self.namespaces.forget_namespace(namespace);
        self.policies.forget_namespace(namespace);
        self.quotas.forget_namespace(namespace);
        self.limit_ranges.forget_namespace(namespace);
        self.service_accounts.forget_namespace(namespace);
        self.secrets.forget_namespace(namespace);
        self.config_maps.forget_namespace(namespace);
        self.pvcs.forget_namespace(namespace);
        self.deployments.forget_namespace(namespace);
        self.services.forget_namespace(namespace);
    }
}

async fn wait_one<K>(kind: &'static str, cache: &Cache<K>, report: Duration) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut wait = std::pin::pin!(cache.store.wait_until_ready());
    loop {
        match tokio::time::timeout(report, &mut wait).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(Error::CacheNotReady(kind)),
            Err(_) => info!(kind, "still waiting for the first list of {kind}"),
        }
    }
}

/// The Tenant that controls `child`, from its controller owner reference. Keyed without a
/// namespace, as a cluster-scoped object.
pub fn tenant_of<K: Resource>(child: &K) -> Option<ObjectRef<TenantObject>> {
    let api_version = format!("{}/{}", names::GROUP, names::VERSION);
    child
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| {
            o.controller == Some(true) && o.kind == names::KIND && o.api_version == api_version
        })
        .map(|o| ObjectRef::new(&o.name))
}

/// Drops what no reconcile reads: managed fields are most of a small object's size.
pub fn trim<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Where watch tasks send the Tenants to reconcile.
pub type Triggers = UnboundedSender<ObjectRef<TenantObject>>;

fn watch_events<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, config)
        .default_backoff()
        .modify(trim::<K>)
        .reflect(writer)
}

/// Runs one watch until `stop`: fills the cache, forgets our writes of deleted objects and
/// asks for a reconcile of the owning Tenant of every change.
async fn follow<K>(
    kind: &'static str,
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    cache: Arc<Caches>,
    select: fn(&Caches) -> &Cache<K>,
    triggers: Option<Triggers>,
    stop: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut events = std::pin::pin!(events.take_until(stop.cancelled_owned()));
    let mut failing = false;
    while let Some(event) = events.next().await {
        let touched = match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => obj,
            Ok(watcher::Event::Delete(obj)) => {
                select(&cache).forget(&ObjectRef::from_obj(&obj));
                obj
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                // The stream backs off and retries by itself; say so once per outage.
                if !failing {
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        if let (Some(tx), Some(tenant)) = (&triggers, tenant_of(&touched)) {
            // The receiver is gone only when the controller stopped.
            let _ = tx.send(tenant);
        }
    }
}

/// Starts one watch task per child kind (objects labelled as managed by the operator) and
/// one for StorageClasses, each feeding its cache until `stop`.
pub fn spawn_watches(
    client: &Client,
    caches: &Arc<Caches>,
    writers: CacheWriters,
    triggers: &Triggers,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let managed = || {
        watcher::Config::default().labels(&format!(
            "{}={}",
            names::LABEL_MANAGED_BY,
            names::MANAGED_BY
        ))
    };
    macro_rules! child {
        ($kind:literal, $field:ident) => {
            tasks.spawn(follow(
                $kind,
                watch_events(Api::all(client.clone()), managed(), writers.$field),
                caches.clone(),
                |c| &c.$field,
                Some(triggers.clone()),
                stop.clone(),
            ));
        };
    }
    child!("namespaces", namespaces);
    child!("networkpolicies", policies);
    child!("resourcequotas", quotas);
    child!("limitranges", limit_ranges);
    child!("serviceaccounts", service_accounts);
    child!("secrets", secrets);
    child!("configmaps", config_maps);
    child!("persistentvolumeclaims", pvcs);
    child!("deployments", deployments);
    child!("services", services);
    tasks.spawn(follow(
        "storageclasses",
        watch_events(
            Api::all(client.clone()),
            watcher::Config::default(),
            writers.storage_classes,
        ),
        caches.clone(),
        |c| &c.storage_classes,
        None,
        stop.clone(),
    ));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cm(version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("c".into()),
                namespace: Some("tenant-a".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    fn fill(writer: &mut Writer<ConfigMap>, objects: &[ConfigMap]) {
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }

    #[tokio::test]
    async fn own_write_is_trusted_until_the_cache_shows_it() {
        let (store, mut writer) = reflector::store();
        let cache = Cache::new(store);
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));

        // We wrote version 5; the cache has nothing yet, then the older version 4.
        cache.remember(key.clone(), 1, Arc::new(cm("5")), true);
        assert!(
            matches!(cache.lookup(&key, 1), Lookup::Current(Some(o)) if o.metadata.resource_version.as_deref() == Some("5"))
        );
        fill(&mut writer, &[cm("4")]);
        assert!(
            matches!(cache.lookup(&key, 1), Lookup::Current(Some(o)) if o.metadata.resource_version.as_deref() == Some("5"))
        );
        // Another desired object is not covered by the memo.
        assert!(matches!(cache.lookup(&key, 2), Lookup::Cached(_)));
        // The cache catches up, then someone changes the object.
        fill(&mut writer, &[cm("5")]);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Current(Some(_))));
        fill(&mut writer, &[cm("9")]);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Cached(_)));
    }

    #[tokio::test]
    async fn a_deletion_seen_by_the_watch_is_not_mistaken_for_lag() {
        let (store, _writer) = reflector::store();
        let cache = Cache::new(store);
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        cache.remember(key.clone(), 1, Arc::new(cm("5")), true);
        cache.forget(&key);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
        // A proof from a comparison (not our write) never stands in for a missing object.
        cache.remember(key.clone(), 1, Arc::new(cm("5")), false);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
    }

    #[tokio::test(start_paused = true)]
    async fn lag_is_trusted_for_a_bounded_time() {
        let (store, _writer) = reflector::store();
        let cache = Cache::new(store);
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        cache.remember(key.clone(), 1, Arc::new(cm("5")), true);
        tokio::time::advance(LAG_TRUST + Duration::from_secs(1)).await;
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
    }
}
