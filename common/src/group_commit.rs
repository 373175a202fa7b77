//! Group commit: makes sled writes durable against power loss, one flush for many writers.
//!
//! Callers hand the flusher a **job**: a closure that does their writes. A dedicated thread
//! takes every job queued at that moment, runs them one after another, calls
//! `sled::Db::flush()` once and then `fdatasync` on sled's data file, and only then releases
//! each job's result to its caller. So "durable before anyone hears of it" is the shape of the
//! API, not a second call a caller could forget. [`GroupCommit::flush`] is the job that writes
//! nothing (for writers that wrote elsewhere before calling it).
//!
//! Why the writes run on this thread: sled 0.34.7 commits every transaction under a
//! process-wide write lock, and its `flush` holds the read side of that lock while it writes.
//! Transactions run on async workers therefore stall those workers behind every flush (and
//! with them the process's network I/O); run here, between flushes, they never contend.
//! Why not just `flush()`: it writes with `sync_file_range`, which neither flushes the
//! device's write cache nor the file's metadata, so a power loss can still lose what it
//! "flushed". The `fdatasync` that follows is what makes the write durable.
//! Why not `flush_async()`: awaited from many tasks at once it was seen to hang forever.
//!
//! Jobs must be short and must not wait for a flush themselves (that would deadlock the
//! thread). A job that panics fails only its own caller.
//!
//! Failure: a failed flush or fdatasync poisons the flusher. After an fsync error the kernel
//! may have dropped the dirty pages, so retrying cannot prove anything was written; every
//! later request fails too, and callers treat that as fatal (the process stops and recovers
//! from what is really on disk).
//!
//! Observation: [`GroupCommit::set_observer`] hands the flusher a [`FlushObserver`], told of
//! every completed flush (its batch size and duration) on the flusher thread. That is how the
//! coordinator's metrics see group commit without this crate knowing of them.
//!
//! Limitation: only sled's main data file is synced. Values above about 128 KiB go to blob
//! files that sled never syncs; Tandem's own records stay below [`crate::RECORD_BYTES_MAX`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A flush could not be completed; nothing written since the last good flush is known durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    #[error("a job run by the flusher panicked: {0}")]
    JobPanicked(String),
    #[error("log flush failed: {0}")]
    Failed(String),
    #[error("the flusher stopped after an earlier failure ({0}); restart the process")]
    Poisoned(String),
    #[error("the flusher thread is gone")]
    Stopped,
}

/// Counters of the flusher's work, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Completed flushes (each a `flush` + `fdatasync`).
    pub flushes: AtomicU64,
    /// Requests answered; `requests / flushes` is the mean batch size.
    pub requests: AtomicU64,
    /// Time spent flushing, in microseconds.
    pub flush_micros: AtomicU64,
}

/// Told of every completed flush, on the flusher thread, before the batch's completions run.
/// It must be cheap (an atomic add or two): every writer of the batch waits for it.
pub trait FlushObserver: Send + Sync + 'static {
    /// A flush of `batch_size` jobs completed in `took` (sled flush plus fdatasync).
    fn flushed(&self, batch_size: usize, took: Duration);
}

/// The observer slot the flusher thread reads; set at most once.
type ObserverSlot = Arc<OnceLock<Arc<dyn FlushObserver>>>;

/// What a job leaves behind to be called once the flush that covers it has completed.
pub type Completion = Box<dyn FnOnce(Result<(), FlushError>) + Send>;
/// A job queued for the flusher thread.
type Job = Box<dyn FnOnce() -> Completion + Send>;

/// A handle to one sled database's flusher thread. Cheap to clone. Dropping the last handle
/// stops the thread and waits for it, so the database is closed once the drop returns (a
/// process may then reopen the same folder).
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Flusher>,
}

struct Flusher {
    requests: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<FlushStats>,
    observer: ObserverSlot,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; it then drops its database handle.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            // The last handle may be dropped by a job's completion on the flusher thread
            // itself; that thread ends on its own once it finds the queue closed.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl GroupCommit {
    /// Starts the flusher for `db`, which was opened at folder `dir`.
    ///
    /// Also syncs the folder itself once, so that the data file's directory entry is durable.
    pub fn start(db: sled::Db, dir: &Path) -> std::io::Result<Self> {
        let data_file = File::open(dir.join("db"))?;
        File::open(dir)?.sync_all()?;
        let (requests, queue) = mpsc::channel::<Job>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        let observer: ObserverSlot = Arc::default();
        let thread_observer = observer.clone();
        let dir: PathBuf = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("tandem-log-flush".into())
            .spawn(move || {
                flusher_loop(db, data_file, queue, &thread_stats, &thread_observer, &dir)
            })?;
        Ok(GroupCommit {
            inner: Arc::new(Flusher {
                requests: Some(requests),
                thread: Some(thread),
                stats,
                observer,
            }),
        })
    }

    fn enqueue<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T, FlushError>>, FlushError> {
        let (done, answer) = oneshot::channel();
        self.submit(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            Box::new(move |flushed: Result<(), FlushError>| {
                let result = match outcome {
                    Ok(value) => flushed.map(|()| value),
                    Err(panic) => Err(FlushError::JobPanicked(panic_message(&panic))),
                };
                // A caller that stopped waiting (its task was cancelled) is no error.
                let _ = done.send(result);
            })
        })?;
        Ok(answer)
    }

    /// Runs `job` on the flusher thread and calls the [`Completion`] it returns with the
    /// outcome of the flush that covers it. For callers that answer several waiters from one
    /// job (the participant's transaction batches); [`run`](Self::run) is the usual way.
    ///
    /// A job that panics leaves no completion: whatever it captured is dropped, so its
    /// waiters see their channels close.
    pub fn submit(
        &self,
        job: impl FnOnce() -> Completion + Send + 'static,
    ) -> Result<(), FlushError> {
        let job: Job = Box::new(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                .unwrap_or_else(|_| Box::new(|_| ()))
        });
        let requests = self.inner.requests.as_ref().ok_or(FlushError::Stopped)?;
        requests.send(job).map_err(|_| FlushError::Stopped)
    }

    /// Runs `job` on the flusher thread and returns its result once everything it wrote
    /// (and everything written before the call) is durable.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, FlushError> {
        self.enqueue(job)?.await.map_err(|_| FlushError::Stopped)?
    }

    /// Waits until everything this process wrote to the database before the call is durable.
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.run(|| ()).await
    }

    /// [`flush`](Self::flush) for code that is not async. Must not be called on an async
    /// runtime's worker thread.
    pub fn flush_blocking(&self) -> Result<(), FlushError> {
        self.enqueue(|| ())?
            .blocking_recv()
            .map_err(|_| FlushError::Stopped)?
    }

    pub fn stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Has `observer` told of every flush from now on. Only one observer can be set: returns
    /// false (and keeps the first) if one was set before.
    pub fn set_observer(&self, observer: Arc<dyn FlushObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }
}

fn flusher_loop(
    db: sled::Db,
    data_file: File,
    queue: mpsc::Receiver<Job>,
    stats: &FlushStats,
    observer: &OnceLock<Arc<dyn FlushObserver>>,
    dir: &Path,
) {
    let poisoned = AtomicBool::new(false);
    let mut poison_reason = String::new();
    let mut batch: Vec<Completion> = Vec::with_capacity(256);
    // Blocks for the first job of a batch, then takes all that queued behind it, running
    // each before the one flush that covers them all.
    while let Ok(first) = queue.recv() {
        batch.push(first());
        batch.extend(queue.try_iter().map(|job| job()));
        let result = if poisoned.load(Ordering::Relaxed) {
            Err(FlushError::Poisoned(poison_reason.clone()))
        } else {
            let started = Instant::now();
            let outcome = db
                .flush()
                .map(|_| ())
                .map_err(|e| e.to_string())
                .and_then(|()| data_file.sync_data().map_err(|e| e.to_string()));
            match outcome {
                Ok(()) => {
                    let took = started.elapsed();
                    if let Some(observer) = observer.get() {
                        observer.flushed(batch.len(), took);
                    }
                    stats.flushes.fetch_add(1, Ordering::Relaxed);
                    stats
                        .requests
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    stats
                        .flush_micros
                        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Err(reason) => {
                    tracing::error!(dir = %dir.display(), %reason, "log flush failed; poisoning the flusher");
                    poisoned.store(true, Ordering::Relaxed);
                    poison_reason = reason.clone();
                    Err(FlushError::Failed(reason))
                }
            }
        };
        for completion in batch.drain(..) {
            completion(result.clone());
        }
    }
}

/// The message a panic carried, for reporting it as an error.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
}

/// Opens (or creates) a sled database at `dir` with the settings Tandem relies on.
pub fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    std::fs::create_dir_all(dir)?;
    sled::Config::new().path(dir).open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes_and_their_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let writers = 64;
        let per_writer = 50;
        {
            let db = open_db(dir.path()).unwrap();
            let flusher = GroupCommit::start(db.clone(), dir.path()).unwrap();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (db, flusher) = (db.clone(), flusher.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..per_writer {
                        db.insert(format!("{w:03}-{i:03}"), &[1u8]).unwrap();
                        flusher.flush().await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let flushes = flusher.stats().flushes.load(Ordering::Relaxed);
            let requests = flusher.stats().requests.load(Ordering::Relaxed);
            assert_eq!(requests, (writers * per_writer) as u64);
            assert!(
                flushes < requests,
                "group commit never batched: {flushes} flushes for {requests} requests"
            );
        }
        let db = open_db(dir.path()).unwrap();
        assert_eq!(
            db.len(),
            writers * per_writer,
            "writes were lost across reopening"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_the_flusher_and_answer_after_the_flush_and_a_panic_fails_only_its_caller()
    {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let flusher = GroupCommit::start(db.clone(), dir.path()).unwrap();
        let writer = db.clone();
        let value = flusher
            .run(move || writer.insert("k", "v").unwrap().is_none())
            .await
            .unwrap();
        assert!(value, "the job saw no earlier value");
        assert_eq!(flusher.stats().flushes.load(Ordering::Relaxed), 1);
        let panicked = flusher.run(|| -> u8 { panic!("boom in a job") }).await;
        assert!(
            matches!(&panicked, Err(FlushError::JobPanicked(m)) if m.contains("boom")),
            "{panicked:?}"
        );
        assert_eq!(
            flusher.run(|| 7).await.unwrap(),
            7,
            "the flusher survives a panicking job"
        );
        drop(flusher);
        drop(db);
        assert_eq!(
            open_db(dir.path()).unwrap().get("k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn an_observer_hears_every_flush_with_its_batch_size() {
        #[derive(Default)]
        struct Seen {
            flushes: AtomicU64,
            jobs: AtomicU64,
        }
        impl FlushObserver for Seen {
            fn flushed(&self, batch_size: usize, _took: Duration) {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.jobs.fetch_add(batch_size as u64, Ordering::Relaxed);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let flusher = GroupCommit::start(db, dir.path()).unwrap();
        let seen = Arc::new(Seen::default());
        assert!(flusher.set_observer(seen.clone()));
        assert!(
            !flusher.set_observer(Arc::new(Seen::default())),
            "a second observer replaced the first"
        );
        for _ in 0..3 {
            flusher.flush_blocking().unwrap();
        }
        assert_eq!(seen.flushes.load(Ordering::Relaxed), 3);
        assert_eq!(seen.jobs.load(Ordering::Relaxed), 3);
        assert_eq!(
            seen.jobs.load(Ordering::Relaxed),
            flusher.stats().requests.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn flush_blocking_works_outside_a_runtime_and_the_thread_stops_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let flusher = GroupCommit::start(db.clone(), dir.path()).unwrap();
        db.insert("k", "v").unwrap();
        flusher.flush_blocking().unwrap();
        assert_eq!(flusher.stats().flushes.load(Ordering::Relaxed), 1);
        drop(flusher);
        drop(db);
        // The flusher held a clone of the database; once it stopped, the folder reopens.
        let reopened = open_db(dir.path()).unwrap();
        assert_eq!(reopened.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
