//! Compiles `tenantry/v1/*.proto` with protox (no `protoc` needed) and generates the tonic
//! clients and servers, plus the descriptor set that server reflection serves; only with
//! the `grpc` feature.

#[cfg(feature = "grpc")]
use protox::prost::Message as _;

const PROTOS: &[&str] = &[
    "tenantry/v1/common.proto",
    "tenantry/v1/account.proto",
    "tenantry/v1/mfa.proto",
    "tenantry/v1/tenant.proto",
    "tenantry/v1/admin.proto",
];

#[cfg(not(feature = "grpc"))]
fn main() {
    let _ = PROTOS;
}

#[cfg(feature = "grpc")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tenantry_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
