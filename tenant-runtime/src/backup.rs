//! Backups of the instance's store: `tenant-runtime backup` and `restore`, and the
//! scheduled backups of the config's `backup` section.
//!
//! A backup is an online snapshot of the SQLite database (`VACUUM INTO` a file beside it:
//! one read transaction, writers go on) streamed into a [`tenantry_backup`] file of kind
//! `tenant-data`. Payloads, credential secrets and tokens are still sealed with the
//! tenant's data keys inside it, and the whole file is encrypted again to the backup
//! recipients.
//!
//! A backup carries no execution data key: those stay in the instance's key store
//! (`keys.db`), so once retention has deleted a period's key, that period's rows in every
//! older backup are unreadable too (crypto-shredding reaches into backups). It does carry
//! the credential key, wrapped under the key-encryption key of its time, so credentials
//! survive the loss of the key store.
//!
//! A restore writes the snapshot to a file beside the target, checks SQLite's integrity and
//! that the instance's keys open every sealed record, drops the executions whose key
//! retention has deleted (they are expired; counted in the report), and only then renames
//! it into place. A record whose key is missing but not expired refuses the restore.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions as _, Connection as _};
use tenantry_backup::{Header, Identities, Kind, Label, Reader, Recipients, Writer};

use crate::config::RuntimeConfig;
use crate::crypto::{SealedWith, Table, sealed_with};
use crate::error::{Error, Result};
use crate::keystore::{self, KEYS_FILE, Keyring, WrappedKey};
use crate::store::DB_FILE;

/// The store's schema version in backups: 2 since records are sealed under data keys
/// (version 1 backups, sealed under the configured key, still restore).
pub const SCHEMA_VERSION: i64 = 2;
/// The header detail that carries the wrapped credential keys.
const CREDENTIAL_KEYS: &str = "credential_keys";
/// Bytes of the snapshot per backup record.
const CHUNK: usize = 1024 * 1024;
/// The file in the backup directory that names the newest backup (for the operator, the
/// local provisioner and `tenantry-api backups`).
pub const STATUS_FILE: &str = "last-backup.json";

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::BackupIo { what, source }
}

/// What a backup wrote.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BackupReport {
    /// The file.
    pub path: PathBuf,
    /// When the snapshot was taken.
    pub created_at: jiff::Timestamp,
    /// Executions in it.
    pub executions: i64,
    /// Credentials in it.
    pub credentials: i64,
    /// Bytes of the snapshot (before compression and encryption).
    pub snapshot_bytes: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// SHA-256 of its records.
    pub sha256: String,
    /// Older backups deleted to keep `keep`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<PathBuf>,
}

/// A new private file (0600) in `dir` for a snapshot, named after `purpose`.
fn private_temp(dir: &Path, purpose: &str) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(format!(
        ".{purpose}-{}-{}.db",
        std::process::id(),
        jiff::Timestamp::now().as_nanosecond()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    Ok(path)
}

/// Removes a file on drop unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Executions and credentials in the snapshot at `db`.
async fn counts(db: &Path) -> Result<(i64, i64)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await?;
    let executions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM executions")
        .fetch_one(&mut conn)
        .await?;
    let credentials: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok((executions, credentials))
}

/// Takes an online backup of the instance of `config` into `out` (a new file, or a
/// directory to name one in), encrypted to `recipients`; with `keep` > 0, deletes this
/// tenant's oldest backups in that directory beyond `keep`, and records the newest in its
/// [`STATUS_FILE`].
pub async fn backup(
    config: &RuntimeConfig,
    out: &Path,
    recipients: Recipients,
    keep: usize,
) -> Result<BackupReport> {
    let db = config.data_dir.join(DB_FILE);
    if !db.exists() {
        return Err(Error::Refused(format!(
            "no database at {}: nothing to back up",
            db.display()
        )));
    }
    let created_at = jiff::Timestamp::now();
    // The snapshot sits beside the database: same volume, same protection (0600 in a
    // 0700 directory), and nothing in clear that the database does not hold in clear.
    let snapshot = private_temp(&config.data_dir, "backup-snapshot")?;
    let cleanup = Cleanup(Some(snapshot.clone()));
    {
        let mut conn = SqliteConnectOptions::new()
            .filename(&db)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await?;
        sqlx::query("VACUUM INTO $1")
            .bind(snapshot.display().to_string())
            .execute(&mut conn)
            .await?;
        conn.close().await?;
    }
    let (executions, credentials) = counts(&snapshot).await?;
    let credential_keys = keystore::read_wrapped_credential_keys(&config.data_dir).await?;
    let label = Label {
        kind: Kind::TenantData,
        created_at,
        tenant_id: Some(config.tenant_id.clone()),
    };
    let path = if out.is_dir() {
        out.join(tenantry_backup::file_name(&label))
    } else {
        out.to_owned()
    };
    let mut detail = serde_json::Map::new();
    detail.insert("executions".into(), executions.into());
    detail.insert("credentials".into(), credentials.into());
    detail.insert(
        CREDENTIAL_KEYS.into(),
        serde_json::to_value(&credential_keys)
            .map_err(|e| Error::Refused(format!("cannot encode the credential keys: {e}")))?,
    );
    let header = Header {
        label,
        schema_version: SCHEMA_VERSION,
        source: "sqlite".into(),
        detail,
    };
    let (summary, snapshot_bytes) = {
        let path = path.clone();
        let snapshot = snapshot.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut file = std::fs::File::open(&snapshot)
                .map_err(io(format!("reading {}", snapshot.display())))?;
            let mut writer = Writer::create(&path, &header, &recipients)?;
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = read_full(&mut file, &mut buf)
                    .map_err(io(format!("reading {}", snapshot.display())))?;
                if n == 0 {
                    break;
                }
                writer.write_record(&buf[..n])?;
                total += n as u64;
            }
            Ok((writer.finish()?, total))
        })
        .await
        .map_err(|e| Error::Refused(format!("the backup task failed: {e}")))??
    };
    drop(cleanup);
    let pruned = match (keep, path.parent()) {
        (1.., Some(dir)) => {
            tenantry_backup::prune(dir, Kind::TenantData, Some(&config.tenant_id), keep)?
        }
        _ => Vec::new(),
    };
    let report = BackupReport {
        path,
        created_at,
        executions,
        credentials,
        snapshot_bytes,
        file_bytes: summary.file_bytes,
        sha256: summary.sha256,
        pruned,
    };
    if let Some(dir) = report.path.parent() {
        write_status(dir, &report)?;
    }
    Ok(report)
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Records `report` as the newest backup in `dir` (written to a temporary file, then
/// renamed).
fn write_status(dir: &Path, report: &BackupReport) -> Result<()> {
    let path = dir.join(STATUS_FILE);
    let tmp = dir.join(format!(".{STATUS_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::Refused(format!("cannot encode the backup status: {e}")))?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io(format!("writing {}", path.display())))
}

/// The newest backup recorded in `dir`, if any.
pub fn last_backup(dir: &Path) -> Option<BackupReport> {
    let text = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// What a restore put back.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// When the backup's snapshot was taken.
    pub backup_created_at: jiff::Timestamp,
    /// Executions restored.
    pub executions: i64,
    /// Credentials restored.
    pub credentials: i64,
    /// Sealed records opened with the instance's keys.
    pub records_checked: u64,
    /// Executions left out because retention has deleted their period's key since the
    /// backup was taken (they are expired).
    pub expired_executions_dropped: u64,
}

/// Restores the backup at `input` (opened with `identities`) into the data directory of
/// `config`, which must hold no database (its key store stays: it holds the execution
/// keys); refuses another tenant's backup, a data directory that holds a database, and a
/// backup with a record the instance's keys do not open, unless retention deleted that
/// key (the record is then dropped). Nothing is left behind on a refusal.
pub async fn restore(
    config: &RuntimeConfig,
    input: &Path,
    identities: Identities,
) -> Result<RestoreReport> {
    let target = config.data_dir.join(DB_FILE);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        return Err(Error::Refused(format!(
            "{} holds a database: restore into an empty data directory (move it away first)",
            target.display()
        )));
    }
    // Fails early on an unreadable key file, before anything is written.
    crate::crypto::DataKey::from_file(&config.data_key_file)?;
    let input = input.to_owned();
    let mut reader = tokio::task::spawn_blocking({
        let input = input.clone();
        move || Reader::open(&input, &identities)
    })
    .await
    .map_err(|e| Error::Refused(format!("the restore task failed: {e}")))??;
    let header = reader.header().clone();
    if header.label.kind != Kind::TenantData {
        return Err(Error::Refused(format!(
            "{} is a {} backup; restore it with `tenantry-api restore`",
            input.display(),
            header.label.kind
        )));
    }
    if header.label.tenant_id.as_deref() != Some(config.tenant_id.as_str()) {
        return Err(Error::Refused(format!(
            "{} is a backup of tenant {}, not of {}",
            input.display(),
            header.label.tenant_id.as_deref().unwrap_or("?"),
            config.tenant_id
        )));
    }
    if header.schema_version > SCHEMA_VERSION {
        return Err(Error::Refused(format!(
            "{} has store schema {}, newer than this runtime's {SCHEMA_VERSION}",
            input.display(),
            header.schema_version
        )));
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| Error::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
    }
    let staged = private_temp(&config.data_dir, "restore")?;
    let mut cleanup = Cleanup(Some(staged.clone()));
    {
        let staged = staged.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(&staged)
                .map_err(io(format!("writing {}", staged.display())))?;
            while let Some(record) = reader.next_record()? {
                file.write_all(&record)
                    .map_err(io(format!("writing {}", staged.display())))?;
            }
            file.sync_all()
                .map_err(io(format!("syncing {}", staged.display())))
        })
        .await
        .map_err(|e| Error::Refused(format!("the restore task failed: {e}")))??;
    }
    // A key store this restore creates goes again if the restore is refused.
    let keys_file = config.data_dir.join(KEYS_FILE);
    let mut keys_cleanup = Cleanup((!keys_file.exists()).then(|| keys_file.clone()));
    let keys = Keyring::from_config(config).await?;
    let checked = async {
        import_credential_keys(config, &header, &keys).await?;
        let cutoff =
            crate::retention::age_cutoff(jiff::Timestamp::now(), config.retention.max_age_hours);
        check_restored(&staged, &keys, cutoff).await
    }
    .await;
    keys.close().await;
    let checked = checked?;
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        return Err(Error::Refused(format!(
            "{} appeared while restoring; not replacing it",
            target.display()
        )));
    }
    std::fs::rename(&staged, &target).map_err(io(format!("renaming to {}", target.display())))?;
    cleanup.0 = None;
    keys_cleanup.0 = None;
    std::fs::File::open(&config.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", config.data_dir.display())))?;
    Ok(RestoreReport {
        backup_created_at: header.label.created_at,
        executions: checked.executions,
        credentials: checked.credentials,
        records_checked: checked.records,
        expired_executions_dropped: checked.dropped,
    })
}

/// Adds the credential keys a backup carries to the instance's key store (a key it holds
/// already is left alone).
async fn import_credential_keys(
    config: &RuntimeConfig,
    header: &Header,
    keys: &Keyring,
) -> Result<()> {
    let carried: Vec<WrappedKey> = header
        .detail
        .get(CREDENTIAL_KEYS)
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| Error::Refused(format!("the backup's credential keys are damaged: {e}")))?
        .unwrap_or_default();
    let previous = keystore::read_previous_kek(config)?;
    for wrapped in &carried {
        if let Err(e) = keys.import_credential_key(wrapped, previous.as_ref()).await {
            return Err(Error::Refused(format!(
                "the data key does not open the backup's credential key {}: {e}. Restore with the tenant's own data key (set previous_data_key_file to the one in use when the backup was taken if it has been rotated since)",
                wrapped.id
            )));
        }
    }
    Ok(())
}

/// What [`check_restored`] opened.
struct Checked {
    executions: i64,
    credentials: i64,
    /// Every sealed record (executions, credentials, grants' tokens, pending states).
    records: u64,
    /// Expired executions deleted (their key was retired).
    dropped: u64,
}

/// SQLite's integrity check, then every sealed record opened with the instance's keys
/// (counted on the way: every execution and credential has one). An execution whose key
/// is gone is dropped when retention retired that key or the execution is older than
/// `cutoff`; any other record that does not open refuses the restore.
async fn check_restored(db: &Path, keys: &Keyring, cutoff: jiff::Timestamp) -> Result<Checked> {
    use futures::TryStreamExt as _;
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .pragma("secure_delete", "ON")
        .connect()
        .await?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await?;
    if integrity != "ok" {
        return Err(Error::Refused(format!(
            "the restored database fails SQLite's integrity check: {integrity}"
        )));
    }
    let sealed: [(Table, &str); 4] = [
        (
            Table::Executions,
            "SELECT id, payload, aged_at FROM executions",
        ),
        (Table::Credentials, "SELECT id, secret, 0 FROM credentials"),
        (
            Table::OAuth2Grants,
            "SELECT credential_id, tokens, 0 FROM oauth2_grants WHERE tokens IS NOT NULL",
        ),
        (
            Table::OAuth2States,
            "SELECT state_hash, verifier, 0 FROM oauth2_states",
        ),
    ];
    let mut checked = Checked {
        executions: 0,
        credentials: 0,
        records: 0,
        dropped: 0,
    };
    let mut expired = Vec::new();
    for (table, sql) in sealed {
        let mut rows = sqlx::query(sql).fetch(&mut conn);
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get(0)?;
            let value: Vec<u8> = row.try_get(1)?;
            if keys.open_record(table, &id, &value).is_err() {
                let missing = match sealed_with(&value) {
                    Some(SealedWith::Key(k)) if !keys.keys().iter().any(|i| i.id == k) => Some(k),
                    _ => None,
                };
                let aged_at: i64 = row.try_get(2)?;
                match missing {
                    Some(k)
                        if table == Table::Executions
                            && (keys.is_retired(k) || aged_at < cutoff.as_microsecond()) =>
                    {
                        expired.push(id);
                        continue;
                    }
                    Some(k) => {
                        return Err(Error::Refused(format!(
                            "{} record {id} of this backup needs data key {k}, which the instance's key store ({}) does not hold: restore into the instance's own data directory, whose {KEYS_FILE} holds the execution keys",
                            table.as_str(),
                            KEYS_FILE
                        )));
                    }
                    None => {
                        return Err(Error::Refused(format!(
                            "the data key does not open {} record {id} of this backup: restore with the tenant's own data key",
                            table.as_str()
                        )));
                    }
                }
            }
            checked.records += 1;
            match table {
                Table::Executions => checked.executions += 1,
                Table::Credentials => checked.credentials += 1,
                Table::OAuth2Grants | Table::OAuth2States => {}
            }
        }
    }
    for id in &expired {
        sqlx::query("DELETE FROM executions WHERE id = ?")
            .bind(id)
            .execute(&mut conn)
            .await?;
        checked.dropped += 1;
    }
    drop(conn);
    Ok(checked)
}

/// Takes a backup into the schedule's directory whenever the newest there (by its
/// [`STATUS_FILE`]) is `interval` old, at once when there is none; keeps `keep`. A failure
/// is logged and counted, and retried after a minute (or `interval`, if shorter).
pub async fn run_scheduler(
    config: RuntimeConfig,
    schedule: tenantry_proto::runtime_config::BackupSchedule,
    interval: std::time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::time::Duration;
    let dir = schedule.directory.clone();
    if let Some(last) = last_backup(&dir) {
        metrics.last_backup.set(last.created_at.as_second());
    }
    let mut retry: Option<Duration> = None;
    loop {
        let wait = retry.take().unwrap_or_else(|| match last_backup(&dir) {
            Some(last) => {
                let age = jiff::Timestamp::now().duration_since(last.created_at);
                let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
                interval.saturating_sub(age)
            }
            None => Duration::ZERO,
        });
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        if *stop.borrow() {
            return;
        }
        let result = async {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(format!("creating {}", dir.display())))?;
            let recipients = Recipients::load(&[&schedule.recipient_file])?;
            backup(&config, &dir, recipients, schedule.keep as usize).await
        }
        .await;
        match result {
            Ok(report) => {
                metrics.backups.inc();
                metrics.last_backup.set(report.created_at.as_second());
                tracing::info!(
                    path = %report.path.display(),
                    executions = report.executions,
                    bytes = report.file_bytes,
                    "backup written"
                );
            }
            Err(e) => {
                metrics.backup_failures.inc();
                tracing::error!(error = %e, "scheduled backup failed; retrying");
                retry = Some(interval.min(Duration::from_secs(60)));
            }
        }
    }
}
