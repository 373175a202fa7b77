//! End-to-end operator commands with real processes on loopback: a coordinator, bank
//! participants, and the `tandem txn` command line over the `tandem.v1.Admin` service.
//!
//! Each test asserts what an operator would check: what `tandem txn list` and `show` print
//! (also after a coordinator restart), the exit codes and messages of refusals, the outcome a
//! client sees after an operator's abort or retry, and the balances on disk once the banks
//! stopped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_participant::client::{RetryPolicy, Saga};
use tandem_participant::{bank, Outcome, SagaOutcome, SagaState, TandemClient, TxnId};
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::Code;

const BANK_A: &str = "alice=100,bob=50";
const BANK_B: &str = "carol=10,dave=0";
const WAIT: Duration = Duration::from_secs(60);

/// The saga transfers of these tests.
trait AlicePays {
    fn alice_pays(&self, to: &str, amount: i64, attempts: u32) -> Saga;
}

impl AlicePays for Cluster {
    /// A saga moving `amount` from alice (bank A) to `to` at bank B; each action is tried at
    /// most `attempts` times, 50 to 200 ms apart.
    fn alice_pays(&self, to: &str, amount: i64, attempts: u32) -> Saga {
        let policy = RetryPolicy {
            initial_delay_ms: 50,
            multiplier: 2.0,
            max_delay_ms: 200,
            max_attempts: attempts,
            deadline_ms: 0,
        };
        let steps =
            bank::transfer_saga_steps((&self.a.addr(), "alice"), (&self.b.addr(), to), amount)
                .into_iter()
                .map(|step| step.retry(policy));
        Saga::sequence(steps)
    }
}

fn original() -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    (
        BTreeMap::from([("alice".into(), 100), ("bob".into(), 50)]),
        BTreeMap::from([("carol".into(), 10), ("dave".into(), 0)]),
    )
}

/// What one `tandem txn` run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `tandem txn <args> --coordinator <addr>`.
async fn txn_cli(addr: &str, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(&binaries().tandem)
        .arg("txn")
        .args(args)
        .args(["--coordinator", addr])
        .env_remove("TANDEM_ADMIN_TOKEN")
        .output()
        .await
        .expect("running tandem txn");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    println!("tandem txn {args:?} -> {run:#?}");
    run
}

/// Runs `tandem txn <args> --json` and parses what it printed; it must succeed.
async fn txn_json(addr: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let run = txn_cli(addr, &all).await;
    assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"))
}

/// The ids `tandem txn list <args> --json` prints, in order.
async fn listed(addr: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec!["list"];
    all.extend_from_slice(args);
    let json = txn_json(addr, &all).await;
    json.as_array()
        .unwrap_or_else(|| panic!("{json}"))
        .iter()
        .map(|s| s["id"].as_str().expect("an id").to_string())
        .collect()
}

async fn admin(addr: &str) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
    pb::admin_client::AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the admin service")
}

/// Asserts that a call was refused with `code` and a message containing `names`.
fn refused_with<T: std::fmt::Debug>(
    answer: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    names: &str,
) {
    let status = answer.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(names), "{status:?}");
}

async fn wait_terminal(client: &TandemClient, saga: &TxnId) -> SagaState {
    let state = client
        .wait(saga, WAIT)
        .await
        .unwrap_or_else(|e| panic!("waiting for {saga}: {e}"));
    assert!(state.terminal, "saga {saga} not terminal: {state:?}");
    state
}

/// Polls `check` on the saga's state every 100 ms until it holds (bounded).
async fn wait_saga_until(
    client: &TandemClient,
    saga: &TxnId,
    what: &str,
    check: impl Fn(&SagaState) -> bool,
) -> SagaState {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = client.get_saga(saga).await.unwrap();
        if check(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "{saga}: {what}: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The kinds of the changes `show --json` printed, in order.
fn change_kinds(show: &Value) -> Vec<String> {
    show["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("{show}"))
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_kind_state_and_age_and_show_keeps_the_history_across_a_restart() {
    let mut cluster = Cluster::start(&[], BANK_A, BANK_B).await;
    let addr = cluster.coordinator.addr();
    let mut client = client(&addr).await;
    let committed = TandemClient::new_txn_id();
    let outcome = client
        .execute_2pc_with(
            &committed,
            transfer((&cluster.a, "alice"), (&cluster.b, "carol"), 10),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let refused = TandemClient::new_txn_id();
    let outcome = client
        .execute_2pc_with(
            &refused,
            transfer((&cluster.a, "alice"), (&cluster.b, "mallory"), 10),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Aborted { .. }), "{outcome:?}");
    let completed = client
        .submit_saga(cluster.alice_pays("carol", 5, 3))
        .await
        .unwrap();
    let compensated = client
        .submit_saga(cluster.alice_pays("mallory", 5, 3))
        .await
        .unwrap();
    wait_terminal(&client, &completed).await;
    wait_terminal(&client, &compensated).await;
    wait_finished(&mut client, &committed).await;
    wait_finished(&mut client, &refused).await;

    let mut all = vec![
        committed.to_string(),
        refused.to_string(),
        completed.to_string(),
        compensated.to_string(),
    ];
    all.sort();
    assert_eq!(listed(&addr, &[]).await, all);
    let mut two_pc = vec![committed.to_string(), refused.to_string()];
    two_pc.sort();
    assert_eq!(listed(&addr, &["--kind", "2pc"]).await, two_pc);
    let mut sagas = vec![completed.to_string(), compensated.to_string()];
    sagas.sort();
    assert_eq!(listed(&addr, &["--kind", "saga"]).await, sagas);
    assert_eq!(
        listed(&addr, &["--state", "committed"]).await,
        [committed.to_string()]
    );
    assert_eq!(
        listed(&addr, &["--state", "aborted", "--kind", "2pc"]).await,
        [refused.to_string()]
    );
    assert_eq!(
        listed(&addr, &["--state", "compensated"]).await,
        [compensated.to_string()]
    );
    assert_eq!(
        listed(&addr, &["--state", "completed", "--kind", "2pc"]).await,
        Vec::<String>::new()
    );
    assert_eq!(
        listed(&addr, &["--older-than", "1h"]).await,
        Vec::<String>::new()
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(listed(&addr, &["--older-than", "1s"]).await, all);
    assert_eq!(listed(&addr, &["--limit", "3"]).await, all[..3]);

    // Pages: one entry each, in id order, none twice, the last without a token.
    let mut admin = admin(&addr).await;
    let mut paged = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = admin
            .list_transactions(pb::ListTransactionsRequest {
                limit: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.transactions.into_iter().map(|s| s.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, all);
    let too_many = pb::ListTransactionsRequest {
        limit: 1_001,
        ..Default::default()
    };
    refused_with(
        admin.list_transactions(too_many).await,
        Code::InvalidArgument,
        "limit 1001",
    );

    // The human table names each transaction with its kind and state.
    let run = txn_cli(&addr, &["list"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("ID "), "{run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with(compensated.as_str()))
        .unwrap();
    assert!(
        line.contains("saga") && line.contains("compensated") && line.contains("mallory"),
        "{line}"
    );

    // After a restart the history and each part's attempts and last error are still shown.
    cluster.coordinator.stop().await;
    cluster.coordinator.start(None).await;
    let show = txn_json(&addr, &["show", committed.as_str()]).await;
    assert_eq!(show["summary"]["state"], "committed", "{show}");
    assert_eq!(show["summary"]["in_flight"], false, "{show}");
    assert_eq!(
        change_kinds(&show),
        ["began", "decided", "finished"],
        "{show}"
    );
    let times: Vec<u64> = show["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["at_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]) && times[0] >= committed.created_ms(),
        "{times:?}"
    );
    assert_eq!(show["changes"][1]["detail"], "commit");
    for part in show["parts"].as_array().unwrap() {
        assert_eq!(part["phase"], "committed", "{show}");
        assert_eq!(part["attempts"], 1, "{show}");
    }
    let show = txn_json(&addr, &["show", refused.as_str()]).await;
    assert_eq!(show["summary"]["state"], "aborted", "{show}");
    assert_eq!(
        change_kinds(&show),
        ["began", "voted_no", "decided", "finished"],
        "{show}"
    );
    // The NO vote is in the history; the branch itself ended aborted.
    assert_eq!(show["parts"][1]["phase"], "aborted", "{show}");
    assert!(
        show["parts"][1]["last_error"]
            .as_str()
            .unwrap()
            .contains("mallory"),
        "{show}"
    );
    let show = txn_json(&addr, &["show", compensated.as_str()]).await;
    assert_eq!(show["summary"]["state"], "compensated", "{show}");
    let kinds = change_kinds(&show);
    for kind in [
        "accepted",
        "step_started",
        "step_succeeded",
        "step_failed",
        "compensation_started",
        "step_compensated",
        "finished",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
    assert_eq!(kinds.last().map(String::as_str), Some("finished"));
    let credit = &show["parts"][1];
    assert_eq!(
        (credit["name"].as_str(), credit["phase"].as_str()),
        (Some("credit"), Some("compensated")),
        "{show}"
    );
    assert_eq!(credit["attempts"], 1);
    assert_eq!(credit["compensation_attempts"], 1);
    assert!(
        credit["last_error"].as_str().unwrap().contains("mallory"),
        "{show}"
    );
    // And the text form prints times and the parts.
    let run = txn_cli(&addr, &["show", compensated.as_str()]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("state:    compensated (finished)"),
        "{run:?}"
    );
    assert!(run.stdout.contains("CHANGES"), "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains("Z  step_failed") && l.contains("credit")),
        "{run:?}"
    );
    cluster.stop_banks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_a_running_saga_compensates_it_and_ends_aborted_by_the_operator() {
    let mut cluster = Cluster::start(&[], BANK_A, BANK_B).await;
    let addr = cluster.coordinator.addr();
    let client = client(&addr).await;
    cluster.b.kill().await;
    let saga = client
        .submit_saga(cluster.alice_pays("carol", 30, 1_000))
        .await
        .unwrap();
    // The debit succeeded; the credit keeps failing to reach bank B.
    wait_saga_until(&client, &saga, "the credit retried", |s| {
        s.steps[1].action_attempts >= 2
    })
    .await;
    let run = txn_cli(
        &addr,
        &[
            "abort",
            saga.as_str(),
            "--reason",
            "bank B is down for the day",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("compensating"), "{run:?}");
    // Decided: a second abort is refused, naming the outcome that stands.
    let run = txn_cli(&addr, &["abort", saga.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("already decided") && run.stderr.contains("FailedPrecondition"),
        "{run:?}"
    );
    // The credit's compensation needs bank B: it compensates once B is back.
    cluster.b.start(None).await;
    let state = wait_terminal(&client, &saga).await;
    match state.outcome() {
        Some(SagaOutcome::Aborted { reason }) => {
            assert!(reason.contains("bank B is down for the day"), "{reason}")
        }
        other => panic!("expected an aborted saga, got {other:?}: {state:?}"),
    }
    assert_eq!(
        listed(&addr, &["--state", "aborted", "--kind", "saga"]).await,
        [saga.to_string()]
    );
    let show = txn_json(&addr, &["show", saga.as_str()]).await;
    let kinds = change_kinds(&show);
    let abort_at = kinds
        .iter()
        .position(|k| k == "operator_abort")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    let compensation_at = kinds
        .iter()
        .position(|k| k == "compensation_started")
        .unwrap();
    assert!(abort_at < compensation_at, "{kinds:?}");
    assert_eq!(cluster.stop_banks().await, original());
}

/// An operator holds saga execution (here from the start, `--hold-sagas`): submissions are
/// accepted and answered but start no step, `get` says `held`, an abort ends a held saga with
/// nothing to compensate, and `resume-sagas` runs the rest. A hold set with the command line
/// ends with a restart, but a coordinator configured to start held holds the sagas it
/// recovers that had not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_sagas_are_accepted_without_running_until_the_operator_resumes_them() {
    let mut cluster = Cluster::start(&["--hold-sagas"], BANK_A, BANK_B).await;
    let addr = cluster.coordinator.addr();
    let client = client(&addr).await;
    let first = client
        .submit_saga(cluster.alice_pays("carol", 30, 3))
        .await
        .unwrap();
    let second = client
        .submit_saga(cluster.alice_pays("carol", 20, 3))
        .await
        .unwrap();
    let unwanted = client
        .submit_saga(cluster.alice_pays("dave", 5, 3))
        .await
        .unwrap();
    // Held: nothing is sent, however long one waits (half a second here, bounded).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for saga in [&first, &second, &unwanted] {
        let state = client.get_saga(saga).await.unwrap();
        assert!(state.held && !state.terminal, "{saga}: {state:?}");
        assert!(
            state.steps.iter().all(|s| s.action_attempts == 0),
            "{saga}: a step was sent while held: {state:?}"
        );
    }
    // The operator sees why nothing runs.
    let run = txn_cli(&addr, &["list", "--kind", "saga"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout.lines().filter(|l| l.contains("HELD")).count(),
        3,
        "{run:?}"
    );
    let show = txn_json(&addr, &["show", first.as_str()]).await;
    assert_eq!(show["summary"]["held"], true, "{show}");
    let run = txn_cli(
        &addr,
        &["abort", unwanted.as_str(), "--reason", "sent twice"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("nothing to compensate"), "{run:?}");
    let state = wait_terminal(&client, &unwanted).await;
    assert_eq!(
        state.outcome(),
        Some(SagaOutcome::Aborted {
            reason: "sent twice".into()
        }),
        "{state:?}"
    );
    assert!(state
        .steps
        .iter()
        .all(|s| s.action_attempts == 0 && s.compensation_attempts == 0));
    // The aborted saga leaves the count of waiting sagas at once (holding again changes
    // nothing and reports it).
    let answer = txn_json(&addr, &["hold-sagas"]).await;
    assert_eq!(
        (&answer["held"], &answer["waiting"]),
        (&Value::Bool(true), &Value::from(2)),
        "{answer}"
    );

    let run = txn_cli(&addr, &["resume-sagas"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("resumed: 2 held sagas"),
        "the aborted saga is not counted: {run:?}"
    );
    for saga in [&first, &second] {
        let state = wait_terminal(&client, saga).await;
        assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
        assert!(!state.held, "{state:?}");
    }
    let show = txn_json(&addr, &["show", first.as_str()]).await;
    assert_eq!(show["summary"]["held"], false, "{show}");

    // Held again from the command line; the coordinator restarts before resuming: configured
    // to start held, it holds the recovered saga too.
    let answer = txn_json(&addr, &["hold-sagas"]).await;
    assert_eq!(answer["held"], true, "{answer}");
    let last = client
        .submit_saga(cluster.alice_pays("carol", 10, 3))
        .await
        .unwrap();
    cluster.coordinator.kill().await;
    cluster.coordinator.start(None).await;
    let client = tandem_tests::client(&addr).await;
    let state = client.get_saga(&last).await.unwrap();
    assert!(state.held, "recovered held: {state:?}");
    let run = txn_cli(&addr, &["resume-sagas"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let state = wait_terminal(&client, &last).await;
    assert_eq!(state.outcome(), Some(SagaOutcome::Completed), "{state:?}");
    assert_eq!(
        cluster.stop_banks().await,
        (
            BTreeMap::from([("alice".into(), 40), ("bob".into(), 50)]),
            BTreeMap::from([("carol".into(), 70), ("dave".into(), 0)]),
        ),
        "the three resumed transfers moved 60; the aborted one moved nothing"
    );
}

/// A participant that never answers: it takes connections (the kernel's backlog does) and
/// never speaks, so a prepare sent to it stays unanswered until its deadline.
async fn silent_participant() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (listener, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_an_undecided_transaction_aborts_it_and_moves_no_money() {
    let mut cluster = Cluster::start(&[], BANK_A, BANK_B).await;
    let addr = cluster.coordinator.addr();
    let (_silent, silent_addr) = silent_participant().await;
    let txn = TandemClient::new_txn_id();
    let branches =
        bank::transfer_branches((&cluster.a.addr(), "alice"), (&silent_addr, "carol"), 40);
    let execute = {
        let addr = addr.clone();
        let txn = txn.clone();
        tokio::spawn(async move {
            let mut client = client(&addr).await;
            client
                .execute_2pc_with(&txn, branches, Some(Duration::from_secs(240)))
                .await
        })
    };
    // Bank A voted yes (alice's 40 are held); the silent participant never answers.
    let deadline = Instant::now() + WAIT;
    loop {
        let show = txn_json(&addr, &["show", txn.as_str()]).await;
        if show["parts"][0]["phase"] == "voted_yes" {
            assert_eq!(show["summary"]["state"], "preparing", "{show}");
            break;
        }
        assert!(Instant::now() < deadline, "bank A never voted: {show}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        listed(&addr, &["--state", "preparing"]).await,
        [txn.to_string()]
    );
    // Nothing to retry while undecided: prepare is never sent again.
    let run = txn_cli(&addr, &["retry", txn.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("not decided yet"), "{run:?}");
    let run = txn_cli(
        &addr,
        &["abort", txn.as_str(), "--reason", "participant hangs"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("aborting") && run.stdout.contains("durable"),
        "{run:?}"
    );
    // The client waiting on the transaction hears the operator's abort.
    let outcome = tokio::time::timeout(WAIT, execute)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match &outcome {
        Outcome::Aborted { reason } => assert!(
            reason.contains("aborted by an operator: participant hangs"),
            "{reason}"
        ),
        other => panic!("expected an abort, got {other:?}"),
    }
    // Bank A released alice's hold; the silent participant keeps the decision undelivered.
    let deadline = Instant::now() + WAIT;
    loop {
        let show = txn_json(&addr, &["show", txn.as_str()]).await;
        if show["parts"][0]["phase"] == "aborted" {
            assert_eq!(show["summary"]["state"], "aborting", "{show}");
            let kinds = change_kinds(&show);
            assert_eq!(kinds[..3], ["began", "operator_abort", "decided"], "{show}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bank A never acknowledged the abort: {show}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = txn_cli(&addr, &["abort", txn.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("already decided: abort"), "{run:?}");
    assert_eq!(cluster.stop_banks().await, original());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_a_committed_transaction_is_refused_and_changes_nothing() {
    let mut cluster = Cluster::start(&[], BANK_A, BANK_B).await;
    let addr = cluster.coordinator.addr();
    let mut client = client(&addr).await;
    let txn = TandemClient::new_txn_id();
    let branches = transfer((&cluster.a, "alice"), (&cluster.b, "carol"), 25);
    assert_eq!(
        client.execute_2pc_with(&txn, branches, None).await.unwrap(),
        Outcome::Committed
    );
    wait_finished(&mut client, &txn).await;
    let mut admin = admin(&addr).await;
    let id = txn.to_string();
    let abort = |reason: String| pb::AbortTransactionRequest {
        id: id.clone(),
        reason,
    };
    refused_with(
        admin.abort_transaction(abort("too late".into())).await,
        Code::FailedPrecondition,
        "already finished: commit",
    );
    let retry = pb::RetryTransactionRequest { id: id.clone() };
    refused_with(
        admin.retry_transaction(retry).await,
        Code::FailedPrecondition,
        "finished (committed)",
    );
    refused_with(
        admin.abort_transaction(abort("x".repeat(257))).await,
        Code::InvalidArgument,
        "reason is 257 bytes",
    );
    let unknown = TandemClient::new_txn_id();
    let show = pb::ShowTransactionRequest {
        id: unknown.to_string(),
    };
    refused_with(
        admin.show_transaction(show).await,
        Code::NotFound,
        "no transaction",
    );

    // The command line: refusals exit 1, malformed input exits 2, each naming the problem.
    let run = txn_cli(&addr, &["abort", txn.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("already finished: commit"), "{run:?}");
    let run = txn_cli(&addr, &["retry", unknown.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("no transaction"), "{run:?}");
    for (args, names) in [
        (vec!["show", "not-an-id"], "not a transaction or saga id"),
        (vec!["list", "--state", "stuck"], "unknown state"),
        (vec!["list", "--kind", "xa"], "2pc or saga"),
        (vec!["list", "--older-than", "10"], "not a duration"),
        (vec!["list", "--limit", "0"], "--limit"),
    ] {
        let run = txn_cli(&addr, &args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(names), "{args:?}: {run:?}");
    }
    let long_reason = "x".repeat(300);
    let run = txn_cli(&addr, &["abort", txn.as_str(), "--reason", &long_reason]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("reason is 300 bytes"), "{run:?}");
    let run = txn_cli("127.0.0.1:1", &["list"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("cannot reach the coordinator"),
        "{run:?}"
    );
    // The money moved once, and the refused abort did not undo it.
    let (a, b) = cluster.stop_banks().await;
    assert_eq!((a["alice"], b["carol"]), (75, 35));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_stuck_compensation_finishes_the_saga_without_waiting_for_the_backoff() {
    // Compensations wait a minute between attempts: a retry that waited would be seen.
    let mut cluster = Cluster::start(
        &[
            "--saga-compensation-backoff-initial-ms",
            "60000",
            "--saga-compensation-backoff-max-ms",
            "60000",
        ],
        BANK_A,
        BANK_B,
    )
    .await;
    let addr = cluster.coordinator.addr();
    let client = client(&addr).await;
    cluster.b.kill().await;
    // Two attempts of the credit, then the saga compensates; the credit's compensation goes
    // to bank B first, which is down.
    let saga = client
        .submit_saga(cluster.alice_pays("carol", 30, 2))
        .await
        .unwrap();
    let state = wait_saga_until(&client, &saga, "the credit's compensation failed", |s| {
        // Its last error is then the compensation's, no longer the exhausted retries'.
        s.steps[1].compensation_attempts >= 1
            && !s.steps[1].last_error.is_empty()
            && !s.steps[1].last_error.starts_with("retries exhausted")
    })
    .await;
    println!("{state:?}");
    assert_eq!(
        listed(&addr, &["--state", "compensating"]).await,
        [saga.to_string()]
    );
    cluster.b.start(None).await;
    let started = Instant::now();
    let run = txn_cli(&addr, &["retry", saga.as_str()]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("sent 1 call(s) now"), "{run:?}");
    let state = wait_terminal(&client, &saga).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "finished {took:?} after the retry: it waited for the backoff"
    );
    assert!(
        matches!(state.outcome(), Some(SagaOutcome::Compensated { .. })),
        "{state:?}"
    );
    let show = txn_json(&addr, &["show", saga.as_str()]).await;
    let kinds = change_kinds(&show);
    let retried = kinds
        .iter()
        .position(|k| k == "compensation_retried")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    let operator = kinds
        .iter()
        .position(|k| k == "operator_retry")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    assert!(retried < operator, "{kinds:?}");
    let run = txn_cli(&addr, &["retry", saga.as_str()]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("is finished (compensated)"), "{run:?}");
    assert_eq!(cluster.stop_banks().await, original());
}

/// An Admin service that answers only calls bearing `Bearer s3cret`, as the daemon does when it
/// is configured with that admin token.
struct TokenChecking;

const TOKEN: &str = "s3cret";

fn check_token<T>(request: &tonic::Request<T>) -> Result<(), tonic::Status> {
    match request.metadata().get("authorization") {
        Some(value) if value == format!("Bearer {TOKEN}").as_str() => Ok(()),
        Some(other) => Err(tonic::Status::unauthenticated(format!(
            "wrong admin token {other:?}"
        ))),
        None => Err(tonic::Status::unauthenticated("no admin token")),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for TokenChecking {
    async fn list_transactions(
        &self,
        request: tonic::Request<pb::ListTransactionsRequest>,
    ) -> Result<tonic::Response<pb::ListTransactionsResponse>, tonic::Status> {
        check_token(&request)?;
        Ok(tonic::Response::new(pb::ListTransactionsResponse::default()))
    }

    async fn show_transaction(
        &self,
        request: tonic::Request<pb::ShowTransactionRequest>,
    ) -> Result<tonic::Response<pb::ShowTransactionResponse>, tonic::Status> {
        check_token(&request)?;
        Err(tonic::Status::not_found("no such transaction here"))
    }

    async fn retry_transaction(
        &self,
        request: tonic::Request<pb::RetryTransactionRequest>,
    ) -> Result<tonic::Response<pb::RetryTransactionResponse>, tonic::Status> {
        check_token(&request)?;
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn abort_transaction(
        &self,
        request: tonic::Request<pb::AbortTransactionRequest>,
    ) -> Result<tonic::Response<pb::AbortTransactionResponse>, tonic::Status> {
        check_token(&request)?;
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn hold_sagas(
        &self,
        request: tonic::Request<pb::HoldSagasRequest>,
    ) -> Result<tonic::Response<pb::HoldSagasResponse>, tonic::Status> {
        check_token(&request)?;
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sends_the_admin_token_from_a_file_or_the_environment() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::admin_server::AdminServer::new(TokenChecking))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token_path = token_file.to_str().unwrap();

    let run = txn_cli(&addr, &["list", "--admin-token-file", token_path]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.trim(), "no transactions match", "{run:?}");

    let output = tokio::process::Command::new(&binaries().tandem)
        .args(["txn", "list", "--json", "--coordinator", &addr])
        .env("TANDEM_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");

    let run = txn_cli(&addr, &["list"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("no admin token") && run.stderr.contains("--admin-token-file"),
        "{run:?}"
    );
    std::fs::write(&token_file, "guess\n").unwrap();
    let run = txn_cli(
        &addr,
        &["show", "1763850000000-x", "--admin-token-file", token_path],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("wrong admin token"), "{run:?}");
    std::fs::write(&token_file, "").unwrap();
    let run = txn_cli(&addr, &["list", "--admin-token-file", token_path]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("the file is empty"), "{run:?}");
    let missing = dir.path().join("missing");
    let run = txn_cli(
        &addr,
        &["list", "--admin-token-file", missing.to_str().unwrap()],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--admin-token-file"), "{run:?}");
    server.abort();
}
