//! Signup → instance Ready in local mode (not a test): prints, from one run on this
//! machine, p50 and p99 over `TENANTRY_BENCH_SIGNUPS` (default 50) signups, one after the
//! other, of
//!
//! * `Signup` answered (argon2id hash, user, tenant and audit rows);
//! * `Login` answered (what a portal does next);
//! * the tenant's phase `Ready` in `GetTenant` (polled every 5 ms) — the instance's files,
//!   its certificate, the process start and the API's readiness probe;
//! * its endpoint answering `GET /readyz` over HTTPS, checked by this process with the
//!   local CA;
//!
//! each from the moment `Signup` was sent (goal: p50 < 1 s), and beside them what bounds
//! it: the certificate issue alone, and the runtime process started by hand until it
//! answers HTTPS, with no API at all.
//!
//! The server is the release `tenantry-api serve --provisioner local` in a process of its
//! own, with the default (OWASP) argon2 parameters on SQLite; the instances are release
//! `tenant-runtime` processes. Build that first:
//!
//! ```sh
//! cargo build --release -p tenant-runtime
//! cargo bench -p tenantry-api --bench signup_ready
//! ```
//!
//! `TENANTRY_BENCH_RUNTIME_BIN` names another runtime binary; without one at the default
//! place the bench says so and stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tenantry_api::provision::probe::Prober;
use tenantry_client::{Client, Credentials, Trust};
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::{GetTenantRequest, LoginRequest, SignupRequest, TenantPhase};

const PASSWORD: &str = "violet-Harbor-93-lantern";
const POLL: Duration = Duration::from_millis(5);

struct Server {
    child: std::process::Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, so that the API stops every runtime it started.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn runtime_bin() -> Option<PathBuf> {
    let bin = std::env::var_os("TENANTRY_BENCH_RUNTIME_BIN").map_or_else(
        || {
            // target/release/deps/signup_ready-… → target/release/tenant-runtime
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(Path::parent)
                .unwrap()
                .join("tenant-runtime")
        },
        PathBuf::from,
    );
    bin.is_file().then_some(bin)
}

fn quantiles(name: &str, lat: &mut [Duration]) {
    lat.sort();
    let q = |q: f64| {
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    println!(
        "  {name:<52} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
        q(0.5),
        q(0.99),
        lat[lat.len() - 1].as_secs_f64() * 1e3
    );
}

async fn start_server(dir: &Path, runtime: &Path) -> (Server, String) {
    let port = common::free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry-api"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--provisioner", "local"])
        .arg("--runtime-bin")
        .arg(runtime)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--rate-limit-per-second", "0"])
        // What is measured is provisioning: from the signup, as if the owner had verified
        // their address at once (with verification, the clock would start at VerifyEmail).
        .arg("--require-email-verification=false")
        .env("TENANTRY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child };
    let addr = format!("http://127.0.0.1:{port}");
    common::wait_healthy(&addr).await;
    (server, addr)
}

/// Until `https://localhost:<port>/readyz` answers 200 with a certificate from the CA.
async fn until_https(prober: &Prober, endpoint: &str) {
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let start = Instant::now();
    while prober.ready(port, "localhost").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "{endpoint}");
        tokio::time::sleep(POLL).await;
    }
}

/// The runtime started by hand on a prepared instance directory (a copy of one the API
/// made, on a fresh port), until it answers HTTPS: the process-start part of the bound.
async fn runtime_alone(runtime: &Path, prepared: &Path, prober: &Prober, runs: usize) {
    let mut lat = Vec::new();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prepared.join("config.yaml")).unwrap())
            .unwrap();
    for i in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        for name in ["data.key", "tls.crt", "tls.key"] {
            std::fs::copy(prepared.join(name), dir.path().join(name)).unwrap();
        }
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let port = common::free_port();
        // The same config, moved to the copy and to a fresh port.
        let (from, to) = (
            prepared.display().to_string(),
            dir.path().display().to_string(),
        );
        let mut moved = config.clone();
        for value in moved.as_object_mut().unwrap().values_mut() {
            moved_paths(value, &from, &to);
        }
        moved["listen"] = format!("127.0.0.1:{port}").into();
        std::fs::write(
            dir.path().join("config.yaml"),
            serde_json::to_string(&moved).unwrap(),
        )
        .unwrap();
        let t = Instant::now();
        let mut child = std::process::Command::new(runtime)
            .arg("--config")
            .arg(dir.path().join("config.yaml"))
            .env("TENANTRY_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        until_https(prober, &format!("https://127.0.0.1:{port}")).await;
        if i > 0 {
            lat.push(t.elapsed());
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    quantiles("runtime process start → HTTPS answering (no API)", &mut lat);
}

fn moved_paths(value: &mut serde_json::Value, from: &str, to: &str) {
    match value {
        serde_json::Value::String(s) if s.starts_with(from) => *s = s.replacen(from, to, 1),
        serde_json::Value::Object(o) => o.values_mut().for_each(|v| moved_paths(v, from, to)),
        _ => {}
    }
}

#[tokio::main]
async fn main() {
    let Some(runtime) = runtime_bin() else {
        println!(
            "skipped: no tenant-runtime binary beside this bench; run `cargo build --release -p tenant-runtime` first (or set TENANTRY_BENCH_RUNTIME_BIN)"
        );
        return;
    };
    let signups: usize = std::env::var("TENANTRY_BENCH_SIGNUPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, addr) = start_server(&data, &runtime).await;
    let channel = tenantry_client::connect(&addr, Trust::default())
        .await
        .unwrap();
    let prober = Prober::new(&std::fs::read_to_string(data.join("ca.crt")).unwrap()).unwrap();
    println!(
        "signup → Ready, local mode, {signups} signups one after the other ({} cores, argon2id m=19456 KiB t=2 p=1, release binaries)",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    let run_id = std::process::id();
    let (mut signed, mut logged, mut ready, mut https) = (vec![], vec![], vec![], vec![]);
    let mut first_dir = None;
    for i in 0..signups {
        let email = format!("ready{run_id}-{i}@example.com");
        let t = Instant::now();
        let tenant_id = AccountServiceClient::new(channel.clone())
            .signup(SignupRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                tenant_name: format!("r{run_id}-{i}"),
                plan: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .tenant_id;
        signed.push(t.elapsed());
        let token = AccountServiceClient::new(channel.clone())
            .login(LoginRequest {
                email,
                password: PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .session_token;
        logged.push(t.elapsed());
        let client = Client::new(
            channel.clone(),
            Credentials::bearer(&secrecy::SecretString::from(token)).unwrap(),
        );
        let mut tenants = client.tenants();
        let endpoint = loop {
            let tenant = tenants
                .get_tenant(GetTenantRequest {
                    tenant_id: tenant_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .tenant
                .unwrap();
            if tenant.phase == TenantPhase::Ready as i32 {
                break tenant.endpoint;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "tenant {tenant_id} not Ready: {:?}",
                tenant.message
            );
            tokio::time::sleep(POLL).await;
        };
        ready.push(t.elapsed());
        until_https(&prober, &endpoint).await;
        https.push(t.elapsed());
        first_dir.get_or_insert_with(|| data.join("tenants").join(&tenant_id));
    }
    quantiles("Signup answered", &mut signed);
    quantiles("Login answered", &mut logged);
    quantiles("GetTenant says Ready", &mut ready);
    quantiles("endpoint answers HTTPS (signup → Ready)", &mut https);

    println!("what bounds it:");
    // The certificate: what the provisioner does per instance (an ECDSA P-256 key and a
    // leaf signed by the local CA).
    let ca =
        tenantry_pki::CertificateAuthority::generate("bench CA", jiff::Timestamp::now()).unwrap();
    let mut lat = Vec::new();
    for i in 0..signups {
        let t = Instant::now();
        ca.issue_leaf(&tenantry_pki::LeafRequest {
            dns_names: vec![format!("t{i}.localhost"), "localhost".into()],
            ip_addresses: vec![],
            validity: Duration::from_secs(86_400),
            now: jiff::Timestamp::now(),
        })
        .unwrap();
        lat.push(t.elapsed());
    }
    quantiles("certificate issue (key + leaf)", &mut lat);
    let prepared = first_dir.unwrap();
    runtime_alone(&runtime, &prepared, &prober, signups.min(20) + 1).await;
    drop(server);
}
