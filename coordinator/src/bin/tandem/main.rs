//! `tandem`: the coordinator daemon and its command line.
//!
//! - `tandem serve`: run the coordinator (sled log in `--data-dir`, gRPC on `--listen`,
//!   Prometheus metrics on `--metrics-listen`, spans to `--otel-endpoint` with feature `otel`);
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
use tandem_common::logging::{self, LogFormat};
use tandem_coordinator::config::{format_host_patterns, parse_host_patterns};
use tandem_coordinator::{daemon, metrics, CoordinatorConfig};

#[derive(Parser)]
#[command(
    name = "tandem",
    about = "Tandem distributed transaction coordinator",
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
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the bound
    /// address is printed as `tandem metrics serving on ADDR`). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Export spans over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317.
    #[cfg(feature = "otel")]
    #[arg(long, value_name = "URL")]
    otel_endpoint: Option<String>,
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
    // Closed (dropped) once the daemon has stopped, which stops the metrics endpoint too.
    let (_metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_listen) = &args.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("--metrics-listen {metrics_listen}: cannot bind"))?;
        // Printed before the "listening on" line, which tells readers that start-up is over.
        println!(
            "tandem metrics serving on {}",
            metrics_listener.local_addr()?
        );
        let registry = config.metrics.clone();
        tokio::spawn(async move {
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = metrics::serve(metrics_listener, registry, stopped).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
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

/// Flushes the span exporter when dropped at the end of `main` (feature `otel`; without it
/// there is nothing to flush).
struct ExportGuard {
    #[cfg(feature = "otel")]
    exporter: Option<tandem_coordinator::otel::Exporter>,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(exporter) = self.exporter.take() {
            exporter.shutdown();
        }
    }
}

/// Installs the log subscriber (and, with feature `otel`, the span exporter `serve` asks for).
fn init_logging(cli: &Cli) -> anyhow::Result<ExportGuard> {
    let format = logging::resolve_format(cli.log_format)?;
    #[cfg(feature = "otel")]
    {
        let endpoint = match &cli.command {
            Command::Serve(args) => args.otel_endpoint.as_deref(),
            Command::Demo(_) | Command::Bench(_) => None,
        };
        let (extra, exporter) = match endpoint {
            Some(endpoint) => {
                let (layer, exporter) = tandem_coordinator::otel::layer(endpoint)
                    .with_context(|| format!("--otel-endpoint {endpoint}"))?;
                (Some(layer), Some(exporter))
            }
            None => (None, None),
        };
        logging::init(format, "warn", extra)?;
        Ok(ExportGuard { exporter })
    }
    #[cfg(not(feature = "otel"))]
    {
        logging::init(format, "warn", None)?;
        Ok(ExportGuard {})
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _export = match init_logging(&cli) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
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
