//! The coordinator's protocol core: pure, synchronous, deterministic.
//!
//! [`Engine::step`] takes an [`Event`] (a client began a transaction, a participant voted or
//! acknowledged, a log flush completed, a timer fired, recovery found a record) together with
//! the current time, and returns the [`Effect`]s the runtime must carry out (persist a record,
//! possibly forced; send a message; set a timer; reply to the client). The engine does no I/O:
//! no tokio, no sled, no tonic, no clock, no global randomness. Time is an argument and jitter
//! comes from a generator seeded by the runtime, so a run is replayable from its inputs, which
//! is what the deterministic simulation and the state-machine tests rely on.
//!
//! The one ordering rule that makes 2PC correct lives in the states, not in call order: a
//! transaction that decided goes to [`TxnPhase::Deciding`] and emits only the forced
//! [`Effect::Persist`] of its decision; it emits the decision's messages and the client's
//! reply only on [`Event::DecisionDurable`], which the runtime feeds back once that flush has
//! completed. No refactor of the runtime can send a commit before the commit point.
//!
//! The per-transaction state machine is in [`two_phase`]; this module routes events to it and
//! owns the set of transactions in flight.

pub mod saga;
pub mod two_phase;
pub mod types;

use std::collections::BTreeMap;

use tandem_common::{Backoff, BranchIdx, SplitMix64, TxnId};

use crate::log::record::{Fingerprint, TxnRecord};
use two_phase::TwoPhaseTxn;
use types::{BranchSpec, BranchTarget, Decision, Outcome, TxnStatus, Vote};

/// Something that happened, fed into the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client asked for a new transaction. The runtime has checked that the id is new.
    Begin {
        txn: TxnId,
        branches: Vec<BranchSpec>,
        fingerprint: Fingerprint,
        /// When the prepare round gives up and aborts, in ms since the epoch.
        deadline_ms: u64,
    },
    /// A participant answered prepare.
    Voted {
        txn: TxnId,
        branch: BranchIdx,
        vote: Vote,
    },
    /// A prepare got no answer (transport error or its call timed out).
    PrepareFailed {
        txn: TxnId,
        branch: BranchIdx,
        error: String,
    },
    /// The forced write of the transaction's decision completed.
    DecisionDurable { txn: TxnId },
    /// A participant acknowledged the decision.
    Acknowledged { txn: TxnId, branch: BranchIdx },
    /// Delivering the decision to a participant failed; it will be sent again.
    DeliveryFailed {
        txn: TxnId,
        branch: BranchIdx,
        error: String,
    },
    /// A timer the engine set has fired.
    TimerFired { txn: TxnId, timer: Timer },
    /// Recovery found this record in the log at start-up.
    Recovered { txn: TxnId, record: TxnRecord },
    /// An operator aborts the transaction. Decides abort (forced, then delivered, like any
    /// abort) while it is still preparing; does nothing (no effects) once it is decided. The
    /// runtime checks the phase first and tells the operator which outcome stands.
    OperatorAbort { txn: TxnId, reason: String },
    /// An operator asks for every decision delivery waiting for its redelivery timer to be sent
    /// now. Does nothing in any other phase, or to deliveries in flight.
    OperatorRetry { txn: TxnId },
}

impl Event {
    pub fn txn(&self) -> &TxnId {
        match self {
            Event::Begin { txn, .. }
            | Event::Voted { txn, .. }
            | Event::PrepareFailed { txn, .. }
            | Event::DecisionDurable { txn }
            | Event::Acknowledged { txn, .. }
            | Event::DeliveryFailed { txn, .. }
            | Event::TimerFired { txn, .. }
            | Event::Recovered { txn, .. }
            | Event::OperatorAbort { txn, .. }
            | Event::OperatorRetry { txn } => txn,
        }
    }
}

/// The timers a transaction sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// The prepare round's deadline: undecided by then means abort.
    PrepareDeadline,
    /// Time to send the decision to this branch again.
    Redeliver { branch: BranchIdx },
}

/// How durable a write must be before the engine is told it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written, not waited for. Used where losing the write is safe.
    Lazy,
    /// Forced to disk; the runtime answers with [`Event::DecisionDurable`] once it is.
    Forced,
}

/// Something the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write (replace) the transaction's record.
    Persist {
        txn: TxnId,
        record: TxnRecord,
        durability: Durability,
    },
    /// Ask a participant to prepare a branch; answer with `Voted` or `PrepareFailed`.
    SendPrepare {
        txn: TxnId,
        branch: BranchIdx,
        target: BranchTarget,
        payload: Vec<u8>,
        /// The call must not outlive the prepare round.
        deadline_ms: u64,
    },
    /// Tell a participant the decision; answer with `Acknowledged` or `DeliveryFailed`.
    SendDecision {
        txn: TxnId,
        branch: BranchIdx,
        target: BranchTarget,
        commit: bool,
    },
    /// Feed `TimerFired { txn, timer }` back at `at_ms` (a stale timer is ignored).
    SetTimer {
        txn: TxnId,
        timer: Timer,
        at_ms: u64,
    },
    /// Tell every client waiting on this transaction its outcome. Emitted once per
    /// transaction, and only after the decision is durable.
    Reply { txn: TxnId, outcome: Outcome },
    /// The transaction is finished and the engine has dropped it.
    Finished { txn: TxnId },
}

/// Tunables of the engine (the runtime's configuration hands them in).
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Backoff between deliveries of a decision to a participant that did not acknowledge.
    pub redelivery_backoff: Backoff,
}

/// All 2PC transactions in flight, and the rules that move them.
pub struct Engine {
    txns: BTreeMap<TxnId, TwoPhaseTxn>,
    rng: SplitMix64,
    config: EngineConfig,
}

impl Engine {
    pub fn new(config: EngineConfig, seed: u64) -> Self {
        Engine {
            txns: BTreeMap::new(),
            rng: SplitMix64::new(seed),
            config,
        }
    }

    /// Applies one event at time `now_ms` and returns what the runtime must do, in order.
    pub fn step(&mut self, now_ms: u64, event: Event) -> Vec<Effect> {
        let mut effects = Vec::new();
        let txn_id = event.txn().clone();
        match event {
            Event::Begin {
                txn,
                branches,
                fingerprint,
                deadline_ms,
            } => {
                assert!(
                    !self.txns.contains_key(&txn),
                    "Begin for {txn}, which is already in flight: the runtime must route retries"
                );
                let machine = TwoPhaseTxn::begin(
                    txn.clone(),
                    branches,
                    fingerprint,
                    now_ms,
                    deadline_ms,
                    &mut effects,
                );
                self.txns.insert(txn, machine);
            }
            Event::Recovered { txn, record } => {
                assert!(!self.txns.contains_key(&txn), "{txn} recovered twice");
                if let Some(machine) =
                    TwoPhaseTxn::recover(txn.clone(), record, now_ms, &mut effects)
                {
                    self.txns.insert(txn, machine);
                }
            }
            other => match self.txns.get_mut(&txn_id) {
                Some(machine) => {
                    let ctx = two_phase::StepContext {
                        now_ms,
                        rng: &mut self.rng,
                        backoff: &self.config.redelivery_backoff,
                    };
                    machine.step(ctx, other, &mut effects);
                }
                None => {
                    // A late vote, ack or timer of a transaction already finished (or never
                    // known): nothing to do. Decision deliveries are idempotent at the
                    // participant, so ignoring their answers is safe.
                    tracing::debug!(txn = %txn_id, event = ?other, "event for a transaction not in flight; ignored");
                }
            },
        }
        if effects.iter().any(|e| matches!(e, Effect::Finished { .. })) {
            self.txns.remove(&txn_id);
        } else if let Some(machine) = self.txns.get(&txn_id) {
            #[cfg(any(debug_assertions, test))]
            machine.validate();
            let _ = machine;
        }
        effects
    }

    /// The transaction's fingerprint and, once durable, its decision, if it is in flight.
    pub fn lookup(&self, txn: &TxnId) -> Option<(&Fingerprint, Option<&Decision>)> {
        self.txns
            .get(txn)
            .map(|m| (m.fingerprint(), m.announced_decision()))
    }

    /// A status snapshot of an in-flight transaction.
    pub fn status(&self, txn: &TxnId) -> Option<TxnStatus> {
        self.txns.get(txn).map(|m| m.status())
    }

    /// When each branch's redelivery is due (`None`: no timer armed), if it is in flight.
    pub fn redeliveries_due(&self, txn: &TxnId) -> Option<Vec<Option<u64>>> {
        self.txns.get(txn).map(|m| m.redeliveries_due())
    }

    /// How many transactions are in flight.
    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }
}

#[cfg(test)]
mod tests;
