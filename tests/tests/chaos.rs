//! The real-process chaos run in CI: a short run of a fixed seed must hold every invariant,
//! and must actually have injected every kind of fault and run every kind of operation, so
//! that it cannot pass by testing nothing.
//!
//! Run a long one with `cargo run -p tandem-tests --release --bin chaos -- --duration 30m`;
//! replay a seed with the command a report prints (see docs/testing.md).

use std::time::{Duration, Instant};

use tandem_tests::chaos::{self, ChaosConfig};

/// The seed CI runs.
const CI_SEED: u64 = 20_251_123;
/// Load and faults; the whole test (start-up and settling included) stays under a minute.
const CI_DURATION: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_with_kills_partitions_resets_and_latency_holds_every_invariant() {
    // The servers inherit the environment; under faults they warn about every failed call.
    // This is the only test of this binary, so nothing else reads the environment meanwhile.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    let config = ChaosConfig {
        seed: CI_SEED,
        duration: CI_DURATION,
        settle_timeout: Duration::from_secs(20),
        ..ChaosConfig::default()
    };
    let started = Instant::now();
    let report = chaos::run(config, |p| eprintln!("{p}"))
        .await
        .unwrap_or_else(|e| panic!("seed {CI_SEED}: the run could not be carried out: {e}"));
    println!("{report}");
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());

    let context = format!("seed {CI_SEED}; replay: {}", report.replay_command());
    for verdict in &report.verdicts {
        assert!(verdict.passed(), "{verdict}\n{context}");
    }

    // Every kind of fault happened.
    let faults = &report.faults;
    assert!(
        faults.kills.get("coordinator").copied().unwrap_or(0) >= 1,
        "no coordinator kill: {faults:?}; {context}"
    );
    assert!(
        faults.kills.keys().any(|k| k.starts_with("bank-")),
        "no bank kill: {faults:?}; {context}"
    );
    assert!(
        faults.partitions >= 1,
        "no partition: {faults:?}; {context}"
    );
    assert!(
        faults.resets >= 1,
        "no connection reset: {faults:?}; {context}"
    );
    assert!(
        faults.latency_windows >= 1,
        "no latency window: {faults:?}; {context}"
    );
    // The faults reached traffic: the proxies refused connections to a killed server.
    let refused: u64 = report.proxies.iter().map(|(_, s)| s.refused).sum();
    assert!(refused >= 1, "no connection met a killed server; {context}");

    // Every kind of operation and outcome happened.
    let ops = &report.ops;
    assert!(
        ops.twopc_committed >= 10 && ops.twopc_aborted >= 3,
        "too few 2PC outcomes: {ops:?}; {context}"
    );
    let ended = |phase: &str| ops.sagas_final.get(phase).copied().unwrap_or(0);
    assert!(
        ended("completed") >= 10 && ended("compensated") >= 3,
        "too few saga outcomes: {ops:?}; {context}"
    );
    assert!(
        ops.must_fail_twopc >= 1 && ops.must_fail_sagas >= 1,
        "no transfer that must fail: {ops:?}; {context}"
    );
    // The invariants looked at real data, not at an empty run.
    let checked: usize = report.verdicts.iter().map(|v| v.checked).sum();
    assert!(checked >= 500, "only {checked} checks made; {context}");
}
