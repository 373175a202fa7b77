//! The Tandem gRPC contract, `tandem.v1`, as generated tonic/prost code.
//!
//! This crate owns the wire format and nothing else: no logic, no validation (beyond carrying
//! a status inside a batched answer, [`v1::CallError`], which is wire format too). The coordinator
//! and the participant SDK convert these types into their own domain types once, at the edge,
//! and never pass prost types further in. The contract itself, with the meaning of every field
//! and the status codes each call returns, is `proto/tandem/v1/tandem.proto`.

#![allow(clippy::all, missing_docs)]

/// Generated code for package `tandem.v1`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");

    /// An item of a batched call carries the status the single call would have returned.
    impl From<&tonic::Status> for CallError {
        fn from(status: &tonic::Status) -> Self {
            CallError {
                code: status.code() as i32,
                message: status.message().to_string(),
                details: status.details().to_vec(),
            }
        }
    }

    /// The status an item of a batched call stands for (its details, e.g. a retry hint,
    /// included), to be handled exactly as the single call's.
    impl From<CallError> for tonic::Status {
        fn from(error: CallError) -> Self {
            tonic::Status::with_details(
                tonic::Code::from(error.code),
                error.message,
                error.details.into(),
            )
        }
    }
}

/// The contract as an encoded `google.protobuf.FileDescriptorSet` (every file of `tandem.v1`
/// with its imports and source info), written by `build.rs`. The coordinator serves it through
/// gRPC server reflection, so tools such as grpcurl can list and call its services without a
/// copy of the `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
