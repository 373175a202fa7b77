//! The coordinator's configuration and the limits on everything that comes from outside.
//!
//! Every limit is a named constant or a field with its unit in the name; docs/protocol.md
//! lists them with the status a violation gets.

use std::time::Duration;

use tandem_common::Backoff;

/// Most branches one transaction may have.
pub const BRANCHES_MAX: usize = 64;
/// Largest payload of one branch, in bytes.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest resource name, in bytes.
pub const RESOURCE_NAME_LEN_MAX: usize = 64;
/// Longest participant address, in bytes.
pub const PARTICIPANT_ADDR_LEN_MAX: usize = 256;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The address participants use to reach this coordinator (sent with every prepare).
    pub advertise: String,
    /// Prepare deadline when the client sets none.
    pub prepare_timeout_ms_default: u64,
    /// Largest prepare deadline a client may ask for.
    pub prepare_timeout_ms_max: u64,
    /// Timeout of one commit/abort delivery call.
    pub decision_call_timeout_ms: u64,
    /// Backoff between deliveries of a decision that was not acknowledged.
    pub redelivery_backoff: Backoff,
    /// Most transactions in flight; beyond it new ones get RESOURCE_EXHAUSTED.
    pub txn_in_flight_max: usize,
    /// Ids older than this are refused, so that an id can never name two transactions even
    /// once old records are pruned. Records are kept at least this long.
    pub txn_id_age_ms_max: u64,
    /// Ids dated further in the future than this are refused (clock skew allowance).
    pub txn_id_future_ms_max: u64,
    /// Seed of the engine's jitter; fixed seeds make runs replayable.
    pub rng_seed: u64,
}

impl CoordinatorConfig {
    pub fn new(advertise: impl Into<String>) -> Self {
        CoordinatorConfig {
            advertise: advertise.into(),
            prepare_timeout_ms_default: 10_000,
            prepare_timeout_ms_max: 300_000,
            decision_call_timeout_ms: 5_000,
            redelivery_backoff: Backoff::default(),
            txn_in_flight_max: 10_000,
            txn_id_age_ms_max: 7 * 24 * 3600 * 1000,
            txn_id_future_ms_max: 5 * 60 * 1000,
            rng_seed: tandem_common::unix_now_ms(),
        }
    }

    pub fn decision_call_timeout(&self) -> Duration {
        Duration::from_millis(self.decision_call_timeout_ms)
    }
}
