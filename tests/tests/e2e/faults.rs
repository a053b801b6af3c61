//! Fault injection with the real binaries: a PostgreSQL outage in the middle of 200
//! concurrent signups and logins, an API replica killed with SIGKILL while serving, and a
//! scripted attack with every program logging at TRACE. (A full disk under the runtime is
//! in the runtime's own suite, `tenant-runtime/tests/runtime/disk.rs`.)
//!
//! The PostgreSQL tests stop and start a PRIVATE cluster they make with `initdb` and
//! `pg_ctl` in a temporary directory on a free port (never the shared server); they are
//! skipped, saying why, where the PostgreSQL server programs are not installed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::{PASSWORD, free_port};
use tenantry_tests::{authed, bin, connect, run_with_stdin, totp_now};
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A private PostgreSQL cluster in a temporary directory; stopped on drop.
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root: then every server program runs as `postgres`.
    as_postgres: bool,
}

impl Postgres {
    /// Makes and starts a cluster; `None` (with the reason printed) when the server
    /// programs are not installed.
    fn start() -> Option<Postgres> {
        let Some(bin) = server_bin_dir() else {
            eprintln!(
                "skipped: no PostgreSQL server programs (initdb, pg_ctl) in /usr/lib/postgresql/*/bin"
            );
            return None;
        };
        let as_postgres = is_root();
        let dir = tempfile::tempdir().unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot hand the cluster directory to the postgres user");
        }
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
            as_postgres,
        };
        let data = pg.data_dir();
        let out = pg
            .tool("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "root", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.resume();
        Some(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// Stops the server at once, as a crash would (`immediate`: open connections are cut,
    /// the next start recovers from the WAL).
    fn stop(&self) {
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-m", "immediate", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The rows of `query`, columns split at `|`.
    fn rows(&self, query: &str) -> Vec<Vec<String>> {
        let psql = self.bin.join("psql");
        let out = Command::new(if psql.is_file() { psql } else { "psql".into() })
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-F",
                "|",
                "-d",
                &self.url(),
                "-c",
                query,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('|').map(str::to_owned).collect())
            .collect()
    }

    fn count(&self, query: &str) -> i64 {
        self.rows(query)[0][0].parse().unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`.
fn server_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        == Some("0")
}

/// Writes production keys (`tenantry-api keygen`) into `dir/keys`.
fn keygen(dir: &Path) -> PathBuf {
    let keys = dir.join("keys");
    let out = Command::new(bin("tenantry-api"))
        .args(["keygen", "--out-dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    keys
}

/// The database flags of every `tenantry-api` command here.
fn db_args(pg: &Postgres, keys: &Path) -> Vec<String> {
    vec![
        "--database-url".into(),
        pg.url(),
        "--master-key-file".into(),
        keys.join("master.key").display().to_string(),
        "--token-signing-key-file".into(),
        keys.join("token-signing.key").display().to_string(),
        "--data-dir".into(),
        keys.display().to_string(),
        // Cheap hashing keeps the test quick; the defaults are tested in the API suite.
        "--argon2-memory-kib".into(),
        "1024".into(),
        "--argon2-iterations".into(),
        "1".into(),
    ]
}

/// A real `tenantry-api serve` replica; killed on drop.
struct Replica {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Replica {
    async fn serve(pg: &Postgres, keys: &Path, name: &str) -> Replica {
        let port = free_port();
        let log = pg.dir.path().join(format!("{name}.log"));
        let child = tokio::process::Command::new(bin("tenantry-api"))
            .arg("serve")
            .args(db_args(pg, keys))
            // The signups here are about the database, not the owner's address: they
            // provision at once, as before verification existed.
            .arg("--require-email-verification=false")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            // 200 clients share one address: no per-source limit in this test.
            .args(["--rate-limit-per-second", "0"])
            .env("TENANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let replica = Replica { child, port, log };
        replica.channel().await;
        replica
    }

    async fn channel(&self) -> Channel {
        connect(self.port, || self.log()).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An admin session with a second factor verified (bootstrap, login, TOTP enrollment,
/// a recovery code for the step-up), for `VerifyAuditLog`.
async fn admin_session(pg: &Postgres, keys: &Path, channel: &Channel) -> String {
    let email = "ops@example.com";
    let boot = run_with_stdin(
        Command::new(bin("tenantry-api"))
            .args(["bootstrap-admin", "--email", email])
            .args(db_args(pg, keys)),
        &format!("{PASSWORD}\n"),
    );
    assert!(
        boot.status.success(),
        "{}",
        String::from_utf8_lossy(&boot.stderr)
    );
    let token = tenantry_tests::login(channel, email).await;
    let mut mfa = MfaServiceClient::new(channel.clone());
    let enroll = mfa
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    let confirmed = mfa
        .confirm_totp_enrollment(authed(
            ConfirmTotpEnrollmentRequest {
                code: totp_now(&enroll.secret),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    mfa.verify_mfa(authed(
        VerifyMfaRequest {
            factor: Some(verify_mfa_request::Factor::RecoveryCode(
                confirmed.recovery_codes[0].clone(),
            )),
        },
        &token,
    ))
    .await
    .unwrap();
    token
}

async fn verify_audit_log(channel: &Channel, admin: &str) -> VerifyAuditLogResponse {
    AdminServiceClient::new(channel.clone())
        .verify_audit_log(authed(VerifyAuditLogRequest {}, admin))
        .await
        .unwrap()
        .into_inner()
}

async fn health(channel: &Channel) -> Option<ServingStatus> {
    let r = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn wait_for_health(channel: &Channel, want: ServingStatus, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if health(channel).await == Some(want) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signup_request(email: &str, tenant: &str) -> SignupRequest {
    SignupRequest {
        email: email.into(),
        password: PASSWORD.into(),
        tenant_name: tenant.into(),
        plan: 0,
    }
}

fn login_request(email: &str) -> LoginRequest {
    LoginRequest {
        email: email.into(),
        password: PASSWORD.into(),
    }
}

/// What one client of the outage test saw.
#[derive(Debug, Default)]
struct ClientLog {
    signed_up: bool,
    logged_in: bool,
    unavailable: usize,
    /// Codes other than OK and UNAVAILABLE, with their messages.
    unexpected: Vec<String>,
}

/// Calls `call` until it succeeds; UNAVAILABLE is retried every 300 ms when `retry` (for
/// up to a minute), anything else ends the attempts.
async fn attempt<T, F, Fut>(log: &mut ClientLog, retry: bool, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(r) => return Some(r.into_inner()),
            Err(s) if s.code() == Code::Unavailable => {
                log.unavailable += 1;
                if !retry || Instant::now() > deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => {
                log.unexpected
                    .push(format!("{:?}: {}", s.code(), s.message()));
                return None;
            }
        }
    }
}

/// PostgreSQL stopped (as by a crash) for 10 s in the middle of 200 concurrent signups
/// and logins against a real `tenantry-api serve`. Clients get UNAVAILABLE meanwhile and
/// health goes NOT_SERVING and back; the API recovers without a restart. Afterwards every
/// signup is complete (user, tenant in phase Provisioning for the provisioner, owner
/// membership, one audit row) or absent, every client that retried is signed up and
/// logged in, and the audit chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_during_signups_loses_nothing() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let keys = keygen(pg.dir.path());
    let mut api = Replica::serve(&pg, &keys, "api").await;
    let api_pid = api.child.id().unwrap();
    let channel = api.channel().await;
    let admin = admin_session(&pg, &keys, &channel).await;
    assert_eq!(health(&channel).await, Some(ServingStatus::Serving));

    const CLIENTS: usize = 200;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            // Spread over 4 s, so clients start before, during and after the stop at 1.5 s.
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            // Even clients retry on UNAVAILABLE, as a portal would; odd ones give up.
            let retry = i % 2 == 0;
            let email = format!("outage-{i}@example.com");
            let tenant = format!("outage-{i}");
            let mut log = ClientLog::default();
            let accounts = AccountServiceClient::new(channel);
            let signup = signup_request(&email, &tenant);
            log.signed_up = attempt(&mut log, retry, || {
                let (mut accounts, signup) = (accounts.clone(), signup.clone());
                async move { accounts.signup(signup).await }
            })
            .await
            .is_some();
            if log.signed_up {
                let login = login_request(&email);
                log.logged_in = attempt(&mut log, retry, || {
                    let (mut accounts, login) = (accounts.clone(), login.clone());
                    async move { accounts.login(login).await }
                })
                .await
                .is_some_and(|r| !r.session_token.is_empty());
            }
            log
        }));
    }

    tokio::time::sleep_until((start + Duration::from_millis(1500)).into()).await;
    pg.stop();
    let stopped = Instant::now();
    eprintln!("PostgreSQL stopped at {:.1?}", start.elapsed());
    let mut probe = AccountServiceClient::new(channel.clone());
    let status = probe
        .signup(signup_request("probe@example.com", "probe-tenant"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let not_serving_after =
        wait_for_health(&channel, ServingStatus::NotServing, Duration::from_secs(9)).await;
    eprintln!("health NOT_SERVING {not_serving_after:.1?} after the stop");
    tokio::time::sleep_until((stopped + Duration::from_secs(10)).into()).await;
    pg.resume();
    eprintln!("PostgreSQL started again at {:.1?}", start.elapsed());
    let serving_after =
        wait_for_health(&channel, ServingStatus::Serving, Duration::from_secs(30)).await;
    eprintln!("health SERVING {serving_after:.1?} after the restart");

    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    assert!(
        api.child.try_wait().unwrap().is_none() && api.child.id() == Some(api_pid),
        "the API must survive the outage without a restart"
    );
    let unexpected: Vec<_> = logs.iter().flat_map(|l| l.unexpected.iter()).collect();
    assert!(
        unexpected.is_empty(),
        "codes other than UNAVAILABLE: {unexpected:#?}"
    );
    let unavailable: usize = logs.iter().map(|l| l.unavailable).sum();
    assert!(
        unavailable > 0,
        "no client saw the outage; the test proves nothing"
    );
    for (i, log) in logs.iter().enumerate() {
        if i % 2 == 0 {
            assert!(
                log.signed_up && log.logged_in,
                "client {i} retried and failed: {log:?}"
            );
        }
    }

    // Every signup is complete or absent.
    let rows = pg.rows(
        "SELECT u.email, t.name, t.phase, \
           (SELECT count(*) FROM memberships m WHERE m.user_id = u.id AND m.tenant_id = t.id), \
           (SELECT count(*) FROM audit_events a WHERE a.action = 'signup' AND a.target = t.id \
              AND a.actor_user_id = u.id) \
         FROM users u LEFT JOIN tenants t ON t.owner_user_id = u.id \
         WHERE u.email LIKE 'outage-%'",
    );
    let present: HashMap<String, Vec<String>> =
        rows.into_iter().map(|r| (r[0].clone(), r)).collect();
    let mut complete: i64 = 0;
    for (i, log) in logs.iter().enumerate() {
        let email = format!("outage-{i}@example.com");
        match present.get(&email) {
            Some(row) => {
                assert_eq!(
                    row[1..],
                    [
                        format!("outage-{i}"),
                        "Provisioning".into(),
                        "1".into(),
                        "1".into()
                    ],
                    "signup {i} is incomplete"
                );
                complete += 1;
            }
            None => assert!(
                !log.signed_up,
                "client {i} was answered OK but nothing was stored"
            ),
        }
    }
    assert_eq!(
        pg.count("SELECT count(*) FROM tenants WHERE name LIKE 'outage-%'"),
        complete
    );
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM audit_events a WHERE a.action = 'signup' \
             AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = a.target)"
        ),
        0,
        "an audit row for a signup that is not there"
    );
    let logged_in = logs.iter().filter(|l| l.logged_in).count();
    let sessions = pg.count(
        "SELECT count(DISTINCT s.user_id) FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE u.email LIKE 'outage-%'",
    );
    assert!(
        sessions >= logged_in as i64,
        "{sessions} users with sessions, {logged_in} logins"
    );

    let rows = pg.count("SELECT count(*) FROM audit_events");
    let verified = verify_audit_log(&channel, &admin).await;
    assert!(
        verified.ok,
        "audit chain broken at {}",
        verified.first_bad_sequence
    );
    assert!(
        verified.checked as i64 >= rows,
        "{} of {rows} rows checked",
        verified.checked
    );
    eprintln!(
        "outage survived: {complete} of {CLIENTS} signups complete, {} absent, {unavailable} \
         UNAVAILABLE answers, {logged_in} logins, audit chain of {} rows verified",
        CLIENTS as i64 - complete,
        verified.checked
    );
}

/// What one caller of the replica test got.
#[derive(Debug, Default)]
struct ReplicaLog {
    /// Session tokens handed out, with the replica that did.
    tokens: Vec<(usize, String)>,
    /// Calls to replica B that failed.
    b_failures: Vec<String>,
    /// Logins sent to A that failed after it was killed (they may or may not have landed).
    a_login_failures: usize,
}

/// Two `tenantry-api serve` replicas on one PostgreSQL, under a steady stream of logins
/// and calls; replica A is killed with SIGKILL in the middle. Replica B answers every
/// call throughout; every session either replica handed out still works on B; no
/// session or audit row is lost or duplicated, and the audit chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_flight_loses_no_session_or_audit_row() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let keys = keygen(pg.dir.path());
    let mut a = Replica::serve(&pg, &keys, "replica-a").await;
    let b = Replica::serve(&pg, &keys, "replica-b").await;
    let channels = [a.channel().await, b.channel().await];
    let admin = admin_session(&pg, &keys, &channels[1]).await;

    const USERS: usize = 20;
    for i in 0..USERS {
        AccountServiceClient::new(channels[i % 2].clone())
            .signup(signup_request(
                &format!("replica-{i}@example.com"),
                &format!("replica-{i}"),
            ))
            .await
            .unwrap();
    }

    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let log = Arc::new(Mutex::new(ReplicaLog::default()));
    let mut tasks = Vec::new();
    for i in 0..USERS {
        let channels = channels.clone();
        let log = Arc::clone(&log);
        let killed = Arc::clone(&killed);
        tasks.push(tokio::spawn(async move {
            let email = format!("replica-{i}@example.com");
            let mut round = 0usize;
            while start.elapsed() < Duration::from_secs(6) {
                let which = (i + round) % 2;
                round += 1;
                let mut accounts = AccountServiceClient::new(channels[which].clone());
                let was_killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                match accounts.login(login_request(&email)).await {
                    Ok(r) => {
                        let token = r.into_inner().session_token;
                        let who = accounts.who_am_i(authed(WhoAmIRequest {}, &token)).await;
                        let mut log = log.lock().await;
                        if which == 1
                            && let Err(s) = &who
                        {
                            log.b_failures.push(format!("WhoAmI: {s:?}"));
                        }
                        log.tokens.push((which, token));
                    }
                    Err(s) if which == 1 => {
                        log.lock().await.b_failures.push(format!("Login: {s:?}"))
                    }
                    Err(s) => {
                        assert!(
                            was_killed || killed.load(std::sync::atomic::Ordering::SeqCst),
                            "replica A failed before it was killed: {s:?}"
                        );
                        log.lock().await.a_login_failures += 1;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = a.child.id().unwrap();
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    a.child.wait().await.unwrap();
    eprintln!("replica A killed at {:.1?}", start.elapsed());
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().await;
    assert!(
        log.b_failures.is_empty(),
        "replica B failed: {:#?}",
        log.b_failures
    );
    let by_a = log.tokens.iter().filter(|(w, _)| *w == 0).count();
    let by_b = log.tokens.len() - by_a;
    assert!(
        by_a > 0 && by_b > 0 && log.a_login_failures > 0,
        "{by_a} {by_b} {}",
        log.a_login_failures
    );

    // No session lost: every token either replica handed out works on B.
    let mut accounts = AccountServiceClient::new(channels[1].clone());
    for (_, token) in &log.tokens {
        accounts
            .who_am_i(authed(WhoAmIRequest {}, token))
            .await
            .unwrap_or_else(|s| panic!("a session was lost: {s:?}"));
    }
    // None duplicated, and each has exactly one audit row: the stored sessions are the
    // tokens clients received plus at most the logins cut off by the kill.
    let hashes: HashSet<String> = log
        .tokens
        .iter()
        .map(|(_, t)| tenantry_api::crypto::hash_secret(t))
        .collect();
    assert_eq!(
        hashes.len(),
        log.tokens.len(),
        "a token was handed out twice"
    );
    let stored = pg.count(
        "SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE u.email LIKE 'replica-%'",
    );
    let audited = pg.count(
        "SELECT count(*) FROM audit_events a JOIN users u ON u.id = a.actor_user_id \
         WHERE a.action = 'login.succeeded' AND u.email LIKE 'replica-%'",
    );
    let received = log.tokens.len() as i64;
    assert!(
        (received..=received + log.a_login_failures as i64).contains(&stored),
        "{stored} sessions stored, {received} handed out, {} cut off",
        log.a_login_failures
    );
    assert_eq!(
        audited, stored,
        "every session has exactly one login audit row"
    );
    let span = pg.rows("SELECT count(*), min(sequence), max(sequence) FROM audit_events");
    let (n, lo, hi): (i64, i64, i64) = (
        span[0][0].parse().unwrap(),
        span[0][1].parse().unwrap(),
        span[0][2].parse().unwrap(),
    );
    assert_eq!(
        n,
        hi - lo + 1,
        "the audit sequence has a gap or a duplicate"
    );
    let verified = verify_audit_log(&channels[1], &admin).await;
    assert!(
        verified.ok,
        "audit chain broken at {}",
        verified.first_bad_sequence
    );
    eprintln!(
        "SIGKILL survived: {by_a} sessions from A and {by_b} from B all valid on B, {} logins \
         to A cut off, {stored} sessions and {audited} login audit rows, chain of {} rows verified",
        log.a_login_failures, verified.checked
    );
}

/// Sends and receives raw bytes as a gRPC message, for malformed and oversized requests.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(channel: &Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("a malformed message must be refused")
}

/// A protobuf string field.
fn field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = value.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
    out
}

/// A scripted attack on a real `tenantry-api dev` and its `tenant-runtime`s, every program
/// logging at TRACE: wrong passwords up to a lockout, forged, tampered, expired and
/// cross-tenant tokens, malformed and oversized protobuf, malformed and oversized JSON,
/// other tenants' ids. Every attempt is refused as documented, and no log line holds a
/// password, session or instance token, key, credential secret or execution payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attack_at_trace_level_leaves_no_secret_in_any_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("dev");
    let api_log = tmp.path().join("api.log");
    let port = free_port();
    // A signing key file for dev to import into its key ring (a fresh dev makes its key in
    // the database), so that the test knows the key and can look for it in the logs.
    {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data_dir)
            .unwrap();
        let key = tenantry_proto::token::TokenSigner::generate().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(data_dir.join("token-signing.key"))
            .unwrap()
            .write_all(secrecy::ExposeSecret::expose_secret(&key.to_pkcs8_pem()).as_bytes())
            .unwrap();
    }
    let mut dev = tokio::process::Command::new(bin("tenantry-api"))
        .args(["dev", "--no-portal", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .env("TENANTRY_LOG", "trace")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::from(std::fs::File::create(&api_log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&api_log)
                .unwrap(),
        ))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let channel = connect(port, || {
        std::fs::read_to_string(&api_log).unwrap_or_default()
    })
    .await;
    let mut secrets: Vec<(String, String)> = vec![("password".into(), PASSWORD.into())];

    let (ann, ann_token) =
        tenantry_tests::signup_and_login(&channel, "ann@example.com", "ann-co").await;
    let (ben, ben_token) =
        tenantry_tests::signup_and_login(&channel, "ben@example.com", "ben-co").await;
    secrets.push(("session token".into(), ann_token.clone()));
    secrets.push(("session token".into(), ben_token.clone()));
    // The instances start once the owners verify their addresses; the tokens of the
    // links are secrets too.
    let outbox = data_dir.join("outbox");
    for (token, email) in [
        (&ann_token, "ann@example.com"),
        (&ben_token, "ben@example.com"),
    ] {
        let verification =
            tenantry_tests::verify_from_outbox(&channel, token, &outbox, email).await;
        secrets.push(("email verification token".into(), verification));
    }
    let mut accounts = AccountServiceClient::new(channel.clone());

    // Wrong passwords, up to the lockout.
    for i in 0..6 {
        let wrong = format!("Wrong-Guess-{i}-q8Zt3");
        secrets.push(("wrong password".into(), wrong.clone()));
        let s = accounts
            .login(LoginRequest {
                email: "ben@example.com".into(),
                password: wrong,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(s.code(), Code::Unauthenticated | Code::ResourceExhausted),
            "{s:?}"
        );
    }
    // Forged session tokens.
    for forged in ["forged-session-Zq81kPm3", &format!("{ann_token}x")] {
        secrets.push(("forged session".into(), forged.to_owned()));
        let s = accounts
            .who_am_i(authed(WhoAmIRequest {}, forged))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    // Malformed and oversized protobuf.
    let marker = b"PROTO-PAYLOAD-Vx93";
    secrets.push((
        "protobuf payload".into(),
        String::from_utf8_lossy(marker).into(),
    ));
    let mut truncated = field(1, b"ann@example.com");
    truncated.extend(field(2, marker));
    truncated.extend([0x1a, 0xff, 0xff]);
    let mut not_utf8 = field(1, b"ann@example.com");
    let mut bad = marker.to_vec();
    bad.push(0xff);
    not_utf8.extend(field(2, &bad));
    for body in [truncated, not_utf8, marker.repeat(300_000)] {
        let s = raw_call(&channel, "/tenantry.v1.AccountService/Login", body).await;
        assert!(
            matches!(
                s.code(),
                Code::Internal | Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
            ),
            "{s:?}"
        );
        assert!(!s.message().contains("PROTO-PAYLOAD"), "{s:?}");
    }
    // Other tenants' ids answer NOT_FOUND.
    let mut tenants =
        tenantry_proto::v1::tenant_service_client::TenantServiceClient::new(channel.clone());
    let s = tenants
        .get_tenant(authed(
            GetTenantRequest {
                tenant_id: ben.tenant_id.clone(),
            },
            &ann_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = tenants
        .issue_instance_token(authed(
            IssueInstanceTokenRequest {
                tenant_id: ben.tenant_id.clone(),
            },
            &ann_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    // The runtimes.
    let ann_tenant = tenantry_tests::wait_for_phase(
        &channel,
        &ann_token,
        &ann.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    tenantry_tests::wait_for_phase(
        &channel,
        &ben_token,
        &ben.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let endpoint = ann_tenant.endpoint.as_str();
    let https = tenantry_test_support::Https::new(
        &std::fs::read_to_string(data_dir.join("ca.crt")).unwrap(),
    );
    let issue = async |tenant_id: &str, session: &str| {
        tenants
            .clone()
            .issue_instance_token(authed(
                IssueInstanceTokenRequest {
                    tenant_id: tenant_id.into(),
                },
                session,
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    };
    let ann_instance = issue(&ann.tenant_id, &ann_token).await;
    let ben_instance = issue(&ben.tenant_id, &ben_token).await;
    let signing_pem = std::fs::read_to_string(data_dir.join("token-signing.key")).unwrap();
    let signer =
        tenantry_proto::token::TokenSigner::from_pkcs8_pem(&signing_pem.clone().into()).unwrap();
    let now = jiff::Timestamp::now().as_second();
    let expired = signer
        .sign(&tenantry_proto::token::InstanceClaims {
            iss: "tenantry".into(),
            sub: ann.user_id.clone(),
            aud: ann.tenant_id.clone(),
            iat: now - 1000,
            exp: now - 400,
            jti: "expired-jti".into(),
        })
        .unwrap();
    let mut tampered = ann_instance.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let forged = tenantry_proto::token::TokenSigner::generate()
        .unwrap()
        .issue(
            &ann.tenant_id,
            &ann.user_id,
            jiff::Timestamp::now(),
            Duration::from_secs(300),
        )
        .unwrap()
        .0;
    for (what, t) in [
        ("instance token", &ann_instance),
        ("instance token", &ben_instance),
        ("expired token", &expired),
        ("tampered token", &tampered),
        ("forged token", &forged),
    ] {
        secrets.push((what.into(), t.clone()));
        let signature = t.rsplit('.').next().unwrap().to_owned();
        secrets.push((format!("{what} signature"), signature));
    }
    for line in signing_pem.lines().filter(|l| !l.starts_with("-----")) {
        secrets.push(("token signing key".into(), line.to_owned()));
    }
    let master = std::fs::read_to_string(data_dir.join("master.key")).unwrap();
    secrets.push(("master key".into(), master.trim().to_owned()));

    let secret_marker = "SECRET-MARKER-c0ffee-77";
    let payload_marker = "PAYLOAD-MARKER-beef-42";
    secrets.push(("credential secret".into(), secret_marker.into()));
    secrets.push(("execution payload".into(), payload_marker.into()));
    let post = async |path: &str, token: Option<&str>, body: &serde_json::Value| {
        https
            .request(endpoint, "localhost", "POST", path, token, Some(body))
            .await
            .unwrap()
    };
    let credential =
        serde_json::json!({"name": "crm", "kind": "api_key", "secret": {"key": secret_marker}});
    let execution = serde_json::json!({
        "workflow_id": "wf", "status": "success", "started_at": "2026-01-01T00:00:00Z",
        "data": {"customer": payload_marker},
    });
    assert_eq!(
        post("/v1/credentials", Some(&ann_instance), &credential)
            .await
            .status,
        201
    );
    assert_eq!(
        post("/v1/executions", Some(&ann_instance), &execution)
            .await
            .status,
        201
    );
    for token in [
        None,
        Some(&ben_instance),
        Some(&expired),
        Some(&tampered),
        Some(&forged),
    ] {
        let r = post("/v1/credentials", token.map(String::as_str), &credential).await;
        assert_eq!(r.status, 401, "{}", r.text);
    }
    let malformed = serde_json::json!({"name": "crm", "kind": "api_key", "secret": secret_marker});
    let r = post("/v1/credentials", Some(&ann_instance), &malformed).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(!r.text.contains(secret_marker), "{}", r.text);
    let mut conn = https.connect(endpoint, "localhost").await.unwrap();
    let huge = format!("{{\"name\":\"{}\"}}", secret_marker.repeat(100_000));
    // The runtime answers 413 from Content-Length and closes without reading the body
    // (`tenant-runtime/tests/runtime/api.rs` checks the answer): a client still writing the
    // body may see the answer or only the closed connection.
    match conn
        .send(
            "POST",
            "/v1/credentials",
            Some(&ann_instance),
            Some("application/json"),
            huge.into_bytes(),
        )
        .await
    {
        Ok(r) => assert_eq!(r.status, 413, "{}", r.text),
        Err(e) => {
            let text = format!("{e:?}");
            assert!(
                text.contains("BrokenPipe") || text.contains("ConnectionReset"),
                "{text}"
            );
        }
    }

    // Give the programs a moment to write their last lines, then read every log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = accounts.logout(authed(LogoutRequest {}, &ann_token)).await;
    dev.start_kill().unwrap();
    let _ = dev.wait().await;
    let mut logs = vec![api_log.clone()];
    for entry in std::fs::read_dir(data_dir.join("tenants")).unwrap() {
        let log = entry.unwrap().path().join("runtime.log");
        if log.is_file() {
            logs.push(log);
        }
    }
    assert_eq!(
        logs.len(),
        3,
        "the API's log and two runtimes' logs: {logs:?}"
    );
    let mut lines = 0;
    let mut leaks = Vec::new();
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            text.contains("TRACE"),
            "{} has no TRACE line",
            log.display()
        );
        for line in text.lines() {
            lines += 1;
            for (what, secret) in &secrets {
                if line.contains(secret.as_str()) {
                    leaks.push(format!(
                        "{what} in {}: {}",
                        log.display(),
                        line.chars().take(300).collect::<String>()
                    ));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets in logs: {leaks:#?}");
    // The scan reads what the programs logged about these requests (ids are not secret).
    let all: String = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap())
        .collect();
    assert!(all.contains(&ann.tenant_id) && all.contains(&ben.tenant_id));
    eprintln!(
        "attack run: {lines} log lines at TRACE across {} programs, {} secrets checked, none found",
        logs.len(),
        secrets.len()
    );
}
