//! Signup, login, sessions, lockout and password changes, through a real gRPC client.

use std::time::Duration;

use tenantry_proto::v1::*;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::common::*;

#[tokio::test]
async fn signup_creates_user_and_tenant_visible_to_the_member() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (user_id, tenant_id) = s.signup("Alice@Example.com", "acme").await;
    let token = s.login("alice@example.com").await;

    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user_id, user_id);
    assert_eq!(me.email, "alice@example.com");
    assert_eq!(me.roles, vec!["user"]);
    assert_eq!(me.tenant_ids, vec![tenant_id.clone()]);
    assert!(!me.mfa_enrolled);
    assert!(me.mfa_verified_at.is_none());

    let t = s
        .tenants()
        .get_tenant(authed(
            GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(t.name, "acme");
    assert_eq!(t.phase(), TenantPhase::Provisioning);
    assert_eq!(t.plan(), Plan::Free);
    assert_eq!(t.owner_user_id, user_id);
    let r = t.retention.unwrap();
    assert_eq!((r.max_age_hours, r.max_count), (336, 10_000));
    s.stop().await;
}

#[tokio::test]
async fn a_retried_signup_returns_the_same_ids_and_never_a_second_tenant() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let first = s.signup("bob@example.com", "bobco").await;
    let again = s.signup("bob@example.com", "bobco").await;
    assert_eq!(first, again);

    // Same email, other password: refused, nothing created.
    let status = expect_code(
        s.accounts()
            .signup(SignupRequest {
                email: "bob@example.com".into(),
                password: "another-Strong-pass-77".into(),
                tenant_name: "bobco2".into(),
                plan: 0,
            })
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(violated_field(&status), "email");

    // A taken tenant name is refused for somebody else, and the user is not created.
    let status = expect_code(
        s.accounts()
            .signup(SignupRequest {
                email: "carol@example.com".into(),
                password: PASSWORD.into(),
                tenant_name: "bobco".into(),
                plan: 0,
            })
            .await,
        Code::AlreadyExists,
    );
    assert_eq!(violated_field(&status), "tenant_name");
    expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "carol@example.com".into(),
                password: PASSWORD.into(),
            })
            .await,
        Code::Unauthenticated,
    );

    let token = s.login("bob@example.com").await;
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.tenant_ids.len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn signup_validation_names_the_field_and_creates_nothing() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let cases = [
        ("not-an-email", PASSWORD, "acme", 0, "email"),
        ("dave@example.com", PASSWORD, "Acme", 0, "tenant_name"),
        ("dave@example.com", PASSWORD, "1acme", 0, "tenant_name"),
        ("dave@example.com", PASSWORD, "ac", 0, "tenant_name"),
        ("dave@example.com", "short-pw-1", "acme", 0, "password"),
        ("dave@example.com", "Password1234", "acme", 0, "password"),
        (
            "dave@example.com",
            "aaaaaaaaaaaaaaaa",
            "acme",
            0,
            "password",
        ),
        ("dave@example.com", "dave-loves-cats", "acme", 0, "password"),
        ("dave@example.com", &"x9".repeat(129), "acme", 0, "password"),
        ("dave@example.com", PASSWORD, "acme", 99, "plan"),
    ];
    for (email, password, tenant, plan, field) in cases {
        let status = expect_code(
            s.accounts()
                .signup(SignupRequest {
                    email: email.into(),
                    password: password.into(),
                    tenant_name: tenant.into(),
                    plan,
                })
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&status), field, "{email} {tenant} {plan}");
        assert!(
            !status.message().contains(password),
            "error must not echo the password"
        );
    }
    expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "dave@example.com".into(),
                password: PASSWORD.into(),
            })
            .await,
        Code::Unauthenticated,
    );
    s.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("erin@example.com", "erinco").await;
    let wrong = expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "erin@example.com".into(),
                password: "wrong-Password-123".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    let unknown = expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "nobody@example.com".into(),
                password: PASSWORD.into(),
            })
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(wrong.message(), unknown.message());
    assert_eq!(reason(&wrong), "INVALID_CREDENTIALS");
    assert_eq!(reason(&unknown), "INVALID_CREDENTIALS");
    s.stop().await;
}

/// Five failures lock an email whether it has an account or not, with the same answer and
/// the same doubling lock, so the lockout does not tell which emails have an account.
#[tokio::test]
async fn unknown_emails_lock_exactly_like_accounts() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("gail@example.com", "gailco").await;
    let attempt = |email: &str| LoginRequest {
        email: email.into(),
        password: "wrong-Password-123".into(),
    };
    let locked = async |email: &str| {
        for i in 0..5 {
            let failed = expect_code(
                s.accounts().login(attempt(email)).await,
                Code::Unauthenticated,
            );
            assert_eq!(
                reason(&failed),
                "INVALID_CREDENTIALS",
                "{email}, failure {i}"
            );
        }
        expect_code(
            s.accounts().login(attempt(email)).await,
            Code::ResourceExhausted,
        )
    };
    // The same email in another spelling is the same email.
    for (known, unknown) in [
        ("gail@example.com", "nobody@example.com"),
        ("gail@example.com", "NoBody@Example.com"),
    ] {
        let known = locked(known).await;
        let unknown = locked(unknown).await;
        assert_eq!(known.message(), unknown.message());
        let delay = |e: &tonic::Status| e.get_error_details().retry_info().unwrap().retry_delay;
        assert_eq!(delay(&known), delay(&unknown));
        s.advance(Duration::from_secs(15 * 60 + 1));
    }
    // The second lock of each doubled the first.
    let unknown = locked("nobody@example.com").await;
    assert_eq!(
        unknown
            .get_error_details()
            .retry_info()
            .unwrap()
            .retry_delay,
        Some(Duration::from_secs(240))
    );
    // Another unknown email has counters of its own.
    expect_code(
        s.accounts().login(attempt("other@example.com")).await,
        Code::Unauthenticated,
    );
    s.stop().await;
}

#[tokio::test]
async fn five_failures_lock_the_account_even_for_the_right_password() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("frank@example.com", "frankco").await;
    let bad = || LoginRequest {
        email: "frank@example.com".into(),
        password: "wrong-Password-123".into(),
    };
    let good = || LoginRequest {
        email: "frank@example.com".into(),
        password: PASSWORD.into(),
    };
    for _ in 0..5 {
        expect_code(s.accounts().login(bad()).await, Code::Unauthenticated);
    }
    let locked = expect_code(s.accounts().login(good()).await, Code::ResourceExhausted);
    let retry = locked
        .get_error_details()
        .retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert_eq!(retry, Duration::from_secs(60));

    s.advance(Duration::from_secs(59));
    expect_code(s.accounts().login(good()).await, Code::ResourceExhausted);
    s.advance(Duration::from_secs(2));
    s.accounts().login(good()).await.unwrap();

    // A success resets the ladder; two more rounds of failures lock for 1 then 2 minutes.
    for _ in 0..5 {
        expect_code(s.accounts().login(bad()).await, Code::Unauthenticated);
    }
    let first = expect_code(s.accounts().login(good()).await, Code::ResourceExhausted);
    assert_eq!(
        first.get_error_details().retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(60))
    );
    s.advance(Duration::from_secs(61));
    for _ in 0..5 {
        expect_code(s.accounts().login(bad()).await, Code::Unauthenticated);
    }
    let second = expect_code(s.accounts().login(good()).await, Code::ResourceExhausted);
    assert_eq!(
        second.get_error_details().retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(120))
    );
    s.stop().await;
}

#[tokio::test]
async fn sessions_end_after_the_idle_timeout() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("gina@example.com", "ginaco").await;
    let token = s.login("gina@example.com").await;
    s.advance(Duration::from_secs(29 * 60));
    s.accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap();
    // Used just now, so another 29 minutes is still fine.
    s.advance(Duration::from_secs(29 * 60));
    s.accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap();
    s.advance(Duration::from_secs(31 * 60));
    let status = expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(reason(&status), "SESSION_INVALID");
    s.stop().await;
}

#[tokio::test]
async fn sessions_end_at_the_absolute_timeout_however_busy() {
    let db = Database::new().await;
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec![
                "--session-absolute-timeout".into(),
                "2h".into(),
                "--session-idle-timeout".into(),
                "90s".into(),
            ],
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    s.signup("hank@example.com", "hankco").await;
    let login = s
        .accounts()
        .login(LoginRequest {
            email: "hank@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.expires_at.unwrap().seconds, T0_MS / 1000 + 7200);
    let token = login.session_token;
    for _ in 0..(2 * 60 - 1) {
        s.advance(Duration::from_secs(60));
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await
            .unwrap();
    }
    s.advance(Duration::from_secs(60));
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await,
        Code::Unauthenticated,
    );
    s.stop().await;
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let st = expect_code(
        s.accounts().who_am_i(WhoAmIRequest {}).await,
        Code::Unauthenticated,
    );
    assert_eq!(reason(&st), "MISSING_CREDENTIALS");
    let mut req = tonic::Request::new(WhoAmIRequest {});
    req.metadata_mut()
        .insert("authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
    let st = expect_code(s.accounts().who_am_i(req).await, Code::Unauthenticated);
    assert_eq!(reason(&st), "MALFORMED_AUTHORIZATION");
    let st = expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, "made-up-token"))
            .await,
        Code::Unauthenticated,
    );
    assert_eq!(reason(&st), "SESSION_INVALID");
    s.stop().await;
}

#[tokio::test]
async fn logout_ends_only_that_session() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("ivy@example.com", "ivyco").await;
    let a = s.login("ivy@example.com").await;
    let b = s.login("ivy@example.com").await;
    assert_ne!(a, b);
    s.accounts()
        .logout(authed(LogoutRequest {}, &a))
        .await
        .unwrap();
    expect_code(
        s.accounts().who_am_i(authed(WhoAmIRequest {}, &a)).await,
        Code::Unauthenticated,
    );
    s.accounts()
        .who_am_i(authed(WhoAmIRequest {}, &b))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn change_password_ends_every_session_and_swaps_the_password() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("jack@example.com", "jackco").await;
    let a = s.login("jack@example.com").await;
    let b = s.login("jack@example.com").await;
    let new_pw = "maple-Quartz-58-ferry";

    let wrong = expect_code(
        s.accounts()
            .change_password(authed(
                ChangePasswordRequest {
                    current_password: "nope-Nope-nope-1".into(),
                    new_password: new_pw.into(),
                },
                &a,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&wrong), "current_password");
    let weak = expect_code(
        s.accounts()
            .change_password(authed(
                ChangePasswordRequest {
                    current_password: PASSWORD.into(),
                    new_password: "123456789012".into(),
                },
                &a,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&weak), "new_password");

    s.accounts()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: new_pw.into(),
            },
            &a,
        ))
        .await
        .unwrap();
    for t in [&a, &b] {
        expect_code(
            s.accounts().who_am_i(authed(WhoAmIRequest {}, t)).await,
            Code::Unauthenticated,
        );
    }
    expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "jack@example.com".into(),
                password: PASSWORD.into(),
            })
            .await,
        Code::Unauthenticated,
    );
    s.accounts()
        .login(LoginRequest {
            email: "jack@example.com".into(),
            password: new_pw.into(),
        })
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn login_rehashes_when_parameters_rise() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("kim@example.com", "kimco").await;
    let before = s
        .state
        .store
        .user_by_email("kim@example.com")
        .await
        .unwrap()
        .unwrap()
        .password_hash;
    assert!(before.contains("m=1024,t=1,p=1"), "{before}");
    s.stop().await;

    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec![
                "--argon2-memory-kib".into(),
                "2048".into(),
                "--argon2-iterations".into(),
                "2".into(),
            ],
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    s.login("kim@example.com").await;
    let after = s
        .state
        .store
        .user_by_email("kim@example.com")
        .await
        .unwrap()
        .unwrap()
        .password_hash;
    assert!(after.contains("m=2048,t=2,p=1"), "{after}");
    s.login("kim@example.com").await;
    s.stop().await;
}

#[tokio::test]
async fn the_per_source_rate_limit_answers_resource_exhausted() {
    let db = Database::new().await;
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec![
                "--rate-limit-per-second".into(),
                "1".into(),
                "--rate-limit-burst".into(),
                "3".into(),
            ],
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    let req = || LoginRequest {
        email: "nobody@example.com".into(),
        password: PASSWORD.into(),
    };
    for _ in 0..3 {
        expect_code(s.accounts().login(req()).await, Code::Unauthenticated);
    }
    let limited = expect_code(s.accounts().login(req()).await, Code::ResourceExhausted);
    assert!(limited.get_error_details().retry_info().is_some());
    s.advance(Duration::from_secs(1));
    expect_code(s.accounts().login(req()).await, Code::Unauthenticated);
    s.stop().await;
}
