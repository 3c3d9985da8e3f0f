//! The answers a client gets for a store error: the gRPC status of a call,
//! and the status of one request of a data stream.

use tonic::Status;
use zebu_proto::replica as pb;

use crate::store::StoreError;

/// The gRPC status for a store error.
pub fn status_of(e: &StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::InvalidArgument(_) | StoreError::CrcMismatch { .. } => {
            Status::invalid_argument(msg)
        }
        StoreError::OutOfRange { .. } => Status::out_of_range(msg),
        StoreError::StaleEpoch { .. }
        | StoreError::StaleSession(_)
        | StoreError::NotOpen { .. }
        | StoreError::FailedPrecondition(_) => Status::failed_precondition(msg),
        StoreError::NoSpace(_) => Status::resource_exhausted(msg),
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Corrupt { .. } => Status::data_loss(msg),
        StoreError::AlreadyExists(_) => Status::already_exists(msg),
        StoreError::Io { .. } | StoreError::Meta(_) => Status::internal(msg),
    }
}

/// The status of one data-stream request that failed with `e`.
pub fn io_status_of(e: &StoreError) -> pb::IoStatus {
    match e {
        StoreError::InvalidArgument(_) => pb::IoStatus::IoInvalidArgument,
        StoreError::OutOfRange { .. } => pb::IoStatus::IoOutOfRange,
        StoreError::CrcMismatch { .. } => pb::IoStatus::IoCrcMismatch,
        StoreError::StaleEpoch { .. } => pb::IoStatus::IoStaleEpoch,
        StoreError::NotOpen { .. } => pb::IoStatus::IoNotOpen,
        StoreError::StaleSession(_) => pb::IoStatus::IoStaleSession,
        StoreError::NoSpace(_) => pb::IoStatus::IoNoSpace,
        _ => pb::IoStatus::IoError,
    }
}
