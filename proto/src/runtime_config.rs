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
//! data_key_file: /keys/data.key        # exactly 32 random bytes, raw: the key-encryption key
//! previous_data_key_file: /keys/data.key.previous  # optional: only unwraps, during a rotation
//! data_key_period: 1d                  # optional: one execution data key per period (default 1d)
//! token_public_key_file: /keys/token.pub  # Ed25519, SPKI PEM
//! retention: { max_age_hours: 336, max_count: 10000 }
//! oauth2:                              # optional; without it no OAuth 2 credential can be made
//!   allowed_hosts: [accounts.example.com, "*.example.org", "auth.example.net:8443"]
//!   ca_file: /etc/tenantry/provider-ca.pem   # optional: trusted besides the system's roots
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
    /// The tenant's 32-byte key-encryption key (KEK): it wraps the data keys of the
    /// instance's key store. Replacing the file re-wraps them live.
    pub data_key_file: PathBuf,
    /// The KEK before the last rotation, used only to unwrap key-store entries not yet
    /// re-wrapped (a restart in the middle of a rotation). Optional; a missing file is
    /// ignored, so it can name a key that exists only during a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_data_key_file: Option<PathBuf>,
    /// How long one execution data key's period is: a whole number of `s`, `m`, `h` or
    /// `d` units (`1d`, `6h`), from 1 hour to 30 days. Absent: one day. Executions are
    /// sealed under the key of the period of the time retention ages them from, and a
    /// period's key is deleted once retention has deleted all of its executions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key_period: Option<String>,
    /// The API's Ed25519 token-signing public key (SPKI PEM).
    pub token_public_key_file: PathBuf,
    /// How long execution data is kept.
    pub retention: RetentionPolicy,
    /// Which OAuth 2 providers this instance may call. Absent means none; omitted when
    /// serialized while empty, so configs written before it existed stay byte-identical.
    #[serde(default, skip_serializing_if = "OAuth2Config::is_empty")]
    pub oauth2: OAuth2Config,
    /// Scheduled backups of the store. Absent means none (and is left out when serialized).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSchedule>,
}

/// One execution data key per day unless `data_key_period` says otherwise.
pub const DEFAULT_DATA_KEY_PERIOD: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The id of a key-encryption key: the first 8 bytes, in hex, of SHA-256 over a
/// domain-separation label and the key. Names the key (in the runtime's key store, its
/// `/metrics`, the operator's Events) without revealing it.
pub fn kek_id(key: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"tenantry-runtime/kek-id/v1\0");
    hash.update(key);
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `backup` section: the runtime backs its store up on a schedule, encrypted to the
/// recipient, keeping the newest `keep` backups in `directory` (and naming the newest in
/// `last-backup.json` there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    /// Where backups go (a volume of their own on Kubernetes).
    pub directory: PathBuf,
    /// How often: a whole number of `s`, `m`, `h` or `d` units (`6h`, `1d`, `90m`), at
    /// least a minute.
    pub interval: String,
    /// How many backups to keep (1 to 1000).
    pub keep: u32,
    /// The age X25519 recipients (`age1…` lines) backups are encrypted to.
    pub recipient_file: PathBuf,
}

impl BackupSchedule {
    /// The interval as a duration (validated configs always have one).
    pub fn interval(&self) -> Option<std::time::Duration> {
        parse_interval(&self.interval)
    }
}

/// Parses a backup interval: one or more `<number><unit>` with units `s`, `m`, `h`, `d`
/// (`1h30m`); `None` when malformed, zero or over 366 days.
pub fn parse_interval(text: &str) -> Option<std::time::Duration> {
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(
                number
                    .unwrap_or(0)
                    .checked_mul(10)?
                    .checked_add(u64::from(d))?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        total = total.checked_add(number.take()?.checked_mul(unit)?)?;
    }
    if number.is_some() || total == 0 || total > 366 * 86_400 {
        return None;
    }
    Some(std::time::Duration::from_secs(total))
}

/// The OAuth 2 section: the hosts a credential's endpoints may name, and an optional extra
/// CA for them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// Provider hosts: `host`, `host:port`, or `*.domain` (any subdomain of `domain`,
    /// not `domain` itself). Lowercase DNS names or IP addresses; without a port any port
    /// matches.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// PEM certificates trusted for provider connections besides the system's roots (a
    /// provider behind a private CA, or a test server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl OAuth2Config {
    /// True when nothing is set (the section is then left out of the file).
    pub fn is_empty(&self) -> bool {
        self.allowed_hosts.is_empty() && self.ca_file.is_none()
    }

    /// Whether `host` (as in a URL: lowercase, IPv6 in brackets) on `port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.allowed_hosts
            .iter()
            .any(|entry| host_entry_matches(entry, host, port))
    }
}

/// Splits an allow-list entry into its host pattern and optional port.
fn split_entry(entry: &str) -> (&str, Option<&str>) {
    // `[::1]:443`, `[::1]`, `host:443`, `host`; a bare IPv6 address has several colons.
    if let Some(rest) = entry.strip_prefix('[') {
        // Anything after the bracket but `:port` leaves the whole entry as the pattern,
        // which no host matches and validation refuses (`[::]/0`, found by fuzzing).
        return match rest.split_once(']') {
            Some((ip, "")) => (&entry[..ip.len() + 2], None),
            Some((ip, tail)) => match tail.strip_prefix(':') {
                Some(port) => (&entry[..ip.len() + 2], Some(port)),
                None => (entry, None),
            },
            None => (entry, None),
        };
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (entry, None),
    }
}

fn host_entry_matches(entry: &str, host: &str, port: u16) -> bool {
    let (pattern, entry_port) = split_entry(entry);
    if let Some(p) = entry_port
        && p.parse::<u16>().ok() != Some(port)
    {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => pattern == host,
    }
}

/// Why an `oauth2.allowed_hosts` entry is refused, or `None` when it is fine.
pub fn host_entry_problem(entry: &str) -> Option<&'static str> {
    let (pattern, port) = split_entry(entry);
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Some("port must be 1 to 65535");
    }
    if let Some(bracketed) = pattern.strip_prefix('[') {
        // `[` alone, or no closing bracket, is no address (found by the fuzzer).
        let ip = bracketed.strip_suffix(']').unwrap_or(bracketed);
        return (!bracketed.ends_with(']') || ip.parse::<std::net::Ipv6Addr>().is_err())
            .then_some("not an IPv6 address in brackets");
    }
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!labels_ok).then_some(
        "must be a lowercase DNS name or IP address, optionally `*.`-prefixed and with `:port`",
    )
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
    /// `data_key_period` is out of bounds.
    #[error("data_key_period must be like 1d or 6h (s, m, h, d units), from 1h to 30d")]
    DataKeyPeriod,
    /// The `backup` section is out of bounds.
    #[error("backup: {0}")]
    Backup(&'static str),
    /// An `oauth2.allowed_hosts` entry is not a host pattern.
    #[error("oauth2.allowed_hosts entry {entry:?}: {problem}")]
    AllowedHost {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        problem: &'static str,
    },
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
        ]
        .into_iter()
        .chain(self.previous_data_key_file.as_mut())
        .chain(self.oauth2.ca_file.as_mut())
        .chain(
            self.backup
                .as_mut()
                .into_iter()
                .flat_map(|b| [&mut b.directory, &mut b.recipient_file]),
        ) {
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
        if let Some((entry, problem)) = self
            .oauth2
            .allowed_hosts
            .iter()
            .find_map(|e| host_entry_problem(e).map(|p| (e, p)))
        {
            return Err(RuntimeConfigError::AllowedHost {
                entry: entry.clone(),
                problem,
            });
        }
        if self.data_key_period.is_some() && self.data_key_period().is_none() {
            return Err(RuntimeConfigError::DataKeyPeriod);
        }
        if let Some(backup) = &self.backup {
            match backup.interval() {
                None => {
                    return Err(RuntimeConfigError::Backup(
                        "interval must be like 6h, 1d or 90m (s, m, h, d units; up to 366d)",
                    ));
                }
                Some(i) if i < std::time::Duration::from_secs(60) => {
                    return Err(RuntimeConfigError::Backup("interval must be at least 1m"));
                }
                Some(_) => {}
            }
            if !(1..=1000).contains(&backup.keep) {
                return Err(RuntimeConfigError::Backup("keep must be 1 to 1000"));
            }
        }
        self.retention
            .validate(HARD_CAP_MAX_AGE_HOURS)
            .map_err(RuntimeConfigError::Retention)
    }

    /// The length of an execution data key's period ([`DEFAULT_DATA_KEY_PERIOD`] when not
    /// set); `None` when the value is malformed or out of bounds.
    pub fn data_key_period(&self) -> Option<std::time::Duration> {
        let Some(text) = &self.data_key_period else {
            return Some(DEFAULT_DATA_KEY_PERIOD);
        };
        parse_interval(text).filter(|p| {
            (std::time::Duration::from_secs(3600)..=std::time::Duration::from_secs(30 * 86_400))
                .contains(p)
        })
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
        if self.previous_data_key_file != new.previous_data_key_file {
            changed.push("previous_data_key_file");
        }
        if self.data_key_period != new.data_key_period {
            changed.push("data_key_period");
        }
        if self.token_public_key_file != new.token_public_key_file {
            changed.push("token_public_key_file");
        }
        if self.oauth2 != new.oauth2 {
            changed.push("oauth2");
        }
        if self.backup != new.backup {
            changed.push("backup");
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
            previous_data_key_file: None,
            data_key_period: None,
            token_public_key_file: "keys/token.pub".into(),
            retention: RetentionPolicy {
                max_age_hours: 48,
                max_count: 100,
            },
            backup: None,
            oauth2: OAuth2Config::default(),
        }
    }

    #[test]
    fn backup_intervals_parse_and_bad_sections_are_refused() {
        use std::time::Duration;
        assert_eq!(parse_interval("6h"), Some(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_interval("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_interval("1d"), Some(Duration::from_secs(86_400)));
        for bad in [
            "",
            "6",
            "h",
            "0m",
            "1w",
            "6 h",
            "-1h",
            "367d",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_interval(bad), None, "{bad:?}");
        }
        let mut c = config();
        c.backup = Some(BackupSchedule {
            directory: "backups".into(),
            interval: "6h".into(),
            keep: 7,
            recipient_file: "keys/backup.pub".into(),
        });
        c.validate().unwrap();
        c.resolve_paths(Path::new("/etc/t"));
        let b = c.backup.clone().unwrap();
        assert_eq!(b.directory, Path::new("/etc/t/backups"));
        assert_eq!(b.recipient_file, Path::new("/etc/t/keys/backup.pub"));
        for (interval, keep) in [("30s", 7), ("6x", 7), ("6h", 0), ("6h", 1001)] {
            let mut bad = c.clone();
            bad.backup = Some(BackupSchedule {
                interval: interval.into(),
                keep,
                ..b.clone()
            });
            assert!(
                matches!(bad.validate(), Err(RuntimeConfigError::Backup(_))),
                "{interval} {keep}"
            );
        }
        let with_backup = RuntimeConfig {
            backup: c.backup.clone(),
            ..config()
        };
        assert_eq!(
            config().restart_required_changes(&with_backup),
            vec!["backup"]
        );
        // Absent, it is left out of the file.
        assert!(!serde_json::to_string(&config()).unwrap().contains("backup"));
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
    fn oauth2_section_is_optional_and_left_out_while_empty() {
        let mut json = serde_json::to_value(config()).unwrap();
        assert!(json.get("oauth2").is_none());
        json["oauth2"] =
            serde_json::json!({"allowed_hosts": ["auth.example.com"], "ca_file": "ca.pem"});
        let mut c: RuntimeConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(c.oauth2.allowed_hosts, ["auth.example.com"]);
        c.resolve_paths(Path::new("/etc/tenantry"));
        assert_eq!(
            c.oauth2.ca_file.as_deref(),
            Some(Path::new("/etc/tenantry/ca.pem"))
        );
        json["oauth2"]["allowed_host"] = serde_json::json!([]);
        let err = serde_json::from_value::<RuntimeConfig>(json).unwrap_err();
        assert!(err.to_string().contains("allowed_host"), "{err}");
    }

    #[test]
    fn allowed_hosts_match_exactly_by_subdomain_wildcard_and_port() {
        let oauth2 = OAuth2Config {
            allowed_hosts: vec![
                "auth.example.com".into(),
                "*.example.org".into(),
                "localhost:8443".into(),
                "[::1]:9000".into(),
                "10.0.0.1".into(),
            ],
            ca_file: None,
        };
        // Found by fuzzing: a lone or unclosed bracket is refused, not a panic.
        for bad in ["[", "[]", "[::1", "[::1]:", "[:0", "[::]/0:", "[::1]x"] {
            assert!(host_entry_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(host_entry_problem("[::1]:9000"), None);
        assert!(
            !OAuth2Config {
                allowed_hosts: vec!["[::]/0".into()],
                ca_file: None,
            }
            .allows("[::]", 443)
        );
        assert!(oauth2.allows("auth.example.com", 443));
        assert!(oauth2.allows("auth.example.com", 8443));
        assert!(!oauth2.allows("evil-auth.example.com", 443));
        assert!(!oauth2.allows("auth.example.com.evil.net", 443));
        assert!(oauth2.allows("login.example.org", 443));
        assert!(oauth2.allows("a.b.example.org", 443));
        assert!(!oauth2.allows("example.org", 443));
        assert!(!oauth2.allows("badexample.org", 443));
        assert!(oauth2.allows("localhost", 8443));
        assert!(!oauth2.allows("localhost", 443));
        assert!(oauth2.allows("[::1]", 9000));
        assert!(!oauth2.allows("[::1]", 443));
        assert!(oauth2.allows("10.0.0.1", 1));
        assert!(!OAuth2Config::default().allows("auth.example.com", 443));
    }

    #[test]
    fn bad_allowed_hosts_are_refused() {
        for bad in [
            "Auth.Example.com",
            "",
            "*.",
            "a..b",
            "host:0",
            "host:x",
            "[zz]",
            "https://a.b",
            "-a.b",
        ] {
            let mut c = config();
            c.oauth2.allowed_hosts = vec![bad.into()];
            assert!(
                matches!(c.validate(), Err(RuntimeConfigError::AllowedHost { .. })),
                "{bad:?} accepted"
            );
        }
        let mut c = config();
        c.oauth2.allowed_hosts = vec![
            "a.b".into(),
            "*.c.d:443".into(),
            "[::1]".into(),
            "127.0.0.1:8443".into(),
        ];
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn data_key_period_defaults_to_a_day_and_is_bounded() {
        use std::time::Duration;
        assert_eq!(
            config().data_key_period(),
            Some(Duration::from_secs(86_400))
        );
        let mut c = config();
        c.data_key_period = Some("6h".into());
        assert_eq!(c.data_key_period(), Some(Duration::from_secs(6 * 3600)));
        assert_eq!(c.validate(), Ok(()));
        for bad in ["59m", "31d", "1x", ""] {
            c.data_key_period = Some(bad.into());
            assert_eq!(
                c.validate(),
                Err(RuntimeConfigError::DataKeyPeriod),
                "{bad}"
            );
        }
        let json = serde_json::to_string(&config()).unwrap();
        assert!(!json.contains("data_key_period") && !json.contains("previous"));
        let mut c = config();
        c.previous_data_key_file = Some("keys/data.key.previous".into());
        c.resolve_paths(Path::new("/etc/t"));
        assert_eq!(
            c.previous_data_key_file.as_deref(),
            Some(Path::new("/etc/t/keys/data.key.previous"))
        );
    }

    #[test]
    fn kek_ids_are_sixteen_hex_digits_of_a_labelled_hash() {
        let id = kek_id(&[7; 32]);
        assert_eq!(id.len(), 16);
        assert_eq!(id, kek_id(&[7; 32]));
        assert_ne!(id, kek_id(&[8; 32]));
        assert_ne!(id, "0707070707070707");
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
