//! `tenantry-api dev` runs the signup portal too: the `tenantry-portal` binary as a child
//! process on `--portal-listen`, talking to this API, with its cookie key kept in the data
//! directory (`portal-cookie.key`, made on first start) so sign-ins survive a restart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use secrecy::ExposeSecret as _;

use crate::config::DevArgs;
use crate::error::{Error, Result};

/// The portal's cookie key in the data directory.
pub const PORTAL_COOKIE_KEY_FILE: &str = "portal-cookie.key";

/// How long the portal has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the portal has to drain its connections at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The running portal; dropping it stops the process.
#[derive(Debug)]
pub struct Portal {
    child: tokio::process::Child,
    /// The write end of the portal's stdin: it runs only while this is held
    /// (`--exit-on-stdin-close`), so it stops even when this process is killed.
    lifeline: Option<tokio::process::ChildStdin>,
    /// The URL to open.
    pub url: String,
}

/// `tenantry-portal` next to this program, else on `PATH`.
pub fn find_portal_bin() -> Option<PathBuf> {
    let name = "tenantry-portal";
    let beside = std::env::current_exe().ok()?.parent().map(|d| d.join(name));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where the portal reaches an API listening on `listen` (loopback for a wildcard).
pub fn api_url(listen: SocketAddr, tls: bool) -> String {
    let ip = if listen.ip().is_unspecified() {
        match listen.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, listen.port()))
}

/// The cookie key file in `data_dir`, created (0600) if missing.
fn ensure_cookie_key(data_dir: &Path) -> Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(PORTAL_COOKIE_KEY_FILE);
    if path.exists() {
        return Ok(path);
    }
    let io = |what: String| move |source| Error::Io { what, source };
    std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
    // The same format as the master key: base64 of 32 random bytes.
    let (_, text) = crate::crypto::MasterKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    file.write_all(format!("{}\n", text.expose_secret()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(path)
}

/// Starts the portal for `args` and waits until it listens.
pub async fn start_portal(args: &DevArgs) -> Result<Portal> {
    let bin = match &args.portal_bin {
        Some(bin) => bin.clone(),
        None => find_portal_bin().ok_or_else(|| {
            Error::Config(
                "tenantry-portal binary not found next to tenantry-api or on PATH (build it with `cargo build --workspace`, pass --portal-bin, or run with --no-portal)".into(),
            )
        })?,
    };
    // Fail with a clear message before starting anything when the port is taken.
    drop(
        std::net::TcpListener::bind(args.portal_listen).map_err(|e| {
            Error::Config(format!(
                "the portal cannot listen on {}: {e} (choose another with --portal-listen, or --no-portal)",
                args.portal_listen
            ))
        })?,
    );
    let key = ensure_cookie_key(&args.serve.db.data_dir)?;
    let serve = &args.serve;
    let mut command = tokio::process::Command::new(&bin);
    command
        .arg("--listen")
        .arg(args.portal_listen.to_string())
        .arg("--api")
        .arg(api_url(serve.listen, serve.tls_cert_file.is_some()))
        .arg("--cookie-key-file")
        .arg(&key)
        .arg("--exit-on-stdin-close")
        .stdin(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cert) = &serve.tls_cert_file {
        command.arg("--api-ca-file").arg(cert);
    }
    let mut child = command.spawn().map_err(|source| Error::Io {
        what: format!("starting {}", bin.display()),
        source,
    })?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Config(format!(
                "tenantry-portal exited at start ({status}); its log is above"
            )));
        }
        if tokio::net::TcpStream::connect(args.portal_listen)
            .await
            .is_ok()
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(Error::Config(format!(
                "tenantry-portal did not listen on {} within {START_TIMEOUT:?}",
                args.portal_listen
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lifeline = child.stdin.take();
    Ok(Portal {
        child,
        lifeline,
        url: format!("http://{}", args.portal_listen),
    })
}

impl Portal {
    /// Stops the portal: closes its stdin so that it drains its connections, and kills it
    /// if it is still running after [`STOP_GRACE`].
    pub async fn stop(mut self) {
        self.lifeline = None;
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_portal_reaches_a_wildcard_api_on_loopback() {
        assert_eq!(
            api_url("0.0.0.0:50051".parse().unwrap(), false),
            "http://127.0.0.1:50051"
        );
        assert_eq!(api_url("[::]:1".parse().unwrap(), true), "https://[::1]:1");
        assert_eq!(
            api_url("10.1.2.3:5".parse().unwrap(), false),
            "http://10.1.2.3:5"
        );
    }

    #[test]
    fn the_cookie_key_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = ensure_cookie_key(dir.path()).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ensure_cookie_key(dir.path()).unwrap(), path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    }
}
