//! The `Tenant` custom resource (`tenants.tenantry.dev/v1alpha1`): its spec, its status and
//! the generated CustomResourceDefinition with every validation rule the API server enforces.
//!
//! The committed `charts/tenantry/crds/tenants.tenantry.dev.yaml` is generated from [`crd`]
//! by `tenantry-operator crd`; a test in the operator fails when they differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
pub use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{DEFAULT_MAX_AGE_HOURS, DEFAULT_MAX_COUNT, Plan};

use crate::names;

/// Desired state of a tenant: one isolated instance of the product.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tenantry.dev",
    version = "v1alpha1",
    kind = "Tenant",
    shortname = "tn",
    status = "TenantStatus",
    doc = "A tenant: one customer's isolated instance (namespace, private network, quotas, encrypted volume, managed TLS).",
    // Raw JSON columns: clippy's duplicated_attributes misfires on the structured form.
    printcolumn = r#"{"name":"Phase","type":"string","description":"Lifecycle phase of the tenant","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Plan","type":"string","description":"The tenant's plan","jsonPath":".spec.plan"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the instance is serving","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Cert-Expiry","type":"string","description":"When the tenant's TLS certificate expires (RFC 3339; a string column, because kubectl shows a future date column as <invalid>)","jsonPath":".status.certificate.notAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name shown in portals and `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub display_name: Option<String>,

    /// Who owns the tenant (an email address or account id). Immutable.
    #[schemars(length(min = 1, max = 254))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "owner is immutable"}]))]
    pub owner: String,

    /// Plan: `free`, `standard` or `enterprise`. Sets the ResourceQuota and LimitRange of
    /// the tenant namespace and the runtime's resources.
    #[serde(default)]
    #[schemars(schema_with = "plan_schema")]
    pub plan: Plan,

    /// When true the runtime is scaled to zero; data, keys and certificates are kept.
    #[serde(default)]
    pub suspended: bool,

    /// How long the runtime keeps execution data.
    #[serde(default)]
    pub retention: RetentionSpec,

    /// The encrypted volume holding the runtime's data.
    #[serde(default)]
    pub storage: StorageSpec,

    /// The tenant's managed TLS certificate.
    #[serde(default)]
    pub tls: TlsSpec,

    /// Extra network access to the instance, on top of the platform's ingress controller
    /// and control plane.
    #[serde(default)]
    pub network: NetworkSpec,

    /// OAuth 2 providers the instance may call for its credentials' grants.
    #[serde(default, skip_serializing_if = "OAuth2Spec::is_empty")]
    pub oauth2: OAuth2Spec,

    /// Scheduled, encrypted backups of the instance's store, onto a volume of their own.
    /// Absent: none (back the data volume up with the platform's snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
}

/// Scheduled backups: the runtime backs its store up every `interval` onto the backup
/// volume (on the data volume's encrypted StorageClass), encrypted to the operator's
/// backup recipients, and keeps the newest `keep`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// How often: a whole number of `s`, `m`, `h` or `d` units (`6h`, `1d`, `90m`), at
    /// least `1m`.
    #[serde(default = "default_backup_interval")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+[smhd])+$"))]
    pub interval: String,
    /// How many backups the volume keeps (1 to 1000).
    #[serde(default = "default_backup_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: u32,
    /// Size of the backup volume: a whole number of Mi, Gi or Ti. Immutable. The data and
    /// backup volumes together must fit the plan's storage quota.
    #[serde(default = "default_backup_size")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,5}(Mi|Gi|Ti)$"))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "size is immutable"}]))]
    pub size: String,
}

/// Default backup interval.
pub const DEFAULT_BACKUP_INTERVAL: &str = "24h";
/// Default number of backups kept.
pub const DEFAULT_BACKUP_KEEP: u32 = 7;
/// Default backup volume size.
pub const DEFAULT_BACKUP_SIZE: &str = "2Gi";

fn default_backup_interval() -> String {
    DEFAULT_BACKUP_INTERVAL.to_owned()
}

fn default_backup_keep() -> u32 {
    DEFAULT_BACKUP_KEEP
}

fn default_backup_size() -> String {
    DEFAULT_BACKUP_SIZE.to_owned()
}

impl Default for BackupSpec {
    fn default() -> Self {
        BackupSpec {
            interval: default_backup_interval(),
            keep: DEFAULT_BACKUP_KEEP,
            size: default_backup_size(),
        }
    }
}

fn plan_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Plan: `free`, `standard` or `enterprise`. Sets the ResourceQuota and LimitRange of the tenant namespace and the runtime's resources.",
        "type": "string",
        "enum": ["free", "standard", "enterprise"],
        "default": "free"
    })
}

fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = TenantPhase::ALL.iter().map(|p| p.as_str()).collect();
    schemars::json_schema!({
        "description": "Lifecycle phase of a tenant.",
        "type": ["string", "null"],
        "enum": names,
    })
}

/// Retention of execution data; the runtime deletes whatever is older or beyond the count.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Executions older than this many hours are deleted (1 to 720, i.e. 30 days at most).
    #[serde(default = "default_max_age_hours")]
    #[schemars(range(min = 1, max = 720))]
    pub max_age_hours: u32,
    /// Only the newest this many executions are kept (1 to 1,000,000).
    #[serde(default = "default_max_count")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_count: u32,
}

fn default_max_age_hours() -> u32 {
    DEFAULT_MAX_AGE_HOURS
}

fn default_max_count() -> u32 {
    DEFAULT_MAX_COUNT
}

impl Default for RetentionSpec {
    fn default() -> Self {
        RetentionSpec {
            max_age_hours: DEFAULT_MAX_AGE_HOURS,
            max_count: DEFAULT_MAX_COUNT,
        }
    }
}

/// The runtime's data volume. The operator only uses a StorageClass the platform marked as
/// encrypted; otherwise no volume is made and `StorageEncrypted` is False.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.storageClassName) == has(oldSelf.storageClassName)",
    "message": "storageClassName is immutable"
}]))]
pub struct StorageSpec {
    /// Size of the volume: a whole number of Mi, Gi or Ti, e.g. `10Gi`. Immutable. Must fit
    /// the plan's storage quota.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,5}(Mi|Gi|Ti)$"))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "size is immutable"}]))]
    pub size: String,
    /// StorageClass of the volume; it must be marked encrypted. Defaults to the operator's
    /// `--default-storage-class`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "storageClassName is immutable"}]))]
    pub storage_class_name: Option<String>,
}

/// Default volume size.
pub const DEFAULT_STORAGE_SIZE: &str = "1Gi";

fn default_storage_size() -> String {
    DEFAULT_STORAGE_SIZE.to_owned()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// The managed TLS certificate, issued by the operator's CA (ECDSA P-256).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.renewBefore) || duration(self.renewBefore) < duration(has(self.duration) ? self.duration : '2160h')",
    "message": "renewBefore must be shorter than duration"
}]))]
pub struct TlsSpec {
    /// Public DNS names of the instance, added to the certificate next to its in-cluster
    /// service names. The first one is the tenant's endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 20),
        inner(
            length(min = 1, max = 253),
            regex(
                pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
            )
        )
    )]
    pub dns_names: Vec<String>,
    /// Lifetime of each certificate, as a Go duration (`2160h` = 90 days, the default);
    /// between 1h and 8760h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) >= duration('1h') && duration(self) <= duration('8760h')",
        "message": "duration must be between 1h and 8760h"
    }]))]
    pub duration: Option<String>,
    /// Renew this long before expiry, as a Go duration (e.g. `720h`). By default a
    /// certificate is renewed at two thirds of its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) >= duration('1m')",
        "message": "renewBefore must be at least 1m"
    }]))]
    pub renew_before: Option<String>,
}

/// Extra ingress sources allowed to reach the runtime port. Egress and everything else stay
/// as the platform's policy says.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// CIDRs (IPv4 or IPv6) allowed to connect to the runtime port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 43)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(c, isCIDR(c))",
        "message": "every entry must be a CIDR such as 203.0.113.0/24"
    }]))]
    pub allowed_ingress_cidrs: Vec<String>,
    /// Namespaces whose pods may connect to the runtime port. Tenant namespaces are refused:
    /// tenants never reach one another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 63)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(n, !n.startsWith('tenant-'))",
        "message": "tenant namespaces cannot be allowed"
    }]))]
    pub allowed_ingress_namespaces: Vec<String>,
}

/// The OAuth 2 provider hosts a tenant's credentials may name (the runtime's
/// `oauth2.allowed_hosts`); none by default, so no credential can make the instance call
/// an address the platform did not allow. The tenant's NetworkPolicy egress still applies.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Spec {
    /// `host`, `host:port`, `*.domain` (any subdomain) or `[IPv6]:port`: lowercase DNS
    /// names or IP addresses; without a port any port matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 261)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(h, h.matches('^([*][.])?[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[0-9]{1,5})?$') || h.matches('^\\\\[[0-9a-f:.]+\\\\](:[0-9]{1,5})?$'))",
        "message": "every entry must be a lowercase host, host:port or *.domain such as accounts.example.com"
    }]))]
    pub allowed_hosts: Vec<String>,
}

impl OAuth2Spec {
    /// True when no provider is allowed (the field is then left out).
    pub fn is_empty(&self) -> bool {
        self.allowed_hosts.is_empty()
    }
}

/// Observed state of a tenant.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Lifecycle phase of a tenant.
    // One of Pending, Provisioning, Ready, Suspended, Degraded or Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<TenantPhase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The tenant's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// URL of the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The certificate currently served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// The newest backup the runtime reported (with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackupStatus>,
    /// NamespaceReady, NetworkIsolated, StorageEncrypted, CertificateReady, RuntimeReady and
    /// Ready; with `spec.backup` also BackupStale (True when the newest backup is older than
    /// twice the interval, or none was reported). `lastTransitionTime` changes only when a
    /// status changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The newest backup of the instance's store.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastBackupStatus {
    /// When its snapshot was taken.
    pub time: Time,
}

/// The certificate currently in the tenant's TLS Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity.
    pub not_after: Time,
    /// When the operator renews it (during a CA rotation, when it is re-issued by the
    /// new CA if that is sooner).
    pub renewal_time: Time,
    /// SHA-256 fingerprint (lowercase hex of the DER) of the CA certificate that issued
    /// it: during a CA rotation, it tells the leaves still from the previous CA from
    /// those re-issued by the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_fingerprint: Option<String>,
}

/// CEL rule on the whole object: the tenant name must make a valid namespace name.
const NAME_RULE: &str = "size(self.metadata.name) <= 56 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";

/// The CustomResourceDefinition of `Tenant`, with the rules that schemars cannot express.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = known_formats(Tenant::crd());
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema
                .x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(ValidationRule {
                    rule: NAME_RULE.to_owned(),
                    message: Some(format!(
                        "metadata.name must be a DNS label of at most {} characters \
                         (it names the namespace tenant-<name>)",
                        names::MAX_TENANT_NAME_LEN
                    )),
                    ..ValidationRule::default()
                });
        }
    }
    crd
}

/// Integer formats the API server knows. schemars writes `uint32` for a `u32`, which the
/// API server does not recognise (every `kubectl apply` of the CRD warns "unrecognized
/// format"); the schema's own `minimum`/`maximum` already bound those fields.
const FORMATS: [(&str, &str); 2] = [("uint32", "int32"), ("uint64", "int64")];

fn known_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(f)) = map.get_mut("format")
                    && let Some((_, known)) = FORMATS.iter().find(|(from, _)| f == from)
                {
                    *f = (*known).to_owned();
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn every_format_is_one_the_api_server_knows() {
        fn formats(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(f)) = m.get("format") {
                        out.push(f.clone());
                    }
                    m.values().for_each(|v| formats(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| formats(v, out)),
                _ => {}
            }
        }
        let mut found = vec![];
        formats(&serde_json::to_value(crd()).unwrap(), &mut found);
        assert!(found.contains(&"int32".to_owned()));
        for f in found {
            assert!(["int32", "int64", "date-time"].contains(&f.as_str()), "{f}");
        }
    }
    use tenantry_proto::retention::{HARD_CAP_MAX_AGE_HOURS, MAX_MAX_COUNT};

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    #[test]
    fn names_scope_and_subresources() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], names::CRD_NAME);
        assert_eq!(crd["spec"]["group"], names::GROUP);
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["kind"], names::KIND);
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["tn"]));
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], names::VERSION);
        assert_eq!(v["subresources"]["status"], json!({}));
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Phase", "Plan", "Ready", "Cert-Expiry", "Age"]);
    }

    #[test]
    fn retention_ranges_come_from_the_shared_bounds() {
        let r = &schema()["properties"]["spec"]["properties"]["retention"]["properties"];
        let num = |v: &Value| v.as_f64().unwrap();
        assert_eq!(num(&r["maxAgeHours"]["minimum"]), 1.0);
        assert_eq!(
            num(&r["maxAgeHours"]["maximum"]),
            f64::from(HARD_CAP_MAX_AGE_HOURS)
        );
        assert_eq!(num(&r["maxCount"]["minimum"]), 1.0);
        assert_eq!(num(&r["maxCount"]["maximum"]), f64::from(MAX_MAX_COUNT));
        assert_eq!(r["maxAgeHours"]["default"], json!(DEFAULT_MAX_AGE_HOURS));
    }

    #[test]
    fn plan_is_a_closed_enum() {
        let plan = &schema()["properties"]["spec"]["properties"]["plan"];
        assert_eq!(plan["enum"], json!(["free", "standard", "enterprise"]));
        for p in Plan::ALL {
            assert!(
                plan["enum"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(p.as_str()))
            );
        }
    }

    /// Every property in the schema has a description, so `kubectl explain` is useful.
    #[test]
    fn every_spec_field_is_described() {
        fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
            if let Some(props) = node.get("properties").and_then(Value::as_object) {
                for (name, child) in props {
                    let p = format!("{path}.{name}");
                    if child.get("description").is_none() {
                        missing.push(p.clone());
                    }
                    walk(&p, child, missing);
                }
            }
            if let Some(items) = node.get("items") {
                walk(path, items, missing);
            }
        }
        let mut missing = vec![];
        let s = schema();
        walk("spec", &s["properties"]["spec"], &mut missing);
        walk("status", &s["properties"]["status"], &mut missing);
        assert!(
            missing.is_empty(),
            "fields without description: {missing:?}"
        );
    }

    #[test]
    fn immutable_fields_carry_cel_rules() {
        let s = schema();
        let spec = &s["properties"]["spec"]["properties"];
        let rules = |v: &Value| v["x-kubernetes-validations"].to_string();
        assert!(rules(&spec["owner"]).contains("self == oldSelf"));
        assert!(rules(&spec["storage"]["properties"]["size"]).contains("self == oldSelf"));
        assert!(
            rules(&spec["storage"]["properties"]["storageClassName"]).contains("self == oldSelf")
        );
        assert!(rules(&s).contains("self.metadata.name"));
    }

    #[test]
    fn spec_defaults_match_the_shared_defaults() {
        let spec: TenantSpec = serde_json::from_value(json!({"owner": "a@example.com"})).unwrap();
        assert_eq!(spec.plan, Plan::Free);
        assert_eq!(spec.retention.max_age_hours, DEFAULT_MAX_AGE_HOURS);
        assert_eq!(spec.retention.max_count, DEFAULT_MAX_COUNT);
        assert_eq!(spec.storage.size, DEFAULT_STORAGE_SIZE);
        assert!(!spec.suspended);
        let bad: Result<TenantSpec, _> =
            serde_json::from_value(json!({"owner": "a", "plan": "gold"}));
        assert!(bad.is_err());
    }
}
