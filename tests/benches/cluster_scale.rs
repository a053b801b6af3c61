//! The operator at scale on a real Kubernetes API server. Run by hand:
//!
//! ```sh
//! cargo build --release -p tenantry-operator
//! KUBECONFIG=... cargo bench -p tenantry-tests --bench cluster_scale
//! ```
//!
//! It prints, side by side in one run:
//! - the bound: the same number of server-side applies a tenant costs, sent by a plain
//!   client at the operator's concurrency (the API server's write rate is the limit);
//! - N Tenants applied before the operator starts, then N while it runs: the time until
//!   every one has all its children and `CertificateReady=True`, and the ratio to the bound;
//! - writes per Tenant on create and during an idle period, by the API server's own
//!   `apiserver_request_total`;
//! - SIGTERM time, writes after a restart, and the operator's peak RSS.
//!
//! `TENANTRY_BENCH_TENANTS` (default 1000), `TENANTRY_BENCH_IDLE_SECONDS` (default 300),
//! `TENANTRY_E2E_OPERATOR_BIN` (default `target/release/tenantry-operator`). It skips,
//! saying why, without `KUBECONFIG`. It deletes what it made at the end (minutes, at
//! 2 × 1000 namespaces); a disposable cluster can be reset instead. Every Tenant (and
//! every bound run) gets a ClusterIP Service, so the cluster's
//! `--service-cluster-ip-range` must hold 2 × N addresses and some: a /20 or wider for the
//! default N (a /24 fails with "range is full").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tenantry_kube::crd::Tenant;
use tenantry_operator::builders::{self, Owner};
use tenantry_operator::config::Settings;
use tenantry_tests::cluster::{Cluster, OperatorOptions, OperatorProcess, cluster, condition};

const NS: &str = "tenantry-bench";
const CLASS: &str = "tenantry-bench-encrypted";
const CONCURRENCY: usize = 16;
/// Writes one Tenant costs on create (see the operator suite's `WRITES_ON_CREATE`).
const WRITES_PER_TENANT: u64 = 16;
const TOKEN_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec() -> serde_json::Value {
    json!({"owner": "bench@example.com", "plan": "free", "storage": {"storageClassName": CLASS}})
}

/// Applies `obj` with the bound's field manager, without owner references (the owner
/// does not exist, and the garbage collector would otherwise delete what is measured).
async fn apply<K>(client: &Client, obj: K) -> Result<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut obj = obj;
    obj.meta_mut().owner_references = None;
    let name = obj.name_any();
    let resource = ApiResource::erase::<K>(&());
    let obj: DynamicObject = serde_json::from_value(serde_json::to_value(&obj)?)?;
    let api: Api<DynamicObject> = match obj.metadata.namespace.clone() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply("tenantry-bench-bound").force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("applying {} {name}", K::kind(&())))?;
    Ok(())
}

/// One tenant's worth of applies, as a plain client sends them: the 14 children the
/// operator makes, and two ConfigMaps standing in for its finalizer and status writes.
async fn bound_tenant(client: Client, name: String) -> Result<()> {
    let mut tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": name, "uid": format!("bound-{name}")}, "spec": spec(),
    }))?;
    tenant.metadata.generation = Some(1);
    let owner = Owner::of(&tenant)?;
    let settings = Settings {
        operator_namespace: NS.into(),
        control_plane_namespace: NS.into(),
        ..Settings::default()
    };
    apply(&client, builders::desired_namespace(&owner)).await?;
    apply(&client, builders::service_account(&owner)).await?;
    apply(&client, builders::default_deny_policy(&owner)).await?;
    apply(&client, builders::ingress_policy(&owner, &settings)).await?;
    apply(&client, builders::egress_policy(&owner, &settings)).await?;
    apply(&client, builders::resource_quota(&owner)).await?;
    apply(&client, builders::limit_range(&owner)).await?;
    apply(
        &client,
        builders::data_key_secret(&owner, &[7u8; 32], None, None),
    )
    .await?;
    apply(&client, builders::data_pvc(&owner, CLASS)).await?;
    let key = secrecy::SecretString::from(
        "-----BEGIN PRIVATE KEY-----\nbench\n-----END PRIVATE KEY-----\n",
    );
    apply(
        &client,
        builders::tls_secret(&owner, "bench", &key, "bench"),
    )
    .await?;
    apply(&client, builders::token_key_secret(&owner, TOKEN_PEM)).await?;
    let (cm, hash) = builders::config_map(&owner, &settings)?;
    apply(&client, cm).await?;
    apply(&client, builders::deployment(&owner, &settings, &hash)).await?;
    apply(&client, builders::service(&owner)).await?;
    for stand_in in ["finalizer", "status"] {
        let mut cm = builders::config_map(&owner, &settings)?.0;
        cm.metadata.name = Some(format!("bench-{stand_in}"));
        apply(&client, cm).await?;
    }
    Ok(())
}

async fn for_all<F, Fut>(names: &[String], f: F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = futures::stream::iter(names.iter().cloned().map(f))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Waits until every Tenant in `names` has `CertificateReady=True` for its generation;
/// returns the time taken from `start`.
async fn all_converged(
    cluster: &Cluster,
    prefix: &str,
    n: usize,
    start: Instant,
) -> Result<Duration> {
    let tenants: Api<Tenant> = Api::all(cluster.client.clone());
    let mut last_report = Instant::now();
    loop {
        let list = tenants.list(&ListParams::default()).await?;
        let done = list
            .iter()
            .filter(|t| t.name_any().starts_with(prefix))
            .filter(|t| {
                condition(t, "CertificateReady").as_deref() == Some("True")
                    && condition(t, "StorageEncrypted").as_deref() == Some("True")
                    && t.status.as_ref().and_then(|s| s.observed_generation)
                        == t.metadata.generation
            })
            .count();
        if done >= n {
            return Ok(start.elapsed());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {done}/{n} converged after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("only {done}/{n} converged within an hour");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn delete_namespaces(cluster: &Cluster, prefix: &str) -> Result<Duration> {
    let start = Instant::now();
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|n| n.name_any())
        .filter(|n| n.starts_with(prefix))
        .collect();
    for_all(&names, |n| {
        let namespaces = namespaces.clone();
        async move {
            let _ = namespaces.delete(&n, &DeleteParams::background()).await;
            Ok(())
        }
    })
    .await?;
    loop {
        let left = namespaces
            .list(&ListParams::default())
            .await?
            .iter()
            .filter(|n| n.name_any().starts_with(prefix))
            .count();
        if left == 0 {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn release_binary() -> PathBuf {
    std::env::var_os("TENANTRY_E2E_OPERATOR_BIN")
        .map(Into::into)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tenantry-operator")
        })
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> Result<()> {
    let Some(cluster) = cluster("the cluster_scale benchmark").await? else {
        return Ok(());
    };
    let n = env_number("TENANTRY_BENCH_TENANTS", 1000) as usize;
    let idle = Duration::from_secs(env_number("TENANTRY_BENCH_IDLE_SECONDS", 300));
    let binary = release_binary();
    if !binary.is_file() {
        bail!(
            "{} is missing: cargo build --release -p tenantry-operator",
            binary.display()
        );
    }
    cluster.install_crd().await?;
    cluster.install_chart_rbac(NS).await?;
    cluster.token_public_key(NS, TOKEN_PEM).await?;
    cluster.storage_class(CLASS, true).await?;
    let dir = tempfile::tempdir()?;
    let options = OperatorOptions {
        binary,
        kubeconfig: cluster
            .service_account_kubeconfig(NS, "tenantry-operator", dir.path())
            .await?,
        namespace: NS.into(),
        lease_seconds: 15,
        extra: vec!["--concurrency".into(), CONCURRENCY.to_string()],
        log_dir: dir.path().to_owned(),
    };
    println!(
        "tenantry-operator on a real API server: {n} Tenants before the start, {n} while it runs, concurrency {CONCURRENCY}"
    );

    // 1. The bound.
    let bound_names: Vec<String> = (0..n).map(|i| format!("bound{i:04}")).collect();
    let client = cluster.client.clone();
    let before = cluster.request_counts().await?;
    let start = Instant::now();
    for_all(&bound_names, |name| bound_tenant(client.clone(), name)).await?;
    let bound = start.elapsed();
    let after = cluster.request_counts().await?;
    println!(
        "bound: {} server-side applies by a plain client in {:.1} s ({:.0} applies/s)",
        after.applies(&before),
        bound.as_secs_f64(),
        after.applies(&before) as f64 / bound.as_secs_f64()
    );
    let cleanup = delete_namespaces(&cluster, "tenant-bound").await?;
    println!(
        "  (its {n} namespaces deleted in {:.1} s)",
        cleanup.as_secs_f64()
    );

    // 2. N Tenants before the start.
    let first: Vec<String> = (0..n).map(|i| format!("bench-a{i:04}")).collect();
    let tenants_client = cluster.client.clone();
    for_all(&first, |name| {
        let cluster = Cluster {
            client: tenants_client.clone(),
        };
        async move { cluster.create_tenant(&name, spec()).await }
    })
    .await?;
    let counts = cluster.request_counts().await?;
    let start = Instant::now();
    let mut operator = OperatorProcess::start(&options, "bench-a")?;
    let converged_first = all_converged(&cluster, "bench-a", n, start).await?;
    let now = cluster.request_counts().await?;
    let writes_first = now.operator_writes(&counts);
    let dry_first = now.dry_runs(&counts);
    println!("first batch, every write counted (the operator's own start included):");
    for line in now.changes(&counts) {
        println!("  {line}");
    }

    // 3. N more while it runs.
    let second: Vec<String> = (0..n).map(|i| format!("bench-b{i:04}")).collect();
    let counts = cluster.request_counts().await?;
    let start = Instant::now();
    let shared = Arc::new(cluster.client.clone());
    for_all(&second, |name| {
        let cluster = Cluster {
            client: (*shared).clone(),
        };
        async move { cluster.create_tenant(&name, spec()).await }
    })
    .await?;
    let converged_second = all_converged(&cluster, "bench-b", n, start).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = cluster.request_counts().await?;
    let writes_second = now.operator_writes(&counts);
    let dry_second = now.dry_runs(&counts);

    // 4. Idle.
    let counts = cluster.request_counts().await?;
    let reconciles = operator
        .metric("tenantry_operator_reconciles_total")
        .unwrap_or(0.0);
    tokio::time::sleep(idle).await;
    let now = cluster.request_counts().await?;
    let idle_writes = now.operator_writes(&counts);
    let idle_reconciles = operator
        .metric("tenantry_operator_reconciles_total")
        .unwrap_or(0.0)
        - reconciles;
    let peak = operator.peak_rss_kib().unwrap_or(0);

    // 5. SIGTERM and restart.
    let (stop, clean) = operator.terminate()?;
    let counts = cluster.request_counts().await?;
    let start = Instant::now();
    let restarted = OperatorProcess::start(&options, "bench-a")?;
    loop {
        let done = restarted
            .metric("tenantry_operator_reconciles_total")
            .unwrap_or(0.0);
        if done >= (2 * n) as f64 {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("the restarted operator reconciled only {done} Tenants in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let restart_resync = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = cluster.request_counts().await?;
    let restart_writes = now.operator_writes(&counts);
    let restart_peak = restarted.peak_rss_kib().unwrap_or(0);

    let b = bound.as_secs_f64();
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| bound: {} applies by a plain client ({n} tenants × {WRITES_PER_TENANT}) | {b:.1} s |",
        n as u64 * WRITES_PER_TENANT
    );
    println!(
        "| {n} Tenants before the start: all converged | {:.1} s ({:.2} × bound) |",
        converged_first.as_secs_f64(),
        converged_first.as_secs_f64() / b
    );
    println!(
        "| {n} Tenants while running: all converged | {:.1} s ({:.2} × bound) |",
        converged_second.as_secs_f64(),
        converged_second.as_secs_f64() / b
    );
    println!(
        "| writes per Tenant on create (first / second batch; goal {WRITES_PER_TENANT}) | {:.2} / {:.2} |",
        writes_first as f64 / n as f64,
        writes_second as f64 / n as f64
    );
    println!("| dry-run applies (first / second batch) | {dry_first} / {dry_second} |");
    println!(
        "| writes in {} s idle ({idle_reconciles} reconciles) | {idle_writes} |",
        idle.as_secs()
    );
    println!(
        "| SIGTERM to exit | {:.3} s (clean: {clean}) |",
        stop.as_secs_f64()
    );
    println!(
        "| restart: every Tenant reconciled | {:.1} s |",
        restart_resync.as_secs_f64()
    );
    println!("| restart: writes | {restart_writes} |");
    println!(
        "| peak RSS, {} Tenants (first run / after restart) | {:.1} MiB / {:.1} MiB |",
        2 * n,
        peak as f64 / 1024.0,
        restart_peak as f64 / 1024.0
    );

    // 6. Clean up with the operator still running.
    let start = Instant::now();
    cluster
        .delete_tenants("bench-", Duration::from_secs(3600))
        .await?;
    println!(
        "\ncleanup: {} Tenants deleted in {:.1} s",
        2 * n,
        start.elapsed().as_secs_f64()
    );
    drop(restarted);
    Ok(())
}
