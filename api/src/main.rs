//! `tenantry-api`: parse the command line, start logging, run the subcommand.

use std::io::Read as _;

use anyhow::Context as _;
use clap::Parser as _;
use secrecy::{ExposeSecret as _, SecretString};
use tenantry_api::config::{Cli, Command};
use tenantry_api::server::{self, Bootstrap};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENANTRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            server::run(args, listener, tenantry_process::shutdown_signal()).await?;
        }
        Command::Dev(tenantry_api::config::DevArgs {
            action: Some(tenantry_api::config::DevAction::RotateCa(args)),
            ..
        })
        | Command::RotateLocalCa(args) => rotate_local_ca(&args).await?,
        Command::Dev(dev) => {
            let mut args = dev.serve.clone();
            args.provisioner = tenantry_api::config::ProvisionerKind::Local;
            // Links in mail lead to this portal unless told otherwise.
            if args.mail.public_url == "http://127.0.0.1:8080" {
                args.mail.public_url = format!("http://{}", dev.portal_listen);
            }
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let portal = if dev.no_portal {
                None
            } else {
                Some(tenantry_api::dev::start_portal(&dev).await?)
            };
            let dir =
                std::path::absolute(&args.db.data_dir).unwrap_or_else(|_| args.db.data_dir.clone());
            eprintln!(
                "tenantry dev: control API on {} (data in {})",
                args.listen,
                dir.display()
            );
            if let Some(portal) = &portal {
                eprintln!("  signup portal: open {} to sign up", portal.url);
            }
            eprintln!(
                "  instances trust the local CA at {}",
                dir.join("ca.crt").display()
            );
            if args.mail.smtp_url.is_none() {
                eprintln!(
                    "  mail (DKIM-signed) is written to {}/",
                    dir.join(tenantry_api::mail::OUTBOX_DIR).display()
                );
            }
            eprintln!(
                "  create the first admin: tenantry-api bootstrap-admin --data-dir {} --email you@example.com",
                dir.display()
            );
            let result = server::run(args, listener, tenantry_process::shutdown_signal()).await;
            if let Some(portal) = portal {
                portal.stop().await;
            }
            result?;
        }
        Command::Keygen(args) if args.dkim => {
            let path = server::keygen_dkim(&args.out_dir)?;
            println!("wrote {}", path.display());
            eprintln!(
                "give it to the API as --dkim-key-file (a Secret in Kubernetes), and publish its public half: tenantry-api dns-records --domain <mail domain> --dkim-key-file {}",
                path.display()
            );
        }
        Command::DnsRecords(args) => {
            let key = tenantry_api::mail::load_dkim_key(&args.dkim_key_file)?;
            let records =
                tenantry_api::mail::dns::records(&tenantry_api::mail::dns::RecordRequest {
                    domain: args.domain,
                    selector: args.dkim_selector,
                    dkim: key.dns_record(),
                    spf_include: args.spf_include,
                    dmarc_rua: args.dmarc_rua,
                    dmarc_policy: args.dmarc_policy,
                });
            if args.json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                print!("{}", tenantry_api::mail::dns::zone_file(&records));
            }
        }
        Command::Keygen(args) => {
            for path in server::keygen(&args.out_dir)? {
                println!("wrote {}", path.display());
            }
            eprintln!(
                "keep master.key and token-signing.key secret (e.g. `kubectl create secret generic tenantry-api-keys --from-file=...`); token-public.pem goes to the operator's Secret"
            );
        }
        Command::Backup(args) => {
            let recipients = tenantry_backup::Recipients::load(&args.recipient_files)?;
            let url = args.db.url();
            let report = tenantry_api::backup::backup(
                url.expose_secret(),
                &args.out,
                recipients,
                args.keep,
                &tenantry_api::clock::SystemClock,
            )
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let rows: u64 = report.tables.iter().map(|(_, n)| n).sum();
                println!(
                    "wrote {} ({rows} rows of {} tables, schema {}, audit chain at {}; {} bytes)",
                    report.path.display(),
                    report.tables.len(),
                    report.schema_version,
                    report.audit_head.sequence,
                    report.file_bytes
                );
                for old in &report.pruned {
                    println!("deleted {}", old.display());
                }
            }
        }
        Command::Restore(args) => {
            let identities = tenantry_backup::Identities::load(&args.identity_file)?;
            let report = tenantry_api::backup::restore(
                &args.db,
                &args.input,
                identities,
                &tenantry_api::clock::SystemClock,
            )
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let rows: u64 = report.tables.iter().map(|(_, n)| n).sum();
                println!(
                    "restored {rows} rows of {} tables from a {} backup of {} (schema {}); the audit chain verifies ({} rows). Sessions are not restored: everyone logs in again.",
                    report.tables.len(),
                    report.backup_source,
                    report.backup_created_at,
                    report.backup_schema_version,
                    report.audit_rows
                );
            }
        }
        Command::BackupKeygen(args) => {
            let (identity, recipient, public) = tenantry_api::backup::keygen(&args.out_dir)?;
            println!("wrote {}", identity.display());
            println!("wrote {} ({public})", recipient.display());
            eprintln!(
                "backups are encrypted to {} (--recipient-file); keep {} apart from the backups and from the database: it opens every backup",
                recipient.display(),
                identity.display()
            );
        }
        Command::Backups(args) => {
            let now = tenantry_api::clock::Clock::now_ms(&tenantry_api::clock::SystemClock);
            let newest = tenantry_api::backup::newest(&args.dir, args.interval, now)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&newest)?);
            } else if newest.is_empty() {
                println!("no backups under {}", args.dir.display());
            } else {
                println!("KIND              TENANT        AGE        COUNT  NEWEST");
                for n in &newest {
                    println!(
                        "{:<17} {:<13} {:<10} {:<6} {}{}",
                        n.kind.as_str(),
                        n.tenant_id.as_deref().unwrap_or("-"),
                        humantime::format_duration(std::time::Duration::from_secs(n.age_seconds))
                            .to_string()
                            .split(' ')
                            .next()
                            .unwrap_or_default(),
                        n.count,
                        n.path.display(),
                        if n.stale { "  STALE" } else { "" }
                    );
                }
            }
            if newest.is_empty() || newest.iter().any(|n| n.stale) {
                std::process::exit(2);
            }
        }
        Command::RotateMasterKey(args) => {
            let (key_file, store) = tenantry_api::keyring::open_database(&args.db).await?;
            let report = tenantry_api::keyring::rotate(
                &store,
                &key_file,
                &args.new_key_file,
                &tenantry_api::keyring::RotateOptions {
                    batch_size: args.batch_size,
                    wait: args.wait,
                    poll: std::time::Duration::from_millis(500),
                },
                &tenantry_api::clock::SystemClock,
            )
            .await;
            store.close().await;
            let report = report?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let total: u64 = report.resealed.values().sum();
                println!(
                    "master key {} seals new secrets{}; {} running API(s) hold it",
                    report.key_id,
                    report
                        .previous_primary
                        .as_deref()
                        .map(|p| format!(" (was {p})"))
                        .unwrap_or_default(),
                    report.servers
                );
                println!(
                    "re-sealed {total} secrets in {} ms{}",
                    report.reseal_ms,
                    report
                        .resealed
                        .iter()
                        .map(|(place, n)| format!("; {place}: {n}"))
                        .collect::<String>()
                );
                println!(
                    "run `tenantry-api master-keys status`: a key that seals nothing can leave {}",
                    key_file.display()
                );
            }
            if report.unreadable > 0 {
                eprintln!(
                    "{} secrets open with no key of {}: they still need their old key (see the log)",
                    report.unreadable,
                    key_file.display()
                );
                std::process::exit(1);
            }
        }
        Command::MasterKeys(args) => match args.command {
            tenantry_api::config::MasterKeysCommand::Status(args) => {
                let (key_file, store) = tenantry_api::keyring::open_database(&args.db).await?;
                let status = tenantry_api::keyring::status(
                    &store,
                    &key_file,
                    &tenantry_api::clock::SystemClock,
                )
                .await;
                store.close().await;
                let status = status?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    println!("KEY               IN FILE  PRIMARY  SECRETS  WHERE");
                    for k in &status.keys {
                        println!(
                            "{:<17} {:<8} {:<8} {:<8} {}",
                            k.key_id,
                            if k.in_file { "yes" } else { "NO" },
                            if k.primary { "yes" } else { "" },
                            k.total,
                            k.seals
                                .iter()
                                .map(|(place, n)| format!("{place}={n}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                    }
                    if status.unreadable > 0 {
                        println!("{} secrets open with no key of the file", status.unreadable);
                    }
                    for s in &status.servers {
                        println!(
                            "server {} on {}: holds {}, seals with {}",
                            s.server_id,
                            s.host,
                            s.key_ids.join(","),
                            s.primary_key_id
                        );
                    }
                }
            }
        },
        Command::RotateTokenKey(args) => {
            let clock = tenantry_api::clock::SystemClock;
            let rotation = tenantry_api::token_keys::rotate_command(&args, &clock).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rotation)?);
            } else {
                let at = |ms: i64| {
                    jiff::Timestamp::from_millisecond(ms)
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                };
                println!(
                    "added token key {}: published now, signs from {}",
                    rotation.kid,
                    at(rotation.signs_from_ms)
                );
                if !rotation.superseded.is_empty() {
                    println!(
                        "superseded {}: published until {}, then retired (private half deleted)",
                        rotation.superseded.join(", "),
                        at(rotation.retires_at_ms)
                    );
                }
                eprintln!(
                    "every API process picks the new key up within its --token-key-refresh-interval; watch `tenantry-api token-keys`"
                );
            }
        }
        Command::TokenKeys(args) => {
            let clock = tenantry_api::clock::SystemClock;
            match args.view {
                tenantry_api::config::TokenKeysView::Public => {
                    print!(
                        "{}",
                        tenantry_api::token_keys::public_command(&args.db, &clock).await?
                    );
                }
                tenantry_api::config::TokenKeysView::Status => {
                    let keys = tenantry_api::token_keys::status_command(&args.db, &clock).await?;
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&keys)?);
                    } else if keys.is_empty() {
                        println!("no token keys yet (the API imports its first key at start)");
                    } else {
                        println!(
                            "{:<17} {:<10} {:<21} {:<21} RETIRES AT",
                            "KID", "STATE", "CREATED", "SIGNS FROM"
                        );
                        let short = |t: &str| t.split('.').next().unwrap_or(t).to_owned();
                        for k in &keys {
                            println!(
                                "{:<17} {:<10} {:<21} {:<21} {}",
                                k.kid,
                                k.state,
                                short(&k.created_at),
                                short(&k.signs_from),
                                k.retires_at
                                    .as_deref()
                                    .map(short)
                                    .unwrap_or_else(|| "-".into())
                            );
                        }
                    }
                }
            }
        }
        Command::BootstrapAdmin(args) => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            let password = SecretString::from(password.trim_end_matches(['\r', '\n']).to_owned());
            let outcome = server::bootstrap_admin(
                &args.db,
                &args.email,
                &password,
                &tenantry_api::clock::SystemClock,
            )
            .await?;
            match outcome {
                Bootstrap::Created { user_id } => {
                    println!("created admin {} ({user_id})", args.email)
                }
                Bootstrap::Promoted { user_id } => {
                    println!("granted admin to existing user {} ({user_id})", args.email)
                }
                Bootstrap::AlreadyAdmin { user_id } => {
                    println!("{} ({user_id}) is already an admin", args.email)
                }
            }
        }
    }
    Ok(())
}

/// `rotate-local-ca` and `dev rotate-ca`.
async fn rotate_local_ca(args: &tenantry_api::config::RotateLocalCaArgs) -> anyhow::Result<()> {
    let clock = tenantry_api::clock::SystemClock;
    let report = tenantry_api::provision::local_ca::rotate_command(args, &clock).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "new local CA {} (was {}); {} holds both until every instance certificate is from the new CA, by {} at the latest",
            report.fingerprint,
            report.previous_fingerprint,
            report.ca_file.display(),
            report.ends
        );
        eprintln!(
            "the running `tenantry-api dev` re-issues the certificates and then drops the previous CA; clients must trust the new {} before then",
            report.ca_file.display()
        );
    }
    Ok(())
}
