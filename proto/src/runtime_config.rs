//! The tenant runtime's configuration file: written by the operator (the runtime's
//! ConfigMap) and by the API's local provisioner, read by `tenant-runtime`. This one type
//! is all three, so a key cannot exist on one side only.
//!
//! The file is YAML or JSON with exactly these keys:
//!
//! ```yaml
//! tenant_id: acme
//! listen: 0.0.0.0:8443
//! tls: { cert_file: /tls/tls.crt, key_file: /tls/tls.key }
//! data_dir: /data
//! data_key_file: /keys/data.key        # exactly 32 random bytes, raw
//! token_public_key_file: /keys/token.pub  # Ed25519, SPKI PEM
//! retention: { max_age_hours: 336, max_count: 10000 }
//! ```
//!
//! Unknown keys are refused, so a typo fails loudly instead of silently keeping a
//! default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::retention::{HARD_CAP_MAX_AGE_HOURS, RetentionError, RetentionPolicy};

/// The contents of the runtime's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// This instance's tenant: the audience instance tokens must carry, and part of every
    /// record's associated data. The control API's tenant id.
    pub tenant_id: String,
    /// Address the runtime binds.
    pub listen: SocketAddr,
    /// The serving certificate and key.
    pub tls: TlsFiles,
    /// Where the database lives; the only directory the runtime writes.
    pub data_dir: PathBuf,
    /// The tenant's 32-byte data-encryption key.
    pub data_key_file: PathBuf,
    /// The API's Ed25519 token-signing public key (SPKI PEM).
    pub token_public_key_file: PathBuf,
    /// How long execution data is kept.
    pub retention: RetentionPolicy,
}

/// The TLS files (PEM): the certificate chain (leaf first) and its private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PKCS#8, SEC1 or PKCS#1 private key.
    pub key_file: PathBuf,
}

/// Why a runtime configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeConfigError {
    /// `tenant_id` is not a DNS label.
    #[error("tenant_id must be 1 to 63 characters of a-z, 0-9 and '-'")]
    TenantId,
    /// The retention policy is out of bounds.
    #[error("retention: {0}")]
    Retention(#[source] RetentionError),
}

impl RuntimeConfig {
    /// Makes every relative path relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.tls.cert_file,
            &mut self.tls.key_file,
            &mut self.data_dir,
            &mut self.data_key_file,
            &mut self.token_public_key_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the values the type system does not.
    pub fn validate(&self) -> Result<(), RuntimeConfigError> {
        let id = &self.tenant_id;
        // Tenant ids are DNS labels (they name namespaces), so they never hold separators.
        let valid = (1..=63).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(RuntimeConfigError::TenantId);
        }
        self.retention
            .validate(HARD_CAP_MAX_AGE_HOURS)
            .map_err(RuntimeConfigError::Retention)
    }

    /// The configuration without what the runtime applies live (retention): a change of
    /// what is left needs a restart. The operator hashes it to roll the runtime's pods.
    pub fn restart_relevant(&self) -> RuntimeConfig {
        RuntimeConfig {
            retention: RetentionPolicy::default(),
            ..self.clone()
        }
    }

    /// Names of the keys that differ in `new` and only take effect after a restart.
    pub fn restart_required_changes(&self, new: &RuntimeConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.tenant_id != new.tenant_id {
            changed.push("tenant_id");
        }
        if self.listen != new.listen {
            changed.push("listen");
        }
        if self.tls != new.tls {
            changed.push("tls");
        }
        if self.data_dir != new.data_dir {
            changed.push("data_dir");
        }
        if self.data_key_file != new.data_key_file {
            changed.push("data_key_file");
        }
        if self.token_public_key_file != new.token_public_key_file {
            changed.push("token_public_key_file");
        }
        changed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn config() -> RuntimeConfig {
        RuntimeConfig {
            tenant_id: "acme".into(),
            listen: "0.0.0.0:8443".parse().unwrap(),
            tls: TlsFiles {
                cert_file: "tls/tls.crt".into(),
                key_file: "/abs/tls.key".into(),
            },
            data_dir: "data".into(),
            data_key_file: "keys/data.key".into(),
            token_public_key_file: "keys/token.pub".into(),
            retention: RetentionPolicy {
                max_age_hours: 48,
                max_count: 100,
            },
        }
    }

    #[test]
    fn the_documented_keys_are_exactly_the_fields() {
        let json = serde_json::to_value(config()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "data_dir",
                "data_key_file",
                "listen",
                "retention",
                "tenant_id",
                "tls",
                "token_public_key_file"
            ]
        );
        let back: RuntimeConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, config());
        let mut typo = json;
        typo["data_directory"] = typo["data_dir"].take();
        typo.as_object_mut().unwrap().remove("data_dir");
        let err = serde_json::from_value::<RuntimeConfig>(typo).unwrap_err();
        assert!(err.to_string().contains("data_directory"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let mut c = config();
        c.resolve_paths(Path::new("/etc/tenantry"));
        assert_eq!(c.tls.cert_file, Path::new("/etc/tenantry/tls/tls.crt"));
        assert_eq!(c.tls.key_file, Path::new("/abs/tls.key"));
        assert_eq!(c.data_dir, Path::new("/etc/tenantry/data"));
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = config();
        c.tenant_id = "Acme/1".into();
        assert_eq!(c.validate(), Err(RuntimeConfigError::TenantId));
        let mut c = config();
        c.retention.max_age_hours = 721;
        assert!(matches!(
            c.validate(),
            Err(RuntimeConfigError::Retention(_))
        ));
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn only_non_retention_changes_need_a_restart() {
        let old = config();
        let mut new = old.clone();
        new.retention.max_count = 5;
        assert!(old.restart_required_changes(&new).is_empty());
        assert_eq!(old.restart_relevant(), new.restart_relevant());
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.data_key_file = "/other".into();
        assert_eq!(
            old.restart_required_changes(&new),
            vec!["listen", "data_key_file"]
        );
        assert_ne!(old.restart_relevant(), new.restart_relevant());
    }
}
