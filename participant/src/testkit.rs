//! A testkit for services: drives a service's two-phase resource or saga step the way a faulty
//! network and a crashing process would, and checks after every call that the service's own
//! invariant and the barrier's promises still hold. Behind the cargo feature `testkit`.
//!
//! A service author hands the testkit, in an ordinary `#[tokio::test]`:
//!
//! - the handler under test (a [`TwoPhaseResource`] for [`TwoPhaseCheck`], a
//!   [`CompensableResource`] for [`SagaStepCheck`]) and the name it is hosted under;
//! - how the service opens its participant ([`TwoPhaseCheck::open`]): a closure handed a
//!   [`ParticipantBuilder`] on the testkit's sled folder with the handler already registered,
//!   which adds whatever else the service hosts and opens it; and, once, the opening state
//!   ([`TwoPhaseCheck::setup`]);
//! - a seeded payload generator ([`TwoPhaseCheck::payloads`]);
//! - an invariant over the service's own state ([`TwoPhaseCheck::invariant`]): a closure given
//!   the `sled::Db` and what the testkit [`Known`]s was answered (the branches prepared,
//!   committed and aborted, the steps applied and compensated, with their payloads).
//!
//! # What it injects
//!
//! For [`TwoPhaseCheck::rounds`] rounds, each drawn from one [`SplitMix64`] seeded by
//! [`TwoPhaseCheck::seed`], it plays one of these against fresh transaction ids:
//!
//! - **repeated deliveries**: prepare, commit and abort delivered up to three times in a row,
//!   and a late repeat of the prepare after the decision;
//! - **abort before prepare**: the abort arrives first (a null abort), then the prepare, which
//!   must vote NO without the resource running;
//! - **a commit of a branch that never prepared** (a protocol violation): refused, changing
//!   nothing;
//! - **branches left prepared** across later rounds and crashes, decided rounds later;
//! - for sagas, **compensation before action** (a null compensation, then the action must be
//!   refused without running), **an action after its compensation** (refused without running),
//!   and compensations that answer an error retried round after round;
//! - **concurrent calls on the same keys**: bursts of up to [`TwoPhaseCheck::concurrency`]
//!   calls in flight at once through tokio tasks: new transactions drawn from the same payload
//!   generator (so they share the service's keys), the same delivery twice at once, an abort
//!   racing its prepare (a compensation racing its action), and decisions of branches left
//!   prepared earlier;
//! - **a crash between any two calls** (with [`TwoPhaseCheck::crash_percent`] chance before
//!   each): every handle is dropped, the participant's flusher closes the database, and the
//!   folder is reopened through the service's own open closure.
//!
//! # What it checks, after every call
//!
//! The testkit keeps a model of what each branch and step was answered and, from the barrier's
//! table ([`crate::barrier`], [`crate::saga_barrier`]), what every later call must answer:
//!
//! - a repeat gets the first answer (the same vote and reason, the same step outcome); a late
//!   prepare after an abort votes NO, a late action after a compensation answers
//!   `Failed("compensated")`;
//! - the branch or step record in the participant's log is exactly what was answered (after a
//!   crash too: whatever was answered survives);
//! - the handler's code took effect exactly as often as the answers say: a YES prepare, a
//!   commit, an abort, a succeeded action, a compensation once each, never both commit and
//!   abort, never a compensation without its action; and code the barrier must not run (a
//!   repeat, a late prepare or action, a compensation with nothing to undo) did not run at all;
//! - the service's invariant holds.
//!
//! Concurrent bursts are checked once every call of the burst has answered (the invariant may
//! not hold half-way through a burst), and the answers of racing calls must be one of the
//! orders the barrier allows.
//!
//! # How runs are counted, and why in the same sled transaction
//!
//! The handler is wrapped in a counter that records, per branch or step and per kind of call,
//! how many times the handler's code *took effect*, in its own tree ([`EFFECTS_TREE`]) **inside
//! the sled transaction the call runs in**. Counting in memory would count attempts: sled runs
//! a transaction's closure again on a conflict, and a participant re-runs a whole batch when
//! one call of it votes NO or fails, so a correct handler's prepare may well run three times
//! for one branch. Counted in the transaction, the count commits exactly when the handler's
//! writes do, is discarded with them (a NO vote, a failed action), and survives a crash exactly
//! as they do; it is compared with the branch and step records for equality, not just a bound.
//! The wrapper also counts attempts in memory, used only where the answer is "zero": a call the
//! barrier must answer without running the handler (a repeat, a late prepare after an abort, an
//! action after its compensation) must not even have been attempted.
//!
//! # A violation
//!
//! [`TwoPhaseCheck::run`] panics with a [`Violation`]: the seed, the round, what broke, and the
//! calls that led to it (each with its answer, crashes included); rerunning with the same
//! `.seed(..)` (and the same settings) replays the same schedule. [`TwoPhaseCheck::try_run`]
//! returns it instead (for tests that plant a bug and expect it found).
//!
//! # Example
//!
//! ```
//! # #[tokio::main] async fn main() {
//! use tandem_participant::bank::{self, Bank, BankOp};
//! use tandem_participant::testkit::{Known, SplitMix64, TwoPhaseCheck};
//!
//! fn signed(payload: &[u8]) -> i64 {
//!     match serde_json::from_slice(payload).unwrap() {
//!         BankOp::Debit { amount, .. } => -amount,
//!         BankOp::Credit { amount, .. } => amount,
//!     }
//! }
//!
//! let report = TwoPhaseCheck::new(bank::RESOURCE, Bank)
//!     // How the service opens its participant; the resource is already registered.
//!     .open(|builder| builder.open())
//!     // The opening state, written once on the first open.
//!     .setup(|participant| async move {
//!         let accounts = [("a".to_string(), 100), ("b".to_string(), 100)];
//!         bank::ensure_accounts(&participant, &accounts).await.map(|_| ())
//!     })
//!     // Payloads on two accounts only, so concurrent transactions collide.
//!     .payloads(|rng: &mut SplitMix64| {
//!         let account = if rng.next_u64() % 2 == 0 { "a" } else { "b" }.to_string();
//!         let amount = 1 + (rng.next_u64() % 80) as i64;
//!         match rng.next_u64() % 2 {
//!             0 => BankOp::Debit { account, amount },
//!             _ => BankOp::Credit { account, amount },
//!         }
//!         .encode()
//!     })
//!     // Money is conserved: the committed total moves only by committed branches.
//!     .invariant(|db, known: &Known<'_>| {
//!         let total: i64 = bank::balances(db).map_err(|e| e.to_string())?.values().sum();
//!         let moved: i64 = known.committed().map(|b| signed(b.payload)).sum();
//!         if total == 200 + moved {
//!             Ok(())
//!         } else {
//!             Err(format!("total {total}, expected {}", 200 + moved))
//!         }
//!     })
//!     .rounds(20)
//!     .seed(7)
//!     .run()
//!     .await;
//! assert_eq!(report.rounds, 20);
//! # }
//! ```
//!
//! # Known limitations
//!
//! - A crash is a drop and reopen in the same process: sled writes back what it has when the
//!   last handle drops, so the testkit proves that everything answered survives a restart, not
//!   that nothing unflushed survives a power loss. The simulation and the real-process chaos run
//!   (docs/testing.md) cover lost writes; the SDK forces every record before answering.
//! - No crash happens while calls are in flight (a process killed mid-burst); crashes fall
//!   between calls and between the phases of a burst.
//! - The order in which concurrent calls run is the scheduler's, not the seed's: a seed replays
//!   the same calls and crashes, and a burst's interleaving may differ between runs.
//! - The invariant is the service's: the testkit cannot tell a wrong balance from a right one
//!   on its own. What it proves unaided is the barrier's side (records, answers, run counts).
//! - Only the handler under test is counted; other handlers the service hosts run uncounted.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tandem_common::{BranchIdx, TxnId};
use tokio::task::JoinSet;

/// The database handed to the invariant (re-exported for tests that do not name sled).
pub use sled::Db;
pub use tandem_common::SplitMix64;

use crate::barrier::BranchRecord;
use crate::error::Error;
use crate::participant::{Participant, ParticipantBuilder};
use crate::resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};
use crate::saga::{CompensableResource, StepContext, StepOutcome};
use crate::saga_barrier::{StepRecord, REFUSED_AFTER_COMPENSATION};

/// The tree where the counting wrapper records how many times each call of the handler under
/// test took effect (key `kind/txn/index`, value a big-endian `u64`). Written only inside the
/// handler's own sled transactions.
pub const EFFECTS_TREE: &str = "testkit.effects";
/// The seed used when [`TwoPhaseCheck::seed`] is not called.
pub const SEED_DEFAULT: u64 = 0x7e57_4b17;
/// Rounds played when [`TwoPhaseCheck::rounds`] is not called.
pub const ROUNDS_DEFAULT: u32 = 100;
/// Chance of a crash before each call, in percent, unless [`TwoPhaseCheck::crash_percent`].
pub const CRASH_PERCENT_DEFAULT: u32 = 10;
/// Most calls in flight at once in a burst, unless [`TwoPhaseCheck::concurrency`].
pub const CONCURRENCY_DEFAULT: usize = 8;
/// The largest [`TwoPhaseCheck::concurrency`] accepted.
pub const CONCURRENCY_MAX: usize = 64;
/// Trace lines kept for a violation's report (the oldest are dropped beyond this).
pub const TRACE_LINES_KEPT: usize = 20_000;
/// Trace lines a violation's message shows (its `calls` field holds all kept).
const TRACE_LINES_SHOWN: usize = 60;
/// Longest payload shown in a trace line, in characters.
const PAYLOAD_SHOWN_CHARS_MAX: usize = 100;
/// How long a reopen after a crash is retried while the folder is still locked, in ms.
pub const REOPEN_WAIT_MS_MAX: u64 = 10_000;
/// Pause between two reopen tries, in ms.
const REOPEN_RETRY_MS: u64 = 5;
/// The coordinator address the testkit's prepares name (never contacted).
const COORDINATOR: &str = "http://testkit.invalid:1";

// ------------------------------------------------------------------------------------------
// What the invariant is told.

/// What the testkit knows was answered, handed to the invariant with the database.
///
/// Only calls that took effect are listed: branches that voted YES (a NO vote leaves nothing)
/// and steps whose action succeeded. Calls of a burst are listed once the burst has answered.
#[derive(Debug)]
pub struct Known<'a> {
    /// Every branch that voted YES, in `(txn, branch)` order.
    pub branches: Vec<KnownBranch<'a>>,
    /// Every step whose action succeeded, in `(saga, step)` order.
    pub steps: Vec<KnownStep<'a>>,
}

/// A branch that voted YES.
#[derive(Debug, Clone)]
pub struct KnownBranch<'a> {
    pub txn: &'a TxnId,
    pub branch: BranchIdx,
    /// The payload prepare received (and commit or abort were handed).
    pub payload: &'a [u8],
    pub state: KnownBranchState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownBranchState {
    /// Voted YES, no decision applied yet.
    Prepared,
    Committed,
    /// Aborted after its YES vote (its prepare's reservation released).
    Aborted,
}

/// A saga step whose action succeeded.
#[derive(Debug, Clone)]
pub struct KnownStep<'a> {
    pub saga: &'a TxnId,
    pub step: u32,
    pub action: &'a [u8],
    pub compensation: &'a [u8],
    pub state: KnownStepState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownStepState {
    /// The action's effect stands (no compensation has applied; one may be failing).
    Applied,
    /// The action was undone by its compensation.
    Compensated,
}

impl<'a> Known<'a> {
    /// Branches voted YES and not decided yet.
    pub fn prepared(&self) -> impl Iterator<Item = &KnownBranch<'a>> {
        self.branches_in(KnownBranchState::Prepared)
    }

    pub fn committed(&self) -> impl Iterator<Item = &KnownBranch<'a>> {
        self.branches_in(KnownBranchState::Committed)
    }

    /// Branches aborted after a YES vote.
    pub fn aborted(&self) -> impl Iterator<Item = &KnownBranch<'a>> {
        self.branches_in(KnownBranchState::Aborted)
    }

    /// Steps whose action's effect stands.
    pub fn applied(&self) -> impl Iterator<Item = &KnownStep<'a>> {
        self.steps
            .iter()
            .filter(|s| s.state == KnownStepState::Applied)
    }

    /// Steps whose action ran and was then compensated.
    pub fn compensated(&self) -> impl Iterator<Item = &KnownStep<'a>> {
        self.steps
            .iter()
            .filter(|s| s.state == KnownStepState::Compensated)
    }

    fn branches_in(&self, state: KnownBranchState) -> impl Iterator<Item = &KnownBranch<'a>> {
        self.branches.iter().filter(move |b| b.state == state)
    }
}

/// A saga step's two payloads, as the payload generator of a [`SagaStepCheck`] draws them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPayload {
    /// Handed to the action.
    pub action: Vec<u8>,
    /// Handed to the compensation.
    pub compensation: Vec<u8>,
}

// ------------------------------------------------------------------------------------------
// Results.

/// What a run did, when nothing broke.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub rounds: u32,
    /// Calls delivered (repeats and calls in bursts included).
    pub calls: u64,
    /// Calls the barrier answered without running the handler, proven by the attempt counter
    /// (repeats, late prepares and actions, null compensations).
    pub calls_not_run: u64,
    /// Crashes: drop every handle and reopen the folder.
    pub crashes: u64,
    /// Bursts of concurrent calls.
    pub bursts: u64,
    /// Times the invariant was checked.
    pub invariant_checks: u64,
    /// Saga compensations still answering an error at the end (each retried every round; the
    /// coordinator would go on retrying). 0 for 2PC.
    pub compensations_pending: u64,
}

/// A broken invariant or barrier promise, with what is needed to replay it.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    /// The round (0-based) during which it was found.
    pub round: u32,
    /// What broke.
    pub message: String,
    /// The calls that led to it, oldest first, each with its answer (at most
    /// [`TRACE_LINES_KEPT`], the oldest dropped).
    pub calls: Vec<String>,
    /// How many older calls were dropped from `calls`.
    pub calls_dropped: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tandem testkit: violation at seed {} round {}: {}",
            self.seed, self.round, self.message
        )?;
        writeln!(
            f,
            "replay: the same check with .seed({}) (and the same rounds, crash_percent and \
             concurrency) plays the same calls",
            self.seed
        )?;
        let shown = self.calls.len().min(TRACE_LINES_SHOWN);
        writeln!(
            f,
            "the last {shown} of {} calls:",
            self.calls.len() + self.calls_dropped
        )?;
        for line in &self.calls[self.calls.len() - shown..] {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

// ------------------------------------------------------------------------------------------
// Counting: effects in the transaction, attempts in memory.

/// A kind of handler call, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Prepare,
    Commit,
    Abort,
    Action,
    Compensate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Prepare => "prepare",
            Kind::Commit => "commit",
            Kind::Abort => "abort",
            Kind::Action => "action",
            Kind::Compensate => "compensate",
        }
    }
}

fn effect_key(kind: Kind, txn: &TxnId, index: u32) -> String {
    format!("{}/{}/{index}", kind.name(), txn)
}

/// How many times each call of the handler was attempted, in memory (sled re-runs and batch
/// re-runs included): only ever compared with zero.
#[derive(Debug, Default)]
struct Attempts(Mutex<BTreeMap<(Kind, TxnId, u32), u64>>);

impl Attempts {
    fn bump(&self, kind: Kind, txn: &TxnId, index: u32) {
        *self
            .0
            .lock()
            .unwrap()
            .entry((kind, txn.clone(), index))
            .or_default() += 1;
    }

    fn get(&self, kind: Kind, txn: &TxnId, index: u32) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&(kind, txn.clone(), index))
            .copied()
            .unwrap_or(0)
    }
}

/// Adds one to the effect count, in the handler's transaction.
fn bump_effect(
    trees: &ServiceTrees<'_>,
    kind: Kind,
    txn: &TxnId,
    index: u32,
) -> Result<(), ResourceError> {
    let tree = trees.tree(EFFECTS_TREE);
    let key = effect_key(kind, txn, index);
    let count = match tree.get(key.as_bytes())? {
        Some(bytes) => decode_count(&bytes),
        None => 0,
    };
    tree.insert(key.as_bytes(), &(count + 1).to_be_bytes())?;
    Ok(())
}

fn decode_count(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("malformed count {bytes:?} in {EFFECTS_TREE}")),
    )
}

fn with_effects_tree(mut trees: Vec<String>) -> Vec<String> {
    assert!(
        !trees.iter().any(|t| t == EFFECTS_TREE),
        "the handler declares {EFFECTS_TREE:?}, which the testkit reserves"
    );
    trees.push(EFFECTS_TREE.to_string());
    trees
}

/// The resource under test, counted. The count is written after the resource's own writes and
/// only if it answered: a NO vote abandons the transaction, so its count goes with its writes.
struct CountedResource<R> {
    inner: Arc<R>,
    attempts: Arc<Attempts>,
}

impl<R: TwoPhaseResource> TwoPhaseResource for CountedResource<R> {
    fn trees(&self) -> Vec<String> {
        with_effects_tree(self.inner.trees())
    }

    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<Vote, ResourceError> {
        self.attempts.bump(Kind::Prepare, &ctx.txn, ctx.branch.0);
        let vote = self.inner.prepare(ctx, payload, trees)?;
        bump_effect(trees, Kind::Prepare, &ctx.txn, ctx.branch.0)?;
        Ok(vote)
    }

    fn commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        self.attempts.bump(Kind::Commit, &ctx.txn, ctx.branch.0);
        self.inner.commit(ctx, payload, trees)?;
        bump_effect(trees, Kind::Commit, &ctx.txn, ctx.branch.0)
    }

    fn abort(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        self.attempts.bump(Kind::Abort, &ctx.txn, ctx.branch.0);
        self.inner.abort(ctx, payload, trees)?;
        bump_effect(trees, Kind::Abort, &ctx.txn, ctx.branch.0)
    }
}

/// The saga step under test, counted (a failed action's count goes with its writes).
struct CountedStep<S> {
    inner: Arc<S>,
    attempts: Arc<Attempts>,
}

impl<S: CompensableResource> CompensableResource for CountedStep<S> {
    fn trees(&self) -> Vec<String> {
        with_effects_tree(self.inner.trees())
    }

    fn action(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<StepOutcome, ResourceError> {
        self.attempts.bump(Kind::Action, &ctx.saga, ctx.step);
        let outcome = self.inner.action(ctx, payload, trees)?;
        bump_effect(trees, Kind::Action, &ctx.saga, ctx.step)?;
        Ok(outcome)
    }

    fn compensate(
        &self,
        ctx: &StepContext,
        payload: &[u8],
        trees: &ServiceTrees<'_>,
    ) -> Result<(), ResourceError> {
        self.attempts.bump(Kind::Compensate, &ctx.saga, ctx.step);
        self.inner.compensate(ctx, payload, trees)?;
        bump_effect(trees, Kind::Compensate, &ctx.saga, ctx.step)
    }
}

// ------------------------------------------------------------------------------------------
// The model: what was answered, and what that says the log and the counts must hold.

/// What a branch was answered, as far as the testkit knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BranchState {
    /// Nothing took effect (no call arrived, or each answered an error).
    Untouched,
    VotedYes,
    VotedNo {
        reason: String,
    },
    Committed,
    Aborted {
        was_prepared: bool,
    },
}

/// How many times each call of a branch's resource took effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BranchEffects {
    prepare: u64,
    commit: u64,
    abort: u64,
}

/// Checks a branch's record and effect counts against what it was answered.
fn check_branch(
    state: &BranchState,
    resource: &str,
    payload: &[u8],
    record: Option<&BranchRecord>,
    effects: BranchEffects,
) -> Result<(), String> {
    let (record_ok, expected) = match state {
        BranchState::Untouched => (record.is_none(), BranchEffects::default()),
        BranchState::VotedYes => (
            matches!(record, Some(BranchRecord::Prepared { resource: r, payload: p, .. })
                if r == resource && p.as_slice() == payload),
            BranchEffects {
                prepare: 1,
                ..BranchEffects::default()
            },
        ),
        BranchState::VotedNo { reason } => (
            matches!(record, Some(BranchRecord::VotedNo { reason: r }) if r == reason),
            BranchEffects::default(),
        ),
        BranchState::Committed => (
            matches!(record, Some(BranchRecord::Committed { resource: r, .. }) if r == resource),
            BranchEffects {
                prepare: 1,
                commit: 1,
                abort: 0,
            },
        ),
        BranchState::Aborted { was_prepared } => (
            matches!(record, Some(BranchRecord::Aborted { was_prepared: w, .. }) if w == was_prepared),
            BranchEffects {
                prepare: u64::from(*was_prepared),
                commit: 0,
                abort: u64::from(*was_prepared),
            },
        ),
    };
    if !record_ok {
        return Err(format!(
            "the branch was answered {state:?} but its record is {}",
            show_branch_record(record)
        ));
    }
    if effects != expected {
        let mut wrong = Vec::new();
        for (kind, got, want) in [
            ("prepare", effects.prepare, expected.prepare),
            ("commit", effects.commit, expected.commit),
            ("abort", effects.abort, expected.abort),
        ] {
            if got != want {
                wrong.push(format!("{kind} took effect {got} times, expected {want}"));
            }
        }
        return Err(format!(
            "the branch was answered {state:?} but {}",
            wrong.join(", ")
        ));
    }
    Ok(())
}

/// A branch record for a message, its payload shown as [`show_payload`] does.
fn show_branch_record(record: Option<&BranchRecord>) -> String {
    match record {
        Some(BranchRecord::Prepared {
            resource, payload, ..
        }) => format!(
            "Prepared {{ resource: {resource:?}, payload: {} }}",
            show_payload(payload)
        ),
        Some(other) => format!("{other:?}"),
        None => "absent".to_string(),
    }
}

/// What a saga step was answered, as far as the testkit knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StepState {
    /// Nothing took effect (no call arrived, or each answered an error).
    Untouched,
    Succeeded,
    Failed {
        reason: String,
    },
    Compensated {
        action_applied: bool,
    },
}

/// How many times each call of a step took effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StepEffects {
    action: u64,
    compensate: u64,
}

/// Checks a step's record and effect counts against what it was answered.
fn check_step(
    state: &StepState,
    resource: &str,
    record: Option<&StepRecord>,
    effects: StepEffects,
) -> Result<(), String> {
    let (record_ok, expected) = match state {
        StepState::Untouched => (record.is_none(), StepEffects::default()),
        StepState::Succeeded => (
            matches!(record, Some(StepRecord::ActionSucceeded { resource: r, .. }) if r == resource),
            StepEffects {
                action: 1,
                compensate: 0,
            },
        ),
        StepState::Failed { reason } => (
            matches!(record, Some(StepRecord::ActionFailed { reason: r, .. }) if r == reason),
            StepEffects::default(),
        ),
        StepState::Compensated { action_applied } => (
            matches!(record, Some(StepRecord::Compensated { action_applied: a, .. }) if a == action_applied),
            StepEffects {
                action: u64::from(*action_applied),
                compensate: u64::from(*action_applied),
            },
        ),
    };
    if !record_ok {
        return Err(format!(
            "the step was answered {state:?} but its record is {}",
            record.map_or("absent".to_string(), |r| format!("{r:?}"))
        ));
    }
    if effects != expected {
        let mut wrong = Vec::new();
        for (kind, got, want) in [
            ("action", effects.action, expected.action),
            ("compensation", effects.compensate, expected.compensate),
        ] {
            if got != want {
                wrong.push(format!(
                    "the {kind} took effect {got} times, expected {want}"
                ));
            }
        }
        return Err(format!(
            "the step was answered {state:?} but {}",
            wrong.join(", ")
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Settings and the harness both checks share.

type OpenFn = Arc<dyn Fn(&Path) -> Result<Participant, Error> + Send + Sync>;
type BuilderFn = Arc<dyn Fn(ParticipantBuilder) -> Result<Participant, Error> + Send + Sync>;
type SetupFn =
    Box<dyn FnOnce(Participant) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send>;
type BranchPayloadFn = Box<dyn FnMut(&mut SplitMix64) -> Vec<u8> + Send>;
type StepPayloadFn = Box<dyn FnMut(&mut SplitMix64) -> StepPayload + Send>;
type InvariantFn = Box<dyn Fn(&sled::Db, &Known<'_>) -> Result<(), String> + Send + Sync>;

/// What both checks are configured with besides the handler.
struct Settings {
    open: BuilderFn,
    setup: Option<SetupFn>,
    invariant: InvariantFn,
    rounds: u32,
    seed: u64,
    crash_percent: u32,
    concurrency: usize,
    dir: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            open: Arc::new(|builder: ParticipantBuilder| builder.open()),
            setup: None,
            invariant: Box::new(|_: &sled::Db, _: &Known<'_>| Ok(())),
            rounds: ROUNDS_DEFAULT,
            seed: SEED_DEFAULT,
            crash_percent: CRASH_PERCENT_DEFAULT,
            concurrency: CONCURRENCY_DEFAULT,
            dir: None,
        }
    }
}

/// The builder methods both checks share (documented once, on [`TwoPhaseCheck`]).
macro_rules! settings_methods {
    () => {
        /// How the service opens its participant: handed a builder on the testkit's folder
        /// with the handler under test already registered, it adds whatever else the service
        /// hosts (other resources, saga steps, callbacks, a config) and opens it. Called at
        /// the start and after every crash. Default: `|builder| builder.open()`. The handler
        /// under test must not be registered again.
        pub fn open<F>(mut self, open: F) -> Self
        where
            F: Fn(ParticipantBuilder) -> Result<Participant, Error> + Send + Sync + 'static,
        {
            self.settings.open = Arc::new(open);
            self
        }

        /// Writes the opening state (accounts, stock), once, after the first open; the
        /// testkit flushes afterwards. An error stops the run with a panic.
        pub fn setup<F, Fut>(mut self, setup: F) -> Self
        where
            F: FnOnce(Participant) -> Fut + Send + 'static,
            Fut: Future<Output = Result<(), Error>> + Send + 'static,
        {
            self.settings.setup = Some(Box::new(move |participant| Box::pin(setup(participant))));
            self
        }

        /// The service's invariant, checked after every call (after every burst for
        /// concurrent calls) and after every crash: given the database and what the testkit
        /// knows took effect, `Err` describes what is wrong. Default: always holds.
        pub fn invariant<F>(mut self, invariant: F) -> Self
        where
            F: Fn(&sled::Db, &Known<'_>) -> Result<(), String> + Send + Sync + 'static,
        {
            self.settings.invariant = Box::new(invariant);
            self
        }

        /// Rounds to play (each a few calls, or a burst). Default [`ROUNDS_DEFAULT`].
        pub fn rounds(mut self, rounds: u32) -> Self {
            self.settings.rounds = rounds;
            self
        }

        /// The seed of every choice the testkit makes (and of the payload generator's
        /// generator). Default [`SEED_DEFAULT`].
        pub fn seed(mut self, seed: u64) -> Self {
            self.settings.seed = seed;
            self
        }

        /// The chance of a crash before each call, in percent (0 to 100). Default
        /// [`CRASH_PERCENT_DEFAULT`].
        pub fn crash_percent(mut self, percent: u32) -> Self {
            assert!(percent <= 100, "crash_percent {percent} is above 100");
            self.settings.crash_percent = percent;
            self
        }

        /// Most calls in flight at once in a burst (2 to [`CONCURRENCY_MAX`]). Default
        /// [`CONCURRENCY_DEFAULT`].
        pub fn concurrency(mut self, calls: usize) -> Self {
            assert!(
                (2..=CONCURRENCY_MAX).contains(&calls),
                "concurrency {calls} is outside 2..={CONCURRENCY_MAX}"
            );
            self.settings.concurrency = calls;
            self
        }

        /// The sled folder to use (it should be empty). Default: a fresh temporary folder,
        /// removed at the end.
        pub fn dir(mut self, dir: impl AsRef<Path>) -> Self {
            self.settings.dir = Some(dir.as_ref().to_path_buf());
            self
        }

        /// Plays every round and panics with the [`Violation`] if one is found.
        pub async fn run(self) -> Report {
            match self.try_run().await {
                Ok(report) => report,
                Err(violation) => panic!("{violation}"),
            }
        }
    };
}

/// The state shared by both drivers: the folder, the participant, the generator, the trace.
struct Harness {
    seed: u64,
    crash_percent: u32,
    concurrency: usize,
    rng: SplitMix64,
    round: u32,
    dir: PathBuf,
    /// Keeps the temporary folder (if the testkit made it) until the run ends.
    _temp: Option<tempfile::TempDir>,
    open: OpenFn,
    /// The participant; `None` only inside a crash.
    participant: Option<Participant>,
    attempts: Arc<Attempts>,
    invariant: InvariantFn,
    trace: VecDeque<String>,
    trace_dropped: usize,
    next_id: u64,
    report: Report,
}

impl Harness {
    async fn start(
        settings: Settings,
        attempts: Arc<Attempts>,
        register: impl Fn(ParticipantBuilder) -> ParticipantBuilder + Send + Sync + 'static,
    ) -> Harness {
        let (temp, dir) = match &settings.dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::tempdir().expect("the testkit cannot make a temp folder");
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let service_open = settings.open.clone();
        let open: OpenFn =
            Arc::new(move |dir: &Path| service_open(register(Participant::builder(dir))));
        let participant = open(&dir)
            .unwrap_or_else(|e| panic!("the testkit could not open the participant: {e}"));
        if let Some(setup) = settings.setup {
            setup(participant.clone())
                .await
                .unwrap_or_else(|e| panic!("the testkit's setup failed: {e}"));
            participant
                .flush()
                .await
                .unwrap_or_else(|e| panic!("the testkit's setup did not flush: {e}"));
        }
        Harness {
            seed: settings.seed,
            crash_percent: settings.crash_percent,
            concurrency: settings.concurrency,
            rng: SplitMix64::new(settings.seed),
            round: 0,
            dir,
            _temp: temp,
            open,
            participant: Some(participant),
            attempts,
            invariant: settings.invariant,
            trace: VecDeque::new(),
            trace_dropped: 0,
            next_id: 0,
            report: Report {
                seed: settings.seed,
                ..Report::default()
            },
        }
    }

    fn participant(&self) -> &Participant {
        self.participant
            .as_ref()
            .expect("the participant is open between calls")
    }

    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.rng.next_u64() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_KEPT {
            self.trace.pop_front();
            self.trace_dropped += 1;
        }
        self.trace.push_back(format!("r{} {line}", self.round));
    }

    fn violation(&self, message: impl Into<String>) -> Violation {
        Violation {
            seed: self.seed,
            round: self.round,
            message: message.into(),
            calls: self.trace.iter().cloned().collect(),
            calls_dropped: self.trace_dropped,
        }
    }

    /// A fresh transaction (or saga) id, unique within the run.
    fn new_txn(&mut self) -> TxnId {
        self.next_id += 1;
        let id = format!("1763850000000-tk{}n{}", self.round, self.next_id);
        TxnId::parse(&id).unwrap_or_else(|e| panic!("the testkit made a bad id {id}: {e}"))
    }

    /// Drops every handle (the flusher closes the database) and reopens the folder.
    ///
    /// sled's own I/O threads may hold the folder's lock for a moment after the last handle
    /// is gone, as a killed process's lock lingers until the kernel releases it; so the reopen
    /// is retried for up to [`REOPEN_WAIT_MS_MAX`] before a failure counts as a violation.
    async fn crash(&mut self) -> Result<(), Violation> {
        self.report.crashes += 1;
        drop(self.participant.take());
        let started = std::time::Instant::now();
        let mut tries = 0u32;
        loop {
            tries += 1;
            match (self.open)(&self.dir) {
                Ok(participant) => {
                    self.participant = Some(participant);
                    self.note(format!(
                        "crash: drop the participant, reopen the folder (open tries: {tries})"
                    ));
                    return Ok(());
                }
                Err(e) if started.elapsed().as_millis() < u128::from(REOPEN_WAIT_MS_MAX) => {
                    tracing::debug!(error = %e, tries, "testkit: reopen failed, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(REOPEN_RETRY_MS)).await;
                }
                Err(e) => {
                    self.note("crash: drop the participant, reopen the folder".into());
                    return Err(self.violation(format!(
                        "the folder did not reopen after a crash ({tries} tries in {} ms): {e}",
                        started.elapsed().as_millis()
                    )));
                }
            }
        }
    }

    /// Crashes with the configured chance: whether it did.
    async fn maybe_crash(&mut self) -> Result<bool, Violation> {
        let p = u64::from(self.crash_percent);
        if self.percent(p) {
            self.crash().await?;
            return Ok(true);
        }
        Ok(false)
    }

    fn effects(&self, kind: Kind, txn: &TxnId, index: u32) -> Result<u64, Violation> {
        let read = || -> Result<u64, sled::Error> {
            let tree = self.participant().db().open_tree(EFFECTS_TREE)?;
            Ok(tree
                .get(effect_key(kind, txn, index).as_bytes())?
                .map_or(0, |bytes| decode_count(&bytes)))
        };
        read().map_err(|e| self.violation(format!("cannot read {EFFECTS_TREE}: {e}")))
    }

    fn attempts(&self, kind: Kind, txn: &TxnId, index: u32) -> u64 {
        self.attempts.get(kind, txn, index)
    }

    /// A call the barrier must answer without running the handler: proves it did not.
    fn expect_not_run(
        &mut self,
        kind: Kind,
        txn: &TxnId,
        index: u32,
        before: u64,
        why: &str,
    ) -> Result<(), Violation> {
        let after = self.attempts(kind, txn, index);
        if after != before {
            return Err(self.violation(format!(
                "{txn} {index}: the handler's {} ran ({} times) on {why}; the barrier must answer \
                 without running it",
                kind.name(),
                after - before
            )));
        }
        self.report.calls_not_run += 1;
        Ok(())
    }

    fn check_invariant(&mut self, known: &Known<'_>) -> Result<(), Violation> {
        self.report.invariant_checks += 1;
        let verdict = (self.invariant)(self.participant().db(), known);
        verdict.map_err(|e| self.violation(format!("the service's invariant is broken: {e}")))
    }
}

/// Shows a payload: as text if it is printable UTF-8, else in hex; cut when long.
fn show_payload(payload: &[u8]) -> String {
    let shown = match std::str::from_utf8(payload) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => text.to_string(),
        _ => payload.iter().map(|b| format!("{b:02x}")).collect(),
    };
    if shown.chars().count() > PAYLOAD_SHOWN_CHARS_MAX {
        let cut: String = shown.chars().take(PAYLOAD_SHOWN_CHARS_MAX).collect();
        format!("{cut}...")
    } else {
        shown
    }
}

fn show<T: fmt::Debug>(answer: &Result<T, Error>) -> String {
    match answer {
        Ok(value) => match format!("{value:?}") {
            unit if unit == "()" => "done".to_string(),
            value => value,
        },
        Err(e) => format!("error: {e}"),
    }
}

// ------------------------------------------------------------------------------------------
// Two-phase commit.

/// Drives a [`TwoPhaseResource`] adversarially (see the [module docs](self)).
pub struct TwoPhaseCheck<R> {
    name: String,
    resource: Arc<R>,
    payloads: Option<BranchPayloadFn>,
    settings: Settings,
}

impl<R: TwoPhaseResource> TwoPhaseCheck<R> {
    /// Checks `resource`, hosted under `name` (the `resource` of every branch the testkit
    /// sends).
    pub fn new(name: impl Into<String>, resource: R) -> Self {
        TwoPhaseCheck {
            name: name.into(),
            resource: Arc::new(resource),
            payloads: None,
            settings: Settings::default(),
        }
    }

    /// The payload generator (required): one branch's payload per call, drawn from the
    /// testkit's seeded generator. Draw keys from a small set so that concurrent branches
    /// collide, and let some payloads be refused (a NO vote) so that path is driven too.
    pub fn payloads<F>(mut self, payloads: F) -> Self
    where
        F: FnMut(&mut SplitMix64) -> Vec<u8> + Send + 'static,
    {
        self.payloads = Some(Box::new(payloads));
        self
    }

    settings_methods!();

    /// Plays every round; returns the first [`Violation`] found instead of panicking.
    pub async fn try_run(self) -> Result<Report, Violation> {
        let attempts = Arc::new(Attempts::default());
        let payloads = self
            .payloads
            .expect("TwoPhaseCheck needs .payloads(..): the payload generator");
        let rounds = self.settings.rounds;
        let (name, resource, counter) = (self.name.clone(), self.resource, attempts.clone());
        let harness = Harness::start(self.settings, attempts, move |builder| {
            builder.resource(
                name.clone(),
                CountedResource {
                    inner: resource.clone(),
                    attempts: counter.clone(),
                },
            )
        })
        .await;
        let mut driver = TwoPhaseDriver {
            h: harness,
            name: self.name,
            payloads,
            branches: BTreeMap::new(),
            undecided: Vec::new(),
        };
        for round in 0..rounds {
            driver.h.round = round;
            driver.round().await?;
            driver.h.report.rounds += 1;
        }
        driver.finish().await?;
        Ok(driver.h.report)
    }
}

type BranchKey = (TxnId, BranchIdx);

struct BranchModel {
    payload: Vec<u8>,
    state: BranchState,
}

/// A 2PC call the testkit delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BranchCall {
    Prepare,
    Commit,
    Abort,
}

impl BranchCall {
    fn name(self) -> &'static str {
        match self {
            BranchCall::Prepare => "prepare",
            BranchCall::Commit => "commit",
            BranchCall::Abort => "abort",
        }
    }
}

enum BranchAnswer {
    Vote(Result<Vote, Error>),
    Done(Result<(), Error>),
}

impl BranchAnswer {
    fn show(&self) -> String {
        match self {
            BranchAnswer::Vote(answer) => show(answer),
            BranchAnswer::Done(answer) => show(answer),
        }
    }
}

struct TwoPhaseDriver {
    h: Harness,
    name: String,
    payloads: BranchPayloadFn,
    branches: BTreeMap<BranchKey, BranchModel>,
    /// Branches voted YES and left undecided for a later round.
    undecided: Vec<BranchKey>,
}

impl TwoPhaseDriver {
    fn ctx(&self, key: &BranchKey) -> BranchContext {
        BranchContext {
            txn: key.0.clone(),
            branch: key.1,
            resource: self.name.clone(),
        }
    }

    fn state(&self, key: &BranchKey) -> BranchState {
        self.branches[key].state.clone()
    }

    fn set_state(&mut self, key: &BranchKey, state: BranchState) {
        self.branches
            .get_mut(key)
            .expect("a branch the testkit made")
            .state = state;
    }

    fn new_branch(&mut self) -> BranchKey {
        let txn = self.h.new_txn();
        let branch = BranchIdx(self.h.below(3) as u32);
        let payload = (self.payloads)(&mut self.h.rng);
        let key = (txn, branch);
        self.branches.insert(
            key.clone(),
            BranchModel {
                payload,
                state: BranchState::Untouched,
            },
        );
        key
    }

    fn known(branches: &BTreeMap<BranchKey, BranchModel>) -> Known<'_> {
        let branches = branches
            .iter()
            .filter_map(|((txn, branch), model)| {
                let state = match model.state {
                    BranchState::VotedYes => KnownBranchState::Prepared,
                    BranchState::Committed => KnownBranchState::Committed,
                    BranchState::Aborted { was_prepared: true } => KnownBranchState::Aborted,
                    BranchState::Untouched
                    | BranchState::VotedNo { .. }
                    | BranchState::Aborted {
                        was_prepared: false,
                    } => return None,
                };
                Some(KnownBranch {
                    txn,
                    branch: *branch,
                    payload: &model.payload,
                    state,
                })
            })
            .collect();
        Known {
            branches,
            steps: Vec::new(),
        }
    }

    /// The branch's record and counts against what it was answered.
    fn check(&self, key: &BranchKey) -> Result<(), Violation> {
        let (txn, branch) = key;
        let record = self
            .h
            .participant()
            .branch_record(txn, *branch)
            .map_err(|e| self.h.violation(format!("cannot read the branch log: {e}")))?;
        let effects = BranchEffects {
            prepare: self.h.effects(Kind::Prepare, txn, branch.0)?,
            commit: self.h.effects(Kind::Commit, txn, branch.0)?,
            abort: self.h.effects(Kind::Abort, txn, branch.0)?,
        };
        let model = &self.branches[key];
        check_branch(
            &model.state,
            &self.name,
            &model.payload,
            record.as_ref(),
            effects,
        )
        .map_err(|e| self.h.violation(format!("{txn} {branch}: {e}")))
    }

    fn check_invariant(&mut self) -> Result<(), Violation> {
        // `known` borrows the model, not the harness.
        let known = Self::known(&self.branches);
        self.h.check_invariant(&known)
    }

    /// Every branch ever made, and the invariant (after a crash, and at the end).
    fn check_all(&mut self) -> Result<(), Violation> {
        for key in self.branches.keys() {
            self.check(key)?;
        }
        self.check_invariant()
    }

    /// A crash with the configured chance, then everything checked.
    async fn between_calls(&mut self) -> Result<(), Violation> {
        if self.h.maybe_crash().await? {
            self.check_all()?;
        }
        Ok(())
    }

    async fn round(&mut self) -> Result<(), Violation> {
        match self.h.below(100) {
            0..=44 => {
                let key = self.new_branch();
                self.lifecycle(key).await?;
            }
            45..=59 => self.abort_before_prepare().await?,
            60..=64 => {
                // A commit of a branch that never prepared: refused; the branch then runs.
                let key = self.new_branch();
                self.decide(&key, true).await?;
                self.lifecycle(key).await?;
            }
            _ => self.burst().await?,
        }
        if !self.undecided.is_empty() && self.h.percent(40) {
            let i = self.h.below(self.undecided.len() as u64) as usize;
            let key = self.undecided.swap_remove(i);
            let commit = self.h.percent(60);
            self.decide_repeatedly(&key, commit).await?;
        }
        Ok(())
    }

    /// Decides every branch left undecided, then checks everything once more.
    async fn finish(&mut self) -> Result<(), Violation> {
        while let Some(key) = self.undecided.pop() {
            let commit = self.h.percent(60);
            self.decide_repeatedly(&key, commit).await?;
        }
        self.h.note("end: every branch decided".into());
        self.check_all()
    }

    /// 1 delivery, sometimes 2 or 3.
    fn deliveries(&mut self) -> u32 {
        if self.h.percent(40) {
            2 + self.h.below(2) as u32
        } else {
            1
        }
    }

    /// Prepare (repeated), then a decision (repeated) or none yet, then perhaps a late repeat
    /// of the prepare.
    async fn lifecycle(&mut self, key: BranchKey) -> Result<(), Violation> {
        for _ in 0..self.deliveries() {
            self.prepare(&key).await?;
        }
        match self.state(&key) {
            BranchState::VotedYes => {
                if self.h.percent(20) {
                    self.undecided.push(key);
                    return Ok(());
                }
                let commit = self.h.percent(60);
                self.decide_repeatedly(&key, commit).await?;
                if self.h.percent(30) {
                    self.prepare(&key).await?;
                }
            }
            BranchState::VotedNo { .. } | BranchState::Untouched => {
                self.decide_repeatedly(&key, false).await?;
            }
            state @ (BranchState::Committed | BranchState::Aborted { .. }) => {
                unreachable!("{key:?} is {state:?} after its prepares")
            }
        }
        Ok(())
    }

    /// The abort arrives first; the prepare after it must vote NO without running.
    async fn abort_before_prepare(&mut self) -> Result<(), Violation> {
        let key = self.new_branch();
        for _ in 0..self.deliveries() {
            self.decide(&key, false).await?;
        }
        for _ in 0..self.deliveries() {
            self.prepare(&key).await?;
        }
        if self.h.percent(50) {
            self.decide(&key, false).await?;
        }
        Ok(())
    }

    async fn decide_repeatedly(&mut self, key: &BranchKey, commit: bool) -> Result<(), Violation> {
        for _ in 0..self.deliveries() {
            self.decide(key, commit).await?;
        }
        Ok(())
    }

    /// Delivers one prepare and checks its answer against the model.
    async fn prepare(&mut self, key: &BranchKey) -> Result<(), Violation> {
        self.between_calls().await?;
        let before = self.h.attempts(Kind::Prepare, &key.0, key.1 .0);
        let state = self.state(key);
        let ctx = self.ctx(key);
        let payload = self.branches[key].payload.clone();
        let answer = self
            .h
            .participant()
            .prepare(&ctx, &payload, COORDINATOR)
            .await;
        self.h.report.calls += 1;
        self.h.note(format!(
            "prepare {} {} payload={} -> {}",
            key.0,
            key.1,
            show_payload(&payload),
            show(&answer)
        ));
        let (txn, index) = (&key.0, key.1 .0);
        match (&state, answer) {
            (BranchState::Untouched, Ok(Vote::Yes)) => self.set_state(key, BranchState::VotedYes),
            (BranchState::Untouched, Ok(Vote::No { reason })) => {
                self.set_state(key, BranchState::VotedNo { reason })
            }
            // An error is no vote: nothing may have changed (checked below).
            (BranchState::Untouched, Err(_)) => {}
            (BranchState::VotedYes | BranchState::Committed, Ok(Vote::Yes)) => {
                self.h
                    .expect_not_run(Kind::Prepare, txn, index, before, "a repeated prepare")?;
            }
            (BranchState::VotedNo { reason }, Ok(Vote::No { reason: again }))
                if *reason == again =>
            {
                self.h
                    .expect_not_run(Kind::Prepare, txn, index, before, "a repeated prepare")?;
            }
            (BranchState::Aborted { .. }, Ok(Vote::No { .. })) => {
                self.h.expect_not_run(
                    Kind::Prepare,
                    txn,
                    index,
                    before,
                    "a prepare after its branch's abort",
                )?;
            }
            (state, answer) => {
                return Err(self.h.violation(format!(
                    "{txn} {}: a prepare of a branch answered {state:?} before was answered {}; \
                     the barrier promises {}",
                    key.1,
                    show(&answer),
                    match state {
                        BranchState::VotedYes | BranchState::Committed => "YES again",
                        BranchState::VotedNo { .. } => "the same NO again",
                        BranchState::Aborted { .. } => "NO (the branch was aborted)",
                        BranchState::Untouched => "a vote",
                    }
                )))
            }
        }
        self.check(key)?;
        self.check_invariant()
    }

    /// Delivers one decision and checks its answer against the model.
    async fn decide(&mut self, key: &BranchKey, commit: bool) -> Result<(), Violation> {
        self.between_calls().await?;
        let kind = if commit { Kind::Commit } else { Kind::Abort };
        let (txn, index) = (key.0.clone(), key.1 .0);
        let before = self.h.attempts(kind, &txn, index);
        let state = self.state(key);
        let answer = self
            .h
            .participant()
            .decide(&txn, key.1, &self.name, commit)
            .await;
        self.h.report.calls += 1;
        self.h.note(format!(
            "{} {txn} {} -> {}",
            kind.name(),
            key.1,
            show(&answer)
        ));
        let next = self.after_decision(key, &state, commit, &answer)?;
        if next == state || state != BranchState::VotedYes {
            let why = match &answer {
                Ok(()) => "a decision with nothing to do here",
                Err(_) => "a refused decision",
            };
            self.h.expect_not_run(kind, &txn, index, before, why)?;
        }
        self.set_state(key, next);
        self.check(key)?;
        self.check_invariant()
    }

    /// The state after a decision answered `answer` in `state`, or the violation.
    fn after_decision(
        &self,
        key: &BranchKey,
        state: &BranchState,
        commit: bool,
        answer: &Result<(), Error>,
    ) -> Result<BranchState, Violation> {
        use BranchState as S;
        let refused = matches!(answer, Err(Error::Conflict(_)));
        let next = match (state, commit, answer.is_ok()) {
            (S::VotedYes, true, true) => Some(S::Committed),
            (S::VotedYes, false, true) => Some(S::Aborted { was_prepared: true }),
            (S::Untouched, false, true) => Some(S::Aborted {
                was_prepared: false,
            }),
            (S::VotedNo { .. } | S::Aborted { .. }, false, true) | (S::Committed, true, true) => {
                Some(state.clone())
            }
            // Protocol violations the coordinator never sends: refused, nothing changes.
            (S::Untouched | S::VotedNo { .. } | S::Aborted { .. }, true, false) if refused => {
                Some(state.clone())
            }
            _ => None,
        };
        next.ok_or_else(|| {
            self.h.violation(format!(
                "{} {}: a {} of a branch answered {state:?} before was answered {}; the barrier \
                 promises {}",
                key.0,
                key.1,
                if commit { "commit" } else { "abort" },
                show(answer),
                match (state, commit) {
                    (S::Committed, false) => "a refusal",
                    (S::VotedYes, _) | (S::Committed, true) | (_, false) => "done",
                    (S::Untouched | S::VotedNo { .. } | S::Aborted { .. }, true) => "a refusal",
                }
            ))
        })
    }

    /// Calls in flight at once: new branches (some prepared twice at once, some with their
    /// abort racing the prepare) and decisions of branches left undecided; then, at once
    /// again, the new branches' decisions (some delivered twice at once).
    async fn burst(&mut self) -> Result<(), Violation> {
        self.h.report.bursts += 1;
        let slots = self.h.concurrency;
        let mut calls: Vec<(BranchKey, BranchCall)> = Vec::new();
        let mut fresh = Vec::new();
        while calls.len() + 2 <= slots && (fresh.len() < 2 || self.h.percent(70)) {
            let key = self.new_branch();
            match self.h.below(3) {
                0 => {
                    calls.push((key.clone(), BranchCall::Prepare));
                    calls.push((key.clone(), BranchCall::Prepare));
                }
                1 => calls.push((key.clone(), BranchCall::Prepare)),
                _ => {
                    calls.push((key.clone(), BranchCall::Abort));
                    calls.push((key.clone(), BranchCall::Prepare));
                }
            }
            fresh.push(key);
        }
        let mut deciding = Vec::new();
        while calls.len() < slots && !self.undecided.is_empty() && self.h.percent(50) {
            let key = self.undecided.swap_remove(0);
            let call = if self.h.percent(60) {
                BranchCall::Commit
            } else {
                BranchCall::Abort
            };
            calls.push((key.clone(), call));
            deciding.push((key, call == BranchCall::Commit));
        }
        self.shuffle(&mut calls);
        self.between_calls().await?;
        let answers = self.concurrently(calls).await;

        for key in &fresh {
            let mine: Vec<&(BranchKey, BranchCall, BranchAnswer)> =
                answers.iter().filter(|(k, _, _)| k == key).collect();
            self.settle_racing(key, &mine)?;
            self.check(key)?;
        }
        for (key, commit) in &deciding {
            let (_, _, answer) = answers
                .iter()
                .find(|(k, _, _)| k == key)
                .expect("every call answers");
            let BranchAnswer::Done(answer) = answer else {
                unreachable!("a decision answers done")
            };
            let next = self.after_decision(key, &BranchState::VotedYes, *commit, answer)?;
            self.set_state(key, next);
            self.check(key)?;
        }
        self.check_invariant()?;

        // The new branches' decisions, at once.
        let mut calls = Vec::new();
        for key in &fresh {
            match self.state(key) {
                BranchState::VotedYes => {
                    let call = if self.h.percent(60) {
                        BranchCall::Commit
                    } else {
                        BranchCall::Abort
                    };
                    for _ in 0..1 + self.h.below(2) {
                        calls.push((key.clone(), call));
                    }
                }
                BranchState::VotedNo { .. } | BranchState::Untouched => {
                    calls.push((key.clone(), BranchCall::Abort))
                }
                BranchState::Aborted { .. } | BranchState::Committed => {}
            }
        }
        self.shuffle(&mut calls);
        self.between_calls().await?;
        let answers = self.concurrently(calls).await;
        for key in &fresh {
            let state = self.state(key);
            let mut next = state.clone();
            for (_, call, answer) in answers.iter().filter(|(k, _, _)| k == key) {
                let BranchAnswer::Done(answer) = answer else {
                    unreachable!("a decision answers done")
                };
                next = self.after_decision(key, &state, *call == BranchCall::Commit, answer)?;
            }
            self.set_state(key, next);
            self.check(key)?;
        }
        self.check_invariant()
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.h.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// Runs every call at once in its own task; the answers in the calls' order.
    async fn concurrently(
        &mut self,
        calls: Vec<(BranchKey, BranchCall)>,
    ) -> Vec<(BranchKey, BranchCall, BranchAnswer)> {
        let mut tasks = JoinSet::new();
        for (i, (key, call)) in calls.iter().enumerate() {
            let participant = self.h.participant().clone();
            let ctx = self.ctx(key);
            let payload = self.branches[key].payload.clone();
            let call = *call;
            tasks.spawn(async move {
                let answer = match call {
                    BranchCall::Prepare => {
                        BranchAnswer::Vote(participant.prepare(&ctx, &payload, COORDINATOR).await)
                    }
                    BranchCall::Commit | BranchCall::Abort => BranchAnswer::Done(
                        participant
                            .decide(
                                &ctx.txn,
                                ctx.branch,
                                &ctx.resource,
                                call == BranchCall::Commit,
                            )
                            .await,
                    ),
                };
                (i, answer)
            });
        }
        let mut answers: Vec<Option<BranchAnswer>> = calls.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, answer) = joined.expect("a testkit call task panicked");
            answers[i] = Some(answer);
        }
        self.h.report.calls += calls.len() as u64;
        let mut out = Vec::with_capacity(calls.len());
        for ((key, call), answer) in calls.into_iter().zip(answers) {
            let answer = answer.expect("every call answers");
            let payload = show_payload(&self.branches[&key].payload);
            self.h.note(format!(
                "at once: {} {} {} payload={payload} -> {}",
                call.name(),
                key.0,
                key.1,
                answer.show()
            ));
            out.push((key, call, answer));
        }
        out
    }

    /// A new branch's state from the answers of its calls in flight at once: two deliveries
    /// of its prepare, or its abort racing its prepare.
    fn settle_racing(
        &mut self,
        key: &BranchKey,
        answers: &[&(BranchKey, BranchCall, BranchAnswer)],
    ) -> Result<(), Violation> {
        let mut votes = Vec::new();
        let mut aborted = false;
        for (_, call, answer) in answers {
            match (call, answer) {
                (BranchCall::Prepare, BranchAnswer::Vote(Ok(vote))) => votes.push(vote.clone()),
                (BranchCall::Prepare, BranchAnswer::Vote(Err(_))) => {}
                (BranchCall::Abort, BranchAnswer::Done(Ok(()))) => aborted = true,
                (call, answer) => {
                    return Err(self.h.violation(format!(
                        "{} {}: a {} in flight with others was answered {}",
                        key.0,
                        key.1,
                        call.name(),
                        answer.show()
                    )))
                }
            }
        }
        if votes.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(self.h.violation(format!(
                "{} {}: deliveries of the same prepare in flight at once were answered \
                 differently: {votes:?}",
                key.0, key.1
            )));
        }
        let state = match (votes.first(), aborted) {
            (None, false) => BranchState::Untouched,
            (Some(Vote::Yes), false) => BranchState::VotedYes,
            (Some(Vote::No { reason }), false) => BranchState::VotedNo {
                reason: reason.clone(),
            },
            // A YES means the prepare ran first: the abort then released it.
            (Some(Vote::Yes), true) => BranchState::Aborted { was_prepared: true },
            // A NO: either the prepare ran first and voted NO (the abort then answered done)
            // or the abort came first (a null abort, and the late prepare was refused). The
            // record tells which; `check` then holds the answer to it.
            (Some(Vote::No { reason }), true) => {
                match self.h.participant().branch_record(&key.0, key.1) {
                    Ok(Some(BranchRecord::VotedNo { .. })) => BranchState::VotedNo {
                        reason: reason.clone(),
                    },
                    _ => BranchState::Aborted {
                        was_prepared: false,
                    },
                }
            }
            (None, true) => BranchState::Aborted {
                was_prepared: false,
            },
        };
        self.set_state(key, state);
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Saga steps.

/// Drives a [`CompensableResource`] adversarially (see the [module docs](self)). Its builder
/// methods are [`TwoPhaseCheck`]'s; the payload generator draws a [`StepPayload`].
pub struct SagaStepCheck<S> {
    name: String,
    step: Arc<S>,
    payloads: Option<StepPayloadFn>,
    settings: Settings,
}

impl<S: CompensableResource> SagaStepCheck<S> {
    /// Checks `step`, hosted under `name` (the `resource` of every saga step the testkit
    /// sends).
    pub fn new(name: impl Into<String>, step: S) -> Self {
        SagaStepCheck {
            name: name.into(),
            step: Arc::new(step),
            payloads: None,
            settings: Settings::default(),
        }
    }

    /// The payload generator (required): one step's action and compensation payloads per
    /// call. Draw keys from a small set so that concurrent steps collide, and let some actions
    /// fail for a business reason so that path is driven too.
    pub fn payloads<F>(mut self, payloads: F) -> Self
    where
        F: FnMut(&mut SplitMix64) -> StepPayload + Send + 'static,
    {
        self.payloads = Some(Box::new(payloads));
        self
    }

    settings_methods!();

    /// Plays every round; returns the first [`Violation`] found instead of panicking.
    pub async fn try_run(self) -> Result<Report, Violation> {
        let attempts = Arc::new(Attempts::default());
        let payloads = self
            .payloads
            .expect("SagaStepCheck needs .payloads(..): the payload generator");
        let rounds = self.settings.rounds;
        let (name, step, counter) = (self.name.clone(), self.step, attempts.clone());
        let harness = Harness::start(self.settings, attempts, move |builder| {
            builder.saga_step(
                name.clone(),
                CountedStep {
                    inner: step.clone(),
                    attempts: counter.clone(),
                },
            )
        })
        .await;
        let mut driver = SagaDriver {
            h: harness,
            name: self.name,
            payloads,
            steps: BTreeMap::new(),
            pending: Vec::new(),
        };
        for round in 0..rounds {
            driver.h.round = round;
            driver.round().await?;
            driver.h.report.rounds += 1;
        }
        driver.finish().await?;
        Ok(driver.h.report)
    }
}

type StepKey = (TxnId, u32);

struct StepModel {
    payload: StepPayload,
    state: StepState,
}

/// A saga call the testkit delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SagaCall {
    Act,
    Compensate,
}

impl SagaCall {
    fn name(self) -> &'static str {
        match self {
            SagaCall::Act => "act",
            SagaCall::Compensate => "compensate",
        }
    }
}

enum SagaAnswer {
    Outcome(Result<StepOutcome, Error>),
    Done(Result<(), Error>),
}

impl SagaAnswer {
    fn show(&self) -> String {
        match self {
            SagaAnswer::Outcome(answer) => show(answer),
            SagaAnswer::Done(answer) => show(answer),
        }
    }
}

struct SagaDriver {
    h: Harness,
    name: String,
    payloads: StepPayloadFn,
    steps: BTreeMap<StepKey, StepModel>,
    /// Succeeded steps whose compensation answered an error: retried every round.
    pending: Vec<StepKey>,
}

impl SagaDriver {
    fn ctx(&self, key: &StepKey) -> StepContext {
        StepContext {
            saga: key.0.clone(),
            step: key.1,
            step_name: format!("step{}", key.1),
            resource: self.name.clone(),
        }
    }

    fn state(&self, key: &StepKey) -> StepState {
        self.steps[key].state.clone()
    }

    fn set_state(&mut self, key: &StepKey, state: StepState) {
        self.steps
            .get_mut(key)
            .expect("a step the testkit made")
            .state = state;
    }

    fn new_step(&mut self) -> StepKey {
        let saga = self.h.new_txn();
        let step = self.h.below(3) as u32;
        let payload = (self.payloads)(&mut self.h.rng);
        let key = (saga, step);
        self.steps.insert(
            key.clone(),
            StepModel {
                payload,
                state: StepState::Untouched,
            },
        );
        key
    }

    fn known(steps: &BTreeMap<StepKey, StepModel>) -> Known<'_> {
        let steps = steps
            .iter()
            .filter_map(|((saga, step), model)| {
                let state = match model.state {
                    StepState::Succeeded => KnownStepState::Applied,
                    StepState::Compensated {
                        action_applied: true,
                    } => KnownStepState::Compensated,
                    StepState::Untouched
                    | StepState::Failed { .. }
                    | StepState::Compensated {
                        action_applied: false,
                    } => return None,
                };
                Some(KnownStep {
                    saga,
                    step: *step,
                    action: &model.payload.action,
                    compensation: &model.payload.compensation,
                    state,
                })
            })
            .collect();
        Known {
            branches: Vec::new(),
            steps,
        }
    }

    fn check(&self, key: &StepKey) -> Result<(), Violation> {
        let (saga, step) = key;
        let record = self
            .h
            .participant()
            .step_record(saga, *step)
            .map_err(|e| self.h.violation(format!("cannot read the step log: {e}")))?;
        let effects = StepEffects {
            action: self.h.effects(Kind::Action, saga, *step)?,
            compensate: self.h.effects(Kind::Compensate, saga, *step)?,
        };
        check_step(&self.steps[key].state, &self.name, record.as_ref(), effects)
            .map_err(|e| self.h.violation(format!("saga {saga} step {step}: {e}")))
    }

    fn check_invariant(&mut self) -> Result<(), Violation> {
        let known = Self::known(&self.steps);
        self.h.check_invariant(&known)
    }

    fn check_all(&mut self) -> Result<(), Violation> {
        for key in self.steps.keys() {
            self.check(key)?;
        }
        self.check_invariant()
    }

    async fn between_calls(&mut self) -> Result<(), Violation> {
        if self.h.maybe_crash().await? {
            self.check_all()?;
        }
        Ok(())
    }

    fn deliveries(&mut self) -> u32 {
        if self.h.percent(40) {
            2 + self.h.below(2) as u32
        } else {
            1
        }
    }

    async fn round(&mut self) -> Result<(), Violation> {
        match self.h.below(100) {
            0..=49 => self.lifecycle().await?,
            50..=64 => self.compensation_before_action().await?,
            _ => self.burst().await?,
        }
        self.retry_pending().await
    }

    async fn finish(&mut self) -> Result<(), Violation> {
        self.retry_pending().await?;
        self.h.report.compensations_pending = self.pending.len() as u64;
        self.h.note(format!(
            "end: {} compensations still answering an error",
            self.pending.len()
        ));
        self.check_all()
    }

    /// One more try of every compensation that answered an error.
    async fn retry_pending(&mut self) -> Result<(), Violation> {
        for key in std::mem::take(&mut self.pending) {
            self.compensate(&key).await?;
        }
        Ok(())
    }

    /// The action (repeated); if it succeeded, sometimes its compensation (repeated) and then
    /// a late action; if it failed, its (null) compensation, as the coordinator sends it.
    async fn lifecycle(&mut self) -> Result<(), Violation> {
        let key = self.new_step();
        for _ in 0..self.deliveries() {
            self.act(&key).await?;
        }
        let compensate = match self.state(&key) {
            StepState::Succeeded => self.h.percent(55),
            StepState::Failed { .. } => true,
            StepState::Untouched | StepState::Compensated { .. } => false,
        };
        if compensate {
            for _ in 0..self.deliveries() {
                self.compensate(&key).await?;
            }
            if self.h.percent(40) {
                self.act(&key).await?;
            }
        }
        Ok(())
    }

    /// A compensation first (nothing to undo), then the action, which must be refused.
    async fn compensation_before_action(&mut self) -> Result<(), Violation> {
        let key = self.new_step();
        for _ in 0..self.deliveries() {
            self.compensate(&key).await?;
        }
        for _ in 0..self.deliveries() {
            self.act(&key).await?;
        }
        Ok(())
    }

    async fn act(&mut self, key: &StepKey) -> Result<(), Violation> {
        self.between_calls().await?;
        let (saga, index) = (&key.0, key.1);
        let before = self.h.attempts(Kind::Action, saga, index);
        let state = self.state(key);
        let ctx = self.ctx(key);
        let payload = self.steps[key].payload.action.clone();
        let answer = self.h.participant().act(&ctx, &payload).await;
        self.h.report.calls += 1;
        self.h.note(format!(
            "act {saga} {index} payload={} -> {}",
            show_payload(&payload),
            show(&answer)
        ));
        match (&state, answer) {
            (StepState::Untouched, Ok(StepOutcome::Succeeded)) => {
                self.set_state(key, StepState::Succeeded)
            }
            (StepState::Untouched, Ok(StepOutcome::Failed { reason })) => {
                self.set_state(key, StepState::Failed { reason })
            }
            (StepState::Untouched, Err(_)) => {}
            (StepState::Succeeded, Ok(StepOutcome::Succeeded)) => {
                self.h
                    .expect_not_run(Kind::Action, saga, index, before, "a repeated action")?;
            }
            (StepState::Failed { reason }, Ok(StepOutcome::Failed { reason: again }))
                if *reason == again =>
            {
                self.h
                    .expect_not_run(Kind::Action, saga, index, before, "a repeated action")?;
            }
            (StepState::Compensated { .. }, Ok(StepOutcome::Failed { reason }))
                if reason == REFUSED_AFTER_COMPENSATION =>
            {
                self.h.expect_not_run(
                    Kind::Action,
                    saga,
                    index,
                    before,
                    "an action after its step's compensation",
                )?;
            }
            (state, answer) => {
                return Err(self.h.violation(format!(
                    "saga {saga} step {index}: an action of a step answered {state:?} before \
                     was answered {}; the barrier promises {}",
                    show(&answer),
                    match state {
                        StepState::Succeeded => "SUCCEEDED again",
                        StepState::Failed { .. } => "the same failure again",
                        StepState::Compensated { .. } => "FAILED \"compensated\"",
                        StepState::Untouched => "an outcome",
                    }
                )))
            }
        }
        self.check(key)?;
        self.check_invariant()
    }

    async fn compensate(&mut self, key: &StepKey) -> Result<(), Violation> {
        self.between_calls().await?;
        let (saga, index) = (key.0.clone(), key.1);
        let before = self.h.attempts(Kind::Compensate, &saga, index);
        let state = self.state(key);
        let ctx = self.ctx(key);
        let payload = self.steps[key].payload.compensation.clone();
        let answer = self.h.participant().compensate(&ctx, &payload).await;
        self.h.report.calls += 1;
        self.h.note(format!(
            "compensate {saga} {index} payload={} -> {}",
            show_payload(&payload),
            show(&answer)
        ));
        let next = self.after_compensation(key, &state, &answer)?;
        if state != StepState::Succeeded {
            self.h.expect_not_run(
                Kind::Compensate,
                &saga,
                index,
                before,
                "a compensation with nothing to undo",
            )?;
        }
        self.set_state(key, next);
        self.check(key)?;
        self.check_invariant()
    }

    /// The state after a compensation answered `answer` in `state`, or the violation. A
    /// compensation that answered an error is queued for a retry.
    fn after_compensation(
        &mut self,
        key: &StepKey,
        state: &StepState,
        answer: &Result<(), Error>,
    ) -> Result<StepState, Violation> {
        match (state, answer) {
            (StepState::Succeeded, Ok(())) => Ok(StepState::Compensated {
                action_applied: true,
            }),
            (StepState::Succeeded, Err(_)) => {
                // Not applied; the coordinator retries (and so does the testkit).
                if !self.pending.contains(key) {
                    self.pending.push(key.clone());
                }
                Ok(StepState::Succeeded)
            }
            (StepState::Untouched | StepState::Failed { .. }, Ok(())) => {
                Ok(StepState::Compensated {
                    action_applied: false,
                })
            }
            (StepState::Compensated { .. }, Ok(())) => Ok(state.clone()),
            (_, Err(e)) => Err(self.h.violation(format!(
                "saga {} step {}: a compensation of a step answered {state:?} before failed \
                 ({e}); with nothing to undo it must be answered done",
                key.0, key.1
            ))),
        }
    }

    /// Calls in flight at once: new steps (some acted twice at once, some with their
    /// compensation racing the action); then, at once again, compensations of some of those
    /// that succeeded (some delivered twice at once).
    async fn burst(&mut self) -> Result<(), Violation> {
        self.h.report.bursts += 1;
        let slots = self.h.concurrency;
        let mut calls: Vec<(StepKey, SagaCall)> = Vec::new();
        let mut fresh = Vec::new();
        while calls.len() + 2 <= slots && (fresh.len() < 2 || self.h.percent(70)) {
            let key = self.new_step();
            match self.h.below(3) {
                0 => {
                    calls.push((key.clone(), SagaCall::Act));
                    calls.push((key.clone(), SagaCall::Act));
                }
                1 => calls.push((key.clone(), SagaCall::Act)),
                _ => {
                    calls.push((key.clone(), SagaCall::Compensate));
                    calls.push((key.clone(), SagaCall::Act));
                }
            }
            fresh.push(key);
        }
        self.shuffle(&mut calls);
        self.between_calls().await?;
        let answers = self.concurrently(calls).await;
        for key in &fresh {
            let mine: Vec<&(StepKey, SagaCall, SagaAnswer)> =
                answers.iter().filter(|(k, _, _)| k == key).collect();
            self.settle_racing(key, &mine)?;
            self.check(key)?;
        }
        self.check_invariant()?;

        let mut calls = Vec::new();
        for key in &fresh {
            if self.state(key) == StepState::Succeeded && self.h.percent(50) {
                for _ in 0..1 + self.h.below(2) {
                    calls.push((key.clone(), SagaCall::Compensate));
                }
            }
        }
        self.shuffle(&mut calls);
        self.between_calls().await?;
        let answers = self.concurrently(calls).await;
        for key in &fresh {
            let state = self.state(key);
            let mut next = state.clone();
            for (_, _, answer) in answers.iter().filter(|(k, _, _)| k == key) {
                let SagaAnswer::Done(answer) = answer else {
                    unreachable!("a compensation answers done")
                };
                // One success among the deliveries makes the step compensated.
                match self.after_compensation(key, &state, answer)? {
                    StepState::Succeeded => {}
                    compensated => next = compensated,
                }
            }
            if next != StepState::Succeeded {
                self.pending.retain(|k| k != key);
            }
            self.set_state(key, next);
            self.check(key)?;
        }
        self.check_invariant()
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.h.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    async fn concurrently(
        &mut self,
        calls: Vec<(StepKey, SagaCall)>,
    ) -> Vec<(StepKey, SagaCall, SagaAnswer)> {
        let mut tasks = JoinSet::new();
        for (i, (key, call)) in calls.iter().enumerate() {
            let participant = self.h.participant().clone();
            let ctx = self.ctx(key);
            let call = *call;
            let payload = match call {
                SagaCall::Act => self.steps[key].payload.action.clone(),
                SagaCall::Compensate => self.steps[key].payload.compensation.clone(),
            };
            tasks.spawn(async move {
                let answer = match call {
                    SagaCall::Act => SagaAnswer::Outcome(participant.act(&ctx, &payload).await),
                    SagaCall::Compensate => {
                        SagaAnswer::Done(participant.compensate(&ctx, &payload).await)
                    }
                };
                (i, answer)
            });
        }
        let mut answers: Vec<Option<SagaAnswer>> = calls.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, answer) = joined.expect("a testkit call task panicked");
            answers[i] = Some(answer);
        }
        self.h.report.calls += calls.len() as u64;
        let mut out = Vec::with_capacity(calls.len());
        for ((key, call), answer) in calls.into_iter().zip(answers) {
            let answer = answer.expect("every call answers");
            let payload = match call {
                SagaCall::Act => &self.steps[&key].payload.action,
                SagaCall::Compensate => &self.steps[&key].payload.compensation,
            };
            let payload = show_payload(payload);
            self.h.note(format!(
                "at once: {} {} {} payload={payload} -> {}",
                call.name(),
                key.0,
                key.1,
                answer.show()
            ));
            out.push((key, call, answer));
        }
        out
    }

    /// A new step's state from the answers of its calls in flight at once: two deliveries of
    /// its action, or its compensation racing its action.
    fn settle_racing(
        &mut self,
        key: &StepKey,
        answers: &[&(StepKey, SagaCall, SagaAnswer)],
    ) -> Result<(), Violation> {
        let mut outcomes = Vec::new();
        let mut compensation = None;
        for (_, call, answer) in answers {
            match (call, answer) {
                (SagaCall::Act, SagaAnswer::Outcome(Ok(outcome))) => outcomes.push(outcome.clone()),
                (SagaCall::Act, SagaAnswer::Outcome(Err(_))) => {}
                (SagaCall::Compensate, SagaAnswer::Done(answer)) => {
                    compensation = Some(answer.is_ok())
                }
                (call, answer) => unreachable!("{call:?} answered {}", answer.show()),
            }
        }
        if outcomes.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(self.h.violation(format!(
                "saga {} step {}: deliveries of the same action in flight at once were answered \
                 differently: {outcomes:?}",
                key.0, key.1
            )));
        }
        let state = match (outcomes.first(), compensation) {
            (None, None) => StepState::Untouched,
            (Some(StepOutcome::Succeeded), None) => StepState::Succeeded,
            (Some(StepOutcome::Failed { reason }), None) => StepState::Failed {
                reason: reason.clone(),
            },
            // A success means the action ran first; the compensation then undid it, or
            // answered an error and is retried later.
            (Some(StepOutcome::Succeeded), Some(true)) => StepState::Compensated {
                action_applied: true,
            },
            (Some(StepOutcome::Succeeded), Some(false)) => {
                self.pending.push(key.clone());
                StepState::Succeeded
            }
            // A failure (the action's own, or the refusal after the compensation came first)
            // or no answer: nothing to undo, so the compensation must have been done.
            (Some(StepOutcome::Failed { .. }) | None, Some(true)) => StepState::Compensated {
                action_applied: false,
            },
            (Some(StepOutcome::Failed { .. }) | None, Some(false)) => {
                return Err(self.h.violation(format!(
                    "saga {} step {}: a compensation with nothing to undo answered an error",
                    key.0, key.1
                )))
            }
        };
        self.set_state(key, state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(payload: &[u8]) -> BranchRecord {
        BranchRecord::Prepared {
            resource: "kv".into(),
            payload: payload.to_vec(),
            coordinator: COORDINATOR.into(),
            prepared_ms: 1,
        }
    }

    fn effects(prepare: u64, commit: u64, abort: u64) -> BranchEffects {
        BranchEffects {
            prepare,
            commit,
            abort,
        }
    }

    #[test]
    fn branch_checks_accept_what_the_barrier_promises_and_name_every_excess() {
        let committed = BranchRecord::Committed {
            resource: "kv".into(),
            committed_ms: 2,
        };
        let ok =
            |state, record: Option<&BranchRecord>, e| check_branch(&state, "kv", b"p", record, e);
        assert_eq!(ok(BranchState::Untouched, None, effects(0, 0, 0)), Ok(()));
        assert_eq!(
            ok(
                BranchState::VotedYes,
                Some(&prepared(b"p")),
                effects(1, 0, 0)
            ),
            Ok(())
        );
        assert_eq!(
            ok(BranchState::Committed, Some(&committed), effects(1, 1, 0)),
            Ok(())
        );

        let twice = ok(BranchState::Committed, Some(&committed), effects(1, 2, 0)).unwrap_err();
        assert!(
            twice.contains("commit took effect 2 times, expected 1"),
            "{twice}"
        );
        let both = ok(BranchState::Committed, Some(&committed), effects(1, 1, 1)).unwrap_err();
        assert!(
            both.contains("abort took effect 1 times, expected 0"),
            "{both}"
        );
        let other_payload = ok(
            BranchState::VotedYes,
            Some(&prepared(b"q")),
            effects(1, 0, 0),
        )
        .unwrap_err();
        assert!(other_payload.contains("its record is"), "{other_payload}");
        let lost = ok(
            BranchState::Committed,
            Some(&prepared(b"p")),
            effects(1, 0, 0),
        )
        .unwrap_err();
        assert!(lost.contains("answered Committed"), "{lost}");
        let no_kept_writes = ok(
            BranchState::VotedNo { reason: "r".into() },
            Some(&BranchRecord::VotedNo { reason: "r".into() }),
            effects(1, 0, 0),
        )
        .unwrap_err();
        assert!(no_kept_writes.contains("prepare took effect 1 times, expected 0"));
        let late_prepare_ran = ok(
            BranchState::Aborted {
                was_prepared: false,
            },
            Some(&BranchRecord::Aborted {
                was_prepared: false,
                aborted_ms: 3,
            }),
            effects(1, 0, 0),
        )
        .unwrap_err();
        assert!(late_prepare_ran.contains("prepare took effect 1 times, expected 0"));
    }

    #[test]
    fn step_checks_accept_what_the_barrier_promises_and_name_every_excess() {
        let succeeded = StepRecord::ActionSucceeded {
            resource: "kv".into(),
            acted_ms: 1,
        };
        let compensated = |action_applied| StepRecord::Compensated {
            action_applied,
            compensated_ms: 2,
        };
        let e = |action, compensate| StepEffects { action, compensate };
        assert_eq!(
            check_step(&StepState::Succeeded, "kv", Some(&succeeded), e(1, 0)),
            Ok(())
        );
        assert_eq!(
            check_step(
                &StepState::Compensated {
                    action_applied: true
                },
                "kv",
                Some(&compensated(true)),
                e(1, 1)
            ),
            Ok(())
        );
        let hanging = check_step(
            &StepState::Compensated {
                action_applied: false,
            },
            "kv",
            Some(&compensated(false)),
            e(1, 0),
        )
        .unwrap_err();
        assert!(
            hanging.contains("the action took effect 1 times, expected 0"),
            "{hanging}"
        );
        let twice = check_step(&StepState::Succeeded, "kv", Some(&succeeded), e(2, 0)).unwrap_err();
        assert!(twice.contains("the action took effect 2 times"), "{twice}");
        let lost = check_step(&StepState::Succeeded, "kv", None, e(0, 0)).unwrap_err();
        assert!(lost.contains("its record is absent"), "{lost}");
    }

    #[test]
    fn a_violation_names_the_seed_and_the_last_calls() {
        let violation = Violation {
            seed: 42,
            round: 3,
            message: "holds do not match".into(),
            calls: (0..100).map(|i| format!("r3 call {i}")).collect(),
            calls_dropped: 5,
        };
        let text = violation.to_string();
        assert!(
            text.contains("seed 42 round 3: holds do not match"),
            "{text}"
        );
        assert!(text.contains(".seed(42)"), "{text}");
        assert!(text.contains("the last 60 of 105 calls"), "{text}");
        assert!(
            text.contains("r3 call 99") && !text.contains("r3 call 39\n"),
            "{text}"
        );
    }

    #[test]
    fn payloads_show_as_text_or_hex_and_are_cut() {
        assert_eq!(show_payload(b"{\"a\":1}"), "{\"a\":1}");
        assert_eq!(show_payload(&[0, 255]), "00ff");
        assert!(show_payload(&[b'x'; 500]).ends_with("..."));
    }
}
