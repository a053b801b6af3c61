//! The gRPC client of the Tenantry control API, shared by `tenantryctl`, the portal and the
//! tests: [`connect`] opens the channel (plaintext, or TLS trusting one CA),
//! [`Credentials`] sends the session token on every call, and [`Client`] hands out the
//! four service clients of `tenantry.v1` on one channel.

mod channel;
mod credentials;
mod error;

pub use channel::{Trust, connect};
pub use credentials::Credentials;
pub use error::{Error, Result};

use tenantry_proto::v1::account_service_client::AccountServiceClient;
use tenantry_proto::v1::admin_service_client::AdminServiceClient;
use tenantry_proto::v1::mfa_service_client::MfaServiceClient;
use tenantry_proto::v1::tenant_service_client::TenantServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The channel under every service client: each call gets the [`Credentials`].
pub type AuthedChannel = InterceptedService<Channel, Credentials>;

/// A channel to the API and the credentials every call on it carries. Cheap to clone;
/// clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    credentials: Credentials,
}

impl Client {
    /// Calls on `channel` with `credentials` (`Credentials::default()` for none).
    pub fn new(channel: Channel, credentials: Credentials) -> Client {
        Client {
            channel,
            credentials,
        }
    }

    /// `AccountService`: signup, login, logout, whoami, password change.
    pub fn accounts(&self) -> AccountServiceClient<AuthedChannel> {
        AccountServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    /// `MfaService`: TOTP enrollment and verification.
    pub fn mfa(&self) -> MfaServiceClient<AuthedChannel> {
        MfaServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    /// `TenantService`: a member's view of their tenant.
    pub fn tenants(&self) -> TenantServiceClient<AuthedChannel> {
        TenantServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }

    /// `AdminService`: needs the admin role and a recent second factor.
    pub fn admin(&self) -> AdminServiceClient<AuthedChannel> {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.credentials.clone())
    }
}
