//! The tenant's database: SQLite in the data directory (WAL, `secure_delete` on, temp
//! storage in memory so nothing is written outside the data directory), holding
//! executions and third-party credentials.
//!
//! Payloads and secrets are sealed with [`Sealer`] before they reach SQL; only what
//! queries need is stored in the clear: ids, times, workflow id, status, credential name
//! and kind. Times are Unix microseconds.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use sqlx::Row as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use crate::crypto::{Sealer, Table};
use crate::error::{Error, Result};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "runtime.db";

const SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS executions (
        id TEXT PRIMARY KEY NOT NULL,
        workflow_id TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        finished_at INTEGER,
        -- finished_at, or started_at while unfinished: what retention measures age from
        aged_at INTEGER NOT NULL,
        payload BLOB NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS executions_by_start ON executions (started_at, id)",
    "CREATE INDEX IF NOT EXISTS executions_by_age ON executions (aged_at)",
    "CREATE TABLE IF NOT EXISTS credentials (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        secret BLOB NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS credentials_by_creation ON credentials (created_at, id)",
];

/// The database, and the sealer for this tenant's records.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    sealer: std::sync::Arc<Sealer>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("sealer", &self.sealer)
            .finish_non_exhaustive()
    }
}

/// An execution to store.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewExecution {
    /// The workflow that ran.
    pub workflow_id: String,
    /// Its status (`running`, `success`, `error`, …; free text, 1 to 64 characters).
    pub status: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it finished; absent while it runs.
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    /// The execution data (any JSON); stored encrypted.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// A stored execution.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Execution {
    /// Its id.
    pub id: String,
    /// The workflow that ran.
    pub workflow_id: String,
    /// Its status.
    pub status: String,
    /// When it started (microsecond precision).
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
    /// The execution data.
    pub data: serde_json::Value,
}

/// An execution as listed: everything but its data (listing never decrypts, and a page
/// stays small however large the payloads are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExecutionSummary {
    /// Its id.
    pub id: String,
    /// The workflow that ran.
    pub workflow_id: String,
    /// Its status.
    pub status: String,
    /// When it started (microsecond precision).
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
}

/// A position in the newest-first execution listing: the last item returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    started_at: i64,
    id: String,
}

impl Cursor {
    /// The opaque form handed to clients.
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.started_at, self.id))
    }

    /// Parses [`Cursor::encode`]'s output; `None` if it is not one.
    pub fn decode(s: &str) -> Option<Cursor> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (started_at, id) = raw.split_once(':')?;
        Some(Cursor {
            started_at: started_at.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

/// One page of executions, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutionPage {
    /// The executions, without their data.
    pub items: Vec<ExecutionSummary>,
    /// Where the next page starts, if there is one.
    pub next_cursor: Option<Cursor>,
}

/// What a credential is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An API key.
    ApiKey,
    /// OAuth 2 client credentials or tokens.
    #[serde(rename = "oauth2")]
    OAuth2,
}

impl CredentialKind {
    /// The stored and serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::OAuth2 => "oauth2",
        }
    }

    fn parse(s: &str) -> Option<CredentialKind> {
        match s {
            "api_key" => Some(CredentialKind::ApiKey),
            "oauth2" => Some(CredentialKind::OAuth2),
            _ => None,
        }
    }
}

/// A credential's secret: a JSON object, kept as its text exactly as sent in a
/// wiped-on-drop string that `Debug` never shows. Deserializing refuses anything but an
/// object, with an error that does not repeat the value.
pub struct SecretJson(SecretString);

impl fmt::Debug for SecretJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretJson([REDACTED])")
    }
}

impl SecretJson {
    /// The JSON text of the secret object.
    pub fn expose_json(&self) -> &str {
        self.0.expose_secret()
    }
}

impl<'de> Deserialize<'de> for SecretJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        // The raw text goes straight into the wiped-on-drop string: parsing it into a
        // `serde_json::Value` first would leave the secret's strings in allocations that
        // are freed without being wiped. serde's own message would quote a wrong-typed
        // value, i.e. the secret.
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)
            .map_err(|_| D::Error::custom("secret must be a JSON object"))?;
        let text = SecretString::from(String::from(Box::<str>::from(raw)));
        if !text.expose_secret().starts_with('{') {
            return Err(D::Error::custom("secret must be a JSON object"));
        }
        Ok(SecretJson(text))
    }
}

/// A credential to store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    /// A name the tenant chooses (1 to 200 characters).
    pub name: String,
    /// What it is.
    pub kind: CredentialKind,
    /// The secret (a JSON object); stored encrypted, never returned by the HTTP API.
    pub secret: SecretJson,
}

/// What may be shown about a credential: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialMeta {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: CredentialKind,
    /// When it was stored.
    pub created_at: Timestamp,
}

fn micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

fn from_micros(table: &'static str, id: &str, us: i64) -> Result<Timestamp> {
    Timestamp::from_microsecond(us).map_err(|_| Error::Corrupt {
        table,
        id: id.to_owned(),
    })
}

/// A new random record id (UUID v4).
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| Error::Randomness)?;
    Ok(uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string())
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, which is created with mode
    /// 0700; the database file is created with mode 0600 (its WAL and shared-memory files
    /// inherit that).
    pub async fn open(data_dir: &Path, sealer: Sealer) -> Result<Store> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| Error::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
        let path = data_dir.join(DB_FILE);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| Error::DataDir {
                path: path.clone(),
                source,
            })?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // Deleted rows are overwritten with zeros, so retention really removes data.
            .pragma("secure_delete", "ON")
            // Sorts and temp tables stay in memory: the root filesystem is read-only.
            .pragma("temp_store", "MEMORY");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Store {
            pool,
            sealer: std::sync::Arc::new(sealer),
        })
    }

    /// Checkpoints the WAL and closes every connection.
    pub async fn close(&self) {
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        self.pool.close().await;
    }

    /// Succeeds when the executions table can be read.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1 FROM executions LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    /// The value of a `PRAGMA` on one of the pool's connections (for checks and tests).
    pub async fn pragma(&self, name: &'static str) -> Result<String> {
        let sql = match name {
            "secure_delete" => "PRAGMA secure_delete",
            "journal_mode" => "PRAGMA journal_mode",
            "temp_store" => "PRAGMA temp_store",
            _ => return Err(Error::UnknownPragma(name)),
        };
        let row = sqlx::query(sql).fetch_one(&self.pool).await?;
        let value: Result<String, _> = row.try_get(0);
        match value {
            Ok(s) => Ok(s),
            Err(_) => Ok(row.try_get::<i64, _>(0)?.to_string()),
        }
    }

    /// Stores an execution with its data sealed; returns its new id.
    pub async fn insert_execution(&self, new: &NewExecution) -> Result<String> {
        let id = new_id()?;
        let plaintext =
            Zeroizing::new(serde_json::to_vec(&new.data).map_err(|_| Error::Encrypt {
                table: Table::Executions.as_str(),
            })?);
        let sealed = self.sealer.seal(Table::Executions, &id, &plaintext)?;
        let started = micros(new.started_at);
        let finished = new.finished_at.map(micros);
        sqlx::query(
            "INSERT INTO executions
                (id, workflow_id, status, started_at, finished_at, aged_at, payload)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&new.workflow_id)
        .bind(&new.status)
        .bind(started)
        .bind(finished)
        .bind(finished.unwrap_or(started))
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    fn execution_from_row(&self, row: &SqliteRow) -> Result<Execution> {
        const T: &str = "executions";
        let id: String = row.try_get("id")?;
        let sealed: Vec<u8> = row.try_get("payload")?;
        let plaintext = self.sealer.open(Table::Executions, &id, &sealed)?;
        let data = serde_json::from_slice(&plaintext).map_err(|_| Error::Corrupt {
            table: T,
            id: id.clone(),
        })?;
        let finished: Option<i64> = row.try_get("finished_at")?;
        Ok(Execution {
            workflow_id: row.try_get("workflow_id")?,
            status: row.try_get("status")?,
            started_at: from_micros(T, &id, row.try_get("started_at")?)?,
            finished_at: finished.map(|us| from_micros(T, &id, us)).transpose()?,
            data,
            id,
        })
    }

    /// The execution `id`, decrypted; `None` if there is none.
    pub async fn get_execution(&self, id: &str) -> Result<Option<Execution>> {
        let row = sqlx::query(
            "SELECT id, workflow_id, status, started_at, finished_at, payload
             FROM executions WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| self.execution_from_row(&r)).transpose()
    }

    /// Up to `limit` executions (without data), newest (by `started_at`, then id) first,
    /// after `cursor`.
    pub async fn list_executions(
        &self,
        limit: u32,
        cursor: Option<&Cursor>,
    ) -> Result<ExecutionPage> {
        const T: &str = "executions";
        let fetch = i64::from(limit) + 1;
        let rows = match cursor {
            None => {
                sqlx::query(
                    "SELECT id, workflow_id, status, started_at, finished_at
                     FROM executions ORDER BY started_at DESC, id DESC LIMIT ?",
                )
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            }
            Some(c) => {
                sqlx::query(
                    "SELECT id, workflow_id, status, started_at, finished_at
                     FROM executions WHERE (started_at, id) < (?, ?)
                     ORDER BY started_at DESC, id DESC LIMIT ?",
                )
                .bind(c.started_at)
                .bind(&c.id)
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let has_more = rows.len() > limit as usize;
        let mut items = Vec::with_capacity(rows.len().min(limit as usize));
        for row in rows.iter().take(limit as usize) {
            let id: String = row.try_get("id")?;
            let finished: Option<i64> = row.try_get("finished_at")?;
            items.push(ExecutionSummary {
                workflow_id: row.try_get("workflow_id")?,
                status: row.try_get("status")?,
                started_at: from_micros(T, &id, row.try_get("started_at")?)?,
                finished_at: finished.map(|us| from_micros(T, &id, us)).transpose()?,
                id,
            });
        }
        let next_cursor = match (has_more, items.last()) {
            (true, Some(last)) => Some(Cursor {
                started_at: micros(last.started_at),
                id: last.id.clone(),
            }),
            _ => None,
        };
        Ok(ExecutionPage { items, next_cursor })
    }

    /// Deletes execution `id`; `false` if there was none.
    pub async fn delete_execution(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM executions WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// How many executions are stored.
    pub async fn count_executions(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT count(*) FROM executions")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Deletes at most `batch` executions whose age time is before `cutoff`; returns how
    /// many it deleted (fewer than `batch` means none are left).
    pub async fn prune_aged_batch(&self, cutoff: Timestamp, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM executions WHERE id IN
                (SELECT id FROM executions WHERE aged_at < ? ORDER BY aged_at LIMIT ?)",
        )
        .bind(micros(cutoff))
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The newest execution beyond the newest `keep`, i.e. the first one a count limit
    /// of `keep` removes; `None` if there are at most `keep`.
    pub async fn count_boundary(&self, keep: u32) -> Result<Option<Cursor>> {
        let row = sqlx::query(
            "SELECT started_at, id FROM executions
             ORDER BY started_at DESC, id DESC LIMIT 1 OFFSET ?",
        )
        .bind(i64::from(keep))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Cursor {
                started_at: r.try_get(0)?,
                id: r.try_get(1)?,
            })
        })
        .transpose()
    }

    /// Deletes at most `batch` executions at or before `boundary` in listing order
    /// (that is, `boundary` and everything older); returns how many it deleted.
    pub async fn prune_from_batch(&self, boundary: &Cursor, batch: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM executions WHERE id IN
                (SELECT id FROM executions WHERE (started_at, id) <= (?, ?)
                 ORDER BY started_at, id LIMIT ?)",
        )
        .bind(boundary.started_at)
        .bind(&boundary.id)
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Stores a credential with its secret sealed; returns its metadata.
    pub async fn insert_credential(
        &self,
        new: &NewCredential,
        now: Timestamp,
    ) -> Result<CredentialMeta> {
        let id = new_id()?;
        let sealed =
            self.sealer
                .seal(Table::Credentials, &id, new.secret.expose_json().as_bytes())?;
        sqlx::query(
            "INSERT INTO credentials (id, name, kind, created_at, secret) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(micros(now))
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        // Report the time as stored (microsecond precision), as a later listing will.
        let created_at = from_micros(Table::Credentials.as_str(), &id, micros(now))?;
        Ok(CredentialMeta {
            id,
            name: new.name.clone(),
            kind: new.kind,
            created_at,
        })
    }

    /// Every credential's metadata (never a secret), newest first.
    pub async fn list_credentials(&self) -> Result<Vec<CredentialMeta>> {
        const T: &str = "credentials";
        let rows = sqlx::query(
            "SELECT id, name, kind, created_at FROM credentials ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let kind: String = row.try_get("kind")?;
                Ok(CredentialMeta {
                    kind: CredentialKind::parse(&kind).ok_or_else(|| Error::Corrupt {
                        table: T,
                        id: id.clone(),
                    })?,
                    name: row.try_get("name")?,
                    created_at: from_micros(T, &id, row.try_get("created_at")?)?,
                    id,
                })
            })
            .collect()
    }

    /// The decrypted secret of credential `id` (for the workflows that use it; the HTTP
    /// API never returns it); `None` if there is none.
    pub async fn credential_secret(&self, id: &str) -> Result<Option<SecretString>> {
        let row = sqlx::query("SELECT secret FROM credentials WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let sealed: Vec<u8> = row.try_get(0)?;
        let plaintext = self.sealer.open(Table::Credentials, id, &sealed)?;
        let text = std::str::from_utf8(&plaintext).map_err(|_| Error::Corrupt {
            table: "credentials",
            id: id.to_owned(),
        })?;
        Ok(Some(SecretString::from(text)))
    }

    /// Deletes credential `id`; `false` if there was none.
    pub async fn delete_credential(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM credentials WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::crypto::DataKey;

    fn sealer(tenant: &str) -> Sealer {
        Sealer::new(&DataKey::from_bytes(&[9; 32]).unwrap(), tenant)
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn execution(started: i64, finished: Option<i64>) -> NewExecution {
        NewExecution {
            workflow_id: "wf".into(),
            status: "success".into(),
            started_at: ts(started),
            finished_at: finished.map(ts),
            data: serde_json::json!({"n": started}),
        }
    }

    #[tokio::test]
    async fn pragmas_are_wal_secure_delete_and_memory_temp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), sealer("acme")).await.unwrap();
        assert_eq!(store.pragma("journal_mode").await.unwrap(), "wal");
        assert_eq!(store.pragma("secure_delete").await.unwrap(), "1");
        assert_eq!(store.pragma("temp_store").await.unwrap(), "2");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The secret is sealed as the very text that was sent (key order, escapes), which
    /// also shows it never went through a parsed JSON value on the way.
    #[tokio::test]
    async fn a_credential_secret_is_stored_exactly_as_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), sealer("acme")).await.unwrap();
        let secret = r#"{"refresh_token":"r-1", "client_id":"c","access_token":"a \"q\" \u00e9"}"#;
        let body = format!(r#"{{"name": "crm", "kind": "oauth2", "secret": {secret} }}"#);
        let new: NewCredential = serde_json::from_str(&body).unwrap();
        assert_eq!(new.secret.expose_json(), secret);
        let meta = store.insert_credential(&new, ts(1)).await.unwrap();
        let stored = store.credential_secret(&meta.id).await.unwrap().unwrap();
        assert_eq!(stored.expose_secret(), secret);
        for not_object in [r#""sk-1""#, "[1]", "7", "null"] {
            let body = format!(r#"{{"name": "n", "kind": "api_key", "secret": {not_object}}}"#);
            let e = serde_json::from_str::<NewCredential>(&body).unwrap_err();
            assert!(
                e.to_string().starts_with("secret must be a JSON object"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn pages_walk_every_execution_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), sealer("acme")).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..7 {
            // Two executions share each start time, so ties are ordered by id.
            ids.push(
                store
                    .insert_execution(&execution(1000 + i / 2, None))
                    .await
                    .unwrap(),
            );
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.list_executions(3, cursor.as_ref()).await.unwrap();
            assert!(page.items.len() <= 3);
            seen.extend(page.items.iter().map(|e| (e.started_at, e.id.clone())));
            match page.next_cursor {
                Some(c) => cursor = Some(Cursor::decode(&c.encode()).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen.len(), 7);
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(seen, sorted);
        assert!(Cursor::decode("not a cursor").is_none());
    }

    #[tokio::test]
    async fn count_pruning_keeps_exactly_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), sealer("acme")).await.unwrap();
        for i in 0..10 {
            store
                .insert_execution(&execution(2000 + i, Some(2100 + i)))
                .await
                .unwrap();
        }
        let boundary = store.count_boundary(4).await.unwrap().unwrap();
        assert_eq!(boundary.started_at, micros(ts(2005)));
        assert_eq!(store.prune_from_batch(&boundary, 4).await.unwrap(), 4);
        assert_eq!(store.prune_from_batch(&boundary, 4).await.unwrap(), 2);
        assert_eq!(store.prune_from_batch(&boundary, 4).await.unwrap(), 0);
        let left = store.list_executions(100, None).await.unwrap();
        let starts: Vec<i64> = left
            .items
            .iter()
            .map(|e| e.started_at.as_second())
            .collect();
        assert_eq!(starts, vec![2009, 2008, 2007, 2006]);
        assert!(store.count_boundary(4).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn moved_ciphertext_and_other_tenant_fail_to_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), sealer("acme")).await.unwrap();
        let a = store.insert_execution(&execution(1, None)).await.unwrap();
        let b = store.insert_execution(&execution(2, None)).await.unwrap();
        // Copy a's sealed payload into b's row.
        sqlx::query("UPDATE executions SET payload = (SELECT payload FROM executions WHERE id = ?) WHERE id = ?")
            .bind(&a)
            .bind(&b)
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(store.get_execution(&a).await.unwrap().is_some());
        let err = store.get_execution(&b).await.unwrap_err();
        assert!(matches!(err, Error::Decrypt { .. }), "{err}");
        store.close().await;

        // The same file opened as another tenant (same key) decrypts nothing.
        let other = Store::open(dir.path(), sealer("globex")).await.unwrap();
        assert!(matches!(
            other.get_execution(&a).await,
            Err(Error::Decrypt { .. })
        ));
    }
}
