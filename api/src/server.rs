//! Assembles and runs the gRPC server: state from configuration, the auth layer, the four
//! Tenantry services, `grpc.health.v1` (SERVING only while the database answers) and server
//! reflection (v1 and v1alpha).

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tenantry_proto::runtime_config::OAuth2Config;
use tenantry_proto::token::TokenSigner;
use tenantry_proto::v1::account_service_server::AccountServiceServer;
use tenantry_proto::v1::admin_service_server::AdminServiceServer;
use tenantry_proto::v1::mfa_service_server::MfaServiceServer;
use tenantry_proto::v1::tenant_service_server::TenantServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::AuthLayer;
use crate::clock::Clock;
use crate::config::{DatabaseArgs, ProvisionerKind, ServeArgs};
use crate::crypto::MasterKey;
use crate::error::{Error, Result};
use crate::lockout::RateLimiter;
use crate::password::PasswordHasher;
use crate::provision::kubernetes::{KubernetesProvisioner, KubernetesSettings};
use crate::provision::local::{LocalProvisioner, LocalSettings, find_runtime_bin};
use crate::provision::{Provisioner, RecordOnly};
use crate::service::account::Accounts;
use crate::service::admin::Admin;
use crate::service::mfa::Mfa;
use crate::service::tenant::Tenants;
use crate::state::{AppState, StateParts};
use crate::store::{AuditRecord, Store};
use crate::token_keys::TokenKeyRing;

/// How often the health check asks the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How often expired sessions are deleted.
const SESSION_PURGE_INTERVAL: Duration = Duration::from_secs(600);

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The file a SQLite URL points at, if it is a file.
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Where the master key is: `--master-key-file`, or (SQLite only) `master.key` beside the
/// database; the flag `true` for the latter, the default a first start may create.
pub(crate) fn master_key_path(db: &DatabaseArgs) -> Result<(PathBuf, bool)> {
    match (&db.master_key_file, sqlite_path(db.url().expose_secret())) {
        (Some(path), _) => Ok((path.clone(), false)),
        (None, Some(db_path)) => Ok((
            db_path
                .parent()
                .unwrap_or(Path::new("."))
                .join(MASTER_KEY_FILE),
            true,
        )),
        (None, None) => Err(Error::Config(
            "--master-key-file (TENANTRY_MASTER_KEY_FILE) is required with this database".into(),
        )),
    }
}

/// The master key file: `--master-key-file`, or (SQLite only) `master.key` beside the
/// database, created with mode 0600 on first start. Checked to hold usable keys.
pub fn master_key_file(db: &DatabaseArgs) -> Result<PathBuf> {
    let (path, default) = master_key_path(db)?;
    if default && !path.exists() {
        create_master_key(&path)?;
        tracing::info!(path = %path.display(), "created a new master key; back it up with the database");
    }
    crate::keyring::read_ring(&path)?;
    Ok(path)
}

fn create_master_key(path: &Path) -> Result<()> {
    let (_, text) = MasterKey::generate()?;
    write_new_file(
        path,
        format!("{}\n", text.expose_secret()).as_bytes(),
        0o600,
    )
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
pub(crate) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

/// The public half of the instance-token key, next to a generated signing key.
pub const TOKEN_PUBLIC_KEY_FILE: &str = "token-public.pem";
/// The master key written by [`keygen`].
pub const MASTER_KEY_FILE: &str = "master.key";
/// The instance-token signing key written by [`keygen`].
pub const TOKEN_SIGNING_KEY_FILE: &str = "token-signing.key";

/// Writes a new master key, instance-token signing key and its public half into `dir`
/// (keys 0600, public key 0644); fails without writing anything if one of them exists.
/// Returns the paths written.
pub fn keygen(dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = [
        MASTER_KEY_FILE,
        TOKEN_SIGNING_KEY_FILE,
        TOKEN_PUBLIC_KEY_FILE,
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(Error::Config(format!(
            "{} exists; keygen never overwrites keys (move it away first)",
            existing.display()
        )));
    }
    let signer = TokenSigner::generate().map_err(Error::Token)?;
    create_master_key(&dir.join(MASTER_KEY_FILE))?;
    write_new_file(
        &dir.join(TOKEN_SIGNING_KEY_FILE),
        signer.to_pkcs8_pem().expose_secret().as_bytes(),
        0o600,
    )?;
    write_new_file(
        &dir.join(TOKEN_PUBLIC_KEY_FILE),
        signer.public_key_pem().as_bytes(),
        0o644,
    )?;
    Ok(paths)
}

/// Writes a new Ed25519 DKIM key, `dkim.key` (0600), into `dir`; refuses to overwrite.
pub fn keygen_dkim(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(crate::mail::DEFAULT_DKIM_KEY_FILE);
    if path.exists() {
        return Err(Error::Config(format!(
            "{} exists; keygen never overwrites keys (move it away first)",
            path.display()
        )));
    }
    crate::mail::create_dkim_key(&path)?;
    Ok(path)
}

/// Reads the instance-token signing key file: `--token-signing-key-file`, or (SQLite only)
/// `token-signing.key` beside the database if it exists. The key ring in the database
/// signs; the file only seeds an empty ring ([`crate::token_keys::import_key_file`]), so
/// after a rotation its key is no longer used. `None` when there is no file to read.
pub fn load_token_signer(db: &DatabaseArgs) -> Result<Option<TokenSigner>> {
    let path = match (
        &db.token_signing_key_file,
        sqlite_path(db.url().expose_secret()),
    ) {
        (Some(path), _) => path.clone(),
        (None, Some(db_path)) => {
            let path = db_path
                .parent()
                .unwrap_or(Path::new("."))
                .join(TOKEN_SIGNING_KEY_FILE);
            if !path.exists() {
                return Ok(None);
            }
            path
        }
        (None, None) => return Ok(None),
    };
    crate::files::check_key_file(&path)?;
    let pem = std::fs::read_to_string(&path).map_err(io_err(format!(
        "reading token signing key {}",
        path.display()
    )))?;
    TokenSigner::from_pkcs8_pem(&SecretString::from(pem))
        .map(Some)
        .map_err(Error::Token)
}

/// The key ring, its first key imported from the key file (or, with SQLite, made) when it
/// is empty.
async fn open_token_keys(
    db: &DatabaseArgs,
    store: &Store,
    master_key: &dyn crate::crypto::Seal,
    now_ms: i64,
) -> Result<TokenKeyRing> {
    let file_key = load_token_signer(db)?;
    let first = match file_key {
        Some(signer) => Some(signer),
        None if store.token_keys().await?.is_empty() => {
            if store.backend() != crate::store::Backend::Sqlite {
                return Err(Error::Config(
                    "--token-signing-key-file (TENANTRY_TOKEN_SIGNING_KEY_FILE) is required to start a new token key ring with this database".into(),
                ));
            }
            // A new embedded install: the key goes straight into the ring, sealed; no
            // private key file is written.
            tracing::info!("making the first instance-token signing key");
            Some(TokenSigner::generate().map_err(Error::Token)?)
        }
        None => None,
    };
    if let Some(signer) = first {
        crate::token_keys::import_key_file(store, master_key, &signer, now_ms).await?;
    }
    TokenKeyRing::load(store, master_key, now_ms).await
}

/// Rereads the key ring (retiring the keys that are due) and, when the public set changed,
/// hands it to the provisioner for every instance. Failures are logged: the keys read
/// before stay in use and the next pass retries.
pub async fn refresh_token_keys(state: &AppState) {
    let now = state.now_ms();
    if let Err(e) = state
        .token_keys
        .refresh(&state.store, &state.master_key, now)
        .await
    {
        tracing::warn!(error = %e, "could not reread the token key ring; signing with the keys read before");
    }
    publish_token_keys(&state.token_keys, state.provisioner.as_ref(), now).await;
}

async fn publish_token_keys(keys: &TokenKeyRing, provisioner: &dyn Provisioner, now_ms: i64) {
    let pem = match keys.public_set(now_ms) {
        Ok(pem) => pem,
        Err(e) => {
            tracing::error!(error = %e, "the token key ring has no publishable key");
            return;
        }
    };
    if !keys.needs_publishing(&pem) {
        return;
    }
    match provisioner.publish_token_keys(&pem).await {
        Ok(()) => {
            keys.published(pem);
            tracing::info!(
                kids = %keys.public_kids(now_ms).join(","),
                "published the instance-token public key set"
            );
        }
        Err(e) => tracing::warn!(
            error = %e,
            "could not publish the instance-token public key set; retrying (docs/operations.md, token key rotation, has the manual step)"
        ),
    }
}

/// A SQLite database's directory and files, private before SQLite opens them (see
/// [`crate::files::private_sqlite_files`]).
pub(crate) fn ensure_sqlite_dir(url: &str) -> Result<()> {
    match sqlite_path(url) {
        Some(db) => crate::files::private_sqlite_files(&db),
        None => Ok(()),
    }
}

/// Connects to the database (migrating it) and builds the shared state.
pub async fn build_state(args: &ServeArgs, clock: Arc<dyn Clock>) -> Result<Arc<AppState>> {
    build_state_with(args, clock, None).await
}

/// [`build_state`], with the Kubernetes client of the `kubernetes` provisioner given rather
/// than inferred from the environment (tests pass an in-memory API server's).
pub async fn build_state_with(
    args: &ServeArgs,
    clock: Arc<dyn Clock>,
    kube_client: Option<kube::Client>,
) -> Result<Arc<AppState>> {
    let url = args.db.url();
    let url = url.expose_secret();
    crate::store::Backend::of_url(url)?;
    ensure_sqlite_dir(url)?;
    let key_file = master_key_file(&args.db)?;
    let store = Store::connect(url, args.database_max_connections).await?;
    let master_key = crate::keyring::ServerKeyRing::load(&store, &key_file, clock.now_ms()).await?;
    let token_keys = open_token_keys(&args.db, &store, &master_key, clock.now_ms()).await?;
    let hasher = PasswordHasher::new(args.db.hash_params())?;
    let provisioner = build_provisioner(args, &store, &clock, kube_client).await?;
    // Before any instance starts: a runtime needs the set to verify tokens.
    publish_token_keys(&token_keys, provisioner.as_ref(), clock.now_ms()).await;
    let mailer = Arc::new(crate::mail::Mailer::new(
        &args.mail.settings(&args.db.data_dir)?,
    )?);
    Ok(Arc::new(AppState::new(StateParts {
        store,
        hasher,
        master_key,
        master_key_reload: args.master_key_reload_interval,
        clock,
        sessions: args.session_policy(),
        rate_limiter: RateLimiter::new(args.rate_limit_per_second, args.rate_limit_burst),
        totp_issuer: args.totp_issuer.clone(),
        token_keys: Arc::new(token_keys),
        token_key_refresh: args.token_key_refresh_interval,
        instance_token_ttl: args.instance_token_ttl,
        provisioner,
        access: args.access_policy(),
        trusted_proxies: crate::forwarded::TrustedProxies::new(args.trusted_proxies.clone()),
        mailer,
        require_email_verification: args.mail.require_email_verification,
        notify_degraded_after: args.mail.notify_degraded_after,
        metrics_listen: args.metrics_listen,
        backup: backup_settings(args)?,
    })?))
}

fn backup_settings(args: &ServeArgs) -> Result<Option<crate::backup::BackupSettings>> {
    args.backup
        .settings()
        .map_err(io_err("resolving --backup-dir".to_owned()))
}

async fn build_provisioner(
    args: &ServeArgs,
    store: &Store,
    clock: &Arc<dyn Clock>,
    kube_client: Option<kube::Client>,
) -> Result<Arc<dyn Provisioner>> {
    match args.provisioner {
        ProvisionerKind::None => Ok(Arc::new(RecordOnly)),
        ProvisionerKind::Kubernetes => {
            let client = match kube_client {
                Some(client) => client,
                None => kube::Client::try_default().await.map_err(|e| {
                    Error::Config(format!(
                        "the kubernetes provisioner needs a cluster (KUBECONFIG, ~/.kube/config or a pod service account): {e}"
                    ))
                })?,
            };
            let settings = KubernetesSettings {
                tenant_domain: args.tenant_domain.clone(),
                token_public_key_secret: args.token_public_key_secret.clone(),
                token_public_key_secret_namespace: args.token_public_key_secret_namespace.clone(),
            };
            let provisioner =
                KubernetesProvisioner::start(client, settings, store.clone(), Arc::clone(clock))
                    .await?;
            Ok(Arc::new(provisioner))
        }
        ProvisionerKind::Local => {
            let runtime_bin = match &args.runtime_bin {
                Some(path) => path.clone(),
                None => find_runtime_bin().ok_or_else(|| {
                    Error::Config(
                        "tenant-runtime binary not found next to tenantry-api or on PATH (build it with `cargo build --workspace`, or pass --runtime-bin)".into(),
                    )
                })?,
            };
            let token_public_key = match &args.db.token_signing_key_file {
                Some(key) => key.with_file_name(TOKEN_PUBLIC_KEY_FILE),
                None => args.db.data_dir.join(TOKEN_PUBLIC_KEY_FILE),
            };
            let settings = LocalSettings {
                data_dir: std::path::absolute(&args.db.data_dir)
                    .map_err(io_err(format!("resolving {}", args.db.data_dir.display())))?,
                runtime_bin,
                token_public_key: std::path::absolute(&token_public_key)
                    .map_err(io_err(format!("resolving {}", token_public_key.display())))?,
                cert_validity: args.local_cert_validity,
                oauth2: OAuth2Config {
                    allowed_hosts: args.local_oauth2_allowed_hosts.clone(),
                    ca_file: args
                        .local_oauth2_ca_file
                        .as_deref()
                        .map(std::path::absolute)
                        .transpose()
                        .map_err(io_err("resolving --local-oauth2-ca-file".to_owned()))?,
                },
                backup: backup_settings(args)?,
            };
            let provisioner = LocalProvisioner::new(settings, store.clone(), Arc::clone(clock))?;
            // The previous process's runtimes stopped with it: no stale Ready until the
            // new ones answer their readiness probe.
            store.mark_instances_starting(clock.now_ms()).await?;
            Ok(Arc::new(provisioner))
        }
    }
}

/// Runs `serve` with the system clock until `shutdown` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let state = build_state(&args, Arc::new(crate::clock::SystemClock)).await?;
    let tls = load_tls(&args)?;
    serve(state, listener, tls, shutdown).await
}

/// The TLS identity from `--tls-cert-file`/`--tls-key-file`, if given.
pub fn load_tls(args: &ServeArgs) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let cert_pem = std::fs::read(cert).map_err(io_err(format!("reading {}", cert.display())))?;
    let key_pem = std::fs::read(key).map_err(io_err(format!("reading {}", key.display())))?;
    Ok(Some(
        ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)),
    ))
}

async fn db_status(state: &AppState) -> ServingStatus {
    if state.store.ping().await {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Sets every service's status; the overall ("") status last, so a client that sees it
/// change sees every service changed too.
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in [
        <AccountServiceServer<Accounts> as NamedService>::NAME,
        <MfaServiceServer<Mfa> as NamedService>::NAME,
        <TenantServiceServer<Tenants> as NamedService>::NAME,
        <AdminServiceServer<Admin> as NamedService>::NAME,
        "",
    ] {
        reporter.set_service_status(name, status).await;
    }
}

/// How long shutdown waits for provisioning that requests started.
const TASK_GRACE: Duration = Duration::from_secs(10);

/// Runs `work` until `stop` is cancelled.
async fn until(stop: CancellationToken, work: impl Future<Output = ()>) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = work => {}
    }
}

/// Checks the database every [`HEALTH_INTERVAL`] and reports a change of health.
async fn watch_health(state: Arc<AppState>, reporter: HealthReporter, initial: ServingStatus) {
    let mut last = initial;
    loop {
        tokio::time::sleep(HEALTH_INTERVAL).await;
        let status = db_status(&state).await;
        if last != status {
            if status == ServingStatus::NotServing {
                tracing::error!("database is not answering; health is NOT_SERVING");
            } else {
                tracing::info!("database answers again; health is SERVING");
            }
            set_health(&reporter, status).await;
            last = status;
        }
    }
}

/// Brings every tenant's instance in line with its record, every reconcile interval.
async fn reconcile_loop(state: Arc<AppState>) {
    loop {
        if let Err(e) = crate::provision::reconcile_all(&state.store, &state.provisioner).await {
            tracing::warn!(error = %e, "could not list tenants to reconcile");
        }
        tokio::time::sleep(crate::provision::RECONCILE_INTERVAL).await;
    }
}

/// Deletes expired sessions, and the failure counters of unknown emails idle for
/// [`crate::lockout::UNKNOWN_EMAIL_MEMORY`], every [`SESSION_PURGE_INTERVAL`].
async fn purge_loop(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(SESSION_PURGE_INTERVAL).await;
        let now = state.now_ms();
        let idle = crate::clock::duration_ms(state.sessions.idle_timeout);
        match state.store.purge_sessions(now, now - idle).await {
            Ok(n) if n > 0 => tracing::debug!(sessions = n, "deleted expired sessions"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not delete expired sessions"),
        }
        let memory = crate::clock::duration_ms(crate::lockout::UNKNOWN_EMAIL_MEMORY);
        match state
            .store
            .purge_unknown_email_failures(now - memory, now)
            .await
        {
            Ok(n) if n > 0 => tracing::debug!(emails = n, "forgot idle unknown-email counters"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not purge unknown-email counters"),
        }
    }
}

/// Rereads the token key ring and republishes its public set, every
/// `--token-key-refresh-interval`.
async fn token_key_loop(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(state.token_key_refresh).await;
        refresh_token_keys(&state).await;
    }
}

/// Expires grants, closes due access reviews and starts scheduled ones: at start, then
/// every [`crate::access::SWEEP_INTERVAL`].
async fn access_loop(state: Arc<AppState>) {
    loop {
        match crate::access::sweep(&state).await {
            Ok(report) if report != crate::access::SweepReport::default() => {
                tracing::info!(
                    grants_expired = report.grants_expired,
                    reviews_closed = report.reviews_closed,
                    scheduled_review = report.scheduled_review.as_deref().unwrap_or(""),
                    "access sweep"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "access sweep failed; retrying next interval"),
        }
        tokio::time::sleep(crate::access::SWEEP_INTERVAL).await;
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Health is known before the first request is accepted.
    let initial = db_status(&state).await;
    set_health(&reporter, initial).await;
    // The loops below run until `stop`; shutdown cancels it and waits for them.
    let stop = CancellationToken::new();
    let mut loops = JoinSet::new();
    loops.spawn(until(
        stop.clone(),
        watch_health(Arc::clone(&state), reporter, initial),
    ));
    loops.spawn(until(stop.clone(), reconcile_loop(Arc::clone(&state))));
    loops.spawn(until(stop.clone(), purge_loop(Arc::clone(&state))));
    loops.spawn(until(stop.clone(), access_loop(Arc::clone(&state))));
    loops.spawn(until(stop.clone(), token_key_loop(Arc::clone(&state))));
    loops.spawn(until(
        stop.clone(),
        crate::keyring::run(Arc::clone(&state), state.master_key_reload),
    ));
    loops.spawn(until(
        stop.clone(),
        crate::mail::worker::run(Arc::clone(&state), Arc::clone(&state.mailer)),
    ));
    loops.spawn(until(
        stop.clone(),
        crate::mail::worker::watch_health(Arc::clone(&state), state.notify_degraded_after),
    ));
    if let Some(addr) = state.metrics_listen {
        let (bound, metrics) =
            crate::metrics::start(addr, Arc::clone(&state), stop.clone()).await?;
        let _ = state.metrics_addr.set(bound);
        tracing::info!(listen = %bound, "serving /metrics");
        loops.spawn(metrics);
    }
    if let Some(settings) = state.backup.clone() {
        tracing::info!(dir = %settings.dir.display(), interval = %settings.interval_text, keep = settings.keep, "scheduled backups");
        loops.spawn(until(
            stop.clone(),
            crate::backup::run_scheduler(state.store.url(), settings),
        ));
    }
    let granularity = state.sessions.touch_granularity_ms();
    let cache_state = Arc::clone(&state);
    loops.spawn(until(stop.clone(), async move {
        cache_state.store.run_session_cache(granularity).await;
    }));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tenantry_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tenantry_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;

    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(Error::Transport)?;
    }
    let local = listener.local_addr().ok();
    tracing::info!(listen = ?local, "tenantry-api serving");
    let result = builder
        .layer(crate::forwarded::ForwardedLayer::new(
            state.trusted_proxies.clone(),
        ))
        .layer(AuthLayer::new(Arc::clone(&state)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AccountServiceServer::new(Accounts::new(Arc::clone(&state))))
        .add_service(MfaServiceServer::new(Mfa::new(Arc::clone(&state))))
        .add_service(TenantServiceServer::new(Tenants::new(Arc::clone(&state))))
        .add_service(AdminServiceServer::new(Admin::new(Arc::clone(&state))))
        .serve_with_incoming_shutdown(
            // Small request/response pairs must not wait for delayed ACKs (Nagle).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(Error::Transport);
    stop.cancel();
    while loops.join_next().await.is_some() {}
    // A rotation waits for the servers that hold keys; this one no longer does.
    if let Err(e) = state
        .store
        .drop_key_holder(state.master_key.server_id())
        .await
    {
        tracing::warn!(error = %e, "could not withdraw this server's master key report");
    }
    // Uses not yet written would otherwise be lost with the cache.
    if let Err(e) = state.store.flush_last_seen(0).await {
        tracing::warn!(error = %e, "could not record session use at shutdown");
    }
    // Provisioning that requests started may finish; what is still running after
    // TASK_GRACE is dropped with the runtime (the reconcile loop redoes it on the next
    // start).
    state.tasks.close();
    if tokio::time::timeout(TASK_GRACE, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("provisioning still running at shutdown; it resumes on the next start");
    }
    // Stops every tenant runtime this process started; none is left running.
    state.provisioner.shutdown().await;
    state.store.close().await;
    tracing::info!("tenantry-api stopped");
    result
}

/// The database of a one-off command (`rotate-token-key`, `rotate-master-key`,
/// `rotate-local-ca`, …): the URL checked, a SQLite file's directory made, a small pool.
pub(crate) async fn command_store(db: &DatabaseArgs) -> Result<Store> {
    let url = db.url();
    let url = url.expose_secret();
    crate::store::Backend::of_url(url)?;
    ensure_sqlite_dir(url)?;
    Store::connect(url, 2).await
}

/// What `bootstrap-admin` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new admin user was created.
    Created {
        /// Its id.
        user_id: String,
    },
    /// An existing user was given a fresh admin grant (their password is unchanged; a
    /// deactivated user is reactivated). This is also how an operator recovers when the
    /// last admin grant expired or an access review revoked it.
    Promoted {
        /// Its id.
        user_id: String,
    },
    /// The user held an unexpired admin grant already (left as it is).
    AlreadyAdmin {
        /// Its id.
        user_id: String,
    },
}

/// Creates the first admin with `password`, or grants admin to the existing user with
/// this email; the grant lasts [`crate::access::DEFAULT_GRANT_DAYS`] and is made by
/// nobody. Audited as `admin.bootstrap`. It needs database access, not an admin: the
/// recovery path when no admin is left (expired grants, a review that failed closed).
pub async fn bootstrap_admin(
    db: &DatabaseArgs,
    email: &str,
    password: &SecretString,
    clock: &dyn Clock,
) -> Result<Bootstrap> {
    let email = crate::validate::normalize_email(email).map_err(|d| Error::invalid("email", d))?;
    let url = db.url();
    let url = url.expose_secret();
    crate::store::Backend::of_url(url)?;
    ensure_sqlite_dir(url)?;
    // Make sure the key exists before any secret is stored with this database.
    master_key_file(db)?;
    let store = Store::connect(url, 2).await?;
    let now = clock.now_ms();
    let record = |user_id: &str, how: &str| AuditRecord {
        action: "admin.bootstrap",
        actor_user_id: String::new(),
        target: user_id.to_owned(),
        success: true,
        source: "cli".to_owned(),
        detail_json: crate::service::detail(&[
            ("email", email.clone().into()),
            ("how", how.into()),
        ]),
    };
    let until = now.saturating_add(crate::access::days_ms(crate::access::DEFAULT_GRANT_DAYS));
    let outcome = if let Some(user) = store.user_by_email(&email).await? {
        let is_admin = store
            .grants_of(&user.id, now)
            .await?
            .iter()
            .any(|g| g.role == crate::access::Role::Admin);
        if is_admin && user.is_active() {
            Bootstrap::AlreadyAdmin { user_id: user.id }
        } else {
            store
                .bootstrap_existing_admin(&user.id, until, &record(&user.id, "promoted"), now)
                .await?;
            Bootstrap::Promoted { user_id: user.id }
        }
    } else {
        let local = email.split('@').next().unwrap_or_default().to_owned();
        crate::password::check_policy(password, &[&local])
            .map_err(|e| Error::invalid("password", e.to_string()))?;
        let hasher = PasswordHasher::new(db.hash_params())?;
        let hash = hasher.hash(password)?;
        let user_id = uuid::Uuid::new_v4().to_string();
        if !store
            .create_admin(
                &user_id,
                &email,
                &hash,
                until,
                now,
                &record(&user_id, "created"),
            )
            .await?
        {
            return Err(Error::AlreadyExists {
                field: "email",
                message: "an account with this email already exists",
            });
        }
        Bootstrap::Created { user_id }
    };
    store.close().await;
    Ok(outcome)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths_are_found_in_urls() {
        assert_eq!(
            sqlite_path("sqlite://data/t.db"),
            Some(PathBuf::from("data/t.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///abs/t.db?mode=rwc"),
            Some(PathBuf::from("/abs/t.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x@y/z"), None);
    }

    #[test]
    fn keygen_dkim_writes_a_private_ed25519_key_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = keygen_dkim(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = crate::mail::load_dkim_key(&path).unwrap();
        assert_eq!(key.dns_kind(), "ed25519");
        let before = std::fs::read(&path).unwrap();
        let err = keygen_dkim(dir.path()).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn keygen_writes_usable_keys_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys");
        let written = keygen(&out).unwrap();
        assert_eq!(written.len(), 3);
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(MASTER_KEY_FILE), 0o600);
        assert_eq!(mode(TOKEN_SIGNING_KEY_FILE), 0o600);
        assert_eq!(mode(TOKEN_PUBLIC_KEY_FILE), 0o644);

        // The API loads them as --master-key-file and --token-signing-key-file, and the
        // public half verifies what the signing key issues.
        let db = DatabaseArgs {
            data_dir: dir.path().into(),
            database_url: Some("postgres://x@y/z".into()),
            master_key_file: Some(out.join(MASTER_KEY_FILE)),
            token_signing_key_file: Some(out.join(TOKEN_SIGNING_KEY_FILE)),
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
        };
        master_key_file(&db).unwrap();
        let signer = load_token_signer(&db).unwrap().unwrap();
        let public = std::fs::read_to_string(out.join(TOKEN_PUBLIC_KEY_FILE)).unwrap();
        let verifier = tenantry_proto::token::TokenVerifier::from_public_key_pem(&public).unwrap();
        let now = jiff::Timestamp::now();
        let (token, _) = signer
            .issue("t-1", "u-1", now, Duration::from_secs(60))
            .unwrap();
        assert!(verifier.verify(&token, "t-1", now).is_ok());

        // A second run refuses and leaves the keys alone.
        let before = std::fs::read(out.join(MASTER_KEY_FILE)).unwrap();
        let err = keygen(&out).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");
        assert_eq!(std::fs::read(out.join(MASTER_KEY_FILE)).unwrap(), before);
    }
}
