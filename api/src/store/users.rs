//! Users: signup, the bootstrap admin, lookups, password and MFA failure counters and the
//! password itself. Roles and user status changes are in `access`.

use sqlx::Row;
use sqlx::any::AnyRow;
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{Plan, RetentionPolicy};

use super::audit::AuditRecord;
use super::{Backend, Store, Write, dyn_sql, rollback_if_taken};
use crate::error::Result;
use crate::lockout::LockState;

/// A user row.
#[derive(Clone)]
pub struct UserRow {
    /// Id.
    pub id: String,
    /// Normalized email.
    pub email: String,
    /// PHC string.
    pub password_hash: String,
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
    /// Signup (or bootstrap) time.
    pub created_at_ms: i64,
    /// Last successful login.
    pub last_login_at_ms: Option<i64>,
    /// When the user was deactivated; `None` while active.
    pub deactivated_at_ms: Option<i64>,
    /// Why; empty while active.
    pub deactivation_reason: String,
}

impl UserRow {
    /// True when the user has a confirmed second factor.
    pub fn mfa_enrolled(&self) -> bool {
        self.totp_secret_sealed.is_some()
    }

    /// True when the user may log in.
    pub fn is_active(&self) -> bool {
        self.deactivated_at_ms.is_none()
    }
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("deactivated_at_ms", &self.deactivated_at_ms)
            .finish_non_exhaustive()
    }
}

/// Which credential a failure counter is for; each locks on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// The password (login and password change).
    Password,
    /// The second factor (TOTP or recovery code).
    Mfa,
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
    /// Plan.
    pub plan: Plan,
    /// Initial phase.
    pub phase: TenantPhase,
    /// Initial retention.
    pub retention: RetentionPolicy,
    /// The first verification token and its mail.
    pub verification: super::NewVerification,
    /// Detail for humans while the tenant waits (for verification).
    pub message: String,
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

pub(super) const USER_COLUMNS: &str = "id, email, password_hash, login_failures, login_lockouts, \
    login_locked_until_ms, mfa_failures, mfa_lockouts, mfa_locked_until_ms, totp_secret_sealed, \
    totp_pending_sealed, totp_last_step, created_at_ms, last_login_at_ms, deactivated_at_ms, \
    deactivation_reason";

pub(super) fn user_from_row(row: &AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
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
        created_at_ms: row.try_get("created_at_ms")?,
        last_login_at_ms: row.try_get("last_login_at_ms")?,
        deactivated_at_ms: row.try_get("deactivated_at_ms")?,
        deactivation_reason: row.try_get("deactivation_reason")?,
    })
}

/// The outcome of a signup whose rows were refused: which name a unique violation was of
/// (PostgreSQL names the constraint; SQLite's message names the column), or the error.
fn signup_refused(e: sqlx::Error) -> Result<SignupOutcome> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            match (db.constraint(), db.message()) {
                (Some("users_email_key"), _) => Ok(SignupOutcome::EmailTaken),
                (Some("tenants_name_key"), _) => Ok(SignupOutcome::TenantNameTaken),
                (None, m) if m.ends_with("users.email") => Ok(SignupOutcome::EmailTaken),
                (None, m) if m.ends_with("tenants.name") => Ok(SignupOutcome::TenantNameTaken),
                _ => Err(sqlx::Error::Database(db).into()),
            }
        }
        other => Err(other.into()),
    }
}

impl Store {
    /// Writes a user, their tenant, the owner membership and the audit row in one
    /// transaction.
    ///
    /// Which name was taken, when both were, is not told: on PostgreSQL the rows are
    /// written by one statement, in an order it does not promise.
    pub async fn create_signup(&self, s: &NewSignup, audit: &AuditRecord) -> Result<SignupOutcome> {
        // The five rows, with the same parameters on both backends: on PostgreSQL one
        // statement that also appends the audit row; on SQLite five statements in one call
        // (run together on its worker thread; parameters are numbered across them).
        const ROWS_SQLITE: &str = "INSERT INTO users (id, email, password_hash, created_at_ms) \
               VALUES ($1, $2, $3, $4); \
             INSERT INTO tenants (id, name, owner_user_id, plan, phase, retention_max_age_hours, \
               retention_max_count, created_at_ms, updated_at_ms, message) \
               VALUES ($5, $6, $1, $7, $8, $9, $10, $4, $4, $11); \
             INSERT INTO memberships (user_id, tenant_id, role) VALUES ($1, $5, 'owner'); \
             INSERT INTO email_verifications (token_hash, user_id, created_at_ms, expires_at_ms) \
               VALUES ($12, $1, $4, $13); \
             INSERT INTO mail_outbox (id, user_id, kind, notice_json, created_at_ms, \
               next_attempt_at_ms, claimed_until_ms) VALUES ($14, $1, $15, $16, $4, $4, $17)";
        // PostgreSQL: the foreign keys are checked at the statement's end, when all are
        // written. It changes no cached session: the user is new, and says so in
        // `tenantry.new_user` before it is written, so that the owner membership is not
        // published to the replicas' session caches (migration 10).
        static ROWS_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            super::audit::postgres_statement(
                "new_user AS (INSERT INTO users (id, email, password_hash, created_at_ms) \
                   SELECT $1, $2, $3, $4 WHERE set_config('tenantry.new_user', $1, true) IS NOT NULL), \
                 new_tenant AS (INSERT INTO tenants (id, name, owner_user_id, plan, phase, \
                   retention_max_age_hours, retention_max_count, created_at_ms, updated_at_ms, message) \
                   VALUES ($5, $6, $1, $7, $8, $9, $10, $4, $4, $11)), \
                 owner AS (INSERT INTO memberships (user_id, tenant_id, role) VALUES ($1, $5, 'owner')), \
                 verification AS (INSERT INTO email_verifications (token_hash, user_id, created_at_ms, expires_at_ms) \
                   VALUES ($12, $1, $4, $13)), \
                 mail AS (INSERT INTO mail_outbox (id, user_id, kind, notice_json, created_at_ms, next_attempt_at_ms, claimed_until_ms) \
                   VALUES ($14, $1, $15, $16, $4, $4, $17))",
                18,
            )
        });
        let notice = serde_json::to_string(&s.verification.notice)
            .map_err(|_| crate::error::Error::Crypto("notice encoding"))?;
        let rows = |sql: &'static str| {
            sqlx::query(sql)
                .bind(s.user_id.clone())
                .bind(s.email.clone())
                .bind(s.password_hash.clone())
                .bind(s.now_ms)
                .bind(s.tenant_id.clone())
                .bind(s.tenant_name.clone())
                .bind(s.plan.as_str())
                .bind(s.phase.as_str())
                .bind(i64::from(s.retention.max_age_hours))
                .bind(i64::from(s.retention.max_count))
                .bind(s.message.clone())
                .bind(s.verification.token_hash.clone())
                .bind(s.verification.expires_at_ms)
                .bind(s.verification.mail_id.clone())
                .bind(s.verification.notice.kind())
                .bind(notice.clone())
                .bind(s.verification.claimed_until_ms)
        };
        if self.backend == Backend::Postgres {
            let written = super::audit::bind_postgres_append(rows(&ROWS_POSTGRES), audit, s.now_ms)
                .execute(&self.pool)
                .await;
            return match written {
                Ok(_) => Ok(SignupOutcome::Created),
                Err(e) => signup_refused(e),
            };
        }
        self.commit_audited([audit], s.now_ms, async |tx| {
            match rows(ROWS_SQLITE).execute(&mut *tx).await {
                Ok(_) => Ok(Write::Commit(SignupOutcome::Created)),
                Err(e) => signup_refused(e).map(Write::Rollback),
            }
        })
        .await
    }

    /// Creates a user without a tenant holding the `admin` role until `admin_until_ms`
    /// (bootstrap of the first admin); `Ok(false)` when the email is taken.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_admin(
        &self,
        id: &str,
        email: &str,
        password_hash: &str,
        admin_until_ms: i64,
        now_ms: i64,
        audit: &AuditRecord,
    ) -> Result<bool> {
        self.commit_audited([audit], now_ms, async |tx| {
            let res = sqlx::query(
                "INSERT INTO users (id, email, password_hash, created_at_ms) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(email)
            .bind(password_hash)
            .bind(now_ms)
            .execute(&mut *tx)
            .await;
            if let Err(e) = res {
                return rollback_if_taken(e, false);
            }
            bootstrap_grant(tx, id, admin_until_ms, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }

    /// Bootstrap of an existing user: an `admin` grant until `admin_until_ms` (granted by
    /// nobody), and the user reactivated if they were deactivated. Ends their sessions.
    pub async fn bootstrap_existing_admin(
        &self,
        user_id: &str,
        admin_until_ms: i64,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited([audit], now_ms, async |tx| {
            sqlx::query(
                "UPDATE users SET deactivated_at_ms = NULL, deactivation_reason = '' WHERE id = $1",
            )
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            bootstrap_grant(tx, user_id, admin_until_ms, now_ms).await?;
            sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
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
        self.commit_audited(audits, now_ms, async |tx| {
            sqlx::query(sql)
                .bind(state.failures)
                .bind(state.lockouts)
                .bind(state.locked_until_ms)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// The failure counters of logins with an unknown email, by the SHA-256 of the
    /// normalized email (see [`crate::crypto::hash_secret`]); fresh when there are none.
    pub async fn unknown_email_lock(&self, email_hash: &str) -> Result<LockState> {
        let row = sqlx::query(
            "SELECT failures, lockouts, locked_until_ms FROM unknown_email_failures WHERE email_hash = $1",
        )
        .bind(email_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(LockState::default()),
            Some(row) => Ok(LockState {
                failures: row.try_get("failures")?,
                lockouts: row.try_get("lockouts")?,
                locked_until_ms: row.try_get("locked_until_ms")?,
            }),
        }
    }

    /// Stores new failure counters for an unknown email, and the audit row(s) for the
    /// failure: the same bookkeeping as [`Store::record_failure`] for an account.
    pub async fn record_unknown_email_failure(
        &self,
        email_hash: &str,
        state: LockState,
        audits: &[AuditRecord],
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited(audits, now_ms, async |tx| {
            sqlx::query(
                "INSERT INTO unknown_email_failures \
                 (email_hash, failures, lockouts, locked_until_ms, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (email_hash) DO UPDATE SET failures = excluded.failures, \
                 lockouts = excluded.lockouts, locked_until_ms = excluded.locked_until_ms, \
                 updated_at_ms = excluded.updated_at_ms",
            )
            .bind(email_hash)
            .bind(state.failures)
            .bind(state.lockouts)
            .bind(state.locked_until_ms)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Forgets the counters of unknown emails with no failure since `before_ms` and no
    /// lock in force at `now_ms`, so guessed emails cannot grow the table without bound.
    pub async fn purge_unknown_email_failures(&self, before_ms: i64, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM unknown_email_failures WHERE updated_at_ms < $1 AND locked_until_ms <= $2",
        )
        .bind(before_ms)
        .bind(now_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }

    /// Replaces the password hash and ends every session of the user.
    pub async fn set_password(
        &self,
        user_id: &str,
        hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited([audit], now_ms, async |tx| {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                .bind(hash)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
    }
}

/// Writes (or renews) an `admin` grant made by nobody: the bootstrap path.
async fn bootstrap_grant(
    conn: &mut sqlx::AnyConnection,
    user_id: &str,
    until_ms: i64,
    now_ms: i64,
) -> Result<()> {
    super::access::retire_expired(conn, user_id, crate::access::Role::Admin, now_ms).await?;
    sqlx::query(
        "INSERT INTO role_grants (user_id, role, granted_by, granted_at_ms, expires_at_ms) \
         VALUES ($1, 'admin', '', $2, $3) ON CONFLICT (user_id, role) DO UPDATE SET \
         granted_by = '', granted_at_ms = excluded.granted_at_ms, expires_at_ms = excluded.expires_at_ms",
    )
    .bind(user_id)
    .bind(now_ms)
    .bind(until_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
