//! OAuth 2 grants: connecting a credential of kind `oauth2` (authorization-code flow with
//! PKCE S256 and a single-use `state`), keeping its access token current (the refresher),
//! handing it to executions (counted), and revoking it at the provider when it is
//! deleted (RFC 7009).
//!
//! Tokens live only sealed in the store and, briefly, in memory as `SecretString`s; they
//! are never returned by the HTTP API, never logged, and never part of an error. Every
//! call to a provider goes through [`Provider`], which enforces `oauth2.allowed_hosts`.
//!
//! Refresh timing: at two thirds of the access token's lifetime, less a random part of up
//! to a tenth of it (so many grants made at once do not refresh at once), never sooner
//! than [`MIN_REFRESH_DELAY`]. A failed refresh is retried after 1 s, 2 s, 4 s, … up to
//! [`MAX_RETRY_DELAY`] (plus up to a tenth at random); a refresh the provider refuses with
//! `invalid_grant` is not retried: the grant becomes `needs_reauthorization` and its
//! tokens are deleted.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use oauth2::basic::{BasicClient, BasicTokenResponse};
use oauth2::{
    AccessToken, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, RevocationUrl, Scope,
    StandardErrorResponse, StandardRevocableToken, TokenResponse as _, TokenUrl,
};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, watch};

use crate::auth::Caller;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::store::{
    DeletedGrant, GrantState, GrantTokens, OAuth2Settings, PendingAuthorization, Store, Written,
};

/// How long an authorization may take between `authorize` and the callback.
pub const STATE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The earliest a refresh is scheduled after tokens arrive.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);
/// The longest wait before retrying a failed refresh.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How often the refresher looks at the store when nothing wakes it.
const IDLE_CHECK: Duration = Duration::from_secs(60);
/// The shortest pause between two refresher passes.
const MIN_PASS_GAP: Duration = Duration::from_millis(200);

/// When to refresh an access token of `lifetime`: at 2/3 of it, less `jitter` (0 to 1)
/// times a tenth of it, and not sooner than [`MIN_REFRESH_DELAY`].
pub fn refresh_delay(lifetime: Duration, jitter: f64) -> Duration {
    let fraction = 2.0 / 3.0 - jitter.clamp(0.0, 1.0) / 10.0;
    lifetime.mul_f64(fraction).max(MIN_REFRESH_DELAY)
}

/// How long to wait before retry number `failures` (1 for the first) of a failed
/// refresh: 1 s doubling up to [`MAX_RETRY_DELAY`], plus `jitter` (0 to 1) tenths.
pub fn retry_delay(failures: i64, jitter: f64) -> Duration {
    let exponent = u32::try_from(failures.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    let base = Duration::from_secs(1u64 << exponent).min(MAX_RETRY_DELAY);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 10.0)
}

/// A uniform random number in [0, 1) (0.5 if the system's generator fails: jitter is a
/// nicety, not a security property).
fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

/// `now + d`, saturating.
fn after(now: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The key an authorization in progress is stored under: the hex SHA-256 of its `state`
/// (the value itself is not kept).
pub fn state_hash(state: &str) -> String {
    let digest = Sha256::digest(state.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OAuth 2 error code as safe to show: letters, digits and `_`, at most 64.
fn error_code(value: Option<serde_json::Value>) -> String {
    let code: String = value
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown_error")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    if code.is_empty() {
        "unknown_error".to_owned()
    } else {
        code
    }
}

/// Our error for a failed provider request. The crate's parse error carries the response
/// body (a token response, when parsing a success failed), so nothing of it is kept.
fn request_error<T>(
    step: &'static str,
    e: RequestTokenError<Error, StandardErrorResponse<T>>,
) -> Error
where
    T: oauth2::ErrorResponseType + std::fmt::Display + 'static,
{
    match e {
        RequestTokenError::ServerResponse(r) => Error::ProviderRefused {
            step,
            code: error_code(serde_json::to_value(r.error()).ok()),
        },
        RequestTokenError::Request(inner) => inner,
        RequestTokenError::Parse(_, _) => Error::ProviderUnavailable {
            step,
            reason: "the response is not a valid OAuth 2 response".to_owned(),
        },
        RequestTokenError::Other(_) => Error::ProviderUnavailable {
            step,
            reason: "unexpected response".to_owned(),
        },
    }
}

fn endpoint<T>(
    what: &'static str,
    url: &str,
    make: impl FnOnce(String) -> Result<T, oauth2::url::ParseError>,
) -> Result<T> {
    make(url.to_owned()).map_err(|_| Error::EndpointRefused {
        what,
        reason: "must be an absolute https URL".to_owned(),
    })
}

/// The tokens of a token response; the refresh token is `previous` when the provider did
/// not rotate it.
fn tokens_from(
    response: &BasicTokenResponse,
    previous: Option<SecretString>,
) -> (GrantTokens, Option<Duration>) {
    let tokens = GrantTokens {
        access: SecretString::from(response.access_token().secret().as_str()),
        refresh: response
            .refresh_token()
            .map(|r| SecretString::from(r.secret().as_str()))
            .or(previous),
    };
    (tokens, response.expires_in())
}

/// What `POST /v1/credentials/{id}/oauth2/authorize` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Authorization {
    /// Where to send the user: the provider's authorization endpoint with the client id,
    /// redirect URL, scopes, `state` and the S256 PKCE challenge.
    pub authorization_url: String,
    /// Until when the callback accepts this authorization's `state`.
    pub state_expires_at: Timestamp,
}

/// Whether deleting a grant revoked it at the provider too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// The provider's revocation endpoint accepted the refresh token (or the access
    /// token, when there was no refresh token).
    Confirmed,
    /// The revocation request failed; the grant may still be valid at the provider.
    Failed,
    /// The credential has no `revocation_url`: the grant is still valid at the provider
    /// until the user removes it there.
    NotOffered,
    /// The grant held no tokens.
    NothingToRevoke,
}

/// The OAuth 2 side of the runtime (see the module docs).
#[derive(Debug)]
pub struct OAuth {
    store: Store,
    provider: Provider,
    clock: Clock,
    metrics: Arc<Metrics>,
    wake: Notify,
}

impl OAuth {
    /// The flows on `store`, calling providers through `provider`.
    pub fn new(store: Store, provider: Provider, clock: Clock, metrics: Arc<Metrics>) -> OAuth {
        OAuth {
            store,
            provider,
            clock,
            metrics,
            wake: Notify::new(),
        }
    }

    /// Checks a new credential's settings: every endpoint `https` on an allowed host,
    /// the redirect URL absolute `https`, client id and scopes well formed.
    pub fn check_settings(&self, s: &OAuth2Settings) -> Result<()> {
        self.provider
            .check_url("authorization_url", &s.authorization_url)?;
        self.provider.check_url("token_url", &s.token_url)?;
        if let Some(url) = &s.revocation_url {
            self.provider.check_url("revocation_url", url)?;
        }
        let redirect = oauth2::url::Url::parse(&s.redirect_url).ok();
        if redirect.as_ref().is_none_or(|u| u.scheme() != "https") {
            return Err(Error::EndpointRefused {
                what: "redirect_url",
                reason: "must be an absolute https URL".to_owned(),
            });
        }
        let printable =
            |v: &str| !v.is_empty() && v.len() <= 512 && v.chars().all(|c| c.is_ascii_graphic());
        if !printable(&s.client_id) {
            return Err(Error::EndpointRefused {
                what: "client_id",
                reason: "must be 1 to 512 printable ASCII characters".to_owned(),
            });
        }
        if s.scopes.len() > 64 || !s.scopes.iter().all(|v| printable(v)) {
            return Err(Error::EndpointRefused {
                what: "scopes",
                reason: "must be at most 64 scopes of printable ASCII without spaces".to_owned(),
            });
        }
        Ok(())
    }

    /// Starts connecting credential `id` for `caller`: a fresh PKCE pair and `state`,
    /// recorded (verifier sealed) for the callback. `None` when there is no `oauth2`
    /// credential `id`.
    pub async fn authorize(&self, id: &str, caller: &Caller) -> Result<Option<Authorization>> {
        let Some((grant, _)) = self.store.grant(id).await? else {
            return Ok(None);
        };
        let s = &grant.settings;
        self.provider
            .check_url("authorization_url", &s.authorization_url)?;
        let client = BasicClient::new(ClientId::new(s.client_id.clone()))
            .set_auth_uri(endpoint(
                "authorization_url",
                &s.authorization_url,
                AuthUrl::new,
            )?)
            .set_redirect_uri(endpoint("redirect_url", &s.redirect_url, RedirectUrl::new)?);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state) = client
            .authorize_url(|| CsrfToken::new_random_len(32))
            .add_scopes(s.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .url();
        let now = self.clock.now();
        let expires_at = after(now, STATE_LIFETIME);
        let hash = state_hash(state.secret());
        let verifier = SecretString::from(verifier.secret().as_str());
        self.store
            .insert_oauth2_state(
                &PendingAuthorization {
                    state_hash: &hash,
                    credential_id: id,
                    subject: &caller.subject,
                    token_id: &caller.token_id,
                    verifier: &verifier,
                    expires_at,
                },
                now,
            )
            .await?;
        Ok(Some(Authorization {
            authorization_url: url.to_string(),
            state_expires_at: expires_at,
        }))
    }

    /// Completes an authorization: uses up `state` (which must be this caller's, from the
    /// same token, and not expired), exchanges `code` with its PKCE verifier, and stores
    /// the tokens sealed; tokens it replaces are revoked at the provider. Returns the
    /// credential id.
    pub async fn complete(&self, caller: &Caller, code: &str, state: &str) -> Result<String> {
        let now = self.clock.now();
        let Some((id, verifier)) = self
            .store
            .take_oauth2_state(&state_hash(state), &caller.subject, &caller.token_id, now)
            .await?
        else {
            return Err(Error::InvalidState);
        };
        // Deleted meanwhile: its states went with it, but a callback may have been past
        // that step already.
        let Some((grant, secret)) = self.store.grant(&id).await? else {
            return Err(Error::InvalidState);
        };
        let s = &grant.settings;
        self.provider.check_url("token_url", &s.token_url)?;
        let client = BasicClient::new(ClientId::new(s.client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
            .set_token_uri(endpoint("token_url", &s.token_url, TokenUrl::new)?)
            .set_redirect_uri(endpoint("redirect_url", &s.redirect_url, RedirectUrl::new)?);
        let provider = self.provider.for_step("code exchange");
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().to_owned()))
            .request_async(&provider)
            .await
            .map_err(|e| request_error("code exchange", e))?;
        let (tokens, lifetime) = tokens_from(&response, None);
        let now = self.clock.now();
        let refresh_at = match (&tokens.refresh, lifetime) {
            (Some(_), Some(l)) => Some(after(now, refresh_delay(l, jitter()))),
            _ => None,
        };
        let written = self
            .store
            .update_grant_tokens(
                &id,
                grant.token_version,
                &tokens,
                lifetime.map(|l| after(now, l)),
                refresh_at,
                true,
                now,
            )
            .await?;
        if written == Written::Stale {
            // Another callback or a delete got there first; these tokens are not kept.
            self.revoke_tokens(&id, s, &secret, tokens).await;
            return Err(Error::InvalidState);
        }
        self.metrics.oauth2_connects.inc();
        tracing::info!(
            credential = %id,
            expires_in_secs = lifetime.map(|l| l.as_secs()),
            refreshable = refresh_at.is_some(),
            "oauth2 grant connected"
        );
        self.wake.notify_one();
        // Connecting again replaces a grant: the one replaced is revoked at the provider,
        // so no second live grant is left behind there.
        if let Some(previous) = grant.tokens {
            self.revoke_tokens(&id, s, &secret, previous).await;
        }
        Ok(id)
    }

    /// Renews grant `id`'s access token with its refresh token, if it is connected and
    /// has one (see the module docs for what a failure does).
    pub async fn refresh(&self, id: &str) -> Result<()> {
        let Some((grant, secret)) = self.store.grant(id).await? else {
            return Ok(());
        };
        let Some(GrantTokens {
            refresh: Some(refresh_token),
            ..
        }) = grant.tokens
        else {
            return Ok(());
        };
        if grant.state != GrantState::Connected {
            return Ok(());
        }
        let s = &grant.settings;
        let outcome = self.request_refresh(s, &secret, &refresh_token).await;
        let now = self.clock.now();
        match outcome {
            Ok(response) => {
                let rotated = response.refresh_token().is_some();
                let (tokens, lifetime) = tokens_from(&response, Some(refresh_token));
                let refresh_at = lifetime.map(|l| after(now, refresh_delay(l, jitter())));
                let written = self
                    .store
                    .update_grant_tokens(
                        id,
                        grant.token_version,
                        &tokens,
                        lifetime.map(|l| after(now, l)),
                        refresh_at,
                        false,
                        now,
                    )
                    .await?;
                if written == Written::Stale {
                    tracing::info!(credential = %id, "grant changed during its refresh; new tokens dropped");
                    if rotated {
                        self.revoke_tokens(id, s, &secret, tokens).await;
                    }
                    return Ok(());
                }
                self.metrics.add_refresh("ok");
                tracing::info!(
                    credential = %id,
                    expires_in_secs = lifetime.map(|l| l.as_secs()),
                    rotated,
                    "oauth2 access token refreshed"
                );
            }
            Err(Error::ProviderRefused { code, .. }) if code == "invalid_grant" => {
                self.metrics.add_refresh("invalid_grant");
                if self
                    .store
                    .mark_needs_reauthorization(id, grant.token_version)
                    .await?
                    == Written::Yes
                {
                    tracing::warn!(
                        credential = %id,
                        "provider refused the refresh token (invalid_grant); grant needs reauthorization"
                    );
                }
            }
            Err(e) => {
                self.metrics.add_refresh("failed");
                let failures = grant.refresh_failures + 1;
                let wait = retry_delay(failures, jitter());
                self.store
                    .record_refresh_failure(id, grant.token_version, after(now, wait))
                    .await?;
                tracing::warn!(
                    credential = %id,
                    error = %e,
                    failures,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "oauth2 refresh failed; retrying"
                );
            }
        }
        Ok(())
    }

    async fn request_refresh(
        &self,
        s: &OAuth2Settings,
        secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<BasicTokenResponse> {
        self.provider.check_url("token_url", &s.token_url)?;
        let client = BasicClient::new(ClientId::new(s.client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
            .set_token_uri(endpoint("token_url", &s.token_url, TokenUrl::new)?);
        let provider = self.provider.for_step("refresh");
        client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.expose_secret().to_owned()))
            .request_async(&provider)
            .await
            .map_err(|e| request_error("refresh", e))
    }

    /// Revokes a deleted grant at the provider (RFC 7009): its refresh token, then its
    /// access token. The answer is about the first of them (the refresh token, or the
    /// access token when there is none); the second is best effort.
    pub async fn revoke(&self, id: &str, grant: DeletedGrant) -> Revocation {
        let Some(tokens) = grant.tokens else {
            return Revocation::NothingToRevoke;
        };
        if grant.settings.revocation_url.is_none() {
            return Revocation::NotOffered;
        }
        let result = self
            .revoke_tokens(id, &grant.settings, &grant.client_secret, tokens)
            .await;
        self.metrics.add_revocation(match result {
            Revocation::Confirmed => "confirmed",
            _ => "failed",
        });
        result
    }

    async fn revoke_tokens(
        &self,
        id: &str,
        s: &OAuth2Settings,
        secret: &SecretString,
        tokens: GrantTokens,
    ) -> Revocation {
        let Some(url) = &s.revocation_url else {
            return Revocation::NotOffered;
        };
        let mut order = Vec::with_capacity(2);
        if let Some(refresh) = &tokens.refresh {
            order.push(StandardRevocableToken::RefreshToken(RefreshToken::new(
                refresh.expose_secret().to_owned(),
            )));
        }
        order.push(StandardRevocableToken::AccessToken(AccessToken::new(
            tokens.access.expose_secret().to_owned(),
        )));
        let mut answer = None;
        for token in order {
            let result = self.revoke_one(s, secret, url, token).await;
            if let Err(e) = &result {
                tracing::warn!(credential = %id, error = %e, "revocation at the provider failed");
            }
            answer.get_or_insert(if result.is_ok() {
                Revocation::Confirmed
            } else {
                Revocation::Failed
            });
        }
        let answer = answer.unwrap_or(Revocation::Failed);
        tracing::info!(credential = %id, revocation = ?answer, "oauth2 grant revoked at the provider");
        answer
    }

    async fn revoke_one(
        &self,
        s: &OAuth2Settings,
        secret: &SecretString,
        url: &str,
        token: StandardRevocableToken,
    ) -> Result<()> {
        self.provider.check_url("revocation_url", url)?;
        let client = BasicClient::new(ClientId::new(s.client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
            .set_revocation_url(endpoint("revocation_url", url, RevocationUrl::new)?);
        let request = client
            .revoke_token(token)
            .map_err(|_| Error::EndpointRefused {
                what: "revocation_url",
                reason: "must be an absolute https URL".to_owned(),
            })?;
        let provider = self.provider.for_step("revocation");
        request
            .request_async(&provider)
            .await
            .map_err(|e| request_error("revocation", e))
    }

    /// Refreshes every due grant, then sleeps until the next one is due (or a grant is
    /// connected, or [`IDLE_CHECK`] passes), until `stop` turns true.
    pub async fn run_refresher(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            match self.store.due_refreshes(self.clock.now()).await {
                Ok(ids) => {
                    for id in ids {
                        if *stop.borrow() {
                            return;
                        }
                        if let Err(e) = self.refresh(&id).await {
                            tracing::error!(credential = %id, error = %e, "oauth2 refresh failed");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read due oauth2 refreshes"),
            }
            let wait = match self.store.next_refresh().await {
                Ok(Some(at)) => {
                    let until = at.duration_since(self.clock.now());
                    Duration::try_from(until)
                        .unwrap_or(Duration::ZERO)
                        .min(IDLE_CHECK)
                }
                Ok(None) => IDLE_CHECK,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the next oauth2 refresh");
                    IDLE_CHECK
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait.max(MIN_PASS_GAP)) => {}
                () = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// The internal call through which an execution obtains grant `id`'s current access
/// token. Each call is counted (the grant's `access_token_uses`, the audit of token use)
/// and logged with the credential id and the count, never the token. The token must go
/// straight into the provider request; it never belongs in execution data.
pub async fn access_token(store: &Store, id: &str, now: Timestamp) -> Result<SecretString> {
    match store.take_access_token(id, now).await? {
        Ok((token, uses)) => {
            tracing::info!(credential = %id, uses, "oauth2 access token handed to an execution");
            Ok(token)
        }
        Err(reason) => Err(Error::GrantUnavailable {
            id: id.to_owned(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn refresh_comes_at_two_thirds_less_up_to_a_tenth() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_delay(hour, 0.0), Duration::from_secs(2400));
        assert_eq!(refresh_delay(hour, 1.0), Duration::from_secs(2040));
        let mid = refresh_delay(hour, 0.5);
        assert!(mid > Duration::from_secs(2040) && mid < Duration::from_secs(2400));
        // Always before expiry, never sooner than the floor.
        assert!(refresh_delay(Duration::from_secs(3), 1.0) < Duration::from_secs(3));
        assert_eq!(
            refresh_delay(Duration::from_millis(100), 0.0),
            MIN_REFRESH_DELAY
        );
    }

    #[test]
    fn retries_back_off_exponentially_to_a_cap() {
        let secs = |n| retry_delay(n, 0.0).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(4)], [1, 2, 4, 8]);
        assert_eq!(secs(9), 256);
        assert_eq!(secs(10), 300);
        assert_eq!(secs(1000), 300);
        assert_eq!(retry_delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, 1.0), Duration::from_millis(4400));
    }

    #[test]
    fn jitter_is_in_the_unit_interval_and_varies() {
        let draws: Vec<f64> = (0..32).map(|_| jitter()).collect();
        assert!(draws.iter().all(|j| (0.0..1.0).contains(j)));
        assert!(draws.iter().any(|j| *j != draws[0]));
    }

    #[test]
    fn state_is_stored_as_its_hash_and_error_codes_are_sanitized() {
        let h = state_hash("abc");
        assert_eq!(h.len(), 64);
        assert_ne!(h, "abc");
        assert_eq!(state_hash("abc"), h);
        assert_eq!(
            error_code(Some(serde_json::json!("invalid_grant"))),
            "invalid_grant"
        );
        assert_eq!(
            error_code(Some(serde_json::json!("bad<script>\n"))),
            "badscript"
        );
        assert_eq!(error_code(Some(serde_json::json!(5))), "unknown_error");
        assert_eq!(error_code(None), "unknown_error");
    }
}
