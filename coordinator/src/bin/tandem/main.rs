//! `tandem`: the coordinator daemon and its command line.
//!
//! - `tandem serve`: run the coordinator (sled log in `--data-dir`, gRPC on `--listen`);
//! - `tandem demo`: a coordinator and two bank participants in one process, a few hundred
//!   transfers, a summary;
//! - `tandem bench 2pc`: coordinator and banks as separate processes, a closed-loop load,
//!   throughput and latency beside the bare gRPC ping rate of the same run;
//! - `tandem certs`: a private CA and the certificates for TLS and mutual TLS (rcgen).

mod bench;
mod certs;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tandem_common::credentials::{Token, TokenSet};
use tandem_coordinator::config::{format_host_patterns, parse_host_patterns};
use tandem_coordinator::security::{self, AccessPolicy};
use tandem_coordinator::transport::ParticipantSecurity;
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

// Parsed once at start; boxing the serve options would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the coordinator daemon.
    Serve(ServeArgs),
    /// Run a coordinator and two banks in one process and perform transfers.
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make a private CA and certificates for TLS and mutual TLS (no openssl needed).
    Certs(certs::CertsArgs),
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
    /// The server's TLS certificate chain (PEM); with --tls-key, clients and participants
    /// must connect over TLS (https://).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients and participants whose certificate this CA signed
    /// (PEM). Others fail the TLS handshake.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS on an address that is not loopback. Without TLS, only a loopback
    /// --listen is accepted (local development); this says plaintext is meant.
    #[arg(long, conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Client tokens, one per line, optionally `name:token` (default: $TANDEM_CLIENT_TOKENS,
    /// entries separated by newlines or commas). Every call to tandem.v1.Coordinator must then
    /// carry `authorization: Bearer <token>`, or is refused with UNAUTHENTICATED.
    #[arg(long, value_name = "FILE")]
    client_tokens_file: Option<PathBuf>,
    /// The admin credential(s), in the same format (default: $TANDEM_ADMIN_TOKEN). Calls to
    /// tandem.v1.Admin need it; a client token there is refused with PERMISSION_DENIED.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// The CA that signed participants' certificates (PEM): participants are then called over
    /// TLS, and their addresses must be https://.
    #[arg(long, value_name = "PEM")]
    participant_ca: Option<PathBuf>,
    /// The certificate (PEM) presented to participants that require mutual TLS; it should
    /// name the identity they check (`tandem certs` makes coordinator.pem for this).
    #[arg(long, value_name = "PEM", requires_all = ["participant_client_key", "participant_ca"])]
    participant_client_cert: Option<PathBuf>,
    /// The private key of --participant-client-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "participant_client_cert")]
    participant_client_key: Option<PathBuf>,
    /// A file holding the token sent to participants with every call (default:
    /// $TANDEM_PARTICIPANT_TOKEN), for participants started with a coordinator token.
    #[arg(long, value_name = "FILE")]
    participant_token_file: Option<PathBuf>,
}

/// Environment variables the token options fall back on.
const CLIENT_TOKENS_ENV: &str = "TANDEM_CLIENT_TOKENS";
const ADMIN_TOKEN_ENV: &str = "TANDEM_ADMIN_TOKEN";
const PARTICIPANT_TOKEN_ENV: &str = "TANDEM_PARTICIPANT_TOKEN";

/// Loads every security setting of `serve` (files are read and checked here, so a bad one
/// stops the start with its flag and path named).
fn daemon_security(args: &ServeArgs) -> anyhow::Result<daemon::DaemonSecurity> {
    let server_tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(security::server_tls(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let access = AccessPolicy {
        client_tokens: TokenSet::from_file_or_env(
            args.client_tokens_file.as_deref(),
            CLIENT_TOKENS_ENV,
        )
        .context("--client-tokens-file")?,
        admin_tokens: TokenSet::from_file_or_env(args.admin_token_file.as_deref(), ADMIN_TOKEN_ENV)
            .context("--admin-token-file")?,
    };
    let tls = match &args.participant_ca {
        Some(ca) => Some(security::client_tls(
            ca,
            args.participant_client_cert
                .as_deref()
                .zip(args.participant_client_key.as_deref()),
        )?),
        None => None,
    };
    let token = Token::from_file_or_env(
        args.participant_token_file.as_deref(),
        PARTICIPANT_TOKEN_ENV,
    )
    .context("--participant-token-file")?;
    Ok(daemon::DaemonSecurity {
        server_tls,
        access,
        participants: ParticipantSecurity { tls, token },
    })
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Plaintext only on loopback unless asked for: on any other address, transactions and tokens
/// would cross the network in the clear (docs/operations.md).
fn check_plaintext(args: &ServeArgs, ip: std::net::IpAddr, tls: bool) -> anyhow::Result<()> {
    if tls || ip.is_loopback() {
        return Ok(());
    }
    if !args.plaintext {
        bail!(
            "--listen {}: {ip} is not a loopback address, and serving there without TLS would send transactions and tokens over the network in the clear; give --tls-cert and --tls-key, or --plaintext to serve plaintext anyway",
            args.listen
        );
    }
    tracing::warn!(listen = %args.listen, "serving plaintext on a non-loopback address (--plaintext)");
    Ok(())
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
    let security = daemon_security(&args)?;
    let tls = security.server_tls.is_some();
    // An address literal is checked before anything is bound; a name once it resolved.
    if let Ok(addr) = args.listen.parse::<std::net::SocketAddr>() {
        check_plaintext(&args, addr.ip(), tls)?;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let bound = listener.local_addr()?;
    check_plaintext(&args, bound.ip(), tls)?;
    let advertise = match args.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => {
            bail!("--listen {} binds every interface; say with --advertise which address participants should use", args.listen)
        }
        None => bound.to_string(),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut config = CoordinatorConfig::new(format!("{scheme}://{advertise}"));
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
    config.participant_tls = security.participants.tls.is_some();
    // Tests and scripts read this line to learn the port.
    println!("tandem coordinator listening on {bound}");
    daemon::run_with_security(
        listener,
        &args.data_dir,
        config,
        security,
        shutdown_signal(),
    )
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
        Command::Certs(args) => certs::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(2)
        }
    }
}
