//! The API's integration tests, in one binary: the real server on a loopback port, driven
//! by real tonic clients through the harness in `common`; one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Shared with cli/tests/ctl.rs: each suite uses helpers the other does not.
#[allow(dead_code)]
mod common;

mod access;
mod accounts;
mod admin;
mod backup;
mod forwarded;
mod keyring;
mod kubernetes;
mod mail;
mod mfa;
mod platform;
mod store;
mod token_keys;
