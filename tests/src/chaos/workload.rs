//! The chaos run's workload: concurrent clients running 2PC and saga transfers between the
//! accounts of every bank, and the history of every call they made and every answer they got.
//!
//! Every bank `bank-x` holds `x0`, `x1`, `x2` (funded with [`FUNDED_BALANCE`]) and `xshut`
//! (empty and closed: it refuses credits). Each client draws its operations from its own
//! generator, seeded from the run's seed and its number. Most transfers can succeed; some
//! must fail ([`Intent`]): an overdraft (more than all the money there is), a credit to a
//! closed account, a credit to an account that does not exist. The checker verifies that
//! those never take effect.
//!
//! Clients pick the ids themselves, so a call that failed (its outcome unknown) is retried
//! with the same id, and the checker can look the id up in every bank afterwards. A 2PC
//! transfer is tried until it gets an outcome, at most [`ATTEMPTS_MAX`] times; a saga is
//! submitted the same way, then waited for (bounded) so that the client also sees its
//! outcome. Every call is bounded by a timeout: a partition must not hang a client.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_common::{unix_now_ms, SplitMix64, TxnId};
use tandem_participant::client::{RetryPolicy, Saga};
use tandem_participant::{bank, Error as SdkError, Outcome, SagaPhase, TandemClient};

use super::schedule::{bank_name, between};

/// Starting balance of every funded account.
pub const FUNDED_BALANCE: i64 = 1_000;
/// Funded accounts per bank.
pub const FUNDED_PER_BANK: usize = 3;
/// An account no bank has.
pub const GHOST: &str = "ghost";
/// Tries of one operation (the SDK client retries retryable errors inside each).
const ATTEMPTS_MAX: u32 = 3;
/// Bound of one `Execute2pc` call as the client sees it (the prepare deadline is shorter).
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(20);
/// Prepare deadline the clients ask for.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of one `SubmitSaga` call.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a client waits for a saga it submitted before moving on (the end of the run
/// waits for the rest).
const SAGA_WAIT: Duration = Duration::from_secs(10);
/// Pause before a client retries a failed call.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Pause between two operations of one client, in ms.
const THINK_MS: (u64, u64) = (0, 40);
/// Bound of one saga action call at the participant.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// Saga steps retry for as long as any run lasts: a step's retries running out would
/// compensate a credit whose action may have run, which the workload does not need to
/// exercise (the simulation does).
const PATIENT: RetryPolicy = RetryPolicy {
    initial_delay_ms: 50,
    multiplier: 2.0,
    max_delay_ms: 1_000,
    max_attempts: 1_000,
    deadline_ms: 0,
};

/// The accounts a bank starts with (`--accounts`) and the closed ones (`--closed`).
pub fn bank_accounts(bank: usize) -> (String, String) {
    let prefix = bank_prefix(bank);
    let funded: Vec<String> = (0..FUNDED_PER_BANK)
        .map(|i| format!("{prefix}{i}={FUNDED_BALANCE}"))
        .collect();
    let closed = format!("{prefix}shut");
    (format!("{},{closed}=0", funded.join(",")), closed)
}

/// `a` for bank 0, as in `bank-a`.
fn bank_prefix(bank: usize) -> String {
    bank_name(bank).trim_start_matches("bank-").to_string()
}

/// Every account's starting balance, as `(bank, account) -> balance`.
pub fn initial_balances(banks: usize) -> Vec<((usize, String), i64)> {
    let mut all = Vec::new();
    for bank in 0..banks {
        let prefix = bank_prefix(bank);
        for i in 0..FUNDED_PER_BANK {
            all.push(((bank, format!("{prefix}{i}")), FUNDED_BALANCE));
        }
        all.push(((bank, format!("{prefix}shut")), 0));
    }
    all
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    TwoPc,
    Saga,
}

/// Why a transfer was drawn: to succeed if it can, or to be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Intent {
    /// Between funded accounts; succeeds unless the payer lacks the money.
    Normal,
    /// More than all the money in the cluster: must abort (2PC) or fail its debit (saga).
    Overdraft,
    /// Credits a closed account: must abort or compensate.
    ClosedPayee,
    /// Credits an account that does not exist: must abort or compensate.
    UnknownPayee,
}

impl Intent {
    pub fn must_fail(self) -> bool {
        !matches!(self, Intent::Normal)
    }
}

/// One transfer a client ran.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub kind: OpKind,
    pub id: TxnId,
    /// `(bank, account)` debited.
    pub from: (usize, String),
    /// `(bank, account)` credited.
    pub to: (usize, String),
    pub amount: i64,
    pub intent: Intent,
    /// For sagas: the completion callback goes to this bank's handler.
    pub callback: Option<usize>,
}

/// Which call a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Execute2pc,
    SubmitSaga,
    WaitSaga,
}

/// What a call got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Committed,
    Aborted {
        reason: String,
    },
    /// The saga was durably accepted.
    Accepted,
    /// A wait ended with the saga in this phase (terminal or not).
    SagaState {
        phase: SagaPhase,
    },
    /// An error, or no answer within the call's bound; the outcome is unknown.
    Failed {
        error: String,
    },
}

/// One call and its answer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Index of the operation in [`History::ops`].
    pub op: usize,
    pub call: CallKind,
    /// Since the start of the run, in ms.
    pub requested_ms: u64,
    pub answered_ms: u64,
    pub answer: Answer,
}

/// Everything the clients did.
#[derive(Debug, Default)]
pub struct History {
    pub ops: Vec<Op>,
    pub entries: Vec<Entry>,
}

impl History {
    /// The entries of operation `op`, in the order they were answered.
    pub fn entries_of(&self, op: usize) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.op == op)
    }

    /// Writes every call, one line each in the order they were answered:
    /// `<requested ms> <answered ms> client <n> <call> <id> <from> -> <to> <amount> <intent> => <answer>`.
    pub fn write_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for e in &self.entries {
            let op = &self.ops[e.op];
            writeln!(
                out,
                "{:>8} {:>8} client {} {:?} {} bank{}/{} -> bank{}/{} {} {:?} => {:?}",
                e.requested_ms,
                e.answered_ms,
                op.client,
                e.call,
                op.id,
                op.from.0,
                op.from.1,
                op.to.0,
                op.to.1,
                op.amount,
                op.intent,
                e.answer
            )?;
        }
        out.flush()
    }
}

/// Shared by the clients: the history and a count of finished operations (for progress).
#[derive(Debug, Default)]
pub struct Recorder {
    pub history: Mutex<History>,
    pub ops_done: AtomicU64,
}

impl Recorder {
    fn add_op(&self, op: Op) -> usize {
        let mut history = self.history.lock().expect("history lock");
        history.ops.push(op);
        history.ops.len() - 1
    }

    fn record(&self, entry: Entry) {
        self.history
            .lock()
            .expect("history lock")
            .entries
            .push(entry);
    }
}

/// What a client needs to run.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub index: usize,
    pub seed: u64,
    /// The coordinator's (proxy) address.
    pub coordinator: String,
    /// Each bank's (proxy) address, by bank index.
    pub banks: Vec<String>,
    /// When the run started (history times are relative to it).
    pub started: Instant,
    /// No new operation starts after this.
    pub until: Instant,
}

fn since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Draws the next operation.
fn draw(rng: &mut SplitMix64, config: &ClientConfig, seq: u64) -> Op {
    let banks = config.banks.len();
    let kind = if rng.next_u64().is_multiple_of(2) {
        OpKind::TwoPc
    } else {
        OpKind::Saga
    };
    let funded = |rng: &mut SplitMix64| {
        let bank = (rng.next_u64() % banks as u64) as usize;
        let i = rng.next_u64() % FUNDED_PER_BANK as u64;
        (bank, format!("{}{i}", bank_prefix(bank)))
    };
    let from = funded(rng);
    let mut to = funded(rng);
    while to == from {
        to = funded(rng);
    }
    let roll = rng.next_u64() % 100;
    let intent = match roll {
        0..=5 => Intent::Overdraft,
        6..=11 => Intent::ClosedPayee,
        12..=16 => Intent::UnknownPayee,
        _ => Intent::Normal,
    };
    let total_money = FUNDED_BALANCE * (FUNDED_PER_BANK * banks) as i64;
    let amount = match intent {
        Intent::Overdraft => total_money + 1,
        _ => i64::try_from(between(rng, (1, 60))).expect("small"),
    };
    match intent {
        Intent::ClosedPayee => to.1 = format!("{}shut", bank_prefix(to.0)),
        Intent::UnknownPayee => to.1 = GHOST.to_string(),
        Intent::Normal | Intent::Overdraft => {}
    }
    let callback = (kind == OpKind::Saga && rng.next_u64().is_multiple_of(3))
        .then(|| (rng.next_u64() % banks as u64) as usize);
    let id = TxnId::parse(&format!("{}-c{}n{seq}", unix_now_ms(), config.index))
        .expect("a well-formed id");
    Op {
        client: config.index,
        kind,
        id,
        from,
        to,
        amount,
        intent,
        callback,
    }
}

/// Runs one client until `config.until`; every call goes into `recorder`.
pub async fn run_client(config: ClientConfig, recorder: Arc<Recorder>) {
    let mut rng = SplitMix64::new(config.seed ^ (0x5EED_0000 + config.index as u64));
    let client = Client {
        client: crate::client(&config.coordinator).await,
        config,
        recorder,
    };
    let mut seq = 0;
    while Instant::now() < client.config.until {
        seq += 1;
        let op = draw(&mut rng, &client.config, seq);
        let index = client.recorder.add_op(op.clone());
        match op.kind {
            OpKind::TwoPc => client.run_2pc(&op, index).await,
            OpKind::Saga => client.run_saga(&op, index).await,
        }
        client.recorder.ops_done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(between(&mut rng, THINK_MS))).await;
    }
}

/// One client: its configuration, its connection to the coordinator, and where it records.
struct Client {
    config: ClientConfig,
    client: TandemClient,
    recorder: Arc<Recorder>,
}

impl Client {
    /// `(bank proxy address, account)`.
    fn addr(&self, (bank, account): &(usize, String)) -> (String, String) {
        (self.config.banks[*bank].clone(), account.clone())
    }

    /// Makes one call up to `attempts` times (with the same id: every call here is
    /// idempotent), each bounded by `bound`, and records every answer; returns the first
    /// definitive one.
    async fn call_recorded<F, Fut>(
        &self,
        (op, call): (usize, CallKind),
        attempts: u32,
        bound: Duration,
        mut attempt_call: F,
    ) -> Option<Answer>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Answer, SdkError>>,
    {
        for attempt in 1..=attempts {
            let requested_ms = since(self.config.started);
            let answer = match tokio::time::timeout(bound, attempt_call()).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => Answer::Failed {
                    error: e.to_string(),
                },
                Err(_) => Answer::Failed {
                    error: format!("no answer within {bound:?}"),
                },
            };
            let definitive = !matches!(answer, Answer::Failed { .. });
            self.recorder.record(Entry {
                op,
                call,
                requested_ms,
                answered_ms: since(self.config.started),
                answer: answer.clone(),
            });
            if definitive {
                return Some(answer);
            }
            if attempt < attempts {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        None
    }

    async fn run_2pc(&self, op: &Op, index: usize) {
        let (from, to) = (self.addr(&op.from), self.addr(&op.to));
        let branches = bank::transfer_branches((&from.0, &from.1), (&to.0, &to.1), op.amount);
        let execute = || {
            let (mut client, branches) = (self.client.clone(), branches.clone());
            async move {
                let outcome = client
                    .execute_2pc_with(&op.id, branches, Some(PREPARE_TIMEOUT))
                    .await?;
                Ok(match outcome {
                    Outcome::Committed => Answer::Committed,
                    Outcome::Aborted { reason } => Answer::Aborted { reason },
                })
            }
        };
        let call = (index, CallKind::Execute2pc);
        self.call_recorded(call, ATTEMPTS_MAX, EXECUTE_TIMEOUT, execute)
            .await;
    }

    async fn run_saga(&self, op: &Op, index: usize) {
        let (from, to) = (self.addr(&op.from), self.addr(&op.to));
        let steps = bank::transfer_saga_steps((&from.0, &from.1), (&to.0, &to.1), op.amount)
            .into_iter()
            .map(|step| step.retry(PATIENT).timeout(STEP_TIMEOUT));
        let mut saga = Saga::sequence(steps).id(op.id.clone());
        if let Some(bank) = op.callback {
            saga = saga.callback(self.config.banks[bank].clone(), bank::CALLBACK);
        }
        let submit = || {
            let saga = saga.clone();
            async move {
                self.client.submit_saga(saga).await?;
                Ok(Answer::Accepted)
            }
        };
        let call = (index, CallKind::SubmitSaga);
        if self
            .call_recorded(call, ATTEMPTS_MAX, SUBMIT_TIMEOUT, submit)
            .await
            .is_none()
        {
            return;
        }
        // `wait` itself retries retryable errors until its timeout; the bound covers a call
        // stuck in a partition.
        let wait = || async {
            let state = self.client.wait(&op.id, SAGA_WAIT).await?;
            Ok(Answer::SagaState { phase: state.phase })
        };
        let call = (index, CallKind::WaitSaga);
        self.call_recorded(call, ATTEMPTS_MAX, SAGA_WAIT + RETRY_PAUSE * 10, wait)
            .await;
    }
}
