//! `tandem`: the coordinator daemon and its command line.
//!
//! - `tandem serve`: run the coordinator (sled log in `--data-dir`, gRPC on `--listen`),
//!   configured by defaults, a TOML file, the environment and flags (`serve.rs`);
//! - `tandem demo`: a coordinator and two bank participants in one process, a few hundred
//!   transfers, a summary;
//! - `tandem bench 2pc`: coordinator and banks as separate processes, a closed-loop load,
//!   throughput and latency beside the bare gRPC ping rate of the same run;
//! - `tandem txn list|show|retry|abort`: the operator's view and levers (`txn.rs`);
//! - `tandem certs`: a private CA and the certificates for TLS and mutual TLS (rcgen).

mod bench;
mod certs;
mod demo;
mod serve;
mod txn;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub use serve::shutdown_signal;
use tandem_common::logging::{self, LogFormat};

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
    Serve(Box<serve::ServeArgs>),
    /// Run a coordinator and two banks in one process and perform transfers.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Operate on transactions and sagas: list, show, retry, abort (the Admin service).
    Txn(txn::TxnArgs),
    /// Make a private CA and the certificates for TLS and mutual TLS.
    Certs(certs::CertsArgs),
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

/// Installs the log subscriber, and with feature `otel` the span exporter to `otel_endpoint`
/// (the daemon's configuration key; `serve::validate` refuses it in a build without `otel`).
fn init_logging(
    format: Option<LogFormat>,
    otel_endpoint: Option<&str>,
) -> anyhow::Result<ExportGuard> {
    let format = logging::resolve_format(format)?;
    #[cfg(feature = "otel")]
    {
        use anyhow::Context;
        let (extra, exporter) = match otel_endpoint {
            Some(endpoint) => {
                let (layer, exporter) = tandem_coordinator::otel::layer(endpoint)
                    .with_context(|| format!("otel_endpoint {endpoint}"))?;
                (Some(layer), Some(exporter))
            }
            None => (None, None),
        };
        logging::init(format, "warn", extra)?;
        Ok(ExportGuard { exporter })
    }
    #[cfg(not(feature = "otel"))]
    {
        debug_assert!(otel_endpoint.is_none(), "refused by serve::validate");
        logging::init(format, "warn", None)?;
        Ok(ExportGuard {})
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            // The configuration comes first: it names the span exporter, if any.
            let settings = serve::load(&args)?;
            let _export = init_logging(cli.log_format, settings.otel_endpoint.as_deref())?;
            serve::serve(*args, settings).await?;
        }
        Command::Demo(args) => {
            let _export = init_logging(cli.log_format, None)?;
            demo::run(args).await?;
        }
        Command::Bench(command) => {
            let _export = init_logging(cli.log_format, None)?;
            bench::run(command).await?;
        }
        Command::Certs(args) => {
            let _export = init_logging(cli.log_format, None)?;
            certs::run(args)?;
        }
        Command::Txn(args) => {
            let _export = init_logging(cli.log_format, None)?;
            // Its own exit codes: 1 refused, 2 malformed (docs/operations.md).
            return Ok(txn::run(args).await);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(2)
        }
    }
}
