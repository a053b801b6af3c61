//! Backup and restore of an instance's store against copying its file, side by side in one
//! run (`cargo bench -p tenant-runtime --bench backup`): a store of
//! `TENANTRY_BENCH_BACKUP_ROWS` (default 100000) sealed executions of about 1 KiB, then
//! the copy of the database file (with fsync), `tenant-runtime backup` (online
//! `VACUUM INTO`, LZ4, age) and `tenant-runtime restore` (decrypt, integrity check, every
//! record opened with the tenant key). Prints MB/s of the database file, rows/s, each
//! one's ratio to the copy (goal ≥ 0.3) and the RSS each phase added.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use jiff::Timestamp;
use tenant_runtime::keystore::Keyring;
use tenant_runtime::store::{DB_FILE, NewExecution, Store};
use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::runtime_config::{OAuth2Config, RuntimeConfig, TlsFiles};

const TENANT: &str = "bench";

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn config(root: &std::path::Path, data: &str) -> RuntimeConfig {
    RuntimeConfig {
        tenant_id: TENANT.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: TlsFiles {
            cert_file: root.join("tls.crt"),
            key_file: root.join("tls.key"),
        },
        data_dir: root.join(data),
        data_key_file: root.join("data.key"),
        previous_data_key_file: None,
        data_key_period: None,
        token_public_key_file: root.join("token.pub"),
        retention: RetentionPolicy::default(),
        oauth2: OAuth2Config::default(),
        backup: None,
    }
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("TENANTRY_BENCH_BACKUP_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(root.join("data.key"), [0x5a; 32]).unwrap();
    let keys = Keyring::from_config(&config(root, "data")).await.unwrap();
    let store = Store::open(&root.join("data"), keys).await.unwrap();
    let started: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
    for i in 0..rows {
        let data = serde_json::json!({
            "trigger": {"type": "webhook", "path": "/hooks/orders", "received": i},
            "nodes": (0..8).map(|n| serde_json::json!({
                "name": format!("node-{n}"), "status": "success", "ms": n * 7 + i % 13,
                "output": {"rows": n * 3, "note": "lorem ipsum dolor sit amet consectetur"},
            })).collect::<Vec<_>>(),
        });
        let new: NewExecution = serde_json::from_value(serde_json::json!({
            "workflow_id": format!("wf-{}", i % 50),
            "status": "success",
            "started_at": started.to_string(),
            "finished_at": started.to_string(),
            "data": data,
        }))
        .unwrap();
        store.insert_execution(&new).await.unwrap();
    }
    store.close().await;
    let db = root.join("data").join(DB_FILE);
    let size = std::fs::metadata(&db).unwrap().len() as f64;
    let mb = size / 1e6;

    reset_peak();
    let start = Instant::now();
    std::fs::copy(&db, root.join("copy.db")).unwrap();
    std::fs::File::open(root.join("copy.db"))
        .unwrap()
        .sync_all()
        .unwrap();
    let copy = start.elapsed().as_secs_f64();
    println!(
        "store: {rows} executions, {mb:.1} MB; copy of the file: {copy:.3} s = {:.1} MB/s",
        mb / copy
    );

    let keys = root.join("keys");
    tenantry_backup::keys::generate(&keys.join("backup.key"), &keys.join("backup.pub")).unwrap();
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let recipients = tenantry_backup::Recipients::load(&[keys.join("backup.pub")]).unwrap();
    reset_peak();
    let rss = status_mib("VmRSS:");
    let start = Instant::now();
    let report = tenant_runtime::backup::backup(&config(root, "data"), &out, recipients, 0)
        .await
        .unwrap();
    let backup = start.elapsed().as_secs_f64();
    let backup_rss = status_mib("VmHWM:") - rss;

    let identities = tenantry_backup::Identities::load(&keys.join("backup.key")).unwrap();
    reset_peak();
    let rss = status_mib("VmRSS:");
    let start = Instant::now();
    let restored =
        tenant_runtime::backup::restore(&config(root, "restored"), &report.path, identities)
            .await
            .unwrap();
    let restore = start.elapsed().as_secs_f64();
    let restore_rss = status_mib("VmHWM:") - rss;
    assert_eq!(restored.executions, rows as i64);

    println!(
        "backup file {:.1} MB (LZ4 + age)",
        report.file_bytes as f64 / 1e6
    );
    for (name, secs, added) in [
        ("backup", backup, backup_rss),
        ("restore", restore, restore_rss),
    ] {
        println!(
            "  {name:<8} {secs:>7.3} s  {:>7.1} MB/s ({:.2} of the copy)  {:>9.0} rows/s  RSS +{added:.1} MiB",
            mb / secs,
            copy / secs,
            rows as f64 / secs
        );
    }
}
