//! The deterministic simulation in CI: a fixed set of seeds must hold every invariant, a seed
//! must replay identically, and planted bugs must be found (the checker can fail).
//!
//! Run a long campaign with `cargo run -p tandem-tests --release --bin simulate -- --seeds
//! 10000`; replay a failing seed with the command its failure prints.

use std::time::Instant;

use tandem_tests::sim::{self, PlantedBug, Report, SimConfig};

/// Seeds CI runs: about 13 000 simulated 2PC transactions and sagas.
const CI_SEEDS: u64 = 500;
/// A planted bug must be found within this many seeds.
const BUG_SEEDS_MAX: u64 = 50;

#[test]
fn fixed_seeds_hold_every_invariant() {
    let started = Instant::now();
    let mut total = Report::default();
    for seed in 0..CI_SEEDS {
        match sim::run(&SimConfig::for_seed(seed)) {
            Ok(report) => total.add(&report),
            Err(failure) => panic!("{failure}"),
        }
    }
    println!(
        "{} seeds, {} 2PC transactions, {} sagas, {} events, faults {:?}, in {:.1} s",
        total.seeds,
        total.twopc,
        total.sagas,
        total.events,
        total.faults,
        started.elapsed().as_secs_f64()
    );
    assert!(
        total.twopc + total.sagas >= 5_000,
        "too small a workload: {total:?}"
    );
    assert!(
        total.twopc_committed > 0 && total.twopc_aborted > 0,
        "{total:?}"
    );
    assert!(
        total.sagas_completed > 0 && total.sagas_compensated > 0,
        "{total:?}"
    );
    for kind in [
        "coordinator_crash",
        "participant_crash",
        "partition",
        "message_dropped",
        "message_duplicated",
        "message_delayed",
        "timer_early",
        "timer_late",
        "client_retry",
    ] {
        assert!(
            total.faults.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} injected: {total:?}"
        );
    }
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 141, 5_926] {
        let first = sim::run(&SimConfig::for_seed(seed)).unwrap_or_else(|f| panic!("{f}"));
        let second = sim::run(&SimConfig::for_seed(seed)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(first, second, "seed {seed} did not replay identically");
    }
}

/// Runs seeds with `bug` planted until one fails; returns the failure.
fn find(bug: PlantedBug) -> sim::SimFailure {
    for seed in 0..BUG_SEEDS_MAX {
        let mut config = SimConfig::for_seed(seed);
        config.bug = Some(bug);
        if let Err(failure) = sim::run(&config) {
            assert_eq!(failure.seed, seed);
            assert!(
                failure
                    .replay
                    .contains(&format!("--seed {seed} --plant-bug {}", bug.name())),
                "the failure must name the command that replays it: {failure}"
            );
            return failure;
        }
    }
    panic!("{bug:?} planted, yet {BUG_SEEDS_MAX} seeds passed: the checker cannot see it");
}

#[test]
fn planted_bug_yes_vote_before_durable_prepare_is_found() {
    let failure = find(PlantedBug::YesBeforeDurable);
    println!("found: {failure}");
    // Replaying the seed fails the same way.
    let mut config = SimConfig::for_seed(failure.seed);
    config.bug = Some(PlantedBug::YesBeforeDurable);
    let again = sim::run(&config).expect_err("a failing seed fails again");
    assert_eq!(again.message, failure.message);
    assert_eq!(again.at_ms, failure.at_ms);
}

#[test]
fn planted_bug_commit_on_pending_outcome_is_found() {
    let failure = find(PlantedBug::CommitOnPending);
    println!("found: {failure}");
}
