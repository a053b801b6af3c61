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
    /// The admin role (admin).
    #[command(subcommand)]
    Admins(AdminsCommand),
    /// User sessions (admin).
    #[command(subcommand)]
    Sessions(SessionsCommand),
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
        /// At most this many events [default: all].
        #[arg(long, env = "TENANTRY_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Events fetched per request (1 to 1000).
        #[arg(long, env = "TENANTRY_PAGE_SIZE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
        page_size: u32,
    },
    /// Recompute the hash chain; exits 1 naming the first bad row when it does not match.
    Verify,
}

/// `admins ...`.
#[derive(Debug, Subcommand)]
pub enum AdminsCommand {
    /// Give a user the admin role (ends their sessions).
    Grant {
        /// The user's id.
        user_id: String,
    },
    /// Take the admin role away (ends their sessions).
    Revoke {
        /// The user's id.
        user_id: String,
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
    fn password_stdin_needs_an_email() {
        let err = Cli::try_parse_from(["tenantryctl", "login", "--password-stdin"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
