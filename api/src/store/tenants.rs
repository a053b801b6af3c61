//! Tenants: lookups, membership, listing, retention, suspension, the status a provisioner
//! reports, and deletion.

use sqlx::Row;
use sqlx::any::AnyRow;
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{Plan, RetentionPolicy};

use super::audit::AuditRecord;
use super::{AnyQuery, Store, Write, dyn_sql};
use crate::error::{Error, Result};

/// A tenant row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    /// Id.
    pub id: String,
    /// DNS-label name.
    pub name: String,
    /// Owner.
    pub owner_user_id: String,
    /// Plan (stored as [`Plan::as_str`]).
    pub plan: Plan,
    /// Lifecycle phase (stored as [`TenantPhase::as_str`]).
    pub phase: TenantPhase,
    /// Suspended by an admin.
    pub suspended: bool,
    /// Retention the runtime enforces.
    pub retention: RetentionPolicy,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    /// Phase.
    pub phase: TenantPhase,
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

pub(super) const TENANT_COLUMNS: &str = "id, name, owner_user_id, plan, phase, suspended, \
    retention_max_age_hours, retention_max_count, endpoint, cert_serial, cert_not_after_ms, \
    cert_renewal_ms, message, created_at_ms";

/// Reads a tenant row; the one place where stored plans, phases and retention become typed.
pub(super) fn tenant_from_row(row: &AnyRow) -> Result<TenantRow> {
    let id: String = row.try_get("id")?;
    let count = |n: &i64| u32::try_from(*n).ok();
    Ok(TenantRow {
        name: row.try_get("name")?,
        owner_user_id: row.try_get("owner_user_id")?,
        plan: typed_column(row, &id, "plan", |s: &String| Plan::parse(s))?,
        phase: typed_column(row, &id, "phase", |s: &String| TenantPhase::parse(s))?,
        suspended: row.try_get::<i64, _>("suspended")? != 0,
        retention: RetentionPolicy {
            max_age_hours: typed_column(row, &id, "retention_max_age_hours", count)?,
            max_count: typed_column(row, &id, "retention_max_count", count)?,
        },
        endpoint: row.try_get("endpoint")?,
        cert_serial: row.try_get("cert_serial")?,
        cert_not_after_ms: row.try_get("cert_not_after_ms")?,
        cert_renewal_ms: row.try_get("cert_renewal_ms")?,
        message: row.try_get("message")?,
        created_at_ms: row.try_get("created_at_ms")?,
        id,
    })
}

/// Reads `column` of tenant `id` and converts it with `parse`. A value `parse` refuses (a
/// newer version's phase, a hand edit) is an error that names the tenant, the column and the
/// value: reading it as some default would show, provision or bill the wrong thing.
fn typed_column<V, T>(
    row: &AnyRow,
    id: &str,
    column: &'static str,
    parse: impl FnOnce(&V) -> Option<T>,
) -> Result<T>
where
    V: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + std::fmt::Debug,
{
    let raw: V = row.try_get(column)?;
    parse(&raw).ok_or_else(|| Error::InvalidRow {
        table: "tenants",
        id: id.to_owned(),
        column,
        value: format!("{raw:?}"),
    })
}

impl Store {
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
        self.tenant_page(after, limit)
            .await?
            .iter()
            .map(tenant_from_row)
            .collect()
    }

    /// The raw rows of one page of tenants in creation order.
    async fn tenant_page(&self, after: Option<(i64, String)>, limit: u32) -> Result<Vec<AnyRow>> {
        let (after_ms, after_id) = after.unwrap_or((i64::MIN, String::new()));
        Ok(sqlx::query(dyn_sql(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE created_at_ms > $1 OR (created_at_ms = $1 AND id > $2) \
             ORDER BY created_at_ms, id LIMIT $3"
        )))
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sets a tenant's retention and audits; returns the updated tenant, or
    /// `Err(NotFound)` if it does not exist.
    pub async fn set_retention(
        &self,
        tenant_id: &str,
        retention: RetentionPolicy,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<TenantRow> {
        self.update_tenant(
            tenant_id,
            "retention_max_age_hours = $3, retention_max_count = $4",
            |q| {
                q.bind(i64::from(retention.max_age_hours))
                    .bind(i64::from(retention.max_count))
            },
            audit,
            now_ms,
        )
        .await
    }

    /// Sets `suspended` and the phase, and audits; returns the updated tenant, or
    /// `Err(NotFound)` if it does not exist.
    pub async fn set_suspended(
        &self,
        tenant_id: &str,
        suspended: bool,
        phase: TenantPhase,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<TenantRow> {
        self.update_tenant(
            tenant_id,
            // A tenant awaiting its owner's verification stays so: only `VerifyEmail`
            // moves it on (and provisions it, suspended or not).
            "suspended = $3, phase = CASE WHEN phase = $5 THEN phase ELSE $4 END",
            |q| {
                q.bind(i64::from(suspended))
                    .bind(phase.as_str())
                    .bind(TenantPhase::AwaitingVerification.as_str())
            },
            audit,
            now_ms,
        )
        .await
    }

    /// An audited update of one tenant's columns: `assignments` sets them from `$3` on, in
    /// the order `bind` binds them (`$1` is the time, `$2` the id). Returns the updated
    /// tenant, or `Err(NotFound)` if it does not exist.
    async fn update_tenant(
        &self,
        tenant_id: &str,
        assignments: &str,
        bind: impl FnOnce(AnyQuery) -> AnyQuery,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<TenantRow> {
        self.commit_audited([audit], now_ms, async |tx| {
            let query = sqlx::query(dyn_sql(format!(
                "UPDATE tenants SET {assignments}, updated_at_ms = $1 WHERE id = $2 \
                 RETURNING {TENANT_COLUMNS}"
            )))
            .bind(now_ms)
            .bind(tenant_id);
            let row = bind(query).fetch_optional(&mut *tx).await?;
            let tenant = tenant_from_row(&row.ok_or(Error::NotFound("tenant"))?)?;
            Ok(Write::Commit(tenant))
        })
        .await
    }

    /// Records what the provisioner observed; writes only when something changed, and never
    /// over a tenant that is being deleted or awaits its owner's verification (which has
    /// no instance to observe). Returns whether it wrote.
    pub async fn set_tenant_status(
        &self,
        tenant_id: &str,
        status: &TenantStatus,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET phase = $1, endpoint = $2, cert_serial = $3, cert_not_after_ms = $4, \
             cert_renewal_ms = $5, message = $6, updated_at_ms = $7 \
             WHERE id = $8 AND phase <> $9 AND phase <> $10 AND NOT (phase = $1 AND endpoint = $2 AND \
             cert_serial = $3 AND cert_not_after_ms = $4 AND cert_renewal_ms = $5 AND message = $6)",
        )
        .bind(status.phase.as_str())
        .bind(&status.endpoint)
        .bind(&status.cert_serial)
        .bind(status.cert_not_after_ms)
        .bind(status.cert_renewal_ms)
        .bind(&status.message)
        .bind(now_ms)
        .bind(tenant_id)
        .bind(TenantPhase::Terminating.as_str())
        .bind(TenantPhase::AwaitingVerification.as_str())
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every tenant whose instance was serving (`Ready` or `Degraded`) goes back to
    /// `Provisioning` without an endpoint: for the `local` provisioner at start, whose
    /// runtimes stopped with the previous process, so nobody reads a `Ready` left by it
    /// before the new runtime answers. Returns how many changed.
    pub async fn mark_instances_starting(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE tenants SET phase = $1, endpoint = '', message = 'runtime starting', \
             updated_at_ms = $2 WHERE phase = $3 OR phase = $4",
        )
        .bind(TenantPhase::Provisioning.as_str())
        .bind(now_ms)
        .bind(TenantPhase::Ready.as_str())
        .bind(TenantPhase::Degraded.as_str())
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }

    /// Marks a tenant as being deleted (the provisioner then removes its instance) and
    /// audits; `Err(NotFound)` if it does not exist.
    pub async fn mark_terminating(
        &self,
        tenant_id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<()> {
        self.commit_audited([audit], now_ms, async |tx| {
            let done = sqlx::query(
                "UPDATE tenants SET phase = $3, endpoint = '', message = 'deleting the instance and its data', \
                 updated_at_ms = $1 WHERE id = $2",
            )
            .bind(now_ms)
            .bind(tenant_id)
            .bind(TenantPhase::Terminating.as_str())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound("tenant"));
            }
            Ok(Write::Commit(()))
        })
        .await
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
        self.commit(tx, None).await?;
        Ok(())
    }

    /// Every tenant this version can read, oldest first (paged internally); a row it cannot
    /// read is logged and left out.
    pub async fn all_tenants(&self) -> Result<Vec<TenantRow>> {
        const PAGE: u32 = 500;
        let mut out: Vec<TenantRow> = Vec::new();
        let mut after = None;
        loop {
            let page = self.tenant_page(after.clone(), PAGE).await?;
            for row in &page {
                after = Some((row.try_get("created_at_ms")?, row.try_get("id")?));
                match tenant_from_row(row) {
                    Ok(tenant) => out.push(tenant),
                    // One row this version cannot read (a newer version's phase during a
                    // rolling upgrade) must not stop the others from being reconciled.
                    Err(e) => {
                        tracing::error!(error = %e, "skipping a tenant row this version cannot read")
                    }
                }
            }
            if page.len() < PAGE as usize {
                return Ok(out);
            }
        }
    }
}
