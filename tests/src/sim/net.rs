//! The simulated network: who talks to whom, what they say, and how the wire misbehaves.
//!
//! Messages are the protocol's calls and answers in domain types (no prost, no tonic): the
//! coordinator's calls to participants (`Prepare`, `Decision`, `Act`, `Compensate`) carry a
//! call id, and the participant's [`Msg::Answer`] names it; the in-doubt resolver's
//! `Query` and the coordinator's `QueryAnswer` go the other way. The client talks to the
//! coordinator directly (see `sim::World`), not over this network.
//!
//! [`Network::route`] decides each message's fate when it is sent, from the seeded generator:
//! dropped, delivered once after a latency, delivered twice (duplication), or held for a long
//! while (a delay spike, which also reorders it behind later messages). A partition isolates
//! one participant from the coordinator in both directions for a while; it is checked both
//! when a message is sent and when it arrives. After the fault window closes every message is
//! delivered once, promptly.

use std::collections::BTreeMap;

use tandem_common::{BranchIdx, SplitMix64, TxnId};
use tandem_coordinator::engine::types::Vote;
use tandem_coordinator::runtime::QueriedOutcome;

/// A node of the simulated cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Coordinator,
    Participant(usize),
}

/// A participant's answer to one coordinator call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The answer to `Prepare`.
    Vote(Vote),
    /// A decision or a compensation was applied (or had been before).
    Done,
    /// The barrier refused a decision (a protocol violation; never expected).
    Refused(String),
    /// The answer to `Act`.
    Acted { succeeded: bool, reason: String },
    /// A compensation could not apply yet (it is retried).
    NotCompensated(String),
}

/// One message on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Prepare {
        call: u64,
        txn: TxnId,
        branch: BranchIdx,
        payload: Vec<u8>,
    },
    Decision {
        call: u64,
        txn: TxnId,
        branch: BranchIdx,
        commit: bool,
    },
    Act {
        call: u64,
        saga: TxnId,
        step: u32,
        payload: Vec<u8>,
    },
    Compensate {
        call: u64,
        saga: TxnId,
        step: u32,
        payload: Vec<u8>,
    },
    Answer {
        call: u64,
        answer: Answer,
    },
    /// The in-doubt resolver asks about a prepared branch.
    Query {
        txn: TxnId,
        branch: BranchIdx,
    },
    QueryAnswer {
        txn: TxnId,
        branch: BranchIdx,
        outcome: QueriedOutcome,
    },
}

/// A message in flight.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub from: Node,
    pub to: Node,
    pub msg: Msg,
}

/// How the wire misbehaves during the fault window (probabilities per message).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireFaults {
    pub drop: f64,
    pub duplicate: f64,
    /// Chance of a long hold (`spike_ms_max`), which reorders the message.
    pub spike: f64,
    pub spike_ms_max: u64,
}

/// What happened to one message when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    Partitioned,
    /// Delivered after these delays (two for a duplicate); `spiked` if held long.
    Delivered {
        first_ms: u64,
        second_ms: Option<u64>,
        spiked: bool,
    },
}

/// The network: latency, wire faults, and partitions.
#[derive(Debug, Default)]
pub struct Network {
    /// Participant -> the time its partition heals.
    partitions: BTreeMap<usize, u64>,
}

impl Network {
    /// Cuts `participant` off from the coordinator until `until_ms`.
    pub fn partition(&mut self, participant: usize, until_ms: u64) {
        let end = self.partitions.entry(participant).or_insert(until_ms);
        *end = (*end).max(until_ms);
    }

    pub fn heal_all(&mut self) {
        self.partitions.clear();
    }

    /// Whether a message between `from` and `to` is cut off at `now_ms`.
    pub fn cut(&self, now_ms: u64, from: Node, to: Node) -> bool {
        [from, to].iter().any(|node| match node {
            Node::Participant(p) => self.partitions.get(p).is_some_and(|&end| now_ms < end),
            Node::Coordinator => false,
        })
    }

    /// Decides a message's fate at `now_ms`; `faults` is `None` outside the fault window.
    pub fn route(
        &self,
        now_ms: u64,
        env: &Envelope,
        faults: Option<&WireFaults>,
        rng: &mut SplitMix64,
    ) -> Fate {
        if self.cut(now_ms, env.from, env.to) {
            return Fate::Partitioned;
        }
        let latency = |rng: &mut SplitMix64| 1 + rng.next_u64() % 8;
        let Some(faults) = faults else {
            return Fate::Delivered {
                first_ms: latency(rng),
                second_ms: None,
                spiked: false,
            };
        };
        if rng.next_f64() < faults.drop {
            return Fate::Dropped;
        }
        let spiked = rng.next_f64() < faults.spike;
        let first_ms = if spiked {
            20 + rng.next_u64() % faults.spike_ms_max.max(1)
        } else {
            latency(rng)
        };
        let second_ms = (rng.next_f64() < faults.duplicate)
            .then(|| latency(rng) + rng.next_u64() % faults.spike_ms_max.max(1));
        Fate::Delivered {
            first_ms,
            second_ms,
            spiked,
        }
    }
}
