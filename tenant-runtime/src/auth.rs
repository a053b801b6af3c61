//! Bearer-token authentication for `/v1`: a middleware that verifies the instance token
//! (see [`tenantry_proto::token`]) for this tenant and puts the resolved [`Caller`] in the
//! request's extensions. Handlers take the `Caller`, never the raw header.

use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use jiff::Timestamp;
use tenantry_proto::token::TokenVerifier;

use crate::api::{ApiError, AppState};

/// The verifier in use; replaced when the public key file changes.
pub type SharedVerifier = Arc<RwLock<Arc<TokenVerifier>>>;

/// Who made a request, from their verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `jti`.
    pub token_id: String,
}

/// The token in an `Authorization: Bearer …` header value (scheme case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Refuses requests without a valid token for this tenant (401 with a JSON error and a
/// `WWW-Authenticate` challenge); otherwise runs the handler with a [`Caller`].
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = header.and_then(bearer_token) else {
        return ApiError::unauthorized("missing bearer token").into_response();
    };
    let verifier = state
        .verifier
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match verifier.verify(token, &state.tenant_id, Timestamp::now()) {
        Ok(claims) => {
            request.extensions_mut().insert(Caller {
                subject: claims.sub,
                token_id: claims.jti,
            });
            next.run(request).await
        }
        Err(e) => {
            // The error names the failed check; it never contains the token.
            tracing::debug!(reason = %e, "token refused");
            ApiError::unauthorized(&e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
