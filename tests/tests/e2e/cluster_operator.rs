//! The operator on a real Kubernetes API server: runs when `KUBECONFIG` is set, and says
//! why it skipped otherwise.
//!
//! It runs the real `tenantry-operator` binary under the chart's ServiceAccount and RBAC
//! (rendered by Helm, applied, token from the TokenRequest API), so the real authorizer
//! checks every call. Writes are counted by the API server itself
//! (`apiserver_request_total`). The steps run in order, each on its own Tenants:
//! 1. the schema refuses bad Tenants, `kubectl apply` included;
//! 2. Tenants made before the operator starts and while it runs all converge (a mix of
//!    encrypted and unencrypted classes), with one write per child; every child as stored
//!    still matches what the builders make (so no comparison ever needs the server);
//!    an idle resync writes nothing; SIGTERM stops it in under 5 s with its Lease released,
//!    and the restarted operator writes nothing;
//! 3. two Tenants through suspension, resumption, certificate renewal, repair of deleted
//!    and hand-edited children, and deletion;
//! 4. a Tenant with backups (the backup volume, recipients and `BackupStale`), and a data
//!    key rotation on the `tenantry.dev/rotate-data-key` annotation (new key-encryption key,
//!    the previous one beside it, an Event naming key ids only);
//! 5. a Tenant this operator cannot read and one whose spec fails its checks get a
//!    condition and an Event, and block nobody;
//! 6. two replicas: one reconciles; SIGKILL the leader and the other takes over within the
//!    lease duration; then a rolling update (a third replica waits, SIGTERM the leader, which
//!    releases the Lease, so the waiting one takes over within a renew period); the last
//!    leader converges everything, leaving no orphaned namespace.
//!
//! The runtime image need not be pullable and the cluster needs no nodes: `RuntimeReady`
//! only has to be reported.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tenantry_kube::crd::Tenant;
use tenantry_kube::names;
use tenantry_operator::builders::{self, Owner};
use tenantry_operator::config::Settings;
use tenantry_operator::diff::first_difference;
use tenantry_tests::bin;
use tenantry_tests::cluster::{
    Cluster, OperatorOptions, OperatorProcess, RequestCounts, cluster, condition, eventually,
    kubectl_with, lock_cluster,
};

/// Namespace of the operator (the chart's release namespace in these tests).
const NS: &str = "tenantry-e2e";
const ENCRYPTED: &str = "tenantry-e2e-encrypted";
const PLAIN: &str = "tenantry-e2e-plain";
const LEASE_SECONDS: u32 = 6;
/// The recipient the operator encrypts tenants' backups to (a public key).
const BACKUP_RECIPIENT: &str = "age1a00zyuy8k7tmeeglkq5qn2wh4t6d22shz79fgm5nd5gq3kn0z3sqlc9dfp";
const TOKEN_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

struct Env {
    cluster: Cluster,
    options: OperatorOptions,
    _dir: tempfile::TempDir,
}

impl Env {
    fn tenants(&self) -> Api<Tenant> {
        Api::all(self.cluster.client.clone())
    }

    fn in_tenant<K>(&self, tenant: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(
            self.cluster.client.clone(),
            &names::tenant_namespace(tenant),
        )
    }

    async fn tenant(&self, name: &str) -> Result<Tenant> {
        self.tenants()
            .get(name)
            .await
            .with_context(|| format!("reading Tenant {name}"))
    }

    /// Waits until every Tenant in `names` is converged: certificate issued, children in
    /// place, and the storage condition as its class says.
    async fn converged(&self, tenants: &[(String, bool)], within: Duration) -> Result<()> {
        for (name, encrypted) in tenants {
            eventually(&format!("Tenant {name} to converge"), within, || async {
                let t = self.tenant(name).await?;
                let storage = condition(&t, "StorageEncrypted");
                let ok = condition(&t, "NamespaceReady").as_deref() == Some("True")
                    && condition(&t, "NetworkIsolated").as_deref() == Some("True")
                    && condition(&t, "CertificateReady").as_deref() == Some("True")
                    && storage.as_deref() == Some(if *encrypted { "True" } else { "False" })
                    && condition(&t, "RuntimeReady").is_some()
                    && t.status.as_ref().and_then(|s| s.observed_generation)
                        == t.metadata.generation;
                if !ok {
                    return Ok(None);
                }
                let deployment = self
                    .in_tenant::<Deployment>(name)
                    .get_opt(names::DEPLOYMENT)
                    .await?;
                let service = self
                    .in_tenant::<Service>(name)
                    .get_opt(names::SERVICE)
                    .await?;
                Ok((deployment.is_some() == *encrypted && service.is_some()).then_some(()))
            })
            .await?;
        }
        Ok(())
    }

    /// Waits until each Tenant in `tenants` runs `replicas` replicas and reports `phase`.
    async fn scaled_to(&self, tenants: &[&str], replicas: i32, phase: &str) -> Result<()> {
        for name in tenants {
            eventually(
                &format!("{name} at {replicas} replicas, {phase}"),
                Duration::from_secs(60),
                || async {
                    let now = self
                        .in_tenant::<Deployment>(name)
                        .get(names::DEPLOYMENT)
                        .await?
                        .spec
                        .and_then(|s| s.replicas);
                    let at = self.tenant(name).await?.status.and_then(|s| s.phase);
                    Ok(
                        (now == Some(replicas) && at.map(|p| p.as_str()) == Some(phase))
                            .then_some(()),
                    )
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Waits until `identity` holds the operator's Lease.
    async fn leader_is(&self, identity: &str) -> Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.cluster.client.clone(), NS);
        eventually(
            &format!("{identity} to hold the Lease"),
            Duration::from_secs(60),
            || async {
                let holder = leases
                    .get(names::DEFAULT_LEASE_NAME)
                    .await?
                    .spec
                    .and_then(|s| s.holder_identity);
                Ok((holder.as_deref() == Some(identity)).then_some(()))
            },
        )
        .await
    }

    fn start(&self, identity: &str) -> Result<OperatorProcess> {
        OperatorProcess::start(&self.options, identity)
    }
}

/// One step through [`tenantry_tests::step`] (its name and time printed); an error names
/// the step.
async fn step<T>(name: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    tenantry_tests::step(name, f)
        .await
        .with_context(|| format!("step {name:?} failed"))
}

async fn setup(cluster: Cluster) -> Result<Env> {
    cluster.install_crd().await?;
    cluster.install_chart_rbac(NS).await?;
    cluster.token_public_key(NS, TOKEN_PEM).await?;
    cluster.storage_class(ENCRYPTED, true).await?;
    cluster.storage_class(PLAIN, false).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = cluster
        .service_account_kubeconfig(NS, "tenantry-operator", dir.path())
        .await?;
    let recipients = dir.path().join("backup-recipients");
    std::fs::write(&recipients, format!("# test\n{BACKUP_RECIPIENT}\n"))?;
    let options = OperatorOptions {
        binary: std::env::var_os("TENANTRY_E2E_OPERATOR_BIN")
            .map(Into::into)
            .unwrap_or_else(|| bin("tenantry-operator")),
        kubeconfig,
        namespace: NS.into(),
        lease_seconds: LEASE_SECONDS,
        extra: vec![
            "--resync-seconds".into(),
            "10".into(),
            "--backup-recipients-file".into(),
            recipients.display().to_string(),
            // A CA rotation runs in well under a minute here (the default is 1h).
            "--ca-rotation-window".into(),
            "20s".into(),
        ],
        log_dir: dir.path().to_owned(),
    };
    Ok(Env {
        cluster,
        options,
        _dir: dir,
    })
}

#[tokio::test]
async fn operator_on_a_real_api_server() -> Result<()> {
    let Some(cluster) = cluster("operator_on_a_real_api_server").await? else {
        return Ok(());
    };
    // The other real-cluster test runs operators too: one at a time on the shared cluster.
    let _turn = lock_cluster().await?;
    let env = setup(cluster).await?;
    // Leftovers of an interrupted run would be reconciled by the operators below.
    let mut sweeper = env.start("e2e-sweeper")?;
    env.cluster
        .delete_tenants("e2e-", Duration::from_secs(300))
        .await?;
    sweeper.terminate()?;
    drop(sweeper);

    let result = async {
        step("the schema refuses bad Tenants", schema_refuses(&env)).await?;
        let operator = step("convergence, idle and restart", converge(&env)).await?;
        step("two Tenants' lifecycle", lifecycle(&env)).await?;
        step("a Tenant with backups", backups(&env)).await?;
        step("a data key rotation", data_key_rotation(&env)).await?;
        step("a CA rotation", ca_rotation(&env)).await?;
        step("unreadable and invalid Tenants", unreadable(&env)).await?;
        step("two replicas", two_replicas(&env, operator)).await
    }
    .await;
    if result.is_err() {
        for entry in std::fs::read_dir(&env.options.log_dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("=== {} (last lines)", entry.path().display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
    result
}

async fn schema_refuses(env: &Env) -> Result<()> {
    let tenants = env.tenants();
    for (bad, why) in [
        (json!({"owner": "x", "plan": "gold"}), "unknown plan"),
        (
            json!({"owner": "x", "retention": {"maxAgeHours": 721}}),
            "retention over the hard cap",
        ),
        (
            json!({"owner": "x", "storage": {"size": "1.5Gi"}}),
            "fractional size",
        ),
        (
            json!({"owner": "x", "network": {"allowedIngressNamespaces": ["tenant-other"]}}),
            "another tenant",
        ),
        (
            json!({"owner": "x", "tls": {"duration": "30m"}}),
            "a certificate shorter than 1h",
        ),
        (
            json!({"owner": "x", "oauth2": {"allowedHosts": ["https://evil.example/"]}}),
            "an OAuth 2 host that is a URL",
        ),
    ] {
        let raw = json!({"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "e2e-bad"}, "spec": bad});
        let refused = tenants
            .patch(
                "e2e-bad",
                &PatchParams::apply("tenantry-e2e"),
                &Patch::Apply(&raw),
            )
            .await;
        match refused {
            Err(kube::Error::Api(s)) if s.code == 422 => {}
            other => bail!("{why} was not refused: {other:?}"),
        }
        let (ok, _, stderr) = kubectl_with(&["apply", "-f", "-"], &serde_json::to_string(&raw)?)?;
        ensure!(!ok, "kubectl apply accepted {why}");
        eprintln!("kubectl apply refused {why}: {}", stderr.trim());
    }
    Ok(())
}

/// Every child as stored by the API server still holds every field the builders set, so
/// the operator's comparison succeeds without asking the server.
async fn children_match_builders(env: &Env, name: &str) -> Result<()> {
    let tenant = env.tenant(name).await?;
    let owner = Owner::of(&tenant)?;
    let settings = Settings {
        operator_namespace: NS.into(),
        control_plane_namespace: NS.into(),
        ..Settings::default()
    };
    async fn check<K>(api: Api<K>, desired: K) -> Result<()>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    {
        let name = desired.name_any();
        let stored = api
            .get(&name)
            .await
            .with_context(|| format!("reading {} {name}", K::kind(&())))?;
        let want = serde_json::to_value(&desired)?;
        let have = serde_json::to_value(&stored)?;
        if let Some(path) = first_difference(&want, &have) {
            bail!(
                "{} {name}: the stored object differs from the built one at {path}",
                K::kind(&())
            );
        }
        Ok(())
    }
    let client = env.cluster.client.clone();
    let ns = names::tenant_namespace(name);
    check(
        Api::all(client.clone()),
        builders::desired_namespace(&owner),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::service_account(&owner),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::default_deny_policy(&owner),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::ingress_policy(&owner, &settings),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::egress_policy(&owner, &settings),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::resource_quota(&owner),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::limit_range(&owner),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::data_pvc(&owner, ENCRYPTED),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::token_key_secret(&owner, TOKEN_PEM),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::config_map(&owner, &settings)?.0,
    )
    .await?;
    let stored: ConfigMap = Api::namespaced(client.clone(), &ns)
        .get(names::CONFIG_MAP)
        .await?;
    let config: tenantry_proto::runtime_config::RuntimeConfig = serde_yaml::from_str(
        stored
            .data
            .as_ref()
            .and_then(|d| d.get(names::CONFIG_KEY))
            .context("the runtime config")?,
    )?;
    ensure!(
        config.oauth2.allowed_hosts == OAUTH2_HOSTS,
        "{name}: the runtime allows OAuth 2 hosts {:?}",
        config.oauth2.allowed_hosts
    );
    let (_, hash) = builders::config_map(&owner, &settings)?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::deployment(&owner, &settings, &hash),
    )
    .await?;
    check(
        Api::namespaced(client.clone(), &ns),
        builders::service(&owner),
    )
    .await?;
    Ok(())
}

fn tenant_spec(encrypted: bool) -> Value {
    json!({"owner": "e2e@example.com", "plan": "free",
           "storage": {"storageClassName": if encrypted { ENCRYPTED } else { PLAIN }, "size": "1024Mi"},
           "oauth2": {"allowedHosts": OAUTH2_HOSTS}})
}

/// The OAuth 2 provider hosts every test Tenant allows; the runtime's config must carry
/// them.
const OAUTH2_HOSTS: [&str; 2] = ["accounts.example.com", "*.example.org:8443"];

/// Writes one Tenant costs on create: finalizer, Namespace, ServiceAccount, 3
/// NetworkPolicies, ResourceQuota, LimitRange, data key, TLS Secret, token key Secret,
/// ConfigMap, Service and one status; then either the PVC and the Deployment (encrypted
/// class) or the Degraded and StorageClassNotEncrypted Events (any other class).
const WRITES_ON_CREATE: u64 = 16;

async fn converge(env: &Env) -> Result<OperatorProcess> {
    let before_start: Vec<(String, bool)> = (0..6)
        .map(|i| (format!("e2e-pre{i}"), i % 3 != 0))
        .collect();
    let while_running: Vec<(String, bool)> = (0..4)
        .map(|i| (format!("e2e-run{i}"), i % 2 == 0))
        .collect();
    for (name, encrypted) in &before_start {
        env.cluster
            .create_tenant(name, tenant_spec(*encrypted))
            .await?;
    }
    // The operator makes its CA once per cluster, on its first start.
    let secrets: Api<Secret> = Api::namespaced(env.cluster.client.clone(), NS);
    let makes_ca = secrets.get_opt(names::DEFAULT_CA_SECRET).await?.is_none();
    let counts = env.cluster.request_counts().await?;
    let started = Instant::now();
    let mut operator = env.start("e2e-a")?;
    env.converged(&before_start, Duration::from_secs(120))
        .await?;
    eprintln!(
        "{} Tenants made before the start converged in {:.1} s",
        before_start.len(),
        started.elapsed().as_secs_f64()
    );
    for (name, encrypted) in &while_running {
        env.cluster
            .create_tenant(name, tenant_spec(*encrypted))
            .await?;
    }
    env.converged(&while_running, Duration::from_secs(120))
        .await?;
    // Let the controller-manager's own updates (Deployment status, ReplicaSets) settle;
    // each reaches the operator as an event it must not answer with a write.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = env.cluster.request_counts().await?;
    let all: Vec<(String, bool)> = before_start.iter().chain(&while_running).cloned().collect();
    let expected = WRITES_ON_CREATE * all.len() as u64 + u64::from(makes_ca);
    let (writes, dry_runs) = (now.operator_writes(&counts), now.dry_runs(&counts));
    eprintln!(
        "create: {writes} writes for {} Tenants (expected {expected}), {dry_runs} dry runs",
        all.len()
    );
    ensure!(
        writes == expected,
        "create wrote {writes} times, expected {expected}: {:#?}",
        now.changes(&counts)
    );
    ensure!(
        dry_runs == 0,
        "{dry_runs} dry runs: a stored child differs from its builder"
    );
    for (name, encrypted) in &all {
        let pvc = env
            .in_tenant::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(name)
            .get_opt(names::DATA_PVC)
            .await?;
        ensure!(
            pvc.is_some() == *encrypted,
            "{name}: a volume only on an encrypted class"
        );
        if *encrypted {
            children_match_builders(env, name).await?;
        } else {
            let t = env.tenant(name).await?;
            let c = t.status.unwrap().conditions;
            let storage = c.iter().find(|c| c.type_ == "StorageEncrypted").unwrap();
            ensure!(
                storage.reason == "StorageClassNotEncrypted",
                "{name}: {storage:?}"
            );
        }
    }

    // Idle: a whole resync period (10 s here) passes without a write.
    let counts = env.cluster.request_counts().await?;
    let reconciles = operator
        .metric("tenantry_operator_reconciles_total")
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let now = env.cluster.request_counts().await?;
    let resynced = operator
        .metric("tenantry_operator_reconciles_total")
        .unwrap_or(0.0)
        - reconciles;
    eprintln!(
        "idle 15 s: {resynced} reconciles, {} writes, {} dry runs",
        now.operator_writes(&counts),
        now.dry_runs(&counts)
    );
    ensure!(resynced >= all.len() as f64, "every Tenant was resynced");
    ensure!(
        now.operator_writes(&counts) == 0 && now.dry_runs(&counts) == 0,
        "an idle resync wrote"
    );

    // SIGTERM: out in under 5 s, the Lease released.
    let (took, clean) = operator.terminate()?;
    eprintln!("SIGTERM: exited in {:.3} s", took.as_secs_f64());
    ensure!(
        clean,
        "the operator exited with an error: {}",
        operator.log()
    );
    ensure!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let leases: Api<Lease> = Api::namespaced(env.cluster.client.clone(), NS);
    let lease = leases.get(names::DEFAULT_LEASE_NAME).await?;
    ensure!(
        lease.spec.and_then(|s| s.holder_identity).is_none(),
        "the Lease is released on SIGTERM"
    );

    // Restart: everything is reconciled again, nothing is written.
    let counts = env.cluster.request_counts().await?;
    let operator = env.start("e2e-a")?;
    eventually(
        "the restarted operator to reconcile every Tenant",
        Duration::from_secs(60),
        || async {
            Ok((operator
                .metric("tenantry_operator_reconciles_total")
                .unwrap_or(0.0)
                >= all.len() as f64)
                .then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = env.cluster.request_counts().await?;
    eprintln!(
        "restart: {} writes, {} dry runs",
        now.operator_writes(&counts),
        now.dry_runs(&counts)
    );
    ensure!(now.operator_writes(&counts) == 0, "the restart wrote");
    ensure!(now.dry_runs(&counts) == 0, "the restart needed dry runs");

    env.cluster
        .delete_tenants("e2e-pre", Duration::from_secs(180))
        .await?;
    env.cluster
        .delete_tenants("e2e-run", Duration::from_secs(180))
        .await?;
    Ok(operator)
}

async fn lifecycle(env: &Env) -> Result<()> {
    let names = ["e2e-life-a", "e2e-life-b"];
    for name in names {
        let mut spec = tenant_spec(true);
        // Renewal 10 s after issue: a certificate of 1 h renewed 59m50s before expiry.
        spec["tls"] = json!({"duration": "1h", "renewBefore": "59m50s"});
        env.cluster.create_tenant(name, spec).await?;
    }
    let pair: Vec<(String, bool)> = names.iter().map(|n| (n.to_string(), true)).collect();
    env.converged(&pair, Duration::from_secs(120)).await?;
    let tenants = env.tenants();

    // Suspension and resumption.
    let set_suspended = |value: bool| async move {
        for name in names {
            env.tenants()
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"suspended": value}})),
                )
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    set_suspended(true).await?;
    env.scaled_to(&names, 0, "Suspended").await?;
    set_suspended(false).await?;
    env.scaled_to(&names, 1, "Provisioning").await?;

    // Renewal: a new serial and a new key, by the requeue at the renewal time.
    for name in names {
        let first = env.tenant(name).await?.status.unwrap().certificate.unwrap();
        let secret = env.in_tenant::<Secret>(name).get(names::TLS_SECRET).await?;
        let old_key = secret.data.unwrap()["tls.key"].clone();
        eventually(
            &format!("{name}'s certificate to be renewed"),
            Duration::from_secs(60),
            || async {
                let now = env.tenant(name).await?.status.unwrap().certificate.unwrap();
                Ok((now.serial != first.serial).then_some(()))
            },
        )
        .await?;
        let secret = env.in_tenant::<Secret>(name).get(names::TLS_SECRET).await?;
        ensure!(
            secret.data.unwrap()["tls.key"] != old_key,
            "{name}: a renewal makes a new key"
        );
    }

    // Repair: a deleted policy comes back; hand edits of a Deployment and of the namespace's
    // Pod Security label are undone.
    for name in names {
        let policies = env.in_tenant::<NetworkPolicy>(name);
        let old_uid = policies.get(names::POLICY_DEFAULT_DENY).await?.uid();
        policies
            .delete(names::POLICY_DEFAULT_DENY, &DeleteParams::default())
            .await?;
        eventually(
            &format!("{name}'s default-deny policy to come back"),
            Duration::from_secs(60),
            || async {
                let p = policies.get_opt(names::POLICY_DEFAULT_DENY).await?;
                Ok(p.is_some_and(|p| p.uid() != old_uid).then_some(()))
            },
        )
        .await?;
        env.in_tenant::<Deployment>(name)
            .patch(
                names::DEPLOYMENT,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
        let namespaces: Api<Namespace> = Api::all(env.cluster.client.clone());
        let ns = names::tenant_namespace(name);
        namespaces
            .patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {names::LABEL_PSA_ENFORCE: "privileged"}}}),
                ),
            )
            .await?;
        eventually(
            &format!("{name}'s hand edits to be undone"),
            Duration::from_secs(60),
            || async {
                let replicas = env
                    .in_tenant::<Deployment>(name)
                    .get(names::DEPLOYMENT)
                    .await?
                    .spec
                    .and_then(|s| s.replicas);
                let psa = namespaces
                    .get(&ns)
                    .await?
                    .labels()
                    .get(names::LABEL_PSA_ENFORCE)
                    .cloned();
                Ok((replicas == Some(1) && psa.as_deref() == Some("restricted")).then_some(()))
            },
        )
        .await?;
    }

    // Deletion: both namespaces go, the finalizers are removed, the Tenants go.
    for name in names {
        tenants.delete(name, &DeleteParams::default()).await?;
    }
    env.cluster
        .delete_tenants("e2e-life-", Duration::from_secs(180))
        .await
}

/// `spec.backup`: a backup volume on the encrypted class, the recipients, the runtime's
/// backup section and mounts; BackupStale until a backup is known (no kubelet here, so the
/// runtime never runs: a backup is written into the status by hand, as the operator keeps
/// the newest it has seen).
async fn backups(env: &Env) -> Result<()> {
    let name = "e2e-backup";
    let mut bad = tenant_spec(true);
    bad["backup"] = json!({"interval": "1w"});
    ensure!(
        env.cluster
            .create_tenant("e2e-backup-bad", bad)
            .await
            .is_err(),
        "the schema refuses interval 1w"
    );
    let mut spec = tenant_spec(true);
    spec["backup"] = json!({"interval": "1h", "keep": 2, "size": "512Mi"});
    env.cluster.create_tenant(name, spec).await?;
    env.converged(&[(name.to_owned(), true)], Duration::from_secs(120))
        .await?;
    let pvcs = env.in_tenant::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(name);
    let backup_pvc = eventually("the backup volume", Duration::from_secs(60), || async {
        Ok(pvcs.get_opt(names::BACKUP_PVC).await?)
    })
    .await?;
    let pvc_spec = backup_pvc.spec.context("the backup PVC has a spec")?;
    ensure!(pvc_spec.storage_class_name.as_deref() == Some(ENCRYPTED));
    ensure!(
        pvc_spec
            .resources
            .and_then(|r| r.requests)
            .map(|r| r["storage"].0.clone())
            == Some("512Mi".to_owned())
    );
    let config_maps = env.in_tenant::<ConfigMap>(name);
    let recipients = config_maps.get(names::BACKUP_RECIPIENTS_CONFIG_MAP).await?;
    ensure!(
        recipients.data.unwrap_or_default()[names::BACKUP_RECIPIENTS_KEY].trim()
            == BACKUP_RECIPIENT
    );
    let config = config_maps.get(names::CONFIG_MAP).await?;
    let config: tenantry_proto::runtime_config::RuntimeConfig =
        serde_yaml::from_str(&config.data.unwrap_or_default()[names::CONFIG_KEY])?;
    let backup = config
        .backup
        .context("the runtime config has a backup section")?;
    ensure!(backup.interval == "1h" && backup.keep == 2);
    let deployment = env
        .in_tenant::<Deployment>(name)
        .get(names::DEPLOYMENT)
        .await?;
    let volumes = serde_json::to_string(&deployment.spec.unwrap().template.spec.unwrap().volumes)?;
    ensure!(
        volumes.contains(names::BACKUP_PVC)
            && volumes.contains(names::BACKUP_RECIPIENTS_CONFIG_MAP)
    );
    let condition = |t: Tenant| {
        t.status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "BackupStale")
            .map(|c| (c.status, c.reason))
    };
    eventually(
        "BackupStale, nothing reported",
        Duration::from_secs(60),
        || async {
            Ok((condition(env.tenant(name).await?)
                == Some(("True".to_owned(), "NoBackupReported".to_owned())))
            .then_some(()))
        },
    )
    .await?;
    let now = jiff::Timestamp::now();
    env.tenants()
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"lastBackup": {"time": now.to_string()}}})),
        )
        .await?;
    eventually(
        "BackupStale False once a backup is known",
        Duration::from_secs(60),
        || async {
            let t = env.tenant(name).await?;
            let kept = t
                .status
                .as_ref()
                .and_then(|s| s.last_backup.as_ref())
                .is_some();
            Ok(
                (kept && condition(t) == Some(("False".to_owned(), "BackupCurrent".to_owned())))
                    .then_some(()),
            )
        },
    )
    .await?;
    env.tenants().delete(name, &DeleteParams::default()).await?;
    env.cluster
        .delete_tenants("e2e-backup", Duration::from_secs(180))
        .await
}

/// `kubectl annotate tenant NAME tenantry.dev/rotate-data-key=…`: the Secret gets a new
/// key-encryption key with the old one beside it, and an Event says so; a second value
/// waits while the runtime has not re-wrapped (no kubelet runs the runtime here, so the
/// rotation stays in progress: the drop of the previous key is covered by the operator's
/// own tests and the runtime's).
async fn data_key_rotation(env: &Env) -> Result<()> {
    let name = "e2e-rekey";
    env.cluster.create_tenant(name, tenant_spec(true)).await?;
    env.converged(&[(name.to_owned(), true)], Duration::from_secs(120))
        .await?;
    let secrets = env.in_tenant::<Secret>(name);
    let key_of = |s: &Secret, k: &str| s.data.as_ref().and_then(|d| d.get(k)).map(|b| b.0.clone());
    let before = secrets.get(names::DATA_KEY_SECRET).await?;
    let old = key_of(&before, names::DATA_KEY_KEY).context("data.key")?;
    ensure!(old.len() == 32);
    ensure!(
        before.immutable != Some(true),
        "new Tenants get a mutable key Secret"
    );
    let annotate = |value: &str| json!({"metadata": {"annotations": {names::ROTATE_DATA_KEY_ANNOTATION: value}}});
    let started = Instant::now();
    env.tenants()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(annotate("one")),
        )
        .await?;
    let rotated = eventually(
        "the rotated data key Secret",
        Duration::from_secs(60),
        || async {
            let s = secrets.get(names::DATA_KEY_SECRET).await?;
            let handled = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::DATA_KEY_ROTATION_HANDLED_ANNOTATION))
                .cloned();
            Ok((handled.as_deref() == Some("one")).then_some(s))
        },
    )
    .await?;
    eprintln!("    rotated after {:?}", started.elapsed());
    let new = key_of(&rotated, names::DATA_KEY_KEY).context("data.key")?;
    ensure!(new.len() == 32 && new != old, "a new key-encryption key");
    ensure!(
        key_of(&rotated, names::DATA_KEY_PREVIOUS_KEY).as_deref() == Some(old.as_slice()),
        "the previous key stays beside it until the runtime re-wrapped"
    );
    let events: Api<Event> = Api::namespaced(env.cluster.client.clone(), "default");
    let new_id = tenantry_proto::runtime_config::kek_id(&new);
    let event = eventually(
        "the DataKeyRotated Event",
        Duration::from_secs(30),
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                // Events outlive Tenants: one of an earlier run names another key.
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                        && e.reason.as_deref() == Some("DataKeyRotated")
                        && e.note.as_deref().is_some_and(|n| n.contains(&new_id))
                }))
        },
    )
    .await?;
    let note = event.note.unwrap_or_default();
    ensure!(
        note.contains(&new_id),
        "the Event names the new key's id: {note}"
    );
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    ensure!(
        !note.contains(&hex(&new)) && !note.contains(&hex(&old)),
        "and no key"
    );
    // The runtime never reports the re-wrap here: a second request waits.
    env.tenants()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(annotate("two")),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still = secrets.get(names::DATA_KEY_SECRET).await?;
    ensure!(
        key_of(&still, names::DATA_KEY_KEY) == Some(new.clone())
            && key_of(&still, names::DATA_KEY_PREVIOUS_KEY) == Some(old.clone()),
        "no second rotation while one is in progress"
    );
    env.tenants().delete(name, &DeleteParams::default()).await?;
    env.cluster
        .delete_tenants("e2e-rekey", Duration::from_secs(180))
        .await
}

/// The Event with `reason` about the CA Secret whose note names the CA `fingerprint`.
async fn ca_event(events: &Api<Event>, reason: &str, fingerprint: &str) -> Result<Option<Event>> {
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(names::DEFAULT_CA_SECRET)
                && e.reason.as_deref() == Some(reason)
        })
        .find(|e| e.note.as_deref().is_some_and(|n| n.contains(fingerprint))))
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// `kubectl annotate secret -n NS tenantry-ca tenantry.dev/rotate=…` with the operator
/// running (`--ca-rotation-window 20s`): a new CA issues, every tenant's `ca.crt` holds
/// both CAs, every leaf is re-issued by the new CA and the status shows its fingerprint,
/// an Event says the rotation started; after the window the old CA is retired (an Event),
/// and `ca.crt` holds the new CA alone.
async fn ca_rotation(env: &Env) -> Result<()> {
    let tenants = ["e2e-ca-a", "e2e-ca-b"];
    for name in tenants {
        env.cluster.create_tenant(name, tenant_spec(true)).await?;
    }
    let expected: Vec<(String, bool)> = tenants.iter().map(|n| ((*n).to_owned(), true)).collect();
    env.converged(&expected, Duration::from_secs(120)).await?;
    let cas: Api<Secret> = Api::namespaced(env.cluster.client.clone(), NS);
    let before = cas.get(names::DEFAULT_CA_SECRET).await?;
    let old_ca = secret_text(&before, "tls.crt").context("tls.crt")?;
    let old_fp = tenantry_pki::fingerprint(&old_ca)?;
    // The CA Secret outlives test runs: a value of its own each time.
    let value = format!("e2e-{}", jiff::Timestamp::now().as_second());
    let started = Instant::now();
    cas.patch(
        names::DEFAULT_CA_SECRET,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {names::ROTATE_CA_ANNOTATION: &value}}})),
    )
    .await?;
    let rotated = eventually("the rotated CA Secret", Duration::from_secs(60), || async {
        let s = cas.get(names::DEFAULT_CA_SECRET).await?;
        let handled = s
            .annotations()
            .get(names::CA_ROTATION_HANDLED_ANNOTATION)
            .cloned();
        Ok((handled.as_deref() == Some(value.as_str())).then_some(s))
    })
    .await?;
    eprintln!("    rotated after {:?}", started.elapsed());
    let new_ca = secret_text(&rotated, "tls.crt").context("tls.crt")?;
    let new_fp = tenantry_pki::fingerprint(&new_ca)?;
    ensure!(new_fp != old_fp, "a new CA");
    ensure!(
        secret_text(&rotated, names::CA_PREVIOUS_KEY).as_deref() == Some(old_ca.as_str()),
        "the old certificate stays as previous.crt"
    );
    let bundle_of = |s: &Secret| -> Vec<String> {
        secret_text(s, "ca.crt")
            .and_then(|b| tenantry_pki::split_bundle(&b).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| tenantry_pki::fingerprint(c).ok())
            .collect()
    };
    // The overlap: both CAs in every bundle (seen before the window ends).
    eventually(
        "every ca.crt holds both CAs",
        Duration::from_secs(60),
        || async {
            for name in tenants {
                let tls = env.in_tenant::<Secret>(name).get(names::TLS_SECRET).await?;
                let fps = bundle_of(&tls);
                if fps != [new_fp.clone(), old_fp.clone()] {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    eprintln!("    bundles after {:?}", started.elapsed());
    let events: Api<Event> = Api::namespaced(env.cluster.client.clone(), NS);
    let event = eventually(
        "the CARotationStarted Event",
        Duration::from_secs(30),
        || ca_event(&events, "CARotationStarted", &new_fp),
    )
    .await?;
    let note = event.note.unwrap_or_default();
    ensure!(note.contains(&old_fp), "the Event names both CAs: {note}");
    ensure!(!note.contains("PRIVATE KEY"));
    // Every leaf re-issued by the new CA within the window, shown in the status.
    eventually(
        "every leaf from the new CA",
        Duration::from_secs(90),
        || async {
            for name in tenants {
                let tls = env.in_tenant::<Secret>(name).get(names::TLS_SECRET).await?;
                let leaf = secret_text(&tls, "tls.crt").unwrap_or_default();
                let status = env.tenants().get(name).await?.status;
                let shown = status
                    .and_then(|s| s.certificate)
                    .and_then(|c| c.issuer_fingerprint);
                if !tenantry_pki::signed_by(&new_ca, &leaf) || shown.as_deref() != Some(&new_fp) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    eprintln!("    leaves re-issued after {:?}", started.elapsed());
    // After the window: the old CA leaves the Secret and every bundle.
    eventually("the old CA retired", Duration::from_secs(120), || async {
        let s = cas.get(names::DEFAULT_CA_SECRET).await?;
        Ok(secret_text(&s, names::CA_PREVIOUS_KEY)
            .is_none()
            .then_some(()))
    })
    .await?;
    eprintln!("    retired after {:?}", started.elapsed());
    eventually("the CARetired Event", Duration::from_secs(30), || {
        ca_event(&events, "CARetired", &new_fp)
    })
    .await?;
    eventually(
        "every ca.crt holds the new CA alone",
        Duration::from_secs(60),
        || async {
            for name in tenants {
                let tls = env.in_tenant::<Secret>(name).get(names::TLS_SECRET).await?;
                if bundle_of(&tls) != [new_fp.clone()] {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    for name in tenants {
        env.tenants().delete(name, &DeleteParams::default()).await?;
    }
    env.cluster
        .delete_tenants("e2e-ca-", Duration::from_secs(180))
        .await
}

async fn unreadable(env: &Env) -> Result<()> {
    // A newer CRD that knows a plan this operator does not.
    let crds: Api<CustomResourceDefinition> = Api::all(env.cluster.client.clone());
    let mut crd = serde_json::to_value(tenantry_kube::crd::crd())?;
    let plan = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["plan"]["enum"];
    plan.as_array_mut()
        .context("the plan enum")?
        .push(json!("premium"));
    crds.patch(
        names::CRD_NAME,
        &PatchParams::apply("tenantry-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let resource = ApiResource::erase::<Tenant>(&());
    let dynamic: Api<DynamicObject> = Api::all_with(env.cluster.client.clone(), &resource);
    let newer: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "e2e-newer"},
        "spec": {"owner": "e2e@example.com", "plan": "premium"},
    }))?;
    let created = async {
        eventually(
            "the newer CRD to accept plan premium",
            Duration::from_secs(30),
            || async {
                match dynamic.create(&PostParams::default(), &newer).await {
                    Ok(_) => Ok(Some(())),
                    Err(kube::Error::Api(s)) if s.code == 422 => Ok(None),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    }
    .await;
    // Put the CRD back before anything else can fail.
    env.cluster.install_crd().await?;
    created?;
    // Over the free plan's storage quota: the schema allows it, the operator refuses it.
    let mut big = tenant_spec(true);
    big["storage"]["size"] = json!("10Gi");
    env.cluster.create_tenant("e2e-big", big).await?;
    env.cluster
        .create_tenant("e2e-fine", tenant_spec(true))
        .await?;

    env.converged(&[("e2e-fine".into(), true)], Duration::from_secs(120))
        .await?;
    for (name, says) in [("e2e-newer", "premium"), ("e2e-big", "quota")] {
        let message = eventually(
            &format!("{name} to be Degraded"),
            Duration::from_secs(60),
            || async {
                let object = dynamic.get(name).await?;
                let status = &object.data["status"];
                let ready = status["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                    .cloned();
                Ok((status["phase"] == "Degraded").then_some(ready))
            },
        )
        .await?
        .context("a Ready condition")?;
        ensure!(
            message["status"] == "False" && message["reason"] == "InvalidSpec",
            "{name}: {message}"
        );
        ensure!(
            message["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{name}: {message}"
        );
        let events: Api<Event> = Api::namespaced(env.cluster.client.clone(), "default");
        eventually(
            &format!("a Warning Event for {name}"),
            Duration::from_secs(30),
            || async {
                let found = events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .any(|e| {
                        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                            && e.type_.as_deref() == Some("Warning")
                    });
                Ok(found.then_some(()))
            },
        )
        .await?;
    }
    ensure!(
        Api::<Namespace>::all(env.cluster.client.clone())
            .get_opt("tenant-e2e-newer")
            .await?
            .is_none(),
        "nothing is made for a Tenant the operator cannot read"
    );
    // Deleting it needs nothing but its metadata.
    dynamic
        .delete("e2e-newer", &DeleteParams::default())
        .await?;
    env.cluster
        .delete_tenants("e2e-", Duration::from_secs(180))
        .await
}

async fn two_replicas(env: &Env, mut a: OperatorProcess) -> Result<()> {
    let mut b = env.start("e2e-b")?;
    env.cluster
        .create_tenant("e2e-f1", tenant_spec(true))
        .await?;
    env.converged(&[("e2e-f1".into(), true)], Duration::from_secs(120))
        .await?;
    tokio::time::sleep(Duration::from_secs(2 * u64::from(LEASE_SECONDS))).await;
    let b_reconciles = b
        .metric("tenantry_operator_reconciles_total")
        .unwrap_or(0.0);
    ensure!(
        b_reconciles == 0.0,
        "the replica that is not leader reconciled {b_reconciles} times"
    );
    ensure!(
        a.metric("tenantry_operator_reconciles_total")
            .unwrap_or(0.0)
            > 0.0,
        "the leader reconciles"
    );

    // SIGKILL the leader: no Lease release, the other waits out the lease duration.
    let killed = Instant::now();
    a.kill();
    env.cluster
        .create_tenant("e2e-f2", tenant_spec(true))
        .await?;
    env.leader_is("e2e-b").await?;
    let took = killed.elapsed();
    eprintln!(
        "take-over after SIGKILL: {:.1} s (lease {LEASE_SECONDS} s)",
        took.as_secs_f64()
    );
    ensure!(
        took < Duration::from_secs(u64::from(LEASE_SECONDS) + 4),
        "take-over took {took:?}"
    );
    env.converged(
        &[("e2e-f1".into(), true), ("e2e-f2".into(), true)],
        Duration::from_secs(120),
    )
    .await?;
    ensure!(b.running(), "the new leader runs");

    // A rolling update: a new replica waits while the leader gets SIGTERM. The leader
    // releases the Lease on its way out, so the new one takes over at its next attempt
    // (a renew period) instead of waiting out the lease duration, and acts on changes.
    let mut c = env.start("e2e-c")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stopped, clean) = b.terminate()?;
    ensure!(
        clean && stopped < Duration::from_secs(5),
        "the leader stopped in {stopped:?}"
    );
    let handed_over = Instant::now();
    let lease = Api::<Lease>::namespaced(env.cluster.client.clone(), NS)
        .get(names::DEFAULT_LEASE_NAME)
        .await?;
    let spec = lease.spec.unwrap_or_default();
    ensure!(
        spec.holder_identity.as_deref() != Some("e2e-b"),
        "the stopped leader still holds the Lease: {spec:?}"
    );
    env.leader_is("e2e-c").await?;
    let took = handed_over.elapsed();
    eprintln!(
        "hand-over after SIGTERM: leader stopped in {:.3} s, new leader after {:.1} s (lease {LEASE_SECONDS} s)",
        stopped.as_secs_f64(),
        took.as_secs_f64()
    );
    ensure!(
        took < Duration::from_secs(u64::from(LEASE_SECONDS)),
        "hand-over after SIGTERM waited out the lease: {took:?}"
    );
    env.cluster
        .create_tenant("e2e-f3", tenant_spec(false))
        .await?;
    env.converged(
        &[
            ("e2e-f1".into(), true),
            ("e2e-f2".into(), true),
            ("e2e-f3".into(), false),
        ],
        Duration::from_secs(120),
    )
    .await?;
    env.cluster
        .delete_tenants("e2e-", Duration::from_secs(180))
        .await?;
    // No orphans: no tenant namespace outlives its Tenant.
    let tenant_namespaces: Vec<String> = Api::<Namespace>::all(env.cluster.client.clone())
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|n| n.name_any())
        .filter(|n| n.starts_with("tenant-e2e-"))
        .collect();
    ensure!(
        tenant_namespaces.is_empty(),
        "orphaned namespaces: {tenant_namespaces:?}"
    );
    let (took, clean) = c.terminate()?;
    ensure!(
        clean && took < Duration::from_secs(5),
        "the last replica stopped in {took:?}"
    );
    Ok(())
}

#[test]
fn request_counts_parse_the_exposition() {
    let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",system_client="",verb="POST",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="All",group="apps",resource="deployments",scope="resource",subresource="",system_client="",verb="APPLY",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="",system_client="",verb="APPLY",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",system_client="",verb="APPLY",version="v1"} 9
"#;
    let c = RequestCounts::parse(text);
    let zero = RequestCounts::default();
    assert_eq!(c.operator_writes(&zero), 7);
    assert_eq!(c.dry_runs(&zero), 2);
}
