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
    let parent_gone = if args.exit_on_stdin_close {
        Some(stdin_closed().context("cannot watch standard input")?)
    } else {
        None
    };
    let shutdown = async move {
        match parent_gone {
            Some(parent_gone) => {
                tokio::select! {
                    () = shutdown_signal() => {}
                    () = parent_gone => {}
                }
            }
            None => shutdown_signal().await,
        }
    };
    tenant_runtime::run(run_config, listener, shutdown).await?;
    Ok(())
}

/// Completes when standard input reaches its end or cannot be read. The read blocks, so
/// it runs on a thread of its own that the process does not wait for at exit (a blocking
/// read on tokio's pool would hold up the runtime's shutdown on SIGTERM).
fn stdin_closed() -> std::io::Result<impl Future<Output = ()>> {
    use std::io::Read as _;
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = closed.send(());
        })?;
    Ok(async move {
        // An error means the thread is gone without sending: treat it as closed too.
        let _ = on_close.await;
        tracing::info!("standard input closed (the parent is gone); shutting down");
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
