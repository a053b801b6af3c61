//! The tenant's database: SQLite in the data directory (WAL, `secure_delete` on, temp
//! storage in memory so nothing is written outside the data directory), holding
//! executions and third-party credentials.
//!
//! Payloads and secrets are sealed with the instance's data keys ([`Keyring`]) before they
//! reach SQL: an execution under the key of its period (the period of `aged_at`, the time
//! retention ages it from, which never changes once written), everything else under the
//! credential key. Only what
//! queries need is stored in the clear: ids, times, workflow id, status, credential name
//! and kind, and an OAuth 2 grant's provider settings (endpoints, client id, scopes,
//! redirect URL), state and counts. Its access and refresh tokens and the PKCE verifiers
//! of authorizations in progress are sealed. Times are Unix microseconds.

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

use crate::crypto::{SealedWith, Table, sealed_with};
use crate::error::{Error, Result};
use crate::keystore::Keyring;

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "runtime.db";

const SCHEMA: [&str; 9] = [
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
    // One row per `oauth2` credential. `tokens` is sealed and NULL unless connected;
    // `token_version` grows with every token write, so a refresh that raced with a
    // reconnect or a delete cannot overwrite newer tokens.
    "CREATE TABLE IF NOT EXISTS oauth2_grants (
        credential_id TEXT PRIMARY KEY NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
        settings TEXT NOT NULL,
        state TEXT NOT NULL,
        tokens BLOB,
        token_version INTEGER NOT NULL DEFAULT 0,
        access_expires_at INTEGER,
        refresh_at INTEGER,
        refresh_failures INTEGER NOT NULL DEFAULT 0,
        refreshes INTEGER NOT NULL DEFAULT 0,
        token_uses INTEGER NOT NULL DEFAULT 0,
        connected_at INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS oauth2_grants_by_refresh ON oauth2_grants (refresh_at)",
    // Authorizations in progress: the SHA-256 of `state`, who may complete it, and the
    // sealed PKCE verifier. A row is deleted when it is used, so a `state` works once.
    "CREATE TABLE IF NOT EXISTS oauth2_states (
        state_hash TEXT PRIMARY KEY NOT NULL,
        credential_id TEXT NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
        subject TEXT NOT NULL,
        token_id TEXT NOT NULL,
        verifier BLOB NOT NULL,
        expires_at INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS oauth2_states_by_expiry ON oauth2_states (expires_at)",
];

/// The database, and the data keys of this tenant's records.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    keys: std::sync::Arc<Keyring>,
    migrated_at_open: u64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Records migrated per transaction from the version-1 format.
const MIGRATE_BATCH: i64 = 500;

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
        // The raw value's check skips what `\u` escapes name; a lone UTF-16 surrogate
        // would be stored as text no JSON reader accepts later (found by fuzzing).
        if has_lone_surrogate(text.expose_secret().as_bytes()) {
            return Err(D::Error::custom(
                "secret must be valid JSON: a \\u escape names half of a UTF-16 pair",
            ));
        }
        Ok(SecretJson(text))
    }
}

/// Whether JSON text (already known to be well-formed apart from this) has a `\uXXXX`
/// escape naming a UTF-16 surrogate that is not part of a high-low pair.
fn has_lone_surrogate(json: &[u8]) -> bool {
    let unit = |at: usize| -> Option<u16> {
        let hex = json.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        if json.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match unit(i + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = (json.get(i + 6..i + 8) == Some(b"\\u".as_slice()))
                    .then(|| unit(i + 8))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => i += 6,
        }
    }
    false
}

/// A credential to store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    /// A name the tenant chooses (1 to 200 characters).
    pub name: String,
    /// What it is.
    pub kind: CredentialKind,
    /// The secret (a JSON object); stored encrypted, never returned by the HTTP API. For
    /// `oauth2`, `{"client_secret": "…"}`.
    pub secret: SecretJson,
    /// The provider settings; required for `oauth2`, refused for other kinds.
    #[serde(default)]
    pub oauth2: Option<OAuth2Settings>,
}

/// The provider settings of an `oauth2` credential (none of them secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Settings {
    /// The provider's authorization endpoint (the user's browser goes there).
    pub authorization_url: String,
    /// The provider's token endpoint (the runtime calls it).
    pub token_url: String,
    /// The provider's RFC 7009 revocation endpoint, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_url: Option<String>,
    /// The client id registered at the provider.
    pub client_id: String,
    /// The scopes asked for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Where the provider sends the user back with the code (registered at the provider).
    pub redirect_url: String,
}

/// Where an OAuth 2 grant stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// No tokens yet: the authorization flow has not been completed.
    NotConnected,
    /// Tokens held and refreshed.
    Connected,
    /// The provider refused the refresh token (`invalid_grant`); the tokens are gone and
    /// the user must authorize again.
    NeedsReauthorization,
}

impl GrantState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::NotConnected => "not_connected",
            GrantState::Connected => "connected",
            GrantState::NeedsReauthorization => "needs_reauthorization",
        }
    }

    fn parse(s: &str) -> Option<GrantState> {
        match s {
            "not_connected" => Some(GrantState::NotConnected),
            "connected" => Some(GrantState::Connected),
            "needs_reauthorization" => Some(GrantState::NeedsReauthorization),
            _ => None,
        }
    }
}

/// What may be shown about an OAuth 2 grant: its settings, state and counts, never a
/// token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantStatus {
    /// The provider settings.
    #[serde(flatten)]
    pub settings: OAuth2Settings,
    /// Where it stands.
    pub state: GrantState,
    /// When the access token held now expires (`None` when none is held, or the provider
    /// gave no lifetime).
    pub access_token_expires_at: Option<Timestamp>,
    /// When the last authorization completed.
    pub connected_at: Option<Timestamp>,
    /// Successful refreshes since then.
    pub refreshes: i64,
    /// Access tokens handed to executions (the audit count).
    pub access_token_uses: i64,
}

/// A grant's access and refresh tokens; sealed as one record, never printed.
pub struct GrantTokens {
    /// The current access token.
    pub access: SecretString,
    /// The refresh token, when the provider gave one.
    pub refresh: Option<SecretString>,
}

impl fmt::Debug for GrantTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GrantTokens([REDACTED])")
    }
}

/// The wire form of [`GrantTokens`] inside the sealed record.
#[derive(Serialize, Deserialize)]
struct TokensRecord<T> {
    access_token: T,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<T>,
}

/// An OAuth 2 grant as the refresher and the flows need it.
#[derive(Debug)]
pub struct Grant {
    /// The credential's id.
    pub credential_id: String,
    /// The provider settings.
    pub settings: OAuth2Settings,
    /// Where it stands.
    pub state: GrantState,
    /// The tokens, when connected.
    pub tokens: Option<GrantTokens>,
    /// The version of the tokens read (see [`Store::update_grant_tokens`]).
    pub token_version: i64,
    /// Consecutive failed refreshes.
    pub refresh_failures: i64,
}

/// What deleting a credential removed.
#[derive(Debug)]
pub struct DeletedCredential {
    /// What it was.
    pub kind: CredentialKind,
    /// For an OAuth 2 grant: what revoking it at the provider needs.
    pub grant: Option<DeletedGrant>,
}

/// The part of a deleted OAuth 2 grant that revocation at the provider needs.
#[derive(Debug)]
pub struct DeletedGrant {
    /// The provider settings.
    pub settings: OAuth2Settings,
    /// The client secret.
    pub client_secret: SecretString,
    /// The tokens it held, if connected.
    pub tokens: Option<GrantTokens>,
}

/// An authorization in progress, as recorded for its callback.
#[derive(Debug)]
pub struct PendingAuthorization<'a> {
    /// Hex SHA-256 of the `state` handed out (the value itself is not kept).
    pub state_hash: &'a str,
    /// The credential being connected.
    pub credential_id: &'a str,
    /// The caller's subject, who alone may complete it...
    pub subject: &'a str,
    /// ... with the same token (its `jti`).
    pub token_id: &'a str,
    /// The PKCE verifier (sealed in the store).
    pub verifier: &'a SecretString,
    /// When the callback stops accepting it.
    pub expires_at: Timestamp,
}

/// The outcome of a token write guarded by a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The row held the expected version and was updated.
    Yes,
    /// The row changed or disappeared meanwhile; nothing was written.
    Stale,
}

impl Written {
    /// The outcome of a guarded `UPDATE` that touched `rows` rows.
    fn from_rows(rows: u64) -> Written {
        if rows > 0 {
            Written::Yes
        } else {
            Written::Stale
        }
    }
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
    /// For `oauth2`: the grant's settings, state and access-token expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<GrantStatus>,
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

/// Opens (creating if needed) the SQLite file `name` in `data_dir` (the directory made
/// with mode 0700, the file with 0600; its WAL and shared-memory files inherit that):
/// WAL journal, `secure_delete` on (deleted rows are overwritten with zeros, so deleting
/// really removes data), temp storage in memory (the root filesystem is read-only).
pub(crate) async fn open_private_sqlite(
    data_dir: &Path,
    name: &str,
    synchronous: SqliteSynchronous,
    max_connections: u32,
) -> Result<SqlitePool> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| Error::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
    let path = data_dir.join(name);
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
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .pragma("secure_delete", "ON")
        .pragma("temp_store", "MEMORY");
    Ok(SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await?)
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, which is created with mode
    /// 0700; the database file is created with mode 0600 (its WAL and shared-memory files
    /// inherit that). Records still in the version-1 format (sealed directly under the
    /// configured key) are re-sealed under data keys first.
    pub async fn open(data_dir: &Path, keys: Keyring) -> Result<Store> {
        let pool = open_private_sqlite(data_dir, DB_FILE, SqliteSynchronous::Normal, 4).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let mut store = Store {
            pool,
            keys: std::sync::Arc::new(keys),
            migrated_at_open: 0,
        };
        let migrated = store.migrate_v1().await?;
        store.migrated_at_open = migrated;
        if migrated > 0 {
            tracing::info!(
                records = migrated,
                "re-sealed version-1 records under data keys"
            );
        }
        Ok(store)
    }

    /// Version-1 records re-sealed under data keys when the store was opened.
    pub fn migrated_at_open(&self) -> u64 {
        self.migrated_at_open
    }

    /// The data keys.
    pub fn keys(&self) -> &std::sync::Arc<Keyring> {
        &self.keys
    }

    /// Re-seals every version-1 record under its data key, in batches of one transaction
    /// each. Idempotent and resumable: it looks only for version-1 records, and each row is
    /// rewritten only if it still holds what was read.
    async fn migrate_v1(&self) -> Result<u64> {
        let tables: [(Table, &str, &str, Option<&str>); 4] = [
            (Table::Executions, "id", "payload", Some("aged_at")),
            (Table::Credentials, "id", "secret", None),
            (Table::OAuth2Grants, "credential_id", "tokens", None),
            (Table::OAuth2States, "state_hash", "verifier", None),
        ];
        let mut total = 0;
        for (table, id_col, blob_col, aged_col) in tables {
            let name = table.as_str();
            let aged = aged_col.unwrap_or("0");
            let select = format!(
                "SELECT rowid, {id_col}, {blob_col}, {aged} FROM {name}
                 WHERE rowid > ? AND substr({blob_col}, 1, 1) = x'01' ORDER BY rowid LIMIT ?"
            );
            let update =
                format!("UPDATE {name} SET {blob_col} = ? WHERE {id_col} = ? AND {blob_col} = ?");
            let mut after = 0i64;
            loop {
                // The names come from the fixed list above, never from input.
                let rows = sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
                    .bind(after)
                    .bind(MIGRATE_BATCH)
                    .fetch_all(&self.pool)
                    .await?;
                let Some(last) = rows.last() else { break };
                after = last.try_get(0)?;
                // Nothing serves requests yet; the lease only matters for a second process.
                let _lease = self.keys.lease().await;
                let mut resealed = Vec::with_capacity(rows.len());
                for row in &rows {
                    let id: String = row.try_get(1)?;
                    let sealed: Vec<u8> = row.try_get(2)?;
                    if sealed_with(&sealed) != Some(SealedWith::Version1) {
                        continue;
                    }
                    let plain = self.keys.open_v1(table, &id, &sealed)?;
                    let key = match table {
                        Table::Executions => self.keys.execution_key(row.try_get(3)?).await?,
                        _ => self.keys.credential_key().await?,
                    };
                    resealed.push((key.seal(table, &id, &plain)?, id, sealed));
                }
                let mut tx = self.pool.begin().await?;
                for (new, id, old) in &resealed {
                    total += sqlx::query(sqlx::AssertSqlSafe(update.as_str()))
                        .bind(new)
                        .bind(id)
                        .bind(old)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
            }
        }
        Ok(total)
    }

    /// Whether an execution is aged from a time in `[start_us, end_us)` (so a data key of
    /// that period may still be in use).
    pub async fn has_executions_aged_between(&self, start_us: i64, end_us: i64) -> Result<bool> {
        Ok(
            sqlx::query("SELECT 1 FROM executions WHERE aged_at >= ? AND aged_at < ? LIMIT 1")
                .bind(start_us)
                .bind(end_us)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Moves the WAL into the database file (so a copy of the file alone is complete).
    pub async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
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
        let started = micros(new.started_at);
        let finished = new.finished_at.map(micros);
        let aged = finished.unwrap_or(started);
        // Held until the row is committed: its key cannot be retired meanwhile.
        let _lease = self.keys.lease().await;
        let sealed =
            self.keys
                .execution_key(aged)
                .await?
                .seal(Table::Executions, &id, &plaintext)?;
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
        .bind(aged)
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    fn execution_from_row(&self, row: &SqliteRow) -> Result<Execution> {
        const T: &str = "executions";
        let id: String = row.try_get("id")?;
        let sealed: Vec<u8> = row.try_get("payload")?;
        let plaintext = self.keys.open_record(Table::Executions, &id, &sealed)?;
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

    /// Stores a credential with its secret sealed (and, for `oauth2`, its grant, not yet
    /// connected); returns its metadata.
    pub async fn insert_credential(
        &self,
        new: &NewCredential,
        now: Timestamp,
    ) -> Result<CredentialMeta> {
        let id = new_id()?;
        let sealed = self.keys.credential_key().await?.seal(
            Table::Credentials,
            &id,
            new.secret.expose_json().as_bytes(),
        )?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO credentials (id, name, kind, created_at, secret) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(micros(now))
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
        if let Some(settings) = &new.oauth2 {
            let settings_json = serde_json::to_string(settings).map_err(|_| Error::Corrupt {
                table: Table::OAuth2Grants.as_str(),
                id: id.clone(),
            })?;
            sqlx::query(
                "INSERT INTO oauth2_grants (credential_id, settings, state) VALUES (?, ?, ?)",
            )
            .bind(&id)
            .bind(settings_json)
            .bind(GrantState::NotConnected.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        // Report the time as stored (microsecond precision), as a later listing will.
        let created_at = from_micros(Table::Credentials.as_str(), &id, micros(now))?;
        Ok(CredentialMeta {
            oauth2: new.oauth2.clone().map(|settings| GrantStatus {
                settings,
                state: GrantState::NotConnected,
                access_token_expires_at: None,
                connected_at: None,
                refreshes: 0,
                access_token_uses: 0,
            }),
            id,
            name: new.name.clone(),
            kind: new.kind,
            created_at,
        })
    }

    /// Every credential's metadata (never a secret or a token), newest first.
    pub async fn list_credentials(&self) -> Result<Vec<CredentialMeta>> {
        const T: &str = "credentials";
        let rows = sqlx::query(
            "SELECT c.id, c.name, c.kind, c.created_at, g.settings, g.state,
                    g.access_expires_at, g.connected_at, g.refreshes, g.token_uses
             FROM credentials c LEFT JOIN oauth2_grants g ON g.credential_id = c.id
             ORDER BY c.created_at DESC, c.id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let kind: String = row.try_get("kind")?;
                let corrupt = || Error::Corrupt {
                    table: T,
                    id: id.clone(),
                };
                let settings: Option<String> = row.try_get("settings")?;
                let oauth2 = match settings {
                    None => None,
                    Some(text) => {
                        let state: String = row.try_get("state")?;
                        let expires: Option<i64> = row.try_get("access_expires_at")?;
                        let connected: Option<i64> = row.try_get("connected_at")?;
                        Some(GrantStatus {
                            settings: serde_json::from_str(&text).map_err(|_| corrupt())?,
                            state: GrantState::parse(&state).ok_or_else(corrupt)?,
                            access_token_expires_at: expires
                                .map(|us| from_micros(T, &id, us))
                                .transpose()?,
                            connected_at: connected
                                .map(|us| from_micros(T, &id, us))
                                .transpose()?,
                            refreshes: row.try_get("refreshes")?,
                            access_token_uses: row.try_get("token_uses")?,
                        })
                    }
                };
                Ok(CredentialMeta {
                    kind: CredentialKind::parse(&kind).ok_or_else(corrupt)?,
                    name: row.try_get("name")?,
                    created_at: from_micros(T, &id, row.try_get("created_at")?)?,
                    oauth2,
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
        self.open_secret(id, &sealed).map(Some)
    }

    fn open_secret(&self, id: &str, sealed: &[u8]) -> Result<SecretString> {
        let plaintext = self.keys.open_record(Table::Credentials, id, sealed)?;
        let text = std::str::from_utf8(&plaintext).map_err(|_| Error::Corrupt {
            table: "credentials",
            id: id.to_owned(),
        })?;
        Ok(SecretString::from(text))
    }

    /// The `client_secret` of an `oauth2` credential's secret object.
    fn open_client_secret(&self, id: &str, sealed: &[u8]) -> Result<SecretString> {
        #[derive(Deserialize)]
        struct ClientSecret {
            client_secret: String,
        }
        let json = self.open_secret(id, sealed)?;
        let parsed: ClientSecret =
            serde_json::from_str(json.expose_secret()).map_err(|_| Error::Corrupt {
                table: "credentials",
                id: id.to_owned(),
            })?;
        Ok(SecretString::from(parsed.client_secret))
    }

    async fn seal_tokens(&self, id: &str, tokens: &GrantTokens) -> Result<Vec<u8>> {
        let record = TokensRecord {
            access_token: tokens.access.expose_secret(),
            refresh_token: tokens.refresh.as_ref().map(|r| r.expose_secret()),
        };
        let plaintext =
            Zeroizing::new(serde_json::to_vec(&record).map_err(|_| Error::Encrypt {
                table: Table::OAuth2Grants.as_str(),
            })?);
        self.keys
            .credential_key()
            .await?
            .seal(Table::OAuth2Grants, id, &plaintext)
    }

    fn open_tokens(&self, id: &str, sealed: &[u8]) -> Result<GrantTokens> {
        let plaintext = self.keys.open_record(Table::OAuth2Grants, id, sealed)?;
        let record: TokensRecord<String> =
            serde_json::from_slice(&plaintext).map_err(|_| Error::Corrupt {
                table: Table::OAuth2Grants.as_str(),
                id: id.to_owned(),
            })?;
        Ok(GrantTokens {
            access: SecretString::from(record.access_token),
            refresh: record.refresh_token.map(SecretString::from),
        })
    }

    fn grant_from_row(&self, row: &SqliteRow) -> Result<Grant> {
        const T: &str = "oauth2_grants";
        let id: String = row.try_get("credential_id")?;
        let corrupt = || Error::Corrupt {
            table: T,
            id: id.clone(),
        };
        let settings: String = row.try_get("settings")?;
        let state: String = row.try_get("state")?;
        let sealed: Option<Vec<u8>> = row.try_get("tokens")?;
        Ok(Grant {
            settings: serde_json::from_str(&settings).map_err(|_| corrupt())?,
            state: GrantState::parse(&state).ok_or_else(corrupt)?,
            tokens: sealed.map(|s| self.open_tokens(&id, &s)).transpose()?,
            token_version: row.try_get("token_version")?,
            refresh_failures: row.try_get("refresh_failures")?,
            credential_id: id,
        })
    }

    /// The OAuth 2 grant of credential `id`, with its `client_secret`; `None` if there is
    /// no such credential or it is not an `oauth2` one.
    pub async fn grant(&self, id: &str) -> Result<Option<(Grant, SecretString)>> {
        let row = sqlx::query(
            "SELECT g.credential_id, g.settings, g.state, g.tokens, g.token_version,
                    g.refresh_failures, c.secret
             FROM oauth2_grants g JOIN credentials c ON c.id = g.credential_id
             WHERE g.credential_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let sealed: Vec<u8> = row.try_get("secret")?;
        Ok(Some((
            self.grant_from_row(&row)?,
            self.open_client_secret(id, &sealed)?,
        )))
    }

    /// The kind of credential `id`; `None` if there is none.
    pub async fn credential_kind(&self, id: &str) -> Result<Option<CredentialKind>> {
        let row = sqlx::query("SELECT kind FROM credentials WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let kind: String = r.try_get(0)?;
            CredentialKind::parse(&kind).ok_or_else(|| Error::Corrupt {
                table: "credentials",
                id: id.to_owned(),
            })
        })
        .transpose()
    }

    /// Records an authorization in progress; expired ones are dropped on the way.
    pub async fn insert_oauth2_state(
        &self,
        new: &PendingAuthorization<'_>,
        now: Timestamp,
    ) -> Result<()> {
        let sealed = self.keys.credential_key().await?.seal(
            Table::OAuth2States,
            new.state_hash,
            new.verifier.expose_secret().as_bytes(),
        )?;
        sqlx::query("DELETE FROM oauth2_states WHERE expires_at <= ?")
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO oauth2_states (state_hash, credential_id, subject, token_id, verifier, expires_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(new.state_hash)
        .bind(new.credential_id)
        .bind(new.subject)
        .bind(new.token_id)
        .bind(sealed)
        .bind(micros(new.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Uses up the authorization in progress `state_hash` if it is bound to this caller
    /// and not expired: deletes it and returns its credential id and PKCE verifier.
    /// `None` when there is no such state for this caller (unknown, used, expired, or
    /// someone else's: that one is left for its owner).
    pub async fn take_oauth2_state(
        &self,
        state_hash: &str,
        subject: &str,
        token_id: &str,
        now: Timestamp,
    ) -> Result<Option<(String, SecretString)>> {
        let row = sqlx::query(
            "DELETE FROM oauth2_states
             WHERE state_hash = ? AND subject = ? AND token_id = ? AND expires_at > ?
             RETURNING credential_id, verifier",
        )
        .bind(state_hash)
        .bind(subject)
        .bind(token_id)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let credential_id: String = row.try_get(0)?;
        let sealed: Vec<u8> = row.try_get(1)?;
        let plaintext = self
            .keys
            .open_record(Table::OAuth2States, state_hash, &sealed)?;
        let verifier = std::str::from_utf8(&plaintext).map_err(|_| Error::Corrupt {
            table: Table::OAuth2States.as_str(),
            id: state_hash.to_owned(),
        })?;
        Ok(Some((credential_id, SecretString::from(verifier))))
    }

    /// Writes new tokens for grant `id` if its tokens are still at `expected_version`:
    /// state `connected`, the access token's expiry, the next refresh time, failures
    /// reset. `connected` says whether this completes an authorization (refresh count
    /// reset, `connected_at` set) or is a refresh (refresh count + 1).
    #[allow(clippy::too_many_arguments)]
    pub async fn update_grant_tokens(
        &self,
        id: &str,
        expected_version: i64,
        tokens: &GrantTokens,
        access_expires_at: Option<Timestamp>,
        refresh_at: Option<Timestamp>,
        connected: bool,
        now: Timestamp,
    ) -> Result<Written> {
        let sealed = self.seal_tokens(id, tokens).await?;
        let done = sqlx::query(
            "UPDATE oauth2_grants SET
                state = 'connected', tokens = ?, token_version = token_version + 1,
                access_expires_at = ?, refresh_at = ?, refresh_failures = 0,
                refreshes = CASE WHEN ? THEN 0 ELSE refreshes + 1 END,
                connected_at = CASE WHEN ? THEN ? ELSE connected_at END
             WHERE credential_id = ? AND token_version = ?",
        )
        .bind(sealed)
        .bind(access_expires_at.map(micros))
        .bind(refresh_at.map(micros))
        .bind(connected)
        .bind(connected)
        .bind(micros(now))
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await?;
        Ok(Written::from_rows(done.rows_affected()))
    }

    /// Records a failed refresh of grant `id` (tokens at `expected_version`): one more
    /// failure, next try at `retry_at`.
    pub async fn record_refresh_failure(
        &self,
        id: &str,
        expected_version: i64,
        retry_at: Timestamp,
    ) -> Result<Written> {
        let done = sqlx::query(
            "UPDATE oauth2_grants SET refresh_failures = refresh_failures + 1, refresh_at = ?
             WHERE credential_id = ? AND token_version = ?",
        )
        .bind(micros(retry_at))
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await?;
        Ok(Written::from_rows(done.rows_affected()))
    }

    /// Marks grant `id` (tokens at `expected_version`) `needs_reauthorization`: its
    /// tokens are deleted (overwritten, with `secure_delete`) and it is not refreshed
    /// again until the user authorizes anew.
    pub async fn mark_needs_reauthorization(
        &self,
        id: &str,
        expected_version: i64,
    ) -> Result<Written> {
        let done = sqlx::query(
            "UPDATE oauth2_grants SET state = 'needs_reauthorization', tokens = NULL,
                token_version = token_version + 1, access_expires_at = NULL, refresh_at = NULL
             WHERE credential_id = ? AND token_version = ?",
        )
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await?;
        Ok(Written::from_rows(done.rows_affected()))
    }

    /// The earliest scheduled refresh of a connected grant.
    pub async fn next_refresh(&self) -> Result<Option<Timestamp>> {
        let us: Option<i64> =
            sqlx::query("SELECT min(refresh_at) FROM oauth2_grants WHERE state = 'connected'")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
        us.map(|us| from_micros("oauth2_grants", "min(refresh_at)", us))
            .transpose()
    }

    /// Ids of the connected grants whose refresh is due at `now`, earliest first.
    pub async fn due_refreshes(&self, now: Timestamp) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT credential_id FROM oauth2_grants
             WHERE state = 'connected' AND refresh_at <= ? ORDER BY refresh_at",
        )
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Error::from))
            .collect()
    }

    /// The current access token of grant `id` for an execution, counting the use (the
    /// audit count shown as `access_token_uses`). `Err(state)` names why there is none:
    /// no such grant, not connected, needs reauthorization, or expired.
    pub async fn take_access_token(
        &self,
        id: &str,
        now: Timestamp,
    ) -> Result<Result<(SecretString, i64), GrantUnavailable>> {
        let row = sqlx::query(
            "UPDATE oauth2_grants SET token_uses = token_uses + 1
             WHERE credential_id = ? AND state = 'connected' AND tokens IS NOT NULL
               AND (access_expires_at IS NULL OR access_expires_at > ?)
             RETURNING tokens, token_uses",
        )
        .bind(id)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            let sealed: Vec<u8> = row.try_get(0)?;
            let uses: i64 = row.try_get(1)?;
            return Ok(Ok((self.open_tokens(id, &sealed)?.access, uses)));
        }
        let state: Option<String> =
            sqlx::query("SELECT state FROM oauth2_grants WHERE credential_id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
        Ok(Err(match state.as_deref().and_then(GrantState::parse) {
            None => GrantUnavailable::NotFound,
            Some(GrantState::NotConnected) => GrantUnavailable::NotConnected,
            Some(GrantState::NeedsReauthorization) => GrantUnavailable::NeedsReauthorization,
            Some(GrantState::Connected) => GrantUnavailable::Expired,
        }))
    }

    /// Deletes credential `id` at once (with its grant and authorizations in progress;
    /// `secure_delete` overwrites them) and returns what it was, so an OAuth 2 grant can
    /// then be revoked at the provider; `None` if there was none.
    pub async fn delete_credential(&self, id: &str) -> Result<Option<DeletedCredential>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT kind, secret FROM credentials WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get(0)?;
        let kind = CredentialKind::parse(&kind).ok_or_else(|| Error::Corrupt {
            table: "credentials",
            id: id.to_owned(),
        })?;
        let sealed_secret: Vec<u8> = row.try_get(1)?;
        let grant_row = sqlx::query(
            "SELECT credential_id, settings, state, tokens, token_version, refresh_failures
             FROM oauth2_grants WHERE credential_id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        for statement in [
            "DELETE FROM oauth2_states WHERE credential_id = ?",
            "DELETE FROM oauth2_grants WHERE credential_id = ?",
            "DELETE FROM credentials WHERE id = ?",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        // Decrypted after the commit: a record that fails to open is still deleted.
        let grant = match grant_row {
            None => None,
            Some(row) => {
                let grant = self.grant_from_row(&row)?;
                Some(DeletedGrant {
                    settings: grant.settings,
                    client_secret: self.open_client_secret(id, &sealed_secret)?,
                    tokens: grant.tokens,
                })
            }
        };
        Ok(Some(DeletedCredential { kind, grant }))
    }
}

/// Why an execution gets no access token from a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantUnavailable {
    /// No `oauth2` credential has this id.
    NotFound,
    /// The authorization flow has not been completed.
    NotConnected,
    /// The provider refused the refresh token; the user must authorize again.
    NeedsReauthorization,
    /// The access token expired and has not been refreshed (yet).
    Expired,
}

impl fmt::Display for GrantUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GrantUnavailable::NotFound => "no such oauth2 credential",
            GrantUnavailable::NotConnected => "the grant is not connected",
            GrantUnavailable::NeedsReauthorization => "the grant needs reauthorization",
            GrantUnavailable::Expired => "the access token has expired",
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_secret_with_a_lone_surrogate_escape_is_refused() {
        let parse = |secret: &str| serde_json::from_str::<SecretJson>(secret);
        for bad in [
            r#"{"k": "\udeec"}"#,
            r#"{"k": "\ud83d"}"#,
            r#"{"k": "\ud83dx"}"#,
            r#"{"k": "\ud83d\u0041"}"#,
        ] {
            let err = parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("UTF-16"), "{bad}: {err}");
        }
        for good in [r#"{"k": "\ud83d\ude00"}"#, r#"{"k": "\\udeec \u00e9"}"#] {
            assert!(parse(good).is_ok(), "{good}");
        }
    }

    use crate::crypto::DataKey;

    async fn keys(dir: &Path, tenant: &str) -> Keyring {
        Keyring::open(
            dir,
            tenant,
            DataKey::from_bytes(&[9; 32]).unwrap(),
            None,
            Duration::from_secs(86_400),
        )
        .await
        .unwrap()
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
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
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
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
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
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
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
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
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

    fn oauth2_credential() -> NewCredential {
        serde_json::from_value(serde_json::json!({
            "name": "crm", "kind": "oauth2", "secret": {"client_secret": "cs"},
            "oauth2": {"authorization_url": "https://a.test/auth", "token_url": "https://a.test/token",
                       "client_id": "c", "scopes": ["s"], "redirect_url": "https://app.test/cb"},
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn an_authorization_state_works_once_for_its_caller_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
        let id = store
            .insert_credential(&oauth2_credential(), ts(100))
            .await
            .unwrap()
            .id;
        let verifier = SecretString::from("verifier-1");
        for (hash, expires) in [("h1", 200), ("h2", 150)] {
            let pending = PendingAuthorization {
                state_hash: hash,
                credential_id: &id,
                subject: "alice",
                token_id: "jti-1",
                verifier: &verifier,
                expires_at: ts(expires),
            };
            store.insert_oauth2_state(&pending, ts(100)).await.unwrap();
        }
        // Another token of the same subject, or another subject: nothing, and left alone.
        assert!(
            store
                .take_oauth2_state("h1", "alice", "jti-2", ts(120))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .take_oauth2_state("h1", "bob", "jti-1", ts(120))
                .await
                .unwrap()
                .is_none()
        );
        let (cred, v) = store
            .take_oauth2_state("h1", "alice", "jti-1", ts(120))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (cred.as_str(), v.expose_secret()),
            (id.as_str(), "verifier-1")
        );
        assert!(
            store
                .take_oauth2_state("h1", "alice", "jti-1", ts(121))
                .await
                .unwrap()
                .is_none()
        );
        // Expired.
        assert!(
            store
                .take_oauth2_state("h2", "alice", "jti-1", ts(150))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn token_writes_are_guarded_by_version_and_uses_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
        let id = store
            .insert_credential(&oauth2_credential(), ts(100))
            .await
            .unwrap()
            .id;
        assert_eq!(
            store
                .take_access_token(&id, ts(100))
                .await
                .unwrap()
                .unwrap_err(),
            GrantUnavailable::NotConnected
        );
        let tokens = |a: &str| GrantTokens {
            access: SecretString::from(a),
            refresh: Some(SecretString::from("r")),
        };
        let write = |version, a: &'static str, connected| {
            let store = store.clone();
            let id = id.clone();
            async move {
                store
                    .update_grant_tokens(
                        &id,
                        version,
                        &tokens(a),
                        Some(ts(200)),
                        Some(ts(160)),
                        connected,
                        ts(100),
                    )
                    .await
                    .unwrap()
            }
        };
        assert_eq!(write(0, "a1", true).await, Written::Yes);
        // A refresh that read version 0 lost the race: nothing written.
        assert_eq!(write(0, "stale", false).await, Written::Stale);
        assert_eq!(write(1, "a2", false).await, Written::Yes);
        let (token, uses) = store
            .take_access_token(&id, ts(150))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((token.expose_secret(), uses), ("a2", 1));
        assert_eq!(
            store
                .take_access_token(&id, ts(150))
                .await
                .unwrap()
                .unwrap()
                .1,
            2
        );
        assert_eq!(
            store
                .take_access_token(&id, ts(200))
                .await
                .unwrap()
                .unwrap_err(),
            GrantUnavailable::Expired
        );
        assert_eq!(
            store.due_refreshes(ts(159)).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            store.due_refreshes(ts(160)).await.unwrap(),
            vec![id.clone()]
        );
        let listed = store.list_credentials().await.unwrap();
        let status = listed[0].oauth2.as_ref().unwrap();
        assert_eq!(
            (status.state, status.refreshes, status.access_token_uses),
            (GrantState::Connected, 1, 2)
        );
        assert_eq!(
            store.mark_needs_reauthorization(&id, 1).await.unwrap(),
            Written::Stale
        );
        assert_eq!(
            store.mark_needs_reauthorization(&id, 2).await.unwrap(),
            Written::Yes
        );
        assert_eq!(store.next_refresh().await.unwrap(), None);
        assert_eq!(
            store
                .take_access_token(&id, ts(150))
                .await
                .unwrap()
                .unwrap_err(),
            GrantUnavailable::NeedsReauthorization
        );
        let deleted = store.delete_credential(&id).await.unwrap().unwrap();
        let grant = deleted.grant.unwrap();
        assert_eq!(grant.client_secret.expose_secret(), "cs");
        assert!(grant.tokens.is_none());
        assert_eq!(
            store
                .take_access_token(&id, ts(150))
                .await
                .unwrap()
                .unwrap_err(),
            GrantUnavailable::NotFound
        );
    }

    #[tokio::test]
    async fn moved_ciphertext_and_other_tenant_fail_to_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
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

        store.keys().close().await;

        // The same files opened as another tenant (same KEK): its keys do not unwrap.
        let err = Keyring::open(
            dir.path(),
            "globex",
            DataKey::from_bytes(&[9; 32]).unwrap(),
            None,
            Duration::from_secs(86_400),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::UnwrapKey { .. }), "{err}");
    }

    /// A store written by an older runtime (version-1 records under the configured key
    /// directly) is re-sealed under data keys when opened: executions under their
    /// period's key, the rest under the credential key; a second open finds nothing to do.
    #[tokio::test]
    async fn version_1_records_are_migrated_to_data_keys_once() {
        use crate::crypto::Sealer;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
        let day = 86_400;
        let mut ids = Vec::new();
        for i in 0..1200 {
            ids.push(
                store
                    .insert_execution(&execution(i % 3 * day + i, Some(i % 3 * day + i + 1)))
                    .await
                    .unwrap(),
            );
        }
        let cred = store
            .insert_credential(&oauth2_credential(), ts(100))
            .await
            .unwrap()
            .id;
        // Rewrite everything as an older runtime sealed it.
        let v1 = Sealer::new(&DataKey::from_bytes(&[9; 32]).unwrap(), "acme");
        for id in &ids {
            let e = store.get_execution(id).await.unwrap().unwrap();
            let sealed = v1
                .seal(Table::Executions, id, &serde_json::to_vec(&e.data).unwrap())
                .unwrap();
            sqlx::query("UPDATE executions SET payload = ? WHERE id = ?")
                .bind(sealed)
                .bind(id)
                .execute(&store.pool)
                .await
                .unwrap();
        }
        let secret = v1
            .seal(Table::Credentials, &cred, br#"{"client_secret":"cs"}"#)
            .unwrap();
        sqlx::query("UPDATE credentials SET secret = ? WHERE id = ?")
            .bind(secret)
            .bind(&cred)
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        store.keys().close().await;

        let store = Store::open(dir.path(), keys(dir.path(), "acme").await)
            .await
            .unwrap();
        let versions: Vec<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT substr(payload, 1, 5), aged_at FROM executions")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(versions.len(), 1200);
        let mut by_day = std::collections::BTreeMap::new();
        for (head, aged) in versions {
            assert_eq!(head[0], 2);
            let key = u32::from_be_bytes(head[1..5].try_into().unwrap());
            by_day
                .entry(aged.div_euclid(day * 1_000_000))
                .or_insert_with(std::collections::BTreeSet::new)
                .insert(key);
        }
        // One key per day, three days, three different keys.
        assert_eq!(by_day.len(), 3);
        assert!(by_day.values().all(|k| k.len() == 1));
        let distinct: std::collections::BTreeSet<_> = by_day.values().flatten().collect();
        assert_eq!(distinct.len(), 3);
        for id in &ids {
            assert!(store.get_execution(id).await.unwrap().is_some());
        }
        let (_, client_secret) = store.grant(&cred).await.unwrap().unwrap();
        assert_eq!(client_secret.expose_secret(), "cs");
        assert_eq!(store.migrate_v1().await.unwrap(), 0);
    }
}
