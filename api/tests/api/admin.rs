//! The admin gate, admin actions, tenant isolation and the audit log.

use std::time::Duration;

use tenantry_proto::v1::*;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn the_admin_gate_says_which_requirement_is_missing() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("user@example.com", "userco").await;
    let user = s.login("user@example.com").await;
    let st = expect_code(
        s.admin()
            .list_tenants(authed(ListTenantsRequest::default(), &user))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED");

    let (_, admin, secret) = s.admin_session("root@example.com").await;
    // Enrollment verified this session: admin calls work.
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &admin))
        .await
        .unwrap();

    // A new session of the same admin has no second factor yet.
    let fresh = s.login("root@example.com").await;
    let st = expect_code(
        s.admin()
            .list_tenants(authed(ListTenantsRequest::default(), &fresh))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "MFA_REQUIRED");
    s.step_up(&fresh, &secret).await;
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &fresh))
        .await
        .unwrap();

    // Past the 15-minute step-up window the factor is too old (the session is still alive).
    s.advance(Duration::from_secs(14 * 60));
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &fresh))
        .await
        .unwrap();
    s.advance(Duration::from_secs(2 * 60));
    let st = expect_code(
        s.admin()
            .list_tenants(authed(ListTenantsRequest::default(), &fresh))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "MFA_TOO_OLD");
    s.accounts()
        .who_am_i(authed(WhoAmIRequest {}, &fresh))
        .await
        .unwrap();
    s.step_up(&fresh, &secret).await;
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &fresh))
        .await
        .unwrap();

    // Unauthenticated callers are told so, not "permission denied".
    expect_code(
        s.admin().list_tenants(ListTenantsRequest::default()).await,
        Code::Unauthenticated,
    );
    s.stop().await;
}

#[tokio::test]
async fn another_tenant_is_not_found_exactly_like_a_missing_one() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, a_tenant) = s.signup("a@example.com", "alpha").await;
    let (_, b_tenant) = s.signup("b@example.com", "bravo").await;
    let b = s.login("b@example.com").await;
    s.tenants()
        .get_tenant(authed(
            GetTenantRequest {
                tenant_id: b_tenant,
            },
            &b,
        ))
        .await
        .unwrap();

    let theirs = expect_code(
        s.tenants()
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: a_tenant.clone(),
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    let missing = expect_code(
        s.tenants()
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: uuid::Uuid::new_v4().to_string(),
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    let junk = expect_code(
        s.tenants()
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: "'; DROP TABLE tenants; --".into(),
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    assert_eq!(theirs.message(), missing.message());
    assert_eq!(theirs.message(), junk.message());
    expect_code(
        s.tenants()
            .get_retention_policy(authed(
                GetRetentionPolicyRequest {
                    tenant_id: a_tenant.clone(),
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        s.tenants()
            .set_retention_policy(authed(
                SetRetentionPolicyRequest {
                    tenant_id: a_tenant.clone(),
                    max_age_hours: 1,
                    max_count: 1,
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        s.tenants()
            .issue_instance_token(authed(
                IssueInstanceTokenRequest {
                    tenant_id: a_tenant,
                },
                &b,
            ))
            .await,
        Code::NotFound,
    );
    s.stop().await;
}

#[tokio::test]
async fn members_get_instance_tokens_bound_to_their_tenant() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (user_id, tenant_id) = s.signup("wes@example.com", "wesco").await;
    let (_, other_tenant) = s.signup("xena@example.com", "xenaco").await;
    let token = s.login("wes@example.com").await;
    let issued = s
        .tenants()
        .issue_instance_token(authed(
            IssueInstanceTokenRequest {
                tenant_id: tenant_id.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let now_s = s.now_ms() / 1000;
    assert_eq!(
        issued.expires_at.unwrap().seconds,
        now_s + 600,
        "default lifetime is 10 minutes"
    );
    let verifier = token_verifier(&db);
    let now = jiff::Timestamp::from_second(now_s).unwrap();
    let claims = verifier.verify(&issued.token, &tenant_id, now).unwrap();
    assert_eq!(claims.sub, user_id);
    assert_eq!(claims.iss, "tenantry");
    // The same token is refused for another tenant, and after it expires.
    assert!(verifier.verify(&issued.token, &other_tenant, now).is_err());
    let later = jiff::Timestamp::from_second(now_s + 600 + 120).unwrap();
    assert!(verifier.verify(&issued.token, &tenant_id, later).is_err());
    expect_code(
        s.tenants()
            .issue_instance_token(IssueInstanceTokenRequest { tenant_id })
            .await,
        Code::Unauthenticated,
    );
    s.stop().await;
}

#[tokio::test]
async fn owners_set_retention_within_their_plan_and_admins_up_to_the_hard_cap() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, tenant_id) = s.signup("rita@example.com", "ritaco").await;
    let owner = s.login("rita@example.com").await;
    let set = |age: u32, count: u32| {
        authed(
            SetRetentionPolicyRequest {
                tenant_id: tenant_id.clone(),
                max_age_hours: age,
                max_count: count,
            },
            &owner,
        )
    };
    let got = s
        .tenants()
        .set_retention_policy(set(24, 500))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!((got.max_age_hours, got.max_count), (24, 500));
    let cap = s
        .tenants()
        .get_retention_policy(authed(
            GetRetentionPolicyRequest {
                tenant_id: tenant_id.clone(),
            },
            &owner,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.policy.unwrap().max_age_hours, 24);
    assert_eq!(cap.max_age_hours_cap, 336, "free plan");

    for (age, count, field) in [
        (0, 5, "max_age_hours"),
        (337, 5, "max_age_hours"),
        (5, 0, "max_count"),
        (5, 1_000_001, "max_count"),
    ] {
        let st = expect_code(
            s.tenants().set_retention_policy(set(age, count)).await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&st), field);
    }

    let (_, admin, _) = s.admin_session("root@example.com").await;
    let admin_set = |age: u32| {
        authed(
            SetTenantRetentionPolicyRequest {
                tenant_id: tenant_id.clone(),
                max_age_hours: age,
                max_count: 10,
            },
            &admin,
        )
    };
    s.admin()
        .set_tenant_retention_policy(admin_set(720))
        .await
        .unwrap();
    let st = expect_code(
        s.admin().set_tenant_retention_policy(admin_set(721)).await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&st), "max_age_hours");
    let t = s
        .tenants()
        .get_tenant(authed(
            GetTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &owner,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.tenant.unwrap().retention.unwrap().max_age_hours, 720);
    s.stop().await;
}

#[tokio::test]
async fn admins_list_suspend_resume_and_delete_tenants() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let mut ids = Vec::new();
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        s.advance(Duration::from_millis(5));
        ids.push(
            s.signup(&format!("u{i}@example.com"), &format!("tenant-{name}"))
                .await
                .1,
        );
    }
    let (_, admin, _) = s.admin_session("root@example.com").await;
    let page1 = s
        .admin()
        .list_tenants(authed(
            ListTenantsRequest {
                page_size: 2,
                page_token: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page1
            .tenants
            .iter()
            .map(|t| t.tenant_id.clone())
            .collect::<Vec<_>>(),
        ids[..2]
    );
    assert!(!page1.next_page_token.is_empty());
    let page2 = s
        .admin()
        .list_tenants(authed(
            ListTenantsRequest {
                page_size: 2,
                page_token: page1.next_page_token,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page2
            .tenants
            .iter()
            .map(|t| t.tenant_id.clone())
            .collect::<Vec<_>>(),
        ids[2..]
    );
    assert!(page2.next_page_token.is_empty());
    expect_code(
        s.admin()
            .list_tenants(authed(
                ListTenantsRequest {
                    page_size: 501,
                    page_token: String::new(),
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        s.admin()
            .list_tenants(authed(
                ListTenantsRequest {
                    page_size: 2,
                    page_token: "garbage".into(),
                },
                &admin,
            ))
            .await,
        Code::InvalidArgument,
    );

    let t = s
        .admin()
        .suspend_tenant(authed(
            SuspendTenantRequest {
                tenant_id: ids[0].clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let t = t.into_inner().tenant.unwrap();
    assert!(t.suspended);
    assert_eq!(t.phase(), TenantPhase::Suspended);
    let t = s
        .admin()
        .resume_tenant(authed(
            ResumeTenantRequest {
                tenant_id: ids[0].clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let t = t.into_inner().tenant.unwrap();
    assert!(!t.suspended);
    assert_eq!(t.phase(), TenantPhase::Provisioning);

    s.admin()
        .delete_tenant(authed(
            DeleteTenantRequest {
                tenant_id: ids[1].clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let owner = s.login("u1@example.com").await;
    expect_code(
        s.tenants()
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: ids[1].clone(),
                },
                &owner,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        s.admin()
            .delete_tenant(authed(
                DeleteTenantRequest {
                    tenant_id: ids[1].clone(),
                },
                &admin,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        s.admin()
            .suspend_tenant(authed(
                SuspendTenantRequest {
                    tenant_id: uuid::Uuid::new_v4().to_string(),
                },
                &admin,
            ))
            .await,
        Code::NotFound,
    );
    s.stop().await;
}

#[tokio::test]
async fn role_changes_and_revocation_end_sessions() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, admin, _) = s.admin_session("root@example.com").await;
    let (user_id, _) = s.signup("sam@example.com", "samco").await;
    let sam1 = s.login("sam@example.com").await;
    let sam2 = s.login("sam@example.com").await;

    let revoked = s
        .admin()
        .revoke_sessions(authed(
            RevokeSessionsRequest {
                user_id: user_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(revoked.into_inner().revoked, 2);
    for t in [&sam1, &sam2] {
        expect_code(
            s.accounts().who_am_i(authed(WhoAmIRequest {}, t)).await,
            Code::Unauthenticated,
        );
    }

    let sam = s.login("sam@example.com").await;
    // A role goes only to a user with a second factor (access.rs tests the refusal).
    s.enroll(&sam).await;
    s.admin()
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: user_id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    expect_code(
        s.accounts().who_am_i(authed(WhoAmIRequest {}, &sam)).await,
        Code::Unauthenticated,
    );
    let sam = s.login("sam@example.com").await;
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &sam))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.roles, vec!["user", "admin"]);

    s.admin()
        .revoke_admin(authed(
            RevokeAdminRequest {
                user_id: user_id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    expect_code(
        s.accounts().who_am_i(authed(WhoAmIRequest {}, &sam)).await,
        Code::Unauthenticated,
    );

    // The last admin stays.
    let st = expect_code(
        s.admin()
            .revoke_admin(authed(
                RevokeAdminRequest {
                    user_id: root_id,
                    ..Default::default()
                },
                &admin,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert!(st.message().contains("last admin"));
    assert_eq!(reason(&st), "LAST_ADMIN");
    expect_code(
        s.admin()
            .grant_admin(authed(
                GrantAdminRequest {
                    user_id: uuid::Uuid::new_v4().to_string(),
                    ..Default::default()
                },
                &admin,
            ))
            .await,
        Code::NotFound,
    );
    s.stop().await;
}

#[tokio::test]
async fn the_audit_log_records_security_events_without_secrets() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (user_id, tenant_id) = s.signup("tess@example.com", "tessco").await;
    expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "tess@example.com".into(),
                password: "wrong-Password-123".into(),
            })
            .await,
        Code::Unauthenticated,
    );
    for _ in 0..4 {
        let _ = s
            .accounts()
            .login(LoginRequest {
                email: "tess@example.com".into(),
                password: "wrong-Password-123".into(),
            })
            .await;
    }
    s.advance(Duration::from_secs(61));
    let token = s.login("tess@example.com").await;
    let (secret, codes) = s.enroll(&token).await;
    expect_code(
        s.mfa()
            .verify_mfa(authed(
                VerifyMfaRequest {
                    factor: Some(verify_mfa_request::Factor::Code("000000".into())),
                },
                &token,
            ))
            .await,
        Code::Unauthenticated,
    );
    s.accounts()
        .logout(authed(LogoutRequest {}, &token))
        .await
        .unwrap();

    let (_, admin, admin_secret) = s.admin_session("root@example.com").await;
    s.admin()
        .suspend_tenant(authed(
            SuspendTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let user = s.login("tess@example.com").await;
    let _ = s
        .admin()
        .list_tenants(authed(ListTenantsRequest::default(), &user))
        .await;

    let events = all_audit_events(&s, &admin).await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    for expected in [
        "signup",
        "login.failed",
        "login.locked",
        "login.succeeded",
        "mfa.enrollment.started",
        "mfa.enrolled",
        "mfa.failed",
        "logout",
        "admin.bootstrap",
        "admin.tenant.suspend",
        "admin.denied",
    ] {
        assert!(
            actions.contains(&expected),
            "missing {expected} in {actions:?}"
        );
    }
    let signup = events.iter().find(|e| e.action == "signup").unwrap();
    assert_eq!(signup.actor_user_id, user_id);
    assert_eq!(signup.target, tenant_id);
    assert_eq!(signup.source, "127.0.0.1");
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());

    let dump = format!("{events:?}");
    for secret_text in [
        PASSWORD,
        "wrong-Password-123",
        &token,
        &admin,
        &user,
        &secret,
        &admin_secret,
    ] {
        assert!(!dump.contains(secret_text), "audit log contains a secret");
    }
    for code in &codes {
        assert!(!dump.contains(code.as_str()));
    }
    let verify = s
        .admin()
        .verify_audit_log(authed(VerifyAuditLogRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(verify.ok, "{verify:?}");
    assert_eq!(verify.first_bad_sequence, 0);
    s.stop().await;
}

#[tokio::test]
async fn the_audit_log_is_append_only_and_tampering_is_found() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    for i in 0..4 {
        s.signup(&format!("v{i}@example.com"), &format!("vco-{i}"))
            .await;
    }
    let (_, admin, _) = s.admin_session("root@example.com").await;
    let store = &s.state.store;

    // The database itself refuses changes to the log.
    assert!(
        store
            .execute_raw_for_tests("UPDATE audit_events SET action = 'x' WHERE sequence = 2")
            .await
            .is_err()
    );
    assert!(
        store
            .execute_raw_for_tests("DELETE FROM audit_events WHERE sequence = 2")
            .await
            .is_err()
    );

    // Someone with full database access drops the guard and edits row 3.
    let drop_guard = if db.is_sqlite() {
        "DROP TRIGGER audit_events_no_update"
    } else {
        "DROP TRIGGER audit_events_no_change ON audit_events"
    };
    store.execute_raw_for_tests(drop_guard).await.unwrap();
    store
        .execute_raw_for_tests("UPDATE audit_events SET detail_json = '{\"email\":\"mallory@example.com\"}' WHERE sequence = 3")
        .await
        .unwrap();
    let verify = s
        .admin()
        .verify_audit_log(authed(VerifyAuditLogRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(!verify.ok);
    assert_eq!(verify.first_bad_sequence, 3);
    s.stop().await;
}
