//! The reconciler: for each Tenant, server-side-apply every child the builders describe,
//! issue and renew its certificate, report status, and clean up on deletion.
//!
//! Every reconcile starts from scratch. Observed children come from watch caches, and a
//! child is written only when the cache shows it differs from the desired object, so an
//! idle resync of a converged Tenant makes no API call at all.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::builders::{self, CheckedSpec, Owner};
use crate::ca::{CaState, Signer};
use crate::cache::{Cache, Caches, Entry, Lookup};
use crate::config::Settings;
use crate::diff::{agree_on, first_difference, is_subset};
use crate::error::{Error, Result, is_already_exists, is_not_found};
use crate::metrics::Metrics;
use crate::object::{InvalidTenant, TenantObject};
use crate::status::{self, Observed, Transition, reasons, types};
use tenantry_kube::crd::{CertificateStatus, LastBackupStatus, Tenant, TenantPhase, TenantStatus};
use tenantry_kube::names;
use tenantry_pki::{self as pki, CertificateInfo, LeafRequest};

/// A process-local digest of a serialized object.
fn digest(value: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut h);
    h.finish()
}

/// What the reconciler last wrote as a Tenant's status.
struct StatusMemo {
    digest: u64,
    resource_version: Option<String>,
}

/// Everything a reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Resolved operator settings.
    pub settings: Settings,
    /// The operator's CA, live: the leader's CA manager replaces it when the CA Secret
    /// changes (a rotation starts or ends), without a restart.
    ca: RwLock<Arc<CaState>>,
    /// Watch caches.
    pub caches: Arc<Caches>,
    /// The API's token public key (PEM), copied into every tenant namespace.
    pub token_public_key: RwLock<Option<String>>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The clock; tests pin it.
    pub clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
    failures: Mutex<HashMap<String, u32>>,
    statuses: Mutex<HashMap<String, StatusMemo>>,
}

impl Context {
    /// A context reading the system clock.
    pub fn new(
        client: Client,
        settings: Settings,
        ca: Arc<CaState>,
        caches: Arc<Caches>,
        token_public_key: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: names::CONTROLLER_NAME.to_owned(),
                instance: None,
            },
        );
        Context {
            client,
            settings,
            ca: RwLock::new(ca),
            caches,
            token_public_key: RwLock::new(token_public_key),
            recorder,
            metrics,
            clock: Box::new(Timestamp::now),
            failures: Mutex::default(),
            statuses: Mutex::default(),
        }
    }

    /// Replaces the clock (tests and benchmarks).
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Context {
        self.clock = Box::new(clock);
        self
    }

    /// The CA as it is now.
    pub fn ca(&self) -> Arc<CaState> {
        self.ca
            .read()
            .map(|ca| ca.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Replaces the CA; true when tenants see a difference (their bundle or re-issue
    /// times), so every Tenant must be reconciled.
    pub fn set_ca(&self, new: CaState) -> bool {
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        let changed = !ca.same(&new);
        *ca = Arc::new(new);
        changed
    }

    /// The time, in whole seconds (the precision of API timestamps).
    pub(crate) fn now(&self) -> Timestamp {
        let now = (self.clock)();
        Timestamp::from_second(now.as_second()).unwrap_or(now)
    }

    fn token_key(&self) -> Option<String> {
        self.token_public_key.read().ok().and_then(|k| k.clone())
    }

    /// True when `object` is older than the Tenant our last status write produced.
    fn is_stale(&self, object: &TenantObject) -> bool {
        let Some(seen) = object.meta().resource_version.as_deref() else {
            return false;
        };
        self.statuses()
            .get(&object.name_any())
            .and_then(|m| m.resource_version.as_deref())
            .is_some_and(|written| crate::cache::older(Some(seen), Some(written)))
    }

    fn statuses(&self) -> std::sync::MutexGuard<'_, HashMap<String, StatusMemo>> {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the object match `desired` with at most one write, and returns it as observed
    /// (None while neither the cache nor our write shows it, e.g. right after a restart of
    /// the watch).
    ///
    /// The cached object is compared first (every field we set must have the same value).
    /// When that comparison fails, a server-side dry-run apply decides: if applying would
    /// change nothing, the difference was the API server's defaulting or normalisation and
    /// nothing is written. Either proof is remembered for the object's resourceVersion, so
    /// an idle resync or a restart of a converged operator sends no write at all.
    async fn ensure<K>(
        &self,
        api: &Api<K>,
        cache: &Cache<K>,
        desired: K,
    ) -> Result<Option<Arc<Entry>>>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
    {
        let name = desired
            .meta()
            .name
            .clone()
            .ok_or(Error::MissingField("metadata.name"))?;
        let mut key = ObjectRef::<K>::new(&name);
        if let Some(ns) = &desired.meta().namespace {
            key = key.within(ns);
        }
        let want = serde_json::to_value(&desired).map_err(|source| Error::Json {
            what: "a child object",
            source,
        })?;
        let wanted = digest(&want);
        let why = match cache.lookup(&key, wanted) {
            Lookup::Current(observed) => return Ok(observed),
            Lookup::Superseded(current) => {
                // Unchanged since our last write, which was of another desired object: the
                // difference is ours, so there is nothing to ask the server first.
                if is_subset(&want, &current.content()?) {
                    cache.remember(key, wanted, current.clone(), false);
                    return Ok(Some(current));
                }
                "the desired object changed"
            }
            Lookup::Cached(current) => {
                let have = current.content()?;
                if is_subset(&want, &have) {
                    cache.remember(key, wanted, current.clone(), false);
                    return Ok(Some(current));
                }
                debug!(object = %key, field = ?first_difference(&want, &have), "differs from the cache; asking the server");
                let preview = api
                    .patch(
                        &name,
                        &PatchParams::apply(names::FIELD_MANAGER).force().dry_run(),
                        &Patch::Apply(&desired),
                    )
                    .await
                    .map_err(|e| {
                        Error::kube(format!("dry-run apply {} {}", K::kind(&()), key), e)
                    })?;
                self.metrics.dry_run();
                // Only the fields we set matter: the server may have moved on elsewhere
                // (a controller's annotation) since the cache saw the object.
                if agree_on(&want, &Entry::of(&preview)?.content()?, &have) {
                    cache.remember(key, wanted, current.clone(), false);
                    return Ok(Some(current));
                }
                "the object drifted"
            }
            Lookup::Missing => "the object is missing",
        };
        debug!(object = %key, why, "applying");
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(names::FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|e| Error::kube(format!("apply {} {}", K::kind(&()), key), e))?;
        self.metrics.wrote();
        let applied = Arc::new(Entry::of(&applied)?);
        cache.remember(key, wanted, applied.clone(), true);
        Ok(Some(applied))
    }

    pub(crate) async fn publish(&self, reference: &ObjectReference, t: &Transition) {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.clone(),
            note: Some(t.note.clone()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        match self.recorder.publish(&event, reference).await {
            Ok(()) => self.metrics.wrote(),
            // An Event is best effort; the status carries the same information.
            Err(e) => warn!(object = ?reference.name, error = %e, "could not publish event"),
        }
    }
}

/// What [`reconcile`] decided about storage.
fn storage_class(
    owner: &Owner<'_>,
    settings: &Settings,
    classes: &Cache<StorageClass>,
) -> std::result::Result<String, Observed> {
    let Some(class) = owner
        .tenant
        .spec
        .storage
        .storage_class_name
        .clone()
        .or_else(|| settings.default_storage_class.clone())
    else {
        return Err(Observed::no(
            types::STORAGE_ENCRYPTED,
            reasons::NO_STORAGE_CLASS,
            "spec.storage.storageClassName is unset and the operator has no --default-storage-class",
        ));
    };
    if settings.encrypted_storage_classes.contains(&class) {
        return Ok(class);
    }
    match classes
        .get(&ObjectRef::new(&class))
        .map(|sc| sc.decode::<StorageClass>())
    {
        Some(Ok(sc))
            if sc
                .annotations()
                .get(names::ANNOTATION_ENCRYPTED)
                .is_some_and(|v| v == "true") =>
        {
            Ok(class)
        }
        Some(_) => Err(Observed::no(
            types::STORAGE_ENCRYPTED,
            reasons::STORAGE_CLASS_NOT_ENCRYPTED,
            format!(
                "StorageClass {class} is not marked encrypted (annotation {}: \"true\" or --encrypted-storage-classes); no volume was made",
                names::ANNOTATION_ENCRYPTED
            ),
        )),
        None => Err(Observed::no(
            types::STORAGE_ENCRYPTED,
            reasons::STORAGE_CLASS_NOT_ENCRYPTED,
            format!(
                "StorageClass {class} does not exist or is not marked encrypted; no volume was made"
            ),
        )),
    }
}

/// A certificate in force: what it is, when the operator replaces it, and the
/// fingerprint of the CA that issued it.
#[derive(Clone, Debug)]
struct InForce {
    info: CertificateInfo,
    renewal: Timestamp,
    issuer_fingerprint: String,
}

/// What to do about an existing TLS Secret.
enum Assessment {
    /// Nothing: it is as it should be.
    Keep(InForce),
    /// The leaf is good but `ca.crt` is not the trust bundle (a CA rotation started or
    /// ended): rewrite the bundle, keeping the leaf and its key.
    Rebundle(InForce, String, SecretString),
    /// Issue a new leaf, because...
    Reissue(&'static str),
}

/// Why an existing TLS Secret must be replaced or rebundled, or the certificate it holds.
/// During a CA rotation a leaf from the previous CA is kept until `reissue_at`, and then
/// only once its Secret holds the bundle, so clients get the new CA before the leaf
/// changes.
fn assess_certificate(
    secret: &Secret,
    ca: &CaState,
    dns_names: &[String],
    renew_before: Option<Duration>,
    reissue_at: Timestamp,
    now: Timestamp,
) -> Assessment {
    let Some(data) = secret.data.as_ref() else {
        return Assessment::Reissue("the Secret has no data");
    };
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let (Some(cert), Some(key)) = (text("tls.crt"), text("tls.key")) else {
        return Assessment::Reissue("a key is missing");
    };
    let key = SecretString::from(key);
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Assessment::Reissue("the Secret is not of type kubernetes.io/tls");
    }
    let Ok(info) = pki::parse_certificate(&cert) else {
        return Assessment::Reissue("tls.crt does not parse");
    };
    if !pki::key_matches(&info, &key) {
        return Assessment::Reissue("tls.key does not match tls.crt");
    }
    let Some(signer) = ca.signer(&cert) else {
        return Assessment::Reissue("tls.crt was not issued by the operator CA");
    };
    if info.dns_names != dns_names || !info.ip_addresses.is_empty() {
        return Assessment::Reissue("the certificate names changed");
    }
    let bundled = text("ca.crt").as_deref() == Some(ca.bundle());
    let mut renewal = pki::renewal_time(info.not_before, info.not_after, renew_before);
    if signer == Signer::Previous {
        if bundled && reissue_at <= now {
            return Assessment::Reissue(
                "tls.crt is from the previous CA, which a CA rotation retires",
            );
        }
        renewal = renewal.min(reissue_at);
    }
    if renewal <= now && bundled {
        return Assessment::Reissue("the certificate is due for renewal");
    }
    let in_force = InForce {
        info,
        renewal,
        issuer_fingerprint: ca.fingerprint_of(signer).to_owned(),
    };
    if bundled {
        Assessment::Keep(in_force)
    } else {
        Assessment::Rebundle(in_force, cert, key)
    }
}

/// Reconciles one Tenant, bounded by the reconcile timeout so that no API call can hold a
/// Tenant (or the operator's shutdown) for ever. Errors are transient (API calls);
/// permanent problems become conditions.
pub async fn reconcile(object: Arc<TenantObject>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let limit = ctx.settings.reconcile_timeout;
    let result = match tokio::time::timeout(limit, reconcile_object(&object, &ctx)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout(limit)),
    };
    ctx.metrics.reconciled(start.elapsed());
    match &result {
        Ok(_) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&object.name_any());
            }
        }
        Err(e) => ctx.metrics.failed(e.metric_label()),
    }
    result
}

/// Requeues a failed Tenant with exponential backoff (1 s doubling to 5 min).
pub fn error_policy(object: Arc<TenantObject>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = object.name_any();
    let attempts = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(name.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = Duration::from_secs(1u64 << attempts.min(9).saturating_sub(1))
        .min(Duration::from_secs(300));
    warn!(tenant = %name, error = %error, source = ?std::error::Error::source(error), attempts, "reconcile failed; retrying in {delay:?}");
    Action::requeue(delay)
}

async fn reconcile_object(object: &TenantObject, ctx: &Context) -> Result<Action> {
    if ctx.is_stale(object) {
        // The watch has not delivered our own last status write yet; that event is on its
        // way and brings a reconcile of the current Tenant. Reconciling this older copy
        // would compute conditions against a stale status and write them again.
        return Ok(Action::await_change());
    }
    if object.meta().deletion_timestamp.is_some() {
        return cleanup(object, ctx).await;
    }
    match &object.0 {
        Ok(tenant) => reconcile_tenant(tenant, ctx).await,
        Err(invalid) => reconcile_unreadable(object, invalid, ctx).await,
    }
}

/// A Tenant this operator cannot read gets `Ready=False` with the reason, and an Event; its
/// children (if a readable version made any) are left as they are.
async fn reconcile_unreadable(
    object: &TenantObject,
    invalid: &InvalidTenant,
    ctx: &Context,
) -> Result<Action> {
    let message = format!(
        "this operator cannot read the Tenant ({}); fix the spec or upgrade the operator",
        invalid.error
    );
    let status = degraded(
        invalid.status.as_ref(),
        invalid.metadata.generation,
        message,
        ctx.now(),
    );
    write_status(ctx, object, status).await?;
    Ok(Action::await_change())
}

/// `previous` with phase Degraded and `Ready=False` for an invalid spec.
fn degraded(
    previous: Option<&TenantStatus>,
    generation: Option<i64>,
    message: String,
    now: Timestamp,
) -> TenantStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.phase = Some(TenantPhase::Degraded);
    status.observed_generation = generation;
    let observed = vec![Observed::no(types::READY, reasons::INVALID_SPEC, message)];
    let mut conditions: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != types::READY)
        .cloned()
        .collect();
    conditions.extend(status::merge_conditions(
        &status.conditions,
        &observed,
        generation,
        now,
    ));
    status.conditions = conditions;
    status
}

async fn reconcile_tenant(tenant: &Tenant, ctx: &Context) -> Result<Action> {
    let added;
    let tenant = if tenant.finalizers().iter().any(|f| f == names::FINALIZER) {
        tenant
    } else {
        let mut finalizers = tenant.finalizers().to_vec();
        finalizers.push(names::FINALIZER.to_owned());
        added = patch_finalizers(tenant.meta(), finalizers, ctx).await?;
        match &added {
            Some(TenantObject(Ok(t))) => t,
            // Gone, or changed into something unreadable meanwhile: the watch brings it back.
            _ => return Ok(Action::await_change()),
        }
    };
    let object = TenantObject(Ok(tenant.clone()));
    let owner = Owner::of(tenant)?;
    let now = ctx.now();
    let checked = match builders::check_spec(&owner) {
        Ok(c) => c,
        Err(message) => {
            let status = degraded(
                tenant.status.as_ref(),
                tenant.meta().generation,
                message,
                now,
            );
            write_status(ctx, &object, status).await?;
            return Ok(Action::await_change());
        }
    };
    let (conditions, certificate) = apply_children(&owner, &checked, ctx, now).await?;
    let (ready, phase) = status::summarize(&conditions, tenant.spec.suspended);
    let previous = tenant.status.clone().unwrap_or_default();
    let runtime_ready = conditions
        .iter()
        .any(|c| c.type_ == types::RUNTIME_READY && c.ok);
    let backup = observe_backup(
        &owner,
        previous.last_backup.as_ref(),
        runtime_ready,
        ctx,
        now,
    )
    .await;
    ctx.metrics.set_backup(
        &owner.name,
        backup
            .as_ref()
            .map(|(o, last)| (last.as_ref().map(|l| l.time.0), o.ok)),
    );
    let mut all = conditions;
    all.push(ready);
    let last_backup = match backup {
        Some((observed, last)) => {
            all.push(observed);
            last
        }
        None => None,
    };
    let status = TenantStatus {
        phase: Some(phase),
        observed_generation: tenant.meta().generation,
        namespace: Some(owner.namespace.clone()),
        endpoint: Some(builders::endpoint(&owner)),
        certificate: certificate.as_ref().map(|c| CertificateStatus {
            serial: c.info.serial_hex.clone(),
            not_after: Time(c.info.not_after),
            renewal_time: Time(c.renewal),
            issuer_fingerprint: Some(c.issuer_fingerprint.clone()),
        }),
        last_backup,
        conditions: status::merge_conditions(
            &previous.conditions,
            &all,
            tenant.meta().generation,
            now,
        ),
    };
    ctx.metrics
        .set_certificate(&owner.name, certificate.as_ref().map(|c| c.info.not_after));
    write_status(ctx, &object, status).await?;
    let mut next = ctx.settings.resync;
    if let Some(c) = &certificate {
        let until = c.renewal.duration_since(now);
        let until = Duration::try_from(until).unwrap_or(Duration::ZERO);
        next = next.min(until.max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(next))
}

/// With `spec.backup`: the BackupStale condition and the newest backup, read from the
/// runtime's `/metrics` while it runs (the last one seen is kept while it does not).
async fn observe_backup(
    owner: &Owner<'_>,
    previous: Option<&LastBackupStatus>,
    runtime_ready: bool,
    ctx: &Context,
    now: Timestamp,
) -> Option<(Observed, Option<LastBackupStatus>)> {
    let spec = owner.tenant.spec.backup.as_ref()?;
    if ctx.settings.backup_recipients.is_none() {
        return Some((
            Observed::yes(
                types::BACKUP_STALE,
                "NoBackupRecipients",
                "the operator has no --backup-recipients-file, so no backups are taken",
            ),
            previous.cloned(),
        ));
    }
    let interval = tenantry_proto::runtime_config::parse_interval(&spec.interval)
        .unwrap_or(Duration::from_secs(86_400));
    let mut last = previous.map(|p| p.time.0);
    let note = if runtime_ready {
        let host = format!("{}.{}.svc", names::SERVICE, owner.namespace);
        match crate::backup_status::scrape(&host, names::RUNTIME_PORT, ctx.ca().bundle()).await {
            Ok(reported) => {
                last = last.max(reported);
                String::new()
            }
            Err(e) => format!(" (the runtime's /metrics could not be read: {e})"),
        }
    } else {
        " (the runtime is not running)".to_owned()
    };
    let observed = match last {
        None => Observed::yes(
            types::BACKUP_STALE,
            "NoBackupReported",
            format!("the runtime has reported no backup yet{note}"),
        ),
        Some(t)
            if Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO)
                > interval * 2 =>
        {
            Observed::yes(
                types::BACKUP_STALE,
                "BackupOverdue",
                format!(
                    "the newest backup, taken {t}, is older than twice the interval of {}{note}",
                    spec.interval
                ),
            )
        }
        Some(t) => Observed::no(
            types::BACKUP_STALE,
            "BackupCurrent",
            format!("the newest backup was taken {t}{note}"),
        ),
    };
    Some((observed, last.map(|t| LastBackupStatus { time: Time(t) })))
}

/// Writes `status` if it differs from the Tenant's, and publishes the Events of the change.
/// A Tenant from a watch cache that has not seen our last status write yet is not written
/// again.
async fn write_status(ctx: &Context, object: &TenantObject, status: TenantStatus) -> Result<()> {
    let name = object.name_any();
    ctx.metrics.set_phase(&name, status.phase);
    let current = object.status();
    if current == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": format!("{}/{}", names::GROUP, names::VERSION),
        "kind": names::KIND,
        "status": status,
    });
    let wanted = digest(&patch);
    let seen = object.meta().resource_version.as_deref();
    let written = ctx
        .statuses()
        .get(&name)
        .is_some_and(|m| m.digest == wanted && seen == m.resource_version.as_deref());
    if written || ctx.is_stale(object) {
        return Ok(());
    }
    debug!(tenant = %name, version = ?seen, "writing the status");
    let api: Api<TenantObject> = Api::all(ctx.client.clone());
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(names::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| Error::kube(format!("write the status of Tenant {name}"), e))?;
    ctx.metrics.wrote();
    ctx.statuses().insert(
        name.clone(),
        StatusMemo {
            digest: wanted,
            resource_version: written.meta().resource_version.clone(),
        },
    );
    let reference = object.object_ref(&());
    for t in status::transitions(current, &status) {
        info!(tenant = %name, reason = %t.reason, "{}", t.note);
        ctx.publish(&reference, &t).await;
    }
    Ok(())
}

/// Sets the Tenant's finalizers, guarded by its resourceVersion. None when the Tenant is
/// gone.
async fn patch_finalizers(
    meta: &ObjectMeta,
    finalizers: Vec<String>,
    ctx: &Context,
) -> Result<Option<TenantObject>> {
    let api: Api<TenantObject> = Api::all(ctx.client.clone());
    let name = meta
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": meta.resource_version,
        }
    });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(t) => {
            ctx.metrics.wrote();
            Ok(Some(t))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(Error::kube(
            format!("update the finalizers of Tenant {name}"),
            e,
        )),
    }
}

/// Applies every child in dependency order and reports a condition for each part, plus
/// the certificate in the TLS Secret and its renewal time.
async fn apply_children(
    owner: &Owner<'_>,
    checked: &CheckedSpec,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Vec<Observed>, Option<InForce>)> {
    let namespace = ensure_namespace(owner, ctx).await?;
    let isolation = ensure_isolation(owner, ctx).await?;
    let storage = ensure_storage(owner, ctx).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let certificate = ensure_certificate(owner, checked, &secrets, ctx, now).await?;
    let issued = Observed::yes(
        types::CERTIFICATE_READY,
        "Issued",
        format!(
            "serial {} valid until {}",
            certificate.info.serial_hex, certificate.info.not_after
        ),
    );
    let runtime = ensure_runtime(owner, storage.ok, ctx).await?;
    Ok((
        vec![namespace, isolation, storage, issued, runtime],
        Some(certificate),
    ))
}

async fn ensure_namespace(owner: &Owner<'_>, ctx: &Context) -> Result<Observed> {
    let ns = &owner.namespace;
    let namespace = ctx
        .ensure(
            &Api::all(ctx.client.clone()),
            &ctx.caches.namespaces,
            builders::desired_namespace(owner),
        )
        .await?;
    let active = namespace.as_ref().and_then(|n| n.phase.as_deref()) == Some("Active");
    Ok(if active {
        Observed::yes(
            types::NAMESPACE_READY,
            "Active",
            format!("namespace {ns} is active"),
        )
    } else {
        Observed::no(
            types::NAMESPACE_READY,
            "NotActive",
            format!("namespace {ns} is not active yet"),
        )
    })
}

/// The ServiceAccount, the network policies, the quota and the limits.
async fn ensure_isolation(owner: &Owner<'_>, ctx: &Context) -> Result<Observed> {
    let (c, s) = (&ctx.caches, &ctx.settings);
    let ns = owner.namespace.as_str();
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.service_accounts,
        builders::service_account(owner),
    )
    .await?;
    let policies = Api::namespaced(ctx.client.clone(), ns);
    for policy in [
        builders::default_deny_policy(owner),
        builders::ingress_policy(owner, s),
        builders::egress_policy(owner, s),
    ] {
        ctx.ensure(&policies, &c.policies, policy).await?;
    }
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.quotas,
        builders::resource_quota(owner),
    )
    .await?;
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.limit_ranges,
        builders::limit_range(owner),
    )
    .await?;
    Ok(Observed::yes(
        types::NETWORK_ISOLATED,
        "PoliciesApplied",
        "default-deny ingress and egress with the platform's allow rules",
    ))
}

/// The data key first (made once), then the volume on an encrypted class.
async fn ensure_storage(owner: &Owner<'_>, ctx: &Context) -> Result<Observed> {
    let c = &ctx.caches;
    let ns = owner.namespace.as_str();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let pvc_cached = c
        .pvcs
        .get(&ObjectRef::new(names::DATA_PVC).within(ns))
        .is_some();
    let key_problem = ensure_data_key(owner, &secrets, pvc_cached, ctx).await?;
    let class = match (
        key_problem,
        storage_class(owner, &ctx.settings, &c.storage_classes),
    ) {
        (Some(problem), _) | (None, Err(problem)) => return Ok(problem),
        (None, Ok(class)) => class,
    };
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.pvcs,
        builders::data_pvc(owner, &class),
    )
    .await?;
    // The backup volume lives on the same encrypted class, made only once it is proven.
    if let Some(pvc) = builders::backup_pvc(owner, &ctx.settings, &class) {
        ctx.ensure(&Api::namespaced(ctx.client.clone(), ns), &c.pvcs, pvc)
            .await?;
    }
    Ok(Observed::yes(
        types::STORAGE_ENCRYPTED,
        "EncryptedStorageClass",
        format!("the data volume is on encrypted StorageClass {class}"),
    ))
}

/// The token key copy, the config, the Deployment (once a key and an encrypted volume
/// exist) and the Service.
async fn ensure_runtime(owner: &Owner<'_>, storage_ok: bool, ctx: &Context) -> Result<Observed> {
    let (c, s) = (&ctx.caches, &ctx.settings);
    let ns = owner.namespace.as_str();
    let token_key = ctx.token_key();
    if let Some(pem) = &token_key {
        ctx.ensure(
            &Api::namespaced(ctx.client.clone(), ns),
            &c.secrets,
            builders::token_key_secret(owner, pem),
        )
        .await?;
    }
    if let Some(recipients) = builders::backup_recipients_config_map(owner, s) {
        ctx.ensure(
            &Api::namespaced(ctx.client.clone(), ns),
            &c.config_maps,
            recipients,
        )
        .await?;
    }
    let (config_map, config_hash) = builders::config_map(owner, s)?;
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.config_maps,
        config_map,
    )
    .await?;
    let runtime = if token_key.is_none() {
        Observed::no(
            types::RUNTIME_READY,
            reasons::TOKEN_PUBLIC_KEY_MISSING,
            format!(
                "Secret {}/{} with key {} is missing; the runtime cannot verify tokens",
                s.operator_namespace,
                s.token_public_key_secret,
                names::TOKEN_KEY_KEY
            ),
        )
    } else if !storage_ok {
        Observed::no(
            types::RUNTIME_READY,
            "StorageNotReady",
            "waiting for an encrypted volume",
        )
    } else {
        let deployment = ctx
            .ensure(
                &Api::namespaced(ctx.client.clone(), ns),
                &c.deployments,
                builders::deployment(owner, s, &config_hash),
            )
            .await?;
        runtime_condition(deployment.as_deref(), owner.tenant.spec.suspended)
    };
    ctx.ensure(
        &Api::namespaced(ctx.client.clone(), ns),
        &c.services,
        builders::service(owner),
    )
    .await?;
    Ok(runtime)
}

fn runtime_condition(deployment: Option<&Entry>, suspended: bool) -> Observed {
    if suspended {
        return Observed::no(
            types::RUNTIME_READY,
            "Suspended",
            "scaled to zero; data is kept",
        );
    }
    let generation = deployment.and_then(|d| d.generation).unwrap_or(0);
    let observed = deployment.and_then(|d| d.observed_generation).unwrap_or(0);
    let available = deployment.and_then(|d| d.available_replicas).unwrap_or(0);
    if observed >= generation && available >= 1 {
        Observed::yes(
            types::RUNTIME_READY,
            "Available",
            "the runtime is available",
        )
    } else {
        Observed::no(
            types::RUNTIME_READY,
            "Progressing",
            "waiting for the runtime to become available",
        )
    }
}

/// Makes the tenant's data key once. Returns the problem when the key is unusable.
async fn ensure_data_key(
    owner: &Owner<'_>,
    api: &Api<Secret>,
    pvc_exists: bool,
    ctx: &Context,
) -> Result<Option<Observed>> {
    let key = ObjectRef::new(names::DATA_KEY_SECRET).within(&owner.namespace);
    let existing = match ctx.caches.secrets.get(&key) {
        Some(s) => Some(s.decode::<Secret>()?),
        // The cache may lag a create: confirm before deciding the key is missing.
        None => api
            .get_opt(names::DATA_KEY_SECRET)
            .await
            .map_err(|e| Error::kube(format!("read Secret {key}"), e))?,
    };
    if let Some(secret) = existing {
        let len = secret
            .data
            .as_ref()
            .and_then(|d| d.get(names::DATA_KEY_KEY))
            .map(|b| b.0.len());
        if len != Some(32) {
            return Ok(Some(Observed::no(
                types::STORAGE_ENCRYPTED,
                reasons::DATA_KEY_INVALID,
                format!(
                    "Secret {key} must hold exactly 32 bytes under {}",
                    names::DATA_KEY_KEY
                ),
            )));
        }
        rotate_data_key(owner, api, &secret, ctx).await?;
        return Ok(None);
    }
    if pvc_exists {
        // A new key would make the existing data unreadable; a person must restore it.
        return Ok(Some(Observed::no(
            types::STORAGE_ENCRYPTED,
            reasons::DATA_KEY_MISSING,
            format!("Secret {key} is gone but the data volume exists; restore the key"),
        )));
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(Error::Random)?;
    let secret = builders::data_key_secret(owner, &bytes, None, None);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.metrics.wrote();
            Ok(None)
        }
        Err(e) if is_already_exists(&e) => Ok(None),
        Err(e) => Err(Error::kube(format!("create Secret {key}"), e)),
    }
}

/// Key-encryption key rotation, one step per reconcile. While `data.key.previous` is
/// present, a rotation is in progress: once the runtime's `/metrics` reports every data
/// key wrapped by `data.key`, the previous key is dropped (an Event says so); until then a
/// new rotation waits, since dropping a key the runtime may still need would lock it out.
/// Otherwise a new value of the Tenant's rotation annotation makes a new key: `data.key`
/// becomes it, `data.key.previous` the old one, the value is recorded on the Secret, and an
/// Event names both key ids (fingerprints, never keys).
async fn rotate_data_key(
    owner: &Owner<'_>,
    api: &Api<Secret>,
    secret: &Secret,
    ctx: &Context,
) -> Result<()> {
    let Some(data) = secret.data.as_ref() else {
        return Ok(());
    };
    let Some(current) = data
        .get(names::DATA_KEY_KEY)
        .and_then(|b| <[u8; 32]>::try_from(b.0.as_slice()).ok())
    else {
        return Ok(());
    };
    let current = zeroize::Zeroizing::new(current);
    let current_id = tenantry_proto::runtime_config::kek_id(&*current);
    let handled = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::DATA_KEY_ROTATION_HANDLED_ANNOTATION))
        .cloned();
    let reference = owner.tenant.object_ref(&());
    let key = format!("{}/{}", owner.namespace, names::DATA_KEY_SECRET);
    if data.contains_key(names::DATA_KEY_PREVIOUS_KEY) {
        let host = format!("{}.{}.svc", names::SERVICE, owner.namespace);
        let done = match crate::backup_status::scrape_exposition(
            &host,
            names::RUNTIME_PORT,
            ctx.ca().bundle(),
        )
        .await
        {
            Ok(exposition) => crate::backup_status::rotation_complete(&exposition, &current_id),
            Err(e) => {
                debug!(tenant = %owner.name, error = %e, "data key rotation: cannot read the runtime's /metrics yet");
                false
            }
        };
        if !done {
            return Ok(());
        }
        let desired = builders::data_key_secret(owner, &current, None, handled.as_deref());
        apply_data_key(api, &desired, &key).await?;
        ctx.metrics.wrote();
        let t = Transition {
            warning: false,
            reason: "DataKeyPreviousDropped".to_owned(),
            note: format!(
                "the runtime re-wrapped every data key under key-encryption key {current_id}; the previous key is deleted"
            ),
        };
        info!(tenant = %owner.name, "{}", t.note);
        ctx.publish(&reference, &t).await;
        return Ok(());
    }
    let Some(value) = builders::rotation_requested(owner.tenant, secret) else {
        return Ok(());
    };
    if secret.immutable == Some(true) {
        // Made by an operator before rotations: its data cannot change, only its metadata.
        // The value is recorded so this is said once.
        let note = json!({"metadata": {"annotations": {
            names::DATA_KEY_ROTATION_HANDLED_ANNOTATION: value,
        }}});
        api.patch(
            names::DATA_KEY_SECRET,
            &PatchParams::default(),
            &Patch::Merge(&note),
        )
        .await
        .map_err(|e| Error::kube(format!("annotate Secret {key}"), e))?;
        ctx.metrics.wrote();
        let t = Transition {
            warning: true,
            reason: "DataKeyRotationRefused".to_owned(),
            note: format!(
                "Secret {key} is immutable (made before key rotation existed); rotate offline with `tenant-runtime rotate-data-key` as docs/operations.md describes"
            ),
        };
        warn!(tenant = %owner.name, "{}", t.note);
        ctx.publish(&reference, &t).await;
        return Ok(());
    }
    let mut new = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut new[..]).map_err(Error::Random)?;
    let new_id = tenantry_proto::runtime_config::kek_id(&*new);
    let desired = builders::data_key_secret(owner, &new, Some(&current[..]), Some(value));
    apply_data_key(api, &desired, &key).await?;
    ctx.metrics.wrote();
    let t = Transition {
        warning: false,
        reason: "DataKeyRotated".to_owned(),
        note: format!(
            "new key-encryption key {new_id} (was {current_id}) for {}={value}; the runtime re-wraps its data keys, then the previous key is deleted",
            names::ROTATE_DATA_KEY_ANNOTATION
        ),
    };
    info!(tenant = %owner.name, "{}", t.note);
    ctx.publish(&reference, &t).await;
    Ok(())
}

async fn apply_data_key(api: &Api<Secret>, desired: &Secret, key: &str) -> Result<()> {
    api.patch(
        names::DATA_KEY_SECRET,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
    .map_err(|e| Error::kube(format!("apply Secret {key}"), e))?;
    Ok(())
}

/// Keeps a valid certificate in the TLS Secret with the CA's trust bundle as `ca.crt`;
/// issues a new one (with a new key) when it is missing, edited, for other names, due for
/// renewal, or from the previous CA at its re-issue time during a CA rotation.
async fn ensure_certificate(
    owner: &Owner<'_>,
    checked: &CheckedSpec,
    api: &Api<Secret>,
    ctx: &Context,
    now: Timestamp,
) -> Result<InForce> {
    let ca = ctx.ca();
    let dns_names = builders::certificate_dns_names(owner, &ctx.settings);
    let key = ObjectRef::new(names::TLS_SECRET).within(&owner.namespace);
    let reissue_at = ca.reissue_at(&owner.name, ctx.settings.ca_rotation_window);
    let assess =
        |s: &Secret| assess_certificate(s, &ca, &dns_names, checked.renew_before, reissue_at, now);
    if let Some(cached) = ctx.caches.secrets.get(&key)
        && let Ok(secret) = cached.decode::<Secret>()
        && let Assessment::Keep(ok) = assess(&secret)
    {
        return Ok(ok);
    }
    // The cache may lag our own last write: confirm before writing.
    let live = api
        .get_opt(names::TLS_SECRET)
        .await
        .map_err(|e| Error::kube(format!("read Secret {key}"), e))?;
    let why = match live.as_ref().map(assess) {
        Some(Assessment::Keep(ok)) => return Ok(ok),
        Some(Assessment::Rebundle(ok, cert, tls_key)) => {
            let secret = builders::tls_secret(owner, &cert, &tls_key, ca.bundle());
            apply_tls_secret(api, &secret, &key).await?;
            ctx.metrics.wrote();
            debug!(tenant = %owner.name, "wrote the CA trust bundle into the TLS Secret");
            return Ok(ok);
        }
        Some(Assessment::Reissue(why)) => Some(why),
        None => None,
    };
    let issued = ca.issuing().issue_leaf(&LeafRequest {
        dns_names,
        ip_addresses: vec![],
        validity: checked.cert_validity,
        now,
    })?;
    let secret = builders::tls_secret(owner, &issued.cert_pem, &issued.key_pem, ca.bundle());
    apply_tls_secret(api, &secret, &key).await?;
    ctx.metrics.wrote();
    let info = pki::parse_certificate(&issued.cert_pem)?;
    let renewal = pki::renewal_time(info.not_before, info.not_after, checked.renew_before);
    if let Some(why) = why {
        let rotation = ca.started().is_some();
        let t = Transition {
            warning: false,
            reason: if rotation && why.contains("previous CA") {
                "CertificateReissued".to_owned()
            } else {
                "CertificateRenewed".to_owned()
            },
            note: format!(
                "issued serial {} by CA {} because {why}",
                issued.serial_hex,
                ca.fingerprint()
            ),
        };
        info!(tenant = %owner.name, serial = %issued.serial_hex, "{}", t.note);
        ctx.publish(&owner.tenant.object_ref(&()), &t).await;
    }
    Ok(InForce {
        info,
        renewal,
        issuer_fingerprint: ca.fingerprint().to_owned(),
    })
}

async fn apply_tls_secret(
    api: &Api<Secret>,
    secret: &Secret,
    key: &ObjectRef<Secret>,
) -> Result<()> {
    api.patch(
        names::TLS_SECRET,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(secret),
    )
    .await
    .map_err(|e| Error::kube(format!("apply Secret {key}"), e))?;
    Ok(())
}

/// Deletion: remove the namespace (and so every child), wait until it is gone, then
/// release the Tenant. NotFound anywhere means done. Needs only the metadata, so a Tenant
/// this operator cannot read is still cleaned up.
async fn cleanup(object: &TenantObject, ctx: &Context) -> Result<Action> {
    if !object.finalizers().iter().any(|f| f == names::FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = object.name_any();
    let ns = names::tenant_namespace(&name);
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let terminating = ctx
        .caches
        .namespaces
        .get(&ObjectRef::new(&ns))
        .is_some_and(|n| n.deleting);
    let gone = if terminating {
        false
    } else {
        match namespaces.delete(&ns, &DeleteParams::background()).await {
            Ok(either) => {
                ctx.metrics.wrote();
                either.is_right()
            }
            Err(e) if is_not_found(&e) => true,
            Err(e) => return Err(Error::kube(format!("delete namespace {ns}"), e)),
        }
    };
    if !gone {
        let mut status = object.status().cloned().unwrap_or_default();
        status.phase = Some(TenantPhase::Terminating);
        write_status(ctx, object, status).await?;
        // The namespace's deletion event brings the Tenant back; this is the fallback.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let remaining: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != names::FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(object.meta(), remaining, ctx).await?;
    ctx.caches.forget_namespace(&ns);
    ctx.statuses().remove(&name);
    ctx.metrics.set_phase(&name, None);
    ctx.metrics.set_certificate(&name, None);
    ctx.metrics.set_backup(&name, None);
    info!(tenant = %name, "namespace {ns} is gone; tenant released");
    Ok(Action::await_change())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
