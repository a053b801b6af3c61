//! The database: SQLite (embedded, the default) or PostgreSQL, through sqlx's `Any` driver
//! with portable SQL. Every query lives here; services never write SQL.
//!
//! Write transactions on SQLite start with `BEGIN IMMEDIATE` so that concurrent writers
//! queue on the busy timeout instead of failing when a read lock cannot be upgraded.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row, Transaction};

use crate::audit::{self, AuditEntry, ChainVerifier};
use crate::error::{Error, Result};
use crate::lockout::LockState;
use crate::migrations::MIGRATIONS;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The backend a database URL names; anything but SQLite or PostgreSQL is refused.
    pub fn of_url(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::Config(
                "database URL must start with sqlite:// or postgres://".into(),
            ))
        }
    }
}

/// A user row.
#[derive(Clone)]
pub struct UserRow {
    /// Id.
    pub id: String,
    /// Normalized email.
    pub email: String,
    /// PHC string.
    pub password_hash: String,
    /// Admin role.
    pub is_admin: bool,
    /// Password failures.
    pub login_lock: LockState,
    /// Second-factor failures.
    pub mfa_lock: LockState,
    /// Confirmed TOTP secret, sealed with the master key.
    pub totp_secret_sealed: Option<String>,
    /// Unconfirmed TOTP secret, sealed with the master key.
    pub totp_pending_sealed: Option<String>,
    /// Last accepted TOTP step.
    pub totp_last_step: i64,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("is_admin", &self.is_admin)
            .finish_non_exhaustive()
    }
}

/// A tenant row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    /// Id.
    pub id: String,
    /// DNS-label name.
    pub name: String,
    /// Owner.
    pub owner_user_id: String,
    /// Plan name.
    pub plan: String,
    /// Phase name (`Pending`, `Provisioning`, …).
    pub phase: String,
    /// Suspended by an admin.
    pub suspended: bool,
    /// Retention hours.
    pub retention_max_age_hours: i64,
    /// Retention count.
    pub retention_max_count: i64,
    /// HTTPS endpoint.
    pub endpoint: String,
    /// Certificate serial.
    pub cert_serial: String,
    /// Certificate end of validity, Unix ms (0 = none).
    pub cert_not_after_ms: i64,
    /// Certificate renewal time, Unix ms (0 = none).
    pub cert_renewal_ms: i64,
    /// Phase detail.
    pub message: String,
    /// Creation time.
    pub created_at_ms: i64,
}

/// What a provisioner observed about a tenant's instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantStatus {
    /// Phase name.
    pub phase: String,
    /// HTTPS endpoint, empty when not serving.
    pub endpoint: String,
    /// Certificate serial, empty when none.
    pub cert_serial: String,
    /// Certificate end of validity, Unix ms.
    pub cert_not_after_ms: i64,
    /// Certificate renewal time, Unix ms.
    pub cert_renewal_ms: i64,
    /// Detail for humans.
    pub message: String,
}

/// A live session joined with its user.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// SHA-256 of the token.
    pub token_hash: String,
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// The user's admin role.
    pub is_admin: bool,
    /// The user has a confirmed TOTP secret.
    pub mfa_enrolled: bool,
    /// Last use.
    pub last_seen_ms: i64,
    /// Absolute expiry.
    pub expires_at_ms: i64,
    /// When this session verified a second factor.
    pub mfa_verified_at_ms: Option<i64>,
    /// The user's tenants, sorted.
    pub tenant_ids: Vec<String>,
}

/// Which credential a failure counter is for; each locks on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// The password (login and password change).
    Password,
    /// The second factor (TOTP or recovery code).
    Mfa,
}

/// A new audit row, before it is chained.
#[derive(Debug, Clone, Default)]
pub struct AuditRecord {
    /// What happened.
    pub action: &'static str,
    /// The acting user, empty when unknown.
    pub actor_user_id: String,
    /// What it was about.
    pub target: String,
    /// Whether it succeeded.
    pub success: bool,
    /// The caller's address.
    pub source: String,
    /// Extra non-secret JSON.
    pub detail_json: String,
}

/// A stored audit row.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// The chained content.
    pub entry: AuditEntry,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

/// What signup writes.
#[derive(Debug, Clone)]
pub struct NewSignup {
    /// New user id.
    pub user_id: String,
    /// Normalized email.
    pub email: String,
    /// PHC string.
    pub password_hash: String,
    /// New tenant id.
    pub tenant_id: String,
    /// Tenant name.
    pub tenant_name: String,
    /// Plan name.
    pub plan: String,
    /// Initial phase.
    pub phase: String,
    /// Initial retention.
    pub retention_max_age_hours: i64,
    /// Initial retention.
    pub retention_max_count: i64,
    /// Now.
    pub now_ms: i64,
}

/// Outcome of a signup insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignupOutcome {
    /// Written.
    Created,
    /// The email is taken.
    EmailTaken,
    /// The tenant name is taken.
    TenantNameTaken,
}

/// The database handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

const SESSION_SQL_SQLITE: &str = "SELECT s.token_hash, s.user_id, u.email, u.is_admin, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END AS mfa_enrolled, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT group_concat(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids \
    FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1";

const SESSION_SQL_POSTGRES: &str = "SELECT s.token_hash, s.user_id, u.email, u.is_admin, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END::BIGINT AS mfa_enrolled, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT string_agg(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids \
    FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1";

const USER_COLUMNS: &str = "id, email, password_hash, is_admin, login_failures, login_lockouts, \
    login_locked_until_ms, mfa_failures, mfa_lockouts, mfa_locked_until_ms, totp_secret_sealed, \
    totp_pending_sealed, totp_last_step";

const TENANT_COLUMNS: &str = "id, name, owner_user_id, plan, phase, suspended, \
    retention_max_age_hours, retention_max_count, endpoint, cert_serial, cert_not_after_ms, \
    cert_renewal_ms, message, created_at_ms";

fn user_from_row(row: &AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        login_lock: LockState {
            failures: row.try_get("login_failures")?,
            lockouts: row.try_get("login_lockouts")?,
            locked_until_ms: row.try_get("login_locked_until_ms")?,
        },
        mfa_lock: LockState {
            failures: row.try_get("mfa_failures")?,
            lockouts: row.try_get("mfa_lockouts")?,
            locked_until_ms: row.try_get("mfa_locked_until_ms")?,
        },
        totp_secret_sealed: row.try_get("totp_secret_sealed")?,
        totp_pending_sealed: row.try_get("totp_pending_sealed")?,
        totp_last_step: row.try_get("totp_last_step")?,
    })
}

fn tenant_from_row(row: &AnyRow) -> Result<TenantRow> {
    Ok(TenantRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        owner_user_id: row.try_get("owner_user_id")?,
        plan: row.try_get("plan")?,
        phase: row.try_get("phase")?,
        suspended: row.try_get::<i64, _>("suspended")? != 0,
        retention_max_age_hours: row.try_get("retention_max_age_hours")?,
        retention_max_count: row.try_get("retention_max_count")?,
        endpoint: row.try_get("endpoint")?,
        cert_serial: row.try_get("cert_serial")?,
        cert_not_after_ms: row.try_get("cert_not_after_ms")?,
        cert_renewal_ms: row.try_get("cert_renewal_ms")?,
        message: row.try_get("message")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

fn audit_from_row(row: &AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        entry: AuditEntry {
            sequence: row.try_get("sequence")?,
            at_ms: row.try_get("at_ms")?,
            action: row.try_get("action")?,
            actor_user_id: row.try_get("actor_user_id")?,
            target: row.try_get("target")?,
            outcome: row.try_get("outcome")?,
            source: row.try_get("source")?,
            detail_json: row.try_get("detail_json")?,
        },
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Some(db.message().to_owned()),
        _ => None,
    }
}

fn dyn_sql(sql: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql)
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://…`), creating a SQLite file if
    /// missing, and applies pending migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| Error::Config(format!("invalid database URL: {e}")))?;
        let mut pool_options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5));
        if backend == Backend::Sqlite {
            pool_options = pool_options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::raw_sql(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                    )
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            });
        }
        let pool = pool_options
            .connect_with(options)
            .await
            .map_err(Error::Unavailable)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Any>> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            // Several API replicas may start at once; one migrates, the others wait.
            sqlx::query("SELECT pg_advisory_xact_lock(7355608201)")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await?;
        for m in MIGRATIONS.iter().filter(|m| m.version > applied) {
            let sql = match self.backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|source| Error::Migration {
                    version: m.version,
                    source,
                })?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, description, applied_at_ms) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.description)
            .bind(crate::clock::Clock::now_ms(&crate::clock::SystemClock))
            .execute(&mut *tx)
            .await?;
            tracing::info!(
                version = m.version,
                description = m.description,
                "applied migration"
            );
        }
        tx.commit().await?;
        Ok(())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    // ---- users ----

    /// Writes a user, their tenant, the owner membership and the audit row in one
    /// transaction.
    pub async fn create_signup(&self, s: &NewSignup, audit: &AuditRecord) -> Result<SignupOutcome> {
        let mut tx = self.begin_write().await?;
        let user = sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&s.user_id)
        .bind(&s.email)
        .bind(&s.password_hash)
        .bind(s.now_ms)
        .execute(&mut *tx)
        .await;
        if let Err(e) = user {
            return match is_unique_violation(&e) {
                Some(_) => Ok(SignupOutcome::EmailTaken),
                None => Err(e.into()),
            };
        }
        let tenant = sqlx::query(
            "INSERT INTO tenants (id, name, owner_user_id, plan, phase, retention_max_age_hours, \
             retention_max_count, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&s.tenant_id)
        .bind(&s.tenant_name)
        .bind(&s.user_id)
        .bind(&s.plan)
        .bind(&s.phase)
        .bind(s.retention_max_age_hours)
        .bind(s.retention_max_count)
        .bind(s.now_ms)
        .execute(&mut *tx)
        .await;
        if let Err(e) = tenant {
            return match is_unique_violation(&e) {
                Some(_) => Ok(SignupOutcome::TenantNameTaken),
                None => Err(e.into()),
            };
        }
        sqlx::query("INSERT INTO memberships (user_id, tenant_id, role) VALUES ($1, $2, 'owner')")
            .bind(&s.user_id)
            .bind(&s.tenant_id)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, audit, s.now_ms).await?;
        tx.commit().await?;
        Ok(SignupOutcome::Created)
    }

    /// Creates a user without a tenant (bootstrap of the first admin).
    pub async fn create_user(
        &self,
        id: &str,
        email: &str,
        password_hash: &str,
        is_admin: bool,
        now_ms: i64,
        audit: &AuditRecord,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "INSERT INTO users (id, email, password_hash, is_admin, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(email)
        .bind(password_hash)
        .bind(i64::from(is_admin))
        .bind(now_ms)
        .execute(&mut *tx)
        .await;
        if let Err(e) = res {
            return match is_unique_violation(&e) {
                Some(_) => Ok(false),
                None => Err(e.into()),
            };
        }
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The user with this (normalized) email.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query(dyn_sql(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
        )))
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The user with this id.
    pub async fn user_by_id(&self, id: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query(dyn_sql(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Stores new failure counters for one factor, and the audit row(s) for the failure.
    pub async fn record_failure(
        &self,
        factor: Factor,
        user_id: &str,
        state: LockState,
        audits: &[AuditRecord],
        now_ms: i64,
    ) -> Result<()> {
        let sql = match factor {
            Factor::Password => {
                "UPDATE users SET login_failures = $1, login_lockouts = $2, login_locked_until_ms = $3 WHERE id = $4"
            }
            Factor::Mfa => {
                "UPDATE users SET mfa_failures = $1, mfa_lockouts = $2, mfa_locked_until_ms = $3 WHERE id = $4"
            }
        };
        let mut tx = self.begin_write().await?;
        sqlx::query(sql)
            .bind(state.failures)
            .bind(state.lockouts)
            .bind(state.locked_until_ms)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        for a in audits {
            append_audit(&mut tx, a, now_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Resets password-failure counters, optionally stores a rehashed password, creates the
    /// session, and audits the login, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_login_success(
        &self,
        user_id: &str,
        new_hash: Option<&str>,
        token_hash: &str,
        expires_at_ms: i64,
        source: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE users SET login_failures = 0, login_lockouts = 0, login_locked_until_ms = 0, \
             password_hash = COALESCE($1, password_hash) WHERE id = $2",
        )
        .bind(new_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, created_at_ms, last_seen_ms, expires_at_ms, source) \
             VALUES ($1, $2, $3, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(now_ms)
        .bind(expires_at_ms)
        .bind(source)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the password hash and ends every session of the user.
    pub async fn set_password(
        &self,
        user_id: &str,
        hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets the admin role and ends the user's sessions. Refuses (returns `Ok(false)`) to
    /// remove the last admin. `Err(NotFound)` for an unknown user.
    pub async fn set_admin(
        &self,
        user_id: &str,
        admin: bool,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query("UPDATE users SET is_admin = $1 WHERE id = $2")
            .bind(i64::from(admin))
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(Error::NotFound("user"));
        }
        if !admin {
            let admins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE is_admin = 1")
                .fetch_one(&mut *tx)
                .await?;
            if admins == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    // ---- sessions ----

    /// The session with this token hash, joined with its user.
    pub async fn session(&self, token_hash: &str) -> Result<Option<SessionRow>> {
        // One round trip per authenticated request: the caller's tenants come along.
        let sql = match self.backend {
            Backend::Sqlite => SESSION_SQL_SQLITE,
            Backend::Postgres => SESSION_SQL_POSTGRES,
        };
        let row = sqlx::query(sql)
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let tenant_ids: Option<String> = row.try_get("tenant_ids")?;
        let mut tenant_ids: Vec<String> = tenant_ids
            .unwrap_or_default()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect();
        tenant_ids.sort();
        Ok(Some(SessionRow {
            token_hash: row.try_get("token_hash")?,
            user_id: row.try_get("user_id")?,
            email: row.try_get("email")?,
            is_admin: row.try_get::<i64, _>("is_admin")? != 0,
            mfa_enrolled: row.try_get::<i64, _>("mfa_enrolled")? != 0,
            last_seen_ms: row.try_get("last_seen_ms")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            mfa_verified_at_ms: row.try_get("mfa_verified_at_ms")?,
            tenant_ids,
        }))
    }

    /// Records use of a session.
    pub async fn touch_session(&self, token_hash: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET last_seen_ms = $1 WHERE token_hash = $2 AND last_seen_ms < $1",
        )
        .bind(now_ms)
        .bind(token_hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends one session; audits it when a record is given.
    pub async fn delete_session(
        &self,
        token_hash: &str,
        audit: Option<&AuditRecord>,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        if let Some(a) = audit {
            append_audit(&mut tx, a, now_ms).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends every session of a user; returns how many.
    pub async fn delete_user_sessions(
        &self,
        user_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(Error::NotFound("user"));
        }
        let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes sessions past their absolute expiry or idle since before `idle_before_ms`.
    pub async fn purge_sessions(&self, now_ms: i64, idle_before_ms: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= $1 OR last_seen_ms < $2")
                .bind(now_ms)
                .bind(idle_before_ms)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    // ---- MFA ----

    /// Stores a new unconfirmed TOTP secret.
    pub async fn set_pending_totp(&self, user_id: &str, sealed: &str) -> Result<()> {
        sqlx::query("UPDATE users SET totp_pending_sealed = $1 WHERE id = $2")
            .bind(sealed)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Activates the pending secret (if it is still `pending_sealed`), stores the recovery
    /// code hashes, stamps the session as verified and audits; `Ok(false)` if the pending
    /// secret changed meanwhile or TOTP was already enrolled.
    #[allow(clippy::too_many_arguments)]
    pub async fn confirm_totp(
        &self,
        user_id: &str,
        pending_sealed: &str,
        step: i64,
        recovery_hashes: &[String],
        session_hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE users SET totp_secret_sealed = totp_pending_sealed, totp_pending_sealed = NULL, \
             totp_last_step = $1, mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 \
             WHERE id = $2 AND totp_pending_sealed = $3 AND totp_secret_sealed IS NULL",
        )
        .bind(step)
        .bind(user_id)
        .bind(pending_sealed)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        for h in recovery_hashes {
            sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)")
                .bind(user_id)
                .bind(h)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE sessions SET mfa_verified_at_ms = $1 WHERE token_hash = $2")
            .bind(now_ms)
            .bind(session_hash)
            .execute(&mut *tx)
            .await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Accepts a TOTP step for the user if it is later than the last one accepted (so two
    /// concurrent requests with one code cannot both pass), resets MFA failures, stamps the
    /// session and audits. `Ok(false)` when the step was already used.
    pub async fn accept_totp_step(
        &self,
        user_id: &str,
        step: i64,
        session_hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $1, mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 \
             WHERE id = $2 AND totp_last_step < $1",
        )
        .bind(step)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        stamp_mfa(&mut tx, session_hash, now_ms).await?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Spends a recovery code (by hash) if unused; stamps the session and audits. Returns
    /// the codes left, or `None` when the code is unknown or used.
    pub async fn use_recovery_code(
        &self,
        user_id: &str,
        code_hash: &str,
        session_hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<Option<u32>> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_at_ms = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(user_id)
        .bind(code_hash)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        sqlx::query("UPDATE users SET mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 WHERE id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        stamp_mfa(&mut tx, session_hash, now_ms).await?;
        append_audit(&mut tx, audit, now_ms).await?;
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at_ms IS NULL",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(u32::try_from(left).unwrap_or(0)))
    }

    /// Unused recovery codes of a user.
    pub async fn recovery_codes_left(&self, user_id: &str) -> Result<u32> {
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at_ms IS NULL",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(left).unwrap_or(0))
    }

    // ---- tenants ----

    /// The tenant with this id.
    pub async fn tenant(&self, tenant_id: &str) -> Result<Option<TenantRow>> {
        let row = sqlx::query(dyn_sql(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        )))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    /// The tenant owned by `user_id` with this name (to make signup retries idempotent).
    pub async fn owned_tenant_by_name(
        &self,
        user_id: &str,
        name: &str,
    ) -> Result<Option<TenantRow>> {
        let row = sqlx::query(dyn_sql(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1 AND owner_user_id = $2"
        )))
        .bind(name)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    /// The caller's role in a tenant, with the tenant; `None` when not a member.
    pub async fn membership(
        &self,
        user_id: &str,
        tenant_id: &str,
    ) -> Result<Option<(TenantRow, String)>> {
        let row = sqlx::query(dyn_sql(format!(
            "SELECT {cols}, m.role FROM tenants t JOIN memberships m ON m.tenant_id = t.id \
             WHERE m.user_id = $1 AND t.id = $2",
            cols = TENANT_COLUMNS
                .split(", ")
                .map(|c| format!("t.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(user_id)
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some((tenant_from_row(&row)?, row.try_get("role")?)))
    }

    /// A page of tenants ordered by creation, after the `(created_at_ms, id)` cursor.
    pub async fn list_tenants(
        &self,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<TenantRow>> {
        let (after_ms, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(dyn_sql(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE created_at_ms > $1 OR (created_at_ms = $1 AND id > $2) \
             ORDER BY created_at_ms, id LIMIT $3"
        )))
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// Sets a tenant's retention and audits; returns the updated tenant, or
    /// `Err(NotFound)` if it does not exist.
    pub async fn set_retention(
        &self,
        tenant_id: &str,
        max_age_hours: i64,
        max_count: i64,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<TenantRow> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(dyn_sql(format!(
            "UPDATE tenants SET retention_max_age_hours = $1, retention_max_count = $2, updated_at_ms = $3 \
             WHERE id = $4 RETURNING {TENANT_COLUMNS}"
        )))
        .bind(max_age_hours)
        .bind(max_count)
        .bind(now_ms)
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
        let tenant = tenant_from_row(&row.ok_or(Error::NotFound("tenant"))?)?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(tenant)
    }

    /// Sets `suspended` and the phase, and audits; returns the updated tenant, or
    /// `Err(NotFound)` if it does not exist.
    pub async fn set_suspended(
        &self,
        tenant_id: &str,
        suspended: bool,
        phase: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<TenantRow> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(dyn_sql(format!(
            "UPDATE tenants SET suspended = $1, phase = $2, updated_at_ms = $3 WHERE id = $4 \
             RETURNING {TENANT_COLUMNS}"
        )))
        .bind(i64::from(suspended))
        .bind(phase)
        .bind(now_ms)
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await?;
        let tenant = tenant_from_row(&row.ok_or(Error::NotFound("tenant"))?)?;
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(tenant)
    }

    /// Records what the provisioner observed; writes only when something changed, and never
    /// over a tenant that is being deleted. Returns whether it wrote.
    pub async fn set_tenant_status(
        &self,
        tenant_id: &str,
        status: &TenantStatus,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET phase = $1, endpoint = $2, cert_serial = $3, cert_not_after_ms = $4, \
             cert_renewal_ms = $5, message = $6, updated_at_ms = $7 \
             WHERE id = $8 AND phase <> 'Terminating' AND NOT (phase = $1 AND endpoint = $2 AND \
             cert_serial = $3 AND cert_not_after_ms = $4 AND cert_renewal_ms = $5 AND message = $6)",
        )
        .bind(&status.phase)
        .bind(&status.endpoint)
        .bind(&status.cert_serial)
        .bind(status.cert_not_after_ms)
        .bind(status.cert_renewal_ms)
        .bind(&status.message)
        .bind(now_ms)
        .bind(tenant_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks a tenant as being deleted (the provisioner then removes its instance) and
    /// audits; `Err(NotFound)` if it does not exist.
    pub async fn mark_terminating(
        &self,
        tenant_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE tenants SET phase = 'Terminating', endpoint = '', message = 'deleting the instance and its data', \
             updated_at_ms = $1 WHERE id = $2",
        )
        .bind(now_ms)
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("tenant"));
        }
        append_audit(&mut tx, audit, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a tenant's rows once its instance is gone. Idempotent.
    pub async fn purge_tenant(&self, tenant_id: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM memberships WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every tenant, oldest first (paged internally).
    pub async fn all_tenants(&self) -> Result<Vec<TenantRow>> {
        let mut out: Vec<TenantRow> = Vec::new();
        loop {
            let after = out.last().map(|t| (t.created_at_ms, t.id.clone()));
            let page = self.list_tenants(after, 500).await?;
            let done = page.len() < 500;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    // ---- audit ----

    /// Appends one audit row on its own.
    pub async fn audit(&self, record: &AuditRecord, now_ms: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        append_audit(&mut tx, record, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A page of audit rows after `after_sequence`.
    pub async fn list_audit(&self, after_sequence: i64, limit: u32) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash \
             FROM audit_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after_sequence)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Recomputes the whole chain, page by page. `Ok(Ok(checked))` when intact,
    /// `Ok(Err(first_bad_sequence))` otherwise.
    pub async fn verify_audit(&self) -> Result<Result<u64, i64>> {
        let mut verifier = ChainVerifier::new();
        let mut after = 0;
        loop {
            let page = self.list_audit(after, 1_000).await?;
            let Some(last) = page.last() else { break };
            after = last.entry.sequence;
            for row in &page {
                if let Err(bad) = verifier.check(&row.entry, &row.prev_hash, &row.hash) {
                    return Ok(Err(bad));
                }
            }
        }
        let head = sqlx::query("SELECT sequence, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(verifier.finish(
            head.try_get("sequence")?,
            &head.try_get::<String, _>("hash")?,
        ))
    }

    /// Runs raw SQL; for tests that play an attacker with database access.
    #[doc(hidden)]
    pub async fn execute_raw_for_tests(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(dyn_sql(sql.to_owned()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn stamp_mfa(conn: &mut AnyConnection, session_hash: &str, now_ms: i64) -> Result<()> {
    sqlx::query("UPDATE sessions SET mfa_verified_at_ms = $1 WHERE token_hash = $2")
        .bind(now_ms)
        .bind(session_hash)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends `record` to the chain inside the caller's transaction. Bumping the head row
/// first takes its write lock, so concurrent appends (across API replicas too) serialize.
async fn append_audit(conn: &mut AnyConnection, record: &AuditRecord, now_ms: i64) -> Result<()> {
    let head = sqlx::query(
        "UPDATE audit_head SET sequence = sequence + 1 WHERE id = 1 RETURNING sequence, hash",
    )
    .fetch_one(&mut *conn)
    .await?;
    let sequence: i64 = head.try_get("sequence")?;
    let prev_hash: String = head.try_get("hash")?;
    let entry = AuditEntry {
        sequence,
        at_ms: now_ms,
        action: record.action.to_owned(),
        actor_user_id: record.actor_user_id.clone(),
        target: record.target.clone(),
        outcome: if record.success {
            audit::SUCCESS
        } else {
            audit::FAILURE
        }
        .to_owned(),
        source: record.source.clone(),
        detail_json: if record.detail_json.is_empty() {
            "{}".to_owned()
        } else {
            record.detail_json.clone()
        },
    };
    let hash = audit::chain_hash(&prev_hash, &entry);
    sqlx::query(
        "INSERT INTO audit_events (sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(entry.sequence)
    .bind(entry.at_ms)
    .bind(&entry.action)
    .bind(&entry.actor_user_id)
    .bind(&entry.target)
    .bind(&entry.outcome)
    .bind(&entry.source)
    .bind(&entry.detail_json)
    .bind(&prev_hash)
    .bind(&hash)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
