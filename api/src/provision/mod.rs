//! Provisioners turn tenant records into running instances and report what they see back
//! into the store (phase, endpoint, certificate). The API calls [`Provisioner::ensure`]
//! after every change and a reconcile loop calls it for every tenant periodically, so a
//! failed or interrupted step is retried rather than forgotten.

pub mod kubernetes;
pub mod local;
pub mod local_ca;
pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use tenantry_proto::retention::{Plan, RetentionPolicy};

use crate::error::Result;
use crate::store::{Store, TenantRow};
use tenantry_proto::phase::TenantPhase;

/// What a tenant's instance should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpec {
    /// Tenant id.
    pub id: String,
    /// Tenant name (a DNS label).
    pub name: String,
    /// Owner's user id.
    pub owner: String,
    /// Plan (quotas and limits).
    pub plan: Plan,
    /// Scaled to zero, data kept.
    pub suspended: bool,
    /// Retention the runtime enforces.
    pub retention: RetentionPolicy,
}

impl TenantSpec {
    /// The spec a stored tenant asks for.
    pub fn from_row(row: &TenantRow) -> Self {
        TenantSpec {
            id: row.id.clone(),
            name: row.name.clone(),
            owner: row.owner_user_id.clone(),
            plan: row.plan,
            suspended: row.suspended,
            retention: row.retention,
        }
    }
}

/// How far a [`Provisioner::delete`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// The instance and its data are gone.
    Done,
    /// Deletion has started and finishes on its own (a Tenant's finalizer is removing its
    /// namespace); ask again later.
    InProgress,
}

/// Runs tenant instances.
#[tonic::async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// Creates or converges the instance to `spec`; idempotent.
    async fn ensure(&self, spec: &TenantSpec) -> Result<()>;
    /// Stops the instance and destroys its data and keys; idempotent (an unknown tenant is
    /// already deleted).
    async fn delete(&self, tenant_id: &str) -> Result<Deletion>;
    /// Stops every instance this process started (data is kept).
    async fn shutdown(&self);
    /// Hands every instance the instance-token public keys it must accept (PEM blocks, see
    /// [`crate::token_keys`]); called at start and whenever the set changes. Idempotent.
    async fn publish_token_keys(&self, _public_set_pem: &str) -> Result<()> {
        Ok(())
    }
}

/// Keeps tenant records only: no instance is started, the phase stays `Provisioning`.
#[derive(Debug, Default)]
pub struct RecordOnly;

#[tonic::async_trait]
impl Provisioner for RecordOnly {
    async fn ensure(&self, _spec: &TenantSpec) -> Result<()> {
        Ok(())
    }
    async fn delete(&self, _tenant_id: &str) -> Result<Deletion> {
        Ok(Deletion::Done)
    }
    async fn shutdown(&self) {}
}

/// How often every tenant is reconciled even without a change.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// One pass over every tenant: finish deletions, converge the rest (but those waiting for
/// their owner's email verification). Errors are logged per
/// tenant so one bad tenant never stops the others.
pub async fn reconcile_all(store: &Store, provisioner: &Arc<dyn Provisioner>) -> Result<()> {
    for tenant in store.all_tenants().await? {
        // A tenant whose owner has not verified their address yet gets no instance: it is
        // provisioned by `VerifyEmail`, and by this loop after that.
        if tenant.phase == TenantPhase::AwaitingVerification {
            continue;
        }
        if tenant.phase == TenantPhase::Terminating {
            finish_delete(store, provisioner, &tenant.id).await;
        } else if let Err(e) = provisioner.ensure(&TenantSpec::from_row(&tenant)).await {
            tracing::warn!(tenant_id = %tenant.id, error = %e, "could not converge tenant; will retry");
        }
    }
    Ok(())
}

/// Deletes the instance, then the records. Until both are done the tenant stays
/// `Terminating` and the next reconcile tries again (also after a restart). Returns whether
/// the tenant is gone.
pub async fn finish_delete(
    store: &Store,
    provisioner: &Arc<dyn Provisioner>,
    tenant_id: &str,
) -> bool {
    match provisioner.delete(tenant_id).await {
        Ok(Deletion::InProgress) => {
            tracing::debug!(%tenant_id, "instance deletion in progress");
            false
        }
        Ok(Deletion::Done) => match store.purge_tenant(tenant_id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%tenant_id, error = %e, "instance deleted but records remain; will retry");
                false
            }
        },
        Err(e) => {
            tracing::warn!(%tenant_id, error = %e, "could not delete instance; will retry");
            false
        }
    }
}
