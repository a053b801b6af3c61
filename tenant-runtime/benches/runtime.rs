//! Runtime figures, printed from one run (`cargo bench -p tenant-runtime`):
//!
//! 1. Execution inserts per second through the store, sealed with AES-256-GCM under
//!    per-period data keys (the executions span a week, so several day keys are used),
//!    next to the very same inserts sealed the version-1 way (one key for everything, as
//!    before data keys) and without encryption (same schema, pragmas, statement and
//!    payload); rounds are interleaved and the median of each is compared. Goals: per-period
//!    / single key at least 0.95, per-period / plain at least 0.7.
//! 2. Pruning 1,000,000 expired executions with the retention pruner (bounded batches):
//!    rows per second and peak RSS. The database is seeded in this process, then the
//!    prune runs in a fresh child process (this executable again) so its `VmHWM` is the
//!    prune's own peak, not the seeding's. Goal: peak RSS under 100 MiB.
//!
//! `TENANTRY_BENCH_INSERTS` (default 20000) and `TENANTRY_BENCH_PRUNE_ROWS` (default
//! 1000000) change the sizes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tenant_runtime::crypto::{DataKey, Sealer, Table};
use tenant_runtime::keystore::Keyring;
use tenant_runtime::metrics::Metrics;
use tenant_runtime::retention;
use tenant_runtime::store::{DB_FILE, NewExecution, Store};
use tenantry_proto::retention::RetentionPolicy;

const CHILD_ENV: &str = "TENANTRY_BENCH_PRUNE_CHILD_DIR";
const KEY: [u8; 32] = [0x5a; 32];
const TENANT: &str = "bench";
const INSERT_SQL: &str = "INSERT INTO executions
    (id, workflow_id, status, started_at, finished_at, aged_at, payload)
    VALUES (?, ?, ?, ?, ?, ?, ?)";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmHWM` / `VmRSS` of this process, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A typical execution payload: about 1 KiB of JSON.
fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({
        "trigger": {"type": "webhook", "path": "/hooks/orders", "received": i},
        "nodes": (0..8).map(|n| serde_json::json!({
            "name": format!("node-{n}"), "status": "success", "ms": n * 7 + i % 13,
            "output": {"rows": n * 3, "note": "lorem ipsum dolor sit amet consectetur"},
        })).collect::<Vec<_>>(),
    })
}

fn new_execution(i: usize) -> NewExecution {
    NewExecution {
        workflow_id: format!("wf-{}", i % 50),
        status: "success".into(),
        // 30 s apart: 20,000 executions span a week, so inserts use several day keys.
        started_at: Timestamp::from_second(1_800_000_000 + 30 * i as i64).unwrap(),
        finished_at: Some(Timestamp::from_second(1_800_000_010 + 30 * i as i64).unwrap()),
        data: payload(i),
    }
}

fn sealer() -> Sealer {
    Sealer::new(&DataKey::from_bytes(&KEY).unwrap(), TENANT)
}

async fn keyring(dir: &Path) -> Keyring {
    Keyring::open(
        dir,
        TENANT,
        DataKey::from_bytes(&KEY).unwrap(),
        None,
        Duration::from_secs(86_400),
    )
    .await
    .unwrap()
}

/// A pool on `dir`'s database configured exactly as the store configures its own.
async fn raw_pool(dir: &Path) -> sqlx::SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(dir.join(DB_FILE))
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .pragma("secure_delete", "ON")
        .pragma("temp_store", "MEMORY");
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// Inserts `n` executions through the store (sealed); returns inserts per second.
async fn encrypted_round(store: &Store, n: usize, offset: usize) -> f64 {
    let start = Instant::now();
    for i in offset..offset + n {
        store.insert_execution(&new_execution(i)).await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The same inserts (id generation, serialization, statement, pool) sealed under one key,
/// `sealer` (version 1, what the store did before per-period keys), or not at all.
async fn raw_round(
    pool: &sqlx::SqlitePool,
    sealer: Option<&Sealer>,
    n: usize,
    offset: usize,
) -> f64 {
    let start = Instant::now();
    for i in offset..offset + n {
        let e = new_execution(i);
        let id = uuid::Uuid::new_v4().to_string();
        let plain = serde_json::to_vec(&e.data).unwrap();
        let bytes = match sealer {
            Some(s) => s.seal(Table::Executions, &id, &plain).unwrap(),
            None => plain,
        };
        let started = e.started_at.as_microsecond();
        let finished = e.finished_at.map(|t| t.as_microsecond());
        sqlx::query(INSERT_SQL)
            .bind(&id)
            .bind(&e.workflow_id)
            .bind(&e.status)
            .bind(started)
            .bind(finished)
            .bind(finished.unwrap_or(started))
            .bind(bytes)
            .execute(pool)
            .await
            .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn insert_bench() {
    let total = env_usize("TENANTRY_BENCH_INSERTS", 20_000);
    let rounds = 5;
    let per_round = (total / rounds).max(1);
    let enc_dir = tempfile::tempdir().unwrap();
    let single_dir = tempfile::tempdir().unwrap();
    let plain_dir = tempfile::tempdir().unwrap();
    let store = Store::open(enc_dir.path(), keyring(enc_dir.path()).await)
        .await
        .unwrap();
    // Same schema for the other two sides, then their own pools configured identically.
    for dir in [single_dir.path(), plain_dir.path()] {
        let other = Store::open(dir, keyring(dir).await).await.unwrap();
        other.close().await;
        other.keys().close().await;
    }
    let single_pool = raw_pool(single_dir.path()).await;
    let plain_pool = raw_pool(plain_dir.path()).await;
    let single_key = sealer();
    // Warm up all three (page cache, statement cache).
    encrypted_round(&store, 200, 10_000_000).await;
    raw_round(&single_pool, Some(&single_key), 200, 10_000_000).await;
    raw_round(&plain_pool, None, 200, 10_000_000).await;
    let (mut enc, mut single, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let at = r * per_round;
        // Rotate which goes first, so drift in disk or CPU state hits all alike.
        for side in 0..3 {
            match (side + r) % 3 {
                0 => enc.push(encrypted_round(&store, per_round, at).await),
                1 => single.push(raw_round(&single_pool, Some(&single_key), per_round, at).await),
                _ => plain.push(raw_round(&plain_pool, None, per_round, at).await),
            }
        }
    }
    let (enc, single, plain) = (median(enc), median(single), median(plain));
    let payload_len = serde_json::to_vec(&payload(0)).unwrap().len();
    println!(
        "== execution inserts ({} x {per_round}, ~{payload_len} B payload, one statement each, WAL, synchronous=NORMAL; {} day keys used)",
        rounds,
        store.keys().len() - 1
    );
    println!("per-period data keys (v2):   {enc:>10.0} inserts/s");
    println!("single key (v1, before):     {single:>10.0} inserts/s");
    println!("plain (no encryption):       {plain:>10.0} inserts/s");
    println!(
        "ratio per-period/single key: {:>10.3}   (goal >= 0.95: {})",
        enc / single,
        if enc / single >= 0.95 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "ratio per-period/plain:      {:>10.3}   (goal >= 0.7: {})",
        enc / plain,
        if enc / plain >= 0.7 { "met" } else { "NOT met" }
    );
    store.close().await;
    store.keys().close().await;
    single_pool.close().await;
    plain_pool.close().await;
}

/// Seeds `rows` executions that expired long ago, sealed like the store seals them, in
/// large transactions (seeding speed is not what is measured).
async fn seed(dir: &Path, rows: usize) {
    let store = Store::open(dir, keyring(dir).await).await.unwrap();
    store.close().await;
    let keys = store.keys().clone();
    let pool = raw_pool(dir).await;
    let old = Timestamp::now()
        .checked_sub(SignedDuration::from_hours(24 * 60))
        .unwrap();
    let small = serde_json::to_vec(&serde_json::json!({"status": "done", "items": 3})).unwrap();
    let mut i = 0;
    while i < rows {
        let mut tx = pool.begin().await.unwrap();
        for _ in 0..10_000.min(rows - i) {
            let id = uuid::Uuid::new_v4().to_string();
            let started = old.as_microsecond() + i as i64;
            let sealed = keys
                .execution_key(started + 1000)
                .await
                .unwrap()
                .seal(Table::Executions, &id, &small)
                .unwrap();
            sqlx::query(INSERT_SQL)
                .bind(&id)
                .bind("wf-seed")
                .bind("success")
                .bind(started)
                .bind(started + 1000)
                .bind(started + 1000)
                .bind(sealed)
                .execute(&mut *tx)
                .await
                .unwrap();
            i += 1;
        }
        tx.commit().await.unwrap();
    }
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    keys.close().await;
}

/// The child: prune everything in `dir` and report.
async fn prune_child(dir: &Path) {
    let baseline = status_kib("VmHWM:");
    let store = Store::open(dir, keyring(dir).await).await.unwrap();
    let before = store.count_executions().await.unwrap();
    let metrics = Metrics::new();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let policy = RetentionPolicy {
        max_age_hours: 24,
        max_count: 10_000,
    };
    let start = Instant::now();
    let report = retention::prune(&store, policy, Timestamp::now(), 1000, &metrics, &stop)
        .await
        .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let after = store.count_executions().await.unwrap();
    store.close().await;
    let pruned = report.by_age + report.by_count;
    println!("rows before:             {before:>10}");
    println!(
        "pruned (age / count):    {:>10} / {}",
        report.by_age, report.by_count
    );
    println!("rows after:              {after:>10}");
    println!("time:                    {elapsed:>10.2} s");
    println!(
        "rate:                    {:>10.0} rows/s",
        pruned as f64 / elapsed
    );
    let peak = status_kib("VmHWM:");
    println!(
        "peak RSS (VmHWM):        {:>10.1} MiB   (process baseline before opening the store: {:.1} MiB; goal < 100 MiB: {})",
        peak as f64 / 1024.0,
        baseline as f64 / 1024.0,
        if peak < 100 * 1024 { "met" } else { "NOT met" }
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        runtime.block_on(prune_child(Path::new(&dir)));
        return;
    }
    runtime.block_on(insert_bench());

    let rows = env_usize("TENANTRY_BENCH_PRUNE_ROWS", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let seed_start = Instant::now();
    runtime.block_on(seed(dir.path(), rows));
    let db_size = std::fs::metadata(dir.path().join(DB_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    println!();
    println!(
        "== pruning {rows} expired executions (seeded in {:.1} s, database {:.0} MiB; pruned in a fresh process, batches of 1000)",
        seed_start.elapsed().as_secs_f64(),
        db_size as f64 / (1024.0 * 1024.0)
    );
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
}
