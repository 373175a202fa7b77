//! Retention end to end: a steady workload of 2PC and saga transfers, in rounds, against a
//! real coordinator and two real banks. After each round every process is stopped, the live
//! records in their logs are counted (sled's size on disk grows in segments and says little;
//! the number of records is the honest measure), and the processes are restarted.
//!
//! With a short retention (1 s, ids refused after 1 s) the counts stay under one round's
//! worth whatever the number of rounds; with retention off (`forever`) they grow by one
//! round's worth every round. Both are asserted, so the test tells the two apart. The data
//! folders' sizes are printed beside the counts.

use std::path::Path;
use std::time::Duration;

use tandem_participant::{bank, Branch, Error, Outcome, TandemClient, TxnId};
use tandem_tests::{client, transfer, Node};

const ROUNDS: usize = 4;
const TRANSFERS_PER_ROUND: usize = 30;
const SAGAS_PER_ROUND: usize = 20;
/// Pause after each round's workload, before counting, with retention on: longer than
/// what a record needs to become prunable (1 s retention, 1 s id age plus the coordinator's
/// 1 s margin) plus a few prune intervals.
const PRUNE_SETTLE: Duration = Duration::from_millis(3_500);

/// Live records after a round: the coordinator's, and both banks' SDK logs together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    coordinator: usize,
    banks: usize,
}

/// Records in the named trees of the stopped server whose data is in `dir`.
fn count_records(dir: &Path, trees: &[&str]) -> usize {
    let db = sled::open(dir).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()));
    trees
        .iter()
        .map(|t| db.open_tree(t).expect("open tree").len())
        .sum()
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => folder_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

const COORDINATOR_TREES: [&str; 3] = [
    "tandem.coordinator.txns",
    "tandem.coordinator.saga_specs",
    "tandem.coordinator.saga_progress",
];
const BANK_TREES: [&str; 3] = [
    "tandem.participant.branches",
    "tandem.participant.steps",
    "tandem.participant.saga_callbacks",
];

/// What one round leaves in the logs when nothing is pruned: one record per transaction and
/// two per saga at the coordinator; one branch per transaction and one step per saga at each
/// bank.
fn round_records() -> Counts {
    Counts {
        coordinator: TRANSFERS_PER_ROUND + 2 * SAGAS_PER_ROUND,
        banks: 2 * (TRANSFERS_PER_ROUND + SAGAS_PER_ROUND),
    }
}

/// One round's workload; returns the first 2PC transaction's id and branches.
async fn workload(addr: &str, a: &Node, b: &Node) -> (TxnId, Vec<Branch>) {
    let mut c: TandemClient = client(addr).await;
    let branches = transfer((a, "alice"), (b, "bob"), 1);
    let first = TandemClient::new_txn_id();
    let outcome = c
        .execute_2pc_with(&first, branches.clone(), None)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed, "{first}");
    let transfers = (1..TRANSFERS_PER_ROUND).map(|_| {
        let mut c = c.clone();
        let branches = branches.clone();
        async move { c.execute_2pc(branches).await }
    });
    for outcome in futures::future::join_all(transfers).await {
        assert!(matches!(outcome, Ok(Outcome::Committed)), "{outcome:?}");
    }
    let sagas = (0..SAGAS_PER_ROUND).map(|_| {
        let c = c.clone();
        let saga = bank::transfer_saga((&a.addr(), "alice"), (&b.addr(), "bob"), 1);
        async move {
            let id = c.submit_saga(saga).await?;
            c.wait(&id, Duration::from_secs(30)).await
        }
    });
    for state in futures::future::join_all(sagas).await {
        let state = state.unwrap();
        assert!(state.terminal, "{state:?}");
    }
    (first, branches)
}

/// Runs the rounds with the given retention flags and returns the counts after each round.
async fn run(
    label: &str,
    coordinator_args: &[&str],
    bank_args: &[&str],
    settle: Duration,
) -> Vec<Counts> {
    let root = tempfile::tempdir().unwrap();
    let dirs = ["coordinator", "a", "b"].map(|d| root.path().join(d));
    let mut a = Node::bank_with_args("bank-a", &dirs[1], "alice=1000000", bank_args, None).await;
    let mut b = Node::bank_with_args("bank-b", &dirs[2], "bob=1000000", bank_args, None).await;
    let mut coordinator = Node::coordinator_with_args(&dirs[0], coordinator_args, None).await;
    let mut counts = Vec::new();
    let mut first = None;
    for round in 1..=ROUNDS {
        let this = workload(&coordinator.addr(), &a, &b).await;
        first.get_or_insert(this);
        tokio::time::sleep(settle).await;
        coordinator.stop().await;
        a.stop().await;
        b.stop().await;
        let now = Counts {
            coordinator: count_records(&dirs[0], &COORDINATOR_TREES),
            banks: count_records(&dirs[1], &BANK_TREES) + count_records(&dirs[2], &BANK_TREES),
        };
        println!(
            "{label} round {round}: records {now:?}; folder bytes coordinator {}, bank a {}, bank b {}",
            folder_bytes(&dirs[0]),
            folder_bytes(&dirs[1]),
            folder_bytes(&dirs[2])
        );
        counts.push(now);
        let balances = [a.balances(), b.balances()];
        assert_eq!(
            tandem_tests::total(&[&balances[0], &balances[1]]),
            2_000_000,
            "{label} round {round}: money is conserved"
        );
        a.start(None).await;
        b.start(None).await;
        coordinator.start(None).await;
    }
    if label == "pruning" {
        // A late duplicate of a forgotten transaction is refused, not run again.
        let (old, branches) = first.clone().unwrap();
        let mut c = client(&coordinator.addr()).await;
        let retry = c.execute_2pc_with(&old, branches, None).await;
        assert!(
            matches!(&retry, Err(Error::InvalidArgument(m)) if m.contains("refused")),
            "a retry of pruned {old}: {retry:?}"
        );
        let shown = c.get(&old).await;
        assert!(
            matches!(
                &shown,
                Err(Error::Coordinator {
                    code: tonic::Code::NotFound,
                    ..
                })
            ),
            "txn show of pruned {old}: {shown:?}"
        );
    }
    coordinator.stop().await;
    a.stop().await;
    b.stop().await;
    drop(root); // the folders live until every process has stopped
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_workload_keeps_live_records_bounded_only_with_retention() {
    let per_round = round_records();
    let (pruned, kept) = tokio::join!(
        run(
            "pruning",
            &["--retention", "1s", "--txn-id-age-max", "1s"],
            &["--retention", "1s"],
            PRUNE_SETTLE,
        ),
        run(
            "keeping",
            &["--retention", "forever"],
            &["--retention", "forever"],
            Duration::ZERO,
        ),
    );
    println!("one round's records: {per_round:?}\npruning: {pruned:?}\nkeeping: {kept:?}");
    // Without retention, every round adds exactly its records.
    for (round, counts) in kept.iter().enumerate() {
        let rounds = round + 1;
        assert_eq!(
            *counts,
            Counts {
                coordinator: rounds * per_round.coordinator,
                banks: rounds * per_round.banks,
            },
            "keeping, after round {rounds}"
        );
    }
    // With it, after every round (the first is the warm-up) the logs hold less than one
    // round's worth, however many rounds ran.
    for (round, counts) in pruned.iter().enumerate() {
        assert!(
            counts.coordinator < per_round.coordinator && counts.banks < per_round.banks,
            "pruning, after round {}: {counts:?} is not under one round's {per_round:?}",
            round + 1
        );
    }
}
