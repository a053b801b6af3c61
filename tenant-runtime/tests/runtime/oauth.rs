//! OAuth 2 grants against a real authorization server: Authlib's AuthorizationServer
//! (`tests/oauth2_server/server.py`, PKCE required, refresh-token rotation, RFC 7009
//! revocation) on loopback over HTTPS with a certificate made here, which the runtime
//! trusts through `oauth2.ca_file`. The server reports what it issued, so the tests can
//! look for every real access and refresh token on disk and in the TRACE log.
//!
//! The tests skip (saying so) only when `python3` cannot be run at all and `CI` is not
//! set; a missing Authlib fails them with the command that installs it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tenant_runtime::keystore::Keyring;
use tenant_runtime::store::{GrantUnavailable, Store};
use tenantry_test_support::{Https, eventually_some};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

use crate::common::{self, Instance, Options, contains, log_capture, read_tree};

const REDIRECT: &str = "https://app.example.test/oauth2/callback";
const CLIENT_ID: &str = "tenantry-test-client";
const CLIENT_SECRET: &str = "cs-OAUTH-CLIENT-SECRET-3f9a1c";
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oauth2_server/server.py");
const REQUIREMENTS: &str = "tenant-runtime/tests/oauth2_server/requirements.txt";

/// The Authlib server, running until dropped.
struct AuthServer {
    _child: Child,
    port: u16,
    https: Https,
    ca_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Whether the server can run here; `false` (after saying why) means skip.
fn python_ready() -> bool {
    match std::process::Command::new("python3")
        .args(["-c", "import authlib, flask"])
        .output()
    {
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 cannot be run in CI ({e}); the OAuth tests need it"
            );
            eprintln!("SKIPPED: python3 cannot be run ({e}); the OAuth 2 tests need it");
            false
        }
        Ok(out) => {
            assert!(
                out.status.success(),
                "Authlib is missing: python3 -m pip install -r {REQUIREMENTS}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            true
        }
    }
}

impl AuthServer {
    /// Starts the server with access tokens living `expires_in` seconds.
    async fn start(expires_in: u64) -> Option<AuthServer> {
        if !python_ready() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = common::new_ca();
        let (cert, key, _) = common::new_leaf(&ca);
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let mut child = Command::new("python3")
            .arg(SERVER)
            .arg("--cert")
            .arg(dir.path().join("cert.pem"))
            .arg("--key")
            .arg(dir.path().join("key.pem"))
            .args([
                "--client",
                &format!("{CLIENT_ID}:{CLIENT_SECRET}:{REDIRECT}"),
            ])
            .args(["--expires-in", &expires_in.to_string()])
            .args(["--redirect-to", "https://evil.test:9/token"])
            // The server stops when its stdin closes, i.e. when this handle is dropped.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the OAuth server starts within 30 s")
            .unwrap()
            .expect("the OAuth server prints its port");
        let port = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Some(AuthServer {
            _child: child,
            port,
            https: Https::new(&ca.pem()),
            ca_path,
            _dir: dir,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    async fn request(&self, method: &str, path: &str) -> tenantry_test_support::Response {
        self.https
            .request(
                &format!("127.0.0.1:{}", self.port),
                "localhost",
                method,
                path,
                None,
                None,
            )
            .await
            .unwrap()
    }

    /// What the server issued, counted and revoked.
    async fn state(&self) -> Value {
        let r = self.request("GET", "/test/state").await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json
    }

    /// Every access and refresh token the server ever issued.
    async fn issued_tokens(&self) -> Vec<String> {
        let state = self.state().await;
        let mut out = Vec::new();
        for t in state["tokens"].as_array().unwrap() {
            for key in ["access_token", "refresh_token"] {
                if let Some(v) = t[key].as_str() {
                    out.push(v.to_owned());
                }
            }
        }
        out
    }

    /// The user consents: follows the authorization URL the runtime handed out and
    /// returns the query of the redirect back to the app (`code=…&state=…`).
    async fn consent(&self, authorization_url: &str) -> String {
        let prefix = self.url("/authorize");
        assert!(
            authorization_url.starts_with(&prefix),
            "{authorization_url} is not at {prefix}"
        );
        let path = &authorization_url[self.url("").len()..];
        let r = self.request("GET", path).await;
        assert_eq!(r.status, 302, "{}", r.text);
        let location = r.headers["location"].to_str().unwrap().to_owned();
        let query = location
            .strip_prefix(&format!("{REDIRECT}?"))
            .unwrap_or_else(|| panic!("redirect to {location}"));
        query.to_owned()
    }

    fn runtime_options(&self) -> Options {
        Options {
            extra_config: format!(
                "oauth2:\n  allowed_hosts: [localhost]\n  ca_file: {}\n",
                self.ca_path.display()
            ),
            ..Options::default()
        }
    }

    fn settings(&self) -> Value {
        json!({
            "authorization_url": self.url("/authorize"),
            "token_url": self.url("/token"),
            "revocation_url": self.url("/revoke"),
            "client_id": CLIENT_ID,
            "scopes": ["contacts.read", "offline_access"],
            "redirect_url": REDIRECT,
        })
    }
}

/// Creates an oauth2 credential with `settings`; returns its id.
async fn create(app: &Instance, name: &str, settings: Value) -> String {
    let r = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": name, "kind": "oauth2", "secret": {"client_secret": CLIENT_SECRET}, "oauth2": settings})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["oauth2"]["state"], "not_connected");
    assert!(!r.text.contains(CLIENT_SECRET));
    r.json["id"].as_str().unwrap().to_owned()
}

/// Starts an authorization of credential `id` as `token`; returns the authorization URL.
async fn authorize(app: &Instance, id: &str, token: &str) -> String {
    let r = app
        .call_as(
            "POST",
            &format!("/v1/credentials/{id}/oauth2/authorize"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["authorization_url"].as_str().unwrap().to_owned()
}

async fn callback(app: &Instance, query: &str, token: &str) -> tenantry_test_support::Response {
    app.call_as(
        "GET",
        &format!("/v1/oauth2/callback?{query}"),
        Some(token),
        None,
    )
    .await
}

/// Authorizes credential `id` end to end; returns the callback's answer.
async fn connect(app: &Instance, server: &AuthServer, id: &str) -> Value {
    let token = app.token();
    let url = authorize(app, id, &token).await;
    let query = server.consent(&url).await;
    let r = callback(app, &query, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

/// The listing entry of credential `id`.
async fn listed(app: &Instance, id: &str) -> Option<Value> {
    let r = app.call("GET", "/v1/credentials", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
}

/// A second handle on the runtime's database, as an execution in the same instance
/// would hold: the internal access-token call goes through it.
async fn executor_store(app: &Instance) -> Store {
    let config = tenant_runtime::config::load(&app.config_path).unwrap();
    let keys = Keyring::from_config(&config).await.unwrap();
    Store::open(&app.data_dir(), keys).await.unwrap()
}

fn query_param<'a>(query: &'a str, name: &str) -> &'a str {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
}

#[tokio::test]
async fn connect_refresh_with_rotation_use_and_revoke_on_delete() {
    let log = log_capture();
    let Some(server) = AuthServer::start(3).await else {
        return;
    };
    let app = Instance::start_with(server.runtime_options()).await;
    let id = create(&app, "crm", server.settings()).await;

    // Connecting: the authorization URL carries PKCE S256, state, client and scopes.
    let token = app.token();
    let url = authorize(&app, &id, &token).await;
    for part in [
        "response_type=code",
        &format!("client_id={CLIENT_ID}"),
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "scope=contacts.read+offline_access",
        "redirect_uri=https%3A%2F%2Fapp.example.test%2Foauth2%2Fcallback",
    ] {
        assert!(url.contains(part), "{url} lacks {part}");
    }
    let query = server.consent(&url).await;
    let connected_at = Instant::now();
    let r = callback(&app, &query, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["oauth2"]["state"], "connected");
    assert!(r.json["oauth2"]["access_token_expires_at"].is_string());
    let issued = server.issued_tokens().await;
    assert_eq!(issued.len(), 2, "one access and one refresh token");
    for t in &issued {
        assert!(
            !r.text.contains(t.as_str()),
            "the callback returned a token"
        );
    }

    // Short-lived tokens at intervals: three refreshes of a 3 s token, each rotating the
    // refresh token (the server revokes the one it replaced, so using a stale one fails).
    let entry = eventually_some(Duration::from_secs(30), common::POLL, || async {
        listed(&app, &id)
            .await
            .filter(|c| c["oauth2"]["refreshes"].as_i64() >= Some(3))
    })
    .await
    .expect("three refreshes within 30 s");
    let took = connected_at.elapsed();
    assert_eq!(entry["oauth2"]["state"], "connected");
    let state = server.state().await;
    let tokens = state["tokens"].as_array().unwrap();
    assert!(tokens.len() >= 4, "{state}");
    let refresh_tokens: Vec<&str> = tokens
        .iter()
        .map(|t| t["refresh_token"].as_str().unwrap())
        .collect();
    let mut distinct = refresh_tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), refresh_tokens.len(), "rotated every time");
    let (last, older) = tokens.split_last().unwrap();
    assert!(older.iter().all(|t| t["revoked"] == true), "{state}");
    assert_eq!(last["revoked"], false);
    assert_eq!(last["grant_type"], "refresh_token");
    // Every refresh came before the token it replaced expired, and not before half of
    // its lifetime had passed (the schedule is 2/3, less up to a tenth, of 3 s).
    let issued_at: Vec<f64> = tokens
        .iter()
        .map(|t| t["issued_at"].as_f64().unwrap())
        .collect();
    let gaps: Vec<f64> = issued_at.windows(2).map(|w| w[1] - w[0]).collect();
    for gap in &gaps {
        assert!((1.5..3.0).contains(gap), "refresh gaps {gaps:?}");
    }
    println!(
        "oauth2: {} refreshes of a 3 s token in {:.2} s; gaps between issues {:?} s (schedule 1.70-2.00 s)",
        gaps.len(),
        took.as_secs_f64(),
        gaps.iter()
            .map(|g| (g * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );

    // Executions get the current access token through the internal call, counted.
    let executor = executor_store(&app).await;
    let current = tenant_runtime::oauth::access_token(&executor, &id, jiff::Timestamp::now())
        .await
        .unwrap();
    use secrecy::ExposeSecret as _;
    let latest = server.state().await["tokens"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(current.expose_secret(), latest);
    let entry = listed(&app, &id).await.unwrap();
    assert_eq!(entry["oauth2"]["access_token_uses"], 1);

    // While connected: the database, WAL included, holds no token in the clear.
    let all_issued = server.issued_tokens().await;
    let on_disk: Vec<u8> = read_tree(&app.data_dir())
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    assert!(
        contains(&on_disk, b"tenantry-test-client"),
        "scan sees clear columns"
    );
    for t in &all_issued {
        assert!(!contains(&on_disk, t.as_bytes()), "token on disk");
    }
    assert!(!contains(&on_disk, CLIENT_SECRET.as_bytes()));

    // Deleting: tokens gone at once, and the provider confirms the revocation.
    let deleted = app
        .call("DELETE", &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.json["provider_revocation"], "confirmed");
    let state = server.state().await;
    let last = state["tokens"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["revoked"], true, "{state}");
    let revoked: Vec<&str> = state["revocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["token"].as_str().unwrap())
        .collect();
    assert!(revoked.contains(&last["refresh_token"].as_str().unwrap()));
    assert!(listed(&app, &id).await.is_none());
    let err = tenant_runtime::oauth::access_token(&executor, &id, jiff::Timestamp::now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tenant_runtime::Error::GrantUnavailable {
                reason: GrantUnavailable::NotFound,
                ..
            }
        ),
        "{err}"
    );
    // The refresher is quiet about a deleted grant.
    let requests = server.state().await["token_requests"]["refresh_token"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        server.state().await["token_requests"]["refresh_token"],
        requests
    );
    executor.close().await;

    let metrics = app.call_as("GET", "/metrics", None, None).await.text;
    assert!(common::metric(&metrics, &["oauth2_refreshes_total", "result=\"ok\""]) >= 3.0);
    assert_eq!(
        common::metric(
            &metrics,
            &["oauth2_revocations_total", "result=\"confirmed\""]
        ),
        1.0
    );

    let data_dir = app.data_dir();
    let _dir = app.stop_keep_dir().await;
    let on_disk: Vec<u8> = read_tree(&data_dir)
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    let text = log.text();
    assert!(
        text.contains("oauth2 access token refreshed"),
        "the log saw the refreshes"
    );
    assert!(text.contains(" TRACE "), "the log is at TRACE");
    assert!(text.contains(&id));
    for t in server.issued_tokens().await {
        assert!(
            !contains(&on_disk, t.as_bytes()),
            "token on disk after delete"
        );
        assert!(!text.contains(&t), "token in the log");
    }
    assert!(!text.contains(CLIENT_SECRET), "client secret in the log");
}

#[tokio::test]
async fn invalid_grant_needs_reauthorization_and_is_not_retried() {
    let log = log_capture();
    let Some(server) = AuthServer::start(2).await else {
        return;
    };
    let app = Instance::start_with(server.runtime_options()).await;
    let id = create(&app, "crm", server.settings()).await;
    connect(&app, &server, &id).await;

    // The user removes the app's access at the provider.
    let r = server
        .request("POST", &format!("/test/revoke-all?client_id={CLIENT_ID}"))
        .await;
    assert_eq!(r.json["revoked"], 1, "{}", r.text);
    let entry = eventually_some(Duration::from_secs(15), common::POLL, || async {
        listed(&app, &id)
            .await
            .filter(|c| c["oauth2"]["state"] == "needs_reauthorization")
    })
    .await
    .expect("needs_reauthorization after the refused refresh");
    assert!(entry["oauth2"]["access_token_expires_at"].is_null());
    let refreshes = server.state().await["token_requests"]["refresh_token"].clone();
    assert_eq!(refreshes, 1, "exactly one refused refresh");
    // Not retried: several token lifetimes later, still one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        server.state().await["token_requests"]["refresh_token"],
        refreshes
    );
    let executor = executor_store(&app).await;
    let err = tenant_runtime::oauth::access_token(&executor, &id, jiff::Timestamp::now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tenant_runtime::Error::GrantUnavailable {
                reason: GrantUnavailable::NeedsReauthorization,
                ..
            }
        ),
        "{err}"
    );
    executor.close().await;

    // Authorizing again connects it again.
    let again = connect(&app, &server, &id).await;
    assert_eq!(again["oauth2"]["state"], "connected");
    assert_eq!(again["oauth2"]["refreshes"], 0);
    // Connecting once more replaces that grant, which is revoked at the provider: every
    // token issued before the new grant is revoked, the last one held by an explicit
    // revocation request (not by rotation).
    connect(&app, &server, &id).await;
    let state = server.state().await;
    let tokens = state["tokens"].as_array().unwrap();
    let newest_grant = tokens
        .iter()
        .rposition(|t| t["grant_type"] == "authorization_code")
        .unwrap();
    assert!(
        tokens[..newest_grant].iter().all(|t| t["revoked"] == true),
        "{state}"
    );
    let replaced = &tokens[newest_grant - 1]["refresh_token"];
    assert!(
        state["revocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| &r["token"] == replaced),
        "{state}"
    );
    // A grant that is deleted after its tokens were dropped has nothing to revoke...
    // but this one is connected again, so the provider is asked.
    let deleted = app
        .call("DELETE", &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(deleted.json["provider_revocation"], "confirmed");
    let _dir = app.stop_keep_dir().await;
    let text = log.text();
    assert!(text.contains("invalid_grant"));
    for t in server.issued_tokens().await {
        assert!(!text.contains(&t), "token in the log");
    }
}

#[tokio::test]
async fn failed_refreshes_back_off_then_recover() {
    log_capture();
    let Some(server) = AuthServer::start(3).await else {
        return;
    };
    let app = Instance::start_with(server.runtime_options()).await;
    let id = create(&app, "crm", server.settings()).await;
    connect(&app, &server, &id).await;
    // The next three token requests fail (503): retried after about 1 s, 2 s, 4 s.
    server.request("POST", "/test/fail-next?n=3").await;
    let entry = eventually_some(Duration::from_secs(30), common::POLL, || async {
        listed(&app, &id)
            .await
            .filter(|c| c["oauth2"]["refreshes"].as_i64() >= Some(1))
    })
    .await
    .expect("a refresh succeeds after the failures");
    assert_eq!(entry["oauth2"]["state"], "connected");
    let state = server.state().await;
    assert_eq!(state["token_requests"]["failed_on_purpose"], 3, "{state}");
    let times: Vec<f64> = state["request_log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["grant_type"] == "refresh_token")
        .map(|r| r["at"].as_f64().unwrap())
        .collect();
    assert!(times.len() >= 4, "{state}");
    let gaps: Vec<f64> = times[..4].windows(2).map(|w| w[1] - w[0]).collect();
    // 1 s, 2 s, 4 s plus up to a tenth, plus the request time (and slack for a busy
    // machine: what matters is that each wait is at least its base and they double).
    for (gap, base) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(*gap >= base && *gap < base * 1.1 + 1.5, "gaps {gaps:?}");
    }
    println!(
        "oauth2: backoff after 3 failed refreshes: {:?} s (schedule 1, 2, 4 s + up to 10%)",
        gaps.iter()
            .map(|g| (g * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    let metrics = app.call_as("GET", "/metrics", None, None).await.text;
    assert_eq!(
        common::metric(&metrics, &["oauth2_refreshes_total", "result=\"failed\""]),
        3.0
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn state_replay_a_code_for_another_credential_and_another_caller_are_refused() {
    log_capture();
    let Some(server) = AuthServer::start(3600).await else {
        return;
    };
    let app = Instance::start_with(server.runtime_options()).await;
    let a = create(&app, "a", server.settings()).await;
    let b = create(&app, "b", server.settings()).await;
    let token = app.token();
    let query_a = server.consent(&authorize(&app, &a, &token).await).await;
    let query_b = server.consent(&authorize(&app, &b, &token).await).await;

    // B's code with A's state: A's PKCE verifier does not match B's code, and the
    // provider refuses the exchange. A stays unconnected; A's state is used up.
    let mixed = format!(
        "code={}&state={}",
        query_param(&query_b, "code"),
        query_param(&query_a, "state")
    );
    let r = callback(&app, &mixed, &token).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json["error"], "provider_refused");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{}",
        r.text
    );
    assert_eq!(
        listed(&app, &a).await.unwrap()["oauth2"]["state"],
        "not_connected"
    );
    let replay = callback(&app, &query_a, &token).await;
    assert_eq!(replay.status, 400, "{}", replay.text);
    assert_eq!(replay.json["error"], "invalid_state");

    // B's own state and code from another token (even the same user's) are refused and
    // leave the state to its owner, who then connects B; replaying it is refused.
    let other = app.token_for("user-1");
    let r = callback(&app, &query_b, &other).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json["error"], "invalid_state");
    let r = callback(&app, &query_b, &app.token_for("mallory")).await;
    assert_eq!(r.json["error"], "invalid_state");
    let r = callback(&app, &query_b, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["oauth2"]["state"], "connected");
    let replay = callback(&app, &query_b, &token).await;
    assert_eq!(replay.status, 400);
    assert_eq!(replay.json["error"], "invalid_state");
    // An invented state, and a declined consent (which uses the state up).
    let r = callback(&app, "code=x&state=made-up", &token).await;
    assert_eq!(r.json["error"], "invalid_state");
    let url = authorize(&app, &a, &token).await;
    let declined = format!(
        "error=access_denied&state={}",
        query_param(&server.consent(&url).await, "state")
    );
    let r = callback(&app, &declined, &token).await;
    assert_eq!(r.json["error"], "authorization_denied", "{}", r.text);
    // Only B was ever exchanged.
    assert_eq!(
        server.state().await["token_requests"]["authorization_code"],
        2
    );
    assert_eq!(server.state().await["tokens"].as_array().unwrap().len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn endpoints_off_the_allow_list_and_redirects_elsewhere_are_refused() {
    log_capture();
    let Some(server) = AuthServer::start(3600).await else {
        return;
    };
    let app = Instance::start_with(server.runtime_options()).await;
    let base = server.settings();
    let with = |key: &str, value: Value| {
        let mut s = base.clone();
        s[key] = value;
        s
    };
    for (settings, needle) in [
        (
            with("token_url", json!("https://evil.test/token")),
            "token_url host evil.test",
        ),
        (
            with("authorization_url", json!("https://127.0.0.1/authorize")),
            "authorization_url host 127.0.0.1",
        ),
        (
            with("revocation_url", json!("https://metadata.internal/revoke")),
            "revocation_url host metadata.internal",
        ),
        (
            with(
                "token_url",
                json!(format!("http://localhost:{}/token", server.port)),
            ),
            "token_url must be an https URL",
        ),
        (
            with("redirect_url", json!("http://app.example.test/cb")),
            "redirect_url must be an absolute https URL",
        ),
    ] {
        let r = app
            .call(
                "POST",
                "/v1/credentials",
                Some(json!({"name": "x", "kind": "oauth2", "secret": {"client_secret": CLIENT_SECRET}, "oauth2": settings})),
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json["error"], "endpoint_not_allowed");
        assert!(
            r.json["message"].as_str().unwrap().contains(needle),
            "{}",
            r.text
        );
    }
    for (body, needle) in [
        (
            json!({"name": "x", "kind": "oauth2", "secret": {"client_secret": CLIENT_SECRET}}),
            "needs oauth2",
        ),
        (
            json!({"name": "x", "kind": "api_key", "secret": {}, "oauth2": base.clone()}),
            "only for kind",
        ),
        (
            json!({"name": "x", "kind": "oauth2", "secret": {"client_secret": 7, "x": CLIENT_SECRET}, "oauth2": base.clone()}),
            "client_secret",
        ),
    ] {
        let r = app.call("POST", "/v1/credentials", Some(body)).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert!(
            r.json["message"].as_str().unwrap().contains(needle),
            "{}",
            r.text
        );
        assert!(!r.text.contains(CLIENT_SECRET));
    }

    // An allowed token endpoint that redirects to a host off the list: not followed.
    let id = create(
        &app,
        "moved",
        with("token_url", json!(server.url("/moved/token"))),
    )
    .await;
    let token = app.token();
    let query = server.consent(&authorize(&app, &id, &token).await).await;
    let r = callback(&app, &query, &token).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.json["error"], "provider_unavailable");
    let message = r.json["message"].as_str().unwrap();
    assert!(
        message.contains("redirect to evil.test (not in oauth2.allowed_hosts) refused"),
        "{message}"
    );
    assert_eq!(
        listed(&app, &id).await.unwrap()["oauth2"]["state"],
        "not_connected"
    );
    assert_eq!(
        server.state().await["token_requests"]["authorization_code"],
        0
    );
    app.stop().await.unwrap();
}
