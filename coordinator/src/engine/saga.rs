//! Sagas: long-lived transactions made of steps that are undone by compensations, as a pure,
//! synchronous, deterministic state machine (Garcia-Molina & Salem, "Sagas", SIGMOD 1987).
//!
//! A saga is a sequence T1..Tn of steps, each a local transaction at one participant, with a
//! compensation C1..Cn that semantically undoes it. The system guarantees that either every
//! step runs, or T1..Tj run and then Cj..C1: every step that was attempted is compensated,
//! newest first. Nothing is isolated: other transactions see the intermediate states; the
//! compensations restore consistency, not the past. Here the steps form a dependency graph (a
//! step lists the steps it waits for in [`StepSpec::after`]); independent steps run
//! concurrently (the paper's "parallel sagas"). A sequence is the graph in which each step
//! waits for the one before it: the edge builds it, the engine knows only graphs.
//!
//! [`SagaEngine::step`] takes a [`SagaEvent`] and the time and returns the [`SagaEffect`]s the
//! runtime must carry out. No tokio, sled, tonic or clock here: time is an argument, and the
//! jitter of every retry comes from a [`SplitMix64`] seeded by the caller, so a run is
//! replayable from its inputs.
//!
//! # Phases
//!
//! 1. **Accepting.** `Submit` emits only the forced [`SagaEffect::PersistSpec`]. Nothing is
//!    sent and nobody is answered until the runtime feeds [`SagaEvent::Accepted`] (the write is
//!    durable): from then on the saga will terminate, whatever crashes.
//! 2. **Running.** Every step whose `after` list is empty starts: its action is sent (attempt
//!    1). When a step succeeds, every step whose `after` steps have all succeeded starts. A
//!    business failure ([`ActionAnswer::Failed`]) decides compensation;
//!    a transport failure ([`ActionAnswer::Unavailable`]) is retried (below). When every step
//!    has succeeded the outcome is [`SagaOutcome::Completed`].
//! 3. **Compensating.** Once decided, no new action starts and answers to actions still in
//!    flight are ignored. The compensations run one at a time, newest first (below), retried
//!    without limit. When the last one succeeds the outcome is
//!    [`SagaOutcome::Compensated`] (or [`SagaOutcome::Aborted`] if an operator asked for it).
//! 4. **Terminal.** Waiters are told the outcome ([`SagaEffect::Terminal`]); if the saga names
//!    a callback, the outcome goes there, retried with backoff until acknowledged. Then
//!    [`SagaEffect::Finished`]: the engine forgets the saga.
//!
//! # What is forced, and what is lazy
//!
//! Two writes per saga are forced, each before anything that depends on it leaves the engine:
//! the spec (before the submitter is answered: the saga's promise to terminate), and the
//! *outcome*, written as [`SagaEffect::PersistOutcome`] the moment it is decided — before the
//! first compensation is sent, or before anyone hears `Completed`. Every other change is a
//! lazy [`SagaEffect::PersistProgress`], including the end of compensation (the outcome was
//! forced when compensation was decided, and re-sent compensations are answered by the
//! barrier). The forced outcome is what keeps an outcome from changing after a crash: a lazy
//! record may be lost, and a saga resumed from an older one would otherwise decide again on
//! other facts — after an operator abort, after retries ran out (the participant may answer
//! this time, and a `Completed` already announced would turn into `Compensated`), or after two
//! concurrent steps failed (the other one may be seen first). Until the runtime feeds
//! [`SagaEvent::OutcomeDurable`] the outcome stays hidden (status, watchers, waiters, callback)
//! and the saga waits. Both forced writes share their flush with every other write of the same
//! group commit.
//!
//! # Retries
//!
//! An action that gets no definite answer is retried after [`Backoff::delay`]`(attempt - 1)`
//! (capped exponential, jittered into [half, full]), until [`RetryPolicy::attempts_max`]
//! attempts were sent or, after [`RetryPolicy::deadline_ms`] counted from the step's first
//! send, no new attempt starts. Then the step counts as failed ("retries exhausted", with the
//! last error) and the saga compensates. A compensation is retried without limit with
//! [`SagaEngineConfig::compensation_backoff`]; after
//! [`SagaEngineConfig::stuck_after_failures`] failures in a row the saga is flagged stuck
//! (once, with the last error in its status) and keeps being retried; a success clears the
//! flag. The callback is retried without limit with [`SagaEngineConfig::callback_backoff`].
//! Every send carries an attempt number, and an answer or a timer counts only for the current
//! attempt: duplicates and stragglers are ignored, so the network cannot change an outcome.
//! An operator can fire every armed retry timer at once ([`SagaEvent::OperatorRetry`]): the same
//! checks apply, and the timer of the attempt sent early is stale.
//!
//! # Compensation order
//!
//! Every step whose action was attempted (sent at least once) is compensated, including the
//! step that failed and steps whose answer never came: the participant's barrier records the
//! compensation of an action that never took effect as a no-op, and refuses that action if it
//! arrives afterwards. The queue is fixed when compensation is decided: first the attempted
//! steps that did not succeed, most recently first sent first; then the steps that succeeded,
//! in reverse order of completion — so each step is compensated after every step that
//! completed later, which is also reverse dependency order. Steps never attempted are
//! `Skipped`.
//!
//! # Holding execution
//!
//! While the engine holds execution ([`SagaEngine::set_hold`], an operator's lever: keep
//! accepting while a participant is under maintenance, or measure acceptance alone), a saga
//! that becomes accepted answers its submitter and notifies ACCEPTED like any other, but
//! starts no step: it waits in `Running` with every step `Pending` and `held` in its status
//! until the runtime feeds [`SagaEvent::Release`]. Sagas already running go on. A held saga
//! writes no progress (it has none beyond what recovery rebuilds from the spec alone), and an
//! operator abort ends it `Aborted` with nothing to compensate. Holding is not stored: a
//! recovered saga that had not started waits only if the engine holds at recovery.
//!
//! # Recovery
//!
//! At start-up the runtime feeds [`SagaEvent::Recovered`] with the spec and the last progress
//! record it found. Without one (the crash came after the forced spec), the saga starts as if
//! just accepted. With one, it resumes: every step `Running` is sent again under a new
//! attempt number (the barrier answers with the recorded result if it already ran), the
//! compensation in progress is sent again, a terminal saga whose callback was not acknowledged
//! sends it again, and a finished saga produces nothing. Progress records are lazy, so the one
//! found may be older than what happened: steps it shows `Pending` may have been attempted by
//! an earlier incarnation. A saga once recovered therefore compensates its `Pending` steps too
//! (null compensations at worst, and they block an action that might still arrive), first,
//! in reverse dependency order.
//!
//! # Known limitations
//!
//! - An action's call is bounded by the runtime ([`SagaEffect::SendAction::timeout_ms`]); the
//!   engine sets no timer of its own and relies on every send being answered exactly once.
//! - Limits count per incarnation as far as the lazy record carried them: a crash may lose a
//!   few attempts from the count, and the re-send at recovery is made even past the deadline
//!   (it asks what became of the attempt in flight).
//! - Compensations run one at a time, also for independent branches of a graph.
//! - Watchers see the changes of one incarnation; after a restart `seq` continues from the
//!   last record found, which may skip or repeat numbers a watcher saw before the crash. The
//!   engine keeps the last [`SAGA_CHANGES_KEPT_MAX`] changes per saga.
//! - A saga that has been recovered compensates all its `Pending` steps (it cannot tell those
//!   never attempted), so `Skipped` appears only for sagas that never restarted.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};
use tandem_common::{Backoff, SplitMix64, TxnId};

use super::types::BranchTarget;
use crate::log::record::Fingerprint;

/// A step's position in [`SagaSpec::steps`] (0-based). Together with the saga's [`TxnId`] it
/// names one step everywhere: in messages, in the log and in the participant's barrier.
pub type StepIdx = u32;

/// How many changes the engine keeps per saga for [`SagaEngine::changes_so_far`].
pub const SAGA_CHANGES_KEPT_MAX: usize = 256;
/// Longest error kept in a step's `last_error`, in bytes (longer ones are cut).
pub const STEP_ERROR_BYTES_MAX: usize = 512;
/// Longest reason kept in an outcome, in bytes (longer ones are cut).
pub const OUTCOME_REASON_BYTES_MAX: usize = 1024;
/// Default of [`SagaEngineConfig::stuck_after_failures`].
pub const STUCK_AFTER_FAILURES_DEFAULT: u32 = 5;
/// Default of [`RetryPolicy::attempts_max`].
pub const ACTION_ATTEMPTS_MAX_DEFAULT: u32 = 10;
/// Default of [`RetryPolicy::deadline_ms`].
pub const ACTION_DEADLINE_MS_DEFAULT: u64 = 60_000;

// ----------------------------------------------------------------------------------------
// The spec: what a client submits (validated at the edge)
// ----------------------------------------------------------------------------------------

/// How an action that got no definite answer is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay before retry `k` (0 is the first retry), jittered.
    pub backoff: Backoff,
    /// Attempts sent at most, the first included; 0 = no limit by count.
    pub attempts_max: u32,
    /// ms after the step's first send after which no new attempt starts; 0 = none.
    pub deadline_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::default(),
            attempts_max: ACTION_ATTEMPTS_MAX_DEFAULT,
            deadline_ms: ACTION_DEADLINE_MS_DEFAULT,
        }
    }
}

/// One step of a saga: an action at a participant and the compensation that undoes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unique within the saga; named in outcomes and status.
    pub name: String,
    pub target: BranchTarget,
    /// Handed to the participant's action.
    pub action: Vec<u8>,
    /// Handed to the participant's compensation.
    pub compensation: Vec<u8>,
    /// Steps that must succeed before this one starts (validated acyclic and in range at the
    /// edge; the engine asserts it). Empty: starts as soon as the saga is accepted.
    pub after: Vec<StepIdx>,
    pub retry: RetryPolicy,
    /// Bound of one action call, ms (enforced by the runtime).
    pub timeout_ms: u64,
}

/// A saga as submitted. A sequence is expressed by the edge as `after = [i - 1]` for each step
/// `i`; the engine only knows graphs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSpec {
    pub steps: Vec<StepSpec>,
    /// Where the completion callback goes, if any. `None`: no callback.
    pub callback: Option<BranchTarget>,
}

impl SagaSpec {
    /// Checks what the engine relies on: at least one step, unique names, dependencies in
    /// range, no step waiting for itself or twice for the same step, no cycle. The edge turns
    /// an error into `INVALID_ARGUMENT`; the engine asserts it.
    pub fn validate_graph(&self) -> Result<(), String> {
        let n = self.steps.len();
        if n == 0 {
            return Err("a saga needs at least one step".to_string());
        }
        if n > u32::MAX as usize {
            return Err(format!("{n} steps are more than a step index can name"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !names.insert(step.name.as_str()) {
                return Err(format!("step #{i}: the name {:?} is used twice", step.name));
            }
            let mut seen = std::collections::BTreeSet::new();
            for &dep in &step.after {
                if dep as usize >= n {
                    return Err(format!(
                        "step {:?} waits for step #{dep}, but the saga has {n} steps",
                        step.name
                    ));
                }
                if dep as usize == i {
                    return Err(format!("step {:?} waits for itself", step.name));
                }
                if !seen.insert(dep) {
                    return Err(format!(
                        "step {:?} waits for step {:?} twice",
                        step.name, self.steps[dep as usize].name
                    ));
                }
            }
        }
        if topological_order(self).len() != n {
            return Err("the steps' dependencies form a cycle".to_string());
        }
        Ok(())
    }
}

/// The steps in dependency order (Kahn's algorithm, lowest index first among the ready ones,
/// so deterministic). Shorter than the spec if the graph has a cycle.
fn topological_order(spec: &SagaSpec) -> Vec<StepIdx> {
    let n = spec.steps.len();
    let mut waiting: Vec<usize> = spec.steps.iter().map(|s| s.after.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, step) in spec.steps.iter().enumerate() {
        for &dep in &step.after {
            if let Some(d) = dependents.get_mut(dep as usize) {
                d.push(i);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i as StepIdx);
        for &d in &dependents[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.insert(d);
            }
        }
    }
    order
}

// ----------------------------------------------------------------------------------------
// States, outcomes, status
// ----------------------------------------------------------------------------------------

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepPhase {
    /// Not started: some step it waits for has not succeeded yet.
    Pending,
    /// Its action was sent and has no definite answer yet (in flight, or waiting to retry).
    Running,
    Succeeded,
    /// Its action failed (for a business reason, or retries ran out); to be compensated.
    Failed,
    /// Its compensation was sent and has not succeeded yet.
    Compensating,
    Compensated,
    /// Never attempted, and the saga compensated: nothing to undo.
    Skipped,
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SagaPhase {
    /// Submitted; its spec is being forced. Never stored: a saga in the log is accepted.
    Accepting,
    Running,
    /// Decided to compensate (the outcome is reported once durable); compensations running.
    Compensating,
    /// Every step succeeded (the outcome is reported once durable).
    Completed,
    Compensated,
    Aborted,
}

impl SagaPhase {
    /// Completed, Compensated or Aborted.
    pub fn is_terminal(self) -> bool {
        match self {
            SagaPhase::Completed | SagaPhase::Compensated | SagaPhase::Aborted => true,
            SagaPhase::Accepting | SagaPhase::Running | SagaPhase::Compensating => false,
        }
    }
}

/// How a saga ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SagaOutcome {
    /// Every step succeeded.
    Completed,
    /// `failed_step` failed (business failure, or retries exhausted: `reason` says which);
    /// every attempted step was compensated.
    Compensated { failed_step: String, reason: String },
    /// An operator aborted the saga; every attempted step was compensated.
    Aborted { reason: String },
}

impl fmt::Display for SagaOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SagaOutcome::Completed => f.write_str("completed"),
            SagaOutcome::Compensated {
                failed_step,
                reason,
            } => write!(f, "compensated: step {failed_step} failed: {reason}"),
            SagaOutcome::Aborted { reason } => write!(f, "aborted by an operator: {reason}"),
        }
    }
}

/// A snapshot of one step for status queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepStatus {
    pub phase: StepPhase,
    /// Action calls sent so far.
    pub action_attempts: u32,
    /// Compensation calls sent so far.
    pub compensation_attempts: u32,
    /// The last error this step saw (action or compensation), even if a later attempt
    /// succeeded. `None`: none yet.
    pub last_error: Option<String>,
}

/// A snapshot of one saga for status queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaStatus {
    pub phase: SagaPhase,
    /// The outcome, once it is durable (never before).
    pub outcome: Option<SagaOutcome>,
    pub steps: Vec<StepStatus>,
    /// The compensation in progress has failed `stuck_after_failures` times in a row.
    pub stuck: bool,
    pub callback_delivered: bool,
    /// When the saga was submitted, ms since the epoch.
    pub accepted_ms: u64,
    /// Accepted while execution was held: no step starts until it is released.
    pub held: bool,
}

/// What is stored about one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    pub phase: StepPhase,
    pub action_attempts: u32,
    pub compensation_attempts: u32,
    /// Failures in a row of the compensation in progress (0 once it succeeded).
    pub compensation_failures: u32,
    pub last_error: Option<String>,
    /// When the action was first sent (the retry deadline counts from it). `None`: never.
    pub first_sent_ms: Option<u64>,
}

impl StepProgress {
    fn new() -> Self {
        StepProgress {
            phase: StepPhase::Pending,
            action_attempts: 0,
            compensation_attempts: 0,
            compensation_failures: 0,
            last_error: None,
            first_sent_ms: None,
        }
    }
}

/// Everything needed to resume a saga besides its spec; written after every change (lazily,
/// except [`SagaEffect::PersistOutcome`]). Small: no payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaProgress {
    /// `seq` of the last change emitted (0: none); the next change gets `seq + 1`.
    pub seq: u64,
    /// Never `Accepting` in a stored record.
    pub phase: SagaPhase,
    /// Set when decided (with `phase` Compensating or Completed) and never changed after.
    pub outcome: Option<SagaOutcome>,
    /// One per step of the spec, same order.
    pub steps: Vec<StepProgress>,
    /// Steps in the order their actions were first sent.
    pub started_order: Vec<StepIdx>,
    /// Steps in the order they succeeded.
    pub succeeded_order: Vec<StepIdx>,
    /// Compensations still to run, in order; the first is the one in progress.
    pub compensation_queue: Vec<StepIdx>,
    pub stuck: bool,
    /// The saga was resumed from the log at least once: a `Pending` step may have been
    /// attempted by an earlier incarnation.
    pub recovered: bool,
    /// Callback calls sent so far.
    pub callback_attempts: u32,
    pub callback_delivered: bool,
}

impl SagaProgress {
    fn new(steps: usize) -> Self {
        SagaProgress {
            seq: 0,
            phase: SagaPhase::Accepting,
            outcome: None,
            steps: vec![StepProgress::new(); steps],
            started_order: Vec::new(),
            succeeded_order: Vec::new(),
            compensation_queue: Vec::new(),
            stuck: false,
            recovered: false,
            callback_attempts: 0,
            callback_delivered: false,
        }
    }

    /// The status this record describes, outcome included (a stored record's outcome is
    /// durable). The runtime uses it for sagas the engine has dropped.
    pub fn status(&self, accepted_ms: u64) -> SagaStatus {
        SagaStatus {
            phase: self.phase,
            outcome: self.outcome.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| StepStatus {
                    phase: s.phase,
                    action_attempts: s.action_attempts,
                    compensation_attempts: s.compensation_attempts,
                    last_error: s.last_error.clone(),
                })
                .collect(),
            stuck: self.stuck,
            callback_delivered: self.callback_delivered,
            accepted_ms,
            held: false,
        }
    }

    /// Nothing is left to do: terminal and the callback delivered (or none).
    pub fn is_finished(&self, spec: &SagaSpec) -> bool {
        self.phase.is_terminal() && (spec.callback.is_none() || self.callback_delivered)
    }
}

// ----------------------------------------------------------------------------------------
// Events, effects, changes
// ----------------------------------------------------------------------------------------

/// A participant's answer to an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionAnswer {
    Succeeded,
    /// Business failure: the saga compensates.
    Failed {
        reason: String,
    },
    /// Transport error, timeout, `Unavailable`: retried.
    Unavailable {
        error: String,
    },
}

/// The timers a saga sets. Each names the attempt it would start; a timer for any other
/// attempt is stale and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SagaTimer {
    RetryAction { step: StepIdx, attempt: u32 },
    RetryCompensation { step: StepIdx, attempt: u32 },
    RetryCallback { attempt: u32 },
}

/// Something that happened, fed into the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaEvent {
    /// A client submitted a saga. The runtime has checked that the id is new and the spec
    /// valid ([`SagaSpec::validate_graph`] and its limits).
    Submit {
        saga: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
    },
    /// The forced [`SagaEffect::PersistSpec`] write completed.
    Accepted { saga: TxnId },
    /// The forced [`SagaEffect::PersistOutcome`] write completed.
    OutcomeDurable { saga: TxnId },
    /// The answer to [`SagaEffect::SendAction`] with this attempt.
    ActionAnswered {
        saga: TxnId,
        step: StepIdx,
        attempt: u32,
        answer: ActionAnswer,
    },
    /// The answer to [`SagaEffect::SendCompensation`] with this attempt (`Err`: it failed, or
    /// no answer came; retried).
    CompensationAnswered {
        saga: TxnId,
        step: StepIdx,
        attempt: u32,
        answer: Result<(), String>,
    },
    /// The answer to [`SagaEffect::SendCallback`] with this attempt.
    CallbackAnswered {
        saga: TxnId,
        attempt: u32,
        answer: Result<(), String>,
    },
    /// A timer the engine set has fired.
    TimerFired { saga: TxnId, timer: SagaTimer },
    /// Start a held saga (see "Holding execution" above). Does nothing (no effects) to a saga
    /// that is not held.
    Release { saga: TxnId },
    /// An operator sends a running saga into compensation; its outcome will be `Aborted`.
    /// Does nothing (no effects) to a saga that is not `Running`.
    OperatorAbort { saga: TxnId, reason: String },
    /// An operator asks for everything of this saga that waits for a retry timer (an action,
    /// the compensation in progress, the callback) to be sent now, as if its timer had fired:
    /// the same checks apply (an action past its retry deadline fails instead), and the armed
    /// timer becomes stale. Does nothing to calls in flight.
    OperatorRetry { saga: TxnId },
    /// Recovery found this saga's spec (and progress, if any) in the log at start-up.
    Recovered {
        saga: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
        accepted_ms: u64,
        progress: Option<SagaProgress>,
    },
}

impl SagaEvent {
    pub fn saga(&self) -> &TxnId {
        match self {
            SagaEvent::Submit { saga, .. }
            | SagaEvent::Accepted { saga }
            | SagaEvent::OutcomeDurable { saga }
            | SagaEvent::ActionAnswered { saga, .. }
            | SagaEvent::CompensationAnswered { saga, .. }
            | SagaEvent::CallbackAnswered { saga, .. }
            | SagaEvent::TimerFired { saga, .. }
            | SagaEvent::OperatorAbort { saga, .. }
            | SagaEvent::OperatorRetry { saga }
            | SagaEvent::Release { saga }
            | SagaEvent::Recovered { saga, .. } => saga,
        }
    }
}

/// Something the runtime must do, in the order given. Writes to one saga's record must be
/// applied in the order they are emitted.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaEffect {
    /// FORCED: write the saga's spec; feed [`SagaEvent::Accepted`] once it is durable.
    PersistSpec {
        saga: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
        accepted_ms: u64,
    },
    /// FORCED: write (replace) the saga's progress, which now holds its outcome; feed
    /// [`SagaEvent::OutcomeDurable`] once it is durable. Nothing reveals the outcome before.
    PersistOutcome { saga: TxnId, progress: SagaProgress },
    /// Lazy: write (replace) the saga's progress; losing it in a crash is safe.
    PersistProgress { saga: TxnId, progress: SagaProgress },
    /// Call the step's action; answer with `ActionAnswered` (a timeout is `Unavailable`).
    SendAction {
        saga: TxnId,
        step: StepIdx,
        attempt: u32,
        target: BranchTarget,
        payload: Vec<u8>,
        /// Bound of this call.
        timeout_ms: u64,
    },
    /// Call the step's compensation; answer with `CompensationAnswered`.
    SendCompensation {
        saga: TxnId,
        step: StepIdx,
        attempt: u32,
        target: BranchTarget,
        payload: Vec<u8>,
    },
    /// Deliver the outcome to the saga's callback; answer with `CallbackAnswered`.
    SendCallback {
        saga: TxnId,
        attempt: u32,
        target: BranchTarget,
        outcome: SagaOutcome,
    },
    /// Feed `TimerFired { saga, timer }` back at `at_ms` (a stale timer is ignored).
    SetTimer {
        saga: TxnId,
        timer: SagaTimer,
        at_ms: u64,
    },
    /// Answer the submitter: the spec is durable. Also emitted at recovery of a saga with no
    /// progress (nobody waits then; the runtime ignores it).
    ReplyAccepted { saga: TxnId },
    /// A state change, in order, for watchers.
    Notify { saga: TxnId, change: SagaChange },
    /// The outcome, durable: waiters get it. Once per saga and incarnation. `status` is the
    /// saga's state at that moment, so that nobody reads it back from the log when the engine
    /// drops the saga in the same step.
    Terminal {
        saga: TxnId,
        outcome: SagaOutcome,
        status: SagaStatus,
    },
    /// Nothing left to do (callback delivered, or none); the engine dropped the saga.
    Finished { saga: TxnId },
}

impl SagaEffect {
    pub fn saga(&self) -> &TxnId {
        match self {
            SagaEffect::PersistSpec { saga, .. }
            | SagaEffect::PersistOutcome { saga, .. }
            | SagaEffect::PersistProgress { saga, .. }
            | SagaEffect::SendAction { saga, .. }
            | SagaEffect::SendCompensation { saga, .. }
            | SagaEffect::SendCallback { saga, .. }
            | SagaEffect::SetTimer { saga, .. }
            | SagaEffect::ReplyAccepted { saga }
            | SagaEffect::Notify { saga, .. }
            | SagaEffect::Terminal { saga, .. }
            | SagaEffect::Finished { saga } => saga,
        }
    }
}

/// What kind of change a [`SagaChange`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// The spec is durable; the saga will terminate.
    Accepted,
    /// An action was sent (attempt 1, a retry, or a re-send after a restart).
    StepStarted,
    StepSucceeded,
    /// A business failure, or retries exhausted (`detail` says which).
    StepFailed,
    /// An attempt got no definite answer; `detail` has the error and when the next one goes.
    StepRetried,
    /// With no step: the saga began compensating (`detail` says why). With a step: its
    /// compensation was sent.
    CompensationStarted,
    StepCompensated,
    /// A compensation failed; `detail` has the error and when the next attempt goes.
    CompensationRetried,
    /// The compensation in progress failed `stuck_after_failures` times in a row.
    Stuck,
    /// The saga reached its outcome (durable); `outcome` holds it.
    Finished,
}

/// One state change of a saga, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaChange {
    /// 1, 2, 3, ... per saga, continued across restarts from the last record found.
    pub seq: u64,
    pub at_ms: u64,
    pub kind: ChangeKind,
    /// The step concerned; `None` for saga-level changes.
    pub step: Option<StepIdx>,
    /// The attempt concerned; 0 when none.
    pub attempt: u32,
    /// Human-readable detail; may be empty.
    pub detail: String,
    /// The outcome, on [`ChangeKind::Finished`] only.
    pub outcome: Option<SagaOutcome>,
}

/// Tunables of the saga engine (the runtime's configuration hands them in).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaEngineConfig {
    /// Backoff between attempts of a failing compensation (retried without limit).
    pub compensation_backoff: Backoff,
    /// Failures in a row of one compensation after which the saga is flagged stuck; 0 = never.
    pub stuck_after_failures: u32,
    /// Backoff between deliveries of the outcome to a callback that did not acknowledge.
    pub callback_backoff: Backoff,
}

impl Default for SagaEngineConfig {
    fn default() -> Self {
        SagaEngineConfig {
            compensation_backoff: Backoff::default(),
            stuck_after_failures: STUCK_AFTER_FAILURES_DEFAULT,
            callback_backoff: Backoff::default(),
        }
    }
}

// ----------------------------------------------------------------------------------------
// The engine
// ----------------------------------------------------------------------------------------

/// All sagas in flight, and the rules that move them.
pub struct SagaEngine {
    sagas: BTreeMap<TxnId, Saga>,
    rng: SplitMix64,
    config: SagaEngineConfig,
    /// Sagas accepted from now on are held (see "Holding execution").
    hold: bool,
}

impl SagaEngine {
    pub fn new(config: SagaEngineConfig, seed: u64) -> Self {
        SagaEngine {
            sagas: BTreeMap::new(),
            rng: SplitMix64::new(seed),
            config,
            hold: false,
        }
    }

    /// Holds (or stops holding) the execution of sagas accepted from now on (see "Holding
    /// execution"). Sagas already held stay held until each is released.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Whether sagas accepted now are held.
    pub fn holds(&self) -> bool {
        self.hold
    }

    /// Whether a saga in flight is held (accepted, waiting for [`SagaEvent::Release`]).
    pub fn is_held(&self, saga: &TxnId) -> bool {
        self.sagas.get(saga).is_some_and(|m| m.held)
    }

    /// Applies one event at time `now_ms` and returns what the runtime must do, in order.
    pub fn step(&mut self, now_ms: u64, event: SagaEvent) -> Vec<SagaEffect> {
        let id = event.saga().clone();
        let mut cx = Cx {
            now_ms,
            rng: &mut self.rng,
            config: &self.config,
            hold: self.hold,
            effects: Vec::new(),
            changed: false,
            finished: false,
        };
        match event {
            SagaEvent::Submit {
                saga,
                spec,
                fingerprint,
            } => {
                assert!(
                    !self.sagas.contains_key(&saga),
                    "Submit for saga {saga}, which is in flight: the runtime must route retries"
                );
                let machine = Saga::submit(saga.clone(), spec, fingerprint, &mut cx);
                self.sagas.insert(saga, machine);
            }
            SagaEvent::Recovered {
                saga,
                spec,
                fingerprint,
                accepted_ms,
                progress,
            } => {
                assert!(
                    !self.sagas.contains_key(&saga),
                    "saga {saga} recovered twice"
                );
                if let Some(machine) = Saga::recover(
                    saga.clone(),
                    spec,
                    fingerprint,
                    accepted_ms,
                    progress,
                    &mut cx,
                ) {
                    self.sagas.insert(saga, machine);
                }
            }
            other => match self.sagas.get_mut(&id) {
                Some(machine) => machine.step(other, &mut cx),
                None => {
                    // A late answer or timer of a saga already finished (or never known):
                    // every call is idempotent at the participant, so ignoring it is safe.
                    tracing::debug!(saga = %id, event = ?other, "event for a saga not in flight; ignored");
                }
            },
        }
        let Cx {
            mut effects,
            changed,
            finished,
            ..
        } = cx;
        if let Some(machine) = self.sagas.get_mut(&id) {
            if changed {
                assert!(
                    machine.progress.phase != SagaPhase::Accepting,
                    "{id}: progress written before the saga was accepted"
                );
                effects.push(SagaEffect::PersistProgress {
                    saga: id.clone(),
                    progress: machine.progress.clone(),
                });
            }
            if finished {
                effects.push(SagaEffect::Finished { saga: id.clone() });
                self.sagas.remove(&id);
            } else {
                #[cfg(any(debug_assertions, test))]
                machine.validate(&self.config);
            }
        }
        effects
    }

    /// A status snapshot of a saga in flight. Its outcome is reported only once durable.
    pub fn status(&self, saga: &TxnId) -> Option<SagaStatus> {
        self.sagas.get(saga).map(|m| {
            let mut status = m.progress.status(m.accepted_ms);
            if m.outcome_pending {
                status.outcome = None;
            }
            status.held = m.held;
            status
        })
    }

    /// Whether the outcome of a saga in flight is durable (what [`SagaEngine::status`] would
    /// show as terminal), without making a snapshot; `None` if the saga is not in flight.
    pub fn outcome_durable(&self, saga: &TxnId) -> Option<bool> {
        self.sagas
            .get(saga)
            .map(|m| m.progress.phase.is_terminal() && !m.outcome_pending)
    }

    /// The fingerprint of a saga in flight (to tell a client's retry from a conflicting id).
    pub fn fingerprint(&self, saga: &TxnId) -> Option<&Fingerprint> {
        self.sagas.get(saga).map(|m| &m.fingerprint)
    }

    /// The spec of a saga in flight.
    pub fn spec(&self, saga: &TxnId) -> Option<&SagaSpec> {
        self.sagas.get(saga).map(|m| &m.spec)
    }

    /// The retry timers armed for a saga in flight, with when each is due (what an
    /// [`SagaEvent::OperatorRetry`] would send now).
    pub fn retries_due(&self, saga: &TxnId) -> Option<Vec<(SagaTimer, u64)>> {
        self.sagas.get(saga).map(|m| m.retries_due())
    }

    /// How many sagas are in flight (accepting included).
    pub fn in_flight(&self) -> usize {
        self.sagas.len()
    }

    /// The changes this incarnation emitted for a saga in flight, oldest first (at most the
    /// last [`SAGA_CHANGES_KEPT_MAX`]): what a watcher that subscribes late has missed.
    pub fn changes_so_far(&self, saga: &TxnId) -> Option<Vec<SagaChange>> {
        self.sagas
            .get(saga)
            .map(|m| m.changes.iter().cloned().collect())
    }
}

/// What one event's handling needs from outside the machine, and what it produced.
struct Cx<'a> {
    now_ms: u64,
    rng: &'a mut SplitMix64,
    config: &'a SagaEngineConfig,
    /// The engine holds execution: a saga accepted in this event starts nothing.
    hold: bool,
    effects: Vec<SagaEffect>,
    /// A change was made since the last write: a lazy `PersistProgress` goes out at the end.
    changed: bool,
    /// Nothing is left to do: `Finished` goes out at the end and the engine drops the saga.
    finished: bool,
}

/// One saga in flight.
#[derive(Debug, Clone)]
struct Saga {
    id: TxnId,
    spec: SagaSpec,
    fingerprint: Fingerprint,
    accepted_ms: u64,
    progress: SagaProgress,
    /// `PersistOutcome` was emitted and `OutcomeDurable` not yet fed: the outcome is hidden
    /// and the saga waits.
    outcome_pending: bool,
    /// Per step: a retry timer is armed (of its action, or of its compensation), due then.
    /// `None`: the current attempt is in flight, or the step is not retrying.
    retry_at_ms: Vec<Option<u64>>,
    /// A callback retry timer is armed, due then.
    callback_retry_at_ms: Option<u64>,
    changes: VecDeque<SagaChange>,
    /// Accepted while execution was held; nothing started yet (see "Holding execution").
    held: bool,
}

impl Saga {
    fn submit(id: TxnId, spec: SagaSpec, fingerprint: Fingerprint, cx: &mut Cx<'_>) -> Self {
        if let Err(e) = spec.validate_graph() {
            panic!("{id}: an invalid spec reached the engine: {e}");
        }
        cx.effects.push(SagaEffect::PersistSpec {
            saga: id.clone(),
            spec: spec.clone(),
            fingerprint,
            accepted_ms: cx.now_ms,
        });
        Saga::new(id, spec, fingerprint, cx.now_ms, None)
    }

    fn new(
        id: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
        accepted_ms: u64,
        progress: Option<SagaProgress>,
    ) -> Self {
        let n = spec.steps.len();
        Saga {
            id,
            fingerprint,
            accepted_ms,
            progress: progress.unwrap_or_else(|| SagaProgress::new(n)),
            outcome_pending: false,
            retry_at_ms: vec![None; n],
            callback_retry_at_ms: None,
            changes: VecDeque::new(),
            held: false,
            spec,
        }
    }

    /// Rebuilds a saga from the log at start-up and resumes it. `None` if it was finished.
    fn recover(
        id: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
        accepted_ms: u64,
        progress: Option<SagaProgress>,
        cx: &mut Cx<'_>,
    ) -> Option<Self> {
        if let Err(e) = spec.validate_graph() {
            panic!("{id}: recovered an invalid spec: {e}");
        }
        let Some(progress) = progress else {
            // Accepted, and nothing more is known: start as if just accepted. Steps may have
            // been sent already, hence `recovered`.
            let mut saga = Saga::new(id, spec, fingerprint, accepted_ms, None);
            saga.progress.recovered = true;
            saga.accept(cx);
            return Some(saga);
        };
        assert_eq!(
            progress.steps.len(),
            spec.steps.len(),
            "{id}: recovered progress has {} steps, the spec {}",
            progress.steps.len(),
            spec.steps.len()
        );
        assert_ne!(
            progress.phase,
            SagaPhase::Accepting,
            "{id}: a stored progress record is never Accepting"
        );
        if progress.is_finished(&spec) {
            return None;
        }
        let mut saga = Saga::new(id, spec, fingerprint, accepted_ms, Some(progress));
        saga.progress.recovered = true;
        match saga.progress.phase {
            SagaPhase::Running => {
                // Ask again about every action in flight (or waiting to retry): a new attempt,
                // which the barrier answers with the recorded result if the action ran.
                for step in saga.progress.started_order.clone() {
                    if saga.step_phase(step) == StepPhase::Running {
                        saga.progress.steps[step as usize].action_attempts += 1;
                        saga.send_action(step, "re-sent after a coordinator restart", cx);
                    }
                }
                saga.start_ready(cx);
            }
            SagaPhase::Compensating => saga.run_compensation_head(cx),
            SagaPhase::Completed | SagaPhase::Compensated | SagaPhase::Aborted => {
                // Terminal; the callback was not acknowledged (else finished, above).
                saga.progress.callback_attempts += 1;
                saga.send_callback(cx);
            }
            SagaPhase::Accepting => unreachable!("checked above"),
        }
        Some(saga)
    }

    fn step(&mut self, event: SagaEvent, cx: &mut Cx<'_>) {
        debug_assert_eq!(event.saga(), &self.id, "event routed to the wrong saga");
        match event {
            SagaEvent::Accepted { .. } => {
                if self.progress.phase == SagaPhase::Accepting {
                    self.accept(cx);
                } // else a duplicate: ignored
            }
            SagaEvent::OutcomeDurable { .. } => {
                if self.outcome_pending {
                    self.on_outcome_durable(cx);
                } // else a duplicate: ignored
            }
            SagaEvent::ActionAnswered {
                step,
                attempt,
                answer,
                ..
            } => self.on_action_answered(step, attempt, answer, cx),
            SagaEvent::CompensationAnswered {
                step,
                attempt,
                answer,
                ..
            } => self.on_compensation_answered(step, attempt, answer, cx),
            SagaEvent::CallbackAnswered {
                attempt, answer, ..
            } => self.on_callback_answered(attempt, answer, cx),
            SagaEvent::TimerFired { timer, .. } => self.on_timer(timer, cx),
            SagaEvent::Release { .. } => {
                if self.held {
                    self.held = false;
                    self.start_ready(cx);
                } // else a duplicate, or released by an abort: ignored
            }
            SagaEvent::OperatorAbort { reason, .. } => {
                if self.progress.phase == SagaPhase::Running {
                    // A held saga has nothing to compensate: it ends at once.
                    self.held = false;
                    let reason = clip(reason, OUTCOME_REASON_BYTES_MAX);
                    self.decide(SagaOutcome::Aborted { reason }, cx);
                } // Accepting, compensating or terminal: nothing to do; the runtime says so
            }
            SagaEvent::OperatorRetry { .. } => {
                // Collected first: firing one may decide the saga, which makes the others
                // stale (their own checks then ignore them).
                for (timer, _) in self.retries_due() {
                    self.on_timer(timer, cx);
                }
            }
            SagaEvent::Submit { .. } | SagaEvent::Recovered { .. } => {
                panic!(
                    "{}: Submit/Recovered must go to the engine, not to a saga",
                    self.id
                )
            }
        }
    }

    /// Every timer armed, with when it is due, in step order then the callback.
    fn retries_due(&self) -> Vec<(SagaTimer, u64)> {
        let mut due = Vec::new();
        for (i, at) in self.retry_at_ms.iter().enumerate() {
            let Some(at_ms) = *at else { continue };
            let step = i as StepIdx;
            let s = &self.progress.steps[i];
            let timer = match s.phase {
                StepPhase::Running => SagaTimer::RetryAction {
                    step,
                    attempt: s.action_attempts + 1,
                },
                StepPhase::Compensating => SagaTimer::RetryCompensation {
                    step,
                    attempt: s.compensation_attempts + 1,
                },
                other => panic!("{}: a retry armed for step #{i} in {other:?}", self.id),
            };
            due.push((timer, at_ms));
        }
        if let Some(at_ms) = self.callback_retry_at_ms {
            let attempt = self.progress.callback_attempts + 1;
            due.push((SagaTimer::RetryCallback { attempt }, at_ms));
        }
        due
    }

    // ---- Running ----------------------------------------------------------------------

    /// Accepting -> Running: answer the submitter, start every step that waits for nothing
    /// (or nothing yet, if the engine holds execution).
    fn accept(&mut self, cx: &mut Cx<'_>) {
        assert_eq!(
            self.progress.phase,
            SagaPhase::Accepting,
            "{}: accepted twice",
            self.id
        );
        self.progress.phase = SagaPhase::Running;
        cx.effects.push(SagaEffect::ReplyAccepted {
            saga: self.id.clone(),
        });
        let detail = format!("{} steps", self.spec.steps.len());
        self.notify(ChangeKind::Accepted, None, 0, detail, cx);
        if cx.hold {
            self.held = true;
            // Running with every step pending is what recovery rebuilds from the spec alone:
            // writing it would cost a write per held saga and tell the log nothing.
            cx.changed = false;
            return;
        }
        self.start_ready(cx);
    }

    /// Starts every `Pending` step whose `after` steps have all succeeded, in index order.
    fn start_ready(&mut self, cx: &mut Cx<'_>) {
        assert_eq!(
            self.progress.phase,
            SagaPhase::Running,
            "{}: starting actions while not running",
            self.id
        );
        for i in 0..self.spec.steps.len() {
            let ready = self.progress.steps[i].phase == StepPhase::Pending
                && self.spec.steps[i]
                    .after
                    .iter()
                    .all(|&d| self.step_phase(d) == StepPhase::Succeeded);
            if ready {
                let step = &mut self.progress.steps[i];
                step.phase = StepPhase::Running;
                step.action_attempts = 1;
                step.first_sent_ms = Some(cx.now_ms);
                self.progress.started_order.push(i as StepIdx);
                self.send_action(i as StepIdx, "", cx);
            }
        }
    }

    /// Sends the step's current attempt (already counted in `action_attempts`).
    fn send_action(&mut self, step: StepIdx, detail: &str, cx: &mut Cx<'_>) {
        assert_eq!(
            self.progress.phase,
            SagaPhase::Running,
            "{}: an action sent while not running",
            self.id
        );
        let spec = &self.spec.steps[step as usize];
        let attempt = self.progress.steps[step as usize].action_attempts;
        assert_eq!(self.step_phase(step), StepPhase::Running);
        self.retry_at_ms[step as usize] = None;
        cx.effects.push(SagaEffect::SendAction {
            saga: self.id.clone(),
            step,
            attempt,
            target: spec.target.clone(),
            payload: spec.action.clone(),
            timeout_ms: spec.timeout_ms,
        });
        self.notify(
            ChangeKind::StepStarted,
            Some(step),
            attempt,
            detail.to_string(),
            cx,
        );
    }

    fn on_action_answered(
        &mut self,
        step: StepIdx,
        attempt: u32,
        answer: ActionAnswer,
        cx: &mut Cx<'_>,
    ) {
        // Once compensation is decided, answers to actions change nothing: every attempted
        // step is compensated whatever it answers.
        let current = self.progress.phase == SagaPhase::Running
            && (step as usize) < self.spec.steps.len()
            && self.step_phase(step) == StepPhase::Running
            && attempt == self.progress.steps[step as usize].action_attempts;
        if !current {
            return;
        }
        let waiting_to_retry = self.retry_at_ms[step as usize].is_some();
        match answer {
            ActionAnswer::Succeeded => {
                // Also taken while waiting to retry: a definite answer for the current
                // attempt is the barrier's recorded result.
                self.retry_at_ms[step as usize] = None;
                self.progress.steps[step as usize].phase = StepPhase::Succeeded;
                self.progress.succeeded_order.push(step);
                self.notify(
                    ChangeKind::StepSucceeded,
                    Some(step),
                    attempt,
                    String::new(),
                    cx,
                );
                if self
                    .progress
                    .steps
                    .iter()
                    .all(|s| s.phase == StepPhase::Succeeded)
                {
                    self.decide(SagaOutcome::Completed, cx);
                } else {
                    self.start_ready(cx);
                }
            }
            ActionAnswer::Failed { reason } => {
                let reason = clip(reason, OUTCOME_REASON_BYTES_MAX);
                self.fail_step(step, reason, cx);
            }
            ActionAnswer::Unavailable { error } => {
                if waiting_to_retry {
                    return; // a duplicate of the failure that armed the timer
                }
                let error = clip(error, STEP_ERROR_BYTES_MAX);
                self.progress.steps[step as usize].last_error = Some(error.clone());
                if let Some(reason) = self.retries_exhausted(step, cx.now_ms) {
                    self.fail_step(step, reason, cx);
                    return;
                }
                let delay_ms = self.spec.steps[step as usize]
                    .retry
                    .backoff
                    .delay(attempt - 1, cx.rng)
                    .as_millis() as u64;
                let at_ms = cx.now_ms + delay_ms;
                self.retry_at_ms[step as usize] = Some(at_ms);
                cx.effects.push(SagaEffect::SetTimer {
                    saga: self.id.clone(),
                    timer: SagaTimer::RetryAction {
                        step,
                        attempt: attempt + 1,
                    },
                    at_ms,
                });
                let detail = format!("{error}; attempt {} in {delay_ms} ms", attempt + 1);
                self.notify(ChangeKind::StepRetried, Some(step), attempt, detail, cx);
            }
        }
    }

    /// Why no new attempt of `step` may start now, if none may.
    fn retries_exhausted(&self, step: StepIdx, now_ms: u64) -> Option<String> {
        let s = &self.progress.steps[step as usize];
        let policy = &self.spec.steps[step as usize].retry;
        let last_error = s.last_error.as_deref().unwrap_or("no answer");
        let attempts = s.action_attempts;
        let plural = if attempts == 1 { "" } else { "s" };
        if policy.attempts_max != 0 && attempts >= policy.attempts_max {
            return Some(format!(
                "retries exhausted after {attempts} attempt{plural} (attempts_max {}): {last_error}",
                policy.attempts_max
            ));
        }
        let first_sent_ms = s.first_sent_ms.expect("a running step was sent");
        if policy.deadline_ms != 0 && now_ms >= first_sent_ms.saturating_add(policy.deadline_ms) {
            return Some(format!(
                "retries exhausted after {attempts} attempt{plural} (deadline of {} ms passed): {last_error}",
                policy.deadline_ms
            ));
        }
        None
    }

    /// A step's action failed for good: the saga compensates.
    fn fail_step(&mut self, step: StepIdx, reason: String, cx: &mut Cx<'_>) {
        self.retry_at_ms[step as usize] = None;
        let s = &mut self.progress.steps[step as usize];
        s.phase = StepPhase::Failed;
        s.last_error = Some(clip(reason.clone(), STEP_ERROR_BYTES_MAX));
        let attempt = s.action_attempts;
        self.notify(
            ChangeKind::StepFailed,
            Some(step),
            attempt,
            reason.clone(),
            cx,
        );
        let failed_step = self.spec.steps[step as usize].name.clone();
        self.decide(
            SagaOutcome::Compensated {
                failed_step,
                reason,
            },
            cx,
        );
    }

    // ---- Deciding ---------------------------------------------------------------------

    /// Running -> Completed or Compensating: fix the outcome (and, to compensate, the
    /// queue), force it, and wait until it is durable.
    fn decide(&mut self, outcome: SagaOutcome, cx: &mut Cx<'_>) {
        assert_eq!(
            self.progress.phase,
            SagaPhase::Running,
            "{}: decided {outcome:?} while {:?}",
            self.id,
            self.progress.phase
        );
        assert!(
            self.progress.outcome.is_none(),
            "{}: a second outcome {outcome:?}",
            self.id
        );
        match outcome {
            SagaOutcome::Completed => {
                assert!(
                    self.progress
                        .steps
                        .iter()
                        .all(|s| s.phase == StepPhase::Succeeded),
                    "{}: completed with a step that did not succeed",
                    self.id
                );
                self.progress.phase = SagaPhase::Completed;
            }
            SagaOutcome::Compensated { .. } | SagaOutcome::Aborted { .. } => {
                self.progress.compensation_queue = self.compensation_queue();
                for s in &mut self.progress.steps {
                    if s.phase == StepPhase::Pending && !self.progress.recovered {
                        s.phase = StepPhase::Skipped;
                    }
                }
                self.retry_at_ms.iter_mut().for_each(|r| *r = None);
                self.progress.phase = if self.progress.compensation_queue.is_empty() {
                    // Nothing was attempted (an operator aborted a held saga): there is
                    // nothing to compensate, so the outcome is reached once durable.
                    match outcome {
                        SagaOutcome::Aborted { .. } => SagaPhase::Aborted,
                        _ => SagaPhase::Compensated,
                    }
                } else {
                    SagaPhase::Compensating
                };
            }
        }
        self.progress.outcome = Some(outcome);
        self.outcome_pending = true;
        cx.effects.push(SagaEffect::PersistOutcome {
            saga: self.id.clone(),
            progress: self.progress.clone(),
        });
        cx.changed = false; // the forced write carries every change so far
    }

    /// The compensations to run, in order (see the module doc).
    fn compensation_queue(&self) -> Vec<StepIdx> {
        let p = &self.progress;
        let mut queue = Vec::new();
        if p.recovered {
            // Maybe attempted by an earlier incarnation: undo them first, dependents first.
            let mut pending: Vec<StepIdx> = topological_order(&self.spec)
                .into_iter()
                .filter(|&i| p.steps[i as usize].phase == StepPhase::Pending)
                .collect();
            pending.reverse();
            queue.extend(pending);
        }
        queue.extend(p.started_order.iter().rev().copied().filter(|&i| {
            matches!(
                p.steps[i as usize].phase,
                StepPhase::Running | StepPhase::Failed
            )
        }));
        queue.extend(p.succeeded_order.iter().rev().copied());
        queue
    }

    /// The outcome is durable: announce it (completed) or start compensating.
    fn on_outcome_durable(&mut self, cx: &mut Cx<'_>) {
        self.outcome_pending = false;
        match self.progress.phase {
            SagaPhase::Completed => {
                self.reach_outcome(cx);
                if cx.finished {
                    // The forced outcome record already holds this progress but for the
                    // number of the FINISHED change, and a finished saga has no later change
                    // to number: nothing is written again.
                    cx.changed = false;
                }
            }
            SagaPhase::Compensating => self.run_compensation_head(cx),
            // Decided with nothing to compensate (see `decide`).
            SagaPhase::Compensated | SagaPhase::Aborted => self.reach_outcome(cx),
            SagaPhase::Accepting | SagaPhase::Running => {
                panic!(
                    "{}: an outcome was pending in phase {:?}",
                    self.id, self.progress.phase
                )
            }
        }
    }

    // ---- Compensating -----------------------------------------------------------------

    /// Sends the compensation at the head of the queue: the first attempt, or a new one
    /// after a restart. Announces the start of compensation if none was sent yet.
    fn run_compensation_head(&mut self, cx: &mut Cx<'_>) {
        let head = *self
            .progress
            .compensation_queue
            .first()
            .unwrap_or_else(|| panic!("{}: compensating with an empty queue", self.id));
        let begun = self
            .progress
            .steps
            .iter()
            .any(|s| matches!(s.phase, StepPhase::Compensating | StepPhase::Compensated));
        if !begun {
            let detail = match &self.progress.outcome {
                Some(SagaOutcome::Compensated {
                    failed_step,
                    reason,
                }) => format!("step {failed_step} failed: {reason}"),
                Some(SagaOutcome::Aborted { reason }) => {
                    format!("aborted by an operator: {reason}")
                }
                other => panic!("{}: compensating with outcome {other:?}", self.id),
            };
            self.notify(ChangeKind::CompensationStarted, None, 0, detail, cx);
        }
        let detail = if self.step_phase(head) == StepPhase::Compensating {
            "re-sent after a coordinator restart"
        } else {
            ""
        };
        self.send_compensation(head, detail, cx);
    }

    /// Sends a new attempt of `step`'s compensation.
    fn send_compensation(&mut self, step: StepIdx, detail: &str, cx: &mut Cx<'_>) {
        assert_eq!(
            self.progress.compensation_queue.first(),
            Some(&step),
            "{}: compensating a step out of order",
            self.id
        );
        let s = &mut self.progress.steps[step as usize];
        s.phase = StepPhase::Compensating;
        s.compensation_attempts += 1;
        let attempt = s.compensation_attempts;
        self.retry_at_ms[step as usize] = None;
        let spec = &self.spec.steps[step as usize];
        cx.effects.push(SagaEffect::SendCompensation {
            saga: self.id.clone(),
            step,
            attempt,
            target: spec.target.clone(),
            payload: spec.compensation.clone(),
        });
        self.notify(
            ChangeKind::CompensationStarted,
            Some(step),
            attempt,
            detail.to_string(),
            cx,
        );
    }

    fn on_compensation_answered(
        &mut self,
        step: StepIdx,
        attempt: u32,
        answer: Result<(), String>,
        cx: &mut Cx<'_>,
    ) {
        let current = self.progress.phase == SagaPhase::Compensating
            && !self.outcome_pending
            && self.progress.compensation_queue.first() == Some(&step)
            && self.step_phase(step) == StepPhase::Compensating
            && attempt == self.progress.steps[step as usize].compensation_attempts;
        if !current {
            return;
        }
        match answer {
            Ok(()) => {
                self.retry_at_ms[step as usize] = None;
                self.progress.steps[step as usize].phase = StepPhase::Compensated;
                self.progress.steps[step as usize].compensation_failures = 0;
                self.progress.stuck = false;
                self.progress.compensation_queue.remove(0);
                self.notify(
                    ChangeKind::StepCompensated,
                    Some(step),
                    attempt,
                    String::new(),
                    cx,
                );
                match self.progress.compensation_queue.first() {
                    Some(&next) => self.send_compensation(next, "", cx),
                    None => {
                        self.progress.phase = match self.progress.outcome {
                            Some(SagaOutcome::Aborted { .. }) => SagaPhase::Aborted,
                            _ => SagaPhase::Compensated,
                        };
                        self.reach_outcome(cx);
                    }
                }
            }
            Err(error) => {
                if self.retry_at_ms[step as usize].is_some() {
                    return; // a duplicate of the failure that armed the timer
                }
                let error = clip(error, STEP_ERROR_BYTES_MAX);
                let s = &mut self.progress.steps[step as usize];
                s.compensation_failures += 1;
                s.last_error = Some(error.clone());
                let failures = s.compensation_failures;
                let delay_ms = cx
                    .config
                    .compensation_backoff
                    .delay(failures - 1, cx.rng)
                    .as_millis() as u64;
                let at_ms = cx.now_ms + delay_ms;
                self.retry_at_ms[step as usize] = Some(at_ms);
                cx.effects.push(SagaEffect::SetTimer {
                    saga: self.id.clone(),
                    timer: SagaTimer::RetryCompensation {
                        step,
                        attempt: attempt + 1,
                    },
                    at_ms,
                });
                let detail = format!("{error}; attempt {} in {delay_ms} ms", attempt + 1);
                self.notify(
                    ChangeKind::CompensationRetried,
                    Some(step),
                    attempt,
                    detail,
                    cx,
                );
                let stuck_after = cx.config.stuck_after_failures;
                if stuck_after != 0 && failures >= stuck_after && !self.progress.stuck {
                    self.progress.stuck = true;
                    let detail = format!(
                        "the compensation of step {} failed {failures} times in a row; last error: {error}",
                        self.spec.steps[step as usize].name
                    );
                    self.notify(ChangeKind::Stuck, Some(step), attempt, detail, cx);
                }
            }
        }
    }

    // ---- Terminal -----------------------------------------------------------------------

    /// The outcome is reached and durable: tell watchers and waiters, then the callback.
    fn reach_outcome(&mut self, cx: &mut Cx<'_>) {
        assert!(
            self.progress.phase.is_terminal() && !self.outcome_pending,
            "{}: announcing an outcome in phase {:?}",
            self.id,
            self.progress.phase
        );
        let outcome = self
            .progress
            .outcome
            .clone()
            .expect("a terminal saga has an outcome");
        self.notify_change(
            SagaChange {
                seq: 0,
                at_ms: cx.now_ms,
                kind: ChangeKind::Finished,
                step: None,
                attempt: 0,
                detail: outcome.to_string(),
                outcome: Some(outcome.clone()),
            },
            cx,
        );
        cx.effects.push(SagaEffect::Terminal {
            saga: self.id.clone(),
            outcome,
            status: self.progress.status(self.accepted_ms),
        });
        if self.spec.callback.is_some() {
            self.progress.callback_attempts += 1;
            self.send_callback(cx);
        } else {
            cx.finished = true;
        }
    }

    /// Sends the callback's current attempt (already counted).
    fn send_callback(&mut self, cx: &mut Cx<'_>) {
        let target = self
            .spec
            .callback
            .clone()
            .expect("only a saga with a callback sends it");
        self.callback_retry_at_ms = None;
        cx.effects.push(SagaEffect::SendCallback {
            saga: self.id.clone(),
            attempt: self.progress.callback_attempts,
            target,
            outcome: self
                .progress
                .outcome
                .clone()
                .expect("a terminal saga has an outcome"),
        });
    }

    fn on_callback_answered(&mut self, attempt: u32, answer: Result<(), String>, cx: &mut Cx<'_>) {
        let current = self.progress.phase.is_terminal()
            && !self.outcome_pending
            && self.spec.callback.is_some()
            && !self.progress.callback_delivered
            && attempt == self.progress.callback_attempts;
        if !current {
            return;
        }
        match answer {
            Ok(()) => {
                self.callback_retry_at_ms = None;
                self.progress.callback_delivered = true;
                cx.changed = true;
                cx.finished = true;
            }
            Err(error) => {
                if self.callback_retry_at_ms.is_some() {
                    return; // a duplicate of the failure that armed the timer
                }
                let delay_ms = cx
                    .config
                    .callback_backoff
                    .delay(attempt - 1, cx.rng)
                    .as_millis() as u64;
                let at_ms = cx.now_ms + delay_ms;
                self.callback_retry_at_ms = Some(at_ms);
                tracing::debug!(saga = %self.id, attempt, %error, delay_ms, "callback failed; retrying");
                cx.effects.push(SagaEffect::SetTimer {
                    saga: self.id.clone(),
                    timer: SagaTimer::RetryCallback {
                        attempt: attempt + 1,
                    },
                    at_ms,
                });
            }
        }
    }

    // ---- Timers -------------------------------------------------------------------------

    fn on_timer(&mut self, timer: SagaTimer, cx: &mut Cx<'_>) {
        match timer {
            SagaTimer::RetryAction { step, attempt } => {
                let current = self.progress.phase == SagaPhase::Running
                    && (step as usize) < self.spec.steps.len()
                    && self.step_phase(step) == StepPhase::Running
                    && self.retry_at_ms[step as usize].is_some()
                    && attempt == self.progress.steps[step as usize].action_attempts + 1;
                if !current {
                    return;
                }
                if self.spec.steps[step as usize].retry.deadline_ms != 0 {
                    if let Some(reason) = self.retries_exhausted(step, cx.now_ms) {
                        self.fail_step(step, reason, cx);
                        return;
                    }
                }
                self.progress.steps[step as usize].action_attempts = attempt;
                self.send_action(step, "", cx);
            }
            SagaTimer::RetryCompensation { step, attempt } => {
                let current = self.progress.phase == SagaPhase::Compensating
                    && !self.outcome_pending
                    && self.progress.compensation_queue.first() == Some(&step)
                    && self.step_phase(step) == StepPhase::Compensating
                    && self.retry_at_ms[step as usize].is_some()
                    && attempt == self.progress.steps[step as usize].compensation_attempts + 1;
                if current {
                    self.send_compensation(step, "", cx);
                }
            }
            SagaTimer::RetryCallback { attempt } => {
                let current = self.progress.phase.is_terminal()
                    && !self.outcome_pending
                    && !self.progress.callback_delivered
                    && self.callback_retry_at_ms.is_some()
                    && attempt == self.progress.callback_attempts + 1;
                if current {
                    self.progress.callback_attempts = attempt;
                    self.send_callback(cx);
                }
            }
        }
    }

    // ---- Helpers ------------------------------------------------------------------------

    fn step_phase(&self, step: StepIdx) -> StepPhase {
        self.progress.steps[step as usize].phase
    }

    fn notify(
        &mut self,
        kind: ChangeKind,
        step: Option<StepIdx>,
        attempt: u32,
        detail: String,
        cx: &mut Cx<'_>,
    ) {
        self.notify_change(
            SagaChange {
                seq: 0,
                at_ms: cx.now_ms,
                kind,
                step,
                attempt,
                detail,
                outcome: None,
            },
            cx,
        );
    }

    /// Numbers the change, keeps it for late watchers and emits it; the progress is written
    /// at the end of the event.
    fn notify_change(&mut self, mut change: SagaChange, cx: &mut Cx<'_>) {
        self.progress.seq += 1;
        change.seq = self.progress.seq;
        if self.changes.len() == SAGA_CHANGES_KEPT_MAX {
            self.changes.pop_front();
        }
        self.changes.push_back(change.clone());
        cx.effects.push(SagaEffect::Notify {
            saga: self.id.clone(),
            change,
        });
        cx.changed = true;
    }

    /// Checks the machine's invariants; run after every step in debug and test builds.
    #[cfg(any(debug_assertions, test))]
    fn validate(&self, config: &SagaEngineConfig) {
        let id = &self.id;
        let p = &self.progress;
        let n = self.spec.steps.len();
        assert!(n > 0, "{id}: no steps");
        assert_eq!(
            p.steps.len(),
            n,
            "{id}: progress and spec disagree on the steps"
        );
        assert_eq!(self.retry_at_ms.len(), n, "{id}: retry timers per step");
        let phase_of = |i: StepIdx| p.steps[i as usize].phase;

        // The orders: no duplicates, and exactly the steps they claim.
        let unique = |order: &[StepIdx], what: &str| {
            let mut seen = std::collections::BTreeSet::new();
            for &i in order {
                assert!((i as usize) < n, "{id}: {what} names step #{i} of {n}");
                assert!(seen.insert(i), "{id}: step #{i} twice in {what} {order:?}");
            }
        };
        unique(&p.started_order, "started_order");
        unique(&p.succeeded_order, "succeeded_order");
        unique(&p.compensation_queue, "compensation_queue");
        for (i, s) in p.steps.iter().enumerate() {
            let i = i as StepIdx;
            let started = p.started_order.contains(&i);
            assert_eq!(
                started,
                s.action_attempts > 0,
                "{id}: step #{i} ({:?}) started {started} with {} attempts",
                s.phase,
                s.action_attempts
            );
            assert_eq!(
                started,
                s.first_sent_ms.is_some(),
                "{id}: step #{i} first send"
            );
            match s.phase {
                StepPhase::Pending | StepPhase::Skipped => {
                    assert!(!started, "{id}: step #{i} is {:?} but was sent", s.phase)
                }
                StepPhase::Running | StepPhase::Succeeded | StepPhase::Failed => {
                    assert!(started, "{id}: step #{i} is {:?} but never sent", s.phase)
                }
                StepPhase::Compensating | StepPhase::Compensated => {
                    assert!(
                        started || p.recovered,
                        "{id}: step #{i} compensated but never attempted"
                    );
                }
            }
            if s.phase == StepPhase::Succeeded {
                assert!(
                    p.succeeded_order.contains(&i),
                    "{id}: step #{i} succeeded out of succeeded_order"
                );
            }
            if started {
                // A step starts only once every step it waits for has succeeded.
                for &d in &self.spec.steps[i as usize].after {
                    assert!(
                        p.succeeded_order.contains(&d),
                        "{id}: step #{i} started before step #{d} succeeded"
                    );
                }
            }
            if !matches!(s.phase, StepPhase::Compensating | StepPhase::Compensated) {
                assert_eq!(
                    s.compensation_attempts, 0,
                    "{id}: step #{i} compensation attempts"
                );
            }
            if s.compensation_failures > 0 {
                assert_eq!(
                    p.compensation_queue.first(),
                    Some(&i),
                    "{id}: compensation failures counted for a step not in progress"
                );
            }
        }
        for (k, &i) in p.succeeded_order.iter().enumerate() {
            assert!(
                p.started_order.contains(&i),
                "{id}: step #{i} succeeded unsent"
            );
            assert!(
                matches!(
                    phase_of(i),
                    StepPhase::Succeeded | StepPhase::Compensating | StepPhase::Compensated
                ),
                "{id}: step #{i} in succeeded_order is {:?}",
                phase_of(i)
            );
            for &d in &self.spec.steps[i as usize].after {
                assert!(
                    p.succeeded_order[..k].contains(&d),
                    "{id}: step #{i} succeeded before step #{d} it waits for"
                );
            }
        }

        // Timers: armed only for the attempt in progress.
        for (i, at) in self.retry_at_ms.iter().enumerate() {
            if at.is_some() {
                let action_retry =
                    p.phase == SagaPhase::Running && p.steps[i].phase == StepPhase::Running;
                let compensation_retry = p.phase == SagaPhase::Compensating
                    && p.compensation_queue.first() == Some(&(i as StepIdx))
                    && p.steps[i].phase == StepPhase::Compensating;
                assert!(
                    action_retry || compensation_retry,
                    "{id}: a retry timer armed for step #{i} ({:?}) in {:?}",
                    p.steps[i].phase,
                    p.phase
                );
            }
        }
        if self.callback_retry_at_ms.is_some() {
            assert!(
                p.phase.is_terminal() && !p.callback_delivered,
                "{id}: callback timer"
            );
        }
        if p.callback_attempts > 0 || p.callback_delivered {
            assert!(
                p.phase.is_terminal() && self.spec.callback.is_some(),
                "{id}: callback sent in {:?}",
                p.phase
            );
        }
        if self.held {
            assert!(
                p.phase == SagaPhase::Running && p.started_order.is_empty(),
                "{id}: held while {:?} with {} steps started",
                p.phase,
                p.started_order.len()
            );
        }
        if p.stuck {
            assert_eq!(
                p.phase,
                SagaPhase::Compensating,
                "{id}: stuck while {:?}",
                p.phase
            );
            let head = p.compensation_queue[0] as usize;
            assert!(
                config.stuck_after_failures > 0
                    && p.steps[head].compensation_failures >= config.stuck_after_failures,
                "{id}: stuck without {} failures in a row",
                config.stuck_after_failures
            );
        }
        let count = |phase: StepPhase| p.steps.iter().filter(|s| s.phase == phase).count();
        let outcome_matches_phase = matches!(
            (&p.outcome, p.phase),
            (None, SagaPhase::Accepting | SagaPhase::Running)
                | (Some(SagaOutcome::Completed), SagaPhase::Completed)
                | (
                    Some(SagaOutcome::Compensated { .. } | SagaOutcome::Aborted { .. }),
                    SagaPhase::Compensating
                )
                | (
                    Some(SagaOutcome::Compensated { .. }),
                    SagaPhase::Compensated
                )
                | (Some(SagaOutcome::Aborted { .. }), SagaPhase::Aborted)
        );
        assert!(
            outcome_matches_phase,
            "{id}: outcome {:?} in phase {:?}",
            p.outcome, p.phase
        );
        if self.outcome_pending {
            assert!(
                matches!(p.phase, SagaPhase::Completed | SagaPhase::Compensating)
                    || (p.phase.is_terminal() && p.started_order.is_empty()),
                "{id}: an outcome pending in {:?}",
                p.phase
            );
            assert!(
                !p.steps
                    .iter()
                    .any(|s| matches!(s.phase, StepPhase::Compensating | StepPhase::Compensated)),
                "{id}: compensation sent before the outcome was durable"
            );
        }
        match p.phase {
            SagaPhase::Accepting => {
                assert_eq!(p.seq, 0, "{id}: a change before acceptance");
                assert_eq!(
                    count(StepPhase::Pending),
                    n,
                    "{id}: a step moved before acceptance"
                );
            }
            SagaPhase::Running => {
                assert!(
                    p.compensation_queue.is_empty(),
                    "{id}: a queue while running"
                );
                for phase in [
                    StepPhase::Failed,
                    StepPhase::Compensating,
                    StepPhase::Compensated,
                    StepPhase::Skipped,
                ] {
                    assert_eq!(count(phase), 0, "{id}: a {phase:?} step while running");
                }
                assert!(
                    count(StepPhase::Running) > 0 || self.held,
                    "{id}: running with no action in flight (all succeeded, or stalled)"
                );
            }
            SagaPhase::Compensating => {
                assert!(
                    !p.compensation_queue.is_empty(),
                    "{id}: compensating, nothing queued"
                );
                if !p.recovered {
                    assert_eq!(
                        count(StepPhase::Pending),
                        0,
                        "{id}: a Pending step not skipped"
                    );
                }
                // Every step that may have been attempted is compensated or queued.
                for (i, s) in p.steps.iter().enumerate() {
                    let queued = p.compensation_queue.contains(&(i as StepIdx));
                    let expected = match s.phase {
                        StepPhase::Compensated | StepPhase::Skipped => false,
                        StepPhase::Pending
                        | StepPhase::Running
                        | StepPhase::Succeeded
                        | StepPhase::Failed
                        | StepPhase::Compensating => true,
                    };
                    assert_eq!(
                        queued, expected,
                        "{id}: step #{i} ({:?}) queued {queued}",
                        s.phase
                    );
                }
                for (k, &i) in p.compensation_queue.iter().enumerate() {
                    if k > 0 {
                        assert_ne!(
                            phase_of(i),
                            StepPhase::Compensating,
                            "{id}: two compensations at once"
                        );
                    }
                }
                // Succeeded steps come last, in reverse order of completion, and after every
                // step that completed later (those are compensated already).
                let queued_succeeded: Vec<StepIdx> = p
                    .compensation_queue
                    .iter()
                    .copied()
                    .filter(|i| p.succeeded_order.contains(i))
                    .collect();
                let k = p.compensation_queue.len() - queued_succeeded.len();
                assert_eq!(
                    &p.compensation_queue[k..],
                    &queued_succeeded[..],
                    "{id}: a step that never succeeded queued after one that did"
                );
                let mut expected: Vec<StepIdx> = p.succeeded_order.clone();
                expected.reverse();
                let done = expected.len() - queued_succeeded.len();
                assert_eq!(
                    &expected[done..],
                    &queued_succeeded[..],
                    "{id}: succeeded steps not undone in reverse order of completion"
                );
                for &i in &expected[..done] {
                    assert_eq!(
                        phase_of(i),
                        StepPhase::Compensated,
                        "{id}: step #{i} skipped in order"
                    );
                }
                if !self.outcome_pending {
                    assert_eq!(
                        phase_of(p.compensation_queue[0]),
                        StepPhase::Compensating,
                        "{id}: the head of the queue is not being compensated"
                    );
                }
            }
            SagaPhase::Completed => {
                assert_eq!(
                    count(StepPhase::Succeeded),
                    n,
                    "{id}: completed, not all succeeded"
                );
                assert_eq!(
                    p.succeeded_order.len(),
                    n,
                    "{id}: completion order incomplete"
                );
                assert!(
                    p.compensation_queue.is_empty(),
                    "{id}: completed with a queue"
                );
            }
            SagaPhase::Compensated | SagaPhase::Aborted => {
                assert!(
                    p.compensation_queue.is_empty(),
                    "{id}: terminal with a queue"
                );
                for (i, s) in p.steps.iter().enumerate() {
                    let expected = if p.started_order.contains(&(i as StepIdx)) || p.recovered {
                        matches!(s.phase, StepPhase::Compensated | StepPhase::Skipped)
                    } else {
                        s.phase == StepPhase::Skipped
                    };
                    assert!(expected, "{id}: step #{i} ends {:?}", s.phase);
                    if p.started_order.contains(&(i as StepIdx)) {
                        assert_eq!(
                            s.phase,
                            StepPhase::Compensated,
                            "{id}: attempted step #{i} not compensated"
                        );
                    }
                }
            }
        }
        if let Some(SagaOutcome::Compensated { failed_step, .. }) = &p.outcome {
            let failed = self
                .spec
                .steps
                .iter()
                .position(|s| &s.name == failed_step)
                .unwrap_or_else(|| {
                    panic!("{id}: the failed step {failed_step:?} is not in the spec")
                });
            assert!(
                p.started_order.contains(&(failed as StepIdx)),
                "{id}: step {failed_step} failed without being sent"
            );
        }
    }
}

/// Cuts `s` to at most `max` bytes (on a character boundary), marking the cut.
fn clip(s: String, max: usize) -> String {
    tandem_common::clip_text(s, max)
}

#[cfg(test)]
#[path = "saga_tests.rs"]
mod tests;
