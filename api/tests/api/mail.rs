//! Mail: delivery to a real SMTP server (aiosmtpd, STARTTLS and AUTH required) with the
//! DKIM signature checked by an independent verifier (dkimpy) against the record that
//! `tenantry-api dns-records` prints; the outbox through an SMTP outage and a killed API;
//! email verification (expired, reused and another user's tokens; provisioning waits; only
//! hashes stored); the notices; and `dns-records` parsed back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tenantry_proto::v1::*;
use tonic::Code;

use tenantry_test_support::free_port;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_tenantry-api");
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mail_server");
const SMTP_USER: &str = "tenantry-mailer";
const SELECTOR: &str = "s2026";
const DOMAIN: &str = "mail.example.com";

/// A CA and a `localhost` certificate from it, for the SMTP server; returns (ca, cert, key).
fn smtp_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use secrecy::ExposeSecret as _;
    let paths = (
        dir.join("ca.pem"),
        dir.join("smtp.pem"),
        dir.join("smtp.key"),
    );
    // Made once per test: the API trusts the CA it read at its start.
    if paths.2.exists() {
        return paths;
    }
    let now = jiff::Timestamp::now();
    let ca = tenantry_pki::CertificateAuthority::generate("mail test CA", now).unwrap();
    let leaf = ca
        .issue_leaf(&tenantry_pki::LeafRequest {
            dns_names: vec!["localhost".into()],
            ip_addresses: vec![],
            validity: Duration::from_secs(3600),
            now,
        })
        .unwrap();
    std::fs::write(&paths.0, ca.cert_pem()).unwrap();
    std::fs::write(&paths.1, &leaf.cert_pem).unwrap();
    std::fs::write(&paths.2, leaf.key_pem.expose_secret()).unwrap();
    (paths.0, paths.1, paths.2)
}

/// The Python SMTP server; killed on drop.
struct SmtpServer {
    child: Child,
    out: PathBuf,
}

impl SmtpServer {
    fn start(dir: &Path, port: u16) -> SmtpServer {
        write_password(dir);
        let (_, cert, key) = smtp_certificates(dir);
        let out = dir.join("received");
        std::fs::create_dir_all(&out).unwrap();
        let mut child = Command::new("python3")
            .arg(format!("{SCRIPTS}/smtp_server.py"))
            .args(["--port", &port.to_string()])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--out")
            .arg(&out)
            .args(["--user", SMTP_USER])
            .arg("--password-file")
            .arg(dir.join("smtp-password"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (api/tests/mail_server/requirements.txt)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.starts_with("ready"),
            "SMTP server did not start: {line:?}"
        );
        SmtpServer { child, out }
    }

    /// The messages received so far, in order.
    fn received(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        files
    }

    async fn wait_for(&self, n: usize) -> Vec<PathBuf> {
        wait_until(|| self.received().len() >= n, "mail to arrive").await;
        self.received()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SMTP relay that is down: its port, held, answers each connection by closing it.
/// Held rather than left free, so that no other test's server takes the port meanwhile (one
/// that accepted and never spoke SMTP would hold each attempt for the 30 s SMTP timeout).
struct RelayDown {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl RelayDown {
    async fn start() -> RelayDown {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        RelayDown { port, task }
    }

    /// Frees the port for the relay that comes back.
    async fn end(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `tenantry-api` with `args`; returns stdout, or panics with stderr.
fn run_api(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tenantry-api {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The DKIM record `dns-records --json` prints for `key`: (name, value).
fn dkim_record(key: &Path) -> (String, String) {
    let json = run_api(&[
        "dns-records",
        "--domain",
        DOMAIN,
        "--dkim-selector",
        SELECTOR,
        "--dkim-key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    let records: serde_json::Value = serde_json::from_str(&json).unwrap();
    let dkim = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "dkim")
        .unwrap();
    (
        dkim["name"].as_str().unwrap().to_owned(),
        dkim["value"].as_str().unwrap().to_owned(),
    )
}

/// Whether dkimpy verifies `message` against the record.
fn dkimpy_verifies(message: &Path, record: &(String, String)) -> bool {
    let out = Command::new("python3")
        .arg(format!("{SCRIPTS}/dkim_verify.py"))
        .arg(message)
        .arg(&record.0)
        .arg(&record.1)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        (said == "pass") == out.status.success() && (said == "pass" || said.starts_with("fail")),
        "dkim_verify.py: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// An Ed25519 key from `keygen --dkim`, or an RSA-2048 key from OpenSSL.
fn dkim_key(dir: &Path, rsa: bool) -> PathBuf {
    if rsa {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("rsa.key");
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    } else {
        let keys = dir.join("keys");
        run_api(&["keygen", "--dkim", "--out-dir", keys.to_str().unwrap()]);
        keys.join("dkim.key")
    }
}

/// Flags for delivery over the SMTP server at `port` with the key at `key`.
fn smtp_args(dir: &Path, port: u16, key: &Path) -> Vec<String> {
    write_password(dir);
    vec![
        "--smtp-url".into(),
        format!("smtp://{SMTP_USER}@localhost:{port}"),
        "--smtp-password-file".into(),
        dir.join("smtp-password").display().to_string(),
        "--smtp-ca-file".into(),
        dir.join("ca.pem").display().to_string(),
        "--mail-from".into(),
        format!("Tenantry <noreply@{DOMAIN}>"),
        "--dkim-selector".into(),
        SELECTOR.into(),
        "--dkim-key-file".into(),
        key.display().to_string(),
        "--public-url".into(),
        "https://portal.example.com".into(),
    ]
}

fn write_password(dir: &Path) {
    let path = dir.join("smtp-password");
    if !path.exists() {
        write_key_file(&path, "correct horse battery staple\n");
    }
}

/// The token of the verification link in a received message.
fn token_in(message: &str) -> String {
    let message = &tenantry_test_support::decode_quoted_printable(message);
    let start = message
        .find("https://portal.example.com/verify-email?token=")
        .expect("a verification link")
        + "https://portal.example.com/verify-email?token=".len();
    message[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    let head = &message[..message.find("\r\n\r\n")?];
    head.split("\r\n")
        .find(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .map(|l| l[name.len() + 1..].trim())
}

async fn who_am_i(s: &TestServer, token: &str) -> WhoAmIResponse {
    s.accounts()
        .who_am_i(authed(WhoAmIRequest {}, token))
        .await
        .unwrap()
        .into_inner()
}

async fn verify(
    s: &TestServer,
    session: &str,
    token: &str,
) -> Result<VerifyEmailResponse, tonic::Status> {
    s.accounts()
        .verify_email(authed(
            VerifyEmailRequest {
                token: token.into(),
            },
            session,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Delivers the signup's verification mail over SMTP (STARTTLS, AUTH), signed with `rsa`'s
/// key kind; dkimpy verifies it with the public key exactly as `dns-records` printed it,
/// and refuses it once one byte of the body changed.
async fn delivery_verifies_with_dkimpy(rsa: bool) {
    let db = Database::new().await;
    let dir = db.dir.path().to_path_buf();
    let port = free_port();
    let smtp = SmtpServer::start(&dir, port);
    let key = dkim_key(&dir, rsa);
    let record = dkim_record(&key);
    assert_eq!(record.0, format!("{SELECTOR}._domainkey.{DOMAIN}"));
    let mut extra = smtp_args(&dir, port, &key);
    extra.push("--require-email-verification=true".into());
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: extra,
            ..Options::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    s.signup("alice@example.org", "acme").await;
    let files = smtp.wait_for(1).await;
    let raw = std::fs::read(&files[0]).unwrap();
    let text = String::from_utf8(raw.clone()).unwrap();
    assert_eq!(header(&text, "To"), Some("alice@example.org"), "{text}");
    assert_eq!(
        header(&text, "From"),
        Some(format!("Tenantry <noreply@{DOMAIN}>").as_str())
    );
    let algorithm = if rsa {
        "a=rsa-sha256"
    } else {
        "a=ed25519-sha256"
    };
    let signature = header(&text, "DKIM-Signature").unwrap();
    assert!(signature.contains(algorithm), "{signature}");
    assert!(signature.contains("c=relaxed/relaxed"), "{signature}");
    assert!(
        header(&text, "Message-ID")
            .unwrap()
            .ends_with(&format!("@{DOMAIN}>"))
    );
    assert!(
        dkimpy_verifies(&files[0], &record),
        "dkimpy refused:\n{text}"
    );

    // One byte of the body changed: the signature no longer verifies.
    let body = text.find("\r\n\r\n").unwrap() + 4;
    let at = body + text[body..].find("Please confirm").expect("the text body");
    let mut tampered = raw.clone();
    tampered[at] = b'p';
    let tampered_path = dir.join("tampered.eml");
    std::fs::write(&tampered_path, &tampered).unwrap();
    assert!(!dkimpy_verifies(&tampered_path, &record));
    // …nor with another key's record.
    let other = dkim_key(&dir.join("other"), false);
    assert!(!dkimpy_verifies(
        &files[0],
        &(record.0.clone(), dkim_record(&other).1)
    ));
    s.stop().await;
}

#[tokio::test]
async fn ed25519_signed_mail_over_smtp_verifies_with_dkimpy_and_fails_when_changed() {
    delivery_verifies_with_dkimpy(false).await;
}

#[tokio::test]
async fn rsa_signed_mail_over_smtp_verifies_with_dkimpy_and_fails_when_changed() {
    delivery_verifies_with_dkimpy(true).await;
}

#[tokio::test]
async fn verification_gates_provisioning_and_refuses_bad_tokens_with_clear_codes() {
    let db = Database::new().await;
    let dir = db.dir.path().to_path_buf();
    let port = free_port();
    let smtp = SmtpServer::start(&dir, port);
    let key = dkim_key(&dir, false);
    let mut extra = smtp_args(&dir, port, &key);
    extra.push("--require-email-verification".into());
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: extra,
            ..Options::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    let (_, alice_tenant) = s.signup("alice@example.org", "acme").await;
    let (_, _) = s.signup("bob@example.org", "bobco").await;
    let files = smtp.wait_for(2).await;
    let token_for = |who: &str| {
        files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .find(|m| header(m, "To") == Some(who))
            .map(|m| token_in(&m))
            .unwrap()
    };
    let alice_token = token_for("alice@example.org");
    let bob_token = token_for("bob@example.org");
    assert_eq!(alice_token.len(), 43, "256 bits, base64url");

    // The database holds the tokens' hashes only (the mail carried them sealed).
    let raw = db.raw_contents();
    for token in [&alice_token, &bob_token] {
        assert!(
            !raw.windows(token.len()).any(|w| w == token.as_bytes()),
            "a raw verification token is in the database"
        );
    }

    let alice = s.login("alice@example.org").await;
    assert!(!who_am_i(&s, &alice).await.email_verified);
    let waiting = s.tenant(&alice, &alice_tenant).await;
    assert_eq!(waiting.phase(), TenantPhase::AwaitingVerification);
    assert!(waiting.message.contains("verify"), "{}", waiting.message);

    // Another user's token answers like an unknown one, and verifies nobody.
    let e = expect_code(verify(&s, &alice, &bob_token).await, Code::NotFound);
    assert!(e.message().contains("verification token"), "{e:?}");
    expect_code(verify(&s, &alice, "not-a-token").await, Code::NotFound);
    expect_code(verify(&s, &alice, "").await, Code::InvalidArgument);
    assert!(!who_am_i(&s, &alice).await.email_verified);

    // The right token verifies (WhoAmI says so at once, through the session cache) and
    // starts provisioning.
    let r = verify(&s, &alice, &alice_token).await.unwrap();
    assert_eq!(r.provisioning_tenant_ids, vec![alice_tenant.clone()]);
    assert!(who_am_i(&s, &alice).await.email_verified);
    assert_eq!(
        s.tenant(&alice, &alice_tenant).await.phase(),
        TenantPhase::Provisioning
    );
    // Used once: the second use is refused.
    let e = expect_code(
        verify(&s, &alice, &alice_token).await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&e), "VERIFICATION_TOKEN_USED");
    // Verified already: no new link.
    let e = expect_code(
        s.accounts()
            .resend_verification_email(authed(ResendVerificationEmailRequest {}, &alice))
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(reason(&e), "EMAIL_ALREADY_VERIFIED");

    // Bob's link expires after 24 hours; a resend is rate limited, then works.
    s.advance(Duration::from_secs(24 * 3600 + 1));
    let bob = s.login("bob@example.org").await;
    let e = expect_code(verify(&s, &bob, &bob_token).await, Code::FailedPrecondition);
    assert_eq!(reason(&e), "VERIFICATION_TOKEN_EXPIRED");
    s.accounts()
        .resend_verification_email(authed(ResendVerificationEmailRequest {}, &bob))
        .await
        .unwrap();
    expect_code(
        s.accounts()
            .resend_verification_email(authed(ResendVerificationEmailRequest {}, &bob))
            .await,
        Code::ResourceExhausted,
    );
    let files = smtp.wait_for(3).await;
    let fresh = token_in(&std::fs::read_to_string(&files[2]).unwrap());
    assert_ne!(fresh, bob_token);
    assert!(verify(&s, &bob, &fresh).await.is_ok());

    // The audit log has the verification and the refusals, without tokens.
    let events = all_audit_events_raw(&db);
    assert!(!events.contains(&alice_token));
    s.stop().await;
}

/// The audit rows' text as the database holds it.
/// Nothing an owner or an admin changes provisions a tenant before its owner verified the
/// address: a retention change, a suspension and a resumption (each followed by a
/// reconcile pass) leave the cluster without a Tenant and the phase `AwaitingVerification`;
/// the verification then applies the Tenant with what was changed meanwhile.
#[tokio::test]
async fn changes_before_verification_provision_nothing_and_the_phase_says_why() {
    const TENANT: &str = "/apis/tenantry.dev/v1alpha1/tenants/acme";
    let db = Database::new().await;
    let fake = tenantry_operator::fake_api::FakeApi::new();
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: [
                "--provisioner",
                "kubernetes",
                "--tenant-domain",
                "tenants.example.com",
                "--require-email-verification",
                "--public-url",
                "https://portal.example.com",
            ]
            .map(String::from)
            .to_vec(),
            kube_client: Some(fake.client()),
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    let (_, tenant_id) = s.signup("alice@example.org", "acme").await;
    let alice = s.login("alice@example.org").await;
    let (_, root, _) = s.admin_session("root@example.com").await;
    let reconcile = async || {
        tenantry_api::provision::reconcile_all(&s.state.store, &s.state.provisioner)
            .await
            .unwrap();
        // Background applies (if any) get their moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let awaiting = async || {
        let t = s.tenant(&alice, &tenant_id).await;
        assert_eq!(t.phase(), TenantPhase::AwaitingVerification, "{t:?}");
        assert!(t.message.contains("verify"), "{}", t.message);
        assert!(fake.get(TENANT).is_none(), "a Tenant was applied");
    };
    reconcile().await;
    awaiting().await;

    s.tenants()
        .set_retention_policy(authed(
            SetRetentionPolicyRequest {
                tenant_id: tenant_id.clone(),
                max_age_hours: 48,
                max_count: 500,
            },
            &alice,
        ))
        .await
        .unwrap();
    reconcile().await;
    awaiting().await;
    let id = || tenant_id.clone();
    let suspended = s
        .admin()
        .suspend_tenant(authed(SuspendTenantRequest { tenant_id: id() }, &root))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(suspended.phase(), TenantPhase::AwaitingVerification);
    reconcile().await;
    awaiting().await;
    s.admin()
        .resume_tenant(authed(ResumeTenantRequest { tenant_id: id() }, &root))
        .await
        .unwrap();
    reconcile().await;
    awaiting().await;

    // The link verifies and provisions, with the retention set while waiting.
    let link = tenantry_test_support::verification_link(&outbox_of(&db), "alice@example.org")
        .expect("a verification link");
    let token = link.rsplit_once("token=").unwrap().1;
    let r = verify(&s, &alice, token).await.unwrap();
    assert_eq!(r.provisioning_tenant_ids, vec![tenant_id.clone()]);
    let applied = tenantry_test_support::eventually_some(
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || fake.get(TENANT),
    )
    .await
    .expect("the verification applies the Tenant");
    assert_eq!(applied["spec"]["retention"]["maxAgeHours"], 48, "{applied}");
    assert_eq!(applied["spec"]["suspended"], false, "{applied}");
    assert_eq!(
        s.tenant(&alice, &tenant_id).await.phase(),
        TenantPhase::Provisioning
    );
    s.stop().await;
}

/// A database that migration 6 left with a tenant waiting for its owner (phase `Pending`
/// then) moves it to `AwaitingVerification`; a verified owner's `Pending` tenant stays.
#[tokio::test]
async fn migration_7_gives_waiting_tenants_their_own_phase() {
    use sqlx::Connection as _;
    let db = Database::new().await;
    let mut conn = db.at_version(6).await;
    sqlx::raw_sql(
        "INSERT INTO users (id, email, password_hash, created_at_ms, email_verified_at_ms) VALUES \
         ('u-new', 'new@example.com', 'x', 1, NULL), ('u-old', 'old@example.com', 'x', 1, 1); \
         INSERT INTO tenants (id, name, owner_user_id, plan, phase, retention_max_age_hours, \
         retention_max_count, created_at_ms, updated_at_ms) VALUES \
         ('t-new', 'new', 'u-new', 'free', 'Pending', 336, 1000, 1, 1), \
         ('t-old', 'old', 'u-old', 'free', 'Pending', 336, 1000, 1, 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let store = tenantry_api::store::Store::connect(&db.url, 2)
        .await
        .unwrap();
    let phase = async |id: &str| store.tenant(id).await.unwrap().unwrap().phase;
    use tenantry_proto::phase::TenantPhase as Phase;
    assert_eq!(phase("t-new").await, Phase::AwaitingVerification);
    assert_eq!(phase("t-old").await, Phase::Pending);
    store.close().await;
}

fn all_audit_events_raw(db: &Database) -> String {
    String::from_utf8_lossy(&db.raw_contents()).into_owned()
}

/// Counts the received mails whose subject contains `what`.
fn subjects(smtp: &SmtpServer) -> Vec<String> {
    smtp.received()
        .iter()
        .map(|f| {
            header(&std::fs::read_to_string(f).unwrap(), "Subject")
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// `GET /metrics` on the metrics listener, the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample named exactly `name` (with its labels), or 0 when absent.
fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn an_smtp_outage_delays_mail_and_each_is_sent_exactly_once_after() {
    let db = Database::new().await;
    let dir = db.dir.path().to_path_buf();
    let outage = RelayDown::start().await;
    let port = outage.port;
    // Certificates and password first; the server itself starts later.
    smtp_certificates(&dir);
    let key = dkim_key(&dir, false);
    let s = TestServer::start_with(
        &db,
        Options {
            extra_args: [
                smtp_args(&dir, port, &key),
                vec!["--metrics-listen".into(), "127.0.0.1:0".into()],
            ]
            .concat(),
            ..Options::default()
        },
        tenantry_api::clock::ManualClock::new(T0_MS),
    )
    .await;
    // The listener is bound as the server starts, a moment after it accepts gRPC.
    wait_until(|| s.state.metrics_addr.get().is_some(), "serving /metrics").await;
    let metrics_addr = *s.state.metrics_addr.get().unwrap();
    s.signup("alice@example.org", "acme").await;
    s.signup("bob@example.org", "bobco").await;
    let token = s.login("alice@example.org").await;
    s.accounts()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a different long passphrase 42".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    // SMTP is down: each attempt fails, and the mails wait.
    let mailer = std::sync::Arc::clone(&s.state.mailer);
    wait_until(|| mailer.stats.snapshot().1 >= 3, "three failed attempts").await;
    assert_eq!(s.state.store.outbox_backlog().await.unwrap().0, 3);
    assert_eq!(mailer.stats.snapshot().0, 0);
    // The failures are metrics, by kind and without an address; the backlog is too.
    s.advance(Duration::from_secs(5));
    let scraped = scrape(metrics_addr).await;
    assert!(
        metric(
            &scraped,
            "tenantry_api_mail_failed_attempts_total{kind=\"verify_email\"}"
        ) >= 2.0,
        "{scraped}"
    );
    assert!(
        metric(
            &scraped,
            "tenantry_api_mail_failed_attempts_total{kind=\"password_changed\"}"
        ) >= 1.0,
        "{scraped}"
    );
    assert_eq!(
        metric(&scraped, "tenantry_api_mail_outbox_pending"),
        3.0,
        "{scraped}"
    );
    assert!(
        metric(
            &scraped,
            "tenantry_api_mail_outbox_oldest_pending_age_seconds"
        ) >= 5.0,
        "{scraped}"
    );
    assert!(!scraped.contains("mail_sent_total{"), "{scraped}");
    assert!(
        !scraped.contains("example.org"),
        "an address in the metrics: {scraped}"
    );

    // SMTP is back; once the backoff has passed, every mail goes, once.
    outage.end().await;
    let smtp = SmtpServer::start(&dir, port);
    s.advance(Duration::from_secs(60));
    smtp.wait_for(3).await;
    for _ in 0..3 {
        s.advance(Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let got = subjects(&smtp);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        got.iter().filter(|s| s.contains("Verify")).count(),
        2,
        "{got:?}"
    );
    assert!(
        got.iter().any(|s| s.contains("password was changed")),
        "{got:?}"
    );
    let ids: std::collections::HashSet<String> = smtp
        .received()
        .iter()
        .map(|f| {
            header(&std::fs::read_to_string(f).unwrap(), "Message-ID")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(s.state.store.outbox_backlog().await.unwrap(), (0, None));
    assert_eq!(mailer.stats.snapshot().0, 3);
    let scraped = scrape(metrics_addr).await;
    assert_eq!(
        metric(
            &scraped,
            "tenantry_api_mail_sent_total{kind=\"verify_email\"}"
        ),
        2.0,
        "{scraped}"
    );
    assert_eq!(
        metric(
            &scraped,
            "tenantry_api_mail_sent_total{kind=\"password_changed\"}"
        ),
        1.0,
        "{scraped}"
    );
    assert_eq!(
        metric(&scraped, "tenantry_api_mail_outbox_pending"),
        0.0,
        "{scraped}"
    );
    assert_eq!(
        metric(
            &scraped,
            "tenantry_api_mail_outbox_oldest_pending_age_seconds"
        ),
        0.0,
        "{scraped}"
    );
    s.stop().await;
}

#[tokio::test]
async fn mail_committed_before_the_api_was_killed_is_sent_after_the_restart() {
    let db = Database::new().await;
    ensure_master_key(&db);
    let dir = db.dir.path().to_path_buf();
    let outage = RelayDown::start().await;
    let port = outage.port;
    smtp_certificates(&dir);
    let key = dkim_key(&dir, false);
    let api_port = free_port();
    let mut args = serve_argv(&db, api_port);
    args.extend(smtp_args(&dir, port, &key));
    let start = || {
        Command::new(BIN)
            .args(&args)
            .env("TENANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut api = start();
    let client = connect(api_port).await;
    client
        .accounts()
        .signup(SignupRequest {
            email: "alice@example.org".into(),
            password: PASSWORD.into(),
            tenant_name: "acme".into(),
            plan: 0,
        })
        .await
        .unwrap();
    // Committed, not sent (the relay is down): the API dies without a chance to finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.kill().unwrap();
    api.wait().unwrap();

    outage.end().await;
    let smtp = SmtpServer::start(&dir, port);
    let mut api = start();
    let files = smtp.wait_for(1).await;
    assert!(
        std::fs::read_to_string(&files[0])
            .unwrap()
            .contains("Verify your email")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(smtp.received().len(), 1, "sent exactly once");
    api.kill().unwrap();
    api.wait().unwrap();
}

/// `serve` flags for the real binary on this database.
fn serve_argv(db: &Database, port: u16) -> Vec<String> {
    let args = serve_args(db, &[]);
    let mut argv = vec![
        "serve".to_owned(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--database-url".into(),
        db.url.clone(),
        "--data-dir".into(),
        db.dir.path().display().to_string(),
        "--argon2-memory-kib".into(),
        "1024".into(),
        "--argon2-iterations".into(),
        "1".into(),
    ];
    for (flag, path) in [
        ("--master-key-file", &args.db.master_key_file),
        ("--token-signing-key-file", &args.db.token_signing_key_file),
    ] {
        argv.push(flag.into());
        argv.push(path.as_ref().unwrap().display().to_string());
    }
    argv
}

async fn connect(port: u16) -> tenantry_client::Client {
    let start = Instant::now();
    loop {
        if let Ok(channel) = tenantry_client::connect(
            &format!("http://127.0.0.1:{port}"),
            tenantry_client::Trust::default(),
        )
        .await
        {
            return tenantry_client::Client::new(channel, tenantry_client::Credentials::default());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "API did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The outbox holds mail with its links: a directory left wider than 0700 is narrowed
/// when mail is written to it, and every file is 0600.
#[tokio::test]
async fn the_outbox_is_private_even_when_created_wider() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = Database::new().await;
    let outbox = db.dir.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    std::fs::set_permissions(&outbox, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = TestServer::start(&db).await;
    s.signup("alice@example.org", "acme").await;
    wait_until(|| !outbox_of(&db).is_empty(), "the verification mail").await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&outbox), 0o700);
    for entry in std::fs::read_dir(&outbox).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
    }
    s.stop().await;
}

#[tokio::test]
async fn security_events_notify_the_user_by_mail_in_the_outbox() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("alice@example.org", "acme").await;
    let token = s.login("alice@example.org").await;
    let (_secret, codes) = s.enroll(&token).await;
    let token = s.login("alice@example.org").await;
    s.mfa()
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(verify_mfa_request::Factor::RecoveryCode(codes[0].clone())),
            },
            &token,
        ))
        .await
        .unwrap();
    // Without --smtp-url mail is written, signed, to <data-dir>/outbox.
    let outbox = db.dir.path().join("outbox");
    let read = || -> Vec<String> {
        std::fs::read_dir(&outbox)
            .map(|d| {
                d.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until(|| read().len() >= 3, "three mails in the outbox").await;
    let mails = read();
    let has = |subject: &str| mails.iter().any(|m| header(m, "Subject") == Some(subject));
    assert!(has("Verify your email address"));
    assert!(has("Two-factor authentication was turned on"));
    assert!(has("A recovery code was used"));
    for m in &mails {
        assert!(header(m, "DKIM-Signature").is_some());
        // No secret: the recovery codes never travel by mail.
        for code in &codes {
            assert!(!m.contains(code.as_str()));
        }
        assert!(!m.contains("<img"), "no tracking pixel");
    }
    s.stop().await;
}

#[tokio::test]
async fn dns_records_parse_back_into_valid_spf_dmarc_and_the_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dkim_key(dir.path(), false);
    let zone = run_api(&[
        "dns-records",
        "--domain",
        DOMAIN,
        "--dkim-selector",
        SELECTOR,
        "--dkim-key-file",
        key.to_str().unwrap(),
        "--spf-include",
        "_spf.relay.example.net",
        "--dmarc-rua",
        "mailto:dmarc@example.com",
    ]);
    // Zone-file lines: NAME. TTL IN TXT "…" (strings joined back).
    let mut records = std::collections::HashMap::new();
    for line in zone.lines() {
        let fields: Vec<&str> = line.splitn(5, '\t').collect();
        assert_eq!(fields.len(), 5, "{line}");
        assert!(fields[0].ends_with('.'), "{line}");
        assert_eq!(&fields[2..4], ["IN", "TXT"]);
        let value: String = fields[4]
            .trim_matches(|c| c == '(' || c == ')' || c == ' ')
            .split("\" \"")
            .map(|p| p.trim_matches('"'))
            .collect();
        records.insert(fields[0].trim_end_matches('.').to_owned(), value);
    }
    let spf = &records[DOMAIN];
    let terms: Vec<&str> = spf.split(' ').collect();
    assert_eq!(terms[0], "v=spf1");
    assert_eq!(terms.last(), Some(&"-all"));
    for term in &terms[1..terms.len() - 1] {
        let domain = term
            .strip_prefix("include:")
            .expect("only include mechanisms");
        // Host names as SPF has them: labels of letters, digits, '-' and '_'.
        assert!(
            domain.split('.').all(|l| !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')),
            "{term}"
        );
    }
    let dmarc = &records[&format!("_dmarc.{DOMAIN}")];
    let tags: std::collections::HashMap<&str, &str> = dmarc
        .split("; ")
        .map(|t| t.split_once('=').unwrap())
        .collect();
    assert_eq!(tags["v"], "DMARC1");
    assert_eq!(tags["p"], "reject");
    assert_eq!(tags["adkim"], "s");
    assert_eq!(tags["aspf"], "s");
    assert_eq!(tags["rua"], "mailto:dmarc@example.com");
    assert!(dmarc.starts_with("v=DMARC1;"), "v= must come first");
    let dkim = &records[&format!("{SELECTOR}._domainkey.{DOMAIN}")];
    let loaded = tenantry_api::mail::load_dkim_key(&key).unwrap();
    assert_eq!(
        dkim,
        &format!("v=DKIM1; k=ed25519; p={}", loaded.public_key_base64())
    );
    // --json has the same records.
    let (_, json_value) = dkim_record(&key);
    assert_eq!(&json_value, dkim);

    // A DMARC policy other than the default, and an RSA key split in 255-byte strings.
    let rsa = dkim_key(dir.path(), true);
    let zone = run_api(&[
        "dns-records",
        "--domain",
        DOMAIN,
        "--dkim-key-file",
        rsa.to_str().unwrap(),
        "--dmarc-policy",
        "quarantine",
    ]);
    assert!(zone.contains("p=quarantine; adkim=s; aspf=s"), "{zone}");
    assert!(
        zone.contains(
            "tenantry._domainkey.mail.example.com.\t3600\tIN\tTXT\t( \"v=DKIM1; k=rsa; p="
        ),
        "{zone}"
    );
    // Bad input is refused with a clear message, and nothing is printed.
    let out = Command::new(BIN)
        .args(["dns-records", "--domain", DOMAIN, "--dkim-key-file"])
        .arg(&key)
        .args(["--dmarc-rua", "dmarc@example.com"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mailto:"));
}

/// Reads `<data-dir>/outbox` (mail without `--smtp-url`), decoded.
fn outbox_of(db: &Database) -> Vec<String> {
    tenantry_test_support::read_mail(&db.dir.path().join("outbox"))
}

fn with_subject<'a>(mails: &'a [String], subject: &str) -> Vec<&'a String> {
    mails
        .iter()
        .filter(|m| header(m, "Subject") == Some(subject))
        .collect()
}

#[tokio::test]
async fn a_granted_and_a_revoked_role_are_told_to_the_user() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, admin, secret) = s.admin_session("ops@example.com").await;
    s.step_up(&admin, &secret).await;
    let (alice_id, _) = s.signup("alice@example.org", "acme").await;
    let alice = s.login("alice@example.org").await;
    s.enroll(&alice).await;
    s.admin()
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: alice_id.clone(),
                role: AdminRole::Auditor as i32,
                expires_in_days: 30,
            },
            &admin,
        ))
        .await
        .unwrap();
    s.admin()
        .revoke_admin(authed(
            RevokeAdminRequest {
                user_id: alice_id.clone(),
                role: AdminRole::Auditor as i32,
            },
            &admin,
        ))
        .await
        .unwrap();
    wait_until(
        || {
            let mails = outbox_of(&db);
            !with_subject(&mails, "Your auditor role was removed").is_empty()
                && !with_subject(&mails, "You were granted the auditor role").is_empty()
        },
        "the grant and revocation notices",
    )
    .await;
    let mails = outbox_of(&db);
    let granted = with_subject(&mails, "You were granted the auditor role");
    assert_eq!(granted.len(), 1);
    assert_eq!(header(granted[0], "To"), Some("alice@example.org"));
    assert!(granted[0].contains("until 2026-01-31"), "{}", granted[0]);
    let revoked = with_subject(&mails, "Your auditor role was removed");
    assert_eq!(header(revoked[0], "To"), Some("alice@example.org"));
    s.stop().await;
}

#[tokio::test]
async fn an_owner_hears_of_an_instance_degraded_for_the_threshold_and_of_its_return() {
    use tenantry_api::mail::worker::check_health;
    use tenantry_api::store::TenantStatus;
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, tenant_id) = s.signup("alice@example.org", "acme").await;
    let status = |phase| TenantStatus {
        phase,
        endpoint: String::new(),
        cert_serial: String::new(),
        cert_not_after_ms: 0,
        cert_renewal_ms: 0,
        message: String::new(),
    };
    let after = Duration::from_secs(15 * 60);
    let degraded = "Your instance acme is degraded";
    let back = "Your instance acme is back";
    let count = |subject: &str| with_subject(&outbox_of(&db), subject).len();
    let set = |phase| {
        let store = s.state.store.clone();
        let now = s.now_ms();
        let st = status(phase);
        let id = tenant_id.clone();
        async move { store.set_tenant_status(&id, &st, now).await.unwrap() }
    };

    // Degraded briefly, then Ready again: nobody is told.
    set(tenantry_proto::phase::TenantPhase::Degraded).await;
    check_health(&s.state, after).await.unwrap();
    s.advance(Duration::from_secs(5 * 60));
    check_health(&s.state, after).await.unwrap();
    set(tenantry_proto::phase::TenantPhase::Ready).await;
    check_health(&s.state, after).await.unwrap();

    // Degraded for the threshold: one notice, however often the watcher looks.
    set(tenantry_proto::phase::TenantPhase::Degraded).await;
    check_health(&s.state, after).await.unwrap();
    s.advance(Duration::from_secs(14 * 60));
    check_health(&s.state, after).await.unwrap();
    s.advance(Duration::from_secs(61));
    check_health(&s.state, after).await.unwrap();
    s.advance(Duration::from_secs(600));
    check_health(&s.state, after).await.unwrap();
    wait_until(|| count(degraded) == 1, "the Degraded notice").await;

    // Ready again: the owner hears of it, once.
    set(tenantry_proto::phase::TenantPhase::Ready).await;
    check_health(&s.state, after).await.unwrap();
    check_health(&s.state, after).await.unwrap();
    wait_until(|| count(back) == 1, "the recovery notice").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(degraded), 1);
    assert_eq!(count(back), 1);
    let mails = outbox_of(&db);
    assert!(with_subject(&mails, degraded)[0].contains("for 15 minutes"));
    s.stop().await;
}
