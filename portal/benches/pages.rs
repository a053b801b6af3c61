//! Pages per second: the signed-in dashboard (which asks the API who the visitor is, for
//! the verification banner, and for the tenant) next to pages of the same server that make
//! no API call, and the calls alone, side by side in one run. The real API runs in-process on SQLite; the portal on loopback; the client keeps
//! its connections open like a browser.
//!
//! `cargo bench -p tenantry-portal --bench pages` (goal: the dashboard at ≥ 0.5× the
//! static page; the gRPC calls are the difference).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tenantry_api::config::{Cli, Command};
use tenantry_portal::session::CookieKey;
use tenantry_test_support::PASSWORD;

type Http = Client<HttpConnector, Full<Bytes>>;

const CLIENTS: usize = 8;
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(4);

async fn send(
    http: &Http,
    method: &str,
    url: &str,
    cookie: Option<&str>,
    body: Option<String>,
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    if body.is_some() {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    let res = http
        .request(
            req.body(Full::new(Bytes::from(body.unwrap_or_default())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Requests `url` from CLIENTS tasks for MEASURE (after WARMUP); pages per second.
async fn rate(http: &Http, url: &str, cookie: Option<&str>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Instant::now() + WARMUP + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, cookie) = (http.clone(), url.to_owned(), cookie.map(str::to_owned));
        let (done, counting) = (Arc::clone(&done), Arc::clone(&counting));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let (status, _, _) = send(&http, "GET", &url, cookie.as_deref(), None).await;
                assert_eq!(status, 200, "{url}");
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let cli = Cli::try_parse_from([
        "tenantry-api",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--argon2-memory-kib",
        "1024",
        "--argon2-iterations",
        "1",
        "--rate-limit-per-second",
        "0",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let state =
        tenantry_api::server::build_state(&args, Arc::new(tenantry_api::clock::SystemClock))
            .await
            .unwrap();
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", api_listener.local_addr().unwrap());
    tokio::spawn(tenantry_api::server::serve(
        state,
        api_listener,
        None,
        std::future::pending(),
    ));

    let channel = tenantry_client::connect(&api, tenantry_client::Trust::default())
        .await
        .unwrap();
    let key_text = CookieKey::generate_text().unwrap();
    let key = CookieKey::from_base64(&key_text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let portal = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tenantry_portal::serve::serve(
        listener,
        None,
        tenantry_portal::app(channel.clone(), key, false),
        std::future::pending(),
    ));

    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    // Sign up through the form, as a person would.
    let (_, headers, body) = send(&http, "GET", &format!("{portal}/signup"), None, None).await;
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let marker = r#"name="csrf" value=""#;
    let start = body.find(marker).unwrap() + marker.len();
    let csrf = &body[start..start + body[start..].find('"').unwrap()];
    let form = format!(
        "csrf={csrf}&email=bench%40example.com&password={PASSWORD}&tenant=bench-co&plan=free"
    );
    let (status, headers, _) = send(
        &http,
        "POST",
        &format!("{portal}/signup"),
        Some(&cookie),
        Some(form),
    )
    .await;
    assert_eq!(status, 303);
    let signed_in = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let location = headers["location"].to_str().unwrap().to_owned();

    println!(
        "portal pages/s, {CLIENTS} keep-alive clients, {}s each (API in-process, SQLite):",
        MEASURE.as_secs()
    );
    let css = rate(
        &http,
        &format!("{portal}/static/portal.css"),
        Some(&signed_in),
    )
    .await;
    let health = rate(&http, &format!("{portal}/healthz"), Some(&signed_in)).await;
    // The sign-in page for a new visitor: the same layout, headers, a new sealed cookie
    // and a CSRF token, and no API call.
    let login = rate(&http, &format!("{portal}/login"), None).await;
    let dash_id = rate(&http, &format!("{portal}{location}"), Some(&signed_in)).await;
    let dash = rate(&http, &format!("{portal}/"), Some(&signed_in)).await;
    println!(
        "  {:<46} {:>9.0} pages/s  (baseline)",
        "static page /static/portal.css", css
    );
    println!(
        "  {:<46} {:>9.0} pages/s  {:.2}x",
        "static page /healthz",
        health,
        health / css
    );
    println!(
        "  {:<46} {:>9.0} pages/s  {:.2}x  (no API call)",
        "static HTML page /login (new visitor)",
        login,
        login / css
    );
    println!(
        "  {:<46} {:>9.0} pages/s  {:.2}x  (WhoAmI and GetTenant)",
        "dashboard /?tenant=ID",
        dash_id,
        dash_id / css
    );
    println!(
        "  {:<46} {:>9.0} pages/s  {:.2}x  (WhoAmI, then GetTenant of its tenant)",
        "dashboard /",
        dash,
        dash / css
    );
    // The calls straight over gRPC, with the token inside the cookie: what the dashboard
    // costs the API, without the portal. The health check (no token, no database) is the
    // floor of any call's cost on this channel.
    let key = CookieKey::from_base64(&key_text).unwrap();
    let sealed = signed_in.strip_prefix("tenantry_portal=").unwrap();
    let session =
        tenantry_portal::session::Session::open(&key, sealed, jiff::Timestamp::now().as_second())
            .unwrap();
    let creds = tenantry_client::Credentials::bearer(session.token.as_ref().unwrap()).unwrap();
    let client = tenantry_client::Client::new(channel.clone(), creds);
    let tenant_id = location.trim_start_matches("/?tenant=").to_owned();
    let health_channel = channel.clone();
    let health_grpc = calls(move || {
        let mut c = tonic_health::pb::health_client::HealthClient::new(health_channel.clone());
        async move {
            c.check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap();
        }
    })
    .await;
    let who_client = client.clone();
    let whoami = calls(move || {
        let mut c = who_client.accounts();
        async move {
            c.who_am_i(tenantry_proto::v1::WhoAmIRequest {})
                .await
                .unwrap();
        }
    })
    .await;
    let get_tenant = calls(move || {
        let (mut c, id) = (client.tenants(), tenant_id.clone());
        async move {
            let req = tenantry_proto::v1::GetTenantRequest { tenant_id: id };
            c.get_tenant(req).await.unwrap();
        }
    })
    .await;
    for (what, rate) in [
        (
            "Health over gRPC alone (no token, no database)",
            health_grpc,
        ),
        ("WhoAmI over gRPC alone", whoami),
        ("GetTenant over gRPC alone", get_tenant),
    ] {
        println!(
            "  {:<46} {:>9.0} calls/s  {:.2}x  (no portal)",
            what,
            rate,
            rate / css
        );
    }
    // A page that makes the dashboard's two calls can at best take the static page's time
    // plus the two calls' own (they share the same two cores).
    let bound = 1.0 / (1.0 / login + 1.0 / whoami + 1.0 / get_tenant);
    println!(
        "dashboard ÷ static HTML page (/login): {:.2} (goal >= 0.5); dashboard ÷ CSS file: {:.2}",
        dash_id / login,
        dash_id / css
    );
    println!(
        "  bound from the calls alone: /login plus WhoAmI plus GetTenant = {bound:.0} pages/s, {:.2} of /login; \
         /login plus one health check = {:.2} of /login",
        bound / login,
        1.0 / (1.0 + login / health_grpc)
    );
}

/// Calls per second of `call` from [`CLIENTS`] tasks over [`MEASURE`] (after [`WARMUP`]).
async fn calls<F, Fut>(call: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Instant::now() + WARMUP + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (call, done, counting) = (Arc::clone(&call), Arc::clone(&done), Arc::clone(&counting));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                call().await;
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}
