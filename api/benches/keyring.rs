//! Re-seal rate of a master key rotation: `cargo bench -p tenantry-api --bench keyring`
//! (`-- --users N`, default 20000; `TENANTRY_BENCH_DATABASE_URL=postgres://…` adds
//! PostgreSQL, in a schema of its own).
//!
//! Fills a database with N users, each with a TOTP secret sealed by the old key, then runs
//! `keyring::rotate` (batches of 500) and prints secrets re-sealed per second, beside the
//! rate of the cryptography alone (open + seal in memory) measured in the same run: their
//! ratio is the share of a rotation's time that is the database's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret as _;
use tenantry_api::clock::SystemClock;
use tenantry_api::crypto::{MasterKey, MasterKeyRing};
use tenantry_api::keyring::{RotateOptions, rotate};
use tenantry_api::store::Store;

#[path = "common/pg.rs"]
mod pg;

fn write_key(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

async fn run(label: &str, url: &str, dir: &Path, users: usize) {
    let (old, old_text) = MasterKey::generate().unwrap();
    let key_file = dir.join("master.key");
    write_key(&key_file, &format!("{}\n", old_text.expose_secret()));
    let store = Store::connect(url, 4).await.unwrap();
    store.init_master_key_primary(old.id(), 0).await.unwrap();
    for chunk in (0..users).collect::<Vec<_>>().chunks(2000) {
        let mut sql = String::from("BEGIN;");
        for &i in chunk {
            let id = format!("u-{i:08}");
            let sealed = old.seal(&format!("totp:{id}"), &[i as u8; 20]).unwrap();
            sql.push_str(&format!(
                "INSERT INTO users (id, email, password_hash, created_at_ms, email_verified_at_ms, totp_secret_sealed) \
                 VALUES ('{id}', 'user{i}@bench.test', 'x', {i}, {i}, '{sealed}');"
            ));
        }
        sql.push_str("COMMIT;");
        store.execute_raw_for_tests(&sql).await.unwrap();
    }

    // The cryptography alone: open with the ring, seal with the new key.
    let (_, new_text) = MasterKey::generate().unwrap();
    let ring = MasterKeyRing::parse(
        &format!(
            "{}\n{}\n",
            old_text.expose_secret(),
            new_text.expose_secret()
        )
        .into(),
    )
    .unwrap();
    let samples: Vec<(String, String)> = (0..users.min(20_000))
        .map(|i| {
            let id = format!("u-{i:08}");
            let ctx = format!("totp:{id}");
            let sealed = old.seal(&ctx, &[i as u8; 20]).unwrap();
            (ctx, sealed)
        })
        .collect();
    let start = Instant::now();
    for (ctx, sealed) in &samples {
        let plain = ring.open(ctx, sealed).unwrap();
        std::hint::black_box(ring.seal(ctx, plain.expose_secret()).unwrap());
    }
    let crypto_rate = samples.len() as f64 / start.elapsed().as_secs_f64();

    let new_file = dir.join("next.key");
    write_key(&new_file, &format!("{}\n", new_text.expose_secret()));
    let start = Instant::now();
    let report = rotate(
        &store,
        &key_file,
        &new_file,
        &RotateOptions {
            batch_size: 500,
            wait: Duration::from_secs(5),
            poll: Duration::from_millis(100),
        },
        &SystemClock,
    )
    .await
    .unwrap();
    let total = start.elapsed().as_secs_f64();
    let resealed: u64 = report.resealed.values().sum();
    assert_eq!(resealed, users as u64);
    let rate = resealed as f64 / (report.reseal_ms as f64 / 1000.0);
    println!(
        "{label:<11} re-sealed {resealed} secrets in {:.2} s ({rate:.0}/s; whole rotation {total:.2} s); \
         crypto alone {crypto_rate:.0}/s; re-seal ÷ crypto {:.3}",
        report.reseal_ms as f64 / 1000.0,
        rate / crypto_rate
    );
    store.close().await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let users = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000usize);
    let tmp = tempfile::tempdir().unwrap();
    let sqlite_dir = tmp.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).unwrap();
    let url = format!("sqlite://{}/tenantry.db", sqlite_dir.display());
    run("SQLite", &url, &sqlite_dir, users).await;
    if let Some(mut schemas) = pg::Schemas::connect().await {
        let target = schemas.fresh("bench_keyring").await;
        let pg_dir = tmp.path().join("pg");
        std::fs::create_dir_all(&pg_dir).unwrap();
        run("PostgreSQL", &target, &pg_dir, users).await;
        schemas.drop_all().await;
    }
}
