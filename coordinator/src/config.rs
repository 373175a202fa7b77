//! The coordinator's configuration and the limits on everything that comes from outside.
//!
//! Every limit is a named constant or a field with its unit in the name; docs/protocol.md
//! lists them with the status a violation gets.

use std::time::Duration;

use tandem_common::Backoff;

use crate::engine::saga::{RetryPolicy, STUCK_AFTER_FAILURES_DEFAULT};

/// Most branches one transaction may have.
pub const BRANCHES_MAX: usize = 64;
/// Largest payload of one branch, in bytes.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest resource name, in bytes.
pub const RESOURCE_NAME_LEN_MAX: usize = 64;
/// Longest participant address, in bytes.
pub const PARTICIPANT_ADDR_LEN_MAX: usize = 256;
/// Largest request the coordinator decodes, in bytes: the largest valid transaction (every
/// branch at the payload limit) with room for its framing. tonic's default (4 MiB) would
/// refuse valid requests with OUT_OF_RANGE before they reach validation.
pub const REQUEST_BYTES_MAX: usize = BRANCHES_MAX * (PAYLOAD_BYTES_MAX + 1024) + 64 * 1024;
/// Most steps one saga may have.
pub const SAGA_STEPS_MAX: usize = 32;
/// Largest total of a saga's action and compensation payloads, in bytes (the accepted saga is
/// stored as one record, which must stay under `tandem_common::RECORD_BYTES_MAX`).
pub const SAGA_PAYLOAD_BYTES_TOTAL_MAX: usize = 64 * 1024;
/// Longest step name, in bytes.
pub const STEP_NAME_LEN_MAX: usize = 64;
/// Most attempts a step's retry policy may allow.
pub const STEP_ATTEMPTS_MAX: u32 = 1_000;
/// Longest delay a retry policy may ask for, in ms.
pub const RETRY_DELAY_MS_MAX: u64 = 3_600_000;
/// Largest growth factor of a retry policy.
pub const RETRY_MULTIPLIER_MAX: f64 = 10.0;
/// Longest a `WaitSaga` may wait, in ms.
pub const SAGA_WAIT_MS_MAX: u64 = 300_000;

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
    /// Retry policy of a saga step's action when the saga sets none.
    pub saga_retry_default: RetryPolicy,
    /// Bound of one action call when the step sets none, and the largest it may set.
    pub step_timeout_ms_default: u64,
    pub step_timeout_ms_max: u64,
    /// Backoff between attempts of a compensation (retried without limit).
    pub saga_compensation_backoff: Backoff,
    /// Consecutive failures of a compensation after which the saga is flagged stuck.
    pub saga_stuck_after_failures: u32,
    /// Backoff between deliveries of a completion callback (retried without limit).
    pub saga_callback_backoff: Backoff,
    /// Most sagas in flight; beyond it new ones get RESOURCE_EXHAUSTED.
    pub saga_in_flight_max: usize,
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
            saga_retry_default: RetryPolicy::default(),
            step_timeout_ms_default: 10_000,
            step_timeout_ms_max: 300_000,
            saga_compensation_backoff: Backoff {
                initial_ms: 100,
                multiplier: 2.0,
                max_ms: 10_000,
            },
            saga_stuck_after_failures: STUCK_AFTER_FAILURES_DEFAULT,
            saga_callback_backoff: Backoff::default(),
            saga_in_flight_max: 10_000,
        }
    }

    pub fn decision_call_timeout(&self) -> Duration {
        Duration::from_millis(self.decision_call_timeout_ms)
    }
}
