//! Empty: this crate only exists for its dependency graph (see Cargo.toml).
