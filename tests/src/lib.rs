//! Helpers shared by the end-to-end tests (`tests/tests/e2e/`): finding the real binaries,
//! driving the API over gRPC (signup, login, TOTP), and, for the real-cluster tests,
//! installing the CRD and running the operator in-process.
// A test-support crate: a failed step should fail the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tenantry_client::{Client, Credentials, Trust};
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::PASSWORD;
use tonic::Request;
use tonic::transport::Channel;

pub mod browser;
pub mod cluster;

/// The workspace binary `name`, built next to the running test.
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// Runs `command` to completion with `stdin` as its input, capturing its output.
pub fn run_with_stdin(command: &mut std::process::Command, stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs the real `tenantryctl` against `server` with session file `session`; returns
/// (success, stdout, stderr).
pub fn ctl(server: &str, session: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let out = run_with_stdin(
        std::process::Command::new(bin("tenantryctl"))
            .args(["--server", server])
            .arg("--session-file")
            .arg(session)
            .args(args),
        stdin,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `msg` with the session token as bearer credentials.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    credentials(token).authorize(Request::new(msg))
}

/// Bearer credentials for a session token.
fn credentials(token: &str) -> Credentials {
    Credentials::bearer(&SecretString::from(token)).unwrap()
}

/// Connects to a plaintext API on `port`, waiting up to 30 s for it to listen; `log`
/// explains a failure to start.
pub async fn connect(port: u16, log: impl Fn() -> String) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) =
            tenantry_client::connect(&format!("http://127.0.0.1:{port}"), Trust::default()).await
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not start; log: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until GetTenant reports `phase`; fails after `within` with the last message.
pub async fn wait_for_phase(
    channel: &Channel,
    token: &str,
    tenant_id: &str,
    phase: TenantPhase,
    within: Duration,
) -> Tenant {
    wait_for_tenant(channel, token, tenant_id, within, |t| t.phase() == phase).await
}

/// Waits until GetTenant's answer satisfies `done`; fails after `within`.
pub async fn wait_for_tenant(
    channel: &Channel,
    token: &str,
    tenant_id: &str,
    within: Duration,
    done: impl Fn(&Tenant) -> bool,
) -> Tenant {
    let deadline = Instant::now() + within;
    loop {
        let t = Client::new(channel.clone(), credentials(token))
            .tenants()
            .get_tenant(GetTenantRequest {
                tenant_id: tenant_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .tenant
            .unwrap();
        if done(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "tenant stuck in {:?} ({})",
            t.phase(),
            t.message
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Signs a user up with [`PASSWORD`] and logs them in; returns the ids and the token.
pub async fn signup_and_login(
    channel: &Channel,
    email: &str,
    tenant: &str,
) -> (SignupResponse, String) {
    let mut accounts = AccountServiceClient::new(channel.clone());
    let ids = accounts
        .signup(SignupRequest {
            email: email.into(),
            password: PASSWORD.into(),
            tenant_name: tenant.into(),
            plan: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let token = login(channel, email).await;
    (ids, token)
}

/// Verifies `email`'s address the way its owner does: the link from the mail in `outbox`
/// (dev's `<data-dir>/outbox`), its token sent to `VerifyEmail` on `token`'s session.
/// Returns the token (a secret that must appear in no log).
pub async fn verify_from_outbox(
    channel: &Channel,
    token: &str,
    outbox: &std::path::Path,
    email: &str,
) -> String {
    let mut link = None;
    for _ in 0..300 {
        link = tenantry_test_support::verification_link(
            &tenantry_test_support::read_mail(outbox),
            email,
        );
        if link.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let link =
        link.unwrap_or_else(|| panic!("no verification mail to {email} in {}", outbox.display()));
    let verification = link
        .split_once("token=")
        .map(|(_, t)| t.to_owned())
        .unwrap_or_default();
    AccountServiceClient::new(channel.clone())
        .verify_email(authed(
            tenantry_proto::v1::VerifyEmailRequest {
                token: verification.clone(),
            },
            token,
        ))
        .await
        .unwrap();
    verification
}

/// Logs in with [`PASSWORD`]; returns the session token.
pub async fn login(channel: &Channel, email: &str) -> String {
    try_login(channel, email).await.unwrap()
}

/// Logs `email` in with [`PASSWORD`]; the session token, or the call's status.
pub async fn try_login(channel: &Channel, email: &str) -> Result<String, tonic::Status> {
    Ok(AccountServiceClient::new(channel.clone())
        .login(LoginRequest {
            email: email.into(),
            password: PASSWORD.into(),
        })
        .await?
        .into_inner()
        .session_token)
}

/// The TOTP code of `secret_b32` now, by the system clock.
pub fn totp_now(secret_b32: &str) -> String {
    totp_ahead(secret_b32, 0)
}

/// The TOTP code `steps` steps after the current one (the API accepts the next step's code
/// once, for clocks that drift: a second code within one 30 s step).
pub fn totp_ahead(secret_b32: &str, steps: i64) -> String {
    let secret = data_encoding::BASE32_NOPAD
        .decode(secret_b32.as_bytes())
        .unwrap();
    let now = jiff::Timestamp::now().as_second();
    tenantry_api::totp::format_code(
        tenantry_api::totp::code_at_step(&secret, tenantry_api::totp::step_at(now) + steps)
            .unwrap(),
    )
}

/// Runs one named step of a long test, printing its name as it starts and how long it
/// took (the test's output shows where a failure happened and where the time went).
pub async fn step<T>(name: &str, step: impl std::future::Future<Output = T>) -> T {
    eprintln!("--- step: {name}");
    let start = Instant::now();
    let out = step.await;
    eprintln!("--- step: {name}: {:.2?}", start.elapsed());
    out
}

/// Waits until the next TOTP step so a fresh code is accepted (each is usable once).
pub async fn next_step() {
    let now = jiff::Timestamp::now().as_millisecond();
    let wait = 30_000 - now.rem_euclid(30_000) + 50;
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;
}
