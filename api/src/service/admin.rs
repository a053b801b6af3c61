//! `AdminService`: platform administration behind the admin gate (role AND a recent second
//! factor on this session). Every call, allowed or refused, is audited.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tenantry_proto::retention::{HARD_CAP_MAX_AGE_HOURS, RetentionPolicy};
use tenantry_proto::v1::admin_service_server::AdminService;
use tenantry_proto::v1::{
    AuditEvent, DeleteTenantRequest, DeleteTenantResponse, GrantAdminRequest, GrantAdminResponse,
    ListAuditEventsRequest, ListAuditEventsResponse, ListTenantsRequest, ListTenantsResponse,
    ResumeTenantRequest, ResumeTenantResponse, RevokeAdminRequest, RevokeAdminResponse,
    RevokeSessionsRequest, RevokeSessionsResponse, SetTenantRetentionPolicyRequest,
    SetTenantRetentionPolicyResponse, SuspendTenantRequest, SuspendTenantResponse,
    VerifyAuditLogRequest, VerifyAuditLogResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, caller, require_admin, source_of, source_text};
use crate::clock::to_timestamp;
use crate::error::{Error, Result};
use crate::provision::TenantSpec;
use crate::service::{detail, retention_to_proto, tenant_to_proto};
use crate::state::AppState;
use crate::store::{AuditRecord, TenantRow};
use crate::validate;
use tenantry_proto::phase::TenantPhase;

/// Audit actions written by this service (`admin.<what>`).
pub mod actions {
    /// The admin gate refused a call.
    pub const DENIED: &str = "admin.denied";
    /// Tenants listed.
    pub const LIST_TENANTS: &str = "admin.tenant.list";
    /// A tenant suspended.
    pub const SUSPEND: &str = "admin.tenant.suspend";
    /// A tenant resumed.
    pub const RESUME: &str = "admin.tenant.resume";
    /// A tenant deleted.
    pub const DELETE: &str = "admin.tenant.delete";
    /// A tenant's retention set.
    pub const RETENTION: &str = "admin.tenant.retention.set";
    /// Audit events listed.
    pub const LIST_AUDIT: &str = "admin.audit.list";
    /// The audit chain verified.
    pub const VERIFY_AUDIT: &str = "admin.audit.verify";
    /// Admin role granted.
    pub const GRANT: &str = "admin.role.grant";
    /// Admin role revoked.
    pub const REVOKE: &str = "admin.role.revoke";
    /// A user's sessions revoked.
    pub const REVOKE_SESSIONS: &str = "admin.sessions.revoke";
}

const DEFAULT_TENANT_PAGE: u32 = 50;
const MAX_TENANT_PAGE: u32 = 500;
const DEFAULT_AUDIT_PAGE: u32 = 100;
const MAX_AUDIT_PAGE: u32 = 1000;

/// The service.
#[derive(Debug, Clone)]
pub struct Admin {
    state: Arc<AppState>,
}

/// An admin who passed the gate, with the audit fields every action needs.
struct Admitted {
    who: Caller,
    source: String,
}

impl Admitted {
    fn record(&self, action: &'static str, target: &str, detail_json: String) -> AuditRecord {
        AuditRecord {
            action,
            actor_user_id: self.who.user_id.clone(),
            target: target.to_owned(),
            success: true,
            source: self.source.clone(),
            detail_json,
        }
    }
}

fn page_size(requested: u32, default: u32, max: u32) -> Result<u32> {
    match requested {
        0 => Ok(default),
        n if n <= max => Ok(n),
        _ => Err(Error::invalid(
            "page_size",
            format!("must be at most {max}"),
        )),
    }
}

fn encode_tenant_cursor(row: &TenantRow) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", row.created_at_ms, row.id))
}

fn decode_tenant_cursor(token: &str) -> Result<Option<(i64, String)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "not a token this server issued");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    let ms = ms.parse().map_err(|_| bad())?;
    if !validate::is_id(id) {
        return Err(bad());
    }
    Ok(Some((ms, id.to_owned())))
}

fn decode_audit_cursor(token: &str) -> Result<i64> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| Error::invalid("page_token", "not a token this server issued"))
}

fn tenant_id(raw: &str) -> Result<&str> {
    if validate::is_id(raw) {
        Ok(raw)
    } else {
        Err(Error::NotFound("tenant"))
    }
}

fn user_id(raw: &str) -> Result<&str> {
    if validate::is_id(raw) {
        Ok(raw)
    } else {
        Err(Error::NotFound("user"))
    }
}

impl Admin {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Admin { state }
    }

    /// The admin gate. A refusal is audited with the reason.
    async fn admit<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<Admitted> {
        let who = caller(request)?;
        let source = source_text(source_of(request));
        if let Err(e) = require_admin(&self.state, &who) {
            let reason = match &e {
                Error::PermissionDenied(r) => r.as_str(),
                _ => "unknown",
            };
            self.state
                .audit(AuditRecord {
                    action: actions::DENIED,
                    actor_user_id: who.user_id.clone(),
                    target: rpc.to_owned(),
                    success: false,
                    source,
                    detail_json: detail(&[("reason", reason.into())]),
                })
                .await;
            return Err(e);
        }
        Ok(Admitted { who, source })
    }

    async fn existing_tenant(&self, id: &str) -> Result<TenantRow> {
        self.state
            .store
            .tenant(id)
            .await?
            .ok_or(Error::NotFound("tenant"))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let admin = self.admit(&request, "ListTenants").await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_TENANT_PAGE, MAX_TENANT_PAGE)?;
        let after = decode_tenant_cursor(&req.page_token)?;
        let st = &self.state;
        let rows = st.store.list_tenants(after, limit + 1).await?;
        let more = rows.len() > limit as usize;
        let page: Vec<TenantRow> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match page.last() {
            Some(last) if more => encode_tenant_cursor(last),
            _ => String::new(),
        };
        st.audit(admin.record(
            actions::LIST_TENANTS,
            "",
            detail(&[("count", page.len().into())]),
        ))
        .await;
        Ok(Response::new(ListTenantsResponse {
            tenants: page.iter().map(tenant_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn suspend_tenant(
        &self,
        request: Request<SuspendTenantRequest>,
    ) -> Result<Response<SuspendTenantResponse>, Status> {
        let admin = self.admit(&request, "SuspendTenant").await?;
        let id = tenant_id(&request.get_ref().tenant_id)?;
        let st = &self.state;
        let audit = admin.record(actions::SUSPEND, id, String::new());
        let tenant = st
            .store
            .set_suspended(id, true, TenantPhase::Suspended, &audit, st.now_ms())
            .await?;
        st.provision(TenantSpec::from_row(&tenant));
        Ok(Response::new(SuspendTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn resume_tenant(
        &self,
        request: Request<ResumeTenantRequest>,
    ) -> Result<Response<ResumeTenantResponse>, Status> {
        let admin = self.admit(&request, "ResumeTenant").await?;
        let id = tenant_id(&request.get_ref().tenant_id)?;
        let st = &self.state;
        let audit = admin.record(actions::RESUME, id, String::new());
        // Until a provisioner reports readiness, a resumed tenant is being provisioned.
        let tenant = st
            .store
            .set_suspended(id, false, TenantPhase::Provisioning, &audit, st.now_ms())
            .await?;
        st.provision(TenantSpec::from_row(&tenant));
        Ok(Response::new(ResumeTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        let admin = self.admit(&request, "DeleteTenant").await?;
        let id = tenant_id(&request.get_ref().tenant_id)?;
        let st = &self.state;
        let tenant = self.existing_tenant(id).await?;
        let audit = admin.record(actions::DELETE, id, detail(&[("name", tenant.name.into())]));
        st.store.mark_terminating(id, &audit, st.now_ms()).await?;
        // Usually done at once; if not, the tenant stays Terminating and the reconcile
        // loop finishes the job (also after a restart).
        crate::provision::finish_delete(&st.store, &st.provisioner, id).await;
        Ok(Response::new(DeleteTenantResponse {}))
    }

    async fn set_tenant_retention_policy(
        &self,
        request: Request<SetTenantRetentionPolicyRequest>,
    ) -> Result<Response<SetTenantRetentionPolicyResponse>, Status> {
        let admin = self.admit(&request, "SetTenantRetentionPolicy").await?;
        let req = request.into_inner();
        let id = tenant_id(&req.tenant_id)?;
        let policy = RetentionPolicy {
            max_age_hours: req.max_age_hours,
            max_count: req.max_count,
        };
        policy
            .validate(HARD_CAP_MAX_AGE_HOURS)
            .map_err(|e| Error::invalid(e.field(), e.to_string()))?;
        let st = &self.state;
        let audit = admin.record(
            actions::RETENTION,
            id,
            detail(&[
                ("max_age_hours", policy.max_age_hours.into()),
                ("max_count", policy.max_count.into()),
            ]),
        );
        let tenant = st
            .store
            .set_retention(id, policy, &audit, st.now_ms())
            .await?;
        st.provision(TenantSpec::from_row(&tenant));
        Ok(Response::new(SetTenantRetentionPolicyResponse {
            policy: Some(retention_to_proto(policy)),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let admin = self.admit(&request, "ListAuditEvents").await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)?;
        let after = decode_audit_cursor(&req.page_token)?;
        let st = &self.state;
        let rows = st.store.list_audit(after, limit + 1).await?;
        let more = rows.len() > limit as usize;
        let events: Vec<AuditEvent> = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| AuditEvent {
                sequence: u64::try_from(r.entry.sequence).unwrap_or(0),
                time: Some(to_timestamp(r.entry.at_ms)),
                action: r.entry.action,
                actor_user_id: r.entry.actor_user_id,
                target: r.entry.target,
                outcome: r.entry.outcome,
                source: r.entry.source,
                detail_json: r.entry.detail_json,
                hash: r.hash,
            })
            .collect();
        let next_page_token = match events.last() {
            Some(last) if more => last.sequence.to_string(),
            _ => String::new(),
        };
        st.audit(admin.record(actions::LIST_AUDIT, "", detail(&[("after", after.into())])))
            .await;
        Ok(Response::new(ListAuditEventsResponse {
            events,
            next_page_token,
        }))
    }

    async fn verify_audit_log(
        &self,
        request: Request<VerifyAuditLogRequest>,
    ) -> Result<Response<VerifyAuditLogResponse>, Status> {
        let admin = self.admit(&request, "VerifyAuditLog").await?;
        let st = &self.state;
        let result = st.store.verify_audit().await?;
        let response = match result {
            Ok(checked) => VerifyAuditLogResponse {
                ok: true,
                first_bad_sequence: 0,
                checked,
            },
            Err(bad) => {
                tracing::error!(first_bad_sequence = bad, "audit log chain is broken");
                VerifyAuditLogResponse {
                    ok: false,
                    first_bad_sequence: u64::try_from(bad).unwrap_or(0),
                    checked: u64::try_from(bad).unwrap_or(0),
                }
            }
        };
        st.audit(admin.record(
            actions::VERIFY_AUDIT,
            "",
            detail(&[
                ("ok", response.ok.into()),
                ("first_bad_sequence", response.first_bad_sequence.into()),
            ]),
        ))
        .await;
        Ok(Response::new(response))
    }

    async fn grant_admin(
        &self,
        request: Request<GrantAdminRequest>,
    ) -> Result<Response<GrantAdminResponse>, Status> {
        let admin = self.admit(&request, "GrantAdmin").await?;
        let id = user_id(&request.get_ref().user_id)?;
        let st = &self.state;
        let audit = admin.record(actions::GRANT, id, String::new());
        st.store.set_admin(id, true, &audit, st.now_ms()).await?;
        Ok(Response::new(GrantAdminResponse {}))
    }

    async fn revoke_admin(
        &self,
        request: Request<RevokeAdminRequest>,
    ) -> Result<Response<RevokeAdminResponse>, Status> {
        let admin = self.admit(&request, "RevokeAdmin").await?;
        let id = user_id(&request.get_ref().user_id)?;
        let st = &self.state;
        let audit = admin.record(actions::REVOKE, id, String::new());
        if !st.store.set_admin(id, false, &audit, st.now_ms()).await? {
            return Err(Error::FailedPrecondition("the last admin cannot be revoked").into());
        }
        Ok(Response::new(RevokeAdminResponse {}))
    }

    async fn revoke_sessions(
        &self,
        request: Request<RevokeSessionsRequest>,
    ) -> Result<Response<RevokeSessionsResponse>, Status> {
        let admin = self.admit(&request, "RevokeSessions").await?;
        let id = user_id(&request.get_ref().user_id)?;
        let st = &self.state;
        let audit = admin.record(actions::REVOKE_SESSIONS, id, String::new());
        let revoked = st
            .store
            .delete_user_sessions(id, &audit, st.now_ms())
            .await?;
        Ok(Response::new(RevokeSessionsResponse { revoked }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0, 50, 500).unwrap(), 50);
        assert_eq!(page_size(500, 50, 500).unwrap(), 500);
        assert!(page_size(501, 50, 500).is_err());
    }

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let row = TenantRow {
            id: "0b9c7a52-3a5e-4c1e-9a59-2f7c7ac9d8a1".into(),
            name: "acme".into(),
            owner_user_id: String::new(),
            plan: tenantry_proto::retention::Plan::Free,
            phase: TenantPhase::Ready,
            suspended: false,
            retention: RetentionPolicy {
                max_age_hours: 1,
                max_count: 1,
            },
            endpoint: String::new(),
            cert_serial: String::new(),
            cert_not_after_ms: 0,
            cert_renewal_ms: 0,
            message: String::new(),
            created_at_ms: 42,
        };
        let token = encode_tenant_cursor(&row);
        assert_eq!(
            decode_tenant_cursor(&token).unwrap(),
            Some((42, row.id.clone()))
        );
        assert_eq!(decode_tenant_cursor("").unwrap(), None);
        assert!(decode_tenant_cursor("!!").is_err());
        assert!(decode_tenant_cursor(&URL_SAFE_NO_PAD.encode("x:y")).is_err());
        assert_eq!(decode_audit_cursor("17").unwrap(), 17);
        assert!(decode_audit_cursor("-1").is_err());
    }
}
