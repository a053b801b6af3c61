//! Mail that cannot be forged: every message is DKIM-signed ([`dkim`]) and leaves through
//! the transactional outbox ([`crate::store`]'s `mail_outbox`, sent by [`worker`]), either
//! over SMTP (`--smtp-url`, TLS required) or, without one, into `<data-dir>/outbox/*.eml`
//! (`dev`), signed the same way. [`dns`] makes the SPF, DKIM and DMARC records.

pub mod dkim;
pub mod dns;
pub mod notice;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use secrecy::{ExposeSecret as _, SecretString};

use crate::error::{Error, Result};
use dkim::{DkimKey, DkimSigner};
use notice::Rendered;

/// The DKIM key made beside a SQLite database when no `--dkim-key-file` is given.
pub const DEFAULT_DKIM_KEY_FILE: &str = "dkim.key";
/// Where mail goes without `--smtp-url`, under the data directory.
pub const OUTBOX_DIR: &str = "outbox";

/// How mail leaves: the SMTP relay, with TLS required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpTarget {
    /// `true` for `smtps://` (TLS from the first byte), `false` for `smtp://` (STARTTLS,
    /// required).
    pub implicit_tls: bool,
    /// Host name (also the name the certificate must carry).
    pub host: String,
    /// Port (465 for `smtps`, 587 for `smtp` when not given).
    pub port: u16,
    /// User name for AUTH, if any.
    pub user: Option<String>,
}

/// Parses `smtp://[user@]host[:port]` or `smtps://…`. A password in the URL is refused: it
/// belongs in `--smtp-password-file`, so that the URL can be shown.
pub fn parse_smtp_url(text: &str) -> std::result::Result<SmtpTarget, String> {
    let text = text.trim();
    let (implicit_tls, rest) = if let Some(r) = text.strip_prefix("smtps://") {
        (true, r)
    } else if let Some(r) = text.strip_prefix("smtp://") {
        (false, r)
    } else {
        return Err("the SMTP URL must start with smtp:// (STARTTLS) or smtps:// (TLS)".into());
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '?', '#']) {
        return Err("the SMTP URL is smtp[s]://[user@]host[:port], without a path or query".into());
    }
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((user, hp)) => {
            if user.contains(':') {
                return Err("put the SMTP password in --smtp-password-file, not in the URL".into());
            }
            (Some(user.to_owned()).filter(|u| !u.is_empty()), hp)
        }
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port"))?,
        ),
        _ => (hostport, if implicit_tls { 465 } else { 587 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the SMTP URL has no host".into());
    }
    Ok(SmtpTarget {
        implicit_tls,
        host: host.to_owned(),
        port,
        user,
    })
}

/// Everything the mailer needs, from the flags.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// The relay; `None` writes to [`OUTBOX_DIR`].
    pub smtp: Option<SmtpTarget>,
    /// AUTH password file.
    pub smtp_password_file: Option<PathBuf>,
    /// PEM certificates trusted for the relay besides the system's roots.
    pub smtp_ca_file: Option<PathBuf>,
    /// The From mailbox; its domain signs (`d=`).
    pub from: Mailbox,
    /// DKIM selector.
    pub selector: String,
    /// DKIM key file; with none, `<data-dir>/dkim.key` is made when mail goes to files.
    pub dkim_key_file: Option<PathBuf>,
    /// The portal's base URL, for links.
    pub public_url: String,
    /// The data directory (the outbox, the default key).
    pub data_dir: PathBuf,
}

/// What became of one delivery attempt, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the relay (or written to the outbox directory).
    Sent,
    /// Failed; retried with backoff.
    FailedAttempt,
    /// Given up after the last retry, or for a recipient that is gone.
    Dropped,
}

type KindLabel = Vec<(&'static str, String)>;

/// Counters of the mail worker by notice kind (`--metrics-listen` serves them): the
/// failures are metrics, not only log lines. Labels hold the kind only, never an address.
#[derive(Debug, Default)]
pub struct MailStats {
    sent: Family<KindLabel, Counter>,
    failed_attempts: Family<KindLabel, Counter>,
    dropped: Family<KindLabel, Counter>,
    totals: [AtomicU64; 3],
}

impl MailStats {
    /// Counts one attempt at a message of `kind` ([`notice::Notice::kind`]).
    pub fn record(&self, outcome: Delivery, kind: &str) {
        let (family, total) = match outcome {
            Delivery::Sent => (&self.sent, &self.totals[0]),
            Delivery::FailedAttempt => (&self.failed_attempts, &self.totals[1]),
            Delivery::Dropped => (&self.dropped, &self.totals[2]),
        };
        family.get_or_create(&vec![("kind", kind.to_owned())]).inc();
        total.fetch_add(1, Ordering::Relaxed);
    }

    /// `(sent, failed_attempts, dropped)` over every kind.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let [sent, failed, dropped] = &self.totals;
        (
            sent.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            dropped.load(Ordering::Relaxed),
        )
    }

    /// Adds the counters to `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mail_sent",
            "Mail handed to the relay (or written to the outbox directory), by kind",
            self.sent.clone(),
        );
        registry.register(
            "mail_failed_attempts",
            "Delivery attempts that failed and will be retried, by kind",
            self.failed_attempts.clone(),
        );
        registry.register(
            "mail_dropped",
            "Mail given up (after the last retry, or for a recipient that is gone), by kind",
            self.dropped.clone(),
        );
    }
}

enum Transport {
    Smtp(Box<AsyncSmtpTransport<Tokio1Executor>>),
    Files(PathBuf),
}

/// Why one delivery attempt failed, in words that hold no address or secret.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The relay or the file system refused; retried.
    #[error("{0}")]
    Failed(String),
    /// The recipient cannot be mailed (the user is gone); not retried.
    #[error("{0}")]
    Undeliverable(&'static str),
}

/// Composes, signs and delivers mail.
pub struct Mailer {
    from: Mailbox,
    signer: DkimSigner,
    public_url: String,
    transport: Transport,
    /// What the worker did.
    pub stats: MailStats,
    /// Wakes the worker: mail was handed over, or the outbox is to be read now.
    wakeup: tokio::sync::Notify,
    /// Mail this replica queued claimed, waiting for its worker; see [`Mailer::hand_over`].
    handed: std::sync::Mutex<Vec<Handed>>,
    /// Set by [`Mailer::poll_soon`]: the worker reads the outbox at its next turn.
    poll_requested: std::sync::atomic::AtomicBool,
}

/// A message queued in the transaction of the action that caused it, its outbox row
/// claimed by this replica (see [`crate::store::NewVerification::claimed_until_ms`]), and
/// handed straight to this replica's worker, which sends it without reading the outbox.
/// Should this replica stop first, the claim runs out and another worker sends it.
pub struct Handed {
    /// The outbox row's id.
    pub id: String,
    /// The recipient's address.
    pub email: String,
    /// What to send.
    pub notice: notice::Notice,
    /// When it was queued (the Date header).
    pub created_at_ms: i64,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("selector", &self.signer.selector)
            .field("domain", &self.signer.domain)
            .finish_non_exhaustive()
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Reads a DKIM key file (private: refused when others may read it).
pub fn load_dkim_key(path: &Path) -> Result<DkimKey> {
    crate::files::check_key_file(path)?;
    let pem = std::fs::read_to_string(path)
        .map_err(io_err(format!("reading DKIM key {}", path.display())))?;
    DkimKey::from_pkcs8_pem(&SecretString::from(pem))
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Writes a new Ed25519 DKIM key to `path` (0600; never over an existing file).
pub fn create_dkim_key(path: &Path) -> Result<DkimKey> {
    let key = DkimKey::generate_ed25519().map_err(|_| Error::Crypto("randomness"))?;
    let pem = key
        .ed25519_pkcs8_pem()
        .ok_or(Error::Crypto("DKIM key encoding"))?;
    crate::server::write_new_file(path, pem.expose_secret().as_bytes(), 0o600)?;
    Ok(key)
}

impl Mailer {
    /// The mailer the settings describe. Without `--smtp-url` and `--dkim-key-file`, the
    /// key `<data-dir>/dkim.key` is made on first start (like `master.key`).
    pub fn new(s: &MailSettings) -> Result<Mailer> {
        let key = match (&s.dkim_key_file, &s.smtp) {
            (Some(path), _) => load_dkim_key(path)?,
            (None, None) => {
                let path = s.data_dir.join(DEFAULT_DKIM_KEY_FILE);
                if path.exists() {
                    load_dkim_key(&path)?
                } else {
                    tracing::info!(path = %path.display(), "created a DKIM key for the local outbox");
                    create_dkim_key(&path)?
                }
            }
            (None, Some(_)) => {
                return Err(Error::Config(
                    "--dkim-key-file (TENANTRY_DKIM_KEY_FILE) is required with --smtp-url: mail that leaves is signed".into(),
                ));
            }
        };
        let transport = match &s.smtp {
            None => Transport::Files(s.data_dir.join(OUTBOX_DIR)),
            Some(target) => Transport::Smtp(Box::new(smtp_transport(target, s)?)),
        };
        Ok(Mailer {
            signer: DkimSigner {
                key,
                domain: s.from.email.domain().to_ascii_lowercase(),
                selector: s.selector.clone(),
            },
            from: s.from.clone(),
            public_url: s.public_url.trim_end_matches('/').to_owned(),
            transport,
            stats: MailStats::default(),
            wakeup: tokio::sync::Notify::new(),
            handed: std::sync::Mutex::new(Vec::new()),
            poll_requested: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Gives the worker a message whose row the caller's transaction wrote claimed (and
    /// committed): it is sent next, without a read of the outbox.
    pub fn hand_over(&self, mail: Handed) {
        match self.handed.lock() {
            Ok(mut handed) => handed.push(mail),
            // Not lost: the row's claim runs out and a poll sends it.
            Err(_) => {
                tracing::error!(mail_id = %mail.id, "mail hand-over failed; it is sent when its claim runs out")
            }
        }
        self.wakeup.notify_one();
    }

    /// Asks the worker to read the outbox now: a request queued mail someone waits for.
    pub fn poll_soon(&self) {
        self.poll_requested.store(true, Ordering::SeqCst);
        self.wakeup.notify_one();
    }

    /// What was handed over since the last call.
    fn take_handed(&self) -> Vec<Handed> {
        self.handed
            .lock()
            .map(|mut handed| std::mem::take(&mut *handed))
            .unwrap_or_default()
    }

    /// The portal's base URL, without a final slash.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The Message-ID of outbox row `id`: the same on every attempt, so a receiver can
    /// tell a resend from a new mail.
    pub fn message_id(&self, id: &str) -> String {
        format!("<{id}@{}>", self.signer.domain)
    }

    /// The signed message for outbox row `id` to `to`, dated `created_at_ms`, signed at
    /// `now_ms`.
    pub fn compose(
        &self,
        id: &str,
        to: &str,
        rendered: &Rendered,
        created_at_ms: i64,
        now_ms: i64,
    ) -> std::result::Result<(lettre::address::Envelope, Vec<u8>), DeliveryError> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| DeliveryError::Undeliverable("the recipient address is not valid"))?;
        let date = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(created_at_ms).unwrap_or_default());
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(rendered.subject.clone())
            .date(date)
            .message_id(Some(self.message_id(id)))
            .multipart(MultiPart::alternative_plain_html(
                rendered.text.clone(),
                rendered.html.clone(),
            ))
            .map_err(|e| DeliveryError::Failed(format!("cannot build the message: {e}")))?;
        let envelope = message.envelope().clone();
        let signed = self
            .signer
            .sign(&message.formatted(), now_ms.div_euclid(1000))
            .map_err(|e| DeliveryError::Failed(format!("cannot sign: {e}")))?;
        Ok((envelope, signed))
    }

    /// Hands a signed message to the relay, or writes it to `<data-dir>/outbox/<id>.eml`
    /// (replacing a previous attempt's file, so a retry never makes a second mail).
    pub async fn deliver(
        &self,
        id: &str,
        envelope: &lettre::address::Envelope,
        message: &[u8],
    ) -> std::result::Result<(), DeliveryError> {
        match &self.transport {
            Transport::Smtp(smtp) => smtp
                .send_raw(envelope, message)
                .await
                .map(|_| ())
                .map_err(|e| DeliveryError::Failed(describe_smtp_error(&e))),
            Transport::Files(dir) => write_eml(dir, id, message)
                .await
                .map_err(|e| DeliveryError::Failed(format!("cannot write the outbox file: {e}"))),
        }
    }
}

/// An SMTP error in words without the server's text (which may quote the address).
fn describe_smtp_error(e: &lettre::transport::smtp::Error) -> String {
    let what = if e.is_tls() {
        "TLS failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_permanent() {
        "permanent refusal"
    } else if e.is_transient() {
        "transient refusal"
    } else if e.is_client() {
        "client error"
    } else {
        "connection failed"
    };
    match e.status() {
        Some(code) => format!("SMTP {what} ({code})"),
        None => format!("SMTP {what}"),
    }
}

/// Writes the message as `<dir>/<id>.eml` (0600, in a 0700 directory), synced before it is
/// renamed into place. One blocking task for the whole: as separate `tokio::fs` calls it
/// was six hand-offs to the blocking pool per mail.
async fn write_eml(dir: &Path, id: &str, message: &[u8]) -> std::io::Result<()> {
    let (dir, id, message) = (dir.to_owned(), id.to_owned(), message.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::create_dir_all(&dir)?;
        // Narrowed only when it is wider: a chmod on every mail wrote the directory's inode
        // (a journal entry) each time for nothing.
        if std::fs::metadata(&dir)?.permissions().mode() & 0o777 != 0o700 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let tmp = dir.join(format!(".{id}.tmp"));
        let path = dir.join(format!("{id}.eml"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&message)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(std::io::Error::other)?
}

fn smtp_transport(
    target: &SmtpTarget,
    s: &MailSettings,
) -> Result<AsyncSmtpTransport<Tokio1Executor>> {
    let mut tls = TlsParameters::builder(target.host.clone());
    if let Some(ca) = &s.smtp_ca_file {
        let pem = std::fs::read(ca).map_err(io_err(format!("reading {}", ca.display())))?;
        tls = tls
            .add_root_certificate(Certificate::from_pem(&pem).map_err(|_| {
                Error::Config(format!("{} holds no PEM certificate", ca.display()))
            })?);
    }
    let tls = tls
        .build_rustls()
        .map_err(|e| Error::Config(format!("SMTP TLS settings: {e}")))?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(target.host.clone())
        .port(target.port)
        .tls(if target.implicit_tls {
            Tls::Wrapper(tls)
        } else {
            Tls::Required(tls)
        })
        .hello_name(ClientId::Domain(s.from.email.domain().to_owned()))
        .timeout(Some(Duration::from_secs(30)));
    match (&target.user, &s.smtp_password_file) {
        (Some(user), Some(file)) => {
            crate::files::check_key_file(file)?;
            let password = SecretString::from(
                std::fs::read_to_string(file)
                    .map_err(io_err(format!("reading {}", file.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            );
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(Error::Config(
                "the SMTP URL names a user: give its password with --smtp-password-file".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(Error::Config(
                "--smtp-password-file needs a user in the URL (smtp://USER@host)".into(),
            ));
        }
    }
    Ok(builder.build())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_need_tls_and_keep_passwords_out() {
        let t = parse_smtp_url("smtp://mailer@relay.example.com").unwrap();
        assert_eq!(
            t,
            SmtpTarget {
                implicit_tls: false,
                host: "relay.example.com".into(),
                port: 587,
                user: Some("mailer".into())
            }
        );
        let t = parse_smtp_url("smtps://relay.example.com:2465").unwrap();
        assert!(t.implicit_tls);
        assert_eq!(t.port, 2465);
        assert_eq!(t.user, None);
        let e = parse_smtp_url("smtp://u:hunter2@relay.example.com").unwrap_err();
        assert!(
            e.contains("--smtp-password-file") && !e.contains("hunter2"),
            "{e}"
        );
        for bad in [
            "http://relay",
            "smtp://",
            "smtp://relay/path",
            "smtp://relay:x",
        ] {
            assert!(parse_smtp_url(bad).is_err(), "{bad}");
        }
    }
}
