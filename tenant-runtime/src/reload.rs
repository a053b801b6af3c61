//! Live reload: polls the config file, the certificate pair, the token public key set and
//! the data key file, and applies what changed without a restart. Retention changes take
//! effect at once (and wake the pruner); a new certificate pair serves new connections; a
//! new public key set verifies new requests (a token key rotation adds a key to the set
//! before the API signs with it, and removes the old one only after its last token
//! expired); a new data key file (a key-encryption key rotation) re-wraps every data key
//! under it, while requests go on with the unwrapped keys held in memory. Changed keys
//! that need a restart are logged as such and the
//! running values are kept. An invalid new file is logged and ignored.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::token::TokenVerifier;
use tokio::sync::watch;

use crate::auth::SharedVerifier;
use crate::config::{self, RuntimeConfig};
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::keystore::Keyring;
use crate::metrics::Metrics;
use crate::tls::{CertResolver, Reload};

/// Reads and parses the token public key file: a set of one or more `PUBLIC KEY` PEM
/// blocks; one bad block refuses the whole file.
pub fn load_verifier(path: &std::path::Path) -> Result<TokenVerifier> {
    let pem = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
        what: "token public key file",
        path: path.to_owned(),
        source,
    })?;
    TokenVerifier::from_public_key_pem(&pem).map_err(|source| Error::TokenKey {
        path: path.to_owned(),
        source,
    })
}

/// What the reloader watches and updates.
#[derive(Debug)]
pub struct Reloader {
    /// The config file.
    pub config_path: PathBuf,
    /// The config in effect (retention may differ from the start one).
    pub config: RuntimeConfig,
    /// The serving certificate.
    pub certs: Arc<CertResolver>,
    /// The token verifier.
    pub verifier: SharedVerifier,
    /// Where retention changes are published.
    pub policy: watch::Sender<RetentionPolicy>,
    /// Counts certificate reloads.
    pub metrics: Arc<Metrics>,
    /// The data keys, re-wrapped when the data key file changes.
    pub keys: Arc<Keyring>,
}

impl Reloader {
    /// Polls every `interval` until `stop` turns true.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        // Nothing seen yet: the first poll compares the files with what is running, so a
        // change made while the process started is not missed.
        let mut last_config = None;
        let mut last_key = None;
        let mut data_key_problem = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.poll_certificate();
            self.poll_token_key(&mut last_key);
            self.poll_data_key(&mut data_key_problem).await;
            self.poll_config(&mut last_config);
        }
    }

    /// Re-wraps the key store when the data key file holds another KEK than the one in
    /// use. Compared by fingerprint, so a rotation that failed is retried at the next
    /// poll; a problem is logged once until it changes.
    async fn poll_data_key(&self, problem: &mut Option<String>) {
        let key = match DataKey::from_file(&self.config.data_key_file) {
            Ok(key) => key,
            Err(e) => {
                let message = e.to_string();
                if problem.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "data key file unusable; keeping the key-encryption key in use");
                    *problem = Some(message);
                }
                return;
            }
        };
        if key.kek_id() == self.keys.kek_id() {
            *problem = None;
            return;
        }
        match self.keys.rotate_kek(key).await {
            Ok(rotation) => {
                *problem = None;
                self.metrics.kek_rotations.inc();
                self.metrics.observe_keys(&self.keys);
                tracing::info!(
                    from = %rotation.from,
                    to = %rotation.to,
                    rewrapped = rotation.rewrapped,
                    "key-encryption key rotated: every data key re-wrapped"
                );
            }
            Err(e) => {
                let message = e.to_string();
                if problem.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "re-wrapping the data keys failed; retrying at the next poll");
                    *problem = Some(message);
                }
            }
        }
    }

    fn poll_certificate(&self) {
        match self.certs.reload_if_changed() {
            Reload::Unchanged => {}
            Reload::Reloaded => {
                self.metrics.certificate_reloads.inc();
                tracing::info!("serving the new certificate");
            }
            Reload::Refused(reason) => {
                tracing::warn!(%reason, "certificate files changed but cannot be used yet; still serving the previous certificate");
            }
        }
    }

    fn poll_token_key(&self, last: &mut Option<Vec<u8>>) {
        let path = &self.config.token_public_key_file;
        let Ok(bytes) = std::fs::read(path) else {
            if last.take().is_some() {
                tracing::warn!(path = %path.display(), "token public key file cannot be read; keeping the loaded key");
            }
            return;
        };
        if last.as_ref() == Some(&bytes) {
            return;
        }
        *last = Some(bytes);
        match load_verifier(path) {
            Ok(verifier) => {
                let kids = verifier.kids().join(",");
                *self
                    .verifier
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(verifier);
                tracing::info!(%kids, "token public key set reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "new token public key set refused; keeping the loaded keys")
            }
        }
    }

    fn poll_config(&mut self, last: &mut Option<Vec<u8>>) {
        let Ok(bytes) = std::fs::read(&self.config_path) else {
            if last.take().is_some() {
                tracing::warn!(path = %self.config_path.display(), "config file cannot be read; keeping the running config");
            }
            return;
        };
        if last.as_ref() == Some(&bytes) {
            return;
        }
        *last = Some(bytes);
        let new = match config::load(&self.config_path) {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(error = %e, "changed config refused; keeping the running config");
                return;
            }
        };
        for key in self.config.restart_required_changes(&new) {
            tracing::warn!(
                key,
                "config key changed; it takes effect only after a restart"
            );
        }
        if new.retention != self.config.retention {
            tracing::info!(
                max_age_hours = new.retention.max_age_hours,
                max_count = new.retention.max_count,
                "retention policy changed; pruning now"
            );
            self.config.retention = new.retention;
            self.policy.send_replace(new.retention);
        }
    }
}
