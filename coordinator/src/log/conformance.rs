//! The conformance suite every [`TxnLog`] implementation must pass.
//!
//! Each check takes a way to open the log and a way to "crash and reopen" it, so the same
//! assertions cover sled (drop and reopen the folder) and memory (drop unflushed writes).

use tandem_common::TxnId;

use super::mem_log::MemLog;
use super::record::{
    History, HistoryEntry, HistoryKind, SagaSpecRecord, TxnRecord, HISTORY_ENTRIES_MAX,
    HISTORY_HEAD_KEPT,
};
use super::sled_log::SledLog;
use super::{PruneCutoff, TxnLog};
use crate::engine::saga::{
    RetryPolicy, SagaOutcome, SagaPhase, SagaProgress, SagaSpec, StepPhase, StepProgress, StepSpec,
};
use crate::engine::types::{BranchPhase, BranchTarget, Decision};

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

/// An id created at `created_ms`.
fn id_at(created_ms: u64, n: u32) -> TxnId {
    TxnId::parse(&format!("{created_ms:013}-p{n:04}")).unwrap()
}

fn finished(finished_ms: u64) -> TxnRecord {
    TxnRecord::Finished {
        decision: Decision::Commit,
        branches: vec![target(1)],
        branch_phases: vec![BranchPhase::Acknowledged],
        fingerprint: [7; 32],
        finished_ms,
    }
}

fn saga_spec(accepted_ms: u64, callback: bool) -> SagaSpecRecord {
    SagaSpecRecord {
        spec: SagaSpec {
            steps: vec![StepSpec {
                name: "debit".into(),
                target: target(1),
                action: b"a".to_vec(),
                compensation: b"c".to_vec(),
                after: Vec::new(),
                retry: RetryPolicy::default(),
                timeout_ms: 1_000,
            }],
            callback: callback.then(|| target(2)),
        },
        fingerprint: [3; 32],
        accepted_ms,
    }
}

fn saga_progress(phase: SagaPhase, callback_delivered: bool, sent_ms: u64) -> SagaProgress {
    SagaProgress {
        seq: 3,
        phase,
        outcome: phase.is_terminal().then_some(SagaOutcome::Completed),
        steps: vec![StepProgress {
            phase: StepPhase::Succeeded,
            action_attempts: 1,
            compensation_attempts: 0,
            compensation_failures: 0,
            last_error: None,
            first_sent_ms: Some(sent_ms),
        }],
        started_order: vec![0],
        succeeded_order: vec![0],
        compensation_queue: Vec::new(),
        stuck: false,
        recovered: false,
        callback_attempts: u32::from(callback_delivered),
        callback_delivered,
    }
}

/// The prune suite: only terminal records old by both measures go, a pass examines at most
/// `scan_max` records and says where to resume, and removals are durable after a flush.
async fn prune_suite<L: TxnLog>(open: impl FnOnce() -> L, crash_and_reopen: impl Fn(L) -> L) {
    // Ids created at 1_000 (old) or 9_000 (young); terminal at 2_000 (old) or 8_000 (young).
    let cutoff = PruneCutoff {
        terminal_before_ms: 5_000,
        id_created_before_ms: 5_000,
    };
    let log = open();
    let kept_txns = [
        (id_at(1_000, 1), preparing(1)),
        (id_at(1_000, 2), decided(2)),
        (id_at(1_000, 3), finished(8_000)), // terminal too recently
        (id_at(9_000, 4), finished(2_000)), // id too young
        (
            id_at(9_000, 5),
            TxnRecord::PresumedAborted { presumed_ms: 2_000 },
        ),
    ];
    let pruned_txns = [
        (id_at(1_000, 6), finished(2_000)),
        (
            id_at(1_000, 7),
            TxnRecord::PresumedAborted { presumed_ms: 2_000 },
        ),
        (id_at(1_001, 8), finished(4_999)),
    ];
    for (txn, record) in kept_txns.iter().chain(&pruned_txns) {
        log.put(txn, record).unwrap();
    }
    let old_done = saga_progress(SagaPhase::Completed, false, 1_500);
    let kept_sagas = [
        (
            id_at(1_000, 10),
            saga_spec(1_000, false),
            Some(saga_progress(SagaPhase::Running, false, 1_500)),
        ),
        (
            id_at(1_000, 11),
            saga_spec(1_000, true),
            Some(saga_progress(SagaPhase::Completed, false, 1_500)),
        ), // callback pending
        (id_at(1_000, 12), saga_spec(1_000, false), None), // accepted, never progressed
        (
            id_at(1_000, 13),
            saga_spec(1_000, false),
            Some(saga_progress(SagaPhase::Completed, false, 7_000)),
        ), // a step sent recently
        (
            id_at(9_000, 14),
            saga_spec(1_000, false),
            Some(old_done.clone()),
        ), // id too young
    ];
    let pruned_sagas = [
        (
            id_at(1_000, 15),
            saga_spec(1_000, false),
            Some(old_done.clone()),
        ),
        (
            id_at(1_000, 16),
            saga_spec(1_000, true),
            Some(saga_progress(SagaPhase::Completed, true, 1_500)),
        ),
    ];
    for (saga, spec, progress) in kept_sagas.iter().chain(&pruned_sagas) {
        log.put_saga_spec(saga, spec).unwrap();
        if let Some(progress) = progress {
            log.put_saga_progress(saga, progress).unwrap();
        }
    }
    // Every one has a history (operators' view), which goes with its record.
    let began = HistoryEntry::new(1_000, HistoryKind::Began, None, 0, String::new());
    let all_ids = kept_txns
        .iter()
        .chain(&pruned_txns)
        .map(|(id, _)| id)
        .chain(kept_sagas.iter().chain(&pruned_sagas).map(|(id, _, _)| id));
    for id in all_ids {
        for _ in 0..=HISTORY_ENTRIES_MAX {
            log.append_history(id, &began).unwrap(); // truncated: the mark goes too
        }
    }
    log.flush().await.unwrap();

    // A bounded pass examines scan_max candidates in id order and says where to resume.
    let first = log.prune_txns(&cutoff, None, 2).unwrap();
    assert_eq!((first.scanned, first.removed), (2, 0), "{first:?}");
    assert_eq!(first.resume_after, Some(id_at(1_000, 2)));
    let rest = log
        .prune_txns(&cutoff, first.resume_after.as_ref(), 100)
        .unwrap();
    // Candidates are the ids created before the cutoff: 1, 2, 3, 6, 7, 8.
    assert_eq!((rest.scanned, rest.removed), (4, 3), "{rest:?}");
    assert_eq!(rest.resume_after, None);
    let sagas = log.prune_sagas(&cutoff, None, 100).unwrap();
    assert_eq!((sagas.scanned, sagas.removed), (6, 2), "{sagas:?}");
    assert_eq!(sagas.resume_after, None);
    // A pass over what is left removes nothing more.
    let again = log.prune_txns(&cutoff, None, 100).unwrap();
    assert_eq!(again.removed, 0, "{again:?}");

    let check = |log: &L| {
        for (txn, record) in &kept_txns {
            assert_eq!(log.get(txn).unwrap().as_ref(), Some(record), "kept {txn}");
        }
        for (txn, _) in &pruned_txns {
            assert_eq!(log.get(txn).unwrap(), None, "pruned {txn}");
        }
        for (saga, spec, progress) in &kept_sagas {
            let stored = log
                .get_saga(saga)
                .unwrap()
                .unwrap_or_else(|| panic!("kept {saga}"));
            assert_eq!(
                (&stored.spec, &stored.progress),
                (spec, progress),
                "kept {saga}"
            );
        }
        for (saga, _, _) in &pruned_sagas {
            assert_eq!(log.get_saga(saga).unwrap(), None, "pruned {saga}");
        }
        let kept = kept_txns
            .iter()
            .map(|(id, _)| id)
            .chain(kept_sagas.iter().map(|(id, _, _)| id));
        for id in kept {
            let history = log.history(id).unwrap();
            assert!(
                history.truncated && history.entries.len() == HISTORY_ENTRIES_MAX,
                "kept {id}"
            );
        }
        let pruned = pruned_txns
            .iter()
            .map(|(id, _)| id)
            .chain(pruned_sagas.iter().map(|(id, _, _)| id));
        for id in pruned {
            assert_eq!(
                log.history(id).unwrap(),
                History::default(),
                "pruned {id}'s history"
            );
        }
        let ids: Vec<TxnId> = log
            .scan_sagas()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let expected: Vec<TxnId> = kept_sagas.iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(ids, expected);
    };
    check(&log);
    // Removals are durable after a flush.
    log.flush().await.unwrap();
    let log = crash_and_reopen(log);
    check(&log);
    // A resume point past the cutoff (the clock stepped back) examines nothing.
    let past = log
        .prune_txns(&cutoff, Some(&id_at(9_000, 4)), 100)
        .unwrap();
    assert_eq!(past, super::PrunePass::default());
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
    // A history continued after a restart (a recovered transaction) goes on after its
    // stored entries, in order.
    log.append_history(&id(5), &entry(3)).unwrap();
    assert_eq!(
        log.history(&id(5)).unwrap().entries,
        vec![entry(0), entry(1), entry(2), entry(3)]
    );
    assert_eq!(
        log.history(&id(7)).unwrap().entries.len(),
        HISTORY_ENTRIES_MAX
    );
}

/// Opens the sled log in `path` again after the previous handle was dropped. sled releases
/// the folder's lock once its own background writes of the dropped handle are done, which
/// on a loaded machine can take a moment: a bounded wait, not a failure.
fn reopen_sled(path: &std::path::Path) -> SledLog {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledLog::open(path) {
            Ok(log) => return log,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopening the sled log in {}: {e}", path.display()),
        }
    }
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
            reopen_sled(&reopen_path)
        },
    )
    .await;
}

#[tokio::test]
async fn mem_log_passes_the_prune_suite() {
    prune_suite(MemLog::new, |log| {
        log.crash();
        log
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_log_passes_the_prune_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let reopen_path = path.clone();
    prune_suite(
        move || SledLog::open(&path).unwrap(),
        move |log| {
            drop(log);
            reopen_sled(&reopen_path)
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
