//! The Tandem participant SDK: what a service links in to take part in transactions.
//!
//! - [`resource`]: the trait a service implements for a two-phase resource (prepare, commit,
//!   abort), each handed a sled transaction over the service's own trees;
//! - [`barrier`]: the rules that make every call idempotent and safe in any order (repeated
//!   calls return the recorded result, an abort before its prepare is recorded as a no-op, a
//!   prepare after its abort votes no);
//! - [`participant`]: the [`Participant`]: the sled-backed branch log, the barrier applied in
//!   the same sled transaction as the service's writes, forced before any YES vote;
//! - [`server`]: the `tandem.v1.Participant` gRPC endpoint, hosted with one call;
//! - [`in_doubt`]: the resolver that asks the coordinator about branches left prepared;
//! - [`client`]: [`TandemClient`], which services use to start transactions;
//! - [`bank`]: the sample service (accounts with holds), used by `tandem-bank`, the demo,
//!   the benchmark and the end-to-end tests.

pub mod bank;
pub mod barrier;
mod batch;
pub mod client;
pub mod error;
pub mod in_doubt;
pub mod participant;
pub mod resource;
pub mod server;

pub use client::{Branch, Outcome, TandemClient};
pub use error::Error;
pub use participant::{Participant, ParticipantConfig};
pub use resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};
pub use tandem_common::TxnId;
