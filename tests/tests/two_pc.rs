//! End-to-end two-phase commit with real processes on loopback: a coordinator and two bank
//! participants, each on its own temp folder and OS-assigned port.
//!
//! Every test asserts what a user would check: the outcome the client was told, and the
//! balances on disk once the processes stopped (the committed ones or the original ones,
//! never a mix; money conserved).

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_participant::{Outcome, TandemClient};
use tandem_tests::*;

const BANK_A: &str = "alice=100,bob=50";
const BANK_B: &str = "carol=10,dave=0";

struct Cluster {
    _dir: tempfile::TempDir,
    coordinator: Node,
    a: Node,
    b: Node,
}

impl Cluster {
    async fn start(crash: Crash) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let at = |who: Who| if crash.0 == who { Some(crash.1) } else { None };
        let coordinator =
            Node::coordinator(&dir.path().join("coordinator"), at(Who::Coordinator)).await;
        let a = Node::bank("bank-a", &dir.path().join("bank-a"), BANK_A, at(Who::BankA)).await;
        let b = Node::bank("bank-b", &dir.path().join("bank-b"), BANK_B, at(Who::BankB)).await;
        Cluster {
            _dir: dir,
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
}

#[derive(PartialEq, Clone, Copy)]
enum Who {
    Nobody,
    Coordinator,
    BankA,
    BankB,
}

struct Crash(Who, &'static str);
const NO_CRASH: Crash = Crash(Who::Nobody, "");

fn original() -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    (
        BTreeMap::from([("alice".into(), 100), ("bob".into(), 50)]),
        BTreeMap::from([("carol".into(), 10), ("dave".into(), 0)]),
    )
}

/// The balances after alice (bank A) paid carol (bank B) `amount`.
fn after_alice_paid_carol(amount: i64) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let (mut a, mut b) = original();
    *a.get_mut("alice").unwrap() -= amount;
    *b.get_mut("carol").unwrap() += amount;
    (a, b)
}

fn expected_for(outcome: &Outcome, amount: i64) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    match outcome {
        Outcome::Committed => after_alice_paid_carol(amount),
        Outcome::Aborted { .. } => original(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_transfer_between_two_banks_commits_and_balances_show_it() {
    let mut cluster = Cluster::start(NO_CRASH).await;
    let bins = binaries();
    let output = tokio::process::Command::new(&bins.bank)
        .args(["transfer", "--coordinator", &cluster.coordinator.addr()])
        .args([
            "--from",
            &format!("{}/alice", cluster.a.addr()),
            "--to",
            &format!("{}/carol", cluster.b.addr()),
        ])
        .args(["--amount", "10"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "transfer failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let txn = stdout
        .trim()
        .strip_prefix("committed ")
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
    let txn = tandem_participant::TxnId::parse(txn).expect("the CLI prints the transaction id");
    let mut client = client(&cluster.coordinator.addr()).await;
    assert_eq!(wait_finished(&mut client, &txn).await, Outcome::Committed);
    cluster.a.stop().await;
    cluster.b.stop().await;
    for (node, expected) in [
        (&cluster.a, r#"{"alice":90,"bob":50}"#),
        (&cluster.b, r#"{"carol":20,"dave":0}"#),
    ] {
        let output = tokio::process::Command::new(&bins.bank)
            .args(["balances", "--data-dir"])
            .arg(&node.dir)
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            expected,
            "balances of {}",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_funds_aborts_with_the_reason_and_changes_nothing() {
    let mut cluster = Cluster::start(NO_CRASH).await;
    let mut client = client(&cluster.coordinator.addr()).await;
    let outcome = client
        .execute_2pc(transfer((&cluster.a, "alice"), (&cluster.b, "carol"), 101))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::Aborted { reason } if reason.contains("insufficient funds")),
        "{outcome:?}"
    );
    // The CLI says so too, with exit code 1.
    let output = tokio::process::Command::new(&binaries().bank)
        .args(["transfer", "--coordinator", &cluster.coordinator.addr()])
        .args([
            "--from",
            &format!("{}/bob", cluster.a.addr()),
            "--to",
            &format!("{}/nobody", cluster.b.addr()),
        ])
        .args(["--amount", "1"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains("no account \"nobody\""));
    assert_eq!(cluster.stop_banks().await, original());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_down_aborts_and_the_other_branch_is_released() {
    let mut cluster = Cluster::start(NO_CRASH).await;
    let mut client = client(&cluster.coordinator.addr()).await;
    cluster.b.kill().await;
    let txn = TandemClient::new_txn_id();
    let outcome = client
        .execute_2pc_with(
            &txn,
            transfer((&cluster.a, "alice"), (&cluster.b, "carol"), 10),
            Some(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    let b_addr = cluster.b.addr();
    assert!(
        matches!(&outcome, Outcome::Aborted { reason } if reason.contains(&b_addr)),
        "{outcome:?}"
    );
    // The abort reaches bank B once it is back (the coordinator keeps redelivering).
    cluster.b.start(None).await;
    assert!(matches!(
        wait_finished(&mut client, &txn).await,
        Outcome::Aborted { .. }
    ));
    assert_eq!(cluster.stop_banks().await, original());
}

/// Runs one transfer with a crash point armed, restarts the crashed process, and checks the
/// final balances against the outcome.
async fn crash_and_recover(crash: Crash, expect_client_answer: bool) -> Outcome {
    let (who, point) = (crash.0, crash.1);
    let mut cluster = Cluster::start(crash).await;
    let coordinator = cluster.coordinator.addr();
    let txn = TandemClient::new_txn_id();
    let branches = transfer((&cluster.a, "alice"), (&cluster.b, "carol"), 10);
    let mut first = client(&coordinator).await;
    let answered = first
        .execute_2pc_with(&txn, branches.clone(), Some(Duration::from_secs(5)))
        .await;
    let crashed = match who {
        Who::Coordinator => &mut cluster.coordinator,
        Who::BankA => &mut cluster.a,
        Who::BankB => &mut cluster.b,
        Who::Nobody => unreachable!(),
    };
    crashed.expect_crash(point).await;
    assert_eq!(
        answered.is_ok(),
        expect_client_answer,
        "{point}: client answer {answered:?}"
    );
    crashed.start(None).await;
    // A retry with the same id gets the outcome (the original one if the client heard it).
    let outcome = execute_until_answered(&coordinator, &txn, branches).await;
    if let Ok(told) = answered {
        assert_eq!(
            outcome, told,
            "{point}: a retry must return the outcome the client was told"
        );
    }
    let mut client = client(&coordinator).await;
    let finished = wait_finished(&mut client, &txn).await;
    assert_eq!(
        std::mem::discriminant(&finished),
        std::mem::discriminant(&outcome),
        "{point}"
    );
    let (a, b) = cluster.stop_banks().await;
    assert_eq!(
        (a.clone(), b.clone()),
        expected_for(&outcome, 10),
        "{point}: balances after {outcome:?}"
    );
    assert_eq!(total(&[&a, &b]), 160, "{point}: money not conserved");
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_crash_after_prepare_persisted_aborts_and_restart_releases_the_hold() {
    let outcome = crash_and_recover(
        Crash(Who::BankA, "participant.after_prepare_persisted"),
        true,
    )
    .await;
    assert!(matches!(outcome, Outcome::Aborted { .. }), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_before_decision_persisted_never_half_commits() {
    // Nothing was decided: recovery aborts, or (if the undecided record was lost) the retry
    // runs the transaction again under the same id. Either way all or nothing.
    crash_and_recover(
        Crash(Who::Coordinator, "coordinator.before_decision_persisted"),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_after_decision_persisted_commits_after_restart() {
    let outcome = crash_and_recover(
        Crash(Who::Coordinator, "coordinator.after_decision_persisted"),
        false,
    )
    .await;
    assert_eq!(outcome, Outcome::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_crash_after_commit_applied_commits_exactly_once() {
    let outcome =
        crash_and_recover(Crash(Who::BankB, "participant.after_commit_applied"), true).await;
    assert_eq!(outcome, Outcome::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_transfers_conserve_money_and_match_what_clients_were_told() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Node::coordinator(&dir.path().join("coordinator"), None).await;
    let mut a = Node::bank("bank-a", &dir.path().join("bank-a"), "a1=100,a2=100", None).await;
    let mut b = Node::bank("bank-b", &dir.path().join("bank-b"), "b1=100,b2=100", None).await;
    let accounts = [(&a, "a1"), (&a, "a2"), (&b, "b1"), (&b, "b2")];
    let mut rng = tandem_common::SplitMix64::new(2026);
    let mut plan = Vec::new();
    for _ in 0..200 {
        let from = (rng.next_u64() % 4) as usize;
        let to = (from + 1 + (rng.next_u64() % 3) as usize) % 4;
        let amount = 1 + (rng.next_u64() % 60) as i64;
        plan.push((
            from,
            to,
            amount,
            transfer(accounts[from], accounts[to], amount),
        ));
    }
    let client = client(&coordinator.addr()).await;
    let outcomes = futures::future::join_all(plan.iter().map(|(_, _, _, branches)| {
        let mut client = client.clone();
        let branches = branches.clone();
        let txn = TandemClient::new_txn_id();
        async move {
            (
                txn.clone(),
                client
                    .execute_2pc_with(&txn, branches, None)
                    .await
                    .expect("transfer answered"),
            )
        }
    }))
    .await;
    let mut expected = [100i64; 4];
    let mut committed = 0;
    let mut waiter = client.clone();
    for ((txn, outcome), (from, to, amount, _)) in outcomes.iter().zip(&plan) {
        if *outcome == Outcome::Committed {
            expected[*from] -= amount;
            expected[*to] += amount;
            committed += 1;
        }
        assert_eq!(
            std::mem::discriminant(&wait_finished(&mut waiter, txn).await),
            std::mem::discriminant(outcome)
        );
    }
    // How many commit depends on how the 200 race for holds on four accounts; that both
    // outcomes occur is what makes the checks below meaningful.
    assert!(
        committed > 0 && committed < 200,
        "the workload should both commit and abort: {committed} committed"
    );
    a.stop().await;
    b.stop().await;
    let (balances_a, balances_b) = (a.balances(), b.balances());
    let actual = [
        balances_a["a1"],
        balances_a["a2"],
        balances_b["b1"],
        balances_b["b2"],
    ];
    assert_eq!(
        actual, expected,
        "balances differ from the committed transfers the clients were told of"
    );
    assert_eq!(actual.iter().sum::<i64>(), 400, "money not conserved");
    assert!(
        actual.iter().all(|&x| x >= 0),
        "negative balance: {actual:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_transfers_and_sagas_and_conserves_money() {
    let output = tokio::process::Command::new(&binaries().tandem)
        .args(["demo", "--transfers", "60", "--sagas", "40"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "committed: ",
        "aborted: ",
        "completed: ",
        "compensated: ",
        "(equal)",
    ] {
        assert!(
            stdout.contains(line),
            "demo output lacks {line:?}: {stdout}"
        );
    }
}
