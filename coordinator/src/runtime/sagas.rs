//! The saga half of the runtime: carries out the [`SagaEngine`]'s effects and keeps the clients
//! that wait on sagas (submitters waiting for acceptance, `wait` callers, `watch` streams).
//!
//! Durability: the spec and the outcome are the forced writes. `SagaEvent::Accepted` is fed back (and
//! so the submitter answered, and the first actions sent) only once the flush that covers it
//! has completed. Progress is written lazily, in checkpoints at most [`PROGRESS_CHECKPOINT_MS`]
//! apart; after a crash the engine resumes from the last progress that reached the disk and
//! re-sends what followed, which the participants' barrier makes harmless.
//!
//! Watch histories: every change of a saga in flight is kept in memory so that a watch started
//! late still sees the whole story, in order. Histories are bounded: at most
//! [`HISTORY_CHANGES_MAX`] changes per saga (later retries are then only streamed live, never
//! stored) and the histories of the [`FINISHED_HISTORIES_MAX`] most recently finished sagas.
//! A watch of an older finished saga (or one finished before a restart) gets its final state
//! as a single FINISHED change.
//!
//! Crash points: `coordinator.after_saga_accepted` (the spec is durable, the submitter not yet
//! answered), `coordinator.before_step_recorded` (a step's success received, not yet given to
//! the engine) and `coordinator.during_compensation` (a compensation succeeded and was
//! recorded lazily; the next one not yet sent).

use std::collections::{HashMap, VecDeque};

use tandem_common::crash::crash_point;
use tandem_common::{unix_now_ms, TraceContext, TxnId};
use tokio::sync::{mpsc, oneshot};

use super::{fatal, LoopEvent, Observed, Runtime, TimerEntry};
use crate::engine::saga::{
    ActionAnswer, ChangeKind, SagaChange, SagaEffect, SagaEngine, SagaEvent, SagaOutcome,
    SagaPhase, SagaProgress, SagaSpec, SagaStatus, SagaTimer, StepPhase, StepStatus,
};
use crate::error::CoordinatorError;
use crate::log::record::{Fingerprint, SagaSpecRecord, StoredSaga};
use crate::metrics::{Finished, Kind, Retry};
use crate::transport::{CallbackCall, StepCall};

/// Most changes kept per saga for late watchers.
pub const HISTORY_CHANGES_MAX: usize = 1_000;
/// How many finished sagas keep their history in memory.
pub const FINISHED_HISTORIES_MAX: usize = 4_096;
/// Changes a watcher may fall behind by before it is dropped (its stream then ends early).
pub const WATCH_BUFFER_CHANGES: usize = 1_024;
/// How long the progress of a running saga may stay unwritten, in ms.
///
/// Progress is lazy by contract (after a crash the saga resumes from the progress on disk
/// and re-sends what followed; the participants' barrier answers a re-sent step from its
/// record), so writing every change is not needed for safety, and under load it was the
/// loop's largest cost: a three-step saga made four progress writes besides its two forced
/// ones. Now the progress of a running saga is kept in memory and written by a checkpoint at
/// most this long after its first unwritten change; a saga that finishes sooner writes only
/// its spec and its outcome (which carries the whole progress). A crash loses at most this
/// much progress, which costs re-sent steps, never a wrong outcome.
pub const PROGRESS_CHECKPOINT_MS: u64 = 250;

/// A validated saga submission.
#[derive(Debug)]
pub struct SubmitSagaRequest {
    pub saga: TxnId,
    pub spec: SagaSpec,
    pub fingerprint: Fingerprint,
    /// The client's trace context (W3C `traceparent`), if it sent one.
    pub trace: Option<TraceContext>,
}

/// A saga as clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaView {
    pub saga: TxnId,
    /// The steps' names, in the order of `status.steps`.
    pub step_names: Vec<String>,
    pub status: SagaStatus,
}

/// One item of a watch stream. The FINISHED change carries the final state.
#[derive(Debug, Clone)]
pub struct WatchItem {
    pub change: SagaChange,
    pub finished: Option<SagaView>,
}

type SubmitReply = oneshot::Sender<Result<TxnId, CoordinatorError>>;
type ViewReply = oneshot::Sender<Result<Option<SagaView>, CoordinatorError>>;
type WatchReply = oneshot::Sender<Result<Option<mpsc::Receiver<WatchItem>>, CoordinatorError>>;

pub(super) enum SagaCommand {
    /// One or more submissions (a `SubmitSaga` call is a batch of one), taken in one loop
    /// turn.
    SubmitBatch {
        items: Vec<(SubmitSagaRequest, SubmitReply)>,
    },
    Get {
        saga: TxnId,
        reply: ViewReply,
    },
    /// Answered at once if the saga is terminal (or unknown), else when it becomes terminal.
    Wait {
        saga: TxnId,
        reply: ViewReply,
    },
    Watch {
        saga: TxnId,
        reply: WatchReply,
    },
}

/// The saga engine and everything the runtime keeps about sagas besides it.
pub(super) struct SagaSide {
    pub(super) engine: SagaEngine,
    /// Step names of the sagas in the engine.
    step_names: HashMap<TxnId, Vec<String>>,
    /// Submitters waiting for the forced spec write.
    accept_waiters: HashMap<TxnId, Vec<SubmitReply>>,
    /// `wait` callers waiting for a terminal state.
    terminal_waiters: HashMap<TxnId, Vec<ViewReply>>,
    watchers: HashMap<TxnId, Vec<mpsc::Sender<WatchItem>>>,
    histories: HashMap<TxnId, Vec<SagaChange>>,
    finished_histories: HashMap<TxnId, Vec<SagaChange>>,
    finished_order: VecDeque<TxnId>,
    /// The latest progress of running sagas, not yet written to the log (see
    /// [`PROGRESS_CHECKPOINT_MS`]).
    unwritten_progress: HashMap<TxnId, SagaProgress>,
    /// When the next checkpoint writes `unwritten_progress` (ms since the epoch).
    pub(super) checkpoint_due_ms: Option<u64>,
    /// The view of the saga whose step is being applied, made once for all the effects that
    /// need it (its FINISHED change, `Terminal`, the callback); a step that makes the saga
    /// terminal brings it with its `Terminal` effect.
    view_read: Option<SagaView>,
    /// Sagas accepted while execution was held, oldest first; released (in this order, a
    /// batch per idle loop turn) once execution resumes. Names exactly the held sagas: an
    /// operator's abort of one takes it out (`forget_held_saga`).
    held: VecDeque<TxnId>,
}

impl SagaSide {
    pub(super) fn new(engine: SagaEngine) -> Self {
        SagaSide {
            engine,
            step_names: HashMap::new(),
            accept_waiters: HashMap::new(),
            terminal_waiters: HashMap::new(),
            watchers: HashMap::new(),
            histories: HashMap::new(),
            finished_histories: HashMap::new(),
            finished_order: VecDeque::new(),
            unwritten_progress: HashMap::new(),
            checkpoint_due_ms: None,
            view_read: None,
            held: VecDeque::new(),
        }
    }

    /// Ready when execution is not held and held sagas wait to be released; never otherwise.
    pub(super) fn release_due(&self) -> impl std::future::Future<Output = ()> {
        let due = !self.engine.holds() && !self.held.is_empty();
        async move {
            if !due {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(super) fn shut_down(&mut self) {
        for (_, waiters) in self.accept_waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(CoordinatorError::ShuttingDown));
            }
        }
        for (_, waiters) in self.terminal_waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(CoordinatorError::ShuttingDown));
            }
        }
        self.watchers.clear();
    }

    fn view_in_flight(&self, saga: &TxnId) -> Option<SagaView> {
        let status = self.engine.status(saga)?;
        Some(self.view_with(saga, status))
    }

    /// The view of a saga the runtime knows the step names of (in the engine, or finishing
    /// in the step being applied) in `status`.
    fn view_with(&self, saga: &TxnId, status: SagaStatus) -> SagaView {
        let step_names = self
            .step_names
            .get(saga)
            .cloned()
            .unwrap_or_else(|| panic!("{saga}: a saga in flight without its step names"));
        SagaView {
            saga: saga.clone(),
            step_names,
            status,
        }
    }

    fn remember_finished_history(&mut self, saga: TxnId, history: Vec<SagaChange>) {
        if self.finished_order.len() >= FINISHED_HISTORIES_MAX {
            if let Some(oldest) = self.finished_order.pop_front() {
                self.finished_histories.remove(&oldest);
            }
        }
        self.finished_order.push_back(saga.clone());
        self.finished_histories.insert(saga, history);
    }
}

fn step_names(spec: &SagaSpec) -> Vec<String> {
    spec.steps.iter().map(|step| step.name.clone()).collect()
}

/// A stored saga's view (one the engine has dropped).
pub(super) fn view_of_stored(saga: &TxnId, stored: &StoredSaga) -> SagaView {
    let accepted_ms = stored.spec.accepted_ms;
    let status = match &stored.progress {
        Some(progress) => progress.status(accepted_ms),
        // Accepted, nothing done yet (only seen before recovery has handed it to the engine).
        None => SagaStatus {
            phase: SagaPhase::Running,
            outcome: None,
            steps: stored
                .spec
                .spec
                .steps
                .iter()
                .map(|_| StepStatus {
                    phase: StepPhase::Pending,
                    action_attempts: 0,
                    compensation_attempts: 0,
                    last_error: None,
                })
                .collect(),
            stuck: false,
            callback_delivered: false,
            accepted_ms,
            held: false,
        },
    };
    SagaView {
        saga: saga.clone(),
        step_names: step_names(&stored.spec.spec),
        status,
    }
}

impl Runtime {
    /// Hands every saga in the log that is not finished to the engine. Returns how many.
    pub(super) fn recover_sagas(&mut self) -> Result<usize, CoordinatorError> {
        let now = unix_now_ms();
        let mut recovered = 0;
        for (saga, stored) in self.log.scan_sagas()? {
            if stored
                .progress
                .as_ref()
                .is_some_and(|p| p.is_finished(&stored.spec.spec))
            {
                continue;
            }
            let span = tracing::info_span!("recover_saga", saga = %saga);
            let _enter = span.enter();
            tracing::info!("resuming saga");
            self.observed.insert(saga.clone(), Observed::recovered());
            self.metrics.recovered(Kind::Saga);
            if stored.progress.as_ref().is_some_and(|p| p.stuck) {
                self.stuck.insert(saga.clone());
                self.metrics.set_sagas_stuck(self.stuck.len());
            }
            self.sagas
                .step_names
                .insert(saga.clone(), step_names(&stored.spec.spec));
            let StoredSaga { spec, progress } = stored;
            let saga_id = saga.clone();
            let effects = self.sagas.engine.step(
                now,
                SagaEvent::Recovered {
                    saga,
                    spec: spec.spec,
                    fingerprint: spec.fingerprint,
                    accepted_ms: spec.accepted_ms,
                    progress,
                },
            );
            self.apply_saga(effects);
            self.note_if_held(&saga_id);
            recovered += 1;
        }
        Ok(recovered)
    }

    /// Whether `id` names a saga (in flight or in the log).
    pub(super) fn saga_exists(&self, id: &TxnId) -> Result<bool, CoordinatorError> {
        // `fingerprint` is a lookup; `status` would build a whole snapshot on the 2PC hot path.
        Ok(self.sagas.engine.fingerprint(id).is_some() || self.log.get_saga(id)?.is_some())
    }

    pub(super) fn saga_view(&self, saga: &TxnId) -> Result<Option<SagaView>, CoordinatorError> {
        if let Some(view) = self.sagas.view_in_flight(saga) {
            return Ok(Some(view));
        }
        Ok(self
            .log
            .get_saga(saga)?
            .map(|stored| view_of_stored(saga, &stored)))
    }

    pub(super) fn on_saga_command(&mut self, command: SagaCommand) {
        match command {
            SagaCommand::SubmitBatch { items } => {
                for (request, reply) in items {
                    self.on_submit_saga(request, reply);
                }
            }
            SagaCommand::Get { saga, reply } => {
                let _ = reply.send(self.saga_view(&saga));
            }
            SagaCommand::Wait { saga, reply } => {
                // Most waits are for sagas still running: those are parked without making a
                // view (every saga has one wait, through the clients' wait streams).
                if self.sagas.engine.outcome_durable(&saga) != Some(false) {
                    match self.saga_view(&saga) {
                        Ok(Some(view))
                            if !(view.status.phase.is_terminal()
                                && view.status.outcome.is_some()) => {}
                        answer => {
                            let _ = reply.send(answer);
                            return;
                        }
                    }
                }
                let waiters = self.sagas.terminal_waiters.entry(saga).or_default();
                // Waiters that timed out leave closed senders behind; drop them here.
                waiters.retain(|w| !w.is_closed());
                waiters.push(reply);
            }
            SagaCommand::Watch { saga, reply } => {
                let _ = reply.send(self.on_watch(saga));
            }
        }
    }

    fn on_submit_saga(&mut self, request: SubmitSagaRequest, reply: SubmitReply) {
        let saga = request.saga.clone();
        let exists = |saga: &TxnId| CoordinatorError::AlreadyExists {
            txn: saga.to_string(),
        };
        // A retry of a saga in flight: answered once it is accepted.
        if let Some(fingerprint) = self.sagas.engine.fingerprint(&saga) {
            if *fingerprint != request.fingerprint {
                let _ = reply.send(Err(exists(&saga)));
            } else if let Some(waiters) = self.sagas.accept_waiters.get_mut(&saga) {
                waiters.push(reply);
            } else {
                let _ = reply.send(Ok(saga));
            }
            return;
        }
        let known = (|| -> Result<Option<Fingerprint>, CoordinatorError> {
            if self.engine.lookup(&saga).is_some() || self.log.get(&saga)?.is_some() {
                return Err(exists(&saga)); // the id names a 2PC transaction
            }
            Ok(self
                .log
                .get_saga(&saga)?
                .map(|stored| stored.spec.fingerprint))
        })();
        match known {
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
            Ok(Some(fingerprint)) => {
                let answer = if fingerprint == request.fingerprint {
                    Ok(saga)
                } else {
                    Err(exists(&saga))
                };
                let _ = reply.send(answer);
                return;
            }
            Ok(None) => {}
        }
        // The log was read above: an id too old to start may name a forgotten saga.
        if let Err(e) = super::retention::check_id_fresh(&saga, &self.config, unix_now_ms()) {
            let _ = reply.send(Err(e));
            return;
        }
        let in_flight = self.sagas.engine.in_flight();
        if in_flight >= self.config.saga_in_flight_max {
            let _ = reply.send(Err(CoordinatorError::Overloaded {
                what: "sagas in flight",
                count: in_flight,
                limit: self.config.saga_in_flight_max,
                retry_after_ms: self.config.overload_retry_after_ms,
            }));
            return;
        }
        self.sagas
            .step_names
            .insert(saga.clone(), step_names(&request.spec));
        self.sagas.accept_waiters.insert(saga.clone(), vec![reply]);
        self.observed
            .insert(saga.clone(), Observed::started(request.trace));
        self.metrics.started(Kind::Saga);
        let span = self.txn_span(&saga, true);
        let _enter = span.enter();
        let effects = self.sagas.engine.step(
            unix_now_ms(),
            SagaEvent::Submit {
                saga,
                spec: request.spec,
                fingerprint: request.fingerprint,
            },
        );
        self.apply_saga(effects);
    }

    fn on_watch(
        &mut self,
        saga: TxnId,
    ) -> Result<Option<mpsc::Receiver<WatchItem>>, CoordinatorError> {
        if let Some(history) = self.sagas.histories.get(&saga) {
            let (sender, receiver) = mpsc::channel(history.len() + WATCH_BUFFER_CHANGES);
            let mut finished = false;
            for change in history {
                finished = change.kind == ChangeKind::Finished;
                let item = WatchItem {
                    change: change.clone(),
                    finished: None,
                };
                sender.try_send(item).expect("the buffer holds the history");
            }
            if finished {
                // Terminal, its callback still being delivered: the stream is complete.
                return Ok(Some(self.finish_watch_stream(saga, receiver)?));
            }
            self.sagas.watchers.entry(saga).or_default().push(sender);
            return Ok(Some(receiver));
        }
        let Some(view) = self.saga_view(&saga)? else {
            return Ok(None);
        };
        let history = self
            .sagas
            .finished_histories
            .get(&saga)
            .cloned()
            .unwrap_or_else(|| {
                // Finished before this process started: only the final state is known.
                vec![SagaChange {
                    seq: 1,
                    at_ms: unix_now_ms(),
                    kind: ChangeKind::Finished,
                    step: None,
                    attempt: 0,
                    detail: String::new(),
                    outcome: view.status.outcome.clone(),
                }]
            });
        let (sender, receiver) = mpsc::channel(history.len());
        let last = history.len() - 1;
        for (i, change) in history.into_iter().enumerate() {
            let finished = (i == last).then(|| view.clone());
            let _ = sender.try_send(WatchItem { change, finished });
        }
        Ok(Some(receiver))
    }

    /// Re-sends a complete in-memory history with the final state on its FINISHED change.
    fn finish_watch_stream(
        &self,
        saga: TxnId,
        mut partial: mpsc::Receiver<WatchItem>,
    ) -> Result<mpsc::Receiver<WatchItem>, CoordinatorError> {
        let view = self.saga_view(&saga)?;
        let mut items = Vec::new();
        while let Ok(item) = partial.try_recv() {
            items.push(item);
        }
        let (sender, receiver) = mpsc::channel(items.len().max(1));
        for mut item in items {
            if item.change.kind == ChangeKind::Finished {
                item.finished = view.clone();
            }
            let _ = sender.try_send(item);
        }
        Ok(receiver)
    }

    pub(super) fn on_saga_event(&mut self, event: SagaEvent) {
        let span = self.txn_span(event.saga(), true);
        let _enter = span.enter();
        // Only while holding can an acceptance leave the saga held (see `note_if_held`).
        let accepted = match &event {
            SagaEvent::Accepted { saga } if self.sagas.engine.holds() => Some(saga.clone()),
            _ => None,
        };
        if matches!(
            event,
            SagaEvent::ActionAnswered {
                answer: ActionAnswer::Succeeded,
                ..
            }
        ) {
            crash_point("coordinator.before_step_recorded");
        }
        let compensated = matches!(
            event,
            SagaEvent::CompensationAnswered { answer: Ok(()), .. }
        );
        let retry = match &event {
            SagaEvent::TimerFired { timer, .. } => Some(match timer {
                SagaTimer::RetryAction { .. } => Retry::Action,
                SagaTimer::RetryCompensation { .. } => Retry::Compensation,
                SagaTimer::RetryCallback { .. } => Retry::Callback,
            }),
            _ => None,
        };
        let effects = self.sagas.engine.step(unix_now_ms(), event);
        if let Some(retry) = retry {
            for effect in &effects {
                if matches!(
                    effect,
                    SagaEffect::SendAction { .. }
                        | SagaEffect::SendCompensation { .. }
                        | SagaEffect::SendCallback { .. }
                ) {
                    self.metrics.retried(retry);
                }
            }
        }
        self.apply_saga(effects);
        if let Some(saga) = accepted {
            self.note_if_held(&saga);
        }
        if compensated {
            crash_point("coordinator.during_compensation");
        }
    }

    /// Queues `saga` for release if the engine holds it (it was just accepted or recovered,
    /// so it can be held only if the engine holds execution now).
    fn note_if_held(&mut self, saga: &TxnId) {
        if self.sagas.engine.holds() && self.sagas.engine.is_held(saga) {
            self.sagas.held.push_back(saga.clone());
            self.metrics.set_sagas_held(self.sagas.held.len());
        }
    }

    /// Holds (`true`) or resumes (`false`) the execution of sagas. Holding: sagas accepted
    /// from now on are answered but start no step; sagas already running go on. Resuming:
    /// every held saga is released, oldest first, a batch per loop turn that has nothing
    /// else to do (so that clients are answered first). Returns how many sagas are held (not
    /// yet released) now.
    pub(super) fn set_saga_hold(&mut self, hold: bool) -> usize {
        if hold != self.sagas.engine.holds() {
            tracing::info!(
                hold,
                held = self.sagas.held.len(),
                "saga execution {}",
                if hold { "held" } else { "resumed" }
            );
        }
        self.sagas.engine.set_hold(hold);
        debug_assert!(
            self.sagas.held.iter().all(|s| self.sagas.engine.is_held(s)),
            "the release queue names a saga that is not held"
        );
        self.sagas.held.len()
    }

    /// Takes `saga` out of the release queue: an operator ended it while it was held. A
    /// linear search, paid only by that operator action, keeps the queue (and the
    /// `tandem_sagas_held` gauge read from it) exact.
    pub(super) fn forget_held_saga(&mut self, saga: &TxnId) {
        if let Some(at) = self.sagas.held.iter().position(|s| s == saga) {
            self.sagas.held.remove(at);
            self.metrics.set_sagas_held(self.sagas.held.len());
        }
    }

    /// Releases up to `max` held sagas, oldest first.
    pub(super) fn release_held_sagas(&mut self, max: usize) {
        debug_assert!(
            !self.sagas.engine.holds(),
            "releasing while execution is held"
        );
        for _ in 0..max {
            let Some(saga) = self.sagas.held.pop_front() else {
                break;
            };
            self.on_saga_event(SagaEvent::Release { saga });
        }
        self.metrics.set_sagas_held(self.sagas.held.len());
    }

    pub(super) fn apply_saga(&mut self, effects: Vec<SagaEffect>) {
        self.apply_saga_effects(effects);
        self.sagas.view_read = None;
    }

    /// The view of `saga` for an effect of the step being applied, made once per step
    /// ([`Runtime::saga_view`]: from the engine, or, for a saga it has let go, from the log;
    /// nothing changes either while a step's effects are applied).
    fn view_for_effect(&mut self, saga: &TxnId) -> Option<SagaView> {
        if let Some(view) = self.sagas.view_read.as_ref().filter(|v| v.saga == *saga) {
            return Some(view.clone());
        }
        let view = match self.saga_view(saga) {
            Ok(view) => view,
            Err(e) => fatal("reading a saga from the log failed", &e),
        };
        self.sagas.view_read.clone_from(&view);
        view
    }

    fn apply_saga_effects(&mut self, effects: Vec<SagaEffect>) {
        // Writes first (in the order emitted), then everything else: anyone who reads the log
        // after this step (a view of a saga the engine has let go, the retention task) must
        // see this step's progress. Writing progress before sending is safe: a crash in
        // between only re-sends, which the participants' barrier absorbs.
        let (writes, others): (Vec<_>, Vec<_>) = effects.into_iter().partition(|effect| {
            matches!(
                effect,
                SagaEffect::PersistSpec { .. }
                    | SagaEffect::PersistOutcome { .. }
                    | SagaEffect::PersistProgress { .. }
            )
        });
        // A saga that became terminal in this step brings its view along: the engine may
        // already have let it go, and the Notify, callback and waiters of this step need it.
        if let Some(view) = others.iter().find_map(|effect| match effect {
            SagaEffect::Terminal { saga, status, .. } => {
                Some(self.sagas.view_with(saga, status.clone()))
            }
            _ => None,
        }) {
            self.sagas.view_read = Some(view);
        }
        for effect in writes.into_iter().chain(others) {
            match effect {
                SagaEffect::PersistSpec {
                    saga,
                    spec,
                    fingerprint,
                    accepted_ms,
                } => {
                    let record = SagaSpecRecord {
                        spec,
                        fingerprint,
                        accepted_ms,
                    };
                    if let Err(e) = self.log.put_saga_spec(&saga, &record) {
                        fatal("writing a saga to the log failed", &e);
                    }
                    let events = self.events_tx.clone();
                    self.after_flush("forcing an accepted saga to disk failed", move || {
                        crash_point("coordinator.after_saga_accepted");
                        let _ = events.send(LoopEvent::Saga(SagaEvent::Accepted { saga }));
                    });
                }
                SagaEffect::PersistOutcome { saga, progress } => {
                    // The outcome carries the whole progress: nothing older may follow it.
                    self.sagas.unwritten_progress.remove(&saga);
                    if let Err(e) = self.log.put_saga_progress(&saga, &progress) {
                        fatal("writing a saga's outcome to the log failed", &e);
                    }
                    let events = self.events_tx.clone();
                    self.after_flush("forcing a saga's outcome to disk failed", move || {
                        let _ = events.send(LoopEvent::Saga(SagaEvent::OutcomeDurable { saga }));
                    });
                }
                SagaEffect::PersistProgress { saga, progress } => {
                    if self.sagas.engine.fingerprint(&saga).is_some() {
                        self.defer_progress(saga, progress);
                    } else {
                        // The engine has let the saga go: from now on views and the retention
                        // task read the log, so its last progress is written at once.
                        self.sagas.unwritten_progress.remove(&saga);
                        if let Err(e) = self.log.put_saga_progress(&saga, &progress) {
                            fatal("writing a saga's progress to the log failed", &e);
                        }
                    }
                }
                SagaEffect::SendAction {
                    saga,
                    step,
                    attempt,
                    target,
                    payload,
                    timeout_ms,
                } => {
                    let call = StepCall {
                        saga: saga.clone(),
                        step,
                        step_name: self.step_name(&saga, step),
                        target,
                        payload,
                        timeout: std::time::Duration::from_millis(timeout_ms),
                        trace: self.child_trace(&saga),
                    };
                    let span = tracing::debug_span!("act", saga = %saga, step, attempt);
                    self.report(span, self.transport.act(call), move |answer| {
                        let answer = answer.unwrap_or_else(|e| {
                            tracing::debug!(error = %e.0, "action got no answer; will retry");
                            ActionAnswer::Unavailable { error: e.0 }
                        });
                        LoopEvent::Saga(SagaEvent::ActionAnswered {
                            saga,
                            step,
                            attempt,
                            answer,
                        })
                    });
                }
                SagaEffect::SendCompensation {
                    saga,
                    step,
                    attempt,
                    target,
                    payload,
                } => {
                    let call = StepCall {
                        saga: saga.clone(),
                        step,
                        step_name: self.step_name(&saga, step),
                        target,
                        payload,
                        timeout: self.config.decision_call_timeout(),
                        trace: self.child_trace(&saga),
                    };
                    let span = tracing::debug_span!("compensate", saga = %saga, step, attempt);
                    self.report(span, self.transport.compensate(call), move |answer| {
                        LoopEvent::Saga(SagaEvent::CompensationAnswered {
                            saga,
                            step,
                            attempt,
                            answer: answer.map_err(|e| e.0),
                        })
                    });
                }
                SagaEffect::SendCallback {
                    saga,
                    attempt,
                    target,
                    ..
                } => {
                    let view = self.view_for_effect(&saga).unwrap_or_else(|| {
                        panic!("{saga}: callback of a saga that does not exist")
                    });
                    let call = CallbackCall {
                        saga: saga.clone(),
                        target,
                        state: view,
                        timeout: self.config.decision_call_timeout(),
                        trace: self.child_trace(&saga),
                    };
                    let span = tracing::debug_span!("callback", saga = %saga);
                    self.report(span, self.transport.saga_finished(call), move |answer| {
                        LoopEvent::Saga(SagaEvent::CallbackAnswered {
                            saga,
                            attempt,
                            answer: answer.map_err(|e| e.0),
                        })
                    });
                }
                SagaEffect::SetTimer { saga, timer, at_ms } => {
                    self.set_timer(at_ms, TimerEntry::Saga(saga, timer));
                }
                SagaEffect::ReplyAccepted { saga } => {
                    tracing::debug!(saga = %saga, "saga accepted");
                    for waiter in self.sagas.accept_waiters.remove(&saga).unwrap_or_default() {
                        let _ = waiter.send(Ok(saga.clone()));
                    }
                }
                SagaEffect::Notify { saga, change } => self.notify(saga, change),
                SagaEffect::Terminal { saga, outcome, .. } => {
                    tracing::debug!(saga = %saga, ?outcome, "saga terminal");
                    let finished = match outcome {
                        SagaOutcome::Completed => Finished::SagaCompleted,
                        SagaOutcome::Compensated { .. } => Finished::SagaCompensated,
                        SagaOutcome::Aborted { .. } => Finished::SagaAborted,
                    };
                    self.metrics.finished(finished, self.age(&saga));
                    // The view came with this effect (see above), even if the engine has
                    // dropped the saga in this very step.
                    let view = self.view_for_effect(&saga);
                    assert!(view.is_some(), "{saga} terminal without a view");
                    for waiter in self
                        .sagas
                        .terminal_waiters
                        .remove(&saga)
                        .unwrap_or_default()
                    {
                        let _ = waiter.send(Ok(view.clone()));
                    }
                }
                SagaEffect::Finished { saga } => {
                    tracing::debug!(saga = %saga, "saga finished");
                    self.observed.remove(&saga);
                    if self.stuck.remove(&saga) {
                        self.metrics.set_sagas_stuck(self.stuck.len());
                    }
                    self.sagas.step_names.remove(&saga);
                    self.sagas.watchers.remove(&saga);
                    let history = self.sagas.histories.remove(&saga).unwrap_or_default();
                    self.sagas.remember_finished_history(saga, history);
                }
            }
        }
    }

    /// Keeps `progress` as the saga's latest, for the next checkpoint.
    fn defer_progress(&mut self, saga: TxnId, progress: SagaProgress) {
        self.sagas.unwritten_progress.insert(saga, progress);
        if self.sagas.checkpoint_due_ms.is_none() {
            self.sagas.checkpoint_due_ms = Some(unix_now_ms() + PROGRESS_CHECKPOINT_MS);
        }
    }

    /// Writes the progress of every running saga that changed since the last checkpoint
    /// (lazily, as progress always is: the next flush makes it durable).
    pub(super) fn checkpoint_progress(&mut self) {
        self.sagas.checkpoint_due_ms = None;
        for (saga, progress) in self.sagas.unwritten_progress.drain() {
            if let Err(e) = self.log.put_saga_progress(&saga, &progress) {
                fatal("writing a saga's progress to the log failed", &e);
            }
        }
    }

    fn step_name(&self, saga: &TxnId, step: u32) -> String {
        self.sagas
            .step_names
            .get(saga)
            .and_then(|names| names.get(step as usize))
            .cloned()
            .unwrap_or_else(|| panic!("{saga}: step {step} has no name"))
    }

    fn notify(&mut self, saga: TxnId, change: SagaChange) {
        self.history_of_change(&saga, &change);
        let finished = change.kind == ChangeKind::Finished;
        // Stuck is set by a STUCK change and cleared by the next compensation that succeeds.
        let stuck_changed = match change.kind {
            ChangeKind::Stuck => self.stuck.insert(saga.clone()),
            ChangeKind::StepCompensated | ChangeKind::Finished => self.stuck.remove(&saga),
            ChangeKind::Accepted
            | ChangeKind::StepStarted
            | ChangeKind::StepSucceeded
            | ChangeKind::StepFailed
            | ChangeKind::StepRetried
            | ChangeKind::CompensationStarted
            | ChangeKind::CompensationRetried => false,
        };
        if stuck_changed {
            self.metrics.set_sagas_stuck(self.stuck.len());
        }
        let history = self.sagas.histories.entry(saga.clone()).or_default();
        let retry = matches!(
            change.kind,
            ChangeKind::StepRetried | ChangeKind::CompensationRetried
        );
        if history.len() < HISTORY_CHANGES_MAX || !retry {
            history.push(change.clone());
        }
        let view = if finished {
            self.view_for_effect(&saga)
        } else {
            None
        };
        if let Some(watchers) = self.sagas.watchers.get_mut(&saga) {
            watchers.retain(|watcher| {
                let item = WatchItem {
                    change: change.clone(),
                    finished: view.clone(),
                };
                // A watcher that fell too far behind is dropped; its stream ends early.
                watcher.try_send(item).is_ok()
            });
        }
        if finished {
            self.sagas.watchers.remove(&saga);
        }
    }
}
