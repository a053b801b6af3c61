//! Record encryption: AES-256-GCM under the tenant's data key, a fresh random 96-bit nonce
//! per record, and associated data that binds the ciphertext to its tenant, table and
//! record id, so a ciphertext copied to another row or another tenant's database fails to
//! decrypt instead of being served as the wrong record.
//!
//! Sealed format: `version (1 byte) || nonce (12) || ciphertext || tag (16)`. Random
//! nonces are safe for well over the number of records one tenant keeps (the GCM bound
//! is about 2^32 encryptions per key).

use std::fmt;
use std::path::Path;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead as _, KeyInit as _, Nonce, Payload};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretBox};

use crate::error::{Error, Result};

/// Length of the data key file.
pub const DATA_KEY_LEN: usize = 32;
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// The tenant's data-encryption key; wiped on drop, never printed.
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
}

/// Seals and opens one tenant's records.
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
        // A view of the secret as the cipher's key type: no copy left behind to wipe.
        let key_ref: &aes_gcm::Key<Aes256Gcm> = key.0.expose_secret().into();
        let cipher = Aes256Gcm::new(key_ref);
        Sealer {
            cipher,
            tenant_id: tenant_id.to_owned(),
        }
    }

    /// Encrypts `plaintext` as record `id` of `table`.
    pub fn seal(&self, table: Table, id: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce_bytes).map_err(|_| Error::Randomness)?;
        let nonce = Nonce::<Aes256Gcm>::from(nonce_bytes);
        let aad = self.associated_data(table, id);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Encrypt {
                table: table.as_str(),
            })?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Decrypts record `id` of `table`; fails if the key, tenant, table or id differ from
    /// the ones it was sealed with, or if a byte was changed.
    pub fn open(&self, table: Table, id: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let fail = || Error::Decrypt {
            table: table.as_str(),
            id: id.to_owned(),
        };
        if sealed.len() < SEAL_OVERHEAD || sealed[0] != VERSION {
            return Err(fail());
        }
        let nonce = Nonce::<Aes256Gcm>::try_from(&sealed[1..1 + NONCE_LEN]).map_err(|_| fail())?;
        let aad = self.associated_data(table, id);
        self.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| fail())
    }

    /// `"tenantry-runtime/v1"` then tenant id, table and record id, each length-prefixed so
    /// no two different triples give the same bytes.
    fn associated_data(&self, table: Table, id: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + self.tenant_id.len() + id.len());
        aad.extend_from_slice(b"tenantry-runtime/v1");
        for part in [self.tenant_id.as_str(), table.as_str(), id] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
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
}
