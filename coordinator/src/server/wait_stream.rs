//! `WaitSagas`: many saga waits carried over one stream.
//!
//! A unary `WaitSaga` per waiting caller costs a whole call on both sides (a new HTTP/2
//! stream, headers, a parked request); under load that was the largest per-saga cost left in
//! the SDK's client and a good part of this server's (perf, issue 3). Over one stream, a wait
//! costs an id in a message and a state in another, and both sides put whatever is ready
//! into the same message.
//!
//! Each id is answered once: with the saga's state when it is terminal (the runtime's `Wait`,
//! without a limit), or at once with the error `WaitSaga` would have given. Unanswered ids
//! per stream are bounded ([`WAIT_STREAM_PENDING_MAX`]). The client closing its side ends
//! the stream and forgets its unanswered ids: the client only closes when nobody waits.

use std::pin::Pin;

use futures::stream::FuturesUnordered;
use futures::FutureExt;
use tandem_common::call_batch::CALL_BATCH_ITEMS_MAX;
use tandem_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use super::saga::{parse_saga_id, view_to_pb};
use crate::error::CoordinatorError;
use crate::runtime::CoordinatorHandle;

/// Most ids that may wait unanswered on one stream.
pub const WAIT_STREAM_PENDING_MAX: usize = 65_536;
/// Answer messages buffered for a client that reads slowly.
const ANSWER_MESSAGES_BUFFERED: usize = 16;

pub type WaitSagasStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WaitSagasResponse, Status>> + Send>>;

/// Serves one `WaitSagas` stream: reads ids from `incoming`, answers each on the returned
/// stream.
pub fn serve(
    handle: CoordinatorHandle,
    mut incoming: tonic::Streaming<pb::WaitSagasRequest>,
) -> WaitSagasStream {
    let (answers, stream) = mpsc::channel(ANSWER_MESSAGES_BUFFERED);
    tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                message = incoming.next() => match message {
                    Some(Ok(request)) => {
                        if request.saga_ids.len() > CALL_BATCH_ITEMS_MAX {
                            let refusal = Status::invalid_argument(format!(
                                "a WaitSagas message carries at most {CALL_BATCH_ITEMS_MAX} saga ids, not {}",
                                request.saga_ids.len()
                            ));
                            let _ = answers.send(Err(refusal)).await;
                            return;
                        }
                        let mut refused = Vec::new();
                        for id in request.saga_ids {
                            let saga = match parse_saga_id(&id) {
                                Ok(saga) => saga,
                                Err(e) => {
                                    refused.push(error_result(id, &e.into()));
                                    continue;
                                }
                            };
                            if pending.len() >= WAIT_STREAM_PENDING_MAX {
                                let status = Status::resource_exhausted(format!(
                                    "{WAIT_STREAM_PENDING_MAX} saga ids already wait unanswered on this stream"
                                ));
                                refused.push(error_result(id, &status));
                                continue;
                            }
                            let handle = handle.clone();
                            pending.push(async move {
                                let answer = handle.wait_saga_terminal(saga).await;
                                (id, answer)
                            });
                        }
                        if !refused.is_empty() && !send(&answers, refused).await {
                            return;
                        }
                    }
                    // The client closed its side (nobody waits any more) or it broke: the
                    // unanswered ids are dropped with `pending`.
                    None => return,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "a WaitSagas stream broke");
                        return;
                    }
                },
                Some((id, answer)) = pending.next(), if !pending.is_empty() => {
                    let mut results = vec![answer_result(id, answer)];
                    // Whatever else has its answer leaves in the same message.
                    while results.len() < CALL_BATCH_ITEMS_MAX {
                        match pending.next().now_or_never() {
                            Some(Some((id, answer))) => results.push(answer_result(id, answer)),
                            _ => break,
                        }
                    }
                    if !send(&answers, results).await {
                        return;
                    }
                }
                _ = answers.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))
}

/// Sends one answer message; false once the client is gone.
async fn send(
    answers: &mpsc::Sender<Result<pb::WaitSagasResponse, Status>>,
    results: Vec<pb::WaitSagaResult>,
) -> bool {
    answers
        .send(Ok(pb::WaitSagasResponse { results }))
        .await
        .is_ok()
}

fn answer_result(
    id: String,
    answer: Result<Option<crate::runtime::SagaView>, CoordinatorError>,
) -> pb::WaitSagaResult {
    match answer {
        Ok(Some(view)) => pb::WaitSagaResult {
            saga_id: id,
            result: Some(pb::wait_saga_result::Result::State(view_to_pb(&view))),
        },
        Ok(None) => {
            let status = CoordinatorError::NotFound { txn: id.clone() }.into();
            error_result(id, &status)
        }
        Err(e) => error_result(id, &e.into()),
    }
}

fn error_result(id: String, status: &Status) -> pb::WaitSagaResult {
    pb::WaitSagaResult {
        saga_id: id,
        result: Some(pb::wait_saga_result::Result::Error(status.into())),
    }
}
