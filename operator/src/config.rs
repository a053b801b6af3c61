//! Operator configuration: the `run` flags (each with a `TENANTRY_` environment twin) and
//! the resolved [`Settings`] that the pure builders read.

use std::net::SocketAddr;
use std::time::Duration;

use tenantry_kube::names;

/// Flags of `tenantry-operator run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Namespace of the operator: holds its CA Secret, the token public key Secret and the
    /// leader-election Lease. Defaults to `POD_NAMESPACE`, else `tenantry-system`.
    #[arg(long, env = "TENANTRY_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "TENANTRY_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Image of the tenant runtime.
    #[arg(
        long,
        env = "TENANTRY_RUNTIME_IMAGE",
        default_value = "ghcr.io/tenantry/tenant-runtime:latest"
    )]
    pub runtime_image: String,

    /// Namespace of the ingress controller, allowed to reach the runtime port.
    #[arg(
        long,
        env = "TENANTRY_INGRESS_NAMESPACE",
        default_value = "ingress-nginx"
    )]
    pub ingress_namespace: String,

    /// Namespace of the Tenantry control plane, allowed to reach the runtime port.
    /// Defaults to the operator namespace.
    #[arg(long, env = "TENANTRY_CONTROL_PLANE_NAMESPACE")]
    pub control_plane_namespace: Option<String>,

    /// Namespace of the cluster DNS pods.
    #[arg(long, env = "TENANTRY_DNS_NAMESPACE", default_value = "kube-system")]
    pub dns_namespace: String,

    /// Label (`key=value`) selecting the cluster DNS pods.
    #[arg(
        long,
        env = "TENANTRY_DNS_POD_LABEL",
        default_value = "k8s-app=kube-dns"
    )]
    pub dns_pod_label: String,

    /// CIDRs tenants may never reach (private ranges, pod and service networks, cloud
    /// metadata), comma separated. Everything else on the internet is allowed.
    #[arg(
        long,
        env = "TENANTRY_BLOCKED_EGRESS_CIDRS",
        value_delimiter = ',',
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,169.254.0.0/16,127.0.0.0/8,fc00::/7,fe80::/10,::1/128"
    )]
    pub blocked_egress_cidrs: Vec<String>,

    /// StorageClasses the platform guarantees are encrypted at rest, comma separated
    /// (in addition to classes annotated `tenantry.dev/encrypted: "true"`).
    #[arg(
        long,
        env = "TENANTRY_ENCRYPTED_STORAGE_CLASSES",
        value_delimiter = ','
    )]
    pub encrypted_storage_classes: Vec<String>,

    /// StorageClass used when a Tenant names none. It must be encrypted too.
    #[arg(long, env = "TENANTRY_DEFAULT_STORAGE_CLASS")]
    pub default_storage_class: Option<String>,

    /// Secret (operator namespace) holding the operator's CA; made on first start.
    #[arg(long, env = "TENANTRY_CA_SECRET", default_value = names::DEFAULT_CA_SECRET)]
    pub ca_secret: String,

    /// How long a CA rotation lasts: every tenant certificate is re-issued by the new CA
    /// within this time of the rotation's start (spread over it, so the API server is not
    /// asked for every Secret at once), then the previous CA leaves the trust bundles.
    #[arg(long, env = "TENANTRY_CA_ROTATION_WINDOW", default_value = "1h", value_parser = parse_window)]
    pub ca_rotation_window: Duration,

    /// Rotate the CA once for this value: like annotating the CA Secret with
    /// `tenantry.dev/rotate=<value>`; the value handled is recorded on the Secret, so a
    /// restart with the same value does not rotate again.
    #[arg(long, env = "TENANTRY_ROTATE_CA")]
    pub rotate_ca: Option<String>,

    /// Secret (operator namespace) holding the API's Ed25519 token public key under
    /// `public.pem`; copied into every tenant namespace.
    #[arg(
        long,
        env = "TENANTRY_TOKEN_PUBLIC_KEY_SECRET",
        default_value = names::TOKEN_KEY_SECRET
    )]
    pub token_public_key_secret: String,

    /// Cluster DNS domain, for the in-cluster names in tenant certificates.
    #[arg(long, env = "TENANTRY_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Lease used for leader election.
    #[arg(long, env = "TENANTRY_LEASE_NAME", default_value = names::DEFAULT_LEASE_NAME)]
    pub lease_name: String,

    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, env = "TENANTRY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u32,

    /// Identity in the Lease. Defaults to the pod's host name.
    #[arg(long, env = "TENANTRY_IDENTITY")]
    pub identity: Option<String>,

    /// Seconds between resyncs of a converged Tenant.
    #[arg(long, env = "TENANTRY_RESYNC_SECONDS", default_value_t = 600)]
    pub resync_seconds: u64,

    /// Seconds one reconcile may take before it is abandoned and retried with backoff.
    #[arg(long, env = "TENANTRY_RECONCILE_TIMEOUT_SECONDS", default_value_t = 30)]
    pub reconcile_timeout_seconds: u64,

    /// Tenants reconciled at once. Each reconcile sends its API calls one after another,
    /// so this bounds the operator's load on the API server.
    #[arg(long, env = "TENANTRY_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// A file of age X25519 recipients (`age1…` lines, public keys) that tenants' backups
    /// (`spec.backup`) are encrypted to. Without it no Tenant gets backups, and a Tenant
    /// that asks for them shows `BackupStale` with reason `NoBackupRecipients`.
    #[arg(long, env = "TENANTRY_BACKUP_RECIPIENTS_FILE")]
    pub backup_recipients_file: Option<std::path::PathBuf>,
}

/// A rotation window: `<number><unit>` parts with units `s`, `m`, `h`, `d` (`1h30m`).
fn parse_window(text: &str) -> Result<Duration, String> {
    tenantry_proto::runtime_config::parse_interval(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 1h, 30m or 90s"))
}

/// Reads and checks a backup recipients file: one or more `age1…` lines (`#` comments and
/// blank lines skipped); returns the recipients, one per line.
pub fn read_backup_recipients(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the backup recipients file {}: {e}",
            path.display()
        )
    })?;
    let mut out = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bech32 = |c: char| "qpzry9x8gf2tvdw0s3jn54khce6mua7l".contains(c);
        if !(line.len() == 62 && line.starts_with("age1") && line[4..].chars().all(bech32)) {
            return Err(format!(
                "{}:{}: not an age X25519 recipient (age1 followed by 58 bech32 characters)",
                path.display(),
                n + 1
            ));
        }
        out.push_str(line);
        out.push('\n');
    }
    if out.is_empty() {
        return Err(format!("{} holds no backup recipient", path.display()));
    }
    Ok(out)
}

/// Cluster-specific values the builders need; resolved once from [`RunArgs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the operator.
    pub operator_namespace: String,
    /// Image of the tenant runtime.
    pub runtime_image: String,
    /// Namespace of the ingress controller.
    pub ingress_namespace: String,
    /// Namespace of the control plane.
    pub control_plane_namespace: String,
    /// Namespace of the cluster DNS pods.
    pub dns_namespace: String,
    /// Label key and value of the cluster DNS pods.
    pub dns_pod_label: (String, String),
    /// CIDRs tenants may never reach.
    pub blocked_egress_cidrs: Vec<String>,
    /// StorageClasses encrypted by the platform's word.
    pub encrypted_storage_classes: Vec<String>,
    /// StorageClass for Tenants that name none.
    pub default_storage_class: Option<String>,
    /// Secret holding the CA.
    pub ca_secret: String,
    /// Secret holding the token public key.
    pub token_public_key_secret: String,
    /// How long a CA rotation lasts.
    pub ca_rotation_window: Duration,
    /// `--rotate-ca`.
    pub rotate_ca: Option<String>,
    /// Cluster DNS domain.
    pub cluster_domain: String,
    /// Resync period of converged Tenants.
    pub resync: Duration,
    /// Longest time one reconcile may take.
    pub reconcile_timeout: Duration,
    /// Tenants reconciled at once.
    pub concurrency: u16,
    /// The backup recipients (one `age1…` per line), when configured.
    pub backup_recipients: Option<String>,
}

impl Settings {
    /// Resolves `args`; `pod_namespace` is `POD_NAMESPACE`, read by `main`.
    pub fn from_args(args: &RunArgs, pod_namespace: Option<String>) -> Settings {
        let operator_namespace = args
            .namespace
            .clone()
            .or(pod_namespace)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| names::DEFAULT_OPERATOR_NAMESPACE.to_owned());
        let dns_pod_label = match args.dns_pod_label.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => ("k8s-app".to_owned(), args.dns_pod_label.trim().to_owned()),
        };
        let clean = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Settings {
            control_plane_namespace: args
                .control_plane_namespace
                .clone()
                .unwrap_or_else(|| operator_namespace.clone()),
            operator_namespace,
            runtime_image: args.runtime_image.clone(),
            ingress_namespace: args.ingress_namespace.clone(),
            dns_namespace: args.dns_namespace.clone(),
            dns_pod_label,
            blocked_egress_cidrs: clean(&args.blocked_egress_cidrs),
            encrypted_storage_classes: clean(&args.encrypted_storage_classes),
            default_storage_class: args.default_storage_class.clone().filter(|s| !s.is_empty()),
            ca_secret: args.ca_secret.clone(),
            token_public_key_secret: args.token_public_key_secret.clone(),
            ca_rotation_window: args.ca_rotation_window,
            rotate_ca: args.rotate_ca.clone().filter(|v| !v.is_empty()),
            cluster_domain: args.cluster_domain.clone(),
            resync: Duration::from_secs(args.resync_seconds.max(10)),
            reconcile_timeout: Duration::from_secs(args.reconcile_timeout_seconds.max(1)),
            concurrency: args.concurrency.max(1),
            // Read by `main` (a file): see [`read_backup_recipients`].
            backup_recipients: None,
        }
    }
}

impl Default for Settings {
    /// The defaults of every flag, with the operator in `tenantry-system`.
    fn default() -> Self {
        Settings {
            operator_namespace: names::DEFAULT_OPERATOR_NAMESPACE.to_owned(),
            runtime_image: "ghcr.io/tenantry/tenant-runtime:latest".to_owned(),
            ingress_namespace: "ingress-nginx".to_owned(),
            control_plane_namespace: names::DEFAULT_OPERATOR_NAMESPACE.to_owned(),
            dns_namespace: "kube-system".to_owned(),
            dns_pod_label: ("k8s-app".to_owned(), "kube-dns".to_owned()),
            blocked_egress_cidrs: [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
                "127.0.0.0/8",
                "fc00::/7",
                "fe80::/10",
                "::1/128",
            ]
            .map(String::from)
            .to_vec(),
            encrypted_storage_classes: vec![],
            default_storage_class: None,
            ca_secret: names::DEFAULT_CA_SECRET.to_owned(),
            token_public_key_secret: names::TOKEN_KEY_SECRET.to_owned(),
            ca_rotation_window: Duration::from_secs(3600),
            rotate_ca: None,
            cluster_domain: "cluster.local".to_owned(),
            resync: Duration::from_secs(600),
            reconcile_timeout: Duration::from_secs(30),
            concurrency: 16,
            backup_recipients: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn flag_defaults_equal_settings_default() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(Settings::from_args(&cli.run, None), Settings::default());
    }

    #[test]
    fn namespace_falls_back_to_pod_namespace_then_default() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let s = Settings::from_args(&cli.run, Some("ops".into()));
        assert_eq!(s.operator_namespace, "ops");
        assert_eq!(s.control_plane_namespace, "ops");
        let cli =
            Cli::try_parse_from(["x", "--namespace", "flag", "--dns-pod-label", "app=coredns"])
                .unwrap();
        let s = Settings::from_args(&cli.run, Some("ops".into()));
        assert_eq!(s.operator_namespace, "flag");
        assert_eq!(s.dns_pod_label, ("app".into(), "coredns".into()));
    }

    #[test]
    fn lists_are_comma_separated() {
        let cli = Cli::try_parse_from([
            "x",
            "--encrypted-storage-classes",
            "gp3-enc, premium-enc",
            "--blocked-egress-cidrs",
            "10.0.0.0/8",
        ])
        .unwrap();
        let s = Settings::from_args(&cli.run, None);
        assert_eq!(s.encrypted_storage_classes, ["gp3-enc", "premium-enc"]);
        assert_eq!(s.blocked_egress_cidrs, ["10.0.0.0/8"]);
    }
}
