//! The HTTP API: `/healthz`, `/readyz`, `/metrics`, and the token-protected JSON API under
//! `/v1` (executions, credentials, and connecting OAuth 2 grants).
//!
//! Every error is a JSON body `{"error": "<code>", "message": "<text>"}`. Request bodies
//! must be `application/json`, within the size limit (413 past it), and match the
//! expected shape exactly (bad JSON or unknown fields: 400). Errors about a credential
//! body never quote the body, since it carries a secret.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use http::{StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use zeroize::Zeroizing;

use crate::auth::{Caller, TokenCheck, require_token};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::oauth::OAuth;
use crate::store::{CredentialKind, Cursor, NewCredential, NewExecution, Store};
use crate::tls::CertResolver;

/// Largest page of executions.
pub const MAX_PAGE: u32 = 500;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 50;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The tenant's database.
    pub store: Store,
    /// Checks instance tokens.
    pub tokens: TokenCheck,
    /// The time.
    pub clock: Clock,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The serving certificate (readiness checks its files).
    pub certs: Arc<CertResolver>,
    /// OAuth 2 grants.
    pub oauth: Arc<OAuth>,
}

/// A request body type, and whether a parse error may quote its content.
pub trait RequestBody: DeserializeOwned {
    /// `true` when the body holds a secret, so errors must not quote it.
    const HOLDS_SECRET: bool;
    /// What the body should look like, for error messages.
    const SHAPE: &'static str;
}

impl RequestBody for NewExecution {
    const HOLDS_SECRET: bool = false;
    const SHAPE: &'static str = "{workflow_id, status, started_at, finished_at?, data?}";
}

impl RequestBody for NewCredential {
    const HOLDS_SECRET: bool = true;
    const SHAPE: &'static str = "{name, kind: \"api_key\"|\"oauth2\", secret: {…}, oauth2?: {…}}";
}

/// A JSON request body with this API's errors (see the module docs).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: RequestBody,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "request body must be application/json",
            ));
        }
        let bytes = read_body(request).await?;
        parse_body(&bytes).map(JsonBody)
    }
}

/// Parses a request body already read: 400 with [`body_error`]'s message when it does
/// not match `T`. Public so the fuzz targets reach it.
pub fn parse_body<T: RequestBody>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(body_error(&e, T::HOLDS_SECRET, T::SHAPE)))
}

/// The whole body (within the [`DefaultBodyLimit`]) in a buffer that is wiped when
/// dropped, since it may hold a credential's secret. It is sized from `Content-Length`
/// when given and otherwise grows by moving to a larger wiped buffer, so no copy of the
/// body is left behind in freed memory by this code.
async fn read_body(request: Request) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    use axum::RequestExt as _;
    use http_body_util::BodyExt as _;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    // `refuse_oversized` already refused lengths over the limit.
    let mut buf = Zeroizing::new(Vec::with_capacity(declared));
    let mut body = request.into_limited_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if is_length_limit(&e) {
                payload_too_large()
            } else {
                ApiError::bad_request("cannot read request body")
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.capacity() - buf.len() < data.len() {
                let needed = buf.len() + data.len();
                let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(buf.capacity() * 2)));
                bigger.extend_from_slice(&buf);
                // The old buffer is wiped as it is dropped here.
                buf = bigger;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Whether reading the body failed because it went past the size limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The 400 message for a body that did not parse.
fn body_error(e: &serde_json::Error, holds_secret: bool, shape: &str) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => format!(
            "request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
        Category::Io => "cannot read request body".to_owned(),
        Category::Data => {
            let message = e.to_string();
            // These messages name fields, never values.
            let names_only = ["unknown field", "missing field", "secret must be"]
                .iter()
                .any(|p| message.starts_with(p));
            if !holds_secret || names_only {
                format!("invalid request body: {message}")
            } else {
                format!(
                    "invalid request body: expected {shape} (line {}, column {})",
                    e.line(),
                    e.column()
                )
            }
        }
    }
}

/// The router, with `max_body_bytes` as the body limit.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/v1/executions",
            post(create_execution).get(list_executions),
        )
        .route(
            "/v1/executions/{id}",
            get(get_execution).delete(delete_execution),
        )
        .route(
            "/v1/credentials",
            post(create_credential).get(list_credentials),
        )
        .route("/v1/credentials/{id}", delete(delete_credential))
        .route(
            "/v1/credentials/{id}/oauth2/authorize",
            post(authorize_credential),
        )
        .route("/v1/oauth2/callback", get(oauth2_callback))
        .route_layer(middleware::from_fn_with_state(
            state.tokens.clone(),
            require_token,
        ))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            max_body_bytes,
            refuse_oversized,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Refuses a request whose `Content-Length` is over `max_body_bytes` before reading any
/// of its body, so an oversized upload costs neither the bytes up to the limit nor the
/// time to send them. Bodies without a length are cut off at the limit by
/// [`DefaultBodyLimit`] as they are read.
async fn refuse_oversized(
    State(max_body_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(max_body_bytes).unwrap_or(u64::MAX)) {
        return payload_too_large().into_response();
    }
    next.run(request).await
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body is too large",
    )
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .get_or_create(&vec![
            ("method", method),
            ("route", route),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let store = state.store.ping().await;
    let certs = state.certs.check_files_settled().await;
    match (store, certs) {
        (Ok(()), Ok(())) => Json(json!({"status": "ready"})).into_response(),
        (store, certs) => {
            let mut problems = Vec::new();
            if let Err(e) = store {
                tracing::warn!(error = %e, "not ready: store");
                problems.push("store cannot be read");
            }
            if let Err(e) = certs {
                tracing::warn!(error = %e, "not ready: certificate");
                problems.push("certificate files cannot be read");
            }
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                problems.join("; "),
            )
            .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field} must be 1 to {max} characters, without control characters"
        )));
    }
    Ok(())
}

/// The checks on a parsed execution body beyond its shape.
pub fn check_execution(new: &NewExecution) -> Result<(), ApiError> {
    check_text("workflow_id", &new.workflow_id, 256)?;
    check_text("status", &new.status, 64)?;
    if new.finished_at.is_some_and(|f| f < new.started_at) {
        return Err(ApiError::bad_request("finished_at is before started_at"));
    }
    Ok(())
}

/// The checks on a parsed credential body beyond its shape.
pub fn check_credential(new: &NewCredential) -> Result<(), ApiError> {
    check_text("name", &new.name, 200)
}

async fn create_execution(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(new): JsonBody<NewExecution>,
) -> Result<Response, ApiError> {
    check_execution(&new)?;
    let id = state.store.insert_execution(&new).await?;
    state.metrics.stored_executions.inc();
    tracing::info!(subject = %caller.subject, execution = %id, "execution stored");
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

/// Query of `GET /v1/executions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The page size and cursor of a listing's query, checked.
fn page_params(
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<(u32, Option<Cursor>), ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let cursor = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?),
    };
    Ok((limit, cursor))
}

/// Reads `GET /v1/executions`'s query from a request URI as the handler does: the page
/// size and cursor, or the 400 the handler answers. Public so the fuzz targets reach it.
pub fn list_query(uri: &http::Uri) -> Result<(u32, Option<Cursor>), ApiError> {
    page_params(Query::try_from_uri(uri))
}

async fn list_executions(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (limit, cursor) = page_params(query)?;
    let page = state.store.list_executions(limit, cursor.as_ref()).await?;
    Ok(Json(json!({
        "items": page.items,
        "next_cursor": page.next_cursor.map(|c| c.encode()),
    }))
    .into_response())
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::bad_request("invalid id in path"))
}

async fn get_execution(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    match state.store.get_execution(&id).await? {
        Some(execution) => Ok(Json(execution).into_response()),
        None => Err(ApiError::not_found("execution")),
    }
}

async fn delete_execution(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path_id(path)?;
    if !state.store.delete_execution(&id).await? {
        return Err(ApiError::not_found("execution"));
    }
    state.metrics.stored_executions.dec();
    tracing::info!(subject = %caller.subject, execution = %id, "execution deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The secret of an `oauth2` credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSecret {
    #[allow(dead_code)] // Only its shape is checked here; the store keeps the JSON.
    client_secret: String,
}

async fn create_credential(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(new): JsonBody<NewCredential>,
) -> Result<Response, ApiError> {
    check_credential(&new)?;
    match (new.kind, &new.oauth2) {
        (CredentialKind::ApiKey, Some(_)) => {
            return Err(ApiError::bad_request(
                "oauth2 settings are only for kind \"oauth2\"",
            ));
        }
        (CredentialKind::OAuth2, None) => {
            return Err(ApiError::bad_request(
                "kind \"oauth2\" needs oauth2: {authorization_url, token_url, revocation_url?, client_id, scopes, redirect_url}",
            ));
        }
        (CredentialKind::OAuth2, Some(settings)) => {
            // Never quote the secret: the parse error of a string field could.
            if serde_json::from_str::<ClientSecret>(new.secret.expose_json()).is_err() {
                return Err(ApiError::bad_request(
                    "the secret of an oauth2 credential must be {\"client_secret\": string}",
                ));
            }
            state.oauth.check_settings(settings)?;
        }
        (CredentialKind::ApiKey, None) => {}
    }
    let meta = state
        .store
        .insert_credential(&new, state.clock.now())
        .await?;
    tracing::info!(subject = %caller.subject, credential = %meta.id, kind = meta.kind.as_str(), "credential stored");
    Ok((StatusCode::CREATED, Json(meta)).into_response())
}

async fn list_credentials(State(state): State<AppState>) -> Result<Response, ApiError> {
    let items = state.store.list_credentials().await?;
    Ok(Json(json!({"items": items})).into_response())
}

/// Deletes a credential at once; an OAuth 2 grant is then revoked at the provider too,
/// and the answer (200, not 204) says how that went.
async fn delete_credential(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let Some(deleted) = state.store.delete_credential(&id).await? else {
        return Err(ApiError::not_found("credential"));
    };
    tracing::info!(subject = %caller.subject, credential = %id, kind = deleted.kind.as_str(), "credential deleted");
    match deleted.grant {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(grant) => {
            let revocation = state.oauth.revoke(&id, grant).await;
            Ok(Json(json!({"id": id, "provider_revocation": revocation})).into_response())
        }
    }
}

async fn authorize_credential(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    match state.oauth.authorize(&id, &caller).await? {
        Some(authorization) => {
            tracing::info!(subject = %caller.subject, credential = %id, "oauth2 authorization started");
            Ok(Json(authorization).into_response())
        }
        None => match state.store.credential_kind(&id).await? {
            Some(_) => Err(ApiError::bad_request(
                "credential is not of kind \"oauth2\"",
            )),
            None => Err(ApiError::not_found("credential")),
        },
    }
}

/// Query of `GET /v1/oauth2/callback`: the provider's redirect parameters, forwarded.
/// Other parameters a provider adds (`scope`, `iss`, …) are ignored.
#[derive(Deserialize)]
struct CallbackParams {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

async fn oauth2_callback(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<CallbackParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|_| ApiError::bad_request("invalid callback parameters"))?;
    let Some(state_param) = params.state.filter(|s| !s.is_empty()) else {
        return Err(ApiError::bad_request("state is required"));
    };
    let code = match (params.code.filter(|c| !c.is_empty()), params.error) {
        (Some(code), None) => code,
        (_, Some(error)) => {
            // The user declined (or the provider failed): the state is used up all the same.
            let _ = state
                .store
                .take_oauth2_state(
                    &crate::oauth::state_hash(&state_param),
                    &caller.subject,
                    &caller.token_id,
                    state.clock.now(),
                )
                .await?;
            let code: String = error
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "authorization_denied",
                format!("the provider answered {code}"),
            ));
        }
        (None, None) => return Err(ApiError::bad_request("code is required")),
    };
    let id = state.oauth.complete(&caller, &code, &state_param).await?;
    tracing::info!(subject = %caller.subject, credential = %id, "oauth2 authorization completed");
    let meta = state
        .store
        .list_credentials()
        .await?
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(|| ApiError::not_found("credential"))?;
    Ok(Json(meta).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn credential_body_errors_never_quote_values() {
        let body = r#"{"name": 12345, "kind": "api_key", "secret": {"k": "sk-live-XYZ"}}"#;
        let e = serde_json::from_str::<NewCredential>(body).unwrap_err();
        let msg = body_error(&e, true, NewCredential::SHAPE);
        assert!(!msg.contains("12345"), "{msg}");
        let wrong_secret = r#"{"name": "n", "kind": "api_key", "secret": "sk-live-XYZ"}"#;
        let e = serde_json::from_str::<NewCredential>(wrong_secret).unwrap_err();
        let msg = body_error(&e, true, NewCredential::SHAPE);
        assert!(!msg.contains("sk-live-XYZ"), "{msg}");
        assert!(msg.contains("secret must be a JSON object"), "{msg}");
        let unknown = r#"{"name": "n", "kind": "api_key", "secret": {}, "extra": 1}"#;
        let e = serde_json::from_str::<NewCredential>(unknown).unwrap_err();
        assert!(body_error(&e, true, NewCredential::SHAPE).contains("unknown field `extra`"));
    }
}
