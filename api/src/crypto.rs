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

/// The prefix of a value sealed by a key of the ring: `mk1.<key id>.<base64(nonce || ct)>`.
/// Values sealed before key rings existed are bare base64 (which never holds a `.`).
const SEALED_PREFIX: &str = "mk1.";

/// One master key that encrypts secrets at rest (TOTP secrets, instance-token signing keys, verification tokens in the
/// mail outbox). 32 bytes; a key file holds them base64-encoded, one key per line.
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({}, [REDACTED])", self.id)
    }
}

impl MasterKey {
    /// Makes a key from 32 raw bytes.
    pub fn from_bytes(bytes: &SecretBox<[u8; 32]>) -> Self {
        let mut id = Sha256::new();
        id.update(b"tenantry master key id\0");
        id.update(bytes.expose_secret());
        MasterKey {
            id: hex::encode(&id.finalize()[..8]),
            cipher: Aes256Gcm::new(bytes.expose_secret().into()),
        }
    }

    /// Parses the base64 text of one key (surrounding whitespace ignored).
    pub fn from_base64(text: &SecretString) -> Result<Self, Error> {
        let decoded = secrecy::zeroize::Zeroizing::new(
            STANDARD
                .decode(text.expose_secret().trim())
                .map_err(|_| Error::MasterKey("a key is not valid base64".into()))?,
        );
        let bytes: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            Error::MasterKey(format!(
                "a key must be 32 bytes, the file holds one of {}",
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

    /// The key's id: 16 hex digits of a domain-separated SHA-256 of the key, so it names
    /// the key without revealing it, and the same key always has the same id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypts `plaintext`, binding it to `context` (for example `totp:<user id>`) so a
    /// ciphertext copied to another row fails to decrypt. Returns
    /// `mk1.<key id>.base64(nonce || ct)`.
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
        Ok(format!(
            "{SEALED_PREFIX}{}.{}",
            self.id,
            STANDARD.encode(out)
        ))
    }

    /// Opens the base64 part of a sealed value with this key.
    fn open_raw(&self, context: &str, body: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        let raw = STANDARD
            .decode(body)
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

/// What seals and opens secrets at rest: one key, a ring, a server's live ring.
pub trait Seal: Send + Sync {
    /// Encrypts `plaintext` bound to `context`; see [`MasterKey::seal`].
    fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error>;
    /// Reverses [`Seal::seal`].
    fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error>;
}

impl Seal for MasterKey {
    fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error> {
        MasterKey::seal(self, context, plaintext)
    }

    fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        match sealed.strip_prefix(SEALED_PREFIX) {
            Some(rest) => match rest.split_once('.') {
                Some((id, body)) if id == self.id => self.open_raw(context, body),
                Some(_) => Err(Error::Crypto("sealed by another master key")),
                None => Err(Error::Crypto("sealed value is malformed")),
            },
            None => self.open_raw(context, sealed),
        }
    }
}

impl Seal for MasterKeyRing {
    fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error> {
        MasterKeyRing::seal(self, context, plaintext)
    }

    fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        MasterKeyRing::open(self, context, sealed)
    }
}

/// The id of the key that sealed `sealed`, or `None` for a value sealed before key rings
/// (bare base64: any key of the ring may have sealed it).
pub fn sealed_key_id(sealed: &str) -> Option<&str> {
    let rest = sealed.strip_prefix(SEALED_PREFIX)?;
    rest.split_once('.').map(|(id, _)| id)
}

/// The master keys: every key of the key file opens what it sealed; new values are sealed
/// by the primary key (the newest key of the file unless the database names another, see
/// [`crate::keyring`]).
pub struct MasterKeyRing {
    /// In the order of the file: the last is the newest.
    keys: Vec<MasterKey>,
    primary: usize,
}

impl std::fmt::Debug for MasterKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeyRing")
            .field("ids", &self.ids())
            .field("primary", &self.primary_id())
            .finish()
    }
}

impl MasterKeyRing {
    /// A ring of one key.
    pub fn single(key: MasterKey) -> Self {
        MasterKeyRing {
            keys: vec![key],
            primary: 0,
        }
    }

    /// Parses a key file: one base64 key per line, the newest last; blank lines and lines
    /// starting with `#` are ignored. The newest key is the primary. A key given twice is
    /// refused, and so is a file without keys.
    pub fn parse(text: &SecretString) -> Result<Self, Error> {
        let mut keys: Vec<MasterKey> = Vec::new();
        for (n, line) in text.expose_secret().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = MasterKey::from_base64(&SecretString::from(line)).map_err(|e| match e {
                Error::MasterKey(why) => Error::MasterKey(format!("line {}: {why}", n + 1)),
                other => other,
            })?;
            if keys.iter().any(|k| k.id == key.id) {
                return Err(Error::MasterKey(format!(
                    "line {}: key {} is in the file twice",
                    n + 1,
                    key.id
                )));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(Error::MasterKey("the key file holds no key".into()));
        }
        let primary = keys.len() - 1;
        Ok(MasterKeyRing { keys, primary })
    }

    /// The key ids, oldest first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Whether the ring holds key `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> &str {
        self.keys.get(self.primary).map_or("", |k| k.id.as_str())
    }

    /// The id of the newest key (the last of the file).
    pub fn newest_id(&self) -> &str {
        self.keys.last().map_or("", |k| k.id.as_str())
    }

    /// Makes key `id` the primary; false (and no change) when the ring lacks it.
    pub fn set_primary(&mut self, id: &str) -> bool {
        match self.keys.iter().position(|k| k.id == id) {
            Some(i) => {
                self.primary = i;
                true
            }
            None => false,
        }
    }

    /// Seals with the primary key; see [`MasterKey::seal`].
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error> {
        self.keys
            .get(self.primary)
            .ok_or(Error::Crypto("the key ring is empty"))?
            .seal(context, plaintext)
    }

    /// Opens a value sealed by any key of the ring (or, for a value from before key rings,
    /// by whichever key opens it); fails if the data, the context or the key differ, or
    /// the key that sealed it is not in the ring.
    pub fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        self.open_with_id(context, sealed).map(|(pt, _)| pt)
    }

    /// [`MasterKeyRing::open`], also naming the key that opened the value.
    pub fn open_with_id(
        &self,
        context: &str,
        sealed: &str,
    ) -> Result<(SecretBox<Vec<u8>>, &str), Error> {
        match sealed.strip_prefix(SEALED_PREFIX) {
            Some(rest) => {
                let (id, body) = rest
                    .split_once('.')
                    .ok_or(Error::Crypto("sealed value is malformed"))?;
                let key = self.keys.iter().find(|k| k.id == id).ok_or(Error::Crypto(
                    "the master key that sealed this value is not in the key file",
                ))?;
                Ok((key.open_raw(context, body)?, key.id.as_str()))
            }
            None => {
                // Newest first: a file that grew by rotation holds the original key first.
                for key in self.keys.iter().rev() {
                    if let Ok(pt) = key.open_raw(context, sealed) {
                        return Ok((pt, key.id.as_str()));
                    }
                }
                Err(Error::Crypto(
                    "decryption failed (wrong key or altered data)",
                ))
            }
        }
    }
}

/// The live key ring of a server: replaced as a whole when the key file or the primary
/// changes, read by every seal and open.
#[derive(Debug)]
pub struct SharedKeyRing(std::sync::RwLock<std::sync::Arc<MasterKeyRing>>);

impl SharedKeyRing {
    /// Shares `ring`.
    pub fn new(ring: MasterKeyRing) -> Self {
        SharedKeyRing(std::sync::RwLock::new(std::sync::Arc::new(ring)))
    }

    /// The ring in force.
    pub fn current(&self) -> std::sync::Arc<MasterKeyRing> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `ring` in force.
    pub fn replace(&self, ring: MasterKeyRing) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(ring);
    }

    /// Seals with the primary key of the ring in force.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, Error> {
        self.current().seal(context, plaintext)
    }

    /// Opens with the ring in force.
    pub fn open(&self, context: &str, sealed: &str) -> Result<SecretBox<Vec<u8>>, Error> {
        self.current().open(context, sealed)
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

    fn ring(keys: &[&SecretString]) -> MasterKeyRing {
        let text: String = keys
            .iter()
            .map(|k| format!("{}\n", k.expose_secret()))
            .collect();
        MasterKeyRing::parse(&SecretString::from(text)).unwrap()
    }

    #[test]
    fn seal_round_trips_and_binds_context() {
        let (_, text) = MasterKey::generate().unwrap();
        let key = ring(&[&text]);
        let sealed = key.seal("totp:u1", b"secret bytes").unwrap();
        assert_eq!(
            key.open("totp:u1", &sealed).unwrap().expose_secret(),
            b"secret bytes"
        );
        assert!(
            key.open("totp:u2", &sealed).is_err(),
            "another row's context must fail"
        );
        let (_, other) = MasterKey::generate().unwrap();
        assert!(
            ring(&[&other]).open("totp:u1", &sealed).is_err(),
            "another key must fail"
        );
    }

    #[test]
    fn seal_uses_a_fresh_nonce_each_time() {
        let (_, text) = MasterKey::generate().unwrap();
        let key = ring(&[&text]);
        assert_ne!(key.seal("c", b"x").unwrap(), key.seal("c", b"x").unwrap());
    }

    #[test]
    fn key_text_round_trips_and_bad_text_is_refused() {
        let (key, text) = MasterKey::generate().unwrap();
        let sealed = key.seal("c", b"x").unwrap();
        assert!(ring(&[&text]).open("c", &sealed).is_ok());
        assert_eq!(MasterKey::from_base64(&text).unwrap().id(), key.id());
        let short = SecretString::from(STANDARD.encode([0u8; 16]));
        assert!(
            MasterKey::from_base64(&short)
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(MasterKey::from_base64(&SecretString::from("***")).is_err());
        assert_eq!(
            format!("{key:?}"),
            format!("MasterKey({}, [REDACTED])", key.id())
        );
        assert!(!format!("{:?}", ring(&[&text])).contains(text.expose_secret()));
    }

    #[test]
    fn a_ring_seals_with_its_newest_key_and_opens_with_any() {
        let (old, old_text) = MasterKey::generate().unwrap();
        let (new, new_text) = MasterKey::generate().unwrap();
        let by_old = old.seal("c", b"before").unwrap();
        assert_eq!(sealed_key_id(&by_old), Some(old.id()));
        let mut both = ring(&[&old_text, &new_text]);
        assert_eq!(both.ids(), vec![old.id(), new.id()]);
        assert_eq!(both.primary_id(), new.id());
        let by_new = both.seal("c", b"after").unwrap();
        assert_eq!(sealed_key_id(&by_new), Some(new.id()));
        assert_eq!(both.open("c", &by_old).unwrap().expose_secret(), b"before");
        let (_, opened_by) = both.open_with_id("c", &by_new).unwrap();
        assert_eq!(opened_by, new.id());
        // The old ring cannot open what the new key sealed, and says which key it lacks
        // without showing any key.
        let err = ring(&[&old_text])
            .open("c", &by_new)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the key file"), "{err}");
        // The primary can be any key of the ring, and only one of it.
        assert!(both.set_primary(old.id()));
        assert_eq!(
            sealed_key_id(&both.seal("c", b"x").unwrap()),
            Some(old.id())
        );
        assert!(!both.set_primary("0000000000000000"));
        assert_eq!(both.primary_id(), old.id());
    }

    #[test]
    fn values_sealed_before_key_rings_still_open() {
        // What `MasterKey::seal` wrote before rings: bare base64(nonce || ct).
        let (key, text) = MasterKey::generate().unwrap();
        let (_, newer) = MasterKey::generate().unwrap();
        let sealed = key.seal("totp:u1", b"legacy").unwrap();
        let legacy = sealed.rsplit('.').next().unwrap().to_owned();
        assert_eq!(sealed_key_id(&legacy), None);
        let both = ring(&[&text, &newer]);
        let (pt, id) = both.open_with_id("totp:u1", &legacy).unwrap();
        assert_eq!(pt.expose_secret(), b"legacy");
        assert_eq!(id, key.id());
        assert!(ring(&[&newer]).open("totp:u1", &legacy).is_err());
    }

    #[test]
    fn key_files_are_checked_line_by_line() {
        let (_, a) = MasterKey::generate().unwrap();
        let with_comments = format!("# master keys\n\n{}\n", a.expose_secret());
        assert_eq!(
            MasterKeyRing::parse(&SecretString::from(with_comments))
                .unwrap()
                .ids()
                .len(),
            1
        );
        let twice = format!("{0}\n{0}\n", a.expose_secret());
        let err = MasterKeyRing::parse(&SecretString::from(twice))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("twice"), "{err}");
        let bad = format!("{}\nnot-a-key\n", a.expose_secret());
        let err = MasterKeyRing::parse(&SecretString::from(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains(a.expose_secret()));
        assert!(MasterKeyRing::parse(&SecretString::from("# none\n")).is_err());
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
