//! The chaos run's verdict: the banks' data folders, read directly once every process has
//! stopped, held against the history of what the clients were told and the coordinator's
//! final answers.
//!
//! What is read from each bank ([`read_bank`]): every account, every branch still prepared,
//! the branch record of each 2PC branch and the step record of each saga step the workload
//! sent there, and the outcomes its saga callback handler received. What a record means for
//! money: a branch took effect if it is `Committed`; a saga step's action is in effect if its
//! record is `ActionSucceeded` (a compensated step is undone, a failed one left nothing).
//!
//! [`check`] derives every account's expected balance from those records alone and compares
//! it with the stored balance. With the per-operation checks (a 2PC seen committed applied at
//! every branch, a completed saga applied at both steps, ...) that proves each transfer took
//! effect exactly once or not at all, as it should.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use tandem_common::{BranchIdx, TxnId};
use tandem_participant::bank::{self, Account, ReceivedCallback};
use tandem_participant::barrier::BranchRecord;
use tandem_participant::saga_barrier::StepRecord;
use tandem_participant::{SagaPhase, SagaState};

use super::workload::{Answer, History, Op, OpKind};
use super::ChaosError;

/// Most violations listed per invariant (the count is always exact).
const VIOLATIONS_SHOWN_MAX: usize = 8;

/// The coordinator's last word on a 2PC transaction, asked once the cluster healed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalTxn {
    /// Every participant acknowledged the commit.
    Committed,
    /// Every participant acknowledged the abort.
    Aborted,
    /// No record: presumed aborted (the transaction never got far, or was forgotten before
    /// any decision).
    NotFound,
    /// Still deciding or delivering when the settling time ran out.
    Unsettled { phase: String },
    /// The coordinator could not be asked.
    Unknown { error: String },
}

/// The coordinator's last word on a saga.
#[derive(Debug, Clone)]
pub enum FinalSaga {
    State(SagaState),
    NotFound,
    Unknown { error: String },
}

/// What one stopped bank holds about the run.
#[derive(Debug, Default)]
pub struct BankData {
    pub accounts: BTreeMap<String, Account>,
    /// `(transaction, branch)` of every branch still prepared.
    pub prepared: Vec<(TxnId, u32)>,
    pub branches: BTreeMap<(TxnId, u32), BranchRecord>,
    pub steps: BTreeMap<(TxnId, u32), StepRecord>,
    pub callbacks: BTreeMap<String, ReceivedCallback>,
}

/// Reads a stopped bank's folder: its accounts, prepared branches and callbacks, and the
/// records of `branches` and `steps` (`(id, index)` pairs the workload sent to it).
pub fn read_bank(
    dir: &Path,
    branches: &[(TxnId, u32)],
    steps: &[(TxnId, u32)],
) -> Result<BankData, ChaosError> {
    let failed =
        |e: tandem_participant::Error| ChaosError::Read(format!("reading {}: {e}", dir.display()));
    let participant = bank::open(dir).map_err(failed)?;
    let mut data = BankData {
        accounts: bank::accounts(participant.db()).map_err(failed)?,
        callbacks: bank::saga_callbacks(participant.db()).map_err(failed)?,
        ..BankData::default()
    };
    for branch in participant.prepared_branches().map_err(failed)? {
        data.prepared.push((branch.ctx.txn, branch.ctx.branch.0));
    }
    for (txn, index) in branches {
        if let Some(record) = participant
            .branch_record(txn, BranchIdx(*index))
            .map_err(failed)?
        {
            data.branches.insert((txn.clone(), *index), record);
        }
    }
    for (saga, index) in steps {
        if let Some(record) = participant.step_record(saga, *index).map_err(failed)? {
            data.steps.insert((saga.clone(), *index), record);
        }
    }
    Ok(data)
}

/// The prepared branches of a stopped bank (the settling loop's question).
pub fn prepared_in(dir: &Path) -> Result<usize, ChaosError> {
    Ok(read_bank(dir, &[], &[])?.prepared.len())
}

/// One invariant's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub name: &'static str,
    /// How many things were checked (operations, accounts, ...).
    pub checked: usize,
    pub violations: Vec<String>,
}

impl Verdict {
    fn new(name: &'static str) -> Self {
        Verdict {
            name,
            checked: 0,
            violations: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    fn ok(&mut self) {
        self.checked += 1;
    }

    fn check(&mut self, holds: bool, violation: impl FnOnce() -> String) {
        self.checked += 1;
        if !holds {
            self.violations.push(violation());
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "{mark}  {} ({} checked", self.name, self.checked)?;
        if !self.passed() {
            write!(f, ", {} violated", self.violations.len())?;
        }
        f.write_str(")")?;
        for v in self.violations.iter().take(VIOLATIONS_SHOWN_MAX) {
            write!(f, "\n        - {v}")?;
        }
        if self.violations.len() > VIOLATIONS_SHOWN_MAX {
            write!(
                f,
                "\n        - ... and {} more",
                self.violations.len() - VIOLATIONS_SHOWN_MAX
            )?;
        }
        Ok(())
    }
}

/// Everything the checker looks at.
pub struct Evidence<'a> {
    pub history: &'a History,
    /// Each bank's data, by bank index.
    pub banks: &'a [BankData],
    pub initial: &'a [((usize, String), i64)],
    pub txns: &'a BTreeMap<TxnId, FinalTxn>,
    pub sagas: &'a BTreeMap<TxnId, FinalSaga>,
}

/// Checks every invariant; one verdict each, in a fixed order.
pub fn check(ev: &Evidence<'_>) -> Vec<Verdict> {
    let mut conserved = Verdict::new("money conserved");
    let mut negative = Verdict::new("no negative balance");
    let mut exact = Verdict::new("every balance = initial + the transfers applied (each once)");
    let mut atomic = Verdict::new("2PC atomic: no branch committed while another did not");
    let mut seen_committed = Verdict::new("2PC seen COMMITTED is applied at every branch");
    let mut seen_aborted = Verdict::new("2PC seen ABORTED is applied nowhere");
    let mut answers_agree =
        Verdict::new("2PC answers agree: every client answer and the coordinator's final one");
    let mut terminated =
        Verdict::new("every saga accepted (told the client, or known) has terminated");
    let mut saga_effects =
        Verdict::new("saga effects: completed = both steps applied, compensated = none");
    let mut must_fail = Verdict::new("transfers that must fail took no effect");
    let mut no_prepared = Verdict::new("no branch left prepared, no money held");
    let mut callbacks = Verdict::new("saga callbacks delivered once, with the outcome");

    let branch = |bank: usize, id: &TxnId, i: u32| ev.banks[bank].branches.get(&(id.clone(), i));
    let step = |bank: usize, id: &TxnId, i: u32| ev.banks[bank].steps.get(&(id.clone(), i));
    // Money moved by the records, per (bank, account).
    let mut moved: BTreeMap<(usize, String), i64> = BTreeMap::new();

    for (index, op) in ev.history.ops.iter().enumerate() {
        let entries: Vec<_> = ev.history.entries_of(index).collect();
        match op.kind {
            OpKind::TwoPc => {
                let debit = branch(op.from.0, &op.id, 0);
                let credit = branch(op.to.0, &op.id, 1);
                let applied =
                    |r: Option<&BranchRecord>| matches!(r, Some(BranchRecord::Committed { .. }));
                let (debited, credited) = (applied(debit), applied(credit));
                record_moves(&mut moved, op, debited, credited);
                let describe =
                    || describe_op(op, "2PC", debit.map(record_name), credit.map(record_name));
                atomic.check(debited == credited, describe);
                let told_committed = entries.iter().any(|e| e.answer == Answer::Committed);
                let told_aborted = entries
                    .iter()
                    .any(|e| matches!(e.answer, Answer::Aborted { .. }));
                if told_committed {
                    seen_committed.check(debited && credited, describe);
                }
                if told_aborted {
                    seen_aborted.check(!debited && !credited, describe);
                }
                match ev.txns.get(&op.id) {
                    Some(FinalTxn::Committed) => answers_agree
                        .check(!told_aborted && debited && credited, || {
                            format!("coordinator says committed; {}", describe())
                        }),
                    Some(FinalTxn::Aborted) | Some(FinalTxn::NotFound) => {
                        answers_agree.check(!told_committed && !debited && !credited, || {
                            format!(
                                "coordinator says aborted (or has no record); {}",
                                describe()
                            )
                        })
                    }
                    Some(other @ (FinalTxn::Unsettled { .. } | FinalTxn::Unknown { .. })) => {
                        answers_agree.check(false, || {
                            format!(
                                "no final answer from the coordinator: {other:?}; {}",
                                describe()
                            )
                        })
                    }
                    None => answers_agree.check(!(told_committed && told_aborted), describe),
                }
                if op.intent.must_fail() {
                    must_fail.check(!debited && !credited, || {
                        format!("{:?}: {}", op.intent, describe())
                    });
                }
            }
            OpKind::Saga => {
                let debit = step(op.from.0, &op.id, 0);
                let credit = step(op.to.0, &op.id, 1);
                let in_effect =
                    |r: Option<&StepRecord>| matches!(r, Some(StepRecord::ActionSucceeded { .. }));
                let (debited, credited) = (in_effect(debit), in_effect(credit));
                record_moves(&mut moved, op, debited, credited);
                let describe =
                    || describe_op(op, "saga", debit.map(step_name), credit.map(step_name));
                let accepted = entries.iter().any(|e| e.answer == Answer::Accepted);
                let final_state = match ev.sagas.get(&op.id) {
                    Some(FinalSaga::State(state)) => Some(state),
                    _ => None,
                };
                // Accepted as far as anyone knows: the client was told so, or the
                // coordinator knows the saga (its submit's answer may have been lost).
                if accepted || final_state.is_some() {
                    terminated.check(final_state.is_some_and(|s| s.terminal), || {
                        format!(
                            "final state {:?}; {}",
                            ev.sagas.get(&op.id).map(final_saga_name),
                            describe()
                        )
                    });
                }
                match final_state.map(|s| s.phase) {
                    Some(SagaPhase::Completed) => saga_effects.check(debited && credited, describe),
                    Some(SagaPhase::Compensated | SagaPhase::Aborted) => {
                        saga_effects.check(!debited && !credited, describe)
                    }
                    Some(SagaPhase::Running | SagaPhase::Compensating) => {}
                    None => saga_effects.check(debit.is_none() && credit.is_none(), || {
                        format!("never accepted, yet a step ran: {}", describe())
                    }),
                }
                // What a client's wait saw must be where the saga ended, if it was terminal.
                for entry in &entries {
                    if let (Answer::SagaState { phase }, Some(state)) = (&entry.answer, final_state)
                    {
                        if phase_is_terminal(*phase) {
                            saga_effects.check(*phase == state.phase, || {
                                format!(
                                    "the client saw {phase:?}, the coordinator ends at {:?}: {}",
                                    state.phase,
                                    describe()
                                )
                            });
                        }
                    }
                }
                if op.intent.must_fail() {
                    let completed = final_state.is_some_and(|s| s.phase == SagaPhase::Completed);
                    must_fail.check(!completed && !debited && !credited, || {
                        format!("{:?}: {}", op.intent, describe())
                    });
                }
                if let (Some(bank), Some(state)) = (op.callback, final_state) {
                    if state.terminal {
                        let record = ev.banks[bank].callbacks.get(op.id.as_str());
                        callbacks.check(
                            state.callback_delivered
                                && record.is_some_and(|r| {
                                    r.calls == 1 && r.outcome.phase == state.phase
                                }),
                            || {
                                format!(
                                    "saga {} ended {:?}, delivered: {}, bank {bank} recorded {:?}",
                                    op.id,
                                    state.phase,
                                    state.callback_delivered,
                                    record.map(|r| (r.calls, r.outcome.phase))
                                )
                            },
                        );
                    }
                }
            }
        }
    }

    // Balances.
    let mut initial_total = 0;
    let mut final_total = 0;
    for ((bank, account), start) in ev.initial {
        initial_total += start;
        let stored = ev.banks[*bank].accounts.get(account);
        let Some(stored) = stored else {
            exact.check(false, || format!("bank {bank} lost account {account}"));
            continue;
        };
        final_total += stored.available + stored.held;
        negative.check(stored.available >= 0 && stored.held >= 0, || {
            format!("bank {bank} {account}: {stored:?}")
        });
        no_prepared.check(stored.held == 0, || {
            format!("bank {bank} {account}: {} still held", stored.held)
        });
        let expected = start + moved.get(&(*bank, account.clone())).copied().unwrap_or(0);
        exact.check(stored.available + stored.held == expected, || {
            format!(
                "bank {bank} {account}: {} stored, {expected} expected from the records",
                stored.available + stored.held
            )
        });
    }
    for (bank, data) in ev.banks.iter().enumerate() {
        for account in data.accounts.keys() {
            let known = ev
                .initial
                .iter()
                .any(|((b, a), _)| *b == bank && a == account);
            exact.check(known, || {
                format!("bank {bank} has account {account} nobody opened")
            });
        }
        for (txn, branch) in &data.prepared {
            no_prepared.check(false, || {
                format!("bank {bank}: branch {branch} of {txn} is still prepared")
            });
        }
        if data.prepared.is_empty() {
            no_prepared.ok();
        }
    }
    conserved.check(initial_total == final_total, || {
        format!("{initial_total} at the start, {final_total} at the end")
    });

    vec![
        conserved,
        negative,
        exact,
        atomic,
        seen_committed,
        seen_aborted,
        answers_agree,
        terminated,
        saga_effects,
        must_fail,
        no_prepared,
        callbacks,
    ]
}

/// Adds the money a transfer's records say moved: its debit if `debited`, its credit if
/// `credited`.
fn record_moves(
    moved: &mut BTreeMap<(usize, String), i64>,
    op: &Op,
    debited: bool,
    credited: bool,
) {
    if debited {
        *moved.entry(op.from.clone()).or_default() -= op.amount;
    }
    if credited {
        *moved.entry(op.to.clone()).or_default() += op.amount;
    }
}

/// `2PC <id> (0 a1 -> 1 b0, 25): debit Some("committed"), credit Some("aborted")`.
fn describe_op(
    op: &Op,
    kind: &str,
    debit: Option<&'static str>,
    credit: Option<&'static str>,
) -> String {
    format!(
        "{kind} {} (bank {} {} -> bank {} {}, {}): debit {debit:?}, credit {credit:?}",
        op.id, op.from.0, op.from.1, op.to.0, op.to.1, op.amount
    )
}

fn phase_is_terminal(phase: SagaPhase) -> bool {
    match phase {
        SagaPhase::Completed | SagaPhase::Compensated | SagaPhase::Aborted => true,
        SagaPhase::Running | SagaPhase::Compensating => false,
    }
}

fn record_name(record: &BranchRecord) -> &'static str {
    match record {
        BranchRecord::Prepared { .. } => "prepared",
        BranchRecord::VotedNo { .. } => "voted no",
        BranchRecord::Committed { .. } => "committed",
        BranchRecord::Aborted { .. } => "aborted",
    }
}

fn step_name(record: &StepRecord) -> &'static str {
    match record {
        StepRecord::ActionSucceeded { .. } => "action succeeded",
        StepRecord::ActionFailed { .. } => "action failed",
        StepRecord::Compensated {
            action_applied: true,
            ..
        } => "compensated",
        StepRecord::Compensated {
            action_applied: false,
            ..
        } => "null-compensated",
    }
}

fn final_saga_name(saga: &FinalSaga) -> String {
    match saga {
        FinalSaga::State(state) => format!("{:?}", state.phase),
        FinalSaga::NotFound => "not found".into(),
        FinalSaga::Unknown { error } => format!("unknown ({error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::{CallKind, Entry, Intent, Op};

    fn id(n: u32) -> TxnId {
        TxnId::parse(&format!("1763850000000-t{n}")).unwrap()
    }

    fn op(n: u32, kind: OpKind) -> Op {
        Op {
            client: 0,
            kind,
            id: id(n),
            from: (0, "a0".into()),
            to: (1, "b0".into()),
            amount: 10,
            intent: Intent::Normal,
            callback: None,
        }
    }

    fn told(op: usize, call: CallKind, answer: Answer) -> Entry {
        Entry {
            op,
            call,
            requested_ms: 0,
            answered_ms: 1,
            answer,
        }
    }

    fn bank(account: &str, available: i64) -> BankData {
        BankData {
            accounts: BTreeMap::from([(account.to_string(), Account { available, held: 0 })]),
            ..BankData::default()
        }
    }

    fn failed(verdicts: &[Verdict]) -> Vec<&'static str> {
        verdicts
            .iter()
            .filter(|v| !v.passed())
            .map(|v| v.name)
            .collect()
    }

    /// A 2PC the client saw committed whose credit branch aborted, and a completed saga whose
    /// credit step was compensated: the checker must name each broken invariant.
    #[test]
    fn half_applied_transfers_are_reported() {
        let history = History {
            ops: vec![op(1, OpKind::TwoPc), op(2, OpKind::Saga)],
            entries: vec![
                told(0, CallKind::Execute2pc, Answer::Committed),
                told(1, CallKind::SubmitSaga, Answer::Accepted),
            ],
        };
        let initial = vec![((0, "a0".to_string()), 100), ((1, "b0".to_string()), 100)];
        // Both debits took effect (a0 lost 20), neither credit did (b0 unchanged).
        let mut a = bank("a0", 80);
        a.branches.insert(
            (id(1), 0),
            BranchRecord::Committed {
                resource: "bank".into(),
                committed_ms: 1,
            },
        );
        a.steps.insert(
            (id(2), 0),
            StepRecord::ActionSucceeded {
                resource: "bank".into(),
                acted_ms: 1,
            },
        );
        let mut b = bank("b0", 100);
        b.branches.insert(
            (id(1), 1),
            BranchRecord::Aborted {
                was_prepared: true,
                aborted_ms: 1,
            },
        );
        b.steps.insert(
            (id(2), 1),
            StepRecord::Compensated {
                action_applied: true,
                compensated_ms: 1,
            },
        );
        let saga_state = SagaState {
            id: id(2),
            phase: SagaPhase::Completed,
            terminal: true,
            failed_step: String::new(),
            reason: String::new(),
            steps: Vec::new(),
            stuck: false,
            callback_delivered: false,
            accepted_ms: 1,
            held: false,
        };
        let txns = BTreeMap::from([(id(1), FinalTxn::Committed)]);
        let sagas = BTreeMap::from([(id(2), FinalSaga::State(saga_state))]);
        let banks = [a, b];
        let verdicts = check(&Evidence {
            history: &history,
            banks: &banks,
            initial: &initial,
            txns: &txns,
            sagas: &sagas,
        });
        assert_eq!(
            failed(&verdicts),
            [
                "money conserved",
                "2PC atomic: no branch committed while another did not",
                "2PC seen COMMITTED is applied at every branch",
                "2PC answers agree: every client answer and the coordinator's final one",
                "saga effects: completed = both steps applied, compensated = none",
            ],
            "{}",
            verdicts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// The same transfers fully applied pass every invariant; a balance that moved without a
    /// record fails the exact-balance check.
    #[test]
    fn fully_applied_transfers_pass_and_unrecorded_money_fails() {
        let history = History {
            ops: vec![op(1, OpKind::TwoPc)],
            entries: vec![told(0, CallKind::Execute2pc, Answer::Committed)],
        };
        let initial = vec![((0, "a0".to_string()), 100), ((1, "b0".to_string()), 100)];
        let committed = BranchRecord::Committed {
            resource: "bank".into(),
            committed_ms: 1,
        };
        let mut a = bank("a0", 90);
        a.branches.insert((id(1), 0), committed.clone());
        let mut b = bank("b0", 110);
        b.branches.insert((id(1), 1), committed);
        let txns = BTreeMap::from([(id(1), FinalTxn::Committed)]);
        let sagas = BTreeMap::new();
        let mut banks = [a, b];
        let run = |banks: &[BankData]| {
            check(&Evidence {
                history: &history,
                banks,
                initial: &initial,
                txns: &txns,
                sagas: &sagas,
            })
        };
        assert!(failed(&run(&banks)).is_empty());
        // Money moved from a0 to b0 twice (applied twice, recorded once).
        banks[0].accounts.get_mut("a0").unwrap().available = 80;
        banks[1].accounts.get_mut("b0").unwrap().available = 120;
        assert_eq!(
            failed(&run(&banks)),
            ["every balance = initial + the transfers applied (each once)"]
        );
    }
}
