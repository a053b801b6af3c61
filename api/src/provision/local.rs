//! The `local` provisioner: one `tenant-runtime` child process per tenant on a loopback
//! port, each with its own directory under `<data-dir>/tenants/<tenant id>/`:
//!
//! ```text
//! config.yaml   the runtime's configuration (rewritten on retention changes; read live)
//! data.key      32 random bytes, 0600, made once
//! tls.crt/.key  the instance certificate from the local CA (renewed at two thirds of life)
//! data/         the runtime's database
//! runtime.log   the runtime's output
//! runtime.pid   the child's pid, to stop a child left over by an older API
//! port          the loopback port, kept across restarts
//! ```
//!
//! Each child runs with `--exit-on-stdin-close` and a pipe as its standard input whose
//! write end only this process holds, so the children end with this process however it
//! ends (SIGKILL included), without any unsafe code such as `PR_SET_PDEATHSIG`.
//!
//! A supervisor task per tenant keeps the process in the desired state, restarts it with
//! backoff when it exits, probes `/readyz` over HTTPS (verifying the certificate against
//! the local CA) and writes the observed phase, endpoint and certificate to the store.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tenantry_pki::{self as pki, LeafRequest};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use super::local_ca::{self, LocalCa};
use super::probe::Prober;
use super::{Deletion, Provisioner, TenantSpec};
use crate::clock::Clock;
use crate::crypto::random_bytes;
use crate::error::{Error, Result};
use crate::store::{Store, TenantStatus};
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::runtime_config::{OAuth2Config, RuntimeConfig, TlsFiles};

/// The local CA's trust bundle, for clients to trust (`<data-dir>/ca.crt`).
pub const CA_CERT_FILE: &str = super::local_ca::CA_CERT_FILE;
/// How often the provisioner looks at the local CA files (a rotation by
/// `rotate-local-ca`) and whether a rotation can end.
const CA_CHECK: Duration = Duration::from_secs(1);
/// The name every local instance certificate carries (with 127.0.0.1).
pub const INSTANCE_HOST: &str = "localhost";

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A process that ran this long before exiting restarts with the first backoff again.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The first readiness probe after a start: a release runtime answers within some 40 ms,
/// so probing soon (then less often, up to [`PROBE_EVERY_STARTING`]) makes an instance
/// Ready some 200 ms sooner than a fixed interval would.
const PROBE_FIRST: Duration = Duration::from_millis(20);
const PROBE_EVERY_STARTING: Duration = Duration::from_millis(250);
const PROBE_EVERY_READY: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(5);

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn pki_err(what: &'static str) -> impl FnOnce(tenantry_pki::Error) -> Error {
    move |source| Error::Pki { what, source }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a reader (the
/// runtime watching its files) never sees half a file.
pub(super) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    stage(path, contents, mode)?.replace()
}

/// Writes several files so that a reader sees them change together, as near as separate
/// files allow: every file is written and flushed first, then the renames follow back to
/// back (microseconds apart, where one `fsync` between them would leave a reader a window
/// of milliseconds with one old and one new file). Renamed in the order given.
pub(super) fn write_atomic_together(files: &[(&Path, &[u8], u32)]) -> Result<()> {
    let mut staged = Vec::with_capacity(files.len());
    for &(path, contents, mode) in files {
        match stage(path, contents, mode) {
            Ok(file) => staged.push(file),
            Err(e) => {
                staged.iter().for_each(Staged::discard);
                return Err(e);
            }
        }
    }
    let mut staged = staged.into_iter();
    for file in staged.by_ref() {
        if let Err(e) = file.replace() {
            staged.for_each(|f| f.discard());
            return Err(e);
        }
    }
    Ok(())
}

/// A file written and flushed beside its final path, not yet renamed over it.
struct Staged<'a> {
    tmp: PathBuf,
    path: &'a Path,
}

impl Staged<'_> {
    fn replace(self) -> Result<()> {
        std::fs::rename(&self.tmp, self.path)
            .map_err(io_err(format!("replacing {}", self.path.display())))
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn stage<'a>(path: &'a Path, contents: &[u8], mode: u32) -> Result<Staged<'a>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(random_bytes::<4>()?)));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(format!("creating {}", tmp.display())))?;
    let staged = Staged { tmp, path };
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        staged.discard();
        return Err(io_err(format!("writing {}", staged.tmp.display()))(e));
    }
    Ok(staged)
}

/// Writes the token public key set every local runtime reads, unless it holds it already;
/// atomically, so a runtime polling it never reads half a set.
fn write_token_keys(path: &Path, pem: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(pem) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    write_atomic(path, pem.as_bytes(), 0o644)
}

/// The runtime configuration of one tenant's instance on loopback `port`, its files in
/// `dir`.
pub fn runtime_config(
    spec: &TenantSpec,
    port: u16,
    dir: &Path,
    token_public_key: &Path,
    oauth2: &OAuth2Config,
    backup: Option<&crate::backup::BackupSettings>,
) -> RuntimeConfig {
    RuntimeConfig {
        tenant_id: spec.id.clone(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: TlsFiles {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
        },
        data_dir: dir.join("data"),
        data_key_file: dir.join("data.key"),
        previous_data_key_file: None,
        data_key_period: None,
        token_public_key_file: token_public_key.to_owned(),
        retention: spec.retention,
        oauth2: oauth2.clone(),
        backup: backup.map(|b| b.tenant_schedule(&spec.id)),
    }
}

/// The config file's text: JSON, which is valid YAML; the runtime reads either.
fn render(config: &RuntimeConfig) -> String {
    // A struct of strings, numbers and paths always serializes.
    let json = serde_json::to_string_pretty(config).unwrap_or_default();
    format!("{json}\n")
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("finding a free loopback port".into()))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free loopback port".into()))?
        .port();
    Ok(port)
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Running,
    Suspended,
    Deleted,
}

struct Supervisor {
    desired: watch::Sender<Desired>,
    task: JoinHandle<()>,
}

/// Settings of the local provisioner.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// `<data-dir>`: the CA lives here, tenants under `tenants/`.
    pub data_dir: PathBuf,
    /// The `tenant-runtime` binary.
    pub runtime_bin: PathBuf,
    /// The API's token public key set (PEM blocks) every runtime verifies with; this
    /// provisioner rewrites it whenever the set changes, and the runtimes reload it.
    pub token_public_key: PathBuf,
    /// Instance certificate lifetime.
    pub cert_validity: Duration,
    /// The OAuth 2 provider hosts (and extra CA) every local instance allows.
    pub oauth2: OAuth2Config,
    /// Scheduled backups: each runtime backs its store up into `tenants/<id>/` of it.
    pub backup: Option<crate::backup::BackupSettings>,
}

/// The local CA and a prober that trusts its bundle; replaced whole when the CA files
/// change.
struct Trust {
    ca: LocalCa,
    prober: Prober,
}

impl Trust {
    fn of(ca: LocalCa) -> Result<Trust> {
        let prober = Prober::new(ca.bundle()).map_err(Error::Provisioner)?;
        Ok(Trust { ca, prober })
    }
}

struct Shared {
    settings: LocalSettings,
    trust: std::sync::RwLock<Arc<Trust>>,
    store: Store,
    clock: Arc<dyn Clock>,
    shutdown: watch::Sender<bool>,
}

/// The provisioner.
pub struct LocalProvisioner {
    shared: Arc<Shared>,
    supervisors: Mutex<HashMap<String, Supervisor>>,
}

impl std::fmt::Debug for LocalProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvisioner")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

/// Finds `tenant-runtime`: next to this executable first, then on `PATH`.
pub fn find_runtime_bin() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()?
        .parent()
        .map(|d| d.join("tenant-runtime"));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Some(path);
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tenant-runtime"))
                .collect::<Vec<_>>()
        })
        .and_then(|candidates| candidates.into_iter().find(|p| p.is_file()))
}

impl LocalProvisioner {
    /// Sets up the data directory and the local CA.
    pub fn new(settings: LocalSettings, store: Store, clock: Arc<dyn Clock>) -> Result<Self> {
        if !settings.runtime_bin.is_file() {
            return Err(Error::Config(format!(
                "tenant-runtime binary not found at {} (build it with `cargo build --workspace`, or pass --runtime-bin)",
                settings.runtime_bin.display()
            )));
        }
        // Every tenant's key, certificate key and data live below it.
        crate::files::private_dir(&settings.data_dir)?;
        let trust = Trust::of(local_ca::load_or_create(&settings.data_dir)?)?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            settings,
            trust: std::sync::RwLock::new(Arc::new(trust)),
            store,
            clock,
            shutdown,
        });
        tokio::spawn(follow_ca(Arc::clone(&shared)));
        Ok(LocalProvisioner {
            shared,
            supervisors: Mutex::new(HashMap::new()),
        })
    }

    fn tenant_dir(&self, tenant_id: &str) -> PathBuf {
        self.shared
            .settings
            .data_dir
            .join("tenants")
            .join(tenant_id)
    }
}

impl Shared {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(self.clock.now_ms())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    fn trust(&self) -> Arc<Trust> {
        self.trust
            .read()
            .map(|t| Arc::clone(&t))
            .unwrap_or_else(|e| Arc::clone(&e.into_inner()))
    }

    /// Issues a certificate when there is none, it is not ours, renewal is due, or it is
    /// from the previous CA and its time in a CA rotation's window has come; returns the one
    /// in force.
    fn ensure_certificate(&self, dir: &Path, tenant_id: &str) -> Result<pki::CertificateInfo> {
        let trust = self.trust();
        let ca = &trust.ca;
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        let existing = std::fs::read_to_string(&cert_path).ok().and_then(|pem| {
            let key = std::fs::read_to_string(&key_path).ok()?;
            let info = pki::parse_certificate(&pem).ok()?;
            if !pki::key_matches(&info, &SecretString::from(key)) {
                return None;
            }
            let renewal = pki::renewal_time(info.not_before, info.not_after, None);
            match ca.signer(&pem)? {
                local_ca::Signer::Current => Some((info, renewal)),
                local_ca::Signer::Previous => Some((info, renewal.min(ca.reissue_at(tenant_id)))),
            }
        });
        if let Some((info, renewal)) = existing
            && self.now() < renewal
        {
            return Ok(info);
        }
        let issued = ca
            .issuing()
            .issue_leaf(&LeafRequest {
                dns_names: vec![INSTANCE_HOST.to_owned()],
                ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                validity: self.settings.cert_validity,
                now: self.now(),
            })
            .map_err(pki_err("issuing a certificate"))?;
        // Both written before either is renamed, key first: the runtime only switches once
        // the pair matches, and `/readyz` never sees a mismatched pair for longer than the
        // two renames take.
        write_atomic_together(&[
            (&key_path, issued.key_pem.expose_secret().as_bytes(), 0o600),
            (&cert_path, issued.cert_pem.as_bytes(), 0o644),
        ])?;
        tracing::info!(tenant_dir = %dir.display(), serial = %issued.serial_hex, not_after = %issued.not_after, ca = %ca.fingerprint(), "issued instance certificate");
        pki::parse_certificate(&issued.cert_pem).map_err(pki_err("reading the issued certificate"))
    }

    /// Takes up the CA files when they changed (a rotation), and ends a rotation whose
    /// window has passed once every instance's certificate is from the new CA; the end is
    /// audited.
    async fn check_ca(&self) -> Result<()> {
        let dir = self.settings.data_dir.clone();
        let current = self.trust();
        let changed = std::fs::read_to_string(dir.join(CA_CERT_FILE))
            .ok()
            .is_some_and(|raw| raw != current.ca.bundle());
        if changed {
            // A rotation half written (the key before ca.crt) does not load: look again.
            let Ok(Some(ca)) = local_ca::load(&dir) else {
                return Ok(());
            };
            tracing::info!(ca = %ca.fingerprint(), rotating = ca.rotation().is_some(), "the local CA changed; instance certificates follow it");
            *self.trust.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Trust::of(ca)?);
            return Ok(());
        }
        let Some(rotation) = current.ca.rotation() else {
            return Ok(());
        };
        let tenants: Vec<PathBuf> = std::fs::read_dir(dir.join("tenants"))
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        let mut certs: Vec<String> = tenants
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("tls.crt")).ok())
            .collect();
        if !local_ca::due_for_retirement(&current.ca, &certs, self.now()) {
            return Ok(());
        }
        // The files are new, but a runtime reads them only on its next reload poll: what
        // each running instance serves decides (one that does not listen serves nothing).
        for port in tenants.iter().filter_map(|d| {
            std::fs::read_to_string(d.join("port"))
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
        }) {
            if let Ok(der) = current.prober.served_certificate(port, INSTANCE_HOST).await {
                certs.push(pem_of(&der));
            }
        }
        if !local_ca::due_for_retirement(&current.ca, &certs, self.now()) {
            return Ok(());
        }
        local_ca::retire(&dir, &current.ca)?;
        tracing::info!(previous = %rotation.previous_fingerprint, ca = %rotation.fingerprint, "retired the previous local CA: every instance certificate is from the new one");
        self.store
            .audit(
                &crate::store::AuditRecord {
                    action: local_ca::actions::RETIRE,
                    actor_user_id: String::new(),
                    target: rotation.previous_fingerprint.clone(),
                    success: true,
                    source: "server".into(),
                    detail_json: crate::service::detail(&[(
                        "ca",
                        rotation.fingerprint.clone().into(),
                    )]),
                },
                self.clock.now_ms(),
            )
            .await?;
        Ok(())
    }

    /// Lays out the tenant directory: data key (once), port, certificate, config.
    fn prepare(&self, dir: &Path, spec: &TenantSpec) -> Result<(u16, pki::CertificateInfo)> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("data"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let key_path = dir.join("data.key");
        if !key_path.exists() {
            // Made once and never rewritten: it is the only way to read the tenant's data.
            write_atomic(&key_path, &random_bytes::<32>()?, 0o600)?;
        }
        let port_path = dir.join("port");
        let port = match std::fs::read_to_string(&port_path)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
        {
            Some(port) => port,
            None => {
                let port = free_port()?;
                write_atomic(&port_path, port.to_string().as_bytes(), 0o600)?;
                port
            }
        };
        let cert = self.ensure_certificate(dir, &spec.id)?;
        self.write_config(dir, spec, port)?;
        Ok((port, cert))
    }

    fn write_config(&self, dir: &Path, spec: &TenantSpec, port: u16) -> Result<()> {
        let config = render(&runtime_config(
            spec,
            port,
            dir,
            &self.settings.token_public_key,
            &self.settings.oauth2,
            self.settings.backup.as_ref(),
        ));
        let path = dir.join("config.yaml");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(config.as_str()) {
            write_atomic(&path, config.as_bytes(), 0o600)?;
        }
        Ok(())
    }

    async fn report(&self, tenant_id: &str, status: TenantStatus) {
        if let Err(e) = self
            .store
            .set_tenant_status(tenant_id, &status, self.clock.now_ms())
            .await
        {
            tracing::warn!(%tenant_id, error = %e, "could not record tenant status");
        }
    }
}

/// A DER certificate as PEM.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Follows the local CA files until shutdown (see [`Shared::check_ca`]).
async fn follow_ca(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(CA_CHECK) => {}
        }
        if let Err(e) = shared.check_ca().await {
            tracing::warn!(error = %e, "checking the local CA failed; will retry");
        }
    }
}

fn cert_status(cert: &pki::CertificateInfo) -> (String, i64, i64) {
    let renewal = pki::renewal_time(cert.not_before, cert.not_after, None);
    (
        cert.serial_hex.clone(),
        cert.not_after.as_millisecond(),
        renewal.as_millisecond(),
    )
}

fn status(
    phase: TenantPhase,
    endpoint: String,
    cert: Option<&pki::CertificateInfo>,
    message: String,
) -> TenantStatus {
    let (cert_serial, cert_not_after_ms, cert_renewal_ms) =
        cert.map(cert_status).unwrap_or_default();
    TenantStatus {
        phase,
        endpoint,
        cert_serial,
        cert_not_after_ms,
        cert_renewal_ms,
        message,
    }
}

/// Stops a process: SIGTERM, then SIGKILL after the grace period.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Stops a runtime still running for an earlier API process that died without cleanup:
/// one still draining its connections after its stdin closed, or one started by a version
/// without `--exit-on-stdin-close`.
async fn stop_leftover(dir: &Path) {
    let pid_path = dir.join("runtime.pid");
    let Some(pid) = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let config = dir.join("config.yaml").display().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&config) {
        tracing::info!(
            pid,
            "stopping a tenant runtime left over from an earlier run"
        );
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tokio::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .await;
    }
    let _ = std::fs::remove_file(pid_path);
}

/// What a supervisor does next: a pure decision from what it wants and what it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Stop the process (if any) and end: shutdown or deletion.
    Stop,
    /// Stop the process (if any), report Suspended, wait for a change.
    Suspend,
    /// The instance's files are gone: report Degraded and retry after the backoff.
    FilesMissing,
    /// Start the process on this port.
    Start(u16),
    /// Watch the running process on this port.
    Watch(u16),
}

fn next_step(want: Desired, shutting_down: bool, port: Option<u16>, running: bool) -> Step {
    match (want, port) {
        _ if shutting_down => Step::Stop,
        (Desired::Deleted, _) => Step::Stop,
        (Desired::Suspended, _) => Step::Suspend,
        (Desired::Running, None) => Step::FilesMissing,
        (Desired::Running, Some(p)) if running => Step::Watch(p),
        (Desired::Running, Some(p)) => Step::Start(p),
    }
}

/// The backoff before the next start: doubled after a failure, reset after a run that
/// lasted [`STABLE_AFTER`].
fn backoff_after(backoff: Duration, ran_for: Option<Duration>) -> Duration {
    match ran_for {
        Some(ran) if ran >= STABLE_AFTER => FIRST_BACKOFF,
        _ => backoff,
    }
}

fn doubled(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}

/// One tenant's supervisor: its wishes, the shutdown signal and the process it runs.
struct Supervision {
    shared: Arc<Shared>,
    id: String,
    dir: PathBuf,
    desired: watch::Receiver<Desired>,
    shutdown: watch::Receiver<bool>,
    child: Option<tokio::process::Child>,
    /// The write end of the running child's stdin: the child runs only while it is held
    /// (`--exit-on-stdin-close`). Kept out of the `Child`, whose `wait` closes its stdin.
    lifeline: Option<tokio::process::ChildStdin>,
    backoff: Duration,
}

impl Supervision {
    async fn report(
        &self,
        phase: TenantPhase,
        cert: Option<&pki::CertificateInfo>,
        message: String,
    ) {
        self.shared
            .report(&self.id, status(phase, String::new(), cert, message))
            .await;
    }

    /// Waits for a change of wishes, shutdown, or (when given) `timeout`.
    async fn pause(&mut self, timeout: Option<Duration>) {
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.desired.changed() => {}
            _ = self.shutdown.changed() => {}
            () = sleep => {}
        }
    }

    async fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c).await;
        }
        self.lifeline = None;
    }

    async fn suspend(&mut self) {
        self.stop_child().await;
        let cert = pki::parse_certificate(
            &std::fs::read_to_string(self.dir.join("tls.crt")).unwrap_or_default(),
        )
        .ok();
        self.report(
            TenantPhase::Suspended,
            cert.as_ref(),
            "suspended; data kept".into(),
        )
        .await;
        self.pause(None).await;
    }

    async fn start(&mut self) {
        match spawn_runtime(&self.shared, &self.dir).await {
            Ok((c, lifeline)) => {
                self.child = Some(c);
                self.lifeline = lifeline;
            }
            Err(e) => {
                self.report(
                    TenantPhase::Degraded,
                    None,
                    format!("cannot start runtime: {e}"),
                )
                .await;
                self.pause(Some(self.backoff)).await;
                self.backoff = doubled(self.backoff);
            }
        }
    }

    /// Watches the running process; returns false on shutdown.
    async fn watch(&mut self, port: u16) -> bool {
        let Some(running) = self.child.as_mut() else {
            return true;
        };
        let started = tokio::time::Instant::now();
        let outcome = watch_running(
            &self.shared,
            &self.id,
            &self.dir,
            port,
            running,
            &mut self.desired,
            &mut self.shutdown,
        )
        .await;
        match outcome {
            Watch::Exited(exit) => {
                self.child = None;
                self.lifeline = None;
                let _ = std::fs::remove_file(self.dir.join("runtime.pid"));
                self.backoff = backoff_after(self.backoff, Some(started.elapsed()));
                let backoff = self.backoff;
                tracing::warn!(tenant_id = %self.id, %exit, ?backoff, "tenant runtime exited; restarting");
                self.report(
                    TenantPhase::Degraded,
                    None,
                    format!(
                        "runtime exited ({exit}); restarting in {}s",
                        backoff.as_secs()
                    ),
                )
                .await;
                self.pause(Some(backoff)).await;
                self.backoff = doubled(backoff);
                // A port taken meanwhile by something else: move to a new one.
                if !port_is_free(port)
                    && let Ok(new_port) = free_port()
                    && let Err(e) = move_to_port(&self.dir, new_port)
                {
                    tracing::warn!(tenant_id = %self.id, error = %e, "could not move to a free port");
                }
                true
            }
            Watch::Changed => true,
            Watch::Shutdown => false,
        }
    }
}

/// Keeps one tenant's process as `desired` says until deletion or shutdown: starts it,
/// restarts it with backoff when it exits, stops it when suspended.
async fn supervise(
    shared: Arc<Shared>,
    id: String,
    dir: PathBuf,
    desired: watch::Receiver<Desired>,
) {
    let shutdown = shared.shutdown.subscribe();
    let mut s = Supervision {
        shared,
        id,
        dir,
        desired,
        shutdown,
        child: None,
        lifeline: None,
        backoff: FIRST_BACKOFF,
    };
    stop_leftover(&s.dir).await;
    loop {
        let want = *s.desired.borrow_and_update();
        // ensure() keeps the port file and config.yaml current.
        let port = std::fs::read_to_string(s.dir.join("port"))
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok());
        let shutting_down = *s.shutdown.borrow();
        match next_step(want, shutting_down, port, s.child.is_some()) {
            Step::Stop => break,
            Step::Suspend => s.suspend().await,
            Step::FilesMissing => {
                s.report(TenantPhase::Degraded, None, "instance files missing".into())
                    .await;
                s.pause(Some(s.backoff)).await;
            }
            Step::Start(_) => s.start().await,
            Step::Watch(port) => {
                if !s.watch(port).await {
                    break;
                }
            }
        }
    }
    s.stop_child().await;
    let _ = std::fs::remove_file(s.dir.join("runtime.pid"));
}

/// Points the instance at another loopback port: the port file and the config's
/// `listen`, keeping everything else in the config as `ensure` last wrote it.
fn move_to_port(dir: &Path, port: u16) -> Result<()> {
    let path = dir.join("config.yaml");
    let text =
        std::fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut config: RuntimeConfig =
        serde_json::from_str(&text).map_err(|source| Error::RuntimeConfigFile {
            path: path.clone(),
            source,
        })?;
    config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    write_atomic(&dir.join("port"), port.to_string().as_bytes(), 0o600)?;
    write_atomic(&path, render(&config).as_bytes(), 0o600)
}

enum Watch {
    Exited(String),
    Changed,
    Shutdown,
}

/// Starts the runtime of `dir`; returns it and the write end of its stdin, which must be
/// held for as long as the runtime is to run.
async fn spawn_runtime(
    shared: &Shared,
    dir: &Path,
) -> Result<(tokio::process::Child, Option<tokio::process::ChildStdin>)> {
    let log_path = dir.join("runtime.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let mut child = tokio::process::Command::new(&shared.settings.runtime_bin)
        .arg("--config")
        .arg(dir.join("config.yaml"))
        // The child holds the read end, this process the write end (the lifeline): when
        // this process ends, even by SIGKILL, the pipe closes and the runtime stops.
        .arg("--exit-on-stdin-close")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err(format!(
            "starting {}",
            shared.settings.runtime_bin.display()
        )))?;
    if let Some(pid) = child.id() {
        let _ = write_atomic(&dir.join("runtime.pid"), pid.to_string().as_bytes(), 0o600);
    }
    let lifeline = child.stdin.take();
    Ok((child, lifeline))
}

/// Watches a running child: probes readiness, renews the certificate when due, and
/// returns when the process exits, the desired state changes, or the API shuts down.
async fn watch_running(
    shared: &Shared,
    id: &str,
    dir: &Path,
    port: u16,
    child: &mut tokio::process::Child,
    desired: &mut watch::Receiver<Desired>,
    shutdown: &mut watch::Receiver<bool>,
) -> Watch {
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut ready = false;
    let mut starting_every = PROBE_FIRST;
    let mut cert =
        pki::parse_certificate(&std::fs::read_to_string(dir.join("tls.crt")).unwrap_or_default())
            .ok();
    shared
        .report(
            id,
            status(
                TenantPhase::Provisioning,
                String::new(),
                cert.as_ref(),
                "runtime starting".into(),
            ),
        )
        .await;
    loop {
        let every = if ready {
            PROBE_EVERY_READY
        } else {
            let every = starting_every;
            starting_every = (starting_every * 2).min(PROBE_EVERY_STARTING);
            every
        };
        tokio::select! {
            exit = child.wait() => {
                let exit = match exit {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                return Watch::Exited(exit);
            }
            changed = desired.changed() => {
                return if changed.is_ok() { Watch::Changed } else { Watch::Shutdown };
            }
            _ = shutdown.changed() => return Watch::Shutdown,
            () = tokio::time::sleep(every) => {
                // Renewal: same rule as in the cluster; the runtime reloads the files.
                match shared.ensure_certificate(dir, id) {
                    Ok(info) => cert = Some(info),
                    Err(e) => tracing::warn!(tenant_id = %id, error = %e, "certificate renewal failed; will retry"),
                }
                let prober = shared.trust().prober.clone();
                let probe = prober.ready(port, INSTANCE_HOST).await;
                let next = match &probe {
                    Ok(()) => status(TenantPhase::Ready, endpoint.clone(), cert.as_ref(), String::new()),
                    Err(why) if ready => status(TenantPhase::Degraded, String::new(), cert.as_ref(), format!("readiness probe failed: {why}")),
                    Err(_) => status(TenantPhase::Provisioning, String::new(), cert.as_ref(), "runtime starting".into()),
                };
                ready = probe.is_ok();
                shared.report(id, next).await;
            }
        }
    }
}

#[tonic::async_trait]
impl Provisioner for LocalProvisioner {
    async fn ensure(&self, spec: &TenantSpec) -> Result<()> {
        let dir = self.tenant_dir(&spec.id);
        let shared = Arc::clone(&self.shared);
        let prepared_spec = spec.clone();
        let prepared_dir = dir.clone();
        tokio::task::spawn_blocking(move || shared.prepare(&prepared_dir, &prepared_spec))
            .await
            .map_err(Error::Task)??;
        let want = if spec.suspended {
            Desired::Suspended
        } else {
            Desired::Running
        };
        let mut supervisors = self.supervisors.lock().await;
        if let Some(s) = supervisors.get(&spec.id)
            && !s.task.is_finished()
        {
            s.desired.send_if_modified(|d| {
                let changed = *d != want;
                *d = want;
                changed
            });
            return Ok(());
        }
        if *self.shared.shutdown.borrow() {
            return Ok(());
        }
        let (tx, rx) = watch::channel(want);
        let task = tokio::spawn(supervise(
            Arc::clone(&self.shared),
            spec.id.clone(),
            dir,
            rx,
        ));
        supervisors.insert(spec.id.clone(), Supervisor { desired: tx, task });
        Ok(())
    }

    async fn delete(&self, tenant_id: &str) -> Result<Deletion> {
        let supervisor = self.supervisors.lock().await.remove(tenant_id);
        if let Some(s) = supervisor {
            let _ = s.desired.send(Desired::Deleted);
            let _ = s.task.await;
        }
        let dir = self.tenant_dir(tenant_id);
        stop_leftover(&dir).await;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {
                tracing::info!(%tenant_id, "deleted the instance, its data key and its data");
                Ok(Deletion::Done)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Deletion::Done),
            Err(e) => Err(Error::Io {
                what: format!("deleting {}", dir.display()),
                source: e,
            }),
        }
    }

    async fn publish_token_keys(&self, public_set_pem: &str) -> Result<()> {
        let path = self.shared.settings.token_public_key.clone();
        let pem = public_set_pem.to_owned();
        tokio::task::spawn_blocking(move || write_token_keys(&path, &pem))
            .await
            .map_err(Error::Task)?
    }

    async fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
        let supervisors: Vec<Supervisor> = self
            .supervisors
            .lock()
            .await
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in supervisors {
            let _ = s.task.await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tenantry_proto::retention::{Plan, RetentionPolicy};

    #[test]
    fn config_is_the_runtime_contract_with_local_paths() {
        let spec = TenantSpec {
            id: "t-1".into(),
            name: "acme".into(),
            owner: "u-1".into(),
            plan: Plan::Free,
            suspended: false,
            retention: RetentionPolicy {
                max_age_hours: 1,
                max_count: 5,
            },
        };
        let config = runtime_config(
            &spec,
            8443,
            Path::new("/d/t-1"),
            Path::new("/d/token-public.pem"),
            &OAuth2Config {
                allowed_hosts: vec!["accounts.example.com".into()],
                ca_file: None,
            },
            None,
        );
        // What the runtime reads back (unknown keys would be refused).
        let read: RuntimeConfig = serde_json::from_str(&render(&config)).unwrap();
        assert_eq!(read, config);
        assert_eq!(read.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(read.tls.key_file, Path::new("/d/t-1/tls.key"));
        assert_eq!(read.retention.max_count, 5);
        assert_eq!(read.oauth2.allowed_hosts, ["accounts.example.com"]);
        assert_eq!(read.validate(), Ok(()));
    }

    #[test]
    fn the_supervisor_stops_suspends_starts_or_watches() {
        use Desired::*;
        assert_eq!(next_step(Running, true, Some(1), true), Step::Stop);
        assert_eq!(next_step(Deleted, false, Some(1), true), Step::Stop);
        assert_eq!(next_step(Suspended, false, Some(1), true), Step::Suspend);
        assert_eq!(next_step(Running, false, None, false), Step::FilesMissing);
        assert_eq!(next_step(Running, false, Some(7), false), Step::Start(7));
        assert_eq!(next_step(Running, false, Some(7), true), Step::Watch(7));
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_stable_run() {
        let mut b = FIRST_BACKOFF;
        for _ in 0..10 {
            b = doubled(b);
        }
        assert_eq!(b, MAX_BACKOFF);
        assert_eq!(backoff_after(b, Some(STABLE_AFTER)), FIRST_BACKOFF);
        assert_eq!(backoff_after(b, Some(Duration::from_secs(1))), b);
        assert_eq!(backoff_after(b, None), b);
    }

    #[test]
    fn moving_port_changes_only_listen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TenantSpec {
            id: "t-1".into(),
            name: "acme".into(),
            owner: "u-1".into(),
            plan: Plan::Free,
            suspended: false,
            retention: RetentionPolicy {
                max_age_hours: 3,
                max_count: 7,
            },
        };
        let before = render(&runtime_config(
            &spec,
            8443,
            dir.path(),
            Path::new("/k.pem"),
            &OAuth2Config::default(),
            None,
        ));
        std::fs::write(dir.path().join("config.yaml"), &before).unwrap();
        move_to_port(dir.path(), 9443).unwrap();
        let after = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
        assert_eq!(
            after,
            render(&runtime_config(
                &spec,
                9443,
                dir.path(),
                Path::new("/k.pem"),
                &OAuth2Config::default(),
                None,
            ))
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("port")).unwrap(),
            "9443"
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_the_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn files_written_together_are_all_replaced_or_none() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
        write_atomic_together(&[(&key, b"k1", 0o600), (&cert, b"c1", 0o644)]).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"k1");
        assert_eq!(std::fs::read(&cert).unwrap(), b"c1");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // The second file cannot be written: the first is not replaced either, and no
        // temporary file is left.
        let missing = dir.path().join("no-such-dir/tls.crt");
        let err =
            write_atomic_together(&[(&key, b"k2", 0o600), (&missing, b"c2", 0o644)]).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), b"k1");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn the_token_key_set_is_replaced_whole_and_only_when_it_changed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-public.pem");
        write_token_keys(&path, "one\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644);
        // Unchanged: not rewritten (a runtime polling it sees the same file).
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        write_token_keys(&path, "one\n").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        write_token_keys(&path, "one\ntwo\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_local_ca_is_made_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = local_ca::load_or_create(dir.path()).unwrap();
        let b = local_ca::load_or_create(dir.path()).unwrap();
        assert_eq!(a.bundle(), b.bundle());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(local_ca::CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
