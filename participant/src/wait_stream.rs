//! Saga waits carried over `WaitSagas` streams: however many callers of
//! [`crate::TandemClient::wait`] wait at once, the client keeps one stream open to the
//! coordinator, sends each saga id on it once, and hands each answer to everyone waiting for
//! that saga. A unary `WaitSaga` per caller costs a whole call on both sides (a new HTTP/2
//! stream, headers, a parked request); under load that was the largest per-saga cost left in
//! the client (perf, issue 3).
//!
//! A stream lives while someone waits on it: the first waiter opens it, and it is closed as
//! soon as nobody waits (which ends it at the coordinator too), so an idle client holds no
//! call open, and a coordinator stopping gracefully does not wait for it. Ids are sent as
//! they come; whatever queued while a message was on its way leaves in the next one.
//!
//! A coordinator without `WaitSagas` answers UNIMPLEMENTED; from then on the client waits
//! with `WaitSaga` ([`Waited::Unsupported`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tandem_common::call_batch::CALL_BATCH_ITEMS_MAX;
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::client::CoordinatorClient;

/// What one wait on a stream came to.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The saga is terminal.
    State(pb::SagaState),
    /// The limit passed first.
    TimedOut,
    /// The coordinator does not take `WaitSagas`: wait with `WaitSaga`.
    Unsupported,
}

type Answer = Result<pb::SagaState, tonic::Status>;

/// The wait streams of one client: the open one, if any.
pub(crate) struct WaitStreams {
    client: CoordinatorClient,
    state: Mutex<Streams>,
}

struct Streams {
    current: Option<Arc<WaitStream>>,
    unsupported: bool,
}

/// One `WaitSagas` call and the callers waiting on it.
struct WaitStream {
    waiters: Mutex<Waiters>,
}

struct Waiters {
    /// Who waits for which saga, by ticket. An id is in here from the moment it is sent
    /// until it is answered or nobody waits for it any more.
    by_id: HashMap<String, Vec<(u64, oneshot::Sender<Answer>)>>,
    next_ticket: u64,
    /// The ids to send; `None` once the stream is closed (by the client or by its end).
    ids: Option<mpsc::UnboundedSender<String>>,
}

impl WaitStreams {
    pub(crate) fn new(client: CoordinatorClient) -> Arc<WaitStreams> {
        Arc::new(WaitStreams {
            client,
            state: Mutex::new(Streams {
                current: None,
                unsupported: false,
            }),
        })
    }

    /// Waits at most `limit` for the saga `id` to be terminal. An error is the status the
    /// coordinator answered for this id, or why the stream ended before it answered.
    pub(crate) async fn wait(
        self: &Arc<Self>,
        id: &str,
        limit: Duration,
    ) -> Result<Waited, tonic::Status> {
        let Some((stream, ticket, answer)) = self.register(id) else {
            return Ok(Waited::Unsupported);
        };
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(Ok(state))) => Ok(Waited::State(state)),
            Ok(Ok(Err(status))) if status.code() == tonic::Code::Unimplemented => {
                Ok(Waited::Unsupported)
            }
            Ok(Ok(Err(status))) => Err(status),
            Ok(Err(_dropped)) => Err(tonic::Status::unavailable(
                "the wait stream ended without an answer",
            )),
            Err(_elapsed) => {
                stream.forget(id, ticket);
                Ok(Waited::TimedOut)
            }
        }
    }

    /// Puts a waiter for `id` on the open stream (opening one if none is), and sends the id
    /// unless it is already waited for there. `None` if the coordinator takes no streams.
    fn register(
        self: &Arc<Self>,
        id: &str,
    ) -> Option<(Arc<WaitStream>, u64, oneshot::Receiver<Answer>)> {
        let mut state = self.state.lock().expect("wait streams lock");
        if state.unsupported {
            return None;
        }
        loop {
            let stream = match &state.current {
                Some(stream) => stream.clone(),
                None => {
                    let stream = self.open();
                    state.current = Some(stream.clone());
                    stream
                }
            };
            let mut waiters = stream.waiters.lock().expect("wait stream lock");
            let Some(ids) = waiters.ids.clone() else {
                // Closed: nobody waited on it any more, or it ended. Open another.
                drop(waiters);
                state.current = None;
                continue;
            };
            let ticket = waiters.next_ticket;
            waiters.next_ticket += 1;
            let (sender, answer) = oneshot::channel();
            let entry = waiters.by_id.entry(id.to_string()).or_default();
            let first = entry.is_empty();
            entry.push((ticket, sender));
            if first && ids.send(id.to_string()).is_err() {
                // The call is over although nobody closed it yet: it will answer nobody.
                waiters.close();
                drop(waiters);
                state.current = None;
                continue;
            }
            drop(waiters);
            return Some((stream, ticket, answer));
        }
    }

    /// Starts a `WaitSagas` call; its task delivers the answers until the call ends.
    fn open(self: &Arc<Self>) -> Arc<WaitStream> {
        let (ids, queued) = mpsc::unbounded_channel::<String>();
        let stream = Arc::new(WaitStream {
            waiters: Mutex::new(Waiters {
                by_id: HashMap::new(),
                next_ticket: 0,
                ids: Some(ids),
            }),
        });
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(queued)
            .ready_chunks(CALL_BATCH_ITEMS_MAX)
            .map(|saga_ids| pb::WaitSagasRequest { saga_ids });
        let (streams, delivering) = (self.clone(), stream.clone());
        let mut client = self.client.clone();
        tokio::spawn(async move {
            let ended = match client.wait_sagas(outgoing).await {
                Ok(answers) => {
                    let mut answers = answers.into_inner();
                    loop {
                        match answers.message().await {
                            Ok(Some(message)) => delivering.deliver(message),
                            Ok(None) => {
                                break tonic::Status::unavailable(
                                    "the coordinator ended the wait stream",
                                )
                            }
                            Err(status) => break broken(status),
                        }
                    }
                }
                Err(status) => {
                    if status.code() == tonic::Code::Unimplemented {
                        tracing::debug!("the coordinator takes no WaitSagas; waiting one by one");
                        streams.state.lock().expect("wait streams lock").unsupported = true;
                    }
                    broken(status)
                }
            };
            delivering.end(ended);
        });
        stream
    }
}

/// A stream cut by its connection (the coordinator died or restarted) ends with UNKNOWN or
/// CANCELLED. Waiting changes nothing, so its waiters may simply wait again: UNAVAILABLE,
/// which `TandemClient::wait` retries (found by the chaos run).
fn broken(status: tonic::Status) -> tonic::Status {
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled => {
            tonic::Status::unavailable(format!("the wait stream broke: {}", status.message()))
        }
        _ => status,
    }
}

impl WaitStream {
    /// Hands each answer to everyone waiting for its saga; closes the stream if nobody waits
    /// any more.
    fn deliver(&self, message: pb::WaitSagasResponse) {
        let mut waiters = self.waiters.lock().expect("wait stream lock");
        for result in message.results {
            let answer = match result.result {
                Some(pb::wait_saga_result::Result::State(state)) => Ok(state),
                Some(pb::wait_saga_result::Result::Error(e)) => Err(e.into()),
                None => Err(tonic::Status::internal(format!(
                    "the coordinator answered a wait for saga {} without a result",
                    result.saga_id
                ))),
            };
            // An id nobody waits for any more (they timed out) is dropped.
            for (_, waiter) in waiters.by_id.remove(&result.saga_id).unwrap_or_default() {
                let _ = waiter.send(answer.clone());
            }
        }
        waiters.close_if_idle();
    }

    /// Takes the waiter `ticket` of `id` back (its limit passed); closes the stream if nobody
    /// waits any more.
    fn forget(&self, id: &str, ticket: u64) {
        let mut waiters = self.waiters.lock().expect("wait stream lock");
        if let Some(entry) = waiters.by_id.get_mut(id) {
            entry.retain(|(t, _)| *t != ticket);
            if entry.is_empty() {
                waiters.by_id.remove(id);
            }
        }
        waiters.close_if_idle();
    }

    /// The call is over: everyone still waiting gets `status`.
    fn end(&self, status: tonic::Status) {
        let mut waiters = self.waiters.lock().expect("wait stream lock");
        waiters.close();
        for (_, list) in waiters.by_id.drain() {
            for (_, waiter) in list {
                let _ = waiter.send(Err(status.clone()));
            }
        }
    }
}

impl Waiters {
    fn close_if_idle(&mut self) {
        if self.by_id.is_empty() {
            self.close();
        }
    }

    /// Sends no more ids: the request side ends, and with it the call.
    fn close(&mut self) {
        self.ids = None;
    }
}
