//! The whole `run` loop against the in-memory API server: many Tenants at once while the
//! caches are still listing, Tenants the operator cannot read, a hung API call at
//! shutdown, and a restart that must act on later changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{LeaderOptions, run};
use crate::config::Settings;
use crate::fake_api::FakeApi;
use tenantry_kube::names;

pub(super) const OPERATOR_NS: &str = "tenantry-system";

pub(super) fn tenant_path(name: &str) -> String {
    format!("/apis/tenantry.dev/v1alpha1/tenants/{name}")
}

pub(super) fn deployment_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/tenant-{name}/deployments/tenant-runtime")
}

/// Polls `check` every 10 ms for up to 10 s.
pub(super) async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The CRD, the token public key Secret and an encrypted StorageClass.
pub(super) fn seed_cluster(fake: &FakeApi) {
    let crd = serde_json::to_value(tenantry_kube::crd::crd()).unwrap();
    fake.put(
        &format!(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{}",
            names::CRD_NAME
        ),
        crd,
    );
    let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAtest\n-----END PUBLIC KEY-----\n";
    fake.put(
        &format!(
            "/api/v1/namespaces/{OPERATOR_NS}/secrets/{}",
            names::TOKEN_KEY_SECRET
        ),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": names::TOKEN_KEY_SECRET, "namespace": OPERATOR_NS},
               "data": {names::TOKEN_KEY_KEY: base64::engine::general_purpose::STANDARD.encode(pem)}}),
    );
    fake.put(
        "/apis/storage.k8s.io/v1/storageclasses/encrypted",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "encrypted", "annotations": {names::ANNOTATION_ENCRYPTED: "true"}},
               "provisioner": "csi.example.com"}),
    );
    fake.put(
        "/apis/storage.k8s.io/v1/storageclasses/plain",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "plain"}, "provisioner": "csi.example.com"}),
    );
}

/// Stores Tenant `name` with `spec` (plus an owner).
pub(super) fn add_tenant(fake: &FakeApi, name: &str, spec: Value) {
    let mut spec = spec;
    spec["owner"] = json!(format!("ops@{name}.test"));
    fake.put(
        &tenant_path(name),
        json!({"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
               "spec": spec}),
    );
}

pub(super) fn phase(fake: &FakeApi, name: &str) -> Option<String> {
    fake.get(&tenant_path(name))
        .and_then(|t| t["status"]["phase"].as_str().map(str::to_owned))
}

pub(super) fn condition(fake: &FakeApi, name: &str, type_: &str) -> Option<(String, String)> {
    let t = fake.get(&tenant_path(name))?;
    t["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
}

pub(super) fn settings() -> Settings {
    Settings {
        operator_namespace: OPERATOR_NS.into(),
        control_plane_namespace: OPERATOR_NS.into(),
        default_storage_class: Some("encrypted".into()),
        ..Settings::default()
    }
}

/// A running operator and the way to stop it.
pub(super) struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<crate::Result<()>>,
}

impl Running {
    pub(super) async fn start(fake: &FakeApi, identity: &str, lease: Duration) -> Running {
        Running::start_with(fake, settings(), identity, lease).await
    }

    pub(super) async fn start_with(
        fake: &FakeApi,
        settings: Settings,
        identity: &str,
        lease: Duration,
    ) -> Running {
        let leader = LeaderOptions {
            lease_name: names::DEFAULT_LEASE_NAME.into(),
            lease_duration: lease,
            identity: identity.into(),
        };
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(settings, leader, fake.client(), admin, async move {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    /// Sends the stop signal; returns how long `run` took to return.
    pub(super) async fn stop(self) -> Duration {
        let start = Instant::now();
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run returns after the stop signal")
            .unwrap()
            .unwrap();
        start.elapsed()
    }
}

fn lease_holder(fake: &FakeApi) -> Option<String> {
    fake.get(&format!(
        "/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/{}",
        names::DEFAULT_LEASE_NAME
    ))
    .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

fn certified(fake: &FakeApi, name: &str) -> bool {
    condition(fake, name, "CertificateReady").is_some_and(|(s, _)| s == "True")
}

async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

#[tokio::test]
async fn tenants_that_exist_before_start_all_converge_while_caches_are_still_listing() {
    // Regression: every reconcile used to begin by awaiting the caches' readiness, and
    // kube's readiness future wakes only its last poller, so with several Tenants waiting
    // at start all but one hung for ever. A slow first list of Deployments makes every
    // Tenant's first reconcile start while a cache is still filling.
    let fake = FakeApi::new();
    seed_cluster(&fake);
    fake.delay_lists("/apis/apps/v1/deployments", Duration::from_millis(300));
    let names: Vec<String> = (0..30).map(|i| format!("t{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        // A mix of encrypted and unencrypted classes, as on a real cluster.
        let class = if i % 3 == 0 { "plain" } else { "encrypted" };
        add_tenant(&fake, name, json!({"storage": {"storageClassName": class}}));
    }
    let op = Running::start(&fake, "op-a", Duration::from_secs(15)).await;
    eventually("every Tenant has its certificate", || {
        names.iter().all(|n| certified(&fake, n))
    })
    .await;
    for (i, name) in names.iter().enumerate() {
        let (status, reason) = condition(&fake, name, "StorageEncrypted").unwrap();
        if i % 3 == 0 {
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "StorageClassNotEncrypted")
            );
        } else {
            assert_eq!(status, "True", "{name}");
        }
    }
    // Tenants created while it runs converge too.
    add_tenant(&fake, "late", json!({}));
    eventually("the late Tenant has its certificate", || {
        certified(&fake, "late")
    })
    .await;
    assert!(op.stop().await < Duration::from_secs(5));
}

#[tokio::test]
async fn a_tenant_this_operator_cannot_read_gets_a_condition_and_blocks_nobody() {
    let fake = FakeApi::new();
    seed_cluster(&fake);
    // A plan from a newer CRD: the schema let it in, this operator's types cannot read it.
    add_tenant(&fake, "newer", json!({"plan": "premium"}));
    add_tenant(&fake, "fine", json!({}));
    let op = Running::start(&fake, "op-a", Duration::from_secs(15)).await;
    eventually("the readable Tenant converges", || certified(&fake, "fine")).await;
    eventually("the unreadable Tenant is Degraded", || {
        phase(&fake, "newer").as_deref() == Some("Degraded")
    })
    .await;
    let (status, reason) = condition(&fake, "newer", "Ready").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    let message = fake.get(&tenant_path("newer")).unwrap()["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("premium"), "{message}");
    let warned = fake.objects_of_kind("Event").iter().any(|e| {
        e["regarding"]["name"] == "newer"
            && e["reason"] == "Degraded"
            && e["type"] == "Warning"
            && e["note"].as_str().is_some_and(|n| n.contains("premium"))
    });
    assert!(warned, "a Warning Event names the problem");
    // Nothing was made for it, and it is written once: a later pass writes nothing.
    assert!(fake.get("/api/v1/namespaces/tenant-newer").is_none());
    let writes = fake.writes();
    fake.edit(&tenant_path("newer"), |t| {
        t["metadata"]["labels"] = json!({"x": "y"})
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.writes(), writes, "{:#?}", fake.log());
    op.stop().await;
}

#[tokio::test]
async fn stop_returns_within_seconds_even_with_an_api_call_that_never_answers() {
    let fake = FakeApi::new();
    seed_cluster(&fake);
    add_tenant(&fake, "stuck", json!({}));
    // Applying this Tenant's ConfigMap never gets an answer.
    fake.hang("/api/v1/namespaces/tenant-stuck/configmaps");
    let settings = Settings {
        reconcile_timeout: Duration::from_secs(60),
        ..settings()
    };
    let op = Running::start_with(&fake, settings, "op-a", Duration::from_secs(15)).await;
    eventually("the hung request is in flight", || {
        fake.log().iter().any(|l| l.starts_with("HUNG "))
    })
    .await;
    let took = op.stop().await;
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    assert_eq!(lease_holder(&fake), None, "the Lease is released");
}

#[tokio::test]
async fn a_hung_reconcile_times_out_and_others_go_on() {
    let fake = FakeApi::new();
    seed_cluster(&fake);
    add_tenant(&fake, "stuck", json!({}));
    fake.hang("/api/v1/namespaces/tenant-stuck/configmaps");
    let settings = Settings {
        reconcile_timeout: Duration::from_millis(300),
        ..settings()
    };
    let op = Running::start_with(&fake, settings, "op-a", Duration::from_secs(15)).await;
    add_tenant(&fake, "other", json!({}));
    eventually("the other Tenant converges", || certified(&fake, "other")).await;
    eventually("the stuck Tenant is tried again", || {
        fake.log().iter().filter(|l| l.starts_with("HUNG ")).count() >= 2
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn after_a_restart_changes_and_deletions_are_acted_on_and_nothing_is_rewritten() {
    let fake = FakeApi::new();
    seed_cluster(&fake);
    add_tenant(&fake, "acme", json!({}));
    add_tenant(&fake, "beta", json!({}));
    let op = Running::start(&fake, "op-a", Duration::from_secs(15)).await;
    eventually("both Tenants converge", || {
        certified(&fake, "acme") && certified(&fake, "beta")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    op.stop().await;

    // A restart of a converged operator writes nothing at all (the Lease aside). Its first
    // list of Deployments is slow, so every Tenant's first reconcile is due while a cache
    // still fills: the case that used to hang and then ignore later changes.
    fake.delay_lists("/apis/apps/v1/deployments", Duration::from_millis(300));
    let before = fake.log().len();
    let op = Running::start(&fake, "op-a", Duration::from_secs(15)).await;
    eventually("the restarted operator leads", || {
        lease_holder(&fake).as_deref() == Some("op-a")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written: Vec<String> = fake.log()[before..]
        .iter()
        .filter(|l| !["GET ", "LIST ", "WATCH "].iter().any(|r| l.starts_with(r)))
        .filter(|l| !l.contains("/leases/"))
        .cloned()
        .collect();
    assert_eq!(written, Vec::<String>::new(), "the restart wrote");

    // Suspension after the restart is acted on.
    fake.edit(&tenant_path("acme"), |t| {
        t["spec"]["suspended"] = json!(true);
        t["metadata"]["generation"] = json!(2);
    });
    eventually("acme is scaled to zero", || {
        fake.get(&deployment_path("acme"))
            .is_some_and(|d| d["spec"]["replicas"] == 0)
    })
    .await;
    eventually("acme is Suspended", || {
        phase(&fake, "acme").as_deref() == Some("Suspended")
    })
    .await;

    // So is deletion: the namespace goes, then the Tenant.
    fake.edit(&tenant_path("acme"), |t| {
        t["metadata"]["deletionTimestamp"] = json!("2026-01-02T00:00:00Z");
    });
    eventually("acme's namespace is terminating", || {
        fake.get("/api/v1/namespaces/tenant-acme")
            .is_some_and(|ns| !ns["metadata"]["deletionTimestamp"].is_null())
    })
    .await;
    fake.finish_namespace_deletion("tenant-acme");
    eventually("acme is gone", || fake.get(&tenant_path("acme")).is_none()).await;
    assert!(certified(&fake, "beta"));
    within(Duration::from_secs(5), "stopping", op.stop()).await;
}

fn secret_text(fake: &FakeApi, path: &str, key: &str) -> Option<String> {
    let v = fake.get(path)?;
    let b64 = v["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

fn tls_path(name: &str) -> String {
    format!("/api/v1/namespaces/tenant-{name}/secrets/tenant-tls")
}

/// Polls `check` every 20 ms for up to `limit`.
async fn eventually_within(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_ca_rotation_runs_to_the_end_across_a_change_of_leader() {
    let fake = FakeApi::new();
    seed_cluster(&fake);
    let names: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    for name in &names {
        add_tenant(&fake, name, json!({}));
    }
    let settings = Settings {
        ca_rotation_window: Duration::from_secs(4),
        ..settings()
    };
    let ca_path = format!(
        "/api/v1/namespaces/{OPERATOR_NS}/secrets/{}",
        names::DEFAULT_CA_SECRET
    );
    let op = Running::start_with(&fake, settings.clone(), "op-a", Duration::from_secs(15)).await;
    eventually("every Tenant has its certificate", || {
        names.iter().all(|n| certified(&fake, n))
    })
    .await;
    let old_ca = secret_text(&fake, &ca_path, "tls.crt").unwrap();
    let old_fp = tenantry_pki::fingerprint(&old_ca).unwrap();

    fake.edit(&ca_path, |s| {
        s["metadata"]["annotations"] = json!({names::ROTATE_CA_ANNOTATION: "now"});
    });
    eventually("the CA is rotated", || {
        secret_text(&fake, &ca_path, names::CA_PREVIOUS_KEY).is_some()
    })
    .await;
    let new_ca = secret_text(&fake, &ca_path, "tls.crt").unwrap();
    let new_fp = tenantry_pki::fingerprint(&new_ca).unwrap();
    assert_ne!(new_fp, old_fp);
    // Every tenant gets the bundle of both without a restart.
    eventually("every ca.crt holds both CAs", || {
        names.iter().all(|n| {
            secret_text(&fake, &tls_path(n), "ca.crt")
                .is_some_and(|b| b.contains(old_ca.trim()) && b.contains(new_ca.trim()))
        })
    })
    .await;
    // The leader stops mid-rotation; another replica carries on.
    assert!(op.stop().await < Duration::from_secs(5));
    let op = Running::start_with(&fake, settings, "op-b", Duration::from_secs(15)).await;
    let leaf_from_new = |n: &String| {
        secret_text(&fake, &tls_path(n), "tls.crt")
            .is_some_and(|c| tenantry_pki::signed_by(&new_ca, &c))
    };
    eventually_within(
        Duration::from_secs(30),
        "every leaf is from the new CA",
        || names.iter().all(leaf_from_new),
    )
    .await;
    eventually("every status shows the new CA's fingerprint", || {
        names.iter().all(|n| {
            fake.get(&tenant_path(n))
                .is_some_and(|t| t["status"]["certificate"]["issuerFingerprint"] == json!(new_fp))
        })
    })
    .await;
    eventually_within(Duration::from_secs(30), "the old CA is retired", || {
        secret_text(&fake, &ca_path, names::CA_PREVIOUS_KEY).is_none()
    })
    .await;
    eventually("every ca.crt holds the new CA alone", || {
        names.iter().all(|n| {
            secret_text(&fake, &tls_path(n), "ca.crt").is_some_and(|b| b.trim() == new_ca.trim())
        })
    })
    .await;
    let reasons: Vec<String> = fake
        .objects_of_kind("Event")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r == "CARotationStarted"),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r == "CARetired"), "{reasons:?}");
    assert!(op.stop().await < Duration::from_secs(5));
}
