//! End to end on one machine: the real `tenantry-api dev` binary with its local
//! provisioner starting real `tenant-runtime` processes, driven over gRPC and HTTPS, and
//! the admin steps through the real `tenantryctl`. The long test is a sequence of named
//! steps on one running control plane; each prints its name and how long it took.
//!
//! The binaries are the ones `cargo test --workspace` builds next to this test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::{Https, PASSWORD, free_port};
use tenantry_tests::{
    authed, bin, connect, ctl, next_step, run_with_stdin, signup_and_login, totp_ahead, totp_now,
    verify_from_outbox, wait_for_phase,
};
use tonic::transport::Channel;

struct Dev {
    child: tokio::process::Child,
    port: u16,
    data_dir: PathBuf,
}

impl Dev {
    async fn start(data_dir: &Path, port: u16) -> Dev {
        Self::start_with(data_dir, port, &[]).await
    }

    async fn start_with(data_dir: &Path, port: u16, extra: &[&str]) -> Dev {
        let child = tokio::process::Command::new(bin("tenantry-api"))
            .args(["dev", "--no-portal", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            // Cheap hashing keeps the test quick; the defaults are tested in the API suite.
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
            .args(extra)
            .env("TENANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(data_dir.with_extension("log")).unwrap(),
            ))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let dev = Dev {
            child,
            port,
            data_dir: data_dir.to_owned(),
        };
        dev.channel().await;
        dev
    }

    async fn channel(&self) -> Channel {
        connect(self.port, || self.log()).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    async fn interrupt(&mut self) {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "dev exited with {status}");
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn runtime_pid(data_dir: &Path, tenant_id: &str) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("tenants").join(tenant_id).join("runtime.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `step!(name(args))` awaits one step of the test through [`tenantry_tests::step`], which
/// prints the function's name and how long it took.
macro_rules! step {
    ($step:ident($($arg:expr),* $(,)?)) => {
        tenantry_tests::step(stringify!($step), $step($($arg),*)).await
    };
}

/// One `tenantry-api dev` with two tenants (Ann's and Ben's), through every stage of their
/// lives, one step after another on the same running control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_runs_isolated_instances_end_to_end() {
    let mut local = Local::start().await;
    let (ann, ben, tenant) = step!(signup_makes_a_ready_instance(&local));
    let endpoint = tenant.endpoint.as_str();
    let https = step!(the_certificate_verifies_only_against_the_local_ca(
        &local, endpoint
    ));
    let stored = step!(instance_tokens_store_credentials_and_executions(
        &local, &https, &ann, endpoint
    ));
    step!(tokens_are_bound_to_their_tenant(
        &local, &https, &ben, endpoint
    ));
    step!(retention_changes_reach_the_running_instance(
        &local, &https, &ann, endpoint, &stored
    ));
    step!(a_crashed_runtime_is_restarted(&local, &ann, endpoint));
    let admin = step!(an_admin_signs_in_through_tenantryctl(&local));
    step!(suspend_and_resume_through_tenantryctl(
        &local, &https, &admin, &ann, endpoint, &stored
    ));
    step!(restarting_dev_brings_every_tenant_back(
        &mut local,
        &https,
        &[&ann, &ben],
        endpoint,
        &stored
    ));
    step!(a_killed_api_takes_its_runtimes_with_it(
        &mut local,
        &https,
        &[&ann, &ben],
        endpoint,
        &stored
    ));
    step!(local_state_is_private_to_its_owner(&local));
    step!(deleting_a_tenant_stops_its_runtime_and_destroys_its_data(
        &local, &admin, &ben
    ));
    local.dev.interrupt().await;
}

/// What the steps share: a running `tenantry-api dev` and its data directory.
struct Local {
    tmp: tempfile::TempDir,
    data_dir: PathBuf,
    port: u16,
    /// The API's address, for `tenantryctl --server`.
    server: String,
    dev: Dev,
    channel: Channel,
}

impl Local {
    async fn start() -> Local {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let port = free_port();
        let dev = Dev::start(&data_dir, port).await;
        let channel = dev.channel().await;
        Local {
            tmp,
            data_dir,
            port,
            server: format!("http://127.0.0.1:{port}"),
            dev,
            channel,
        }
    }

    fn runtime_pid(&self, tenant_id: &str) -> Option<u32> {
        runtime_pid(&self.data_dir, tenant_id)
    }
}

/// A signed-up user: their tenant and their session.
struct Owner {
    tenant_id: String,
    session: String,
}

/// What the instance token stored in Ann's instance: an execution from two hours ago and
/// one from now.
struct Stored {
    /// Ann's instance token.
    token: String,
    old_execution: String,
    new_execution: String,
}

/// The admin's `tenantryctl` session file and TOTP secret.
struct Admin {
    session: PathBuf,
    totp_secret: String,
}

/// Signup → instance Ready with an HTTPS endpoint and a certificate. Returns Ann, Ben and
/// Ann's tenant.
async fn signup_makes_a_ready_instance(local: &Local) -> (Owner, Owner, Tenant) {
    let channel = &local.channel;
    let (a, ann) = signup_and_login(channel, "ann@example.com", "annco").await;
    let (b, ben) = signup_and_login(channel, "ben@example.com", "benco").await;
    // The instances wait for their owners' addresses, verified with the links that dev
    // wrote, DKIM-signed, to its outbox.
    let waiting = wait_for_phase(
        channel,
        &ann,
        &a.tenant_id,
        TenantPhase::AwaitingVerification,
        Duration::from_secs(5),
    )
    .await;
    assert!(waiting.message.contains("verify"), "{}", waiting.message);
    let outbox = local.data_dir.join("outbox");
    verify_from_outbox(channel, &ann, &outbox, "ann@example.com").await;
    verify_from_outbox(channel, &ben, &outbox, "ben@example.com").await;
    let tenant = wait_for_phase(
        channel,
        &ann,
        &a.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    wait_for_phase(
        channel,
        &ben,
        &b.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        tenant.endpoint.starts_with("https://127.0.0.1:"),
        "{}",
        tenant.endpoint
    );
    let cert = tenant.certificate.clone().unwrap();
    let days = (cert.not_after.unwrap().seconds - jiff::Timestamp::now().as_second()) / 86_400;
    assert!(
        (88..=90).contains(&days),
        "90-day certificate, got {days} days"
    );
    assert!(cert.renewal_time.unwrap().seconds < cert.not_after.unwrap().seconds);
    let ann = Owner {
        tenant_id: a.tenant_id,
        session: ann,
    };
    let ben = Owner {
        tenant_id: b.tenant_id,
        session: ben,
    };
    (ann, ben, tenant)
}

/// The certificate verifies against the local CA for both of its names, and not against
/// some other CA. Returns a client trusting the local CA.
async fn the_certificate_verifies_only_against_the_local_ca(
    local: &Local,
    endpoint: &str,
) -> Https {
    let ca = std::fs::read_to_string(local.data_dir.join("ca.crt")).unwrap();
    let https = Https::new(&ca);
    for name in ["localhost", "127.0.0.1"] {
        let status = https
            .request(endpoint, name, "GET", "/readyz", None, None)
            .await
            .unwrap()
            .status;
        assert_eq!(status, 200, "{name}");
    }
    let stranger =
        tenantry_pki::CertificateAuthority::generate("someone else", jiff::Timestamp::now())
            .unwrap();
    assert!(
        Https::new(stranger.cert_pem())
            .request(endpoint, "localhost", "GET", "/readyz", None, None)
            .await
            .is_err()
    );
    https
}

/// An instance token stores a credential and executions.
async fn instance_tokens_store_credentials_and_executions(
    local: &Local,
    https: &Https,
    ann: &Owner,
    endpoint: &str,
) -> Stored {
    let token = instance_token(local, ann).await;
    let cred =
        serde_json::json!({"name": "crm", "kind": "api_key", "secret": {"key": "sk-test-123"}});
    let status = https
        .request(
            endpoint,
            "localhost",
            "POST",
            "/v1/credentials",
            Some(&token),
            Some(&cred),
        )
        .await
        .unwrap()
        .status;
    assert_eq!(status, 201);
    let now = jiff::Timestamp::now();
    let old = now
        .checked_sub(jiff::SignedDuration::from_hours(2))
        .unwrap();
    let exec = |t: jiff::Timestamp, wf: &str| {
        serde_json::json!({
            "workflow_id": wf, "status": "success", "started_at": t.to_string(), "finished_at": t.to_string(), "data": {"n": 1}
        })
    };
    let old_id = https
        .request(
            endpoint,
            "localhost",
            "POST",
            "/v1/executions",
            Some(&token),
            Some(&exec(old, "old")),
        )
        .await
        .unwrap();
    assert_eq!(old_id.status, 201);
    let new_id = https
        .request(
            endpoint,
            "localhost",
            "POST",
            "/v1/executions",
            Some(&token),
            Some(&exec(now, "new")),
        )
        .await
        .unwrap();
    assert_eq!(new_id.status, 201);
    Stored {
        token,
        old_execution: old_id.json["id"].as_str().unwrap().to_owned(),
        new_execution: new_id.json["id"].as_str().unwrap().to_owned(),
    }
}

/// A token for the other tenant is refused by this instance.
async fn tokens_are_bound_to_their_tenant(
    local: &Local,
    https: &Https,
    ben: &Owner,
    endpoint: &str,
) {
    let ben_token = instance_token(local, ben).await;
    let status = https
        .request(
            endpoint,
            "localhost",
            "GET",
            "/v1/executions",
            Some(&ben_token),
            None,
        )
        .await
        .unwrap()
        .status;
    assert_eq!(status, 401);
}

/// Retention set to one hour: the runtime picks the new config up live and prunes.
async fn retention_changes_reach_the_running_instance(
    local: &Local,
    https: &Https,
    ann: &Owner,
    endpoint: &str,
    stored: &Stored,
) {
    TenantServiceClient::new(local.channel.clone())
        .set_retention_policy(authed(
            SetRetentionPolicyRequest {
                tenant_id: ann.tenant_id.clone(),
                max_age_hours: 1,
                max_count: 100,
            },
            &ann.session,
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = execution_status(https, endpoint, stored, &stored.old_execution).await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "old execution never pruned");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = execution_status(https, endpoint, stored, &stored.new_execution).await;
    assert_eq!(status, 200, "the recent execution stays");
}

/// A runtime that crashes is restarted and comes back Ready.
async fn a_crashed_runtime_is_restarted(local: &Local, ann: &Owner, endpoint: &str) {
    let pid = local.runtime_pid(&ann.tenant_id).unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = wait_for_phase(
        &local.channel,
        &ann.session,
        &ann.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    assert_ne!(local.runtime_pid(&ann.tenant_id), Some(pid));
    assert_eq!(back.endpoint, endpoint);
}

/// Admin through tenantryctl: bootstrap, login, TOTP enrollment.
async fn an_admin_signs_in_through_tenantryctl(local: &Local) -> Admin {
    let boot = run_with_stdin(
        std::process::Command::new(bin("tenantry-api"))
            .args([
                "bootstrap-admin",
                "--email",
                "ops@example.com",
                "--data-dir",
            ])
            .arg(&local.data_dir)
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"]),
        &format!("{PASSWORD}\n"),
    );
    assert!(boot.status.success());
    let session = local.tmp.path().join("ctl-session");
    let (ok, _, err) = ctl(
        &local.server,
        &session,
        &["login", "--email", "ops@example.com", "--password-stdin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    let ops = std::fs::read_to_string(&session).unwrap();
    let ops_token = serde_json::from_str::<serde_json::Value>(&ops).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let enroll = MfaServiceClient::new(local.channel.clone())
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, &ops_token))
        .await
        .unwrap()
        .into_inner();
    MfaServiceClient::new(local.channel.clone())
        .confirm_totp_enrollment(authed(
            ConfirmTotpEnrollmentRequest {
                code: totp_now(&enroll.secret),
            },
            &ops_token,
        ))
        .await
        .unwrap();
    Admin {
        session,
        totp_secret: enroll.secret,
    }
}

/// `tenantryctl tenants suspend` stops the instance; `resume` (with a step-up) brings it
/// back with its data.
async fn suspend_and_resume_through_tenantryctl(
    local: &Local,
    https: &Https,
    admin: &Admin,
    ann: &Owner,
    endpoint: &str,
    stored: &Stored,
) {
    let (ok, out, err) = ctl(
        &local.server,
        &admin.session,
        &["tenants", "suspend", &ann.tenant_id],
        "",
    );
    assert!(ok, "suspend: {err}");
    assert!(
        out.contains("Suspended") || out.contains("suspended"),
        "{out}"
    );
    wait_for_phase(
        &local.channel,
        &ann.session,
        &ann.tenant_id,
        TenantPhase::Suspended,
        Duration::from_secs(30),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while local.runtime_pid(&ann.tenant_id).is_some_and(pid_alive) {
        assert!(Instant::now() < deadline, "suspended runtime still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        https
            .request(endpoint, "localhost", "GET", "/readyz", None, None)
            .await
            .is_err(),
        "suspended instance must not serve"
    );
    // Past the step-up window is covered in the API suite; here a fresh code is asked for
    // on the next admin call only if needed.
    next_step().await;
    let code = totp_now(&admin.totp_secret);
    let (ok, _, err) = ctl(
        &local.server,
        &admin.session,
        &["--totp-code", &code, "tenants", "resume", &ann.tenant_id],
        "",
    );
    assert!(ok, "resume: {err}");
    wait_for_phase(
        &local.channel,
        &ann.session,
        &ann.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let status = execution_status(https, endpoint, stored, &stored.new_execution).await;
    assert_eq!(status, 200, "data kept across suspension");
    let (ok, out, _) = ctl(
        &local.server,
        &admin.session,
        &["-o", "json", "audit", "verify"],
        "",
    );
    assert!(ok, "{out}");
}

/// Restarting dev brings every tenant back; Ctrl-C leaves no runtime behind.
async fn restarting_dev_brings_every_tenant_back(
    local: &mut Local,
    https: &Https,
    owners: &[&Owner],
    endpoint: &str,
    stored: &Stored,
) {
    let pids: Vec<u32> = owners
        .iter()
        .filter_map(|o| local.runtime_pid(&o.tenant_id))
        .collect();
    assert_eq!(pids.len(), 2);
    local.dev.interrupt().await;
    for pid in &pids {
        assert!(!pid_alive(*pid), "runtime {pid} left running after Ctrl-C");
    }
    local.dev = Dev::start(&local.data_dir, local.port).await;
    local.channel = local.dev.channel().await;
    let ann = owners[0];
    let again = wait_for_phase(
        &local.channel,
        &ann.session,
        &ann.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(again.endpoint, endpoint);
    let status = execution_status(https, &again.endpoint, stored, &stored.new_execution).await;
    assert_eq!(status, 200, "data kept across restarts");
}

/// SIGKILL of `tenantry-api dev` (no cleanup at all) still stops every runtime within
/// 5 s: each holds the read end of a pipe whose write end died with the API
/// (`--exit-on-stdin-close`). Nothing is lost, and the next start brings them back.
async fn a_killed_api_takes_its_runtimes_with_it(
    local: &mut Local,
    https: &Https,
    owners: &[&Owner],
    endpoint: &str,
    stored: &Stored,
) {
    let pids: Vec<u32> = owners
        .iter()
        .filter_map(|o| local.runtime_pid(&o.tenant_id))
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    local.dev.child.start_kill().unwrap();
    local.dev.child.wait().await.unwrap();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(5);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "runtimes still running 5 s after the API was killed: {:?}",
            pids.iter().filter(|p| pid_alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("    runtimes gone {:?} after the SIGKILL", killed.elapsed());

    local.dev = Dev::start(&local.data_dir, local.port).await;
    local.channel = local.dev.channel().await;
    for owner in owners {
        let back = wait_for_phase(
            &local.channel,
            &owner.session,
            &owner.tenant_id,
            TenantPhase::Ready,
            Duration::from_secs(60),
        )
        .await;
        let pid = local.runtime_pid(&owner.tenant_id).unwrap();
        assert!(
            pid_alive(pid) && !pids.contains(&pid),
            "a new runtime for {}",
            owner.tenant_id
        );
        if back.endpoint == endpoint {
            let status = execution_status(https, endpoint, stored, &stored.new_execution).await;
            assert_eq!(status, 200, "data kept across the kill");
        }
    }
    // The API's own data survived too: the sessions from before the kill still work.
    for owner in owners {
        TenantServiceClient::new(local.channel.clone())
            .get_tenant(authed(
                GetTenantRequest {
                    tenant_id: owner.tenant_id.clone(),
                },
                &owner.session,
            ))
            .await
            .unwrap();
    }
}

/// Only the owner can read the local state: the data directory (made 0755 by this test,
/// narrowed at start) is 0700, the database, its WAL and shared-memory files are 0600.
async fn local_state_is_private_to_its_owner(local: &Local) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&local.data_dir), 0o700);
    for file in [
        "tenantry.db",
        "tenantry.db-wal",
        "tenantry.db-shm",
        "master.key",
    ] {
        assert_eq!(mode(&local.data_dir.join(file)), 0o600, "{file}");
    }
}

/// Delete stops the process and destroys the tenant's key and data.
async fn deleting_a_tenant_stops_its_runtime_and_destroys_its_data(
    local: &Local,
    admin: &Admin,
    ben: &Owner,
) {
    next_step().await;
    let code = totp_now(&admin.totp_secret);
    let pid = local.runtime_pid(&ben.tenant_id).unwrap();
    let (ok, _, err) = ctl(
        &local.server,
        &admin.session,
        &[
            "--totp-code",
            &code,
            "tenants",
            "delete",
            &ben.tenant_id,
            "--yes",
        ],
        "",
    );
    assert!(ok, "delete: {err}");
    let tenant_dir = local.data_dir.join("tenants").join(&ben.tenant_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tenant_dir.exists() || pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "deleted tenant's process or data remain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = TenantServiceClient::new(local.channel.clone())
        .get_tenant(authed(
            GetTenantRequest {
                tenant_id: ben.tenant_id.clone(),
            },
            &ben.session,
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
}

/// An instance token for the owner's tenant, issued by the API.
async fn instance_token(local: &Local, owner: &Owner) -> String {
    TenantServiceClient::new(local.channel.clone())
        .issue_instance_token(authed(
            IssueInstanceTokenRequest {
                tenant_id: owner.tenant_id.clone(),
            },
            &owner.session,
        ))
        .await
        .unwrap()
        .into_inner()
        .token
}

/// The status of `GET /v1/executions/{id}` on `endpoint`, with the stored instance token.
async fn execution_status(https: &Https, endpoint: &str, stored: &Stored, id: &str) -> u16 {
    https
        .request(
            endpoint,
            "localhost",
            "GET",
            &format!("/v1/executions/{id}"),
            Some(&stored.token),
            None,
        )
        .await
        .unwrap()
        .status
}

/// The serial of the certificate an endpoint presents.
async fn served_serial(endpoint: &str, ca_pem: &str) -> String {
    let conn = Https::new(ca_pem)
        .connect(endpoint, "localhost")
        .await
        .unwrap();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        data_encoding::BASE64.encode(&conn.peer_cert)
    );
    tenantry_pki::parse_certificate(&pem).unwrap().serial_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_certificates_are_renewed_in_place_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    // A 30-second certificate is renewed after 20 seconds (two thirds of its life).
    let mut dev = Dev::start_with(&data_dir, port, &["--local-cert-validity", "30s"]).await;
    let channel = dev.channel().await;
    let (a, cat) = signup_and_login(&channel, "cat@example.com", "catco").await;
    verify_from_outbox(&channel, &cat, &data_dir.join("outbox"), "cat@example.com").await;
    let first = wait_for_phase(
        &channel,
        &cat,
        &a.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let first_serial = first.certificate.unwrap().serial;
    let pid = runtime_pid(&data_dir, &a.tenant_id).unwrap();
    let ca = std::fs::read_to_string(data_dir.join("ca.crt")).unwrap();
    assert_eq!(served_serial(&first.endpoint, &ca).await, first_serial);

    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        let t = wait_for_phase(
            &channel,
            &cat,
            &a.tenant_id,
            TenantPhase::Ready,
            Duration::from_secs(30),
        )
        .await;
        let serial = t.certificate.unwrap().serial;
        if serial != first_serial {
            break serial;
        }
        assert!(Instant::now() < deadline, "certificate never renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The runtime picks up the new files itself: same process, new certificate served.
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_serial(&first.endpoint, &ca).await != renewed {
        assert!(
            Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        runtime_pid(&data_dir, &a.tenant_id),
        Some(pid),
        "renewal must not restart the runtime"
    );
    assert!(pid_alive(pid));
    dev.interrupt().await;
}

/// `dev --backup-dir`: the API backs the control database up and every runtime its own
/// store, at once on start and then on the schedule; `tenantry-api backups` and the API's
/// metrics report the newest of each and whether it is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_backs_up_the_control_database_and_every_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let keys = tmp.path().join("keys");
    let out = std::process::Command::new(bin("tenantry-api"))
        .args(["backup-keygen", "--out-dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let backups = tmp.path().join("backups");
    let metrics_port = free_port();
    let port = free_port();
    let dev = Dev::start_with(
        &data_dir,
        port,
        &[
            "--backup-dir",
            backups.to_str().unwrap(),
            "--backup-recipient-file",
            keys.join("backup.pub").to_str().unwrap(),
            "--backup-interval",
            "1h",
            "--backup-keep",
            "3",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    )
    .await;
    let channel = dev.channel().await;
    let (signed, session) = signup_and_login(&channel, "cora@example.com", "coraco").await;
    verify_from_outbox(
        &channel,
        &session,
        &data_dir.join("outbox"),
        "cora@example.com",
    )
    .await;
    wait_for_phase(
        &channel,
        &session,
        &signed.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let tenant_dir = backups.join("tenants").join(&signed.tenant_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tenantry_backup::list(&tenant_dir).unwrap().is_empty()
        || tenantry_backup::list(&backups.join("control"))
            .unwrap()
            .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no backups after 30 s: {}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = std::process::Command::new(bin("tenantry-api"))
        .args(["backups", "--json", "--interval", "1h", "--dir"])
        .arg(&backups)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let newest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<(String, String)> = newest
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["kind"].as_str().unwrap().to_owned(),
                n["tenant_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("control-database".to_owned(), String::new()),
            ("tenant-data".to_owned(), signed.tenant_id.clone())
        ]
    );
    let metrics = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).await.unwrap();
        body
    };
    for kind in ["control-database", "tenant-data"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("tenantry_api_backup_stale") && l.contains(kind))
            .unwrap_or_else(|| panic!("no stale gauge for {kind}: {metrics}"));
        assert!(line.ends_with(" 0"), "{line}");
    }
    // Each backup opens with the identity; the tenant's holds its store.
    let identities = tenantry_backup::Identities::load(&keys.join("backup.key")).unwrap();
    for dir in [backups.join("control"), tenant_dir] {
        let found = tenantry_backup::list(&dir).unwrap();
        let mut reader = tenantry_backup::Reader::open(&found[0].path, &identities).unwrap();
        while reader.next_record().unwrap().is_some() {}
    }
    let mut dev = dev;
    dev.interrupt().await;
}

/// Enrolls TOTP on the session; returns the secret.
async fn enroll_totp(channel: &Channel, session: &str) -> String {
    let mut mfa = MfaServiceClient::new(channel.clone());
    let begin = mfa
        .begin_totp_enrollment(authed(BeginTotpEnrollmentRequest {}, session))
        .await
        .unwrap()
        .into_inner();
    mfa.confirm_totp_enrollment(authed(
        ConfirmTotpEnrollmentRequest {
            code: totp_now(&begin.secret),
        },
        session,
    ))
    .await
    .unwrap();
    begin.secret
}

/// Logs `email` in and verifies `code` on the new session.
async fn login_with_code(channel: &Channel, email: &str, code: String) -> Result<(), String> {
    let session = tenantry_tests::try_login(channel, email)
        .await
        .map_err(|e| format!("login {email}: {e}"))?;
    MfaServiceClient::new(channel.clone())
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(verify_mfa_request::Factor::Code(code)),
            },
            &session,
        ))
        .await
        .map(|_| ())
        .map_err(|e| format!("verify {email}: {e}"))
}

/// `tenantry-api rotate-master-key` and `master-keys status`, the real binaries, against a
/// running `dev` with logins going on; then the old key leaves the key file and a
/// restarted `dev` opens every secret with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_rotates_the_master_key_while_it_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    let reload = [
        "--master-key-reload-interval",
        "1s",
        // Logins as fast as the test can make them.
        "--rate-limit-per-second",
        "0",
    ];
    let mut dev = Dev::start_with(&data_dir, port, &reload).await;
    let channel = dev.channel().await;
    let mut secrets = Vec::new();
    for who in ["ria", "sam"] {
        let email = format!("{who}@example.com");
        let (_, session) = signup_and_login(&channel, &email, &format!("{who}co")).await;
        secrets.push((email, enroll_totp(&channel, &session).await));
    }
    let key_file = data_dir.join("master.key");
    let old_key = std::fs::read_to_string(&key_file).unwrap();

    // Password logins throughout (every one reads the user's row, sealed secret and all).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (channel, stop) = (channel.clone(), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for email in ["ria@example.com", "sam@example.com"] {
                    match tenantry_tests::try_login(&channel, email).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{email}: {e}")),
                    }
                }
            }
            (ok, failed)
        })
    };

    let new_key = tmp.path().join("next.key");
    let out = std::process::Command::new(bin("tenantry-api"))
        .args([
            "rotate-master-key",
            "--json",
            "--batch-size",
            "1",
            "--data-dir",
        ])
        .arg(&data_dir)
        .arg("--new-key-file")
        .arg(&new_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", dev.log());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["servers"], 1, "{report}");
    assert_eq!(
        report["resealed"]["users.totp_secret_sealed"], 2,
        "{report}"
    );
    let new_id = report["key_id"].as_str().unwrap().to_owned();
    let old_id = report["previous_primary"].as_str().unwrap().to_owned();

    // TOTP works for both (the next step's code: the enrollment used this one).
    for (email, secret) in &secrets[..1] {
        login_with_code(&channel, email, totp_ahead(secret, 1))
            .await
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 0);

    let status = std::process::Command::new(bin("tenantry-api"))
        .args(["master-keys", "status", "--json", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let total = |id: &str| {
        status["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .map(|k| k["total"].as_u64().unwrap())
    };
    assert_eq!(total(&old_id), Some(0), "{status}");
    // Two TOTP secrets and the instance-token signing key.
    assert_eq!(total(&new_id), Some(3), "{status}");

    // The old key leaves the file; a restarted dev opens everything with the new one.
    std::fs::write(&key_file, std::fs::read_to_string(&new_key).unwrap()).unwrap();
    dev.interrupt().await;
    let mut dev = Dev::start_with(&data_dir, port, &reload).await;
    let channel = dev.channel().await;
    let (email, secret) = &secrets[1];
    login_with_code(&channel, email, totp_ahead(secret, 1))
        .await
        .unwrap();
    let log = dev.log();
    assert!(
        !log.contains(old_key.trim())
            && !log.contains(std::fs::read_to_string(&new_key).unwrap().trim())
    );
    dev.interrupt().await;
}

/// The certificate a server presented, as PEM.
fn peer_pem(der: &[u8]) -> String {
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        data_encoding::BASE64.encode(der)
    )
}

/// `dev rotate-ca` (and `rotate-local-ca`) while `dev` runs and HTTPS clients call an instance throughout, each
/// new connection trusting `ca.crt` as it reads it then (a client that follows the
/// bundle): no request fails; `ca.crt` holds both CAs during the window; the instance
/// serves a certificate from the new CA without a restart; then the old CA leaves
/// `ca.crt` and a client that trusts only it is refused. Both steps are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ca_rotation_with_traffic_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    let mut dev = Dev::start(&data_dir, port).await;
    let channel = dev.channel().await;
    let (a, owner) = signup_and_login(&channel, "rota@example.com", "rotaco").await;
    verify_from_outbox(
        &channel,
        &owner,
        &data_dir.join("outbox"),
        "rota@example.com",
    )
    .await;
    let ready = wait_for_phase(
        &channel,
        &owner,
        &a.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let endpoint = ready.endpoint.clone();
    let ca_file = data_dir.join("ca.crt");
    let old_ca = std::fs::read_to_string(&ca_file).unwrap();
    let old_fp = tenantry_pki::fingerprint(&old_ca).unwrap();
    let pid = runtime_pid(&data_dir, &a.tenant_id).unwrap();

    // Two clients, each request on a new connection that trusts ca.crt as read now.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, ca_file, endpoint) = (stop.clone(), ca_file.clone(), endpoint.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut leaves) = (0u32, Vec::new(), Vec::<String>::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let bundle = std::fs::read_to_string(&ca_file).unwrap_or_default();
                match Https::new(&bundle).connect(&endpoint, "localhost").await {
                    Ok(mut conn) => match conn.send("GET", "/readyz", None, None, vec![]).await {
                        Ok(r) if r.status == 200 => {
                            ok += 1;
                            let leaf = peer_pem(&conn.peer_cert);
                            if !leaves.contains(&leaf) {
                                leaves.push(leaf);
                            }
                        }
                        Ok(r) => failed.push(format!("status {}: {}", r.status, r.text)),
                        Err(e) => failed.push(format!("request: {e}")),
                    },
                    Err(e) => failed.push(format!("connect: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, leaves)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = std::process::Command::new(bin("tenantry-api"))
        // The issue's spelling; `rotate-local-ca` (below) is the same command.
        .args(["dev", "rotate-ca", "--json", "--ca-rotation-window", "6s"])
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_fp = report["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(report["previous_fingerprint"], old_fp.as_str());
    assert_ne!(new_fp, old_fp);
    // The overlap: ca.crt holds the new CA and the old one.
    let bundle = tenantry_pki::split_bundle(&std::fs::read_to_string(&ca_file).unwrap()).unwrap();
    let fps: Vec<String> = bundle
        .iter()
        .map(|c| tenantry_pki::fingerprint(c).unwrap())
        .collect();
    assert_eq!(fps, [new_fp.clone(), old_fp.clone()]);
    let new_ca = bundle[0].clone();
    // A second rotation waits for this one.
    let again = std::process::Command::new(bin("tenantry-api"))
        .args(["rotate-local-ca", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!again.status.success());

    // The instance serves a certificate from the new CA (re-issued within the window, read
    // by the runtime without a restart)...
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let served = Https::new(&std::fs::read_to_string(&ca_file).unwrap())
            .connect(&endpoint, "localhost")
            .await
            .map(|c| peer_pem(&c.peer_cert));
        if served.is_ok_and(|leaf| tenantry_pki::signed_by(&new_ca, &leaf)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served a leaf from the new CA\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...then the old CA leaves ca.crt.
    let deadline = Instant::now() + Duration::from_secs(40);
    while tenantry_pki::split_bundle(&std::fs::read_to_string(&ca_file).unwrap())
        .unwrap()
        .len()
        > 1
    {
        assert!(
            Instant::now() < deadline,
            "the old CA was never retired\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        tenantry_pki::fingerprint(&std::fs::read_to_string(&ca_file).unwrap()).unwrap(),
        new_fp
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    let mut leaves = Vec::new();
    for client in clients {
        let (ok, failed, seen) = client.await.unwrap();
        assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
        total += ok;
        leaves.extend(seen);
    }
    assert!(total > 20, "only {total} requests");
    assert!(leaves.iter().any(|l| tenantry_pki::signed_by(&old_ca, l)));
    assert!(leaves.iter().any(|l| tenantry_pki::signed_by(&new_ca, l)));
    // A client that trusts only the retired CA is refused now.
    assert!(
        Https::new(&old_ca)
            .connect(&endpoint, "localhost")
            .await
            .is_err()
    );
    assert_eq!(
        runtime_pid(&data_dir, &a.tenant_id),
        Some(pid),
        "the rotation must not restart the runtime"
    );
    assert!(
        !std::fs::read_to_string(data_dir.join("ca.key"))
            .unwrap()
            .is_empty()
    );
    assert!(!dev.log().contains("PRIVATE KEY"));
    dev.interrupt().await;

    // Both steps are in the audit log.
    let store = tenantry_api::store::Store::connect(
        &format!("sqlite://{}", data_dir.join("tenantry.db").display()),
        1,
    )
    .await
    .unwrap();
    let rows = store.list_audit(0, 10_000).await.unwrap();
    let rotate = rows
        .iter()
        .find(|r| r.entry.action == "local_ca.rotate")
        .expect("the rotation is audited");
    assert_eq!(rotate.entry.target, new_fp);
    let retire = rows
        .iter()
        .find(|r| r.entry.action == "local_ca.retire")
        .expect("the retirement is audited");
    assert_eq!(retire.entry.target, old_fp);
    assert!(rotate.entry.sequence < retire.entry.sequence);
    store.close().await;
}
