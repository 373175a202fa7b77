//! The Tandem gRPC contract, `tandem.v1`, as generated tonic/prost code.
//!
//! This crate owns the wire format and nothing else: no logic, no validation. The coordinator
//! and the participant SDK convert these types into their own domain types once, at the edge,
//! and never pass prost types further in. The contract itself, with the meaning of every field
//! and the status codes each call returns, is `proto/tandem/v1/tandem.proto`.

#![allow(clippy::all, missing_docs)]

/// Generated code for package `tandem.v1`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// The contract as an encoded `google.protobuf.FileDescriptorSet` (every file of `tandem.v1`
/// with its imports and source info), written by `build.rs`. The coordinator serves it through
/// gRPC server reflection, so tools such as grpcurl can list and call its services without a
/// copy of the `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
