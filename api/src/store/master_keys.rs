//! The master key ring's state in the database: which key seals (the primary), which keys
//! each serving API holds, and the sealed secrets a rotation re-seals. No key material is
//! stored here, only key ids.

use sqlx::Row as _;

use super::audit::AuditRecord;
use super::{Store, Write};
use crate::error::Result;

/// A serving API's report of the keys it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// Random per process.
    pub server_id: String,
    /// The host name, for people.
    pub host: String,
    /// The ids of the keys in its key file, oldest first.
    pub key_ids: Vec<String>,
    /// The key it seals with.
    pub primary_key_id: String,
    /// When it last reported.
    pub seen_at_ms: i64,
}

/// Where a sealed value lives, for re-sealing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedColumn {
    /// `users.totp_secret_sealed`.
    TotpSecret,
    /// `users.totp_pending_sealed`.
    TotpPending,
    /// The verification token in an unsent `mail_outbox.notice_json`.
    OutboxNotice,
    /// `token_keys.private_sealed`: the private halves of instance-token signing keys.
    TokenKey,
}

impl SealedColumn {
    /// Every place a sealed value lives.
    pub const ALL: [SealedColumn; 4] = [
        SealedColumn::TotpSecret,
        SealedColumn::TotpPending,
        SealedColumn::OutboxNotice,
        SealedColumn::TokenKey,
    ];

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SealedColumn::TotpSecret => "users.totp_secret_sealed",
            SealedColumn::TotpPending => "users.totp_pending_sealed",
            SealedColumn::OutboxNotice => "mail_outbox.notice_json",
            SealedColumn::TokenKey => "token_keys.private_sealed",
        }
    }

    /// (table, key column, value column, extra condition) of its rows.
    fn parts(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            SealedColumn::TotpSecret => ("users", "id", "totp_secret_sealed", ""),
            SealedColumn::TotpPending => ("users", "id", "totp_pending_sealed", ""),
            // Only verification mail holds a sealed value, and only until it is sent.
            SealedColumn::OutboxNotice => (
                "mail_outbox",
                "id",
                "notice_json",
                " AND sent_at_ms IS NULL AND kind = 'verify_email'",
            ),
            SealedColumn::TokenKey => ("token_keys", "kid", "private_sealed", ""),
        }
    }
}

/// One sealed value: its row's key and the stored text (the sealed value itself, or for
/// the outbox the notice JSON that holds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRow {
    /// The row's primary key.
    pub id: String,
    /// The stored text.
    pub stored: String,
}

impl Store {
    /// The primary master key's id, if one was ever recorded.
    pub async fn master_key_primary(&self) -> Result<Option<String>> {
        Ok(sqlx::query(
            "SELECT key_id FROM master_keys WHERE primary_since_ms IS NOT NULL \
             ORDER BY primary_since_ms DESC, key_id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|row| row.try_get::<String, _>(0))
        .transpose()?)
    }

    /// Records key `id` (no-op when known).
    pub async fn add_master_key(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO master_keys (key_id, added_at_ms) VALUES ($1, $2) \
             ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Makes `id` the primary when no key is, and returns the primary (which a concurrent
    /// first start may have set to its own key).
    pub async fn init_master_key_primary(&self, id: &str, now_ms: i64) -> Result<String> {
        self.add_master_key(id, now_ms).await?;
        sqlx::query(
            "UPDATE master_keys SET primary_since_ms = $1 WHERE key_id = $2 AND NOT EXISTS \
             (SELECT 1 FROM master_keys WHERE primary_since_ms IS NOT NULL)",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(self
            .master_key_primary()
            .await?
            .unwrap_or_else(|| id.to_owned()))
    }

    /// Makes `id` (already recorded) the primary, auditing it; false when it already was.
    pub async fn promote_master_key(
        &self,
        id: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        let id = id.to_owned();
        self.commit_audited([audit], now_ms, async |tx| {
            let current: Option<(String, i64)> = sqlx::query(
                "SELECT key_id, primary_since_ms FROM master_keys \
                 WHERE primary_since_ms IS NOT NULL \
                 ORDER BY primary_since_ms DESC, key_id LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| Ok::<_, sqlx::Error>((row.try_get(0)?, row.try_get(1)?)))
            .transpose()?;
            if current.as_ref().is_some_and(|(k, _)| *k == id) {
                return Ok(Write::Rollback(false));
            }
            // Strictly after the current primary, even if the clock went back.
            let since = current.map_or(now_ms, |(_, at)| now_ms.max(at + 1));
            sqlx::query("UPDATE master_keys SET primary_since_ms = $1 WHERE key_id = $2")
                .bind(since)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            Ok(Write::Commit(true))
        })
        .await
    }

    /// Records what a serving API holds; its report counts until `expires_at_ms`.
    pub async fn record_key_holder(&self, holder: &KeyHolder, expires_at_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO master_key_holders \
             (server_id, host, key_ids, primary_key_id, seen_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (server_id) DO UPDATE SET key_ids = excluded.key_ids, \
             primary_key_id = excluded.primary_key_id, seen_at_ms = excluded.seen_at_ms, \
             expires_at_ms = excluded.expires_at_ms",
        )
        .bind(&holder.server_id)
        .bind(&holder.host)
        .bind(holder.key_ids.join(","))
        .bind(&holder.primary_key_id)
        .bind(holder.seen_at_ms)
        .bind(expires_at_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        // Reports of servers that stopped long ago.
        sqlx::query("DELETE FROM master_key_holders WHERE expires_at_ms < $1")
            .bind(holder.seen_at_ms - 86_400_000)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Forgets a server's report (it is stopping).
    pub async fn drop_key_holder(&self, server_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM master_key_holders WHERE server_id = $1")
            .bind(server_id)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// The reports of the servers that are running (reported before their report expired).
    pub async fn live_key_holders(&self, now_ms: i64) -> Result<Vec<KeyHolder>> {
        let rows = sqlx::query(
            "SELECT server_id, host, key_ids, primary_key_id, seen_at_ms \
             FROM master_key_holders WHERE expires_at_ms >= $1 ORDER BY server_id",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let ids: String = row.try_get(2)?;
                Ok(KeyHolder {
                    server_id: row.try_get(0)?,
                    host: row.try_get(1)?,
                    key_ids: ids
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    primary_key_id: row.try_get(3)?,
                    seen_at_ms: row.try_get(4)?,
                })
            })
            .collect()
    }

    /// Up to `limit` sealed values of `column` with a row key above `after`, in key order;
    /// with `not_sealed_by`, only values not already sealed by that key.
    pub async fn sealed_values(
        &self,
        column: SealedColumn,
        after: &str,
        limit: i64,
        not_sealed_by: Option<&str>,
    ) -> Result<Vec<SealedRow>> {
        let (table, key, value, extra) = column.parts();
        let mut sql = format!(
            "SELECT {key}, {value} FROM {table} WHERE {value} IS NOT NULL AND {key} > $1{extra}"
        );
        if not_sealed_by.is_some() {
            sql.push_str(&format!(" AND {value} NOT LIKE $3"));
        }
        sql.push_str(&format!(" ORDER BY {key} LIMIT $2"));
        let mut query = sqlx::query(super::dyn_sql(sql))
            .bind(after.to_owned())
            .bind(limit);
        if let Some(id) = not_sealed_by {
            // The outbox's value is JSON around the sealed token.
            let pattern = match column {
                SealedColumn::OutboxNotice => format!("%\"mk1.{id}.%"),
                _ => format!("mk1.{id}.%"),
            };
            query = query.bind(pattern);
        }
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(SealedRow {
                    id: row.try_get(0)?,
                    stored: row.try_get(1)?,
                })
            })
            .collect()
    }

    /// Replaces sealed values in one statement, each only if it is still what was read (a
    /// concurrent change wins); returns how many were replaced.
    pub async fn reseal(
        &self,
        column: SealedColumn,
        changes: &[(SealedRow, String)],
    ) -> Result<u64> {
        if changes.is_empty() {
            return Ok(0);
        }
        let (table, key, value, _) = column.parts();
        // `UPDATE … FROM (VALUES …)`: SQLite (3.33+) and PostgreSQL both name the columns
        // of a VALUES list column1, column2, …
        let rows: Vec<String> = (0..changes.len())
            .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
            .collect();
        let sql = format!(
            "UPDATE {table} SET {value} = c.column3 FROM (VALUES {}) AS c \
             WHERE {table}.{key} = c.column1 AND {table}.{value} = c.column2",
            rows.join(", ")
        );
        let mut query = sqlx::query(super::dyn_sql(sql));
        for (old, new) in changes {
            query = query
                .bind(old.id.clone())
                .bind(old.stored.clone())
                .bind(new.clone());
        }
        Ok(query
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected())
    }
}
