//! `tandem bench 2pc` and `tandem bench saga`: throughput and latency of two-phase commit and
//! of sagas, beside the bare RPC rate.
//!
//! The coordinator and each bank participant run as separate processes (this binary, with
//! `serve` and the hidden `bench-participant`), on temp folders, as in production. The
//! benchmark process is the client: `--concurrency` closed loops of transfers between random
//! accounts (`--accounts` per bank, so they rarely contend) in two different banks. Before the
//! load it measures, in the same run, the rate of a bare gRPC ping to the coordinator with the
//! same concurrency, and prints
//! `efficiency = tps × RPCs per transaction / ping rate`
//! (a transfer costs 5 RPCs: execute, two prepares, two commits).
//!
//! `bench saga` runs sequential sagas of `--steps` steps (a debit, then credits spread over
//! the banks) and measures submit-to-completion (the client waits with `WaitSaga`, a parked
//! call); a saga costs `steps + 1` RPCs on its critical path (submit, one action per step).
//! `--submit-only` measures accepted submissions per second instead (submit to the durable
//! answer): the coordinator holds saga execution (`--hold-sagas`, as an operator can), so
//! the figure is what acceptance alone sustains — one RPC and one group-committed forced write
//! per saga. With `--live` the sagas run alongside, as they would in production; on a small
//! machine they then compete with acceptance for the same cores (each runs 3 more RPCs and
//! forced writes), and the figure drops to what both together sustain. `--drain` then runs
//! the backlog: execution resumes and the benchmark waits for every saga it submitted,
//! printing how long that took and the outcomes (so a held burst is seen to terminate).
//!
//! While the load runs, progress goes to stderr ([`tandem_common::progress`]): a bar on a
//! terminal, a plain line every few seconds otherwise, counting outcomes since the start
//! (warm-up included).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use tandem_common::child::ChildServer;
use tandem_common::progress::Progress;
use tandem_common::SplitMix64;
use tandem_participant::{bank, Outcome, Saga, SagaOutcome, Step, TandemClient};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Two-phase-commit transfers between bank participants.
    #[command(name = "2pc")]
    TwoPc(TwoPcArgs),
    /// Saga transfers: a debit and credits, as a sequence.
    Saga(SagaArgs),
    /// (internal) A bank participant process for the benchmark.
    #[command(hide = true)]
    Participant(ParticipantArgs),
}

#[derive(clap::Args, Debug)]
pub struct SagaArgs {
    /// Steps per saga (at least 2: a debit and one credit).
    #[arg(long, default_value_t = 3)]
    steps: u32,
    /// Bank participant processes; the steps are spread over them.
    #[arg(long, default_value_t = 2)]
    participants: u32,
    /// Measure accepted submissions per second, without waiting for completion (saga
    /// execution held: acceptance alone).
    #[arg(long)]
    submit_only: bool,
    /// With --submit-only: run the sagas alongside the submissions instead of holding them.
    #[arg(long, requires = "submit_only")]
    live: bool,
    /// With --submit-only: afterwards, resume execution (if held) and wait until every saga
    /// submitted has finished; prints how long the backlog took and its outcomes.
    #[arg(long, requires = "submit_only")]
    drain: bool,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(clap::Args, Debug)]
pub struct TwoPcArgs {
    /// Bank participant processes (at least 2: a transfer spans two banks).
    #[arg(long, default_value_t = 2)]
    participants: u32,
    #[command(flatten)]
    load: LoadArgs,
}

/// The load options both benchmarks share.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Transactions (or sagas) in flight at once, each a closed loop.
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
    /// Clients of the coordinator (each its own connection) shared by the closed loops and
    /// the pings. One by default, as a service holds one `TandemClient` whose clones share
    /// it: concurrent submissions then share `SubmitSagas` calls and waits share one stream.
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 || self.accounts == 0 || self.connections == 0 {
            bail!("--concurrency, --accounts and --connections must be at least 1");
        }
        Ok(())
    }
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

pub use tandem_common::duration::parse_duration;

const RPCS_PER_TRANSFER: f64 = 5.0;
const BALANCE: i64 = 1_000_000_000;

fn account(i: u64) -> String {
    format!("acct-{i:05}")
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::TwoPc(args) => two_pc(args).await,
        BenchCommand::Saga(args) => saga(args).await,
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

/// How often the progress display is given the counters.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The outcome counts (one or two) the closed loops bump as they go, for the progress display.
struct Tally {
    names: &'static [&'static str],
    counts: [AtomicU64; 2],
}

impl Tally {
    fn new(names: &'static [&'static str]) -> Arc<Tally> {
        assert!(
            matches!(names.len(), 1 | 2),
            "a tally counts one or two outcomes"
        );
        Arc::new(Tally {
            names,
            counts: Default::default(),
        })
    }

    /// Counts one outcome: the first name's if `first`, else the second's.
    fn add(&self, first: bool) {
        self.counts[usize::from(!first)].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> Vec<(&'static str, u64)> {
        self.names
            .iter()
            .zip(&self.counts)
            .map(|(name, count)| (*name, count.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Shows the tally's progress until [`ProgressTask::finish`].
struct ProgressTask {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressTask {
    fn start(label: &str, total: Duration, tally: Arc<Tally>) -> ProgressTask {
        let mut progress = Progress::start(label, total);
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = every.tick() => progress.update(&tally.read()),
                }
            }
            progress.finish(&tally.read());
        });
        ProgressTask { stop, task }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One closed loop's result: latencies in µs, then its two outcome counts.
type LoopResult = Result<(Vec<u64>, u64, u64), tandem_participant::Error>;

/// Adds the loops' counts and returns them with the p50, p99 and p999 latency in ms.
fn summarize(loops: Vec<LoopResult>, what: &str) -> anyhow::Result<(u64, u64, (f64, f64, f64))> {
    let (mut latencies, mut first, mut second) = (Vec::new(), 0, 0);
    for result in loops {
        let (l, a, b) = result.map_err(|e| anyhow!("{what} failed: {e}"))?;
        latencies.extend(l);
        first += a;
        second += b;
    }
    latencies.sort_unstable();
    let percentiles = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 99.9),
    );
    Ok((first, second, percentiles))
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
    args.load.check()?;
    let cluster = Cluster::start(args.participants, &args.load, &[]).await?;
    let (coordinator, bank_addrs, clients) =
        (&cluster.coordinator, &cluster.bank_addrs, &cluster.clients);
    if !args.load.json {
        eprintln!(
            "bench 2pc: coordinator {} + {} banks ({} accounts each), concurrency {} over {} client(s), {:?} after {:?} warm-up",
            coordinator.address(), args.participants, args.load.accounts, args.load.concurrency, args.load.connections, args.load.duration, args.load.warmup
        );
    }

    // 1. The bare RPC rate between this process and the coordinator, same concurrency.
    let ping_rate = ping_rate(clients, args.load.concurrency, args.load.ping_duration).await?;

    // 2. Closed-loop transfers; latencies recorded only after the warm-up.
    let start = Instant::now();
    let measure_from = start + args.load.warmup;
    let end = measure_from + args.load.duration;
    let tally = Tally::new(&["committed", "aborted"]);
    let progress = ProgressTask::start(
        "bench 2pc",
        args.load.warmup + args.load.duration,
        tally.clone(),
    );
    let workers = futures::future::join_all((0..args.load.concurrency).map(|i| {
        let mut client = clients[i as usize % clients.len()].clone();
        let bank_addrs = bank_addrs.clone();
        let accounts = args.load.accounts as u64;
        let tally = tally.clone();
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
                tally.add(matches!(outcome, Outcome::Committed));
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
    progress.finish().await;
    let (committed, aborted, (p50, p99, p999)) = summarize(workers, "a transfer")?;
    let seconds = args.load.duration.as_secs_f64();
    let tps = committed as f64 / seconds;
    let efficiency = tps * RPCS_PER_TRANSFER / ping_rate;
    if args.load.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "2pc",
                "participants": args.participants,
                "concurrency": args.load.concurrency,
                "connections": args.load.connections,
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
            args.load.concurrency
        );
        println!("efficiency:  {efficiency:.2} (= tps x {RPCS_PER_TRANSFER} RPCs / ping rate)");
    }
    drop(cluster);
    Ok(())
}

/// The processes of one benchmark run, each on a temp folder and an OS-assigned port.
struct Cluster {
    coordinator: ChildServer,
    _banks: Vec<ChildServer>,
    bank_addrs: Vec<String>,
    /// The clients the closed loops share (`--connections`).
    clients: Vec<TandemClient>,
    _folders: tempfile::TempDir,
}

impl Cluster {
    async fn start(
        participants: u32,
        load: &LoadArgs,
        serve_args: &[&str],
    ) -> anyhow::Result<Cluster> {
        let accounts = load.accounts;
        let exe = std::env::current_exe().context("locating this executable")?;
        let folders = tempfile::tempdir()?;
        let spawn_timeout = Duration::from_secs(30);
        let mut coordinator_cmd = tokio::process::Command::new(&exe);
        coordinator_cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(serve_args)
            .arg("--data-dir")
            .arg(folders.path().join("coordinator"));
        let coordinator = ChildServer::spawn(coordinator_cmd, "coordinator", spawn_timeout).await?;
        let mut banks = Vec::new();
        for i in 0..participants {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args([
                "bench",
                "participant",
                "--listen",
                "127.0.0.1:0",
                "--accounts",
                &accounts.to_string(),
                "--data-dir",
            ])
            .arg(folders.path().join(format!("bank-{i}")));
            banks.push(ChildServer::spawn(cmd, &format!("bank-{i}"), spawn_timeout).await?);
        }
        let bank_addrs = banks.iter().map(|b| b.address()).collect();
        let mut clients = Vec::new();
        for _ in 0..load.connections {
            clients.push(TandemClient::connect(&coordinator.address()).await?);
        }
        Ok(Cluster {
            coordinator,
            _banks: banks,
            bank_addrs,
            clients,
            _folders: folders,
        })
    }
}

/// What `--drain` measured.
struct Drained {
    sagas: usize,
    seconds: f64,
    completed: u64,
    compensated: u64,
}

/// Most waits `--drain` keeps open at once (they share the client's `WaitSagas` stream).
const DRAIN_WAITS_IN_FLIGHT: usize = 1_024;
/// How long `--drain` waits for any one saga.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(600);

/// Resumes saga execution (if `resume`) and waits until every saga in `ids` is terminal.
async fn drain(
    cluster: &Cluster,
    resume: bool,
    ids: Vec<tandem_participant::TxnId>,
    quiet: bool,
) -> anyhow::Result<Drained> {
    use futures::StreamExt;
    let start = Instant::now();
    if resume {
        let mut admin = tandem_proto::v1::admin_client::AdminClient::connect(format!(
            "http://{}",
            cluster.coordinator.address()
        ))
        .await
        .context("connecting to the coordinator's admin service")?;
        admin
            .hold_sagas(tandem_proto::v1::HoldSagasRequest { hold: false })
            .await
            .context("resuming saga execution")?;
    }
    if !quiet {
        eprintln!("bench saga: draining {} sagas", ids.len());
    }
    let sagas = ids.len();
    let client = cluster.clients[0].clone();
    let mut waits = futures::stream::iter(ids)
        .map(|id| {
            let client = client.clone();
            async move {
                let state = client.wait(&id, DRAIN_WAIT_MAX).await?;
                Ok::<_, tandem_participant::Error>((id, state))
            }
        })
        .buffer_unordered(DRAIN_WAITS_IN_FLIGHT);
    let (mut completed, mut compensated) = (0, 0);
    while let Some(answer) = waits.next().await {
        let (id, state) = answer.map_err(|e| anyhow!("waiting for a drained saga: {e}"))?;
        match state.outcome() {
            Some(SagaOutcome::Completed) => completed += 1,
            Some(_) => compensated += 1,
            None => bail!("saga {id} did not finish within {DRAIN_WAIT_MAX:?}: {state:?}"),
        }
    }
    Ok(Drained {
        sagas,
        seconds: start.elapsed().as_secs_f64(),
        completed,
        compensated,
    })
}

/// Bare gRPC pings per second to the coordinator, `concurrency` calls in flight.
async fn ping_rate(
    clients: &[TandemClient],
    concurrency: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let end = Instant::now() + duration;
    let pings = futures::future::join_all((0..concurrency).map(|i| {
        let mut client = clients[i as usize % clients.len()].clone();
        async move {
            let mut n = 0u64;
            while Instant::now() < end {
                client.ping().await?;
                n += 1;
            }
            Ok::<u64, tandem_participant::Error>(n)
        }
    }))
    .await;
    Ok(pings.into_iter().sum::<Result<u64, _>>()? as f64 / duration.as_secs_f64())
}

/// One saga transfer of `steps` steps: a debit of `steps - 1` at one bank, then credits of 1,
/// each at the next bank in turn, between random accounts.
fn saga_transfer(bank_addrs: &[String], accounts: u64, steps: u32, rng: &mut SplitMix64) -> Saga {
    let banks = bank_addrs.len() as u64;
    let first = rng.next_u64() % banks;
    let from = account(rng.next_u64() % accounts);
    let credits = i64::from(steps) - 1;
    let mut list = vec![Step::new(
        "debit",
        bank_addrs[first as usize].clone(),
        bank::SAGA_STEP,
        bank::BankOp::Debit {
            account: from.clone(),
            amount: credits,
        }
        .encode(),
        bank::BankOp::Credit {
            account: from,
            amount: credits,
        }
        .encode(),
    )];
    for i in 1..steps {
        let at = &bank_addrs[((first + u64::from(i)) % banks) as usize];
        let to = account(rng.next_u64() % accounts);
        list.push(Step::new(
            format!("credit-{i}"),
            at.clone(),
            bank::SAGA_STEP,
            bank::BankOp::Credit {
                account: to.clone(),
                amount: 1,
            }
            .encode(),
            bank::BankOp::Debit {
                account: to,
                amount: 1,
            }
            .encode(),
        ));
    }
    Saga::sequence(list)
}

async fn saga(args: SagaArgs) -> anyhow::Result<()> {
    if args.steps < 2 || args.steps > 32 {
        bail!("--steps must be between 2 and 32 (a debit and at least one credit)");
    }
    if args.participants == 0 {
        bail!("--participants must be at least 1");
    }
    args.load.check()?;
    // Submissions outrun execution in --submit-only: let the backlog grow instead of
    // measuring the admission limit.
    let serve_args: &[&str] = match (args.submit_only, args.live) {
        (true, false) => &["--saga-in-flight-max", "10000000", "--hold-sagas"],
        (true, true) => &["--saga-in-flight-max", "10000000"],
        (false, _) => &[],
    };
    let cluster = Cluster::start(args.participants, &args.load, serve_args).await?;
    let mode = match (args.submit_only, args.live) {
        (true, false) => "submit-only, execution held",
        (true, true) => "submit-only, sagas running alongside",
        (false, _) => "submit to completion",
    };
    if !args.load.json {
        eprintln!(
            "bench saga: coordinator {} + {} banks ({} accounts each), {} steps, concurrency {} over {} client(s), {mode}, {:?} after {:?} warm-up",
            cluster.coordinator.address(), args.participants, args.load.accounts, args.steps, args.load.concurrency, args.load.connections, args.load.duration, args.load.warmup
        );
    }
    let ping_rate = ping_rate(
        &cluster.clients,
        args.load.concurrency,
        args.load.ping_duration,
    )
    .await?;

    let start = Instant::now();
    let measure_from = start + args.load.warmup;
    let end = measure_from + args.load.duration;
    let tally = Tally::new(if args.submit_only {
        &["accepted"]
    } else {
        &["completed", "compensated"]
    });
    let progress = ProgressTask::start(
        "bench saga",
        args.load.warmup + args.load.duration,
        tally.clone(),
    );
    // Every saga submitted, for --drain.
    let submitted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers = futures::future::join_all((0..args.load.concurrency).map(|i| {
        let client = cluster.clients[i as usize % cluster.clients.len()].clone();
        let bank_addrs = cluster.bank_addrs.clone();
        let (accounts, steps, submit_only) =
            (u64::from(args.load.accounts), args.steps, args.submit_only);
        let tally = tally.clone();
        let submitted = (args.drain).then(|| submitted.clone());
        async move {
            let mut rng = SplitMix64::new(0x5a6a ^ u64::from(i));
            let (mut latencies, mut completed, mut compensated) = (Vec::new(), 0u64, 0u64);
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let id = client
                    .submit_saga(saga_transfer(&bank_addrs, accounts, steps, &mut rng))
                    .await?;
                if let Some(submitted) = &submitted {
                    submitted.lock().expect("not poisoned").push(id.clone());
                }
                let state = if submit_only {
                    None
                } else {
                    Some(client.wait(&id, Duration::from_secs(60)).await?)
                };
                let done = Instant::now();
                let outcome = state.as_ref().and_then(|s| s.outcome());
                tally.add(submit_only || matches!(outcome, Some(SagaOutcome::Completed)));
                if now >= measure_from && done <= end {
                    latencies.push(done.duration_since(now).as_micros() as u64);
                    match outcome {
                        None if submit_only => completed += 1,
                        Some(SagaOutcome::Completed) => completed += 1,
                        Some(_) => compensated += 1,
                        None => {
                            return Err(tandem_participant::Error::Unavailable(format!(
                                "saga {id} did not finish within 60 s"
                            )))
                        }
                    }
                }
            }
            Ok::<_, tandem_participant::Error>((latencies, completed, compensated))
        }
    }))
    .await;
    progress.finish().await;
    let (completed, compensated, (p50, p99, p999)) = summarize(workers, "a saga")?;
    let seconds = args.load.duration.as_secs_f64();
    let rate = completed as f64 / seconds;
    let rpcs = f64::from(args.steps + 1);
    let efficiency = rate * rpcs / ping_rate;
    let drained = if args.drain {
        let ids = std::mem::take(&mut *submitted.lock().expect("not poisoned"));
        Some(drain(&cluster, !args.live, ids, args.load.json).await?)
    } else {
        None
    };
    if args.load.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "saga",
                "mode": match (args.submit_only, args.live) {
                    (true, false) => "submit-only",
                    (true, true) => "submit-only-live",
                    (false, _) => "completion",
                },
                "steps": args.steps,
                "participants": args.participants,
                "concurrency": args.load.concurrency,
                "connections": args.load.connections,
                "duration_s": seconds,
                "completed": if args.submit_only { 0 } else { completed },
                "accepted": completed + compensated,
                "compensated": compensated,
                "per_second": rate,
                "latency_ms": { "p50": p50, "p99": p99, "p999": p999 },
                "ping_rate": ping_rate,
                "rpcs_per_saga": rpcs,
                "efficiency": if args.submit_only { serde_json::Value::Null } else { efficiency.into() },
                "drain": drained.as_ref().map(|d| serde_json::json!({
                    "sagas": d.sagas,
                    "seconds": d.seconds,
                    "per_second": d.sagas as f64 / d.seconds,
                    "completed": d.completed,
                    "compensated": d.compensated,
                })),
            })
        );
    } else if args.submit_only {
        println!("accepted:    {completed} in {seconds:.1} s");
        let running = if args.live {
            "sagas running alongside"
        } else {
            "execution held: acceptance alone"
        };
        println!("throughput:  {rate:.0} submissions/s ({running})");
        println!(
            "latency:     p50 {p50:.2} ms, p99 {p99:.2} ms, p999 {p999:.2} ms (submit to accepted)"
        );
        println!(
            "ping rate:   {ping_rate:.0} calls/s (bare gRPC, same run, concurrency {})",
            args.load.concurrency
        );
        if let Some(d) = &drained {
            println!(
                "drained:     {} sagas in {:.1} s ({:.0} sagas/s): {} completed, {} compensated",
                d.sagas,
                d.seconds,
                d.sagas as f64 / d.seconds,
                d.completed,
                d.compensated
            );
        }
    } else {
        println!("completed:   {completed} in {seconds:.1} s ({compensated} compensated)");
        println!("throughput:  {rate:.0} sagas/s");
        println!("latency:     p50 {p50:.2} ms, p99 {p99:.2} ms, p999 {p999:.2} ms (submit to completion)");
        println!(
            "ping rate:   {ping_rate:.0} calls/s (bare gRPC, same run, concurrency {})",
            args.load.concurrency
        );
        println!("efficiency:  {efficiency:.2} (= sagas/s x {rpcs} RPCs / ping rate)");
    }
    drop(cluster);
    Ok(())
}
