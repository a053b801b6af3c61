//! Authentication: a tower layer that resolves `authorization: Bearer <session token>` into
//! an [`Authn`] request extension before any handler runs. Handlers take the resolved
//! [`Caller`] through [`caller`]; they never see the raw header.

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

use crate::access::{Access, HeldRole, Role};
use crate::crypto::hash_secret;
use crate::error::{AuthFailure, DenyReason, Error, Result};
use crate::state::AppState;
use crate::store::SessionRow;

/// Role every user has.
pub const ROLE_USER: &str = "user";

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// Platform role grants as of this request, expired ones included: whether a grant
    /// works is decided against the clock at each check ([`require_role`]).
    pub roles: Vec<HeldRole>,
    /// The user has confirmed TOTP.
    pub mfa_enrolled: bool,
    /// The user has verified their email address.
    pub email_verified: bool,
    /// SHA-256 of the session token (identifies the session; not a secret by itself).
    pub session_hash: String,
    /// When this session verified a second factor.
    pub mfa_verified_at_ms: Option<i64>,
    /// The session's absolute expiry.
    pub expires_at_ms: i64,
    /// The user's tenants, as of this request.
    pub tenant_ids: Vec<String>,
}

/// What the layer found about the caller.
#[derive(Debug, Clone)]
pub enum Authn {
    /// No credentials given.
    Anonymous,
    /// Credentials given but unknown, expired or malformed.
    Invalid(AuthFailure),
    /// The store could not be asked.
    Unavailable,
    /// A live session.
    Session(Caller),
}

/// The caller's address: the one [`crate::forwarded::ForwardedLayer`] resolved (a trusted
/// proxy's `x-forwarded-for`), else the connection's.
pub fn source_of<T>(req: &tonic::Request<T>) -> Option<IpAddr> {
    req.extensions()
        .get::<crate::forwarded::ClientAddr>()
        .map(|c| c.0)
        .or_else(|| req.remote_addr().map(|a| a.ip()))
}

/// The caller's address as audit rows record it (empty when unknown).
pub fn source_text(source: Option<IpAddr>) -> String {
    source.map(|ip| ip.to_string()).unwrap_or_default()
}

/// The authenticated caller, or `UNAUTHENTICATED`.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller> {
    match req.extensions().get::<Authn>() {
        Some(Authn::Session(c)) => Ok(c.clone()),
        Some(Authn::Invalid(why)) => Err(Error::Unauthenticated(*why)),
        Some(Authn::Unavailable) => Err(Error::Unavailable(sqlx::Error::PoolTimedOut)),
        Some(Authn::Anonymous) | None => {
            Err(Error::Unauthenticated(AuthFailure::MissingCredentials))
        }
    }
}

impl Caller {
    /// The roles whose grant works at `now_ms`.
    pub fn live_roles(&self, now_ms: i64) -> impl Iterator<Item = Role> + '_ {
        self.roles
            .iter()
            .filter(move |r| r.live_at(now_ms))
            .map(|r| r.role)
    }

    /// Grants that have reached their expiry (to be recorded as expired).
    pub fn expired_roles(&self, now_ms: i64) -> impl Iterator<Item = HeldRole> + '_ {
        self.roles
            .iter()
            .filter(move |r| !r.live_at(now_ms))
            .copied()
    }
}

/// Checks the admin gate: a live grant of a role that allows `access` (`admin` for
/// changes, `admin` or `auditor` for reads) AND a second factor on this session within the
/// step-up window. Expiry is checked against the clock now, so a grant stops working at
/// its expiry without anything else happening.
pub fn require_role(state: &AppState, caller: &Caller, access: Access) -> Result<()> {
    let now = state.now_ms();
    if !caller.live_roles(now).any(|r| access.allows(r)) {
        return Err(Error::PermissionDenied(DenyReason::AdminRoleRequired));
    }
    let Some(verified) = caller.mfa_verified_at_ms else {
        return Err(Error::PermissionDenied(DenyReason::MfaRequired));
    };
    let max_age = crate::clock::duration_ms(state.sessions.admin_mfa_max_age);
    if state.now_ms().saturating_sub(verified) > max_age {
        return Err(Error::PermissionDenied(DenyReason::MfaTooOld));
    }
    Ok(())
}

/// Resolves a bearer token into a caller, enforcing the idle and absolute timeouts.
/// Expired sessions are deleted as they are found.
///
/// The common case asks no database: the session is in this replica's cache (see
/// [`crate::store::session_cache`]), whose revocations arrive within a second from every
/// replica. A session that looks expired to the cache is checked against the database (another
/// replica may have seen a later use) before it is refused.
pub async fn resolve(state: &AppState, token: &SecretString) -> Authn {
    let hash = hash_secret(token.expose_secret());
    let now = state.now_ms();
    let idle_ms = crate::clock::duration_ms(state.sessions.idle_timeout);
    let cache = state.store.session_cache();
    if let Some(hit) = cache.get(&hash) {
        if now < hit.row.expires_at_ms && now - hit.last_used_ms() < idle_ms {
            hit.touch(now);
            return Authn::Session(caller_of(&hit.row));
        }
        cache.remove(&hash);
    }
    // Read before the database: a change arriving meanwhile keeps this row out of the cache.
    let generation = cache.generation();
    let mut session = match state.store.session(&hash).await {
        Ok(Some(s)) => s,
        Ok(None) => return Authn::Invalid(AuthFailure::SessionInvalid),
        Err(e) => {
            tracing::warn!(error = %e, "session lookup failed");
            return Authn::Unavailable;
        }
    };
    // A use this replica has not written yet counts as much as one in the database.
    if let Some(used) = cache.unwritten_use(&hash) {
        session.last_seen_ms = session.last_seen_ms.max(used);
    }
    if now >= session.expires_at_ms || now - session.last_seen_ms >= idle_ms {
        if let Err(e) = state.store.delete_session(&hash, None, now).await {
            tracing::warn!(error = %e, "could not delete expired session");
        }
        return Authn::Invalid(AuthFailure::SessionInvalid);
    }
    let caller = caller_of(&session);
    let stale = now - session.last_seen_ms >= state.sessions.touch_granularity_ms();
    // Kept: the use is written with the next batch. Not kept (the cache cannot be trusted
    // now): written here, as often as the granularity allows.
    if !cache.insert(generation, session, now)
        && stale
        && let Err(e) = state.store.touch_session(&hash, now).await
    {
        tracing::warn!(error = %e, "could not record session use");
    }
    Authn::Session(caller)
}

fn caller_of(session: &SessionRow) -> Caller {
    Caller {
        user_id: session.user_id.clone(),
        email: session.email.clone(),
        roles: session.roles.clone(),
        mfa_enrolled: session.mfa_enrolled,
        email_verified: session.email_verified,
        session_hash: session.token_hash.clone(),
        mfa_verified_at_ms: session.mfa_verified_at_ms,
        expires_at_ms: session.expires_at_ms,
        tenant_ids: session.tenant_ids.clone(),
    }
}

/// Parses `Bearer <token>` (scheme case-insensitive); `Err` for any other form.
pub fn bearer_token(value: &http::HeaderValue) -> Result<SecretString, AuthFailure> {
    let malformed = AuthFailure::MalformedAuthorization;
    let text = value.to_str().map_err(|_| malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > 512 {
        return Err(malformed);
    }
    Ok(SecretString::from(token.to_owned()))
}

/// The layer; wrap the gRPC router with it.
#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<AppState>,
}

impl AuthLayer {
    /// A layer resolving sessions against `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        AuthLayer { state }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S, B> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let authn = match req.headers().get(http::header::AUTHORIZATION) {
                None => Authn::Anonymous,
                Some(value) => match bearer_token(value) {
                    Ok(token) => resolve(&state, &token).await,
                    Err(why) => Authn::Invalid(why),
                },
            };
            req.extensions_mut().insert(authn);
            inner.call(req).await
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let ok = bearer_token(&http::HeaderValue::from_static("Bearer abc")).unwrap();
        assert_eq!(ok.expose_secret(), "abc");
        assert!(bearer_token(&http::HeaderValue::from_static("bearer  abc ")).is_ok());
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert!(
                bearer_token(&http::HeaderValue::from_static(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
