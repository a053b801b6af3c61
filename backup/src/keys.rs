//! Backup keys: an age X25519 identity (the private half, kept away from the backups) and
//! its recipient (the public half, all a backup writer needs). The files are age's own
//! formats, so `age -d -i backup.key` opens a backup too.

use std::path::Path;

use secrecy::ExposeSecret as _;

use crate::error::{Error, Result};

/// The recipients a backup is encrypted to (any one of their identities opens it).
pub struct Recipients(Vec<age::x25519::Recipient>);

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|r| r.to_string()))
            .finish()
    }
}

impl Recipients {
    /// Reads every recipient (`age1…`, one per line; `#` comments and blank lines skipped)
    /// from each file; at least one in all.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Recipients> {
        let mut all = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Key(format!(
                    "cannot read the recipient file {}: {e}",
                    path.display()
                ))
            })?;
            all.extend(Recipients::parse(&text, &path.display().to_string())?.0);
        }
        if all.is_empty() {
            return Err(Error::Key(
                "no backup recipient given (a recipient file holds `age1…` lines)".into(),
            ));
        }
        Ok(Recipients(all))
    }

    /// Parses recipient lines; `origin` names their source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Recipients> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("AGE-SECRET-KEY-") {
                return Err(Error::Key(format!(
                    "{origin}:{}: this is a private key (an identity); a backup writer takes only the public recipient (`age1…`)",
                    n + 1
                )));
            }
            let recipient = line.parse::<age::x25519::Recipient>().map_err(|e| {
                Error::Key(format!(
                    "{origin}:{}: not an age X25519 recipient: {e}",
                    n + 1
                ))
            })?;
            out.push(recipient);
        }
        Ok(Recipients(out))
    }

    /// One recipient.
    pub fn from_one(recipient: age::x25519::Recipient) -> Recipients {
        Recipients(vec![recipient])
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &dyn age::Recipient> {
        self.0.iter().map(|r| r as &dyn age::Recipient)
    }
}

/// The identities a reader tries.
pub struct Identities(Vec<age::x25519::Identity>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({} redacted)", self.0.len())
    }
}

impl Identities {
    /// Reads the identities (`AGE-SECRET-KEY-1…` lines) of an identity file, which other
    /// users must not be able to read.
    pub fn load(path: &Path) -> Result<Identities> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::Key(format!(
                "cannot read the identity file {}: {e}",
                path.display()
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::Key(format!(
                "the identity file {} can be read by other users (mode {:o}); make it 0600",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = secrecy::SecretString::from(std::fs::read_to_string(path).map_err(|e| {
            Error::Key(format!(
                "cannot read the identity file {}: {e}",
                path.display()
            ))
        })?);
        let mut out = Vec::new();
        for (n, line) in text.expose_secret().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The parse error never quotes the line: it is a private key.
            let identity = line.parse::<age::x25519::Identity>().map_err(|e| {
                Error::Key(format!(
                    "{}:{}: not an age X25519 identity ({e})",
                    path.display(),
                    n + 1
                ))
            })?;
            out.push(identity);
        }
        if out.is_empty() {
            return Err(Error::Key(format!(
                "{} holds no identity (`AGE-SECRET-KEY-1…`)",
                path.display()
            )));
        }
        Ok(Identities(out))
    }

    /// One identity.
    pub fn from_one(identity: age::x25519::Identity) -> Identities {
        Identities(vec![identity])
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.0.iter().map(|i| i as &dyn age::Identity)
    }
}

/// Writes a new identity to `identity_path` (0600, as `age-keygen` writes it) and its
/// recipient to `recipient_path` (0644); refuses to overwrite either. Returns the
/// recipient.
pub fn generate(identity_path: &Path, recipient_path: &Path) -> Result<String> {
    for path in [identity_path, recipient_path] {
        if path.exists() {
            return Err(Error::Key(format!(
                "{} exists; keygen never overwrites keys (move it away first)",
                path.display()
            )));
        }
    }
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    let secret = secrecy::SecretString::from(format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string())
    ));
    write_new(identity_path, secret.expose_secret().as_bytes(), 0o600)?;
    write_new(
        recipient_path,
        format!("# Tenantry backup recipient, created {created}\n{recipient}\n").as_bytes(),
        0o644,
    )?;
    Ok(recipient)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(Error::io(format!("writing {}", path.display())))
}
