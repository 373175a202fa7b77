//! `tandem bench 2pc`: throughput and latency of two-phase commit, beside the bare RPC rate.
//!
//! The coordinator and each bank participant run as separate processes (this binary, with
//! `serve` and the hidden `bench-participant`), on temp folders, as in production. The
//! benchmark process is the client: `--concurrency` closed loops of transfers between random
//! accounts (`--accounts` per bank, so they rarely contend) in two different banks. Before the
//! load it measures, in the same run, the rate of a bare gRPC ping to the coordinator with the
//! same concurrency, and prints
//! `efficiency = tps × RPCs per transaction / ping rate`
//! (a transfer costs 5 RPCs: execute, two prepares, two commits).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use tandem_common::child::ChildServer;
use tandem_common::SplitMix64;
use tandem_participant::{bank, Outcome, TandemClient};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Two-phase-commit transfers between bank participants.
    #[command(name = "2pc")]
    TwoPc(TwoPcArgs),
    /// (internal) A bank participant process for the benchmark.
    #[command(hide = true)]
    Participant(ParticipantArgs),
}

#[derive(clap::Args, Debug)]
pub struct TwoPcArgs {
    /// Bank participant processes (at least 2: a transfer spans two banks).
    #[arg(long, default_value_t = 2)]
    participants: u32,
    /// Transactions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// How long to measure, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before measuring (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// How long to measure the bare ping rate.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    ping_duration: Duration,
    /// Accounts per bank.
    #[arg(long, default_value_t = 1_000)]
    accounts: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ParticipantArgs {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    accounts: u32,
}

/// Parses `10s`, `500ms`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 500ms or 2m"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if duration.is_zero() {
        return Err(format!("{text:?}: the duration must be positive"));
    }
    Ok(duration)
}

const RPCS_PER_TRANSFER: f64 = 5.0;
const BALANCE: i64 = 1_000_000_000;

fn account(i: u64) -> String {
    format!("acct-{i:05}")
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::TwoPc(args) => two_pc(args).await,
        BenchCommand::Participant(args) => participant(args).await,
    }
}

async fn participant(args: ParticipantArgs) -> anyhow::Result<()> {
    let participant = bank::open(&args.data_dir)?;
    let accounts: Vec<(String, i64)> = (0..args.accounts as u64)
        .map(|i| (account(i), BALANCE))
        .collect();
    bank::ensure_accounts(&participant, &accounts).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("bench participant listening on {}", listener.local_addr()?);
    participant
        .serve(listener, crate::shutdown_signal())
        .await?;
    Ok(())
}

fn percentile(sorted_micros: &[u64], p: f64) -> f64 {
    if sorted_micros.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted_micros.len() - 1) as f64).round() as usize;
    sorted_micros[rank] as f64 / 1000.0
}

async fn two_pc(args: TwoPcArgs) -> anyhow::Result<()> {
    if args.participants < 2 {
        bail!("--participants must be at least 2 (a transfer debits one bank and credits another)");
    }
    if args.concurrency == 0 || args.accounts == 0 {
        bail!("--concurrency and --accounts must be at least 1");
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let folders = tempfile::tempdir()?;
    let spawn_timeout = Duration::from_secs(30);
    let mut coordinator_cmd = tokio::process::Command::new(&exe);
    coordinator_cmd
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(folders.path().join("coordinator"));
    let coordinator = ChildServer::spawn(coordinator_cmd, "coordinator", spawn_timeout).await?;
    let mut banks = Vec::new();
    for i in 0..args.participants {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "bench",
            "participant",
            "--listen",
            "127.0.0.1:0",
            "--accounts",
            &args.accounts.to_string(),
            "--data-dir",
        ])
        .arg(folders.path().join(format!("bank-{i}")));
        banks.push(ChildServer::spawn(cmd, &format!("bank-{i}"), spawn_timeout).await?);
    }
    let bank_addrs: Vec<String> = banks.iter().map(|b| b.address()).collect();
    let connections = args.concurrency.clamp(1, 8);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(TandemClient::connect(&coordinator.address()).await?);
    }
    if !args.json {
        eprintln!(
            "bench 2pc: coordinator {} + {} banks ({} accounts each), concurrency {}, {:?} after {:?} warm-up",
            coordinator.address(), args.participants, args.accounts, args.concurrency, args.duration, args.warmup
        );
    }

    // 1. The bare RPC rate between this process and the coordinator, same concurrency.
    let ping_end = Instant::now() + args.ping_duration;
    let pings = futures::future::join_all((0..args.concurrency).map(|i| {
        let mut client = clients[i as usize % clients.len()].clone();
        async move {
            let mut n = 0u64;
            while Instant::now() < ping_end {
                client.ping().await?;
                n += 1;
            }
            Ok::<u64, tandem_participant::Error>(n)
        }
    }))
    .await;
    let ping_rate =
        pings.into_iter().sum::<Result<u64, _>>()? as f64 / args.ping_duration.as_secs_f64();

    // 2. Closed-loop transfers; latencies recorded only after the warm-up.
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let workers = futures::future::join_all((0..args.concurrency).map(|i| {
        let mut client = clients[i as usize % clients.len()].clone();
        let bank_addrs = bank_addrs.clone();
        let accounts = args.accounts as u64;
        async move {
            let mut rng = SplitMix64::new(0x5eed ^ i as u64);
            let (mut latencies, mut committed, mut aborted) = (Vec::new(), 0u64, 0u64);
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let banks = bank_addrs.len() as u64;
                let from_bank = rng.next_u64() % banks;
                let to_bank = (from_bank + 1 + rng.next_u64() % (banks - 1)) % banks;
                let branches = bank::transfer_branches(
                    (
                        &bank_addrs[from_bank as usize],
                        &account(rng.next_u64() % accounts),
                    ),
                    (
                        &bank_addrs[to_bank as usize],
                        &account(rng.next_u64() % accounts),
                    ),
                    1,
                );
                let outcome = client.execute_2pc(branches).await?;
                let done = Instant::now();
                if now >= measure_from && done <= end {
                    latencies.push(done.duration_since(now).as_micros() as u64);
                    match outcome {
                        Outcome::Committed => committed += 1,
                        Outcome::Aborted { .. } => aborted += 1,
                    }
                }
            }
            Ok::<_, tandem_participant::Error>((latencies, committed, aborted))
        }
    }))
    .await;
    let (mut latencies, mut committed, mut aborted) = (Vec::new(), 0, 0);
    for worker in workers {
        let (l, c, a) = worker.map_err(|e| anyhow!("a transfer failed: {e}"))?;
        latencies.extend(l);
        committed += c;
        aborted += a;
    }
    latencies.sort_unstable();
    let seconds = args.duration.as_secs_f64();
    let tps = committed as f64 / seconds;
    let efficiency = tps * RPCS_PER_TRANSFER / ping_rate;
    let (p50, p99, p999) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "2pc",
                "participants": args.participants,
                "concurrency": args.concurrency,
                "duration_s": seconds,
                "committed": committed,
                "aborted": aborted,
                "tps": tps,
                "latency_ms": { "p50": p50, "p99": p99, "p999": p999 },
                "ping_rate": ping_rate,
                "rpcs_per_txn": RPCS_PER_TRANSFER,
                "efficiency": efficiency,
            })
        );
    } else {
        println!("committed:   {committed} in {seconds:.1} s ({aborted} aborted)");
        println!("throughput:  {tps:.0} txn/s");
        println!("latency:     p50 {p50:.2} ms, p99 {p99:.2} ms, p999 {p999:.2} ms");
        println!(
            "ping rate:   {ping_rate:.0} calls/s (bare gRPC, same run, concurrency {})",
            args.concurrency
        );
        println!("efficiency:  {efficiency:.2} (= tps x {RPCS_PER_TRANSFER} RPCs / ping rate)");
    }
    drop(banks);
    drop(coordinator);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_problem() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
    }
}
