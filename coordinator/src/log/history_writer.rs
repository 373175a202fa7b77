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
//! Young histories are written whole. Even on this thread, one sled insert per entry was
//! about a seventh of the coordinator's CPU under the saga benchmark. So the thread holds a
//! history's first entries in memory (at most [`HISTORY_LINGER`], and at most
//! `HISTORY_HEAD_KEPT` of them) and writes them as one *chunk* record: most transactions finish
//! within that time, and then their whole history is a single insert. A history that lives
//! longer continues entry by entry after its chunk. A chunk only ever holds entries of the
//! head (the oldest `HISTORY_HEAD_KEPT`, never dropped), so dropping old entries, which works
//! on single-entry records after the head, is unchanged.
//!
//! Readers call [`HistoryWriter::sync`] first, so they see every entry queued before (a sync
//! writes the held entries too).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// The longest the thread holds a history's first entries before writing them.
pub const HISTORY_LINGER: Duration = Duration::from_secs(1);

/// The first byte of a chunk record (several entries). A single-entry record starts with the
/// codec's format version instead, which is never this.
const CHUNK_TAG: u8 = 0xC5;

/// The encoded entries a history record holds, oldest first: several for a chunk
/// (`CHUNK_TAG`, then each entry as a big-endian `u32` length and its bytes), else the record
/// itself. `None` if a chunk's framing is broken.
pub(super) fn record_entries(value: &[u8]) -> Option<Vec<&[u8]>> {
    let Some((&CHUNK_TAG, mut rest)) = value.split_first() else {
        return Some(vec![value]);
    };
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        let (entry, tail) = tail.split_at(len);
        entries.push(entry);
        rest = tail;
    }
    Some(entries)
}

fn chunk_record(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + entries.iter().map(|e| 4 + e.len()).sum::<usize>());
    value.push(CHUNK_TAG);
    for entry in entries {
        let len = u32::try_from(entry.len()).expect("a history entry is at most RECORD_BYTES_MAX");
        value.extend_from_slice(&len.to_be_bytes());
        value.extend_from_slice(entry);
    }
    value
}

/// The prefix of every entry of the history of `id`: `<id> 0x00`.
pub(super) fn entries_prefix(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 5);
    key.extend_from_slice(id);
    key.push(0);
    key
}

/// The key of entry `seq` of the history of `id`: `<id> 0x00 <seq big-endian>`. A chunk is
/// keyed by its last entry's `seq`, so that keys stay in entry order and the last key still
/// tells how many entries there are.
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

/// The first entries of a history, not yet written.
struct Young {
    since: Instant,
    entries: Vec<Vec<u8>>,
}

/// The thread's memory: histories being held, and what it knows of the ones written.
#[derive(Default)]
struct Histories {
    kept: HashMap<Vec<u8>, Kept>,
    young: HashMap<Vec<u8>, Young>,
    /// Young histories in the order they began (an id may be listed after it left `young`).
    young_order: VecDeque<(Instant, Vec<u8>)>,
}

impl Histories {
    fn append(
        &mut self,
        tree: &sled::Tree,
        writes: &mut Vec<Write>,
        id: Vec<u8>,
        entry: Vec<u8>,
        last: bool,
    ) {
        if let Some(state) = self.kept.get_mut(&id) {
            append_entry(writes, &id, state, entry);
            if last {
                self.kept.remove(&id);
            }
            return;
        }
        let young = self.young.entry(id.clone()).or_insert_with(|| {
            let since = Instant::now();
            self.young_order.push_back((since, id.clone()));
            Young {
                since,
                entries: Vec::new(),
            }
        });
        young.entries.push(entry);
        if last || young.entries.len() >= HISTORY_HEAD_KEPT {
            self.write_young(tree, writes, id, last);
        }
    }

    /// Writes the held entries of `id`: as one chunk if its history is new, else one by one.
    fn write_young(&mut self, tree: &sled::Tree, writes: &mut Vec<Write>, id: Vec<u8>, last: bool) {
        let Some(young) = self.young.remove(&id) else {
            return;
        };
        let mut state = scan(tree, &id);
        let count = young.entries.len() as u32;
        if state.next == 0 && count as usize <= HISTORY_HEAD_KEPT {
            writes.push((
                entry_key(&id, count - 1),
                Some(chunk_record(&young.entries)),
            ));
            state = Kept {
                next: count,
                tail: count,
            };
        } else {
            for entry in young.entries {
                append_entry(writes, &id, &mut state, entry);
            }
        }
        if !last {
            self.kept.insert(id, state);
        }
    }

    /// Writes the histories held since before `now - HISTORY_LINGER` (all of them if `all`).
    fn write_old(&mut self, tree: &sled::Tree, writes: &mut Vec<Write>, all: bool) {
        let now = Instant::now();
        while let Some((since, id)) = self.young_order.front() {
            if !all && now.duration_since(*since) < HISTORY_LINGER {
                break;
            }
            let (since, id) = (*since, id.clone());
            self.young_order.pop_front();
            // Written and begun again since: the later start is listed further on.
            if self
                .young
                .get(&id)
                .is_some_and(|young| young.since == since)
            {
                self.write_young(tree, writes, id, false);
            }
        }
    }

    /// How long the thread may wait for the next job before a held history is due.
    fn next_due(&self) -> Option<Duration> {
        self.young_order
            .front()
            .map(|(since, _)| HISTORY_LINGER.saturating_sub(since.elapsed()))
    }
}

/// A key to write, or to remove (`None`).
type Write = (Vec<u8>, Option<Vec<u8>>);

/// Appends one entry as a record of its own, dropping the oldest after the head when full.
fn append_entry(writes: &mut Vec<Write>, id: &[u8], state: &mut Kept, entry: Vec<u8>) {
    if state.count() >= HISTORY_ENTRIES_MAX as u32 {
        let oldest_after_head = state.tail.max(HISTORY_HEAD_KEPT as u32);
        writes.push((entry_key(id, oldest_after_head), None));
        writes.push((truncated_key(id), Some(Vec::new())));
        state.tail = oldest_after_head + 1;
    }
    writes.push((entry_key(id, state.next), Some(entry)));
    state.next += 1;
}

fn run(tree: sled::Tree, queue: mpsc::Receiver<Job>) {
    let mut histories = Histories::default();
    let mut open = true;
    while open {
        let first = match histories.next_due() {
            None => queue.recv().ok(),
            Some(due) => match queue.recv_timeout(due) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            },
        };
        if first.is_none() && histories.next_due().is_none() {
            break; // the queue closed with nothing held
        }
        let mut writes: Vec<Write> = Vec::new();
        let mut syncs = Vec::new();
        let mut next = first;
        let mut taken = 0;
        while let Some(job) = next.take() {
            taken += 1;
            match job {
                Job::Append { id, entry, last } => {
                    histories.append(&tree, &mut writes, id, entry, last)
                }
                Job::Sync(done) => syncs.push(done),
            }
            if taken < BATCH_JOBS_MAX {
                next = queue.try_recv().ok();
            }
        }
        // A reader must see everything queued before its sync; a closing queue leaves
        // nothing held.
        let all = !syncs.is_empty() || !open;
        histories.write_old(&tree, &mut writes, all);
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
        let synced = !syncs.is_empty();
        for done in syncs {
            let _ = done.send(());
        }
        if open && !synced {
            // A short nap lets entries pile up: the next batch is larger, and while this
            // thread is not parked on the queue, queueing an entry wakes nobody (a wake-up
            // per entry cost the loop a system call each). A reader's sync waits at most
            // this much longer.
            std::thread::sleep(WRITE_NAP);
        }
    }
}

/// How long the thread rests after writing a batch (see `run`).
const WRITE_NAP: Duration = Duration::from_millis(5);

/// What the tree holds of `id`'s history (once per history the thread has not seen). Keys
/// are counted, so a chunk counts as one; only `next` (from the last key) and `tail` (the
/// first key after the head) matter, and both are exact.
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
    let tail = seqs
        .iter()
        .copied()
        .find(|&seq| seq >= HISTORY_HEAD_KEPT as u32)
        .unwrap_or(next);
    debug_assert!(tail <= next, "{seqs:?}");
    Kept { next, tail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("history").unwrap();
        (dir, tree)
    }

    /// Every record of `id`'s history, each as the entries it holds.
    fn records(tree: &sled::Tree, id: &[u8]) -> Vec<Vec<Vec<u8>>> {
        tree.scan_prefix(entries_prefix(id))
            .values()
            .map(|value| {
                let value = value.unwrap();
                record_entries(&value)
                    .expect("well-framed")
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect()
            })
            .collect()
    }

    fn entry(n: u8) -> Vec<u8> {
        vec![1, n, n]
    }

    #[test]
    fn a_history_that_finishes_young_is_written_as_one_record() {
        let (_dir, tree) = tree();
        let writer = HistoryWriter::start(tree.clone()).unwrap();
        for n in 0..8 {
            writer.append(b"txn-a", entry(n), n == 7);
        }
        writer.sync();
        assert_eq!(
            records(&tree, b"txn-a"),
            vec![(0..8).map(entry).collect::<Vec<_>>()]
        );
    }

    #[test]
    fn a_history_written_young_by_a_sync_goes_on_entry_by_entry_in_order() {
        let (_dir, tree) = tree();
        let writer = HistoryWriter::start(tree.clone()).unwrap();
        writer.append(b"txn-b", entry(0), false);
        writer.append(b"txn-b", entry(1), false);
        writer.sync();
        writer.append(b"txn-b", entry(2), false);
        writer.append(b"txn-b", entry(3), true);
        writer.sync();
        assert_eq!(
            records(&tree, b"txn-b"),
            vec![vec![entry(0), entry(1)], vec![entry(2)], vec![entry(3)]]
        );
    }

    #[test]
    fn held_entries_are_written_once_the_linger_passes_without_any_reader() {
        let (_dir, tree) = tree();
        let writer = HistoryWriter::start(tree.clone()).unwrap();
        writer.append(b"txn-c", entry(0), false);
        let deadline = Instant::now() + HISTORY_LINGER * 5;
        while records(&tree, b"txn-c").is_empty() {
            assert!(
                Instant::now() < deadline,
                "not written within {:?}",
                HISTORY_LINGER * 5
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(records(&tree, b"txn-c"), vec![vec![entry(0)]]);
        drop(writer);
    }

    #[test]
    fn dropping_the_writer_writes_what_it_holds() {
        let (_dir, tree) = tree();
        let writer = HistoryWriter::start(tree.clone()).unwrap();
        writer.append(b"txn-d", entry(0), false);
        drop(writer);
        assert_eq!(records(&tree, b"txn-d"), vec![vec![entry(0)]]);
    }

    #[test]
    fn chunk_framing_reads_back_and_a_broken_one_is_refused() {
        let entries = vec![entry(1), Vec::new(), entry(2)];
        let chunk = chunk_record(&entries);
        assert_eq!(
            record_entries(&chunk).unwrap(),
            entries.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        assert_eq!(
            record_entries(&entry(9)).unwrap(),
            vec![entry(9).as_slice()]
        );
        assert_eq!(record_entries(&chunk[..chunk.len() - 1]), None);
        assert_eq!(record_entries(&[CHUNK_TAG, 0, 0]), None);
    }
}
