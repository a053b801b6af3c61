//! What the Tenantry test suites share: the password test users sign up with, a free
//! loopback port, polling until something holds, and an HTTPS client for tenant runtimes.
//!
//! The crates take it as a dev-dependency (`tenantry-tests`, which exists only for tests,
//! as a normal one). It depends on no database or Kubernetes crate, so building it stays
//! cheap for every suite.
// Test support: a failed step should fail the test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod https;

use std::future::Future;
use std::time::Duration;

pub use https::{Conn, Https, Response, client_config};

/// The password every test user signs up with: strong enough for the API's password rules.
pub const PASSWORD: &str = "violet-Harbor-93-lantern";

/// A loopback port nobody listens on right now (for a server the test starts as a process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every `every` until it returns true; false once `within` has passed
/// without. The check runs once more after the deadline, so a slow last poll still counts.
pub async fn eventually<F, Fut>(within: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(within, every, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `poll` every `every` until it yields a value; `None` once `within` has passed
/// without. Like [`eventually`], for a check that has something to hand back.
pub async fn eventually_some<T, F, Fut>(within: Duration, every: Duration, mut poll: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = poll().await {
            return Some(value);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// The mail files (`*.eml`) in `dir`, oldest name first, as text with quoted-printable
/// parts decoded (a verification link is longer than a 7-bit line, so it travels
/// quoted-printable); empty when `dir` does not exist yet.
pub fn read_mail(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|m| decode_quoted_printable(&m))
        .collect()
}

/// Quoted-printable decoding (RFC 2045): soft line breaks removed, `=XX` decoded.
pub fn decode_quoted_printable(text: &str) -> String {
    let text = text.replace("=\r\n", "");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'=', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The verification link (`…/verify-email?token=…`) last mailed to `to` among `mails`.
pub fn verification_link(mails: &[String], to: &str) -> Option<String> {
    mails
        .iter()
        .rev()
        .filter(|m| {
            m.lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("To: {to}")))
        })
        .find_map(|m| {
            let at = m.find("/verify-email?token=")?;
            let start = m[..at].rfind("http")?;
            let end = at
                + "/verify-email?token=".len()
                + m[at + "/verify-email?token=".len()..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    .unwrap_or(0);
            Some(m[start..end].to_owned())
        })
}

/// The `kid` in an instance token's header (read without verifying anything: for tests
/// that check which key signed a token).
pub fn token_kid(token: &str) -> String {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}
