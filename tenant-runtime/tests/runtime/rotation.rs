//! Key-encryption key rotation: live (the data key file replaced while clients write and
//! read executions and credentials over HTTPS) with no failed request, every record
//! readable throughout and after, the old wrappings gone from the key store's file, and a
//! restart needing only the new key; and offline, through the real `tenant-runtime
//! rotate-data-key` binary, crash-safe and idempotent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use sqlx::Connection as _;
use sqlx::Row as _;
use tenant_runtime::crypto::{DataKey, Purpose, unwrap_key};
use tenant_runtime::keystore::{KEYS_FILE, Keyring};
use tenant_runtime::store::Store;
use tenantry_test_support::eventually;

use crate::common::{
    Instance, POLL, contains, json_output, metric, open_read_only, runtime, write_atomically,
};

/// Every key-store entry: id, purpose, KEK id, wrapped bytes.
async fn entries(data: &std::path::Path) -> Vec<(u32, Purpose, String, Vec<u8>)> {
    let mut conn = open_read_only(&data.join(KEYS_FILE)).await;
    let rows = sqlx::query("SELECT id, purpose, kek_id, wrapped FROM data_keys ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|r| {
            (
                u32::try_from(r.get::<i64, _>(0)).unwrap(),
                Purpose::parse(r.get(1)).unwrap(),
                r.get(2),
                r.get(3),
            )
        })
        .collect()
}

fn raw_key_store(data: &std::path::Path) -> Vec<u8> {
    let mut raw = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        raw.extend(std::fs::read(data.join(format!("{KEYS_FILE}{suffix}"))).unwrap_or_default());
    }
    raw
}

fn new_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).unwrap();
    k
}

fn execution(client: usize, n: u64, day: u64) -> serde_json::Value {
    json!({
        "workflow_id": format!("wf-{client}"), "status": "success",
        // Spread over three days, so several period keys are in use.
        "started_at": format!("2026-11-{:02}T10:00:00Z", 27 + day),
        "finished_at": format!("2026-11-{:02}T10:00:01Z", 27 + day),
        "data": {"client": client, "n": n},
    })
}

/// Writes and reads back executions (and now and then a credential) until `stop`; returns
/// the execution ids, credential ids and the failed requests.
async fn client(
    app: &Instance,
    id: usize,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
) -> (Vec<(String, serde_json::Value)>, Vec<String>) {
    let (mut executions, mut credentials) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let body = execution(id, n, n % 3);
        let r = app.call("POST", "/v1/executions", Some(body.clone())).await;
        if r.status != 201 {
            failures.fetch_add(1, Ordering::SeqCst);
            eprintln!("POST execution: {} {}", r.status, r.text);
        } else {
            let eid = r.json["id"].as_str().unwrap().to_owned();
            let got = app
                .call("GET", &format!("/v1/executions/{eid}"), None)
                .await;
            if got.status != 200 || got.json["data"] != body["data"] {
                failures.fetch_add(1, Ordering::SeqCst);
                eprintln!("GET execution: {} {}", got.status, got.text);
            }
            executions.push((eid, body["data"].clone()));
        }
        if n.is_multiple_of(5) {
            let r = app
                .call(
                    "POST",
                    "/v1/credentials",
                    Some(json!({"name": format!("c-{id}-{n}"), "kind": "api_key",
                                "secret": {"key": format!("secret-{id}-{n}")}})),
                )
                .await;
            if r.status == 201 {
                credentials.push(r.json["id"].as_str().unwrap().to_owned());
            } else {
                failures.fetch_add(1, Ordering::SeqCst);
                eprintln!("POST credential: {} {}", r.status, r.text);
            }
        }
        n += 1;
    }
    (executions, credentials)
}

async fn kek_metrics(app: &Instance) -> String {
    app.call_as("GET", "/metrics", None, None).await.text
}

#[tokio::test]
async fn a_live_kek_rotation_under_traffic_fails_no_request_and_retires_the_old_key() {
    let app = Instance::start().await;
    let data = app.data_dir();
    let old = std::fs::read(app.root().join("keys/data.key")).unwrap();
    let old_key = DataKey::from_bytes(&old).unwrap();
    let exposition = kek_metrics(&app).await;
    assert_eq!(
        metric(
            &exposition,
            &[&format!(
                "tenant_runtime_kek_info{{kek_id=\"{}\"}}",
                old_key.kek_id()
            )]
        ),
        1.0,
        "{exposition}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let new = new_key();
    let new_key_id = DataKey::from_bytes(&new).unwrap().kek_id();
    let rotate = async {
        // Traffic first, so keys exist and requests are in flight during the rotation.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = entries(&data).await;
        assert!(before.len() >= 4, "three day keys and the credential key");
        assert!(before.iter().all(|e| e.2 == old_key.kek_id().0));
        write_atomically(&app.root().join("keys/data.key"), &new);
        let done = eventually(Duration::from_secs(10), POLL, || async {
            let m = kek_metrics(&app).await;
            metric(&m, &[&format!("kek_info{{kek_id=\"{new_key_id}\"}}")]) == 1.0
                && metric(&m, &["data_keys_wrapped_by_other_kek "]) == 0.0
        })
        .await;
        assert!(done, "rotation not reported: {}", kek_metrics(&app).await);
        // More traffic under the new key.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        before
    };
    let (before, a, b, c) = tokio::join!(
        rotate,
        client(&app, 1, stop.clone(), failures.clone()),
        client(&app, 2, stop.clone(), failures.clone()),
        client(&app, 3, stop.clone(), failures.clone()),
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "failed requests");
    let executions: Vec<_> = [&a, &b, &c].iter().flat_map(|x| x.0.clone()).collect();
    let credentials: Vec<_> = [&a, &b, &c].iter().flat_map(|x| x.1.clone()).collect();
    assert!(executions.len() >= 30, "{} executions", executions.len());
    let exposition = kek_metrics(&app).await;
    assert_eq!(
        metric(&exposition, &["tenant_runtime_kek_rotations_total"]),
        1.0
    );
    assert_eq!(
        metric(
            &exposition,
            &[&format!("kek_info{{kek_id=\"{}\"}}", old_key.kek_id())]
        ),
        0.0,
        "{exposition}"
    );

    // Every entry is under the new KEK; the old one unwraps none of them, and no old
    // wrapping is left in the file.
    let after = entries(&data).await;
    assert!(after.len() >= before.len());
    let raw = raw_key_store(&data);
    for (id, purpose, kek_id, wrapped) in &after {
        assert_eq!(kek_id, &new_key_id.0);
        assert!(unwrap_key(&old_key, "acme", *id, *purpose, wrapped).is_err());
        let new_key = DataKey::from_bytes(&new).unwrap();
        assert!(unwrap_key(&new_key, "acme", *id, *purpose, wrapped).is_ok());
        assert!(contains(&raw, wrapped), "the scan sees live entries");
    }
    for (_, _, _, wrapped) in &before {
        assert!(
            !contains(&raw, wrapped),
            "an old wrapping is left in keys.db"
        );
    }

    // A restart with only the new key (no previous key configured) reads everything.
    let app = app.restart().await;
    for (id, data) in &executions {
        let r = app.call("GET", &format!("/v1/executions/{id}"), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(&r.json["data"], data);
    }
    let dir = app.stop_keep_dir().await;
    let config = tenant_runtime::config::load(&dir.path().join("runtime.yaml")).unwrap();
    assert!(config.previous_data_key_file.is_none());
    let store = Store::open(
        &config.data_dir,
        Keyring::from_config(&config).await.unwrap(),
    )
    .await
    .unwrap();
    for id in &credentials {
        assert!(store.credential_secret(id).await.unwrap().is_some());
    }
    store.close().await;
    store.keys().close().await;
}

async fn rotate(
    config: &std::path::Path,
    old: &std::path::Path,
    new: &std::path::Path,
) -> serde_json::Value {
    let mut cmd = runtime();
    cmd.arg("rotate-data-key")
        .arg("--config")
        .arg(config)
        .arg("--old")
        .arg(old)
        .arg("--new")
        .arg(new)
        .arg("--json");
    json_output(&mut cmd, "rotate-data-key").await
}

#[tokio::test]
async fn rotate_data_key_rewraps_a_stopped_instance_once_and_the_new_key_alone_serves_it() {
    let app = Instance::start().await;
    let mut ids = Vec::new();
    for day in 0..3 {
        let r = app
            .call("POST", "/v1/executions", Some(execution(0, day, day)))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        ids.push(r.json["id"].as_str().unwrap().to_owned());
    }
    let dir = app.stop_keep_dir().await;
    let root = dir.path();
    let config = root.join("runtime.yaml");
    let old = root.join("keys/data.key");
    let new = root.join("keys/data.key.new");
    std::fs::write(&new, new_key()).unwrap();
    let new_id = DataKey::from_file(&new).unwrap().kek_id().0;

    let report = rotate(&config, &old, &new).await;
    assert_eq!(report["kek_id"], new_id.as_str());
    assert_eq!(report["rewrapped"], 4, "{report}");
    assert_eq!(report["data_keys"], 4, "{report}");
    // Idempotent: a second run (as after a crash) has nothing left to do.
    let again = rotate(&config, &old, &new).await;
    assert_eq!(again["rewrapped"], 0, "{again}");
    for (_, _, kek_id, _) in entries(&root.join("data")).await {
        assert_eq!(kek_id, new_id);
    }

    // The old key alone no longer opens the instance, and says which key it needs.
    let run_config = tenant_runtime::RunConfig::load(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tenant_runtime::run(run_config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&new_id), "{err}");

    // The new key as the data key file: everything reads back.
    std::fs::rename(&new, &old).unwrap();
    let config = tenant_runtime::config::load(&config).unwrap();
    let store = Store::open(
        &config.data_dir,
        Keyring::from_config(&config).await.unwrap(),
    )
    .await
    .unwrap();
    for id in &ids {
        assert!(store.get_execution(id).await.unwrap().is_some());
    }
    store.close().await;
    store.keys().close().await;
}
