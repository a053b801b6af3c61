//! The per-replica session cache: authenticated calls find their session here instead of
//! asking the database, and every change that could revoke or alter a session reaches every
//! replica's cache within a second.
//!
//! Where changes come from: database triggers (migration 5) fire on every change to a
//! session (other than `last_seen_ms`), a user's email, password, TOTP secret or status, a
//! membership and a role grant, whoever makes it.
//!
//! * PostgreSQL: the trigger sends `u:<user id>` on the `tenantry_auth` channel; each
//!   replica's listener (one `LISTEN` connection) forgets that user's sessions. The listener
//!   is trusted only while it echoes this replica's own heartbeat: a heartbeat sent at `S`
//!   and echoed proves every change committed before `S` has been handled (PostgreSQL
//!   delivers notifications in commit order), and the cache serves nothing once the last
//!   echoed heartbeat is [`TRUST_WINDOW`] old. A lost or silent listener thus stops the
//!   cache within [`TRUST_WINDOW`] (calls then go to the database), and a reconnected one
//!   empties it (the full resync) before it is trusted again.
//! * SQLite: the trigger appends to `auth_changes`; this replica reads it right after each of
//!   its own writes (in-process, so its own revocations apply before the call that made
//!   them answers) and every [`SQLITE_POLL`] for writes by other processes.
//!
//! A lookup that misses remembers the cache's generation before it reads the database and
//! keeps the row only if no change arrived in between, so a row read just before a
//! revocation never outlives it. `last_seen_ms` is kept here and written in batches
//! ([`FLUSH_INTERVAL`]), each session at most once per touch granularity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::SessionRow;

/// How long after its last echoed heartbeat was sent the PostgreSQL listener is trusted.
/// Below the one-second revocation promise, with room for the heartbeat's round trip.
pub const TRUST_WINDOW: Duration = Duration::from_millis(750);
/// How often a replica sends itself a heartbeat through PostgreSQL.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// A listener that has echoed nothing for this long is dropped and reconnected.
pub const LISTENER_STALE: Duration = Duration::from_secs(2);
/// How often SQLite's `auth_changes` is read for other processes' writes.
pub const SQLITE_POLL: Duration = Duration::from_millis(250);
/// How often pending `last_seen_ms` values are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Sessions held at most; past it, lookups still work and are simply not kept.
pub const CAPACITY: usize = 200_000;

/// One cached session.
#[derive(Debug)]
pub struct CachedSession {
    /// The session and its user, as read from the database.
    pub row: SessionRow,
    /// Last use seen by this replica.
    last_used_ms: AtomicI64,
    /// `last_seen_ms` as the database has it (as far as this replica knows).
    persisted_ms: AtomicI64,
}

impl CachedSession {
    /// The latest use this replica knows of.
    pub fn last_used_ms(&self) -> i64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// Records a use at `now_ms` (written later, in a batch).
    pub fn touch(&self, now_ms: i64) {
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
    }
}

/// The cache shared by a [`super::Store`]'s clones. Off (every lookup goes to the
/// database) until `serve` starts its watcher, so the CLI's short-lived stores never use it.
#[derive(Debug)]
pub struct SessionCache {
    entries: RwLock<HashMap<String, Arc<CachedSession>>>,
    /// Bumped by every change; a fill only lands if it has not moved since the read.
    generation: AtomicU64,
    /// The watcher runs (SQLite: then always trusted).
    enabled: AtomicBool,
    /// PostgreSQL only: trusted while [`Self::clock`] is below this (nanoseconds since
    /// `base`); 0 when the listener is down.
    trusted_until_ns: AtomicU64,
    needs_heartbeat: AtomicBool,
    base: Instant,
    /// Last uses of sessions dropped from the cache before they were written; kept until
    /// written, so that a session read again meanwhile is not taken for idle.
    orphans: Mutex<HashMap<String, i64>>,
}

impl SessionCache {
    /// An empty, disabled cache; `heartbeat` when trust depends on a listener's heartbeat.
    pub fn new(heartbeat: bool) -> Self {
        SessionCache {
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            trusted_until_ns: AtomicU64::new(0),
            needs_heartbeat: AtomicBool::new(heartbeat),
            base: Instant::now(),
            orphans: Mutex::new(HashMap::new()),
        }
    }

    /// Nanoseconds since this cache was made (monotonic, independent of the API's clock).
    pub fn clock_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Turns the cache on (the watcher has started).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Whether a cached session may be used now.
    pub fn trusted(&self) -> bool {
        self.trusted_at(self.clock_ns())
    }

    /// Whether a cached session may be used at `now_ns` (on [`Self::clock_ns`]).
    fn trusted_at(&self, now_ns: u64) -> bool {
        if !self.enabled.load(Ordering::SeqCst) {
            return false;
        }
        !self.needs_heartbeat.load(Ordering::Relaxed)
            || now_ns < self.trusted_until_ns.load(Ordering::SeqCst)
    }

    /// Whether the watcher runs (changes must then be forgotten as they are made).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// A heartbeat sent at `sent_ns` came back: trust the cache until `TRUST_WINDOW` later.
    pub fn heartbeat_echoed(&self, sent_ns: u64) {
        let until = sent_ns.saturating_add(u64::try_from(TRUST_WINDOW.as_nanos()).unwrap_or(0));
        self.trusted_until_ns.fetch_max(until, Ordering::SeqCst);
    }

    /// The listener is gone: serve nothing from the cache until it is back.
    pub fn distrust(&self) {
        self.trusted_until_ns.store(0, Ordering::SeqCst);
        self.forget_all();
    }

    /// The session with this token hash, when the cache may be used and holds it.
    pub fn get(&self, token_hash: &str) -> Option<Arc<CachedSession>> {
        if !self.trusted() {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(token_hash).cloned()
    }

    /// The generation to pass to [`Self::insert`]; read it before the database.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Keeps `row` (read from the database after [`Self::generation`] answered
    /// `generation`), used at `now_ms`, unless a change arrived since or the cache may not
    /// be used. Returns whether it was kept.
    pub fn insert(&self, generation: u64, row: SessionRow, now_ms: i64) -> bool {
        if !self.trusted() {
            return false;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock that every forget takes too.
        if self.generation.load(Ordering::SeqCst) != generation || entries.len() >= CAPACITY {
            return false;
        }
        let entry = CachedSession {
            last_used_ms: AtomicI64::new(now_ms.max(row.last_seen_ms)),
            persisted_ms: AtomicI64::new(row.last_seen_ms),
            row,
        };
        entries.insert(entry.row.token_hash.clone(), Arc::new(entry));
        true
    }

    /// Drops one session (found expired).
    pub fn remove(&self, token_hash: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(entry) = entries.remove(token_hash) {
            self.orphan(&entry);
        }
    }

    /// Drops every session of these users.
    pub fn forget_users<'a>(&self, users: impl IntoIterator<Item = &'a str>) {
        let users: Vec<&str> = users.into_iter().filter(|u| !u.is_empty()).collect();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        if users.is_empty() {
            return;
        }
        let mut dropped = Vec::new();
        entries.retain(|_, entry| {
            let keep = !users.contains(&entry.row.user_id.as_str());
            if !keep {
                dropped.push(Arc::clone(entry));
            }
            keep
        });
        drop(entries);
        for entry in &dropped {
            self.orphan(entry);
        }
    }

    /// Drops everything (a resync: the next call of each session reads the database).
    pub fn forget_all(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        let dropped: Vec<Arc<CachedSession>> = entries.drain().map(|(_, e)| e).collect();
        drop(entries);
        for entry in &dropped {
            self.orphan(entry);
        }
    }

    /// Applies a change list as the PostgreSQL trigger collects it (`id,id,…` or `*`).
    pub fn forget_listed(&self, list: &str) {
        if list.trim() == "*" {
            self.forget_all();
        } else {
            self.forget_users(list.split(',').map(str::trim));
        }
    }

    /// Keeps a dropped session's unwritten use so the next flush still writes it.
    fn orphan(&self, entry: &CachedSession) {
        let used = entry.last_used_ms();
        if used > entry.persisted_ms.load(Ordering::Relaxed) {
            self.keep_unwritten(&entry.row.token_hash, used);
        }
    }

    /// Remembers a use that is not in the database yet.
    pub fn keep_unwritten(&self, token_hash: &str, used_ms: i64) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        let slot = orphans.entry(token_hash.to_owned()).or_insert(used_ms);
        *slot = (*slot).max(used_ms);
    }

    /// The latest use of a session dropped from the cache that is not written yet.
    pub fn unwritten_use(&self, token_hash: &str) -> Option<i64> {
        let orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        orphans.get(token_hash).copied()
    }

    /// These uses are in the database now.
    pub fn written(&self, uses: &[(String, i64)]) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        for (hash, used) in uses {
            if orphans.get(hash).is_some_and(|o| o <= used) {
                orphans.remove(hash);
            }
        }
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Uses to write: sessions used at least `granularity_ms` after the database's
    /// `last_seen_ms` (every unwritten use with 0), and every orphan (kept until
    /// [`Self::written`]). Cached ones are marked written here; the write only ever moves
    /// `last_seen_ms` forward.
    pub fn take_pending(&self, granularity_ms: i64) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = {
            let orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            orphans.iter().map(|(h, u)| (h.clone(), *u)).collect()
        };
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        for entry in entries.values() {
            let used = entry.last_used_ms();
            let persisted = entry.persisted_ms.load(Ordering::Relaxed);
            if used > persisted && used - persisted >= granularity_ms {
                entry.persisted_ms.fetch_max(used, Ordering::Relaxed);
                out.push((entry.row.token_hash.clone(), used));
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(hash: &str, user: &str, last_seen_ms: i64) -> SessionRow {
        SessionRow {
            token_hash: hash.into(),
            user_id: user.into(),
            email: format!("{user}@example.com"),
            roles: Vec::new(),
            mfa_enrolled: false,
            email_verified: false,
            last_seen_ms,
            expires_at_ms: i64::MAX,
            mfa_verified_at_ms: None,
            tenant_ids: Vec::new(),
        }
    }

    #[test]
    fn disabled_cache_keeps_nothing() {
        let cache = SessionCache::new(false);
        assert!(!cache.insert(cache.generation(), row("h", "u", 0), 1));
        assert!(cache.get("h").is_none());
    }

    #[test]
    fn a_change_during_the_read_keeps_the_row_out() {
        let cache = SessionCache::new(false);
        cache.enable();
        let generation = cache.generation();
        // A revocation of someone else arrives between the read and the insert.
        cache.forget_users(["other"]);
        assert!(!cache.insert(generation, row("h", "u", 0), 1));
        assert!(cache.insert(cache.generation(), row("h", "u", 0), 1));
        assert!(cache.get("h").is_some());
        cache.forget_listed("x,u,");
        assert!(cache.get("h").is_none());
    }

    #[test]
    fn heartbeat_bounds_trust() {
        let cache = SessionCache::new(true);
        cache.enable();
        assert!(!cache.trusted(), "no heartbeat echoed yet");
        cache.heartbeat_echoed(cache.clock_ns());
        assert!(cache.trusted());
        assert!(cache.insert(cache.generation(), row("h", "u", 0), 1));
        cache.distrust();
        assert!(!cache.trusted());
        assert!(cache.is_empty(), "a lost listener empties the cache");
        // A heartbeat sent at S trusts the cache until S + TRUST_WINDOW, no longer.
        let window = u64::try_from(TRUST_WINDOW.as_nanos()).unwrap();
        let sent = 5_000_000_000;
        cache.heartbeat_echoed(sent);
        assert!(cache.trusted_at(sent + window - 1));
        assert!(!cache.trusted_at(sent + window));
    }

    #[test]
    fn uses_are_written_once_per_granularity_and_survive_eviction() {
        let cache = SessionCache::new(false);
        cache.enable();
        assert!(cache.insert(cache.generation(), row("h", "u", 1_000), 1_000));
        let entry = cache.get("h").unwrap();
        entry.touch(1_500);
        assert!(
            cache.take_pending(1_000).is_empty(),
            "within the granularity"
        );
        entry.touch(2_000);
        assert_eq!(cache.take_pending(1_000), vec![("h".to_owned(), 2_000)]);
        assert!(cache.take_pending(1_000).is_empty(), "written already");
        entry.touch(2_100);
        cache.forget_all();
        assert_eq!(cache.unwritten_use("h"), Some(2_100), "kept for a re-read");
        let pending = cache.take_pending(1_000);
        assert_eq!(pending, vec![("h".to_owned(), 2_100)]);
        cache.written(&pending);
        assert_eq!(cache.unwritten_use("h"), None);
    }
}
