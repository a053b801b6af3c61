//! Tenantry's PKI: a CA and the leaf certificates it issues to tenants (ECDSA P-256, made
//! with rcgen), plus the parsing that decides on renewal and spots a hand-edited
//! certificate. Used by the operator (a CA in a Secret) and by the API's local mode (a CA
//! in the data directory).
//!
//! Everything here is pure: no clock, no IO. Callers pass `now`. Private keys are
//! [`SecretString`]s and never appear in `Debug` output, logs or errors.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use secrecy::{ExposeSecret, SecretString};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Result with the PKI's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can fail in the PKI. None of it ever carries key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen could not make, sign or load a key or certificate.
    #[error("could not {action}")]
    Certificate {
        /// The step, e.g. `sign the leaf certificate`.
        action: &'static str,
        /// The rcgen error (never contains key material).
        #[source]
        source: rcgen::Error,
    },
    /// The text is not a PEM block.
    #[error("not a PEM certificate")]
    Pem(#[source] x509_parser::nom::Err<x509_parser::error::PEMError>),
    /// The PEM block is not a certificate.
    #[error("expected a CERTIFICATE PEM block, found {0}")]
    NotACertificate(String),
    /// The DER inside is not a valid X.509 certificate.
    #[error("invalid X.509 certificate")]
    X509(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// A CA's private key does not belong to its certificate.
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    /// A time is outside what a certificate can express.
    #[error("time out of range for a certificate: {0}")]
    TimeRange(String),
    /// The operating system's random number generator failed.
    #[error("could not read random bytes")]
    Random(#[source] getrandom::Error),
    /// A trusted certificate, or the TLS settings made from it, are unusable.
    #[error("TLS trust: {0}")]
    Trust(String),
}

/// Lifetime of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a leaf certificate: 90 days.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// A certificate authority: its certificate and signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: SecretString,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRequest {
    /// DNS subject alternative names; the first is also the common name.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Lifetime from `now`.
    pub validity: Duration,
    /// Start of validity.
    pub now: Timestamp,
}

/// A freshly issued leaf certificate and its new private key.
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: SecretString,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Start of validity (whole seconds).
    pub not_before: Timestamp,
    /// End of validity (whole seconds).
    pub not_after: Timestamp,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// What the reconciler needs to know about an existing certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// DER SubjectPublicKeyInfo, to match the certificate with a private key.
    pub public_key_der: Vec<u8>,
}

fn cert_err(action: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Certificate { action, source }
}

/// A positive random serial number of 16 bytes.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(Error::Random)?;
    // A clear top bit keeps the DER INTEGER positive; a set low bit of the first byte keeps
    // it from being shortened, so every serial has 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Sets rcgen's validity from whole seconds since the epoch.
fn set_validity(
    params: &mut CertificateParams,
    not_before: Timestamp,
    not_after: Timestamp,
) -> Result<()> {
    let secs = |t: Timestamp| -> Result<Duration> {
        u64::try_from(t.as_second())
            .map(Duration::from_secs)
            .map_err(|_| Error::TimeRange(t.to_string()))
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + secs(not_before)?;
    params.not_after = epoch + secs(not_after)?;
    Ok(())
}

fn add(t: Timestamp, d: Duration) -> Result<Timestamp> {
    let d = SignedDuration::try_from(d).map_err(|_| Error::TimeRange(format!("{d:?}")))?;
    t.checked_add(d)
        .map_err(|_| Error::TimeRange(t.to_string()))
}

fn whole_seconds(t: Timestamp) -> Result<Timestamp> {
    Timestamp::from_second(t.as_second()).map_err(|_| Error::TimeRange(t.to_string()))
}

impl CertificateAuthority {
    /// Makes a new self-signed CA valid from `now` for [`CA_VALIDITY`].
    pub fn generate(common_name: &str, now: Timestamp) -> Result<CertificateAuthority> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let serial = random_serial()?;
        let mut dn = DistinguishedName::new();
        // Each CA gets its own subject: during a rotation clients trust the old and the new
        // CA at once, and verifiers (webpki among them) pick the trust anchor by the
        // leaf's issuer name, so two CAs with one name would make leaves of one of them
        // fail to verify.
        let id = hex::encode(serial.to_bytes().get(..4).unwrap_or_default());
        dn.push(DnType::CommonName, format!("{common_name} {id}"));
        dn.push(DnType::OrganizationName, "Tenantry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(serial);
        let now = whole_seconds(now)?;
        set_validity(&mut params, now, add(now, CA_VALIDITY)?)?;
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-sign the CA certificate"))?;
        let key_pem = SecretString::from(key.serialize_pem());
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key (PEM), checking they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &SecretString) -> Result<CertificateAuthority> {
        let key = KeyPair::from_pem(key_pem.expose_secret())
            .map_err(cert_err("parse the CA private key"))?;
        let info = parse_certificate(cert_pem)?;
        if info.public_key_der != key.subject_public_key_info() {
            return Err(Error::KeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err("load the CA certificate"))?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.clone(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &SecretString {
        &self.key_pem
    }

    /// Issues a server certificate with a fresh ECDSA P-256 key.
    pub fn issue_leaf(&self, request: &LeafRequest) -> Result<IssuedCertificate> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generate a leaf key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(first) = request.dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = request
            .dns_names
            .iter()
            .map(|name| {
                name.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(cert_err("encode a DNS name"))
            })
            .chain(
                request
                    .ip_addresses
                    .iter()
                    .map(|ip| Ok(SanType::IpAddress(*ip))),
            )
            .collect::<Result<_>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let not_before = whole_seconds(request.now)?;
        let not_after = add(not_before, request.validity)?;
        set_validity(&mut params, not_before, not_after)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("sign the leaf certificate"))?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: SecretString::from(key.serialize_pem()),
            serial_hex,
            not_before,
            not_after,
        })
    }

    /// True when `cert_pem` was signed by this CA's key.
    pub fn signed(&self, cert_pem: &str) -> bool {
        signed_by(&self.cert_pem, cert_pem)
    }

    /// SHA-256 fingerprint of the CA certificate (see [`fingerprint`]).
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint(&self.cert_pem)
    }
}

/// True when `cert_pem` was signed by the key of the CA certificate `ca_pem`.
pub fn signed_by(ca_pem: &str, cert_pem: &str) -> bool {
    let (Ok(ca_der), Ok(leaf_der)) = (pem_der(ca_pem), pem_der(cert_pem)) else {
        return false;
    };
    let (Ok((_, ca)), Ok((_, leaf))) = (
        X509Certificate::from_der(&ca_der),
        X509Certificate::from_der(&leaf_der),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// Which of the CA certificates `cas` signed `cert_pem`: the index of the first that did.
pub fn signed_by_any<S: AsRef<str>>(cas: &[S], cert_pem: &str) -> Option<usize> {
    cas.iter().position(|ca| signed_by(ca.as_ref(), cert_pem))
}

/// The SHA-256 fingerprint of a PEM certificate: lowercase hex of the digest of its DER,
/// as `openssl x509 -noout -fingerprint -sha256` prints it without the colons.
pub fn fingerprint(cert_pem: &str) -> Result<String> {
    use sha2::Digest as _;
    let der = pem_der(cert_pem)?;
    Ok(hex::encode(sha2::Sha256::digest(&der)))
}

/// TLS client settings that trust exactly the CA certificate(s) of `trust_pem` (a bundle
/// during a CA rotation), with the ring provider and the safe default protocol versions:
/// what every Tenantry client of a tenant runtime (the API's prober, the operator's
/// metrics scrape) connects with.
pub fn client_config(trust_pem: &str) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trust_pem.as_bytes()) {
        let cert =
            cert.map_err(|e| Error::Trust(format!("the CA certificate does not parse: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Trust(format!("the CA certificate is unusable: {e}")))?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Trust(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The CERTIFICATE blocks of a trust bundle (one or more PEM certificates, in order), each
/// as its own PEM text. Fails on anything that is not a certificate, and on an empty
/// bundle.
pub fn split_bundle(bundle: &str) -> Result<Vec<String>> {
    const END: &str = "-----END ";
    let mut out = vec![];
    let mut rest = bundle;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let after = &rest[begin..];
        // The end line: `-----END <label>-----`.
        let Some(end) = after.find(END).and_then(|e| {
            after[e + END.len()..]
                .find("-----")
                .map(|t| e + END.len() + t + 5)
        }) else {
            return Err(Error::NotACertificate("an unterminated PEM block".into()));
        };
        let block = format!("{}\n", &after[..end]);
        let der = pem_der(&block)?;
        X509Certificate::from_der(&der).map_err(Error::X509)?;
        out.push(block);
        rest = &after[end..];
    }
    if out.is_empty() {
        return Err(Error::NotACertificate("nothing".into()));
    }
    Ok(out)
}

/// A trust bundle of `certs` (PEM certificates, in order): the texts joined, each ending
/// with a newline. The first is the issuing CA by Tenantry's convention.
pub fn bundle<S: AsRef<str>>(certs: &[S]) -> String {
    let mut out = String::new();
    for cert in certs {
        let cert = cert.as_ref().trim_end();
        out.push_str(cert);
        out.push('\n');
    }
    out
}

/// When a CA rotation started at `start` re-issues the leaf of `name`: `start` plus a
/// stable hash of `name` modulo `window` (whole seconds), so that the leaves of many
/// tenants are spread over the window instead of all re-issued at once, and every
/// replica (and every restart) computes the same time.
pub fn reissue_time(start: Timestamp, window: Duration, name: &str) -> Timestamp {
    use sha2::Digest as _;
    let secs = window.as_secs();
    if secs == 0 {
        return start;
    }
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let offset = u64::from_be_bytes(first) % secs;
    let offset = i64::try_from(offset).unwrap_or(0);
    start
        .checked_add(SignedDuration::from_secs(offset))
        .unwrap_or(start)
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(Error::Pem)?;
    if parsed.label != "CERTIFICATE" {
        return Err(Error::NotACertificate(parsed.label));
    }
    Ok(parsed.contents)
}

/// Reads serial, validity, SANs and public key of a PEM certificate.
pub fn parse_certificate(cert_pem: &str) -> Result<CertificateInfo> {
    let der = pem_der(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(Error::X509)?;
    let time = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|e| Error::TimeRange(e.to_string()))
    };
    let mut dns_names = vec![];
    let mut ip_addresses = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns_names.push((*n).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => {
                        let mut a = [0u8; 4];
                        a.copy_from_slice(bytes);
                        ip_addresses.push(IpAddr::from(a));
                    }
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(bytes);
                        ip_addresses.push(IpAddr::from(a));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertificateInfo {
        serial_hex: hex::encode(cert.tbs_certificate.raw_serial()),
        not_before: time(cert.validity().not_before)?,
        not_after: time(cert.validity().not_after)?,
        dns_names,
        ip_addresses,
        public_key_der: cert.public_key().raw.to_vec(),
    })
}

/// True when `key_pem` is the private key of the certificate described by `info`.
pub fn key_matches(info: &CertificateInfo, key_pem: &SecretString) -> bool {
    KeyPair::from_pem(key_pem.expose_secret())
        .map(|key| key.subject_public_key_info() == info.public_key_der)
        .unwrap_or(false)
}

/// When to renew a certificate valid from `not_before` to `not_after`: `renew_before`
/// ahead of expiry when given (never before `not_before`), otherwise at two thirds of its
/// life.
pub fn renewal_time(
    not_before: Timestamp,
    not_after: Timestamp,
    renew_before: Option<Duration>,
) -> Timestamp {
    let life = not_after.duration_since(not_before);
    let ahead = match renew_before.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(d) => d,
        None => life / 3,
    };
    let at = not_after
        .checked_sub(ahead)
        .unwrap_or(not_before)
        .max(not_before);
    // Whole seconds, like every time in the API: the status then round-trips unchanged.
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn leaf(ca: &CertificateAuthority, now: Timestamp) -> IssuedCertificate {
        ca.issue_leaf(&LeafRequest {
            dns_names: vec![
                "acme.example.com".into(),
                "tenant-runtime.tenant-acme.svc".into(),
            ],
            ip_addresses: vec!["10.0.0.7".parse().unwrap()],
            validity: DEFAULT_LEAF_VALIDITY,
            now,
        })
        .unwrap()
    }

    #[test]
    fn leaf_has_the_requested_sans_validity_and_serial() {
        let now = at("2026-01-01T00:00:00.5Z");
        let ca = CertificateAuthority::generate("test CA", now).unwrap();
        let issued = leaf(&ca, now);
        let info = parse_certificate(&issued.cert_pem).unwrap();
        assert_eq!(
            info.dns_names,
            ["acme.example.com", "tenant-runtime.tenant-acme.svc"]
        );
        assert_eq!(info.ip_addresses, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.not_before, at("2026-01-01T00:00:00Z"));
        assert_eq!(info.not_after, at("2026-04-01T00:00:00Z"));
        assert_eq!(info.not_before, issued.not_before);
        assert_eq!(info.not_after, issued.not_after);
        assert_eq!(info.serial_hex, issued.serial_hex);
        assert_eq!(issued.serial_hex.len(), 32);
        assert!(key_matches(&info, &issued.key_pem));
        assert!(ca.signed(&issued.cert_pem));
    }

    #[test]
    fn each_leaf_gets_a_new_key_and_serial() {
        let now = Timestamp::now();
        let ca = CertificateAuthority::generate("test CA", Timestamp::now()).unwrap();
        let a = leaf(&ca, now);
        let b = leaf(&ca, now);
        assert_ne!(a.key_pem.expose_secret(), b.key_pem.expose_secret());
        assert_ne!(a.serial_hex, b.serial_hex);
        let a_info = parse_certificate(&a.cert_pem).unwrap();
        assert!(!key_matches(&a_info, &b.key_pem));
        assert!(a.key_pem.expose_secret().contains("PRIVATE KEY"));
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_signing() {
        let ca = CertificateAuthority::generate("test CA", Timestamp::now()).unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let issued = leaf(&loaded, Timestamp::now());
        assert!(ca.signed(&issued.cert_pem));
        let other = CertificateAuthority::generate("other CA", Timestamp::now()).unwrap();
        assert!(!other.signed(&issued.cert_pem));
        // A key from another CA is refused.
        assert!(CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let ca = CertificateAuthority::generate("test CA", Timestamp::now()).unwrap();
        let issued = leaf(&ca, Timestamp::now());
        let debug = format!("{ca:?} {issued:?}");
        assert!(!debug.contains("PRIVATE KEY"));
        assert!(!debug.contains(ca.key_pem().expose_secret()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_certificate("not a pem").is_err());
        assert!(
            parse_certificate("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        let info = parse_certificate(
            CertificateAuthority::generate("x", Timestamp::now())
                .unwrap()
                .cert_pem(),
        )
        .unwrap();
        assert!(!key_matches(&info, &SecretString::from("junk")));
        assert!(CertificateAuthority::from_pem("junk", &SecretString::from("junk")).is_err());
    }

    #[test]
    fn renewal_is_at_two_thirds_by_default() {
        let nb = at("2026-01-01T00:00:00Z");
        let na = at("2026-04-01T00:00:00Z"); // 90 days
        assert_eq!(renewal_time(nb, na, None), at("2026-03-02T00:00:00Z"));
    }

    #[test]
    fn renewal_time_is_whole_seconds() {
        let nb = at("2026-01-01T00:00:00Z");
        let na = at("2026-01-01T01:00:01Z"); // 3601 s: a third is not whole
        assert_eq!(renewal_time(nb, na, None), at("2026-01-01T00:40:00Z"));
    }

    #[test]
    fn renew_before_counts_back_from_expiry_but_not_before_issuance() {
        let nb = at("2026-01-01T00:00:00Z");
        let na = at("2026-04-01T00:00:00Z");
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(renewal_time(nb, na, Some(week)), at("2026-03-25T00:00:00Z"));
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(renewal_time(nb, na, Some(year)), nb);
    }

    #[test]
    fn client_settings_trust_every_certificate_of_a_bundle_and_refuse_junk() {
        let a = CertificateAuthority::generate("a", Timestamp::now()).unwrap();
        let b = CertificateAuthority::generate("b", Timestamp::now()).unwrap();
        assert!(client_config(&bundle(&[a.cert_pem(), b.cert_pem()])).is_ok());
        let bad = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        let err = client_config(bad).unwrap_err().to_string();
        assert!(err.starts_with("TLS trust:"), "{err}");
    }

    #[test]
    fn a_bundle_splits_back_into_its_certificates_in_order() {
        let a = CertificateAuthority::generate("a", Timestamp::now()).unwrap();
        let b = CertificateAuthority::generate("b", Timestamp::now()).unwrap();
        let both = bundle(&[a.cert_pem(), b.cert_pem()]);
        assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);
        let parts = split_bundle(&both).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(fingerprint(&parts[0]).unwrap(), a.fingerprint().unwrap());
        assert_eq!(fingerprint(&parts[1]).unwrap(), b.fingerprint().unwrap());
        // A single certificate is a bundle of one, and round-trips exactly.
        assert_eq!(
            split_bundle(a.cert_pem()).unwrap(),
            [bundle(&[a.cert_pem()])]
        );
        assert!(split_bundle("").is_err());
        assert!(split_bundle("junk").is_err());
        let key = a.key_pem().expose_secret().to_owned();
        assert!(split_bundle(&format!("{}{key}", a.cert_pem())).is_err());
        assert!(
            split_bundle(&format!(
                "{}-----BEGIN CERTIFICATE-----\nAAAA",
                a.cert_pem()
            ))
            .is_err()
        );
    }

    #[test]
    fn every_ca_has_its_own_subject_and_leaves_name_it() {
        let subject = |pem: &str| {
            let der = pem_der(pem).unwrap();
            let (_, c) = X509Certificate::from_der(&der).unwrap();
            (c.subject().to_string(), c.issuer().to_string())
        };
        let a = CertificateAuthority::generate("Tenantry CA", Timestamp::now()).unwrap();
        let b = CertificateAuthority::generate("Tenantry CA", Timestamp::now()).unwrap();
        let (sa, _) = subject(a.cert_pem());
        assert!(sa.contains("Tenantry CA "), "{sa}");
        assert_ne!(sa, subject(b.cert_pem()).0);
        let (_, issuer) = subject(&leaf(&a, Timestamp::now()).cert_pem);
        assert_eq!(issuer, sa);
    }

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_der_and_differs_between_cas() {
        let a = CertificateAuthority::generate("a", Timestamp::now()).unwrap();
        let b = CertificateAuthority::generate("a", Timestamp::now()).unwrap();
        let fa = a.fingerprint().unwrap();
        assert_eq!(fa.len(), 64);
        assert!(
            fa.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(fa, b.fingerprint().unwrap());
        use sha2::Digest as _;
        let der = pem_der(a.cert_pem()).unwrap();
        assert_eq!(fa, hex::encode(sha2::Sha256::digest(&der)));
        assert!(fingerprint("junk").is_err());
    }

    #[test]
    fn signed_by_any_names_the_ca_that_signed() {
        let old = CertificateAuthority::generate("old", Timestamp::now()).unwrap();
        let new = CertificateAuthority::generate("new", Timestamp::now()).unwrap();
        let stranger = CertificateAuthority::generate("x", Timestamp::now()).unwrap();
        let from_old = leaf(&old, Timestamp::now());
        let from_new = leaf(&new, Timestamp::now());
        let cas = [new.cert_pem(), old.cert_pem()];
        assert_eq!(signed_by_any(&cas, &from_new.cert_pem), Some(0));
        assert_eq!(signed_by_any(&cas, &from_old.cert_pem), Some(1));
        let from_stranger = leaf(&stranger, Timestamp::now());
        assert_eq!(signed_by_any(&cas, &from_stranger.cert_pem), None);
        assert_eq!(signed_by_any(&cas, "junk"), None);
        assert_eq!(signed_by_any::<&str>(&[], &from_new.cert_pem), None);
    }

    #[test]
    fn reissue_times_are_stable_spread_and_within_the_window() {
        let start = at("2026-01-01T00:00:00Z");
        let hour = Duration::from_secs(3600);
        let end = at("2026-01-01T01:00:00Z");
        let times: Vec<Timestamp> = (0..200)
            .map(|i| reissue_time(start, hour, &format!("tenant-{i}")))
            .collect();
        assert!(times.iter().all(|t| *t >= start && *t < end));
        assert_eq!(times[7], reissue_time(start, hour, "tenant-7"));
        // Spread: every quarter of the window gets some.
        for q in 0..4 {
            let from = start
                .checked_add(SignedDuration::from_secs(q * 900))
                .unwrap();
            let to = start
                .checked_add(SignedDuration::from_secs((q + 1) * 900))
                .unwrap();
            assert!(
                times.iter().any(|t| *t >= from && *t < to),
                "quarter {q} is empty"
            );
        }
        assert_eq!(reissue_time(start, Duration::ZERO, "a"), start);
    }
}
