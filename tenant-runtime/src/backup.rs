//! Backups of the instance's store: `tenant-runtime backup` and `restore`, and the
//! scheduled backups of the config's `backup` section.
//!
//! A backup is an online snapshot of the SQLite database (`VACUUM INTO` a file beside it:
//! one read transaction, writers go on) streamed into a [`tenantry_backup`] file of kind
//! `tenant-data`. Payloads, credential secrets and tokens are still sealed with the
//! tenant's data key inside it, and the whole file is encrypted again to the backup
//! recipients. A restore writes the snapshot to a file beside the target, checks SQLite's
//! integrity and that the tenant's data key opens every sealed record, and only then
//! renames it into place.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions as _, Connection as _};
use tenantry_backup::{Header, Identities, Kind, Label, Reader, Recipients, Writer};

use crate::config::RuntimeConfig;
use crate::crypto::{DataKey, Sealer, Table};
use crate::error::{Error, Result};
use crate::store::DB_FILE;

/// The store's schema version in backups (the store's tables have not changed shape since
/// backups exist).
pub const SCHEMA_VERSION: i64 = 1;
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
    /// Sealed records opened with the tenant's key.
    pub records_checked: u64,
}

/// Restores the backup at `input` (opened with `identities`) into the empty data directory
/// of `config`; refuses another tenant's backup, a data directory that holds a database,
/// and a backup whose records the config's data key does not open. Nothing is left behind
/// on a refusal.
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
    let key = DataKey::from_file(&config.data_key_file)?;
    let sealer = Sealer::new(&key, &config.tenant_id);
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
    let checked = check_restored(&staged, &sealer).await?;
    if std::fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        return Err(Error::Refused(format!(
            "{} appeared while restoring; not replacing it",
            target.display()
        )));
    }
    std::fs::rename(&staged, &target).map_err(io(format!("renaming to {}", target.display())))?;
    cleanup.0 = None;
    std::fs::File::open(&config.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", config.data_dir.display())))?;
    Ok(RestoreReport {
        backup_created_at: header.label.created_at,
        executions: checked.executions,
        credentials: checked.credentials,
        records_checked: checked.records,
    })
}

/// What [`check_restored`] opened.
struct Checked {
    executions: i64,
    credentials: i64,
    /// Every sealed record (executions, credentials, grants' tokens, pending states).
    records: u64,
}

/// SQLite's integrity check, then every sealed record opened with the tenant's key
/// (counted on the way: every execution and credential has one).
async fn check_restored(db: &Path, sealer: &Sealer) -> Result<Checked> {
    use futures::TryStreamExt as _;
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
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
        (Table::Executions, "SELECT id, payload FROM executions"),
        (Table::Credentials, "SELECT id, secret FROM credentials"),
        (
            Table::OAuth2Grants,
            "SELECT credential_id, tokens FROM oauth2_grants WHERE tokens IS NOT NULL",
        ),
        (
            Table::OAuth2States,
            "SELECT state_hash, verifier FROM oauth2_states",
        ),
    ];
    let mut checked = Checked {
        executions: 0,
        credentials: 0,
        records: 0,
    };
    for (table, sql) in sealed {
        let mut rows = sqlx::query(sql).fetch(&mut conn);
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get(0)?;
            let value: Vec<u8> = row.try_get(1)?;
            if sealer.open(table, &id, &value).is_err() {
                return Err(Error::Refused(format!(
                    "the data key does not open {} record {id} of this backup: restore with the tenant's own data key",
                    table.as_str()
                )));
            }
            checked.records += 1;
            match table {
                Table::Executions => checked.executions += 1,
                Table::Credentials => checked.credentials += 1,
                Table::OAuth2Grants | Table::OAuth2States => {}
            }
        }
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
