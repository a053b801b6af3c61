//! How results look: aligned plain-text tables for people, JSON for scripts. Pure functions
//! from protobuf messages to strings and `serde_json::Value`s; `commands` does the printing.

use serde_json::{Value, json};
use tenantry_proto::v1::{AuditEvent, Plan, RetentionPolicy, Tenant, TenantPhase};

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
    fn audit_detail_is_embedded_as_json() {
        let e = AuditEvent {
            sequence: 3,
            detail_json: r#"{"email":"a@example.com"}"#.into(),
            ..AuditEvent::default()
        };
        assert_eq!(audit_json(&e)["detail"]["email"], "a@example.com");
    }
}
