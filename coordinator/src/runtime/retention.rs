//! Retention: terminal transactions and sagas stay in the log for
//! `CoordinatorConfig::terminal_retention_ms` (so `GetTransaction`, `GetSaga` and a client's
//! retry still find them), then a background pass removes them, so that a steady workload
//! keeps a log of steady size.
//!
//! What may be forgotten, and why it is safe:
//! - **Only terminal records.** 2PC: `Finished` (every branch that was sent the decision
//!   acknowledged it) and `PresumedAborted`. A `Decided` record is never removed, not even an
//!   abort: a branch that has not acknowledged may still be prepared and ask `QueryOutcome`,
//!   and once the record is gone the answer would be ABORTED by presumption, which for a
//!   commit would be wrong. After every acknowledgement no branch is in doubt: a participant
//!   records the decision durably before it acknowledges, so none asks again. A query sent
//!   before the acknowledgement and delayed past the retention would be answered ABORTED;
//!   the participant's barrier refuses an abort of a committed branch and changes nothing.
//!   Sagas: terminal with the callback delivered (or none) — no action, compensation or
//!   callback of theirs is ever sent again.
//! - **Only ids that can no longer start anything.** A record is removed only once its id is
//!   older than `txn_id_age_ms_max` (plus [`ID_AGE_MARGIN_MS`] against clock steps between
//!   threads). Such ids are refused at the edge (`server::validate_txn_id`), and again by the
//!   runtime at the moment it would start a transaction or saga ([`check_id_fresh`]), which
//!   closes the gap of a request validated at the edge just before its id aged past the limit
//!   and queued while the record was removed. So a late duplicate of a forgotten id is refused
//!   (INVALID_ARGUMENT), never run again. `CoordinatorConfig::check_retention` requires the
//!   retention to be at least the id-age limit, so the retention is what operators see.
//!
//! How: a task started with the runtime wakes every [`prune_interval`] and runs a round on a
//! blocking thread (never on the runtime's loop): passes of at most [`PASS_SCAN_MAX`] records
//! through `TxnLog::prune_txns` / `prune_sagas`, at most [`ROUND_SCAN_MAX`] records a round,
//! resuming where the last round stopped. Terminal records are never written again, so the
//! task needs nothing from the engines; the log's compare-and-swap (sled) guards the rest.
//! Removals are not flushed by the task: the next forced write makes them durable, and one
//! lost in a crash is removed again.
//!
//! Known limitation: a saga's terminal time is the latest the log knows (acceptance or the
//! first send of a step), since the stored progress has no end time; a long compensation
//! makes a saga's retention start before its end.

use std::sync::Arc;
use std::time::Duration;

use tandem_common::{unix_now_ms, TxnId};
use tokio::sync::oneshot;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::log::{LogError, PruneCutoff, PrunePass, TxnLog};

/// Most records one prune pass examines (one call into the log).
pub const PASS_SCAN_MAX: usize = 1_024;
/// Most records one round examines (one wake-up of the task).
pub const ROUND_SCAN_MAX: usize = 64 * PASS_SCAN_MAX;
/// Margin added to the id-age limit before an id's records may go, in ms (clock reads on
/// different threads, small clock steps).
pub const ID_AGE_MARGIN_MS: u64 = 1_000;
/// Bounds of the interval between rounds, in ms.
const PRUNE_INTERVAL_MS_MIN: u64 = 100;
const PRUNE_INTERVAL_MS_MAX: u64 = 60_000;

/// How often the retention task runs: a quarter of the retention, within 100 ms..60 s.
pub fn prune_interval(retention_ms: u64) -> Duration {
    Duration::from_millis((retention_ms / 4).clamp(PRUNE_INTERVAL_MS_MIN, PRUNE_INTERVAL_MS_MAX))
}

/// What may be removed at `now_ms`; `None` if the configuration keeps everything.
pub fn cutoff(config: &CoordinatorConfig, now_ms: u64) -> Option<PruneCutoff> {
    let retention_ms = config.terminal_retention_ms?;
    Some(PruneCutoff {
        terminal_before_ms: now_ms.saturating_sub(retention_ms),
        id_created_before_ms: now_ms
            .saturating_sub(config.txn_id_age_ms_max)
            .saturating_sub(ID_AGE_MARGIN_MS),
    })
}

/// Refuses to start a transaction or saga whose id is past the id-age limit now. The edge
/// checked it already; this check runs on the runtime's loop, at the moment the id would
/// start something, after the log said it names nothing (see the module documentation).
pub(crate) fn check_id_fresh(
    id: &TxnId,
    config: &CoordinatorConfig,
    now_ms: u64,
) -> Result<(), CoordinatorError> {
    let created = id.created_ms();
    if created.saturating_add(config.txn_id_age_ms_max) < now_ms {
        return Err(CoordinatorError::InvalidArgument(format!(
            "id {id} was created {} ms ago; ids older than {} ms are refused so that no id is ever reused",
            now_ms - created,
            config.txn_id_age_ms_max
        )));
    }
    Ok(())
}

/// Where the next round resumes, per kind of record.
#[derive(Debug, Default)]
pub struct Cursors {
    txns: Option<TxnId>,
    sagas: Option<TxnId>,
}

/// What one round removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    pub scanned: usize,
    pub txns_removed: usize,
    pub sagas_removed: usize,
}

/// One bounded round: 2PC records first, then sagas, each resumed from `cursors`.
pub fn prune_round(
    log: &dyn TxnLog,
    cutoff: &PruneCutoff,
    cursors: &mut Cursors,
) -> Result<RoundStats, LogError> {
    let budget = ROUND_SCAN_MAX / 2;
    let (txns_scanned, txns_removed) = drain(&mut cursors.txns, budget, |after| {
        log.prune_txns(cutoff, after, PASS_SCAN_MAX)
    })?;
    let (sagas_scanned, sagas_removed) = drain(&mut cursors.sagas, budget, |after| {
        log.prune_sagas(cutoff, after, PASS_SCAN_MAX)
    })?;
    Ok(RoundStats {
        scanned: txns_scanned + sagas_scanned,
        txns_removed,
        sagas_removed,
    })
}

/// Runs passes from `cursor` until every candidate was examined or `budget` records were;
/// leaves `cursor` where the next round resumes. Returns (scanned, removed).
fn drain(
    cursor: &mut Option<TxnId>,
    budget: usize,
    pass: impl Fn(Option<&TxnId>) -> Result<PrunePass, LogError>,
) -> Result<(usize, usize), LogError> {
    let (mut scanned, mut removed) = (0, 0);
    loop {
        let done = pass(cursor.as_ref())?;
        scanned += done.scanned;
        removed += done.removed;
        *cursor = done.resume_after;
        if cursor.is_none() || scanned >= budget {
            return Ok((scanned, removed));
        }
    }
}

/// The running retention task; dropping it stops the task (the runtime holds it, so the task
/// ends with the runtime's loop).
pub(crate) struct RetentionTask {
    _stop: oneshot::Sender<()>,
}

/// Starts the retention task, unless the configuration keeps everything.
pub(crate) fn spawn(log: Arc<dyn TxnLog>, config: &CoordinatorConfig) -> Option<RetentionTask> {
    let retention_ms = config.terminal_retention_ms?;
    let interval = prune_interval(retention_ms);
    let config = config.clone();
    let (stop_tx, mut stop) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut cursors = Cursors::default();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep(interval) => {}
            }
            let Some(cutoff) = cutoff(&config, unix_now_ms()) else {
                break;
            };
            let log = log.clone();
            let mut round_cursors = std::mem::take(&mut cursors);
            let round = tokio::task::spawn_blocking(move || {
                let stats = prune_round(&*log, &cutoff, &mut round_cursors);
                (stats, round_cursors)
            })
            .await;
            match round {
                Ok((Ok(stats), next)) => {
                    cursors = next;
                    if stats.txns_removed + stats.sagas_removed > 0 {
                        tracing::info!(
                            scanned = stats.scanned,
                            txns = stats.txns_removed,
                            sagas = stats.sagas_removed,
                            "retention: removed terminal records"
                        );
                    }
                }
                // A read failed: nothing was removed that should not be; try again later.
                Ok((Err(e), _)) => tracing::warn!(error = %e, "retention round failed"),
                Err(e) => tracing::warn!(error = %e, "retention round did not finish"),
            }
        }
    });
    Some(RetentionTask { _stop: stop_tx })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::{BranchPhase, BranchTarget, Decision};
    use crate::log::mem_log::MemLog;
    use crate::log::record::TxnRecord;
    use crate::runtime::{self, QueriedOutcome};
    use crate::transport::GrpcTransport;

    const HOUR_MS: u64 = 3_600_000;

    fn config(retention_ms: u64) -> CoordinatorConfig {
        let mut config = CoordinatorConfig::new("http://127.0.0.1:1");
        config.txn_id_age_ms_max = retention_ms;
        config.terminal_retention_ms = Some(retention_ms);
        config
    }

    fn target() -> BranchTarget {
        BranchTarget {
            // Nothing listens there: deliveries of a recovered decision fail and are retried.
            participant: "http://127.0.0.1:1".into(),
            resource: "bank".into(),
        }
    }

    fn id_at(created_ms: u64, n: u32) -> TxnId {
        TxnId::parse(&format!("{created_ms:013}-r{n}")).unwrap()
    }

    #[test]
    fn retention_shorter_than_the_id_age_limit_is_refused_with_both_values() {
        let mut config = config(HOUR_MS);
        assert_eq!(config.check_retention(), Ok(()));
        config.terminal_retention_ms = Some(HOUR_MS - 1);
        let error = config.check_retention().unwrap_err();
        assert!(
            error.contains("3599999 ms") && error.contains("3600000 ms"),
            "{error}"
        );
        config.terminal_retention_ms = None;
        assert_eq!(config.check_retention(), Ok(()));
    }

    #[test]
    fn an_id_past_the_age_limit_is_refused_at_the_moment_it_would_start() {
        let config = config(HOUR_MS);
        let now = 10 * HOUR_MS;
        assert!(check_id_fresh(&id_at(now - HOUR_MS, 1), &config, now).is_ok());
        let error = check_id_fresh(&id_at(now - HOUR_MS - 1, 2), &config, now).unwrap_err();
        assert!(
            matches!(error, CoordinatorError::InvalidArgument(_)),
            "{error}"
        );
    }

    /// A 2PC transaction that committed is forgotten only once every branch acknowledged:
    /// then presumed abort can answer for it, because no participant is left in doubt. A
    /// committed transaction still delivering is kept and keeps answering COMMITTED, however
    /// old; so is a young finished one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruned_commit_answers_presumed_abort_only_after_every_ack() {
        let now = unix_now_ms();
        let config = config(HOUR_MS);
        let log = MemLog::new();
        let old = now - 3 * HOUR_MS;
        let (acked, delivering, young) = (id_at(old, 1), id_at(old, 2), id_at(now, 3));
        let finished = |finished_ms| TxnRecord::Finished {
            decision: Decision::Commit,
            branches: vec![target()],
            branch_phases: vec![BranchPhase::Acknowledged],
            fingerprint: [1; 32],
            finished_ms,
        };
        log.put(&acked, &finished(old + 1)).unwrap();
        log.put(&young, &finished(now)).unwrap();
        log.put(
            &delivering,
            &TxnRecord::Decided {
                decision: Decision::Commit,
                branches: vec![target()],
                fingerprint: [2; 32],
                decided_ms: old + 1,
            },
        )
        .unwrap();

        let cut = cutoff(&config, now).unwrap();
        let stats = prune_round(&log, &cut, &mut Cursors::default()).unwrap();
        println!("round at {now}: {stats:?}");
        assert_eq!(
            stats.txns_removed, 1,
            "only the acknowledged old commit goes"
        );
        assert_eq!(log.get(&acked).unwrap(), None);

        let (handle, _task) = runtime::start(
            Arc::new(log.clone()),
            Arc::new(GrpcTransport::new()),
            config.clone(),
        )
        .unwrap();
        assert_eq!(
            handle.query_outcome(delivering.clone()).await.unwrap(),
            QueriedOutcome::Committed,
            "a commit not yet acknowledged by every branch must never be presumed aborted"
        );
        assert_eq!(
            handle.query_outcome(young.clone()).await.unwrap(),
            QueriedOutcome::Committed
        );
        // The forgotten one: nobody is in doubt about it, so presumed abort may answer.
        assert_eq!(
            handle.query_outcome(acked.clone()).await.unwrap(),
            QueriedOutcome::Aborted
        );
        assert!(matches!(
            log.get(&acked).unwrap(),
            Some(TxnRecord::PresumedAborted { .. })
        ));
        // And a client's late retry of the forgotten id is refused, not run again.
        let retry = crate::server::validate_txn_id(acked.as_str(), &config, unix_now_ms());
        assert!(
            matches!(retry, Err(CoordinatorError::InvalidArgument(_))),
            "{retry:?}"
        );
    }

    /// The runtime itself refuses to start an id past the age limit even if the edge let it
    /// through (the request was queued while the id aged and its record was removed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runtime_refuses_to_start_an_id_past_the_age_limit() {
        let config = config(HOUR_MS);
        let (handle, _task) = runtime::start(
            Arc::new(MemLog::new()),
            Arc::new(GrpcTransport::new()),
            config,
        )
        .unwrap();
        let stale = id_at(unix_now_ms() - 2 * HOUR_MS, 9);
        let answer = handle
            .execute(runtime::ExecuteRequest {
                txn: stale.clone(),
                branches: vec![crate::engine::types::BranchSpec {
                    target: target(),
                    payload: b"x".to_vec(),
                }],
                fingerprint: [9; 32],
                timeout_ms: 1_000,
                trace: None,
            })
            .await;
        assert!(
            matches!(answer, Err(CoordinatorError::InvalidArgument(_))),
            "{stale}: {answer:?}"
        );
    }
}
