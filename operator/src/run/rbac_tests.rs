//! The chart's RBAC rules against every request the operator really makes: `run` drives a
//! Tenant from creation to deletion against the fake API server, which records the access
//! RBAC would check for each request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::tests::{OPERATOR_NS, eventually, seed_cluster};
use super::{LeaderOptions, run};
use crate::config::Settings;
use crate::fake_api::{Access, FakeApi, unused_grants};
use tenantry_kube::names;

const TENANT: &str = "/apis/tenantry.dev/v1alpha1/tenants/acme";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/tenant-acme/deployments/tenant-runtime";

fn rules(file: &str) -> Vec<PolicyRule> {
    let path = format!(
        "{}/../charts/tenantry/rbac/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn seed(fake: &FakeApi) {
    seed_cluster(fake);
    fake.put(
        TENANT,
        json!({"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
               "metadata": {"name": "acme", "uid": "uid-acme", "generation": 1},
               "spec": {"owner": "ops@acme.test", "plan": "standard",
                        "storage": {"storageClassName": "encrypted"}}}),
    );
}

fn phase(fake: &FakeApi) -> Option<String> {
    fake.get(TENANT)
        .and_then(|t| t["status"]["phase"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn chart_rbac_covers_every_call_of_the_operator_and_grants_nothing_unused() {
    let fake = FakeApi::new();
    seed(&fake);
    let settings = Settings {
        operator_namespace: OPERATOR_NS.into(),
        control_plane_namespace: OPERATOR_NS.into(),
        ..Settings::default()
    };
    let leader = LeaderOptions {
        lease_name: names::DEFAULT_LEASE_NAME.into(),
        // Renewed every second, so the test sees a renewal.
        lease_duration: Duration::from_secs(3),
        identity: "tenantry-operator-0".into(),
    };
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run(settings, leader, fake.client(), admin, async move {
        let _ = stopped.await;
    }));

    // Creation: every child is applied; the runtime becomes ready.
    eventually("the runtime Deployment exists", || {
        fake.get(DEPLOYMENT).is_some()
    })
    .await;
    fake.edit(DEPLOYMENT, |d| {
        let generation = d["metadata"]["generation"].clone();
        d["status"] = json!({"observedGeneration": generation, "replicas": 1, "readyReplicas": 1,
                             "availableReplicas": 1, "updatedReplicas": 1});
    });
    eventually("the Tenant is Ready", || {
        phase(&fake).as_deref() == Some("Ready")
    })
    .await;

    // A CA rotation: the leader patches the CA Secret in its own namespace (and, after the
    // window, again to retire the old CA: the same verb).
    let ca = format!(
        "/api/v1/namespaces/{OPERATOR_NS}/secrets/{}",
        names::DEFAULT_CA_SECRET
    );
    fake.edit(&ca, |s| {
        s["metadata"]["annotations"] = json!({names::ROTATE_CA_ANNOTATION: "rbac"});
    });
    eventually("the CA is rotated", || {
        fake.get(&ca)
            .is_some_and(|s| s["data"][names::CA_PREVIOUS_KEY].is_string())
    })
    .await;

    // Suspension is a change like any other.
    fake.edit(TENANT, |t| {
        t["spec"]["suspended"] = json!(true);
        t["metadata"]["generation"] = json!(2);
    });
    eventually("the Tenant is Suspended", || {
        phase(&fake).as_deref() == Some("Suspended")
    })
    .await;

    // Deletion: the finalizer removes the namespace, then lets the Tenant go.
    fake.edit(TENANT, |t| {
        t["metadata"]["deletionTimestamp"] = json!("2026-01-02T00:00:00Z");
    });
    eventually("the namespace is terminating", || {
        fake.get("/api/v1/namespaces/tenant-acme")
            .is_some_and(|ns: Value| !ns["metadata"]["deletionTimestamp"].is_null())
    })
    .await;
    fake.finish_namespace_deletion("tenant-acme");
    eventually("the Tenant is gone", || fake.get(TENANT).is_none()).await;

    eventually("the leader renewed its Lease", || {
        fake.log()
            .iter()
            .any(|l| l.starts_with("PUT ") && l.contains("/leases/"))
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // A stopped leader hands over at once.
    let lease = fake
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/{}",
            names::DEFAULT_LEASE_NAME
        ))
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");

    let cluster = rules("operator-cluster-rules.yaml");
    let namespaced = rules("operator-namespace-rules.yaml");
    let accesses = fake.accesses();
    let denied: Vec<&Access> = accesses
        .iter()
        .filter(|a| {
            let in_own_namespace = a.namespace.as_deref() == Some(OPERATOR_NS);
            !(a.allowed_by(&cluster) || in_own_namespace && a.allowed_by(&namespaced))
        })
        .collect();
    assert!(
        denied.is_empty(),
        "the chart's operator RBAC does not allow: {denied:#?}"
    );

    // Least privilege: every granted verb is used, except an Event patch, which kube's
    // Recorder sends only when the same Event repeats within its cache window.
    let mut unused = unused_grants(&cluster, &accesses);
    unused.extend(unused_grants(&namespaced, &accesses));
    unused.retain(|g| g != "patch events.k8s.io/events");
    assert_eq!(unused, Vec::<String>::new(), "granted but never used");
}
