//! The library's error type and its one mapping to gRPC statuses.
//!
//! validation → `INVALID_ARGUMENT` with field details; no or expired credentials →
//! `UNAUTHENTICATED`; missing role or MFA → `PERMISSION_DENIED` with an `ErrorInfo` reason;
//! another tenant's resource → `NOT_FOUND`; locked or rate-limited → `RESOURCE_EXHAUSTED`
//! with retry info; database unreachable → `UNAVAILABLE`; everything else → `INTERNAL` with
//! a generic message and the cause logged. No variant ever carries a secret.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of Tenantry errors.
pub const ERROR_DOMAIN: &str = "tenantry.dev";

/// Why an admin call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The caller is not an admin.
    AdminRoleRequired,
    /// The session has not verified a second factor.
    MfaRequired,
    /// The session's second factor is older than the step-up window.
    MfaTooOld,
    /// Only the tenant's owner may do this.
    OwnerRequired,
    /// Nobody decides an access review item about their own grant.
    SelfReview,
    /// Nobody grants a role to themselves.
    SelfGrant,
}

impl DenyReason {
    /// The `ErrorInfo.reason` clients match on.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::AdminRoleRequired => "ADMIN_ROLE_REQUIRED",
            DenyReason::MfaRequired => "MFA_REQUIRED",
            DenyReason::MfaTooOld => "MFA_TOO_OLD",
            DenyReason::OwnerRequired => "OWNER_REQUIRED",
            DenyReason::SelfReview => "SELF_REVIEW",
            DenyReason::SelfGrant => "SELF_GRANT",
        }
    }

    fn message(self) -> &'static str {
        match self {
            DenyReason::AdminRoleRequired => "this call needs the admin role",
            DenyReason::SelfReview => {
                "nobody decides a review item about their own grant; ask another admin"
            }
            DenyReason::SelfGrant => "nobody grants a role to themselves; ask another admin",
            DenyReason::MfaRequired => {
                "this call needs a verified second factor (MfaService.VerifyMfa)"
            }
            DenyReason::MfaTooOld => {
                "the second factor is too old; verify it again (MfaService.VerifyMfa)"
            }
            DenyReason::OwnerRequired => "only the tenant's owner may do this",
        }
    }
}

/// Why a call does not fit the current state, for the clients that must tell the cases
/// apart (answered `FAILED_PRECONDITION` with an `ErrorInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreconditionReason {
    /// A role is only granted to a user with a confirmed second factor.
    MfaNotEnrolled,
    /// The change would leave no active admin.
    LastAdmin,
    /// `VerifyEmail` with a token that was used already.
    VerificationTokenUsed,
    /// `VerifyEmail` with a token past its 24 hours.
    VerificationTokenExpired,
    /// `ResendVerificationEmail` for an address that is verified.
    EmailAlreadyVerified,
}

impl PreconditionReason {
    /// The `ErrorInfo.reason` clients match on.
    pub fn as_str(self) -> &'static str {
        match self {
            PreconditionReason::MfaNotEnrolled => "MFA_NOT_ENROLLED",
            PreconditionReason::LastAdmin => "LAST_ADMIN",
            PreconditionReason::VerificationTokenUsed => "VERIFICATION_TOKEN_USED",
            PreconditionReason::VerificationTokenExpired => "VERIFICATION_TOKEN_EXPIRED",
            PreconditionReason::EmailAlreadyVerified => "EMAIL_ALREADY_VERIFIED",
        }
    }
}

/// Why a caller is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` metadata.
    MissingCredentials,
    /// The metadata is not `Bearer <token>`.
    MalformedAuthorization,
    /// The session token is unknown, ended, or past a timeout.
    SessionInvalid,
    /// Wrong email or password.
    InvalidCredentials,
    /// Wrong, expired or already-used TOTP or recovery code.
    InvalidMfaCode,
}

impl AuthFailure {
    /// The `ErrorInfo.reason` clients match on.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "MISSING_CREDENTIALS",
            AuthFailure::MalformedAuthorization => "MALFORMED_AUTHORIZATION",
            AuthFailure::SessionInvalid => "SESSION_INVALID",
            AuthFailure::InvalidCredentials => "INVALID_CREDENTIALS",
            AuthFailure::InvalidMfaCode => "INVALID_MFA_CODE",
        }
    }

    fn message(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => {
                "missing credentials: send `authorization: Bearer <session token>`"
            }
            AuthFailure::MalformedAuthorization => "authorization must be `Bearer <session token>`",
            AuthFailure::SessionInvalid => "unknown or expired session; log in again",
            AuthFailure::InvalidCredentials => "invalid email or password",
            AuthFailure::InvalidMfaCode => "invalid or already used code",
        }
    }
}

/// Everything that can go wrong in the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid.
    #[error("invalid {field}: {description}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong, safe to show.
        description: String,
    },
    /// No, unknown or expired credentials, or a wrong password or code.
    #[error("{}", .0.message())]
    Unauthenticated(AuthFailure),
    /// The caller lacks a role or a recent second factor.
    #[error("{}", .0.message())]
    PermissionDenied(DenyReason),
    /// The resource does not exist or belongs to someone else.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The resource exists already.
    #[error("{message}")]
    AlreadyExists {
        /// The request field at fault.
        field: &'static str,
        /// Safe to show.
        message: &'static str,
    },
    /// The call is not valid in the current state.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// The call is not valid in the current state, for a reason clients match on.
    #[error("{message}")]
    Precondition {
        /// The `ErrorInfo.reason`.
        reason: PreconditionReason,
        /// Safe to show.
        message: &'static str,
    },
    /// Locked out or rate limited.
    #[error("{what}; retry in {}s", retry_after.as_secs().max(1))]
    ResourceExhausted {
        /// What is limited.
        what: &'static str,
        /// When to retry.
        retry_after: Duration,
    },
    /// The database cannot be reached.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A database query failed.
    #[error("database query failed")]
    Database(#[source] sqlx::Error),
    /// A stored value this version cannot read (written by a newer version, or by hand).
    #[error("{table} row {id}: {column} {value} is not a value this version can read")]
    InvalidRow {
        /// The table.
        table: &'static str,
        /// The row's id.
        id: String,
        /// The column.
        column: &'static str,
        /// The stored value, as written in Rust syntax (strings quoted).
        value: String,
    },
    /// Applying the schema failed.
    #[error("database migration {version} failed")]
    Migration {
        /// The migration.
        version: i64,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The master key is unusable.
    #[error("master key: {0}")]
    MasterKey(String),
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(&'static str),
    /// Password hashing failed (not a mismatch).
    #[error("password hashing: {0}")]
    Hashing(String),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// File IO on startup.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The instance-token key is unusable, or signing failed.
    #[error("instance token: {0}")]
    Token(#[source] tenantry_proto::token::TokenError),
    /// A change of the instance-token key ring was refused (an overlap too short, a
    /// rotation already under way) or the ring is unusable.
    #[error("token keys: {0}")]
    TokenKeys(String),
    /// The provisioner could not do its part.
    #[error("provisioner: {0}")]
    Provisioner(String),
    /// A local-mode runtime config file cannot be read back.
    #[error("runtime config file {}", path.display())]
    RuntimeConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A Kubernetes API call of the `kubernetes` provisioner failed.
    #[error("kubernetes: {what}")]
    Kube {
        /// What the provisioner was doing.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The local CA could not be made, loaded or used.
    #[error("local CA: {what}")]
    Pki {
        /// What the provisioner was doing.
        what: &'static str,
        /// The PKI error.
        #[source]
        source: tenantry_pki::Error,
    },
    /// A blocking task (hashing) panicked or was cancelled.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A backup file could not be written or read (wrong key, damaged file, …).
    #[error("backup: {0}")]
    Backup(#[from] tenantry_backup::Error),
    /// A restore was refused: the target is not empty, the backup is of a newer schema,
    /// the master key does not open its secrets, its records are inconsistent.
    #[error("restore refused: {0}")]
    Restore(String),
    /// Serving failed.
    #[error("transport: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A field violation.
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            description: description.into(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::Unavailable(e)
            }
            other => Error::Database(other),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid {field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            Error::Unauthenticated(why) => Status::with_error_details(
                Code::Unauthenticated,
                why.message(),
                ErrorDetails::with_error_info(why.as_str(), ERROR_DOMAIN, HashMap::new()),
            ),
            Error::PermissionDenied(reason) => Status::with_error_details(
                Code::PermissionDenied,
                reason.message(),
                ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new()),
            ),
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists { field, message } => Status::with_error_details(
                Code::AlreadyExists,
                message,
                ErrorDetails::with_bad_request_violation(field, message),
            ),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::Precondition { reason, message } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new()),
            ),
            e @ Error::ResourceExhausted { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::Unavailable(source) => {
                tracing::error!(error = %source, "database unavailable");
                Status::unavailable("database unavailable, try again")
            }
            other => {
                tracing::error!(error = %other, cause = ?std::error::Error::source(&other).map(ToString::to_string), "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn validation_carries_a_field_violation() {
        let status = Status::from(Error::invalid("tenant_name", "must start with a letter"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = details.bad_request().unwrap().field_violations.clone();
        assert_eq!(violations[0].field, "tenant_name");
    }

    #[test]
    fn permission_denied_says_which_is_missing() {
        let status = Status::from(Error::PermissionDenied(DenyReason::MfaTooOld));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "MFA_TOO_OLD"
        );
    }

    #[test]
    fn lockout_carries_retry_info() {
        let status = Status::from(Error::ResourceExhausted {
            what: "account locked",
            retry_after: Duration::from_secs(60),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_error_details().retry_info().unwrap().retry_delay;
        assert_eq!(retry, Some(Duration::from_secs(60)));
    }

    #[test]
    fn internal_errors_are_generic() {
        let status = Status::from(Error::Hashing("detail that should stay in the log".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
