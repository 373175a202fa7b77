//! The coordinator's log in the simulation: what is visible and what is durable.
//!
//! It mirrors the contract of `tandem_coordinator::log::TxnLog`: a `put` is visible at once
//! and durable only after a later flush; writes are ordered, so a crash keeps every flushed
//! write plus some prefix (chosen by the simulator, possibly empty) of the writes not yet
//! flushed, as sled's sequential log may have written some of them out on its own. The
//! runtime's `after_flush` is modelled by the simulator: a flush is scheduled, and when it
//! completes everything visible at that moment becomes durable (the contract allows a flush to
//! cover later writes too) and the flush's continuations run.

use std::collections::BTreeMap;

use tandem_common::TxnId;
use tandem_coordinator::engine::saga::SagaProgress;
use tandem_coordinator::log::record::{SagaSpecRecord, StoredSaga, TxnRecord};

#[derive(Debug, Clone, Default)]
struct Records {
    txns: BTreeMap<TxnId, TxnRecord>,
    saga_specs: BTreeMap<TxnId, SagaSpecRecord>,
    saga_progress: BTreeMap<TxnId, SagaProgress>,
}

#[derive(Debug, Clone)]
enum Write {
    Txn(TxnId, TxnRecord),
    SagaSpec(TxnId, SagaSpecRecord),
    SagaProgress(TxnId, SagaProgress),
}

impl Records {
    fn apply(&mut self, write: Write) {
        match write {
            Write::Txn(id, record) => {
                self.txns.insert(id, record);
            }
            Write::SagaSpec(id, record) => {
                self.saga_specs.insert(id, record);
            }
            Write::SagaProgress(id, progress) => {
                self.saga_progress.insert(id, progress);
            }
        }
    }
}

/// The simulated coordinator log.
#[derive(Debug, Default)]
pub struct SimLog {
    visible: Records,
    durable: Records,
    /// Writes not yet covered by a flush, oldest first.
    unflushed: Vec<Write>,
}

impl SimLog {
    fn put(&mut self, write: Write) {
        self.visible.apply(write.clone());
        self.unflushed.push(write);
    }

    pub fn put_txn(&mut self, txn: &TxnId, record: &TxnRecord) {
        self.put(Write::Txn(txn.clone(), record.clone()));
    }

    pub fn put_saga_spec(&mut self, saga: &TxnId, record: &SagaSpecRecord) {
        self.put(Write::SagaSpec(saga.clone(), record.clone()));
    }

    pub fn put_saga_progress(&mut self, saga: &TxnId, progress: &SagaProgress) {
        self.put(Write::SagaProgress(saga.clone(), progress.clone()));
    }

    /// A flush completed: everything visible is durable.
    pub fn flush(&mut self) {
        for write in self.unflushed.drain(..) {
            self.durable.apply(write);
        }
    }

    /// How many writes a crash now could lose.
    pub fn unflushed_len(&self) -> usize {
        self.unflushed.len()
    }

    /// A crash: the first `kept` unflushed writes reached the disk anyway; the rest are lost.
    /// Returns how many were lost.
    pub fn crash(&mut self, kept: usize) -> usize {
        let lost = self.unflushed.len().saturating_sub(kept);
        let kept: Vec<Write> = self.unflushed.drain(..).take(kept).collect();
        for write in kept {
            self.durable.apply(write);
        }
        self.visible = self.durable.clone();
        lost
    }

    pub fn get(&self, txn: &TxnId) -> Option<TxnRecord> {
        self.visible.txns.get(txn).cloned()
    }

    /// Every 2PC record, in id order.
    pub fn scan(&self) -> Vec<(TxnId, TxnRecord)> {
        self.visible
            .txns
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn get_saga(&self, saga: &TxnId) -> Option<StoredSaga> {
        self.visible.saga_specs.get(saga).map(|spec| StoredSaga {
            spec: spec.clone(),
            progress: self.visible.saga_progress.get(saga).cloned(),
        })
    }

    /// Every saga with a spec, in id order.
    pub fn scan_sagas(&self) -> Vec<(TxnId, StoredSaga)> {
        self.visible
            .saga_specs
            .keys()
            .map(|saga| (saga.clone(), self.get_saga(saga).expect("listed")))
            .collect()
    }
}
