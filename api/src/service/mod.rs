//! The gRPC service implementations and the conversions between rows and messages.

pub mod account;
pub mod admin;
pub mod mfa;
pub mod tenant;

use secrecy::SecretString;
use tenantry_proto::retention::{Plan, RetentionPolicy};
use tenantry_proto::v1;

use crate::auth::Caller;
use crate::clock::to_timestamp;
use crate::error::{AuthFailure, Error, Result};
use crate::state::AppState;
use crate::store::{AuditRecord, TenantRow, UserRow};

/// Checks the caller's current `password` before a sensitive change. A locked account is
/// refused; a wrong password counts like a failed login (audited as a failed `action` from
/// `source`) and answers `INVALID_ARGUMENT` on `field`. Returns the user's row.
pub(crate) async fn reauthenticate(
    st: &std::sync::Arc<AppState>,
    who: &Caller,
    password: SecretString,
    action: &'static str,
    field: &'static str,
    source: &str,
) -> Result<UserRow> {
    let user = st
        .store
        .user_by_id(&who.user_id)
        .await?
        .ok_or(Error::Unauthenticated(AuthFailure::SessionInvalid))?;
    if let Some(wait) = user.login_lock.locked_for(st.now_ms()) {
        return Err(Error::ResourceExhausted {
            what: "account temporarily locked after repeated failed logins",
            retry_after: wait,
        });
    }
    if st
        .verify_password(password, Some(user.password_hash.clone()))
        .await?
    {
        return Ok(user);
    }
    let now = st.now_ms();
    let (next, _) = user.login_lock.after_failure(now);
    let audit = AuditRecord {
        action,
        actor_user_id: who.user_id.clone(),
        target: who.user_id.clone(),
        success: false,
        source: source.to_owned(),
        detail_json: detail(&[("reason", format!("wrong_{field}").into())]),
    };
    st.store
        .record_failure(
            crate::store::Factor::Password,
            &who.user_id,
            next,
            &[audit],
            now,
        )
        .await?;
    Err(Error::invalid(
        field,
        format!("the {} is wrong", field.replace('_', " ")),
    ))
}

/// The proto plan as the shared plan type (unset means free).
pub fn plan_from_proto(plan: i32) -> Option<Plan> {
    match v1::Plan::try_from(plan).ok()? {
        v1::Plan::Unspecified | v1::Plan::Free => Some(Plan::Free),
        v1::Plan::Standard => Some(Plan::Standard),
        v1::Plan::Enterprise => Some(Plan::Enterprise),
    }
}

/// The shared plan type as the proto enum.
pub fn plan_to_proto(plan: Plan) -> v1::Plan {
    match plan {
        Plan::Free => v1::Plan::Free,
        Plan::Standard => v1::Plan::Standard,
        Plan::Enterprise => v1::Plan::Enterprise,
    }
}

/// The shared retention type as the proto message.
pub fn retention_to_proto(policy: RetentionPolicy) -> v1::RetentionPolicy {
    v1::RetentionPolicy {
        max_age_hours: policy.max_age_hours,
        max_count: policy.max_count,
    }
}

/// A tenant row as the contract's message.
pub fn tenant_to_proto(row: &TenantRow) -> v1::Tenant {
    let certificate = (!row.cert_serial.is_empty()).then(|| v1::CertificateInfo {
        serial: row.cert_serial.clone(),
        not_after: Some(to_timestamp(row.cert_not_after_ms)),
        renewal_time: (row.cert_renewal_ms > 0).then(|| to_timestamp(row.cert_renewal_ms)),
    });
    v1::Tenant {
        tenant_id: row.id.clone(),
        name: row.name.clone(),
        phase: row.phase.to_proto().into(),
        endpoint: row.endpoint.clone(),
        certificate,
        retention: Some(retention_to_proto(row.retention)),
        plan: plan_to_proto(row.plan).into(),
        suspended: row.suspended,
        owner_user_id: row.owner_user_id.clone(),
        created_at: Some(to_timestamp(row.created_at_ms)),
        message: row.message.clone(),
    }
}

/// JSON detail for an audit row from key/value pairs (values are never secrets).
pub fn detail(pairs: &[(&str, serde_json::Value)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_convert() {
        assert_eq!(plan_from_proto(0), Some(Plan::Free));
        assert_eq!(plan_from_proto(3), Some(Plan::Enterprise));
        assert_eq!(plan_from_proto(42), None);
        for plan in Plan::ALL {
            assert_eq!(plan_from_proto(plan_to_proto(plan).into()), Some(plan));
        }
    }
}
