//! The chaos run's report: operations by kind and outcome, faults by kind, every invariant's
//! verdict, the seed and the command that replays it; and the progress line printed while
//! the run goes on.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tandem_participant::SagaPhase;

use super::check::{FinalSaga, Verdict};
use super::cluster::FaultCounts;
use super::proxy::ProxyStats;
use super::workload::{Answer, CallKind, History, OpKind};
use super::ChaosConfig;

/// Operations by kind and outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub twopc: u64,
    /// Outcomes as the client was told them (its last definitive answer).
    pub twopc_committed: u64,
    pub twopc_aborted: u64,
    /// Every call of the operation failed or timed out: the client never learned the outcome.
    pub twopc_unknown: u64,
    pub twopc_calls: u64,
    pub twopc_calls_failed: u64,
    pub sagas: u64,
    pub sagas_accepted: u64,
    pub saga_submit_calls: u64,
    pub saga_submit_calls_failed: u64,
    /// What the client's own wait saw, by phase name (`not terminal` when it gave up first).
    pub sagas_seen: BTreeMap<String, u64>,
    /// Where the sagas ended, as the coordinator finally reported them.
    pub sagas_final: BTreeMap<String, u64>,
    /// Operations drawn to fail (overdraft, closed or unknown payee), by kind.
    pub must_fail_twopc: u64,
    pub must_fail_sagas: u64,
    /// Failed calls of every kind, by the kind of error ([`error_kind`]).
    pub call_errors: BTreeMap<String, u64>,
}

impl OpCounts {
    pub fn from_history(
        history: &History,
        sagas: &BTreeMap<tandem_participant::TxnId, FinalSaga>,
    ) -> Self {
        let mut counts = OpCounts::default();
        for entry in &history.entries {
            if let Answer::Failed { error } = &entry.answer {
                *counts.call_errors.entry(error_kind(error)).or_default() += 1;
            }
        }
        for (index, op) in history.ops.iter().enumerate() {
            let entries: Vec<_> = history.entries_of(index).collect();
            match op.kind {
                OpKind::TwoPc => {
                    counts.twopc += 1;
                    counts.must_fail_twopc += u64::from(op.intent.must_fail());
                    counts.twopc_calls += entries.len() as u64;
                    let mut told = None;
                    for e in &entries {
                        match &e.answer {
                            Answer::Committed | Answer::Aborted { .. } => told = Some(&e.answer),
                            Answer::Failed { .. } => counts.twopc_calls_failed += 1,
                            Answer::Accepted | Answer::SagaState { .. } => {}
                        }
                    }
                    match told {
                        Some(Answer::Committed) => counts.twopc_committed += 1,
                        Some(_) => counts.twopc_aborted += 1,
                        None => counts.twopc_unknown += 1,
                    }
                }
                OpKind::Saga => {
                    counts.sagas += 1;
                    counts.must_fail_sagas += u64::from(op.intent.must_fail());
                    for e in &entries {
                        match (&e.call, &e.answer) {
                            (CallKind::SubmitSaga, Answer::Accepted) => {
                                counts.saga_submit_calls += 1;
                                counts.sagas_accepted += 1;
                            }
                            (CallKind::SubmitSaga, _) => {
                                counts.saga_submit_calls += 1;
                                counts.saga_submit_calls_failed += 1;
                            }
                            (CallKind::WaitSaga, Answer::SagaState { phase }) => {
                                *counts.sagas_seen.entry(seen_name(*phase)).or_default() += 1;
                            }
                            (CallKind::WaitSaga, _) => {
                                *counts.sagas_seen.entry("wait failed".into()).or_default() += 1;
                            }
                            (CallKind::Execute2pc, _) => {}
                        }
                    }
                    let end = match sagas.get(&op.id) {
                        Some(FinalSaga::State(state)) => seen_name(state.phase),
                        Some(FinalSaga::NotFound) => "never accepted".into(),
                        Some(FinalSaga::Unknown { .. }) | None => "unknown".into(),
                    };
                    *counts.sagas_final.entry(end).or_default() += 1;
                }
            }
        }
        counts
    }
}

/// A failed call's error without its details (addresses, ids): `unavailable`,
/// `coordinator error DeadlineExceeded`, `no answer within the client's bound`, ...
pub fn error_kind(error: &str) -> String {
    if error.starts_with("no answer within") {
        return "no answer within the client's bound".into();
    }
    let head = error.split(':').next().unwrap_or(error);
    tandem_common::clip_text(head.to_string(), 48)
}

fn seen_name(phase: SagaPhase) -> String {
    match phase {
        SagaPhase::Completed => "completed",
        SagaPhase::Compensated => "compensated",
        SagaPhase::Aborted => "aborted",
        SagaPhase::Running | SagaPhase::Compensating => "not terminal",
    }
    .to_string()
}

/// How the end of the run went.
#[derive(Debug, Clone, Default)]
pub struct SettleInfo {
    pub elapsed: Duration,
    /// Times the banks were restarted to resolve branches left prepared.
    pub restart_rounds: u32,
    /// Client operations still running when the run's grace ran out (cancelled).
    pub cut_clients: usize,
}

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: ChaosConfig,
    /// How long the load and the faults ran.
    pub load_elapsed: Duration,
    pub ops: OpCounts,
    pub faults: FaultCounts,
    pub proxies: Vec<(String, ProxyStats)>,
    pub settle: SettleInfo,
    pub verdicts: Vec<Verdict>,
    /// One line per fault, with when it really started.
    pub fault_log: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(Verdict::passed)
    }

    /// The command that runs this seed again.
    pub fn replay_command(&self) -> String {
        replay_command(&self.config)
    }
}

/// `cargo run -p tandem-tests --release --bin chaos -- --duration 60s --seed N`, with the
/// options that differ from the defaults.
pub fn replay_command(config: &ChaosConfig) -> String {
    let mut command = format!(
        "cargo run -p tandem-tests --release --bin chaos -- --duration {} --seed {}",
        format_duration(config.duration),
        config.seed
    );
    let defaults = ChaosConfig::default();
    if config.clients != defaults.clients {
        command.push_str(&format!(" --clients {}", config.clients));
    }
    if config.banks != defaults.banks {
        command.push_str(&format!(" --banks {}", config.banks));
    }
    command
}

/// `90s`, `30m`, `1500ms`: the shortest exact form `--duration` accepts.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

fn counts_line(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let o = &self.ops;
        writeln!(
            f,
            "chaos run: seed {}, {:.1} s of load and faults, {} banks, {} clients",
            c.seed,
            self.load_elapsed.as_secs_f64(),
            c.banks,
            c.clients
        )?;
        writeln!(f, "operations:")?;
        writeln!(
            f,
            "  2PC transfers  {:>6}: {} committed, {} aborted, {} unknown to the client \
             ({} calls, {} failed or timed out; {} drawn to fail)",
            o.twopc,
            o.twopc_committed,
            o.twopc_aborted,
            o.twopc_unknown,
            o.twopc_calls,
            o.twopc_calls_failed,
            o.must_fail_twopc
        )?;
        writeln!(
            f,
            "  saga transfers {:>6}: {} accepted ({} submit calls, {} failed or timed out; {} \
             drawn to fail)",
            o.sagas,
            o.sagas_accepted,
            o.saga_submit_calls,
            o.saga_submit_calls_failed,
            o.must_fail_sagas
        )?;
        writeln!(
            f,
            "    seen by the client's wait: {}",
            counts_line(&o.sagas_seen)
        )?;
        writeln!(
            f,
            "    final (coordinator):       {}",
            counts_line(&o.sagas_final)
        )?;
        writeln!(
            f,
            "  failed calls by error: {}",
            counts_line(&o.call_errors)
        )?;
        writeln!(f, "faults injected:")?;
        let kills = self
            .faults
            .kills
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            f,
            "  kills (SIGKILL + restart): {} ({})",
            self.faults.total_kills(),
            if kills.is_empty() { "none" } else { &kills }
        )?;
        writeln!(f, "  partitions:                {}", self.faults.partitions)?;
        writeln!(
            f,
            "  connection resets:         {} ({} connections reset)",
            self.faults.resets, self.faults.connections_reset
        )?;
        writeln!(
            f,
            "  latency windows:           {}",
            self.faults.latency_windows
        )?;
        for (name, stats) in &self.proxies {
            writeln!(
                f,
                "  proxy {name:<12} {} connections, {} refused while down, {} reset",
                stats.accepted, stats.refused, stats.reset_by_fault
            )?;
        }
        writeln!(
            f,
            "settling: {:.1} s, {} restart round(s) for prepared branches, {} client(s) cut at the end",
            self.settle.elapsed.as_secs_f64(),
            self.settle.restart_rounds,
            self.settle.cut_clients
        )?;
        writeln!(f, "invariants:")?;
        for verdict in &self.verdicts {
            writeln!(f, "  {verdict}")?;
        }
        writeln!(f, "result: {}", if self.passed() { "PASS" } else { "FAIL" })?;
        writeln!(f, "seed: {}", c.seed)?;
        write!(f, "replay: {}", self.replay_command())
    }
}

/// What the progress line says.
#[derive(Debug, Clone)]
pub struct Progress {
    pub elapsed: Duration,
    pub ops_done: u64,
    pub faults: FaultCounts,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos: {:>5.0} s, {} operations done, faults so far: {}",
            self.elapsed.as_secs_f64(),
            self.ops_done,
            self.faults.summary()
        )
    }
}
