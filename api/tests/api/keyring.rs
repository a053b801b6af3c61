//! Master key rotation while the API serves: `rotate-master-key` against a running server,
//! with logins that verify TOTP going on throughout; `master-keys status`; retiring the
//! old key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tenantry_api::clock::{Clock as _, ManualClock};
use tenantry_api::crypto::{MasterKeyRing, sealed_key_id};
use tenantry_api::keyring::{self, RotateOptions};
use tenantry_proto::v1::*;

use crate::common::*;

fn options() -> Options {
    Options {
        extra_args: vec!["--master-key-reload-interval".into(), "1s".into()],
        ..Options::default()
    }
}

/// Every sealed TOTP value of the database: (user id, column, sealed).
async fn sealed_values(s: &TestServer) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for column in [
        tenantry_api::store::SealedColumn::TotpSecret,
        tenantry_api::store::SealedColumn::TotpPending,
    ] {
        for row in s
            .state
            .store
            .sealed_values(column, "", 10_000, None)
            .await
            .unwrap()
        {
            out.push((row.id, row.stored));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_master_key_rotates_while_logins_with_totp_go_on() {
    let db = Database::new().await;
    let clock = ManualClock::new(T0_MS);
    let s = Arc::new(TestServer::start_with(&db, options(), clock.clone()).await);
    let mut users = Vec::new();
    for i in 0..12 {
        let email = format!("rot{i}@example.com");
        s.signup(&email, &format!("rot{i}")).await;
        let token = s.login(&email).await;
        let (secret, _) = s.enroll(&token).await;
        users.push((email, secret));
    }
    // One enrollment in progress (its pending secret is sealed too) ...
    s.signup("pending@example.com", "pendingco").await;
    let pending_session = s.login("pending@example.com").await;
    let pending = s
        .mfa()
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &pending_session))
        .await
        .unwrap()
        .into_inner();
    // ... and one secret as it was stored before key rings: bare base64, no key id.
    let first = s
        .state
        .store
        .user_by_email("rot0@example.com")
        .await
        .unwrap()
        .unwrap();
    let sealed = first.totp_secret_sealed.clone().unwrap();
    let legacy = sealed.rsplit('.').next().unwrap().to_owned();
    s.state
        .store
        .execute_raw_for_tests(&format!(
            "UPDATE users SET totp_secret_sealed = '{legacy}' WHERE id = '{}'",
            first.id
        ))
        .await
        .unwrap();
    let key_file = db.dir.path().join("master.key");
    let (old_ring, _) = keyring::read_ring(&key_file).unwrap();
    let old_id = old_ring.primary_id().to_owned();
    let old_key_text = std::fs::read_to_string(&key_file).unwrap();
    let before = sealed_values(&s).await;
    assert_eq!(before.len(), 13);

    // Logins that verify a TOTP code, round after round, until told to stop; each round
    // moves the clock one TOTP step so the codes are new.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (s, stop, ok, users) = (
            Arc::clone(&s),
            Arc::clone(&stop),
            Arc::clone(&ok),
            users.clone(),
        );
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                // Server time moves 30 s per second at most, and the server reports the
                // keys it holds every second, each report counting for 2 min: a refresh
                // may run 3 s late (a loaded machine) before the rotation misses it.
                tokio::time::sleep(Duration::from_secs(1)).await;
                s.advance(Duration::from_secs(30));
                for (email, secret) in &users {
                    let session = match s
                        .accounts()
                        .login(LoginRequest {
                            email: email.clone(),
                            password: PASSWORD.into(),
                        })
                        .await
                    {
                        Ok(r) => r.into_inner().session_token,
                        Err(e) => {
                            failures.push(format!("login {email}: {e}"));
                            continue;
                        }
                    };
                    let verified = s
                        .mfa()
                        .verify_mfa(authed(
                            VerifyMfaRequest {
                                factor: Some(verify_mfa_request::Factor::Code(s.totp_now(secret))),
                            },
                            &session,
                        ))
                        .await;
                    match verified {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.push(format!("verify {email}: {e}")),
                    }
                }
            }
            failures
        })
    };
    while ok.load(Ordering::SeqCst) < 12 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The rotation: a new key file made by the command, small batches, against the
    // running server (which must take up the key before anything is re-sealed).
    let new_key_file = db.dir.path().join("next.key");
    let store = tenantry_api::store::Store::connect(&db.url, 2)
        .await
        .unwrap();
    let rotate_options = RotateOptions {
        batch_size: 2,
        wait: Duration::from_secs(60),
        poll: Duration::from_millis(100),
    };
    let report = keyring::rotate(&store, &key_file, &new_key_file, &rotate_options, &clock)
        .await
        .unwrap();
    assert!(report.generated && report.added_to_file, "{report:?}");
    assert_eq!(report.servers, 1, "the running server was waited for");
    assert_eq!(report.previous_primary.as_deref(), Some(old_id.as_str()));
    assert_eq!(report.unreadable, 0);
    assert_eq!(
        report.resealed["users.totp_secret_sealed"], 12,
        "{report:?}"
    );
    assert_eq!(
        report.resealed["users.totp_pending_sealed"], 1,
        "{report:?}"
    );
    // The instance-token signing key's private half is sealed too.
    assert_eq!(
        report.resealed["token_keys.private_sealed"], 1,
        "{report:?}"
    );
    let new_id = report.key_id.clone();
    assert_ne!(new_id, old_id);
    // The server seals with the new key now.
    assert_eq!(s.state.master_key.current().primary_id(), new_id);

    // More rounds after the rotation, then stop the traffic: nothing failed.
    let after_rotation = ok.load(Ordering::SeqCst);
    while ok.load(Ordering::SeqCst) < after_rotation + 24 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let failures = traffic.await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");

    // The enrollment begun before the rotation completes after it.
    s.mfa()
        .confirm_totp_enrollment(authed(
            ConfirmTotpEnrollmentRequest {
                code: s.totp_now(&pending.secret),
            },
            &pending_session,
        ))
        .await
        .unwrap();

    // Every secret is sealed by the new key; the status says the old one seals nothing.
    let after = sealed_values(&s).await;
    assert_eq!(after.len(), 13);
    assert!(
        after
            .iter()
            .all(|(_, v)| sealed_key_id(v) == Some(new_id.as_str())),
        "{after:?}"
    );
    let status = keyring::status(&store, &key_file, &clock).await.unwrap();
    let old = status.keys.iter().find(|k| k.key_id == old_id).unwrap();
    let new = status.keys.iter().find(|k| k.key_id == new_id).unwrap();
    assert_eq!((old.total, old.primary), (0, false));
    assert_eq!((new.total, new.primary, new.in_file), (14, true, true));
    assert_eq!(new.seals["token_keys.private_sealed"], 1);
    assert_eq!(status.servers.len(), 1);
    assert_eq!(status.servers[0].primary_key_id, new_id);

    // Running it again finishes nothing twice.
    let again = keyring::rotate(&store, &key_file, &new_key_file, &rotate_options, &clock)
        .await
        .unwrap();
    assert!(!again.generated && !again.added_to_file);
    assert_eq!(again.resealed.values().sum::<u64>(), 0, "{again:?}");

    // Both steps are in the audit log.
    let raw = db.raw_contents();
    assert!(contains(&raw, b"master_key.rotate"));
    assert!(contains(&raw, b"master_key.reseal"));

    // Retire the old key: the file holds only the new one. The running server takes it
    // up, and a restarted one opens everything with it.
    let new_only = std::fs::read_to_string(&new_key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    write_key_file(&key_file, &new_only);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.state.master_key.current().ids(), vec![new_id.as_str()]);
    let s = Arc::into_inner(s).unwrap();
    s.stop().await;
    clock.advance(Duration::from_secs(30));
    let s = TestServer::start_with(&db, options(), clock.clone()).await;
    for (email, secret) in &users {
        let session = s.login(email).await;
        s.mfa()
            .verify_mfa(authed(
                VerifyMfaRequest {
                    factor: Some(verify_mfa_request::Factor::Code(s.totp_now(secret))),
                },
                &session,
            ))
            .await
            .unwrap();
    }

    // What was stored before the rotation (a copy kept aside, or old pages a database
    // file still holds) no longer opens with any key the server holds, and the database
    // holds no copy of the retired key.
    let ring = s.state.master_key.current();
    for (id, sealed) in &before {
        assert!(old_ring.open(&format!("totp:{id}"), sealed).is_ok());
        assert!(ring.open(&format!("totp:{id}"), sealed).is_err());
    }
    let raw = db.raw_contents();
    assert!(!contains(&raw, old_key_text.trim().as_bytes()));
    assert!(!contains(&raw, &base64_decode(old_key_text.trim())));
    s.stop().await;
    store.close().await;
}

#[tokio::test]
async fn a_rotation_waits_for_every_running_server_and_says_which_lags() {
    let db = Database::new().await;
    let clock = ManualClock::new(T0_MS);
    let s = TestServer::start_with(&db, options(), clock.clone()).await;
    s.signup("lag@example.com", "lagco").await;
    let token = s.login("lag@example.com").await;
    s.enroll(&token).await;
    let key_file = db.dir.path().join("master.key");
    let (ring, _) = keyring::read_ring(&key_file).unwrap();
    let old_id = ring.primary_id().to_owned();

    // A second server whose key file is not updated: a copy of the old file.
    let lagging_dir = tempfile::tempdir().unwrap();
    let lagging_key = lagging_dir.path().join("master.key");
    write_key_file(&lagging_key, &std::fs::read_to_string(&key_file).unwrap());
    let mut args = serve_args(&db, &["--master-key-reload-interval".into(), "1s".into()]);
    args.db.master_key_file = Some(lagging_key.clone());
    let lagging = tenantry_api::server::build_state_with(&args, Arc::new(clock.clone()), None)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let lagging_task = tokio::spawn(tenantry_api::server::serve(
        Arc::clone(&lagging),
        listener,
        None,
        async {
            let _ = rx.await;
        },
    ));
    // Both report what they hold.
    let store = tenantry_api::store::Store::connect(&db.url, 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        store.live_key_holders(clock.now_ms()).await.unwrap().len(),
        2
    );

    let new_key_file = db.dir.path().join("next.key");
    let err = keyring::rotate(
        &store,
        &key_file,
        &new_key_file,
        &RotateOptions {
            batch_size: 100,
            wait: Duration::from_secs(3),
            poll: Duration::from_millis(100),
        },
        &clock,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(lagging.master_key.server_id()) && err.contains("1 of 2"),
        "{err}"
    );
    // Nothing was promoted or re-sealed: the old key still seals everything.
    assert_eq!(
        store.master_key_primary().await.unwrap(),
        Some(old_id.clone())
    );
    let status = keyring::status(&store, &key_file, &clock).await.unwrap();
    assert_eq!(
        status
            .keys
            .iter()
            .find(|k| k.key_id == old_id)
            .unwrap()
            .total,
        2,
        "the TOTP secret and the token signing key"
    );

    // Its file gets the new key; the same command then finishes.
    let text = std::fs::read_to_string(&key_file).unwrap();
    std::fs::remove_file(&lagging_key).unwrap();
    write_key_file(&lagging_key, &text);
    let report = keyring::rotate(
        &store,
        &key_file,
        &new_key_file,
        &RotateOptions {
            batch_size: 100,
            wait: Duration::from_secs(30),
            poll: Duration::from_millis(100),
        },
        &clock,
    )
    .await
    .unwrap();
    assert_eq!(report.servers, 2);
    assert_eq!(report.resealed["users.totp_secret_sealed"], 1);
    assert_eq!(lagging.master_key.current().primary_id(), report.key_id);

    // A server started with a key file that lacks the primary refuses to start.
    let stale_dir = tempfile::tempdir().unwrap();
    let stale_key = stale_dir.path().join("master.key");
    let only_old = text.lines().next().unwrap().to_owned();
    write_key_file(&stale_key, &only_old);
    let mut args = serve_args(&db, &[]);
    args.db.master_key_file = Some(stale_key);
    let err = tenantry_api::server::build_state_with(&args, Arc::new(clock.clone()), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&report.key_id), "{err}");
    assert!(
        MasterKeyRing::parse(&only_old.clone().into())
            .unwrap()
            .contains(&old_id)
    );

    let _ = tx.send(());
    lagging_task.await.unwrap().unwrap();
    // A stopped server withdraws its report.
    assert_eq!(
        store.live_key_holders(clock.now_ms()).await.unwrap().len(),
        1
    );
    s.stop().await;
    store.close().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
