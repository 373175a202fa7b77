//! The simulated coordinator: the real [`Engine`] and [`SagaEngine`], with the runtime's way
//! of carrying out their effects restated over the simulated log, network and timers.
//!
//! What mirrors `coordinator/src/runtime/{mod.rs,sagas.rs}`, rule for rule:
//! - `Persist` is put in the log at once; a forced one asks for a flush, and
//!   `DecisionDurable` / `Accepted` / `OutcomeDurable` are fed only when that flush completes;
//! - saga effects are applied writes first, in the order emitted, then the rest;
//! - every call to a participant is answered exactly once: by its answer, or by a failure when
//!   its call timeout (the prepare's remaining time, the decision timeout, the step's
//!   `timeout_ms`) passes first; later or duplicate answers are dropped;
//! - `QueryOutcome`: the decision if announced, PENDING if in flight undecided, the logged
//!   decision otherwise, and for an id the log does not know, the presumed-abort pin
//!   (`PresumedAborted` put, answered ABORTED once a flush covers it);
//! - a client's execute joins a transaction in flight, is answered from the log for a
//!   finished one (after a flush for a pinned presumed abort), and begins it otherwise; a saga
//!   submission joins, is answered from the log, or is submitted;
//! - recovery hands every unfinished record to fresh engines as `Recovered`, 2PC first.
//!
//! A crash drops the engines, the pending calls, the flush continuations and the waiting
//! clients, and keeps what the log's crash model keeps.

use std::collections::BTreeMap;

use tandem_common::{Backoff, BranchIdx, TxnId};
use tandem_coordinator::engine::saga::{
    ActionAnswer, SagaEffect, SagaEngine, SagaEngineConfig, SagaEvent, SagaOutcome, SagaSpec,
    SagaTimer,
};
use tandem_coordinator::engine::types::{BranchSpec, Decision, Outcome};
use tandem_coordinator::engine::{Durability, Effect, Engine, EngineConfig, Event, Timer};
use tandem_coordinator::log::record::{Fingerprint, SagaSpecRecord, StoredSaga, TxnRecord};
use tandem_coordinator::runtime::QueriedOutcome;

use super::log::SimLog;
use super::net::{Answer, Msg};

/// The decision and compensation call timeout (the runtime's `decision_call_timeout`).
pub const DECISION_CALL_TIMEOUT_MS: u64 = 1_000;

/// A timer in the runtime's queue.
#[derive(Debug, Clone, PartialEq)]
pub enum TimerEntry {
    TwoPhase(TxnId, Timer),
    Saga(TxnId, SagaTimer),
}

/// What a flush completion releases.
#[derive(Debug, Clone)]
enum AfterFlush {
    DecisionDurable(TxnId),
    Accepted(TxnId),
    OutcomeDurable(TxnId),
    QueryAborted {
        participant: usize,
        txn: TxnId,
        branch: BranchIdx,
    },
    ClientOutcome {
        request: u64,
        outcome: Outcome,
    },
}

/// A call to a participant waiting for its answer.
#[derive(Debug, Clone)]
enum PendingCall {
    Prepare {
        txn: TxnId,
        branch: BranchIdx,
    },
    Decision {
        txn: TxnId,
        branch: BranchIdx,
    },
    Act {
        saga: TxnId,
        step: u32,
        attempt: u32,
    },
    Compensate {
        saga: TxnId,
        step: u32,
        attempt: u32,
    },
}

/// What the coordinator asks the simulator to do.
#[derive(Debug)]
pub enum COut {
    /// Send to a participant; a call (`call` is `Some`) times out after `timeout_ms`.
    Send {
        participant: usize,
        msg: Msg,
        call: Option<(u64, u64)>,
    },
    /// Complete flush `id` after the simulated device latency.
    Flush {
        id: u64,
    },
    SetTimer {
        at_ms: u64,
        entry: TimerEntry,
    },
    /// The answer to a client's execute.
    ClientOutcome {
        request: u64,
        outcome: Outcome,
    },
    /// The answer to a client's saga submission: accepted.
    ClientAccepted {
        request: u64,
    },
    /// The 2PC engine announced an outcome (Reply effect).
    Announced {
        txn: TxnId,
        outcome: Outcome,
    },
    /// The saga engine announced an outcome (Terminal effect).
    SagaTerminal {
        saga: TxnId,
        outcome: SagaOutcome,
    },
    /// A line for the transcript.
    Trace(String),
    /// Something worth counting happened (coverage of the report).
    Count(&'static str),
    /// A broken rule of the runtime (reported as a failure).
    Violation(String),
}

/// The engines' tunables in the simulation (short, so that runs settle in simulated seconds).
pub fn engine_config() -> (EngineConfig, SagaEngineConfig) {
    let backoff = Backoff {
        initial_ms: 20,
        multiplier: 2.0,
        max_ms: 1_000,
    };
    (
        EngineConfig {
            redelivery_backoff: backoff,
        },
        SagaEngineConfig {
            compensation_backoff: backoff,
            stuck_after_failures: 5,
            callback_backoff: backoff,
        },
    )
}

/// The simulated coordinator process.
pub struct SimCoordinator {
    pub up: bool,
    pub incarnation: u64,
    engine: Engine,
    sagas: SagaEngine,
    pub log: SimLog,
    waiters: BTreeMap<TxnId, Vec<u64>>,
    accept_waiters: BTreeMap<TxnId, Vec<u64>>,
    calls: BTreeMap<u64, PendingCall>,
    flushes: BTreeMap<u64, Vec<AfterFlush>>,
    next_id: u64,
    /// Participant address -> index.
    addresses: BTreeMap<String, usize>,
}

/// The address of participant `i` as branch targets name it.
pub fn participant_addr(i: usize) -> String {
    format!("sim://p{i}")
}

impl SimCoordinator {
    pub fn new(participants: usize, seed: u64) -> Self {
        let (config, saga_config) = engine_config();
        SimCoordinator {
            up: true,
            incarnation: 1,
            engine: Engine::new(config, seed),
            sagas: SagaEngine::new(saga_config, seed.wrapping_add(1)),
            log: SimLog::default(),
            waiters: BTreeMap::new(),
            accept_waiters: BTreeMap::new(),
            calls: BTreeMap::new(),
            flushes: BTreeMap::new(),
            next_id: 1,
            addresses: (0..participants)
                .map(|i| (participant_addr(i), i))
                .collect(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.engine.in_flight() + self.sagas.in_flight()
    }

    /// Crashes: the log keeps its first `kept` unflushed writes; returns how many it lost.
    pub fn crash(&mut self, kept: usize) -> usize {
        self.up = false;
        let (config, saga_config) = engine_config();
        self.engine = Engine::new(config, 0);
        self.sagas = SagaEngine::new(saga_config, 0);
        self.waiters.clear();
        self.accept_waiters.clear();
        self.calls.clear();
        self.flushes.clear();
        self.log.crash(kept)
    }

    /// Restarts with fresh engines and runs recovery, as `Runtime::recover` does.
    pub fn restart(&mut self, now_ms: u64, seed: u64, out: &mut Vec<COut>) -> usize {
        let (config, saga_config) = engine_config();
        self.engine = Engine::new(config, seed);
        self.sagas = SagaEngine::new(saga_config, seed.wrapping_add(1));
        self.incarnation += 1;
        self.up = true;
        let mut recovered = 0;
        for (txn, record) in self.log.scan() {
            if record.is_finished() {
                continue;
            }
            out.push(COut::Trace(format!("recover {txn}: {record:?}")));
            out.push(COut::Count(match record {
                TxnRecord::Preparing { .. } => "recovered_undecided_2pc",
                _ => "recovered_decided_2pc",
            }));
            let effects = self.engine.step(now_ms, Event::Recovered { txn, record });
            self.apply(now_ms, effects, out);
            recovered += 1;
        }
        for (saga, stored) in self.log.scan_sagas() {
            if stored
                .progress
                .as_ref()
                .is_some_and(|p| p.is_finished(&stored.spec.spec))
            {
                continue;
            }
            out.push(COut::Trace(format!("recover saga {saga}")));
            out.push(COut::Count("recovered_saga"));
            let StoredSaga { spec, progress } = stored;
            let effects = self.sagas.step(
                now_ms,
                SagaEvent::Recovered {
                    saga,
                    spec: spec.spec,
                    fingerprint: spec.fingerprint,
                    accepted_ms: spec.accepted_ms,
                    progress,
                },
            );
            self.apply_saga(now_ms, effects, out);
            recovered += 1;
        }
        recovered
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        // Unique across incarnations, so that a stale answer never matches a new call.
        self.incarnation << 40 | self.next_id
    }

    fn after_flush(&mut self, then: AfterFlush, out: &mut Vec<COut>) {
        let id = self.id();
        self.flushes.insert(id, vec![then]);
        out.push(COut::Flush { id });
    }

    fn participant(&self, addr: &str) -> usize {
        *self
            .addresses
            .get(addr)
            .unwrap_or_else(|| panic!("no participant at {addr}"))
    }

    fn call(
        &mut self,
        participant: usize,
        pending: PendingCall,
        timeout_ms: u64,
        out: &mut Vec<COut>,
        make: impl FnOnce(u64) -> Msg,
    ) {
        let id = self.id();
        self.calls.insert(id, pending);
        out.push(COut::Send {
            participant,
            msg: make(id),
            call: Some((id, timeout_ms.max(1))),
        });
    }

    // ---- events from the simulator ------------------------------------------------------

    pub fn flush_done(&mut self, now_ms: u64, id: u64, out: &mut Vec<COut>) {
        self.log.flush();
        for then in self.flushes.remove(&id).unwrap_or_default() {
            match then {
                AfterFlush::DecisionDurable(txn) => {
                    self.step_2pc(now_ms, Event::DecisionDurable { txn }, out)
                }
                AfterFlush::Accepted(saga) => {
                    self.step_saga(now_ms, SagaEvent::Accepted { saga }, out)
                }
                AfterFlush::OutcomeDurable(saga) => {
                    self.step_saga(now_ms, SagaEvent::OutcomeDurable { saga }, out)
                }
                AfterFlush::QueryAborted {
                    participant,
                    txn,
                    branch,
                } => out.push(COut::Send {
                    participant,
                    msg: Msg::QueryAnswer {
                        txn,
                        branch,
                        outcome: QueriedOutcome::Aborted,
                    },
                    call: None,
                }),
                AfterFlush::ClientOutcome { request, outcome } => {
                    out.push(COut::ClientOutcome { request, outcome })
                }
            }
        }
    }

    pub fn timer(&mut self, now_ms: u64, entry: TimerEntry, out: &mut Vec<COut>) {
        match entry {
            TimerEntry::TwoPhase(txn, timer) => {
                self.step_2pc(now_ms, Event::TimerFired { txn, timer }, out)
            }
            TimerEntry::Saga(saga, timer) => {
                self.step_saga(now_ms, SagaEvent::TimerFired { saga, timer }, out)
            }
        }
    }

    /// A call's answer arrived (`Some`) or its timeout passed (`None`).
    pub fn call_completed(
        &mut self,
        now_ms: u64,
        call: u64,
        answer: Option<Answer>,
        out: &mut Vec<COut>,
    ) {
        let Some(pending) = self.calls.remove(&call) else {
            // Answered already (a duplicate, or the timeout won), or a past life's call.
            out.push(COut::Count("stale_answer_dropped"));
            return;
        };
        if answer.is_none() {
            out.push(COut::Count("call_timed_out"));
        }
        let unexpected =
            |answer: &Option<Answer>| format!("call {call} ({pending:?}) got {answer:?}");
        match pending.clone() {
            PendingCall::Prepare { txn, branch } => {
                let event = match answer {
                    Some(Answer::Vote(vote)) => Event::Voted { txn, branch, vote },
                    None => Event::PrepareFailed {
                        txn,
                        branch,
                        error: "prepare call timed out".into(),
                    },
                    other => panic!("{}", unexpected(&other)),
                };
                self.step_2pc(now_ms, event, out);
            }
            PendingCall::Decision { txn, branch } => {
                let event = match answer {
                    Some(Answer::Done) => Event::Acknowledged { txn, branch },
                    Some(Answer::Refused(error)) => Event::DeliveryFailed { txn, branch, error },
                    None => Event::DeliveryFailed {
                        txn,
                        branch,
                        error: "decision call timed out".into(),
                    },
                    other => panic!("{}", unexpected(&other)),
                };
                self.step_2pc(now_ms, event, out);
            }
            PendingCall::Act {
                saga,
                step,
                attempt,
            } => {
                let answer = match answer {
                    Some(Answer::Acted {
                        succeeded: true, ..
                    }) => ActionAnswer::Succeeded,
                    Some(Answer::Acted {
                        succeeded: false,
                        reason,
                    }) => ActionAnswer::Failed { reason },
                    None => ActionAnswer::Unavailable {
                        error: "action call timed out".into(),
                    },
                    other => panic!("{}", unexpected(&other)),
                };
                self.step_saga(
                    now_ms,
                    SagaEvent::ActionAnswered {
                        saga,
                        step,
                        attempt,
                        answer,
                    },
                    out,
                );
            }
            PendingCall::Compensate {
                saga,
                step,
                attempt,
            } => {
                if matches!(answer, Some(Answer::NotCompensated(_))) {
                    out.push(COut::Count("compensation_not_applicable_yet"));
                }
                let answer = match answer {
                    Some(Answer::Done) => Ok(()),
                    Some(Answer::NotCompensated(error)) => Err(error),
                    None => Err("compensation call timed out".into()),
                    other => panic!("{}", unexpected(&other)),
                };
                self.step_saga(
                    now_ms,
                    SagaEvent::CompensationAnswered {
                        saga,
                        step,
                        attempt,
                        answer,
                    },
                    out,
                );
            }
        }
    }

    /// A participant's in-doubt resolver asks about a branch (`Command::QueryOutcome`).
    pub fn query_outcome(
        &mut self,
        participant: usize,
        txn: TxnId,
        branch: BranchIdx,
        out: &mut Vec<COut>,
    ) {
        let queried = |d: &Decision| match d {
            Decision::Commit => QueriedOutcome::Committed,
            Decision::Abort { .. } => QueriedOutcome::Aborted,
        };
        let outcome = match self.engine.lookup(&txn) {
            Some((_, Some(decision))) => queried(decision),
            Some((_, None)) => QueriedOutcome::Pending,
            None => match self.log.get(&txn) {
                Some(record) => match record.decision() {
                    Some(d) => queried(&d),
                    None => {
                        out.push(COut::Violation(format!(
                            "{txn}: undecided record in the log but not in flight"
                        )));
                        return;
                    }
                },
                None => {
                    // pin_presumed_abort
                    self.log
                        .put_txn(&txn, &TxnRecord::PresumedAborted { presumed_ms: 0 });
                    out.push(COut::Trace(format!("presumed abort of {txn} pinned")));
                    out.push(COut::Count("presumed_abort_pinned"));
                    self.after_flush(
                        AfterFlush::QueryAborted {
                            participant,
                            txn,
                            branch,
                        },
                        out,
                    );
                    return;
                }
            },
        };
        out.push(COut::Send {
            participant,
            msg: Msg::QueryAnswer {
                txn,
                branch,
                outcome,
            },
            call: None,
        });
    }

    /// A client runs (or retries) a transaction (`Runtime::on_execute`).
    #[allow(clippy::too_many_arguments)]
    pub fn execute(
        &mut self,
        now_ms: u64,
        request: u64,
        txn: TxnId,
        branches: Vec<BranchSpec>,
        fingerprint: Fingerprint,
        timeout_ms: u64,
        out: &mut Vec<COut>,
    ) {
        if let Some((known, decision)) = self.engine.lookup(&txn) {
            if *known != fingerprint {
                out.push(COut::Violation(format!(
                    "{txn}: fingerprint changed between retries"
                )));
            } else if let Some(decision) = decision {
                out.push(COut::ClientOutcome {
                    request,
                    outcome: decision.outcome(),
                });
            } else {
                self.waiters.entry(txn).or_default().push(request);
            }
            return;
        }
        match self.log.get(&txn) {
            Some(record @ TxnRecord::PresumedAborted { .. }) => {
                let outcome = record
                    .decision()
                    .expect("a presumed abort is decided")
                    .outcome();
                self.after_flush(AfterFlush::ClientOutcome { request, outcome }, out);
                return;
            }
            Some(record) => {
                match record.decision() {
                    Some(decision) => out.push(COut::ClientOutcome {
                        request,
                        outcome: decision.outcome(),
                    }),
                    None => out.push(COut::Violation(format!(
                        "{txn}: undecided record in the log but not in flight"
                    ))),
                }
                return;
            }
            None => {}
        }
        self.waiters.entry(txn.clone()).or_default().push(request);
        let effects = self.engine.step(
            now_ms,
            Event::Begin {
                txn,
                branches,
                fingerprint,
                deadline_ms: now_ms + timeout_ms,
            },
        );
        self.apply(now_ms, effects, out);
    }

    /// A client submits (or retries) a saga (`Runtime::on_submit_saga`).
    pub fn submit_saga(
        &mut self,
        now_ms: u64,
        request: u64,
        saga: TxnId,
        spec: SagaSpec,
        fingerprint: Fingerprint,
        out: &mut Vec<COut>,
    ) {
        if let Some(known) = self.sagas.fingerprint(&saga) {
            if *known != fingerprint {
                out.push(COut::Violation(format!(
                    "{saga}: fingerprint changed between retries"
                )));
            } else if let Some(waiters) = self.accept_waiters.get_mut(&saga) {
                waiters.push(request);
            } else {
                out.push(COut::ClientAccepted { request });
            }
            return;
        }
        if let Some(stored) = self.log.get_saga(&saga) {
            if stored.spec.fingerprint != fingerprint {
                out.push(COut::Violation(format!(
                    "{saga}: fingerprint changed between retries"
                )));
            } else {
                out.push(COut::ClientAccepted { request });
            }
            return;
        }
        self.accept_waiters.insert(saga.clone(), vec![request]);
        let effects = self.sagas.step(
            now_ms,
            SagaEvent::Submit {
                saga,
                spec,
                fingerprint,
            },
        );
        self.apply_saga(now_ms, effects, out);
    }

    // ---- carrying out effects -----------------------------------------------------------

    fn step_2pc(&mut self, now_ms: u64, event: Event, out: &mut Vec<COut>) {
        out.push(COut::Trace(format!("2pc <- {event:?}")));
        let effects = self.engine.step(now_ms, event);
        self.apply(now_ms, effects, out);
    }

    fn step_saga(&mut self, now_ms: u64, event: SagaEvent, out: &mut Vec<COut>) {
        out.push(COut::Trace(format!("saga <- {event:?}")));
        let effects = self.sagas.step(now_ms, event);
        self.apply_saga(now_ms, effects, out);
    }

    fn apply(&mut self, now_ms: u64, effects: Vec<Effect>, out: &mut Vec<COut>) {
        for effect in effects {
            out.push(COut::Trace(format!("2pc -> {effect:?}")));
            match effect {
                Effect::Persist {
                    txn,
                    record,
                    durability,
                } => {
                    self.log.put_txn(&txn, &record);
                    match durability {
                        Durability::Lazy => {}
                        Durability::Forced => {
                            if !matches!(record, TxnRecord::Decided { .. }) {
                                out.push(COut::Violation(format!(
                                    "{txn}: forced a record that is not a decision: {record:?}"
                                )));
                            }
                            self.after_flush(AfterFlush::DecisionDurable(txn), out);
                        }
                    }
                }
                Effect::SendPrepare {
                    txn,
                    branch,
                    target,
                    payload,
                    deadline_ms,
                } => {
                    let p = self.participant(&target.participant);
                    let timeout = deadline_ms.saturating_sub(now_ms).max(1);
                    let pending = PendingCall::Prepare {
                        txn: txn.clone(),
                        branch,
                    };
                    self.call(p, pending, timeout, out, |call| Msg::Prepare {
                        call,
                        txn,
                        branch,
                        payload,
                    });
                }
                Effect::SendDecision {
                    txn,
                    branch,
                    target,
                    commit,
                } => {
                    let p = self.participant(&target.participant);
                    let pending = PendingCall::Decision {
                        txn: txn.clone(),
                        branch,
                    };
                    self.call(p, pending, DECISION_CALL_TIMEOUT_MS, out, |call| {
                        Msg::Decision {
                            call,
                            txn,
                            branch,
                            commit,
                        }
                    });
                }
                Effect::SetTimer { txn, timer, at_ms } => out.push(COut::SetTimer {
                    at_ms,
                    entry: TimerEntry::TwoPhase(txn, timer),
                }),
                Effect::Reply { txn, outcome } => {
                    for request in self.waiters.remove(&txn).unwrap_or_default() {
                        out.push(COut::ClientOutcome {
                            request,
                            outcome: outcome.clone(),
                        });
                    }
                    out.push(COut::Announced { txn, outcome });
                }
                Effect::Finished { txn } => {
                    if self.waiters.contains_key(&txn) {
                        out.push(COut::Violation(format!(
                            "{txn} finished with clients still waiting"
                        )));
                    }
                }
            }
        }
    }

    fn apply_saga(&mut self, _now_ms: u64, effects: Vec<SagaEffect>, out: &mut Vec<COut>) {
        let (writes, others): (Vec<_>, Vec<_>) = effects.into_iter().partition(|effect| {
            matches!(
                effect,
                SagaEffect::PersistSpec { .. }
                    | SagaEffect::PersistOutcome { .. }
                    | SagaEffect::PersistProgress { .. }
            )
        });
        for effect in writes.into_iter().chain(others) {
            match &effect {
                SagaEffect::Notify { .. } => {}
                other => out.push(COut::Trace(format!("saga -> {other:?}"))),
            }
            match effect {
                SagaEffect::PersistSpec {
                    saga,
                    spec,
                    fingerprint,
                    accepted_ms,
                } => {
                    self.log.put_saga_spec(
                        &saga,
                        &SagaSpecRecord {
                            spec,
                            fingerprint,
                            accepted_ms,
                        },
                    );
                    self.after_flush(AfterFlush::Accepted(saga), out);
                }
                SagaEffect::PersistOutcome { saga, progress } => {
                    self.log.put_saga_progress(&saga, &progress);
                    self.after_flush(AfterFlush::OutcomeDurable(saga), out);
                }
                SagaEffect::PersistProgress { saga, progress } => {
                    self.log.put_saga_progress(&saga, &progress);
                }
                SagaEffect::SendAction {
                    saga,
                    step,
                    attempt,
                    target,
                    payload,
                    timeout_ms,
                } => {
                    let p = self.participant(&target.participant);
                    let pending = PendingCall::Act {
                        saga: saga.clone(),
                        step,
                        attempt,
                    };
                    self.call(p, pending, timeout_ms, out, |call| Msg::Act {
                        call,
                        saga,
                        step,
                        payload,
                    });
                }
                SagaEffect::SendCompensation {
                    saga,
                    step,
                    attempt,
                    target,
                    payload,
                } => {
                    let p = self.participant(&target.participant);
                    let pending = PendingCall::Compensate {
                        saga: saga.clone(),
                        step,
                        attempt,
                    };
                    self.call(p, pending, DECISION_CALL_TIMEOUT_MS, out, |call| {
                        Msg::Compensate {
                            call,
                            saga,
                            step,
                            payload,
                        }
                    });
                }
                SagaEffect::SendCallback { saga, .. } => {
                    out.push(COut::Violation(format!(
                        "{saga}: a callback was sent, but no simulated saga names one"
                    )));
                }
                SagaEffect::SetTimer { saga, timer, at_ms } => out.push(COut::SetTimer {
                    at_ms,
                    entry: TimerEntry::Saga(saga, timer),
                }),
                SagaEffect::ReplyAccepted { saga } => {
                    for request in self.accept_waiters.remove(&saga).unwrap_or_default() {
                        out.push(COut::ClientAccepted { request });
                    }
                }
                SagaEffect::Notify { .. } => {}
                SagaEffect::Terminal { saga, outcome, .. } => {
                    if self.sagas.status(&saga).is_none() && self.log.get_saga(&saga).is_none() {
                        out.push(COut::Violation(format!(
                            "{saga} terminal but neither in flight nor stored"
                        )));
                    }
                    out.push(COut::SagaTerminal { saga, outcome });
                }
                SagaEffect::Finished { .. } => {}
            }
        }
    }
}
