//! End-to-end tests that start the real Tenantry binaries live under `tests/tests/`.
