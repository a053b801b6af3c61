//! Throughput benchmark (not a test): prints, from one run on this machine,
//!
//! * signup and login throughput at 2, 8 and 32 concurrent gRPC clients, next to the
//!   argon2-only bound (the same hashes or verifications with the same parallelism and no
//!   server at all) — goal: at least 0.85 of the bound;
//! * WhoAmI throughput and p99 latency next to the gRPC health check of the same server at
//!   the same concurrency — goal: at least 0.5 of the health check's throughput.
//!
//! Runs with the default (OWASP) argon2 parameters on SQLite in a temporary directory.
//! Set `TENANTRY_BENCH_DATABASE_URL` to a PostgreSQL URL to measure on PostgreSQL instead.
//! `cargo bench -p tenantry-api --bench throughput`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use secrecy::SecretString;
use tenantry_api::config::{Cli, Command};
use tenantry_api::password::{HashParams, PasswordHasher};
use tenantry_client::{Client, Credentials, Trust};
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::{LoginRequest, SignupRequest, WhoAmIRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const PASSWORD: &str = "violet-Harbor-93-lantern";
const CONCURRENCY: [usize; 3] = [2, 8, 32];

/// Runs `total` operations spread over `clients` tasks; returns ops/s and latencies.
async fn drive<F, Fut>(clients: usize, total: usize, op: F) -> (f64, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return lat;
                }
                let t = Instant::now();
                op(i).await;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (total as f64 / start.elapsed().as_secs_f64(), all)
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort();
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

/// The argon2-only bound: `total` hashes (or verifications) with `clients` in flight,
/// on the same bounded blocking pool the server uses (one thread per core).
async fn argon2_bound(clients: usize, total: usize, verify: bool) -> f64 {
    let hasher = Arc::new(PasswordHasher::new(HashParams::default()).unwrap());
    let stored = hasher
        .hash(&SecretString::from(PASSWORD.to_owned()))
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let slots = Arc::new(tokio::sync::Semaphore::new(cores));
    let (rate, _) = drive(clients, total, move |_| {
        let hasher = Arc::clone(&hasher);
        let slots = Arc::clone(&slots);
        let stored = stored.clone();
        async move {
            let _slot = slots.acquire().await.unwrap();
            tokio::task::spawn_blocking(move || {
                let pw = SecretString::from(PASSWORD.to_owned());
                if verify {
                    assert!(hasher.verify(&pw, &stored).unwrap());
                } else {
                    hasher.hash(&pw).unwrap();
                }
            })
            .await
            .unwrap();
        }
    })
    .await;
    rate
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("TENANTRY_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}/bench.db", dir.path().display()));
    let key = dir.path().join("master.key");
    let argv = [
        "tenantry-api",
        "serve",
        "--database-url",
        &url,
        "--master-key-file",
        &key.display().to_string(),
        "--rate-limit-per-second",
        "0",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    {
        let (_, text) = tenantry_api::crypto::MasterKey::generate().unwrap();
        use secrecy::ExposeSecret as _;
        std::fs::write(&key, text.expose_secret()).unwrap();
        // The API refuses a key file other users can read.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let state =
        tenantry_api::server::build_state(&args, Arc::new(tenantry_api::clock::SystemClock))
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tenantry_api::server::serve(
        state,
        listener,
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = tenantry_client::connect(&format!("http://{addr}"), Trust::default())
        .await
        .unwrap();
    let run_id = std::process::id();

    println!(
        "tenantry-api throughput ({} cores, argon2id m=19456 KiB t=2 p=1, {})",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        if url.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!(
        "{:<28} {:>10} {:>14} {:>8}",
        "operation", "ops/s", "argon2 bound/s", "ratio"
    );
    let per_level = |c: usize| (c * 3).max(48);
    let mut user_counter = 0usize;
    for &clients in &CONCURRENCY {
        let total = per_level(clients);
        let bound = argon2_bound(clients, total, false).await;
        let ch = channel.clone();
        let base = user_counter;
        let (rate, _) = drive(clients, total, move |i| {
            let mut c = AccountServiceClient::new(ch.clone());
            async move {
                c.signup(SignupRequest {
                    email: format!("bench{run_id}-{}@example.com", base + i),
                    password: PASSWORD.into(),
                    tenant_name: format!("b{run_id}-{}", base + i),
                    plan: 0,
                })
                .await
                .unwrap();
            }
        })
        .await;
        user_counter += total;
        println!(
            "{:<28} {:>10.1} {:>14.1} {:>8.2}",
            format!("signup x{clients}"),
            rate,
            bound,
            rate / bound
        );
    }
    for &clients in &CONCURRENCY {
        let total = per_level(clients);
        let bound = argon2_bound(clients, total, true).await;
        let ch = channel.clone();
        let users = user_counter;
        let (rate, _) = drive(clients, total, move |i| {
            let mut c = AccountServiceClient::new(ch.clone());
            async move {
                c.login(LoginRequest {
                    email: format!("bench{run_id}-{}@example.com", i % users),
                    password: PASSWORD.into(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        println!(
            "{:<28} {:>10.1} {:>14.1} {:>8.2}",
            format!("login x{clients}"),
            rate,
            bound,
            rate / bound
        );
    }

    let mut c = AccountServiceClient::new(channel.clone());
    let token = c
        .login(LoginRequest {
            email: format!("bench{run_id}-0@example.com"),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session_token;
    let credentials = Credentials::bearer(&SecretString::from(token)).unwrap();
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "operation", "ops/s", "p99 ms", "ratio"
    );
    for &clients in &CONCURRENCY {
        let total = 4_000;
        let ch = channel.clone();
        let (health_rate, health_lat) = drive(clients, total, move |_| {
            let mut h = HealthClient::new(ch.clone());
            async move {
                h.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        let authed = Client::new(channel.clone(), credentials.clone());
        let (who_rate, who_lat) = drive(clients, total, move |_| {
            let mut c = authed.accounts();
            async move {
                c.who_am_i(WhoAmIRequest {}).await.unwrap();
            }
        })
        .await;
        println!(
            "{:<28} {:>10.0} {:>10.2} {:>8}",
            format!("health check x{clients}"),
            health_rate,
            p99(health_lat).as_secs_f64() * 1e3,
            ""
        );
        println!(
            "{:<28} {:>10.0} {:>10.2} {:>8.2}",
            format!("WhoAmI x{clients}"),
            who_rate,
            p99(who_lat).as_secs_f64() * 1e3,
            who_rate / health_rate
        );
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
