//! `MfaService`: TOTP enrollment and second-factor verification.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tenantry_proto::v1::mfa_service_server::MfaService;
use tenantry_proto::v1::verify_mfa_request::Factor;
use tenantry_proto::v1::{
    BeginTotpEnrollmentRequest, BeginTotpEnrollmentResponse, ConfirmTotpEnrollmentRequest,
    ConfirmTotpEnrollmentResponse, RemoveTotpRequest, RemoveTotpResponse, VerifyMfaRequest,
    VerifyMfaResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, caller, source_of, source_text};
use crate::clock::to_timestamp;
use crate::crypto::hash_secret;
use crate::error::{AuthFailure, DenyReason, Error, Result};
use crate::service::{detail, reauthenticate};
use crate::state::AppState;
use crate::store::{AuditRecord, UserRow};
use crate::totp;

/// Audit actions written by this service.
pub mod actions {
    /// A TOTP enrollment was started.
    pub const ENROLLMENT_STARTED: &str = "mfa.enrollment.started";
    /// TOTP was confirmed and is now required for admin access.
    pub const ENROLLED: &str = "mfa.enrolled";
    /// A second factor was verified.
    pub const VERIFIED: &str = "mfa.verified";
    /// A wrong, reused or expired code.
    pub const FAILED: &str = "mfa.failed";
    /// Too many failed codes locked MFA.
    pub const LOCKED: &str = "mfa.locked";
    /// TOTP was turned off (or a wrong password refused it).
    pub const REMOVED: &str = "mfa.removed";
}

/// The service.
#[derive(Debug, Clone)]
pub struct Mfa {
    state: Arc<AppState>,
}

pub(crate) fn totp_context(user_id: &str) -> String {
    format!("totp:{user_id}")
}

impl Mfa {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Mfa { state }
    }

    async fn load_user(&self, who: &Caller) -> Result<UserRow> {
        self.state
            .store
            .user_by_id(&who.user_id)
            .await?
            .ok_or(Error::Unauthenticated(AuthFailure::SessionInvalid))
    }

    fn check_locked(&self, user: &UserRow) -> Result<()> {
        match user.mfa_lock.locked_for(self.state.now_ms()) {
            Some(wait) => Err(Error::ResourceExhausted {
                what: "second factor temporarily locked after repeated failures",
                retry_after: wait,
            }),
            None => Ok(()),
        }
    }

    /// Records a failed code (and a lock, when it causes one), then answers
    /// `UNAUTHENTICATED`.
    async fn fail(&self, user: &UserRow, source: &str, reason: &str) -> Error {
        let st = &self.state;
        let now = st.now_ms();
        let (next, locked) = user.mfa_lock.after_failure(now);
        let mut audits = vec![AuditRecord {
            action: actions::FAILED,
            actor_user_id: user.id.clone(),
            target: user.id.clone(),
            success: false,
            source: source.to_owned(),
            detail_json: detail(&[("reason", reason.into())]),
        }];
        if locked {
            audits.push(AuditRecord {
                action: actions::LOCKED,
                actor_user_id: user.id.clone(),
                target: user.id.clone(),
                success: true,
                source: source.to_owned(),
                detail_json: detail(&[("locked_until_ms", next.locked_until_ms.into())]),
            });
            tracing::warn!(user_id = %user.id, "second factor locked after repeated failures");
        }
        if let Err(e) = st
            .store
            .record_failure(crate::store::Factor::Mfa, &user.id, next, &audits, now)
            .await
        {
            return e;
        }
        Error::Unauthenticated(AuthFailure::InvalidMfaCode)
    }

    async fn begin(&self, who: Caller, source: String) -> Result<BeginTotpEnrollmentResponse> {
        let st = &self.state;
        let user = self.load_user(&who).await?;
        if user.totp_secret_sealed.is_some() {
            return Err(Error::FailedPrecondition("TOTP is already enrolled"));
        }
        let secret = totp::generate_secret()?;
        let sealed = st
            .master_key
            .seal(&totp_context(&who.user_id), secret.expose_secret())?;
        st.store.set_pending_totp(&who.user_id, &sealed).await?;
        st.audit(AuditRecord {
            action: actions::ENROLLMENT_STARTED,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source,
            detail_json: String::new(),
        })
        .await;
        Ok(BeginTotpEnrollmentResponse {
            secret: totp::secret_base32(secret.expose_secret())
                .expose_secret()
                .to_owned(),
            otpauth_uri: totp::otpauth_uri(&st.totp_issuer, &who.email, secret.expose_secret())
                .expose_secret()
                .to_owned(),
        })
    }

    async fn confirm(
        &self,
        who: Caller,
        source: String,
        code: &str,
    ) -> Result<ConfirmTotpEnrollmentResponse> {
        let st = &self.state;
        let user = self.load_user(&who).await?;
        if user.totp_secret_sealed.is_some() {
            return Err(Error::FailedPrecondition("TOTP is already enrolled"));
        }
        let Some(pending) = user.totp_pending_sealed.clone() else {
            return Err(Error::FailedPrecondition(
                "no enrollment in progress; call BeginTotpEnrollment",
            ));
        };
        self.check_locked(&user)?;
        let secret = st.master_key.open(&totp_context(&user.id), &pending)?;
        let now = st.now_ms();
        let Some(step) = totp::verify(
            secret.expose_secret(),
            code,
            now.div_euclid(1000),
            user.totp_last_step,
        )?
        else {
            return Err(self.fail(&user, &source, "wrong_code").await);
        };
        let codes = totp::generate_recovery_codes()?;
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| hash_secret(&totp::normalize_recovery_code(c.expose_secret())))
            .collect();
        let audit = AuditRecord {
            action: actions::ENROLLED,
            actor_user_id: user.id.clone(),
            target: user.id.clone(),
            success: true,
            source,
            detail_json: detail(&[("recovery_codes", codes.len().into())]),
        };
        let mut pending = pending;
        // A master key rotation may re-seal the pending secret between the read and the
        // write: the same secret under the new key is the same enrollment.
        for attempt in 0..2 {
            if st
                .store
                .confirm_totp(
                    &user.id,
                    &pending,
                    step,
                    &hashes,
                    &who.session_hash,
                    &audit,
                    now,
                )
                .await?
            {
                break;
            }
            let resealed = match self.load_user(&who).await?.totp_pending_sealed {
                Some(again) if attempt == 0 && again != pending => st
                    .master_key
                    .open(&totp_context(&user.id), &again)
                    .ok()
                    .filter(|s| crate::crypto::ct_eq(s.expose_secret(), secret.expose_secret()))
                    .map(|_| again),
                _ => None,
            };
            match resealed {
                Some(again) => pending = again,
                None => {
                    return Err(Error::FailedPrecondition(
                        "the enrollment changed meanwhile; start again",
                    ));
                }
            }
        }
        Ok(ConfirmTotpEnrollmentResponse {
            recovery_codes: codes.iter().map(|c| c.expose_secret().to_owned()).collect(),
        })
    }

    async fn verify(
        &self,
        who: Caller,
        source: String,
        factor: Option<Factor>,
    ) -> Result<VerifyMfaResponse> {
        let st = &self.state;
        let factor =
            factor.ok_or_else(|| Error::invalid("factor", "give either code or recovery_code"))?;
        let user = self.load_user(&who).await?;
        let Some(sealed) = user.totp_secret_sealed.clone() else {
            return Err(Error::FailedPrecondition(
                "no second factor enrolled; call BeginTotpEnrollment",
            ));
        };
        self.check_locked(&user)?;
        let now = st.now_ms();
        let ok_audit = |method: &str| AuditRecord {
            action: actions::VERIFIED,
            actor_user_id: user.id.clone(),
            target: user.id.clone(),
            success: true,
            source: source.clone(),
            detail_json: detail(&[("method", method.into())]),
        };
        let remaining = match factor {
            Factor::Code(code) => {
                let secret = st.master_key.open(&totp_context(&user.id), &sealed)?;
                let step = totp::verify(
                    secret.expose_secret(),
                    &code,
                    now.div_euclid(1000),
                    user.totp_last_step,
                )?;
                let accepted = match step {
                    Some(step) => {
                        st.store
                            .accept_totp_step(
                                &user.id,
                                step,
                                &who.session_hash,
                                &ok_audit("totp"),
                                now,
                            )
                            .await?
                    }
                    None => false,
                };
                if !accepted {
                    return Err(self.fail(&user, &source, "wrong_or_reused_code").await);
                }
                st.store.recovery_codes_left(&user.id).await?
            }
            Factor::RecoveryCode(code) => {
                let hash = hash_secret(&totp::normalize_recovery_code(&code));
                match st
                    .store
                    .use_recovery_code(
                        &user.id,
                        &hash,
                        &who.session_hash,
                        &ok_audit("recovery_code"),
                        now,
                    )
                    .await?
                {
                    Some(left) => left,
                    None => {
                        return Err(self
                            .fail(&user, &source, "unknown_or_used_recovery_code")
                            .await);
                    }
                }
            }
        };
        Ok(VerifyMfaResponse {
            mfa_verified_at: Some(to_timestamp(now)),
            recovery_codes_remaining: remaining,
        })
    }

    /// Turns TOTP off after the step-up (a second factor on this session within the admin
    /// window) and the password.
    async fn remove(&self, who: Caller, source: String, password: SecretString) -> Result<()> {
        let st = &self.state;
        if !who.mfa_enrolled {
            return Err(Error::FailedPrecondition("no second factor is enrolled"));
        }
        let Some(verified) = who.mfa_verified_at_ms else {
            return Err(Error::PermissionDenied(DenyReason::MfaRequired));
        };
        let max_age = crate::clock::duration_ms(st.sessions.admin_mfa_max_age);
        if st.now_ms().saturating_sub(verified) > max_age {
            return Err(Error::PermissionDenied(DenyReason::MfaTooOld));
        }
        reauthenticate(st, &who, password, actions::REMOVED, "password", &source).await?;
        let audit = AuditRecord {
            action: actions::REMOVED,
            actor_user_id: who.user_id.clone(),
            target: who.user_id.clone(),
            success: true,
            source,
            detail_json: String::new(),
        };
        if !st
            .store
            .remove_totp(&who.user_id, &audit, st.now_ms())
            .await?
        {
            return Err(Error::FailedPrecondition("no second factor is enrolled"));
        }
        st.mailer.poll_soon();
        Ok(())
    }
}

#[tonic::async_trait]
impl MfaService for Mfa {
    async fn begin_totp_enrollment(
        &self,
        request: Request<BeginTotpEnrollmentRequest>,
    ) -> Result<Response<BeginTotpEnrollmentResponse>, Status> {
        let who = caller(&request)?;
        Ok(Response::new(
            self.begin(who, source_text(source_of(&request))).await?,
        ))
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<ConfirmTotpEnrollmentResponse>, Status> {
        let who = caller(&request)?;
        self.state.rate_limit(source_of(&request))?;
        let source = source_text(source_of(&request));
        Ok(Response::new(
            self.confirm(who, source, &request.into_inner().code)
                .await?,
        ))
    }

    async fn remove_totp(
        &self,
        request: Request<RemoveTotpRequest>,
    ) -> Result<Response<RemoveTotpResponse>, Status> {
        let who = caller(&request)?;
        self.state.rate_limit(source_of(&request))?;
        let source = source_text(source_of(&request));
        let password = SecretString::from(request.into_inner().password);
        self.remove(who, source, password).await?;
        Ok(Response::new(RemoveTotpResponse {}))
    }

    async fn verify_mfa(
        &self,
        request: Request<VerifyMfaRequest>,
    ) -> Result<Response<VerifyMfaResponse>, Status> {
        let who = caller(&request)?;
        self.state.rate_limit(source_of(&request))?;
        let source = source_text(source_of(&request));
        Ok(Response::new(
            self.verify(who, source, request.into_inner().factor)
                .await?,
        ))
    }
}
