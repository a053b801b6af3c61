//! The HTTP side: one handler per page and form. Every POST checks the visit's CSRF token
//! first; every signed-in page sends the visitor's API session token from the sealed
//! cookie, and an API answer of `UNAUTHENTICATED` signs the visit out.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::Markup;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use tenantry_proto::retention::Plan;
use tenantry_proto::v1::{
    ChangePasswordRequest, LoginRequest, SetRetentionPolicyRequest, SignupRequest,
};
use tonic::Code;

use crate::api::{Api, Caller, Failure};
use crate::session::{self, CookieKey, Session, Stage};
use crate::views;

/// The stylesheet, the portal's one static file.
const CSS: &str = include_str!("../static/portal.css");

/// What every handler shares.
#[derive(Debug)]
pub struct Portal {
    /// The control API.
    pub api: Api,
    /// The key that seals the cookie.
    pub key: CookieKey,
    /// Whether the cookie is `Secure` (the public URL is https).
    pub secure: bool,
}

/// The visitor's address (from the connection), forwarded to the API.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

type Shared = State<Arc<Portal>>;

/// Every route of the portal.
pub fn router(portal: Arc<Portal>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/signup", get(signup_page).post(signup))
        .route("/login", get(login_page).post(login))
        .route("/login/mfa", get(login_mfa_page).post(login_mfa))
        .route("/retention", post(retention))
        .route("/mfa", get(mfa_page))
        .route("/mfa/enroll", post(mfa_enroll))
        .route("/mfa/confirm", post(mfa_confirm))
        .route("/mfa/remove", post(mfa_remove))
        .route("/account", get(account_page))
        .route("/account/password", post(change_password))
        .route("/logout", post(logout))
        .route("/verify-email", get(verify_email))
        .route("/verify-email/resend", post(resend_verification))
        .route("/static/portal.css", get(css))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(portal)
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A page answer, setting the cookie when `cookie` is given.
fn page(status: StatusCode, markup: Markup, cookie: Option<String>) -> Response {
    let mut response = (status, axum::response::Html(markup.into_string())).into_response();
    set_cookie(&mut response, cookie);
    response
}

/// A `303 See Other` to `to`.
fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    set_cookie(&mut response, cookie);
    response
}

fn set_cookie(response: &mut Response, cookie: Option<String>) {
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

fn internal() -> Response {
    page(StatusCode::INTERNAL_SERVER_ERROR, views::refused(), None)
}

impl Portal {
    /// The visit in the request's cookie, if it is ours and unexpired.
    fn visit(&self, headers: &HeaderMap) -> Option<Session> {
        let sealed = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::from_header)?;
        Session::open(&self.key, sealed, now())
    }

    /// The `Set-Cookie` value for `session`.
    fn cookie(&self, session: &Session) -> Option<String> {
        match session.seal(&self.key) {
            Ok(sealed) => Some(session::set_cookie(
                &sealed,
                session.expires_at,
                now(),
                self.secure,
            )),
            Err(e) => {
                tracing::error!(error = %e, "cannot seal the session cookie");
                None
            }
        }
    }

    /// The visit, or a new anonymous one and its cookie.
    fn visit_or_new(&self, headers: &HeaderMap) -> Option<(Session, Option<String>)> {
        if let Some(s) = self.visit(headers) {
            return Some((s, None));
        }
        let s = Session::anonymous(now()).ok()?;
        let cookie = self.cookie(&s)?;
        Some((s, Some(cookie)))
    }

    /// The visit when the form carries its CSRF token; otherwise the refusal to send.
    fn checked(&self, headers: &HeaderMap, csrf: &str) -> Result<Session, Box<Response>> {
        match self.visit(headers) {
            Some(s) if s.csrf_matches(csrf) => Ok(s),
            other => {
                tracing::info!(
                    had_cookie = other.is_some(),
                    "form refused: missing or wrong CSRF token"
                );
                // A fresh anonymous visit, so reloading the form works.
                let cookie = Session::anonymous(now()).ok().and_then(|s| self.cookie(&s));
                Err(Box::new(page(
                    StatusCode::FORBIDDEN,
                    views::refused(),
                    cookie,
                )))
            }
        }
    }

    /// [`Portal::checked`] for a form only a signed-in visitor may send: anyone else is sent
    /// to sign in.
    fn signed_in_form(&self, headers: &HeaderMap, csrf: &str) -> Result<Session, Box<Response>> {
        let s = self.checked(headers, csrf)?;
        if s.signed_in_token().is_none() {
            return Err(Box::new(redirect("/login", None)));
        }
        Ok(s)
    }

    /// Ends the visit in the browser: a fresh anonymous cookie and a redirect to sign in.
    fn signed_out(&self, notice: &str) -> Response {
        let cookie = Session::anonymous(now()).ok().and_then(|s| self.cookie(&s));
        redirect(&format!("/login?{notice}=1"), cookie)
    }

    /// A cookie for a new API session from `Login`.
    fn sign_in(
        &self,
        token: String,
        mfa_required: bool,
        expires_at: Option<prost_types::Timestamp>,
    ) -> Option<(Session, String)> {
        let stage = if mfa_required {
            Stage::MfaPending
        } else {
            Stage::SignedIn
        };
        let expires = expires_at.map_or_else(|| now() + 3600, |t| t.seconds);
        let s = Session::signed_in(SecretString::from(token), stage, expires).ok()?;
        let cookie = self.cookie(&s)?;
        Some((s, cookie))
    }
}

fn caller<'a>(session: &'a Session, peer: Peer) -> Caller<'a> {
    Caller {
        token: session.token.as_ref(),
        source: peer.0,
    }
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

// ---- signup and login -------------------------------------------------------------------

async fn signup_page(State(p): Shared, headers: HeaderMap) -> Response {
    let Some((s, cookie)) = p.visit_or_new(&headers) else {
        return internal();
    };
    if s.signed_in_token().is_some() {
        return redirect("/", cookie);
    }
    page(
        StatusCode::OK,
        views::signup(&s.csrf, &views::SignupForm::default(), None),
        cookie,
    )
}

#[derive(Debug, Deserialize)]
struct SignupFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: SecretString,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    plan: String,
}

async fn signup(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<SignupFields>,
) -> Response {
    let s = match p.checked(&headers, &f.csrf) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let plan = Plan::parse(&f.plan);
    let form = views::SignupForm {
        email: &f.email,
        tenant: &f.tenant,
        plan,
    };
    let Some(plan) = plan else {
        let markup = views::signup(&s.csrf, &form, Some("choose one of the plans"));
        return page(StatusCode::UNPROCESSABLE_ENTITY, markup, None);
    };
    let anonymous = Caller {
        token: None,
        source: peer.0,
    };
    let signup = p
        .api
        .signup(
            &anonymous,
            SignupRequest {
                email: f.email.clone(),
                password: f.password.expose_secret().to_owned(),
                tenant_name: f.tenant.clone(),
                plan: proto_plan(plan) as i32,
            },
        )
        .await;
    let ids = match signup {
        Ok(ids) => ids,
        Err(failure) => {
            let markup = views::signup(&s.csrf, &form, Some(&failure.message));
            return page(failure.http_status(), markup, None);
        }
    };
    let login = p
        .api
        .login(
            &anonymous,
            LoginRequest {
                email: f.email.clone(),
                password: f.password.expose_secret().to_owned(),
            },
        )
        .await;
    match login {
        Ok(l) => match p.sign_in(l.session_token, l.mfa_required, l.expires_at) {
            Some((_, cookie)) => redirect(&format!("/?tenant={}", ids.tenant_id), Some(cookie)),
            None => internal(),
        },
        // Signed up, but the sign-in did not follow (a lockout, the API went away): the
        // account exists, so the next step is the sign-in page.
        Err(failure) => page(
            failure.http_status(),
            views::login(&s.csrf, &f.email, Some(&failure.message), None, None),
            None,
        ),
    }
}

fn proto_plan(plan: Plan) -> tenantry_proto::v1::Plan {
    match plan {
        Plan::Free => tenantry_proto::v1::Plan::Free,
        Plan::Standard => tenantry_proto::v1::Plan::Standard,
        Plan::Enterprise => tenantry_proto::v1::Plan::Enterprise,
    }
}

#[derive(Debug, Deserialize, Default)]
struct Notices {
    signed_out: Option<String>,
    changed: Option<String>,
    saved: Option<String>,
    tenant: Option<String>,
    verified: Option<String>,
    resent: Option<String>,
}

async fn login_page(State(p): Shared, headers: HeaderMap, Query(q): Query<Notices>) -> Response {
    let Some((s, cookie)) = p.visit_or_new(&headers) else {
        return internal();
    };
    if s.signed_in_token().is_some() {
        return redirect("/", cookie);
    }
    let notice = if q.changed.is_some() {
        Some("Password changed. Sign in with the new one.")
    } else if q.signed_out.is_some() {
        Some("Signed out.")
    } else {
        None
    };
    page(
        StatusCode::OK,
        views::login(&s.csrf, "", None, notice, None),
        cookie,
    )
}

#[derive(Debug, Deserialize)]
struct LoginFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: SecretString,
    /// Where to go once signed in: only a verification link (`/verify-email?token=…`).
    #[serde(default)]
    next: String,
}

async fn login(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<LoginFields>,
) -> Response {
    let s = match p.checked(&headers, &f.csrf) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let login = p
        .api
        .login(
            &Caller {
                token: None,
                source: peer.0,
            },
            LoginRequest {
                email: f.email.clone(),
                password: f.password.expose_secret().to_owned(),
            },
        )
        .await;
    match login {
        Ok(l) => {
            let mfa = l.mfa_required;
            match p.sign_in(l.session_token, mfa, l.expires_at) {
                Some((_, cookie)) if mfa => redirect("/login/mfa", Some(cookie)),
                Some((_, cookie)) => {
                    redirect(verification_next(&f.next).unwrap_or("/"), Some(cookie))
                }
                None => internal(),
            }
        }
        Err(failure) => page(
            failure.http_status(),
            views::login(
                &s.csrf,
                &f.email,
                Some(&failure.message),
                None,
                verification_next(&f.next),
            ),
            None,
        ),
    }
}

/// `next` when it is a verification link of the portal's own, the one place a sign-in
/// may lead back to (anything else would be an open redirect).
fn verification_next(next: &str) -> Option<&str> {
    let token = next.strip_prefix("/verify-email?token=")?;
    valid_token(token).then_some(next)
}

/// A verification token as the API makes them: base64url, 256 bits.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Deserialize)]
struct VerifyQuery {
    #[serde(default)]
    token: String,
}

/// `/verify-email?token=…`, the link in the verification mail: verifies the signed-in
/// user's address, or asks them to sign in first and comes back.
async fn verify_email(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<VerifyQuery>,
) -> Response {
    let token = q.token.trim();
    if !valid_token(token) {
        return page(
            StatusCode::BAD_REQUEST,
            views::verify_failed(
                "This verification link is not valid; copy the whole link from the mail.",
            ),
            None,
        );
    }
    let s = match p.visit(&headers) {
        Some(s) if s.signed_in_token().is_some() => s,
        Some(s) if s.token.is_some() => return redirect("/login/mfa", None),
        _ => {
            let Some((s, cookie)) = p.visit_or_new(&headers) else {
                return internal();
            };
            let next = format!("/verify-email?token={token}");
            return page(
                StatusCode::OK,
                views::login(
                    &s.csrf,
                    "",
                    None,
                    Some("Sign in to verify your email address."),
                    Some(&next),
                ),
                cookie,
            );
        }
    };
    match p
        .api
        .verify_email(&caller(&s, peer), token.to_owned())
        .await
    {
        Ok(()) => redirect("/?verified=1", None),
        Err(f) if f.signed_out() => p.signed_out("signed_out"),
        Err(f) => page(f.http_status(), views::verify_failed(&f.message), None),
    }
}

/// The banner's `resend-verification` button: a new link by mail.
async fn resend_verification(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    match p.api.resend_verification(&caller(&s, peer)).await {
        Ok(()) => redirect("/?resent=1", None),
        Err(f) if f.signed_out() => p.signed_out("signed_out"),
        Err(f) => page(f.http_status(), views::verify_failed(&f.message), None),
    }
}

async fn login_mfa_page(State(p): Shared, headers: HeaderMap) -> Response {
    match p.visit(&headers) {
        Some(s) if s.token.is_some() && s.stage == Stage::MfaPending => {
            page(StatusCode::OK, views::login_mfa(&s.csrf, None), None)
        }
        Some(s) if s.signed_in_token().is_some() => redirect("/", None),
        _ => redirect("/login", None),
    }
}

#[derive(Debug, Deserialize)]
struct CodeFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    otpauth_uri: String,
}

async fn login_mfa(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<CodeFields>,
) -> Response {
    let s = match p.checked(&headers, &f.csrf) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let Some(token) = s.token.clone().filter(|_| s.stage == Stage::MfaPending) else {
        return redirect("/login", None);
    };
    match p
        .api
        .verify_mfa(&caller(&s, peer), f.code.trim().to_owned())
        .await
    {
        Ok(()) => match Session::signed_in(token, Stage::SignedIn, s.expires_at) {
            Ok(done) => redirect("/", p.cookie(&done)),
            Err(_) => internal(),
        },
        Err(failure) if failure.signed_out() => p.signed_out("signed_out"),
        Err(failure) => page(
            failure.http_status(),
            views::login_mfa(&s.csrf, Some(&failure.message)),
            None,
        ),
    }
}

// ---- signed in --------------------------------------------------------------------------

/// The signed-in visit, or the redirect to send instead.
fn signed_in(p: &Portal, headers: &HeaderMap) -> Result<Session, Box<Response>> {
    match p.visit(headers) {
        Some(s) if s.signed_in_token().is_some() => Ok(s),
        Some(s) if s.token.is_some() => Err(Box::new(redirect("/login/mfa", None))),
        _ => Err(Box::new(redirect("/login", None))),
    }
}

/// What a failed call on a signed-in page turns into: sign in again, the one not-found
/// page, or `render` with the message.
fn on_failure(p: &Portal, failure: &Failure, render: impl FnOnce(&str) -> Markup) -> Response {
    if failure.signed_out() {
        return p.signed_out("signed_out");
    }
    if failure.code == Code::NotFound {
        return page(StatusCode::NOT_FOUND, views::not_found(true), None);
    }
    page(failure.http_status(), render(&failure.message), None)
}

async fn dashboard(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<Notices>,
) -> Response {
    let s = match signed_in(&p, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let c = caller(&s, peer);
    let me = match p.api.whoami(&c).await {
        Ok(me) => me,
        Err(f) => return on_failure(&p, &f, views::unavailable),
    };
    let unverified = !me.email_verified;
    let tenant_id = match q.tenant {
        Some(id) => id,
        None => match me.tenant_ids.into_iter().next() {
            Some(id) => id,
            None => return page(StatusCode::OK, views::no_tenant(), None),
        },
    };
    let notice = if q.saved.is_some() {
        Some("Retention saved.")
    } else if q.verified.is_some() {
        Some("Email address verified.")
    } else if q.resent.is_some() {
        Some("A new verification link is on its way.")
    } else {
        None
    };
    match p.api.tenant(&c, &tenant_id).await {
        Ok(tenant) => page(
            StatusCode::OK,
            views::dashboard(&s.csrf, &tenant, None, notice, unverified),
            None,
        ),
        Err(f) => on_failure(&p, &f, views::unavailable),
    }
}

#[derive(Debug, Deserialize)]
struct RetentionFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default)]
    max_age_hours: String,
    #[serde(default)]
    max_count: String,
}

async fn retention(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<RetentionFields>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    let c = caller(&s, peer);
    let parsed = (
        f.max_age_hours.trim().parse::<u32>(),
        f.max_count.trim().parse::<u32>(),
    );
    let result = match parsed {
        (Ok(max_age_hours), Ok(max_count)) => {
            p.api
                .set_retention(
                    &c,
                    SetRetentionPolicyRequest {
                        tenant_id: f.tenant_id.clone(),
                        max_age_hours,
                        max_count,
                    },
                )
                .await
        }
        _ => Err(Failure::new(
            Code::InvalidArgument,
            "enter whole numbers of hours and executions",
        )),
    };
    match result {
        Ok(_) => redirect(
            &format!("/?tenant={}&saved=1", url_component(&f.tenant_id)),
            None,
        ),
        Err(failure) if failure.signed_out() || failure.code == Code::NotFound => {
            on_failure(&p, &failure, views::unavailable)
        }
        Err(failure) => match p.api.tenant(&c, &f.tenant_id).await {
            Ok(tenant) => page(
                failure.http_status(),
                views::dashboard(&s.csrf, &tenant, Some(&failure.message), None, false),
                None,
            ),
            Err(f) => on_failure(&p, &f, views::unavailable),
        },
    }
}

/// `s` made safe for a query string.
fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn mfa_page(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let s = match signed_in(&p, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match p.api.whoami(&caller(&s, peer)).await {
        Ok(me) => page(
            StatusCode::OK,
            views::mfa(&s.csrf, me.mfa_enrolled, None, None),
            None,
        ),
        Err(f) => on_failure(&p, &f, |m| views::mfa(&s.csrf, false, Some(m), None)),
    }
}

#[derive(Debug, Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn mfa_enroll(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    match p.api.begin_totp(&caller(&s, peer)).await {
        Ok(e) => page(
            StatusCode::OK,
            views::mfa_enroll(&s.csrf, &e.secret, &e.otpauth_uri, None),
            None,
        ),
        Err(f) => on_failure(&p, &f, |m| views::mfa(&s.csrf, true, Some(m), None)),
    }
}

async fn mfa_confirm(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<CodeFields>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    match p
        .api
        .confirm_totp(&caller(&s, peer), f.code.trim().to_owned())
        .await
    {
        Ok(codes) => page(StatusCode::OK, views::recovery_codes(&codes), None),
        Err(failure) if failure.signed_out() => p.signed_out("signed_out"),
        Err(failure) => page(
            failure.http_status(),
            views::mfa_enroll(&s.csrf, &f.secret, &f.otpauth_uri, Some(&failure.message)),
            None,
        ),
    }
}

#[derive(Debug, Deserialize)]
struct RemoveFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    password: SecretString,
    #[serde(default)]
    code: SecretString,
}

/// Turns TOTP off. The password goes first: a session that verified its second factor
/// within the step-up window needs no more. Otherwise the code steps it up (`VerifyMfa`)
/// and the removal is asked again, so a wrong password never spends a recovery code.
async fn mfa_remove(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<RemoveFields>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    let c = caller(&s, peer);
    let password = || f.password.expose_secret().to_owned();
    let mut result = p.api.remove_totp(&c, password()).await;
    if let Err(failure) = &result
        && matches!(
            failure.reason.as_deref(),
            Some("MFA_REQUIRED" | "MFA_TOO_OLD")
        )
    {
        let code = f.code.expose_secret().trim().to_owned();
        result = match p.api.verify_mfa(&c, code).await {
            Ok(()) => p.api.remove_totp(&c, password()).await,
            Err(failure) => Err(failure),
        };
    }
    match result {
        Ok(()) => page(
            StatusCode::OK,
            views::mfa(
                &s.csrf,
                false,
                None,
                Some("Two-factor authentication is off."),
            ),
            None,
        ),
        Err(failure) if failure.signed_out() => p.signed_out("signed_out"),
        Err(failure) => page(
            failure.http_status(),
            views::mfa(&s.csrf, true, Some(&failure.message), None),
            None,
        ),
    }
}

async fn account_page(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let s = match signed_in(&p, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match p.api.whoami(&caller(&s, peer)).await {
        Ok(me) => page(
            StatusCode::OK,
            views::account(&s.csrf, &me.email, None, None),
            None,
        ),
        Err(f) => on_failure(&p, &f, |m| views::account(&s.csrf, "", Some(m), None)),
    }
}

#[derive(Debug, Deserialize)]
struct PasswordFields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    current: SecretString,
    #[serde(default)]
    new: SecretString,
}

async fn change_password(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<PasswordFields>,
) -> Response {
    let s = match p.signed_in_form(&headers, &f.csrf) {
        Ok(s) => s,
        Err(answer) => return *answer,
    };
    let c = caller(&s, peer);
    let result = p
        .api
        .change_password(
            &c,
            ChangePasswordRequest {
                current_password: f.current.expose_secret().to_owned(),
                new_password: f.new.expose_secret().to_owned(),
            },
        )
        .await;
    match result {
        // Every session of the user ended, this one included.
        Ok(()) => p.signed_out("changed"),
        Err(failure) if failure.signed_out() => p.signed_out("signed_out"),
        Err(failure) => {
            let email = p
                .api
                .whoami(&c)
                .await
                .map(|me| me.email)
                .unwrap_or_default();
            page(
                failure.http_status(),
                views::account(&s.csrf, &email, Some(&failure.message), None),
                None,
            )
        }
    }
}

async fn logout(
    State(p): Shared,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    let s = match p.checked(&headers, &f.csrf) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    if s.token.is_some()
        && let Err(failure) = p.api.logout(&caller(&s, peer)).await
        && !failure.signed_out()
    {
        tracing::warn!(code = %failure.code, "logout at the API failed; the cookie is cleared anyway");
    }
    p.signed_out("signed_out")
}
