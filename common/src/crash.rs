//! Crash points: named places where a process kills itself at once when told to.
//!
//! The fault tests set `TANDEM_CRASH_AT=<point>` on a coordinator or participant process; when
//! execution reaches [`crash_point`] with that name the process calls `abort()`: no destructors,
//! no flush, nothing written afterwards, just as `kill -9` would leave it. The points are listed
//! in docs/protocol.md. Reading the variable once keeps the check off the hot path.

use std::sync::OnceLock;

/// The environment variable naming the crash point to stop at.
pub const CRASH_AT_ENV: &str = "TANDEM_CRASH_AT";

fn armed_point() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(CRASH_AT_ENV).ok().filter(|p| !p.is_empty()))
        .as_deref()
}

/// Aborts the process if `TANDEM_CRASH_AT` names `point`.
#[inline]
pub fn crash_point(point: &'static str) {
    if armed_point() == Some(point) {
        // stderr, not tracing: the subscriber may buffer, and this line is what the test reads.
        eprintln!("tandem: crash point {point} reached; aborting as {CRASH_AT_ENV} asked");
        std::process::abort();
    }
}
