//! Group commit: makes sled writes durable against power loss, one flush for many writers.
//!
//! A writer inserts its records into sled (not yet durable), then asks [`GroupCommit::flush`]
//! and waits. A dedicated flusher thread takes every request queued at that moment, calls
//! `sled::Db::flush()` once and then `fdatasync` on sled's data file, and answers them all.
//! Since a request is queued only after its writer's inserts returned, the flush that answers
//! it covers them.
//!
//! Why not just `flush()`: sled 0.34.7's flush writes with `sync_file_range`, which neither
//! flushes the device's write cache nor the file's metadata, so a power loss can still lose
//! what it "flushed". The `fdatasync` that follows is what makes the write durable.
//! Why not `flush_async()`: awaited from many tasks at once it was seen to hang forever.
//! Why a thread: `flush` blocks for the device; the async runtime's workers must not.
//!
//! Failure: a failed flush or fdatasync poisons the flusher. After an fsync error the kernel
//! may have dropped the dirty pages, so retrying cannot prove anything was written; every
//! later request fails too, and callers treat that as fatal (the process stops and recovers
//! from what is really on disk).
//!
//! Limitation: only sled's main data file is synced. Values above about 128 KiB go to blob
//! files that sled never syncs; Tandem's own records stay below [`crate::RECORD_BYTES_MAX`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::oneshot;

/// A flush could not be completed; nothing written since the last good flush is known durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
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

type Waiter = oneshot::Sender<Result<(), FlushError>>;

/// A handle to one sled database's flusher thread. Cheap to clone. Dropping the last handle
/// stops the thread and waits for it, so the database is closed once the drop returns (a
/// process may then reopen the same folder).
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Flusher>,
}

struct Flusher {
    requests: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<FlushStats>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; it then drops its database handle.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
        let (requests, queue) = mpsc::channel::<Waiter>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        let dir: PathBuf = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("tandem-log-flush".into())
            .spawn(move || flusher_loop(db, data_file, queue, &thread_stats, &dir))?;
        Ok(GroupCommit {
            inner: Arc::new(Flusher {
                requests: Some(requests),
                thread: Some(thread),
                stats,
            }),
        })
    }

    fn enqueue(&self) -> Result<oneshot::Receiver<Result<(), FlushError>>, FlushError> {
        let (done, answer) = oneshot::channel();
        let requests = self.inner.requests.as_ref().ok_or(FlushError::Stopped)?;
        requests.send(done).map_err(|_| FlushError::Stopped)?;
        Ok(answer)
    }

    /// Waits until everything this process wrote to the database before the call is durable.
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.enqueue()?.await.map_err(|_| FlushError::Stopped)?
    }

    /// [`flush`](Self::flush) for code that is not async. Must not be called on an async
    /// runtime's worker thread.
    pub fn flush_blocking(&self) -> Result<(), FlushError> {
        self.enqueue()?
            .blocking_recv()
            .map_err(|_| FlushError::Stopped)?
    }

    pub fn stats(&self) -> &FlushStats {
        &self.inner.stats
    }
}

fn flusher_loop(
    db: sled::Db,
    data_file: File,
    queue: mpsc::Receiver<Waiter>,
    stats: &FlushStats,
    dir: &Path,
) {
    let poisoned = AtomicBool::new(false);
    let mut poison_reason = String::new();
    let mut batch: Vec<Waiter> = Vec::with_capacity(256);
    // Blocks for the first request of a batch, then takes all that queued behind it.
    while let Ok(first) = queue.recv() {
        batch.push(first);
        batch.extend(queue.try_iter());
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
                    stats.flushes.fetch_add(1, Ordering::Relaxed);
                    stats
                        .requests
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    stats
                        .flush_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
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
        for waiter in batch.drain(..) {
            // A writer that stopped waiting (its task was cancelled) is no error.
            let _ = waiter.send(result.clone());
        }
    }
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
