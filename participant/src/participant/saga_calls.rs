//! A participant's saga calls: `act` and `compensate` applied through the saga barrier
//! ([`crate::saga_barrier`], records in [`STEPS_TREE`]), and `saga_finished` applied through
//! the callback log ([`SAGA_CALLBACKS_TREE`]).
//!
//! Each call is one body in a batch (`crate::batch`), exactly like prepare and decide: the
//! record is read, the service's code runs if the barrier says so, and the new record is
//! written in the same sled transaction as the service's writes, answered only after the
//! flush that covers it. So a step's action takes effect at most once however often (and in
//! whatever order with its compensation) the coordinator sends it, and an answered result
//! survives a crash.
//!
//! A business failure (`StepOutcome::Failed`) abandons the transaction with
//! `Abandon::Declined`, as a NO vote does: the action's writes are discarded and the body
//! re-runs in its fallback form, which only records `ActionFailed`.
//!
//! Completion callbacks: the coordinator delivers a finished saga's state until a delivery is
//! acknowledged (also across its restarts), so the same callback may arrive many times. The
//! first delivery runs the handler and writes a [`CallbackRecord`] keyed by `(saga, handler)`
//! in the same transaction as the handler's writes; every later one finds the record and is
//! acknowledged without running the handler: the handler's effects happen exactly once.
//!
//! Crash point: `participant.after_action_applied` — the first successful run of an action is
//! durable and not yet answered (the coordinator's retry then gets the recorded SUCCEEDED).
//! A business failure is not "applied" and does not reach it.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tandem_common::crash::crash_point;
use tandem_common::{codec, unix_now_ms, TxnId};
use tracing::Instrument;

use super::{
    indexed_key, read_record, resource_result, write_record, Hosted, Participant,
    SAGA_CALLBACKS_VIEW, STEPS_VIEW,
};
#[cfg(doc)]
use super::{SAGA_CALLBACKS_TREE, STEPS_TREE};
use crate::batch::{Abandon, TxResult};
use crate::error::Error;
use crate::saga::{
    bounded_reason, CompensableResource, SagaCallbackHandler, StepContext, StepOutcome,
};
use crate::saga_barrier::{self, StepCall, StepDecision, StepRecord};
use crate::saga_state::{SagaPhase, SagaState};

/// What the callback log holds for a saga whose callback a handler has handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackRecord {
    /// The saga's final phase, as delivered.
    pub phase: SagaPhase,
    /// When the handler ran, in ms since the Unix epoch.
    pub handled_ms: u64,
}

/// What a delivery of a completion callback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackDelivery {
    /// The handler ran (this was the first delivery).
    Handled,
    /// The handler had already run for this saga: nothing ran again.
    AlreadyHandled,
}

/// What a compensate call did (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compensation {
    /// The step's compensation ran.
    Ran,
    /// Nothing to undo (no action, or a failed one): recorded without running anything.
    Null,
    /// Compensated before: nothing ran again.
    Repeat,
}

fn step_key(saga: &TxnId, step: u32) -> Vec<u8> {
    indexed_key(saga, step)
}

/// The callback log's key: the saga id, a NUL (which no id contains) and the handler's name.
fn callback_key(saga: &TxnId, handler: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(saga.as_str().len() + 1 + handler.len());
    key.extend_from_slice(saga.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(handler.as_bytes());
    key
}

/// Records a business failure of the action (whose writes were discarded), unless something
/// was recorded first, in which case that record decides the answer. Returns the answer and
/// whether this call recorded it.
fn record_action_failed_in(
    log: &TransactionalTree,
    ctx: &StepContext,
    reason: &str,
) -> TxResult<(StepOutcome, bool)> {
    let key = step_key(&ctx.saga, ctx.step);
    let recorded: Option<StepRecord> = read_record(log, &key)?;
    match recorded {
        None => {
            let record = StepRecord::ActionFailed {
                resource: ctx.resource.clone(),
                reason: reason.to_string(),
                acted_ms: unix_now_ms(),
            };
            write_record(log, &key, &record)?;
            Ok((
                StepOutcome::Failed {
                    reason: reason.to_string(),
                },
                true,
            ))
        }
        Some(existing) => match saga_barrier::decide(Some(&existing), StepCall::Act) {
            StepDecision::AnswerOutcome(outcome) => Ok((outcome, false)),
            other @ (StepDecision::RunAction
            | StepDecision::RunCompensation
            | StepDecision::RecordNullCompensation
            | StepDecision::AnswerDone) => {
                unreachable!("saga barrier answered {other:?} to a recorded step's act")
            }
        },
    }
}

impl Participant {
    fn saga_step(&self, name: &str) -> Result<&Hosted<dyn CompensableResource>, Error> {
        self.inner
            .saga_steps
            .get(name)
            .ok_or_else(|| Error::UnknownSagaStep(name.to_string()))
    }

    fn saga_callback_handler(&self, name: &str) -> Result<&Hosted<dyn SagaCallbackHandler>, Error> {
        self.inner
            .saga_callback_handlers
            .get(name)
            .ok_or_else(|| Error::UnknownSagaCallback(name.to_string()))
    }

    /// Runs a saga step's action (at most once per `(saga, step)`) and returns its outcome,
    /// durable before it returns. A repeat returns the recorded outcome; an action after the
    /// step's compensation returns `Failed { reason: "compensated" }` without running.
    pub async fn act(&self, ctx: &StepContext, payload: &[u8]) -> Result<StepOutcome, Error> {
        self.saga_step(&ctx.resource)?;
        let span = tracing::debug_span!("act", saga = %ctx.saga, step = ctx.step, step_name = %ctx.step_name);
        let (this, job_ctx, payload) = (self.clone(), ctx.clone(), payload.to_vec());
        let (outcome, first_time) = self
            .inner
            .batcher
            .run(Box::new(move |views, declined| match declined {
                None => this.act_in(views, &job_ctx, &payload),
                Some(Abandon::Declined(reason)) => {
                    record_action_failed_in(&views[STEPS_VIEW], &job_ctx, reason)
                }
                Some(other) => unreachable!("act re-run after {other:?}"),
            }))
            .instrument(span.clone())
            .await?;
        if first_time && outcome == StepOutcome::Succeeded {
            crash_point("participant.after_action_applied");
        }
        span.in_scope(|| tracing::debug!(?outcome, first_time, "act answered"));
        Ok(outcome)
    }

    /// The action, inside a batch's transaction: the outcome, and whether this call recorded
    /// it (false for a repeat or a refusal). A business failure abandons the transaction, so
    /// that the service's writes are discarded; the batch then records it with
    /// [`record_action_failed_in`].
    fn act_in(
        &self,
        views: &[TransactionalTree],
        ctx: &StepContext,
        payload: &[u8],
    ) -> TxResult<(StepOutcome, bool)> {
        let hosted = self
            .saga_step(&ctx.resource)
            .expect("checked before queuing");
        let key = step_key(&ctx.saga, ctx.step);
        let log = &views[STEPS_VIEW];
        let recorded: Option<StepRecord> = read_record(log, &key)?;
        if recorded.is_none() && crate::prune::forgotten(views, &ctx.saga)? {
            let reason = crate::prune::FORGOTTEN_REASON.to_string();
            return Ok((StepOutcome::Failed { reason }, false));
        }
        match saga_barrier::decide(recorded.as_ref(), StepCall::Act) {
            StepDecision::RunAction => {
                let service = hosted.service_trees(views);
                match resource_result(hosted.handler.action(ctx, payload, &service))? {
                    StepOutcome::Succeeded => {
                        let record = StepRecord::ActionSucceeded {
                            resource: ctx.resource.clone(),
                            acted_ms: unix_now_ms(),
                        };
                        write_record(log, &key, &record)?;
                        Ok((StepOutcome::Succeeded, true))
                    }
                    StepOutcome::Failed { reason } => Err(ConflictableTransactionError::Abort(
                        Abandon::Declined(bounded_reason(reason)),
                    )),
                }
            }
            StepDecision::AnswerOutcome(outcome) => Ok((outcome, false)),
            other @ (StepDecision::RunCompensation
            | StepDecision::RecordNullCompensation
            | StepDecision::AnswerDone) => {
                unreachable!("saga barrier answered {other:?} to an act")
            }
        }
    }

    /// Compensates a saga step, durable before it returns. Idempotent. Runs the step's
    /// compensation only if its action succeeded here; otherwise records the compensation
    /// (so that a late action is refused) and runs nothing.
    pub async fn compensate(&self, ctx: &StepContext, payload: &[u8]) -> Result<(), Error> {
        self.saga_step(&ctx.resource)?;
        let span = tracing::debug_span!("compensate", saga = %ctx.saga, step = ctx.step, step_name = %ctx.step_name);
        let (this, job_ctx, payload) = (self.clone(), ctx.clone(), payload.to_vec());
        let compensation = self
            .inner
            .batcher
            .run(Box::new(move |views, prior| {
                debug_assert!(prior.is_none(), "a compensation never declines");
                this.compensate_in(views, &job_ctx, &payload)
            }))
            .instrument(span.clone())
            .await?;
        span.in_scope(|| tracing::debug!(?compensation, "compensate answered"));
        Ok(())
    }

    fn compensate_in(
        &self,
        views: &[TransactionalTree],
        ctx: &StepContext,
        payload: &[u8],
    ) -> TxResult<Compensation> {
        let hosted = self
            .saga_step(&ctx.resource)
            .expect("checked before queuing");
        let key = step_key(&ctx.saga, ctx.step);
        let log = &views[STEPS_VIEW];
        let recorded: Option<StepRecord> = read_record(log, &key)?;
        if let Some(StepRecord::ActionSucceeded {
            resource: acted_by, ..
        }) = &recorded
        {
            if acted_by != &ctx.resource {
                return Err(ConflictableTransactionError::Abort(Abandon::Refused(
                    format!(
                        "saga {} step {}: the action ran at saga step {acted_by:?}, not {:?}",
                        ctx.saga, ctx.step, ctx.resource
                    ),
                )));
            }
        }
        if recorded.is_none() && crate::prune::forgotten(views, &ctx.saga)? {
            return Err(ConflictableTransactionError::Abort(Abandon::Refused(format!(
                "saga {} step {} is older than this participant's retention and its record may have been pruned: whether its action took effect here is unknown; compensate it by hand",
                ctx.saga, ctx.step
            ))));
        }
        match saga_barrier::decide(recorded.as_ref(), StepCall::Compensate) {
            StepDecision::RunCompensation => {
                let service = hosted.service_trees(views);
                resource_result(hosted.handler.compensate(ctx, payload, &service))?;
                let record = StepRecord::Compensated {
                    action_applied: true,
                    compensated_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(Compensation::Ran)
            }
            StepDecision::RecordNullCompensation => {
                let record = StepRecord::Compensated {
                    action_applied: false,
                    compensated_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(Compensation::Null)
            }
            StepDecision::AnswerDone => Ok(Compensation::Repeat),
            other @ (StepDecision::RunAction | StepDecision::AnswerOutcome(_)) => {
                unreachable!("saga barrier answered {other:?} to a compensate")
            }
        }
    }

    /// Delivers a finished saga's state to the callback handler `handler`: runs it the first
    /// time (durable before this returns), and only acknowledges every later delivery.
    /// `outcome` must be terminal.
    pub async fn saga_finished(
        &self,
        handler: &str,
        outcome: &SagaState,
    ) -> Result<CallbackDelivery, Error> {
        self.saga_callback_handler(handler)?;
        if !outcome.terminal || !outcome.phase.is_terminal() {
            return Err(Error::InvalidArgument(format!(
                "saga {} is {:?}, not finished: a completion callback carries a terminal state",
                outcome.id, outcome.phase
            )));
        }
        let span = tracing::debug_span!("saga_finished", saga = %outcome.id, handler);
        let (this, handler_name, job_outcome) =
            (self.clone(), handler.to_string(), outcome.clone());
        let delivery = self
            .inner
            .batcher
            .run(Box::new(move |views, prior| {
                debug_assert!(prior.is_none(), "a callback never declines");
                this.saga_finished_in(views, &handler_name, &job_outcome)
            }))
            .instrument(span.clone())
            .await?;
        span.in_scope(|| tracing::debug!(?delivery, phase = ?outcome.phase, "callback answered"));
        Ok(delivery)
    }

    fn saga_finished_in(
        &self,
        views: &[TransactionalTree],
        handler: &str,
        outcome: &SagaState,
    ) -> TxResult<CallbackDelivery> {
        let hosted = self
            .saga_callback_handler(handler)
            .expect("checked before queuing");
        let key = callback_key(&outcome.id, handler);
        let log = &views[SAGA_CALLBACKS_VIEW];
        let recorded: Option<CallbackRecord> = read_record(log, &key)?;
        match recorded {
            Some(_) => Ok(CallbackDelivery::AlreadyHandled),
            None => {
                let service = hosted.service_trees(views);
                resource_result(hosted.handler.on_finished(&outcome.id, outcome, &service))?;
                let record = CallbackRecord {
                    phase: outcome.phase,
                    handled_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(CallbackDelivery::Handled)
            }
        }
    }

    /// The step's record in the step log, if any.
    pub fn step_record(&self, saga: &TxnId, step: u32) -> Result<Option<StepRecord>, Error> {
        match self.inner.steps.get(step_key(saga, step))? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The callback log's record of `handler` having handled `saga`'s completion, if any.
    pub fn saga_callback_record(
        &self,
        saga: &TxnId,
        handler: &str,
    ) -> Result<Option<CallbackRecord>, Error> {
        match self.inner.saga_callbacks.get(callback_key(saga, handler))? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hold_flusher;
    use super::super::tests::{ctx as branch_ctx, kv_keys, Kv, KV_TREE};
    use super::*;
    use crate::resource::{ResourceError, ServiceTrees, Vote};
    use crate::saga_state::StepState;
    use std::path::Path;

    /// A key-value saga step whose payload says how the action behaves: `key=value` writes
    /// `key` and succeeds; `fail:key` writes `key` and fails for a business reason (so the
    /// write must be discarded); `panic` panics. Every run of the action also counts itself in
    /// `runs/<saga>/<step>` (in the same transaction, so only effective runs count); the
    /// compensation (payload `key`) removes `key` and counts itself in `undos/<saga>/<step>`.
    struct KvStep;

    fn bump(trees: &ServiceTrees<'_>, key: String) -> Result<(), ResourceError> {
        let kv = trees.tree(KV_TREE);
        let n = match kv.get(key.as_bytes())? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().unwrap()),
            None => 0,
        };
        kv.insert(key.as_bytes(), &(n + 1).to_be_bytes())?;
        Ok(())
    }

    impl CompensableResource for KvStep {
        fn trees(&self) -> Vec<String> {
            vec![KV_TREE.to_string()]
        }

        fn action(
            &self,
            ctx: &StepContext,
            payload: &[u8],
            trees: &ServiceTrees<'_>,
        ) -> Result<StepOutcome, ResourceError> {
            let payload = std::str::from_utf8(payload).unwrap();
            if payload == "panic" {
                panic!("the step panicked on purpose");
            }
            bump(trees, format!("runs/{}/{}", ctx.saga, ctx.step))?;
            let kv = trees.tree(KV_TREE);
            match payload.strip_prefix("fail:") {
                Some(key) => {
                    kv.insert(key.as_bytes(), b"written by a failed action")?;
                    Ok(StepOutcome::Failed {
                        reason: format!("{key} refused"),
                    })
                }
                None => {
                    let (key, value) = payload.split_once('=').unwrap();
                    kv.insert(key.as_bytes(), value.as_bytes())?;
                    Ok(StepOutcome::Succeeded)
                }
            }
        }

        fn compensate(
            &self,
            ctx: &StepContext,
            payload: &[u8],
            trees: &ServiceTrees<'_>,
        ) -> Result<(), ResourceError> {
            bump(trees, format!("undos/{}/{}", ctx.saga, ctx.step))?;
            trees.tree(KV_TREE).remove(payload)?;
            Ok(())
        }
    }

    const INBOX_TREE: &str = "inbox";

    /// A callback handler that counts its calls per saga in `calls/<saga>` and fails when the
    /// saga's reason is "handler fails".
    struct Inbox;

    impl SagaCallbackHandler for Inbox {
        fn trees(&self) -> Vec<String> {
            vec![INBOX_TREE.to_string()]
        }

        fn on_finished(
            &self,
            saga: &TxnId,
            outcome: &SagaState,
            trees: &ServiceTrees<'_>,
        ) -> Result<(), ResourceError> {
            if outcome.reason == "handler fails" {
                return Err(ResourceError::Failed(
                    "the handler failed on purpose".into(),
                ));
            }
            let inbox = trees.tree(INBOX_TREE);
            let key = format!("calls/{saga}");
            let n = inbox.get(key.as_bytes())?.map_or(0, |v| v[0]);
            inbox.insert(key.as_bytes(), &[n + 1])?;
            Ok(())
        }
    }

    fn open(dir: &Path) -> Participant {
        Participant::builder(dir)
            .resource("", Kv)
            .saga_step("", KvStep)
            .saga_step("other", KvStep)
            .saga_callback("", Inbox)
            .open()
            .unwrap()
    }

    fn saga(n: u32) -> TxnId {
        TxnId::parse(&format!("1763850000000-saga{n}")).unwrap()
    }

    fn step(n: u32, step: u32) -> StepContext {
        StepContext {
            saga: saga(n),
            step,
            step_name: format!("s{step}"),
            resource: String::new(),
        }
    }

    fn kv_get(participant: &Participant, key: &str) -> Option<String> {
        let tree = participant.db().open_tree(KV_TREE).unwrap();
        tree.get(key)
            .unwrap()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn count(participant: &Participant, what: &str, ctx: &StepContext) -> u64 {
        let tree = participant.db().open_tree(KV_TREE).unwrap();
        tree.get(format!("{what}/{}/{}", ctx.saga, ctx.step))
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
    }

    fn calls(participant: &Participant, saga: &TxnId) -> u8 {
        let tree = participant.db().open_tree(INBOX_TREE).unwrap();
        tree.get(format!("calls/{saga}"))
            .unwrap()
            .map_or(0, |v| v[0])
    }

    fn finished(n: u32, phase: SagaPhase, reason: &str) -> SagaState {
        SagaState {
            id: saga(n),
            phase,
            terminal: phase.is_terminal(),
            failed_step: String::new(),
            reason: reason.into(),
            steps: vec![StepState {
                name: "s0".into(),
                phase: crate::saga_state::StepPhase::Succeeded,
                action_attempts: 1,
                compensation_attempts: 0,
                last_error: String::new(),
            }],
            stuck: false,
            callback_delivered: false,
            accepted_ms: 1_763_850_000_000,
            held: false,
        }
    }

    fn failed(reason: &str) -> StepOutcome {
        StepOutcome::Failed {
            reason: reason.into(),
        }
    }

    #[tokio::test]
    async fn a_repeated_action_takes_effect_once_and_answers_the_recorded_result() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(1, 0);
        for _ in 0..3 {
            assert_eq!(
                participant.act(&s, b"a=1").await.unwrap(),
                StepOutcome::Succeeded
            );
        }
        // A repeat with another payload still answers the record and changes nothing.
        assert_eq!(
            participant.act(&s, b"a=2").await.unwrap(),
            StepOutcome::Succeeded
        );
        assert_eq!(kv_get(&participant, "a").as_deref(), Some("1"));
        assert_eq!(count(&participant, "runs", &s), 1);
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::ActionSucceeded { resource, .. }) if resource.is_empty()
        ));
        // Another step of the same saga is another record.
        let next = step(1, 1);
        assert_eq!(participant.step_record(&s.saga, 1).unwrap(), None);
        participant.act(&next, b"b=2").await.unwrap();
        assert_eq!(count(&participant, "runs", &next), 1);
    }

    #[tokio::test]
    async fn a_business_failure_discards_the_actions_writes_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(2, 0);
        assert_eq!(
            participant.act(&s, b"fail:b").await.unwrap(),
            failed("b refused")
        );
        assert_eq!(kv_get(&participant, "b"), None, "the failed action's write");
        assert_eq!(count(&participant, "runs", &s), 0, "its count went too");
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::ActionFailed { reason, .. }) if reason == "b refused"
        ));
        // A repeat answers the recorded failure without running (even with a payload that
        // would now succeed).
        assert_eq!(
            participant.act(&s, b"b=1").await.unwrap(),
            failed("b refused")
        );
        assert_eq!(kv_get(&participant, "b"), None);
    }

    #[tokio::test]
    async fn a_long_failure_reason_is_cut_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let key = "k".repeat(3 * crate::saga::REASON_BYTES_MAX);
        let outcome = participant
            .act(&step(9, 0), format!("fail:{key}").as_bytes())
            .await
            .unwrap();
        match outcome {
            StepOutcome::Failed { reason } => {
                assert_eq!(reason.len(), crate::saga::REASON_BYTES_MAX)
            }
            StepOutcome::Succeeded => panic!("the action failed"),
        }
    }

    #[tokio::test]
    async fn a_compensation_before_its_action_is_recorded_and_the_late_action_is_refused_without_running(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(3, 0);
        participant.compensate(&s, b"a").await.unwrap();
        assert_eq!(count(&participant, "undos", &s), 0, "null compensation");
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::Compensated {
                action_applied: false,
                ..
            })
        ));
        assert_eq!(
            participant.act(&s, b"a=1").await.unwrap(),
            failed("compensated")
        );
        assert_eq!(kv_get(&participant, "a"), None);
        assert_eq!(count(&participant, "runs", &s), 0);
        // Repeats of either call change nothing.
        participant.compensate(&s, b"a").await.unwrap();
        assert_eq!(
            participant.act(&s, b"a=1").await.unwrap(),
            failed("compensated")
        );
        assert_eq!(count(&participant, "runs", &s), 0);
        assert_eq!(count(&participant, "undos", &s), 0);
    }

    #[tokio::test]
    async fn a_compensation_after_a_failed_action_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(4, 0);
        assert_eq!(
            participant.act(&s, b"fail:b").await.unwrap(),
            failed("b refused")
        );
        participant.compensate(&s, b"b").await.unwrap();
        assert_eq!(count(&participant, "undos", &s), 0);
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::Compensated {
                action_applied: false,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_compensation_after_a_succeeded_action_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(5, 0);
        participant.act(&s, b"a=1").await.unwrap();
        for _ in 0..3 {
            participant.compensate(&s, b"a").await.unwrap();
        }
        assert_eq!(kv_get(&participant, "a"), None, "undone");
        assert_eq!(count(&participant, "undos", &s), 1);
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::Compensated {
                action_applied: true,
                ..
            })
        ));
        // The coordinator re-sending the action late cannot redo it.
        assert_eq!(
            participant.act(&s, b"a=1").await.unwrap(),
            failed("compensated")
        );
        assert_eq!(kv_get(&participant, "a"), None);
        assert_eq!(count(&participant, "runs", &s), 1);
    }

    #[tokio::test]
    async fn a_compensation_at_another_step_handler_than_the_action_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(6, 0);
        participant.act(&s, b"a=1").await.unwrap();
        let elsewhere = StepContext {
            resource: "other".into(),
            ..s.clone()
        };
        let refused = participant.compensate(&elsewhere, b"a").await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        assert_eq!(kv_get(&participant, "a").as_deref(), Some("1"));
        assert!(matches!(
            participant.step_record(&s.saga, 0).unwrap(),
            Some(StepRecord::ActionSucceeded { .. })
        ));
    }

    #[tokio::test]
    async fn unknown_step_and_callback_names_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let unknown = StepContext {
            resource: "nope".into(),
            ..step(7, 0)
        };
        assert!(matches!(
            participant.act(&unknown, b"a=1").await,
            Err(Error::UnknownSagaStep(name)) if name == "nope"
        ));
        assert!(matches!(
            participant.compensate(&unknown, b"a").await,
            Err(Error::UnknownSagaStep(_))
        ));
        assert!(matches!(
            participant
                .saga_finished("nope", &finished(7, SagaPhase::Completed, ""))
                .await,
            Err(Error::UnknownSagaCallback(name)) if name == "nope"
        ));
        assert_eq!(participant.step_record(&unknown.saga, 0).unwrap(), None);
    }

    #[tokio::test]
    async fn a_panicking_action_records_nothing_and_may_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let s = step(8, 0);
        let panicked = participant.act(&s, b"panic").await;
        assert!(
            matches!(&panicked, Err(Error::Resource(m)) if m.contains("panicked on purpose")),
            "{panicked:?}"
        );
        assert_eq!(participant.step_record(&s.saga, 0).unwrap(), None);
        assert_eq!(
            participant.act(&s, b"a=1").await.unwrap(),
            StepOutcome::Succeeded
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_callback_handler_runs_once_across_repeated_deliveries_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let outcome = finished(1, SagaPhase::Compensated, "credit refused");
        assert_eq!(
            participant.saga_finished("", &outcome).await.unwrap(),
            CallbackDelivery::Handled
        );
        assert_eq!(
            participant.saga_finished("", &outcome).await.unwrap(),
            CallbackDelivery::AlreadyHandled
        );
        // Deliveries racing in one batch: the first handles, the others see its record.
        let release = hold_flusher(&participant);
        let other = finished(2, SagaPhase::Completed, "");
        let racing: Vec<_> = (0..3)
            .map(|_| {
                let (participant, other) = (participant.clone(), other.clone());
                tokio::spawn(async move { participant.saga_finished("", &other).await })
            })
            .collect();
        while participant.inner.batcher_queued() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(release);
        let mut deliveries = Vec::new();
        for delivery in racing {
            deliveries.push(delivery.await.unwrap().unwrap());
        }
        deliveries.sort_by_key(|d| *d == CallbackDelivery::AlreadyHandled);
        assert_eq!(
            deliveries,
            [
                CallbackDelivery::Handled,
                CallbackDelivery::AlreadyHandled,
                CallbackDelivery::AlreadyHandled
            ]
        );

        drop(participant);
        let participant = open(dir.path());
        assert_eq!(
            participant.saga_finished("", &outcome).await.unwrap(),
            CallbackDelivery::AlreadyHandled
        );
        assert_eq!(calls(&participant, &saga(1)), 1);
        assert_eq!(calls(&participant, &saga(2)), 1);
        assert_eq!(
            participant
                .saga_callback_record(&saga(1), "")
                .unwrap()
                .map(|r| r.phase),
            Some(SagaPhase::Compensated)
        );
    }

    #[tokio::test]
    async fn a_failing_callback_handler_records_nothing_and_runs_on_the_next_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let failing = finished(3, SagaPhase::Aborted, "handler fails");
        assert!(matches!(
            participant.saga_finished("", &failing).await,
            Err(Error::Resource(_))
        ));
        assert_eq!(
            participant.saga_callback_record(&saga(3), "").unwrap(),
            None
        );
        let fixed = finished(3, SagaPhase::Aborted, "operator");
        assert_eq!(
            participant.saga_finished("", &fixed).await.unwrap(),
            CallbackDelivery::Handled
        );
        assert_eq!(calls(&participant, &saga(3)), 1);
    }

    #[tokio::test]
    async fn a_callback_with_an_unfinished_saga_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let running = finished(4, SagaPhase::Running, "");
        assert!(matches!(
            participant.saga_finished("", &running).await,
            Err(Error::InvalidArgument(m)) if m.contains("not finished")
        ));
        assert_eq!(calls(&participant, &saga(4)), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_queued_under_a_hold_wait_for_it_and_then_commit_in_one_flush() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        let flushes = |p: &Participant| {
            p.inner
                .flusher
                .stats()
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = flushes(&participant);
        let hold = participant.hold_batch();
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let p = participant.clone();
                tokio::spawn(async move { p.act(&step(30, i), b"k=1").await })
            })
            .collect();
        while participant.inner.batcher_queued() < calls.len() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // The flusher is idle, but nothing queued under the hold is taken.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(flushes(&participant), before, "a held call was flushed");
        assert!(
            calls.iter().all(|c| !c.is_finished()),
            "a held call was answered"
        );
        drop(hold);
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), StepOutcome::Succeeded);
        }
        assert_eq!(
            flushes(&participant),
            before + 1,
            "the three held calls share one transaction and one flush"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_mixes_two_phase_and_saga_calls_and_every_answer_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let participant = open(dir.path());
        // Set-up outside the batch: step (20, 0) acted, so that the batch compensates it.
        participant.act(&step(20, 0), b"x=0").await.unwrap();
        let flushes_before = participant
            .inner
            .flusher
            .stats()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);

        #[derive(Debug)]
        enum Answer {
            Vote(Result<Vote, Error>),
            Act(Result<StepOutcome, Error>),
            Done(Result<(), Error>),
            Callback(Result<CallbackDelivery, Error>),
        }
        let release = hold_flusher(&participant);
        let mut calls_made: Vec<tokio::task::JoinHandle<Answer>> = Vec::new();
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Vote(p.prepare(&branch_ctx(0), b"a=1", "http://c:1").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Vote(p.prepare(&branch_ctx(1), b"no:b", "http://c:1").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Act(p.act(&step(10, 0), b"c=3").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Act(p.act(&step(10, 1), b"fail:d").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Act(p.act(&step(10, 2), b"panic").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Done(p.compensate(&step(11, 0), b"e").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Done(p.compensate(&step(20, 0), b"x").await)
        }));
        let p = participant.clone();
        calls_made.push(tokio::spawn(async move {
            Answer::Callback(
                p.saga_finished("", &finished(10, SagaPhase::Compensated, "d refused"))
                    .await,
            )
        }));
        let queued = calls_made.len();
        while participant.inner.batcher_queued() < queued {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(release);
        let mut answers = Vec::new();
        for call in calls_made {
            answers.push(call.await.unwrap());
        }
        assert!(
            matches!(&answers[0], Answer::Vote(Ok(Vote::Yes))),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[1], Answer::Vote(Ok(Vote::No { reason })) if reason == "b refused"),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[2], Answer::Act(Ok(StepOutcome::Succeeded))),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[3], Answer::Act(Ok(StepOutcome::Failed { reason })) if reason == "d refused"),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[4], Answer::Act(Err(Error::Resource(_)))),
            "{answers:?}"
        );
        assert!(matches!(&answers[5], Answer::Done(Ok(()))), "{answers:?}");
        assert!(matches!(&answers[6], Answer::Done(Ok(()))), "{answers:?}");
        assert!(
            matches!(&answers[7], Answer::Callback(Ok(CallbackDelivery::Handled))),
            "{answers:?}"
        );
        let flushes = participant
            .inner
            .flusher
            .stats()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            flushes - flushes_before,
            1,
            "one flush covers the held job and the whole batch"
        );

        // What was answered is what a reopened participant finds.
        drop(participant);
        let participant = open(dir.path());
        let mut expected_keys = vec![
            "c".to_string(),
            format!("pending/{}", branch_ctx(0).txn),
            format!("runs/{}/0", saga(10)),
            format!("runs/{}/0", saga(20)),
            format!("undos/{}/0", saga(20)),
        ];
        expected_keys.sort();
        assert_eq!(
            kv_keys(&participant),
            expected_keys,
            "the YES vote's pending entry and the succeeded action stay; the NO vote, the \
             failed and the panicking action left nothing; x was compensated"
        );
        assert!(matches!(
            participant.branch_record(&branch_ctx(1).txn, tandem_common::BranchIdx(0)),
            Ok(Some(crate::barrier::BranchRecord::VotedNo { .. }))
        ));
        assert!(matches!(
            participant.step_record(&saga(10), 0).unwrap(),
            Some(StepRecord::ActionSucceeded { .. })
        ));
        assert!(matches!(
            participant.step_record(&saga(10), 1).unwrap(),
            Some(StepRecord::ActionFailed { reason, .. }) if reason == "d refused"
        ));
        assert_eq!(participant.step_record(&saga(10), 2).unwrap(), None);
        assert!(matches!(
            participant.step_record(&saga(11), 0).unwrap(),
            Some(StepRecord::Compensated {
                action_applied: false,
                ..
            })
        ));
        assert!(matches!(
            participant.step_record(&saga(20), 0).unwrap(),
            Some(StepRecord::Compensated {
                action_applied: true,
                ..
            })
        ));
        assert!(participant
            .saga_callback_record(&saga(10), "")
            .unwrap()
            .is_some());
        // And the barrier still answers from those records after the reopen.
        assert_eq!(
            participant.act(&step(10, 1), b"d=1").await.unwrap(),
            failed("d refused")
        );
        assert_eq!(
            participant.act(&step(11, 0), b"e=1").await.unwrap(),
            failed("compensated")
        );
        assert_eq!(
            participant
                .saga_finished("", &finished(10, SagaPhase::Compensated, "d refused"))
                .await
                .unwrap(),
            CallbackDelivery::AlreadyHandled
        );
    }

    #[test]
    fn saga_registrations_reject_reserved_trees_and_duplicate_names() {
        struct Reserved;
        impl SagaCallbackHandler for Reserved {
            fn trees(&self) -> Vec<String> {
                vec!["tandem.mine".into()]
            }
            fn on_finished(
                &self,
                _: &TxnId,
                _: &SagaState,
                _: &ServiceTrees<'_>,
            ) -> Result<(), ResourceError> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let twice = Participant::builder(dir.path())
            .saga_step("s", KvStep)
            .saga_step("s", KvStep)
            .open();
        assert!(
            matches!(&twice, Err(Error::InvalidArgument(m)) if m.contains("saga step \"s\" is registered twice")),
            "{:?}",
            twice.err()
        );
        let reserved = Participant::builder(dir.path())
            .saga_callback("", Reserved)
            .open();
        assert!(
            matches!(&reserved, Err(Error::InvalidArgument(m)) if m.contains("reserved")),
            "{:?}",
            reserved.err()
        );
        // A resource, a saga step and a callback may share a name and a tree.
        Participant::builder(dir.path())
            .resource("x", Kv)
            .saga_step("x", KvStep)
            .saga_callback("x", Inbox)
            .open()
            .unwrap();
    }
}
