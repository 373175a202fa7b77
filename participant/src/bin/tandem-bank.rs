//! `tandem-bank`: the sample bank service and its command line.
//!
//! - `serve`: host the bank's accounts as a Tandem participant;
//! - `transfer`: move money between two accounts (possibly in two banks) in one 2PC
//!   transaction through a coordinator; exit code 0 only if it committed;
//! - `balances`: print a stopped bank's committed balances as one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use tandem_participant::{bank, Outcome, TandemClient, TxnId};

#[derive(Parser)]
#[command(
    name = "tandem-bank",
    about = "Sample bank service for Tandem",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    },
    /// Transfer money as one two-phase-commit transaction.
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
        /// Transaction id to use (to retry an earlier transfer); a fresh one by default.
        #[arg(long)]
        txn_id: Option<String>,
        /// Prepare deadline in milliseconds (the coordinator's default if absent).
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Print a stopped bank's committed balances as JSON.
    Balances {
        #[arg(long, default_value = "./bank-data")]
        data_dir: PathBuf,
    },
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
        } => {
            let accounts =
                bank::parse_accounts(&accounts).map_err(|e| anyhow!("--accounts: {e}"))?;
            let participant =
                bank::open(&data_dir).with_context(|| format!("opening {}", data_dir.display()))?;
            let created = bank::ensure_accounts(&participant, &accounts).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("--listen {listen}: cannot bind"))?;
            // Tests and scripts read this line to learn the port.
            println!("tandem-bank listening on {}", listener.local_addr()?);
            tracing::info!(data_dir = %data_dir.display(), ?created, "bank serving");
            participant.serve(listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Transfer {
            coordinator,
            from,
            to,
            amount,
            txn_id,
            timeout_ms,
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
            let mut client = TandemClient::connect(&coordinator).await?;
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
        Command::Balances { data_dir } => {
            let balances = bank::balances_in(&data_dir)?;
            println!("{}", serde_json::to_string(&balances)?);
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-bank: {e:#}");
            ExitCode::from(2)
        }
    }
}
