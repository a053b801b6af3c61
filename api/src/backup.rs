//! Backups of the control database: `tenantry-api backup`, `restore`, `backup-keygen` and
//! `backups`, and the scheduled backups of `serve --backup-interval`.
//!
//! A backup is a [`tenantry_backup`] file of kind `control-database`: the logical dump of
//! [`crate::store::backup`] from one consistent snapshot, with the schema version and the
//! audit chain head in its encrypted header. The master key is not in it (it lives beside
//! the database, or in the API's Secret): restoring needs both the backup's identity and
//! the master key, and refuses a master key that cannot open the backup's secrets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde::Serialize;
use tenantry_backup::{AsyncReader, AsyncWriter, Header, Identities, Kind, Label, Recipients};

use crate::clock::Clock;
use crate::config::DatabaseArgs;
use crate::crypto::MasterKeyRing;
use crate::error::{Error, Result};
use crate::store::backup::{self as dump, AuditHead};
use crate::store::{AuditRecord, Backend};

/// The schedule of `serve --backup-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSettings {
    /// Where backups go: `control/` for the control database, `tenants/<id>/` for each
    /// local tenant.
    pub dir: PathBuf,
    /// The interval as given (`24h`), for the runtimes' configs.
    pub interval_text: String,
    /// The interval.
    pub interval: Duration,
    /// Backups of each kind (and tenant) to keep.
    pub keep: u32,
    /// The recipients file.
    pub recipient_file: PathBuf,
}

impl BackupSettings {
    /// The control database's backup directory.
    pub fn control_dir(&self) -> PathBuf {
        self.dir.join("control")
    }

    /// A local tenant's backup schedule, for its runtime's config.
    pub fn tenant_schedule(
        &self,
        tenant_id: &str,
    ) -> tenantry_proto::runtime_config::BackupSchedule {
        tenantry_proto::runtime_config::BackupSchedule {
            directory: self.dir.join("tenants").join(tenant_id),
            interval: self.interval_text.clone(),
            keep: self.keep,
            recipient_file: self.recipient_file.clone(),
        }
    }
}

/// Takes a control database backup into `settings.control_dir()` whenever the newest
/// there is `interval` old (at once when there is none), keeping `keep`; failures are
/// logged and retried after a minute. Runs until dropped.
pub async fn run_scheduler(url: secrecy::SecretString, settings: BackupSettings) {
    let dir = settings.control_dir();
    let mut retry = None;
    loop {
        let wait = retry
            .take()
            .unwrap_or_else(|| due_in(&dir, settings.interval));
        tokio::time::sleep(wait).await;
        let result = async {
            crate::files::private_dir(&dir)?;
            let recipients = Recipients::load(&[&settings.recipient_file])?;
            backup(
                url.expose_secret(),
                &dir,
                recipients,
                settings.keep as usize,
                &crate::clock::SystemClock,
            )
            .await
        }
        .await;
        match result {
            Ok(report) => tracing::info!(
                path = %report.path.display(),
                bytes = report.file_bytes,
                audit_sequence = report.audit_head.sequence,
                "control database backup written"
            ),
            Err(e) => {
                tracing::error!(error = %e, "scheduled control database backup failed; retrying");
                retry = Some(settings.interval.min(Duration::from_secs(60)));
            }
        }
    }
}

/// How long until the next control database backup in `dir` is due (zero when none is
/// there, or the newest is `interval` old).
fn due_in(dir: &Path, interval: Duration) -> Duration {
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let newest = tenantry_backup::list(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.label.kind == Kind::ControlDatabase)
        .map(|f| f.label.created_at.as_millisecond())
        .max();
    match newest {
        Some(at) => {
            interval.saturating_sub(Duration::from_millis(u64::try_from(now - at).unwrap_or(0)))
        }
        None => Duration::ZERO,
    }
}

/// The identity file written by `backup-keygen`.
pub const IDENTITY_FILE: &str = "backup.key";
/// The recipient file written by `backup-keygen`.
pub const RECIPIENT_FILE: &str = "backup.pub";

/// What `backup` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The file.
    pub path: PathBuf,
    /// When the snapshot was taken.
    pub created_at: jiff::Timestamp,
    /// Its schema version.
    pub schema_version: i64,
    /// Rows per table.
    pub tables: Vec<(String, u64)>,
    /// Bytes of the dump before compression and encryption.
    pub dump_bytes: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// SHA-256 of the dump's records.
    pub sha256: String,
    /// The audit chain head in the snapshot.
    pub audit_head: AuditHead,
    /// Older backups deleted (`--keep`).
    pub pruned: Vec<PathBuf>,
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// Writes a backup of the database at `url` to `out` (a new file, or a directory to name
/// one in), encrypted to `recipients`; audits `backup.create`. With `keep` > 0, deletes the
/// oldest control database backups in that directory beyond `keep`.
pub async fn backup(
    url: &str,
    out: &Path,
    recipients: Recipients,
    keep: usize,
    clock: &dyn Clock,
) -> Result<BackupReport> {
    let (mut conn, backend) = dump::connect(url, false).await?;
    let snapshot = dump::Snapshot::begin(&mut conn, backend).await?;
    let created_at = jiff::Timestamp::from_millisecond(clock.now_ms())
        .map_err(|e| Error::Config(format!("clock: {e}")))?;
    let label = Label {
        kind: Kind::ControlDatabase,
        created_at,
        tenant_id: None,
    };
    let path = if out.is_dir() {
        out.join(tenantry_backup::file_name(&label))
    } else {
        out.to_owned()
    };
    let audit_head = snapshot.audit_head.clone();
    let mut detail = serde_json::Map::new();
    detail.insert(
        "audit_head".into(),
        serde_json::to_value(&audit_head).map_err(|e| Error::Config(e.to_string()))?,
    );
    let header = Header {
        label,
        schema_version: snapshot.schema_version,
        source: backend_name(backend).into(),
        detail,
    };
    let schema_version = header.schema_version;
    let mut writer = AsyncWriter::create(&path, header, recipients).await?;
    let tables = snapshot.dump(&mut writer).await?;
    let summary = writer.finish().await?;
    let tables: Vec<(String, u64)> = tables.into_iter().map(|(t, n)| (t.to_owned(), n)).collect();
    let rows: u64 = tables.iter().map(|(_, n)| n).sum();
    let record = cli_record(
        "backup.create",
        &path,
        &[
            ("rows", rows.into()),
            ("sha256", summary.sha256.clone().into()),
            ("audit_sequence", audit_head.sequence.into()),
        ],
    );
    dump::append_audit(&mut conn, backend, &record, clock.now_ms()).await?;
    {
        use sqlx::Connection as _;
        let _ = conn.close().await;
    }
    let pruned = match (keep, path.parent()) {
        (1.., Some(dir)) => tenantry_backup::prune(dir, Kind::ControlDatabase, None, keep)?,
        _ => Vec::new(),
    };
    Ok(BackupReport {
        path,
        created_at,
        schema_version,
        tables,
        dump_bytes: summary.record_bytes,
        file_bytes: summary.file_bytes,
        sha256: summary.sha256,
        audit_head,
        pruned,
    })
}

/// The audit row of a backup command run from the command line: on the control database,
/// by nobody, naming the backup file.
fn cli_record(
    action: &'static str,
    file: &Path,
    detail: &[(&str, serde_json::Value)],
) -> AuditRecord {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut fields = vec![("file", name.into())];
    fields.extend(detail.iter().cloned());
    AuditRecord {
        action,
        actor_user_id: String::new(),
        target: "control-database".into(),
        success: true,
        source: "cli".into(),
        detail_json: crate::service::detail(&fields),
    }
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// When the backup's snapshot was taken.
    pub backup_created_at: jiff::Timestamp,
    /// Where it came from (`sqlite`, `postgres`).
    pub backup_source: String,
    /// Its schema version (the database is at this binary's afterwards).
    pub backup_schema_version: i64,
    /// Rows per table.
    pub tables: Vec<(String, u64)>,
    /// Audit rows whose chain was verified.
    pub audit_rows: u64,
}

/// Loads the master key a restore checks the backup against: `--master-key-file`, or
/// `master.key` beside a SQLite database; unlike `serve`, never creates one.
fn existing_master_key(db: &DatabaseArgs) -> Result<(MasterKeyRing, PathBuf)> {
    let (path, _) = crate::server::master_key_path(db)?;
    if !path.exists() {
        return Err(Error::Restore(format!(
            "no master key at {}: put the master key of the API that wrote the backup there (it is never in a backup), or name it with --master-key-file",
            path.display()
        )));
    }
    Ok((crate::keyring::read_ring(&path)?.0, path))
}

struct MasterKeyCheck<'a> {
    key: &'a MasterKeyRing,
    path: &'a Path,
}

impl dump::RestoreChecks for MasterKeyCheck<'_> {
    fn token_key(&mut self, kid: &str, sealed: &str) -> Result<()> {
        if self
            .key
            .open(&crate::token_keys::seal_context(kid), sealed)
            .is_err()
        {
            return Err(Error::Restore(format!(
                "the master key {} cannot open the instance-token signing key {kid} in this backup: restore with the master key of the API that wrote it",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn user(&mut self, id: &str, sealed: &[&str]) -> Result<()> {
        for value in sealed {
            if self
                .key
                .open(&crate::service::mfa::totp_context(id), value)
                .is_err()
            {
                return Err(Error::Restore(format!(
                    "the master key {} cannot open the TOTP secret of user {id} in this backup: restore with the master key of the API that wrote it",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }
}

/// Restores the backup at `input` (opened with `identities`) into the empty database of
/// `db`, checking it against `db`'s master key; audits `backup.restore`. Nothing is
/// written unless everything checks out (a SQLite file it created is removed again).
pub async fn restore(
    db: &DatabaseArgs,
    input: &Path,
    identities: Identities,
    clock: &dyn Clock,
) -> Result<RestoreReport> {
    let (key, key_path) = existing_master_key(db)?;
    let mut reader = AsyncReader::open(input, identities).await?;
    let header = reader.header().clone();
    if header.label.kind != Kind::ControlDatabase {
        return Err(Error::Restore(format!(
            "{} is a {} backup; restore it with `tenant-runtime restore`",
            input.display(),
            header.label.kind
        )));
    }
    let current = dump::current_schema_version();
    if header.schema_version > current {
        return Err(Error::Restore(format!(
            "{} has schema version {}, newer than this tenantry-api's {current}: restore it with a tenantry-api of that version or later",
            input.display(),
            header.schema_version
        )));
    }
    let head: AuditHead = header
        .detail
        .get("audit_head")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| Error::Restore("the backup's header has no audit chain head".into()))?;
    let url = db.url();
    let url = url.expose_secret();
    let created = match crate::server::sqlite_path(url) {
        Some(path) if !path.exists() => {
            crate::server::ensure_sqlite_dir(url)?;
            Some(path)
        }
        _ => None,
    };
    let result = async {
        let (mut conn, backend) = dump::connect(url, true).await?;
        let record = cli_record(
            "backup.restore",
            input,
            &[
                (
                    "backup_created_at",
                    header.label.created_at.to_string().into(),
                ),
                ("backup_source", header.source.clone().into()),
                ("backup_schema_version", header.schema_version.into()),
            ],
        );
        let restored = dump::restore_into(
            &mut conn,
            backend,
            header.schema_version,
            &head,
            &mut MasterKeyCheck {
                key: &key,
                path: &key_path,
            },
            &mut reader,
            &record,
            clock.now_ms(),
        )
        .await;
        use sqlx::Connection as _;
        let _ = conn.close().await;
        restored
    }
    .await;
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(path) = created {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            return Err(e);
        }
    };
    Ok(RestoreReport {
        backup_created_at: header.label.created_at,
        backup_source: header.source,
        backup_schema_version: header.schema_version,
        tables: restored.tables,
        audit_rows: restored.audit_rows,
    })
}

/// Writes a new backup key pair into `dir`; returns the recipient.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let identity = dir.join(IDENTITY_FILE);
    let recipient = dir.join(RECIPIENT_FILE);
    let public = tenantry_backup::keys::generate(&identity, &recipient)?;
    Ok((identity, recipient, public))
}

/// The newest backup of one kind (and tenant), as `backups` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Newest {
    /// What it holds.
    pub kind: Kind,
    /// The tenant, for tenant data.
    pub tenant_id: Option<String>,
    /// The file.
    pub path: PathBuf,
    /// When its snapshot was taken.
    pub created_at: jiff::Timestamp,
    /// Its age, in seconds.
    pub age_seconds: u64,
    /// Its size.
    pub bytes: u64,
    /// Older than twice the schedule.
    pub stale: bool,
    /// Backups of this kind (and tenant) found.
    pub count: usize,
}

/// The newest backup of each kind and tenant under `dir` (and its subdirectories, two
/// levels deep), stale when older than twice `interval`.
pub fn newest(dir: &Path, interval: Duration, now_ms: i64) -> Result<Vec<Newest>> {
    let subdirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let children = subdirs(dir);
    let mut dirs = vec![dir.to_owned()];
    for child in &children {
        dirs.extend(subdirs(child));
    }
    dirs.extend(children);
    let mut newest: Vec<Newest> = Vec::new();
    for d in dirs {
        for found in tenantry_backup::list(&d)? {
            let age_ms = now_ms
                .saturating_sub(found.label.created_at.as_millisecond())
                .max(0);
            let age_seconds = u64::try_from(age_ms / 1000).unwrap_or(0);
            let stale = u128::try_from(age_ms).unwrap_or(0) > interval.as_millis() * 2;
            let item = Newest {
                kind: found.label.kind,
                tenant_id: found.label.tenant_id.clone(),
                path: found.path,
                created_at: found.label.created_at,
                age_seconds,
                bytes: found.bytes,
                stale,
                count: 1,
            };
            match newest
                .iter_mut()
                .find(|n| n.kind == item.kind && n.tenant_id == item.tenant_id)
            {
                Some(existing) => {
                    let count = existing.count + 1;
                    if item.created_at > existing.created_at {
                        *existing = item;
                    }
                    existing.count = count;
                }
                None => newest.push(item),
            }
        }
    }
    newest.sort_by(|a, b| (a.kind.as_str(), &a.tenant_id).cmp(&(b.kind.as_str(), &b.tenant_id)));
    Ok(newest)
}
