//! The saga half of the `tandem.v1.Coordinator` edge: validation of submitted sagas and the
//! conversions between prost messages and the saga engine's types, done here once.
//!
//! Every limit in [`crate::config`] that concerns sagas is checked before anything is
//! written; a violation is `INVALID_ARGUMENT` naming the step and the field. The participant
//! of every step and of the callback must be on a host the allow-list admits, or the saga is
//! refused with `PERMISSION_DENIED` (see [`super::check_participant_allowed`]).

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use tandem_common::{codec, Backoff, TxnId};
use tandem_proto::v1 as pb;

use super::{
    check_participant_allowed, invalid, normalize_participant, validate_resource, validate_txn_id,
};
use crate::config::{
    CoordinatorConfig, PAYLOAD_BYTES_MAX, RETRY_DELAY_MS_MAX, RETRY_MULTIPLIER_MAX,
    SAGA_PAYLOAD_BYTES_TOTAL_MAX, SAGA_STEPS_MAX, STEP_ATTEMPTS_MAX, STEP_NAME_LEN_MAX,
};
use crate::engine::saga::{
    ChangeKind, RetryPolicy, SagaOutcome, SagaPhase, SagaSpec, StepPhase, StepSpec,
};
use crate::engine::types::BranchTarget;
use crate::error::CoordinatorError;
use crate::log::record::Fingerprint;
use crate::runtime::{SagaView, SubmitSagaRequest, WatchItem};

/// Longest retry deadline a step may set, in ms (a day).
const RETRY_DEADLINE_MS_MAX: u64 = 86_400_000;

fn validate_step_name(i: usize, name: &str) -> Result<(), CoordinatorError> {
    if name.is_empty() || name.len() > STEP_NAME_LEN_MAX {
        return Err(invalid(format!(
            "step #{i}: name must be 1 to {STEP_NAME_LEN_MAX} bytes long (got {})",
            name.len()
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return Err(invalid(format!(
            "step #{i}: name {name:?} may only hold [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

fn validate_retry(
    step: &str,
    retry: Option<pb::RetryPolicy>,
    default: &RetryPolicy,
) -> Result<RetryPolicy, CoordinatorError> {
    let Some(retry) = retry else {
        return Ok(default.clone());
    };
    let bad = |why: String| invalid(format!("step {step:?}: retry policy: {why}"));
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let initial_ms = or_default(retry.initial_delay_ms, default.backoff.initial_ms);
    let max_ms = or_default(retry.max_delay_ms, default.backoff.max_ms);
    for (field, value) in [("initial_delay_ms", initial_ms), ("max_delay_ms", max_ms)] {
        if value > RETRY_DELAY_MS_MAX {
            return Err(bad(format!(
                "{field} {value} is above the limit of {RETRY_DELAY_MS_MAX}"
            )));
        }
    }
    if initial_ms > max_ms {
        return Err(bad(format!(
            "initial_delay_ms {initial_ms} is above max_delay_ms {max_ms}"
        )));
    }
    let multiplier = if retry.multiplier == 0.0 {
        default.backoff.multiplier
    } else {
        retry.multiplier
    };
    if !multiplier.is_finite() || !(1.0..=RETRY_MULTIPLIER_MAX).contains(&multiplier) {
        return Err(bad(format!(
            "multiplier {} must be between 1.0 and {RETRY_MULTIPLIER_MAX} (0 means the default)",
            retry.multiplier
        )));
    }
    let attempts_max = if retry.max_attempts == 0 {
        default.attempts_max
    } else {
        retry.max_attempts
    };
    if attempts_max > STEP_ATTEMPTS_MAX {
        return Err(bad(format!(
            "max_attempts {attempts_max} is above the limit of {STEP_ATTEMPTS_MAX}"
        )));
    }
    if retry.deadline_ms > RETRY_DEADLINE_MS_MAX {
        return Err(bad(format!(
            "deadline_ms {} is above the limit of {RETRY_DEADLINE_MS_MAX}",
            retry.deadline_ms
        )));
    }
    Ok(RetryPolicy {
        backoff: Backoff {
            initial_ms,
            multiplier,
            max_ms,
        },
        attempts_max,
        deadline_ms: retry.deadline_ms,
    })
}

/// The digest that tells an idempotent re-submission from a conflicting reuse of an id.
pub fn saga_fingerprint(spec: &SagaSpec) -> Fingerprint {
    let bytes = codec::encode(spec).expect("a validated saga encodes");
    let mut hasher = Sha256::new();
    hasher.update(b"saga");
    hasher.update(&bytes);
    hasher.finalize().into()
}

/// Validates a `SubmitSaga` request into the runtime's form. Changes nothing.
pub fn validate_submit_saga(
    request: pb::SubmitSagaRequest,
    config: &CoordinatorConfig,
    now_ms: u64,
) -> Result<SubmitSagaRequest, CoordinatorError> {
    if request.steps.is_empty() {
        return Err(invalid(
            "a saga needs at least one step; none were given".into(),
        ));
    }
    if request.steps.len() > SAGA_STEPS_MAX {
        return Err(invalid(format!(
            "{} steps given; at most {SAGA_STEPS_MAX} are allowed",
            request.steps.len()
        )));
    }
    let mut index_of = BTreeMap::new();
    for (i, step) in request.steps.iter().enumerate() {
        validate_step_name(i, &step.name)?;
        if index_of.insert(step.name.clone(), i as u32).is_some() {
            return Err(invalid(format!(
                "step #{i}: the name {:?} is used twice",
                step.name
            )));
        }
    }
    let mut payload_total = 0usize;
    let mut steps = Vec::with_capacity(request.steps.len());
    for (i, step) in request.steps.into_iter().enumerate() {
        let name = step.name;
        let here = |e: CoordinatorError| invalid(format!("step {name:?}: {e}"));
        let participant = normalize_participant(&step.participant).map_err(here)?;
        check_participant_allowed(&participant, config, || format!("step {name:?}"))?;
        validate_resource(&step.resource).map_err(here)?;
        for (field, payload) in [
            ("action", &step.action),
            ("compensation", &step.compensation),
        ] {
            if payload.len() > PAYLOAD_BYTES_MAX {
                return Err(invalid(format!(
                    "step {name:?}: {field} payload is {} bytes; at most {PAYLOAD_BYTES_MAX} are allowed",
                    payload.len()
                )));
            }
            payload_total += payload.len();
        }
        let after = if request.sequential {
            if !step.after.is_empty() {
                return Err(invalid(format!(
                    "step {name:?}: `after` must be empty in a sequential saga (the order of the steps is the sequence)"
                )));
            }
            if i == 0 {
                vec![]
            } else {
                vec![i as u32 - 1]
            }
        } else {
            let mut after = BTreeSet::new();
            for dependency in &step.after {
                let Some(&j) = index_of.get(dependency) else {
                    return Err(invalid(format!(
                        "step {name:?}: waits for {dependency:?}, which is not a step of this saga"
                    )));
                };
                if j == i as u32 {
                    return Err(invalid(format!("step {name:?}: waits for itself")));
                }
                after.insert(j);
            }
            after.into_iter().collect()
        };
        let timeout_ms = match step.timeout_ms {
            0 => config.step_timeout_ms_default,
            t if t > config.step_timeout_ms_max => {
                return Err(invalid(format!(
                    "step {name:?}: timeout_ms {t} is out of range: at most {} (0 means the default, {})",
                    config.step_timeout_ms_max, config.step_timeout_ms_default
                )))
            }
            t => t,
        };
        let retry = validate_retry(&name, step.retry, &config.saga_retry_default)?;
        steps.push(StepSpec {
            name,
            target: BranchTarget {
                participant,
                resource: step.resource,
            },
            action: step.action,
            compensation: step.compensation,
            after,
            retry,
            timeout_ms,
        });
    }
    if payload_total > SAGA_PAYLOAD_BYTES_TOTAL_MAX {
        return Err(invalid(format!(
            "the saga's payloads add up to {payload_total} bytes; at most {SAGA_PAYLOAD_BYTES_TOTAL_MAX} are allowed"
        )));
    }
    let callback = match request.callback {
        None => None,
        Some(callback) => {
            let here = |e: CoordinatorError| invalid(format!("callback: {e}"));
            let participant = normalize_participant(&callback.participant).map_err(here)?;
            check_participant_allowed(&participant, config, || "callback".into())?;
            validate_resource(&callback.resource).map_err(here)?;
            Some(BranchTarget {
                participant,
                resource: callback.resource,
            })
        }
    };
    let saga = validate_txn_id(&request.saga_id, config, now_ms)?;
    let spec = SagaSpec { steps, callback };
    // Cycles (and anything else the engine would refuse) are named here, before any write.
    spec.validate_graph().map_err(invalid)?;
    let fingerprint = saga_fingerprint(&spec);
    Ok(SubmitSagaRequest {
        saga,
        spec,
        fingerprint,
        trace: None,
    })
}

pub fn parse_saga_id(id: &str) -> Result<TxnId, CoordinatorError> {
    TxnId::parse(id).map_err(|e| invalid(format!("saga id: {e}")))
}

fn phase_to_pb(phase: &SagaPhase) -> pb::SagaPhase {
    match phase {
        // Not visible to clients in practice: nobody hears of a saga before it is accepted.
        SagaPhase::Accepting | SagaPhase::Running => pb::SagaPhase::Running,
        SagaPhase::Compensating => pb::SagaPhase::Compensating,
        SagaPhase::Completed => pb::SagaPhase::Completed,
        SagaPhase::Compensated => pb::SagaPhase::Compensated,
        SagaPhase::Aborted => pb::SagaPhase::Aborted,
    }
}

pub(crate) fn step_phase_to_pb(phase: &StepPhase) -> pb::StepPhase {
    match phase {
        StepPhase::Pending => pb::StepPhase::Pending,
        StepPhase::Running => pb::StepPhase::Running,
        StepPhase::Succeeded => pb::StepPhase::Succeeded,
        StepPhase::Failed => pb::StepPhase::Failed,
        StepPhase::Compensating => pb::StepPhase::Compensating,
        StepPhase::Compensated => pb::StepPhase::Compensated,
        StepPhase::Skipped => pb::StepPhase::Skipped,
    }
}

/// A saga's state as the contract carries it.
pub fn view_to_pb(view: &SagaView) -> pb::SagaState {
    let status = &view.status;
    let (failed_step, reason) = match &status.outcome {
        Some(SagaOutcome::Compensated {
            failed_step,
            reason,
        }) => (failed_step.clone(), reason.clone()),
        Some(SagaOutcome::Aborted { reason }) => (String::new(), reason.clone()),
        Some(SagaOutcome::Completed) | None => (String::new(), String::new()),
    };
    // Terminal only once the outcome is durable; until then the saga shows the phase that
    // leads to it.
    let terminal = status.phase.is_terminal() && status.outcome.is_some();
    let phase = match status.phase {
        SagaPhase::Completed if !terminal => SagaPhase::Running,
        SagaPhase::Compensated | SagaPhase::Aborted if !terminal => SagaPhase::Compensating,
        phase => phase,
    };
    pb::SagaState {
        saga_id: view.saga.to_string(),
        phase: phase_to_pb(&phase) as i32,
        terminal,
        failed_step,
        reason,
        steps: view
            .step_names
            .iter()
            .zip(&status.steps)
            .map(|(name, step)| pb::StepState {
                name: name.clone(),
                phase: step_phase_to_pb(&step.phase) as i32,
                action_attempts: step.action_attempts,
                compensation_attempts: step.compensation_attempts,
                last_error: step.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        stuck: status.stuck,
        callback_delivered: status.callback_delivered,
        accepted_ms: status.accepted_ms,
        held: status.held,
    }
}

fn change_kind_to_pb(kind: &ChangeKind) -> pb::SagaChangeKind {
    match kind {
        ChangeKind::Accepted => pb::SagaChangeKind::Accepted,
        ChangeKind::StepStarted => pb::SagaChangeKind::StepStarted,
        ChangeKind::StepSucceeded => pb::SagaChangeKind::StepSucceeded,
        ChangeKind::StepFailed => pb::SagaChangeKind::StepFailed,
        ChangeKind::StepRetried => pb::SagaChangeKind::StepRetried,
        ChangeKind::CompensationStarted => pb::SagaChangeKind::CompensationStarted,
        ChangeKind::StepCompensated => pb::SagaChangeKind::StepCompensated,
        ChangeKind::CompensationRetried => pb::SagaChangeKind::CompensationRetried,
        ChangeKind::Stuck => pb::SagaChangeKind::Stuck,
        ChangeKind::Finished => pb::SagaChangeKind::Finished,
    }
}

/// One watch item as the contract carries it. `step_names` names the change's step.
pub fn watch_item_to_pb(item: &WatchItem, step_names: &[String]) -> pb::SagaChange {
    let change = &item.change;
    pb::SagaChange {
        seq: change.seq,
        at_ms: change.at_ms,
        kind: change_kind_to_pb(&change.kind) as i32,
        step: change
            .step
            .and_then(|i| step_names.get(i as usize).cloned())
            .unwrap_or_default(),
        attempt: change.attempt,
        detail: change.detail.clone(),
        outcome: item.finished.as_ref().map(view_to_pb),
    }
}
