//! `tenant-runtime --config PATH`: runs one tenant's instance.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tenant_runtime::RunConfig;
use tracing_subscriber::EnvFilter;

/// Serves one tenant's instance over HTTPS.
#[derive(Debug, Parser)]
#[command(name = "tenant-runtime", version)]
struct Args {
    /// The runtime config file (YAML or JSON).
    #[arg(long, env = "TENANTRY_RUNTIME_CONFIG")]
    config: PathBuf,
    /// Seconds between checks of the config, certificate and token key files.
    #[arg(long, env = "TENANTRY_RUNTIME_RELOAD_SECS", default_value_t = 5)]
    reload_secs: u64,
    /// Seconds between retention prune runs (a policy change also triggers one).
    #[arg(long, env = "TENANTRY_RUNTIME_PRUNE_SECS", default_value_t = 300)]
    prune_secs: u64,
    /// Largest request body in bytes.
    #[arg(long, env = "TENANTRY_RUNTIME_MAX_BODY_BYTES", default_value_t = tenant_runtime::config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TENANTRY_RUNTIME_LOG_JSON")]
    log_json: bool,
    /// Shut down when standard input reaches its end: the local provisioner holds the
    /// other end of a pipe, so its runtimes stop even when it is killed.
    #[arg(long, env = "TENANTRY_RUNTIME_EXIT_ON_STDIN_CLOSE")]
    exit_on_stdin_close: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let mut run_config = RunConfig::load(&args.config)?;
    run_config.reload_interval = Duration::from_secs(args.reload_secs.max(1));
    run_config.prune_interval = Duration::from_secs(args.prune_secs.max(1));
    run_config.max_body_bytes = args.max_body_bytes;
    let listener = tokio::net::TcpListener::bind(run_config.config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", run_config.config.listen))?;
    let shutdown = tenantry_process::shutdown(args.exit_on_stdin_close)
        .context("cannot watch standard input")?;
    tenant_runtime::run(run_config, listener, shutdown).await?;
    Ok(())
}
