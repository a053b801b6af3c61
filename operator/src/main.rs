//! `tenantry-operator`: `crd` prints the CustomResourceDefinition, `run` runs the operator.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tenantry_operator::config::{RunArgs, Settings};
use tenantry_operator::run::{LeaderOptions, run};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "tenantry-operator",
    version,
    about = "Kubernetes operator for Tenantry tenants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Tenant CustomResourceDefinition (YAML).
    Crd,
    /// Run the operator (kubeconfig from KUBECONFIG, ~/.kube/config or the pod).
    Run(Box<RunArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", tenantry_operator::manifest::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn".into()),
                )
                .init();
            let mut settings = Settings::from_args(&args, std::env::var("POD_NAMESPACE").ok());
            if let Some(path) = &args.backup_recipients_file {
                settings.backup_recipients = Some(
                    tenantry_operator::config::read_backup_recipients(path)
                        .map_err(anyhow::Error::msg)?,
                );
            }
            let identity = args
                .identity
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("tenantry-operator-{}", std::process::id()));
            let client = kube::Client::try_default().await.context(
                "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster)",
            )?;
            let admin = TcpListener::bind(args.admin_addr)
                .await
                .with_context(|| format!("cannot bind the admin port {}", args.admin_addr))?;
            let leader = LeaderOptions {
                lease_name: args.lease_name.clone(),
                lease_duration: Duration::from_secs(u64::from(args.lease_duration_seconds.max(3))),
                identity,
            };
            run(
                settings,
                leader,
                client,
                admin,
                tenantry_process::shutdown_signal(),
            )
            .await
            .context("tenantry-operator stopped")?;
            Ok(())
        }
    }
}
