//! The portal's side of the control API: one channel shared by every request, calls made
//! with the visitor's session token and address, and the one translation of a gRPC status
//! into what a page shows.

use std::net::IpAddr;
use std::time::Duration;

use secrecy::SecretString;
use tenantry_client::{Client, Credentials};
use tenantry_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The metadata key that carries the visitor's address to the API, which believes it only
/// from the proxies it is told to trust (`--trusted-proxies`).
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// A failed call, as a page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The gRPC code (chooses the HTTP status and what the portal does next).
    pub code: Code,
    /// What the person reads, from the API's own words where they are meant for people.
    pub message: String,
    /// The `ErrorInfo.reason`, when the API sent one.
    pub reason: Option<String>,
}

impl Failure {
    /// A failure of the portal's own making, without an API reason.
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// Whether the session behind the call is gone (sign in again), as opposed to a wrong
    /// password or code.
    pub fn signed_out(&self) -> bool {
        self.code == Code::Unauthenticated
            && !matches!(
                self.reason.as_deref(),
                Some("INVALID_CREDENTIALS" | "INVALID_MFA_CODE")
            )
    }

    /// The HTTP status of a page showing this failure.
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self.code {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                S::UNPROCESSABLE_ENTITY
            }
            Code::AlreadyExists => S::CONFLICT,
            Code::Unauthenticated => S::UNAUTHORIZED,
            Code::PermissionDenied => S::FORBIDDEN,
            Code::NotFound => S::NOT_FOUND,
            Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Code::Unavailable => S::SERVICE_UNAVAILABLE,
            _ => S::BAD_GATEWAY,
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        let message = match status.code() {
            Code::ResourceExhausted => {
                let retry = status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay);
                locked_message(status.message(), retry, jiff::Timestamp::now())
            }
            Code::InvalidArgument
            | Code::AlreadyExists
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::Unavailable => status.message().to_owned(),
            code => {
                tracing::warn!(%code, message = status.message(), "control API call failed");
                "something went wrong on our side; try again in a moment".to_owned()
            }
        };
        Failure {
            code: status.code(),
            message,
            reason: status.get_details_error_info().map(|info| info.reason),
        }
    }
}

/// "locked … try again in N s (at HH:MM:SS UTC)" from the API's message and its RetryInfo.
pub fn locked_message(api_message: &str, retry: Option<Duration>, now: jiff::Timestamp) -> String {
    match retry {
        Some(delay) => {
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            let at = i64::try_from(secs)
                .ok()
                .and_then(|s| now.checked_add(jiff::SignedDuration::from_secs(s)).ok())
                .map(|t| t.strftime("%H:%M:%S UTC").to_string())
                .unwrap_or_default();
            format!("{}. Try again in {secs} s (at {at}).", lead(api_message))
        }
        None => format!("{}. Try again later.", lead(api_message)),
    }
}

/// The API's message up to its own retry hint ("…; retry in 59s"), which the RetryInfo
/// replaces.
fn lead(api_message: &str) -> &str {
    api_message.split(';').next().unwrap_or(api_message).trim()
}

/// Results of calls.
pub type Outcome<T> = std::result::Result<T, Failure>;

/// The control API as the portal uses it.
#[derive(Debug, Clone)]
pub struct Api {
    channel: Channel,
}

/// One visitor's calls: their token (if any) and their address.
pub struct Caller<'a> {
    /// The session token.
    pub token: Option<&'a SecretString>,
    /// The visitor's address, forwarded to the API.
    pub source: Option<IpAddr>,
}

impl Api {
    /// Calls on `channel`.
    pub fn new(channel: Channel) -> Api {
        Api { channel }
    }

    fn client(&self, caller: &Caller<'_>) -> Outcome<Client> {
        let creds = match caller.token {
            Some(token) => Credentials::bearer(token).map_err(|_| {
                Failure::new(
                    Code::Unauthenticated,
                    "your session is no longer valid; sign in again",
                )
            })?,
            None => Credentials::default(),
        };
        Ok(Client::new(self.channel.clone(), creds))
    }

    fn request<T>(caller: &Caller<'_>, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(ip) = caller.source
            && let Ok(value) = ip.to_string().parse()
        {
            req.metadata_mut().insert(FORWARDED_FOR, value);
        }
        req
    }

    /// `AccountService.Signup`.
    pub async fn signup(&self, c: &Caller<'_>, req: SignupRequest) -> Outcome<SignupResponse> {
        let mut client = self.client(c)?.accounts();
        Ok(client.signup(Self::request(c, req)).await?.into_inner())
    }

    /// `AccountService.Login`.
    pub async fn login(&self, c: &Caller<'_>, req: LoginRequest) -> Outcome<LoginResponse> {
        let mut client = self.client(c)?.accounts();
        Ok(client.login(Self::request(c, req)).await?.into_inner())
    }

    /// `AccountService.Logout`.
    pub async fn logout(&self, c: &Caller<'_>) -> Outcome<()> {
        let mut client = self.client(c)?.accounts();
        client.logout(Self::request(c, LogoutRequest {})).await?;
        Ok(())
    }

    /// `AccountService.WhoAmI`.
    pub async fn whoami(&self, c: &Caller<'_>) -> Outcome<WhoAmIResponse> {
        let mut client = self.client(c)?.accounts();
        Ok(client
            .who_am_i(Self::request(c, WhoAmIRequest {}))
            .await?
            .into_inner())
    }

    /// `AccountService.VerifyEmail`.
    pub async fn verify_email(&self, c: &Caller<'_>, token: String) -> Outcome<()> {
        let mut client = self.client(c)?.accounts();
        client
            .verify_email(Self::request(c, VerifyEmailRequest { token }))
            .await?;
        Ok(())
    }

    /// `AccountService.ResendVerificationEmail`.
    pub async fn resend_verification(&self, c: &Caller<'_>) -> Outcome<()> {
        let mut client = self.client(c)?.accounts();
        client
            .resend_verification_email(Self::request(c, ResendVerificationEmailRequest {}))
            .await?;
        Ok(())
    }

    /// `AccountService.ChangePassword`.
    pub async fn change_password(&self, c: &Caller<'_>, req: ChangePasswordRequest) -> Outcome<()> {
        let mut client = self.client(c)?.accounts();
        client.change_password(Self::request(c, req)).await?;
        Ok(())
    }

    /// `MfaService.BeginTotpEnrollment`.
    pub async fn begin_totp(&self, c: &Caller<'_>) -> Outcome<BeginTotpEnrollmentResponse> {
        let mut client = self.client(c)?.mfa();
        Ok(client
            .begin_totp_enrollment(Self::request(c, BeginTotpEnrollmentRequest {}))
            .await?
            .into_inner())
    }

    /// `MfaService.ConfirmTotpEnrollment`.
    pub async fn confirm_totp(&self, c: &Caller<'_>, code: String) -> Outcome<Vec<String>> {
        let mut client = self.client(c)?.mfa();
        Ok(client
            .confirm_totp_enrollment(Self::request(c, ConfirmTotpEnrollmentRequest { code }))
            .await?
            .into_inner()
            .recovery_codes)
    }

    /// `MfaService.RemoveTotp`.
    pub async fn remove_totp(&self, c: &Caller<'_>, password: String) -> Outcome<()> {
        let mut client = self.client(c)?.mfa();
        client
            .remove_totp(Self::request(c, RemoveTotpRequest { password }))
            .await?;
        Ok(())
    }

    /// `MfaService.VerifyMfa` with a TOTP code (six digits) or a recovery code.
    pub async fn verify_mfa(&self, c: &Caller<'_>, code: String) -> Outcome<()> {
        let factor = if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) {
            verify_mfa_request::Factor::Code(code)
        } else {
            verify_mfa_request::Factor::RecoveryCode(code)
        };
        let mut client = self.client(c)?.mfa();
        client
            .verify_mfa(Self::request(
                c,
                VerifyMfaRequest {
                    factor: Some(factor),
                },
            ))
            .await?;
        Ok(())
    }

    /// `TenantService.GetTenant`: the tenant with its effective retention policy. One call
    /// per page; the cap an owner may set is the plan's, from the shared plan type.
    pub async fn tenant(&self, c: &Caller<'_>, tenant_id: &str) -> Outcome<Tenant> {
        let mut client = self.client(c)?.tenants();
        client
            .get_tenant(Self::request(
                c,
                GetTenantRequest {
                    tenant_id: tenant_id.to_owned(),
                },
            ))
            .await?
            .into_inner()
            .tenant
            .ok_or_else(|| Failure::new(Code::NotFound, "tenant not found"))
    }

    /// `TenantService.SetRetentionPolicy`.
    pub async fn set_retention(
        &self,
        c: &Caller<'_>,
        req: SetRetentionPolicyRequest,
    ) -> Outcome<RetentionPolicy> {
        let mut client = self.client(c)?.tenants();
        Ok(client
            .set_retention_policy(Self::request(c, req))
            .await?
            .into_inner()
            .policy
            .unwrap_or_default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_lockout_says_when_to_try_again() {
        let now: jiff::Timestamp = "2026-01-01T10:00:00Z".parse().unwrap();
        let m = locked_message(
            "account locked; retry in 59s",
            Some(Duration::from_millis(59_500)),
            now,
        );
        assert_eq!(m, "account locked. Try again in 60 s (at 10:01:00 UTC).");
        assert_eq!(
            locked_message("rate limited", None, now),
            "rate limited. Try again later."
        );
    }

    #[test]
    fn statuses_become_pages() {
        let f = Failure::from(Status::internal("db exploded at 10.0.0.3"));
        assert!(!f.message.contains("10.0.0.3"));
        assert_eq!(f.http_status(), http::StatusCode::BAD_GATEWAY);
        let f = Failure::from(Status::already_exists("this tenant name is taken"));
        assert_eq!(f.message, "this tenant name is taken");
        assert_eq!(f.http_status(), http::StatusCode::CONFLICT);
        assert!(Failure::from(Status::unauthenticated("x")).signed_out());
        let wrong = Status::with_error_details(
            Code::Unauthenticated,
            "invalid email or password",
            tonic_types::ErrorDetails::with_error_info(
                "INVALID_CREDENTIALS",
                "tenantry.dev",
                std::collections::HashMap::new(),
            ),
        );
        assert!(!Failure::from(wrong).signed_out());
    }
}
