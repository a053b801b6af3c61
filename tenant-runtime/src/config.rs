//! The runtime configuration file, the contract between the operator (ConfigMap), the
//! API's local mode and this binary, and the process settings around it.
//!
//! The file is YAML or JSON (by extension: `.json` is JSON, anything else YAML, which also
//! reads JSON) with exactly these keys:
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
//! default. Relative paths are relative to the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tenantry_proto::retention::{HARD_CAP_MAX_AGE_HOURS, RetentionPolicy};

use crate::error::{Error, Result};

/// The contents of the configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This instance's tenant: the audience tokens must carry, and part of every
    /// record's associated data.
    pub tenant_id: String,
    /// Address the binary binds (tests pass their own listener instead).
    pub listen: SocketAddr,
    /// The serving certificate and key.
    pub tls: TlsFiles,
    /// Where the database lives; the only directory the runtime writes.
    pub data_dir: PathBuf,
    /// The tenant's 32-byte data-encryption key.
    pub data_key_file: PathBuf,
    /// The API's Ed25519 token-signing public key.
    pub token_public_key_file: PathBuf,
    /// How long execution data is kept.
    pub retention: RetentionPolicy,
}

/// The TLS files (PEM): the certificate chain (leaf first) and its private key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PKCS#8, SEC1 or PKCS#1 private key.
    pub key_file: PathBuf,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            what: "config file",
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, path, base)
    }

    /// Parses `text` (named `path` in errors; JSON when it ends in `.json`), resolves
    /// relative paths against `base`, and validates.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config> {
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let parsed: Result<Config, String> = if is_json {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_yaml::from_str(text).map_err(|e| e.to_string())
        };
        let mut config = parsed.map_err(|message| Error::ParseConfig {
            path: path.to_owned(),
            message,
        })?;
        for p in [
            &mut config.tls.cert_file,
            &mut config.tls.key_file,
            &mut config.data_dir,
            &mut config.data_key_file,
            &mut config.token_public_key_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values the type system does not.
    pub fn validate(&self) -> Result<()> {
        if !valid_tenant_id(&self.tenant_id) {
            return Err(Error::InvalidConfig(
                "tenant_id must be 1 to 63 characters of a-z, 0-9 and '-'".into(),
            ));
        }
        self.retention
            .validate(HARD_CAP_MAX_AGE_HOURS)
            .map_err(Error::InvalidRetention)
    }

    /// Names of the keys that differ from `new` and only take effect after a restart.
    /// Retention and the TLS file contents apply live; everything else does not.
    pub fn restart_required_changes(&self, new: &Config) -> Vec<&'static str> {
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

/// Tenant ids are DNS labels (they name namespaces), so they never contain separators.
fn valid_tenant_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Process settings around the config file: where it is, and the timings the binary
/// takes from flags (tests shorten them).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The config file, polled for changes.
    pub config_path: PathBuf,
    /// Its contents at start.
    pub config: Config,
    /// How often the config, certificate and token key files are checked for changes.
    pub reload_interval: Duration,
    /// How often the pruner runs when nothing else wakes it.
    pub prune_interval: Duration,
    /// Executions deleted per transaction by the pruner.
    pub prune_batch_size: u32,
    /// Largest accepted request body, in bytes (413 past it).
    pub max_body_bytes: usize,
}

/// Default of [`RunConfig::reload_interval`].
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Default of [`RunConfig::prune_interval`].
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(300);
/// Default of [`RunConfig::prune_batch_size`].
pub const DEFAULT_PRUNE_BATCH_SIZE: u32 = 1000;
/// Default of [`RunConfig::max_body_bytes`]: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

impl RunConfig {
    /// Loads `config_path` and uses the default timings.
    pub fn load(config_path: &Path) -> Result<RunConfig> {
        Ok(RunConfig {
            config_path: config_path.to_owned(),
            config: Config::load(config_path)?,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            prune_interval: DEFAULT_PRUNE_INTERVAL,
            prune_batch_size: DEFAULT_PRUNE_BATCH_SIZE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const YAML: &str = "\
tenant_id: acme
listen: 0.0.0.0:8443
tls: {cert_file: tls/tls.crt, key_file: /abs/tls.key}
data_dir: data
data_key_file: keys/data.key
token_public_key_file: keys/token.pub
retention: {max_age_hours: 48, max_count: 100}
";

    #[test]
    fn yaml_and_json_parse_to_the_same_config() {
        let base = Path::new("/etc/tenantry");
        let yaml = Config::parse(YAML, Path::new("c.yaml"), base).unwrap();
        let json_text = r#"{"tenant_id":"acme","listen":"0.0.0.0:8443",
            "tls":{"cert_file":"tls/tls.crt","key_file":"/abs/tls.key"},
            "data_dir":"data","data_key_file":"keys/data.key",
            "token_public_key_file":"keys/token.pub",
            "retention":{"max_age_hours":48,"max_count":100}}"#;
        let json = Config::parse(json_text, Path::new("c.json"), base).unwrap();
        assert_eq!(yaml, json);
        assert_eq!(yaml.tls.cert_file, Path::new("/etc/tenantry/tls/tls.crt"));
        assert_eq!(yaml.tls.key_file, Path::new("/abs/tls.key"));
        assert_eq!(
            yaml.retention,
            RetentionPolicy {
                max_age_hours: 48,
                max_count: 100
            }
        );
    }

    #[test]
    fn unknown_or_missing_keys_and_bad_values_are_refused() {
        let base = Path::new("/");
        let typo = YAML.replace("data_dir:", "data_directory:");
        let err = Config::parse(&typo, Path::new("c.yaml"), base).unwrap_err();
        assert!(err.to_string().contains("data_directory"), "{err}");
        let missing = YAML.replace("tenant_id: acme\n", "");
        assert!(Config::parse(&missing, Path::new("c.yaml"), base).is_err());
        let bad_tenant = YAML.replace("tenant_id: acme", "tenant_id: Acme/1");
        assert!(matches!(
            Config::parse(&bad_tenant, Path::new("c.yaml"), base),
            Err(Error::InvalidConfig(_))
        ));
        let too_long = YAML.replace("max_age_hours: 48", "max_age_hours: 721");
        assert!(matches!(
            Config::parse(&too_long, Path::new("c.yaml"), base),
            Err(Error::InvalidRetention(_))
        ));
    }

    #[test]
    fn only_non_retention_changes_need_a_restart() {
        let base = Path::new("/");
        let old = Config::parse(YAML, Path::new("c.yaml"), base).unwrap();
        let mut new = old.clone();
        new.retention.max_count = 5;
        assert!(old.restart_required_changes(&new).is_empty());
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.data_key_file = "/other".into();
        assert_eq!(
            old.restart_required_changes(&new),
            vec!["listen", "data_key_file"]
        );
    }
}
