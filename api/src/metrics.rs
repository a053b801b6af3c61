//! Prometheus metrics on a plain-HTTP listener of their own (`--metrics-listen`): the mail
//! worker's deliveries, failed attempts and dropped messages by notice kind, and the
//! outbox's backlog, read from the database at each scrape. No label holds an address, a
//! user or a tenant.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::state::AppState;

/// The exposition of every metric, with the outbox backlog as of now.
pub async fn render(state: &AppState) -> Result<String> {
    let mut registry = Registry::with_prefix("tenantry_api");
    state.mailer.stats.register(&mut registry);
    let now = state.now_ms();
    let (pending, oldest_ms) = state.store.outbox_backlog().await?;
    let pending_gauge = Gauge::<i64>::default();
    pending_gauge.set(pending);
    registry.register(
        "mail_outbox_pending",
        "Mail in the outbox not sent yet (waiting, or retrying after a failure)",
        pending_gauge,
    );
    let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    #[allow(clippy::cast_precision_loss)] // milliseconds of an age: far below 2^52
    age.set(oldest_ms.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0));
    registry.register(
        "mail_outbox_oldest_pending_age_seconds",
        "Age of the oldest unsent mail (0 when none waits)",
        age,
    );
    if let Some(settings) = &state.backup {
        register_backups(&mut registry, settings, now)?;
    }
    let mut out = String::new();
    encode(&mut out, &registry).map_err(|_| Error::Config("metrics encoding".into()))?;
    Ok(out)
}

/// The newest backup of each kind (and local tenant) under `--backup-dir`: its age, and
/// whether it is stale (older than twice the interval; a missing control database backup
/// counts as stale).
fn register_backups(
    registry: &mut Registry,
    settings: &crate::backup::BackupSettings,
    now: i64,
) -> Result<()> {
    use prometheus_client::metrics::family::Family;
    type Labels = Vec<(&'static str, String)>;
    let newest = crate::backup::newest(&settings.dir, settings.interval, now)?;
    let age = Family::<Labels, Gauge>::default();
    let stale = Family::<Labels, Gauge>::default();
    let labels = |kind: tenantry_backup::Kind, tenant: Option<&str>| -> Labels {
        vec![
            ("kind", kind.as_str().to_owned()),
            ("tenant", tenant.unwrap_or_default().to_owned()),
        ]
    };
    for n in &newest {
        let l = labels(n.kind, n.tenant_id.as_deref());
        age.get_or_create(&l)
            .set(i64::try_from(n.age_seconds).unwrap_or(i64::MAX));
        stale.get_or_create(&l).set(i64::from(n.stale));
    }
    if !newest
        .iter()
        .any(|n| n.kind == tenantry_backup::Kind::ControlDatabase)
    {
        stale
            .get_or_create(&labels(tenantry_backup::Kind::ControlDatabase, None))
            .set(1);
    }
    registry.register(
        "backup_age_seconds",
        "Age of the newest backup of each kind (and tenant) in --backup-dir",
        age,
    );
    registry.register(
        "backup_stale",
        "1 when the newest backup of a kind (and tenant) is older than twice --backup-interval, or missing",
        stale,
    );
    Ok(())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match render(&state).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: could not read the outbox backlog");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable\n",
            )
                .into_response()
        }
    }
}

/// Binds `addr` and serves `/metrics` until `stop` is cancelled; returns the bound address
/// (for port 0) once listening. A taken address is an error at start, not a silent gap.
pub async fn start(
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        what: format!("binding the metrics listener {addr}"),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        what: "reading the metrics listener's address".into(),
        source,
    })?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state);
    let server = async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    };
    Ok((local, server))
}
