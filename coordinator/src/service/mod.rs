//! The REAPI services, translating between the wire and [`crate::storage`].
//! Errors become `tonic::Status` here and nowhere deeper.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
mod compression;

use std::sync::Arc;

use outpost_proto::digest::{self, Digest, Function};
use outpost_proto::reapi;
use tonic::Status;

use crate::storage::{self, ActionCache, Cas};

/// What every service needs: the stores and the limits clients are told.
#[derive(Clone)]
pub struct Context {
    pub cas: Arc<dyn Cas>,
    pub action_cache: Arc<dyn ActionCache>,
    pub max_batch_size: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn storage_status(e: storage::Error) -> Status {
    use storage::Error as E;
    let message = e.to_string();
    match e {
        E::NotFound(_) => Status::not_found(message),
        E::DigestMismatch { .. } | E::SizeMismatch { .. } => Status::invalid_argument(message),
        E::TooLarge { .. } | E::NoSpace { .. } => Status::resource_exhausted(message),
        E::Closed => Status::unavailable(message),
        E::Io { .. } | E::Database { .. } => {
            tracing::error!(error = %message, "storage failure");
            Status::internal(message)
        }
    }
}

pub fn digest_status(e: digest::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn function_of(value: i32) -> Result<Function, Status> {
    Function::from_proto(value).map_err(digest_status)
}

/// Checks a required digest field, naming the field when it is bad.
pub fn required_digest(
    d: Option<&reapi::Digest>,
    function: Function,
    field: &str,
) -> Result<Digest, Status> {
    Digest::from_proto_opt(d, function)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// Checks an optional digest field.
pub fn optional_digest(
    d: Option<&reapi::Digest>,
    function: Function,
    field: &str,
) -> Result<Option<Digest>, Status> {
    d.map(|d| required_digest(Some(d), function, field))
        .transpose()
}

/// A `google.rpc.Status` for per-item results of batch calls.
/// A scheduler refusal as the gRPC status clients get.
impl From<crate::scheduler::Error> for Status {
    fn from(e: crate::scheduler::Error) -> Status {
        use crate::scheduler::Error;
        match e {
            Error::Precondition(m) => Status::failed_precondition(m),
            Error::Invalid(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

pub fn rpc_status(code: tonic::Code, message: impl Into<String>) -> tonic_types::pb::Status {
    tonic_types::pb::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

pub fn rpc_status_of(status: &Status) -> tonic_types::pb::Status {
    rpc_status(status.code(), status.message())
}

pub fn ok_status() -> tonic_types::pb::Status {
    rpc_status(tonic::Code::Ok, "")
}
