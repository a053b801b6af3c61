//! The logged-in connection: a `tenantry-client` [`Client`] that sends the saved session's
//! token on every call, and the step-up retry for admin calls.

use secrecy::ExposeSecret as _;
use tenantry_client::{Client, Credentials};
use tenantry_proto::v1::{VerifyMfaRequest, VerifyMfaResponse, WhoAmIRequest, verify_mfa_request};
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::error::{Error, Result, needs_step_up};
use crate::prompt::{self, Factor};
use crate::session::Session;

/// The second factor to use when the server asks for one.
#[derive(Debug, Default)]
pub struct FactorSource {
    /// `--totp-code`.
    pub totp_code: Option<secrecy::SecretString>,
    /// `--recovery-code`.
    pub recovery_code: Option<secrecy::SecretString>,
}

impl FactorSource {
    /// The flag's factor, else one asked for on stdin.
    pub fn get(&self, why: &str) -> Result<Factor> {
        prompt::factor(self.totp_code.as_ref(), self.recovery_code.as_ref(), why)
    }
}

/// A logged-in connection.
pub struct Api {
    client: Client,
    factor: FactorSource,
}

impl Api {
    /// A connection that sends `session`'s token.
    pub fn new(channel: Channel, session: &Session, factor: FactorSource) -> Result<Api> {
        Ok(Api {
            client: Client::new(channel, Credentials::bearer(&session.token)?),
            factor,
        })
    }

    /// The service clients, each call carrying the session's token.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `rpc`; when the server wants a (fresh) second factor, verifies one and runs it
    /// once more. Any other failure, or a second refusal, is the error.
    pub async fn call<T, F>(&self, rpc: F) -> Result<T>
    where
        F: AsyncFn(&Client) -> Result<Response<T>, Status>,
    {
        match self.call_once_stepped_up(rpc).await {
            Err(Error::AdminRoleRequired) if self.holds_auditor().await => {
                Err(Error::AuditorReadOnly)
            }
            result => result,
        }
    }

    /// True when the caller holds the auditor role (and not admin): a refusal for the admin
    /// role then says that the auditor role is read-only.
    async fn holds_auditor(&self) -> bool {
        self.client
            .accounts()
            .who_am_i(WhoAmIRequest {})
            .await
            .is_ok_and(|me| {
                let roles = &me.get_ref().roles;
                roles.iter().any(|r| r == "auditor") && !roles.iter().any(|r| r == "admin")
            })
    }

    async fn call_once_stepped_up<T, F>(&self, rpc: F) -> Result<T>
    where
        F: AsyncFn(&Client) -> Result<Response<T>, Status>,
    {
        match rpc(&self.client).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) if needs_step_up(&status) => {
                let factor = self.factor.get(&format!(
                    "this command needs a fresh second factor ({})",
                    status.message()
                ))?;
                self.verify(factor).await?;
                rpc(&self.client)
                    .await
                    .map(Response::into_inner)
                    .map_err(Error::from)
            }
            Err(status) => Err(Error::from(status)),
        }
    }

    /// Verifies a second factor on this session.
    pub async fn verify(&self, factor: Factor) -> Result<VerifyMfaResponse> {
        let factor = match factor {
            Factor::Totp(code) => verify_mfa_request::Factor::Code(code.expose_secret().to_owned()),
            Factor::Recovery(code) => {
                verify_mfa_request::Factor::RecoveryCode(code.expose_secret().to_owned())
            }
        };
        self.client
            .mfa()
            .verify_mfa(VerifyMfaRequest {
                factor: Some(factor),
            })
            .await
            .map(Response::into_inner)
            .map_err(Error::from)
    }

    /// The second-factor source, for `login`.
    pub fn factor(&self) -> &FactorSource {
        &self.factor
    }
}
