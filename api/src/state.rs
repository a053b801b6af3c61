//! What every service shares: the store, the keys, the clock, the limits and the policy
//! settings, plus the bounded pool that runs password hashing off the async threads.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::SecretString;
use tenantry_proto::phase::TenantPhase;
use tokio_util::task::TaskTracker;

use crate::access::AccessPolicy;
use crate::clock::{Clock, duration_ms};
use crate::error::{Error, Result};
use crate::keyring::ServerKeyRing;
use crate::lockout::RateLimiter;
use crate::password::PasswordHasher;
use crate::provision::{Provisioner, TenantSpec};
use crate::store::{AuditRecord, Store, TenantRow};

/// Session and step-up policy.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    /// A session unused this long ends.
    pub idle_timeout: Duration,
    /// A session ends this long after login, used or not.
    pub absolute_timeout: Duration,
    /// Admin rpcs need a second factor verified at most this long ago.
    pub admin_mfa_max_age: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            admin_mfa_max_age: Duration::from_secs(15 * 60),
        }
    }
}

impl SessionPolicy {
    /// How stale `last_seen` may get before a request writes it again: a tenth of the idle
    /// timeout, at most a minute. Saves a write per request; the idle timeout is honoured
    /// to within this granularity.
    pub fn touch_granularity_ms(&self) -> i64 {
        (duration_ms(self.idle_timeout) / 10).min(60_000)
    }
}

/// Shared server state.
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Password hashing.
    pub hasher: PasswordHasher,
    /// Encrypts TOTP secrets at rest: the master key ring.
    pub master_key: ServerKeyRing,
    /// How often the key ring file and the primary key are looked at.
    pub master_key_reload: Duration,
    /// The time.
    pub clock: Arc<dyn Clock>,
    /// Timeouts.
    pub sessions: SessionPolicy,
    /// Per-source limit on credential-checking rpcs.
    pub rate_limiter: RateLimiter,
    /// Issuer shown in authenticator apps.
    pub totp_issuer: String,
    /// The instance-token signing keys.
    pub token_keys: Arc<crate::token_keys::TokenKeyRing>,
    /// How often the key ring is reread and its public set republished.
    pub token_key_refresh: Duration,
    /// Lifetime of instance tokens.
    pub instance_token_ttl: Duration,
    /// Runs tenant instances.
    pub provisioner: Arc<dyn Provisioner>,
    /// Grant lifetimes and the access review schedule.
    pub access: AccessPolicy,
    /// Proxies whose `x-forwarded-for` the API believes.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// Signs and sends the outbox's mail.
    pub mailer: Arc<crate::mail::Mailer>,
    /// Instances wait for their owner's verified address.
    pub require_email_verification: bool,
    /// Owners hear of an instance Degraded this long.
    pub notify_degraded_after: Duration,
    /// Where `/metrics` is served (`--metrics-listen`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The address `/metrics` is bound to, once serving (port 0 picks one).
    pub metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// Scheduled backups (`--backup-dir`), if any.
    pub backup: Option<crate::backup::BackupSettings>,
    /// Password verifications run (real or dummy), for tests that check a failure path
    /// did the same work as another.
    password_checks: AtomicU64,
    /// Runs argon2 on one thread per core (each hash holds 19 MiB or more).
    hashing: crate::password::HashingPool,
    /// Every background task a request started (provisioning), so that shutdown waits
    /// for them instead of leaving them running.
    pub tasks: TaskTracker,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// Parts of [`AppState`] chosen by configuration.
pub struct StateParts {
    /// The database.
    pub store: Store,
    /// Password hashing.
    pub hasher: PasswordHasher,
    /// Encrypts TOTP secrets at rest: the master key ring.
    pub master_key: ServerKeyRing,
    /// How often the key ring file and the primary key are looked at.
    pub master_key_reload: Duration,
    /// The time.
    pub clock: Arc<dyn Clock>,
    /// Timeouts.
    pub sessions: SessionPolicy,
    /// Per-source limit on credential-checking rpcs.
    pub rate_limiter: RateLimiter,
    /// Issuer shown in authenticator apps.
    pub totp_issuer: String,
    /// The instance-token signing keys.
    pub token_keys: Arc<crate::token_keys::TokenKeyRing>,
    /// How often the key ring is reread and its public set republished.
    pub token_key_refresh: Duration,
    /// Lifetime of instance tokens.
    pub instance_token_ttl: Duration,
    /// Runs tenant instances.
    pub provisioner: Arc<dyn Provisioner>,
    /// Grant lifetimes and the access review schedule.
    pub access: AccessPolicy,
    /// Proxies whose `x-forwarded-for` the API believes.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// Signs and sends the outbox's mail.
    pub mailer: Arc<crate::mail::Mailer>,
    /// Instances wait for their owner's verified address.
    pub require_email_verification: bool,
    /// Owners hear of an instance Degraded this long.
    pub notify_degraded_after: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Scheduled backups (`--backup-dir`), if any.
    pub backup: Option<crate::backup::BackupSettings>,
}

impl AppState {
    /// Builds the state; hashing runs on as many threads as there are cores.
    pub fn new(p: StateParts) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Ok(AppState {
            store: p.store,
            hasher: p.hasher,
            master_key: p.master_key,
            master_key_reload: p.master_key_reload,
            clock: p.clock,
            sessions: p.sessions,
            rate_limiter: p.rate_limiter,
            totp_issuer: p.totp_issuer,
            token_keys: p.token_keys,
            token_key_refresh: p.token_key_refresh,
            instance_token_ttl: p.instance_token_ttl,
            provisioner: p.provisioner,
            access: p.access,
            trusted_proxies: p.trusted_proxies,
            mailer: p.mailer,
            require_email_verification: p.require_email_verification,
            notify_degraded_after: p.notify_degraded_after,
            metrics_listen: p.metrics_listen,
            backup: p.backup,
            metrics_addr: std::sync::OnceLock::new(),
            password_checks: AtomicU64::new(0),
            hashing: crate::password::HashingPool::new(cores)?,
            tasks: TaskTracker::new(),
        })
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs a password hash or verification on the hashing threads.
    pub async fn hashing<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&PasswordHasher) -> Result<T> + Send + 'static,
    {
        // The job holds a copy of the hasher, not the state: the state's last reference
        // must never be dropped on a hashing thread, outside the runtime.
        let hasher = self.hasher.clone();
        self.hashing.run(move || f(&hasher)).await?
    }

    /// Verifies a password (or burns the same time when there is no stored hash).
    pub async fn verify_password(
        self: &Arc<Self>,
        password: SecretString,
        stored: Option<String>,
    ) -> Result<bool> {
        self.password_checks.fetch_add(1, Ordering::Relaxed);
        self.hashing(move |h| match stored {
            Some(stored) => h.verify(&password, &stored),
            None => h.verify_dummy(&password).map(|()| false),
        })
        .await
    }

    /// How many password verifications ([`Self::verify_password`]) have run.
    pub fn password_checks(&self) -> u64 {
        self.password_checks.load(Ordering::Relaxed)
    }

    /// Takes a rate-limit token for `source`.
    pub fn rate_limit(&self, source: Option<IpAddr>) -> Result<()> {
        self.rate_limiter
            .check(source, self.now_ms())
            .map_err(|retry_after| Error::ResourceExhausted {
                what: "too many requests from this address",
                retry_after,
            })
    }

    /// Converges the instance of a stored tenant to what its row asks for, in the
    /// background. A tenant awaiting its owner's verification gets nothing, whatever
    /// changed (suspension, retention): `VerifyEmail` provisions it.
    pub fn provision(self: &Arc<Self>, tenant: &TenantRow) {
        if tenant.phase != TenantPhase::AwaitingVerification {
            self.provision_spec(TenantSpec::from_row(tenant));
        }
    }

    /// Converges the tenant's instance to `spec`, in the background; a failure is logged
    /// and retried by the reconcile loop.
    pub fn provision_spec(self: &Arc<Self>, spec: TenantSpec) {
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            if let Err(e) = me.provisioner.ensure(&spec).await {
                tracing::warn!(tenant_id = %spec.id, error = %e, "provisioning failed; will retry");
            }
        });
    }

    /// Writes an audit row on its own; a failure is logged, not returned, because the
    /// action it records has already happened.
    pub async fn audit(&self, record: AuditRecord) {
        if let Err(e) = self.store.audit(&record, self.now_ms()).await {
            tracing::error!(error = %e, action = record.action, "could not write audit event");
        }
    }
}
