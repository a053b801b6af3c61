//! A Tenant as the controller reads it: either a [`Tenant`], or the metadata and status of
//! one this operator cannot deserialize (a newer CRD's plan, a field of the wrong type).
//!
//! The controller watches [`TenantObject`] instead of [`Tenant`] so that one unreadable
//! object becomes a condition and an Event on that object, instead of a watch error that
//! stalls every Tenant (kube's `DeserializeGuard` does the same but keeps only metadata; the
//! status is kept here so that an unchanged status is never written again).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use tenantry_kube::crd::{Tenant, TenantStatus};

/// A Tenant, or what could be read of one that failed to deserialize.
#[derive(Clone, Debug)]
pub struct TenantObject(pub Result<Tenant, InvalidTenant>);

/// A Tenant whose spec this operator cannot read.
#[derive(Clone, Debug)]
pub struct InvalidTenant {
    /// Its metadata (name, uid, generation, finalizers, deletion).
    pub metadata: ObjectMeta,
    /// Its status, when that part still reads.
    pub status: Option<TenantStatus>,
    /// Why it could not be read (serde's message: field and expected values, no data).
    pub error: String,
}

impl TenantObject {
    /// The status as last written, whether or not the spec reads.
    pub fn status(&self) -> Option<&TenantStatus> {
        match &self.0 {
            Ok(t) => t.status.as_ref(),
            Err(i) => i.status.as_ref(),
        }
    }
}

impl From<Tenant> for TenantObject {
    fn from(t: Tenant) -> Self {
        TenantObject(Ok(t))
    }
}

impl<'de> Deserialize<'de> for TenantObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match Tenant::deserialize(&value) {
            Ok(t) => Ok(TenantObject(Ok(t))),
            Err(e) => {
                let metadata =
                    ObjectMeta::deserialize(value.get("metadata").unwrap_or(&Value::Null))
                        .map_err(D::Error::custom)?;
                let status = value
                    .get("status")
                    .and_then(|s| TenantStatus::deserialize(s).ok());
                Ok(TenantObject(Err(InvalidTenant {
                    metadata,
                    status,
                    error: e.to_string(),
                })))
            }
        }
    }
}

impl Resource for TenantObject {
    type DynamicType = ();
    type Scope = <Tenant as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Tenant::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Tenant::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Tenant::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Tenant::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            Ok(t) => t.meta(),
            Err(i) => &i.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(t) => t.meta_mut(),
            Err(i) => &mut i.metadata,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_valid_tenant_reads_as_one() {
        let obj: TenantObject = serde_json::from_value(json!({
            "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "uid": "u1"},
            "spec": {"owner": "o@example.com", "plan": "standard"},
        }))
        .unwrap();
        let t = obj.0.unwrap();
        assert_eq!(t.spec.plan.as_str(), "standard");
    }

    #[test]
    fn an_unreadable_spec_keeps_metadata_status_and_the_reason() {
        let obj: TenantObject = serde_json::from_value(json!({
            "apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "uid": "u1", "generation": 3},
            "spec": {"owner": "o@example.com", "plan": "premium"},
            "status": {"phase": "Ready"},
        }))
        .unwrap();
        assert_eq!(obj.meta().name.as_deref(), Some("acme"));
        assert_eq!(obj.meta().generation, Some(3));
        assert!(obj.status().is_some_and(|s| s.phase.is_some()));
        let invalid = obj.0.unwrap_err();
        assert!(invalid.error.contains("premium"), "{}", invalid.error);
    }

    #[test]
    fn no_metadata_is_still_an_error() {
        assert!(serde_json::from_value::<TenantObject>(json!({"metadata": 5})).is_err());
    }
}
