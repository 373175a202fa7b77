//! Progress of a long-running command (`tandem bench`, the chaos run) while it runs.
//!
//! [`Progress::start`] picks the display: a bar (indicatif) when stderr is a terminal, plain
//! lines every [`PLAIN_EVERY`] otherwise (a CI log, a file), so a log is not flooded with
//! redraws. Callers report counters with [`Progress::update`] as often as they like (the
//! display limits itself) and call [`Progress::finish`] at the end. Everything goes to stderr:
//! stdout is left to the command's results.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain progress lines are written.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// A progress display for one run of known total duration.
pub struct Progress {
    label: String,
    total: Duration,
    started: Instant,
    display: Display,
}

enum Display {
    Bar(ProgressBar),
    Lines {
        every: Duration,
        last: Instant,
        out: Box<dyn Write + Send>,
    },
}

impl Progress {
    /// Starts showing the progress of `label`, which should take about `total`.
    pub fn start(label: &str, total: Duration) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(total.as_millis().max(1) as u64),
                ProgressDrawTarget::stderr(),
            );
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
            )
            .expect("the template is valid");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::with_display(label, total, Display::Bar(bar))
        } else {
            Progress::plain(label, total, PLAIN_EVERY, Box::new(std::io::stderr()))
        }
    }

    /// Plain lines to `out`, at most one per `every` (and one at the end).
    pub fn plain(
        label: &str,
        total: Duration,
        every: Duration,
        out: Box<dyn Write + Send>,
    ) -> Progress {
        let display = Display::Lines {
            every,
            last: Instant::now(),
            out,
        };
        Progress::with_display(label, total, display)
    }

    fn with_display(label: &str, total: Duration, display: Display) -> Progress {
        Progress {
            label: label.to_string(),
            total,
            started: Instant::now(),
            display,
        }
    }

    /// Reports the counters so far, e.g. `[("committed", 120), ("aborted", 3)]`.
    pub fn update(&mut self, counters: &[(&str, u64)]) {
        let elapsed = self.started.elapsed();
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_position((elapsed.as_millis() as u64).min(bar.length().unwrap_or(0)));
                bar.set_message(counters_text(counters));
            }
            Display::Lines { every, last, out } => {
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    let line = line(&self.label, elapsed, self.total, counters);
                    // Progress is best effort: a closed stderr must not stop the run.
                    let _ = writeln!(out, "{line}");
                }
            }
        }
    }

    /// Ends the display with the final counters.
    pub fn finish(mut self, counters: &[(&str, u64)]) {
        let elapsed = self.started.elapsed();
        match &mut self.display {
            Display::Bar(bar) => bar.finish_with_message(counters_text(counters)),
            Display::Lines { out, .. } => {
                let line = line(&self.label, elapsed, self.total, counters);
                let _ = writeln!(out, "{line} done");
            }
        }
    }
}

fn counters_text(counters: &[(&str, u64)]) -> String {
    counters
        .iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn line(label: &str, elapsed: Duration, total: Duration, counters: &[(&str, u64)]) -> String {
    let percent = (elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9) * 100.0).min(100.0);
    format!(
        "{label}: {:.1} s of {:.1} s ({percent:.0}%): {}",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        counters_text(counters)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer tests can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_progress_writes_at_most_one_line_per_interval_and_a_final_line() {
        let out = Captured::default();
        let mut progress = Progress::plain(
            "bench 2pc",
            Duration::from_secs(10),
            Duration::from_millis(50),
            Box::new(out.clone()),
        );
        for _ in 0..100 {
            progress.update(&[("committed", 1), ("aborted", 0)]);
        }
        std::thread::sleep(Duration::from_millis(60));
        progress.update(&[("committed", 7), ("aborted", 2)]);
        progress.finish(&[("committed", 9), ("aborted", 2)]);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("bench 2pc: ") && lines[0].ends_with("committed 7, aborted 2"),
            "{text}"
        );
        assert!(lines[1].ends_with("committed 9, aborted 2 done"), "{text}");
    }
}
