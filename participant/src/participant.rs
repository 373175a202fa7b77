//! The participant: a sled database holding the service's trees and the SDK's logs, and the
//! calls applied through the barriers: prepare, commit and abort (two-phase commit, the
//! branch log and [`crate::barrier`]); act, compensate and saga-finished (sagas, the step log
//! and [`crate::saga_barrier`], the callback log; in `participant/saga_calls.rs`).
//!
//! Each call is applied in a sled transaction over the SDK's logs and the service's trees:
//! the barrier reads the call's record, the service's code runs (if the barrier says so),
//! and the new record is written, all or nothing. Calls are batched (`crate::batch`): every
//! call queued while the flusher is busy commits in one sled transaction on the group-commit
//! flusher's thread (`tandem_common::group_commit`), and the answers are released only after
//! the flush that covers the batch, so no answer (a YES vote above all) ever reports a state
//! that a crash could undo. That includes repeated calls: a repeat may read a record that an
//! earlier call wrote but had not yet flushed. Running every transaction on that one thread
//! also means they never contend with each other or with a flush for sled's global
//! transaction lock.
//!
//! Crash points: `participant.after_prepare_persisted` (a YES is durable, not yet sent),
//! `participant.after_commit_applied` (a commit is durable, not yet acknowledged) and
//! `participant.after_action_applied` (a saga action succeeded and is durable, not yet
//! answered).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tandem_common::crash::crash_point;
use tandem_common::{
    codec, group_commit, unix_now_ms, BranchIdx, GroupCommit, TxnId, RECORD_BYTES_MAX,
};

use crate::barrier::{self, Action, BranchRecord, Call};
use crate::batch::{Abandon, TxResult, TxnBatcher};
use crate::error::Error;
use crate::resource::{BranchContext, ResourceError, ServiceTrees, TwoPhaseResource, Vote};
use crate::saga::{CompensableResource, SagaCallbackHandler};

mod saga_calls;

pub use saga_calls::{CallbackDelivery, CallbackRecord};

/// The tree that holds the branch log (and so the 2PC barrier).
pub const BRANCHES_TREE: &str = "tandem.participant.branches";
/// The tree that holds the step log (and so the saga barrier).
pub const STEPS_TREE: &str = "tandem.participant.steps";
/// The tree that records which saga completion callbacks were delivered to their handler.
pub const SAGA_CALLBACKS_TREE: &str = "tandem.participant.saga_callbacks";

/// Where the SDK's own trees are among the views of a batch's transaction (it spans every
/// tree of the participant: these three first, then the service's trees).
pub(crate) const BRANCHES_VIEW: usize = 0;
pub(crate) const STEPS_VIEW: usize = 1;
pub(crate) const SAGA_CALLBACKS_VIEW: usize = 2;
/// The pruning horizon's tree ([`crate::prune::RETENTION_TREE`]).
pub(crate) const RETENTION_VIEW: usize = 3;
/// Prefix of the tree names the SDK reserves for itself.
const RESERVED_TREE_PREFIX: &str = "tandem.";

/// Tunables of a participant.
#[derive(Clone)]
pub struct ParticipantConfig {
    /// How often the in-doubt resolver looks for branches left prepared.
    pub in_doubt_check_interval_ms: u64,
    /// A branch prepared less than this long ago is left to the coordinator (which delivers
    /// decisions itself); older ones are asked about. At start-up every prepared branch is.
    pub in_doubt_age_ms_min: u64,
    /// Timeout of one outcome query to the coordinator.
    pub coordinator_query_timeout_ms: u64,
    /// How long decided branches, saga steps and handled callbacks are kept before the pruner
    /// removes them (`None`: kept forever). Must exceed the longest saga's lifetime; see
    /// [`crate::prune`]. Default: [`crate::prune::RETENTION_MS_DEFAULT`] (7 days).
    pub retention_ms: Option<u64>,
    /// TLS settings for outcome queries to an `https://` coordinator (the CA to trust and,
    /// under mutual TLS, this participant's client identity). `None`: such a coordinator
    /// cannot be asked, and the branch waits for the coordinator's redelivery.
    pub coordinator_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The client token sent with outcome queries, for a coordinator that requires tokens.
    pub coordinator_token: Option<tandem_common::credentials::Token>,
}

// By hand: tonic's `ClientTlsConfig` would print its identity's private key.
impl std::fmt::Debug for ParticipantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantConfig")
            .field(
                "in_doubt_check_interval_ms",
                &self.in_doubt_check_interval_ms,
            )
            .field("in_doubt_age_ms_min", &self.in_doubt_age_ms_min)
            .field(
                "coordinator_query_timeout_ms",
                &self.coordinator_query_timeout_ms,
            )
            .field("retention_ms", &self.retention_ms)
            .field("coordinator_tls", &self.coordinator_tls.is_some())
            .field("coordinator_token", &self.coordinator_token)
            .finish()
    }
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        ParticipantConfig {
            in_doubt_check_interval_ms: 1_000,
            in_doubt_age_ms_min: 5_000,
            coordinator_query_timeout_ms: 2_000,
            retention_ms: Some(crate::prune::RETENTION_MS_DEFAULT),
            coordinator_tls: None,
            coordinator_token: None,
        }
    }
}

/// A piece of service code the participant hosts (a two-phase resource, a saga step or a
/// saga callback handler), with the trees it declared.
struct Hosted<H: ?Sized> {
    handler: Arc<H>,
    /// The handler's tree names, as its `trees()` listed them.
    tree_names: Vec<String>,
    /// Where each of those trees is among the participant's trees (and so among the views of
    /// a batch's transaction, which spans them all; the SDK's logs come first).
    tree_indices: Vec<usize>,
}

impl<H: ?Sized> Hosted<H> {
    /// The handler's trees inside the batch transaction whose views are `views`.
    fn service_trees<'a>(&'a self, views: &'a [TransactionalTree]) -> ServiceTrees<'a> {
        ServiceTrees {
            names: &self.tree_names,
            indices: &self.tree_indices,
            views,
        }
    }
}

/// Every tree of the participant, each once, as the builder opens them.
struct TreeSet {
    names: Vec<String>,
    trees: Vec<sled::Tree>,
}

impl TreeSet {
    /// Hosts each `(name, handler)` of one kind, opening the trees it declares that are not
    /// open yet (handlers may share trees). `kind` names the kind in errors.
    fn host<H: ?Sized>(
        &mut self,
        db: &sled::Db,
        kind: &str,
        handlers: Vec<(String, Arc<H>)>,
        trees_of: impl Fn(&H) -> Vec<String>,
    ) -> Result<BTreeMap<String, Hosted<H>>, Error> {
        let mut hosted = BTreeMap::new();
        for (name, handler) in handlers {
            let tree_names = trees_of(&handler);
            let mut tree_indices = Vec::with_capacity(tree_names.len());
            for tree in &tree_names {
                if tree.starts_with(RESERVED_TREE_PREFIX) {
                    return Err(Error::InvalidArgument(format!(
                        "{kind} {name:?} declares tree {tree:?}; names starting with \"{RESERVED_TREE_PREFIX}\" are reserved"
                    )));
                }
                let index = match self.names.iter().position(|t| t == tree) {
                    Some(index) => index,
                    None => {
                        self.names.push(tree.clone());
                        self.trees.push(db.open_tree(tree)?);
                        self.trees.len() - 1
                    }
                };
                tree_indices.push(index);
            }
            let entry = Hosted {
                handler,
                tree_names,
                tree_indices,
            };
            if hosted.insert(name.clone(), entry).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{kind} {name:?} is registered twice"
                )));
            }
        }
        Ok(hosted)
    }
}

struct Inner {
    db: sled::Db,
    branches: sled::Tree,
    steps: sled::Tree,
    saga_callbacks: sled::Tree,
    retention: sled::Tree,
    resources: BTreeMap<String, Hosted<dyn TwoPhaseResource>>,
    saga_steps: BTreeMap<String, Hosted<dyn CompensableResource>>,
    saga_callback_handlers: BTreeMap<String, Hosted<dyn SagaCallbackHandler>>,
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

/// Builds a [`Participant`]: the resources, saga steps and saga callback handlers it hosts
/// are named before it opens. Names are unique within each kind (a resource and a saga step
/// may share a name); no handler may declare a tree whose name starts with `tandem.`.
pub struct ParticipantBuilder {
    dir: PathBuf,
    resources: Vec<(String, Arc<dyn TwoPhaseResource>)>,
    saga_steps: Vec<(String, Arc<dyn CompensableResource>)>,
    saga_callbacks: Vec<(String, Arc<dyn SagaCallbackHandler>)>,
    config: ParticipantConfig,
}

impl ParticipantBuilder {
    /// Hosts `resource` under `name` (the `resource` field of a branch; "" is the default).
    pub fn resource(mut self, name: impl Into<String>, resource: impl TwoPhaseResource) -> Self {
        self.resources.push((name.into(), Arc::new(resource)));
        self
    }

    /// Hosts the saga step `step` under `name` (the `resource` field of a saga step; "" is
    /// the default).
    pub fn saga_step(mut self, name: impl Into<String>, step: impl CompensableResource) -> Self {
        self.saga_steps.push((name.into(), Arc::new(step)));
        self
    }

    /// Hosts the saga completion-callback handler `handler` under `name` (the `resource` of a
    /// saga's callback; "" is the default).
    pub fn saga_callback(
        mut self,
        name: impl Into<String>,
        handler: impl SagaCallbackHandler,
    ) -> Self {
        self.saga_callbacks.push((name.into(), Arc::new(handler)));
        self
    }

    pub fn config(mut self, config: ParticipantConfig) -> Self {
        self.config = config;
        self
    }

    /// How long finished records are kept before they are pruned (`None`: forever); sets
    /// [`ParticipantConfig::retention_ms`].
    pub fn retention(mut self, retention: Option<std::time::Duration>) -> Self {
        self.config.retention_ms =
            retention.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Opens (or creates) the sled database and starts its flusher.
    pub fn open(self) -> Result<Participant, Error> {
        let db = group_commit::open_db(&self.dir)?;
        let branches = db.open_tree(BRANCHES_TREE)?;
        let steps = db.open_tree(STEPS_TREE)?;
        let saga_callbacks = db.open_tree(SAGA_CALLBACKS_TREE)?;
        let retention = db.open_tree(crate::prune::RETENTION_TREE)?;
        // Every tree of the participant, each once (handlers may share one); the SDK's logs
        // first, at their `*_VIEW` positions.
        let mut all = TreeSet {
            names: vec![
                BRANCHES_TREE.to_string(),
                STEPS_TREE.to_string(),
                SAGA_CALLBACKS_TREE.to_string(),
                crate::prune::RETENTION_TREE.to_string(),
            ],
            trees: vec![
                branches.clone(),
                steps.clone(),
                saga_callbacks.clone(),
                retention.clone(),
            ],
        };
        debug_assert_eq!(all.names[BRANCHES_VIEW], BRANCHES_TREE);
        debug_assert_eq!(all.names[STEPS_VIEW], STEPS_TREE);
        debug_assert_eq!(all.names[SAGA_CALLBACKS_VIEW], SAGA_CALLBACKS_TREE);
        debug_assert_eq!(all.names[RETENTION_VIEW], crate::prune::RETENTION_TREE);
        let resources = all.host(&db, "resource", self.resources, |r| r.trees())?;
        let saga_steps = all.host(&db, "saga step", self.saga_steps, |s| s.trees())?;
        let saga_callback_handlers =
            all.host(&db, "saga callback", self.saga_callbacks, |c| c.trees())?;
        let flusher = GroupCommit::start(db.clone(), &self.dir)
            .map_err(|e| Error::Storage(format!("{}: {e}", self.dir.display())))?;
        let batcher = TxnBatcher::new(all.trees, flusher.clone());
        Ok(Participant {
            inner: Arc::new(Inner {
                db,
                branches,
                steps,
                saga_callbacks,
                retention,
                resources,
                saga_steps,
                saga_callback_handlers,
                flusher,
                batcher,
                config: self.config,
                dir: self.dir,
            }),
        })
    }
}

/// The key of a record about position `index` of transaction (or saga) `txn`: the id, a NUL
/// (which no id contains) and the index, big-endian (so one id's records sort together).
fn indexed_key(txn: &TxnId, index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(txn.as_str().len() + 5);
    key.extend_from_slice(txn.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn branch_key(txn: &TxnId, branch: BranchIdx) -> Vec<u8> {
    indexed_key(txn, branch.0)
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

pub(crate) fn read_record<R: DeserializeOwned>(
    log: &TransactionalTree,
    key: &[u8],
) -> TxResult<Option<R>> {
    match log.get(key)? {
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|e| ConflictableTransactionError::Abort(Abandon::Corrupt(e))),
        None => Ok(None),
    }
}

fn write_record<R: Serialize + std::fmt::Debug>(
    log: &TransactionalTree,
    key: &[u8],
    record: &R,
) -> TxResult<()> {
    let bytes = codec::encode(record)
        .map_err(|e| ConflictableTransactionError::Abort(Abandon::Corrupt(e)))?;
    assert!(
        bytes.len() <= RECORD_BYTES_MAX,
        "record of {} bytes exceeds RECORD_BYTES_MAX: {record:?}",
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
    /// Keeps the calls queued from now on out of the next transaction batch until the hold is
    /// dropped, so that they land in one batch together (the items of a step batch).
    pub(crate) fn hold_batch(&self) -> crate::batch::BatchHold {
        self.inner.batcher.hold()
    }

    /// Starts building a participant whose data lives in folder `dir`.
    pub fn builder(dir: impl AsRef<Path>) -> ParticipantBuilder {
        ParticipantBuilder {
            dir: dir.as_ref().to_path_buf(),
            resources: Vec::new(),
            saga_steps: Vec::new(),
            saga_callbacks: Vec::new(),
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

    /// One of the SDK's own trees, by its view index (`BRANCHES_VIEW`, ...).
    pub(crate) fn log_tree(&self, view: usize) -> &sled::Tree {
        match view {
            BRANCHES_VIEW => &self.inner.branches,
            STEPS_VIEW => &self.inner.steps,
            SAGA_CALLBACKS_VIEW => &self.inner.saga_callbacks,
            RETENTION_VIEW => &self.inner.retention,
            other => unreachable!("view {other} is not one of the SDK's trees"),
        }
    }

    /// Runs `body` in the next batch, like every call (pruning uses it).
    pub(crate) async fn run_in_batch<T: Send + 'static>(
        &self,
        body: crate::batch::Body<T>,
    ) -> Result<T, Error> {
        self.inner.batcher.run(body).await
    }

    /// Waits until everything written so far is durable.
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.inner.flusher.flush().await?)
    }

    fn hosted(&self, resource: &str) -> Result<&Hosted<dyn TwoPhaseResource>, Error> {
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
                Some(Abandon::Declined(reason)) => Ok((
                    record_no_vote_in(&views[BRANCHES_VIEW], &job_ctx, reason)?,
                    true,
                )),
                Some(other) => unreachable!("prepare re-run after {other:?}"),
            }))
            .await?;
        if first_time && vote == Vote::Yes {
            crash_point("participant.after_prepare_persisted");
        }
        tracing::debug!(txn = %ctx.txn, branch = %ctx.branch, ?vote, "prepare answered");
        Ok(vote)
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
        let log = &views[BRANCHES_VIEW];
        let recorded = read_record(log, &key)?;
        if let Some(BranchRecord::Prepared {
            resource,
            payload: prepared,
            ..
        }) = &recorded
        {
            // A repeat must be the same request. Another one under this id and branch (a
            // client retrying an id whose first attempt the coordinator lost) must not be
            // answered YES on the strength of what was prepared for the first: vote NO, and
            // the coordinator's abort then releases the old preparation too.
            if resource != &ctx.resource || prepared.as_slice() != payload {
                let reason = format!(
                    "branch {} {} was already prepared with another {}",
                    ctx.txn,
                    ctx.branch,
                    if resource != &ctx.resource {
                        "resource"
                    } else {
                        "payload"
                    }
                );
                return Ok((Vote::No { reason }, false));
            }
        }
        if recorded.is_none() && crate::prune::forgotten(views, &ctx.txn)? {
            let reason = format!(
                "branch {} {} is older than this participant's retention; its records may have been pruned",
                ctx.txn, ctx.branch
            );
            return Ok((Vote::No { reason }, false));
        }
        match barrier::decide(recorded.as_ref(), Call::Prepare) {
            Action::RunPrepare => {
                let service = hosted.service_trees(views);
                match resource_result(hosted.handler.prepare(ctx, payload, &service))? {
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
                        Abandon::Declined(reason),
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
        let log = &views[BRANCHES_VIEW];
        let recorded: Option<BranchRecord> = read_record(log, &key)?;
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
        if recorded.is_none() && crate::prune::forgotten(views, txn)? {
            // A pruned branch was decided here (a prepared one is never pruned): a commit is
            // a redelivery; an abort has nothing to hold back (a late prepare votes NO).
            return Ok(false);
        }
        let service = hosted.service_trees(views);
        match barrier::decide(recorded.as_ref(), call) {
            Action::RunCommit { payload } => {
                resource_result(hosted.handler.commit(ctx, &payload, &service))?;
                let record = BranchRecord::Committed {
                    resource: resource.to_string(),
                    committed_ms: unix_now_ms(),
                };
                write_record(log, &key, &record)?;
                Ok(true)
            }
            Action::RunAbort { payload } => {
                resource_result(hosted.handler.abort(ctx, &payload, &service))?;
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

/// Holds the flusher thread until the returned sender is dropped, so that every call made
/// meanwhile queues for one batch.
#[cfg(test)]
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
    pub(super) struct Kv;

    pub(super) const KV_TREE: &str = "kv";

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

    pub(super) fn ctx(n: u32) -> BranchContext {
        BranchContext {
            txn: TxnId::parse(&format!("1763850000000-t{n}")).unwrap(),
            branch: BranchIdx(0),
            resource: String::new(),
        }
    }

    pub(super) fn kv_keys(participant: &Participant) -> Vec<String> {
        let tree = participant.db().open_tree(KV_TREE).unwrap();
        tree.iter()
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_prepare_with_another_payload_votes_no_and_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let participant = Participant::builder(dir.path())
            .resource("", Kv)
            .open()
            .unwrap();
        let coordinator = "http://127.0.0.1:1";
        let vote = participant
            .prepare(&ctx(7), b"a=1", coordinator)
            .await
            .unwrap();
        assert_eq!(vote, Vote::Yes);
        assert_eq!(
            participant
                .prepare(&ctx(7), b"a=1", coordinator)
                .await
                .unwrap(),
            Vote::Yes,
            "the same request repeated gets the recorded vote"
        );
        match participant
            .prepare(&ctx(7), b"a=2", coordinator)
            .await
            .unwrap()
        {
            Vote::No { reason } => assert!(reason.contains("another payload"), "{reason}"),
            Vote::Yes => panic!("a different payload was answered from the first one's YES"),
        }
        match participant
            .branch_record(&ctx(7).txn, BranchIdx(0))
            .unwrap()
        {
            Some(BranchRecord::Prepared { payload, .. }) => assert_eq!(payload, b"a=1"),
            other => panic!("the first preparation must stay as it was: {other:?}"),
        }
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
