//! The client against a real tonic server on a loopback port: TLS trusting only the named
//! CA, the certificate checked against an overriding name, and the bearer credentials
//! reaching the server through the interceptor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;

use secrecy::{ExposeSecret as _, SecretString};
use tenantry_client::{Client, Credentials, Error, Trust, connect};
use tenantry_pki::{CertificateAuthority, DEFAULT_LEAF_VALIDITY, LeafRequest};
use tonic::service::interceptor::InterceptorLayer;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The name in the server's certificate; the server listens on 127.0.0.1.
const SERVICE_NAME: &str = "tenantry-api.tenantry.svc";
const TOKEN: &str = "tok-of-the-test";

/// A CA made the way the operator and local mode make theirs, and a leaf for `name` from
/// it: (CA certificate, leaf certificate, leaf key), PEM.
fn test_pki(name: &str) -> (String, String, String) {
    let now = jiff::Timestamp::now();
    let ca = CertificateAuthority::generate("tenantry-client test CA", now).unwrap();
    let leaf = ca
        .issue_leaf(&LeafRequest {
            dns_names: vec![name.to_owned()],
            ip_addresses: vec![],
            validity: DEFAULT_LEAF_VALIDITY,
            now,
        })
        .unwrap();
    (
        ca.cert_pem().to_owned(),
        leaf.cert_pem,
        leaf.key_pem.expose_secret().to_owned(),
    )
}

/// Refuses every call without `authorization: Bearer TOKEN`.
#[allow(clippy::result_large_err)]
fn require_token(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get("authorization") {
        Some(v) if v == format!("Bearer {TOKEN}").as_str() => Ok(request),
        _ => Err(Status::unauthenticated("no bearer token")),
    }
}

/// A TLS health server whose certificate names [`SERVICE_NAME`]; returns its address and
/// the CA's PEM.
async fn tls_server() -> (SocketAddr, String) {
    let (ca, cert, key) = test_pki(SERVICE_NAME);
    let (_, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .unwrap()
        .layer(InterceptorLayer::new(require_token))
        .add_service(health);
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, ca)
}

fn trust<'a>(ca_file: &'a Path, server_name: Option<&'a str>) -> Trust<'a> {
    Trust {
        ca_file: Some(ca_file),
        server_name,
    }
}

#[tokio::test]
async fn tls_trusts_the_named_ca_and_checks_the_given_name() {
    let (addr, ca) = tls_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let server = format!("https://{addr}");

    let channel = connect(&server, trust(&ca_file, Some(SERVICE_NAME)))
        .await
        .unwrap();
    let creds = Credentials::bearer(&SecretString::from(TOKEN)).unwrap();
    let check = HealthClient::with_interceptor(channel.clone(), creds.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(check.into_inner().status, 1, "SERVING");
    // The same channel without credentials is refused by the server: the interceptor
    // is what carried the token.
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A `Client` sends its credentials on its service clients too.
    let status = Client::new(channel, creds)
        .accounts()
        .who_am_i(tenantry_proto::v1::WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // The certificate does not name 127.0.0.1.
    let e = connect(&server, trust(&ca_file, None)).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    // A CA that did not sign the certificate.
    let (other, _, _) = test_pki(SERVICE_NAME);
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other).unwrap();
    let e = connect(&server, trust(&other_file, Some(SERVICE_NAME)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
}
