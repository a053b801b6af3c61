//! `AdminService`: platform administration behind the admin gate (a live role grant AND a
//! recent second factor on this session; reads take `admin` or `auditor`, changes take
//! `admin`). Every call, allowed or refused, is audited.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tenantry_proto::retention::{HARD_CAP_MAX_AGE_HOURS, RetentionPolicy};
use tenantry_proto::v1::admin_service_server::AdminService;
use tenantry_proto::v1::{
    AccessReview, AccessReviewItem, AuditEvent, DeactivateUserRequest, DeactivateUserResponse,
    DecideAccessReviewItemRequest, DecideAccessReviewItemResponse, DeleteTenantRequest,
    DeleteTenantResponse, GrantAdminRequest, GrantAdminResponse, ListAccessReviewItemsRequest,
    ListAccessReviewItemsResponse, ListAccessReviewsRequest, ListAccessReviewsResponse,
    ListAuditEventsRequest, ListAuditEventsResponse, ListTenantsRequest, ListTenantsResponse,
    ListUsersRequest, ListUsersResponse, ReactivateUserRequest, ReactivateUserResponse,
    ResumeTenantRequest, ResumeTenantResponse, RevokeAdminRequest, RevokeAdminResponse,
    RevokeSessionsRequest, RevokeSessionsResponse, RoleGrant, SetTenantRetentionPolicyRequest,
    SetTenantRetentionPolicyResponse, StartAccessReviewRequest, StartAccessReviewResponse,
    SuspendTenantRequest, SuspendTenantResponse, User, UserStatus, VerifyAuditLogRequest,
    VerifyAuditLogResponse,
};
use tonic::{Request, Response, Status};

use crate::access::{
    Access, Actor, Decision, ROLE_CHANGE_REVIEW_DAYS, Role, Trigger, days_ms, grant_days,
    parse_user_filter, review_days,
};
use crate::auth::{Caller, caller, require_role, source_of, source_text};
use crate::clock::to_timestamp;
use crate::error::{DenyReason, Error, Result};
use crate::service::{detail, retention_to_proto, tenant_to_proto};
use crate::state::AppState;
use crate::store::{
    AuditFilter, AuditRecord, GrantRow, ItemDecision, NewGrant, ReviewItemRow, ReviewRow,
    TenantRow, UserWithRoles,
};
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
    /// A user's sessions revoked.
    pub const REVOKE_SESSIONS: &str = "admin.sessions.revoke";
    pub use crate::access::actions::*;
}

const DEFAULT_TENANT_PAGE: u32 = 50;
const MAX_TENANT_PAGE: u32 = 500;
const DEFAULT_AUDIT_PAGE: u32 = 100;
const MAX_AUDIT_PAGE: u32 = 1000;
const DEFAULT_USER_PAGE: u32 = 50;
const MAX_USER_PAGE: u32 = 500;
const DEFAULT_REVIEW_PAGE: u32 = 50;
const MAX_REVIEW_PAGE: u32 = 500;
/// Longest deactivation reason, review note and audit filter text, in characters.
const MAX_TEXT: usize = 500;

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
    fn actor(&self) -> Actor {
        Actor {
            user_id: self.who.user_id.clone(),
            source: self.source.clone(),
        }
    }

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
    encode_cursor(row.created_at_ms, &row.id)
}

/// A page token for a listing ordered by (time, id).
pub fn encode_cursor(ms: i64, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{ms}:{id}"))
}

/// The position a tenant listing's page token names; `None` for the first page.
pub fn decode_tenant_cursor(token: &str) -> Result<Option<(i64, String)>> {
    decode_cursor(token)
}

/// The (time, id) of a page token from [`encode_cursor`]; `None` for the first page.
pub fn decode_cursor(token: &str) -> Result<Option<(i64, String)>> {
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

/// Where a page of audit events starts: after `after`, and no further than `through`, the
/// head of the log when the first page was read (`None` for the first page). Every list
/// call appends an audit event of its own; without the bound, a listing one event a page
/// would never reach its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCursor {
    /// The last event already returned (0 before the first page).
    pub after: i64,
    /// The head of the log when the listing started (`None` on the first page).
    pub through: Option<i64>,
}

/// The page token of an audit listing after event `after`, bounded by `through`.
pub fn encode_audit_cursor(after: u64, through: i64) -> String {
    format!("{after}.{through}")
}

/// The position an audit listing's page token names.
pub fn decode_audit_cursor(token: &str) -> Result<AuditCursor> {
    if token.is_empty() {
        return Ok(AuditCursor {
            after: 0,
            through: None,
        });
    }
    let number = |s: &str| s.parse::<i64>().ok().filter(|n| *n >= 0);
    let (after, through) = token.split_once('.').unzip();
    match (after.and_then(number), through.and_then(number)) {
        (Some(after), Some(through)) if after <= through => Ok(AuditCursor {
            after,
            through: Some(through),
        }),
        _ => Err(Error::invalid(
            "page_token",
            "not a token this server issued",
        )),
    }
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

    /// The admin gate: `access` says whether the rpc reads (admin or auditor) or changes
    /// (admin). A refusal is audited with the reason. Grants of the caller that have
    /// expired are recorded as expired here, the first time they are seen.
    async fn admit<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        access: Access,
    ) -> Result<Admitted> {
        let who = caller(request)?;
        let source = source_text(source_of(request));
        let now = self.state.now_ms();
        for expired in who.expired_roles(now) {
            if let Err(e) = self
                .state
                .store
                .expire_grant(&who.user_id, expired.role, expired.expires_at_ms, now)
                .await
            {
                tracing::warn!(error = %e, "could not record an expired grant; the sweep will");
            }
        }
        if let Err(e) = require_role(&self.state, &who, access) {
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

    /// Refuses, and audits as `admin.denied`, an action on the caller's own access.
    async fn deny_self(&self, admin: &Admitted, rpc: &'static str, why: DenyReason) -> Error {
        self.state
            .audit(AuditRecord {
                action: actions::DENIED,
                actor_user_id: admin.who.user_id.clone(),
                target: rpc.to_owned(),
                success: false,
                source: admin.source.clone(),
                detail_json: detail(&[("reason", why.as_str().into())]),
            })
            .await;
        Error::PermissionDenied(why)
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
        let admin = self.admit(&request, "ListTenants", Access::Read).await?;
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
        let admin = self.admit(&request, "SuspendTenant", Access::Write).await?;
        let id = tenant_id(&request.get_ref().tenant_id)?;
        let st = &self.state;
        let audit = admin.record(actions::SUSPEND, id, String::new());
        let tenant = st
            .store
            .set_suspended(id, true, TenantPhase::Suspended, &audit, st.now_ms())
            .await?;
        st.provision(&tenant);
        Ok(Response::new(SuspendTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn resume_tenant(
        &self,
        request: Request<ResumeTenantRequest>,
    ) -> Result<Response<ResumeTenantResponse>, Status> {
        let admin = self.admit(&request, "ResumeTenant", Access::Write).await?;
        let id = tenant_id(&request.get_ref().tenant_id)?;
        let st = &self.state;
        let audit = admin.record(actions::RESUME, id, String::new());
        // Until a provisioner reports readiness, a resumed tenant is being provisioned.
        let tenant = st
            .store
            .set_suspended(id, false, TenantPhase::Provisioning, &audit, st.now_ms())
            .await?;
        st.provision(&tenant);
        Ok(Response::new(ResumeTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        let admin = self.admit(&request, "DeleteTenant", Access::Write).await?;
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
        let admin = self
            .admit(&request, "SetTenantRetentionPolicy", Access::Write)
            .await?;
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
        st.provision(&tenant);
        Ok(Response::new(SetTenantRetentionPolicyResponse {
            policy: Some(retention_to_proto(policy)),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let admin = self
            .admit(&request, "ListAuditEvents", Access::Read)
            .await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE)?;
        let cursor = decode_audit_cursor(&req.page_token)?;
        let after = cursor.after;
        let mut filter = audit_filter(&req)?;
        let st = &self.state;
        let through = match cursor.through {
            Some(through) => through,
            None => st.store.audit_head_sequence().await?,
        };
        filter.through_sequence = Some(through);
        let rows = st
            .store
            .list_audit_filtered(&filter, after, limit + 1)
            .await?;
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
            Some(last) if more => encode_audit_cursor(last.sequence, through),
            _ => String::new(),
        };
        st.audit(admin.record(
            actions::LIST_AUDIT,
            "",
            detail(&[
                ("after", after.into()),
                ("since_ms", filter.since_ms.into()),
                ("until_ms", filter.until_ms.into()),
                ("action_prefix", filter.action_prefix.into()),
                ("actor_user_id", filter.actor_user_id.into()),
                ("target", filter.target.into()),
            ]),
        ))
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
        let admin = self.admit(&request, "VerifyAuditLog", Access::Read).await?;
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
        let admin = self.admit(&request, "GrantAdmin", Access::Write).await?;
        let req = request.get_ref();
        let id = user_id(&req.user_id)?;
        let role = Role::from_proto(req.role)?;
        let st = &self.state;
        let days = grant_days(req.expires_in_days, st.access.max_grant_days)?;
        if id == admin.who.user_id {
            return Err(self
                .deny_self(&admin, "GrantAdmin", DenyReason::SelfGrant)
                .await
                .into());
        }
        let now = st.now_ms();
        let outcome = st
            .store
            .grant_role(
                &NewGrant {
                    user_id: id.to_owned(),
                    role,
                    expires_at_ms: now.saturating_add(days_ms(days)),
                    review_id: uuid::Uuid::new_v4().to_string(),
                    review_due_ms: now.saturating_add(days_ms(ROLE_CHANGE_REVIEW_DAYS)),
                    now_ms: now,
                },
                &admin.actor(),
            )
            .await?;
        Ok(Response::new(GrantAdminResponse {
            grant: Some(grant_to_proto(&outcome.grant)),
            review_id: outcome.review_id.unwrap_or_default(),
        }))
    }

    async fn revoke_admin(
        &self,
        request: Request<RevokeAdminRequest>,
    ) -> Result<Response<RevokeAdminResponse>, Status> {
        let admin = self.admit(&request, "RevokeAdmin", Access::Write).await?;
        let id = user_id(&request.get_ref().user_id)?;
        let role = Role::from_proto(request.get_ref().role)?;
        let st = &self.state;
        st.store
            .revoke_role(id, role, &admin.actor(), st.now_ms())
            .await?;
        Ok(Response::new(RevokeAdminResponse {}))
    }

    async fn revoke_sessions(
        &self,
        request: Request<RevokeSessionsRequest>,
    ) -> Result<Response<RevokeSessionsResponse>, Status> {
        let admin = self
            .admit(&request, "RevokeSessions", Access::Write)
            .await?;
        let id = user_id(&request.get_ref().user_id)?;
        let st = &self.state;
        let audit = admin.record(actions::REVOKE_SESSIONS, id, String::new());
        let revoked = st
            .store
            .delete_user_sessions(id, &audit, st.now_ms())
            .await?;
        Ok(Response::new(RevokeSessionsResponse { revoked }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let admin = self.admit(&request, "ListUsers", Access::Read).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_USER_PAGE, MAX_USER_PAGE)?;
        let after = decode_cursor(&req.page_token)?;
        let filter = parse_user_filter(&req.filter)?;
        let st = &self.state;
        let now = st.now_ms();
        let rows = st.store.list_users(&filter, after, limit + 1, now).await?;
        let more = rows.len() > limit as usize;
        let page: Vec<UserWithRoles> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match page.last() {
            Some(last) if more => encode_cursor(last.user.created_at_ms, &last.user.id),
            _ => String::new(),
        };
        st.audit(admin.record(
            actions::USER_LIST,
            "",
            detail(&[
                ("count", page.len().into()),
                ("filter", req.filter.clone().into()),
            ]),
        ))
        .await;
        Ok(Response::new(ListUsersResponse {
            users: page.iter().map(user_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn deactivate_user(
        &self,
        request: Request<DeactivateUserRequest>,
    ) -> Result<Response<DeactivateUserResponse>, Status> {
        let admin = self
            .admit(&request, "DeactivateUser", Access::Write)
            .await?;
        let req = request.get_ref();
        let id = user_id(&req.user_id)?;
        let reason = req.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_TEXT {
            return Err(Error::invalid("reason", "must be 1 to 500 characters").into());
        }
        let st = &self.state;
        let now = st.now_ms();
        let done = st
            .store
            .deactivate_user(id, reason, &admin.actor(), now)
            .await?;
        let user = st.store.user_with_roles(id, now).await?;
        Ok(Response::new(DeactivateUserResponse {
            user: Some(user_to_proto(&user)),
            sessions_revoked: done.sessions_revoked,
        }))
    }

    async fn reactivate_user(
        &self,
        request: Request<ReactivateUserRequest>,
    ) -> Result<Response<ReactivateUserResponse>, Status> {
        let admin = self
            .admit(&request, "ReactivateUser", Access::Write)
            .await?;
        let id = user_id(&request.get_ref().user_id)?;
        let st = &self.state;
        let now = st.now_ms();
        st.store.reactivate_user(id, &admin.actor(), now).await?;
        let user = st.store.user_with_roles(id, now).await?;
        Ok(Response::new(ReactivateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn start_access_review(
        &self,
        request: Request<StartAccessReviewRequest>,
    ) -> Result<Response<StartAccessReviewResponse>, Status> {
        let admin = self
            .admit(&request, "StartAccessReview", Access::Write)
            .await?;
        let days = review_days(request.get_ref().due_in_days)?;
        let st = &self.state;
        let now = st.now_ms();
        let review = st
            .store
            .start_review(
                &uuid::Uuid::new_v4().to_string(),
                Trigger::Manual,
                &admin.actor(),
                now,
                now.saturating_add(days_ms(days)),
            )
            .await?;
        Ok(Response::new(StartAccessReviewResponse {
            review: Some(review_to_proto(&review)),
        }))
    }

    async fn list_access_reviews(
        &self,
        request: Request<ListAccessReviewsRequest>,
    ) -> Result<Response<ListAccessReviewsResponse>, Status> {
        let admin = self
            .admit(&request, "ListAccessReviews", Access::Read)
            .await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size, DEFAULT_REVIEW_PAGE, MAX_REVIEW_PAGE)?;
        let before = decode_cursor(&req.page_token)?;
        let st = &self.state;
        let rows = st.store.list_reviews(before, limit + 1).await?;
        let more = rows.len() > limit as usize;
        let page: Vec<ReviewRow> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match page.last() {
            Some(last) if more => encode_cursor(last.started_at_ms, &last.id),
            _ => String::new(),
        };
        st.audit(admin.record(
            actions::REVIEW_LIST,
            "",
            detail(&[("count", page.len().into())]),
        ))
        .await;
        Ok(Response::new(ListAccessReviewsResponse {
            reviews: page.iter().map(review_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn list_access_review_items(
        &self,
        request: Request<ListAccessReviewItemsRequest>,
    ) -> Result<Response<ListAccessReviewItemsResponse>, Status> {
        let admin = self
            .admit(&request, "ListAccessReviewItems", Access::Read)
            .await?;
        let id = review_id(&request.get_ref().review_id)?;
        let st = &self.state;
        let review = st
            .store
            .review(id)
            .await?
            .ok_or(Error::NotFound("access review"))?;
        let items = st.store.review_items(id).await?;
        st.audit(admin.record(
            actions::REVIEW_SHOW,
            id,
            detail(&[("items", items.len().into())]),
        ))
        .await;
        Ok(Response::new(ListAccessReviewItemsResponse {
            review: Some(review_to_proto(&review)),
            items: items.iter().map(item_to_proto).collect(),
        }))
    }

    async fn decide_access_review_item(
        &self,
        request: Request<DecideAccessReviewItemRequest>,
    ) -> Result<Response<DecideAccessReviewItemResponse>, Status> {
        let admin = self
            .admit(&request, "DecideAccessReviewItem", Access::Write)
            .await?;
        let req = request.into_inner();
        let review = review_id(&req.review_id)?;
        let role = Role::from_proto(req.role)?;
        let decision = Decision::from_request(req.decision)?;
        if req.note.chars().count() > MAX_TEXT {
            return Err(Error::invalid("note", "must be at most 500 characters").into());
        }
        let st = &self.state;
        let days = grant_days(req.expires_in_days, st.access.max_grant_days)?;
        if req.user_id == admin.who.user_id {
            return Err(self
                .deny_self(&admin, "DecideAccessReviewItem", DenyReason::SelfReview)
                .await
                .into());
        }
        if !crate::validate::is_id(&req.user_id) {
            return Err(Error::NotFound("access review item").into());
        }
        let now = st.now_ms();
        st.store
            .decide_item(
                &ItemDecision {
                    review_id: review.to_owned(),
                    user_id: req.user_id.clone(),
                    role,
                    decision,
                    note: req.note.clone(),
                    keep_until_ms: now.saturating_add(days_ms(days)),
                    now_ms: now,
                },
                &admin.actor(),
            )
            .await?;
        let item = st
            .store
            .review_items(review)
            .await?
            .into_iter()
            .find(|i| i.user_id == req.user_id && i.role == role)
            .ok_or(Error::NotFound("access review item"))?;
        Ok(Response::new(DecideAccessReviewItemResponse {
            item: Some(item_to_proto(&item)),
        }))
    }
}

/// The filters of `ListAuditEvents`.
fn audit_filter(req: &ListAuditEventsRequest) -> Result<AuditFilter> {
    let time = |field: &'static str, ts: &Option<prost_types::Timestamp>| -> Result<Option<i64>> {
        ts.as_ref()
            .map(|t| {
                if !(0..1_000_000_000).contains(&t.nanos) {
                    return Err(Error::invalid(field, "nanos must be 0 to 999,999,999"));
                }
                t.seconds
                    .checked_mul(1000)
                    .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
                    .ok_or_else(|| Error::invalid(field, "out of range"))
            })
            .transpose()
    };
    let text = |field: &'static str, value: &str| -> Result<Option<String>> {
        if value.chars().count() > MAX_TEXT {
            return Err(Error::invalid(field, "must be at most 500 characters"));
        }
        Ok((!value.is_empty()).then(|| value.to_owned()))
    };
    Ok(AuditFilter {
        since_ms: time("since", &req.since)?,
        until_ms: time("until", &req.until)?,
        action_prefix: text("action_prefix", &req.action_prefix)?,
        actor_user_id: text("actor_user_id", &req.actor_user_id)?,
        target: text("target", &req.target)?,
        through_sequence: None,
    })
}

fn review_id(raw: &str) -> Result<&str> {
    if validate::is_id(raw) {
        Ok(raw)
    } else {
        Err(Error::NotFound("access review"))
    }
}

/// A grant as the contract's message.
pub fn grant_to_proto(g: &GrantRow) -> RoleGrant {
    RoleGrant {
        role: g.role.to_proto().into(),
        granted_by_user_id: g.granted_by.clone(),
        granted_at: Some(to_timestamp(g.granted_at_ms)),
        expires_at: Some(to_timestamp(g.expires_at_ms)),
    }
}

/// A user with their grants as the contract's message.
pub fn user_to_proto(u: &UserWithRoles) -> User {
    let user = &u.user;
    User {
        user_id: user.id.clone(),
        email: user.email.clone(),
        roles: u.grants.iter().map(grant_to_proto).collect(),
        mfa_enrolled: user.mfa_enrolled(),
        created_at: Some(to_timestamp(user.created_at_ms)),
        last_login_at: user.last_login_at_ms.map(to_timestamp),
        status: if user.is_active() {
            UserStatus::Active
        } else {
            UserStatus::Deactivated
        }
        .into(),
        deactivated_at: user.deactivated_at_ms.map(to_timestamp),
        deactivation_reason: user.deactivation_reason.clone(),
    }
}

/// A review as the contract's message.
pub fn review_to_proto(r: &ReviewRow) -> AccessReview {
    AccessReview {
        review_id: r.id.clone(),
        trigger: r.trigger.to_proto().into(),
        started_by_user_id: r.started_by.clone(),
        started_at: Some(to_timestamp(r.started_at_ms)),
        due_at: Some(to_timestamp(r.due_at_ms)),
        closed_at: r.closed_at_ms.map(to_timestamp),
        items: r.items,
        kept: r.kept,
        revoked: r.revoked,
        expired: r.expired,
        undecided: r.undecided,
    }
}

/// A review item as the contract's message.
pub fn item_to_proto(i: &ReviewItemRow) -> AccessReviewItem {
    AccessReviewItem {
        review_id: i.review_id.clone(),
        user_id: i.user_id.clone(),
        email: i.email.clone(),
        role: i.role.to_proto().into(),
        granted_by_user_id: i.granted_by.clone(),
        granted_at: Some(to_timestamp(i.granted_at_ms)),
        expires_at: Some(to_timestamp(i.expires_at_ms)),
        decision: i
            .decision
            .map(Decision::to_proto)
            .unwrap_or_default()
            .into(),
        decided_by_user_id: i.decided_by.clone(),
        decided_at: i.decided_at_ms.map(to_timestamp),
        note: i.note.clone(),
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
        let cursor = decode_audit_cursor(&encode_audit_cursor(17, 40)).unwrap();
        assert_eq!(
            cursor,
            AuditCursor {
                after: 17,
                through: Some(40)
            }
        );
        assert_eq!(decode_audit_cursor("").unwrap().through, None);
        for bad in ["17", "-1.4", "4.-1", "5.4", "a.b", "1.2.3"] {
            assert!(decode_audit_cursor(bad).is_err(), "{bad}");
        }
    }
}
