//! What a mail says: the notices the API sends, which audited events cause them, and their
//! plain-text and HTML renderings. Pure.
//!
//! A notice is stored in the outbox as JSON (kind and non-secret parameters) and rendered
//! when it is sent; the one secret, a verification token, is stored sealed with the master
//! key and opened only to render the link. Bodies hold no secret but that link, no tracking
//! (no remote image, no per-recipient link but the verification one) and no address.

use serde::{Deserialize, Serialize};

use crate::store::AuditRecord;

/// One mail to one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// The link that verifies the address; `token_sealed` is the raw token sealed with the
    /// master key under [`VERIFY_TOKEN_CONTEXT`].
    VerifyEmail {
        /// The sealed token.
        token_sealed: String,
    },
    /// The password changed (all sessions ended).
    PasswordChanged,
    /// TOTP was enrolled.
    MfaEnrolled,
    /// TOTP was turned off (recovery codes deleted).
    MfaRemoved,
    /// A recovery code was used to sign in.
    RecoveryCodeUsed,
    /// A platform role was granted or renewed.
    RoleGranted {
        /// `admin` or `auditor`.
        role: String,
        /// Expiry, Unix ms.
        expires_at_ms: i64,
    },
    /// A platform role was taken away (revoked, by a review, or expired).
    RoleRevoked {
        /// `admin` or `auditor`.
        role: String,
        /// `revoked`, `access review` or `expired`.
        how: String,
    },
    /// The user's instance has been Degraded for a while.
    InstanceDegraded {
        /// Tenant name.
        tenant: String,
        /// Minutes it has been Degraded.
        minutes: i64,
    },
    /// The user's instance is Ready again after a Degraded notice.
    InstanceRecovered {
        /// Tenant name.
        tenant: String,
    },
}

/// The sealing context of verification tokens in the outbox.
pub const VERIFY_TOKEN_CONTEXT: &str = "mail.verify_email";

impl Notice {
    /// The kind, as metrics and logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::VerifyEmail { .. } => "verify_email",
            Notice::PasswordChanged => "password_changed",
            Notice::MfaEnrolled => "mfa_enrolled",
            Notice::MfaRemoved => "mfa_removed",
            Notice::RecoveryCodeUsed => "recovery_code_used",
            Notice::RoleGranted { .. } => "role_granted",
            Notice::RoleRevoked { .. } => "role_revoked",
            Notice::InstanceDegraded { .. } => "instance_degraded",
            Notice::InstanceRecovered { .. } => "instance_recovered",
        }
    }
}

fn detail_field(record: &AuditRecord, key: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&record.detail_json)
        .ok()?
        .get(key)
        .cloned()
}

fn detail_str(record: &AuditRecord, key: &str) -> Option<String> {
    detail_field(record, key)?.as_str().map(str::to_owned)
}

/// The notice an audited event causes, and to whom (a user id); `None` for the others.
/// The outbox row is written with the audit row, in the same transaction, so a notice is
/// sent exactly when its event is recorded.
pub fn notice_for(record: &AuditRecord) -> Option<(String, Notice)> {
    use crate::access::actions as access;
    use crate::service::account::actions as account;
    use crate::service::mfa::actions as mfa;
    if !record.success {
        return None;
    }
    let target = || record.target.clone();
    match record.action {
        a if a == account::PASSWORD_CHANGED => Some((target(), Notice::PasswordChanged)),
        a if a == mfa::ENROLLED => Some((target(), Notice::MfaEnrolled)),
        a if a == mfa::REMOVED => Some((target(), Notice::MfaRemoved)),
        a if a == mfa::VERIFIED => (detail_str(record, "method").as_deref()
            == Some("recovery_code"))
        .then(|| (target(), Notice::RecoveryCodeUsed)),
        a if a == access::ROLE_GRANT => Some((
            target(),
            Notice::RoleGranted {
                role: detail_str(record, "role")?,
                expires_at_ms: detail_field(record, "expires_at_ms")?.as_i64()?,
            },
        )),
        a if a == access::ROLE_REVOKE => (detail_field(record, "held")
            == Some(serde_json::Value::Bool(true)))
        .then(|| {
            Some((
                target(),
                Notice::RoleRevoked {
                    role: detail_str(record, "role")?,
                    how: "revoked".into(),
                },
            ))
        })
        .flatten(),
        a if a == access::ROLE_EXPIRED => Some((
            target(),
            Notice::RoleRevoked {
                role: detail_str(record, "role")?,
                how: "expired".into(),
            },
        )),
        a if a == access::REVIEW_DECIDE => {
            let decision = detail_str(record, "decision")?;
            let removed = decision == "revoke"
                || (decision == "expired"
                    && detail_field(record, "grant_removed")
                        == Some(serde_json::Value::Bool(true)));
            removed.then_some(())?;
            Some((
                detail_str(record, "user_id")?,
                Notice::RoleRevoked {
                    role: detail_str(record, "role")?,
                    how: "access review".into(),
                },
            ))
        }
        _ => None,
    }
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Subject line.
    pub subject: String,
    /// text/plain body.
    pub text: String,
    /// text/html body.
    pub html: String,
}

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn when(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|_| "unknown".into())
}

const NOT_YOU: &str = "If this was not you, contact your administrator at once.";

/// Renders `notice`; `verify_link` is the verification URL (only for [`Notice::VerifyEmail`]).
pub fn render(notice: &Notice, public_url: &str, verify_link: Option<&str>) -> Rendered {
    let (subject, paragraphs, link): (String, Vec<String>, Option<(String, String)>) =
        match notice {
            Notice::VerifyEmail { .. } => (
                "Verify your email address".into(),
                vec![
                    "Please confirm that this address belongs to you. The link works once and for 24 hours.".into(),
                    "If you did not sign up, ignore this mail.".into(),
                ],
                verify_link.map(|l| (l.to_owned(), "Verify my address".to_owned())),
            ),
            Notice::PasswordChanged => (
                "Your password was changed".into(),
                vec![
                    "The password of your account was changed, and every session was signed out.".into(),
                    NOT_YOU.into(),
                ],
                None,
            ),
            Notice::MfaEnrolled => (
                "Two-factor authentication was turned on".into(),
                vec![
                    "An authenticator app was enrolled as the second factor of your account.".into(),
                    NOT_YOU.into(),
                ],
                None,
            ),
            Notice::MfaRemoved => (
                "Two-factor authentication was turned off".into(),
                vec![
                    "The authenticator app and the recovery codes of your account were removed: signing in needs only your password now.".into(),
                    NOT_YOU.into(),
                ],
                None,
            ),
            Notice::RecoveryCodeUsed => (
                "A recovery code was used".into(),
                vec![
                    "One of your recovery codes was just used as a second factor. Each code works once.".into(),
                    NOT_YOU.into(),
                ],
                None,
            ),
            Notice::RoleGranted {
                role,
                expires_at_ms,
            } => (
                format!("You were granted the {role} role"),
                vec![
                    format!(
                        "Your account now holds the platform role {role}, until {}.",
                        when(*expires_at_ms)
                    ),
                    NOT_YOU.into(),
                ],
                None,
            ),
            Notice::RoleRevoked { role, how } => (
                format!("Your {role} role was removed"),
                vec![format!(
                    "Your account no longer holds the platform role {role} ({how})."
                )],
                None,
            ),
            Notice::InstanceDegraded { tenant, minutes } => (
                format!("Your instance {tenant} is degraded"),
                vec![format!(
                    "Your instance {tenant} has not been healthy for {minutes} minutes. We will write again when it is back."
                )],
                None,
            ),
            Notice::InstanceRecovered { tenant } => (
                format!("Your instance {tenant} is back"),
                vec![format!("Your instance {tenant} is Ready again.")],
                None,
            ),
        };
    let mut text = String::new();
    for p in &paragraphs {
        text.push_str(p);
        text.push_str("\n\n");
    }
    if let Some((url, _)) = &link {
        text.push_str(url);
        text.push_str("\n\n");
    }
    text.push_str("-- \nTenantry ");
    text.push_str(public_url);
    text.push('\n');
    let mut html =
        String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body>\n");
    for p in &paragraphs {
        html.push_str(&format!("<p>{}</p>\n", esc(p)));
    }
    if let Some((url, label)) = &link {
        html.push_str(&format!(
            "<p><a href=\"{}\">{}</a></p>\n<p>{}</p>\n",
            esc(url),
            esc(label),
            esc(url)
        ));
    }
    html.push_str(&format!(
        "<p>&#8212;<br>Tenantry {}</p>\n</body></html>\n",
        esc(public_url)
    ));
    Rendered {
        subject,
        text,
        html,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::service::detail;

    fn record(action: &'static str, target: &str, detail_json: String) -> AuditRecord {
        AuditRecord {
            action,
            actor_user_id: "actor".into(),
            target: target.into(),
            success: true,
            source: String::new(),
            detail_json,
        }
    }

    #[test]
    fn security_events_notify_the_affected_user() {
        let n = |r: AuditRecord| notice_for(&r);
        assert_eq!(
            n(record("password.changed", "u1", String::new())),
            Some(("u1".into(), Notice::PasswordChanged))
        );
        let failed = AuditRecord {
            success: false,
            ..record("password.changed", "u1", String::new())
        };
        assert_eq!(n(failed), None);
        assert_eq!(
            n(record(
                "mfa.verified",
                "u1",
                detail(&[("method", "totp".into())])
            )),
            None
        );
        assert_eq!(
            n(record(
                "mfa.verified",
                "u1",
                detail(&[("method", "recovery_code".into())])
            )),
            Some(("u1".into(), Notice::RecoveryCodeUsed))
        );
        assert_eq!(
            n(record(
                "admin.role.grant",
                "u2",
                detail(&[("role", "admin".into()), ("expires_at_ms", 5.into())])
            )),
            Some((
                "u2".into(),
                Notice::RoleGranted {
                    role: "admin".into(),
                    expires_at_ms: 5
                }
            ))
        );
        // Revoking a role the user did not hold tells them nothing.
        assert_eq!(
            n(record(
                "admin.role.revoke",
                "u2",
                detail(&[("role", "admin".into()), ("held", false.into())])
            )),
            None
        );
        assert_eq!(
            n(record(
                "admin.access_review.decide",
                "review-1",
                detail(&[
                    ("user_id", "u3".into()),
                    ("role", "auditor".into()),
                    ("decision", "revoke".into())
                ])
            ))
            .unwrap()
            .0,
            "u3"
        );
        assert_eq!(n(record("login.succeeded", "u1", String::new())), None);
    }

    #[test]
    fn bodies_escape_html_and_carry_no_tracking() {
        let r = render(
            &Notice::InstanceDegraded {
                tenant: "<acme>".into(),
                minutes: 15,
            },
            "https://portal.example.com",
            None,
        );
        assert!(r.html.contains("&lt;acme&gt;"));
        assert!(!r.html.contains("<img"));
        assert!(r.text.contains("<acme>"));
        let v = render(
            &Notice::VerifyEmail {
                token_sealed: "sealed".into(),
            },
            "https://p",
            Some("https://p/verify-email?token=abc"),
        );
        assert!(v.text.contains("https://p/verify-email?token=abc"));
        assert!(!v.text.contains("sealed"));
    }

    #[test]
    fn notices_round_trip_as_json() {
        let n = Notice::RoleRevoked {
            role: "admin".into(),
            how: "expired".into(),
        };
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.contains("\"kind\":\"role_revoked\""));
        assert_eq!(serde_json::from_str::<Notice>(&json).unwrap(), n);
    }
}
