//! Admission control under ten times the load the coordinator admits: the work it accepts
//! completes, the rest is refused at once with RESOURCE_EXHAUSTED and a retry hint and leaves
//! nothing behind, memory stays bounded, and the daemon serves normally afterwards.
//!
//! The participant is a scripted one (`tandem_tests::scripted_participant`) that holds every
//! prepare and action for a while, so that the admitted work really is in flight when the
//! rest arrives.

use std::time::{Duration, Instant};

use tandem_participant::TxnId;
use tandem_proto::v1 as pb;
use tandem_tests::scripted_participant::ScriptedParticipant;
use tandem_tests::*;
use tonic::Code;
use tonic_types::StatusExt;

/// The bound the coordinator is started with, and ten times it as the load.
const BOUND: usize = 16;
const LOAD: usize = 10 * BOUND;
/// How long the participant holds each prepare and action.
const HOLD: Duration = Duration::from_millis(1_500);
/// The retry hint the coordinator is configured to give.
const RETRY_AFTER_MS: u64 = 250;

/// A refusal must be RESOURCE_EXHAUSTED with the configured retry hint as a RetryInfo.
fn assert_refused_with_hint(status: &tonic::Status, what: &str) {
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{what}: expected RESOURCE_EXHAUSTED, got {status:?}"
    );
    let hint = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    assert_eq!(
        hint,
        Some(Duration::from_millis(RETRY_AFTER_MS)),
        "{what}: the refusal carries the retry hint ({status:?})"
    );
}

async fn overloaded_coordinator(dir: &std::path::Path) -> Node {
    let bound = BOUND.to_string();
    let retry = RETRY_AFTER_MS.to_string();
    Node::coordinator_with_args(
        dir,
        &[
            "--txn-in-flight-max",
            &bound,
            "--saga-in-flight-max",
            &bound,
            "--overload-retry-after-ms",
            &retry,
        ],
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_2pc_bound_admits_the_bound_completes_it_and_refuses_the_rest_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = overloaded_coordinator(dir.path()).await;
    let participant = ScriptedParticipant::start(HOLD).await;
    let addr = coordinator.addr();
    let resident_before = coordinator.resident_kib();

    let client = raw_coordinator(&addr).await;
    let calls = (0..LOAD).map(|_| {
        let mut client = client.clone();
        let txn = fresh_id();
        let request = participant.execute_request(&txn);
        async move { (txn, client.execute2pc(request).await) }
    });
    let answers = futures::future::join_all(calls).await;

    let mut committed = Vec::new();
    let mut refused = Vec::new();
    for (txn, answer) in answers {
        match answer {
            Ok(answer) => {
                let answer = answer.into_inner();
                assert_eq!(
                    answer.outcome,
                    pb::Outcome::Committed as i32,
                    "{txn}: admitted work completes ({answer:?})"
                );
                committed.push(txn);
            }
            Err(status) => {
                assert_refused_with_hint(&status, &txn);
                refused.push(txn);
            }
        }
    }
    assert!(
        committed.len() >= BOUND && committed.len() < LOAD / 2,
        "about the bound ({BOUND}) is admitted out of {LOAD}: {} were",
        committed.len()
    );
    assert_eq!(committed.len() + refused.len(), LOAD);

    // Every admitted transaction reached the participant's commit; no refused one reached
    // the participant at all, nor the coordinator's log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = participant.received();
        if committed.iter().all(|t| received.commits.contains_key(t)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admitted transactions whose commit never arrived: {:?}",
            committed
                .iter()
                .filter(|t| !received.commits.contains_key(*t))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = participant.received();
    let mut client = client.clone();
    for txn in &refused {
        assert!(
            !received.prepares.contains_key(txn),
            "{txn} was refused yet prepared"
        );
        let status = client
            .get_transaction(pb::GetTransactionRequest {
                txn_id: txn.clone(),
            })
            .await
            .expect_err("a refused transaction is not in the log");
        assert_eq!(status.code(), Code::NotFound, "{txn}: {status:?}");
    }

    // Memory stayed bounded: the refused requests were not queued.
    let resident_after = coordinator.resident_kib();
    assert!(
        resident_after < resident_before + 64 * 1024,
        "the coordinator grew from {resident_before} KiB to {resident_after} KiB under {LOAD} requests"
    );

    // And it serves normally afterwards: a transaction is admitted and committed at once.
    let after = fresh_id();
    let started = Instant::now();
    let answer = client
        .execute2pc(participant.execute_request(&after))
        .await
        .expect("the coordinator serves normally after the overload")
        .into_inner();
    assert_eq!(answer.outcome, pb::Outcome::Committed as i32);
    assert!(started.elapsed() < HOLD + Duration::from_secs(3));
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_saga_bound_admits_the_bound_completes_it_and_refuses_the_rest_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = overloaded_coordinator(dir.path()).await;
    let participant = ScriptedParticipant::start(HOLD).await;
    let addr = coordinator.addr();

    let client = raw_coordinator(&addr).await;
    let submissions = (0..LOAD).map(|_| {
        let mut client = client.clone();
        let saga = fresh_id();
        let request = participant.one_step_saga(&saga, "only");
        async move { (saga, client.submit_saga(request).await) }
    });
    let answers = futures::future::join_all(submissions).await;
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (saga, answer) in answers {
        match answer {
            Ok(_) => accepted.push(saga),
            Err(status) => {
                assert_refused_with_hint(&status, &saga);
                refused.push(saga);
            }
        }
    }
    assert!(
        accepted.len() >= BOUND && accepted.len() < LOAD / 2,
        "about the bound ({BOUND}) is accepted out of {LOAD}: {} were",
        accepted.len()
    );

    let mut client = client.clone();
    for saga in &accepted {
        let state = client
            .wait_saga(pb::WaitSagaRequest {
                saga_id: saga.clone(),
                timeout_ms: 30_000,
            })
            .await
            .expect("an accepted saga is known")
            .into_inner();
        assert_eq!(
            state.phase,
            pb::SagaPhase::Completed as i32,
            "{saga}: every accepted saga completes ({state:?})"
        );
    }
    let received = participant.received();
    for saga in &refused {
        assert!(
            !received.acts.contains_key(saga),
            "{saga} was refused yet acted"
        );
        let status = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga.clone(),
            })
            .await
            .expect_err("a refused saga is not in the log");
        assert_eq!(status.code(), Code::NotFound, "{saga}: {status:?}");
    }

    // Serving normally afterwards: a new saga is accepted and completes.
    let after = client
        .submit_saga(participant.one_step_saga("", "after"))
        .await
        .expect("accepted after the overload")
        .into_inner()
        .saga_id;
    let state = client
        .wait_saga(pb::WaitSagaRequest {
            saga_id: after,
            timeout_ms: 30_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.phase, pb::SagaPhase::Completed as i32);
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_client_waits_out_the_retry_hint_and_gets_its_transaction_through() {
    let dir = tempfile::tempdir().unwrap();
    // One transaction at a time, held for a short while: the second client is refused at
    // first and gets through by retrying after the hint.
    let mut coordinator = Node::coordinator_with_args(
        dir.path(),
        &[
            "--txn-in-flight-max",
            "1",
            "--overload-retry-after-ms",
            "300",
        ],
        None,
    )
    .await;
    let participant = ScriptedParticipant::start(Duration::from_millis(400)).await;
    let branch = || tandem_participant::Branch {
        participant: participant.address(),
        resource: "scripted".into(),
        payload: b"x".to_vec(),
    };
    let mut first = client(&coordinator.addr()).await;
    let mut second = client(&coordinator.addr()).await;
    let now = tandem_common::unix_now_ms();
    let (a, b) = (TxnId::generate(now), TxnId::generate(now));
    let (first_outcome, second_outcome) =
        tokio::join!(first.execute_2pc_with(&a, vec![branch()], None), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            second.execute_2pc_with(&b, vec![branch()], None).await
        });
    assert_eq!(
        first_outcome.unwrap(),
        tandem_participant::Outcome::Committed
    );
    assert_eq!(
        second_outcome.expect("the SDK retried after the hint"),
        tandem_participant::Outcome::Committed
    );
    coordinator.stop().await;
}
