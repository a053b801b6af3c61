//! The bodies of Tenantry's fuzz targets, one function per target, each taking the raw
//! input bytes. They run every parser that reads outside input and check what must hold
//! of its answer (round trips, bounds, no secret quoted in an error); a panic is a bug.
//!
//! `fuzz_targets/*.rs` hand these functions to libFuzzer under `cargo fuzz`, and replay
//! files with them otherwise; `tests/corpus.rs` feeds them every committed seed and crash
//! reproducer (`seeds/<target>/`, `regressions/<target>/`) in a plain `cargo test`.
//!
//! Where an input carries several fields, its first byte picks the parser and the rest is
//! the text, split at NUL bytes (so the fuzzer can grow each part independently).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::EncodePublicKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::{Signer as _, SigningKey};
use jiff::Timestamp;
use secrecy::{ExposeSecret as _, SecretBox, SecretString};
use tenant_runtime::store::{Cursor, NewCredential, NewExecution};
use tenantry_proto::token::{
    CLOCK_SKEW_SECS, ISSUER, InstanceClaims, MAX_TTL_SECS, TokenError, TokenSigner, TokenVerifier,
};

/// A target's body: the input bytes in, a panic on a bug.
pub type Body = fn(&[u8]);

/// Every target's name and body, in the order the docs list them.
pub const TARGETS: [(&str, Body); 6] = [
    ("instance_token", instance_token),
    ("runtime_config", runtime_config),
    ("runtime_request", runtime_request),
    ("api_request", api_request),
    ("durations", durations),
    ("keys", keys),
];

/// The tenant the token target verifies for.
const AUDIENCE: &str = "acme";
/// The time the token target verifies at (2023-11-14T22:13:20Z).
const NOW: i64 = 1_700_000_000;

/// A fixed signing key (a test fixture: its seed is all sevens), so inputs that carry a
/// header and payload get a real signature and reach the claim checks.
fn fixture_key() -> &'static (SigningKey, Option<TokenVerifier>) {
    static KEY: OnceLock<(SigningKey, Option<TokenVerifier>)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let verifier = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .ok()
            .and_then(|pem| TokenVerifier::from_public_key_pem(&pem).ok());
        (key, verifier)
    })
}

/// The first byte and the rest split at NUL bytes.
fn split(data: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let (&mode, rest) = data.split_first()?;
    Some((mode, rest.split(|b| *b == 0).collect()))
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// The instance token verifier. Mode byte even: the rest is a token as a client sends
/// it. Odd: the rest is `header NUL payload`, signed with the fixture key, so the header
/// and claim checks are reached. An accepted token always meets every documented rule,
/// and no error repeats the token.
pub fn instance_token(data: &[u8]) {
    let Some((token, verdict)) = verify_input(data) else {
        return;
    };
    match verdict {
        Ok(claims) => {
            assert_eq!(claims.aud, AUDIENCE);
            assert_eq!(claims.iss, ISSUER);
            assert!(!claims.sub.is_empty() && !claims.jti.is_empty());
            assert!(claims.exp > NOW - CLOCK_SKEW_SECS, "expired token accepted");
            assert!(claims.iat <= NOW + CLOCK_SKEW_SECS, "future token accepted");
            assert!((0..=MAX_TTL_SECS).contains(&(claims.exp - claims.iat)));
        }
        Err(e) => {
            // Only a token with a character no refusal's fixed text has can be told
            // apart from a coincidence ("token is" is in every message).
            let message = e.to_string();
            let distinct = token.contains(['.', '_']);
            assert!(!distinct || !message.contains(&token), "{message}");
        }
    }
}

/// The token an [`instance_token`] input stands for and the verifier's answer to it
/// (`None` when the input is not one, or the fixture key is unusable).
pub fn verify_input(data: &[u8]) -> Option<(String, Result<InstanceClaims, TokenError>)> {
    let (mode, parts) = split(data)?;
    let verifier = fixture_key().1.as_ref()?;
    let token = if mode % 2 == 0 {
        data.get(1..).and_then(text)?.to_owned()
    } else {
        let header = parts.first().copied().unwrap_or_default();
        let payload = parts.get(1).copied().unwrap_or_default();
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let signature = fixture_key().0.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        token
    };
    let now = Timestamp::from_second(NOW).ok()?;
    let verdict = verifier.verify(&token, AUDIENCE, now);
    Some((token, verdict))
}

/// The runtime's config file, as YAML (mode byte even) or JSON (odd). An accepted config
/// validates, has absolute paths, and needs no restart to reload as itself.
pub fn runtime_config(data: &[u8]) {
    let Some((mode, _)) = split(data) else {
        return;
    };
    let Some(text) = data.get(1..).and_then(text) else {
        return;
    };
    let name = if mode % 2 == 0 { "c.yaml" } else { "c.json" };
    let base = Path::new("/etc/tenantry");
    if let Ok(config) = tenant_runtime::config::parse(text, Path::new(name), base) {
        assert!(config.validate().is_ok());
        for path in [
            &config.data_dir,
            &config.data_key_file,
            &config.token_public_key_file,
            &config.tls.cert_file,
            &config.tls.key_file,
        ] {
            assert!(path.is_absolute(), "{path:?}");
        }
        assert!(config.restart_required_changes(&config).is_empty());
    }
}

/// The runtime's HTTP inputs. Mode byte % 5: 0 an execution body, 1 a credential body
/// (whose errors never quote the secret), 2 the query string of `GET /v1/executions`,
/// 3 an `Authorization` header, 4 a listing cursor. Accepted queries are within bounds
/// and cursors round-trip.
pub fn runtime_request(data: &[u8]) {
    let Some((mode, _)) = split(data) else {
        return;
    };
    let body = data.get(1..).unwrap_or_default();
    match mode % 5 {
        0 => {
            if let Ok(new) = tenant_runtime::api::parse_body::<NewExecution>(body)
                && tenant_runtime::api::check_execution(&new).is_ok()
            {
                assert!(!new.workflow_id.is_empty() && !new.status.is_empty());
                assert!(new.finished_at.is_none_or(|f| f >= new.started_at));
            }
        }
        1 => match tenant_runtime::api::parse_body::<NewCredential>(body) {
            Ok(new) => {
                let _ = tenant_runtime::api::check_credential(&new);
                // Stored as sent: RFC 8259 JSON text whose top level is an object. (Not
                // `serde_json::Value`, whose f64 numbers refuse valid JSON such as 1e999.)
                let text = new.secret.expose_json();
                assert!(text.starts_with('{'), "{text}");
                assert!(
                    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok(),
                    "{text}"
                );
            }
            Err(e) => {
                for secret in secret_texts(body) {
                    assert!(
                        !e.message().contains(&secret),
                        "credential error quotes the secret: {}",
                        e.message()
                    );
                }
            }
        },
        2 => {
            let Some(query) = text(body) else {
                return;
            };
            let Ok(uri) = format!("/v1/executions?{query}").parse::<http::Uri>() else {
                return;
            };
            if let Ok((limit, cursor)) = tenant_runtime::api::list_query(&uri) {
                assert!((1..=tenant_runtime::api::MAX_PAGE).contains(&limit));
                if let Some(cursor) = cursor {
                    assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
                }
            }
        }
        3 => {
            if let Some(token) = text(body).and_then(tenant_runtime::auth::bearer_token) {
                assert!(!token.is_empty() && token.trim() == token);
            }
        }
        _ => {
            if let Some(cursor) = text(body).and_then(Cursor::decode) {
                assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
            }
        }
    }
}

/// The texts of a credential body's `secret` member when it is not an object (which the
/// parser refuses), long enough to be told apart and used nowhere else in the body.
fn secret_texts(body: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Some(secret) = map.get("secret") {
        collect_scalars(secret, &mut found);
    }
    let others: String = map
        .iter()
        .filter(|(k, _)| k.as_str() != "secret")
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    found.retain(|s| {
        s.len() >= 8 && !others.contains(s.as_str()) && !NewCredentialShape::TEXT.contains(s)
    });
    found
}

/// What the credential errors may name (field names and the expected shape).
struct NewCredentialShape;
impl NewCredentialShape {
    const TEXT: &str = "name kind api_key oauth2 secret must be a JSON object unknown field missing field invalid request body expected";
}

fn collect_scalars(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_scalars(v, out)),
        serde_json::Value::Object(_) | serde_json::Value::Bool(_) | serde_json::Value::Null => {}
    }
}

/// The API's request validation. Mode byte % 6: 0 an email (normalizing is idempotent and
/// bounded), 1 a tenant name (accepted names are DNS labels), 2 an id, 3 a password
/// `NUL`-separated from identity strings (refusals never quote it), 4 a page token of the
/// tenant/user listings, 5 an audit page token (both round-trip).
pub fn api_request(data: &[u8]) {
    use tenantry_api::service::admin;
    use tenantry_api::validate;

    let Some((mode, parts)) = split(data) else {
        return;
    };
    let Some(first) = parts.first().copied().and_then(text) else {
        return;
    };
    match mode % 6 {
        0 => {
            if let Ok(email) = validate::normalize_email(first) {
                assert!(email.len() <= validate::MAX_EMAIL_LEN);
                assert_eq!(email.matches('@').count(), 1);
                assert_eq!(validate::normalize_email(&email), Ok(email.clone()));
            }
        }
        1 => {
            if validate::tenant_name(first).is_ok() {
                assert!((3..=40).contains(&first.len()));
                assert!(
                    first
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                );
                assert!(first.starts_with(|c: char| c.is_ascii_lowercase()));
            }
        }
        2 => {
            if validate::is_id(first) {
                assert_eq!(first.len(), 36);
            }
        }
        3 => {
            let identity: Vec<&str> = parts[1..].iter().filter_map(|p| text(p)).collect();
            let password = SecretString::from(first);
            if let Err(e) = tenantry_api::password::check_policy(&password, &identity) {
                // As for tokens: the policy's fixed texts are lowercase, without '.' or '_'.
                let message = e.to_string();
                let distinct =
                    first.contains(|c: char| c == '.' || c == '_' || c.is_ascii_uppercase());
                assert!(!distinct || !message.contains(first), "{message}");
            }
        }
        4 => {
            if let Ok(Some((ms, id))) = admin::decode_cursor(first) {
                let again = admin::decode_cursor(&admin::encode_cursor(ms, &id));
                assert!(matches!(again, Ok(Some((m, i))) if m == ms && i == id));
            }
        }
        _ => {
            if let Ok(cursor) = admin::decode_audit_cursor(first)
                && let Some(through) = cursor.through
            {
                assert!(0 <= cursor.after && cursor.after <= through);
                let after = u64::try_from(cursor.after).unwrap_or_default();
                let again = admin::decode_audit_cursor(&admin::encode_audit_cursor(after, through));
                assert!(again.is_ok_and(|c| c == cursor));
            }
        }
    }
}

/// The duration and value parsers of the API's flags: humantime durations (an accepted
/// duration prints as text that parses back to it), the instance token lifetime (within
/// 1 s to 15 min when accepted), the mail domain, and plan names.
pub fn durations(data: &[u8]) {
    let Some(text) = text(data) else {
        return;
    };
    if let Ok(d) = humantime::parse_duration(text) {
        let printed = humantime::format_duration(d).to_string();
        assert_eq!(
            humantime::parse_duration(&printed).ok(),
            Some(d),
            "{printed}"
        );
    }
    if let Ok(d) = tenantry_api::config::parse_token_ttl(text) {
        let secs = d.as_secs_f64();
        assert!((1.0..=900.0).contains(&secs), "{d:?}");
    }
    if let Ok(domain) = tenantry_api::config::parse_domain(text) {
        assert!(domain.len() <= 200);
        assert_eq!(
            tenantry_api::config::parse_domain(&domain),
            Ok(domain.clone())
        );
    }
    if let Some(plan) = tenantry_proto::retention::Plan::parse(text) {
        assert_eq!(plan.as_str(), text);
    }
    // `--trusted-proxies`: an accepted CIDR holds the address it was written with when
    // that is a bare address, and parses the same way twice.
    if let Ok(cidr) = text.parse::<tenantry_api::forwarded::Cidr>() {
        assert_eq!(text.parse::<tenantry_api::forwarded::Cidr>(), Ok(cidr));
        if let Ok(ip) = text.trim().parse::<std::net::IpAddr>() {
            assert!(cidr.contains(ip), "{text}");
        }
    }
    // The OAuth 2 provider host patterns of the runtime's config and the Tenant's spec.
    if tenantry_proto::runtime_config::host_entry_problem(text).is_none() {
        assert!(!text.contains('/') && !text.contains('@'), "{text}");
    }
}

/// The PEM and key loaders. Mode byte % 7: 0 the token public key (SPKI PEM), 1 the token
/// signing key (PKCS#8 PEM; a loaded key signs tokens its own verifier accepts), 2 a
/// certificate (`parse_certificate`), 3 `cert NUL key` as the runtime's serving pair,
/// 4 `cert NUL key` as a CA, 5 the API's master key file and 6 a sealed secret opened
/// with a fixture master key. No key loader's error repeats a line of the key.
pub fn keys(data: &[u8]) {
    let Some((mode, parts)) = split(data) else {
        return;
    };
    let rest = data.get(1..).unwrap_or_default();
    let first = parts.first().copied().unwrap_or_default();
    let second = parts.get(1).copied().unwrap_or_default();
    match mode % 7 {
        0 => {
            if let Some(pem) = text(rest) {
                let _ = TokenVerifier::from_public_key_pem(pem);
            }
        }
        1 => {
            let Some(pem) = text(rest) else {
                return;
            };
            match TokenSigner::from_pkcs8_pem(&SecretString::from(pem)) {
                Ok(signer) => {
                    let verifier = TokenVerifier::from_public_key_pem(&signer.public_key_pem());
                    assert!(verifier.is_ok_and(|v| v == signer.verifier()));
                }
                Err(e) => assert_quotes_no_line(&e.to_string(), pem, ""),
            }
        }
        2 => {
            if let Some(pem) = text(rest) {
                let _ = tenantry_pki::parse_certificate(pem);
            }
        }
        3 => {
            let provider = tenant_runtime::tls::provider();
            if let Err(e) = tenant_runtime::tls::certified_key(first, second, &provider)
                && let Some(key) = text(second)
            {
                assert_quotes_no_line(&e, key, &String::from_utf8_lossy(first));
            }
        }
        4 => {
            let (Some(cert), Some(key)) = (text(first), text(second)) else {
                return;
            };
            let key_secret = SecretString::from(key);
            if let Ok(info) = tenantry_pki::parse_certificate(cert) {
                let _ = tenantry_pki::key_matches(&info, &key_secret);
            }
            if let Err(e) = tenantry_pki::CertificateAuthority::from_pem(cert, &key_secret) {
                assert_quotes_no_line(&e.to_string(), key, cert);
            }
        }
        5 => {
            let Some(key) = text(rest) else {
                return;
            };
            if let Err(e) = tenantry_api::crypto::MasterKey::from_base64(&SecretString::from(key)) {
                assert_quotes_no_line(&e.to_string(), key, "");
            }
            // The same text as a key file of several lines.
            if let Err(e) = tenantry_api::crypto::MasterKeyRing::parse(&SecretString::from(key)) {
                assert_quotes_no_line(&e.to_string(), key, "");
            }
        }
        _ => {
            let (Some(context), Some(sealed)) = (text(first), text(second)) else {
                return;
            };
            let key = tenantry_api::crypto::MasterKeyRing::single(
                tenantry_api::crypto::MasterKey::from_bytes(&SecretBox::new(Box::new([9u8; 32]))),
            );
            if let Ok(opened) = key.open(context, sealed) {
                // Only a real seal opens: sealing it again gives a fresh, openable text.
                let resealed = key.seal(context, opened.expose_secret());
                assert!(resealed.is_ok_and(|s| key.open(context, &s).is_ok()));
            }
        }
    }
}

/// Fails when `message` contains a line of `secret` that is key material: 12 characters
/// or more with one of base64's `+/=` (which no loader's fixed text has), not PEM armour,
/// and not also in the input that is not secret (`public`, e.g. the certificate).
fn assert_quotes_no_line(message: &str, secret: &str, public: &str) {
    for line in secret.lines().map(str::trim) {
        if line.len() >= 12
            && line.contains(['+', '/', '='])
            && !line.starts_with("-----")
            && !public.contains(line)
        {
            assert!(!message.contains(line), "error quotes the key: {message}");
        }
    }
}

/// The committed inputs of `target`: its seed corpus and its crash reproducers.
pub fn corpus_files(target: &str) -> std::io::Result<Vec<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let dir = root.join(dir).join(target);
        if dir.is_dir() {
            files.extend(files_under(&dir)?);
        }
    }
    files.sort();
    Ok(files)
}

fn files_under(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(files_under(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// `main` of a target built without libFuzzer: runs `body` on every file named on the
/// command line (directories are walked), e.g. to replay a crash on a stable toolchain.
pub fn replay_main(body: Body) -> ExitCode {
    let mut count = 0usize;
    for arg in std::env::args_os().skip(1) {
        let files = match files_under(Path::new(&arg)) {
            Ok(files) => files,
            Err(e) => {
                eprintln!("{}: {e}", Path::new(&arg).display());
                return ExitCode::FAILURE;
            }
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(data) => {
                    body(&data);
                    count += 1;
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    eprintln!("replayed {count} inputs without a failure");
    ExitCode::SUCCESS
}
