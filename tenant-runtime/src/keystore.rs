//! The instance's data keys: one per execution period (a UTC day by default) and one for
//! credentials (with OAuth 2 grants' tokens and authorizations in progress), each wrapped
//! under the key-encryption key (KEK, the configured data key file) in `keys.db`, a SQLite
//! file of its own beside `runtime.db`.
//!
//! Why a file of its own: retention deletes a period's key once it has deleted the
//! period's last execution (crypto-shredding). A copy of `runtime.db` made earlier (a
//! backup, a disk image, a stray copy) then holds rows that nothing the instance still has
//! can decrypt. Backups copy `runtime.db` only, never this file (see `backup`).
//!
//! `keys.db` runs with `secure_delete` (a deleted or re-wrapped entry is overwritten in the
//! file) and `synchronous = FULL` (a key is on disk before any record sealed with it is
//! committed), and is checkpointed with `TRUNCATE` after every deletion or re-wrap, so the
//! WAL keeps no older copy either. What stays in blocks the file system has freed is at
//! most a wrapped key, useless without the KEK, on a volume that is itself encrypted.
//!
//! The unwrapped keys live in memory ([`Keyring`]), so replacing the KEK re-wraps every
//! entry at once ([`Keyring::rotate_kek`]); a KEK that only unwraps (the previous data key
//! file) lets a restart in the middle of a rotation finish it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use secrecy::zeroize::Zeroizing;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

use crate::config::RuntimeConfig;
use crate::crypto::{
    DataKey, KekId, KeyId, Purpose, RecordKey, SealedWith, Sealer, Table, sealed_with, unwrap_key,
    wrap_key,
};
use crate::error::{Error, Result};

/// The key store's file name inside the data directory.
pub const KEYS_FILE: &str = "keys.db";

const SCHEMA: [&str; 2] = [
    // `period_start`/`period_end`: the half-open range of age times (Unix microseconds)
    // whose executions the key seals; NULL for the credential key.
    "CREATE TABLE IF NOT EXISTS data_keys (
        id INTEGER PRIMARY KEY NOT NULL,
        purpose TEXT NOT NULL,
        period_start INTEGER,
        period_end INTEGER,
        kek_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created_at INTEGER NOT NULL
    )",
    // What was shredded, without key material: a restore tells expired rows from rows
    // whose key is missing, and a retired id is never given out again.
    "CREATE TABLE IF NOT EXISTS retired_keys (
        id INTEGER PRIMARY KEY NOT NULL,
        purpose TEXT NOT NULL,
        period_start INTEGER,
        period_end INTEGER,
        retired_at INTEGER NOT NULL
    )",
];

/// The half-open range of age times `[start, end)` (Unix microseconds) an execution key
/// covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    /// First age time covered.
    pub start: i64,
    /// First age time not covered.
    pub end: i64,
}

impl Period {
    /// The period of length `len_us` holding `at_us`.
    pub fn containing(at_us: i64, len_us: i64) -> Period {
        let len = len_us.max(1);
        let start = at_us.div_euclid(len).saturating_mul(len);
        Period {
            start,
            end: start.saturating_add(len),
        }
    }
}

/// One unwrapped data key.
struct Entry {
    purpose: Purpose,
    period: Option<Period>,
    key: DataKey,
    record: Arc<RecordKey>,
}

#[derive(Default)]
struct State {
    keys: HashMap<KeyId, Entry>,
    /// Which KEK wraps each entry in the file.
    wrapped_by: HashMap<KeyId, KekId>,
    /// The key new executions of a period (by its start) are sealed with.
    by_period: HashMap<i64, KeyId>,
    /// The key new credential records are sealed with.
    credential: Option<KeyId>,
    /// Ids shredded by retention.
    retired: HashSet<KeyId>,
}

/// What a KEK rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The KEK in use before.
    pub from: KekId,
    /// The KEK in use now.
    pub to: KekId,
    /// Entries re-wrapped.
    pub rewrapped: usize,
}

/// A data key held by the instance, as the shredding test inspects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its id.
    pub id: KeyId,
    /// What it seals.
    pub purpose: Purpose,
    /// For an execution key, its period.
    pub period: Option<Period>,
}

/// The instance's data keys, unwrapped, and the file that holds them wrapped.
pub struct Keyring {
    pool: SqlitePool,
    tenant_id: String,
    period_us: i64,
    kek: RwLock<Arc<DataKey>>,
    state: RwLock<State>,
    /// Serializes the writes to the file (new keys, retirements, re-wraps).
    writes: tokio::sync::Mutex<()>,
    /// Inserts hold it shared from choosing their key to their commit; retiring a key
    /// holds it exclusively, so no row is committed under a key just retired.
    shred: Arc<tokio::sync::RwLock<()>>,
    /// The KEKs version-1 records may be sealed with (the current, then the previous).
    v1: Vec<Sealer>,
    /// Entries the open re-wrapped from the previous KEK (a rotation it finished).
    rewrapped_at_open: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("tenant_id", &self.tenant_id)
            .field("kek_id", &self.kek_id())
            .finish_non_exhaustive()
    }
}

fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// A new random key id that is neither in use nor retired.
fn new_key_id(state: &State) -> Result<KeyId> {
    loop {
        let mut bytes = [0u8; 4];
        getrandom::fill(&mut bytes).map_err(|_| Error::Randomness)?;
        let id = KeyId::from_be_bytes(bytes);
        if id != 0 && !state.keys.contains_key(&id) && !state.retired.contains(&id) {
            return Ok(id);
        }
    }
}

/// Reads the optional previous KEK: `None` when not configured or the file is absent.
pub fn read_previous_kek(config: &RuntimeConfig) -> Result<Option<DataKey>> {
    match &config.previous_data_key_file {
        Some(path) if path.exists() => DataKey::from_file(path).map(Some),
        _ => Ok(None),
    }
}

impl Keyring {
    /// Opens the key store of `config`'s data directory with its data key file as the KEK
    /// and its previous data key file (when present) to unwrap what is not re-wrapped yet.
    pub async fn from_config(config: &RuntimeConfig) -> Result<Keyring> {
        let kek = DataKey::from_file(&config.data_key_file)?;
        let previous = read_previous_kek(config)?;
        let period = config.data_key_period().ok_or(Error::InvalidConfig(
            tenantry_proto::runtime_config::RuntimeConfigError::DataKeyPeriod,
        ))?;
        Keyring::open(&config.data_dir, &config.tenant_id, kek, previous, period).await
    }

    /// Opens (creating if needed) the key store in `data_dir`: unwraps every entry with
    /// `kek` or `previous` (failing, with the KEK ids, on an entry neither unwraps),
    /// re-wraps under `kek` whatever `previous` wrapped, and makes the credential key if
    /// there is none.
    pub async fn open(
        data_dir: &Path,
        tenant_id: &str,
        kek: DataKey,
        previous: Option<DataKey>,
        period: Duration,
    ) -> Result<Keyring> {
        // A key is durable before a record sealed with it can be committed.
        let pool =
            crate::store::open_private_sqlite(data_dir, KEYS_FILE, SqliteSynchronous::Full, 1)
                .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let kek_id = kek.kek_id();
        let previous_id = previous.as_ref().map(DataKey::kek_id);
        let mut state = State::default();
        let rows = sqlx::query(
            "SELECT id, purpose, period_start, period_end, kek_id, wrapped FROM data_keys
             ORDER BY created_at, id",
        )
        .fetch_all(&pool)
        .await?;
        for row in rows {
            let id = key_id_of(row.try_get::<i64, _>("id")?)?;
            let purpose: String = row.try_get("purpose")?;
            let purpose = Purpose::parse(&purpose).ok_or(Error::UnwrapKey { id })?;
            let wrapped_by = KekId(row.try_get("kek_id")?);
            let wrapped: Vec<u8> = row.try_get("wrapped")?;
            let unwrap_with = if wrapped_by == kek_id {
                &kek
            } else if let (Some(p), Some(pid)) = (&previous, &previous_id)
                && *pid == wrapped_by
            {
                p
            } else {
                return Err(Error::KekUnknown {
                    id,
                    kek_id: wrapped_by.0,
                    current: kek_id.0,
                    previous: previous_id.map_or_else(|| "none".to_owned(), |p| p.0),
                });
            };
            let key = unwrap_key(unwrap_with, tenant_id, id, purpose, &wrapped)?;
            let start: Option<i64> = row.try_get("period_start")?;
            let end: Option<i64> = row.try_get("period_end")?;
            let period = match (purpose, start, end) {
                (Purpose::Executions, Some(start), Some(end)) => Some(Period { start, end }),
                (Purpose::Executions, _, _) => return Err(Error::UnwrapKey { id }),
                (Purpose::Credentials, _, _) => None,
            };
            state.add(id, purpose, period, key, wrapped_by, tenant_id);
        }
        let retired = sqlx::query("SELECT id FROM retired_keys")
            .fetch_all(&pool)
            .await?;
        for row in retired {
            state.retired.insert(key_id_of(row.try_get::<i64, _>(0)?)?);
        }
        let mut v1 = vec![Sealer::new(&kek, tenant_id)];
        v1.extend(previous.as_ref().map(|p| Sealer::new(p, tenant_id)));
        let keyring = Keyring {
            pool,
            tenant_id: tenant_id.to_owned(),
            period_us: i64::try_from(period.as_micros()).unwrap_or(i64::MAX),
            kek: RwLock::new(Arc::new(kek)),
            state: RwLock::new(state),
            writes: tokio::sync::Mutex::new(()),
            shred: Arc::new(tokio::sync::RwLock::new(())),
            v1,
            rewrapped_at_open: 0,
        };
        // Finishes a rotation a restart interrupted (no-op when nothing is left).
        let mut keyring = keyring;
        keyring.rewrapped_at_open = keyring.rewrap_all(None).await?.rewrapped;
        keyring.credential_key().await?;
        Ok(keyring)
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn current_kek(&self) -> Arc<DataKey> {
        self.kek
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many entries opening re-wrapped from the previous KEK to the current one.
    pub fn rewrapped_at_open(&self) -> usize {
        self.rewrapped_at_open
    }

    /// The tenant the keys belong to.
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The id of the KEK new and re-wrapped entries are wrapped with.
    pub fn kek_id(&self) -> KekId {
        self.current_kek().kek_id()
    }

    /// Entries still wrapped by another KEK than the current one in the file (0 once a
    /// rotation is complete).
    pub fn wrapped_by_other_kek(&self) -> usize {
        let current = self.kek_id();
        self.state()
            .wrapped_by
            .values()
            .filter(|k| **k != current)
            .count()
    }

    /// How many data keys the instance holds.
    pub fn len(&self) -> usize {
        self.state().keys.len()
    }

    /// True when it holds none (never, once open: there is always a credential key).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every data key held (ids, purposes and periods; no key material).
    pub fn keys(&self) -> Vec<KeyInfo> {
        let mut keys: Vec<KeyInfo> = self
            .state()
            .keys
            .iter()
            .map(|(id, e)| KeyInfo {
                id: *id,
                purpose: e.purpose,
                period: e.period,
            })
            .collect();
        keys.sort_by_key(|k| (k.period.map(|p| p.start), k.id));
        keys
    }

    /// Whether `id` was shredded by retention.
    pub fn is_retired(&self, id: KeyId) -> bool {
        self.state().retired.contains(&id)
    }

    /// The raw bytes of every key the instance holds, the KEK(s) included: for tests that
    /// show a shredded record opens with none of them.
    #[doc(hidden)]
    pub fn every_key_for_tests(&self) -> Vec<DataKey> {
        let state = self.state();
        let mut keys: Vec<DataKey> = state
            .keys
            .values()
            .filter_map(|e| DataKey::from_bytes(e.key.expose_for_tests()))
            .collect();
        keys.extend(DataKey::from_bytes(self.current_kek().expose_for_tests()));
        keys
    }

    /// Key `id`'s raw bytes, for tests that look for them in files after shredding.
    #[doc(hidden)]
    pub fn key_bytes_for_tests(&self, id: KeyId) -> Option<Zeroizing<Vec<u8>>> {
        self.state()
            .keys
            .get(&id)
            .map(|e| Zeroizing::new(e.key.expose_for_tests().to_vec()))
    }

    /// Shared hold against retirement: taken by an insert from choosing its key until its
    /// row is committed.
    pub async fn lease(&self) -> OwnedRwLockReadGuard<()> {
        self.shred.clone().read_owned().await
    }

    /// Exclusive hold: no insert is between choosing its key and committing while held.
    pub async fn exclusive(&self) -> OwnedRwLockWriteGuard<()> {
        self.shred.clone().write_owned().await
    }

    /// The period of an execution aged from `aged_at_us`.
    pub fn period_of(&self, aged_at_us: i64) -> Period {
        Period::containing(aged_at_us, self.period_us)
    }

    /// The key that seals an execution aged from `aged_at_us` (its period's key, made on
    /// first use). Hold a [`Keyring::lease`] until the row is committed.
    pub async fn execution_key(&self, aged_at_us: i64) -> Result<Arc<RecordKey>> {
        let period = self.period_of(aged_at_us);
        if let Some(key) = self.find(|s| s.by_period.get(&period.start).copied()) {
            return Ok(key);
        }
        self.create(Purpose::Executions, Some(period)).await
    }

    /// The key that seals credentials, grants' tokens and authorization states.
    pub async fn credential_key(&self) -> Result<Arc<RecordKey>> {
        if let Some(key) = self.find(|s| s.credential) {
            return Ok(key);
        }
        self.create(Purpose::Credentials, None).await
    }

    fn find(&self, pick: impl Fn(&State) -> Option<KeyId>) -> Option<Arc<RecordKey>> {
        let state = self.state();
        let id = pick(&state)?;
        state.keys.get(&id).map(|e| e.record.clone())
    }

    /// Makes, stores and returns a new key (or the one another task made meanwhile).
    async fn create(&self, purpose: Purpose, period: Option<Period>) -> Result<Arc<RecordKey>> {
        let _writes = self.writes.lock().await;
        let pick = |s: &State| match period {
            Some(p) => s.by_period.get(&p.start).copied(),
            None => s.credential,
        };
        if let Some(key) = self.find(pick) {
            return Ok(key);
        }
        let id = new_key_id(&self.state())?;
        let key = DataKey::generate()?;
        let kek = self.current_kek();
        let wrapped = wrap_key(&kek, &self.tenant_id, id, purpose, &key)?;
        sqlx::query(
            "INSERT INTO data_keys (id, purpose, period_start, period_end, kek_id, wrapped, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i64::from(id))
        .bind(purpose.as_str())
        .bind(period.map(|p| p.start))
        .bind(period.map(|p| p.end))
        .bind(&kek.kek_id().0)
        .bind(wrapped)
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        let mut state = self.state_mut();
        state.add(id, purpose, period, key, kek.kek_id(), &self.tenant_id);
        tracing::info!(key_id = id, purpose = purpose.as_str(), period_start = ?period.map(|p| p.start), "data key created");
        state
            .keys
            .get(&id)
            .map(|e| e.record.clone())
            .ok_or(Error::WrapKey { id })
    }

    /// Opens a sealed record of `table`: version 2 with the key it names, version 1 with
    /// the KEK (current or previous).
    pub fn open_record(&self, table: Table, id: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        match sealed_with(sealed) {
            Some(SealedWith::Key(key_id)) => {
                let key = {
                    let state = self.state();
                    match state.keys.get(&key_id) {
                        Some(e) => e.record.clone(),
                        None if state.retired.contains(&key_id) => {
                            return Err(Error::KeyRetired {
                                table: table.as_str(),
                                id: id.to_owned(),
                            });
                        }
                        None => {
                            return Err(Error::Decrypt {
                                table: table.as_str(),
                                id: id.to_owned(),
                            });
                        }
                    }
                };
                key.open(table, id, sealed)
            }
            Some(SealedWith::Version1) => self.open_v1(table, id, sealed),
            None => Err(Error::Decrypt {
                table: table.as_str(),
                id: id.to_owned(),
            }),
        }
    }

    /// Opens a version-1 record with the current or the previous KEK.
    pub fn open_v1(&self, table: Table, id: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let mut last = None;
        for sealer in &self.v1 {
            match sealer.open(table, id, sealed) {
                Ok(plain) => return Ok(plain),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::Decrypt {
            table: table.as_str(),
            id: id.to_owned(),
        }))
    }

    /// Execution keys whose whole period is before `cutoff_us`: candidates for shredding.
    pub fn expired_keys(&self, cutoff_us: i64) -> Vec<(KeyId, Period)> {
        let mut expired: Vec<(KeyId, Period)> = self
            .state()
            .keys
            .iter()
            .filter_map(|(id, e)| e.period.map(|p| (*id, p)))
            .filter(|(_, p)| p.end <= cutoff_us)
            .collect();
        expired.sort_by_key(|(id, p)| (p.start, *id));
        expired
    }

    /// Deletes key `id` from the file (overwritten: `secure_delete`, then a `TRUNCATE`
    /// checkpoint) and from memory, and remembers the id as retired. Call while holding
    /// [`Keyring::exclusive`], after checking that no row uses it.
    pub async fn retire(&self, id: KeyId) -> Result<()> {
        let _writes = self.writes.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT OR IGNORE INTO retired_keys (id, purpose, period_start, period_end, retired_at)
             SELECT id, purpose, period_start, period_end, ? FROM data_keys WHERE id = ?",
        )
        .bind(now_us())
        .bind(i64::from(id))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM data_keys WHERE id = ?")
            .bind(i64::from(id))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.checkpoint().await?;
        let mut state = self.state_mut();
        if let Some(entry) = state.keys.remove(&id)
            && let Some(p) = entry.period
            && state.by_period.get(&p.start) == Some(&id)
        {
            state.by_period.remove(&p.start);
        }
        state.wrapped_by.remove(&id);
        state.retired.insert(id);
        Ok(())
    }

    /// Moves the WAL into the file and truncates it, so no older page stays in it.
    async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Makes `new` the KEK: every entry is re-wrapped under it in one transaction (a crash
    /// leaves them all under the old KEK, which the previous data key file then unwraps),
    /// the old wrappings overwritten. Idempotent: the same KEK again re-wraps only what
    /// another KEK still wraps.
    pub async fn rotate_kek(&self, new: DataKey) -> Result<Rotation> {
        self.rewrap_all(Some(new)).await
    }

    async fn rewrap_all(&self, new: Option<DataKey>) -> Result<Rotation> {
        let _writes = self.writes.lock().await;
        let from = self.kek_id();
        let kek = match new {
            Some(k) => Arc::new(k),
            None => self.current_kek(),
        };
        let to = kek.kek_id();
        let todo: Vec<(KeyId, Purpose, Vec<u8>)> = {
            let state = self.state();
            state
                .keys
                .iter()
                .filter(|(id, _)| state.wrapped_by.get(id) != Some(&to))
                .map(|(id, e)| {
                    Ok((
                        *id,
                        e.purpose,
                        wrap_key(&kek, &self.tenant_id, *id, e.purpose, &e.key)?,
                    ))
                })
                .collect::<Result<_>>()?
        };
        if !todo.is_empty() {
            let mut tx = self.pool.begin().await?;
            for (id, _, wrapped) in &todo {
                sqlx::query("UPDATE data_keys SET wrapped = ?, kek_id = ? WHERE id = ?")
                    .bind(wrapped)
                    .bind(&to.0)
                    .bind(i64::from(*id))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            self.checkpoint().await?;
        }
        *self.kek.write().unwrap_or_else(PoisonError::into_inner) = kek;
        let mut state = self.state_mut();
        for (id, _, _) in &todo {
            state.wrapped_by.insert(*id, to.clone());
        }
        Ok(Rotation {
            from,
            to,
            rewrapped: todo.len(),
        })
    }

    /// The credential keys as stored (wrapped; no unwrapping): what a backup carries so
    /// credentials survive the loss of this file.
    pub async fn wrapped_credential_keys(&self) -> Result<Vec<WrappedKey>> {
        wrapped_credential_keys(&self.pool).await
    }

    /// Adds a credential key from a backup unless the store holds it already (then it must
    /// be the same key); unwraps with the current or the previous KEK.
    pub async fn import_credential_key(
        &self,
        wrapped: &WrappedKey,
        previous: Option<&DataKey>,
    ) -> Result<bool> {
        let _writes = self.writes.lock().await;
        let kek = self.current_kek();
        let unwrap_with = if wrapped.kek_id == kek.kek_id().0 {
            kek.as_ref()
        } else if let Some(p) = previous.filter(|p| p.kek_id().0 == wrapped.kek_id) {
            p
        } else {
            return Err(Error::KekUnknown {
                id: wrapped.id,
                kek_id: wrapped.kek_id.clone(),
                current: kek.kek_id().0,
                previous: previous.map_or_else(|| "none".to_owned(), |p| p.kek_id().0),
            });
        };
        let key = unwrap_key(
            unwrap_with,
            &self.tenant_id,
            wrapped.id,
            Purpose::Credentials,
            &wrapped.wrapped,
        )?;
        if let Some(existing) = self.state().keys.get(&wrapped.id) {
            return if existing.key.same_as(&key) {
                Ok(false)
            } else {
                Err(Error::UnwrapKey { id: wrapped.id })
            };
        }
        let rewrapped = wrap_key(
            &kek,
            &self.tenant_id,
            wrapped.id,
            Purpose::Credentials,
            &key,
        )?;
        sqlx::query(
            "INSERT INTO data_keys (id, purpose, period_start, period_end, kek_id, wrapped, created_at)
             VALUES (?, 'credentials', NULL, NULL, ?, ?, ?)",
        )
        .bind(i64::from(wrapped.id))
        .bind(&kek.kek_id().0)
        .bind(rewrapped)
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        let mut state = self.state_mut();
        // The key in use stays the current credential key; this one only opens.
        let current = state.credential;
        state.add(
            wrapped.id,
            Purpose::Credentials,
            None,
            key,
            kek.kek_id(),
            &self.tenant_id,
        );
        if current.is_some() {
            state.credential = current;
        }
        Ok(true)
    }

    /// Closes the file.
    pub async fn close(&self) {
        let _ = self.checkpoint().await;
        self.pool.close().await;
    }
}

impl State {
    fn add(
        &mut self,
        id: KeyId,
        purpose: Purpose,
        period: Option<Period>,
        key: DataKey,
        wrapped_by: KekId,
        tenant_id: &str,
    ) {
        let record = Arc::new(RecordKey::new(id, &key, tenant_id));
        match period {
            Some(p) => {
                self.by_period.insert(p.start, id);
            }
            None => self.credential = Some(id),
        }
        self.wrapped_by.insert(id, wrapped_by);
        self.keys.insert(
            id,
            Entry {
                purpose,
                period,
                key,
                record,
            },
        );
    }
}

fn key_id_of(raw: i64) -> Result<KeyId> {
    KeyId::try_from(raw).map_err(|_| Error::UnwrapKey { id: 0 })
}

/// What `tenant-runtime rotate-data-key` did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OfflineRotation {
    /// The KEK every entry is wrapped by now.
    pub kek_id: String,
    /// Entries re-wrapped by this run (0 when a previous run finished already).
    pub rewrapped: usize,
    /// Data keys in the store.
    pub data_keys: usize,
    /// Version-1 records found and re-sealed under data keys on the way.
    pub records_migrated: u64,
}

/// Re-wraps the key store of `config`'s (stopped) instance from the KEK in `old` (default:
/// the config's previous data key file) to the one in `new` (default: its data key file),
/// migrating version-1 records on the way (they need the old KEK). Idempotent: entries
/// already under `new` are left alone, so a run after a crash finishes the job.
pub async fn rotate_offline(
    config: &RuntimeConfig,
    old: Option<&Path>,
    new: Option<&Path>,
) -> Result<OfflineRotation> {
    let new_key = DataKey::from_file(new.unwrap_or(&config.data_key_file))?;
    let old_key = match old {
        Some(path) => Some(DataKey::from_file(path)?),
        None => read_previous_kek(config)?,
    };
    let period = config.data_key_period().ok_or(Error::InvalidConfig(
        tenantry_proto::runtime_config::RuntimeConfigError::DataKeyPeriod,
    ))?;
    let keys = Keyring::open(
        &config.data_dir,
        &config.tenant_id,
        new_key,
        old_key,
        period,
    )
    .await?;
    let rewrapped = keys.rewrapped_at_open();
    let store = crate::store::Store::open(&config.data_dir, keys).await?;
    let report = OfflineRotation {
        kek_id: store.keys().kek_id().0,
        rewrapped,
        data_keys: store.keys().len(),
        records_migrated: store.migrated_at_open(),
    };
    store.close().await;
    store.keys().close().await;
    Ok(report)
}

/// A credential key as stored: wrapped, with the id of the KEK that wraps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    /// The key's id.
    pub id: KeyId,
    /// The KEK that wraps it.
    pub kek_id: String,
    /// The wrapped key (base64 in JSON).
    #[serde(with = "base64_bytes")]
    pub wrapped: Vec<u8>,
}

/// The credential keys in the key store at `pool`.
async fn wrapped_credential_keys(pool: &SqlitePool) -> Result<Vec<WrappedKey>> {
    let rows = sqlx::query(
        "SELECT id, kek_id, wrapped FROM data_keys WHERE purpose = 'credentials' ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WrappedKey {
                id: key_id_of(r.try_get::<i64, _>(0)?)?,
                kek_id: r.try_get(1)?,
                wrapped: r.try_get(2)?,
            })
        })
        .collect()
}

/// The credential keys of the key store in `data_dir`, read without the KEK (for
/// `tenant-runtime backup`, which holds no key); empty when there is no key store.
pub async fn read_wrapped_credential_keys(data_dir: &Path) -> Result<Vec<WrappedKey>> {
    let path = data_dir.join(KEYS_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let keys = wrapped_credential_keys(&pool).await;
    pool.close().await;
    keys
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const DAY_US: i64 = 86_400_000_000;

    fn kek(b: u8) -> DataKey {
        DataKey::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn periods_are_aligned_half_open_ranges() {
        assert_eq!(
            Period::containing(0, DAY_US),
            Period {
                start: 0,
                end: DAY_US
            }
        );
        assert_eq!(
            Period::containing(DAY_US - 1, DAY_US),
            Period {
                start: 0,
                end: DAY_US
            }
        );
        assert_eq!(Period::containing(DAY_US, DAY_US).start, DAY_US);
        assert_eq!(Period::containing(-1, DAY_US).start, -DAY_US);
    }

    #[tokio::test]
    async fn keys_survive_a_reopen_and_unwrap_only_with_the_kek() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), "acme", kek(1), None, DAY)
            .await
            .unwrap();
        let day0 = ring.execution_key(10).await.unwrap();
        assert_eq!(
            ring.execution_key(DAY_US - 1).await.unwrap().id(),
            day0.id()
        );
        let day1 = ring.execution_key(DAY_US).await.unwrap();
        assert_ne!(day0.id(), day1.id());
        let cred = ring.credential_key().await.unwrap();
        assert_eq!(ring.len(), 3);
        let sealed = day1.seal(Table::Executions, "e1", b"x").unwrap();
        ring.close().await;

        let err = Keyring::open(dir.path(), "acme", kek(2), None, DAY)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::KekUnknown { .. }), "{err}");
        assert!(err.to_string().contains(&kek(1).kek_id().0), "{err}");
        let ring = Keyring::open(dir.path(), "acme", kek(1), None, DAY)
            .await
            .unwrap();
        assert_eq!(ring.credential_key().await.unwrap().id(), cred.id());
        assert_eq!(
            &*ring.open_record(Table::Executions, "e1", &sealed).unwrap(),
            b"x"
        );
    }

    #[tokio::test]
    async fn rotation_rewraps_everything_and_a_restart_midway_uses_the_previous_kek() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), "acme", kek(1), None, DAY)
            .await
            .unwrap();
        let sealed = ring
            .execution_key(5)
            .await
            .unwrap()
            .seal(Table::Executions, "e", b"x")
            .unwrap();
        ring.close().await;
        // A restart with the new key and the old one as previous finishes the rotation.
        let ring = Keyring::open(dir.path(), "acme", kek(2), Some(kek(1)), DAY)
            .await
            .unwrap();
        assert_eq!(ring.wrapped_by_other_kek(), 0);
        assert_eq!(ring.kek_id(), kek(2).kek_id());
        ring.close().await;
        // ... after which the old key is not needed.
        let ring = Keyring::open(dir.path(), "acme", kek(2), None, DAY)
            .await
            .unwrap();
        assert_eq!(
            &*ring.open_record(Table::Executions, "e", &sealed).unwrap(),
            b"x"
        );
        // Live rotation; the same KEK again is a no-op.
        let r = ring.rotate_kek(kek(3)).await.unwrap();
        assert_eq!(
            (r.from, r.to.clone(), r.rewrapped),
            (kek(2).kek_id(), kek(3).kek_id(), 2)
        );
        assert_eq!(ring.rotate_kek(kek(3)).await.unwrap().rewrapped, 0);
        ring.close().await;
        assert!(
            Keyring::open(dir.path(), "acme", kek(2), None, DAY)
                .await
                .is_err()
        );
        let ring = Keyring::open(dir.path(), "acme", kek(3), None, DAY)
            .await
            .unwrap();
        assert_eq!(
            &*ring.open_record(Table::Executions, "e", &sealed).unwrap(),
            b"x"
        );
        // Another tenant's name does not unwrap the same file.
        ring.close().await;
        assert!(
            Keyring::open(dir.path(), "globex", kek(3), None, DAY)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_retired_key_is_gone_from_the_file_and_its_id_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open(dir.path(), "acme", kek(1), None, DAY)
            .await
            .unwrap();
        let old = ring.execution_key(5).await.unwrap();
        let sealed = old.seal(Table::Executions, "e", b"x").unwrap();
        let wrapped: Vec<u8> = sqlx::query_scalar("SELECT wrapped FROM data_keys WHERE id = ?")
            .bind(i64::from(old.id()))
            .fetch_one(&ring.pool)
            .await
            .unwrap();
        assert_eq!(ring.expired_keys(DAY_US - 1), vec![]);
        assert_eq!(ring.expired_keys(DAY_US).len(), 1);
        let _hold = ring.exclusive().await;
        ring.retire(old.id()).await.unwrap();
        assert!(matches!(
            ring.open_record(Table::Executions, "e", &sealed),
            Err(Error::KeyRetired { .. })
        ));
        let again = ring.execution_key(5).await.unwrap();
        assert_ne!(again.id(), old.id());
        ring.close().await;
        let mut raw = Vec::new();
        for f in ["keys.db", "keys.db-wal"] {
            raw.extend(std::fs::read(dir.path().join(f)).unwrap_or_default());
        }
        assert!(!raw.windows(wrapped.len()).any(|w| w == wrapped));
        let ring = Keyring::open(dir.path(), "acme", kek(1), None, DAY)
            .await
            .unwrap();
        assert!(ring.is_retired(old.id()));
    }
}
