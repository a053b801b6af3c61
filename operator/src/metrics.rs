//! Prometheus metrics and the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use jiff::Timestamp;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use tenantry_kube::crd::TenantPhase;

type Labels = Vec<(String, String)>;

/// The operator's metrics. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<Labels, Counter>,
    duration: Histogram,
    writes: Counter,
    dry_runs: Counter,
    tenants: Family<Labels, Gauge>,
    cert_expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    backup_age: Family<Labels, Gauge<f64, AtomicU64>>,
    backup_stale: Family<Labels, Gauge>,
    last_backups: Mutex<HashMap<String, Option<Timestamp>>>,
    phases: Mutex<HashMap<String, TenantPhase>>,
    not_after: Mutex<HashMap<String, Timestamp>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tenantry_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by cause",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        let writes = Counter::default();
        registry.register(
            "api_writes",
            "Writes sent to the API server",
            writes.clone(),
        );
        let dry_runs = Counter::default();
        registry.register(
            "api_dry_runs",
            "Server-side dry-run applies sent to tell defaulting from drift",
            dry_runs.clone(),
        );
        let tenants = Family::<Labels, Gauge>::default();
        registry.register("tenants", "Tenants by phase", tenants.clone());
        let cert_expiry = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each tenant's certificate expires",
            cert_expiry.clone(),
        );
        let backup_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "backup_age_seconds",
            "Age of the newest backup each tenant with spec.backup reported",
            backup_age.clone(),
        );
        let backup_stale = Family::<Labels, Gauge>::default();
        registry.register(
            "backup_stale",
            "1 while a tenant's BackupStale condition is True",
            backup_stale.clone(),
        );
        Metrics {
            registry,
            backup_age,
            backup_stale,
            last_backups: Mutex::default(),
            reconciles,
            errors,
            duration,
            writes,
            dry_runs,
            tenants,
            cert_expiry,
            phases: Mutex::default(),
            not_after: Mutex::default(),
            ready: AtomicBool::new(false),
        }
    }

    /// Counts one reconcile of `elapsed`.
    pub fn reconciled(&self, elapsed: Duration) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, cause: &str) {
        self.errors
            .get_or_create(&vec![("cause".to_owned(), cause.to_owned())])
            .inc();
    }

    /// Counts one write to the API server.
    pub fn wrote(&self) {
        self.writes.inc();
    }

    /// Counts one dry-run apply.
    pub fn dry_run(&self) {
        self.dry_runs.inc();
    }

    /// Dry-run applies sent so far.
    pub fn dry_runs(&self) -> u64 {
        self.dry_runs.get()
    }

    /// Writes sent so far.
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    /// Reconciles run so far.
    pub fn reconcile_count(&self) -> u64 {
        self.reconciles.get()
    }

    /// Records the phase of `tenant` (None once it is gone).
    pub fn set_phase(&self, tenant: &str, phase: Option<TenantPhase>) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        match phase {
            Some(p) => phases.insert(tenant.to_owned(), p),
            None => phases.remove(tenant),
        };
        for p in TenantPhase::ALL {
            let n = phases.values().filter(|v| **v == p).count();
            self.tenants
                .get_or_create(&vec![("phase".to_owned(), p.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records when the certificate of `tenant` expires (None once it is gone).
    pub fn set_certificate(&self, tenant: &str, not_after: Option<Timestamp>) {
        let Ok(mut map) = self.not_after.lock() else {
            return;
        };
        match not_after {
            Some(t) => {
                map.insert(tenant.to_owned(), t);
            }
            None => {
                map.remove(tenant);
                self.cert_expiry
                    .remove(&vec![("tenant".to_owned(), tenant.to_owned())]);
            }
        }
    }

    /// Records the backup state of `tenant`: `Some((newest, stale))` with `spec.backup`,
    /// `None` without it (or once the tenant is gone).
    pub fn set_backup(&self, tenant: &str, state: Option<(Option<Timestamp>, bool)>) {
        let Ok(mut map) = self.last_backups.lock() else {
            return;
        };
        let labels = vec![("tenant".to_owned(), tenant.to_owned())];
        match state {
            Some((newest, stale)) => {
                map.insert(tenant.to_owned(), newest);
                self.backup_stale
                    .get_or_create(&labels)
                    .set(i64::from(stale));
                if newest.is_none() {
                    self.backup_age.remove(&labels);
                }
            }
            None => {
                map.remove(tenant);
                self.backup_age.remove(&labels);
                self.backup_stale.remove(&labels);
            }
        }
    }

    /// Marks the operator ready (CRD found, caches synced).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The text exposition, with expiry gauges computed at `now`.
    pub fn render(&self, now: Timestamp) -> String {
        if let Ok(map) = self.not_after.lock() {
            for (tenant, not_after) in map.iter() {
                let secs = not_after.duration_since(now).as_secs_f64();
                self.cert_expiry
                    .get_or_create(&vec![("tenant".to_owned(), tenant.clone())])
                    .set(secs);
            }
        }
        if let Ok(map) = self.last_backups.lock() {
            for (tenant, newest) in map.iter() {
                if let Some(t) = newest {
                    self.backup_age
                        .get_or_create(&vec![("tenant".to_owned(), tenant.clone())])
                        .set(now.duration_since(*t).as_secs_f64());
                }
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(Timestamp::now()),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The admin router.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

/// Serves the admin router on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Admin)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_metric() {
        let m = Metrics::new();
        m.reconciled(Duration::from_millis(3));
        m.failed("kube");
        m.wrote();
        m.set_phase("a", Some(TenantPhase::Ready));
        m.set_phase("b", Some(TenantPhase::Ready));
        m.set_phase("b", None);
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        m.set_certificate("a", Some("2026-01-01T01:00:00Z".parse().unwrap()));
        let text = m.render(now);
        for needle in [
            "tenantry_operator_reconciles_total 1",
            "tenantry_operator_reconcile_errors_total{cause=\"kube\"} 1",
            "tenantry_operator_reconcile_duration_seconds_count 1",
            "tenantry_operator_api_writes_total 1",
            "tenantry_operator_tenants{phase=\"Ready\"} 1",
            "tenantry_operator_certificate_expiry_seconds{tenant=\"a\"} 3600",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }

    #[tokio::test]
    async fn admin_endpoints_answer() {
        let m = Arc::new(Metrics::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.clone(), async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get("/metrics")
                .await
                .contains("tenantry_operator_reconciles_total")
        );
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
