//! `--trusted-proxies`: the per-source rate limit and the audit log use the address in
//! `x-forwarded-for` only when the connection comes from a trusted proxy (the portal).

use tenantry_proto::v1::*;
use tonic::{Code, Request};

use crate::common::*;

async fn server(extra: &[&str]) -> (Database, TestServer) {
    let db = Database::new().await;
    let mut extra_args: Vec<String> = [
        "--rate-limit-per-second",
        "0.001",
        "--rate-limit-burst",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    extra_args.extend(extra.iter().map(|s| (*s).to_owned()));
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args,
            ..Default::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    (db, s)
}

async fn login_from(s: &TestServer, forwarded: &str) -> Code {
    let mut req = Request::new(LoginRequest {
        email: "nobody@example.com".into(),
        password: PASSWORD.into(),
    });
    req.metadata_mut()
        .insert("x-forwarded-for", forwarded.parse().unwrap());
    match s.accounts().login(req).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn audit_sources(s: &TestServer) -> Vec<String> {
    s.state
        .store
        .list_audit(0, 1000)
        .await
        .unwrap()
        .into_iter()
        // The server's own events (the token key import at first start) have no caller.
        .filter(|row| row.entry.source != "server")
        .map(|row| row.entry.source)
        .collect()
}

#[tokio::test]
async fn a_trusted_proxy_forwards_the_persons_address() {
    let (_db, s) = server(&["--trusted-proxies", "10.0.0.0/8,127.0.0.1"]).await;
    // Each forwarded address has its own bucket of two.
    assert_eq!(login_from(&s, "203.0.113.5").await, Code::Unauthenticated);
    assert_eq!(login_from(&s, "203.0.113.5").await, Code::Unauthenticated);
    assert_eq!(login_from(&s, "203.0.113.5").await, Code::ResourceExhausted);
    assert_eq!(login_from(&s, "203.0.113.6").await, Code::Unauthenticated);
    // A person cannot pick an address by writing one in front of the proxy's.
    assert_eq!(
        login_from(&s, "203.0.113.7, 203.0.113.5").await,
        Code::ResourceExhausted
    );
    let sources = audit_sources(&s).await;
    assert!(sources.iter().any(|x| x == "203.0.113.6"), "{sources:?}");
    assert!(!sources.iter().any(|x| x == "127.0.0.1"), "{sources:?}");
    s.stop().await;
}

#[tokio::test]
async fn without_trusted_proxies_the_header_is_ignored() {
    let (_db, s) = server(&[]).await;
    assert_eq!(login_from(&s, "203.0.113.5").await, Code::Unauthenticated);
    assert_eq!(login_from(&s, "203.0.113.6").await, Code::Unauthenticated);
    // Both came from loopback, whatever they claimed: one bucket.
    assert_eq!(login_from(&s, "203.0.113.7").await, Code::ResourceExhausted);
    let sources = audit_sources(&s).await;
    assert!(!sources.is_empty());
    assert!(sources.iter().all(|x| x == "127.0.0.1"), "{sources:?}");
    s.stop().await;
}
