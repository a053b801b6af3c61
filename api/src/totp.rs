//! TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps) and recovery codes.
//!
//! The code of a step comes from the `totp-rs` crate. What this module adds is the policy
//! around it: every candidate step is compared in constant time, and a code is accepted
//! only for a step later than the last one used (RFC 6238 §5.2), which the caller stores;
//! the crate leaves both to its users. Pure functions: the caller supplies the time.

use secrecy::{ExposeSecret, SecretBox, SecretString};
use totp_rs::{Algorithm, Builder, Secret};

use crate::crypto::{ct_eq, random_bytes};
use crate::error::Error;

/// Seconds per TOTP step.
pub const STEP_SECONDS: i64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Steps either side of now that are accepted (clock drift between phone and server).
pub const SKEW_STEPS: i64 = 1;
/// Secret length: 160 bits, as RFC 4226 recommends for HMAC-SHA-1.
pub const SECRET_LEN: usize = 20;
/// Recovery codes made at enrollment.
pub const RECOVERY_CODES: usize = 10;

/// A new random TOTP secret.
pub fn generate_secret() -> Result<SecretBox<[u8; SECRET_LEN]>, Error> {
    Ok(SecretBox::new(Box::new(random_bytes::<SECRET_LEN>()?)))
}

/// The secret as unpadded base32, as authenticator apps expect it.
pub fn secret_base32(secret: &[u8]) -> SecretString {
    SecretString::from(data_encoding::BASE32_NOPAD.encode(secret))
}

/// The step that contains `unix_seconds`.
pub fn step_at(unix_seconds: i64) -> i64 {
    unix_seconds.div_euclid(STEP_SECONDS)
}

/// The code for one step.
pub fn code_at_step(secret: &[u8], step: i64) -> Result<u32, Error> {
    let totp = Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_step_duration(STEP_SECONDS as u64)
        .with_secret(Secret::new(secret.into()))
        .build()
        .map_err(|_| Error::Crypto("TOTP secret is shorter than 128 bits"))?;
    let start = u64::try_from(step)
        .ok()
        .and_then(|s| s.checked_mul(STEP_SECONDS as u64))
        .ok_or(Error::Crypto("TOTP step out of range"))?;
    totp.generate(start)
        .to_string()
        .parse()
        .map_err(|_| Error::Crypto("TOTP code is not a number"))
}

/// The code for one step as the 6 zero-padded digits a user types.
pub fn format_code(code: u32) -> String {
    format!("{code:06}")
}

/// Checks `code` against the steps around `unix_seconds`. Returns the matching step when
/// it is later than `last_used_step` (so a code, or an older one, is never accepted twice).
/// All candidate steps are compared, in constant time, whatever matches.
pub fn verify(
    secret: &[u8],
    code: &str,
    unix_seconds: i64,
    last_used_step: i64,
) -> Result<Option<i64>, Error> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let now = step_at(unix_seconds);
    let mut found = None;
    for step in (now - SKEW_STEPS)..=(now + SKEW_STEPS) {
        let expected = format_code(code_at_step(secret, step)?);
        if ct_eq(expected.as_bytes(), code.as_bytes()) && step > last_used_step && found.is_none() {
            found = Some(step);
        }
    }
    Ok(found)
}

/// The `otpauth://` URI for QR codes (Google Authenticator key URI format).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> SecretString {
    let issuer_enc = percent_encode(issuer);
    SecretString::from(format!(
        "otpauth://totp/{issuer_enc}:{account}?secret={secret}&issuer={issuer_enc}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        account = percent_encode(account),
        secret = secret_base32(secret).expose_secret(),
    ))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const RECOVERY_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Ten new recovery codes like `k3jd-82mq-zp4x` (60 random bits each).
pub fn generate_recovery_codes() -> Result<Vec<SecretString>, Error> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let bytes = random_bytes::<12>()?;
            let chars: Vec<char> = bytes
                .iter()
                .map(|b| char::from(RECOVERY_ALPHABET[usize::from(b & 31)]))
                .collect();
            let groups: Vec<String> = chars.chunks(4).map(|c| c.iter().collect()).collect();
            Ok(SecretString::from(groups.join("-")))
        })
        .collect()
}

/// The canonical form of a typed recovery code: lowercase, without separators or spaces.
pub fn normalize_recovery_code(code: &str) -> String {
    code.chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 secret "12345678901234567890" (8-digit values, we use the
    /// last 6 digits).
    #[test]
    fn rfc6238_test_vectors() {
        let secret = b"12345678901234567890";
        for (t, expected8) in [
            (59_i64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            let code = format_code(code_at_step(secret, step_at(t)).unwrap());
            assert_eq!(code, expected8[2..], "t={t}");
        }
    }

    #[test]
    fn accepts_one_step_of_drift_and_not_more() {
        let secret = [7u8; 20];
        let now = 1_700_000_000;
        let step = step_at(now);
        for (delta, ok) in [(-2, false), (-1, true), (0, true), (1, true), (2, false)] {
            let code = format_code(code_at_step(&secret, step + delta).unwrap());
            assert_eq!(
                verify(&secret, &code, now, 0).unwrap().is_some(),
                ok,
                "delta {delta}"
            );
        }
    }

    #[test]
    fn a_code_is_accepted_once() {
        let secret = [9u8; 20];
        let now = 1_700_000_000;
        let code = format_code(code_at_step(&secret, step_at(now)).unwrap());
        let used = verify(&secret, &code, now, 0).unwrap().unwrap();
        assert_eq!(verify(&secret, &code, now, used).unwrap(), None);
        // An older (still in-window) code is refused once a newer one was used.
        let older = format_code(code_at_step(&secret, step_at(now) - 1).unwrap());
        assert_eq!(verify(&secret, &older, now, used).unwrap(), None);
    }

    #[test]
    fn malformed_codes_are_refused() {
        let secret = [1u8; 20];
        for code in ["", "12345", "1234567", "12a456", "١٢٣٤٥٦"] {
            assert_eq!(
                verify(&secret, code, 1_700_000_000, 0).unwrap(),
                None,
                "{code}"
            );
        }
    }

    #[test]
    fn otpauth_uri_is_what_authenticators_expect() {
        let uri = otpauth_uri("Tenantry", "alice@example.com", b"12345678901234567890");
        assert_eq!(
            uri.expose_secret(),
            "otpauth://totp/Tenantry:alice%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Tenantry&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn recovery_codes_are_ten_distinct_and_normalize() {
        let codes = generate_recovery_codes().unwrap();
        assert_eq!(codes.len(), 10);
        let mut seen: Vec<String> = codes.iter().map(|c| c.expose_secret().to_owned()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[0].len(), 14);
        assert_eq!(normalize_recovery_code(" AbCd-EfGh-2345 "), "abcdefgh2345");
    }
}
