//! The control API's `kubernetes` provisioner against a real Kubernetes API server, with
//! the operator: runs when `KUBECONFIG` is set, and says why it skipped otherwise.
//!
//! Everything runs as the chart runs it: the chart's RBAC (rendered by Helm, applied), the
//! real `tenantry-operator` binary and the real `tenantry-api serve --provisioner
//! kubernetes` each under its own ServiceAccount's token, keys from the real
//! `tenantry-api keygen`, the first admin from the real `bootstrap-admin`. Then: a signup
//! makes a Tenant carrying the API's tenant id; the certificate the operator issues
//! reaches `GetTenant` through the API's watch; the runtime is configured with the API's
//! tenant id (so the API's instance tokens verify there); `tenantryctl tenants suspend`,
//! `resume` reach the cluster; `rotate-token-key` makes the API write the new public key
//! set into the operator's Secret (the chart's RBAC allows just that) and the operator
//! copies it into the tenant's namespace; `delete` reaches the cluster, and a deleted
//! tenant leaves the API once its namespace is gone. The runtime image need not be
//! pullable.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tenantry_kube::crd::Tenant;
use tenantry_kube::names;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::{PASSWORD, free_port};
use tenantry_tests::cluster::{
    OperatorOptions, OperatorProcess, cluster, eventually, lock_cluster,
};
use tenantry_tests::{
    authed, bin, connect, ctl, login, next_step, run_with_stdin, signup_and_login, totp_now,
    wait_for_tenant,
};

/// The chart's release namespace in this test.
const NS: &str = "tenantry-e2e-api";

/// `tenantry-api <args>` with the password on stdin; panics with its stderr on failure.
fn tenantry_api(args: &[&str]) -> String {
    let out = run_with_stdin(
        std::process::Command::new(bin("tenantry-api")).args(args),
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "tenantry-api {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn deployment_replicas(d: Option<Deployment>) -> Option<i32> {
    d.and_then(|d| d.spec).and_then(|s| s.replicas)
}

#[tokio::test]
async fn api_and_operator_on_a_real_api_server() -> Result<()> {
    let Some(cluster) = cluster("api_and_operator_on_a_real_api_server").await? else {
        return Ok(());
    };
    // The other real-cluster test runs operators too: one at a time on the shared cluster.
    let _turn = lock_cluster().await?;
    cluster.install_crd().await?;
    cluster.install_chart_rbac(NS).await?;
    cluster
        .storage_class("tenantry-e2e-encrypted", true)
        .await?;

    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("api");
    let keys = tmp.path().join("keys");
    tenantry_api(&["keygen", "--out-dir", &keys.display().to_string()]);
    let public = std::fs::read_to_string(keys.join("token-public.pem"))?;
    cluster.token_public_key(NS, &public).await?;

    let operator_kubeconfig = cluster
        .service_account_kubeconfig(NS, "tenantry-operator", tmp.path())
        .await?;
    let api_kubeconfig = cluster
        .service_account_kubeconfig(NS, "tenantry-api", tmp.path())
        .await?;
    let mut operator = OperatorProcess::start(
        &OperatorOptions {
            binary: bin("tenantry-operator"),
            kubeconfig: operator_kubeconfig,
            namespace: NS.into(),
            lease_seconds: 15,
            extra: vec![
                "--default-storage-class".into(),
                "tenantry-e2e-encrypted".into(),
            ],
            log_dir: tmp.path().to_owned(),
        },
        "e2e-api-operator",
    )?;

    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let key_args: Vec<String> = [
        ("--master-key-file", keys.join("master.key")),
        ("--token-signing-key-file", keys.join("token-signing.key")),
    ]
    .iter()
    .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
    .chain(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"].map(String::from))
    .collect();
    let log_file = tmp.path().join("api.log");
    let mut api = tokio::process::Command::new(bin("tenantry-api"))
        .args(["serve", "--provisioner", "kubernetes"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--tenant-domain", "e2e.example.com"])
        // Signup makes the Tenant at once here; verification has its own tests.
        .arg("--require-email-verification=false")
        // The API publishes the token public key set into the operator's Secret (the
        // chart's RBAC allows exactly that); rereading its ring every second.
        .args(["--token-public-key-secret", names::TOKEN_KEY_SECRET])
        .args(["--token-public-key-secret-namespace", NS])
        .args(["--token-key-refresh-interval", "1s"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(&key_args)
        .env("KUBECONFIG", &api_kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_file)?))
        .kill_on_drop(true)
        .spawn()?;
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let channel = connect(port, log).await;

    let result = scenario(
        &cluster.client,
        &channel,
        &server,
        &data_dir,
        &key_args,
        tmp.path(),
    )
    .await;
    let _ = api.kill().await;
    if result.is_err() {
        eprintln!("tenantry-api log:\n{}", log());
        eprintln!("tenantry-operator log:\n{}", operator.log());
    }
    let (took, clean) = operator.terminate()?;
    ensure!(
        clean && took < Duration::from_secs(5),
        "the operator stopped in {took:?}"
    );
    result
}

async fn scenario(
    client: &kube::Client,
    channel: &tonic::transport::Channel,
    server: &str,
    data_dir: &Path,
    key_args: &[String],
    tmp: &Path,
) -> Result<()> {
    let tenants: Api<Tenant> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = format!("e2e-api-{}", std::process::id());

    // Signup makes the Tenant, with the API's id and the owner's user id.
    let (ids, token) = signup_and_login(channel, &format!("{name}@example.com"), &name).await;
    let t = eventually("the Tenant", Duration::from_secs(30), || async {
        Ok(tenants.get_opt(&name).await?)
    })
    .await?;
    assert_eq!(
        t.metadata.labels.unwrap_or_default()[names::LABEL_TENANT_ID],
        ids.tenant_id
    );
    assert_eq!(t.spec.owner, ids.user_id);
    assert_eq!(t.spec.tls.dns_names, [format!("{name}.e2e.example.com")]);

    // The operator's certificate reaches GetTenant through the API's watch.
    let seen = wait_for_tenant(
        channel,
        &token,
        &ids.tenant_id,
        Duration::from_secs(120),
        |t| t.certificate.as_ref().is_some_and(|c| !c.serial.is_empty()),
    )
    .await;
    let status = tenants.get(&name).await?.status.context("a status")?;
    assert_eq!(
        seen.certificate.unwrap().serial,
        status.certificate.context("a certificate")?.serial
    );

    // The runtime is bound to the API's tenant id, which instance tokens carry.
    let ns = names::tenant_namespace(&name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = config_maps.get(names::CONFIG_MAP).await?;
    let config = &cm.data.unwrap_or_default()[names::CONFIG_KEY];
    let bound_to = config
        .lines()
        .find_map(|l| l.strip_prefix("tenant_id:"))
        .map(|v| v.trim().trim_matches(['\'', '"']));
    assert_eq!(bound_to, Some(ids.tenant_id.as_str()), "{config}");

    // A platform operator allows an OAuth 2 provider on the API's Tenant (a field the API
    // does not own, so its later applies keep it); the runtime's config follows.
    tenants
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"oauth2": {"allowedHosts": ["accounts.example.com"]}}})),
        )
        .await?;

    // The first admin, from the real bootstrap-admin, with a second factor.
    let ops = format!("ops-{name}@example.com");
    let mut boot = vec!["bootstrap-admin", "--email", ops.as_str(), "--data-dir"];
    let data_dir_arg = data_dir.display().to_string();
    boot.push(&data_dir_arg);
    boot.extend(key_args.iter().map(String::as_str));
    tenantry_api(&boot);
    let session = tmp.join("ctl-session");
    let (ok, _, err) = ctl(
        server,
        &session,
        &["login", "--email", &ops, "--password-stdin"],
        &format!("{PASSWORD}\n"),
    );
    ensure!(ok, "tenantryctl login: {err}");
    let admin = login(channel, &ops).await;
    let mut mfa = MfaServiceClient::new(channel.clone());
    let enroll = mfa
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &admin))
        .await?
        .into_inner();
    mfa.confirm_totp_enrollment(authed(
        ConfirmTotpEnrollmentRequest {
            code: totp_now(&enroll.secret),
        },
        &admin,
    ))
    .await?;
    // The CLI's session verifies its second factor with a fresh code.
    next_step().await;
    let code = totp_now(&enroll.secret);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // Suspend and resume through tenantryctl reach the cluster.
    let (ok, _, err) = ctl(
        server,
        &session,
        &["--totp-code", &code, "tenants", "suspend", &ids.tenant_id],
        "",
    );
    ensure!(ok, "tenantryctl tenants suspend: {err}");
    eventually(
        "the runtime to be scaled to zero",
        Duration::from_secs(60),
        || async {
            let suspended = tenants.get(&name).await?.spec.suspended;
            let replicas = deployment_replicas(deployments.get_opt(names::DEPLOYMENT).await?);
            Ok((suspended && replicas == Some(0)).then_some(()))
        },
    )
    .await?;
    let (ok, _, err) = ctl(server, &session, &["tenants", "resume", &ids.tenant_id], "");
    ensure!(ok, "tenantryctl tenants resume: {err}");
    eventually(
        "the runtime to be scaled back up",
        Duration::from_secs(60),
        || async {
            let suspended = tenants.get(&name).await?.spec.suspended;
            let replicas = deployment_replicas(deployments.get_opt(names::DEPLOYMENT).await?);
            Ok((!suspended && replicas == Some(1)).then_some(()))
        },
    )
    .await?;
    ensure!(
        tenants.get(&name).await?.spec.oauth2.allowed_hosts == ["accounts.example.com"],
        "the API's applies dropped spec.oauth2"
    );
    eventually(
        "the runtime config to allow the OAuth 2 provider",
        Duration::from_secs(60),
        || async {
            let cm = config_maps.get(names::CONFIG_MAP).await?;
            let config = cm.data.unwrap_or_default().remove(names::CONFIG_KEY);
            Ok(config
                .filter(|c| c.contains("accounts.example.com"))
                .map(|_| ()))
        },
    )
    .await?;

    // A token key rotation: the API writes the set (old and new key) into the operator's
    // Secret under the chart's RBAC, and the operator copies it into the tenant's
    // namespace, before the new key signs (20 minutes from now).
    let mut rotate = vec!["rotate-token-key", "--data-dir"];
    let data_dir_text = data_dir.display().to_string();
    rotate.push(&data_dir_text);
    rotate.extend(key_args.iter().map(String::as_str));
    let said = tenantry_api(&rotate);
    ensure!(said.contains("added token key"), "{said}");
    let blocks = |s: Option<Secret>| {
        s.and_then(|s| s.data)
            .and_then(|d| d.get(names::TOKEN_KEY_KEY).cloned())
            .map(|pem| {
                String::from_utf8_lossy(&pem.0)
                    .matches("BEGIN PUBLIC KEY")
                    .count()
            })
            .unwrap_or(0)
    };
    let started = Instant::now();
    for (what, namespace) in [
        ("the operator's Secret", NS),
        ("the tenant's copy", ns.as_str()),
    ] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        eventually(
            &format!("two public keys in {what}"),
            Duration::from_secs(60),
            || async {
                Ok((blocks(secrets.get_opt(names::TOKEN_KEY_SECRET).await?) == 2).then_some(()))
            },
        )
        .await?;
        eprintln!("token key set of 2 in {what} after {:?}", started.elapsed());
    }

    // Delete through tenantryctl: the Tenant and its namespace go, then the record.
    let (ok, _, err) = ctl(
        server,
        &session,
        &["tenants", "delete", &ids.tenant_id, "--yes"],
        "",
    );
    ensure!(ok, "tenantryctl tenants delete: {err}");
    eventually(
        "the tenant namespace to be gone",
        Duration::from_secs(180),
        || async { Ok(namespaces.get_opt(&ns).await?.is_none().then_some(())) },
    )
    .await?;
    eventually("the Tenant to be gone", Duration::from_secs(60), || async {
        Ok(tenants.get_opt(&name).await?.is_none().then_some(()))
    })
    .await?;
    let admin_api = AdminServiceClient::new(channel.clone());
    eventually(
        "the API to forget the tenant",
        Duration::from_secs(60),
        || {
            let mut admin_api = admin_api.clone();
            let (admin, tenant_id) = (admin.clone(), ids.tenant_id.clone());
            async move {
                let listed = admin_api
                    .list_tenants(authed(
                        ListTenantsRequest {
                            page_size: 500,
                            page_token: String::new(),
                        },
                        &admin,
                    ))
                    .await?
                    .into_inner();
                Ok((!listed.tenants.iter().any(|t| t.tenant_id == tenant_id)).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}
