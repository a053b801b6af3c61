//! TOTP enrollment and verification, and recovery codes.

use sqlx::AnyConnection;

use super::audit::AuditRecord;
use super::{AnyQuery, Store, Write};
use crate::error::Result;

const RECOVERY_CODES_LEFT: &str =
    "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at_ms IS NULL";

impl Store {
    /// Stores a new unconfirmed TOTP secret.
    pub async fn set_pending_totp(&self, user_id: &str, sealed: &str) -> Result<()> {
        sqlx::query("UPDATE users SET totp_pending_sealed = $1 WHERE id = $2")
            .bind(sealed)
            .bind(user_id)
            .execute(&mut *self.writer().await?)
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
        self.commit_audited([audit], now_ms, async |tx| {
            let activate = sqlx::query(
                "UPDATE users SET totp_secret_sealed = totp_pending_sealed, totp_pending_sealed = NULL, \
                 totp_last_step = $1, mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 \
                 WHERE id = $2 AND totp_pending_sealed = $3 AND totp_secret_sealed IS NULL",
            )
            .bind(step)
            .bind(user_id)
            .bind(pending_sealed);
            if !claimed(tx, activate).await? {
                return Ok(Write::Rollback(false));
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
            stamp_mfa(tx, session_hash, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }

    /// Turns TOTP off: the secret (and any pending one) and every recovery code are
    /// deleted, every session of the user loses its second-factor stamp, and the audit row
    /// (with its notice) is written; `Ok(false)` if no TOTP was enrolled (by then).
    pub async fn remove_totp(
        &self,
        user_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        self.commit_audited([audit], now_ms, async |tx| {
            let remove = sqlx::query(
                "UPDATE users SET totp_secret_sealed = NULL, totp_pending_sealed = NULL \
                 WHERE id = $1 AND totp_secret_sealed IS NOT NULL",
            )
            .bind(user_id);
            if !claimed(tx, remove).await? {
                return Ok(Write::Rollback(false));
            }
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE sessions SET mfa_verified_at_ms = NULL \
                 WHERE user_id = $1 AND mfa_verified_at_ms IS NOT NULL",
            )
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            Ok(Write::Commit(true))
        })
        .await
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
        self.commit_audited([audit], now_ms, async |tx| {
            let advance = sqlx::query(
                "UPDATE users SET totp_last_step = $1, mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 \
                 WHERE id = $2 AND totp_last_step < $1",
            )
            .bind(step)
            .bind(user_id);
            if !claimed(tx, advance).await? {
                return Ok(Write::Rollback(false));
            }
            stamp_mfa(tx, session_hash, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
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
        self.commit_audited([audit], now_ms, async |tx| {
            let spend = sqlx::query(
                "UPDATE recovery_codes SET used_at_ms = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at_ms IS NULL",
            )
            .bind(now_ms)
            .bind(user_id)
            .bind(code_hash);
            if !claimed(tx, spend).await? {
                return Ok(Write::Rollback(None));
            }
            sqlx::query("UPDATE users SET mfa_failures = 0, mfa_lockouts = 0, mfa_locked_until_ms = 0 WHERE id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            stamp_mfa(tx, session_hash, now_ms).await?;
            let left: i64 = sqlx::query_scalar(RECOVERY_CODES_LEFT)
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
            Ok(Write::Commit(Some(u32::try_from(left).unwrap_or(0))))
        })
        .await
    }

    /// Unused recovery codes of a user.
    pub async fn recovery_codes_left(&self, user_id: &str) -> Result<u32> {
        let left: i64 = sqlx::query_scalar(RECOVERY_CODES_LEFT)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(u32::try_from(left).unwrap_or(0))
    }
}

/// Runs a conditional update; true when it changed exactly one row, i.e. this request's
/// condition held and no concurrent one got there first.
async fn claimed(conn: &mut AnyConnection, update: AnyQuery) -> Result<bool> {
    Ok(update.execute(conn).await?.rows_affected() == 1)
}

/// Records on the session that it has just verified a second factor.
async fn stamp_mfa(conn: &mut AnyConnection, session_hash: &str, now_ms: i64) -> Result<()> {
    sqlx::query("UPDATE sessions SET mfa_verified_at_ms = $1 WHERE token_hash = $2")
        .bind(now_ms)
        .bind(session_hash)
        .execute(conn)
        .await?;
    Ok(())
}
