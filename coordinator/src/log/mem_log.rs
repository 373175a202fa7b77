//! An in-memory log with an explicit crash model, for tests and the deterministic simulation.
//!
//! It keeps two maps: what is visible (every `put`) and what is durable (what the last
//! `flush` saw). [`MemLog::crash`] throws away everything not flushed, as a power loss would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tandem_common::TxnId;

use super::record::{bounded_push, History, HistoryEntry, SagaSpecRecord, StoredSaga, TxnRecord};
use super::{id_key_bound, FlushFuture, LogError, PruneCutoff, PrunePass, TxnLog};
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

    fn prune_txns(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError> {
        let mut state = self.state.lock().unwrap();
        let records = &mut state.visible;
        let (pass, doomed) = judge(records.txns.iter(), cutoff, after, scan_max, |record| {
            record.terminal_since_ms()
        });
        for id in &doomed {
            records.txns.remove(id);
            records.history.remove(id);
        }
        Ok(pass)
    }

    fn prune_sagas(
        &self,
        cutoff: &PruneCutoff,
        after: Option<&TxnId>,
        scan_max: usize,
    ) -> Result<PrunePass, LogError> {
        let mut state = self.state.lock().unwrap();
        let records = &mut state.visible;
        let sagas: Vec<(TxnId, StoredSaga)> = records
            .saga_specs
            .iter()
            .map(|(id, spec)| {
                let progress = records.saga_progress.get(id).cloned();
                let stored = StoredSaga {
                    spec: spec.clone(),
                    progress,
                };
                (id.clone(), stored)
            })
            .collect();
        let (pass, doomed) = judge(
            sagas.iter().map(|(id, saga)| (id, saga)),
            cutoff,
            after,
            scan_max,
            StoredSaga::terminal_since_ms,
        );
        for id in &doomed {
            records.saga_specs.remove(id);
            records.saga_progress.remove(id);
            records.history.remove(id);
        }
        Ok(pass)
    }
}

/// The ids of one bounded pass over `records` (in id order) that are terminal and old.
fn judge<'a, R: 'a>(
    records: impl Iterator<Item = (&'a TxnId, &'a R)>,
    cutoff: &PruneCutoff,
    after: Option<&TxnId>,
    scan_max: usize,
    terminal_since_ms: impl Fn(&R) -> Option<u64>,
) -> (PrunePass, Vec<TxnId>) {
    let bound = id_key_bound(cutoff.id_created_before_ms);
    let mut pass = PrunePass::default();
    let mut doomed = Vec::new();
    let candidates = records
        .skip_while(|(id, _)| after.is_some_and(|after| *id <= after))
        .take_while(|(id, _)| id.as_str() < bound.as_str());
    for (id, record) in candidates {
        if pass.scanned == scan_max {
            break;
        }
        pass.scanned += 1;
        if terminal_since_ms(record).is_some_and(|since| since < cutoff.terminal_before_ms) {
            doomed.push(id.clone());
        }
        if pass.scanned == scan_max {
            pass.resume_after = Some(id.clone());
        }
    }
    pass.removed = doomed.len();
    (pass, doomed)
}
