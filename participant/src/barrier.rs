//! The barrier: what a participant does with a call, given what its branch log recorded.
//!
//! Every call names `(txn, branch)`. Its record in the branch log decides, before any service
//! code runs, what happens:
//!
//! | recorded \ call  | prepare              | commit               | abort                  |
//! |------------------|----------------------|----------------------|------------------------|
//! | nothing          | run prepare          | refuse (never voted) | record null abort      |
//! | Prepared         | answer YES (repeat)  | run commit           | run abort              |
//! | VotedNo          | answer NO (repeat)   | refuse               | answer done            |
//! | Committed        | answer YES (repeat)  | answer done (repeat) | refuse                 |
//! | Aborted          | answer NO (no hang)  | refuse               | answer done (repeat)   |
//!
//! "Refuse" is a protocol violation (the coordinator never sends it if both sides keep their
//! logs): it is answered with an error and changes nothing. This module is pure; the
//! [`crate::participant`] applies its answer inside the sled transaction that reads the record.

use serde::{Deserialize, Serialize};

/// What the branch log holds for one branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchRecord {
    /// Voted YES; everything commit or abort needs is here and in the service's trees.
    Prepared {
        resource: String,
        payload: Vec<u8>,
        coordinator: String,
        prepared_ms: u64,
    },
    /// Voted NO; holds nothing.
    VotedNo {
        reason: String,
    },
    Committed {
        resource: String,
        committed_ms: u64,
    },
    Aborted {
        /// False for a null abort: the abort came before any prepare.
        was_prepared: bool,
        aborted_ms: u64,
    },
}

/// A call from the coordinator (or the in-doubt resolver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Prepare,
    Commit,
    Abort,
}

/// What to do with the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the resource's prepare and record its vote.
    RunPrepare,
    /// Run the resource's commit with the prepared payload and record Committed.
    RunCommit { payload: Vec<u8> },
    /// Run the resource's abort with the prepared payload and record Aborted.
    RunAbort { payload: Vec<u8> },
    /// Record an abort that came before any prepare, so a late prepare votes NO.
    RecordNullAbort,
    /// Answer the recorded vote again.
    AnswerVote { yes: bool, reason: String },
    /// Answer "done" again: the decision was applied before.
    AnswerDone,
    /// A protocol violation: answer an error, change nothing.
    Refuse { why: String },
}

/// The barrier's rule for `call` given the branch's `recorded` state.
pub fn decide(recorded: Option<&BranchRecord>, call: Call) -> Action {
    use BranchRecord as R;
    match (recorded, call) {
        (None, Call::Prepare) => Action::RunPrepare,
        (None, Call::Commit) => Action::Refuse {
            why: "commit of a branch that never prepared here".into(),
        },
        (None, Call::Abort) => Action::RecordNullAbort,
        (Some(R::Prepared { .. }), Call::Prepare) => Action::AnswerVote {
            yes: true,
            reason: String::new(),
        },
        (Some(R::Prepared { payload, .. }), Call::Commit) => Action::RunCommit {
            payload: payload.clone(),
        },
        (Some(R::Prepared { payload, .. }), Call::Abort) => Action::RunAbort {
            payload: payload.clone(),
        },
        (Some(R::VotedNo { reason }), Call::Prepare) => Action::AnswerVote {
            yes: false,
            reason: reason.clone(),
        },
        (Some(R::VotedNo { .. }), Call::Commit) => Action::Refuse {
            why: "commit of a branch that voted no".into(),
        },
        (Some(R::VotedNo { .. }), Call::Abort) => Action::AnswerDone,
        (Some(R::Committed { .. }), Call::Prepare) => Action::AnswerVote {
            yes: true,
            reason: String::new(),
        },
        (Some(R::Committed { .. }), Call::Commit) => Action::AnswerDone,
        (Some(R::Committed { .. }), Call::Abort) => Action::Refuse {
            why: "abort of a branch that committed".into(),
        },
        (Some(R::Aborted { .. }), Call::Prepare) => Action::AnswerVote {
            yes: false,
            reason: "the branch was aborted before this prepare arrived".into(),
        },
        (Some(R::Aborted { .. }), Call::Commit) => Action::Refuse {
            why: "commit of a branch that aborted".into(),
        },
        (Some(R::Aborted { .. }), Call::Abort) => Action::AnswerDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared() -> BranchRecord {
        BranchRecord::Prepared {
            resource: "bank".into(),
            payload: vec![7],
            coordinator: "http://127.0.0.1:1".into(),
            prepared_ms: 1,
        }
    }

    #[test]
    fn every_recorded_state_and_call_has_the_documented_action() {
        let no = BranchRecord::VotedNo {
            reason: "funds".into(),
        };
        let committed = BranchRecord::Committed {
            resource: "bank".into(),
            committed_ms: 2,
        };
        let aborted = BranchRecord::Aborted {
            was_prepared: false,
            aborted_ms: 3,
        };
        let yes = Action::AnswerVote {
            yes: true,
            reason: String::new(),
        };
        let refused = |a: &Action| matches!(a, Action::Refuse { .. });

        assert_eq!(decide(None, Call::Prepare), Action::RunPrepare);
        assert!(refused(&decide(None, Call::Commit)));
        assert_eq!(decide(None, Call::Abort), Action::RecordNullAbort);

        assert_eq!(decide(Some(&prepared()), Call::Prepare), yes);
        assert_eq!(
            decide(Some(&prepared()), Call::Commit),
            Action::RunCommit { payload: vec![7] }
        );
        assert_eq!(
            decide(Some(&prepared()), Call::Abort),
            Action::RunAbort { payload: vec![7] }
        );

        assert_eq!(
            decide(Some(&no), Call::Prepare),
            Action::AnswerVote {
                yes: false,
                reason: "funds".into()
            }
        );
        assert!(refused(&decide(Some(&no), Call::Commit)));
        assert_eq!(decide(Some(&no), Call::Abort), Action::AnswerDone);

        assert_eq!(decide(Some(&committed), Call::Prepare), yes);
        assert_eq!(decide(Some(&committed), Call::Commit), Action::AnswerDone);
        assert!(refused(&decide(Some(&committed), Call::Abort)));

        assert!(matches!(
            decide(Some(&aborted), Call::Prepare),
            Action::AnswerVote { yes: false, .. }
        ));
        assert!(refused(&decide(Some(&aborted), Call::Commit)));
        assert_eq!(decide(Some(&aborted), Call::Abort), Action::AnswerDone);
    }
}
