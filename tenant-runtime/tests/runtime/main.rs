//! The runtime's integration tests, in one binary: a real `tenant-runtime` on a loopback
//! port, driven over HTTPS through the harness in `common`; one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod api;
mod auth;
mod backup;
mod disk;
mod logs;
mod oauth;
mod retention;
mod rotation;
mod shredding;
mod storage;
mod tls;
