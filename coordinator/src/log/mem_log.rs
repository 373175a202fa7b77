//! An in-memory log with an explicit crash model, for tests and the deterministic simulation.
//!
//! It keeps two maps: what is visible (every `put`) and what is durable (what the last
//! `flush` saw). [`MemLog::crash`] throws away everything not flushed, as a power loss would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tandem_common::TxnId;

use super::record::TxnRecord;
use super::{FlushFuture, LogError, TxnLog};

#[derive(Default)]
struct State {
    visible: BTreeMap<TxnId, TxnRecord>,
    durable: BTreeMap<TxnId, TxnRecord>,
}

/// An in-memory [`TxnLog`]. Clones share the same storage.
#[derive(Clone, Default)]
pub struct MemLog {
    state: Arc<Mutex<State>>,
}

impl MemLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loses every write not yet flushed.
    pub fn crash(&self) {
        let mut state = self.state.lock().unwrap();
        state.visible = state.durable.clone();
    }
}

impl TxnLog for MemLog {
    fn put(&self, txn: &TxnId, record: &TxnRecord) -> Result<(), LogError> {
        self.state
            .lock()
            .unwrap()
            .visible
            .insert(txn.clone(), record.clone());
        Ok(())
    }

    fn flush(&self) -> FlushFuture {
        // Durable at the moment of the call, as the contract asks.
        let mut state = self.state.lock().unwrap();
        state.durable = state.visible.clone();
        Box::pin(async { Ok(()) })
    }

    fn get(&self, txn: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        Ok(self.state.lock().unwrap().visible.get(txn).cloned())
    }

    fn scan(&self) -> Result<Vec<(TxnId, TxnRecord)>, LogError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .visible
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}
