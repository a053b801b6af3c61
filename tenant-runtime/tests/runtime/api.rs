//! The JSON API over real HTTPS: executions, credentials, probes, metrics and the error
//! rules (every error is JSON; 400 for bad JSON and unknown fields; 413 past the limit).

use serde_json::json;

use crate::common::{Instance, metric};

fn execution(workflow: &str, started: &str, finished: Option<&str>) -> serde_json::Value {
    json!({
        "workflow_id": workflow,
        "status": "success",
        "started_at": started,
        "finished_at": finished,
        "data": {"nodes": [1, 2, 3], "note": format!("run of {workflow}")},
    })
}

#[tokio::test]
async fn probes_need_no_token_and_v1_does() {
    let app = Instance::start().await;
    let health = app.call_as("GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json["status"], "ok");
    let ready = app.call_as("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let metrics = app.call_as("GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200);
    for path in ["/v1/executions", "/v1/credentials"] {
        let r = app.call_as("GET", path, None, None).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.json["error"], "unauthorized");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn executions_round_trip_page_and_delete() {
    let app = Instance::start().await;
    let created = app
        .call(
            "POST",
            "/v1/executions",
            Some(execution(
                "wf-1",
                "2026-01-02T03:04:05.123456Z",
                Some("2026-01-02T03:05:00Z"),
            )),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json["id"].as_str().unwrap().to_owned();

    let got = app.call("GET", &format!("/v1/executions/{id}"), None).await;
    assert_eq!(got.status, 200, "{}", got.text);
    assert_eq!(got.json["id"], id.as_str());
    assert_eq!(got.json["workflow_id"], "wf-1");
    assert_eq!(got.json["status"], "success");
    assert_eq!(got.json["started_at"], "2026-01-02T03:04:05.123456Z");
    assert_eq!(got.json["finished_at"], "2026-01-02T03:05:00Z");
    assert_eq!(
        got.json["data"],
        json!({"nodes": [1, 2, 3], "note": "run of wf-1"})
    );

    // Four more, one still running (no finished_at); then page through all five by twos.
    for i in 0..4 {
        let finished = (i != 3).then_some("2026-01-03T00:00:00Z");
        let r = app
            .call(
                "POST",
                "/v1/executions",
                Some(execution(
                    &format!("wf-{}", i + 2),
                    &format!("2026-01-02T1{i}:00:00Z"),
                    finished,
                )),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/executions?limit=2&cursor={c}"),
            None => "/v1/executions?limit=2".to_owned(),
        };
        let page = app.call("GET", &path, None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let items = page.json["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        // Listings carry no data (GET by id does).
        assert!(
            items
                .iter()
                .all(|e| e.get("data").is_none() && e["id"].is_string())
        );
        seen.extend(
            items
                .iter()
                .map(|e| e["workflow_id"].as_str().unwrap().to_owned()),
        );
        match page.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    // Newest start first.
    assert_eq!(seen, vec!["wf-5", "wf-4", "wf-3", "wf-2", "wf-1"]);

    assert_eq!(
        app.call("DELETE", &format!("/v1/executions/{id}"), None)
            .await
            .status,
        204
    );
    let gone = app.call("GET", &format!("/v1/executions/{id}"), None).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json["error"], "not_found");
    assert_eq!(
        app.call("DELETE", &format!("/v1/executions/{id}"), None)
            .await
            .status,
        404
    );

    let metrics = app.call_as("GET", "/metrics", None, None).await.text;
    assert_eq!(
        metric(&metrics, &["tenant_runtime_stored_executions "]),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            &[
                "tenant_runtime_http_requests_total{",
                "route=\"/v1/executions\"",
                "method=\"POST\"",
                "status=\"201\""
            ]
        ),
        5.0,
        "{metrics}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn credentials_list_metadata_never_secrets() {
    let app = Instance::start().await;
    let secret = json!({"api_key": "sk-live-DO-NOT-SHOW-1234"});
    let created = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": "stripe", "kind": "api_key", "secret": secret})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json["id"].as_str().unwrap().to_owned();
    assert!(!created.text.contains("sk-live"));
    // An oauth2 credential needs its provider settings (see the oauth module's tests).
    let oauth = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": "google", "kind": "oauth2", "secret": {"client_secret": "cs-XYZ", "refresh_token": "rt"}})),
        )
        .await;
    assert_eq!(oauth.status, 400, "{}", oauth.text);
    assert!(
        oauth.json["message"]
            .as_str()
            .unwrap()
            .contains("needs oauth2")
    );
    assert!(!oauth.text.contains("cs-XYZ"));
    let other = app
        .call(
            "POST",
            "/v1/credentials",
            Some(
                json!({"name": "google", "kind": "api_key", "secret": {"client_secret": "cs-XYZ"}}),
            ),
        )
        .await;
    assert_eq!(other.status, 201, "{}", other.text);

    let list = app.call("GET", "/v1/credentials", None).await;
    assert_eq!(list.status, 200);
    let items = list.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let names: Vec<&str> = items.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"stripe") && names.contains(&"google"));
    for item in items {
        let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{item}");
        assert!(item.get("secret").is_none());
    }
    assert!(!list.text.contains("sk-live") && !list.text.contains("cs-XYZ"));

    let bad_kind = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": "x", "kind": "password", "secret": {}})),
        )
        .await;
    assert_eq!(bad_kind.status, 400);
    let not_object = app
        .call(
            "POST",
            "/v1/credentials",
            Some(json!({"name": "x", "kind": "api_key", "secret": "sk-live-RAW-999"})),
        )
        .await;
    assert_eq!(not_object.status, 400);
    assert!(
        !not_object.text.contains("sk-live-RAW-999"),
        "{}",
        not_object.text
    );
    assert!(
        not_object.json["message"]
            .as_str()
            .unwrap()
            .contains("secret must be a JSON object")
    );

    assert_eq!(
        app.call("DELETE", &format!("/v1/credentials/{id}"), None)
            .await
            .status,
        204
    );
    assert_eq!(
        app.call("DELETE", &format!("/v1/credentials/{id}"), None)
            .await
            .status,
        404
    );
    let list = app.call("GET", "/v1/credentials", None).await;
    assert_eq!(list.json["items"].as_array().unwrap().len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let app = Instance::start().await;
    let token = app.token();
    let t = Some(token.as_str());
    let json_ct = Some("application/json");

    let bad_json = app
        .raw(
            "POST",
            "/v1/executions",
            t,
            json_ct,
            b"{\"workflow_id\": ".to_vec(),
        )
        .await;
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.json["error"], "bad_request");
    assert!(
        bad_json.json["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let mut unknown = execution("wf", "2026-01-01T00:00:00Z", None);
    unknown["colour"] = json!("blue");
    let r = app.call("POST", "/v1/executions", Some(unknown)).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{}",
        r.text
    );

    let missing = app
        .call("POST", "/v1/executions", Some(json!({"workflow_id": "wf"})))
        .await;
    assert_eq!(missing.status, 400);

    let bad_time = app
        .call(
            "POST",
            "/v1/executions",
            Some(execution("wf", "yesterday", None)),
        )
        .await;
    assert_eq!(bad_time.status, 400);

    let backwards = app
        .call(
            "POST",
            "/v1/executions",
            Some(execution(
                "wf",
                "2026-01-02T00:00:00Z",
                Some("2026-01-01T00:00:00Z"),
            )),
        )
        .await;
    assert_eq!(backwards.status, 400);
    assert!(
        backwards.json["message"]
            .as_str()
            .unwrap()
            .contains("finished_at")
    );

    let empty_workflow = app
        .call(
            "POST",
            "/v1/executions",
            Some(execution("", "2026-01-02T00:00:00Z", None)),
        )
        .await;
    assert_eq!(empty_workflow.status, 400);

    // The test instance limits bodies to 64 KiB.
    let mut big = execution("wf", "2026-01-01T00:00:00Z", None);
    big["data"] = json!("x".repeat(70 * 1024));
    let too_big = app.call("POST", "/v1/executions", Some(big)).await;
    assert_eq!(too_big.status, 413, "{}", too_big.text);
    assert_eq!(too_big.json["error"], "payload_too_large");

    let text = app
        .raw(
            "POST",
            "/v1/executions",
            t,
            Some("text/plain"),
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(text.status, 415);
    assert!(text.json["message"].is_string());

    for (method, path, status) in [
        ("GET", "/v1/executions?limit=0", 400),
        ("GET", "/v1/executions?limit=501", 400),
        ("GET", "/v1/executions?cursor=%21%21", 400),
        ("GET", "/v1/executions?page=2", 400),
        ("GET", "/v1/executions/does-not-exist", 404),
        ("GET", "/nowhere", 404),
        ("PUT", "/v1/executions", 405),
    ] {
        let r = app.call(method, path, None).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text);
        assert!(r.json["message"].is_string(), "{method} {path}: {}", r.text);
        assert!(r.json["error"].is_string(), "{method} {path}: {}", r.text);
    }
    app.stop().await.unwrap();
}

/// Writes `head` (and nothing after it) on a new TLS connection and returns what the
/// server answers within five seconds, up to the end of its headers.
async fn answer_to_head(app: &Instance, head: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(tenantry_test_support::client_config(&app.ca.pem()))
            .connect(name, tcp)
            .await
            .unwrap();
    tls.write_all(head).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer within 5 s; got {:?}",
        String::from_utf8_lossy(&answer)
    );
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_oversized_content_length_is_refused_before_the_body_arrives() {
    // The test instance limits bodies to 64 KiB; this request announces 100 MiB and sends
    // none of it, so only the Content-Length can answer it.
    let app = Instance::start().await;
    let head = format!(
        "POST /v1/executions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        app.token(),
        100 * 1024 * 1024
    );
    let answer = answer_to_head(&app, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Within the limit, the same request waits for its body as usual: it is the length
    // that is refused, not the missing body.
    let head = head.replace(&(100 * 1024 * 1024).to_string(), "64");
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        answer_to_head(&app, head.as_bytes()),
    )
    .await;
    assert!(waiting.is_err(), "answered without the body: {waiting:?}");

    // A body without a length is still cut off at the limit as it is read.
    let chunk = vec![b' '; 70 * 1024];
    let mut chunked = format!(
        "POST /v1/executions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        app.token(),
        chunk.len()
    )
    .into_bytes();
    chunked.extend_from_slice(&chunk);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = answer_to_head(&app, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    app.stop().await.unwrap();
}
