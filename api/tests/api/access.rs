//! Least privilege: expiring role grants, the auditor role, deactivation, access reviews,
//! the access sweep and the audit filters, with the manual clock (no test sleeps: time
//! moves by `advance`, and the sweep is called as the background loop calls it).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use prost::Message as _;
use tenantry_api::access::sweep;
use tenantry_proto::v1::*;
use tonic::{Code, Status};

use crate::common::*;

const DAY: Duration = Duration::from_secs(86_400);
const DAY_MS: i64 = 86_400_000;

/// A user holding a role, with a live session that has verified TOTP.
struct Member {
    id: String,
    email: String,
    secret: String,
    token: String,
}

fn ms(ts: &Option<prost_types::Timestamp>) -> i64 {
    let ts = ts.as_ref().expect("timestamp set");
    ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000)
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Signs `email` up, enrolls TOTP, and has `admin` grant `role` for `days` (0 = default).
/// Returns the member with a fresh, stepped-up session (the grant ended the old ones).
async fn member(
    s: &TestServer,
    admin: &str,
    email: &str,
    role: AdminRole,
    days: u32,
) -> (Member, GrantAdminResponse) {
    let tenant = email.split('@').next().unwrap().to_owned() + "co";
    let (id, _) = s.signup(email, &tenant).await;
    let token = s.login(email).await;
    let (secret, _) = s.enroll(&token).await;
    let granted = s
        .admin()
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: id.clone(),
                role: role.into(),
                expires_in_days: days,
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let token = relogin(s, email, &secret).await;
    (
        Member {
            id,
            email: email.to_owned(),
            secret,
            token,
        },
        granted,
    )
}

/// A new session for `email` that has just verified a TOTP code.
async fn relogin(s: &TestServer, email: &str, secret: &str) -> String {
    let token = s.login(email).await;
    s.step_up(&token, secret).await;
    token
}

async fn list_users(s: &TestServer, token: &str, filter: &str, page_size: u32) -> Vec<User> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = s
            .admin()
            .list_users(authed(
                ListUsersRequest {
                    page_size,
                    page_token: page_token.clone(),
                    filter: filter.into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= page_size as usize);
        out.extend(page.users);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

async fn user(s: &TestServer, token: &str, id: &str) -> User {
    list_users(s, token, "", 500)
        .await
        .into_iter()
        .find(|u| u.user_id == id)
        .unwrap()
}

async fn items(s: &TestServer, token: &str, review_id: &str) -> ListAccessReviewItemsResponse {
    s.admin()
        .list_access_review_items(authed(
            ListAccessReviewItemsRequest {
                review_id: review_id.into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn reviews(s: &TestServer, token: &str) -> Vec<AccessReview> {
    s.admin()
        .list_access_reviews(authed(ListAccessReviewsRequest::default(), token))
        .await
        .unwrap()
        .into_inner()
        .reviews
}

fn decide(
    review_id: &str,
    user_id: &str,
    decision: AccessReviewDecision,
    days: u32,
) -> DecideAccessReviewItemRequest {
    DecideAccessReviewItemRequest {
        review_id: review_id.into(),
        user_id: user_id.into(),
        role: AdminRole::Admin.into(),
        decision: decision.into(),
        note: format!("{decision:?} by the test"),
        expires_in_days: days,
    }
}

async fn assert_chain_ok(s: &TestServer, token: &str) {
    let verify = s
        .admin()
        .verify_audit_log(authed(VerifyAuditLogRequest {}, token))
        .await
        .unwrap()
        .into_inner();
    assert!(verify.ok, "{verify:?}");
}

fn detail(e: &AuditEvent) -> serde_json::Value {
    serde_json::from_str(&e.detail_json).unwrap()
}

#[tokio::test]
async fn a_grant_works_until_the_second_it_expires_and_its_expiry_is_audited_once() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, root) = root_session(&s).await;
    let (bob, granted) = member(&s, &root, "bob@example.com", AdminRole::Admin, 1).await;
    let grant = granted.grant.unwrap();
    let expires = ms(&grant.expires_at);
    assert_eq!(expires, ms(&grant.granted_at) + DAY_MS);

    // Just before the expiry: a fresh session, stepped up, one second left.
    s.advance(Duration::from_millis(
        (expires - s.now_ms() - 10 * 60_000) as u64,
    ));
    let token = relogin(&s, &bob.email, &bob.secret).await;
    s.advance(Duration::from_millis((expires - 1000 - s.now_ms()) as u64));
    assert_eq!(s.now_ms(), expires - 1000);
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &token))
        .await
        .unwrap();

    // At the expiry second it stops working: no restart, no sweep needed.
    s.advance(Duration::from_secs(1));
    for _ in 0..2 {
        let st = expect_code(
            s.admin()
                .list_tenants(authed(ListTenantsRequest::default(), &token))
                .await,
            Code::PermissionDenied,
        );
        assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED");
    }
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.roles, vec!["user"]);

    // A second grant (an auditor's) expires unseen; the sweep records it.
    let root = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    let (carol, _) = member(&s, &root, "carol@example.com", AdminRole::Auditor, 1).await;
    s.advance(DAY);
    sweep(&s.state).await.unwrap();
    sweep(&s.state).await.unwrap();
    let root = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    let events = all_audit_events(&s, &root).await;
    for (who, role) in [(&bob.id, "admin"), (&carol.id, "auditor")] {
        let expired: Vec<&AuditEvent> = events
            .iter()
            .filter(|e| e.action == "admin.role.expired" && &e.target == who)
            .collect();
        assert_eq!(expired.len(), 1, "{who}: {expired:?}");
        assert_eq!(detail(expired[0])["role"], role);
        assert_eq!(expired[0].actor_user_id, "");
    }
    assert!(user(&s, &root, &bob.id).await.roles.is_empty());
    assert_chain_ok(&s, &root).await;
    s.stop().await;
}

/// The TOTP secret of the root admin of server `s` (from [`root_session`]), for tests
/// that log root in again after moving the clock past its sessions.
async fn root_secret(s: &TestServer) -> String {
    // The newest entry: a port is reused by a later test's server once an earlier one has
    // stopped, so an older entry for the same address is another server's secret.
    ROOT_SECRETS
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(addr, _)| *addr == s.addr)
        .map(|(_, secret)| secret.clone())
        .expect("root_session was called for this server")
}

static ROOT_SECRETS: std::sync::Mutex<Vec<(std::net::SocketAddr, String)>> =
    std::sync::Mutex::new(Vec::new());

/// The bootstrap admin `root@example.com`, remembered for [`root_secret`].
async fn root_session(s: &TestServer) -> (String, String) {
    let (id, token, secret) = s.admin_session("root@example.com").await;
    ROOT_SECRETS.lock().unwrap().push((s.addr, secret));
    (id, token)
}

type Call<'a> = Pin<Box<dyn Future<Output = Result<(), Status>> + Send + 'a>>;

/// Every `AdminService` rpc as `(name, is_read, call)`, each with a request that passes
/// validation where it matters (a real review id for the item listing).
fn every_admin_rpc<'a>(
    s: &'a TestServer,
    token: &'a str,
    review_id: &'a str,
) -> Vec<(&'static str, bool, Call<'a>)> {
    let some_id = || uuid::Uuid::new_v4().to_string();
    let a = || s.admin();
    let t = token;
    vec![
        (
            "ListTenants",
            true,
            Box::pin(async move {
                a().list_tenants(authed(ListTenantsRequest::default(), t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "ListUsers",
            true,
            Box::pin(async move {
                a().list_users(authed(ListUsersRequest::default(), t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "ListAuditEvents",
            true,
            Box::pin(async move {
                a().list_audit_events(authed(ListAuditEventsRequest::default(), t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "VerifyAuditLog",
            true,
            Box::pin(async move {
                a().verify_audit_log(authed(VerifyAuditLogRequest {}, t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "ListAccessReviews",
            true,
            Box::pin(async move {
                a().list_access_reviews(authed(ListAccessReviewsRequest::default(), t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "ListAccessReviewItems",
            true,
            Box::pin(async move {
                a().list_access_review_items(authed(
                    ListAccessReviewItemsRequest {
                        review_id: review_id.into(),
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "SuspendTenant",
            false,
            Box::pin(async move {
                a().suspend_tenant(authed(
                    SuspendTenantRequest {
                        tenant_id: some_id(),
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "ResumeTenant",
            false,
            Box::pin(async move {
                a().resume_tenant(authed(
                    ResumeTenantRequest {
                        tenant_id: some_id(),
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "DeleteTenant",
            false,
            Box::pin(async move {
                a().delete_tenant(authed(
                    DeleteTenantRequest {
                        tenant_id: some_id(),
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "SetTenantRetentionPolicy",
            false,
            Box::pin(async move {
                a().set_tenant_retention_policy(authed(
                    SetTenantRetentionPolicyRequest {
                        tenant_id: some_id(),
                        max_age_hours: 1,
                        max_count: 1,
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "GrantAdmin",
            false,
            Box::pin(async move {
                a().grant_admin(authed(
                    GrantAdminRequest {
                        user_id: some_id(),
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "RevokeAdmin",
            false,
            Box::pin(async move {
                a().revoke_admin(authed(
                    RevokeAdminRequest {
                        user_id: some_id(),
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "RevokeSessions",
            false,
            Box::pin(async move {
                a().revoke_sessions(authed(RevokeSessionsRequest { user_id: some_id() }, t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "DeactivateUser",
            false,
            Box::pin(async move {
                a().deactivate_user(authed(
                    DeactivateUserRequest {
                        user_id: some_id(),
                        reason: "left".into(),
                    },
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
        (
            "ReactivateUser",
            false,
            Box::pin(async move {
                a().reactivate_user(authed(ReactivateUserRequest { user_id: some_id() }, t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "StartAccessReview",
            false,
            Box::pin(async move {
                a().start_access_review(authed(StartAccessReviewRequest::default(), t))
                    .await
                    .map(drop)
            }),
        ),
        (
            "DecideAccessReviewItem",
            false,
            Box::pin(async move {
                a().decide_access_review_item(authed(
                    decide(review_id, &some_id(), AccessReviewDecision::Keep, 0),
                    t,
                ))
                .await
                .map(drop)
            }),
        ),
    ]
}

/// The rpcs `AdminService` declares, from the compiled descriptor set.
fn declared_admin_rpcs() -> BTreeSet<String> {
    let set =
        prost_types::FileDescriptorSet::decode(tenantry_proto::v1::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|svc| svc.name() == "AdminService")
        .flat_map(|svc| svc.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

#[tokio::test]
async fn the_auditor_reads_and_is_refused_every_change_of_every_rpc() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, root) = root_session(&s).await;
    let (auditor, _) = member(&s, &root, "aud@example.com", AdminRole::Auditor, 0).await;
    s.signup("plain@example.com", "plainco").await;
    let plain = s.login("plain@example.com").await;
    let review = s
        .admin()
        .start_access_review(authed(StartAccessReviewRequest::default(), &root))
        .await
        .unwrap()
        .into_inner()
        .review
        .unwrap();

    // The table covers every rpc the contract declares, so a new rpc must be classified.
    let table = every_admin_rpc(&s, &auditor.token, &review.review_id);
    let named: BTreeSet<String> = table.iter().map(|(n, _, _)| (*n).to_owned()).collect();
    assert_eq!(named, declared_admin_rpcs());
    let reads: BTreeSet<&str> = table.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert_eq!(
        reads,
        BTreeSet::from([
            "ListTenants",
            "ListUsers",
            "ListAuditEvents",
            "VerifyAuditLog",
            "ListAccessReviews",
            "ListAccessReviewItems",
        ])
    );

    for (name, is_read, call) in table {
        let result = call.await;
        if is_read {
            assert!(result.is_ok(), "auditor refused {name}: {result:?}");
        } else {
            let st = expect_code(result, Code::PermissionDenied);
            assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED", "{name}");
        }
    }
    // A user without a role is refused everything, reads included.
    for (name, _, call) in every_admin_rpc(&s, &plain, &review.review_id) {
        let st = expect_code(call.await, Code::PermissionDenied);
        assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED", "{name}");
    }
    // The auditor role needs the step-up like the admin role.
    let fresh = s.login(&auditor.email).await;
    let st = expect_code(
        s.admin()
            .list_users(authed(ListUsersRequest::default(), &fresh))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "MFA_REQUIRED");
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &auditor.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.roles, vec!["user", "auditor"]);

    // Every refusal is in the log, and nothing changed.
    let events = all_audit_events(&s, &root).await;
    let denied = events
        .iter()
        .filter(|e| {
            e.action == "admin.denied"
                && e.actor_user_id == auditor.id
                && detail(e)["reason"] == "ADMIN_ROLE_REQUIRED"
        })
        .count();
    assert_eq!(denied, 11);
    assert!(!events.iter().any(|e| e.actor_user_id == auditor.id
        && e.outcome == "success"
        && !e.action.ends_with(".list")
        && !e.action.ends_with(".verify")
        && !e.action.ends_with(".show")
        && e.action.starts_with("admin.")));
    s.stop().await;
}

#[tokio::test]
async fn granting_needs_a_second_factor_and_a_new_role_opens_a_review() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    let (nina, _) = s.signup("nina@example.com", "ninaco").await;
    let grant = |days: u32, role: AdminRole| {
        authed(
            GrantAdminRequest {
                user_id: nina.clone(),
                role: role.into(),
                expires_in_days: days,
            },
            &root,
        )
    };
    let st = expect_code(
        s.admin().grant_admin(grant(0, AdminRole::Admin)).await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&st), "MFA_NOT_ENROLLED");

    let token = s.login("nina@example.com").await;
    s.enroll(&token).await;
    let st = expect_code(
        s.admin().grant_admin(grant(91, AdminRole::Admin)).await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&st), "expires_in_days");

    let now = s.now_ms();
    let first = s
        .admin()
        .grant_admin(grant(0, AdminRole::Auditor))
        .await
        .unwrap()
        .into_inner();
    let g = first.grant.unwrap();
    assert_eq!(g.role(), AdminRole::Auditor);
    assert_eq!(g.granted_by_user_id, root_id);
    assert_eq!(ms(&g.expires_at), now + 90 * DAY_MS, "0 means 90 days");
    // The grant ended the user's sessions.
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await,
        Code::Unauthenticated,
    );
    // A role new to the user opens a one-item review due in 7 days.
    assert!(!first.review_id.is_empty());
    let review = items(&s, &root, &first.review_id).await;
    let summary = review.review.unwrap();
    assert_eq!(summary.trigger(), AccessReviewTrigger::RoleChange);
    assert_eq!(summary.items, 1);
    assert_eq!(ms(&summary.due_at), now + 7 * DAY_MS);
    assert_eq!(review.items[0].user_id, nina);
    assert_eq!(review.items[0].role(), AdminRole::Auditor);

    // Renewing the same role opens none.
    s.advance(Duration::from_secs(60));
    let again = s
        .admin()
        .grant_admin(grant(30, AdminRole::Auditor))
        .await
        .unwrap()
        .into_inner();
    assert!(again.review_id.is_empty());
    assert_eq!(
        ms(&again.grant.unwrap().expires_at),
        s.now_ms() + 30 * DAY_MS
    );

    // Nobody grants themselves a role (it would make expiry meaningless).
    let st = expect_code(
        s.admin()
            .grant_admin(authed(
                GrantAdminRequest {
                    user_id: root_id.clone(),
                    ..Default::default()
                },
                &root,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "SELF_GRANT");
    let events = all_audit_events(&s, &root).await;
    let grants: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.action == "admin.role.grant")
        .collect();
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0].target, nina);
    assert_eq!(detail(grants[0])["role"], "auditor");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "admin.access_review.start")
            .count(),
        1
    );
    s.stop().await;
}

#[tokio::test]
async fn a_server_with_a_lower_max_grant_days_caps_grants_and_defaults_to_it() {
    let db = Database::new().await;
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec!["--max-grant-days".into(), "30".into()],
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    let (_, root) = root_session(&s).await;
    let (m, granted) = member(&s, &root, "max@example.com", AdminRole::Auditor, 0).await;
    let g = granted.grant.unwrap();
    assert_eq!(ms(&g.expires_at) - ms(&g.granted_at), 30 * DAY_MS);
    let st = expect_code(
        s.admin()
            .grant_admin(authed(
                GrantAdminRequest {
                    user_id: m.id.clone(),
                    role: AdminRole::Auditor.into(),
                    expires_in_days: 31,
                },
                &root,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&st), "expires_in_days");
    s.stop().await;
}

#[tokio::test]
async fn undecided_items_are_revoked_at_the_due_time_and_not_before() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    let (alice, _) = member(&s, &root, "alice@example.com", AdminRole::Admin, 0).await;
    let (bob, _) = member(&s, &root, "bob@example.com", AdminRole::Admin, 0).await;
    let review = s
        .admin()
        .start_access_review(authed(StartAccessReviewRequest { due_in_days: 1 }, &root))
        .await
        .unwrap()
        .into_inner()
        .review
        .unwrap();
    assert_eq!(review.trigger(), AccessReviewTrigger::Manual);
    assert_eq!(review.items, 3);
    assert_eq!(review.undecided, 3);
    let due = ms(&review.due_at);
    assert_eq!(due, ms(&review.started_at) + DAY_MS);

    s.admin()
        .decide_access_review_item(authed(
            decide(&review.review_id, &alice.id, AccessReviewDecision::Keep, 0),
            &root,
        ))
        .await
        .unwrap();
    s.admin()
        .decide_access_review_item(authed(
            decide(&review.review_id, &root_id, AccessReviewDecision::Keep, 0),
            &alice.token,
        ))
        .await
        .unwrap();

    // Bob logs in shortly before the due time; nobody decides his grant.
    s.advance(Duration::from_millis(
        (due - s.now_ms() - 5 * 60_000) as u64,
    ));
    let bob_token = relogin(&s, &bob.email, &bob.secret).await;
    s.advance(Duration::from_millis((due - 1000 - s.now_ms()) as u64));
    sweep(&s.state).await.unwrap();
    s.admin()
        .list_tenants(authed(ListTenantsRequest::default(), &bob_token))
        .await
        .expect("one second before the due time the grant still works");

    s.advance(Duration::from_secs(1));
    assert_eq!(s.now_ms(), due);
    sweep(&s.state).await.unwrap();
    // Bob's session ended and his grant is gone.
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &bob_token))
            .await,
        Code::Unauthenticated,
    );
    let root = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    assert!(user(&s, &root, &bob.id).await.roles.is_empty());
    assert_eq!(user(&s, &root, &alice.id).await.roles.len(), 1);

    let shown = items(&s, &root, &review.review_id).await;
    let summary = shown.review.unwrap();
    assert_eq!(ms(&summary.closed_at), due);
    assert_eq!(
        (
            summary.kept,
            summary.revoked,
            summary.expired,
            summary.undecided
        ),
        (2, 0, 1, 0)
    );
    let bobs = shown.items.iter().find(|i| i.user_id == bob.id).unwrap();
    assert_eq!(bobs.decision(), AccessReviewDecision::Expired);
    assert_eq!(bobs.decided_by_user_id, "");

    let events = all_audit_events(&s, &root).await;
    let close: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.action == "admin.access_review.close" && e.target == review.review_id)
        .collect();
    assert_eq!(close.len(), 1);
    let counts = detail(close[0]);
    assert_eq!(
        (&counts["kept"], &counts["revoked"], &counts["expired"]),
        (&2.into(), &0.into(), &1.into())
    );
    let decisions = events
        .iter()
        .filter(|e| e.action == "admin.access_review.decide" && e.target == review.review_id)
        .count();
    assert_eq!(decisions, 3, "two by reviewers, one expired");
    assert_chain_ok(&s, &root).await;

    // Deciding in a closed review is refused.
    let st = expect_code(
        s.admin()
            .decide_access_review_item(authed(
                decide(&review.review_id, &bob.id, AccessReviewDecision::Keep, 0),
                &root,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert!(st.message().contains("closed"), "{st:?}");
    s.stop().await;
}

#[tokio::test]
async fn nobody_decides_their_own_grant_and_every_decision_is_audited() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    let (alice, _) = member(&s, &root, "alice@example.com", AdminRole::Admin, 0).await;
    let (aud, _) = member(&s, &root, "aud@example.com", AdminRole::Auditor, 0).await;
    let review = s
        .admin()
        .start_access_review(authed(StartAccessReviewRequest::default(), &root))
        .await
        .unwrap()
        .into_inner()
        .review
        .unwrap();
    assert_eq!(ms(&review.due_at), ms(&review.started_at) + 14 * DAY_MS);
    let id = review.review_id.clone();

    let st = expect_code(
        s.admin()
            .decide_access_review_item(authed(
                decide(&id, &root_id, AccessReviewDecision::Keep, 0),
                &root,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "SELF_REVIEW");
    // Unknown reviews and items are not found; a bad decision is invalid.
    expect_code(
        s.admin()
            .list_access_review_items(authed(
                ListAccessReviewItemsRequest {
                    review_id: uuid::Uuid::new_v4().to_string(),
                },
                &root,
            ))
            .await,
        Code::NotFound,
    );
    expect_code(
        s.admin()
            .decide_access_review_item(authed(
                decide(
                    &id,
                    &uuid::Uuid::new_v4().to_string(),
                    AccessReviewDecision::Keep,
                    0,
                ),
                &root,
            ))
            .await,
        Code::NotFound,
    );
    let mut bad = decide(&id, &alice.id, AccessReviewDecision::Expired, 0);
    let st = expect_code(
        s.admin()
            .decide_access_review_item(authed(bad.clone(), &root))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&st), "decision");
    bad.decision = AccessReviewDecision::Keep.into();
    bad.expires_in_days = 91;
    expect_code(
        s.admin()
            .decide_access_review_item(authed(bad, &root))
            .await,
        Code::InvalidArgument,
    );

    // KEEP extends from now by the given days.
    s.advance(Duration::from_secs(600));
    let kept = s
        .admin()
        .decide_access_review_item(authed(
            decide(&id, &alice.id, AccessReviewDecision::Keep, 10),
            &root,
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(kept.decision(), AccessReviewDecision::Keep);
    assert_eq!(kept.decided_by_user_id, root_id);
    let alice_grant = user(&s, &root, &alice.id).await.roles[0].clone();
    assert_eq!(ms(&alice_grant.expires_at), s.now_ms() + 10 * DAY_MS);
    // Twice is refused.
    expect_code(
        s.admin()
            .decide_access_review_item(authed(
                decide(&id, &alice.id, AccessReviewDecision::Revoke, 0),
                &root,
            ))
            .await,
        Code::FailedPrecondition,
    );
    // REVOKE removes the auditor's grant and ends their sessions.
    let mut revoke = decide(&id, &aud.id, AccessReviewDecision::Revoke, 0);
    revoke.role = AdminRole::Auditor.into();
    s.admin()
        .decide_access_review_item(authed(revoke, &alice.token))
        .await
        .unwrap();
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &aud.token))
            .await,
        Code::Unauthenticated,
    );
    assert!(user(&s, &root, &aud.id).await.roles.is_empty());
    // The last decision (alice on root) closes the review.
    s.admin()
        .decide_access_review_item(authed(
            decide(&id, &root_id, AccessReviewDecision::Keep, 0),
            &alice.token,
        ))
        .await
        .unwrap();
    let summary = items(&s, &root, &id).await.review.unwrap();
    assert!(summary.closed_at.is_some());
    assert_eq!((summary.kept, summary.revoked, summary.expired), (2, 1, 0));

    let events = all_audit_events(&s, &root).await;
    let decided: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.action == "admin.access_review.decide" && e.target == id)
        .map(detail)
        .collect();
    assert_eq!(decided.len(), 3);
    assert_eq!(decided[1]["decision"], "revoke");
    assert_eq!(decided[1]["user_id"], aud.id.as_str());
    assert!(events.iter().any(|e| e.action == "admin.denied"
        && detail(e)["reason"] == "SELF_REVIEW"
        && e.actor_user_id == root_id));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "admin.access_review.close" && e.target == id)
            .count(),
        1
    );
    assert_chain_ok(&s, &root).await;

    // Newest first.
    s.advance(Duration::from_secs(1));
    let newer = s
        .admin()
        .start_access_review(authed(StartAccessReviewRequest { due_in_days: 90 }, &root))
        .await
        .unwrap()
        .into_inner()
        .review
        .unwrap();
    let listed = reviews(&s, &root).await;
    assert_eq!(listed[0].review_id, newer.review_id);
    let page = s
        .admin()
        .list_access_reviews(authed(
            ListAccessReviewsRequest {
                page_size: 1,
                page_token: String::new(),
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.reviews.len(), 1);
    let rest = s
        .admin()
        .list_access_reviews(authed(
            ListAccessReviewsRequest {
                page_size: 500,
                page_token: page.next_page_token,
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.reviews.len(), listed.len() - 1);
    assert!(rest.reviews.iter().all(|r| r.review_id != newer.review_id));
    expect_code(
        s.admin()
            .start_access_review(authed(StartAccessReviewRequest { due_in_days: 91 }, &root))
            .await,
        Code::InvalidArgument,
    );
    s.stop().await;
}

#[tokio::test]
async fn a_deactivated_user_logs_in_exactly_like_a_wrong_password() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, root) = root_session(&s).await;
    let (dave, _) = member(&s, &root, "dave@example.com", AdminRole::Auditor, 0).await;
    s.signup("erin@example.com", "erinco").await;

    let done = s
        .admin()
        .deactivate_user(authed(
            DeactivateUserRequest {
                user_id: dave.id.clone(),
                reason: "left the company".into(),
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.sessions_revoked, 1);
    let shown = done.user.unwrap();
    assert_eq!(shown.status(), UserStatus::Deactivated);
    assert_eq!(shown.deactivation_reason, "left the company");
    assert!(shown.roles.is_empty());
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &dave.token))
            .await,
        Code::Unauthenticated,
    );

    // The right password of a deactivated user against a wrong password of an active one.
    // Timing class, asserted structurally rather than by a stopwatch: both answers come
    // after exactly one password verification (the argon2 run that dominates the time),
    // because the deactivated path verifies the stored hash and then takes the same
    // wrong-password branch. Durations on a shared CI machine would make a flaky test.
    let login = |email: &str, password: &str| {
        let req = LoginRequest {
            email: email.into(),
            password: password.into(),
        };
        let mut client = s.accounts();
        async move { client.login(req).await }
    };
    let checks = s.state.password_checks();
    let wrong = expect_code(
        login("erin@example.com", "wrong-Password-123").await,
        Code::Unauthenticated,
    );
    assert_eq!(s.state.password_checks(), checks + 1);
    let shut_out = expect_code(
        login("dave@example.com", PASSWORD).await,
        Code::Unauthenticated,
    );
    assert_eq!(s.state.password_checks(), checks + 2);
    let shut_out_wrong = expect_code(
        login("dave@example.com", "wrong-Password-123").await,
        Code::Unauthenticated,
    );
    assert_eq!(s.state.password_checks(), checks + 3);
    for other in [&shut_out, &shut_out_wrong] {
        assert_eq!(other.code(), wrong.code());
        assert_eq!(other.message(), wrong.message());
        assert_eq!(other.details(), wrong.details());
        assert_eq!(reason(other), "INVALID_CREDENTIALS");
    }
    // The audit rows have the same shape: same action, outcome, fields.
    let events = all_audit_events(&s, &root).await;
    let failed: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.action == "login.failed")
        .collect();
    assert_eq!(failed.len(), 3);
    let keys = |e: &AuditEvent| {
        detail(e)
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    for e in &failed[1..] {
        assert_eq!(e.outcome, failed[0].outcome);
        assert_eq!(keys(e), keys(failed[0]));
        assert_eq!(e.actor_user_id, dave.id);
        assert_eq!(e.target, "dave@example.com");
    }
    let deactivate = events
        .iter()
        .find(|e| e.action == "admin.user.deactivate")
        .unwrap();
    assert_eq!(deactivate.target, dave.id);
    assert_eq!(detail(deactivate)["reason"], "left the company");

    // Reactivation lets the user in again, without the role.
    expect_code(
        s.admin()
            .reactivate_user(authed(
                ReactivateUserRequest {
                    user_id: uuid::Uuid::new_v4().to_string(),
                },
                &root,
            ))
            .await,
        Code::NotFound,
    );
    let back = s
        .admin()
        .reactivate_user(authed(
            ReactivateUserRequest {
                user_id: dave.id.clone(),
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(back.status(), UserStatus::Active);
    assert!(back.roles.is_empty());
    assert!(back.deactivated_at.is_none());
    let token = s.login("dave@example.com").await;
    let me = s
        .accounts()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.roles, vec!["user"]);
    s.step_up(&token, &dave.secret).await;
    let st = expect_code(
        s.admin()
            .list_users(authed(ListUsersRequest::default(), &token))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED");
    expect_code(
        s.admin()
            .reactivate_user(authed(
                ReactivateUserRequest {
                    user_id: dave.id.clone(),
                },
                &root,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        count_events(&s, &root, "admin.user.reactivate").await,
        1,
        "reactivation is audited"
    );
    s.stop().await;
}

async fn count_events(s: &TestServer, token: &str, action: &str) -> usize {
    all_audit_events(s, token)
        .await
        .iter()
        .filter(|e| e.action == action)
        .count()
}

#[tokio::test]
async fn the_last_admin_cannot_be_deactivated_or_revoked() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    let (aud, _) = member(&s, &root, "aud@example.com", AdminRole::Auditor, 0).await;
    for call in [
        s.admin()
            .deactivate_user(authed(
                DeactivateUserRequest {
                    user_id: root_id.clone(),
                    reason: "oops".into(),
                },
                &root,
            ))
            .await
            .map(drop),
        s.admin()
            .revoke_admin(authed(
                RevokeAdminRequest {
                    user_id: root_id.clone(),
                    role: AdminRole::Admin.into(),
                },
                &root,
            ))
            .await
            .map(drop),
    ] {
        let st = expect_code(call, Code::FailedPrecondition);
        assert_eq!(reason(&st), "LAST_ADMIN");
    }
    // Nothing changed: root still works, and is active.
    let me = user(&s, &root, &root_id).await;
    assert_eq!(me.status(), UserStatus::Active);
    assert_eq!(me.roles.len(), 1);
    expect_code(
        s.admin()
            .deactivate_user(authed(
                DeactivateUserRequest {
                    user_id: aud.id.clone(),
                    reason: String::new(),
                },
                &root,
            ))
            .await,
        Code::InvalidArgument,
    );
    // An auditor is not an admin: revoking the auditor role works.
    s.admin()
        .revoke_admin(authed(
            RevokeAdminRequest {
                user_id: aud.id.clone(),
                role: AdminRole::Auditor.into(),
            },
            &root,
        ))
        .await
        .unwrap();
    assert!(user(&s, &root, &aud.id).await.roles.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_review_that_fails_closed_on_the_last_admin_is_recovered_by_bootstrap() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    let review = s
        .admin()
        .start_access_review(authed(StartAccessReviewRequest { due_in_days: 1 }, &root))
        .await
        .unwrap()
        .into_inner()
        .review
        .unwrap();
    // The only admin cannot decide their own grant; at the due time it is revoked.
    s.advance(DAY);
    sweep(&s.state).await.unwrap();
    let token = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    let st = expect_code(
        s.admin()
            .list_users(authed(ListUsersRequest::default(), &token))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "ADMIN_ROLE_REQUIRED");

    // The operator's way back: `tenantry-api bootstrap-admin` with database access.
    let outcome = tenantry_api::server::bootstrap_admin(
        &s.db_args,
        "root@example.com",
        &secrecy::SecretString::from(PASSWORD.to_owned()),
        &s.clock,
    )
    .await
    .unwrap();
    assert_eq!(
        outcome,
        tenantry_api::server::Bootstrap::Promoted {
            user_id: root_id.clone()
        }
    );
    let token = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    let me = user(&s, &token, &root_id).await;
    assert_eq!(me.roles[0].granted_by_user_id, "");
    assert_eq!(
        ms(&me.roles[0].expires_at),
        s.now_ms() - 30_000 + 90 * DAY_MS
    );
    let summary = items(&s, &token, &review.review_id).await.review.unwrap();
    assert_eq!(summary.expired, 1);
    s.stop().await;
}

#[tokio::test]
async fn the_sweep_starts_a_scheduled_review_when_the_interval_has_passed() {
    let db = Database::new().await;
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec!["--access-review-interval".into(), "30d".into()],
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    let (root_id, root) = root_session(&s).await;
    let me = user(&s, &root, &root_id).await;
    // Before the first review the interval counts from the oldest grant.
    let anchor = ms(&me.roles[0].granted_at);
    let scheduled = |all: Vec<AccessReview>| {
        all.into_iter()
            .filter(|r| r.trigger() == AccessReviewTrigger::Scheduled)
            .collect::<Vec<_>>()
    };

    s.advance(Duration::from_millis(
        (anchor + 30 * DAY_MS - 1000 - s.now_ms()) as u64,
    ));
    sweep(&s.state).await.unwrap();
    let stored = s.state.store.list_reviews(None, 100).await.unwrap();
    assert!(stored.is_empty(), "{stored:?}");

    s.advance(Duration::from_secs(1));
    sweep(&s.state).await.unwrap();
    sweep(&s.state).await.unwrap();
    let root = relogin(&s, "root@example.com", &root_secret(&s).await).await;
    let found = scheduled(reviews(&s, &root).await);
    assert_eq!(found.len(), 1, "{found:?}");
    let review = &found[0];
    assert_eq!(review.started_by_user_id, "");
    assert_eq!(review.items, 1);
    assert_eq!(ms(&review.due_at), ms(&review.started_at) + 14 * DAY_MS);
    let item = &items(&s, &root, &review.review_id).await.items[0];
    assert_eq!(item.user_id, root_id);
    assert_eq!(item.email, "root@example.com");
    assert_eq!(item.granted_by_user_id, "");
    let events = all_audit_events(&s, &root).await;
    let start = events
        .iter()
        .find(|e| e.action == "admin.access_review.start" && e.target == review.review_id)
        .unwrap();
    assert_eq!(detail(start)["trigger"], "scheduled");
    assert_eq!(start.source, "server");
    s.stop().await;
}

#[tokio::test]
async fn list_users_filters_and_pages() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, root) = root_session(&s).await;
    s.advance(Duration::from_millis(5));
    let (aud, _) = member(&s, &root, "aud@example.com", AdminRole::Auditor, 0).await;
    s.advance(Duration::from_millis(5));
    let (u1, _) = s.signup("Una@Example.com", "unaco").await;
    s.advance(Duration::from_millis(5));
    let (u2, _) = s.signup("vic@example.com", "vicco").await;
    s.advance(Duration::from_millis(5));
    let (u3, _) = s.signup("wes@example.com", "wesco").await;
    let wes = s.login("wes@example.com").await;
    s.admin()
        .deactivate_user(authed(
            DeactivateUserRequest {
                user_id: u3.clone(),
                reason: "left".into(),
            },
            &root,
        ))
        .await
        .unwrap();
    drop(wes);

    let ids = |users: Vec<User>| users.into_iter().map(|u| u.user_id).collect::<Vec<_>>();
    let everyone = vec![
        root_id.clone(),
        aud.id.clone(),
        u1.clone(),
        u2.clone(),
        u3.clone(),
    ];
    assert_eq!(ids(list_users(&s, &root, "", 500).await), everyone);
    assert_eq!(ids(list_users(&s, &root, "", 2).await), everyone);
    for (filter, want) in [
        ("role=admin", vec![root_id.clone()]),
        ("role=auditor", vec![aud.id.clone()]),
        ("role=none", vec![u1.clone(), u2.clone(), u3.clone()]),
        ("status=deactivated", vec![u3.clone()]),
        ("status=active role=none", vec![u1.clone(), u2.clone()]),
        ("email=UNA@", vec![u1.clone()]),
        ("email=example.com status=active", everyone[..4].to_vec()),
        ("email=%", vec![]),
    ] {
        assert_eq!(
            ids(list_users(&s, &root, filter, 1).await),
            want,
            "{filter}"
        );
    }
    for bad in [
        "name=x",
        "role=root",
        "status=",
        "email",
        "role=admin role=none",
    ] {
        let st = expect_code(
            s.admin()
                .list_users(authed(
                    ListUsersRequest {
                        filter: bad.into(),
                        ..Default::default()
                    },
                    &root,
                ))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violated_field(&st), "filter", "{bad}");
    }
    expect_code(
        s.admin()
            .list_users(authed(
                ListUsersRequest {
                    page_token: "garbage".into(),
                    ..Default::default()
                },
                &root,
            ))
            .await,
        Code::InvalidArgument,
    );

    let all = list_users(&s, &root, "", 500).await;
    let root_user = &all[0];
    assert_eq!(root_user.email, "root@example.com");
    assert!(root_user.mfa_enrolled);
    assert!(root_user.last_login_at.is_some());
    assert_eq!(root_user.status(), UserStatus::Active);
    let grant = &root_user.roles[0];
    assert_eq!(grant.role(), AdminRole::Admin);
    assert_eq!(grant.granted_by_user_id, "", "the bootstrap admin");
    assert_eq!(ms(&grant.expires_at), ms(&grant.granted_at) + 90 * DAY_MS);
    assert_eq!(ms(&root_user.created_at), T0_MS);
    let aud_user = &all[1];
    assert_eq!(aud_user.roles[0].granted_by_user_id, root_id);
    let una = &all[2];
    assert_eq!(una.email, "una@example.com");
    assert!(!una.mfa_enrolled);
    assert!(una.last_login_at.is_none(), "never logged in");
    let wes = &all[4];
    assert_eq!(wes.status(), UserStatus::Deactivated);
    assert!(wes.last_login_at.is_some());
    assert!(wes.deactivated_at.is_some());
    s.stop().await;
}

#[tokio::test]
async fn audit_events_filter_by_time_action_actor_and_target_and_page() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let mut users = Vec::new();
    for i in 0..5 {
        s.advance(Duration::from_secs(60));
        users.push(
            s.signup(&format!("f{i}@example.com"), &format!("fco-{i}"))
                .await,
        );
    }
    let (root_id, root) = root_session(&s).await;
    let snapshot = all_audit_events(&s, &root).await;
    let last = snapshot.last().unwrap().sequence;
    let at = |i: usize| {
        snapshot
            .iter()
            .find(|e| e.action == "signup" && e.actor_user_id == users[i].0)
            .map(|e| ms(&e.time))
            .unwrap()
    };

    let fetch = |req: ListAuditEventsRequest| {
        let token = root.clone();
        let s = &s;
        async move {
            let mut out = Vec::new();
            let mut req = req;
            loop {
                let page = s
                    .admin()
                    .list_audit_events(authed(req.clone(), &token))
                    .await
                    .unwrap()
                    .into_inner();
                let limit = if req.page_size == 0 {
                    100
                } else {
                    req.page_size
                };
                assert!(page.events.len() <= limit as usize);
                out.extend(page.events.into_iter().filter(|e| e.sequence <= last));
                if page.next_page_token.is_empty() {
                    return out;
                }
                req.page_token = page.next_page_token;
            }
        }
    };
    type Keep<'a> = Box<dyn Fn(&AuditEvent) -> bool + 'a>;
    let cases: Vec<(ListAuditEventsRequest, Keep<'_>)> = vec![
        (
            ListAuditEventsRequest {
                since: Some(ts(at(1))),
                until: Some(ts(at(3))),
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| ms(&e.time) >= at(1) && ms(&e.time) < at(3)),
        ),
        (
            ListAuditEventsRequest {
                since: Some(ts(at(4))),
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| ms(&e.time) >= at(4)),
        ),
        (
            ListAuditEventsRequest {
                action_prefix: "admin.".into(),
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| e.action.starts_with("admin.")),
        ),
        (
            ListAuditEventsRequest {
                action_prefix: "sign".into(),
                page_size: 2,
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| e.action.starts_with("sign")),
        ),
        (
            ListAuditEventsRequest {
                actor_user_id: users[2].0.clone(),
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| e.actor_user_id == users[2].0),
        ),
        (
            ListAuditEventsRequest {
                target: users[3].1.clone(),
                page_size: 1,
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| e.target == users[3].1),
        ),
        (
            ListAuditEventsRequest {
                actor_user_id: root_id.clone(),
                action_prefix: "login.".into(),
                since: Some(ts(at(0))),
                page_size: 1,
                ..Default::default()
            },
            Box::new(|e: &AuditEvent| {
                e.actor_user_id == root_id && e.action.starts_with("login.") && ms(&e.time) >= at(0)
            }),
        ),
    ];
    for (req, keep) in cases {
        let want: Vec<u64> = snapshot
            .iter()
            .filter(|e| keep(e))
            .map(|e| e.sequence)
            .collect();
        assert!(!want.is_empty(), "{req:?} selects something");
        let got: Vec<u64> = fetch(req.clone())
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(got, want, "{req:?}");
    }
    // The action prefix is literal: `%` and `_` are not wildcards.
    assert!(
        fetch(ListAuditEventsRequest {
            action_prefix: "%".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    let st = expect_code(
        s.admin()
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    since: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: -1,
                    }),
                    ..Default::default()
                },
                &root,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violated_field(&st), "since");
    s.stop().await;
}

#[tokio::test]
async fn existing_admins_become_grants_that_expire_ninety_days_after_the_migration() {
    use sqlx::Connection as _;
    let db = Database::new().await;
    // A database as version 2 left it, with one admin and one plain user.
    let mut conn = db.at_version(2).await;
    sqlx::raw_sql(
        "INSERT INTO users (id, email, password_hash, is_admin, created_at_ms) VALUES \
         ('u-admin', 'old-admin@example.com', 'x', 1, 1), ('u-plain', 'plain@example.com', 'x', 0, 2)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let before = tenantry_api::clock::Clock::now_ms(&tenantry_api::clock::SystemClock);
    let store = tenantry_api::store::Store::connect(&db.url, 2)
        .await
        .unwrap();
    let after = tenantry_api::clock::Clock::now_ms(&tenantry_api::clock::SystemClock);
    let grants = store.grants_of("u-admin", before).await.unwrap();
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g.role, tenantry_api::access::Role::Admin);
    assert_eq!(g.granted_by, "");
    assert!(
        (before - 1000..=after + 1000).contains(&g.granted_at_ms),
        "granted at the migration: {g:?}"
    );
    assert_eq!(g.expires_at_ms - g.granted_at_ms, 90 * DAY_MS);
    assert!(store.grants_of("u-plain", before).await.unwrap().is_empty());
    let user = store.user_by_id("u-admin").await.unwrap().unwrap();
    assert!(user.is_active());
    assert!(user.last_login_at_ms.is_none());
    store.close().await;
}

#[tokio::test]
async fn the_server_sweeps_when_it_starts() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (root_id, _) = root_session(&s).await;
    s.stop().await;
    // The next start is past the bootstrap grant's 90 days: the access loop's first pass
    // (at start, before its first one-minute wait) records the expiry without any call.
    let later = tenantry_api::clock::ManualClock::new(T0_MS + 91 * DAY_MS);
    let s = TestServer::start_with(&db, Options::default(), later).await;
    let mut expired = 0;
    for _ in 0..200 {
        let rows = s.state.store.list_audit(0, 1_000).await.unwrap();
        expired = rows
            .iter()
            .filter(|r| r.entry.action == "admin.role.expired" && r.entry.target == root_id)
            .count();
        if expired > 0 {
            break;
        }
        // Waiting for the loop's start-up pass, not for a due time: the clock is manual.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(expired, 1);
    assert!(
        s.state
            .store
            .grants_of(&root_id, s.now_ms())
            .await
            .unwrap()
            .is_empty()
    );
    s.stop().await;
}

/// Every list call writes an audit event of its own: a listing one event a page must still
/// end, holding exactly the events up to the head when its first page was read.
#[tokio::test]
async fn an_audit_listing_is_a_snapshot_that_ends_at_any_page_size() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("snap@example.com", "snapco").await;
    let (_, root) = root_session(&s).await;
    let before = all_audit_events(&s, &root).await;
    let head = before.last().unwrap().sequence;

    let mut got = Vec::new();
    let mut page_token = String::new();
    for _ in 0..1_000 {
        let page = s
            .admin()
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                &root,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 1);
        got.extend(page.events.iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    // The first page was read after `all_audit_events` wrote its own event: the snapshot
    // ends there, one past `head`.
    assert_eq!(
        got,
        (1..=head + 1).collect::<Vec<u64>>(),
        "one listing, in order"
    );
    // What the listing wrote (one event a page) is in the next listing.
    let after = all_audit_events(&s, &root).await;
    assert!(after.last().unwrap().sequence >= head + 1 + got.len() as u64);

    for bad in ["17", "5.4", "x"] {
        let status = s
            .admin()
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    page_token: bad.into(),
                    ..Default::default()
                },
                &root,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
}
