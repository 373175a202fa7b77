//! Transaction batching: every participant call queued while the flusher is busy commits in
//! one sled transaction, covered by one flush.
//!
//! Why not one sled transaction per call: sled 0.34.7 "pins the log" for every transaction
//! and rolls its I/O buffer before and after (see `PageCache::pin_log`), and every roll is a
//! `pwrite` plus a `sync_file_range` that a sled I/O thread submits to the device. Measured on
//! the 2PC benchmark (two banks, concurrency 64, about 1,900 transactions/s): 14,600 such
//! device writes per second, about a quarter of the machine's CPU spent in sled's I/O threads
//! (mostly the virtual disk's doorbell), and sled spawning a new I/O thread about 90 times a
//! second. One transaction per batch makes that cost per flush instead of per call.
//!
//! A batch runs each queued call's body, in arrival order, inside one transaction over every
//! tree of the participant, so each body sees the writes of the bodies before it exactly as if
//! they had committed one after another. A body that abandons the transaction (a business
//! refusal whose service writes must be discarded — a NO vote at prepare, a failed saga action
//! — a refused call, a resource failure or panic) would discard everyone's writes, so the batch
//! is run again without it: the body is then either left out with its error, or (a business
//! refusal) run again in its fallback form, which records the refusal. Every re-run changes one member's state and a member changes state at most twice,
//! so a batch commits after at most `2 × members + 1` attempts.
//!
//! Answers leave only through the flusher's completion, after the flush that covers the
//! batch: no caller hears of a write a crash could undo.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tandem_common::group_commit::{panic_message, Completion};
use tandem_common::{FlushError, GroupCommit};
use tokio::sync::oneshot;

use crate::error::Error;

/// Most calls one batch takes; the rest wait for the next batch (bounds the transaction).
pub(crate) const BATCH_CALLS_MAX: usize = 512;

/// Why a body abandoned the transaction (its writes discarded).
#[derive(Debug)]
pub(crate) enum Abandon {
    /// The service refused for a business reason (a NO vote at prepare, a failed saga action):
    /// its writes must go, and the body's fallback form records the refusal with this reason.
    Declined(String),
    /// The call contradicts the branch log.
    Refused(String),
    /// The resource's own failure.
    Failed(String),
    /// A stored record could not be decoded or encoded.
    Corrupt(tandem_common::CodecError),
}

pub(crate) type TxResult<T> = Result<T, ConflictableTransactionError<Abandon>>;

/// A call's transaction body. Runs on the flusher thread, possibly several times (sled retries
/// conflicts; a batch re-runs when another member abandons), so it must only read and write
/// through the views. `prior` is `None` on the first form and, after the body abandoned with
/// [`Abandon::Declined`], that abandon: the body then runs its fallback form (recording the
/// refusal).
pub(crate) type Body<T> = Box<dyn Fn(&[TransactionalTree], Option<&Abandon>) -> TxResult<T> + Send>;

/// One queued call, its type erased so calls of different answer types share a batch.
trait Member: Send {
    /// Runs the body in the batch's transaction and keeps its answer.
    fn run(&mut self, views: &[TransactionalTree]) -> TxResult<()>;
    /// The body abandoned the transaction: whether it stays in the batch (in fallback form).
    fn abandoned(&mut self, why: Abandon) -> bool;
    /// The batch's transaction failed as a whole.
    fn failed(&mut self, error: &str);
    /// Answers the caller, once the flush covering the batch is known.
    fn answer(self: Box<Self>, flushed: Result<(), FlushError>);
}

struct Call<T> {
    body: Body<T>,
    /// Set once the body abandoned with [`Abandon::Declined`]: it then runs in fallback form.
    prior: Option<Abandon>,
    answer: Option<Result<T, Error>>,
    reply: oneshot::Sender<Result<T, Error>>,
}

impl<T: Send + 'static> Member for Call<T> {
    fn run(&mut self, views: &[TransactionalTree]) -> TxResult<()> {
        let body = &self.body;
        let prior = self.prior.as_ref();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(views, prior)))
            .unwrap_or_else(|panic| {
                Err(ConflictableTransactionError::Abort(Abandon::Failed(
                    format!("panicked: {}", panic_message(&panic)),
                )))
            });
        self.answer = Some(Ok(ran?));
        Ok(())
    }

    fn abandoned(&mut self, why: Abandon) -> bool {
        match why {
            Abandon::Declined(_) if self.prior.is_none() => {
                self.prior = Some(why);
                self.answer = None;
                true
            }
            other => {
                self.answer = Some(Err(abandon_to_error(other)));
                false
            }
        }
    }

    fn failed(&mut self, error: &str) {
        self.answer = Some(Err(Error::Storage(error.to_string())));
    }

    fn answer(self: Box<Self>, flushed: Result<(), FlushError>) {
        let Call {
            body,
            answer,
            reply,
            prior: _,
        } = *self;
        // The body captured handles (of the participant, which owns the flusher). Dropped
        // before the caller wakes, while the caller still holds its own handle, it is never
        // the last one: dropping the last handle on the flusher thread would make the flusher
        // wait for its own thread to end.
        drop(body);
        let answer = match flushed {
            Ok(()) => answer.unwrap_or_else(|| {
                unreachable!("a batch committed without running one of its calls")
            }),
            Err(e) => Err(Error::Flush(e)),
        };
        // A caller that stopped waiting (its request was cancelled) is no error.
        let _ = reply.send(answer);
    }
}

/// Queues calls and hands them to the flusher in batches. Cheap to share.
pub(crate) struct TxnBatcher {
    /// Every tree of the participant: the branch log first, then each resource's trees.
    trees: Vec<sled::Tree>,
    flusher: GroupCommit,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    calls: Vec<Box<dyn Member>>,
    /// A drain job is queued at the flusher and will take `calls`.
    drain_queued: bool,
    /// [`BatchHold`]s alive. While there are any, new calls wait in `held`, where no drain
    /// takes them; the last hold dropped moves them to `calls`.
    holds: usize,
    held: Vec<Box<dyn Member>>,
}

impl Pending {
    /// Queues `calls` for the next drain; true if the caller must queue that drain (none is).
    fn queue(&mut self, calls: impl IntoIterator<Item = Box<dyn Member>>) -> bool {
        self.calls.extend(calls);
        !std::mem::replace(&mut self.drain_queued, true)
    }
}

/// Keeps the flusher from taking the queued calls until it is dropped, so that calls queued
/// together (the items of one `ActBatch`) land in the same transaction and flush. Without it
/// the flusher thread, woken by the first call, would take a few and leave the rest (and with
/// them the whole batched answer) for the next flush. Must be dropped before anyone waits for
/// a call queued under it.
pub(crate) struct BatchHold {
    batcher: Arc<TxnBatcher>,
}

impl Drop for BatchHold {
    fn drop(&mut self) {
        let queue_drain = {
            let mut pending = self.batcher.pending.lock().unwrap();
            pending.holds -= 1;
            if pending.holds > 0 || pending.held.is_empty() {
                false
            } else {
                let held = std::mem::take(&mut pending.held);
                pending.queue(held)
            }
        };
        if queue_drain {
            self.batcher.queue_drain();
        }
    }
}

impl TxnBatcher {
    pub(crate) fn new(trees: Vec<sled::Tree>, flusher: GroupCommit) -> Arc<Self> {
        Arc::new(TxnBatcher {
            trees,
            flusher,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Runs `body` in the next batch and returns its answer once the batch is durable.
    pub(crate) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        body: Body<T>,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        let call = Box::new(Call {
            body,
            prior: None,
            answer: None,
            reply,
        });
        let queue_drain = {
            let mut pending = self.pending.lock().unwrap();
            if pending.holds > 0 {
                pending.held.push(call);
                false
            } else {
                pending.queue([call as Box<dyn Member>])
            }
        };
        if queue_drain {
            self.queue_drain();
        }
        answer
            .await
            .map_err(|_| Error::Flush(FlushError::Stopped))?
    }

    /// Holds the calls queued from now on until the hold is dropped (see [`BatchHold`]).
    pub(crate) fn hold(self: &Arc<Self>) -> BatchHold {
        self.pending.lock().unwrap().holds += 1;
        BatchHold {
            batcher: self.clone(),
        }
    }

    /// Calls waiting for the next batch.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        let pending = self.pending.lock().unwrap();
        pending.calls.len() + pending.held.len()
    }

    fn queue_drain(self: &Arc<Self>) {
        let this = self.clone();
        if let Err(stopped) = self.flusher.submit(move || this.drain()) {
            // Nobody will drain: answer everyone queued instead of leaving them waiting.
            let calls = {
                let mut pending = self.pending.lock().unwrap();
                pending.drain_queued = false;
                std::mem::take(&mut pending.calls)
            };
            for call in calls {
                call.answer(Err(stopped.clone()));
            }
        }
    }

    /// On the flusher thread: commits the queued calls as one transaction.
    fn drain(self: Arc<Self>) -> Completion {
        let (mut calls, more) = {
            let mut pending = self.pending.lock().unwrap();
            let take = pending.calls.len().min(BATCH_CALLS_MAX);
            let calls: Vec<_> = pending.calls.drain(..take).collect();
            let more = !pending.calls.is_empty();
            pending.drain_queued = more;
            (calls, more)
        };
        if more {
            self.queue_drain();
        }
        commit_batch(&self.trees, &mut calls);
        Box::new(move |flushed| {
            for call in calls {
                call.answer(flushed.clone());
            }
        })
    }
}

/// Runs every call's body in one transaction, re-running without the ones that abandon.
fn commit_batch(trees: &[sled::Tree], calls: &mut [Box<dyn Member>]) {
    let mut active = vec![true; calls.len()];
    let attempts_max = 2 * calls.len() + 1;
    for _ in 0..attempts_max {
        let members = RefCell::new(&mut *calls);
        let attempt = trees.transaction(|views| {
            let mut members = members.borrow_mut();
            for (i, member) in members.iter_mut().enumerate() {
                if active[i] {
                    member.run(views).map_err(|e| match e {
                        ConflictableTransactionError::Abort(why) => {
                            ConflictableTransactionError::Abort((i, why))
                        }
                        ConflictableTransactionError::Conflict => {
                            ConflictableTransactionError::Conflict
                        }
                        ConflictableTransactionError::Storage(e) => {
                            ConflictableTransactionError::Storage(e)
                        }
                    })?;
                }
            }
            Ok(())
        });
        match attempt {
            Ok(()) => return,
            Err(TransactionError::Abort((i, why))) => {
                active[i] = calls[i].abandoned(why);
            }
            Err(TransactionError::Storage(e)) => {
                let error = e.to_string();
                for (i, call) in calls.iter_mut().enumerate() {
                    if active[i] {
                        call.failed(&error);
                    }
                }
                return;
            }
        }
    }
    // Hard check: each re-run changes a member's state, and there are only so many states.
    panic!(
        "a batch of {} calls did not settle in {attempts_max} attempts",
        calls.len()
    );
}

pub(crate) fn abandon_to_error(why: Abandon) -> Error {
    match why {
        Abandon::Refused(why) => Error::Conflict(why),
        Abandon::Failed(m) => Error::Resource(m),
        Abandon::Corrupt(e) => Error::Codec(e),
        Abandon::Declined(reason) => {
            unreachable!("a business refusal is recorded by its body's fallback form: {reason}")
        }
    }
}
