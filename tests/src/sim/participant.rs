//! An in-memory participant: the bank's business rules behind the SDK's real barriers, with a
//! group-commit flush and a crash model.
//!
//! The real participant (`tandem_participant::participant`) keeps its branch log, step log and
//! the bank's accounts in sled and runs each call in a sled transaction on the flusher
//! thread, releasing the answer only after the flush that covers it. This model keeps the same
//! three pieces of state in `BTreeMap`s and decides every call with the SDK's own pure rules,
//! [`tandem_participant::barrier::decide`] and [`tandem_participant::saga_barrier::decide`];
//! only the bank's account arithmetic (`participant/src/bank.rs`) is restated here, since the
//! real one reads and writes sled trees.
//!
//! Durability: a call's writes go into a batch applied to the visible state at once; the
//! answer is held until a flush covers the batch (group commit: one flush in flight, covering
//! every batch queued before it started). A crash keeps the flushed state plus a prefix of the
//! unflushed batches (sled writes its log in order and may have written some), loses every
//! held answer, and restarts the in-doubt resolver, whose first round asks about every
//! prepared branch.
//!
//! Planted bug ([`PlantedBug::YesBeforeDurable`], only for the test that proves the checker
//! can fail): a prepare that votes YES is answered at once and its batch is never flushed, as
//! if the participant forgot to force its PREPARED record before voting.

use std::collections::{BTreeMap, BTreeSet};

use tandem_common::{BranchIdx, SplitMix64, TxnId};
use tandem_coordinator::engine::types::Vote;
use tandem_coordinator::runtime::QueriedOutcome;
use tandem_participant::bank::{Account, BankOp};
use tandem_participant::barrier::{self, Action, BranchRecord, Call};
use tandem_participant::saga_barrier::{self, StepCall, StepDecision, StepRecord};
use tandem_participant::StepOutcome;

use super::net::{Answer, Msg};

/// A bug the simulation can switch on to prove that its checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A participant votes YES before (in fact without) making its PREPARED record durable.
    YesBeforeDurable,
    /// The in-doubt resolver takes a PENDING answer for COMMITTED.
    CommitOnPending,
}

impl PlantedBug {
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::YesBeforeDurable => "yes-before-durable",
            PlantedBug::CommitOnPending => "commit-on-pending",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [PlantedBug::YesBeforeDurable, PlantedBug::CommitOnPending]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

pub type BranchKey = (TxnId, u32);

/// One participant's state: the bank's accounts and the two barrier logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PState {
    pub accounts: BTreeMap<String, Account>,
    pub closed: BTreeSet<String>,
    pub branches: BTreeMap<BranchKey, BranchRecord>,
    pub steps: BTreeMap<BranchKey, StepRecord>,
}

#[derive(Debug, Clone)]
enum PWrite {
    Account(String, Account),
    Branch(BranchKey, BranchRecord),
    Step(BranchKey, StepRecord),
}

impl PState {
    fn apply(&mut self, write: &PWrite) {
        match write {
            PWrite::Account(name, account) => {
                self.accounts.insert(name.clone(), *account);
            }
            PWrite::Branch(key, record) => {
                self.branches.insert(key.clone(), record.clone());
            }
            PWrite::Step(key, record) => {
                self.steps.insert(key.clone(), record.clone());
            }
        }
    }
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    writes: Vec<PWrite>,
    /// The planted bug: never made durable.
    volatile: bool,
}

/// What the participant asks the simulator to do.
#[derive(Debug)]
pub enum POut {
    /// Send to the coordinator.
    Send(Msg),
    /// Start a flush covering batches up to `covers` (inclusive).
    Flush { covers: u64 },
    /// The barrier refused a call: a protocol violation the checker reports.
    Refused(String),
}

/// One simulated participant.
#[derive(Debug)]
pub struct SimParticipant {
    pub index: usize,
    pub up: bool,
    pub incarnation: u64,
    pub visible: PState,
    pub durable: PState,
    pending: Vec<Batch>,
    /// Answers waiting for the flush that covers their batch.
    held: Vec<(u64, Msg)>,
    next_seq: u64,
    flush_in_flight: bool,
    /// Minimum age of a prepared branch before the resolver asks (0 in the first round after
    /// a start).
    pub resolver_age_ms_min: u64,
    pub bug: Option<PlantedBug>,
}

/// The prepared-branch age after which the resolver asks, outside the first round.
pub const IN_DOUBT_AGE_MS_MIN: u64 = 500;

impl SimParticipant {
    pub fn new(index: usize, state: PState, bug: Option<PlantedBug>) -> Self {
        SimParticipant {
            index,
            up: true,
            incarnation: 1,
            visible: state.clone(),
            durable: state,
            pending: Vec::new(),
            held: Vec::new(),
            next_seq: 1,
            flush_in_flight: false,
            resolver_age_ms_min: 0,
            bug,
        }
    }

    /// Crashes: keeps a prefix of the unflushed batches (`rng` picks its length), loses the
    /// rest and every held answer. Returns how many batches were lost.
    pub fn crash(&mut self, rng: &mut SplitMix64) -> usize {
        let durable_candidates: Vec<&Batch> = self.pending.iter().filter(|b| !b.volatile).collect();
        let kept = (rng.next_u64() % (durable_candidates.len() as u64 + 1)) as usize;
        for batch in durable_candidates.iter().take(kept) {
            for write in &batch.writes {
                self.durable.apply(write);
            }
        }
        let lost = self.pending.len() - kept;
        self.pending.clear();
        self.held.clear();
        self.flush_in_flight = false;
        self.visible = self.durable.clone();
        self.up = false;
        lost
    }

    pub fn restart(&mut self) {
        self.up = true;
        self.incarnation += 1;
        self.resolver_age_ms_min = 0;
    }

    /// A flush covering batches up to `covers` completed.
    pub fn flush_done(&mut self, covers: u64, out: &mut Vec<POut>) {
        self.flush_in_flight = false;
        let (done, rest): (Vec<Batch>, Vec<Batch>) =
            self.pending.drain(..).partition(|b| b.seq <= covers);
        self.pending = rest;
        for batch in done.iter().filter(|b| !b.volatile) {
            for write in &batch.writes {
                self.durable.apply(write);
            }
        }
        let (release, keep): (Vec<_>, Vec<_>) =
            self.held.drain(..).partition(|(seq, _)| *seq <= covers);
        self.held = keep;
        out.extend(release.into_iter().map(|(_, msg)| POut::Send(msg)));
        self.maybe_flush(out);
    }

    fn maybe_flush(&mut self, out: &mut Vec<POut>) {
        if !self.flush_in_flight && self.pending.iter().any(|b| !b.volatile) {
            self.flush_in_flight = true;
            out.push(POut::Flush {
                covers: self.next_seq - 1,
            });
        }
    }

    /// Records a call's writes as one batch; `answer` is released once it is durable.
    fn commit_batch(&mut self, writes: Vec<PWrite>, answer: Option<Msg>, out: &mut Vec<POut>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        for write in &writes {
            self.visible.apply(write);
        }
        self.pending.push(Batch {
            seq,
            writes,
            volatile: false,
        });
        if let Some(answer) = answer {
            self.held.push((seq, answer));
        }
        self.maybe_flush(out);
    }

    /// The planted bug: applied, answered at once, never durable.
    fn commit_volatile(&mut self, writes: Vec<PWrite>, answer: Msg, out: &mut Vec<POut>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        for write in &writes {
            self.visible.apply(write);
        }
        self.pending.push(Batch {
            seq,
            writes,
            volatile: true,
        });
        out.push(POut::Send(answer));
    }

    /// Handles a message from the coordinator at `now_ms`.
    pub fn on_message(&mut self, now_ms: u64, msg: Msg, out: &mut Vec<POut>) {
        debug_assert!(self.up, "a message delivered to a participant that is down");
        match msg {
            Msg::Prepare {
                call,
                txn,
                branch,
                payload,
            } => self.prepare(now_ms, call, txn, branch, payload, out),
            Msg::Decision {
                call,
                txn,
                branch,
                commit,
            } => {
                let (writes, answer) = self.decide(now_ms, &txn, branch, commit, out);
                self.commit_batch(writes, Some(Msg::Answer { call, answer }), out);
            }
            Msg::Act {
                call,
                saga,
                step,
                payload,
            } => self.act(now_ms, call, saga, step, payload, out),
            Msg::Compensate {
                call,
                saga,
                step,
                payload,
            } => self.compensate(now_ms, call, saga, step, payload, out),
            Msg::QueryAnswer {
                txn,
                branch,
                outcome,
            } => {
                let commit = match outcome {
                    QueriedOutcome::Committed => true,
                    QueriedOutcome::Aborted => false,
                    QueriedOutcome::Pending => {
                        if self.bug != Some(PlantedBug::CommitOnPending) {
                            return;
                        }
                        true
                    }
                };
                let (writes, _) = self.decide(now_ms, &txn, branch, commit, out);
                self.commit_batch(writes, None, out);
            }
            Msg::Answer { .. } | Msg::Query { .. } => {
                panic!(
                    "participant {} got a message meant for the coordinator: {msg:?}",
                    self.index
                )
            }
        }
    }

    fn prepare(
        &mut self,
        now_ms: u64,
        call: u64,
        txn: TxnId,
        branch: BranchIdx,
        payload: Vec<u8>,
        out: &mut Vec<POut>,
    ) {
        let key = (txn.clone(), branch.0);
        let recorded = self.visible.branches.get(&key).cloned();
        let answer = |vote: Vote| Msg::Answer {
            call,
            answer: Answer::Vote(vote),
        };
        // As the real participant: a repeat must be the same request.
        if let Some(BranchRecord::Prepared {
            payload: prepared, ..
        }) = &recorded
        {
            if *prepared != payload {
                let reason =
                    format!("branch {txn} {branch} was already prepared with another payload");
                self.commit_batch(Vec::new(), Some(answer(Vote::No { reason })), out);
                return;
            }
        }
        match barrier::decide(recorded.as_ref(), Call::Prepare) {
            Action::RunPrepare => {
                let (vote, mut writes) = bank_prepare(&self.visible, &payload);
                match vote {
                    Vote::Yes => {
                        writes.push(PWrite::Branch(
                            key,
                            BranchRecord::Prepared {
                                resource: RESOURCE.to_string(),
                                payload,
                                coordinator: COORDINATOR_ADDR.to_string(),
                                prepared_ms: now_ms,
                            },
                        ));
                        if self.bug == Some(PlantedBug::YesBeforeDurable) {
                            self.commit_volatile(writes, answer(Vote::Yes), out);
                        } else {
                            self.commit_batch(writes, Some(answer(Vote::Yes)), out);
                        }
                    }
                    Vote::No { reason } => {
                        // The service's writes are discarded; only the vote is recorded.
                        let writes = vec![PWrite::Branch(
                            key,
                            BranchRecord::VotedNo {
                                reason: reason.clone(),
                            },
                        )];
                        self.commit_batch(writes, Some(answer(Vote::No { reason })), out);
                    }
                }
            }
            Action::AnswerVote { yes, reason } => {
                let vote = if yes { Vote::Yes } else { Vote::No { reason } };
                self.commit_batch(Vec::new(), Some(answer(vote)), out);
            }
            other @ (Action::RunCommit { .. }
            | Action::RunAbort { .. }
            | Action::RecordNullAbort
            | Action::AnswerDone
            | Action::Refuse { .. }) => {
                panic!("barrier answered {other:?} to a prepare")
            }
        }
    }

    /// A decision (delivered, or learnt by the resolver): the writes and the answer.
    fn decide(
        &mut self,
        now_ms: u64,
        txn: &TxnId,
        branch: BranchIdx,
        commit: bool,
        out: &mut Vec<POut>,
    ) -> (Vec<PWrite>, Answer) {
        let key = (txn.clone(), branch.0);
        let call = if commit { Call::Commit } else { Call::Abort };
        let recorded = self.visible.branches.get(&key).cloned();
        match barrier::decide(recorded.as_ref(), call) {
            Action::RunCommit { payload } => {
                let mut writes = bank_commit(&self.visible, &payload);
                writes.push(PWrite::Branch(
                    key,
                    BranchRecord::Committed {
                        resource: RESOURCE.to_string(),
                        committed_ms: now_ms,
                    },
                ));
                (writes, Answer::Done)
            }
            Action::RunAbort { payload } => {
                let mut writes = bank_abort(&self.visible, &payload);
                writes.push(PWrite::Branch(
                    key,
                    BranchRecord::Aborted {
                        was_prepared: true,
                        aborted_ms: now_ms,
                    },
                ));
                (writes, Answer::Done)
            }
            Action::RecordNullAbort => (
                vec![PWrite::Branch(
                    key,
                    BranchRecord::Aborted {
                        was_prepared: false,
                        aborted_ms: now_ms,
                    },
                )],
                Answer::Done,
            ),
            Action::AnswerDone => (Vec::new(), Answer::Done),
            Action::Refuse { why } => {
                let why = format!(
                    "participant {} refused {call:?} of {txn} {branch}: {why}",
                    self.index
                );
                out.push(POut::Refused(why.clone()));
                (Vec::new(), Answer::Refused(why))
            }
            other @ (Action::RunPrepare | Action::AnswerVote { .. }) => {
                panic!("barrier answered {other:?} to a decision")
            }
        }
    }

    fn act(
        &mut self,
        now_ms: u64,
        call: u64,
        saga: TxnId,
        step: u32,
        payload: Vec<u8>,
        out: &mut Vec<POut>,
    ) {
        let key = (saga, step);
        let recorded = self.visible.steps.get(&key).cloned();
        let answer = |outcome: StepOutcome| {
            let (succeeded, reason) = match outcome {
                StepOutcome::Succeeded => (true, String::new()),
                StepOutcome::Failed { reason } => (false, reason),
            };
            Msg::Answer {
                call,
                answer: Answer::Acted { succeeded, reason },
            }
        };
        match saga_barrier::decide(recorded.as_ref(), StepCall::Act) {
            StepDecision::RunAction => {
                let (outcome, mut writes) = bank_action(&self.visible, &payload);
                match &outcome {
                    StepOutcome::Succeeded => writes.push(PWrite::Step(
                        key,
                        StepRecord::ActionSucceeded {
                            resource: RESOURCE.to_string(),
                            acted_ms: now_ms,
                        },
                    )),
                    StepOutcome::Failed { reason } => {
                        writes = vec![PWrite::Step(
                            key,
                            StepRecord::ActionFailed {
                                resource: RESOURCE.to_string(),
                                reason: reason.clone(),
                                acted_ms: now_ms,
                            },
                        )]
                    }
                }
                self.commit_batch(writes, Some(answer(outcome)), out);
            }
            StepDecision::AnswerOutcome(outcome) => {
                self.commit_batch(Vec::new(), Some(answer(outcome)), out)
            }
            other @ (StepDecision::RunCompensation
            | StepDecision::RecordNullCompensation
            | StepDecision::AnswerDone) => panic!("saga barrier answered {other:?} to an act"),
        }
    }

    fn compensate(
        &mut self,
        now_ms: u64,
        call: u64,
        saga: TxnId,
        step: u32,
        payload: Vec<u8>,
        out: &mut Vec<POut>,
    ) {
        let key = (saga, step);
        let recorded = self.visible.steps.get(&key).cloned();
        let answer = |answer: Answer| Msg::Answer { call, answer };
        let compensated = |applied: bool| {
            PWrite::Step(
                key.clone(),
                StepRecord::Compensated {
                    action_applied: applied,
                    compensated_ms: now_ms,
                },
            )
        };
        match saga_barrier::decide(recorded.as_ref(), StepCall::Compensate) {
            StepDecision::RunCompensation => match bank_compensate(&self.visible, &payload) {
                Ok(mut writes) => {
                    writes.push(compensated(true));
                    self.commit_batch(writes, Some(answer(Answer::Done)), out);
                }
                Err(error) => {
                    self.commit_batch(Vec::new(), Some(answer(Answer::NotCompensated(error))), out)
                }
            },
            StepDecision::RecordNullCompensation => {
                self.commit_batch(vec![compensated(false)], Some(answer(Answer::Done)), out)
            }
            StepDecision::AnswerDone => {
                self.commit_batch(Vec::new(), Some(answer(Answer::Done)), out)
            }
            other @ (StepDecision::RunAction | StepDecision::AnswerOutcome(_)) => {
                panic!("saga barrier answered {other:?} to a compensate")
            }
        }
    }

    /// One round of the in-doubt resolver: the queries to send.
    pub fn resolver_round(&mut self, now_ms: u64) -> Vec<Msg> {
        let age_min = self.resolver_age_ms_min;
        self.resolver_age_ms_min = IN_DOUBT_AGE_MS_MIN;
        self.visible
            .branches
            .iter()
            .filter_map(|((txn, branch), record)| match record {
                BranchRecord::Prepared { prepared_ms, .. }
                    if now_ms.saturating_sub(*prepared_ms) >= age_min =>
                {
                    Some(Msg::Query {
                        txn: txn.clone(),
                        branch: BranchIdx(*branch),
                    })
                }
                _ => None,
            })
            .collect()
    }
}

/// The resource every branch and step names (the bank's).
pub const RESOURCE: &str = tandem_participant::bank::RESOURCE;
/// The coordinator's address as branch records store it.
pub const COORDINATOR_ADDR: &str = "sim://coordinator";

fn decode(payload: &[u8]) -> Result<BankOp, String> {
    serde_json::from_slice(payload).map_err(|e| format!("malformed bank payload: {e}"))
}

fn account_of(op: &BankOp) -> (&str, i64) {
    match op {
        BankOp::Debit { account, amount } | BankOp::Credit { account, amount } => {
            (account.as_str(), *amount)
        }
    }
}

// The bank's rules, restated from participant/src/bank.rs (which works on sled trees).

fn bank_prepare(state: &PState, payload: &[u8]) -> (Vote, Vec<PWrite>) {
    let no = |reason: String| (Vote::No { reason }, Vec::new());
    let op = match decode(payload) {
        Ok(op) => op,
        Err(reason) => return no(reason),
    };
    let (name, amount) = account_of(&op);
    let Some(a) = state.accounts.get(name).copied() else {
        return no(format!("no account {name:?}"));
    };
    match op {
        BankOp::Debit { .. } if a.available < amount => {
            no(format!("insufficient funds in {name:?}"))
        }
        BankOp::Debit { .. } => (
            Vote::Yes,
            vec![PWrite::Account(
                name.to_string(),
                Account {
                    available: a.available - amount,
                    held: a.held + amount,
                },
            )],
        ),
        BankOp::Credit { .. } if state.closed.contains(name) => {
            no(format!("account {name:?} is closed"))
        }
        BankOp::Credit { .. } => (Vote::Yes, Vec::new()),
    }
}

fn prepared_account(state: &PState, name: &str) -> Account {
    *state
        .accounts
        .get(name)
        .unwrap_or_else(|| panic!("account {name:?} vanished after prepare"))
}

fn bank_commit(state: &PState, payload: &[u8]) -> Vec<PWrite> {
    let op = decode(payload).expect("a prepared payload decodes");
    let (name, amount) = account_of(&op);
    let a = prepared_account(state, name);
    let after = match op {
        BankOp::Debit { .. } => {
            assert!(
                a.held >= amount,
                "{name}: commit of a debit of {amount} but only {} held",
                a.held
            );
            Account {
                held: a.held - amount,
                ..a
            }
        }
        BankOp::Credit { .. } => Account {
            available: a.available + amount,
            ..a
        },
    };
    vec![PWrite::Account(name.to_string(), after)]
}

fn bank_abort(state: &PState, payload: &[u8]) -> Vec<PWrite> {
    let op = decode(payload).expect("a prepared payload decodes");
    let (name, amount) = account_of(&op);
    match op {
        BankOp::Debit { .. } => {
            let a = prepared_account(state, name);
            assert!(
                a.held >= amount,
                "{name}: abort of a debit of {amount} but only {} held",
                a.held
            );
            vec![PWrite::Account(
                name.to_string(),
                Account {
                    available: a.available + amount,
                    held: a.held - amount,
                },
            )]
        }
        BankOp::Credit { .. } => Vec::new(),
    }
}

fn bank_action(state: &PState, payload: &[u8]) -> (StepOutcome, Vec<PWrite>) {
    let failed = |reason: String| (StepOutcome::Failed { reason }, Vec::new());
    let op = match decode(payload) {
        Ok(op) => op,
        Err(reason) => return failed(reason),
    };
    let (name, amount) = account_of(&op);
    let Some(a) = state.accounts.get(name).copied() else {
        return failed(format!("no account {name:?}"));
    };
    let available = match op {
        BankOp::Debit { .. } if a.available < amount => {
            return failed(format!("insufficient funds in {name:?}"))
        }
        BankOp::Debit { .. } => a.available - amount,
        BankOp::Credit { .. } if state.closed.contains(name) => {
            return failed(format!("account {name:?} is closed"))
        }
        BankOp::Credit { .. } => a.available + amount,
    };
    (
        StepOutcome::Succeeded,
        vec![PWrite::Account(
            name.to_string(),
            Account { available, ..a },
        )],
    )
}

fn bank_compensate(state: &PState, payload: &[u8]) -> Result<Vec<PWrite>, String> {
    let op = decode(payload)?;
    let (name, amount) = account_of(&op);
    let a = state
        .accounts
        .get(name)
        .copied()
        .ok_or_else(|| format!("account {name:?} vanished after its action"))?;
    let available = match op {
        BankOp::Credit { .. } => a.available + amount,
        BankOp::Debit { .. } if a.available < amount => {
            return Err(format!("cannot take {amount} back from {name:?} yet"))
        }
        BankOp::Debit { .. } => a.available - amount,
    };
    Ok(vec![PWrite::Account(
        name.to_string(),
        Account { available, ..a },
    )])
}

impl SimParticipant {
    /// Nothing waits for a flush and no branch is prepared.
    pub fn quiet(&self) -> bool {
        !self.flush_in_flight
            && self.pending.iter().all(|b| b.volatile)
            && self.held.is_empty()
            && self.prepared().is_empty()
    }

    /// The branches prepared in the visible state.
    pub fn prepared(&self) -> Vec<BranchKey> {
        self.visible
            .branches
            .iter()
            .filter(|(_, r)| matches!(r, BranchRecord::Prepared { .. }))
            .map(|(k, _)| k.clone())
            .collect()
    }
}
