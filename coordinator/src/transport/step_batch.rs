//! Saga step calls batched per participant: many `Act` (or `Compensate`) calls carried by
//! one `ActBatch` (or `CompensateBatch`) RPC.
//!
//! Every unary call costs the coordinator a client future, a timeout and HTTP/2 stream
//! machinery, and the participant a server call; under load tens of steps are in flight to
//! the same participant at once. A [`StepBatcher`] (one per participant address) pays that
//! cost once per batch, in the group-commit style: a call is queued; while fewer than
//! [`STEP_BATCHES_IN_FLIGHT`] batch RPCs are in flight to the participant, a sender takes
//! everything queued (at most [`STEP_BATCH_ITEMS_MAX`] items and about
//! [`STEP_BATCH_BYTES_BUDGET`] bytes, always at least one item), sends it as one RPC, and
//! loops while calls are queued. With nothing in flight a call leaves at once, alone: batching
//! adds no latency, it only groups the calls that queue while earlier batches are out.
//! Actions and compensations never share a batch (they are different RPCs); the next batch is
//! of the kind whose oldest call has waited longest.
//!
//! What a caller sees is exactly what the unary call gives:
//! - its own timeout: the caller's future resolves with the unary call's "timed out" error
//!   when its own timeout passes, whatever its batch does (a batch's RPC deadline is its
//!   largest item timeout); a call that timed out before its batch left is not sent;
//! - its own answer: the item at its index, or the item's error mapped by the same
//!   status → [`TransportError`] function as a unary status;
//! - a failure of the whole batch (no connection, an error status, a malformed answer) fails
//!   every item with the error the unary call would have got.
//!
//! Fallback: a participant built before batches answers UNIMPLEMENTED. The batcher then
//! remembers, for the life of this process, that the address takes unary calls only, sends
//! that batch's items as unary calls, and every later call to it goes out unary as before.
//! A participant upgraded while this coordinator runs keeps getting unary calls until the
//! coordinator restarts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_common::STEP_BATCH_ITEMS_MAX;
use tandem_proto::v1 as pb;
use tokio::sync::oneshot;

use super::{
    act_answer, bounded_status, status_error, step_message, timed_out, unary_act, unary_compensate,
    ParticipantClient, StepCall, TransportError,
};
use crate::engine::saga::ActionAnswer;

/// Most batch RPCs in flight to one participant at once.
///
/// Three, because a participant answers a batch only once its writes are flushed, and its
/// flusher runs one flush at a time: with one batch being flushed and one queued behind it at
/// the participant, the flusher never waits for the network; the third covers the time an
/// answer travels back and the next batch is encoded, and keeps calls moving when one batch
/// waits for a slow service call. More would only split the queue into smaller batches (each
/// sender takes what has queued since the last one left); fewer would leave the participant's
/// flusher idle between batches.
pub const STEP_BATCHES_IN_FLIGHT: usize = 3;

/// About the most bytes of steps one batch carries (always at least one step, whatever its
/// size). Payloads are at most 64 KiB, so a batch of large steps still takes 16.
pub const STEP_BATCH_BYTES_BUDGET: usize = 1024 * 1024;

/// Largest batch answer accepted, in bytes: every item may carry a reason or an error
/// message of its own, which participants do not bound (each is clipped to
/// `REASON_BYTES_MAX` once decoded).
pub(super) const STEP_BATCH_ANSWER_BYTES_MAX: usize = STEP_BATCH_ITEMS_MAX * 64 * 1024;

/// What a step weighs in a batch beside its payload, names and id: the `traceparent` (55
/// bytes) and the protobuf framing.
const STEP_ITEM_FRAMING_BYTES: usize = 96;

/// Which of the two step calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepKind {
    Action,
    Compensation,
}

impl StepKind {
    /// The word the unary call uses in its errors ("action timed out after ...").
    pub(super) fn what(self) -> &'static str {
        match self {
            StepKind::Action => "action",
            StepKind::Compensation => "compensation",
        }
    }
}

/// One queued call and where its answer goes.
struct Queued<T> {
    /// Arrival order, across both queues.
    seq: u64,
    call: StepCall,
    reply: oneshot::Sender<Result<T, TransportError>>,
}

/// The calls one batch carries, of one kind.
enum Batch {
    Actions(Vec<Queued<ActionAnswer>>),
    Compensations(Vec<Queued<()>>),
}

#[derive(Default)]
struct State {
    actions: VecDeque<Queued<ActionAnswer>>,
    compensations: VecDeque<Queued<()>>,
    next_seq: u64,
    /// Senders running, each with at most one batch RPC out.
    senders: usize,
    /// The participant answered UNIMPLEMENTED to a batch: unary calls only from now on.
    unary_only: bool,
}

/// The batching of one participant's step calls (see the module docs).
pub(super) struct StepBatcher {
    participant: String,
    client: ParticipantClient,
    state: Mutex<State>,
}

impl StepBatcher {
    pub(super) fn new(participant: String, client: ParticipantClient) -> Arc<StepBatcher> {
        Arc::new(StepBatcher {
            participant,
            client,
            state: Mutex::new(State::default()),
        })
    }

    /// Whether this participant takes unary calls only (it answered UNIMPLEMENTED).
    pub(super) fn unary_only(&self) -> bool {
        self.state.lock().unwrap().unary_only
    }

    /// The unary client, for the calls [`StepBatcher::unary_only`] sends directly.
    pub(super) fn client(&self) -> ParticipantClient {
        self.client.clone()
    }

    /// Runs a step's action through a batch.
    pub(super) async fn act(
        self: Arc<Self>,
        call: StepCall,
    ) -> Result<ActionAnswer, TransportError> {
        let timeout = call.timeout;
        let (reply, answer) = oneshot::channel();
        self.enqueue(|state, seq| {
            state.actions.push_back(Queued { seq, call, reply });
        });
        self.await_answer(StepKind::Action, timeout, answer).await
    }

    /// Runs a step's compensation through a batch.
    pub(super) async fn compensate(self: Arc<Self>, call: StepCall) -> Result<(), TransportError> {
        let timeout = call.timeout;
        let (reply, answer) = oneshot::channel();
        self.enqueue(|state, seq| {
            state.compensations.push_back(Queued { seq, call, reply });
        });
        self.await_answer(StepKind::Compensation, timeout, answer)
            .await
    }

    /// Queues a call and starts a sender if fewer than [`STEP_BATCHES_IN_FLIGHT`] run.
    fn enqueue(self: &Arc<Self>, push: impl FnOnce(&mut State, u64)) {
        let start_sender = {
            let mut state = self.state.lock().unwrap();
            let seq = state.next_seq;
            state.next_seq += 1;
            push(&mut state, seq);
            let start = state.senders < STEP_BATCHES_IN_FLIGHT;
            if start {
                state.senders += 1;
            }
            start
        };
        if start_sender {
            tokio::spawn(self.clone().send_batches());
        }
    }

    /// The caller's side: its answer, or its own timeout.
    async fn await_answer<T>(
        &self,
        kind: StepKind,
        timeout: Duration,
        answer: oneshot::Receiver<Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(timed_out(&self.participant, kind.what(), timeout)),
            Ok(Ok(answer)) => answer,
            // The sender is gone without answering: the runtime is shutting down.
            Ok(Err(_)) => Err(TransportError(format!(
                "{}: {} batch ended without an answer",
                self.participant,
                kind.what()
            ))),
        }
    }

    /// A sender: sends batches while calls are queued, then ends. Ending and queueing share
    /// the lock, so a queued call always has a sender that will take it.
    async fn send_batches(self: Arc<Self>) {
        loop {
            let (batch, unary_only) = {
                let mut state = self.state.lock().unwrap();
                match take_batch(&mut state) {
                    Some(batch) => (batch, state.unary_only),
                    None => {
                        state.senders -= 1;
                        return;
                    }
                }
            };
            match (batch, unary_only) {
                (Batch::Actions(items), false) => self.send_actions(items).await,
                (Batch::Compensations(items), false) => self.send_compensations(items).await,
                (batch, true) => self.send_unary(batch).await,
            }
        }
    }

    async fn send_actions(&self, items: Vec<Queued<ActionAnswer>>) {
        let rpc =
            |mut client: ParticipantClient, request| async move { client.act_batch(request).await };
        let answered = self
            .exchange(
                StepKind::Action,
                items,
                rpc,
                |r: pb::ActBatchResponse| r.items,
                Batch::Actions,
            )
            .await;
        for (queued, item) in answered.into_iter().flatten() {
            let answer = match item.answer {
                Some(pb::act_batch_item::Answer::Done(done)) => act_answer(&self.participant, done),
                Some(pb::act_batch_item::Answer::Error(error)) => Err(self.item_error(error)),
                None => Err(TransportError(format!(
                    "{}: action answered without a result (an empty batch item)",
                    self.participant
                ))),
            };
            let _ = queued.reply.send(answer);
        }
    }

    async fn send_compensations(&self, items: Vec<Queued<()>>) {
        let rpc = |mut client: ParticipantClient, request| async move {
            client.compensate_batch(request).await
        };
        let answers = |r: pb::CompensateBatchResponse| r.items;
        let answered = self
            .exchange(
                StepKind::Compensation,
                items,
                rpc,
                answers,
                Batch::Compensations,
            )
            .await;
        for (queued, item) in answered.into_iter().flatten() {
            let answer = match item.error {
                None => Ok(()),
                Some(error) => Err(self.item_error(error)),
            };
            let _ = queued.reply.send(answer);
        }
    }

    /// Sends one batch RPC and pairs each call with its item of the answer. `None` when the
    /// calls are answered already: the whole batch failed (each call got the error), or the
    /// participant does not serve batches (each call went unary, see `fall_back`).
    async fn exchange<T, R, I, F>(
        &self,
        kind: StepKind,
        items: Vec<Queued<T>>,
        rpc: impl FnOnce(ParticipantClient, tonic::Request<pb::StepBatchRequest>) -> F,
        answers: impl FnOnce(R) -> Vec<I>,
        into_batch: fn(Vec<Queued<T>>) -> Batch,
    ) -> Option<Vec<(Queued<T>, I)>>
    where
        F: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let deadline = batch_deadline(&items);
        let request = batch_request(&items, deadline);
        let what = format!("{} batch", kind.what());
        let call = rpc(self.client.clone(), request);
        let error = match bounded_status(deadline, &self.participant, &what, call).await {
            Ok(Ok(answer)) => {
                let answers = answers(answer.into_inner());
                if answers.len() == items.len() {
                    return Some(items.into_iter().zip(answers).collect());
                }
                TransportError(format!(
                    "{}: {what} answered {} items for {} steps",
                    self.participant,
                    answers.len(),
                    items.len()
                ))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.fall_back(into_batch(items)).await;
                return None;
            }
            Ok(Err(status)) => status_error(&self.participant, status),
            Err(timed_out) => timed_out,
        };
        for queued in items {
            let _ = queued.reply.send(Err(error.clone()));
        }
        None
    }

    /// The participant does not know batches: from now on it gets unary calls only, this
    /// batch's included.
    async fn fall_back(&self, batch: Batch) {
        tracing::info!(
            participant = %self.participant,
            "the participant does not serve step batches (UNIMPLEMENTED): sending it unary calls"
        );
        self.state.lock().unwrap().unary_only = true;
        self.send_unary(batch).await
    }

    /// Sends a batch's calls as unary calls, concurrently, each answered as it completes.
    async fn send_unary(&self, batch: Batch) {
        match batch {
            Batch::Actions(items) => {
                futures::future::join_all(items.into_iter().map(|queued| async move {
                    let answer = unary_act(self.client.clone(), queued.call).await;
                    let _ = queued.reply.send(answer);
                }))
                .await;
            }
            Batch::Compensations(items) => {
                futures::future::join_all(items.into_iter().map(|queued| async move {
                    let answer = unary_compensate(self.client.clone(), queued.call).await;
                    let _ = queued.reply.send(answer);
                }))
                .await;
            }
        }
    }

    /// An item's error, mapped exactly as the unary call's status would be.
    fn item_error(&self, error: pb::StepError) -> TransportError {
        let status = tonic::Status::new(tonic::Code::from(error.code), error.message);
        status_error(&self.participant, status)
    }
}

/// Takes the next batch from the queues: of the kind whose oldest live call is older, up to
/// the item and byte limits. Calls whose caller stopped waiting (its timeout passed) are
/// dropped unsent.
fn take_batch(state: &mut State) -> Option<Batch> {
    drop_abandoned(&mut state.actions);
    drop_abandoned(&mut state.compensations);
    let actions_first = match (state.actions.front(), state.compensations.front()) {
        (None, None) => return None,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (Some(action), Some(compensation)) => action.seq < compensation.seq,
    };
    Some(if actions_first {
        Batch::Actions(take_items(&mut state.actions))
    } else {
        Batch::Compensations(take_items(&mut state.compensations))
    })
}

fn drop_abandoned<T>(queue: &mut VecDeque<Queued<T>>) {
    queue.retain(|queued| !queued.reply.is_closed());
}

fn take_items<T>(queue: &mut VecDeque<Queued<T>>) -> Vec<Queued<T>> {
    let mut items = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        let size = item_bytes(&next.call);
        let full = items.len() == STEP_BATCH_ITEMS_MAX
            || (!items.is_empty() && bytes + size > STEP_BATCH_BYTES_BUDGET);
        if full {
            break;
        }
        bytes += size;
        items.extend(queue.pop_front());
    }
    items
}

/// About the bytes a step takes in a batch request.
fn item_bytes(call: &StepCall) -> usize {
    call.payload.len()
        + call.step_name.len()
        + call.target.resource.len()
        + tandem_common::ids::TXN_ID_LEN_MAX
        + STEP_ITEM_FRAMING_BYTES
}

/// A batch's RPC deadline: its largest item timeout (every item has its own on top).
fn batch_deadline<T>(items: &[Queued<T>]) -> Duration {
    items
        .iter()
        .map(|queued| queued.call.timeout)
        .max()
        .expect("a batch carries at least one step")
}

/// The batch request: every item with its own trace context in its `traceparent` field.
fn batch_request<T>(
    items: &[Queued<T>],
    deadline: Duration,
) -> tonic::Request<pb::StepBatchRequest> {
    let steps = items
        .iter()
        .map(|queued| {
            let mut step = step_message(&queued.call);
            if let Some(trace) = &queued.call.trace {
                step.traceparent = trace.to_string();
            }
            step
        })
        .collect();
    let mut request = tonic::Request::new(pb::StepBatchRequest { steps });
    request.set_timeout(deadline);
    request
}
