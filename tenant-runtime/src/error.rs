//! The runtime's one error type. Messages name the step and the file that failed, never a
//! secret value (keys, tokens, payloads and credential secrets are not `Display`ed
//! anywhere in this crate).

use std::path::PathBuf;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use tenantry_proto::runtime_config::RuntimeConfigError;
use tenantry_proto::token::TokenError;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file named by the configuration (or the configuration itself) could not be read.
    #[error("cannot read {what} {}", path.display())]
    ReadFile {
        /// Which file it is (`config file`, `data key file`, …).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML/JSON of the expected shape.
    #[error("invalid config file {}: {message}", path.display())]
    ParseConfig {
        /// The config file.
        path: PathBuf,
        /// What the parser said (the config holds paths and numbers, no secrets).
        message: String,
    },
    /// A configuration value is out of range.
    #[error("invalid config")]
    InvalidConfig(#[source] RuntimeConfigError),
    /// A pragma the store does not report was asked for.
    #[error("unknown pragma {0}")]
    UnknownPragma(&'static str),
    /// The data key file does not hold exactly 32 bytes.
    #[error("data key file {} must hold exactly 32 raw bytes, found {len}", path.display())]
    DataKeyLength {
        /// The key file.
        path: PathBuf,
        /// How many bytes it holds.
        len: usize,
    },
    /// The token public key file is not an Ed25519 SPKI PEM.
    #[error("token public key file {}: {source}", path.display())]
    TokenKey {
        /// The key file.
        path: PathBuf,
        /// Why it was refused.
        #[source]
        source: TokenError,
    },
    /// The certificate or private key files could not be turned into a serving key.
    #[error("TLS certificate {}: {message}", cert_file.display())]
    Certificate {
        /// The certificate file.
        cert_file: PathBuf,
        /// Why (no certificate, no key, key does not match, unsupported key type, …).
        message: String,
    },
    /// Building the TLS server configuration failed.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// Creating the data directory failed.
    #[error("cannot create data directory {}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// A record could not be encrypted.
    #[error("cannot encrypt {table} record")]
    Encrypt {
        /// The table.
        table: &'static str,
    },
    /// A record failed to decrypt: wrong key, or the ciphertext was altered or moved to
    /// another row or tenant.
    #[error("cannot decrypt {table} record {id}: wrong key or tampered ciphertext")]
    Decrypt {
        /// The table.
        table: &'static str,
        /// The record id (ids are not secret).
        id: String,
    },
    /// A record's data key was deleted: retention expired its period (crypto-shredding).
    /// The record itself is expired and is deleted by the next prune.
    #[error("{table} record {id} is expired: its data key was deleted by retention")]
    KeyRetired {
        /// The table.
        table: &'static str,
        /// The record id.
        id: String,
    },
    /// A data key could not be wrapped under the key-encryption key.
    #[error("cannot wrap data key {id}")]
    WrapKey {
        /// The data key's id.
        id: u32,
    },
    /// A wrapped data key did not unwrap: another key-encryption key, tenant, id or
    /// purpose, or a changed byte.
    #[error("cannot unwrap data key {id}: wrong key-encryption key or tampered key store")]
    UnwrapKey {
        /// The data key's id.
        id: u32,
    },
    /// A key-store entry is wrapped by a key-encryption key that neither the data key file
    /// nor the previous data key file holds.
    #[error(
        "data key {id} is wrapped by key-encryption key {kek_id}, which is neither the data key file's ({current}) nor the previous data key file's ({previous}); configure that key as previous_data_key_file"
    )]
    KekUnknown {
        /// The data key's id.
        id: u32,
        /// The id of the KEK that wraps it.
        kek_id: String,
        /// The data key file's KEK id.
        current: String,
        /// The previous data key file's KEK id, or `none`.
        previous: String,
    },
    /// A stored payload was not the JSON it should be.
    #[error("stored {table} record {id} is corrupt")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The record id.
        id: String,
    },
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Randomness,
    /// Accepting connections failed.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    /// The CA file for OAuth 2 providers could not be used.
    #[error("oauth2.ca_file {}: {message}", path.display())]
    ProviderCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// An OAuth 2 endpoint is not an `https` URL on a host of `oauth2.allowed_hosts`.
    #[error("{what} {reason}")]
    EndpointRefused {
        /// Which endpoint (`token_url`, …).
        what: &'static str,
        /// Why (names the host, never a query string).
        reason: String,
    },
    /// The `state` of an authorization callback is unknown, used, expired, or another
    /// caller's.
    #[error("unknown, used or expired state")]
    InvalidState,
    /// The provider answered a request with an OAuth 2 error (`invalid_grant`, …).
    #[error("provider refused the {step}: {code}")]
    ProviderRefused {
        /// The request (`code exchange`, `refresh`, `revocation`).
        step: &'static str,
        /// The OAuth 2 error code it sent (sanitized: letters, digits, `_`).
        code: String,
    },
    /// A provider could not be reached or gave no usable answer.
    #[error("provider {step} failed: {reason}")]
    ProviderUnavailable {
        /// The request.
        step: &'static str,
        /// Why (network, TLS, status, redirect, unreadable response; never a body).
        reason: String,
    },
    /// A backup file could not be written or read (wrong key, damaged file, …).
    #[error("backup: {0}")]
    Backup(#[from] tenantry_backup::Error),
    /// A backup or restore was refused (another tenant's backup, a data directory that
    /// holds a database, a data key that does not open the backup's records, …).
    #[error("{0}")]
    Refused(String),
    /// A backup's file work failed.
    #[error("{what}: {source}")]
    BackupIo {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An execution asked for the access token of a grant that has none to give.
    #[error("oauth2 credential {id}: {reason}")]
    GrantUnavailable {
        /// The credential id.
        id: String,
        /// Why.
        reason: crate::store::GrantUnavailable,
    },
}

/// SQLite's result code for "database or disk is full" (`SQLITE_FULL`).
const SQLITE_FULL: &str = "13";
/// `ENOSPC`: no space left on the device.
const ENOSPC: i32 = 28;

impl Error {
    /// True when the failure is a full disk (or a full database file): the request can
    /// succeed once space is freed, so it is answered 507, not 500.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.code().as_deref() == Some(SQLITE_FULL),
            Error::Database(sqlx::Error::Io(io)) => io.raw_os_error() == Some(ENOSPC),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(e)
    }
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message the client reads.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 with a bearer challenge.
    pub fn unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404.
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="tenantry", error="invalid_token""#),
            );
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        // What the caller can act on is said; these messages hold no secret (see the
        // variants).
        match &e {
            Error::EndpointRefused { .. } => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "endpoint_not_allowed",
                    e.to_string(),
                );
            }
            Error::InvalidState => {
                return ApiError::new(StatusCode::BAD_REQUEST, "invalid_state", e.to_string());
            }
            Error::ProviderRefused { .. } => {
                tracing::warn!(error = %e, "provider refused");
                return ApiError::new(StatusCode::BAD_REQUEST, "provider_refused", e.to_string());
            }
            Error::ProviderUnavailable { .. } => {
                tracing::warn!(error = %e, "provider unavailable");
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "provider_unavailable",
                    e.to_string(),
                );
            }
            _ => {}
        }
        // A full disk refuses writes (SQLite rolls the transaction back, so nothing is
        // half-written) while reads go on; the client may retry once space is freed.
        if e.is_storage_full() {
            tracing::error!(error = %e, "write refused: storage is full");
            return ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "the instance's storage is full; nothing was written. Retry once space \
                 has been freed",
            );
        }
        // The cause is logged (errors never carry secret values); the client gets a
        // generic message.
        tracing::error!(error = %e, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}
