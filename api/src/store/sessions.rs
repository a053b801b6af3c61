//! Sessions: login, the per-request lookup, logout and revocation, and the purge of expired
//! sessions.

use sqlx::Row;

use super::audit::AuditRecord;
use super::{Backend, Store, Write};
use crate::access::{HeldRole, Role};
use crate::error::{Error, Result};

/// A live session joined with its user.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// SHA-256 of the token.
    pub token_hash: String,
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// The user's role grants, expired ones included (the caller compares with now).
    pub roles: Vec<HeldRole>,
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

// A deactivated user has no sessions; the join refuses one anyway, should one survive.
const SESSION_SQL_SQLITE: &str = "SELECT s.token_hash, s.user_id, u.email, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END AS mfa_enrolled, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT group_concat(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids, \
    (SELECT group_concat(g.role || ':' || g.expires_at_ms, ',') FROM role_grants g WHERE g.user_id = s.user_id) AS roles \
    FROM sessions s JOIN users u ON u.id = s.user_id \
    WHERE s.token_hash = $1 AND u.deactivated_at_ms IS NULL";

const SESSION_SQL_POSTGRES: &str = "SELECT s.token_hash, s.user_id, u.email, \
    CASE WHEN u.totp_secret_sealed IS NULL THEN 0 ELSE 1 END::BIGINT AS mfa_enrolled, \
    s.last_seen_ms, s.expires_at_ms, s.mfa_verified_at_ms, \
    (SELECT string_agg(m.tenant_id, ',') FROM memberships m WHERE m.user_id = s.user_id) AS tenant_ids, \
    (SELECT string_agg(g.role || ':' || g.expires_at_ms::TEXT, ',') FROM role_grants g WHERE g.user_id = s.user_id) AS roles \
    FROM sessions s JOIN users u ON u.id = s.user_id \
    WHERE s.token_hash = $1 AND u.deactivated_at_ms IS NULL";

/// Reads `role:expires_at_ms,…`; a role this version does not know grants nothing.
fn parse_roles(text: Option<String>) -> Vec<HeldRole> {
    let mut roles: Vec<HeldRole> = text
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| {
            let (role, ms) = pair.split_once(':')?;
            Some(HeldRole {
                role: Role::parse(role)?,
                expires_at_ms: ms.parse().ok()?,
            })
        })
        .collect();
    roles.sort_by_key(|r| r.role);
    roles
}

impl Store {
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
        self.commit_audited([audit], now_ms, async |tx| {
            sqlx::query(
                "UPDATE users SET login_failures = 0, login_lockouts = 0, login_locked_until_ms = 0, \
                 password_hash = COALESCE($1, password_hash), last_login_at_ms = $3 WHERE id = $2",
            )
            .bind(new_hash)
            .bind(user_id)
            .bind(now_ms)
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
            Ok(Write::Commit(()))
        })
        .await
    }

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
            roles: parse_roles(row.try_get("roles")?),
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
        self.commit_audited(audit, now_ms, async |tx| {
            sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Ends every session of a user; returns how many.
    pub async fn delete_user_sessions(
        &self,
        user_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<u64> {
        self.commit_audited([audit], now_ms, async |tx| {
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
            Ok(Write::Commit(done.rows_affected()))
        })
        .await
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
}
