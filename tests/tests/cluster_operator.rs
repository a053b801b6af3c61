//! The operator against a real cluster: runs when `KUBECONFIG` is set, and says why it
//! skipped otherwise.
//!
//! It installs the CRD, runs the operator in-process (its own operator namespace, Lease
//! and token key), then: a Tenant's children appear and its conditions converge; bad specs
//! are refused by the API server (and by `kubectl apply` when kubectl is on the PATH);
//! deleting the Tenant removes its namespace. The runtime image need not be pullable:
//! `RuntimeReady` is only required to be reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tenantry_operator::config::Settings;
use tenantry_operator::crd::{Tenant, crd};
use tenantry_operator::names;
use tenantry_operator::run::{LeaderOptions, run};

const TOKEN_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn condition(t: &Tenant, type_: &str) -> Option<String> {
    t.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        names::CRD_NAME,
        &PatchParams::apply("tenantry-e2e").force(),
        &Patch::Apply(crd()),
    )
    .await
    .context("installing the CRD")?;
    eventually(
        "the CRD to be established",
        Duration::from_secs(60),
        || async {
            let c = crds.get(names::CRD_NAME).await?;
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        },
    )
    .await
}

/// The cluster's default StorageClass, which the test declares encrypted.
async fn default_storage_class(client: &Client) -> Result<Option<String>> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    Ok(classes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|c| {
            c.annotations()
                .get("storageclass.kubernetes.io/is-default-class")
                .is_some_and(|v| v == "true")
        })
        .map(|c| c.name_any()))
}

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

    let suffix = std::process::id();
    let op_ns = format!("tenantry-e2e-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": op_ns}}))?,
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &op_ns);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: serde_json::from_value(json!({"name": names::TOKEN_KEY_SECRET}))?,
                data: Some(BTreeMap::from([(
                    names::TOKEN_KEY_KEY.to_owned(),
                    ByteString(TOKEN_PEM.as_bytes().to_vec()),
                )])),
                ..Secret::default()
            },
        )
        .await?;

    let storage_class = default_storage_class(&client).await?;
    let settings = Settings {
        operator_namespace: op_ns.clone(),
        control_plane_namespace: op_ns.clone(),
        encrypted_storage_classes: storage_class.iter().cloned().collect(),
        default_storage_class: storage_class.clone(),
        resync: Duration::from_secs(30),
        ..Settings::default()
    };
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(run(
        settings,
        LeaderOptions {
            lease_name: "tenantry-e2e".into(),
            lease_duration: Duration::from_secs(15),
            identity: format!("e2e-{suffix}"),
        },
        client.clone(),
        admin,
        async {
            let _ = stop_rx.await;
        },
    ));

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

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    let _ = namespaces.delete(&op_ns, &DeleteParams::default()).await;
    result
}
