//! Watch caches of every child kind, filled by watch tasks that run beside the controller,
//! and the memory of what the reconciler itself last wrote.
//!
//! Three rules keep reconciles from hanging, from writing twice and from growing with
//! the cluster:
//! - The caches are waited for once, before the controller starts ([`Caches::wait_ready`]),
//!   never inside a reconcile. (kube-runtime's `Store::wait_until_ready` wakes only the
//!   last task that polled it, so several reconciles waiting at once stayed pending for
//!   ever; these caches signal readiness through a `watch` channel, which wakes every
//!   waiter, and are awaited from one task anyway.)
//! - A cache may lag the reconciler's own last write by a few milliseconds. [`Cache::lookup`]
//!   compares the cached resourceVersion with the one our write returned, so a reconcile
//!   that runs in between neither writes again nor mistakes the lag for a deletion.
//! - Each object is kept as an [`Entry`]: its JSON without managed fields and status, as one
//!   string, plus the few status fields reconciles read. A Deployment costs about 3 KiB
//!   instead of the 10 KiB the API server sends and several times that as a typed value.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::object::TenantObject;
use tenantry_kube::names;

/// How long the reconciler trusts its own write over a cache that has not shown it yet.
/// Past this, an object missing from the cache is treated as missing.
const LAG_TRUST: Duration = Duration::from_secs(30);

/// Objects per page of a watch's first list: small pages keep the memory a restart needs
/// to read every object close to what the caches hold afterwards.
pub const LIST_PAGE: u32 = 100;

/// A cached object: what the reconciler compares and reads, compactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `status.phase` (Namespaces).
    pub phase: Option<Box<str>>,
    /// `status.observedGeneration` (Deployments).
    pub observed_generation: Option<i64>,
    /// `status.availableReplicas` (Deployments).
    pub available_replicas: Option<i64>,
    /// The object as JSON, without managed fields, resourceVersion and status.
    content: Box<str>,
}

impl Entry {
    /// The compact form of `obj`.
    pub fn of<K: Serialize>(obj: &K) -> Result<Entry> {
        let mut v = serde_json::to_value(obj).map_err(|source| Error::Json {
            what: "a watched object",
            source,
        })?;
        let status = v
            .as_object_mut()
            .and_then(|o| o.remove("status"))
            .unwrap_or(Value::Null);
        let meta = v.get_mut("metadata").and_then(Value::as_object_mut);
        let mut resource_version = None;
        let mut generation = None;
        let mut deleting = false;
        if let Some(meta) = meta {
            meta.remove("managedFields");
            resource_version = meta
                .remove("resourceVersion")
                .and_then(|r| r.as_str().map(str::to_owned));
            generation = meta.get("generation").and_then(Value::as_i64);
            deleting = meta.get("deletionTimestamp").is_some_and(|d| !d.is_null());
        }
        Ok(Entry {
            resource_version,
            generation,
            deleting,
            phase: status["phase"].as_str().map(Box::from),
            observed_generation: status["observedGeneration"].as_i64(),
            available_replicas: status["availableReplicas"].as_i64(),
            content: v.to_string().into_boxed_str(),
        })
    }

    /// The object as JSON (no managed fields, resourceVersion or status).
    pub fn content(&self) -> Result<Value> {
        serde_json::from_str(&self.content).map_err(|source| Error::Json {
            what: "a cached object",
            source,
        })
    }

    /// The object as a typed value (without its status).
    pub fn decode<K: DeserializeOwned>(&self) -> Result<K> {
        serde_json::from_str(&self.content).map_err(|source| Error::Json {
            what: "a cached object",
            source,
        })
    }

    /// Bytes this entry holds, for the memory figures.
    pub fn size(&self) -> usize {
        self.content.len() + self.resource_version.as_ref().map_or(0, String::len)
    }
}

/// What the reconciler last wrote (or proved unchanged) for one object.
struct Applied {
    /// Digest of the desired object.
    digest: u64,
    /// resourceVersion the object had after that write or check.
    resource_version: Option<String>,
    /// The server's answer to our write, kept only until the cache shows that version.
    object: Option<Arc<Entry>>,
    at: Instant,
}

/// What [`Cache::lookup`] knows about an object.
pub enum Lookup {
    /// Matches the desired object as of our last write or check; nothing to do. None when
    /// neither the cache nor our write holds the object yet.
    Current(Option<Arc<Entry>>),
    /// In the cache, changed since our last write or check (or never checked): compare.
    Cached(Arc<Entry>),
    /// In the cache exactly as our last write or check left it, but that was for another
    /// desired object: the desired object changed.
    Superseded(Arc<Entry>),
    /// Neither in the cache nor recently written by us.
    Missing,
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

type Objects<K> = HashMap<ObjectRef<K>, Arc<Entry>>;

/// The watch cache of one kind plus the reconciler's memory of its own writes.
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    objects: RwLock<Objects<K>>,
    /// Objects of a first list (or a re-list) in progress, swapped in when it ends.
    listing: Mutex<Option<Objects<K>>>,
    ready: tokio::sync::watch::Sender<bool>,
    applied: Mutex<HashMap<ObjectRef<K>, Applied>>,
}

impl<K> Default for Cache<K>
where
    K: Resource<DynamicType = ()> + 'static,
{
    fn default() -> Self {
        Cache {
            objects: RwLock::default(),
            listing: Mutex::default(),
            ready: tokio::sync::watch::Sender::new(false),
            applied: Mutex::default(),
        }
    }
}

/// Locks `m`; the maps hold no invariant a panicking thread could break half-way.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Serialize + 'static,
{
    /// The cached object at `key`.
    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<Entry>> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Every cached object (a snapshot).
    pub fn entries(&self) -> Vec<(ObjectRef<K>, Arc<Entry>)> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of cached objects and the bytes their entries hold.
    pub fn footprint(&self) -> (usize, usize) {
        let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
        (objects.len(), objects.values().map(|e| e.size()).sum())
    }

    /// Applies one watch event; returns the object it was about, if any.
    pub fn handle(&self, event: &watcher::Event<K>) -> Result<()> {
        match event {
            watcher::Event::Init => *lock(&self.listing) = Some(HashMap::new()),
            watcher::Event::InitApply(obj) => {
                let entry = Arc::new(Entry::of(obj)?);
                match lock(&self.listing).as_mut() {
                    Some(listing) => {
                        listing.insert(ObjectRef::from_obj(obj), entry);
                    }
                    None => self.insert(obj, entry),
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = lock(&self.listing).take() {
                    *self.objects.write().unwrap_or_else(|e| e.into_inner()) = listed;
                }
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(obj) => self.insert(obj, Arc::new(Entry::of(obj)?)),
            watcher::Event::Delete(obj) => {
                let key = ObjectRef::from_obj(obj);
                self.objects
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                self.forget(&key);
            }
        }
        Ok(())
    }

    fn insert(&self, obj: &K, entry: Arc<Entry>) {
        self.objects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ObjectRef::from_obj(obj), entry);
    }

    /// Decides whether the object at `key`, desired with `digest`, needs a comparison.
    pub fn lookup(&self, key: &ObjectRef<K>, digest: u64) -> Lookup {
        let cached = self.get(key);
        let mut applied = lock(&self.applied);
        let Some(memo) = applied.get_mut(key) else {
            return cached.map_or(Lookup::Missing, Lookup::Cached);
        };
        if memo.digest != digest {
            return match cached {
                Some(obj) if obj.resource_version == memo.resource_version => {
                    Lookup::Superseded(obj)
                }
                Some(obj) => Lookup::Cached(obj),
                None => Lookup::Missing,
            };
        }
        match cached {
            Some(obj) => {
                let version = obj.resource_version.as_deref();
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
    pub fn remember(&self, key: ObjectRef<K>, digest: u64, object: Arc<Entry>, written: bool) {
        let memo = Applied {
            digest,
            resource_version: object.resource_version.clone(),
            object: written.then_some(object),
            at: Instant::now(),
        };
        lock(&self.applied).insert(key, memo);
    }

    /// Forgets what we wrote for `key` (the watch saw it deleted).
    pub fn forget(&self, key: &ObjectRef<K>) {
        lock(&self.applied).remove(key);
    }

    /// Forgets every object in `namespace` (the tenant is gone).
    pub fn forget_namespace(&self, namespace: &str) {
        lock(&self.applied)
            .retain(|k, _| k.namespace.as_deref() != Some(namespace) && k.name != namespace);
    }

    /// Waits until the first list has completed, logging every `report`.
    async fn wait_ready(&self, kind: &'static str, report: Duration) -> Result<()> {
        let mut ready = self.ready.subscribe();
        loop {
            match tokio::time::timeout(report, ready.wait_for(|r| *r)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => return Err(Error::CacheNotReady(kind)),
                Err(_) => info!(kind, "still waiting for the first list of {kind}"),
            }
        }
    }
}

/// The caches of every child kind (and of StorageClasses).
#[derive(Default)]
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

/// Calls `$f!(field, kind)` for every cache.
macro_rules! each_cache {
    ($f:ident) => {
        $f!(namespaces, "namespaces");
        $f!(policies, "networkpolicies");
        $f!(quotas, "resourcequotas");
        $f!(limit_ranges, "limitranges");
        $f!(service_accounts, "serviceaccounts");
        $f!(secrets, "secrets");
        $f!(config_maps, "configmaps");
        $f!(pvcs, "persistentvolumeclaims");
        $f!(deployments, "deployments");
        $f!(services, "services");
        $f!(storage_classes, "storageclasses");
    };
}

impl Caches {
    /// Waits until every cache has listed its objects once, logging the laggards every
    /// `report` interval. Called before the controller starts, never from a reconcile.
    pub async fn wait_ready(&self, report: Duration) -> Result<()> {
        macro_rules! wait {
            ($field:ident, $kind:literal) => {
                self.$field.wait_ready($kind, report).await?;
            };
        }
        each_cache!(wait);
        Ok(())
    }

    /// Forgets our writes in a tenant's namespace (after its deletion).
    pub fn forget_namespace(&self, namespace: &str) {
        macro_rules! forget {
            ($field:ident, $kind:literal) => {
                self.$field.forget_namespace(namespace);
            };
        }
        each_cache!(forget);
    }

    /// Objects cached and the bytes their entries hold, by kind.
    pub fn footprint(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out = vec![];
        macro_rules! measure {
            ($field:ident, $kind:literal) => {
                let (n, bytes) = self.$field.footprint();
                out.push(($kind, n, bytes));
            };
        }
        each_cache!(measure);
        out
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

/// Runs one watch until `stop`: fills the cache (which forgets our writes of deleted
/// objects) and asks for a reconcile of the owning Tenant of every change.
async fn follow<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    caches: Arc<Caches>,
    select: fn(&Caches) -> &Cache<K>,
    triggers: Option<Triggers>,
    stop: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug + Send + 'static,
{
    let events = watcher(api, config.page_size(LIST_PAGE))
        .default_backoff()
        .take_until(stop.cancelled_owned());
    let mut events = std::pin::pin!(events);
    let mut failing = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
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
        if let Err(e) = select(&caches).handle(&event) {
            warn!(kind, error = %e, "could not cache a watched object");
        }
        let touched = match &event {
            watcher::Event::Apply(obj)
            | watcher::Event::InitApply(obj)
            | watcher::Event::Delete(obj) => obj,
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        if let (Some(tx), Some(tenant)) = (&triggers, tenant_of(touched)) {
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
        ($field:ident, $kind:literal) => {
            tasks.spawn(follow(
                $kind,
                Api::all(client.clone()),
                managed(),
                caches.clone(),
                |c| &c.$field,
                Some(triggers.clone()),
                stop.clone(),
            ));
        };
    }
    child!(namespaces, "namespaces");
    child!(policies, "networkpolicies");
    child!(quotas, "resourcequotas");
    child!(limit_ranges, "limitranges");
    child!(service_accounts, "serviceaccounts");
    child!(secrets, "secrets");
    child!(config_maps, "configmaps");
    child!(pvcs, "persistentvolumeclaims");
    child!(deployments, "deployments");
    child!(services, "services");
    tasks.spawn(follow(
        "storageclasses",
        Api::all(client.clone()),
        watcher::Config::default(),
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

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

    fn fill(cache: &Cache<ConfigMap>, objects: &[ConfigMap]) {
        cache.handle(&watcher::Event::Init).unwrap();
        for o in objects {
            cache.handle(&watcher::Event::InitApply(o.clone())).unwrap();
        }
        cache.handle(&watcher::Event::InitDone).unwrap();
    }

    fn version(lookup: Lookup) -> Option<String> {
        match lookup {
            Lookup::Current(Some(e)) => e.resource_version.clone(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn own_write_is_trusted_until_the_cache_shows_it() {
        let cache = Cache::<ConfigMap>::default();
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));

        // We wrote version 5; the cache has nothing yet, then the older version 4.
        cache.remember(key.clone(), 1, Arc::new(Entry::of(&cm("5")).unwrap()), true);
        assert_eq!(version(cache.lookup(&key, 1)).as_deref(), Some("5"));
        fill(&cache, &[cm("4")]);
        assert_eq!(version(cache.lookup(&key, 1)).as_deref(), Some("5"));
        // Another desired object is not covered by the memo.
        assert!(matches!(cache.lookup(&key, 2), Lookup::Cached(_)));
        // The cache catches up, then someone changes the object.
        fill(&cache, &[cm("5")]);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Current(Some(_))));
        assert!(matches!(cache.lookup(&key, 2), Lookup::Superseded(_)));
        fill(&cache, &[cm("9")]);
        assert!(matches!(cache.lookup(&key, 1), Lookup::Cached(_)));
    }

    #[tokio::test]
    async fn a_deletion_seen_by_the_watch_is_not_mistaken_for_lag() {
        let cache = Cache::<ConfigMap>::default();
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        fill(&cache, &[cm("5")]);
        cache.remember(key.clone(), 1, Arc::new(Entry::of(&cm("5")).unwrap()), true);
        cache.handle(&watcher::Event::Delete(cm("6"))).unwrap();
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
        // A proof from a comparison (not our write) never stands in for a missing object.
        cache.remember(
            key.clone(),
            1,
            Arc::new(Entry::of(&cm("5")).unwrap()),
            false,
        );
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
    }

    #[tokio::test(start_paused = true)]
    async fn lag_is_trusted_for_a_bounded_time() {
        let cache = Cache::<ConfigMap>::default();
        let key = ObjectRef::<ConfigMap>::new("c").within("tenant-a");
        cache.remember(key.clone(), 1, Arc::new(Entry::of(&cm("5")).unwrap()), true);
        tokio::time::advance(LAG_TRUST + Duration::from_secs(1)).await;
        assert!(matches!(cache.lookup(&key, 1), Lookup::Missing));
    }

    #[tokio::test]
    async fn every_waiter_is_woken_when_the_first_list_ends() {
        let cache = Arc::new(Cache::<ConfigMap>::default());
        let mut waiters = JoinSet::new();
        for _ in 0..8 {
            let cache = cache.clone();
            waiters.spawn(async move {
                cache
                    .wait_ready("configmaps", Duration::from_secs(60))
                    .await
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        fill(&cache, &[cm("1")]);
        let all = tokio::time::timeout(Duration::from_secs(5), waiters.join_all())
            .await
            .expect("every waiter is woken");
        assert!(all.iter().all(Result::is_ok));
    }

    #[test]
    fn entries_keep_what_reconciles_read_and_drop_the_rest() {
        let mut d = cm("7");
        d.metadata.generation = Some(3);
        d.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("someone".into()),
            ..ManagedFieldsEntry::default()
        }]);
        let mut v = serde_json::to_value(&d).unwrap();
        v["status"] = serde_json::json!({"phase": "Active", "observedGeneration": 2, "availableReplicas": 1, "conditions": [{"message": "long"}]});
        let e = Entry::of(&v).unwrap();
        assert_eq!(e.resource_version.as_deref(), Some("7"));
        assert_eq!(e.generation, Some(3));
        assert_eq!(e.phase.as_deref(), Some("Active"));
        assert_eq!(e.observed_generation, Some(2));
        assert_eq!(e.available_replicas, Some(1));
        assert!(!e.deleting);
        let content = e.content().unwrap();
        assert!(content["metadata"].get("managedFields").is_none());
        assert!(content["metadata"].get("resourceVersion").is_none());
        assert!(content.get("status").is_none());
        let back: ConfigMap = e.decode().unwrap();
        assert_eq!(back.metadata.name.as_deref(), Some("c"));
    }
}
