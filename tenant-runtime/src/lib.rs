//! The per-tenant runtime: serves one tenant's instance over HTTPS, stores its data
//! encrypted, and enforces its retention policy.
