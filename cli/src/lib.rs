//! `tenantryctl`, the ops CLI of the Tenantry control API: [`cli::Cli`] is the command
//! line, [`run`] runs one command against the API through `tenantry-client`, and every
//! failure is one [`Error`] whose message is the line `main` prints.

pub mod cli;
mod client;
mod commands;
mod error;
mod output;
mod prompt;
mod session;

pub use commands::run;
pub use error::{Error, Result};
