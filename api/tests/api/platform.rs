//! Health, reflection, an unreachable database, the real binary (`serve`,
//! `bootstrap-admin`), and what reaches the process logs.

use std::io::Write as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantry_proto::v1::*;
use tenantry_test_support::free_port;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::common::*;

async fn health(channel: tonic::transport::Channel, service: &str) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn health_is_serving_and_turns_not_serving_when_the_database_goes_away() {
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let mut status = 0;
    for _ in 0..50 {
        status = health(s.channel.clone(), "").await.unwrap();
        if status == ServingStatus::Serving as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::Serving as i32);
    assert_eq!(
        health(s.channel.clone(), "tenantry.v1.AdminService")
            .await
            .unwrap(),
        ServingStatus::Serving as i32
    );

    // The database disappears: calls fail cleanly with UNAVAILABLE and health follows.
    s.state.store.close().await;
    let st = expect_code(
        s.accounts()
            .login(LoginRequest {
                email: "a@example.com".into(),
                password: PASSWORD.into(),
            })
            .await,
        Code::Unavailable,
    );
    assert!(st.message().contains("database unavailable"));
    expect_code(
        s.accounts()
            .who_am_i(authed(WhoAmIRequest {}, "some-token"))
            .await,
        Code::Unavailable,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = health(s.channel.clone(), "").await.unwrap();
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never turned NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt as _;
    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let expected = [
        "tenantry.v1.AccountService",
        "tenantry.v1.MfaService",
        "tenantry.v1.TenantService",
        "tenantry.v1.AdminService",
        "grpc.health.v1.Health",
    ];
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(s.channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("{resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for e in expected {
            assert!(
                names.iter().any(|n| n == e),
                "v1 reflection lacks {e}: {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(s.channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("{resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for e in expected {
            assert!(
                names.iter().any(|n| n == e),
                "v1alpha reflection lacks {e}: {names:?}"
            );
        }
    }
    s.stop().await;
}

/// A `MakeWriter` that keeps everything logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// One thread, so every task of the server logs through this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn no_password_token_secret_or_code_reaches_the_logs() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = Database::new().await;
    let s = TestServer::start(&db).await;
    let (_, tenant_id) = s.signup("uma@example.com", "umaco").await;
    let _ = s
        .accounts()
        .login(LoginRequest {
            email: "uma@example.com".into(),
            password: "wrong-Password-123".into(),
        })
        .await;
    let token = s.login("uma@example.com").await;
    let (secret, codes) = s.enroll(&token).await;
    let _ = s
        .mfa()
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(verify_mfa_request::Factor::RecoveryCode(codes[0].clone())),
            },
            &token,
        ))
        .await;
    let _ = s
        .mfa()
        .verify_mfa(authed(
            VerifyMfaRequest {
                factor: Some(verify_mfa_request::Factor::Code("123456".into())),
            },
            &token,
        ))
        .await;
    s.accounts()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "maple-Quartz-58-ferry".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    let _ = s
        .tenants()
        .get_tenant(authed(GetTenantRequest { tenant_id }, &token))
        .await;
    s.stop().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!text.is_empty(), "the capture must see the server's logs");
    for secret_text in [
        PASSWORD,
        "wrong-Password-123",
        "maple-Quartz-58-ferry",
        token.as_str(),
        secret.as_str(),
    ] {
        assert!(!text.contains(secret_text), "logs contain a secret");
    }
    for code in &codes {
        assert!(
            !text.contains(code.as_str()),
            "logs contain a recovery code"
        );
    }
}

#[tokio::test]
async fn the_binary_serves_bootstraps_an_admin_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/data/tenantry.db", dir.path().display());
    let bin = env!("CARGO_BIN_EXE_tenantry-api");

    // bootstrap-admin creates the database, the master key (0600) and the admin.
    let mut child = std::process::Command::new(bin)
        .args([
            "bootstrap-admin",
            "--email",
            "ops@example.com",
            "--database-url",
            &db_url,
        ])
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created admin ops@example.com"));
    let key = dir.path().join("data/master.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("created a new master key"));

    // A weak password is refused with a clear message and a non-zero exit.
    let mut child = std::process::Command::new(bin)
        .args([
            "bootstrap-admin",
            "--email",
            "weak@example.com",
            "--database-url",
            &db_url,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"123456789012\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password"));

    // serve, through the environment variables.
    let port = free_port();
    let mut server = tokio::process::Command::new(bin)
        .arg("serve")
        .env("TENANTRY_LISTEN", format!("127.0.0.1:{port}"))
        .env("TENANTRY_DATABASE_URL", &db_url)
        // The local outbox and its DKIM key go to the data directory, not the source tree.
        .env("TENANTRY_DATA_DIR", dir.path().join("data"))
        .env("TENANTRY_ARGON2_MEMORY_KIB", "1024")
        .env("TENANTRY_ARGON2_ITERATIONS", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(c) = tenantry_client::connect(&endpoint, tenantry_client::Trust::default()).await
        {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = channel.expect("server did not start");
    let mut accounts = account_service_client::AccountServiceClient::new(channel.clone());
    let login = accounts
        .login(LoginRequest {
            email: "ops@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let me = accounts
        .who_am_i(authed(WhoAmIRequest {}, &login.session_token))
        .await
        .unwrap()
        .into_inner();
    assert!(me.roles.contains(&"admin".to_owned()));
    // No second factor yet: admin calls ask for it.
    let st = expect_code(
        admin_service_client::AdminServiceClient::new(channel)
            .list_tenants(authed(ListTenantsRequest::default(), &login.session_token))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(reason(&st), "MFA_REQUIRED");

    // Only the owner can reach the data: the directory is 0700, the database and its
    // write-ahead log and shared memory (both exist while the server runs) are 0600.
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data"), 0o700);
    for file in ["tenantry.db", "tenantry.db-wal", "tenantry.db-shm"] {
        assert_eq!(mode(&format!("data/{file}")), 0o600, "{file}");
    }

    let pid = server.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt as _;
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(!stderr.contains(PASSWORD) && !stderr.contains(&login.session_token));

    // A key file other users can read stops the start, with the fix in the message.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db_url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is accessible by other users (mode 644)")
            && stderr.contains(&format!("chmod 600 {}", key.display())),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A bad database URL fails at start with a clear message.
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--database-url",
            "mysql://nope",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sqlite:// or postgres://"));
}

#[tokio::test]
async fn default_argon2_parameters_meet_owasp_and_are_used() {
    let db = Database::new().await;
    ensure_master_key(&db);
    let args = serve_args(
        &db,
        &[
            "--argon2-memory-kib".into(),
            "19456".into(),
            "--argon2-iterations".into(),
            "2".into(),
        ],
    );
    let state = tenantry_api::server::build_state(
        &args,
        Arc::new(tenantry_api::clock::ManualClock::new(T0_MS)),
    )
    .await
    .unwrap();
    let hash = state
        .hashing(|h| h.hash(&secrecy::SecretString::from(PASSWORD.to_owned())))
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
}
