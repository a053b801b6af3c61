//! Instance-token key rotation on the real server (SQLite, and PostgreSQL when given): the
//! key file seeds the ring, `rotate-token-key` adds a key that signs only after the overlap,
//! the superseded key stays published until its last token expired, then leaves the set and
//! loses its private half. Time moves on the manual clock.

use std::time::Duration;

use clap::Parser as _;
use tenantry_api::config::{Cli, Command, RotateTokenKeyArgs};
use tenantry_api::token_keys::{self, actions, min_overlap};
use tenantry_proto::token::TokenVerifier;
use tenantry_proto::v1::IssueInstanceTokenRequest;

use tenantry_test_support::token_kid;

use crate::common::*;

async fn issue(s: &TestServer, session: &str, tenant_id: &str) -> String {
    s.tenants()
        .issue_instance_token(authed(
            IssueInstanceTokenRequest {
                tenant_id: tenant_id.into(),
            },
            session,
        ))
        .await
        .unwrap()
        .into_inner()
        .token
}

fn rotate_args(s: &TestServer, extra: &[&str]) -> RotateTokenKeyArgs {
    let mut argv = vec![
        "tenantry-api".to_owned(),
        "rotate-token-key".into(),
        "--database-url".into(),
        secrecy::ExposeSecret::expose_secret(&s.db_args.url()).to_owned(),
        "--master-key-file".into(),
        s.db_args
            .master_key_file
            .as_ref()
            .unwrap()
            .display()
            .to_string(),
        "--data-dir".into(),
        s.db_args.data_dir.display().to_string(),
    ];
    argv.extend(extra.iter().map(|a| (*a).to_owned()));
    match Cli::try_parse_from(argv).unwrap().command {
        Command::RotateTokenKey(args) => args,
        _ => unreachable!(),
    }
}

fn at(ms: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(ms).unwrap()
}

/// The set as a runtime would hold it now.
/// The database's row of the key `kid`.
async fn stored_key(s: &TestServer, kid: &str) -> tenantry_api::store::TokenKeyRow {
    s.state
        .store
        .token_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.kid == kid)
        .unwrap()
}

fn runtime_set(s: &TestServer) -> TokenVerifier {
    TokenVerifier::from_public_key_pem(&s.state.token_keys.public_set(s.now_ms()).unwrap()).unwrap()
}

#[tokio::test]
async fn a_rotation_switches_keys_at_signs_from_and_retires_the_old_one_after_the_overlap() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, tenant_id) = s.signup("rota@example.com", "rotaco").await;
    let session = s.login("rota@example.com").await;

    // The key file became the ring's first key: tokens name it, the file's public half
    // verifies them.
    let first = issue(&s, &session, &tenant_id).await;
    let old_kid = token_kid(&first);
    assert_eq!(token_verifier(&db).kids(), [old_kid.as_str()]);
    assert_eq!(runtime_set(&s).kids(), [old_kid.as_str()]);

    let rotation = token_keys::rotate_command(&rotate_args(&s, &[]), &s.clock)
        .await
        .unwrap();
    let overlap_ms = 20 * 60 * 1000;
    assert_eq!(rotation.signs_from_ms, s.now_ms() + overlap_ms);
    assert_eq!(rotation.retires_at_ms, s.now_ms() + 2 * overlap_ms);
    assert_eq!(rotation.superseded, [old_kid.as_str()]);
    let new_kid = rotation.kid.clone();
    assert_ne!(new_kid, old_kid);

    // Picked up by the next refresh: published at once, but not signing yet.
    tenantry_api::server::refresh_token_keys(&s.state).await;
    assert_eq!(runtime_set(&s).kids(), [old_kid.as_str(), new_kid.as_str()]);
    let states = |s: &TestServer| -> Vec<(String, &'static str)> {
        token_keys::statuses(&s.state.token_keys.keys(), s.now_ms())
            .into_iter()
            .map(|k| (k.kid, k.state))
            .collect()
    };
    assert_eq!(
        states(&s),
        [(old_kid.clone(), "signing"), (new_kid.clone(), "pending")]
    );
    let public = token_keys::public_command(&s.db_args, &s.clock)
        .await
        .unwrap();
    assert_eq!(
        TokenVerifier::from_public_key_pem(&public).unwrap().kids(),
        [old_kid.as_str(), new_kid.as_str()]
    );
    s.advance(Duration::from_millis(
        u64::try_from(overlap_ms).unwrap() - 1000,
    ));
    let before_switch = issue(&s, &session, &tenant_id).await;
    assert_eq!(token_kid(&before_switch), old_kid);

    // From signs_from on, the new key signs; the old key's tokens still verify.
    s.advance(Duration::from_secs(1));
    let after_switch = issue(&s, &session, &tenant_id).await;
    assert_eq!(token_kid(&after_switch), new_kid);
    let set = runtime_set(&s);
    for token in [&before_switch, &after_switch] {
        assert!(set.verify(token, &tenant_id, at(s.now_ms())).is_ok());
    }
    tenantry_api::server::refresh_token_keys(&s.state).await;
    assert_eq!(
        states(&s),
        [(old_kid.clone(), "verifying"), (new_kid.clone(), "signing")]
    );
    // The last token of the old key lives until then, plus the skew: the old key stays.
    let sealed_old = stored_key(&s, &old_kid).await.private_sealed.unwrap();
    s.advance(Duration::from_millis(
        u64::try_from(overlap_ms).unwrap() - 1000,
    ));
    tenantry_api::server::refresh_token_keys(&s.state).await;
    assert_eq!(runtime_set(&s).kids().len(), 2);

    // Retired: out of the set, its private half deleted, its tokens refused.
    s.advance(Duration::from_secs(1));
    tenantry_api::server::refresh_token_keys(&s.state).await;
    let set = runtime_set(&s);
    assert_eq!(set.kids(), [new_kid.as_str()]);
    let old_key_token = stored_key(&s, &old_kid).await;
    assert_eq!(old_key_token.private_sealed, None);
    assert!(old_key_token.retires_at_ms.is_some());
    assert_eq!(
        set.verify(&before_switch, &tenant_id, at(s.now_ms() - 20 * 60 * 1000)),
        Err(tenantry_proto::token::TokenError::UnknownKey)
    );
    assert_eq!(token_kid(&issue(&s, &session, &tenant_id).await), new_kid);
    assert_eq!(
        states(&s),
        [(old_kid.clone(), "retired"), (new_kid.clone(), "signing")]
    );
    if !db.is_sqlite() {
        // What PostgreSQL holds (pg_dump of the schema) no longer has it. (SQLite keeps
        // overwritten pages in its WAL and free list until a checkpoint and vacuum.)
        let raw = db.raw_contents();
        assert!(
            !raw.windows(sealed_old.len())
                .any(|w| w == sealed_old.as_bytes()),
            "the retired key's sealed private half is still in the database"
        );
    }

    // Audited: the import, the rotation and the retirement, each once, in a valid chain.
    let audit = s.state.store.list_audit(0, 1000).await.unwrap();
    let rows = |action: &str| -> Vec<String> {
        audit
            .iter()
            .filter(|r| r.entry.action == action)
            .map(|r| r.entry.target.clone())
            .collect()
    };
    assert_eq!(rows(actions::IMPORT), [old_kid.as_str()]);
    assert_eq!(rows(actions::ROTATE), [new_kid.as_str()]);
    assert_eq!(rows(actions::RETIRE), [old_kid.as_str()]);
    let rotate = audit
        .iter()
        .find(|r| r.entry.action == actions::ROTATE)
        .unwrap();
    assert!(rotate.entry.detail_json.contains("signs_from_ms"));
    assert!(s.state.store.verify_audit().await.unwrap().is_ok());
    // Issued tokens are audited with the key that signed them.
    let issued = audit
        .iter()
        .rfind(|r| r.entry.action == "tenant.token.issued")
        .unwrap();
    assert!(issued.entry.detail_json.contains(&new_kid));

    // Restarting on the same database keeps the ring (the key file is not re-imported).
    s.stop().await;
    let s =
        TestServer::start_with(&db, Options::default(), s_clock_at(rotation.retires_at_ms)).await;
    let session = s.login("rota@example.com").await;
    assert_eq!(token_kid(&issue(&s, &session, &tenant_id).await), new_kid);
    s.stop().await;
}

fn s_clock_at(ms: i64) -> tenantry_api::clock::ManualClock {
    tenantry_api::clock::ManualClock::new(ms + 60_000)
}

#[tokio::test]
async fn rotations_refuse_a_short_overlap_and_a_second_pending_key() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let keys_before = s.state.store.token_keys().await.unwrap();
    for short in ["15m", "59s", "0s"] {
        let err =
            token_keys::rotate_command(&rotate_args(&s, &["--token-key-overlap", short]), &s.clock)
                .await
                .unwrap_err()
                .to_string();
        assert!(err.contains("too short") && err.contains("16m"), "{err}");
    }
    assert_eq!(s.state.store.token_keys().await.unwrap(), keys_before);

    token_keys::rotate_command(
        &rotate_args(
            &s,
            &[
                "--token-key-overlap",
                &format!("{}s", min_overlap().as_secs()),
            ],
        ),
        &s.clock,
    )
    .await
    .unwrap();
    let err = token_keys::rotate_command(&rotate_args(&s, &[]), &s.clock)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not sign until"), "{err}");
    assert_eq!(s.state.store.token_keys().await.unwrap().len(), 2);
    let audit = s.state.store.list_audit(0, 1000).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|r| r.entry.action == actions::ROTATE)
            .count(),
        1,
        "refused rotations write nothing"
    );

    // Once the pending key signs, the next rotation is accepted.
    s.advance(min_overlap());
    token_keys::rotate_command(&rotate_args(&s, &[]), &s.clock)
        .await
        .unwrap();
    s.stop().await;
}
