//! Real-cluster helpers: waiting on the API server, installing the CRD, and running the
//! operator in-process in a namespace of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tenantry_operator::config::Settings;
use tenantry_operator::crd::{Tenant, crd};
use tenantry_operator::names;
use tenantry_operator::run::{LeaderOptions, run};

/// Polls `f` every second until it yields a value; fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
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

/// The status of condition `type_` of `t`.
pub fn condition(t: &Tenant, type_: &str) -> Option<String> {
    t.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// Applies the generated CRD and waits until it is established.
pub async fn install_crd(client: &Client) -> Result<()> {
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

/// The cluster's default StorageClass, which the tests declare encrypted.
pub async fn default_storage_class(client: &Client) -> Result<Option<String>> {
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

/// The operator running in-process, with its own namespace, Lease and token key Secret.
pub struct Operator {
    /// Its namespace.
    pub namespace: String,
    /// The StorageClass it treats as encrypted (the cluster's default), if any.
    pub storage_class: Option<String>,
    client: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<tenantry_operator::Result<()>>,
}

impl Operator {
    /// Creates namespace `tenantry-e2e-<suffix>` with the token public key Secret holding
    /// `token_public_pem`, and starts the operator there.
    pub async fn start(client: &Client, suffix: &str, token_public_pem: &str) -> Result<Operator> {
        let namespace = format!("tenantry-e2e-{suffix}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
            )
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        secrets
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: serde_json::from_value(json!({"name": names::TOKEN_KEY_SECRET}))?,
                    data: Some(BTreeMap::from([(
                        names::TOKEN_KEY_KEY.to_owned(),
                        ByteString(token_public_pem.as_bytes().to_vec()),
                    )])),
                    ..Secret::default()
                },
            )
            .await?;
        let storage_class = default_storage_class(client).await?;
        let settings = Settings {
            operator_namespace: namespace.clone(),
            control_plane_namespace: namespace.clone(),
            encrypted_storage_classes: storage_class.iter().cloned().collect(),
            default_storage_class: storage_class.clone(),
            resync: Duration::from_secs(30),
            ..Settings::default()
        };
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(
            settings,
            LeaderOptions {
                lease_name: "tenantry-e2e".into(),
                lease_duration: Duration::from_secs(15),
                identity: format!("e2e-{suffix}"),
            },
            client.clone(),
            admin,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Operator {
            namespace,
            storage_class,
            client: client.clone(),
            stop,
            task,
        })
    }

    /// Stops the operator and deletes its namespace.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let namespaces: Api<Namespace> = Api::all(self.client);
        let _ = namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}
