//! What can go wrong with a backup file; every message names the file and the problem.

use std::path::PathBuf;

/// A backup error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file does not start like a backup.
    #[error("{path} is not a Tenantry backup (it does not start with the backup label)")]
    NotABackup {
        /// The file.
        path: PathBuf,
    },
    /// None of the identities is a recipient of the file.
    #[error(
        "{path}: none of the given identities can open this backup (it was encrypted to other recipients)"
    )]
    WrongIdentity {
        /// The file.
        path: PathBuf,
    },
    /// Decryption, decompression or a check failed: the file was changed or cut short.
    #[error("{path} is damaged or was changed: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },
    /// A key file is missing, unreadable, malformed or readable by others.
    #[error("{0}")]
    Key(String),
    /// The file to write exists.
    #[error("{0} exists; a backup never overwrites a file")]
    Exists(PathBuf),
    /// Encryption could not start.
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    /// A record over 64 MiB.
    #[error("a record is larger than 64 MiB")]
    TooLarge,
    /// Serializing a header failed.
    #[error("cannot encode the backup header: {0}")]
    Encode(String),
    /// The writer was used after it finished (a bug).
    #[error("the backup writer has finished")]
    Finished,
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    pub(crate) fn encode(e: serde_json::Error) -> Error {
        Error::Encode(e.to_string())
    }

    pub(crate) fn decrypt(path: &std::path::Path, e: age::DecryptError) -> Error {
        match e {
            age::DecryptError::NoMatchingKeys => Error::WrongIdentity {
                path: path.to_owned(),
            },
            other => Error::Corrupt {
                path: path.to_owned(),
                detail: other.to_string(),
            },
        }
    }
}
