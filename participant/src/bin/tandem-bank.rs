//! `tandem-bank`: the sample bank service and its command line.
//!
//! - `serve`: host the bank's accounts as a Tandem participant (the 2PC resource, the saga
//!   step and the saga callback handler, all named `bank`);
//! - `transfer`: move money between two accounts (possibly in two banks) in one 2PC
//!   transaction through a coordinator; exit code 0 only if it committed, 1 if it aborted;
//! - `transfer --saga`: the same as a saga of two steps (debit, then credit; a failed credit
//!   compensates the debit). Prints `accepted <saga id>` as soon as the coordinator accepted
//!   it; with `--wait`, then `completed <id>`, `compensated <id>: ...` or `aborted <id>: ...`.
//!   Exit code 0 if accepted (without `--wait`) or completed (with it), 1 if compensated or
//!   aborted, 2 on any error (including a `--wait` that timed out);
//! - `watch`: follow a saga's changes as the coordinator streams them, one line per change
//!   (seq, kind, step, attempt, detail), ending at FINISHED with the outcome line that
//!   `transfer --saga --wait` prints. Exit code 0 if the saga completed, 1 if it was
//!   compensated or aborted, 2 on any error (including a stream that ended before FINISHED);
//! - `balances`: print a stopped bank's committed balances as one JSON object;
//! - `callbacks`: print the saga outcomes a stopped bank's callback handler received, as one
//!   JSON object keyed by saga id.
//!
//! Security (docs/operations.md): `serve --tls-cert --tls-key` serves over TLS, with
//! `--tls-client-ca` mutual TLS, with `--coordinator-name` only the coordinator's certificate
//! may prepare, commit, abort, act, compensate or report a finished saga, and with
//! `--coordinator-token-file` only a caller carrying the coordinator's token. Every command
//! that calls the coordinator takes `--coordinator-ca` (and `--client-cert --client-key` under
//! mutual TLS) and `--client-token-file`. As for `tandem serve`, `serve` without TLS listens
//! only on loopback unless `--plaintext` is given.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use tandem_common::logging::{self, LogFormat};
use tandem_participant::server::{CallerPolicy, ServeSecurity};
use tandem_participant::{
    bank, ConnectOptions, Outcome, ParticipantConfig, SagaChange, SagaChangeKind, SagaOutcome,
    SagaState, TandemClient, Token, TokenSet, TxnId,
};
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(
    name = "tandem-bank",
    about = "Sample bank service for Tandem",
    version
)]
struct Cli {
    /// Log format: human or json (default: $TANDEM_LOG_FORMAT, else human). Logs go to
    /// stderr; the level comes from RUST_LOG (default warn).
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How this process reaches the coordinator when it calls it.
#[derive(clap::Args, Debug, Clone)]
struct CoordinatorAccess {
    /// The CA that signed the coordinator's certificate (PEM): the coordinator is then called
    /// over TLS (an address without a scheme is https://).
    #[arg(long, value_name = "PEM")]
    coordinator_ca: Option<PathBuf>,
    /// This process's certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, value_name = "PEM", requires_all = ["client_key", "coordinator_ca"])]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// A file holding the client token the coordinator requires (default: $TANDEM_CLIENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    client_token_file: Option<PathBuf>,
}

/// The environment variable `--client-token-file` falls back on.
const CLIENT_TOKEN_ENV: &str = "TANDEM_CLIENT_TOKEN";
/// The environment variable `--coordinator-token-file` falls back on.
const COORDINATOR_TOKEN_ENV: &str = "TANDEM_COORDINATOR_TOKEN";

impl CoordinatorAccess {
    fn options(&self) -> anyhow::Result<ConnectOptions> {
        let tls = match &self.coordinator_ca {
            Some(ca) => Some(ConnectOptions::tls_from_files(
                ca,
                self.client_cert.as_deref().zip(self.client_key.as_deref()),
            )?),
            None => None,
        };
        let token = Token::from_file_or_env(self.client_token_file.as_deref(), CLIENT_TOKEN_ENV)
            .context("--client-token-file")?;
        Ok(ConnectOptions { tls, token })
    }

    async fn connect(&self, coordinator: &str) -> anyhow::Result<TandemClient> {
        Ok(TandemClient::connect_with(coordinator, self.options()?).await?)
    }
}

/// How `serve` secures its endpoint.
#[derive(clap::Args, Debug, Clone)]
struct ServeTls {
    /// The bank's TLS certificate chain (PEM); with --tls-key, callers must use https://.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only callers whose certificate this CA signed (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Accept prepare/commit/abort/act/compensate/saga-finished calls only from a caller whose
    /// certificate names this DNS name (the coordinator's identity; needs --tls-client-ca).
    #[arg(long, value_name = "NAME", requires = "tls_client_ca")]
    coordinator_name: Option<String>,
    /// A file holding the token the coordinator must present with those calls (default:
    /// $TANDEM_COORDINATOR_TOKEN); the coordinator sends it with --participant-token-file.
    #[arg(long, value_name = "FILE")]
    coordinator_token_file: Option<PathBuf>,
    /// Serve without TLS on an address that is not loopback.
    #[arg(long, conflicts_with = "tls_cert")]
    plaintext: bool,
}

impl ServeTls {
    fn security(&self) -> anyhow::Result<ServeSecurity> {
        let mut security = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                ServeSecurity::tls_from_files(cert, key, self.tls_client_ca.as_deref())?
            }
            _ => ServeSecurity::default(),
        };
        let mut callers = CallerPolicy::default();
        if let Some(name) = &self.coordinator_name {
            callers = callers
                .coordinator_name(name)
                .map_err(|e| anyhow!("--coordinator-name: {e}"))?;
        }
        let token = Token::from_file_or_env(
            self.coordinator_token_file.as_deref(),
            COORDINATOR_TOKEN_ENV,
        )
        .context("--coordinator-token-file")?;
        if let Some(token) = token {
            callers = callers.coordinator_tokens(TokenSet::single("coordinator", &token));
        }
        security.callers = callers;
        Ok(security)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the bank as a Tandem participant.
    Serve {
        /// Address to listen on (port 0 picks a free port; the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:7401")]
        listen: String,
        /// Folder of the bank's sled database.
        #[arg(long, default_value = "./bank-data")]
        data_dir: PathBuf,
        /// Accounts to create if missing, e.g. `alice=100,bob=50` (existing data wins).
        #[arg(long, default_value = "")]
        accounts: String,
        /// Accounts to mark closed (they refuse credits), e.g. `carol,dave`.
        #[arg(long, default_value = "")]
        closed: String,
        /// How long decided branches, saga steps and handled callbacks are kept before they
        /// are pruned: a duration like 24h or 7d, or `forever`. Must exceed the longest
        /// saga's lifetime (a compensation of a saga older than this is refused).
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = tandem_common::duration::parse_retention)]
        // Spelled out so that clap takes the parser's `Option` as the value (None: forever).
        retention: std::option::Option<Duration>,
        #[command(flatten)]
        tls: ServeTls,
        /// How the in-doubt resolver reaches the coordinator.
        #[command(flatten)]
        access: CoordinatorAccess,
    },
    /// Transfer money as one two-phase-commit transaction, or with --saga as a saga.
    Transfer {
        /// The coordinator's address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        coordinator: String,
        /// Payer, as BANK_ADDR/account (e.g. 127.0.0.1:7401/alice).
        #[arg(long)]
        from: String,
        /// Payee, as BANK_ADDR/account.
        #[arg(long)]
        to: String,
        #[arg(long)]
        amount: i64,
        /// Transaction (or saga) id to use (to retry an earlier transfer); a fresh one by
        /// default.
        #[arg(long)]
        txn_id: Option<String>,
        /// Prepare deadline in milliseconds (the coordinator's default if absent; 2PC only).
        #[arg(long, conflicts_with = "saga")]
        timeout_ms: Option<u64>,
        /// Run the transfer as a saga (debit step, then credit step) instead of 2PC.
        #[arg(long)]
        saga: bool,
        /// With --saga: wait for the outcome and print it.
        #[arg(long, requires = "saga")]
        wait: bool,
        /// With --wait: how long to wait for the outcome, in milliseconds.
        #[arg(long, default_value_t = 60_000, requires = "wait")]
        wait_timeout_ms: u64,
        /// With --saga: the bank (BANK_ADDR) whose callback handler hears the outcome.
        #[arg(long, requires = "saga")]
        callback: Option<String>,
        #[command(flatten)]
        access: CoordinatorAccess,
    },
    /// Follow a saga's changes until it finishes: one line per change, then the outcome.
    Watch {
        /// The coordinator's address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        coordinator: String,
        /// The saga's id (as `transfer --saga` printed it).
        #[arg(value_parser = parse_saga_id)]
        saga_id: TxnId,
        #[command(flatten)]
        access: CoordinatorAccess,
    },
    /// Print a stopped bank's committed balances as JSON.
    Balances {
        #[arg(long, default_value = "./bank-data")]
        data_dir: PathBuf,
    },
    /// Print the saga outcomes a stopped bank's callback handler received, as JSON.
    Callbacks {
        #[arg(long, default_value = "./bank-data")]
        data_dir: PathBuf,
    },
}

/// Parses `carol,dave`.
fn parse_names(spec: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        bank::validate_account_name(name)?;
        names.push(name.to_string());
    }
    Ok(names)
}

fn parse_saga_id(id: &str) -> Result<TxnId, String> {
    TxnId::parse(id).map_err(|e| e.to_string())
}

/// The name a change kind is printed under (the contract's, without its prefix).
fn kind_name(kind: SagaChangeKind) -> &'static str {
    match kind {
        SagaChangeKind::Accepted => "ACCEPTED",
        SagaChangeKind::StepStarted => "STEP_STARTED",
        SagaChangeKind::StepSucceeded => "STEP_SUCCEEDED",
        SagaChangeKind::StepFailed => "STEP_FAILED",
        SagaChangeKind::StepRetried => "STEP_RETRIED",
        SagaChangeKind::CompensationStarted => "COMPENSATION_STARTED",
        SagaChangeKind::StepCompensated => "STEP_COMPENSATED",
        SagaChangeKind::CompensationRetried => "COMPENSATION_RETRIED",
        SagaChangeKind::Stuck => "STUCK",
        SagaChangeKind::Finished => "FINISHED",
    }
}

/// One change as one line: seq, kind, step (`-` for the whole saga), attempt, detail.
fn change_line(change: &SagaChange) -> String {
    let step = if change.step.is_empty() {
        "-"
    } else {
        &change.step
    };
    let line = format!(
        "{:>3} {:<20} {:<6} {} {}",
        change.seq,
        kind_name(change.kind),
        step,
        change.attempt,
        change.detail.replace('\n', " ")
    );
    line.trim_end().to_string()
}

/// Prints a terminal saga's outcome line and returns the exit code that goes with it: 0 if
/// it completed, 1 if it was compensated or aborted. `None` (nothing printed) if the saga is
/// not terminal.
fn print_outcome(id: &TxnId, state: &SagaState) -> Option<ExitCode> {
    match state.outcome()? {
        SagaOutcome::Completed => {
            println!("completed {id}");
            Some(ExitCode::SUCCESS)
        }
        SagaOutcome::Compensated {
            failed_step,
            reason,
        } => {
            println!("compensated {id}: step {failed_step:?} failed: {reason}");
            Some(ExitCode::from(1))
        }
        SagaOutcome::Aborted { reason } => {
            println!("aborted {id}: {reason}");
            Some(ExitCode::from(1))
        }
    }
}

/// Streams a saga's changes until FINISHED; see the module docs for what it prints and its
/// exit codes.
async fn watch(client: TandemClient, id: TxnId) -> anyhow::Result<ExitCode> {
    let mut changes = client
        .watch(&id)
        .await
        .with_context(|| format!("watching saga {id}"))?;
    while let Some(change) = changes.next().await {
        let change = change.with_context(|| format!("watching saga {id}"))?;
        println!("{}", change_line(&change));
        if change.kind == SagaChangeKind::Finished {
            // The SDK checked that FINISHED carries a terminal state.
            return change
                .outcome
                .as_ref()
                .and_then(|state| print_outcome(&id, state))
                .ok_or_else(|| anyhow!("saga {id}: FINISHED came without a final state"));
        }
    }
    bail!(
        "the watch of saga {id} ended before the saga finished (the coordinator stopped, or \
         this watch fell too far behind); watch again"
    )
}

/// Runs a saga transfer; see the module docs for what it prints and its exit codes.
async fn saga_transfer(
    client: TandemClient,
    id: TxnId,
    from: (String, String),
    to: (String, String),
    amount: i64,
    callback: Option<String>,
    wait: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let mut saga = bank::transfer_saga((&from.0, &from.1), (&to.0, &to.1), amount).id(id.clone());
    if let Some(bank_addr) = callback {
        saga = saga.callback(bank_addr, bank::CALLBACK);
    }
    let id = client
        .submit_saga(saga)
        .await
        .with_context(|| format!("saga {id}"))?;
    // Tests and scripts read this line to learn the saga id.
    println!("accepted {id}");
    let Some(timeout) = wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let state = client
        .wait(&id, timeout)
        .await
        .with_context(|| format!("waiting for saga {id}"))?;
    match print_outcome(&id, &state) {
        Some(code) => Ok(code),
        None => bail!(
            "saga {id} is still {:?} after {} ms",
            state.phase,
            timeout.as_millis()
        ),
    }
}

fn split_account(spec: &str, flag: &str) -> anyhow::Result<(String, String)> {
    let (addr, account) = spec
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("--{flag} {spec:?} is not of the form BANK_ADDR/account"))?;
    if addr.is_empty() {
        bail!("--{flag} {spec:?} has no bank address before the '/'");
    }
    bank::validate_account_name(account).map_err(|e| anyhow!("--{flag}: {e}"))?;
    Ok((addr.to_string(), account.to_string()))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            accounts,
            closed,
            retention,
            tls,
            access,
        } => {
            let accounts =
                bank::parse_accounts(&accounts).map_err(|e| anyhow!("--accounts: {e}"))?;
            let closed = parse_names(&closed).map_err(|e| anyhow!("--closed: {e}"))?;
            let security = tls.security()?;
            let plaintext_ok = |ip: std::net::IpAddr| {
                if security.tls.is_none() && !ip.is_loopback() && !tls.plaintext {
                    bail!(
                        "--listen {listen}: {ip} is not a loopback address, and serving there without TLS would let anyone on the network prepare and commit; give --tls-cert and --tls-key, or --plaintext to serve plaintext anyway"
                    );
                }
                Ok(())
            };
            // An address literal is checked before anything is bound; a name once resolved.
            if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
                plaintext_ok(addr.ip())?;
            }
            let outbound = access.options()?;
            let config = ParticipantConfig {
                coordinator_tls: outbound.tls,
                coordinator_token: outbound.token,
                ..ParticipantConfig::default()
            };
            let participant = bank::builder(&data_dir)
                .config(config)
                .retention(retention)
                .open()
                .with_context(|| format!("opening {}", data_dir.display()))?;
            let created = bank::ensure_accounts(&participant, &accounts).await?;
            bank::close_accounts(&participant, &closed).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("--listen {listen}: cannot bind"))?;
            let bound = listener.local_addr()?;
            plaintext_ok(bound.ip())?;
            // Tests and scripts read this line to learn the port.
            println!("tandem-bank listening on {bound}");
            tracing::info!(data_dir = %data_dir.display(), ?created, ?closed, tls = security.tls.is_some(), "bank serving");
            participant
                .serve_with_security(listener, security, shutdown_signal())
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Transfer {
            coordinator,
            from,
            to,
            amount,
            txn_id,
            timeout_ms,
            saga,
            wait,
            wait_timeout_ms,
            callback,
            access,
        } => {
            let from = split_account(&from, "from")?;
            let to = split_account(&to, "to")?;
            if amount <= 0 || amount > bank::AMOUNT_MAX {
                bail!("--amount {amount} is out of range 1..={}", bank::AMOUNT_MAX);
            }
            let txn = match txn_id {
                Some(id) => TxnId::parse(&id).map_err(|e| anyhow!("--txn-id: {e}"))?,
                None => TandemClient::new_txn_id(),
            };
            let mut client = access.connect(&coordinator).await?;
            if saga {
                let wait = wait.then(|| Duration::from_millis(wait_timeout_ms));
                return saga_transfer(client, txn, from, to, amount, callback, wait).await;
            }
            let branches = bank::transfer_branches((&from.0, &from.1), (&to.0, &to.1), amount);
            let outcome = client
                .execute_2pc_with(&txn, branches, timeout_ms.map(Duration::from_millis))
                .await
                .with_context(|| format!("transaction {txn}"))?;
            match outcome {
                Outcome::Committed => {
                    println!("committed {txn}");
                    Ok(ExitCode::SUCCESS)
                }
                Outcome::Aborted { reason } => {
                    println!("aborted {txn}: {reason}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Watch {
            coordinator,
            saga_id,
            access,
        } => {
            let client = access.connect(&coordinator).await?;
            watch(client, saga_id).await
        }
        Command::Balances { data_dir } => {
            let balances = bank::balances_in(&data_dir)?;
            println!("{}", serde_json::to_string(&balances)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Callbacks { data_dir } => {
            let received = bank::saga_callbacks_in(&data_dir)?;
            println!("{}", serde_json::to_string(&received)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

// glibc's malloc showed up as a fifth of the coordinator's CPU under load (many small,
// short-lived allocations across threads); mimalloc handles that pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::resolve_format(cli.log_format)
        .and_then(|format| logging::init(format, "warn", None))
    {
        eprintln!("tandem-bank: {e}");
        return ExitCode::from(2);
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-bank: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn saga_options_go_only_with_a_saga_transfer() {
        let base = [
            "tandem-bank",
            "transfer",
            "--from",
            "127.0.0.1:1/alice",
            "--to",
            "127.0.0.1:2/bob",
            "--amount",
            "5",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        assert!(parse(&["--saga", "--wait", "--callback", "127.0.0.1:1"]).is_ok());
        assert!(parse(&["--wait"]).is_err(), "--wait needs --saga");
        assert!(
            parse(&["--callback", "x:1"]).is_err(),
            "--callback needs --saga"
        );
        assert!(parse(&["--saga", "--timeout-ms", "5"]).is_err(), "2PC only");
        assert!(
            parse(&["--saga", "--wait-timeout-ms", "5"]).is_err(),
            "needs --wait"
        );
    }

    #[test]
    fn watch_takes_a_well_formed_saga_id_and_an_optional_coordinator() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["tandem-bank", "watch"].iter().chain(args)).map(|cli| {
                match cli.command {
                    Command::Watch {
                        coordinator,
                        saga_id,
                        ..
                    } => (coordinator, saga_id.to_string()),
                    _ => panic!("parsed as another command"),
                }
            })
        };
        let id = "1795394986401-280e78f2e5374a150";
        assert_eq!(
            parse(&[id]).unwrap(),
            ("127.0.0.1:7400".to_string(), id.to_string())
        );
        assert_eq!(
            parse(&["--coordinator", "127.0.0.1:9", id]).unwrap(),
            ("127.0.0.1:9".to_string(), id.to_string())
        );
        assert!(parse(&[]).is_err(), "the saga id is required");
        let malformed = parse(&["not-a-saga-id"]).unwrap_err().to_string();
        assert!(malformed.contains("not-a-saga-id"), "{malformed}");
        assert!(parse(&[id, id]).is_err(), "one saga at a time");
    }

    #[test]
    fn a_change_is_one_line_with_seq_kind_step_attempt_and_detail() {
        let change = |kind, step: &str, attempt, detail: &str| SagaChange {
            seq: 7,
            at_ms: 1,
            kind,
            step: step.into(),
            attempt,
            detail: detail.into(),
            outcome: None,
        };
        assert_eq!(
            change_line(&change(SagaChangeKind::StepSucceeded, "debit", 1, "")),
            "  7 STEP_SUCCEEDED       debit  1"
        );
        assert_eq!(
            change_line(&change(SagaChangeKind::Accepted, "", 0, "2 steps")),
            "  7 ACCEPTED             -      0 2 steps"
        );
        let retried = change_line(&change(SagaChangeKind::StepRetried, "credit", 2, "a\nb"));
        assert_eq!(retried, "  7 STEP_RETRIED         credit 2 a b");
    }

    #[test]
    fn closed_account_lists_parse_or_name_the_problem() {
        assert_eq!(parse_names(" carol, dave ,").unwrap(), ["carol", "dave"]);
        assert!(parse_names("").unwrap().is_empty());
        assert!(parse_names("a b").unwrap_err().contains("account name"));
    }
}
