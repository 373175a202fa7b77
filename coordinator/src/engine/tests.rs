//! Scenario tests of the 2PC engine, one per behaviour, and a seeded randomized run.
//!
//! Each scenario feeds [`Engine::step`] the events the runtime would and asserts the exact
//! effects that come back, in order, and the status the engine reports between steps. The
//! engine's own `validate()` runs after every step. [`step`] prints every event and effect, so
//! a failing scenario shows its transcript.
//!
//! The randomized test ([`Sim`]) plays the runtime and the participants: it carries out the
//! effects, holds the answers, flushes and timers still to come, and picks which one arrives
//! next; it also repeats old events and crashes the coordinator. It checks the protocol's
//! invariants on every effect. Every message names the seed; to watch one seed step by step:
//! `TANDEM_SEED=<seed> cargo test -p tandem-coordinator --lib replay_one_seed -- --ignored --nocapture`.

use std::collections::{BTreeMap, BTreeSet};

use tandem_common::{Backoff, BranchIdx, SplitMix64, TxnId};

use super::types::{BranchPhase, BranchSpec, BranchTarget, Decision, TxnPhase, Vote};
use super::{Durability, Effect, Engine, EngineConfig, Event, Timer};
use crate::log::record::{Fingerprint, TxnRecord};

const T0_MS: u64 = 1_763_850_000_000;
const PREPARE_TIMEOUT_MS: u64 = 5_000;
const DEADLINE_MS: u64 = T0_MS + PREPARE_TIMEOUT_MS;
/// When a recovery scenario restarts the coordinator.
const RESTART_MS: u64 = T0_MS + 60_000;
const FINGERPRINT: Fingerprint = [7; 32];
const ENGINE_SEED: u64 = 42;

// ----------------------------------------------------------------------------------------
// Names, events and effects
// ----------------------------------------------------------------------------------------

fn txn_id(n: u32) -> TxnId {
    TxnId::parse(&format!("{T0_MS}-txn{n}")).expect("a well-formed id")
}

fn target(i: u32) -> BranchTarget {
    BranchTarget {
        participant: format!("http://p{i}:7000"),
        resource: "accounts".to_string(),
    }
}

fn targets(n: u32) -> Vec<BranchTarget> {
    (0..n).map(target).collect()
}

fn all(n: u32) -> Vec<u32> {
    (0..n).collect()
}

fn new_engine() -> Engine {
    Engine::new(EngineConfig::default(), ENGINE_SEED)
}

/// Feeds one event and prints it with the effects it produced.
fn step(engine: &mut Engine, now_ms: u64, event: Event) -> Vec<Effect> {
    println!("@{now_ms} -> {event:?}");
    let effects = engine.step(now_ms, event);
    for effect in &effects {
        println!("        <- {effect:?}");
    }
    effects
}

fn nothing() -> Vec<Effect> {
    Vec::new()
}

fn begin(id: &TxnId, n: u32) -> Event {
    Event::Begin {
        txn: id.clone(),
        branches: (0..n)
            .map(|i| BranchSpec {
                target: target(i),
                payload: format!("transfer-{i}").into_bytes(),
            })
            .collect(),
        fingerprint: FINGERPRINT,
        deadline_ms: DEADLINE_MS,
    }
}

fn yes(id: &TxnId, i: u32) -> Event {
    Event::Voted {
        txn: id.clone(),
        branch: BranchIdx(i),
        vote: Vote::Yes,
    }
}

fn no(id: &TxnId, i: u32) -> Event {
    Event::Voted {
        txn: id.clone(),
        branch: BranchIdx(i),
        vote: Vote::No {
            reason: "insufficient funds".to_string(),
        },
    }
}

/// The abort reason a client is given when branch `i` voted [`no`].
fn voted_no_reason(i: u32) -> String {
    format!("participant http://p{i}:7000 (branch #{i}) voted no: insufficient funds")
}

fn prepare_failed(id: &TxnId, i: u32) -> Event {
    Event::PrepareFailed {
        txn: id.clone(),
        branch: BranchIdx(i),
        error: "connection refused".to_string(),
    }
}

fn durable(id: &TxnId) -> Event {
    Event::DecisionDurable { txn: id.clone() }
}

fn ack(id: &TxnId, i: u32) -> Event {
    Event::Acknowledged {
        txn: id.clone(),
        branch: BranchIdx(i),
    }
}

fn delivery_failed(id: &TxnId, i: u32) -> Event {
    Event::DeliveryFailed {
        txn: id.clone(),
        branch: BranchIdx(i),
        error: "unavailable".to_string(),
    }
}

fn fired(id: &TxnId, timer: Timer) -> Event {
    Event::TimerFired {
        txn: id.clone(),
        timer,
    }
}

fn redeliver(i: u32) -> Timer {
    Timer::Redeliver {
        branch: BranchIdx(i),
    }
}

fn abort(reason: &str) -> Decision {
    Decision::Abort {
        reason: reason.to_string(),
    }
}

/// What `Begin` must produce: the lazy `Preparing` record, every prepare, the deadline.
fn began(id: &TxnId, n: u32) -> Vec<Effect> {
    let mut effects = vec![Effect::Persist {
        txn: id.clone(),
        record: TxnRecord::Preparing {
            branches: targets(n),
            fingerprint: FINGERPRINT,
            created_ms: T0_MS,
        },
        durability: Durability::Lazy,
    }];
    effects.extend((0..n).map(|i| Effect::SendPrepare {
        txn: id.clone(),
        branch: BranchIdx(i),
        target: target(i),
        payload: format!("transfer-{i}").into_bytes(),
        deadline_ms: DEADLINE_MS,
    }));
    effects.push(Effect::SetTimer {
        txn: id.clone(),
        timer: Timer::PrepareDeadline,
        at_ms: DEADLINE_MS,
    });
    effects
}

/// The forced write of the decision: the commit point.
fn persist_decision(id: &TxnId, n: u32, decision: &Decision, at_ms: u64) -> Effect {
    Effect::Persist {
        txn: id.clone(),
        record: TxnRecord::Decided {
            decision: decision.clone(),
            branches: targets(n),
            fingerprint: FINGERPRINT,
            decided_ms: at_ms,
        },
        durability: Durability::Forced,
    }
}

fn send_decision(id: &TxnId, i: u32, commit: bool) -> Effect {
    Effect::SendDecision {
        txn: id.clone(),
        branch: BranchIdx(i),
        target: target(i),
        commit,
    }
}

/// What `DecisionDurable` must produce: the decision to each of `branches`, then the reply.
fn announced(id: &TxnId, branches: &[u32], decision: &Decision) -> Vec<Effect> {
    let mut effects: Vec<Effect> = branches
        .iter()
        .map(|&i| send_decision(id, i, decision.is_commit()))
        .collect();
    effects.push(Effect::Reply {
        txn: id.clone(),
        outcome: decision.outcome(),
    });
    effects
}

/// What the last acknowledgement must produce: the lazy `Finished` record, then `Finished`.
fn finished(id: &TxnId, n: u32, decision: &Decision, at_ms: u64) -> Vec<Effect> {
    vec![
        Effect::Persist {
            txn: id.clone(),
            record: TxnRecord::Finished {
                decision: decision.clone(),
                branches: targets(n),
                branch_phases: vec![BranchPhase::Acknowledged; n as usize],
                fingerprint: FINGERPRINT,
                finished_ms: at_ms,
            },
            durability: Durability::Lazy,
        },
        Effect::Finished { txn: id.clone() },
    ]
}

fn phase(engine: &Engine, id: &TxnId) -> Option<TxnPhase> {
    engine.status(id).map(|s| s.phase)
}

fn branch_phases(engine: &Engine, id: &TxnId) -> Vec<BranchPhase> {
    let status = engine.status(id).expect("the transaction is in flight");
    status.branches.into_iter().map(|b| b.phase).collect()
}

// ----------------------------------------------------------------------------------------
// Set-ups (each asserts what it relies on)
// ----------------------------------------------------------------------------------------

/// Begins an `n`-branch transaction at `T0_MS`.
fn start(engine: &mut Engine, id: &TxnId, n: u32) {
    assert_eq!(step(engine, T0_MS, begin(id, n)), began(id, n));
}

/// Begins and collects a YES from every branch, at `T0_MS + 1`: commit decided, not durable.
fn decide_commit(engine: &mut Engine, id: &TxnId, n: u32) {
    start(engine, id, n);
    for i in 0..n {
        step(engine, T0_MS + 1, yes(id, i));
    }
    assert_eq!(phase(engine, id), Some(TxnPhase::Deciding));
}

/// Decides commit and makes it durable at `T0_MS + 2`: every branch was sent commit.
fn deliver_commit(engine: &mut Engine, id: &TxnId, n: u32) {
    decide_commit(engine, id, n);
    let effects = step(engine, T0_MS + 2, durable(id));
    assert_eq!(effects, announced(id, &all(n), &Decision::Commit));
}

/// Acknowledges every branch in `branches` at `now_ms`; the last one finishes the transaction.
fn ack_all(
    engine: &mut Engine,
    id: &TxnId,
    n: u32,
    branches: &[u32],
    decision: &Decision,
    now_ms: u64,
) {
    let (last, first) = branches
        .split_last()
        .expect("at least one branch to acknowledge");
    for &i in first {
        assert_eq!(
            step(engine, now_ms, ack(id, i)),
            nothing(),
            "ack from branch {i} while others are missing"
        );
    }
    assert_eq!(
        step(engine, now_ms, ack(id, *last)),
        finished(id, n, decision, now_ms)
    );
    assert_eq!(
        engine.status(id),
        None,
        "a finished transaction leaves the engine"
    );
    assert_eq!(engine.in_flight(), 0);
}

// ----------------------------------------------------------------------------------------
// Commit
// ----------------------------------------------------------------------------------------

/// The whole commit path: begin, a YES from every branch in `vote_order`, the decision made
/// durable, every acknowledgement.
fn assert_commits(vote_order: &[u32]) {
    let n = vote_order.len() as u32;
    let id = txn_id(1);
    let mut engine = new_engine();

    assert_eq!(step(&mut engine, T0_MS, begin(&id, n)), began(&id, n));
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Preparing));

    let (last, first) = vote_order.split_last().expect("at least one branch");
    for &i in first {
        assert_eq!(
            step(&mut engine, T0_MS + 10, yes(&id, i)),
            nothing(),
            "YES from branch {i} decides nothing while others are missing"
        );
        assert_eq!(phase(&engine, &id), Some(TxnPhase::Preparing));
    }

    // The last YES yields the forced decision alone: no commit message, no reply.
    let effects = step(&mut engine, T0_MS + 20, yes(&id, *last));
    assert_eq!(
        effects,
        vec![persist_decision(&id, n, &Decision::Commit, T0_MS + 20)]
    );
    let status = engine.status(&id).expect("in flight");
    assert_eq!(status.phase, TxnPhase::Deciding);
    assert_eq!(
        status.decision, None,
        "the decision is not reported before it is durable"
    );
    assert_eq!(engine.lookup(&id), Some((&FINGERPRINT, None)));
    assert!(status
        .branches
        .iter()
        .all(|b| b.phase == BranchPhase::VotedYes));

    // Durable: commit to every branch, in branch order, then the client's reply.
    let effects = step(&mut engine, T0_MS + 30, durable(&id));
    assert_eq!(effects, announced(&id, &all(n), &Decision::Commit));
    let status = engine.status(&id).expect("in flight");
    assert_eq!(status.phase, TxnPhase::Delivering);
    assert_eq!(status.decision, Some(Decision::Commit));
    assert_eq!(
        engine.lookup(&id),
        Some((&FINGERPRINT, Some(&Decision::Commit)))
    );
    assert!(status.branches.iter().all(|b| b.attempts == 1));

    ack_all(&mut engine, &id, n, &all(n), &Decision::Commit, T0_MS + 40);
    assert_eq!(engine.lookup(&id), None);
}

#[test]
fn commit_with_one_branch() {
    assert_commits(&[0]);
}

#[test]
fn commit_with_two_branches() {
    assert_commits(&[0, 1]);
}

#[test]
fn commit_with_eight_branches_voting_out_of_order() {
    assert_commits(&[5, 2, 7, 0, 3, 6, 1, 4]);
}

#[test]
fn acknowledgements_in_any_order_finish_on_the_last() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 3);
    ack_all(
        &mut engine,
        &id,
        3,
        &[2, 0, 1],
        &Decision::Commit,
        T0_MS + 3,
    );
}

// ----------------------------------------------------------------------------------------
// Abort: a NO vote, a failed prepare, the deadline
// ----------------------------------------------------------------------------------------

/// Three branches: those in `yes_first` vote YES, then `no_branch` votes NO. The abort is
/// sent to every branch but the one that voted NO (it holds nothing), including those that
/// had not voted.
fn assert_no_vote_aborts(yes_first: &[u32], no_branch: u32) {
    let n = 3;
    let id = txn_id(1);
    let mut engine = new_engine();
    let case = format!("YES from {yes_first:?}, then NO from branch {no_branch}");
    start(&mut engine, &id, n);
    for &i in yes_first {
        assert_eq!(
            step(&mut engine, T0_MS + 1, yes(&id, i)),
            nothing(),
            "{case}"
        );
    }

    let decision = abort(&voted_no_reason(no_branch));
    let effects = step(&mut engine, T0_MS + 2, no(&id, no_branch));
    assert_eq!(
        effects,
        vec![persist_decision(&id, n, &decision, T0_MS + 2)],
        "{case}"
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Deciding), "{case}");

    let others: Vec<u32> = (0..n).filter(|&i| i != no_branch).collect();
    let effects = step(&mut engine, T0_MS + 3, durable(&id));
    assert_eq!(effects, announced(&id, &others, &decision), "{case}");
    let expected: Vec<BranchPhase> = (0..n)
        .map(|i| match i {
            _ if i == no_branch => BranchPhase::Acknowledged,
            _ if yes_first.contains(&i) => BranchPhase::VotedYes,
            _ => BranchPhase::Preparing,
        })
        .collect();
    assert_eq!(branch_phases(&engine, &id), expected, "{case}");

    ack_all(&mut engine, &id, n, &others, &decision, T0_MS + 4);
}

#[test]
fn no_vote_from_the_first_branch_aborts_before_any_other_vote() {
    assert_no_vote_aborts(&[], 0);
}

#[test]
fn no_vote_from_a_middle_branch_after_a_yes_aborts() {
    assert_no_vote_aborts(&[0], 1);
}

#[test]
fn no_vote_from_the_last_branch_after_every_other_yes_aborts() {
    assert_no_vote_aborts(&[0, 1], 2);
}

#[test]
fn no_vote_at_any_position_before_or_after_any_yes_votes_aborts() {
    for no_branch in 0..3 {
        let others: Vec<u32> = (0..3).filter(|&i| i != no_branch).collect();
        for yes_first in [vec![], vec![others[0]], vec![others[1]], others.clone()] {
            assert_no_vote_aborts(&yes_first, no_branch);
        }
    }
}

#[test]
fn lone_branch_voting_no_finishes_as_soon_as_the_abort_is_durable() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 1);
    let decision = abort(&voted_no_reason(0));
    assert_eq!(
        step(&mut engine, T0_MS + 1, no(&id, 0)),
        vec![persist_decision(&id, 1, &decision, T0_MS + 1)]
    );

    // No branch needs the abort: the reply, then the Finished record, stamped now.
    let mut expected = announced(&id, &[], &decision);
    expected.extend(finished(&id, 1, &decision, T0_MS + 2));
    assert_eq!(step(&mut engine, T0_MS + 2, durable(&id)), expected);
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn prepare_failure_aborts_and_the_abort_goes_to_every_branch() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 3);
    assert_eq!(step(&mut engine, T0_MS + 1, yes(&id, 0)), nothing());

    let decision =
        abort("participant http://p1:7000 (branch #1) did not answer prepare: connection refused");
    let effects = step(&mut engine, T0_MS + 2, prepare_failed(&id, 1));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 3, &decision, T0_MS + 2)]
    );
    let status = engine.status(&id).expect("in flight");
    assert_eq!(status.phase, TxnPhase::Deciding);
    assert_eq!(
        status.branches[1].last_error.as_deref(),
        Some("connection refused")
    );

    // The unreachable branch may have prepared all the same: it gets the abort too.
    assert_eq!(
        step(&mut engine, T0_MS + 3, durable(&id)),
        announced(&id, &all(3), &decision)
    );
    ack_all(&mut engine, &id, 3, &all(3), &decision, T0_MS + 4);
}

#[test]
fn prepare_failure_of_a_branch_that_voted_yes_is_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(step(&mut engine, T0_MS + 1, yes(&id, 0)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 2, prepare_failed(&id, 0)),
        nothing()
    );
    assert_eq!(
        branch_phases(&engine, &id),
        [BranchPhase::VotedYes, BranchPhase::Preparing]
    );
    let effects = step(&mut engine, T0_MS + 3, yes(&id, 1));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 2, &Decision::Commit, T0_MS + 3)]
    );
}

#[test]
fn prepare_failure_after_the_decision_changes_nothing() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 3);
    let decision = abort(&voted_no_reason(0));
    assert_eq!(
        step(&mut engine, T0_MS + 1, no(&id, 0)),
        vec![persist_decision(&id, 3, &decision, T0_MS + 1)]
    );
    assert_eq!(
        step(&mut engine, T0_MS + 2, prepare_failed(&id, 1)),
        nothing(),
        "while deciding"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 3, durable(&id)),
        announced(&id, &[1, 2], &decision)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, prepare_failed(&id, 2)),
        nothing(),
        "while delivering"
    );
    assert_eq!(
        engine.status(&id).expect("in flight").decision,
        Some(decision)
    );
}

#[test]
fn prepare_deadline_aborts_naming_the_branches_still_waiting() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 3);
    assert_eq!(step(&mut engine, T0_MS + 1, yes(&id, 1)), nothing());

    let decision = abort("prepare deadline passed (5000 ms) waiting for branch #0 at http://p0:7000, branch #2 at http://p2:7000");
    let effects = step(&mut engine, DEADLINE_MS, fired(&id, Timer::PrepareDeadline));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 3, &decision, DEADLINE_MS)]
    );
    assert_eq!(
        step(&mut engine, DEADLINE_MS + 1, yes(&id, 0)),
        nothing(),
        "a YES after the deadline is too late"
    );

    assert_eq!(
        step(&mut engine, DEADLINE_MS + 2, durable(&id)),
        announced(&id, &all(3), &decision)
    );
    ack_all(&mut engine, &id, 3, &all(3), &decision, DEADLINE_MS + 3);
}

#[test]
fn prepare_deadline_after_the_commit_decision_is_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    decide_commit(&mut engine, &id, 2);
    assert_eq!(
        step(&mut engine, DEADLINE_MS, fired(&id, Timer::PrepareDeadline)),
        nothing(),
        "while deciding"
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Deciding));

    assert_eq!(
        step(&mut engine, DEADLINE_MS + 1, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
    assert_eq!(
        step(
            &mut engine,
            DEADLINE_MS + 2,
            fired(&id, Timer::PrepareDeadline)
        ),
        nothing(),
        "while delivering"
    );
    assert_eq!(
        engine.status(&id).expect("in flight").decision,
        Some(Decision::Commit)
    );
    ack_all(
        &mut engine,
        &id,
        2,
        &all(2),
        &Decision::Commit,
        DEADLINE_MS + 3,
    );
}

// ----------------------------------------------------------------------------------------
// Duplicates, reordering, unknown transactions
// ----------------------------------------------------------------------------------------

#[test]
fn duplicate_yes_vote_is_counted_once() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(step(&mut engine, T0_MS + 1, yes(&id, 0)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 2, yes(&id, 0)),
        nothing(),
        "one branch twice is not two branches"
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Preparing));
    let effects = step(&mut engine, T0_MS + 3, yes(&id, 1));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 2, &Decision::Commit, T0_MS + 3)]
    );
}

#[test]
fn votes_after_the_decision_change_nothing() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 3);
    let decision = abort(&voted_no_reason(0));
    assert_eq!(
        step(&mut engine, T0_MS + 1, no(&id, 0)),
        vec![persist_decision(&id, 3, &decision, T0_MS + 1)]
    );
    assert_eq!(
        step(&mut engine, T0_MS + 2, yes(&id, 1)),
        nothing(),
        "a late YES while deciding"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 2, no(&id, 0)),
        nothing(),
        "a repeated NO while deciding"
    );

    assert_eq!(
        step(&mut engine, T0_MS + 3, durable(&id)),
        announced(&id, &[1, 2], &decision)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, yes(&id, 2)),
        nothing(),
        "a late YES while delivering"
    );
    let expected = [
        BranchPhase::Acknowledged,
        BranchPhase::Preparing,
        BranchPhase::Preparing,
    ];
    assert_eq!(
        branch_phases(&engine, &id),
        expected,
        "late votes are not recorded"
    );
    assert_eq!(
        engine.status(&id).expect("in flight").decision,
        Some(decision)
    );
}

#[test]
fn commit_decision_is_not_undone_by_a_later_no_vote() {
    let id = txn_id(1);
    let mut engine = new_engine();
    decide_commit(&mut engine, &id, 2);
    assert_eq!(
        step(&mut engine, T0_MS + 2, no(&id, 1)),
        nothing(),
        "a contradicting NO while deciding"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 3, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, no(&id, 0)),
        nothing(),
        "a contradicting NO while delivering"
    );
    ack_all(&mut engine, &id, 2, &all(2), &Decision::Commit, T0_MS + 5);
}

#[test]
fn events_for_a_branch_the_transaction_does_not_have_are_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(step(&mut engine, T0_MS + 1, yes(&id, 5)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 1, prepare_failed(&id, 5)),
        nothing()
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Preparing));
    assert_eq!(step(&mut engine, T0_MS + 2, yes(&id, 0)), nothing());
    let effects = step(&mut engine, T0_MS + 3, yes(&id, 1));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 2, &Decision::Commit, T0_MS + 3)]
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 5, delivery_failed(&id, 5)),
        nothing()
    );
    assert_eq!(
        step(&mut engine, T0_MS + 5, fired(&id, redeliver(5))),
        nothing()
    );
    assert_eq!(step(&mut engine, T0_MS + 5, ack(&id, 5)), nothing());
    ack_all(&mut engine, &id, 2, &all(2), &Decision::Commit, T0_MS + 6);
}

#[test]
fn acknowledgements_before_the_decision_is_durable_are_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(
        step(&mut engine, T0_MS + 1, ack(&id, 0)),
        nothing(),
        "while preparing"
    );
    assert_eq!(
        branch_phases(&engine, &id),
        [BranchPhase::Preparing, BranchPhase::Preparing]
    );

    step(&mut engine, T0_MS + 2, yes(&id, 0));
    step(&mut engine, T0_MS + 2, yes(&id, 1));
    assert_eq!(
        step(&mut engine, T0_MS + 3, ack(&id, 0)),
        nothing(),
        "while deciding"
    );
    assert_eq!(
        branch_phases(&engine, &id),
        [BranchPhase::VotedYes, BranchPhase::VotedYes]
    );

    // The early acknowledgement counted for nothing: branch 0 is sent commit like branch 1.
    assert_eq!(
        step(&mut engine, T0_MS + 4, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
    ack_all(&mut engine, &id, 2, &all(2), &Decision::Commit, T0_MS + 5);
}

#[test]
fn duplicate_acknowledgements_finish_once() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 2);
    assert_eq!(step(&mut engine, T0_MS + 3, ack(&id, 0)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 4, ack(&id, 0)),
        nothing(),
        "the same branch twice does not finish"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 5, ack(&id, 1)),
        finished(&id, 2, &Decision::Commit, T0_MS + 5)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 6, ack(&id, 1)),
        nothing(),
        "after finishing"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 6, ack(&id, 0)),
        nothing(),
        "after finishing"
    );
    assert_eq!(engine.in_flight(), 0);
}

/// A second flush completion for one decision is a runtime bug; the engine stops.
#[test]
#[should_panic(expected = "DecisionDurable in phase Delivering")]
fn decision_durable_twice_stops_the_engine() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 2);
    step(&mut engine, T0_MS + 3, durable(&id));
}

/// A flush completion before any decision is a runtime bug; the engine stops.
#[test]
#[should_panic(expected = "DecisionDurable in phase Preparing")]
fn decision_durable_before_a_decision_stops_the_engine() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    step(&mut engine, T0_MS + 1, durable(&id));
}

#[test]
fn decision_durable_after_finishing_is_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 1);
    ack_all(&mut engine, &id, 1, &[0], &Decision::Commit, T0_MS + 3);
    assert_eq!(step(&mut engine, T0_MS + 4, durable(&id)), nothing());
}

/// The runtime routes a client's retry to the transaction in flight; a second Begin is a bug.
#[test]
#[should_panic(expected = "already in flight")]
fn begin_for_a_transaction_in_flight_stops_the_engine() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    step(&mut engine, T0_MS + 1, begin(&id, 2));
}

#[test]
fn events_for_an_unknown_transaction_emit_nothing() {
    let known = txn_id(1);
    let unknown = txn_id(2);
    let mut engine = new_engine();
    start(&mut engine, &known, 2);
    step(&mut engine, T0_MS + 1, yes(&known, 0));
    let before = engine.status(&known);

    let events = [
        yes(&unknown, 0),
        no(&unknown, 0),
        prepare_failed(&unknown, 0),
        durable(&unknown),
        ack(&unknown, 0),
        delivery_failed(&unknown, 0),
        fired(&unknown, Timer::PrepareDeadline),
        fired(&unknown, redeliver(0)),
    ];
    for event in events {
        let what = format!("{event:?}");
        assert_eq!(step(&mut engine, T0_MS + 2, event), nothing(), "{what}");
    }
    assert_eq!(engine.status(&unknown), None);
    assert_eq!(
        engine.status(&known),
        before,
        "another transaction's events leave this one alone"
    );
    assert_eq!(engine.in_flight(), 1);
}

#[test]
fn stale_timers_after_finishing_emit_nothing() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 1);
    let effects = step(&mut engine, T0_MS + 3, delivery_failed(&id, 0));
    let [Effect::SetTimer { at_ms, .. }] = effects.as_slice() else {
        panic!("expected one redelivery timer, got {effects:?}");
    };
    let at_ms = *at_ms;
    // The first delivery's acknowledgement arrives late, before the redelivery timer.
    ack_all(&mut engine, &id, 1, &[0], &Decision::Commit, T0_MS + 4);
    assert_eq!(
        step(&mut engine, at_ms, fired(&id, redeliver(0))),
        nothing()
    );
    assert_eq!(
        step(&mut engine, DEADLINE_MS, fired(&id, Timer::PrepareDeadline)),
        nothing()
    );
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn redelivery_timer_before_the_decision_is_announced_is_ignored() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(
        step(&mut engine, T0_MS + 1, fired(&id, redeliver(0))),
        nothing(),
        "while preparing"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 1, delivery_failed(&id, 0)),
        nothing(),
        "while preparing"
    );
    step(&mut engine, T0_MS + 2, yes(&id, 0));
    step(&mut engine, T0_MS + 2, yes(&id, 1));
    assert_eq!(
        step(&mut engine, T0_MS + 3, fired(&id, redeliver(0))),
        nothing(),
        "while deciding"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 3, delivery_failed(&id, 0)),
        nothing(),
        "while deciding"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
}

#[test]
fn redelivery_to_an_acknowledged_branch_is_skipped() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 2);
    let effects = step(&mut engine, T0_MS + 3, delivery_failed(&id, 0));
    assert!(
        matches!(effects.as_slice(), [Effect::SetTimer { .. }]),
        "{effects:?}"
    );
    // A slow acknowledgement of the first delivery overtakes the failure report's timer.
    assert_eq!(step(&mut engine, T0_MS + 4, ack(&id, 0)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 100, fired(&id, redeliver(0))),
        nothing()
    );
    assert_eq!(
        step(&mut engine, T0_MS + 101, delivery_failed(&id, 0)),
        nothing(),
        "no timer for an acknowledged branch"
    );
    ack_all(&mut engine, &id, 2, &[1], &Decision::Commit, T0_MS + 102);
}

// ----------------------------------------------------------------------------------------
// Redelivery
// ----------------------------------------------------------------------------------------

/// Asserts `effects` is exactly one redelivery timer for branch `i`, set `delay` after
/// `now_ms` with `delay` in the jitter band of `min(50 ms * 2^retry, 5000 ms)`; returns when.
fn assert_redelivery_timer(effects: &[Effect], id: &TxnId, i: u32, now_ms: u64, retry: u32) -> u64 {
    let [Effect::SetTimer { txn, timer, at_ms }] = effects else {
        panic!("retry {retry}: expected one redelivery timer, got {effects:?}");
    };
    assert_eq!((txn, *timer), (id, redeliver(i)), "retry {retry}");
    let full_ms = (50u64 << retry).min(5_000);
    let delay_ms = at_ms - now_ms;
    assert!(
        (full_ms / 2..=full_ms).contains(&delay_ms),
        "retry {retry}: waits {delay_ms} ms, outside [{}, {full_ms}]",
        full_ms / 2
    );
    *at_ms
}

#[test]
fn delivery_failures_back_off_exponentially_with_jitter_up_to_the_cap() {
    let backoff = Backoff::default();
    assert_eq!(
        (backoff.initial_ms, backoff.multiplier, backoff.max_ms),
        (50, 2.0, 5_000)
    );
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 1);

    let mut now_ms = T0_MS + 3;
    let mut delays_ms = Vec::new();
    for retry in 0..12 {
        let effects = step(&mut engine, now_ms, delivery_failed(&id, 0));
        let at_ms = assert_redelivery_timer(&effects, &id, 0, now_ms, retry);
        delays_ms.push(at_ms - now_ms);
        now_ms = at_ms;
        let effects = step(&mut engine, now_ms, fired(&id, redeliver(0)));
        assert_eq!(
            effects,
            vec![send_decision(&id, 0, true)],
            "retry {retry}: the same decision again"
        );
        let status = engine.status(&id).expect("in flight");
        assert_eq!(status.decision, Some(Decision::Commit), "retry {retry}");
        assert_eq!(status.branches[0].attempts, retry + 2, "retry {retry}");
        assert_eq!(
            status.branches[0].last_error.as_deref(),
            Some("unavailable")
        );
    }
    let capped_ms = &delays_ms[7..];
    assert!(
        capped_ms.iter().any(|&d| d != capped_ms[0]),
        "no jitter in {delays_ms:?}"
    );

    ack_all(&mut engine, &id, 1, &[0], &Decision::Commit, now_ms + 1);
}

#[test]
fn backoff_is_counted_per_branch() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 2);
    let mut now_ms = T0_MS + 3;
    for retry in 0..4 {
        let effects = step(&mut engine, now_ms, delivery_failed(&id, 0));
        now_ms = assert_redelivery_timer(&effects, &id, 0, now_ms, retry);
        step(&mut engine, now_ms, fired(&id, redeliver(0)));
    }
    // Branch 1's first failure starts from the initial delay, whatever branch 0 went through.
    let effects = step(&mut engine, now_ms, delivery_failed(&id, 1));
    assert_redelivery_timer(&effects, &id, 1, now_ms, 0);
}

#[test]
fn redelivery_sends_an_abort_again_unchanged() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    let decision = abort(&voted_no_reason(0));
    step(&mut engine, T0_MS + 1, no(&id, 0));
    assert_eq!(
        step(&mut engine, T0_MS + 2, durable(&id)),
        announced(&id, &[1], &decision)
    );

    let mut now_ms = T0_MS + 3;
    for retry in 0..3 {
        let effects = step(&mut engine, now_ms, delivery_failed(&id, 1));
        now_ms = assert_redelivery_timer(&effects, &id, 1, now_ms, retry);
        let effects = step(&mut engine, now_ms, fired(&id, redeliver(1)));
        assert_eq!(effects, vec![send_decision(&id, 1, false)], "retry {retry}");
    }
    assert_eq!(
        engine.status(&id).expect("in flight").decision,
        Some(decision.clone())
    );
    ack_all(&mut engine, &id, 2, &[1], &decision, now_ms + 1);
}

// ----------------------------------------------------------------------------------------
// Recovery
// ----------------------------------------------------------------------------------------

fn preparing_record(n: u32) -> TxnRecord {
    TxnRecord::Preparing {
        branches: targets(n),
        fingerprint: FINGERPRINT,
        created_ms: T0_MS,
    }
}

fn decided_record(n: u32, decision: &Decision) -> TxnRecord {
    TxnRecord::Decided {
        decision: decision.clone(),
        branches: targets(n),
        fingerprint: FINGERPRINT,
        decided_ms: T0_MS + 1,
    }
}

fn recovered(id: &TxnId, record: TxnRecord) -> Event {
    Event::Recovered {
        txn: id.clone(),
        record,
    }
}

#[test]
fn recovered_preparing_record_is_aborted_forced_and_delivered_to_every_branch() {
    let id = txn_id(1);
    let mut engine = new_engine();
    let decision = abort("the coordinator restarted before deciding");
    let effects = step(&mut engine, RESTART_MS, recovered(&id, preparing_record(3)));
    assert_eq!(
        effects,
        vec![persist_decision(&id, 3, &decision, RESTART_MS)]
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Deciding));
    assert_eq!(
        engine.lookup(&id),
        Some((&FINGERPRINT, None)),
        "not announced before durable"
    );

    // Nobody knows how the branches voted: every one is sent the abort.
    assert_eq!(
        step(&mut engine, RESTART_MS + 1, durable(&id)),
        announced(&id, &all(3), &decision)
    );
    ack_all(&mut engine, &id, 3, &all(3), &decision, RESTART_MS + 2);
}

#[test]
fn recovered_commit_is_redelivered_to_every_branch_until_acknowledged() {
    let id = txn_id(1);
    let mut engine = new_engine();
    let effects = step(
        &mut engine,
        RESTART_MS,
        recovered(&id, decided_record(3, &Decision::Commit)),
    );
    assert_eq!(
        effects,
        announced(&id, &all(3), &Decision::Commit),
        "durable already: nothing is written"
    );
    let status = engine.status(&id).expect("in flight");
    assert_eq!(status.phase, TxnPhase::Delivering);
    assert_eq!(status.decision, Some(Decision::Commit));

    let effects = step(&mut engine, RESTART_MS + 1, delivery_failed(&id, 1));
    let at_ms = assert_redelivery_timer(&effects, &id, 1, RESTART_MS + 1, 0);
    assert_eq!(
        step(&mut engine, at_ms, fired(&id, redeliver(1))),
        vec![send_decision(&id, 1, true)]
    );
    ack_all(
        &mut engine,
        &id,
        3,
        &[0, 2, 1],
        &Decision::Commit,
        at_ms + 1,
    );
}

#[test]
fn recovered_abort_is_redelivered_to_every_branch_until_acknowledged() {
    let id = txn_id(1);
    let mut engine = new_engine();
    let decision = abort(&voted_no_reason(1));
    let effects = step(
        &mut engine,
        RESTART_MS,
        recovered(&id, decided_record(3, &decision)),
    );
    // Votes are not stored: the branch that voted NO is sent the abort as well.
    assert_eq!(effects, announced(&id, &all(3), &decision));

    let effects = step(&mut engine, RESTART_MS + 1, delivery_failed(&id, 0));
    let at_ms = assert_redelivery_timer(&effects, &id, 0, RESTART_MS + 1, 0);
    assert_eq!(
        step(&mut engine, at_ms, fired(&id, redeliver(0))),
        vec![send_decision(&id, 0, false)]
    );
    ack_all(&mut engine, &id, 3, &all(3), &decision, at_ms + 1);
}

#[test]
fn recovered_finished_record_is_left_alone() {
    let id = txn_id(1);
    let mut engine = new_engine();
    let record = TxnRecord::Finished {
        decision: Decision::Commit,
        branches: targets(2),
        branch_phases: vec![BranchPhase::Acknowledged; 2],
        fingerprint: FINGERPRINT,
        finished_ms: T0_MS + 2,
    };
    assert_eq!(
        step(&mut engine, RESTART_MS, recovered(&id, record)),
        nothing()
    );
    assert_eq!(engine.in_flight(), 0);
    assert_eq!(step(&mut engine, RESTART_MS + 1, ack(&id, 0)), nothing());
}

// ----------------------------------------------------------------------------------------
// Operators
// ----------------------------------------------------------------------------------------

fn operator_abort(id: &TxnId) -> Event {
    Event::OperatorAbort {
        txn: id.clone(),
        reason: "participant p1 hangs in prepare".to_string(),
    }
}

fn operator_retry(id: &TxnId) -> Event {
    Event::OperatorRetry { txn: id.clone() }
}

const OPERATOR_ABORT_REASON: &str = "aborted by an operator: participant p1 hangs in prepare";

#[test]
fn operator_abort_while_preparing_decides_abort_forced_then_delivers_it_to_every_branch() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    step(&mut engine, T0_MS + 1, yes(&id, 0));
    let decision = abort(OPERATOR_ABORT_REASON);
    // Only the forced write: nobody hears of the abort before it is durable.
    assert_eq!(
        step(&mut engine, T0_MS + 2, operator_abort(&id)),
        vec![persist_decision(&id, 2, &decision, T0_MS + 2)]
    );
    assert_eq!(phase(&engine, &id), Some(TxnPhase::Deciding));
    assert_eq!(engine.status(&id).unwrap().decision, None);
    // A vote arriving now changes nothing; the branch still preparing gets the abort too.
    assert_eq!(step(&mut engine, T0_MS + 3, yes(&id, 1)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 4, durable(&id)),
        announced(&id, &all(2), &decision)
    );
    ack_all(&mut engine, &id, 2, &[1, 0], &decision, T0_MS + 5);
}

#[test]
fn operator_abort_after_the_decision_changes_nothing() {
    let id = txn_id(1);
    let mut engine = new_engine();
    decide_commit(&mut engine, &id, 2);
    assert_eq!(
        step(&mut engine, T0_MS + 2, operator_abort(&id)),
        nothing(),
        "while the commit is being forced"
    );
    assert_eq!(
        step(&mut engine, T0_MS + 3, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
    assert_eq!(
        step(&mut engine, T0_MS + 4, operator_abort(&id)),
        nothing(),
        "while the commit is delivered"
    );
    assert_eq!(engine.status(&id).unwrap().decision, Some(Decision::Commit));
    ack_all(&mut engine, &id, 2, &[0, 1], &Decision::Commit, T0_MS + 5);
    assert_eq!(
        step(&mut engine, T0_MS + 6, operator_abort(&id)),
        nothing(),
        "after it finished"
    );
}

#[test]
fn operator_retry_sends_a_waiting_redelivery_now_and_its_timer_goes_stale() {
    let id = txn_id(1);
    let mut engine = new_engine();
    deliver_commit(&mut engine, &id, 2);
    let effects = step(&mut engine, T0_MS + 3, delivery_failed(&id, 1));
    let at_ms = assert_redelivery_timer(&effects, &id, 1, T0_MS + 3, 0);
    assert_eq!(engine.redeliveries_due(&id), Some(vec![None, Some(at_ms)]));
    // Branch 0's delivery is in flight: only branch 1 is sent again.
    assert_eq!(
        step(&mut engine, T0_MS + 4, operator_retry(&id)),
        vec![send_decision(&id, 1, true)]
    );
    assert_eq!(engine.redeliveries_due(&id), Some(vec![None, None]));
    assert_eq!(engine.status(&id).unwrap().branches[1].attempts, 2);
    assert_eq!(
        step(&mut engine, T0_MS + 5, operator_retry(&id)),
        nothing(),
        "nothing waits any more"
    );
    assert_eq!(
        step(&mut engine, at_ms, fired(&id, redeliver(1))),
        nothing(),
        "the disarmed timer is stale"
    );
    // A duplicate failure report arms one timer, not two.
    let effects = step(&mut engine, at_ms + 1, delivery_failed(&id, 1));
    assert_redelivery_timer(&effects, &id, 1, at_ms + 1, 1);
    assert_eq!(
        step(&mut engine, at_ms + 2, delivery_failed(&id, 1)),
        nothing()
    );
    ack_all(&mut engine, &id, 2, &[0, 1], &Decision::Commit, at_ms + 3);
}

#[test]
fn operator_retry_before_the_decision_is_announced_does_nothing() {
    let id = txn_id(1);
    let mut engine = new_engine();
    start(&mut engine, &id, 2);
    assert_eq!(step(&mut engine, T0_MS + 1, operator_retry(&id)), nothing());
    step(&mut engine, T0_MS + 2, yes(&id, 0));
    step(&mut engine, T0_MS + 2, yes(&id, 1));
    assert_eq!(step(&mut engine, T0_MS + 3, operator_retry(&id)), nothing());
    assert_eq!(
        step(&mut engine, T0_MS + 4, durable(&id)),
        announced(&id, &all(2), &Decision::Commit)
    );
}

// ----------------------------------------------------------------------------------------
// Determinism
// ----------------------------------------------------------------------------------------

/// A fixed script over three transactions, with delivery failures; returns every effect.
fn scripted_run(seed: u64) -> Vec<Effect> {
    let mut engine = Engine::new(EngineConfig::default(), seed);
    let (a, b, c) = (txn_id(1), txn_id(2), txn_id(3));
    let mut events = vec![begin(&a, 3), begin(&b, 2), begin(&c, 1)];
    events.extend([yes(&a, 0), yes(&b, 0), no(&b, 1), yes(&a, 2), yes(&a, 1)]);
    events.extend([prepare_failed(&c, 0), durable(&b), durable(&a), durable(&c)]);
    for _ in 0..6 {
        events.extend([
            delivery_failed(&a, 1),
            delivery_failed(&b, 0),
            delivery_failed(&c, 0),
        ]);
        events.extend([
            fired(&a, redeliver(1)),
            fired(&b, redeliver(0)),
            fired(&c, redeliver(0)),
        ]);
    }
    events.extend([ack(&a, 0), ack(&a, 1), ack(&a, 2), ack(&b, 0), ack(&c, 0)]);
    let mut effects = Vec::new();
    for (k, event) in events.into_iter().enumerate() {
        effects.extend(engine.step(T0_MS + 10 * k as u64, event));
    }
    assert_eq!(
        engine.in_flight(),
        0,
        "the script finishes every transaction"
    );
    effects
}

#[test]
fn same_seed_and_same_events_give_identical_effects() {
    assert_eq!(scripted_run(7), scripted_run(7));
}

#[test]
fn the_seed_reaches_only_the_redelivery_jitter() {
    let (one, other) = (scripted_run(7), scripted_run(8));
    assert_eq!(one.len(), other.len());
    assert_ne!(one, other, "different seeds, different jitter");
    for (x, y) in one.iter().zip(&other) {
        match (x, y) {
            (
                Effect::SetTimer {
                    txn: t1,
                    timer: r1 @ Timer::Redeliver { .. },
                    ..
                },
                Effect::SetTimer {
                    txn: t2, timer: r2, ..
                },
            ) => {
                assert_eq!((t1, r1), (t2, r2));
            }
            _ => assert_eq!(x, y),
        }
    }
}

// ----------------------------------------------------------------------------------------
// Randomized runs
// ----------------------------------------------------------------------------------------

const SEEDS: u64 = 500;
/// Chance that a participant's answer (vote, failure, acknowledgement) arrives twice.
const ANSWER_DUPLICATE_PCT: u64 = 10;
/// Chance that delivering a decision fails.
const DELIVERY_FAILURE_PCT: u64 = 30;
/// Chance, per step, that an event already fed arrives again instead of a new one.
const REPLAY_PCT: u64 = 10;
/// Chance, per step, that the next event is picked regardless of when it is due.
const EARLY_TIMER_PCT: u64 = 10;
/// Chance, per step, that the coordinator crashes (at most `CRASHES_MAX` times a run).
const CRASH_PCT: u64 = 2;
const CRASHES_MAX: u32 = 2;
const SIM_STEPS_MAX: usize = 100_000;

fn chance(rng: &mut SplitMix64, pct: u64) -> bool {
    rng.next_u64() % 100 < pct
}

fn pick(rng: &mut SplitMix64, len: usize) -> usize {
    (rng.next_u64() % len as u64) as usize
}

/// How a simulated participant answers prepare (it always answers a decision, sometimes
/// only after failed deliveries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Yes,
    No,
    /// The call fails: `PrepareFailed`.
    Unreachable,
    /// No answer at all: only the deadline decides.
    Silent,
}

/// The runtime and the participants of one randomized transaction.
struct Sim {
    seed: u64,
    trace: bool,
    rng: SplitMix64,
    engine: Engine,
    id: TxnId,
    answers: Vec<Answer>,
    now_ms: u64,
    /// What the runtime has yet to feed, with when: answers, flush completions, timers.
    pending: Vec<(u64, Event)>,
    /// Events already fed, which the network may deliver again (never `DecisionDurable`).
    /// Kept across crashes: a late answer may reach the restarted coordinator.
    history: Vec<Event>,
    crashes: u32,
    /// The last record written, and the last one a flush made durable.
    written: Option<TxnRecord>,
    flushed: Option<TxnRecord>,
    /// The decision some participant or client was told, in any incarnation.
    announced: Option<Decision>,
    /// The log lost the transaction in a crash before it decided: presumed aborted.
    forgotten: bool,
    // What this incarnation of the engine was fed and emitted.
    /// The first vote fed per branch while undecided (true is YES).
    votes: BTreeMap<u32, bool>,
    decision: Option<Decision>,
    durable: bool,
    sent: BTreeSet<u32>,
    acked: BTreeSet<u32>,
    replied: bool,
    finished: bool,
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = SplitMix64::new(seed);
        let n = 1 + pick(&mut rng, 8);
        let all_yes = chance(&mut rng, 50);
        let answers = (0..n)
            .map(|_| match pick(&mut rng, 10) {
                _ if all_yes => Answer::Yes,
                0 => Answer::No,
                1 => Answer::Unreachable,
                2 => Answer::Silent,
                _ => Answer::Yes,
            })
            .collect();
        Sim {
            seed,
            trace,
            rng,
            engine: Engine::new(EngineConfig::default(), seed),
            id: txn_id(seed as u32),
            answers,
            now_ms: T0_MS,
            pending: Vec::new(),
            history: Vec::new(),
            crashes: 0,
            written: None,
            flushed: None,
            announced: None,
            forgotten: false,
            votes: BTreeMap::new(),
            decision: None,
            durable: false,
            sent: BTreeSet::new(),
            acked: BTreeSet::new(),
            replied: false,
            finished: false,
        }
    }

    fn n(&self) -> u32 {
        self.answers.len() as u32
    }

    fn run(mut self) {
        if self.trace {
            println!("seed {}: participants answer {:?}", self.seed, self.answers);
        }
        self.feed(begin(&self.id, self.n()));
        let mut steps = 0;
        while !self.pending.is_empty() {
            steps += 1;
            assert!(
                steps <= SIM_STEPS_MAX,
                "seed {}: no end after {steps} steps",
                self.seed
            );
            if self.crashes < CRASHES_MAX && chance(&mut self.rng, CRASH_PCT) {
                self.crash();
            } else if !self.history.is_empty() && chance(&mut self.rng, REPLAY_PCT) {
                let event = self.history[pick(&mut self.rng, self.history.len())].clone();
                self.feed(event);
            } else {
                let (due_ms, event) = self.next_pending();
                self.now_ms = self.now_ms.max(due_ms) + 1;
                self.feed(event);
            }
        }
        self.check_end();
    }

    fn feed(&mut self, event: Event) {
        match &event {
            Event::Voted { branch, vote, .. } if self.decision.is_none() => {
                self.votes.entry(branch.0).or_insert(*vote == Vote::Yes);
            }
            Event::DecisionDurable { .. } => {
                self.durable = true;
                self.flushed = self.written.clone();
            }
            Event::Acknowledged { branch, .. } if self.durable => {
                self.acked.insert(branch.0);
            }
            _ => {}
        }
        if !matches!(
            event,
            Event::Begin { .. } | Event::Recovered { .. } | Event::DecisionDurable { .. }
        ) {
            self.history.push(event.clone());
        }
        if self.trace {
            println!("@{} -> {event:?}", self.now_ms);
        }
        let effects = self.engine.step(self.now_ms, event.clone());
        for effect in &effects {
            if self.trace {
                println!("        <- {effect:?}");
            }
            self.carry_out(&event, effect);
        }
        self.check_announcement(&event, &effects);
        self.check_status();
    }

    /// Checks one effect against the protocol, then does what the runtime would.
    fn carry_out(&mut self, event: &Event, effect: &Effect) {
        let seed = self.seed;
        match effect.clone() {
            Effect::Persist {
                txn,
                record,
                durability,
            } => {
                assert_eq!(txn, self.id, "seed {seed}: {effect:?}");
                assert_eq!(
                    record.branches(),
                    targets(self.n()),
                    "seed {seed}: {effect:?}"
                );
                assert_eq!(
                    record.fingerprint(),
                    Some(&FINGERPRINT),
                    "seed {seed}: {effect:?}"
                );
                match &record {
                    TxnRecord::PresumedAborted { .. } => {
                        panic!("seed {seed}: the engine never writes a presumed abort: {effect:?}")
                    }
                    TxnRecord::Preparing { .. } => {
                        assert!(
                            matches!(event, Event::Begin { .. }),
                            "seed {seed}: {effect:?} on {event:?}"
                        );
                        assert_eq!(durability, Durability::Lazy, "seed {seed}: {effect:?}");
                    }
                    TxnRecord::Decided { decision, .. } => {
                        self.on_decided(event, decision, durability)
                    }
                    TxnRecord::Finished {
                        decision,
                        branch_phases,
                        ..
                    } => {
                        assert_eq!(durability, Durability::Lazy, "seed {seed}: {effect:?}");
                        assert!(
                            self.durable,
                            "seed {seed}: finished before the decision was durable"
                        );
                        assert_eq!(
                            Some(decision),
                            self.decision.as_ref(),
                            "seed {seed}: finished with another decision"
                        );
                        let all_acknowledged = branch_phases
                            .iter()
                            .all(|p| *p == BranchPhase::Acknowledged);
                        assert!(all_acknowledged, "seed {seed}: {effect:?}");
                        assert!(
                            self.sent.is_subset(&self.acked),
                            "seed {seed}: finished before every branch acknowledged: sent {:?}, acknowledged {:?}",
                            self.sent,
                            self.acked
                        );
                    }
                }
                self.written = Some(record);
            }
            Effect::SendPrepare {
                txn,
                branch,
                target: to,
                deadline_ms,
                ..
            } => {
                assert!(
                    matches!(event, Event::Begin { .. }),
                    "seed {seed}: {effect:?} on {event:?}"
                );
                assert_eq!(
                    (txn, to, deadline_ms),
                    (self.id.clone(), target(branch.0), DEADLINE_MS),
                    "seed {seed}"
                );
                let answer = match self.answers[branch.0 as usize] {
                    Answer::Yes => Some(yes(&self.id, branch.0)),
                    Answer::No => Some(no(&self.id, branch.0)),
                    Answer::Unreachable => Some(prepare_failed(&self.id, branch.0)),
                    Answer::Silent => None,
                };
                if let Some(answer) = answer {
                    self.push_answer(answer);
                }
            }
            Effect::SendDecision {
                txn,
                branch,
                target: to,
                commit,
            } => {
                assert_eq!(
                    (txn, to),
                    (self.id.clone(), target(branch.0)),
                    "seed {seed}"
                );
                assert!(
                    self.durable,
                    "seed {seed}: {effect:?} before the decision was durable"
                );
                let decision = self.decision.clone().expect("durable implies decided");
                assert_eq!(
                    commit,
                    decision.is_commit(),
                    "seed {seed}: {effect:?} for {decision:?}"
                );
                assert_ne!(
                    self.votes.get(&branch.0),
                    Some(&false),
                    "seed {seed}: decision sent to a NO voter"
                );
                self.announce(&decision);
                self.sent.insert(branch.0);
                let answer = if chance(&mut self.rng, DELIVERY_FAILURE_PCT) {
                    delivery_failed(&self.id, branch.0)
                } else {
                    ack(&self.id, branch.0)
                };
                self.push_answer(answer);
            }
            Effect::SetTimer { txn, timer, at_ms } => {
                assert_eq!(txn, self.id, "seed {seed}: {effect:?}");
                match timer {
                    Timer::PrepareDeadline => {
                        assert!(
                            matches!(event, Event::Begin { .. }),
                            "seed {seed}: {effect:?} on {event:?}"
                        );
                        assert_eq!(at_ms, DEADLINE_MS, "seed {seed}");
                    }
                    Timer::Redeliver { .. } => {
                        assert!(
                            matches!(event, Event::DeliveryFailed { .. }),
                            "seed {seed}: {effect:?} on {event:?}"
                        );
                        let delay_ms = at_ms - self.now_ms;
                        assert!(
                            (1..=5_000).contains(&delay_ms),
                            "seed {seed}: redelivery in {delay_ms} ms"
                        );
                    }
                }
                self.pending.push((at_ms, fired(&self.id, timer)));
            }
            Effect::Reply { txn, outcome } => {
                assert_eq!(txn, self.id, "seed {seed}: {effect:?}");
                assert!(
                    self.durable,
                    "seed {seed}: {effect:?} before the decision was durable"
                );
                assert!(!self.replied, "seed {seed}: a second reply {effect:?}");
                let decision = self.decision.clone().expect("durable implies decided");
                assert_eq!(
                    outcome,
                    decision.outcome(),
                    "seed {seed}: the reply differs from the decision"
                );
                self.announce(&decision);
                self.replied = true;
            }
            Effect::Finished { txn } => {
                assert_eq!(txn, self.id, "seed {seed}: {effect:?}");
                let record_written = matches!(self.written, Some(TxnRecord::Finished { .. }));
                assert!(record_written, "seed {seed}: finished without its record");
                self.finished = true;
            }
        }
    }

    /// The forced write of a decision: the only decision this incarnation makes, for a reason.
    fn on_decided(&mut self, event: &Event, decision: &Decision, durability: Durability) {
        let seed = self.seed;
        assert_eq!(
            durability,
            Durability::Forced,
            "seed {seed}: the decision must be forced"
        );
        assert!(
            self.decision.is_none(),
            "seed {seed}: decided twice: {:?}, then {decision:?}",
            self.decision
        );
        if let Some(announced) = &self.announced {
            assert_eq!(
                announced, decision,
                "seed {seed}: decided anew after announcing"
            );
        }
        match decision {
            Decision::Commit => {
                let every_yes =
                    self.votes.len() == self.answers.len() && self.votes.values().all(|&v| v);
                assert!(every_yes, "seed {seed}: commit with votes {:?}", self.votes);
                let last_yes = matches!(
                    event,
                    Event::Voted {
                        vote: Vote::Yes,
                        ..
                    }
                );
                assert!(last_yes, "seed {seed}: commit decided on {event:?}");
            }
            Decision::Abort { .. } => {
                let cause = matches!(
                    event,
                    Event::Voted {
                        vote: Vote::No { .. },
                        ..
                    } | Event::PrepareFailed { .. }
                        | Event::TimerFired {
                            timer: Timer::PrepareDeadline,
                            ..
                        }
                        | Event::Recovered { .. }
                );
                assert!(cause, "seed {seed}: abort decided on {event:?}");
            }
        }
        self.decision = Some(decision.clone());
        self.pending.push((self.now_ms, durable(&self.id)));
    }

    fn announce(&mut self, decision: &Decision) {
        if let Some(announced) = &self.announced {
            assert_eq!(
                announced, decision,
                "seed {}: a second outcome announced",
                self.seed
            );
        }
        self.announced = Some(decision.clone());
    }

    /// When the decision is announced, it goes to every branch but the NO voters, then the
    /// client.
    fn check_announcement(&self, event: &Event, effects: &[Effect]) {
        let announcing = match event {
            Event::DecisionDurable { .. } => true,
            Event::Recovered { record, .. } => matches!(record, TxnRecord::Decided { .. }),
            _ => false,
        };
        if !announcing {
            return;
        }
        let sent: Vec<u32> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::SendDecision { branch, .. } => Some(branch.0),
                _ => None,
            })
            .collect();
        let expected: Vec<u32> = (0..self.n())
            .filter(|i| self.votes.get(i) != Some(&false))
            .collect();
        assert_eq!(
            sent, expected,
            "seed {}: the decision went to the wrong branches",
            self.seed
        );
        assert!(
            self.replied,
            "seed {}: no reply when the decision became durable",
            self.seed
        );
    }

    /// The status the engine reports matches what the driver saw.
    fn check_status(&self) {
        let seed = self.seed;
        let Some(status) = self.engine.status(&self.id) else {
            assert!(
                self.finished || self.forgotten,
                "seed {seed}: the engine dropped an unfinished transaction"
            );
            return;
        };
        assert!(
            !self.finished,
            "seed {seed}: still in flight after Finished"
        );
        let expected = match (&self.decision, self.durable) {
            (None, _) => TxnPhase::Preparing,
            (Some(_), false) => TxnPhase::Deciding,
            (Some(_), true) => TxnPhase::Delivering,
        };
        assert_eq!(status.phase, expected, "seed {seed}");
        let reported = if self.durable {
            self.decision.as_ref()
        } else {
            None
        };
        assert_eq!(status.decision.as_ref(), reported, "seed {seed}");
    }

    /// The coordinator stops: what was in flight is lost; a new engine recovers from the log.
    fn crash(&mut self) {
        let seed = self.seed;
        self.crashes += 1;
        // A lazy write may or may not have reached the disk before the crash.
        let survivor = if chance(&mut self.rng, 50) {
            self.written.clone()
        } else {
            self.flushed.clone()
        };
        if self.trace {
            println!(
                "@{} crash #{}: the log holds {survivor:?}",
                self.now_ms, self.crashes
            );
        }
        self.engine = Engine::new(EngineConfig::default(), seed ^ u64::from(self.crashes));
        self.pending.clear();
        self.written = survivor.clone();
        self.flushed = survivor.clone();
        self.votes.clear();
        self.sent.clear();
        self.acked.clear();
        self.replied = false;
        self.decision = survivor.as_ref().and_then(|r| r.decision());
        self.durable = self.decision.is_some();
        self.finished = matches!(survivor, Some(TxnRecord::Finished { .. }));
        if let Some(announced) = &self.announced {
            let kept = survivor.as_ref().and_then(|r| r.decision());
            assert_eq!(
                kept.as_ref(),
                Some(announced),
                "seed {seed}: the crash lost the announced decision"
            );
        }
        match survivor {
            Some(record) => self.feed(Event::Recovered {
                txn: self.id.clone(),
                record,
            }),
            None => self.forgotten = true,
        }
    }

    fn check_end(&self) {
        let seed = self.seed;
        if self.forgotten {
            assert_eq!(
                self.announced, None,
                "seed {seed}: forgotten after announcing"
            );
            return;
        }
        assert!(
            self.finished,
            "seed {seed}: every answer arrived but not finished: {:?}",
            self.engine.status(&self.id)
        );
        assert_eq!(self.engine.in_flight(), 0, "seed {seed}");
        assert!(
            self.announced.is_some(),
            "seed {seed}: finished without announcing"
        );
    }

    /// Mostly something already due, as the runtime's loop would take it; sometimes anything,
    /// so that a timer overtakes answers (the network is slow, the deadline short).
    fn next_pending(&mut self) -> (u64, Event) {
        let due: Vec<usize> = (0..self.pending.len())
            .filter(|&i| self.pending[i].0 <= self.now_ms)
            .collect();
        let i = if !due.is_empty() && !chance(&mut self.rng, EARLY_TIMER_PCT) {
            due[pick(&mut self.rng, due.len())]
        } else {
            pick(&mut self.rng, self.pending.len())
        };
        self.pending.swap_remove(i)
    }

    fn push_answer(&mut self, event: Event) {
        if chance(&mut self.rng, ANSWER_DUPLICATE_PCT) {
            self.pending.push((self.now_ms, event.clone()));
        }
        self.pending.push((self.now_ms, event));
    }
}

#[test]
fn randomized_runs_keep_the_commit_point_and_a_single_outcome() {
    for seed in 0..SEEDS {
        Sim::new(seed, false).run();
    }
}

/// Replays one seed of the randomized test with every event and effect printed.
#[test]
#[ignore = "run by hand with TANDEM_SEED=<seed> and --nocapture"]
fn replay_one_seed() {
    let seed = std::env::var("TANDEM_SEED").expect("TANDEM_SEED=<seed>");
    Sim::new(seed.parse().expect("a number"), true).run();
}
