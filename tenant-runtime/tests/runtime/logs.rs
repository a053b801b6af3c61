//! "Credentials are never logged": with every log line captured at TRACE, a session that
//! stores, lists and deletes credentials and executions, and sends malformed bodies and
//! tokens, never writes a secret, a payload or a token to the log.

use serde_json::json;

use crate::common::{Instance, log_capture};

#[tokio::test]
async fn no_secret_payload_or_token_reaches_the_log() {
    // The global subscriber, so the runtime's every thread logs here. It also catches the
    // other tests of this binary that run meanwhile: that only adds lines, and the needles
    // checked below belong to this test alone.
    let captured = log_capture();

    let app = Instance::start().await;
    let token = app.token();
    let secret = "sk-live-LOGCHECK-5b8e";
    let payload = "PAYLOAD-LOGCHECK-91c2";
    let created = app
        .call_as(
            "POST",
            "/v1/credentials",
            Some(&token),
            Some(json!({"name": "stripe", "kind": "api_key", "secret": {"key": secret}})),
        )
        .await;
    assert_eq!(created.status, 201);
    let id = created.json["id"].as_str().unwrap().to_owned();
    for bad in [
        json!({"name": "x", "kind": "api_key", "secret": secret}),
        json!({"name": secret, "kind": 5, "secret": {}}),
        json!({"name": "x", "kind": secret, "secret": {"k": secret}}),
    ] {
        let r = app
            .call_as("POST", "/v1/credentials", Some(&token), Some(bad))
            .await;
        assert_eq!(r.status, 400);
        assert!(!r.text.contains(secret), "{}", r.text);
    }
    let bad_json =
        format!("{{\"name\": \"x\", \"kind\": \"api_key\", \"secret\": {{\"k\": \"{secret}\"");
    let r = app
        .raw(
            "POST",
            "/v1/credentials",
            Some(&token),
            Some("application/json"),
            bad_json.into_bytes(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(!r.text.contains(secret));
    let e = app
        .call_as(
            "POST",
            "/v1/executions",
            Some(&token),
            Some(json!({"workflow_id": "wf", "status": "ok", "started_at": "2026-01-01T00:00:00Z", "data": payload})),
        )
        .await;
    assert_eq!(e.status, 201);
    let eid = e.json["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.call_as("GET", &format!("/v1/executions/{eid}"), Some(&token), None)
            .await
            .status,
        200
    );
    assert_eq!(
        app.call_as("GET", "/v1/credentials", Some(&token), None)
            .await
            .status,
        200
    );
    let foreign = app
        .signer
        .issue(
            "globex",
            "user-1",
            jiff::Timestamp::now(),
            std::time::Duration::from_secs(60),
        )
        .unwrap()
        .0;
    assert_eq!(
        app.call_as("GET", "/v1/credentials", Some(&foreign), None)
            .await
            .status,
        401
    );
    assert_eq!(
        app.call_as(
            "DELETE",
            &format!("/v1/credentials/{id}"),
            Some(&token),
            None
        )
        .await
        .status,
        204
    );
    app.stop().await.unwrap();

    let log = captured.text();
    // The log did record the session (so the absence checks below mean something).
    assert!(log.contains("credential stored"), "{log}");
    assert!(log.contains("token refused"), "{log}");
    assert!(log.contains(&id));
    for needle in [secret, payload, token.as_str(), foreign.as_str()] {
        assert!(!log.contains(needle), "log contains {needle}");
    }
    // Nor a piece of a token (the signature part is the most distinctive).
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature));
}
