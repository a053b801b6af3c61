//! Two real `tenantry-api serve` replicas on one PostgreSQL database (a fresh database per
//! test, on the server `TENANTRY_TEST_DATABASE_URL` names; skipped without it): every
//! revoking action taken on replica A is refused on replica B within a second, although B
//! answers authenticated calls from its session cache; and a killed `LISTEN` connection is
//! detected, the cache stops serving (calls go to the database) and is emptied when the
//! listener is back.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::{PASSWORD, free_port};
use tenantry_tests::{authed, bin, connect, login, run_with_stdin, signup_and_login, totp_now};
use tonic::Code;
use tonic::transport::Channel;

/// The promise under test.
const WITHIN: Duration = Duration::from_secs(1);

/// A database of its own on the test server, dropped at the end.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Option<Database> {
        let base = std::env::var("TENANTRY_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        let name = format!("t_{}", uuid_like());
        psql(&base, &format!("CREATE DATABASE {name}"));
        // postgres://user@host:port/db?params → same server, the new database.
        let (head, _) = base.rsplit_once('/').unwrap();
        Some(Database {
            url: format!("{head}/{name}"),
            admin_url: base,
            name,
        })
    }

    fn query(&self, sql: &str) -> String {
        psql(&self.admin_url, sql)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Best effort; WITH (FORCE) ends the replicas' connections should any remain.
        let _ = std::process::Command::new("psql")
            .args([
                self.admin_url.as_str(),
                "-qAt",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

struct Replica {
    _child: tokio::process::Child,
    log: std::path::PathBuf,
    channel: Channel,
}

impl Replica {
    async fn start(db: &Database, keys: &Path, name: &str) -> Replica {
        let port = free_port();
        let log = keys.join(format!("{name}.log"));
        let child = tokio::process::Command::new(bin("tenantry-api"))
            .args(["serve", "--database-url", &db.url])
            .arg("--master-key-file")
            .arg(keys.join("master.key"))
            .arg("--token-signing-key-file")
            .arg(keys.join("token-signing.key"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
            .args(["--rate-limit-per-second", "0"])
            .args(["--session-idle-timeout", "10s"])
            // Mail (its outbox and DKIM key) stays beside the keys; the replicas' signups
            // are about sessions, not the owner's address.
            .arg("--data-dir")
            .arg(keys)
            .arg("--require-email-verification=false")
            .env("TENANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log_path = log.clone();
        let channel = connect(port, move || {
            std::fs::read_to_string(&log_path).unwrap_or_default()
        })
        .await;
        let replica = Replica {
            _child: child,
            log,
            channel,
        };
        // Serving from the cache only once its listener is up.
        replica
            .wait_for_log("revocation listener connected", 1)
            .await;
        replica
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` appears at least `count` times in the log.
    async fn wait_for_log(&self, needle: &str, count: usize) -> Duration {
        let start = Instant::now();
        loop {
            if self.log().matches(needle).count() >= count {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "`{needle}` not logged; log: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn who_am_i(&self, token: &str) -> Result<WhoAmIResponse, Code> {
        AccountServiceClient::new(self.channel.clone())
            .who_am_i(authed(WhoAmIRequest {}, token))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.code())
    }

    /// Polls WhoAmI until it is refused; returns how long that took.
    async fn refused_within(&self, token: &str, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            match self.who_am_i(token).await {
                Err(Code::Unauthenticated) => return start.elapsed(),
                Err(other) => panic!("{what}: WhoAmI answered {other:?}"),
                Ok(_) => {}
            }
            let took = start.elapsed();
            assert!(
                took < WITHIN,
                "{what}: replica B still accepts the session after {took:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A user whose session replica B has cached (used several times there).
async fn cached_user(a: &Replica, b: &Replica, email: &str) -> (String, String) {
    let (ids, _) = signup_and_login(&a.channel, email, &email.replace(['@', '.'], "-")).await;
    let token = login(&a.channel, email).await;
    for _ in 0..3 {
        b.who_am_i(&token).await.unwrap();
    }
    (ids.user_id, token)
}

fn keys(dir: &Path) {
    let out = std::process::Command::new(bin("tenantry-api"))
        .args(["keygen", "--out-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An admin with a confirmed TOTP (which verifies the session's second factor).
async fn admin(db: &Database, keys_dir: &Path, a: &Replica) -> String {
    let boot = run_with_stdin(
        std::process::Command::new(bin("tenantry-api"))
            .args(["bootstrap-admin", "--email", "ops@example.com"])
            .args(["--database-url", &db.url])
            .arg("--master-key-file")
            .arg(keys_dir.join("master.key"))
            .arg("--token-signing-key-file")
            .arg(keys_dir.join("token-signing.key"))
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"]),
        &format!("{PASSWORD}\n"),
    );
    assert!(
        boot.status.success(),
        "{}",
        String::from_utf8_lossy(&boot.stderr)
    );
    let token = login(&a.channel, "ops@example.com").await;
    enroll_totp(a, &token).await;
    token
}

/// Enrolls TOTP for the session's user (which also verifies the session's second factor).
async fn enroll_totp(a: &Replica, token: &str) {
    let enroll = MfaServiceClient::new(a.channel.clone())
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, token))
        .await
        .unwrap()
        .into_inner();
    MfaServiceClient::new(a.channel.clone())
        .confirm_totp_enrollment(authed(
            ConfirmTotpEnrollmentRequest {
                code: totp_now(&enroll.secret),
            },
            token,
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_is_refused_on_the_other_within_a_second() {
    let Some(db) = Database::create().await else {
        eprintln!("skipped: set TENANTRY_TEST_DATABASE_URL to a PostgreSQL server");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    keys(dir.path());
    let a = Replica::start(&db, dir.path(), "a").await;
    let b = Replica::start(&db, dir.path(), "b").await;
    let ops = admin(&db, dir.path(), &a).await;
    let mut admin_api = AdminServiceClient::new(a.channel.clone());

    // Logout.
    let (_, token) = cached_user(&a, &b, "logout@example.com").await;
    AccountServiceClient::new(a.channel.clone())
        .logout(authed(LogoutRequest {}, &token))
        .await
        .unwrap();
    let took = b.refused_within(&token, "logout").await;
    eprintln!("logout on A refused on B after {took:?}");

    // Password change ends every session of the user.
    let (_, token) = cached_user(&a, &b, "password@example.com").await;
    let other = login(&a.channel, "password@example.com").await;
    b.who_am_i(&other).await.unwrap();
    AccountServiceClient::new(a.channel.clone())
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "amber-Quarry-47-window".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    let took = b.refused_within(&other, "password change").await;
    eprintln!("password change on A refused on B after {took:?}");

    // Role change: a grant ends the user's sessions (they sign in again to use it), and so
    // does its revocation.
    let (user, token) = cached_user(&a, &b, "role@example.com").await;
    // A role needs a second factor; B sees the enrollment too.
    enroll_totp(&a, &token).await;
    let start = Instant::now();
    while !b.who_am_i(&token).await.unwrap().mfa_enrolled {
        assert!(start.elapsed() < WITHIN, "B missed the TOTP enrollment");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    admin_api
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: user.clone(),
                role: AdminRole::Auditor.into(),
                expires_in_days: 1,
            },
            &ops,
        ))
        .await
        .unwrap();
    let took = b.refused_within(&token, "role grant").await;
    eprintln!("role grant on A refused on B after {took:?}");
    let token = login(&a.channel, "role@example.com").await;
    let roles = b.who_am_i(&token).await.unwrap().roles;
    assert!(
        roles.iter().any(|r| r == "auditor"),
        "B sees the new role: {roles:?}"
    );
    admin_api
        .revoke_admin(authed(
            RevokeAdminRequest {
                user_id: user.clone(),
                role: AdminRole::Auditor.into(),
            },
            &ops,
        ))
        .await
        .unwrap();
    let took = b.refused_within(&token, "role revocation").await;
    eprintln!("role revocation on A refused on B after {took:?}");

    // Admin revocation of every session.
    let (user, token) = cached_user(&a, &b, "revoked@example.com").await;
    admin_api
        .revoke_sessions(authed(RevokeSessionsRequest { user_id: user }, &ops))
        .await
        .unwrap();
    let took = b.refused_within(&token, "admin revocation").await;
    eprintln!("admin revocation on A refused on B after {took:?}");

    // Deactivation.
    let (user, token) = cached_user(&a, &b, "gone@example.com").await;
    admin_api
        .deactivate_user(authed(
            DeactivateUserRequest {
                user_id: user,
                reason: "left".into(),
            },
            &ops,
        ))
        .await
        .unwrap();
    let took = b.refused_within(&token, "deactivation").await;
    eprintln!("deactivation on A refused on B after {took:?}");

    // Expiry: the session's absolute expiry moves to now (as if it had run out); B holds
    // the old expiry in its cache and must still refuse.
    let (_, token) = cached_user(&a, &b, "expiry@example.com").await;
    db_exec(
        &db,
        "UPDATE sessions SET expires_at_ms = CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) \
         WHERE user_id = (SELECT id FROM users WHERE email = 'expiry@example.com')",
    );
    let took = b.refused_within(&token, "expiry").await;
    eprintln!("expiry refused on B after {took:?}");

    // Idle-timeout bookkeeping: a use on B reaches the database in B's next batch (the
    // touch granularity is a tenth of the 10 s idle timeout these replicas run with).
    let (_, token) = cached_user(&a, &b, "idle@example.com").await;
    let hash = tenantry_api::crypto::hash_secret(&token);
    let last_seen = || -> i64 {
        db_exec(
            &db,
            &format!("SELECT last_seen_ms FROM sessions WHERE token_hash = '{hash}'"),
        )
        .parse()
        .unwrap()
    };
    let before = last_seen();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    b.who_am_i(&token).await.unwrap();
    let start = Instant::now();
    while last_seen() <= before {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "B's use was not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Unused for the idle timeout, the session is refused on both replicas.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(b.who_am_i(&token).await.unwrap_err(), Code::Unauthenticated);
    assert_eq!(a.who_am_i(&token).await.unwrap_err(), Code::Unauthenticated);
}

fn db_exec(db: &Database, sql: &str) -> String {
    psql(&db.url, sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_is_detected_and_calls_fall_back_to_the_database() {
    let Some(db) = Database::create().await else {
        eprintln!("skipped: set TENANTRY_TEST_DATABASE_URL to a PostgreSQL server");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    keys(dir.path());
    let a = Replica::start(&db, dir.path(), "a").await;
    let b = Replica::start(&db, dir.path(), "b").await;
    let (_, token) = cached_user(&a, &b, "kept@example.com").await;

    // Kill B's LISTEN connection (the two replicas' listeners: B's is the newer one).
    let listeners = db.query(&format!(
        "SELECT pid FROM pg_stat_activity WHERE datname = '{}' AND application_name = '{}' \
         ORDER BY backend_start",
        db.name,
        tenantry_api::store::LISTENER_APPLICATION_NAME
    ));
    let pids: Vec<&str> = listeners.lines().collect();
    assert_eq!(pids.len(), 2, "one listener per replica: {listeners}");
    let killed = Instant::now();
    db.query(&format!("SELECT pg_terminate_backend({})", pids[1]));
    let detected = b.wait_for_log("revocation listener lost", 1).await;
    assert!(
        detected < WITHIN,
        "the lost listener was noticed after {detected:?}"
    );
    eprintln!("lost listener detected after {detected:?}");
    // It reconnects, empties the cache (the resync) and serves from it again.
    b.wait_for_log("revocation listener connected", 2).await;
    eprintln!("listener back after {:?}", killed.elapsed());
    assert!(
        !a.log().contains("revocation listener lost"),
        "A's listener is untouched"
    );
    b.who_am_i(&token).await.unwrap();

    // While B's listener keeps being killed, a logout on A is still refused on B in time:
    // B reads sessions from the database whenever it cannot trust its listener.
    let (_, token) = cached_user(&a, &b, "flaky@example.com").await;
    let killer = {
        let url = db.admin_url.clone();
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = '{}' AND pid <> {}",
            db.name,
            tenantry_api::store::LISTENER_APPLICATION_NAME,
            pids[0]
        );
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_millis(1_500);
            while Instant::now() < until {
                let _ = std::process::Command::new("psql")
                    .args([url.as_str(), "-qAt", "-c", &sql])
                    .output();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    AccountServiceClient::new(a.channel.clone())
        .logout(authed(LogoutRequest {}, &token))
        .await
        .unwrap();
    let took = b
        .refused_within(&token, "logout while B's listener is down")
        .await;
    eprintln!("logout while B's listener is down refused on B after {took:?}");
    killer.join().unwrap();
    // Back to normal: B's listener reconnects and revocations arrive by notification.
    let lost = b.log().matches("revocation listener lost").count();
    b.wait_for_log("revocation listener connected", lost + 1)
        .await;
    let (_, token) = cached_user(&a, &b, "after@example.com").await;
    AccountServiceClient::new(a.channel.clone())
        .logout(authed(LogoutRequest {}, &token))
        .await
        .unwrap();
    let took = b.refused_within(&token, "logout after reconnect").await;
    eprintln!("logout after the reconnect refused on B after {took:?}");
}
