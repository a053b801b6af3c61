//! The master key ring of a running API, and its rotation.
//!
//! `--master-key-file` holds one or more keys, the newest last. Every key opens what it
//! sealed; new values are sealed by the *primary* key, which the database names
//! (`master_keys`), so that every replica seals with the same key. Each serving API reads
//! its key file and the primary every `--master-key-reload-interval`, and reports the keys
//! it holds (`master_key_holders`).
//!
//! `tenantry-api rotate-master-key --new-key-file F` then rotates without downtime:
//! 1. adds the key of `F` to the key file (made when `F` does not exist);
//! 2. waits until every running API holds it (a replica that could not open what another
//!    seals would fail logins);
//! 3. makes it the primary (audited `master_key.rotate`) and waits until every running
//!    API seals with it;
//! 4. re-seals every secret sealed by another key, in batches, each value only if it is
//!    still what was read (audited `master_key.reseal`).
//!
//! Each step is skipped when already done, so an interrupted rotation is finished by
//! running the same command again. `tenantry-api master-keys status` counts the secrets
//! each key seals: a key that seals none can leave the key file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::clock::Clock;
use crate::crypto::{MasterKey, MasterKeyRing, SharedKeyRing, sealed_key_id};
use crate::error::{Error, Result};
use crate::mail::notice::{Notice, VERIFY_TOKEN_CONTEXT};
use crate::store::{AuditRecord, KeyHolder, SealedColumn, SealedRow, Store};

impl crate::crypto::Seal for ServerKeyRing {
    fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String> {
        self.ring.seal(context, plaintext)
    }

    fn open(&self, context: &str, sealed: &str) -> Result<secrecy::SecretBox<Vec<u8>>> {
        self.ring.open(context, sealed)
    }
}

/// The ring a command (`rotate-token-key`) seals with: the keys of the key file, the
/// database's primary.
pub async fn command_ring(
    db: &crate::config::DatabaseArgs,
    store: &Store,
) -> Result<MasterKeyRing> {
    let (path, _) = crate::server::master_key_path(db)?;
    let (mut ring, _) = read_ring(&path)?;
    if let Some(primary) = store.master_key_primary().await?
        && !ring.set_primary(&primary)
    {
        return Err(Error::MasterKey(format!(
            "the database's secrets are sealed by master key {primary}, which is not in {}",
            path.display()
        )));
    }
    Ok(ring)
}

/// The shortest time a server's report counts for.
const HOLDER_MIN_TTL: Duration = Duration::from_secs(120);

/// The serving API's key ring: the keys of its key file, the primary from the database.
pub struct ServerKeyRing {
    ring: SharedKeyRing,
    path: PathBuf,
    server_id: String,
    /// SHA-256 of the key file as last loaded (to notice changes).
    loaded: Mutex<[u8; 32]>,
}

impl std::fmt::Debug for ServerKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeyRing")
            .field("path", &self.path)
            .field("ring", &self.ring.current())
            .finish_non_exhaustive()
    }
}

/// Reads and parses the key file at `path` (refused when others can read it), with the
/// digest of its text.
pub fn read_ring(path: &Path) -> Result<(MasterKeyRing, [u8; 32])> {
    crate::files::check_key_file(path)?;
    let text = SecretString::from(std::fs::read_to_string(path).map_err(crate::server::io_err(
        format!("reading master key {}", path.display()),
    ))?);
    let digest: [u8; 32] = Sha256::digest(text.expose_secret().as_bytes()).into();
    let ring = MasterKeyRing::parse(&text)
        .map_err(|e| Error::MasterKey(format!("{}: {e}", path.display())))?;
    Ok((ring, digest))
}

impl ServerKeyRing {
    /// Loads the key file and takes the database's primary: on a database without one,
    /// the file's newest key becomes the primary. Refuses a key file without the
    /// database's primary (this server could not open what the others seal).
    pub async fn load(store: &Store, path: &Path, now_ms: i64) -> Result<Self> {
        let (mut ring, digest) = read_ring(path)?;
        let primary = store
            .init_master_key_primary(ring.newest_id(), now_ms)
            .await?;
        if !ring.set_primary(&primary) {
            return Err(Error::MasterKey(format!(
                "the database's secrets are sealed by master key {primary}, which is not in {} \
                 (it holds {}); serve with the key file that holds it",
                path.display(),
                ring.ids().join(", ")
            )));
        }
        Ok(ServerKeyRing {
            ring: SharedKeyRing::new(ring),
            path: path.to_owned(),
            server_id: uuid::Uuid::new_v4().to_string(),
            loaded: Mutex::new(digest),
        })
    }

    /// Seals with the primary key.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String> {
        self.ring.seal(context, plaintext)
    }

    /// Opens a value sealed by any key of the ring.
    pub fn open(&self, context: &str, sealed: &str) -> Result<secrecy::SecretBox<Vec<u8>>> {
        self.ring.open(context, sealed)
    }

    /// The ring in force.
    pub fn current(&self) -> std::sync::Arc<MasterKeyRing> {
        self.ring.current()
    }

    /// This process's id in `master_key_holders`.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Re-reads the key file when it changed, takes the database's primary, and reports
    /// what this server holds (counted by rotations until `now + 3 × interval`). A key
    /// file that cannot be read, or lacks a key the database needs, is logged and the
    /// running ring kept.
    pub async fn refresh(&self, store: &Store, now_ms: i64, interval: Duration) -> Result<()> {
        let current = self.ring.current();
        // The file as it is now, and whether it changed since it was last taken up.
        let mut fresh: Option<(MasterKeyRing, bool)> = None;
        match read_ring(&self.path) {
            Ok((ring, digest)) => {
                let mut loaded = self
                    .loaded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let changed = *loaded != digest;
                if changed {
                    tracing::info!(
                        path = %self.path.display(),
                        keys = %ring.ids().join(","),
                        "master key file changed"
                    );
                    *loaded = digest;
                }
                fresh = Some((ring, changed));
            }
            Err(e) => {
                tracing::error!(error = %e, "master key file unusable; keeping the keys in use")
            }
        }
        let primary = store.master_key_primary().await?;
        let wanted = primary.as_deref().unwrap_or(current.primary_id());
        let mut ring = match fresh {
            // A new file, or the same keys with another primary.
            Some((ring, changed)) if changed || wanted != current.primary_id() => ring,
            _ => return self.report(store, &current, now_ms, interval).await,
        };
        if !ring.set_primary(wanted) && !ring.set_primary(current.primary_id()) {
            tracing::error!(
                primary = wanted,
                keys = %ring.ids().join(","),
                "the master key file lacks the key the database seals with and the key in use; keeping the keys in use"
            );
            return self.report(store, &current, now_ms, interval).await;
        }
        if ring.primary_id() != wanted {
            tracing::error!(
                primary = wanted,
                "the master key file lacks the key the database seals with; sealing with {} until it has it",
                ring.primary_id()
            );
        } else if ring.primary_id() != current.primary_id() {
            tracing::info!(primary = wanted, "sealing with a new master key");
        }
        self.ring.replace(ring);
        self.report(store, &self.ring.current(), now_ms, interval)
            .await
    }

    async fn report(
        &self,
        store: &Store,
        ring: &MasterKeyRing,
        now_ms: i64,
        interval: Duration,
    ) -> Result<()> {
        let holder = KeyHolder {
            server_id: self.server_id.clone(),
            host: hostname(),
            key_ids: ring.ids().into_iter().map(str::to_owned).collect(),
            primary_key_id: ring.primary_id().to_owned(),
            seen_at_ms: now_ms,
        };
        // Three missed refreshes, and never less than two minutes: a server whose database
        // write was slow once is still running.
        let ttl = interval.saturating_mul(3).max(HOLDER_MIN_TTL);
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        store
            .record_key_holder(&holder, now_ms.saturating_add(ttl))
            .await
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

/// The key file and the database of a command (`rotate-master-key`, `master-keys`); the
/// key file must exist (it is never made here).
pub async fn open_database(db: &crate::config::DatabaseArgs) -> Result<(PathBuf, Store)> {
    let (path, _) = crate::server::master_key_path(db)?;
    if !path.exists() {
        return Err(Error::MasterKey(format!(
            "no master key file at {}; name it with --master-key-file",
            path.display()
        )));
    }
    Ok((path, crate::server::command_store(db).await?))
}

/// The serving API's refresh loop (see [`ServerKeyRing::refresh`]); runs until dropped.
pub async fn run(state: std::sync::Arc<crate::state::AppState>, interval: Duration) {
    loop {
        if let Err(e) = state
            .master_key
            .refresh(&state.store, state.now_ms(), interval)
            .await
        {
            tracing::warn!(error = %e, "could not refresh the master key ring");
        }
        tokio::time::sleep(interval).await;
    }
}

/// The context a sealed value of `column` was sealed under, and the sealed value itself,
/// from its row; `None` when the row holds none (an outbox notice without a token).
fn sealed_of(column: SealedColumn, row: &SealedRow) -> Option<(String, String)> {
    match column {
        SealedColumn::TotpSecret | SealedColumn::TotpPending => Some((
            crate::service::mfa::totp_context(&row.id),
            row.stored.clone(),
        )),
        SealedColumn::TokenKey => {
            Some((crate::token_keys::seal_context(&row.id), row.stored.clone()))
        }
        SealedColumn::OutboxNotice => match serde_json::from_str(&row.stored) {
            Ok(Notice::VerifyEmail { token_sealed }) => {
                Some((VERIFY_TOKEN_CONTEXT.to_owned(), token_sealed))
            }
            _ => None,
        },
    }
}

/// The row's stored text with its sealed value replaced by `sealed`.
fn with_sealed(column: SealedColumn, sealed: String) -> Result<String> {
    match column {
        SealedColumn::TotpSecret | SealedColumn::TotpPending | SealedColumn::TokenKey => Ok(sealed),
        SealedColumn::OutboxNotice => serde_json::to_string(&Notice::VerifyEmail {
            token_sealed: sealed,
        })
        .map_err(|_| Error::Crypto("a notice could not be encoded")),
    }
}

/// Options of [`rotate`].
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Values re-sealed per transaction.
    pub batch_size: u32,
    /// How long to wait for every running API to load the new key, then to seal with it.
    pub wait: Duration,
    /// How often to look.
    pub poll: Duration,
}

/// What [`rotate`] did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RotateReport {
    /// The new key.
    pub key_id: String,
    /// The primary before, if another.
    pub previous_primary: Option<String>,
    /// Whether the key was added to the key file by this run.
    pub added_to_file: bool,
    /// Whether the new key file was generated by this run.
    pub generated: bool,
    /// Running APIs that were waited for.
    pub servers: usize,
    /// Values re-sealed, per place.
    pub resealed: BTreeMap<String, u64>,
    /// Values that no key of the file opens (left as they are).
    pub unreadable: u64,
    /// Wall time of the re-seal step, in milliseconds.
    pub reseal_ms: u64,
}

/// Rotates to the key in `new_key_file` (see the module docs).
pub async fn rotate(
    store: &Store,
    key_file: &Path,
    new_key_file: &Path,
    options: &RotateOptions,
    clock: &dyn Clock,
) -> Result<RotateReport> {
    let (new_key, generated) = new_key(new_key_file)?;
    let key_id = new_key.id().to_owned();
    let (ring, _) = read_ring(key_file)?;
    let added_to_file = if ring.contains(&key_id) {
        false
    } else {
        append_key(key_file, new_key_file)?;
        true
    };
    let (mut ring, _) = read_ring(key_file)?;
    store.add_master_key(&key_id, clock.now_ms()).await?;

    let servers = wait_for_servers(store, options, clock, &key_id, |h| {
        h.key_ids.contains(&key_id)
    })
    .await?;
    let previous_primary = store.master_key_primary().await?;
    let audit = AuditRecord {
        action: "master_key.rotate",
        actor_user_id: String::new(),
        target: key_id.clone(),
        success: true,
        source: "cli".into(),
        detail_json: crate::service::detail(&[
            ("key_id", key_id.clone().into()),
            (
                "previous_key_id",
                previous_primary.clone().unwrap_or_default().into(),
            ),
            ("servers", servers.into()),
        ]),
    };
    store
        .promote_master_key(&key_id, &audit, clock.now_ms())
        .await?;
    wait_for_servers(store, options, clock, &key_id, |h| {
        h.primary_key_id == key_id
    })
    .await?;

    ring.set_primary(&key_id);
    let started = Instant::now();
    let (resealed, unreadable) = reseal_all(store, &ring, options.batch_size).await?;
    let reseal_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let total: u64 = resealed.values().sum();
    let mut detail: Vec<(&str, serde_json::Value)> = vec![
        ("key_id", key_id.clone().into()),
        ("resealed", total.into()),
        ("unreadable", unreadable.into()),
    ];
    for (place, n) in &resealed {
        detail.push((place.as_str(), (*n).into()));
    }
    store
        .commit_audited(
            [&AuditRecord {
                action: "master_key.reseal",
                actor_user_id: String::new(),
                target: key_id.clone(),
                success: unreadable == 0,
                source: "cli".into(),
                detail_json: crate::service::detail(&detail),
            }],
            clock.now_ms(),
            async |_| Ok(crate::store::Write::Commit(())),
        )
        .await?;
    Ok(RotateReport {
        previous_primary: previous_primary.filter(|p| *p != key_id),
        key_id,
        added_to_file,
        generated,
        servers,
        resealed,
        unreadable,
        reseal_ms,
    })
}

/// The key of `path`, generated (0600) when the file does not exist.
fn new_key(path: &Path) -> Result<(MasterKey, bool)> {
    if path.exists() {
        crate::files::check_key_file(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(crate::server::io_err(format!("reading {}", path.display())))?;
        let key = MasterKey::from_base64(&SecretString::from(text))
            .map_err(|e| Error::MasterKey(format!("{}: {e}", path.display())))?;
        return Ok((key, false));
    }
    let (key, text) = MasterKey::generate()?;
    crate::server::write_new_file(
        path,
        format!("{}\n", text.expose_secret()).as_bytes(),
        0o600,
    )?;
    Ok((key, true))
}

/// Appends the key of `new_key_file` to the key file: a new file beside it, renamed over
/// it, so a reader sees the old file or the new one.
fn append_key(key_file: &Path, new_key_file: &Path) -> Result<()> {
    let unwritable = |e: std::io::Error| {
        Error::Config(format!(
            "cannot add the new key to {} ({e}); append the line of {} to it (or to the Secret it comes from), \
             and run this command again once the servers have loaded it",
            key_file.display(),
            new_key_file.display()
        ))
    };
    let old = SecretString::from(std::fs::read_to_string(key_file).map_err(unwritable)?);
    let new = SecretString::from(std::fs::read_to_string(new_key_file).map_err(unwritable)?);
    let mut text = old.expose_secret().trim_end().to_owned();
    text.push('\n');
    text.push_str(new.expose_secret().trim());
    text.push('\n');
    let text = SecretString::from(text);
    let tmp = key_file.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    crate::server::write_new_file(&tmp, text.expose_secret().as_bytes(), 0o600)?;
    std::fs::rename(&tmp, key_file).map_err(unwritable)?;
    tracing::info!(path = %key_file.display(), "added the new master key to the key file");
    Ok(())
}

/// Waits until every running API passes `ready`; returns how many run.
async fn wait_for_servers(
    store: &Store,
    options: &RotateOptions,
    clock: &dyn Clock,
    key_id: &str,
    ready: impl Fn(&KeyHolder) -> bool,
) -> Result<usize> {
    let deadline = Instant::now() + options.wait;
    loop {
        let holders = store.live_key_holders(clock.now_ms()).await?;
        let behind: Vec<&KeyHolder> = holders.iter().filter(|h| !ready(h)).collect();
        if behind.is_empty() {
            return Ok(holders.len());
        }
        if Instant::now() >= deadline {
            let who: Vec<String> = behind
                .iter()
                .map(|h| {
                    format!(
                        "{} on {} (holds {}, seals with {})",
                        h.server_id,
                        if h.host.is_empty() { "?" } else { &h.host },
                        h.key_ids.join(","),
                        h.primary_key_id
                    )
                })
                .collect();
            return Err(Error::MasterKey(format!(
                "after {}, {} of {} running servers have not taken up key {key_id}: {}; \
                 give their key file the new key (or wait for its Secret to reach them) and run this again",
                humantime::format_duration(options.wait),
                behind.len(),
                holders.len(),
                who.join("; ")
            )));
        }
        tokio::time::sleep(options.poll).await;
    }
}

/// Re-seals, by the ring's primary, every value another key sealed; passes until one
/// finds nothing left (a value changed meanwhile is looked at again).
async fn reseal_all(
    store: &Store,
    ring: &MasterKeyRing,
    batch_size: u32,
) -> Result<(BTreeMap<String, u64>, u64)> {
    let primary = ring.primary_id().to_owned();
    let mut resealed = BTreeMap::new();
    let mut unreadable_ids = std::collections::BTreeSet::new();
    for column in SealedColumn::ALL {
        let mut count = 0u64;
        for _pass in 0..10 {
            let mut after = String::new();
            let mut seen = 0usize;
            loop {
                let rows = store
                    .sealed_values(column, &after, i64::from(batch_size), Some(&primary))
                    .await?;
                let Some(last) = rows.last() else { break };
                after = last.id.clone();
                let mut changes = Vec::with_capacity(rows.len());
                for row in &rows {
                    let Some((context, sealed)) = sealed_of(column, row) else {
                        continue;
                    };
                    if sealed_key_id(&sealed) == Some(primary.as_str()) {
                        continue;
                    }
                    match ring.open(&context, &sealed) {
                        Ok(plain) => {
                            let new = ring.seal(&context, plain.expose_secret())?;
                            changes.push((row.clone(), with_sealed(column, new)?));
                        }
                        Err(_) => {
                            unreadable_ids.insert((column.as_str(), row.id.clone()));
                        }
                    }
                }
                seen += changes.len();
                count += store.reseal(column, &changes).await?;
            }
            if seen == 0 {
                break;
            }
        }
        resealed.insert(column.as_str().to_owned(), count);
    }
    for (column, id) in &unreadable_ids {
        tracing::error!(place = column, row = %id, "no key of the master key file opens this value; left as it is");
    }
    Ok((resealed, unreadable_ids.len() as u64))
}

/// One key's line of [`status`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyStatus {
    /// The key's id.
    pub key_id: String,
    /// Whether the key file holds it.
    pub in_file: bool,
    /// Whether it seals new values.
    pub primary: bool,
    /// Secrets it seals, per place.
    pub seals: BTreeMap<String, u64>,
    /// Their sum: 0 means the key can leave the file.
    pub total: u64,
}

/// What `master-keys status` shows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    /// The keys of the file (oldest first), then keys that seal values but are not in it.
    pub keys: Vec<KeyStatus>,
    /// Values no key of the file opens.
    pub unreadable: u64,
    /// The running APIs' reports.
    pub servers: Vec<ServerStatus>,
}

/// A running API, as [`Status`] shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServerStatus {
    /// Its id.
    pub server_id: String,
    /// Its host.
    pub host: String,
    /// The keys it holds.
    pub key_ids: Vec<String>,
    /// The key it seals with.
    pub primary_key_id: String,
}

/// Counts the secrets each key seals (every sealed value is looked at; a value from before
/// key rings is opened to learn its key).
pub async fn status(store: &Store, key_file: &Path, clock: &dyn Clock) -> Result<Status> {
    let (mut ring, _) = read_ring(key_file)?;
    let primary = store.master_key_primary().await?;
    if let Some(p) = &primary {
        ring.set_primary(p);
    }
    let mut keys: Vec<KeyStatus> = ring
        .ids()
        .iter()
        .map(|id| KeyStatus {
            key_id: (*id).to_owned(),
            in_file: true,
            primary: primary.as_deref() == Some(*id),
            seals: BTreeMap::new(),
            total: 0,
        })
        .collect();
    let mut unreadable = 0;
    for column in SealedColumn::ALL {
        let mut after = String::new();
        loop {
            let rows = store.sealed_values(column, &after, 1000, None).await?;
            let Some(last) = rows.last() else { break };
            after = last.id.clone();
            for row in &rows {
                let Some((context, sealed)) = sealed_of(column, row) else {
                    continue;
                };
                let id = match sealed_key_id(&sealed) {
                    Some(id) => Some(id.to_owned()),
                    None => ring
                        .open_with_id(&context, &sealed)
                        .ok()
                        .map(|(_, id)| id.to_owned()),
                };
                let Some(id) = id else {
                    unreadable += 1;
                    continue;
                };
                let at = match keys.iter().position(|k| k.key_id == id) {
                    Some(at) => at,
                    None => {
                        keys.push(KeyStatus {
                            key_id: id.clone(),
                            in_file: false,
                            primary: primary.as_deref() == Some(id.as_str()),
                            seals: BTreeMap::new(),
                            total: 0,
                        });
                        keys.len() - 1
                    }
                };
                if let Some(k) = keys.get_mut(at) {
                    *k.seals.entry(column.as_str().to_owned()).or_default() += 1;
                    k.total += 1;
                }
            }
        }
    }
    let servers = store
        .live_key_holders(clock.now_ms())
        .await?
        .into_iter()
        .map(|h| ServerStatus {
            server_id: h.server_id,
            host: h.host,
            key_ids: h.key_ids,
            primary_key_id: h.primary_key_id,
        })
        .collect();
    Ok(Status {
        keys,
        unreadable,
        servers,
    })
}
