//! The `Tenant` custom resource and the names around it, shared by the operator (which
//! reconciles Tenants) and the API's `kubernetes` provisioner (which writes them): the
//! types and generated CRD ([`crd`]) and every name Kubernetes users and the other
//! programs see ([`names`]). kube, k8s-openapi, serde and schemars only; no client, no IO.

pub mod crd;
pub mod names;

pub use crd::{Tenant, TenantSpec, TenantStatus};
