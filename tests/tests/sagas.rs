//! End-to-end sagas with real processes on loopback: a coordinator and bank participants, each
//! on its own temp folder and OS-assigned port.
//!
//! Each test asserts what a user would check: the outcome `wait` reports, the changes `watch`
//! streams, the callbacks a service received, and the balances on disk once the banks stopped
//! (both transfers' effects or none; money conserved).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tandem_participant::client::{RetryPolicy, Saga, Step};
use tandem_participant::{bank, SagaChangeKind, SagaOutcome, SagaState, TandemClient, TxnId};
use tandem_proto::v1 as pb;
use tandem_tests::*;

const BANK_A: &str = "alice=100,bob=50";
const BANK_B: &str = "carol=10,dave=0";
const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    dir: tempfile::TempDir,
    coordinator: Node,
    a: Node,
    b: Node,
}

impl Cluster {
    async fn start(coordinator_crash: Option<&str>, bank_a_crash: Option<&str>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let coordinator =
            Node::coordinator(&dir.path().join("coordinator"), coordinator_crash).await;
        let a = Node::bank("bank-a", &dir.path().join("bank-a"), BANK_A, bank_a_crash).await;
        let b = Node::bank("bank-b", &dir.path().join("bank-b"), BANK_B, None).await;
        Cluster {
            dir,
            coordinator,
            a,
            b,
        }
    }

    async fn stop_banks(&mut self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
        self.a.stop().await;
        self.b.stop().await;
        (self.a.balances(), self.b.balances())
    }

    /// A saga moving `amount` from alice (bank A) to `to` at bank B, retrying every action
    /// for long enough to outlive a participant's restart.
    fn alice_pays(&self, to: &str, amount: i64) -> Saga {
        let patient = RetryPolicy {
            initial_delay_ms: 50,
            multiplier: 2.0,
            max_delay_ms: 500,
            max_attempts: 400,
            deadline_ms: 0,
        };
        let steps =
            bank::transfer_saga_steps((&self.a.addr(), "alice"), (&self.b.addr(), to), amount)
                .into_iter()
                .map(|step| step.retry(patient));
        Saga::sequence(steps)
    }
}

fn original() -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    (
        BTreeMap::from([("alice".into(), 100), ("bob".into(), 50)]),
        BTreeMap::from([("carol".into(), 10), ("dave".into(), 0)]),
    )
}

fn after_alice_paid_carol(amount: i64) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let (mut a, mut b) = original();
    *a.get_mut("alice").unwrap() -= amount;
    *b.get_mut("carol").unwrap() += amount;
    (a, b)
}

async fn wait_terminal(client: &TandemClient, saga: &TxnId) -> SagaState {
    let state = client
        .wait(saga, WAIT)
        .await
        .unwrap_or_else(|e| panic!("waiting for {saga}: {e}"));
    assert!(
        state.terminal,
        "saga {saga} not terminal after {WAIT:?}: {state:?}"
    );
    state
}

/// Submits with the same id until the coordinator answers (it may be restarting).
async fn submit_until_accepted(addr: &str, saga: Saga) -> TxnId {
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let client = client(addr).await;
        match client.submit_saga(saga.clone()).await {
            Ok(id) => return id,
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("submitting {:?}: {e}", saga.saga_id()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_transfer_completes_and_moves_the_money() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let saga = client
        .submit_saga(cluster.alice_pays("carol", 30))
        .await
        .unwrap();
    let state = wait_terminal(&client, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    let got = client.get_saga(&saga).await.unwrap();
    assert_eq!(got.steps.len(), 2);
    assert!(got.steps.iter().all(|s| s.action_attempts == 1), "{got:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_credit_compensates_the_debit_and_restores_the_balances() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let saga = client
        .submit_saga(cluster.alice_pays("mallory", 30))
        .await
        .unwrap();
    let state = wait_terminal(&client, &saga).await;
    match state.outcome() {
        Some(SagaOutcome::Compensated {
            failed_step,
            reason,
        }) => {
            assert_eq!(failed_step, "credit");
            assert!(reason.contains("mallory"), "reason {reason:?}");
        }
        other => panic!("expected a compensated saga, got {other:?}: {state:?}"),
    }
    assert_eq!(cluster.stop_banks().await, original());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_waits_for_a_participant_that_is_down_and_completes_when_it_returns() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    cluster.b.kill().await;
    let saga = client
        .submit_saga(cluster.alice_pays("carol", 30))
        .await
        .unwrap();
    // The credit keeps failing to reach bank B: still running, retried, not compensated.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = client.get_saga(&saga).await.unwrap();
    assert!(!state.terminal, "{state:?}");
    let credit = &state.steps[1];
    assert!(
        credit.action_attempts >= 2,
        "the credit was retried: {state:?}"
    );
    assert!(
        !credit.last_error.is_empty(),
        "the credit's last error is visible: {state:?}"
    );
    cluster.b.start(None).await;
    let state = wait_terminal(&client, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_after_saga_accepted_then_restart_runs_it_to_completion() {
    let point = "coordinator.after_saga_accepted";
    let mut cluster = Cluster::start(Some(point), None).await;
    let saga = cluster
        .alice_pays("carol", 30)
        .id(TandemClient::new_txn_id());
    let id = saga.saga_id().unwrap().clone();
    let addr = cluster.coordinator.addr();
    let submit = tokio::spawn(async move {
        let client = client(&addr).await;
        client.submit_saga(saga).await
    });
    cluster.coordinator.expect_crash(point).await;
    assert!(
        submit.await.unwrap().is_err(),
        "the submitter never heard \"accepted\""
    );
    cluster.coordinator.start(None).await;
    // The saga was durable: it runs after the restart, and re-submitting is idempotent.
    let again = submit_until_accepted(
        &cluster.coordinator.addr(),
        cluster.alice_pays("carol", 30).id(id.clone()),
    )
    .await;
    assert_eq!(again, id);
    let client = client(&cluster.coordinator.addr()).await;
    let state = wait_terminal(&client, &id).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_before_a_step_is_recorded_then_restart_applies_it_once() {
    let point = "coordinator.before_step_recorded";
    let mut cluster = Cluster::start(Some(point), None).await;
    let client_a = client(&cluster.coordinator.addr()).await;
    let saga = client_a
        .submit_saga(cluster.alice_pays("carol", 30))
        .await
        .unwrap();
    cluster.coordinator.expect_crash(point).await;
    cluster.coordinator.start(None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let state = wait_terminal(&client, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    // The debit was re-sent after the restart; the barrier answered it without debiting twice.
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_crash_after_its_action_applied_then_restart_completes_once() {
    let point = "participant.after_action_applied";
    let mut cluster = Cluster::start(None, Some(point)).await;
    let client = client(&cluster.coordinator.addr()).await;
    let saga = client
        .submit_saga(cluster.alice_pays("carol", 30))
        .await
        .unwrap();
    cluster.a.expect_crash(point).await;
    cluster.a.start(None).await;
    let state = wait_terminal(&client, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_during_compensation_then_restart_finishes_compensating() {
    let point = "coordinator.during_compensation";
    let mut cluster = Cluster::start(Some(point), None).await;
    let client_a = client(&cluster.coordinator.addr()).await;
    let saga = client_a
        .submit_saga(cluster.alice_pays("mallory", 30))
        .await
        .unwrap();
    cluster.coordinator.expect_crash(point).await;
    cluster.coordinator.start(None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let state = wait_terminal(&client, &saga).await;
    assert!(
        matches!(state.outcome(), Some(SagaOutcome::Compensated { ref failed_step, .. }) if failed_step == "credit"),
        "{state:?}"
    );
    assert_eq!(cluster.stop_banks().await, original());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_change_in_order_and_ends_with_the_outcome() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    for (to, completed) in [("carol", true), ("mallory", false)] {
        let saga = client.submit_saga(cluster.alice_pays(to, 5)).await.unwrap();
        let mut changes = client.watch(&saga).await.unwrap();
        let mut seen = Vec::new();
        while let Some(change) = tokio::time::timeout(WAIT, changes.next())
            .await
            .expect("watch stalled")
        {
            seen.push(change.unwrap());
        }
        let seqs: Vec<u64> = seen.iter().map(|c| c.seq).collect();
        assert_eq!(
            seqs,
            (1..=seen.len() as u64).collect::<Vec<_>>(),
            "{saga}: {seen:#?}"
        );
        let kinds: Vec<(SagaChangeKind, String)> =
            seen.iter().map(|c| (c.kind, c.step.clone())).collect();
        let k = |kind, step: &str| (kind, step.to_string());
        let expected = if completed {
            vec![
                k(SagaChangeKind::Accepted, ""),
                k(SagaChangeKind::StepStarted, "debit"),
                k(SagaChangeKind::StepSucceeded, "debit"),
                k(SagaChangeKind::StepStarted, "credit"),
                k(SagaChangeKind::StepSucceeded, "credit"),
                k(SagaChangeKind::Finished, ""),
            ]
        } else {
            vec![
                k(SagaChangeKind::Accepted, ""),
                k(SagaChangeKind::StepStarted, "debit"),
                k(SagaChangeKind::StepSucceeded, "debit"),
                k(SagaChangeKind::StepStarted, "credit"),
                k(SagaChangeKind::StepFailed, "credit"),
                k(SagaChangeKind::CompensationStarted, ""),
                k(SagaChangeKind::CompensationStarted, "credit"),
                k(SagaChangeKind::StepCompensated, "credit"),
                k(SagaChangeKind::CompensationStarted, "debit"),
                k(SagaChangeKind::StepCompensated, "debit"),
                k(SagaChangeKind::Finished, ""),
            ]
        };
        assert_eq!(kinds, expected, "{saga}: {seen:#?}");
        let last = seen
            .last()
            .unwrap()
            .outcome
            .as_ref()
            .expect("FINISHED carries the final state");
        assert!(last.terminal);
        assert_eq!(
            matches!(last.outcome(), Some(SagaOutcome::Completed)),
            completed,
            "{last:?}"
        );
    }
    let (a, b) = cluster.stop_banks().await;
    assert_eq!((a, b), after_alice_paid_carol(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_is_delivered_once_even_when_the_coordinator_restarts_before_it_is_acknowledged() {
    let mut cluster = Cluster::start(None, None).await;
    let mut callbacks =
        Node::bank("bank-c", &cluster.dir.path().join("bank-c"), "erin=0", None).await;
    let callback_addr = callbacks.addr();
    callbacks.kill().await;
    let client_a = client(&cluster.coordinator.addr()).await;
    let saga = client_a
        .submit_saga(
            cluster
                .alice_pays("carol", 30)
                .callback(callback_addr, bank::CALLBACK),
        )
        .await
        .unwrap();
    let state = wait_terminal(&client_a, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed));
    assert!(!state.callback_delivered, "the callback's service is down");
    // The coordinator restarts while the callback is still owed; then the service returns.
    cluster.coordinator.kill().await;
    cluster.coordinator.start(None).await;
    callbacks.start(None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let state = client.get_saga(&saga).await.unwrap();
        if state.callback_delivered {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "callback never acknowledged: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    callbacks.stop().await;
    let received = bank::saga_callbacks_in(&callbacks.dir).unwrap();
    let got = received
        .get(saga.as_str())
        .unwrap_or_else(|| panic!("no callback for {saga}: {received:?}"));
    assert_eq!(got.calls, 1, "the handler ran exactly once");
    assert_eq!(got.outcome.outcome(), Some(SagaOutcome::Completed));
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_saga_transfers_all_terminate_and_conserve_money() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let accounts = [
        (&cluster.a, "alice"),
        (&cluster.a, "bob"),
        (&cluster.b, "carol"),
        (&cluster.b, "dave"),
    ];
    let mut rng = tandem_common::SplitMix64::new(0x5a9a);
    let mut sagas = Vec::new();
    for _ in 0..1000 {
        let from = accounts[(rng.next_u64() % 4) as usize];
        let mut to = accounts[(rng.next_u64() % 4) as usize];
        if to.1 == from.1 {
            to = accounts[(accounts.iter().position(|a| a.1 == from.1).unwrap() + 1) % 4];
        }
        let amount = 1 + (rng.next_u64() % 40) as i64;
        let saga = bank::transfer_saga((&from.0.addr(), from.1), (&to.0.addr(), to.1), amount);
        let client = client.clone();
        sagas.push(tokio::spawn(async move {
            let id = client.submit_saga(saga).await?;
            client.wait(&id, WAIT).await
        }));
    }
    let (mut completed, mut compensated) = (0, 0);
    for saga in sagas {
        let state = saga
            .await
            .unwrap()
            .expect("every saga is accepted and answers");
        match state.outcome() {
            Some(SagaOutcome::Completed) => completed += 1,
            Some(SagaOutcome::Compensated { .. }) => compensated += 1,
            other => panic!("saga {} did not terminate: {other:?} {state:?}", state.id),
        }
    }
    assert_eq!(completed + compensated, 1000);
    assert!(
        completed > 0 && compensated > 0,
        "completed {completed}, compensated {compensated}"
    );
    let (a, b) = cluster.stop_banks().await;
    assert_eq!(total(&[&a, &b]), 160, "money conserved: {a:?} {b:?}");
    assert!(
        a.values().chain(b.values()).all(|&v| v >= 0),
        "no negative balance: {a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sagas_are_refused_with_invalid_argument_and_ids_are_idempotent() {
    let cluster = Cluster::start(None, None).await;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(format!(
        "http://{}",
        cluster.coordinator.addr()
    ))
    .await
    .unwrap();
    let step = |name: &str, after: &[&str]| pb::SagaStep {
        name: name.into(),
        participant: cluster.a.addr(),
        resource: bank::SAGA_STEP.into(),
        action: b"{}".to_vec(),
        compensation: b"{}".to_vec(),
        after: after.iter().map(|s| s.to_string()).collect(),
        retry: None,
        timeout_ms: 0,
    };
    let cases: Vec<(&str, pb::SubmitSagaRequest, &str)> = vec![
        (
            "no steps",
            pb::SubmitSagaRequest {
                steps: vec![],
                ..Default::default()
            },
            "at least one step",
        ),
        (
            "too many steps",
            pb::SubmitSagaRequest {
                steps: (0..33).map(|i| step(&format!("s{i}"), &[])).collect(),
                ..Default::default()
            },
            "at most 32",
        ),
        (
            "duplicate names",
            pb::SubmitSagaRequest {
                steps: vec![step("a", &[]), step("a", &[])],
                ..Default::default()
            },
            "used twice",
        ),
        (
            "unknown dependency",
            pb::SubmitSagaRequest {
                steps: vec![step("a", &["zz"])],
                ..Default::default()
            },
            "not a step",
        ),
        (
            "cycle",
            pb::SubmitSagaRequest {
                steps: vec![step("a", &["b"]), step("b", &["a"])],
                ..Default::default()
            },
            "cycle",
        ),
        (
            "after in a sequence",
            pb::SubmitSagaRequest {
                steps: vec![step("a", &[]), step("b", &["a"])],
                sequential: true,
                ..Default::default()
            },
            "must be empty",
        ),
        (
            "oversized payload",
            pb::SubmitSagaRequest {
                steps: vec![pb::SagaStep {
                    action: vec![0; 64 * 1024 + 1],
                    ..step("a", &[])
                }],
                ..Default::default()
            },
            "at most 65536",
        ),
        (
            "bad retry policy",
            pb::SubmitSagaRequest {
                steps: vec![pb::SagaStep {
                    retry: Some(pb::RetryPolicy {
                        multiplier: 0.5,
                        ..Default::default()
                    }),
                    ..step("a", &[])
                }],
                ..Default::default()
            },
            "multiplier",
        ),
        (
            "malformed id",
            pb::SubmitSagaRequest {
                saga_id: "not an id".into(),
                steps: vec![step("a", &[])],
                ..Default::default()
            },
            "",
        ),
    ];
    for (what, request, message) in cases {
        let status = raw.submit_saga(request).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(message),
            "{what}: {:?} lacks {message:?}",
            status.message()
        );
    }
    // The same id with the same content is the same saga; with other content it is refused.
    let id = TandemClient::new_txn_id().to_string();
    let request = pb::SubmitSagaRequest {
        saga_id: id.clone(),
        steps: vec![step("a", &[])],
        ..Default::default()
    };
    let first = raw.submit_saga(request.clone()).await.unwrap().into_inner();
    let again = raw.submit_saga(request.clone()).await.unwrap().into_inner();
    assert_eq!(
        (first.saga_id.as_str(), again.saga_id.as_str()),
        (id.as_str(), id.as_str())
    );
    let other = pb::SubmitSagaRequest {
        steps: vec![step("b", &[])],
        ..request
    };
    let status = raw.submit_saga(other).await.expect_err("different content");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    // Unknown sagas are NOT_FOUND for get, wait and watch.
    let unknown = TandemClient::new_txn_id().to_string();
    let status = raw
        .get_saga(pb::GetSagaRequest {
            saga_id: unknown.clone(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = raw
        .wait_saga(pb::WaitSagaRequest {
            saga_id: unknown.clone(),
            timeout_ms: 10,
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = match raw
        .watch_saga(pb::WatchSagaRequest { saga_id: unknown })
        .await
    {
        Ok(_) => panic!("watching an unknown saga succeeded"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_submissions_answers_each_saga_as_a_single_submission_would() {
    use pb::submit_saga_result::Result::{Error, SagaId};
    let mut cluster = Cluster::start(None, None).await;
    let mut raw = raw_coordinator(&cluster.coordinator.addr()).await;
    let op_step = |name: &str, at: String, action: bank::BankOp, undo: bank::BankOp| pb::SagaStep {
        name: name.into(),
        participant: at,
        resource: bank::SAGA_STEP.into(),
        action: action.encode(),
        compensation: undo.encode(),
        after: vec![],
        retry: None,
        timeout_ms: 0,
    };
    let (a, b) = (cluster.a.addr(), cluster.b.addr());
    let pays = |id: &str, amount: i64| pb::SubmitSagaRequest {
        saga_id: id.into(),
        steps: vec![
            op_step(
                "debit",
                a.clone(),
                bank::BankOp::Debit {
                    account: "alice".into(),
                    amount,
                },
                bank::BankOp::Credit {
                    account: "alice".into(),
                    amount,
                },
            ),
            op_step(
                "credit",
                b.clone(),
                bank::BankOp::Credit {
                    account: "carol".into(),
                    amount,
                },
                bank::BankOp::Debit {
                    account: "carol".into(),
                    amount,
                },
            ),
        ],
        sequential: true,
        ..Default::default()
    };
    let batch = |sagas| pb::SubmitSagasRequest { sagas };
    let (first, malformed) = (fresh_id(), fresh_id());
    let no_steps = pb::SubmitSagaRequest {
        saga_id: malformed.clone(),
        sequential: true,
        ..Default::default()
    };
    let answers = raw
        .submit_sagas(batch(vec![pays(&first, 30), no_steps]))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].result, Some(SagaId(first.clone())));
    match &answers[1].result {
        Some(Error(e)) => {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
            assert!(e.message.contains("at least one step"), "{e:?}");
        }
        other => panic!("a saga without steps was answered {other:?}"),
    }
    // As single submissions: the same content again is the same saga, other content under
    // its id is refused.
    let again = raw
        .submit_sagas(batch(vec![pays(&first, 30), pays(&first, 31)]))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(again[0].result, Some(SagaId(first.clone())));
    assert!(
        matches!(&again[1].result, Some(Error(e)) if e.code == tonic::Code::AlreadyExists as i32),
        "{again:?}"
    );
    // A malformed call is refused as a whole.
    for (what, sagas) in [
        ("no sagas", vec![]),
        (
            "513 sagas",
            (0..513).map(|_| pays(&fresh_id(), 1)).collect(),
        ),
    ] {
        let refused = raw.submit_sagas(batch(sagas)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{what}: {refused:?}"
        );
    }
    let missing = raw
        .get_saga(pb::GetSagaRequest { saga_id: malformed })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        tonic::Code::NotFound,
        "the refused saga left nothing"
    );
    let client = client(&cluster.coordinator.addr()).await;
    let state = wait_terminal(&client, &TxnId::parse(&first).unwrap()).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_stream_answers_each_id_once_its_saga_is_terminal_or_with_its_error() {
    use pb::wait_saga_result::Result::{Error, State};
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let paid = client
        .submit_saga(cluster.alice_pays("carol", 30))
        .await
        .unwrap();
    let refused = client
        .submit_saga(cluster.alice_pays("mallory", 5)) // bank B refuses credits to mallory
        .await
        .unwrap();
    let mut raw = raw_coordinator(&cluster.coordinator.addr()).await;
    let (ids, requests) = futures::channel::mpsc::unbounded();
    let unknown = fresh_id();
    ids.unbounded_send(pb::WaitSagasRequest {
        saga_ids: vec![
            paid.to_string(),
            "not an id".into(),
            unknown.clone(),
            refused.to_string(),
        ],
    })
    .unwrap();
    let mut answers = raw.wait_sagas(requests).await.unwrap().into_inner();
    let mut results = BTreeMap::new();
    while results.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(30), answers.message())
            .await
            .expect("every id is answered within 30 s")
            .unwrap()
            .expect("the stream stays open while the client's side is");
        for result in message.results {
            assert!(
                results
                    .insert(result.saga_id.clone(), result.result)
                    .is_none(),
                "{} answered twice",
                result.saga_id
            );
        }
    }
    let code = |id: &str| match &results[id] {
        Some(Error(e)) => tonic::Code::from(e.code),
        other => panic!("{id}: expected an error, got {other:?}"),
    };
    assert_eq!(code("not an id"), tonic::Code::InvalidArgument);
    assert_eq!(code(&unknown), tonic::Code::NotFound);
    let phase = |id: &TxnId| match &results[id.as_str()] {
        Some(State(state)) => {
            assert!(state.terminal, "{state:?}");
            pb::SagaPhase::try_from(state.phase).unwrap()
        }
        other => panic!("{id}: expected its state, got {other:?}"),
    };
    assert_eq!(phase(&paid), pb::SagaPhase::Completed);
    assert_eq!(phase(&refused), pb::SagaPhase::Compensated);

    // A message over the item limit ends the stream with INVALID_ARGUMENT.
    ids.unbounded_send(pb::WaitSagasRequest {
        saga_ids: (0..513).map(|_| fresh_id()).collect(),
    })
    .unwrap();
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_saga_runs_independent_steps_and_joins_before_the_last() {
    let mut cluster = Cluster::start(None, None).await;
    let client = client(&cluster.coordinator.addr()).await;
    let op = |op: &str, account: &str, amount: i64| {
        format!(r#"{{"op":"{op}","account":"{account}","amount":{amount}}}"#).into_bytes()
    };
    let (a, b) = (cluster.a.addr(), cluster.b.addr());
    // alice pays 10 to carol and 5 to dave at once; bob is paid 1 only once both credits
    // are done, from carol.
    let steps = vec![
        Step::new(
            "debit-alice",
            a.clone(),
            bank::SAGA_STEP,
            op("debit", "alice", 15),
            op("credit", "alice", 15),
        ),
        Step::new(
            "credit-carol",
            b.clone(),
            bank::SAGA_STEP,
            op("credit", "carol", 10),
            op("debit", "carol", 10),
        )
        .after(["debit-alice"]),
        Step::new(
            "credit-dave",
            b.clone(),
            bank::SAGA_STEP,
            op("credit", "dave", 5),
            op("debit", "dave", 5),
        )
        .after(["debit-alice"]),
        Step::new(
            "carol-to-bob",
            b.clone(),
            bank::SAGA_STEP,
            op("debit", "carol", 1),
            op("credit", "carol", 1),
        )
        .after(["credit-carol", "credit-dave"]),
        Step::new(
            "bob-from-carol",
            a.clone(),
            bank::SAGA_STEP,
            op("credit", "bob", 1),
            op("debit", "bob", 1),
        )
        .after(["carol-to-bob"]),
    ];
    let saga = client.submit_saga(Saga::graph(steps)).await.unwrap();
    let state = wait_terminal(&client, &saga).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    let mut changes = client.watch(&saga).await.unwrap();
    let mut succeeded = Vec::new();
    while let Some(change) = tokio::time::timeout(WAIT, changes.next())
        .await
        .expect("watch stalled")
    {
        let change = change.unwrap();
        if change.kind == SagaChangeKind::StepSucceeded {
            succeeded.push(change.step);
        }
    }
    let at = |name: &str| {
        succeeded
            .iter()
            .position(|s| s == name)
            .unwrap_or_else(|| panic!("{name} never succeeded: {succeeded:?}"))
    };
    assert_eq!(at("debit-alice"), 0, "{succeeded:?}");
    assert!(
        at("carol-to-bob") > at("credit-carol").max(at("credit-dave")),
        "{succeeded:?}"
    );
    assert_eq!(at("bob-from-carol"), 4, "{succeeded:?}");
    let (a, b) = cluster.stop_banks().await;
    assert_eq!(
        a,
        BTreeMap::from([("alice".into(), 85), ("bob".into(), 51)])
    );
    assert_eq!(
        b,
        BTreeMap::from([("carol".into(), 19), ("dave".into(), 5)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_saga_transfer_prints_the_id_and_with_wait_the_outcome() {
    let mut cluster = Cluster::start(None, None).await;
    let run = |to: &'static str, wait: bool| {
        let mut command = tokio::process::Command::new(&binaries().bank);
        command
            .args([
                "transfer",
                "--saga",
                "--coordinator",
                &cluster.coordinator.addr(),
            ])
            .args([
                "--from",
                &format!("{}/alice", cluster.a.addr()),
                "--to",
                &format!("{}/{to}", cluster.b.addr()),
            ])
            .args(["--amount", "10"]);
        if wait {
            command.arg("--wait");
        }
        command.output()
    };
    let output = run("carol", true).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("accepted "))
        .unwrap_or_else(|| panic!("{stdout:?}"));
    TxnId::parse(id).expect("the CLI prints the saga id first");
    assert!(stdout.contains(&format!("completed {id}")), "{stdout:?}");
    let output = run("mallory", true).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(
        output.status.code(),
        Some(1),
        "a compensated saga exits 1: {stdout}"
    );
    assert!(stdout.contains("compensated"), "{stdout:?}");
    // Without --wait it returns as soon as the saga is accepted.
    let output = run("carol", false).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let id = TxnId::parse(
        stdout
            .trim()
            .strip_prefix("accepted ")
            .unwrap_or_else(|| panic!("{stdout:?}")),
    )
    .unwrap();
    let client = client(&cluster.coordinator.addr()).await;
    assert_eq!(
        wait_terminal(&client, &id).await.outcome(),
        Some(SagaOutcome::Completed)
    );
    assert_eq!(cluster.stop_banks().await, after_alice_paid_carol(20));
}
