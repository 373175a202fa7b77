//! The seeded fault schedule of a chaos run: which fault hits which server when.
//!
//! [`plan`] is a pure function of the seed, the run's length and the number of banks, so a
//! seed names its faults exactly (the interleaving with the workload still depends on real
//! time). The first five faults are one of each kind — a coordinator kill, a bank kill, a
//! partition, a reset of connections, a latency window — in a seeded order, so even a short
//! run exercises them all; the rest are drawn at random. Faults on one server never overlap
//! (each server's faults run one after another), and every fault ends before
//! [`QUIET_TAIL`] is left of the run, so the workload's last operations meet a healed cluster
//! as well.

use std::fmt;
use std::time::Duration;

use tandem_common::SplitMix64;

/// No fault starts before this much of the run has passed (the cluster warms up).
pub const FIRST_FAULT_AT: Duration = Duration::from_secs(1);
/// Every fault has ended this long before the end of the run.
pub const QUIET_TAIL: Duration = Duration::from_secs(3);
/// Gap between the starts of two faults (anywhere in the cluster), in ms.
const GAP_MS: (u64, u64) = (300, 1_500);
/// How long a killed server stays down before its restart, in ms.
const DOWN_MS: (u64, u64) = (100, 2_500);
/// How long a partition lasts, in ms.
const PARTITION_MS: (u64, u64) = (300, 4_000);
/// Latency added during a latency window, in ms.
const LATENCY_MS: (u64, u64) = (5, 200);
/// How long a latency window lasts, in ms.
const LATENCY_WINDOW_MS: (u64, u64) = (1_000, 5_000);
/// Time a restart takes, counted as part of a kill so the server's next fault does not
/// start while it is still starting, in ms.
const RESTART_ALLOWANCE_MS: u64 = 1_000;

/// A server of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Coordinator,
    /// The bank at this index (0 is `bank-a`).
    Bank(usize),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Coordinator => f.write_str("coordinator"),
            Target::Bank(i) => write!(f, "{}", bank_name(*i)),
        }
    }
}

/// `bank-a`, `bank-b`, ...
pub fn bank_name(index: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(index % 26).expect("below 26"));
    format!("bank-{letter}")
}

/// What happens to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL, then a restart on the same data folder after `down`.
    Kill { down: Duration },
    /// The target's proxy blackholes all traffic for `length`.
    Partition { length: Duration },
    /// The target's proxy resets every open connection.
    ResetConnections,
    /// The target's proxy delays every chunk by `latency` for `length`.
    Latency { latency: Duration, length: Duration },
}

impl FaultKind {
    /// How long the fault keeps its target busy.
    fn busy(&self) -> Duration {
        match *self {
            FaultKind::Kill { down } => down + Duration::from_millis(RESTART_ALLOWANCE_MS),
            FaultKind::Partition { length } | FaultKind::Latency { length, .. } => length,
            FaultKind::ResetConnections => Duration::ZERO,
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Since the start of the run.
    pub at: Duration,
    pub target: Target,
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.at.as_secs_f64();
        match self.kind {
            FaultKind::Kill { down } => {
                write!(f, "{at:7.2}s kill {} (down {down:?})", self.target)
            }
            FaultKind::Partition { length } => {
                write!(f, "{at:7.2}s partition {} for {length:?}", self.target)
            }
            FaultKind::ResetConnections => {
                write!(f, "{at:7.2}s reset connections of {}", self.target)
            }
            FaultKind::Latency { latency, length } => write!(
                f,
                "{at:7.2}s latency {latency:?} at {} for {length:?}",
                self.target
            ),
        }
    }
}

/// A number in `lo..=hi`.
pub(crate) fn between(rng: &mut SplitMix64, (lo, hi): (u64, u64)) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

fn millis(rng: &mut SplitMix64, range: (u64, u64)) -> Duration {
    Duration::from_millis(between(rng, range))
}

/// The five faults every run starts with, one of each kind, in a seeded order.
#[derive(Debug, Clone, Copy)]
enum Opening {
    KillCoordinator,
    KillBank,
    Partition,
    Reset,
    Latency,
}

fn draw_kind(rng: &mut SplitMix64, which: u64) -> FaultKind {
    match which {
        0 => FaultKind::Kill {
            down: millis(rng, DOWN_MS),
        },
        1 => FaultKind::Partition {
            length: millis(rng, PARTITION_MS),
        },
        2 => FaultKind::ResetConnections,
        _ => FaultKind::Latency {
            latency: millis(rng, LATENCY_MS),
            length: millis(rng, LATENCY_WINDOW_MS),
        },
    }
}

/// The faults of a run of `duration` with `banks` banks, in order of their start.
pub fn plan(seed: u64, duration: Duration, banks: usize) -> Vec<Fault> {
    assert!(banks >= 1, "a cluster has at least one bank");
    let mut rng = SplitMix64::new(seed ^ 0xC4A0_5EED);
    let targets: Vec<Target> = std::iter::once(Target::Coordinator)
        .chain((0..banks).map(Target::Bank))
        .collect();
    let Some(end) = duration.checked_sub(QUIET_TAIL) else {
        return Vec::new();
    };
    let mut opening = vec![
        Opening::KillCoordinator,
        Opening::KillBank,
        Opening::Partition,
        Opening::Reset,
        Opening::Latency,
    ];
    // Fisher-Yates, seeded.
    for i in (1..opening.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        opening.swap(i, j);
    }
    let mut opening = opening.into_iter();
    let mut busy_until = vec![Duration::ZERO; targets.len()];
    let mut faults = Vec::new();
    let mut at = FIRST_FAULT_AT;
    while at < end {
        let (target, kind) = match opening.next() {
            Some(first) => {
                let bank = Target::Bank((rng.next_u64() % banks as u64) as usize);
                let any = targets[(rng.next_u64() % targets.len() as u64) as usize];
                match first {
                    Opening::KillCoordinator => (Target::Coordinator, draw_kind(&mut rng, 0)),
                    Opening::KillBank => (bank, draw_kind(&mut rng, 0)),
                    Opening::Partition => (any, draw_kind(&mut rng, 1)),
                    Opening::Reset => (any, draw_kind(&mut rng, 2)),
                    Opening::Latency => (any, draw_kind(&mut rng, 3)),
                }
            }
            None => {
                let target = targets[(rng.next_u64() % targets.len() as u64) as usize];
                let which = rng.next_u64() % 4;
                (target, draw_kind(&mut rng, which))
            }
        };
        let slot = targets.iter().position(|t| *t == target).expect("a target");
        // A busy target takes the fault when it is free again.
        let start = at.max(busy_until[slot]);
        if start + kind.busy() < end {
            busy_until[slot] = start + kind.busy();
            faults.push(Fault {
                at: start,
                target,
                kind,
            });
        }
        at += millis(&mut rng, GAP_MS);
    }
    faults.sort_by_key(|f| f.at);
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_its_faults_and_every_kind_occurs() {
        let duration = Duration::from_secs(30);
        let faults = plan(7, duration, 3);
        assert_eq!(faults, plan(7, duration, 3), "same seed, same schedule");
        assert_ne!(
            faults,
            plan(8, duration, 3),
            "another seed, another schedule"
        );
        let has = |p: &dyn Fn(&Fault) -> bool| faults.iter().any(p);
        assert!(has(
            &|f| f.target == Target::Coordinator && matches!(f.kind, FaultKind::Kill { .. })
        ));
        assert!(has(
            &|f| matches!(f.target, Target::Bank(_)) && matches!(f.kind, FaultKind::Kill { .. })
        ));
        assert!(has(&|f| matches!(f.kind, FaultKind::Partition { .. })));
        assert!(has(&|f| matches!(f.kind, FaultKind::ResetConnections)));
        assert!(has(&|f| matches!(f.kind, FaultKind::Latency { .. })));
    }

    #[test]
    fn faults_on_one_target_never_overlap_and_end_before_the_quiet_tail() {
        for seed in 0..200 {
            let duration = Duration::from_secs(20 + seed % 40);
            let faults = plan(seed, duration, 3);
            let mut free_at = std::collections::BTreeMap::new();
            for f in &faults {
                let free = free_at.entry(f.target).or_insert(Duration::ZERO);
                assert!(
                    f.at >= *free,
                    "seed {seed}: {f} overlaps the previous fault"
                );
                *free = f.at + f.kind.busy();
                assert!(
                    *free < duration - QUIET_TAIL,
                    "seed {seed}: {f} ends in the quiet tail"
                );
            }
        }
        assert!(plan(1, Duration::from_secs(2), 3).is_empty());
    }
}
