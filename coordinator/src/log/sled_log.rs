//! The embedded default log: one sled tree keyed by transaction id, made durable by the
//! group-commit flusher (`sled::Db::flush` followed by `fdatasync` of the data file).

use std::path::Path;

use tandem_common::{codec, group_commit, GroupCommit, TxnId, RECORD_BYTES_MAX};

use super::record::TxnRecord;
use super::{FlushFuture, LogError, TxnLog};

/// The tree holding one record per transaction.
const TXNS_TREE: &str = "tandem.coordinator.txns";

pub struct SledLog {
    db: sled::Db,
    txns: sled::Tree,
    flusher: GroupCommit,
}

impl SledLog {
    /// Opens (or creates) the log in folder `dir`.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let storage = |e: sled::Error| LogError::Storage(format!("{}: {e}", dir.display()));
        let db = group_commit::open_db(dir).map_err(storage)?;
        let txns = db.open_tree(TXNS_TREE).map_err(storage)?;
        let flusher = GroupCommit::start(db.clone(), dir)
            .map_err(|e| LogError::Storage(format!("{}: {e}", dir.display())))?;
        Ok(SledLog { db, txns, flusher })
    }

    /// The group-commit flusher, for its statistics.
    pub fn flusher(&self) -> &GroupCommit {
        &self.flusher
    }
}

fn decode(txn: &[u8], bytes: &[u8]) -> Result<TxnRecord, LogError> {
    codec::decode(bytes).map_err(|source| LogError::Corrupt {
        txn: String::from_utf8_lossy(txn).into_owned(),
        source,
    })
}

impl TxnLog for SledLog {
    fn put(&self, txn: &TxnId, record: &TxnRecord) -> Result<(), LogError> {
        let bytes = codec::encode(record).map_err(|e| LogError::Storage(e.to_string()))?;
        assert!(
            bytes.len() <= RECORD_BYTES_MAX,
            "{txn}: record of {} bytes exceeds RECORD_BYTES_MAX; the request limits should have refused it",
            bytes.len()
        );
        self.txns
            .insert(txn.as_str(), bytes)
            .map_err(|e| LogError::Storage(e.to_string()))?;
        Ok(())
    }

    fn flush(&self) -> FlushFuture {
        let flusher = self.flusher.clone();
        Box::pin(async move { flusher.flush().await.map_err(LogError::from) })
    }

    fn get(&self, txn: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        match self
            .txns
            .get(txn.as_str())
            .map_err(|e| LogError::Storage(e.to_string()))?
        {
            Some(bytes) => decode(txn.as_str().as_bytes(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn scan(&self) -> Result<Vec<(TxnId, TxnRecord)>, LogError> {
        let mut records = Vec::new();
        for entry in self.txns.iter() {
            let (key, value) = entry.map_err(|e| LogError::Storage(e.to_string()))?;
            let id = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| TxnId::parse(k).ok())
                .ok_or_else(|| {
                    LogError::Storage(format!("malformed key {key:?} in {TXNS_TREE}"))
                })?;
            records.push((id, decode(&key, &value)?));
        }
        Ok(records)
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
