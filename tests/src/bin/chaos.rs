//! `chaos`: the real-process chaos run (see `tandem_tests::chaos` and docs/testing.md).
//!
//! ```text
//! cargo run -p tandem-tests --release --bin chaos -- --duration 60s --seed 42
//! cargo run -p tandem-tests --release --bin chaos -- --duration 30m --seed 7 --keep-data /tmp/chaos7
//! ```
//!
//! Shows progress on stderr (a bar on a terminal, a line every 5 s otherwise), then the
//! report on stdout; exits with 1 if
//! an invariant failed, 2 if the run itself could not be carried out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tandem_tests::chaos::{self, ChaosConfig};

const USAGE: &str = "usage: chaos [--duration D] [--seed N] [--clients N] [--banks N] \
[--settle-timeout D] [--keep-data DIR] [--faults]
  --duration D        how long load and faults run: 90s, 30m, 1500ms (default 60s)
  --seed N            the seed of the faults and the workload (default: from the clock)
  --clients N         concurrent clients (default 6)
  --banks N           bank processes (default 3)
  --settle-timeout D  longest wait for everything to finish at the end (default 120s)
  --keep-data DIR     keep the servers' folders, and every call in DIR/history.txt
                      (default: a temp folder, removed)
  --faults            print every fault carried out, with its time";

/// Parses `90s`, `30m`, `1500ms`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 90s, 30m or 1500ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3_600),
        _ => bail!("{text:?}: unknown unit {unit:?} (ms, s, m or h)"),
    };
    if d.is_zero() || d > Duration::from_secs(24 * 3_600) {
        bail!("{text:?}: a duration must be more than 0 and at most 24h");
    }
    Ok(d)
}

struct Args {
    config: ChaosConfig,
    print_faults: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut config = ChaosConfig {
        seed: tandem_common::unix_now_ms(),
        ..ChaosConfig::default()
    };
    let mut print_faults = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--duration" => config.duration = parse_duration(&value("--duration")?)?,
            "--seed" => config.seed = value("--seed")?.parse().context("--seed")?,
            "--clients" => {
                config.clients = value("--clients")?.parse().context("--clients")?;
                if !(1..=64).contains(&config.clients) {
                    bail!("--clients must be 1 to 64");
                }
            }
            "--banks" => {
                config.banks = value("--banks")?.parse().context("--banks")?;
                if !(1..=26).contains(&config.banks) {
                    bail!("--banks must be 1 to 26");
                }
            }
            "--settle-timeout" => {
                config.settle_timeout = parse_duration(&value("--settle-timeout")?)?
            }
            "--keep-data" => config.data_dir = Some(PathBuf::from(value("--keep-data")?)),
            "--faults" => print_faults = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Args {
        config,
        print_faults,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    // The servers inherit this: under faults they warn about every failed call, which would
    // bury the progress lines. Set before any thread starts.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let config = args.config;
    eprintln!(
        "chaos: seed {}, {} of load and faults; replay with: {}",
        config.seed,
        chaos::report::format_duration(config.duration),
        chaos::report::replay_command(&config)
    );
    // A bar on a terminal, a plain line every 5 s otherwise (tandem_common::progress, as for
    // `tandem bench`); `run` reports every PROGRESS_EVERY and the bar ticks in between.
    // Built (once) before the clock starts, so that the progress shows the run, not the build.
    tandem_tests::binaries();
    let display = std::sync::Arc::new(std::sync::Mutex::new(Some(
        tandem_common::progress::Progress::start("chaos", config.duration),
    )));
    let counters = |p: &chaos::report::Progress| {
        [
            ("operations", p.ops_done),
            ("kills", p.faults.total_kills()),
            ("partitions", p.faults.partitions),
            ("resets", p.faults.resets),
            ("latency windows", p.faults.latency_windows),
        ]
    };
    let shown = display.clone();
    let report = runtime.block_on(chaos::run(config, move |p| {
        if let Some(display) = shown.lock().expect("progress lock").as_mut() {
            display.update(&counters(p));
        }
    }));
    if let Some(display) = display.lock().expect("progress lock").take() {
        let ops = report.as_ref().map_or(0, |r| r.ops.twopc + r.ops.sagas);
        display.finish(&[("operations", ops)]);
    }
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("chaos: the run could not be carried out: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_faults {
        println!("faults carried out:");
        for line in &report.fault_log {
            println!("  {line}");
        }
    }
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
