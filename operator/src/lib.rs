//! The Tenantry operator: the pure builders of a Tenant's child objects and the controller
//! that applies them. The `Tenant` types and names live in `tenantry-kube`, the CA in
//! `tenantry-pki`.
//!
//! Layout: [`ca`] (the CA and its rotation), [`builders`] and [`plan`] (pure child objects), [`diff`] and [`status`] (pure
//! comparison and status logic), [`object`] (a Tenant as read, readable or not),
//! [`cache`] (watch caches), [`controller`] (the reconciler), [`leader`] (Lease election),
//! [`metrics`] (Prometheus and admin server), [`manifest`] (the CRD as committed YAML),
//! [`run`] (wiring for `tenantry-operator run`).

pub mod backup_status;
pub mod builders;
pub mod ca;
pub mod cache;
pub mod config;
pub mod controller;
pub mod diff;
pub mod error;
#[cfg(any(test, feature = "fake-api"))]
pub mod fake_api;
pub mod leader;
pub mod manifest;
pub mod metrics;
pub mod object;
pub mod plan;
pub mod run;
pub mod status;

pub use error::{Error, Result};
