//! The reconciler: for each Tenant, server-side-apply every child the builders describe,
//! issue and renew its certificate, report status, and clean up on deletion.
//!
//! Every reconcile starts from scratch. Observed children come from watch caches, and a
//! child is written only when the cache shows it differs from the desired object, so an
//! idle resync of a converged Tenant makes no API call at all.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::builders::{self, CheckedSpec, Owner};
use crate::config::Settings;
use crate::crd::{CertificateStatus, Tenant, TenantPhase, TenantStatus};
use crate::diff::is_subset;
use crate::error::{Error, Result, is_already_exists, is_not_found};
use crate::metrics::Metrics;
use crate::names;
use crate::pki::{self, CertificateAuthority, CertificateInfo, LeafRequest};
use crate::status::{self, Observed, Transition, reasons, types};

/// Watch caches of every child kind (and of StorageClasses).
#[derive(Clone)]
pub struct Caches {
    /// Tenant namespaces.
    pub namespaces: Store<Namespace>,
    /// NetworkPolicies.
    pub policies: Store<NetworkPolicy>,
    /// ResourceQuotas.
    pub quotas: Store<ResourceQuota>,
    /// LimitRanges.
    pub limit_ranges: Store<LimitRange>,
    /// ServiceAccounts.
    pub service_accounts: Store<ServiceAccount>,
    /// Secrets (data key, TLS, token public key).
    pub secrets: Store<Secret>,
    /// ConfigMaps.
    pub config_maps: Store<ConfigMap>,
    /// PersistentVolumeClaims.
    pub pvcs: Store<PersistentVolumeClaim>,
    /// Deployments.
    pub deployments: Store<Deployment>,
    /// Services.
    pub services: Store<Service>,
    /// Every StorageClass (cluster-scoped, few).
    pub storage_classes: Store<StorageClass>,
}

/// The writing side of [`Caches`], fed by watchers (or by tests).
pub struct CacheWriters {
    /// Tenant namespaces.
    pub namespaces: reflector::store::Writer<Namespace>,
    /// NetworkPolicies.
    pub policies: reflector::store::Writer<NetworkPolicy>,
    /// ResourceQuotas.
    pub quotas: reflector::store::Writer<ResourceQuota>,
    /// LimitRanges.
    pub limit_ranges: reflector::store::Writer<LimitRange>,
    /// ServiceAccounts.
    pub service_accounts: reflector::store::Writer<ServiceAccount>,
    /// Secrets.
    pub secrets: reflector::store::Writer<Secret>,
    /// ConfigMaps.
    pub config_maps: reflector::store::Writer<ConfigMap>,
    /// PersistentVolumeClaims.
    pub pvcs: reflector::store::Writer<PersistentVolumeClaim>,
    /// Deployments.
    pub deployments: reflector::store::Writer<Deployment>,
    /// Services.
    pub services: reflector::store::Writer<Service>,
    /// StorageClasses.
    pub storage_classes: reflector::store::Writer<StorageClass>,
}

/// Empty caches and their writers.
pub fn caches() -> (Caches, CacheWriters) {
    let (namespaces, w_namespaces) = reflector::store();
    let (policies, w_policies) = reflector::store();
    let (quotas, w_quotas) = reflector::store();
    let (limit_ranges, w_limit_ranges) = reflector::store();
    let (service_accounts, w_service_accounts) = reflector::store();
    let (secrets, w_secrets) = reflector::store();
    let (config_maps, w_config_maps) = reflector::store();
    let (pvcs, w_pvcs) = reflector::store();
    let (deployments, w_deployments) = reflector::store();
    let (services, w_services) = reflector::store();
    let (storage_classes, w_storage_classes) = reflector::store();
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
    /// Waits until every cache has listed its objects once.
    pub async fn ready(&self) -> Result<()> {
        let results = [
            self.namespaces.wait_until_ready().await,
            self.policies.wait_until_ready().await,
            self.quotas.wait_until_ready().await,
            self.limit_ranges.wait_until_ready().await,
            self.service_accounts.wait_until_ready().await,
            self.secrets.wait_until_ready().await,
            self.config_maps.wait_until_ready().await,
            self.pvcs.wait_until_ready().await,
            self.deployments.wait_until_ready().await,
            self.services.wait_until_ready().await,
            self.storage_classes.wait_until_ready().await,
        ];
        if results.iter().any(|r| r.is_err()) {
            return Err(Error::CacheNotReady);
        }
        Ok(())
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Resolved operator settings.
    pub settings: Settings,
    /// The operator's CA.
    pub ca: CertificateAuthority,
    /// Watch caches.
    pub caches: Caches,
    /// The API's token public key (PEM), copied into every tenant namespace.
    pub token_public_key: RwLock<Option<String>>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The clock; tests pin it.
    pub clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context reading the system clock.
    pub fn new(
        client: Client,
        settings: Settings,
        ca: CertificateAuthority,
        caches: Caches,
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
            ca,
            caches,
            token_public_key: RwLock::new(token_public_key),
            recorder,
            metrics,
            clock: Box::new(Timestamp::now),
            failures: Mutex::default(),
        }
    }

    /// Replaces the clock (tests and benchmarks).
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Context {
        self.clock = Box::new(clock);
        self
    }

    /// The time, in whole seconds (the precision of API timestamps).
    fn now(&self) -> Timestamp {
        let now = (self.clock)();
        Timestamp::from_second(now.as_second()).unwrap_or(now)
    }

    fn token_key(&self) -> Option<String> {
        self.token_public_key.read().ok().and_then(|k| k.clone())
    }

    /// Applies `desired` unless the cached object already matches it; returns the
    /// observed object.
    async fn ensure<K>(&self, api: &Api<K>, cache: &Store<K>, desired: K) -> Result<K>
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
        if let Some(current) = cache.get(&key) {
            let have = serde_json::to_value(&*current).map_err(|source| Error::Json {
                what: "a cached object",
                source,
            })?;
            if is_subset(&want, &have) {
                return Ok((*current).clone());
            }
        }
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(names::FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|e| Error::kube(format!("apply {} {}", K::kind(&()), key), e))?;
        self.metrics.wrote();
        Ok(applied)
    }

    async fn publish(&self, tenant: &Tenant, t: &Transition) {
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
        match self.recorder.publish(&event, &tenant.object_ref(&())).await {
            Ok(()) => self.metrics.wrote(),
            // An Event is best effort; the status carries the same information.
            Err(e) => warn!(tenant = %tenant.name_any(), error = %e, "could not publish event"),
        }
    }
}

/// The Tenant that controls `child`, from its controller owner reference. Keyed without a
/// namespace, as a cluster-scoped object.
pub fn tenant_of<K: Resource>(child: K) -> Option<ObjectRef<Tenant>> {
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

/// What [`reconcile`] decided about storage.
fn storage_class(
    owner: &Owner<'_>,
    settings: &Settings,
    classes: &Store<StorageClass>,
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
    match classes.get(&ObjectRef::new(&class)) {
        Some(sc)
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

/// Why an existing TLS Secret must be replaced, or the certificate it holds.
fn assess_certificate(
    secret: &Secret,
    ca: &CertificateAuthority,
    dns_names: &[String],
    renew_before: Option<Duration>,
    now: Timestamp,
) -> std::result::Result<(CertificateInfo, Timestamp), &'static str> {
    let data = secret.data.as_ref().ok_or("the Secret has no data")?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or("a key is missing")
    };
    let cert = text("tls.crt")?;
    let key = SecretString::from(text("tls.key")?);
    if text("ca.crt")? != ca.cert_pem() {
        return Err("ca.crt is not the operator CA");
    }
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err("the Secret is not of type kubernetes.io/tls");
    }
    let info = pki::parse_certificate(&cert).map_err(|_| "tls.crt does not parse")?;
    if !pki::key_matches(&info, &key) {
        return Err("tls.key does not match tls.crt");
    }
    if !ca.signed(&cert) {
        return Err("tls.crt was not issued by the operator CA");
    }
    if info.dns_names != dns_names || !info.ip_addresses.is_empty() {
        return Err("the certificate names changed");
    }
    let renewal = pki::renewal_time(info.not_before, info.not_after, renew_before);
    if renewal <= now {
        return Err("the certificate is due for renewal");
    }
    Ok((info, renewal))
}

/// Reconciles one Tenant. Errors are transient (API calls); permanent problems become
/// conditions.
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let result = reconcile_tenant(&tenant, &ctx).await;
    ctx.metrics.reconciled(start.elapsed());
    let name = tenant.name_any();
    match &result {
        Ok(_) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&name);
            }
        }
        Err(e) => ctx.metrics.failed(e.metric_label()),
    }
    result
}

/// Requeues a failed Tenant with exponential backoff (1 s doubling to 5 min).
pub fn error_policy(tenant: Arc<Tenant>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = tenant.name_any();
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

async fn reconcile_tenant(tenant: &Tenant, ctx: &Context) -> Result<Action> {
    ctx.caches.ready().await?;
    if tenant.meta().deletion_timestamp.is_some() {
        return cleanup(tenant, ctx).await;
    }
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    let added;
    let tenant = if tenant.finalizers().iter().any(|f| f == names::FINALIZER) {
        tenant
    } else {
        let mut finalizers = tenant.finalizers().to_vec();
        finalizers.push(names::FINALIZER.to_owned());
        added = patch_finalizers(&tenants, tenant, finalizers, ctx).await?;
        match &added {
            Some(t) => t,
            None => return Ok(Action::await_change()),
        }
    };
    let owner = Owner::of(tenant)?;
    let now = ctx.now();
    let checked = match builders::check_spec(&owner) {
        Ok(c) => c,
        Err(message) => {
            let observed = vec![Observed::no(types::READY, reasons::INVALID_SPEC, message)];
            let mut status = tenant.status.clone().unwrap_or_default();
            status.phase = Some(TenantPhase::Degraded);
            status.observed_generation = tenant.meta().generation;
            let mut conditions: Vec<_> = status
                .conditions
                .iter()
                .filter(|c| c.type_ != types::READY)
                .cloned()
                .collect();
            conditions.extend(status::merge_conditions(
                &status.conditions,
                &observed,
                tenant.meta().generation,
                now,
            ));
            status.conditions = conditions;
            write_status(&tenants, tenant, status, ctx).await?;
            return Ok(Action::await_change());
        }
    };
    let (conditions, certificate) = apply_children(&owner, &checked, ctx, now).await?;
    let (ready, phase) = status::summarize(&conditions, tenant.spec.suspended);
    let mut all = conditions;
    all.push(ready);
    let previous = tenant.status.clone().unwrap_or_default();
    let status = TenantStatus {
        phase: Some(phase),
        observed_generation: tenant.meta().generation,
        namespace: Some(owner.namespace.clone()),
        endpoint: Some(builders::endpoint(&owner)),
        certificate: certificate
            .as_ref()
            .map(|(info, renewal)| CertificateStatus {
                serial: info.serial_hex.clone(),
                not_after: Time(info.not_after),
                renewal_time: Time(*renewal),
            }),
        conditions: status::merge_conditions(
            &previous.conditions,
            &all,
            tenant.meta().generation,
            now,
        ),
    };
    ctx.metrics
        .set_certificate(&owner.name, certificate.as_ref().map(|(i, _)| i.not_after));
    write_status(&tenants, tenant, status, ctx).await?;
    let mut next = ctx.settings.resync;
    if let Some((_, renewal)) = &certificate {
        let until = renewal.duration_since(now);
        let until = Duration::try_from(until).unwrap_or(Duration::ZERO);
        next = next.min(until.max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(next))
}

/// Writes `status` if it differs from the Tenant's, and publishes the Events of the change.
async fn write_status(
    api: &Api<Tenant>,
    tenant: &Tenant,
    status: TenantStatus,
    ctx: &Context,
) -> Result<()> {
    let name = tenant.name_any();
    ctx.metrics.set_phase(&name, status.phase);
    if tenant.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": format!("{}/{}", names::GROUP, names::VERSION),
        "kind": names::KIND,
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| Error::kube(format!("write the status of Tenant {name}"), e))?;
    ctx.metrics.wrote();
    for t in status::transitions(tenant.status.as_ref(), &status) {
        info!(tenant = %name, reason = %t.reason, "{}", t.note);
        ctx.publish(tenant, &t).await;
    }
    Ok(())
}

/// Sets the Tenant's finalizers, guarded by its resourceVersion. None when the Tenant is
/// gone.
async fn patch_finalizers(
    api: &Api<Tenant>,
    tenant: &Tenant,
    finalizers: Vec<String>,
    ctx: &Context,
) -> Result<Option<Tenant>> {
    let name = tenant.name_any();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": tenant.resource_version(),
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

type CertOutcome = Option<(CertificateInfo, Timestamp)>;

async fn apply_children(
    owner: &Owner<'_>,
    checked: &CheckedSpec,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Vec<Observed>, CertOutcome)> {
    let c = &ctx.caches;
    let s = &ctx.settings;
    let client = ctx.client.clone();
    let ns = owner.namespace.as_str();
    let mut conditions = vec![];

    let namespace = ctx
        .ensure(
            &Api::all(client.clone()),
            &c.namespaces,
            builders::desired_namespace(owner),
        )
        .await?;
    let active = namespace.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Active");
    conditions.push(if active {
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
    });

    ctx.ensure(
        &Api::namespaced(client.clone(), ns),
        &c.service_accounts,
        builders::service_account(owner),
    )
    .await?;
    let policies = Api::namespaced(client.clone(), ns);
    for policy in [
        builders::default_deny_policy(owner),
        builders::ingress_policy(owner, s),
        builders::egress_policy(owner, s),
    ] {
        ctx.ensure(&policies, &c.policies, policy).await?;
    }
    conditions.push(Observed::yes(
        types::NETWORK_ISOLATED,
        "PoliciesApplied",
        "default-deny ingress and egress with the platform's allow rules",
    ));
    ctx.ensure(
        &Api::namespaced(client.clone(), ns),
        &c.quotas,
        builders::resource_quota(owner),
    )
    .await?;
    ctx.ensure(
        &Api::namespaced(client.clone(), ns),
        &c.limit_ranges,
        builders::limit_range(owner),
    )
    .await?;

    // Storage: the data key first (made once), then the volume on an encrypted class.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let pvc_cached = c
        .pvcs
        .get(&ObjectRef::new(names::DATA_PVC).within(ns))
        .is_some();
    let key_problem = ensure_data_key(owner, &secrets, pvc_cached, ctx).await?;
    let storage = match (key_problem, storage_class(owner, s, &c.storage_classes)) {
        (Some(problem), _) | (None, Err(problem)) => Err(problem),
        (None, Ok(class)) => {
            ctx.ensure(
                &Api::namespaced(client.clone(), ns),
                &c.pvcs,
                builders::data_pvc(owner, &class),
            )
            .await?;
            Ok(class)
        }
    };
    let storage_ok = storage.is_ok();
    conditions.push(match storage {
        Ok(class) => Observed::yes(
            types::STORAGE_ENCRYPTED,
            "EncryptedStorageClass",
            format!("the data volume is on encrypted StorageClass {class}"),
        ),
        Err(problem) => problem,
    });

    // Certificate.
    let certificate = ensure_certificate(owner, checked, &secrets, ctx, now).await?;
    conditions.push(Observed::yes(
        types::CERTIFICATE_READY,
        "Issued",
        format!(
            "serial {} valid until {}",
            certificate.0.serial_hex, certificate.0.not_after
        ),
    ));

    // Runtime.
    let token_key = ctx.token_key();
    if let Some(pem) = &token_key {
        ctx.ensure(&secrets, &c.secrets, builders::token_key_secret(owner, pem))
            .await?;
    }
    let (config_map, config_hash) = builders::config_map(owner)?;
    ctx.ensure(
        &Api::namespaced(client.clone(), ns),
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
                &Api::namespaced(client.clone(), ns),
                &c.deployments,
                builders::deployment(owner, s, &config_hash),
            )
            .await?;
        runtime_condition(&deployment, owner.tenant.spec.suspended)
    };
    ctx.ensure(
        &Api::namespaced(client, ns),
        &c.services,
        builders::service(owner),
    )
    .await?;
    conditions.push(runtime);
    Ok((conditions, Some(certificate)))
}

fn runtime_condition(deployment: &Deployment, suspended: bool) -> Observed {
    if suspended {
        return Observed::no(
            types::RUNTIME_READY,
            "Suspended",
            "scaled to zero; data is kept",
        );
    }
    let generation = deployment.metadata.generation.unwrap_or(0);
    let status = deployment.status.clone().unwrap_or_default();
    let current = status.observed_generation.unwrap_or(0) >= generation;
    if current && status.available_replicas.unwrap_or(0) >= 1 {
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
        Some(s) => Some((*s).clone()),
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
        return Ok((len != Some(32)).then(|| {
            Observed::no(
                types::STORAGE_ENCRYPTED,
                reasons::DATA_KEY_INVALID,
                format!(
                    "Secret {key} must hold exactly 32 bytes under {}",
                    names::DATA_KEY_KEY
                ),
            )
        }));
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
    let secret = builders::data_key_secret(owner, &bytes);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.metrics.wrote();
            Ok(None)
        }
        Err(e) if is_already_exists(&e) => Ok(None),
        Err(e) => Err(Error::kube(format!("create Secret {key}"), e)),
    }
}

/// Keeps a valid certificate in the TLS Secret; issues a new one (with a new key) when it
/// is missing, edited, for other names, or due for renewal.
async fn ensure_certificate(
    owner: &Owner<'_>,
    checked: &CheckedSpec,
    api: &Api<Secret>,
    ctx: &Context,
    now: Timestamp,
) -> Result<(CertificateInfo, Timestamp)> {
    let dns_names = builders::certificate_dns_names(owner, &ctx.settings);
    let key = ObjectRef::new(names::TLS_SECRET).within(&owner.namespace);
    let assess = |s: &Secret| assess_certificate(s, &ctx.ca, &dns_names, checked.renew_before, now);
    if let Some(cached) = ctx.caches.secrets.get(&key)
        && let Ok(ok) = assess(&cached)
    {
        return Ok(ok);
    }
    // The cache may lag our own last write: confirm before issuing.
    let live = api
        .get_opt(names::TLS_SECRET)
        .await
        .map_err(|e| Error::kube(format!("read Secret {key}"), e))?;
    let why = match &live {
        Some(s) => match assess(s) {
            Ok(ok) => return Ok(ok),
            Err(why) => Some(why),
        },
        None => None,
    };
    let issued = ctx.ca.issue_leaf(&LeafRequest {
        dns_names,
        ip_addresses: vec![],
        validity: checked.cert_validity,
        now,
    })?;
    let secret = builders::tls_secret(owner, &issued.cert_pem, &issued.key_pem, ctx.ca.cert_pem());
    api.patch(
        names::TLS_SECRET,
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await
    .map_err(|e| Error::kube(format!("apply Secret {key}"), e))?;
    ctx.metrics.wrote();
    let info = pki::parse_certificate(&issued.cert_pem)?;
    let renewal = pki::renewal_time(info.not_before, info.not_after, checked.renew_before);
    if let Some(why) = why {
        let t = Transition {
            warning: false,
            reason: "CertificateRenewed".to_owned(),
            note: format!("issued serial {} because {why}", issued.serial_hex),
        };
        info!(tenant = %owner.name, serial = %issued.serial_hex, "{}", t.note);
        ctx.publish(owner.tenant, &t).await;
    }
    Ok((info, renewal))
}

/// Deletion: remove the namespace (and so every child), wait until it is gone, then
/// release the Tenant. NotFound anywhere means done.
async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action> {
    if !tenant.finalizers().iter().any(|f| f == names::FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = tenant.name_any();
    let ns = names::tenant_namespace(&name);
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let terminating = ctx
        .caches
        .namespaces
        .get(&ObjectRef::new(&ns))
        .is_some_and(|n| n.metadata.deletion_timestamp.is_some());
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
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    if !gone {
        let mut status = tenant.status.clone().unwrap_or_default();
        status.phase = Some(TenantPhase::Terminating);
        write_status(&tenants, tenant, status, ctx).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let remaining: Vec<String> = tenant
        .finalizers()
        .iter()
        .filter(|f| *f != names::FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(&tenants, tenant, remaining, ctx).await?;
    ctx.metrics.set_phase(&name, None);
    ctx.metrics.set_certificate(&name, None);
    info!(tenant = %name, "namespace {ns} is gone; tenant released");
    Ok(Action::await_change())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
