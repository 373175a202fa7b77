//! `tandem`: the coordinator daemon and its command line.
//!
//! - `tandem serve`: run the coordinator (sled log in `--data-dir`, gRPC on `--listen`),
//!   configured by defaults, a TOML file, the environment and flags (`serve.rs`);
//! - `tandem demo`: a coordinator and two bank participants in one process, a few hundred
//!   transfers, a summary;
//! - `tandem bench 2pc`: coordinator and banks as separate processes, a closed-loop load,
//!   throughput and latency beside the bare gRPC ping rate of the same run;
//! - `tandem txn list|show|retry|abort`: the operator's view and levers (`txn.rs`).

mod bench;
mod demo;
mod serve;
mod txn;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub use serve::shutdown_signal;

#[derive(Parser)]
#[command(
    name = "tandem",
    about = "Tandem distributed transaction coordinator",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator daemon.
    Serve(Box<serve::ServeArgs>),
    /// Run a coordinator and two banks in one process and perform transfers.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Operate on transactions and sagas: list, show, retry, abort (the Admin service).
    Txn(txn::TxnArgs),
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
    let result = match Cli::parse().command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(command) => bench::run(command).await,
        // Its own exit codes: 1 refused, 2 malformed (docs/operations.md).
        Command::Txn(args) => return txn::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(2)
        }
    }
}
