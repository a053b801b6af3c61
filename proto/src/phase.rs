//! A tenant's lifecycle phase, as the operator reports it in `Tenant.status.phase`, the API
//! stores it and `GetTenant` and `tenantryctl` show it. One type for all of them.

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "grpc")]
use crate::v1;

/// Lifecycle phase of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TenantPhase {
    /// Seen, nothing made yet.
    Pending,
    /// Children are being made or are not ready yet.
    Provisioning,
    /// Every condition is True: the instance serves.
    Ready,
    /// Scaled to zero on request; data kept.
    Suspended,
    /// A permanent problem (invalid spec, unencrypted storage, missing key) needs attention.
    Degraded,
    /// Being deleted.
    Terminating,
    /// Signed up, nothing provisioned until the owner verifies their email address. The
    /// API's phase only: a Tenant resource is made after verification, so its status never
    /// holds it (it is not in [`TenantPhase::ALL`], which the CRD's schema lists).
    AwaitingVerification,
}

impl TenantPhase {
    /// Every phase a Tenant's status can report, in lifecycle order: the CRD's
    /// `status.phase` values (see [`TenantPhase::AwaitingVerification`] for the one more).
    pub const ALL: [TenantPhase; 6] = [
        TenantPhase::Pending,
        TenantPhase::Provisioning,
        TenantPhase::Ready,
        TenantPhase::Suspended,
        TenantPhase::Degraded,
        TenantPhase::Terminating,
    ];

    /// The name used in the CRD, the database, `kubectl get` and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantPhase::Pending => "Pending",
            TenantPhase::Provisioning => "Provisioning",
            TenantPhase::Ready => "Ready",
            TenantPhase::Suspended => "Suspended",
            TenantPhase::Degraded => "Degraded",
            TenantPhase::Terminating => "Terminating",
            TenantPhase::AwaitingVerification => "AwaitingVerification",
        }
    }

    /// Parses [`TenantPhase::as_str`]'s output.
    pub fn parse(s: &str) -> Option<TenantPhase> {
        TenantPhase::ALL
            .into_iter()
            .chain([TenantPhase::AwaitingVerification])
            .find(|p| p.as_str() == s)
    }

    /// The phase on the wire.
    #[cfg(feature = "grpc")]
    pub fn to_proto(self) -> v1::TenantPhase {
        match self {
            TenantPhase::Pending => v1::TenantPhase::Pending,
            TenantPhase::Provisioning => v1::TenantPhase::Provisioning,
            TenantPhase::Ready => v1::TenantPhase::Ready,
            TenantPhase::Suspended => v1::TenantPhase::Suspended,
            TenantPhase::Degraded => v1::TenantPhase::Degraded,
            TenantPhase::Terminating => v1::TenantPhase::Terminating,
            TenantPhase::AwaitingVerification => v1::TenantPhase::AwaitingVerification,
        }
    }

    /// The phase of a wire value; None for `TENANT_PHASE_UNSPECIFIED` and unknown numbers
    /// (a newer server).
    #[cfg(feature = "grpc")]
    pub fn from_proto(value: i32) -> Option<TenantPhase> {
        match v1::TenantPhase::try_from(value).ok()? {
            v1::TenantPhase::Unspecified => None,
            v1::TenantPhase::Pending => Some(TenantPhase::Pending),
            v1::TenantPhase::Provisioning => Some(TenantPhase::Provisioning),
            v1::TenantPhase::Ready => Some(TenantPhase::Ready),
            v1::TenantPhase::Suspended => Some(TenantPhase::Suspended),
            v1::TenantPhase::Degraded => Some(TenantPhase::Degraded),
            v1::TenantPhase::Terminating => Some(TenantPhase::Terminating),
            v1::TenantPhase::AwaitingVerification => Some(TenantPhase::AwaitingVerification),
        }
    }
}

impl fmt::Display for TenantPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for phase in TenantPhase::ALL
            .into_iter()
            .chain([TenantPhase::AwaitingVerification])
        {
            assert_eq!(TenantPhase::parse(phase.as_str()), Some(phase));
            // The CRD's status.phase and the database hold the same names as serde.
            assert_eq!(
                serde_json::to_value(phase).unwrap(),
                serde_json::json!(phase.as_str())
            );
        }
        assert_eq!(TenantPhase::parse("ready"), None);
    }

    #[test]
    #[cfg(feature = "grpc")]
    fn wire_values_round_trip() {
        for phase in TenantPhase::ALL
            .into_iter()
            .chain([TenantPhase::AwaitingVerification])
        {
            assert_eq!(
                TenantPhase::from_proto(phase.to_proto() as i32),
                Some(phase)
            );
        }
        assert_eq!(
            TenantPhase::from_proto(v1::TenantPhase::Unspecified as i32),
            None
        );
        assert_eq!(TenantPhase::from_proto(99), None);
    }
}
