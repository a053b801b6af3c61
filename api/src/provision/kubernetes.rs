//! The `kubernetes` provisioner: every tenant is a cluster-scoped `Tenant` resource
//! (`tenants.tenantry.dev`), which the operator turns into an isolated instance.
//!
//! - [`Provisioner::ensure`] server-side-applies the fields the API owns (owner, plan,
//!   suspension, retention, public DNS name) with the field manager [`FIELD_MANAGER`], and
//!   only when the resource differs from them: an idle reconcile pass writes nothing.
//! - One watch over the API's Tenants keeps a cache and writes each status the operator
//!   reports (phase, endpoint, certificate) into the tenant's row, where `GetTenant` and
//!   `ListTenants` read it: no request reads the cluster.
//! - [`Provisioner::delete`] deletes the resource and reports it gone only when it is: the
//!   operator's finalizer holds the Tenant until the namespace and every child are removed.
//!   Until then the row stays `Terminating`, so the reconcile loop (also after a restart)
//!   finishes the job; the watch purges the row as soon as the resource disappears.
//!
//! The database stays the source of truth: a Tenant deleted behind the API's back is made
//! again by the next reconcile pass, and a Tenant of the same name that the API did not make
//! is never taken over.

use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tenantry_kube::crd::{Tenant, TenantPhase};
use tenantry_kube::names::{CRD_NAME, GROUP, KIND, LABEL_TENANT_ID, TOKEN_KEY_KEY, VERSION};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Deletion, Provisioner, TenantSpec};
use crate::clock::Clock;
use crate::error::{Error, Result};

use crate::store::{Store, TenantStatus};

/// Field manager of every apply the API makes on a Tenant.
pub const FIELD_MANAGER: &str = "tenantry-api";
/// `app.kubernetes.io/managed-by` on the Tenants the API makes.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "tenantry-api";

/// Settings of the kubernetes provisioner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// When set, tenant `acme` gets the public DNS name `acme.<domain>` on its certificate,
    /// which is also its endpoint.
    pub tenant_domain: Option<String>,
    /// The operator's token public key Secret (key `public.pem`), which the API keeps equal
    /// to the key ring's public set; `None`: the API does not publish (copied by hand).
    pub token_public_key_secret: Option<String>,
    /// Its namespace; `None`: the client's default namespace (the pod's own).
    pub token_public_key_secret_namespace: Option<String>,
}

/// The data patch that makes the token public key Secret hold `pem`, or `None` when it
/// holds it already (compare before write: an unchanged set writes nothing).
pub fn token_key_secret_patch(current: &Secret, pem: &str) -> Option<Value> {
    let held = current
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY_KEY))
        .map(|b| b.0.as_slice());
    (held != Some(pem.as_bytes())).then(|| {
        use base64::Engine as _;
        json!({ "data": { TOKEN_KEY_KEY: base64::engine::general_purpose::STANDARD.encode(pem) } })
    })
}

/// The apply patch for `spec`: exactly the fields the API owns, nothing defaulted, so a
/// platform operator's `kubectl` changes to other fields (storage, network, certificate
/// lifetime) are left alone.
pub fn desired_tenant(spec: &TenantSpec, settings: &KubernetesSettings) -> Value {
    let mut tenant_spec = json!({
        "displayName": spec.name,
        "owner": spec.owner,
        "plan": spec.plan.as_str(),
        "suspended": spec.suspended,
        "retention": {
            "maxAgeHours": spec.retention.max_age_hours,
            "maxCount": spec.retention.max_count,
        },
    });
    if let Some(domain) = &settings.tenant_domain {
        tenant_spec["tls"] = json!({ "dnsNames": [format!("{}.{domain}", spec.name)] });
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "labels": { LABEL_TENANT_ID: spec.id, LABEL_MANAGED_BY: MANAGED_BY },
        },
        "spec": tenant_spec,
    })
}

/// Whether `current` already has every field of [`desired_tenant`].
pub fn is_converged(current: &Tenant, spec: &TenantSpec, settings: &KubernetesSettings) -> bool {
    let labels = current.labels();
    let s = &current.spec;
    let dns_ok = match &settings.tenant_domain {
        Some(domain) => s.tls.dns_names == [format!("{}.{domain}", spec.name)],
        None => true,
    };
    labels.get(LABEL_TENANT_ID) == Some(&spec.id)
        && labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        && s.display_name.as_deref() == Some(spec.name.as_str())
        && s.owner == spec.owner
        && s.plan == spec.plan
        && s.suspended == spec.suspended
        && s.retention.max_age_hours == spec.retention.max_age_hours
        && s.retention.max_count == spec.retention.max_count
        && dns_ok
}

/// What a Tenant's status says, in the store's terms.
pub fn observed_status(tenant: &Tenant) -> TenantStatus {
    let status = tenant.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(TenantPhase::Provisioning);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let message = match (status.phase, ready) {
        (None, _) => "waiting for the operator".to_owned(),
        (_, Some(c)) if c.status != "True" => c.message.clone(),
        _ => String::new(),
    };
    let (serial, not_after, renewal) = match &status.certificate {
        Some(c) => (
            c.serial.clone(),
            c.not_after.0.as_millisecond(),
            c.renewal_time.0.as_millisecond(),
        ),
        None => (String::new(), 0, 0),
    };
    TenantStatus {
        phase,
        endpoint: status.endpoint.unwrap_or_default(),
        cert_serial: serial,
        cert_not_after_ms: not_after,
        cert_renewal_ms: renewal,
        message,
    }
}

fn kube_error(what: &str, source: kube::Error) -> Error {
    Error::Kube {
        what: what.to_owned(),
        source,
    }
}

/// Runs tenants as `Tenant` resources.
pub struct KubernetesProvisioner {
    api: Api<Tenant>,
    cache: reflector::Store<Tenant>,
    store: Store,
    settings: KubernetesSettings,
    /// The token public key Secret's namespace, when the API publishes into it.
    secrets: Option<Api<Secret>>,
    follower: Mutex<Option<JoinHandle<()>>>,
    /// Stops the follower; cancelled on shutdown, and on drop through the guard.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for KubernetesProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvisioner")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl KubernetesProvisioner {
    /// Checks that the cluster serves Tenants, then starts the status watch.
    pub async fn start(
        client: Client,
        settings: KubernetesSettings,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let secrets = settings.token_public_key_secret.as_ref().map(|_| {
            match &settings.token_public_key_secret_namespace {
                Some(ns) => Api::<Secret>::namespaced(client.clone(), ns),
                None => Api::<Secret>::default_namespaced(client.clone()),
            }
        });
        let api: Api<Tenant> = Api::all(client);
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                return Err(Error::Config(format!(
                    "the cluster does not serve Tenants: install the CustomResourceDefinition {CRD_NAME} (charts/tenantry/crds/) first"
                )));
            }
            Err(e) => return Err(kube_error("listing Tenants", e)),
        }
        let (cache, writer) = reflector::store();
        let events = reflector(
            writer,
            watcher(
                api.clone(),
                watcher::Config::default().labels(LABEL_TENANT_ID),
            ),
        )
        .default_backoff();
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(
            events.take_until(stop.clone().cancelled_owned()),
            store.clone(),
            clock,
        ));
        Ok(KubernetesProvisioner {
            api,
            cache,
            store,
            settings,
            secrets,
            follower: Mutex::new(Some(follower)),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        })
    }

    /// The Tenant named `name`: from the cache, else from the API server (a cache that is
    /// still filling must not hide a Tenant that exists).
    async fn current(&self, name: &str) -> Result<Option<Tenant>> {
        if let Some(t) = self.cache.get(&ObjectRef::new(name)) {
            return Ok(Some((*t).clone()));
        }
        self.api
            .get_opt(name)
            .await
            .map_err(|e| kube_error(&format!("reading Tenant {name}"), e))
    }
}

/// Follows the API's Tenants: writes every observed status into the store, and purges the
/// rows of deleted tenants once their resource is gone.
async fn follow(
    events: impl Stream<Item = Result<watcher::Event<Tenant>, watcher::Error>> + Send,
    store: Store,
    clock: Arc<dyn Clock>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let result = match event {
            Ok(watcher::Event::Apply(t) | watcher::Event::InitApply(t)) => {
                record_status(&store, clock.as_ref(), &t).await
            }
            Ok(watcher::Event::Delete(t)) => resource_gone(&store, clock.as_ref(), &t).await,
            Ok(watcher::Event::Init | watcher::Event::InitDone) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "watching Tenants failed; retrying");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not record a Tenant's status; the next change or reconcile retries");
        }
    }
}

async fn record_status(store: &Store, clock: &dyn Clock, tenant: &Tenant) -> Result<()> {
    let Some(id) = tenant.labels().get(LABEL_TENANT_ID) else {
        return Ok(());
    };
    if tenant.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let status = observed_status(tenant);
    if store.set_tenant_status(id, &status, clock.now_ms()).await? {
        tracing::info!(tenant_id = %id, tenant = %tenant.name_any(), phase = %status.phase, "tenant status changed");
    }
    Ok(())
}

async fn resource_gone(store: &Store, clock: &dyn Clock, tenant: &Tenant) -> Result<()> {
    let Some(id) = tenant.labels().get(LABEL_TENANT_ID) else {
        return Ok(());
    };
    match store.tenant(id).await? {
        Some(row) if row.phase == TenantPhase::Terminating => {
            store.purge_tenant(id).await?;
            tracing::info!(tenant_id = %id, tenant = %row.name, "tenant deleted");
        }
        Some(row) => {
            tracing::warn!(tenant_id = %id, tenant = %row.name, "the Tenant resource was deleted outside the API; the next reconcile makes it again");
            let status = TenantStatus {
                phase: TenantPhase::Provisioning,
                endpoint: String::new(),
                cert_serial: String::new(),
                cert_not_after_ms: 0,
                cert_renewal_ms: 0,
                message: "the Tenant resource was deleted outside the API; re-creating it".into(),
            };
            store.set_tenant_status(id, &status, clock.now_ms()).await?;
        }
        None => {}
    }
    Ok(())
}

#[tonic::async_trait]
impl Provisioner for KubernetesProvisioner {
    async fn ensure(&self, spec: &TenantSpec) -> Result<()> {
        if let Some(current) = self.current(&spec.name).await? {
            if current.labels().get(LABEL_TENANT_ID) != Some(&spec.id) {
                return Err(Error::Provisioner(format!(
                    "a Tenant named {} exists that this API did not make; refusing to take it over",
                    spec.name
                )));
            }
            if current.metadata.deletion_timestamp.is_some() {
                return Err(Error::Provisioner(format!(
                    "Tenant {} is being deleted; it is made again once it is gone",
                    spec.name
                )));
            }
            if is_converged(&current, spec, &self.settings) {
                return Ok(());
            }
        }
        let patch = desired_tenant(spec, &self.settings);
        // Forced: these fields belong to the API, whose database is the source of truth;
        // a `kubectl edit` of them is undone here rather than left to drift.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch(&spec.name, &params, &Patch::Apply(&patch))
            .await
            .map_err(|e| kube_error(&format!("applying Tenant {}", spec.name), e))?;
        tracing::info!(tenant_id = %spec.id, tenant = %spec.name, "applied the Tenant resource");
        Ok(())
    }

    async fn delete(&self, tenant_id: &str) -> Result<Deletion> {
        let name =
            match self.store.tenant(tenant_id).await? {
                Some(row) => row.name,
                None => match self.cache.state().iter().find(|t| {
                    t.labels().get(LABEL_TENANT_ID).map(String::as_str) == Some(tenant_id)
                }) {
                    Some(t) => t.name_any(),
                    None => return Ok(Deletion::Done),
                },
            };
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| kube_error(&format!("reading Tenant {name}"), e))?;
        let Some(current) = current else {
            return Ok(Deletion::Done);
        };
        if current.labels().get(LABEL_TENANT_ID).map(String::as_str) != Some(tenant_id) {
            // Another Tenant took the name after ours was gone.
            return Ok(Deletion::Done);
        }
        if current.metadata.deletion_timestamp.is_some() {
            return Ok(Deletion::InProgress);
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: current.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&name, &params).await {
            // Left: the object is still there, held by the operator's finalizer.
            Ok(deleted) if deleted.is_left() => {
                tracing::info!(%tenant_id, tenant = %name, "deleting the Tenant resource; the operator removes its namespace");
                Ok(Deletion::InProgress)
            }
            Ok(_) => Ok(Deletion::Done),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(Deletion::Done),
            Err(e) => Err(kube_error(&format!("deleting Tenant {name}"), e)),
        }
    }

    async fn publish_token_keys(&self, public_set_pem: &str) -> Result<()> {
        let (Some(secrets), Some(name)) = (&self.secrets, &self.settings.token_public_key_secret)
        else {
            return Ok(());
        };
        let what = format!("reading the token public key Secret {name}");
        let Some(current) = secrets
            .get_opt(name)
            .await
            .map_err(|e| kube_error(&what, e))?
        else {
            return Err(Error::Provisioner(format!(
                "the token public key Secret {name} does not exist: create it from `tenantry-api token-keys public` (docs/operations.md)"
            )));
        };
        let Some(patch) = token_key_secret_patch(&current, public_set_pem) else {
            return Ok(());
        };
        secrets
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_error(&format!("writing the token public key Secret {name}"), e))?;
        tracing::info!(secret = %name, "wrote the token public key set into the operator's Secret; the operator copies it to every tenant");
        Ok(())
    }

    async fn shutdown(&self) {
        // Tenants live on in the cluster; only the watch stops.
        self.stop.cancel();
        let follower = self
            .follower
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(follower) = follower
            && let Err(e) = follower.await
        {
            tracing::warn!(error = %e, "the Tenant watch ended abnormally");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tenantry_proto::retention::{Plan, RetentionPolicy};

    fn spec() -> TenantSpec {
        TenantSpec {
            id: "0b0c6f3e-1111-4222-8333-444455556666".into(),
            name: "acme".into(),
            owner: "user-1".into(),
            plan: Plan::Standard,
            suspended: false,
            retention: RetentionPolicy {
                max_age_hours: 48,
                max_count: 500,
            },
        }
    }

    fn as_tenant(v: Value) -> Tenant {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_apply_patch_holds_only_the_api_fields() {
        let v = desired_tenant(&spec(), &KubernetesSettings::default());
        assert_eq!(v["metadata"]["labels"][LABEL_TENANT_ID], spec().id);
        let keys: Vec<&String> = v["spec"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["displayName", "owner", "plan", "retention", "suspended"]
        );
        let with_domain = KubernetesSettings {
            tenant_domain: Some("tenants.example.com".into()),
            ..KubernetesSettings::default()
        };
        let v = desired_tenant(&spec(), &with_domain);
        assert_eq!(v["spec"]["tls"]["dnsNames"][0], "acme.tenants.example.com");
    }

    #[test]
    fn converged_compares_every_owned_field() {
        let settings = KubernetesSettings {
            tenant_domain: Some("t.example.com".into()),
            ..KubernetesSettings::default()
        };
        let current = as_tenant(desired_tenant(&spec(), &settings));
        assert!(is_converged(&current, &spec(), &settings));
        let changes: [fn(&mut TenantSpec); 6] = [
            |s| s.suspended = true,
            |s| s.plan = Plan::Enterprise,
            |s| s.retention.max_age_hours = 1,
            |s| s.retention.max_count = 1,
            |s| s.owner = "user-2".into(),
            |s| s.id = "other".into(),
        ];
        for change in changes {
            let mut s = spec();
            change(&mut s);
            assert!(!is_converged(&current, &s, &settings));
        }
        assert!(!is_converged(
            &current,
            &spec(),
            &KubernetesSettings {
                tenant_domain: Some("other.example.com".into()),
                ..KubernetesSettings::default()
            }
        ));
    }

    #[test]
    fn the_token_key_secret_is_patched_only_when_its_set_differs() {
        use k8s_openapi::ByteString;
        let secret = |pem: Option<&str>| Secret {
            data: pem
                .map(|p| [(TOKEN_KEY_KEY.to_owned(), ByteString(p.as_bytes().to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(
            token_key_secret_patch(&secret(Some("A\nB\n")), "A\nB\n"),
            None
        );
        let patch = token_key_secret_patch(&secret(Some("A\n")), "A\nB\n").unwrap();
        assert_eq!(patch, json!({ "data": { "public.pem": "QQpCCg==" } }));
        assert!(token_key_secret_patch(&secret(None), "A\n").is_some());
    }

    #[test]
    fn status_is_read_from_the_resource() {
        let mut t = as_tenant(desired_tenant(&spec(), &KubernetesSettings::default()));
        let s = observed_status(&t);
        assert_eq!(s.phase, TenantPhase::Provisioning);
        assert_eq!(s.message, "waiting for the operator");
        t.status = Some(
            serde_json::from_value(json!({
                "phase": "Ready",
                "endpoint": "https://acme.t.example.com",
                "certificate": {"serial": "0a1b", "notAfter": "2027-02-27T00:00:00Z",
                                "renewalTime": "2027-01-28T00:00:00Z"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Serving",
                                "message": "", "lastTransitionTime": "2026-11-29T00:00:00Z"}]
            }))
            .unwrap(),
        );
        let s = observed_status(&t);
        assert_eq!(s.phase, TenantPhase::Ready);
        assert_eq!(s.endpoint, "https://acme.t.example.com");
        assert_eq!(s.cert_serial, "0a1b");
        assert_eq!(s.cert_not_after_ms, 1_803_686_400_000);
        assert_eq!(s.cert_renewal_ms, 1_801_094_400_000);
        assert_eq!(s.message, "");
        t.status = Some(
            serde_json::from_value(json!({
                "phase": "Degraded",
                "conditions": [{"type": "Ready", "status": "False", "reason": "StorageNotEncrypted",
                                "message": "no encrypted StorageClass", "lastTransitionTime": "2026-11-29T00:00:00Z"}]
            }))
            .unwrap(),
        );
        let s = observed_status(&t);
        assert_eq!(s.phase, TenantPhase::Degraded);
        assert_eq!(s.message, "no encrypted StorageClass");
    }
}
