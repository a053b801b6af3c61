//! TOTP enrollment, verification, single use, recovery codes, lockout and storage at rest.

use std::sync::Arc;
use std::time::Duration;

use tenantry_proto::v1::verify_mfa_request::Factor;
use tenantry_proto::v1::*;
use tonic::Code;

use crate::common::*;

fn code_req(code: String, token: &str) -> tonic::Request<VerifyMfaRequest> {
    authed(
        VerifyMfaRequest {
            factor: Some(Factor::Code(code)),
        },
        token,
    )
}

#[tokio::test]
async fn enrollment_gives_a_usable_uri_and_ten_recovery_codes() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("lena@example.com", "lenaco").await;
    let token = s.login("lena@example.com").await;
    let begin = s
        .mfa()
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(begin.secret.len(), 32, "160 bits in unpadded base32");
    assert!(
        begin
            .otpauth_uri
            .starts_with("otpauth://totp/Tenantry:lena%40example.com?secret=")
    );
    assert!(
        begin
            .otpauth_uri
            .contains(&format!("secret={}", begin.secret))
    );
    assert!(
        begin
            .otpauth_uri
            .contains("&issuer=Tenantry&algorithm=SHA1&digits=6&period=30")
    );

    // A wrong code does not confirm.
    let wrong = format!(
        "{:06}",
        (s.totp_now(&begin.secret).parse::<u32>().unwrap() + 1) % 1_000_000
    );
    let st = expect_code(
        s.mfa()
            .confirm_totp_enrollment(authed(ConfirmTotpEnrollmentRequest { code: wrong }, &token))
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(reason(&st), "INVALID_MFA_CODE");
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert!(!me.mfa_enrolled);

    let code = s.totp_now(&begin.secret);
    let confirm = s
        .mfa()
        .confirm_totp_enrollment(authed(ConfirmTotpEnrollmentRequest { code }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirm.recovery_codes.len(), 10);
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert!(me.mfa_enrolled);
    assert_eq!(me.mfa_verified_at.unwrap().seconds, s.now_ms() / 1000);

    // Enrolling again is refused; login now says MFA is required.
    expect_code(
        s.mfa()
            .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &token))
            .await,
        Code::FailedPrecondition,
    );
    let login = s
        .accounts()
        .login(LoginRequest {
            email: "lena@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(login.mfa_required);
    s.stop().await;
}

#[tokio::test]
async fn each_code_is_accepted_once_within_one_step_of_drift() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("max@example.com", "maxco").await;
    let token = s.login("max@example.com").await;
    let (secret, _) = s.enroll(&token).await;
    let session = s.login("max@example.com").await;

    // The enrollment code's step is used; the same code again is refused.
    expect_code(
        s.mfa()
            .verify_mfa(code_req(s.totp_now(&secret), &session))
            .await,
        Code::Unauthenticated,
    );

    s.advance(Duration::from_secs(30));
    let code = s.totp_now(&secret);
    let ok = s
        .mfa()
        .verify_mfa(code_req(code.clone(), &session))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.mfa_verified_at.unwrap().seconds, s.now_ms() / 1000);
    assert_eq!(ok.recovery_codes_remaining, 10);
    expect_code(
        s.mfa().verify_mfa(code_req(code, &session)).await,
        Code::Unauthenticated,
    );

    // One step ahead (phone clock fast) is fine; two steps is not.
    s.advance(Duration::from_secs(60));
    expect_code(
        s.mfa()
            .verify_mfa(code_req(totp_code(&secret, s.now_ms(), 2), &session))
            .await,
        Code::Unauthenticated,
    );
    s.mfa()
        .verify_mfa(code_req(totp_code(&secret, s.now_ms(), 1), &session))
        .await
        .unwrap();

    // Without a session, MFA cannot be verified at all.
    expect_code(
        s.mfa()
            .verify_mfa(VerifyMfaRequest {
                factor: Some(Factor::Code("123456".into())),
            })
            .await,
        Code::Unauthenticated,
    );
    expect_code(
        s.mfa()
            .verify_mfa(authed(VerifyMfaRequest { factor: None }, &session))
            .await,
        Code::InvalidArgument,
    );
    s.stop().await;
}

#[tokio::test]
async fn recovery_codes_work_once_each() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("nina@example.com", "ninaco").await;
    let token = s.login("nina@example.com").await;
    let (_, codes) = s.enroll(&token).await;
    let session = s.login("nina@example.com").await;
    let recovery = |code: &str| {
        authed(
            VerifyMfaRequest {
                factor: Some(Factor::RecoveryCode(code.into())),
            },
            &session,
        )
    };
    // Typed in upper case with spaces: still accepted.
    let typed = codes[0].to_uppercase().replace('-', " ");
    let ok = s
        .mfa()
        .verify_mfa(recovery(&typed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.recovery_codes_remaining, 9);
    expect_code(
        s.mfa().verify_mfa(recovery(&codes[0])).await,
        Code::Unauthenticated,
    );
    expect_code(
        s.mfa().verify_mfa(recovery("aaaa-bbbb-cccc")).await,
        Code::Unauthenticated,
    );
    let ok = s
        .mfa()
        .verify_mfa(recovery(&codes[1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.recovery_codes_remaining, 8);
    s.stop().await;
}

#[tokio::test]
async fn five_wrong_codes_lock_mfa() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("omar@example.com", "omarco").await;
    let token = s.login("omar@example.com").await;
    let (secret, _) = s.enroll(&token).await;
    s.advance(Duration::from_secs(30));
    for _ in 0..5 {
        expect_code(
            s.mfa().verify_mfa(code_req("000000".into(), &token)).await,
            Code::Unauthenticated,
        );
    }
    let locked = expect_code(
        s.mfa()
            .verify_mfa(code_req(s.totp_now(&secret), &token))
            .await,
        Code::ResourceExhausted,
    );
    assert!(locked.message().contains("locked"));
    s.advance(Duration::from_secs(61));
    s.mfa()
        .verify_mfa(code_req(s.totp_now(&secret), &token))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn totp_secrets_and_recovery_codes_are_not_stored_in_the_clear() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("pia@example.com", "piaco").await;
    let token = s.login("pia@example.com").await;
    let (secret, codes) = s.enroll(&token).await;
    let user = s
        .state
        .store
        .user_by_email("pia@example.com")
        .await
        .unwrap()
        .unwrap();
    let sealed = user.totp_secret_sealed.unwrap();
    assert!(!sealed.contains(&secret));
    let raw = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .unwrap();
    // `mk1.<key id>.<base64(nonce || ciphertext)>`
    assert!(sealed.starts_with("mk1."), "{sealed}");
    let sealed_bytes = base64_decode(sealed.rsplit('.').next().unwrap());
    assert!(
        !contains(&sealed_bytes, &raw),
        "sealed value must not contain the raw secret"
    );
    if db.is_sqlite() {
        s.stop().await;
        let bytes = db.raw_sqlite_bytes();
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "base32 secret on disk"
        );
        assert!(!contains(&bytes, &raw), "raw secret on disk");
        assert!(!contains(&bytes, PASSWORD.as_bytes()), "password on disk");
        for code in &codes {
            assert!(!contains(&bytes, code.as_bytes()), "recovery code on disk");
            assert!(
                !contains(&bytes, code.replace('-', "").as_bytes()),
                "recovery code on disk"
            );
        }
        assert!(!contains(&bytes, token.as_bytes()), "session token on disk");
    } else {
        s.stop().await;
    }
}

#[tokio::test]
async fn secrets_stay_usable_across_restarts_and_need_the_master_key() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("quinn@example.com", "quinnco").await;
    let token = s.login("quinn@example.com").await;
    let (secret, _) = s.enroll(&token).await;
    let now = s.now_ms();
    s.stop().await;

    let clock = tenantry_api::clock::ManualClock::new(now + 30_000);
    let s = TestServer::start_with(&db, Options::default(), clock.clone()).await;
    let session = s.login("quinn@example.com").await;
    s.mfa()
        .verify_mfa(code_req(s.totp_now(&secret), &session))
        .await
        .unwrap();
    s.stop().await;

    // Another master key cannot open the stored secret: the server refuses to start,
    // naming the key the database needs (its id, never key material).
    let key_file = db.dir.path().join("master.key");
    let original = std::fs::read_to_string(&key_file).unwrap();
    let (other_key, other) = tenantry_api::crypto::MasterKey::generate().unwrap();
    use secrecy::ExposeSecret as _;
    std::fs::write(&key_file, other.expose_secret()).unwrap();
    clock.advance(Duration::from_secs(30));
    let err = tenantry_api::server::build_state_with(
        &serve_args(&db, &[]),
        Arc::new(clock.clone()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    let needed = tenantry_api::crypto::MasterKeyRing::parse(&original.clone().into()).unwrap();
    assert!(
        err.contains(needed.primary_id()) && err.contains(other_key.id()),
        "{err}"
    );
    assert!(!err.contains(other.expose_secret()) && !err.contains(original.trim()));

    // A value sealed by a key the file lacks fails generically (as a server that lost a
    // key after starting would see it): the key file holds the needed key again, but the
    // stored secret was sealed by a key nobody has.
    std::fs::write(&key_file, &original).unwrap();
    let s = TestServer::start_with(&db, Options::default(), clock).await;
    let stranger = other_key.seal("totp:whoever", b"x").unwrap();
    let user = s
        .state
        .store
        .user_by_email("quinn@example.com")
        .await
        .unwrap()
        .unwrap();
    s.state
        .store
        .execute_raw_for_tests(&format!(
            "UPDATE users SET totp_secret_sealed = '{stranger}' WHERE id = '{}'",
            user.id
        ))
        .await
        .unwrap();
    let session = s.login("quinn@example.com").await;
    let st = expect_code(
        s.mfa()
            .verify_mfa(code_req(s.totp_now(&secret), &session))
            .await,
        Code::Internal,
    );
    assert_eq!(st.message(), "internal error");
    s.stop().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// `RemoveTotp` needs a second factor verified on this session within the step-up window
/// and the password; it deletes the secret and the recovery codes, takes the stamp off
/// every session of the user, is audited and told to the user by mail, and a new
/// enrollment works after it.
#[tokio::test]
async fn removing_totp_needs_a_fresh_second_factor_and_the_password() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("rita@example.com", "ritaco").await;
    let enrolled_on = s.login("rita@example.com").await;
    let (_, codes) = s.enroll(&enrolled_on).await;
    let remove = |token: &str, password: &str| {
        let mut mfa = s.mfa();
        let request = authed(
            RemoveTotpRequest {
                password: password.into(),
            },
            token,
        );
        async move { mfa.remove_totp(request).await }
    };
    let who = async |token: &str| {
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, token))
            .await
            .unwrap()
            .into_inner()
    };

    // A session without a verified second factor is refused, whatever the password.
    let session = s.login("rita@example.com").await;
    let e = expect_code(remove(&session, PASSWORD).await, Code::PermissionDenied);
    assert_eq!(reason(&e), "MFA_REQUIRED");
    // A stale one too (the enrolling session verified 16 minutes ago).
    s.advance(Duration::from_secs(16 * 60));
    let e = expect_code(remove(&enrolled_on, PASSWORD).await, Code::PermissionDenied);
    assert_eq!(reason(&e), "MFA_TOO_OLD");

    // The authenticator is lost: a recovery code steps the new session up; a wrong
    // password is refused by field and recorded like a failed login.
    let session = s.login("rita@example.com").await;
    s.mfa()
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(Factor::RecoveryCode(codes[0].clone())),
            },
            &session,
        ))
        .await
        .unwrap();
    let e = expect_code(
        remove(&session, "not the password").await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&e), "password");
    assert!(who(&session).await.mfa_enrolled);

    remove(&session, PASSWORD).await.unwrap();
    for token in [&session, &enrolled_on] {
        let me = who(token).await;
        assert!(!me.mfa_enrolled);
        assert!(me.mfa_verified_at.is_none(), "{me:?}");
    }
    // The recovery codes went with the secret; removing again has nothing to remove.
    let e = expect_code(
        s.mfa()
            .verify_mfa(authed(
                VerifyMfaRequest {
                    factor: Some(Factor::RecoveryCode(codes[1].clone())),
                },
                &session,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert!(e.message().contains("no second factor"), "{e:?}");
    expect_code(remove(&session, PASSWORD).await, Code::FailedPrecondition);

    // Audited (the refusal and the removal), told by mail, and enrolling again works.
    let admin = s.admin_session("root@example.com").await.1;
    let mut removed: Vec<_> = all_audit_events(&s, &admin)
        .await
        .into_iter()
        .filter(|e| e.action == "mfa.removed")
        .map(|e| e.outcome)
        .collect();
    removed.sort_unstable();
    assert_eq!(removed, vec!["failure", "success"]);
    let told = tenantry_test_support::eventually(
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || {
            tenantry_test_support::read_mail(&db.dir.path().join("outbox"))
                .iter()
                .any(|m| m.contains("Subject: Two-factor authentication was turned off"))
        },
    )
    .await;
    assert!(told, "no mail told the user");
    let (secret, _) = s.enroll(&session).await;
    s.step_up(&session, &secret).await;
    assert!(who(&session).await.mfa_enrolled);
    s.stop().await;
}
