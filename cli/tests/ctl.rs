//! `tenantryctl` end to end: the real binary against the real API server on a loopback
//! port. The server runs on a manual clock, so every TOTP code is computed here from the
//! server's clock and handed to the CLI with `--totp-code` (or on stdin for enrollment).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The API's own test harness (server on a manual clock, SQLite or PostgreSQL), shared
// rather than copied: this test lives here only because `CARGO_BIN_EXE_tenantryctl`
// exists only for the tests of the package that builds the binary. It uses only part of
// the harness.
#[path = "../../api/tests/api/common.rs"]
#[allow(dead_code)]
mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tenantry_proto::v1::*;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tonic::Code;

/// What one run of the CLI did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "tenantryctl failed: {self:?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The one error line; asserts exit code 1.
    fn error_line(&self) -> String {
        assert_eq!(self.code, 1, "expected exit 1: {self:?}");
        let last = self.stderr.lines().last().unwrap_or_default().to_owned();
        assert!(last.starts_with("error: "), "{self:?}");
        last
    }
}

/// A CLI user: own home directory and session file, talking to one server.
struct Ctl {
    server: String,
    home: tempfile::TempDir,
}

impl Ctl {
    fn new(s: &TestServer) -> Ctl {
        Ctl::for_server(format!("http://{}", s.addr))
    }

    fn for_server(server: String) -> Ctl {
        Ctl {
            server,
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn session_file(&self) -> PathBuf {
        self.home.path().join("config/tenantry/session")
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantryctl"));
        // Nothing from the developer's environment (TENANTRY_*, real config) leaks in; the
        // session file is found through XDG_CONFIG_HOME like on a real machine.
        cmd.env_clear()
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("TENANTRY_SERVER", &self.server)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `tenantryctl args...` with `stdin` as its input.
    async fn run(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self.command(args).spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        // The CLI may exit before reading its input (an early error): a broken pipe is fine.
        if let Err(e) = input.write_all(stdin.as_bytes()).await {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("tenantryctl hung")
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    /// Logs in with [`PASSWORD`] from stdin, and a TOTP code when given.
    async fn login(&self, email: &str, totp: Option<&str>) -> Run {
        let mut args = vec!["login", "--email", email, "--password-stdin"];
        if let Some(code) = totp {
            args.extend(["--totp-code", code]);
        }
        self.run(&args, &format!("{PASSWORD}\n")).await
    }

    fn saved_token(&self) -> String {
        let text = std::fs::read_to_string(self.session_file()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }
}

/// Logs the bootstrap admin in through the CLI, second factor included. Returns
/// (user id, TOTP secret).
async fn admin_login(s: &TestServer, ctl: &Ctl) -> (String, String) {
    let (id, _, secret) = s.admin_session("root@example.com").await;
    // Enrollment used this step's code; each code is accepted once.
    s.advance(Duration::from_secs(30));
    ctl.login("root@example.com", Some(&s.totp_now(&secret)))
        .await
        .ok();
    (id, secret)
}

#[tokio::test]
async fn login_whoami_tenant_and_logout_for_a_member() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (user_id, tenant_id) = s.signup("ann@example.com", "annco").await;
    let ctl = Ctl::new(&s);

    let run = ctl.login("ann@example.com", None).await.ok();
    assert!(run.stdout.contains("logged in to"), "{run:?}");
    assert!(run.stdout.contains("ann@example.com"), "{run:?}");

    // The token is kept only where the user alone can read it, and never printed.
    let file = ctl.session_file();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "session file mode {mode:o}");
    let dir_mode = std::fs::metadata(file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "session dir mode {dir_mode:o}");
    let token = ctl.saved_token();
    assert!(!run.stdout.contains(&token) && !run.stderr.contains(&token));
    assert!(!run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD));

    let run = ctl.run(&["whoami"], "").await.ok();
    assert!(run.stdout.contains("EMAIL"), "{run:?}");
    assert!(run.stdout.contains("ann@example.com"), "{run:?}");
    assert!(run.stdout.contains(&user_id), "{run:?}");
    assert!(!run.stdout.contains(&token));
    // RFC 3339 times from the server's clock (2026-01-01).
    assert!(run.stdout.contains("2026-01-01T"), "{run:?}");

    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert_eq!(me["email"], "ann@example.com");
    assert_eq!(me["user_id"], user_id.as_str());
    assert_eq!(me["tenant_ids"][0], tenant_id.as_str());
    assert_eq!(me["mfa_enrolled"], false);
    assert_eq!(me["mfa_verified_at"], Value::Null);
    assert!(
        me["session_expires_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );

    // Tenant member views.
    let run = ctl.run(&["tenants", "get", &tenant_id], "").await.ok();
    assert!(run.stdout.contains("annco"), "{run:?}");
    let t = ctl
        .run(&["tenants", "get", &tenant_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(t["tenant_id"], tenant_id.as_str());
    assert_eq!(t["plan"], "free");

    // The owner sets retention within the plan's cap; beyond it is one clear line.
    let run = ctl
        .run(
            &[
                "retention",
                "set",
                &tenant_id,
                "--max-age-hours",
                "48",
                "--max-count",
                "500",
            ],
            "",
        )
        .await
        .ok();
    assert!(run.stdout.contains("48"), "{run:?}");
    let r = ctl
        .run(&["retention", "get", &tenant_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(r["policy"]["max_age_hours"], 48);
    assert_eq!(r["policy"]["max_count"], 500);
    let run = ctl
        .run(
            &[
                "retention",
                "set",
                &tenant_id,
                "--max-age-hours",
                "700",
                "--max-count",
                "500",
            ],
            "",
        )
        .await;
    let line = run.error_line();
    assert!(line.contains("max_age_hours"), "{line}");

    // Admin commands: refused with a clear line, no TOTP prompt.
    let run = ctl.run(&["tenants", "list"], "").await;
    assert_eq!(
        run.error_line(),
        "error: permission denied: this command needs the admin role"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");

    // A session for one server is never sent to another.
    let run = ctl
        .run(&["whoami", "--server", "http://127.0.0.1:9"], "")
        .await;
    assert!(
        run.error_line().contains("the saved session is for"),
        "{run:?}"
    );

    // Logout ends the session on the server and deletes the file.
    ctl.run(&["logout"], "").await.ok();
    assert!(!file.exists());
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await,
        Code::Unauthenticated,
    );
    let run = ctl.run(&["whoami"], "").await;
    assert_eq!(
        run.error_line(),
        "error: not logged in; run `tenantryctl login`"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_wrong_password_is_one_line_and_exit_1() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("bob@example.com", "bobco").await;
    let ctl = Ctl::new(&s);

    let run = ctl
        .run(
            &["login", "--email", "bob@example.com", "--password-stdin"],
            "not-the-password-at-all\n",
        )
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr, "error: invalid email or password\n");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(!ctl.session_file().exists());

    // Usage errors are clap's: exit 2.
    let run = ctl.run(&["login", "--password-stdin"], "x\n").await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = ctl.run(&["tenants", "frobnicate"], "").await;
    assert_eq!(run.code, 2, "{run:?}");

    // An unreachable server is one line too.
    let run = ctl
        .run(
            &[
                "login",
                "--server",
                "http://127.0.0.1:9",
                "--email",
                "bob@example.com",
                "--password-stdin",
            ],
            &format!("{PASSWORD}\n"),
        )
        .await;
    assert!(
        run.error_line()
            .starts_with("error: cannot connect to http://127.0.0.1:9"),
        "{run:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn login_with_totp_verifies_the_second_factor() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("cy@example.com", "cyco").await;
    let token = s.login("cy@example.com").await;
    let (secret, recovery) = s.enroll(&token).await;
    s.advance(Duration::from_secs(30));
    let ctl = Ctl::new(&s);

    // A wrong code: no session is kept.
    let run = ctl.login("cy@example.com", Some("000000")).await;
    let line = run.error_line();
    assert_eq!(line, "error: invalid or already used code");
    assert!(!ctl.session_file().exists());

    // Without a code and nothing on stdin: a clear line, not a hang.
    let run = ctl.login("cy@example.com", None).await;
    assert!(run.error_line().contains("--totp-code"), "{run:?}");

    s.advance(Duration::from_secs(30));
    let code = s.totp_now(&secret);
    ctl.login("cy@example.com", Some(&code)).await.ok();
    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert_eq!(me["mfa_enrolled"], true);
    assert!(
        me["mfa_verified_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T"),
        "{me}"
    );

    // A recovery code works in place of a TOTP code.
    let run = ctl
        .run(
            &[
                "login",
                "--email",
                "cy@example.com",
                "--password-stdin",
                "--recovery-code",
                &recovery[0],
            ],
            &format!("{PASSWORD}\n"),
        )
        .await
        .ok();
    assert!(!run.stdout.contains(&recovery[0]));
    s.stop().await;
}

#[tokio::test]
async fn mfa_enroll_shows_the_uri_and_qr_and_prints_recovery_codes_once() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("dee@example.com", "deeco").await;
    let ctl = Ctl::new(&s);
    ctl.login("dee@example.com", None).await.ok();

    let mut child = ctl.command(&["mfa", "enroll"]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let uri = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).await.unwrap() > 0,
                "no URI: {seen}"
            );
            seen.push_str(&line);
            if let Some(uri) = line.trim().strip_prefix("otpauth URI:") {
                return uri.trim().to_owned();
            }
        }
    })
    .await
    .expect("no otpauth URI");
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    // A terminal QR code in unicode half blocks came first.
    assert!(
        seen.contains('\u{2588}') || seen.contains('\u{2580}'),
        "{seen}"
    );
    let secret = uri
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap()
        .to_owned();
    stdin
        .write_all(format!("{}\n", s.totp_now(&secret)).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{seen}{rest}");
    let after = rest
        .split_once("Recovery codes")
        .unwrap_or_else(|| panic!("no recovery codes: {rest}"))
        .1;
    let codes: Vec<&str> = after.lines().skip(1).map(str::trim).collect();
    assert_eq!(codes.len(), 10, "{rest}");
    assert!(codes.iter().all(|c| !c.is_empty()));

    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert_eq!(me["mfa_enrolled"], true);

    // One of the printed recovery codes logs in as a second factor.
    ctl.run(
        &[
            "login",
            "--email",
            "dee@example.com",
            "--password-stdin",
            "--recovery-code",
            codes[3],
        ],
        &format!("{PASSWORD}\n"),
    )
    .await
    .ok();
    s.stop().await;
}

#[tokio::test]
async fn admins_manage_tenants_retention_audit_roles_and_sessions() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        s.advance(Duration::from_millis(5));
        ids.push(
            s.signup(&format!("{name}@example.com"), &format!("tenant-{name}"))
                .await,
        );
    }
    let ctl = Ctl::new(&s);
    admin_login(&s, &ctl).await;

    // Pages are followed: three tenants with two per page.
    let run = ctl
        .run(&["tenants", "list", "--page-size", "2"], "")
        .await
        .ok();
    let header = run.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("PHASE"),
        "{run:?}"
    );
    for name in ["tenant-one", "tenant-two", "tenant-three"] {
        assert!(run.stdout.contains(name), "{run:?}");
    }
    let list = ctl
        .run(&["tenants", "list", "--page-size", "2", "-o", "json"], "")
        .await
        .ok()
        .json();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>()
    );

    let t = ctl
        .run(&["tenants", "suspend", &ids[0].1, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(t["suspended"], true);
    assert_eq!(t["phase"], "Suspended");
    let run = ctl.run(&["tenants", "resume", &ids[0].1], "").await.ok();
    assert!(run.stdout.contains("tenant-one"), "{run:?}");
    assert!(!run.stdout.contains("Suspended"), "{run:?}");

    // Delete asks first; no answer is no.
    let run = ctl.run(&["tenants", "delete", &ids[1].1], "").await;
    assert_eq!(run.error_line(), "error: aborted");
    assert!(run.stderr.contains("[y/N]"), "{run:?}");
    let run = ctl.run(&["tenants", "delete", &ids[1].1], "y\n").await.ok();
    assert!(run.stdout.contains("deleted tenant"), "{run:?}");
    let run = ctl
        .run(&["tenants", "delete", &ids[2].1, "--yes"], "")
        .await
        .ok();
    assert!(run.stdout.contains(&ids[2].1), "{run:?}");
    let run = ctl
        .run(&["tenants", "delete", &ids[2].1, "--yes"], "")
        .await;
    assert_eq!(run.error_line(), "error: tenant not found");
    let list = ctl
        .run(&["tenants", "list", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Admin retention goes up to the hard cap, not beyond.
    let run = ctl
        .run(
            &[
                "retention",
                "set",
                &ids[0].1,
                "--max-age-hours",
                "720",
                "--max-count",
                "1000",
                "--admin",
            ],
            "",
        )
        .await
        .ok();
    assert!(run.stdout.contains("720"), "{run:?}");
    let run = ctl
        .run(
            &[
                "retention",
                "set",
                &ids[0].1,
                "--max-age-hours",
                "721",
                "--max-count",
                "1000",
                "--admin",
            ],
            "",
        )
        .await;
    assert!(run.error_line().contains("max_age_hours"), "{run:?}");
    // The owner sees the admin's policy.
    let owner = Ctl::new(&s);
    owner.login("one@example.com", None).await.ok();
    let r = owner
        .run(&["retention", "get", &ids[0].1, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(r["policy"]["max_age_hours"], 720);
    let run = owner.run(&["retention", "get", &ids[0].1], "").await.ok();
    assert!(run.stdout.contains("MAX AGE HOURS CAP"), "{run:?}");

    // Admin roles and sessions. A role needs a second factor: refused until there is one.
    let user_id = ids[0].0.clone();
    let run = ctl.run(&["admins", "grant", &user_id], "").await;
    assert_eq!(run.error_line(), MFA_NOT_ENROLLED_LINE);
    let (secret, _) = s.enroll(&s.login("one@example.com").await).await;
    let run = ctl.run(&["admins", "grant", &user_id], "").await.ok();
    assert!(run.stdout.contains("granted admin"), "{run:?}");
    // Granting ends the user's sessions: the CLI says so.
    let run = owner.run(&["whoami"], "").await;
    assert_eq!(
        run.error_line(),
        "error: session expired or revoked; run `tenantryctl login`"
    );
    s.advance(Duration::from_secs(30));
    owner
        .login("one@example.com", Some(&s.totp_now(&secret)))
        .await
        .ok();
    let me = owner.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert!(
        me["roles"].as_array().unwrap().contains(&"admin".into()),
        "{me}"
    );
    let out = ctl
        .run(&["admins", "revoke", &user_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(out["admin"], false);
    s.advance(Duration::from_secs(30));
    owner
        .login("one@example.com", Some(&s.totp_now(&secret)))
        .await
        .ok();
    let me = owner.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert!(
        !me["roles"].as_array().unwrap().contains(&"admin".into()),
        "{me}"
    );
    let other = Ctl::new(&s);
    s.advance(Duration::from_secs(30));
    other
        .login("one@example.com", Some(&s.totp_now(&secret)))
        .await
        .ok();
    let out = ctl
        .run(&["sessions", "revoke", &user_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(out["revoked"], 2);
    let run = other.run(&["whoami"], "").await;
    assert_eq!(
        run.error_line(),
        "error: session expired or revoked; run `tenantryctl login`"
    );

    // The audit log: every action above is there, pages are followed, --limit caps.
    let run = ctl.run(&["audit", "list"], "").await.ok();
    assert!(run.stdout.lines().next().unwrap().starts_with("SEQ"));
    for action in [
        "admin.tenant.suspend",
        "admin.tenant.resume",
        "admin.tenant.delete",
        "admin.tenant.retention.set",
        "admin.role.grant",
        "admin.role.revoke",
        "admin.sessions.revoke",
    ] {
        assert!(run.stdout.contains(action), "{action} missing: {run:?}");
    }
    let all = ctl
        .run(&["audit", "list", "--page-size", "4", "-o", "json"], "")
        .await
        .ok()
        .json();
    let sequences: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert!(sequences.len() > 20, "only {} events", sequences.len());
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    let some = ctl
        .run(&["audit", "list", "--limit", "3", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(some.as_array().unwrap().len(), 3);
    assert_eq!(some[0]["sequence"], 1);

    let run = ctl.run(&["audit", "verify"], "").await.ok();
    assert!(run.stdout.starts_with("audit log ok"), "{run:?}");

    // Someone with database access edits row 3: verify names it and exits 1.
    let drop_guard = if db.is_sqlite() {
        "DROP TRIGGER audit_events_no_update"
    } else {
        "DROP TRIGGER audit_events_no_change ON audit_events"
    };
    let store = &s.state.store;
    store.execute_raw_for_tests(drop_guard).await.unwrap();
    store
        .execute_raw_for_tests("UPDATE audit_events SET target = 'mallory' WHERE sequence = 3")
        .await
        .unwrap();
    let run = ctl.run(&["audit", "verify"], "").await;
    let line = run.error_line();
    assert!(line.contains("sequence 3"), "{line}");
    let run = ctl.run(&["audit", "verify", "-o", "json"], "").await;
    assert_eq!(run.code, 1);
    let v = run.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad_sequence"], 3);
    s.stop().await;
}

#[tokio::test]
async fn a_stale_second_factor_is_verified_again_and_the_command_retried_once() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("eve@example.com", "eveco").await;
    let ctl = Ctl::new(&s);
    let (_, secret) = admin_login(&s, &ctl).await;
    ctl.run(&["tenants", "list"], "").await.ok();

    // Past the 15-minute step-up window, inside the 30-minute idle timeout.
    s.advance(Duration::from_secs(16 * 60));
    let run = ctl.run(&["tenants", "list"], "").await;
    assert!(run.error_line().contains("--totp-code"), "{run:?}");
    let run = ctl
        .run(&["tenants", "list", "--totp-code", "000000"], "")
        .await;
    assert_eq!(run.error_line(), "error: invalid or already used code");

    s.advance(Duration::from_secs(30));
    let verified_at = s.now_ms();
    let run = ctl
        .run(
            &["tenants", "list", "--totp-code", &s.totp_now(&secret)],
            "",
        )
        .await
        .ok();
    assert!(run.stdout.contains("eveco"), "{run:?}");
    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    let stamped = jiff::Timestamp::from_millisecond(verified_at).unwrap();
    assert_eq!(me["mfa_verified_at"], stamped.to_string());

    // A code typed at the prompt works the same.
    s.advance(Duration::from_secs(16 * 60));
    let run = ctl
        .run(&["audit", "verify"], &format!("{}\n", s.totp_now(&secret)))
        .await
        .ok();
    assert!(run.stdout.contains("audit log ok"), "{run:?}");
    assert!(run.stderr.contains("TOTP code"), "{run:?}");
    s.stop().await;
}

#[tokio::test]
async fn an_expired_session_says_to_log_in_again() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("fay@example.com", "fayco").await;
    let ctl = Ctl::new(&s);
    ctl.login("fay@example.com", None).await.ok();
    ctl.run(&["whoami"], "").await.ok();

    // The default idle timeout is 30 minutes.
    s.advance(Duration::from_secs(31 * 60));
    let run = ctl.run(&["whoami"], "").await;
    assert_eq!(
        run.stderr,
        "error: session expired or revoked; run `tenantryctl login`\n"
    );
    assert_eq!(run.code, 1);

    // Logging out of an ended session still removes the file.
    ctl.run(&["logout"], "").await.ok();
    assert!(!ctl.session_file().exists());
    s.stop().await;
}

/// An API server with TLS, its certificate for one name from a CA of its own, and one
/// admin (password [`PASSWORD`]).
struct TlsServer {
    addr: std::net::SocketAddr,
    ca_pem: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<tenantry_api::Result<()>>,
}

impl TlsServer {
    async fn start(db: &Database, admin: &str, cert_name: &str) -> TlsServer {
        ensure_master_key(db);
        let args = serve_args(db, &[]);
        let clock = tenantry_api::clock::ManualClock::new(T0_MS);
        let state = tenantry_api::server::build_state(&args, std::sync::Arc::new(clock.clone()))
            .await
            .unwrap();
        tenantry_api::server::bootstrap_admin(
            &args.db,
            admin,
            &secrecy::SecretString::from(PASSWORD.to_owned()),
            &clock,
        )
        .await
        .unwrap();
        let (ca_pem, cert_pem, key_pem) = test_pki(cert_name);
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tenantry_api::server::serve(
            state,
            listener,
            Some(tls),
            async move {
                let _ = stopped.await;
            },
        ));
        TlsServer {
            addr,
            ca_pem,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A CA certificate (PEM) and a leaf for `name` signed by it (certificate, key PEM).
fn test_pki(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[tokio::test]
async fn https_servers_are_trusted_through_the_ca_file() {
    let db = Database::new().await;
    let server = TlsServer::start(&db, "tls@example.com", "127.0.0.1").await;
    let ca_pem = server.ca_pem.clone();
    let ctl = Ctl::for_server(format!("https://{}", server.addr));
    let ca_file = ctl.home.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_arg = ca_file.display().to_string();

    // Without the CA there is nothing to trust the server with: one clear line.
    let run = ctl.login("tls@example.com", None).await;
    assert!(run.error_line().contains("--ca-file"), "{run:?}");
    // A CA that did not sign the server's certificate is refused.
    let (other_ca, _, _) = test_pki("127.0.0.1");
    let other_file = ctl.home.path().join("other.pem");
    std::fs::write(&other_file, other_ca).unwrap();
    let run = ctl
        .run(
            &[
                "login",
                "--email",
                "tls@example.com",
                "--password-stdin",
                "--ca-file",
                &other_file.display().to_string(),
            ],
            &format!("{PASSWORD}\n"),
        )
        .await;
    assert!(
        run.error_line()
            .starts_with("error: cannot connect to https://"),
        "{run:?}"
    );
    assert!(!ctl.session_file().exists());

    ctl.run(
        &[
            "login",
            "--email",
            "tls@example.com",
            "--password-stdin",
            "--ca-file",
            &ca_arg,
        ],
        &format!("{PASSWORD}\n"),
    )
    .await
    .ok();
    let me = ctl
        .run(&["whoami", "--ca-file", &ca_arg, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(me["email"], "tls@example.com");
    // The CA file is also read from TENANTRY_CA_FILE.
    let mut cmd = ctl.command(&["whoami"]);
    cmd.env("TENANTRY_CA_FILE", &ca_file);
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{out:?}");

    server.stop().await;
}

#[tokio::test]
async fn the_certificate_name_can_differ_from_the_address() {
    // Through `kubectl port-forward` the address is 127.0.0.1 but the certificate names
    // the Service.
    let db = Database::new().await;
    let service = "tenantry-api.tenantry.svc";
    let server = TlsServer::start(&db, "pf@example.com", service).await;
    let ca_pem = server.ca_pem.clone();
    let ctl = Ctl::for_server(format!("https://{}", server.addr));
    let ca_file = ctl.home.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_arg = ca_file.display().to_string();
    let login = |extra: &'static [&'static str]| {
        let mut argv = vec![
            "login",
            "--email",
            "pf@example.com",
            "--password-stdin",
            "--ca-file",
            ca_arg.as_str(),
        ];
        argv.extend_from_slice(extra);
        argv.iter()
            .map(|a| (*a).to_owned())
            .collect::<Vec<String>>()
    };

    // The certificate does not name 127.0.0.1: refused.
    let argv = login(&[]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = ctl.run(&argv, &format!("{PASSWORD}\n")).await;
    assert!(
        run.error_line()
            .starts_with("error: cannot connect to https://"),
        "{run:?}"
    );
    // Checked against the name given instead: accepted.
    let argv = login(&["--tls-server-name", "tenantry-api.tenantry.svc"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    ctl.run(&argv, &format!("{PASSWORD}\n")).await.ok();
    let mut cmd = ctl.command(&["whoami", "-o", "json"]);
    cmd.env("TENANTRY_CA_FILE", &ca_file);
    cmd.env("TENANTRY_TLS_SERVER_NAME", service);
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{out:?}");

    // Meaningless without TLS: said so rather than ignored.
    let plain = Ctl::for_server("http://127.0.0.1:1".to_owned());
    let run = plain
        .run(
            &[
                "login",
                "--email",
                "pf@example.com",
                "--password-stdin",
                "--tls-server-name",
                service,
            ],
            &format!("{PASSWORD}\n"),
        )
        .await;
    assert!(run.error_line().contains("--tls-server-name"), "{run:?}");

    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Least privilege: users, roles with expiry, access reviews, the auditor role, audit export.
// ---------------------------------------------------------------------------------------

const MFA_NOT_ENROLLED_LINE: &str = "error: refused: the user has no second factor enrolled; they must run `tenantryctl mfa enroll` before they can be given a role";
const AUDITOR_LINE: &str = "error: permission denied: the auditor role is read-only (users list, tenants list, audit list|export|verify, access-review list|show); this command needs the admin role";
const SELF_REVIEW_LINE: &str = "error: permission denied: nobody may decide their own grant (separation of duties); another admin must keep or revoke it";
const SELF_GRANT_LINE: &str = "error: permission denied: nobody may grant a role to themselves (separation of duties); ask another admin";
const LAST_ADMIN_LINE: &str = "error: refused: this is the last active admin; grant the admin role to another user (with a second factor) first";

/// Signs a user up and enrolls TOTP for them; returns (user id, TOTP secret).
async fn enrolled_user(s: &TestServer, email: &str, tenant: &str) -> (String, String) {
    let (id, _) = s.signup(email, tenant).await;
    let token = s.login(email).await;
    let (secret, _) = s.enroll(&token).await;
    (id, secret)
}

/// Logs `email` in through the CLI with the TOTP code of a step not used before.
async fn login_with_totp(s: &TestServer, ctl: &Ctl, email: &str, secret: &str) {
    s.advance(Duration::from_secs(30));
    ctl.login(email, Some(&s.totp_now(secret))).await.ok();
}

/// The `field` of every element of a JSON array.
fn strings(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|v| v[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The element of a JSON array whose `field` is `value`.
fn find<'a>(list: &'a Value, field: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[field] == value)
        .unwrap_or_else(|| panic!("no {field} = {value} in {list}"))
}

#[tokio::test]
async fn users_are_listed_filtered_deactivated_and_reactivated() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (ann_id, _) = s.signup("ann@example.com", "annco").await;
    s.advance(Duration::from_millis(5));
    let (bob_id, _) = s.signup("bob@example.com", "bobco").await;
    s.advance(Duration::from_millis(5));
    let ctl = Ctl::new(&s);
    let (root_id, _) = admin_login(&s, &ctl).await;
    let ann = Ctl::new(&s);
    ann.login("ann@example.com", None).await.ok();

    // The table: one row per user, roles with their expiry, MFA as yes/no.
    let run = ctl.run(&["users", "list"], "").await.ok();
    let header: Vec<&str> = run.stdout.lines().next().unwrap().split("  ").collect();
    let header: Vec<&str> = header
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "ID",
            "EMAIL",
            "STATUS",
            "ROLES",
            "MFA",
            "CREATED",
            "LAST LOGIN"
        ],
        "{run:?}"
    );
    let row = |email: &str| -> Vec<String> {
        run.stdout
            .lines()
            .find(|l| l.contains(email))
            .unwrap_or_else(|| panic!("no {email}: {run:?}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let root_row = row("root@example.com");
    assert_eq!(
        root_row[..5],
        [&root_id, "root@example.com", "active", "admin", "until"]
    );
    assert!(root_row[5].starts_with("2026-"), "{root_row:?}");
    assert_eq!(root_row[6], "yes", "{root_row:?}");
    let ann_row = row("ann@example.com");
    assert_eq!(
        ann_row[..5],
        [&ann_id, "ann@example.com", "active", "-", "no"]
    );
    assert!(ann_row[5].starts_with("2026-01-01T"), "{ann_row:?}");
    assert!(
        ann_row[6].starts_with("2026-01-01T"),
        "ann logged in: {ann_row:?}"
    );

    // JSON: every field, oldest first.
    let users = ctl
        .run(&["users", "list", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(
        strings(&users, "email"),
        ["ann@example.com", "bob@example.com", "root@example.com"]
    );
    let root = find(&users, "user_id", &root_id);
    assert_eq!(root["status"], "active");
    assert_eq!(root["mfa_enrolled"], true);
    assert_eq!(root["roles"][0]["role"], "admin");
    assert!(root["roles"][0]["expires_at"].is_string(), "{root}");
    assert!(root["roles"][0]["granted_at"].is_string(), "{root}");
    assert!(
        root["roles"][0].get("granted_by_user_id").is_some(),
        "{root}"
    );
    assert!(
        root["last_login_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );
    assert_eq!(root["deactivated_at"], Value::Null);
    assert_eq!(root["deactivation_reason"], "");
    let ann_json = find(&users, "user_id", &ann_id);
    assert_eq!(ann_json["roles"], serde_json::json!([]));
    assert_eq!(ann_json["mfa_enrolled"], false);
    assert!(
        ann_json["created_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );

    // Filters compose into the server's grammar.
    let list = |args: &[&str]| {
        let mut argv = vec!["users", "list", "-o", "json"];
        argv.extend_from_slice(args);
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let ctl = &ctl;
        async move {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            strings(&ctl.run(&argv, "").await.ok().json(), "email")
        }
    };
    assert_eq!(list(&["--role", "admin"]).await, ["root@example.com"]);
    assert_eq!(
        list(&["--role", "none", "--status", "active"]).await,
        ["ann@example.com", "bob@example.com"]
    );
    assert_eq!(list(&["--email", "ANN"]).await, ["ann@example.com"]);
    assert_eq!(
        list(&["--filter", "email=example.com role=none"]).await,
        ["ann@example.com", "bob@example.com"]
    );
    assert!(list(&["--status", "deactivated"]).await.is_empty());
    let run = ctl
        .run(&["users", "list", "--filter", "colour=blue"], "")
        .await;
    run.error_line();
    let run = ctl.run(&["users", "list", "--email", "a b"], "").await;
    assert!(run.error_line().contains("--email"), "{run:?}");

    // One page unless --all; a note on stderr says there is more.
    let run = ctl
        .run(&["users", "list", "--page-size", "1", "-o", "json"], "")
        .await
        .ok();
    assert_eq!(strings(&run.json(), "email"), ["ann@example.com"]);
    assert!(run.stderr.contains("--all"), "{run:?}");
    let run = ctl
        .run(
            &["users", "list", "--page-size", "1", "--all", "-o", "json"],
            "",
        )
        .await
        .ok();
    assert_eq!(run.json().as_array().unwrap().len(), 3);
    assert!(run.stderr.is_empty(), "{run:?}");

    // Deactivation asks first; no answer is no.
    let deactivate = [
        "users",
        "deactivate",
        &ann_id,
        "--reason",
        "left the company",
    ];
    let run = ctl.run(&deactivate, "").await;
    assert_eq!(run.error_line(), "error: aborted");
    assert!(run.stderr.contains("[y/N]"), "{run:?}");
    ann.run(&["whoami"], "").await.ok();
    let run = ctl.run(&deactivate, "y\n").await.ok();
    assert!(
        run.stdout.starts_with(&format!(
            "deactivated ann@example.com ({ann_id}): 1 session(s) ended"
        )),
        "{run:?}"
    );
    assert!(run.stdout.contains("left the company"), "{run:?}");
    // Their session ended; logging in answers exactly like a wrong password.
    let run = ann.run(&["whoami"], "").await;
    assert_eq!(
        run.error_line(),
        "error: session expired or revoked; run `tenantryctl login`"
    );
    let deactivated = ann.login("ann@example.com", None).await;
    let wrong = Ctl::new(&s)
        .run(
            &["login", "--email", "bob@example.com", "--password-stdin"],
            "not-the-password-at-all\n",
        )
        .await;
    assert_eq!(deactivated.code, 1, "{deactivated:?}");
    assert_eq!(deactivated.stderr, "error: invalid email or password\n");
    assert_eq!(
        (deactivated.code, &deactivated.stdout, &deactivated.stderr),
        (wrong.code, &wrong.stdout, &wrong.stderr)
    );
    let users = ctl
        .run(
            &["users", "list", "--status", "deactivated", "-o", "json"],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(strings(&users, "user_id"), [ann_id.as_str()]);
    assert_eq!(users[0]["status"], "deactivated");
    assert_eq!(users[0]["deactivation_reason"], "left the company");
    assert!(
        users[0]["deactivated_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );
    let run = ctl
        .run(&["users", "list", "--status", "deactivated"], "")
        .await
        .ok();
    assert!(run.stdout.contains("deactivated"), "{run:?}");

    // Reactivation lets them in again, with no role.
    let user = ctl
        .run(&["users", "reactivate", &ann_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(user["user_id"], ann_id.as_str());
    assert_eq!(user["status"], "active");
    assert_eq!(user["roles"], serde_json::json!([]));
    assert_eq!(user["deactivated_at"], Value::Null);
    ann.login("ann@example.com", None).await.ok();

    // --yes skips the question; JSON has the user and the sessions ended.
    let out = ctl
        .run(
            &[
                "users",
                "deactivate",
                &bob_id,
                "--reason",
                "contract ended",
                "--yes",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(out["user"]["status"], "deactivated");
    assert_eq!(out["user"]["deactivation_reason"], "contract ended");
    assert_eq!(out["sessions_revoked"], 0);
    let run = ctl.run(&["users", "reactivate", &bob_id], "").await.ok();
    assert!(
        run.stdout
            .starts_with(&format!("reactivated bob@example.com ({bob_id})")),
        "{run:?}"
    );
    assert!(run.stdout.contains("no role was restored"), "{run:?}");

    // The last active admin cannot be shut out.
    let run = ctl
        .run(
            &["users", "deactivate", &root_id, "--reason", "x", "--yes"],
            "",
        )
        .await;
    assert_eq!(run.error_line(), LAST_ADMIN_LINE);
    ctl.run(&["whoami"], "").await.ok();

    // Every change is in the audit log, and the chain still verifies.
    let events = ctl
        .run(&["audit", "list", "--target", &ann_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    let actions = strings(&events, "action");
    assert!(
        actions.iter().any(|a| a.contains("deactivate"))
            && actions.iter().any(|a| a.contains("reactivate")),
        "{actions:?}"
    );
    ctl.run(&["audit", "verify"], "").await.ok();
    s.stop().await;
}

#[tokio::test]
async fn admins_grant_roles_that_expire_and_a_new_role_opens_a_review() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let ctl = Ctl::new(&s);
    let (root_id, _) = admin_login(&s, &ctl).await;
    let (bob_id, _) = s.signup("bob@example.com", "bobco").await;

    // No second factor, no role.
    let run = ctl
        .run(&["admins", "grant", &bob_id, "--role", "auditor"], "")
        .await;
    assert_eq!(run.error_line(), MFA_NOT_ENROLLED_LINE);
    let (secret, _) = s.enroll(&s.login("bob@example.com").await).await;

    let run = ctl
        .run(
            &[
                "admins",
                "grant",
                &bob_id,
                "--role",
                "auditor",
                "--expires-in-days",
                "30",
            ],
            "",
        )
        .await
        .ok();
    let mut lines = run.stdout.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with(&format!("granted auditor to {bob_id} until 2026-01-31T")),
        "{run:?}"
    );
    assert!(first.ends_with("(their sessions were ended)"), "{run:?}");
    assert!(
        lines.next().unwrap().starts_with("opened access review "),
        "{run:?}"
    );

    // Renewing a role the user holds opens no review; JSON has the grant.
    let out = ctl
        .run(
            &[
                "admins",
                "grant",
                &bob_id,
                "--role",
                "auditor",
                "--expires-in-days",
                "60",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(out["user_id"], bob_id.as_str());
    assert_eq!(out["role"], "auditor");
    assert_eq!(out["granted"], true);
    assert_eq!(out["review_id"], Value::Null, "{out}");
    assert_eq!(out["grant"]["role"], "auditor");
    assert_eq!(out["grant"]["granted_by_user_id"], root_id.as_str());
    assert!(
        out["grant"]["granted_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );
    assert!(
        out["grant"]["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-02T"),
        "{out}"
    );
    assert!(out.get("admin").is_none(), "{out}");
    // Beyond --max-grant-days (90): refused, naming the field.
    let run = ctl
        .run(&["admins", "grant", &bob_id, "--expires-in-days", "91"], "")
        .await;
    assert!(run.error_line().contains("expires_in_days"), "{run:?}");
    // Zero is not a number of days.
    let run = ctl
        .run(&["admins", "grant", &bob_id, "--expires-in-days", "0"], "")
        .await;
    assert_eq!(run.code, 2, "{run:?}");

    // The role and its expiry show in the user list and in whoami.
    let run = ctl
        .run(&["users", "list", "--role", "auditor"], "")
        .await
        .ok();
    assert!(run.stdout.contains("auditor until 2026-03-02T"), "{run:?}");
    let bob = Ctl::new(&s);
    login_with_totp(&s, &bob, "bob@example.com", &secret).await;
    let me = bob.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert!(
        me["roles"].as_array().unwrap().contains(&"auditor".into()),
        "{me}"
    );

    // The admin role, new to bob: `admin` stays in the JSON, and a review is opened for it.
    let out = ctl
        .run(&["admins", "grant", &bob_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(out["admin"], true);
    assert_eq!(out["role"], "admin");
    let review_id = out["review_id"].as_str().unwrap().to_owned();
    let shown = ctl
        .run(&["access-review", "show", &review_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(shown["review"]["trigger"], "role_change");
    assert_eq!(shown["review"]["items"], 1);
    assert_eq!(strings(&shown["items"], "user_id"), [bob_id.as_str()]);
    assert_eq!(shown["items"][0]["role"], "admin");
    assert_eq!(shown["items"][0]["decision"], "undecided");

    // Nobody grants themselves a role.
    let run = ctl
        .run(&["admins", "grant", &root_id, "--role", "auditor"], "")
        .await;
    assert_eq!(run.error_line(), SELF_GRANT_LINE);

    // Revoking names the role; the admin role keeps its old `admin` field.
    let out = ctl
        .run(
            &[
                "admins", "revoke", &bob_id, "--role", "auditor", "-o", "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(out["role"], "auditor");
    assert_eq!(out["granted"], false);
    assert!(out.get("admin").is_none(), "{out}");
    // The new admin role is revoked through the review it opened.
    let run = ctl
        .run(&["access-review", "revoke", &review_id, &bob_id], "")
        .await
        .ok();
    assert!(
        run.stdout
            .starts_with("revoked admin from bob@example.com; their sessions were ended\n"),
        "{run:?}"
    );
    let row = run.stdout.lines().find(|l| l.starts_with(&bob_id)).unwrap();
    assert!(
        row.contains(" admin ") && row.contains(" revoke "),
        "{run:?}"
    );
    // Revoking a role no longer held is harmless.
    let run = ctl.run(&["admins", "revoke", &bob_id], "").await.ok();
    assert!(
        run.stdout
            .starts_with(&format!("revoked admin from {bob_id}")),
        "{run:?}"
    );
    let users = ctl
        .run(&["users", "list", "--role", "none", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(strings(&users, "user_id"), [bob_id.as_str()]);

    // The last active admin keeps the role.
    let run = ctl.run(&["admins", "revoke", &root_id], "").await;
    assert_eq!(run.error_line(), LAST_ADMIN_LINE);
    s.stop().await;
}

#[tokio::test]
async fn access_reviews_are_started_listed_shown_and_decided() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let ctl = Ctl::new(&s);
    let (root_id, _) = admin_login(&s, &ctl).await;
    let (ada_id, ada_secret) = enrolled_user(&s, "ada@example.com", "adaco").await;
    let (aud_id, _) = enrolled_user(&s, "aud@example.com", "audco").await;
    ctl.run(&["admins", "grant", &ada_id], "").await.ok();
    ctl.run(&["admins", "grant", &aud_id, "--role", "auditor"], "")
        .await
        .ok();
    s.advance(Duration::from_secs(1));

    // Start: every grant becomes an item.
    let review = ctl
        .run(
            &[
                "access-review",
                "start",
                "--due-in-days",
                "10",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(review["trigger"], "manual");
    assert_eq!(review["state"], "open");
    assert_eq!(review["started_by_user_id"], root_id.as_str());
    assert_eq!(review["items"], 3);
    assert_eq!(review["undecided"], 3);
    assert_eq!(review["kept"], 0);
    assert_eq!(review["closed_at"], Value::Null);
    assert!(
        review["due_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-11T"),
        "{review}"
    );
    let id = review["review_id"].as_str().unwrap().to_owned();

    // List: newest first, the two role changes before it.
    let list = ctl
        .run(&["access-review", "list", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(
        strings(&list, "trigger"),
        ["manual", "role_change", "role_change"]
    );
    assert_eq!(list[0]["review_id"], id.as_str());
    let run = ctl.run(&["access-review", "list"], "").await.ok();
    let header = run.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("TRIGGER") && header.contains("UNDECIDED"),
        "{run:?}"
    );
    assert!(run.stdout.contains("role_change"), "{run:?}");
    let row = run.stdout.lines().nth(1).unwrap();
    assert!(
        row.starts_with(&id) && row.contains("manual") && row.contains("open"),
        "{run:?}"
    );

    // Show: the summary, then the items.
    let run = ctl.run(&["access-review", "show", &id], "").await.ok();
    assert!(run.stdout.starts_with("REVIEW"), "{run:?}");
    assert!(run.stdout.lines().next().unwrap().contains(&id), "{run:?}");
    assert!(run.stdout.contains("USER ID"), "{run:?}");
    for email in ["root@example.com", "ada@example.com", "aud@example.com"] {
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains(email))
            .unwrap_or_else(|| panic!("no {email}: {run:?}"));
        assert!(line.contains("undecided"), "{line}");
    }

    // Nobody decides their own grant.
    let run = ctl.run(&["access-review", "keep", &id, &root_id], "").await;
    assert_eq!(run.error_line(), SELF_REVIEW_LINE);

    // Keep ada's admin grant, with a note.
    let run = ctl
        .run(
            &[
                "access-review",
                "keep",
                &id,
                &ada_id,
                "--expires-in-days",
                "30",
                "--note",
                "still on call",
            ],
            "",
        )
        .await
        .ok();
    assert!(
        run.stdout
            .starts_with("kept admin of ada@example.com; the grant is extended"),
        "{run:?}"
    );
    assert!(run.stdout.contains("still on call"), "{run:?}");
    let ada_user = find(
        &ctl.run(&["users", "list", "-o", "json"], "")
            .await
            .ok()
            .json(),
        "user_id",
        &ada_id,
    )
    .clone();
    assert!(
        ada_user["roles"][0]["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-31T"),
        "{ada_user}"
    );

    // Revoke aud's auditor grant: JSON is the item after the decision.
    let item = ctl
        .run(
            &[
                "access-review",
                "revoke",
                &id,
                &aud_id,
                "--role",
                "auditor",
                "--note",
                "moved teams",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(item["review_id"], id.as_str());
    assert_eq!(item["user_id"], aud_id.as_str());
    assert_eq!(item["email"], "aud@example.com");
    assert_eq!(item["role"], "auditor");
    assert_eq!(item["decision"], "revoke");
    assert_eq!(item["decided_by_user_id"], root_id.as_str());
    assert_eq!(item["note"], "moved teams");
    assert!(
        item["decided_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-01T")
    );
    let auditors = ctl
        .run(&["users", "list", "--role", "auditor", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(auditors, serde_json::json!([]));

    let shown = ctl
        .run(&["access-review", "show", &id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(shown["review"]["kept"], 1);
    assert_eq!(shown["review"]["revoked"], 1);
    assert_eq!(shown["review"]["undecided"], 1);
    assert_eq!(shown["review"]["state"], "open");
    assert_eq!(
        find(&shown["items"], "user_id", &root_id)["decision"],
        "undecided"
    );
    assert_eq!(
        find(&shown["items"], "user_id", &ada_id)["decision"],
        "keep"
    );
    assert_eq!(
        find(&shown["items"], "user_id", &aud_id)["decision"],
        "revoke"
    );

    // Another admin decides root's grant; the last decision closes the review.
    let ada = Ctl::new(&s);
    login_with_totp(&s, &ada, "ada@example.com", &ada_secret).await;
    let item = ada
        .run(
            &[
                "access-review",
                "keep",
                &id,
                &root_id,
                "--note",
                "bootstrap admin",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(item["decision"], "keep");
    assert_eq!(item["role"], "admin");
    assert_eq!(item["user_id"], root_id.as_str());
    assert_eq!(item["decided_by_user_id"], ada_id.as_str());
    assert_eq!(item["note"], "bootstrap admin");
    let shown = ctl
        .run(&["access-review", "show", &id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(shown["review"]["state"], "closed", "{shown}");
    assert!(shown["review"]["closed_at"].is_string(), "{shown}");
    assert_eq!(shown["review"]["kept"], 2);
    assert_eq!(shown["review"]["undecided"], 0);
    let run = ctl.run(&["access-review", "show", &id], "").await.ok();
    assert!(run.stdout.contains("closed"), "{run:?}");
    assert!(run.stdout.contains("bootstrap admin"), "{run:?}");

    // An unknown review is one clear line.
    let run = ctl
        .run(
            &[
                "access-review",
                "show",
                "00000000-0000-0000-0000-000000000000",
            ],
            "",
        )
        .await;
    run.error_line();
    s.stop().await;
}

#[tokio::test]
async fn undecided_review_items_are_revoked_at_the_due_time() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let ctl = Ctl::new(&s);
    let (root_id, root_secret) = admin_login(&s, &ctl).await;
    let (ada_id, _) = enrolled_user(&s, "ada@example.com", "adaco").await;
    let out = ctl
        .run(&["admins", "grant", &ada_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    let review_id = out["review_id"].as_str().unwrap().to_owned();
    // A manual review, due later, as a table: every grant is an item.
    let run = ctl
        .run(&["access-review", "start", "--due-in-days", "30"], "")
        .await
        .ok();
    let fields: Vec<(String, String)> = run
        .stdout
        .lines()
        .map(|l| {
            let (k, v) = l.split_once("  ").unwrap();
            (k.to_owned(), v.trim().to_owned())
        })
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no {name}: {run:?}"))
            .1
            .clone()
    };
    assert_eq!(field("TRIGGER"), "manual");
    assert_eq!(field("STATE"), "open");
    assert_eq!(field("STARTED BY"), root_id);
    assert_eq!(field("ITEMS"), "2");
    assert_eq!(field("UNDECIDED"), "2");
    assert_eq!(field("CLOSED"), "-");
    assert!(field("DUE").starts_with("2026-01-31T"), "{run:?}");

    // The role-change review is due within 7 days; nobody decides it.
    s.advance(Duration::from_secs(7 * 24 * 3600 + 60));
    login_with_totp(&s, &ctl, "root@example.com", &root_secret).await;
    // The server's access sweep (every minute on the real clock) closes it.
    tenantry_api::access::sweep(&s.state).await.unwrap();
    let shown = ctl
        .run(&["access-review", "show", &review_id, "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(shown["review"]["state"], "closed", "{shown}");
    assert_eq!(shown["review"]["expired"], 1, "{shown}");
    assert_eq!(shown["items"][0]["decision"], "expired");
    assert_eq!(shown["items"][0]["decided_by_user_id"], "");
    let run = ctl
        .run(&["access-review", "show", &review_id], "")
        .await
        .ok();
    assert!(run.stdout.contains("expired"), "{run:?}");
    let admins = ctl
        .run(&["users", "list", "--role", "admin", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(strings(&admins, "user_id"), [root_id]);
    s.stop().await;
}

#[tokio::test]
async fn audit_export_streams_every_matching_event_as_jsonl() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let mut tenants = Vec::new();
    for name in ["one", "two", "three"] {
        s.advance(Duration::from_secs(1));
        tenants.push(
            s.signup(&format!("{name}@example.com"), &format!("tenant-{name}"))
                .await,
        );
    }
    let ctl = Ctl::new(&s);
    let (root_id, _) = admin_login(&s, &ctl).await;
    for (_, tenant) in &tenants {
        s.advance(Duration::from_secs(1));
        ctl.run(&["tenants", "suspend", tenant], "").await.ok();
        ctl.run(&["tenants", "resume", tenant], "").await.ok();
    }
    let token = ctl.saved_token();

    // Everything, three events per request: one JSON object per line, in order, no gaps.
    let run = ctl
        .run(
            &["audit", "export", "--format", "jsonl", "--page-size", "3"],
            "",
        )
        .await
        .ok();
    assert!(run.stdout.ends_with('\n'), "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let sequences: Vec<u64> = lines
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert!(sequences.len() > 12, "only {} events", sequences.len());
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    // The very rows the API holds, hash for hash.
    let stored = all_audit_events(&s, &token).await;
    for line in &lines {
        let seq = line["sequence"].as_u64().unwrap();
        let row = &stored[usize::try_from(seq - 1).unwrap()];
        assert_eq!(line["hash"], row.hash.as_str());
        assert_eq!(line["action"], row.action.as_str());
    }
    // `--format` defaults to jsonl, and `-o` does not change it.
    let run = ctl
        .run(
            &["audit", "export", "-o", "table", "--page-size", "1000"],
            "",
        )
        .await
        .ok();
    assert!(run.stdout.lines().count() >= sequences.len(), "{run:?}");
    assert!(run.stdout.starts_with("{\"sequence\":1,") || run.stdout.starts_with('{'));

    // Filters: action prefix, actor, target, time range; on export and on list alike.
    let export = |args: Vec<String>| {
        let ctl = &ctl;
        async move {
            let mut argv = vec![
                "audit".to_owned(),
                "export".to_owned(),
                "--page-size".to_owned(),
                "2".to_owned(),
            ];
            argv.extend(args);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let run = ctl.run(&argv, "").await.ok();
            run.stdout
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let tenant_events = export(args(&["--action-prefix", "admin.tenant."])).await;
    assert_eq!(tenant_events.len(), 6, "{tenant_events:?}");
    assert!(
        tenant_events
            .iter()
            .all(|e| e["action"].as_str().unwrap().starts_with("admin.tenant."))
    );
    let listed = ctl
        .run(
            &[
                "audit",
                "list",
                "--action-prefix",
                "admin.tenant.",
                "-o",
                "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().clone(), tenant_events);
    let run = ctl
        .run(
            &["audit", "list", "--action-prefix", "admin.tenant.resume"],
            "",
        )
        .await
        .ok();
    assert_eq!(run.stdout.lines().count(), 4, "{run:?}");
    assert!(
        run.stdout
            .lines()
            .skip(1)
            .all(|l| l.contains("admin.tenant.resume"))
    );

    let by_root = export(args(&["--actor", &root_id])).await;
    assert!(!by_root.is_empty());
    assert!(
        by_root
            .iter()
            .all(|e| e["actor_user_id"] == root_id.as_str())
    );
    let about_one = export(args(&["--target", &tenants[0].1])).await;
    assert!(
        about_one
            .iter()
            .all(|e| e["target"] == tenants[0].1.as_str()),
        "{about_one:?}"
    );
    let actions: Vec<&str> = about_one
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.ends_with(&["admin.tenant.suspend", "admin.tenant.resume"]),
        "{actions:?}"
    );
    let combined = export(args(&[
        "--actor",
        &root_id,
        "--action-prefix",
        "admin.tenant.suspend",
        "--target",
        &tenants[2].1,
    ]))
    .await;
    assert_eq!(combined.len(), 1, "{combined:?}");

    // Time range: at or after --since, before --until.
    let mid = tenant_events[2]["time"].as_str().unwrap().to_owned();
    let end = tenant_events[4]["time"].as_str().unwrap().to_owned();
    let range = export(args(&[
        "--action-prefix",
        "admin.tenant.",
        "--since",
        &mid,
        "--until",
        &end,
    ]))
    .await;
    assert_eq!(range, tenant_events[2..4].to_vec());
    let since = export(args(&["--since", &mid])).await;
    assert!(
        since
            .iter()
            .all(|e| e["time"].as_str().unwrap() >= mid.as_str()),
        "{since:?}"
    );
    assert_eq!(since[0], tenant_events[2]);
    let none = export(args(&["--since", "2030-01-01"])).await;
    assert!(none.is_empty(), "{none:?}");
    let run = ctl
        .run(&["audit", "export", "--since", &end, "--until", &mid], "")
        .await;
    assert!(run.error_line().contains("--since"), "{run:?}");
    let run = ctl
        .run(&["audit", "export", "--since", "yesterday"], "")
        .await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = ctl.run(&["audit", "export", "--format", "csv"], "").await;
    assert_eq!(run.code, 2, "{run:?}");

    // Read as a SIEM shipper reads it: line by line from a pipe, while it is written. Pages
    // of one still reach the end although every request adds an audit event of its own:
    // the export holds the events up to the newest one when it started.
    let mut child = ctl
        .command(&["audit", "export", "--page-size", "1"])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut first))
        .await
        .unwrap()
        .unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["sequence"], 1);
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_string(&mut rest))
        .await
        .expect("the export never ended")
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    let rest: Vec<u64> = rest
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["sequence"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(rest, (2..=rest.len() as u64 + 1).collect::<Vec<_>>());
    assert!(rest.len() >= sequences.len(), "{} events", rest.len() + 1);
    s.stop().await;
}

#[tokio::test]
async fn an_auditor_reads_and_is_refused_every_change_with_a_clear_line() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let ctl = Ctl::new(&s);
    let (root_id, _) = admin_login(&s, &ctl).await;
    let (_, tenant_id) = s.signup("ann@example.com", "annco").await;
    let (aud_id, aud_secret) = enrolled_user(&s, "aud@example.com", "audco").await;
    let out = ctl
        .run(
            &[
                "admins", "grant", &aud_id, "--role", "auditor", "-o", "json",
            ],
            "",
        )
        .await
        .ok()
        .json();
    let review_id = out["review_id"].as_str().unwrap().to_owned();
    let aud = Ctl::new(&s);
    login_with_totp(&s, &aud, "aud@example.com", &aud_secret).await;

    // The reads work.
    for args in [
        vec!["users", "list"],
        vec!["tenants", "list"],
        vec!["audit", "list"],
        vec!["audit", "verify"],
        vec!["audit", "export"],
        vec!["access-review", "list"],
        vec!["access-review", "show", review_id.as_str()],
    ] {
        aud.run(&args, "").await.ok();
    }
    let users = aud
        .run(&["users", "list", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(users.as_array().unwrap().len(), 3);

    // Every change is refused with one clear line, and nothing changed.
    for args in [
        vec!["tenants", "suspend", tenant_id.as_str()],
        vec!["tenants", "delete", tenant_id.as_str(), "--yes"],
        vec![
            "retention",
            "set",
            tenant_id.as_str(),
            "--max-age-hours",
            "24",
            "--max-count",
            "10",
            "--admin",
        ],
        vec!["admins", "grant", root_id.as_str(), "--role", "auditor"],
        vec!["admins", "revoke", root_id.as_str()],
        vec!["sessions", "revoke", root_id.as_str()],
        vec![
            "users",
            "deactivate",
            root_id.as_str(),
            "--reason",
            "x",
            "--yes",
        ],
        vec!["users", "reactivate", root_id.as_str()],
        vec!["access-review", "start"],
        vec![
            "access-review",
            "keep",
            review_id.as_str(),
            root_id.as_str(),
        ],
        vec![
            "access-review",
            "revoke",
            review_id.as_str(),
            root_id.as_str(),
        ],
    ] {
        let run = aud.run(&args, "").await;
        assert_eq!(run.error_line(), AUDITOR_LINE, "{args:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
    }
    ctl.run(&["whoami"], "").await.ok();
    let t = ctl
        .run(&["tenants", "list", "-o", "json"], "")
        .await
        .ok()
        .json();
    assert_eq!(find(&t, "tenant_id", &tenant_id)["suspended"], false);

    // A user with no role at all still gets the plain admin-role line.
    let ann = Ctl::new(&s);
    ann.login("ann@example.com", None).await.ok();
    let run = ann.run(&["users", "list"], "").await;
    assert_eq!(
        run.error_line(),
        "error: permission denied: this command needs the admin role"
    );
    s.stop().await;
}

/// `mfa remove` asks for the password (a wrong one is refused by name) and turns TOTP off
/// for a session that verified its second factor at login.
#[tokio::test]
async fn mfa_remove_needs_the_password_and_turns_totp_off() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    s.signup("flo@example.com", "floco").await;
    let token = s.login("flo@example.com").await;
    let (secret, _) = s.enroll(&token).await;
    s.advance(Duration::from_secs(30));
    let ctl = Ctl::new(&s);
    ctl.login("flo@example.com", Some(&s.totp_now(&secret)))
        .await
        .ok();

    let run = ctl
        .run(
            &["mfa", "remove", "--password-stdin"],
            "not the password at all\n",
        )
        .await;
    assert!(run.error_line().contains("password"), "{run:?}");
    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert_eq!(me["mfa_enrolled"], true);

    let run = ctl
        .run(
            &["mfa", "remove", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        )
        .await
        .ok();
    assert!(run.stdout.contains("TOTP removed"), "{run:?}");
    let me = ctl.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert_eq!(me["mfa_enrolled"], false);
    s.stop().await;
}
