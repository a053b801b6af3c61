//! The serving certificate: loaded from the PEM files, served through a rustls
//! [`ResolvesServerCert`] that always hands out the latest good pair, and reloaded when
//! the files' contents change.
//!
//! A rotation replaces two files that cannot be swapped atomically together, so a poll
//! may see a new certificate with the old key (or a half-written file). Such a pair is
//! refused — the old one keeps serving and the problem is logged once — and picked up
//! on a later poll once both files agree; `/readyz` re-reads such a pair for a moment
//! before it reports it. Each TLS handshake takes the key current at that
//! moment, so connections (and requests) already open are never affected by a reload.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use secrecy::zeroize::Zeroizing;

use crate::config::TlsFiles;
use crate::error::{Error, Result};

/// How long `/readyz` keeps re-reading certificate files that fail before it reports them.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);
/// How often it re-reads them meanwhile.
pub const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(25);

/// The rustls provider used everywhere in the runtime (ring; no aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a serving key from PEM bytes; the message says what is wrong.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate file is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("certificate file holds no certificate".into());
    }
    // The pem error type does not include key bytes, but say nothing about them anyway.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| "key file holds no PEM private key".to_owned())?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))
}

/// What a reload poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// A new pair is now served.
    Reloaded,
    /// The files changed but are not a usable pair; the old one is still served.
    Refused(String),
}

struct Seen {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
}

/// Serves the latest good certificate from [`TlsFiles`].
pub struct CertResolver {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

impl CertResolver {
    /// Loads the pair named by `files`; fails if they are unreadable or do not match.
    pub fn load(files: &TlsFiles, provider: Arc<CryptoProvider>) -> Result<CertResolver> {
        let cert = read("certificate file", &files.cert_file)?;
        let key = Zeroizing::new(read("key file", &files.key_file)?);
        let certified =
            certified_key(&cert, &key, &provider).map_err(|message| Error::Certificate {
                cert_file: files.cert_file.clone(),
                message,
            })?;
        Ok(CertResolver {
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new(Seen { cert, key }),
        })
    }

    /// The pair served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files and serves them if they changed and form a usable pair. A
    /// refused or unreadable pair is reported once per distinct content, not every poll.
    pub fn reload_if_changed(&self) -> Reload {
        let (cert, key) = match (
            read("certificate file", &self.files.cert_file),
            read("key file", &self.files.key_file),
        ) {
            (Ok(c), Ok(k)) => (c, Zeroizing::new(k)),
            (Err(e), _) | (_, Err(e)) => {
                // Remember "unreadable" as empty contents: reported once, and whatever
                // appears next counts as a change.
                let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                if seen.cert.is_empty() && seen.key.is_empty() {
                    return Reload::Unchanged;
                }
                *seen = Seen {
                    cert: Vec::new(),
                    key: Zeroizing::new(Vec::new()),
                };
                return Reload::Refused(e.to_string());
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.cert == cert && *seen.key == *key {
            return Reload::Unchanged;
        }
        let outcome = match certified_key(&cert, &key, &self.provider) {
            Ok(certified) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
                Reload::Reloaded
            }
            Err(message) => Reload::Refused(message),
        };
        *seen = Seen { cert, key };
        outcome
    }

    /// Whether the files on disk can be read and form a usable pair (for `/readyz`). A
    /// pair caught mid-replacement (the writer renames one file, then the other) is not a
    /// failure: the files are read again every [`SETTLE_POLL`] for up to [`SETTLE`], and
    /// only a problem that outlasts that is reported.
    pub async fn check_files_settled(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let checked = self.check_files();
            if checked.is_ok() || tokio::time::Instant::now() >= deadline {
                return checked;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Whether the files on disk can be read and form a usable pair now.
    fn check_files(&self) -> Result<()> {
        let cert = read("certificate file", &self.files.cert_file)?;
        let key = Zeroizing::new(read("key file", &self.files.key_file)?);
        certified_key(&cert, &key, &self.provider)
            .map(|_| ())
            .map_err(|message| Error::Certificate {
                cert_file: self.files.cert_file.clone(),
                message,
            })
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The TLS server configuration: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, the
/// certificate from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(resolver.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::TlsConfig)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
