//! The saved session: which server, and the bearer token, in a JSON file that only the user
//! can read (mode 0600 in a 0700 directory), written atomically.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::error::{Error, Result};

/// A logged-in session. `Debug` shows no token.
#[derive(Debug, Deserialize)]
pub struct Session {
    /// The server that issued the token.
    pub server: String,
    /// The bearer token.
    pub token: SecretString,
    /// Absolute expiry (RFC 3339), for display only; the server decides.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// The session file: `--session-file`, else `$XDG_CONFIG_HOME/tenantry/session`, else
/// `~/.config/tenantry/session`.
pub fn path(
    flag: Option<&Path>,
    xdg_config_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    // An empty or relative XDG_CONFIG_HOME is invalid per the spec and is ignored.
    let config = match xdg_config_home.filter(|p| p.is_absolute()) {
        Some(dir) => dir,
        None => home
            .filter(|p| !p.as_os_str().is_empty())
            .map(|h| h.join(".config"))
            .ok_or_else(|| {
                Error::Usage(
                    "cannot find a home directory for the session file; pass --session-file".into(),
                )
            })?,
    };
    Ok(config.join("tenantry").join("session"))
}

/// Reads the saved session; [`Error::NotLoggedIn`] when there is none.
pub fn load(path: &Path) -> Result<Session> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotLoggedIn),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    serde_json::from_str(&text).map_err(|e| Error::CorruptSession {
        path: path.display().to_string(),
        // serde_json's message names the position, never the content.
        detail: e.to_string(),
    })
}

/// Writes the session so that only the user can read it, replacing any previous one.
pub fn save(path: &Path, session: &Session) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(Error::io(format!("creating {}", dir.display())))?;
    let body = serde_json::json!({
        "server": session.server,
        "token": session.token.expose_secret(),
        "expires_at": session.expires_at,
    });
    let text = zeroize::Zeroizing::new(body.to_string());
    // Write a private temporary file and rename it over the old one, so the token is never
    // in a file with wider permissions and a crash leaves either the old or the new session.
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "session".to_owned());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    if let Err(e) = write_private(&tmp, text.as_bytes()).and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()))(e));
    }
    Ok(())
}

/// Creates `path` (which must not exist) with mode 0600 and writes `bytes` to it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The mode above is filtered by the umask; make sure it is exactly 0600.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Deletes the session file; a missing file is fine.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("deleting {}", path.display()))(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_follows_xdg_then_home() {
        assert_eq!(
            path(None, Some("/x".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/x/tenantry/session")
        );
        assert_eq!(
            path(None, Some("relative".into()), Some("/home/u".into())).unwrap(),
            PathBuf::from("/home/u/.config/tenantry/session")
        );
        assert_eq!(
            path(Some(Path::new("/s")), None, None).unwrap(),
            PathBuf::from("/s")
        );
        assert!(path(None, None, None).is_err());
    }

    #[test]
    fn saved_sessions_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("conf/tenantry/session");
        let session = Session {
            server: "http://127.0.0.1:1".into(),
            token: SecretString::from("tok-123"),
            expires_at: None,
        };
        assert!(!format!("{session:?}").contains("tok-123"));
        save(&file, &session).unwrap();
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let back = load(&file).unwrap();
        assert_eq!(back.token.expose_secret(), "tok-123");
        assert_eq!(back.server, session.server);
        remove(&file).unwrap();
        assert!(matches!(load(&file), Err(Error::NotLoggedIn)));
        remove(&file).unwrap();
    }
}
