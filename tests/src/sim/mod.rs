//! The seeded, single-threaded, deterministic simulation of a Tandem cluster.
//!
//! One coordinator runs the real protocol cores ([`tandem_coordinator::engine::Engine`] for
//! 2PC, [`tandem_coordinator::engine::saga::SagaEngine`] for sagas) behind a restatement of
//! the runtime's effect handling ([`coordinator`]) over an in-memory log with a crash model
//! ([`log`]). N participants are in-memory models built on the SDK's pure barrier rules
//! ([`participant`]). They talk over a simulated network that drops, duplicates, delays and
//! reorders messages and partitions nodes ([`net`]). Clients run a generated workload of 2PC
//! and saga transfers ([`workload`]), retrying with the same id when the coordinator dies
//! under them. Everything happens in simulated time, in an event queue ordered by
//! `(time, sequence)`, and every choice comes from one [`SplitMix64`] seeded by the seed, so
//! a seed replays exactly.
//!
//! Faults, all inside a window after which the cluster heals and runs until it settles:
//! coordinator crash and restart (at random times, and aimed inside a forced write's flush),
//! participant crash and restart (likewise), partitions, message drop, duplication, delay
//! spikes (reordering), timers firing early or late, client retries with the same id.
//!
//! The invariants are checked after every event and at the end ([`check`]); a violation, or a
//! panic anywhere (the engines assert their own invariants), is a [`SimFailure`] that names
//! the seed and the command that replays it with a transcript.

pub mod check;
pub mod coordinator;
pub mod log;
pub mod net;
pub mod participant;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use tandem_common::SplitMix64;
use tandem_coordinator::engine::types::Outcome;

use check::Checker;
use coordinator::{COut, SimCoordinator, TimerEntry};
use net::{Envelope, Fate, Msg, Network, Node, WireFaults};
pub use participant::PlantedBug;
use participant::{POut, PState, SimParticipant};
use workload::Op;

/// Simulated time at which every run starts (a realistic epoch: ids embed it).
pub const EPOCH_MS: u64 = 1_700_000_000_000;
/// How long after the fault window a run may take to settle before that is a failure.
pub const SETTLE_MS_MAX: u64 = 180_000;

/// What one run simulates.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub participants: usize,
    pub twopc: usize,
    pub sagas: usize,
    /// Print every message and transition.
    pub trace: bool,
    pub bug: Option<PlantedBug>,
}

impl SimConfig {
    /// The configuration a seed runs with (sizes vary with the seed).
    pub fn for_seed(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x5EED_0FC0_FFEE);
        SimConfig {
            seed,
            participants: 2 + (rng.next_u64() % 3) as usize,
            twopc: 10 + (rng.next_u64() % 16) as usize,
            sagas: 5 + (rng.next_u64() % 10) as usize,
            trace: false,
            bug: None,
        }
    }

    /// The command that replays this run with a transcript.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run -p tandem-tests --release --bin simulate -- --seed {}",
            self.seed
        );
        if let Some(bug) = self.bug {
            let _ = write!(cmd, " --plant-bug {}", bug.name());
        }
        cmd
    }
}

/// A run that broke an invariant.
#[derive(Debug, Clone, thiserror::Error)]
#[error("simulation seed {seed} failed at t=+{at_ms} ms: {message}\n  replay with: {replay}")]
pub struct SimFailure {
    pub seed: u64,
    pub at_ms: u64,
    pub message: String,
    pub replay: String,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub seeds: u64,
    pub twopc: u64,
    pub twopc_committed: u64,
    pub twopc_aborted: u64,
    pub sagas: u64,
    pub sagas_completed: u64,
    pub sagas_compensated: u64,
    pub events: u64,
    pub simulated_ms: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// Protocol paths the faults drove the run through (recoveries, presumed aborts, ...).
    pub coverage: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn add(&mut self, other: &Report) {
        self.seeds += other.seeds;
        self.twopc += other.twopc;
        self.twopc_committed += other.twopc_committed;
        self.twopc_aborted += other.twopc_aborted;
        self.sagas += other.sagas;
        self.sagas_completed += other.sagas_completed;
        self.sagas_compensated += other.sagas_compensated;
        self.events += other.events;
        self.simulated_ms += other.simulated_ms;
        for (k, v) in &other.faults {
            *self.faults.entry(k).or_default() += v;
        }
        for (k, v) in &other.coverage {
            *self.coverage.entry(k).or_default() += v;
        }
    }
}

/// Runs one seed; a broken invariant or a panic is returned as a [`SimFailure`].
pub fn run(config: &SimConfig) -> Result<Report, SimFailure> {
    let failure_at = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let at = failure_at.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut world = World::new(config.clone());
        let outcome = world.run();
        at.store(
            world.now_ms - EPOCH_MS,
            std::sync::atomic::Ordering::Relaxed,
        );
        outcome
    }));
    let fail = |at_ms: u64, message: String| SimFailure {
        seed: config.seed,
        at_ms,
        message,
        replay: config.replay_command(),
    };
    match result {
        Ok(Ok(report)) => Ok(report),
        Ok(Err((at_ms, message))) => Err(fail(at_ms, message)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".to_string());
            Err(fail(
                failure_at.load(std::sync::atomic::Ordering::Relaxed),
                format!("panic: {message}"),
            ))
        }
    }
}

/// Something scheduled in simulated time.
#[derive(Debug)]
enum Ev {
    Deliver(Envelope),
    CallTimeout {
        incarnation: u64,
        call: u64,
    },
    CoordFlush {
        incarnation: u64,
        id: u64,
    },
    CoordTimer {
        incarnation: u64,
        entry: TimerEntry,
    },
    PartFlush {
        p: usize,
        incarnation: u64,
        covers: u64,
    },
    ResolverTick {
        p: usize,
        incarnation: u64,
    },
    ClientStart(usize),
    CoordCrash,
    CoordRestart,
    PartCrash(usize),
    PartRestart(usize),
    Partition {
        p: usize,
        until_ms: u64,
    },
    FaultsEnd,
}

/// Where a client is with its op.
#[derive(Debug, Clone, PartialEq)]
enum ClientState {
    Idle,
    Waiting { request: u64 },
    Done,
}

#[derive(Debug)]
struct Client {
    op: Op,
    attempts: u32,
    state: ClientState,
}

/// Most attempts a client makes (it gives up after; the outcome is then unknown to it).
const CLIENT_ATTEMPTS_MAX: u32 = 6;

/// The fault plan of one seed.
#[derive(Debug, Clone)]
struct FaultPlan {
    wire: WireFaults,
    timer_early: f64,
    timer_late: f64,
    /// Chance that a flush request at a node is followed by a crash inside its window.
    crash_in_flush: f64,
    crashes_in_flush_left: u32,
}

struct World {
    config: SimConfig,
    rng: SplitMix64,
    now_ms: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    coord: SimCoordinator,
    parts: Vec<SimParticipant>,
    net: Network,
    clients: Vec<Client>,
    /// Request id -> (client, coordinator incarnation it went to).
    requests: BTreeMap<u64, (usize, u64)>,
    next_request: u64,
    faults_end_ms: u64,
    faults_on: bool,
    plan: FaultPlan,
    checker: Checker,
    report: Report,
}

impl World {
    fn new(config: SimConfig) -> Self {
        let mut rng = SplitMix64::new(config.seed);
        let parts: Vec<SimParticipant> = (0..config.participants)
            .map(|i| SimParticipant::new(i, workload::initial_state(&mut rng), config.bug))
            .collect();
        let window_ms = 4_000 + rng.next_u64() % 6_000;
        let ops = workload::generate(
            &mut rng,
            config.participants,
            EPOCH_MS + 10,
            window_ms,
            config.twopc,
            config.sagas,
        );
        let calm = rng.next_u64().is_multiple_of(10);
        let scale = if calm { 0.0 } else { 1.0 };
        let plan = FaultPlan {
            wire: WireFaults {
                drop: scale * rng.next_f64() * 0.08,
                duplicate: scale * rng.next_f64() * 0.08,
                spike: scale * rng.next_f64() * 0.06,
                spike_ms_max: 200 + rng.next_u64() % 1_500,
            },
            timer_early: scale * 0.05,
            timer_late: scale * 0.1,
            crash_in_flush: scale * rng.next_f64() * 0.05,
            crashes_in_flush_left: if calm {
                0
            } else {
                1 + (rng.next_u64() % 3) as u32
            },
        };
        let initial: Vec<PState> = parts.iter().map(|p| p.durable.clone()).collect();
        let coord = SimCoordinator::new(config.participants, rng.next_u64());
        let mut world = World {
            checker: Checker::new(initial),
            rng,
            now_ms: EPOCH_MS,
            seq: 0,
            queue: BTreeMap::new(),
            coord,
            parts,
            net: Network::default(),
            clients: Vec::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            faults_end_ms: EPOCH_MS + 10 + window_ms + 500,
            faults_on: !calm,
            plan,
            report: Report {
                seeds: 1,
                twopc: config.twopc as u64,
                sagas: config.sagas as u64,
                ..Report::default()
            },
            config,
        };
        for ((at, _), op) in ops {
            let i = world.clients.len();
            world.checker.register(&op);
            world.clients.push(Client {
                op,
                attempts: 0,
                state: ClientState::Idle,
            });
            world.schedule_at(at, Ev::ClientStart(i));
        }
        for p in 0..world.parts.len() {
            world.schedule_at(EPOCH_MS + 1, Ev::ResolverTick { p, incarnation: 1 });
        }
        if !calm {
            world.plan_crashes_and_partitions();
        }
        let end = world.faults_end_ms;
        world.schedule_at(end, Ev::FaultsEnd);
        world
    }

    fn plan_crashes_and_partitions(&mut self) {
        let start = EPOCH_MS + 10;
        let span = self.faults_end_ms - start;
        for _ in 0..self.rng.next_u64() % 4 {
            let at = start + self.rng.next_u64() % span;
            let down = 5 + self.rng.next_u64() % 1_500;
            self.schedule_at(at, Ev::CoordCrash);
            self.schedule_at(at + down, Ev::CoordRestart);
        }
        for _ in 0..self.rng.next_u64() % 6 {
            let p = (self.rng.next_u64() % self.parts.len() as u64) as usize;
            let at = start + self.rng.next_u64() % span;
            let down = 5 + self.rng.next_u64() % 1_500;
            self.schedule_at(at, Ev::PartCrash(p));
            self.schedule_at(at + down, Ev::PartRestart(p));
        }
        for _ in 0..self.rng.next_u64() % 4 {
            let p = (self.rng.next_u64() % self.parts.len() as u64) as usize;
            let at = start + self.rng.next_u64() % span;
            let until_ms = at + 50 + self.rng.next_u64() % 2_500;
            self.schedule_at(at, Ev::Partition { p, until_ms });
        }
    }

    fn schedule_at(&mut self, at_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at_ms.max(self.now_ms), self.seq), ev);
    }

    fn fault(&mut self, kind: &'static str) {
        *self.report.faults.entry(kind).or_default() += 1;
    }

    fn trace(&self, line: impl FnOnce() -> String) {
        if self.config.trace {
            println!("{:>8} {}", self.now_ms - EPOCH_MS, line());
        }
    }

    fn fail<T>(&self, message: String) -> Result<T, (u64, String)> {
        Err((self.now_ms - EPOCH_MS, message))
    }

    fn run(&mut self) -> Result<Report, (u64, String)> {
        let deadline = self.faults_end_ms + SETTLE_MS_MAX;
        let mut since_settle_check = 0u32;
        while let Some(((at, _), ev)) = self.queue.pop_first() {
            if at > deadline {
                break;
            }
            self.now_ms = at;
            self.report.events += 1;
            self.handle(ev);
            if let Some(message) = self.checker.take_violation() {
                return self.fail(message);
            }
            if let Err(message) = self.checker.check_step(&self.parts) {
                return self.fail(message);
            }
            since_settle_check += 1;
            if self.now_ms >= self.faults_end_ms && since_settle_check >= 32 {
                since_settle_check = 0;
                if self.settled() {
                    break;
                }
            }
        }
        if !self.settled() {
            return self.fail(format!(
                "the cluster did not settle within {SETTLE_MS_MAX} ms after the faults stopped: {}",
                self.unsettled_detail()
            ));
        }
        self.report.simulated_ms = self.now_ms - EPOCH_MS;
        match self
            .checker
            .check_end(&self.coord, &self.parts, &mut self.report)
        {
            Ok(()) => Ok(std::mem::take(&mut self.report)),
            Err(message) => self.fail(message),
        }
    }

    fn settled(&self) -> bool {
        self.coord.up
            && self.coord.in_flight() == 0
            && self.parts.iter().all(|p| p.up && p.quiet())
            && self.clients.iter().all(|c| c.state == ClientState::Done)
    }

    fn unsettled_detail(&self) -> String {
        let waiting = self
            .clients
            .iter()
            .filter(|c| c.state != ClientState::Done)
            .map(|c| c.op.id().to_string())
            .collect::<Vec<_>>();
        let prepared: Vec<String> = self
            .parts
            .iter()
            .flat_map(|p| {
                p.prepared()
                    .into_iter()
                    .map(move |k| format!("p{} {}#{}", p.index, k.0, k.1))
            })
            .collect();
        format!(
            "coordinator up {} with {} in flight; clients waiting {waiting:?}; prepared branches {prepared:?}",
            self.coord.up,
            self.coord.in_flight()
        )
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver(env) => self.deliver(env),
            Ev::CallTimeout { incarnation, call } => {
                if self.coord.up && self.coord.incarnation == incarnation {
                    let mut out = Vec::new();
                    self.coord.call_completed(self.now_ms, call, None, &mut out);
                    self.coord_out(out);
                }
            }
            Ev::CoordFlush { incarnation, id } => {
                if self.coord.up && self.coord.incarnation == incarnation {
                    self.trace(|| format!("coordinator flush {id} done"));
                    let mut out = Vec::new();
                    self.coord.flush_done(self.now_ms, id, &mut out);
                    self.coord_out(out);
                }
            }
            Ev::CoordTimer { incarnation, entry } => {
                if self.coord.up && self.coord.incarnation == incarnation {
                    self.trace(|| format!("coordinator timer {entry:?}"));
                    let mut out = Vec::new();
                    self.coord.timer(self.now_ms, entry, &mut out);
                    self.coord_out(out);
                }
            }
            Ev::PartFlush {
                p,
                incarnation,
                covers,
            } => {
                if self.parts[p].up && self.parts[p].incarnation == incarnation {
                    let mut out = Vec::new();
                    self.parts[p].flush_done(covers, &mut out);
                    self.part_out(p, out);
                }
            }
            Ev::ResolverTick { p, incarnation } => {
                if self.parts[p].up && self.parts[p].incarnation == incarnation {
                    for msg in self.parts[p].resolver_round(self.now_ms) {
                        *self.report.coverage.entry("in_doubt_query").or_default() += 1;
                        self.send(Node::Participant(p), Node::Coordinator, msg);
                    }
                    let next = self.now_ms + 100 + self.rng.next_u64() % 200;
                    self.schedule_at(next, Ev::ResolverTick { p, incarnation });
                }
            }
            Ev::ClientStart(i) => self.client_start(i),
            Ev::CoordCrash => self.coord_crash(),
            Ev::CoordRestart => self.coord_restart(),
            Ev::PartCrash(p) => self.part_crash(p),
            Ev::PartRestart(p) => self.part_restart(p),
            Ev::Partition { p, until_ms } => {
                if self.faults_on {
                    self.fault("partition");
                    self.trace(|| {
                        format!("partition: p{p} cut off until +{}", until_ms - EPOCH_MS)
                    });
                    self.net.partition(p, until_ms);
                }
            }
            Ev::FaultsEnd => {
                self.trace(|| "faults stop; healing everything".to_string());
                self.faults_on = false;
                self.net.heal_all();
                self.coord_restart();
                for p in 0..self.parts.len() {
                    self.part_restart(p);
                }
            }
        }
    }

    // ---- network ------------------------------------------------------------------------

    fn send(&mut self, from: Node, to: Node, msg: Msg) {
        let env = Envelope { from, to, msg };
        let faults = self.faults_on.then_some(self.plan.wire);
        let fate = self
            .net
            .route(self.now_ms, &env, faults.as_ref(), &mut self.rng);
        self.trace(|| format!("{from:?} -> {to:?} {:?} [{fate:?}]", env.msg));
        match fate {
            Fate::Dropped => self.fault("message_dropped"),
            Fate::Partitioned => self.fault("message_cut_by_partition"),
            Fate::Delivered {
                first_ms,
                second_ms,
                spiked,
            } => {
                if spiked {
                    self.fault("message_delayed");
                }
                if let Some(second) = second_ms {
                    self.fault("message_duplicated");
                    self.schedule_at(self.now_ms + second, Ev::Deliver(env.clone()));
                }
                self.schedule_at(self.now_ms + first_ms, Ev::Deliver(env));
            }
        }
    }

    fn deliver(&mut self, env: Envelope) {
        if self.net.cut(self.now_ms, env.from, env.to) {
            self.fault("message_cut_by_partition");
            return;
        }
        match env.to {
            Node::Coordinator => {
                if !self.coord.up {
                    return;
                }
                let Node::Participant(p) = env.from else {
                    panic!("the coordinator sent itself {:?}", env.msg)
                };
                let mut out = Vec::new();
                match env.msg {
                    Msg::Answer { call, answer } => {
                        self.coord
                            .call_completed(self.now_ms, call, Some(answer), &mut out)
                    }
                    Msg::Query { txn, branch } => {
                        self.coord.query_outcome(p, txn, branch, &mut out)
                    }
                    other => panic!("the coordinator got a participant's message {other:?}"),
                }
                self.coord_out(out);
            }
            Node::Participant(p) => {
                if !self.parts[p].up {
                    return;
                }
                let mut out = Vec::new();
                self.parts[p].on_message(self.now_ms, env.msg, &mut out);
                self.part_out(p, out);
            }
        }
    }

    fn coord_out(&mut self, out: Vec<COut>) {
        for item in out {
            match item {
                COut::Send {
                    participant,
                    msg,
                    call,
                } => {
                    if let Some((id, timeout_ms)) = call {
                        let incarnation = self.coord.incarnation;
                        self.schedule_at(
                            self.now_ms + timeout_ms,
                            Ev::CallTimeout {
                                incarnation,
                                call: id,
                            },
                        );
                    }
                    self.send(Node::Coordinator, Node::Participant(participant), msg);
                }
                COut::Flush { id } => {
                    let latency = 1 + self.rng.next_u64() % 15;
                    let incarnation = self.coord.incarnation;
                    self.schedule_at(self.now_ms + latency, Ev::CoordFlush { incarnation, id });
                    if self.faults_on
                        && self.plan.crashes_in_flush_left > 0
                        && self.rng.next_f64() < self.plan.crash_in_flush
                    {
                        self.plan.crashes_in_flush_left -= 1;
                        let at = self.now_ms + self.rng.next_u64() % (latency + 1);
                        let down = 5 + self.rng.next_u64() % 800;
                        self.fault("coordinator_crash_aimed_at_flush");
                        self.schedule_at(at, Ev::CoordCrash);
                        self.schedule_at(at + down, Ev::CoordRestart);
                    }
                }
                COut::SetTimer { at_ms, entry } => {
                    let mut at = at_ms;
                    if self.faults_on {
                        let roll = self.rng.next_f64();
                        if roll < self.plan.timer_early {
                            let span = at_ms.saturating_sub(self.now_ms);
                            at = self.now_ms + span / 2 + self.rng.next_u64() % (span / 2 + 1);
                            if at < at_ms {
                                self.fault("timer_early");
                            }
                        } else if roll < self.plan.timer_early + self.plan.timer_late {
                            at = at_ms + 1 + self.rng.next_u64() % 500;
                            self.fault("timer_late");
                        }
                    }
                    let incarnation = self.coord.incarnation;
                    self.schedule_at(at, Ev::CoordTimer { incarnation, entry });
                }
                COut::ClientOutcome { request, outcome } => {
                    self.client_outcome(request, Some(outcome))
                }
                COut::ClientAccepted { request } => self.client_outcome(request, None),
                COut::Announced { txn, outcome } => self.checker.announced(&txn, &outcome),
                COut::SagaTerminal { saga, outcome } => self.checker.saga_terminal(&saga, &outcome),
                COut::Trace(line) => self.trace(|| format!("coordinator: {line}")),
                COut::Count(what) => *self.report.coverage.entry(what).or_default() += 1,
                COut::Violation(message) => self.checker.violation(message),
            }
        }
    }

    fn part_out(&mut self, p: usize, out: Vec<POut>) {
        for item in out {
            match item {
                POut::Send(msg) => self.send(Node::Participant(p), Node::Coordinator, msg),
                POut::Flush { covers } => {
                    let latency = 1 + self.rng.next_u64() % 10;
                    let incarnation = self.parts[p].incarnation;
                    self.schedule_at(
                        self.now_ms + latency,
                        Ev::PartFlush {
                            p,
                            incarnation,
                            covers,
                        },
                    );
                    if self.faults_on
                        && self.plan.crashes_in_flush_left > 0
                        && self.rng.next_f64() < self.plan.crash_in_flush
                    {
                        self.plan.crashes_in_flush_left -= 1;
                        let at = self.now_ms + self.rng.next_u64() % (latency + 1);
                        let down = 5 + self.rng.next_u64() % 800;
                        self.fault("participant_crash_aimed_at_flush");
                        self.schedule_at(at, Ev::PartCrash(p));
                        self.schedule_at(at + down, Ev::PartRestart(p));
                    }
                }
                POut::Refused(why) => self.checker.violation(format!("protocol violation: {why}")),
            }
        }
    }

    // ---- crashes ------------------------------------------------------------------------

    fn coord_crash(&mut self) {
        if !self.coord.up || !self.faults_on {
            return;
        }
        self.fault("coordinator_crash");
        let unflushed = self.coord.log.unflushed_len();
        let kept = (self.rng.next_u64() % (unflushed as u64 + 1)) as usize;
        let lost = self.coord.crash(kept);
        *self
            .report
            .faults
            .entry("coordinator_writes_lost")
            .or_default() += lost as u64;
        self.trace(|| format!("coordinator CRASH (kept {kept} unflushed writes, lost {lost})"));
        // Every client waiting on this incarnation sees its call fail.
        let incarnation = self.coord.incarnation;
        let failed: Vec<(u64, usize)> = self
            .requests
            .iter()
            .filter(|(_, (_, inc))| *inc == incarnation)
            .map(|(r, (c, _))| (*r, *c))
            .collect();
        for (request, client) in failed {
            self.requests.remove(&request);
            self.client_failed(client);
        }
    }

    fn coord_restart(&mut self) {
        if self.coord.up {
            return;
        }
        let seed = self.rng.next_u64();
        let mut out = Vec::new();
        let recovered = self.coord.restart(self.now_ms, seed, &mut out);
        self.trace(|| {
            format!(
                "coordinator RESTART (incarnation {}, {recovered} recovered)",
                self.coord.incarnation
            )
        });
        self.coord_out(out);
    }

    fn part_crash(&mut self, p: usize) {
        if !self.parts[p].up || !self.faults_on {
            return;
        }
        self.fault("participant_crash");
        let lost = self.parts[p].crash(&mut self.rng);
        *self
            .report
            .faults
            .entry("participant_batches_lost")
            .or_default() += lost as u64;
        self.trace(|| format!("p{p} CRASH (lost {lost} unflushed batches)"));
    }

    fn part_restart(&mut self, p: usize) {
        if self.parts[p].up {
            return;
        }
        self.parts[p].restart();
        let incarnation = self.parts[p].incarnation;
        self.trace(|| format!("p{p} RESTART (incarnation {incarnation})"));
        self.schedule_at(self.now_ms, Ev::ResolverTick { p, incarnation });
    }

    // ---- clients ------------------------------------------------------------------------

    fn client_start(&mut self, i: usize) {
        if self.clients[i].state != ClientState::Idle {
            return;
        }
        self.clients[i].attempts += 1;
        if self.clients[i].attempts > 1 {
            self.fault("client_retry");
        }
        if !self.coord.up {
            self.client_failed(i);
            return;
        }
        let request = self.next_request;
        self.next_request += 1;
        self.requests.insert(request, (i, self.coord.incarnation));
        self.clients[i].state = ClientState::Waiting { request };
        let op = self.clients[i].op.clone();
        self.trace(|| {
            format!(
                "client submits {} (attempt {})",
                op.id(),
                self.clients[i].attempts
            )
        });
        let mut out = Vec::new();
        match op {
            Op::TwoPc {
                txn,
                branches,
                timeout_ms,
            } => {
                let fingerprint = workload::fingerprint(&txn);
                let specs = Op::branch_specs(&branches);
                self.coord.execute(
                    self.now_ms,
                    request,
                    txn,
                    specs,
                    fingerprint,
                    timeout_ms,
                    &mut out,
                );
            }
            Op::Saga {
                saga,
                steps,
                retry,
                timeout_ms,
            } => {
                let fingerprint = workload::fingerprint(&saga);
                let spec = Op::saga_spec(&steps, &retry, timeout_ms);
                self.coord
                    .submit_saga(self.now_ms, request, saga, spec, fingerprint, &mut out);
            }
        }
        self.coord_out(out);
    }

    /// The client's call failed (the coordinator is down, or died under it): retry later
    /// with the same id, or give up.
    fn client_failed(&mut self, i: usize) {
        self.clients[i].state = ClientState::Idle;
        if self.clients[i].attempts >= CLIENT_ATTEMPTS_MAX || self.rng.next_u64().is_multiple_of(10)
        {
            self.clients[i].state = ClientState::Done;
            self.fault("client_gave_up");
            return;
        }
        let at = self.now_ms + 50 + self.rng.next_u64() % 1_000;
        self.schedule_at(at, Ev::ClientStart(i));
    }

    /// A client's call returned: a 2PC outcome (`Some`) or a saga accepted (`None`).
    fn client_outcome(&mut self, request: u64, outcome: Option<Outcome>) {
        let Some((i, _)) = self.requests.remove(&request) else {
            return;
        };
        let id = self.clients[i].op.id().clone();
        self.trace(|| format!("client hears {id}: {outcome:?}"));
        match outcome {
            Some(outcome) => self.checker.told(&id, &outcome),
            None => self.checker.accepted(&id),
        }
        self.clients[i].state = ClientState::Done;
    }
}
