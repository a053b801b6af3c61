//! The control API's `kubernetes` provisioner against a real cluster, with the operator:
//! runs when `KUBECONFIG` is set, and says why it skipped otherwise.
//!
//! It installs the CRD, runs the operator in-process with the public half of keys made by
//! the real `tenantry-api keygen`, and starts the real `tenantry-api serve --provisioner
//! kubernetes` (SQLite in a temporary directory). Then: a signup makes a Tenant carrying the
//! API's tenant id; the certificate the operator issues reaches `GetTenant` through the
//! API's watch; the runtime is configured with the API's tenant id (so the API's instance
//! tokens verify there); an admin's `DeleteTenant` removes the Tenant and its namespace, and
//! the tenant leaves the API. The runtime image need not be pullable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Client;
use kube::api::Api;
use tenantry_operator::crd::Tenant;
use tenantry_operator::names;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::*;
use tenantry_tests::cluster::{Operator, eventually, install_crd};
use tenantry_tests::{
    PASSWORD, authed, bin, connect, free_port, login, run_with_stdin, signup_and_login,
    wait_for_tenant,
};

/// `tenantry-api <args>` with the password on stdin; panics with its stderr on failure.
fn tenantry_api(args: &[&str], dir: &std::path::Path) -> String {
    let out = run_with_stdin(
        std::process::Command::new(bin("tenantry-api"))
            .args(args)
            .args(["--data-dir", &dir.display().to_string()]),
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "tenantry-api {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn api_and_operator_on_a_real_cluster() -> Result<()> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "skipping api_and_operator_on_a_real_cluster: KUBECONFIG is not set (point it at a disposable cluster to run it)"
        );
        return Ok(());
    }
    let client = Client::try_default()
        .await
        .context("connecting to the cluster")?;
    install_crd(&client).await?;

    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("api");
    let keys = tmp.path().join("keys");
    tenantry_api(
        &["keygen", "--out-dir", &keys.display().to_string()],
        tmp.path(),
    );
    let public = std::fs::read_to_string(keys.join("token-public.pem"))?;
    let suffix = format!("api{}", std::process::id());
    let operator = Operator::start(&client, &suffix, &public).await?;

    let port = free_port();
    let key_args = [
        "--master-key-file".to_owned(),
        keys.join("master.key").display().to_string(),
        "--token-signing-key-file".to_owned(),
        keys.join("token-signing.key").display().to_string(),
        "--argon2-memory-kib".to_owned(),
        "1024".to_owned(),
        "--argon2-iterations".to_owned(),
        "1".to_owned(),
    ];
    let log_file = tmp.path().join("api.log");
    let mut api = tokio::process::Command::new(bin("tenantry-api"))
        .args(["serve", "--provisioner", "kubernetes"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--tenant-domain", "e2e.example.com"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(&key_args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_file)?))
        .kill_on_drop(true)
        .spawn()?;
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let channel = connect(port, log).await;

    let tenants: Api<Tenant> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = format!("e2e-{suffix}");
    let result = async {
        // Signup makes the Tenant, with the API's id and the owner's user id.
        let (ids, token) = signup_and_login(&channel, &format!("{name}@example.com"), &name).await;
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
            &channel,
            &token,
            &ids.tenant_id,
            Duration::from_secs(180),
            |t| t.certificate.as_ref().is_some_and(|c| !c.serial.is_empty()),
        )
        .await;
        let status = tenants.get(&name).await?.status.unwrap();
        assert_eq!(
            seen.certificate.unwrap().serial,
            status.certificate.unwrap().serial
        );

        // The runtime is bound to the API's tenant id, which instance tokens carry.
        let ns = names::tenant_namespace(&name);
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let cm = config_maps.get(names::CONFIG_MAP).await?;
        let config = &cm.data.unwrap()[names::CONFIG_KEY];
        let bound_to = config
            .lines()
            .find_map(|l| l.strip_prefix("tenant_id:"))
            .map(|v| v.trim().trim_matches(['\'', '"']));
        assert_eq!(bound_to, Some(ids.tenant_id.as_str()), "{config}");

        // An admin deletes the tenant: the Tenant and its namespace go, then the record.
        let ops = format!("ops-{suffix}@example.com");
        let mut boot = vec!["bootstrap-admin", "--email", ops.as_str()];
        boot.extend(key_args.iter().map(String::as_str));
        tenantry_api(&boot, &data_dir);
        let admin = login(&channel, &ops).await;
        let mut mfa = MfaServiceClient::new(channel.clone());
        let enroll = mfa
            .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &admin))
            .await?
            .into_inner();
        mfa.confirm_totp_enrollment(authed(
            ConfirmTotpEnrollmentRequest {
                code: tenantry_tests::totp_now(&enroll.secret),
            },
            &admin,
        ))
        .await?;
        let admin_api = AdminServiceClient::new(channel.clone());
        admin_api
            .clone()
            .delete_tenant(authed(
                DeleteTenantRequest {
                    tenant_id: ids.tenant_id.clone(),
                },
                &admin,
            ))
            .await?;
        eventually(
            "the tenant namespace to be gone",
            Duration::from_secs(300),
            || async { Ok(namespaces.get_opt(&ns).await?.is_none().then_some(())) },
        )
        .await?;
        eventually("the Tenant to be gone", Duration::from_secs(60), || async {
            Ok(tenants.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
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
                                page_size: 1000,
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
    .await;

    let _ = api.kill().await;
    if result.is_err() {
        eprintln!("tenantry-api log:\n{}", log());
    }
    operator.stop().await;
    result
}
