//! Instance-token signing keys: a ring of Ed25519 keys in the database, rotated without
//! refusing a single token.
//!
//! A rotation (`tenantry-api rotate-token-key`) adds a key that signs only from
//! `now + overlap`. Until then every runtime is handed the new public key next to the old
//! one (the published set is every key not retired). From `signs_from` the API signs with
//! the new key; the keys it supersedes retire at `signs_from + overlap`, when the last
//! token they signed has expired (the overlap is at least a token's longest life plus the
//! verifiers' clock skew), and then leave the published set and lose their private half.
//!
//! Several API replicas share the ring through the database: each reloads it every
//! [`REFRESH_INTERVAL`] and picks the signing key by the time of each token, so all switch
//! at `signs_from` (a replica learns of the new key long before it signs: the overlap is
//! many refresh intervals).
//!
//! The rules are pure functions of the rows and the time ([`key_state`],
//! [`signing_key`], [`published_keys`], [`check_overlap`]); [`TokenKeyRing`] caches the
//! opened keys, [`rotate`] and [`import_key_file`] change the ring.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tenantry_proto::token::{CLOCK_SKEW_SECS, MAX_TTL_SECS, TokenSigner, TokenVerifier};

use crate::clock::{Clock, duration_ms};
use crate::config::{DatabaseArgs, RotateTokenKeyArgs};
use crate::crypto::Seal;
use crate::error::{Error, Result};
use crate::store::{AddedKey, AuditRecord, Store, TokenKeyRow};

/// How long a new key waits before it signs, and an old one stays published after it
/// stopped signing (`--token-key-overlap`), unless told otherwise.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(20 * 60);
/// How often each API process reloads the ring, retires due keys and republishes the set.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Audit actions.
pub mod actions {
    /// The key file's key became the ring's first key.
    pub const IMPORT: &str = "token_key.import";
    /// A new key was added (`rotate-token-key`).
    pub const ROTATE: &str = "token_key.rotate";
    /// A superseded key left the published set and its private half was deleted.
    pub const RETIRE: &str = "token_key.retire";
}

/// The shortest overlap a rotation accepts: the longest a token lives
/// ([`MAX_TTL_SECS`]) plus the clock skew verifiers allow ([`CLOCK_SKEW_SECS`]). Shorter,
/// and a token signed just before the switch could outlive its key.
pub fn min_overlap() -> Duration {
    Duration::from_secs(u64::try_from(MAX_TTL_SECS + CLOCK_SKEW_SECS).unwrap_or(960))
}

/// The master key context the private half of `kid` is sealed under.
pub fn seal_context(kid: &str) -> String {
    format!("token-key:{kid}")
}

/// Where a key is in its life at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Published, signs from `signs_from` on.
    Pending,
    /// Published; the key the API signs with now.
    Signing,
    /// Published, superseded: verifies the tokens it signed until it retires.
    Verifying,
    /// Neither published nor able to sign; its private half is (or is about to be) gone.
    Retired,
}

impl KeyState {
    /// The word `tenantry-api token-keys` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Signing => "signing",
            KeyState::Verifying => "verifying",
            KeyState::Retired => "retired",
        }
    }
}

/// Whether `key` is retired at `now_ms`: its retirement time has come, or its private half
/// is gone.
fn is_retired(key: &TokenKeyRow, now_ms: i64) -> bool {
    key.private_sealed.is_none() || key.retires_at_ms.is_some_and(|t| t <= now_ms)
}

/// The key the API signs with at `now_ms`: of the keys not retired, the newest whose
/// `signs_from` has come (ties: the one added last). `None` only for an empty ring or
/// one whose every key is still pending.
pub fn signing_key(keys: &[TokenKeyRow], now_ms: i64) -> Option<&TokenKeyRow> {
    keys.iter()
        .filter(|k| !is_retired(k, now_ms) && k.signs_from_ms <= now_ms)
        .max_by_key(|k| (k.signs_from_ms, k.created_at_ms))
}

/// `key`'s state at `now_ms`, among `keys`.
pub fn key_state(keys: &[TokenKeyRow], key: &TokenKeyRow, now_ms: i64) -> KeyState {
    if is_retired(key, now_ms) {
        KeyState::Retired
    } else if key.signs_from_ms > now_ms {
        KeyState::Pending
    } else if signing_key(keys, now_ms).is_some_and(|s| s.kid == key.kid) {
        KeyState::Signing
    } else {
        KeyState::Verifying
    }
}

/// The keys runtimes must accept at `now_ms`: every key not retired, pending ones
/// included (published before they sign), oldest first.
pub fn published_keys(keys: &[TokenKeyRow], now_ms: i64) -> Vec<&TokenKeyRow> {
    let mut published: Vec<&TokenKeyRow> = keys.iter().filter(|k| !is_retired(k, now_ms)).collect();
    published.sort_by_key(|k| (k.signs_from_ms, k.created_at_ms));
    published
}

/// The published set as PEM (what runtimes read): one `PUBLIC KEY` block per key, each
/// checked to parse.
pub fn published_pem(keys: &[TokenKeyRow], now_ms: i64) -> Result<String> {
    let text: String = published_keys(keys, now_ms)
        .iter()
        .map(|k| k.public_pem.as_str())
        .collect();
    let set = TokenVerifier::from_public_key_pem(&text).map_err(Error::Token)?;
    Ok(set.to_public_key_pem())
}

/// Keys whose retirement time has come and whose private half is still stored.
pub fn due_for_retirement(keys: &[TokenKeyRow], now_ms: i64) -> Vec<&TokenKeyRow> {
    keys.iter()
        .filter(|k| k.private_sealed.is_some() && k.retires_at_ms.is_some_and(|t| t <= now_ms))
        .collect()
}

/// Refuses an overlap shorter than `minimum` (normally [`min_overlap`]).
pub fn check_overlap(overlap: Duration, minimum: Duration) -> Result<()> {
    if overlap < minimum {
        return Err(Error::TokenKeys(format!(
            "--token-key-overlap {} is too short: it must be at least {} (the longest a token lives, {} s, plus the clock skew verifiers allow, {} s), or a token signed just before the switch would outlive its key",
            humantime::format_duration(overlap),
            humantime::format_duration(minimum),
            MAX_TTL_SECS,
            CLOCK_SKEW_SECS
        )));
    }
    Ok(())
}

/// Opens the private half of `key` and checks it is the key the row says.
fn open_signer(master_key: &dyn Seal, key: &TokenKeyRow) -> Result<Option<TokenSigner>> {
    let Some(sealed) = &key.private_sealed else {
        return Ok(None);
    };
    let opened = master_key.open(&seal_context(&key.kid), sealed)?;
    let pem = std::str::from_utf8(opened.expose_secret())
        .map_err(|_| Error::TokenKeys(format!("the private half of key {} is not PEM", key.kid)))?;
    let signer =
        TokenSigner::from_pkcs8_pem(&SecretString::from(pem.to_owned())).map_err(Error::Token)?;
    if signer.kid() != key.kid || signer.public_key_pem() != key.public_pem {
        return Err(Error::TokenKeys(format!(
            "the private half of key {} does not match its public half",
            key.kid
        )));
    }
    Ok(Some(signer))
}

/// A row for a new key.
fn new_row(
    master_key: &dyn Seal,
    signer: &TokenSigner,
    now_ms: i64,
    signs_from_ms: i64,
) -> Result<TokenKeyRow> {
    let private = signer.to_pkcs8_pem();
    Ok(TokenKeyRow {
        kid: signer.kid().to_owned(),
        public_pem: signer.public_key_pem(),
        private_sealed: Some(master_key.seal(
            &seal_context(signer.kid()),
            private.expose_secret().as_bytes(),
        )?),
        created_at_ms: now_ms,
        signs_from_ms,
        retires_at_ms: None,
    })
}

/// The ring as one API process last read it, with the private halves it may sign with
/// opened.
struct Loaded {
    keys: Vec<TokenKeyRow>,
    signers: Vec<(String, Arc<TokenSigner>)>,
}

/// The signing keys of this process: read from the database at start and every
/// [`REFRESH_INTERVAL`] ([`TokenKeyRing::refresh`]).
pub struct TokenKeyRing {
    loaded: RwLock<Arc<Loaded>>,
    /// The public set last handed to the provisioner, so an unchanged set is not
    /// republished every pass.
    last_published: Mutex<Option<String>>,
}

impl std::fmt::Debug for TokenKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeyRing").finish_non_exhaustive()
    }
}

impl TokenKeyRing {
    /// Reads the ring (retiring the keys that are due first); refuses an empty ring or
    /// one whose keys cannot be opened.
    pub async fn load(store: &Store, master_key: &dyn Seal, now_ms: i64) -> Result<Self> {
        let loaded = read(store, master_key, now_ms, "server").await?;
        Ok(TokenKeyRing {
            loaded: RwLock::new(Arc::new(loaded)),
            last_published: Mutex::new(None),
        })
    }

    /// Rereads the ring; on failure the keys read before stay in use.
    pub async fn refresh(&self, store: &Store, master_key: &dyn Seal, now_ms: i64) -> Result<()> {
        let loaded = read(store, master_key, now_ms, "server").await?;
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The key to sign a token issued at `now_ms` with ([`signing_key`]).
    pub fn signer(&self, now_ms: i64) -> Result<Arc<TokenSigner>> {
        let loaded = self.current();
        let key = signing_key(&loaded.keys, now_ms)
            .ok_or_else(|| Error::TokenKeys("no key of the ring signs yet".into()))?;
        loaded
            .signers
            .iter()
            .find(|(kid, _)| *kid == key.kid)
            .map(|(_, signer)| Arc::clone(signer))
            .ok_or_else(|| Error::TokenKeys(format!("key {} cannot sign", key.kid)))
    }

    /// The public key set runtimes must hold at `now_ms` ([`published_pem`]).
    pub fn public_set(&self, now_ms: i64) -> Result<String> {
        published_pem(&self.current().keys, now_ms)
    }

    /// The keys as last read.
    pub fn keys(&self) -> Vec<TokenKeyRow> {
        self.current().keys.clone()
    }

    /// The kids of the public set at `now_ms`.
    pub fn public_kids(&self, now_ms: i64) -> Vec<String> {
        published_keys(&self.current().keys, now_ms)
            .iter()
            .map(|k| k.kid.clone())
            .collect()
    }

    /// Whether `pem` differs from the set last published.
    pub fn needs_publishing(&self, pem: &str) -> bool {
        self.last_published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            != Some(pem)
    }

    /// Records `pem` as published.
    pub fn published(&self, pem: String) {
        *self
            .last_published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(pem);
    }
}

/// Retires the keys that are due (each audited as [`actions::RETIRE`], by whichever
/// process gets there first), then reads the ring and opens every key that may still
/// sign.
async fn read(store: &Store, master_key: &dyn Seal, now_ms: i64, source: &str) -> Result<Loaded> {
    retire_due(store, now_ms, source).await?;
    let keys = store.token_keys().await?;
    if keys.is_empty() {
        return Err(Error::TokenKeys(
            "the token key ring is empty (the API imports its first key at start)".into(),
        ));
    }
    let mut signers = Vec::new();
    for key in keys.iter().filter(|k| !is_retired(k, now_ms)) {
        // One key that cannot be opened (another master key, a damaged row) must not stop
        // the API: its tokens cannot be issued (an internal error, logged here) while
        // everything else works.
        match open_signer(master_key, key) {
            Ok(Some(signer)) => signers.push((key.kid.clone(), Arc::new(signer))),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(kid = %key.kid, error = %e, "cannot open an instance-token signing key (is this the master key that sealed it?)");
            }
        }
    }
    Ok(Loaded { keys, signers })
}

/// Deletes the private halves of the keys due for retirement; returns their kids.
pub async fn retire_due(store: &Store, now_ms: i64, source: &str) -> Result<Vec<String>> {
    let keys = store.token_keys().await?;
    let mut retired = Vec::new();
    for key in due_for_retirement(&keys, now_ms) {
        let audit = AuditRecord {
            action: actions::RETIRE,
            actor_user_id: String::new(),
            target: key.kid.clone(),
            success: true,
            source: source.to_owned(),
            detail_json: crate::service::detail(&[(
                "retires_at_ms",
                key.retires_at_ms.unwrap_or_default().into(),
            )]),
        };
        if store.retire_token_key(&key.kid, &audit, now_ms).await? {
            tracing::info!(kid = %key.kid, "retired an instance-token key: no longer published, private half deleted");
            retired.push(key.kid.clone());
        }
    }
    Ok(retired)
}

/// Makes `signer` (the key file's key) the ring's first key when the ring is empty,
/// signing at once; audited as [`actions::IMPORT`]. A ring that has keys is left alone,
/// and a key file whose key is not in it is reported (the ring signs, not the file).
pub async fn import_key_file(
    store: &Store,
    master_key: &dyn Seal,
    signer: &TokenSigner,
    now_ms: i64,
) -> Result<()> {
    let keys = store.token_keys().await?;
    if !keys.is_empty() {
        if !keys.iter().any(|k| k.kid == signer.kid()) {
            tracing::warn!(
                kid = %signer.kid(),
                "the token signing key file holds a key that is not in the database's key ring; it is not used (rotate with `tenantry-api rotate-token-key`)"
            );
        }
        return Ok(());
    }
    let row = new_row(master_key, signer, now_ms, now_ms)?;
    let audit = AuditRecord {
        action: actions::IMPORT,
        actor_user_id: String::new(),
        target: row.kid.clone(),
        success: true,
        source: "server".into(),
        detail_json: crate::service::detail(&[]),
    };
    if store.import_first_token_key(&row, &audit, now_ms).await? {
        tracing::info!(kid = %row.kid, "imported the token signing key file as the first key of the ring");
    }
    Ok(())
}

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rotation {
    /// The new key.
    pub kid: String,
    /// When it starts signing (Unix ms).
    pub signs_from_ms: i64,
    /// The keys it supersedes.
    pub superseded: Vec<String>,
    /// When they retire (Unix ms).
    pub retires_at_ms: i64,
}

/// `rotate-token-key`: adds a new key that signs from `now + overlap`; the keys it
/// supersedes retire `overlap` after that. Refuses an overlap below `minimum` and a
/// rotation while the previous one's key does not sign yet. Audited as
/// [`actions::ROTATE`].
pub async fn rotate(
    store: &Store,
    master_key: &dyn Seal,
    overlap: Duration,
    minimum: Duration,
    now_ms: i64,
) -> Result<Rotation> {
    check_overlap(overlap, minimum)?;
    if store.token_keys().await?.is_empty() {
        return Err(Error::TokenKeys(
            "the key ring is empty: start the API once first (it imports --token-signing-key-file)"
                .into(),
        ));
    }
    let overlap_ms = duration_ms(overlap);
    let signs_from_ms = now_ms.saturating_add(overlap_ms);
    let retires_at_ms = signs_from_ms.saturating_add(overlap_ms);
    let signer = TokenSigner::generate().map_err(Error::Token)?;
    let row = new_row(master_key, &signer, now_ms, signs_from_ms)?;
    let audit = AuditRecord {
        action: actions::ROTATE,
        actor_user_id: String::new(),
        target: row.kid.clone(),
        success: true,
        source: "cli".into(),
        detail_json: crate::service::detail(&[
            ("signs_from_ms", signs_from_ms.into()),
            ("superseded_retire_at_ms", retires_at_ms.into()),
            ("overlap_secs", overlap.as_secs().into()),
        ]),
    };
    match store
        .add_token_key(&row, retires_at_ms, &audit, now_ms)
        .await?
    {
        AddedKey::Added { superseding } => Ok(Rotation {
            kid: row.kid,
            signs_from_ms,
            superseded: superseding,
            retires_at_ms,
        }),
        AddedKey::Pending { kid, signs_from_ms } => Err(Error::TokenKeys(format!(
            "key {kid} from the previous rotation does not sign until {}; rotate again after that",
            jiff::Timestamp::from_millisecond(signs_from_ms)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| signs_from_ms.to_string())
        ))),
    }
}

/// One key as `tenantry-api token-keys` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyStatus {
    /// The key id.
    pub kid: String,
    /// [`KeyState::as_str`].
    pub state: &'static str,
    /// When it was added (RFC 3339).
    pub created_at: String,
    /// When it signs from (RFC 3339).
    pub signs_from: String,
    /// When it retires (RFC 3339), if superseded.
    pub retires_at: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Every key's status at `now_ms`, oldest first.
pub fn statuses(keys: &[TokenKeyRow], now_ms: i64) -> Vec<KeyStatus> {
    keys.iter()
        .map(|k| KeyStatus {
            kid: k.kid.clone(),
            state: key_state(keys, k, now_ms).as_str(),
            created_at: rfc3339(k.created_at_ms),
            signs_from: rfc3339(k.signs_from_ms),
            retires_at: k.retires_at_ms.map(rfc3339),
        })
        .collect()
}

/// The store of a command's database (migrated).
/// `tenantry-api token-keys`: the ring's keys at `clock`'s now.
pub async fn status_command(db: &DatabaseArgs, clock: &dyn Clock) -> Result<Vec<KeyStatus>> {
    let store = crate::server::command_store(db).await?;
    let keys = store.token_keys().await;
    store.close().await;
    Ok(statuses(&keys?, clock.now_ms()))
}

/// `tenantry-api token-keys public`: the public key set instances must accept now.
pub async fn public_command(db: &DatabaseArgs, clock: &dyn Clock) -> Result<String> {
    let store = crate::server::command_store(db).await?;
    let keys = store.token_keys().await;
    store.close().await;
    published_pem(&keys?, clock.now_ms())
}

/// `tenantry-api rotate-token-key`: retires what is due, then [`rotate`]s.
pub async fn rotate_command(args: &RotateTokenKeyArgs, clock: &dyn Clock) -> Result<Rotation> {
    let minimum = match args.test_only_min_token_key_overlap {
        Some(minimum) => {
            tracing::warn!(
                minimum = %humantime::format_duration(minimum),
                "the minimum token key overlap is lowered for a test; never do this in production"
            );
            minimum
        }
        None => min_overlap(),
    };
    // Refused before anything is opened or written.
    check_overlap(args.token_key_overlap, minimum)?;
    let store = crate::server::command_store(&args.db).await?;
    let master_key = match crate::keyring::command_ring(&args.db, &store).await {
        Ok(ring) => ring,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let now = clock.now_ms();
    let result = async {
        retire_due(&store, now, "cli").await?;
        rotate(&store, &master_key, args.token_key_overlap, minimum, now).await
    }
    .await;
    store.close().await;
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn key(kid: &str, signs_from: i64, retires_at: Option<i64>) -> TokenKeyRow {
        TokenKeyRow {
            kid: kid.into(),
            public_pem: String::new(),
            private_sealed: Some("sealed".into()),
            created_at_ms: signs_from.min(1_000),
            signs_from_ms: signs_from,
            retires_at_ms: retires_at,
        }
    }

    fn states(keys: &[TokenKeyRow], now: i64) -> Vec<&'static str> {
        keys.iter()
            .map(|k| key_state(keys, k, now).as_str())
            .collect()
    }

    #[test]
    fn a_rotation_moves_each_key_through_its_states() {
        // `a` signs from 0; a rotation at 10 min with a 20 min overlap adds `b` signing
        // from 30 min, and `a` retires at 50 min.
        let keys = [key("a", 0, Some(50 * MIN)), key("b", 30 * MIN, None)];
        let kids = |now| -> Vec<&str> {
            published_keys(&keys, now)
                .iter()
                .map(|k| k.kid.as_str())
                .collect()
        };
        assert_eq!(states(&keys, 10 * MIN), ["signing", "pending"]);
        assert_eq!(signing_key(&keys, 30 * MIN - 1).unwrap().kid, "a");
        assert_eq!(kids(10 * MIN), ["a", "b"]);
        assert_eq!(states(&keys, 30 * MIN), ["verifying", "signing"]);
        assert_eq!(signing_key(&keys, 30 * MIN).unwrap().kid, "b");
        assert_eq!(kids(50 * MIN - 1), ["a", "b"]);
        assert_eq!(states(&keys, 50 * MIN), ["retired", "signing"]);
        assert_eq!(kids(50 * MIN), ["b"]);
        assert!(due_for_retirement(&keys, 50 * MIN - 1).is_empty());
        assert_eq!(due_for_retirement(&keys, 50 * MIN)[0].kid, "a");
    }

    #[test]
    fn a_retired_key_never_signs_and_nothing_pending_signs_early() {
        let mut keys = vec![key("a", 0, Some(5 * MIN))];
        assert!(signing_key(&keys, 5 * MIN).is_none());
        keys[0].retires_at_ms = None;
        keys[0].private_sealed = None;
        assert!(signing_key(&keys, MIN).is_none());
        assert!(published_keys(&keys, MIN).is_empty());
        assert!(due_for_retirement(&keys, 10 * MIN).is_empty());
        let pending = [key("p", 10 * MIN, None)];
        assert!(signing_key(&pending, 10 * MIN - 1).is_none());
    }

    #[test]
    fn overlaps_shorter_than_a_token_life_plus_skew_are_refused() {
        assert_eq!(min_overlap(), Duration::from_secs(16 * 60));
        assert!(check_overlap(DEFAULT_OVERLAP, min_overlap()).is_ok());
        assert!(check_overlap(min_overlap(), min_overlap()).is_ok());
        let err = check_overlap(Duration::from_secs(15 * 60), min_overlap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short") && err.contains("16m"), "{err}");
    }

    #[test]
    fn the_published_set_is_valid_pem_of_every_live_key() {
        let (a, b) = (
            TokenSigner::generate().unwrap(),
            TokenSigner::generate().unwrap(),
        );
        let mut ka = key(a.kid(), 0, Some(50 * MIN));
        ka.public_pem = a.public_key_pem();
        let mut kb = key(b.kid(), 30 * MIN, None);
        kb.public_pem = b.public_key_pem();
        let keys = [ka, kb];
        let both = published_pem(&keys, 10 * MIN).unwrap();
        assert_eq!(
            both,
            format!("{}{}", a.public_key_pem(), b.public_key_pem())
        );
        assert_eq!(published_pem(&keys, 50 * MIN).unwrap(), b.public_key_pem());
    }
}
