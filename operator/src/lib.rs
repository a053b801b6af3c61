//! The Tenantry operator: the `Tenant` custom resource, the pure builders of its child
//! objects, the PKI, and the controller that applies them.
//!
//! Layout: [`crd`] (types and generated CRD), [`names`] (every name clients see),
//! [`builders`] and [`plan`] (pure child objects), [`pki`] (CA and leaf certificates),
//! [`diff`] and [`status`] (pure comparison and status logic), [`controller`] (the
//! reconciler), [`leader`] (Lease election), [`metrics`] (Prometheus and admin server),
//! [`run`] (wiring for `tenantry-operator run`).

pub mod builders;
pub mod cache;
pub mod config;
pub mod controller;
pub mod crd;
pub mod diff;
pub mod error;
#[cfg(any(test, feature = "fake-api"))]
pub mod fake_api;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod object;
pub mod pki;
pub mod plan;
pub mod run;
pub mod status;

pub use crd::{Tenant, TenantSpec, TenantStatus};
pub use error::{Error, Result};
