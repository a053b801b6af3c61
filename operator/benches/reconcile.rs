//! Reconcile benchmark: 1,000 Tenants against the in-memory fake API server.
//!
//! Prints API writes per tenant on create (goal: at most children + 2), writes per idle
//! resync (goal: 0), CPU time per reconcile, and the process's peak memory.
//! Run with `cargo bench -p tenantry-operator --features fake-api`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::json;
use tenantry_kube::crd::{Tenant, TenantPhase};
use tenantry_operator::cache::Caches;
use tenantry_operator::config::Settings;
use tenantry_operator::controller::{Context, reconcile};
use tenantry_operator::fake_api::FakeApi;
use tenantry_operator::metrics::Metrics;
use tenantry_operator::object::TenantObject;
use tenantry_pki::CertificateAuthority;

const TENANTS: usize = 1_000;
/// Namespace, ServiceAccount, 3 NetworkPolicies, ResourceQuota, LimitRange, data-key
/// Secret, PVC, TLS Secret, token-key Secret, ConfigMap, Deployment, Service.
const CHILDREN: usize = 14;

/// User + system CPU time of this process, from /proc (Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    // The kernel's USER_HZ is 100 on every mainstream Linux architecture.
    Duration::from_millis(total * 10)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn tenants(fake: &FakeApi) -> Vec<Arc<TenantObject>> {
    fake.objects_of_kind("Tenant")
        .into_iter()
        .map(|v| {
            Arc::new(TenantObject::from(
                serde_json::from_value::<Tenant>(v).unwrap(),
            ))
        })
        .collect()
}

struct Phase {
    writes: usize,
    cpu: Duration,
    wall: Duration,
}

async fn run_all(fake: &FakeApi, ctx: &Arc<Context>) -> Phase {
    let list = tenants(fake);
    let writes = fake.writes();
    let cpu = cpu_time();
    let wall = Instant::now();
    for t in list {
        reconcile(t, ctx.clone()).await.unwrap();
    }
    Phase {
        writes: fake.writes() - writes,
        cpu: cpu_time().saturating_sub(cpu),
        wall: wall.elapsed(),
    }
}

fn report(name: &str, p: &Phase) {
    let n = TENANTS as f64;
    println!(
        "{name:<28} writes/tenant {:>6.2}   CPU/reconcile {:>8.1} µs   wall/reconcile {:>8.1} µs",
        p.writes as f64 / n,
        p.cpu.as_secs_f64() * 1e6 / n,
        p.wall.as_secs_f64() * 1e6 / n,
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let fake = FakeApi::new();
        let caches = Arc::new(Caches::default());
        fake.sync_caches(&caches);
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let settings = Settings {
            encrypted_storage_classes: vec!["encrypted".into()],
            default_storage_class: Some("encrypted".into()),
            ..Settings::default()
        };
        let ctx = Arc::new(
            Context::new(
                fake.client(),
                settings,
                Arc::new(
                    tenantry_operator::ca::CaState::new(
                        CertificateAuthority::generate("bench CA", now).unwrap(),
                    )
                    .unwrap(),
                ),
                caches.clone(),
                Some("-----BEGIN PUBLIC KEY-----\nbench\n-----END PUBLIC KEY-----\n".into()),
                Arc::new(Metrics::new()),
            )
            .with_clock(move || now),
        );
        for i in 0..TENANTS {
            let name = format!("t{i:04}");
            let mut t = Tenant::new(
                &name,
                serde_json::from_value(json!({"owner": format!("{name}@example.com"), "plan": "standard"}))
                    .unwrap(),
            );
            t.metadata.uid = Some(format!("uid-{name}"));
            t.metadata.generation = Some(1);
            fake.put(
                &format!("/apis/tenantry.dev/v1alpha1/tenants/{name}"),
                serde_json::to_value(&t).unwrap(),
            );
        }

        println!("tenantry-operator reconcile benchmark: {TENANTS} tenants, in-memory fake API server");
        println!("(CPU time includes the fake server's work in the same process)\n");
        let create = run_all(&fake, &ctx).await;
        report("create from nothing", &create);

        // The runtimes come up: every Deployment reports available.
        for d in fake.objects_of_kind("Deployment") {
            let ns = d["metadata"]["namespace"].as_str().unwrap().to_owned();
            fake.edit(
                &format!("/apis/apps/v1/namespaces/{ns}/deployments/tenant-runtime"),
                |d| {
                    let g = d["metadata"]["generation"].clone();
                    d["status"] = json!({"observedGeneration": g, "availableReplicas": 1, "readyReplicas": 1, "replicas": 1});
                },
            );
        }
        fake.sync_caches(&caches);
        let ready = run_all(&fake, &ctx).await;
        report("runtime becomes ready", &ready);
        fake.sync_caches(&caches);

        let idle = run_all(&fake, &ctx).await;
        report("idle resync", &idle);
        let idle2 = run_all(&fake, &ctx).await;
        report("idle resync (again)", &idle2);

        let ready_count = tenants(&fake)
            .iter()
            .filter(|t| t.status().and_then(|s| s.phase) == Some(TenantPhase::Ready))
            .count();
        println!();
        println!(
            "writes per tenant on create: {:.2} (goal <= children + 2 = {})",
            create.writes as f64 / TENANTS as f64,
            CHILDREN + 2
        );
        println!(
            "writes per tenant when the runtime turns ready: {:.2} (status + Event)",
            ready.writes as f64 / TENANTS as f64
        );
        println!(
            "writes per idle resync: {:.2} (goal 0)",
            (idle.writes + idle2.writes) as f64 / (2 * TENANTS) as f64
        );
        println!("tenants Ready: {ready_count}/{TENANTS}");
        println!("peak memory (VmHWM): {:.1} MiB", peak_rss_kib() as f64 / 1024.0);
        assert_eq!(idle.writes + idle2.writes, 0, "an idle resync wrote");
        assert!(create.writes <= TENANTS * (CHILDREN + 2), "too many writes on create");
    });
}
