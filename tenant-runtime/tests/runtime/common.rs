//! Test harness: a real tenant-runtime on 127.0.0.1:0 with a CA, certificate, data key and
//! token key made here, and an HTTPS client (hyper over tokio-rustls) trusting that CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tenant_runtime::RunConfig;
use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::token::TokenSigner;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// A response, with its body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub text: String,
    pub json: serde_json::Value,
}

pub struct Options {
    pub tenant: String,
    pub retention: RetentionPolicy,
    pub max_body_bytes: usize,
    pub prune_interval: Duration,
    pub prune_batch_size: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tenant: "acme".into(),
            retention: RetentionPolicy::default(),
            max_body_bytes: 64 * 1024,
            prune_interval: Duration::from_secs(3600),
            prune_batch_size: 1000,
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

pub fn write_config(path: &Path, tenant: &str, retention: RetentionPolicy) {
    let yaml = format!(
        "tenant_id: {tenant}\nlisten: 127.0.0.1:0\ntls: {{cert_file: tls/tls.crt, key_file: tls/tls.key}}\n\
         data_dir: data\ndata_key_file: keys/data.key\ntoken_public_key_file: keys/token.pub\n\
         retention: {{max_age_hours: {}, max_count: {}}}\n",
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
    write_config(&config_path, &options.tenant, options.retention);
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
        let Prepared {
            dir,
            ca,
            signer,
            config_path,
        } = prepare(&options);
        let mut run_config = RunConfig::load(&config_path).unwrap();
        run_config.reload_interval = Duration::from_millis(100);
        run_config.prune_interval = options.prune_interval;
        run_config.prune_batch_size = options.prune_batch_size;
        run_config.max_body_bytes = options.max_body_bytes;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tenant_runtime::run(run_config, listener, async {
            let _ = rx.await;
        }));
        let instance = Instance {
            dir,
            addr,
            tenant: options.tenant,
            signer,
            ca,
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
        self.signer
            .issue(
                &self.tenant,
                "user-1",
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
        write_config(&self.config_path, &self.tenant, retention);
    }

    pub async fn connect(&self) -> Conn {
        Conn::open(self.addr, &self.ca).await.unwrap()
    }

    async fn try_get(&self, path: &str) -> Option<Resp> {
        let mut conn = Conn::open(self.addr, &self.ca).await.ok()?;
        conn.send("GET", path, None, None, Vec::new()).await.ok()
    }

    /// One request on a new connection, with a valid token.
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
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
    ) -> Resp {
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
    ) -> Resp {
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

/// An HTTPS (HTTP/1.1) connection; requests on it reuse the same TLS session.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The leaf certificate the server presented on this connection.
    pub peer_cert: Vec<u8>,
}

pub fn client_config(ca: &CertifiedIssuer<'static, KeyPair>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

impl Conn {
    pub async fn open(
        addr: SocketAddr,
        ca: &CertifiedIssuer<'static, KeyPair>,
    ) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = TlsConnector::from(client_config(ca));
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, peer_cert })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Resp, hyper::Error> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Resp {
            status,
            headers,
            text,
            json,
        })
    }
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

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric line (`name{labels} value`) in an exposition, summed over lines
/// whose name and labels contain every `part`.
pub fn metric(exposition: &str, parts: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Conn {
    /// A GET-style request with one raw header and no body.
    pub async fn send_with_header(
        &mut self,
        method: &str,
        path: &str,
        name: &str,
        value: &str,
    ) -> Resp {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header(name, value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        }
    }
}
