//! The real-process chaos run: a coordinator and three banks as real processes, a workload of
//! 2PC and saga transfers, and seeded faults — kills, partitions, connection resets, latency
//! — then a check of what the banks stored against what the clients were told.
//!
//! The seeded simulation (`sim`) runs the real engines with modelled storage and network;
//! this runs the real binaries, sled, gRPC and TCP, so it finds what the models leave out
//! (a flush that is not where the code says, a connection that hangs, a restart that forgets).
//! It is not deterministic: the seed fixes the faults and the operations each client draws,
//! real time decides how they interleave.
//!
//! A run ([`run`]):
//!
//! 1. starts a proxy per server, the coordinator (advertising its proxy) and the banks, each
//!    on a fresh folder ([`cluster`]);
//! 2. runs the clients ([`workload`]) and the fault schedule ([`schedule::plan`], carried out
//!    by [`Cluster::run_faults`], one task per server) for the run's duration, reporting
//!    progress every [`PROGRESS_EVERY`];
//! 3. heals every fault, restarts what is down, and settles: asks the coordinator for the
//!    final state of every 2PC transaction and saga the clients tried, until each is final
//!    or the settling time runs out; stops every process and looks for prepared branches,
//!    restarting the banks (whose in-doubt resolver asks about every prepared branch at
//!    start-up) at most [`RESTART_ROUNDS_MAX`] times while some remain;
//! 4. reads every bank's folder and checks the invariants ([`check`]), and returns the
//!    [`Report`].
//!
//! The `chaos` binary (`tests/src/bin/chaos.rs`) runs it from the command line;
//! `tests/tests/chaos.rs` runs a short fixed seed in CI.

pub mod check;
pub mod cluster;
pub mod proxy;
pub mod report;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_participant::{Error as SdkError, TandemClient, TxnId};
use tandem_proto::v1 as pb;

use check::{BankData, Evidence, FinalSaga, FinalTxn};
use cluster::Cluster;
use report::{OpCounts, SettleInfo};
pub use report::{Progress, Report};
use schedule::Target;
use workload::{ClientConfig, History, OpKind, Recorder};

/// How often the progress callback is called.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long after the end of the run the clients may take to finish their last operation
/// before it is cancelled (each call is bounded well below this).
const CLIENT_GRACE: Duration = Duration::from_secs(30);
/// Most restarts of the banks to resolve branches still prepared at the end.
pub const RESTART_ROUNDS_MAX: u32 = 3;
/// How long a restart round waits for the banks' in-doubt resolvers (their first round
/// runs at start-up) and the coordinator's redeliveries.
const RESTART_ROUND_WAIT: Duration = Duration::from_secs(4);
/// The history's file in a kept data folder (`ChaosConfig::data_dir`).
pub const HISTORY_FILE: &str = "history.txt";
/// Bound of one status call while settling.
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two status calls about the same id.
const STATUS_POLL: Duration = Duration::from_millis(200);

/// What can stop a run before it reaches a verdict (a failed invariant is not an error: it
/// is in the report).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the harness failed: {0}")]
    Harness(String),
    #[error("cannot read a bank's data: {0}")]
    Read(String),
}

/// A run's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosConfig {
    pub seed: u64,
    /// How long the load and the faults run (the settling comes after).
    pub duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    pub banks: usize,
    /// Longest the settling may take.
    pub settle_timeout: Duration,
    /// Keep the servers' folders here instead of a temp folder removed at the end, with the
    /// clients' history in [`HISTORY_FILE`].
    pub data_dir: Option<PathBuf>,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 0,
            duration: Duration::from_secs(60),
            clients: 6,
            banks: 3,
            settle_timeout: Duration::from_secs(120),
            data_dir: None,
        }
    }
}

/// Runs the chaos run described by `config`; `progress` is called every
/// [`PROGRESS_EVERY`] while the load runs.
pub async fn run(
    config: ChaosConfig,
    progress: impl Fn(&Progress) + Send + Sync + 'static,
) -> Result<Report, ChaosError> {
    if config.banks == 0 || config.banks > 26 || config.clients == 0 {
        return Err(ChaosError::Harness(format!(
            "a run needs 1 to 26 banks and at least one client (got {} and {})",
            config.banks, config.clients
        )));
    }
    let temp;
    let dir = match &config.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let cluster = Arc::new(Cluster::start(&dir, config.banks).await?);
    let started = Instant::now();
    let until = started + config.duration;

    let schedule = schedule::plan(config.seed, config.duration, config.banks);
    let mut fault_tasks = Vec::new();
    let targets = std::iter::once(Target::Coordinator).chain((0..config.banks).map(Target::Bank));
    for target in targets {
        let faults: Vec<_> = schedule
            .iter()
            .filter(|f| f.target == target)
            .copied()
            .collect();
        let cluster = cluster.clone();
        fault_tasks.push(tokio::spawn(async move {
            cluster.run_faults(faults, started).await
        }));
    }

    let recorder = Arc::new(Recorder::default());
    let mut client_tasks = Vec::new();
    for index in 0..config.clients {
        let client = ClientConfig {
            index,
            seed: config.seed,
            coordinator: cluster.coordinator_addr(),
            banks: cluster.bank_addrs(),
            started,
            until,
        };
        client_tasks.push(tokio::spawn(workload::run_client(client, recorder.clone())));
    }

    let ticker = {
        let (cluster, recorder) = (cluster.clone(), recorder.clone());
        tokio::spawn(async move {
            let mut next = started + PROGRESS_EVERY;
            loop {
                tokio::time::sleep_until(next.into()).await;
                next += PROGRESS_EVERY;
                progress(&Progress {
                    elapsed: started.elapsed(),
                    ops_done: recorder.ops_done.load(Ordering::Relaxed),
                    faults: cluster.fault_counts(),
                });
            }
        })
    };

    for task in fault_tasks {
        task.await
            .map_err(|e| ChaosError::Harness(format!("a fault task failed: {e}")))?;
    }
    let mut cut_clients = 0;
    for mut task in client_tasks {
        match tokio::time::timeout_at((until + CLIENT_GRACE).into(), &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ticker.abort();
                return Err(ChaosError::Harness(format!("a client failed: {e}")));
            }
            Err(_) => {
                task.abort();
                cut_clients += 1;
            }
        }
    }
    ticker.abort();
    let load_elapsed = started.elapsed();

    let settle_started = Instant::now();
    cluster.heal_all().await;
    let history = std::mem::take(&mut *recorder.history.lock().expect("history lock"));
    if config.data_dir.is_some() {
        history.write_to(&dir.join(HISTORY_FILE))?;
    }
    let (txns, sagas, restart_rounds) = settle(&cluster, &history, config.settle_timeout).await?;
    let settle = SettleInfo {
        elapsed: settle_started.elapsed(),
        restart_rounds,
        cut_clients,
    };

    let banks = read_banks(&cluster, &history).await?;
    let initial = workload::initial_balances(config.banks);
    let verdicts = check::check(&Evidence {
        history: &history,
        banks: &banks,
        initial: &initial,
        txns: &txns,
        sagas: &sagas,
    });
    let proxies = cluster
        .servers()
        .map(|s| (s.proxy.name().to_string(), s.proxy.stats()))
        .collect();
    let fault_log = cluster.fault_log.lock().expect("fault log lock").clone();
    Ok(Report {
        ops: OpCounts::from_history(&history, &sagas),
        faults: cluster.fault_counts(),
        config,
        load_elapsed,
        proxies,
        settle,
        verdicts,
        fault_log,
    })
}

/// Asks the coordinator for the final state of everything the clients tried, then makes
/// sure no branch is left prepared (see the module docs). Returns the final answers and the
/// number of restart rounds. Every process is stopped when it returns.
async fn settle(
    cluster: &Cluster,
    history: &History,
    timeout: Duration,
) -> Result<(BTreeMap<TxnId, FinalTxn>, BTreeMap<TxnId, FinalSaga>, u32), ChaosError> {
    let deadline = Instant::now() + timeout;
    let mut txns = BTreeMap::new();
    let mut sagas = BTreeMap::new();
    let mut restart_rounds = 0;
    loop {
        let client = crate::client(&cluster.coordinator_addr()).await;
        for op in &history.ops {
            match op.kind {
                OpKind::TwoPc => {
                    if !matches!(
                        txns.get(&op.id),
                        Some(FinalTxn::Committed | FinalTxn::Aborted)
                    ) {
                        txns.insert(op.id.clone(), final_txn(&client, &op.id, deadline).await);
                    }
                }
                OpKind::Saga => {
                    let done = |s: &FinalSaga| match s {
                        FinalSaga::State(state) => {
                            state.terminal && (op.callback.is_none() || state.callback_delivered)
                        }
                        FinalSaga::NotFound | FinalSaga::Unknown { .. } => false,
                    };
                    if !sagas.get(&op.id).is_some_and(done) {
                        let wants_callback = op.callback.is_some();
                        sagas.insert(
                            op.id.clone(),
                            final_saga(&client, &op.id, wants_callback, deadline).await,
                        );
                    }
                }
            }
        }
        cluster.stop_all().await;
        let mut prepared = 0;
        for bank in &cluster.banks {
            prepared += check::prepared_in(&bank.dir().await)?;
        }
        if prepared == 0 || restart_rounds >= RESTART_ROUNDS_MAX || Instant::now() >= deadline {
            return Ok((txns, sagas, restart_rounds));
        }
        tracing::info!(prepared, "branches still prepared; restarting the cluster");
        restart_rounds += 1;
        cluster.heal_all().await;
        tokio::time::sleep(RESTART_ROUND_WAIT).await;
    }
}

fn not_found(error: &SdkError) -> bool {
    matches!(error, SdkError::Coordinator { code, .. } if *code == tonic::Code::NotFound)
}

/// One answer while polling the coordinator about an id.
enum Polled<T> {
    /// The id's final state: stop asking.
    Final(T),
    /// Not final yet (or no answer): what to report if time runs out.
    NotYet(T),
}

/// Asks `ask` (each call bounded by [`STATUS_CALL_TIMEOUT`]) until it answers
/// [`Polled::Final`] or `deadline` passes; `on_error` turns an error or a timeout into the
/// answer to report.
async fn poll<T, A, Fut>(deadline: Instant, mut ask: A, on_error: impl Fn(String) -> Polled<T>) -> T
where
    A: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Polled<T>, SdkError>>,
{
    loop {
        let answer = match tokio::time::timeout(STATUS_CALL_TIMEOUT, ask()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => on_error(e.to_string()),
            Err(_) => on_error(format!("no answer within {STATUS_CALL_TIMEOUT:?}")),
        };
        match answer {
            Polled::Final(last) => return last,
            Polled::NotYet(last) if Instant::now() >= deadline => return last,
            Polled::NotYet(_) => tokio::time::sleep(STATUS_POLL).await,
        }
    }
}

/// The coordinator's final word on a 2PC transaction, polling until it is final or
/// `deadline`.
async fn final_txn(client: &TandemClient, id: &TxnId, deadline: Instant) -> FinalTxn {
    let ask = || {
        let mut client = client.clone();
        async move {
            match client.get(id).await {
                Ok(status) => Ok(match pb::TxnPhase::try_from(status.phase) {
                    Ok(pb::TxnPhase::Committed) => Polled::Final(FinalTxn::Committed),
                    Ok(pb::TxnPhase::Aborted) => Polled::Final(FinalTxn::Aborted),
                    phase => Polled::NotYet(FinalTxn::Unsettled {
                        phase: format!("{phase:?}"),
                    }),
                }),
                Err(e) if not_found(&e) => Ok(Polled::Final(FinalTxn::NotFound)),
                Err(e) => Err(e),
            }
        }
    };
    poll(deadline, ask, |error| {
        Polled::NotYet(FinalTxn::Unknown { error })
    })
    .await
}

/// The coordinator's final word on a saga: terminal (with its callback delivered, if it has
/// one), or whatever it was at `deadline`.
async fn final_saga(
    client: &TandemClient,
    id: &TxnId,
    wants_callback: bool,
    deadline: Instant,
) -> FinalSaga {
    let ask = || async move {
        match client.get_saga(id).await {
            Ok(state) if state.terminal && (!wants_callback || state.callback_delivered) => {
                Ok(Polled::Final(FinalSaga::State(state)))
            }
            Ok(state) => Ok(Polled::NotYet(FinalSaga::State(state))),
            Err(e) if not_found(&e) => Ok(Polled::Final(FinalSaga::NotFound)),
            Err(e) => Err(e),
        }
    };
    poll(deadline, ask, |error| {
        Polled::NotYet(FinalSaga::Unknown { error })
    })
    .await
}

/// Reads every stopped bank's folder, asking each for the records of the branches and steps
/// the workload sent to it.
async fn read_banks(cluster: &Cluster, history: &History) -> Result<Vec<BankData>, ChaosError> {
    let mut banks = Vec::new();
    for (index, bank) in cluster.banks.iter().enumerate() {
        let mut branches = Vec::new();
        let mut steps = Vec::new();
        for op in &history.ops {
            let list = match op.kind {
                OpKind::TwoPc => &mut branches,
                OpKind::Saga => &mut steps,
            };
            if op.from.0 == index {
                list.push((op.id.clone(), 0));
            }
            if op.to.0 == index {
                list.push((op.id.clone(), 1));
            }
        }
        banks.push(check::read_bank(&bank.dir().await, &branches, &steps)?);
    }
    Ok(banks)
}
