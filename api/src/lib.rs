//! The Tenantry control API: accounts, sessions, MFA, tenants, admin and audit over gRPC.
