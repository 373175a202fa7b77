//! The bank sample under the participant testkit (`tandem_participant::testkit`): its 2PC
//! resource and its saga step driven with repeated, reordered and concurrent calls and crashes,
//! the bank's invariant checked after every call; and two deliberately broken banks, to prove
//! the testkit finds what it is meant to find.
//!
//! The bank's invariant, per account (so also in total):
//! - 2PC: `available + held` is the opening balance plus the net of every committed branch on
//!   the account, `held` is the sum of its prepared (YES, undecided) debits, and neither is
//!   ever negative;
//! - sagas: `available` is the opening balance plus every action whose effect stands, plus
//!   action and compensation of every compensated step (their sum is zero for a correct
//!   compensation); nothing is ever held; nothing is negative.
//!
//! These tests live here, not in `participant/`, because this crate enables the `testkit`
//! feature (as a dev-dependency), so `cargo test --workspace` runs them with no flag.

use std::collections::BTreeMap;

use futures::FutureExt;
use tandem_participant::bank::{self, Bank, BankOp, BankStep};
use tandem_participant::testkit::{
    Db, Known, SagaStepCheck, SplitMix64, StepPayload, TwoPhaseCheck, Violation,
};
use tandem_participant::{
    BranchContext, CompensableResource, ResourceError, ServiceTrees, StepContext, StepOutcome,
    TwoPhaseResource, Vote,
};

/// The accounts every check opens with; `shut` is closed (it pays but refuses credits).
const OPENING: [(&str, i64); 4] = [("a0", 100), ("a1", 100), ("a2", 100), ("shut", 50)];
/// Accounts payloads name: the open ones often, the closed one and an unknown one sometimes
/// (a NO vote, a failed action), so that every path is driven.
const NAMED: [&str; 5] = ["a0", "a1", "a2", "shut", "ghost"];
const AMOUNT_MAX: u64 = 70;

fn opening() -> BTreeMap<String, i64> {
    OPENING.iter().map(|(n, b)| (n.to_string(), *b)).collect()
}

async fn open_accounts(
    participant: tandem_participant::Participant,
) -> Result<(), tandem_participant::Error> {
    let accounts: Vec<(String, i64)> = opening().into_iter().collect();
    bank::ensure_accounts(&participant, &accounts).await?;
    bank::close_accounts(&participant, &["shut".to_string()]).await
}

fn op(payload: &[u8]) -> BankOp {
    serde_json::from_slice(payload).expect("the testkit hands back the payloads drawn here")
}

/// `(account, signed amount)`: a credit adds, a debit takes.
fn signed(payload: &[u8]) -> (String, i64) {
    match op(payload) {
        BankOp::Debit { account, amount } => (account, -amount),
        BankOp::Credit { account, amount } => (account, amount),
    }
}

/// An account (the open ones most often) and an amount.
fn draw_op(rng: &mut SplitMix64) -> (String, i64) {
    let r = rng.next_u64() % 100;
    let account = match r {
        0..=29 => NAMED[0],
        30..=59 => NAMED[1],
        60..=89 => NAMED[2],
        90..=95 => NAMED[3],
        _ => NAMED[4],
    };
    (
        account.to_string(),
        1 + (rng.next_u64() % AMOUNT_MAX) as i64,
    )
}

fn branch_payload(rng: &mut SplitMix64) -> Vec<u8> {
    let debit = rng.next_u64().is_multiple_of(2);
    let (account, amount) = draw_op(rng);
    if debit {
        BankOp::Debit { account, amount }.encode()
    } else {
        BankOp::Credit { account, amount }.encode()
    }
}

/// A saga step: a debit compensated by crediting it back, or a credit compensated by debiting
/// it back (as `bank::transfer_saga_steps` builds them).
fn step_payload(rng: &mut SplitMix64) -> StepPayload {
    let debit = rng.next_u64().is_multiple_of(2);
    let (account, amount) = draw_op(rng);
    let (debit_op, credit_op) = (
        BankOp::Debit {
            account: account.clone(),
            amount,
        },
        BankOp::Credit { account, amount },
    );
    if debit {
        StepPayload {
            action: debit_op.encode(),
            compensation: credit_op.encode(),
        }
    } else {
        StepPayload {
            action: credit_op.encode(),
            compensation: debit_op.encode(),
        }
    }
}

fn read_accounts(db: &Db) -> Result<BTreeMap<String, bank::Account>, String> {
    let accounts = bank::accounts(db).map_err(|e| format!("cannot read the accounts: {e}"))?;
    for (name, a) in &accounts {
        if a.available < 0 || a.held < 0 {
            return Err(format!("{name} is negative: {a:?}"));
        }
    }
    if accounts.keys().ne(opening().keys()) {
        return Err(format!(
            "the accounts are {:?}, not the opening ones",
            accounts.keys().collect::<Vec<_>>()
        ));
    }
    Ok(accounts)
}

/// The 2PC invariant (see the module docs).
fn two_phase_invariant(db: &Db, known: &Known<'_>) -> Result<(), String> {
    let accounts = read_accounts(db)?;
    let mut balance = opening();
    for branch in known.committed() {
        let (account, amount) = signed(branch.payload);
        *balance.get_mut(&account).ok_or_else(|| {
            format!(
                "{} {} committed on unknown account {account}",
                branch.txn, branch.branch
            )
        })? += amount;
    }
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    for branch in known.prepared() {
        if let BankOp::Debit { account, amount } = op(branch.payload) {
            *held.entry(account).or_default() += amount;
        }
    }
    for (name, a) in &accounts {
        if a.available + a.held != balance[name] {
            return Err(format!(
                "{name} holds {} in total ({a:?}), but its opening balance and the committed \
                 branches make {}",
                a.available + a.held,
                balance[name]
            ));
        }
        let prepared = held.get(name).copied().unwrap_or(0);
        if a.held != prepared {
            return Err(format!(
                "{name} has {} held, but its prepared debits are {prepared}",
                a.held
            ));
        }
    }
    Ok(())
}

/// The saga invariant (see the module docs).
fn saga_invariant(db: &Db, known: &Known<'_>) -> Result<(), String> {
    let accounts = read_accounts(db)?;
    let mut balance = opening();
    let mut apply = |payload: &[u8]| -> Result<(), String> {
        let (account, amount) = signed(payload);
        *balance
            .get_mut(&account)
            .ok_or_else(|| format!("an effect on unknown account {account}"))? += amount;
        Ok(())
    };
    for step in known.applied() {
        apply(step.action)?;
    }
    for step in known.compensated() {
        apply(step.action)?;
        apply(step.compensation)?;
    }
    for (name, a) in &accounts {
        if a.held != 0 {
            return Err(format!("{name} holds {} but sagas hold nothing", a.held));
        }
        if a.available != balance[name] {
            return Err(format!(
                "{name} has {} available, but its opening balance and the steps that took \
                 effect make {}",
                a.available, balance[name]
            ));
        }
    }
    Ok(())
}

/// The bank's full participant, as `bank::open` builds it, less the handler under test (which
/// the testkit registers, counted).
fn two_phase_check<R: TwoPhaseResource>(resource: R) -> TwoPhaseCheck<R> {
    TwoPhaseCheck::new(bank::RESOURCE, resource)
        .open(|builder| {
            builder
                .saga_step(bank::SAGA_STEP, BankStep)
                .saga_callback(bank::CALLBACK, bank::CallbackLog)
                .open()
        })
        .setup(open_accounts)
        .payloads(branch_payload)
        .invariant(two_phase_invariant)
}

fn saga_check<S: CompensableResource>(step: S) -> SagaStepCheck<S> {
    SagaStepCheck::new(bank::SAGA_STEP, step)
        .open(|builder| {
            builder
                .resource(bank::RESOURCE, Bank)
                .saga_callback(bank::CALLBACK, bank::CallbackLog)
                .open()
        })
        .setup(open_accounts)
        .payloads(step_payload)
        .invariant(saga_invariant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bank_resource_keeps_money_holds_and_the_barrier_under_the_testkit() {
    for seed in [1, 2] {
        let report = two_phase_check(Bank).rounds(150).seed(seed).run().await;
        println!("2pc: {report:?}");
        assert_eq!(report.rounds, 150);
        assert!(report.crashes > 10, "{report:?}");
        assert!(report.bursts > 20, "{report:?}");
        assert!(report.calls_not_run > 50, "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bank_saga_step_keeps_money_and_the_barrier_under_the_testkit() {
    for seed in [1, 2] {
        let report = saga_check(BankStep).rounds(150).seed(seed).run().await;
        println!("saga: {report:?}");
        assert_eq!(report.rounds, 150);
        assert!(report.crashes > 10, "{report:?}");
        assert!(report.bursts > 20, "{report:?}");
        assert!(report.calls_not_run > 50, "{report:?}");
    }
}

/// A bank whose prepare of a debit votes YES when the money is there but forgets to hold it
/// (so the same money can be promised twice).
struct NoHoldBank;

impl TwoPhaseResource for NoHoldBank {
    fn trees(&self) -> Vec<String> {
        Bank.trees()
    }

    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<Vote, ResourceError> {
        match op(payload) {
            BankOp::Debit { .. } => Ok(Vote::Yes),
            BankOp::Credit { .. } => Bank.prepare(ctx, payload, trees),
        }
    }

    fn commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        Bank.commit(ctx, payload, trees)
    }

    fn abort(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        Bank.abort(ctx, payload, trees)
    }
}

/// A saga step whose compensation of a debit gives back one more than was taken.
struct GenerousStep;

impl CompensableResource for GenerousStep {
    fn trees(&self) -> Vec<String> {
        BankStep.trees()
    }

    fn action(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<StepOutcome, ResourceError> {
        BankStep.action(ctx, payload, trees)
    }

    fn compensate(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        match op(payload) {
            BankOp::Credit { account, amount } => {
                let more = BankOp::Credit {
                    account,
                    amount: amount + 1,
                };
                BankStep.compensate(ctx, &more.encode(), trees)
            }
            BankOp::Debit { .. } => BankStep.compensate(ctx, payload, trees),
        }
    }
}

fn assert_names_the_replay(violation: &Violation, seed: u64) {
    assert_eq!(violation.seed, seed);
    let text = violation.to_string();
    assert!(text.contains(&format!(".seed({seed})")), "{text}");
    assert!(!violation.calls.is_empty(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_testkit_finds_a_prepare_that_does_not_hold_the_funds() {
    let violation = two_phase_check(NoHoldBank)
        .rounds(50)
        .seed(3)
        .try_run()
        .await
        .expect_err("a debit voted YES without a hold must break the invariant");
    println!("{violation}");
    assert!(
        violation.message.contains("invariant is broken")
            && violation.message.contains("prepared debits"),
        "{violation}"
    );
    assert_names_the_replay(&violation, 3);
    // The call that broke it is the last one shown: a YES to a debit.
    let last = violation.calls.last().unwrap();
    assert!(
        last.contains("debit") && last.contains("Yes"),
        "{violation}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_testkit_finds_a_compensation_that_gives_back_more_than_was_taken() {
    // `run` panics with the violation; a test of a broken step can catch that as well.
    let panic = std::panic::AssertUnwindSafe(saga_check(GenerousStep).rounds(50).seed(4).run())
        .catch_unwind()
        .await
        .expect_err("a compensation that credits too much must break the invariant");
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "a non-string panic".into());
    println!("{text}");
    assert!(text.contains("seed 4 round"), "{text}");
    assert!(text.contains("invariant is broken"), "{text}");
    assert!(text.contains(".seed(4)"), "{text}");
    assert!(text.contains("compensate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_seed_plays_the_same_violation() {
    let run = || two_phase_check(NoHoldBank).rounds(50).seed(11).try_run();
    let (first, second) = (run().await.unwrap_err(), run().await.unwrap_err());
    // Found at a call made alone (not inside a burst, whose interleaving is the scheduler's).
    assert!(!first.calls.last().unwrap().contains("at once"), "{first}");
    assert_eq!(first.round, second.round);
    assert_eq!(first.message, second.message);
}
