//! Carrying many concurrent calls to one server in a few batched RPCs.
//!
//! Why: a unary gRPC call costs about the same CPU whatever it carries (HTTP/2 frames and
//! header compression, tower layers, a task per call on each side), and on a loaded
//! coordinator that per-call cost was the largest share of the work. When many callers call
//! the same server at once, one RPC can carry all their items.
//!
//! How (the group-commit pattern, applied to calls): a caller queues its item; if fewer than
//! [`BatchLimits::in_flight_max`] batches are on their way, a sender task starts, takes
//! everything queued (up to the item and byte limits, always at least one item), sends it as
//! one call, hands every caller its own answer, and goes on while items are queued. With no
//! load an item leaves at once, alone, so nothing waits for company; under load the items
//! that arrive while batches are in flight make up the next batch.
//!
//! The batcher knows nothing of gRPC: the `send` function given to [`CallBatcher::new`] makes
//! one call of a batch and answers one result per item, in order (a failure of the whole call
//! becomes that failure for every item).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Most items one batched call carries (`SubmitSagas`, the participants' `ActBatch` and
/// `CompensateBatch`); a server refuses a larger call with INVALID_ARGUMENT. It matches the
/// participant's transaction batch (512 calls), so that a full step batch can land in one sled
/// transaction and one flush.
pub const CALL_BATCH_ITEMS_MAX: usize = 512;
/// The bytes a sender fills one batched call up to; an item larger than this goes alone.
pub const CALL_BATCH_BYTES_TARGET: usize = 1024 * 1024;

/// Bounds of one batcher.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Batches on their way at once. Two keeps the server busy (one batch is answered while
    /// the next is carried) without splitting the queue into many small batches.
    pub in_flight_max: usize,
    /// Most items per batch.
    pub items_max: usize,
    /// Byte budget per batch (see [`CALL_BATCH_BYTES_TARGET`]).
    pub bytes_target: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            in_flight_max: 2,
            items_max: CALL_BATCH_ITEMS_MAX,
            bytes_target: CALL_BATCH_BYTES_TARGET,
        }
    }
}

/// A future answering a whole batch, one answer per item in the items' order.
pub type BatchFuture<A> = Pin<Box<dyn Future<Output = Vec<A>> + Send>>;

type SendBatch<I, A> = dyn Fn(Vec<I>) -> BatchFuture<A> + Send + Sync;

/// Queues items for one server and sends them in batches (see the module documentation).
/// Cloning shares the queue.
pub struct CallBatcher<I, A> {
    inner: Arc<Inner<I, A>>,
}

impl<I, A> Clone for CallBatcher<I, A> {
    fn clone(&self) -> Self {
        CallBatcher {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<I, A> {
    queue: Mutex<Queue<I, A>>,
    send: Box<SendBatch<I, A>>,
    size_of: fn(&I) -> usize,
    limits: BatchLimits,
}

struct Queue<I, A> {
    items: VecDeque<(I, oneshot::Sender<A>)>,
    senders: usize,
}

/// The batch a sender took, or `None` (nothing queued: the sender stops).
type Taken<I, A> = Option<(Vec<I>, Vec<oneshot::Sender<A>>)>;

impl<I: Send + 'static, A: Send + 'static> CallBatcher<I, A> {
    /// A batcher whose batches go out through `send`; `size_of` tells an item's encoded size.
    pub fn new(
        limits: BatchLimits,
        size_of: fn(&I) -> usize,
        send: impl Fn(Vec<I>) -> BatchFuture<A> + Send + Sync + 'static,
    ) -> Self {
        assert!(
            limits.in_flight_max > 0 && limits.items_max > 0,
            "a batcher must be able to send: {limits:?}"
        );
        CallBatcher {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue {
                    items: VecDeque::new(),
                    senders: 0,
                }),
                send: Box::new(send),
                size_of,
                limits,
            }),
        }
    }

    /// Sends `item` in the next batch and returns its answer. `None` only if the batch's call
    /// was dropped without answering (its task panicked). A caller that stops waiting (drops
    /// this future) before its item left takes the item back: it is never sent.
    pub async fn call(&self, item: I) -> Option<A> {
        let (reply, answer) = oneshot::channel();
        let start_sender = {
            let mut queue = self.inner.queue.lock().expect("batch queue lock");
            queue.items.push_back((item, reply));
            let start = queue.senders < self.inner.limits.in_flight_max;
            if start {
                queue.senders += 1;
            }
            start
        };
        if start_sender {
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.send_while_queued().await });
        }
        answer.await.ok()
    }
}

impl<I: Send + 'static, A: Send + 'static> Inner<I, A> {
    async fn send_while_queued(&self) {
        while let Some((items, replies)) = self.take() {
            let answers = (self.send)(items).await;
            assert_eq!(
                answers.len(),
                replies.len(),
                "a batch must answer every item it carried"
            );
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer); // the caller may have stopped waiting
            }
            // The callers just answered are woken, not yet run: in a closed loop many call
            // again at once. Yielding first lets them queue, so the next batch carries them
            // all instead of leaving with the first few and sending the rest in a second call.
            tokio::task::yield_now().await;
        }
    }

    /// Takes the next batch off the queue; when it is empty, this sender stops (counted
    /// under the same lock, so an item queued later always finds a sender to start).
    fn take(&self) -> Taken<I, A> {
        let mut queue = self.queue.lock().expect("batch queue lock");
        if queue.items.is_empty() {
            queue.senders -= 1;
            return None;
        }
        // An item whose caller stopped waiting (its own timeout passed) is not sent at all.
        queue.items.retain(|(_, reply)| !reply.is_closed());
        if queue.items.is_empty() {
            queue.senders -= 1;
            return None;
        }
        let (mut items, mut replies, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some((item, _)) = queue.items.front() {
            let size = (self.size_of)(item);
            let full = items.len() >= self.limits.items_max
                || (!items.is_empty() && bytes + size > self.limits.bytes_target);
            if full {
                break;
            }
            let (item, reply) = queue.items.pop_front().expect("looked at the front");
            bytes += size;
            items.push(item);
            replies.push(reply);
        }
        Some((items, replies))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Every batch a test server was sent, in order.
    type Sent = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose server doubles each item after `delay`, recording every batch.
    fn doubling(limits: BatchLimits, delay: Duration) -> (CallBatcher<u32, u32>, Sent) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let batcher = CallBatcher::new(
            limits,
            |_| 100,
            move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.clone());
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    items.into_iter().map(|i| i * 2).collect()
                }) as BatchFuture<u32>
            },
        );
        (batcher, batches)
    }

    #[tokio::test]
    async fn a_lone_call_goes_out_at_once_by_itself() {
        let (batcher, batches) = doubling(BatchLimits::default(), Duration::ZERO);
        assert_eq!(batcher.call(21).await, Some(42));
        assert_eq!(*batches.lock().unwrap(), vec![vec![21]]);
    }

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_answer() {
        let limits = BatchLimits {
            in_flight_max: 1,
            ..BatchLimits::default()
        };
        let (batcher, batches) = doubling(limits, Duration::from_millis(20));
        let answers = futures::future::join_all((0..100).map(|i| batcher.call(i))).await;
        assert_eq!(answers, (0..100).map(|i| Some(i * 2)).collect::<Vec<_>>());
        let batches = batches.lock().unwrap();
        assert!(
            batches.len() < 100,
            "100 concurrent calls went out as {} batches",
            batches.len()
        );
        let mut carried: Vec<u32> = batches.iter().flatten().copied().collect();
        carried.sort_unstable();
        assert_eq!(
            carried,
            (0..100).collect::<Vec<_>>(),
            "every item exactly once"
        );
    }

    #[tokio::test]
    async fn batches_keep_to_the_item_limit_and_the_byte_budget() {
        let limits = BatchLimits {
            in_flight_max: 1,
            items_max: 7,
            bytes_target: 1_000, // ten items of 100 bytes
        };
        let (batcher, batches) = doubling(limits, Duration::from_millis(5));
        futures::future::join_all((0..50).map(|i| batcher.call(i))).await;
        for batch in batches.lock().unwrap().iter() {
            assert!(batch.len() <= 7, "a batch of {} items", batch.len());
        }
        let limits = BatchLimits {
            in_flight_max: 1,
            items_max: 512,
            bytes_target: 250, // two items of 100 bytes
        };
        let (batcher, batches) = doubling(limits, Duration::from_millis(5));
        futures::future::join_all((0..50).map(|i| batcher.call(i))).await;
        for batch in batches.lock().unwrap().iter() {
            assert!(batch.len() <= 2, "a batch of {} items", batch.len());
        }
    }

    #[tokio::test]
    async fn no_more_batches_are_in_flight_than_allowed() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (now, peak) = (in_flight.clone(), most.clone());
        let limits = BatchLimits {
            in_flight_max: 3,
            ..BatchLimits::default()
        };
        let batcher = CallBatcher::new(
            limits,
            |_| 1,
            move |items: Vec<u32>| {
                let (now, peak) = (now.clone(), peak.clone());
                Box::pin(async move {
                    let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(current, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    items
                }) as BatchFuture<u32>
            },
        );
        let calls = (0..40).map(|i| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.call(i).await })
        });
        for (i, call) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(call.unwrap(), Some(i as u32));
        }
        assert!(
            most.load(Ordering::SeqCst) <= 3,
            "{} in flight",
            most.load(Ordering::SeqCst)
        );
        // The queue drained: a later call finds a sender again.
        assert_eq!(batcher.call(7).await, Some(7));
    }

    #[tokio::test]
    async fn an_item_whose_caller_stopped_waiting_before_it_left_is_not_sent() {
        let limits = BatchLimits {
            in_flight_max: 1,
            ..BatchLimits::default()
        };
        let (batcher, batches) = doubling(limits, Duration::from_millis(50));
        let busy = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.call(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await; // the first batch is out
        let gave_up = tokio::time::timeout(Duration::from_millis(5), batcher.call(2)).await;
        assert!(gave_up.is_err(), "the second call is still queued");
        assert_eq!(busy.await.unwrap(), Some(2));
        assert_eq!(batcher.call(3).await, Some(6));
        assert_eq!(*batches.lock().unwrap(), vec![vec![1], vec![3]]);
    }
}
