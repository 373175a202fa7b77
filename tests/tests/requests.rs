//! End-to-end checks of the coordinator's edge: malformed requests are refused with the right
//! gRPC status and change nothing; a retry with the same id returns the same outcome; the same
//! id with different branches is ALREADY_EXISTS.

use std::collections::BTreeMap;

use tandem_participant::{bank, Branch, Outcome, TandemClient};
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::Code;

async fn raw_client(
    addr: &str,
) -> pb::coordinator_client::CoordinatorClient<tonic::transport::Channel> {
    pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn branch(participant: &str, payload: Vec<u8>) -> pb::Branch {
    pb::Branch {
        participant: participant.into(),
        resource: "bank".into(),
        payload,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_invalid_argument_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut bank_node = Node::bank("bank", &dir.path().join("bank"), "alice=100", None).await;
    let mut raw = raw_client(&coordinator.addr()).await;
    let debit = bank::BankOp::Debit {
        account: "alice".into(),
        amount: 5,
    }
    .encode();
    let good = || branch(&bank_node.addr(), debit.clone());
    let now = tandem_common::unix_now_ms();
    let cases: Vec<(&str, pb::Execute2pcRequest, &str)> = vec![
        (
            "no branches",
            pb::Execute2pcRequest {
                txn_id: String::new(),
                branches: vec![],
                timeout_ms: 0,
            },
            "at least one branch",
        ),
        (
            "too many branches",
            pb::Execute2pcRequest {
                txn_id: String::new(),
                branches: vec![good(); 65],
                timeout_ms: 0,
            },
            "at most 64",
        ),
        (
            "oversized payload",
            pb::Execute2pcRequest {
                txn_id: String::new(),
                branches: vec![branch(&bank_node.addr(), vec![b'x'; 64 * 1024 + 1])],
                timeout_ms: 0,
            },
            "payload",
        ),
        (
            "malformed id",
            pb::Execute2pcRequest {
                txn_id: "x y".into(),
                branches: vec![good()],
                timeout_ms: 0,
            },
            "not of the form",
        ),
        (
            "overlong id",
            pb::Execute2pcRequest {
                txn_id: format!("{now}-{}", "a".repeat(100)),
                branches: vec![good()],
                timeout_ms: 0,
            },
            "bytes long",
        ),
        (
            "id too old",
            pb::Execute2pcRequest {
                txn_id: format!("{}-old", now - 8 * 24 * 3600 * 1000),
                branches: vec![good()],
                timeout_ms: 0,
            },
            "no id is ever reused",
        ),
        (
            "unusable address",
            pb::Execute2pcRequest {
                txn_id: String::new(),
                branches: vec![branch("no-port", debit.clone())],
                timeout_ms: 0,
            },
            "participant address",
        ),
        (
            "deadline out of range",
            pb::Execute2pcRequest {
                txn_id: String::new(),
                branches: vec![good()],
                timeout_ms: 300_001,
            },
            "timeout_ms",
        ),
    ];
    for (what, request, message) in cases {
        let status = raw.execute2pc(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(message),
            "{what}: message {:?} lacks {message:?}",
            status.message()
        );
    }
    let status = raw
        .get_transaction(pb::GetTransactionRequest {
            txn_id: format!("{now}-unknown"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = raw
        .get_transaction(pb::GetTransactionRequest {
            txn_id: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Presumed abort: a participant asking about an unknown transaction hears ABORTED.
    let answer = raw
        .query_outcome(pb::QueryOutcomeRequest {
            txn_id: format!("{now}-unknown"),
            branch: 0,
        })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().outcome, pb::Outcome::Aborted as i32);
    bank_node.stop().await;
    assert_eq!(
        bank_node.balances(),
        BTreeMap::from([("alice".to_string(), 100)]),
        "a refused request changed data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_returns_the_same_outcome_and_other_branches_under_the_same_id_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut a = Node::bank("bank-a", &dir.path().join("bank-a"), "alice=100", None).await;
    let mut b = Node::bank("bank-b", &dir.path().join("bank-b"), "bob=0", None).await;
    let mut client = client(&coordinator.addr()).await;
    let txn = TandemClient::new_txn_id();
    let branches = transfer((&a, "alice"), (&b, "bob"), 30);
    assert_eq!(
        client
            .execute_2pc_with(&txn, branches.clone(), None)
            .await
            .unwrap(),
        Outcome::Committed
    );
    // The same id and branches: the same outcome, and the money moves once.
    assert_eq!(
        client
            .execute_2pc_with(&txn, branches.clone(), None)
            .await
            .unwrap(),
        Outcome::Committed
    );
    let different: Vec<Branch> = transfer((&a, "alice"), (&b, "bob"), 31);
    match client.execute_2pc_with(&txn, different, None).await {
        Err(tandem_participant::Error::AlreadyExists(message)) => {
            assert!(message.contains(txn.as_str()))
        }
        other => panic!("expected ALREADY_EXISTS, got {other:?}"),
    }
    // An aborted transaction's retry is aborted too.
    let aborted_txn = TandemClient::new_txn_id();
    let too_much = transfer((&a, "alice"), (&b, "bob"), 1_000);
    let first = client
        .execute_2pc_with(&aborted_txn, too_much.clone(), None)
        .await
        .unwrap();
    assert!(matches!(first, Outcome::Aborted { .. }));
    assert_eq!(
        client
            .execute_2pc_with(&aborted_txn, too_much, None)
            .await
            .unwrap(),
        first
    );
    wait_finished(&mut client, &txn).await;
    wait_finished(&mut client, &aborted_txn).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(a.balances()["alice"], 70);
    assert_eq!(b.balances()["bob"], 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_a_participant_was_told_is_aborted_can_never_start_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut a = Node::bank("bank-a", &dir.path().join("bank-a"), "alice=100", None).await;
    let mut b = Node::bank("bank-b", &dir.path().join("bank-b"), "bob=0", None).await;
    let mut raw = raw_client(&coordinator.addr()).await;
    // A participant asks about an id the coordinator never saw (for example, its record was
    // lost in a crash before the decision): presumed abort.
    let txn = TandemClient::new_txn_id();
    let answer = raw
        .query_outcome(pb::QueryOutcomeRequest {
            txn_id: txn.to_string(),
            branch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outcome, pb::Outcome::Aborted as i32);
    // A client retrying that id now must not start it afresh: it is aborted, nothing moves.
    let mut client = client(&coordinator.addr()).await;
    let outcome = client
        .execute_2pc_with(&txn, transfer((&a, "alice"), (&b, "bob"), 30), None)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::Aborted { reason } if reason.contains("presumed abort")),
        "{outcome:?}"
    );
    let status = raw
        .get_transaction(pb::GetTransactionRequest {
            txn_id: txn.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.outcome, pb::Outcome::Aborted as i32, "{status:?}");
    a.stop().await;
    b.stop().await;
    assert_eq!(a.balances(), BTreeMap::from([("alice".to_string(), 100)]));
    assert_eq!(b.balances(), BTreeMap::from([("bob".to_string(), 0)]));
}
