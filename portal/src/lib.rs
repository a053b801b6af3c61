//! `tenantry-portal`: the signup portal. Server-rendered HTML ([`views`]) on axum
//! ([`routes`]), a gRPC client of the control API like any other ([`api`]), with the API
//! session token kept in an encrypted, HttpOnly, `SameSite=Strict` cookie ([`session`]),
//! a CSRF token on every form and a strict CSP on every response ([`serve`]).

pub mod api;
pub mod config;
pub mod error;
pub mod routes;
pub mod serve;
pub mod session;
pub mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;
pub use error::{Error, Result};

/// How long the portal keeps trying to reach the API at start.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// The router of the portal with its security headers, on an API `channel`.
pub fn app(
    channel: tonic::transport::Channel,
    key: session::CookieKey,
    https: bool,
) -> axum::Router {
    let portal = Arc::new(routes::Portal {
        api: api::Api::new(channel),
        key,
        secure: https,
    });
    routes::router(portal).layer(axum::middleware::from_fn(move |request, next| {
        serve::security_headers(https, request, next)
    }))
}

/// Connects to the API (retrying for a minute, so the portal may start before it), then
/// serves on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let key = session::CookieKey::load(&config.cookie_key_file)?;
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(serve::tls_config(cert, key)?),
        _ => None,
    };
    let trust = tenantry_client::Trust {
        ca_file: config.api_ca_file.as_deref(),
        server_name: None,
    };
    let started = std::time::Instant::now();
    let channel = loop {
        match tenantry_client::connect(&config.api, trust).await {
            Ok(channel) => break channel,
            Err(e @ tenantry_client::Error::Connect { .. })
                if started.elapsed() < CONNECT_PATIENCE =>
            {
                tracing::warn!(error = %e, "the control API is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(Error::Api(e)),
        }
    };
    let https = config.https();
    tracing::info!(listen = ?listener.local_addr().ok(), public_url = %config.public_url(), api = %config.api, "tenantry-portal serving");
    serve::serve(listener, tls, app(channel, key, https), shutdown).await;
    tracing::info!("tenantry-portal stopped");
    Ok(())
}
