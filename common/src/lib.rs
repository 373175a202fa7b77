//! What the Tandem coordinator and the participant SDK share below the protocol.
//!
//! Both sides keep a durable log in sled and must force records to disk before they speak
//! (the coordinator before it announces a decision, a participant before it votes yes), so the
//! pieces that make that true live here once:
//!
//! - [`ids`]: transaction ids ([`TxnId`]) and branch indexes ([`BranchIdx`]), with the
//!   validation every side applies to ids that come from outside;
//! - [`codec`]: the one place records are encoded (bincode 2, behind a format version byte);
//! - [`group_commit`]: the flusher that makes sled writes durable against power loss, sharing
//!   one `flush` + `fdatasync` among all concurrent writers;
//! - [`backoff`]: capped exponential backoff with jitter, from a seeded generator;
//! - [`crash`]: the `TANDEM_CRASH_AT` crash points the fault tests use;
//! - [`duration`]: the one parser of durations typed on command lines (`10s`, `24h`);
//! - [`child`]: starting a Tandem server as a child process and learning the port it bound
//!   (benchmarks and end-to-end tests run every server as a real process);
//! - [`logging`]: the log set-up both binaries share (human or JSON, `TANDEM_LOG_FORMAT`);
//! - [`trace_context`]: W3C `traceparent` parsing, formatting and child spans;
//! - [`progress`]: the progress display of long-running commands (bar or plain lines).
//! - [`credentials`]: bearer tokens (kept as digests, compared in constant time, never
//!   printed) and PEM files, read and checked once for every binary that takes them.

pub mod backoff;
pub mod call_batch;
pub mod child;
pub mod codec;
pub mod crash;
pub mod credentials;
pub mod duration;
pub mod group_commit;
pub mod ids;
pub mod logging;
pub mod progress;
pub mod trace_context;

pub use backoff::{Backoff, SplitMix64};
pub use codec::CodecError;
pub use group_commit::{FlushError, GroupCommit};
pub use ids::{BranchIdx, IdError, TxnId};
pub use trace_context::TraceContext;

/// An error followed by its sources (`a: b: c`), so that a message says why at the bottom (a
/// TLS failure's "invalid peer certificate: UnknownIssuer", not only "transport error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Cuts `text` to at most `max` bytes, on a character boundary, marking a cut with "...".
///
/// Texts that come from outside (a participant's reason, an error message) end up in records
/// and answers; cutting them keeps every record under [`RECORD_BYTES_MAX`].
pub fn clip_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max.saturating_sub(3);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str("...");
    text
}

/// Milliseconds since the Unix epoch, read from the system clock.
///
/// Only runtimes call this; protocol engines are handed the time as an input.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The largest value Tandem itself ever writes to sled, in bytes.
///
/// sled 0.34.7 stores a value larger than a quarter of its 512 KiB segment (about 128 KiB) in a
/// separate blob file, and its flush never fsyncs blob files. Every Tandem record stays well
/// below that, so all of them live in the one data file that [`GroupCommit`] fdatasyncs.
pub const RECORD_BYTES_MAX: usize = 96 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_texts_fit_and_end_on_a_character_boundary() {
        assert_eq!(clip_text("short".into(), 10), "short");
        let long = "é".repeat(100); // two bytes each
        let clipped = clip_text(long, 11);
        assert!(clipped.len() <= 11, "{clipped:?}");
        assert_eq!(clipped, format!("{}...", "é".repeat(4)));
    }
}
