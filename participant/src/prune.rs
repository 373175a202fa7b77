//! Pruning: the participant forgets barrier records it can no longer need, so that a steady
//! workload keeps a branch log, step log and callback log of steady size.
//!
//! A record goes once both its id and its last change are older than the participant's
//! retention (`ParticipantConfig::retention_ms`; `None` keeps everything):
//! - a 2PC branch that is decided here (`Committed`, `Aborted`) or voted NO. A `Prepared`
//!   branch is never removed: it is in doubt until the coordinator's decision arrives;
//! - a saga step, whatever its record (`ActionSucceeded`, `ActionFailed`, `Compensated`);
//! - a handled completion callback.
//!
//! **The horizon.** Every pruning job also stores, in the same sled transaction as its
//! removals (tree [`RETENTION_TREE`]), the horizon: a time such that every id whose records
//! may have been removed was created before it. It only moves forward, so a clock stepping
//! back cannot bring a forgotten id back to life. A call that finds no record for an id
//! created before the horizon cannot tell "never seen" from "forgotten", and is answered so
//! that both are safe ([`forgotten`], read inside the call's own sled transaction):
//! - `Prepare`: NO, recording nothing (no reservation that nobody would release; the
//!   coordinator aborts, or, if it had forgotten the transaction, answers by presumed abort);
//! - `Commit`: done. A prepared branch is never removed, and a commit is only ever sent to a
//!   branch that voted YES, so the record that went was `Committed`: this is a redelivery
//!   whose acknowledgement was lost;
//! - `Abort`: done, recording nothing (a later prepare is refused by the horizon anyway);
//! - `Act`: FAILED with [`FORGOTTEN_REASON`], running nothing and recording nothing (a late
//!   duplicate of an action that ran would otherwise run it twice). The coordinator ignores a
//!   stale attempt's answer; a current attempt's FAILED makes the saga compensate;
//! - `Compensate`: refused with an error (FAILED_PRECONDITION), since whether the action took
//!   effect here is no longer known. The coordinator keeps retrying and flags the saga stuck,
//!   which is where an operator must look: it happens only to a saga that outlived the
//!   participant's retention, so the retention must exceed the longest saga's lifetime;
//! - a completion callback is not covered by the horizon: one with no record runs its handler.
//!   The coordinator stops delivering once a delivery is acknowledged, so only a duplicate
//!   delayed longer than the retention could run a handler twice, while answering "already
//!   handled" would skip a handler whose first delivery comes after a long outage.
//!
//! **How.** A background task ([`Participant::spawn_pruner`], started by `serve`) runs
//! [`Participant::prune_once`] every [`prune_interval`]: it reads candidates from each log's
//! key range below the horizon (ids sort by creation time) without a transaction, then
//! removes at most [`PRUNE_JOB_MAX`] of them per job in a body of the ordinary batches
//! (`crate::batch`), which re-reads each record inside the sled transaction before removing
//! it. So pruning is serialized with every call, touches only the SDK's trees (never the
//! service's), and is durable with the batch's flush.

use std::time::Duration;

use sled::transaction::TransactionalTree;
use tandem_common::{codec, unix_now_ms, TxnId};

use crate::barrier::BranchRecord;
use crate::batch::TxResult;
use crate::error::Error;
use crate::participant::{
    CallbackRecord, Participant, BRANCHES_VIEW, RETENTION_VIEW, SAGA_CALLBACKS_VIEW, STEPS_VIEW,
};
use crate::saga_barrier::StepRecord;

/// The tree holding the pruning horizon.
pub const RETENTION_TREE: &str = "tandem.participant.retention";
/// The horizon's key in [`RETENTION_TREE`]: a big-endian u64, ms since the Unix epoch.
const HORIZON_KEY: &[u8] = b"horizon";
/// The reason an action of a forgotten saga is refused with.
pub const FORGOTTEN_REASON: &str =
    "refused: the saga is older than this participant's retention, and its step records may have been pruned";
/// Most records one pruning job removes (one body in one batch).
pub const PRUNE_JOB_MAX: usize = 256;
/// Most records one round examines in each log.
pub const PRUNE_SCAN_MAX: usize = 16 * 1_024;
/// Default of `ParticipantConfig::retention_ms`: 7 days.
pub const RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

/// How often the pruner runs: a quarter of the retention, within 100 ms..60 s.
pub fn prune_interval(retention_ms: u64) -> Duration {
    Duration::from_millis((retention_ms / 4).clamp(100, 60_000))
}

/// Whether records of `id` may have been pruned (created before the stored horizon). Read
/// inside a call's transaction, so it is consistent with the removals.
pub(crate) fn forgotten(views: &[TransactionalTree], id: &TxnId) -> TxResult<bool> {
    Ok(id.created_ms() < horizon_in(&views[RETENTION_VIEW])?)
}

fn horizon_in(tree: &TransactionalTree) -> TxResult<u64> {
    Ok(tree
        .get(HORIZON_KEY)?
        .map(|bytes| decode_horizon(&bytes))
        .unwrap_or(0))
}

fn decode_horizon(bytes: &[u8]) -> u64 {
    let bytes: [u8; 8] = bytes
        .try_into()
        .unwrap_or_else(|_| panic!("malformed pruning horizon {bytes:?}"));
    u64::from_be_bytes(bytes)
}

/// What one round removed, per log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneStats {
    pub branches: usize,
    pub steps: usize,
    pub callbacks: usize,
}

impl PruneStats {
    pub fn total(&self) -> usize {
        self.branches + self.steps + self.callbacks
    }
}

/// The SDK's logs, as pruning sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    Branches,
    Steps,
    Callbacks,
}

impl Log {
    const ALL: [Log; 3] = [Log::Branches, Log::Steps, Log::Callbacks];

    fn view(self) -> usize {
        match self {
            Log::Branches => BRANCHES_VIEW,
            Log::Steps => STEPS_VIEW,
            Log::Callbacks => SAGA_CALLBACKS_VIEW,
        }
    }

    /// Whether a record of this log, last changed as `bytes` say, may go at `before_ms`.
    fn prunable(self, bytes: &[u8], before_ms: u64) -> Result<bool, codec::CodecError> {
        Ok(match self {
            Log::Branches => match codec::decode::<BranchRecord>(bytes)? {
                BranchRecord::Prepared { .. } => false,
                BranchRecord::VotedNo { .. } => true, // no time of its own: the id's age decides
                BranchRecord::Committed { committed_ms, .. } => committed_ms < before_ms,
                BranchRecord::Aborted { aborted_ms, .. } => aborted_ms < before_ms,
            },
            Log::Steps => match codec::decode::<StepRecord>(bytes)? {
                StepRecord::ActionSucceeded { acted_ms, .. }
                | StepRecord::ActionFailed { acted_ms, .. } => acted_ms < before_ms,
                StepRecord::Compensated { compensated_ms, .. } => compensated_ms < before_ms,
            },
            Log::Callbacks => codec::decode::<CallbackRecord>(bytes)?.handled_ms < before_ms,
        })
    }
}

impl Participant {
    /// Starts the pruner in the background (abort the handle to stop it); `None` if the
    /// configuration keeps everything.
    pub fn spawn_pruner(&self) -> Option<tokio::task::JoinHandle<()>> {
        let retention_ms = self.config().retention_ms?;
        let participant = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(prune_interval(retention_ms)).await;
                match participant.prune_once(unix_now_ms()).await {
                    Ok(stats) if stats.total() > 0 => {
                        tracing::info!(?stats, "pruned barrier records past the retention")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning failed; will try again"),
                }
            }
        }))
    }

    /// One round at `now_ms`: removes what is past the retention, at most
    /// [`PRUNE_SCAN_MAX`] records examined per log. Does nothing if retention is off.
    pub async fn prune_once(&self, now_ms: u64) -> Result<PruneStats, Error> {
        let mut stats = PruneStats::default();
        let Some(retention_ms) = self.config().retention_ms else {
            return Ok(stats);
        };
        let horizon = now_ms.saturating_sub(retention_ms);
        let bound = format!("{horizon:013}");
        for log in Log::ALL {
            // Candidates are read outside any transaction; the job judges each again inside.
            let mut candidates = Vec::new();
            for entry in self
                .log_tree(log.view())
                .range(..bound.as_bytes())
                .take(PRUNE_SCAN_MAX)
            {
                let (key, value) = entry?;
                if log.prunable(&value, horizon)? {
                    candidates.push(key.to_vec());
                }
            }
            for chunk in candidates.chunks(PRUNE_JOB_MAX) {
                let keys = chunk.to_vec();
                let removed = self
                    .run_in_batch(Box::new(move |views, prior| {
                        debug_assert!(prior.is_none(), "pruning never declines");
                        remove_in(views, log, &keys, horizon)
                    }))
                    .await?;
                match log {
                    Log::Branches => stats.branches += removed,
                    Log::Steps => stats.steps += removed,
                    Log::Callbacks => stats.callbacks += removed,
                }
            }
        }
        Ok(stats)
    }

    /// The stored pruning horizon (0: nothing was ever pruned).
    pub fn prune_horizon_ms(&self) -> Result<u64, Error> {
        Ok(self
            .log_tree(RETENTION_VIEW)
            .get(HORIZON_KEY)?
            .map(|bytes| decode_horizon(&bytes))
            .unwrap_or(0))
    }
}

/// The pruning job: removes each of `keys` still prunable, and moves the horizon forward.
fn remove_in(
    views: &[TransactionalTree],
    log: Log,
    keys: &[Vec<u8>],
    horizon: u64,
) -> TxResult<usize> {
    let tree = &views[log.view()];
    let mut removed = 0;
    for key in keys {
        let Some(bytes) = tree.get(key)? else {
            continue;
        };
        let prunable = log.prunable(&bytes, horizon).map_err(|e| {
            sled::transaction::ConflictableTransactionError::Abort(crate::batch::Abandon::Corrupt(
                e,
            ))
        })?;
        if prunable {
            tree.remove(key.as_slice())?;
            removed += 1;
        }
    }
    let retention = &views[RETENTION_VIEW];
    if horizon > horizon_in(retention)? {
        retention.insert(HORIZON_KEY, &horizon.to_be_bytes())?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank::{self, BankOp};
    use crate::resource::{BranchContext, Vote};
    use crate::saga::{StepContext, StepOutcome};
    use tandem_common::BranchIdx;

    const HOUR_MS: u64 = 3_600_000;

    fn open(dir: &std::path::Path) -> Participant {
        bank::builder(dir)
            .retention(Some(Duration::from_millis(HOUR_MS)))
            .open()
            .unwrap()
    }

    fn id(created_ms: u64, name: &str) -> TxnId {
        TxnId::parse(&format!("{created_ms:013}-{name}")).unwrap()
    }

    fn branch(txn: &TxnId) -> BranchContext {
        BranchContext {
            txn: txn.clone(),
            branch: BranchIdx(0),
            resource: bank::RESOURCE.into(),
        }
    }

    fn step(saga: &TxnId, step: u32) -> StepContext {
        StepContext {
            saga: saga.clone(),
            step,
            step_name: String::new(),
            resource: bank::SAGA_STEP.into(),
        }
    }

    fn debit(amount: i64) -> Vec<u8> {
        BankOp::Debit {
            account: "alice".into(),
            amount,
        }
        .encode()
    }

    fn credit(amount: i64) -> Vec<u8> {
        BankOp::Credit {
            account: "alice".into(),
            amount,
        }
        .encode()
    }

    fn counts(p: &Participant) -> [usize; 3] {
        [BRANCHES_VIEW, STEPS_VIEW, SAGA_CALLBACKS_VIEW].map(|view| p.log_tree(view).len())
    }

    /// A bank with a one-hour retention and alice's account holding 1,000.
    async fn bank_with_alice() -> (tempfile::TempDir, Participant) {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        bank::ensure_accounts(&p, &[("alice".into(), 1_000)])
            .await
            .unwrap();
        (dir, p)
    }

    fn alice(p: &Participant) -> i64 {
        bank::balances(p.db()).unwrap()["alice"]
    }

    /// Decided branches and finished steps go once old; a prepared branch stays however old,
    /// and records younger than the retention (by the id or by their last change) stay.
    #[tokio::test]
    async fn pruning_removes_old_finished_records_and_keeps_open_and_young_ones() {
        let (dir, p) = bank_with_alice().await;
        let now = unix_now_ms();
        let old = now - 3 * HOUR_MS;
        let (committed, aborted, prepared) = (id(old, "c"), id(old, "a"), id(old, "p"));
        for txn in [&committed, &aborted, &prepared] {
            assert_eq!(
                p.prepare(&branch(txn), &debit(10), "http://c:1")
                    .await
                    .unwrap(),
                Vote::Yes
            );
        }
        p.decide(&committed, BranchIdx(0), bank::RESOURCE, true)
            .await
            .unwrap();
        p.decide(&aborted, BranchIdx(0), bank::RESOURCE, false)
            .await
            .unwrap();
        let saga = id(old, "s");
        assert_eq!(
            p.act(&step(&saga, 0), &debit(5)).await.unwrap(),
            StepOutcome::Succeeded
        );
        p.compensate(&step(&saga, 1), &credit(5)).await.unwrap(); // null compensation
        assert_eq!(counts(&p), [3, 2, 0]);

        // Half an hour later: every id is old, but every record changed less than an hour ago.
        let early = p.prune_once(now + HOUR_MS / 2).await.unwrap();
        assert_eq!(early.total(), 0, "{early:?}");
        // Two hours later: the decided branches and the steps go; the prepared branch stays.
        let stats = p.prune_once(now + 2 * HOUR_MS).await.unwrap();
        println!("pruned at now + 2 h: {stats:?}");
        assert_eq!(
            stats,
            PruneStats {
                branches: 2,
                steps: 2,
                callbacks: 0
            }
        );
        assert_eq!(counts(&p), [1, 0, 0]);
        assert!(matches!(
            p.branch_record(&prepared, BranchIdx(0)).unwrap(),
            Some(BranchRecord::Prepared { .. })
        ));
        assert_eq!(p.prune_horizon_ms().unwrap(), now + HOUR_MS);
        // An id created after the horizon is kept, whatever its record's age.
        let young = id(now + HOUR_MS + 1, "y");
        p.decide(&young, BranchIdx(0), bank::RESOURCE, false)
            .await
            .unwrap();
        assert_eq!(p.prune_once(now + 2 * HOUR_MS).await.unwrap().total(), 0);
        assert_eq!(counts(&p), [2, 0, 0]);
        // The horizon survives a restart.
        drop(p);
        let p = open(dir.path());
        assert_eq!(p.prune_horizon_ms().unwrap(), now + HOUR_MS);
    }

    /// Every late call of a forgotten id is answered safely and records nothing: a duplicate
    /// action does not run again, a prepare votes NO, a redelivered decision is done, and a
    /// compensation whose action's fate is no longer known is refused (never silently done).
    #[tokio::test]
    async fn late_duplicates_of_pruned_ids_are_answered_safely() {
        let (_dir, p) = bank_with_alice().await;
        let now = unix_now_ms();
        let old = now - 3 * HOUR_MS;
        let (txn, saga) = (id(old, "t"), id(old, "s"));
        p.prepare(&branch(&txn), &debit(10), "http://c:1")
            .await
            .unwrap();
        p.decide(&txn, BranchIdx(0), bank::RESOURCE, true)
            .await
            .unwrap();
        p.act(&step(&saga, 0), &debit(5)).await.unwrap();
        assert_eq!(alice(&p), 985);
        let stats = p.prune_once(now + 2 * HOUR_MS).await.unwrap();
        assert_eq!((stats.branches, stats.steps), (1, 1), "{stats:?}");

        let again = p.act(&step(&saga, 0), &debit(5)).await.unwrap();
        assert_eq!(
            again,
            StepOutcome::Failed {
                reason: FORGOTTEN_REASON.into()
            }
        );
        assert_eq!(
            alice(&p),
            985,
            "a duplicate action of a pruned saga must not run"
        );
        let compensate = p.compensate(&step(&saga, 0), &credit(5)).await;
        assert!(
            matches!(&compensate, Err(Error::Conflict(m)) if m.contains("retention")),
            "{compensate:?}"
        );
        assert_eq!(alice(&p), 985);
        // A redelivered commit (its acknowledgement lost) is done; a late prepare votes NO.
        p.decide(&txn, BranchIdx(0), bank::RESOURCE, true)
            .await
            .unwrap();
        let vote = p
            .prepare(&branch(&txn), &debit(10), "http://c:1")
            .await
            .unwrap();
        assert!(
            matches!(&vote, Vote::No { reason } if reason.contains("retention")),
            "{vote:?}"
        );
        p.decide(&txn, BranchIdx(0), bank::RESOURCE, false)
            .await
            .unwrap();
        assert_eq!(alice(&p), 985);
        assert_eq!(
            counts(&p),
            [0, 0, 0],
            "late calls of forgotten ids record nothing"
        );
        // A new id (created after the horizon) is served as usual.
        let fresh = id(now + HOUR_MS + 5, "f");
        assert_eq!(
            p.act(&step(&fresh, 0), &debit(1)).await.unwrap(),
            StepOutcome::Succeeded
        );
        assert_eq!(alice(&p), 984);
    }

    /// A handled callback's record goes once old; a redelivery after that runs the handler
    /// again (the documented trade: only a delivery delayed past the retention can do that,
    /// while skipping would lose a first delivery after a long outage).
    #[tokio::test]
    async fn handled_callbacks_are_pruned_once_old() {
        use crate::saga_state::{SagaPhase, SagaState};
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let now = unix_now_ms();
        let outcome = SagaState {
            id: id(now - 3 * HOUR_MS, "cb"),
            phase: SagaPhase::Completed,
            terminal: true,
            failed_step: String::new(),
            reason: String::new(),
            steps: Vec::new(),
            stuck: false,
            callback_delivered: false,
            accepted_ms: now - 3 * HOUR_MS,
            held: false,
        };
        let delivery = p.saga_finished(bank::CALLBACK, &outcome).await.unwrap();
        assert_eq!(delivery, crate::CallbackDelivery::Handled);
        assert_eq!(
            p.prune_once(now).await.unwrap().total(),
            0,
            "handled just now"
        );
        let stats = p.prune_once(now + 2 * HOUR_MS).await.unwrap();
        assert_eq!(stats.callbacks, 1, "{stats:?}");
        assert_eq!(counts(&p), [0, 0, 0]);
        assert_eq!(
            bank::saga_callbacks(p.db()).unwrap().len(),
            1,
            "the service's data stays"
        );
    }

    #[tokio::test]
    async fn without_retention_nothing_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let p = bank::builder(dir.path()).retention(None).open().unwrap();
        let txn = id(unix_now_ms() - 3 * HOUR_MS, "n");
        p.decide(&txn, BranchIdx(0), bank::RESOURCE, false)
            .await
            .unwrap();
        assert_eq!(p.prune_once(u64::MAX / 2).await.unwrap().total(), 0);
        assert!(p.spawn_pruner().is_none());
        assert_eq!(counts(&p)[0], 1);
    }
}
