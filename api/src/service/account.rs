//! `AccountService`: signup, login, logout, whoami, password change.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tenantry_proto::retention::RetentionPolicy;
use tenantry_proto::v1::account_service_server::AccountService;
use tenantry_proto::v1::{
    ChangePasswordRequest, ChangePasswordResponse, LoginRequest, LoginResponse, LogoutRequest,
    LogoutResponse, ResendVerificationEmailRequest, ResendVerificationEmailResponse, SignupRequest,
    SignupResponse, VerifyEmailRequest, VerifyEmailResponse, WhoAmIRequest, WhoAmIResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{ROLE_USER, caller, source_of, source_text};
use crate::clock::{duration_ms, to_timestamp};
use crate::crypto::{hash_secret, new_session_token};
use crate::error::{AuthFailure, Error, Result};
use crate::lockout::LockState;
use crate::password::check_policy;
use crate::provision::TenantSpec;
use crate::service::{detail, plan_from_proto, reauthenticate};
use crate::state::AppState;
use crate::store::{AuditRecord, NewSignup, SignupOutcome, UserRow};
use crate::validate;
use tenantry_proto::phase::TenantPhase;

/// Audit actions written by this service.
pub mod actions {
    /// A user and tenant were created.
    pub const SIGNUP: &str = "signup";
    /// A login succeeded.
    pub const LOGIN_SUCCEEDED: &str = "login.succeeded";
    /// A login failed (unknown email, wrong password, or locked).
    pub const LOGIN_FAILED: &str = "login.failed";
    /// Too many failures locked the account.
    pub const LOGIN_LOCKED: &str = "login.locked";
    /// A session ended by the user.
    pub const LOGOUT: &str = "logout";
    /// The password changed.
    pub const PASSWORD_CHANGED: &str = "password.changed";
    /// An email address was verified (or a verification token refused).
    pub const EMAIL_VERIFIED: &str = "email.verified";
    /// A new verification link was mailed.
    pub const VERIFICATION_RESENT: &str = "email.verification.resent";
}

/// How long a verification link works.
pub const VERIFICATION_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// `ResendVerificationEmail` at most once this often…
pub const RESEND_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// …and at most this many times an hour (the signup's link included).
pub const RESEND_PER_HOUR: usize = 5;
/// `GetTenant`'s message while the instance waits for the owner's address.
pub const AWAITING_VERIFICATION: &str =
    "waiting for the owner to verify their email address (see the link mailed at signup)";

/// A new verification token (256 random bits), as the row (its hash) and the mail (the
/// token sealed) that go with it; the token itself is kept nowhere else.
fn new_verification(st: &AppState, now_ms: i64) -> Result<crate::store::NewVerification> {
    let token = new_session_token()?;
    let sealed = st.master_key.seal(
        crate::mail::notice::VERIFY_TOKEN_CONTEXT,
        token.expose_secret().as_bytes(),
    )?;
    Ok(crate::store::NewVerification {
        token_hash: hash_secret(token.expose_secret()),
        expires_at_ms: now_ms.saturating_add(duration_ms(VERIFICATION_TTL)),
        notice: crate::mail::notice::Notice::VerifyEmail {
            token_sealed: sealed,
        },
        mail_id: uuid::Uuid::new_v4().to_string(),
        claimed_until_ms: now_ms.saturating_add(duration_ms(crate::mail::worker::CLAIM)),
    })
}

/// Hands the committed verification mail of `v` to this replica's mail worker.
fn hand_over(st: &AppState, v: crate::store::NewVerification, email: String, now_ms: i64) {
    st.mailer.hand_over(crate::mail::Handed {
        id: v.mail_id,
        email,
        notice: v.notice,
        created_at_ms: now_ms,
    });
}

/// The service.
#[derive(Debug, Clone)]
pub struct Accounts {
    state: Arc<AppState>,
}

impl Accounts {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Accounts { state }
    }

    async fn signup(&self, source: String, req: SignupRequest) -> Result<SignupResponse> {
        let st = &self.state;
        let email =
            validate::normalize_email(&req.email).map_err(|d| Error::invalid("email", d))?;
        validate::tenant_name(&req.tenant_name).map_err(|d| Error::invalid("tenant_name", d))?;
        let plan =
            plan_from_proto(req.plan).ok_or_else(|| Error::invalid("plan", "unknown plan"))?;
        let password = SecretString::from(req.password);
        let local = email.split('@').next().unwrap_or_default().to_owned();
        check_policy(&password, &[&local, &req.tenant_name])
            .map_err(|e| Error::invalid("password", e.to_string()))?;

        // No look for the email first: the insert finds a taken one (and then the retry
        // below), so the common case is one round trip less.
        let to_hash = password.clone();
        let password_hash = st.hashing(move |h| h.hash(&to_hash)).await?;
        let retention = RetentionPolicy::default();
        let now = st.now_ms();
        let verification = new_verification(st, now)?;
        let (phase, message) = if st.require_email_verification {
            (
                TenantPhase::AwaitingVerification,
                AWAITING_VERIFICATION.to_owned(),
            )
        } else {
            (TenantPhase::Provisioning, String::new())
        };
        let signup = NewSignup {
            user_id: uuid::Uuid::new_v4().to_string(),
            email: email.clone(),
            password_hash,
            tenant_id: uuid::Uuid::new_v4().to_string(),
            tenant_name: req.tenant_name.clone(),
            plan,
            phase,
            retention,
            verification,
            message,
            now_ms: now,
        };
        let audit = AuditRecord {
            action: actions::SIGNUP,
            actor_user_id: signup.user_id.clone(),
            target: signup.tenant_id.clone(),
            success: true,
            source,
            detail_json: detail(&[
                ("email", email.into()),
                ("tenant_name", req.tenant_name.into()),
                ("plan", plan.as_str().into()),
            ]),
        };
        match st.store.create_signup(&signup, &audit).await? {
            SignupOutcome::Created => {
                hand_over(st, signup.verification, signup.email, now);
                if !st.require_email_verification {
                    st.provision_spec(TenantSpec {
                        id: signup.tenant_id.clone(),
                        name: signup.tenant_name.clone(),
                        owner: signup.user_id.clone(),
                        plan,
                        suspended: false,
                        retention,
                    });
                }
                Ok(SignupResponse {
                    user_id: signup.user_id,
                    tenant_id: signup.tenant_id,
                })
            }
            taken => {
                self.taken_signup(taken, &signup.email, password, &signup.tenant_name)
                    .await
            }
        }
    }

    /// A signup that found a name taken. When the email has an account, the email is what
    /// is taken, whichever conflict the insert reported (on PostgreSQL the rows are one
    /// statement, which does not promise its order); a retry (same email, password and
    /// tenant name) then answers with the same ids as the first time. One look-up, only
    /// on this path.
    async fn taken_signup(
        &self,
        taken: SignupOutcome,
        email: &str,
        password: SecretString,
        tenant_name: &str,
    ) -> Result<SignupResponse> {
        let st = &self.state;
        let email_taken = Error::AlreadyExists {
            field: "email",
            message: "an account with this email already exists",
        };
        let Some(user) = st.store.user_by_email(email).await? else {
            return Err(match taken {
                SignupOutcome::TenantNameTaken => Error::AlreadyExists {
                    field: "tenant_name",
                    message: "this tenant name is taken",
                },
                _ => email_taken,
            });
        };
        if st
            .verify_password(password, Some(user.password_hash.clone()))
            .await?
            && let Some(t) = st.store.owned_tenant_by_name(&user.id, tenant_name).await?
        {
            return Ok(SignupResponse {
                user_id: user.id,
                tenant_id: t.id,
            });
        }
        Err(email_taken)
    }

    async fn login(&self, source: String, req: LoginRequest) -> Result<LoginResponse> {
        let st = &self.state;
        let email =
            validate::normalize_email(&req.email).map_err(|d| Error::invalid("email", d))?;
        let password = SecretString::from(req.password);
        let attempt = Attempt {
            email: &email,
            source: &source,
        };
        let Some(user) = st.store.user_by_email(&email).await? else {
            return Err(self.unknown_email(&attempt, password).await);
        };
        if let Some(wait) = user.login_lock.locked_for(st.now_ms()) {
            st.audit(attempt.failed("locked", user.id.clone())).await;
            return Err(locked(wait));
        }
        let stored = user.password_hash.clone();
        // The hash is verified for a deactivated user too, and the failure takes the very
        // path of a wrong password (counting towards the lockout, same answer): neither
        // the answer nor the time it takes tells that the account is shut out.
        let matches = st
            .verify_password(password.clone(), Some(stored.clone()))
            .await?;
        if !user.is_active() {
            return Err(self.wrong_password(&attempt, &user, "deactivated").await);
        }
        if !matches {
            return Err(self.wrong_password(&attempt, &user, "wrong_password").await);
        }
        self.open_session(&attempt, &user, password, &stored).await
    }

    /// A login with an email that has no account answers exactly like a wrong password,
    /// lockout included: the failures count per email (by its SHA-256) as they would for
    /// an account, and a full password hash is computed, so neither the answers nor their
    /// timing tell whether an account exists.
    async fn unknown_email(&self, attempt: &Attempt<'_>, password: SecretString) -> Error {
        let st = &self.state;
        let email_hash = hash_secret(attempt.email);
        let lock = match st.store.unknown_email_lock(&email_hash).await {
            Ok(lock) => lock,
            Err(e) => return e,
        };
        if let Some(wait) = lock.locked_for(st.now_ms()) {
            st.audit(attempt.failed("locked", String::new())).await;
            return locked(wait);
        }
        if let Err(e) = st.verify_password(password, None).await {
            return e;
        }
        let now = st.now_ms();
        let (next, now_locked) = lock.after_failure(now);
        let mut audits = vec![attempt.failed("unknown_email", String::new())];
        if now_locked {
            audits.push(attempt.locked(next));
        }
        match st
            .store
            .record_unknown_email_failure(&email_hash, next, &audits, now)
            .await
        {
            Ok(()) => Error::Unauthenticated(AuthFailure::InvalidCredentials),
            Err(e) => e,
        }
    }

    /// Counts a wrong password (locking the account at the threshold) and says why the
    /// login failed; `reason` goes to the audit row only (`wrong_password`, or
    /// `deactivated` for a shut-out user, whose failure counts the same).
    async fn wrong_password(
        &self,
        attempt: &Attempt<'_>,
        user: &UserRow,
        reason: &'static str,
    ) -> Error {
        let st = &self.state;
        let now = st.now_ms();
        let (next, locked) = user.login_lock.after_failure(now);
        let mut audits = vec![attempt.failed(reason, user.id.clone())];
        if locked {
            audits.push(AuditRecord {
                actor_user_id: user.id.clone(),
                ..attempt.locked(next)
            });
            tracing::warn!(user_id = %user.id, "account locked after repeated failed logins");
        }
        match st
            .store
            .record_failure(crate::store::Factor::Password, &user.id, next, &audits, now)
            .await
        {
            Ok(()) => Error::Unauthenticated(AuthFailure::InvalidCredentials),
            Err(e) => e,
        }
    }

    /// A new session for `user`, whose password was right; rehashes the password when the
    /// hashing parameters went up.
    async fn open_session(
        &self,
        attempt: &Attempt<'_>,
        user: &UserRow,
        password: SecretString,
        stored: &str,
    ) -> Result<LoginResponse> {
        let st = &self.state;
        let new_hash = if st.hasher.needs_rehash(stored) {
            Some(st.hashing(move |h| h.hash(&password)).await?)
        } else {
            None
        };
        let now = st.now_ms();
        let token = new_session_token()?;
        let expires_at = now.saturating_add(duration_ms(st.sessions.absolute_timeout));
        let audit = AuditRecord {
            action: actions::LOGIN_SUCCEEDED,
            actor_user_id: user.id.clone(),
            target: attempt.email.to_owned(),
            success: true,
            source: attempt.source.to_owned(),
            detail_json: detail(&[("rehashed", new_hash.is_some().into())]),
        };
        st.store
            .record_login_success(
                &user.id,
                new_hash.as_deref(),
                &hash_secret(token.expose_secret()),
                expires_at,
                attempt.source,
                &audit,
                now,
            )
            .await?;
        Ok(LoginResponse {
            session_token: token.expose_secret().to_owned(),
            expires_at: Some(to_timestamp(expires_at)),
            mfa_required: user.totp_secret_sealed.is_some(),
        })
    }
}

/// One login attempt: who it claims to be and where it comes from.
struct Attempt<'a> {
    email: &'a str,
    source: &'a str,
}

/// The answer to a login while the email is locked (with or without an account).
fn locked(wait: std::time::Duration) -> Error {
    Error::ResourceExhausted {
        what: "account temporarily locked after repeated failed logins",
        retry_after: wait,
    }
}

impl Attempt<'_> {
    /// The audit row of the failure that locked the email, for `next`, without an actor.
    fn locked(&self, next: LockState) -> AuditRecord {
        AuditRecord {
            action: actions::LOGIN_LOCKED,
            actor_user_id: String::new(),
            target: self.email.to_owned(),
            success: true,
            source: self.source.to_owned(),
            detail_json: detail(&[
                ("locked_until_ms", next.locked_until_ms.into()),
                ("lockouts", next.lockouts.into()),
            ]),
        }
    }

    /// The audit row of a failed attempt.
    fn failed(&self, reason: &'static str, actor: String) -> AuditRecord {
        AuditRecord {
            action: actions::LOGIN_FAILED,
            actor_user_id: actor,
            target: self.email.to_owned(),
            success: false,
            source: self.source.to_owned(),
            detail_json: detail(&[("reason", reason.into())]),
        }
    }
}

#[tonic::async_trait]
impl AccountService for Accounts {
    async fn signup(
        &self,
        request: Request<SignupRequest>,
    ) -> Result<Response<SignupResponse>, Status> {
        let source = source_of(&request);
        self.state.rate_limit(source)?;
        Ok(Response::new(
            self.signup(source_text(source), request.into_inner())
                .await?,
        ))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let source = source_of(&request);
        self.state.rate_limit(source)?;
        Ok(Response::new(
            self.login(source_text(source), request.into_inner())
                .await?,
        ))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let who = caller(&request)?;
        let st = &self.state;
        let audit = AuditRecord {
            action: actions::LOGOUT,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source: source_text(source_of(&request)),
            detail_json: String::new(),
        };
        st.store
            .delete_session(&who.session_hash, Some(&audit), st.now_ms())
            .await
            .map_err(Status::from)?;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let who = caller(&request)?;
        let mut roles = vec![ROLE_USER.to_owned()];
        roles.extend(
            who.live_roles(self.state.now_ms())
                .map(|r| r.as_str().to_owned()),
        );
        Ok(Response::new(WhoAmIResponse {
            user_id: who.user_id,
            email: who.email,
            roles,
            tenant_ids: who.tenant_ids,
            mfa_enrolled: who.mfa_enrolled,
            mfa_verified_at: who.mfa_verified_at_ms.map(to_timestamp),
            session_expires_at: Some(to_timestamp(who.expires_at_ms)),
            email_verified: who.email_verified,
        }))
    }

    async fn verify_email(
        &self,
        request: Request<VerifyEmailRequest>,
    ) -> Result<Response<VerifyEmailResponse>, Status> {
        let who = caller(&request)?;
        let source = source_of(&request);
        let st = &self.state;
        st.rate_limit(source)?;
        let source = source_text(source);
        let token = SecretString::from(request.into_inner().token);
        let token = token.expose_secret().trim();
        if token.is_empty() || token.len() > 128 {
            return Err(
                Error::invalid("token", "give the token from the verification link").into(),
            );
        }
        let now = st.now_ms();
        let audit = AuditRecord {
            action: actions::EMAIL_VERIFIED,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source: source.clone(),
            detail_json: String::new(),
        };
        let verified = st
            .store
            .verify_email(&who.user_id, &hash_secret(token), &audit, now)
            .await;
        let tenants = match verified {
            Ok(v) => v,
            Err(e) => {
                let reason = match &e {
                    Error::NotFound(_) => "unknown_token",
                    Error::Precondition { reason, .. } => reason.as_str(),
                    _ => return Err(e.into()),
                };
                st.audit(AuditRecord {
                    success: false,
                    detail_json: detail(&[("reason", reason.into())]),
                    ..audit
                })
                .await;
                return Err(e.into());
            }
        };
        for tenant in &tenants {
            st.provision(tenant);
        }
        Ok(Response::new(VerifyEmailResponse {
            provisioning_tenant_ids: tenants.into_iter().map(|t| t.id).collect(),
        }))
    }

    async fn resend_verification_email(
        &self,
        request: Request<ResendVerificationEmailRequest>,
    ) -> Result<Response<ResendVerificationEmailResponse>, Status> {
        let who = caller(&request)?;
        let source = source_of(&request);
        let st = &self.state;
        st.rate_limit(source)?;
        if st.store.email_verified_at(&who.user_id).await?.is_some() {
            return Err(Error::Precondition {
                reason: crate::error::PreconditionReason::EmailAlreadyVerified,
                message: "the email address is verified already",
            }
            .into());
        }
        let now = st.now_ms();
        let hour = 3_600_000;
        let recent = st
            .store
            .recent_verifications(&who.user_id, now - hour)
            .await?;
        let interval = duration_ms(RESEND_INTERVAL);
        let wait_ms = match (recent.first(), recent.len()) {
            (Some(last), _) if now - last < interval => Some(interval - (now - last)),
            (Some(_), n) if n >= RESEND_PER_HOUR => recent.last().map(|oldest| oldest + hour - now),
            _ => None,
        };
        if let Some(wait) = wait_ms {
            return Err(Error::ResourceExhausted {
                what: "a verification link was mailed recently; wait before asking again",
                retry_after: std::time::Duration::from_millis(
                    u64::try_from(wait.max(1000)).unwrap_or(1000),
                ),
            }
            .into());
        }
        let v = new_verification(st, now)?;
        let audit = AuditRecord {
            action: actions::VERIFICATION_RESENT,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source: source_text(source),
            detail_json: String::new(),
        };
        st.store
            .resend_verification(&who.user_id, &v, &audit, now)
            .await?;
        hand_over(st, v, who.email.clone(), now);
        Ok(Response::new(ResendVerificationEmailResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let who = caller(&request)?;
        let source = source_of(&request);
        let st = &self.state;
        st.rate_limit(source)?;
        let source = source_text(source);
        let req = request.into_inner();
        let current = SecretString::from(req.current_password);
        let new = SecretString::from(req.new_password);
        reauthenticate(
            st,
            &who,
            current.clone(),
            actions::PASSWORD_CHANGED,
            "current_password",
            &source,
        )
        .await?;
        let local = who.email.split('@').next().unwrap_or_default().to_owned();
        check_policy(&new, &[&local]).map_err(|e| Error::invalid("new_password", e.to_string()))?;
        if crate::crypto::ct_eq(
            new.expose_secret().as_bytes(),
            current.expose_secret().as_bytes(),
        ) {
            return Err(Error::invalid(
                "new_password",
                "the new password must differ from the current one",
            )
            .into());
        }
        let hash = st.hashing(move |h| h.hash(&new)).await?;
        let audit = AuditRecord {
            action: actions::PASSWORD_CHANGED,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source,
            detail_json: detail(&[("sessions_ended", true.into())]),
        };
        st.store
            .set_password(&who.user_id, &hash, &audit, st.now_ms())
            .await?;
        Ok(Response::new(ChangePasswordResponse {}))
    }
}
