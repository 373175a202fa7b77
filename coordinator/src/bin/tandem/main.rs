//! `tandem`: the coordinator daemon and its command line.
//!
//! - `tandem serve`: run the coordinator (sled log in `--data-dir`, gRPC on `--listen`);
//! - `tandem demo`: a coordinator and two bank participants in one process, a few hundred
//!   transfers, a summary;
//! - `tandem bench 2pc`: coordinator and banks as separate processes, a closed-loop load,
//!   throughput and latency beside the bare gRPC ping rate of the same run.

mod bench;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tandem_common::duration::{millis, parse_retention};
use tandem_coordinator::config::{format_host_patterns, parse_host_patterns};
use tandem_coordinator::{daemon, CoordinatorConfig};

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
    Serve(ServeArgs),
    /// Run a coordinator and two banks in one process and perform transfers.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Folder of the coordinator's transaction log (sled).
    #[arg(long, default_value = "./tandem-data")]
    data_dir: PathBuf,
    /// Address participants use to reach this coordinator (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Prepare deadline when a client sets none, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    prepare_timeout_ms_default: u64,
    /// Largest prepare deadline a client may ask for, in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    prepare_timeout_ms_max: u64,
    /// Most transactions in flight before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 10_000)]
    txn_in_flight_max: usize,
    /// Most sagas in flight before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 10_000)]
    saga_in_flight_max: usize,
    /// Hosts the coordinator may call as participants, comma-separated
    ///
    /// Every participant address a client names (2PC branches, saga steps, saga callbacks)
    /// must be on one of these hosts; a request naming any other is refused with
    /// PERMISSION_DENIED before anything is written or any connection is made.
    /// Each entry is one of:
    ///   loopback          127.0.0.0/8, ::1 and the name localhost (the default)
    ///   10.1.2.3, ::1     one IP address (IPv6 with or without brackets)
    ///   10.0.0.0/8        an IP network in CIDR form (host bits must be clear)
    ///   bank.internal     a host name, matched literally (case aside)
    ///   *.bank.internal   every name under that domain (not the domain itself)
    /// Host names are never resolved to be checked: a name is allowed only if it is
    /// listed, since a resolved address could change before the connection is made.
    /// Example: --allow-participants loopback,10.0.0.0/8,*.bank.internal
    #[arg(
        long,
        value_name = "LIST",
        default_value = "loopback",
        verbatim_doc_comment
    )]
    allow_participants: String,
    /// How long finished transactions and sagas stay in the log (for `GetTransaction`,
    /// `GetSaga` and retries) before they are removed: a duration like 24h or 7d, or
    /// `forever` to keep everything. Must be at least --txn-id-age-max.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_retention)]
    // Spelled out so that clap takes the parser's `Option` as the value (None: forever), not as
    // "the flag may be absent".
    retention: std::option::Option<std::time::Duration>,
    /// Transaction and saga ids older than this are refused, so that an id is never reused
    /// (a duration like 1h or 7d). At most --retention.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = bench::parse_duration)]
    txn_id_age_max: std::time::Duration,
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.prepare_timeout_ms_default == 0
        || args.prepare_timeout_ms_default > args.prepare_timeout_ms_max
    {
        bail!(
            "--prepare-timeout-ms-default must be in 1..=--prepare-timeout-ms-max ({})",
            args.prepare_timeout_ms_max
        );
    }
    if args.saga_in_flight_max == 0 {
        bail!("--saga-in-flight-max must be at least 1");
    }
    if args.txn_in_flight_max == 0 {
        bail!("--txn-in-flight-max must be at least 1");
    }
    let participant_hosts_allowed =
        parse_host_patterns(&args.allow_participants).context("--allow-participants")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let bound = listener.local_addr()?;
    let advertise = match args.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => {
            bail!("--listen {} binds every interface; say with --advertise which address participants should use", args.listen)
        }
        None => bound.to_string(),
    };
    let mut config = CoordinatorConfig::new(format!("http://{advertise}"));
    if advertise.contains("://") {
        config.advertise = advertise;
    }
    config.prepare_timeout_ms_default = args.prepare_timeout_ms_default;
    config.prepare_timeout_ms_max = args.prepare_timeout_ms_max;
    config.txn_in_flight_max = args.txn_in_flight_max;
    config.saga_in_flight_max = args.saga_in_flight_max;
    tracing::info!(
        allowed = %format_host_patterns(&participant_hosts_allowed),
        "participant hosts allowed"
    );
    config.participant_hosts_allowed = participant_hosts_allowed;
    config.txn_id_age_ms_max = millis(args.txn_id_age_max);
    config.terminal_retention_ms = args.retention.map(millis);
    if let Err(e) = config.check_retention() {
        bail!("--retention: {e}");
    }
    // Tests and scripts read this line to learn the port.
    println!("tandem coordinator listening on {bound}");
    daemon::run(listener, &args.data_dir, config, shutdown_signal())
        .await
        .with_context(|| format!("coordinator with data in {}", args.data_dir.display()))?;
    Ok(())
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
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(command) => bench::run(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(2)
        }
    }
}
