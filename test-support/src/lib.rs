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
