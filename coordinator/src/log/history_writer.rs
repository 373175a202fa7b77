//! Writes the operators' histories on a thread of their own, in batches.
//!
//! Every state change of every transaction becomes a history entry, and the runtime's loop,
//! which is the coordinator's one serial path, used to write each one itself: a prefix scan to
//! count the entries already kept, then an insert. Under load that was half of the loop's time
//! (a three-step saga makes about eight entries). Histories are lazy by contract (the protocol
//! never reads them; a crash may lose the latest entries), so the loop now only queues an
//! entry; this thread writes everything queued, and knows how many entries
//! each transaction in flight has without scanning (it scans once per transaction it has not
//! seen since the process started, after a restart).
//!
//! Readers call [`HistoryWriter::sync`] first, so they see every entry queued before.

use std::collections::HashMap;
use std::sync::mpsc;

use super::record::{HISTORY_ENTRIES_MAX, HISTORY_HEAD_KEPT};

/// One queued request.
enum Job {
    /// Append this encoded entry to `id`'s history; `last` marks an entry after which none
    /// follow (the transaction finished), so its bookkeeping can be dropped.
    Append {
        id: Vec<u8>,
        entry: Vec<u8>,
        last: bool,
    },
    /// Answer once everything queued before is written.
    Sync(mpsc::SyncSender<()>),
}

/// What the writer knows of one history: its entries are numbered `0..next`; the ones kept
/// are the head `0..HISTORY_HEAD_KEPT` and `max(tail, HISTORY_HEAD_KEPT)..next` (the oldest
/// after the head are the ones dropped).
#[derive(Debug, Clone, Copy)]
struct Kept {
    next: u32,
    tail: u32,
}

impl Kept {
    fn count(&self) -> u32 {
        let head = self.next.min(HISTORY_HEAD_KEPT as u32);
        head + (self.next - self.tail.max(head))
    }
}

/// The prefix of every entry of the history of `id`: `<id> 0x00`.
pub(super) fn entries_prefix(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 5);
    key.extend_from_slice(id);
    key.push(0);
    key
}

/// The key of entry `seq` of the history of `id`: `<id> 0x00 <seq big-endian>`.
fn entry_key(id: &[u8], seq: u32) -> Vec<u8> {
    let mut key = entries_prefix(id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The key marking that `id`'s history dropped entries: `<id> 0x01`.
pub(super) fn truncated_key(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.extend_from_slice(id);
    key.push(1);
    key
}

pub(super) struct HistoryWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HistoryWriter {
    pub(super) fn start(tree: sled::Tree) -> std::io::Result<HistoryWriter> {
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tandem-history".into())
            .spawn(move || run(tree, queue))?;
        Ok(HistoryWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues an encoded entry of `id`'s history.
    pub(super) fn append(&self, id: &[u8], entry: Vec<u8>, last: bool) {
        let job = Job::Append {
            id: id.to_vec(),
            entry,
            last,
        };
        // The thread outlives every caller (it stops only when this writer is dropped), and
        // a failed write stops the process there; so a send cannot fail.
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        debug_assert!(matches!(sent, Some(Ok(()))), "the history writer is gone");
    }

    /// Returns once every entry queued before is in the tree.
    pub(super) fn sync(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if let Some(jobs) = &self.jobs {
            if jobs.send(Job::Sync(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        // Closing the queue lets the thread write what is left and stop.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Most jobs applied in one batch.
const BATCH_JOBS_MAX: usize = 1_024;

fn run(tree: sled::Tree, queue: mpsc::Receiver<Job>) {
    let mut kept: HashMap<Vec<u8>, Kept> = HashMap::new();
    while let Ok(first) = queue.recv() {
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut syncs = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(job) = next.take() {
            taken += 1;
            match job {
                Job::Append { id, entry, last } => {
                    let state = match kept.get(&id) {
                        Some(state) => *state,
                        None => scan(&tree, &id),
                    };
                    let mut state = state;
                    if state.count() >= HISTORY_ENTRIES_MAX as u32 {
                        let oldest_after_head = state.tail.max(HISTORY_HEAD_KEPT as u32);
                        writes.push((entry_key(&id, oldest_after_head), None));
                        writes.push((truncated_key(&id), Some(Vec::new())));
                        state.tail = oldest_after_head + 1;
                    }
                    writes.push((entry_key(&id, state.next), Some(entry)));
                    state.next += 1;
                    if last {
                        kept.remove(&id);
                    } else {
                        kept.insert(id, state);
                    }
                }
                Job::Sync(done) => syncs.push(done),
            }
            if taken < BATCH_JOBS_MAX {
                next = queue.try_recv().ok();
            }
        }
        // One write at a time, not a `sled::Batch`: a batch takes the database's write lock,
        // which would stall every forced write of the protocol while it is applied.
        for (key, value) in writes {
            let written = match value {
                Some(value) => tree.insert(key, value).map(drop),
                None => tree.remove(key).map(drop),
            };
            if let Err(e) = written {
                // As for any write to the log: it can no longer prove what it wrote.
                tracing::error!(error = %e, "writing history entries to the log failed; stopping");
                std::process::abort();
            }
        }
        for done in syncs {
            let _ = done.send(());
        }
    }
}

/// What the tree holds of `id`'s history (once per history the thread has not seen).
fn scan(tree: &sled::Tree, id: &[u8]) -> Kept {
    let prefix = entries_prefix(id);
    let mut seqs = Vec::new();
    for key in tree.scan_prefix(&prefix).keys() {
        match key {
            Ok(key) => {
                let tail: [u8; 4] = key[prefix.len()..]
                    .try_into()
                    .expect("a history key ends in a 4-byte sequence number");
                seqs.push(u32::from_be_bytes(tail));
            }
            Err(e) => {
                tracing::error!(error = %e, "reading a history from the log failed; stopping");
                std::process::abort();
            }
        }
    }
    let next = seqs.last().map_or(0, |last| last + 1);
    let tail = seqs.get(HISTORY_HEAD_KEPT).copied().unwrap_or(next);
    let state = Kept { next, tail };
    debug_assert_eq!(state.count() as usize, seqs.len(), "{seqs:?}");
    state
}
