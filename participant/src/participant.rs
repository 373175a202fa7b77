//! The participant: a sled database holding the service's trees and the branch log, and the
//! three calls (prepare, commit, abort) applied through the barrier.
//!
//! Each call is one sled transaction over the branch log and the resource's trees: the
//! barrier reads the branch's record, the resource's code runs (if the barrier says so), and
//! the new record is written, all or nothing. The transaction runs as a job of the
//! group-commit flusher (`tandem_common::group_commit`), whose answer is released only after
//! the flush that covers it, so no answer (a YES vote above all) ever reports a state that a
//! crash could undo. That includes repeated calls: a repeat may read a record that an earlier
//! call wrote but had not yet flushed. Running every transaction on that one thread also means
//! they never contend with each other or with a flush for sled's global transaction lock.
//!
//! Crash points: `participant.after_prepare_persisted` (a YES is durable, not yet sent) and
//! `participant.after_commit_applied` (a commit is durable, not yet acknowledged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tandem_common::crash::crash_point;
use tandem_common::{
    codec, group_commit, unix_now_ms, BranchIdx, GroupCommit, TxnId, RECORD_BYTES_MAX,
};

use crate::barrier::{self, Action, BranchRecord, Call};
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
    /// The resource's tree names, in the order of `trees[1..]`.
    tree_names: Vec<String>,
    /// The branch log first, then the resource's trees: one sled transaction spans them all.
    trees: Vec<sled::Tree>,
}

struct Inner {
    db: sled::Db,
    branches: sled::Tree,
    resources: BTreeMap<String, Hosted>,
    flusher: GroupCommit,
    config: ParticipantConfig,
    dir: PathBuf,
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
        for (name, resource) in self.resources {
            let tree_names = resource.trees();
            let mut trees = vec![branches.clone()];
            for tree in &tree_names {
                if tree.starts_with("tandem.") {
                    return Err(Error::InvalidArgument(format!(
                        "resource {name:?} declares tree {tree:?}; names starting with \"tandem.\" are reserved"
                    )));
                }
                trees.push(db.open_tree(tree)?);
            }
            if resources
                .insert(
                    name.clone(),
                    Hosted {
                        resource,
                        tree_names,
                        trees,
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
        Ok(Participant {
            inner: Arc::new(Inner {
                db,
                branches,
                resources,
                flusher,
                config: self.config,
                dir: self.dir,
            }),
        })
    }
}

/// Why a sled transaction was abandoned (its writes discarded).
enum Abandon {
    VotedNo(String),
    Refused(String),
    Failed(String),
    Corrupt(tandem_common::CodecError),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Abandon>>;

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

fn resource_result<T>(r: Result<T, ResourceError>) -> TxResult<T> {
    r.map_err(|e| match e {
        ResourceError::Storage(e) => e.into(),
        ResourceError::Failed(m) => ConflictableTransactionError::Abort(Abandon::Failed(m)),
    })
}

fn abandon_to_error(e: TransactionError<Abandon>) -> Error {
    match e {
        TransactionError::Abort(Abandon::Refused(why)) => Error::Conflict(why),
        TransactionError::Abort(Abandon::Failed(m)) => Error::Resource(m),
        TransactionError::Abort(Abandon::Corrupt(e)) => Error::Codec(e),
        TransactionError::Abort(Abandon::VotedNo(reason)) => {
            unreachable!("a NO vote is handled by prepare itself: {reason}")
        }
        TransactionError::Storage(e) => Error::Storage(e.to_string()),
    }
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
            .flusher
            .run(move || this.prepare_now(&job_ctx, &payload, &coordinator))
            .await??;
        if first_time && vote == Vote::Yes {
            crash_point("participant.after_prepare_persisted");
        }
        tracing::debug!(txn = %ctx.txn, branch = %ctx.branch, ?vote, "prepare answered");
        Ok(vote)
    }

    /// The prepare transaction (on the flusher thread): the vote, and whether this call
    /// recorded it (false for a repeat).
    fn prepare_now(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        coordinator: &str,
    ) -> Result<(Vote, bool), Error> {
        let hosted = self.hosted(&ctx.resource)?;
        let key = branch_key(&ctx.txn, ctx.branch);
        let attempt = hosted.trees[..].transaction(|views| {
            let log = &views[0];
            match barrier::decide(read_record(log, &key)?.as_ref(), Call::Prepare) {
                Action::RunPrepare => {
                    let service = ServiceTrees {
                        names: &hosted.tree_names,
                        trees: &views[1..],
                    };
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
                        // Abandon the transaction so the service's writes are discarded.
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
        });
        match attempt {
            Ok(answer) => Ok(answer),
            Err(TransactionError::Abort(Abandon::VotedNo(reason))) => {
                Ok((self.record_no_vote_now(&key, reason)?, true))
            }
            Err(e) => Err(abandon_to_error(e)),
        }
    }

    /// Records a NO vote (the resource's writes were discarded), unless something was
    /// recorded first, in which case that record decides the answer.
    fn record_no_vote_now(&self, key: &[u8], reason: String) -> Result<Vote, Error> {
        self.inner
            .branches
            .transaction(|log| match read_record(log, key)? {
                None => {
                    write_record(log, key, &BranchRecord::VotedNo { reason: reason.clone() })?;
                    Ok(Vote::No { reason: reason.clone() })
                }
                Some(existing) => match barrier::decide(Some(&existing), Call::Prepare) {
                    Action::AnswerVote { yes: true, .. } => Ok(Vote::Yes),
                    Action::AnswerVote { yes: false, reason } => Ok(Vote::No { reason }),
                    other => unreachable!("barrier answered {other:?} to a prepare"),
                },
            })
            .map_err(abandon_to_error)
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
            .flusher
            .run(move || this.decide_now(&ctx, commit))
            .await??;
        if applied && commit {
            crash_point("participant.after_commit_applied");
        }
        tracing::debug!(txn = %txn, %branch, commit, applied, "decision applied");
        Ok(())
    }

    /// The decision transaction (on the flusher thread): whether it changed anything (false
    /// for a repeat).
    fn decide_now(&self, ctx: &BranchContext, commit: bool) -> Result<bool, Error> {
        let (txn, branch, resource) = (&ctx.txn, ctx.branch, ctx.resource.as_str());
        let hosted = self.hosted(resource)?;
        let key = branch_key(txn, branch);
        let call = if commit { Call::Commit } else { Call::Abort };
        hosted.trees[..]
            .transaction(|views| {
                let log = &views[0];
                let recorded = read_record(log, &key)?;
                if let Some(BranchRecord::Prepared { resource: prepared_for, .. }) = &recorded {
                    if prepared_for != resource {
                        return Err(ConflictableTransactionError::Abort(Abandon::Refused(format!(
                            "branch {txn} {branch} was prepared for resource {prepared_for:?}, not {resource:?}"
                        ))));
                    }
                }
                let service = ServiceTrees {
                    names: &hosted.tree_names,
                    trees: &views[1..],
                };
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
                        let record = BranchRecord::Aborted { was_prepared: true, aborted_ms: unix_now_ms() };
                        write_record(log, &key, &record)?;
                        Ok(true)
                    }
                    Action::RecordNullAbort => {
                        let record = BranchRecord::Aborted { was_prepared: false, aborted_ms: unix_now_ms() };
                        write_record(log, &key, &record)?;
                        Ok(true)
                    }
                    Action::AnswerDone => Ok(false),
                    Action::Refuse { why } => Err(ConflictableTransactionError::Abort(
                        Abandon::Refused(format!("branch {txn} {branch}: {why}")),
                    )),
                    other @ (Action::RunPrepare | Action::AnswerVote { .. }) => {
                        unreachable!("barrier answered {other:?} to a decision")
                    }
                }
            })
            .map_err(abandon_to_error)
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
}
