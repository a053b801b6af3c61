//! Reconcile tests against the fake API server, checking each request in order.

use super::*;
use crate::builders::tests::tenant;
use crate::cache::tenant_of;
use crate::fake_api::FakeApi;
use crate::run::{check_crd, load_or_create_ca};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tenantry_pki::CertificateAuthority;

const TENANT: &str = "/apis/tenantry.dev/v1alpha1/tenants/acme";
const STATUS: &str = "/apis/tenantry.dev/v1alpha1/tenants/acme/status";
const NS: &str = "/api/v1/namespaces/tenant-acme";
const CORE: &str = "/api/v1/namespaces/tenant-acme";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/tenant-acme/networkpolicies";
const DEPLOY: &str = "/apis/apps/v1/namespaces/tenant-acme/deployments/tenant-runtime";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const TOKEN_PEM: &str =
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAtest\n-----END PUBLIC KEY-----\n";

fn p(method: &str, path: &str) -> String {
    format!("{method} {path}")
}

struct Harness {
    fake: FakeApi,
    ctx: Arc<Context>,
    clock: Arc<Mutex<Timestamp>>,
}

impl Harness {
    fn new(settings: Settings, token: Option<&str>) -> Harness {
        let fake = FakeApi::new();
        let caches = Arc::new(Caches::default());
        fake.sync_caches(&caches);
        let start: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let clock = Arc::new(Mutex::new(start));
        let ca = CaState::new(CertificateAuthority::generate("test CA", start).unwrap()).unwrap();
        let c = clock.clone();
        let ctx = Context::new(
            fake.client(),
            settings,
            Arc::new(ca),
            caches,
            token.map(String::from),
            Arc::new(Metrics::new()),
        )
        .with_clock(move || *c.lock().unwrap());
        Harness {
            fake,
            ctx: Arc::new(ctx),
            clock,
        }
    }

    /// A second operator over the same fake and clock: empty memory of its own writes,
    /// caches filled by a fresh list.
    fn over(other: &Harness) -> Harness {
        let caches = Arc::new(Caches::default());
        other.fake.sync_caches(&caches);
        let clock = other.clock.clone();
        let ctx = Context::new(
            other.fake.client(),
            other.ctx.settings.clone(),
            other.ctx.ca(),
            caches,
            other.ctx.token_public_key.read().unwrap().clone(),
            Arc::new(Metrics::new()),
        )
        .with_clock(move || *clock.lock().unwrap());
        Harness {
            fake: other.fake.clone(),
            ctx: Arc::new(ctx),
            clock: other.clock.clone(),
        }
    }

    /// The encrypted-class setup most tests use.
    fn standard() -> Harness {
        let settings = Settings {
            encrypted_storage_classes: vec!["encrypted".into()],
            default_storage_class: Some("encrypted".into()),
            ..Settings::default()
        };
        Harness::new(settings, Some(TOKEN_PEM))
    }

    fn add_tenant(&self, spec: Value) {
        let t = tenant("acme", spec);
        self.fake.put(TENANT, serde_json::to_value(&t).unwrap());
    }

    fn tenant(&self) -> Tenant {
        serde_json::from_value(self.fake.get(TENANT).expect("tenant exists")).unwrap()
    }

    fn sync(&mut self) {
        self.fake.sync_caches(&self.ctx.caches);
    }

    async fn reconcile(&self) -> Result<Action> {
        reconcile(
            Arc::new(TenantObject::from(self.tenant())),
            self.ctx.clone(),
        )
        .await
    }

    /// Runs one reconcile and checks it sent exactly `expected`.
    async fn expect(&self, expected: &[String]) -> Action {
        let refs: Vec<&str> = expected.iter().map(String::as_str).collect();
        self.fake.expect(&refs);
        let action = self.reconcile().await.unwrap();
        if let Err(e) = self.fake.verify() {
            panic!("{e}\nfull log: {:#?}", self.fake.log());
        }
        action
    }

    fn advance(&self, d: Duration) {
        let mut now = self.clock.lock().unwrap();
        *now = now
            .checked_add(jiff::SignedDuration::try_from(d).unwrap())
            .unwrap();
    }

    fn make_runtime_available(&mut self) {
        self.fake.edit(DEPLOY, |d| {
            let g = d["metadata"]["generation"].clone();
            d["status"] = json!({"observedGeneration": g, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1});
        });
        self.sync();
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let status = self.tenant().status.unwrap();
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn secret_data(&self, name: &str, key: &str) -> Vec<u8> {
        let v = self.fake.get(&format!("{CORE}/secrets/{name}")).unwrap();
        let s: Secret = serde_json::from_value(v).unwrap();
        s.data.unwrap()[key].0.clone()
    }

    /// Create from nothing, then let the runtime become available: a converged tenant.
    async fn converge(&mut self) {
        self.add_tenant(
            json!({"owner": "ops@acme.test", "tls": {"dnsNames": ["acme.example.com"]}}),
        );
        self.reconcile().await.unwrap();
        self.sync();
        self.make_runtime_available();
        self.reconcile().await.unwrap();
        self.sync();
        assert_eq!(
            self.tenant().status.unwrap().phase,
            Some(TenantPhase::Ready)
        );
    }
}

fn create_requests() -> Vec<String> {
    vec![
        p("PATCH", TENANT),
        p("PATCH", NS),
        p("PATCH", &format!("{CORE}/serviceaccounts/tenant-runtime")),
        p("PATCH", &format!("{NET}/default-deny")),
        p("PATCH", &format!("{NET}/allow-runtime-ingress")),
        p("PATCH", &format!("{NET}/allow-egress")),
        p("PATCH", &format!("{CORE}/resourcequotas/tenant-quota")),
        p("PATCH", &format!("{CORE}/limitranges/tenant-limits")),
        p("GET", &format!("{CORE}/secrets/tenant-data-key")),
        p("POST", &format!("{CORE}/secrets")),
        p(
            "PATCH",
            &format!("{CORE}/persistentvolumeclaims/tenant-data"),
        ),
        p("GET", &format!("{CORE}/secrets/tenant-tls")),
        p("PATCH", &format!("{CORE}/secrets/tenant-tls")),
        p(
            "PATCH",
            &format!("{CORE}/secrets/tenantry-token-public-key"),
        ),
        p("PATCH", &format!("{CORE}/configmaps/tenant-runtime-config")),
        p("PATCH", DEPLOY),
        p("PATCH", &format!("{CORE}/services/tenant-runtime")),
        p("PATCH", STATUS),
    ]
}

#[tokio::test]
async fn create_from_nothing_applies_every_child_once() {
    let h = Harness::standard();
    h.add_tenant(json!({"owner": "ops@acme.test", "plan": "standard", "tls": {"dnsNames": ["acme.example.com"]}}));
    let action = h.expect(&create_requests()).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(600)));

    let t = h.tenant();
    assert_eq!(
        t.metadata.finalizers.as_deref(),
        Some(&[names::FINALIZER.to_owned()][..])
    );
    let status = t.status.unwrap();
    assert_eq!(status.phase, Some(TenantPhase::Provisioning));
    assert_eq!(status.namespace.as_deref(), Some("tenant-acme"));
    assert_eq!(status.endpoint.as_deref(), Some("https://acme.example.com"));
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "NamespaceReady",
            "NetworkIsolated",
            "StorageEncrypted",
            "CertificateReady",
            "RuntimeReady",
            "Ready"
        ]
    );
    assert_eq!(
        h.condition("RuntimeReady"),
        ("False".into(), "Progressing".into())
    );
    assert_eq!(h.condition("StorageEncrypted").0, "True");

    // The certificate: right names, from our CA, status matches the Secret.
    let cert = String::from_utf8(h.secret_data("tenant-tls", "tls.crt")).unwrap();
    let info = pki::parse_certificate(&cert).unwrap();
    assert!(info.dns_names.contains(&"acme.example.com".to_owned()));
    assert!(
        info.dns_names
            .contains(&"tenant-runtime.tenant-acme.svc".to_owned())
    );
    assert!(h.ctx.ca().issuing().signed(&cert));
    let cs = status.certificate.unwrap();
    assert_eq!(
        cs.issuer_fingerprint.as_deref(),
        Some(h.ctx.ca().fingerprint())
    );
    assert_eq!(cs.serial, info.serial_hex);
    assert_eq!(
        cs.not_after.0,
        "2026-04-01T00:00:00Z".parse::<Timestamp>().unwrap()
    );
    assert_eq!(
        cs.renewal_time.0,
        "2026-03-02T00:00:00Z".parse::<Timestamp>().unwrap()
    );
    assert_eq!(
        String::from_utf8(h.secret_data("tenant-tls", "ca.crt")).unwrap(),
        h.ctx.ca().bundle()
    );
    assert_eq!(
        h.secret_data("tenant-data-key", names::DATA_KEY_KEY).len(),
        32
    );
    assert_eq!(
        h.secret_data("tenantry-token-public-key", names::TOKEN_KEY_KEY),
        TOKEN_PEM.as_bytes()
    );
    // Children are owned by the Tenant and labelled.
    let ns = h.fake.get(NS).unwrap();
    assert_eq!(ns["metadata"]["ownerReferences"][0]["uid"], "uid-acme");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let pvc = h
        .fake
        .get(&format!("{CORE}/persistentvolumeclaims/tenant-data"))
        .unwrap();
    assert_eq!(pvc["spec"]["storageClassName"], "encrypted");
    // 14 children + finalizer + status.
    assert_eq!(h.fake.writes(), 16);
}

/// What a real API server does to the objects it stores, as far as the comparison can
/// see: it drops `false` booleans (`omitempty`), stores volume sizes in their canonical
/// unit, adds defaults and a controller's annotation, and (here, to stand for any
/// normalisation the builders do not foresee) writes a CPU quantity another way.
fn like_a_real_api_server(obj: &mut Value) {
    if obj["kind"] == "Deployment" {
        obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("1");
        obj["spec"]["progressDeadlineSeconds"] = json!(600);
        let pod = &mut obj["spec"]["template"]["spec"];
        pod["dnsPolicy"] = json!("ClusterFirst");
        for c in pod["containers"].as_array_mut().into_iter().flatten() {
            c["terminationMessagePath"] = json!("/dev/termination-log");
            if c["resources"]["limits"]["cpu"] == "500m" {
                c["resources"]["limits"]["cpu"] = json!("0.5");
            }
            for m in c["volumeMounts"].as_array_mut().into_iter().flatten() {
                if m["readOnly"] == false {
                    m.as_object_mut().map(|m| m.remove("readOnly"));
                }
            }
        }
    }
    if obj["kind"] == "PersistentVolumeClaim"
        && obj["spec"]["resources"]["requests"]["storage"] == "1024Mi"
    {
        obj["spec"]["resources"]["requests"]["storage"] = json!("1Gi");
    }
}

#[tokio::test]
async fn what_the_api_server_stores_differently_is_never_written_again() {
    // Regression: on a real API server the stored Deployment never matched the built one,
    // so every event of any child re-applied it.
    let mut h = Harness::standard();
    h.fake.set_defaulting(like_a_real_api_server);
    h.add_tenant(json!({"owner": "ops@acme.test", "storage": {"size": "1024Mi"}}));
    h.expect(&create_requests()).await;
    let pvc = h
        .fake
        .get(&format!("{CORE}/persistentvolumeclaims/tenant-data"))
        .unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "1Gi");
    // Child events bring more reconciles: nothing is written, nothing even asked.
    h.sync();
    h.expect(&[]).await;
    h.expect(&[]).await;
    // A new operator (no memory of its writes) asks once about the one value it cannot
    // recognise, learns that applying would change nothing, and writes nothing.
    let fresh = Harness::over(&h);
    fresh.expect(&[p("DRY-RUN PATCH", DEPLOY)]).await;
    fresh.expect(&[]).await;
    assert_eq!(
        h.fake.get(DEPLOY).unwrap()["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            ["cpu"],
        "0.5"
    );
}

#[tokio::test]
async fn a_reconcile_before_the_watch_shows_our_writes_writes_nothing() {
    let h = Harness::standard();
    h.add_tenant(json!({"owner": "ops@acme.test"}));
    h.expect(&create_requests()).await;
    // No sync: the caches have not seen any of the writes yet. Only the two Secrets whose
    // absence matters (a second data key, a second certificate) are read back.
    h.expect(&[
        p("GET", &format!("{CORE}/secrets/tenant-data-key")),
        p("GET", &format!("{CORE}/secrets/tenant-tls")),
    ])
    .await;
}

#[tokio::test]
async fn idle_resync_of_a_converged_tenant_writes_nothing() {
    let mut h = Harness::standard();
    h.add_tenant(json!({"owner": "ops@acme.test"}));
    h.reconcile().await.unwrap();
    h.sync();
    h.make_runtime_available();
    // The runtime became available: one status write and one Event, nothing else.
    h.expect(&[p("PATCH", STATUS), p("POST", EVENTS)]).await;
    assert_eq!(h.tenant().status.unwrap().phase, Some(TenantPhase::Ready));
    assert_eq!(h.condition("Ready"), ("True".into(), "Ready".into()));
    h.sync();
    let before = h.tenant().status.unwrap();
    h.advance(Duration::from_secs(3600));
    let action = h.expect(&[]).await;
    // Converged: requeue at the resync period (renewal is months away).
    assert_eq!(action, Action::requeue(Duration::from_secs(600)));
    h.expect(&[]).await;
    assert_eq!(h.tenant().status.unwrap(), before);
}

#[tokio::test]
async fn drifted_child_is_reapplied_and_nothing_else() {
    let mut h = Harness::standard();
    h.converge().await;
    h.fake.edit(DEPLOY, |d| d["spec"]["replicas"] = json!(5));
    h.fake.edit(&format!("{NET}/default-deny"), |p| {
        p["spec"]["policyTypes"] = json!(["Ingress"])
    });
    h.sync();
    // Both are put back, each after a dry run shows the difference is real; the
    // Deployment's new generation is not rolled out yet, so the runtime is reported as
    // progressing until it is.
    h.expect(&[
        p("DRY-RUN PATCH", &format!("{NET}/default-deny")),
        p("PATCH", &format!("{NET}/default-deny")),
        p("DRY-RUN PATCH", DEPLOY),
        p("PATCH", DEPLOY),
        p("PATCH", STATUS),
        p("POST", EVENTS),
    ])
    .await;
    assert_eq!(h.fake.get(DEPLOY).unwrap()["spec"]["replicas"], 1);
    assert_eq!(
        h.fake.get(&format!("{NET}/default-deny")).unwrap()["spec"]["policyTypes"],
        json!(["Ingress", "Egress"])
    );
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Provisioning)
    );
    h.make_runtime_available();
    // A repeated Event within minutes becomes a series: a PATCH of the first one.
    h.expect(&[p("PATCH", STATUS), p("PATCH", &format!("{EVENTS}/acme.*"))])
        .await;
    assert_eq!(h.tenant().status.unwrap().phase, Some(TenantPhase::Ready));
}

#[tokio::test]
async fn certificate_due_for_renewal_gets_a_new_key_and_serial() {
    let mut h = Harness::standard();
    h.converge().await;
    let old_serial = h.tenant().status.unwrap().certificate.unwrap().serial;
    let old_key = h.secret_data("tenant-tls", "tls.key");
    // Just before the renewal time nothing happens, and the requeue points at it.
    h.advance(Duration::from_secs(60 * 24 * 3600 - 10));
    let action = h.expect(&[]).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    h.advance(Duration::from_secs(11));
    h.expect(&[
        p("GET", &format!("{CORE}/secrets/tenant-tls")),
        p("PATCH", &format!("{CORE}/secrets/tenant-tls")),
        p("POST", EVENTS),
        p("PATCH", STATUS),
    ])
    .await;
    let status = h.tenant().status.unwrap();
    let cs = status.certificate.unwrap();
    assert_ne!(cs.serial, old_serial);
    assert_ne!(h.secret_data("tenant-tls", "tls.key"), old_key);
    let renewed_at: Timestamp = "2026-03-02T00:00:01Z".parse().unwrap();
    assert_eq!(
        cs.not_after.0,
        renewed_at
            .checked_add(jiff::SignedDuration::from_hours(90 * 24))
            .unwrap()
    );
    // The Ready condition did not transition.
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        ready.last_transition_time.0,
        "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
    );
    let event = h.fake.objects_of_kind("Event").into_iter().last().unwrap();
    assert_eq!(event["reason"], "CertificateRenewed");
}

#[tokio::test]
async fn hand_edited_or_deleted_tls_secret_is_repaired() {
    let mut h = Harness::standard();
    h.converge().await;
    let tls = format!("{CORE}/secrets/tenant-tls");
    let other = CertificateAuthority::generate("intruder", Timestamp::now()).unwrap();
    let forged = other
        .issue_leaf(&LeafRequest {
            dns_names: vec!["acme.example.com".into()],
            ip_addresses: vec![],
            validity: Duration::from_secs(3600 * 24),
            now: "2026-01-01T00:00:00Z".parse().unwrap(),
        })
        .unwrap();
    let forged_key = forged.key_pem.expose_secret().to_owned();
    h.fake.edit(&tls, |s| {
        s["data"]["tls.key"] =
            serde_json::to_value(k8s_openapi::ByteString(forged_key.into_bytes())).unwrap();
    });
    h.sync();
    h.expect(&[
        p("GET", &tls),
        p("PATCH", &tls),
        p("POST", EVENTS),
        p("PATCH", STATUS),
    ])
    .await;
    let key =
        SecretString::from(String::from_utf8(h.secret_data("tenant-tls", "tls.key")).unwrap());
    let cert = String::from_utf8(h.secret_data("tenant-tls", "tls.crt")).unwrap();
    assert!(pki::key_matches(
        &pki::parse_certificate(&cert).unwrap(),
        &key
    ));

    h.fake.remove(&tls);
    h.sync();
    h.expect(&[p("GET", &tls), p("PATCH", &tls), p("PATCH", STATUS)])
        .await;
    assert!(h.fake.get(&tls).is_some());
}

#[tokio::test]
async fn unencrypted_storage_class_fails_closed() {
    let mut h = Harness::new(Settings::default(), Some(TOKEN_PEM));
    let plain = StorageClass {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("plain".into()),
            ..Default::default()
        },
        provisioner: "example.com/disk".into(),
        ..Default::default()
    };
    h.fake.put(
        "/apis/storage.k8s.io/v1/storageclasses/plain",
        serde_json::to_value(plain).unwrap(),
    );
    h.sync();
    h.add_tenant(json!({"owner": "x", "storage": {"storageClassName": "plain"}}));
    let expected: Vec<String> = create_requests()
        .into_iter()
        .filter(|r| !r.contains("persistentvolumeclaims") && !r.contains("deployments"))
        .chain([p("POST", EVENTS), p("POST", EVENTS)])
        .collect();
    h.expect(&expected).await;
    let status = h.tenant().status.unwrap();
    assert_eq!(status.phase, Some(TenantPhase::Degraded));
    assert_eq!(
        h.condition("StorageEncrypted"),
        ("False".into(), reasons::STORAGE_CLASS_NOT_ENCRYPTED.into())
    );
    assert_eq!(h.condition("Ready").1, reasons::STORAGE_CLASS_NOT_ENCRYPTED);
    assert!(
        h.fake
            .get(&format!("{CORE}/persistentvolumeclaims/tenant-data"))
            .is_none()
    );
    assert!(h.fake.get(DEPLOY).is_none());
    let reasons_seen: Vec<Value> = h
        .fake
        .objects_of_kind("Event")
        .iter()
        .map(|e| e["reason"].clone())
        .collect();
    assert!(reasons_seen.contains(&json!("StorageClassNotEncrypted")));
    assert!(reasons_seen.iter().all(|r| r != "Ready"));
    // Still unencrypted on the next pass: no new writes, no repeated Event.
    h.sync();
    h.expect(&[]).await;
}

#[test]
fn storage_class_is_encrypted_by_flag_or_annotation_only() {
    let caches = Caches::default();
    let class = |name: &str, annotated: Option<&str>| StorageClass {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            annotations: annotated
                .map(|v| [(names::ANNOTATION_ENCRYPTED.to_owned(), v.to_owned())].into()),
            ..Default::default()
        },
        provisioner: "x".into(),
        ..Default::default()
    };
    for sc in [
        class("annotated", Some("true")),
        class("false", Some("false")),
        class("plain", None),
    ] {
        caches
            .storage_classes
            .handle(&kube::runtime::watcher::Event::Apply(sc))
            .unwrap();
    }
    let settings = Settings {
        encrypted_storage_classes: vec!["listed".into()],
        ..Settings::default()
    };
    let decide = |name: Option<&str>| {
        let t = tenant(
            "a",
            json!({"owner": "x", "storage": {"storageClassName": name}}),
        );
        storage_class(&Owner::of(&t).unwrap(), &settings, &caches.storage_classes)
    };
    assert_eq!(decide(Some("annotated")), Ok("annotated".into()));
    assert_eq!(decide(Some("listed")), Ok("listed".into()));
    for bad in ["false", "plain", "missing"] {
        assert_eq!(
            decide(Some(bad)).unwrap_err().reason,
            reasons::STORAGE_CLASS_NOT_ENCRYPTED,
            "{bad}"
        );
    }
    assert_eq!(decide(None).unwrap_err().reason, reasons::NO_STORAGE_CLASS);
}

#[tokio::test]
async fn suspension_scales_to_zero_and_keeps_data() {
    let mut h = Harness::standard();
    h.converge().await;
    h.fake.edit(TENANT, |t| {
        t["spec"]["suspended"] = json!(true);
        t["metadata"]["generation"] = json!(2);
    });
    h.expect(&[p("PATCH", DEPLOY), p("PATCH", STATUS), p("POST", EVENTS)])
        .await;
    assert_eq!(h.fake.get(DEPLOY).unwrap()["spec"]["replicas"], 0);
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Suspended)
    );
    assert_eq!(
        h.condition("RuntimeReady"),
        ("False".into(), "Suspended".into())
    );
    assert!(
        h.fake
            .get(&format!("{CORE}/persistentvolumeclaims/tenant-data"))
            .is_some()
    );
    assert!(
        h.fake
            .get(&format!("{CORE}/secrets/tenant-data-key"))
            .is_some()
    );
    h.sync();
    h.expect(&[]).await;
}

#[tokio::test]
async fn deletion_with_children_waits_for_the_namespace() {
    let mut h = Harness::standard();
    h.converge().await;
    h.fake.edit(TENANT, |t| {
        t["metadata"]["deletionTimestamp"] = json!("2026-01-02T00:00:00Z")
    });
    let action = h
        .expect(&[p("DELETE", NS), p("PATCH", STATUS), p("POST", EVENTS)])
        .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Terminating)
    );
    // The namespace is terminating: nothing to do but wait.
    h.sync();
    h.expect(&[]).await;
    // The namespace is gone: the finalizer goes and the API server drops the Tenant.
    h.fake.finish_namespace_deletion("tenant-acme");
    h.sync();
    h.fake.expect(&[&p("DELETE", NS), &p("PATCH", TENANT)]);
    let last = h.tenant();
    reconcile(Arc::new(TenantObject::from(last)), h.ctx.clone())
        .await
        .unwrap();
    h.fake.verify().unwrap();
    assert!(h.fake.get(TENANT).is_none());
    assert!(h.fake.get(&format!("{CORE}/secrets/tenant-tls")).is_none());
}

#[tokio::test]
async fn deletion_without_children_releases_at_once() {
    let h = Harness::standard();
    let mut t = tenant("acme", json!({"owner": "x"}));
    t.metadata.finalizers = Some(vec![names::FINALIZER.into()]);
    t.metadata.deletion_timestamp = Some(Time("2026-01-02T00:00:00Z".parse().unwrap()));
    h.fake.put(TENANT, serde_json::to_value(&t).unwrap());
    h.expect(&[p("DELETE", NS), p("PATCH", TENANT)]).await;
    assert!(h.fake.get(TENANT).is_none());

    // Without our finalizer there is nothing to do.
    let mut foreign = tenant("acme", json!({"owner": "x"}));
    foreign.metadata.finalizers = Some(vec!["someone.else/x".into()]);
    foreign.metadata.deletion_timestamp = Some(Time("2026-01-02T00:00:00Z".parse().unwrap()));
    h.fake.put(TENANT, serde_json::to_value(&foreign).unwrap());
    h.expect(&[]).await;
}

#[tokio::test]
async fn invalid_spec_becomes_a_condition() {
    let h = Harness::standard();
    h.add_tenant(json!({"owner": "x", "plan": "free", "storage": {"size": "100Gi"}}));
    h.expect(&[p("PATCH", TENANT), p("PATCH", STATUS), p("POST", EVENTS)])
        .await;
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Degraded)
    );
    let (status, reason) = h.condition("Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", reasons::INVALID_SPEC)
    );
    assert!(h.fake.get(NS).is_none());
    h.expect(&[]).await;
}

#[tokio::test]
async fn missing_token_key_holds_back_the_runtime() {
    let settings = Settings {
        encrypted_storage_classes: vec!["encrypted".into()],
        default_storage_class: Some("encrypted".into()),
        ..Settings::default()
    };
    let h = Harness::new(settings, None);
    h.add_tenant(json!({"owner": "x"}));
    h.reconcile().await.unwrap();
    assert!(h.fake.get(DEPLOY).is_none());
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Degraded)
    );
    assert_eq!(
        h.condition("RuntimeReady").1,
        reasons::TOKEN_PUBLIC_KEY_MISSING
    );
}

#[tokio::test]
async fn lost_data_key_is_never_silently_replaced() {
    let mut h = Harness::standard();
    h.converge().await;
    h.fake.remove(&format!("{CORE}/secrets/tenant-data-key"));
    h.sync();
    h.reconcile().await.unwrap();
    assert!(
        h.fake
            .get(&format!("{CORE}/secrets/tenant-data-key"))
            .is_none()
    );
    assert_eq!(h.condition("StorageEncrypted").1, reasons::DATA_KEY_MISSING);
    assert_eq!(
        h.tenant().status.unwrap().phase,
        Some(TenantPhase::Degraded)
    );
}

#[tokio::test]
async fn api_errors_are_returned_not_panicked() {
    let h = Harness::standard();
    // The Tenant is not in the API server: the finalizer patch finds nothing.
    let t = tenant("ghost", json!({"owner": "x"}));
    let action = reconcile(Arc::new(TenantObject::from(t)), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    // A tenant without uid cannot own children: an error, not a panic.
    let mut t = tenant("acme", json!({"owner": "x"}));
    t.metadata.uid = None;
    t.metadata.finalizers = Some(vec![names::FINALIZER.into()]);
    assert!(
        reconcile(Arc::new(TenantObject::from(t.clone())), h.ctx.clone())
            .await
            .is_err()
    );
    let backoff = error_policy(
        Arc::new(TenantObject::from(t)),
        &Error::MissingField("metadata.uid"),
        h.ctx.clone(),
    );
    assert_eq!(backoff, Action::requeue(Duration::from_secs(1)));
}

#[tokio::test]
async fn crd_check_fails_clearly_when_absent() {
    let fake = FakeApi::new();
    let client = fake.client();
    let err = check_crd(&client).await.unwrap_err();
    assert!(err.to_string().contains("is not installed"), "{err}");
    fake.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tenants.tenantry.dev",
        serde_json::to_value(tenantry_kube::crd::crd()).unwrap(),
    );
    check_crd(&client).await.unwrap();
}

#[tokio::test]
async fn ca_is_made_once_then_loaded() {
    let fake = FakeApi::new();
    let client = fake.client();
    let settings = Settings::default();
    let first = load_or_create_ca(&client, &settings).await.unwrap();
    let second = load_or_create_ca(&client, &settings).await.unwrap();
    assert_eq!(first.bundle(), second.bundle());
    assert_eq!(
        fake.log(),
        [
            "GET /api/v1/namespaces/tenantry-system/secrets/tenantry-ca",
            "POST /api/v1/namespaces/tenantry-system/secrets",
            "GET /api/v1/namespaces/tenantry-system/secrets/tenantry-ca",
        ]
    );
    fake.edit(
        "/api/v1/namespaces/tenantry-system/secrets/tenantry-ca",
        |s| {
            s["data"]["tls.key"] = json!("AAAA");
        },
    );
    assert!(matches!(
        load_or_create_ca(&client, &settings).await,
        Err(Error::CaSecretMalformed(_))
    ));
}

#[tokio::test]
async fn only_one_replica_holds_the_lease() {
    let fake = FakeApi::new();
    let client = fake.client();
    let api = || Api::namespaced(client.clone(), "tenantry-system");
    let a = crate::leader::LeaseLock::new(api(), "lease", "a", Duration::from_secs(15));
    let b = crate::leader::LeaseLock::new(api(), "lease", "b", Duration::from_secs(15));
    assert!(a.try_hold().await.unwrap());
    assert!(!b.try_hold().await.unwrap());
    assert!(a.try_hold().await.unwrap());
    let lease = fake
        .get("/apis/coordination.k8s.io/v1/namespaces/tenantry-system/leases/lease")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a");
}

#[test]
fn children_map_to_their_cluster_scoped_tenant() {
    let t = tenant("acme", json!({"owner": "x"}));
    let owner = Owner::of(&t).unwrap();
    let policy = builders::default_deny_policy(&owner);
    let key = tenant_of(&policy).unwrap();
    assert_eq!(key, ObjectRef::<TenantObject>::new("acme"));
    assert_eq!(key.namespace, None);
    assert_eq!(
        tenant_of(&builders::desired_namespace(&owner)),
        Some(ObjectRef::new("acme"))
    );
    let mut foreign = builders::service(&owner);
    foreign.metadata.owner_references.as_mut().unwrap()[0].kind = "Other".into();
    assert_eq!(tenant_of(&foreign), None);
}

const RECIPIENT: &str = "age1a00zyuy8k7tmeeglkq5qn2wh4t6d22shz79fgm5nd5gq3kn0z3sqlc9dfp";

fn with_backups() -> Harness {
    let settings = Settings {
        encrypted_storage_classes: vec!["encrypted".into()],
        default_storage_class: Some("encrypted".into()),
        backup_recipients: Some(format!("{RECIPIENT}\n")),
        ..Settings::default()
    };
    Harness::new(settings, Some(TOKEN_PEM))
}

#[tokio::test]
async fn backups_get_a_volume_on_the_encrypted_class_and_a_condition_that_ages() {
    let mut h = with_backups();
    h.add_tenant(json!({"owner": "x", "backup": {"interval": "6h", "keep": 3, "size": "1Gi"}}));
    h.reconcile().await.unwrap();
    h.sync();
    let pvc: PersistentVolumeClaim = serde_json::from_value(
        h.fake
            .get(&format!("{CORE}/persistentvolumeclaims/tenant-backups"))
            .expect("a backup volume"),
    )
    .unwrap();
    let spec = pvc.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("encrypted"));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap()["storage"].0,
        "1Gi"
    );
    let recipients = h
        .fake
        .get(&format!("{CORE}/configmaps/tenant-backup-recipients"))
        .expect("the recipients");
    assert_eq!(recipients["data"]["recipients"], format!("{RECIPIENT}\n"));
    let config = h
        .fake
        .get(&format!("{CORE}/configmaps/tenant-runtime-config"))
        .unwrap();
    let config: tenantry_proto::runtime_config::RuntimeConfig =
        serde_yaml::from_str(config["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let backup = config.backup.expect("a backup section");
    assert_eq!(backup.interval, "6h");
    assert_eq!(backup.keep, 3);
    assert_eq!(backup.directory, std::path::Path::new(names::BACKUP_DIR));
    let deployment = h.fake.get(DEPLOY).unwrap();
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("tenant-backups") && volumes.contains("tenant-backup-recipients"));
    // The runtime is not running: nothing reported, stale, with a Warning.
    assert_eq!(
        h.condition("BackupStale"),
        ("True".into(), "NoBackupReported".into())
    );
    assert!(
        h.fake
            .objects_of_kind("Event")
            .iter()
            .any(|e| e["reason"] == "NoBackupReported" && e["type"] == "Warning")
    );
    // Ready does not wait for backups.
    h.make_runtime_available();
    h.reconcile().await.unwrap();
    h.sync();
    assert_eq!(h.condition("Ready").0, "True");
    let (_, message) = {
        let status = h.tenant().status.unwrap();
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "BackupStale")
            .unwrap()
            .clone();
        (c.status, c.message)
    };
    // This test's runtime has no address: the condition says why it knows nothing.
    assert!(message.contains("could not be read"), "{message}");

    // A backup the runtime reported before (kept in the status) makes it current, until
    // it is older than twice the interval.
    let reported: Timestamp = "2025-12-31T23:00:00Z".parse().unwrap();
    h.fake.edit(TENANT, |t| {
        t["status"]["lastBackup"] = json!({"time": reported.to_string()});
    });
    h.sync();
    h.reconcile().await.unwrap();
    h.sync();
    assert_eq!(
        h.condition("BackupStale"),
        ("False".into(), "BackupCurrent".into())
    );
    assert_eq!(
        h.tenant().status.unwrap().last_backup.unwrap().time.0,
        reported
    );
    h.advance(Duration::from_secs(12 * 3600));
    h.reconcile().await.unwrap();
    h.sync();
    assert_eq!(
        h.condition("BackupStale"),
        ("True".into(), "BackupOverdue".into())
    );
    let metrics = h.ctx.metrics.render(h.ctx.now());
    assert!(
        metrics.contains("tenantry_operator_backup_stale{tenant=\"acme\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tenantry_operator_backup_age_seconds{tenant=\"acme\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn backups_without_recipients_are_a_condition_and_nothing_else() {
    let mut h = Harness::standard();
    h.add_tenant(json!({"owner": "x", "backup": {}}));
    h.reconcile().await.unwrap();
    h.sync();
    assert!(
        h.fake
            .get(&format!("{CORE}/persistentvolumeclaims/tenant-backups"))
            .is_none()
    );
    assert!(
        h.fake
            .get(&format!("{CORE}/configmaps/tenant-backup-recipients"))
            .is_none()
    );
    let config = h
        .fake
        .get(&format!("{CORE}/configmaps/tenant-runtime-config"))
        .unwrap();
    assert!(
        !config["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("backup")
    );
    assert_eq!(
        h.condition("BackupStale"),
        ("True".into(), "NoBackupRecipients".into())
    );
    h.make_runtime_available();
    h.reconcile().await.unwrap();
    assert_eq!(h.tenant().status.unwrap().phase, Some(TenantPhase::Ready));
}

#[tokio::test]
async fn a_tenant_without_backup_gets_no_backup_objects_or_condition() {
    let mut h = with_backups();
    h.converge().await;
    assert!(
        h.fake
            .get(&format!("{CORE}/persistentvolumeclaims/tenant-backups"))
            .is_none()
    );
    let status = h.tenant().status.unwrap();
    assert!(status.conditions.iter().all(|c| c.type_ != "BackupStale"));
    assert!(status.last_backup.is_none());
}

const CA_SECRET: &str = "/api/v1/namespaces/tenantry-system/secrets/tenantry-ca";
const CA_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/tenantry-system/events";

/// Stores the Harness's CA as the CA Secret, as `load_or_create_ca` makes it.
fn store_ca_secret(h: &Harness) {
    let ca = h.ctx.ca();
    let b64 = |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.into())).unwrap();
    h.fake.put(
        CA_SECRET,
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "tenantry-ca", "namespace": "tenantry-system", "uid": "uid-ca",
                            "labels": {names::LABEL_MANAGED_BY: names::MANAGED_BY}},
               "data": {"tls.crt": b64(ca.issuing().cert_pem()),
                        "tls.key": b64(ca.issuing().key_pem().expose_secret())}}),
    );
}

fn ca_secret(h: &Harness) -> Secret {
    serde_json::from_value(h.fake.get(CA_SECRET).unwrap()).unwrap()
}

/// One step of the leader's CA manager over the stored CA Secret; adopts what it wrote.
async fn ca_step(h: &Harness) -> Option<Duration> {
    let api: Api<Secret> = Api::namespaced(h.ctx.client.clone(), "tenantry-system");
    let (written, wake) = crate::ca::step(&h.ctx, &api, &ca_secret(h)).await.unwrap();
    if let Some(w) = written {
        assert!(h.ctx.set_ca(CaState::from_secret(&w).unwrap()));
    }
    wake
}

fn tls_text(h: &Harness, key: &str) -> String {
    String::from_utf8(h.secret_data("tenant-tls", key)).unwrap()
}

fn events_with_reason(h: &Harness, reason: &str) -> Vec<Value> {
    h.fake
        .objects_of_kind("Event")
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

#[tokio::test]
async fn ca_rotation_bundles_reissues_within_the_window_then_retires_the_old_ca() {
    let mut h = Harness::standard();
    h.converge().await;
    store_ca_secret(&h);
    let old = h.ctx.ca();
    let old_fp = old.fingerprint().to_owned();
    let old_key = old.issuing().key_pem().expose_secret().to_owned();
    let old_leaf = tls_text(&h, "tls.crt");
    // Nothing asked: nothing happens.
    h.fake.clear_log();
    assert_eq!(ca_step(&h).await, None);
    assert_eq!(h.fake.writes(), 0);

    // kubectl annotate secret tenantry-ca tenantry.dev/rotate=2026-q1
    h.fake.edit(CA_SECRET, |s| {
        s["metadata"]["annotations"] = json!({names::ROTATE_CA_ANNOTATION: "2026-q1"});
    });
    let start = h.ctx.now();
    let window = h.ctx.settings.ca_rotation_window;
    assert_eq!(ca_step(&h).await, Some(window));
    let new = h.ctx.ca();
    let new_fp = new.fingerprint().to_owned();
    assert_ne!(new_fp, old_fp);
    // The Secret: the new CA issues, the old certificate stays as previous.crt, the old
    // key is gone from it.
    let stored = ca_secret(&h);
    let data = stored.data.clone().unwrap();
    assert_eq!(data["tls.crt"].0, new.issuing().cert_pem().as_bytes());
    assert_eq!(
        data[names::CA_PREVIOUS_KEY].0,
        old.issuing().cert_pem().as_bytes()
    );
    assert!(data.values().all(|v| v.0 != old_key.as_bytes()));
    let annotations = stored.metadata.annotations.unwrap();
    assert_eq!(
        annotations[names::CA_ROTATION_HANDLED_ANNOTATION],
        "2026-q1"
    );
    assert_eq!(
        annotations[names::CA_ROTATION_STARTED_ANNOTATION],
        start.to_string()
    );
    let started = events_with_reason(&h, "CARotationStarted");
    assert_eq!(started.len(), 1);
    let note = started[0]["note"].as_str().unwrap();
    assert!(note.contains(&old_fp) && note.contains(&new_fp), "{note}");
    assert!(!note.contains("PRIVATE KEY"));
    assert_eq!(started[0]["regarding"]["kind"], "Secret");
    // The same value again does nothing.
    assert_eq!(ca_step(&h).await, Some(window));

    // The tenant's first reconcile only writes the bundle: its leaf stays until its time.
    let reissue_at = new.reissue_at("acme", window);
    assert!(reissue_at >= start);
    if reissue_at == start {
        // The hash put acme at the very start: still never in the bundle's own write.
        h.advance(Duration::ZERO);
    }
    let tls = format!("{CORE}/secrets/tenant-tls");
    h.expect(&[p("GET", &tls), p("PATCH", &tls), p("PATCH", STATUS)])
        .await;
    h.sync();
    assert_eq!(tls_text(&h, "tls.crt"), old_leaf);
    assert_eq!(
        pki::split_bundle(&tls_text(&h, "ca.crt")).unwrap(),
        [
            pki::bundle(&[new.issuing().cert_pem()]),
            pki::bundle(&[old.issuing().cert_pem()])
        ]
    );
    let cs = h.tenant().status.unwrap().certificate.unwrap();
    assert_eq!(cs.issuer_fingerprint.as_deref(), Some(old_fp.as_str()));
    assert_eq!(cs.renewal_time.0, reissue_at);

    // At its time in the window the leaf is re-issued by the new CA, with an Event.
    let until = Duration::try_from(reissue_at.duration_since(h.ctx.now())).unwrap();
    h.advance(until);
    h.expect(&[
        p("GET", &tls),
        p("PATCH", &tls),
        p("POST", EVENTS),
        p("PATCH", STATUS),
    ])
    .await;
    h.sync();
    let leaf = tls_text(&h, "tls.crt");
    assert!(new.issuing().signed(&leaf));
    assert!(!old.issuing().signed(&leaf));
    let cs = h.tenant().status.unwrap().certificate.unwrap();
    assert_eq!(cs.issuer_fingerprint.as_deref(), Some(new_fp.as_str()));
    assert_eq!(events_with_reason(&h, "CertificateReissued").len(), 1);
    // Converged: an idle resync writes nothing.
    h.expect(&[]).await;

    // Before the window ends the old CA stays; after it, it is retired.
    let end = start
        .checked_add(jiff::SignedDuration::try_from(window).unwrap())
        .unwrap();
    let left = Duration::try_from(end.duration_since(h.ctx.now())).unwrap();
    if left > Duration::ZERO {
        assert!(ca_step(&h).await.is_some());
        assert!(
            ca_secret(&h)
                .data
                .unwrap()
                .contains_key(names::CA_PREVIOUS_KEY)
        );
    }
    h.advance(left);
    // Not while the re-issued leaf may not be served yet.
    let leaf_age = Duration::try_from(h.ctx.now().duration_since(reissue_at)).unwrap();
    if leaf_age < crate::ca::SERVE_GRACE {
        assert_eq!(ca_step(&h).await, Some(crate::ca::RECHECK));
        h.advance(crate::ca::SERVE_GRACE - leaf_age);
    }
    ca_step(&h).await;
    let stored = ca_secret(&h);
    assert!(!stored.data.unwrap().contains_key(names::CA_PREVIOUS_KEY));
    assert!(
        !stored
            .metadata
            .annotations
            .unwrap()
            .contains_key(names::CA_ROTATION_STARTED_ANNOTATION)
    );
    let retired = events_with_reason(&h, "CARetired");
    assert_eq!(retired.len(), 1);
    assert!(retired[0]["note"].as_str().unwrap().contains(&old_fp));
    assert!(
        h.fake
            .log()
            .iter()
            .any(|l| l.starts_with(&format!("POST {CA_EVENTS}")))
    );
    // The bundle goes back to the new CA alone; the leaf (and so the status) is kept.
    h.expect(&[p("GET", &tls), p("PATCH", &tls)]).await;
    assert_eq!(tls_text(&h, "ca.crt"), h.ctx.ca().bundle());
    assert_eq!(pki::split_bundle(&tls_text(&h, "ca.crt")).unwrap().len(), 1);
    assert_eq!(tls_text(&h, "tls.crt"), leaf);
}

#[tokio::test]
async fn the_old_ca_is_not_retired_while_a_leaf_from_it_remains() {
    let mut h = Harness::standard();
    h.converge().await;
    store_ca_secret(&h);
    h.fake.edit(CA_SECRET, |s| {
        s["metadata"]["annotations"] = json!({names::ROTATE_CA_ANNOTATION: "x"});
    });
    ca_step(&h).await;
    // The whole window passes without a reconcile of the tenant (a stuck operator).
    h.advance(h.ctx.settings.ca_rotation_window);
    assert_eq!(ca_step(&h).await, Some(crate::ca::RECHECK));
    assert!(
        ca_secret(&h)
            .data
            .unwrap()
            .contains_key(names::CA_PREVIOUS_KEY)
    );
    // A leaf whose time has passed is re-issued at once, once its Secret has the bundle.
    let tls = format!("{CORE}/secrets/tenant-tls");
    h.expect(&[p("GET", &tls), p("PATCH", &tls), p("PATCH", STATUS)])
        .await;
    h.sync();
    h.expect(&[
        p("GET", &tls),
        p("PATCH", &tls),
        p("POST", EVENTS),
        p("PATCH", STATUS),
    ])
    .await;
    h.sync();
    // Re-issued just now: retired once it has surely reached the runtime.
    assert_eq!(ca_step(&h).await, Some(crate::ca::RECHECK));
    h.advance(crate::ca::SERVE_GRACE);
    ca_step(&h).await;
    assert!(
        !ca_secret(&h)
            .data
            .unwrap()
            .contains_key(names::CA_PREVIOUS_KEY)
    );
}

#[tokio::test]
async fn a_new_operator_during_the_overlap_carries_the_rotation_on() {
    let mut h = Harness::standard();
    h.converge().await;
    store_ca_secret(&h);
    h.fake.edit(CA_SECRET, |s| {
        s["metadata"]["annotations"] = json!({names::ROTATE_CA_ANNOTATION: "x"});
    });
    ca_step(&h).await;
    let rotated = h.ctx.ca();
    // Another replica takes over: it loads the CA Secret as it finds it.
    let settings = h.ctx.settings.clone();
    let mut next = Harness::over(&h);
    let loaded = load_or_create_ca(&next.ctx.client, &settings)
        .await
        .unwrap();
    assert!(loaded.same(&rotated));
    assert_eq!(
        loaded.previous_fingerprint(),
        rotated.previous_fingerprint()
    );
    next.ctx.set_ca(loaded);
    // The same annotation does not rotate again.
    assert_eq!(ca_step(&next).await, Some(settings.ca_rotation_window));
    assert_eq!(next.ctx.ca().fingerprint(), rotated.fingerprint());
    // It re-issues and retires like the first would have.
    next.advance(settings.ca_rotation_window);
    next.sync();
    next.reconcile().await.unwrap();
    next.sync();
    next.reconcile().await.unwrap();
    next.sync();
    assert!(rotated.issuing().signed(&tls_text(&next, "tls.crt")));
    next.advance(crate::ca::SERVE_GRACE);
    ca_step(&next).await;
    assert!(
        !ca_secret(&next)
            .data
            .unwrap()
            .contains_key(names::CA_PREVIOUS_KEY)
    );
    assert_eq!(
        next.tenant()
            .status
            .unwrap()
            .certificate
            .unwrap()
            .issuer_fingerprint
            .as_deref(),
        Some(rotated.fingerprint())
    );
    drop(h);
}

#[tokio::test]
async fn the_rotate_ca_flag_rotates_once_per_value() {
    let mut h = Harness::standard();
    h.converge().await;
    store_ca_secret(&h);
    let mut settings = h.ctx.settings.clone();
    settings.rotate_ca = Some("v1".into());
    let mut flagged = Harness::over(&h);
    Arc::get_mut(&mut flagged.ctx).unwrap().settings = settings;
    let before = flagged.ctx.ca().fingerprint().to_owned();
    ca_step(&flagged).await;
    assert_ne!(flagged.ctx.ca().fingerprint(), before);
    let annotations = ca_secret(&flagged).metadata.annotations.unwrap();
    assert_eq!(
        annotations[names::CA_ROTATION_FLAG_HANDLED_ANNOTATION],
        "v1"
    );
    // After the rotation ends, the same flag value does nothing more.
    flagged.advance(flagged.ctx.settings.ca_rotation_window);
    flagged.sync();
    flagged.reconcile().await.unwrap();
    flagged.sync();
    flagged.reconcile().await.unwrap();
    flagged.sync();
    flagged.advance(crate::ca::SERVE_GRACE);
    ca_step(&flagged).await;
    assert!(
        !ca_secret(&flagged)
            .data
            .unwrap()
            .contains_key(names::CA_PREVIOUS_KEY)
    );
    let after = flagged.ctx.ca().fingerprint().to_owned();
    assert_eq!(ca_step(&flagged).await, None);
    assert_eq!(flagged.ctx.ca().fingerprint(), after);
}
