//! Backup and restore of the control database against copying its file, side by side in
//! one run: `cargo bench -p tenantry-api --bench backup` (add `-- --rows N` to size the
//! audit log; `TENANTRY_BENCH_DATABASE_URL=postgres://…` adds PostgreSQL, dumped from
//! and restored into a schema of its own).
//!
//! Prints MB/s (of the SQLite file) and rows/s for the copy, the backup and the restore,
//! the ratios backup÷copy and restore÷copy (goal ≥ 0.3), and the peak RSS of each phase
//! (`VmHWM`, reset before each): a backup streams, so its peak must not grow with the
//! database. A `read` phase first reads and decodes every row and keeps nothing: the
//! floor of any logical dump through the database driver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Instant;

use tenantry_api::audit::{AuditEntry, GENESIS_HASH, chain_hash};
use tenantry_api::clock::SystemClock;
use tenantry_api::store::Store;

#[path = "common/pg.rs"]
mod pg;

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Fills a fresh database: `users` users and `rows` audit rows in a valid chain.
async fn populate(url: &str, users: usize, rows: usize) -> u64 {
    let store = Store::connect(url, 2).await.unwrap();
    let mut sql = String::from("BEGIN;");
    for i in 0..users {
        sql.push_str(&format!(
            "INSERT INTO users (id, email, password_hash, created_at_ms, email_verified_at_ms) VALUES \
             ('u-{i:08}', 'user{i}@bench.test', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g', {i}, {i});"
        ));
    }
    sql.push_str("COMMIT;");
    store.execute_raw_for_tests(&sql).await.unwrap();
    let mut prev = GENESIS_HASH.to_owned();
    for chunk in (1..=rows).collect::<Vec<_>>().chunks(2000) {
        let mut sql = String::from("BEGIN;");
        for &seq in chunk {
            let entry = AuditEntry {
                sequence: seq as i64,
                at_ms: 1_767_225_600_000 + seq as i64,
                action: "login.failed".into(),
                actor_user_id: format!("u-{:08}", seq % users.max(1)),
                target: format!("u-{:08}", seq % users.max(1)),
                outcome: "failure".into(),
                source: "203.0.113.7".into(),
                detail_json: r#"{"reason":"invalid_credentials"}"#.into(),
            };
            let hash = chain_hash(&prev, &entry);
            sql.push_str(&format!(
                "INSERT INTO audit_events (sequence, at_ms, action, actor_user_id, target, outcome, source, detail_json, prev_hash, hash) \
                 VALUES ({}, {}, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}');",
                entry.sequence, entry.at_ms, entry.action, entry.actor_user_id, entry.target,
                entry.outcome, entry.source, entry.detail_json, prev, hash
            ));
            prev = hash;
        }
        sql.push_str("COMMIT;");
        store.execute_raw_for_tests(&sql).await.unwrap();
    }
    store
        .execute_raw_for_tests(&format!(
            "UPDATE audit_head SET sequence = {rows}, hash = '{prev}' WHERE id = 1"
        ))
        .await
        .unwrap();
    store.close().await;
    (users + rows) as u64
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

struct Phase {
    name: &'static str,
    secs: f64,
    /// RSS when the phase started, and the peak during it.
    start_mib: f64,
    peak_mib: f64,
}

async fn run(
    label: &str,
    url: &str,
    target_url: &str,
    dir: &Path,
    (size, rows, copy_mb_s): (u64, u64, f64),
) {
    let keys = dir.join("keys");
    tenantry_api::backup::keygen(&keys).unwrap();
    let recipients = tenantry_backup::Recipients::load(&[keys.join("backup.pub")]).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // The floor of any logical dump through the database driver: every row of every
    // table read and decoded, then dropped (no encoding, compression or encryption).
    reset_peak_rss();
    let start_mib = rss_mib();
    let start = Instant::now();
    read_every_row(url).await;
    let read = Phase {
        name: "read",
        secs: start.elapsed().as_secs_f64(),
        start_mib,
        peak_mib: peak_rss_mib(),
    };

    reset_peak_rss();
    let start_mib = rss_mib();
    let start = Instant::now();
    let report = tenantry_api::backup::backup(url, &out, recipients, 0, &SystemClock)
        .await
        .unwrap();
    let backup = Phase {
        name: "backup",
        secs: start.elapsed().as_secs_f64(),
        start_mib,
        peak_mib: peak_rss_mib(),
    };

    let target = dir.join("restored");
    std::fs::create_dir_all(&target).unwrap();
    let master = dir.join("master.key");
    let db = tenantry_api::config::DatabaseArgs {
        data_dir: target.clone(),
        database_url: Some(target_url.to_owned().into()),
        master_key_file: Some(master),
        token_signing_key_file: None,
        argon2_memory_kib: 19456,
        argon2_iterations: 2,
        argon2_parallelism: 1,
    };
    let identities = tenantry_backup::Identities::load(&keys.join("backup.key")).unwrap();
    reset_peak_rss();
    let start_mib = rss_mib();
    let start = Instant::now();
    let restored = tenantry_api::backup::restore(&db, &report.path, identities, &SystemClock)
        .await
        .unwrap();
    let restore = Phase {
        name: "restore",
        secs: start.elapsed().as_secs_f64(),
        start_mib,
        peak_mib: peak_rss_mib(),
    };
    assert_eq!(restored.audit_rows, report.audit_head.sequence as u64);

    println!(
        "{label}: {rows} rows, database {:.1} MB, dump {:.1} MB, backup file {:.1} MB",
        mb(size),
        mb(report.dump_bytes),
        mb(report.file_bytes)
    );
    for phase in [read, backup, restore] {
        println!(
            "  {:<8} {:>7.2} s  {:>7.1} MB/s ({:.3} of the copy)  {:>9.0} rows/s  peak RSS {:>6.1} MiB (+{:.1} MiB over the phase's start)",
            phase.name,
            phase.secs,
            mb(size) / phase.secs,
            mb(size) / phase.secs / copy_mb_s,
            rows as f64 / phase.secs,
            phase.peak_mib,
            phase.peak_mib - phase.start_mib
        );
    }
}

/// Reads every row of the backed-up tables in one read transaction, decoding each value as
/// the dump does, and keeps nothing.
async fn read_every_row(url: &str) {
    use futures::TryStreamExt as _;
    use sqlx::{Connection as _, Row as _};
    use tenantry_api::store::backup::{ColumnType, TABLES};
    let (mut conn, _) = tenantry_api::store::backup::connect(url, false)
        .await
        .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let mut values = 0u64;
    for table in TABLES {
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(table.select_all())).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await.unwrap() {
            for (i, (_, ty)) in table.columns.iter().enumerate() {
                let present = match ty {
                    ColumnType::Text => row.try_get::<Option<String>, _>(i).unwrap().is_some(),
                    ColumnType::Int => row.try_get::<Option<i64>, _>(i).unwrap().is_some(),
                };
                values += u64::from(present);
            }
        }
    }
    tx.rollback().await.unwrap();
    assert!(values > 0);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(300_000);
    let users = 20_000;
    let tmp = tempfile::tempdir().unwrap();
    let master = tmp.path().join("master.key");
    let (_, text) = tenantry_api::crypto::MasterKey::generate().unwrap();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&master)
            .unwrap()
            .write_all(secrecy::ExposeSecret::expose_secret(&text).as_bytes())
            .unwrap();
    }
    let db_path = tmp.path().join("tenantry.db");
    let url = format!("sqlite://{}", db_path.display());
    let total = populate(&url, users, rows).await;
    // Checkpointed: the file holds everything.
    let (mut conn, _) = tenantry_api::store::backup::connect(&url, false)
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let size = std::fs::metadata(&db_path).unwrap().len();

    reset_peak_rss();
    let start = Instant::now();
    std::fs::copy(&db_path, tmp.path().join("copy.db")).unwrap();
    let _ = std::fs::File::open(tmp.path().join("copy.db")).map(|f| f.sync_all());
    let copy_secs = start.elapsed().as_secs_f64();
    println!(
        "copy of the SQLite file: {:.1} MB in {copy_secs:.3} s = {:.1} MB/s, {:.0} rows/s, peak RSS {:.1} MiB",
        mb(size),
        mb(size) / copy_secs,
        total as f64 / copy_secs,
        peak_rss_mib()
    );

    let sqlite_dir = tmp.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).unwrap();
    std::fs::copy(&master, sqlite_dir.join("master.key")).unwrap();
    let target = format!(
        "sqlite://{}",
        sqlite_dir.join("restored/tenantry.db").display()
    );
    let start = Instant::now();
    let copy_mb_s = mb(size) / copy_secs;
    let figures = (size, total, copy_mb_s);
    run("SQLite → SQLite", &url, &target, &sqlite_dir, figures).await;
    let both = start.elapsed().as_secs_f64();
    println!("  (backup + restore together {both:.2} s; the goal is 0.3 of the copy)");

    if let Some(mut schemas) = pg::Schemas::connect().await {
        let target = schemas.fresh("bench").await;
        let pg_dir = tmp.path().join("pg");
        std::fs::create_dir_all(&pg_dir).unwrap();
        std::fs::copy(&master, pg_dir.join("master.key")).unwrap();
        // SQLite → PostgreSQL (the migration path), then PostgreSQL → PostgreSQL.
        run("SQLite → PostgreSQL", &url, &target, &pg_dir, figures).await;
        let target2 = schemas.fresh("bench_b").await;
        let pg2_dir = tmp.path().join("pg2");
        std::fs::create_dir_all(&pg2_dir).unwrap();
        std::fs::copy(&master, pg2_dir.join("master.key")).unwrap();
        run(
            "PostgreSQL → PostgreSQL",
            &target,
            &target2,
            &pg2_dir,
            figures,
        )
        .await;
        schemas.drop_all().await;
    }
}
