//! Backups of the instance's store through the real `tenant-runtime backup` and `restore`
//! binary: taken while requests write, restored into a new data directory, opened only with
//! the tenant's own key; the scheduled backups of the config's `backup` section.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tenant_runtime::keystore::Keyring;
use tenant_runtime::store::Store;

use crate::common::*;

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        tenantry_backup::keys::generate(
            &dir.path().join("backup.key"),
            &dir.path().join("backup.pub"),
        )
        .unwrap();
        Keys { dir }
    }
    fn identity(&self) -> PathBuf {
        self.dir.path().join("backup.key")
    }
    fn recipient(&self) -> PathBuf {
        self.dir.path().join("backup.pub")
    }
}

/// A config for `tenant` whose data directory is `root/data`, with the TLS and token files
/// of the instance in `files` (a restore does not read them) and the data key at `data_key`.
fn config_beside(files: &Path, root: &Path, tenant: &str, data_key: &Path) -> PathBuf {
    let path = root.join("runtime.yaml");
    let yaml = format!(
        "tenant_id: {tenant}\nlisten: 127.0.0.1:0\n\
         tls: {{cert_file: {tls}/tls.crt, key_file: {tls}/tls.key}}\n\
         data_dir: data\ndata_key_file: {key}\ntoken_public_key_file: {token}\n\
         retention: {{max_age_hours: 720, max_count: 1000000}}\n",
        tls = files.join("tls").display(),
        key = data_key.display(),
        token = files.join("keys/token.pub").display(),
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

async fn backup(config: &Path, keys: &Keys, out: &Path) -> serde_json::Value {
    let mut cmd = runtime();
    cmd.arg("backup")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .arg("--recipient-file")
        .arg(keys.recipient())
        .arg("--json");
    json_output(&mut cmd, "backup").await
}

async fn restore(config: &Path, identity: &Path, file: &Path) -> std::process::Output {
    runtime()
        .arg("restore")
        .arg("--config")
        .arg(config)
        .arg("--in")
        .arg(file)
        .arg("--identity-file")
        .arg(identity)
        .arg("--json")
        .output()
        .await
        .unwrap()
}

/// The restore failed with `expected` in its message and left nothing in `root/data`.
fn refused(out: &std::process::Output, expected: &str, root: &Path) {
    assert!(!out.status.success(), "restore succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(root.join("data"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a refused restore left {left:?}");
}

fn execution(i: usize) -> serde_json::Value {
    json!({
        "workflow_id": format!("wf-{i}"),
        "status": "success",
        "started_at": "2026-11-29T10:00:00Z",
        "finished_at": "2026-11-29T10:00:01Z",
        "data": {"note": format!("payload-secret-{i}")},
    })
}

#[tokio::test]
async fn a_backup_taken_while_writing_restores_and_opens_only_with_the_tenant_key() {
    let app = Instance::start().await;
    for i in 0..100 {
        let r = app.call("POST", "/v1/executions", Some(execution(i))).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    for i in 0..3 {
        let r = app
            .call(
                "POST",
                "/v1/credentials",
                Some(json!({"name": format!("c{i}"), "kind": "api_key", "secret": {"key": format!("cred-secret-{i}")}})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // Tenants can neither take nor fetch a backup over HTTP.
    for method in ["GET", "POST"] {
        let r = app.call(method, "/v1/backup", None).await;
        assert_eq!(r.status, 404, "{method} /v1/backup: {}", r.text);
    }
    let keys = Keys::new();
    let backups = tempfile::tempdir().unwrap();
    // Requests keep writing while the backup runs.
    let writer = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let app_ref = &app;
        let stop2 = stop.clone();
        let writes = async move {
            let mut n = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let r = app_ref
                    .call("POST", "/v1/executions", Some(execution(1000 + n)))
                    .await;
                assert_eq!(r.status, 201);
                n += 1;
            }
            n
        };
        let backup = async {
            let report = backup(&app.config_path, &keys, backups.path()).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            report
        };
        tokio::join!(writes, backup)
    };
    let (writes, report) = writer;
    assert!(writes > 0);
    let file = PathBuf::from(report["path"].as_str().unwrap());
    let in_backup = report["executions"].as_i64().unwrap();
    assert!(in_backup >= 100, "{report}");
    assert_eq!(report["credentials"], 3);
    // The status file names it.
    let status = tenant_runtime::backup::last_backup(backups.path()).unwrap();
    assert_eq!(status.path, file);

    // Nothing readable: payloads and secrets are sealed twice over.
    let raw = std::fs::read(&file).unwrap();
    for needle in ["payload-secret", "cred-secret", "wf-1"] {
        assert!(!contains(&raw, needle.as_bytes()), "{needle} is readable");
    }

    // The backup carries no execution key: restored into a data directory without the
    // instance's key store, it is refused, and nothing is left.
    let app_dir = app.stop_keep_dir().await;
    let files = app_dir.path();
    let data_key = files.join("keys/data.key");
    let target = tempfile::tempdir().unwrap();
    let config = config_beside(files, target.path(), "acme", &data_key);
    let out = restore(&config, &keys.identity(), &file).await;
    refused(&out, "which the instance's key store", target.path());

    // With the instance's key store (runtime.db moved away, keys.db kept) and the
    // tenant's key, every row reads back.
    std::fs::create_dir_all(target.path().join("data")).unwrap();
    std::fs::copy(
        files.join("data/keys.db"),
        target.path().join("data/keys.db"),
    )
    .unwrap();
    let out = restore(&config, &keys.identity(), &file).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(restored["executions"].as_i64(), Some(in_backup));
    assert_eq!(restored["credentials"], 3);
    assert_eq!(restored["records_checked"].as_i64(), Some(in_backup + 3));
    assert_eq!(restored["expired_executions_dropped"], 0);
    let keyring = Keyring::from_config(&tenant_runtime::config::load(&config).unwrap())
        .await
        .unwrap();
    let store = Store::open(&target.path().join("data"), keyring)
        .await
        .unwrap();
    assert_eq!(store.count_executions().await.unwrap(), in_backup);
    store.close().await;

    // Another key, another tenant, a database in the way, another identity, a cut file:
    // each refused, nothing written.
    let elsewhere = tempfile::tempdir().unwrap();
    let other_key = elsewhere.path().join("other.key");
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    std::fs::write(&other_key, bytes).unwrap();
    let config = config_beside(files, elsewhere.path(), "acme", &other_key);
    let out = restore(&config, &keys.identity(), &file).await;
    refused(&out, "the data key does not open", elsewhere.path());

    let config = config_beside(files, elsewhere.path(), "globex", &data_key);
    let out = restore(&config, &keys.identity(), &file).await;
    refused(
        &out,
        "is a backup of tenant acme, not of globex",
        elsewhere.path(),
    );

    let config = config_beside(files, elsewhere.path(), "acme", &data_key);
    let other = Keys::new();
    let out = restore(&config, &other.identity(), &file).await;
    refused(&out, "none of the given identities", elsewhere.path());

    let cut = elsewhere.path().join("cut.tbk");
    std::fs::write(&cut, &raw[..raw.len() - 64]).unwrap();
    let out = restore(&config, &keys.identity(), &cut).await;
    refused(&out, "is damaged or was changed", elsewhere.path());

    let config = config_beside(files, target.path(), "acme", &data_key);
    let out = restore(&config, &keys.identity(), &file).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds a database"));
}

#[tokio::test]
async fn the_backup_section_takes_backups_on_schedule_and_keeps_the_newest() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(keys.recipient(), dir.path().join("backup.pub")).unwrap();
    let app = Instance::start_with(Options {
        extra_config: format!(
            "backup: {{directory: {}, interval: 1m, keep: 2, recipient_file: {}}}\n",
            dir.path().join("backups").display(),
            dir.path().join("backup.pub").display()
        ),
        backup_interval: Some(Duration::from_millis(300)),
        ..Options::default()
    })
    .await;
    app.call("POST", "/v1/executions", Some(execution(1))).await;
    let backups = dir.path().join("backups");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        if let Some(last) = tenant_runtime::backup::last_backup(&backups) {
            seen.insert(last.path);
        }
        if seen.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.len() >= 4, "backups taken: {seen:?}");
    let metrics = app.call_as("GET", "/metrics", None, None).await;
    assert!(metric(&metrics.text, &["tenant_runtime_backups_total"]) >= 4.0);
    assert!(
        metric(
            &metrics.text,
            &["tenant_runtime_last_backup_timestamp_seconds"]
        ) > 1.7e9
    );
    app.stop().await.unwrap();
    let kept = tenantry_backup::list(&backups).unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    // Each opens with the identity and holds the instance's store.
    let identities = tenantry_backup::Identities::load(&keys.identity()).unwrap();
    let mut reader = tenantry_backup::Reader::open(&kept[1].path, &identities).unwrap();
    assert_eq!(reader.header().label.tenant_id.as_deref(), Some("acme"));
    while reader.next_record().unwrap().is_some() {}
}
