//! The invariants, checked after every event and once the cluster has settled.
//!
//! After every event (over every participant's visible and durable state):
//! - no balance is negative (`available` and `held`);
//! - 2PC atomicity: no transaction has a branch committed and another aborted (or voted no);
//! - every outcome a client was told agrees with every participant: no branch of a
//!   transaction told "committed" is aborted, none of one told "aborted" is committed;
//! - an outcome, once announced (the engine's `Reply`, a saga's `Terminal`), never changes,
//!   across coordinator restarts too;
//! - no participant ever refused a decision (the barrier's "refuse" cells are protocol
//!   violations), and the coordinator never broke a runtime rule.
//!
//! At the end, once faults stopped and the cluster settled:
//! - every 2PC transaction's branches all carry its decision (the coordinator's log; no
//!   record means presumed abort): committed everywhere, or nowhere committed or prepared;
//! - no branch is prepared and no money is held;
//! - every accepted saga (and every saga whose spec reached the log) is completed or
//!   compensated; a completed one has every step's action applied; a compensated one leaves
//!   no action applied;
//! - money is conserved exactly: every account holds its initial balance plus the committed
//!   transfers and the completed sagas, nothing else.

use std::collections::{BTreeMap, BTreeSet};

use tandem_common::TxnId;
use tandem_coordinator::engine::saga::{SagaOutcome, SagaPhase};
use tandem_coordinator::engine::types::Outcome;
use tandem_participant::bank::{Account, BankOp};
use tandem_participant::barrier::BranchRecord;
use tandem_participant::saga_barrier::StepRecord;

use super::coordinator::SimCoordinator;
use super::participant::{PState, SimParticipant};
use super::workload::Op;
use super::Report;

fn committed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Committed)
}

/// What the checker knows and remembers.
#[derive(Debug)]
pub struct Checker {
    initial: Vec<PState>,
    ops: BTreeMap<TxnId, Op>,
    told: BTreeMap<TxnId, bool>,
    announced: BTreeMap<TxnId, bool>,
    saga_outcomes: BTreeMap<TxnId, SagaOutcome>,
    accepted: BTreeSet<TxnId>,
    violation: Option<String>,
}

impl Checker {
    pub fn new(initial: Vec<PState>) -> Self {
        Checker {
            initial,
            ops: BTreeMap::new(),
            told: BTreeMap::new(),
            announced: BTreeMap::new(),
            saga_outcomes: BTreeMap::new(),
            accepted: BTreeSet::new(),
            violation: None,
        }
    }

    pub fn register(&mut self, op: &Op) {
        self.ops.insert(op.id().clone(), op.clone());
    }

    pub fn violation(&mut self, message: String) {
        self.violation.get_or_insert(message);
    }

    pub fn take_violation(&mut self) -> Option<String> {
        self.violation.take()
    }

    pub fn told(&mut self, txn: &TxnId, outcome: &Outcome) {
        let now = committed(outcome);
        if let Some(before) = self.told.insert(txn.clone(), now) {
            if before != now {
                self.violation(format!(
                    "{txn}: a client was told committed={before}, then committed={now}"
                ));
            }
        }
    }

    pub fn accepted(&mut self, saga: &TxnId) {
        self.accepted.insert(saga.clone());
    }

    pub fn announced(&mut self, txn: &TxnId, outcome: &Outcome) {
        let now = committed(outcome);
        if let Some(before) = self.announced.insert(txn.clone(), now) {
            if before != now {
                self.violation(format!(
                    "{txn}: announced committed={before}, later committed={now}"
                ));
            }
        }
    }

    pub fn saga_terminal(&mut self, saga: &TxnId, outcome: &SagaOutcome) {
        if let Some(before) = self.saga_outcomes.insert(saga.clone(), outcome.clone()) {
            if before != *outcome {
                self.violation(format!("saga {saga}: announced {before}, later {outcome}"));
            }
        }
    }

    /// The invariants that hold at every moment.
    pub fn check_step(&self, parts: &[SimParticipant]) -> Result<(), String> {
        // txn -> (a branch committed somewhere, a branch aborted or voted no somewhere)
        let mut seen: BTreeMap<&TxnId, (bool, bool)> = BTreeMap::new();
        for p in parts {
            for (view, state) in [("visible", &p.visible), ("durable", &p.durable)] {
                for (name, a) in &state.accounts {
                    if a.available < 0 || a.held < 0 {
                        return Err(format!(
                            "p{} {view}: account {name} is negative: {a:?}",
                            p.index
                        ));
                    }
                }
                for ((txn, _), record) in &state.branches {
                    let entry = seen.entry(txn).or_default();
                    match record {
                        BranchRecord::Committed { .. } => entry.0 = true,
                        BranchRecord::Aborted { .. } | BranchRecord::VotedNo { .. } => {
                            entry.1 = true
                        }
                        BranchRecord::Prepared { .. } => {}
                    }
                }
            }
        }
        for (txn, (c, a)) in seen {
            if c && a {
                return Err(format!(
                    "atomicity broken: {txn} has a branch committed and another aborted"
                ));
            }
            if let Some(&told) = self.told.get(txn) {
                if told && a {
                    return Err(format!(
                        "{txn}: the client was told committed, but a branch aborted"
                    ));
                }
                if !told && c {
                    return Err(format!(
                        "{txn}: the client was told aborted, but a branch committed"
                    ));
                }
            }
            if let Some(&announced) = self.announced.get(txn) {
                if announced && a || !announced && c {
                    return Err(format!(
                        "{txn}: announced committed={announced}, but a participant disagrees"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The invariants of a settled cluster.
    pub fn check_end(
        &self,
        coord: &SimCoordinator,
        parts: &[SimParticipant],
        report: &mut Report,
    ) -> Result<(), String> {
        self.check_step(parts)?;
        let mut expected: Vec<PState> = self.initial.clone();
        let apply = |expected: &mut Vec<PState>, p: usize, op: &BankOp| {
            let (name, delta) = match op {
                BankOp::Debit { account, amount } => (account, -amount),
                BankOp::Credit { account, amount } => (account, *amount),
            };
            let account = expected[p].accounts.get_mut(name).unwrap_or_else(|| {
                panic!("an applied op names account {name:?}, which p{p} never had")
            });
            account.available += delta;
        };
        for (id, op) in &self.ops {
            match op {
                Op::TwoPc { txn, branches, .. } => {
                    let decision = coord.log.get(txn).and_then(|r| r.decision());
                    let commit = decision.as_ref().is_some_and(|d| d.is_commit());
                    if commit {
                        report.twopc_committed += 1;
                    } else {
                        report.twopc_aborted += 1;
                    }
                    if let Some(&told) = self.told.get(txn) {
                        if told != commit {
                            return Err(format!("{txn}: the client was told committed={told}, the log says {decision:?}"));
                        }
                    }
                    for (b, (p, bank_op)) in branches.iter().enumerate() {
                        let record = parts[*p].durable.branches.get(&(txn.clone(), b as u32));
                        let ok = match record {
                            Some(BranchRecord::Committed { .. }) => commit,
                            Some(BranchRecord::Prepared { .. }) => false,
                            Some(BranchRecord::Aborted { .. } | BranchRecord::VotedNo { .. })
                            | None => !commit,
                        };
                        if !ok {
                            return Err(format!(
                                "{txn} decided {decision:?}, but branch {b} at p{p} ends as {record:?}"
                            ));
                        }
                        if commit {
                            apply(&mut expected, *p, bank_op);
                        }
                    }
                }
                Op::Saga { saga, steps, .. } => {
                    let stored = coord.log.get_saga(saga);
                    let applied: Vec<bool> = steps
                        .iter()
                        .enumerate()
                        .map(|(s, (p, ..))| {
                            matches!(
                                parts[*p].durable.steps.get(&(saga.clone(), s as u32)),
                                Some(StepRecord::ActionSucceeded { .. })
                            )
                        })
                        .collect();
                    let Some(stored) = stored else {
                        if self.accepted.contains(saga) {
                            return Err(format!(
                                "saga {saga} was accepted but its spec is not in the log"
                            ));
                        }
                        if applied.iter().any(|a| *a) {
                            return Err(format!(
                                "saga {saga} was never stored, yet a step applied: {applied:?}"
                            ));
                        }
                        continue;
                    };
                    let progress = stored
                        .progress
                        .ok_or_else(|| format!("saga {saga} accepted, never progressed"))?;
                    let outcome = match (&progress.phase, &progress.outcome) {
                        (phase, Some(outcome)) if phase.is_terminal() => outcome.clone(),
                        (phase, outcome) => {
                            return Err(format!(
                                "saga {saga} unfinished: phase {phase:?}, outcome {outcome:?}"
                            ))
                        }
                    };
                    if let Some(announced) = self.saga_outcomes.get(saga) {
                        if *announced != outcome {
                            return Err(format!(
                                "saga {saga}: announced {announced}, the log says {outcome}"
                            ));
                        }
                    }
                    match outcome {
                        SagaOutcome::Completed => {
                            report.sagas_completed += 1;
                            if progress.phase != SagaPhase::Completed || !applied.iter().all(|a| *a)
                            {
                                return Err(format!(
                                    "saga {saga} completed, but its steps applied: {applied:?}"
                                ));
                            }
                            for (p, action, ..) in steps {
                                apply(&mut expected, *p, action);
                            }
                        }
                        SagaOutcome::Compensated { .. } | SagaOutcome::Aborted { .. } => {
                            report.sagas_compensated += 1;
                            if applied.iter().any(|a| *a) {
                                return Err(format!(
                                    "saga {saga} compensated, but steps still applied: {applied:?}"
                                ));
                            }
                        }
                    }
                }
            }
            let _ = id;
        }
        for (p, part) in parts.iter().enumerate() {
            for ((txn, b), record) in &part.durable.branches {
                if matches!(record, BranchRecord::Prepared { .. }) {
                    return Err(format!(
                        "p{p}: branch {txn}#{b} still prepared after the cluster settled"
                    ));
                }
            }
            let want: BTreeMap<&String, Account> =
                expected[p].accounts.iter().map(|(k, v)| (k, *v)).collect();
            for (name, account) in &part.durable.accounts {
                let expect = want.get(name).copied();
                if expect != Some(*account) {
                    return Err(format!(
                        "money not conserved: p{p} account {name} is {account:?}, expected {expect:?}"
                    ));
                }
            }
            if part.durable.accounts.len() != want.len() {
                return Err(format!("p{p}: accounts appeared or vanished"));
            }
            if part.visible != part.durable {
                return Err(format!(
                    "p{p}: settled, but its visible state is not durable"
                ));
            }
        }
        let total = |states: &[PState]| -> i64 {
            states
                .iter()
                .flat_map(|s| s.accounts.values())
                .map(|a| a.available + a.held)
                .sum()
        };
        let durable: Vec<PState> = parts.iter().map(|p| p.durable.clone()).collect();
        if total(&durable) != total(&self.initial) {
            return Err(format!(
                "money not conserved: {} at the start, {} at the end",
                total(&self.initial),
                total(&durable)
            ));
        }
        Ok(())
    }
}
