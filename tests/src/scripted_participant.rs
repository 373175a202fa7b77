//! A participant whose timing the test decides: it speaks `tandem.v1.Participant` in the
//! test's own process, holds each prepare or action (or batch of actions) for a set time,
//! always votes YES, and records every call it receives.
//!
//! An action succeeds unless its payload says otherwise: `fail:<reason>` answers FAILED with
//! that reason, `refuse:<message>` the status FAILED_PRECONDITION with that message (as an
//! error item in a batch). Step batches are served (every item counted as an action or a
//! compensation, and each batch's saga ids kept in order) unless the participant was started
//! with [`ScriptedParticipant::start_without_batches`], which answers them UNIMPLEMENTED, as a
//! participant built before batches does.
//!
//! The bank (a real `tandem-bank` process) answers in microseconds, which leaves nothing in
//! flight to observe; tests of admission control and shutdown need calls that stay open for
//! as long as they choose. This participant keeps no durable state: it is a probe of what
//! the coordinator sends, not a service (the barrier is proven against the bank).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_participant::server::{act_batch_item, compensate_batch_item};
use tandem_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// What the participant received, by kind of call, keyed by transaction or saga id.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub prepares: BTreeMap<String, u32>,
    pub commits: BTreeMap<String, u32>,
    pub aborts: BTreeMap<String, u32>,
    pub acts: BTreeMap<String, u32>,
    pub compensations: BTreeMap<String, u32>,
    /// Every `ActBatch` served, in arrival order: its items' saga ids.
    pub act_batches: Vec<Vec<String>>,
    /// Every `CompensateBatch` served, in arrival order: its items' saga ids.
    pub compensate_batches: Vec<Vec<String>>,
    /// Batch calls answered UNIMPLEMENTED (started without batches).
    pub refused_batches: u32,
}

#[derive(Clone)]
struct Scripted {
    hold: Duration,
    batches: bool,
    received: Arc<Mutex<Received>>,
}

/// An action's answer as its payload scripts it (see the module docs).
fn scripted_action(payload: &[u8]) -> Result<pb::ActResponse, Status> {
    let text = String::from_utf8_lossy(payload);
    if let Some(message) = text.strip_prefix("refuse:") {
        return Err(Status::failed_precondition(message));
    }
    let (result, reason) = match text.strip_prefix("fail:") {
        Some(reason) => (pb::StepResult::Failed, reason.to_string()),
        None => (pb::StepResult::Succeeded, String::new()),
    };
    Ok(pb::ActResponse {
        result: result as i32,
        reason,
    })
}

impl Scripted {
    fn record(&self, pick: impl FnOnce(&mut Received) -> &mut BTreeMap<String, u32>, id: &str) {
        let mut received = self.received.lock().expect("received lock");
        *pick(&mut received).entry(id.to_string()).or_default() += 1;
    }

    /// Records a batch (or refuses it, without batches) and returns its steps.
    fn batch(
        &self,
        request: pb::StepBatchRequest,
        batches: impl FnOnce(&mut Received) -> &mut Vec<Vec<String>>,
        calls: impl Fn(&mut Received) -> &mut BTreeMap<String, u32>,
    ) -> Result<Vec<pb::StepRequest>, Status> {
        let mut received = self.received.lock().expect("received lock");
        if !self.batches {
            received.refused_batches += 1;
            return Err(Status::unimplemented(
                "this participant serves no step batches",
            ));
        }
        let ids = request.steps.iter().map(|s| s.saga_id.clone()).collect();
        batches(&mut received).push(ids);
        for step in &request.steps {
            *calls(&mut received)
                .entry(step.saga_id.clone())
                .or_default() += 1;
        }
        Ok(request.steps)
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for Scripted {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        self.record(|r| &mut r.prepares, &request.txn_id);
        tokio::time::sleep(self.hold).await;
        Ok(Response::new(pb::PrepareResponse {
            vote: pb::Vote::Yes as i32,
            reason: String::new(),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.record(|r| &mut r.commits, &request.into_inner().txn_id);
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn abort(
        &self,
        request: Request<pb::DecisionRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        self.record(|r| &mut r.aborts, &request.into_inner().txn_id);
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }

    async fn act(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::ActResponse>, Status> {
        let request = request.into_inner();
        self.record(|r| &mut r.acts, &request.saga_id);
        tokio::time::sleep(self.hold).await;
        scripted_action(&request.payload).map(Response::new)
    }

    async fn compensate(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::CompensateResponse>, Status> {
        self.record(|r| &mut r.compensations, &request.into_inner().saga_id);
        Ok(Response::new(pb::CompensateResponse {}))
    }

    async fn act_batch(
        &self,
        request: Request<pb::StepBatchRequest>,
    ) -> Result<Response<pb::ActBatchResponse>, Status> {
        let steps = self.batch(
            request.into_inner(),
            |r| &mut r.act_batches,
            |r| &mut r.acts,
        )?;
        // The items run together: the batch is held once.
        tokio::time::sleep(self.hold).await;
        let items = steps
            .iter()
            .map(|step| act_batch_item(scripted_action(&step.payload)))
            .collect();
        Ok(Response::new(pb::ActBatchResponse { items }))
    }

    async fn compensate_batch(
        &self,
        request: Request<pb::StepBatchRequest>,
    ) -> Result<Response<pb::CompensateBatchResponse>, Status> {
        let steps = self.batch(
            request.into_inner(),
            |r| &mut r.compensate_batches,
            |r| &mut r.compensations,
        )?;
        let items = steps
            .iter()
            .map(|_| compensate_batch_item(Ok(())))
            .collect();
        Ok(Response::new(pb::CompensateBatchResponse { items }))
    }

    async fn saga_finished(
        &self,
        _request: Request<pb::SagaFinishedRequest>,
    ) -> Result<Response<pb::SagaFinishedResponse>, Status> {
        Ok(Response::new(pb::SagaFinishedResponse {}))
    }
}

/// A running scripted participant; it stops when dropped.
pub struct ScriptedParticipant {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    _stop: oneshot::Sender<()>,
}

impl ScriptedParticipant {
    /// Serves on a free loopback port; every prepare and action (or batch of actions) is held
    /// for `hold`.
    pub async fn start(hold: Duration) -> ScriptedParticipant {
        ScriptedParticipant::serve(hold, true).await
    }

    /// [`ScriptedParticipant::start`], answering step batches UNIMPLEMENTED.
    pub async fn start_without_batches(hold: Duration) -> ScriptedParticipant {
        ScriptedParticipant::serve(hold, false).await
    }

    async fn serve(hold: Duration, batches: bool) -> ScriptedParticipant {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port for the scripted participant");
        let addr = listener.local_addr().expect("bound address");
        let received = Arc::new(Mutex::new(Received::default()));
        let service = Scripted {
            hold,
            batches,
            received: received.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::participant_server::ParticipantServer::new(service))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        ScriptedParticipant {
            addr,
            received,
            _stop: stop,
        }
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// A 2PC transaction `txn` with one branch here.
    pub fn execute_request(&self, txn: &str) -> pb::Execute2pcRequest {
        pb::Execute2pcRequest {
            txn_id: txn.into(),
            branches: vec![pb::Branch {
                participant: self.address(),
                resource: "scripted".into(),
                payload: b"work".to_vec(),
            }],
            timeout_ms: 60_000,
        }
    }

    /// A saga `saga` (empty: the coordinator names it) of one step `step` here.
    pub fn one_step_saga(&self, saga: &str, step: &str) -> pb::SubmitSagaRequest {
        pb::SubmitSagaRequest {
            saga_id: saga.into(),
            steps: vec![pb::SagaStep {
                name: step.into(),
                participant: self.address(),
                resource: "scripted".into(),
                action: b"act".to_vec(),
                compensation: b"undo".to_vec(),
                ..Default::default()
            }],
            sequential: true,
            ..Default::default()
        }
    }

    /// A copy of what it received so far.
    pub fn received(&self) -> Received {
        self.received.lock().expect("received lock").clone()
    }
}
