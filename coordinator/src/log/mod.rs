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
//!   operators. `append_history` is lazy like `put` (a crash may lose the latest entries, never
//!   reorder them); `history` returns the entries oldest first, at most
//!   [`record::HISTORY_ENTRIES_MAX`] (the first [`record::HISTORY_HEAD_KEPT`] and the latest).
//!   The protocol never reads it; a log written before histories existed has none.
//!
//! Implementations: [`sled_log::SledLog`] (the embedded default: sled plus the group-commit
//! flusher that fdatasyncs) and [`mem_log::MemLog`] (in memory, with a `crash` that drops what
//! was not flushed, for tests and simulation).

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
    /// Visible at once; durable after a later flush.
    fn append_history(&self, id: &TxnId, entry: &HistoryEntry) -> Result<(), LogError>;
    /// The history of `id`, oldest first (empty if none was recorded).
    fn history(&self, id: &TxnId) -> Result<History, LogError>;
    /// How many bytes the log occupies on disk (0 where that means nothing).
    fn size_on_disk(&self) -> u64;
}
