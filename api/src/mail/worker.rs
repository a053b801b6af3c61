//! The background side of mail: the outbox sender (claims due rows, renders, signs and
//! delivers them, retries with exponential backoff) and the watcher that tells owners when
//! their instance has been Degraded for `--notify-degraded-after` and when it is back.
//!
//! Exactly once: a row is claimed for [`CLAIM`] before it is sent and marked sent right
//! after the relay accepted it; the Message-ID comes from the row, so the rare resend after
//! a crash between the two is the same message. Log lines name the row and the kind, never
//! the recipient.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use secrecy::ExposeSecret as _;
use tenantry_proto::phase::TenantPhase;

use super::notice::{Notice, VERIFY_TOKEN_CONTEXT, render};
use super::{Delivery, DeliveryError, Handed, Mailer};
use crate::clock::duration_ms;
use crate::error::Result;
use crate::state::AppState;
use crate::store::OutboxRow;

/// How often due rows are looked for without a wake-up.
pub const POLL: Duration = Duration::from_secs(1);
/// How long a claim keeps other replicas off a row.
pub const CLAIM: Duration = Duration::from_secs(120);
/// Delay before the first retry; it doubles with each failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// Attempts before a message is given up (about three days at the longest backoff).
pub const MAX_ATTEMPTS: i64 = 300;
/// How often the Degraded watcher looks at the tenants.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// Sent rows are forgotten after this long.
pub const SENT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// The delay after the `attempts`-th failure.
pub fn backoff(attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(MAX_BACKOFF)
}

/// Sends what was handed over, and what is due in the outbox at least every [`POLL`] (at
/// once after [`Mailer::poll_soon`]); forever.
pub async fn run(state: Arc<AppState>, mailer: Arc<Mailer>) {
    let mut next_poll = tokio::time::Instant::now();
    loop {
        for mail in mailer.take_handed() {
            if let Err(e) = send_handed(&state, &mailer, mail).await {
                tracing::warn!(error = %e, "could not record a mail's delivery; it is sent again when its claim runs out");
            }
        }
        if mailer.poll_requested.swap(false, Ordering::SeqCst)
            || tokio::time::Instant::now() >= next_poll
        {
            next_poll = tokio::time::Instant::now() + POLL;
            if let Err(e) = send_due(&state, &mailer).await {
                tracing::warn!(error = %e, "could not read the mail outbox; retrying");
            }
        }
        tokio::select! {
            () = mailer.wakeup.notified() => {}
            () = tokio::time::sleep_until(next_poll) => {}
        }
    }
}

/// Sends one handed-over message and records the outcome.
async fn send_handed(state: &AppState, mailer: &Mailer, mail: Handed) -> Result<()> {
    let outcome = attempt(
        state,
        mailer,
        &mail.id,
        &mail.email,
        &mail.notice,
        mail.created_at_ms,
    )
    .await;
    settle(state, mailer, &mail.id, mail.notice.kind(), 0, outcome).await?;
    Ok(())
}

/// One pass over the due rows; returns how many were delivered.
pub async fn send_due(state: &AppState, mailer: &Mailer) -> Result<usize> {
    let mut delivered = 0;
    loop {
        let now = state.now_ms();
        let rows = state.store.due_mail(now, 50).await?;
        if rows.is_empty() {
            return Ok(delivered);
        }
        let mut progressed = false;
        for row in rows {
            let now = state.now_ms();
            if !state
                .store
                .claim_mail(&row.id, now, now + duration_ms(CLAIM))
                .await?
            {
                continue;
            }
            progressed = true;
            let outcome = attempt_row(state, mailer, &row).await;
            if settle(state, mailer, &row.id, &row.kind, row.attempts, outcome).await? {
                delivered += 1;
            }
        }
        if !progressed {
            return Ok(delivered);
        }
    }
}

/// Records how an attempt at message `id` (which had failed `attempts` times before)
/// went: sent, dropped, or to be retried after a backoff. True when it was sent.
async fn settle(
    state: &AppState,
    mailer: &Mailer,
    id: &str,
    kind: &str,
    attempts: i64,
    outcome: std::result::Result<(), DeliveryError>,
) -> Result<bool> {
    match outcome {
        Ok(()) => {
            state.store.mail_sent(id, state.now_ms()).await?;
            mailer.stats.record(Delivery::Sent, kind);
            tracing::info!(mail_id = %id, kind = %kind, "mail sent");
            Ok(true)
        }
        Err(DeliveryError::Undeliverable(why)) => {
            state.store.mail_dropped(id, state.now_ms(), why).await?;
            mailer.stats.record(Delivery::Dropped, kind);
            tracing::warn!(mail_id = %id, kind = %kind, reason = why, "mail dropped");
            Ok(false)
        }
        Err(DeliveryError::Failed(why)) => {
            mailer.stats.record(Delivery::FailedAttempt, kind);
            let attempts = attempts + 1;
            if attempts >= MAX_ATTEMPTS {
                state.store.mail_dropped(id, state.now_ms(), &why).await?;
                mailer.stats.record(Delivery::Dropped, kind);
                tracing::error!(mail_id = %id, kind = %kind, attempts, error = %why, "mail given up after the last retry");
            } else {
                let wait = backoff(attempts);
                state
                    .store
                    .mail_failed(id, state.now_ms() + duration_ms(wait), &why)
                    .await?;
                tracing::warn!(mail_id = %id, kind = %kind, attempts, retry_in = ?wait, error = %why, "mail not sent; will retry");
            }
            Ok(false)
        }
    }
}

/// Reads a row's notice and recipient, then [`attempt`]s it.
async fn attempt_row(
    state: &AppState,
    mailer: &Mailer,
    row: &OutboxRow,
) -> std::result::Result<(), DeliveryError> {
    let notice: Notice = serde_json::from_str(&row.notice_json)
        .map_err(|_| DeliveryError::Undeliverable("the notice cannot be read"))?;
    let user = state
        .store
        .user_by_id(&row.user_id)
        .await
        .map_err(|_| DeliveryError::Failed("database unavailable".to_owned()))?
        .ok_or(DeliveryError::Undeliverable("the user is gone"))?;
    attempt(
        state,
        mailer,
        &row.id,
        &user.email,
        &notice,
        row.created_at_ms,
    )
    .await
}

/// Renders, signs and delivers message `id` to `email`.
async fn attempt(
    state: &AppState,
    mailer: &Mailer,
    id: &str,
    email: &str,
    notice: &Notice,
    created_at_ms: i64,
) -> std::result::Result<(), DeliveryError> {
    let link = match notice {
        Notice::VerifyEmail { token_sealed } => {
            let token = state
                .master_key
                .open(VERIFY_TOKEN_CONTEXT, token_sealed)
                .map_err(|_| DeliveryError::Undeliverable("the token cannot be opened"))?;
            let token = String::from_utf8(token.expose_secret().clone())
                .map_err(|_| DeliveryError::Undeliverable("the token cannot be opened"))?;
            Some(format!(
                "{}/verify-email?token={token}",
                mailer.public_url()
            ))
        }
        _ => None,
    };
    let rendered = render(notice, mailer.public_url(), link.as_deref());
    let (envelope, message) =
        mailer.compose(id, email, &rendered, created_at_ms, state.now_ms())?;
    mailer.deliver(id, &envelope, &message).await
}

/// Watches instance health for the Degraded notices; forever.
pub async fn watch_health(state: Arc<AppState>, notify_after: Duration) {
    loop {
        if let Err(e) = check_health(&state, notify_after).await {
            tracing::warn!(error = %e, "could not check instance health for notices");
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// One pass: start the clock of newly Degraded tenants, notify the owners of those
/// Degraded for `notify_after`, and tell them when the instance is Ready again.
pub async fn check_health(state: &AppState, notify_after: Duration) -> Result<()> {
    let notices = state.store.health_notices().await?;
    for tenant in state.store.all_tenants().await? {
        let now = state.now_ms();
        let known = notices.get(&tenant.id);
        match (tenant.phase, known) {
            (TenantPhase::Degraded, None) => state.store.mark_degraded(&tenant.id, now).await?,
            (TenantPhase::Degraded, Some((since, None))) => {
                let after = duration_ms(notify_after);
                if now - since >= after {
                    let notice = Notice::InstanceDegraded {
                        tenant: tenant.name.clone(),
                        minutes: (now - since) / 60_000,
                    };
                    state
                        .store
                        .notify_degraded(&tenant.id, &tenant.owner_user_id, &notice, now)
                        .await?;
                }
            }
            (TenantPhase::Degraded, Some(_)) => {}
            (phase, Some(_)) => {
                let recovered = Notice::InstanceRecovered {
                    tenant: tenant.name.clone(),
                };
                // Ready again: the owner hears of it. Suspended or deleted: the episode ends
                // without a mail. Provisioning (a restart): the episode goes on.
                match phase {
                    TenantPhase::Ready => {
                        state
                            .store
                            .clear_degraded(
                                &tenant.id,
                                &tenant.owner_user_id,
                                Some(&recovered),
                                now,
                            )
                            .await?;
                    }
                    TenantPhase::Suspended | TenantPhase::Terminating => {
                        state
                            .store
                            .clear_degraded(&tenant.id, &tenant.owner_user_id, None, now)
                            .await?;
                    }
                    _ => {}
                }
            }
            (_, None) => {}
        }
    }
    let now = state.now_ms();
    state
        .store
        .purge_sent_mail(now - duration_ms(SENT_RETENTION))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_two_seconds_to_fifteen_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(i64::MAX), MAX_BACKOFF);
    }
}
