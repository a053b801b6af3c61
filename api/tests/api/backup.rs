//! Backups of the control database through the real `tenantry-api backup` and `restore`
//! binaries: round trips on the suite's backend and across backends, backups under
//! concurrent writes, and every way a restore is refused without writing anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tenantry_api::clock::ManualClock;
use tenantry_proto::v1::*;

use crate::common::*;

fn api() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry-api"));
    cmd.env_remove("TENANTRY_DATABASE_URL")
        .env_remove("TENANTRY_MASTER_KEY_FILE")
        .env("TENANTRY_LOG", "warn");
    cmd
}

struct Keys {
    _dir: tempfile::TempDir,
    identity: PathBuf,
    recipient: PathBuf,
}

async fn keygen() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let out = api()
        .args(["backup-keygen", "--out-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Keys {
        identity: dir.path().join("backup.key"),
        recipient: dir.path().join("backup.pub"),
        _dir: dir,
    }
}

/// Runs `backup` of `db` into `out_dir`; returns the report.
async fn backup(db: &Database, keys: &Keys, out_dir: &Path) -> serde_json::Value {
    let out = api()
        .arg("backup")
        .args(["--database-url", &db.url, "--data-dir"])
        .arg(db.dir.path())
        .arg("--out")
        .arg(out_dir)
        .arg("--recipient-file")
        .arg(&keys.recipient)
        .arg("--json")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `restore` of `file` into `db` with the master key at `master_key`.
async fn restore(
    db: &Database,
    master_key: &Path,
    identity: &Path,
    file: &Path,
) -> std::process::Output {
    api()
        .arg("restore")
        .args(["--database-url", &db.url, "--data-dir"])
        .arg(db.dir.path())
        .arg("--master-key-file")
        .arg(master_key)
        .arg("--identity-file")
        .arg(identity)
        .arg("--in")
        .arg(file)
        .arg("--json")
        .output()
        .await
        .unwrap()
}

fn copy_master_key(from: &Database, to: &Database) -> PathBuf {
    let target = to.dir.path().join("master.key");
    write_key_file(
        &target,
        &std::fs::read_to_string(from.dir.path().join("master.key")).unwrap(),
    );
    target
}

/// What a populated database holds, for comparison after a restore.
struct Population {
    users: Vec<(String, Option<String>)>,
    admin: (String, String),
    recovery_codes: Vec<String>,
    /// A user and one of their recovery codes, used after the restore.
    recovery: (String, String),
    session_tokens: Vec<String>,
    audit_rows: u64,
}

/// Signs up users (two with TOTP, one admin), fails some logins, and leaves sessions.
async fn populate(server: &TestServer) -> Population {
    let (_, admin_token, admin_secret) = server.admin_session("ops@backup.test").await;
    let mut users = Vec::new();
    let mut recovery_codes = Vec::new();
    let mut recovery = None;
    let mut session_tokens = vec![admin_token.clone()];
    for i in 0..4 {
        let email = format!("user{i}@backup.test");
        server.signup(&email, &format!("backup-{i}")).await;
        let token = server.login(&email).await;
        session_tokens.push(token.clone());
        let secret = if i % 2 == 0 {
            let (secret, codes) = server.enroll(&token).await;
            recovery.get_or_insert_with(|| (email.clone(), codes[0].clone()));
            recovery_codes.extend(codes);
            Some(secret)
        } else {
            None
        };
        users.push((email, secret));
        server.advance(Duration::from_secs(31));
    }
    // Failed logins are audited too.
    for _ in 0..3 {
        let _ = server
            .accounts()
            .login(LoginRequest {
                email: "user1@backup.test".into(),
                password: "not the password at all".into(),
            })
            .await;
    }
    server.step_up(&admin_token, &admin_secret).await;
    let verified = server
        .admin()
        .verify_audit_log(authed(VerifyAuditLogRequest {}, &admin_token))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok);
    Population {
        users,
        admin: ("ops@backup.test".into(), admin_secret),
        recovery_codes,
        recovery: recovery.unwrap(),
        session_tokens,
        audit_rows: verified.checked,
    }
}

/// Logs every user in on `server` (a restored database), with TOTP where enrolled, and
/// checks the audit chain as an admin; returns the rows it verified and the admin's token.
async fn check_restored(server: &TestServer, population: &Population) -> (u64, String) {
    for (email, secret) in &population.users {
        let token = server.login(email).await;
        if let Some(secret) = secret {
            server.step_up(&token, secret).await;
        }
        let who = server
            .accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&who.email, email);
    }
    // A recovery code from before the backup works (once).
    let (email, code) = &population.recovery;
    let token = server.login(email).await;
    server
        .mfa()
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(verify_mfa_request::Factor::RecoveryCode(code.clone())),
            },
            &token,
        ))
        .await
        .unwrap();
    let (email, secret) = &population.admin;
    let token = server.login(email).await;
    server.step_up(&token, secret).await;
    let verified = server
        .admin()
        .verify_audit_log(authed(VerifyAuditLogRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    (verified.checked, token)
}

/// A server on a restored database, its clock past every TOTP step used before (they end
/// about 3 minutes after the start) and still within the idle timeout (30 minutes) of the
/// sessions made then, so a session that came back with the data would still work.
async fn start_restored(db: &Database) -> TestServer {
    TestServer::start_with(db, Options::default(), ManualClock::new(T0_MS + 600_000)).await
}

/// Whether the session of a user made before the backup answers `WhoAmI`.
async fn old_session_works(server: &TestServer, population: &Population) -> bool {
    server
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &population.session_tokens[1]))
        .await
        .is_ok()
}

fn table_rows(report: &serde_json::Value) -> Vec<(String, u64)> {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t[0].as_str().unwrap().to_owned(), t[1].as_u64().unwrap()))
        .collect()
}

async fn round_trip(source: Database, target: Database) {
    let keys = keygen().await;
    let backups = tempfile::tempdir().unwrap();
    let server = TestServer::start(&source).await;
    let population = populate(&server).await;
    let report = backup(&source, &keys, backups.path()).await;
    server.stop().await;
    let file = PathBuf::from(report["path"].as_str().unwrap());

    // Nothing secret is readable in the file.
    let raw = std::fs::read(&file).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let mut secrets: Vec<String> = vec![PASSWORD.into(), "ops@backup.test".into()];
    for (email, secret) in &population.users {
        secrets.push(email.clone());
        secrets.extend(secret.clone());
    }
    secrets.extend(population.recovery_codes.iter().cloned());
    secrets.extend(population.session_tokens.iter().cloned());
    for secret in &secrets {
        assert!(
            !raw.contains(secret.as_str()),
            "{secret} is readable in the backup"
        );
    }

    let master_key = copy_master_key(&source, &target);
    let out = restore(&target, &master_key, &keys.identity, &file).await;
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(table_rows(&restored), table_rows(&report));
    assert!(
        table_rows(&report)
            .iter()
            .any(|(t, n)| t == "users" && *n == 5)
    );
    assert_eq!(restored["audit_rows"], report["audit_head"]["sequence"]);

    let server = start_restored(&target).await;
    // Sessions are not restored (the same session still works on the source: see the
    // refusals test).
    assert!(!old_session_works(&server, &population).await);
    let (checked, admin_token) = check_restored(&server, &population).await;
    // The rows of the backup, the backup's own `backup.create` row is after the snapshot,
    // then `backup.restore`, then this check's logins.
    assert!(checked > population.audit_rows, "{checked} rows");
    let events = all_audit_events(&server, &admin_token).await;
    assert!(events.iter().any(|e| e.action == "backup.restore"));
    server.stop().await;
}

#[tokio::test]
async fn a_backup_restores_into_an_empty_database_of_the_same_kind() {
    round_trip(Database::new().await, Database::new().await).await;
}

#[tokio::test]
async fn a_sqlite_backup_restores_into_postgres_and_back() {
    let Some(pg) = Database::postgres().await else {
        eprintln!("skipped: TENANTRY_TEST_DATABASE_URL is not set (no PostgreSQL to restore into)");
        return;
    };
    round_trip(Database::sqlite(), pg).await;
    let pg = Database::postgres().await.unwrap();
    round_trip(pg, Database::sqlite()).await;
}

#[tokio::test]
async fn backups_taken_while_writers_run_restore_a_verifiable_chain() {
    let source = Database::new().await;
    let keys = keygen().await;
    let backups = tempfile::tempdir().unwrap();
    let server = TestServer::start(&source).await;
    let population = populate(&server).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let accounts = server.accounts();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut writes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Each failed login appends an audit row and bumps counters.
                let _ = accounts
                    .clone()
                    .login(LoginRequest {
                        email: format!("nobody{}@backup.test", writes % 50),
                        password: "wrong wrong wrong".into(),
                    })
                    .await;
                writes += 1;
            }
            writes
        })
    };
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(backup(&source, &keys, backups.path()).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    server.stop().await;
    assert!(writes > 0);
    let heads: Vec<u64> = reports
        .iter()
        .map(|r| r["audit_head"]["sequence"].as_u64().unwrap())
        .collect();
    assert!(
        heads.windows(2).all(|w| w[0] < w[1]),
        "writes went on: {heads:?}"
    );
    for report in &reports {
        let target = Database::new().await;
        let master_key = copy_master_key(&source, &target);
        let file = PathBuf::from(report["path"].as_str().unwrap());
        let out = restore(&target, &master_key, &keys.identity, &file).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(restored["audit_rows"], report["audit_head"]["sequence"]);
    }
    let target = Database::new().await;
    let master_key = copy_master_key(&source, &target);
    let last = PathBuf::from(reports[2]["path"].as_str().unwrap());
    assert!(
        restore(&target, &master_key, &keys.identity, &last)
            .await
            .status
            .success()
    );
    let server = start_restored(&target).await;
    check_restored(&server, &population).await;
    server.stop().await;
}

/// The restore failed with `expected` in its message and left `target` as it was.
async fn refused(target: &Database, out: std::process::Output, expected: &str) {
    assert!(!out.status.success(), "restore succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    if target.is_sqlite() {
        assert!(
            !target.dir.path().join("tenantry.db").exists(),
            "a refused restore left a database file"
        );
    } else {
        let (mut conn, backend) = tenantry_api::store::backup::connect(&target.url, false)
            .await
            .unwrap();
        assert_eq!(
            tenantry_api::store::backup::schema_version(&mut conn, backend)
                .await
                .unwrap(),
            0,
            "a refused restore left a schema"
        );
    }
}

#[tokio::test]
async fn damaged_foreign_and_newer_backups_and_wrong_keys_are_refused_without_writing() {
    let source = Database::new().await;
    let keys = keygen().await;
    let backups = tempfile::tempdir().unwrap();
    let server = TestServer::start(&source).await;
    let population = populate(&server).await;
    server.stop().await;
    let report = backup(&source, &keys, backups.path()).await;
    let file = PathBuf::from(report["path"].as_str().unwrap());
    let raw = std::fs::read(&file).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let variant = |name: &str, bytes: &[u8]| {
        let path = scratch.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };

    // Another identity.
    let other = keygen().await;
    let target = Database::new().await;
    let master_key = copy_master_key(&source, &target);
    let out = restore(&target, &master_key, &other.identity, &file).await;
    refused(
        &target,
        out,
        "none of the given identities can open this backup",
    )
    .await;

    // Cut short, and a flipped byte near the end (the last chunk: rows were already read).
    let truncated = variant("truncated.tbk", &raw[..raw.len() - 100]);
    let out = restore(&target, &master_key, &keys.identity, &truncated).await;
    refused(&target, out, "is damaged or was changed").await;
    let mut flipped = raw.clone();
    let at = raw.len() - 40;
    flipped[at] ^= 0x20;
    let flipped = variant("flipped.tbk", &flipped);
    let out = restore(&target, &master_key, &keys.identity, &flipped).await;
    refused(&target, out, "is damaged or was changed").await;

    // Not a backup at all.
    let junk = variant("junk.tbk", b"SQLite format 3\0 and more");
    let out = restore(&target, &master_key, &keys.identity, &junk).await;
    refused(&target, out, "is not a Tenantry backup").await;

    // A master key that does not open the backup's TOTP secrets.
    let wrong_key = scratch.path().join("wrong-master.key");
    let (_, text) = tenantry_api::crypto::MasterKey::generate().unwrap();
    write_key_file(&wrong_key, secrecy::ExposeSecret::expose_secret(&text));
    let out = restore(&target, &wrong_key, &keys.identity, &file).await;
    refused(&target, out, "cannot open the TOTP secret").await;

    // Without any TOTP secret, the instance-token signing key (sealed in the database)
    // is what the wrong master key cannot open.
    let no_totp = Database::new().await;
    let server = TestServer::start(&no_totp).await;
    server.signup("plain@example.com", "plainco").await;
    server.stop().await;
    let plain_backups = tempfile::tempdir().unwrap();
    let report = backup(&no_totp, &keys, plain_backups.path()).await;
    let plain_file = PathBuf::from(report["path"].as_str().unwrap());
    let out = restore(&target, &wrong_key, &keys.identity, &plain_file).await;
    refused(&target, out, "cannot open the instance-token signing key").await;

    // A newer schema than this binary knows.
    let newer = scratch.path().join("newer.tbk");
    let recipients = tenantry_backup::Recipients::load(&[&keys.recipient]).unwrap();
    let header = tenantry_backup::Header {
        label: tenantry_backup::Label {
            kind: tenantry_backup::Kind::ControlDatabase,
            created_at: jiff::Timestamp::now(),
            tenant_id: None,
        },
        schema_version: tenantry_api::store::backup::current_schema_version() + 1,
        source: "sqlite".into(),
        detail: Default::default(),
    };
    tenantry_backup::Writer::create(&newer, &header, &recipients)
        .unwrap()
        .finish()
        .unwrap();
    let out = restore(&target, &master_key, &keys.identity, &newer).await;
    refused(&target, out, "newer than this tenantry-api's").await;

    // A database that is not empty: the source itself.
    let source_key = source.dir.path().join("master.key");
    let out = restore(&source, &source_key, &keys.identity, &file).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the target database is not empty"),
        "{stderr}"
    );
    // Still the same database, and it still verifies; its sessions are still there.
    let server = start_restored(&source).await;
    assert!(old_session_works(&server, &population).await);
    check_restored(&server, &population).await;
    server.stop().await;

    // And after all that, the good file still restores into the untouched target.
    let out = restore(&target, &master_key, &keys.identity, &file).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn backups_lists_the_newest_and_flags_stale_ones() {
    let source = Database::new().await;
    let keys = keygen().await;
    let backups = tempfile::tempdir().unwrap();
    let server = TestServer::start(&source).await;
    server.signup("one@backup.test", "listing").await;
    server.stop().await;
    let first = backup(&source, &keys, backups.path()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = backup(&source, &keys, backups.path()).await;
    let out = api()
        .args(["backups", "--json", "--interval", "1h", "--dir"])
        .arg(backups.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["kind"], "control-database");
    assert_eq!(list[0]["count"], 2);
    assert_eq!(list[0]["path"], second["path"]);
    assert_eq!(list[0]["stale"], false);
    assert_ne!(first["path"], second["path"]);
    // With a schedule of 1 ms, the newest is long overdue: exit status 2.
    let out = api()
        .args(["backups", "--interval", "1ms", "--dir"])
        .arg(backups.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("STALE"));
    // --keep 1 leaves one.
    let out = api()
        .arg("backup")
        .args(["--database-url", &source.url, "--data-dir"])
        .arg(source.dir.path())
        .arg("--out")
        .arg(backups.path())
        .arg("--recipient-file")
        .arg(&keys.recipient)
        .args(["--keep", "1"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tenantry_backup::list(backups.path()).unwrap().len(), 1);
}

#[tokio::test]
async fn every_table_and_column_of_the_schema_is_in_a_backup() {
    let db = Database::new().await;
    let server = TestServer::start(&db).await;
    server.stop().await;
    let (mut conn, backend) = tenantry_api::store::backup::connect(&db.url, false)
        .await
        .unwrap();
    let catalog = tenantry_api::store::backup::catalog(&mut conn, backend)
        .await
        .unwrap();
    let mut expected: Vec<(String, Vec<String>)> = tenantry_api::store::backup::TABLES
        .iter()
        .map(|t| {
            (
                t.name.to_owned(),
                t.columns.iter().map(|(c, _)| (*c).to_owned()).collect(),
            )
        })
        .collect();
    expected.sort();
    let mut catalog = catalog;
    catalog.sort();
    for (_, columns) in catalog.iter_mut().chain(expected.iter_mut()) {
        columns.sort();
    }
    assert_eq!(catalog, expected);
}
