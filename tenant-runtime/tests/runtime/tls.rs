//! HTTPS with the managed certificate: only TLS is served; a rotated certificate reaches
//! new connections without a restart while open connections keep working; a mismatched
//! or half-written pair is refused (the old one keeps serving); `/readyz` fails while
//! the certificate files cannot be read, but not for a pair caught mid-replacement.

use std::time::Duration;

use tenantry_test_support::eventually;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::{self, Instance, POLL};

#[tokio::test]
async fn rotation_reaches_new_connections_and_spares_open_ones() {
    let app = Instance::start().await;
    let mut old_conn = app.connect().await;
    let first_cert = old_conn.peer_cert.clone();
    let token = app.token();
    let r = old_conn
        .send("GET", "/v1/executions", Some(&token), None, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let new_cert = app.rotate_certificate();
    assert_ne!(new_cert, first_cert);
    let rotated = eventually(Duration::from_secs(5), POLL, || async {
        app.connect().await.peer_cert == new_cert
    })
    .await;
    assert!(rotated, "new connections still get the old certificate");

    // The connection opened before the rotation still serves requests.
    let r = old_conn
        .send("GET", "/v1/executions", Some(&token), None, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(old_conn.peer_cert, first_cert);

    let metrics = app.call_as("GET", "/metrics", None, None).await.text;
    assert!(
        common::metric(&metrics, &["tenant_runtime_certificate_reloads_total"]) >= 1.0,
        "{metrics}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn mismatched_pair_keeps_the_old_certificate_until_fixed() {
    let app = Instance::start().await;
    let served = app.connect().await.peer_cert;
    // A new certificate whose key has not been written yet (the first half of a rotation).
    let (cert, key, der) = common::new_leaf(&app.ca);
    common::write_atomically(&app.root().join("tls/tls.crt"), cert.as_bytes());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        app.connect().await.peer_cert,
        served,
        "mismatched pair must not be served"
    );
    let ready = app.call_as("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.json["error"], "not_ready");

    // The key arrives: the new pair is served and the instance is ready again.
    common::write_atomically(&app.root().join("tls/tls.key"), key.as_bytes());
    assert!(
        eventually(Duration::from_secs(5), POLL, || async {
            app.connect().await.peer_cert == der
        })
        .await
    );
    assert_eq!(app.call_as("GET", "/readyz", None, None).await.status, 200);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readyz_waits_out_a_pair_caught_mid_replacement() {
    let app = Instance::start().await;
    let (cert, key, der) = common::new_leaf(&app.ca);
    // The writer renames the certificate, then the key 100 ms later: a probe that
    // arrives in between sees a mismatched pair, and answers once the key is there.
    common::write_atomically(&app.root().join("tls/tls.crt"), cert.as_bytes());
    let key_path = app.root().join("tls/tls.key");
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        common::write_atomically(&key_path, key.as_bytes());
    });
    let ready = app.call_as("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    writer.await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), POLL, || async {
            app.connect().await.peer_cert == der
        })
        .await
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readyz_fails_while_the_certificate_is_unreadable() {
    let app = Instance::start().await;
    let cert_path = app.root().join("tls/tls.crt");
    let saved = std::fs::read(&cert_path).unwrap();
    std::fs::remove_file(&cert_path).unwrap();
    let r = app.call_as("GET", "/readyz", None, None).await;
    assert_eq!(r.status, 503);
    assert!(
        r.json["message"].as_str().unwrap().contains("certificate"),
        "{}",
        r.text
    );
    // Still serving with the loaded certificate meanwhile.
    assert_eq!(app.call_as("GET", "/healthz", None, None).await.status, 200);
    std::fs::write(&cert_path, saved).unwrap();
    assert_eq!(app.call_as("GET", "/readyz", None, None).await.status, 200);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_is_not_served() {
    let app = Instance::start().await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !common::contains(&buf, b"HTTP/1.1 200"),
        "plain HTTP got an HTTP answer"
    );
    assert!(!common::contains(&buf, b"\"status\""));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn http2_is_offered_by_alpn() {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let app = Instance::start().await;
    let mut config = (*tenantry_test_support::client_config(&app.ca.pem())).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(format!(
            "https://localhost:{}/v1/executions",
            app.addr.port()
        ))
        .header("authorization", format!("Bearer {}", app.token()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(json["items"].is_array());
    app.stop().await.unwrap();
}
