//! What can stop the portal from starting or serving.

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate outside a request (requests answer pages).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cookie key file is unusable.
    #[error("cookie key: {0}")]
    CookieKey(String),
    /// A file could not be read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// Sealing the cookie failed.
    #[error("sealing the session cookie failed")]
    Crypto,
    /// The API cannot be reached.
    #[error("the control API")]
    Api(#[source] tenantry_client::Error),
}
