//! Token rules at the HTTP boundary: only an EdDSA token signed by the configured key, for
//! this tenant, unexpired and at most 15 minutes long, gets in; everything else is a 401
//! with a JSON error.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use tenantry_proto::token::{ISSUER, InstanceClaims, TokenSigner};
use tenantry_test_support::eventually;

use crate::common::{self, Instance};

fn claims(tenant: &str, iat: i64, ttl: i64) -> InstanceClaims {
    InstanceClaims {
        iss: ISSUER.into(),
        sub: "user-1".into(),
        aud: tenant.into(),
        iat,
        exp: iat + ttl,
        jti: "2b0c5c1e-3f7e-4c1a-9d0e-0f6a8c1f5e11".into(),
    }
}

async fn status_with(app: &Instance, token: &str) -> (u16, serde_json::Value) {
    let r = app
        .call_as("GET", "/v1/executions", Some(token), None)
        .await;
    (r.status, r.json)
}

#[tokio::test]
async fn only_valid_tokens_for_this_tenant_get_in() {
    let app = Instance::start().await;
    let now = Timestamp::now().as_second();

    let (ok, _) = status_with(&app, &app.token()).await;
    assert_eq!(ok, 200);

    let mut refused: Vec<(&str, String)> = Vec::new();
    // A token the API minted for another tenant.
    let (other, _) = app
        .signer
        .issue(
            "globex",
            "user-1",
            Timestamp::now(),
            Duration::from_secs(300),
        )
        .unwrap();
    refused.push(("other tenant", other));
    refused.push((
        "expired",
        app.signer.sign(&claims("acme", now - 1000, 600)).unwrap(),
    ));
    refused.push((
        "too long",
        app.signer.sign(&claims("acme", now, 3600)).unwrap(),
    ));
    let stranger = TokenSigner::generate().unwrap();
    let (foreign, _) = stranger
        .issue("acme", "user-1", Timestamp::now(), Duration::from_secs(300))
        .unwrap();
    refused.push(("signed by another key", foreign));
    let mut wrong_iss = claims("acme", now, 300);
    wrong_iss.iss = "evil".into();
    refused.push(("wrong issuer", app.signer.sign(&wrong_iss).unwrap()));

    // Hand-made tokens: unsigned `alg: none`, an HS256 header, missing claims.
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("acme", now, 300)).unwrap());
    let good = app.token();
    let signature = good.rsplit('.').next().unwrap().to_owned();
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"HS256","typ":"JWT"}"#,
    ] {
        let h = URL_SAFE_NO_PAD.encode(header);
        refused.push(("alg none/HS256 (empty sig)", format!("{h}.{payload}.")));
        refused.push((
            "alg none/HS256 (some sig)",
            format!("{h}.{payload}.{signature}"),
        ));
    }
    let mut no_exp = serde_json::to_value(claims("acme", now, 300)).unwrap();
    no_exp.as_object_mut().unwrap().remove("exp");
    let parts: Vec<&str> = good.split('.').collect();
    refused.push((
        "missing exp (unsigned change)",
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(no_exp.to_string()),
            parts[2]
        ),
    ));
    refused.push(("garbage", "not-a-token".into()));

    for (why, token) in refused {
        let (status, body) = status_with(&app, &token).await;
        assert_eq!(status, 401, "{why}");
        assert_eq!(body["error"], "unauthorized", "{why}");
        let message = body["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{why}");
        assert!(
            !message.contains(&token[..token.len().min(16)]) || token.len() < 16,
            "{why}"
        );
    }

    // The wrong audience is named as such.
    let (other, _) = app
        .signer
        .issue(
            "globex",
            "user-1",
            Timestamp::now(),
            Duration::from_secs(300),
        )
        .unwrap();
    let (_, body) = status_with(&app, &other).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not for this tenant")
    );

    // Other schemes and an empty header.
    for header in ["Basic dXNlcjpwYXNz", "Bearer", ""] {
        let mut conn = app.connect().await;
        let r = conn
            .send_with_header("GET", "/v1/executions", "authorization", header)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{header:?}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_rotated_token_key_is_picked_up_without_restart() {
    let app = Instance::start().await;
    let next = TokenSigner::generate().unwrap();
    let (new_token, _) = next
        .issue("acme", "user-1", Timestamp::now(), Duration::from_secs(300))
        .unwrap();
    assert_eq!(status_with(&app, &new_token).await.0, 401);
    common::write_atomically(
        &app.root().join("keys/token.pub"),
        next.public_key_pem().as_bytes(),
    );
    let picked_up = eventually(Duration::from_secs(5), common::POLL, || async {
        status_with(&app, &new_token).await.0 == 200
    })
    .await;
    assert!(picked_up, "new public key not used");
    // The old key's tokens are now refused.
    assert_eq!(status_with(&app, &app.token()).await.0, 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_set_accepts_old_and_new_tokens_until_the_old_key_leaves_it() {
    let app = Instance::start().await;
    let old_token = app.token();
    let next = TokenSigner::generate().unwrap();
    let (new_token, _) = next
        .issue("acme", "user-1", Timestamp::now(), Duration::from_secs(300))
        .unwrap();
    let key_file = app.root().join("keys/token.pub");
    // The rotation publishes the new key next to the old one: both kinds of token pass.
    let set = format!("{}{}", app.signer.public_key_pem(), next.public_key_pem());
    common::write_atomically(&key_file, set.as_bytes());
    let both = eventually(Duration::from_secs(5), common::POLL, || async {
        status_with(&app, &new_token).await.0 == 200
    })
    .await;
    assert!(both, "the new key of the set was not picked up");
    assert_eq!(status_with(&app, &old_token).await.0, 200);

    // A bad set (one block damaged) is refused as a whole; the running set stays.
    let damaged = format!(
        "{}{}",
        app.signer.public_key_pem(),
        next.public_key_pem().replacen("MCow", "MCox", 1)
    );
    common::write_atomically(&key_file, damaged.as_bytes());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_with(&app, &old_token).await.0, 200);
    assert_eq!(status_with(&app, &new_token).await.0, 200);

    // The old key retires: its tokens are refused, with a message naming no key.
    common::write_atomically(&key_file, next.public_key_pem().as_bytes());
    let retired = eventually(Duration::from_secs(5), common::POLL, || async {
        status_with(&app, &old_token).await.0 == 401
    })
    .await;
    assert!(retired, "the retired key still verifies");
    let (_, body) = status_with(&app, &old_token).await;
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("does not accept"), "{message}");
    assert!(!message.contains(app.signer.kid()), "{message}");
    assert_eq!(status_with(&app, &new_token).await.0, 200);
    app.stop().await.unwrap();
}
