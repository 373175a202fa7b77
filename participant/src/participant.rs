//! The participant: a sled database holding the service's trees and the branch log, and the
//! three calls (prepare, commit, abort) applied through the barrier.
//!
//! Each call is applied in a sled transaction over the branch log and the resource's trees:
//! the barrier reads the branch's record, the resource's code runs (if the barrier says so),
//! and the new record is written, all or nothing. Calls are batched (`crate::batch`): every
//! call queued while the flusher is busy commits in one sled transaction on the group-commit
//! flusher's thread (`tandem_common::group_commit`), and the answers are released only after
//! the flush that covers the batch, so no answer (a YES vote above all) ever reports a state
//! that a crash could undo. That includes repeated calls: a repeat may read a record that an
//! earlier call wrote but had not yet flushed. Running every transaction on that one thread
//! also means they never contend with each other or with a flush for sled's global
//! transaction lock.
//!
//! Crash points: `participant.after_prepare_persisted` (a YES is durable, not yet sent) and
//! `participant.after_commit_applied` (a commit is durable, not yet acknowledged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tandem_common::crash::crash_point;
use tandem_common::{
    codec, group_commit, unix_now_ms, BranchIdx, GroupCommit, TxnId, RECORD_BYTES_MAX,
};

use crate::barrier::{self, Action, BranchRecord, Call};
use crate::batch::{Abandon, TxResult, TxnBatcher};
use crate::error::Error;
use crate::resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};

/// The tree that holds the branch log (and so the barrier).
pub const BRANCHES_TREE: &str = "tandem.participant.branches";

/// Tunables of a participant.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// How often the in-doubt resolver looks for branches left prepared.
    pub in_doubt_check_interval_ms: u64,
    /// A branch prepared less than this long ago is left to the coordinator (which delivers
    /// decisions itself); older ones are asked about. At start-up every prepared branch is.
    pub in_doubt_age_ms_min: u64,
    /// Timeout of one outcome query to the coordinator.
    pub coordinator_query_timeout_ms: u64,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        ParticipantConfig {
            in_doubt_check_interval_ms: 1_000,
            in_doubt_age_ms_min: 5_000,
            coordinator_query_timeout_ms: 2_000,
        }
    }
}

struct Hosted {
    resource: Arc<dyn TwoPhaseResource>,
    /// The resource's tree names, as its `trees()` listed them.
    tree_names: Vec<String>,
    /// Where each of those trees is among the participant's trees (and so among the views of
    /// a batch's transaction, which spans them all; the branch log is at 0).
    tree_indices: Vec<usize>,
}

struct Inner {
    db: sled::Db,
    branches: sled::Tree,
    resources: BTreeMap<String, Hosted>,
    flusher: GroupCommit,
    batcher: Arc<TxnBatcher>,
    config: ParticipantConfig,
    dir: PathBuf,
}

#[cfg(test)]
impl Inner {
    /// Calls waiting for the next batch.
    fn batcher_queued(&self) -> usize {
        self.batcher.queued()
    }
}

/// A participant: cheap to clone, shared by the gRPC endpoint and the in-doubt resolver.
#[derive(Clone)]
pub struct Participant {
    inner: Arc<Inner>,
}

/// Builds a [`Participant`]: the resources it hosts are named before it opens.
pub struct ParticipantBuilder {
    dir: PathBuf,
    resources: Vec<(String, Arc<dyn TwoPhaseResource>)>,
    config: ParticipantConfig,
}

impl ParticipantBuilder {
    /// Hosts `resource` under `name` (the `resource` field of a branch; "" is the default).
    pub fn resource(mut self, name: impl Into<String>, resource: impl TwoPhaseResource) -> Self {
        self.resources.push((name.into(), Arc::new(resource)));
        self
    }

    pub fn config(mut self, config: ParticipantConfig) -> Self {
        self.config = config;
        self
    }

    /// Opens (or creates) the sled database and starts its flusher.
    pub fn open(self) -> Result<Participant, Error> {
        let db = group_commit::open_db(&self.dir)?;
        let branches = db.open_tree(BRANCHES_TREE)?;
        let mut resources = BTreeMap::new();
        // Every tree of the participant, each once (resources may share one); the branch log
        // first.
        let mut all_tree_names = vec![BRANCHES_TREE.to_string()];
        let mut all_trees = vec![branches.clone()];
        for (name, resource) in self.resources {
            let tree_names = resource.trees();
            let mut tree_indices = Vec::with_capacity(tree_names.len());
            for tree in &tree_names {
                if tree.starts_with("tandem.") {
                    return Err(Error::InvalidArgument(format!(
                        "resource {name:?} declares tree {tree:?}; names starting with \"tandem.\" are reserved"
                    )));
                }
                let index = match all_tree_names.iter().position(|t| t == tree) {
                    Some(index) => index,
                    None => {
                        all_tree_names.push(tree.clone());
                        all_trees.push(db.open_tree(tree)?);
                        all_trees.len() - 1
                    }
                };
                tree_indices.push(index);
            }
            if resources
                .insert(
                    name.clone(),
                    Hosted {
                        resource,
                        tree_names,
                        tree_indices,
                    },
                )
                .is_some()
            {
                return Err(Error::InvalidArgument(format!(
                    "resource {name:?} is registered twice"
                )));
            }
        }
        let flusher = GroupCommit::start(db.clone(), &self.dir)
            .map_err(|e| Error::Storage(format!("{}: {e}", self.dir.display())))?;
        let batcher = TxnBatcher::new(all_trees, flusher.clone());
        Ok(Participant {
            inner: Arc::new(Inner {
                db,
                branches,
                resources,
                flusher,
                batcher,
                config: self.config,
                dir: self.dir,
            }),
        })
    }
}

fn branch_key(txn: &TxnId, branch: BranchIdx) -> Vec<u8> {
    let mut key = Vec::with_capacity(txn.as_str().len() + 5);
    key.extend_from_slice(txn.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&branch.0.to_be_bytes());
    key
}

fn parse_branch_key(key: &[u8]) -> Option<(TxnId, BranchIdx)> {
    let split = key.len().checked_sub(5)?;
    if key[split] != 0 {
        return None;
    }
    let txn = TxnId::parse(std::str::from_utf8(&key[..split]).ok()?).ok()?;
    let branch = u32::from_be_bytes(key[split + 1..].try_into().ok()?);
    Some((txn, BranchIdx(branch)))
}

fn read_record(log: &TransactionalTree, key: &[u8]) -> TxResult<Option<BranchRecord>> {
    match log.get(key)? {
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|e| ConflictableTransactionError::Abort(Abandon::Corrupt(e))),
        None => Ok(None),
    }
}

fn write_record(log: &TransactionalTree, key: &[u8], record: &BranchRecord) -> TxResult<()> {
    let bytes = codec::encode(record)
        .map_err(|e| ConflictableTransactionError::Abort(Abandon::Corrupt(e)))?;
    assert!(
        bytes.len() <= RECORD_BYTES_MAX,
        "branch record of {} bytes exceeds RECORD_BYTES_MAX",
        bytes.len()
    );
    log.insert(key, bytes)?;
    Ok(())
}

/// Records a NO vote (the resource's writes were discarded), unless something was recorded
/// first, in which case that record decides the answer.
fn record_no_vote_in(log: &TransactionalTree, ctx: &BranchContext, reason: &str) -> TxResult<Vote> {
    let key = branch_key(&ctx.txn, ctx.branch);
    match read_record(log, &key)? {
        None => {
            let reason = reason.to_string();
            write_record(
                log,
                &key,
                &BranchRecord::VotedNo {
                    reason: reason.clone(),
                },
            )?;
            Ok(Vote::No { reason })
        }
        Some(existing) => match barrier::decide(Some(&existing), Call::Prepare) {
            Action::AnswerVote { yes: true, .. } => Ok(Vote::Yes),
            Action::AnswerVote { yes: false, reason } => Ok(Vote::No { reason }),
            other => unreachable!("barrier answered {other:?} to a prepare"),
        },
    }
}

fn resource_result<T>(r: Result<T, ResourceError>) -> TxResult<T> {
    r.map_err(|e| match e {
        ResourceError::Storage(e) => e.into(),
        ResourceError::Failed(m) => ConflictableTransactionError::Abort(Abandon::Failed(m)),
    })
}

/// A branch left prepared, as the in-doubt resolver sees it.
#[derive(Debug, Clone)]
pub struct PreparedBranch {
    pub ctx: BranchContext,
    pub coordinator: String,
    pub prepared_ms: u64,
}

impl Participant {
    /// Starts building a participant whose data lives in folder `dir`.
    pub fn builder(dir: impl AsRef<Path>) -> ParticipantBuilder {
        ParticipantBuilder {
            dir: dir.as_ref().to_path_buf(),
            resources: Vec::new(),
            config: ParticipantConfig::default(),
        }
    }

    /// The sled database, for the service's own reads and set-up writes outside transactions.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    pub fn config(&self) -> &ParticipantConfig {
        &self.inner.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Waits until everything written so far is durable.
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.inner.flusher.flush().await?)
    }

    fn hosted(&self, resource: &str) -> Result<&Hosted, Error> {
        self.inner
            .resources
            .get(resource)
            .ok_or_else(|| Error::UnknownResource(resource.to_string()))
    }

    /// Prepares a branch and returns its vote, durable before it returns.
    pub async fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        coordinator: &str,
    ) -> Result<Vote, Error> {
        self.hosted(&ctx.resource)?;
        let (this, job_ctx) = (self.clone(), ctx.clone());
        let (payload, coordinator) = (payload.to_vec(), coordinator.to_string());
        let (vote, first_time) = self
            .inner
            .batcher
            .run(Box::new(move |views, voted_no| match voted_no {
                None => this.prepare_in(views, &job_ctx, &payload, &coordinator),
                Some(Abandon::VotedNo(reason)) => {
                    Ok((record_no_vote_in(&views[0], &job_ctx, reason)?, true))
                }
                Some(other) => unreachable!("prepare re-run after {other:?}"),
            }))
            .await?;
        if first_time && vote == Vote::Yes {
            crash_point("participant.after_prepare_persisted");
        }
        tracing::debug!(txn = %ctx.txn, branch = %ctx.branch, ?vote, "prepare answered");
        Ok(vote)
    }

    fn service_trees<'a>(hosted: &'a Hosted, views: &'a [TransactionalTree]) -> ServiceTrees<'a> {
        ServiceTrees {
            names: &hosted.tree_names,
            indices: &hosted.tree_indices,
            views,
        }
    }

    /// The prepare, inside a batch's transaction: the vote, and whether this call recorded it
    /// (false for a repeat). A NO vote abandons the transaction, so that the service's writes
    /// are discarded; the batch then records the vote with [`record_no_vote_in`].
    fn prepare_in(
        &self,
        views: &[TransactionalTree],
        ctx: &BranchContext,
        payload: &[u8],
        coordinator: &str,
    ) -> TxResult<(Vote, bool)> {
        let hosted = self.hosted(&ctx.resource).expect("checked before queuing");
        let key = branch_key(&ctx.txn, ctx.branch);
        let log = &views[0];
        match barrier::decide(read_record(log, &key)?.as_ref(), Call::Prepare) {
            Action::RunPrepare => {
                let service = Self::service_trees(hosted, views);
                match resource_result(hosted.resource.prepare(ctx, payload, &service))? {
                    Vote::Yes => {
                        let record = BranchRecord::Prepared {
                            resource: ctx.resource.clone(),
                            payload: payload.to_vec(),
                            coordinator: coordinator.to_string(),
                            prepared_ms: unix_now_ms(),
                        };
                        write_record(log, &key, &record)?;
                        Ok((Vote::Yes, true))
                    }
                    Vote::No { reason } => Err(ConflictableTransactionError::Abort(
                        Abandon::VotedNo(reason),
                    )),
                }
            }
            Action::AnswerVote { yes: true, .. } => Ok((Vote::Yes, false)),
            Action::AnswerVote { yes: false, reason } => Ok((Vote::No { reason }, false)),
            other @ (Action::RunCommit { .. }
            | Action::RunAbort { .. }
            | Action::RecordNullAbort
            | Action::AnswerDone
            | Action::Refuse { .. }) => {
                unreachable!("barrier answered {other:?} to a prepare")
            }
        }
    }

    /// Applies a decision to a branch; durable before it returns (an abort too: a lost null
    /// abort could let a late prepare hold a reservation that nobody would release).
    /// Idempotent.
    pub async fn decide(
        &self,
        txn: &TxnId,
        branch: BranchIdx,
        resource: &str,
        commit: bool,
    ) -> Result<(), Error> {
        self.hosted(resource)?;
        let this = self.clone();
        let ctx = BranchContext {
            txn: txn.clone(),
            branch,
            resource: resource.to_string(),
        };
        let applied = self
            .inner
            .batcher
            .run(Box::new(move |views, prior| {
                debug_assert!(prior.is_none(), "a decision never votes");
                this.decide_in(views, &ctx, commit)
            }))
            .await?;
        if applied && commit {
            crash_point("participant.after_commit_applied");
        }
        tracing::debug!(txn = %txn, %branch, commit, applied, "decision applied");
        Ok(())
    }

    /// The decision, inside a batch's transaction: whether it changed anything (false for a
    /// repeat).
    fn decide_in(
        &self,
        views: &[TransactionalTree],
        ctx: &BranchContext,
        commit: bool,
    ) -> TxResult<bool> {
        let (txn, branch, resource) = (&ctx.txn, ctx.branch, ctx.resource.as_str());
        let hosted = self.hosted(resource).expect("checked before queuing");
        let key = branch_key(txn, branch);
        let call = if commit { Call::Commit } else { Call::Abort };
        let log = &views[0];
        let recorded = read_record(log, &key)?;
        if let Some(BranchRecord::Prepared {
            resource: prepared_for,
            ..
        }) = &recorded
        {
            if prepared_for != resource {
                return Err(ConflictableTransactionError::Abort(Abandon::Refused(format!(
                    "branch {txn} {branch} was prepared for resource {prepared_for:?}, not {resource:?}"
                ))));
            }
        }
        let service = Self::service_trees(hosted, views);
        match barrier::decide(recorded.as_ref(), call) {
            Action::RunCommit { payload } => {
                resource_result(hosted.resource.commit(ctx, &payload, &service))?;
                let record = BranchRecord::Committed {
                    resource: resource.to_string(),
                    committed_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(true)
            }
            Action::RunAbort { payload } => {
                resource_result(hosted.resource.abort(ctx, &payload, &service))?;
                let record = BranchRecord::Aborted {
                    was_prepared: true,
                    aborted_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(true)
            }
            Action::RecordNullAbort => {
                let record = BranchRecord::Aborted {
                    was_prepared: false,
                    aborted_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(true)
            }
            Action::AnswerDone => Ok(false),
            Action::Refuse { why } => Err(ConflictableTransactionError::Abort(Abandon::Refused(
                format!("branch {txn} {branch}: {why}"),
            ))),
            other @ (Action::RunPrepare | Action::AnswerVote { .. }) => {
                unreachable!("barrier answered {other:?} to a decision")
            }
        }
    }

    /// The branch's record in the log, if any.
    pub fn branch_record(
        &self,
        txn: &TxnId,
        branch: BranchIdx,
    ) -> Result<Option<BranchRecord>, Error> {
        match self.inner.branches.get(branch_key(txn, branch))? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Every branch currently prepared (in doubt until its decision arrives).
    pub fn prepared_branches(&self) -> Result<Vec<PreparedBranch>, Error> {
        let mut prepared = Vec::new();
        for entry in self.inner.branches.iter() {
            let (key, value) = entry?;
            if let BranchRecord::Prepared {
                resource,
                coordinator,
                prepared_ms,
                ..
            } = codec::decode(&value)?
            {
                let (txn, branch) = parse_branch_key(&key)
                    .unwrap_or_else(|| panic!("malformed key {key:?} in the branch log"));
                prepared.push(PreparedBranch {
                    ctx: BranchContext {
                        txn,
                        branch,
                        resource,
                    },
                    coordinator,
                    prepared_ms,
                });
            }
        }
        Ok(prepared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_keys_round_trip() {
        let txn = TxnId::parse("1763850000000-abc").unwrap();
        let key = branch_key(&txn, BranchIdx(258));
        assert_eq!(parse_branch_key(&key), Some((txn, BranchIdx(258))));
        assert_eq!(parse_branch_key(b"short"), None);
    }

    /// A key-value resource whose payload says how prepare behaves: `key=value` writes a
    /// pending entry and votes YES (commit then writes `key`), `no:key` writes a pending entry
    /// and votes NO (so the write must be discarded), `panic` panics.
    struct Kv;

    const KV_TREE: &str = "kv";

    impl TwoPhaseResource for Kv {
        fn trees(&self) -> Vec<String> {
            vec![KV_TREE.to_string()]
        }

        fn prepare(
            &self,
            ctx: &BranchContext,
            payload: &[u8],
            trees: &ServiceTrees<'_>,
        ) -> Result<Vote, ResourceError> {
            let payload = std::str::from_utf8(payload).unwrap();
            let kv = trees.tree(KV_TREE);
            if payload == "panic" {
                panic!("the resource panicked on purpose");
            }
            kv.insert(
                format!("pending/{}", ctx.txn).as_bytes(),
                payload.as_bytes(),
            )?;
            match payload.strip_prefix("no:") {
                Some(key) => Ok(Vote::No {
                    reason: format!("{key} refused"),
                }),
                None => Ok(Vote::Yes),
            }
        }

        fn commit(
            &self,
            ctx: &BranchContext,
            payload: &[u8],
            trees: &ServiceTrees<'_>,
        ) -> Result<(), ResourceError> {
            let payload = std::str::from_utf8(payload).unwrap();
            let (key, value) = payload.split_once('=').unwrap();
            let kv = trees.tree(KV_TREE);
            kv.remove(format!("pending/{}", ctx.txn).as_bytes())?;
            kv.insert(key.as_bytes(), value.as_bytes())?;
            Ok(())
        }

        fn abort(
            &self,
            ctx: &BranchContext,
            _payload: &[u8],
            trees: &ServiceTrees<'_>,
        ) -> Result<(), ResourceError> {
            trees
                .tree(KV_TREE)
                .remove(format!("pending/{}", ctx.txn).as_bytes())?;
            Ok(())
        }
    }

    fn ctx(n: u32) -> BranchContext {
        BranchContext {
            txn: TxnId::parse(&format!("1763850000000-t{n}")).unwrap(),
            branch: BranchIdx(0),
            resource: String::new(),
        }
    }

    fn kv_keys(participant: &Participant) -> Vec<String> {
        let tree = participant.db().open_tree(KV_TREE).unwrap();
        tree.iter()
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect()
    }

    /// Holds the flusher thread until the returned sender is dropped, so that every call made
    /// meanwhile queues for one batch.
    fn hold_flusher(participant: &Participant) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        participant
            .inner
            .flusher
            .submit(move || {
                let _ = held.recv();
                Box::new(|_| ())
            })
            .unwrap();
        release
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_keeps_yes_votes_and_discards_the_writes_of_no_votes_and_panics() {
        let dir = tempfile::tempdir().unwrap();
        let participant = Participant::builder(dir.path())
            .resource("", Kv)
            .open()
            .unwrap();
        let release = hold_flusher(&participant);
        let payloads = ["a=1", "no:b", "panic", "c=3"];
        let calls: Vec<_> = payloads
            .iter()
            .enumerate()
            .map(|(n, payload)| {
                let participant = participant.clone();
                let payload = payload.to_string();
                tokio::spawn(async move {
                    participant
                        .prepare(&ctx(n as u32), payload.as_bytes(), "http://127.0.0.1:1")
                        .await
                })
            })
            .collect();
        // Let every call queue before the flusher is free.
        while participant.inner.batcher_queued() < payloads.len() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(release);
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        assert_eq!(answers[0].as_ref().unwrap(), &Vote::Yes, "{answers:?}");
        assert_eq!(
            answers[1].as_ref().unwrap(),
            &Vote::No {
                reason: "b refused".into()
            },
            "{answers:?}"
        );
        assert!(
            matches!(&answers[2], Err(Error::Resource(m)) if m.contains("panicked on purpose")),
            "{answers:?}"
        );
        assert_eq!(answers[3].as_ref().unwrap(), &Vote::Yes, "{answers:?}");
        let stats = participant.inner.flusher.stats();
        assert_eq!(
            stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one flush covers the held job and the whole batch"
        );

        // A repeat answers from the record; a commit of the NO branch is refused while the
        // commit of a YES branch in the same batch applies.
        let release = hold_flusher(&participant);
        let (p1, p2, p3) = (
            participant.clone(),
            participant.clone(),
            participant.clone(),
        );
        let refused =
            tokio::spawn(async move { p1.decide(&ctx(1).txn, BranchIdx(0), "", true).await });
        let committed =
            tokio::spawn(async move { p2.decide(&ctx(0).txn, BranchIdx(0), "", true).await });
        let repeat =
            tokio::spawn(async move { p3.prepare(&ctx(1), b"no:b", "http://127.0.0.1:1").await });
        while participant.inner.batcher_queued() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(release);
        assert!(matches!(refused.await.unwrap(), Err(Error::Conflict(_))));
        committed.await.unwrap().unwrap();
        assert_eq!(
            repeat.await.unwrap().unwrap(),
            Vote::No {
                reason: "b refused".into()
            }
        );

        // What was answered is what a reopened participant finds.
        drop(participant);
        let participant = Participant::builder(dir.path())
            .resource("", Kv)
            .open()
            .unwrap();
        assert_eq!(
            kv_keys(&participant),
            vec!["a".to_string(), format!("pending/{}", ctx(3).txn)],
            "t0 committed, t1 (NO) and t2 (panic) left nothing, t3 holds its pending entry"
        );
        assert!(matches!(
            participant
                .branch_record(&ctx(1).txn, BranchIdx(0))
                .unwrap(),
            Some(BranchRecord::VotedNo { .. })
        ));
        assert_eq!(
            participant
                .branch_record(&ctx(2).txn, BranchIdx(0))
                .unwrap(),
            None
        );
        assert!(matches!(
            participant
                .branch_record(&ctx(3).txn, BranchIdx(0))
                .unwrap(),
            Some(BranchRecord::Prepared { .. })
        ));
    }
}
