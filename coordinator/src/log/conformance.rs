//! The conformance suite every [`TxnLog`] implementation must pass.
//!
//! Each check takes a way to open the log and a way to "crash and reopen" it, so the same
//! assertions cover sled (drop and reopen the folder) and memory (drop unflushed writes).

use tandem_common::TxnId;

use super::mem_log::MemLog;
use super::record::{HistoryEntry, HistoryKind, TxnRecord, HISTORY_ENTRIES_MAX, HISTORY_HEAD_KEPT};
use super::sled_log::SledLog;
use super::TxnLog;
use crate::engine::types::{BranchTarget, Decision};

fn target(n: u32) -> BranchTarget {
    BranchTarget {
        participant: format!("http://127.0.0.1:{}", 7000 + n),
        resource: "bank".into(),
    }
}

fn preparing(n: u8) -> TxnRecord {
    TxnRecord::Preparing {
        branches: vec![target(1), target(2)],
        fingerprint: [n; 32],
        created_ms: 5,
    }
}

fn decided(n: u8) -> TxnRecord {
    TxnRecord::Decided {
        decision: Decision::Commit,
        branches: vec![target(1), target(2)],
        fingerprint: [n; 32],
        decided_ms: 6,
    }
}

fn id(n: u32) -> TxnId {
    TxnId::parse(&format!("1763850000000-t{n:04}")).unwrap()
}

/// Runs the suite. `crash_and_reopen` takes the log and returns it as it is after a crash.
async fn suite<L: TxnLog>(open: impl FnOnce() -> L, crash_and_reopen: impl Fn(L) -> L) {
    let log = open();
    // put is visible at once and replaces.
    log.put(&id(2), &preparing(2)).unwrap();
    assert_eq!(log.get(&id(2)).unwrap(), Some(preparing(2)));
    log.put(&id(2), &decided(2)).unwrap();
    assert_eq!(log.get(&id(2)).unwrap(), Some(decided(2)));
    log.put(&id(1), &preparing(1)).unwrap();
    assert_eq!(log.get(&id(9)).unwrap(), None);
    // scan is in id order.
    let ids: Vec<TxnId> = log.scan().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(ids, vec![id(1), id(2)]);
    // flushed writes survive a crash; concurrent flushes all complete.
    let flushes: Vec<_> = (0..16).map(|_| log.flush()).collect();
    for f in flushes {
        f.await.unwrap();
    }
    let log = crash_and_reopen(log);
    assert_eq!(log.get(&id(1)).unwrap(), Some(preparing(1)));
    assert_eq!(log.get(&id(2)).unwrap(), Some(decided(2)));
    // A flushed record is never replaced by an older one after a crash.
    log.put(&id(3), &preparing(3)).unwrap();
    log.flush().await.unwrap();
    log.put(&id(3), &decided(3)).unwrap();
    let log = crash_and_reopen(log);
    let after = log.get(&id(3)).unwrap();
    assert!(
        after == Some(preparing(3)) || after == Some(decided(3)),
        "record of {} after crash: {after:?}",
        id(3)
    );
    // Histories: appended in order, kept per id, bounded (head and latest kept), durable
    // once flushed.
    let entry = |n: u64| HistoryEntry::new(n, HistoryKind::Began, Some(1), 2, format!("#{n}"));
    assert!(log.history(&id(5)).unwrap().entries.is_empty());
    for n in 0..3 {
        log.append_history(&id(5), &entry(n)).unwrap();
    }
    log.append_history(&id(6), &entry(99)).unwrap();
    let history = log.history(&id(5)).unwrap();
    assert_eq!(history.entries, vec![entry(0), entry(1), entry(2)]);
    assert!(!history.truncated);
    let total = HISTORY_ENTRIES_MAX as u64 + 5;
    for n in 0..total {
        log.append_history(&id(7), &entry(n)).unwrap();
    }
    let history = log.history(&id(7)).unwrap();
    assert!(history.truncated);
    assert_eq!(history.entries.len(), HISTORY_ENTRIES_MAX);
    assert_eq!(
        history.entries[HISTORY_HEAD_KEPT - 1],
        entry(HISTORY_HEAD_KEPT as u64 - 1)
    );
    assert_eq!(
        history.entries[HISTORY_HEAD_KEPT],
        entry(HISTORY_HEAD_KEPT as u64 + 5)
    );
    assert_eq!(history.entries.last(), Some(&entry(total - 1)));
    log.flush().await.unwrap();
    let log = crash_and_reopen(log);
    assert_eq!(log.history(&id(5)).unwrap().entries.len(), 3);
    assert_eq!(log.history(&id(6)).unwrap().entries, vec![entry(99)]);
    assert_eq!(
        log.history(&id(7)).unwrap().entries.len(),
        HISTORY_ENTRIES_MAX
    );
}

#[tokio::test]
async fn mem_log_passes_the_conformance_suite() {
    suite(MemLog::new, |log| {
        log.crash();
        log
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_log_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let reopen_path = path.clone();
    suite(
        move || SledLog::open(&path).unwrap(),
        move |log| {
            drop(log);
            SledLog::open(&reopen_path).unwrap()
        },
    )
    .await;
}

#[test]
fn mem_log_crash_loses_exactly_the_unflushed_writes() {
    let log = MemLog::new();
    log.put(&id(1), &preparing(1)).unwrap();
    drop(log.flush());
    log.put(&id(1), &decided(1)).unwrap();
    log.put(&id(2), &preparing(2)).unwrap();
    log.crash();
    assert_eq!(log.get(&id(1)).unwrap(), Some(preparing(1)));
    assert_eq!(log.get(&id(2)).unwrap(), None);
}
