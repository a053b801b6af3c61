//! Mail: the transactional outbox (rows written in the transaction of the action that
//! causes them, sent by [`crate::mail::worker`]), email verification tokens (only their
//! SHA-256 is stored) and the Degraded-instance notice state.

use sqlx::{AnyConnection, Row};

use super::audit::AuditRecord;
use super::{Store, Write};
use crate::error::{Error, PreconditionReason, Result};
use crate::mail::notice::Notice;
use tenantry_proto::phase::TenantPhase;

/// One outbox row to send.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id; the Message-ID is made from it, so every attempt sends the same message.
    pub id: String,
    /// Recipient user.
    pub user_id: String,
    /// [`Notice::kind`].
    pub kind: String,
    /// The notice as JSON.
    pub notice_json: String,
    /// When it was queued (the Date header).
    pub created_at_ms: i64,
    /// Attempts so far.
    pub attempts: i64,
}

/// A new verification token of a user, and the mail that carries it.
#[derive(Debug, Clone)]
pub struct NewVerification {
    /// SHA-256 of the token.
    pub token_hash: String,
    /// Expiry.
    pub expires_at_ms: i64,
    /// The [`Notice::VerifyEmail`] with the token sealed.
    pub notice: Notice,
    /// Id of the outbox row of its mail.
    pub mail_id: String,
    /// The mail's row is written claimed until then, for the writer to send it itself
    /// (handed to its own mail worker: no other replica takes it meanwhile, and no poll of
    /// the outbox is needed); 0 leaves it to whichever worker polls first.
    pub claimed_until_ms: i64,
}

/// Queues `notice` for `user_id` on `conn` (inside the caller's transaction). Returns the
/// row id.
pub(super) async fn enqueue(
    conn: &mut AnyConnection,
    user_id: &str,
    notice: &Notice,
    now_ms: i64,
) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    insert_mail(conn, &id, user_id, notice, now_ms, 0).await?;
    Ok(id)
}

/// Writes outbox row `id`, claimed until `claimed_until_ms` (0: not claimed).
async fn insert_mail(
    conn: &mut AnyConnection,
    id: &str,
    user_id: &str,
    notice: &Notice,
    now_ms: i64,
    claimed_until_ms: i64,
) -> Result<()> {
    let json = serde_json::to_string(notice).map_err(|_| Error::Crypto("notice encoding"))?;
    sqlx::query(
        "INSERT INTO mail_outbox (id, user_id, kind, notice_json, created_at_ms, next_attempt_at_ms, claimed_until_ms) \
         VALUES ($1, $2, $3, $4, $5, $5, $6)",
    )
    .bind(id)
    .bind(user_id)
    .bind(notice.kind())
    .bind(json)
    .bind(now_ms)
    .bind(claimed_until_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes a verification token and its mail.
pub(super) async fn insert_verification(
    conn: &mut AnyConnection,
    user_id: &str,
    v: &NewVerification,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO email_verifications (token_hash, user_id, created_at_ms, expires_at_ms) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(&v.token_hash)
    .bind(user_id)
    .bind(now_ms)
    .bind(v.expires_at_ms)
    .execute(&mut *conn)
    .await?;
    insert_mail(
        conn,
        &v.mail_id,
        user_id,
        &v.notice,
        now_ms,
        v.claimed_until_ms,
    )
    .await
}

impl Store {
    /// Rows due at `now_ms`, oldest first, at most `limit`.
    pub async fn due_mail(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, user_id, kind, notice_json, created_at_ms, attempts FROM mail_outbox \
             WHERE sent_at_ms IS NULL AND next_attempt_at_ms <= $1 AND claimed_until_ms <= $1 \
             ORDER BY next_attempt_at_ms, id LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    user_id: r.try_get("user_id")?,
                    kind: r.try_get("kind")?,
                    notice_json: r.try_get("notice_json")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect()
    }

    /// The backlog: how many messages are not sent yet, and when the oldest was queued.
    pub async fn outbox_backlog(&self) -> Result<(i64, Option<i64>)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at_ms) AS oldest FROM mail_outbox \
             WHERE sent_at_ms IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("pending")?, row.try_get("oldest")?))
    }

    /// Claims a due row until `until_ms` so that no other replica sends it meanwhile; false
    /// when someone else has it or it is sent.
    pub async fn claim_mail(&self, id: &str, now_ms: i64, until_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE mail_outbox SET claimed_until_ms = $3 WHERE id = $1 AND sent_at_ms IS NULL \
             AND claimed_until_ms <= $2 AND next_attempt_at_ms <= $2",
        )
        .bind(id)
        .bind(now_ms)
        .bind(until_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a row up (recorded as sent with the reason, never retried).
    pub async fn mail_dropped(&self, id: &str, now_ms: i64, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE mail_outbox SET sent_at_ms = $2, notice_json = '', claimed_until_ms = 0, \
             last_error = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(now_ms)
        .bind(reason)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Marks a row sent; its notice (a sealed token, for a verification) is dropped.
    pub async fn mail_sent(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE mail_outbox SET sent_at_ms = $2, notice_json = '', claimed_until_ms = 0, \
             attempts = attempts + 1, last_error = '' WHERE id = $1",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again. `error` must hold no address.
    pub async fn mail_failed(&self, id: &str, next_attempt_at_ms: i64, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE mail_outbox SET attempts = attempts + 1, next_attempt_at_ms = $2, \
             claimed_until_ms = 0, last_error = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(next_attempt_at_ms)
        .bind(error)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Forgets rows sent before `before_ms`.
    pub async fn purge_sent_mail(&self, before_ms: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM mail_outbox WHERE sent_at_ms IS NOT NULL AND sent_at_ms < $1")
                .bind(before_ms)
                .execute(&mut *self.writer().await?)
                .await?;
        Ok(done.rows_affected())
    }

    /// When the user verified their address; `None` while unverified.
    pub async fn email_verified_at(&self, user_id: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT email_verified_at_ms FROM users WHERE id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Creation times of the user's verification tokens made at or after `since_ms`, newest
    /// first (for the resend limit).
    pub async fn recent_verifications(&self, user_id: &str, since_ms: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT created_at_ms FROM email_verifications WHERE user_id = $1 AND created_at_ms >= $2 \
             ORDER BY created_at_ms DESC",
        )
        .bind(user_id)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A new verification token and its mail for a user who is not verified yet; the
    /// user's unused older tokens expire now. `EMAIL_ALREADY_VERIFIED` otherwise.
    pub async fn resend_verification(
        &self,
        user_id: &str,
        v: &NewVerification,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited([audit], now_ms, async |tx| {
            let verified: Option<Option<i64>> =
                sqlx::query_scalar("SELECT email_verified_at_ms FROM users WHERE id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match verified {
                None => return Err(Error::NotFound("user")),
                Some(Some(_)) => {
                    return Err(Error::Precondition {
                        reason: PreconditionReason::EmailAlreadyVerified,
                        message: "the email address is verified already",
                    });
                }
                Some(None) => {}
            }
            // Older links stop working (they read as expired); their rows stay, so that
            // the resend limit counts them.
            sqlx::query(
                "UPDATE email_verifications SET expires_at_ms = $2 \
                 WHERE user_id = $1 AND used_at_ms IS NULL AND expires_at_ms > $2",
            )
            .bind(user_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            insert_verification(tx, user_id, v, now_ms).await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Uses a verification token of `user_id`: marks it used and the address verified, and
    /// moves the user's waiting tenants to `Provisioning` (returned, to be provisioned),
    /// with `audit`, in one transaction. An unknown token or another user's is `NOT_FOUND`; a used or expired
    /// one is `FAILED_PRECONDITION` with its reason.
    pub async fn verify_email(
        &self,
        user_id: &str,
        token_hash: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<Vec<super::TenantRow>> {
        self.commit_audited([audit], now_ms, async |tx| {
            let row = sqlx::query(
                "SELECT user_id, expires_at_ms, used_at_ms FROM email_verifications WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Err(Error::NotFound("verification token"));
            };
            let owner: String = row.try_get("user_id")?;
            // Another user's token answers exactly like an unknown one.
            if !crate::crypto::ct_eq(owner.as_bytes(), user_id.as_bytes()) {
                return Err(Error::NotFound("verification token"));
            }
            if row.try_get::<Option<i64>, _>("used_at_ms")?.is_some() {
                return Err(Error::Precondition {
                    reason: PreconditionReason::VerificationTokenUsed,
                    message: "this verification link was used already",
                });
            }
            if row.try_get::<i64, _>("expires_at_ms")? <= now_ms {
                return Err(Error::Precondition {
                    reason: PreconditionReason::VerificationTokenExpired,
                    message: "this verification link has expired; ask for a new one",
                });
            }
            // Only the unused row: of two concurrent uses, one wins.
            let claimed = sqlx::query(
                "UPDATE email_verifications SET used_at_ms = $2 WHERE token_hash = $1 AND used_at_ms IS NULL",
            )
            .bind(token_hash)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                return Err(Error::Precondition {
                    reason: PreconditionReason::VerificationTokenUsed,
                    message: "this verification link was used already",
                });
            }
            sqlx::query(
                "UPDATE users SET email_verified_at_ms = $2 WHERE id = $1 AND email_verified_at_ms IS NULL",
            )
            .bind(user_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let rows = sqlx::query(super::dyn_sql(format!(
                "UPDATE tenants SET phase = $1, message = '', updated_at_ms = $2 \
                 WHERE owner_user_id = $3 AND phase = $4 RETURNING {}",
                super::tenants::TENANT_COLUMNS
            )))
            .bind(TenantPhase::Provisioning.as_str())
            .bind(now_ms)
            .bind(user_id)
            .bind(TenantPhase::AwaitingVerification.as_str())
            .fetch_all(&mut *tx)
            .await?;
            let tenants = rows
                .iter()
                .map(super::tenants::tenant_from_row)
                .collect::<Result<Vec<_>>>()?;
            Ok(Write::Commit(tenants))
        })
        .await
    }

    /// Degraded-notice bookkeeping: tenant id → `(degraded_since_ms, notified_at_ms)`.
    pub async fn health_notices(
        &self,
    ) -> Result<std::collections::HashMap<String, (i64, Option<i64>)>> {
        let rows = sqlx::query(
            "SELECT tenant_id, degraded_since_ms, notified_at_ms FROM tenant_health_notices",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("tenant_id")?,
                    (
                        r.try_get("degraded_since_ms")?,
                        r.try_get("notified_at_ms")?,
                    ),
                ))
            })
            .collect()
    }

    /// Starts the Degraded clock of a tenant (no-op when running).
    pub async fn mark_degraded(&self, tenant_id: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenant_health_notices (tenant_id, degraded_since_ms) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(now_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Queues the Degraded notice to the owner and records that it went, once per episode.
    /// False when another replica did it first.
    pub async fn notify_degraded(
        &self,
        tenant_id: &str,
        owner: &str,
        notice: &Notice,
        now_ms: i64,
    ) -> Result<bool> {
        self.commit_audited(super::access::NO_AUDITS, now_ms, async |tx| {
            let done = sqlx::query(
                "UPDATE tenant_health_notices SET notified_at_ms = $2 WHERE tenant_id = $1 AND notified_at_ms IS NULL",
            )
            .bind(tenant_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(Write::Rollback(false));
            }
            enqueue(tx, owner, notice, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }

    /// Ends a Degraded episode; when the owner was told about it and `recovered` is given
    /// (the instance is Ready again), queues it to them. Returns whether a notice was queued.
    pub async fn clear_degraded(
        &self,
        tenant_id: &str,
        owner: &str,
        recovered: Option<&Notice>,
        now_ms: i64,
    ) -> Result<bool> {
        self.commit_audited(super::access::NO_AUDITS, now_ms, async |tx| {
            let row = sqlx::query(
                "DELETE FROM tenant_health_notices WHERE tenant_id = $1 RETURNING notified_at_ms",
            )
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(Write::Rollback(false));
            };
            let notified = row.try_get::<Option<i64>, _>("notified_at_ms")?.is_some();
            let Some(recovered) = recovered.filter(|_| notified) else {
                return Ok(Write::Commit(false));
            };
            enqueue(tx, owner, recovered, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }
}
