//! The `kubernetes` provisioner against an in-memory Kubernetes API server (the operator's
//! fake): signup applies a `Tenant`, status comes from the watch, changes patch, deletion
//! waits for the operator's finalizer and survives a restart, failures are retried, and
//! every request is allowed by the chart's RBAC rules for the API.

use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{Value, json};
use tenantry_api::clock::ManualClock;
use tenantry_api::provision::reconcile_all;
use tenantry_operator::fake_api::{Access, FakeApi, unused_grants};
use tenantry_proto::v1::*;
use tonic::Code;

use crate::common::*;

const TENANTS: &str = "/apis/tenantry.dev/v1alpha1/tenants";

fn tenant_path(name: &str) -> String {
    format!("{TENANTS}/{name}")
}

async fn start(db: &Database, fake: &FakeApi) -> TestServer {
    TestServer::start_with(
        db,
        Options {
            extra_args: vec![
                "--provisioner".into(),
                "kubernetes".into(),
                "--tenant-domain".into(),
                "tenants.example.com".into(),
            ],
            kube_client: Some(fake.client()),
        },
        ManualClock::new(T0_MS),
    )
    .await
}

/// Waits (up to 10 s) until `check` holds; the watch and the background apply are async.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let held = tenantry_test_support::eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        check,
    )
    .await;
    assert!(held, "timed out waiting until {what}");
}

fn api_rules() -> Vec<PolicyRule> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tenantry/rbac/api-cluster-rules.yaml"
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every request the API made is allowed by the chart's ClusterRole for the API.
fn assert_allowed_by_chart(fake: &FakeApi) -> Vec<Access> {
    let accesses = fake.accesses();
    assert!(!accesses.is_empty());
    let rules = api_rules();
    let denied: Vec<&Access> = accesses.iter().filter(|a| !a.allowed_by(&rules)).collect();
    assert!(
        denied.is_empty(),
        "charts/tenantry/rbac/api-cluster-rules.yaml does not allow: {denied:#?}"
    );
    accesses
}

fn ready_status() -> Value {
    json!({
        "phase": "Ready",
        "observedGeneration": 1,
        "namespace": "tenant-acme",
        "endpoint": "https://acme.tenants.example.com",
        "certificate": {"serial": "5eed", "notAfter": "2026-04-01T00:00:00Z",
                        "renewalTime": "2026-03-02T00:00:00Z"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    })
}

#[tokio::test]
async fn signup_applies_a_tenant_and_status_comes_from_the_watch() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    let (user_id, tenant_id) = s.signup("owner@example.com", "acme").await;
    let token = s.login("owner@example.com").await;

    eventually("the Tenant exists", || async {
        fake.get(&tenant_path("acme")).is_some()
    })
    .await;
    let t = fake.get(&tenant_path("acme")).unwrap();
    assert_eq!(t["metadata"]["labels"]["tenantry.dev/tenant-id"], tenant_id);
    assert_eq!(
        t["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "tenantry-api"
    );
    assert_eq!(
        t["spec"],
        json!({
            "displayName": "acme", "owner": user_id, "plan": "free", "suspended": false,
            "retention": {"maxAgeHours": 336, "maxCount": 10000},
            "tls": {"dnsNames": ["acme.tenants.example.com"]}
        })
    );
    // The watch delivers the new Tenant, still without a status, shortly after the
    // apply; until then GetTenant answers from the row signup wrote.
    eventually("the watch reports the Tenant without a status", || async {
        s.tenant(&token, &tenant_id).await.message == "waiting for the operator"
    })
    .await;
    let before = s.tenant(&token, &tenant_id).await;
    assert_eq!(before.phase(), TenantPhase::Provisioning);

    // The operator reports Ready: the API learns it from its watch, and answering
    // GetTenant reads nothing from the cluster.
    fake.edit(&tenant_path("acme"), |t| t["status"] = ready_status());
    eventually("GetTenant reports Ready", || async {
        s.tenant(&token, &tenant_id).await.phase() == TenantPhase::Ready
    })
    .await;
    fake.clear_log();
    for _ in 0..5 {
        s.tenant(&token, &tenant_id).await;
    }
    let t = s.tenant(&token, &tenant_id).await;
    assert_eq!(
        fake.log(),
        Vec::<String>::new(),
        "GetTenant read the cluster"
    );
    assert_eq!(t.endpoint, "https://acme.tenants.example.com");
    let cert = t.certificate.unwrap();
    assert_eq!(cert.serial, "5eed");
    assert_eq!(cert.not_after.unwrap().seconds, 1_775_001_600);
    assert_eq!(cert.renewal_time.unwrap().seconds, 1_772_409_600);
    assert_eq!(t.message, "");

    // An idle reconcile pass writes nothing.
    let writes = fake.writes();
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    assert_eq!(fake.writes(), writes);
    assert_allowed_by_chart(&fake);
    s.stop().await;
}

#[tokio::test]
async fn failed_creates_are_retried_until_the_tenant_exists() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    fake.fail_writes(Some(503));
    let (_, tenant_id) = s.signup("owner@example.com", "acme").await;
    let token = s.login("owner@example.com").await;
    eventually("the apply was tried", || async {
        fake.log().iter().any(|l| l.starts_with("PATCH "))
    })
    .await;
    assert!(fake.get(&tenant_path("acme")).is_none());
    // Signup itself succeeded: the account and the tenant record are kept.
    assert_eq!(
        s.tenant(&token, &tenant_id).await.phase(),
        TenantPhase::Provisioning
    );

    // Still down: the reconcile pass fails for this tenant and keeps going.
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    assert!(fake.get(&tenant_path("acme")).is_none());

    fake.fail_writes(None);
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    let t = fake
        .get(&tenant_path("acme"))
        .expect("the retry made the Tenant");
    assert_eq!(t["metadata"]["labels"]["tenantry.dev/tenant-id"], tenant_id);
    assert_allowed_by_chart(&fake);
    s.stop().await;
}

#[tokio::test]
async fn suspend_resume_and_retention_patch_the_tenant() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    let (_, tenant_id) = s.signup("owner@example.com", "acme").await;
    let owner = s.login("owner@example.com").await;
    let (_, admin, _) = s.admin_session("ops@example.com").await;
    let spec = |field: &'static str| {
        let fake = fake.clone();
        move || {
            fake.get(&tenant_path("acme"))
                .map(|t| t["spec"][field].clone())
        }
    };
    eventually("the Tenant exists", || async {
        spec("suspended")().is_some()
    })
    .await;

    s.admin()
        .suspend_tenant(authed(
            SuspendTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    eventually("spec.suspended is true", || async {
        spec("suspended")() == Some(json!(true))
    })
    .await;

    s.admin()
        .resume_tenant(authed(
            ResumeTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    eventually("spec.suspended is false", || async {
        spec("suspended")() == Some(json!(false))
    })
    .await;

    s.tenants()
        .set_retention_policy(authed(
            SetRetentionPolicyRequest {
                tenant_id: tenant_id.clone(),
                max_age_hours: 24,
                max_count: 500,
            },
            &owner,
        ))
        .await
        .unwrap();
    eventually("spec.retention changed", || async {
        spec("retention")() == Some(json!({"maxAgeHours": 24, "maxCount": 500}))
    })
    .await;

    // A `kubectl edit` of a field the API owns is undone by a reconcile pass once the
    // API's watch has seen it: the database is the source of truth.
    fake.edit(&tenant_path("acme"), |t| {
        t["spec"]["suspended"] = json!(true)
    });
    eventually("a reconcile pass undoes the edit", || async {
        reconcile_all(&s.state.store, &s.state.provisioner)
            .await
            .unwrap();
        spec("suspended")() == Some(json!(false))
    })
    .await;
    assert_allowed_by_chart(&fake);
    s.stop().await;
}

#[tokio::test]
async fn deletion_waits_for_the_operator_and_survives_a_restart() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    let (_, tenant_id) = s.signup("owner@example.com", "acme").await;
    let (_, admin, _) = s.admin_session("ops@example.com").await;
    eventually("the Tenant exists", || async {
        fake.get(&tenant_path("acme")).is_some()
    })
    .await;
    // The operator's finalizer holds the Tenant until its namespace is gone.
    fake.edit(&tenant_path("acme"), |t| {
        t["metadata"]["finalizers"] = json!(["tenantry.dev/cleanup"]);
    });

    s.admin()
        .delete_tenant(authed(
            DeleteTenantRequest {
                tenant_id: tenant_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let t = fake
        .get(&tenant_path("acme"))
        .expect("held by the finalizer");
    assert!(!t["metadata"]["deletionTimestamp"].is_null());
    let row = s.state.store.tenant(&tenant_id).await.unwrap().unwrap();
    assert_eq!(row.phase.as_str(), "Terminating");

    // The API restarts while the operator is still cleaning up.
    s.stop().await;
    let s = start(&db, &fake).await;
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    let row = s.state.store.tenant(&tenant_id).await.unwrap().unwrap();
    assert_eq!(
        row.phase.as_str(),
        "Terminating",
        "the row waits for the resource"
    );

    // The operator finishes: the Tenant disappears and the watch purges the row.
    fake.edit(&tenant_path("acme"), |t| {
        t["metadata"]["finalizers"] = json!([]);
    });
    assert!(fake.get(&tenant_path("acme")).is_none());
    eventually("the tenant row is purged", || async {
        s.state.store.tenant(&tenant_id).await.unwrap().is_none()
    })
    .await;
    let gone = s
        .admin()
        .suspend_tenant(authed(SuspendTenantRequest { tenant_id }, &admin))
        .await;
    expect_code(gone, Code::NotFound);

    // Together with the other tests' calls, these cover every right the chart grants the
    // API: none is unused.
    let accesses = assert_allowed_by_chart(&fake);
    assert_eq!(unused_grants(&api_rules(), &accesses), Vec::<String>::new());
    s.stop().await;
}

#[tokio::test]
async fn a_tenant_deleted_while_the_api_was_down_is_purged_on_start() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    let (_, tenant_id) = s.signup("owner@example.com", "acme").await;
    eventually("the Tenant exists", || async {
        fake.get(&tenant_path("acme")).is_some()
    })
    .await;
    s.state
        .store
        .mark_terminating(
            &tenant_id,
            &tenantry_api::store::AuditRecord {
                action: "tenant.delete",
                actor_user_id: String::new(),
                target: tenant_id.clone(),
                success: true,
                source: String::new(),
                detail_json: "{}".into(),
            },
            T0_MS,
        )
        .await
        .unwrap();
    s.stop().await;
    // Nobody deleted it yet; the next start does.
    let s = start(&db, &fake).await;
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    assert!(fake.get(&tenant_path("acme")).is_none());
    assert!(s.state.store.tenant(&tenant_id).await.unwrap().is_none());
    assert_allowed_by_chart(&fake);
    s.stop().await;
}

#[tokio::test]
async fn a_tenant_deleted_behind_the_apis_back_is_made_again() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let s = start(&db, &fake).await;
    let (_, tenant_id) = s.signup("owner@example.com", "acme").await;
    let token = s.login("owner@example.com").await;
    eventually("the Tenant exists", || async {
        fake.get(&tenant_path("acme")).is_some()
    })
    .await;
    fake.remove(&tenant_path("acme"));
    eventually("the tenant reports the deletion", || async {
        s.tenant(&token, &tenant_id)
            .await
            .message
            .contains("deleted outside the API")
    })
    .await;
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    assert!(fake.get(&tenant_path("acme")).is_some());
    s.stop().await;
}

#[tokio::test]
async fn a_foreign_tenant_of_the_same_name_is_never_taken_over() {
    let db = Database::new().await;
    let fake = FakeApi::new();
    let foreign = json!({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "acme", "uid": "uid-foreign"},
        "spec": {"owner": "someone-else@example.com", "plan": "enterprise"}
    });
    fake.put(&tenant_path("acme"), foreign);
    let s = start(&db, &fake).await;
    s.signup("owner@example.com", "acme").await;
    reconcile_all(&s.state.store, &s.state.provisioner)
        .await
        .unwrap();
    let t = fake.get(&tenant_path("acme")).unwrap();
    assert_eq!(t["spec"]["owner"], "someone-else@example.com");
    assert!(t["metadata"]["labels"].is_null());
    assert!(!fake.log().iter().any(|l| l.starts_with("PATCH ")));
    s.stop().await;
}

#[tokio::test]
async fn startup_fails_clearly_without_the_crd() {
    let db = Database::new().await;
    ensure_master_key(&db);
    let fake = FakeApi::new();
    fake.unserve(TENANTS);
    let args = serve_args(&db, &["--provisioner".into(), "kubernetes".into()]);
    let err = tenantry_api::server::build_state_with(
        &args,
        std::sync::Arc::new(ManualClock::new(T0_MS)),
        Some(fake.client()),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("tenants.tenantry.dev") && text.contains("charts/tenantry/crds"),
        "{text}"
    );
}

fn api_namespace_rules() -> Vec<PolicyRule> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tenantry/rbac/api-namespace-rules.yaml"
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const TOKEN_SECRET: &str = "/api/v1/namespaces/tenantry/secrets/tenantry-token-public-key";

fn secret_pem(fake: &FakeApi) -> String {
    use base64::Engine as _;
    let secret = fake.get(TOKEN_SECRET).unwrap();
    let data = secret["data"]["public.pem"].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
    .unwrap()
}

/// After a rotation the API writes the public key set into the operator's Secret, only
/// when it differs, with requests the chart's Role for the API allows (and nothing else
/// in the release namespace).
#[tokio::test]
async fn the_token_public_key_set_is_written_into_the_operators_secret() {
    use base64::Engine as _;
    let db = Database::new().await;
    ensure_master_key(&db);
    let fake = FakeApi::new();
    // The Secret as the install made it, from token-public.pem.
    let initial = std::fs::read_to_string(db.dir.path().join("token-public.pem")).unwrap();
    fake.put(
        TOKEN_SECRET,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "tenantry-token-public-key", "namespace": "tenantry"},
            "data": {"public.pem": base64::engine::general_purpose::STANDARD.encode(&initial)}
        }),
    );
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: vec![
                "--provisioner".into(),
                "kubernetes".into(),
                "--token-public-key-secret".into(),
                "tenantry-token-public-key".into(),
                "--token-public-key-secret-namespace".into(),
                "tenantry".into(),
            ],
            kube_client: Some(fake.client()),
        },
        ManualClock::new(T0_MS),
    )
    .await;
    // Unchanged at start: read, not written.
    let patches = |fake: &FakeApi| {
        fake.accesses()
            .iter()
            .filter(|a| a.resource == "secrets" && a.verb == "patch")
            .count()
    };
    assert_eq!(secret_pem(&fake), initial);
    assert_eq!(patches(&fake), 0);

    let rotation = tenantry_api::token_keys::rotate(
        &s.state.store,
        &s.state.master_key,
        tenantry_api::token_keys::DEFAULT_OVERLAP,
        tenantry_api::token_keys::min_overlap(),
        s.now_ms(),
    )
    .await
    .unwrap();
    tenantry_api::server::refresh_token_keys(&s.state).await;
    let set =
        tenantry_proto::token::TokenVerifier::from_public_key_pem(&secret_pem(&fake)).unwrap();
    assert_eq!(set.kids().len(), 2);
    assert_eq!(set.kids()[1], rotation.kid);
    assert_eq!(patches(&fake), 1);
    // An idle refresh writes nothing.
    tenantry_api::server::refresh_token_keys(&s.state).await;
    assert_eq!(patches(&fake), 1);
    // After retirement, the new key alone.
    s.advance(2 * tenantry_api::token_keys::DEFAULT_OVERLAP);
    tenantry_api::server::refresh_token_keys(&s.state).await;
    let set =
        tenantry_proto::token::TokenVerifier::from_public_key_pem(&secret_pem(&fake)).unwrap();
    assert_eq!(set.kids(), [rotation.kid.as_str()]);

    let accesses = fake.accesses();
    let secret_accesses: Vec<Access> = accesses
        .iter()
        .filter(|a| a.resource == "secrets")
        .cloned()
        .collect();
    let rules = api_namespace_rules();
    let denied: Vec<&Access> = secret_accesses
        .iter()
        .filter(|a| !a.allowed_by(&rules) || a.namespace.as_deref() != Some("tenantry"))
        .collect();
    assert!(
        denied.is_empty(),
        "charts/tenantry/rbac/api-namespace-rules.yaml does not allow: {denied:#?}"
    );
    assert_eq!(
        unused_grants(&rules, &secret_accesses),
        Vec::<String>::new()
    );
    let others: Vec<&Access> = accesses
        .iter()
        .filter(|a| a.resource != "secrets")
        .filter(|a| !a.allowed_by(&api_rules()))
        .collect();
    assert!(others.is_empty(), "{others:#?}");
    s.stop().await;
}
