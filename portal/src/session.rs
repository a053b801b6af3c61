//! The browser session: one cookie, encrypted and authenticated with AES-256-GCM under the
//! portal's cookie key. It holds the CSRF token of the visit and, once signed in, the API
//! session token, which so never reaches the page or its scripts in a readable form. The
//! cookie is `HttpOnly`, `SameSite=Strict`, and `Secure` when the public URL is https.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::error::{Error, Result};

/// The cookie's name.
pub const COOKIE_NAME: &str = "tenantry_portal";

/// How long a cookie without a sign-in (only a CSRF token) lives, in seconds.
const ANONYMOUS_LIFETIME_S: i64 = 2 * 60 * 60;

const NONCE_LEN: usize = 12;

/// The key that seals the cookie; its `Debug` shows nothing of it.
pub struct CookieKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieKey([REDACTED])")
    }
}

impl CookieKey {
    /// A key from the base64 text of a key file (32 bytes; surrounding whitespace ignored).
    pub fn from_base64(text: &SecretString) -> Result<CookieKey> {
        let bytes = STANDARD
            .decode(text.expose_secret().trim())
            .map_err(|_| Error::CookieKey("the key file is not valid base64".into()))?;
        if bytes.len() != 32 {
            return Err(Error::CookieKey(format!(
                "the key must be 32 bytes, the file holds {}",
                bytes.len()
            )));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| Error::CookieKey("the key must be 32 bytes".into()))?;
        Ok(CookieKey { cipher })
    }

    /// Reads the key file at `path`.
    pub fn load(path: &Path) -> Result<CookieKey> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: format!("reading the cookie key {}", path.display()),
            source,
        })?;
        CookieKey::from_base64(&SecretString::from(text))
    }

    /// A new random key file's text (base64 of 32 bytes).
    pub fn generate_text() -> Result<SecretString> {
        Ok(SecretString::from(STANDARD.encode(random::<32>()?)))
    }

    fn seal(&self, plaintext: &[u8]) -> Result<String> {
        let nonce = random::<NONCE_LEN>()?;
        let ct = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: COOKIE_NAME.as_bytes(),
                },
            )
            .map_err(|_| Error::Crypto)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: ct,
                    aad: COOKIE_NAME.as_bytes(),
                },
            )
            .ok()
    }
}

/// `N` bytes from the operating system's CSPRNG.
fn random<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|_| Error::Random)?;
    Ok(buf)
}

/// Where a signed-in visit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// The password was right; the second factor is still to come.
    MfaPending,
    /// Fully signed in.
    SignedIn,
}

/// What the cookie holds. `Debug` never shows the token or the CSRF value.
#[derive(Clone)]
pub struct Session {
    /// The CSRF token every form of this visit carries.
    pub csrf: String,
    /// The API session token, once signed in.
    pub token: Option<SecretString>,
    /// How far the sign-in got (meaningful with a token).
    pub stage: Stage,
    /// When the cookie stops being accepted (unix seconds).
    pub expires_at: i64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("stage", &self.stage)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The sealed form (short keys keep the cookie small).
#[derive(Serialize, Deserialize)]
struct Wire {
    c: String,
    t: Option<String>,
    s: Stage,
    e: i64,
}

impl Session {
    /// A visit without a sign-in: a fresh CSRF token.
    pub fn anonymous(now: i64) -> Result<Session> {
        Ok(Session {
            csrf: URL_SAFE_NO_PAD.encode(random::<32>()?),
            token: None,
            stage: Stage::SignedIn,
            expires_at: now.saturating_add(ANONYMOUS_LIFETIME_S),
        })
    }

    /// A signed-in visit (a new CSRF token: nothing of the anonymous visit carries over).
    pub fn signed_in(token: SecretString, stage: Stage, expires_at: i64) -> Result<Session> {
        Ok(Session {
            csrf: URL_SAFE_NO_PAD.encode(random::<32>()?),
            token: Some(token),
            stage,
            expires_at,
        })
    }

    /// The token of a fully signed-in visit.
    pub fn signed_in_token(&self) -> Option<&SecretString> {
        self.token
            .as_ref()
            .filter(|_| self.stage == Stage::SignedIn)
    }

    /// Whether `given` is this visit's CSRF token (constant time).
    pub fn csrf_matches(&self, given: &str) -> bool {
        !given.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes()))
    }

    /// The sealed cookie value.
    pub fn seal(&self, key: &CookieKey) -> Result<String> {
        let wire = Wire {
            c: self.csrf.clone(),
            t: self.token.as_ref().map(|t| t.expose_secret().to_owned()),
            s: self.stage,
            e: self.expires_at,
        };
        let json = serde_json::to_vec(&wire).map_err(|_| Error::Crypto)?;
        key.seal(&json)
    }

    /// The session in a sealed cookie value, if it opens with `key` and has not expired.
    pub fn open(key: &CookieKey, sealed: &str, now: i64) -> Option<Session> {
        let json = key.open(sealed)?;
        let wire: Wire = serde_json::from_slice(&json).ok()?;
        (wire.e > now).then(|| Session {
            csrf: wire.c,
            token: wire.t.map(SecretString::from),
            stage: wire.s,
            expires_at: wire.e,
        })
    }
}

/// The `Set-Cookie` value carrying `sealed` until `expires_at`.
pub fn set_cookie(sealed: &str, expires_at: i64, now: i64, secure: bool) -> String {
    let max_age = expires_at.saturating_sub(now).max(0);
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE_NAME}={sealed}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

/// The portal's cookie value in a `Cookie` request header, if any.
pub fn from_header(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key() -> CookieKey {
        CookieKey::from_base64(&CookieKey::generate_text().unwrap()).unwrap()
    }

    #[test]
    fn a_session_round_trips_and_hides_its_token() {
        let key = key();
        let s = Session::signed_in(SecretString::from("tok-123"), Stage::SignedIn, 1_000).unwrap();
        let sealed = s.seal(&key).unwrap();
        assert!(!sealed.contains("tok-123"));
        let back = Session::open(&key, &sealed, 999).unwrap();
        assert_eq!(back.signed_in_token().unwrap().expose_secret(), "tok-123");
        assert!(back.csrf_matches(&s.csrf));
        assert!(!back.csrf_matches(""));
        assert!(!back.csrf_matches("other"));
        let debug = format!("{back:?}");
        assert!(
            !debug.contains("tok-123") && !debug.contains(&s.csrf),
            "{debug}"
        );
    }

    #[test]
    fn expired_altered_or_foreign_cookies_are_ignored() {
        let key = key();
        let s = Session::anonymous(0).unwrap();
        let sealed = s.seal(&key).unwrap();
        assert!(Session::open(&key, &sealed, ANONYMOUS_LIFETIME_S).is_none());
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(Session::open(&key, &URL_SAFE_NO_PAD.encode(bytes), 1).is_none());
        assert!(Session::open(&self::key(), &sealed, 1).is_none());
        assert!(Session::open(&key, "not base64!", 1).is_none());
    }

    #[test]
    fn a_pending_second_factor_is_not_signed_in() {
        let s = Session::signed_in(SecretString::from("t"), Stage::MfaPending, 10).unwrap();
        assert!(s.signed_in_token().is_none());
        assert!(s.token.is_some());
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("v", 100, 40, true);
        assert_eq!(
            c,
            "tenantry_portal=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
        assert!(!set_cookie("v", 100, 40, false).contains("Secure"));
        assert_eq!(from_header("a=b; tenantry_portal=xyz; c=d"), Some("xyz"));
        assert_eq!(from_header("a=b"), None);
    }

    #[test]
    fn bad_key_files_are_refused() {
        let e = CookieKey::from_base64(&SecretString::from("!!")).unwrap_err();
        assert!(e.to_string().contains("base64"));
        let e =
            CookieKey::from_base64(&SecretString::from(STANDARD.encode([0u8; 16]))).unwrap_err();
        assert!(e.to_string().contains("32 bytes"), "{e}");
    }
}
