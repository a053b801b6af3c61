//! `tenantry-operator run`: checks the CRD, serves the admin port, wins the leader Lease,
//! loads (or makes) the CA, and runs the controller over Tenants and every child kind.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
    ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::Settings;
use crate::controller::{Context, caches, error_policy, reconcile, tenant_of};
use crate::crd::Tenant;
use crate::error::{Error, Result, is_already_exists};
use crate::leader::LeaseLock;
use crate::metrics::{self, Metrics};
use crate::names;
use crate::pki::CertificateAuthority;

/// Leader-election options of `run`.
#[derive(Clone, Debug)]
pub struct LeaderOptions {
    /// Lease name (in the operator namespace).
    pub lease_name: String,
    /// How long a Lease is valid without renewal.
    pub lease_duration: Duration,
    /// This replica's identity.
    pub identity: String,
}

/// Fails with a clear message unless the Tenant CRD is installed and serves `v1alpha1`.
pub async fn check_crd(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = api
        .get_opt(names::CRD_NAME)
        .await
        .map_err(|e| Error::kube(format!("read CRD {}", names::CRD_NAME), e))?;
    let served = crd.is_some_and(|c| {
        c.spec
            .versions
            .iter()
            .any(|v| v.name == names::VERSION && v.served)
    });
    if served {
        Ok(())
    } else {
        Err(Error::CrdNotInstalled {
            crd: names::CRD_NAME,
            version: names::VERSION,
        })
    }
}

/// Loads the CA from its Secret in the operator namespace, making it on first start.
pub async fn load_or_create_ca(
    client: &Client,
    settings: &Settings,
) -> Result<CertificateAuthority> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.operator_namespace);
    let name = &settings.ca_secret;
    let label = format!("{}/{}", settings.operator_namespace, name);
    // Two rounds: another replica may create the Secret between our read and our create.
    for _ in 0..2 {
        let existing = api
            .get_opt(name)
            .await
            .map_err(|e| Error::kube(format!("read Secret {label}"), e))?;
        if let Some(secret) = existing {
            let field = |k: &str| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            };
            let (Some(cert), Some(key)) = (field("tls.crt"), field("tls.key")) else {
                return Err(Error::CaSecretMalformed(label));
            };
            return CertificateAuthority::from_pem(&cert, &SecretString::from(key))
                .map_err(|_| Error::CaSecretMalformed(label.clone()));
        }
        let ca = CertificateAuthority::generate(names::CA_COMMON_NAME)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [(
                        names::LABEL_MANAGED_BY.to_owned(),
                        names::MANAGED_BY.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(
                [
                    (
                        "tls.crt".to_owned(),
                        ByteString(ca.cert_pem().as_bytes().to_vec()),
                    ),
                    (
                        "tls.key".to_owned(),
                        ByteString(ca.key_pem().expose_secret().as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = %label, "created the operator CA");
                return Ok(ca);
            }
            Err(e) if is_already_exists(&e) => continue,
            Err(e) => return Err(Error::kube(format!("create Secret {label}"), e)),
        }
    }
    Err(Error::CaSecretMalformed(label))
}

fn public_key_of(secret: &Secret) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(names::TOKEN_KEY_KEY)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|pem| pem.contains("PUBLIC KEY"))
}

/// Follows the token public key Secret; on each change updates `ctx` and asks for a
/// reconcile of every Tenant.
async fn follow_token_key(
    api: Api<Secret>,
    name: String,
    ctx: Arc<Context>,
    trigger: mpsc::UnboundedSender<()>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut seen = false;
    while let Some(event) = events.next().await {
        let new = match event {
            Ok(watcher::Event::Init) => {
                seen = false;
                continue;
            }
            Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => {
                seen = true;
                public_key_of(&s)
            }
            Ok(watcher::Event::InitDone) if seen => continue,
            Ok(watcher::Event::InitDone | watcher::Event::Delete(_)) => None,
            Err(e) => {
                warn!(error = %e, "watching the token public key Secret failed");
                continue;
            }
        };
        let changed = match ctx.token_public_key.write() {
            Ok(mut current) if *current != new => {
                *current = new;
                true
            }
            _ => false,
        };
        if changed {
            info!(secret = %name, "token public key changed; reconciling every tenant");
            let _ = trigger.unbounded_send(());
        }
    }
}

/// A watch on every object of kind `K` managed by the operator, feeding `writer`.
fn owned<K>(
    client: &Client,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let selector = format!("{}={}", names::LABEL_MANAGED_BY, names::MANAGED_BY);
    let api: Api<K> = Api::all(client.clone());
    reflector(
        writer,
        watcher(api, watcher::Config::default().labels(&selector)),
    )
    .default_backoff()
    .touched_objects()
}

/// Runs the operator until `shutdown` completes or leadership is lost.
pub async fn run(
    settings: Settings,
    leader: LeaderOptions,
    client: Client,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stop = shutdown.boxed().shared();
    let metrics = Arc::new(Metrics::new());
    let admin_task = tokio::spawn(metrics::serve(admin, metrics.clone(), stop.clone()));

    check_crd(&client).await?;
    metrics.set_ready(true);

    let lock = LeaseLock::new(
        Api::namespaced(client.clone(), &settings.operator_namespace),
        &leader.lease_name,
        &leader.identity,
        leader.lease_duration,
    );
    tokio::select! {
        acquired = lock.acquire() => acquired?,
        () = stop.clone() => return Ok(()),
    }

    let ca = load_or_create_ca(&client, &settings).await?;
    let token_api: Api<Secret> = Api::namespaced(client.clone(), &settings.operator_namespace);
    let token_key = token_api
        .get_opt(&settings.token_public_key_secret)
        .await
        .map_err(|e| Error::kube("read the token public key Secret", e))?
        .as_ref()
        .and_then(public_key_of);
    if token_key.is_none() {
        warn!(
            secret = %format!("{}/{}", settings.operator_namespace, settings.token_public_key_secret),
            "no token public key yet; runtimes will not be deployed until it exists"
        );
    }
    let (caches, writers) = caches();
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.clone(),
        ca,
        caches,
        token_key,
        metrics.clone(),
    ));
    let (trigger_tx, trigger_rx) = mpsc::unbounded();
    tokio::spawn(follow_token_key(
        token_api,
        settings.token_public_key_secret.clone(),
        ctx.clone(),
        trigger_tx,
    ));
    tokio::spawn(
        reflector(
            writers.storage_classes,
            watcher(
                Api::<StorageClass>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(|_| ready(())),
    );

    // Children map to their Tenant through `tenant_of` rather than `owns_stream`: the owner
    // of a namespaced child would otherwise be keyed with the child's namespace, a second
    // key for the same cluster-scoped Tenant that could be reconciled concurrently.
    let controller = Controller::new(
        Api::<Tenant>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches_stream(
        owned::<Namespace>(&client, writers.namespaces),
        tenant_of::<Namespace>,
    )
    .watches_stream(
        owned::<NetworkPolicy>(&client, writers.policies),
        tenant_of::<NetworkPolicy>,
    )
    .watches_stream(
        owned::<ResourceQuota>(&client, writers.quotas),
        tenant_of::<ResourceQuota>,
    )
    .watches_stream(
        owned::<LimitRange>(&client, writers.limit_ranges),
        tenant_of::<LimitRange>,
    )
    .watches_stream(
        owned::<ServiceAccount>(&client, writers.service_accounts),
        tenant_of::<ServiceAccount>,
    )
    .watches_stream(
        owned::<Secret>(&client, writers.secrets),
        tenant_of::<Secret>,
    )
    .watches_stream(
        owned::<ConfigMap>(&client, writers.config_maps),
        tenant_of::<ConfigMap>,
    )
    .watches_stream(
        owned::<PersistentVolumeClaim>(&client, writers.pvcs),
        tenant_of::<PersistentVolumeClaim>,
    )
    .watches_stream(
        owned::<Deployment>(&client, writers.deployments),
        tenant_of::<Deployment>,
    )
    .watches_stream(
        owned::<Service>(&client, writers.services),
        tenant_of::<Service>,
    )
    .reconcile_all_on(trigger_rx)
    .graceful_shutdown_on(stop.clone());
    info!("controller started");
    let running = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                warn!(error = %e, "controller error");
            }
            ready(())
        });
    let outcome = tokio::select! {
        () = running => {
            // Stopped on purpose (a rolling update): hand over now, not after the lease
            // duration.
            if let Err(e) = lock.release().await {
                warn!(error = %e, "could not release the Lease; another replica takes over when it expires");
            }
            Ok(())
        }
        lost = lock.keep() => Err(lost),
    };
    metrics.set_ready(false);
    admin_task.abort();
    outcome
}

#[cfg(test)]
mod rbac_tests;
