//! The operator's commands in the runtime: list, show, retry and abort transactions and sagas,
//! and the history of state changes kept in the log for them.
//!
//! Every command runs in the runtime's task like any other, so it sees the engines' current
//! state (a transaction in flight is described by its engine, one that is finished by its
//! record) and acts through the engines' own events: [`Event::OperatorAbort`] and
//! [`Event::OperatorRetry`] for 2PC, [`SagaEvent::OperatorAbort`] and
//! [`SagaEvent::OperatorRetry`] for sagas. Nothing here writes a protocol record itself.
//!
//! Refusals are [`CoordinatorError::OperatorRefused`] (FAILED_PRECONDITION at the edge) and
//! name what stands: an abort of a transaction whose outcome is decided, a retry of one that
//! is finished or undecided.
//!
//! History: each state change is appended to the log's history (lazily, as progress is) when
//! it happens: for 2PC the prepare round starting, a NO vote, a prepare or delivery that
//! failed, the decision and the end; for sagas every change watchers see; for both the
//! operator's own requests. `show` reads it back, so it works after a restart too.
//!
//! Known limitation: `list` scans the whole log in the runtime's task, which delays other
//! work while it runs; the log's retention keeps that scan short.

use tandem_common::{unix_now_ms, BranchIdx, TxnId};
use tokio::sync::oneshot;

use super::{status_of_record, Command, CoordinatorHandle, Runtime, SagaView};
use crate::engine::saga::{SagaChange, SagaEffect, SagaEvent, SagaOutcome, SagaPhase, StepPhase};
use crate::engine::types::{BranchPhase, BranchTarget, Decision, Outcome, TxnPhase, TxnStatus};
use crate::engine::{Effect, Event};
use crate::error::CoordinatorError;
use crate::log::record::{History, HistoryEntry, HistoryKind, TxnRecord};

/// Most entries one `list` page may ask for.
pub const LIST_LIMIT_MAX: usize = 1_000;
/// Entries of a `list` page when the caller names no limit.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// Longest reason an operator may give for an abort, in bytes.
pub const ABORT_REASON_BYTES_MAX: usize = 256;

/// Two-phase commit or saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnKind {
    TwoPhase,
    Saga,
}

/// Where a transaction or saga is, one vocabulary for both kinds (see the contract's
/// `TxnState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    Preparing,
    Committing,
    Aborting,
    Committed,
    Aborted,
    Running,
    Compensating,
    Completed,
    Compensated,
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnSummary {
    pub id: TxnId,
    pub kind: TxnKind,
    pub state: TxnState,
    /// 2PC: the time in its id; saga: when it was accepted.
    pub created_ms: u64,
    /// Branches or steps.
    pub parts: u32,
    pub stuck: bool,
    /// Why it aborted or compensated; empty otherwise.
    pub reason: String,
    /// The engine holds it (not finished).
    pub in_flight: bool,
    /// A saga accepted while execution was held, not yet released.
    pub held: bool,
}

/// What `list` selects. `None` selects everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub state: Option<TxnState>,
    pub kind: Option<TxnKind>,
    /// Only those created before this time (ms since the epoch).
    pub created_before_ms: Option<u64>,
    /// Only ids after this one (the previous page's last).
    pub after: Option<TxnId>,
    /// At most this many, 1..=[`LIST_LIMIT_MAX`].
    pub limit: usize,
}

/// One page of `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub items: Vec<TxnSummary>,
    /// The last id of this page if more may follow.
    pub next: Option<TxnId>,
}

/// The phase of a branch or a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartPhase {
    Branch(BranchPhase),
    Step(StepPhase),
}

/// One branch or step of `show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartDetail {
    pub index: u32,
    /// The step's name, or `branch #i`.
    pub name: String,
    pub target: BranchTarget,
    pub phase: PartPhase,
    /// 2PC: sends of the current request; saga: action calls.
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
}

/// What `show` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnDetail {
    pub summary: TxnSummary,
    pub parts: Vec<PartDetail>,
    pub history: History,
}

/// What `retry` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryAnswer {
    /// Calls sent now.
    pub retried: u32,
    pub detail: String,
}

/// What `abort` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortAnswer {
    /// `Aborting` (2PC, durable) or `Compensating` (saga).
    pub state: TxnState,
    pub detail: String,
}

type Reply<T> = oneshot::Sender<Result<T, CoordinatorError>>;

/// An abort's answer: at once, or (2PC) once the abort decision is durable.
pub(super) enum AbortReply {
    Now(AbortAnswer),
    WhenDurable(oneshot::Receiver<Result<Outcome, CoordinatorError>>),
}

pub(super) enum AdminCommand {
    List {
        filter: ListFilter,
        reply: Reply<ListPage>,
    },
    Show {
        id: TxnId,
        reply: Reply<TxnDetail>,
    },
    Retry {
        id: TxnId,
        reply: Reply<RetryAnswer>,
    },
    Abort {
        id: TxnId,
        reason: String,
        reply: Reply<AbortReply>,
    },
    HoldSagas {
        hold: bool,
        reply: oneshot::Sender<usize>,
    },
}

impl CoordinatorHandle {
    /// A page of the transactions and sagas in the log, in id order.
    pub async fn admin_list(&self, filter: ListFilter) -> Result<ListPage, CoordinatorError> {
        self.call(|reply| Command::Admin(AdminCommand::List { filter, reply }))
            .await?
    }

    /// One transaction or saga in detail, with its history.
    pub async fn admin_show(&self, id: TxnId) -> Result<TxnDetail, CoordinatorError> {
        self.call(|reply| Command::Admin(AdminCommand::Show { id, reply }))
            .await?
    }

    /// Sends now whatever of `id` waits for a retry timer.
    pub async fn admin_retry(&self, id: TxnId) -> Result<RetryAnswer, CoordinatorError> {
        self.call(|reply| Command::Admin(AdminCommand::Retry { id, reply }))
            .await?
    }

    /// Holds (`true`) or resumes (`false`) the execution of sagas; answers how many sagas
    /// are held (accepted, no step started) at that moment. See `Runtime::set_saga_hold`.
    pub async fn admin_hold_sagas(&self, hold: bool) -> Result<usize, CoordinatorError> {
        self.call(|reply| Command::Admin(AdminCommand::HoldSagas { hold, reply }))
            .await
    }

    /// Aborts an undecided 2PC transaction (answered once the abort is durable) or sends a
    /// running saga into compensation.
    pub async fn admin_abort(
        &self,
        id: TxnId,
        reason: String,
    ) -> Result<AbortAnswer, CoordinatorError> {
        let txn = id.clone();
        let answer = self
            .call(|reply| Command::Admin(AdminCommand::Abort { id, reason, reply }))
            .await??;
        match answer {
            AbortReply::Now(answer) => Ok(answer),
            AbortReply::WhenDurable(outcome) => {
                match outcome
                    .await
                    .map_err(|_| CoordinatorError::ShuttingDown)??
                {
                    Outcome::Aborted { reason } => Ok(AbortAnswer {
                        state: TxnState::Aborting,
                        detail: format!(
                            "decided abort (durable); delivering it to the participants: {reason}"
                        ),
                    }),
                    Outcome::Committed => panic!("{txn}: an operator's abort decided commit"),
                }
            }
        }
    }
}

fn refused(id: &TxnId, why: String) -> CoordinatorError {
    CoordinatorError::OperatorRefused {
        id: id.to_string(),
        why,
    }
}

/// The state a 2PC status shows.
fn txn_state(status: &TxnStatus) -> TxnState {
    match (status.phase, &status.decision) {
        (TxnPhase::Preparing | TxnPhase::Deciding, _) | (_, None) => TxnState::Preparing,
        (TxnPhase::Delivering, Some(Decision::Commit)) => TxnState::Committing,
        (TxnPhase::Delivering, Some(Decision::Abort { .. })) => TxnState::Aborting,
        (TxnPhase::Finished, Some(Decision::Commit)) => TxnState::Committed,
        (TxnPhase::Finished, Some(Decision::Abort { .. })) => TxnState::Aborted,
    }
}

fn txn_summary(id: &TxnId, status: &TxnStatus, in_flight: bool) -> TxnSummary {
    TxnSummary {
        id: id.clone(),
        kind: TxnKind::TwoPhase,
        state: txn_state(status),
        created_ms: id.created_ms(),
        parts: status.branches.len() as u32,
        stuck: false,
        reason: match &status.decision {
            Some(Decision::Abort { reason }) => reason.clone(),
            Some(Decision::Commit) | None => String::new(),
        },
        in_flight,
        held: false,
    }
}

/// The state a saga view shows: terminal only once its outcome is durable.
fn saga_state(view: &SagaView) -> TxnState {
    let status = &view.status;
    let durable = status.outcome.is_some();
    match status.phase {
        SagaPhase::Accepting | SagaPhase::Running => TxnState::Running,
        SagaPhase::Completed if durable => TxnState::Completed,
        SagaPhase::Completed => TxnState::Running,
        SagaPhase::Compensating => TxnState::Compensating,
        SagaPhase::Compensated if durable => TxnState::Compensated,
        SagaPhase::Aborted if durable => TxnState::Aborted,
        SagaPhase::Compensated | SagaPhase::Aborted => TxnState::Compensating,
    }
}

fn saga_summary(view: &SagaView, in_flight: bool) -> TxnSummary {
    let status = &view.status;
    TxnSummary {
        id: view.saga.clone(),
        kind: TxnKind::Saga,
        state: saga_state(view),
        created_ms: status.accepted_ms,
        parts: status.steps.len() as u32,
        stuck: status.stuck,
        reason: match &status.outcome {
            Some(outcome @ (SagaOutcome::Compensated { .. } | SagaOutcome::Aborted { .. })) => {
                outcome.to_string()
            }
            Some(SagaOutcome::Completed) | None => String::new(),
        },
        in_flight,
        held: status.held,
    }
}

fn matches(filter: &ListFilter, summary: &TxnSummary) -> bool {
    filter.state.is_none_or(|s| s == summary.state)
        && filter.kind.is_none_or(|k| k == summary.kind)
        && filter
            .created_before_ms
            .is_none_or(|before| summary.created_ms < before)
        && filter
            .after
            .as_ref()
            .is_none_or(|after| summary.id > *after)
}

impl Runtime {
    pub(super) fn on_admin_command(&mut self, command: AdminCommand) {
        match command {
            AdminCommand::List { filter, reply } => {
                let _ = reply.send(self.admin_list(&filter));
            }
            AdminCommand::Show { id, reply } => {
                let _ = reply.send(self.admin_show(&id));
            }
            AdminCommand::Retry { id, reply } => {
                let _ = reply.send(self.admin_retry(&id));
            }
            AdminCommand::Abort { id, reason, reply } => {
                let _ = reply.send(self.admin_abort(&id, reason));
            }
            AdminCommand::HoldSagas { hold, reply } => {
                let _ = reply.send(self.set_saga_hold(hold));
            }
        }
    }

    fn admin_list(&self, filter: &ListFilter) -> Result<ListPage, CoordinatorError> {
        assert!(
            (1..=LIST_LIMIT_MAX).contains(&filter.limit),
            "the edge bounds the limit"
        );
        let mut items = Vec::new();
        let two_phase = match filter.kind {
            Some(TxnKind::Saga) => Vec::new(),
            Some(TxnKind::TwoPhase) | None => self.log.scan()?,
        };
        for (txn, record) in two_phase {
            let summary = match self.engine.status(&txn) {
                Some(status) => txn_summary(&txn, &status, true),
                None => txn_summary(&txn, &status_of_record(record), false),
            };
            if matches(filter, &summary) {
                items.push(summary);
            }
        }
        let sagas = match filter.kind {
            Some(TxnKind::TwoPhase) => Vec::new(),
            Some(TxnKind::Saga) | None => self.log.scan_sagas()?,
        };
        for (saga, stored) in sagas {
            let in_flight = self.sagas.engine.fingerprint(&saga).is_some();
            let view = if in_flight {
                self.saga_view(&saga)?
                    .unwrap_or_else(|| panic!("{saga}: in flight without a view"))
            } else {
                super::sagas::view_of_stored(&saga, &stored)
            };
            let summary = saga_summary(&view, in_flight);
            if matches(filter, &summary) {
                items.push(summary);
            }
        }
        items.sort_by(|a, b| a.id.cmp(&b.id));
        let more = items.len() > filter.limit;
        items.truncate(filter.limit);
        let next = if more {
            items.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(ListPage { items, next })
    }

    fn admin_show(&self, id: &TxnId) -> Result<TxnDetail, CoordinatorError> {
        let history = self.log.history(id)?;
        if let Some(view) = self.saga_view(id)? {
            let in_flight = self.sagas.engine.fingerprint(id).is_some();
            let spec = match self.sagas.engine.spec(id) {
                Some(spec) => spec.clone(),
                None => {
                    self.log
                        .get_saga(id)?
                        .unwrap_or_else(|| panic!("{id}: a saga view without a spec"))
                        .spec
                        .spec
                }
            };
            let parts = view
                .status
                .steps
                .iter()
                .zip(&spec.steps)
                .enumerate()
                .map(|(i, (status, step))| PartDetail {
                    index: i as u32,
                    name: step.name.clone(),
                    target: step.target.clone(),
                    phase: PartPhase::Step(status.phase),
                    attempts: status.action_attempts,
                    compensation_attempts: status.compensation_attempts,
                    last_error: status.last_error.clone(),
                })
                .collect();
            return Ok(TxnDetail {
                summary: saga_summary(&view, in_flight),
                parts,
                history,
            });
        }
        let (status, in_flight) = match self.engine.status(id) {
            Some(status) => (status, true),
            None => match self.log.get(id)? {
                Some(record) => (status_of_record(record), false),
                None => {
                    return Err(CoordinatorError::NotFound {
                        txn: id.to_string(),
                    })
                }
            },
        };
        let parts = status
            .branches
            .iter()
            .enumerate()
            .map(|(i, branch)| {
                let mut part = PartDetail {
                    index: i as u32,
                    name: format!("branch #{i}"),
                    target: branch.target.clone(),
                    phase: PartPhase::Branch(branch.phase.clone()),
                    attempts: branch.attempts,
                    compensation_attempts: 0,
                    last_error: branch.last_error.clone(),
                };
                if !in_flight {
                    // A stored record keeps no counters: the history has the failures.
                    fill_branch_from_history(&mut part, &history);
                }
                part
            })
            .collect();
        Ok(TxnDetail {
            summary: txn_summary(id, &status, in_flight),
            parts,
            history,
        })
    }

    fn admin_retry(&mut self, id: &TxnId) -> Result<RetryAnswer, CoordinatorError> {
        let now = unix_now_ms();
        if let Some(status) = self.engine.status(id) {
            match status.phase {
                TxnPhase::Preparing => {
                    return Err(refused(id, "is not decided yet and prepare is never sent again; abort it (tandem txn abort) or wait for its prepare deadline".into()));
                }
                TxnPhase::Deciding => {
                    return Err(refused(
                        id,
                        "is decided and its decision is being forced to disk; nothing waits for a retry".into(),
                    ));
                }
                TxnPhase::Delivering | TxnPhase::Finished => {}
            }
            let waiting = status
                .branches
                .iter()
                .filter(|b| b.phase != BranchPhase::Acknowledged)
                .count();
            let effects = self
                .engine
                .step(now, Event::OperatorRetry { txn: id.clone() });
            let retried = effects
                .iter()
                .filter(|e| matches!(e, Effect::SendDecision { .. }))
                .count() as u32;
            self.record_operator_retry(id, now, retried);
            self.apply(effects);
            let detail = if retried > 0 {
                format!("sent the decision again to {retried} branch(es) now")
            } else {
                format!("nothing was waiting for a retry: the decision is in flight to {waiting} branch(es)")
            };
            return Ok(RetryAnswer { retried, detail });
        }
        if self.sagas.engine.fingerprint(id).is_some() {
            let effects = self
                .sagas
                .engine
                .step(now, SagaEvent::OperatorRetry { saga: id.clone() });
            let retried = effects
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        SagaEffect::SendAction { .. }
                            | SagaEffect::SendCompensation { .. }
                            | SagaEffect::SendCallback { .. }
                    )
                })
                .count() as u32;
            self.record_operator_retry(id, now, retried);
            self.apply_saga(effects);
            let detail = if retried > 0 {
                format!("sent {retried} call(s) now")
            } else {
                "nothing was waiting for a retry: every call is in flight (or the outcome is being forced to disk)".to_string()
            };
            return Ok(RetryAnswer { retried, detail });
        }
        if let Some(view) = self.saga_view(id)? {
            let summary = saga_summary(&view, false);
            return Err(refused(
                id,
                format!(
                    "is finished ({}); nothing to retry",
                    state_name(summary.state)
                ),
            ));
        }
        match self.log.get(id)? {
            Some(record) => {
                let state = txn_state(&status_of_record(record));
                Err(refused(
                    id,
                    format!("is finished ({}); nothing to retry", state_name(state)),
                ))
            }
            None => Err(CoordinatorError::NotFound {
                txn: id.to_string(),
            }),
        }
    }

    fn admin_abort(&mut self, id: &TxnId, reason: String) -> Result<AbortReply, CoordinatorError> {
        let now = unix_now_ms();
        let reason = if reason.is_empty() {
            "no reason given".to_string()
        } else {
            reason
        };
        if let Some(status) = self.engine.status(id) {
            return match (status.phase, &status.decision) {
                (TxnPhase::Preparing, _) => {
                    let (outcome, receiver) = oneshot::channel();
                    self.waiters.entry(id.clone()).or_default().push(outcome);
                    self.log_history(
                        id,
                        HistoryEntry::new(now, HistoryKind::OperatorAbort, None, 0, reason.clone()),
                    );
                    let effects = self.engine.step(
                        now,
                        Event::OperatorAbort {
                            txn: id.clone(),
                            reason,
                        },
                    );
                    self.apply(effects);
                    Ok(AbortReply::WhenDurable(receiver))
                }
                (TxnPhase::Deciding, _) | (_, None) => Err(refused(
                    id,
                    "is already decided (the decision is being forced to disk); it can no longer be aborted".into(),
                )),
                (TxnPhase::Delivering | TxnPhase::Finished, Some(decision)) => Err(refused(
                    id,
                    format!(
                        "is already decided: {}; delivering the decision to its participants",
                        decision_text(decision)
                    ),
                )),
            };
        }
        if self.sagas.engine.fingerprint(id).is_some() {
            let view = self
                .saga_view(id)?
                .unwrap_or_else(|| panic!("{id}: in flight without a view"));
            return match view.status.phase {
                SagaPhase::Running => {
                    self.log_history(
                        id,
                        HistoryEntry::new(now, HistoryKind::OperatorAbort, None, 0, reason.clone()),
                    );
                    let effects = self.sagas.engine.step(
                        now,
                        SagaEvent::OperatorAbort {
                            saga: id.clone(),
                            reason,
                        },
                    );
                    self.apply_saga(effects);
                    let detail = if view.status.held {
                        self.forget_held_saga(id);
                        "held, no step started: nothing to compensate; the outcome will be ABORTED once the decision is durable"
                    } else {
                        "decided to compensate; every attempted step is compensated, newest first, once the decision is durable; the outcome will be ABORTED"
                    };
                    Ok(AbortReply::Now(AbortAnswer {
                        state: TxnState::Compensating,
                        detail: detail.into(),
                    }))
                }
                SagaPhase::Accepting => Err(refused(
                    id,
                    "is still being accepted (its spec is being forced to disk); try again in a moment".into(),
                )),
                SagaPhase::Compensating => Err(refused(
                    id,
                    match &view.status.outcome {
                        Some(outcome) => format!("is already decided: {outcome}; its compensations are running"),
                        None => "is already decided to compensate; its compensations are about to run".into(),
                    },
                )),
                SagaPhase::Completed | SagaPhase::Compensated | SagaPhase::Aborted => Err(refused(
                    id,
                    match &view.status.outcome {
                        Some(outcome) => format!("is already decided: {outcome}"),
                        None => format!(
                            "is already decided ({}), the outcome being forced to disk",
                            state_name(saga_state(&view))
                        ),
                    },
                )),
            };
        }
        if let Some(view) = self.saga_view(id)? {
            let outcome = view
                .status
                .outcome
                .as_ref()
                .map(|o| o.to_string())
                .unwrap_or_else(|| state_name(saga_state(&view)).to_string());
            return Err(refused(id, format!("is already finished: {outcome}")));
        }
        match self.log.get(id)? {
            Some(record) => {
                let decision = record.decision().unwrap_or_else(|| {
                    panic!("{id}: undecided record in the log but not in flight")
                });
                Err(refused(
                    id,
                    format!("is already finished: {}", decision_text(&decision)),
                ))
            }
            None => Err(CoordinatorError::NotFound {
                txn: id.to_string(),
            }),
        }
    }

    fn record_operator_retry(&mut self, id: &TxnId, now: u64, retried: u32) {
        let detail = format!("{retried} call(s) sent now");
        self.log_history(
            id,
            HistoryEntry::new(now, HistoryKind::OperatorRetry, None, retried, detail),
        );
    }

    /// Appends to the log's history; a failed write stops the process, as any log write.
    pub(super) fn log_history(&self, id: &TxnId, entry: HistoryEntry) {
        if let Err(e) = self.log.append_history(id, &entry) {
            super::fatal("writing a history entry to the log failed", &e);
        }
    }

    /// Records a 2PC record's state change as it is written.
    pub(super) fn history_of_record(&self, txn: &TxnId, record: &TxnRecord) {
        let entry = match record {
            TxnRecord::Preparing {
                branches,
                created_ms,
                ..
            } => HistoryEntry::new(
                *created_ms,
                HistoryKind::Began,
                None,
                0,
                format!("prepare sent to {} branch(es)", branches.len()),
            ),
            TxnRecord::Decided {
                decision,
                decided_ms,
                ..
            } => HistoryEntry::new(
                *decided_ms,
                HistoryKind::Decided,
                None,
                0,
                decision_text(decision),
            ),
            TxnRecord::Finished { finished_ms, .. } => HistoryEntry::new(
                *finished_ms,
                HistoryKind::Finished,
                None,
                0,
                "every branch acknowledged the decision".into(),
            ),
            TxnRecord::PresumedAborted { .. } => return,
        };
        self.log_history(txn, entry);
    }

    /// Records what a participant's answer tells of a 2PC transaction in flight, before the
    /// engine sees it: a NO vote and failed calls (successes are visible in the state).
    pub(super) fn history_of_event(&self, event: &Event) {
        let (txn, kind, branch, detail) = match event {
            Event::Voted {
                txn,
                branch,
                vote: crate::engine::types::Vote::No { reason },
            } => (txn, HistoryKind::VotedNo, *branch, reason),
            Event::PrepareFailed { txn, branch, error } => {
                (txn, HistoryKind::PrepareFailed, *branch, error)
            }
            Event::DeliveryFailed { txn, branch, error } => {
                (txn, HistoryKind::DeliveryFailed, *branch, error)
            }
            _ => return,
        };
        let Some(status) = self.engine.status(txn) else {
            return; // finished: a straggler
        };
        let now = unix_now_ms();
        let BranchIdx(i) = branch;
        let attempt = status.branches.get(i as usize).map_or(0, |b| b.attempts);
        self.log_history(
            txn,
            HistoryEntry::new(now, kind, Some(i), attempt, detail.clone()),
        );
    }

    /// Records a saga's change.
    pub(super) fn history_of_change(&self, saga: &TxnId, change: &SagaChange) {
        self.log_history(
            saga,
            HistoryEntry::new(
                change.at_ms,
                HistoryKind::Saga(change.kind),
                change.step,
                change.attempt,
                change.detail.clone(),
            ),
        );
    }
}

/// A finished branch's attempts and last error, from the failures its history holds.
fn fill_branch_from_history(part: &mut PartDetail, history: &History) {
    let failures: Vec<&HistoryEntry> = history
        .entries
        .iter()
        .filter(|e| e.part == Some(part.index))
        .filter(|e| {
            matches!(
                e.kind,
                HistoryKind::VotedNo | HistoryKind::PrepareFailed | HistoryKind::DeliveryFailed
            )
        })
        .collect();
    if part.last_error.is_none() {
        part.last_error = failures.last().map(|e| e.detail.clone());
    }
    if part.attempts == 0 {
        let deliveries_failed = failures
            .iter()
            .filter(|e| e.kind == HistoryKind::DeliveryFailed)
            .count() as u32;
        part.attempts = deliveries_failed + 1;
    }
}

fn decision_text(decision: &Decision) -> String {
    match decision {
        Decision::Commit => "commit".into(),
        Decision::Abort { reason } => format!("abort: {reason}"),
    }
}

/// The lowercase name of a state, as the CLI shows it.
pub fn state_name(state: TxnState) -> &'static str {
    match state {
        TxnState::Preparing => "preparing",
        TxnState::Committing => "committing",
        TxnState::Aborting => "aborting",
        TxnState::Committed => "committed",
        TxnState::Aborted => "aborted",
        TxnState::Running => "running",
        TxnState::Compensating => "compensating",
        TxnState::Completed => "completed",
        TxnState::Compensated => "compensated",
    }
}
