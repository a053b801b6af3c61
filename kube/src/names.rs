//! Every name that Kubernetes, `kubectl` users or other programs see: the API group, the
//! field manager, the finalizer, label and annotation keys, child object names and the
//! file layout inside the runtime container. One place, so a rename is one edit.

/// API group of the `Tenant` resource.
pub const GROUP: &str = "tenantry.dev";
/// API version of the `Tenant` resource.
pub const VERSION: &str = "v1alpha1";
/// Kind of the resource.
pub const KIND: &str = "Tenant";
/// Name of the CustomResourceDefinition.
pub const CRD_NAME: &str = "tenants.tenantry.dev";

/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "tenantry-operator";
/// Finalizer that keeps a Tenant until its namespace is gone.
pub const FINALIZER: &str = "tenantry.dev/cleanup";
/// Name reported as the controller in Events.
pub const CONTROLLER_NAME: &str = "tenantry-operator";

/// StorageClass annotation by which the platform marks a class as encrypted at rest.
pub const ANNOTATION_ENCRYPTED: &str = "tenantry.dev/encrypted";
/// Pod template annotation holding a hash of the runtime config, so a config change rolls
/// the Deployment.
pub const ANNOTATION_CONFIG_HASH: &str = "tenantry.dev/config-hash";

/// Label on every child object: the owning tenant.
pub const LABEL_TENANT: &str = "tenantry.dev/tenant";
/// Label on every child object: what manages it.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label on the runtime pods and Service.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label on a Tenant made by the control API: the tenant's id in the API's database. The
/// API binds instance tokens to this id, so the runtime is configured with it.
pub const LABEL_TENANT_ID: &str = "tenantry.dev/tenant-id";
/// Label on every child object: the tenant's plan.
pub const LABEL_PLAN: &str = "tenantry.dev/plan";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "tenantry-operator";
/// Value of [`LABEL_NAME`] on runtime pods.
pub const RUNTIME_APP: &str = "tenant-runtime";
/// The namespace label that every namespace carries (set by Kubernetes).
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";
/// Pod Security Admission: level enforced in tenant namespaces.
pub const LABEL_PSA_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
/// Pod Security Admission: version of the enforced level.
pub const LABEL_PSA_ENFORCE_VERSION: &str = "pod-security.kubernetes.io/enforce-version";
/// Pod Security Admission: level that produces warnings.
pub const LABEL_PSA_WARN: &str = "pod-security.kubernetes.io/warn";
/// Pod Security Admission: level that is audited.
pub const LABEL_PSA_AUDIT: &str = "pod-security.kubernetes.io/audit";
/// Label that marks a namespace as a tenant namespace (used to keep tenants apart).
pub const LABEL_TENANT_NAMESPACE: &str = "tenantry.dev/tenant-namespace";

/// Prefix of tenant namespaces: `tenant-<tenant name>`.
pub const NAMESPACE_PREFIX: &str = "tenant-";
/// Longest tenant name, so that `tenant-<name>` is a valid namespace name (63 characters).
pub const MAX_TENANT_NAME_LEN: usize = 63 - NAMESPACE_PREFIX.len();

/// NetworkPolicy denying all ingress and egress in the tenant namespace.
pub const POLICY_DEFAULT_DENY: &str = "default-deny";
/// NetworkPolicy allowing ingress to the runtime port.
pub const POLICY_ALLOW_INGRESS: &str = "allow-runtime-ingress";
/// NetworkPolicy allowing DNS and internet egress.
pub const POLICY_ALLOW_EGRESS: &str = "allow-egress";
/// ResourceQuota name.
pub const QUOTA: &str = "tenant-quota";
/// LimitRange name.
pub const LIMIT_RANGE: &str = "tenant-limits";
/// ServiceAccount of the runtime.
pub const SERVICE_ACCOUNT: &str = "tenant-runtime";
/// Secret holding the tenant's data-encryption key.
pub const DATA_KEY_SECRET: &str = "tenant-data-key";
/// Key inside [`DATA_KEY_SECRET`]: exactly 32 random bytes.
pub const DATA_KEY_KEY: &str = "data.key";
/// Key inside [`DATA_KEY_SECRET`] during a key-encryption key rotation: the key before it,
/// which the runtime uses only to unwrap what it has not re-wrapped yet.
pub const DATA_KEY_PREVIOUS_KEY: &str = "data.key.previous";
/// Tenant annotation: set it to any new value to rotate the tenant's key-encryption key.
pub const ROTATE_DATA_KEY_ANNOTATION: &str = "tenantry.dev/rotate-data-key";
/// Annotation on [`DATA_KEY_SECRET`]: the [`ROTATE_DATA_KEY_ANNOTATION`] value last
/// handled, so each new value rotates once.
pub const DATA_KEY_ROTATION_HANDLED_ANNOTATION: &str = "tenantry.dev/data-key-rotation";
/// TLS Secret of the runtime.
pub const TLS_SECRET: &str = "tenant-tls";
/// Secret (in the tenant namespace) holding the API's token public key.
pub const TOKEN_KEY_SECRET: &str = "tenantry-token-public-key";
/// Key of the PEM public key, in the operator's source Secret and in the tenant copy.
pub const TOKEN_KEY_KEY: &str = "public.pem";
/// ConfigMap holding the runtime config.
pub const CONFIG_MAP: &str = "tenant-runtime-config";
/// Key inside [`CONFIG_MAP`].
pub const CONFIG_KEY: &str = "config.yaml";
/// PersistentVolumeClaim holding the runtime's data directory.
pub const DATA_PVC: &str = "tenant-data";
/// The backup volume's PersistentVolumeClaim (with `spec.backup`).
pub const BACKUP_PVC: &str = "tenant-backups";
/// The ConfigMap in a tenant namespace with the backup recipients (public keys).
pub const BACKUP_RECIPIENTS_CONFIG_MAP: &str = "tenant-backup-recipients";
/// Its key.
pub const BACKUP_RECIPIENTS_KEY: &str = "recipients";
/// Where the runtime's backup volume is mounted.
pub const BACKUP_DIR: &str = "/var/lib/tenantry-backups";
/// Where the backup recipients are mounted.
pub const BACKUP_RECIPIENTS_DIR: &str = "/etc/tenantry/backup";
/// Deployment of the runtime.
pub const DEPLOYMENT: &str = "tenant-runtime";
/// ClusterIP Service in front of the runtime.
pub const SERVICE: &str = "tenant-runtime";
/// Name of the runtime container.
pub const CONTAINER: &str = "runtime";

/// Port the runtime serves HTTPS on.
pub const RUNTIME_PORT: u16 = 8443;
/// Name of the runtime port.
pub const RUNTIME_PORT_NAME: &str = "https";
/// Where the config file is mounted.
pub const CONFIG_DIR: &str = "/etc/tenantry/config";
/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/tenantry/tls";
/// Where the data-key Secret is mounted.
pub const DATA_KEY_DIR: &str = "/etc/tenantry/data-key";
/// Where the token public key is mounted.
pub const TOKEN_KEY_DIR: &str = "/etc/tenantry/token";
/// Where the PVC is mounted: the only writable path of the runtime.
pub const DATA_DIR: &str = "/var/lib/tenantry";
/// Environment variable telling the runtime where its config file is.
pub const RUNTIME_CONFIG_ENV: &str = "TENANTRY_CONFIG";

/// Secret (in the operator namespace) holding the operator's CA.
pub const DEFAULT_CA_SECRET: &str = "tenantry-ca";
/// Annotation on [`DEFAULT_CA_SECRET`]: set it to any new value to rotate the operator CA
/// (`kubectl annotate secret -n <operator ns> tenantry-ca tenantry.dev/rotate=<value>`).
pub const ROTATE_CA_ANNOTATION: &str = "tenantry.dev/rotate";
/// Annotation on the CA Secret: the [`ROTATE_CA_ANNOTATION`] value last handled, so each
/// new value rotates once.
pub const CA_ROTATION_HANDLED_ANNOTATION: &str = "tenantry.dev/ca-rotation-handled";
/// Annotation on the CA Secret: the operator's `--rotate-ca` value last handled.
pub const CA_ROTATION_FLAG_HANDLED_ANNOTATION: &str = "tenantry.dev/ca-rotation-flag-handled";
/// Annotation on the CA Secret during a rotation: when it started (RFC 3339). Leaves are
/// re-issued by the new CA within `--ca-rotation-window` of it.
pub const CA_ROTATION_STARTED_ANNOTATION: &str = "tenantry.dev/ca-rotation-started";
/// Key of the CA Secret during a rotation: the previous CA's certificate (never its key,
/// which is deleted at rotation), still trusted until every leaf is re-issued.
pub const CA_PREVIOUS_KEY: &str = "previous.crt";
/// Common name of the operator's CA.
pub const CA_COMMON_NAME: &str = "Tenantry operator CA";
/// Lease used for leader election.
pub const DEFAULT_LEASE_NAME: &str = "tenantry-operator-leader";
/// Operator namespace when neither the flag nor `POD_NAMESPACE` is set.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "tenantry-system";

/// Name of the namespace of a tenant.
pub fn tenant_namespace(tenant_name: &str) -> String {
    format!("{NAMESPACE_PREFIX}{tenant_name}")
}
