//! Throughput benchmark (not a test): prints, from one run on this machine,
//!
//! * signup and login throughput at 2, 8 and 32 concurrent gRPC clients, next to the
//!   argon2-only bound (the same hashes or verifications with the same parallelism and no
//!   server at all) — goal: at least 0.85 of the bound; five rounds of 96 or more calls,
//!   each between two rounds of the bound and compared with their mean, the median of the
//!   five ratios printed with their range; with the calls' p50 and p99 latency, the
//!   bound's p50 (one hash, with its wait for the pool), and how busy
//!   the machine's CPUs were during the calls (below 100 %, the calls wait on something
//!   other than CPU: a round trip, a commit, a hand-off between threads);
//! * WhoAmI throughput and p99 latency next to the gRPC health check of the same server at
//!   the same concurrency — goal: at least 0.5 of the health check's throughput.
//!
//! The server is the release `tenantry-api serve` binary in a process of its own; the load
//! comes from real tonic clients in this process, one HTTP/2 connection per client and one
//! request per connection at a time. Runs with the default (OWASP) argon2 parameters on
//! SQLite in a temporary directory, then, when `TENANTRY_BENCH_DATABASE_URL` names a
//! PostgreSQL server, on a fresh database there (dropped at the end).
//! `cargo bench -p tenantry-api --bench throughput`; add `-- --overhead` for what a signup
//! and a login cost the server beyond the hash (CPU time and context switches per call),
//! and `--compare-with PATH` to measure another build's `tenantry-api` beside this one.
//! `--clients 2,8` runs those client counts only (with `--overhead`, the first of them
//! instead of 8), `--only signup,login,whoami` those comparisons only (not with
//! `--overhead`), and `--backend sqlite` or `--backend postgres` that database only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tenantry_api::password::{HashParams, HashingPool, PasswordHasher};
use tenantry_client::{Client, Credentials, Trust};
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::{LoginRequest, SignupRequest, WhoAmIRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const PASSWORD: &str = "violet-Harbor-93-lantern";
const CONCURRENCY: [usize; 3] = [2, 8, 32];

/// The value after `--name` on the command line.
fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// The client counts to run: [`CONCURRENCY`], or those of `--clients 2,8`.
fn concurrency() -> Vec<usize> {
    arg_value("--clients").map_or(CONCURRENCY.to_vec(), |list| {
        list.split(',')
            .map(|n| n.trim().parse().expect("--clients takes numbers: 2,8,32"))
            .collect()
    })
}

/// Whether to run on `backend` (`sqlite` or `postgres`): both unless `--backend` names one.
fn on_backend(backend: &str) -> bool {
    arg_value("--backend").is_none_or(|only| match only.as_str() {
        "sqlite" | "postgres" => only == backend,
        other => panic!("--backend takes sqlite or postgres, not {other:?}"),
    })
}

/// Whether to measure `what` (signup, login, whoami): all unless `--only` names others.
fn measures(what: &str) -> bool {
    arg_value("--only").is_none_or(|only| only.split(',').any(|w| w.trim() == what))
}

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

/// The `q` quantile (0..1) of `lat`, in milliseconds.
fn quantile_ms(lat: &mut [Duration], q: f64) -> f64 {
    lat.sort();
    let i = ((lat.len() as f64 * q) as usize).min(lat.len() - 1);
    lat[i].as_secs_f64() * 1e3
}

/// One connection per client.
async fn channels(addr: &str, clients: usize) -> Vec<tonic::transport::Channel> {
    let mut out = Vec::new();
    for _ in 0..clients {
        out.push(
            tenantry_client::connect(addr, Trust::default())
                .await
                .unwrap(),
        );
    }
    out
}

/// The release server in its own process, killed on drop.
struct Server {
    child: std::process::Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_server(url: &str, dir: &std::path::Path, extra: &[&str]) -> Server {
    start_server_bin(
        std::path::Path::new(env!("CARGO_BIN_EXE_tenantry-api")),
        url,
        dir,
        extra,
    )
    .await
}

/// [`start_server`] with another `tenantry-api` binary (`--compare-with`).
async fn start_server_bin(
    bin: &std::path::Path,
    url: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> Server {
    let port = common::free_port();
    let child = std::process::Command::new(bin)
        .args(["serve", "--database-url", url])
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .arg("--token-signing-key-file")
        .arg(dir.join("token-signing.key"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--rate-limit-per-second", "0"])
        .env("TENANTRY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    common::wait_healthy(&addr).await;
    // The session cache starts with the server; give its listener a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Server { child, addr }
}

/// Rounds of the operation; the argon2-only bound runs before the first and after each.
const ROUNDS: usize = 5;

/// What [`interleaved`] measured.
struct Comparison {
    /// Median rate of the operation's rounds.
    rate: f64,
    /// Median rate of the bound's rounds.
    bound: f64,
    /// Each operation round's rate over the mean of the two bound rounds around it.
    ratios: Vec<f64>,
    /// The operation's latencies, every round.
    latencies: Vec<Duration>,
    /// The bound's latencies (queueing for the pool and the hash), every round.
    bound_latencies: Vec<Duration>,
    /// Share of the machine's CPU time busy during the operation's rounds.
    busy: f64,
}

/// [`ROUNDS`] rounds of the operation (`op(total)` runs `total` of them), each between two
/// rounds of the argon2-only bound, so that each is compared with the bound of the same
/// moments of a shared machine: this machine's speed drifts by 10 % and more over tens of
/// seconds, more than the differences measured here.
async fn interleaved<F, Fut>(clients: usize, verify: bool, mut op: F) -> Comparison
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = (f64, Vec<Duration>)>,
{
    let total = (clients * 4).max(96);
    let (mut rates, mut bounds) = (Vec::new(), Vec::new());
    let (mut latencies, mut bound_latencies) = (Vec::new(), Vec::new());
    let (mut busy, mut all) = (0, 0);
    let (first, lat) = argon2_bound(clients, total, verify).await;
    bounds.push(first);
    bound_latencies.extend(lat);
    for _ in 0..ROUNDS {
        let before = cpu_ticks();
        let (rate, lat) = op(total).await;
        let after = cpu_ticks();
        busy += after.0 - before.0;
        all += after.1 - before.1;
        rates.push(rate);
        latencies.extend(lat);
        let (bound, lat) = argon2_bound(clients, total, verify).await;
        bounds.push(bound);
        bound_latencies.extend(lat);
    }
    let ratios = rates
        .iter()
        .zip(bounds.windows(2))
        .map(|(rate, around)| rate / ((around[0] + around[1]) / 2.0))
        .collect();
    Comparison {
        rate: median(&mut rates),
        bound: median(&mut bounds),
        ratios,
        latencies,
        bound_latencies,
        busy: busy as f64 / all.max(1) as f64,
    }
}

/// The machine's CPU ticks so far: (busy, all), from the `cpu` line of /proc/stat.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap())
        .collect();
    let all: u64 = ticks.iter().take(8).sum();
    // idle and iowait
    (all - ticks[3] - ticks[4], all)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One line of the table; the ratio is the median of the rounds' own ratios, with their
/// range after it.
fn print_ratio(what: &str, mut c: Comparison) {
    // Sorted by `median`: the first and last are the lowest and highest.
    let ratio = median(&mut c.ratios);
    println!(
        "{what:<16} {:>8.1} {:>8.1} {:>6.2} {:>11} {:>8.1} {:>8.1} {:>9.1} {:>6.0}%",
        c.rate,
        c.bound,
        ratio,
        format!("{:.2}-{:.2}", c.ratios[0], c.ratios[c.ratios.len() - 1]),
        quantile_ms(&mut c.latencies, 0.5),
        quantile_ms(&mut c.latencies, 0.99),
        quantile_ms(&mut c.bound_latencies, 0.5),
        c.busy * 100.0
    );
}

/// The argon2-only bound: `total` hashes (or verifications) with `clients` in flight, on
/// the server's own hashing pool (one thread per core), with nothing else to do.
async fn argon2_bound(clients: usize, total: usize, verify: bool) -> (f64, Vec<Duration>) {
    let hasher = Arc::new(PasswordHasher::new(HashParams::default()).unwrap());
    let stored = hasher
        .hash(&SecretString::from(PASSWORD.to_owned()))
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let pool = Arc::new(HashingPool::new(cores).unwrap());
    drive(clients, total, move |_| {
        let (hasher, pool, stored) = (Arc::clone(&hasher), Arc::clone(&pool), stored.clone());
        async move {
            pool.run(move || {
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
    .await
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry-api"))
        .args(["keygen", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    if std::env::args().any(|a| a == "--overhead") {
        overhead(dir.path(), std::env::args().any(|a| a == "--real-hash")).await;
        return;
    }
    println!(
        "tenantry-api throughput ({} cores, argon2id m=19456 KiB t=2 p=1, release server in its own process)",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    let mut ratios = Vec::new();
    if on_backend("sqlite") {
        let sqlite = format!("sqlite://{}/bench.db", dir.path().display());
        ratios.push(("SQLite", run(&sqlite, dir.path()).await));
    }
    if let Some(base) = std::env::var("TENANTRY_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty() && on_backend("postgres"))
    {
        let name = format!("bench_{}", std::process::id());
        psql(&base, &format!("CREATE DATABASE {name}"));
        let (head, _) = base.rsplit_once('/').unwrap();
        let url = format!("{head}/{name}");
        ratios.push(("PostgreSQL", run(&url, dir.path()).await));
        psql(&base, &format!("DROP DATABASE {name} WITH (FORCE)"));
    }
    if ratios.is_empty() {
        println!("nothing measured: --backend postgres needs TENANTRY_BENCH_DATABASE_URL");
    }
    if ratios.is_empty() || ratios.iter().any(|(_, r)| r.is_empty()) {
        return;
    }
    println!();
    println!(
        "| clients | {} |",
        ratios
            .iter()
            .map(|(b, _)| format!("{b}: WhoAmI/s ÷ Health/s"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(ratios.len()));
    for (i, clients) in concurrency().iter().enumerate() {
        let cells: Vec<String> = ratios
            .iter()
            .map(|(_, r)| format!("{:.0} ÷ {:.0} = {:.2}", r[i].0, r[i].1, r[i].0 / r[i].1))
            .collect();
        println!("| {clients} | {} |", cells.join(" | "));
    }
}

/// `-- --overhead`: what a signup and a login cost the server beyond the password hash.
/// The server runs with the cheapest argon2id (8 KiB, one pass), so its CPU time per call
/// (user and system, all threads, from /proc) and its context switches are the call's own
/// work: gRPC, database, audit, the verification mail. A profile to read side by side
/// across changes (and to run `perf record -p` against).
///
/// With `--real-hash` the server keeps the default argon2id, and the bound's own CPU time
/// per hash is printed beside it: the server's CPU per call less the bound's is then what
/// the call costs beyond the hash at full size.
///
/// With `--compare-with PATH` (another build's `tenantry-api`, e.g. of an earlier commit)
/// both binaries are measured in turn, twice each, on fresh databases of their own: a
/// before-and-after in one run, on the same moments of a shared machine.
async fn overhead(dir: &std::path::Path, real_hash: bool) {
    let calls: usize = if real_hash { 400 } else { 2_000 };
    let clients = arg_value("--clients").map_or(8, |_| concurrency()[0]);
    let mut bins = vec![(
        "this build",
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_tenantry-api")),
    )];
    if let Some(other) = arg_value("--compare-with") {
        bins.push(("compared", std::path::PathBuf::from(other)));
    }
    let rounds = if bins.len() > 1 { 2 } else { 1 };
    let pg = std::env::var("TENANTRY_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let argon2 = if real_hash {
        "the default argon2id"
    } else {
        "argon2id 8 KiB, 1 pass"
    };
    println!("server cost per call ({argon2}; {calls} calls, {clients} clients)");
    if real_hash {
        for verify in [false, true] {
            let me = std::process::id();
            let before = process_cost(me);
            let (rate, _) = argon2_bound(clients, calls, verify).await;
            let after = process_cost(me);
            println!(
                "bound ({}): {rate:.1}/s, {:.3} CPU ms each",
                if verify { "verify" } else { "hash" },
                (after.0 - before.0) / calls as f64
            );
        }
    }
    println!(
        "{:<34} {:>8} {:>14} {:>17} {:>18} {:>15}",
        "operation",
        "calls/s",
        "server CPU ms",
        "context switches",
        "PostgreSQL CPU ms",
        "machine CPU ms"
    );
    let mut backends = Vec::new();
    if on_backend("sqlite") {
        backends.push("SQLite");
    }
    if pg.is_some() && on_backend("postgres") {
        backends.push("PostgreSQL");
    }
    for backend in backends {
        for round in 0..rounds {
            for (k, (label, bin)) in bins.iter().enumerate() {
                let name = format!("bench_overhead_{}_{round}_{k}", std::process::id());
                let url = match &pg {
                    Some(base) if backend == "PostgreSQL" => {
                        psql(base, &format!("CREATE DATABASE {name}"));
                        let (head, _) = base.rsplit_once('/').unwrap();
                        format!("{head}/{name}")
                    }
                    _ => format!("sqlite://{}/{name}.db", dir.display()),
                };
                let label = if rounds > 1 {
                    format!("{backend} ({label})")
                } else {
                    backend.to_owned()
                };
                overhead_of(bin, &url, dir, real_hash, calls, clients, &label).await;
                if let Some(base) = pg.as_ref().filter(|_| backend == "PostgreSQL") {
                    psql(base, &format!("DROP DATABASE {name} WITH (FORCE)"));
                }
            }
        }
    }
}

/// One server (`bin` on `url`): signups then logins, and what they cost.
async fn overhead_of(
    bin: &std::path::Path,
    url: &str,
    dir: &std::path::Path,
    real_hash: bool,
    calls: usize,
    clients: usize,
    label: &str,
) {
    let cheap = ["--argon2-memory-kib", "8", "--argon2-iterations", "1"];
    let server = start_server_bin(bin, url, dir, if real_hash { &[] } else { &cheap }).await;
    let pid = server.child.id();
    let chs = Arc::new(channels(&server.addr, clients).await);
    let run_id = std::process::id();
    for op in ["signup", "login"] {
        let before = process_cost(pid);
        let pg_before = postgres_cpu_ms();
        let client_before = process_cost(std::process::id()).0;
        let machine_before = cpu_ticks().0;
        let chs = Arc::clone(&chs);
        let (rate, _) = drive(clients, calls, move |i| {
            let mut c = AccountServiceClient::new(chs[i % chs.len()].clone());
            async move {
                if op == "signup" {
                    c.signup(signup_request("overhead", run_id, i))
                        .await
                        .unwrap();
                } else {
                    c.login(LoginRequest {
                        email: format!("overhead{run_id}-{i}@example.com"),
                        password: PASSWORD.into(),
                    })
                    .await
                    .unwrap();
                }
            }
        })
        .await;
        // Let the mail sent for the last signups be counted with them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = process_cost(pid);
        let pg_after = postgres_cpu_ms();
        // Everything the machine did meanwhile (USER_HZ ticks of 10 ms): the server,
        // PostgreSQL, the clients, and the kernel's own threads (journal commits, I/O).
        let machine = (cpu_ticks().0 - machine_before) as f64 * 10.0 / calls as f64;
        let client = (process_cost(std::process::id()).0 - client_before) / calls as f64;
        println!(
            "{:<34} {:>8.0} {:>14.3} {:>17.1} {:>18.3} {:>15.3}",
            format!("{label} {op}"),
            rate,
            (after.0 - before.0) / calls as f64,
            (after.1 - before.1) as f64 / calls as f64,
            (pg_after - pg_before) / calls as f64,
            machine,
        );
        let by_thread: Vec<String> = after
            .2
            .iter()
            .map(|(name, ms)| (name, ms - before.2.get(name).copied().unwrap_or(0.0)))
            .filter(|(_, ms)| *ms > 0.0)
            .map(|(name, ms)| format!("{name} {:.3}", ms / calls as f64))
            .collect();
        println!(
            "{:<34} server CPU ms by thread: {}; the clients' (this process): {client:.3}",
            "",
            by_thread.join(", ")
        );
    }
}

/// CPU time so far (ms) of every process named `postgres` (the server and its backends).
fn postgres_cpu_ms() -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = tail.split_whitespace().collect();
        total += (fields[11].parse::<f64>().unwrap_or(0.0)
            + fields[12].parse::<f64>().unwrap_or(0.0))
            * 10.0;
    }
    total
}

/// A process's CPU time so far (ms, user and system, every thread), context switches
/// (voluntary and not, summed over its threads), and the CPU time of its live threads by
/// name, numbers dropped (`argon2-0` and `argon2-1` are `argon2`; a thread that ended is
/// counted in the total only).
fn process_cost(pid: u32) -> (f64, u64, std::collections::BTreeMap<String, f64>) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    let cpu_ms = ticks * 10.0;
    let mut switches = 0;
    let mut by_thread = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("stat"))
            && let Some((head, tail)) = stat.rsplit_once(')')
            && let Some((_, name)) = head.split_once('(')
        {
            let fields: Vec<&str> = tail.split_whitespace().collect();
            let ms = (fields[11].parse::<f64>().unwrap_or(0.0)
                + fields[12].parse::<f64>().unwrap_or(0.0))
                * 10.0;
            let name = match name.rsplit_once('-') {
                Some((stem, n)) if n.chars().all(|c| c.is_ascii_digit()) => stem,
                _ => name,
            };
            *by_thread.entry(name.to_owned()).or_insert(0.0) += ms;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += n.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    (cpu_ms, switches, by_thread)
}

fn psql(url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-qAt", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Measures one backend; returns (WhoAmI/s, Health/s) per concurrency level.
async fn run(url: &str, dir: &std::path::Path) -> Vec<(f64, f64)> {
    let server = start_server(url, dir, &[]).await;
    let backend = if url.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    let run_id = std::process::id();
    println!();
    println!("== {backend}");
    println!(
        "{:<16} {:>8} {:>8} {:>6} {:>11} {:>8} {:>8} {:>9} {:>7}",
        "operation", "ops/s", "bound/s", "ratio", "rounds", "p50 ms", "p99 ms", "hash p50", "CPU"
    );
    let mut user_counter = 0usize;
    for clients in concurrency().into_iter().filter(|_| measures("signup")) {
        let chs = Arc::new(channels(&server.addr, clients).await);
        let comparison = interleaved(clients, false, |total| {
            let chs = Arc::clone(&chs);
            let base = user_counter;
            user_counter += total;
            drive(clients, total, move |i| {
                let mut c = AccountServiceClient::new(chs[i % chs.len()].clone());
                async move {
                    c.signup(signup_request("bench", run_id, base + i))
                        .await
                        .unwrap();
                }
            })
        })
        .await;
        print_ratio(&format!("signup x{clients}"), comparison);
    }
    if user_counter == 0 {
        // Logins need accounts: one signup per login client, unmeasured.
        user_counter = signup_accounts(&server.addr, run_id).await;
    }
    for clients in concurrency().into_iter().filter(|_| measures("login")) {
        let chs = Arc::new(channels(&server.addr, clients).await);
        let users = user_counter;
        let comparison = interleaved(clients, true, |total| {
            let chs = Arc::clone(&chs);
            drive(clients, total, move |i| {
                let mut c = AccountServiceClient::new(chs[i % chs.len()].clone());
                async move {
                    c.login(LoginRequest {
                        email: format!("bench{run_id}-{}@example.com", i % users),
                        password: PASSWORD.into(),
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .await;
        print_ratio(&format!("login x{clients}"), comparison);
    }

    let channel = tenantry_client::connect(&server.addr, Trust::default())
        .await
        .unwrap();
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
        "{:<28} {:>10} {:>10} {:>10} {:>8}",
        "operation", "ops/s", "p50 ms", "p99 ms", "ratio"
    );
    let mut out = Vec::new();
    for clients in concurrency().into_iter().filter(|_| measures("whoami")) {
        let total = 20_000;
        // One connection per client; each client task owns one and waits for each answer.
        let chs = Arc::new(channels(&server.addr, clients).await);
        let health_chs = Arc::clone(&chs);
        let (health_rate, mut health_lat) = drive_per_client(clients, total, move |k| {
            let mut h = HealthClient::new(health_chs[k].clone());
            async move {
                h.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            }
        })
        .await;
        let who_chs = Arc::clone(&chs);
        let creds = credentials.clone();
        let (who_rate, mut who_lat) = drive_per_client(clients, total, move |k| {
            let mut c = Client::new(who_chs[k].clone(), creds.clone()).accounts();
            async move {
                c.who_am_i(WhoAmIRequest {}).await.unwrap();
            }
        })
        .await;
        println!(
            "{:<28} {:>10.0} {:>10.3} {:>10.3} {:>8}",
            format!("health check x{clients}"),
            health_rate,
            quantile_ms(&mut health_lat, 0.5),
            quantile_ms(&mut health_lat, 0.99),
            ""
        );
        println!(
            "{:<28} {:>10.0} {:>10.3} {:>10.3} {:>8.2}",
            format!("WhoAmI x{clients}"),
            who_rate,
            quantile_ms(&mut who_lat, 0.5),
            quantile_ms(&mut who_lat, 0.99),
            who_rate / health_rate
        );
        out.push((who_rate, health_rate));
    }
    drop(server);
    out
}

/// The signup of account `n` of this run: email `{tag}{run_id}-{n}@example.com`, tenant
/// named after the tag's first letter.
fn signup_request(tag: &str, run_id: u32, n: usize) -> SignupRequest {
    SignupRequest {
        email: format!("{tag}{run_id}-{n}@example.com"),
        password: PASSWORD.into(),
        tenant_name: format!("{}{run_id}-{n}", &tag[..1]),
        plan: 0,
    }
}

/// Signs up the accounts that logins use when no signup was measured: `bench{run_id}-N`
/// for N below the returned count.
async fn signup_accounts(addr: &str, run_id: u32) -> usize {
    const ACCOUNTS: usize = 32;
    let chs = Arc::new(channels(addr, 4).await);
    drive(4, ACCOUNTS, move |i| {
        let mut c = AccountServiceClient::new(chs[i % chs.len()].clone());
        async move {
            c.signup(signup_request("bench", run_id, i)).await.unwrap();
        }
    })
    .await;
    ACCOUNTS
}

/// Like [`drive`], but the operation is told which client (0..clients) runs it, so that
/// each client keeps to its own connection.
async fn drive_per_client<F, Fut>(clients: usize, total: usize, op: F) -> (f64, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = Instant::now();
                op(k).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (total as f64 / start.elapsed().as_secs_f64(), all)
}
