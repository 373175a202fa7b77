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
