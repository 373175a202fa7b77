//! W3C Trace Context (`traceparent`), the one header that lets one transaction read as one
//! trace across the client, the coordinator and every participant.
//!
//! Format (<https://www.w3.org/TR/trace-context/>, version `00`):
//! `00-<trace-id: 32 lowercase hex>-<parent-id: 16 lowercase hex>-<flags: 2 hex>`.
//! A trace id or parent id of all zeros is invalid, and so is version `ff`. A later version
//! may append fields after the flags (`-...`); its first four fields are read as version 00's.
//!
//! Tandem carries it in gRPC metadata under [`TRACEPARENT`]: the client sends one (or makes
//! one), the coordinator keeps it with the transaction in memory (never in the log) and sends
//! a [`TraceContext::child`] (same trace id, new span id) on every participant call of that
//! transaction, and the participant puts the trace id on its span. Ids are made by a
//! process-wide SplitMix64 generator: unique enough for tracing, not secret.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The gRPC metadata key (and HTTP header) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Longest `traceparent` value read, in bytes: version 00 is 55; later versions may add
/// fields, but a header this long is refused rather than parsed.
pub const TRACEPARENT_LEN_MAX: usize = 512;

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    #[error("traceparent is {0} bytes long; at most {TRACEPARENT_LEN_MAX} are read")]
    TooLong(usize),
    #[error("traceparent {0:?} is not of the form 00-<32 hex>-<16 hex>-<2 hex>")]
    Malformed(String),
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    #[error("traceparent has an all-zero {0}")]
    ZeroId(&'static str),
}

/// One position in a trace: the trace, the span that is the parent of what comes next, and
/// the trace flags (bit 0: sampled).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Puts this context into `request`'s metadata as its W3C `traceparent`: the one way
    /// every Tandem client (the SDK's and the coordinator's) sends it.
    pub fn set_on<T>(&self, request: &mut tonic::Request<T>) {
        let value = self
            .to_string()
            .parse()
            .expect("a formatted traceparent is valid ASCII metadata");
        request.metadata_mut().insert(TRACEPARENT, value);
    }

    /// Parses a `traceparent` value.
    pub fn parse(text: &str) -> Result<Self, TraceContextError> {
        if text.len() > TRACEPARENT_LEN_MAX {
            return Err(TraceContextError::TooLong(text.len()));
        }
        let malformed = || TraceContextError::Malformed(text.to_string());
        let mut parts = text.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let [version] = hex_bytes::<1>(version).ok_or_else(malformed)?;
        if version == 0xff {
            return Err(TraceContextError::InvalidVersion);
        }
        // Version 00 has exactly four fields; a later one may have more.
        if version == 0 && parts.next().is_some() {
            return Err(malformed());
        }
        let trace_id = hex_bytes::<16>(trace).ok_or_else(malformed)?;
        let parent_id = hex_bytes::<8>(parent).ok_or_else(malformed)?;
        let [flags] = hex_bytes::<1>(flags).ok_or_else(malformed)?;
        if trace_id == [0; 16] {
            return Err(TraceContextError::ZeroId("trace id"));
        }
        if parent_id == [0; 8] {
            return Err(TraceContextError::ZeroId("parent id"));
        }
        Ok(TraceContext {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace context a caller sent in its request's `traceparent` metadata entry: the one
    /// way every Tandem server reads it (a malformed one is ignored, see [`Self::from_incoming`]).
    pub fn of_request(metadata: &tonic::metadata::MetadataMap) -> Option<Self> {
        TraceContext::from_incoming(metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()))
    }

    /// The trace context an item of a batched call carries in its `traceparent` field (where
    /// a single call carries it in metadata): empty means none.
    pub fn of_item(traceparent: &str) -> Option<Self> {
        TraceContext::from_incoming(Some(traceparent).filter(|text| !text.is_empty()))
    }

    /// Reads a `traceparent` that came from outside, if there is one. A malformed one is
    /// ignored (logged at debug): the W3C recommendation is to start a new trace then, never
    /// to fail the request.
    pub fn from_incoming(text: Option<&str>) -> Option<Self> {
        match TraceContext::parse(text?) {
            Ok(trace) => Some(trace),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed traceparent");
                None
            }
        }
    }

    /// A new trace, sampled, for a transaction that arrived without one.
    pub fn new_root() -> Self {
        let high = next_id();
        let low = next_id();
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&high.to_be_bytes());
        trace_id[8..].copy_from_slice(&low.to_be_bytes());
        TraceContext {
            trace_id,
            parent_id: next_id().to_be_bytes(),
            flags: 0x01,
        }
    }

    /// The context for a call made under this one: the same trace and flags, a new span id.
    pub fn child(&self) -> Self {
        TraceContext {
            parent_id: next_id().to_be_bytes(),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits (what logs show).
    pub fn trace_id_hex(&self) -> TraceIdHex {
        TraceIdHex(self.trace_id)
    }
}

/// A trace id, displayed as 32 lowercase hex digits without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceIdHex([u8; 16]);

impl fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` value, always version 00.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-", self.trace_id_hex())?;
        self.parent_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Exactly `N` bytes from `2 * N` lowercase hex digits (the spec forbids upper case).
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// A non-zero id from the process-wide generator (SplitMix64 over an atomic counter seeded
/// from the clock and the process id, so that two processes do not repeat each other).
fn next_id() -> u64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        AtomicU64::new(nanos ^ (u64::from(std::process::id()) << 32))
    });
    loop {
        let mut z = state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if z != 0 {
            return z;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_and_formats_back_unchanged() {
        let context = TraceContext::parse(VALID).unwrap();
        assert_eq!(context.flags, 1);
        assert_eq!(
            context.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(
            context.trace_id_hex().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.to_string(), VALID);
    }

    #[test]
    fn invalid_versions_and_malformed_values_are_refused() {
        let refused =
            |text: &str| TraceContext::parse(text).expect_err(&format!("{text:?} was accepted"));
        assert_eq!(
            refused("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            TraceContextError::InvalidVersion
        );
        for bad in [
            "",
            "00",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // upper-case hex is not allowed
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // short trace id, short parent id, long flags
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            // version 00 has exactly four fields
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(
                matches!(refused(bad), TraceContextError::Malformed(_)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            refused(&"0".repeat(TRACEPARENT_LEN_MAX + 1)),
            TraceContextError::TooLong(_)
        ));
        // A later version may carry more fields; the first four are read as version 00's.
        let future =
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
                .unwrap();
        assert_eq!(future, TraceContext::parse(VALID).unwrap());
    }

    #[test]
    fn all_zero_trace_or_parent_ids_are_refused() {
        assert_eq!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(TraceContextError::ZeroId("trace id"))
        );
        assert_eq!(
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(TraceContextError::ZeroId("parent id"))
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span_and_roots_differ() {
        let parent = TraceContext::parse(VALID).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.parent_id, parent.parent_id);
        assert_ne!(child.parent_id, [0; 8]);
        assert_eq!(TraceContext::parse(&child.to_string()), Ok(child));
        let (a, b) = (TraceContext::new_root(), TraceContext::new_root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceContext::parse(&a.to_string()), Ok(a));
    }
}
