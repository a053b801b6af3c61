//! Cryptographic building blocks of the API: the master key that encrypts secrets at rest
//! (AES-256-GCM), random tokens, and hashing of high-entropy secrets (session tokens,
//! recovery codes) for storage.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

const NONCE_LEN: usize = 12;

/// The server key that encrypts secrets at rest (TOTP secrets). 32 bytes; the file that
/// holds it contains them base64-encoded.
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

impl MasterKey {
    /// Makes a key from 32 raw bytes.
    pub fn from_bytes(bytes: &SecretBox<[u8; 32]>) -> Self {
        MasterKey {
            cipher: Aes256Gcm::new(bytes.expose_secret().into()),
        }
    }

    /// Parses the base64 text of a key file (surrounding whitespace ignored).
    pub fn from_base64(text: &SecretString) -> Result<Self, Error> {
        let decoded = STANDARD
            .decode(text.expose_secret().trim())
            .map_err(|_| Error::MasterKey("the key file is not valid base64".into()))?;
        let bytes: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            Error::MasterKey(format!(
                "the key must be 32 bytes, the file holds {}",
                decoded.len()
            ))
        })?;
        Ok(MasterKey::from_bytes(&SecretBox::new(Box::new(bytes))))
    }

    /// A new random key and its base64 text for the key file.
    pub fn generate() -> Result<(Self, SecretString), Error> {
        let bytes = random_bytes::<32>()?;
        let text = SecretString::from(STANDARD.encode(bytes));
        Ok((
            MasterKey::from_bytes(&SecretBox::new(Box::new(bytes))),
            text,
        ))
    }

    /// Encrypts `plaintext`, binding it to `context` (for example `totp:<user id>`) so a
    /// ciphertext copied to another row fails to decrypt. Returns base64(nonce || ct).
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error> {
        let nonce = random_bytes::<NONCE_LEN>()?;
        let ct = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto("encryption failed"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(STANDARD.encode(out))
    }

    /// Reverses [`MasterKey::seal`]; fails if the data, the context or the key differ.
    pub fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        let raw = STANDARD
            .decode(sealed)
            .map_err(|_| Error::Crypto("sealed value is not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(Error::Crypto("sealed value is too short"));
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| Error::Crypto("sealed value is too short"))?;
        let pt = self
            .cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto("decryption failed (wrong key or altered data)"))?;
        Ok(SecretBox::new(Box::new(pt)))
    }
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|_| Error::Crypto("the system random source failed"))?;
    Ok(buf)
}

/// A new session token: 256 random bits, base64url without padding.
pub fn new_session_token() -> Result<SecretString, Error> {
    Ok(SecretString::from(
        URL_SAFE_NO_PAD.encode(random_bytes::<32>()?),
    ))
}

/// Hex SHA-256 of a high-entropy secret; what the database stores instead of the secret.
/// Also the key of an unknown email's lockout counters, which need no secrecy, only a
/// fixed size and no copy of whatever was typed as an email.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_binds_context() {
        let (key, _) = MasterKey::generate().unwrap();
        let sealed = key.seal("totp:u1", b"secret bytes").unwrap();
        assert_eq!(
            key.open("totp:u1", &sealed).unwrap().expose_secret(),
            b"secret bytes"
        );
        assert!(
            key.open("totp:u2", &sealed).is_err(),
            "another row's context must fail"
        );
        let (other, _) = MasterKey::generate().unwrap();
        assert!(
            other.open("totp:u1", &sealed).is_err(),
            "another key must fail"
        );
    }

    #[test]
    fn seal_uses_a_fresh_nonce_each_time() {
        let (key, _) = MasterKey::generate().unwrap();
        assert_ne!(key.seal("c", b"x").unwrap(), key.seal("c", b"x").unwrap());
    }

    #[test]
    fn key_text_round_trips_and_bad_text_is_refused() {
        let (key, text) = MasterKey::generate().unwrap();
        let sealed = key.seal("c", b"x").unwrap();
        let again = MasterKey::from_base64(&text).unwrap();
        assert!(again.open("c", &sealed).is_ok());
        let short = SecretString::from(STANDARD.encode([0u8; 16]));
        assert!(
            MasterKey::from_base64(&short)
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(MasterKey::from_base64(&SecretString::from("***")).is_err());
        assert_eq!(format!("{key:?}"), "MasterKey([REDACTED])");
    }

    #[test]
    fn session_tokens_are_256_bits_and_distinct() {
        let a = new_session_token().unwrap();
        let b = new_session_token().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(a.expose_secret()).unwrap().len(), 32);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(hash_secret(a.expose_secret()).len(), 64);
    }
}
