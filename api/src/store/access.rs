//! Role grants, user status and access reviews: granting, revoking and expiring roles,
//! deactivating users, listing users, and starting, deciding and closing reviews. Every
//! change writes its audit rows in the same transaction; rows whose content depends on
//! what the transaction finds (counts, expiry times) are built here.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::audit::{AuditRecord, append_audit};
use super::users::{USER_COLUMNS, UserRow, user_from_row};
use super::{Arg, Backend, Store, Write, bind_all, dyn_sql};
use crate::access::{
    Actor, Decision, Role, RoleFilter, StatusFilter, Trigger, UserFilter, actions,
};
use crate::error::{Error, PreconditionReason, Result};
use crate::service::detail;

/// One role grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    /// The holder.
    pub user_id: String,
    /// The role.
    pub role: Role,
    /// Who granted (or last extended) it; empty for the bootstrap admin and migrated admins.
    pub granted_by: String,
    /// When it was granted or last extended.
    pub granted_at_ms: i64,
    /// When it stops working.
    pub expires_at_ms: i64,
}

/// A user with their unexpired grants, as `ListUsers` shows them.
#[derive(Debug, Clone)]
pub struct UserWithRoles {
    /// The user.
    pub user: UserRow,
    /// Unexpired grants, by role.
    pub grants: Vec<GrantRow>,
}

/// An access review with its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewRow {
    /// Id.
    pub id: String,
    /// Why it started.
    pub trigger: Trigger,
    /// Who started it; empty for the server.
    pub started_by: String,
    /// When.
    pub started_at_ms: i64,
    /// When undecided items are revoked.
    pub due_at_ms: i64,
    /// When it closed.
    pub closed_at_ms: Option<i64>,
    /// Items.
    pub items: u32,
    /// Kept.
    pub kept: u32,
    /// Revoked by a reviewer.
    pub revoked: u32,
    /// Revoked at the due time.
    pub expired: u32,
    /// Still to decide.
    pub undecided: u32,
}

/// One item of a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewItemRow {
    /// The review.
    pub review_id: String,
    /// The holder.
    pub user_id: String,
    /// The holder's email.
    pub email: String,
    /// The role.
    pub role: Role,
    /// Who granted it (at the snapshot).
    pub granted_by: String,
    /// When it was granted (at the snapshot).
    pub granted_at_ms: i64,
    /// When it expired or expires (at the snapshot).
    pub expires_at_ms: i64,
    /// The decision, once made.
    pub decision: Option<Decision>,
    /// Who decided; empty while undecided or when the due time decided.
    pub decided_by: String,
    /// When.
    pub decided_at_ms: Option<i64>,
    /// The reviewer's note.
    pub note: String,
}

/// What `GrantAdmin` asks the store to do.
#[derive(Debug, Clone)]
pub struct NewGrant {
    /// The user to give the role.
    pub user_id: String,
    /// The role.
    pub role: Role,
    /// When it stops working.
    pub expires_at_ms: i64,
    /// The id of the role-change review, used when the role is new to the user.
    pub review_id: String,
    /// When that review is due.
    pub review_due_ms: i64,
    /// Now.
    pub now_ms: i64,
}

/// What a grant did.
#[derive(Debug, Clone)]
pub struct GrantOutcome {
    /// The grant now in force.
    pub grant: GrantRow,
    /// The role-change review opened, when the role was new to the user.
    pub review_id: Option<String>,
}

/// One decision of a reviewer.
#[derive(Debug, Clone)]
pub struct ItemDecision {
    /// The review.
    pub review_id: String,
    /// The holder.
    pub user_id: String,
    /// The role.
    pub role: Role,
    /// KEEP or REVOKE.
    pub decision: Decision,
    /// Why.
    pub note: String,
    /// With KEEP: the grant's new expiry.
    pub keep_until_ms: i64,
    /// Now.
    pub now_ms: i64,
}

/// What deactivation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deactivated {
    /// Sessions ended.
    pub sessions_revoked: u64,
    /// Grants removed.
    pub roles_removed: u64,
}

fn invalid(table: &'static str, id: &str, column: &'static str, value: &str) -> Error {
    Error::InvalidRow {
        table,
        id: id.to_owned(),
        column,
        value: format!("{value:?}"),
    }
}

fn role_column(row: &AnyRow, table: &'static str, id: &str) -> Result<Role> {
    let raw: String = row.try_get("role")?;
    Role::parse(&raw).ok_or_else(|| invalid(table, id, "role", &raw))
}

fn grant_from_row(row: &AnyRow) -> Result<GrantRow> {
    let user_id: String = row.try_get("user_id")?;
    Ok(GrantRow {
        role: role_column(row, "role_grants", &user_id)?,
        granted_by: row.try_get("granted_by")?,
        granted_at_ms: row.try_get("granted_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        user_id,
    })
}

fn count(row: &AnyRow, column: &str) -> Result<u32> {
    let n: i64 = row.try_get(column)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

const REVIEW_SELECT: &str = "SELECT r.id, r.trigger_kind, r.started_by, r.started_at_ms, \
    r.due_at_ms, r.closed_at_ms, \
    (SELECT COUNT(*) FROM access_review_items i WHERE i.review_id = r.id) AS items, \
    (SELECT COUNT(*) FROM access_review_items i WHERE i.review_id = r.id AND i.decision = 'keep') AS kept, \
    (SELECT COUNT(*) FROM access_review_items i WHERE i.review_id = r.id AND i.decision = 'revoke') AS revoked, \
    (SELECT COUNT(*) FROM access_review_items i WHERE i.review_id = r.id AND i.decision = 'expired') AS expired, \
    (SELECT COUNT(*) FROM access_review_items i WHERE i.review_id = r.id AND i.decision = '') AS undecided \
    FROM access_reviews r";

fn review_from_row(row: &AnyRow) -> Result<ReviewRow> {
    let id: String = row.try_get("id")?;
    let trigger: String = row.try_get("trigger_kind")?;
    Ok(ReviewRow {
        trigger: Trigger::parse(&trigger)
            .ok_or_else(|| invalid("access_reviews", &id, "trigger_kind", &trigger))?,
        started_by: row.try_get("started_by")?,
        started_at_ms: row.try_get("started_at_ms")?,
        due_at_ms: row.try_get("due_at_ms")?,
        closed_at_ms: row.try_get("closed_at_ms")?,
        items: count(row, "items")?,
        kept: count(row, "kept")?,
        revoked: count(row, "revoked")?,
        expired: count(row, "expired")?,
        undecided: count(row, "undecided")?,
        id,
    })
}

fn item_from_row(row: &AnyRow) -> Result<ReviewItemRow> {
    let review_id: String = row.try_get("review_id")?;
    let decision: String = row.try_get("decision")?;
    let decision = match decision.as_str() {
        "" => None,
        other => Some(
            Decision::parse(other)
                .ok_or_else(|| invalid("access_review_items", &review_id, "decision", other))?,
        ),
    };
    Ok(ReviewItemRow {
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        role: role_column(row, "access_review_items", &review_id)?,
        granted_by: row.try_get("granted_by")?,
        granted_at_ms: row.try_get("granted_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        decision,
        decided_by: row.try_get("decided_by")?,
        decided_at_ms: row.try_get("decided_at_ms")?,
        note: row.try_get("note")?,
        review_id,
    })
}

/// Serializes the writes that change who holds a role (PostgreSQL; SQLite's `BEGIN
/// IMMEDIATE` already does), so that two concurrent revocations cannot both see the other
/// admin and leave none, and two decisions cannot both miss closing their review. Taken
/// first in the transaction, before any row lock, so it cannot deadlock with them.
async fn lock_access(conn: &mut AnyConnection, backend: Backend) -> Result<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7355608203)")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Admins who may act right now: an unexpired `admin` grant, and not deactivated.
async fn active_admins(conn: &mut AnyConnection, now_ms: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM role_grants g JOIN users u ON u.id = g.user_id \
         WHERE g.role = 'admin' AND g.expires_at_ms > $1 AND u.deactivated_at_ms IS NULL",
    )
    .bind(now_ms)
    .fetch_one(conn)
    .await?)
}

/// True when the user holds an unexpired `admin` grant.
async fn holds_admin(conn: &mut AnyConnection, user_id: &str, now_ms: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM role_grants WHERE user_id = $1 AND role = 'admin' AND expires_at_ms > $2",
    )
    .bind(user_id)
    .bind(now_ms)
    .fetch_one(conn)
    .await?;
    Ok(n > 0)
}

async fn end_sessions(conn: &mut AnyConnection, user_id: &str) -> Result<u64> {
    Ok(sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(conn)
        .await?
        .rows_affected())
}

async fn review_in(conn: &mut AnyConnection, id: &str) -> Result<Option<ReviewRow>> {
    let row = sqlx::query(dyn_sql(format!("{REVIEW_SELECT} WHERE r.id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(review_from_row).transpose()
}

/// Inserts a review and its items: every unexpired grant of an active user, or only
/// `(user_id, role)` when given. Audits the start; returns the review.
async fn insert_review(
    conn: &mut AnyConnection,
    id: &str,
    trigger: Trigger,
    actor: &Actor,
    only: Option<(&str, Role)>,
    now_ms: i64,
    due_at_ms: i64,
) -> Result<ReviewRow> {
    sqlx::query(
        "INSERT INTO access_reviews (id, trigger_kind, started_by, started_at_ms, due_at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(trigger.as_str())
    .bind(&actor.user_id)
    .bind(now_ms)
    .bind(due_at_ms)
    .execute(&mut *conn)
    .await?;
    let snapshot = "INSERT INTO access_review_items \
        (review_id, user_id, role, granted_by, granted_at_ms, expires_at_ms) \
        SELECT $1, g.user_id, g.role, g.granted_by, g.granted_at_ms, g.expires_at_ms \
        FROM role_grants g JOIN users u ON u.id = g.user_id \
        WHERE g.expires_at_ms > $2 AND u.deactivated_at_ms IS NULL";
    match only {
        None => {
            sqlx::query(snapshot)
                .bind(id)
                .bind(now_ms)
                .execute(&mut *conn)
                .await?;
        }
        Some((user_id, role)) => {
            sqlx::query(dyn_sql(format!(
                "{snapshot} AND g.user_id = $3 AND g.role = $4"
            )))
            .bind(id)
            .bind(now_ms)
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *conn)
            .await?;
        }
    }
    let review = review_in(conn, id)
        .await?
        .ok_or(Error::NotFound("access review"))?;
    append_audit(
        conn,
        &actor.record(
            actions::REVIEW_START,
            id,
            detail(&[
                ("trigger", trigger.as_str().into()),
                ("items", review.items.into()),
                ("due_at_ms", due_at_ms.into()),
            ]),
        ),
        now_ms,
    )
    .await?;
    Ok(review)
}

/// Closes a review whose items are all decided (or expired just now), auditing its counts.
async fn close_review(
    conn: &mut AnyConnection,
    id: &str,
    actor: &Actor,
    now_ms: i64,
) -> Result<()> {
    sqlx::query("UPDATE access_reviews SET closed_at_ms = $1 WHERE id = $2")
        .bind(now_ms)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let review = review_in(conn, id)
        .await?
        .ok_or(Error::NotFound("access review"))?;
    append_audit(
        conn,
        &actor.record(
            actions::REVIEW_CLOSE,
            id,
            detail(&[
                ("items", review.items.into()),
                ("kept", review.kept.into()),
                ("revoked", review.revoked.into()),
                ("expired", review.expired.into()),
            ]),
        ),
        now_ms,
    )
    .await?;
    Ok(())
}

pub(super) const NO_AUDITS: [&AuditRecord; 0] = [];

impl Store {
    /// The unexpired grants of a user.
    pub async fn grants_of(&self, user_id: &str, now_ms: i64) -> Result<Vec<GrantRow>> {
        let rows = sqlx::query(
            "SELECT user_id, role, granted_by, granted_at_ms, expires_at_ms FROM role_grants \
             WHERE user_id = $1 AND expires_at_ms > $2 ORDER BY role",
        )
        .bind(user_id)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(grant_from_row).collect()
    }

    /// Gives `g.user_id` the role until `g.expires_at_ms` (renewing a grant they hold) and
    /// ends their sessions. A role the user did not hold opens a one-item role-change
    /// review. Refuses an unknown user (`NOT_FOUND`), a deactivated one, and one without a
    /// confirmed second factor (`MFA_NOT_ENROLLED`).
    pub async fn grant_role(&self, g: &NewGrant, actor: &Actor) -> Result<GrantOutcome> {
        let now = g.now_ms;
        self.commit_audited(NO_AUDITS, now, async |tx| {
            lock_access(tx, self.backend).await?;
            let user = sqlx::query(
                "SELECT CASE WHEN totp_secret_sealed IS NULL THEN 0 ELSE 1 END AS mfa, \
                 deactivated_at_ms FROM users WHERE id = $1",
            )
            .bind(&g.user_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound("user"))?;
            if user.try_get::<Option<i64>, _>("deactivated_at_ms")?.is_some() {
                return Err(Error::FailedPrecondition(
                    "the user is deactivated; ReactivateUser first",
                ));
            }
            if user.try_get::<i64, _>("mfa")? == 0 {
                return Err(Error::Precondition {
                    reason: PreconditionReason::MfaNotEnrolled,
                    message: "the user has no second factor; they must enroll TOTP before they get a role",
                });
            }
            retire_expired(tx, &g.user_id, g.role, now).await?;
            let held = sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM role_grants WHERE user_id = $1 AND role = $2",
            )
            .bind(&g.user_id)
            .bind(g.role.as_str())
            .fetch_one(&mut *tx)
            .await?
                > 0;
            sqlx::query(
                "INSERT INTO role_grants (user_id, role, granted_by, granted_at_ms, expires_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, role) DO UPDATE SET \
                 granted_by = excluded.granted_by, granted_at_ms = excluded.granted_at_ms, \
                 expires_at_ms = excluded.expires_at_ms",
            )
            .bind(&g.user_id)
            .bind(g.role.as_str())
            .bind(&actor.user_id)
            .bind(now)
            .bind(g.expires_at_ms)
            .execute(&mut *tx)
            .await?;
            let sessions = end_sessions(tx, &g.user_id).await?;
            append_audit(
                tx,
                &actor.record(
                    actions::ROLE_GRANT,
                    &g.user_id,
                    detail(&[
                        ("role", g.role.as_str().into()),
                        ("expires_at_ms", g.expires_at_ms.into()),
                        ("renewed", held.into()),
                        ("sessions_ended", sessions.into()),
                    ]),
                ),
                now,
            )
            .await?;
            let review_id = if held {
                None
            } else {
                insert_review(
                    tx,
                    &g.review_id,
                    Trigger::RoleChange,
                    actor,
                    Some((&g.user_id, g.role)),
                    now,
                    g.review_due_ms,
                )
                .await?;
                Some(g.review_id.clone())
            };
            Ok(Write::Commit(GrantOutcome {
                grant: GrantRow {
                    user_id: g.user_id.clone(),
                    role: g.role,
                    granted_by: actor.user_id.clone(),
                    granted_at_ms: now,
                    expires_at_ms: g.expires_at_ms,
                },
                review_id,
            }))
        })
        .await
    }

    /// Takes a role away and ends the user's sessions (also when they did not hold it).
    /// `Err(NotFound)` for an unknown user; `LAST_ADMIN` when it would leave no active admin.
    pub async fn revoke_role(
        &self,
        user_id: &str,
        role: Role,
        actor: &Actor,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            lock_access(tx, self.backend).await?;
            let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(Error::NotFound("user"));
            }
            let was_admin = role == Role::Admin && holds_admin(tx, user_id, now_ms).await?;
            let removed = sqlx::query("DELETE FROM role_grants WHERE user_id = $1 AND role = $2")
                .bind(user_id)
                .bind(role.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if was_admin && active_admins(tx, now_ms).await? == 0 {
                return Err(Error::Precondition {
                    reason: PreconditionReason::LastAdmin,
                    message: "the last admin cannot be revoked",
                });
            }
            let sessions = end_sessions(tx, user_id).await?;
            append_audit(
                tx,
                &actor.record(
                    actions::ROLE_REVOKE,
                    user_id,
                    detail(&[
                        ("role", role.as_str().into()),
                        ("held", (removed > 0).into()),
                        ("sessions_ended", sessions.into()),
                    ]),
                ),
                now_ms,
            )
            .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Grants past their expiry that nobody has recorded yet.
    pub async fn expired_grants(&self, now_ms: i64) -> Result<Vec<GrantRow>> {
        let rows = sqlx::query(
            "SELECT user_id, role, granted_by, granted_at_ms, expires_at_ms FROM role_grants \
             WHERE expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT 1000",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(grant_from_row).collect()
    }

    /// Records that a grant expired: removes it (if it is still the grant that expired at
    /// `expires_at_ms`) and writes `admin.role.expired`. Whoever removes the row writes
    /// the event, so each grant's expiry is audited exactly once. True when this call did.
    pub async fn expire_grant(
        &self,
        user_id: &str,
        role: Role,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool> {
        if expires_at_ms > now_ms {
            return Ok(false);
        }
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            let row = sqlx::query(
                "DELETE FROM role_grants WHERE user_id = $1 AND role = $2 AND expires_at_ms = $3 \
                 RETURNING user_id, role, granted_by, granted_at_ms, expires_at_ms",
            )
            .bind(user_id)
            .bind(role.as_str())
            .bind(expires_at_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(Write::Rollback(false));
            };
            append_audit(tx, &expired_record(&grant_from_row(&row)?), now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }

    /// Shuts a user out: ends every session, removes every grant, records when and why.
    /// `LAST_ADMIN` when they are the last active admin; `FAILED_PRECONDITION` when
    /// already deactivated.
    pub async fn deactivate_user(
        &self,
        user_id: &str,
        reason: &str,
        actor: &Actor,
        now_ms: i64,
    ) -> Result<Deactivated> {
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            lock_access(tx, self.backend).await?;
            let state: Option<Option<i64>> =
                sqlx::query_scalar("SELECT deactivated_at_ms FROM users WHERE id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match state {
                None => return Err(Error::NotFound("user")),
                Some(Some(_)) => {
                    return Err(Error::FailedPrecondition("the user is deactivated already"));
                }
                Some(None) => {}
            }
            let was_admin = holds_admin(tx, user_id, now_ms).await?;
            let roles_removed = sqlx::query("DELETE FROM role_grants WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE users SET deactivated_at_ms = $1, deactivation_reason = $2 WHERE id = $3",
            )
            .bind(now_ms)
            .bind(reason)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            if was_admin && active_admins(tx, now_ms).await? == 0 {
                return Err(Error::Precondition {
                    reason: PreconditionReason::LastAdmin,
                    message: "the last admin cannot be deactivated",
                });
            }
            let sessions_revoked = end_sessions(tx, user_id).await?;
            append_audit(
                tx,
                &actor.record(
                    actions::USER_DEACTIVATE,
                    user_id,
                    detail(&[
                        ("reason", reason.into()),
                        ("sessions_ended", sessions_revoked.into()),
                        ("roles_removed", roles_removed.into()),
                    ]),
                ),
                now_ms,
            )
            .await?;
            Ok(Write::Commit(Deactivated {
                sessions_revoked,
                roles_removed,
            }))
        })
        .await
    }

    /// Lets a deactivated user log in again; their roles stay removed.
    pub async fn reactivate_user(&self, user_id: &str, actor: &Actor, now_ms: i64) -> Result<()> {
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            lock_access(tx, self.backend).await?;
            let state: Option<Option<i64>> =
                sqlx::query_scalar("SELECT deactivated_at_ms FROM users WHERE id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match state {
                None => return Err(Error::NotFound("user")),
                Some(None) => return Err(Error::FailedPrecondition("the user is not deactivated")),
                Some(Some(_)) => {}
            }
            sqlx::query(
                "UPDATE users SET deactivated_at_ms = NULL, deactivation_reason = '' WHERE id = $1",
            )
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
            append_audit(
                tx,
                &actor.record(actions::USER_REACTIVATE, user_id, String::new()),
                now_ms,
            )
            .await?;
            Ok(Write::Commit(()))
        })
        .await
    }

    /// A page of users, oldest first, after `(created_at_ms, id)`, matching `filter`, each
    /// with their unexpired grants.
    pub async fn list_users(
        &self,
        filter: &UserFilter,
        after: Option<(i64, String)>,
        limit: u32,
        now_ms: i64,
    ) -> Result<Vec<UserWithRoles>> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        let mut arg = |a: Arg| {
            args.push(a);
            format!("${}", args.len())
        };
        if let Some((ms, id)) = after {
            let (ms1, id1) = (arg(Arg::Int(ms)), arg(Arg::Text(id)));
            clauses.push(format!(
                "(u.created_at_ms > {ms1} OR (u.created_at_ms = {ms1} AND u.id > {id1}))"
            ));
        }
        if let Some(text) = &filter.email_contains {
            let escaped = text
                .replace('!', "!!")
                .replace('%', "!%")
                .replace('_', "!_");
            let p = arg(Arg::Text(format!("%{escaped}%")));
            clauses.push(format!("LOWER(u.email) LIKE {p} ESCAPE '!'"));
        }
        match filter.status {
            Some(StatusFilter::Active) => clauses.push("u.deactivated_at_ms IS NULL".into()),
            Some(StatusFilter::Deactivated) => {
                clauses.push("u.deactivated_at_ms IS NOT NULL".into());
            }
            None => {}
        }
        match filter.role {
            Some(RoleFilter::Has(role)) => {
                let (r, now) = (arg(Arg::Text(role.as_str().into())), arg(Arg::Int(now_ms)));
                clauses.push(format!(
                    "EXISTS (SELECT 1 FROM role_grants g WHERE g.user_id = u.id AND g.role = {r} AND g.expires_at_ms > {now})"
                ));
            }
            Some(RoleFilter::None) => {
                let now = arg(Arg::Int(now_ms));
                clauses.push(format!(
                    "NOT EXISTS (SELECT 1 FROM role_grants g WHERE g.user_id = u.id AND g.expires_at_ms > {now})"
                ));
            }
            None => {}
        }
        let limit_p = arg(Arg::Int(i64::from(limit)));
        let where_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let columns = USER_COLUMNS
            .split(", ")
            .map(|c| format!("u.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM users u {where_sql} ORDER BY u.created_at_ms, u.id LIMIT {limit_p}"
        );
        let rows = bind_all(sql, args).fetch_all(&self.pool).await?;
        let users: Vec<UserRow> = rows.iter().map(user_from_row).collect::<Result<_>>()?;
        self.with_grants(users, now_ms).await
    }

    /// The user with their unexpired grants.
    pub async fn user_with_roles(&self, user_id: &str, now_ms: i64) -> Result<UserWithRoles> {
        let user = self
            .user_by_id(user_id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        let mut one = self.with_grants(vec![user], now_ms).await?;
        one.pop().ok_or(Error::NotFound("user"))
    }

    async fn with_grants(&self, users: Vec<UserRow>, now_ms: i64) -> Result<Vec<UserWithRoles>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![Arg::Int(now_ms)];
        let mut marks = Vec::with_capacity(users.len());
        for u in &users {
            args.push(Arg::Text(u.id.clone()));
            marks.push(format!("${}", args.len()));
        }
        let sql = format!(
            "SELECT user_id, role, granted_by, granted_at_ms, expires_at_ms FROM role_grants \
             WHERE expires_at_ms > $1 AND user_id IN ({}) ORDER BY user_id, role",
            marks.join(", ")
        );
        let grants: Vec<GrantRow> = bind_all(sql, args)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(grant_from_row)
            .collect::<Result<_>>()?;
        Ok(users
            .into_iter()
            .map(|user| {
                let mine = grants
                    .iter()
                    .filter(|g| g.user_id == user.id)
                    .cloned()
                    .collect();
                UserWithRoles { user, grants: mine }
            })
            .collect())
    }

    /// Starts a review of every unexpired grant of every active user.
    pub async fn start_review(
        &self,
        id: &str,
        trigger: Trigger,
        actor: &Actor,
        now_ms: i64,
        due_at_ms: i64,
    ) -> Result<ReviewRow> {
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            let review = insert_review(tx, id, trigger, actor, None, now_ms, due_at_ms).await?;
            Ok(Write::Commit(review))
        })
        .await
    }

    /// Starts a scheduled review when `interval_ms` has passed since the last manual or
    /// scheduled review started (before the first one: since the oldest grant was made);
    /// `None` when none is due or there is nothing to review.
    pub async fn start_scheduled_review(
        &self,
        id: &str,
        interval_ms: i64,
        now_ms: i64,
        due_at_ms: i64,
    ) -> Result<Option<ReviewRow>> {
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            if self.backend == Backend::Postgres {
                // Replicas sweep at once; one starts the review, the others then see it.
                sqlx::query("SELECT pg_advisory_xact_lock(7355608202)")
                    .execute(&mut *tx)
                    .await?;
            }
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(started_at_ms) FROM access_reviews WHERE trigger_kind IN ('manual', 'scheduled')",
            )
            .fetch_one(&mut *tx)
            .await?;
            let anchor = match last {
                Some(at) => Some(at),
                None => {
                    sqlx::query_scalar("SELECT MIN(granted_at_ms) FROM role_grants")
                        .fetch_one(&mut *tx)
                        .await?
                }
            };
            match anchor {
                Some(at) if now_ms.saturating_sub(at) >= interval_ms => {}
                _ => return Ok(Write::Rollback(None)),
            }
            let review = insert_review(
                tx,
                id,
                Trigger::Scheduled,
                &Actor::server(),
                None,
                now_ms,
                due_at_ms,
            )
            .await?;
            Ok(Write::Commit(Some(review)))
        })
        .await
    }

    /// One review.
    pub async fn review(&self, id: &str) -> Result<Option<ReviewRow>> {
        let mut conn = self.pool.acquire().await?;
        review_in(&mut conn, id).await
    }

    /// A page of reviews, newest first, before `(started_at_ms, id)`.
    pub async fn list_reviews(
        &self,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<ReviewRow>> {
        let rows = match before {
            None => {
                sqlx::query(dyn_sql(format!(
                    "{REVIEW_SELECT} ORDER BY r.started_at_ms DESC, r.id DESC LIMIT $1"
                )))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Some((ms, id)) => {
                sqlx::query(dyn_sql(format!(
                    "{REVIEW_SELECT} WHERE r.started_at_ms < $1 OR (r.started_at_ms = $1 AND r.id < $2) \
                     ORDER BY r.started_at_ms DESC, r.id DESC LIMIT $3"
                )))
                .bind(ms)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(review_from_row).collect()
    }

    /// The items of a review, by email then role.
    pub async fn review_items(&self, review_id: &str) -> Result<Vec<ReviewItemRow>> {
        let rows = sqlx::query(
            "SELECT i.review_id, i.user_id, u.email, i.role, i.granted_by, i.granted_at_ms, \
             i.expires_at_ms, i.decision, i.decided_by, i.decided_at_ms, i.note \
             FROM access_review_items i JOIN users u ON u.id = i.user_id \
             WHERE i.review_id = $1 ORDER BY u.email, i.role",
        )
        .bind(review_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(item_from_row).collect()
    }

    /// Decides one item: KEEP extends the grant to `keep_until_ms`, REVOKE removes it and
    /// ends the holder's sessions. The review closes when this was its last undecided item.
    pub async fn decide_item(&self, d: &ItemDecision, actor: &Actor) -> Result<()> {
        let now = d.now_ms;
        self.commit_audited(NO_AUDITS, now, async |tx| {
            lock_access(tx, self.backend).await?;
            let closed: Option<Option<i64>> =
                sqlx::query_scalar("SELECT closed_at_ms FROM access_reviews WHERE id = $1")
                    .bind(&d.review_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match closed {
                None => return Err(Error::NotFound("access review")),
                Some(Some(_)) => {
                    return Err(Error::FailedPrecondition("the access review is closed"));
                }
                Some(None) => {}
            }
            let decided: Option<String> = sqlx::query_scalar(
                "SELECT decision FROM access_review_items WHERE review_id = $1 AND user_id = $2 AND role = $3",
            )
            .bind(&d.review_id)
            .bind(&d.user_id)
            .bind(d.role.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            match decided.as_deref() {
                None => return Err(Error::NotFound("access review item")),
                Some("") => {}
                Some(_) => return Err(Error::FailedPrecondition("this item is decided already")),
            }
            let claimed = sqlx::query(
                "UPDATE access_review_items SET decision = $1, decided_by = $2, decided_at_ms = $3, note = $4 \
                 WHERE review_id = $5 AND user_id = $6 AND role = $7 AND decision = ''",
            )
            .bind(d.decision.as_str())
            .bind(&actor.user_id)
            .bind(now)
            .bind(&d.note)
            .bind(&d.review_id)
            .bind(&d.user_id)
            .bind(d.role.as_str())
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                return Err(Error::FailedPrecondition("this item is decided already"));
            }
            let mut sessions = 0;
            match d.decision {
                Decision::Keep => {
                    let kept = sqlx::query(
                        "UPDATE role_grants SET granted_by = $1, granted_at_ms = $2, expires_at_ms = $3 \
                         WHERE user_id = $4 AND role = $5 AND expires_at_ms > $2",
                    )
                    .bind(&actor.user_id)
                    .bind(now)
                    .bind(d.keep_until_ms)
                    .bind(&d.user_id)
                    .bind(d.role.as_str())
                    .execute(&mut *tx)
                    .await?;
                    if kept.rows_affected() == 0 {
                        return Err(Error::FailedPrecondition(
                            "the grant expired or was removed; grant the role again with GrantAdmin",
                        ));
                    }
                }
                Decision::Revoke | Decision::Expired => {
                    sqlx::query("DELETE FROM role_grants WHERE user_id = $1 AND role = $2")
                        .bind(&d.user_id)
                        .bind(d.role.as_str())
                        .execute(&mut *tx)
                        .await?;
                    sessions = end_sessions(tx, &d.user_id).await?;
                }
            }
            let mut pairs = vec![
                ("user_id", d.user_id.clone().into()),
                ("role", d.role.as_str().into()),
                ("decision", d.decision.as_str().into()),
                ("note", d.note.clone().into()),
            ];
            if d.decision == Decision::Keep {
                pairs.push(("expires_at_ms", d.keep_until_ms.into()));
            } else {
                pairs.push(("sessions_ended", sessions.into()));
            }
            append_audit(
                tx,
                &actor.record(actions::REVIEW_DECIDE, &d.review_id, detail(&pairs)),
                now,
            )
            .await?;
            let undecided: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM access_review_items WHERE review_id = $1 AND decision = ''",
            )
            .bind(&d.review_id)
            .fetch_one(&mut *tx)
            .await?;
            if undecided == 0 {
                close_review(tx, &d.review_id, actor, now).await?;
            }
            Ok(Write::Commit(()))
        })
        .await
    }

    /// Open reviews past their due time.
    pub async fn due_reviews(&self, now_ms: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM access_reviews WHERE closed_at_ms IS NULL AND due_at_ms <= $1 \
             ORDER BY due_at_ms",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Fails a due review closed: every undecided item becomes `expired`, its grant is
    /// removed (even the last admin's: see `docs/security.md`) and its holder's sessions
    /// end; each is audited, then the review closes with its counts. True when this call
    /// closed it.
    pub async fn close_due_review(&self, review_id: &str, now_ms: i64) -> Result<bool> {
        let server = Actor::server();
        self.commit_audited(NO_AUDITS, now_ms, async |tx| {
            lock_access(tx, self.backend).await?;
            // Claims the review: of two sweeps, the second finds it closed.
            let claimed = sqlx::query(
                "UPDATE access_reviews SET closed_at_ms = $1 \
                 WHERE id = $2 AND closed_at_ms IS NULL AND due_at_ms <= $1",
            )
            .bind(now_ms)
            .bind(review_id)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                return Ok(Write::Rollback(false));
            }
            let undecided = sqlx::query(
                "SELECT user_id, role FROM access_review_items \
                 WHERE review_id = $1 AND decision = '' ORDER BY user_id, role",
            )
            .bind(review_id)
            .fetch_all(&mut *tx)
            .await?;
            for row in &undecided {
                let user_id: String = row.try_get("user_id")?;
                let role = role_column(row, "access_review_items", review_id)?;
                let removed = sqlx::query("DELETE FROM role_grants WHERE user_id = $1 AND role = $2")
                    .bind(&user_id)
                    .bind(role.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let sessions = end_sessions(tx, &user_id).await?;
                sqlx::query(
                    "UPDATE access_review_items SET decision = 'expired', decided_at_ms = $1 \
                     WHERE review_id = $2 AND user_id = $3 AND role = $4",
                )
                .bind(now_ms)
                .bind(review_id)
                .bind(&user_id)
                .bind(role.as_str())
                .execute(&mut *tx)
                .await?;
                append_audit(
                    tx,
                    &server.record(
                        actions::REVIEW_DECIDE,
                        review_id,
                        detail(&[
                            ("user_id", user_id.clone().into()),
                            ("role", role.as_str().into()),
                            ("decision", Decision::Expired.as_str().into()),
                            ("grant_removed", (removed > 0).into()),
                            ("sessions_ended", sessions.into()),
                        ]),
                    ),
                    now_ms,
                )
                .await?;
                if role == Role::Admin && removed > 0 && active_admins(tx, now_ms).await? == 0 {
                    tracing::error!(
                        review_id,
                        "an access review expired the last admin's grant; recover with `tenantry-api bootstrap-admin`"
                    );
                }
            }
            close_review(tx, review_id, &server, now_ms).await?;
            Ok(Write::Commit(true))
        })
        .await
    }
}

/// Removes the user's grant of `role` if it has expired, auditing `admin.role.expired`:
/// a grant about to be replaced gets its expiry recorded first, exactly once.
pub(super) async fn retire_expired(
    conn: &mut AnyConnection,
    user_id: &str,
    role: Role,
    now_ms: i64,
) -> Result<()> {
    let row = sqlx::query(
        "DELETE FROM role_grants WHERE user_id = $1 AND role = $2 AND expires_at_ms <= $3 \
         RETURNING user_id, role, granted_by, granted_at_ms, expires_at_ms",
    )
    .bind(user_id)
    .bind(role.as_str())
    .bind(now_ms)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        append_audit(conn, &expired_record(&grant_from_row(&row)?), now_ms).await?;
    }
    Ok(())
}

/// The `admin.role.expired` row of a grant.
fn expired_record(grant: &GrantRow) -> AuditRecord {
    Actor::server().record(
        actions::ROLE_EXPIRED,
        &grant.user_id,
        detail(&[
            ("role", grant.role.as_str().into()),
            ("granted_by", grant.granted_by.clone().into()),
            ("expires_at_ms", grant.expires_at_ms.into()),
        ]),
    )
}
