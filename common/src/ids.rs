//! Transaction ids and branch indexes: the newtypes every message is addressed by.
//!
//! A transaction id reads `<unix-ms>-<suffix>`: the creation time in milliseconds since the
//! Unix epoch (decimal, 13 digits), a dash, and 1 to 64 characters from `[A-Za-z0-9_.-]`.
//! Carrying the creation time is what lets an id never be reused: the coordinator refuses ids
//! older than its retention window, so an id can be forgotten once it is older than that and
//! still never name a second transaction (and a delayed message of an old transaction can never
//! act on a new one, since no new one can carry its id).

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Longest accepted transaction id, in bytes.
pub const TXN_ID_LEN_MAX: usize = 13 + 1 + TXN_ID_SUFFIX_LEN_MAX;
/// Longest accepted suffix of a transaction id, in bytes.
pub const TXN_ID_SUFFIX_LEN_MAX: usize = 64;

/// A malformed transaction id. The message says what is wrong and is meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("transaction id is empty")]
    Empty,
    #[error("transaction id is {len} bytes long; at most {TXN_ID_LEN_MAX} are allowed")]
    TooLong { len: usize },
    #[error("transaction id {id:?} is not of the form <unix-ms>-<suffix> (13 digits, a dash, 1 to 64 of [A-Za-z0-9_.-])")]
    Malformed { id: String },
}

/// The globally unique id of one transaction (2PC or saga).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId(String);

impl TxnId {
    /// Parses and validates an id that came from outside.
    pub fn parse(id: &str) -> Result<Self, IdError> {
        if id.is_empty() {
            return Err(IdError::Empty);
        }
        if id.len() > TXN_ID_LEN_MAX {
            return Err(IdError::TooLong { len: id.len() });
        }
        let malformed = || IdError::Malformed { id: id.to_string() };
        let (millis, suffix) = id.split_once('-').ok_or_else(malformed)?;
        if millis.len() != 13 || !millis.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let suffix_ok = !suffix.is_empty()
            && suffix.len() <= TXN_ID_SUFFIX_LEN_MAX
            && suffix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if !suffix_ok {
            return Err(malformed());
        }
        Ok(TxnId(id.to_string()))
    }

    /// A fresh id created at `now_ms`, unique within this process and, with overwhelming
    /// probability, across processes (64 random bits per process plus a counter).
    pub fn generate(now_ms: u64) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static PROCESS_SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let salt = *PROCESS_SALT.get_or_init(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.write_u64(now_ms);
            hasher.finish()
        });
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = TxnId(format!("{now_ms:013}-{salt:016x}{count:x}"));
        debug_assert!(
            TxnId::parse(id.as_str()).is_ok(),
            "generated id {id} is malformed"
        );
        id
    }

    /// The creation time the id carries, in milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> u64 {
        self.0[..13]
            .parse()
            .expect("a parsed TxnId starts with 13 digits")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxnId({})", self.0)
    }
}

/// The position of a branch in its transaction's branch list (0-based). Together with the
/// [`TxnId`] it names one branch everywhere: in messages, in the coordinator's log and in the
/// participant's barrier.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BranchIdx(pub u32);

impl fmt::Display for BranchIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Debug for BranchIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BranchIdx({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_parse_and_carry_their_creation_time() {
        let id = TxnId::parse("1763850000000-order.42_a-b").unwrap();
        assert_eq!(id.created_ms(), 1_763_850_000_000);
        assert_eq!(id.as_str(), "1763850000000-order.42_a-b");
    }

    #[test]
    fn malformed_ids_are_refused_with_the_reason() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("abc", IdError::Malformed { id: "abc".into() }),
            (
                "176385000000-x",
                IdError::Malformed {
                    id: "176385000000-x".into(),
                },
            ),
            (
                "1763850000000-",
                IdError::Malformed {
                    id: "1763850000000-".into(),
                },
            ),
            (
                "1763850000000-a b",
                IdError::Malformed {
                    id: "1763850000000-a b".into(),
                },
            ),
            (
                "1763850000000x-ab",
                IdError::Malformed {
                    id: "1763850000000x-ab".into(),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                TxnId::parse(input).unwrap_err(),
                *expected,
                "input {input:?}"
            );
        }
        let long = format!("1763850000000-{}", "a".repeat(65));
        assert_eq!(
            TxnId::parse(&long).unwrap_err(),
            IdError::TooLong { len: long.len() }
        );
    }

    #[test]
    fn generated_ids_are_well_formed_and_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            let id = TxnId::generate(1_763_850_000_000);
            assert_eq!(TxnId::parse(id.as_str()).unwrap(), id);
            assert_eq!(id.created_ms(), 1_763_850_000_000);
            assert!(seen.insert(id.clone()), "duplicate generated id {id}");
        }
    }
}
