//! A seed's workload: the accounts, and the 2PC and saga transfers the clients run.
//!
//! Every participant hosts the same account names: `src0..src3` (funded; debited and credited
//! by 2PC transfers, debited by sagas), `sink0` and `sink1` (start empty; credited by both
//! kinds, never debited except by a saga's compensation of its own credit, so that such a
//! compensation always finds its money) and `closed0` (closed: every credit is refused). A
//! credit to `ghost` (no such account) is refused too. Some transfers therefore must abort or
//! compensate: insufficient funds, a closed account, an unknown one.
//!
//! 2PC transfers have two or three branches (one debit, one or two credits), possibly several
//! at the same participant. Sagas debit one account and credit one or two others, either in
//! sequence or (for two credits) as a graph whose credits run in parallel after the debit;
//! their retry policies are unlimited, or bounded by count or deadline (so that "retries
//! exhausted" compensates steps whose action may in fact have run).

use std::collections::{BTreeMap, BTreeSet};

use tandem_common::{Backoff, SplitMix64, TxnId};
use tandem_coordinator::engine::saga::{RetryPolicy, SagaSpec, StepSpec};
use tandem_coordinator::engine::types::{BranchSpec, BranchTarget};
use tandem_coordinator::log::record::Fingerprint;
use tandem_participant::bank::{Account, BankOp};

use super::coordinator::participant_addr;
use super::participant::{PState, RESOURCE};

pub const SOURCES: [&str; 4] = ["src0", "src1", "src2", "src3"];
pub const SINKS: [&str; 2] = ["sink0", "sink1"];
pub const CLOSED: &str = "closed0";
pub const GHOST: &str = "ghost";

/// One operation a client runs.
#[derive(Debug, Clone)]
pub enum Op {
    TwoPc {
        txn: TxnId,
        /// (participant, op) per branch.
        branches: Vec<(usize, BankOp)>,
        timeout_ms: u64,
    },
    Saga {
        saga: TxnId,
        /// (participant, action, compensation, after) per step.
        steps: Vec<(usize, BankOp, BankOp, Vec<u32>)>,
        retry: RetryPolicy,
        timeout_ms: u64,
    },
}

impl Op {
    pub fn id(&self) -> &TxnId {
        match self {
            Op::TwoPc { txn, .. } => txn,
            Op::Saga { saga, .. } => saga,
        }
    }

    pub fn branch_specs(branches: &[(usize, BankOp)]) -> Vec<BranchSpec> {
        branches
            .iter()
            .map(|(p, op)| BranchSpec {
                target: target(*p),
                payload: op.encode(),
            })
            .collect()
    }

    pub fn saga_spec(
        steps: &[(usize, BankOp, BankOp, Vec<u32>)],
        retry: &RetryPolicy,
        timeout_ms: u64,
    ) -> SagaSpec {
        SagaSpec {
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, (p, action, compensation, after))| StepSpec {
                    name: format!("s{i}"),
                    target: target(*p),
                    action: action.encode(),
                    compensation: compensation.encode(),
                    after: after.clone(),
                    retry: retry.clone(),
                    timeout_ms,
                })
                .collect(),
            callback: None,
        }
    }
}

fn target(p: usize) -> BranchTarget {
    BranchTarget {
        participant: participant_addr(p),
        resource: RESOURCE.to_string(),
    }
}

/// A fingerprint that tells one op from another (the id's bytes; retries reuse it).
pub fn fingerprint(id: &TxnId) -> Fingerprint {
    let mut f = [0u8; 32];
    for (i, b) in id.as_str().bytes().enumerate() {
        f[i % 32] ^= b.rotate_left(i as u32 % 8);
    }
    f
}

/// The starting state of every participant.
pub fn initial_state(rng: &mut SplitMix64) -> PState {
    let mut state = PState::default();
    for name in SOURCES {
        let available = 100 + (rng.next_u64() % 900) as i64;
        state
            .accounts
            .insert(name.to_string(), Account { available, held: 0 });
    }
    for name in SINKS {
        state.accounts.insert(
            name.to_string(),
            Account {
                available: 0,
                held: 0,
            },
        );
    }
    state.accounts.insert(
        CLOSED.to_string(),
        Account {
            available: 50,
            held: 0,
        },
    );
    state.closed = BTreeSet::from([CLOSED.to_string()]);
    state
}

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[(rng.next_u64() % items.len() as u64) as usize]
}

/// A credit target: mostly a real account, sometimes one that refuses.
fn credit_account(rng: &mut SplitMix64, sagas: bool) -> String {
    let roll = rng.next_u64() % 100;
    if roll < 8 {
        CLOSED.to_string()
    } else if roll < 14 {
        GHOST.to_string()
    } else if sagas || roll < 40 {
        pick(rng, &SINKS).to_string()
    } else {
        pick(rng, &SOURCES).to_string()
    }
}

/// The workload of one seed: ops with the simulated time each client starts it.
pub fn generate(
    rng: &mut SplitMix64,
    participants: usize,
    start_ms: u64,
    window_ms: u64,
    twopc: usize,
    sagas: usize,
) -> BTreeMap<(u64, usize), Op> {
    let mut ops = BTreeMap::new();
    let p = |rng: &mut SplitMix64| (rng.next_u64() % participants as u64) as usize;
    let amount = |rng: &mut SplitMix64| 1 + (rng.next_u64() % 300) as i64;
    for i in 0..twopc + sagas {
        let at = start_ms + rng.next_u64() % window_ms;
        let id = TxnId::parse(&format!("{at:013}-sim{i}")).expect("a well-formed id");
        let op = if i < twopc {
            let total = amount(rng);
            let from = pick(rng, &SOURCES).to_string();
            let mut branches = vec![(
                p(rng),
                BankOp::Debit {
                    account: from.clone(),
                    amount: total,
                },
            )];
            if rng.next_u64().is_multiple_of(4) && total >= 2 {
                let first = total / 2;
                for part in [first, total - first] {
                    branches.push((
                        p(rng),
                        BankOp::Credit {
                            account: credit_account(rng, false),
                            amount: part,
                        },
                    ));
                }
            } else {
                let mut to = credit_account(rng, false);
                if to == from {
                    to = SINKS[0].to_string();
                }
                branches.push((
                    p(rng),
                    BankOp::Credit {
                        account: to,
                        amount: total,
                    },
                ));
            }
            Op::TwoPc {
                txn: id,
                branches,
                timeout_ms: 200 + rng.next_u64() % 1_500,
            }
        } else {
            let total = amount(rng);
            let from = pick(rng, &SOURCES).to_string();
            let debit = BankOp::Debit {
                account: from.clone(),
                amount: total,
            };
            let undo_debit = BankOp::Credit {
                account: from,
                amount: total,
            };
            let mut steps = vec![(p(rng), debit, undo_debit, Vec::new())];
            let credit = |rng: &mut SplitMix64, amount: i64| {
                let account = credit_account(rng, true);
                (
                    BankOp::Credit {
                        account: account.clone(),
                        amount,
                    },
                    BankOp::Debit { account, amount },
                )
            };
            if rng.next_u64().is_multiple_of(3) && total >= 2 {
                let first = total / 2;
                let parallel = rng.next_u64().is_multiple_of(2);
                let (a, ca) = credit(rng, first);
                steps.push((p(rng), a, ca, vec![0]));
                let (b, cb) = credit(rng, total - first);
                steps.push((p(rng), b, cb, if parallel { vec![0] } else { vec![1] }));
            } else {
                let (a, ca) = credit(rng, total);
                steps.push((p(rng), a, ca, vec![0]));
            }
            let backoff = Backoff {
                initial_ms: 20,
                multiplier: 2.0,
                max_ms: 500,
            };
            let retry = match rng.next_u64() % 3 {
                0 => RetryPolicy {
                    backoff,
                    attempts_max: 0,
                    deadline_ms: 0,
                },
                1 => RetryPolicy {
                    backoff,
                    attempts_max: 2 + (rng.next_u64() % 4) as u32,
                    deadline_ms: 0,
                },
                _ => RetryPolicy {
                    backoff,
                    attempts_max: 0,
                    deadline_ms: 500 + rng.next_u64() % 3_000,
                },
            };
            Op::Saga {
                saga: id,
                steps,
                retry,
                timeout_ms: 100 + rng.next_u64() % 900,
            }
        };
        ops.insert((at, i), op);
    }
    ops
}
