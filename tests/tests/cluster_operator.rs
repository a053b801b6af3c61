//! The operator against a real cluster: runs when `KUBECONFIG` is set, and says why it
//! skipped otherwise.
//!
//! It installs the CRD, runs the operator in-process (its own operator namespace, Lease
//! and token key), then: a Tenant's children appear and its conditions converge; bad specs
//! are refused by the API server (and by `kubectl apply` when kubectl is on the PATH);
//! deleting the Tenant removes its namespace. The runtime image need not be pullable:
//! `RuntimeReady` is only required to be reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tenantry_operator::crd::Tenant;
use tenantry_operator::names;
use tenantry_tests::cluster::{Operator, condition, eventually, install_crd};

const TOKEN_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

fn kubectl_apply(yaml: &str) -> Option<(bool, String)> {
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(yaml.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn operator_on_a_real_cluster() -> Result<()> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "skipping operator_on_a_real_cluster: KUBECONFIG is not set (point it at a disposable cluster to run it)"
        );
        return Ok(());
    }
    let client = Client::try_default()
        .await
        .context("connecting to the cluster")?;
    install_crd(&client).await?;

    let suffix = std::process::id().to_string();
    let operator = Operator::start(&client, &suffix, TOKEN_PEM).await?;
    let storage_class = operator.storage_class.clone();
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let tenants: Api<Tenant> = Api::all(client.clone());
    let name = format!("e2e-{suffix}");
    let tenant_ns = names::tenant_namespace(&name);
    let result = async {
        // Bad specs are refused by the schema.
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
        ] {
            let raw = json!({"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"name": format!("bad-{suffix}")}, "spec": bad});
            let refused = tenants
                .patch(
                    &format!("bad-{suffix}"),
                    &PatchParams::apply("tenantry-e2e"),
                    &Patch::Apply(&raw),
                )
                .await;
            match refused {
                Err(kube::Error::Api(s)) if s.code == 422 => {}
                other => bail!("{why} was not refused: {other:?}"),
            }
            if let Some((ok, stderr)) = kubectl_apply(&serde_json::to_string(&raw)?) {
                if ok {
                    bail!("kubectl apply accepted {why}");
                }
                eprintln!("kubectl apply refused {why}: {}", stderr.trim());
            }
        }

        tenants
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
                    "metadata": {"name": name},
                    "spec": {"owner": "e2e@example.com", "plan": "free",
                             "tls": {"dnsNames": [format!("{name}.example.com")]}},
                }))?,
            )
            .await?;

        // Children appear.
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &tenant_ns);
        eventually("the NetworkPolicies", Duration::from_secs(60), || async {
            Ok((policies.list(&ListParams::default()).await?.items.len() >= 3).then_some(()))
        })
        .await?;
        let tenant_secrets: Api<Secret> = Api::namespaced(client.clone(), &tenant_ns);
        let tls = eventually("the TLS Secret", Duration::from_secs(60), || async {
            Ok(tenant_secrets.get_opt(names::TLS_SECRET).await?)
        })
        .await?;
        assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
        let key = tenant_secrets.get(names::DATA_KEY_SECRET).await?;
        assert_eq!(key.data.unwrap()[names::DATA_KEY_KEY].0.len(), 32);

        // Conditions converge.
        let expect_storage = if storage_class.is_some() {
            "True"
        } else {
            "False"
        };
        let t = eventually("the conditions", Duration::from_secs(120), || async {
            let t = tenants.get(&name).await?;
            let ok = condition(&t, "NamespaceReady").as_deref() == Some("True")
                && condition(&t, "NetworkIsolated").as_deref() == Some("True")
                && condition(&t, "CertificateReady").as_deref() == Some("True")
                && condition(&t, "StorageEncrypted").as_deref() == Some(expect_storage)
                && condition(&t, "RuntimeReady").is_some();
            Ok(ok.then_some(t))
        })
        .await?;
        let status = t.status.unwrap();
        assert_eq!(status.namespace.as_deref(), Some(tenant_ns.as_str()));
        assert!(status.certificate.is_some());

        // Immutable fields stay immutable.
        let changed = tenants
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"owner": "someone-else"}})),
            )
            .await;
        assert!(
            matches!(changed, Err(kube::Error::Api(ref s)) if s.code == 422),
            "{changed:?}"
        );

        // Delete: the namespace goes, then the Tenant.
        tenants.delete(&name, &DeleteParams::default()).await?;
        eventually(
            "the tenant namespace to be gone",
            Duration::from_secs(300),
            || async {
                Ok(namespaces
                    .get_opt(&tenant_ns)
                    .await?
                    .is_none()
                    .then_some(()))
            },
        )
        .await?;
        eventually("the Tenant to be gone", Duration::from_secs(60), || async {
            Ok(tenants.get_opt(&name).await?.is_none().then_some(()))
        })
        .await?;
        Ok(())
    }
    .await;

    operator.stop().await;
    result
}
