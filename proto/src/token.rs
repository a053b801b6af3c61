//! Instance tokens: the short-lived, tenant-bound bearer tokens that the API mints and a
//! tenant's runtime verifies offline.
//!
//! A token is a compact JWT (RFC 7519) signed with Ed25519 (RFC 8037, `alg: EdDSA`). The
//! algorithm is pinned: a token whose header names anything else (`none`, `HS256`, …) is
//! refused before its signature is even looked at, so a verifier can never be talked into
//! treating the public key as an HMAC secret. The claims are fixed ([`InstanceClaims`]):
//! `iss` is always [`ISSUER`], `aud` is the one tenant id the token is good for, and a
//! token lives at most [`MAX_TTL_SECS`] seconds.
//!
//! Signing keys rotate (`tenantry-api rotate-token-key`), so a verifier holds a *set* of
//! public keys, read from a file of one or more `PUBLIC KEY` PEM blocks. Every token names
//! its key in the header's `kid` ([`key_id`]); a token whose `kid` is not in the set is
//! refused without trying any key, and a token without `kid` (issued before key ids
//! existed) is tried against each key of the (small) set.
//!
//! Everything here is pure: no IO, no clock (callers pass `now`). Randomness (keys and
//! `jti`) comes from the operating system through `getrandom`.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use jiff::Timestamp;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The `iss` of every instance token.
pub const ISSUER: &str = "tenantry";
/// The only accepted `alg` header value.
pub const ALGORITHM: &str = "EdDSA";
/// The longest a token may live (`exp - iat`), in seconds: 15 minutes.
pub const MAX_TTL_SECS: i64 = 15 * 60;
/// How far the verifier's clock may be behind or ahead of the issuer's, in seconds. A token
/// is still accepted up to this long after its `exp`, and its `iat` may be up to this far
/// in the verifier's future.
pub const CLOCK_SKEW_SECS: i64 = 60;
/// Tokens longer than this are refused without being decoded (a few hundred bytes is
/// typical), so a hostile header cannot make the verifier allocate much.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The most public keys a verifier takes from one set. A rotation publishes two or three;
/// the bound keeps a kid-less token from being tried against an unbounded list.
pub const MAX_KEYS: usize = 16;
/// Bytes of the SHA-256 of a key's `SubjectPublicKeyInfo` that make its [`key_id`]: 96
/// bits, 16 base64url characters.
const KEY_ID_BYTES: usize = 12;

/// The claims of an instance token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceClaims {
    /// Issuer; always [`ISSUER`].
    pub iss: String,
    /// Who the token was issued to (a user id).
    pub sub: String,
    /// The tenant id of the only instance that accepts this token.
    pub aud: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expires at, seconds since the Unix epoch; at most [`MAX_TTL_SECS`] after `iat`.
    pub exp: i64,
    /// Unique token id (a random UUID).
    pub jti: String,
}

/// Why a token could not be issued or was refused. Messages never contain the token, a
/// key, or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, or a part that is not valid base64url / JSON.
    #[error("token is malformed")]
    Malformed,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is too long")]
    TooLong,
    /// The header's `alg` is not `EdDSA`.
    #[error("token algorithm is not allowed (only EdDSA is accepted)")]
    UnsupportedAlgorithm,
    /// The header's `typ` is present and not `JWT`, or it has a `crit` member.
    #[error("token header is not supported")]
    UnsupportedHeader,
    /// The signature does not verify under the configured public key (or, for a token
    /// without `kid`, under any key of the set).
    #[error("token signature is invalid")]
    BadSignature,
    /// The header's `kid` names no key of the verifier's set (a retired key, or another
    /// issuer's). The message names no key id: the caller learns only that it failed.
    #[error("token was signed by a key this instance does not accept")]
    UnknownKey,
    /// The claims are missing a member or have one of the wrong type.
    #[error("token claims are missing or invalid")]
    InvalidClaims,
    /// A required string claim is empty.
    #[error("token claim `{0}` is empty")]
    EmptyClaim(&'static str),
    /// `iss` is not [`ISSUER`].
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` is not this tenant.
    #[error("token is not for this tenant")]
    WrongAudience,
    /// `exp` has passed (beyond the allowed clock skew).
    #[error("token has expired")]
    Expired,
    /// `iat` is in the future (beyond the allowed clock skew).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `exp - iat` is more than [`MAX_TTL_SECS`] (or negative).
    #[error("token lifetime exceeds {MAX_TTL_SECS} seconds")]
    LifetimeTooLong,
    /// [`TokenSigner::issue`] was asked for a lifetime above [`MAX_TTL_SECS`] or of zero.
    #[error("token ttl must be between 1 and {MAX_TTL_SECS} seconds")]
    InvalidTtl,
    /// A PEM key could not be parsed.
    #[error("key is not a valid Ed25519 {0} PEM")]
    InvalidKey(&'static str),
    /// Block `n` (from 1) of a public key set is not an Ed25519 `PUBLIC KEY` PEM, or has no
    /// end line.
    #[error("PEM block {0} of the public key set is not a valid Ed25519 PUBLIC KEY")]
    InvalidKeyInSet(usize),
    /// A public key set holds no `PUBLIC KEY` block.
    #[error("the public key set holds no PUBLIC KEY PEM block")]
    EmptyKeySet,
    /// A public key set holds more than [`MAX_KEYS`] keys.
    #[error("the public key set holds more than {MAX_KEYS} keys")]
    TooManyKeys,
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Randomness,
    /// The claims could not be serialized.
    #[error("token claims could not be encoded")]
    Encode,
}

/// The JOSE header of every token this module makes, for the key `kid` (base64url, so it
/// needs no JSON escaping).
fn header_json(kid: &str) -> String {
    format!(r#"{{"alg":"{ALGORITHM}","typ":"JWT","kid":"{kid}"}}"#)
}

/// DER prefix of a PKCS#8 v1 `PrivateKeyInfo` for Ed25519 (RFC 8410 §7), followed by the
/// 32-byte seed. This is what `openssl genpkey -algorithm ed25519` writes.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of a `SubjectPublicKeyInfo` for Ed25519 (RFC 8410 §4), followed by the
/// 32-byte public key.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The key id of an Ed25519 public key: base64url (unpadded) of the first 12 bytes of the
/// SHA-256 of its `SubjectPublicKeyInfo` DER. Anyone holding the public key computes the
/// same id, so it needs no registry; it is not secret.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(spki_der(key));
    URL_SAFE_NO_PAD.encode(&digest[..KEY_ID_BYTES])
}

/// The `SubjectPublicKeyInfo` DER of an Ed25519 public key.
fn spki_der(key: &VerifyingKey) -> Vec<u8> {
    let mut der = Vec::with_capacity(44);
    der.extend_from_slice(&SPKI_ED25519_PREFIX);
    der.extend_from_slice(key.as_bytes());
    der
}

/// Signs instance tokens. Holds the Ed25519 private key, which is wiped from memory on drop
/// and never shown by `Debug`.
pub struct TokenSigner {
    key: SigningKey,
    /// [`key_id`] of the public half, named in every token's header.
    kid: String,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl TokenSigner {
    /// Makes a new random signing key.
    pub fn generate() -> Result<Self, TokenError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|_| TokenError::Randomness)?;
        Ok(TokenSigner::from_key(SigningKey::from_bytes(&seed)))
    }

    fn from_key(key: SigningKey) -> Self {
        let kid = key_id(&key.verifying_key());
        TokenSigner { key, kid }
    }

    /// The key id ([`key_id`]) every token of this signer names in its header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Loads a key from a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, v1 or v2).
    pub fn from_pkcs8_pem(pem: &SecretString) -> Result<Self, TokenError> {
        let key = SigningKey::from_pkcs8_pem(pem.expose_secret().trim())
            .map_err(|_| TokenError::InvalidKey("PKCS#8 private key"))?;
        Ok(TokenSigner::from_key(key))
    }

    /// The private key as a PKCS#8 v1 PEM, the form [`TokenSigner::from_pkcs8_pem`] and
    /// OpenSSL read.
    pub fn to_pkcs8_pem(&self) -> SecretString {
        let seed = Zeroizing::new(self.key.to_bytes());
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&PKCS8_ED25519_PREFIX);
        der.extend_from_slice(seed.as_slice());
        let pem = Zeroizing::new(pem_encode("PRIVATE KEY", &der));
        SecretString::from(pem.as_str())
    }

    /// The public key as a `SubjectPublicKeyInfo` PEM (`-----BEGIN PUBLIC KEY-----`), the
    /// form [`TokenVerifier::from_public_key_pem`] reads.
    pub fn public_key_pem(&self) -> String {
        pem_encode("PUBLIC KEY", &spki_der(&self.key.verifying_key()))
    }

    /// A verifier for the tokens this signer makes (a set of this one key).
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            keys: vec![(self.kid.clone(), self.key.verifying_key())],
        }
    }

    /// Signs `claims` as a compact JWT whose header names this signer's `kid`. The claims
    /// are signed as given (no checks), so tests and the API can make any token they need;
    /// use [`TokenSigner::issue`] for ordinary tokens.
    pub fn sign(&self, claims: &InstanceClaims) -> Result<String, TokenError> {
        let payload = serde_json::to_vec(claims).map_err(|_| TokenError::Encode)?;
        Ok(self.sign_parts(header_json(&self.kid).as_bytes(), &payload))
    }

    /// Issues a token for `subject` on tenant `tenant_id`, valid from `now` for `ttl`
    /// (truncated to whole seconds; 1 s to 15 min), with a random `jti`.
    pub fn issue(
        &self,
        tenant_id: &str,
        subject: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<(String, InstanceClaims), TokenError> {
        let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| TokenError::InvalidTtl)?;
        if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(TokenError::InvalidTtl);
        }
        if tenant_id.is_empty() {
            return Err(TokenError::EmptyClaim("aud"));
        }
        if subject.is_empty() {
            return Err(TokenError::EmptyClaim("sub"));
        }
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).map_err(|_| TokenError::Randomness)?;
        let jti = uuid::Builder::from_random_bytes(random).into_uuid();
        let iat = now.as_second();
        let claims = InstanceClaims {
            iss: ISSUER.to_owned(),
            sub: subject.to_owned(),
            aud: tenant_id.to_owned(),
            iat,
            exp: iat + ttl_secs,
            jti: jti.to_string(),
        };
        let token = self.sign(&claims)?;
        Ok((token, claims))
    }

    /// Builds `b64(header).b64(payload).b64(sig)` over raw header and payload bytes.
    fn sign_parts(&self, header: &[u8], payload: &[u8]) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let signature: Signature = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        token
    }
}

/// Verifies instance tokens with the issuer's Ed25519 public keys: a set of one or more,
/// each known by its [`key_id`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenVerifier {
    /// `(kid, key)`, in the order of the file, without duplicates; never empty.
    keys: Vec<(String, VerifyingKey)>,
}

const PEM_BEGIN: &str = "-----BEGIN ";
const PEM_DASHES: &str = "-----";
const PUBLIC_KEY_END: &str = "-----END PUBLIC KEY-----";

impl TokenVerifier {
    /// Loads the issuer's public key set: one or more `SubjectPublicKeyInfo` PEM blocks
    /// (`-----BEGIN PUBLIC KEY-----`), one after the other, as the API publishes them. Text
    /// between blocks is ignored (RFC 7468 explanatory text); a block with another label
    /// (a private key pasted by mistake), a block that does not parse, a file without any
    /// block, or more than [`MAX_KEYS`] keys is refused as a whole. A key listed twice
    /// counts once.
    pub fn from_public_key_pem(pem: &str) -> Result<Self, TokenError> {
        let mut keys: Vec<(String, VerifyingKey)> = Vec::new();
        let mut rest = pem;
        let mut block = 0;
        while let Some(start) = rest.find(PEM_BEGIN) {
            block += 1;
            let from_begin = &rest[start..];
            let label = from_begin[PEM_BEGIN.len()..]
                .split_once(PEM_DASHES)
                .map(|(label, _)| label)
                .ok_or(TokenError::InvalidKeyInSet(block))?;
            if label != "PUBLIC KEY" {
                return Err(TokenError::InvalidKeyInSet(block));
            }
            let end = from_begin
                .find(PUBLIC_KEY_END)
                .ok_or(TokenError::InvalidKeyInSet(block))?
                + PUBLIC_KEY_END.len();
            // A block whose BEGIN is followed by another BEGIN before its END fails here.
            let key = VerifyingKey::from_public_key_pem(&from_begin[..end])
                .map_err(|_| TokenError::InvalidKeyInSet(block))?;
            let kid = key_id(&key);
            if !keys.iter().any(|(known, _)| *known == kid) {
                if keys.len() == MAX_KEYS {
                    return Err(TokenError::TooManyKeys);
                }
                keys.push((kid, key));
            }
            rest = &from_begin[end..];
        }
        if keys.is_empty() {
            return Err(TokenError::EmptyKeySet);
        }
        Ok(TokenVerifier { keys })
    }

    /// The key ids of the set, in file order.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|(kid, _)| kid.as_str()).collect()
    }

    /// The set as PEM blocks, one per key in order: what [`Self::from_public_key_pem`]
    /// reads back.
    pub fn to_public_key_pem(&self) -> String {
        self.keys
            .iter()
            .map(|(_, key)| pem_encode("PUBLIC KEY", &spki_der(key)))
            .collect()
    }

    /// Verifies `token` for the tenant `expected_audience` at time `now`, and returns its
    /// claims. Checks, in order: length and shape; header `alg` is exactly `EdDSA` (and
    /// `typ`, if present, is `JWT`; no `crit`; `kid`, if present, a string naming a key of
    /// the set); the signature (strict Ed25519) under the `kid`'s key, or for a token
    /// without `kid` under any key of the set; every claim
    /// present and non-empty; `iss`; `aud`; `exp > now - skew`; `iat <= now + skew`;
    /// `0 <= exp - iat <= 900`. The allowed clock skew is [`CLOCK_SKEW_SECS`] (60 s).
    pub fn verify(
        &self,
        token: &str,
        expected_audience: &str,
        now: Timestamp,
    ) -> Result<InstanceClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };

        let header_bytes = decode_part(header_b64)?;
        // The members the verifier looks at; others are ignored, except `crit`, which names
        // extensions that must be understood (none are), so its presence refuses a token.
        // A map, not a struct of options, so that a member present as `null` is not taken
        // for an absent one.
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed)?;
        match header.get("alg") {
            Some(serde_json::Value::String(alg)) if alg == ALGORITHM => {}
            _ => return Err(TokenError::UnsupportedAlgorithm),
        }
        match header.get("typ") {
            None => {}
            Some(serde_json::Value::String(typ)) if typ.eq_ignore_ascii_case("JWT") => {}
            Some(_) => return Err(TokenError::UnsupportedHeader),
        }
        if header.contains_key("crit") {
            return Err(TokenError::UnsupportedHeader);
        }
        let named = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(kid)) => Some(
                self.keys
                    .iter()
                    .find(|(known, _)| known == kid)
                    .map(|(_, key)| key)
                    .ok_or(TokenError::UnknownKey)?,
            ),
            Some(_) => return Err(TokenError::UnsupportedHeader),
        };

        let signature_bytes = decode_part(signature_b64)?;
        let signature =
            Signature::from_slice(&signature_bytes).map_err(|_| TokenError::BadSignature)?;
        let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        let verifies = |key: &VerifyingKey| key.verify_strict(signed, &signature).is_ok();
        let authentic = match named {
            Some(key) => verifies(key),
            // Issued before tokens named their key: whichever key of the set signed it.
            None => self.keys.iter().any(|(_, key)| verifies(key)),
        };
        if !authentic {
            return Err(TokenError::BadSignature);
        }

        let payload = decode_part(payload_b64)?;
        let claims: InstanceClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::InvalidClaims)?;
        check_claims(&claims, expected_audience, now.as_second())?;
        Ok(claims)
    }
}

/// The claim rules of [`TokenVerifier::verify`], on already-authentic claims.
fn check_claims(
    claims: &InstanceClaims,
    expected_audience: &str,
    now: i64,
) -> Result<(), TokenError> {
    for (name, value) in [
        ("iss", &claims.iss),
        ("sub", &claims.sub),
        ("aud", &claims.aud),
        ("jti", &claims.jti),
    ] {
        if value.is_empty() {
            return Err(TokenError::EmptyClaim(name));
        }
    }
    if claims.iss != ISSUER {
        return Err(TokenError::WrongIssuer);
    }
    if expected_audience.is_empty() || claims.aud != expected_audience {
        return Err(TokenError::WrongAudience);
    }
    if claims.exp <= now.saturating_sub(CLOCK_SKEW_SECS) {
        return Err(TokenError::Expired);
    }
    if claims.iat > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(TokenError::NotYetValid);
    }
    let lifetime = claims
        .exp
        .checked_sub(claims.iat)
        .ok_or(TokenError::LifetimeTooLong)?;
    if !(0..=MAX_TTL_SECS).contains(&lifetime) {
        return Err(TokenError::LifetimeTooLong);
    }
    Ok(())
}

fn decode_part(part: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)
}

/// PEM-encodes `der` under `label`, 64 base64 characters a line (RFC 7468).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = Zeroizing::new(STANDARD.encode(der));
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    pem.push_str("-----BEGIN ");
    pem.push_str(label);
    pem.push_str("-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END ");
    pem.push_str(label);
    pem.push_str("-----\n");
    pem
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const TENANT: &str = "acme";

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn signer() -> TokenSigner {
        TokenSigner::generate().unwrap()
    }

    fn claims_at(iat: i64, ttl: i64) -> InstanceClaims {
        InstanceClaims {
            iss: ISSUER.into(),
            sub: "user-1".into(),
            aud: TENANT.into(),
            iat,
            exp: iat + ttl,
            jti: "0b3c7a0e-54f4-4b8e-9a43-2f4c6f3d1c11".into(),
        }
    }

    /// Re-signs arbitrary header/payload JSON with a real key, to test header rules.
    fn forge(signer: &TokenSigner, header: &str, payload: &str) -> String {
        signer.sign_parts(header.as_bytes(), payload.as_bytes())
    }

    #[test]
    fn issued_token_round_trips_through_pem_keys() {
        let signer = signer();
        let (token, claims) = signer
            .issue(TENANT, "user-1", now(), Duration::from_secs(600))
            .unwrap();
        assert_eq!(claims.exp - claims.iat, 600);
        assert_eq!(claims.iss, ISSUER);
        assert!(uuid::Uuid::parse_str(&claims.jti).is_ok());

        let verifier = TokenVerifier::from_public_key_pem(&signer.public_key_pem()).unwrap();
        assert_eq!(verifier.verify(&token, TENANT, now()).unwrap(), claims);

        // The private key survives a PEM round trip and signs verifiable tokens.
        let pem = signer.to_pkcs8_pem();
        assert!(
            pem.expose_secret()
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );
        let reloaded = TokenSigner::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(reloaded.public_key_pem(), signer.public_key_pem());
        let (token2, _) = reloaded
            .issue(TENANT, "user-2", now(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            verifier.verify(&token2, TENANT, now()).unwrap().sub,
            "user-2"
        );
    }

    #[test]
    fn hand_built_pem_matches_the_pkcs8_and_spki_encoders() {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        let signer = signer();
        let spki = signer.key.verifying_key().to_public_key_der().unwrap();
        let pem = signer.public_key_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(STANDARD.decode(body).unwrap(), spki.as_bytes());
        // The encoder writes v2 (with the public key); ours is v1; both load to the same key.
        let v2 = signer.key.to_pkcs8_der().unwrap();
        let from_v2 = SigningKey::from_pkcs8_der(v2.as_bytes()).unwrap();
        assert_eq!(from_v2.to_bytes(), signer.key.to_bytes());
    }

    #[test]
    fn wrong_audience_is_refused() {
        let signer = signer();
        let (token, _) = signer
            .issue("other-tenant", "user-1", now(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            signer.verifier().verify(&token, TENANT, now()),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            signer.verifier().verify(&token, "", now()),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn expiry_allows_exactly_the_clock_skew() {
        let signer = signer();
        let (token, claims) = signer
            .issue(TENANT, "user-1", now(), Duration::from_secs(300))
            .unwrap();
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        let v = signer.verifier();
        assert!(
            v.verify(&token, TENANT, at(claims.exp + CLOCK_SKEW_SECS - 1))
                .is_ok()
        );
        assert_eq!(
            v.verify(&token, TENANT, at(claims.exp + CLOCK_SKEW_SECS)),
            Err(TokenError::Expired)
        );
        // Issued in the future beyond the skew.
        assert!(
            v.verify(&token, TENANT, at(claims.iat - CLOCK_SKEW_SECS))
                .is_ok()
        );
        assert_eq!(
            v.verify(&token, TENANT, at(claims.iat - CLOCK_SKEW_SECS - 1)),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let signer = signer();
        let (token, _) = signer
            .issue("other", "user-1", now(), Duration::from_secs(60))
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["aud"] = TENANT.into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
        assert_eq!(
            signer.verifier().verify(&tampered, TENANT, now()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_or_foreign_signature_is_refused() {
        let signer = signer();
        let (token, _) = signer
            .issue(TENANT, "user-1", now(), Duration::from_secs(60))
            .unwrap();
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig_bytes[10] ^= 0x01;
        let flipped = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes));
        assert_eq!(
            signer.verifier().verify(&flipped, TENANT, now()),
            Err(TokenError::BadSignature)
        );
        let truncated = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes[..63]));
        assert_eq!(
            signer.verifier().verify(&truncated, TENANT, now()),
            Err(TokenError::BadSignature)
        );
        // Signed by some other key: its kid is not the verifier's.
        let other = TokenSigner::generate().unwrap();
        assert_eq!(
            other.verifier().verify(&token, TENANT, now()),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn only_eddsa_headers_are_accepted() {
        let signer = signer();
        let payload = serde_json::to_string(&claims_at(now().as_second(), 60)).unwrap();
        let v = signer.verifier();
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"eddsa"}"#,
            r#"{"alg":["EdDSA"]}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            assert_eq!(
                v.verify(&forge(&signer, header, &payload), TENANT, now()),
                Err(TokenError::UnsupportedAlgorithm),
                "{header}"
            );
        }
        // `alg: none` with an empty signature, the classic downgrade.
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(&payload)
        );
        assert_eq!(
            v.verify(&unsigned, TENANT, now()),
            Err(TokenError::UnsupportedAlgorithm)
        );
        for header in [
            r#"{"alg":"EdDSA","typ":"JWE"}"#,
            r#"{"alg":"EdDSA","crit":["b64"]}"#,
        ] {
            assert_eq!(
                v.verify(&forge(&signer, header, &payload), TENANT, now()),
                Err(TokenError::UnsupportedHeader),
                "{header}"
            );
        }
        // `typ` is optional.
        assert!(
            v.verify(
                &forge(&signer, r#"{"alg":"EdDSA"}"#, &payload),
                TENANT,
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn missing_or_empty_claims_are_refused() {
        let signer = signer();
        let v = signer.verifier();
        let full = serde_json::to_value(claims_at(now().as_second(), 60)).unwrap();
        for name in ["iss", "sub", "aud", "iat", "exp", "jti"] {
            let mut claims = full.clone();
            claims.as_object_mut().unwrap().remove(name);
            let token = forge(&signer, &header_json(signer.kid()), &claims.to_string());
            assert_eq!(
                v.verify(&token, TENANT, now()),
                Err(TokenError::InvalidClaims),
                "{name}"
            );
        }
        for name in ["sub", "jti"] {
            let mut claims = full.clone();
            claims[name] = "".into();
            let token = forge(&signer, &header_json(signer.kid()), &claims.to_string());
            assert_eq!(
                v.verify(&token, TENANT, now()),
                Err(TokenError::EmptyClaim(name))
            );
        }
        let mut wrong_iss = claims_at(now().as_second(), 60);
        wrong_iss.iss = "someone-else".into();
        assert_eq!(
            v.verify(&signer.sign(&wrong_iss).unwrap(), TENANT, now()),
            Err(TokenError::WrongIssuer)
        );
        for junk in ["", "a.b", "a.b.c.d", "!!!.###.$$$", "e30.e30.e30"] {
            assert!(v.verify(junk, TENANT, now()).is_err(), "{junk}");
        }
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_LEN + 1), TENANT, now()),
            Err(TokenError::TooLong)
        );
    }

    #[test]
    fn lifetimes_over_fifteen_minutes_are_refused() {
        let signer = signer();
        assert_eq!(
            signer
                .issue(TENANT, "user-1", now(), Duration::from_secs(901))
                .map(|_| ()),
            Err(TokenError::InvalidTtl)
        );
        assert_eq!(
            signer
                .issue(TENANT, "user-1", now(), Duration::ZERO)
                .map(|_| ()),
            Err(TokenError::InvalidTtl)
        );
        assert!(
            signer
                .issue(TENANT, "user-1", now(), Duration::from_secs(900))
                .is_ok()
        );
        // A signer that ignores the rule still cannot get a long-lived token accepted.
        let long = signer.sign(&claims_at(now().as_second(), 3600)).unwrap();
        assert_eq!(
            signer.verifier().verify(&long, TENANT, now()),
            Err(TokenError::LifetimeTooLong)
        );
        let backwards = signer.sign(&claims_at(now().as_second(), -10)).unwrap();
        assert!(signer.verifier().verify(&backwards, TENANT, now()).is_err());
    }

    /// The header of tokens issued before key ids existed.
    const LEGACY_HEADER_JSON: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

    fn header_of(token: &str) -> serde_json::Value {
        let head = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap()
    }

    fn set_of(signers: &[&TokenSigner]) -> TokenVerifier {
        let pem: String = signers.iter().map(|s| s.public_key_pem()).collect();
        TokenVerifier::from_public_key_pem(&pem).unwrap()
    }

    #[test]
    fn tokens_name_their_key_by_a_stable_id() {
        let signer = signer();
        let (token, _) = signer
            .issue(TENANT, "user-1", now(), Duration::from_secs(60))
            .unwrap();
        let header = header_of(&token);
        assert_eq!(header["alg"], ALGORITHM);
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], signer.kid());
        // 12 bytes of SHA-256 over the SPKI DER, base64url: recomputable from the PEM alone.
        assert_eq!(signer.kid().len(), 16);
        let pem = signer.public_key_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let spki = STANDARD.decode(body).unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(&Sha256::digest(&spki)[..12]),
            signer.kid()
        );
        assert_eq!(
            TokenVerifier::from_public_key_pem(&pem).unwrap().kids(),
            [signer.kid()]
        );
        let reloaded = TokenSigner::from_pkcs8_pem(&signer.to_pkcs8_pem()).unwrap();
        assert_eq!(reloaded.kid(), signer.kid());
        assert_ne!(TokenSigner::generate().unwrap().kid(), signer.kid());
    }

    #[test]
    fn a_key_set_accepts_tokens_of_each_of_its_keys() {
        let (old, new, outsider) = (signer(), signer(), signer());
        let set = set_of(&[&old, &new]);
        assert_eq!(set.kids(), [old.kid(), new.kid()]);
        for s in [&old, &new] {
            let (token, claims) = s
                .issue(TENANT, "user-1", now(), Duration::from_secs(60))
                .unwrap();
            assert_eq!(set.verify(&token, TENANT, now()).unwrap(), claims);
        }
        // A key outside the set: refused by its kid before any signature check.
        let (token, _) = outsider
            .issue(TENANT, "user-1", now(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            set.verify(&token, TENANT, now()),
            Err(TokenError::UnknownKey)
        );
        let err = TokenError::UnknownKey.to_string();
        assert!(!err.contains(outsider.kid()), "{err}");
        // Once the old key leaves the set, its tokens are refused.
        let (old_token, _) = old
            .issue(TENANT, "user-1", now(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            set_of(&[&new]).verify(&old_token, TENANT, now()),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_kid_is_checked_against_its_own_key_only() {
        let (a, b) = (signer(), signer());
        let set = set_of(&[&a, &b]);
        let payload = serde_json::to_string(&claims_at(now().as_second(), 60)).unwrap();
        // Signed by `a` but claiming to be `b`'s: the signature is checked under b only.
        let lying = forge(&a, &header_json(b.kid()), &payload);
        assert_eq!(
            set.verify(&lying, TENANT, now()),
            Err(TokenError::BadSignature)
        );
        for header in [
            r#"{"alg":"EdDSA","kid":7}"#,
            r#"{"alg":"EdDSA","kid":null}"#,
            r#"{"alg":"EdDSA","kid":["x"]}"#,
        ] {
            assert_eq!(
                set.verify(&forge(&a, header, &payload), TENANT, now()),
                Err(TokenError::UnsupportedHeader),
                "{header}"
            );
        }
        // The pinned algorithm is still checked first, whatever the kid.
        let hs = forge(
            &a,
            &format!(r#"{{"alg":"HS256","kid":"{}"}}"#, a.kid()),
            &payload,
        );
        assert_eq!(
            set.verify(&hs, TENANT, now()),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn tokens_without_kid_are_tried_against_every_key_of_the_set() {
        let (old, new) = (signer(), signer());
        let payload = serde_json::to_string(&claims_at(now().as_second(), 60)).unwrap();
        let legacy = forge(&old, LEGACY_HEADER_JSON, &payload);
        assert!(set_of(&[&new, &old]).verify(&legacy, TENANT, now()).is_ok());
        assert!(set_of(&[&old]).verify(&legacy, TENANT, now()).is_ok());
        assert_eq!(
            set_of(&[&new]).verify(&legacy, TENANT, now()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn public_key_sets_parse_every_block_and_refuse_bad_ones() {
        let (a, b) = (signer(), signer());
        let (pa, pb) = (a.public_key_pem(), b.public_key_pem());
        // Text around and between blocks is ignored; duplicates count once.
        let text = format!(
            "# published by tenantry-api\n{pa}\nkid {}\n{pb}{pa}",
            b.kid()
        );
        let set = TokenVerifier::from_public_key_pem(&text).unwrap();
        assert_eq!(set.kids(), [a.kid(), b.kid()]);
        assert_eq!(set.to_public_key_pem(), format!("{pa}{pb}"));
        assert_eq!(
            TokenVerifier::from_public_key_pem(&set.to_public_key_pem()).unwrap(),
            set
        );

        let private = a.to_pkcs8_pem();
        let truncated = &pb[..pb.len() - 10];
        let corrupted = pb.replacen("MCow", "MCox", 1);
        for (text, err) in [
            (String::new(), TokenError::EmptyKeySet),
            ("no keys here\n".to_owned(), TokenError::EmptyKeySet),
            (
                format!("{pa}{}", private.expose_secret()),
                TokenError::InvalidKeyInSet(2),
            ),
            (format!("{pa}{truncated}"), TokenError::InvalidKeyInSet(2)),
            (format!("{truncated}{pa}"), TokenError::InvalidKeyInSet(1)),
            (format!("{corrupted}{pa}"), TokenError::InvalidKeyInSet(1)),
            (
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_owned(),
                TokenError::InvalidKeyInSet(1),
            ),
        ] {
            assert_eq!(TokenVerifier::from_public_key_pem(&text), Err(err.clone()));
            // No error message repeats key material.
            assert!(!err.to_string().contains("MC"), "{err}");
        }
        let many: String = (0..=MAX_KEYS).map(|_| signer().public_key_pem()).collect();
        assert_eq!(
            TokenVerifier::from_public_key_pem(&many),
            Err(TokenError::TooManyKeys)
        );
    }

    #[test]
    fn debug_and_errors_never_show_key_or_token() {
        let signer = signer();
        let pem = signer.to_pkcs8_pem();
        let debug = format!("{signer:?}");
        assert!(debug.contains("REDACTED"));
        let seed_b64 = STANDARD.encode(signer.key.to_bytes());
        assert!(!debug.contains(&seed_b64));
        assert!(!format!("{pem:?}").contains("PRIVATE KEY"));
        let (token, _) = signer
            .issue("x", "user-1", now(), Duration::from_secs(60))
            .unwrap();
        let err = signer.verifier().verify(&token, TENANT, now()).unwrap_err();
        assert!(!err.to_string().contains(&token[..20]));
        assert!(TokenSigner::from_pkcs8_pem(&SecretString::from("nope")).is_err());
        assert!(TokenVerifier::from_public_key_pem("nope").is_err());
    }
}
