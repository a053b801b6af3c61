//! Pure builders of every child object of a Tenant. Each takes the tenant (through
//! [`Owner`]) and the operator [`Settings`] and returns the object to server-side-apply;
//! no IO, so each is unit tested on its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    HTTPGetAction, LimitRange, LimitRangeItem, LimitRangeSpec, Namespace, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceQuota, ResourceQuotaSpec, ResourceRequirements, SeccompProfile,
    Secret, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::runtime_config::{
    BackupSchedule, OAuth2Config, RuntimeConfig, TlsFiles, host_entry_problem,
};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::plan::{parse_size, plan_limits};
use tenantry_kube::crd::{BackupSpec, Tenant};
use tenantry_kube::names;
use tenantry_pki::DEFAULT_LEAF_VALIDITY;

/// Non-root user and group of the runtime.
pub const RUNTIME_UID: i64 = 65532;

/// The tenant as the owner of child objects: its name, namespace, owner reference and the
/// labels every child carries.
#[derive(Clone, Debug)]
pub struct Owner<'a> {
    /// The Tenant.
    pub tenant: &'a Tenant,
    /// Its name.
    pub name: String,
    /// Its namespace (`tenant-<name>`).
    pub namespace: String,
    /// Controller owner reference to the Tenant.
    pub owner_ref: OwnerReference,
}

impl<'a> Owner<'a> {
    /// Reads name and uid of `tenant`; fails only on objects the API server did not make.
    pub fn of(tenant: &'a Tenant) -> Result<Owner<'a>> {
        let name = tenant
            .meta()
            .name
            .clone()
            .ok_or(Error::MissingField("metadata.name"))?;
        let owner_ref = tenant
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        Ok(Owner {
            tenant,
            namespace: names::tenant_namespace(&name),
            name,
            owner_ref,
        })
    }

    /// Labels on every child object.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (names::LABEL_TENANT.to_owned(), self.name.clone()),
            (
                names::LABEL_MANAGED_BY.to_owned(),
                names::MANAGED_BY.to_owned(),
            ),
        ])
    }

    /// Labels (and selector) of the runtime pods.
    pub fn runtime_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (names::LABEL_TENANT.to_owned(), self.name.clone()),
            (names::LABEL_NAME.to_owned(), names::RUNTIME_APP.to_owned()),
        ])
    }

    /// Metadata of a child `name` in the tenant namespace.
    pub fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner_ref.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// What [`check_spec`] derives from a valid spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedSpec {
    /// Lifetime of each certificate.
    pub cert_validity: Duration,
    /// How long before expiry to renew, if set.
    pub renew_before: Option<Duration>,
}

/// A Go duration from `spec.tls.<field>`, positive.
fn tls_duration(field: &str, value: Option<&str>) -> std::result::Result<Option<Duration>, String> {
    let Some(text) = value else { return Ok(None) };
    let d: kube::core::Duration = text
        .parse()
        .map_err(|e| format!("spec.tls.{field} {text:?} is not a duration: {e}"))?;
    if d.is_negative() {
        return Err(format!("spec.tls.{field} must be positive"));
    }
    Ok(Some(d.into()))
}

/// A DNS name of lowercase labels, the first of which may be `*`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-'))
        })
}

/// Checks what the CRD schema cannot (or what an old schema let through). The message
/// names the field and goes into the `Ready` condition.
pub fn check_spec(owner: &Owner<'_>) -> std::result::Result<CheckedSpec, String> {
    let spec = &owner.tenant.spec;
    let name = &owner.name;
    let label_ok = !name.is_empty()
        && name.len() <= names::MAX_TENANT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label_ok {
        return Err(format!(
            "metadata.name {name:?} must be a DNS label of at most {} characters",
            names::MAX_TENANT_NAME_LEN
        ));
    }
    let size = parse_size(&spec.storage.size).ok_or_else(|| {
        format!(
            "spec.storage.size {:?} must be a whole number of Mi, Gi or Ti",
            spec.storage.size
        )
    })?;
    let limits = plan_limits(spec.plan);
    if size > limits.quota_storage_bytes {
        return Err(format!(
            "spec.storage.size {} exceeds the {} plan's storage quota of {}",
            spec.storage.size,
            spec.plan.as_str(),
            limits.quota_storage
        ));
    }
    if let Some(backup) = &spec.backup {
        let backup_size = parse_size(&backup.size).ok_or_else(|| {
            format!(
                "spec.backup.size {:?} must be a whole number of Mi, Gi or Ti",
                backup.size
            )
        })?;
        if size.saturating_add(backup_size) > limits.quota_storage_bytes {
            return Err(format!(
                "spec.storage.size {} and spec.backup.size {} together exceed the {} plan's storage quota of {}",
                spec.storage.size,
                backup.size,
                spec.plan.as_str(),
                limits.quota_storage
            ));
        }
        match tenantry_proto::runtime_config::parse_interval(&backup.interval) {
            Some(i) if i >= Duration::from_secs(60) => {}
            _ => {
                return Err(format!(
                    "spec.backup.interval {:?} must be like 6h, 1d or 90m (s, m, h, d units), from 1m to 366d",
                    backup.interval
                ));
            }
        }
    }
    let policy = RetentionPolicy {
        max_age_hours: spec.retention.max_age_hours,
        max_count: spec.retention.max_count,
    };
    policy
        .validate(tenantry_proto::retention::HARD_CAP_MAX_AGE_HOURS)
        .map_err(|e| format!("spec.retention: {e}"))?;
    let cert_validity =
        tls_duration("duration", spec.tls.duration.as_deref())?.unwrap_or(DEFAULT_LEAF_VALIDITY);
    if cert_validity < Duration::from_secs(3600) || cert_validity > Duration::from_secs(8760 * 3600)
    {
        return Err("spec.tls.duration must be between 1h and 8760h".into());
    }
    let renew_before = tls_duration("renewBefore", spec.tls.renew_before.as_deref())?;
    if renew_before.is_some_and(|r| r >= cert_validity) {
        return Err("spec.tls.renewBefore must be shorter than spec.tls.duration".into());
    }
    if let Some(dns) = spec.tls.dns_names.iter().find(|d| !is_dns_name(d)) {
        return Err(format!("spec.tls.dnsNames entry {dns:?} is not a DNS name"));
    }
    for host in &spec.oauth2.allowed_hosts {
        if let Some(problem) = host_entry_problem(host) {
            return Err(format!(
                "spec.oauth2.allowedHosts entry {host:?}: {problem}"
            ));
        }
    }
    Ok(CheckedSpec {
        cert_validity,
        renew_before,
    })
}

/// The tenant namespace: Pod Security `restricted` enforced, tenant labels.
pub fn desired_namespace(owner: &Owner<'_>) -> Namespace {
    let mut labels = owner.labels();
    labels.insert(names::LABEL_TENANT_NAMESPACE.to_owned(), "true".to_owned());
    labels.insert(
        names::LABEL_PLAN.to_owned(),
        owner.tenant.spec.plan.as_str().to_owned(),
    );
    for key in [
        names::LABEL_PSA_ENFORCE,
        names::LABEL_PSA_WARN,
        names::LABEL_PSA_AUDIT,
    ] {
        labels.insert(key.to_owned(), "restricted".to_owned());
    }
    labels.insert(
        names::LABEL_PSA_ENFORCE_VERSION.to_owned(),
        "latest".to_owned(),
    );
    Namespace {
        metadata: ObjectMeta {
            name: Some(owner.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner.owner_ref.clone()]),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn namespace_peer(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                names::LABEL_NAMESPACE_NAME.to_owned(),
                namespace.to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn port(protocol: &str, port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.to_owned()),
        port: Some(IntOrString::Int(port)),
        ..NetworkPolicyPort::default()
    }
}

/// Denies every ingress and egress in the tenant namespace; the allow policies add back
/// exactly what the runtime needs.
pub fn default_deny_policy(owner: &Owner<'_>) -> NetworkPolicy {
    NetworkPolicy {
        metadata: owner.meta(names::POLICY_DEFAULT_DENY),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// Allows ingress to the runtime port only, from the ingress controller namespace, the
/// control plane namespace and the tenant's extra sources.
pub fn ingress_policy(owner: &Owner<'_>, settings: &Settings) -> NetworkPolicy {
    let network = &owner.tenant.spec.network;
    let mut from = vec![
        namespace_peer(&settings.ingress_namespace),
        namespace_peer(&settings.control_plane_namespace),
    ];
    from.extend(
        network
            .allowed_ingress_namespaces
            .iter()
            // The schema refuses tenant namespaces; this keeps an old object from opening one.
            .filter(|ns| !ns.starts_with(names::NAMESPACE_PREFIX))
            .map(|ns| namespace_peer(ns)),
    );
    from.extend(
        network
            .allowed_ingress_cidrs
            .iter()
            .map(|cidr| NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.clone(),
                    except: None,
                }),
                ..NetworkPolicyPeer::default()
            }),
    );
    NetworkPolicy {
        metadata: owner.meta(names::POLICY_ALLOW_INGRESS),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(owner.runtime_labels()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![port("TCP", i32::from(names::RUNTIME_PORT))]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// Allows egress to the cluster DNS and to the internet except the blocked ranges (private
/// networks, which hold every other tenant, and the cloud metadata address).
pub fn egress_policy(owner: &Owner<'_>, settings: &Settings) -> NetworkPolicy {
    let (v6, v4): (Vec<String>, Vec<String>) = settings
        .blocked_egress_cidrs
        .iter()
        .cloned()
        .partition(|c| c.contains(':'));
    let block = |cidr: &str, except: Vec<String>| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_owned(),
            except: (!except.is_empty()).then_some(except),
        }),
        ..NetworkPolicyPeer::default()
    };
    let (dns_key, dns_value) = &settings.dns_pod_label;
    let dns_peer = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(dns_key.clone(), dns_value.clone())])),
            ..LabelSelector::default()
        }),
        ..namespace_peer(&settings.dns_namespace)
    };
    NetworkPolicy {
        metadata: owner.meta(names::POLICY_ALLOW_EGRESS),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Egress".to_owned()]),
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![dns_peer]),
                    ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
                },
                NetworkPolicyEgressRule {
                    to: Some(vec![block("0.0.0.0/0", v4), block("::/0", v6)]),
                    ports: None,
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

/// The namespace's quota, from the plan.
pub fn resource_quota(owner: &Owner<'_>) -> ResourceQuota {
    let l = plan_limits(owner.tenant.spec.plan);
    ResourceQuota {
        metadata: owner.meta(names::QUOTA),
        spec: Some(ResourceQuotaSpec {
            hard: Some(quantities(&[
                ("requests.cpu", l.quota_requests_cpu),
                ("limits.cpu", l.quota_limits_cpu),
                ("requests.memory", l.quota_requests_memory),
                ("limits.memory", l.quota_limits_memory),
                ("requests.storage", l.quota_storage),
                ("persistentvolumeclaims", l.quota_pvcs),
                ("pods", l.quota_pods),
            ])),
            ..ResourceQuotaSpec::default()
        }),
        ..ResourceQuota::default()
    }
}

/// Container defaults and maximums, from the plan.
pub fn limit_range(owner: &Owner<'_>) -> LimitRange {
    let l = plan_limits(owner.tenant.spec.plan);
    LimitRange {
        metadata: owner.meta(names::LIMIT_RANGE),
        spec: Some(LimitRangeSpec {
            limits: vec![LimitRangeItem {
                type_: "Container".to_owned(),
                default: Some(quantities(&[
                    ("cpu", l.default_cpu),
                    ("memory", l.default_memory),
                ])),
                default_request: Some(quantities(&[
                    ("cpu", l.default_request_cpu),
                    ("memory", l.default_request_memory),
                ])),
                max: Some(quantities(&[("cpu", l.max_cpu), ("memory", l.max_memory)])),
                ..LimitRangeItem::default()
            }],
        }),
    }
}

/// The runtime's ServiceAccount; no API token is mounted.
pub fn service_account(owner: &Owner<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(names::SERVICE_ACCOUNT),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// The Secret holding the tenant's 32-byte key-encryption key (`data.key`) and, during a
/// rotation, the one before it (`data.key.previous`, which the runtime only unwraps with).
/// Mutable, so the kubelet refreshes the mounted files and the runtime re-wraps live;
/// `handled` is the rotation annotation value this content answers (recorded on it).
pub fn data_key_secret(
    owner: &Owner<'_>,
    key: &[u8; 32],
    previous: Option<&[u8]>,
    handled: Option<&str>,
) -> Secret {
    let mut metadata = owner.meta(names::DATA_KEY_SECRET);
    if let Some(value) = handled {
        metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                names::DATA_KEY_ROTATION_HANDLED_ANNOTATION.to_owned(),
                value.to_owned(),
            );
    }
    let mut data = BTreeMap::from([(names::DATA_KEY_KEY.to_owned(), ByteString(key.to_vec()))]);
    if let Some(previous) = previous {
        data.insert(
            names::DATA_KEY_PREVIOUS_KEY.to_owned(),
            ByteString(previous.to_vec()),
        );
    }
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The value of the Tenant's rotation annotation when it asks for a rotation not handled
/// yet (the data-key Secret records the last value handled); `None` otherwise.
pub fn rotation_requested<'a>(tenant: &'a Tenant, secret: &Secret) -> Option<&'a str> {
    let wanted = tenant
        .metadata
        .annotations
        .as_ref()?
        .get(names::ROTATE_DATA_KEY_ANNOTATION)?
        .as_str();
    let handled = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::DATA_KEY_ROTATION_HANDLED_ANNOTATION))
        .map(String::as_str);
    (!wanted.is_empty() && handled != Some(wanted)).then_some(wanted)
}

/// The `kubernetes.io/tls` Secret served by the runtime.
pub fn tls_secret(
    owner: &Owner<'_>,
    cert_pem: &str,
    key_pem: &SecretString,
    ca_pem: &str,
) -> Secret {
    Secret {
        metadata: owner.meta(names::TLS_SECRET),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(cert_pem.as_bytes().to_vec()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(key_pem.expose_secret().as_bytes().to_vec()),
            ),
            ("ca.crt".to_owned(), ByteString(ca_pem.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

/// The tenant's copy of the API's token public key.
pub fn token_key_secret(owner: &Owner<'_>, public_key_pem: &str) -> Secret {
    Secret {
        metadata: owner.meta(names::TOKEN_KEY_SECRET),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            names::TOKEN_KEY_KEY.to_owned(),
            ByteString(public_key_pem.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The Tenant's backup spec when its backups are on: it asks for them and the operator has
/// recipients to encrypt them to.
pub fn backups_on<'a>(owner: &Owner<'a>, settings: &Settings) -> Option<&'a BackupSpec> {
    owner
        .tenant
        .spec
        .backup
        .as_ref()
        .filter(|_| settings.backup_recipients.is_some())
}

/// The runtime config of `owner`.
pub fn runtime_config(owner: &Owner<'_>, settings: &Settings) -> RuntimeConfig {
    let r = &owner.tenant.spec.retention;
    let tenant_id = owner
        .tenant
        .labels()
        .get(names::LABEL_TENANT_ID)
        .filter(|id| !id.is_empty())
        .unwrap_or(&owner.name)
        .clone();
    RuntimeConfig {
        tenant_id,
        listen: SocketAddr::from(([0, 0, 0, 0], names::RUNTIME_PORT)),
        tls: TlsFiles {
            cert_file: Path::new(names::TLS_DIR).join("tls.crt"),
            key_file: Path::new(names::TLS_DIR).join("tls.key"),
        },
        data_dir: names::DATA_DIR.into(),
        data_key_file: Path::new(names::DATA_KEY_DIR).join(names::DATA_KEY_KEY),
        // Present only during a rotation; the runtime ignores it while absent.
        previous_data_key_file: Some(
            Path::new(names::DATA_KEY_DIR).join(names::DATA_KEY_PREVIOUS_KEY),
        ),
        data_key_period: None,
        token_public_key_file: Path::new(names::TOKEN_KEY_DIR).join(names::TOKEN_KEY_KEY),
        retention: RetentionPolicy {
            max_age_hours: r.max_age_hours,
            max_count: r.max_count,
        },
        backup: backups_on(owner, settings).map(|b| BackupSchedule {
            directory: names::BACKUP_DIR.into(),
            interval: b.interval.clone(),
            keep: b.keep,
            recipient_file: Path::new(names::BACKUP_RECIPIENTS_DIR)
                .join(names::BACKUP_RECIPIENTS_KEY),
        }),
        oauth2: OAuth2Config {
            allowed_hosts: owner.tenant.spec.oauth2.allowed_hosts.clone(),
            ca_file: None,
        },
    }
}

/// The ConfigMap holding `config.yaml`, and the SHA-256 of that file.
pub fn config_map(owner: &Owner<'_>, settings: &Settings) -> Result<(ConfigMap, String)> {
    let to_yaml = |config: &RuntimeConfig| {
        serde_yaml::to_string(config).map_err(|source| Error::Yaml {
            what: "the runtime config",
            source,
        })
    };
    let config = runtime_config(owner, settings);
    let yaml = to_yaml(&config)?;
    // The runtime reloads retention live (the kubelet refreshes the mounted file within
    // its sync period), so only the rest of the config rolls the pods: a retention change
    // must not cost the tenant a restart.
    let hash = hex::encode(Sha256::digest(
        to_yaml(&config.restart_relevant())?.as_bytes(),
    ));
    Ok((
        ConfigMap {
            metadata: owner.meta(names::CONFIG_MAP),
            data: Some(BTreeMap::from([(names::CONFIG_KEY.to_owned(), yaml)])),
            ..ConfigMap::default()
        },
        hash,
    ))
}

/// `size` in the form the API server stores it: the largest binary unit that divides it
/// exactly (`1024Mi` is stored as `1Gi`). Sizes that do not parse are returned unchanged.
pub fn canonical_size(size: &str) -> String {
    let Some(mut bytes) = parse_size(size) else {
        return size.to_owned();
    };
    bytes >>= 20;
    let mut unit = 0;
    while bytes % 1024 == 0 && unit < 4 {
        bytes /= 1024;
        unit += 1;
    }
    format!("{bytes}{}", ["Mi", "Gi", "Ti", "Pi", "Ei"][unit])
}

/// The data volume on `storage_class` (already checked to be encrypted).
pub fn data_pvc(owner: &Owner<'_>, storage_class: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: owner.meta(names::DATA_PVC),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: Some(storage_class.to_owned()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(quantities(&[(
                    "storage",
                    &canonical_size(&owner.tenant.spec.storage.size),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(names::RUNTIME_PORT_NAME.to_owned()),
            scheme: Some("HTTPS".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

fn secret_volume(name: &str, secret: &str, mode: i32) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            default_mode: Some(mode),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        // `false` is the default, and the API server drops it (`omitempty`): setting it
        // would make the stored object differ from the applied one on every comparison.
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The backup volume on `storage_class` (the data volume's, already checked to be
/// encrypted); `None` when backups are off.
pub fn backup_pvc(
    owner: &Owner<'_>,
    settings: &Settings,
    storage_class: &str,
) -> Option<PersistentVolumeClaim> {
    let backup = backups_on(owner, settings)?;
    Some(PersistentVolumeClaim {
        metadata: owner.meta(names::BACKUP_PVC),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: Some(storage_class.to_owned()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(quantities(&[("storage", &canonical_size(&backup.size))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    })
}

/// The ConfigMap with the recipients backups are encrypted to (public keys); `None` when
/// backups are off.
pub fn backup_recipients_config_map(owner: &Owner<'_>, settings: &Settings) -> Option<ConfigMap> {
    backups_on(owner, settings)?;
    let recipients = settings.backup_recipients.clone()?;
    Some(ConfigMap {
        metadata: owner.meta(names::BACKUP_RECIPIENTS_CONFIG_MAP),
        data: Some(BTreeMap::from([(
            names::BACKUP_RECIPIENTS_KEY.to_owned(),
            recipients,
        )])),
        ..ConfigMap::default()
    })
}

/// The runtime container: the config path in its args and env, HTTPS probes, the plan's
/// resources, no privileges, every mount read-only but the data volume.
fn runtime_container(owner: &Owner<'_>, settings: &Settings) -> Container {
    let l = plan_limits(owner.tenant.spec.plan);
    let config_path = format!("{}/{}", names::CONFIG_DIR, names::CONFIG_KEY);
    Container {
        name: names::CONTAINER.to_owned(),
        image: Some(settings.runtime_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec!["--config".to_owned(), config_path.clone()]),
        env: Some(vec![EnvVar {
            name: names::RUNTIME_CONFIG_ENV.to_owned(),
            value: Some(config_path),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some(names::RUNTIME_PORT_NAME.to_owned()),
            container_port: i32::from(names::RUNTIME_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[
                ("cpu", l.runtime_request_cpu),
                ("memory", l.runtime_request_memory),
            ])),
            limits: Some(quantities(&[
                ("cpu", l.runtime_limit_cpu),
                ("memory", l.runtime_limit_memory),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUNTIME_UID),
            run_as_group: Some(RUNTIME_UID),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some({
            let mut mounts = vec![
                mount("config", names::CONFIG_DIR, true),
                mount("tls", names::TLS_DIR, true),
                mount("data-key", names::DATA_KEY_DIR, true),
                mount("token-key", names::TOKEN_KEY_DIR, true),
                mount("data", names::DATA_DIR, false),
            ];
            if backups_on(owner, settings).is_some() {
                mounts.push(mount("backups", names::BACKUP_DIR, false));
                mounts.push(mount(
                    "backup-recipients",
                    names::BACKUP_RECIPIENTS_DIR,
                    true,
                ));
            }
            mounts
        }),
        ..Container::default()
    }
}

/// The runtime pod's volumes: config, TLS, data key and token key from the tenant's
/// ConfigMap and Secrets, data from its PVC; with backups, the backup PVC and the
/// recipients ConfigMap.
fn runtime_volumes(backups: bool) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::CONFIG_MAP.to_owned(),
                default_mode: Some(0o444),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("tls", names::TLS_SECRET, 0o440),
        secret_volume("data-key", names::DATA_KEY_SECRET, 0o440),
        secret_volume("token-key", names::TOKEN_KEY_SECRET, 0o444),
        Volume {
            name: "data".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::DATA_PVC.to_owned(),
                read_only: None,
            }),
            ..Volume::default()
        },
    ];
    if backups {
        volumes.push(Volume {
            name: "backups".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::BACKUP_PVC.to_owned(),
                read_only: None,
            }),
            ..Volume::default()
        });
        volumes.push(Volume {
            name: "backup-recipients".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::BACKUP_RECIPIENTS_CONFIG_MAP.to_owned(),
                default_mode: Some(0o444),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    volumes
}

/// The runtime Deployment: non-root, read-only root filesystem, no capabilities, HTTPS
/// probes; scaled to zero when the tenant is suspended. `config_hash` rolls the pods when
/// a part of the config that the runtime reads only at start changes.
pub fn deployment(owner: &Owner<'_>, settings: &Settings, config_hash: &str) -> Deployment {
    let mut pod_labels = owner.runtime_labels();
    pod_labels.insert(
        names::LABEL_MANAGED_BY.to_owned(),
        names::MANAGED_BY.to_owned(),
    );
    Deployment {
        metadata: owner.meta(names::DEPLOYMENT),
        spec: Some(DeploymentSpec {
            replicas: Some(if owner.tenant.spec.suspended { 0 } else { 1 }),
            selector: LabelSelector {
                match_labels: Some(owner.runtime_labels()),
                ..LabelSelector::default()
            },
            // The volume is ReadWriteOnce: the old pod must go before the new one starts.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_owned()),
                ..DeploymentStrategy::default()
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        names::ANNOTATION_CONFIG_HASH.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::SERVICE_ACCOUNT.to_owned()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUNTIME_UID),
                        run_as_group: Some(RUNTIME_UID),
                        fs_group: Some(RUNTIME_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![runtime_container(owner, settings)],
                    volumes: Some(runtime_volumes(backups_on(owner, settings).is_some())),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The ClusterIP Service in front of the runtime.
pub fn service(owner: &Owner<'_>) -> Service {
    Service {
        metadata: owner.meta(names::SERVICE),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(owner.runtime_labels()),
            ports: Some(vec![ServicePort {
                name: Some(names::RUNTIME_PORT_NAME.to_owned()),
                port: i32::from(names::RUNTIME_PORT),
                target_port: Some(IntOrString::String(names::RUNTIME_PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// DNS names of the tenant certificate: the tenant's public names first, then the
/// Service's in-cluster names. No duplicates.
pub fn certificate_dns_names(owner: &Owner<'_>, settings: &Settings) -> Vec<String> {
    let svc = names::SERVICE;
    let ns = &owner.namespace;
    let mut out: Vec<String> = vec![];
    let in_cluster = [
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.{}", settings.cluster_domain),
        format!("{svc}.{ns}"),
        svc.to_owned(),
    ];
    for name in owner
        .tenant
        .spec
        .tls
        .dns_names
        .iter()
        .cloned()
        .chain(in_cluster)
    {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// URL of the instance: its first public DNS name, else its in-cluster Service.
pub fn endpoint(owner: &Owner<'_>) -> String {
    match owner.tenant.spec.tls.dns_names.first() {
        Some(dns) => format!("https://{dns}"),
        None => format!(
            "https://{}.{}.svc:{}",
            names::SERVICE,
            owner.namespace,
            names::RUNTIME_PORT
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sizes_are_written_as_the_api_server_stores_them() {
        assert_eq!(canonical_size("1024Mi"), "1Gi");
        assert_eq!(canonical_size("1536Mi"), "1536Mi");
        assert_eq!(canonical_size("2048Gi"), "2Ti");
        assert_eq!(canonical_size("10Gi"), "10Gi");
        assert_eq!(canonical_size("1048576Mi"), "1Ti");
        assert_eq!(canonical_size("junk"), "junk");
    }
    use serde_json::json;
    use tenantry_kube::crd::TenantSpec;
    use tenantry_proto::retention::Plan;

    /// A Tenant as the API server would return it.
    pub(crate) fn tenant(name: &str, spec: serde_json::Value) -> Tenant {
        let mut t = Tenant::new(name, serde_json::from_value::<TenantSpec>(spec).unwrap());
        t.metadata.uid = Some(format!("uid-{name}"));
        t.metadata.generation = Some(1);
        t.metadata.resource_version = Some("1".into());
        t
    }

    fn acme() -> Tenant {
        tenant(
            "acme",
            json!({"owner": "ops@acme.test", "plan": "standard",
                   "tls": {"dnsNames": ["acme.example.com"]},
                   "network": {"allowedIngressCidrs": ["203.0.113.0/24"],
                               "allowedIngressNamespaces": ["monitoring"]}}),
        )
    }

    #[test]
    fn owner_requires_name_and_uid() {
        let mut t = acme();
        t.metadata.uid = None;
        assert!(matches!(
            Owner::of(&t),
            Err(Error::MissingField("metadata.uid"))
        ));
        let t = acme();
        let o = Owner::of(&t).unwrap();
        assert_eq!(o.namespace, "tenant-acme");
        assert_eq!(o.owner_ref.controller, Some(true));
        assert_eq!(o.owner_ref.kind, "Tenant");
        assert_eq!(o.owner_ref.api_version, "tenantry.dev/v1alpha1");
    }

    #[test]
    fn namespace_enforces_restricted_pod_security_and_carries_tenant_labels() {
        let t = acme();
        let ns = desired_namespace(&Owner::of(&t).unwrap());
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(ns.metadata.name.as_deref(), Some("tenant-acme"));
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
        assert_eq!(labels["tenantry.dev/tenant"], "acme");
        assert_eq!(labels["tenantry.dev/tenant-namespace"], "true");
        assert_eq!(labels["tenantry.dev/plan"], "standard");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "tenantry-operator");
        assert_eq!(ns.metadata.owner_references.unwrap().len(), 1);
    }

    #[test]
    fn default_deny_covers_both_directions_for_every_pod() {
        let t = acme();
        let p = default_deny_policy(&Owner::of(&t).unwrap()).spec.unwrap();
        assert_eq!(p.pod_selector, Some(LabelSelector::default()));
        assert_eq!(p.policy_types.unwrap(), ["Ingress", "Egress"]);
        assert!(p.ingress.is_none() && p.egress.is_none());
    }

    #[test]
    fn ingress_reaches_only_the_runtime_port_from_allowed_sources() {
        let t = acme();
        let settings = Settings::default();
        let p = serde_json::to_value(ingress_policy(&Owner::of(&t).unwrap(), &settings)).unwrap();
        let rule = &p["spec"]["ingress"][0];
        assert_eq!(rule["ports"], json!([{"protocol": "TCP", "port": 8443}]));
        let from = rule["from"].as_array().unwrap();
        let ns = |n: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": n}}});
        assert_eq!(from[0], ns("ingress-nginx"));
        assert_eq!(from[1], ns("tenantry-system"));
        assert_eq!(from[2], ns("monitoring"));
        assert_eq!(from[3], json!({"ipBlock": {"cidr": "203.0.113.0/24"}}));
        assert_eq!(from.len(), 4);
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"],
            json!({"app.kubernetes.io/name": "tenant-runtime", "tenantry.dev/tenant": "acme"})
        );
    }

    #[test]
    fn ingress_never_admits_another_tenant_namespace() {
        let t = tenant(
            "a",
            json!({"owner": "x", "network": {"allowedIngressNamespaces": ["tenant-b"]}}),
        );
        let p = serde_json::to_value(ingress_policy(
            &Owner::of(&t).unwrap(),
            &Settings::default(),
        ))
        .unwrap();
        assert!(!p.to_string().contains("tenant-b"));
    }

    #[test]
    fn egress_allows_dns_and_internet_but_not_private_ranges_or_metadata() {
        let t = acme();
        let p = serde_json::to_value(egress_policy(&Owner::of(&t).unwrap(), &Settings::default()))
            .unwrap();
        let rules = p["spec"]["egress"].as_array().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0]["to"][0],
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}})
        );
        assert_eq!(
            rules[0]["ports"],
            json!([{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}])
        );
        let v4 = &rules[1]["to"][0]["ipBlock"];
        assert_eq!(v4["cidr"], "0.0.0.0/0");
        for blocked in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "169.254.0.0/16",
        ] {
            assert!(
                v4["except"].as_array().unwrap().contains(&json!(blocked)),
                "{blocked}"
            );
        }
        let v6 = &rules[1]["to"][1]["ipBlock"];
        assert_eq!(v6["cidr"], "::/0");
        assert!(
            v6["except"]
                .as_array()
                .unwrap()
                .contains(&json!("fc00::/7"))
        );
        assert!(rules[1].get("ports").is_none());
        assert_eq!(p["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn quota_and_limits_follow_the_plan() {
        for (plan, cpu, storage) in [
            ("free", "2", "5Gi"),
            ("standard", "8", "50Gi"),
            ("enterprise", "32", "500Gi"),
        ] {
            let t = tenant("a", json!({"owner": "x", "plan": plan}));
            let o = Owner::of(&t).unwrap();
            let hard = resource_quota(&o).spec.unwrap().hard.unwrap();
            assert_eq!(hard["limits.cpu"].0, cpu);
            assert_eq!(hard["requests.storage"].0, storage);
            for key in ["requests.cpu", "requests.memory", "limits.memory", "pods"] {
                assert!(hard.contains_key(key), "{key}");
            }
            let lr = limit_range(&o).spec.unwrap().limits.remove(0);
            let l = plan_limits(Plan::parse(plan).unwrap());
            assert_eq!(lr.type_, "Container");
            assert_eq!(lr.default.unwrap()["cpu"].0, l.default_cpu);
            assert_eq!(
                lr.default_request.unwrap()["memory"].0,
                l.default_request_memory
            );
            assert_eq!(lr.max.unwrap()["memory"].0, l.max_memory);
        }
    }

    #[test]
    fn service_account_does_not_mount_a_token() {
        let t = acme();
        assert_eq!(
            service_account(&Owner::of(&t).unwrap()).automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn deployment_runs_locked_down_and_scales_to_zero_when_suspended() {
        let t = acme();
        let d = deployment(&Owner::of(&t).unwrap(), &Settings::default(), "abc");
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        let probe = c.readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(probe.scheme.as_deref(), Some("HTTPS"));
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        let live = c.liveness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        // Only the data volume is writable.
        let writable: Vec<_> = c
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .filter(|m| m.read_only != Some(true))
            .map(|m| m.mount_path)
            .collect();
        assert_eq!(writable, [names::DATA_DIR]);
        assert_eq!(
            spec.template.metadata.unwrap().annotations.unwrap()[names::ANNOTATION_CONFIG_HASH],
            "abc"
        );

        let mut suspended = acme();
        suspended.spec.suspended = true;
        let d = deployment(&Owner::of(&suspended).unwrap(), &Settings::default(), "abc");
        assert_eq!(d.spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn runtime_config_uses_the_contract_keys_and_mounted_paths() {
        let t = tenant(
            "acme",
            json!({"owner": "x", "retention": {"maxAgeHours": 48, "maxCount": 500}}),
        );
        let (cm, hash) = config_map(&Owner::of(&t).unwrap(), &Settings::default()).unwrap();
        let yaml = &cm.data.unwrap()[names::CONFIG_KEY];
        // The runtime's own type reads it (unknown keys would be refused).
        let read: RuntimeConfig = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(
            read,
            RuntimeConfig {
                tenant_id: "acme".into(),
                listen: "0.0.0.0:8443".parse().unwrap(),
                tls: TlsFiles {
                    cert_file: "/etc/tenantry/tls/tls.crt".into(),
                    key_file: "/etc/tenantry/tls/tls.key".into(),
                },
                data_dir: "/var/lib/tenantry".into(),
                data_key_file: "/etc/tenantry/data-key/data.key".into(),
                previous_data_key_file: Some("/etc/tenantry/data-key/data.key.previous".into()),
                data_key_period: None,
                token_public_key_file: "/etc/tenantry/token/public.pem".into(),
                retention: RetentionPolicy {
                    max_age_hours: 48,
                    max_count: 500
                },
                oauth2: OAuth2Config::default(),
                backup: None,
            }
        );
        assert_eq!(read.validate(), Ok(()));
        assert_eq!(hash.len(), 64);
        // The Tenant's OAuth 2 provider hosts become the runtime's allow-list, and a change
        // restarts the pods (the runtime reads the list at start).
        let with_oauth2 = tenant(
            "acme",
            json!({"owner": "x", "retention": {"maxAgeHours": 48, "maxCount": 500},
                   "oauth2": {"allowedHosts": ["accounts.example.com", "*.example.org"]}}),
        );
        let (oauth2_cm, oauth2_hash) =
            config_map(&Owner::of(&with_oauth2).unwrap(), &Settings::default()).unwrap();
        let read: RuntimeConfig =
            serde_yaml::from_str(&oauth2_cm.data.unwrap()[names::CONFIG_KEY]).unwrap();
        assert_eq!(
            read.oauth2.allowed_hosts,
            ["accounts.example.com", "*.example.org"]
        );
        assert_eq!(read.validate(), Ok(()));
        assert_ne!(oauth2_hash, hash);
        // Retention is reloaded live: a change rewrites the ConfigMap but keeps the pods.
        let other = tenant("acme", json!({"owner": "x"}));
        let (other_cm, other_hash) =
            config_map(&Owner::of(&other).unwrap(), &Settings::default()).unwrap();
        assert_ne!(
            other_cm.data,
            config_map(&Owner::of(&t).unwrap(), &Settings::default())
                .unwrap()
                .0
                .data
        );
        assert_eq!(other_hash, hash);
        // What the runtime reads only at start does roll them.
        let mut bound = t.clone();
        bound.metadata.labels = Some(BTreeMap::from([(
            names::LABEL_TENANT_ID.to_owned(),
            "0b0c6f3e-1111-4222-8333-444455556666".to_owned(),
        )]));
        assert_ne!(
            config_map(&Owner::of(&bound).unwrap(), &Settings::default())
                .unwrap()
                .1,
            hash
        );
    }

    #[test]
    fn runtimes_of_api_tenants_accept_tokens_bound_to_the_api_tenant_id() {
        // The control API binds instance tokens to its tenant id, not to the name.
        let mut t = tenant("acme", json!({"owner": "x"}));
        t.metadata.labels = Some(BTreeMap::from([(
            names::LABEL_TENANT_ID.to_owned(),
            "0b0c6f3e-1111-4222-8333-444455556666".to_owned(),
        )]));
        let config = runtime_config(&Owner::of(&t).unwrap(), &Settings::default());
        assert_eq!(config.tenant_id, "0b0c6f3e-1111-4222-8333-444455556666");
    }

    #[test]
    fn certificate_names_cover_public_and_in_cluster_names() {
        let t = acme();
        let names = certificate_dns_names(&Owner::of(&t).unwrap(), &Settings::default());
        assert_eq!(
            names,
            [
                "acme.example.com",
                "tenant-runtime.tenant-acme.svc",
                "tenant-runtime.tenant-acme.svc.cluster.local",
                "tenant-runtime.tenant-acme",
                "tenant-runtime",
            ]
        );
        assert_eq!(
            endpoint(&Owner::of(&t).unwrap()),
            "https://acme.example.com"
        );
    }

    #[test]
    fn a_rotation_is_requested_once_per_new_annotation_value() {
        let mut t = acme();
        let o = Owner::of(&t).unwrap();
        let fresh = data_key_secret(&o, &[1u8; 32], None, None);
        assert_eq!(rotation_requested(&t, &fresh), None);
        t.metadata.annotations = Some(BTreeMap::from([(
            names::ROTATE_DATA_KEY_ANNOTATION.to_owned(),
            "2026-11-30".to_owned(),
        )]));
        assert_eq!(rotation_requested(&t, &fresh), Some("2026-11-30"));
        let o = Owner::of(&t).unwrap();
        let rotated = data_key_secret(&o, &[2u8; 32], Some(&[1u8; 32]), Some("2026-11-30"));
        assert_eq!(rotation_requested(&t, &rotated), None);
        let data = rotated.data.unwrap();
        assert_eq!(data[names::DATA_KEY_KEY].0, vec![2u8; 32]);
        assert_eq!(data[names::DATA_KEY_PREVIOUS_KEY].0, vec![1u8; 32]);
        // The previous key dropped, the handled value kept: no second rotation.
        let done = data_key_secret(&o, &[2u8; 32], None, Some("2026-11-30"));
        assert_eq!(rotation_requested(&t, &done), None);
        assert!(
            !done
                .data
                .as_ref()
                .unwrap()
                .contains_key(names::DATA_KEY_PREVIOUS_KEY)
        );
        t.metadata.annotations = Some(BTreeMap::from([(
            names::ROTATE_DATA_KEY_ANNOTATION.to_owned(),
            "again".to_owned(),
        )]));
        assert_eq!(rotation_requested(&t, &done), Some("again"));
    }

    #[test]
    fn pvc_and_secrets_have_the_expected_shape() {
        let t = acme();
        let o = Owner::of(&t).unwrap();
        let pvc = data_pvc(&o, "enc").spec.unwrap();
        assert_eq!(pvc.storage_class_name.as_deref(), Some("enc"));
        assert_eq!(pvc.resources.unwrap().requests.unwrap()["storage"].0, "1Gi");
        let key = data_key_secret(&o, &[7u8; 32], None, None);
        assert_eq!(key.immutable, None, "mutable: rotations rewrite it");
        assert_eq!(key.data.unwrap()[names::DATA_KEY_KEY].0.len(), 32);
        let tls = tls_secret(&o, "CERT", &SecretString::from("KEY"), "CA");
        assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = tls.data.unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
    }

    #[test]
    fn check_spec_turns_bad_values_into_messages() {
        let ok = acme();
        assert_eq!(
            check_spec(&Owner::of(&ok).unwrap()).unwrap(),
            CheckedSpec {
                cert_validity: DEFAULT_LEAF_VALIDITY,
                renew_before: None
            }
        );
        let cases = [
            (
                json!({"owner": "x", "storage": {"size": "10Gi"}}),
                "storage quota",
            ),
            (
                json!({"owner": "x", "storage": {"size": "1.5Gi"}}),
                "whole number",
            ),
            (
                json!({"owner": "x", "tls": {"duration": "soon"}}),
                "not a duration",
            ),
            (
                json!({"owner": "x", "tls": {"duration": "10m"}}),
                "between 1h",
            ),
            (
                json!({"owner": "x", "tls": {"duration": "24h", "renewBefore": "48h"}}),
                "shorter",
            ),
            (
                json!({"owner": "x", "tls": {"dnsNames": ["Bad_Name"]}}),
                "not a DNS name",
            ),
            (
                json!({"owner": "x", "retention": {"maxAgeHours": 9999}}),
                "retention",
            ),
            (
                json!({"owner": "x", "storage": {"size": "4Gi"}, "backup": {"size": "2Gi"}}),
                "together exceed",
            ),
            (
                json!({"owner": "x", "backup": {"interval": "30s"}}),
                "spec.backup.interval",
            ),
            (
                json!({"owner": "x", "backup": {"interval": "1w"}}),
                "spec.backup.interval",
            ),
            (
                json!({"owner": "x", "oauth2": {"allowedHosts": ["accounts.example.com:0"]}}),
                "spec.oauth2.allowedHosts entry \"accounts.example.com:0\"",
            ),
        ];
        for (spec, needle) in cases {
            let t = tenant("a", spec.clone());
            let err = check_spec(&Owner::of(&t).unwrap()).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        let long = tenant(&"a".repeat(60), json!({"owner": "x"}));
        assert!(check_spec(&Owner::of(&long).unwrap()).is_err());
        let t = tenant(
            "a",
            json!({"owner": "x", "tls": {"duration": "24h", "renewBefore": "1h"}}),
        );
        assert_eq!(
            check_spec(&Owner::of(&t).unwrap()).unwrap().renew_before,
            Some(Duration::from_secs(3600))
        );
    }
}
