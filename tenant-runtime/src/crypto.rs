//! Record encryption: AES-256-GCM, a fresh random 96-bit nonce per record, and associated
//! data that binds the ciphertext to its tenant, table and record id (and, from version 2,
//! its key id), so a ciphertext copied to another row or another tenant's database fails
//! to decrypt instead of being served as the wrong record.
//!
//! Two sealed formats:
//!
//! - version 1, `1 || nonce (12) || ciphertext || tag (16)`, directly under the tenant's
//!   configured key: what runtimes wrote before per-period data keys. Still opened (by
//!   [`Sealer`]); the store migrates such records to version 2 when it opens.
//! - version 2, `2 || key id (4, big-endian) || nonce (12) || ciphertext || tag (16)`, under
//!   the data key named by the id ([`RecordKey`]): a key per execution period, or the
//!   credential key, held wrapped in the key store (`keystore`).
//!
//! The configured key file is the key-encryption key (KEK): it only wraps data keys
//! ([`wrap_key`]). Random nonces are safe for well over the number of records one key
//! seals (the GCM bound is about 2^32 encryptions per key).

use std::fmt;
use std::path::Path;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead as _, KeyInit as _, Nonce, Payload};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretBox};

use crate::error::{Error, Result};

/// Length of the data key file, and of every data key.
pub const DATA_KEY_LEN: usize = 32;
const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a version-1 sealed record adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// Bytes a version-2 sealed record adds to its plaintext.
pub const SEAL_OVERHEAD_V2: usize = 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN;

/// A data key's id: random, unique in the instance's key store, never reused (retired ids
/// are remembered), written in the clear in every version-2 record.
pub type KeyId = u32;

/// 32 bytes of key material (the key-encryption key from the data key file, or a data
/// key); wiped on drop, never printed.
pub struct DataKey(SecretBox<[u8; DATA_KEY_LEN]>);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

impl DataKey {
    /// Reads a key file holding exactly 32 raw bytes.
    pub fn from_file(path: &Path) -> Result<DataKey> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| Error::ReadFile {
            what: "data key file",
            path: path.to_owned(),
            source,
        })?);
        DataKey::from_bytes(&bytes).ok_or_else(|| Error::DataKeyLength {
            path: path.to_owned(),
            len: bytes.len(),
        })
    }

    /// A key from exactly 32 bytes; `None` for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Option<DataKey> {
        let mut key = Box::new([0u8; DATA_KEY_LEN]);
        if bytes.len() != DATA_KEY_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(DataKey(SecretBox::new(key)))
    }

    /// A new random key.
    pub fn generate() -> Result<DataKey> {
        let mut key = Box::new([0u8; DATA_KEY_LEN]);
        getrandom::fill(&mut key[..]).map_err(|_| Error::Randomness)?;
        Ok(DataKey(SecretBox::new(key)))
    }

    /// The id of this key as a key-encryption key: a fingerprint (never the key itself)
    /// that names it in the key store, in `/metrics` and to the operator.
    pub fn kek_id(&self) -> KekId {
        KekId(tenantry_proto::runtime_config::kek_id(
            self.0.expose_secret(),
        ))
    }

    /// Whether two keys are the same, in constant time.
    pub fn same_as(&self, other: &DataKey) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.expose_secret().ct_eq(other.0.expose_secret()).into()
    }

    /// The raw bytes, for tests that look for them in files.
    #[doc(hidden)]
    pub fn expose_for_tests(&self) -> &[u8; DATA_KEY_LEN] {
        self.0.expose_secret()
    }

    fn cipher(&self) -> Aes256Gcm {
        // A view of the secret as the cipher's key type: no copy left behind to wipe.
        let key_ref: &aes_gcm::Key<Aes256Gcm> = self.0.expose_secret().into();
        Aes256Gcm::new(key_ref)
    }
}

/// A key-encryption key's id (see [`DataKey::kek_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KekId(pub String);

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a data key seals; part of the wrapping's associated data, so a wrapped key cannot
/// be passed off as one of another purpose or id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The executions of one period.
    Executions,
    /// Credentials, OAuth 2 grants' tokens and authorizations in progress.
    Credentials,
}

impl Purpose {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Executions => "executions",
            Purpose::Credentials => "credentials",
        }
    }

    /// Parses [`Purpose::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Purpose> {
        match s {
            "executions" => Some(Purpose::Executions),
            "credentials" => Some(Purpose::Credentials),
            _ => None,
        }
    }
}

/// Length-prefixed parts after a fixed label: no two different lists give the same bytes.
fn associated_data(label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(label.len() + parts.iter().map(|p| 4 + p.len()).sum::<usize>());
    aad.extend_from_slice(label);
    for part in parts {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

fn wrap_aad(tenant_id: &str, id: KeyId, purpose: Purpose) -> Vec<u8> {
    associated_data(
        b"tenantry-runtime/key-wrap/v1",
        &[
            tenant_id.as_bytes(),
            &id.to_be_bytes(),
            purpose.as_str().as_bytes(),
        ],
    )
}

fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| Error::Randomness)?;
    Ok(nonce)
}

/// `header || nonce || ciphertext || tag`: `plaintext` under `cipher` with a fresh random
/// nonce, bound to `aad`. `None` when the cipher refuses (it does not for these sizes).
fn encrypt(
    cipher: &Aes256Gcm,
    header: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Option<Vec<u8>>> {
    let nonce = random_nonce()?;
    let Ok(ciphertext) = cipher.encrypt(
        &Nonce::<Aes256Gcm>::from(nonce),
        Payload {
            msg: plaintext,
            aad,
        },
    ) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(header.len() + NONCE_LEN + ciphertext.len());
    out.extend_from_slice(header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(Some(out))
}

/// Reverses [`encrypt`] on what follows the header (`nonce || ciphertext || tag`); `None`
/// when it is too short, or the key, the associated data or a byte differ.
fn decrypt(cipher: &Aes256Gcm, body: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let nonce = Nonce::<Aes256Gcm>::try_from(&body[..NONCE_LEN]).ok()?;
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: &body[NONCE_LEN..],
                aad,
            },
        )
        .ok()
        .map(Zeroizing::new)
}

/// Wraps data key `key` (id `id`, for `purpose`, of `tenant_id`) under the key-encryption
/// key `kek`: `nonce (12) || ciphertext (32) || tag (16)`.
pub fn wrap_key(
    kek: &DataKey,
    tenant_id: &str,
    id: KeyId,
    purpose: Purpose,
    key: &DataKey,
) -> Result<Vec<u8>> {
    let aad = wrap_aad(tenant_id, id, purpose);
    encrypt(&kek.cipher(), &[], &aad, key.0.expose_secret())?.ok_or(Error::WrapKey { id })
}

/// Unwraps what [`wrap_key`] made; fails on another KEK, tenant, id or purpose, or a
/// changed byte.
pub fn unwrap_key(
    kek: &DataKey,
    tenant_id: &str,
    id: KeyId,
    purpose: Purpose,
    wrapped: &[u8],
) -> Result<DataKey> {
    let fail = || Error::UnwrapKey { id };
    if wrapped.len() != NONCE_LEN + DATA_KEY_LEN + TAG_LEN {
        return Err(fail());
    }
    let aad = wrap_aad(tenant_id, id, purpose);
    let plain = decrypt(&kek.cipher(), wrapped, &aad).ok_or_else(fail)?;
    DataKey::from_bytes(&plain).ok_or_else(fail)
}

/// The tables whose records are sealed; part of the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Execution payloads.
    Executions,
    /// Credential secrets.
    Credentials,
    /// OAuth 2 grants' access and refresh tokens.
    OAuth2Grants,
    /// PKCE verifiers of authorizations in progress.
    OAuth2States,
}

impl Table {
    /// The table's name in the database and in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Executions => "executions",
            Table::Credentials => "credentials",
            Table::OAuth2Grants => "oauth2_grants",
            Table::OAuth2States => "oauth2_states",
        }
    }

    /// Which data key seals this table's records.
    pub fn purpose(self) -> Purpose {
        match self {
            Table::Executions => Purpose::Executions,
            Table::Credentials | Table::OAuth2Grants | Table::OAuth2States => Purpose::Credentials,
        }
    }
}

/// Which key a sealed record names in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedWith {
    /// Version 1: the configured key directly.
    Version1,
    /// Version 2: the data key with this id.
    Key(KeyId),
}

/// The key a sealed record names; `None` when it is no sealed record at all.
pub fn sealed_with(sealed: &[u8]) -> Option<SealedWith> {
    match sealed.first() {
        Some(&VERSION_1) if sealed.len() >= SEAL_OVERHEAD => Some(SealedWith::Version1),
        Some(&VERSION_2) if sealed.len() >= SEAL_OVERHEAD_V2 => {
            let id: [u8; KEY_ID_LEN] = sealed[1..1 + KEY_ID_LEN].try_into().ok()?;
            Some(SealedWith::Key(KeyId::from_be_bytes(id)))
        }
        _ => None,
    }
}

/// One data key, ready to seal and open version-2 records of one tenant.
pub struct RecordKey {
    id: KeyId,
    cipher: Aes256Gcm,
    tenant_id: String,
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl RecordKey {
    /// Data key `key`, with id `id`, for `tenant_id`'s records.
    pub fn new(id: KeyId, key: &DataKey, tenant_id: &str) -> RecordKey {
        RecordKey {
            id,
            cipher: key.cipher(),
            tenant_id: tenant_id.to_owned(),
        }
    }

    /// Its id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    fn aad(&self, table: Table, id: &str) -> Vec<u8> {
        associated_data(
            b"tenantry-runtime/v2",
            &[
                self.tenant_id.as_bytes(),
                table.as_str().as_bytes(),
                id.as_bytes(),
                &self.id.to_be_bytes(),
            ],
        )
    }

    /// Encrypts `plaintext` as record `id` of `table` (version 2).
    pub fn seal(&self, table: Table, id: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut header = [0u8; 1 + KEY_ID_LEN];
        header[0] = VERSION_2;
        header[1..].copy_from_slice(&self.id.to_be_bytes());
        encrypt(&self.cipher, &header, &self.aad(table, id), plaintext)?.ok_or(Error::Encrypt {
            table: table.as_str(),
        })
    }

    /// Decrypts version-2 record `id` of `table`; fails if it names another key, if the
    /// key, tenant, table or id differ from the ones it was sealed with, or if a byte was
    /// changed.
    pub fn open(&self, table: Table, id: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let fail = || Error::Decrypt {
            table: table.as_str(),
            id: id.to_owned(),
        };
        if sealed_with(sealed) != Some(SealedWith::Key(self.id)) {
            return Err(fail());
        }
        decrypt(
            &self.cipher,
            &sealed[1 + KEY_ID_LEN..],
            &self.aad(table, id),
        )
        .ok_or_else(fail)
    }
}

/// Seals and opens one tenant's version-1 records, directly under the configured key:
/// the format before per-period data keys, kept to read (and migrate) what older runtimes
/// wrote.
pub struct Sealer {
    cipher: Aes256Gcm,
    tenant_id: String,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("tenant_id", &self.tenant_id)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl Sealer {
    /// A sealer for `tenant_id`'s records under `key`.
    pub fn new(key: &DataKey, tenant_id: &str) -> Sealer {
        Sealer {
            cipher: key.cipher(),
            tenant_id: tenant_id.to_owned(),
        }
    }

    /// Encrypts `plaintext` as record `id` of `table` (version 1: tests and benchmarks
    /// compare against it; the runtime writes version 2).
    pub fn seal(&self, table: Table, id: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        encrypt(
            &self.cipher,
            &[VERSION_1],
            &self.associated_data(table, id),
            plaintext,
        )?
        .ok_or(Error::Encrypt {
            table: table.as_str(),
        })
    }

    /// Decrypts version-1 record `id` of `table`; fails if the key, tenant, table or id
    /// differ from the ones it was sealed with, or if a byte was changed.
    pub fn open(&self, table: Table, id: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let fail = || Error::Decrypt {
            table: table.as_str(),
            id: id.to_owned(),
        };
        if sealed.len() < SEAL_OVERHEAD || sealed[0] != VERSION_1 {
            return Err(fail());
        }
        decrypt(&self.cipher, &sealed[1..], &self.associated_data(table, id)).ok_or_else(fail)
    }

    /// `"tenantry-runtime/v1"` then tenant id, table and record id, each length-prefixed.
    fn associated_data(&self, table: Table, id: &str) -> Vec<u8> {
        associated_data(
            b"tenantry-runtime/v1",
            &[
                self.tenant_id.as_bytes(),
                table.as_str().as_bytes(),
                id.as_bytes(),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn key(byte: u8) -> DataKey {
        DataKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn round_trip_uses_a_fresh_nonce_each_time() {
        let sealer = Sealer::new(&key(7), "acme");
        let a = sealer
            .seal(Table::Executions, "id-1", b"hello world")
            .unwrap();
        let b = sealer
            .seal(Table::Executions, "id-1", b"hello world")
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), b"hello world".len() + SEAL_OVERHEAD);
        assert_eq!(
            &*sealer.open(Table::Executions, "id-1", &a).unwrap(),
            b"hello world"
        );
        assert_eq!(
            &*sealer.open(Table::Executions, "id-1", &b).unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn ciphertext_is_bound_to_tenant_table_id_and_key() {
        let sealer = Sealer::new(&key(7), "acme");
        let sealed = sealer.seal(Table::Credentials, "id-1", b"s3cret").unwrap();
        assert!(sealer.open(Table::Credentials, "id-2", &sealed).is_err());
        assert!(sealer.open(Table::Executions, "id-1", &sealed).is_err());
        assert!(
            Sealer::new(&key(7), "globex")
                .open(Table::Credentials, "id-1", &sealed)
                .is_err()
        );
        assert!(
            Sealer::new(&key(8), "acme")
                .open(Table::Credentials, "id-1", &sealed)
                .is_err()
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(sealer.open(Table::Credentials, "id-1", &flipped).is_err());
        assert!(
            sealer
                .open(Table::Credentials, "id-1", &sealed[..10])
                .is_err()
        );
    }

    #[test]
    fn key_must_be_exactly_32_bytes_and_never_prints() {
        assert!(DataKey::from_bytes(&[1; 31]).is_none());
        assert!(DataKey::from_bytes(&[1; 33]).is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"0123456789abcdef0123456789abcdef\n").unwrap();
        let err = DataKey::from_file(&path).unwrap_err();
        assert!(
            err.to_string().contains("exactly 32 raw bytes, found 33"),
            "{err}"
        );
        std::fs::write(&path, [0x41u8; 32]).unwrap();
        let k = DataKey::from_file(&path).unwrap();
        assert_eq!(format!("{k:?}"), "DataKey([REDACTED])");
        assert!(!format!("{:?}", Sealer::new(&k, "acme")).contains("AAAA"));
    }

    #[test]
    fn version_2_round_trips_and_names_its_key() {
        let k = RecordKey::new(0xdead_beef, &key(3), "acme");
        let sealed = k.seal(Table::Executions, "id-1", b"payload").unwrap();
        assert_eq!(sealed.len(), b"payload".len() + SEAL_OVERHEAD_V2);
        assert_eq!(sealed[0], 2);
        assert_eq!(&sealed[1..5], &0xdead_beef_u32.to_be_bytes());
        assert_eq!(sealed_with(&sealed), Some(SealedWith::Key(0xdead_beef)));
        assert_eq!(
            &*k.open(Table::Executions, "id-1", &sealed).unwrap(),
            b"payload"
        );
        let v1 = Sealer::new(&key(3), "acme")
            .seal(Table::Executions, "id-1", b"payload")
            .unwrap();
        assert_eq!(sealed_with(&v1), Some(SealedWith::Version1));
        assert_eq!(sealed_with(b"\x02abc"), None);
        assert_eq!(sealed_with(b""), None);
        // Neither format opens the other.
        assert!(k.open(Table::Executions, "id-1", &v1).is_err());
        assert!(
            Sealer::new(&key(3), "acme")
                .open(Table::Executions, "id-1", &sealed)
                .is_err()
        );
    }

    #[test]
    fn version_2_is_bound_to_tenant_table_id_key_and_key_id() {
        let k = RecordKey::new(7, &key(3), "acme");
        let sealed = k.seal(Table::Credentials, "id-1", b"s3cret").unwrap();
        assert!(k.open(Table::Credentials, "id-2", &sealed).is_err());
        assert!(k.open(Table::OAuth2Grants, "id-1", &sealed).is_err());
        assert!(
            RecordKey::new(7, &key(3), "globex")
                .open(Table::Credentials, "id-1", &sealed)
                .is_err()
        );
        assert!(
            RecordKey::new(7, &key(4), "acme")
                .open(Table::Credentials, "id-1", &sealed)
                .is_err()
        );
        // The same key under another id: the header is refused, and so is a header
        // rewritten to that id (the id is in the associated data).
        let other_id = RecordKey::new(8, &key(3), "acme");
        assert!(other_id.open(Table::Credentials, "id-1", &sealed).is_err());
        let mut relabeled = sealed.clone();
        relabeled[1..5].copy_from_slice(&8u32.to_be_bytes());
        assert!(
            other_id
                .open(Table::Credentials, "id-1", &relabeled)
                .is_err()
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(k.open(Table::Credentials, "id-1", &flipped).is_err());
    }

    #[test]
    fn wrapped_keys_unwrap_only_with_their_kek_tenant_id_and_purpose() {
        let kek = key(1);
        let data = DataKey::generate().unwrap();
        let wrapped = wrap_key(&kek, "acme", 5, Purpose::Executions, &data).unwrap();
        assert_eq!(wrapped.len(), 60);
        assert!(!wrapped.windows(32).any(|w| w == data.expose_for_tests()));
        let back = unwrap_key(&kek, "acme", 5, Purpose::Executions, &wrapped).unwrap();
        assert!(back.same_as(&data));
        for (kek, tenant, id, purpose) in [
            (key(2), "acme", 5, Purpose::Executions),
            (key(1), "globex", 5, Purpose::Executions),
            (key(1), "acme", 6, Purpose::Executions),
            (key(1), "acme", 5, Purpose::Credentials),
        ] {
            assert!(unwrap_key(&kek, tenant, id, purpose, &wrapped).is_err());
        }
        assert!(unwrap_key(&kek, "acme", 5, Purpose::Executions, &wrapped[1..]).is_err());
    }

    #[test]
    fn kek_ids_are_short_stable_fingerprints() {
        let a = key(1).kek_id();
        assert_eq!(a, key(1).kek_id());
        assert_ne!(a, key(2).kek_id());
        assert_eq!(a.0.len(), 16);
        assert!(a.0.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a.0, "0101010101010101");
    }
}
