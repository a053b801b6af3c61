//! Encryption at rest, seen from outside: the database file, its WAL and shared-memory
//! files never contain a payload or a secret in the clear, while the fields stored in
//! the clear are there (so the scan would find plaintext if it were written); deleted
//! rows are overwritten (`secure_delete`); only the data directory is written.

use std::time::Duration;

use serde_json::json;

use crate::common::{self, Instance, contains, read_tree};

#[tokio::test]
async fn database_and_wal_hold_no_plaintext_payload_or_secret() {
    let app = Instance::start().await;
    let payload_marker = "PAYLOAD-MARKER-7f3a9c";
    let secret_marker = "SECRET-MARKER-c41d0e";
    let deleted_marker = "wf-deleted-marker-55aa";
    for i in 0..20 {
        let r = app
            .call(
                "POST",
                "/v1/executions",
                Some(json!({
                    "workflow_id": "wf-visible-marker", "status": "success",
                    "started_at": "2026-01-01T00:00:00Z",
                    "data": {"customer_email": format!("{payload_marker}-{i}@example.com")},
                })),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let r = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": "crm", "kind": "api_key", "secret": {"client_secret": secret_marker}})),
        )
        .await;
    assert_eq!(r.status, 201);
    let doomed = app
        .call(
            "POST",
            "/v1/executions",
            Some(json!({"workflow_id": deleted_marker, "status": "error", "started_at": "2026-01-01T00:00:00Z", "data": 1})),
        )
        .await;
    let doomed_id = doomed.json["id"].as_str().unwrap().to_owned();

    // While running: the WAL holds the recent writes.
    let files = read_tree(&app.data_dir());
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("-wal")), "{names:?}");
    let all: Vec<u8> = files.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(
        contains(&all, b"wf-visible-marker"),
        "the scan must see clear-text columns"
    );
    assert!(
        !contains(&all, payload_marker.as_bytes()),
        "payload in the clear"
    );
    assert!(
        !contains(&all, secret_marker.as_bytes()),
        "secret in the clear"
    );

    assert_eq!(
        app.call("DELETE", &format!("/v1/executions/{doomed_id}"), None)
            .await
            .status,
        204
    );
    let data_dir = app.data_dir();
    let _dir = app.stop_keep_dir().await;

    // After shutdown (WAL checkpointed): still nothing, and the deleted row is gone
    // from the bytes too.
    let all: Vec<u8> = read_tree(&data_dir)
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    assert!(contains(&all, b"wf-visible-marker"));
    assert!(!contains(&all, payload_marker.as_bytes()));
    assert!(!contains(&all, secret_marker.as_bytes()));
    assert!(
        !contains(&all, deleted_marker.as_bytes()),
        "deleted row not overwritten"
    );
}

#[tokio::test]
async fn only_the_data_directory_is_written() {
    let app = Instance::start().await;
    let outside = |app: &Instance| {
        read_tree(app.root())
            .into_iter()
            .filter(|(p, _)| !p.starts_with(app.data_dir()))
            .collect::<Vec<_>>()
    };
    let before = outside(&app);
    let r = app
        .call(
            "POST",
            "/v1/executions",
            Some(
                json!({"workflow_id": "wf", "status": "ok", "started_at": "2026-01-01T00:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(r.status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outside(&app), before);
    let data_dir = app.data_dir();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let _dir = app.stop_keep_dir().await;
    let mut names: Vec<String> = read_tree(&data_dir)
        .into_iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.retain(|n| !n.ends_with("-wal") && !n.ends_with("-shm"));
    assert_eq!(names, vec!["keys.db", "runtime.db"]);
}

#[tokio::test]
async fn a_data_key_of_the_wrong_size_stops_startup_with_a_clear_error() {
    let prepared = common::prepare(&common::Options::default());
    let key_path = prepared.dir.path().join("keys/data.key");
    for bad in [&b"too short"[..], &[7u8; 33][..], &[][..]] {
        std::fs::write(&key_path, bad).unwrap();
        let run_config = tenant_runtime::RunConfig::load(&prepared.config_path).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = tenant_runtime::run(run_config, listener, std::future::pending())
            .await
            .unwrap_err();
        let expected = format!("must hold exactly 32 raw bytes, found {}", bad.len());
        assert!(err.to_string().contains(&expected), "{err}");
    }
    // Nothing was created before the key was checked.
    assert!(!prepared.dir.path().join("data").exists());
}
