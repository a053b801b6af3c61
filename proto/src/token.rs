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
    /// The signature does not verify under the configured public key.
    #[error("token signature is invalid")]
    BadSignature,
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
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Randomness,
    /// The claims could not be serialized.
    #[error("token claims could not be encoded")]
    Encode,
}

/// The JOSE header of every token this module makes.
const HEADER_JSON: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

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

/// Signs instance tokens. Holds the Ed25519 private key, which is wiped from memory on drop
/// and never shown by `Debug`.
pub struct TokenSigner {
    key: SigningKey,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key", &"[REDACTED]")
            .finish()
    }
}

impl TokenSigner {
    /// Makes a new random signing key.
    pub fn generate() -> Result<Self, TokenError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).map_err(|_| TokenError::Randomness)?;
        Ok(TokenSigner {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Loads a key from a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, v1 or v2).
    pub fn from_pkcs8_pem(pem: &SecretString) -> Result<Self, TokenError> {
        let key = SigningKey::from_pkcs8_pem(pem.expose_secret().trim())
            .map_err(|_| TokenError::InvalidKey("PKCS#8 private key"))?;
        Ok(TokenSigner { key })
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
        let mut der = Vec::with_capacity(44);
        der.extend_from_slice(&SPKI_ED25519_PREFIX);
        der.extend_from_slice(self.key.verifying_key().as_bytes());
        pem_encode("PUBLIC KEY", &der)
    }

    /// A verifier for the tokens this signer makes.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            key: self.key.verifying_key(),
        }
    }

    /// Signs `claims` as a compact JWT. The claims are signed as given (no checks), so
    /// tests and the API can make any token they need; use [`TokenSigner::issue`] for
    /// ordinary tokens.
    pub fn sign(&self, claims: &InstanceClaims) -> Result<String, TokenError> {
        let payload = serde_json::to_vec(claims).map_err(|_| TokenError::Encode)?;
        Ok(self.sign_parts(HEADER_JSON.as_bytes(), &payload))
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

/// Verifies instance tokens with the issuer's Ed25519 public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenVerifier {
    key: VerifyingKey,
}

/// The header members the verifier looks at; others are ignored, except `crit`, which
/// names extensions that must be understood (none are), so its presence refuses a token.
#[derive(Deserialize)]
struct Header {
    alg: Option<serde_json::Value>,
    typ: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

impl TokenVerifier {
    /// Loads the issuer's public key from a `SubjectPublicKeyInfo` PEM
    /// (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_public_key_pem(pem: &str) -> Result<Self, TokenError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|_| TokenError::InvalidKey("public key"))?;
        Ok(TokenVerifier { key })
    }

    /// Verifies `token` for the tenant `expected_audience` at time `now`, and returns its
    /// claims. Checks, in order: length and shape; header `alg` is exactly `EdDSA` (and
    /// `typ`, if present, is `JWT`; no `crit`); the signature (strict Ed25519); every claim
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
        let header: Header =
            serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed)?;
        match header.alg {
            Some(serde_json::Value::String(alg)) if alg == ALGORITHM => {}
            _ => return Err(TokenError::UnsupportedAlgorithm),
        }
        match header.typ {
            None => {}
            Some(serde_json::Value::String(typ)) if typ.eq_ignore_ascii_case("JWT") => {}
            Some(_) => return Err(TokenError::UnsupportedHeader),
        }
        if header.crit.is_some() {
            return Err(TokenError::UnsupportedHeader);
        }

        let signature_bytes = decode_part(signature_b64)?;
        let signature =
            Signature::from_slice(&signature_bytes).map_err(|_| TokenError::BadSignature)?;
        let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
        self.key
            .verify_strict(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;

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
        // Signed by some other key.
        let other = TokenSigner::generate().unwrap();
        assert_eq!(
            other.verifier().verify(&token, TENANT, now()),
            Err(TokenError::BadSignature)
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
            let token = forge(&signer, HEADER_JSON, &claims.to_string());
            assert_eq!(
                v.verify(&token, TENANT, now()),
                Err(TokenError::InvalidClaims),
                "{name}"
            );
        }
        for name in ["sub", "jti"] {
            let mut claims = full.clone();
            claims[name] = "".into();
            let token = forge(&signer, HEADER_JSON, &claims.to_string());
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
