//! An HTTPS client for tenant runtimes: HTTP/1.1 (hyper) over TLS (tokio-rustls), trusting
//! one CA and nothing else, so a test also sees certificate and name checks fail.

use std::io;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TLS client configuration (ring, safe default versions) that trusts only the CA
/// certificates in `ca_pem`.
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// Opens connections to tenant runtimes whose certificates chain to one CA.
#[derive(Clone)]
pub struct Https {
    tls: Arc<rustls::ClientConfig>,
}

impl Https {
    /// A client that trusts the CA certificates in `ca_pem`.
    pub fn new(ca_pem: &str) -> Https {
        Https {
            tls: client_config(ca_pem),
        }
    }

    /// Connects to `addr` (`host:port`, or an endpoint `https://host:port`) and checks that
    /// the certificate it presents is valid for `server_name`, which is also the `Host`
    /// of every request on the connection.
    pub async fn connect(&self, addr: &str, server_name: &str) -> io::Result<Conn> {
        let addr = addr.strip_prefix("https://").unwrap_or(addr);
        let name = ServerName::try_from(server_name.to_owned()).map_err(io::Error::other)?;
        let tcp = TcpStream::connect(addr).await?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: server_name.to_owned(),
            peer_cert,
        })
    }

    /// One request on a new connection (see [`Https::connect`]), with `token` as bearer
    /// credentials and `body` as JSON when given.
    pub async fn request(
        &self,
        addr: &str,
        server_name: &str,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> io::Result<Response> {
        let mut conn = self.connect(addr, server_name).await?;
        match body {
            Some(json) => {
                conn.send(
                    method,
                    path,
                    token,
                    Some("application/json"),
                    json.to_string().into_bytes(),
                )
                .await
            }
            None => conn.send(method, path, token, None, Vec::new()).await,
        }
    }
}

/// One HTTPS (HTTP/1.1) connection: requests on it share one TLS session.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    /// The leaf certificate (DER) the server presented on this connection.
    pub peer_cert: Vec<u8>,
}

impl Conn {
    /// Sends a request with `token` as bearer credentials and `body` of `content_type`,
    /// when given.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> io::Result<Response> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        if let Some(content_type) = content_type {
            headers.push(("content-type", content_type));
        }
        self.send_with_headers(method, path, &headers, body).await
    }

    /// Sends a request with no body and one header exactly as given (a malformed
    /// `authorization`, say).
    pub async fn send_with_header(
        &mut self,
        method: &str,
        path: &str,
        name: &str,
        value: &str,
    ) -> io::Result<Response> {
        self.send_with_headers(method, path, &[(name, value)], Vec::new())
            .await
    }

    async fn send_with_headers(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> io::Result<Response> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(io::Error::other)?;
        self.sender.ready().await.map_err(io::Error::other)?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        })
    }
}

/// A response, with its body as text and, when it is JSON, parsed (`Null` otherwise).
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The body as (lossy) UTF-8.
    pub text: String,
    /// The body parsed as JSON, or `Null`.
    pub json: serde_json::Value,
}
