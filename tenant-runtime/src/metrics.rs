//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! `/metrics` needs no token: scrapers do not hold short-lived tenant tokens, and what it
//! exposes is aggregate counts only (requests by route and status, pruned and stored
//! execution counts, OAuth 2 connects, refreshes and revocations by result, data keys held and
//! shredded, and the key-encryption key's id, a fingerprint) with no record ids, names,
//! payloads or secrets. Network policy limits who
//! can reach the runtime port at all.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a request count: method, route template, status code.
pub type RequestLabels = Vec<(&'static str, String)>;

/// Every metric the runtime records.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests served, by method, route template and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Executions deleted by retention, by reason (`age` or `count`).
    pub pruned: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Completed prune runs.
    pub prune_runs: Counter,
    /// Prune runs that stopped on an error.
    pub prune_failures: Counter,
    /// Executions currently stored.
    pub stored_executions: Gauge,
    /// Serving certificates loaded after start (rotations).
    pub certificate_reloads: Counter,
    /// OAuth 2 authorizations completed.
    pub oauth2_connects: Counter,
    /// OAuth 2 refreshes, by result (`ok`, `failed`, `invalid_grant`).
    pub oauth2_refreshes: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Revocations at the provider on delete, by result (`confirmed`, `failed`).
    pub oauth2_revocations: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Scheduled backups written.
    pub backups: Counter,
    /// Scheduled backups that failed.
    pub backup_failures: Counter,
    /// When the newest backup's snapshot was taken (Unix seconds; 0: none yet).
    pub last_backup: Gauge,
    /// Execution data keys deleted by retention (crypto-shredding).
    pub data_keys_shredded: Counter,
    /// Data keys held in the key store.
    pub data_keys: Gauge,
    /// Key-store entries wrapped by another KEK than the data key file's (0 once a
    /// rotation is complete; the operator waits for it before dropping the previous key).
    pub data_keys_wrapped_by_other_kek: Gauge,
    /// 1, labelled with the id (a fingerprint) of the KEK in use.
    pub kek_info: Family<Vec<(&'static str, String)>, Gauge>,
    /// KEK rotations applied live.
    pub kek_rotations: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tenant_runtime` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tenant_runtime");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests served", requests.clone());
        let pruned = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "pruned_executions",
            "Executions deleted by the retention policy",
            pruned.clone(),
        );
        let prune_runs = Counter::default();
        registry.register(
            "prune_runs",
            "Completed retention prune runs",
            prune_runs.clone(),
        );
        let prune_failures = Counter::default();
        registry.register(
            "prune_failures",
            "Retention prune runs that stopped on an error",
            prune_failures.clone(),
        );
        let stored_executions = Gauge::default();
        registry.register(
            "stored_executions",
            "Executions currently stored",
            stored_executions.clone(),
        );
        let certificate_reloads = Counter::default();
        registry.register(
            "certificate_reloads",
            "Serving certificates loaded after start",
            certificate_reloads.clone(),
        );
        let oauth2_connects = Counter::default();
        registry.register(
            "oauth2_connects",
            "OAuth 2 authorizations completed",
            oauth2_connects.clone(),
        );
        let oauth2_refreshes = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "oauth2_refreshes",
            "OAuth 2 access-token refreshes by result",
            oauth2_refreshes.clone(),
        );
        let oauth2_revocations = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register(
            "oauth2_revocations",
            "Revocations at the provider when a grant is deleted, by result",
            oauth2_revocations.clone(),
        );
        let backups = Counter::default();
        registry.register("backups", "Scheduled backups written", backups.clone());
        let backup_failures = Counter::default();
        registry.register(
            "backup_failures",
            "Scheduled backups that failed",
            backup_failures.clone(),
        );
        let last_backup = Gauge::default();
        registry.register(
            "last_backup_timestamp_seconds",
            "When the newest backup's snapshot was taken (Unix seconds; 0 before the first)",
            last_backup.clone(),
        );
        let data_keys_shredded = Counter::default();
        registry.register(
            "data_keys_shredded",
            "Execution data keys deleted once retention expired their period",
            data_keys_shredded.clone(),
        );
        let data_keys = Gauge::default();
        registry.register("data_keys", "Data keys in the key store", data_keys.clone());
        let data_keys_wrapped_by_other_kek = Gauge::default();
        registry.register(
            "data_keys_wrapped_by_other_kek",
            "Key-store entries wrapped by another key-encryption key than the current one",
            data_keys_wrapped_by_other_kek.clone(),
        );
        let kek_info = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "kek_info",
            "The key-encryption key in use, by id (a fingerprint, not the key)",
            kek_info.clone(),
        );
        let kek_rotations = Counter::default();
        registry.register(
            "kek_rotations",
            "Key-encryption key rotations applied while running",
            kek_rotations.clone(),
        );
        Metrics {
            registry,
            data_keys_shredded,
            data_keys,
            data_keys_wrapped_by_other_kek,
            kek_info,
            kek_rotations,
            backups,
            backup_failures,
            last_backup,
            oauth2_connects,
            oauth2_refreshes,
            oauth2_revocations,
            requests,
            pruned,
            prune_runs,
            prune_failures,
            stored_executions,
            certificate_reloads,
        }
    }

    /// Counts `n` executions pruned for `reason`.
    pub fn add_pruned(&self, reason: &'static str, n: u64) {
        self.pruned
            .get_or_create(&vec![("reason", reason)])
            .inc_by(n);
        // Every insert and delete moves the gauge by one; a prune moves it by what it
        // deleted. Setting it from a count instead would race with requests in flight.
        self.stored_executions
            .dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the key-store gauges from `keys`.
    pub fn observe_keys(&self, keys: &crate::keystore::Keyring) {
        let current = keys.kek_id().0;
        self.kek_info.clear();
        self.kek_info
            .get_or_create(&vec![("kek_id", current)])
            .set(1);
        self.data_keys
            .set(i64::try_from(keys.len()).unwrap_or(i64::MAX));
        self.data_keys_wrapped_by_other_kek
            .set(i64::try_from(keys.wrapped_by_other_kek()).unwrap_or(i64::MAX));
    }

    /// Counts one OAuth 2 refresh with `result`.
    pub fn add_refresh(&self, result: &'static str) {
        self.oauth2_refreshes
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// Counts one revocation at a provider with `result`.
    pub fn add_revocation(&self, result: &'static str) {
        self.oauth2_revocations
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
