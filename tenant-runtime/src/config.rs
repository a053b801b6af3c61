//! Reading the runtime's configuration file ([`RuntimeConfig`], the contract shared with
//! the operator and the API's local mode, lives in `tenantry-proto`) and the process
//! settings around it.
//!
//! The file is YAML or JSON (by extension: `.json` is JSON, anything else YAML, which also
//! reads JSON). Relative paths are relative to the config file's directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tenantry_proto::runtime_config::{RuntimeConfig, TlsFiles};

use crate::clock::Clock;
use crate::error::{Error, Result};

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<RuntimeConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
        what: "config file",
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, path, base)
}

/// Parses `text` (named `path` in errors; JSON when it ends in `.json`), resolves
/// relative paths against `base`, and validates.
pub fn parse(text: &str, path: &Path, base: &Path) -> Result<RuntimeConfig> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed: Result<RuntimeConfig, String> = if is_json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    };
    let mut config = parsed.map_err(|message| Error::ParseConfig {
        path: path.to_owned(),
        message,
    })?;
    config.resolve_paths(base);
    config.validate().map_err(Error::InvalidConfig)?;
    Ok(config)
}

/// Process settings around the config file: where it is, and the timings the binary
/// takes from flags (tests shorten them).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The config file, polled for changes.
    pub config_path: PathBuf,
    /// Its contents at start.
    pub config: RuntimeConfig,
    /// How often the config, certificate and token key files are checked for changes.
    pub reload_interval: Duration,
    /// How often the pruner runs when nothing else wakes it.
    pub prune_interval: Duration,
    /// Executions deleted per transaction by the pruner.
    pub prune_batch_size: u32,
    /// Largest accepted request body, in bytes (413 past it).
    pub max_body_bytes: usize,
    /// Overrides the `backup` section's interval (tests shorten it below the minute the
    /// config allows).
    pub backup_interval: Option<Duration>,
    /// Where the runtime reads the time (tests pin it).
    pub clock: Clock,
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
            config: load(config_path)?,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            prune_interval: DEFAULT_PRUNE_INTERVAL,
            prune_batch_size: DEFAULT_PRUNE_BATCH_SIZE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            backup_interval: None,
            clock: Clock::system(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tenantry_proto::retention::RetentionPolicy;

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
        let yaml = parse(YAML, Path::new("c.yaml"), base).unwrap();
        let json_text = r#"{"tenant_id":"acme","listen":"0.0.0.0:8443",
            "tls":{"cert_file":"tls/tls.crt","key_file":"/abs/tls.key"},
            "data_dir":"data","data_key_file":"keys/data.key",
            "token_public_key_file":"keys/token.pub",
            "retention":{"max_age_hours":48,"max_count":100}}"#;
        let json = parse(json_text, Path::new("c.json"), base).unwrap();
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
        let err = parse(&typo, Path::new("c.yaml"), base).unwrap_err();
        assert!(err.to_string().contains("data_directory"), "{err}");
        let missing = YAML.replace("tenant_id: acme\n", "");
        assert!(parse(&missing, Path::new("c.yaml"), base).is_err());
        let bad_tenant = YAML.replace("tenant_id: acme", "tenant_id: Acme/1");
        assert!(matches!(
            parse(&bad_tenant, Path::new("c.yaml"), base),
            Err(Error::InvalidConfig(_))
        ));
        let too_long = YAML.replace("max_age_hours: 48", "max_age_hours: 721");
        assert!(matches!(
            parse(&too_long, Path::new("c.yaml"), base),
            Err(Error::InvalidConfig(_))
        ));
    }
}
