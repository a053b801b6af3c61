//! `tenantry-portal`: parse the command line, start logging, serve.

use anyhow::Context as _;
use clap::Parser as _;
use tenantry_portal::Config;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENANTRY_PORTAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = tenantry_process::shutdown(config.exit_on_stdin_close)
        .context("cannot watch standard input")?;
    tenantry_portal::run(config, listener, shutdown).await?;
    Ok(())
}
