//! One function per subcommand: call the API, print the result in the chosen format.

use std::path::{Path, PathBuf};

use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use tenantry_client::{Client, Credentials, Trust};
use tenantry_proto::v1::*;

use crate::cli::{
    AccessReviewCommand, AdminsCommand, AuditCommand, AuditFilter, Cli, Command, DEFAULT_SERVER,
    ExportFormat, Format, GlobalArgs, LoginArgs, MfaCommand, RetentionCommand, Role, RoleFilter,
    SessionsCommand, StatusFilter, TenantsCommand, UsersCommand,
};
use crate::client::{Api, FactorSource};
use crate::error::{Error, Result};
use crate::output::{
    self, AUDIT_HEADERS, REVIEW_HEADERS, REVIEW_ITEM_HEADERS, TENANT_HEADERS, USER_HEADERS,
};
use crate::prompt;
use crate::session::{self, Session};

/// Runs the parsed command line. `xdg_config_home` and `home` locate the default session
/// file.
pub async fn run(cli: Cli, xdg_config_home: Option<PathBuf>, home: Option<PathBuf>) -> Result<()> {
    let Cli { global, command } = cli;
    let session_file = session::path(global.session_file.as_deref(), xdg_config_home, home)?;
    let out = Printer {
        format: global.output,
    };
    match command {
        Command::Login(args) => login(&global, &session_file, args, out).await,
        Command::Logout => logout(&global, &session_file, out).await,
        command => {
            let api = open(&global, &session_file).await?;
            match command {
                Command::Whoami => whoami(&api, out).await,
                Command::Mfa(MfaCommand::Enroll) => mfa_enroll(&api, out).await,
                Command::Mfa(MfaCommand::Remove { password_stdin }) => {
                    mfa_remove(&api, password_stdin, out).await
                }
                Command::Tenants(c) => tenants(&api, c, out).await,
                Command::Retention(c) => retention(&api, c, out).await,
                Command::Audit(c) => audit(&api, c, out).await,
                Command::Admins(c) => admins(&api, c, out).await,
                Command::Sessions(c) => sessions(&api, c, out).await,
                Command::Users(c) => users(&api, c, out).await,
                Command::AccessReview(c) => access_review(&api, c, out).await,
                // Handled above; they do not need a saved session.
                Command::Login(_) | Command::Logout => Ok(()),
            }
        }
    }
}

/// Prints results as tables or JSON.
#[derive(Clone, Copy)]
struct Printer {
    format: Format,
}

impl Printer {
    /// Prints `json()` in JSON mode, else `text()`.
    fn emit(self, text: impl FnOnce() -> String, json: impl FnOnce() -> Value) {
        match self.format {
            Format::Table => print!("{}", text()),
            Format::Json => print!("{}", output::json(&json())),
        }
    }
}

/// The server for a command: `--server`, else the saved session's, else the default.
fn server_for(global: &GlobalArgs, saved: Option<&Session>) -> String {
    global
        .server
        .clone()
        .or_else(|| saved.map(|s| s.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
}

fn factor_source(global: &GlobalArgs) -> FactorSource {
    FactorSource {
        totp_code: global.totp_code.clone(),
        recovery_code: global.recovery_code.clone(),
    }
}

/// The TLS trust settings of the global flags.
fn trust(global: &GlobalArgs) -> Trust<'_> {
    Trust {
        ca_file: global.ca_file.as_deref(),
        server_name: global.tls_server_name.as_deref(),
    }
}

/// Connects with the saved session; refuses to send its token to another server.
async fn open(global: &GlobalArgs, session_file: &Path) -> Result<Api> {
    let saved = session::load(session_file)?;
    let server = server_for(global, Some(&saved));
    if server.trim_end_matches('/') != saved.server.trim_end_matches('/') {
        return Err(Error::OtherServer {
            saved: saved.server,
            wanted: server,
        });
    }
    let channel = tenantry_client::connect(&server, trust(global)).await?;
    Api::new(channel, &saved, factor_source(global))
}

async fn login(
    global: &GlobalArgs,
    session_file: &Path,
    args: LoginArgs,
    out: Printer,
) -> Result<()> {
    let server = server_for(global, None);
    let channel = tenantry_client::connect(&server, trust(global)).await?;
    let email = match args.email {
        Some(email) => email,
        None => prompt::line("Email: ")?
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .ok_or_else(|| Error::Usage("an email is required (--email)".into()))?,
    };
    let password = prompt::password(args.password_stdin)?;
    let resp = Client::new(channel.clone(), Credentials::default())
        .accounts()
        .login(LoginRequest {
            email: email.clone(),
            password: password.expose_secret().to_owned(),
        })
        .await?
        .into_inner();
    drop(password);
    let session = Session {
        server: server.clone(),
        token: secrecy::SecretString::from(resp.session_token),
        expires_at: output::timestamp(resp.expires_at.as_ref()),
    };
    let api = Api::new(channel, &session, factor_source(global))?;
    if resp.mfa_required {
        let verified = match api.factor().get("this account has TOTP enrolled") {
            Ok(factor) => api.verify(factor).await,
            Err(e) => Err(e),
        };
        if let Err(e) = verified {
            // Do not leave a half-logged-in session behind on the server.
            let _ = api.client().accounts().logout(LogoutRequest {}).await;
            return Err(e);
        }
    }
    session::save(session_file, &session)?;
    let expires = session.expires_at.clone().unwrap_or_else(|| "-".to_owned());
    out.emit(
        || {
            format!(
                "logged in to {server} as {}; session expires at {expires}\n",
                output::sanitize(&email)
            )
        },
        || {
            json!({
                "server": server,
                "email": email,
                "expires_at": session.expires_at,
                "mfa_verified": resp.mfa_required,
            })
        },
    );
    Ok(())
}

async fn logout(global: &GlobalArgs, session_file: &Path, out: Printer) -> Result<()> {
    let saved = match session::load(session_file) {
        Ok(saved) => saved,
        Err(Error::NotLoggedIn) => return Err(Error::NotLoggedIn),
        // An unreadable file holds no usable session: removing it is the whole logout.
        Err(Error::CorruptSession { .. }) => {
            session::remove(session_file)?;
            out.emit(
                || "logged out\n".to_owned(),
                || json!({ "logged_out": true }),
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let server = server_for(global, Some(&saved));
    let ended = end_session(&saved, trust(global)).await;
    // The local token goes in every case: a logout must never leave it on disk.
    session::remove(session_file)?;
    if let Err(e) = ended {
        return Err(Error::Rpc(format!(
            "logged out locally, but {server} did not end the session: {e}"
        )));
    }
    out.emit(
        || "logged out\n".to_owned(),
        || json!({ "logged_out": true }),
    );
    Ok(())
}

/// Ends `saved` on its server; a session that is already over is fine.
async fn end_session(saved: &Session, trust: Trust<'_>) -> Result<()> {
    let channel = tenantry_client::connect(&saved.server, trust).await?;
    let api = Api::new(channel, saved, FactorSource::default())?;
    match api.client().accounts().logout(LogoutRequest {}).await {
        Ok(_) => Ok(()),
        Err(status) => match Error::from(status) {
            Error::SessionInvalid | Error::NotLoggedIn => Ok(()),
            e => Err(e),
        },
    }
}

async fn whoami(api: &Api, out: Printer) -> Result<()> {
    let me = api
        .call(async |c: &Client| c.accounts().who_am_i(WhoAmIRequest {}).await)
        .await?;
    out.emit(
        || {
            output::fields(&[
                ("USER ID", me.user_id.clone()),
                ("EMAIL", me.email.clone()),
                ("ROLES", list_or_dash(&me.roles)),
                ("TENANTS", list_or_dash(&me.tenant_ids)),
                ("MFA ENROLLED", me.mfa_enrolled.to_string()),
                (
                    "MFA VERIFIED AT",
                    output::timestamp_cell(me.mfa_verified_at.as_ref()),
                ),
                (
                    "SESSION EXPIRES AT",
                    output::timestamp_cell(me.session_expires_at.as_ref()),
                ),
            ])
        },
        || {
            json!({
                "user_id": me.user_id,
                "email": me.email,
                "roles": me.roles,
                "tenant_ids": me.tenant_ids,
                "mfa_enrolled": me.mfa_enrolled,
                "mfa_verified_at": output::timestamp(me.mfa_verified_at.as_ref()),
                "session_expires_at": output::timestamp(me.session_expires_at.as_ref()),
            })
        },
    );
    Ok(())
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

async fn mfa_enroll(api: &Api, out: Printer) -> Result<()> {
    let begin = api
        .call(async |c: &Client| {
            c.mfa()
                .begin_totp_enrollment(BeginTotpEnrollmentRequest {})
                .await
        })
        .await?;
    let qr = qrcode::QrCode::new(begin.otpauth_uri.as_bytes())
        .map(|code| {
            code.render::<qrcode::render::unicode::Dense1x2>()
                // Light modules drawn dark reads well on dark terminals and scans everywhere.
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .quiet_zone(true)
                .build()
        })
        .unwrap_or_default();
    let intro = format!(
        "Scan this QR code with your authenticator app, or add the key by hand.\n\n{qr}\n\notpauth URI: {}\nsecret:      {}\n",
        output::sanitize(&begin.otpauth_uri),
        output::sanitize(&begin.secret),
    );
    // In JSON mode stdout carries only the final document.
    match out.format {
        Format::Table => {
            print!("{intro}");
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        Format::Json => eprint!("{intro}"),
    }
    let code = prompt::line("Code from the app: ")?
        .map(|c| c.chars().filter(|c| !c.is_whitespace()).collect::<String>())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Error::Usage("enrollment needs a code from the authenticator app".into()))?;
    let confirm = api
        .call(async |c: &Client| {
            c.mfa()
                .confirm_totp_enrollment(ConfirmTotpEnrollmentRequest { code: code.clone() })
                .await
        })
        .await?;
    out.emit(
        || {
            let mut text = String::from(
                "TOTP enrolled. Recovery codes (each works once; store them safely, they are not shown again):\n",
            );
            for c in &confirm.recovery_codes {
                text.push_str("  ");
                text.push_str(&output::sanitize(c));
                text.push('\n');
            }
            text
        },
        || {
            json!({
                "otpauth_uri": begin.otpauth_uri,
                "recovery_codes": confirm.recovery_codes,
            })
        },
    );
    Ok(())
}

async fn mfa_remove(api: &Api, password_stdin: bool, out: Printer) -> Result<()> {
    let password = prompt::password(password_stdin)?;
    api.call(async |c: &Client| {
        c.mfa()
            .remove_totp(RemoveTotpRequest {
                password: password.expose_secret().to_owned(),
            })
            .await
    })
    .await?;
    out.emit(
        || "TOTP removed; its recovery codes no longer work.\n".to_owned(),
        || json!({ "mfa_enrolled": false }),
    );
    Ok(())
}

async fn tenants(api: &Api, command: TenantsCommand, out: Printer) -> Result<()> {
    match command {
        TenantsCommand::List { page_size } => {
            let all = all_pages(
                async |page_token: &str| {
                    api.call(async |c: &Client| {
                        c.admin()
                            .list_tenants(ListTenantsRequest {
                                page_size,
                                page_token: page_token.to_owned(),
                            })
                            .await
                    })
                    .await
                },
                |page: ListTenantsResponse| page.tenants,
            )
            .await?;
            out.emit(
                || {
                    let rows: Vec<_> = all.iter().map(output::tenant_row).collect();
                    output::table(&TENANT_HEADERS, &rows)
                },
                || Value::Array(all.iter().map(output::tenant_json).collect()),
            );
        }
        TenantsCommand::Get { tenant_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.tenants()
                        .get_tenant(GetTenantRequest {
                            tenant_id: tenant_id.clone(),
                        })
                        .await
                })
                .await?;
            let tenant = resp.tenant.unwrap_or_default();
            out.emit(
                || output::tenant_fields(&tenant),
                || output::tenant_json(&tenant),
            );
        }
        TenantsCommand::Suspend { tenant_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .suspend_tenant(SuspendTenantRequest {
                            tenant_id: tenant_id.clone(),
                        })
                        .await
                })
                .await?;
            print_tenant(out, resp.tenant.unwrap_or_default());
        }
        TenantsCommand::Resume { tenant_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .resume_tenant(ResumeTenantRequest {
                            tenant_id: tenant_id.clone(),
                        })
                        .await
                })
                .await?;
            print_tenant(out, resp.tenant.unwrap_or_default());
        }
        TenantsCommand::Delete { tenant_id, yes } => {
            if !yes
                && !prompt::confirm(&format!(
                    "Delete tenant {} with its instance and all its data?",
                    output::sanitize(&tenant_id)
                ))?
            {
                return Err(Error::Aborted);
            }
            api.call(async |c: &Client| {
                c.admin()
                    .delete_tenant(DeleteTenantRequest {
                        tenant_id: tenant_id.clone(),
                    })
                    .await
            })
            .await?;
            out.emit(
                || format!("deleted tenant {}\n", output::sanitize(&tenant_id)),
                || json!({ "tenant_id": tenant_id, "deleted": true }),
            );
        }
    }
    Ok(())
}

/// A tenant after a change: one table row, or its JSON.
fn print_tenant(out: Printer, tenant: Tenant) {
    out.emit(
        || output::table(&TENANT_HEADERS, &[output::tenant_row(&tenant)]),
        || output::tenant_json(&tenant),
    );
}

async fn retention(api: &Api, command: RetentionCommand, out: Printer) -> Result<()> {
    match command {
        RetentionCommand::Get { tenant_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.tenants()
                        .get_retention_policy(GetRetentionPolicyRequest {
                            tenant_id: tenant_id.clone(),
                        })
                        .await
                })
                .await?;
            let policy = resp.policy.unwrap_or_default();
            out.emit(
                || {
                    output::fields(&[
                        ("TENANT", tenant_id.clone()),
                        ("MAX AGE HOURS", policy.max_age_hours.to_string()),
                        ("MAX COUNT", policy.max_count.to_string()),
                        ("MAX AGE HOURS CAP", resp.max_age_hours_cap.to_string()),
                    ])
                },
                || {
                    json!({
                        "tenant_id": tenant_id,
                        "policy": output::retention_json(&policy),
                        "max_age_hours_cap": resp.max_age_hours_cap,
                    })
                },
            );
        }
        RetentionCommand::Set {
            tenant_id,
            max_age_hours,
            max_count,
            admin,
        } => {
            let policy = if admin {
                api.call(async |c: &Client| {
                    c.admin()
                        .set_tenant_retention_policy(SetTenantRetentionPolicyRequest {
                            tenant_id: tenant_id.clone(),
                            max_age_hours,
                            max_count,
                        })
                        .await
                })
                .await?
                .policy
            } else {
                api.call(async |c: &Client| {
                    c.tenants()
                        .set_retention_policy(SetRetentionPolicyRequest {
                            tenant_id: tenant_id.clone(),
                            max_age_hours,
                            max_count,
                        })
                        .await
                })
                .await?
                .policy
            };
            let policy = policy.unwrap_or_default();
            out.emit(
                || {
                    output::fields(&[
                        ("TENANT", tenant_id.clone()),
                        ("MAX AGE HOURS", policy.max_age_hours.to_string()),
                        ("MAX COUNT", policy.max_count.to_string()),
                    ])
                },
                || json!({ "tenant_id": tenant_id, "policy": output::retention_json(&policy) }),
            );
        }
    }
    Ok(())
}

async fn audit(api: &Api, command: AuditCommand, out: Printer) -> Result<()> {
    match command {
        AuditCommand::List {
            filter,
            limit,
            page_size,
        } => {
            check_time_range(&filter)?;
            let mut events: Vec<AuditEvent> = Vec::new();
            // How many the next page should hold: at most `page_size`.
            let want = |have: usize| {
                let want = limit.map_or(u64::from(page_size), |l| {
                    l.saturating_sub(have as u64).min(u64::from(page_size))
                });
                u32::try_from(want).unwrap_or(page_size)
            };
            let have = std::cell::Cell::new(0);
            each_page(
                async |page_token: &str| {
                    api.call(async |c: &Client| {
                        c.admin()
                            .list_audit_events(audit_request(&filter, want(have.get()), page_token))
                            .await
                    })
                    .await
                },
                |page: ListAuditEventsResponse, _| {
                    events.extend(page.events);
                    have.set(events.len());
                    Ok(limit.is_none_or(|l| (events.len() as u64) < l))
                },
            )
            .await?;
            if let Some(l) = limit {
                events.truncate(usize::try_from(l).unwrap_or(usize::MAX));
            }
            out.emit(
                || {
                    let rows: Vec<_> = events.iter().map(output::audit_row).collect();
                    output::table(&AUDIT_HEADERS, &rows)
                },
                || Value::Array(events.iter().map(output::audit_json).collect()),
            );
        }
        AuditCommand::Export {
            filter,
            format: ExportFormat::Jsonl,
            page_size,
        } => audit_export(api, &filter, page_size).await?,
        AuditCommand::Verify => {
            let resp = api
                .call(async |c: &Client| c.admin().verify_audit_log(VerifyAuditLogRequest {}).await)
                .await?;
            if out.format == Format::Json {
                print!(
                    "{}",
                    output::json(&json!({
                        "ok": resp.ok,
                        "first_bad_sequence": resp.first_bad_sequence,
                        "checked": resp.checked,
                    }))
                );
            }
            if !resp.ok {
                return Err(Error::AuditChainBroken {
                    first_bad_sequence: resp.first_bad_sequence,
                    checked: resp.checked,
                });
            }
            if out.format == Format::Table {
                println!("audit log ok: {} rows checked", resp.checked);
            }
        }
    }
    Ok(())
}

/// The protobuf value of a role flag.
fn role_value(role: Role) -> i32 {
    match role {
        Role::Admin => AdminRole::Admin as i32,
        Role::Auditor => AdminRole::Auditor as i32,
    }
}

async fn admins(api: &Api, command: AdminsCommand, out: Printer) -> Result<()> {
    match command {
        AdminsCommand::Grant {
            user_id,
            role,
            expires_in_days,
        } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .grant_admin(GrantAdminRequest {
                            user_id: user_id.clone(),
                            role: role_value(role),
                            expires_in_days: expires_in_days.unwrap_or(0),
                        })
                        .await
                })
                .await?;
            let grant = resp.grant.unwrap_or_default();
            let role_name = output::role_name(role_value(role));
            out.emit(
                || {
                    let mut text = format!(
                        "granted {role_name} to {} until {} (their sessions were ended)\n",
                        output::sanitize(&user_id),
                        output::timestamp_cell(grant.expires_at.as_ref()),
                    );
                    if !resp.review_id.is_empty() {
                        text.push_str(&format!(
                            "opened access review {} for this new role (see `tenantryctl access-review show {}`)\n",
                            output::sanitize(&resp.review_id),
                            output::sanitize(&resp.review_id),
                        ));
                    }
                    text
                },
                || {
                    let mut v = json!({
                        "user_id": user_id,
                        "role": role_name,
                        "granted": true,
                        "grant": output::role_grant_json(&grant),
                        "review_id": (!resp.review_id.is_empty()).then_some(&resp.review_id),
                    });
                    // Kept from before roles: scripts read `admin` after `admins grant`.
                    if role == Role::Admin {
                        v["admin"] = Value::Bool(true);
                    }
                    v
                },
            );
        }
        AdminsCommand::Revoke { user_id, role } => {
            api.call(async |c: &Client| {
                c.admin()
                    .revoke_admin(RevokeAdminRequest {
                        user_id: user_id.clone(),
                        role: role_value(role),
                    })
                    .await
            })
            .await?;
            let role_name = output::role_name(role_value(role));
            out.emit(
                || {
                    format!(
                        "revoked {role_name} from {} (their sessions were ended)\n",
                        output::sanitize(&user_id)
                    )
                },
                || {
                    let mut v = json!({ "user_id": user_id, "role": role_name, "granted": false });
                    if role == Role::Admin {
                        v["admin"] = Value::Bool(false);
                    }
                    v
                },
            );
        }
    }
    Ok(())
}

async fn sessions(api: &Api, command: SessionsCommand, out: Printer) -> Result<()> {
    let SessionsCommand::Revoke { user_id } = command;
    let resp = api
        .call(async |c: &Client| {
            c.admin()
                .revoke_sessions(RevokeSessionsRequest {
                    user_id: user_id.clone(),
                })
                .await
        })
        .await?;
    out.emit(
        || {
            format!(
                "revoked {} session(s) of {}\n",
                resp.revoked,
                output::sanitize(&user_id)
            )
        },
        || json!({ "user_id": user_id, "revoked": resp.revoked }),
    );
    Ok(())
}

/// A protobuf timestamp for a time flag.
fn proto_time(t: jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// `--since` must come before `--until`.
fn check_time_range(filter: &AuditFilter) -> Result<()> {
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && since >= until
    {
        return Err(Error::Usage(format!(
            "--since ({since}) must be before --until ({until})"
        )));
    }
    Ok(())
}

/// One page of audit events matching `filter`.
fn audit_request(filter: &AuditFilter, page_size: u32, page_token: &str) -> ListAuditEventsRequest {
    ListAuditEventsRequest {
        page_size,
        page_token: page_token.to_owned(),
        since: filter.since.map(proto_time),
        until: filter.until.map(proto_time),
        action_prefix: filter.action_prefix.clone().unwrap_or_default(),
        actor_user_id: filter.actor.clone().unwrap_or_default(),
        target: filter.target.clone().unwrap_or_default(),
    }
}

/// `audit export`: every matching event as JSON Lines on stdout, written and flushed page
/// by page so a SIEM shipper sees events while later pages are fetched.
async fn audit_export(api: &Api, filter: &AuditFilter, page_size: u32) -> Result<()> {
    use std::io::Write as _;
    check_time_range(filter)?;
    each_page(
        async |page_token: &str| {
            api.call(async |c: &Client| {
                c.admin()
                    .list_audit_events(audit_request(filter, page_size, page_token))
                    .await
            })
            .await
        },
        |page: ListAuditEventsResponse, _| {
            let mut chunk = String::new();
            for event in &page.events {
                chunk.push_str(&output::audit_jsonl(event));
            }
            // The lock is not held across the next request.
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(chunk.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(Error::io("writing the export to stdout"))?;
            Ok(true)
        },
    )
    .await
}

/// The server's user filter from `users list` flags: space-separated `key=value` terms.
fn user_filter(
    raw: Option<&str>,
    status: Option<StatusFilter>,
    role: Option<RoleFilter>,
    email: Option<&str>,
) -> Result<String> {
    let mut terms: Vec<String> = raw
        .map(|r| r.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(email) = email {
        if email.is_empty() || email.chars().any(char::is_whitespace) {
            return Err(Error::Usage(
                "--email must be non-empty text without spaces".into(),
            ));
        }
        terms.push(format!("email={email}"));
    }
    if let Some(status) = status {
        terms.push(
            match status {
                StatusFilter::Active => "status=active",
                StatusFilter::Deactivated => "status=deactivated",
            }
            .to_owned(),
        );
    }
    if let Some(role) = role {
        terms.push(
            match role {
                RoleFilter::Admin => "role=admin",
                RoleFilter::Auditor => "role=auditor",
                RoleFilter::None => "role=none",
            }
            .to_owned(),
        );
    }
    Ok(terms.join(" "))
}

async fn users(api: &Api, command: UsersCommand, out: Printer) -> Result<()> {
    match command {
        UsersCommand::List {
            filter,
            status,
            role,
            email,
            page_size,
            all,
        } => {
            let filter = user_filter(filter.as_deref(), status, role, email.as_deref())?;
            let mut users = Vec::new();
            let mut more = false;
            each_page(
                async |page_token: &str| {
                    api.call(async |c: &Client| {
                        c.admin()
                            .list_users(ListUsersRequest {
                                page_size,
                                page_token: page_token.to_owned(),
                                filter: filter.clone(),
                            })
                            .await
                    })
                    .await
                },
                |page: ListUsersResponse, last| {
                    users.extend(page.users);
                    more = !last && !all;
                    Ok(all)
                },
            )
            .await?;
            out.emit(
                || {
                    let rows: Vec<_> = users.iter().map(output::user_row).collect();
                    output::table(&USER_HEADERS, &rows)
                },
                || Value::Array(users.iter().map(output::user_json).collect()),
            );
            if more {
                eprintln!(
                    "note: more users than the {} shown; pass --all for every page",
                    users.len()
                );
            }
        }
        UsersCommand::Deactivate {
            user_id,
            reason,
            yes,
        } => {
            if reason.trim().is_empty() {
                return Err(Error::Usage(
                    "--reason must say why the user is deactivated".into(),
                ));
            }
            if !yes
                && !prompt::confirm(&format!(
                    "Deactivate user {}? This ends every session, removes every role and refuses further logins.",
                    output::sanitize(&user_id)
                ))?
            {
                return Err(Error::Aborted);
            }
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .deactivate_user(DeactivateUserRequest {
                            user_id: user_id.clone(),
                            reason: reason.clone(),
                        })
                        .await
                })
                .await?;
            let user = resp.user.unwrap_or_default();
            out.emit(
                || {
                    format!(
                        "deactivated {} ({}): {} session(s) ended, every role removed, logins refused\n{}",
                        output::sanitize(&user.email),
                        output::sanitize(&user_id),
                        resp.sessions_revoked,
                        output::user_fields(&user),
                    )
                },
                || {
                    json!({
                        "user": output::user_json(&user),
                        "sessions_revoked": resp.sessions_revoked,
                    })
                },
            );
        }
        UsersCommand::Reactivate { user_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .reactivate_user(ReactivateUserRequest {
                            user_id: user_id.clone(),
                        })
                        .await
                })
                .await?;
            let user = resp.user.unwrap_or_default();
            out.emit(
                || {
                    format!(
                        "reactivated {} ({}): they may log in again; no role was restored\n{}",
                        output::sanitize(&user.email),
                        output::sanitize(&user_id),
                        output::user_fields(&user),
                    )
                },
                || output::user_json(&user),
            );
        }
    }
    Ok(())
}

async fn access_review(api: &Api, command: AccessReviewCommand, out: Printer) -> Result<()> {
    match command {
        AccessReviewCommand::Start { due_in_days } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .start_access_review(StartAccessReviewRequest {
                            due_in_days: due_in_days.unwrap_or(0),
                        })
                        .await
                })
                .await?;
            let review = resp.review.unwrap_or_default();
            out.emit(
                || output::review_fields(&review),
                || output::review_json(&review),
            );
        }
        AccessReviewCommand::List { page_size } => {
            let reviews = all_pages(
                async |page_token: &str| {
                    api.call(async |c: &Client| {
                        c.admin()
                            .list_access_reviews(ListAccessReviewsRequest {
                                page_size,
                                page_token: page_token.to_owned(),
                            })
                            .await
                    })
                    .await
                },
                |page: ListAccessReviewsResponse| page.reviews,
            )
            .await?;
            out.emit(
                || {
                    let rows: Vec<_> = reviews.iter().map(output::review_row).collect();
                    output::table(&REVIEW_HEADERS, &rows)
                },
                || Value::Array(reviews.iter().map(output::review_json).collect()),
            );
        }
        AccessReviewCommand::Show { review_id } => {
            let resp = api
                .call(async |c: &Client| {
                    c.admin()
                        .list_access_review_items(ListAccessReviewItemsRequest {
                            review_id: review_id.clone(),
                        })
                        .await
                })
                .await?;
            let review = resp.review.unwrap_or_default();
            out.emit(
                || {
                    let rows: Vec<_> = resp.items.iter().map(output::review_item_row).collect();
                    format!(
                        "{}\n{}",
                        output::review_fields(&review),
                        output::table(&REVIEW_ITEM_HEADERS, &rows)
                    )
                },
                || {
                    json!({
                        "review": output::review_json(&review),
                        "items": resp.items.iter().map(output::review_item_json).collect::<Vec<_>>(),
                    })
                },
            );
        }
        AccessReviewCommand::Keep {
            review_id,
            user_id,
            role,
            expires_in_days,
            note,
        } => {
            let decision = Decision {
                review_id,
                user_id,
                role,
                keep: true,
                expires_in_days: expires_in_days.unwrap_or(0),
                note,
            };
            decide(api, decision, out).await?;
        }
        AccessReviewCommand::Revoke {
            review_id,
            user_id,
            role,
            note,
        } => {
            let decision = Decision {
                review_id,
                user_id,
                role,
                keep: false,
                expires_in_days: 0,
                note,
            };
            decide(api, decision, out).await?;
        }
    }
    Ok(())
}

/// What `access-review keep|revoke` asks for.
struct Decision {
    review_id: String,
    user_id: String,
    role: Role,
    keep: bool,
    expires_in_days: u32,
    note: String,
}

async fn decide(api: &Api, d: Decision, out: Printer) -> Result<()> {
    let decision = if d.keep {
        AccessReviewDecision::Keep
    } else {
        AccessReviewDecision::Revoke
    };
    let resp = api
        .call(async |c: &Client| {
            c.admin()
                .decide_access_review_item(DecideAccessReviewItemRequest {
                    review_id: d.review_id.clone(),
                    user_id: d.user_id.clone(),
                    role: role_value(d.role),
                    decision: decision as i32,
                    note: d.note.clone(),
                    expires_in_days: d.expires_in_days,
                })
                .await
        })
        .await?;
    let item = resp.item.unwrap_or_default();
    out.emit(
        || {
            let what = if d.keep {
                format!(
                    "kept {} of {}; the grant is extended\n",
                    output::role_name(item.role),
                    output::sanitize(&item.email),
                )
            } else {
                format!(
                    "revoked {} from {}; their sessions were ended\n",
                    output::role_name(item.role),
                    output::sanitize(&item.email),
                )
            };
            format!(
                "{what}{}",
                output::table(&REVIEW_ITEM_HEADERS, &[output::review_item_row(&item)])
            )
        },
        || output::review_item_json(&item),
    );
    Ok(())
}

/// A response that is one page of a listing.
trait Page {
    /// The token of the next page; empty on the last.
    fn next_page_token(&mut self) -> &mut String;
}

macro_rules! page {
    ($($response:ty),* $(,)?) => {
        $(impl Page for $response {
            fn next_page_token(&mut self) -> &mut String {
                &mut self.next_page_token
            }
        })*
    };
}

page!(
    ListTenantsResponse,
    ListAuditEventsResponse,
    ListUsersResponse,
    ListAccessReviewsResponse,
);

/// Every item of a listing: `items` takes them out of each page.
async fn all_pages<P: Page, T>(
    fetch: impl AsyncFnMut(&str) -> Result<P>,
    items: fn(P) -> Vec<T>,
) -> Result<Vec<T>> {
    let mut all = Vec::new();
    each_page(fetch, |page, _| {
        all.extend(items(page));
        Ok(true)
    })
    .await?;
    Ok(all)
}

/// Reads a listing page by page: `fetch` gets each page token in turn (empty first) and
/// `take` each page with whether it is the last, answering whether to go on. Stops at the
/// last page, or when the server hands back the token it was given (a server that would
/// otherwise keep this loop going forever).
async fn each_page<P: Page>(
    mut fetch: impl AsyncFnMut(&str) -> Result<P>,
    mut take: impl FnMut(P, bool) -> Result<bool>,
) -> Result<()> {
    let mut token = String::new();
    loop {
        let mut page = fetch(&token).await?;
        let next = std::mem::take(page.next_page_token());
        let last = next.is_empty() || next == token;
        if !take(page, last)? || last {
            return Ok(());
        }
        token = next;
    }
}
