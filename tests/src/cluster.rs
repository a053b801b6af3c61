//! Real-cluster helpers: connecting (or saying why the test skips), taking turns on the
//! cluster, installing the CRD and the chart's RBAC, service-account kubeconfigs from the TokenRequest API, the API
//! server's own request counters, and the real `tenantry-operator` binary as a process.

use std::collections::BTreeMap;
use std::fs::{File, TryLockError};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tenantry_kube::crd::{Tenant, crd};
use tenantry_kube::names;
use tenantry_test_support::eventually_some;

/// Field manager of the tests' own writes.
pub const TEST_MANAGER: &str = "tenantry-e2e";

/// Polls `f` every 200 ms until it yields a value; fails after `timeout`, or as soon as
/// `f` fails.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let polled = eventually_some(timeout, Duration::from_millis(200), || {
        let next = f();
        // An error is an answer too: `Some(Err)` ends the wait.
        async move { next.await.transpose() }
    })
    .await;
    match polled {
        Some(answer) => answer,
        None => bail!("timed out after {timeout:?} waiting for {what}"),
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

/// The real cluster named by `KUBECONFIG`, as its administrator.
pub struct Cluster {
    /// Admin client.
    pub client: Client,
}

/// Connects to the cluster named by `KUBECONFIG`; None (after printing why `test` skips)
/// when it is unset.
pub async fn cluster(test: &str) -> Result<Option<Cluster>> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "skipping {test}: KUBECONFIG is not set (point it at a disposable cluster to run it)"
        );
        return Ok(None);
    }
    let client = Client::try_default()
        .await
        .context("connecting to the cluster named by KUBECONFIG")?;
    Ok(Some(Cluster { client }))
}

/// Held by a real-cluster test for as long as it runs. The tests start operators against
/// one shared cluster, so two at once would reconcile each other's Tenants: whether they
/// run as threads of one test binary or as processes (cargo-nextest runs each test in its
/// own), each waits here for the one before it. Dropping it lets the next one in.
pub struct ClusterLock {
    _file: File,
}

/// Takes the [`ClusterLock`] (an exclusive lock on a file in the temporary directory),
/// waiting while another test holds it.
pub async fn lock_cluster() -> Result<ClusterLock> {
    let path = std::env::temp_dir().join("tenantry-e2e-cluster.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let file = match file.try_lock() {
        Ok(()) => file,
        Err(TryLockError::WouldBlock) => {
            eprintln!(
                "waiting for {}: another real-cluster test is running",
                path.display()
            );
            tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                .await?
                .with_context(|| format!("locking {}", path.display()))?
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    };
    Ok(ClusterLock { _file: file })
}

/// `kubectl`: `$KUBECTL` when set (a client matching the server's version), else the one
/// on the PATH.
pub fn kubectl() -> Command {
    Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()))
}

/// Runs `kubectl args` with `stdin`; returns (success, stdout, stderr).
pub fn kubectl_with(args: &[&str], stdin: &str) -> Result<(bool, String, String)> {
    let mut child = kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (set KUBECTL or put kubectl on the PATH)")?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

impl Cluster {
    /// Applies the generated CRD and waits until it is established.
    pub async fn install_crd(&self) -> Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        crds.patch(
            names::CRD_NAME,
            &PatchParams::apply(TEST_MANAGER).force(),
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

    /// Creates namespace `name` (no error if it exists) and waits until it is active.
    pub async fn namespace(&self, name: &str) -> Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        // A namespace left terminating by an earlier run must finish first.
        eventually(
            &format!("namespace {name} to finish terminating"),
            Duration::from_secs(120),
            || async {
                let ns = namespaces.get_opt(name).await?;
                Ok(ns
                    .is_none_or(|n| n.metadata.deletion_timestamp.is_none())
                    .then_some(()))
            },
        )
        .await?;
        namespaces
            .patch(
                name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
                ),
            )
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(())
    }

    /// Renders the chart's ServiceAccounts, Roles, ClusterRoles and bindings for release
    /// namespace `namespace` (`.ci/chart_check.py --render-rbac`, Helm's own code) and
    /// applies them, so that the real authorizer checks every call the operator and the
    /// API make against the chart's rules.
    pub async fn install_chart_rbac(&self, namespace: &str) -> Result<()> {
        self.namespace(namespace).await?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/chart_check.py");
        let out = Command::new("python3")
            .arg(&script)
            .args(["--render-rbac", namespace])
            .output()
            .context("running python3 .ci/chart_check.py --render-rbac")?;
        if !out.status.success() {
            bail!(
                "rendering the chart's RBAC failed (pip install the packages .ci/run installs): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rendered = String::from_utf8(out.stdout)?;
        let (ok, _, err) = kubectl_with(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager",
                TEST_MANAGER,
                "-f",
                "-",
            ],
            &rendered,
        )?;
        if !ok {
            bail!("applying the chart's RBAC failed: {err}");
        }
        Ok(())
    }

    /// A kubeconfig file in `dir` that authenticates as ServiceAccount `namespace/name`
    /// with a token from the TokenRequest API (what `kubectl create token` does).
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        dir: &Path,
    ) -> Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let token = accounts
            .create_token_request(
                name,
                &PostParams::default(),
                &TokenRequest {
                    spec: Some(TokenRequestSpec {
                        expiration_seconds: Some(3 * 3600),
                        ..TokenRequestSpec::default()
                    }),
                    ..TokenRequest::default()
                },
            )
            .await
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?
            .status
            .context("the TokenRequest has no status")?
            .token;
        let admin = kube::config::Kubeconfig::read().context("reading KUBECONFIG")?;
        let context_name = admin
            .current_context
            .clone()
            .context("KUBECONFIG has no current context")?;
        let context = admin
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.clone())
            .context("the current context is missing")?;
        let mut cluster = admin
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.clone())
            .context("the current cluster is missing")?;
        // Inline a CA file so the kubeconfig works from any directory.
        if let Some(path) = cluster.certificate_authority.take() {
            let pem = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
            cluster.certificate_authority_data = Some(base64_encode(&pem));
        }
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": cluster}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": name}}],
            "current-context": "e2e",
        });
        let path = dir.join(format!("{namespace}-{name}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(path)
    }

    /// Creates (or updates) the token public key Secret in the operator namespace.
    pub async fn token_public_key(&self, namespace: &str, pem: &str) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = Secret {
            metadata: serde_json::from_value(json!({"name": names::TOKEN_KEY_SECRET}))?,
            data: Some(BTreeMap::from([(
                names::TOKEN_KEY_KEY.to_owned(),
                ByteString(pem.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        secrets
            .patch(
                names::TOKEN_KEY_SECRET,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .context("writing the token public key Secret")?;
        Ok(())
    }

    /// Creates StorageClass `name`, annotated encrypted when `encrypted`.
    pub async fn storage_class(&self, name: &str, encrypted: bool) -> Result<()> {
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let annotations = if encrypted {
            json!({names::ANNOTATION_ENCRYPTED: "true"})
        } else {
            json!({})
        };
        classes
            .patch(
                name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                    "metadata": {"name": name, "annotations": annotations},
                    "provisioner": "example.com/none",
                })),
            )
            .await
            .with_context(|| format!("creating StorageClass {name}"))?;
        Ok(())
    }

    /// Creates Tenant `name` with `spec` (a POST, so it is not counted as an operator
    /// write by [`RequestCounts::operator_writes`]).
    pub async fn create_tenant(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let tenants: Api<Tenant> = Api::all(self.client.clone());
        let t: Tenant = serde_json::from_value(json!({
            "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        tenants
            .create(&PostParams::default(), &t)
            .await
            .with_context(|| format!("creating Tenant {name}"))?;
        Ok(())
    }

    /// Deletes every Tenant whose name starts with `prefix` and waits until they and their
    /// namespaces are gone (an operator must be running to release them).
    pub async fn delete_tenants(&self, prefix: &str, within: Duration) -> Result<()> {
        let tenants: Api<Tenant> = Api::all(self.client.clone());
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for t in tenants.list(&ListParams::default()).await? {
            if t.name_any().starts_with(prefix) {
                let _ = tenants
                    .delete(&t.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        let ns_prefix = names::tenant_namespace(prefix);
        eventually(
            &format!("every {prefix}* Tenant and namespace to be gone"),
            within,
            || async {
                let left = tenants
                    .list(&ListParams::default())
                    .await?
                    .iter()
                    .filter(|t| t.name_any().starts_with(prefix))
                    .count()
                    + namespaces
                        .list(&ListParams::default())
                        .await?
                        .iter()
                        .filter(|n| n.name_any().starts_with(&ns_prefix))
                        .count();
                Ok((left == 0).then_some(()))
            },
        )
        .await
    }

    /// The API server's `apiserver_request_total` counters, read from its `/metrics`.
    pub async fn request_counts(&self) -> Result<RequestCounts> {
        let request = http::Request::get("/metrics").body(vec![])?;
        let text = self
            .client
            .request_text(request)
            .await
            .context("reading the API server's /metrics")?;
        Ok(RequestCounts::parse(&text))
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    data_encoding::BASE64.encode(bytes)
}

/// `apiserver_request_total`, keyed by its labels.
#[derive(Clone, Debug, Default)]
pub struct RequestCounts(BTreeMap<BTreeMap<String, String>, f64>);

impl RequestCounts {
    /// Parses the Prometheus text exposition.
    pub fn parse(text: &str) -> RequestCounts {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let mut map = BTreeMap::new();
            for pair in labels.split("\",") {
                if let Some((k, v)) = pair.split_once("=\"") {
                    map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
            }
            if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(map, v);
            }
        }
        RequestCounts(out)
    }

    fn sum_since(
        &self,
        before: &RequestCounts,
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> u64 {
        let total: f64 = self
            .0
            .iter()
            .filter(|(labels, _)| keep(labels))
            .map(|(labels, v)| v - before.0.get(labels).copied().unwrap_or(0.0))
            .sum();
        total.max(0.0).round() as u64
    }

    /// Writes the operator made since `before`, by the API server's count: every
    /// non-dry-run server-side apply except to Leases, CRDs and the Tenants themselves
    /// (the tests create Tenants with POST and never apply them while counting); merge
    /// patches of Tenants (finalizers); Secrets created (data keys); namespaces deleted;
    /// and `events.k8s.io` Events. The controller-manager never sends any of these, and
    /// the tests send none while counting.
    pub fn operator_writes(&self, before: &RequestCounts) -> u64 {
        self.sum_since(before, |l| {
            let get = |k: &str| l.get(k).map(String::as_str).unwrap_or("");
            let (verb, resource, sub, group) = (
                get("verb"),
                get("resource"),
                get("subresource"),
                get("group"),
            );
            if !get("dry_run").is_empty() || !get("code").starts_with('2') {
                return false;
            }
            match verb {
                "APPLY" => {
                    let ours = matches!(resource, "leases" | "customresourcedefinitions")
                        || resource == "tenants" && sub.is_empty();
                    !ours
                }
                "PATCH" => resource == "tenants" || group == "events.k8s.io",
                "POST" => resource == "secrets" && sub.is_empty() || group == "events.k8s.io",
                "DELETE" => resource == "namespaces",
                _ => false,
            }
        })
    }

    /// Every counter that moved since `before`, as `VERB resource[/subresource] (dry run)
    /// code: n`, for the message of a failed expectation.
    pub fn changes(&self, before: &RequestCounts) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(labels, v)| {
                let n = (v - before.0.get(labels).copied().unwrap_or(0.0)).round() as u64;
                let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
                let verb = get("verb");
                (n > 0 && !matches!(verb, "GET" | "LIST" | "WATCH")).then(|| {
                    let sub = get("subresource");
                    let group = get("group");
                    format!(
                        "{verb} {}{}{}{}{}{} {}: {n}",
                        if group.is_empty() { "" } else { group },
                        if group.is_empty() { "" } else { "/" },
                        get("resource"),
                        if sub.is_empty() { "" } else { "/" },
                        sub,
                        if get("dry_run").is_empty() {
                            ""
                        } else {
                            " (dry run)"
                        },
                        get("code"),
                    )
                })
            })
            .collect()
    }

    /// Server-side dry-run applies since `before`.
    pub fn dry_runs(&self, before: &RequestCounts) -> u64 {
        self.sum_since(before, |l| {
            l.get("dry_run").is_some_and(|d| !d.is_empty())
                && l.get("verb").is_some_and(|v| v == "APPLY")
        })
    }

    /// Server-side applies (not dry runs) since `before`, of any client.
    pub fn applies(&self, before: &RequestCounts) -> u64 {
        self.sum_since(before, |l| {
            l.get("dry_run").is_some_and(|d| d.is_empty())
                && l.get("verb").is_some_and(|v| v == "APPLY")
        })
    }
}

/// The real `tenantry-operator run` binary as a child process.
pub struct OperatorProcess {
    child: Child,
    /// Its admin address (`/metrics`, `/readyz`).
    pub admin: std::net::SocketAddr,
    /// Its Lease identity.
    pub identity: String,
    log: PathBuf,
}

/// How a test starts an operator.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// The binary (debug for tests, release for the benchmark).
    pub binary: PathBuf,
    /// Kubeconfig it runs with (a ServiceAccount's, for real RBAC).
    pub kubeconfig: PathBuf,
    /// Its namespace (Lease, CA, token key).
    pub namespace: String,
    /// Lease duration in seconds.
    pub lease_seconds: u32,
    /// Extra flags.
    pub extra: Vec<String>,
    /// Where its log goes.
    pub log_dir: PathBuf,
}

impl OperatorProcess {
    /// Starts `tenantry-operator run` as `identity`.
    pub fn start(options: &OperatorOptions, identity: &str) -> Result<OperatorProcess> {
        let port = tenantry_test_support::free_port();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = options.log_dir.join(format!("{identity}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&options.binary)
            .arg("run")
            .args(["--namespace", &options.namespace])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--identity", identity])
            .args([
                "--lease-duration-seconds",
                &options.lease_seconds.to_string(),
            ])
            .args(&options.extra)
            .env("KUBECONFIG", &options.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("TENANTRY_E2E_OPERATOR_LOG")
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting {}", options.binary.display()))?;
        Ok(OperatorProcess {
            child,
            admin,
            identity: identity.to_owned(),
            log,
        })
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of metric `name` (no labels) on its admin port, if it serves it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let mut stream =
            std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).ok()?;
        body.lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Sends SIGTERM and waits up to 30 s; returns how long it took to exit, and whether
    /// it exited successfully.
    pub fn terminate(&mut self) -> Result<(Duration, bool)> {
        let start = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !sent.success() {
            bail!("kill -TERM failed");
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((start.elapsed(), status.success()));
            }
            if start.elapsed() > Duration::from_secs(30) {
                self.child.kill()?;
                bail!("the operator was still running 30 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crashed node would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
