//! Bearer-token authentication for `/v1`: a middleware that verifies the instance token
//! (see [`tenantry_proto::token`]) for this tenant and puts the resolved [`Caller`] in the
//! request's extensions. Handlers take the `Caller`, never the raw header.

use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use tenantry_proto::token::TokenVerifier;

use crate::clock::Clock;
use crate::error::ApiError;

/// The verifier in use; replaced when the public key file changes.
pub type SharedVerifier = Arc<RwLock<Arc<TokenVerifier>>>;

/// What the token check needs: this tenant's id (the audience tokens must carry), the
/// current verifier and the clock.
#[derive(Clone, Debug)]
pub struct TokenCheck {
    /// This tenant's id.
    pub tenant_id: Arc<str>,
    /// Verifies tokens.
    pub verifier: SharedVerifier,
    /// The time tokens are checked at.
    pub clock: Clock,
}

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
    State(check): State<TokenCheck>,
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
    let verifier = check
        .verifier
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match verifier.verify(token, &check.tenant_id, check.clock.now()) {
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
