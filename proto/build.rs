//! Compiles the .proto schemas in `protos/` with protox (pure Rust, so a fresh
//! machine needs no system `protoc`).

use std::path::PathBuf;

const SCHEMAS: &[&str] = &[
    "blaze/worker/worker_protocol.proto",
    "build/bazel/semver/semver.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "google/bytestream/bytestream.proto",
    "google/longrunning/operations.proto",
    "outpost/fleet/v1/fleet.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("protos");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<PathBuf> = SCHEMAS.iter().map(|s| root.join(s)).collect();
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // Blob payloads are handed around without copies.
        .bytes(".")
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(descriptors)?;
    Ok(())
}
