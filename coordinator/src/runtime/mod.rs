//! The runtime: the one task that owns the [`Engine`] and carries out its effects.
//!
//! Everything that touches the engine goes through this task's channels: gRPC handlers send a
//! command with a reply sender; the tasks it spawns (participant calls, flushes, timers) send
//! their results back as events. The engine therefore never sits behind a lock, and events
//! reach it one at a time, in the order the task receives them.
//!
//! Carrying out effects:
//! - `Persist`: written to the log at once; if forced, a flush is requested and its completion
//!   comes back as `DecisionDurable`. A failed flush stops the process (see
//!   `tandem_common::group_commit` on why a failed fsync cannot be retried).
//! - `SendPrepare` / `SendDecision`: a spawned gRPC call whose answer comes back as an event.
//! - `SetTimer`: an entry in the loop's own timer queue (ordered by due time); the loop
//!   sleeps until the earliest one and feeds `TimerFired`. No task per timer: most timers
//!   (every prepare deadline of a transaction that decided in time) end up stale, and a stale
//!   one then costs only its queue entry.
//! - `Reply`: answers every client waiting on the transaction.
//!
//! Start-up runs recovery before the first command is taken: every record in the log that is
//! not finished is handed to the engine as `Recovered`.
//!
//! Sagas have their own engine ([`SagaEngine`]) driven by the same loop, with the same rules:
//! the forced spec write completes before the submitter hears "accepted", progress is written
//! lazily (in checkpoints), and every effect is carried out here. The saga half lives in [`sagas`].
//!
//! Terminal records leave the log after the configured retention ([`retention`]: a task the
//! runtime starts and stops, working off this loop).
//!
//! Observability: the loop reports to [`Metrics`] (from the configuration) as effects are
//! carried out, and keeps, for each transaction and saga in flight, when it started here and
//! its W3C trace context ([`Observed`], in memory only, never in the log). Every participant
//! call carries a child of that context; every event the loop handles runs in a span naming
//! the transaction (`txn` or `saga`) and its `trace_id`.

mod admin;
pub mod retention;
mod sagas;

pub use admin::{
    state_name, AbortAnswer, ListFilter, ListPage, PartDetail, PartPhase, RetryAnswer, TxnDetail,
    TxnKind, TxnState, TxnSummary, ABORT_REASON_BYTES_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX,
};
pub use sagas::{SagaView, SubmitSagaRequest, WatchItem};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::crash::crash_point;
use tandem_common::{unix_now_ms, TraceContext, TxnId};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::config::CoordinatorConfig;
use crate::engine::saga::{SagaEngine, SagaEngineConfig, SagaEvent, SagaTimer};
use crate::engine::types::{BranchSpec, Decision, Outcome, TxnPhase, TxnStatus};
use crate::engine::{Durability, Effect, Engine, EngineConfig, Event, Timer};
use crate::error::CoordinatorError;
use crate::log::record::{Fingerprint, TxnRecord};
use crate::log::TxnLog;
use crate::metrics::{Finished, Kind, Metrics, Retry};
use crate::transport::{
    CallFuture, DecisionCall, ParticipantTransport, PrepareCall, TransportError,
};

/// How many queued commands or events the loop takes per wake-up.
const LOOP_BATCH_MAX: usize = 256;

type OutcomeReply = oneshot::Sender<Result<Outcome, CoordinatorError>>;

/// A client's request, validated at the edge.
#[derive(Debug)]
pub struct ExecuteRequest {
    pub txn: TxnId,
    pub branches: Vec<BranchSpec>,
    pub fingerprint: Fingerprint,
    pub timeout_ms: u64,
    /// The client's trace context (W3C `traceparent`), if it sent one.
    pub trace: Option<TraceContext>,
}

/// What a participant asking about its branch is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueriedOutcome {
    Committed,
    Aborted,
    Pending,
}

enum Command {
    Execute {
        request: ExecuteRequest,
        reply: OutcomeReply,
    },
    Status {
        txn: TxnId,
        reply: oneshot::Sender<Result<Option<TxnStatus>, CoordinatorError>>,
    },
    QueryOutcome {
        txn: TxnId,
        reply: oneshot::Sender<Result<QueriedOutcome, CoordinatorError>>,
    },
    InFlight {
        reply: oneshot::Sender<usize>,
    },
    Saga(sagas::SagaCommand),
    Admin(admin::AdminCommand),
}

/// What the loop's tasks (participant calls, flushes) report back.
enum LoopEvent {
    TwoPhase(Event),
    Saga(SagaEvent),
}

/// A timer in the loop's queue.
enum TimerEntry {
    TwoPhase(TxnId, Timer),
    Saga(TxnId, SagaTimer),
}

/// What the runtime keeps of a transaction or saga in flight for metrics and tracing.
struct Observed {
    /// When it started in this process; `None` if it was recovered.
    started: Option<Instant>,
    /// Its trace: the client's, or a new one.
    trace: TraceContext,
}

impl Observed {
    fn started(trace: Option<TraceContext>) -> Observed {
        Observed {
            started: Some(Instant::now()),
            trace: trace.unwrap_or_else(TraceContext::new_root),
        }
    }

    fn recovered() -> Observed {
        Observed {
            started: None,
            trace: TraceContext::new_root(),
        }
    }
}

/// The handle gRPC handlers use to talk to the runtime. Cheap to clone.
#[derive(Clone)]
pub struct CoordinatorHandle {
    commands: mpsc::Sender<Command>,
    /// The queue's bound and the retry hint given when it is full.
    queue_max: usize,
    retry_after_ms: u64,
}

impl CoordinatorHandle {
    /// Queues a command for the runtime, or refuses it at once when the queue is full: a
    /// caller that waited instead would hold its request's memory for as long as the
    /// overload lasts, and the client would learn nothing (admission control, protocol.md).
    fn enqueue(&self, command: Command) -> Result<(), CoordinatorError> {
        self.commands
            .try_send(command)
            .map_err(|e| self.refusal(matches!(e, mpsc::error::TrySendError::Full(_))))
    }

    /// Why a command was not queued: the queue is `full`, or the runtime is gone.
    fn refusal(&self, full: bool) -> CoordinatorError {
        if full {
            CoordinatorError::Overloaded {
                what: "queued requests",
                count: self.queue_max,
                limit: self.queue_max,
                retry_after_ms: self.retry_after_ms,
            }
        } else {
            CoordinatorError::ShuttingDown
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(make(reply))?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    /// Runs (or joins, for a retry) a transaction and waits for its durable outcome.
    pub async fn execute(&self, request: ExecuteRequest) -> Result<Outcome, CoordinatorError> {
        self.call(|reply| Command::Execute { request, reply })
            .await?
    }

    /// The status of a transaction, in flight or in the log.
    pub async fn status(&self, txn: TxnId) -> Result<Option<TxnStatus>, CoordinatorError> {
        self.call(|reply| Command::Status { txn, reply }).await?
    }

    /// The outcome as a participant holding a prepared branch may learn it.
    pub async fn query_outcome(&self, txn: TxnId) -> Result<QueriedOutcome, CoordinatorError> {
        self.call(|reply| Command::QueryOutcome { txn, reply })
            .await?
    }

    /// How many transactions and sagas are in flight.
    pub async fn in_flight(&self) -> Result<usize, CoordinatorError> {
        self.call(|reply| Command::InFlight { reply }).await
    }

    /// Accepts a saga (or joins an identical earlier submission) and returns its id once the
    /// saga is durable.
    pub async fn submit_saga(&self, request: SubmitSagaRequest) -> Result<TxnId, CoordinatorError> {
        let mut answers = self.submit_sagas(vec![request]);
        answers.pop().expect("one answer per request").await
    }

    /// Accepts several sagas (a `SubmitSagas` call) as one command, so that the loop takes
    /// them in one turn and one flush covers them all (queued one by one, the loop could wake
    /// between them and answer the call only after two flushes). Returns one future per
    /// request, in order, each answering what [`CoordinatorHandle::submit_saga`] would have.
    pub fn submit_sagas(
        &self,
        requests: Vec<SubmitSagaRequest>,
    ) -> Vec<impl std::future::Future<Output = Result<TxnId, CoordinatorError>>> {
        let mut answers = Vec::with_capacity(requests.len());
        let items = requests
            .into_iter()
            .map(|request| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                (request, reply)
            })
            .collect();
        let command = Command::Saga(sagas::SagaCommand::SubmitBatch { items });
        if let Err(refused) = self.commands.try_send(command) {
            let full = matches!(refused, mpsc::error::TrySendError::Full(_));
            let Command::Saga(sagas::SagaCommand::SubmitBatch { items }) = refused.into_inner()
            else {
                unreachable!("the command sent is the one refused")
            };
            for (_, reply) in items {
                let _ = reply.send(Err(self.refusal(full)));
            }
        }
        answers
            .into_iter()
            .map(|answer| async move { answer.await.map_err(|_| CoordinatorError::ShuttingDown)? })
            .collect()
    }

    /// A saga's current state; `None` if there is no such saga.
    pub async fn get_saga(&self, saga: TxnId) -> Result<Option<SagaView>, CoordinatorError> {
        self.call(|reply| Command::Saga(sagas::SagaCommand::Get { saga, reply }))
            .await?
    }

    /// Waits until the saga is terminal or `timeout` passes, then returns its state.
    pub async fn wait_saga(
        &self,
        saga: TxnId,
        timeout: Duration,
    ) -> Result<Option<SagaView>, CoordinatorError> {
        match tokio::time::timeout(timeout, self.wait_saga_terminal(saga.clone())).await {
            Ok(answer) => answer,
            Err(_elapsed) => self.get_saga(saga).await,
        }
    }

    /// Waits, without a limit, until the saga is terminal and returns its state; `None` if
    /// there is no such saga. Dropping the future stops the wait.
    pub async fn wait_saga_terminal(
        &self,
        saga: TxnId,
    ) -> Result<Option<SagaView>, CoordinatorError> {
        self.call(|reply| Command::Saga(sagas::SagaCommand::Wait { saga, reply }))
            .await?
    }

    /// The saga's changes so far and then as they happen; `None` if there is no such saga.
    pub async fn watch_saga(
        &self,
        saga: TxnId,
    ) -> Result<Option<mpsc::Receiver<WatchItem>>, CoordinatorError> {
        self.call(|reply| Command::Saga(sagas::SagaCommand::Watch { saga, reply }))
            .await?
    }
}

/// The runtime's task, and the means to stop it.
pub struct RuntimeTask {
    task: tokio::task::JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

impl RuntimeTask {
    /// Stops the loop at once, as a crash would (everything it decided is already durable;
    /// what is unfinished resumes at the next start), answers every client still waiting
    /// with [`CoordinatorError::ShuttingDown`], and waits for the task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Starts the runtime: runs recovery, then serves commands until every handle is dropped or
/// [`RuntimeTask::stop`] is called.
pub fn start(
    log: Arc<dyn TxnLog>,
    transport: Arc<dyn ParticipantTransport>,
    config: CoordinatorConfig,
) -> Result<(CoordinatorHandle, RuntimeTask), CoordinatorError> {
    config
        .check_retention()
        .map_err(CoordinatorError::InvalidArgument)?;
    let (commands_tx, commands) = mpsc::channel(config.request_queue_max);
    let (events_tx, events) = mpsc::unbounded_channel();
    let engine = Engine::new(
        EngineConfig {
            redelivery_backoff: config.redelivery_backoff,
        },
        config.rng_seed,
    );
    let mut saga_engine = SagaEngine::new(
        SagaEngineConfig {
            compensation_backoff: config.saga_compensation_backoff,
            stuck_after_failures: config.saga_stuck_after_failures,
            callback_backoff: config.saga_callback_backoff,
        },
        config.rng_seed.wrapping_add(1),
    );
    // Before recovery: a recovered saga that had not started is held too.
    saga_engine.set_hold(config.hold_sagas);
    let config_metrics = config.metrics.clone();
    let mut runtime = Runtime {
        engine,
        log,
        transport,
        config,
        waiters: HashMap::new(),
        timers: BTreeMap::new(),
        timer_seq: 0,
        events_tx,
        sagas: sagas::SagaSide::new(saga_engine),
        retention: None,
        metrics: config_metrics,
        observed: HashMap::new(),
        stuck: HashSet::new(),
        forced: Vec::new(),
    };
    runtime.recover()?;
    runtime.retention = retention::spawn(runtime.log.clone(), &runtime.config);
    let runtime_queue_max = runtime.config.request_queue_max;
    let runtime_retry_after_ms = runtime.config.overload_retry_after_ms;
    let (stop, stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        use futures::FutureExt;
        let run = std::panic::AssertUnwindSafe(runtime.run(commands, events, stop_rx));
        if let Err(panic) = run.catch_unwind().await {
            // A broken invariant: nothing the runtime holds can be trusted any more. Stop, as
            // kill -9 would, and let recovery start from what is on disk.
            let what = tandem_common::group_commit::panic_message(&panic);
            fatal("the runtime stopped on a broken invariant", &what);
        }
    });
    Ok((
        CoordinatorHandle {
            commands: commands_tx,
            queue_max: runtime_queue_max,
            retry_after_ms: runtime_retry_after_ms,
        },
        RuntimeTask { task, stop },
    ))
}

struct Runtime {
    engine: Engine,
    log: Arc<dyn TxnLog>,
    transport: Arc<dyn ParticipantTransport>,
    config: CoordinatorConfig,
    /// Clients waiting for a transaction's outcome (the first caller and any retries).
    waiters: HashMap<TxnId, Vec<OutcomeReply>>,
    /// Timers by (due time in ms since the epoch, sequence number for uniqueness).
    timers: BTreeMap<(u64, u64), TimerEntry>,
    timer_seq: u64,
    events_tx: mpsc::UnboundedSender<LoopEvent>,
    /// The saga engine and the clients waiting on sagas.
    sagas: sagas::SagaSide,
    /// The retention task; it stops when the loop ends and drops this.
    retention: Option<retention::RetentionTask>,
    metrics: Arc<Metrics>,
    /// Start time and trace of every transaction and saga in flight (their ids never collide).
    observed: HashMap<TxnId, Observed>,
    /// Sagas flagged stuck now.
    stuck: HashSet<TxnId>,
    /// What waits for the forced writes of this loop turn to be durable, with what each
    /// write was (see [`Runtime::after_flush`]).
    forced: Vec<(&'static str, AfterFlush)>,
}

/// What runs once a forced write is durable.
type AfterFlush = Box<dyn FnOnce() + Send>;

/// Sleeps until `at_ms` (ms since the epoch); forever if `None`.
async fn sleep_until_ms(at_ms: Option<u64>) {
    match at_ms {
        Some(at_ms) => {
            tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(unix_now_ms()))).await
        }
        None => std::future::pending().await,
    }
}

/// Stops the process: the log can no longer prove what it wrote.
fn fatal(what: &str, error: &dyn std::fmt::Display) -> ! {
    tracing::error!(%error, "{what}; stopping so that recovery starts from what is on disk");
    eprintln!("tandem: fatal: {what}: {error}");
    std::process::abort();
}

impl Runtime {
    fn recover(&mut self) -> Result<(), CoordinatorError> {
        let now = unix_now_ms();
        let mut recovered = 0usize;
        for (txn, record) in self.log.scan()? {
            if record.is_finished() {
                continue;
            }
            let span = tracing::info_span!("recover", txn = %txn);
            let _enter = span.enter();
            tracing::info!(record = ?record, "recovering");
            self.observed.insert(txn.clone(), Observed::recovered());
            self.metrics.recovered(Kind::TwoPc);
            let effects = self.engine.step(now, Event::Recovered { txn, record });
            self.apply(effects);
            recovered += 1;
        }
        let sagas = self.recover_sagas()?;
        tracing::info!(recovered, sagas, "recovery done");
        Ok(())
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<LoopEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut command_batch = Vec::with_capacity(LOOP_BATCH_MAX);
        let mut event_batch = Vec::with_capacity(LOOP_BATCH_MAX);
        loop {
            self.force_turn();
            let next_timer_ms = self.timers.first_key_value().map(|(&(at_ms, _), _)| at_ms);
            let timer_due = sleep_until_ms(next_timer_ms);
            let checkpoint_due = sleep_until_ms(self.sagas.checkpoint_due_ms);
            let release_due = self.sagas.release_due();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                () = timer_due => self.fire_due_timers(),
                () = checkpoint_due => self.checkpoint_progress(),
                n = events.recv_many(&mut event_batch, LOOP_BATCH_MAX) => {
                    debug_assert!(n > 0, "the runtime holds a sender, so events never close");
                    for event in event_batch.drain(..) {
                        match event {
                            LoopEvent::TwoPhase(event) => self.on_event(event),
                            LoopEvent::Saga(event) => self.on_saga_event(event),
                        }
                    }
                }
                n = commands.recv_many(&mut command_batch, LOOP_BATCH_MAX) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    for command in command_batch.drain(..) {
                        self.on_command(command);
                    }
                }
                // Last: released sagas start only in turns that find nothing else to do.
                () = release_due => self.release_held_sagas(LOOP_BATCH_MAX),
            }
            self.metrics
                .set_in_flight(Kind::TwoPc, self.engine.in_flight());
            self.metrics
                .set_in_flight(Kind::Saga, self.sagas.engine.in_flight());
        }
        // Stopping is not a crash: what the sagas did is kept, so a restart re-sends nothing.
        self.checkpoint_progress();
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(CoordinatorError::ShuttingDown));
            }
        }
        self.sagas.shut_down();
    }

    fn fire_due_timers(&mut self) {
        let now = unix_now_ms();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                TimerEntry::TwoPhase(txn, timer) => self.on_event(Event::TimerFired { txn, timer }),
                TimerEntry::Saga(saga, timer) => {
                    self.on_saga_event(SagaEvent::TimerFired { saga, timer })
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        self.history_of_event(&event);
        let span = self.txn_span(event.txn(), false);
        let _enter = span.enter();
        let redelivery = matches!(
            event,
            Event::TimerFired {
                timer: Timer::Redeliver { .. },
                ..
            }
        );
        let effects = self.engine.step(unix_now_ms(), event);
        if redelivery {
            for effect in &effects {
                if matches!(effect, Effect::SendDecision { .. }) {
                    self.metrics.retried(Retry::Decision);
                }
            }
        }
        self.apply(effects);
    }

    /// The span the loop handles an event of `id` in: it names the transaction (`txn`, or
    /// `saga` if `saga`) and its trace. The trace is looked up only if the span is enabled.
    fn txn_span(&self, id: &TxnId, saga: bool) -> tracing::Span {
        let span = if saga {
            tracing::debug_span!("saga_event", saga = %id, trace_id = tracing::field::Empty)
        } else {
            tracing::debug_span!("txn_event", txn = %id, trace_id = tracing::field::Empty)
        };
        if !span.is_disabled() {
            if let Some(observed) = self.observed.get(id) {
                span.record(
                    "trace_id",
                    tracing::field::display(observed.trace.trace_id_hex()),
                );
                crate::otel::link(&span, &observed.trace);
            }
        }
        span
    }

    /// A child of `id`'s trace context, for a participant call.
    fn child_trace(&self, id: &TxnId) -> Option<TraceContext> {
        self.observed.get(id).map(|observed| observed.trace.child())
    }

    /// How long ago `id` started in this process, if it did.
    fn age(&self, id: &TxnId) -> Option<Duration> {
        self.observed
            .get(id)
            .and_then(|observed| observed.started)
            .map(|started| started.elapsed())
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Execute { request, reply } => self.on_execute(request, reply),
            Command::Status { txn, reply } => {
                let status = match self.engine.status(&txn) {
                    Some(status) => Ok(Some(status)),
                    None => self
                        .log
                        .get(&txn)
                        .map(|r| r.map(status_of_record))
                        .map_err(Into::into),
                };
                let _ = reply.send(status);
            }
            Command::QueryOutcome { txn, reply } => {
                let span = self.txn_span(&txn, false);
                let _enter = span.enter();
                let outcome = match self.engine.lookup(&txn) {
                    Some((_, Some(decision))) => Ok(queried(decision)),
                    Some((_, None)) => Ok(QueriedOutcome::Pending),
                    None => match self.log.get(&txn) {
                        Ok(Some(record)) => {
                            Ok(record.decision().map(|d| queried(&d)).unwrap_or_else(|| {
                                panic!("{txn}: undecided record in the log but not in flight")
                            }))
                        }
                        Ok(None) => {
                            self.pin_presumed_abort(txn, reply);
                            return;
                        }
                        Err(e) => Err(e.into()),
                    },
                };
                let _ = reply.send(outcome);
            }
            Command::InFlight { reply } => {
                let _ = reply.send(self.engine.in_flight() + self.sagas.engine.in_flight());
            }
            Command::Saga(command) => self.on_saga_command(command),
            Command::Admin(command) => self.on_admin_command(command),
        }
    }

    fn on_execute(&mut self, request: ExecuteRequest, reply: OutcomeReply) {
        let txn = request.txn.clone();
        // A retry of a transaction in flight joins it.
        if let Some((fingerprint, decision)) = self.engine.lookup(&txn) {
            if *fingerprint != request.fingerprint {
                let _ = reply.send(Err(CoordinatorError::AlreadyExists {
                    txn: txn.to_string(),
                }));
            } else if let Some(decision) = decision {
                let _ = reply.send(Ok(decision.outcome()));
            } else {
                self.waiters.entry(txn).or_default().push(reply);
            }
            return;
        }
        // An id that names a saga cannot name a transaction too.
        match self.saga_exists(&txn) {
            Ok(false) => {}
            Ok(true) => {
                let _ = reply.send(Err(CoordinatorError::AlreadyExists {
                    txn: txn.to_string(),
                }));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        }
        // A retry of a decided transaction gets the recorded outcome.
        match self.log.get(&txn) {
            Ok(Some(record @ TxnRecord::PresumedAborted { .. })) => {
                // The pin may not be durable yet: answer once a flush covers it.
                let outcome = record.decision().map(|d| d.outcome());
                self.after_flush("forcing a presumed abort to disk failed", move || {
                    let _ = reply.send(Ok(outcome.expect("a presumed abort is decided")));
                });
                return;
            }
            Ok(Some(record)) => {
                let answer = if record
                    .fingerprint()
                    .is_some_and(|fingerprint| *fingerprint != request.fingerprint)
                {
                    Err(CoordinatorError::AlreadyExists {
                        txn: txn.to_string(),
                    })
                } else {
                    let decision = record.decision().unwrap_or_else(|| {
                        panic!("{txn}: undecided record in the log but not in flight")
                    });
                    Ok(decision.outcome())
                };
                let _ = reply.send(answer);
                return;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        }
        let in_flight = self.engine.in_flight();
        if in_flight >= self.config.txn_in_flight_max {
            let _ = reply.send(Err(CoordinatorError::Overloaded {
                what: "transactions in flight",
                count: in_flight,
                limit: self.config.txn_in_flight_max,
                retry_after_ms: self.config.overload_retry_after_ms,
            }));
            return;
        }
        let now = unix_now_ms();
        // The log was read above: an id too old to start may name a forgotten transaction.
        if let Err(e) = retention::check_id_fresh(&txn, &self.config, now) {
            let _ = reply.send(Err(e));
            return;
        }
        self.waiters.entry(txn.clone()).or_default().push(reply);
        self.observed
            .insert(txn.clone(), Observed::started(request.trace));
        self.metrics.started(Kind::TwoPc);
        let span = self.txn_span(&txn, false);
        let _enter = span.enter();
        let effects = self.engine.step(
            now,
            Event::Begin {
                txn,
                branches: request.branches,
                fingerprint: request.fingerprint,
                deadline_ms: now + request.timeout_ms,
            },
        );
        self.apply(effects);
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Persist {
                    txn,
                    record,
                    durability,
                } => self.persist(txn, record, durability),
                Effect::SendPrepare {
                    txn,
                    branch,
                    target,
                    payload,
                    deadline_ms,
                } => {
                    let remaining = deadline_ms.saturating_sub(unix_now_ms()).max(1);
                    let call = PrepareCall {
                        txn: txn.clone(),
                        branch,
                        target,
                        payload,
                        coordinator: self.config.advertise.clone(),
                        timeout: Duration::from_millis(remaining),
                        trace: self.child_trace(&txn),
                    };
                    let span = tracing::debug_span!("prepare", txn = %txn, %branch);
                    self.report(span, self.transport.prepare(call), move |answer| {
                        LoopEvent::TwoPhase(match answer {
                            Ok(vote) => Event::Voted { txn, branch, vote },
                            Err(e) => Event::PrepareFailed {
                                txn,
                                branch,
                                error: e.0,
                            },
                        })
                    });
                }
                Effect::SendDecision {
                    txn,
                    branch,
                    target,
                    commit,
                } => {
                    let call = DecisionCall {
                        txn: txn.clone(),
                        branch,
                        target,
                        commit,
                        timeout: self.config.decision_call_timeout(),
                        trace: self.child_trace(&txn),
                    };
                    let span = tracing::debug_span!("deliver", txn = %txn, %branch, commit);
                    self.report(span, self.transport.deliver(call), move |answer| {
                        LoopEvent::TwoPhase(match answer {
                            Ok(()) => Event::Acknowledged { txn, branch },
                            Err(e) => {
                                tracing::debug!(error = %e.0, "decision not acknowledged; will redeliver");
                                Event::DeliveryFailed {
                                    txn,
                                    branch,
                                    error: e.0,
                                }
                            }
                        })
                    });
                }
                Effect::SetTimer { txn, timer, at_ms } => {
                    self.set_timer(at_ms, TimerEntry::TwoPhase(txn, timer));
                }
                Effect::Reply { txn, outcome } => {
                    tracing::debug!(txn = %txn, ?outcome, "outcome durable; replying");
                    let finished = match outcome {
                        Outcome::Committed => Finished::Committed,
                        Outcome::Aborted { .. } => Finished::Aborted,
                    };
                    self.metrics.finished(finished, self.age(&txn));
                    for waiter in self.waiters.remove(&txn).unwrap_or_default() {
                        let _ = waiter.send(Ok(outcome.clone()));
                    }
                }
                Effect::Finished { txn } => {
                    debug_assert!(
                        !self.waiters.contains_key(&txn),
                        "{txn} finished with clients still waiting"
                    );
                    tracing::debug!(txn = %txn, "finished");
                    self.observed.remove(&txn);
                }
            }
        }
    }

    fn persist(&mut self, txn: TxnId, record: TxnRecord, durability: Durability) {
        let deciding = matches!(record, TxnRecord::Decided { .. });
        if deciding {
            crash_point("coordinator.before_decision_persisted");
            if let Some(took) = self.age(&txn) {
                self.metrics.prepare_round(took);
            }
        }
        if let Err(e) = self.log.put(&txn, &record) {
            fatal("writing to the transaction log failed", &e);
        }
        self.history_of_record(&txn, &record);
        match durability {
            Durability::Lazy => {}
            Durability::Forced => {
                debug_assert!(deciding, "only decisions are forced");
                let events = self.events_tx.clone();
                self.after_flush("forcing a decision to disk failed", move || {
                    crash_point("coordinator.after_decision_persisted");
                    let _ = events.send(LoopEvent::TwoPhase(Event::DecisionDurable { txn }));
                });
            }
        }
    }
}

impl Runtime {
    /// Presumed abort for a transaction this coordinator has no record of: the answer is
    /// "aborted", and a record saying so is forced first. Without it, a client retrying the
    /// same id could start the transaction afresh, and a participant's old prepared branch
    /// could vote YES to the new attempt while it applies the abort it was told of.
    fn pin_presumed_abort(
        &mut self,
        txn: TxnId,
        reply: oneshot::Sender<Result<QueriedOutcome, CoordinatorError>>,
    ) {
        let record = TxnRecord::PresumedAborted {
            presumed_ms: unix_now_ms(),
        };
        if let Err(e) = self.log.put(&txn, &record) {
            fatal("writing to the transaction log failed", &e);
        }
        tracing::info!(txn = %txn, "no record of a transaction a participant asked about; presumed aborted");
        self.after_flush("forcing a presumed abort to disk failed", move || {
            let _ = reply.send(Ok(QueriedOutcome::Aborted));
        });
    }

    /// Awaits a participant call on its own task and feeds its answer back to the loop as
    /// the event `to_event` makes of it.
    fn report<T: Send + 'static>(
        &self,
        span: tracing::Span,
        call: CallFuture<T>,
        to_event: impl FnOnce(Result<T, TransportError>) -> LoopEvent + Send + 'static,
    ) {
        let events = self.events_tx.clone();
        tokio::spawn(
            async move {
                let _ = events.send(to_event(call.await));
            }
            .instrument(span),
        );
    }

    /// Runs `then` once everything written to the log so far is durable. A failed flush
    /// stops the process (`what` says which write it was forcing).
    ///
    /// The flush is asked for once per loop turn ([`Runtime::force_turn`]), for every forced
    /// write of the turn: asked for at each write, the flusher thread woke at the first and
    /// flushed it nearly alone, and the rest of the turn's writes waited for one more flush
    /// (each about a millisecond on this machine's disk).
    fn after_flush(&mut self, what: &'static str, then: impl FnOnce() + Send + 'static) {
        self.forced.push((what, Box::new(then)));
    }

    /// Asks for one flush covering every forced write of the turn, and runs what waited for
    /// them once it is done. Called before the loop waits for anything.
    fn force_turn(&mut self) {
        if self.forced.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.forced);
        let flush = self.log.flush();
        tokio::spawn(async move {
            if let Err(e) = flush.await {
                fatal(waiting[0].0, &e);
            }
            for (_, then) in waiting {
                then();
            }
        });
    }

    fn set_timer(&mut self, at_ms: u64, entry: TimerEntry) {
        self.timer_seq += 1;
        self.timers.insert((at_ms, self.timer_seq), entry);
    }
}

fn queried(decision: &Decision) -> QueriedOutcome {
    match decision {
        Decision::Commit => QueriedOutcome::Committed,
        Decision::Abort { .. } => QueriedOutcome::Aborted,
    }
}

/// The status of a transaction that is not in flight, from its stored record.
fn status_of_record(record: TxnRecord) -> TxnStatus {
    use crate::engine::types::{BranchPhase, BranchStatus};
    let status = |branches: &[crate::engine::types::BranchTarget],
                  phases: Option<&[BranchPhase]>| {
        branches
            .iter()
            .enumerate()
            .map(|(i, target)| BranchStatus {
                target: target.clone(),
                phase: phases
                    .map(|p| p[i].clone())
                    .unwrap_or(BranchPhase::Preparing),
                attempts: 0,
                last_error: None,
            })
            .collect()
    };
    match &record {
        TxnRecord::PresumedAborted { .. } => TxnStatus {
            phase: TxnPhase::Finished,
            decision: record.decision(),
            branches: Vec::new(),
        },
        TxnRecord::Preparing { branches, .. } => TxnStatus {
            phase: TxnPhase::Preparing,
            decision: None,
            branches: status(branches, None),
        },
        TxnRecord::Decided {
            decision, branches, ..
        } => TxnStatus {
            phase: TxnPhase::Delivering,
            decision: Some(decision.clone()),
            branches: status(branches, None),
        },
        TxnRecord::Finished {
            decision,
            branches,
            branch_phases,
            ..
        } => TxnStatus {
            phase: TxnPhase::Finished,
            decision: Some(decision.clone()),
            branches: status(branches, Some(branch_phases)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_request_queue_refuses_at_once_with_the_retry_hint_and_a_closed_one_is_shutting_down(
    ) {
        let (commands, mut queue) = mpsc::channel(1);
        let handle = CoordinatorHandle {
            commands,
            queue_max: 1,
            retry_after_ms: 70,
        };
        let in_flight = |reply| Command::InFlight { reply };
        let (first, _first_answer) = oneshot::channel();
        handle
            .enqueue(in_flight(first))
            .expect("the first request fits");
        let (second, _second_answer) = oneshot::channel();
        match handle.enqueue(in_flight(second)) {
            Err(CoordinatorError::Overloaded {
                what,
                count,
                limit,
                retry_after_ms,
            }) => {
                assert_eq!(
                    (what, count, limit, retry_after_ms),
                    ("queued requests", 1, 1, 70)
                );
            }
            other => panic!("a full queue must refuse at once, got {:?}", other.err()),
        }
        queue.close();
        let (third, _third_answer) = oneshot::channel();
        assert!(matches!(
            handle.enqueue(in_flight(third)),
            Err(CoordinatorError::ShuttingDown)
        ));
    }
    fn one_step_saga(n: u64) -> SubmitSagaRequest {
        use crate::engine::saga::{RetryPolicy, SagaSpec, StepSpec};
        use crate::engine::types::BranchTarget;
        SubmitSagaRequest {
            saga: TxnId::parse(&format!("1763850000000-batch{n}")).unwrap(),
            spec: SagaSpec {
                steps: vec![StepSpec {
                    name: "only".into(),
                    target: BranchTarget {
                        participant: "http://127.0.0.1:7000".into(),
                        resource: "accounts".into(),
                    },
                    action: b"do".to_vec(),
                    compensation: b"undo".to_vec(),
                    after: Vec::new(),
                    retry: RetryPolicy {
                        backoff: tandem_common::Backoff::default(),
                        attempts_max: 1,
                        deadline_ms: 0,
                    },
                    timeout_ms: 1_000,
                }],
                callback: None,
            },
            fingerprint: [n as u8; 32],
            trace: None,
        }
    }

    /// A `SubmitSagas` call's sagas reach the loop as one command (one turn, one flush), and a
    /// full queue refuses them all alike, each with the retry hint.
    #[tokio::test]
    async fn a_submission_batch_is_one_command_and_a_full_queue_refuses_all_of_it() {
        let (commands, mut queue) = mpsc::channel(1);
        let handle = CoordinatorHandle {
            commands,
            queue_max: 1,
            retry_after_ms: 70,
        };
        let answers = handle.submit_sagas((0..3).map(one_step_saga).collect());
        let Ok(Command::Saga(sagas::SagaCommand::SubmitBatch { items })) = queue.try_recv() else {
            panic!("the batch is one command");
        };
        assert!(queue.try_recv().is_err(), "and only one");
        let ids: Vec<String> = items.iter().map(|(r, _)| r.saga.to_string()).collect();
        assert_eq!(
            ids,
            [
                "1763850000000-batch0",
                "1763850000000-batch1",
                "1763850000000-batch2"
            ],
            "in the call's order"
        );
        // The loop answers each on its own.
        for (request, reply) in items {
            let _ = reply.send(Ok(request.saga));
        }
        let answered: Vec<String> = futures::future::join_all(answers)
            .await
            .into_iter()
            .map(|a| a.unwrap().to_string())
            .collect();
        assert_eq!(answered, ids);

        // Full: every saga of the next batch is refused at once.
        let (filler, _filler_answer) = oneshot::channel();
        handle.enqueue(Command::InFlight { reply: filler }).unwrap();
        let refused = handle.submit_sagas((3..5).map(one_step_saga).collect());
        for answer in futures::future::join_all(refused).await {
            match answer {
                Err(CoordinatorError::Overloaded { retry_after_ms, .. }) => {
                    assert_eq!(retry_after_ms, 70)
                }
                other => panic!("a full queue refuses every saga of the batch, got {other:?}"),
            }
        }
    }
}
