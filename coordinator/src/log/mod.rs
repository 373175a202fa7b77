//! The coordinator's durable transaction log: a storage trait and its implementations.
//!
//! Contract of [`TxnLog`] (every implementation passes the shared suite in `conformance`):
//! - `put` replaces the transaction's record and is visible to `get` and `scan` as soon as it
//!   returns; it is **not** durable yet.
//! - Writes are ordered: a `flush` makes durable every `put` that returned before it was
//!   called. After a crash, the log holds, for each transaction, either its latest flushed
//!   record or a later one (never an older one than the last flushed).
//! - `flush` shares work between concurrent callers (group commit); it never costs one device
//!   sync per caller under load.
//! - `scan` returns every record in transaction-id order (deterministic recovery).
//! - Sagas are kept apart from 2PC records, as two records per saga: the spec (written once,
//!   forced by the runtime before the saga is acknowledged) and the progress (replaced at
//!   every change, never forced). The same visibility and ordering rules apply to both;
//!   `scan_sagas` returns every saga with a spec, in id order, with its latest progress.
//! - Each transaction and saga also has a *history*: its state changes with their times, for
//!   operators. `append_history` is lazier than `put`: the sled log queues the entry for a
//!   thread of its own (`history_writer.rs`), so it is durable only after that thread wrote it
//!   and a flush followed (a crash may lose the latest entries, never reorder them; stopping
//!   the daemon writes them all). `history` returns the entries oldest first, at most
//!   [`record::HISTORY_ENTRIES_MAX`] (the first [`record::HISTORY_HEAD_KEPT`] and the latest).
//!   The protocol never reads it; a log written before histories existed has none.
//! - `prune_txns` and `prune_sagas` remove terminal records that are old by both measures of a
//!   [`PruneCutoff`], and nothing else: never a record that is not terminal (2PC: `Finished`
//!   or `PresumedAborted`; a saga: terminal with its callback delivered), never a young one.
//!   A removal is visible at once and durable after a later flush, like a `put`; a crash may
//!   bring a removed record back (it is then removed again), never take a kept one away. A
//!   saga's spec and progress go together (a spec left without its progress would look like
//!   a saga never started, and recovery would run it again). Each call examines at most
//!   `scan_max` records, so a caller bounds the work of one pass (see
//!   `crate::runtime::retention` for why removing these records is safe).
//!
//! Implementations: [`sled_log::SledLog`] (the embedded default: sled plus the group-commit
//! flusher that fdatasyncs) and [`mem_log::MemLog`] (in memory, with a `crash` that drops what
//! was not flushed, for tests and simulation).

mod history_writer;
pub mod mem_log;
pub mod record;
pub mod sled_log;

#[cfg(test)]
mod conformance;

use std::future::Future;
use std::pin::Pin;

use tandem_common::TxnId;

use record::{History, HistoryEntry, SagaSpecRecord, StoredSaga, TxnRecord};

use crate::engine::saga::SagaProgress;

/// A failure of the log's storage. Any of these means the coordinator can no longer prove
/// what it wrote; the runtime stops rather than guess.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("stored record of {txn} cannot be read: {source}")]
    Corrupt {
        txn: String,
        source: tandem_common::CodecError,
    },
    #[error(transparent)]
    Flush(#[from] tandem_common::FlushError),
}

/// Which terminal records a prune pass may remove: those old by both measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneCutoff {
    /// The record's terminal time is before this (ms since the Unix epoch). 2PC: the
    /// `Finished` record's `finished_ms` or the `PresumedAborted` record's `presumed_ms`; a
    /// saga: the latest time its log knows of (acceptance, or the first send of a step).
    pub terminal_before_ms: u64,
    /// The id was created before this (ms since the Unix epoch). Ids this old are refused,
    /// so forgetting one can never let it name a new transaction or saga.
    pub id_created_before_ms: u64,
}

/// What one bounded prune pass did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrunePass {
    /// Records examined (at most the pass's `scan_max`).
    pub scanned: usize,
    /// Transactions (or sagas) removed.
    pub removed: usize,
    /// The last id examined, if the pass stopped at `scan_max` with more candidates left:
    /// the next pass starts after it. `None`: every candidate was examined.
    pub resume_after: Option<TxnId>,
}

/// The first key not covered by `id_created_before_ms`: ids are `<13-digit ms>-<suffix>`, so
/// in key order every id created before `ms` sorts before this prefix, and no other does.
pub(crate) fn id_key_bound(ms: u64) -> String {
    format!("{ms:013}")
}

/// A pending flush: resolves once everything put before it was created is durable.
pub type FlushFuture = Pin<Box<dyn Future<Output = Result<(), LogError>> + Send>>;

/// The coordinator's log of transactions (see the module documentation for the contract).
pub trait TxnLog: Send + Sync + 'static {
    /// Writes (replaces) the record of `txn`. Visible at once; durable after a later flush.
    fn put(&self, txn: &TxnId, record: &TxnRecord) -> Result<(), LogError>;
    /// Makes every `put` that returned before this call durable.
    fn flush(&self) -> FlushFuture;
    /// The record of `txn`, if any.
    fn get(&self, txn: &TxnId) -> Result<Option<TxnRecord>, LogError>;
    /// Every record, in transaction-id order.
    fn scan(&self) -> Result<Vec<(TxnId, TxnRecord)>, LogError>;
    /// Writes the spec record of an accepted saga. Visible at once; durable after a flush.
    fn put_saga_spec(&self, saga: &TxnId, record: &SagaSpecRecord) -> Result<(), LogError>;
    /// Writes (replaces) a saga's progress. Visible at once; durable after a later flush.
    fn put_saga_progress(&self, saga: &TxnId, progress: &SagaProgress) -> Result<(), LogError>;
    /// The saga `saga`, if its spec was written.
    fn get_saga(&self, saga: &TxnId) -> Result<Option<StoredSaga>, LogError>;
    /// Every saga, in id order.
    fn scan_sagas(&self) -> Result<Vec<(TxnId, StoredSaga)>, LogError>;
    /// Appends a state change to the history of `id` (a transaction or a saga), dropping the
    /// oldest entry after the first `HISTORY_HEAD_KEPT` when `HISTORY_ENTRIES_MAX` are kept.
    /// Visible to `history` at once; durable some time later (see the module documentation).
    fn append_history(&self, id: &TxnId, entry: &HistoryEntry) -> Result<(), LogError>;
    /// The history of `id`, oldest first (empty if none was recorded).
    fn history(&self, id: &TxnId) -> Result<History, LogError>;
    /// How many bytes the log occupies on disk (0 where that means nothing).
    fn size_on_disk(&self) -> u64;
    /// Removes terminal 2PC records older than `cutoff`, examining at most `scan_max` records
    /// in id order, starting after `after` (see the module documentation).
    fn prune_txns(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError>;
    /// Removes finished sagas (spec and progress together) older than `cutoff`, examining at
    /// most `scan_max` sagas in id order, starting after `after`.
    fn prune_sagas(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError>;
}
