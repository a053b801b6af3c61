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

    // Admin roles and sessions.
    let user_id = ids[0].0.clone();
    let run = ctl.run(&["admins", "grant", &user_id], "").await.ok();
    assert!(run.stdout.contains("granted admin"), "{run:?}");
    // Granting ends the user's sessions: the CLI says so.
    let run = owner.run(&["whoami"], "").await;
    assert_eq!(
        run.error_line(),
        "error: session expired or revoked; run `tenantryctl login`"
    );
    owner.login("one@example.com", None).await.ok();
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
    owner.login("one@example.com", None).await.ok();
    let me = owner.run(&["whoami", "-o", "json"], "").await.ok().json();
    assert!(
        !me["roles"].as_array().unwrap().contains(&"admin".into()),
        "{me}"
    );
    let other = Ctl::new(&s);
    other.login("one@example.com", None).await.ok();
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
