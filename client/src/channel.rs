//! The channel to the API: plaintext for `http://`, TLS for `https://` trusting exactly the
//! CA the caller names (the API's certificates come from an operator's own CA, never from
//! the public roots).

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// How long a connection attempt may take before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one call may take; every rpc of the API is unary, so none should come close.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How to trust an `https://` server. The default suits `http://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trust<'a> {
    /// PEM file of the CA that signed the server's certificate; required for `https://`.
    pub ca_file: Option<&'a Path>,
    /// Name the certificate must carry, if not the host of the address (e.g. the Service
    /// name when the address is a `kubectl port-forward`).
    pub server_name: Option<&'a str>,
}

/// Connects to `server` (`http://HOST:PORT` or `https://HOST:PORT`); a connection attempt
/// gives up after 10 s, a call after 60 s.
///
/// TLS settings that do not fit the scheme are refused rather than ignored, so a
/// forgotten `https` never sends a token in plaintext while the caller believes it is
/// protected.
pub async fn connect(server: &str, trust: Trust<'_>) -> Result<Channel> {
    let https = if server.starts_with("https://") {
        true
    } else if server.starts_with("http://") {
        false
    } else {
        return Err(Error::Scheme {
            server: server.to_owned(),
        });
    };
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|source| Error::Address {
            server: server.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    match (https, trust.ca_file) {
        (true, Some(path)) => endpoint = with_tls(endpoint, path, trust.server_name)?,
        (true, None) => return Err(Error::CaRequired),
        (false, Some(_)) => return Err(Error::CaWithoutTls),
        (false, None) if trust.server_name.is_some() => return Err(Error::ServerNameWithoutTls),
        (false, None) => {}
    }
    endpoint.connect().await.map_err(|source| Error::Connect {
        server: server.to_owned(),
        source,
    })
}

/// `endpoint` trusting only the CA in `ca_file`, checking the certificate against
/// `server_name` when given.
fn with_tls(endpoint: Endpoint, ca_file: &Path, server_name: Option<&str>) -> Result<Endpoint> {
    let pem = std::fs::read(ca_file).map_err(|source| Error::ReadCa {
        path: ca_file.to_path_buf(),
        source,
    })?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    endpoint.tls_config(tls).map_err(|source| Error::Tls {
        path: ca_file.to_path_buf(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    async fn refused(server: &str, trust: Trust<'_>) -> Error {
        match connect(server, trust).await {
            Ok(_) => panic!("{server} connected"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn only_http_and_https_addresses_are_used() {
        let e = refused("127.0.0.1:50051", Trust::default()).await;
        assert!(matches!(e, Error::Scheme { .. }), "{e:?}");
        let e = refused("http://bad host:1", Trust::default()).await;
        assert!(matches!(e, Error::Address { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn tls_settings_must_fit_the_scheme() {
        let ca = Path::new("/nonexistent/ca.pem");
        let e = refused("https://127.0.0.1:1", Trust::default()).await;
        assert!(matches!(e, Error::CaRequired), "{e:?}");
        let with_ca = Trust {
            ca_file: Some(ca),
            server_name: None,
        };
        let e = refused("http://127.0.0.1:1", with_ca).await;
        assert!(matches!(e, Error::CaWithoutTls), "{e:?}");
        let with_name = Trust {
            ca_file: None,
            server_name: Some("api.example"),
        };
        let e = refused("http://127.0.0.1:1", with_name).await;
        assert!(matches!(e, Error::ServerNameWithoutTls), "{e:?}");
        let e = refused("https://127.0.0.1:1", with_ca).await;
        match e {
            Error::ReadCa { path, source } => {
                assert_eq!(path, ca);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            e => panic!("{e:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_names_its_address() {
        // Port 9 (discard) has no listener on a test machine's loopback.
        let e = refused("http://127.0.0.1:9", Trust::default()).await;
        assert!(matches!(&e, Error::Connect { server, .. } if server == "http://127.0.0.1:9"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
