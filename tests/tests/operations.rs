//! End-to-end checks of what an operator relies on, with real processes on loopback:
//!
//! - the participant allow-list: a 2PC transaction, a saga and a saga callback naming a host
//!   the coordinator's configuration does not allow are refused with PERMISSION_DENIED and
//!   change nothing (no record, no money moved); a narrowed list (`--allow-participants
//!   127.0.0.1`) still runs transfers; a malformed list stops the daemon at start;
//! - gRPC health checking: SERVING once started, NOT_SERVING once shutting down, and a
//!   watcher does not hold the shutdown open;
//! - gRPC server reflection: the coordinator's services are listed and described.
//!
//! The refused addresses are chosen so that they could reach only this machine if the check
//! ever broke: `0.0.0.0` (which Linux connects to the local host, and which the default
//! allow-list does not admit since it is no loopback address) at a real bank's port, or
//! `localhost` against a list that names only 127.0.0.1. A broken check would then show as
//! money moving, not only as a wrong status, and a test never sends traffic off the machine.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tandem_participant::{bank, Error, Outcome, TandemClient};
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1 as reflection;

const BANK_A: &str = "alice=100";
const BANK_B: &str = "bob=50";

/// A coordinator (with extra `serve` arguments) and two banks, each in its own temp folder.
struct Cluster {
    _dir: tempfile::TempDir,
    coordinator: Node,
    a: Node,
    b: Node,
}

impl Cluster {
    async fn start(coordinator_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let coordinator =
            Node::coordinator_with_args(&dir.path().join("coordinator"), coordinator_args, None)
                .await;
        let a = Node::bank("bank-a", &dir.path().join("bank-a"), BANK_A, None).await;
        let b = Node::bank("bank-b", &dir.path().join("bank-b"), BANK_B, None).await;
        Cluster {
            _dir: dir,
            coordinator,
            a,
            b,
        }
    }

    /// Stops the banks and returns their committed balances.
    async fn balances(&mut self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
        self.a.stop().await;
        self.b.stop().await;
        (self.a.balances(), self.b.balances())
    }
}

fn untouched() -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    (
        BTreeMap::from([("alice".to_string(), 100)]),
        BTreeMap::from([("bob".to_string(), 50)]),
    )
}

/// `node`'s port at 0.0.0.0: not an address the default allow-list admits.
fn unspecified(node: &Node) -> String {
    let port = node.addr().rsplit_once(':').unwrap().1.to_string();
    format!("0.0.0.0:{port}")
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

async fn raw_client(addr: &str) -> pb::coordinator_client::CoordinatorClient<Channel> {
    pb::coordinator_client::CoordinatorClient::new(channel(addr).await)
}

/// The error must be PERMISSION_DENIED with a message naming `place` and `host`.
fn assert_denied(error: Error, place: &str, host: &str) {
    match &error {
        Error::Coordinator {
            code: Code::PermissionDenied,
            message,
        } => {
            assert!(
                message.starts_with(place) && message.contains(&format!("host {host} ")),
                "message {message:?} does not name {place} and {host}"
            );
            assert!(!error.is_retryable() && error.is_outcome_known());
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
}

async fn assert_no_transaction(addr: &str, txn: &tandem_participant::TxnId) {
    let status = raw_client(addr)
        .await
        .get_transaction(pb::GetTransactionRequest {
            txn_id: txn.to_string(),
        })
        .await
        .expect_err("a refused transaction left a record");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

async fn assert_no_saga(client: &TandemClient, saga: &tandem_participant::TxnId) {
    match client.get_saga(saga).await {
        Err(Error::Coordinator {
            code: Code::NotFound,
            ..
        }) => {}
        other => panic!("a refused saga left a record: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2pc_branch_on_a_host_outside_the_allow_list_is_permission_denied_and_changes_nothing() {
    let mut cluster = Cluster::start(&[]).await;
    let coordinator = cluster.coordinator.addr();
    let mut client = client(&coordinator).await;
    let txn = TandemClient::new_txn_id();
    let branches = bank::transfer_branches(
        (&cluster.a.addr(), "alice"),
        (&unspecified(&cluster.b), "bob"),
        30,
    );
    let error = client
        .execute_2pc_with(&txn, branches.clone(), None)
        .await
        .expect_err("a branch outside the allow-list was accepted");
    assert_denied(error, "branch #1", "0.0.0.0");
    // Refused again on a retry with the same id: the refusal recorded nothing to return.
    let error = client
        .execute_2pc_with(&txn, branches, None)
        .await
        .expect_err("the retry was accepted");
    assert_denied(error, "branch #1", "0.0.0.0");
    assert_no_transaction(&coordinator, &txn).await;
    assert_eq!(cluster.balances().await, untouched());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_step_or_callback_on_a_host_outside_the_allow_list_is_permission_denied_and_changes_nothing(
) {
    let mut cluster = Cluster::start(&[]).await;
    let client = client(&cluster.coordinator.addr()).await;

    let step_outside = TandemClient::new_txn_id();
    let saga = bank::transfer_saga(
        (&cluster.a.addr(), "alice"),
        (&unspecified(&cluster.b), "bob"),
        30,
    )
    .id(step_outside.clone());
    let error = client
        .submit_saga(saga)
        .await
        .expect_err("a step outside the allow-list was accepted");
    assert_denied(error, "step \"credit\"", "0.0.0.0");
    assert_no_saga(&client, &step_outside).await;

    let callback_outside = TandemClient::new_txn_id();
    let saga = bank::transfer_saga((&cluster.a.addr(), "alice"), (&cluster.b.addr(), "bob"), 30)
        .id(callback_outside.clone())
        .callback(unspecified(&cluster.a), bank::CALLBACK);
    let error = client
        .submit_saga(saga)
        .await
        .expect_err("a callback outside the allow-list was accepted");
    assert_denied(error, "callback", "0.0.0.0");
    assert_no_saga(&client, &callback_outside).await;

    // Neither ran a step nor delivered a callback.
    assert_eq!(cluster.balances().await, untouched());
    assert!(bank::saga_callbacks_in(&cluster.a.dir).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_allowing_only_127_0_0_1_runs_transfers_there_and_refuses_other_names() {
    let mut cluster = Cluster::start(&["--allow-participants", "127.0.0.1"]).await;
    let coordinator = cluster.coordinator.addr();
    let mut client = client(&coordinator).await;
    let outcome = client
        .execute_2pc(transfer((&cluster.a, "alice"), (&cluster.b, "bob"), 30))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let saga = client
        .submit_saga(bank::transfer_saga(
            (&cluster.a.addr(), "alice"),
            (&cluster.b.addr(), "bob"),
            5,
        ))
        .await
        .unwrap();
    let state = client.wait(&saga, Duration::from_secs(60)).await.unwrap();
    assert!(state.terminal, "{state:?}");
    assert_eq!(
        state.outcome(),
        Some(tandem_participant::SagaOutcome::Completed)
    );
    // `localhost` is another name for the same bank, but names are matched literally, and
    // this list names only 127.0.0.1; nor is [::1] in it.
    let port = |node: &Node| node.addr().rsplit_once(':').unwrap().1.to_string();
    for (address, host) in [
        (format!("localhost:{}", port(&cluster.b)), "localhost"),
        (format!("[::1]:{}", port(&cluster.b)), "::1"),
    ] {
        let txn = TandemClient::new_txn_id();
        let branches = bank::transfer_branches((&cluster.a.addr(), "alice"), (&address, "bob"), 1);
        let error = client
            .execute_2pc_with(&txn, branches, None)
            .await
            .expect_err("a host outside the list was accepted");
        assert_denied(error, "branch #1", host);
        assert_no_transaction(&coordinator, &txn).await;
    }
    let (a, b) = cluster.balances().await;
    assert_eq!(a["alice"], 65);
    assert_eq!(b["bob"], 85);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_allow_list_stops_the_daemon_at_start_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(&binaries().tandem)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allow-participants",
            "loopback,10.1.2.3/8",
            "--data-dir",
        ])
        .arg(dir.path().join("coordinator"))
        .output();
    let output = tokio::time::timeout(START_TIMEOUT, output)
        .await
        .expect("tandem serve did not exit")
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--allow-participants") && stderr.contains("\"10.1.2.3/8\""),
        "{stderr}"
    );
    assert!(
        !dir.path().join("coordinator").exists(),
        "the log was opened before the configuration was checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_once_started_and_not_serving_once_shutting_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut health = HealthClient::new(channel(&coordinator.addr()).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "tandem.v1.Coordinator"] {
        let answer = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(
            answer.status(),
            ServingStatus::Serving,
            "{service:?}: {answer:?}"
        );
    }
    let unknown = health.check(check("tandem.v1.Nothing")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    let first = watch.next().await.expect("no first status").unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // SIGTERM while the watch is open: the watcher hears NOT_SERVING, its stream then ends,
    // and the daemon exits cleanly instead of waiting for the watcher to hang up.
    let watched = async {
        let mut seen = Vec::new();
        while let Some(item) = watch.next().await {
            match item {
                Ok(answer) => seen.push(answer.status()),
                Err(status) => {
                    seen.push(ServingStatus::Unknown);
                    assert_ne!(status.code(), Code::Ok);
                    break;
                }
            }
        }
        seen
    };
    let (seen, exit) = tokio::join!(watched, coordinator.terminate(Duration::from_secs(20)));
    assert_eq!(
        seen.first(),
        Some(&ServingStatus::NotServing),
        "statuses seen after SIGTERM: {seen:?}"
    );
    let exit = exit.expect("the coordinator did not exit within 20 s of SIGTERM");
    assert!(exit.success(), "{exit}");
}

/// Sends one reflection request and returns the one answer (tonic-reflection answers an
/// unknown symbol with an error status on the stream).
async fn reflect(
    client: &mut reflection::server_reflection_client::ServerReflectionClient<Channel>,
    request: reflection::server_reflection_request::MessageRequest,
) -> Result<reflection::server_reflection_response::MessageResponse, tonic::Status> {
    let request = reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.expect("no reflection answer")?;
    Ok(answer.message_response.expect("an empty reflection answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_coordinator_service_and_describes_its_calls() {
    use reflection::server_reflection_request::MessageRequest;
    use reflection::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut client = reflection::server_reflection_client::ServerReflectionClient::new(
        channel(&coordinator.addr()).await,
    );
    let services = match reflect(&mut client, MessageRequest::ListServices(String::new()))
        .await
        .unwrap()
    {
        MessageResponse::ListServicesResponse(list) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("expected a service list, got {other:?}"),
    };
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tandem.v1.Admin",
            "tandem.v1.Coordinator",
        ],
        "the participant service is in the contract but not served here"
    );
    let files = match reflect(
        &mut client,
        MessageRequest::FileContainingSymbol("tandem.v1.Coordinator".into()),
    )
    .await
    .unwrap()
    {
        MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
        other => panic!("expected a file descriptor, got {other:?}"),
    };
    let contains = |needle: &[u8]| {
        files
            .iter()
            .any(|file| file.windows(needle.len()).any(|w| w == needle))
    };
    for name in [
        &b"tandem/v1/tandem.proto"[..],
        b"Execute2pc",
        b"SubmitSaga",
        b"GetTransaction",
    ] {
        assert!(
            contains(name),
            "the descriptor lacks {:?}",
            String::from_utf8_lossy(name)
        );
    }
    let unknown = reflect(
        &mut client,
        MessageRequest::FileContainingSymbol("tandem.v1.Nothing".into()),
    )
    .await
    .expect_err("an unknown symbol was described");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // grpcurl falls back to v1alpha with older servers; it is served too.
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel(&coordinator.addr()).await,
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let answer = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .expect("no v1alpha answer")
        .unwrap();
    assert!(
        format!("{answer:?}").contains("tandem.v1.Coordinator"),
        "{answer:?}"
    );
}
