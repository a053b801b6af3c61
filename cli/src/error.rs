//! What can go wrong in `tenantryctl`, and how a gRPC status becomes one clear line.
//!
//! No variant carries a secret: statuses keep only their message, IO errors name the file.

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::output::sanitize;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused or failed the call.
    #[error("{0}")]
    Rpc(String),
    /// There is no saved session.
    #[error("not logged in; run `tenantryctl login`")]
    NotLoggedIn,
    /// The saved session ended (timeout, logout, revocation, password change).
    #[error("session expired or revoked; run `tenantryctl login`")]
    SessionInvalid,
    /// The call needs the admin role.
    #[error("permission denied: this command needs the admin role")]
    AdminRoleRequired,
    /// The call needs the admin role and the caller holds only the read-only auditor role.
    #[error(
        "permission denied: the auditor role is read-only (users list, tenants list, audit list|export|verify, access-review list|show); this command needs the admin role"
    )]
    AuditorReadOnly,
    /// A role for a user without a second factor.
    #[error(
        "refused: the user has no second factor enrolled; they must run `tenantryctl mfa enroll` before they can be given a role"
    )]
    MfaNotEnrolled,
    /// A reviewer deciding their own grant.
    #[error(
        "permission denied: nobody may decide their own grant (separation of duties); another admin must keep or revoke it"
    )]
    SelfReview,
    /// A caller granting a role to themselves.
    #[error(
        "permission denied: nobody may grant a role to themselves (separation of duties); ask another admin"
    )]
    SelfGrant,
    /// The change would leave no active admin.
    #[error(
        "refused: this is the last active admin; grant the admin role to another user (with a second factor) first"
    )]
    LastAdmin,
    /// The saved session belongs to another server.
    #[error(
        "the saved session is for {saved}, not {wanted}; run `tenantryctl login --server {wanted}`"
    )]
    OtherServer {
        /// The session's server.
        saved: String,
        /// The server asked for.
        wanted: String,
    },
    /// The server cannot be reached.
    #[error("cannot connect to {server}: {detail}")]
    Connect {
        /// The server.
        server: String,
        /// Why, with every cause.
        detail: String,
    },
    /// A flag or input is unusable.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing a local file, or the terminal.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The session file is not what `login` writes.
    #[error("session file {path} is unreadable ({detail}); run `tenantryctl login`")]
    CorruptSession {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The user declined a confirmation.
    #[error("aborted")]
    Aborted,
    /// `audit verify` found a row that does not match the chain.
    #[error(
        "audit log verification failed: the first bad row is sequence {first_bad_sequence} ({checked} rows checked)"
    )]
    AuditChainBroken {
        /// The first row that does not match.
        first_bad_sequence: u64,
        /// Rows checked.
        checked: u64,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An IO failure while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The client's errors in the CLI's words: each names the flag (and its variable) to fix.
impl From<tenantry_client::Error> for Error {
    fn from(err: tenantry_client::Error) -> Error {
        use tenantry_client::Error as E;
        match err {
            E::Scheme { server } => Error::Usage(format!(
                "--server must start with http:// or https://, got {server:?}"
            )),
            E::Address { server, source } => {
                Error::Usage(format!("invalid --server {server:?}: {}", chain(&source)))
            }
            E::CaRequired => Error::Usage(
                "an https:// server needs --ca-file (TENANTRY_CA_FILE) with the CA that signed its certificate"
                    .into(),
            ),
            E::CaWithoutTls => {
                Error::Usage("--ca-file is only used with an https:// server".into())
            }
            E::ServerNameWithoutTls => {
                Error::Usage("--tls-server-name is only used with an https:// server".into())
            }
            E::ReadCa { path, source } => Error::Io {
                what: format!("reading the CA file {}", path.display()),
                source,
            },
            E::Tls { path, source } => Error::Usage(format!(
                "TLS setup with {}: {}",
                path.display(),
                chain(&source)
            )),
            E::Connect { server, source } => Error::Connect {
                server,
                detail: chain(&source),
            },
            E::MalformedToken(_) => {
                Error::Usage("the session token is malformed; run `tenantryctl login`".into())
            }
        }
    }
}

/// The `ErrorInfo.reason` of a status, empty when there is none.
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// True when the server asks this session for a (fresh) second factor.
pub fn needs_step_up(status: &Status) -> bool {
    status.code() == Code::PermissionDenied
        && matches!(reason(status).as_str(), "MFA_REQUIRED" | "MFA_TOO_OLD")
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        match (status.code(), reason(&status).as_str()) {
            (Code::Unauthenticated, "SESSION_INVALID") => return Error::SessionInvalid,
            (Code::Unauthenticated, "MISSING_CREDENTIALS") => return Error::NotLoggedIn,
            // `Api::call` tells an auditor apart (it asks `WhoAmI`).
            (Code::PermissionDenied, "ADMIN_ROLE_REQUIRED") => return Error::AdminRoleRequired,
            (Code::PermissionDenied | Code::FailedPrecondition, "MFA_NOT_ENROLLED") => {
                return Error::MfaNotEnrolled;
            }
            (Code::PermissionDenied | Code::FailedPrecondition, "SELF_REVIEW") => {
                return Error::SelfReview;
            }
            (Code::PermissionDenied | Code::FailedPrecondition, "SELF_GRANT") => {
                return Error::SelfGrant;
            }
            (Code::PermissionDenied | Code::FailedPrecondition, "LAST_ADMIN") => {
                return Error::LastAdmin;
            }
            _ => {}
        }
        Error::Rpc(describe(&status))
    }
}

/// One line for a status: its message (or its code when the message is empty) and the
/// first field violation unless the message names that field already.
fn describe(status: &Status) -> String {
    let mut line = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    if status.code() == Code::Unavailable {
        line = format!("server unavailable: {line}");
    }
    if let Some(violation) = status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().cloned())
        && !line.contains(&violation.field)
    {
        line = format!(
            "{line} (field {}: {})",
            violation.field, violation.description
        );
    }
    // One line, and nothing the server sent may drive the terminal.
    sanitize(&line.replace(['\r', '\n'], " "))
}

/// `err` and every cause, joined with ": ".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn with_reason(code: Code, reason: &str) -> Status {
        Status::with_error_details(
            code,
            "server text",
            ErrorDetails::with_error_info(reason, "tenantry.dev", HashMap::new()),
        )
    }

    #[test]
    fn step_up_only_for_mfa_reasons() {
        assert!(needs_step_up(&with_reason(
            Code::PermissionDenied,
            "MFA_REQUIRED"
        )));
        assert!(needs_step_up(&with_reason(
            Code::PermissionDenied,
            "MFA_TOO_OLD"
        )));
        assert!(!needs_step_up(&with_reason(
            Code::PermissionDenied,
            "ADMIN_ROLE_REQUIRED"
        )));
        assert!(!needs_step_up(&Status::permission_denied("no detail")));
    }

    #[test]
    fn known_reasons_get_their_own_message() {
        let e = Error::from(with_reason(Code::Unauthenticated, "SESSION_INVALID"));
        assert_eq!(
            e.to_string(),
            "session expired or revoked; run `tenantryctl login`"
        );
        let e = Error::from(with_reason(Code::PermissionDenied, "ADMIN_ROLE_REQUIRED"));
        assert!(e.to_string().contains("admin role"));
    }

    #[test]
    fn access_control_reasons_get_hints() {
        let e = Error::from(with_reason(Code::FailedPrecondition, "MFA_NOT_ENROLLED"));
        assert!(e.to_string().contains("tenantryctl mfa enroll"), "{e}");
        let e = Error::from(with_reason(Code::PermissionDenied, "SELF_REVIEW"));
        assert!(e.to_string().contains("their own grant"), "{e}");
        let e = Error::from(with_reason(Code::PermissionDenied, "SELF_GRANT"));
        assert!(e.to_string().contains("to themselves"), "{e}");
        let e = Error::from(with_reason(Code::FailedPrecondition, "LAST_ADMIN"));
        assert!(e.to_string().contains("last active admin"), "{e}");
        let e = Error::from(with_reason(Code::PermissionDenied, "ADMIN_ROLE_REQUIRED"));
        assert!(matches!(e, Error::AdminRoleRequired));
    }

    #[test]
    fn field_violations_are_named_once() {
        let st = Status::with_error_details(
            Code::InvalidArgument,
            "bad request",
            ErrorDetails::with_bad_request_violation("max_age_hours", "at most 720"),
        );
        assert_eq!(
            Error::from(st).to_string(),
            "bad request (field max_age_hours: at most 720)"
        );
        let st = Status::with_error_details(
            Code::InvalidArgument,
            "invalid max_age_hours: at most 720",
            ErrorDetails::with_bad_request_violation("max_age_hours", "at most 720"),
        );
        assert_eq!(
            Error::from(st).to_string(),
            "invalid max_age_hours: at most 720"
        );
    }

    #[test]
    fn client_errors_name_the_flag_to_fix() {
        let e = Error::from(tenantry_client::Error::Scheme {
            server: "x:1".into(),
        });
        assert_eq!(
            e.to_string(),
            r#"--server must start with http:// or https://, got "x:1""#
        );
        let e = Error::from(tenantry_client::Error::CaRequired);
        assert!(
            e.to_string().contains("--ca-file (TENANTRY_CA_FILE)"),
            "{e}"
        );
        let e = Error::from(tenantry_client::Error::ReadCa {
            path: "/ca.pem".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert!(
            e.to_string().starts_with("reading the CA file /ca.pem: "),
            "{e}"
        );
    }

    #[test]
    fn server_text_cannot_break_the_line_or_the_terminal() {
        let e = Error::from(Status::internal("a\nb\u{1b}[31m"));
        let text = e.to_string();
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "{text}");
    }
}
