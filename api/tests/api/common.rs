//! Test harness: the real API server on a loopback port, with a manual clock, driven by
//! real tonic clients. Runs on SQLite, or on PostgreSQL when `TENANTRY_TEST_DATABASE_URL`
//! is set (each server then gets its own schema).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use data_encoding::BASE32_NOPAD;
use tenantry_api::clock::{Clock as _, ManualClock};
use tenantry_api::config::{Cli, Command, ServeArgs};
use tenantry_api::state::AppState;
use tenantry_api::totp;
use tenantry_client::{AuthedChannel, Client, Credentials, Trust};
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

/// Start of the manual clock: 2026-01-01T00:00:00Z.
pub const T0_MS: i64 = 1_767_225_600_000;

/// The password test users sign up with (one for every suite).
pub use tenantry_test_support::PASSWORD;

/// Where a test server keeps its data.
pub struct Database {
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_schema: Option<(String, String)>,
}

impl Database {
    /// The suite's database: PostgreSQL when `TENANTRY_TEST_DATABASE_URL` is set, else SQLite.
    pub async fn new() -> Database {
        match Database::postgres().await {
            Some(db) => db,
            None => Database::sqlite(),
        }
    }

    /// A SQLite database in a new directory.
    pub fn sqlite() -> Database {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/tenantry.db", dir.path().display());
        Database {
            url,
            dir,
            pg_schema: None,
        }
    }

    /// A new schema of the PostgreSQL database of `TENANTRY_TEST_DATABASE_URL`, if set.
    pub async fn postgres() -> Option<Database> {
        let base = std::env::var("TENANTRY_TEST_DATABASE_URL")
            .ok()
            .filter(|b| !b.is_empty())?;
        let dir = tempfile::tempdir().unwrap();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        psql(&base, &format!("CREATE SCHEMA {schema}")).await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        Some(Database {
            url,
            dir,
            pg_schema: Some((base, schema)),
        })
    }

    pub fn is_sqlite(&self) -> bool {
        self.pg_schema.is_none()
    }

    /// A connection to this database as the first `version` migrations left it, for tests
    /// of what a later migration does to existing rows.
    pub async fn at_version(&self, version: usize) -> sqlx::AnyConnection {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let url = if self.is_sqlite() {
            format!("{}?mode=rwc", self.url)
        } else {
            self.url.clone()
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        for m in &tenantry_api::migrations::MIGRATIONS[..version] {
            let sql = if self.is_sqlite() {
                m.sqlite
            } else {
                m.postgres
            };
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, $2, 0)")
                .bind(m.version)
                .bind(m.description)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        conn
    }

    /// Everything the database holds, as bytes: SQLite's files, or PostgreSQL's data of
    /// this test's schema as `pg_dump` prints it.
    pub fn raw_contents(&self) -> Vec<u8> {
        match &self.pg_schema {
            None => self.raw_sqlite_bytes(),
            Some((base, schema)) => {
                let out = std::process::Command::new("pg_dump")
                    .args(["--data-only", "--schema", schema, base])
                    .output()
                    .expect("pg_dump");
                assert!(out.status.success(), "pg_dump failed: {out:?}");
                out.stdout
            }
        }
    }

    /// Every byte the SQLite database has on disk (main file and WAL).
    pub fn raw_sqlite_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for name in ["tenantry.db", "tenantry.db-wal"] {
            if let Ok(bytes) = std::fs::read(self.dir.path().join(name)) {
                out.extend(bytes);
            }
        }
        out
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some((base, schema)) = self.pg_schema.take() {
            // Best effort: a leftover schema only costs disk in the test database. This
            // blocks the test's (single) runtime thread, so a pool connection still holding
            // a lock in the schema could never let go: give up after a while rather than
            // hang the suite.
            let _ = std::process::Command::new("psql")
                .args([
                    base.as_str(),
                    "-q",
                    "-c",
                    "SET lock_timeout = '10s'",
                    "-c",
                    &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                ])
                .output();
        }
    }
}

async fn psql(base: &str, sql: &str) {
    sqlx::any::install_default_drivers();
    use sqlx::Connection as _;
    let mut conn = sqlx::AnyConnection::connect(base)
        .await
        .expect("connect to TENANTRY_TEST_DATABASE_URL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Server options a test may change.
#[derive(Default)]
pub struct Options {
    pub extra_args: Vec<String>,
    /// The cluster of `--provisioner kubernetes` (an in-memory fake in tests).
    pub kube_client: Option<kube::Client>,
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub state: Arc<AppState>,
    pub channel: Channel,
    pub db_args: tenantry_api::config::DatabaseArgs,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<tenantry_api::Result<()>>>,
}

pub fn serve_args(db: &Database, extra: &[String]) -> ServeArgs {
    let mut argv: Vec<String> = vec![
        "tenantry-api".into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        db.url.clone(),
        "--master-key-file".into(),
        db.dir.path().join("master.key").display().to_string(),
        "--token-signing-key-file".into(),
        db.dir
            .path()
            .join("token-signing.key")
            .display()
            .to_string(),
        // Cheap hashing keeps the suite fast; the default parameters have their own test.
        "--argon2-memory-kib".into(),
        "1024".into(),
        "--argon2-iterations".into(),
        "1".into(),
        "--rate-limit-per-second".into(),
        "0".into(),
        // Mail (the outbox files, the made DKIM key) stays in the test's directory.
        "--data-dir".into(),
        db.dir.path().display().to_string(),
        // Suites not about email verification provision at signup, as before it existed;
        // the mail tests turn it back on (a later flag wins).
        "--require-email-verification=false".into(),
    ];
    argv.extend(extra.iter().cloned());
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    args
}

/// Writes `contents` to a new key file only its owner may read, as the API requires.
pub fn write_key_file(path: &std::path::Path, contents: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(contents.as_bytes())
        .unwrap();
}

pub fn ensure_master_key(db: &Database) {
    use secrecy::ExposeSecret as _;
    let path = db.dir.path().join("master.key");
    if !path.exists() {
        let (_, text) = tenantry_api::crypto::MasterKey::generate().unwrap();
        write_key_file(&path, text.expose_secret());
    }
    let path = db.dir.path().join("token-signing.key");
    if !path.exists() {
        let signer = tenantry_proto::token::TokenSigner::generate().unwrap();
        write_key_file(&path, signer.to_pkcs8_pem().expose_secret());
        std::fs::write(
            db.dir.path().join("token-public.pem"),
            signer.public_key_pem(),
        )
        .unwrap();
    }
}

/// A verifier for the instance tokens this database's server issues.
pub fn token_verifier(db: &Database) -> tenantry_proto::token::TokenVerifier {
    let pem = std::fs::read_to_string(db.dir.path().join("token-public.pem")).unwrap();
    tenantry_proto::token::TokenVerifier::from_public_key_pem(&pem).unwrap()
}

impl TestServer {
    pub async fn start(db: &Database) -> TestServer {
        Self::start_with(db, Options::default(), ManualClock::new(T0_MS)).await
    }

    pub async fn start_with(db: &Database, opts: Options, clock: ManualClock) -> TestServer {
        ensure_master_key(db);
        let args = serve_args(db, &opts.extra_args);
        let state = tenantry_api::server::build_state_with(
            &args,
            Arc::new(clock.clone()),
            opts.kube_client,
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tenantry_api::server::serve(
            Arc::clone(&state),
            listener,
            None,
            async move {
                let _ = rx.await;
            },
        ));
        let channel = tenantry_client::connect(&format!("http://{addr}"), Trust::default())
            .await
            .unwrap();
        TestServer {
            addr,
            clock,
            state,
            channel,
            db_args: args.db.clone(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// Service clients without credentials: each request brings its own ([`authed`]).
    pub fn client(&self) -> Client {
        Client::new(self.channel.clone(), Credentials::default())
    }
    pub fn accounts(&self) -> AccountServiceClient<AuthedChannel> {
        self.client().accounts()
    }
    pub fn mfa(&self) -> MfaServiceClient<AuthedChannel> {
        self.client().mfa()
    }
    pub fn tenants(&self) -> TenantServiceClient<AuthedChannel> {
        self.client().tenants()
    }
    pub fn admin(&self) -> AdminServiceClient<AuthedChannel> {
        self.client().admin()
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Signs a user up; returns (user_id, tenant_id).
    pub async fn signup(&self, email: &str, tenant: &str) -> (String, String) {
        let r = self
            .accounts()
            .signup(SignupRequest {
                email: email.into(),
                password: PASSWORD.into(),
                tenant_name: tenant.into(),
                plan: 0,
            })
            .await
            .unwrap()
            .into_inner();
        (r.user_id, r.tenant_id)
    }

    /// Logs in with [`PASSWORD`]; returns the session token.
    pub async fn login(&self, email: &str) -> String {
        self.accounts()
            .login(LoginRequest {
                email: email.into(),
                password: PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .session_token
    }

    /// The current TOTP code for a base32 secret, at the server's clock.
    pub fn totp_now(&self, secret_b32: &str) -> String {
        totp_code(secret_b32, self.now_ms(), 0)
    }

    /// Enrolls TOTP for the session; returns (secret, recovery codes).
    pub async fn enroll(&self, token: &str) -> (String, Vec<String>) {
        let begin = self
            .mfa()
            .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, token))
            .await
            .unwrap()
            .into_inner();
        let code = self.totp_now(&begin.secret);
        let confirm = self
            .mfa()
            .confirm_totp_enrollment(authed(ConfirmTotpEnrollmentRequest { code }, token))
            .await
            .unwrap()
            .into_inner();
        (begin.secret, confirm.recovery_codes)
    }

    /// A bootstrap admin with TOTP enrolled and a fresh session that has verified it.
    /// Returns (user_id, token, totp secret).
    pub async fn admin_session(&self, email: &str) -> (String, String, String) {
        let outcome = tenantry_api::server::bootstrap_admin(
            &self.db_args,
            email,
            &secrecy::SecretString::from(PASSWORD.to_owned()),
            &self.clock,
        )
        .await
        .unwrap();
        let user_id = match outcome {
            tenantry_api::server::Bootstrap::Created { user_id }
            | tenantry_api::server::Bootstrap::Promoted { user_id }
            | tenantry_api::server::Bootstrap::AlreadyAdmin { user_id } => user_id,
        };
        let token = self.login(email).await;
        let (secret, _) = self.enroll(&token).await;
        (user_id, token, secret)
    }

    /// The tenant as `GetTenant` shows it to the session `token`.
    pub async fn tenant(&self, token: &str, tenant_id: &str) -> Tenant {
        self.tenants()
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: tenant_id.into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .tenant
            .unwrap()
    }

    /// Verifies a fresh TOTP code on the session (moves the clock one step so the code is new).
    pub async fn step_up(&self, token: &str, secret: &str) {
        self.advance(Duration::from_secs(30));
        self.mfa()
            .verify_mfa(authed(
                VerifyMfaRequest {
                    factor: Some(verify_mfa_request::Factor::Code(self.totp_now(secret))),
                },
                token,
            ))
            .await
            .unwrap();
    }
}

/// The TOTP code for `secret_b32` at `now_ms`, `offset_steps` steps away.
pub fn totp_code(secret_b32: &str, now_ms: i64, offset_steps: i64) -> String {
    let secret = BASE32_NOPAD.decode(secret_b32.as_bytes()).unwrap();
    let step = totp::step_at(now_ms.div_euclid(1000)) + offset_steps;
    totp::format_code(totp::code_at_step(&secret, step).unwrap())
}

/// A request with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    Credentials::bearer(&secrecy::SecretString::from(token))
        .unwrap()
        .authorize(Request::new(msg))
}

/// Asserts a status code and returns the status.
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The field of the first field violation of a status.
pub fn violated_field(status: &Status) -> String {
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

/// Every audit event, paging through `ListAuditEvents`.
pub async fn all_audit_events(server: &TestServer, token: &str) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = server
            .admin()
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    page_size: 50,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}
