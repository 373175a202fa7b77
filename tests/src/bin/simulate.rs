//! `simulate`: runs the deterministic simulation over many seeds, or replays one.
//!
//! ```text
//! cargo run -p tandem-tests --release --bin simulate -- --seeds 10000 [--from N]
//! cargo run -p tandem-tests --release --bin simulate -- --seed N      # with a transcript
//! cargo run -p tandem-tests --release --bin simulate -- --seeds 1000 --plant-bug yes-before-durable
//! ```
//!
//! A campaign stops at the first failing seed, prints it with the command that replays it,
//! and exits with status 1; otherwise it prints a summary (seeds, transactions, sagas,
//! faults by kind, time).

use std::time::Instant;

use anyhow::{bail, Context};
use tandem_tests::sim::{self, PlantedBug, Report, SimConfig};

struct Args {
    seed: Option<u64>,
    seeds: u64,
    from: u64,
    bug: Option<PlantedBug>,
    quiet: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seed: None,
        seeds: 1_000,
        from: 0,
        bug: None,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seed" => args.seed = Some(value("--seed")?.parse().context("--seed")?),
            "--seeds" => args.seeds = value("--seeds")?.parse().context("--seeds")?,
            "--from" => args.from = value("--from")?.parse().context("--from")?,
            "--plant-bug" => {
                let name = value("--plant-bug")?;
                args.bug = Some(PlantedBug::parse(&name).with_context(|| {
                    format!("unknown bug {name:?} (yes-before-durable, commit-on-pending)")
                })?)
            }
            "--quiet" => args.quiet = true,
            "-h" | "--help" => {
                println!(
                    "usage: simulate [--seeds N] [--from FIRST] [--seed N] [--plant-bug NAME] [--quiet]\n\
                     --seeds N       run seeds FIRST..FIRST+N (default 1000 from 0)\n\
                     --seed N        replay one seed, printing every message and transition\n\
                     --plant-bug B   switch on a known bug (yes-before-durable, commit-on-pending)\n\
                     --quiet         no transcript for --seed"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn print_summary(report: &Report, elapsed: std::time::Duration) {
    println!("seeds:              {}", report.seeds);
    println!(
        "2PC transactions:   {} ({} committed, {} aborted)",
        report.twopc, report.twopc_committed, report.twopc_aborted
    );
    println!(
        "sagas:              {} ({} completed, {} compensated)",
        report.sagas, report.sagas_completed, report.sagas_compensated
    );
    println!("events:             {}", report.events);
    println!(
        "simulated time:     {:.1} s",
        report.simulated_ms as f64 / 1_000.0
    );
    println!("faults injected:");
    for (kind, n) in &report.faults {
        println!("  {kind:<36} {n}");
    }
    println!("protocol paths exercised:");
    for (kind, n) in &report.coverage {
        println!("  {kind:<36} {n}");
    }
    println!("wall time:          {:.1} s", elapsed.as_secs_f64());
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    if let Some(seed) = args.seed {
        let mut config = SimConfig::for_seed(seed);
        config.trace = !args.quiet;
        config.bug = args.bug;
        println!("# seed {seed}: {config:?}");
        return match sim::run(&config) {
            Ok(report) => {
                print_summary(&report, started.elapsed());
                println!("seed {seed}: every invariant held");
                Ok(())
            }
            Err(failure) => {
                eprintln!("{failure}");
                std::process::exit(1);
            }
        };
    }
    // Panics are reported as failures with their seed; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut total = Report::default();
    for seed in args.from..args.from + args.seeds {
        let mut config = SimConfig::for_seed(seed);
        config.bug = args.bug;
        match sim::run(&config) {
            Ok(report) => total.add(&report),
            Err(failure) => {
                print_summary(&total, started.elapsed());
                eprintln!("{failure}");
                std::process::exit(1);
            }
        }
        let done = seed - args.from + 1;
        if done % 1_000 == 0 {
            eprintln!("{done} seeds, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    print_summary(&total, started.elapsed());
    println!("all {} seeds passed", args.seeds);
    Ok(())
}
