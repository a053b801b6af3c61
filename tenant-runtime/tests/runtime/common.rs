//! Test harness: a real tenant-runtime on 127.0.0.1:0 with a CA, certificate, data key and
//! token key made here, and the shared HTTPS client (`tenantry_test_support::Https`)
//! trusting that CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tenant_runtime::RunConfig;
use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::token::TokenSigner;
use tenantry_test_support::{Conn, Https, Response};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Options {
    pub tenant: String,
    /// Appended to the config file as is (e.g. an `oauth2:` section).
    pub extra_config: String,
    pub retention: RetentionPolicy,
    pub max_body_bytes: usize,
    pub prune_interval: Duration,
    pub prune_batch_size: u32,
    /// Overrides the `backup` section's interval.
    pub backup_interval: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tenant: "acme".into(),
            extra_config: String::new(),
            retention: RetentionPolicy::default(),
            max_body_bytes: 64 * 1024,
            prune_interval: Duration::from_secs(3600),
            prune_batch_size: 1000,
            backup_interval: None,
        }
    }
}

pub struct Instance {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub tenant: String,
    pub signer: TokenSigner,
    pub ca: CertifiedIssuer<'static, KeyPair>,
    pub config_path: PathBuf,
    https: Https,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tenant_runtime::Result<()>>>,
}

pub fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tenantry test CA");
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Issues a fresh leaf (new key) for localhost; returns (cert PEM, key PEM, cert DER).
pub fn new_leaf(ca: &CertifiedIssuer<'static, KeyPair>) -> (String, String, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

pub fn write_config(path: &Path, tenant: &str, retention: RetentionPolicy, extra: &str) {
    let yaml = format!(
        "tenant_id: {tenant}\nlisten: 127.0.0.1:0\ntls: {{cert_file: tls/tls.crt, key_file: tls/tls.key}}\n\
         data_dir: data\ndata_key_file: keys/data.key\ntoken_public_key_file: keys/token.pub\n\
         retention: {{max_age_hours: {}, max_count: {}}}\n{extra}",
        retention.max_age_hours, retention.max_count
    );
    // Write then rename, as a ConfigMap update does, so the poller never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A directory with everything a runtime needs, not started.
pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub ca: CertifiedIssuer<'static, KeyPair>,
    pub signer: TokenSigner,
    pub config_path: PathBuf,
}

/// Writes a CA-issued certificate, a data key, a token key and the config file.
pub fn prepare(options: &Options) -> Prepared {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("tls")).unwrap();
    std::fs::create_dir_all(root.join("keys")).unwrap();
    let ca = new_ca();
    let (cert, key, _) = new_leaf(&ca);
    std::fs::write(root.join("tls/tls.crt"), cert).unwrap();
    std::fs::write(root.join("tls/tls.key"), key).unwrap();
    let mut data_key = [0u8; 32];
    getrandom::fill(&mut data_key).unwrap();
    std::fs::write(root.join("keys/data.key"), data_key).unwrap();
    let signer = TokenSigner::generate().unwrap();
    std::fs::write(root.join("keys/token.pub"), signer.public_key_pem()).unwrap();
    let config_path = root.join("runtime.yaml");
    write_config(
        &config_path,
        &options.tenant,
        options.retention,
        &options.extra_config,
    );
    Prepared {
        dir,
        ca,
        signer,
        config_path,
    }
}

impl Instance {
    pub async fn start() -> Instance {
        Instance::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Instance {
        let prepared = prepare(&options);
        Instance::launch(prepared, options).await
    }

    /// Stops the server and starts it again on the same directory, files and keys.
    pub async fn restart(mut self) -> Instance {
        self.shutdown_and_wait().await.unwrap();
        let prepared = Prepared {
            dir: self.dir,
            ca: self.ca,
            signer: self.signer,
            config_path: self.config_path,
        };
        let options = Options {
            tenant: self.tenant,
            ..Options::default()
        };
        Instance::launch(prepared, options).await
    }

    async fn launch(prepared: Prepared, options: Options) -> Instance {
        let Prepared {
            dir,
            ca,
            signer,
            config_path,
        } = prepared;
        let mut run_config = RunConfig::load(&config_path).unwrap();
        run_config.reload_interval = Duration::from_millis(100);
        run_config.prune_interval = options.prune_interval;
        run_config.prune_batch_size = options.prune_batch_size;
        run_config.max_body_bytes = options.max_body_bytes;
        run_config.backup_interval = options.backup_interval;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tenant_runtime::run(run_config, listener, async {
            let _ = rx.await;
        }));
        let https = Https::new(&ca.pem());
        let instance = Instance {
            dir,
            addr,
            tenant: options.tenant,
            signer,
            ca,
            https,
            config_path,
            shutdown: Some(tx),
            task: Some(task),
        };
        // Wait until the server answers (it fails fast on bad config, which panics here).
        for _ in 0..100 {
            if instance.try_get("/healthz").await.is_some() {
                return instance;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not come up");
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    /// A valid token for this tenant.
    pub fn token(&self) -> String {
        self.token_for("user-1")
    }

    /// A valid token for this tenant with `subject` (each call a new token id).
    pub fn token_for(&self, subject: &str) -> String {
        self.signer
            .issue(
                &self.tenant,
                subject,
                jiff::Timestamp::now(),
                Duration::from_secs(300),
            )
            .unwrap()
            .0
    }

    /// Writes a new leaf certificate and key; returns the new certificate's DER.
    pub fn rotate_certificate(&self) -> Vec<u8> {
        let (cert, key, der) = new_leaf(&self.ca);
        write_atomically(&self.root().join("tls/tls.key"), key.as_bytes());
        write_atomically(&self.root().join("tls/tls.crt"), cert.as_bytes());
        der
    }

    pub fn set_retention(&self, retention: RetentionPolicy) {
        write_config(&self.config_path, &self.tenant, retention, "");
    }

    /// A new HTTPS connection, checked against the CA for `localhost`.
    pub async fn connect(&self) -> Conn {
        self.try_connect().await.unwrap()
    }

    async fn try_connect(&self) -> std::io::Result<Conn> {
        self.https
            .connect(&self.addr.to_string(), "localhost")
            .await
    }

    async fn try_get(&self, path: &str) -> Option<Response> {
        let mut conn = self.try_connect().await.ok()?;
        conn.send("GET", path, None, None, Vec::new()).await.ok()
    }

    /// One request on a new connection, with a valid token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Response {
        let token = self.token();
        self.call_as(method, path, Some(&token), body).await
    }

    /// One request on a new connection, with the given token (or none).
    pub async fn call_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Response {
        let (content_type, bytes) = match body {
            Some(v) => (Some("application/json"), serde_json::to_vec(&v).unwrap()),
            None => (None, Vec::new()),
        };
        self.raw(method, path, token, content_type, bytes).await
    }

    /// One request with a raw body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Response {
        let mut conn = self.connect().await;
        conn.send(method, path, token, content_type, body)
            .await
            .unwrap()
    }

    /// Stops the server and waits for `run` to return.
    pub async fn stop(mut self) -> tenant_runtime::Result<()> {
        self.shutdown_and_wait().await
    }

    /// Stops the server and hands back its directory, to inspect the files it left.
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.shutdown_and_wait().await.unwrap();
        self.dir
    }

    async fn shutdown_and_wait(&mut self) -> tenant_runtime::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops within 30 s")
                .expect("server task does not panic"),
            None => Ok(()),
        }
    }
}

pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Every regular file under `dir`, recursively, with its contents.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// Every log line of this test binary, at TRACE, from the first call on: the global
/// subscriber writes here, so the runtime's every thread (and every test running
/// meanwhile) logs into it. Tests check it for needles of their own.
pub fn log_capture() -> &'static Captured {
    static CAPTURE: OnceLock<Captured> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

/// A shared, growing log buffer.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// How often the tests poll for what the runtime does in the background.
pub const POLL: Duration = Duration::from_millis(50);

/// The value of a metric line (`name{labels} value`) in an exposition, summed over lines
/// whose name and labels contain every `part`.
pub fn metric(exposition: &str, parts: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A read-only connection to the SQLite file at `path` (a store, a key store, or a copy).
pub async fn open_read_only(path: &Path) -> sqlx::SqliteConnection {
    use sqlx::ConnectOptions as _;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .unwrap()
}

/// The `tenant-runtime` binary as a command, without the environment's config path.
pub fn runtime() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenant-runtime"));
    cmd.env_remove("TENANTRY_RUNTIME_CONFIG")
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs a `--json` command, asserts that it succeeded (showing `what` and its stderr if
/// not) and parses what it printed.
pub async fn json_output(cmd: &mut tokio::process::Command, what: &str) -> serde_json::Value {
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
