//! The local CA of `tenantry-api dev` and its rotation, in the data directory:
//!
//! ```text
//! ca.key           the issuing CA's private key (0600)
//! ca.crt           the trust bundle clients read: the issuing CA, then, during a
//!                  rotation, the previous CA
//! ca-rotation.json during a rotation: when it started, its window, both fingerprints
//! ```
//!
//! `tenantry-api rotate-local-ca` ([`rotate`]) makes a new CA while `dev` runs: it writes
//! `ca-rotation.json`, then the new key over the old one (the old key is gone: nothing is
//! issued with it again), then `ca.crt` with both CAs. The running provisioner picks the
//! new CA up once the key and the first certificate of `ca.crt` match, re-issues each
//! instance's certificate at its time in the window ([`tenantry_pki::reissue_time`]; every
//! runtime reloads its certificate without a restart), and once the window has passed and
//! every instance's certificate is from the new CA, [`retire`]s the old one: `ca.crt`
//! holds the new CA alone. Clients that read `ca.crt` for each new connection trust both
//! CAs throughout, so no connection fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use tenantry_pki::{self as pki, CertificateAuthority};

use crate::error::{Error, Result};

/// The trust bundle, for clients to trust (`<data-dir>/ca.crt`).
pub const CA_CERT_FILE: &str = "ca.crt";
/// The issuing CA's private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// The state of a rotation in progress.
pub const ROTATION_FILE: &str = "ca-rotation.json";

/// Audit actions of the local CA.
pub mod actions {
    /// `rotate-local-ca` made a new CA.
    pub const ROTATE: &str = "local_ca.rotate";
    /// The previous CA left the trust bundle.
    pub const RETIRE: &str = "local_ca.retire";
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn pki_err(what: &'static str) -> impl FnOnce(pki::Error) -> Error {
    move |source| Error::Pki { what, source }
}

/// A rotation in progress, as `ca-rotation.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// When it started (RFC 3339).
    pub started: Timestamp,
    /// Every certificate is re-issued by the new CA within this many seconds of the start.
    pub window_secs: u64,
    /// The new (issuing) CA.
    pub fingerprint: String,
    /// The CA it replaces.
    pub previous_fingerprint: String,
}

impl Rotation {
    /// When the window ends.
    pub fn ends(&self) -> Timestamp {
        self.started
            .checked_add(jiff::SignedDuration::from_secs(
                i64::try_from(self.window_secs).unwrap_or(i64::MAX),
            ))
            .unwrap_or(self.started)
    }
}

/// The local CA as the provisioner uses it.
#[derive(Debug)]
pub struct LocalCa {
    issuing: CertificateAuthority,
    fingerprint: String,
    previous: Option<String>,
    rotation: Option<Rotation>,
    /// `ca.crt` as read, to notice a change.
    raw: String,
}

/// Which CA signed a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The issuing CA.
    Current,
    /// The previous CA, during a rotation.
    Previous,
}

impl LocalCa {
    /// The CA that issues certificates.
    pub fn issuing(&self) -> &CertificateAuthority {
        &self.issuing
    }

    /// SHA-256 fingerprint of the issuing CA.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The rotation in progress.
    pub fn rotation(&self) -> Option<&Rotation> {
        self.rotation.as_ref()
    }

    /// `ca.crt` as read.
    pub fn bundle(&self) -> &str {
        &self.raw
    }

    /// Which CA signed `cert_pem`, if one of them did.
    pub fn signer(&self, cert_pem: &str) -> Option<Signer> {
        if self.issuing.signed(cert_pem) {
            return Some(Signer::Current);
        }
        match &self.previous {
            Some(p) if pki::signed_by(p, cert_pem) => Some(Signer::Previous),
            _ => None,
        }
    }

    /// When the certificate of tenant `id`, still from the previous CA, is re-issued.
    pub fn reissue_at(&self, id: &str) -> Timestamp {
        match &self.rotation {
            Some(r) => pki::reissue_time(r.started, Duration::from_secs(r.window_secs), id),
            None => Timestamp::UNIX_EPOCH,
        }
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))
}

/// Loads the CA from `dir` (None when it has none yet). A rotation file that does not
/// belong to these files (left over, or written before them) is ignored.
pub fn load(dir: &Path) -> Result<Option<LocalCa>> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !(cert_path.exists() && key_path.exists()) {
        return Ok(None);
    }
    crate::files::check_key_file(&key_path)?;
    let raw = read(&cert_path)?;
    let key = SecretString::from(read(&key_path)?);
    let mut certs = pki::split_bundle(&raw)
        .map_err(pki_err("reading the CA bundle"))?
        .into_iter();
    let first = certs.next().unwrap_or_default();
    let issuing =
        CertificateAuthority::from_pem(&first, &key).map_err(pki_err("loading the CA"))?;
    let fingerprint = issuing.fingerprint().map_err(pki_err("loading the CA"))?;
    let previous = certs.next();
    let rotation = std::fs::read_to_string(dir.join(ROTATION_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<Rotation>(&text).ok())
        .filter(|r| r.fingerprint == fingerprint && previous.is_some());
    // The previous CA without a rotation file: the window counts as over.
    let rotation = rotation.or_else(|| {
        previous.as_ref().map(|p| Rotation {
            started: Timestamp::UNIX_EPOCH,
            window_secs: 0,
            fingerprint: fingerprint.clone(),
            previous_fingerprint: pki::fingerprint(p).unwrap_or_default(),
        })
    });
    Ok(Some(LocalCa {
        issuing,
        fingerprint,
        previous,
        rotation,
        raw,
    }))
}

/// Loads the local CA from `dir`, creating it on first start.
pub fn load_or_create(dir: &Path) -> Result<LocalCa> {
    if let Some(ca) = load(dir)? {
        return Ok(ca);
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let ca = CertificateAuthority::generate("Tenantry local CA", Timestamp::now())
        .map_err(pki_err("making the CA"))?;
    let cert_path = dir.join(CA_CERT_FILE);
    super::local::write_atomic_together(&[
        (
            &dir.join(CA_KEY_FILE),
            ca.key_pem().expose_secret().as_bytes(),
            0o600,
        ),
        (&cert_path, ca.cert_pem().as_bytes(), 0o644),
    ])?;
    tracing::info!(path = %cert_path.display(), "created the local CA; trust this certificate to reach instances");
    load(dir)?.ok_or_else(|| Error::Config(format!("{} vanished", cert_path.display())))
}

/// What [`rotate`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    /// The new CA's fingerprint.
    pub fingerprint: String,
    /// The previous CA's fingerprint.
    pub previous_fingerprint: String,
    /// When the rotation started.
    pub started: String,
    /// When every certificate is from the new CA, at the latest (the window's end).
    pub ends: String,
    /// The trust bundle.
    pub ca_file: PathBuf,
}

/// Makes a new CA in `dir` (see the module documentation). Refuses while a rotation is in
/// progress: the CA before the previous one may still have issued certificates.
pub fn rotate(dir: &Path, window: Duration, now: Timestamp) -> Result<RotationReport> {
    let Some(current) = load(dir)? else {
        return Err(Error::Config(format!(
            "{} has no local CA yet; start `tenantry-api dev` once first",
            dir.display()
        )));
    };
    if let Some(r) = current.rotation() {
        return Err(Error::Config(format!(
            "a CA rotation started at {} is in progress; the running `tenantry-api dev` ends it once every instance certificate is from the new CA (after {})",
            r.started,
            r.ends()
        )));
    }
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let new = CertificateAuthority::generate("Tenantry local CA", now)
        .map_err(pki_err("making the new CA"))?;
    let rotation = Rotation {
        started: now,
        window_secs: window.as_secs(),
        fingerprint: new.fingerprint().map_err(pki_err("making the new CA"))?,
        previous_fingerprint: current.fingerprint.clone(),
    };
    let json = serde_json::to_string_pretty(&rotation).unwrap_or_default();
    // Renamed in this order, all three written first: a reader sees the new CA only once
    // the key and ca.crt agree, and by then the rotation file is there.
    let bundle = pki::bundle(&[new.cert_pem(), current.issuing.cert_pem()]);
    super::local::write_atomic_together(&[
        (&dir.join(ROTATION_FILE), json.as_bytes(), 0o644),
        (
            &dir.join(CA_KEY_FILE),
            new.key_pem().expose_secret().as_bytes(),
            0o600,
        ),
        (&dir.join(CA_CERT_FILE), bundle.as_bytes(), 0o644),
    ])?;
    Ok(RotationReport {
        fingerprint: rotation.fingerprint.clone(),
        previous_fingerprint: rotation.previous_fingerprint.clone(),
        started: rotation.started.to_string(),
        ends: rotation.ends().to_string(),
        ca_file: dir.join(CA_CERT_FILE),
    })
}

/// Whether the rotation of `ca` can end at `now`: its window has passed and every
/// certificate in `certs` is from the new CA.
pub fn due_for_retirement(ca: &LocalCa, certs: &[String], now: Timestamp) -> bool {
    ca.rotation().is_some_and(|r| now >= r.ends())
        && certs.iter().all(|c| ca.signer(c) == Some(Signer::Current))
}

/// Ends a rotation: `ca.crt` holds the issuing CA alone, the rotation file goes.
pub fn retire(dir: &Path, ca: &LocalCa) -> Result<()> {
    super::local::write_atomic(
        &dir.join(CA_CERT_FILE),
        pki::bundle(&[ca.issuing.cert_pem()]).as_bytes(),
        0o644,
    )?;
    match std::fs::remove_file(dir.join(ROTATION_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("removing {}", dir.join(ROTATION_FILE).display()),
            source: e,
        }),
    }
}

/// `tenantry-api rotate-local-ca`: rotates the CA of `args`' data directory and audits it
/// in its database.
pub async fn rotate_command(
    args: &crate::config::RotateLocalCaArgs,
    clock: &dyn crate::clock::Clock,
) -> Result<RotationReport> {
    let now = Timestamp::from_millisecond(clock.now_ms()).unwrap_or(Timestamp::UNIX_EPOCH);
    let dir = args.db.data_dir.clone();
    let window = args.ca_rotation_window;
    let report = tokio::task::spawn_blocking(move || rotate(&dir, window, now))
        .await
        .map_err(Error::Task)??;
    let store = crate::server::command_store(&args.db).await?;
    let audited = store
        .audit(
            &crate::store::AuditRecord {
                action: actions::ROTATE,
                actor_user_id: String::new(),
                target: report.fingerprint.clone(),
                success: true,
                source: "cli".into(),
                detail_json: crate::service::detail(&[
                    ("previous", report.previous_fingerprint.clone().into()),
                    ("window_secs", window.as_secs().into()),
                ]),
            },
            clock.now_ms(),
        )
        .await;
    store.close().await;
    audited?;
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn leaf(ca: &CertificateAuthority) -> String {
        ca.issue_leaf(&pki::LeafRequest {
            dns_names: vec!["localhost".into()],
            ip_addresses: vec![],
            validity: Duration::from_secs(3600),
            now: Timestamp::now(),
        })
        .unwrap()
        .cert_pem
    }

    #[test]
    fn a_rotation_bundles_both_cas_then_retirement_leaves_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = load_or_create(dir.path()).unwrap();
        let old_key = std::fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(old.rotation().is_none());
        let from_old = leaf(old.issuing());
        let start = at("2026-01-01T00:00:00Z");
        let report = rotate(dir.path(), Duration::from_secs(60), start).unwrap();
        assert_eq!(report.previous_fingerprint, old.fingerprint());
        assert_eq!(report.ends, "2026-01-01T00:01:00Z");

        let new = load(dir.path()).unwrap().unwrap();
        assert_eq!(new.fingerprint(), report.fingerprint);
        let bundle = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        let certs = pki::split_bundle(&bundle).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(pki::fingerprint(&certs[0]).unwrap(), report.fingerprint);
        assert_eq!(pki::fingerprint(&certs[1]).unwrap(), old.fingerprint());
        // The old private key is gone.
        let key = std::fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        assert_ne!(key, old_key);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(new.signer(&from_old), Some(Signer::Previous));
        let from_new = leaf(new.issuing());
        assert_eq!(new.signer(&from_new), Some(Signer::Current));
        let t = new.reissue_at("t-1");
        assert!(t >= start && t < at("2026-01-01T00:01:00Z"));

        // A second rotation waits for this one.
        assert!(rotate(dir.path(), Duration::from_secs(60), start).is_err());

        // Not before the window's end, and not while an old certificate remains.
        let end = at("2026-01-01T00:01:00Z");
        assert!(!due_for_retirement(
            &new,
            std::slice::from_ref(&from_new),
            start
        ));
        assert!(!due_for_retirement(
            &new,
            &[from_new.clone(), from_old.clone()],
            end
        ));
        assert!(due_for_retirement(
            &new,
            std::slice::from_ref(&from_new),
            end
        ));
        retire(dir.path(), &new).unwrap();
        let after = load(dir.path()).unwrap().unwrap();
        assert!(after.rotation().is_none());
        assert_eq!(after.signer(&from_old), None);
        assert_eq!(
            pki::split_bundle(after.bundle()).unwrap(),
            [pki::bundle(&[new.issuing().cert_pem()])]
        );
        assert!(!dir.path().join(ROTATION_FILE).exists());
    }

    #[test]
    fn a_half_written_rotation_is_not_taken_for_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let old = load_or_create(dir.path()).unwrap();
        // The new key is written but ca.crt is not yet: loading fails (the running
        // provisioner keeps the CA it has) rather than pairing the wrong halves.
        let other = CertificateAuthority::generate("x", Timestamp::now()).unwrap();
        super::super::local::write_atomic(
            &dir.path().join(CA_KEY_FILE),
            other.key_pem().expose_secret().as_bytes(),
            0o600,
        )
        .unwrap();
        assert!(load(dir.path()).is_err());
        drop(old);
    }

    #[test]
    fn rotating_without_a_ca_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = rotate(dir.path(), Duration::from_secs(60), Timestamp::now()).unwrap_err();
        assert!(
            err.to_string().contains("start `tenantry-api dev`") || matches!(err, Error::Config(_))
        );
    }
}
