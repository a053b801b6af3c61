//! Command line of `tenantryctl`: one clap-derive tree, every flag also settable through a
//! `TENANTRY_…` environment variable. Parsed once, in `main`.

use std::convert::Infallible;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

/// Where `--server` points when neither the flag nor a saved session names a server.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Ops tool for the Tenantry control API.
#[derive(Debug, Parser)]
#[command(name = "tenantryctl", version, args_override_self = true)]
pub struct Cli {
    /// Options shared by every subcommand.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// API address, `http://HOST:PORT` or `https://HOST:PORT` [default: the saved session's
    /// server, else http://127.0.0.1:50051].
    #[arg(long, env = "TENANTRY_SERVER", global = true)]
    pub server: Option<String>,
    /// PEM file of the CA that signed the server's certificate (needed for `https://`).
    #[arg(long, env = "TENANTRY_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Name to check the server's certificate against, when it differs from the host in
    /// `--server` (e.g. `tenantry-api.tenantry.svc` through `kubectl port-forward`).
    #[arg(long, env = "TENANTRY_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
    /// Where the session token is kept [default: $XDG_CONFIG_HOME/tenantry/session or
    /// ~/.config/tenantry/session].
    #[arg(long, env = "TENANTRY_SESSION_FILE", global = true)]
    pub session_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, env = "TENANTRY_OUTPUT", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    /// A current TOTP code, used when the server asks for a second factor (login, step-up).
    #[arg(long, env = "TENANTRY_TOTP_CODE", hide_env_values = true, global = true, value_parser = secret, conflicts_with = "recovery_code")]
    pub totp_code: Option<SecretString>,
    /// A recovery code, used instead of a TOTP code when the server asks for a second factor.
    #[arg(long, env = "TENANTRY_RECOVERY_CODE", hide_env_values = true, global = true, value_parser = secret)]
    pub recovery_code: Option<SecretString>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in and save the session token.
    Login(LoginArgs),
    /// End the saved session and delete the session file.
    Logout,
    /// Describe the logged-in user and session.
    Whoami,
    /// Second-factor (TOTP) management.
    #[command(subcommand)]
    Mfa(MfaCommand),
    /// Tenants: list, inspect, suspend, resume, delete.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// A tenant's execution-data retention policy.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// The hash-chained audit log (admin).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Platform roles: `admin` and the read-only `auditor` (admin).
    #[command(subcommand)]
    Admins(AdminsCommand),
    /// User sessions (admin).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Users: list with roles and status (admin or auditor), deactivate, reactivate (admin).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Access reviews of every role grant: start, list, show, keep, revoke.
    #[command(subcommand)]
    AccessReview(AccessReviewCommand),
}

/// `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Login email; asked for when not given.
    #[arg(long, env = "TENANTRY_EMAIL")]
    pub email: Option<String>,
    /// Read the password from the first line of stdin instead of the terminal.
    #[arg(long, env = "TENANTRY_PASSWORD_STDIN", requires = "email")]
    pub password_stdin: bool,
}

/// `mfa ...`.
#[derive(Debug, Subcommand)]
pub enum MfaCommand {
    /// Enroll TOTP: shows the otpauth URI and a QR code, asks for a code, prints the
    /// recovery codes once.
    Enroll,
    /// Turn TOTP off (its recovery codes with it): asks for the password, and for a
    /// second factor when this session's is older than the step-up window.
    Remove {
        /// Read the password from the first line of stdin instead of the terminal.
        #[arg(long, env = "TENANTRY_PASSWORD_STDIN")]
        password_stdin: bool,
    },
}

/// `tenants ...`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Every tenant (admin).
    List {
        /// Tenants fetched per request (1 to 500).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=500))]
        page_size: u32,
    },
    /// One tenant you are a member of.
    Get {
        /// The tenant's id.
        tenant_id: String,
    },
    /// Scale a tenant's instance to zero, keeping its data (admin).
    Suspend {
        /// The tenant's id.
        tenant_id: String,
    },
    /// Undo `suspend` (admin).
    Resume {
        /// The tenant's id.
        tenant_id: String,
    },
    /// Delete a tenant, its instance and its data (admin).
    Delete {
        /// The tenant's id.
        tenant_id: String,
        /// Do not ask for confirmation.
        #[arg(long, env = "TENANTRY_YES")]
        yes: bool,
    },
}

/// `retention ...`.
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// The tenant's effective policy and the most you may set.
    Get {
        /// The tenant's id.
        tenant_id: String,
    },
    /// Change the policy: as the tenant's owner (within the plan's cap) or, with `--admin`,
    /// as an admin (up to the hard cap).
    Set {
        /// The tenant's id.
        tenant_id: String,
        /// Delete executions older than this many hours.
        #[arg(long, env = "TENANTRY_MAX_AGE_HOURS")]
        max_age_hours: u32,
        /// Keep only the newest this many executions.
        #[arg(long, env = "TENANTRY_MAX_COUNT")]
        max_count: u32,
        /// Use the admin rpc (any tenant, up to the hard cap).
        #[arg(long, env = "TENANTRY_ADMIN")]
        admin: bool,
    },
}

/// `audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit events, oldest first.
    List {
        /// Which events.
        #[command(flatten)]
        filter: AuditFilter,
        /// At most this many events [default: all].
        #[arg(long, env = "TENANTRY_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Events fetched per request (1 to 1000).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
        page_size: u32,
    },
    /// Stream every matching event to stdout, oldest first, one JSON object per line
    /// (for a SIEM); written and flushed page by page. The events are those up to the
    /// newest one when the export started. Ignores `--output`.
    Export {
        /// Which events.
        #[command(flatten)]
        filter: AuditFilter,
        /// What each line is.
        #[arg(long, env = "TENANTRY_EXPORT_FORMAT", value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Events fetched per request (1 to 1000).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
        page_size: u32,
    },
    /// Recompute the hash chain; exits 1 naming the first bad row when it does not match.
    Verify,
}

/// Which audit events `audit list` and `audit export` return; every filter given must
/// match.
#[derive(Debug, Clone, Default, Args)]
pub struct AuditFilter {
    /// Only events at or after this time: RFC 3339 (`2026-01-01T00:00:00Z`), a date
    /// (`2026-01-01`, midnight UTC), or an age before now (`90m`, `24h`, `7d`).
    #[arg(long, env = "TENANTRY_SINCE", value_parser = parse_time)]
    pub since: Option<jiff::Timestamp>,
    /// Only events before this time (same forms as `--since`).
    #[arg(long, env = "TENANTRY_UNTIL", value_parser = parse_time)]
    pub until: Option<jiff::Timestamp>,
    /// Only events whose action starts with this text (`admin.`, `login.`, ...).
    #[arg(long, env = "TENANTRY_ACTION_PREFIX")]
    pub action_prefix: Option<String>,
    /// Only events by this user id.
    #[arg(long, env = "TENANTRY_ACTOR")]
    pub actor: Option<String>,
    /// Only events about this target (a user id, tenant id or email; exact match).
    #[arg(long, env = "TENANTRY_TARGET")]
    pub target: Option<String>,
}

/// The line format of `audit export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line (JSON Lines), as `audit list -o json` prints each event.
    Jsonl,
}

/// A platform role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Every admin command.
    Admin,
    /// Read-only: lists, `audit verify`, access review reads.
    Auditor,
}

/// `admins ...`.
#[derive(Debug, Subcommand)]
pub enum AdminsCommand {
    /// Give a user a role for a limited time (ends their sessions). A role new to the user
    /// opens a one-item access review; the user needs a second factor enrolled.
    Grant {
        /// The user's id.
        user_id: String,
        /// The role.
        #[arg(long, env = "TENANTRY_ROLE", value_enum, default_value_t = Role::Admin)]
        role: Role,
        /// Days until the grant expires [default: the server's, 90 unless lower].
        #[arg(long, env = "TENANTRY_EXPIRES_IN_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
        expires_in_days: Option<u32>,
    },
    /// Take a role away (ends their sessions).
    Revoke {
        /// The user's id.
        user_id: String,
        /// The role.
        #[arg(long, env = "TENANTRY_ROLE", value_enum, default_value_t = Role::Admin)]
        role: Role,
    },
}

/// A user's status, for `users list --status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// May log in.
    Active,
    /// Shut out by `users deactivate`.
    Deactivated,
}

/// A role, for `users list --role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleFilter {
    /// Holds the admin role.
    Admin,
    /// Holds the auditor role.
    Auditor,
    /// Holds no role.
    None,
}

/// `users ...`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Users, oldest first, with their roles, status and last login (admin or auditor).
    List {
        /// Raw server filter: space-separated `email=TEXT`, `status=active|deactivated`,
        /// `role=admin|auditor|none` terms; combined with the flags below.
        #[arg(long, env = "TENANTRY_USER_FILTER")]
        filter: Option<String>,
        /// Only users with this status.
        #[arg(long, env = "TENANTRY_USER_STATUS", value_enum)]
        status: Option<StatusFilter>,
        /// Only users holding this role (`none`: no role).
        #[arg(long, env = "TENANTRY_USER_ROLE", value_enum)]
        role: Option<RoleFilter>,
        /// Only users whose email contains this text (case-insensitive).
        #[arg(long, env = "TENANTRY_USER_EMAIL")]
        email: Option<String>,
        /// Users fetched per request (1 to 500).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=500))]
        page_size: u32,
        /// Follow every page; without it only the first page is printed (and a note on
        /// stderr says when there are more).
        #[arg(long, env = "TENANTRY_ALL")]
        all: bool,
    },
    /// Termination: end every session of the user, remove every role and refuse further
    /// logins; their data is kept (admin).
    Deactivate {
        /// The user's id.
        user_id: String,
        /// Why (for example "left the company"); kept in the audit log.
        #[arg(long, env = "TENANTRY_REASON")]
        reason: String,
        /// Do not ask for confirmation.
        #[arg(long, env = "TENANTRY_YES")]
        yes: bool,
    },
    /// Let a deactivated user log in again; their roles are not restored (admin).
    Reactivate {
        /// The user's id.
        user_id: String,
    },
}

/// `access-review ...`.
#[derive(Debug, Subcommand)]
pub enum AccessReviewCommand {
    /// Snapshot every role grant as an item to decide (admin). Items not decided by the
    /// due time are revoked.
    Start {
        /// Days until undecided items are revoked (1 to 90) [default: the server's, 14].
        #[arg(long, env = "TENANTRY_DUE_IN_DAYS", value_parser = clap::value_parser!(u32).range(1..=90))]
        due_in_days: Option<u32>,
    },
    /// Access reviews, newest first (admin or auditor).
    List {
        /// Reviews fetched per request (1 to 500).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=500))]
        page_size: u32,
    },
    /// One review: its summary and every item (admin or auditor).
    Show {
        /// The review's id.
        review_id: String,
    },
    /// Keep a grant under review and extend it (admin; not your own grant).
    Keep {
        /// The review's id.
        review_id: String,
        /// The user holding the grant.
        user_id: String,
        /// The role under review.
        #[arg(long, env = "TENANTRY_ROLE", value_enum, default_value_t = Role::Admin)]
        role: Role,
        /// Days the grant is extended from now [default: the server's, 90 unless lower].
        #[arg(long, env = "TENANTRY_EXPIRES_IN_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
        expires_in_days: Option<u32>,
        /// Why; kept with the decision.
        #[arg(long, env = "TENANTRY_NOTE", default_value = "")]
        note: String,
    },
    /// Revoke a grant under review; ends that user's sessions (admin; not your own grant).
    Revoke {
        /// The review's id.
        review_id: String,
        /// The user holding the grant.
        user_id: String,
        /// The role under review.
        #[arg(long, env = "TENANTRY_ROLE", value_enum, default_value_t = Role::Admin)]
        role: Role,
        /// Why; kept with the decision.
        #[arg(long, env = "TENANTRY_NOTE", default_value = "")]
        note: String,
    },
}

/// `sessions ...`.
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// End every session of a user.
    Revoke {
        /// The user's id.
        user_id: String,
    },
}

fn secret(s: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(s.trim()))
}

/// `--since` and `--until`: RFC 3339, a date (midnight UTC), or an age before now.
fn parse_time(s: &str) -> Result<jiff::Timestamp, String> {
    parse_time_at(s, jiff::Timestamp::now())
}

fn parse_time_at(s: &str, now: jiff::Timestamp) -> Result<jiff::Timestamp, String> {
    let s = s.trim();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return d
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .map_err(|e| e.to_string());
    }
    let unit_at = s.len().saturating_sub(1);
    if let (Some(number), Some(unit)) = (s.get(..unit_at), s.get(unit_at..))
        && let Ok(n) = number.parse::<i64>()
        && n >= 0
    {
        let seconds = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        };
        if let Some(seconds) = seconds
            && let Ok(t) = now.checked_sub(jiff::SignedDuration::from_secs(seconds))
        {
            return Ok(t);
        }
    }
    Err(format!(
        "expected RFC 3339 (2026-01-01T00:00:00Z), a date (2026-01-01) or an age (90m, 24h, 7d), got {s:?}"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let cli = Cli::try_parse_from([
            "tenantryctl",
            "whoami",
            "--totp-code",
            "123456",
            "--server",
            "http://x:1",
        ])
        .unwrap();
        let debug = format!("{cli:?}");
        assert!(!debug.contains("123456"), "{debug}");
        assert_eq!(cli.global.server.as_deref(), Some("http://x:1"));
    }

    #[test]
    fn times_are_rfc3339_dates_or_ages() {
        let now: jiff::Timestamp = "2026-03-10T12:00:00Z".parse().unwrap();
        let at = |s| parse_time_at(s, now).map(|t| t.to_string());
        assert_eq!(at("2026-01-02T03:04:05Z").unwrap(), "2026-01-02T03:04:05Z");
        assert_eq!(
            at("2026-01-02T03:04:05+01:00").unwrap(),
            "2026-01-02T02:04:05Z"
        );
        assert_eq!(at("2026-01-02").unwrap(), "2026-01-02T00:00:00Z");
        assert_eq!(at("90m").unwrap(), "2026-03-10T10:30:00Z");
        assert_eq!(at("24h").unwrap(), "2026-03-09T12:00:00Z");
        assert_eq!(at("7d").unwrap(), "2026-03-03T12:00:00Z");
        for bad in ["", "yesterday", "-1d", "7w", "2026-13-01"] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn access_review_and_users_parse() {
        let cli = Cli::try_parse_from([
            "tenantryctl",
            "access-review",
            "keep",
            "r1",
            "u1",
            "--role",
            "auditor",
            "--expires-in-days",
            "30",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::AccessReview(AccessReviewCommand::Keep {
                role: Role::Auditor,
                expires_in_days: Some(30),
                ..
            })
        ));
        // A deactivation needs a reason.
        let err = Cli::try_parse_from(["tenantryctl", "users", "deactivate", "u1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from([
            "tenantryctl",
            "admins",
            "grant",
            "u1",
            "--expires-in-days",
            "0",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn password_stdin_needs_an_email() {
        let err = Cli::try_parse_from(["tenantryctl", "login", "--password-stdin"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
