//! An in-memory log with an explicit crash model, for tests and the deterministic simulation.
//!
//! It keeps two maps: what is visible (every `put`) and what is durable (what the last
//! `flush` saw). [`MemLog::crash`] throws away everything not flushed, as a power loss would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tandem_common::TxnId;

use super::record::{bounded_push, History, HistoryEntry, SagaSpecRecord, StoredSaga, TxnRecord};
use super::{FlushFuture, LogError, TxnLog};
use crate::engine::saga::SagaProgress;

#[derive(Default, Clone)]
struct Records {
    txns: BTreeMap<TxnId, TxnRecord>,
    saga_specs: BTreeMap<TxnId, SagaSpecRecord>,
    saga_progress: BTreeMap<TxnId, SagaProgress>,
    history: BTreeMap<TxnId, History>,
}

#[derive(Default)]
struct State {
    visible: Records,
    durable: Records,
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
            .txns
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
        Ok(self.state.lock().unwrap().visible.txns.get(txn).cloned())
    }

    fn scan(&self) -> Result<Vec<(TxnId, TxnRecord)>, LogError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .visible
            .txns
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn put_saga_spec(&self, saga: &TxnId, record: &SagaSpecRecord) -> Result<(), LogError> {
        let mut state = self.state.lock().unwrap();
        state
            .visible
            .saga_specs
            .insert(saga.clone(), record.clone());
        Ok(())
    }

    fn put_saga_progress(&self, saga: &TxnId, progress: &SagaProgress) -> Result<(), LogError> {
        let mut state = self.state.lock().unwrap();
        state
            .visible
            .saga_progress
            .insert(saga.clone(), progress.clone());
        Ok(())
    }

    fn get_saga(&self, saga: &TxnId) -> Result<Option<StoredSaga>, LogError> {
        let state = self.state.lock().unwrap();
        Ok(state.visible.saga_specs.get(saga).map(|spec| StoredSaga {
            spec: spec.clone(),
            progress: state.visible.saga_progress.get(saga).cloned(),
        }))
    }

    fn scan_sagas(&self) -> Result<Vec<(TxnId, StoredSaga)>, LogError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .visible
            .saga_specs
            .iter()
            .map(|(saga, spec)| {
                let stored = StoredSaga {
                    spec: spec.clone(),
                    progress: state.visible.saga_progress.get(saga).cloned(),
                };
                (saga.clone(), stored)
            })
            .collect())
    }

    fn append_history(&self, id: &TxnId, entry: &HistoryEntry) -> Result<(), LogError> {
        let mut state = self.state.lock().unwrap();
        let history = state.visible.history.entry(id.clone()).or_default();
        if bounded_push(&mut history.entries, entry.clone()).is_some() {
            history.truncated = true;
        }
        Ok(())
    }

    fn history(&self, id: &TxnId) -> Result<History, LogError> {
        let state = self.state.lock().unwrap();
        Ok(state.visible.history.get(id).cloned().unwrap_or_default())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}
