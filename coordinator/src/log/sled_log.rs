//! The embedded default log: one sled tree keyed by transaction id, made durable by the
//! group-commit flusher (`sled::Db::flush` followed by `fdatasync` of the data file).
//!
//! Pruning reads the candidates (a key range: ids sort by creation time) and removes each
//! 2PC record with a compare-and-swap against the value it judged, so a record rewritten
//! meanwhile is never removed; a saga's spec and progress are removed in one sled
//! transaction, so no crash can leave a spec without its progress.

use std::ops::Bound;
use std::path::Path;

use sled::Transactional;

use tandem_common::{codec, group_commit, GroupCommit, TxnId, RECORD_BYTES_MAX};

use super::history_writer::{entries_prefix, record_entries, truncated_key, HistoryWriter};
use super::record::{History, HistoryEntry, HistoryKind, SagaSpecRecord, StoredSaga, TxnRecord};
use super::{id_key_bound, FlushFuture, LogError, PruneCutoff, PrunePass, TxnLog};
use crate::engine::saga::{ChangeKind, SagaProgress};

/// The tree holding one record per transaction.
const TXNS_TREE: &str = "tandem.coordinator.txns";
/// The trees holding each saga's spec and progress, keyed by saga id.
const SAGA_SPECS_TREE: &str = "tandem.coordinator.saga_specs";
const SAGA_PROGRESS_TREE: &str = "tandem.coordinator.saga_progress";
/// The tree holding histories: key `<id> 0x00 <u32 big-endian>` per entry (numbered from 0
/// per history; a chunk of the first entries is keyed by its last one), and `<id> 0x01`
/// marking a history that dropped entries. Ids never hold bytes
/// below `-`, so one id's keys never mix with another's. Written by [`HistoryWriter`].
const HISTORY_TREE: &str = "tandem.coordinator.history";

pub struct SledLog {
    db: sled::Db,
    txns: sled::Tree,
    saga_specs: sled::Tree,
    saga_progress: sled::Tree,
    history: sled::Tree,
    history_writer: HistoryWriter,
    flusher: GroupCommit,
}

impl SledLog {
    /// Opens (or creates) the log in folder `dir`.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let storage = |e: sled::Error| LogError::Storage(format!("{}: {e}", dir.display()));
        let db = group_commit::open_db(dir).map_err(storage)?;
        let txns = db.open_tree(TXNS_TREE).map_err(storage)?;
        let saga_specs = db.open_tree(SAGA_SPECS_TREE).map_err(storage)?;
        let saga_progress = db.open_tree(SAGA_PROGRESS_TREE).map_err(storage)?;
        let history = db.open_tree(HISTORY_TREE).map_err(storage)?;
        let flusher = GroupCommit::start(db.clone(), dir)
            .map_err(|e| LogError::Storage(format!("{}: {e}", dir.display())))?;
        let history_writer = HistoryWriter::start(history.clone())
            .map_err(|e| LogError::Storage(format!("starting the history writer: {e}")))?;
        Ok(SledLog {
            db,
            txns,
            saga_specs,
            saga_progress,
            history,
            history_writer,
            flusher,
        })
    }

    /// Returns once every history entry appended before is in the tree (so that a flush
    /// after it makes them durable too).
    pub fn sync_history(&self) {
        self.history_writer.sync();
    }

    /// The group-commit flusher, for its statistics.
    pub fn flusher(&self) -> &GroupCommit {
        &self.flusher
    }
}

fn decode<T: serde::de::DeserializeOwned>(txn: &[u8], bytes: &[u8]) -> Result<T, LogError> {
    codec::decode(bytes).map_err(|source| LogError::Corrupt {
        txn: String::from_utf8_lossy(txn).into_owned(),
        source,
    })
}

impl SledLog {
    /// Removes the history of the transaction or saga keyed `id` (its entries and its
    /// truncation mark). Called before its record goes, so that a crash between the two
    /// leaves a record without history (pruned again at the next pass), never a history
    /// without a record.
    fn remove_history(&self, id: &[u8]) -> Result<(), LogError> {
        let entries: Vec<sled::IVec> = self
            .history
            .scan_prefix(entries_prefix(id))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        for key in entries {
            self.history.remove(key).map_err(storage)?;
        }
        self.history.remove(truncated_key(id)).map_err(storage)?;
        Ok(())
    }
}

fn storage(e: sled::Error) -> LogError {
    LogError::Storage(e.to_string())
}

/// Writes one record under `id`, after checking the size limit every record must keep.
fn put_record<T: serde::Serialize>(
    tree: &sled::Tree,
    id: &TxnId,
    record: &T,
) -> Result<(), LogError> {
    let bytes = codec::encode(record).map_err(|e| LogError::Storage(e.to_string()))?;
    assert!(
        bytes.len() <= RECORD_BYTES_MAX,
        "{id}: record of {} bytes exceeds RECORD_BYTES_MAX; the request limits should have refused it",
        bytes.len()
    );
    tree.insert(id.as_str(), bytes).map_err(storage)?;
    Ok(())
}

fn get_record<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    id: &TxnId,
) -> Result<Option<T>, LogError> {
    match tree.get(id.as_str()).map_err(storage)? {
        Some(bytes) => decode(id.as_str().as_bytes(), &bytes).map(Some),
        None => Ok(None),
    }
}

/// Every record of `tree`, in id order.
fn scan_records<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    name: &str,
) -> Result<Vec<(TxnId, T)>, LogError> {
    let mut records = Vec::new();
    for entry in tree.iter() {
        let (key, value) = entry.map_err(storage)?;
        let id = key_id(&key, name)?;
        records.push((id, decode(&key, &value)?));
    }
    Ok(records)
}

/// The keys a prune pass examines: after `after`, before the cutoff's id bound. Empty (not a
/// panic) when `after` is already past the bound, as after the clock stepped back.
fn prune_range(
    tree: &sled::Tree,
    cutoff: &PruneCutoff,
    after: Option<&TxnId>,
) -> Option<sled::Iter> {
    let upper = id_key_bound(cutoff.id_created_before_ms);
    let lower = match after {
        Some(after) if after.as_str() >= upper.as_str() => return None,
        Some(after) => Bound::Excluded(after.as_str().as_bytes().to_vec()),
        None => Bound::Unbounded,
    };
    Some(tree.range::<Vec<u8>, _>((lower, Bound::Excluded(upper.into_bytes()))))
}

/// Parses a key of the log's trees back into its id.
fn key_id(key: &[u8], name: &str) -> Result<TxnId, LogError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(|k| TxnId::parse(k).ok())
        .ok_or_else(|| LogError::Storage(format!("malformed key {key:?} in {name}")))
}

/// Examines at most `scan_max` records of the pass's range; returns the pass (nothing
/// removed yet) and the entries `terminal_since_ms` dates before the cutoff.
fn judge_pass(
    tree: &sled::Tree,
    name: &str,
    cutoff: &PruneCutoff,
    after: Option<&TxnId>,
    scan_max: usize,
    terminal_since_ms: impl Fn(&TxnId, &[u8], &[u8]) -> Result<Option<u64>, LogError>,
) -> Result<(PrunePass, Vec<(sled::IVec, sled::IVec)>), LogError> {
    let mut pass = PrunePass::default();
    let mut doomed = Vec::new();
    let Some(range) = prune_range(tree, cutoff, after) else {
        return Ok((pass, doomed));
    };
    for entry in range.take(scan_max) {
        let (key, value) = entry.map_err(storage)?;
        let id = key_id(&key, name)?;
        pass.scanned += 1;
        if terminal_since_ms(&id, &key, &value)?
            .is_some_and(|since| since < cutoff.terminal_before_ms)
        {
            doomed.push((key, value));
        }
        if pass.scanned == scan_max {
            pass.resume_after = Some(id);
        }
    }
    Ok((pass, doomed))
}

impl TxnLog for SledLog {
    fn put(&self, txn: &TxnId, record: &TxnRecord) -> Result<(), LogError> {
        put_record(&self.txns, txn, record)
    }

    fn flush(&self) -> FlushFuture {
        let flusher = self.flusher.clone();
        Box::pin(async move { flusher.flush().await.map_err(LogError::from) })
    }

    fn get(&self, txn: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        get_record(&self.txns, txn)
    }

    fn scan(&self) -> Result<Vec<(TxnId, TxnRecord)>, LogError> {
        scan_records(&self.txns, TXNS_TREE)
    }

    fn put_saga_spec(&self, saga: &TxnId, record: &SagaSpecRecord) -> Result<(), LogError> {
        put_record(&self.saga_specs, saga, record)
    }

    fn put_saga_progress(&self, saga: &TxnId, progress: &SagaProgress) -> Result<(), LogError> {
        put_record(&self.saga_progress, saga, progress)
    }

    fn get_saga(&self, saga: &TxnId) -> Result<Option<StoredSaga>, LogError> {
        let Some(spec) = get_record(&self.saga_specs, saga)? else {
            return Ok(None);
        };
        let progress = get_record(&self.saga_progress, saga)?;
        Ok(Some(StoredSaga { spec, progress }))
    }

    fn scan_sagas(&self) -> Result<Vec<(TxnId, StoredSaga)>, LogError> {
        let specs: Vec<(TxnId, SagaSpecRecord)> = scan_records(&self.saga_specs, SAGA_SPECS_TREE)?;
        let mut sagas = Vec::with_capacity(specs.len());
        for (saga, spec) in specs {
            let progress = get_record(&self.saga_progress, &saga)?;
            sagas.push((saga, StoredSaga { spec, progress }));
        }
        Ok(sagas)
    }

    fn append_history(&self, id: &TxnId, entry: &HistoryEntry) -> Result<(), LogError> {
        let bytes = codec::encode(entry).map_err(|e| LogError::Storage(e.to_string()))?;
        assert!(
            bytes.len() <= RECORD_BYTES_MAX,
            "{id}: history entry of {} bytes exceeds RECORD_BYTES_MAX",
            bytes.len()
        );
        let last = matches!(
            entry.kind,
            HistoryKind::Finished | HistoryKind::Saga(ChangeKind::Finished)
        );
        self.history_writer
            .append(id.as_str().as_bytes(), bytes, last);
        Ok(())
    }

    fn history(&self, id: &TxnId) -> Result<History, LogError> {
        self.history_writer.sync();
        let mut entries = Vec::new();
        for item in self
            .history
            .scan_prefix(entries_prefix(id.as_str().as_bytes()))
        {
            let (_, value) = item.map_err(storage)?;
            let record = record_entries(&value).ok_or_else(|| {
                LogError::Storage(format!("{id}: a history chunk's framing is broken"))
            })?;
            for entry in record {
                entries.push(decode(id.as_str().as_bytes(), entry)?);
            }
        }
        let truncated = self
            .history
            .contains_key(truncated_key(id.as_str().as_bytes()))
            .map_err(storage)?;
        Ok(History { entries, truncated })
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn prune_txns(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError> {
        // Entries still queued for the history thread would land after their removal.
        self.history_writer.sync();
        let (mut pass, doomed) = judge_pass(
            &self.txns,
            TXNS_TREE,
            cutoff,
            after,
            scan_max,
            |_, key, value| {
                let record: TxnRecord = decode(key, value)?;
                Ok(record.terminal_since_ms())
            },
        )?;
        for (key, value) in doomed {
            self.remove_history(&key)?;
            // Removed only if still the record judged terminal.
            let swapped = self
                .txns
                .compare_and_swap(&key, Some(&value), None::<&[u8]>)
                .map_err(storage)?;
            if swapped.is_ok() {
                pass.removed += 1;
            }
        }
        Ok(pass)
    }

    fn prune_sagas(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError> {
        self.history_writer.sync();
        let specs = &self.saga_specs;
        let (mut pass, doomed) = judge_pass(
            specs,
            SAGA_SPECS_TREE,
            cutoff,
            after,
            scan_max,
            |id, key, value| {
                let spec: SagaSpecRecord = decode(key, value)?;
                let progress = get_record(&self.saga_progress, id)?;
                Ok(StoredSaga { spec, progress }.terminal_since_ms())
            },
        )?;
        if doomed.is_empty() {
            return Ok(pass);
        }
        for (key, _) in &doomed {
            self.remove_history(key)?;
        }
        // A finished saga is never written again, so nothing can change between the read above
        // and this transaction; both records go, or neither.
        (&self.saga_specs, &self.saga_progress)
            .transaction(|(specs, progress)| {
                for (key, _) in &doomed {
                    specs.remove(key.as_ref())?;
                    progress.remove(key.as_ref())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| LogError::Storage(format!("removing finished sagas: {e:?}")))?;
        pass.removed = doomed.len();
        Ok(pass)
    }
}
