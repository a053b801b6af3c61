//! Kubernetes provisioner benchmark (not a test): prints, from one run against the
//! in-memory API server, for N tenants,
//!
//! * the first reconcile pass (one apply per tenant) next to an idle pass (the watch cache
//!   says every Tenant is converged: no request at all), with requests per pass;
//! * how long the operator's status reports for all N tenants take to reach the database
//!   through the one watch, and how many cluster requests `GetTenant`-style reads cost (0:
//!   they read the database).
//!
//! `cargo bench -p tenantry-api --bench kubernetes`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tenantry_api::clock::SystemClock;
use tenantry_api::provision::kubernetes::{KubernetesProvisioner, KubernetesSettings};
use tenantry_api::provision::{Provisioner, reconcile_all};
use tenantry_api::store::{AuditRecord, NewSignup, Store};
use tenantry_operator::fake_api::FakeApi;
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{Plan, RetentionPolicy};

const TENANTS: usize = 2_000;

async fn seed(store: &Store, n: usize) {
    for i in 0..n {
        let signup = NewSignup {
            user_id: format!("u-{i:05}"),
            email: format!("owner{i}@example.com"),
            password_hash: "not-a-real-hash".into(),
            tenant_id: format!("t-{i:05}"),
            tenant_name: format!("tenant-{i:05}"),
            plan: Plan::Free,
            phase: TenantPhase::Provisioning,
            retention: RetentionPolicy::default(),
            verification: tenantry_api::store::NewVerification {
                token_hash: format!("verification-{i}"),
                expires_at_ms: i64::MAX,
                notice: tenantry_api::mail::notice::Notice::VerifyEmail {
                    token_sealed: "not-sealed".into(),
                },
                mail_id: uuid::Uuid::new_v4().to_string(),
                claimed_until_ms: 0,
            },
            message: String::new(),
            now_ms: 1_767_225_600_000,
        };
        let audit = AuditRecord {
            action: "account.signup",
            actor_user_id: signup.user_id.clone(),
            target: signup.tenant_id.clone(),
            success: true,
            source: String::new(),
            detail_json: "{}".into(),
        };
        store.create_signup(&signup, &audit).await.unwrap();
    }
}

async fn ready_rows(store: &Store) -> usize {
    store
        .all_tenants()
        .await
        .unwrap()
        .iter()
        .filter(|t| t.phase == TenantPhase::Ready)
        .count()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = Store::connect(&url, 8).await.unwrap();
    seed(&store, TENANTS).await;
    let fake = FakeApi::new();
    let provisioner: Arc<dyn Provisioner> = Arc::new(
        KubernetesProvisioner::start(
            fake.client(),
            KubernetesSettings {
                tenant_domain: Some("tenants.example.com".into()),
                ..KubernetesSettings::default()
            },
            store.clone(),
            Arc::new(SystemClock),
        )
        .await
        .unwrap(),
    );
    println!("kubernetes provisioner, {TENANTS} tenants, in-memory API server");

    fake.clear_log();
    let start = Instant::now();
    reconcile_all(&store, &provisioner).await.unwrap();
    let first = start.elapsed();
    let first_requests = fake.log().len();
    let first_writes = fake.writes();
    // Let the watch catch up with the applies before the idle pass.
    tokio::time::sleep(Duration::from_millis(500)).await;

    fake.clear_log();
    let start = Instant::now();
    reconcile_all(&store, &provisioner).await.unwrap();
    let idle = start.elapsed();
    let idle_requests = fake.log().len();
    println!(
        "  first pass: {:>8.1} ms, {first_requests} requests ({first_writes} writes), {:.0} tenants/s",
        first.as_secs_f64() * 1e3,
        TENANTS as f64 / first.as_secs_f64()
    );
    println!(
        "  idle pass:  {:>8.1} ms, {idle_requests} requests; idle/first time ratio {:.3}",
        idle.as_secs_f64() * 1e3,
        idle.as_secs_f64() / first.as_secs_f64()
    );

    // The operator reports Ready for every tenant; the watch carries it to the rows.
    fake.clear_log();
    let start = Instant::now();
    for i in 0..TENANTS {
        fake.edit(
            &format!("/apis/tenantry.dev/v1alpha1/tenants/tenant-{i:05}"),
            |t| {
                t["status"] = json!({"phase": "Ready",
                    "endpoint": format!("https://tenant-{i:05}.tenants.example.com"),
                    "certificate": {"serial": "01", "notAfter": "2027-01-01T00:00:00Z",
                                    "renewalTime": "2026-10-01T00:00:00Z"}});
            },
        );
    }
    while ready_rows(&store).await < TENANTS {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let propagation = start.elapsed();
    println!(
        "  {TENANTS} status reports reached the database in {:.1} ms ({:.0}/s) with {} new requests",
        propagation.as_secs_f64() * 1e3,
        TENANTS as f64 / propagation.as_secs_f64(),
        fake.log().len()
    );

    fake.clear_log();
    let start = Instant::now();
    for i in 0..TENANTS {
        store.tenant(&format!("t-{i:05}")).await.unwrap().unwrap();
    }
    let reads = start.elapsed();
    println!(
        "  {TENANTS} tenant reads (what GetTenant does): {:.1} ms, {} cluster requests",
        reads.as_secs_f64() * 1e3,
        fake.log().len()
    );
    provisioner.shutdown().await;
}
