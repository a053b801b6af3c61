//! Private local files: the data directory is 0700, the SQLite database and its WAL and
//! shared-memory files 0600, and a key file that other users can read stops the start.
//!
//! The database holds password hashes, sealed secrets and the audit log, so on a machine
//! with other users none of it may be readable by them. Existing files made by an earlier
//! version (0755 and 0644 under the usual umask) are narrowed at start.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The mode of the data directory and of the directory holding the database.
pub const DIR_MODE: u32 = 0o700;
/// The mode of the database files.
pub const DB_FILE_MODE: u32 = 0o600;
/// The SQLite files beside the database: write-ahead log and shared memory.
const SQLITE_SIDE_FILES: [&str; 2] = ["-wal", "-shm"];

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .map_err(io_err(format!("reading the mode of {}", path.display())))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Narrows `path` to `mode` unless it already is exactly that.
fn narrow(path: &Path, mode: u32) -> Result<()> {
    let current = mode_of(path)?;
    if current & 0o777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(
            format!("setting the mode of {} to {mode:o}", path.display()),
        ))?;
        tracing::info!(path = %path.display(), from = format!("{current:o}"), to = format!("{mode:o}"), "narrowed file mode");
    }
    Ok(())
}

/// Makes `dir` (and missing parents) with mode 0700, or narrows an existing `dir` to 0700.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    narrow(dir, DIR_MODE)
}

/// Before SQLite opens `db`: its directory 0700 (see [`private_dir`]), the database file
/// created empty with mode 0600 when missing (SQLite gives the WAL and shared-memory files
/// it makes later the database file's mode), and every existing database, WAL and
/// shared-memory file narrowed to 0600.
pub fn private_sqlite_files(db: &Path) -> Result<()> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DB_FILE_MODE)
        .open(db)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", db.display()))(e)),
    }
    narrow(db, DB_FILE_MODE)?;
    for suffix in SQLITE_SIDE_FILES {
        let mut side = db.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            narrow(&side, DB_FILE_MODE)?;
        }
    }
    Ok(())
}

/// Refuses a key file that users other than its owner and group may read or write, with
/// a message that says how to fix it; the key is never read in that case.
pub fn check_key_file(path: &Path) -> Result<()> {
    let mode = mode_of(path)?;
    if mode & 0o007 != 0 {
        return Err(Error::Config(format!(
            "key file {} is accessible by other users (mode {:o}); restrict it with `chmod 600 {}` (and consider the key exposed)",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        mode_of(path).unwrap() & 0o777
    }

    #[test]
    fn new_data_dirs_and_databases_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("a/b/tenantry.db");
        private_sqlite_files(&db).unwrap();
        assert_eq!(mode(&tmp.path().join("a/b")), 0o700);
        assert_eq!(mode(&db), 0o600);
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
    }

    #[test]
    fn existing_wide_modes_are_narrowed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let db = dir.join("tenantry.db");
        for f in ["tenantry.db", "tenantry.db-wal", "tenantry.db-shm"] {
            std::fs::write(dir.join(f), b"x").unwrap();
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        private_sqlite_files(&db).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for f in ["tenantry.db", "tenantry.db-wal", "tenantry.db-shm"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
            assert_eq!(std::fs::read(dir.join(f)).unwrap(), b"x", "{f} kept");
        }
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("master.key");
        std::fs::write(&key, b"k").unwrap();
        for ok in [0o600, 0o400, 0o640] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(ok)).unwrap();
            check_key_file(&key).unwrap();
        }
        for bad in [0o644, 0o604, 0o602] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bad)).unwrap();
            let message = check_key_file(&key).unwrap_err().to_string();
            assert!(message.contains(&format!("mode {bad:o}")), "{message}");
            assert!(message.contains("chmod 600"), "{message}");
        }
    }
}
