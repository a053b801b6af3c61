//! A minimal HTTPS readiness probe: TLS to a loopback port, verified against a given CA
//! for a given name, then `GET /readyz`. Enough to tell "serving with the certificate we
//! issued" from anything else, without an HTTP client library.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TLS client that trusts exactly one CA.
#[derive(Clone)]
pub struct Prober {
    connector: TlsConnector,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prober")
    }
}

impl Prober {
    /// A prober trusting the CA certificate(s) in `ca_pem`.
    pub fn new(ca_pem: &str) -> Result<Self, String> {
        let config = tenantry_pki::client_config(ca_pem).map_err(|e| e.to_string())?;
        Ok(Prober {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The leaf certificate (DER) the server on loopback `port` presents for `name`, when
    /// it verifies against the CA(s); `Err(why)` otherwise (not listening, or another CA).
    pub async fn served_certificate(&self, port: u16, name: &str) -> Result<Vec<u8>, String> {
        let attempt = async {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
            let tls = self
                .connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .ok_or_else(|| "no certificate".to_owned())
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    /// `Ok(())` when `https://<name>:<port>/readyz` on 127.0.0.1 answers 200 with a
    /// certificate for `name` from the CA; `Err(why)` otherwise.
    pub async fn ready(&self, port: u16, name: &str) -> Result<(), String> {
        let attempt = async {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
            let mut tls = self
                .connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            tls.write_all(
                format!("GET /readyz HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| format!("write: {e}"))?;
            let mut head = vec![0u8; 64];
            let n = tls
                .read(&mut head)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let line = String::from_utf8_lossy(&head[..n]);
            if line.starts_with("HTTP/1.1 200") {
                Ok(())
            } else {
                Err(format!(
                    "/readyz answered {}",
                    line.lines().next().unwrap_or_default()
                ))
            }
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| "timed out".to_owned())?
    }
}
