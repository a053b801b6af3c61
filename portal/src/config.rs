//! Command-line configuration of `tenantry-portal`: one clap struct, every flag also an
//! environment variable (`TENANTRY_PORTAL_…`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// `tenantry-portal`: the signup portal, a web client of the control API.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tenantry-portal", version, about)]
pub struct Config {
    /// Address the portal listens on.
    #[arg(long, env = "TENANTRY_PORTAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The control API (`http://HOST:PORT`, or `https://HOST:PORT` with `--api-ca-file`).
    #[arg(
        long,
        env = "TENANTRY_PORTAL_API",
        default_value = "http://127.0.0.1:50051"
    )]
    pub api: String,

    /// PEM file of the CA that signed the API's certificate (for an `https://` API).
    #[arg(long, env = "TENANTRY_PORTAL_API_CA_FILE")]
    pub api_ca_file: Option<PathBuf>,

    /// File holding the cookie key: 32 random bytes, base64 (`head -c 32 /dev/urandom |
    /// base64`). Every replica must share it; changing it signs everyone out.
    #[arg(long, env = "TENANTRY_PORTAL_COOKIE_KEY_FILE")]
    pub cookie_key_file: PathBuf,

    /// The URL people open (`https://…` makes the cookie `Secure` and sends HSTS);
    /// default `http://` + the listen address.
    #[arg(long, env = "TENANTRY_PORTAL_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// PEM certificate chain to serve HTTPS with (with `--tls-key-file`).
    #[arg(long, env = "TENANTRY_PORTAL_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of `--tls-cert-file`.
    #[arg(long, env = "TENANTRY_PORTAL_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Shut down when standard input reaches its end: `tenantry-api dev` holds the other
    /// end of a pipe, so its portal stops even when it is killed.
    #[arg(long, env = "TENANTRY_PORTAL_EXIT_ON_STDIN_CLOSE")]
    pub exit_on_stdin_close: bool,
}

impl Config {
    /// The public URL, without a trailing `/`.
    pub fn public_url(&self) -> String {
        let url = match &self.public_url {
            Some(url) => url.clone(),
            None if self.tls_cert_file.is_some() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        };
        url.trim_end_matches('/').to_owned()
    }

    /// Whether people reach the portal over HTTPS (the cookie is then `Secure`).
    pub fn https(&self) -> bool {
        self.public_url().starts_with("https://")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_and_public_url() {
        let c = Config::try_parse_from(["p", "--cookie-key-file", "/k"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.api, "http://127.0.0.1:50051");
        assert_eq!(c.public_url(), "http://127.0.0.1:8080");
        assert!(!c.https());
        let c = Config::try_parse_from([
            "p",
            "--cookie-key-file",
            "/k",
            "--public-url",
            "https://portal.example/",
        ])
        .unwrap();
        assert_eq!(c.public_url(), "https://portal.example");
        assert!(c.https());
    }

    #[test]
    fn a_cookie_key_is_required_and_tls_comes_in_pairs() {
        assert!(Config::try_parse_from(["p"]).is_err());
        assert!(
            Config::try_parse_from(["p", "--cookie-key-file", "/k", "--tls-cert-file", "/c"])
                .is_err()
        );
    }
}
