//! `tenantry-operator run`: checks the CRD, serves the admin port, wins the leader Lease,
//! loads (or makes) the CA, and runs the controller over Tenants and every child kind.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ca::{self, CaState};
use crate::cache::{self, Caches};
use crate::config::Settings;
use crate::controller::{Context, error_policy, reconcile};
use crate::error::{Error, Result, is_already_exists};
use crate::leader::LeaseLock;
use crate::metrics::{self, Metrics};
use crate::object::TenantObject;
use tenantry_kube::names;
use tenantry_pki::CertificateAuthority;

/// How long reconciles still running at shutdown may take to finish; then they are
/// dropped (every reconcile is idempotent) so that the process exits well within the
/// 5 s a rolling update allows before it kills the pod... and the Lease is released.
const DRAIN: Duration = Duration::from_secs(2);

/// How long stopping the watch and admin tasks and releasing the Lease may take.
const STOP_TASKS: Duration = Duration::from_secs(1);

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

/// Loads the CA (and a rotation in progress) from its Secret in the operator namespace,
/// making it on first start.
pub async fn load_or_create_ca(client: &Client, settings: &Settings) -> Result<CaState> {
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
            return CaState::from_secret(&secret).map_err(|why| {
                warn!(secret = %label, why, "the CA Secret is malformed");
                Error::CaSecretMalformed(label.clone())
            });
        }
        let ca = CertificateAuthority::generate(names::CA_COMMON_NAME, jiff::Timestamp::now())?;
        // A new CA needs no rotation: `--rotate-ca` counts as handled.
        let annotations = settings.rotate_ca.as_ref().map(|v| {
            [(
                names::CA_ROTATION_FLAG_HANDLED_ANNOTATION.to_owned(),
                v.clone(),
            )]
            .into()
        });
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                annotations,
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
            Ok(created) => {
                info!(secret = %label, "created the operator CA");
                return CaState::from_secret(&created)
                    .map_err(|_| Error::CaSecretMalformed(label.clone()));
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

/// The events of the one Secret `name` that `api` sees, until `stop`.
fn watch_named(
    api: Api<Secret>,
    name: &str,
    stop: CancellationToken,
) -> impl futures::Stream<Item = Result<watcher::Event<Secret>, watcher::Error>> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .default_backoff()
        .take_until(stop.cancelled_owned())
}

/// Follows the token public key Secret; on each change updates `ctx` and asks for a
/// reconcile of every Tenant.
async fn follow_token_key(
    api: Api<Secret>,
    name: String,
    ctx: Arc<Context>,
    trigger: mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(watch_named(api, &name, stop));
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
            let _ = trigger.send(());
        }
    }
}

/// Follows the CA Secret while leading: each version becomes the controller's CA (every
/// Tenant is reconciled when tenants see a difference), and [`ca::step`] starts and ends
/// rotations, looking again when a rotation's window ends.
async fn follow_ca(
    api: Api<Secret>,
    name: String,
    ctx: Arc<Context>,
    trigger: mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(watch_named(api.clone(), &name, stop));
    let mut latest: Option<Secret> = None;
    let mut wake: Option<Duration> = None;
    loop {
        let sleep = async {
            match wake {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => match event {
                None => break,
                Some(Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s))) => latest = Some(s),
                Some(Ok(watcher::Event::Delete(_))) => {
                    warn!(secret = %name, "the CA Secret was deleted; the CA in memory is kept, and a restart makes a new CA (every certificate is re-issued)");
                    latest = None;
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the CA Secret failed");
                    continue;
                }
            },
            () = sleep => {}
        }
        let Some(secret) = latest.clone() else {
            continue;
        };
        adopt_ca(&ctx, &secret, &trigger);
        wake = match ca::step(&ctx, &api, &secret).await {
            Ok((written, wake)) => {
                if let Some(written) = written {
                    adopt_ca(&ctx, &written, &trigger);
                    latest = Some(written);
                }
                wake
            }
            Err(e) => {
                warn!(error = %e, source = ?std::error::Error::source(&e), "CA rotation step failed; retrying");
                Some(ca::RECHECK)
            }
        };
    }
}

/// Makes `secret` the controller's CA; asks for a reconcile of every Tenant when that
/// changes what tenants get.
fn adopt_ca(ctx: &Context, secret: &Secret, trigger: &mpsc::UnboundedSender<()>) {
    let state = match CaState::from_secret(secret) {
        Ok(state) => state,
        Err(e) => {
            warn!(error = %e, "the CA Secret cannot be read; the CA in memory is kept");
            return;
        }
    };
    if ctx.set_ca(state) {
        info!(fingerprint = %ctx.ca().fingerprint(), rotating = ctx.ca().started().is_some(), "the CA changed; reconciling every tenant");
        let _ = trigger.send(());
    }
}

/// Runs the operator until `shutdown` completes or leadership is lost.
///
/// Order matters on a real API server: every watch cache is filled before the controller
/// starts, so no reconcile ever waits on a cache; each reconcile is bounded by the
/// reconcile timeout; on shutdown the reconciles in flight get [`DRAIN`] to finish, the
/// Lease is released and every task this function started is joined.
pub async fn run(
    settings: Settings,
    leader: LeaderOptions,
    client: Client,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // `halt` stops everything; it fires on shutdown and when leadership is lost.
    let halt = CancellationToken::new();
    let mut tasks = JoinSet::new();
    {
        let halt = halt.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown => halt.cancel(),
                () = halt.cancelled() => {}
            }
        });
    }
    let metrics = Arc::new(Metrics::new());
    tasks.spawn(serve_admin(admin, metrics.clone(), halt.clone()));
    let outcome = lead(settings, leader, client, &metrics, &halt, &mut tasks).await;
    metrics.set_ready(false);
    halt.cancel();
    if tokio::time::timeout(STOP_TASKS, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!("some tasks did not stop within {STOP_TASKS:?}");
        tasks.shutdown().await;
    }
    outcome
}

async fn serve_admin(admin: TcpListener, metrics: Arc<Metrics>, halt: CancellationToken) {
    if let Err(e) = metrics::serve(admin, metrics, halt.cancelled_owned()).await {
        warn!(error = %e, "the admin server stopped");
    }
}

/// Checks the CRD, wins the Lease and runs the controller while leading.
async fn lead(
    settings: Settings,
    leader: LeaderOptions,
    client: Client,
    metrics: &Arc<Metrics>,
    halt: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
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
        () = halt.cancelled() => return Ok(()),
    }
    let outcome = tokio::select! {
        led = reconcile_while(settings, client, metrics, halt, tasks) => led,
        lost = lock.keep() => Err(lost),
    };
    if outcome.is_ok() {
        // Stopped on purpose (a rolling update): hand over now, not after the lease
        // duration.
        match tokio::time::timeout(STOP_TASKS, lock.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "could not release the Lease; another replica takes over when it expires")
            }
            Err(_) => {
                warn!("releasing the Lease timed out; another replica takes over when it expires")
            }
        }
    }
    outcome
}

/// Fills the caches, then runs the controller until `halt`.
async fn reconcile_while(
    settings: Settings,
    client: Client,
    metrics: &Arc<Metrics>,
    halt: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
    let ca = load_or_create_ca(&client, &settings).await?;
    let token_api: Api<Secret> = Api::namespaced(client.clone(), &settings.operator_namespace);
    let token_key = read_token_key(&token_api, &settings).await?;
    let caches = Arc::new(Caches::default());
    let (triggers, triggered) = mpsc::unbounded_channel::<ObjectRef<TenantObject>>();
    cache::spawn_watches(&client, &caches, &triggers, halt, tasks);
    drop(triggers);
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.clone(),
        Arc::new(ca),
        caches.clone(),
        token_key,
        metrics.clone(),
    ));
    let (all_tx, all_rx) = mpsc::unbounded_channel();
    tasks.spawn(follow_ca(
        token_api.clone(),
        settings.ca_secret.clone(),
        ctx.clone(),
        all_tx.clone(),
        halt.clone(),
    ));
    tasks.spawn(follow_token_key(
        token_api,
        settings.token_public_key_secret.clone(),
        ctx.clone(),
        all_tx,
        halt.clone(),
    ));

    info!("waiting for the watch caches to fill");
    tokio::select! {
        ready = caches.wait_ready(Duration::from_secs(10)) => ready?,
        () = halt.cancelled() => return Ok(()),
    }
    let (objects, bytes) = caches
        .footprint()
        .iter()
        .fold((0, 0), |(n, b), (_, kn, kb)| (n + kn, b + kb));
    info!(objects, bytes, "watch caches filled");

    let controller = controller(&client, &settings, halt)
        .reconcile_on(UnboundedReceiverStream::new(triggered))
        .reconcile_all_on(UnboundedReceiverStream::new(all_rx));
    info!(concurrency = settings.concurrency, "controller started");
    let running = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                warn!(error = %e, "controller error");
            }
            ready(())
        });
    let drained = async {
        halt.cancelled().await;
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        () = running => {}
        () = drained => warn!("reconciles still running {DRAIN:?} after the stop; abandoning them"),
    }
    Ok(())
}

/// The API's token public key, if its Secret exists yet (the runtimes wait for it).
async fn read_token_key(api: &Api<Secret>, settings: &Settings) -> Result<Option<String>> {
    let key = api
        .get_opt(&settings.token_public_key_secret)
        .await
        .map_err(|e| Error::kube("read the token public key Secret", e))?
        .as_ref()
        .and_then(public_key_of);
    if key.is_none() {
        warn!(
            secret = %format!("{}/{}", settings.operator_namespace, settings.token_public_key_secret),
            "no token public key yet; runtimes will not be deployed until it exists"
        );
    }
    Ok(key)
}

/// The controller over every Tenant, stopping gracefully on `halt`. Its Tenant watch drops
/// managed fields like the child watches, and reads Tenants the operator cannot
/// deserialize as such (see [`crate::object`]).
fn controller(
    client: &Client,
    settings: &Settings,
    halt: &CancellationToken,
) -> Controller<TenantObject> {
    let (tenants, tenant_writer) = reflector::store::<TenantObject>();
    let tenant_events = watcher(
        Api::<TenantObject>::all(client.clone()),
        watcher::Config::default().page_size(cache::LIST_PAGE),
    )
    .default_backoff()
    .modify(cache::trim::<TenantObject>)
    .reflect(tenant_writer)
    .applied_objects();
    Controller::for_stream(tenant_events, tenants)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(halt.clone().cancelled_owned())
}

#[cfg(test)]
mod rbac_tests;
#[cfg(test)]
mod tests;
