//! Saga step calls batched per participant: many `Act` (or `Compensate`) calls carried by
//! one `ActBatch` (or `CompensateBatch`) RPC.
//!
//! Every unary call costs the coordinator a client future, a timeout and HTTP/2 stream
//! machinery, and the participant a server call; under load tens of steps are in flight to
//! the same participant at once. A [`StepBatcher`] (one per participant address) pays that
//! cost once per batch: its two [`CallBatcher`]s (the group-commit pattern of
//! `tandem_common::call_batch`, one for actions and one for compensations, which are
//! different RPCs) keep at most [`STEP_BATCHES_IN_FLIGHT`] batches each on their way and
//! fill each with what queued meanwhile (at most `CALL_BATCH_ITEMS_MAX` items and about
//! [`STEP_BATCH_BYTES_BUDGET`] bytes). With nothing in flight a call leaves at once, alone:
//! batching adds no latency, it only groups the calls that queue while earlier batches are
//! out.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_common::call_batch::{BatchLimits, CallBatcher, CALL_BATCH_ITEMS_MAX};
use tandem_proto::v1 as pb;

use super::{
    act_answer, bounded_status, status_error, step_message, timed_out, unary_act, unary_compensate,
    ParticipantClient, StepCall, TransportError,
};
use crate::engine::saga::ActionAnswer;

/// Most batch RPCs of one kind in flight to one participant at once.
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
pub(super) const STEP_BATCH_ANSWER_BYTES_MAX: usize = CALL_BATCH_ITEMS_MAX * 64 * 1024;

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

/// The batching of one participant's step calls (see the module docs).
pub(super) struct StepBatcher {
    link: Arc<Link>,
    actions: CallBatcher<StepCall, Result<ActionAnswer, TransportError>>,
    compensations: CallBatcher<StepCall, Result<(), TransportError>>,
}

/// What the senders of both kinds share: the participant and how it is called.
struct Link {
    participant: String,
    client: ParticipantClient,
    /// The participant answered UNIMPLEMENTED to a batch: unary calls only from now on.
    unary_only: AtomicBool,
}

impl StepBatcher {
    pub(super) fn new(participant: String, client: ParticipantClient) -> Arc<StepBatcher> {
        let link = Arc::new(Link {
            participant,
            client,
            unary_only: AtomicBool::new(false),
        });
        let limits = BatchLimits {
            in_flight_max: STEP_BATCHES_IN_FLIGHT,
            items_max: CALL_BATCH_ITEMS_MAX,
            bytes_target: STEP_BATCH_BYTES_BUDGET,
        };
        let actions = CallBatcher::new(limits, item_bytes, {
            let link = link.clone();
            move |calls| Box::pin(link.clone().send_actions(calls))
        });
        let compensations = CallBatcher::new(limits, item_bytes, {
            let link = link.clone();
            move |calls| Box::pin(link.clone().send_compensations(calls))
        });
        Arc::new(StepBatcher {
            link,
            actions,
            compensations,
        })
    }

    /// Whether this participant takes unary calls only (it answered UNIMPLEMENTED).
    pub(super) fn unary_only(&self) -> bool {
        self.link.unary_only.load(Ordering::Relaxed)
    }

    /// The unary client, for the calls [`StepBatcher::unary_only`] sends directly.
    pub(super) fn client(&self) -> ParticipantClient {
        self.link.client.clone()
    }

    /// Runs a step's action through a batch.
    pub(super) async fn act(
        self: Arc<Self>,
        call: StepCall,
    ) -> Result<ActionAnswer, TransportError> {
        let timeout = call.timeout;
        let answer = tokio::time::timeout(timeout, self.actions.call(call)).await;
        self.link.answer(StepKind::Action, timeout, answer)
    }

    /// Runs a step's compensation through a batch.
    pub(super) async fn compensate(self: Arc<Self>, call: StepCall) -> Result<(), TransportError> {
        let timeout = call.timeout;
        let answer = tokio::time::timeout(timeout, self.compensations.call(call)).await;
        self.link.answer(StepKind::Compensation, timeout, answer)
    }
}

/// How one batch RPC went.
enum Exchange<I> {
    /// One answer item per call, in order.
    Answered(Vec<I>),
    /// The whole batch failed: every call gets this error.
    Failed(TransportError),
    /// The participant does not serve batches; the calls come back to be sent unary.
    Unimplemented(Vec<StepCall>),
}

impl Link {
    /// The caller's side: its answer, or its own timeout (the item is then not sent, if it
    /// had not left yet).
    fn answer<T>(
        &self,
        kind: StepKind,
        timeout: Duration,
        answer: Result<Option<Result<T, TransportError>>, tokio::time::error::Elapsed>,
    ) -> Result<T, TransportError> {
        match answer {
            Err(_) => Err(timed_out(&self.participant, kind.what(), timeout)),
            Ok(Some(answer)) => answer,
            Ok(None) => Err(TransportError(format!(
                "{}: {} batch ended without an answer",
                self.participant,
                kind.what()
            ))),
        }
    }

    async fn send_actions(
        self: Arc<Self>,
        calls: Vec<StepCall>,
    ) -> Vec<Result<ActionAnswer, TransportError>> {
        if self.unary_only.load(Ordering::Relaxed) {
            return self.send_unary_actions(calls).await;
        }
        let count = calls.len();
        let rpc = |mut client: ParticipantClient, request| async move {
            client
                .act_batch(request)
                .await
                .map(|r| r.into_inner().items)
        };
        match self.exchange(StepKind::Action, calls, rpc).await {
            Exchange::Answered(items) => items
                .into_iter()
                .map(|item| match item.answer {
                    Some(pb::act_batch_item::Answer::Done(done)) => {
                        act_answer(&self.participant, done)
                    }
                    Some(pb::act_batch_item::Answer::Error(error)) => Err(self.item_error(error)),
                    None => Err(TransportError(format!(
                        "{}: action answered without a result (an empty batch item)",
                        self.participant
                    ))),
                })
                .collect(),
            Exchange::Failed(error) => vec![Err(error); count],
            Exchange::Unimplemented(calls) => self.send_unary_actions(calls).await,
        }
    }

    async fn send_compensations(
        self: Arc<Self>,
        calls: Vec<StepCall>,
    ) -> Vec<Result<(), TransportError>> {
        if self.unary_only.load(Ordering::Relaxed) {
            return self.send_unary_compensations(calls).await;
        }
        let count = calls.len();
        let rpc = |mut client: ParticipantClient, request| async move {
            client
                .compensate_batch(request)
                .await
                .map(|r| r.into_inner().items)
        };
        match self.exchange(StepKind::Compensation, calls, rpc).await {
            Exchange::Answered(items) => items
                .into_iter()
                .map(|item| match item.error {
                    None => Ok(()),
                    Some(error) => Err(self.item_error(error)),
                })
                .collect(),
            Exchange::Failed(error) => vec![Err(error); count],
            Exchange::Unimplemented(calls) => self.send_unary_compensations(calls).await,
        }
    }

    /// Sends one batch RPC; checks that it answers one item per call.
    async fn exchange<I, F>(
        &self,
        kind: StepKind,
        calls: Vec<StepCall>,
        rpc: impl FnOnce(ParticipantClient, tonic::Request<pb::StepBatchRequest>) -> F,
    ) -> Exchange<I>
    where
        F: std::future::Future<Output = Result<Vec<I>, tonic::Status>>,
    {
        let deadline = calls
            .iter()
            .map(|call| call.timeout)
            .max()
            .expect("a batch carries at least one step");
        let what = format!("{} batch", kind.what());
        let call = rpc(self.client.clone(), batch_request(&calls, deadline));
        match bounded_status(deadline, &self.participant, &what, async {
            call.await.map(tonic::Response::new)
        })
        .await
        {
            Ok(Ok(answer)) => {
                let items = answer.into_inner();
                if items.len() == calls.len() {
                    return Exchange::Answered(items);
                }
                Exchange::Failed(TransportError(format!(
                    "{}: {what} answered {} items for {} steps",
                    self.participant,
                    items.len(),
                    calls.len()
                )))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    participant = %self.participant,
                    "the participant does not serve step batches (UNIMPLEMENTED): sending it unary calls"
                );
                self.unary_only.store(true, Ordering::Relaxed);
                Exchange::Unimplemented(calls)
            }
            Ok(Err(status)) => Exchange::Failed(status_error(&self.participant, status)),
            Err(timed_out) => Exchange::Failed(timed_out),
        }
    }

    /// A batch's calls as unary calls, concurrently.
    async fn send_unary_actions(
        &self,
        calls: Vec<StepCall>,
    ) -> Vec<Result<ActionAnswer, TransportError>> {
        futures::future::join_all(
            calls
                .into_iter()
                .map(|call| unary_act(self.client.clone(), call)),
        )
        .await
    }

    async fn send_unary_compensations(
        &self,
        calls: Vec<StepCall>,
    ) -> Vec<Result<(), TransportError>> {
        futures::future::join_all(
            calls
                .into_iter()
                .map(|call| unary_compensate(self.client.clone(), call)),
        )
        .await
    }

    /// An item's error, mapped exactly as the unary call's status would be.
    fn item_error(&self, error: pb::CallError) -> TransportError {
        status_error(&self.participant, error.into())
    }
}

/// About the bytes a step takes in a batch request.
fn item_bytes(call: &StepCall) -> usize {
    call.payload.len()
        + call.step_name.len()
        + call.target.resource.len()
        + tandem_common::ids::TXN_ID_LEN_MAX
        + STEP_ITEM_FRAMING_BYTES
}

/// The batch request: every item with its own trace context in its `traceparent` field.
fn batch_request(calls: &[StepCall], deadline: Duration) -> tonic::Request<pb::StepBatchRequest> {
    let steps = calls
        .iter()
        .map(|call| {
            let mut step = step_message(call);
            if let Some(trace) = &call.trace {
                step.traceparent = trace.to_string();
            }
            step
        })
        .collect();
    let mut request = tonic::Request::new(pb::StepBatchRequest { steps });
    request.set_timeout(deadline);
    request
}
