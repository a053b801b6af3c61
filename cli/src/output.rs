//! How results look: aligned plain-text tables for people, JSON for scripts. Pure functions
//! from protobuf messages to strings and `serde_json::Value`s; `commands` does the printing.

use serde_json::{Value, json};
use tenantry_proto::v1::{
    AccessReview, AccessReviewDecision, AccessReviewItem, AccessReviewTrigger, AdminRole,
    AuditEvent, Plan, RetentionPolicy, RoleGrant, Tenant, TenantPhase, User, UserStatus,
};

/// Columns with a header row, padded to the widest cell, separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| sanitize(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &clean {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(clean.iter()) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let width = widths.get(i).copied().unwrap_or(0);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One record as `NAME  value` lines, names aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (name, value) in pairs {
        let pad = width.saturating_sub(name.chars().count());
        out.push_str(name);
        out.extend(std::iter::repeat_n(' ', pad + 2));
        out.push_str(&sanitize(value));
        out.push('\n');
    }
    out
}

/// `value` as pretty JSON with a final newline.
pub fn json(value: &Value) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Replaces control characters so text from the server cannot move the cursor, change
/// colours or set the window title of the operator's terminal.
pub fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A protobuf timestamp in RFC 3339, or `None` when unset or out of range.
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    jiff::Timestamp::new(ts.seconds, ts.nanos)
        .ok()
        .map(|t| t.to_string())
}

/// [`timestamp`] for a table cell: `-` when unset.
pub fn timestamp_cell(ts: Option<&prost_types::Timestamp>) -> String {
    timestamp(ts).unwrap_or_else(|| "-".to_owned())
}

/// `-` for an empty cell.
fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// The phase as the design names it (`Ready`, `Suspended`, ...).
pub fn phase_name(phase: i32) -> &'static str {
    match TenantPhase::try_from(phase) {
        Ok(TenantPhase::Pending) => "Pending",
        Ok(TenantPhase::Provisioning) => "Provisioning",
        Ok(TenantPhase::Ready) => "Ready",
        Ok(TenantPhase::Suspended) => "Suspended",
        Ok(TenantPhase::Degraded) => "Degraded",
        Ok(TenantPhase::Terminating) => "Terminating",
        Ok(TenantPhase::AwaitingVerification) => "AwaitingVerification",
        Ok(TenantPhase::Unspecified) | Err(_) => "Unknown",
    }
}

/// The plan as the `Tenant` resource names it (`free`, `standard`, `enterprise`).
pub fn plan_name(plan: i32) -> &'static str {
    match Plan::try_from(plan) {
        // The server treats an unset plan as free.
        Ok(Plan::Free | Plan::Unspecified) => "free",
        Ok(Plan::Standard) => "standard",
        Ok(Plan::Enterprise) => "enterprise",
        Err(_) => "unknown",
    }
}

/// Column headers of [`tenant_row`].
pub const TENANT_HEADERS: [&str; 7] = [
    "ID",
    "NAME",
    "PHASE",
    "PLAN",
    "SUSPENDED",
    "RETENTION",
    "CREATED",
];

/// One tenant as a table row.
pub fn tenant_row(t: &Tenant) -> Vec<String> {
    vec![
        t.tenant_id.clone(),
        t.name.clone(),
        phase_name(t.phase).to_owned(),
        plan_name(t.plan).to_owned(),
        t.suspended.to_string(),
        t.retention
            .as_ref()
            .map(|r| format!("{}h/{}", r.max_age_hours, r.max_count))
            .unwrap_or_else(|| "-".to_owned()),
        timestamp_cell(t.created_at.as_ref()),
    ]
}

/// One tenant, every field, as `NAME  value` lines.
pub fn tenant_fields(t: &Tenant) -> String {
    let cert = t.certificate.as_ref();
    fields(&[
        ("ID", t.tenant_id.clone()),
        ("NAME", t.name.clone()),
        ("PHASE", phase_name(t.phase).to_owned()),
        ("MESSAGE", or_dash(&t.message)),
        ("PLAN", plan_name(t.plan).to_owned()),
        ("SUSPENDED", t.suspended.to_string()),
        ("OWNER", or_dash(&t.owner_user_id)),
        ("ENDPOINT", or_dash(&t.endpoint)),
        (
            "MAX AGE HOURS",
            t.retention
                .as_ref()
                .map_or("-".to_owned(), |r| r.max_age_hours.to_string()),
        ),
        (
            "MAX COUNT",
            t.retention
                .as_ref()
                .map_or("-".to_owned(), |r| r.max_count.to_string()),
        ),
        (
            "CERT SERIAL",
            cert.map_or("-".to_owned(), |c| or_dash(&c.serial)),
        ),
        (
            "CERT NOT AFTER",
            timestamp_cell(cert.and_then(|c| c.not_after.as_ref())),
        ),
        (
            "CERT RENEWAL",
            timestamp_cell(cert.and_then(|c| c.renewal_time.as_ref())),
        ),
        ("CREATED", timestamp_cell(t.created_at.as_ref())),
    ])
}

/// One tenant as JSON.
pub fn tenant_json(t: &Tenant) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "name": t.name,
        "phase": phase_name(t.phase),
        "message": t.message,
        "plan": plan_name(t.plan),
        "suspended": t.suspended,
        "owner_user_id": t.owner_user_id,
        "endpoint": t.endpoint,
        "retention": t.retention.as_ref().map(retention_json),
        "certificate": t.certificate.as_ref().map(|c| json!({
            "serial": c.serial,
            "not_after": timestamp(c.not_after.as_ref()),
            "renewal_time": timestamp(c.renewal_time.as_ref()),
        })),
        "created_at": timestamp(t.created_at.as_ref()),
    })
}

/// A retention policy as JSON.
pub fn retention_json(r: &RetentionPolicy) -> Value {
    json!({ "max_age_hours": r.max_age_hours, "max_count": r.max_count })
}

/// Column headers of [`audit_row`].
pub const AUDIT_HEADERS: [&str; 7] = [
    "SEQ", "TIME", "ACTION", "ACTOR", "TARGET", "OUTCOME", "SOURCE",
];

/// One audit event as a table row.
pub fn audit_row(e: &AuditEvent) -> Vec<String> {
    vec![
        e.sequence.to_string(),
        timestamp_cell(e.time.as_ref()),
        e.action.clone(),
        or_dash(&e.actor_user_id),
        or_dash(&e.target),
        e.outcome.clone(),
        or_dash(&e.source),
    ]
}

/// One audit event as JSON; its detail is embedded as JSON when it parses.
pub fn audit_json(e: &AuditEvent) -> Value {
    let detail = if e.detail_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&e.detail_json)
            .unwrap_or_else(|_| Value::String(e.detail_json.clone()))
    };
    json!({
        "sequence": e.sequence,
        "time": timestamp(e.time.as_ref()),
        "action": e.action,
        "actor_user_id": e.actor_user_id,
        "target": e.target,
        "outcome": e.outcome,
        "source": e.source,
        "detail": detail,
        "hash": e.hash,
    })
}

/// One audit event as one line of JSON (JSON Lines), with its final newline.
pub fn audit_jsonl(e: &AuditEvent) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    let mut line = serde_json::to_string(&audit_json(e)).unwrap_or_default();
    line.push('\n');
    line
}

/// A role as the CLI flags name it (`admin`, `auditor`).
pub fn role_name(role: i32) -> &'static str {
    match AdminRole::try_from(role) {
        Ok(AdminRole::Admin) => "admin",
        Ok(AdminRole::Auditor) => "auditor",
        Ok(AdminRole::Unspecified) | Err(_) => "unknown",
    }
}

/// A user's status (`active`, `deactivated`).
pub fn user_status_name(status: i32) -> &'static str {
    match UserStatus::try_from(status) {
        Ok(UserStatus::Active) => "active",
        Ok(UserStatus::Deactivated) => "deactivated",
        Ok(UserStatus::Unspecified) | Err(_) => "unknown",
    }
}

/// Why a review started (`manual`, `scheduled`, `role_change`).
pub fn trigger_name(trigger: i32) -> &'static str {
    match AccessReviewTrigger::try_from(trigger) {
        Ok(AccessReviewTrigger::Manual) => "manual",
        Ok(AccessReviewTrigger::Scheduled) => "scheduled",
        Ok(AccessReviewTrigger::RoleChange) => "role_change",
        Ok(AccessReviewTrigger::Unspecified) | Err(_) => "unknown",
    }
}

/// A review item's decision (`undecided`, `keep`, `revoke`, `expired`).
pub fn decision_name(decision: i32) -> &'static str {
    match AccessReviewDecision::try_from(decision) {
        Ok(AccessReviewDecision::Unspecified) => "undecided",
        Ok(AccessReviewDecision::Keep) => "keep",
        Ok(AccessReviewDecision::Revoke) => "revoke",
        Ok(AccessReviewDecision::Expired) => "expired",
        Err(_) => "unknown",
    }
}

/// `yes` or `no`.
fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// A user's roles for a table cell: `admin until <time>, auditor until <time>`, or `-`.
pub fn roles_cell(roles: &[RoleGrant]) -> String {
    if roles.is_empty() {
        return "-".to_owned();
    }
    roles
        .iter()
        .map(|g| {
            format!(
                "{} until {}",
                role_name(g.role),
                timestamp_cell(g.expires_at.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A role grant as JSON.
pub fn role_grant_json(g: &RoleGrant) -> Value {
    json!({
        "role": role_name(g.role),
        "granted_by_user_id": g.granted_by_user_id,
        "granted_at": timestamp(g.granted_at.as_ref()),
        "expires_at": timestamp(g.expires_at.as_ref()),
    })
}

/// Column headers of [`user_row`].
pub const USER_HEADERS: [&str; 7] = [
    "ID",
    "EMAIL",
    "STATUS",
    "ROLES",
    "MFA",
    "CREATED",
    "LAST LOGIN",
];

/// One user as a table row.
pub fn user_row(u: &User) -> Vec<String> {
    vec![
        u.user_id.clone(),
        u.email.clone(),
        user_status_name(u.status).to_owned(),
        roles_cell(&u.roles),
        yes_no(u.mfa_enrolled),
        timestamp_cell(u.created_at.as_ref()),
        timestamp_cell(u.last_login_at.as_ref()),
    ]
}

/// One user, every field, as `NAME  value` lines.
pub fn user_fields(u: &User) -> String {
    fields(&[
        ("ID", u.user_id.clone()),
        ("EMAIL", u.email.clone()),
        ("STATUS", user_status_name(u.status).to_owned()),
        ("ROLES", roles_cell(&u.roles)),
        ("MFA", yes_no(u.mfa_enrolled)),
        ("CREATED", timestamp_cell(u.created_at.as_ref())),
        ("LAST LOGIN", timestamp_cell(u.last_login_at.as_ref())),
        ("DEACTIVATED", timestamp_cell(u.deactivated_at.as_ref())),
        ("REASON", or_dash(&u.deactivation_reason)),
    ])
}

/// One user as JSON, every field.
pub fn user_json(u: &User) -> Value {
    json!({
        "user_id": u.user_id,
        "email": u.email,
        "status": user_status_name(u.status),
        "roles": u.roles.iter().map(role_grant_json).collect::<Vec<_>>(),
        "mfa_enrolled": u.mfa_enrolled,
        "created_at": timestamp(u.created_at.as_ref()),
        "last_login_at": timestamp(u.last_login_at.as_ref()),
        "deactivated_at": timestamp(u.deactivated_at.as_ref()),
        "deactivation_reason": u.deactivation_reason,
    })
}

/// `open` or `closed`.
fn review_state(r: &AccessReview) -> &'static str {
    if r.closed_at.is_some() {
        "closed"
    } else {
        "open"
    }
}

/// Column headers of [`review_row`].
pub const REVIEW_HEADERS: [&str; 11] = [
    "ID",
    "TRIGGER",
    "STATE",
    "STARTED",
    "DUE",
    "CLOSED",
    "ITEMS",
    "KEPT",
    "REVOKED",
    "EXPIRED",
    "UNDECIDED",
];

/// One access review as a table row.
pub fn review_row(r: &AccessReview) -> Vec<String> {
    vec![
        r.review_id.clone(),
        trigger_name(r.trigger).to_owned(),
        review_state(r).to_owned(),
        timestamp_cell(r.started_at.as_ref()),
        timestamp_cell(r.due_at.as_ref()),
        timestamp_cell(r.closed_at.as_ref()),
        r.items.to_string(),
        r.kept.to_string(),
        r.revoked.to_string(),
        r.expired.to_string(),
        r.undecided.to_string(),
    ]
}

/// One access review, every field, as `NAME  value` lines.
pub fn review_fields(r: &AccessReview) -> String {
    fields(&[
        ("REVIEW", r.review_id.clone()),
        ("TRIGGER", trigger_name(r.trigger).to_owned()),
        ("STATE", review_state(r).to_owned()),
        ("STARTED BY", or_dash(&r.started_by_user_id)),
        ("STARTED", timestamp_cell(r.started_at.as_ref())),
        ("DUE", timestamp_cell(r.due_at.as_ref())),
        ("CLOSED", timestamp_cell(r.closed_at.as_ref())),
        ("ITEMS", r.items.to_string()),
        ("KEPT", r.kept.to_string()),
        ("REVOKED", r.revoked.to_string()),
        ("EXPIRED", r.expired.to_string()),
        ("UNDECIDED", r.undecided.to_string()),
    ])
}

/// One access review as JSON.
pub fn review_json(r: &AccessReview) -> Value {
    json!({
        "review_id": r.review_id,
        "trigger": trigger_name(r.trigger),
        "state": review_state(r),
        "started_by_user_id": r.started_by_user_id,
        "started_at": timestamp(r.started_at.as_ref()),
        "due_at": timestamp(r.due_at.as_ref()),
        "closed_at": timestamp(r.closed_at.as_ref()),
        "items": r.items,
        "kept": r.kept,
        "revoked": r.revoked,
        "expired": r.expired,
        "undecided": r.undecided,
    })
}

/// Column headers of [`review_item_row`].
pub const REVIEW_ITEM_HEADERS: [&str; 9] = [
    "USER ID",
    "EMAIL",
    "ROLE",
    "GRANTED BY",
    "EXPIRES",
    "DECISION",
    "DECIDED BY",
    "DECIDED",
    "NOTE",
];

/// One access review item as a table row.
pub fn review_item_row(i: &AccessReviewItem) -> Vec<String> {
    vec![
        i.user_id.clone(),
        i.email.clone(),
        role_name(i.role).to_owned(),
        or_dash(&i.granted_by_user_id),
        timestamp_cell(i.expires_at.as_ref()),
        decision_name(i.decision).to_owned(),
        or_dash(&i.decided_by_user_id),
        timestamp_cell(i.decided_at.as_ref()),
        or_dash(&i.note),
    ]
}

/// One access review item as JSON.
pub fn review_item_json(i: &AccessReviewItem) -> Value {
    json!({
        "review_id": i.review_id,
        "user_id": i.user_id,
        "email": i.email,
        "role": role_name(i.role),
        "granted_by_user_id": i.granted_by_user_id,
        "granted_at": timestamp(i.granted_at.as_ref()),
        "expires_at": timestamp(i.expires_at.as_ref()),
        "decision": decision_name(i.decision),
        "decided_by_user_id": i.decided_by_user_id,
        "decided_at": timestamp(i.decided_at.as_ref()),
        "note": i.note,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["ID", "NAME"],
            &[
                vec!["1".into(), "alpha".into()],
                vec!["100".into(), "b".into()],
            ],
        );
        assert_eq!(text, "ID   NAME\n1    alpha\n100  b\n");
    }

    #[test]
    fn fields_align_names() {
        assert_eq!(
            fields(&[("A", "1".into()), ("LONG", "2".into())]),
            "A     1\nLONG  2\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let ts = prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 0,
        };
        assert_eq!(timestamp(Some(&ts)).unwrap(), "2026-01-01T00:00:00Z");
        assert_eq!(timestamp(None), None);
        assert_eq!(timestamp_cell(None), "-");
    }

    #[test]
    fn control_characters_are_escaped() {
        let text = table(&["X"], &[vec!["evil\u{1b}]0;title\u{7}".into()]]);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        assert!(text.contains("evil\\u{1b}]0;title\\u{7}"), "{text}");
    }

    #[test]
    fn enums_have_friendly_names() {
        assert_eq!(phase_name(TenantPhase::Ready as i32), "Ready");
        assert_eq!(phase_name(99), "Unknown");
        assert_eq!(plan_name(Plan::Unspecified as i32), "free");
        assert_eq!(plan_name(Plan::Enterprise as i32), "enterprise");
    }

    #[test]
    fn access_enums_are_lowercase_words() {
        assert_eq!(role_name(AdminRole::Admin as i32), "admin");
        assert_eq!(role_name(AdminRole::Auditor as i32), "auditor");
        assert_eq!(user_status_name(UserStatus::Active as i32), "active");
        assert_eq!(
            user_status_name(UserStatus::Deactivated as i32),
            "deactivated"
        );
        assert_eq!(trigger_name(AccessReviewTrigger::Manual as i32), "manual");
        assert_eq!(
            trigger_name(AccessReviewTrigger::Scheduled as i32),
            "scheduled"
        );
        assert_eq!(
            trigger_name(AccessReviewTrigger::RoleChange as i32),
            "role_change"
        );
        assert_eq!(
            decision_name(AccessReviewDecision::Unspecified as i32),
            "undecided"
        );
        assert_eq!(decision_name(AccessReviewDecision::Keep as i32), "keep");
        assert_eq!(decision_name(AccessReviewDecision::Revoke as i32), "revoke");
        assert_eq!(
            decision_name(AccessReviewDecision::Expired as i32),
            "expired"
        );
        assert_eq!(role_name(42), "unknown");
    }

    #[test]
    fn roles_show_their_expiry() {
        let grant = RoleGrant {
            role: AdminRole::Auditor as i32,
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            ..RoleGrant::default()
        };
        assert_eq!(roles_cell(&[]), "-");
        assert_eq!(
            roles_cell(std::slice::from_ref(&grant)),
            "auditor until 2026-01-01T00:00:00Z"
        );
        let u = User {
            roles: vec![grant],
            ..User::default()
        };
        assert_eq!(
            user_json(&u)["roles"][0]["expires_at"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(user_json(&u)["last_login_at"], Value::Null);
    }

    #[test]
    fn jsonl_is_one_line_per_event() {
        let e = AuditEvent {
            sequence: 7,
            action: "a\nb".into(),
            detail_json: "{\"k\":\"v\"}".into(),
            ..AuditEvent::default()
        };
        let line = audit_jsonl(&e);
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["detail"]["k"], "v");
    }

    #[test]
    fn audit_detail_is_embedded_as_json() {
        let e = AuditEvent {
            sequence: 3,
            detail_json: r#"{"email":"a@example.com"}"#.into(),
            ..AuditEvent::default()
        };
        assert_eq!(audit_json(&e)["detail"]["email"], "a@example.com");
    }
}
