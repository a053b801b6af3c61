//! `tenant-runtime --config PATH`: runs one tenant's instance.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tenant_runtime::RunConfig;
use tracing_subscriber::EnvFilter;

/// Serves one tenant's instance over HTTPS (`--config`), backs its store up or restores it
/// (`backup`, `restore`), or re-wraps its data keys under a new key-encryption key
/// (`rotate-data-key`).
#[derive(Debug, Parser)]
#[command(
    name = "tenant-runtime",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The runtime config file (YAML or JSON).
    #[arg(long, env = "TENANTRY_RUNTIME_CONFIG", required = true)]
    config: Option<PathBuf>,
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

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Write an encrypted backup of the instance's store while it runs (an online SQLite
    /// snapshot; records stay sealed with the tenant's key inside).
    Backup {
        /// The runtime config file (for the tenant id and the data directory).
        #[arg(long, env = "TENANTRY_RUNTIME_CONFIG")]
        config: PathBuf,
        /// The backup file to write (must not exist), or a directory to name one in.
        #[arg(long)]
        out: PathBuf,
        /// A file of age X25519 recipients (`age1…` lines); repeat for more.
        #[arg(long = "recipient-file", required = true)]
        recipient_files: Vec<PathBuf>,
        /// Keep only this many of the tenant's backups in the `--out` directory (0: all).
        #[arg(long, default_value_t = 0)]
        keep: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into the config's data directory, which must hold no database
    /// (stop the instance first, move runtime.db away, keep keys.db); checks that the
    /// instance's keys open every record and drops executions whose key retention deleted.
    Restore {
        /// The runtime config file (for the tenant id, data directory and data key).
        #[arg(long, env = "TENANTRY_RUNTIME_CONFIG")]
        config: PathBuf,
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The age identity file that opens it.
        #[arg(long)]
        identity_file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-wrap every data key of a stopped instance's key store under a new key-encryption
    /// key (crash-safe: one transaction; idempotent: run it again after a crash). Records
    /// are not re-encrypted. Then make the new key the data key file.
    RotateDataKey {
        /// The runtime config file (for the tenant id, the data directory and, by
        /// default, the key files).
        #[arg(long, env = "TENANTRY_RUNTIME_CONFIG")]
        config: PathBuf,
        /// The key-encryption key in use now (default: the config's
        /// previous_data_key_file).
        #[arg(long)]
        old: Option<PathBuf>,
        /// The new key-encryption key, 32 raw bytes (default: the config's data_key_file).
        #[arg(long)]
        new: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Backup {
            config,
            out,
            recipient_files,
            keep,
            json,
        } => {
            let config = tenant_runtime::config::load(&config)?;
            let recipients = tenantry_backup::Recipients::load(&recipient_files)?;
            let report = tenant_runtime::backup::backup(&config, &out, recipients, keep).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "wrote {} ({} executions, {} credentials; {} bytes)",
                    report.path.display(),
                    report.executions,
                    report.credentials,
                    report.file_bytes
                );
            }
        }
        Command::Restore {
            config,
            input,
            identity_file,
            json,
        } => {
            let config = tenant_runtime::config::load(&config)?;
            let identities = tenantry_backup::Identities::load(&identity_file)?;
            let report = tenant_runtime::backup::restore(&config, &input, identities).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "restored {} executions and {} credentials from the backup of {} into {}; every sealed record ({}) opens with the instance's keys; {} expired executions dropped (their key was deleted by retention)",
                    report.executions,
                    report.credentials,
                    report.backup_created_at,
                    config.data_dir.display(),
                    report.records_checked,
                    report.expired_executions_dropped
                );
            }
        }
        Command::RotateDataKey {
            config,
            old,
            new,
            json,
        } => {
            let config = tenant_runtime::config::load(&config)?;
            let report =
                tenant_runtime::keystore::rotate_offline(&config, old.as_deref(), new.as_deref())
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} data keys re-wrapped under key-encryption key {} ({} were under another key); make that key the data key file",
                    report.data_keys, report.kek_id, report.rewrapped
                );
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(config) = args.config else {
        let Some(command) = args.command else {
            anyhow::bail!("--config is required");
        };
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return run_command(command).await;
    };
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let mut run_config = RunConfig::load(&config)?;
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
