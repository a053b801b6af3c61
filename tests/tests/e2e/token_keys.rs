//! A token key rotation end to end on one machine, with traffic running throughout: the
//! real `tenantry-api dev` (local provisioner, a real `tenant-runtime`), clients that mint
//! instance tokens over gRPC and call the instance with them without pause, and the real
//! `tenantry-api rotate-token-key` run in the middle. Not one request may fail and not one
//! token be refused; tokens minted after the switch name the new key; once the old key
//! retires it is gone from the runtime's key file and a token it signed is refused.
//!
//! A real rotation waits at least 16 minutes twice. Here tokens live 3 s, the overlap is
//! 8 s (through the hidden test-only floor of `rotate-token-key`), and the API rereads the
//! ring and the runtime its key file every second: the same sequence, scaled down.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tenantry_proto::token::TokenVerifier;
use tenantry_proto::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::v1::*;
use tenantry_test_support::{Https, free_port, token_kid};
use tenantry_tests::{authed, bin, connect, signup_and_login, wait_for_phase};
use tonic::transport::Channel;

/// The rotation's overlap: longer than a token lives (3 s) plus the time the new set takes
/// to reach the runtime (a 1 s refresh, then a 1 s reload).
const OVERLAP: &str = "8s";

async fn mint(channel: &Channel, session: &str, tenant_id: &str) -> Result<String, tonic::Status> {
    TenantServiceClient::new(channel.clone())
        .issue_instance_token(authed(
            IssueInstanceTokenRequest {
                tenant_id: tenant_id.into(),
            },
            session,
        ))
        .await
        .map(|r| r.into_inner().token)
}

/// What one client saw.
#[derive(Default, Debug)]
struct Seen {
    requests: u64,
    /// Requests that did not get a 200 (the status and the body's message).
    failures: Vec<String>,
    /// Every token used, with when it was minted and its kid.
    tokens: Vec<(Instant, String)>,
}

/// Mints a token, calls the instance with it for about a second, mints the next, until
/// `stop`.
async fn client(
    channel: Channel,
    https: Https,
    session: String,
    tenant_id: String,
    endpoint: String,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let token = match mint(&channel, &session, &tenant_id).await {
            Ok(token) => token,
            Err(status) => {
                seen.failures.push(format!("minting: {status}"));
                continue;
            }
        };
        seen.tokens.push((Instant::now(), token_kid(&token)));
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            seen.requests += 1;
            match https
                .request(
                    &endpoint,
                    "localhost",
                    "GET",
                    "/v1/executions",
                    Some(&token),
                    None,
                )
                .await
            {
                Ok(r) if r.status == 200 => {}
                Ok(r) => seen.failures.push(format!("{}: {}", r.status, r.json)),
                Err(e) => seen.failures.push(format!("transport: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    seen
}

fn key_file_kids(path: &Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap();
    TokenVerifier::from_public_key_pem(&pem)
        .unwrap()
        .kids()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Waits until `done` holds, up to `within`.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

fn rotate(data_dir: &Path) -> serde_json::Value {
    let out = std::process::Command::new(bin("tenantry-api"))
        .args(["rotate-token-key", "--json", "--data-dir"])
        .arg(data_dir)
        .args(["--token-key-overlap", OVERLAP])
        .args(["--test-only-min-token-key-overlap", "5s"])
        .env("TENANTRY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rotate-token-key failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Dev {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Dev {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_key_rotation_under_traffic_refuses_no_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    let log = tmp.path().join("dev.log");
    let child = tokio::process::Command::new(bin("tenantry-api"))
        .args(["dev", "--no-portal", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .args(["--require-email-verification=false"])
        .args(["--instance-token-ttl", "3s"])
        .args(["--token-key-refresh-interval", "1s"])
        // The runtimes it starts inherit this: they reread their key file every second.
        .env("TENANTRY_RUNTIME_RELOAD_SECS", "1")
        .env("TENANTRY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut dev = Dev { child, log };
    let channel = connect(port, || dev.log()).await;
    let (ids, session) = signup_and_login(&channel, "rosa@example.com", "rosaco").await;
    let tenant = wait_for_phase(
        &channel,
        &session,
        &ids.tenant_id,
        TenantPhase::Ready,
        Duration::from_secs(60),
    )
    .await;
    let https = Https::new(&std::fs::read_to_string(data_dir.join("ca.crt")).unwrap());
    let key_file = data_dir.join("token-public.pem");
    let first = mint(&channel, &session, &ids.tenant_id).await.unwrap();
    let old_kid = token_kid(&first);
    assert_eq!(key_file_kids(&key_file), [old_kid.as_str()]);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(client(
                channel.clone(),
                https.clone(),
                session.clone(),
                ids.tenant_id.clone(),
                tenant.endpoint.clone(),
                Arc::clone(&stop),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let rotation = rotate(&data_dir);
    let rotated_at = Instant::now();
    let new_kid = rotation["kid"].as_str().unwrap().to_owned();
    assert_eq!(rotation["superseded"], serde_json::json!([old_kid]));
    let signs_from = Duration::from_millis(
        u64::try_from(
            rotation["signs_from_ms"].as_i64().unwrap() - jiff::Timestamp::now().as_millisecond(),
        )
        .unwrap_or(0),
    );
    let retires_in = Duration::from_millis(
        u64::try_from(
            rotation["retires_at_ms"].as_i64().unwrap() - jiff::Timestamp::now().as_millisecond(),
        )
        .unwrap_or(0),
    );

    // Published before it signs: the runtime's file holds both keys.
    assert!(
        eventually(Duration::from_secs(5), || key_file_kids(&key_file)
            == [old_kid.clone(), new_kid.clone()])
        .await,
        "the new key was not published; file holds {:?}",
        key_file_kids(&key_file)
    );
    assert!(
        rotated_at.elapsed() < signs_from,
        "published only after the switch"
    );
    // The last token of the old key, kept to be refused once the key retires.
    tokio::time::sleep(
        signs_from.saturating_sub(rotated_at.elapsed() + Duration::from_millis(700)),
    )
    .await;
    let last_old = mint(&channel, &session, &ids.tenant_id).await.unwrap();
    assert_eq!(token_kid(&last_old), old_kid, "switched before signs_from");

    // Past the switch, the whole overlap after it, and the old key's retirement.
    tokio::time::sleep(retires_in.saturating_sub(rotated_at.elapsed()) + Duration::from_secs(1))
        .await;
    assert!(
        eventually(Duration::from_secs(5), || key_file_kids(&key_file)
            == [new_kid.clone()])
        .await,
        "the old key is still published: {:?}",
        key_file_kids(&key_file)
    );
    // Traffic goes on a little with the set reduced to the new key.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    let mut failures = Vec::new();
    let mut tokens = Vec::new();
    for c in clients {
        let seen = c.await.unwrap();
        requests += seen.requests;
        failures.extend(seen.failures);
        tokens.extend(seen.tokens);
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(requests > 100, "too little traffic: {requests} requests");
    let switch = rotated_at + signs_from;
    let slack = Duration::from_millis(500);
    for (minted, kid) in &tokens {
        if *minted + slack < switch {
            assert_eq!(kid, &old_kid, "a token minted before signs_from");
        } else if *minted > switch + slack {
            assert_eq!(kid, &new_kid, "a token minted after signs_from");
        }
    }
    assert!(tokens.iter().any(|(_, k)| *k == old_kid));
    assert!(tokens.iter().any(|(_, k)| *k == new_kid));

    // The retired key's token is refused for its key (not its age: it is within the
    // expiry skew), and the status shows the key retired.
    let r = https
        .request(
            &tenant.endpoint,
            "localhost",
            "GET",
            "/v1/executions",
            Some(&last_old),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.json["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not accept"),
        "{}",
        r.json
    );
    let status = std::process::Command::new(bin("tenantry-api"))
        .args(["token-keys", "--json", "--data-dir"])
        .arg(&data_dir)
        .env("TENANTRY_LOG", "warn")
        .output()
        .unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let states: Vec<(&str, &str)> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["kid"].as_str().unwrap(), k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(old_kid.as_str(), "retired"), (new_kid.as_str(), "signing")]
    );
    assert!(dev.log().contains("retired an instance-token key"));

    let pid = dev.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), dev.child.wait()).await;
}
