//! The pages, as maud templates: pure functions from what a page shows to its HTML. No
//! inline script or style (the CSP forbids both); every control carries the `data-testid`
//! the tests and the docs name, and every input a label.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use tenantry_proto::phase::TenantPhase;
use tenantry_proto::retention::{MAX_MAX_COUNT, Plan};
use tenantry_proto::v1::Tenant;

/// The password rules, as the API applies them, shown before submit.
pub const PASSWORD_RULES: &str = "12 to 256 characters. Common or easily guessed passwords, \
     and ones built from your email address, are refused.";

/// What every page has around its content.
pub struct Frame<'a> {
    /// The document title (before " · Tenantry").
    pub title: &'a str,
    /// Whether to show the signed-in navigation.
    pub signed_in: bool,
    /// A failure to show in the `error` alert.
    pub error: Option<&'a str>,
    /// A success message to show in the `notice` status.
    pub notice: Option<&'a str>,
    /// Reload the page every few seconds (while an instance is not ready yet).
    pub refresh: bool,
}

impl<'a> Frame<'a> {
    /// A frame with `title` and nothing else.
    pub fn new(title: &'a str) -> Frame<'a> {
        Frame {
            title,
            signed_in: false,
            error: None,
            notice: None,
            refresh: false,
        }
    }
}

/// How many seconds a not-yet-ready dashboard waits before it reloads itself.
pub const REFRESH_SECONDS: u32 = 2;

fn layout(frame: &Frame<'_>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if frame.refresh {
                    meta http-equiv="refresh" content=(REFRESH_SECONDS);
                }
                title { (frame.title) " · Tenantry" }
                link rel="stylesheet" href="/static/portal.css";
            }
            body {
                header {
                    a.brand href="/" { "Tenantry" }
                    nav aria-label="Main" {
                        @if frame.signed_in {
                            a href="/" data-testid="nav-dashboard" { "Dashboard" }
                            a href="/mfa" data-testid="nav-mfa" { "Two-factor" }
                            a href="/account" data-testid="nav-account" { "Account" }
                        } @else {
                            a href="/login" data-testid="nav-login" { "Sign in" }
                            a href="/signup" data-testid="nav-signup" { "Sign up" }
                        }
                    }
                }
                main {
                    h1 { (frame.title) }
                    @if let Some(error) = frame.error {
                        p.error role="alert" data-testid="error" { (error) }
                    }
                    @if let Some(notice) = frame.notice {
                        p.notice role="status" data-testid="notice" { (notice) }
                    }
                    (content)
                }
            }
        }
    }
}

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// What the signup form shows again after a refusal (never the password).
#[derive(Debug, Default)]
pub struct SignupForm<'a> {
    /// The email typed.
    pub email: &'a str,
    /// The tenant name typed.
    pub tenant: &'a str,
    /// The plan chosen.
    pub plan: Option<Plan>,
}

/// `/signup`.
pub fn signup(csrf: &str, form: &SignupForm<'_>, error: Option<&str>) -> Markup {
    let frame = Frame {
        error,
        ..Frame::new("Sign up")
    };
    let chosen = form.plan.unwrap_or_default();
    layout(
        &frame,
        html! {
            form method="post" action="/signup" {
                (csrf_field(csrf))
                label for="email" { "Email" }
                input #email type="email" name="email" required autocomplete="email"
                    value=(form.email) data-testid="signup-email";
                label for="password" { "Password" }
                input #password type="password" name="password" required minlength="12"
                    maxlength="256" autocomplete="new-password" aria-describedby="password-rules"
                    data-testid="signup-password";
                p #password-rules.hint data-testid="password-rules" { (PASSWORD_RULES) }
                label for="tenant" { "Tenant name" }
                input #tenant type="text" name="tenant" required minlength="3" maxlength="40"
                    pattern="[a-z][a-z0-9-]*[a-z0-9]" autocomplete="off" aria-describedby="tenant-rules"
                    value=(form.tenant) data-testid="signup-tenant";
                p #tenant-rules.hint {
                    "3 to 40 lowercase letters, digits and '-', starting with a letter; your instance's name."
                }
                label for="plan" { "Plan" }
                select #plan name="plan" data-testid="signup-plan" {
                    @for plan in Plan::ALL {
                        option value=(plan.as_str()) selected[plan == chosen] {
                            (plan_label(plan)) " (data kept up to " (plan.max_age_hours_cap() / 24) " days)"
                        }
                    }
                }
                button type="submit" data-testid="signup-submit" { "Create my instance" }
            }
            p { "Already signed up? " a href="/login" { "Sign in" } }
        },
    )
}

/// `/login`.
pub fn login(
    csrf: &str,
    email: &str,
    error: Option<&str>,
    notice: Option<&str>,
    next: Option<&str>,
) -> Markup {
    let frame = Frame {
        error,
        notice,
        ..Frame::new("Sign in")
    };
    layout(
        &frame,
        html! {
            form method="post" action="/login" {
                (csrf_field(csrf))
                @if let Some(next) = next {
                    input type="hidden" name="next" value=(next);
                }
                label for="email" { "Email" }
                input #email type="email" name="email" required autocomplete="username"
                    value=(email) data-testid="login-email";
                label for="password" { "Password" }
                input #password type="password" name="password" required
                    autocomplete="current-password" data-testid="login-password";
                button type="submit" data-testid="login-submit" { "Sign in" }
            }
            p { "New here? " a href="/signup" { "Sign up" } }
        },
    )
}

/// `/login/mfa`.
pub fn login_mfa(csrf: &str, error: Option<&str>) -> Markup {
    let frame = Frame {
        error,
        ..Frame::new("Second factor")
    };
    layout(
        &frame,
        html! {
            form method="post" action="/login/mfa" {
                (csrf_field(csrf))
                label for="code" { "Code from your authenticator app, or a recovery code" }
                input #code type="text" name="code" required autocomplete="one-time-code"
                    inputmode="text" data-testid="mfa-code";
                button type="submit" data-testid="mfa-submit" { "Verify" }
            }
        },
    )
}

fn plan_label(plan: Plan) -> &'static str {
    match plan {
        Plan::Free => "Free",
        Plan::Standard => "Standard",
        Plan::Enterprise => "Enterprise",
    }
}

fn plan_of(tenant: &Tenant) -> Plan {
    match tenantry_proto::v1::Plan::try_from(tenant.plan) {
        Ok(tenantry_proto::v1::Plan::Standard) => Plan::Standard,
        Ok(tenantry_proto::v1::Plan::Enterprise) => Plan::Enterprise,
        _ => Plan::Free,
    }
}

/// The phase as people read it ("Ready").
pub fn phase_label(phase: i32) -> &'static str {
    match TenantPhase::from_proto(phase) {
        Some(TenantPhase::Pending) => "Pending",
        Some(TenantPhase::Provisioning) => "Provisioning",
        Some(TenantPhase::Ready) => "Ready",
        Some(TenantPhase::Suspended) => "Suspended",
        Some(TenantPhase::Degraded) => "Degraded",
        Some(TenantPhase::Terminating) => "Terminating",
        Some(TenantPhase::AwaitingVerification) => "Awaiting verification",
        None => "Unknown",
    }
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    let ts = jiff::Timestamp::new(t.seconds, 0).ok()?;
    Some(ts.strftime("%Y-%m-%d %H:%M UTC").to_string())
}

/// `/`: the signed-in dashboard of one tenant.
pub fn dashboard(
    csrf: &str,
    tenant: &Tenant,
    error: Option<&str>,
    notice: Option<&str>,
    unverified: bool,
) -> Markup {
    let ready = TenantPhase::from_proto(tenant.phase) == Some(TenantPhase::Ready);
    let settling = matches!(
        TenantPhase::from_proto(tenant.phase),
        Some(TenantPhase::Pending | TenantPhase::Provisioning) | None
    );
    let frame = Frame {
        signed_in: true,
        error,
        notice,
        refresh: settling,
        ..Frame::new("Your instance")
    };
    let policy = tenant.retention.unwrap_or_default();
    let plan = plan_of(tenant);
    let cap = plan.max_age_hours_cap();
    layout(
        &frame,
        html! {
            @if unverified {
                section.banner role="status" data-testid="verify-banner" {
                    p { "Verify your email address: open the link we mailed you. Your instance is provisioned once your address is verified." }
                    form method="post" action="/verify-email/resend" {
                        (csrf_field(csrf))
                        button type="submit" data-testid="resend-verification" { "Send the link again" }
                    }
                }
            }
            dl.facts {
                dt { "Tenant" }
                dd data-testid="tenant-name" { (tenant.name) }
                dt { "Status" }
                dd data-testid="tenant-phase" aria-live="polite" { (phase_label(tenant.phase)) }
                @if !tenant.message.is_empty() && !ready {
                    dt { "Detail" }
                    dd data-testid="tenant-message" { (tenant.message) }
                }
                dt { "Address" }
                dd {
                    @if ready && !tenant.endpoint.is_empty() {
                        a href=(tenant.endpoint) data-testid="tenant-endpoint" rel="noopener" { (tenant.endpoint) }
                    } @else {
                        span data-testid="tenant-endpoint" { "available once the instance is ready" }
                    }
                }
                dt { "Certificate valid until" }
                dd data-testid="tenant-cert-expiry" {
                    (timestamp(tenant.certificate.as_ref().and_then(|c| c.not_after.as_ref()))
                        .unwrap_or_else(|| "not issued yet".into()))
                }
                dt { "Plan" }
                dd data-testid="tenant-plan" { (plan_label(plan)) }
            }
            @if settling {
                p.hint { "This page refreshes itself until your instance is ready." }
            }
            h2 { "Data retention" }
            form method="post" action="/retention" {
                (csrf_field(csrf))
                input type="hidden" name="tenant_id" value=(tenant.tenant_id);
                label for="max_age_hours" { "Delete executions older than (hours)" }
                input #max_age_hours type="number" name="max_age_hours" required min="1"
                    max=(cap) value=(policy.max_age_hours)
                    aria-describedby="age-cap" data-testid="retention-max-age-hours";
                p #age-cap.hint data-testid="retention-max-age-cap" {
                    "Your plan allows at most " (cap) " hours (" (cap / 24) " days)."
                }
                label for="max_count" { "Keep at most (executions)" }
                input #max_count type="number" name="max_count" required min="1"
                    max=(MAX_MAX_COUNT) value=(policy.max_count)
                    aria-describedby="count-cap" data-testid="retention-max-count";
                p #count-cap.hint data-testid="retention-max-count-cap" {
                    "At most " (MAX_MAX_COUNT) " executions."
                }
                button type="submit" data-testid="retention-save" { "Save retention" }
            }
        },
    )
}

/// A verification link that did not work (used, expired, not this user's), or a resend
/// that was refused.
pub fn verify_failed(message: &str) -> Markup {
    let frame = Frame {
        error: Some(message),
        ..Frame::new("Email verification")
    };
    layout(
        &frame,
        html! {
            p data-testid="verify-failed" {
                "Sign in and use " strong { "Send the link again" } " on your dashboard for a new link."
            }
            p { a href="/" { "Back to the dashboard" } }
        },
    )
}

/// A signed-in user who is a member of no tenant.
pub fn no_tenant() -> Markup {
    let frame = Frame {
        signed_in: true,
        ..Frame::new("Your instance")
    };
    layout(
        &frame,
        html! { p data-testid="no-tenant" { "Your account has no tenant." } },
    )
}

/// `/mfa` before enrollment starts, or once TOTP is on.
pub fn mfa(csrf: &str, enrolled: bool, error: Option<&str>, notice: Option<&str>) -> Markup {
    let frame = Frame {
        signed_in: true,
        error,
        notice,
        ..Frame::new("Two-factor authentication")
    };
    layout(
        &frame,
        html! {
            @if enrolled {
                p data-testid="mfa-enrolled" { "Two-factor authentication is on. Sign-ins ask for a code from your authenticator app." }
                h2 { "Turn it off" }
                p { "Your password and a code from the app (or a recovery code, if you lost the app) turn it off; the recovery codes stop working, and we tell you by email." }
                form method="post" action="/mfa/remove" {
                    (csrf_field(csrf))
                    label for="remove-password" { "Password" }
                    input #remove-password type="password" name="password" required
                        autocomplete="current-password" data-testid="mfa-remove-password";
                    label for="remove-code" { "Code from the app, or a recovery code" }
                    input #remove-code type="text" name="code" required
                        autocomplete="one-time-code" data-testid="mfa-remove-code";
                    button type="submit" data-testid="mfa-remove" { "Turn off two-factor authentication" }
                }
            } @else {
                p { "Protect your account with a code from an authenticator app at every sign-in." }
                form method="post" action="/mfa/enroll" {
                    (csrf_field(csrf))
                    button type="submit" data-testid="mfa-enroll" { "Set up an authenticator app" }
                }
            }
        },
    )
}

/// `/mfa` during enrollment: the QR code, the secret and the confirmation form.
pub fn mfa_enroll(csrf: &str, secret: &str, otpauth_uri: &str, error: Option<&str>) -> Markup {
    let frame = Frame {
        signed_in: true,
        error,
        ..Frame::new("Two-factor authentication")
    };
    layout(
        &frame,
        html! {
            p { "Scan this code with your authenticator app, or type the secret below into it." }
            figure.qr data-testid="mfa-qr" role="img" aria-label="QR code of the authenticator secret" {
                @if let Some(svg) = qr_svg(otpauth_uri) {
                    (PreEscaped(svg))
                }
            }
            p { "Secret: " code data-testid="mfa-secret" { (secret) } }
            form method="post" action="/mfa/confirm" {
                (csrf_field(csrf))
                input type="hidden" name="secret" value=(secret);
                input type="hidden" name="otpauth_uri" value=(otpauth_uri);
                label for="code" { "Code from the app" }
                input #code type="text" name="code" required inputmode="numeric"
                    pattern="[0-9]{6}" autocomplete="one-time-code" data-testid="mfa-confirm-code";
                button type="submit" data-testid="mfa-confirm" { "Turn on" }
            }
        },
    )
}

/// The recovery codes, shown once after enrollment.
pub fn recovery_codes(codes: &[String]) -> Markup {
    let frame = Frame {
        signed_in: true,
        notice: Some("Two-factor authentication is on."),
        ..Frame::new("Recovery codes")
    };
    let text: String = codes.iter().map(|c| format!("{c}\n")).collect();
    let href = format!("data:text/plain;charset=utf-8,{}", percent_encode(&text));
    layout(
        &frame,
        html! {
            p { "Each code signs you in once if you lose your authenticator. Keep them somewhere safe: this page shows them only now." }
            ul.codes data-testid="recovery-codes" {
                @for code in codes { li { code { (code) } } }
            }
            p {
                a href=(href) download="tenantry-recovery-codes.txt" data-testid="recovery-codes-download" {
                    "Download the codes"
                }
            }
            p { a href="/" { "Continue to your instance" } }
        },
    )
}

/// Percent-encodes everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `/account`.
pub fn account(csrf: &str, email: &str, error: Option<&str>, notice: Option<&str>) -> Markup {
    let frame = Frame {
        signed_in: true,
        error,
        notice,
        ..Frame::new("Account")
    };
    layout(
        &frame,
        html! {
            p { "Signed in as " strong data-testid="account-email" { (email) } }
            h2 { "Change password" }
            form method="post" action="/account/password" {
                (csrf_field(csrf))
                label for="current" { "Current password" }
                input #current type="password" name="current" required
                    autocomplete="current-password" data-testid="password-current";
                label for="new" { "New password" }
                input #new type="password" name="new" required minlength="12" maxlength="256"
                    autocomplete="new-password" aria-describedby="password-rules"
                    data-testid="password-new";
                p #password-rules.hint { (PASSWORD_RULES) " Changing it signs you out everywhere." }
                button type="submit" data-testid="password-save" { "Change password" }
            }
            h2 { "Sign out" }
            form method="post" action="/logout" {
                (csrf_field(csrf))
                button type="submit" data-testid="logout" { "Sign out" }
            }
        },
    )
}

/// A tenant that does not exist or is someone else's: one page for both.
pub fn not_found(signed_in: bool) -> Markup {
    let frame = Frame {
        signed_in,
        error: Some("tenant not found"),
        ..Frame::new("Not found")
    };
    layout(
        &frame,
        html! { p { a href="/" { "Back to your instance" } } },
    )
}

/// A form that came without this visit's CSRF token.
pub fn refused() -> Markup {
    let frame = Frame {
        error: Some(
            "This form expired or did not come from this site. Reload the page and try again.",
        ),
        ..Frame::new("Request refused")
    };
    layout(&frame, html! { p { a href="/" { "Start again" } } })
}

/// A page that could not be shown, with the reason.
pub fn unavailable(message: &str) -> Markup {
    let frame = Frame {
        signed_in: true,
        error: Some(message),
        ..Frame::new("Your instance")
    };
    layout(&frame, html! { p { a href="/" { "Try again" } } })
}

/// Something failed on the portal's side (the cause is in its log).
pub fn internal_error() -> Markup {
    let frame = Frame {
        error: Some("Something went wrong on our side; try again in a moment."),
        ..Frame::new("Error")
    };
    layout(&frame, html! { p { a href="/" { "Start again" } } })
}

/// The QR code of `uri` as inline SVG (no XML declaration), or `None` if it does not fit.
pub fn qr_svg(uri: &str) -> Option<String> {
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .build();
    let start = svg.find("<svg")?;
    Some(svg[start..].to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_people_typed_and_carry_no_inline_script() {
        let form = SignupForm {
            email: "\"><script>alert(1)</script>",
            tenant: "acme",
            plan: Some(Plan::Standard),
        };
        let page = signup("tok", &form, Some("<b>taken</b>")).into_string();
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;b&gt;taken"));
        assert!(page.contains(r#"value="standard" selected"#));
        assert!(!page.contains("style="));
        assert!(
            page.contains(r#"data-testid="error" "#) || page.contains(r#"data-testid="error">"#)
        );
    }

    #[test]
    fn the_qr_code_is_inline_svg() {
        let svg = qr_svg("otpauth://totp/Tenantry:a%40b.c?secret=ABC&issuer=Tenantry").unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(!svg.contains("<script") && !svg.contains("style="));
    }

    #[test]
    fn recovery_codes_download_as_text() {
        let page = recovery_codes(&["ab-12".into(), "cd 34".into()]).into_string();
        assert!(page.contains("data:text/plain;charset=utf-8,ab-12%0Acd%2034%0A"));
        assert_eq!(page.matches("<li>").count(), 2);
    }

    #[test]
    fn phases_read_as_words() {
        assert_eq!(phase_label(3), "Ready");
        assert_eq!(phase_label(99), "Unknown");
    }
}
