//! What can go wrong before a call leaves: an unusable address, TLS settings that do not
//! fit the address, a CA file that cannot be read, a server that cannot be reached, or a
//! token that cannot travel as a header.
//!
//! No variant carries a token: callers render the message and its sources as they like
//! (the CLI names its own flags), so the messages here name no flag.

use std::path::PathBuf;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is neither `http://…` nor `https://…`.
    #[error("the server address must start with http:// or https://, got {server:?}")]
    Scheme {
        /// The address as given.
        server: String,
    },
    /// The address is not a URI tonic can use.
    #[error("invalid server address {server:?}")]
    Address {
        /// The address as given.
        server: String,
        /// Why tonic refused it.
        #[source]
        source: tonic::transport::Error,
    },
    /// An `https://` address without a CA to trust.
    #[error("an https:// server needs the CA that signed its certificate")]
    CaRequired,
    /// A CA file given for an `http://` address, where it would silently do nothing.
    #[error("a CA file is only used with an https:// server")]
    CaWithoutTls,
    /// A TLS server name given for an `http://` address, where it would silently do nothing.
    #[error("a TLS server name is only used with an https:// server")]
    ServerNameWithoutTls,
    /// The CA file cannot be read.
    #[error("reading the CA file {}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// tonic refused the TLS settings made from the CA file.
    #[error("TLS setup with {}", path.display())]
    Tls {
        /// The CA file.
        path: PathBuf,
        /// Why tonic refused them.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server cannot be reached, or its certificate is not trusted.
    #[error("cannot connect to {server}")]
    Connect {
        /// The address.
        server: String,
        /// Why, with every cause below it.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token has characters a metadata value cannot carry.
    #[error("the session token is not a valid header value")]
    MalformedToken(#[source] tonic::metadata::errors::InvalidMetadataValue),
}
