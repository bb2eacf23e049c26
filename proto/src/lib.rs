//! Outpost's wire schemas and the small helpers that belong to them.
//!
//! The generated code for the Remote Execution API v2 (`reapi`), ByteStream,
//! longrunning Operations and semver lives under modules named after the
//! protobuf packages; `google.rpc` maps onto `tonic_types::pb`. The .proto
//! files in `protos/` are written for this project from the published
//! specification.
//!
//! Beside the schemas: [`digest`] (validated digests, digest functions,
//! hashing), [`resource`] (ByteStream resource names) and [`client`]
//! (dialing a server: addresses, TLS, tokens). This crate knows
//! nothing of storage or scheduling; start at [`digest::Digest`].

pub mod client;
pub mod digest;
pub mod features;
pub mod gpu;
pub mod platform;
pub mod quote;
pub mod resource;
pub mod settings;
pub mod units;
pub mod validate;
pub mod version;
pub mod warm;
pub mod xcode;

#[allow(clippy::all, missing_docs)]
pub mod build {
    pub mod bazel {
        pub mod semver {
            include!(concat!(env!("OUT_DIR"), "/build.bazel.semver.rs"));
        }
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/build.bazel.remote.execution.v2.rs"
                    ));
                }
            }
        }
    }
}

/// Bazel's persistent worker protocol (`blaze.worker`): what the agent
/// sends a worker process and reads back.
#[allow(clippy::all, missing_docs)]
pub mod blaze {
    pub mod worker {
        include!(concat!(env!("OUT_DIR"), "/blaze.worker.rs"));
    }
}

#[allow(clippy::all, missing_docs)]
pub mod google {
    pub mod bytestream {
        include!(concat!(env!("OUT_DIR"), "/google.bytestream.rs"));
    }
    pub mod longrunning {
        include!(concat!(env!("OUT_DIR"), "/google.longrunning.rs"));
    }
}

#[allow(clippy::all, missing_docs)]
pub mod outpost {
    pub mod fleet {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/outpost.fleet.v1.rs"));
        }
    }
}

/// Outpost's own coordinator ⇄ agent protocol.
pub use outpost::fleet::v1 as fleet;

/// The fleet protocol version this build speaks; see `fleet.proto`.
pub const FLEET_PROTOCOL_VERSION: u32 = 1;

/// The Remote Execution API v2 (`build.bazel.remote.execution.v2`).
pub use build::bazel::remote::execution::v2 as reapi;
pub use google::bytestream;
pub use google::longrunning;

/// The gRPC metadata key under which clients send [`reapi::RequestMetadata`].
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// Fully qualified type URLs for the `Any` messages Outpost packs.
pub mod type_url {
    pub const EXECUTE_OPERATION_METADATA: &str =
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
    pub const EXECUTE_RESPONSE: &str =
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
    pub const PRECONDITION_FAILURE: &str = "type.googleapis.com/google.rpc.PreconditionFailure";
}
