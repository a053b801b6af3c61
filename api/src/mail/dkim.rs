//! DKIM (RFC 6376) signing with relaxed/relaxed canonicalization, pure: a key, a formatted
//! message and the time in, the message with its `DKIM-Signature` header out.
//!
//! Two key kinds: Ed25519 (`ed25519-sha256`, RFC 8463; what `tenantry-api keygen --dkim`
//! makes) and RSA of 2048 bits or more (`rsa-sha256`; made with OpenSSL, see
//! `docs/operations.md`), both as PKCS#8 PEM. RSA signing is ring's (constant time); the
//! `rsa` crate that lettre's own `dkim` feature would bring has an unfixed timing advisory,
//! and its Ed25519 and SHA-2 versions would duplicate the workspace's.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

/// The headers every signature covers, in `h=` order: the ones the issue names, and the two
/// that say how the body is to be read.
pub const SIGNED_HEADERS: [&str; 7] = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
];

/// What can be wrong with a DKIM key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not a PEM `PRIVATE KEY` (PKCS#8).
    #[error("the DKIM key is not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----)")]
    NotPkcs8,
    /// PKCS#8 of neither supported kind.
    #[error("the DKIM key is neither Ed25519 nor RSA")]
    UnsupportedKind,
    /// An RSA key below 2048 bits.
    #[error("the DKIM RSA key has {0} bits; at least 2048 are required")]
    RsaTooShort(usize),
}

/// A private DKIM key; never printed.
pub enum DkimKey {
    /// Ed25519.
    Ed25519(ed25519_dalek::SigningKey),
    /// RSA, 2048 bits or more.
    Rsa(ring::rsa::KeyPair),
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DkimKey::Ed25519(_) => "DkimKey::Ed25519(..)",
            DkimKey::Rsa(_) => "DkimKey::Rsa(..)",
        })
    }
}

/// `-----BEGIN PRIVATE KEY-----` … `-----END PRIVATE KEY-----` → DER.
fn pem_private_key_der(pem: &str) -> Option<Zeroizing<Vec<u8>>> {
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PRIVATE KEY-----")?
        .trim_end()
        .strip_suffix("-----END PRIVATE KEY-----")?;
    let b64: Zeroizing<String> = Zeroizing::new(body.split_whitespace().collect());
    STANDARD.decode(b64.as_bytes()).ok().map(Zeroizing::new)
}

impl DkimKey {
    /// Reads a PKCS#8 PEM private key (Ed25519, or RSA of 2048 bits or more).
    pub fn from_pkcs8_pem(pem: &SecretString) -> Result<DkimKey, KeyError> {
        let der = pem_private_key_der(pem.expose_secret()).ok_or(KeyError::NotPkcs8)?;
        if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_der(&der) {
            return Ok(DkimKey::Ed25519(key));
        }
        match ring::rsa::KeyPair::from_pkcs8(&der) {
            Ok(key) => {
                let bits = key.public().modulus_len() * 8;
                if bits < 2048 {
                    return Err(KeyError::RsaTooShort(bits));
                }
                Ok(DkimKey::Rsa(key))
            }
            Err(_) => Err(KeyError::UnsupportedKind),
        }
    }

    /// A new Ed25519 key.
    pub fn generate_ed25519() -> Result<DkimKey, getrandom::Error> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice())?;
        Ok(DkimKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(
            &seed,
        )))
    }

    /// The key as PKCS#8 PEM (what [`DkimKey::from_pkcs8_pem`] and OpenSSL read); only for
    /// Ed25519 keys, the kind this program makes.
    pub fn ed25519_pkcs8_pem(&self) -> Option<SecretString> {
        // RFC 8410 PrivateKeyInfo for Ed25519: the fixed prefix, then the 32-byte seed.
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let DkimKey::Ed25519(key) = self else {
            return None;
        };
        let mut der = Zeroizing::new(PREFIX.to_vec());
        der.extend_from_slice(&key.to_bytes());
        let b64 = Zeroizing::new(STANDARD.encode(der.as_slice()));
        let mut pem = Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Some(SecretString::from(pem.as_str()))
    }

    /// The `k=` tag of the DNS record.
    pub fn dns_kind(&self) -> &'static str {
        match self {
            DkimKey::Ed25519(_) => "ed25519",
            DkimKey::Rsa(_) => "rsa",
        }
    }

    /// The `a=` tag of a signature.
    pub fn algorithm(&self) -> &'static str {
        match self {
            DkimKey::Ed25519(_) => "ed25519-sha256",
            DkimKey::Rsa(_) => "rsa-sha256",
        }
    }

    /// The `p=` tag of the DNS record: base64 of the raw 32-byte key for Ed25519 (RFC 8463),
    /// of the `SubjectPublicKeyInfo` DER for RSA (what `openssl rsa -pubout` prints).
    pub fn public_key_base64(&self) -> String {
        match self {
            DkimKey::Ed25519(key) => STANDARD.encode(key.verifying_key().as_bytes()),
            DkimKey::Rsa(key) => STANDARD.encode(rsa_spki(key.public().as_ref())),
        }
    }

    /// The DKIM TXT record's text: `v=DKIM1; k=…; p=…`.
    pub fn dns_record(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.dns_kind(),
            self.public_key_base64()
        )
    }

    fn sign_bytes(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        match self {
            // RFC 8463: PureEdDSA over the SHA-256 of the data.
            DkimKey::Ed25519(key) => Ok(key.sign(&Sha256::digest(data)).to_bytes().to_vec()),
            DkimKey::Rsa(key) => {
                let mut sig = vec![0u8; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &ring::rand::SystemRandom::new(),
                    data,
                    &mut sig,
                )
                .map_err(|_| SignError::Rsa)?;
                Ok(sig)
            }
        }
    }
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

/// Wraps a PKCS#1 `RSAPublicKey` into a `SubjectPublicKeyInfo` (rsaEncryption, NULL).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bit_string);
    bit_string.push(0);
    bit_string.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALGORITHM.len() + bit_string.len(), &mut out);
    out.extend_from_slice(&ALGORITHM);
    out.extend_from_slice(&bit_string);
    out
}

/// What can go wrong while signing.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The message has no blank line between header and body.
    #[error("the message has no header/body separator")]
    NoSeparator,
    /// A signed header is missing.
    #[error("the message has no {0} header")]
    MissingHeader(&'static str),
    /// ring refused to sign.
    #[error("RSA signing failed")]
    Rsa,
}

/// Who signs: the key, the domain (`d=`) and the selector (`s=`).
#[derive(Debug)]
pub struct DkimSigner {
    /// The private key.
    pub key: DkimKey,
    /// The signing domain, the domain of the From address.
    pub domain: String,
    /// The selector under `_domainkey.<domain>`.
    pub selector: String,
}

impl DkimSigner {
    /// `message` (CRLF line ends, header, blank line, body) with a `DKIM-Signature` header in
    /// front, signed at `unix_seconds`.
    pub fn sign(&self, message: &[u8], unix_seconds: i64) -> Result<Vec<u8>, SignError> {
        let split = find(message, b"\r\n\r\n").ok_or(SignError::NoSeparator)?;
        let header = &message[..split + 2];
        let body = &message[split + 4..];
        let body_hash = STANDARD.encode(Sha256::digest(relaxed_body(body)));
        let fields = header_fields(header);
        let mut signed = Vec::new();
        for name in SIGNED_HEADERS {
            // The last instance of a name is the one a verifier takes first (RFC 6376 5.4.2).
            let field = fields
                .iter()
                .rev()
                .find(|f| field_name(f).eq_ignore_ascii_case(name))
                .ok_or(SignError::MissingHeader(name))?;
            signed.extend_from_slice(&relaxed_header(field));
        }
        let unsigned = format!(
            "DKIM-Signature: v=1; a={}; c=relaxed/relaxed; d={}; s={};\r\n\tt={}; h={};\r\n\tbh={};\r\n\tb=",
            self.key.algorithm(),
            self.domain,
            self.selector,
            unix_seconds,
            SIGNED_HEADERS.join(":"),
            body_hash,
        );
        // The signature header itself is hashed last, canonicalized, without its CRLF.
        let mut own = relaxed_header(unsigned.as_bytes());
        own.truncate(own.len() - 2);
        signed.extend_from_slice(&own);
        let signature = STANDARD.encode(self.key.sign_bytes(&signed)?);
        let mut out = Vec::with_capacity(unsigned.len() + signature.len() + 2 + message.len());
        out.extend_from_slice(unsigned.as_bytes());
        out.extend_from_slice(signature.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(message);
        Ok(out)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The header's fields, each with its folded continuation lines and final CRLF.
fn header_fields(header: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < header.len() {
        if header[i] == b'\r' && header[i + 1] == b'\n' {
            let next = header.get(i + 2);
            if !matches!(next, Some(b' ' | b'\t')) {
                fields.push(&header[start..i + 2]);
                start = i + 2;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    fields
}

fn field_name(field: &[u8]) -> &str {
    let end = field.iter().position(|b| *b == b':').unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).unwrap_or("").trim()
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 6376 3.4.2: lowercase name, unfolded, runs of whitespace as one space, none at the
/// ends of the value or around the colon; ends with CRLF.
pub fn relaxed_header(field: &[u8]) -> Vec<u8> {
    let colon = field.iter().position(|b| *b == b':').unwrap_or(field.len());
    let name: Vec<u8> = field[..colon]
        .iter()
        .filter(|b| !is_wsp(**b))
        .map(u8::to_ascii_lowercase)
        .collect();
    let value: Vec<u8> = field
        .get(colon + 1..)
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    let mut out = name;
    out.push(b':');
    let mut pending_space = false;
    for b in value {
        if is_wsp(b) {
            pending_space = true;
        } else {
            if pending_space && out.last() != Some(&b':') {
                out.push(b' ');
            }
            pending_space = false;
            out.push(b);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// RFC 6376 3.4.4: runs of whitespace as one space, none at line ends, no empty lines at
/// the end, and a final CRLF unless the body is empty.
pub fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    loop {
        let (line, next) = match find(rest, b"\r\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut out = Vec::with_capacity(line.len());
        let mut pending_space = false;
        for &b in line {
            if is_wsp(b) {
                pending_space = true;
            } else {
                if pending_space {
                    out.push(b' ');
                }
                pending_space = false;
                out.push(b);
            }
        }
        lines.push(out);
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    while lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    let mut out = Vec::with_capacity(body.len());
    for line in lines {
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn relaxed_body_follows_rfc_6376_examples() {
        // RFC 6376 3.4.6, example body.
        let body = b" C \r\nD \t E\r\n\r\n\r\n";
        assert_eq!(relaxed_body(body), b" C\r\nD E\r\n");
        assert_eq!(relaxed_body(b""), b"");
        assert_eq!(relaxed_body(b"\r\n\r\n"), b"");
        assert_eq!(relaxed_body(b"x"), b"x\r\n");
    }

    #[test]
    fn relaxed_headers_follow_rfc_6376_examples() {
        assert_eq!(relaxed_header(b"A: X\r\n"), b"a:X\r\n");
        assert_eq!(relaxed_header(b"B : Y\t\r\n\tZ  \r\n"), b"b:Y Z\r\n");
    }

    #[test]
    fn header_fields_keep_folded_lines_together() {
        let fields = header_fields(b"A: 1\r\nB: 2\r\n 3\r\nC: 4\r\n");
        assert_eq!(fields, [&b"A: 1\r\n"[..], b"B: 2\r\n 3\r\n", b"C: 4\r\n"]);
    }

    #[test]
    fn an_ed25519_key_round_trips_through_pem_and_signs_verifiably() {
        let key = DkimKey::generate_ed25519().unwrap();
        let pem = key.ed25519_pkcs8_pem().unwrap();
        let back = DkimKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key_base64(), key.public_key_base64());
        assert!(key.dns_record().starts_with("v=DKIM1; k=ed25519; p="));
        assert!(!format!("{key:?}").contains(pem.expose_secret()));

        let signer = DkimSigner {
            key,
            domain: "example.com".into(),
            selector: "s1".into(),
        };
        let message = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\nDate: x\r\nMessage-ID: <1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nhello\r\n";
        let signed = signer.sign(message, 1_700_000_000).unwrap();
        let text = String::from_utf8(signed.clone()).unwrap();
        assert!(text.starts_with(
            "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=s1;"
        ));
        assert!(text.ends_with("hello\r\n"));
        assert!(signed.ends_with(message));
        // A message without a signed header is refused, not signed partially.
        let err = signer
            .sign(b"From: a@example.com\r\n\r\nbody", 0)
            .unwrap_err();
        assert!(matches!(err, SignError::MissingHeader("to")), "{err}");
    }

    #[test]
    fn keys_that_are_not_pkcs8_or_too_small_are_refused() {
        let err = DkimKey::from_pkcs8_pem(&SecretString::from("not a key")).unwrap_err();
        assert!(matches!(err, KeyError::NotPkcs8));
        let err = DkimKey::from_pkcs8_pem(&SecretString::from(
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
        ))
        .unwrap_err();
        assert!(matches!(err, KeyError::UnsupportedKind));
    }

    #[test]
    fn rsa_public_keys_are_wrapped_in_spki() {
        // A short fake PKCS#1 body: only the framing is under test here (the real keys are
        // checked against dkimpy in the mail tests).
        let spki = rsa_spki(&[0x30, 0x03, 0x02, 0x01, 0x05]);
        assert_eq!(&spki[..2], &[0x30, 0x17]);
        assert_eq!(&spki[17..20], &[0x03, 0x06, 0x00]);
        let mut long = Vec::new();
        der_len(270, &mut long);
        assert_eq!(long, [0x82, 0x01, 0x0e]);
    }
}
