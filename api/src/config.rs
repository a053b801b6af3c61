//! Command-line configuration of `tenantry-api`: one clap struct per subcommand, every flag
//! also settable through a `TENANTRY_…` environment variable. Parsed once, in `main`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

use crate::password::HashParams;
use crate::state::SessionPolicy;

/// The Tenantry control API.
#[derive(Debug, Parser)]
#[command(name = "tenantry-api", version, about, args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API.
    Serve(ServeArgs),
    /// Run the whole control plane on this machine: the API on SQLite in `--data-dir`, and
    /// one `tenant-runtime` process per tenant (the `local` provisioner), and the signup
    /// portal (`tenantry-portal`) on `--portal-listen`. No cluster needed.
    Dev(DevArgs),
    /// Create the first admin (or make an existing user admin); reads the password from stdin.
    BootstrapAdmin(BootstrapArgs),
    /// Write new keys for a production install into `--out-dir`: `master.key` and
    /// `token-signing.key` (mode 0600, for the API's Secret) and `token-public.pem` (for the
    /// operator's Secret); with `--dkim`, the DKIM key `dkim.key` (Ed25519, 0600) instead.
    /// Refuses to overwrite existing files.
    Keygen(KeygenArgs),
    /// Print the SPF, DKIM and DMARC TXT records of the mail domain, in zone-file syntax
    /// (or `--json`).
    DnsRecords(DnsRecordsArgs),
    /// Write an encrypted backup of the control database: one consistent snapshot of every
    /// table (sessions excepted), compressed and encrypted to the `--recipient-file`s.
    Backup(BackupArgs),
    /// Restore a backup into an empty database (SQLite or PostgreSQL, whichever the backup
    /// came from); checks the audit chain and that the master key opens the backup's
    /// secrets before anything is committed.
    Restore(RestoreArgs),
    /// Write a new backup key pair into `--out-dir`: `backup.key` (the age identity that
    /// opens backups, 0600; keep it away from the backups) and `backup.pub` (the recipient
    /// that backups are encrypted to). Refuses to overwrite.
    BackupKeygen(BackupKeygenArgs),
    /// List the newest backup of each kind (and tenant) under `--dir`, with its age;
    /// exits 2 when one is older than twice `--interval` (stale).
    Backups(BackupsArgs),
    /// Rotate the master key while the API serves: add the key of `--new-key-file` (made
    /// if missing) to `--master-key-file`, wait for every running API to hold it, make it
    /// the key that seals, and re-seal every secret in batches. Resumable: run it again
    /// to finish an interrupted rotation.
    RotateMasterKey(RotateMasterKeyArgs),
    /// The master key ring: `status` counts the secrets each key still seals.
    MasterKeys(MasterKeysArgs),
    /// Rotate the instance-token signing key: add a new key (sealed in the database) that
    /// the API signs with after `--token-key-overlap`; the keys it supersedes retire one
    /// overlap after that. Runtimes get the new public key before it signs, and keep the
    /// old one until every token it signed has expired: no token is refused.
    RotateTokenKey(RotateTokenKeyArgs),
    /// Show the instance-token signing keys (kid, state, created, signs from, retires
    /// at); `token-keys public` prints the public key set the instances accept (PEM).
    TokenKeys(TokenKeysArgs),
    /// Rotate the local CA of `dev`'s `--data-dir`, while `dev` runs: a new CA issues, and
    /// `ca.crt` holds it and the previous one; the running `dev` re-issues every
    /// instance's certificate from the new CA within `--ca-rotation-window` (the runtimes
    /// reload them without a restart), then drops the previous CA from `ca.crt`. Audited
    /// in the database (`local_ca.rotate`, then `local_ca.retire`).
    RotateLocalCa(RotateLocalCaArgs),
}

/// What `dev` does instead of running the control plane.
#[derive(Debug, Clone, Subcommand)]
pub enum DevAction {
    /// Rotate the local CA (see `tenantry-api rotate-local-ca`).
    RotateCa(RotateLocalCaArgs),
}

/// `rotate-local-ca`.
#[derive(Debug, Clone, Args)]
pub struct RotateLocalCaArgs {
    /// The data directory of `dev` (its CA) and its database (the audit log).
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Every instance certificate is re-issued by the new CA within this time (spread
    /// over it), and the previous CA leaves `ca.crt` after it. Clients that pinned the
    /// old `ca.crt` must read the new one within it.
    #[arg(long, env = "TENANTRY_CA_ROTATION_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ca_rotation_window: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `rotate-token-key`.
#[derive(Debug, Clone, Args)]
pub struct RotateTokenKeyArgs {
    /// Where the database is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// How long the new key is published before it signs, and the old one after it
    /// stopped signing. At least 16m (the longest a token lives, 15m, plus 1m of clock
    /// skew); longer gives the instances more time to pick up the new key (Kubernetes
    /// Secret volumes take a minute or two).
    #[arg(long, env = "TENANTRY_TOKEN_KEY_OVERLAP", default_value = "20m", value_parser = humantime::parse_duration)]
    pub token_key_overlap: Duration,
    /// TESTS ONLY: accept overlaps down to this instead of 16m, for end-to-end tests that
    /// run a whole rotation in seconds with short-lived tokens. Never in production: a
    /// token could outlive its key and be refused.
    #[arg(long, env = "TENANTRY_TEST_ONLY_MIN_TOKEN_KEY_OVERLAP", hide = true, value_parser = humantime::parse_duration)]
    pub test_only_min_token_key_overlap: Option<Duration>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `token-keys`.
#[derive(Debug, Clone, Args)]
pub struct TokenKeysArgs {
    /// `status` (a table of the keys) or `public` (the published PEM set).
    #[arg(value_enum, default_value_t = TokenKeysView::Status)]
    pub view: TokenKeysView,
    /// Where the database is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `token-keys` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenKeysView {
    /// One line per key.
    Status,
    /// The public key set instances accept, as PEM blocks.
    Public,
}

/// `rotate-master-key`.
#[derive(Debug, Clone, Args)]
pub struct RotateMasterKeyArgs {
    /// The database and its key file (`--master-key-file`, or `master.key` beside a
    /// SQLite database), which gets the new key.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The new key (base64 of 32 bytes, like the key file's lines); generated (0600)
    /// when the file does not exist.
    #[arg(long)]
    pub new_key_file: PathBuf,
    /// Secrets re-sealed per transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// How long to wait for every running API to hold the new key, then to seal with it.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `master-keys`.
#[derive(Debug, Clone, Args)]
pub struct MasterKeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: MasterKeysCommand,
}

/// `master-keys` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum MasterKeysCommand {
    /// How many secrets each key of the key file (and any key missing from it) seals,
    /// which key seals new ones, and which keys each running API holds. A key that seals
    /// no secret can leave the key file.
    Status(MasterKeysStatusArgs),
}

/// `master-keys status`.
#[derive(Debug, Clone, Args)]
pub struct MasterKeysStatusArgs {
    /// The database and its key file.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A `--master-key-reload-interval`: 1 s to 10 min.
fn parse_reload_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
        return Err("between 1s and 10m".into());
    }
    Ok(d)
}

/// Scheduled backups of `serve` and `dev`.
#[derive(Debug, Clone, Args)]
pub struct BackupScheduleArgs {
    /// Take scheduled, encrypted backups into this directory: the control database's (by
    /// this API, into `control/`) and, with the `local` provisioner, every tenant's store
    /// (by its runtime, into `tenants/<id>/`). Give it to one replica only; on Kubernetes
    /// the chart's CronJob and the Tenants' `spec.backup` take them instead.
    #[arg(long, env = "TENANTRY_BACKUP_DIR", requires = "backup_recipient_file")]
    pub backup_dir: Option<PathBuf>,
    /// How often: `6h`, `1d`, `90m` (s, m, h, d units; at least 1m).
    #[arg(long, env = "TENANTRY_BACKUP_INTERVAL", default_value = "24h", value_parser = parse_backup_interval)]
    pub backup_interval: String,
    /// Backups of each kind (and tenant) to keep.
    #[arg(long, env = "TENANTRY_BACKUP_KEEP", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub backup_keep: u32,
    /// The age recipients (`age1…` lines; `backup-keygen` writes one) backups are
    /// encrypted to; required with `--backup-dir`.
    #[arg(long, env = "TENANTRY_BACKUP_RECIPIENT_FILE", requires = "backup_dir")]
    pub backup_recipient_file: Option<PathBuf>,
}

/// A backup interval `serve` and the runtimes accept.
fn parse_backup_interval(text: &str) -> Result<String, String> {
    match tenantry_proto::runtime_config::parse_interval(text) {
        Some(d) if d >= Duration::from_secs(60) => Ok(text.to_owned()),
        Some(_) => Err("at least 1m".into()),
        None => Err("like 6h, 1d or 90m (s, m, h, d units; up to 366d)".into()),
    }
}

impl BackupScheduleArgs {
    /// The schedule, when `--backup-dir` is set (paths made absolute: runtimes read them
    /// from their own directories).
    pub fn settings(&self) -> std::io::Result<Option<crate::backup::BackupSettings>> {
        let (Some(dir), Some(recipient_file)) = (&self.backup_dir, &self.backup_recipient_file)
        else {
            return Ok(None);
        };
        Ok(Some(crate::backup::BackupSettings {
            dir: std::path::absolute(dir)?,
            interval_text: self.backup_interval.clone(),
            interval: tenantry_proto::runtime_config::parse_interval(&self.backup_interval)
                .unwrap_or(Duration::from_secs(86_400)),
            keep: self.backup_keep,
            recipient_file: std::path::absolute(recipient_file)?,
        }))
    }
}

/// `backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Where the database is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The backup file to write (must not exist), or a directory to write
    /// `control-database-<time>.tbk` into.
    #[arg(long)]
    pub out: PathBuf,
    /// A file of age X25519 recipients (`age1…` lines, e.g. `backup.pub`); repeat for more.
    /// Any one of their identities opens the backup.
    #[arg(
        long = "recipient-file",
        env = "TENANTRY_BACKUP_RECIPIENT_FILE",
        required = true,
        value_delimiter = ','
    )]
    pub recipient_files: Vec<PathBuf>,
    /// Keep only this many control database backups in the `--out` directory (0: keep all).
    #[arg(long, env = "TENANTRY_BACKUP_KEEP", default_value_t = 0)]
    pub keep: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Where to restore to: `--database-url` (an empty database) and the master key the
    /// backed-up API used (`--master-key-file`, or `master.key` beside a SQLite database;
    /// it must exist).
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The backup file.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// The age identity file (`backup.key`) that opens it.
    #[arg(long, env = "TENANTRY_BACKUP_IDENTITY_FILE")]
    pub identity_file: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `backup-keygen`.
#[derive(Debug, Clone, Args)]
pub struct BackupKeygenArgs {
    /// Directory to write `backup.key` and `backup.pub` into (created if missing).
    #[arg(long)]
    pub out_dir: PathBuf,
}

/// `backups`.
#[derive(Debug, Clone, Args)]
pub struct BackupsArgs {
    /// The backup directory (as `--backup-dir`); its subdirectories are read too.
    #[arg(long)]
    pub dir: PathBuf,
    /// The schedule backups are taken on: one older than twice this is stale.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `dns-records`.
#[derive(Debug, Clone, Args)]
pub struct DnsRecordsArgs {
    /// The mail domain (of `--mail-from`).
    #[arg(long, value_parser = parse_domain)]
    pub domain: String,
    /// The DKIM selector.
    #[arg(long, default_value = "tenantry", value_parser = parse_selector)]
    pub dkim_selector: String,
    /// The DKIM private key; its public half goes into the record.
    #[arg(long)]
    pub dkim_key_file: PathBuf,
    /// An SPF `include:` (the relay's SPF domain); repeat or separate with commas.
    #[arg(long, value_delimiter = ',', value_parser = crate::mail::dns::parse_record_token)]
    pub spf_include: Vec<String>,
    /// A DMARC aggregate report address, `mailto:…`; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', value_parser = crate::mail::dns::parse_rua)]
    pub dmarc_rua: Vec<String>,
    /// DMARC policy.
    #[arg(long, value_enum, default_value_t = crate::mail::dns::DmarcPolicy::Reject)]
    pub dmarc_policy: crate::mail::dns::DmarcPolicy,
    /// Print JSON (an array of `{kind, name, type, value}`) instead of zone-file lines.
    #[arg(long)]
    pub json: bool,
}

/// `keygen`.
#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Directory to write the keys into (created if missing).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Write only the DKIM signing key, `dkim.key` (Ed25519, PKCS#8 PEM, 0600).
    #[arg(long)]
    pub dkim: bool,
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Directory for local state: the SQLite database and keys by default, and in `dev`
    /// the local CA (`ca.crt`) and every tenant's instance.
    #[arg(long, env = "TENANTRY_DATA_DIR", default_value = ".tenantry")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST/DB`; default
    /// `sqlite://<data-dir>/tenantry.db`. A secret: it may hold the database password.
    /// Surrounding whitespace (a trailing newline from a file or Secret) is ignored.
    #[arg(long, env = "TENANTRY_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<SecretString>,
    /// File holding the 32-byte master key (base64) that encrypts secrets at rest. With a
    /// SQLite database and no file given, `master.key` beside the database is used (and
    /// created on first start).
    #[arg(long, env = "TENANTRY_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// PKCS#8 PEM Ed25519 key that signs instance tokens. With a SQLite database and no
    /// file given, `token-signing.key` beside the database is used (and created on first
    /// start, with its public half in `token-public.pem` for the runtimes).
    #[arg(long, env = "TENANTRY_TOKEN_SIGNING_KEY_FILE")]
    pub token_signing_key_file: Option<PathBuf>,
    /// Argon2id memory cost in KiB (OWASP minimum 19456).
    #[arg(long, env = "TENANTRY_ARGON2_MEMORY_KIB", default_value_t = HashParams::default().memory_kib)]
    pub argon2_memory_kib: u32,
    /// Argon2id iterations (OWASP minimum 2 at 19 MiB).
    #[arg(long, env = "TENANTRY_ARGON2_ITERATIONS", default_value_t = HashParams::default().iterations)]
    pub argon2_iterations: u32,
    /// Argon2id lanes.
    #[arg(long, env = "TENANTRY_ARGON2_PARALLELISM", default_value_t = HashParams::default().parallelism)]
    pub argon2_parallelism: u32,
}

impl DatabaseArgs {
    /// The database URL in force.
    pub fn url(&self) -> SecretString {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("tenantry.db").display()).into(),
        }
    }

    /// The argon2 parameters.
    pub fn hash_params(&self) -> HashParams {
        HashParams {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }
}

/// `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TENANTRY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics (`/metrics`, plain HTTP) on this address; none when unset.
    #[arg(long, env = "TENANTRY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Database and key settings.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Scheduled backups.
    #[command(flatten)]
    pub backup: BackupScheduleArgs,
    /// How often the master key file and the database's primary key are looked at (a
    /// rotation waits for every running API to take up the new key).
    #[arg(long, env = "TENANTRY_MASTER_KEY_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_reload_interval)]
    pub master_key_reload_interval: Duration,
    /// A session unused this long ends (`90s`, `30m`, `12h`).
    #[arg(long, env = "TENANTRY_SESSION_IDLE_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub session_idle_timeout: Duration,
    /// A session ends this long after login, used or not.
    #[arg(long, env = "TENANTRY_SESSION_ABSOLUTE_TIMEOUT", default_value = "12h", value_parser = humantime::parse_duration)]
    pub session_absolute_timeout: Duration,
    /// Admin rpcs need a second factor verified on the session at most this long ago.
    #[arg(long, env = "TENANTRY_ADMIN_MFA_MAX_AGE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub admin_mfa_max_age: Duration,
    /// Credential-checking rpcs (signup, login, MFA) allowed per second per source address,
    /// refilled continuously; 0 disables the limit.
    #[arg(long, env = "TENANTRY_RATE_LIMIT_PER_SECOND", default_value_t = 10.0)]
    pub rate_limit_per_second: f64,
    /// Burst size of the per-source limit.
    #[arg(long, env = "TENANTRY_RATE_LIMIT_BURST", default_value_t = 50)]
    pub rate_limit_burst: u32,
    /// Database connections at most.
    #[arg(long, env = "TENANTRY_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// PEM certificate chain for TLS on the gRPC port (with `--tls-key-file`); plaintext
    /// when absent.
    #[arg(long, env = "TENANTRY_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `--tls-cert-file`.
    #[arg(long, env = "TENANTRY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Lifetime of instance tokens (at most 15 minutes).
    #[arg(long, env = "TENANTRY_INSTANCE_TOKEN_TTL", default_value = "10m", value_parser = parse_token_ttl)]
    pub instance_token_ttl: Duration,
    /// Issuer name shown in authenticator apps.
    #[arg(long, env = "TENANTRY_TOTP_ISSUER", default_value = "Tenantry")]
    pub totp_issuer: String,
    /// Who runs tenant instances: `none` (records only; phase stays Provisioning),
    /// `local` (a `tenant-runtime` process per tenant under `<data-dir>/tenants`) or
    /// `kubernetes` (a `Tenant` resource per tenant, run by the operator; kubeconfig from
    /// `KUBECONFIG`, `~/.kube/config` or the pod's service account). `dev` always uses
    /// `local`.
    #[arg(long, env = "TENANTRY_PROVISIONER", value_enum, default_value_t = ProvisionerKind::None)]
    pub provisioner: ProvisionerKind,
    /// The `tenant-runtime` binary for the local provisioner; default: next to this
    /// program, else on `PATH`.
    #[arg(long, env = "TENANTRY_RUNTIME_BIN")]
    pub runtime_bin: Option<PathBuf>,
    /// Kubernetes provisioner: public DNS domain of the instances; tenant `acme` gets
    /// `acme.<domain>` on its certificate and as its endpoint. Without it, instances are
    /// reached by their in-cluster service names.
    #[arg(long, env = "TENANTRY_TENANT_DOMAIN", value_parser = parse_domain)]
    pub tenant_domain: Option<String>,
    /// Lifetime of the local provisioner's instance certificates (renewed at two thirds).
    #[arg(long, env = "TENANTRY_LOCAL_CERT_VALIDITY", default_value = "90days", value_parser = humantime::parse_duration)]
    pub local_cert_validity: Duration,
    /// Local provisioner: the OAuth 2 provider hosts every instance's credentials may name
    /// (`host`, `host:port` or `*.domain`, comma-separated; the runtime's
    /// `oauth2.allowed_hosts`). None by default. On Kubernetes it is the Tenant's
    /// `spec.oauth2.allowedHosts`.
    #[arg(long, env = "TENANTRY_LOCAL_OAUTH2_ALLOWED_HOSTS", value_delimiter = ',', value_parser = parse_allowed_host)]
    pub local_oauth2_allowed_hosts: Vec<String>,
    /// Local provisioner: PEM certificates the instances trust for OAuth 2 providers besides
    /// the system's roots (a provider behind a private CA).
    #[arg(long, env = "TENANTRY_LOCAL_OAUTH2_CA_FILE")]
    pub local_oauth2_ca_file: Option<PathBuf>,
    /// The longest a role grant may last, in days (`GrantAdmin.expires_in_days` and the
    /// KEEP decision of an access review); 1 to 3650.
    #[arg(long, env = "TENANTRY_MAX_GRANT_DAYS", default_value_t = crate::access::DEFAULT_GRANT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub max_grant_days: u32,
    /// A scheduled access review starts this long after the last manual or scheduled one
    /// (`90d`, `30days`); `0s` turns scheduled reviews off.
    #[arg(long, env = "TENANTRY_ACCESS_REVIEW_INTERVAL", default_value = "90days", value_parser = humantime::parse_duration)]
    pub access_review_interval: Duration,
    /// Proxies whose `x-forwarded-for` is believed, as CIDRs separated by commas
    /// (`10.0.0.0/8,fd00::/8`; a bare address is one host): calls through them count
    /// against the person's address in the rate limit and the audit log. Default: none.
    #[arg(long, env = "TENANTRY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::forwarded::Cidr>,
    /// How often the instance-token key ring is reread from the database (so every
    /// replica signs with the key a rotation made), due keys retired, and the public key
    /// set republished to the instances (local files, or the operator's Secret).
    #[arg(long, env = "TENANTRY_TOKEN_KEY_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_refresh_interval)]
    pub token_key_refresh_interval: Duration,
    /// Kubernetes provisioner: the Secret (key `public.pem`) the operator copies into every
    /// tenant namespace; the API writes the token public key set into it after each
    /// rotation. Needs `get` and `patch` on that Secret (the chart grants them); without
    /// them, a warning is logged and the set must be copied by hand (docs/operations.md).
    #[arg(long, env = "TENANTRY_TOKEN_PUBLIC_KEY_SECRET")]
    pub token_public_key_secret: Option<String>,
    /// Namespace of `--token-public-key-secret`; default: the API's own (the pod's
    /// namespace, or the kubeconfig context's).
    #[arg(long, env = "TENANTRY_TOKEN_PUBLIC_KEY_SECRET_NAMESPACE")]
    pub token_public_key_secret_namespace: Option<String>,
    /// Mail settings.
    #[command(flatten)]
    pub mail: MailArgs,
}

/// Mail: the relay, the sender, DKIM, links, verification and notices.
#[derive(Debug, Clone, Args)]
pub struct MailArgs {
    /// SMTP relay: `smtp://[user@]host[:port]` (STARTTLS required, port 587) or
    /// `smtps://[user@]host[:port]` (TLS, port 465). Without it mail is written, signed,
    /// to `<data-dir>/outbox/*.eml`. The password goes in `--smtp-password-file`, never in
    /// the URL (one there is refused without being echoed: the URL is read as a secret).
    #[arg(long, env = "TENANTRY_SMTP_URL", hide_env_values = true, value_parser = parse_secret)]
    pub smtp_url: Option<SecretString>,
    /// File holding the SMTP password of the URL's user (mode 0600).
    #[arg(long, env = "TENANTRY_SMTP_PASSWORD_FILE")]
    pub smtp_password_file: Option<PathBuf>,
    /// PEM certificates trusted for the relay besides the system's roots (a relay behind a
    /// private CA).
    #[arg(long, env = "TENANTRY_SMTP_CA_FILE")]
    pub smtp_ca_file: Option<PathBuf>,
    /// The sender, `Name <address>` or an address; its domain signs the mail (DKIM `d=`)
    /// and carries the SPF, DKIM and DMARC records (`tenantry-api dns-records`). Required
    /// with `--smtp-url`.
    #[arg(long, env = "TENANTRY_MAIL_FROM", value_parser = parse_mailbox)]
    pub mail_from: Option<lettre::message::Mailbox>,
    /// DKIM selector: the key is published at `<selector>._domainkey.<domain>`.
    #[arg(long, env = "TENANTRY_DKIM_SELECTOR", default_value = "tenantry", value_parser = parse_selector)]
    pub dkim_selector: String,
    /// PKCS#8 PEM DKIM private key (Ed25519 from `tenantry-api keygen --dkim`, or RSA of
    /// 2048 bits or more). Required with `--smtp-url`; without, `<data-dir>/dkim.key` is
    /// made on first start.
    #[arg(long, env = "TENANTRY_DKIM_KEY_FILE")]
    pub dkim_key_file: Option<PathBuf>,
    /// The portal's base URL, for the links in mail (`/verify-email?token=…`).
    #[arg(long, env = "TENANTRY_PUBLIC_URL", default_value = "http://127.0.0.1:8080", value_parser = parse_public_url)]
    pub public_url: String,
    /// A tenant's instance is provisioned only once its owner has verified their email
    /// address (`--require-email-verification=false` provisions at signup).
    #[arg(long, env = "TENANTRY_REQUIRE_EMAIL_VERIFICATION", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub require_email_verification: bool,
    /// An owner hears of their instance once it has been Degraded this long (and again
    /// when it is Ready).
    #[arg(long, env = "TENANTRY_NOTIFY_DEGRADED_AFTER", default_value = "15m", value_parser = humantime::parse_duration)]
    pub notify_degraded_after: Duration,
}

/// The sender of local mail when `--mail-from` is not given.
pub const DEFAULT_MAIL_FROM: &str = "Tenantry <noreply@tenantry.localhost>";

impl MailArgs {
    /// The mailer settings; `data_dir` holds the outbox and the default key.
    pub fn settings(&self, data_dir: &std::path::Path) -> crate::Result<crate::mail::MailSettings> {
        let smtp = self
            .smtp_url
            .as_ref()
            .map(|url| crate::mail::parse_smtp_url(secrecy::ExposeSecret::expose_secret(url)))
            .transpose()
            .map_err(|e| crate::Error::Config(format!("--smtp-url: {e}")))?;
        let from = match (&self.mail_from, &smtp) {
            (Some(from), _) => from.clone(),
            (None, None) => parse_mailbox(DEFAULT_MAIL_FROM).map_err(crate::Error::Config)?,
            (None, Some(_)) => {
                return Err(crate::Error::Config(
                    "--mail-from (TENANTRY_MAIL_FROM) is required with --smtp-url".into(),
                ));
            }
        };
        Ok(crate::mail::MailSettings {
            smtp,
            smtp_password_file: self.smtp_password_file.clone(),
            smtp_ca_file: self.smtp_ca_file.clone(),
            from,
            selector: self.dkim_selector.clone(),
            dkim_key_file: self.dkim_key_file.clone(),
            public_url: self.public_url.clone(),
            data_dir: data_dir.to_path_buf(),
        })
    }
}

/// A sender mailbox.
pub fn parse_mailbox(text: &str) -> Result<lettre::message::Mailbox, String> {
    text.trim()
        .parse::<lettre::message::Mailbox>()
        .map_err(|_| format!("{text:?} is not a mailbox such as `Tenantry <noreply@example.com>`"))
}

/// A DKIM selector: one or more DNS labels.
pub fn parse_selector(text: &str) -> Result<String, String> {
    parse_domain(text).map_err(|_| format!("{text:?} is not a DKIM selector (DNS labels)"))
}

/// The portal's base URL: `http://` or `https://`, no query.
fn parse_public_url(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('/');
    let rest = t
        .strip_prefix("https://")
        .or_else(|| t.strip_prefix("http://"))
        .ok_or_else(|| format!("{text:?} must start with https:// or http://"))?;
    if rest.is_empty() || rest.contains(['?', '#', ' ', '"', '<', '>']) {
        return Err(format!(
            "{text:?} is not a base URL such as https://portal.example.com"
        ));
    }
    Ok(t.to_owned())
}

/// `dev`: the flags of `serve`, and the signup portal's; or `dev rotate-ca`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    /// Instead of running the control plane: `rotate-ca` rotates the local CA of a
    /// running (or stopped) `dev`, the same as `tenantry-api rotate-local-ca`.
    #[command(subcommand)]
    pub action: Option<DevAction>,
    /// The API's flags.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Address the signup portal listens on.
    #[arg(long, env = "TENANTRY_PORTAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub portal_listen: SocketAddr,
    /// Run without the signup portal.
    #[arg(long, env = "TENANTRY_NO_PORTAL")]
    pub no_portal: bool,
    /// The `tenantry-portal` binary; default: next to this program, else on `PATH`.
    #[arg(long, env = "TENANTRY_PORTAL_BIN")]
    pub portal_bin: Option<PathBuf>,
}

/// Which provisioner runs tenant instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProvisionerKind {
    /// Keep tenant records only.
    None,
    /// One `tenant-runtime` process per tenant on this machine.
    Local,
    /// One `Tenant` resource per tenant, for the operator.
    Kubernetes,
}

impl ServeArgs {
    /// The session policy these flags describe.
    pub fn session_policy(&self) -> SessionPolicy {
        SessionPolicy {
            idle_timeout: self.session_idle_timeout,
            absolute_timeout: self.session_absolute_timeout,
            admin_mfa_max_age: self.admin_mfa_max_age,
        }
    }

    /// The grant and review policy these flags describe.
    pub fn access_policy(&self) -> crate::access::AccessPolicy {
        crate::access::AccessPolicy {
            max_grant_days: self.max_grant_days,
            review_interval: self.access_review_interval,
        }
    }
}

/// An OAuth 2 provider host pattern, as the runtime's config accepts it.
fn parse_allowed_host(text: &str) -> Result<String, String> {
    let entry = text.trim();
    match tenantry_proto::runtime_config::host_entry_problem(entry) {
        Some(problem) => Err(format!("{entry:?}: {problem}")),
        None => Ok(entry.to_owned()),
    }
}

/// A secret flag value, trimmed.
fn parse_secret(text: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(text.trim()))
}

/// A DNS domain: dot-separated lowercase labels of letters, digits and inner hyphens.
pub fn parse_domain(text: &str) -> Result<String, String> {
    let domain = text.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() <= 200 && domain.split('.').all(label_ok) {
        Ok(domain)
    } else {
        Err(format!(
            "{text:?} is not a DNS domain such as tenants.example.com"
        ))
    }
}

/// A key ring refresh interval: a humantime duration from 1 s to 5 min (a replica must
/// learn of a new key long before it signs).
fn parse_refresh_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(5 * 60) {
        return Err("must be between 1s and 5m".into());
    }
    Ok(d)
}

/// An instance token lifetime: a humantime duration from 1 s to 15 min.
pub fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(15 * 60) {
        return Err("must be between 1s and 15m".into());
    }
    Ok(d)
}

/// `bootstrap-admin`.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Email of the admin.
    #[arg(long, env = "TENANTRY_BOOTSTRAP_EMAIL")]
    pub email: String,
    /// Database and key settings.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn serve_defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["tenantry-api", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(args.session_idle_timeout, Duration::from_secs(1800));
        assert_eq!(args.session_absolute_timeout, Duration::from_secs(43_200));
        assert_eq!(args.admin_mfa_max_age, Duration::from_secs(900));
        assert_eq!(args.db.hash_params(), HashParams::default());
        assert_eq!(args.max_grant_days, 90);
        assert_eq!(
            args.access_review_interval,
            Duration::from_secs(90 * 86_400)
        );
    }

    #[test]
    fn local_oauth2_hosts_are_a_validated_list() {
        let parse = |hosts: &str| {
            Cli::try_parse_from(["tenantry-api", "dev", "--local-oauth2-allowed-hosts", hosts]).map(
                |cli| match cli.command {
                    Command::Dev(args) => args.serve.local_oauth2_allowed_hosts,
                    _ => unreachable!(),
                },
            )
        };
        assert_eq!(
            parse("accounts.example.com,*.example.org,localhost:8443").unwrap(),
            ["accounts.example.com", "*.example.org", "localhost:8443"]
        );
        let err = parse("accounts.example.com,https://evil.example").unwrap_err();
        assert!(err.to_string().contains("https://evil.example"), "{err}");
        let cli = Cli::try_parse_from(["tenantry-api", "dev"]).unwrap();
        let Command::Dev(args) = cli.command else {
            unreachable!()
        };
        assert!(args.serve.local_oauth2_allowed_hosts.is_empty());
    }

    #[test]
    fn access_flags_parse_days_and_bound_grants() {
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "serve",
            "--max-grant-days",
            "30",
            "--access-review-interval",
            "90d",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.access_policy().max_grant_days, 30);
        assert_eq!(
            args.access_review_interval,
            Duration::from_secs(90 * 86_400)
        );
        for bad in ["0", "3651", "many"] {
            assert!(
                Cli::try_parse_from(["tenantry-api", "serve", "--max-grant-days", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn durations_parse_like_90s_30m_12h() {
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "serve",
            "--session-idle-timeout",
            "90s",
            "--session-absolute-timeout",
            "12h",
            "--admin-mfa-max-age",
            "30m",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.session_idle_timeout, Duration::from_secs(90));
        assert_eq!(args.admin_mfa_max_age, Duration::from_secs(1800));
        assert!(
            Cli::try_parse_from(["tenantry-api", "serve", "--session-idle-timeout", "soon"])
                .is_err()
        );
    }

    #[test]
    fn instance_tokens_live_at_most_fifteen_minutes() {
        assert!(
            Cli::try_parse_from(["tenantry-api", "serve", "--instance-token-ttl", "16m"]).is_err()
        );
        let cli =
            Cli::try_parse_from(["tenantry-api", "serve", "--instance-token-ttl", "15m"]).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.instance_token_ttl, Duration::from_secs(900));
    }

    #[test]
    fn dev_defaults_to_a_local_data_dir() {
        let cli = Cli::try_parse_from(["tenantry-api", "dev"]).unwrap();
        let Command::Dev(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            args.serve.db.url().expose_secret(),
            "sqlite://.tenantry/tenantry.db"
        );
        assert_eq!(args.portal_listen.to_string(), "127.0.0.1:8080");
        assert!(!args.no_portal);
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "dev",
            "--data-dir",
            "/tmp/x",
            "--portal-listen",
            "127.0.0.1:9090",
            "--no-portal",
        ])
        .unwrap();
        let Command::Dev(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            args.serve.db.url().expose_secret(),
            "sqlite:///tmp/x/tenantry.db"
        );
        assert_eq!(args.serve.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(args.portal_listen.to_string(), "127.0.0.1:9090");
        assert!(args.no_portal);
    }

    #[test]
    fn trusted_proxies_are_cidrs_and_none_by_default() {
        let cli = Cli::try_parse_from(["tenantry-api", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert!(args.trusted_proxies.is_empty());
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "serve",
            "--trusted-proxies",
            "10.0.0.0/8,127.0.0.1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.trusted_proxies.len(), 2);
        let e = Cli::try_parse_from(["tenantry-api", "serve", "--trusted-proxies", "10.0.0.1/8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn the_database_url_stays_out_of_debug_and_is_trimmed() {
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "serve",
            "--database-url",
            "postgres://tenantry:hunter2-secret@db/tenantry\n",
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            args.db.url().expose_secret(),
            "postgres://tenantry:hunter2-secret@db/tenantry"
        );
    }

    #[test]
    fn mail_flags_default_to_a_verified_local_outbox_and_keep_passwords_out() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tenantry-api", "serve"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Serve(a) => a.mail,
                _ => unreachable!(),
            })
        };
        let m = parse(&[]).unwrap();
        assert!(m.require_email_verification);
        assert_eq!(m.notify_degraded_after, Duration::from_secs(900));
        assert_eq!(m.dkim_selector, "tenantry");
        assert_eq!(m.public_url, "http://127.0.0.1:8080");
        assert!(m.smtp_url.is_none());
        let settings = m.settings(std::path::Path::new("/d")).unwrap();
        assert_eq!(settings.from.email.domain(), "tenantry.localhost");
        for off in [
            &["--require-email-verification=false"][..],
            &["--require-email-verification", "false"],
        ] {
            assert!(!parse(off).unwrap().require_email_verification);
        }
        assert!(
            parse(&["--require-email-verification"])
                .unwrap()
                .require_email_verification
        );
        // A password in the URL is refused, and neither the error nor Debug echoes it.
        let m = parse(&["--smtp-url", "smtp://u:hunter2@relay.example.com"]).unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
        let e = m
            .settings(std::path::Path::new("/d"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--smtp-password-file") && !e.contains("hunter2"),
            "{e}"
        );
        // A relay needs a sender of its own.
        let m = parse(&["--smtp-url", "smtps://relay.example.com"]).unwrap();
        let e = m
            .settings(std::path::Path::new("/d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--mail-from"), "{e}");
        for bad in [
            &["--public-url", "portal.example.com"][..],
            &["--mail-from", "not an address"],
            &["--dkim-selector", "bad_selector"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_key_commands_parse_their_contract_names() {
        let cli = Cli::try_parse_from(["tenantry-api", "rotate-token-key"]).unwrap();
        let Command::RotateTokenKey(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.token_key_overlap, Duration::from_secs(20 * 60));
        assert_eq!(args.test_only_min_token_key_overlap, None);
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "rotate-token-key",
            "--token-key-overlap",
            "45m",
            "--data-dir",
            "/d",
        ])
        .unwrap();
        let Command::RotateTokenKey(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.token_key_overlap, Duration::from_secs(45 * 60));
        for (argv, view) in [
            (&["tenantry-api", "token-keys"][..], TokenKeysView::Status),
            (
                &["tenantry-api", "token-keys", "public"],
                TokenKeysView::Public,
            ),
        ] {
            let Command::TokenKeys(args) = Cli::try_parse_from(argv).unwrap().command else {
                unreachable!()
            };
            assert_eq!(args.view, view);
        }
        let cli = Cli::try_parse_from(["tenantry-api", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(args.token_key_refresh_interval, Duration::from_secs(30));
        assert!(
            Cli::try_parse_from([
                "tenantry-api",
                "serve",
                "--token-key-refresh-interval",
                "10m"
            ])
            .is_err()
        );
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(
            Cli::try_parse_from(["tenantry-api", "serve", "--tls-cert-file", "c.pem"]).is_err()
        );
    }

    #[test]
    fn tenant_domains_are_dns_names() {
        let parse = |d: &str| {
            Cli::try_parse_from(["tenantry-api", "serve", "--tenant-domain", d]).map(|c| {
                match c.command {
                    Command::Serve(a) => a.tenant_domain,
                    _ => None,
                }
            })
        };
        assert_eq!(
            parse("Tenants.Example.com.").unwrap().as_deref(),
            Some("tenants.example.com")
        );
        for bad in ["", "-a.example.com", "a..b", "a_b.example.com", "a b.com"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn dev_runs_the_control_plane_or_rotates_its_ca() {
        let cli = Cli::try_parse_from(["tenantry-api", "dev", "--data-dir", "d"]).unwrap();
        let Command::Dev(dev) = cli.command else {
            unreachable!("not dev")
        };
        assert!(dev.action.is_none());
        assert_eq!(dev.serve.db.data_dir, PathBuf::from("d"));
        let cli = Cli::try_parse_from([
            "tenantry-api",
            "dev",
            "rotate-ca",
            "--data-dir",
            "d",
            "--ca-rotation-window",
            "10m",
        ])
        .unwrap();
        let Command::Dev(DevArgs {
            action: Some(DevAction::RotateCa(args)),
            ..
        }) = cli.command
        else {
            unreachable!("not dev rotate-ca")
        };
        assert_eq!(args.db.data_dir, PathBuf::from("d"));
        assert_eq!(args.ca_rotation_window, Duration::from_secs(600));
    }
}
