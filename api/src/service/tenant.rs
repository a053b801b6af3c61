//! `TenantService`: what a tenant's members can see and change. A tenant the caller does
//! not belong to answers `NOT_FOUND`, exactly like one that does not exist.

use std::sync::Arc;

use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::v1::tenant_service_server::TenantService;
use tenantry_proto::v1::{
    GetRetentionPolicyRequest, GetRetentionPolicyResponse, GetTenantRequest, GetTenantResponse,
    IssueInstanceTokenRequest, IssueInstanceTokenResponse, SetRetentionPolicyRequest,
    SetRetentionPolicyResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, caller, source_of, source_text};
use crate::error::{DenyReason, Error, Result};
use crate::service::{detail, retention_to_proto, tenant_to_proto};
use crate::state::AppState;
use crate::store::{AuditRecord, TenantRow};
use crate::validate;

/// Audit actions written by this service.
pub mod actions {
    /// An owner changed the retention policy.
    pub const RETENTION_SET: &str = "tenant.retention.set";
    /// A member got an instance token.
    pub const TOKEN_ISSUED: &str = "tenant.token.issued";
}

/// Membership role of the user who signed the tenant up.
pub const ROLE_OWNER: &str = "owner";

/// The service.
#[derive(Debug, Clone)]
pub struct Tenants {
    state: Arc<AppState>,
}

impl Tenants {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Tenants { state }
    }

    /// The tenant and the caller's role in it, or `NOT_FOUND`.
    async fn member_tenant(&self, who: &Caller, tenant_id: &str) -> Result<(TenantRow, String)> {
        if !validate::is_id(tenant_id) {
            return Err(Error::NotFound("tenant"));
        }
        self.state
            .store
            .membership(&who.user_id, tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))
    }
}

#[tonic::async_trait]
impl TenantService for Tenants {
    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<GetTenantResponse>, Status> {
        let who = caller(&request)?;
        let (tenant, _) = self
            .member_tenant(&who, &request.get_ref().tenant_id)
            .await?;
        Ok(Response::new(GetTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn get_retention_policy(
        &self,
        request: Request<GetRetentionPolicyRequest>,
    ) -> Result<Response<GetRetentionPolicyResponse>, Status> {
        let who = caller(&request)?;
        let (tenant, _) = self
            .member_tenant(&who, &request.get_ref().tenant_id)
            .await?;
        Ok(Response::new(GetRetentionPolicyResponse {
            policy: Some(retention_to_proto(tenant.retention)),
            max_age_hours_cap: tenant.plan.max_age_hours_cap(),
        }))
    }

    async fn set_retention_policy(
        &self,
        request: Request<SetRetentionPolicyRequest>,
    ) -> Result<Response<SetRetentionPolicyResponse>, Status> {
        let who = caller(&request)?;
        let source = source_text(source_of(&request));
        let req = request.into_inner();
        let (tenant, role) = self.member_tenant(&who, &req.tenant_id).await?;
        if role != ROLE_OWNER {
            return Err(Error::PermissionDenied(DenyReason::OwnerRequired).into());
        }
        let policy = RetentionPolicy {
            max_age_hours: req.max_age_hours,
            max_count: req.max_count,
        };
        policy
            .validate(tenant.plan.max_age_hours_cap())
            .map_err(|e| Error::invalid(e.field(), e.to_string()))?;
        let st = &self.state;
        let audit = AuditRecord {
            action: actions::RETENTION_SET,
            actor_user_id: who.user_id.clone(),
            target: tenant.id.clone(),
            success: true,
            source,
            detail_json: detail(&[
                ("max_age_hours", policy.max_age_hours.into()),
                ("max_count", policy.max_count.into()),
            ]),
        };
        let updated = st
            .store
            .set_retention(&tenant.id, policy, &audit, st.now_ms())
            .await?;
        st.provision(&updated);
        Ok(Response::new(SetRetentionPolicyResponse {
            policy: Some(retention_to_proto(policy)),
        }))
    }

    async fn issue_instance_token(
        &self,
        request: Request<IssueInstanceTokenRequest>,
    ) -> Result<Response<IssueInstanceTokenResponse>, Status> {
        let who = caller(&request)?;
        let source = source_text(source_of(&request));
        let (tenant, _) = self
            .member_tenant(&who, &request.get_ref().tenant_id)
            .await?;
        let st = &self.state;
        let now = jiff::Timestamp::from_millisecond(st.now_ms())
            .map_err(|_| Error::Crypto("clock out of range"))?;
        let signer = st.token_keys.signer(st.now_ms())?;
        let (token, claims) = signer
            .issue(&tenant.id, &who.user_id, now, st.instance_token_ttl)
            .map_err(Error::Token)?;
        st.audit(AuditRecord {
            action: actions::TOKEN_ISSUED,
            actor_user_id: who.user_id.clone(),
            target: tenant.id.clone(),
            success: true,
            source,
            detail_json: detail(&[
                ("jti", claims.jti.clone().into()),
                ("exp", claims.exp.into()),
                ("kid", signer.kid().into()),
            ]),
        })
        .await;
        Ok(Response::new(IssueInstanceTokenResponse {
            token,
            expires_at: Some(prost_types::Timestamp {
                seconds: claims.exp,
                nanos: 0,
            }),
        }))
    }
}
