//! HTTPS to OAuth 2 providers: the one way the runtime calls out. Every request goes to an
//! `https` URL whose host is on `oauth2.allowed_hosts` (checked on each request, not only
//! when a credential is made), over rustls with the system's roots (plus `oauth2.ca_file`
//! when set), HTTP/1.1, with a timeout and a cap on the response size. Redirects are
//! never followed: a provider endpoint that answers 3xx fails the request, and the error
//! names the host it pointed to and whether that host is allowed. The tenant's
//! NetworkPolicy egress rules apply underneath.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oauth2::{HttpRequest, HttpResponse};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tenantry_proto::runtime_config::OAuth2Config;

use crate::error::{Error, Result};

/// How long one request to a provider may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest provider response read (token responses are a few hundred bytes).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The HTTPS client for providers, bound to the allow-list it enforces. `step` names the
/// request in errors (set per call by [`Provider::for_step`]).
#[derive(Clone)]
pub struct Provider {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    config: Arc<OAuth2Config>,
    step: &'static str,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("allowed_hosts", &self.config.allowed_hosts)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// A client for the providers `config` allows, trusting the system's roots and
    /// `config.ca_file`.
    pub fn new(config: &OAuth2Config) -> Result<Provider> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = &config.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        if roots.is_empty() && !config.allowed_hosts.is_empty() {
            tracing::warn!(
                "no trusted roots for OAuth 2 providers (no system roots, no oauth2.ca_file); every provider call will fail"
            );
        }
        tracing::debug!(system_roots = added, "OAuth 2 provider trust loaded");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(Error::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(Provider {
            client: Client::builder(TokioExecutor::new()).build(https),
            config: Arc::new(config.clone()),
            step: "request",
        })
    }

    /// The same client, naming `step` in its errors.
    pub fn for_step(&self, step: &'static str) -> Provider {
        Provider {
            step,
            ..self.clone()
        }
    }

    /// Checks that `url` is an `https` URL on an allowed host; `what` names it in the
    /// error.
    pub fn check_url(&self, what: &'static str, url: &str) -> Result<()> {
        let refused = |reason: String| Error::EndpointRefused { what, reason };
        let parsed = oauth2::url::Url::parse(url)
            .map_err(|_| refused("must be an absolute https URL".to_owned()))?;
        if parsed.scheme() != "https" {
            return Err(refused("must be an https URL".to_owned()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(refused("must not hold credentials".to_owned()));
        }
        let host = match parsed.host() {
            Some(oauth2::url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(oauth2::url::Host::Ipv4(ip)) => ip.to_string(),
            Some(oauth2::url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(refused("must name a host".to_owned())),
        };
        let port = parsed.port_or_known_default().unwrap_or(443);
        if !self.config.allows(&host, port) {
            return Err(refused(format!(
                "host {host} (port {port}) is not in oauth2.allowed_hosts"
            )));
        }
        Ok(())
    }

    fn unavailable(&self, reason: impl Into<String>) -> Error {
        Error::ProviderUnavailable {
            step: self.step,
            reason: reason.into(),
        }
    }

    /// Sends one request (see the module docs for what is checked).
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse> {
        let uri = request.uri().to_string();
        self.check_url("provider endpoint", &uri)?;
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.unavailable(describe_client_error(&e)))?;
            let (parts, body) = response.into_parts();
            if parts.status.is_redirection() {
                return Err(self.redirect_error(&parts.headers));
            }
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|_| self.unavailable("response unreadable or too large"))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    fn redirect_error(&self, headers: &http::HeaderMap) -> Error {
        let target = headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| oauth2::url::Url::parse(v).ok());
        let reason = match target {
            Some(url) => {
                let host = url.host_str().unwrap_or("").to_ascii_lowercase();
                let port = url.port_or_known_default().unwrap_or(443);
                let listed = if self.config.allows(&host, port) {
                    "allowed"
                } else {
                    "not in oauth2.allowed_hosts"
                };
                format!("redirect to {host} ({listed}) refused: redirects are never followed")
            }
            None => "redirect refused: redirects are never followed".to_owned(),
        };
        self.unavailable(reason)
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Provider {
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// The cause of a failed request, down to the innermost error (connection refused, TLS
/// certificate problem, …). These come from the network stack, never from a body.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = String::from("request failed");
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("request failed: {cause}");
        source = cause.source();
    }
    text
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<()> {
    let pem = std::fs::read(path).map_err(|source| Error::ReadFile {
        what: "oauth2.ca_file",
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::ProviderCa {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::ProviderCa {
            path: path.to_owned(),
            message: "no PEM certificate in it".to_owned(),
        });
    }
    for cert in certs {
        roots.add(cert).map_err(|e| Error::ProviderCa {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn provider(hosts: &[&str]) -> Provider {
        Provider::new(&OAuth2Config {
            allowed_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ca_file: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn only_https_urls_on_allowed_hosts_pass() {
        let p = provider(&["auth.example.com", "localhost:8443"]);
        assert!(
            p.check_url("token_url", "https://auth.example.com/token")
                .is_ok()
        );
        assert!(
            p.check_url("token_url", "https://AUTH.example.com:444/t")
                .is_ok()
        );
        assert!(p.check_url("token_url", "https://localhost:8443/t").is_ok());
        for bad in [
            "http://auth.example.com/token",
            "https://localhost/t",
            "https://evil.example.com/token",
            "https://user:pw@auth.example.com/token",
            "auth.example.com/token",
            "https://auth.example.com.evil.net/token",
        ] {
            let err = p.check_url("token_url", bad).unwrap_err();
            assert!(matches!(err, Error::EndpointRefused { .. }), "{bad}: {err}");
        }
        let err = p
            .check_url("token_url", "https://evil.example.com/t?secret=1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("evil.example.com"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn a_request_to_a_host_off_the_list_is_never_sent() {
        let p = provider(&["auth.example.com"]);
        let request = http::Request::builder()
            .method("POST")
            .uri("https://127.0.0.1:1/token")
            .body(Vec::new())
            .unwrap();
        let err = p.send(request).await.unwrap_err();
        assert!(matches!(err, Error::EndpointRefused { .. }), "{err}");
    }
}
