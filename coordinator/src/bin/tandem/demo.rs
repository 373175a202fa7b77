//! `tandem demo`: a coordinator and two bank participants in one process, on temp folders.
//!
//! Performs transfers between accounts of the two banks, concurrently: two-phase-commit
//! transfers, some of which must abort (insufficient funds, an unknown account), then saga
//! transfers, some of which must compensate (a debit that fails, or a credit to an unknown
//! account after its debit succeeded). Then waits until no branch is left prepared and prints
//! what committed, aborted, completed and compensated, and the total money before and after
//! (equal, or the demo fails).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_common::SplitMix64;
use tandem_coordinator::{daemon, CoordinatorConfig};
use tandem_participant::{bank, Outcome, Participant, SagaOutcome, TandemClient};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// How many two-phase-commit transfers to perform.
    #[arg(long, default_value_t = 300)]
    transfers: u32,
    /// How many saga transfers to perform after them.
    #[arg(long, default_value_t = 100)]
    sagas: u32,
    /// How many run at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Seed of the transfer generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const ACCOUNTS: [&str; 3] = ["alice", "bob", "carol"];
const OPENING_BALANCE: i64 = 1_000;

async fn start_bank(
    dir: &std::path::Path,
) -> anyhow::Result<(Participant, String, oneshot::Sender<()>)> {
    let participant = bank::open(dir)?;
    let accounts: Vec<(String, i64)> = ACCOUNTS
        .iter()
        .map(|a| (a.to_string(), OPENING_BALANCE))
        .collect();
    bank::ensure_accounts(&participant, &accounts).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = participant.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((participant, addr, stop))
}

fn total(banks: &[&Participant]) -> anyhow::Result<i64> {
    let mut sum = 0;
    for b in banks {
        sum += bank::balances(b.db())?.values().sum::<i64>();
    }
    Ok(sum)
}

/// One transfer of the demo: from an account of one bank to an account of the other (or to
/// "mallory", who has no account: one in ten).
struct Transfer {
    from: (String, &'static str),
    to: (String, &'static str),
    amount: i64,
}

fn plan_transfers(rng: &mut SplitMix64, n: u32, addr_a: &str, addr_b: &str) -> Vec<Transfer> {
    (0..n)
        .map(|_| {
            let (from_bank, to_bank) = if rng.next_u64().is_multiple_of(2) {
                (addr_a, addr_b)
            } else {
                (addr_b, addr_a)
            };
            let from = ACCOUNTS[(rng.next_u64() % 3) as usize];
            let to = if rng.next_u64().is_multiple_of(10) {
                "mallory"
            } else {
                ACCOUNTS[(rng.next_u64() % 3) as usize]
            };
            // Amounts up to 400 drain accounts over time: some debits fail.
            let amount = 1 + (rng.next_u64() % 400) as i64;
            Transfer {
                from: (from_bank.to_string(), from),
                to: (to_bank.to_string(), to),
                amount,
            }
        })
        .collect()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.transfers == 0 || args.concurrency == 0 {
        bail!("--transfers and --concurrency must be at least 1");
    }
    let folders = tempfile::tempdir().context("creating temp folders")?;
    let coordinator_listener = TcpListener::bind("127.0.0.1:0").await?;
    let coordinator_addr = coordinator_listener.local_addr()?;
    let (stop_coordinator, coordinator_stopped) = oneshot::channel::<()>();
    let coordinator_dir = folders.path().join("coordinator");
    let coordinator = tokio::spawn(async move {
        daemon::run(
            coordinator_listener,
            &coordinator_dir,
            CoordinatorConfig::new(format!("http://{coordinator_addr}")),
            async {
                let _ = coordinator_stopped.await;
            },
        )
        .await
    });
    let (bank_a, addr_a, stop_a) = start_bank(&folders.path().join("bank-a")).await?;
    let (bank_b, addr_b, stop_b) = start_bank(&folders.path().join("bank-b")).await?;
    let before = total(&[&bank_a, &bank_b])?;
    println!("coordinator {coordinator_addr}; banks {addr_a} and {addr_b}, each with {ACCOUNTS:?} at {OPENING_BALANCE}");

    let client = TandemClient::connect(&coordinator_addr.to_string()).await?;
    let started = Instant::now();
    let mut rng = SplitMix64::new(args.seed);
    let plan: Vec<_> = plan_transfers(&mut rng, args.transfers, &addr_a, &addr_b)
        .into_iter()
        .map(|t| bank::transfer_branches((&t.from.0, t.from.1), (&t.to.0, t.to.1), t.amount))
        .collect();
    let results = futures::future::join_all(
        plan.chunks(args.transfers.div_ceil(args.concurrency) as usize)
            .map(|chunk| {
                let mut client = client.clone();
                let chunk = chunk.to_vec();
                async move {
                    let mut outcomes = Vec::new();
                    for branches in chunk {
                        outcomes.push(client.execute_2pc(branches).await);
                    }
                    outcomes
                }
            }),
    )
    .await;
    let elapsed = started.elapsed();

    let (mut committed, mut aborted) = (0u32, BTreeMap::<String, u32>::new());
    for outcome in results.into_iter().flatten() {
        match outcome? {
            Outcome::Committed => committed += 1,
            Outcome::Aborted { reason } => {
                let kind = if reason.contains("insufficient funds") {
                    "insufficient funds"
                } else if reason.contains("no account") {
                    "unknown account"
                } else {
                    "other"
                };
                *aborted.entry(kind.to_string()).or_default() += 1;
            }
        }
    }
    // Saga transfers: submitted at once (each returns as soon as it is accepted), then waited.
    let sagas_started = Instant::now();
    let saga_plan = plan_transfers(&mut rng, args.sagas, &addr_a, &addr_b);
    let saga_results = futures::future::join_all(
        saga_plan
            .chunks(args.sagas.max(1).div_ceil(args.concurrency) as usize)
            .map(|chunk| {
                let client = client.clone();
                let sagas: Vec<_> = chunk
                    .iter()
                    .map(|t| {
                        bank::transfer_saga((&t.from.0, t.from.1), (&t.to.0, t.to.1), t.amount)
                    })
                    .collect();
                async move {
                    let mut outcomes = Vec::new();
                    for saga in sagas {
                        let id = client.submit_saga(saga).await?;
                        outcomes.push(client.wait(&id, Duration::from_secs(60)).await?);
                    }
                    Ok::<_, tandem_participant::Error>(outcomes)
                }
            }),
    )
    .await;
    let sagas_elapsed = sagas_started.elapsed();
    let (mut completed, mut compensated) = (0u32, BTreeMap::<String, u32>::new());
    for result in saga_results {
        for state in result? {
            match state.outcome() {
                Some(SagaOutcome::Completed) => completed += 1,
                Some(SagaOutcome::Compensated { failed_step, .. }) => {
                    *compensated
                        .entry(format!("{failed_step} failed"))
                        .or_default() += 1;
                }
                other => bail!("saga {} ended {other:?}", state.id),
            }
        }
    }

    // Commits are delivered after the client hears the outcome: wait until none is pending.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(bank_a.prepared_branches()?.is_empty() && bank_b.prepared_branches()?.is_empty()) {
        if Instant::now() > deadline {
            bail!("branches still prepared 30 s after the last transfer");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = total(&[&bank_a, &bank_b])?;
    let aborted_total: u32 = aborted.values().sum();
    println!("transfers: {} in {:.2?}", args.transfers, elapsed);
    println!("committed: {committed}");
    println!("aborted:   {aborted_total} {aborted:?}");
    let compensated_total: u32 = compensated.values().sum();
    println!("sagas:     {} in {:.2?}", args.sagas, sagas_elapsed);
    println!("completed: {completed}");
    println!("compensated: {compensated_total} {compensated:?}");
    println!(
        "money before: {before}, after: {after} ({})",
        if before == after {
            "equal"
        } else {
            "NOT EQUAL"
        }
    );
    println!(
        "bank A: {}",
        serde_json::to_string(&bank::balances(bank_a.db())?)?
    );
    println!(
        "bank B: {}",
        serde_json::to_string(&bank::balances(bank_b.db())?)?
    );
    let _ = (stop_a.send(()), stop_b.send(()), stop_coordinator.send(()));
    coordinator.await??;
    if before != after {
        bail!("money was not conserved: {before} before, {after} after");
    }
    Ok(())
}
