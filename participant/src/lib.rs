//! The Tandem participant SDK: what a service links in to take part in transactions.
//!
//! - [`resource`]: the trait a service implements for a two-phase resource (prepare, commit,
//!   abort), each handed a sled transaction over the service's own trees;
//! - [`barrier`]: the rules that make every call idempotent and safe in any order (repeated
//!   calls return the recorded result, an abort before its prepare is recorded as a no-op, a
//!   prepare after its abort votes no);
//! - [`saga`]: the traits a service implements for sagas: a step ([`CompensableResource`]:
//!   an action and its compensation) and a completion callback ([`SagaCallbackHandler`]);
//! - [`saga_barrier`]: the same rules for saga steps (a repeated action returns the recorded
//!   result, a compensation before its action is recorded as a no-op, an action after its
//!   compensation is refused);
//! - [`saga_state`]: a saga as the coordinator reports it ([`SagaState`], [`SagaChange`]),
//!   converted from the contract once;
//! - [`participant`]: the [`Participant`]: the sled-backed branch and step logs, the barriers
//!   applied in the same sled transaction as the service's writes, forced before any answer;
//! - [`server`]: the `tandem.v1.Participant` gRPC endpoint, hosted with one call;
//! - [`prune`]: the pruner that forgets barrier records older than the retention, and the
//!   horizon that keeps late calls of forgotten ids safe;
//! - [`in_doubt`]: the resolver that asks the coordinator about branches left prepared;
//! - [`client`]: [`TandemClient`], which services use to start transactions and sagas;
//! - [`bank`]: the sample service (accounts with holds; saga transfers; a callback log), used
//!   by `tandem-bank`, the demo, the benchmark and the end-to-end tests;
//! - `testkit` (cargo feature `testkit`): drives a service's resource or saga step with
//!   repeated, reordered and concurrent calls and crashes, checking the service's invariant
//!   and the barrier's promises after each call.

pub mod bank;
pub mod barrier;
mod batch;
pub mod client;
pub mod error;
pub mod in_doubt;
pub mod participant;
pub mod prune;
pub mod resource;
pub mod saga;
pub mod saga_barrier;
pub mod saga_state;
pub mod server;
#[cfg(feature = "testkit")]
pub mod testkit;
mod wait_stream;

pub use client::{
    Branch, ConnectOptions, Outcome, RetryPolicy, Saga, SagaShape, Step, TandemClient,
};
pub use error::Error;
pub use participant::{CallbackDelivery, Participant, ParticipantConfig};
pub use resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};
pub use saga::{CompensableResource, SagaCallbackHandler, StepContext, StepOutcome};
pub use saga_state::{
    SagaChange, SagaChangeKind, SagaOutcome, SagaPhase, SagaState, StepPhase, StepState,
};
pub use tandem_common::credentials::{Token, TokenSet};
pub use tandem_common::{TraceContext, TxnId};
