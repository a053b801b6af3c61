//! The Tenantry contract: the generated `tenantry.v1` gRPC code and one Rust type for each
//! contract that crosses a process boundary: the retention policy and plans
//! ([`retention`]), the tenant phase ([`phase`]), the runtime's config file
//! ([`runtime_config`]) and the instance token ([`token`]).

pub mod phase;
pub mod retention;
pub mod runtime_config;
pub mod token;

/// Generated code for the `tenantry.v1` package (feature `grpc`).
#[cfg(feature = "grpc")]
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tenantry.v1");

    /// Encoded `FileDescriptorSet` of every `tenantry.v1` file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tenantry_descriptor");
}
