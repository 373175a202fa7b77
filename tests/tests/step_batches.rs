//! The coordinator's gRPC transport batches saga step calls per participant: concurrent calls
//! to one participant travel in fewer RPCs than calls, each caller still gets its own answer
//! and its own timeout, and a participant without batches (UNIMPLEMENTED) gets unary calls.
//!
//! The participant is the scripted one (`tandem_tests::scripted_participant`), which counts
//! the batch RPCs it serves and answers each action as its payload scripts it; the transport
//! is called directly, as the coordinator's runtime calls it.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tandem_common::TxnId;
use tandem_coordinator::engine::saga::ActionAnswer;
use tandem_coordinator::engine::types::BranchTarget;
use tandem_coordinator::transport::{
    GrpcTransport, ParticipantTransport, StepCall, TransportError, STEP_BATCHES_IN_FLIGHT,
};
use tandem_tests::scripted_participant::ScriptedParticipant;

/// A step of saga number `n` at `participant`, with `payload` scripting its answer.
fn call(participant: &ScriptedParticipant, n: usize, payload: &str, timeout: Duration) -> StepCall {
    StepCall {
        saga: TxnId::parse(&format!("1763850000000-batch{n}")).unwrap(),
        step: 0,
        step_name: format!("step{n}"),
        target: BranchTarget {
            participant: format!("http://{}", participant.address()),
            resource: "scripted".into(),
        },
        payload: payload.as_bytes().to_vec(),
        timeout,
        trace: None,
    }
}

/// Payload of call `n`: every third fails for a business reason, every fifth is refused with
/// an error status, the rest succeed.
fn scripted_payload(n: usize) -> String {
    if n % 5 == 4 {
        format!("refuse:no way {n}")
    } else if n % 3 == 2 {
        format!("fail:reason {n}")
    } else {
        "ok".to_string()
    }
}

/// What call `n` must answer, as the unary call would.
fn expected(participant: &ScriptedParticipant, n: usize) -> Result<ActionAnswer, String> {
    if n % 5 == 4 {
        Err(format!(
            "http://{}: FailedPrecondition: no way {n}",
            participant.address()
        ))
    } else if n % 3 == 2 {
        Ok(ActionAnswer::Failed {
            reason: format!("reason {n}"),
        })
    } else {
        Ok(ActionAnswer::Succeeded)
    }
}

fn text(answer: Result<ActionAnswer, TransportError>) -> Result<ActionAnswer, String> {
    answer.map_err(|e| e.0)
}

const CALLS: usize = 40;
const LONG: Duration = Duration::from_secs(20);

/// Sends [`CALLS`] actions at once, each scripted by [`scripted_payload`], and checks that
/// each caller got its own answer.
async fn act_concurrently(transport: &GrpcTransport, participant: &ScriptedParticipant) {
    let answers = join_all(
        (0..CALLS).map(|n| transport.act(call(participant, n, &scripted_payload(n), LONG))),
    )
    .await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(text(answer), expected(participant, n), "call {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_step_calls_to_one_participant_share_batch_rpcs_and_get_their_own_answers() {
    let participant = ScriptedParticipant::start(Duration::from_millis(200)).await;
    let transport = GrpcTransport::new();
    act_concurrently(&transport, &participant).await;
    let compensations =
        join_all((0..CALLS).map(|n| transport.compensate(call(&participant, n, "undo", LONG))))
            .await;
    for (n, answer) in compensations.into_iter().enumerate() {
        assert!(answer.is_ok(), "compensation {n}: {answer:?}");
    }

    let received = participant.received();
    eprintln!(
        "action batches: {:?}\ncompensation batches: {:?}",
        received
            .act_batches
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        received
            .compensate_batches
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        received.acts.len(),
        CALLS,
        "every action arrived: {received:?}"
    );
    assert!(received.acts.values().all(|n| *n == 1), "{received:?}");
    assert!(
        received.compensations.values().all(|n| *n == 1),
        "{received:?}"
    );
    let items: usize = received.act_batches.iter().map(Vec::len).sum();
    assert_eq!(items, CALLS, "every action went in a batch: {received:?}");
    assert!(
        received.act_batches.len() < CALLS / 2,
        "{CALLS} concurrent actions took {} batch RPCs",
        received.act_batches.len()
    );
    let items: usize = received.compensate_batches.iter().map(Vec::len).sum();
    assert_eq!(
        items, CALLS,
        "every compensation went in a batch: {received:?}"
    );
    assert!(
        received.compensate_batches.len() < CALLS,
        "{CALLS} concurrent compensations took {} batch RPCs",
        received.compensate_batches.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_call_alone_goes_out_at_once_in_a_batch_of_one() {
    let participant = ScriptedParticipant::start(Duration::ZERO).await;
    let transport = GrpcTransport::new();
    for n in 0..3 {
        let started = Instant::now();
        let answer = transport.act(call(&participant, n, "ok", LONG)).await;
        assert_eq!(text(answer), Ok(ActionAnswer::Succeeded), "call {n}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "call {n} waited"
        );
    }
    let received = participant.received();
    assert_eq!(
        received.act_batches,
        (0..3)
            .map(|n| vec![format!("1763850000000-batch{n}")])
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timing_out_in_a_batch_fails_alone_with_its_own_timeout() {
    let hold = Duration::from_millis(2_000);
    let participant = ScriptedParticipant::start(hold).await;
    let transport = std::sync::Arc::new(GrpcTransport::new());
    // Fill every batch slot, so that the next two calls queue and leave together. One filler
    // at a time, each seen arriving in a batch of its own: fillers started together may share
    // one batch (a sender takes everything queued), which leaves slots free.
    let mut fillers = Vec::new();
    for n in 0..STEP_BATCHES_IN_FLIGHT {
        fillers.push(tokio::spawn(transport.act(call(
            &participant,
            n,
            "ok",
            LONG,
        ))));
        let deadline = Instant::now() + Duration::from_secs(10);
        while participant.received().act_batches.len() <= n {
            assert!(
                Instant::now() < deadline,
                "filler {n} did not reach the participant within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let short = Duration::from_millis(2_500);
    let (impatient, patient) = (STEP_BATCHES_IN_FLIGHT, STEP_BATCHES_IN_FLIGHT + 1);
    let started = Instant::now();
    let impatient_answer = tokio::spawn(transport.act(call(&participant, impatient, "ok", short)));
    let patient_answer = tokio::spawn(transport.act(call(&participant, patient, "ok", LONG)));

    let impatient_answer = impatient_answer.await.unwrap();
    let waited = started.elapsed();
    assert_eq!(
        text(impatient_answer),
        Err(format!(
            "http://{}: action timed out after {short:?}",
            participant.address()
        ))
    );
    assert!(
        waited < hold * 2,
        "the timed-out call waited for its batch: {waited:?}"
    );
    assert_eq!(
        text(patient_answer.await.unwrap()),
        Ok(ActionAnswer::Succeeded)
    );
    for filler in fillers {
        assert_eq!(text(filler.await.unwrap()), Ok(ActionAnswer::Succeeded));
    }
    let received = participant.received();
    let together = received.act_batches.iter().any(|batch| {
        batch.contains(&format!("1763850000000-batch{impatient}"))
            && batch.contains(&format!("1763850000000-batch{patient}"))
    });
    assert!(
        together,
        "the two calls were meant to share a batch: {:?}",
        received.act_batches
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_without_batches_gets_unary_calls_with_the_same_answers() {
    let participant = ScriptedParticipant::start_without_batches(Duration::from_millis(100)).await;
    let transport = GrpcTransport::new();
    act_concurrently(&transport, &participant).await;
    let refused = participant.received().refused_batches;
    assert!(
        (1..=STEP_BATCHES_IN_FLIGHT as u32).contains(&refused),
        "batches tried before falling back: {refused}"
    );
    // Remembered: later calls, actions and compensations, go unary at once.
    let answer = transport.act(call(&participant, CALLS, "ok", LONG)).await;
    assert_eq!(text(answer), Ok(ActionAnswer::Succeeded));
    join_all((0..4).map(|n| transport.compensate(call(&participant, n, "undo", LONG))))
        .await
        .into_iter()
        .for_each(|answer| assert!(answer.is_ok(), "{answer:?}"));
    let received = participant.received();
    assert_eq!(received.refused_batches, refused, "a batch was tried again");
    assert_eq!(received.acts.len(), CALLS + 1, "{received:?}");
    assert!(received.acts.values().all(|n| *n == 1), "{received:?}");
    assert_eq!(received.compensations.len(), 4, "{received:?}");
    assert!(received.act_batches.is_empty() && received.compensate_batches.is_empty());
}
