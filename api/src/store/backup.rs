//! The control database as a portable logical dump, and back: the SQL half of
//! `tenantry-api backup` and `restore` (`crate::backup` drives them).
//!
//! A dump is a sequence of records, one JSON document each: for every table in
//! [`TABLES`] a `{"table", "columns"}` record, its rows as JSON arrays (text, integer or
//! null, in column order, ordered by the first column), and a `{"end", "rows"}` record.
//! Only the two portable column types exist (migrations use TEXT and BIGINT), so a dump of
//! SQLite restores into PostgreSQL and back.
//!
//! Not dumped: `sessions` (a restore signs everybody out: a session restored from a backup
//! could be one that was logged out since), SQLite's `auth_changes` (the session caches'
//! change feed, meaningless in another database) and `schema_migrations` (the restore
//! writes its own, from the dump's schema version), and the master key ring's state
//! (`master_keys`, `master_key_holders`: which key of the source's key file seals, and
//! which servers were running; the restored database starts with the primary of the key
//! file it is served with, and the restore checks that file opens every secret).

use sqlx::{AnyConnection, Connection as _, Row as _};

use crate::audit::{AuditEntry, ChainVerifier};
use crate::error::{Error, Result};
use crate::migrations::MIGRATIONS;
use crate::store::{Backend, audit};

/// A column's portable type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// TEXT.
    Text,
    /// BIGINT.
    Int,
}

impl ColumnType {
    fn as_str(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Int => "int",
        }
    }

    fn parse(s: &str) -> Option<ColumnType> {
        match s {
            "text" => Some(ColumnType::Text),
            "int" => Some(ColumnType::Int),
            _ => None,
        }
    }
}

/// One table of a dump, with its columns at the current schema version.
#[derive(Debug)]
pub struct Table {
    /// The table.
    pub name: &'static str,
    /// Its columns, in dump order.
    pub columns: &'static [(&'static str, ColumnType)],
}

impl Table {
    /// The query a dump reads the table with: every column, in dump order, by the first.
    pub fn select_all(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(n, _)| *n).collect();
        format!(
            "SELECT {} FROM {} ORDER BY {}",
            names.join(", "),
            self.name,
            names[0]
        )
    }
}

use ColumnType::{Int, Text};

/// Every table a backup holds, parents before children (the order a restore inserts in),
/// with its columns at the schema version of [`MIGRATIONS`]. A test compares this with the
/// database's own catalog, so a migration cannot add a table or column that backups miss.
pub const TABLES: &[Table] = &[
    Table {
        name: "users",
        columns: &[
            ("id", Text),
            ("email", Text),
            ("password_hash", Text),
            ("created_at_ms", Int),
            ("login_failures", Int),
            ("login_lockouts", Int),
            ("login_locked_until_ms", Int),
            ("mfa_failures", Int),
            ("mfa_lockouts", Int),
            ("mfa_locked_until_ms", Int),
            ("totp_secret_sealed", Text),
            ("totp_pending_sealed", Text),
            ("totp_last_step", Int),
            ("last_login_at_ms", Int),
            ("deactivated_at_ms", Int),
            ("deactivation_reason", Text),
            ("email_verified_at_ms", Int),
        ],
    },
    Table {
        name: "tenants",
        columns: &[
            ("id", Text),
            ("name", Text),
            ("owner_user_id", Text),
            ("plan", Text),
            ("phase", Text),
            ("suspended", Int),
            ("retention_max_age_hours", Int),
            ("retention_max_count", Int),
            ("endpoint", Text),
            ("cert_serial", Text),
            ("cert_not_after_ms", Int),
            ("cert_renewal_ms", Int),
            ("message", Text),
            ("created_at_ms", Int),
            ("updated_at_ms", Int),
        ],
    },
    Table {
        name: "memberships",
        columns: &[("user_id", Text), ("tenant_id", Text), ("role", Text)],
    },
    Table {
        name: "recovery_codes",
        columns: &[("user_id", Text), ("code_hash", Text), ("used_at_ms", Int)],
    },
    Table {
        name: "role_grants",
        columns: &[
            ("user_id", Text),
            ("role", Text),
            ("granted_by", Text),
            ("granted_at_ms", Int),
            ("expires_at_ms", Int),
        ],
    },
    Table {
        name: "access_reviews",
        columns: &[
            ("id", Text),
            ("trigger_kind", Text),
            ("started_by", Text),
            ("started_at_ms", Int),
            ("due_at_ms", Int),
            ("closed_at_ms", Int),
        ],
    },
    Table {
        name: "access_review_items",
        columns: &[
            ("review_id", Text),
            ("user_id", Text),
            ("role", Text),
            ("granted_by", Text),
            ("granted_at_ms", Int),
            ("expires_at_ms", Int),
            ("decision", Text),
            ("decided_by", Text),
            ("decided_at_ms", Int),
            ("note", Text),
        ],
    },
    Table {
        name: "audit_events",
        columns: &[
            ("sequence", Int),
            ("at_ms", Int),
            ("action", Text),
            ("actor_user_id", Text),
            ("target", Text),
            ("outcome", Text),
            ("source", Text),
            ("detail_json", Text),
            ("prev_hash", Text),
            ("hash", Text),
        ],
    },
    Table {
        name: "audit_head",
        columns: &[("id", Int), ("sequence", Int), ("hash", Text)],
    },
    Table {
        name: "unknown_email_failures",
        columns: &[
            ("email_hash", Text),
            ("failures", Int),
            ("lockouts", Int),
            ("locked_until_ms", Int),
            ("updated_at_ms", Int),
        ],
    },
    Table {
        name: "email_verifications",
        columns: &[
            ("token_hash", Text),
            ("user_id", Text),
            ("created_at_ms", Int),
            ("expires_at_ms", Int),
            ("used_at_ms", Int),
        ],
    },
    Table {
        name: "mail_outbox",
        columns: &[
            ("id", Text),
            ("user_id", Text),
            ("kind", Text),
            ("notice_json", Text),
            ("created_at_ms", Int),
            ("attempts", Int),
            ("next_attempt_at_ms", Int),
            ("claimed_until_ms", Int),
            ("sent_at_ms", Int),
            ("last_error", Text),
        ],
    },
    Table {
        name: "tenant_health_notices",
        columns: &[
            ("tenant_id", Text),
            ("degraded_since_ms", Int),
            ("notified_at_ms", Int),
        ],
    },
    Table {
        name: "token_keys",
        columns: &[
            ("kid", Text),
            ("public_pem", Text),
            ("private_sealed", Text),
            ("created_at_ms", Int),
            ("signs_from_ms", Int),
            ("retires_at_ms", Int),
        ],
    },
];

/// Tables a backup leaves out on purpose (see the module docs).
pub const NOT_BACKED_UP: &[&str] = &[
    "sessions",
    "auth_changes",
    "schema_migrations",
    "master_keys",
    "master_key_holders",
];

/// The schema version this binary writes and reads.
pub fn current_schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// One connection for a backup or (`for_restore`) a restore: no pool, no migrations.
/// SQLite gets the server's settings; for a restore, a missing file is created.
pub async fn connect(url: &str, for_restore: bool) -> Result<(AnyConnection, Backend)> {
    use std::str::FromStr as _;
    sqlx::any::install_default_drivers();
    let backend = Backend::of_url(url)?;
    let url = match backend {
        Backend::Sqlite if !url.contains("mode=") => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode={}", if for_restore { "rwc" } else { "rw" })
        }
        _ => url.to_owned(),
    };
    let options = sqlx::any::AnyConnectOptions::from_str(&url)
        .map_err(|e| Error::Config(format!("invalid database URL: {e}")))?;
    let mut conn = AnyConnection::connect_with(&options)
        .await
        .map_err(Error::Unavailable)?;
    if backend == Backend::Sqlite {
        sqlx::raw_sql(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
        )
        .execute(&mut conn)
        .await?;
    }
    Ok((conn, backend))
}

async fn table_exists(conn: &mut AnyConnection, backend: Backend, name: &str) -> Result<bool> {
    let sql = match backend {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
    };
    let n: i64 = sqlx::query_scalar(sql).bind(name).fetch_one(conn).await?;
    Ok(n > 0)
}

/// The schema version of the database (0 when it has none).
pub async fn schema_version(conn: &mut AnyConnection, backend: Backend) -> Result<i64> {
    if !table_exists(conn, backend, "schema_migrations").await? {
        return Ok(0);
    }
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(conn)
            .await?,
    )
}

/// Applies the migrations after `applied` up to `up_to` on `conn` (the caller's
/// transaction), recording each in `schema_migrations`.
pub(crate) async fn migrate_in(
    conn: &mut AnyConnection,
    backend: Backend,
    applied: i64,
    up_to: i64,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
         description TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > applied && m.version <= up_to)
    {
        let sql = match backend {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        sqlx::raw_sql(sql)
            .execute(&mut *conn)
            .await
            .map_err(|source| Error::Migration {
                version: m.version,
                source,
            })?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, description, applied_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.description)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied migration"
        );
    }
    Ok(())
}

/// The audit chain's head as a snapshot saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditHead {
    /// The last sequence.
    pub sequence: i64,
    /// Its hash.
    pub hash: String,
}

/// A consistent read of the whole database: one REPEATABLE READ, READ ONLY transaction on
/// PostgreSQL; on SQLite (WAL) one read transaction, whose snapshot is fixed by its first
/// read, so writers go on and are not seen.
pub struct Snapshot<'c> {
    tx: sqlx::Transaction<'c, sqlx::Any>,
    /// The schema version (the binary's: a backup refuses any other).
    pub schema_version: i64,
    /// The audit chain head in this snapshot.
    pub audit_head: AuditHead,
}

impl<'c> Snapshot<'c> {
    /// Starts the snapshot; refuses a database at another schema version than this
    /// binary's (back it up with the binary that runs it).
    pub async fn begin(conn: &'c mut AnyConnection, backend: Backend) -> Result<Snapshot<'c>> {
        let mut tx = match backend {
            Backend::Postgres => {
                conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?
            }
            Backend::Sqlite => conn.begin().await?,
        };
        let schema_version = schema_version(&mut tx, backend).await?;
        let current = current_schema_version();
        if schema_version != current {
            return Err(Error::Restore(format!(
                "the database is at schema version {schema_version} and this tenantry-api writes {current}: back it up with the version that runs it"
            )));
        }
        let head = sqlx::query("SELECT sequence, hash FROM audit_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let audit_head = AuditHead {
            sequence: head.try_get("sequence")?,
            hash: head.try_get("hash")?,
        };
        Ok(Snapshot {
            tx,
            schema_version,
            audit_head,
        })
    }

    /// Streams every table into `sink`, one record at a time; returns the rows per table.
    pub async fn dump(
        mut self,
        sink: &mut tenantry_backup::AsyncWriter,
    ) -> Result<Vec<(&'static str, u64)>> {
        use futures::TryStreamExt as _;
        let mut counts = Vec::new();
        for table in TABLES {
            let columns: Vec<[&str; 2]> = table
                .columns
                .iter()
                .map(|(name, ty)| [*name, ty.as_str()])
                .collect();
            sink.write_record(json(
                &serde_json::json!({"table": table.name, "columns": columns}),
            )?)
            .await?;
            let mut rows = 0u64;
            let mut stream = sqlx::query(super::dyn_sql(table.select_all())).fetch(&mut *self.tx);
            while let Some(row) = stream.try_next().await? {
                let mut values = Vec::with_capacity(table.columns.len());
                for (i, (_, ty)) in table.columns.iter().enumerate() {
                    values.push(match ty {
                        Text => row
                            .try_get::<Option<String>, _>(i)?
                            .map_or(serde_json::Value::Null, serde_json::Value::String),
                        Int => row
                            .try_get::<Option<i64>, _>(i)?
                            .map_or(serde_json::Value::Null, serde_json::Value::from),
                    });
                }
                sink.write_record(json(&serde_json::Value::Array(values))?)
                    .await?;
                rows += 1;
            }
            drop(stream);
            sink.write_record(json(&serde_json::json!({"end": table.name, "rows": rows}))?)
                .await?;
            counts.push((table.name, rows));
        }
        self.tx.rollback().await?;
        Ok(counts)
    }
}

fn json(value: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Restore(format!("cannot encode a row: {e}")))
}

/// Appends `record` to the audit chain in a write transaction of its own on `conn` (a
/// backup's `backup.create`, on the connection that took the snapshot).
pub async fn append_audit(
    conn: &mut AnyConnection,
    backend: Backend,
    record: &audit::AuditRecord,
    now_ms: i64,
) -> Result<()> {
    let mut tx = match backend {
        Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => conn.begin().await?,
    };
    audit::append_audit(&mut tx, record, now_ms).await?;
    tx.commit().await?;
    Ok(())
}

/// What a restore checks as rows go in: that the master key opens every sealed secret, and
/// that the audit chain verifies and ends where the backup's header says.
pub trait RestoreChecks {
    /// Called for each `users` row with its id and sealed TOTP columns.
    fn user(&mut self, id: &str, sealed: &[&str]) -> Result<()>;
    /// Called for each `token_keys` row that still holds its sealed private half.
    fn token_key(&mut self, kid: &str, sealed: &str) -> Result<()>;
}

/// The result of [`restore_into`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Rows per table.
    pub tables: Vec<(String, u64)>,
    /// Audit rows verified.
    pub audit_rows: u64,
}

/// Refuses anything but an empty database (no schema, or a schema no newer than the
/// dump's with no user, tenant or audit row); returns its schema version.
pub async fn check_empty(
    conn: &mut AnyConnection,
    backend: Backend,
    dump_version: i64,
) -> Result<i64> {
    let version = schema_version(conn, backend).await?;
    if version == 0 {
        return Ok(0);
    }
    for table in ["users", "tenants", "audit_events"] {
        let n: i64 = sqlx::query_scalar(super::dyn_sql(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&mut *conn)
            .await?;
        if n > 0 {
            return Err(Error::Restore(format!(
                "the target database is not empty ({table} has {n} rows): restore only into an empty database"
            )));
        }
    }
    if version > dump_version {
        return Err(Error::Restore(format!(
            "the target database has schema version {version}, newer than the backup's {dump_version}: restore into a database without the Tenantry schema"
        )));
    }
    Ok(version)
}

/// Inserts a dump's records (from `source`) in one transaction on `conn`: the schema up to
/// the dump's version first, then the rows, then the migrations after it, then the
/// `backup.restore` audit row; commits only when `source` reached the verified end and every
/// check passed. Anything else rolls back: nothing is written.
#[allow(clippy::too_many_arguments)]
pub async fn restore_into(
    conn: &mut AnyConnection,
    backend: Backend,
    dump_version: i64,
    expected_head: &AuditHead,
    checks: &mut (dyn RestoreChecks + Send),
    source: &mut tenantry_backup::AsyncReader,
    audit_record: &audit::AuditRecord,
    now_ms: i64,
) -> Result<Restored> {
    let mut tx = match backend {
        Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => conn.begin().await?,
    };
    if backend == Backend::Postgres {
        // No API replica migrates this database while the restore writes it.
        sqlx::query("SELECT pg_advisory_xact_lock(7355608201)")
            .execute(&mut *tx)
            .await?;
    }
    let applied = check_empty(&mut tx, backend, dump_version).await?;
    migrate_in(&mut tx, backend, applied, dump_version, now_ms).await?;
    let bad = |what: String| Error::Restore(format!("the backup's records are malformed: {what}"));
    let mut tables = Vec::new();
    let mut chain = ChainVerifier::new();
    let mut audit_rows = 0u64;
    let mut head_restored: Option<AuditHead> = None;
    loop {
        let Some(record) = source.next_record().await? else {
            break;
        };
        let start: serde_json::Value =
            serde_json::from_slice(&record).map_err(|e| bad(e.to_string()))?;
        let table = start["table"]
            .as_str()
            .ok_or_else(|| bad("expected a table".into()))?
            .to_owned();
        if !table_exists(&mut tx, backend, &table).await? || NOT_BACKED_UP.contains(&table.as_str())
        {
            return Err(bad(format!("unknown table {table:?}")));
        }
        let columns: Vec<(String, ColumnType)> = start["columns"]
            .as_array()
            .ok_or_else(|| bad("no columns".into()))?
            .iter()
            .map(|c| {
                let name = c[0].as_str().filter(|n| is_identifier(n));
                let ty = c[1].as_str().and_then(ColumnType::parse);
                name.zip(ty).map(|(n, t)| (n.to_owned(), t))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("bad columns of {table}")))?;
        if table == "audit_head" {
            sqlx::query("DELETE FROM audit_head")
                .execute(&mut *tx)
                .await?;
        }
        let col = |name: &str| columns.iter().position(|(n, _)| n == name);
        let mut inserter = Inserter::new(&table, &columns, backend);
        let mut rows = 0u64;
        loop {
            let record = source
                .next_record()
                .await?
                .ok_or_else(|| bad(format!("{table} has no end")))?;
            if record.first() == Some(&b'{') {
                let end: serde_json::Value =
                    serde_json::from_slice(&record).map_err(|e| bad(e.to_string()))?;
                if end["end"].as_str() != Some(table.as_str()) || end["rows"].as_u64() != Some(rows)
                {
                    return Err(bad(format!("{table} ends with a wrong row count")));
                }
                break;
            }
            let values: Vec<serde_json::Value> =
                serde_json::from_slice(&record).map_err(|e| bad(e.to_string()))?;
            if values.len() != columns.len() {
                return Err(bad(format!("a {table} row has the wrong number of values")));
            }
            let text = |name: &str| -> Option<&str> { col(name).and_then(|i| values[i].as_str()) };
            let int = |name: &str| -> Option<i64> { col(name).and_then(|i| values[i].as_i64()) };
            match table.as_str() {
                "users" => {
                    let id = text("id").unwrap_or_default();
                    let sealed: Vec<&str> = ["totp_secret_sealed", "totp_pending_sealed"]
                        .iter()
                        .filter_map(|c| text(c))
                        .collect();
                    checks.user(id, &sealed)?;
                }
                "token_keys" => {
                    if let Some(sealed) = text("private_sealed") {
                        checks.token_key(text("kid").unwrap_or_default(), sealed)?;
                    }
                }
                "audit_events" => {
                    let entry = AuditEntry {
                        sequence: int("sequence").unwrap_or_default(),
                        at_ms: int("at_ms").unwrap_or_default(),
                        action: text("action").unwrap_or_default().to_owned(),
                        actor_user_id: text("actor_user_id").unwrap_or_default().to_owned(),
                        target: text("target").unwrap_or_default().to_owned(),
                        outcome: text("outcome").unwrap_or_default().to_owned(),
                        source: text("source").unwrap_or_default().to_owned(),
                        detail_json: text("detail_json").unwrap_or_default().to_owned(),
                    };
                    let prev = text("prev_hash").unwrap_or_default();
                    let hash = text("hash").unwrap_or_default();
                    if let Err(sequence) = chain.check(&entry, prev, hash) {
                        return Err(Error::Restore(format!(
                            "the backup's audit chain breaks at sequence {sequence}: it was changed before it was backed up"
                        )));
                    }
                    audit_rows += 1;
                }
                "audit_head" => {
                    head_restored = Some(AuditHead {
                        sequence: int("sequence").unwrap_or_default(),
                        hash: text("hash").unwrap_or_default().to_owned(),
                    });
                }
                _ => {}
            }
            inserter.push(values, &mut tx).await?;
            rows += 1;
        }
        inserter.flush(&mut tx).await?;
        tables.push((table, rows));
    }
    // The records ended at the verified trailer (the reader checks it before `None`).
    let head = head_restored.ok_or_else(|| bad("no audit_head".into()))?;
    if &head != expected_head || chain.finish(head.sequence, &head.hash).is_err() {
        return Err(Error::Restore(format!(
            "the audit chain ends at sequence {} but the backup's header says {}: the backup is inconsistent",
            head.sequence, expected_head.sequence
        )));
    }
    migrate_in(
        &mut tx,
        backend,
        dump_version,
        current_schema_version(),
        now_ms,
    )
    .await?;
    audit::append_audit(&mut tx, audit_record, now_ms).await?;
    tx.commit().await?;
    Ok(Restored { tables, audit_rows })
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Multi-row INSERTs of one table.
struct Inserter<'a> {
    table: &'a str,
    columns: &'a [(String, ColumnType)],
    backend: Backend,
    rows: Vec<Vec<serde_json::Value>>,
    per_statement: usize,
}

impl<'a> Inserter<'a> {
    fn new(table: &'a str, columns: &'a [(String, ColumnType)], backend: Backend) -> Self {
        // Under SQLite's and PostgreSQL's bind limits (32766 and 65535).
        let per_statement = (30_000 / columns.len().max(1)).clamp(1, 500);
        Inserter {
            table,
            columns,
            backend,
            rows: Vec::new(),
            per_statement,
        }
    }

    async fn push(&mut self, row: Vec<serde_json::Value>, conn: &mut AnyConnection) -> Result<()> {
        self.rows.push(row);
        if self.rows.len() >= self.per_statement {
            self.flush(conn).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut AnyConnection) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.columns.iter().map(|(n, _)| n.as_str()).collect();
        let mut sql = format!("INSERT INTO {} ({}) VALUES ", self.table, names.join(", "));
        let mut n = 0;
        for (r, _) in self.rows.iter().enumerate() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..self.columns.len() {
                if c > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                // SQLite reads `$N` as a named parameter and looks each one up by name
                // (quadratic in a 5,000-value statement: a restore took 30 s instead of
                // 3); `?` is positional there.
                match self.backend {
                    Backend::Sqlite => sql.push('?'),
                    Backend::Postgres => sql.push_str(&format!("${n}")),
                }
            }
            sql.push(')');
        }
        let mut query = sqlx::query(super::dyn_sql(sql));
        for row in self.rows.drain(..) {
            for (value, (name, ty)) in row.into_iter().zip(self.columns) {
                query = match (ty, value) {
                    (Text, serde_json::Value::String(s)) => query.bind(Some(s)),
                    (Text, serde_json::Value::Null) => query.bind(None::<String>),
                    (Int, serde_json::Value::Null) => query.bind(None::<i64>),
                    (Int, serde_json::Value::Number(n)) if n.is_i64() => query.bind(n.as_i64()),
                    _ => {
                        return Err(Error::Restore(format!(
                            "the backup's records are malformed: {}.{name} has a value of the wrong type",
                            self.table
                        )));
                    }
                };
            }
        }
        query.execute(&mut *conn).await?;
        Ok(())
    }
}

/// The tables and columns of the database's catalog (without [`NOT_BACKED_UP`]), for the
/// test that [`TABLES`] is complete.
#[doc(hidden)]
pub async fn catalog(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<Vec<(String, Vec<String>)>> {
    let rows: Vec<(String, String)> = match backend {
        Backend::Sqlite => {
            sqlx::query_as(
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.cid",
            )
            .fetch_all(&mut *conn)
            .await?
        }
        Backend::Postgres => {
            sqlx::query_as(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position",
            )
            .fetch_all(&mut *conn)
            .await?
        }
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (table, column) in rows {
        if NOT_BACKED_UP.contains(&table.as_str()) {
            continue;
        }
        match out.last_mut() {
            Some((t, columns)) if *t == table => columns.push(column),
            _ => out.push((table, vec![column])),
        }
    }
    Ok(out)
}
