//! The per-tenant runtime: serves one tenant's instance over HTTPS, stores its data
//! encrypted, enforces its retention policy, and keeps its OAuth 2 grants' access tokens
//! current.
//!
//! [`run`] is the whole program given a loaded config, a bound listener and a shutdown
//! future; `main.rs` only parses flags, starts tracing and binds the listener, so tests
//! run the real server on port 0.
//!
//! Modules: [`config`] (the config file), [`crypto`] (record encryption), [`keystore`]
//! (per-period data keys, wrapped by the key-encryption key), [`store`] (SQLite), [`retention`] (the pruner), [`tls`] (certificate serving and rotation),
//! [`auth`] (bearer tokens), [`api`] (HTTP routes), [`oauth`] (OAuth 2 grants and their
//! refresher), [`provider`] (HTTPS to OAuth 2 providers), [`metrics`], [`reload`] (live
//! config and file reload) and [`server`] (the TLS accept loop).

pub mod api;
pub mod auth;
pub mod backup;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod keystore;
pub mod metrics;
pub mod oauth;
pub mod provider;
pub mod reload;
pub mod retention;
pub mod server;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{RunConfig, RuntimeConfig};
pub use error::{Error, Result};

use crate::api::AppState;
use crate::auth::TokenCheck;
use crate::keystore::Keyring;
use crate::metrics::Metrics;
use crate::oauth::OAuth;
use crate::provider::Provider;
use crate::reload::{Reloader, load_verifier};
use crate::store::Store;
use crate::tls::CertResolver;

/// Runs the instance until `shutdown` completes: opens the store, loads the certificate
/// and the token key (failing fast if any is unusable), starts the pruner and the
/// reloader, and serves HTTPS on `listener`. Returns after open connections have drained
/// and the database is closed.
pub async fn run(
    run_config: RunConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = run_config.config.clone();
    warn_if_root();

    let keys = Keyring::from_config(&config).await?;
    let store = Store::open(&config.data_dir, keys).await?;
    let certs = Arc::new(CertResolver::load(&config.tls, tls::provider())?);
    let tls_config = tls::server_config(certs.clone())?;
    let verifier = Arc::new(RwLock::new(Arc::new(load_verifier(
        &config.token_public_key_file,
    )?)));
    let provider = Provider::new(&config.oauth2)?;
    let metrics = Arc::new(Metrics::new());
    metrics
        .stored_executions
        .set(store.count_executions().await?);
    metrics.observe_keys(store.keys());
    tracing::info!(
        kek_id = %store.keys().kek_id(),
        data_keys = store.keys().len(),
        "key store open"
    );

    let clock = run_config.clock.clone();
    let (policy_tx, policy_rx) = watch::channel(config.retention);
    let (stop_tx, stop_rx) = watch::channel(false);
    let pruner = tokio::spawn(retention::run_pruner(
        store.clone(),
        clock.clone(),
        policy_rx,
        run_config.prune_interval,
        run_config.prune_batch_size,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let oauth = Arc::new(OAuth::new(
        store.clone(),
        provider,
        clock.clone(),
        metrics.clone(),
    ));
    let refresher = tokio::spawn(oauth.clone().run_refresher(stop_rx.clone()));
    let backups = config.backup.clone().map(|schedule| {
        let interval = run_config
            .backup_interval
            .or_else(|| schedule.interval())
            .unwrap_or(std::time::Duration::from_secs(86_400));
        tokio::spawn(backup::run_scheduler(
            config.clone(),
            schedule,
            interval,
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    let reloader = Reloader {
        config_path: run_config.config_path.clone(),
        config: config.clone(),
        certs: certs.clone(),
        verifier: verifier.clone(),
        policy: policy_tx,
        metrics: metrics.clone(),
        keys: store.keys().clone(),
    };
    let reloader = tokio::spawn(reloader.run(run_config.reload_interval, stop_rx));

    let state = AppState {
        store: store.clone(),
        tokens: TokenCheck {
            tenant_id: Arc::from(config.tenant_id.as_str()),
            verifier,
            clock: clock.clone(),
        },
        clock: clock.clone(),
        metrics,
        certs,
        oauth,
    };
    let router = api::router(state, run_config.max_body_bytes);
    tracing::info!(
        tenant = %config.tenant_id,
        addr = ?listener.local_addr().ok(),
        "tenant runtime serving HTTPS"
    );
    server::serve(listener, tls_config, router, shutdown).await;

    stop_tx.send_replace(true);
    for task in [pruner, reloader, refresher].into_iter().chain(backups) {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "background task failed");
        }
    }
    store.close().await;
    store.keys().close().await;
    tracing::info!("tenant runtime stopped");
    Ok(())
}

/// The runtime is meant to run as a non-root user; say so loudly if it does not.
fn warn_if_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1));
    if uid == Some("0") {
        tracing::warn!("running as root; the runtime should run as a non-root user");
    }
}
