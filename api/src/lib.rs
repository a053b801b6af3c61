//! The Tenantry control API: accounts, sessions, TOTP MFA, tenants, MFA-gated admin and a
//! hash-chained audit log, served over gRPC on SQLite or PostgreSQL.
//!
//! `main.rs` parses [`config::Cli`] and calls [`server::run`]; tests build the state with
//! their own clock through [`server::build_state`] and [`server::serve`].

pub mod access;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod error;
pub mod files;
pub mod forwarded;
pub mod keyring;
pub mod lockout;
pub mod mail;
pub mod metrics;
pub mod migrations;
pub mod password;
pub mod provision;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod token_keys;
pub mod totp;
pub mod validate;

pub use error::{Error, Result};
