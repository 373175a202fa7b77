//! The daemon's stop: on SIGTERM it stops accepting, lets the calls in progress finish
//! within the grace period, flushes and exits 0; calls still open when the grace period ends
//! are cut off, and what they started resumes at the next start.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_tests::scripted_participant::ScriptedParticipant;
use tandem_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_progress_finish_within_the_grace_period_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator =
        Node::coordinator_with_args(dir.path(), &["--shutdown-grace-ms", "8000"], None).await;
    let participant = ScriptedParticipant::start(Duration::from_millis(1_500)).await;
    let addr = coordinator.addr();
    let client = raw_coordinator(&addr).await;

    let txns: Vec<String> = (0..8).map(|_| fresh_id()).collect();
    let calls: Vec<_> = txns
        .iter()
        .map(|txn| {
            let mut client = client.clone();
            let request = participant.execute_request(txn);
            tokio::spawn(async move { client.execute2pc(request).await })
        })
        .collect();
    // Every prepare is being held when the signal arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    while participant.received().prepares.len() < txns.len() {
        assert!(Instant::now() < deadline, "prepares never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    let status = coordinator
        .terminate(Duration::from_secs(20))
        .await
        .expect("the coordinator exits after SIGTERM");
    assert!(status.success(), "a graceful stop exits 0, not {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "it stopped as soon as its calls were done ({:?}), well within the grace period",
        signalled.elapsed()
    );
    for (txn, call) in txns.iter().zip(calls) {
        let answer = call
            .await
            .unwrap()
            .unwrap_or_else(|status| {
                panic!("{txn}: a call in progress at SIGTERM finishes, but got {status:?}")
            })
            .into_inner();
        assert_eq!(
            answer.outcome,
            pb::Outcome::Committed as i32,
            "{txn}: {answer:?}"
        );
    }

    // The outcomes it answered are durable: after a restart each reads back committed.
    coordinator.start(None).await;
    let mut client = raw_coordinator(&coordinator.addr()).await;
    for txn in &txns {
        let status = client
            .get_transaction(pb::GetTransactionRequest {
                txn_id: txn.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            status.phase == pb::TxnPhase::Committed as i32
                || status.phase == pb::TxnPhase::Committing as i32,
            "{txn} after the restart: {status:?}"
        );
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_longer_than_the_grace_period_are_cut_off_and_their_work_resumes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator =
        Node::coordinator_with_args(dir.path(), &["--shutdown-grace-ms", "300"], None).await;
    // Held far longer than the grace period.
    let participant = ScriptedParticipant::start(Duration::from_secs(4)).await;
    let addr = coordinator.addr();
    let client = raw_coordinator(&addr).await;

    let txn = fresh_id();
    let call = {
        let mut client = client.clone();
        let request = participant.execute_request(&txn);
        tokio::spawn(async move { client.execute2pc(request).await })
    };
    let mut saga_client = client.clone();
    let saga = saga_client
        .submit_saga(participant.one_step_saga("", "slow"))
        .await
        .expect("the saga is accepted")
        .into_inner()
        .saga_id;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = participant.received();
        if received.prepares.contains_key(&txn) && received.acts.contains_key(&saga) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the work never reached the participant"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    let status = coordinator
        .terminate(Duration::from_secs(20))
        .await
        .expect("the coordinator exits after SIGTERM");
    assert!(
        status.success(),
        "a stop after the grace period still exits 0, not {status}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "the open calls were cut off after the grace period, not waited for ({:?})",
        signalled.elapsed()
    );
    let cut_off = call.await.unwrap().expect_err("the open call was cut off");
    assert!(
        matches!(
            cut_off.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "the client learns that the outcome is unknown to it: {cut_off:?}"
    );

    // Restart: the transaction resumes (it was undecided, so recovery aborts it and tells
    // the participant), the saga resumes and completes.
    coordinator.start(None).await;
    let mut client = raw_coordinator(&coordinator.addr()).await;
    let outcome = client
        .execute2pc(participant.execute_request(&txn))
        .await
        .expect("a retry with the same id learns the outcome")
        .into_inner();
    assert_eq!(
        outcome.outcome,
        pb::Outcome::Aborted as i32,
        "an undecided transaction is aborted by recovery: {outcome:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !participant.received().aborts.contains_key(&txn) {
        assert!(
            Instant::now() < deadline,
            "the participant was never told to abort {txn}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = client
        .wait_saga(pb::WaitSagaRequest {
            saga_id: saga.clone(),
            timeout_ms: 30_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state.phase,
        pb::SagaPhase::Completed as i32,
        "the saga resumed after the restart and completed: {state:?}"
    );
    coordinator.stop().await;
}
