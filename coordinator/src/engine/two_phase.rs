//! One two-phase-commit transaction as a state machine (Gray & Lamport, "Consensus on
//! Transaction Commit", 2006, for the protocol; Mohan, Lindsay & Obermarck, 1986, for
//! presumed abort).
//!
//! Phases:
//! 1. **Preparing.** Prepare goes to every branch; the `Preparing` record is written lazily. A
//!    NO vote, an unreachable participant, or the deadline decides abort; YES from every
//!    branch decides commit.
//! 2. **Deciding.** The `Decided` record is forced. Nothing is announced yet: not to the
//!    client, not to a participant, not to a participant asking for the outcome. Abort is
//!    forced too, although presumed abort would allow otherwise, because the client acts on
//!    the answer (a client told "aborted" may retry under a new id; if a crash then lost the
//!    abort, a retry with the old id could commit).
//! 3. **Delivering.** Once durable, the decision goes to every branch that may hold
//!    something (all but those that voted no) and the client gets its reply. A branch that
//!    does not acknowledge gets the decision again after a capped, jittered backoff, forever:
//!    a participant that is down will hear it when it is back.
//! 4. **Finished.** Every branch acknowledged; a `Finished` record is written lazily and the
//!    engine forgets the transaction.
//!
//! Recovery: a `Preparing` record means nothing was decided: the transaction is aborted
//! (decided, forced, delivered). A `Decided` record is delivered again to every branch.
//!
//! Operators: [`Event::OperatorAbort`] decides abort while the transaction is preparing (the
//! usual forced write and delivery follow; the reason names the operator) and changes nothing
//! once it is decided. [`Event::OperatorRetry`] sends at once every decision whose redelivery
//! timer is armed; the timer is disarmed, so its later firing is stale and one redelivery
//! loop per branch remains.
//!
//! Known limitations: a prepare is sent once; a transport failure aborts the transaction
//! rather than retrying it within the deadline.

use tandem_common::{Backoff, BranchIdx, SplitMix64, TxnId};

use super::types::{
    BranchPhase, BranchSpec, BranchStatus, BranchTarget, Decision, TxnPhase, TxnStatus, Vote,
};
use super::{Durability, Effect, Event, Timer};
use crate::log::record::{Fingerprint, TxnRecord};

/// What a step needs from outside the machine.
pub struct StepContext<'a> {
    pub now_ms: u64,
    pub rng: &'a mut SplitMix64,
    pub backoff: &'a Backoff,
}

/// The phase, with what each phase alone carries.
#[derive(Debug, Clone)]
enum Phase {
    Preparing { deadline_ms: u64 },
    Deciding { decision: Decision },
    Delivering { decision: Decision },
}

#[derive(Debug, Clone)]
struct Branch {
    target: BranchTarget,
    phase: BranchPhase,
    /// How many times the current request (prepare or decision) was sent.
    attempts: u32,
    last_error: Option<String>,
    /// A redelivery timer is armed for this branch, due then. `None`: the decision is in
    /// flight, acknowledged, or not sent yet. One timer at a time, so that an operator's
    /// retry (which sends at once and disarms it) never leaves two redelivery loops behind.
    redeliver_at_ms: Option<u64>,
}

/// One transaction in flight.
#[derive(Debug, Clone)]
pub struct TwoPhaseTxn {
    id: TxnId,
    fingerprint: Fingerprint,
    created_ms: u64,
    branches: Vec<Branch>,
    phase: Phase,
}

impl TwoPhaseTxn {
    /// Starts a transaction: lazily records it, sends every prepare, arms the deadline.
    pub fn begin(
        id: TxnId,
        specs: Vec<BranchSpec>,
        fingerprint: Fingerprint,
        now_ms: u64,
        deadline_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Self {
        assert!(
            !specs.is_empty(),
            "{id}: a transaction needs at least one branch"
        );
        let txn = TwoPhaseTxn {
            id: id.clone(),
            fingerprint,
            created_ms: now_ms,
            branches: specs
                .iter()
                .map(|s| Branch {
                    target: s.target.clone(),
                    phase: BranchPhase::Preparing,
                    attempts: 1,
                    last_error: None,
                    redeliver_at_ms: None,
                })
                .collect(),
            phase: Phase::Preparing { deadline_ms },
        };
        effects.push(Effect::Persist {
            txn: id.clone(),
            record: TxnRecord::Preparing {
                branches: txn.targets(),
                fingerprint,
                created_ms: now_ms,
            },
            durability: Durability::Lazy,
        });
        for (i, spec) in specs.into_iter().enumerate() {
            effects.push(Effect::SendPrepare {
                txn: id.clone(),
                branch: BranchIdx(i as u32),
                target: spec.target,
                payload: spec.payload,
                deadline_ms,
            });
        }
        effects.push(Effect::SetTimer {
            txn: id,
            timer: Timer::PrepareDeadline,
            at_ms: deadline_ms,
        });
        txn
    }

    /// Rebuilds a transaction from its stored record at start-up. `None` if it was finished.
    pub fn recover(
        id: TxnId,
        record: TxnRecord,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> Option<Self> {
        let branch = |target: &BranchTarget, phase: BranchPhase| Branch {
            target: target.clone(),
            phase,
            attempts: 0,
            last_error: None,
            redeliver_at_ms: None,
        };
        match record {
            TxnRecord::Preparing {
                branches,
                fingerprint,
                created_ms,
            } => {
                let mut txn = TwoPhaseTxn {
                    id,
                    fingerprint,
                    created_ms,
                    branches: branches
                        .iter()
                        .map(|t| branch(t, BranchPhase::Preparing))
                        .collect(),
                    phase: Phase::Preparing {
                        deadline_ms: now_ms,
                    },
                };
                let reason = "the coordinator restarted before deciding".to_string();
                txn.decide(Decision::Abort { reason }, now_ms, effects);
                Some(txn)
            }
            TxnRecord::Decided {
                decision,
                branches,
                fingerprint,
                decided_ms,
            } => {
                // Durable already: deliver again to every branch (votes were not stored, so
                // every branch may hold something).
                let mut txn = TwoPhaseTxn {
                    id,
                    fingerprint,
                    created_ms: decided_ms,
                    branches: branches
                        .iter()
                        .map(|t| branch(t, BranchPhase::VotedYes))
                        .collect(),
                    phase: Phase::Deciding { decision },
                };
                txn.on_decision_durable(now_ms, effects);
                Some(txn)
            }
            // Nothing left to do; the runtime does not even hand these over.
            TxnRecord::Finished { .. } | TxnRecord::PresumedAborted { .. } => None,
        }
    }

    pub fn step(&mut self, ctx: StepContext<'_>, event: Event, effects: &mut Vec<Effect>) {
        debug_assert_eq!(
            event.txn(),
            &self.id,
            "event routed to the wrong transaction"
        );
        match event {
            Event::Voted { branch, vote, .. } => self.on_vote(branch, vote, ctx.now_ms, effects),
            Event::PrepareFailed { branch, error, .. } => {
                if !matches!(self.phase, Phase::Preparing { .. }) {
                    return; // decided already; the failure changes nothing
                }
                if let Some(b) = self.branch_mut(branch) {
                    if b.phase == BranchPhase::Preparing {
                        let reason = format!(
                            "participant {} (branch {branch}) did not answer prepare: {error}",
                            b.target.participant
                        );
                        b.last_error = Some(error);
                        self.decide(Decision::Abort { reason }, ctx.now_ms, effects);
                    }
                }
            }
            Event::DecisionDurable { .. } => match self.phase {
                Phase::Deciding { .. } => self.on_decision_durable(ctx.now_ms, effects),
                Phase::Preparing { .. } | Phase::Delivering { .. } => {
                    panic!("{}: DecisionDurable in phase {:?}: the runtime fed a flush twice or before a decision", self.id, self.phase)
                }
            },
            Event::Acknowledged { branch, .. } => self.on_acknowledged(branch, ctx.now_ms, effects),
            Event::DeliveryFailed { branch, error, .. } => {
                if let Phase::Delivering { .. } = self.phase {
                    let id = self.id.clone();
                    if let Some(b) = self.branch_mut(branch) {
                        if b.phase != BranchPhase::Acknowledged {
                            b.last_error = Some(error);
                            if b.redeliver_at_ms.is_none() {
                                let delay =
                                    ctx.backoff.delay(b.attempts.saturating_sub(1), ctx.rng);
                                let at_ms = ctx.now_ms + delay.as_millis() as u64;
                                b.redeliver_at_ms = Some(at_ms);
                                effects.push(Effect::SetTimer {
                                    txn: id,
                                    timer: Timer::Redeliver { branch },
                                    at_ms,
                                });
                            } // else a duplicate failure: a redelivery is already due
                        }
                    }
                }
            }
            Event::OperatorAbort { reason, .. } => {
                if matches!(self.phase, Phase::Preparing { .. }) {
                    let reason = format!("aborted by an operator: {reason}");
                    self.decide(Decision::Abort { reason }, ctx.now_ms, effects);
                } // decided already: the decision stands; the runtime says which
            }
            Event::OperatorRetry { .. } => {
                if let Phase::Delivering { .. } = self.phase {
                    let due: Vec<BranchIdx> = (0..self.branches.len())
                        .filter(|&i| self.branches[i].redeliver_at_ms.is_some())
                        .map(|i| BranchIdx(i as u32))
                        .collect();
                    for branch in due {
                        self.redeliver(branch, effects);
                    }
                }
            }
            Event::TimerFired { timer, .. } => self.on_timer(timer, ctx.now_ms, effects),
            Event::Begin { .. } | Event::Recovered { .. } => {
                panic!(
                    "{}: Begin/Recovered must go to the engine, not to a transaction",
                    self.id
                )
            }
        }
    }

    fn on_vote(&mut self, branch: BranchIdx, vote: Vote, now_ms: u64, effects: &mut Vec<Effect>) {
        if !matches!(self.phase, Phase::Preparing { .. }) {
            // Late or repeated vote after the decision: the decision stands.
            return;
        }
        let Some(b) = self.branch_mut(branch) else {
            tracing::warn!(txn = %self.id, %branch, "vote for a branch this transaction does not have; ignored");
            return;
        };
        if b.phase != BranchPhase::Preparing {
            return; // a duplicate vote
        }
        match vote {
            Vote::Yes => {
                b.phase = BranchPhase::VotedYes;
                if self
                    .branches
                    .iter()
                    .all(|b| b.phase == BranchPhase::VotedYes)
                {
                    self.decide(Decision::Commit, now_ms, effects);
                }
            }
            Vote::No { reason } => {
                b.phase = BranchPhase::VotedNo;
                let reason = format!(
                    "participant {} (branch {branch}) voted no: {reason}",
                    b.target.participant
                );
                self.decide(Decision::Abort { reason }, now_ms, effects);
            }
        }
    }

    fn on_timer(&mut self, timer: Timer, now_ms: u64, effects: &mut Vec<Effect>) {
        match (timer, &self.phase) {
            (Timer::PrepareDeadline, Phase::Preparing { deadline_ms }) => {
                let waiting: Vec<String> = self
                    .branches
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.phase == BranchPhase::Preparing)
                    .map(|(i, b)| format!("branch #{i} at {}", b.target.participant))
                    .collect();
                let reason = format!(
                    "prepare deadline passed ({} ms) waiting for {}",
                    deadline_ms.saturating_sub(self.created_ms),
                    waiting.join(", ")
                );
                self.decide(Decision::Abort { reason }, now_ms, effects);
            }
            (Timer::Redeliver { branch }, Phase::Delivering { .. }) => {
                // Disarmed (an operator's retry sent it already): stale, ignored.
                if self
                    .branches
                    .get(branch.0 as usize)
                    .is_some_and(|b| b.redeliver_at_ms.is_some())
                {
                    self.redeliver(branch, effects);
                }
            }
            // A deadline after the decision, or a redelivery before one: stale, ignored.
            (Timer::PrepareDeadline, Phase::Deciding { .. } | Phase::Delivering { .. })
            | (Timer::Redeliver { .. }, Phase::Preparing { .. } | Phase::Deciding { .. }) => {}
        }
    }

    /// Preparing -> Deciding: force the decision; announce nothing yet.
    fn decide(&mut self, decision: Decision, now_ms: u64, effects: &mut Vec<Effect>) {
        assert!(
            matches!(self.phase, Phase::Preparing { .. }),
            "{}: decided twice (phase {:?})",
            self.id,
            self.phase
        );
        if decision.is_commit() {
            assert!(
                self.branches
                    .iter()
                    .all(|b| b.phase == BranchPhase::VotedYes),
                "{}: commit decided without a YES from every branch",
                self.id
            );
        }
        effects.push(Effect::Persist {
            txn: self.id.clone(),
            record: TxnRecord::Decided {
                decision: decision.clone(),
                branches: self.targets(),
                fingerprint: self.fingerprint,
                decided_ms: now_ms,
            },
            durability: Durability::Forced,
        });
        self.phase = Phase::Deciding { decision };
    }

    /// Deciding -> Delivering: the decision is durable; announce it.
    fn on_decision_durable(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let decision = match std::mem::replace(&mut self.phase, Phase::Preparing { deadline_ms: 0 })
        {
            Phase::Deciding { decision } => decision,
            other => panic!("{}: decision durable in phase {other:?}", self.id),
        };
        let commit = decision.is_commit();
        for (i, b) in self.branches.iter_mut().enumerate() {
            if b.phase == BranchPhase::VotedNo {
                // It holds nothing and recorded its own abort when it voted.
                b.phase = BranchPhase::Acknowledged;
                continue;
            }
            b.attempts = 1;
            effects.push(Effect::SendDecision {
                txn: self.id.clone(),
                branch: BranchIdx(i as u32),
                target: b.target.clone(),
                commit,
            });
        }
        effects.push(Effect::Reply {
            txn: self.id.clone(),
            outcome: decision.outcome(),
        });
        self.phase = Phase::Delivering { decision };
        // Finishes at once when no branch needs the decision (a lone branch that voted NO).
        self.finish_if_all_acknowledged(now_ms, effects);
    }

    fn on_acknowledged(&mut self, branch: BranchIdx, now_ms: u64, effects: &mut Vec<Effect>) {
        if !matches!(self.phase, Phase::Delivering { .. }) {
            tracing::warn!(txn = %self.id, %branch, phase = ?self.phase, "acknowledgement before the decision was sent; ignored");
            return;
        }
        if let Some(b) = self.branch_mut(branch) {
            b.phase = BranchPhase::Acknowledged;
            b.last_error = None;
            b.redeliver_at_ms = None;
        }
        self.finish_if_all_acknowledged(now_ms, effects);
    }

    fn finish_if_all_acknowledged(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let Phase::Delivering { decision } = &self.phase else {
            return;
        };
        if self
            .branches
            .iter()
            .all(|b| b.phase == BranchPhase::Acknowledged)
        {
            effects.push(Effect::Persist {
                txn: self.id.clone(),
                record: TxnRecord::Finished {
                    decision: decision.clone(),
                    branches: self.targets(),
                    branch_phases: self.branches.iter().map(|b| b.phase.clone()).collect(),
                    fingerprint: self.fingerprint,
                    finished_ms: now_ms,
                },
                durability: Durability::Lazy,
            });
            effects.push(Effect::Finished {
                txn: self.id.clone(),
            });
        }
    }

    /// Sends the decision to `branch` again now, disarming its redelivery timer.
    fn redeliver(&mut self, branch: BranchIdx, effects: &mut Vec<Effect>) {
        let Phase::Delivering { decision } = &self.phase else {
            panic!("{}: redelivering in phase {:?}", self.id, self.phase);
        };
        let commit = decision.is_commit();
        let id = self.id.clone();
        if let Some(b) = self.branch_mut(branch) {
            b.redeliver_at_ms = None;
            if b.phase != BranchPhase::Acknowledged {
                b.attempts += 1;
                effects.push(Effect::SendDecision {
                    txn: id,
                    branch,
                    target: b.target.clone(),
                    commit,
                });
            }
        }
    }

    /// When each branch's redelivery is due, if one is armed (for the operator's view).
    pub fn redeliveries_due(&self) -> Vec<Option<u64>> {
        self.branches.iter().map(|b| b.redeliver_at_ms).collect()
    }

    fn branch_mut(&mut self, branch: BranchIdx) -> Option<&mut Branch> {
        self.branches.get_mut(branch.0 as usize)
    }

    fn targets(&self) -> Vec<BranchTarget> {
        self.branches.iter().map(|b| b.target.clone()).collect()
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The decision, only once it is durable (announced).
    pub fn announced_decision(&self) -> Option<&Decision> {
        match &self.phase {
            Phase::Delivering { decision } => Some(decision),
            Phase::Preparing { .. } | Phase::Deciding { .. } => None,
        }
    }

    pub fn status(&self) -> TxnStatus {
        TxnStatus {
            phase: match self.phase {
                Phase::Preparing { .. } => TxnPhase::Preparing,
                Phase::Deciding { .. } => TxnPhase::Deciding,
                Phase::Delivering { .. } => TxnPhase::Delivering,
            },
            decision: self.announced_decision().cloned(),
            branches: self
                .branches
                .iter()
                .map(|b| BranchStatus {
                    target: b.target.clone(),
                    phase: b.phase.clone(),
                    attempts: b.attempts,
                    last_error: b.last_error.clone(),
                })
                .collect(),
        }
    }

    /// Checks the machine's invariants; run after every step in debug and test builds.
    pub fn validate(&self) {
        assert!(!self.branches.is_empty(), "{}: no branches", self.id);
        for (i, b) in self.branches.iter().enumerate() {
            if b.redeliver_at_ms.is_some() {
                assert!(
                    matches!(self.phase, Phase::Delivering { .. })
                        && b.phase != BranchPhase::Acknowledged,
                    "{}: branch #{i} ({:?}) has a redelivery armed in phase {:?}",
                    self.id,
                    b.phase,
                    self.phase
                );
            }
        }
        let count = |p: BranchPhase| self.branches.iter().filter(|b| b.phase == p).count();
        match &self.phase {
            Phase::Preparing { .. } => {
                assert_eq!(
                    count(BranchPhase::VotedNo),
                    0,
                    "{}: a NO vote left it undecided",
                    self.id
                );
                assert_eq!(
                    count(BranchPhase::Acknowledged),
                    0,
                    "{}: acknowledged before a decision",
                    self.id
                );
                assert!(
                    count(BranchPhase::Preparing) > 0,
                    "{}: every vote YES but undecided",
                    self.id
                );
            }
            Phase::Deciding { decision } | Phase::Delivering { decision } => {
                if decision.is_commit() {
                    assert_eq!(
                        count(BranchPhase::VotedNo),
                        0,
                        "{}: commit despite a NO vote",
                        self.id
                    );
                    assert_eq!(
                        count(BranchPhase::Preparing),
                        0,
                        "{}: commit with a vote missing",
                        self.id
                    );
                }
                if matches!(self.phase, Phase::Deciding { .. }) {
                    assert_eq!(
                        count(BranchPhase::Acknowledged),
                        0,
                        "{}: acknowledged before durable",
                        self.id
                    );
                }
            }
        }
    }
}
