//! The instance-token signing key ring (`token_keys`): one row per key, its public half in
//! the clear and its private half sealed with the master key (context `token-key:<kid>`),
//! until the key retires and the private half is deleted. The rules (which key signs,
//! which are published, when one retires) live in [`crate::token_keys`]; this module only
//! reads and writes rows, each change with its audit rows in one transaction.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::audit::AuditRecord;
use super::{Backend, Store, Write};
use crate::error::Result;

/// One key of the ring.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKeyRow {
    /// The key id ([`tenantry_proto::token::key_id`]).
    pub kid: String,
    /// The public key, `SubjectPublicKeyInfo` PEM.
    pub public_pem: String,
    /// The PKCS#8 PEM private key, sealed with the master key; `None` once retired.
    pub private_sealed: Option<String>,
    /// When the key was added (Unix ms).
    pub created_at_ms: i64,
    /// From when the API signs with it, if it is the newest such key (Unix ms).
    pub signs_from_ms: i64,
    /// When it leaves the published set, its private half deleted; `None` until a newer
    /// key supersedes it.
    pub retires_at_ms: Option<i64>,
}

impl std::fmt::Debug for TokenKeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sealed private half is ciphertext, but there is no reason to print it.
        f.debug_struct("TokenKeyRow")
            .field("kid", &self.kid)
            .field("has_private", &self.private_sealed.is_some())
            .field("created_at_ms", &self.created_at_ms)
            .field("signs_from_ms", &self.signs_from_ms)
            .field("retires_at_ms", &self.retires_at_ms)
            .finish_non_exhaustive()
    }
}

/// What [`Store::add_token_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddedKey {
    /// The key is in the ring; the keys it supersedes retire at the time given.
    Added {
        /// Kids whose `retires_at_ms` was set by this rotation.
        superseding: Vec<String>,
    },
    /// A key added earlier does not sign yet: one rotation at a time.
    Pending {
        /// That key.
        kid: String,
        /// When it starts signing.
        signs_from_ms: i64,
    },
}

const COLUMNS: &str =
    "kid, public_pem, private_sealed, created_at_ms, signs_from_ms, retires_at_ms";

fn key_from_row(row: &AnyRow) -> Result<TokenKeyRow> {
    Ok(TokenKeyRow {
        kid: row.try_get("kid")?,
        public_pem: row.try_get("public_pem")?,
        private_sealed: row.try_get("private_sealed")?,
        created_at_ms: row.try_get("created_at_ms")?,
        signs_from_ms: row.try_get("signs_from_ms")?,
        retires_at_ms: row.try_get("retires_at_ms")?,
    })
}

async fn insert(conn: &mut AnyConnection, key: &TokenKeyRow) -> Result<u64> {
    let done = sqlx::query(
        "INSERT INTO token_keys (kid, public_pem, private_sealed, created_at_ms, signs_from_ms, retires_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kid) DO NOTHING",
    )
    .bind(&key.kid)
    .bind(&key.public_pem)
    .bind(key.private_sealed.clone())
    .bind(key.created_at_ms)
    .bind(key.signs_from_ms)
    .bind(key.retires_at_ms)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Serializes changes of the ring on PostgreSQL (SQLite's `BEGIN IMMEDIATE` already
/// does), so two rotations run at once cannot both find no pending key.
async fn lock_ring(conn: &mut AnyConnection, backend: Backend) -> Result<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7355608202)")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

impl Store {
    /// Every key of the ring, retired ones included, oldest first.
    pub async fn token_keys(&self) -> Result<Vec<TokenKeyRow>> {
        let rows = sqlx::query(super::dyn_sql(format!(
            "SELECT {COLUMNS} FROM token_keys ORDER BY signs_from_ms, created_at_ms, kid"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Adds `key` as the ring's first key, if the ring is empty (several replicas may
    /// start at once: one adds it, the others find it there). Returns whether it did.
    pub async fn import_first_token_key(
        &self,
        key: &TokenKeyRow,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        let backend = self.backend;
        self.commit_audited([audit], now_ms, async |conn: &mut AnyConnection| {
            lock_ring(conn, backend).await?;
            let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_keys")
                .fetch_one(&mut *conn)
                .await?;
            if existing > 0 {
                return Ok(Write::Rollback(false));
            }
            Ok(match insert(conn, key).await? {
                0 => Write::Rollback(false),
                _ => Write::Commit(true),
            })
        })
        .await
    }

    /// A rotation: adds `key` (which signs from `key.signs_from_ms`) and sets
    /// `retires_at_ms` on every key that has none yet (they are superseded), unless a key
    /// added earlier is still waiting to sign at `now_ms`. Audited with `audit`.
    pub async fn add_token_key(
        &self,
        key: &TokenKeyRow,
        retire_superseded_at_ms: i64,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<AddedKey> {
        let backend = self.backend;
        self.commit_audited([audit], now_ms, async |conn: &mut AnyConnection| {
            lock_ring(conn, backend).await?;
            let pending = sqlx::query(
                "SELECT kid, signs_from_ms FROM token_keys \
                 WHERE signs_from_ms > $1 AND private_sealed IS NOT NULL \
                 ORDER BY signs_from_ms LIMIT 1",
            )
            .bind(now_ms)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = pending {
                return Ok(Write::Rollback(AddedKey::Pending {
                    kid: row.try_get("kid")?,
                    signs_from_ms: row.try_get("signs_from_ms")?,
                }));
            }
            let superseding: Vec<String> = sqlx::query_scalar(
                "SELECT kid FROM token_keys WHERE retires_at_ms IS NULL ORDER BY kid",
            )
            .fetch_all(&mut *conn)
            .await?;
            sqlx::query("UPDATE token_keys SET retires_at_ms = $1 WHERE retires_at_ms IS NULL")
                .bind(retire_superseded_at_ms)
                .execute(&mut *conn)
                .await?;
            insert(conn, key).await?;
            Ok(Write::Commit(AddedKey::Added { superseding }))
        })
        .await
    }

    /// Retires `kid` if it is due at `now_ms` and not retired yet: deletes its sealed
    /// private half (the public half stays, for the record). Audited with `audit` only
    /// when it did something, so replicas racing to retire the same key write one row.
    pub async fn retire_token_key(
        &self,
        kid: &str,
        audit: &AuditRecord,
        now_ms: i64,
    ) -> Result<bool> {
        self.commit_audited([audit], now_ms, async |conn: &mut AnyConnection| {
            let done = sqlx::query(
                "UPDATE token_keys SET private_sealed = NULL \
                 WHERE kid = $1 AND private_sealed IS NOT NULL \
                 AND retires_at_ms IS NOT NULL AND retires_at_ms <= $2",
            )
            .bind(kid)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
            Ok(match done.rows_affected() {
                0 => Write::Rollback(false),
                _ => Write::Commit(true),
            })
        })
        .await
    }
}
