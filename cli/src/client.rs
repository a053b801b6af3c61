//! The connection to the API: the channel (TLS with the operator's CA for `https://`), the
//! bearer token of the saved session, and the step-up retry for admin calls.

use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret as _;
use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::tenant_service_client::TenantServiceClient;
use tenantry_proto::v1::{VerifyMfaRequest, VerifyMfaResponse, verify_mfa_request};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, chain, needs_step_up};
use crate::prompt::{self, Factor};
use crate::session::Session;

/// How to trust an `https://` server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trust<'a> {
    /// PEM file of the CA that signed the server's certificate.
    pub ca_file: Option<&'a Path>,
    /// Name the certificate must carry, if not the host of the address.
    pub server_name: Option<&'a str>,
}

/// Opens a channel to `server`; `https://` needs the CA that signed its certificate.
pub async fn connect(server: &str, trust: Trust<'_>) -> Result<Channel> {
    let ca_file = trust.ca_file;
    let https = if server.starts_with("https://") {
        true
    } else if server.starts_with("http://") {
        false
    } else {
        return Err(Error::Usage(format!(
            "--server must start with http:// or https://, got {server:?}"
        )));
    };
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| Error::Usage(format!("invalid --server {server:?}: {}", chain(&e))))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60));
    match (https, ca_file) {
        (true, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(Error::io(format!("reading the CA file {}", path.display())))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = trust.server_name {
                tls = tls.domain_name(name);
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                Error::Usage(format!("TLS setup with {}: {}", path.display(), chain(&e)))
            })?;
        }
        (true, None) => {
            return Err(Error::Usage(
                "an https:// server needs --ca-file (TENANTRY_CA_FILE) with the CA that signed its certificate"
                    .into(),
            ));
        }
        (false, Some(_)) => {
            return Err(Error::Usage(
                "--ca-file is only used with an https:// server".into(),
            ));
        }
        (false, None) if trust.server_name.is_some() => {
            return Err(Error::Usage(
                "--tls-server-name is only used with an https:// server".into(),
            ));
        }
        (false, None) => {}
    }
    endpoint.connect().await.map_err(|e| Error::Connect {
        server: server.to_owned(),
        detail: chain(&e),
    })
}

/// `authorization: Bearer <token>`, marked sensitive so no `Debug` print shows it.
pub fn bearer(token: &secrecy::SecretString) -> Result<MetadataValue<Ascii>> {
    let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose_secret())
        .parse()
        .map_err(|_| {
            Error::Usage("the session token is malformed; run `tenantryctl login`".into())
        })?;
    value.set_sensitive(true);
    Ok(value)
}

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
    channel: Channel,
    bearer: MetadataValue<Ascii>,
    factor: FactorSource,
}

impl Api {
    /// A connection that sends `session`'s token.
    pub fn new(channel: Channel, session: &Session, factor: FactorSource) -> Result<Api> {
        Ok(Api {
            channel,
            bearer: bearer(&session.token)?,
            factor,
        })
    }

    /// `msg` with the session's token.
    pub fn authed<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req
    }

    /// The account service.
    pub fn accounts(&self) -> AccountServiceClient<Channel> {
        AccountServiceClient::new(self.channel.clone())
    }

    /// The MFA service.
    pub fn mfa(&self) -> MfaServiceClient<Channel> {
        MfaServiceClient::new(self.channel.clone())
    }

    /// The tenant service.
    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.channel.clone())
    }

    /// The admin service.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// Runs `rpc`; when the server wants a (fresh) second factor, verifies one and runs it
    /// once more. Any other failure, or a second refusal, is the error.
    pub async fn call<T, F>(&self, rpc: F) -> Result<T>
    where
        F: AsyncFn(&Api) -> Result<Response<T>, Status>,
    {
        match rpc(self).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) if needs_step_up(&status) => {
                let factor = self.factor.get(&format!(
                    "this command needs a fresh second factor ({})",
                    status.message()
                ))?;
                self.verify(factor).await?;
                rpc(self)
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
        self.mfa()
            .verify_mfa(self.authed(VerifyMfaRequest {
                factor: Some(factor),
            }))
            .await
            .map(Response::into_inner)
            .map_err(Error::from)
    }

    /// The second-factor source, for `login`.
    pub fn factor(&self) -> &FactorSource {
        &self.factor
    }
}
